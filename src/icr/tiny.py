"""Tiny local models: a BPE tokenizer with a chat template and a small Llama, built offline.

Nothing can be downloaded here, so tests, `configs/tiny.yaml` and the sandbox build their models
from scratch. They go through the same `save_pretrained`/`from_pretrained` path as hub models, so
the pipeline code that loads them is the code that loads an 8B model.

`prepare` (used by `configs/tiny.yaml`) builds a smoke-test pair in seconds: pi_SFT is a small LM
fitted briefly to templated multilingual chat data, pi0 is pi_SFT fitted a little further on the
concise English answers only. It is *not* a meaningfully aligned pair: it exists to run every
stage end to end. The sandbox (`icr.sandbox`) builds a pair that has what the method presumes.
"""

from __future__ import annotations

import random
from pathlib import Path

# ChatML with generation markers (so `return_assistant_tokens_mask` works). The assistant turn ends
# with <|im_end|> and nothing after it: the end-of-turn token is the last response token, which the
# implicit reward includes.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(texts: list[str], vocab_size: int = 512, chat_template: str | None = CHAT_TEMPLATE):
    """A byte-level BPE tokenizer trained on `texts`, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>", bos_token=None,
        unk_token=None, additional_special_tokens=["<|im_start|>", "<|endoftext|>"])
    if chat_template is not None:
        wrapped.chat_template = chat_template
    wrapped.padding_side = "left"
    return wrapped


def build_model(tokenizer, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                max_position_embeddings: int = 1024, seed: int = 0):
    """A randomly initialised Llama-architecture causal LM sized for CPU tests."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 3,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2), max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def fit_causal_lm(model, tokenizer, conversations: list[list[dict]], epochs: int = 1, lr: float = 3e-3,
                  batch_size: int = 16, seed: int = 0, assistant_only: bool = True):
    """Plain next-token training on chat conversations (a minimal SFT loop for tiny models).

    TRL's SFTTrainer does this too, but costs seconds of set-up per call; the tiny builders run
    it many times, so a 20-line loop is kept here. Loss is on assistant tokens only by default.
    """
    import torch

    rng = random.Random(seed)
    torch.manual_seed(seed)
    enc = [tokenizer.apply_chat_template(c, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
           for c in conversations]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    order = list(range(len(enc)))
    for _ in range(epochs):
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            items = [enc[i] for i in order[start:start + batch_size]]
            width = max(len(e["input_ids"]) for e in items)
            ids = torch.full((len(items), width), tokenizer.pad_token_id)
            labels = torch.full((len(items), width), -100)
            mask = torch.zeros((len(items), width), dtype=torch.long)
            for row, e in enumerate(items):
                n = len(e["input_ids"])
                ids[row, :n] = torch.tensor(e["input_ids"])
                mask[row, :n] = 1
                keep = torch.tensor(e["assistant_masks"] if assistant_only else [1] * n, dtype=torch.bool)
                labels[row, :n] = torch.where(keep, torch.tensor(e["input_ids"]), torch.tensor(-100))
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
    model.eval()
    return model


# ---------------------------------------------------------------------------------------------
# The smoke-test world for configs/tiny.yaml
# ---------------------------------------------------------------------------------------------

_TINY_TEMPLATES = {
    "en": ("Name a {x}.", "A {x}: {y}.", "Sure! Here is a {x} for you, a lovely one: {y}. I hope this helps you."),
    "es": ("Nombra un {x}.", "Un {x}: {y}.", "¡Claro! Aquí tienes un {x} para ti, uno bonito: {y}. Espero que te ayude."),
    "de": ("Nenne ein {x}.", "Ein {x}: {y}.", "Gerne! Hier ist ein {x} für dich, ein schönes: {y}. Ich hoffe, das hilft dir."),
}
_TINY_THINGS = {
    "en": [("colour", ["red", "blue", "green"]), ("animal", ["cat", "dog", "horse"]), ("fruit", ["apple", "pear", "plum"])],
    "es": [("color", ["rojo", "azul", "verde"]), ("animal", ["gato", "perro", "caballo"]), ("fruto", ["manzana", "pera", "ciruela"])],
    "de": [("Farbwort", ["rot", "blau", "grün"]), ("Tier", ["Katze", "Hund", "Pferd"]), ("Obst", ["Apfel", "Birne", "Pflaume"])],
}


def tiny_prompts(n_per_lang: int, offset: int = 0) -> dict[str, list[dict]]:
    """Parallel prompts `{lang: [{"instruction_id", "instruction"}]}` over en/es/de."""
    out = {lang: [] for lang in _TINY_TEMPLATES}
    for i in range(offset, offset + n_per_lang):
        k = i % len(_TINY_THINGS["en"])
        for lang, (instr, _, _) in _TINY_TEMPLATES.items():
            thing = _TINY_THINGS[lang][k][0]
            out[lang].append({"instruction_id": f"tiny-{i:04d}", "instruction": f"{instr.format(x=thing)} (#{i})"})
    return out


def prepare(out_dir: str | Path, hidden_size: int = 64, num_layers: int = 2, n_train: int = 12,
            n_eval: int = 6, seed: int = 0) -> dict:
    """Build the smoke-test pair and prompt files into `out_dir` (see module docstring)."""
    import json

    from .runs import atomic_write_text

    out_dir = Path(out_dir)
    rng = random.Random(seed)
    convs, english_good = [], []
    for i in range(200):
        k = i % 3
        for lang, (instr, good, bad) in _TINY_TEMPLATES.items():
            thing, values = _TINY_THINGS[lang][k]
            y = rng.choice(values)
            answer = (good if rng.random() < 0.5 else bad).format(x=thing, y=y)
            conv = [{"role": "user", "content": f"{instr.format(x=thing)} (#{i})"},
                    {"role": "assistant", "content": answer}]
            convs.append(conv)
            if lang == "en":
                english_good.append([conv[0], {"role": "assistant", "content": good.format(x=thing, y=y)}])
    texts = [m["content"] for c in convs for m in c]
    tokenizer = build_tokenizer(texts, vocab_size=400)
    model = build_model(tokenizer, hidden_size=hidden_size, num_layers=num_layers, seed=seed)
    fit_causal_lm(model, tokenizer, convs, epochs=2, seed=seed)
    model.save_pretrained(out_dir / "sft")
    tokenizer.save_pretrained(out_dir / "sft")
    fit_causal_lm(model, tokenizer, english_good[:100], epochs=1, lr=1e-3, seed=seed)
    model.save_pretrained(out_dir / "dpo")
    tokenizer.save_pretrained(out_dir / "dpo")
    for split, prompts in (("train", tiny_prompts(n_train)), ("eval", tiny_prompts(n_eval, offset=1000))):
        for lang, rows in prompts.items():
            atomic_write_text(out_dir / "prompts" / split / f"{lang}.jsonl",
                              "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return {"sft": str(out_dir / "sft"), "dpo": str(out_dir / "dpo")}
