"""Caption local video files with a trained checkpoint.

    python -m avcap.caption VIDEO... --checkpoint CKPT [--start S | --all]     # CKPT: a .pt or an export folder

Each 10 s window goes through the same code as the dataset and the evaluation: `pipeline.extract.extract_clip`
(one ffmpeg decode: 16 kHz mono audio + evenly spaced 224x224 JPEG frames), `pipeline.features.compute_fbank`,
the loader's JPEG decoding and eval frame choice, `shards.augment` normalization in eval mode, and beam search
from `avcap.generate`. One line per window goes to stdout:

    clip.mp4  0.0-10.0 s  [av]  a man speaks while a car passes by

A file without an audio stream is captioned in visual-only mode, one without video in audio-only mode (the
encoder's single-modality paths); a file the model cannot use (unreadable, neither stream, the one stream its
mode needs missing, start past the end) gets an `error:` line on stderr naming the file and the reason, and the
exit status is 1 once every file has been tried.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import ffmpeg
import torch

from avcap.checkpoint import load_checkpoint
from avcap.generate import FLAG_FIELDS, GenerationConfig, GenerationFlags, generate, generation_from_flags
from avcap.tokenizer import decode_batch
from pipeline.extract import ExtractConfig, ExtractError, extract_clip
from pipeline.features import FbankConfig, compute_fbank
from shards.augment import AugmentConfig, augment_audio, normalize_frames
from shards.decode import decode_jpeg
from shards.epoch_plan import eval_frame_start

CLIP_SECONDS = 10.0


class CaptionError(ValueError):
    """A file or window that cannot be captioned; the message names the file and what is wrong."""


@dataclass
class CaptionConfig(GenerationFlags):
    checkpoint: str
    start: float = 0.0
    all_windows: bool = False
    window_s: float = CLIP_SECONDS
    batch_size: int = 8           # windows encoded together
    device: str = "cpu"
    mode: str = "auto"            # auto: the checkpoint's mode, or the single-stream mode the file allows


@dataclass
class MediaInfo:
    path: Path
    duration: float
    has_audio: bool
    has_video: bool


@dataclass
class WindowCaption:
    path: Path
    start: float
    end: float
    mode: str                     # av | audio | visual
    caption: str

    def line(self) -> str:
        return f"{self.path.name}\t{self.start:.1f}-{self.end:.1f} s\t[{self.mode}]\t{self.caption}"


@dataclass
class _Window:
    start: float
    fbank: torch.Tensor | None    # float16 [T, M], unnormalized
    frames: torch.Tensor | None   # uint8 [nf, 3, H, W]
    end: float = 0.0


def probe_media(path: Path | str) -> MediaInfo:
    """Duration and which streams exist; CaptionError for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise CaptionError(f"{path}: no such file")
    try:
        info = ffmpeg.probe(str(path.absolute()))
    except ffmpeg.Error as e:
        tail = (e.stderr or b"").decode(errors="replace").strip().splitlines()[-1:] or ["ffprobe failed"]
        raise CaptionError(f"{path}: not a readable media file ({tail[0]})") from None
    streams = info.get("streams", [])
    has_audio = any(s.get("codec_type") == "audio" for s in streams)
    # Attached pictures (cover art) are not video, as in pipeline.extract's `V` stream specifier.
    has_video = any(s.get("codec_type") == "video" and not s.get("disposition", {}).get("attached_pic")
                    for s in streams)
    try:
        duration = float(info.get("format", {}).get("duration"))
    except (TypeError, ValueError):
        durations = [float(s["duration"]) for s in streams if s.get("duration") not in (None, "N/A")]
        if not durations:
            raise CaptionError(f"{path}: media has no known duration") from None
        duration = max(durations)
    if not has_audio and not has_video:
        raise CaptionError(f"{path}: media has neither an audio nor a video stream")
    return MediaInfo(path=path, duration=duration, has_audio=has_audio, has_video=has_video)


def choose_mode(model_mode: str, info: MediaInfo, requested: str = "auto") -> str:
    """The encoder mode for a file: the model's own, or the single-modality one when a stream is missing."""
    needs = {"av": (True, True), "audio": (True, False), "visual": (False, True)}
    if requested != "auto":
        if requested not in needs:
            raise CaptionError(f"--mode {requested!r}: must be auto, av, audio or visual")
        mode = requested
    elif model_mode == "av":
        mode = "av" if info.has_audio and info.has_video else ("audio" if info.has_audio else "visual")
    else:
        mode = model_mode
    need_audio, need_video = needs[mode]
    if need_audio and not info.has_audio:
        raise CaptionError(f"{info.path}: media has no audio stream, which {mode} mode needs")
    if need_video and not info.has_video:
        raise CaptionError(f"{info.path}: media has no video stream, which {mode} mode needs")
    return mode


def window_starts(info: MediaInfo, start: float, all_windows: bool, window_s: float = CLIP_SECONDS,
                  min_s: float = 1.0) -> list[float]:
    """`start` alone, or every window_s step from 0 (the last may be shorter, down to min_s)."""
    if all_windows:
        starts, s = [], 0.0
        while s + min_s <= info.duration:
            starts.append(s)
            s += window_s
        if not starts:
            raise CaptionError(f"{info.path}: {info.duration:.2f} s long, shorter than the {min_s:g} s minimum")
        return starts
    if start < 0:
        raise CaptionError(f"--start {start}: must be >= 0")
    if start + min_s > info.duration:
        raise CaptionError(f"{info.path}: --start {start:g} s leaves less than {min_s:g} s of the "
                           f"{info.duration:.2f} s media")
    return [float(start)]


def with_placeholder_stream(info: MediaInfo, tmp_dir: Path) -> Path:
    """A copy of a single-stream file with a placeholder for the missing stream.

    extract_clip decodes audio and video in one ffmpeg run and needs both; the real stream is stream-copied
    (bit-identical decode) and the placeholder's output is dropped before the model: the chosen mode never
    reads it."""
    out = tmp_dir / f"placeholder-{info.path.stem[:40]}.mkv"
    src = ffmpeg.input(str(info.path.absolute()))
    if info.has_video:
        real = src["V:0"]
        filler = ffmpeg.input(f"anullsrc=r=16000:cl=mono:d={info.duration:.3f}", f="lavfi")["a"]
        codecs = {"c:v": "copy", "c:a": "pcm_s16le"}
    else:
        real = src["a:0"]
        filler = ffmpeg.input(f"color=c=black:s=32x32:r=2:d={info.duration:.3f}", f="lavfi")["v"]
        codecs = {"c:a": "copy", "c:v": "ffv1"}
    cmd = ffmpeg.output(real, filler, str(out), **codecs).compile()
    res = subprocess.run([cmd[0], "-nostdin", "-v", "error", "-y", *cmd[1:]], capture_output=True, timeout=300)
    if res.returncode != 0:
        raise CaptionError(f"{info.path}: could not prepare the single-stream file: "
                           f"{res.stderr.decode(errors='replace').strip()[-300:]}")
    return out


class Captioner:
    """A loaded checkpoint plus the preprocessing settings it was trained with."""

    def __init__(self, cfg: CaptionConfig):
        self.cfg = cfg
        self.generation = generation_from_flags(cfg)
        self.device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                                   ("cpu" if cfg.device == "auto" else cfg.device))
        loaded = load_checkpoint(cfg.checkpoint, map_location=self.device)
        self.model, self.tokenizer, self.model_cfg = loaded.model.eval(), loaded.tokenizer, loaded.config
        self.frames_per_clip = loaded.frames_per_clip
        norm = loaded.norm_stats or {}
        self.augment_cfg = AugmentConfig(norm_mean=float(norm.get("mean", AugmentConfig.norm_mean)),
                                         norm_std=float(norm.get("std", AugmentConfig.norm_std)))
        self.extract_cfg = ExtractConfig(frames=self.frames_per_clip, size=self.model_cfg.img_size)
        self.fbank_cfg = FbankConfig(num_mel_bins=self.model_cfg.num_mel_bins,
                                     target_length=self.model_cfg.audio_length)

    def _window(self, media: Path, start: float, mode: str, label: Path) -> _Window:
        try:
            ex = extract_clip(media, start, self.extract_cfg, duration=self.cfg.window_s)
        except ExtractError as e:
            raise CaptionError(f"{label}: window at {start:g} s: {e.reason}: {e.message}") from None
        fbank = frames = None
        if mode in ("av", "audio"):
            fbank = torch.from_numpy(compute_fbank(ex.waveform, self.fbank_cfg))
        if mode in ("av", "visual"):
            nf, f0 = self.model_cfg.num_frames, eval_frame_start(self.frames_per_clip, self.model_cfg.num_frames)
            frames = torch.stack([decode_jpeg(ex.frames[f0 + j], f"{label} frame {f0 + j}") for j in range(nf)])
        return _Window(start=start, fbank=fbank, frames=frames, end=start + ex.duration)

    @torch.no_grad()
    def generate(self, audio: torch.Tensor | None, visual: torch.Tensor | None, mode: str) -> torch.Tensor:
        """Token rows for normalized model inputs: the same call (and settings) as avcap.evaluate's."""
        tokens, _ = generate(self.model, audio, visual, self.generation, mode=mode)
        return tokens

    @torch.no_grad()
    def _caption_batch(self, windows: list[_Window], mode: str) -> list[str]:
        audio = visual = None
        if windows[0].fbank is not None:
            audio = augment_audio(torch.stack([w.fbank for w in windows]).to(self.device), self.augment_cfg,
                                  train=False)
        if windows[0].frames is not None:
            visual = normalize_frames(torch.stack([w.frames for w in windows]).to(self.device), self.augment_cfg)
        return decode_batch(self.tokenizer, self.generate(audio, visual, mode).cpu())

    def caption_file(self, path: Path | str) -> list[WindowCaption]:
        info = probe_media(path)
        mode = choose_mode(self.model_cfg.mode, info, self.cfg.mode)
        starts = window_starts(info, self.cfg.start, self.cfg.all_windows, self.cfg.window_s)
        with tempfile.TemporaryDirectory(prefix="avcap-caption-") as tmp:
            media = info.path if (info.has_audio and info.has_video) else with_placeholder_stream(info, Path(tmp))
            out: list[WindowCaption] = []
            for i in range(0, len(starts), self.cfg.batch_size):
                windows = [self._window(media, s, mode, info.path) for s in starts[i:i + self.cfg.batch_size]]
                for w, text in zip(windows, self._caption_batch(windows, mode)):
                    out.append(WindowCaption(info.path, w.start, w.end, mode, text))
        return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Caption local video files with a trained AVCap checkpoint.")
    ap.add_argument("videos", nargs="+", type=Path, help="video (or audio) files")
    ap.add_argument("--checkpoint", required=True,
                    help="a checkpoint written by training (.pt) or a folder written by avcap.export")
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--start", type=float, default=0.0, help="window start in seconds (default 0)")
    where.add_argument("--all", dest="all_windows", action="store_true", help="caption every 10 s window")
    for flag, name in FLAG_FIELDS.items():
        default = getattr(GenerationConfig, name)
        ap.add_argument("--" + flag.replace("_", "-"), type=type(default), default=default,
                        help=GenerationConfig.help(name) + " (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=CaptionConfig.batch_size)
    ap.add_argument("--device", default=CaptionConfig.device, help="cpu | cuda | auto")
    ap.add_argument("--mode", default="auto", choices=["auto", "av", "audio", "visual"],
                    help="encoder mode (auto: the checkpoint's, single-modality when the file lacks a stream)")
    args = ap.parse_args(argv)
    if not Path(args.checkpoint).exists():
        ap.error(f"--checkpoint {args.checkpoint}: no such file or folder")
    cfg = CaptionConfig(checkpoint=args.checkpoint, start=args.start, all_windows=args.all_windows,
                        beam_size=args.beam_size, per_node_beam=args.per_node_beam,
                        length_penalty=args.length_penalty, max_gen_steps=args.max_gen_steps,
                        gen_precision=args.gen_precision, batch_size=args.batch_size, device=args.device,
                        mode=args.mode)
    captioner = Captioner(cfg)
    failed = 0
    for path in args.videos:
        try:
            results = captioner.caption_file(path)
        except (CaptionError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            failed += 1
            continue
        if results and results[0].mode != captioner.model_cfg.mode:
            print(f"note: {path}: captioned in {results[0].mode}-only mode (the file lacks the other stream)",
                  file=sys.stderr, flush=True)
        for r in results:
            print(r.line(), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
