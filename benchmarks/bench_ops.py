"""Cost of the dataset operations: audit (per check) and publish (first copy, idempotent re-run).

Builds a small real dataset with pipeline.build.run_build (media generated with ffmpeg, cached as DIR/media),
then times:
- shard verification (sha256 + sample count) in MB/s,
- the fbank recompute from the stored flac and the re-extraction from media, per clip,
- a full `run_audit(sample=-1)`,
- `publish` to a file:// URL, first time (copy) and second time (all skipped after hashing the destination).

Wall-clock seconds (ffmpeg runs in subprocesses, so process CPU time would miss it); best of --repeats.

    .venv/bin/python benchmarks/bench_ops.py --clips 8 --repeats 3
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.audit_checks import SplitPlan, check_fbank, check_reextract, check_shards, read_samples, run_audit  # noqa: E402
from pipeline.audit_report import AuditConfig, AuditReport  # noqa: E402
from pipeline.extract import ExtractConfig  # noqa: E402
from pipeline.features import FbankConfig  # noqa: E402
from pipeline.publish import publish  # noqa: E402
from shards.manifest import load_dataset_manifest  # noqa: E402
from tests.fixtures_ops import make_build  # noqa: E402


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-ops-"))
    try:
        clips = [(f"benchOps{i:03d}", 0, 200.0 + 100 * i) for i in range(args.clips)]
        t0 = time.perf_counter()
        build = make_build(tmp / "out", clips=clips)
        t_build = time.perf_counter() - t0
        out = build.out_dir
        split = load_dataset_manifest(out).splits["test"]
        total_bytes = sum(s.bytes for s in split.shards)

        t_shards = best(lambda: check_shards(out, split, AuditReport(str(out), "")), args.repeats)

        plan = SplitPlan("test", ExtractConfig(), FbankConfig(), bitwise=True)
        samples = {}
        for path, headers in check_shards(out, split, AuditReport(str(out), "")).items():
            samples.update(read_samples(out / path, headers, set(build.keys)))
        t_fbank = best(lambda: [check_fbank(k, samples[k], plan, 0.0, AuditReport("", "")) for k in build.keys],
                       args.repeats) / len(build.keys)
        t_extract = best(lambda: [check_reextract(out, k, samples[k], plan, AuditReport("", ""))
                                  for k in build.keys], args.repeats) / len(build.keys)
        reports = []
        t_audit = best(lambda: reports.append(run_audit(AuditConfig(out, sample=-1))), args.repeats)
        assert all(r.ok for r in reports), [str(m) for m in reports[-1].mismatches]

        def first_publish():
            dest = tmp / "dest"
            if dest.exists():
                shutil.rmtree(dest)
            publish(out, f"file://{dest}")
        t_pub = best(first_publish, args.repeats)
        t_repub = best(lambda: publish(out, f"file://{tmp / 'dest'}"), args.repeats)

        mb = total_bytes / 1e6
        print(f"## dataset: {len(build.keys)} clips, {len(split.shards)} shards, {mb:.1f} MB (built in {t_build:.1f} s)")
        print("| operation | time | rate |")
        print("|---|---|---|")
        print(f"| shard sha256 + sample count | {t_shards * 1e3:.0f} ms | {mb / t_shards:.0f} MB/s |")
        print(f"| fbank recompute from flac + compare, per clip | {t_fbank * 1e3:.1f} ms | {1 / t_fbank:.0f} clips/s |")
        print(f"| re-extract from media + hash compare, per clip | {t_extract * 1e3:.0f} ms | {1 / t_extract:.1f} clips/s |")
        print(f"| run_audit(sample=-1), all checks | {t_audit:.2f} s | {len(build.keys) / t_audit:.1f} clips/s |")
        print(f"| publish to file://, first copy | {t_pub * 1e3:.0f} ms | {mb / t_pub:.0f} MB/s |")
        print(f"| publish again (all skipped after hashing) | {t_repub * 1e3:.0f} ms | {mb / t_repub:.0f} MB/s |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
