"""Pipeline fault injection: kills at the download and manifest steps, a full disk, and a hostile media server.

Every fault must end in one of two ways: the rerun completes with shards byte-identical to an uninterrupted
build (nothing lost, nothing half-written counted as done), or the clip ends as a failure whose reason is the
documented one while the rest of the build goes on. Kills during extraction and during a shard write are
covered by tests/test_build_e2e.py and tests/test_shards_writer.py (see RELIABILITY.md).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline import orchestrate as flows
from pipeline.build import BuildConfig, BuildError, run_build
from pipeline.download import DownloadConfig
from pipeline.extract import ExtractConfig
from pipeline.ledger import Ledger, LedgerError
from shards.manifest import load_dataset_manifest
from tests.mounts import mounted_tmpfs
from tests.media import MediaSpec, Route, make_media

REPO = Path(__file__).resolve().parent.parent
FRAMES = 4
# Ids that begin with '-' on purpose: they must never read as an option on the way through the tools.
IDS = ("-relClipAAA", "relClip-BBB", "--relClipCC")


@dataclass
class RelMedia:
    csv: Path
    files: dict[str, Path]      # youtube_id -> whole video (start_time 0, 10 s)
    template: str               # /rel/{youtube_id}.mp4 on the session media server


def _write_csv(path: Path, rows: list[tuple[str, int]]) -> Path:
    lines = ["audiocap_id,youtube_id,start_time,caption"]
    lines += [f"{900000 + i},{yid},{start},clip {i} makes a steady tone" for i, (yid, start) in enumerate(rows)]
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode())
    return path


@pytest.fixture(scope="module")
def rel_media(media_server, tmp_path_factory) -> RelMedia:
    root = tmp_path_factory.mktemp("rel_media")
    files = {}
    for i, yid in enumerate(IDS):
        files[yid] = make_media(root / f"{yid}.mp4", MediaSpec(10, width=192, height=144, tone_hz=400 + 250 * i))
        media_server.routes[f"/rel/{yid}.mp4"] = Route(file=files[yid])
    return RelMedia(csv=_write_csv(root / "rel.csv", [(y, 0) for y in IDS]), files=files,
                    template=media_server.url_template("/rel/"))


def _config(csv: Path, out: Path, template: str, **download) -> BuildConfig:
    download = {"backoff_base_s": 0.01, "max_retries": 1, "timeout_s": 60, "workers": 2, **download}
    return BuildConfig(csv=[csv], split="test", out=out, samples_per_shard=2,
                       download=DownloadConfig(url_template=template, **download),
                       extract=ExtractConfig(frames=FRAMES))


def _cli(csv: Path, out: Path, template: str) -> list[str]:
    return ["build", "--no-prefect", "--csv", str(csv), "--split", "test", "--out", str(out), "--url-template",
            template, "--samples-per-shard", "2", "--frames", str(FRAMES), "--cpu-workers", "1",
            "--download-workers", "2", "--max-retries", "1", "--backoff", "0.01"]


def _shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "shards" / "test").glob("*.tar"))}


def _shard_named_files(out: Path) -> list[Path]:
    """Every file whose name a reader could take for a shard (temp files start with '.')."""
    d = out / "shards" / "test"
    return [p for p in d.iterdir() if p.name.endswith(".tar") and not p.name.startswith(".")] if d.is_dir() else []


def _statuses(out: Path) -> dict[str, str]:
    with Ledger(out / "ledger.sqlite", "test") as ledger:
        return {e.key: e.status for e in ledger.entries()}


@pytest.fixture(scope="module")
def rel_reference(rel_media, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rel_ref")
    result = run_build(_config(rel_media.csv, out, rel_media.template))
    assert result.ok and result.counts["ok"] == len(IDS)
    return out


# ------------------------------------------------------------------------------------------- SIGKILL

def test_sigkill_during_download_then_rerun_matches_an_uninterrupted_build(rel_media, rel_reference, media_server,
                                                                          tmp_path):
    # A second path for the same files, where the last clip's answer stalls: the kill lands while one clip is
    # downloaded and another is in flight (its yt-dlp worker and ffmpeg mid-request).
    for yid, f in rel_media.files.items():
        media_server.routes[f"/relkill/{yid}.mp4"] = Route(file=f)
    stalled = media_server.routes[f"/relkill/{IDS[2]}.mp4"]
    stalled.stall_s = 20
    template = media_server.url_template("/relkill/")
    out = tmp_path / "killed"
    err = open(tmp_path / "stderr", "w+")
    proc = subprocess.Popen([sys.executable, "flows.py", *_cli(rel_media.csv, out, template)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            done = list((out / "media").glob("*.mp4")) if (out / "media").is_dir() else []
            if stalled.served and done:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the build ended before the kill: " + (err.seek(0) or err.read()[-3000:])
        os.killpg(proc.pid, signal.SIGKILL)  # the build, its yt-dlp workers and their ffmpeg, all at once
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        err.close()
    stalled.stall_s = 0
    leftovers = list((out / "media" / ".tmp").iterdir())
    assert leftovers, "the kill should have caught a download attempt in flight"
    assert not _shard_named_files(out) and not (out / "manifest.json").exists()
    assert "ok" not in _statuses(out).values()  # a downloaded file is not a finished clip
    finished = {p.name for p in (out / "media").glob("*.mp4")}
    hits_before = {yid: media_server.hits[f"/relkill/{yid}.mp4"] for yid in IDS}

    assert flows.main(_cli(rel_media.csv, out, template)) == flows.EXIT_OK
    assert _shards(out) == _shards(rel_reference)
    assert set(_statuses(out).values()) == {"ok"}
    assert list((out / "media" / ".tmp").iterdir()) == []  # the killed attempt's files are gone
    for yid in IDS:  # a finished download is reused, not fetched again
        key = f"{yid}_0_10000.mp4"
        assert (media_server.hits[f"/relkill/{yid}.mp4"] == hits_before[yid]) == (key in finished), yid


_KILL_AT_MANIFEST = """
import os, signal, sys
from pathlib import Path
real_replace = os.replace
def replace(src, dst, *a, **kw):
    # The manifest's temp file is written and fsynced; die before it takes the real name.
    if Path(dst).name == "manifest.json":
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *a, **kw)
os.replace = replace
from pipeline import orchestrate as flows
sys.exit(flows.main(sys.argv[1:]))
"""


def test_sigkill_while_writing_the_manifest_then_rerun_matches(rel_media, rel_reference, tmp_path):
    out = tmp_path / "killed"
    # Reuse the reference's downloads: this kill is about the last step, not the network.
    shutil.copytree(rel_reference / "media", out / "media", ignore=shutil.ignore_patterns(".tmp"))
    proc = subprocess.run([sys.executable, "-c", _KILL_AT_MANIFEST, *_cli(rel_media.csv, out, rel_media.template)],
                          cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    # The shards were complete when the kill came, the manifest never took its name: a reader refuses the
    # directory instead of reading shards nobody vouched for.
    assert not (out / "manifest.json").exists()
    assert [p.name for p in out.iterdir() if p.name.startswith(".manifest.json.tmp")], "expected the temp file"
    with pytest.raises(Exception, match="manifest"):
        load_dataset_manifest(out)

    assert flows.main(_cli(rel_media.csv, out, rel_media.template)) == flows.EXIT_OK
    assert _shards(out) == _shards(rel_reference)
    got = load_dataset_manifest(out).splits["test"]
    ref = load_dataset_manifest(rel_reference).splits["test"]
    assert [(s.path, s.sha256, s.num_samples) for s in got.shards] == [(s.path, s.sha256, s.num_samples)
                                                                        for s in ref.shards]
    assert set(_statuses(out).values()) == {"ok"}


# ------------------------------------------------------------------------------------------- full disk

@pytest.fixture
def small_fs(tmp_path):
    """A 2 MiB tmpfs: room for about three 10 s downloads and nothing else."""
    with mounted_tmpfs(tmp_path / "fs", "size=2m") as mnt:
        yield mnt


def _full_disk_build(rel_media, out) -> Exception | None:
    try:
        run_build(_config(rel_media.csv, out, rel_media.template, max_retries=0))
    except Exception as e:  # noqa: BLE001 - what kind of error it is, is what the tests check
        return e
    return None


def test_full_disk_leaves_nothing_half_written_taken_as_done(rel_media, rel_reference, small_fs):
    out = small_fs / "out"
    error = _full_disk_build(rel_media, out)
    assert error is not None, "a build into a full disk must not report success"
    # Nothing half-written under a finished name: a shard or staged sample that has its final name reads to
    # the end; no manifest vouches for a partial build; no clip is ok without its staged sample.
    assert not (out / "manifest.json").exists()
    staging = out / "staging" / "test"
    finished = _shard_named_files(out) + [p for p in staging.glob("*.tar") if not p.name.startswith(".")]
    for p in finished:
        with tarfile.open(p) as tf:
            assert [len(tf.extractfile(ti).read()) for ti in tf] , p
    try:
        _statuses(out)
    except LedgerError as e:  # SQLite may not even open its WAL on a full disk: the error says where and why
        assert str(out / "ledger.sqlite") in str(e) and "MiB free" in str(e)
    # Room again: the ledger has no clip ok whose staged sample is missing, and the rerun completes the same
    # shards as a build that never saw a full disk.
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_fs)], check=True, timeout=30)
    for key, status in _statuses(out).items():
        if status == "ok":
            assert (staging / f"{key}.tar").is_file(), key
    result = run_build(_config(rel_media.csv, out, rel_media.template))
    assert result.ok and result.counts["ok"] == len(IDS)
    assert _shards(out) == _shards(rel_reference)


def test_full_disk_is_a_clear_build_error(rel_media, small_fs, capsys):
    out = small_fs / "out"
    error = _full_disk_build(rel_media, out)
    assert isinstance(error, BuildError), repr(error)
    assert str(out) in str(error)
    assert "no space left on device; free space and run again: finished clips are kept" in str(error)
    # The command line says the same in one line and exits 1, without a traceback.
    capsys.readouterr()
    assert flows.main(_cli(rel_media.csv, out, rel_media.template)) == flows.EXIT_ERROR
    err = capsys.readouterr().err
    assert f"build failed: {out}: no space left on device" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------- server faults

@dataclass
class Fault:
    youtube_id: str
    status: str
    reason: str | None
    attempts: int


def _rotated(src: Path, dst: Path) -> Path:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(src), "-c", "copy", "-metadata:s:v:0",
                    "rotate=90", str(dst)], check=True, timeout=60)
    return dst


def _variable_frame_rate(dst: Path) -> Path:
    # Bursts of frames and long gaps: 5 frames of every 30 at 30 fps, plus every 7th, kept at their own times.
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i",
                    "testsrc2=size=192x144:rate=30:duration=10", "-f", "lavfi", "-i", "sine=f=440:d=10",
                    "-vf", "select='lt(mod(n,30),5)+eq(mod(n,7),0)'", "-fps_mode", "vfr", "-c:v", "libx264",
                    "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(dst)],
                   check=True, timeout=60)
    return dst


def test_server_faults_each_end_as_a_sample_or_a_documented_failure(media_server, tmp_path):
    src = make_media(tmp_path / "src.mp4", MediaSpec(10, width=192, height=144, tone_hz=600))
    data = src.read_bytes()
    routes = {
        # id: (route, expected status, reason, attempts)
        "flaky429xAA": (Route(file=src, fail_first=1, fail_status=429), "ok", None, 2),
        "always500AA": (Route(status=500), "failed-transient", "http-500", 2),
        "stalledxxAA": (Route(file=src, stall_s=30), "failed-transient", "timeout", 2),
        "htmlPagexAA": (Route(body=b"<html><body>gone</body></html>", content_type="text/html"),
                        "failed-permanent", "unsupported-url", 1),
        # The file ends half way (an honest Content-Length) while its header declares 10 s: downloaded again next
        # run, not taken for a short video.
        "truncatedAA": (Route(body=data[: len(data) // 2]), "failed-transient", "truncated", 2),
        "zeroBytesAA": (Route(body=b""), "failed-permanent", "http-416", 1),
        "videoOnlyAA": (Route(file=make_media(tmp_path / "v.mp4", MediaSpec(4, audio=False))),
                        "failed-permanent", "no-audio-stream", 1),
        "audioOnlyAA": (Route(file=make_media(tmp_path / "a.mp4", MediaSpec(4, video=False))),
                        "failed-permanent", "no-video-stream", 1),
        "fourKxxxxAA": (Route(file=make_media(tmp_path / "4k.mp4", MediaSpec(2, width=3840, height=2160, fps=5))),
                        "ok", None, 1),
        "rotatedxxAA": (Route(file=_rotated(src, tmp_path / "rot.mp4")), "ok", None, 1),
        "variableFAA": (Route(file=_variable_frame_rate(tmp_path / "vfr.mp4")), "ok", None, 1),
    }
    for yid, (route, *_ ) in routes.items():
        media_server.routes[f"/faults/{yid}.mp4"] = route
    csv = _write_csv(tmp_path / "faults.csv", [(y, 0) for y in routes])
    out = tmp_path / "out"
    cfg = _config(csv, out, media_server.url_template("/faults/"), workers=3, timeout_s=6, max_retries=1)
    cfg.max_failure_rate = 1.0
    result = run_build(cfg)
    with Ledger(out / "ledger.sqlite", "test") as ledger:
        got = {yid: ledger.get(f"{yid}_0_10000") for yid in routes}
    for yid, (_, status, reason, attempts) in routes.items():
        e = got[yid]
        assert (e.status, e.reason) == (status, reason), (yid, e.message)
        assert e.attempts == attempts, (yid, e.attempts)   # real requests, a retry that succeeded included
        if status != "ok":
            assert e.message, yid  # the tool's own words are kept for the failure
    assert routes["flaky429xAA"][0].served > 1  # the 429 was retried, and the retry got the file
    ok = {y for y, (_, s, *_x) in routes.items() if s == "ok"}
    # The build went on past every failure: all ok clips are in the shards, with their real durations.
    durations = {}
    for shard in sorted((out / "shards" / "test").glob("*.tar")):
        with tarfile.open(shard) as tf:
            for ti in tf:
                if ti.name.endswith(".json"):
                    meta = json.loads(tf.extractfile(ti).read())
                    durations[meta["youtube_id"]] = meta["duration"]
    assert set(durations) == ok and result.counts["ok"] == len(ok)
    assert durations["fourKxxxxAA"] == pytest.approx(2.0, abs=0.1)
    assert durations["variableFAA"] == pytest.approx(10.0, abs=0.3)
    # The truncated download is not kept: the next run fetches it again (here, whole) and makes a sample.
    assert not (out / "media" / "truncatedAA_0_10000.mp4").exists()
    assert "declares 10.00 s" in got["truncatedAA"].message
    routes["truncatedAA"][0].body = None
    routes["truncatedAA"][0].file = src
    routes["stalledxxAA"][0].stall_s = 0        # (the rerun also retries the other transient failures)
    hits = routes["truncatedAA"][0].served
    run_build(cfg)
    with Ledger(out / "ledger.sqlite", "test") as ledger:
        e = ledger.get("truncatedAA_0_10000")
    assert e.status == "ok" and routes["truncatedAA"][0].served > hits and e.attempts == 3


def test_truncated_file_in_media_dir_is_a_permanent_failure(tmp_path):
    """A user's own file that ends early will not get better by running again: failed-permanent truncated."""
    media = tmp_path / "media"
    media.mkdir()
    src = make_media(tmp_path / "src.mp4", MediaSpec(10, width=160, height=120, tone_hz=500))
    data = src.read_bytes()
    (media / "truncMedia1_0.mp4").write_bytes(data[: len(data) // 2])
    short = make_media(media / "shortMedia1_0.mp4", MediaSpec(4, width=160, height=120))   # honest 4 s
    assert short.is_file()
    csv = _write_csv(tmp_path / "m.csv", [("truncMedia1", 0), ("shortMedia1", 0)])
    cfg = BuildConfig(csv=[csv], split="test", out=tmp_path / "out", media_dir=media, max_failure_rate=1.0,
                      extract=ExtractConfig(frames=FRAMES))
    result = run_build(cfg)
    with Ledger(tmp_path / "out" / "ledger.sqlite", "test") as ledger:
        trunc, ok = ledger.get("truncMedia1_0_10000"), ledger.get("shortMedia1_0_10000")
    assert (trunc.status, trunc.reason) == ("failed-permanent", "truncated"), trunc.message
    assert (ok.status, ok.reason) == ("ok", None) and result.counts["ok"] == 1
    assert (media / "truncMedia1_0.mp4").is_file()    # the user's file is never deleted
