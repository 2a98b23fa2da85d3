"""Remote shards over HTTP vs the same shards read locally: samples/s per loader worker and bytes per sample.

    .venv/bin/python benchmarks/bench_remote.py --clips 1024 --per-shard 128

The clips of benchmarks/bench_loader.py (10 s 16 kHz audio as flac, 20 x 224² JPEG q90, fp16 fbank, json),
written by shards.writer with their member index, served by nginx on loopback (tests.remote_store, the store of
the tests) with 0, 20 and 80 ms added to every request by nginx itself (its echo module's timer: no byte passes
through a process of ours on the server side). One loader worker, train mode, one frame, one epoch, torch 1
thread, two ways:
- in process (num_workers=0: the loader runs in this process, as one DataLoader worker would); CPU ms/sample is
  this process's CPU, the HTTP client's threads included;
- in one DataLoader worker process (num_workers=1, as the trainer runs its workers); CPU ms/sample is the worker's
  (psutil, as its last batch arrives), the batches reach this process through shared memory as in training.
Rows: local (the indexed reader, mmap of the shard files); HTTP, ranged (shards.remote: index, coalesced ranged
reads of the used members, requests in flight) through libcurl (the default) and through fsspec's aiohttp (the
client before it, `RemoteConfig(http_client="fsspec")`); HTTP, whole-shard streaming (the same shards through a
manifest without the index: one GET per shard, every byte read and the unused members discarded, the path of
`pipe:` URLs and unindexed shards). The rows take turns, `--repeats` rounds, best epoch of each kept.
samples/s is wall time over the whole epoch (latency is wall time); "first batch" is the wait for the first batch
(a worker's start, the first index and windows; the manifest is read once per row before its epochs, as a
training run reads it once for all its epochs), "after it" the rate from the first batch to the last. Bytes per
sample come from nginx's access log ($bytes_sent: headers and bodies, indexes included), against the sample's
own size in the tar. Ratios are to the local row of the same mode, same run; the
rate after the first batch of every round is listed too, since on a shared 2-core machine whole epochs of a row can
land in a slower mode.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Only what the loader's forkserver has loaded at the top: a loader worker runs this script as it starts (as it
# runs train.py, which the server loads with its imports), so what only main() needs is imported there.
from shards.loader import LoaderConfig, make_loader  # noqa: E402
from shards.remote import RemoteConfig  # noqa: E402
from shards.split_info import SplitInfo, load_split  # noqa: E402


def epoch(data: str, batch_size: int, workers: int, seed: int, client: str,
          info: SplitInfo | None = None) -> tuple[int, float, float, float]:
    """(samples, wall s, wall s to the first batch, CPU s of the loader worker) of one train epoch; `info`, the
    split read once, as training reads it once per run (else the manifest is read in the epoch's time)."""
    cfg = LoaderConfig(data=data, split="train", batch_size=batch_size, num_workers=workers, num_frames=1,
                       shuffle_buffer=64, seed=seed, remote=RemoteConfig(http_client=client))
    w0, c0 = time.perf_counter(), time.process_time()
    loader, batches = make_loader(cfg, 0, 1, epoch=0, info=info)
    it = iter(loader)
    n, first, cpu = 0, None, 0.0
    for i, b in enumerate(it):
        n += len(b["keys"])
        if first is None:
            first = time.perf_counter() - w0
        if workers and i == batches - 1:   # the worker's CPU, read once as its last batch arrives (it exits with
            # the epoch), not after every batch
            cpu = sum(sum(psutil.Process(w.pid).cpu_times()[:2]) for w in it._workers)
    if not workers:
        cpu = time.process_time() - c0
    del it, loader
    return n, time.perf_counter() - w0, first, cpu


ROWS = [   # (loader, reader, manifest, latency or None for local files, HTTP client)
    *[("in process", name, "manifest.json", ms, client) for name, client, lats in (
        ("local", None, [None]), ("HTTP, ranged (libcurl)", "curl", "L"), ("HTTP, ranged (fsspec/aiohttp)", "fsspec",
                                                                              "L")) for ms in lats],
    *[("in process", "HTTP, whole-shard streaming", "manifest-noindex.json", ms, "fsspec") for ms in "L"],
    ("in process", "local (again)", "manifest.json", None, None),
    ("1 worker", "local", "manifest.json", None, None),
    *[("1 worker", "HTTP, ranged (libcurl)", "manifest.json", ms, "curl") for ms in "L"],
    ("1 worker", "HTTP, ranged (fsspec/aiohttp)", "manifest.json", 20.0, "fsspec"),
    ("1 worker", "local (again)", "manifest.json", None, None),
]


def main() -> None:
    from benchmarks.bench_dask import machine
    from benchmarks.bench_loader import make_clips
    from tests.remote_store import Nginx
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=1024)
    ap.add_argument("--per-shard", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--latencies-ms", default="0,20,80")
    ap.add_argument("--repeats", type=int, default=3, help="best of N epochs per row (the rows take turns)")
    ap.add_argument("--data-dir", type=Path, help="build the clips here once and reuse them (default: a temp dir)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    lats = [float(x) for x in args.latencies_ms.split(",")]
    rows = [r for row in ROWS for r in ([row[:3] + (ms,) + row[4:] for ms in lats] if row[3] == "L" else [row])
            if r[3] is None or r[3] in lats]
    with tempfile.TemporaryDirectory(prefix="bench-remote-") as tmp:
        root = args.data_dir or Path(tmp) / "data"
        if not (root / "manifest.json").exists():
            make_clips(root, args.clips, np.random.default_rng(0), per_shard=args.per_shard)
        tars = sorted((root / "shards").glob("*.tar"))
        clips = sum(1 for _ in (root / "wav").glob("*.wav"))
        sample_bytes = sum(p.stat().st_size for p in tars) / clips
        print(f"{clips} clips in {len(tars)} shards, {sample_bytes / 1e3:.0f} kB per sample in the tar, batch "
              f"{args.batch_size}, 1 frame; {machine()} at the start", flush=True)
        servers = {ms: Nginx(root, Path(tmp) / f"nginx-{ms:g}ms", delay_s=ms / 1e3).start() for ms in lats}
        best: dict[int, tuple] = {}
        steady_all: dict[int, list[float]] = {}   # the rate after the first batch, every round
        try:
            # each row's split read once, before its epochs, as a training run reads it once for all its epochs
            splits = {k: load_split(f"{servers[row[3]].url}/{row[2]}" if row[3] is not None else str(root / row[2]),
                                    "train") for k, row in enumerate(rows)}
            for r in range(args.repeats):
                for k, (mode, name, manifest, ms, client) in enumerate(rows):
                    server = servers[ms] if ms is not None else None
                    before = len(server.log()) if server else 0
                    data = f"{server.url}/{manifest}" if server else str(root / manifest)
                    n, wall, first, cpu = epoch(data, args.batch_size, 1 if mode == "1 worker" else 0, r,
                                                client or "curl", splits[k])
                    sent = sum(line.bytes_sent for line in server.log()[before:]) if server else 0
                    if k not in best or wall < best[k][1]:
                        best[k] = (n, wall, first, cpu, sent)
                    steady_all.setdefault(k, []).append((n - args.batch_size) / (wall - first))
                    print(f"  {r} {mode:<10} {name:<30} {'' if ms is None else f'{ms:.0f} ms':>6} {n / wall:6.0f}/s "
                          f"first batch {first * 1e3:5.0f} ms, {cpu / n * 1e3:5.2f} ms CPU {sent / n / 1e3:4.0f} "
                          f"kB/sample", flush=True)
        finally:
            for s in servers.values():
                s.stop()
        print(f"\nload average {os.getloadavg()[0]:.1f} at the end\n")
        print(f"| loader | reader | added latency | samples/s (epoch) | vs local | first batch | samples/s after it | "
              f"vs local | after it, each round vs local | CPU ms/sample | bytes/sample | "
              f"of the sample's {sample_bytes / 1e3:.0f} kB |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")

        def rates(k: int) -> tuple[float, float]:
            n, wall, first, _, _ = best[k]
            return n / wall, (n - args.batch_size) / (wall - first)

        # against the faster of the mode's local rows (the first and the last of its turn)
        local = {mode: [max(rates(k)[j] for k, row in enumerate(rows) if row[0] == mode and row[3] is None)
                        for j in (0, 1)] for mode in {row[0] for row in rows}}
        for k, (mode, name, _, ms, _) in enumerate(rows):
            n, wall, first, cpu, sent = best[k]
            epoch_rate, steady = rates(k)
            rounds = " ".join(f"{v / local[mode][1]:.0%}" for v in steady_all[k])
            print(f"| {mode} | {name} | {'-' if ms is None else f'{ms:.0f} ms'} | {epoch_rate:,.0f} | "
                  f"{epoch_rate / local[mode][0]:.0%} | {first * 1e3:,.0f} ms | {steady:,.0f} | "
                  f"{steady / local[mode][1]:.0%} | {rounds} | {cpu / n * 1e3:.2f} | {sent / n / 1e3:,.0f} kB | "
                  f"{sent / n / sample_bytes:.0%} |")


if __name__ == "__main__":
    main()
