"""Demo dataset generation throughput (demo.media) and the loopback server's full-file GET rate.

    .venv/bin/python benchmarks/bench_demo_media.py --clips 100 --workers 2
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demo.media import DemoMediaConfig, generate_dataset  # noqa: E402
from demo.server import MediaServer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", type=int, default=100)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ds = generate_dataset(tmp, DemoMediaConfig(clips=args.clips, workers=args.workers), progress=False)
        size = sum(p.stat().st_size for p in ds.media_dir.glob("*.mp4"))
        print(f"generate: {args.clips} clips in {ds.seconds:.1f} s = {args.clips / ds.seconds:.2f} clips/s "
              f"({args.workers} ffmpeg workers, {size / 2**20:.1f} MiB, speech={ds.speech})")
        with MediaServer(ds.media_dir) as srv:
            t0 = time.perf_counter()
            got = sum(len(urllib.request.urlopen(srv.url(c.youtube_id)).read()) for c in ds.clips)
            dt = time.perf_counter() - t0
        print(f"serve: {len(ds.clips)} full GETs, {got / 2**20:.1f} MiB in {dt:.2f} s = {got / 2**20 / dt:.0f} MiB/s")


if __name__ == "__main__":
    main()
