"""A careful but hostile user against the build: media links, CSV quotes, signals, two builds at once, windows
past the end, damaged media, ids repeated across files, a build's own media cache as --media-dir, a read-only
--out. Real ffmpeg, yt-dlp over the loopback media server, Prefect's temporary server, real signals and mounts.
"""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest

from pipeline import orchestrate as flows
from pipeline.audit_checks import run_audit
from pipeline.audit_report import AuditConfig
from pipeline.build import BuildConfig, BuildError, run_build
from pipeline.clip_list import ClipListError, read_clip_list, read_clip_lists
from pipeline.download import DownloadConfig
from pipeline.extract import ExtractConfig, extract_clip
from pipeline.ledger import Ledger
from shards.hashing import file_sha256
from shards.sample_format import decode_flac
from shards.writer import split_samples
from tests.mounts import mounted_tmpfs
from tests.media import MediaSpec, Route, make_media

REPO = Path(__file__).resolve().parent.parent
FRAMES = 4


def _csv(path: Path, rows: list[tuple[str, int]], first_id: int = 700000) -> Path:
    lines = ["audiocap_id,youtube_id,start_time,caption"]
    lines += [f"{first_id + i},{yid},{start},clip {i} makes a steady tone" for i, (yid, start) in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _cfg(csv: Path, out: Path, **kw) -> BuildConfig:
    return BuildConfig(csv=[csv], split="test", out=out, max_failure_rate=1.0, extract=ExtractConfig(frames=FRAMES),
                       **kw)


def _ledger(out: Path) -> dict:
    with Ledger(out / "ledger.sqlite", "test") as ledger:
        return {e.key: e for e in ledger.entries()}


def _meta(out: Path, key: str) -> dict:
    return split_samples(out, "test").meta(key)


def _shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "shards" / "test").glob("*.tar"))}


# ----------------------------------------------------------------------------------- 2: media identity

def test_a_linked_whole_video_is_cut_at_its_start_time_and_the_audit_rederives_the_offset(tmp_path):
    """git-annex / DVC layouts: `{id}.mp4` is a symlink into a store whose names say nothing; hard links and a
    symlinked --media-dir are plain files too. The offset comes from the name the user gave."""
    store = tmp_path / "annex" / "objects"
    blob_a = make_media(store / "SHA256E-s1--aaaa.mp4", MediaSpec(16, width=96, height=72, tone_hz=300))
    blob_b = make_media(store / "SHA256E-s1--bbbb.mp4", MediaSpec(16, width=96, height=72, tone_hz=900))
    media = tmp_path / "media"
    media.mkdir()
    (media / "linkedVidAA.mp4").symlink_to(blob_a)
    os.link(blob_b, media / "hardlinkVBB.mp4")
    linked_dir = tmp_path / "linked-media"
    linked_dir.symlink_to(media, target_is_directory=True)
    out = tmp_path / "out"
    result = run_build(_cfg(_csv(tmp_path / "c.csv", [("linkedVidAA", 5), ("hardlinkVBB", 5)]), out,
                       media_dir=linked_dir))
    assert result.counts["ok"] == 2, result.reasons
    for yid, blob in (("linkedVidAA", blob_a), ("hardlinkVBB", blob_b)):
        key = f"{yid}_5000_15000"
        sample = split_samples(out, "test").sample(key)
        wav, _ = decode_flac(sample.members["flac"], f"{key}.flac")
        assert (wav == extract_clip(blob, 5, ExtractConfig(frames=FRAMES)).waveform).all(), f"{key}: wrong window"
        assert sample.meta["media_offset"] == 5.0 and sample.meta["media_sha256"] == file_sha256(blob)
        assert _ledger(out)[key].media_sha256 == file_sha256(blob)
    assert run_audit(AuditConfig(out, sample=-1)).ok

    # The same bytes under a cut clip's name would be cut at 0: the audit derives that and fails.
    (media / "linkedVidAA.mp4").unlink()
    (media / "linkedVidAA_5.mp4").symlink_to(blob_a)
    report = run_audit(AuditConfig(out, sample=-1))
    assert [(m.check, m.target) for m in report.mismatches if m.check == "media-offset"] == \
        [("media-offset", "linkedVidAA_5000_15000")], report.mismatches


# ----------------------------------------------------------------------------------- 3 and 12: CSV

def test_an_open_quote_is_an_error_with_file_and_line_not_rows_swallowed(tmp_path):
    rows = ["audiocap_id,youtube_id,start_time,caption", "1,quoteClipAA,0,a dog barks",
            '2,quoteClipBB,0,"a caption whose quote never closes', "3,quoteClipCC,0,rain falls",
            "4,quoteClipDD,0,a car passes"]
    never = tmp_path / "never.csv"
    never.write_text("\n".join(rows) + "\n")
    with pytest.raises(ClipListError, match=rf"{never}:3: .*quote"):
        read_clip_list(never, "test")
    # Closed three lines later: the csv module would read one field holding two rows.
    later = tmp_path / "later.csv"
    later.write_text("\n".join(rows[:4] + ['4,quoteClipDD,0,a car passes"', "5,quoteClipEE,0,wind"]) + "\n")
    with pytest.raises(ClipListError, match=rf"{later}:3: a quoted field opened on line 3 .*line 4: '3,quoteClipCC"):
        read_clip_list(later, "test")
    # A quoted caption may hold a line break that is not a row.
    fine = tmp_path / "fine.csv"
    fine.write_text("\n".join(rows[:2] + ['2,quoteClipBB,0,"two\nlines, of text"']) + "\n")
    assert [c.captions for c in read_clip_list(fine, "test").clips][1] == ["two\nlines, of text"]
    with pytest.raises(BuildError, match=rf"{never}:3"):
        run_build(_cfg(never, tmp_path / "out"))


def test_an_audiocap_id_repeated_in_another_csv_is_reported_like_within_one(tmp_path):
    a = _csv(tmp_path / "a.csv", [("crossFileAA", 0), ("crossFileBB", 0)], first_id=7)
    b = tmp_path / "b.csv"
    b.write_text("audiocap_id,youtube_id,start_time,caption\n"
                 "7,crossFileAA,0,clip 0 makes a steady tone\n"     # the same row again: merged, no error
                 "8,crossFileCC,0,another clip under id 8\n")       # id 8 is crossFileBB's in a.csv
    r = read_clip_lists([a, b], "test")
    assert [str(e) for e in r.errors] == [f"{b}:3: audiocap_id 8 is already used on line 3 of {a} for another "
                                          "clip or caption; the first is kept"]
    assert sorted(c.youtube_id for c in r.clips) == ["crossFileAA", "crossFileBB"]


# ----------------------------------------------------------------------------------- 10 and 13: downloads

@pytest.fixture(scope="module")
def cache_build(media_server, tmp_path_factory):
    """One download build: a clip at 0 and one whose window starts at 99999 s of a 10 s video."""
    root = tmp_path_factory.mktemp("cache_build")
    video = make_media(root / "v.mp4", MediaSpec(10, width=96, height=72, tone_hz=640))
    for yid in ("cacheClipAA", "pastEndClip"):
        media_server.routes[f"/cache/{yid}.mp4"] = Route(file=video)
    csv = _csv(root / "c.csv", [("cacheClipAA", 0), ("pastEndClip", 99999)])
    out = root / "out"
    cfg = _cfg(csv, out, download=DownloadConfig(url_template=media_server.url_template("/cache/"),
                                                 max_retries=1, backoff_base_s=0.01, workers=2))
    run_build(cfg)
    return cfg, video


def test_a_window_past_the_end_is_a_permanent_failure_and_not_downloaded_again(cache_build, media_server, tmp_path):
    cfg, video = cache_build
    e = _ledger(cfg.out)["pastEndClip_99999000_100009000"]
    assert (e.status, e.reason) == ("failed-permanent", "start-past-end"), e.message
    assert "99999" in e.message and e.attempts == 1
    hits = media_server.routes["/cache/pastEndClip.mp4"].served
    run_build(cfg)
    assert media_server.routes["/cache/pastEndClip.mp4"].served == hits   # not tried again
    # The whole video in a --media-dir: the extract stage says the same.
    media = tmp_path / "media"
    media.mkdir()
    (media / "pastEndClip.mp4").symlink_to(video)
    out = tmp_path / "out"
    run_build(_cfg(_csv(tmp_path / "c.csv", [("pastEndClip", 99999)]), out, media_dir=media))
    e = _ledger(out)["pastEndClip_99999000_100009000"]
    assert (e.status, e.reason) == ("failed-permanent", "start-past-end"), e.message


def test_media_dir_reads_a_builds_own_media_cache_and_a_missing_one_is_an_error(cache_build, tmp_path, capsys):
    cfg, _ = cache_build
    out = tmp_path / "out"
    result = run_build(_cfg(cfg.csv[0], out, media_dir=cfg.out / "media"))
    assert _ledger(out)["cacheClipAA_0_10000"].status == "ok" and result.counts["ok"] == 1
    assert _shards(out) == _shards(cfg.out)          # the same samples, byte for byte
    assert _meta(out, "cacheClipAA_0_10000")["media_offset"] == 0.0
    missing = tmp_path / "no-such-dir"
    code = flows.main(["build", "--no-prefect", "--split", "test", "--csv", str(cfg.csv[0]), "--out",
                       str(tmp_path / "out2"), "--media-dir", str(missing)])
    assert code == flows.EXIT_ERROR
    assert f"--media-dir {missing}: no such directory" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()


# ----------------------------------------------------------------------------------- 11: damaged media

def _damage_video_packets(src: Path, dst: Path) -> Path:
    """32 random bytes at the start of the slice data of three P-frame packets: h264 conceals the damaged
    macroblocks and says so; the audio and the frame count stay whole."""
    info = json.loads(subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
                                      "packet=pos,size,flags", "-of", "json", str(src)],
                                     capture_output=True, check=True, timeout=60).stdout)
    packets = [p for p in info["packets"] if "K" not in p["flags"] and int(p["size"]) > 200]
    data = bytearray(src.read_bytes())
    for k in range(3):
        at = int(packets[(k + 1) * len(packets) // 4]["pos"]) + 8
        data[at:at + 32] = random.Random(k).randbytes(32)
    dst.write_bytes(bytes(data))
    return dst


def test_decode_errors_keep_a_sample_only_when_complete_and_are_recorded(tmp_path):
    media = tmp_path / "media"
    src = make_media(tmp_path / "src.mp4", MediaSpec(6, width=160, height=120, tone_hz=500))
    data = src.read_bytes()
    mid = len(data) // 2
    (media / "garbageClip_0.mp4").parent.mkdir()
    (media / "garbageClip_0.mp4").write_bytes(data[:mid] + random.Random(0).randbytes(20_000) + data[mid + 20_000:])
    _damage_video_packets(src, media / "damagedClip_0.mp4")
    (media / "cleanClipAA_0.mp4").symlink_to(src)
    csv = _csv(tmp_path / "c.csv", [("garbageClip", 0), ("damagedClip", 0), ("cleanClipAA", 0)])
    out = tmp_path / "out"
    run_build(_cfg(csv, out, media_dir=media))
    entries = _ledger(out)
    bad = entries["garbageClip_0_10000"]
    assert (bad.status, bad.reason) == ("failed-permanent", "decode-errors"), bad.message
    assert "incomplete" in bad.message and "decode errors" in bad.message
    kept = entries["damagedClip_0_10000"]
    assert kept.status == "ok" and "decode errors" in kept.message and "[h264]" in kept.message, kept.message
    meta = _meta(out, "damagedClip_0_10000")
    assert meta["decode_errors"]["count"] >= 1 and meta["decode_errors"]["first_lines"][0].startswith("[h264]")
    clean = _meta(out, "cleanClipAA_0_10000")
    assert meta["duration"] == clean["duration"] and meta["decoded_frames"] == clean["decoded_frames"]
    assert "decode_errors" not in clean and entries["cleanClipAA_0_10000"].message is None

    strict = tmp_path / "strict"
    csv = _csv(tmp_path / "strict.csv", [("damagedClip", 0), ("cleanClipAA", 0)])
    code = flows.main(["build", "--no-prefect", "--split", "test", "--csv", str(csv), "--out", str(strict),
                       "--media-dir", str(media), "--frames", str(FRAMES), "--strict-decode", "--cpu-workers", "1",
                       "--max-failure-rate", "1", "--no-report"])
    assert code == flows.EXIT_OK
    entries = _ledger(strict)
    assert (entries["damagedClip_0_10000"].status, entries["damagedClip_0_10000"].reason) == \
        ("failed-permanent", "decode-errors")
    assert entries["cleanClipAA_0_10000"].status == "ok"


# ----------------------------------------------------------------------------------- 14: read-only --out

@pytest.fixture
def read_only_fs(tmp_path):
    with mounted_tmpfs(tmp_path / "ro", "ro,size=1m") as mnt:
        yield mnt


def test_a_read_only_out_is_named_as_such(read_only_fs, tmp_path, capsys):
    csv = _csv(tmp_path / "c.csv", [("readOnlyCAA", 0)])
    for out in (read_only_fs, read_only_fs / "new"):
        code = flows.main(["build", "--no-prefect", "--split", "test", "--csv", str(csv), "--out", str(out)])
        err = capsys.readouterr().err
        assert code == flows.EXIT_ERROR, err
        assert f"{out} is on a read-only file system" in err and "Traceback" not in err and "space" not in err
        with pytest.raises(BuildError, match="read-only file system"):
            run_build(_cfg(csv, out))


# ----------------------------------------------------------------------------------- 5: one build at a time

_PAUSED_BUILD = """
import json, logging, pathlib, sys, time
import pipeline.build as b
from pipeline.extract import ExtractConfig
real = b.build_shards
def paused(*a, **k):
    pathlib.Path(sys.argv[1]).write_text("paused")
    while not pathlib.Path(sys.argv[2]).exists():
        time.sleep(0.05)
    return real(*a, **k)
b.build_shards = paused
logging.basicConfig(level=logging.INFO)
kw = json.loads(sys.argv[3])
extract = ExtractConfig(frames=kw.pop("frames"))
b.run_build(b.BuildConfig(**kw, extract=extract))
"""


def test_two_builds_of_one_split_take_turns_and_temps_of_live_writers_survive(tmp_path, capsys):
    media = tmp_path / "media"
    for i, yid in enumerate(("lockClipAAA", "lockClipBBB")):
        make_media(media / f"{yid}_0.mp4", MediaSpec(3, width=96, height=72, tone_hz=300 + 200 * i))
    csv = _csv(tmp_path / "c.csv", [("lockClipAAA", 0), ("lockClipBBB", 0)])
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    # A lock file left by a build that died: taken over.
    (out / ".build-test.lock").write_text(json.dumps({"pid": dead.pid, "host": "x", "started": "earlier"}))
    shards = out / "shards" / "test"
    shards.mkdir(parents=True)
    writer = subprocess.Popen(["sleep", "120"])     # another live writer's temp file, and a dead one's
    live_tmp, dead_tmp = shards / f".test-00000.tar.tmp-{writer.pid}-aaaa", shards / f".x.tar.tmp-{dead.pid}-bbbb"
    live_tmp.write_bytes(b"in flight")
    dead_tmp.write_bytes(b"left by a killed build")
    paused, go = tmp_path / "paused", tmp_path / "go"
    args = ["build", "--no-prefect", "--split", "test", "--csv", str(csv), "--out", str(out), "--media-dir",
            str(media), "--frames", str(FRAMES), "--cpu-workers", "1", "--no-report"]
    first_log = tmp_path / "first.log"
    kw = {"csv": [str(csv)], "split": "test", "out": str(out), "media_dir": str(media), "frames": FRAMES}
    first = subprocess.Popen([sys.executable, "-c", _PAUSED_BUILD, str(paused), str(go), json.dumps(kw)], cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=first_log.open("w"))
    try:
        deadline = time.monotonic() + 120
        while not paused.exists():
            assert first.poll() is None and time.monotonic() < deadline, first_log.read_text()
            time.sleep(0.1)
        assert flows.main(args) == flows.EXIT_ERROR
        err = capsys.readouterr().err
        assert f"split 'test' is being built by pid {first.pid} on " in err and "started 20" in err, err
        assert "--wait-lock" in err

        waited: list = []
        second = threading.Thread(target=lambda: waited.append(run_build(_cfg(csv, out, media_dir=media,
                                                                              wait_lock=True))))
        second.start()
        time.sleep(1.0)
        assert second.is_alive() and not waited       # queued behind the first
        go.write_text("go")
        assert first.wait(timeout=120) == 0
        second.join(timeout=120)
        assert waited and waited[0].counts["ok"] == 2
    finally:
        go.write_text("go")
        if first.poll() is None:
            first.kill()
        first.wait()
        writer.kill()
        writer.wait()
    assert f"taking over the build lock {out / '.build-test.lock'} of pid {dead.pid}" in first_log.read_text()
    assert live_tmp.exists() and not dead_tmp.exists()
    assert len(_shards(out)) >= 1


# ----------------------------------------------------------------------------------- 4: signals

def _processes_tagged(tag: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("AVCAP_TEST_TAG") == tag:
                found.append(p)
        except psutil.Error:
            pass
    return found


def test_ctrl_c_stops_a_prefect_build_leaves_nothing_behind_and_a_rerun_continues(media_server, tmp_path):
    video = make_media(tmp_path / "v.mp4", MediaSpec(10, width=96, height=72))
    route = media_server.routes["/sig/stalledClip.mp4"] = Route(file=video, stall_s=300)
    csv = _csv(tmp_path / "c.csv", [("stalledClip", 0)])
    out = tmp_path / "out"
    tag = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}   # Prefect's temporary server
    env.update(PYTHONPATH=str(REPO), AVCAP_TEST_TAG=tag)
    build = subprocess.Popen([sys.executable, "flows.py", "build", "--split", "test", "--csv", str(csv), "--out",
                              str(out), "--url-template", media_server.url_template("/sig/"), "--frames",
                              str(FRAMES), "--clip-timeout", "300", "--no-report"],
                             cwd=REPO, env=env, start_new_session=True, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while media_server.hits["/sig/stalledClip.mp4"] == 0:
            assert build.poll() is None and time.monotonic() < deadline, "the build never reached its download"
            time.sleep(0.2)
        server = [p for p in _processes_tagged(tag) if "uvicorn" in " ".join(p.cmdline())]
        assert len(server) == 1
        port = int(server[0].cmdline()[server[0].cmdline().index("--port") + 1])
        os.killpg(build.pid, signal.SIGINT)        # what Ctrl-C in a terminal does
        t = time.monotonic()
        code = build.wait(timeout=60)
        stopped_s = time.monotonic() - t
    finally:
        if build.poll() is None:
            os.killpg(build.pid, signal.SIGKILL)
    err = build.stderr.read()
    assert code == 130, err[-3000:]
    assert stopped_s < 30, stopped_s
    assert "build interrupted by SIGINT: finished clips are kept; run the same command again" in err
    assert "Traceback" not in err
    time.sleep(0.5)
    assert _processes_tagged(tag) == []            # no yt-dlp worker, no temporary server
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "the temporary server still listens"
    # The rerun continues: the clip is still to do, and now gets its sample.
    assert _ledger(out)["stalledClip_0_10000"].status == "pending"
    route.stall_s = 0
    result = run_build(_cfg(csv, out, download=DownloadConfig(url_template=media_server.url_template("/sig/"))))
    assert result.counts["ok"] == 1


_SLOW_TO_STOP = """
import subprocess, sys, time
from pipeline import orchestrate as flows
with flows._stoppable():
    try:
        print("ready", flush=True)
        time.sleep(60)
    except KeyboardInterrupt:
        child = subprocess.Popen(["sleep", "60"])
        print(child.pid, flush=True)
        time.sleep(60)              # a cleanup that hangs
"""


def test_a_second_ctrl_c_always_ends_the_build_and_its_children(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_TO_STOP], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        os.killpg(proc.pid, signal.SIGINT)
        child = int(proc.stdout.readline())
        os.kill(proc.pid, signal.SIGINT)           # to the build alone: its child must go because of it
        assert proc.wait(timeout=10) == 130
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "second SIGINT" in proc.stderr.read()
    time.sleep(0.2)
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
