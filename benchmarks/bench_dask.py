"""Benchmark: the cost of orchestrating the CPU stage on Dask, against the local process pool.

Two measurements, one run:

  ceiling   clips/s that one driver core dispatches and records when the clip function does nothing
            (tests.dask_jobs.noop_clip: no media), through pipeline.build.process_stage, DaskClipRunner and the
            ledger, on a LocalCluster of 2 single-thread worker processes. Driver CPU is this process's CPU
            time (time.process_time, every thread of the driver); the workers' CPU is not the driver's.
  build     the same N clips from the media cache (DIR/media) built three ways, each in a fresh process:
            `--no-prefect --cpu-workers 2`, Prefect with `--cpu-workers 2`, and Prefect with `--dask-address`
            on a `dask scheduler` with 2 `dask worker --nthreads 1` processes. Wall time of the whole build,
            the process stage's wall time and its driver CPU (StageStats.cpu_seconds), and whether the shards
            are byte-identical to the local build's.

    .venv/bin/python benchmarks/bench_dask.py --clips 600 --noop 3000

Targets (the scale-out issue): driver CPU per clip in Dask mode <= 5 ms; ceiling >= 1,000 clips/s; Dask build
wall <= 1.15x the local `--cpu-workers 2` build.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DEAD_URL = "http://127.0.0.1:9/{youtube_id}.mp4"


def _clip(i: int) -> tuple[str, int]:
    return f"bench{i:06d}", 0


def _make_one(args: tuple[Path, int]) -> None:
    from tests.fixtures_ops import clip_key
    from tests.media import MediaSpec, make_media
    media, i = args
    yid, start = _clip(i)
    make_media(media / f"{clip_key(yid, start)}.mp4", MediaSpec(10, width=160, height=120, tone_hz=200.0 + i))


def make_dataset(root: Path, n: int) -> Path:
    """N 10 s clips in a build's media cache layout plus their CSV; returns the CSV."""
    media = root / "media"
    media.mkdir(parents=True)
    with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(_make_one, [(media, i) for i in range(n)], chunksize=8))
    rows = ["audiocap_id,youtube_id,start_time,caption"]
    rows += [f"{100000 + i},{_clip(i)[0]},{_clip(i)[1]},a tone number {i}" for i in range(n)]
    csv = root / "clips.csv"
    csv.write_bytes(("\r\n".join(rows) + "\r\n").encode())
    return csv


def run_one(mode: str, out: Path, csv: Path, dask: str | None) -> dict:
    """One build in this process; prints its figures as JSON."""
    from pipeline import orchestrate as flows
    from pipeline.params import BuildParams

    p = BuildParams(split="test", out_dir=str(out), csv=[str(csv)], url_template=DEAD_URL, cpu_workers=2,
                    samples_per_shard=64, max_retries=0, report=False, dask_address=dask)
    t0, cpu0 = time.monotonic(), time.process_time()
    result = flows._run_direct(p, None) if mode == "direct" else flows.build_flow(**p.as_dict())
    stage = result.stages["process"]
    return {"wall_s": time.monotonic() - t0, "cpu_s": time.process_time() - cpu0, "ok": result.counts["ok"],
            "process_wall_s": stage.seconds, "process_cpu_s": stage.cpu_seconds, "process_clips": stage.clips}


def shard_digest(out: Path) -> str:
    h = hashlib.sha256()
    for p in sorted((out / "shards" / "test").glob("*.tar")):
        h.update(p.name.encode() + hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:16]


def start_cluster(base: Path, n_workers: int) -> tuple[str, list[subprocess.Popen]]:
    dask = str(Path(sys.executable).with_name("dask"))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    sched_file = base / "scheduler.json"
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                               "--scheduler-file", str(sched_file)], env=env, cwd=base,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    while not sched_file.exists():
        time.sleep(0.2)
    address = json.loads(sched_file.read_text())["address"]
    for i in range(n_workers):
        procs.append(subprocess.Popen([dask, "worker", address, "--nthreads", "1", "--no-dashboard",
                                       "--local-directory", str(base / f"w{i}")], env=env, cwd=base,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    from distributed import Client
    with Client(address, set_as_default=False) as c:
        c.wait_for_workers(n_workers, timeout=120)
    return address, procs


def ceiling(base: Path, n: int) -> dict:
    """Driver CPU and wall to dispatch and record n no-op clips."""
    from distributed import LocalCluster

    from pipeline.build import BuildConfig, MediaRef, process_stage
    from pipeline.clip_list import Clip
    from pipeline.dask_runner import DaskClipRunner
    from pipeline.download import DownloadConfig
    from pipeline.ledger import Ledger
    from tests.dask_jobs import noop_clip

    out = base / "noop"
    cfg = BuildConfig(csv=[base / "unused.csv"], split="test", out=out,
                      download=DownloadConfig(url_template=DEAD_URL))
    clips = [Clip(f"noop{i:07d}", 0, ["x"], [i], "test", ["bench"]) for i in range(n)]
    with Ledger(out / "ledger.sqlite", "test") as ledger:
        ledger.upsert_pending(clips)
    media = [MediaRef(c, out / "media" / f"{c.key}.mp4", 0.0, media_sha256="0" * 64) for c in clips]
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        runner = DaskClipRunner(cluster.scheduler_address, out, process=noop_clip)
        t0, cpu0 = time.monotonic(), time.process_time()
        counts = process_stage(cfg, media, runner)
        wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
    assert counts["ok"] == n, counts
    return {"clips": n, "wall_s": wall, "cpu_s": cpu}


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or platform.machine())
    return f"{os.cpu_count()} cores, {model}, load {os.getloadavg()[0]:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clips", type=int, default=600)
    ap.add_argument("--noop", type=int, default=3000)
    ap.add_argument("--one", choices=["direct", "prefect"], help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--csv", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--dask", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(run_one(a.one, a.out, a.csv, a.dask)))
        return

    load_before = machine()
    with tempfile.TemporaryDirectory(prefix="bench-dask-") as tmp:
        base = Path(tmp)
        env = dict(os.environ, PREFECT_HOME=str(base / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   PREFECT_LOGGING_LEVEL="WARNING", PYTHONPATH=str(REPO))
        top = ceiling(base, a.noop)
        csv = make_dataset(base / "data", a.clips)
        address, procs = start_cluster(base, 2)
        rows = {}
        try:
            for name, mode, dask in (("local, --no-prefect --cpu-workers 2", "direct", None),
                                     ("Prefect, --cpu-workers 2", "prefect", None),
                                     ("Prefect + --dask-address (2 workers x 1 thread)", "prefect", address)):
                out = base / f"out-{len(rows)}"
                shutil.copytree(base / "data" / "media", out / "media")
                cmd = [sys.executable, __file__, "--one", mode, "--out", str(out), "--csv", str(csv)]
                cmd += ["--dask", dask] if dask else []
                r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
                rows[name] = {**json.loads(r.stdout.strip().splitlines()[-1]), "shards": shard_digest(out)}
        finally:
            for p in reversed(procs):
                p.terminate()
                p.wait(30)

    local = rows["local, --no-prefect --cpu-workers 2"]
    print("## Dask scale-out (bench_dask.py)\n")
    print(f"Date {time.strftime('%Y-%m-%d')}; machine: {load_before} before, load {os.getloadavg()[0]:.1f} after. "
          f"Command: `.venv/bin/python benchmarks/bench_dask.py --clips {a.clips} --noop {a.noop}`\n")
    print("| mode | build wall | vs local | process stage | driver CPU in process stage | per clip | shards |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        same = "identical" if r["shards"] == local["shards"] else f"DIFFER ({r['shards']})"
        print(f"| {name} | {r['wall_s']:.1f} s | {r['wall_s'] / local['wall_s']:.2f}x | "
              f"{r['process_clips'] / r['process_wall_s']:.1f} clips/s | {r['process_cpu_s']:.2f} s | "
              f"{1000 * r['process_cpu_s'] / max(1, r['process_clips']):.1f} ms | {same} |")
    print(f"\nOrchestration ceiling: {top['clips']} no-op clips dispatched and recorded with "
          f"{top['cpu_s']:.2f} s of driver CPU ({top['clips'] / top['cpu_s']:.0f} clips per driver CPU-second; "
          f"{top['clips'] / top['wall_s']:.0f} clips/s wall).")
    print("\nTargets: driver CPU per clip in Dask mode <= 5 ms; ceiling >= 1,000 clips/s; Dask build wall <= 1.15x "
          "local.")


if __name__ == "__main__":
    main()
