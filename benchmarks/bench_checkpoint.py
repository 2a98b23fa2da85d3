"""Full-size checkpoint I/O: what a training run pays per checkpoint and a user pays to start captioning.

Times save_checkpoint (atomic: temp file + fsync + rename), load_checkpoint (model rebuilt from the file alone) and
load_pretrained of the original captioner layout, for the full-size model (232 M parameters, ~0.93 GB fp32) with
random weights, plus peak resident memory.

    .venv/bin/python benchmarks/bench_checkpoint.py --num-frames 4 --dir /tmp/avcap-bench-ckpt
"""
from __future__ import annotations

import argparse
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from avcap.checkpoint import load_checkpoint, load_pretrained, save_checkpoint
from avcap.model import AVCap, AVCapConfig


@dataclass
class Args:
    num_frames: int
    dir: Path
    threads: int


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def timed(label: str, fn):
    # CPU time beside wall time: on a shared box the wall time mostly measures the neighbours.
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    print(f"| {label} | {time.perf_counter() - t:.2f} s | {time.process_time() - c:.2f} s | "
          f"{peak_rss_gib():.2f} GiB |")
    return out


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    args.dir.mkdir(parents=True, exist_ok=True)
    # A BERT-layout vocab of the full size, so that the config's special ids and vocab_size are consistent.
    vocab = (["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
             + [f"w{i}" for i in range(30522 - 104)])
    config = AVCapConfig.full(cls_id=101, sep_id=102, pad_id=0, num_frames=args.num_frames)
    torch.manual_seed(0)
    print("| step | wall | CPU (user+sys) | peak RSS so far |\n|---|---|---|---|")
    model = timed("build AVCap(full) with random init", lambda: AVCap(config))
    n_params = sum(p.numel() for p in model.parameters())
    ours = args.dir / "ours.pt"
    original = args.dir / "avcap_state_dict.pt"
    timed("save_checkpoint (ours, atomic + fsync)", lambda: save_checkpoint(
        ours, model, config, vocab, norm_stats={"mean": -4.346, "std": 4.332}, frames_per_clip=20))
    torch.save(model.state_dict(), original)
    loaded = timed("load_checkpoint (rebuild model from file)", lambda: load_checkpoint(ours))
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in model.state_dict().items())
    del loaded
    report = timed("load_pretrained (original captioner layout)", lambda: load_pretrained(model, original))
    print(f"parameters {n_params / 1e6:.1f} M, ours {ours.stat().st_size / 2**30:.2f} GiB, "
          f"original layout {original.stat().st_size / 2**30:.2f} GiB, loaded keys {len(report.loaded)}, "
          f"threads {args.threads}")
    shutil.rmtree(args.dir)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-frames", type=int, default=4)
    p.add_argument("--dir", type=Path, default=Path("/tmp/avcap-bench-ckpt"))
    p.add_argument("--threads", type=int, default=2)
    main(Args(**vars(p.parse_args())))
