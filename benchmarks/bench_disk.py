"""Benchmark: disk the output directory takes per clip against the shard bytes (one copy of each sample).

Generates N clips shaped like a 360p YouTube download (bench_pipeline.make_clip: 10 s 640x360 h264 + AAC),
builds them with pipeline.build.run_build from a --media-dir (default 20 frames, so a real-sized sample), then
changes the clip list (captions of two clips edited, one clip removed, one added) and builds again. After each
build: `du` of DIR without media/ and .cache (allocated blocks, what a user pays) against the shard bytes the
manifest lists, and what is left in staging/. The incremental result is also compared byte for byte with a
fresh build of the final clip list.

    python benchmarks/bench_disk.py --clips 20
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_gpu import cpu_model  # noqa: E402
from benchmarks.bench_pipeline import make_clip  # noqa: E402
from pipeline.build import BuildConfig, run_build  # noqa: E402

TARGET = 1.05   # disk per clip <= 1.05x its shard bytes


def du_bytes(out: Path) -> int:
    """`du` of the output directory without the media cache: allocated bytes, as a user sees them."""
    proc = subprocess.run(["du", "-s", "--block-size=1", "--exclude=media", "--exclude=.cache", str(out)],
                          check=True, capture_output=True, text=True)
    return int(proc.stdout.split()[0])


def write_csv(path: Path, clips: list[tuple[str, str]]) -> Path:
    rows = ["audiocap_id,youtube_id,start_time,caption"]
    rows += [f"{800000 + i},{yid},0,{caption}" for i, (yid, caption) in enumerate(clips)]
    path.write_text("\n".join(rows) + "\n")
    return path


def measure(label: str, out: Path, result) -> dict:
    shard_bytes = sum(s["bytes"] for s in result.shards)
    staging = out / "staging" / result.split
    staged = sum(p.stat().st_size for p in staging.iterdir()) if staging.is_dir() else 0
    disk = du_bytes(out)
    n = result.counts["ok"]
    return {"label": label, "clips": n, "shard_mb": shard_bytes / 1e6, "disk_mb": disk / 1e6,
            "per_clip_kb": disk / n / 1e3, "shard_per_clip_kb": shard_bytes / n / 1e3, "ratio": disk / shard_bytes,
            "staged_kb": staged / 1e3, "seconds": result.seconds}


def shard_files(out: Path, split: str) -> dict[str, bytes]:
    d = out / "shards" / split
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if not p.name.startswith(".")}


def run(n: int, work: Path, per_shard: int) -> tuple[list[dict], bool]:
    media = work / "media-in"
    media.mkdir()
    ids = [f"diskBench{i:02d}" for i in range(n + 1)]
    for i, yid in enumerate(ids):
        make_clip(media / f"{yid}_0.mp4", i)
    v1 = [(yid, f"clip {i} a steady tone") for i, yid in enumerate(ids[:n])]
    v2 = [(yid, c + " then a bird" if i in (1, 2) else c) for i, (yid, c) in enumerate(v1) if i != 3]
    v2.append((ids[n], f"clip {n} a steady tone"))

    def build(csv: Path, out: Path):
        return run_build(BuildConfig(csv=[csv], split="bench", out=out, media_dir=media, samples_per_shard=per_shard,
                                     max_failure_rate=0.0))

    out = work / "out"
    rows = [measure("first build", out, build(write_csv(work / "v1.csv", v1), out))]
    rows.append(measure("incremental (2 captions, 1 removed, 1 added)", out, build(write_csv(work / "v2.csv", v2), out)))
    fresh = work / "fresh"
    rows.append(measure("fresh build of the final list", fresh, build(work / "v2.csv", fresh)))
    return rows, shard_files(out, "bench") == shard_files(fresh, "bench")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=20)
    ap.add_argument("--samples-per-shard", type=int, default=8)
    args = ap.parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    load_before = os.getloadavg()
    t0 = time.time()
    work = Path(tempfile.mkdtemp(prefix="avcap-bench-disk-"))
    try:
        rows, identical = run(args.clips, work, args.samples_per_shard)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"Command: `{command}`")
    print(f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(t0))}; machine: "
          f"{cpu_model()}, {os.cpu_count()} cores, load average "
          f"{load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after")
    print()
    print("| build | clips | shard MB | du MB (no media) | du kB / clip | shard kB / clip | du / shards | "
          "left in staging |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']} | {r['clips']} | {r['shard_mb']:.2f} | {r['disk_mb']:.2f} | {r['per_clip_kb']:.0f} | "
              f"{r['shard_per_clip_kb']:.0f} | {r['ratio']:.3f}x | {r['staged_kb']:.0f} kB |")
    worst = max(r["ratio"] for r in rows)
    print()
    print(f"Incremental shards == fresh shards byte for byte: {identical}. Target (du / shards <= {TARGET}x): "
          f"{'met' if worst <= TARGET and identical else 'NOT met'} (worst {worst:.3f}x).")


if __name__ == "__main__":
    main()
