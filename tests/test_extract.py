"""pipeline.extract on media made by the real ffmpeg: one decode, frame timing, downmix, failure reasons."""
from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.extract import ExtractConfig, ExtractError, extract_clip
from tests.media import HTML_PAGE, MediaSpec, make_media


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("extract_media")
    out = {
        # 360p-like: 640x360, 25 fps, 44.1 kHz stereo, 12 s so a window starting at 1 s is complete.
        "main": make_media(d / "main.mp4", MediaSpec(12, width=640, height=360, fps=25, tone_hz=1000)),
        "stereo48k": make_media(d / "stereo48k.mp4", MediaSpec(4, sample_rate=48000, channels=2, tone_hz=1000)),
        "short": make_media(d / "short.mp4", MediaSpec(3, tone_hz=700)),
        "noaudio": make_media(d / "noaudio.mp4", MediaSpec(3, audio=False)),
        "novideo": make_media(d / "novideo.m4a", MediaSpec(3, video=False)),
        # A slideshow-like upload: one picture per second.
        "sparse": make_media(d / "sparse.mp4", MediaSpec(10, fps=1, tone_hz=400)),
    }
    (d / "page.mp4").write_bytes(HTML_PAGE)
    out["html"] = d / "page.mp4"
    # Landscape pixels (left red, right blue) with display rotation metadata: shown as portrait.
    raw = d / "rot_raw.mp4"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i",
                    "color=c=red:s=160x240:r=10:d=2[l];color=c=blue:s=160x240:r=10:d=2[r];[l][r]hstack",
                    "-f", "lavfi", "-i", "sine=d=2", "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
                    "-c:a", "aac", str(raw)], check=True)
    # Video stream starting 1 s after the audio (no frame duplication by the muxer: passthrough timestamps).
    out["late"] = d / "late.mp4"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-itsoffset", "1", "-f", "lavfi", "-i",
                    "testsrc2=s=320x240:r=25:d=9", "-f", "lavfi", "-i", "sine=d=10", "-map", "0:v", "-map", "1:a",
                    "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac",
                    "-fps_mode", "passthrough", str(out["late"])], check=True)
    out["rotated"] = d / "rotated.mp4"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(raw), "-c", "copy",
                    "-metadata:s:v:0", "rotate=90", str(out["rotated"])], check=True)
    if "rotation" not in _probe_rotation(out["rotated"]):
        # ffmpeg >= 6 ignores the rotate tag on output; it takes a display rotation on the input instead.
        subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-display_rotation:v:0", "90", "-i", str(raw),
                        "-c", "copy", str(out["rotated"])], check=True)
    assert "rotation" in _probe_rotation(out["rotated"]), "could not make a rotated test video"
    return out


def _probe_rotation(path: Path) -> str:
    return subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
                           "stream_side_data=rotation", "-of", "default=nw=1", str(path)],
                          capture_output=True, text=True).stdout


def _rgb(jpeg: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(jpeg))
    assert img.format == "JPEG" and img.size == (224, 224) and img.mode == "RGB"
    return np.asarray(img)


def _all_frames(path: Path, start: float) -> np.ndarray:
    """Every frame of the window, scaled/cropped like the pipeline: the reference for frame timing."""
    out = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-ss", str(start), "-t", "10", "-i", str(path),
                          "-map", "0:V:0", "-fps_mode", "passthrough",
                          "-vf", "scale=224:224:force_original_aspect_ratio=increase,crop=224:224",
                          "-f", "rawvideo", "-pix_fmt", "rgb24", "-"], capture_output=True, check=True).stdout
    return np.frombuffer(out, np.uint8).reshape(-1, 224, 224, 3).astype(np.float32)


def _nearest(ref: np.ndarray, jpeg: bytes) -> int:
    return int(np.argmin(((ref - _rgb(jpeg).astype(np.float32)) ** 2).mean(axis=(1, 2, 3))))


def test_full_clip_waveform_frames_and_timing(media):
    ex = extract_clip(media["main"], 1, ExtractConfig())
    assert ex.waveform.dtype == np.int16 and ex.waveform.shape == (160000,)
    assert ex.duration == 10.0 and ex.sample_rate == 16000 and ex.decoded_frames == 20
    assert len(ex.frames) == 20 and len(set(ex.frames)) == 20  # testsrc2 changes every frame
    assert ex.frame_times == pytest.approx([(i + 0.5) * 0.5 for i in range(20)])
    # Frame i is the picture on screen at (i + 0.5) * 0.5 s: the last 25 fps frame with pts <= t_i.
    ref = _all_frames(media["main"], 1)
    for i, jpg in enumerate(ex.frames):
        # pts < t_i strictly: at 25 fps t_i = (i + 0.5) * 0.5 s falls between frames, never on one.
        assert _nearest(ref, jpg) == int(np.floor((i + 0.5) * 0.5 * 25)), f"frame {i}"
    # The audio is the tone the media carries, not silence.
    assert np.abs(ex.waveform.astype(np.float32)).max() > 3000


def test_video_starting_late_keeps_frames_on_their_times(media):
    # Video frames exist from 1.0 s: slots at 0.25 and 0.75 s show the first frame, slot i >= 2 the frame on
    # screen at (i + 0.5) * 0.5 s, i.e. reference frame (t_i - 1.0) * 25 rounded down.
    ex = extract_clip(media["late"], 0)
    ref = _all_frames(media["late"], 0)
    got = [_nearest(ref, jpg) for jpg in ex.frames]
    assert got[:2] == [0, 0]
    assert got[2:] == [int(np.floor(((i + 0.5) * 0.5 - 1.0) * 25)) for i in range(2, 20)]


def test_sparse_video_repeats_the_picture_on_screen(media):
    ex = extract_clip(media["sparse"], 0)
    ref = _all_frames(media["sparse"], 0)
    assert len(ref) == 10 and len(ex.frames) == 20
    assert [_nearest(ref, jpg) for jpg in ex.frames] == [i // 2 for i in range(20)]


def test_extraction_is_deterministic(media):
    a = extract_clip(media["main"], 0)
    b = extract_clip(media["main"], 0)
    assert a.frames == b.frames
    assert np.array_equal(a.waveform, b.waveform)


def _tone_amplitude(w: np.ndarray, hz: float, sr: int = 16000) -> float:
    spec = np.abs(np.fft.rfft(w.astype(np.float64) / 32768 * np.hanning(len(w))))
    return spec[int(round(hz * len(w) / sr))] / (np.hanning(len(w)).sum() / 2)


def test_48k_stereo_downmix_and_first_channel(media):
    # Left: 0.4 sin(1000 Hz) (+ small 37 Hz), right: 0.3 sin(500 Hz), see tests.media.make_media.
    mixed = extract_clip(media["stereo48k"], 0, ExtractConfig(downmix="ffmpeg"))
    assert mixed.duration == pytest.approx(4.0, abs=0.05)
    assert _tone_amplitude(mixed.waveform, 1000) == pytest.approx(0.2, rel=0.1)   # (L+R)/2
    assert _tone_amplitude(mixed.waveform, 500) == pytest.approx(0.15, rel=0.1)
    first = extract_clip(media["stereo48k"], 0, ExtractConfig(downmix="first"))
    assert _tone_amplitude(first.waveform, 1000) == pytest.approx(0.4, rel=0.1)
    assert _tone_amplitude(first.waveform, 500) < 0.01


def test_short_clip_kept_with_real_duration_and_repeated_frames(media):
    ex = extract_clip(media["short"], 0)
    assert ex.duration == pytest.approx(3.0, abs=0.05)
    assert len(ex.waveform) == pytest.approx(48000, abs=800)
    assert len(ex.frames) == 20
    # Frames at 0.25, 0.75, ... 2.75 s exist (6); they are spread evenly over the 20 slots, in order.
    assert ex.decoded_frames == 6 and len(set(ex.frames)) == 6
    assert ex.frame_times == sorted(ex.frame_times) and ex.frame_times[-1] == pytest.approx(2.75)


@pytest.mark.parametrize("name,start,reason,needle", [
    ("noaudio", 0, "no-audio-stream", "no audio stream"),
    ("novideo", 0, "no-video-stream", "no video stream"),
    ("html", 0, "undecodable", "Invalid data"),
    ("main", 11.5, "too-short", "0.50 s of audio"),
    ("main", 30, "start-past-end", "the window starts at 30 s"),   # a 12 s video
])
def test_failures_carry_reason_and_ffmpeg_message(media, name, start, reason, needle):
    with pytest.raises(ExtractError) as ei:
        extract_clip(media[name], start)
    assert ei.value.reason == reason
    assert needle in ei.value.message


def test_timeout_is_a_recorded_failure(media):
    with pytest.raises(ExtractError) as ei:
        extract_clip(media["main"], 0, ExtractConfig(timeout_s=0.001))
    assert ei.value.reason == "timeout" and "0.001" in ei.value.message


def test_rotated_video_comes_out_upright(media):
    ex = extract_clip(media["rotated"], 0, duration=2.0)
    px = _rgb(ex.frames[0]).astype(int)
    # Rotation 90 (counter-clockwise display): the red left half ends up at the bottom, blue at the top.
    top, bottom = px[10, 112], px[213, 112]
    assert top[2] > 200 and top[0] < 60, top
    assert bottom[0] > 200 and bottom[2] < 60, bottom


def test_relative_path_starting_with_dash_is_not_an_option(media, tmp_path, monkeypatch):
    # Real AudioCaps ids begin with '-': a relative file name must never reach ffmpeg as an option.
    os.link(media["short"], tmp_path / "-NrFeH-kBSM.mp4")
    monkeypatch.chdir(tmp_path)
    ex = extract_clip(Path("-NrFeH-kBSM.mp4"), 0)
    assert ex.duration == pytest.approx(3.0, abs=0.05)


def test_bad_arguments_are_named(media, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        extract_clip(tmp_path / "missing.mp4", 0)
    with pytest.raises(ValueError, match="start"):
        extract_clip(media["short"], -1)
    with pytest.raises(ValueError, match="downmix"):
        ExtractConfig(downmix="average")
    with pytest.raises(ValueError, match="unknown extract failure reason"):
        ExtractError("bad-reason", "x")
