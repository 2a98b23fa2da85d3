"""pipeline.schedule against a real Prefect server on loopback: deployments of flows.build_flow and audit_flow.

The server and the serving process are subprocesses with their own PREFECT_HOME; this process talks to the
server through temporary settings only, so other tests keep their ephemeral Prefect.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.audit import audit_flow
from pipeline.orchestrate import build_flow
from pipeline.schedule import ScheduleConfig, make_deployments
from tests.fixtures_ops import copy_build, prefect_settings, stop_process

REPO = Path(__file__).resolve().parent.parent
RUN_TIMEOUT_S = 120


def test_deployments_carry_cron_schedules_and_parameters(prefect_server, tmp_path):
    api, _ = prefect_server
    cfg = ScheduleConfig(out_dir=str(tmp_path / "out"), rebuild_cron="15 2 * * *", audit_cron="30 6 * * 1",
                         timezone="Europe/Paris", audit_sample=3,
                         rebuild_parameters={"csv": ["/data/train.csv"], "split": "train"})
    with prefect_settings(api):
        from prefect import get_client
        for d in make_deployments(build_flow, audit_flow, cfg):
            d.apply()
        with get_client(sync_client=True) as client:
            rebuild = client.read_deployment_by_name("avcap-build/rebuild")
            audit = client.read_deployment_by_name("avcap-audit/audit")
    # Checked on the server's objects, without waiting for a scheduled run.
    (rs,) = rebuild.schedules
    assert (rs.schedule.cron, rs.schedule.timezone, rs.active) == ("15 2 * * *", "Europe/Paris", True)
    (aus,) = audit.schedules
    assert (aus.schedule.cron, aus.schedule.timezone) == ("30 6 * * 1", "Europe/Paris")
    assert rebuild.parameters == {"out_dir": cfg.out_dir, "csv": ["/data/train.csv"], "split": "train"}
    assert audit.parameters == {"out_dir": cfg.out_dir, "sample": 3, "seed": 0}
    assert rebuild.entrypoint == "pipeline/orchestrate.py:build_flow"
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
from pipeline.orchestrate import build_flow
from pipeline.audit import audit_flow
from pipeline.schedule import ScheduleConfig, make_deployments, serve_deployments
cfg = ScheduleConfig(out_dir=sys.argv[1], audit_cron="0 4 * * *", audit_sample=1, rebuild_cron="0 3 * * *",
                     rebuild_parameters={"csv": [sys.argv[2]], "split": "test", "samples_per_shard": 2,
                                         "url_template": "http://127.0.0.1:9/{youtube_id}.mp4", "max_retries": 0})
serve_deployments(make_deployments(build_flow, audit_flow, cfg))
"""


def test_served_audit_deployment_runs_to_completion(prefect_server, ops_build, tmp_path):
    """`serve` in a subprocess (what `flows.py serve` does); runs of both deployments triggered through the API
    complete; the audit leaves its markdown artifact, the rebuild its build report."""
    api, env = prefect_server
    log = open(tmp_path / "serve.log", "wb")
    rebuilt = copy_build(ops_build, tmp_path / "rebuilt")
    csv = ops_build.out_dir.parent / f"{ops_build.out_dir.name}-test.csv"
    server = subprocess.Popen([sys.executable, "-c", _SERVE, str(rebuilt.out_dir), str(csv)], cwd=REPO, env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with prefect_settings(api):
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

        # The scheduled rebuild, triggered now: nothing to redo, the shards keep their bytes.
        before = {p.name: p.read_bytes() for p in (rebuilt.out_dir / "shards" / "test").glob("*.tar")}
        with prefect_settings(api):
            run = run_deployment("avcap-build/rebuild", timeout=RUN_TIMEOUT_S, poll_interval=1)
            assert run.state is not None and run.state.is_completed(), \
                f"{run.state}\n{(tmp_path / 'serve.log').read_text()[-3000:]}"
            with get_client(sync_client=True) as client:
                dep = client.read_deployment_by_name("avcap-build/rebuild")
                arts = client.read_artifacts(artifact_filter=ArtifactFilter(
                    flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
        assert dep.schedules[0].schedule.cron == "0 3 * * *"
        assert {a.key for a in arts} >= {"avcap-build-test-stats", "avcap-build-test-report"}
        assert {p.name: p.read_bytes() for p in (rebuilt.out_dir / "shards" / "test").glob("*.tar")} == before
        assert (rebuilt.out_dir / "reports" / "build-test.md").is_file()

        # A build with a damaged shard: the run fails (visible as failed in the UI) and its artifact names it.
        bad = copy_build(ops_build, tmp_path / "bad")
        shard = sorted((bad.out_dir / "shards" / "test").glob("*.tar"))[0]
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x01
        shard.write_bytes(bytes(data))
        with prefect_settings(api):
            run = run_deployment("avcap-audit/audit", parameters={"out_dir": str(bad.out_dir), "sample": 0},
                                 timeout=RUN_TIMEOUT_S, poll_interval=1)
            assert run.state is not None and run.state.is_failed(), run.state
            with get_client(sync_client=True) as client:
                arts = client.read_artifacts(artifact_filter=ArtifactFilter(
                    flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
        md = [a for a in arts if a.key == "avcap-audit"]
        assert md and "# Audit FAILED" in md[0].data and f"shards/test/{shard.name}" in md[0].data
    finally:
        stop_process(server)
        log.close()
    reports = sorted((ops_build.out_dir / "audit").glob("audit-*.json"))
    assert reports, "the served run wrote no audit report"


def test_audit_cli_runs_the_flow_and_exits_nonzero_on_mismatch(prefect_server, ops_build, tmp_path, capsys):
    """`flows.py audit` path (pipeline.audit.audit_main) through a Prefect flow run on the loopback server."""
    import argparse

    from pipeline.audit import add_audit_arguments, audit_main
    api, _ = prefect_server
    parse = add_audit_arguments(argparse.ArgumentParser()).parse_args
    with prefect_settings(api):
        assert audit_main(parse(["--out", str(ops_build.out_dir), "--sample", "1"])) == 0
        bad = copy_build(ops_build, tmp_path / "bad")
        m = (bad.out_dir / "manifest.json")
        m.write_text(m.read_text().replace('"torch": "', '"torch": "0.0.0-', 1))
        assert audit_main(parse(["--out", str(bad.out_dir), "--sample", "0"])) == 1
    out = capsys.readouterr().out
    assert "audit passed" in out and "audit FAILED" in out and "[tool-version] torch" in out


def test_serve_arguments_make_the_schedule_config(tmp_path):
    import argparse

    from pipeline.params import BuildParams
    from pipeline.schedule import add_serve_arguments, serve_config_from_args
    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    cfg = serve_config_from_args(p.parse_args(["--out", "data", "--csv", "a.csv", "--csv", "b.csv", "--split", "train",
                                               "--cron", "0 1 * * *", "--audit-cron", "none",
                                               "--timezone", "Asia/Tokyo", "--publish", "s3://bucket/avcap"]))
    assert cfg.out_dir == str(Path("data").absolute()) and cfg.rebuild_cron == "0 1 * * *"
    assert cfg.audit_cron is None and cfg.timezone == "Asia/Tokyo"
    # Every build parameter is in the deployment (what the UI shows is what runs), paths absolute.
    want = {**BuildParams(split="train", out_dir="data").as_dict(),
            "csv": [str(Path("a.csv").absolute()), str(Path("b.csv").absolute())], "publish_url": "s3://bucket/avcap"}
    del want["out_dir"]
    assert cfg.rebuild_parameters == want
    rebuild, audit = make_deployments(build_flow, audit_flow, cfg)
    assert audit.schedules == [] and rebuild.schedules[0].schedule.timezone == "Asia/Tokyo"


def test_rebuild_flow_is_incremental_and_publishes(prefect_server, ops_build, tmp_path):
    """The deployable build flow on an up-to-date build: nothing is redone, shards keep their bytes, and the build
    is published (shards, then the manifest)."""
    from shards.manifest import load_dataset_manifest
    api, _ = prefect_server
    b = copy_build(ops_build, tmp_path / "out")
    csv = ops_build.out_dir.parent / f"{ops_build.out_dir.name}-test.csv"
    before = [(s.path, s.sha256) for s in load_dataset_manifest(b.out_dir).splits["test"].shards]
    dest = tmp_path / "published"
    with prefect_settings(api):
        result = build_flow(out_dir=str(b.out_dir), csv=[str(csv)], split="test", report=False,
                            url_template="http://127.0.0.1:9/{youtube_id}.mp4", publish_url=f"file://{dest}")
    assert result.counts["ok"] == len(ops_build.keys) and len(result.shards) == len(before)
    assert result.stages["process"].clips == 0 and result.stages["download"].clips == 0
    entry = load_dataset_manifest(b.out_dir).splits["test"]
    assert [(s.path, s.sha256) for s in entry.shards] == before
    assert entry.changes.shards_written == [] and entry.changes.shards_unchanged == len(before)
    # each shard goes with its member index
    assert result.publish.manifest_uploaded and len(result.publish.uploaded) == 2 * len(before)
    assert [(s.path, s.sha256) for s in load_dataset_manifest(f"file://{dest}").splits["test"].shards] == before
