"""pipeline.schedule against a real Prefect server on loopback, and the CPU stage on a real 2-worker Dask cluster.

The server and the serving process are subprocesses with their own PREFECT_HOME; this process talks to the
server through temporary settings only, so other tests keep their ephemeral Prefect.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline.audit import audit_flow
from pipeline.schedule import ScheduleConfig, make_deployments, rebuild_flow, task_runner_for
from tests.fixtures_ops import copy_build, ops_build  # noqa: F401  (fixture; also registrable as a plugin)

REPO = Path(__file__).resolve().parent.parent
SERVER_START_S = 90
RUN_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory, request):
    """`prefect server start` on 127.0.0.1 and a free port, its own PREFECT_HOME; yields (api_url, env).

    The small build the tests need is made while the server starts up (it takes seconds to migrate its db)."""
    home = tmp_path_factory.mktemp("prefect-server-home")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_API_URL=api, PREFECT_LOGGING_LEVEL="WARNING")
    log = open(home / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    request.getfixturevalue("ops_build")
    deadline = time.monotonic() + SERVER_START_S
    while True:
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            raise RuntimeError(f"prefect server did not come up on {api}: {(home / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    try:
        yield api, env
    finally:
        # Flows run in this process queue their logs for the API: send them before the server goes away.
        from prefect.logging.handlers import APILogHandler
        with _settings(api):
            APILogHandler().flush()
        _stop(proc)
        log.close()


def _settings(api: str):
    from prefect.settings import PREFECT_API_URL, temporary_settings
    return temporary_settings({PREFECT_API_URL: api})


def test_deployments_carry_cron_schedules_and_parameters(prefect_server, tmp_path):
    api, _ = prefect_server
    cfg = ScheduleConfig(out_dir=str(tmp_path / "out"), rebuild_cron="15 2 * * *", audit_cron="30 6 * * 1",
                         timezone="Europe/Paris", audit_sample=3,
                         rebuild_parameters={"csv": ["/data/train.csv"], "split": "train"})
    with _settings(api):
        from prefect import get_client
        for d in make_deployments(rebuild_flow, audit_flow, cfg):
            d.apply()
        with get_client(sync_client=True) as client:
            rebuild = client.read_deployment_by_name("avcap-rebuild/rebuild")
            audit = client.read_deployment_by_name("avcap-audit/audit")
    # Checked on the server's objects, without waiting for a scheduled run.
    (rs,) = rebuild.schedules
    assert (rs.schedule.cron, rs.schedule.timezone, rs.active) == ("15 2 * * *", "Europe/Paris", True)
    (aus,) = audit.schedules
    assert (aus.schedule.cron, aus.schedule.timezone) == ("30 6 * * 1", "Europe/Paris")
    assert rebuild.parameters == {"out_dir": cfg.out_dir, "csv": ["/data/train.csv"], "split": "train"}
    assert audit.parameters == {"out_dir": cfg.out_dir, "sample": 3, "seed": 0}
    assert rebuild.entrypoint == "pipeline/schedule.py:rebuild_flow"
    assert audit.entrypoint == "pipeline/audit.py:audit_flow"
    assert rebuild.global_concurrency_limit is not None and rebuild.global_concurrency_limit.limit == 1


def test_bad_schedule_is_refused_before_deploying(tmp_path):
    with pytest.raises(ValueError):
        make_deployments(None, audit_flow, ScheduleConfig(out_dir=str(tmp_path), audit_cron="61 * * * *"))
    with pytest.raises(ValueError):
        make_deployments(None, audit_flow, ScheduleConfig(out_dir=str(tmp_path), timezone="Mars/Olympus"))
    with pytest.raises(ValueError, match="nothing to deploy"):
        make_deployments(None, None, ScheduleConfig(out_dir=str(tmp_path)))


_SERVE = """
import sys
from pipeline.audit import audit_flow
from pipeline.schedule import ScheduleConfig, make_deployments, serve_deployments
cfg = ScheduleConfig(out_dir=sys.argv[1], audit_cron="0 4 * * *", audit_sample=1)
serve_deployments(make_deployments(None, audit_flow, cfg))
"""


def test_served_audit_deployment_runs_to_completion(prefect_server, ops_build, tmp_path):
    """`serve` in a subprocess (what `flows.py serve` does); a run triggered through the API completes and
    leaves its markdown artifact."""
    api, env = prefect_server
    log = open(tmp_path / "serve.log", "wb")
    server = subprocess.Popen([sys.executable, "-c", _SERVE, str(ops_build.out_dir)], cwd=REPO, env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with _settings(api):
            from prefect import get_client
            from prefect.deployments import run_deployment
            deadline = time.monotonic() + 60
            with get_client(sync_client=True) as client:
                while True:   # serve registers the deployment when it starts
                    try:
                        dep = client.read_deployment_by_name("avcap-audit/audit")
                        if dep.schedules and dep.schedules[0].schedule.cron == "0 4 * * *":
                            break
                    except Exception:  # noqa: BLE001 - ObjectNotFound until serve has applied it
                        pass
                    assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                    assert time.monotonic() < deadline, "serve did not register the audit deployment"
                    time.sleep(0.5)
            run = run_deployment("avcap-audit/audit", parameters={"out_dir": str(ops_build.out_dir), "sample": 1},
                                 timeout=RUN_TIMEOUT_S, poll_interval=1)
            assert run.state is not None and run.state.is_completed(), \
                f"{run.state}\n{(tmp_path / 'serve.log').read_text()[-3000:]}"
            with get_client(sync_client=True) as client:
                from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
                arts = client.read_artifacts(artifact_filter=ArtifactFilter(
                    flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
        md = [a for a in arts if a.key == "avcap-audit"]
        assert md and md[0].type == "markdown" and "# Audit PASSED" in md[0].data

        # A build with a damaged shard: the run fails (visible as failed in the UI) and its artifact names it.
        bad = copy_build(ops_build, tmp_path / "bad")
        shard = sorted((bad.out_dir / "shards" / "test").glob("*.tar"))[0]
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x01
        shard.write_bytes(bytes(data))
        with _settings(api):
            run = run_deployment("avcap-audit/audit", parameters={"out_dir": str(bad.out_dir), "sample": 0},
                                 timeout=RUN_TIMEOUT_S, poll_interval=1)
            assert run.state is not None and run.state.is_failed(), run.state
            with get_client(sync_client=True) as client:
                arts = client.read_artifacts(artifact_filter=ArtifactFilter(
                    flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
        md = [a for a in arts if a.key == "avcap-audit"]
        assert md and "# Audit FAILED" in md[0].data and f"shards/test/{shard.name}" in md[0].data
    finally:
        _stop(server)
        log.close()
    reports = sorted((ops_build.out_dir / "audit").glob("audit-*.json"))
    assert reports, "the served run wrote no audit report"


def test_task_runner_for():
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner
    assert isinstance(task_runner_for(None), ThreadPoolTaskRunner)
    runner = task_runner_for("tcp://127.0.0.1:8786")
    assert isinstance(runner, DaskTaskRunner) and runner.address == "tcp://127.0.0.1:8786"
    with pytest.raises(ValueError, match="scheduler URL"):
        task_runner_for("127.0.0.1:8786")


def test_cpu_stage_on_two_dask_workers_gives_the_same_shards(prefect_server, ops_build, tmp_path, monkeypatch):
    """The CPU stage (pipeline.build.process_clip) as Prefect tasks on a 2-worker process cluster through
    prefect-dask: the staged samples are byte-identical to the local build's and so are the shards."""
    import json

    from distributed import LocalCluster
    from prefect import flow, task

    from pipeline.build import ProcessJob, process_clip
    from pipeline.extract import ExtractConfig
    from pipeline.features import FbankConfig
    from shards.manifest import load_dataset_manifest
    from shards.writer import build_shards, read_staged_sample, staged_path

    api, _ = prefect_server
    monkeypatch.setenv("PREFECT_API_URL", api)     # the worker processes report their task runs here
    out = tmp_path / "dask-out"
    jobs = []
    for key in ops_build.keys:
        meta = read_staged_sample(staged_path(ops_build.out_dir, "test", key)).meta
        clip_meta = {k: meta[k] for k in ("key", "youtube_id", "start_time", "split", "captions", "audiocap_ids")}
        target = staged_path(out, "test", key)
        target.parent.mkdir(parents=True, exist_ok=True)
        jobs.append(ProcessJob(key=key, media_path=str(ops_build.out_dir / "media" / f"{key}.mp4"), offset=0.0,
                               meta=clip_meta, out_path=str(target), extract=ExtractConfig(), fbank=FbankConfig()))

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        @flow(name="dask-process-stage", task_runner=task_runner_for(cluster.scheduler_address),
              validate_parameters=False)
        def process_on_dask(jobs: list[ProcessJob]):
            futures = task(process_clip, name="process-clip").map(jobs)
            return [f.result() for f in futures]

        with _settings(api):
            outcomes = process_on_dask(jobs)
        workers = len(cluster.scheduler_info["workers"])
    assert workers == 2
    assert [o.status for o in outcomes] == ["ok"] * len(jobs), [(o.key, o.reason, o.message) for o in outcomes]
    for key in ops_build.keys:
        assert staged_path(out, "test", key).read_bytes() == staged_path(ops_build.out_dir, "test", key).read_bytes(), key
    split = load_dataset_manifest(ops_build.out_dir).splits["test"]
    result = build_shards(out, "test", split.num_shards)
    assert [(s.path, s.sha256) for s in result.shards] == [(s.path, s.sha256) for s in split.shards]


def test_audit_cli_runs_the_flow_and_exits_nonzero_on_mismatch(prefect_server, ops_build, tmp_path, capsys):
    """`flows.py audit` path (pipeline.audit.audit_main) through a Prefect flow run on the loopback server."""
    import argparse

    from pipeline.audit import add_audit_arguments, audit_main
    api, _ = prefect_server
    parse = add_audit_arguments(argparse.ArgumentParser()).parse_args
    with _settings(api):
        assert audit_main(parse(["--out", str(ops_build.out_dir), "--sample", "1"])) == 0
        bad = copy_build(ops_build, tmp_path / "bad")
        m = (bad.out_dir / "manifest.json")
        m.write_text(m.read_text().replace('"torch": "', '"torch": "0.0.0-', 1))
        assert audit_main(parse(["--out", str(bad.out_dir), "--sample", "0"])) == 1
    out = capsys.readouterr().out
    assert "audit passed" in out and "audit FAILED" in out and "[tool-version] torch" in out


def test_serve_arguments_make_the_schedule_config(tmp_path):
    import argparse

    from pipeline.schedule import add_serve_arguments, serve_config_from_args
    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    cfg = serve_config_from_args(p.parse_args(["--out", "data", "--csv", "a.csv", "--csv", "b.csv", "--split", "train",
                                               "--cron", "0 1 * * *", "--audit-cron", "none",
                                               "--timezone", "Asia/Tokyo", "--publish", "s3://bucket/avcap"]))
    assert cfg.out_dir == str(Path("data").absolute()) and cfg.rebuild_cron == "0 1 * * *"
    assert cfg.audit_cron is None and cfg.timezone == "Asia/Tokyo"
    assert cfg.rebuild_parameters == {"csv": [str(Path("a.csv").absolute()), str(Path("b.csv").absolute())],
                                      "split": "train", "cpu_workers": 1, "publish_url": "s3://bucket/avcap"}
    rebuild, audit = make_deployments(rebuild_flow, audit_flow, cfg)
    assert audit.schedules == [] and rebuild.schedules[0].schedule.timezone == "Asia/Tokyo"


def test_rebuild_flow_is_incremental_and_publishes(prefect_server, ops_build, tmp_path):
    """The deployable rebuild on an up-to-date build: nothing is redone, shards keep their bytes, and the build
    is published (shards, then the manifest)."""
    from shards.manifest import load_dataset_manifest
    api, _ = prefect_server
    b = copy_build(ops_build, tmp_path / "out")
    csv = ops_build.out_dir.parent / f"{ops_build.out_dir.name}-test.csv"
    before = [(s.path, s.sha256) for s in load_dataset_manifest(b.out_dir).splits["test"].shards]
    dest = tmp_path / "published"
    with _settings(api):
        summary = rebuild_flow(out_dir=str(b.out_dir), csv=[str(csv)], split="test",
                               url_template="http://127.0.0.1:9/{youtube_id}.mp4", publish_url=f"file://{dest}")
    assert summary["counts"]["ok"] == len(ops_build.keys) and summary["shards"] == len(before)
    entry = load_dataset_manifest(b.out_dir).splits["test"]
    assert [(s.path, s.sha256) for s in entry.shards] == before
    assert entry.changes.shards_written == [] and entry.changes.shards_unchanged == len(before)
    assert summary["publish"]["manifest_uploaded"] and len(summary["publish"]["uploaded"]) == len(before)
    assert [(s.path, s.sha256) for s in load_dataset_manifest(f"file://{dest}").splits["test"].shards] == before
