"""Loading models and tokenizers (hub ids or local folders) the same way everywhere.

One loader serves the tiny test models and an 8B model: device and dtype are resolved here (fp32
on CPU, bf16 on GPU), the chat template is checked here, and the two reward models' tokenizers
are compared here.

GGUF files are a model source like any other: `path/to/model.gguf`, or `folder::model.gguf` (a
local folder or a hub repo id, then the file name in it). transformers dequantizes them (needs the
`gguf` package, `pip install icr[gguf]`); we do that ONCE per file and dtype and keep the result as
a normal checkpoint (weights + tokenizer) under `<ICR_CACHE>/gguf/<name>-<sha256>/<dtype>/`.
Why a converted copy rather than loading the GGUF in every stage: dequantizing is slow (~45 s for
a 270 M-parameter Q4_K_M file on 2 CPU cores; the copy then loads in < 1 s), a GGUF-loaded model
refuses `save_pretrained` (transformers marks it quantized), and vLLM, TRL and the scorer all take
a plain folder. Every later stage, and training's saved policy, is then an ordinary checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import IcrError

GGUF_SEP = "::"


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise IcrError("device: cuda requested but no CUDA device is available")
    return device


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise IcrError(f"models.dtype: unknown dtype {dtype!r} (auto, float32, bfloat16, float16)") from None


def _check_exists(name_or_path: str, what: str) -> None:
    looks_local = name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.strip("/").split("/", 2)[-1]
    if Path(name_or_path).expanduser().exists():
        return
    if looks_local or name_or_path.count("/") > 1 or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise IcrError(f"{what}: model path {name_or_path!r} does not exist")


def is_gguf(name_or_path: str) -> bool:
    """A GGUF model spec: `x.gguf` or `folder::x.gguf`."""
    return GGUF_SEP in name_or_path or name_or_path.lower().endswith(".gguf")


def gguf_file(spec: str, what: str = "model") -> Path:
    """The local GGUF file a spec names (a hub repo in `repo::file.gguf` is fetched via the hub cache)."""
    if GGUF_SEP in spec:
        folder, _, name = spec.partition(GGUF_SEP)
        if not name.lower().endswith(".gguf") or not folder:
            raise IcrError(f"{what}: {spec!r}: expected `folder::file.gguf`")
        local = Path(folder).expanduser()
        if local.is_dir():
            path = local / name
        else:
            _check_exists(folder, what)
            try:
                from huggingface_hub import hf_hub_download

                path = Path(hf_hub_download(folder, name))
            except Exception as e:  # noqa: BLE001 - hub errors come in many classes; one message for all
                raise IcrError(f"{what}: cannot fetch {name!r} from {folder!r} ({str(e).splitlines()[0]})") from None
    else:
        path = Path(spec).expanduser()
    if not path.is_file():
        raise IcrError(f"{what}: GGUF file {str(path)!r} does not exist")
    return path


def gguf_checkpoint(spec: str, dtype: str | None = "float32", what: str = "model") -> Path:
    """A normal checkpoint folder converted from a GGUF spec, built once per (file content, dtype)
    and reused: weights in `dtype` + tokenizer, or the tokenizer alone for dtype None (the loaders
    that need only the tokenizer do not pay for dequantizing). Concurrent callers each convert into
    a private temporary folder and the first rename wins, so no reader sees a half-written copy."""
    import shutil

    from .runs import cache_root, file_sha256, honour_umask, write_json

    path = gguf_file(spec, what)
    digest = file_sha256(path)
    out = cache_root() / "gguf" / f"{path.stem}-{digest[:16]}" / (dtype or "tokenizer")
    if (out / "icr_gguf_source.json").is_file():
        return out
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        check_gguf_tokenizer(tok, path, what)
        if dtype is not None:
            import torch

            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                         dtype=getattr(torch, dtype))
            # The weights are dequantized plain tensors now; the quantizer marker only blocks saving.
            model.hf_quantizer = None
            if getattr(model.config, "quantization_config", None) is not None:
                del model.config.quantization_config
            model.save_pretrained(tmp)
    except ImportError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise IcrError(f"{what}: loading {str(path)!r} needs the gguf package (pip install 'icr[gguf]'): "
                       f"{str(e).splitlines()[0]}") from None
    except (OSError, ValueError, KeyError, NotImplementedError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise IcrError(f"{what}: cannot load GGUF file {str(path)!r} ({str(e).splitlines()[0]})") from None
    tok.save_pretrained(tmp)
    write_json(tmp / "icr_gguf_source.json", {"file": str(path.resolve()), "sha256": digest, "dtype": dtype,
                                              "bytes": path.stat().st_size})
    honour_umask(tmp)
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def check_gguf_tokenizer(tok, path: Path, what: str = "model") -> None:
    """The tokenizer transformers converted from a GGUF file must encode as the file says: the bos token
    first when the file asks for it (`tokenizer.ggml.add_bos_token`), and every control / user-defined
    token (turn markers, bos, eos, pad) as its own id. transformers 5.17 and 5.20 convert Gemma's GGUF
    tokenizer without adding bos (measured on the test's tiny file; 5.24 is right), so every prompt would
    silently lack the token the model was trained to see first."""
    import gguf

    fields = gguf.GGUFReader(str(path)).fields

    def scalar(name):
        field = fields.get(name)
        return None if field is None else field.parts[field.data[0]][0]

    def problem() -> str | None:
        if scalar("tokenizer.ggml.add_bos_token") and tok.bos_token_id is not None:
            ids = tok.encode("a", add_special_tokens=True)
            if not ids or ids[0] != tok.bos_token_id:
                return f"encoding does not start with the bos token {tok.bos_token!r} the file asks for"
        tokens, types = fields.get("tokenizer.ggml.tokens"), fields.get("tokenizer.ggml.token_type")
        if tokens is None or types is None:
            return None
        names = [bytes(tokens.parts[i]).decode("utf-8", "replace") for i in tokens.data]
        kinds = [int(types.parts[i][0]) for i in types.data]
        for token_id, (name, kind) in enumerate(zip(names, kinds)):
            if kind in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED):
                got = tok.encode(name, add_special_tokens=False)
                if got != [token_id]:
                    return f"token {name!r} encodes as {got}, the file says [{token_id}]"
        return None

    found = problem()
    if found:
        import transformers

        raise IcrError(f"{what}: {path}: transformers {transformers.__version__} converts this GGUF tokenizer "
                       f"wrongly ({found}); GGUF models need transformers >= 5.24")


def local_model_path(name_or_path: str, dtype: str | None = "float32", what: str = "model") -> str:
    """What transformers/vLLM/TRL should load: the converted checkpoint for a GGUF spec (the
    tokenizer alone for dtype None), else the spec unchanged."""
    return str(gguf_checkpoint(name_or_path, dtype, what)) if is_gguf(name_or_path) else name_or_path


def load_tokenizer(name_or_path: str, chat_template: str | None = None, what: str = "model"):
    """A tokenizer with a usable chat template and a pad token."""
    from transformers import AutoTokenizer

    if is_gguf(name_or_path):
        name_or_path = local_model_path(name_or_path, None, what)
    _check_exists(name_or_path, what)
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError, TypeError, KeyError) as e:  # missing files, or a config/tokenizer file it cannot read
        raise IcrError(f"{what}: cannot load tokenizer from {name_or_path!r} ({str(e).splitlines()[0]})") from None
    if chat_template:
        path = Path(chat_template)
        tok.chat_template = path.read_text(encoding="utf-8") if path.suffix == ".jinja" and path.is_file() else chat_template
    if not getattr(tok, "chat_template", None):
        raise IcrError(f"{what}: tokenizer of {name_or_path!r} has no chat template; "
                       "set models.chat_template to a Jinja template or a .jinja file")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(name_or_path: str, device: str = "auto", dtype: str = "auto", what: str = "model"):
    from transformers import AutoModelForCausalLM

    device = resolve_device(device)
    if is_gguf(name_or_path):
        name_or_path = local_model_path(name_or_path, str(resolve_dtype(dtype, device)).removeprefix("torch."), what)
    _check_exists(name_or_path, what)
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=resolve_dtype(dtype, device))
    except OSError as e:
        raise IcrError(f"{what}: cannot load model from {name_or_path!r} ({str(e).splitlines()[0]})") from None
    model.to(device)
    model.eval()
    check_finite(model, f"{what}: {name_or_path}")
    return model


def check_finite(model, what: str) -> None:
    """Refuse a model holding NaN or inf weights (a damaged file, a diverged training): it would
    give NaN log-probs and rewards, or silently garbled samples, with exit 0. One pass over the
    weights on their device (an 8B model on a GPU: well under a second)."""
    import torch

    for name, param in model.named_parameters():
        if type(param.data).__name__ == "DTensor" or param.is_meta:
            continue
        if not bool(torch.isfinite(param.detach()).all()):
            bad = int((~torch.isfinite(param.detach())).sum())
            raise IcrError(f"{what}: weight {name} holds {bad} NaN or inf value(s) of {param.numel()}")


def check_same_tokenizer(tok_a, tok_b, name_a: str, name_b: str) -> None:
    if tok_a.get_vocab() != tok_b.get_vocab():
        raise IcrError(f"reward models {name_a!r} and {name_b!r} have different tokenizers "
                       f"(vocab sizes {len(tok_a.get_vocab())} vs {len(tok_b.get_vocab())}); "
                       "the implicit reward needs both on the same token ids")
    if tok_a.chat_template != tok_b.chat_template or tok_a.eos_token_id != tok_b.eos_token_id:
        raise IcrError(f"reward models {name_a!r} and {name_b!r} differ in chat template or end token")


def chat_messages(instruction: str) -> list[dict]:
    return [{"role": "user", "content": instruction}]


def check_model(name_or_path: str, what: str = "model") -> list[str] | None:
    """Check a model without loading its weights: its config loads, and (local folders) the weight
    files transformers would load are there (model.safetensors, its sharded index, or
    pytorch_model.bin and its index, in transformers' order), every safetensors file has a readable
    header whose tensors fit the file, and the weights hold every layer the config declares (read
    from the tensor names of the headers or index: a missing layer would be initialised at random
    with only a warning).

    Run by preflight, so that a broken model folder (empty, a config.json with wrong types, no or
    truncated or garbage weights, weights of a smaller model) is reported before any run folder is
    written. Returns the weights' tensor names where they are known without reading tensor data
    (a local safetensors model), else None.
    """
    from transformers import AutoConfig

    if is_gguf(name_or_path):
        gguf_file(name_or_path, what)  # the file exists; it is read when dequantized (tokenizer load)
        return None
    _check_exists(name_or_path, what)
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except Exception as e:  # noqa: BLE001 - transformers raises OSError, ValueError, TypeError, ... for a bad config
        detail = " ".join(str(e).split())[:300]  # one line: strict-dataclass errors span several
        raise IcrError(f"{what}: cannot load the model config of {name_or_path!r} ({type(e).__name__}: {detail})") from None
    folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        return None  # a hub id: its files are checked when downloaded
    names = None  # tensor names, where known without reading tensor data
    files = []
    explicit = getattr(config, "transformers_weights", None)  # config.json may name its weights file
    candidates = [explicit] if isinstance(explicit, str) and explicit else \
        ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"]
    found = next((folder / c for c in candidates if (folder / c).is_file()), None)
    if found is None:
        raise IcrError(f"{what}: {folder} has no weight files ({' or '.join(candidates)})")
    if found.name.endswith(".index.json"):
        try:
            weight_map = json.loads(found.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
            names = list(weight_map)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise IcrError(f"{what}: {found}: not a valid weights index ({type(e).__name__})") from None
        files = [folder / name for name in shards]
        missing = [str(f.name) for f in files if not f.is_file()]
        if missing:
            raise IcrError(f"{what}: {found} lists shard(s) that are not there: {', '.join(missing[:3])}")
    else:
        files = [found]
    for path in files:
        if path.suffix != ".safetensors":
            continue
        tensors, problem = safetensors_header(path)
        if problem:
            raise IcrError(f"{what}: {path}: not a valid safetensors file ({problem})")
        if found.suffix == ".safetensors":
            names = list(tensors)
    if names is not None:
        _check_layer_count(config, names, folder, what)
    return names


def check_lora_targets(targets: list[str], names: list[str], what: str) -> None:
    """Every `train.lora.target_modules` entry names a module of the model, matched as peft matches
    it (the module's full name, or its last dotted parts); `names` are the weights' tensor names.
    Else peft fails once training starts, after generation and scoring."""
    modules = {name.rsplit(".", 1)[0] for name in names if "." in name}
    leaves = sorted({m.rsplit(".", 1)[-1] for m in modules if not m.rsplit(".", 1)[-1].isdigit()})
    for target in targets:
        if not any(m == target or m.endswith("." + target) for m in modules):
            raise IcrError(f"train.lora.target_modules: {target!r} names no module of {what} (its modules end in: "
                           f"{', '.join(leaves[:20])}{', ...' if len(leaves) > 20 else ''})")


def _check_layer_count(config, names: list[str], folder: Path, what: str) -> None:
    """The weights hold layers 0 .. num_hidden_layers-1 of the (text) model.

    Layer tensors are named `<prefix>layers.<i>.`; a multimodal model has several prefixes (the
    vision tower's layers too), so the check passes when one prefix holds every declared layer.
    Architectures without `layers.<i>.` names, or configs without num_hidden_layers, are not checked.
    """
    import re

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    declared = getattr(text, "num_hidden_layers", None)
    if not isinstance(declared, int) or declared <= 0:
        return
    by_prefix: dict[str, set[int]] = {}
    for name in names:
        m = re.search(r"(^|.*\.)layers\.(\d+)\.", name)
        if m:
            by_prefix.setdefault(m.group(1), set()).add(int(m.group(2)))
    if not by_prefix or any(set(range(declared)) <= held for held in by_prefix.values()):
        return
    prefix, held = max(by_prefix.items(), key=lambda kv: len(kv[1] & set(range(declared))))
    missing = sorted(set(range(declared)) - held)
    shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
    raise IcrError(f"{what}: {folder}: the config declares {declared} layers (num_hidden_layers) but the weights "
                   f"hold {len(held)} ({prefix}layers.N; missing {shown}): the weights do not fit the config")


def safetensors_header(path: Path) -> tuple[dict, str | None]:
    """(its tensors: name -> dtype/shape/data_offsets, None) from a safetensors file's header alone,
    or ({}, why it is not a well-formed safetensors file: header and tensor extents).

    The format: 8 bytes little-endian header length N, N bytes of JSON
    `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the data;
    offsets are relative to the end of the header and the last tensor ends at the end of the file.
    """
    import struct

    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return {}, f"{size} bytes, too short for a header"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                return {}, f"header length {n} does not fit the file's {size} bytes"
            header = json.loads(fh.read(n).decode("utf-8"))
    except FileNotFoundError:
        return {}, "file missing"
    except (UnicodeDecodeError, ValueError):
        return {}, "header is not JSON"
    except OSError as e:
        return {}, f"cannot read ({e.strerror})"
    if not isinstance(header, dict):
        return {}, "header is not a JSON object"
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = info["data_offsets"]
            if not (isinstance(info["dtype"], str) and isinstance(info["shape"], list)
                    and 0 <= begin <= stop):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            return {}, f"tensor {name!r} has no valid dtype/shape/data_offsets"
        end = max(end, stop)
    if 8 + n + end != size:
        return {}, f"tensors end at byte {8 + n + end} but the file has {size} bytes (truncated or padded)"
    header.pop("__metadata__", None)
    return header, None


def release_memory() -> None:
    """Return freed memory after a model is dropped: collect reference cycles (transformers models
    hold some), then give cached CUDA blocks back so the next stage or process can have them."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
