"""Stage 4, Features: the Kaldi log-mel filterbank of docs/original.md §1, computed once per clip.

waveform (int16, or float32 already scaled as int16/32768) -> subtract its mean (one scalar) ->
`torchaudio.compliance.kaldi.fbank` with the parameters of `FbankConfig` -> [T, 128] with T = 1 + (N - 400) // 160
(snip_edges) -> zero rows appended, or cut, to `target_length` -> float16 [1024, 128], unnormalized.

The sample stores the int16 waveform as FLAC next to the fbank, so `compute_fbank(flac_waveform)` reproduces the
stored fbank exactly: that is the pipeline's self-check.

Normalization statistics (`FbankStats`) count only the real frames of each clip, never the zero padding: padding
is a property of the clip length, not of the audio, and the loader applies the normalization before it matters
(docs/original.md §1: padding ends up at -mean/std after normalization).
"""
from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torchaudio


@dataclass(frozen=True)
class FbankConfig:
    sample_frequency: float = 16000.0
    num_mel_bins: int = 128
    frame_length: float = 25.0        # ms
    frame_shift: float = 10.0         # ms
    window_type: str = "hanning"
    htk_compat: bool = True
    use_energy: bool = False
    dither: float = 0.0
    preemphasis_coefficient: float = 0.97
    remove_dc_offset: bool = True
    round_to_power_of_two: bool = True  # 400-sample frames -> 512-point FFT
    low_freq: float = 20.0
    high_freq: float = 0.0             # 0 = Nyquist
    snip_edges: bool = True
    subtract_mean: bool = True         # the original subtracts the waveform mean before fbank
    target_length: int = 1024
    dtype: str = "float16"

    def __post_init__(self):
        if self.target_length < 1 or self.num_mel_bins < 1:
            raise ValueError("FbankConfig.target_length and num_mel_bins must be >= 1")
        if self.dtype not in ("float16", "float32"):
            raise ValueError(f"FbankConfig.dtype must be float16 or float32, got {self.dtype!r}")

    def fingerprint_parts(self) -> dict:
        return asdict(self)

    @property
    def window_samples(self) -> int:
        return int(self.sample_frequency * self.frame_length / 1000)

    @property
    def shift_samples(self) -> int:
        return int(self.sample_frequency * self.frame_shift / 1000)


def num_fbank_frames(num_samples: int, cfg: FbankConfig = FbankConfig()) -> int:
    """Frames Kaldi's fbank yields for `num_samples` (before padding/cutting to target_length)."""
    if cfg.snip_edges:
        if num_samples < cfg.window_samples:
            return 0
        return 1 + (num_samples - cfg.window_samples) // cfg.shift_samples
    return (num_samples + cfg.shift_samples // 2) // cfg.shift_samples


def waveform_to_float(waveform: np.ndarray) -> np.ndarray:
    """int16 -> float32 int16/32768; float32 passes through (assumed already on that scale)."""
    waveform = np.asarray(waveform)
    if waveform.ndim != 1:
        raise ValueError(f"waveform must be mono 1-D, got shape {waveform.shape}")
    if waveform.dtype == np.int16:
        return waveform.astype(np.float32) / 32768.0
    if waveform.dtype == np.float32:
        return waveform
    raise TypeError(f"waveform must be int16 or float32, got {waveform.dtype}")


_THREADS_LOCK = threading.Lock()


@contextmanager
def _one_torch_thread():
    """The fbank's float32 sums come out differently with 1 and with several torch threads (last-bit
    differences that survive the float16 rounding in ~0.5% of values). Pinning one intra-op thread makes a
    sample's bytes independent of the caller: core count, --cpu-workers, a Dask worker, an audit.
    torch's thread count is process-wide: the lock keeps two threads of one process from restoring each
    other's setting in the middle of a call."""
    with _THREADS_LOCK:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(before)


def compute_fbank(waveform: np.ndarray, cfg: FbankConfig = FbankConfig()) -> np.ndarray:
    """[target_length, num_mel_bins] log-mel fbank of a mono waveform, as cfg.dtype (default float16).

    Computed with one torch thread whatever the caller's setting (see _one_torch_thread), so the result is
    bitwise the same in every process."""
    with _one_torch_thread():
        return _fbank(waveform, cfg)


def _fbank(waveform: np.ndarray, cfg: FbankConfig) -> np.ndarray:
    w = torch.from_numpy(np.ascontiguousarray(waveform_to_float(waveform)))
    if w.numel() < cfg.window_samples:
        raise ValueError(f"waveform has {w.numel()} samples, fewer than one {cfg.frame_length} ms fbank frame")
    if cfg.subtract_mean:
        w = w - w.mean()
    fb = torchaudio.compliance.kaldi.fbank(
        w.unsqueeze(0), sample_frequency=cfg.sample_frequency, num_mel_bins=cfg.num_mel_bins,
        frame_length=cfg.frame_length, frame_shift=cfg.frame_shift, window_type=cfg.window_type,
        htk_compat=cfg.htk_compat, use_energy=cfg.use_energy, dither=cfg.dither,
        preemphasis_coefficient=cfg.preemphasis_coefficient, remove_dc_offset=cfg.remove_dc_offset,
        round_to_power_of_two=cfg.round_to_power_of_two, low_freq=cfg.low_freq, high_freq=cfg.high_freq,
        snip_edges=cfg.snip_edges)
    n = fb.shape[0]
    if n < cfg.target_length:
        fb = torch.nn.functional.pad(fb, (0, 0, 0, cfg.target_length - n))
    else:
        fb = fb[: cfg.target_length]
    return fb.numpy().astype(cfg.dtype)


@dataclass
class FbankStats:
    """Running mean/std over fbank values of real (unpadded) frames; float64 sums, mergeable across workers."""
    count: int = 0
    total: float = 0.0
    total_sq: float = 0.0

    def add(self, fbank: np.ndarray, real_frames: int) -> None:
        real = np.asarray(fbank[: max(0, min(real_frames, fbank.shape[0]))], dtype=np.float64)
        self.count += real.size
        self.total += float(real.sum())
        self.total_sq += float(np.square(real).sum())

    def merge(self, other: "FbankStats") -> "FbankStats":
        return FbankStats(self.count + other.count, self.total + other.total, self.total_sq + other.total_sq)

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else float("nan")

    @property
    def std(self) -> float:
        if not self.count:
            return float("nan")
        return math.sqrt(max(0.0, self.total_sq / self.count - self.mean ** 2))
