"""Training benchmark: DPO+NLL epoch time and peak memory, with and without precomputed
reference log-probs (`train.precompute_ref_log_probs`).

    .venv/bin/python bench/train.py [--quick]

Each variant runs `icr.train.train_dpo` in a fresh child process (so ru_maxrss is that variant's
peak resident memory), plain then precomputed, on the same pairs: a Llama-architecture model with
random weights (hidden 256, 4 layers, BPE vocabulary 4000 from icr.tiny) as policy and reference,
pairs built from UltraFeedback sample prompts with a short and a long answer of sample text.
Epoch time includes the reference pass when precomputed (the whole train call is timed).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import LANGS, SHARED_DATA, finish, peak_rss_mb, skip


def child(args) -> None:
    import torch

    from icr.config import TrainConfig
    from icr.train import train_dpo

    work = Path(args.workdir)
    pairs = json.loads((work / "pairs.json").read_text())
    cfg = TrainConfig(precompute_ref_log_probs=args.child == "precomputed", per_device_batch_size=4,
                      max_length=256, learning_rate=1e-4, epochs=1, save_steps=10_000, logging_steps=10_000)
    t0 = time.perf_counter()
    train_dpo(pairs, str(work / "model"), str(work / "model"), cfg, work / f"out-{args.child}",
              work / f"model-{args.child}", seed=0, device="cpu")
    print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb(),
                      "threads": torch.get_num_threads()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="24 pairs, hidden 128 / 2 layers")
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--child", choices=["plain", "precomputed"], help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.quick:
        args.pairs, args.hidden, args.layers = 24, 128, 2
    uf = SHARED_DATA / "ultrafeedback-multilingual-sample"
    if not uf.is_dir():
        return skip("train", "sample data folder ../shared/data is absent")
    from icr.tiny import build_model, build_tokenizer

    texts = [json.loads(x)["instruction"] for lang in LANGS for x in (uf / f"{lang}.jsonl").read_text().splitlines()]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tok = build_tokenizer(texts, vocab_size=4000)
        model = build_model(tok, hidden_size=args.hidden, num_layers=args.layers, max_position_embeddings=512)
        model.save_pretrained(work / "model")
        tok.save_pretrained(work / "model")
        pairs = [{"prompt": texts[i][:200], "chosen": texts[i + 1][:150], "rejected": texts[i + 2][:400]}
                 for i in range(args.pairs)]
        (work / "pairs.json").write_text(json.dumps(pairs))
        res = {}
        for variant in ("plain", "precomputed"):
            out = subprocess.run([sys.executable, __file__, "--child", variant, "--workdir", str(work)],
                                 capture_output=True, text=True, cwd=Path(__file__).parent)
            if out.returncode != 0:
                sys.stderr.write(out.stderr[-3000:])
                raise SystemExit(f"train bench child {variant} failed")
            res[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    p, q = res["plain"], res["precomputed"]
    figures = {"bench": "train", "plain_epoch_s": round(p["seconds"], 2), "precomputed_epoch_s": round(q["seconds"], 2),
               "time_ratio": round(q["seconds"] / p["seconds"], 3), "plain_peak_rss_mb": round(p["peak_rss_mb"], 1),
               "precomputed_peak_rss_mb": round(q["peak_rss_mb"], 1),
               "memory_ratio": round(q["peak_rss_mb"] / p["peak_rss_mb"], 3), "pairs": args.pairs,
               "hidden": args.hidden, "layers": args.layers, "threads": p["threads"], "quick": args.quick}
    finish(f"train: DPO+NLL epoch {figures['plain_epoch_s']} s / peak {figures['plain_peak_rss_mb']} MiB plain vs "
           f"{figures['precomputed_epoch_s']} s / {figures['precomputed_peak_rss_mb']} MiB with precomputed reference "
           f"log-probs ({args.pairs} pairs)", figures)


if __name__ == "__main__":
    main()
