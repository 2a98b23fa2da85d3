"""One training step of the demo's captioner on one CPU thread: the tiny preset with 16x16 vs 32x32 patches.

    .venv/bin/python benchmarks/bench_demo_step.py [--steps 6] [--batch 8]

Prints wall and CPU seconds per forward+backward+AdamW step on random inputs of the shard shapes
(fbank [B,1024,128], one frame [B,3,224,224], 12 caption tokens)."""
from __future__ import annotations

import argparse
import json
import time

import torch

from avcap.model import AVCap, AVCapConfig
from demo.run import DEMO_MODEL


def step_seconds(overrides: dict, steps: int, batch: int) -> tuple[float, float]:
    torch.manual_seed(0)
    model = AVCap(AVCapConfig.tiny(vocab_size=200, **overrides))
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    audio, visual = torch.randn(batch, 1024, 128), torch.randn(batch, 3, 224, 224)
    tokens = torch.randint(1, 200, (batch, 12))
    need = torch.ones(batch, 12, dtype=torch.long)
    for i in range(steps + 2):
        if i == 2:  # two warm-up steps: allocator and kernel selection
            wall, cpu = time.perf_counter(), time.process_time()
        model(audio, visual, tokens, need)["loss"].backward()
        opt.step()
        opt.zero_grad()
    return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    for name, ov in (("patch 16", {**DEMO_MODEL, "patch_size": 16}), ("patch 32 (demo)", DEMO_MODEL)):
        wall, cpu = step_seconds(ov, args.steps, args.batch)
        cfg = AVCapConfig.tiny(vocab_size=200, **ov)
        print(f"{name:16s} prefix {cfg.num_audio_tokens}+{cfg.num_visual_tokens} tokens: "
              f"{wall:.3f} s/step wall, {cpu:.3f} s/step CPU  ({json.dumps(ov)})")


if __name__ == "__main__":
    main()
