"""Stage 3, Extract: one ffmpeg decode per clip gives the 16 kHz mono waveform and F video frames.

A single ffmpeg process reads the window [start, start+duration) once (input seeking, `-ss` before `-i`, which
ffmpeg makes frame-accurate by decoding from the previous keyframe and discarding) and writes two outputs:

- audio: the first audio stream, resampled to `sample_rate` and downmixed to mono by ffmpeg (`-ac 1`, swresample's
  matrix: for stereo exactly (L+R)/2; for more channels ffmpeg's standard downmix), as s16le on stdout;
- frames: the first real video stream (`V`: attached cover pictures are not video), through
  `setpts=PTS-step/2/TB,fps=F/duration:start_time=-step:round=down` (step = duration/F), which picks for frame i
  the picture on screen at t_i = (i + 0.5) * step (the last decoded frame with pts < t_i; sparse video is
  duplicated, a video stream that starts late repeats its first frame in the slots before it), then
  scaled so the shorter side is `size` (bicubic, ffmpeg's default) and center-cropped to size x size, as raw
  RGB to a temporary file. ffmpeg's default autorotate applies the rotation metadata of phone videos.

Frame times are on the NOMINAL window (duration, default 10 s), so a clip shorter than the window decodes fewer
than F frames; those are then repeated evenly (output frame i = decoded frame floor(i * k / F)) so a sample
always has F frames. The sample records how many frames were really decoded (`decoded_frames`).

JPEG bytes come from Pillow with a fixed quality and subsampling: deterministic for the same pixels.

Truncated media: a file that ends early (a download cut off) decodes without an error, so it would look like a
genuinely short video. When the decoded audio or video ends more than `truncation_tolerance_s` before
min(what the container declares for that stream (ffprobe; the format's duration when the stream has none),
the window), the clip is `truncated`. ffprobe runs only for clips that decode shorter than the window.

A window that starts at or after the declared end of every stream is `start-past-end` (not `too-short`: no other
file of that video can fix a wrong start_time).

Damaged media: ffmpeg conceals what it cannot decode and still exits 0, printing one error line per damaged
packet (it runs at `-v error`, so every line it prints is one). When it printed any, the clip is kept only if the
decode is complete (audio to within `COMPLETE_TOLERANCE_S` of the expected end, video to one frame step), else it
is `decode-errors`; a kept clip carries the error count and first lines (`Extracted.decode_errors`), and
`ExtractConfig.strict_decode` makes any error `decode-errors`.

Failures raise `ExtractError(reason, message)` with one of `REASONS`; `message` carries the tail of ffmpeg's
stderr so a ledger entry says what went wrong.
"""
from __future__ import annotations

import io
import json
import numbers
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import ffmpeg
import numpy as np
from PIL import Image

REASONS = ("no-audio-stream", "no-video-stream", "undecodable", "too-short", "timeout", "truncated",
           "start-past-end", "decode-errors")
# A decode that reported errors is kept only when it is complete: audio to within this of the expected end (an
# AAC frame is 21-23 ms, and a concealed one shifts all later audio against the frames; a clean decode of a
# window is exact to the sample, container durations are rounded to the millisecond).
COMPLETE_TOLERANCE_S = 0.005
DECODE_ERROR_LINES = 5   # of ffmpeg's error lines kept as evidence (ledger, sample json)

# Pillow's JPEG subsampling codes; recorded by name in the config.
_SUBSAMPLING = {"4:4:4": 0, "4:2:2": 1, "4:2:0": 2}


class ExtractError(Exception):
    """A clip that cannot be turned into a sample; `reason` is one of REASONS."""

    def __init__(self, reason: str, message: str):
        if reason not in REASONS:
            raise ValueError(f"unknown extract failure reason {reason!r}; expected one of {REASONS}")
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class ExtractConfig:
    sample_rate: int = 16000
    frames: int = 20
    size: int = 224
    jpeg_quality: int = 90
    jpeg_subsampling: str = "4:2:0"
    # "ffmpeg": ffmpeg's `-ac 1` downmix (stereo -> (L+R)/2); "first": keep the first channel, as CAV-MAE did.
    downmix: str = "ffmpeg"
    # "center": frame i at (i + 0.5) * duration / frames on the nominal window.
    frame_times: str = "center"
    min_duration_s: float = 1.0
    timeout_s: float = 120.0
    # Decoder threads per clip: the pipeline runs clips in parallel, one core each, which beats threading
    # one decode. h264/aac decoding is bit-exact whatever the thread count, so this is not in the fingerprint.
    threads: int = 1
    ffmpeg_bin: str = "ffmpeg"
    ffprobe_bin: str = "ffprobe"
    # How far decoding may end before the declared end of a stream: container durations are rounded and the
    # last frames of a stream may be dropped by the decoder; a cut-off download misses seconds.
    truncation_tolerance_s: float = 1.0
    # Refuse a clip whose decode reported any error, even when the decoded audio and frames are complete.
    strict_decode: bool = False

    def __post_init__(self):
        if self.frames < 1:
            raise ValueError(f"ExtractConfig.frames must be >= 1, got {self.frames}")
        if self.size < 16:
            raise ValueError(f"ExtractConfig.size must be >= 16, got {self.size}")
        if not 1 <= self.jpeg_quality <= 95:
            raise ValueError(f"ExtractConfig.jpeg_quality must be in 1..95, got {self.jpeg_quality}")
        if self.jpeg_subsampling not in _SUBSAMPLING:
            raise ValueError(f"ExtractConfig.jpeg_subsampling must be one of {list(_SUBSAMPLING)}, "
                             f"got {self.jpeg_subsampling!r}")
        if self.downmix not in ("ffmpeg", "first"):
            raise ValueError(f"ExtractConfig.downmix must be 'ffmpeg' or 'first', got {self.downmix!r}")
        if self.frame_times != "center":
            raise ValueError(f"ExtractConfig.frame_times must be 'center', got {self.frame_times!r}")
        if self.sample_rate <= 0 or self.timeout_s <= 0:
            raise ValueError("ExtractConfig.sample_rate and timeout_s must be positive")
        if self.truncation_tolerance_s <= 0:
            raise ValueError(f"ExtractConfig.truncation_tolerance_s must be > 0, got {self.truncation_tolerance_s}")

    def fingerprint_parts(self) -> dict:
        """The settings that change the bytes of a sample (threads, timeout, binary paths, the truncation
        tolerance and strict_decode do not: the last two only decide whether a clip becomes a sample at all)."""
        return {"sample_rate": self.sample_rate, "frames": self.frames, "size": self.size,
                "jpeg_quality": self.jpeg_quality, "jpeg_subsampling": self.jpeg_subsampling,
                "downmix": self.downmix, "frame_times": self.frame_times, "min_duration_s": self.min_duration_s,
                "resize": "shorter-side-bicubic+center-crop"}


@dataclass
class Extracted:
    waveform: np.ndarray            # int16 [N], mono, sample_rate
    frames: list[bytes]             # exactly cfg.frames JPEGs, size x size
    duration: float                 # real seconds of audio in the window (<= nominal duration)
    sample_rate: int
    decoded_frames: int             # distinct frames ffmpeg produced before repeating for short clips
    frame_times: list[float] = field(default_factory=list)  # nominal time (s from window start) of each frame
    decode_errors: int = 0          # error lines ffmpeg printed while decoding (the clip was complete anyway)
    decode_error_lines: list[str] = field(default_factory=list)  # the first of them, without memory addresses


def _stderr_tail(stderr: bytes, lines: int = 8) -> str:
    text = stderr.decode("utf-8", errors="replace").strip().splitlines()
    return "\n".join(text[-lines:]) if text else "(ffmpeg printed nothing)"


def _error_lines(stderr: bytes) -> list[str]:
    """ffmpeg's error lines (it runs at `-v error`), without the `@ 0x55...` addresses of its log prefixes, so
    the same file gives the same lines in every run."""
    text = stderr.decode("utf-8", errors="replace").splitlines()
    return [re.sub(r" @ 0x[0-9a-f]+\]", "]", t.strip()) for t in text if t.strip()]


def _classify_failure(stderr: bytes) -> ExtractError:
    text = stderr.decode("utf-8", errors="replace")
    # ffmpeg names the stream specifier it could not satisfy; our graph asks for 0:a:0 and 0:V:0 only.
    for line in text.splitlines():
        m = re.search(r"Stream (?:specifier|map) '([^']*)'.*matches no streams", line)
        parts = m.group(1).split(":") if m else []
        if "a" in parts:
            return ExtractError("no-audio-stream", f"media has no audio stream (ffmpeg: {line.strip()[:200]})")
        if "V" in parts:
            return ExtractError("no-video-stream", f"media has no video stream (ffmpeg: {line.strip()[:200]})")
    return ExtractError("undecodable", _stderr_tail(stderr))


def declared_durations(media_path: Path, cfg: ExtractConfig) -> dict[str, float]:
    """Seconds the container declares for its first audio and first video stream ({"audio": .., "video": ..}),
    from ffprobe; a stream without its own duration takes the format's. Missing when nothing is declared."""
    cmd = [cfg.ffprobe_bin, "-v", "error", "-show_entries", "format=duration:stream=codec_type,duration,disposition",
           "-of", "json", str(media_path)]
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=cfg.timeout_s)
        info = json.loads(proc.stdout or b"{}")
    except (subprocess.TimeoutExpired, ValueError):
        return {}

    def seconds(x) -> float | None:
        try:
            v = float(x)
        except (TypeError, ValueError):
            return None
        return v if v > 0 else None

    fmt = seconds((info.get("format") or {}).get("duration"))
    out: dict[str, float] = {}
    for st in info.get("streams") or []:
        kind = st.get("codec_type")
        # Cover pictures are "video" streams to ffprobe but not to our graph (V:0 skips them).
        if kind == "video" and (st.get("disposition") or {}).get("attached_pic"):
            continue
        if kind in ("audio", "video") and kind not in out:
            d = seconds(st.get("duration")) or fmt
            if d is not None:
                out[kind] = d
    return out


def check_start(media_path: Path, start: float, declared: dict[str, float]) -> None:
    """Raise ExtractError("start-past-end") when the window starts where no stream has anything left."""
    if declared and start >= max(declared.values()):
        raise ExtractError("start-past-end", f"{media_path.name}: the window starts at {start:g} s but the file "
                                             f"declares {max(declared.values()):.2f} s (a wrong start_time?)")


def check_truncation(media_path: Path, start: float, duration: float, audio_s: float, video_s: float,
                     cfg: ExtractConfig, declared: dict[str, float] | None = None,
                     tolerance_s: float | None = None) -> None:
    """Raise ExtractError("truncated") when audio or video ends well before the end the container declares
    (more than `tolerance_s`, default cfg.truncation_tolerance_s).

    `video_s` is known to one frame step (duration / frames): the video's slack is one step more."""
    declared = declared_durations(media_path, cfg) if declared is None else declared
    tol = cfg.truncation_tolerance_s if tolerance_s is None else tolerance_s
    slack = {"audio": tol, "video": tol + duration / cfg.frames}
    for kind, got in (("audio", audio_s), ("video", video_s)):
        if kind not in declared:
            continue
        expected = min(declared[kind] - start, duration)
        if expected - got > slack[kind]:
            raise ExtractError("truncated", f"{media_path.name}: {kind} decodes to {got:.2f} s of the window "
                                            f"[{start:g}, {start + duration:g}) but the file declares "
                                            f"{declared[kind]:.2f} s ({expected:.2f} s expected): the file ends early")


def frame_times(cfg: ExtractConfig, duration: float) -> list[float]:
    """Nominal time of each frame, seconds from the window start."""
    step = duration / cfg.frames
    return [(i + 0.5) * step for i in range(cfg.frames)]


def build_command(media_path: Path, start: float, cfg: ExtractConfig, duration: float, frames_path: Path) -> list[str]:
    """The ffmpeg argument list for one clip: audio s16le on stdout, raw RGB frames to `frames_path`."""
    inp = ffmpeg.input(str(media_path), ss=f"{start:.3f}", t=f"{duration:.3f}", threads=cfg.threads)
    rate = Fraction(cfg.frames) / Fraction(duration).limit_denominator(1000)
    # The fps filter fills output slot k with the last frame whose pts (in units of step, rounded down) is below
    # k + 1. Shifting pts back by half a step puts the slot boundaries at (k + 0.5) * step, and start_time = -step
    # makes the first slot k = -1, so output i holds the last frame with pts < (i + 0.5) * step: the picture on
    # screen at the centre of the i-th step. A video stream that starts late pads its first slots with its first
    # frame instead of shifting every later frame to an earlier slot.
    step = duration / cfg.frames
    video = (inp["V:0"]
             .setpts(f"PTS-{step / 2:.6f}/TB")
             .filter("fps", fps=f"{rate.numerator}/{rate.denominator}", start_time=f"{-step:.6f}", round="down")
             .filter("scale", cfg.size, cfg.size, force_original_aspect_ratio="increase", flags="bicubic")
             .filter("crop", cfg.size, cfg.size)
             .output(str(frames_path), format="rawvideo", pix_fmt="rgb24"))
    audio_opts = {"format": "s16le", "acodec": "pcm_s16le", "ar": cfg.sample_rate}
    audio_stream = inp["a:0"]
    if cfg.downmix == "first":
        audio_stream = audio_stream.filter("channelmap", map="0", channel_layout="mono")
    else:
        audio_opts["ac"] = 1
    audio = audio_stream.output("pipe:1", **audio_opts)
    args = ffmpeg.merge_outputs(audio, video).compile(cmd=cfg.ffmpeg_bin)
    # Global options first: after the last output ffmpeg would treat them as trailing options.
    return [args[0], "-nostdin", "-hide_banner", "-v", "error", "-y", *args[1:]]


def _encode_jpeg(rgb: np.ndarray, cfg: ExtractConfig) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="JPEG", quality=cfg.jpeg_quality,
                                          subsampling=_SUBSAMPLING[cfg.jpeg_subsampling], optimize=False)
    return buf.getvalue()


def extract_clip(media_path: Path | str, start: float, cfg: ExtractConfig = ExtractConfig(),
                 duration: float = 10.0) -> Extracted:
    """Decode the window [start, start+duration) of `media_path` once; raise ExtractError on a bad clip."""
    media_path = Path(media_path).absolute()  # never a relative name ffmpeg could read as an option
    if not media_path.is_file():
        raise FileNotFoundError(f"extract_clip: media file {media_path} does not exist")
    if isinstance(start, bool) or not (isinstance(start, numbers.Real) and start >= 0):
        raise ValueError(f"extract_clip: start must be a number >= 0, got {start!r} for {media_path}")
    if not duration > 0:
        raise ValueError(f"extract_clip: duration must be > 0, got {duration!r}")

    with tempfile.TemporaryDirectory(prefix="avcap-extract-") as tmp:
        frames_path = Path(tmp) / "frames.rgb"
        cmd = build_command(media_path, float(start), cfg, float(duration), frames_path)
        try:
            proc = subprocess.run(cmd, capture_output=True, timeout=cfg.timeout_s)
        except subprocess.TimeoutExpired as e:
            raise ExtractError("timeout", f"ffmpeg took over {cfg.timeout_s:g} s on {media_path}; "
                                          f"{_stderr_tail(e.stderr or b'')}") from None
        if proc.returncode != 0:
            raise _classify_failure(proc.stderr)
        raw_frames = frames_path.read_bytes() if frames_path.exists() else b""

    waveform = np.frombuffer(proc.stdout, dtype="<i2").astype(np.int16)
    waveform = waveform[: int(round(duration * cfg.sample_rate))]
    real_duration = len(waveform) / cfg.sample_rate
    frame_bytes = cfg.size * cfg.size * 3
    decoded = len(raw_frames) // frame_bytes
    step = duration / cfg.frames
    # The video covers up to the last frame time it filled (+ half a step: the picture stays on screen).
    video_s = min(duration, decoded * step)
    errors = _error_lines(proc.stderr)
    if errors or real_duration < duration - cfg.truncation_tolerance_s or \
            video_s < duration - cfg.truncation_tolerance_s - step:
        declared = declared_durations(media_path, cfg)
        check_start(media_path, float(start), declared)
        check_truncation(media_path, float(start), float(duration), real_duration, video_s, cfg, declared)
    if errors and cfg.strict_decode:
        raise ExtractError("decode-errors", f"ffmpeg reported {len(errors)} decode errors in {media_path.name} "
                                            f"(--strict-decode); first: " + " | ".join(errors[:DECODE_ERROR_LINES]))
    if errors:
        # ffmpeg conceals damaged data and exits 0: the clip is kept only if nothing of the window is missing.
        try:
            check_truncation(media_path, float(start), float(duration), real_duration, video_s, cfg, declared,
                             tolerance_s=COMPLETE_TOLERANCE_S)
            if not declared and (real_duration < duration - COMPLETE_TOLERANCE_S or decoded < cfg.frames):
                raise ExtractError("truncated", f"{real_duration:.2f} s of audio, {decoded} frames")
        except ExtractError as e:
            raise ExtractError("decode-errors", f"ffmpeg reported {len(errors)} decode errors in {media_path.name} "
                                                f"and the decode is incomplete ({e.message}); first: "
                                                + " | ".join(errors[:DECODE_ERROR_LINES])) from None
    if real_duration < cfg.min_duration_s:
        raise ExtractError("too-short", f"{real_duration:.2f} s of audio in the window [{start}, {start + duration})"
                                        f" of {media_path.name}; at least {cfg.min_duration_s:g} s needed")

    if decoded == 0:
        if proc.stderr.strip():
            raise ExtractError("undecodable", f"video gave no frame in the window; {_stderr_tail(proc.stderr)}")
        raise ExtractError("too-short", f"no video frame in the window [{start}, {start + duration}) "
                                        f"of {media_path.name}")
    pixels = np.frombuffer(raw_frames[: decoded * frame_bytes], np.uint8).reshape(decoded, cfg.size, cfg.size, 3)
    # The fps filter may emit one extra duplicate at end of stream: keep the first F. A short clip has fewer:
    # repeat them evenly so the frame index still runs over the clip from start to end.
    if decoded >= cfg.frames:
        chosen = list(range(cfg.frames))
    else:
        chosen = [i * decoded // cfg.frames for i in range(cfg.frames)]
    jpegs: dict[int, bytes] = {}
    frames = []
    for j in chosen:
        if j not in jpegs:
            jpegs[j] = _encode_jpeg(pixels[j], cfg)
        frames.append(jpegs[j])
    times = frame_times(cfg, duration)
    return Extracted(waveform=waveform, frames=frames, duration=real_duration, sample_rate=cfg.sample_rate,
                     decoded_frames=min(decoded, cfg.frames), frame_times=[times[j] for j in chosen],
                     decode_errors=len(errors), decode_error_lines=errors[:DECODE_ERROR_LINES])
