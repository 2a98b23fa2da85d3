"""pipeline.dask_runner on a real `dask scheduler` + `dask worker` processes: the build equals the local build
byte for byte, a SIGKILLed worker loses no clip and only its unfinished clips are redone, and a worker that
cannot see DIR stops the build before any work is sent."""
from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from functools import partial
from pathlib import Path

import pytest

from pipeline import orchestrate as flows
from pipeline.build import BuildConfig, BuildError, ProcessJob, ProcessOutcome, run_build
from pipeline.dask_runner import DaskClipRunner, chunked, read_journal, run_chunk
from pipeline.download import DownloadConfig
from pipeline.status import OK
from tests.dask_jobs import log_lines, logged_slow_clip
from tests.fixtures_ops import clip_key, make_build

DEAD_URL = "http://127.0.0.1:9/{youtube_id}.mp4"
CLIPS = [(f"daskClip{i:03d}", 0, 300.0 + 75 * i) for i in range(8)]


@pytest.fixture(scope="module")
def local_build(tmp_path_factory):
    """The 8 clips built locally (one process): the reference every Dask build must equal."""
    return make_build(tmp_path_factory.mktemp("dask-local") / "out", clips=CLIPS)


def _shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "shards" / "test").glob("*.tar"))}


def _config(local_build, out: Path) -> BuildConfig:
    shutil.copytree(local_build.out_dir / "media", out / "media")   # the media cache: no downloads
    csv = local_build.out_dir.parent / f"{local_build.out_dir.name}-test.csv"
    return BuildConfig(csv=[csv], split="test", out=out, samples_per_shard=2,
                       download=DownloadConfig(url_template=DEAD_URL, max_retries=0, workers=1))


def _job(key: str) -> ProcessJob:
    from pipeline.extract import ExtractConfig
    from pipeline.features import FbankConfig
    return ProcessJob(key, "/nonexistent.mp4", 0.0, {}, "/nonexistent.tar", ExtractConfig(), FbankConfig())


def test_chunks_and_journal(tmp_path):
    jobs = [_job(f"k{i}") for i in range(10)]
    assert [len(c) for c in chunked(jobs, 4, threads=2)] == [4, 4, 2]
    assert [len(c) for c in chunked(jobs, 64, threads=2)] == [5, 5]     # every thread gets work
    assert [len(c) for c in chunked(jobs[:1], 64, threads=4)] == [1]

    journal = tmp_path / "chunk.jsonl"
    calls = []

    def fake(job):
        calls.append(job.key)
        return ProcessOutcome(job.key, OK, duration=1.0)
    first = run_chunk(jobs[:3], str(journal), fake)
    with open(journal, "a") as f:
        f.write('{"key": "k3", "status"')                              # a worker died mid-line
    again = run_chunk(jobs[:5], str(journal), fake)                    # Dask re-runs the chunk elsewhere
    assert calls == ["k0", "k1", "k2", "k3", "k4"]                      # k0-k2 were not redone
    assert again[:3] == first and [o.key for o in again] == ["k0", "k1", "k2", "k3", "k4"]
    assert set(read_journal(journal)) == {"k0", "k1", "k2", "k3", "k4"}
    with pytest.raises(ValueError, match="expected a scheduler URL"):
        DaskClipRunner("127.0.0.1:8786", tmp_path)


def test_dask_build_equals_local_and_a_killed_worker_loses_no_clip(dask_cluster, local_build, tmp_path):
    cluster = dask_cluster(2)
    cfg = _config(local_build, tmp_path / "out")
    log = tmp_path / "clips.log"
    runner = DaskClipRunner(cluster.address, cfg.out, chunk_size=3,
                            process=partial(logged_slow_clip, str(log), 0.5))
    result: dict = {}
    build = threading.Thread(target=lambda: result.setdefault("r", run_build(cfg, clip_runner=runner)))
    build.start()

    # Kill a worker once it has finished a clip of its chunk and started the next one of the same chunk.
    victim, finished_before_kill = None, set()
    deadline = time.monotonic() + 60
    while victim is None and time.monotonic() < deadline:
        lines = log_lines(log)
        for pid in {p for _, _, p in lines}:
            mine = [(ev, k) for ev, k, p in lines if p == pid]
            if mine and mine[-1][0] == "start" and any(ev == "done" for ev, _ in mine):
                victim, finished_before_kill = pid, {k for ev, k in mine if ev == "done"}
                break
        time.sleep(0.05)
    assert victim is not None, log.read_text() if log.exists() else "no clip started"
    os.kill(victim, signal.SIGKILL)
    build.join(120)
    assert not build.is_alive()

    r = result["r"]
    assert r.counts["ok"] == len(CLIPS) and r.ok
    assert _shards(cfg.out) == _shards(local_build.out_dir)
    starts = [k for ev, k, _ in log_lines(log) if ev == "start"]
    assert all(starts.count(k) == 1 for k in finished_before_kill), "journalled clips were redone"
    assert set(starts) == {clip_key(y, s) for y, s, _ in CLIPS}
    assert not list((cfg.out / ".dask").glob("chunk-*")), "journals are removed once recorded"

    # A rerun has nothing left to do and leaves the shards as they are.
    again = run_build(cfg, clip_runner=DaskClipRunner(cluster.address, cfg.out))
    assert again.stages["process"].clips == 0 and _shards(cfg.out) == _shards(local_build.out_dir)


def test_worker_that_cannot_see_dir_stops_the_build_before_any_work(dask_cluster, local_build, tmp_path, capsys):
    out = tmp_path / "shared" / "out"
    cfg = _config(local_build, out)
    # The second worker has a mount namespace of its own, with an empty tmpfs where DIR's parent is: as a
    # worker on a machine that does not mount the shared filesystem.
    hide = ("unshare", "-m", "sh", "-c", 'mount -t tmpfs tmpfs "$0" && exec "$@"', str(tmp_path / "shared"))
    cluster = dask_cluster(1, extra_workers=[hide])
    code = flows.main(["build", "--csv", str(cfg.csv[0]), "--split", "test", "--out", str(out), "--no-prefect",
                       "--url-template", DEAD_URL, "--dask-address", cluster.address])
    err = capsys.readouterr().err
    assert code == flows.EXIT_ERROR
    assert f"1 of 2 Dask workers cannot use the output directory {out}" in err
    assert "cannot read" in err and "a filesystem that every worker mounts at the same path" in err
    assert not (out / "ledger.sqlite").exists() and not (out / "staging").exists(), "nothing was started"
    with pytest.raises(BuildError, match="cannot use the output directory"):
        DaskClipRunner(cluster.address, out).preflight()
