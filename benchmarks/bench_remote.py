"""Remote shards over HTTP vs the same shards read locally: samples/s per loader worker and bytes per sample.

    .venv/bin/python benchmarks/bench_remote.py --clips 256 --per-shard 128

The clips of benchmarks/bench_loader.py (10 s 16 kHz audio as flac, 20 x 224² JPEG q90, fp16 fbank, json),
written by shards.writer with their member index, served by nginx on loopback (tests.remote_store, the store of
the tests) with 0, 20 and 80 ms added to every request by a delaying proxy in front of it (tests.remote_store's byte pump,
in a process of its own, so that neither its CPU nor its HTTP handling is the loader's). One loader worker
(num_workers=0: the loader runs in this process, as one DataLoader worker would), train mode, one frame, one
epoch, torch 1 thread. Rows:
- local: the indexed reader (mmap of the shard files);
- HTTP, ranged: shards.remote (index, coalesced ranged reads of the used members, windows in flight);
- HTTP, whole-shard streaming: the same shards through a manifest without the index (one GET per shard, every
  byte read and the unused members discarded): the path `pipe:` URLs and unindexed shards take.
samples/s is wall time (latency is wall time); CPU ms/sample is this process's CPU (the fsspec I/O thread
included). Bytes per sample come from nginx's access log ($bytes_sent: headers and bodies, manifest and
indexes included), against the sample's own size in the tar. Ratios to local are measured in the same run.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_loader import make_clips  # noqa: E402
from shards.loader import LoaderConfig, make_loader  # noqa: E402
from tests.remote_store import Nginx, ProxyProcess  # noqa: E402


def epoch(data: str, batch_size: int, seed: int) -> tuple[int, float, float]:
    """(samples, wall s, CPU s) of one train epoch of one loader worker."""
    cfg = LoaderConfig(data=data, split="train", batch_size=batch_size, num_workers=0, num_frames=1,
                       shuffle_buffer=64, seed=seed)
    w0, c0 = time.perf_counter(), time.process_time()
    it, _ = make_loader(cfg, 0, 1, epoch=0)
    n = sum(len(b["keys"]) for b in it)
    return n, time.perf_counter() - w0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=256)
    ap.add_argument("--per-shard", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--latencies-ms", default="0,20,80")
    ap.add_argument("--repeats", type=int, default=2, help="best of N epochs per row")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-remote-") as tmp:
        root = Path(tmp) / "data"
        make_clips(root, args.clips, np.random.default_rng(0), per_shard=args.per_shard)
        tar_bytes = sum(p.stat().st_size for p in (root / "shards").glob("*.tar"))
        sample_bytes = tar_bytes / args.clips
        print(f"{args.clips} clips in {args.clips // args.per_shard} shards, {sample_bytes / 1e3:.0f} kB per sample "
              f"in the tar, batch {args.batch_size}, 1 frame, load average {os.getloadavg()[0]:.1f}")
        rows = []
        with Nginx(root, Path(tmp) / "nginx") as nginx:
            def run(name: str, base: str, manifest: str, latency: float | None):
                best = None
                for r in range(args.repeats):
                    before = len(nginx.log())
                    n, wall, cpu = epoch(f"{base}/{manifest}" if base else str(root / manifest), args.batch_size, r)
                    sent = sum(line.bytes_sent for line in nginx.log()[before:])
                    if best is None or wall < best[1]:
                        best = (n, wall, cpu, sent)
                n, wall, cpu, sent = best
                rows.append((name, latency, n / wall, cpu / n * 1e3, sent / n))
                print(f"  {name:<28} {'' if latency is None else f'{latency:.0f} ms':>6} {n / wall:8.0f}/s "
                      f"{cpu / n * 1e3:6.2f} ms CPU {sent / n / 1e3:7.0f} kB/sample", flush=True)

            run("local", None, "manifest.json", None)
            run("HTTP, ranged (nginx direct)", nginx.url, "manifest.json", 0.0)
            for ms in [float(x) for x in args.latencies_ms.split(",")]:
                with ProxyProcess(nginx.port, delay_s=ms / 1e3) as proxy:
                    run("HTTP, ranged", proxy.url, "manifest.json", ms)
                    run("HTTP, whole-shard streaming", proxy.url, "manifest-noindex.json", ms)
            run("local (again)", None, "manifest.json", None)
        local = max(r[2] for r in rows if r[1] is None)
        print(f"\n| reader | added latency | samples/s (1 worker) | vs local | CPU ms/sample | bytes/sample | "
              f"of the sample's {sample_bytes / 1e3:.0f} kB |")
        print("|---|---|---|---|---|---|---|")
        for name, lat, sps, cpu, bps in rows:
            print(f"| {name} | {'-' if lat is None else f'{lat:.0f} ms'} | {sps:,.0f} | {sps / local:.0%} | "
                  f"{cpu:.2f} | {bps / 1e3:,.0f} kB | {bps / sample_bytes:.0%} |")


if __name__ == "__main__":
    main()
