"""A/B: the loader, pipeline, remote-shard and generation benchmarks of this tree against another commit, in one run.

    python benchmarks/ab_compare.py --base REV [--rounds 2]

The base commit is checked out in a temporary git worktree (it shares this checkout's .venv), and each
benchmark runs alternately from the two trees (base, this, this, base, ...) so that a change in the machine's
load hits both alike. Each tree runs its own benchmark script against its own code, so an interface change
between the commits does not matter as long as both print the same table. Figures are CPU time where the
benchmark reports it; the table gives the median of the rounds per tree and this tree's figure over the base's.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name -> (command after the interpreter, [(figure, regex on the output)]); every figure: lower is better
BENCHMARKS = {
    "pipeline": (["benchmarks/bench_pipeline.py", "--clips", "8"],
                 [("ours: CPU s / clip", r"\| ours: [^|]*\| ([0-9.]+) \|")]),
    "loader": (["benchmarks/bench_loader.py", "--clips", "32", "--repeats", "3"],
               [("1 frame, indexed: ms / sample", r"\| 1 \| [^|]*\| [0-9,]+/s \(([0-9.]+) ms\)"),
                ("4 frames, indexed: ms / sample", r"\| 4 \| [^|]*\| [0-9,]+/s \(([0-9.]+) ms\)")]),
    "remote": (["benchmarks/bench_remote.py", "--clips", "512", "--per-shard", "256", "--latencies-ms", "20",
                "--repeats", "2"],
               [("1 worker, local: CPU ms / sample", r"\| 1 worker \| local \|[^\n]*?\| ([0-9.]+) \| 0 kB \|"),
                ("in process, libcurl, 20 ms: CPU ms / sample",
                 r"\| in process \| HTTP, ranged \(libcurl\) \| 20 ms \|[^\n]*?\| ([0-9.]+) \| [0-9,]+ kB \|"),
                ("1 worker, libcurl, 20 ms: CPU ms / sample",
                 r"\| 1 worker \| HTTP, ranged \(libcurl\) \| 20 ms \|[^\n]*?\| ([0-9.]+) \| [0-9,]+ kB \|")]),
    "generate": (["benchmarks/bench_generate.py", "--threads", "1", "--variants", "cached", "--max-steps", "12"],
                 [("beam search CPU s (12 steps)", r"\| cached \| [0-9.]+ \| [0-9.]+ \| ([0-9.]+) \|")]),
}


def run_one(tree: Path, name: str, python: str) -> dict[str, float]:
    args, figures = BENCHMARKS[name]
    env = dict(os.environ, PYTHONPATH=str(tree), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    cmd = [python, *args]
    if name == "pipeline" and shutil.which("taskset"):
        cmd = ["taskset", "-c", "0", *cmd]
    out = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{name} failed in {tree} (exit {out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    got = {}
    for label, pattern in figures:
        m = re.search(pattern, out.stdout)
        if m is None:
            sys.exit(f"{name} in {tree}: no figure for {label!r} in its output:\n{out.stdout[-3000:]}")
        got[label] = float(m.group(1).replace(",", ""))
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="commit to compare against (e.g. HEAD~1, a tag, a sha)")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each benchmark per tree")
    ap.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated subset of " + ", ".join(BENCHMARKS))
    args = ap.parse_args()
    python = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").exists() else sys.executable
    base_rev = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout.strip()
    head_rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.strip()
    tmp = Path(tempfile.mkdtemp(prefix="avcap-ab-"))
    base = tmp / "base"
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(base), args.base], cwd=ROOT, check=True)
    try:
        if (ROOT / ".venv").exists():
            (base / ".venv").symlink_to(ROOT / ".venv")
        results: dict[str, dict[str, dict[str, list[float]]]] = {}
        load_start = os.getloadavg()
        for name in args.only.split(","):
            per = results[name] = {"base": {}, "head": {}}
            for r in range(args.rounds):
                order = [("base", base), ("head", ROOT)] if r % 2 == 0 else [("head", ROOT), ("base", base)]
                for which, tree in order:
                    for label, v in run_one(tree, name, python).items():
                        per[which].setdefault(label, []).append(v)
                    print(f"{name} round {r + 1} {which}: done", file=sys.stderr)
        load_end = os.getloadavg()
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"base {base_rev}, this tree {head_rev}{' (with uncommitted changes)' if dirty else ''}; "
          f"{args.rounds} rounds each, alternating; load average {load_start[0]:.1f} at the start, "
          f"{load_end[0]:.1f} at the end")
    print("| benchmark | figure | base (median) | this tree (median) | this / base |")
    print("|---|---|---|---|---|")
    for name, per in results.items():
        for label, _ in BENCHMARKS[name][1]:
            b, h = statistics.median(per["base"][label]), statistics.median(per["head"][label])
            print(f"| {name} | {label} | {b:.3f} | {h:.3f} | {h / b:.2f}x |")


if __name__ == "__main__":
    main()
