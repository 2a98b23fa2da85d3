"""Training throughput on CPU: steps/s and samples/s of the full train loop (loader + on-device augmentation +
forward/backward + AdamW) for AVCapConfig.tiny() at the real input sizes (fbank 1024x128, 224x224 frames).

    .venv/bin/python benchmarks/bench_train.py --steps 30 --batch-size 8 [--nproc 2]

Builds a synthetic dataset in the shard layout (tests/fixtures_loader.build_dataset: 20 frames per clip) in a temp
dir, runs train.py (in-process, or under torchrun with --nproc > 1), and reads the per-step rate the rank-0 logger
wrote to metrics.jsonl, skipping the first --warmup steps (worker start, allocator warm-up).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--num-workers", type=int, default=1)
    ap.add_argument("--clips", type=int, default=128)
    args = ap.parse_args()

    from avcap.tokenizer import build_wordpiece_vocab
    from tests.fixtures_loader import build_dataset

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        root = Path(tmp) / "data"
        build_dataset(root, {"train": [args.clips // 4] * 4, "val": [8]})
        vocab = build_wordpiece_vocab([f"clip {c} caption {k}" for c in range(args.clips + 8) for k in range(2)],
                                      root / "vocab.txt", vocab_size=300)
        out = Path(tmp) / "run"
        flags = ["--data", str(root), "--out", str(out), "--vocab", str(vocab), "--model", "tiny",
                 "--batch-size", str(args.batch_size), "--num-workers", str(args.num_workers), "--epochs", "100",
                 "--max-steps", str(args.steps), "--eval-every", "0", "--no-progress", "--no-tensorboard",
                 "--precision", "fp32", "--device", "cpu"]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                     str(args.nproc)] if args.nproc > 1 else [sys.executable])
        t0 = time.perf_counter()
        subprocess.run([*launcher, str(REPO / "train.py"), *flags], check=True, cwd=REPO, env=env)
        wall = time.perf_counter() - t0
        recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        rates = [r["samples_per_s"] for r in recs if r["kind"] == "train" and r["step"] > args.warmup]
        if not rates:
            raise SystemExit(f"no steps after the {args.warmup} warm-up steps: raise --steps")
    sps = statistics.median(rates)
    global_batch = args.batch_size * args.nproc
    import torch
    print(json.dumps({"model": "AVCapConfig.tiny()", "inputs": "fbank 1024x128, 1 frame 224x224",
                      "nproc": args.nproc, "torch_threads_per_proc": env["OMP_NUM_THREADS"],
                      "num_workers": args.num_workers, "batch_per_rank": args.batch_size,
                      "steps_measured": len(rates), "samples_per_s": round(sps, 1),
                      "steps_per_s": round(sps / global_batch, 2), "wall_s_incl_startup": round(wall, 1),
                      "cpu_count": os.cpu_count(), "torch": torch.__version__}, indent=1))


if __name__ == "__main__":
    main()
