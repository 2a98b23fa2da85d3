"""Remote shards over HTTP vs the same shards read locally: samples/s per loader worker and bytes per sample.

    .venv/bin/python benchmarks/bench_remote.py --clips 1024 --per-shard 128

The clips of benchmarks/bench_loader.py (10 s 16 kHz audio as flac, 20 x 224² JPEG q90, fp16 fbank, json),
written by shards.writer with their member index, served by nginx on loopback (tests.remote_store, the store of
the tests) with 0, 20 and 80 ms added to every request by nginx itself (its echo module's timer: no byte passes
through a process of ours on the server side). One loader worker, train mode, one frame, one epoch, torch 1
thread, two ways:
- in process (num_workers=0: the loader runs in this process, as one DataLoader worker would); CPU ms/sample is
  this process's CPU, the HTTP client's threads included;
- in one DataLoader worker process (num_workers=1, the trainer's setting per worker); its CPU is the worker's
  (counted when it has exited), the batches arrive through shared memory as in training.
Rows: local (the indexed reader, mmap of the shard files); HTTP, ranged (shards.remote: index, coalesced ranged
reads of the used members, requests in flight); HTTP, whole-shard streaming (the same shards through a manifest
without the index: one GET per shard, every byte read and the unused members discarded, the path of `pipe:` URLs
and unindexed shards).
samples/s is wall time over the whole epoch (latency is wall time); "first batch" is the wait for the first batch
(a worker's start, the manifest, the first index and window), "after it" the rate from the first batch to the
last. Bytes per sample come from nginx's access log ($bytes_sent: headers and bodies, manifest and indexes
included), against the sample's own size in the tar. Ratios are to the local row of the same mode, same run.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_loader import make_clips  # noqa: E402
from shards.loader import LoaderConfig, make_loader  # noqa: E402
from tests.remote_store import Nginx  # noqa: E402


def _cpu_s() -> float:
    """This process's CPU and that of its exited children (the DataLoader worker, once the epoch has ended)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def epoch(data: str, batch_size: int, workers: int, seed: int) -> tuple[int, float, float, float]:
    """(samples, wall s, wall s to the first batch, CPU s) of one train epoch of one loader worker."""
    cfg = LoaderConfig(data=data, split="train", batch_size=batch_size, num_workers=workers, num_frames=1,
                       shuffle_buffer=64, seed=seed)
    w0, c0 = time.perf_counter(), _cpu_s()
    it, _ = make_loader(cfg, 0, 1, epoch=0)
    n, first = 0, None
    for b in it:
        n += len(b["keys"])
        if first is None:
            first = time.perf_counter() - w0
    del it
    return n, time.perf_counter() - w0, first, _cpu_s() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=1024)
    ap.add_argument("--per-shard", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--latencies-ms", default="0,20,80")
    ap.add_argument("--repeats", type=int, default=2, help="best of N epochs per row")
    ap.add_argument("--data-dir", type=Path, help="build the clips here once and reuse them (default: a temp dir)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-remote-") as tmp:
        root = args.data_dir or Path(tmp) / "data"
        if not (root / "manifest.json").exists():
            make_clips(root, args.clips, np.random.default_rng(0), per_shard=args.per_shard)
        tars = sorted((root / "shards").glob("*.tar"))
        clips = sum(1 for _ in (root / "wav").glob("*.wav"))
        sample_bytes = sum(p.stat().st_size for p in tars) / clips
        print(f"{clips} clips in {len(tars)} shards, {sample_bytes / 1e3:.0f} kB per sample in the tar, batch "
              f"{args.batch_size}, 1 frame, load average {os.getloadavg()[0]:.1f} at the start", flush=True)
        rows = []

        def run(mode: str, name: str, server: Nginx | None, manifest: str, workers: int):
            best = None
            for r in range(args.repeats):
                before = len(server.log()) if server else 0
                data = f"{server.url}/{manifest}" if server else str(root / manifest)
                n, wall, first, cpu = epoch(data, args.batch_size, workers, r)
                sent = sum(line.bytes_sent for line in server.log()[before:]) if server else 0
                if best is None or wall < best[1]:
                    best = (n, wall, first, cpu, sent)
            n, wall, first, cpu, sent = best
            lat = None if server is None else server.delay_s * 1e3
            steady = (n - args.batch_size) / (wall - first)
            rows.append((mode, name, lat, n / wall, first, steady, cpu / n * 1e3, sent / n))
            print(f"  {mode:<10} {name:<28} {'' if lat is None else f'{lat:.0f} ms':>6} {n / wall:7.0f}/s "
                  f"first batch {first * 1e3:5.0f} ms, after it {steady:5.0f}/s {cpu / n * 1e3:6.2f} ms CPU "
                  f"{sent / n / 1e3:5.0f} kB/sample", flush=True)

        lats = [float(x) for x in args.latencies_ms.split(",")]
        servers = {ms: Nginx(root, Path(tmp) / f"nginx-{ms:g}ms", delay_s=ms / 1e3).start() for ms in lats}
        try:
            for mode, workers in (("in process", 0), ("1 worker", 1)):
                run(mode, "local", None, "manifest.json", workers)
                for ms in lats:
                    run(mode, "HTTP, ranged", servers[ms], "manifest.json", workers)
                if workers == 0:
                    for ms in lats:
                        run(mode, "HTTP, whole-shard streaming", servers[ms], "manifest-noindex.json", workers)
                run(mode, "local (again)", None, "manifest.json", workers)
        finally:
            for s in servers.values():
                s.stop()
        print(f"\nload average {os.getloadavg()[0]:.1f} at the end\n")
        print(f"| loader | reader | added latency | samples/s (epoch) | vs local | first batch | samples/s after "
              f"it | CPU ms/sample | bytes/sample | of the sample's {sample_bytes / 1e3:.0f} kB |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for mode, name, lat, sps, first, steady, cpu, bps in rows:
            local = max(r[3] for r in rows if r[0] == mode and r[2] is None)
            print(f"| {mode} | {name} | {'-' if lat is None else f'{lat:.0f} ms'} | {sps:,.0f} | {sps / local:.0%} "
                  f"| {first * 1e3:,.0f} ms | {steady:,.0f} | {cpu:.2f} | {bps / 1e3:,.0f} kB | "
                  f"{bps / sample_bytes:.0%} |")


if __name__ == "__main__":
    main()
