"""The demo dataset (demo.media) and its loopback server (demo.server), with real ffmpeg, espeak-ng and yt-dlp."""
from __future__ import annotations

import csv
import json
import re
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from demo.media import (AUDIO_CLASSES, CLIP_SECONDS, DemoMediaConfig, espeak_path, generate_dataset,
                        plan_dataset, render_clip, split_sizes)
from demo.server import MediaServer, parse_range

YOUTUBE_ID = re.compile(r"^[A-Za-z0-9_-]{11}$")
# Words every caption of a class must contain, so the caption really names the content.
CLASS_WORDS = {"low_tone": ("low",), "high_tone": ("high",), "white_noise": ("static",), "fast_beeps": ("fast",),
               "slow_beeps": ("slow",), "speech": ("speaking",), "red": ("red",),
               "green": ("green",), "blue": ("blue",), "square": ("square",), "test_pattern": ("test",),
               "cells": ("cells",)}


def ffprobe(path: Path) -> dict:
    out = subprocess.run(["ffprobe", "-v", "error", "-print_format", "json", "-show_streams", "-show_format",
                          str(path)], capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def frame_rgb(path: Path, at_s: float, size: int = 32) -> np.ndarray:
    raw = subprocess.run(["ffmpeg", "-v", "error", "-ss", str(at_s), "-i", str(path), "-frames:v", "1",
                          "-vf", f"scale={size}:{size}", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                         capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(size, size, 3).astype(np.float32)


def audio_mono(path: Path, start_s: float, dur_s: float, sr: int = 16000) -> np.ndarray:
    raw = subprocess.run(["ffmpeg", "-v", "error", "-ss", str(start_s), "-t", str(dur_s), "-i", str(path),
                          "-vn", "-ac", "1", "-ar", str(sr), "-f", "s16le", "-"], capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.int16).astype(np.float32) / 32768


def dominant_hz(x: np.ndarray, sr: int = 16000) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spec) * sr / len(x))


# ------------------------------------------------------------------------------------------------- plan

def test_plan_is_deterministic_and_audiocaps_shaped():
    cfg = DemoMediaConfig(clips=60, seed=3)
    a, b = plan_dataset(cfg, speech=True), plan_dataset(cfg, speech=True)
    assert [(c.youtube_id, c.start_time, c.captions, c.params) for c in a] == \
           [(c.youtube_id, c.start_time, c.captions, c.params) for c in b]
    other = plan_dataset(DemoMediaConfig(clips=60, seed=4), speech=True)
    assert [c.youtube_id for c in other] != [c.youtube_id for c in a]

    ids = [c.youtube_id for c in a]
    assert len(set(ids)) == len(ids)
    assert all(YOUTUBE_ID.match(i) for i in ids)
    assert any(i.startswith("-") for i in ids)
    assert {s: sum(c.split == s for c in a) for s in ("train", "val", "test")} == split_sizes(60, 0.1, 0.2) \
        == {"train": 42, "val": 6, "test": 12}
    cap_ids = [i for c in a for i in c.audiocap_ids]
    assert len(set(cap_ids)) == len(cap_ids) == 5 * 60
    for c in a:
        assert c.key == f"{c.youtube_id}_{c.start_time * 1000}_{(c.start_time + 10) * 1000}"
        assert len(c.captions) == 5 and len(set(c.captions)) == 5
        for cap in c.captions:
            low = cap.lower()
            assert any(w in low for w in CLASS_WORDS[c.audio]), (c.audio, cap)
            assert any(w in low for w in CLASS_WORDS[c.visual]), (c.visual, cap)
    # Balanced classes: every sound and picture appears, and every class in test is also in train.
    assert {c.audio for c in a} == {x.name for x in AUDIO_CLASSES}
    train = {c.audio for c in a if c.split == "train"} | {c.visual for c in a if c.split == "train"}
    assert all(c.audio in train and c.visual in train for c in a if c.split == "test")


def test_plan_without_speech_and_bad_sizes():
    clips = plan_dataset(DemoMediaConfig(clips=30), speech=False)
    assert "speech" not in {c.audio for c in clips}
    with pytest.raises(ValueError, match="clips=5"):
        split_sizes(5, 0.1, 0.2)


def test_content_accuracy_names_sound_and_picture_separately():
    from demo.media import VISUAL_CLASSES
    from demo.run import content_accuracy

    clips = [c for c in plan_dataset(DemoMediaConfig(clips=40, seed=2), speech=True) if c.split == "test"][:4]
    phrase = {c.name: c.phrases[0] for c in AUDIO_CLASSES + VISUAL_CLASSES}
    wrong_sound = next(a.name for a in AUDIO_CLASSES if a.name != clips[1].audio)
    preds = {clips[0].key: clips[0].captions[0],                                        # both right
             clips[1].key: f"{phrase[wrong_sound]} and {phrase[clips[1].visual]}",      # picture only
             clips[2].key: "a red screen and a green screen"}   # two pictures, no sound: neither counts
    # clips[3] has no prediction: not counted
    acc = content_accuracy(clips, preds)
    assert acc["sound"]["clips"] == acc["picture"]["clips"] == acc["both"]["clips"] == 3
    assert (acc["sound"]["right"], acc["picture"]["right"], acc["both"]["right"]) == (1, 2, 1)
    assert acc["sound"]["per_class"][clips[1].audio][0] <= acc["sound"]["per_class"][clips[1].audio][1]
    assert sum(n for _, n in acc["sound"]["per_class"].values()) == 3


# ------------------------------------------------------------------------------------------------- media

@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    """Eight rendered clips (speech among them when espeak-ng is installed)."""
    return generate_dataset(tmp_path_factory.mktemp("demo-media"), DemoMediaConfig(clips=8, seed=1),
                            progress=False)


def test_dataset_files_csv_and_streams(small_dataset):
    ds = small_dataset
    assert ds.speech == (espeak_path() is not None)
    assert ds.speech or any("espeak-ng" in n for n in ds.notes)
    rows = 0
    for split, path in ds.csv_paths.items():
        raw = path.read_bytes()
        assert raw.startswith(b"audiocap_id,youtube_id,start_time,caption\r\n")
        assert b"\n" not in raw.replace(b"\r\n", b"")
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                rows += 1
                clip = next(c for c in ds.clips if c.youtube_id == row["youtube_id"])
                assert clip.split == split and int(row["start_time"]) == clip.start_time
                assert row["caption"] in clip.captions
    assert rows == 5 * len(ds.clips)

    for clip in ds.clips:
        info = ffprobe(ds.media_dir / clip.filename)
        kinds = {s["codec_type"]: s for s in info["streams"]}
        assert kinds["video"]["codec_name"] == "h264" and kinds["audio"]["codec_name"] == "aac"
        assert (kinds["video"]["width"], kinds["video"]["height"]) == (256, 256)
        assert float(info["format"]["duration"]) == pytest.approx(clip.start_time + CLIP_SECONDS + 1.0, abs=0.15)
    # faststart: the moov atom precedes mdat, so a player (and ffmpeg over HTTP) needs no seek to the end.
    head = (ds.media_dir / ds.clips[0].filename).read_bytes()[:4096]
    assert head.find(b"moov") != -1 and (head.find(b"mdat") == -1 or head.find(b"moov") < head.find(b"mdat"))


def test_pictures_and_sounds_match_their_captions(tmp_path):
    """Render one clip per class and check the content the captions promise, inside the window only."""
    cfg = DemoMediaConfig(clips=60, seed=5)
    plan = plan_dataset(cfg, speech=espeak_path() is not None)
    pick = {}
    for c in plan:  # one clip per class with a start offset, so the grey lead-in is visible too
        if c.start_time >= 1:
            pick.setdefault(("v", c.visual), c)
            pick.setdefault(("a", c.audio), c)
    chosen = {c.youtube_id: c for c in pick.values()}
    for c in chosen.values():
        render_clip(c, cfg, tmp_path, tmp_path)

    for (kind, name), c in pick.items():
        path = tmp_path / c.filename
        if kind == "v":
            before, inside = frame_rgb(path, c.start_time - 0.5), frame_rgb(path, c.start_time + 5)
            assert np.allclose(before, 128, atol=12), f"{c.youtube_id}: lead-in is not grey"
            mean = inside.reshape(-1, 3).mean(0)
            if name in ("red", "green", "blue"):
                assert int(np.argmax(mean)) == ("red", "green", "blue").index(name), (name, mean)
            elif name == "square":
                assert inside.max() > 200 and np.median(inside) < 20  # a white block on black
            elif name == "test_pattern":
                assert inside.reshape(-1, 3).std(0).min() > 40  # many colours
            elif name == "cells":
                grey = inside.mean(-1)
                assert 3 < grey.mean() < 128 and grey.std() > 5, (grey.mean(), grey.std())  # sparse specks
        else:
            silent = audio_mono(path, max(0, c.start_time - 0.9), 0.8)
            sound = audio_mono(path, c.start_time + 2, 4.0)
            assert np.abs(silent).max() < 1e-3, f"{c.youtube_id}: lead-in is not silent"
            rms = float(np.sqrt((sound ** 2).mean()))
            assert rms > 0.05, (name, rms)
            # Each tonal class owns a pitch band, so the classes separate in a log-mel fbank.
            if name == "low_tone":
                assert 100 < dominant_hz(sound) < 270
            elif name == "high_tone":
                assert 2900 < dominant_hz(sound) < 4100
            elif name in ("fast_beeps", "slow_beeps"):
                env = np.abs(sound).reshape(-1, 160).max(1)  # 10 ms envelope
                onsets = int(((env[1:] > 0.05) & (env[:-1] <= 0.05)).sum())
                assert (12 <= onsets <= 21) if name == "fast_beeps" else (3 <= onsets <= 5), (name, onsets)
                assert (1450 < dominant_hz(sound) < 2050) if name == "fast_beeps" else \
                    (350 < dominant_hz(sound) < 650), (name, dominant_hz(sound))
            elif name == "white_noise":
                spec = np.abs(np.fft.rfft(sound)) ** 2
                assert spec[len(spec) // 2:].sum() / spec.sum() > 0.3  # flat: half the power above 4 kHz
            elif name == "speech":
                env = np.abs(sound).reshape(-1, 160).max(1)
                assert (env < 0.01).mean() > 0.02  # speech has pauses a tone does not
    assert any(k[0] == "a" for k in pick) and any(k[0] == "v" for k in pick)
    if espeak_path() is not None:
        assert ("a", "speech") in pick


# ------------------------------------------------------------------------------------------------- server

def test_parse_range():
    assert parse_range(None, 100) is None
    assert parse_range("bytes=0-9", 100) == (0, 9)
    assert parse_range("bytes=90-", 100) == (90, 99)
    assert parse_range("bytes=95-200", 100) == (95, 99)
    assert parse_range("bytes=-10", 100) == (90, 99)
    assert parse_range("bytes=100-", 100) == "unsatisfiable"
    assert parse_range("bytes=5-2", 100) == "unsatisfiable"
    assert parse_range("bytes=0-1,5-6", 100) is None  # multi-range: whole file


def _get(url: str, headers: dict | None = None, method: str = "GET"):
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_server_ranges_head_and_404(small_dataset):
    clip = small_dataset.clips[0]
    data = (small_dataset.media_dir / clip.filename).read_bytes()
    with MediaServer(small_dataset.media_dir) as srv:
        assert srv.host == "127.0.0.1" and srv.port > 0
        url = srv.url(clip.youtube_id)
        assert url == f"http://127.0.0.1:{srv.port}/v/{clip.youtube_id}.mp4"
        status, headers, body = _get(url)
        assert status == 200 and body == data and headers["Content-Type"] == "video/mp4"
        assert headers["Accept-Ranges"] == "bytes"
        status, headers, body = _get(url, {"Range": "bytes=100-199"})
        assert status == 206 and body == data[100:200]
        assert headers["Content-Range"] == f"bytes 100-199/{len(data)}"
        status, _, body = _get(url, {"Range": "bytes=-50"})
        assert status == 206 and body == data[-50:]
        status, headers, _ = _get(url, {"Range": f"bytes={len(data)}-"})
        assert status == 416 and headers["Content-Range"] == f"bytes */{len(data)}"
        status, headers, body = _get(url, method="HEAD")
        assert status == 200 and int(headers["Content-Length"]) == len(data) and body == b""
        assert _get(srv.url("AAAAAAAAAAA"))[0] == 404
        assert _get(f"{srv.base_url}/v/../media.py")[0] == 404
        assert [r.status for r in srv.records] == [200, 206, 206, 416, 200, 404, 404]
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=2)  # stopped: nothing listens any more


def test_ytdlp_downloads_the_window_from_the_server(small_dataset, tmp_path):
    """The real download path (pipeline.download: yt-dlp generic extractor + download ranges) against it."""
    from pipeline.clip_list import read_clip_list
    from pipeline.download import DownloadConfig, download_clip

    clips = [c for s in ("train", "val", "test")
             for c in read_clip_list(small_dataset.csv_paths[s], s).clips]
    assert len(clips) == len(small_dataset.clips)
    clip = max(clips, key=lambda c: c.start_time)  # an offset window: the cut must skip the grey lead-in
    demo_clip = next(c for c in small_dataset.clips if c.youtube_id == clip.youtube_id)
    with MediaServer(small_dataset.media_dir) as srv:
        cfg = DownloadConfig(url_template=srv.url_template, workers=1, max_retries=0, timeout_s=60)
        result = download_clip(clip, cfg, tmp_path)
        assert result.status == "ok", result.message
        assert any(r.method == "GET" and r.status in (200, 206) for r in srv.records)
    duration = float(ffprobe(result.path)["format"]["duration"])
    assert CLIP_SECONDS - 0.2 <= duration <= CLIP_SECONDS + 1.2
    first = frame_rgb(result.path, 0.0)
    if demo_clip.start_time > 0 and demo_clip.visual in ("red", "green", "blue", "square"):
        assert not np.allclose(first, 128, atol=12), "the downloaded window begins in the grey lead-in"


# ------------------------------------------------------------------------------------------------- the demo

def test_quick_demo_end_to_end(tmp_path):
    """The README's first command, shortened: every stage runs for real (build without Prefect, to stay fast)."""
    import sys

    from avcap.checkpoint import load_checkpoint

    out = tmp_path / "demo"
    res = subprocess.run([sys.executable, "-m", "demo.run", "--quick", "--no-prefect", "--out", str(out)],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for n in range(1, 7):
        assert f"[demo {n}/6]" in res.stdout
    assert "generated:" in res.stdout and "reference:" in res.stdout
    assert "CIDEr-D of the best constant caption" in res.stdout
    assert "sound named right:" in res.stdout and "picture named right:" in res.stdout
    gallery = out / "reports" / "gallery-test.html"
    assert res.stdout.rstrip().endswith(str(gallery)) and gallery.is_file()

    summary = json.loads((out / "summary.json").read_text())
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    sizes = split_sizes(12, 0.1, 0.2)
    for split, n in sizes.items():
        assert manifest["splits"][split]["counts"]["ok"] == n, manifest["splits"][split]
    assert len(list((out / "data" / "shards" / "train").glob("train-*.tar"))) >= 1
    assert set(summary["predictions"]) == set(summary["references"]) and len(summary["predictions"]) == sizes["test"]
    assert isinstance(summary["metrics"]["CIDEr"], float) and summary["metrics"]["num_clips"] == sizes["test"]
    train_caps = {row["caption"] for row in csv.DictReader(open(out / "source" / "train.csv", newline=""))}
    assert summary["constant_caption"] in train_caps and summary["constant_cider"] > 0
    assert summary["content"]["sound"]["clips"] == summary["content"]["picture"]["clips"] == sizes["test"]

    ckpt = load_checkpoint(summary["checkpoint"])
    assert ckpt.frames_per_clip == 20 and ckpt.config.depth_a == 2 and ckpt.config.mode == "av"
    assert ckpt.config.patch_size == 32  # the demo's cheap model, not the tiny preset's 16


def test_a_hung_stage_is_stopped_at_its_time_limit(tmp_path):
    """A stage that never ends (here: a sleeping child that also keeps a grandchild) is killed as a group."""
    import sys as _sys
    import time as _time

    from demo.run import DemoError, _run

    cmd = [_sys.executable, "-c",
           "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
           " print('started', flush=True); time.sleep(60)"]
    t0 = _time.monotonic()
    with pytest.raises(DemoError, match="did not finish within 2 s"):
        _run(cmd, "hung stage", tmp_path / "hung.log", timeout_s=2)
    assert _time.monotonic() - t0 < 30
    assert b"started" in (tmp_path / "hung.log").read_bytes()
