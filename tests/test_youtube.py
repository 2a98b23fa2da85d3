"""Downloads as YouTube needs them now, against the real yt-dlp and the real deno, and never YouTube itself: the
site's answers come from a yt-dlp extractor plugin that only these tests load (tests/ytdlp_plugins), over the
loopback media server. Builds that name a YouTube URL go through a dead loopback proxy, so even a bug could not
send a request out.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import io

import numpy as np
import pytest
from PIL import Image

from pipeline import orchestrate as flows
from pipeline.clip_list import Clip
from pipeline.doctor import ejs_version, js_runtime_info, run_checks
from pipeline.download import (DownloadConfig, RequestPacer, classify_error, download_clip, download_many,
                               expected_hours)
from pipeline.extract import ExtractConfig, extract_clip
from pipeline.ledger import Ledger
from shards.manifest import load_dataset_manifest, redact
from tests.media import MediaSpec, Route, make_media
from tests.ytdlp_messages import LOGIN_HINT, MESSAGES, SOURCE_FRAGMENTS

REPO = Path(__file__).resolve().parent.parent
PLUGINS = REPO / "tests" / "ytdlp_plugins"
IDS = ("AAAAAAAAAAA", "BBBBBBBBBBB", "CCCCCCCCCCC")
DEAD_PROXY = "http://127.0.0.1:9"   # discard port: nothing listens, nothing leaves the machine


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    """The test plugin switched on for this process's download children; returns its state directory."""
    state = tmp_path / "stand-in"
    state.mkdir()
    monkeypatch.setenv("AVCAP_STAND_IN", str(state))
    monkeypatch.setenv("PYTHONPATH", f"{PLUGINS}:{REPO}")
    return state


def _log(state: Path) -> list[dict]:
    p = state / "log.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


@pytest.fixture(scope="module")
def site(media_server, tmp_path_factory):
    """Three 10 s videos under /yt/{id}.mp4 and their AudioCaps CSV."""
    root = tmp_path_factory.mktemp("yt")
    for i, yid in enumerate(IDS):
        src = make_media(root / f"{yid}.mp4", MediaSpec(10, width=160, height=120, fps=5, tone_hz=300 + 200 * i))
        media_server.routes[f"/yt/{yid}.mp4"] = Route(file=src)
    csv = root / "clips.csv"
    csv.write_text("audiocap_id,youtube_id,start_time,caption\n"
                   + "".join(f"{i + 1},{yid},0,a tone number {i}\n" for i, yid in enumerate(IDS)))
    return media_server.url_template("/yt/"), csv


def _build(site, out, *extra) -> int:
    template, csv = site
    return flows.main(["build", "--split", "test", "--csv", str(csv), "--out", str(out), "--url-template", template,
                       "--samples-per-shard", "2", "--frames", "2", "--cpu-workers", "1", "--download-workers", "1",
                       "--max-retries", "0", "--no-report", "--no-prefect", *extra])


def _shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "shards" / "test").glob("*.tar"))}


def _statuses(out: Path) -> dict[str, str]:
    with Ledger(out / "ledger.sqlite", "test") as ledger:
        return {e.youtube_id: e.status for e in ledger.entries()}


@pytest.fixture(scope="module")
def reference(site, tmp_path_factory):
    """An uninterrupted build, with a secret-looking extractor arg (ignored by the generic extractor)."""
    out = tmp_path_factory.mktemp("ref")
    assert _build(site, out, "--extractor-args", "youtube:po_token=web.gvs+SECRETTOKEN;player_client=web") == 0
    return out


# ------------------------------------------------------------------------------------------ JS runtime

def test_the_configured_youtubedl_finds_deno_and_the_ejs_scripts():
    deno = Path(sys.executable).parent / "deno"   # the deno package's binary, beside the venv's python
    version = re.match(r"deno (\S+)", subprocess.run([str(deno), "--version"], capture_output=True, text=True,
                                                      check=True).stdout).group(1)
    info = js_runtime_info(DownloadConfig())
    assert (info.name, info.version, info.supported) == ("deno", version, True)
    assert Path(info.path).resolve() == deno.resolve()
    assert ejs_version() == "0.8.0"
    missing = js_runtime_info(DownloadConfig(js_runtime="deno:/nonexistent/deno"))
    assert missing is None
    with pytest.raises(ValueError, match="must be one of deno, node, quickjs, bun"):
        DownloadConfig(js_runtime="rhino")


def test_doctor_with_and_without_a_js_runtime(tmp_path, capsys):
    assert flows.main(["doctor", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    info = js_runtime_info(DownloadConfig())
    assert f"js-runtime  deno {info.version}" in out and "yt-dlp-ejs 0.8.0" in out
    assert re.search(r"yt-dlp\s+2026\.10\.26, released 2026-10-26", out)
    assert re.search(r"ffmpeg\s+\S+", out) and "GiB free under" in out and "a build can start" in out
    assert "250 downloads/hour" in out   # a guest's pace for YouTube without cookies

    assert flows.main(["doctor", "--js-runtime", "deno:/nonexistent/deno"]) == 1
    cap = capsys.readouterr()
    assert re.search(r"FAIL\s+js-runtime\s+deno:/nonexistent/deno not found", cap.out)
    assert "pip install 'yt-dlp[default,deno]'" in cap.out and "would stop" in cap.err
    # --allow-no-js, or a template that is not YouTube, turns the missing runtime into a warning.
    assert flows.main(["doctor", "--js-runtime", "deno:/nonexistent/deno", "--allow-no-js"]) == 0
    assert re.search(r"WARN\s+js-runtime", capsys.readouterr().out)


def test_doctor_reads_cookies_without_printing_them(tmp_path, capsys):
    cookies = tmp_path / "cookies.txt"
    cookies.write_text("# Netscape HTTP Cookie File\n"
                       f".youtube.com\tTRUE\t/\tTRUE\t{int(time.time()) + 86400 * 30}\tSID\tVALUE-NOT-TO-PRINT\n"
                       ".youtube.com\tTRUE\t/\tTRUE\t1000000000\tOLD\tEXPIRED-VALUE\n")
    assert flows.main(["doctor", "--cookies", str(cookies)]) == 0
    out = capsys.readouterr().out
    assert "1 of 2 youtube.com cookies unexpired" in out and "VALUE" not in out
    assert "1000 downloads/hour" in out   # an account's pace
    cookies.write_text("not a cookies file\n")
    assert flows.main(["doctor", "--cookies", str(cookies)]) == 1
    assert "is not a Netscape cookies file" in capsys.readouterr().out


def test_doctor_warns_when_the_pinned_ytdlp_is_old():
    old = {c.name: c for c in run_checks(DownloadConfig(), today=date(2027, 1, 30)).checks}["yt-dlp"]
    assert old.status == "warn" and "96 days ago" in old.detail and "pip install -U yt-dlp" in old.detail
    fresh = {c.name: c for c in run_checks(DownloadConfig(), today=date(2026, 11, 1)).checks}["yt-dlp"]
    assert fresh.status == "ok"


def test_youtube_build_without_js_runtime_stops_before_any_download(tmp_path, capsys, caplog):
    csv = tmp_path / "c.csv"
    csv.write_text("audiocap_id,youtube_id,start_time,caption\n"
                   + "".join(f"{i},{y},0,a sound\n" for i, y in enumerate(IDS)))
    out = tmp_path / "o"
    rc = flows.main(["build", "--split", "test", "--csv", str(csv), "--out", str(out), "--no-prefect",
                     "--no-report", "--js-runtime", "deno:/nonexistent/deno", "--proxy", DEAD_PROXY])
    assert rc == 1
    err = capsys.readouterr().err
    assert "preflight failed: js-runtime: deno:/nonexistent/deno not found" in err and "pip install" in err
    assert set(_statuses(out).values()) == {"pending"}
    assert not (out / "media").exists()
    # The preflight in short, and the expected duration at a guest's pace.
    assert "preflight: yt-dlp: 2026.10.26" in caplog.text
    assert "download: 3 clips, at most 250/hour: expected 1 min or more" in caplog.text


# ------------------------------------------------------------------------------------------ classifier

def test_classifier_table_of_real_ytdlp_messages():
    import yt_dlp
    from yt_dlp import YoutubeDL
    from yt_dlp.extractor.youtube import YoutubeIE

    with YoutubeDL({"quiet": True}) as ydl:
        assert YoutubeIE(ydl)._youtube_login_hint == LOGIN_HINT
    source = "\n".join(p.read_text(errors="replace") for p in Path(yt_dlp.__file__).parent.rglob("*.py"))
    missing = [f for f in SOURCE_FRAGMENTS if f not in source]
    assert not missing, f"the pinned yt-dlp no longer says: {missing}"
    wrong = {m: (classify_error(m), (k, r)) for m, k, r in MESSAGES if classify_error(m) != (k, r)}
    assert not wrong, wrong
    # A WARNING line alone never makes a clip permanent, whatever it says.
    for message, _, _ in MESSAGES:
        warned = "\n".join("WARNING: " + line for line in message.splitlines())
        assert classify_error(warned) == ("transient", "unknown-error"), warned


# ------------------------------------------------------------------------------------------ stops and pacing

def test_rate_limit_stops_the_build_and_a_rerun_finishes_it(site, reference, stand_in, tmp_path, capsys):
    ref = _shards(reference)
    manifest = load_dataset_manifest(reference / "manifest.json").splits["test"]
    assert manifest.tool_versions["js-runtime"].startswith("deno ")   # the runtime the build passed to yt-dlp
    assert manifest.tool_versions["yt-dlp-ejs"] == "0.8.0"
    config = json.dumps(manifest.config)
    assert "po_token=***" in config and "SECRETTOKEN" not in config and "player_client=web" in config

    (stand_in / "limited.json").write_text(json.dumps({IDS[1]: -1}))
    out = tmp_path / "o"
    assert _build(site, out) == flows.EXIT_RATE_LIMIT
    assert "build stopped at a rate limit" in capsys.readouterr().err
    assert _statuses(out) == {IDS[0]: "ok", IDS[1]: "pending", IDS[2]: "pending"}
    assert [e["id"] for e in _log(stand_in)] == [IDS[0], IDS[1]]       # the third was never tried

    (stand_in / "limited.json").unlink()                                 # the hour is over
    assert _build(site, out) == 0
    assert set(_statuses(out).values()) == {"ok"}
    assert _shards(out) == ref
    # One cache for the whole build: the rerun's children found what the first run's stored.
    assert (out / ".cache" / "yt-dlp" / "avcap-stand-in").is_dir()
    assert _log(stand_in)[-1]["cache_seen"] == [IDS[0], IDS[1], IDS[1]]


def test_rate_limit_wait_pauses_all_workers_and_goes_on(site, reference, stand_in, tmp_path, caplog):
    (stand_in / "limited.json").write_text(json.dumps({IDS[1]: 1}))     # limited once, then fine
    out = tmp_path / "o"
    t0 = time.monotonic()
    assert _build(site, out, "--on-rate-limit", "wait", "--rate-limit-pause", "1.5") == 0
    assert time.monotonic() - t0 >= 1.5
    assert "all downloads pause for 1.5 s" in caplog.text
    assert set(_statuses(out).values()) == {"ok"}
    assert [e["id"] for e in _log(stand_in)] == [IDS[0], IDS[1], IDS[1], IDS[2]]
    assert _shards(out) == _shards(reference)


def test_http_429_through_every_retry_is_a_rate_limit(media_server, tmp_path):
    media_server.routes["/busy/DDDDDDDDDDD.mp4"] = Route(status=429, reason="Too Many Requests")
    cfg = DownloadConfig(url_template=media_server.url_template("/busy/"), max_retries=1, backoff_base_s=0.01,
                         workers=1)
    batch = download_many([Clip("DDDDDDDDDDD", 0), Clip("EEEEEEEEEEE", 0)], cfg, tmp_path)
    assert batch.rate_limit is not None and "HTTP 429 after 2 attempts" in str(batch.rate_limit)
    assert batch.results == {} and batch.untried == ["DDDDDDDDDDD_0_10000", "EEEEEEEEEEE_0_10000"]


def test_a_run_of_no_formats_stops_the_stage(site, tmp_path):
    template, _ = site
    # A height no file has: the real "Requested format is not available" from yt-dlp's format selection.
    cfg = DownloadConfig(url_template=template, format="b[height>=5000]", max_retries=0, workers=1,
                         no_formats_streak=2)
    batch = download_many([Clip(y, 0) for y in IDS], cfg, tmp_path)
    assert [r.reason for r in batch.results.values()] == ["no-formats", "no-formats"]
    assert all(r.status == "failed-transient" for r in batch.results.values())
    assert "JavaScript runtime" in batch.results[f"{IDS[0]}_0_10000"].message
    assert "2 clips in a row failed with no usable format" in str(batch.bot_wall)
    assert batch.untried == [f"{IDS[2]}_0_10000"]


def test_shared_cache_across_download_children(site, stand_in, tmp_path):
    template, _ = site
    cfg = DownloadConfig(url_template=template, workers=2, cache_dir=tmp_path / "cache", max_retries=0)
    batch = download_many([Clip(IDS[0], 0)], cfg, tmp_path / "m")
    batch2 = download_many([Clip(IDS[1], 0)], cfg, tmp_path / "m")
    assert {r.status for r in (*batch.results.values(), *batch2.results.values())} == {"ok"}
    assert [(e["id"], e["cache_seen"]) for e in _log(stand_in)] == [(IDS[0], []), (IDS[1], [IDS[0]])]


def test_token_bucket_paces_all_workers_and_pauses():
    now = [0.0]
    slept = []

    def sleep(s):
        slept.append(s)
        now[0] += s

    pacer = RequestPacer(per_hour=3600, burst=2, clock=lambda: now[0], sleep=sleep)
    starts = []
    for _ in range(5):
        pacer.wait()
        starts.append(now[0])
    assert starts == pytest.approx([0, 0, 1, 2, 3])          # a burst of 2, then one a second
    pacer.pause(10)
    pacer.wait()
    assert now[0] == pytest.approx(13)
    assert expected_hours(500, DownloadConfig(max_per_hour=250)) == 2.0
    assert expected_hours(500, DownloadConfig()) is None


def test_retry_reason_requeues_only_that_reason(tmp_path):
    with Ledger(tmp_path / "l.sqlite", "test") as ledger:
        clips = [Clip(y, 0) for y in IDS]
        ledger.upsert_pending(clips)
        ledger.record(clips[0].key, "failed-permanent", "login-required", "x")
        ledger.record(clips[1].key, "failed-permanent", "private", "x")
        ledger.record(clips[2].key, "ok")
        assert ledger.keys_to_process() == []
        assert ledger.keys_to_process(retry_reasons=["login-required", "drm"]) == [clips[0].key]
        assert len(ledger.keys_to_process(retry_permanent=True)) == 2
    a = flows.make_parser().parse_args(["build", "--split", "test", "--out", "o", "--retry-reason",
                                        "login-required,drm", "--retry-reason", "geo-restricted"])
    assert flows.build_params_from_args(a).retry_reasons() == ["login-required", "drm", "geo-restricted"]


def test_extractor_args_go_through_ytdlps_parser_and_are_redacted():
    cfg = DownloadConfig(extractor_args=("youtube:player_client=web,tv;po_token=web.gvs+SECRET",))
    assert cfg.ytdlp_options()["extractor_args"] == {
        "youtube": {"player_client": ["web", "tv"], "po_token": ["web.gvs+SECRET"]}}
    assert "SECRET" not in json.dumps(redact(list(cfg.extractor_args)))
    with pytest.raises(ValueError, match="IE_KEY:ARG=VALUE"):
        DownloadConfig(extractor_args=("player_client=web",))


# ------------------------------------------------------------------------------------------ exact windows

def _psnr(a: bytes, b: bytes) -> float:
    x = np.asarray(Image.open(io.BytesIO(a)).convert("RGB"), dtype=np.float64)
    y = np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), dtype=np.float64)
    mse = np.mean((x - y) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse)


def test_section_download_starts_exactly_at_start_time_between_keyframes(media_server, tmp_path):
    # Keyframes every 5 s; the windows start 2 s and 3 s after one (a stream copy cut at the keyframe would be
    # 2-3 s early).
    src = make_media(tmp_path / "kf.mp4", MediaSpec(20, width=320, height=240, fps=25, keyframe_s=5,
                                                   noise_seed=7))
    media_server.routes["/kf/FFFFFFFFFFF.mp4"] = Route(file=src)
    cfg = DownloadConfig(url_template=media_server.url_template("/kf/"), max_retries=0)
    ecfg = ExtractConfig(frames=4)
    aac_frame = 1024 / 44100 * ecfg.sample_rate          # one AAC frame of the source, in output samples
    for start in (7, 8):
        r = download_clip(Clip("FFFFFFFFFFF", start), cfg, tmp_path / "m")
        assert r.status == "ok", r
        got = extract_clip(r.path, 0.0, ecfg)
        exact = extract_clip(src, float(start), ecfg)
        a = got.waveform.astype(np.float64)
        b = exact.waveform.astype(np.float64)
        n = min(len(a), len(b))
        a, b = a[:n], b[:n]
        corr = np.fft.irfft(np.fft.rfft(a, 2 * n) * np.conj(np.fft.rfft(b, 2 * n)))
        lag = int(np.argmax(np.abs(corr)))
        lag = lag - 2 * n if lag > n else lag
        assert abs(lag) <= aac_frame, f"start {start}: audio is {lag} samples off"
        assert _psnr(got.frames[0], exact.frames[0]) >= 35, f"start {start}: first frame differs"
