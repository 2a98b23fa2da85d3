"""flows.py: the CLI, the build flow on a 2-worker Dask cluster with publishing and artifacts, and the
incremental rebuild of a new CSV version (only changed shards rewritten; equal to a fresh build)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline import orchestrate as flows
from pipeline.params import BuildParams
from pipeline.build import run_build
from pipeline.ledger import Ledger
from pipeline.report import rms_dbfs
from shards.manifest import load_dataset_manifest
from shards.writer import shard_index
from tests.fixtures_ops import OPS_CLIPS, clip_key, prefect_settings
from tests.media import MediaSpec, make_media

DEAD_URL = "http://127.0.0.1:9/{youtube_id}.mp4"   # a closed port: only cached media can be used


def _shards(out: Path, split: str = "test") -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "shards" / split).glob("*.tar"))}


def test_every_command_has_clear_help():
    parser = flows.make_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == {"build", "audit", "serve", "publish", "doctor", "gallery"}
    build = sub.choices["build"].format_help()
    for option in ("--dask-address", "--publish", "--prune", "--cpu-workers", "--download-workers", "--no-report"):
        assert option in build, option
    assert "5 publishing failed" in " ".join(build.split())
    assert "--sample" in sub.choices["audit"].format_help() and "--cron" in sub.choices["serve"].format_help()
    assert "--results" in sub.choices["gallery"].format_help()
    with pytest.raises(SystemExit):
        flows.main(["build", "--split", "test"])   # --csv and --out are required


def test_bad_option_combinations_are_refused(tmp_path, capsys):
    base = ["build", "--csv", "x.csv", "--split", "test", "--out", str(tmp_path)]
    assert flows.main(base + ["--prune"]) == flows.EXIT_ERROR
    assert flows.main(base + ["--dask-address", "127.0.0.1:1", "--no-prefect"]) == flows.EXIT_ERROR
    err = capsys.readouterr().err
    assert "--prune needs --publish" in err and "expected a scheduler URL like tcp://host:8786" in err


def test_rms_dbfs():
    import numpy as np
    assert rms_dbfs(np.full(100, 32767, np.int16)) == pytest.approx(0.0, abs=1e-3)
    assert rms_dbfs(np.full(100, 3277, np.int16)) == pytest.approx(-20.0, abs=0.01)
    assert rms_dbfs(np.zeros(10, np.int16)) == -120.0


def test_cli_build_on_two_dask_workers_publishes_and_reports(prefect_server, ops_build, tmp_path, monkeypatch):
    """`flows.py build --dask-address` on a LocalCluster of 2 worker processes: the clips run in chunks on the
    workers (no Prefect task run per clip), the shards are byte-identical to the local build's, the build is published through fsspec
    (manifest last), and the run leaves its table and markdown artifacts and report files."""
    from distributed import LocalCluster
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    api, _ = prefect_server
    monkeypatch.setenv("PREFECT_API_URL", api)     # the worker processes report their task runs here
    out = tmp_path / "out"
    shutil.copytree(ops_build.out_dir / "media", out / "media")   # the cached media: no downloads
    csv = ops_build.out_dir.parent / f"{ops_build.out_dir.name}-test.csv"
    dest = tmp_path / "bucket"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        with prefect_settings(api):
            code = flows.main(["build", "--csv", str(csv), "--split", "test", "--out", str(out),
                               "--url-template", DEAD_URL, "--samples-per-shard", "2", "--max-retries", "0",
                               "--dask-address", cluster.scheduler_address, "--publish", f"file://{dest}"])
        workers = len(cluster.scheduler_info["workers"])
    assert code == flows.EXIT_OK and workers == 2
    assert _shards(out) == _shards(ops_build.out_dir)
    published = load_dataset_manifest(f"file://{dest}").splits["test"]
    assert [(s.path, s.sha256) for s in published.shards] == \
        [(s.path, s.sha256) for s in load_dataset_manifest(ops_build.out_dir).splits["test"].shards]
    assert all((dest / s.path).is_file() for s in published.shards)

    report = (out / "reports" / "build-test.md").read_text()
    assert "| ok | 4 |" in report and "| process | 4 |" in report
    for plot in ("durations", "loudness", "failures"):
        png = out / "reports" / f"build-test-{plot}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"({png.name})" in report
    with prefect_settings(api), get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["avcap-build-test-stats", "avcap-build-test-report",
                                        "avcap-build-test-gallery"])))
        runs = client.read_task_runs()
    latest = {a.key: a for a in sorted(arts, key=lambda a: a.created)}
    table = latest["avcap-build-test-stats"]
    assert table.type == "table"
    rows = table.data if isinstance(table.data, list) else __import__("json").loads(table.data)
    assert {"section": "stage", "name": "process", "clips": 4} .items() <= next(
        r for r in rows if r["section"] == "stage" and r["name"] == "process").items()
    assert "data:image/png;base64," in latest["avcap-build-test-report"].data
    gallery = out / "reports" / "gallery-test.html"     # the build's gallery, its path in an artifact
    assert gallery.is_file() and str(gallery) in latest["avcap-build-test-gallery"].data
    assert "4 of 4 clips shown" in latest["avcap-build-test-gallery"].data
    # Orchestration per stage and chunk: the stage tasks ran, and no task run per clip.
    names = [r.name for r in runs]
    assert not any(n.startswith("process-clip") for n in names)
    assert any(n.startswith("process") for n in names)
    assert any(n.startswith("download") for n in names) and any(n.startswith("shards") for n in names)


def _csv(path: Path, rows: list[tuple[str, int]]) -> Path:
    # A row keeps its audiocap_id from one CSV version to the next, as AudioCaps' do.
    lines = ["audiocap_id,youtube_id,start_time,caption"]
    lines += [f"{800000 + sum(map(ord, yid))},{yid},{start},clip {yid}" for yid, start in rows]
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode())
    return path


def test_incremental_rebuild_of_a_new_csv_version(ops_build, tmp_path):
    """v1 -> v2 (one row removed, two added; a transient failure whose media has since appeared; a permanent
    failure): only the new and the failed-transient clips are processed, the removed row leaves the shards,
    only the shards holding changed keys are rewritten, the manifest records the changes, and the shards equal
    a fresh build of v2 from the same media, byte for byte."""
    ops = [(yid, start) for yid, start, _ in OPS_CLIPS]
    extra = {"incrNew0001": 500.0, "incrNew0002": 700.0, "incrLate003": 800.0, "incrKept004": 1000.0}
    media = tmp_path / "media"
    media.mkdir()
    for yid, start in ops:
        shutil.copy(ops_build.out_dir / "media" / f"{clip_key(yid, start)}.mp4", media / f"{yid}_{start}.mp4")
    for yid, tone in extra.items():
        make_media(media / f"{yid}_0.mp4", MediaSpec(10, width=160, height=120, tone_hz=tone))
    (media / "incrBroken5_0.mp4").write_bytes(b"<html>not a video</html>")   # a permanent failure
    late = media / "incrLate003_0.mp4"
    late_hidden = late.rename(tmp_path / "late.mp4")                          # missing at v1: transient

    removed, added = ops[0], [("incrNew0001", 0), ("incrNew0002", 0)]
    common = ops[1:] + [("incrLate003", 0), ("incrKept004", 0), ("incrBroken5", 0)]
    v1 = _csv(tmp_path / "v1.csv", [removed] + common)            # 7 rows -> 4 shards of 2
    v2 = _csv(tmp_path / "v2.csv", common + added)                # 8 rows -> 4 shards of 2, the same count

    def build(csv: Path, out: Path):
        params = dict(csv=[str(csv)], split="test", out_dir=str(out), media_dir=str(media),
                      url_template=DEAD_URL, samples_per_shard=2, frames=4, max_retries=0)
        return run_build(BuildParams(**params).to_build_config())

    out = tmp_path / "out"
    r1 = build(v1, out)
    assert r1.counts == {"ok": 5, "failed-permanent": 1, "failed-transient": 1, "pending": 0}
    assert r1.reasons == {"failed-permanent/undecodable": 1, "failed-transient/media-not-found": 1}
    v1_shards = _shards(out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "shards" / "test").glob("*.tar")}

    late_hidden.rename(late)
    r2 = build(v2, out)
    key = {yid: clip_key(yid, start) for yid, start in ops + added + common}
    assert r2.counts == {"ok": 7, "failed-permanent": 1, "failed-transient": 0, "pending": 0}
    # Only new clips and the transient failure were processed; the permanent one was kept, not retried.
    assert r2.stages["process"].clips == 3
    assert r2.changes["retried"] == [key["incrLate003"]]
    assert r2.changes["added"] == sorted([key["incrNew0001"], key["incrNew0002"], key["incrLate003"]])
    assert r2.changes["removed"] == [key[removed[0]]] and r2.changes["dropped_rows"] == [key[removed[0]]]
    with Ledger(out / "ledger.sqlite", "test") as ledger:
        broken = ledger.get(key["incrBroken5"])
        # --media-dir: no download attempt was ever made
        assert (broken.status, broken.reason, broken.attempts) == ("failed-permanent", "undecodable", 0)
        assert ledger.get(key[removed[0]]).status == "removed"    # history kept, in no failure count
    changes = load_dataset_manifest(out).splits["test"].changes
    assert (changes.added, changes.removed, changes.retried, changes.updated) == (3, 1, 1, 0)

    touched = {shard_index(key[y], 4) for y in ("incrNew0001", "incrNew0002", "incrLate003", removed[0])}
    touched = {f"shards/test/test-{i:05d}.tar" for i in touched}
    # A touched shard is rewritten, or deleted when the removed clip was its only sample.
    assert set(changes.shards_written) | set(changes.shards_removed) == touched
    assert changes.shards_unchanged == len({f"shards/test/{n}" for n in v1_shards} - touched) >= 1
    for p in (out / "shards" / "test").glob("*.tar"):
        if f"shards/test/{p.name}" not in touched:      # untouched shards keep their bytes and their file
            assert p.read_bytes() == v1_shards[p.name] and p.stat().st_mtime_ns == mtimes[p.name], p.name

    fresh = tmp_path / "fresh"
    build(v2, fresh)
    assert _shards(out) == _shards(fresh)
    assert [(s.path, s.sha256) for s in load_dataset_manifest(out).splits["test"].shards] == \
        [(s.path, s.sha256) for s in load_dataset_manifest(fresh).splits["test"].shards]
