"""Gallery build time: a 975-clip test split (the AudioCaps test CSV's clips and captions), --sample 200, one core.

    .venv/bin/python benchmarks/bench_gallery.py [--clips 975] [--sample 200] [--repeats 2]

Synthetic shards written by shards.writer.write_shard (with their member index, manifest format 2): per clip 10 s
of 16 kHz audio (a tone plus noise, FLAC), a float16 [1024, 128] fbank, 20 JPEG frames 224x224 (q90), the json
with the clip's AudioCaps captions; a ledger with every clip ok and 25 extra failed clips; a COCO results file
and its metrics (avcap.evaluate.score_and_write, Java-free) with one caption per clip.

Timed: the whole command `python flows.py gallery --out DIR --split test --sample 200 [--results R]` in a child
pinned to one core (`taskset -c 0` where available), interpreter start and imports included: its wall time and
its CPU time (user + system, from the child's rusage). Target: under 30 s.
"""
from __future__ import annotations

import argparse
import io
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

FRAMES = 20
FRAME_SETS = 12       # distinct frame strips, reused round-robin (encoding 19,500 JPEGs would dominate set-up)


def make_split(root: Path, clips: int, rng: np.random.Generator) -> dict[str, list[str]]:
    """Shards + manifest.json + ledger.sqlite under root; returns {key: captions}."""
    from pipeline.clip_list import Clip, read_clip_list
    from pipeline.ledger import Ledger
    from pipeline.status import FAILED_PERMANENT, OK
    from shards.sample_format import encode_sample
    from shards.writer import Sample, num_shards_for, shard_index, write_shard
    from tests.real_manifest import write_real_manifest

    rows = read_clip_list(REPO / "data" / "audiocaps" / "test.csv", "test").clips[:clips]
    strips = []
    for s in range(FRAME_SETS):
        base = Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).resize((224, 224), Image.BICUBIC)
        strip = []
        for f in range(FRAMES):
            buf = io.BytesIO()
            base.rotate(f * 4 + s).filter(ImageFilter.GaussianBlur(1)).save(buf, format="JPEG", quality=90)
            strip.append(buf.getvalue())
        strips.append(strip)
    t = np.arange(160000) / 16000
    num_shards = num_shards_for(len(rows))
    by_shard: dict[int, list] = {}
    refs = {}
    for c, clip in enumerate(rows):
        wave = 0.3 * np.sin(2 * np.pi * (150 + 7 * c) * t) + 0.03 * rng.standard_normal(t.size)
        fbank = (rng.normal(-6, 2, (1024, 128)) + np.linspace(3, -3, 128)).astype(np.float16)
        meta = {"key": clip.key, "youtube_id": clip.youtube_id, "start_time": clip.start_time, "split": "test",
                "captions": clip.captions, "audiocap_ids": clip.audiocap_ids, "duration": 10.0,
                "fbank_frames": 998, "sample_rate": 16000}
        members = encode_sample(fbank=fbank, waveform=(wave * 32767).astype(np.int16), sample_rate=16000,
                                frames=strips[c % FRAME_SETS], meta=meta)
        by_shard.setdefault(shard_index(clip.key, num_shards), []).append(Sample(clip.key, members))
        refs[clip.key] = clip.captions
    shards = []
    for i in sorted(by_shard):
        rel = f"shards/test/test-{i:05d}.tar"
        write_shard(root / rel, sorted(by_shard[i], key=lambda s: s.key))
        shards.append((rel, len(by_shard[i])))
    write_real_manifest(root, {"test": shards}, frames=FRAMES, indexed=True)   # the pipeline's manifest form
    failed = [Clip(f"benchFail{n:02d}", 0) for n in range(25)]
    with Ledger(root / "ledger.sqlite", "test") as ledger:
        ledger.upsert_pending(rows + failed)
        for clip in rows:
            ledger.record(clip.key, OK, stage="stage", attempts=1)
        for n, clip in enumerate(failed):
            ledger.record(clip.key, FAILED_PERMANENT, reason=("unavailable", "private", "http-404")[n % 3],
                          message="ERROR: [youtube] Video unavailable", stage="download")
    return refs


def make_results(root: Path, refs: dict[str, list[str]], rng: np.random.Generator) -> Path:
    """One caption per clip: its own first reference for a third, another clip's for the rest."""
    from avcap.evaluate import score_and_write
    keys = sorted(refs)
    preds = {k: refs[k][0] if i % 3 == 0 else refs[keys[int(rng.integers(len(keys)))]][1]
             for i, k in enumerate(keys)}
    path = root / "eval-test.json"
    score_and_write(preds, refs, path, java="no")
    return path


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall s, CPU s) of a child command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", type=int, default=975)
    ap.add_argument("--sample", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    pin = ["taskset", "-c", "0"] if shutil.which("taskset") else []
    with tempfile.TemporaryDirectory(prefix="bench-gallery-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        refs = make_split(root, args.clips, rng)
        results = make_results(root, refs, rng)
        size = sum(p.stat().st_size for p in (root / "shards").rglob("*.tar"))
        print(f"set-up: {len(refs)} clips, {size / 2**20:.0f} MiB of shards, {time.perf_counter() - t0:.0f} s")
        base = [*pin, sys.executable, "flows.py", "gallery", "--out", str(root), "--split", "test",
                "--sample", str(args.sample)]
        print(f"one core: {'taskset -c 0' if pin else 'not pinned (no taskset)'}; best of {args.repeats}")
        print("| page | wall s | CPU s | page + files MiB |\n|---|---:|---:|---:|")
        for name, cmd in (("clips only", base), ("with --results", base + ["--results", str(results)])):
            runs = [timed(cmd) for _ in range(args.repeats)]
            wall, cpu = min(r[0] for r in runs), min(r[1] for r in runs)
            files = root / "reports"
            mib = sum(p.stat().st_size for p in files.rglob("*") if p.is_file()) / 2**20
            print(f"| {name} ({args.sample} cards of {len(refs)}) | {wall:.2f} | {cpu:.2f} | {mib:.1f} |")


if __name__ == "__main__":
    main()
