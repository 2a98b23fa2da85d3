"""CPU profile of the full-size train step: `avcap.training.train_step` against the plain form of the same step
(tests/fixtures_model.plain_loss: every decoder layer over every row, logits at every position, log-softmax +
gather loss; per-op AdamW), interleaved step by step in one process so machine load hits both alike.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/profile_train_step.py --steps 2 --batch-size 2

Full-size AVCap (bert-base vocabulary), one frame (708 prefix tokens), 42-token captions, fp32, dropout on (the
train-mode cost: attention dropout keeps the decoder's SDPA off the fused CPU kernel), text decoder frozen as in
the README recipe and fully trainable. Reports process CPU seconds per step (the stable figure on a shared box),
wall seconds, and each variant's top operators by self CPU time (torch.profiler, summed over the timed steps).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from avcap.model import AVCap, AVCapConfig  # noqa: E402
from avcap.optim import build_optimizer, resolve_precision
from avcap.train_config import TrainConfig
from avcap.training import train_step  # noqa: E402
from tests.fixtures_model import plain_loss  # noqa: E402


def make_batch(cfg: AVCapConfig, batch: int, caption_tokens: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1000, cfg.vocab_size, (batch, caption_tokens), generator=g)
    tokens[:, 0], tokens[:, -1] = cfg.cls_id, cfg.sep_id
    need = torch.ones_like(tokens)
    need[:, 0] = 0
    return (torch.randn(batch, cfg.audio_length, cfg.num_mel_bins, generator=g),
            torch.randn(batch, 3, cfg.img_size, cfg.img_size, generator=g), tokens, need)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per variant (after one warm-up step)")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--caption-tokens", type=int, default=42)
    ap.add_argument("--decoder", default="frozen,trainable")
    ap.add_argument("--rows", type=int, default=12, help="top operators listed per variant")
    ap.add_argument("--out", default="", help="also write the JSON here")
    args = ap.parse_args()
    torch.set_num_threads(1)

    cfg = AVCapConfig.full(cls_id=101, sep_id=102, pad_id=0)
    torch.manual_seed(0)
    base = AVCap(cfg)
    batch = make_batch(cfg, args.batch_size, args.caption_tokens)
    precision = resolve_precision("fp32", torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train_cfg = TrainConfig()
    load_start = os.getloadavg()
    results = []
    for decoder in args.decoder.split(","):
        models, steps = {}, {}
        for variant in ("plain", "train_step"):
            m = copy.deepcopy(base)
            m.freeze_decoder(decoder == "frozen")
            m.train()
            models[variant] = m
        params = [p for p in models["plain"].parameters() if p.requires_grad]
        plain_opt = torch.optim.AdamW(params, lr=train_cfg.lr, betas=(train_cfg.beta1, train_cfg.beta2),
                                      weight_decay=train_cfg.weight_decay, foreach=False)
        fast_opt = build_optimizer(models["train_step"], train_cfg)

        def plain_step() -> float:
            loss = plain_loss(models["plain"], *batch)
            loss.backward()
            plain_opt.step()
            plain_opt.zero_grad(set_to_none=True)
            return float(loss)

        steps = {"plain": plain_step,
                 "train_step": lambda: float(train_step(models["train_step"], batch, fast_opt, scaler, precision).loss)}
        stats = {v: {"cpu_s": [], "wall_s": [], "loss": [], "ops": defaultdict(float), "calls": defaultdict(int)}
                 for v in steps}
        for i in range(args.steps + 1):
            for variant, fn in steps.items():
                torch.manual_seed(1000 + i)  # the same dropout seed for both variants at each step
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                    c0, t0 = time.process_time(), time.perf_counter()
                    loss = fn()
                    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
                if i == 0:
                    continue  # warm-up
                s = stats[variant]
                s["cpu_s"].append(cpu)
                s["wall_s"].append(wall)
                s["loss"].append(loss)
                for e in prof.key_averages():
                    s["ops"][e.key] += e.self_cpu_time_total / 1e3
                    s["calls"][e.key] += e.count
        row = {"decoder": decoder}
        for variant, s in stats.items():
            total = sum(s["ops"].values())
            top = sorted(s["ops"].items(), key=lambda kv: kv[1], reverse=True)[:args.rows]
            row[variant] = {"cpu_s_per_step": sum(s["cpu_s"]) / args.steps,
                            "wall_s_per_step": sum(s["wall_s"]) / args.steps, "losses": s["loss"],
                            "top_ops": [{"op": k, "calls_per_step": s["calls"][k] / args.steps,
                                         "self_ms_per_step": v / args.steps, "share": v / total} for k, v in top]}
        row["cpu_ratio"] = row["plain"]["cpu_s_per_step"] / row["train_step"]["cpu_s_per_step"]
        results.append(row)
        print(f"[profile] decoder {decoder}: plain {row['plain']['cpu_s_per_step']:.2f} CPU s/step, train_step "
              f"{row['train_step']['cpu_s_per_step']:.2f} ({row['cpu_ratio']:.3f}x)", file=sys.stderr, flush=True)

    report = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "cpu_count": os.cpu_count(), "load_average_start": load_start, "load_average_end": os.getloadavg(),
              "torch": torch.__version__, "batch": args.batch_size, "caption_tokens": args.caption_tokens,
              "results": results}
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
