"""pipeline.features: docs/original.md §1 fbank, padding/cutting, normalization stats over real frames."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchaudio

from pipeline.features import FbankConfig, FbankStats, compute_fbank, num_fbank_frames


def _waveform(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    w = 8000 * np.sin(2 * np.pi * 440 * t) + 2000 * rng.standard_normal(t.size) + 500  # DC offset on purpose
    return np.clip(w, -32768, 32767).astype(np.int16)


def spec_fbank(w_int16: np.ndarray) -> torch.Tensor:
    """docs/original.md §1, written out independently of FbankConfig."""
    # compute_fbank pins one torch thread (float16 results differ in ~0.5 % of values between 1 and 2 threads,
    # the waveform mean's reduction included), so the independent reference runs on one thread too.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        w = torch.from_numpy(w_int16.astype(np.float32) / 32768.0)
        w = (w - w.mean()).unsqueeze(0)
        return torchaudio.compliance.kaldi.fbank(w, htk_compat=True, sample_frequency=16000, use_energy=False,
                                                 window_type="hanning", num_mel_bins=128, dither=0.0,
                                                 frame_shift=10)
    finally:
        torch.set_num_threads(threads)


def test_ten_seconds_matches_spec_and_pads_to_1024():
    w = _waveform(10)
    fb = compute_fbank(w)
    assert fb.dtype == np.float16 and fb.shape == (1024, 128)
    ref = spec_fbank(w)
    assert ref.shape == (998, 128) and num_fbank_frames(len(w)) == 998
    assert np.array_equal(fb[:998], ref.numpy().astype(np.float16))
    assert not fb[998:].any()                    # zero rows appended, unnormalized
    assert fb[:998].min() < -5 and fb[:998].max() > 2          # log-mel energies, not normalized


def test_eight_seconds_gives_798_frames_and_long_clips_are_cut():
    w8 = _waveform(8, seed=1)
    fb8 = compute_fbank(w8)
    assert num_fbank_frames(len(w8)) == 798
    assert fb8[797].any() and not fb8[798:].any()
    w12 = _waveform(12, seed=2)
    fb12 = compute_fbank(w12)
    assert fb12.shape == (1024, 128)
    assert np.array_equal(fb12, spec_fbank(w12)[:1024].numpy().astype(np.float16))


def test_float32_input_is_the_int16_scale():
    w = _waveform(2, seed=3)
    assert np.array_equal(compute_fbank(w), compute_fbank(w.astype(np.float32) / 32768.0))


def test_config_changes_the_output_and_float32_storage():
    w = _waveform(2, seed=4)
    assert compute_fbank(w, FbankConfig(dtype="float32")).dtype == np.float32
    assert compute_fbank(w, FbankConfig(target_length=256)).shape == (256, 128)
    assert not np.array_equal(compute_fbank(w), compute_fbank(w, FbankConfig(num_mel_bins=128, low_freq=100)))


def test_bad_waveforms_are_rejected_with_a_reason():
    with pytest.raises(ValueError, match="mono"):
        compute_fbank(np.zeros((2, 16000), np.int16))
    with pytest.raises(TypeError, match="int16 or float32"):
        compute_fbank(np.zeros(16000, np.float64))
    with pytest.raises(ValueError, match="fewer than one"):
        compute_fbank(np.zeros(100, np.int16))
    with pytest.raises(ValueError, match="dtype"):
        FbankConfig(dtype="int8")


def test_stats_count_real_frames_only_and_merge():
    a, b = compute_fbank(_waveform(10, 5)), compute_fbank(_waveform(3, 6))
    na, nb = num_fbank_frames(160000), num_fbank_frames(48000)
    sa, sb = FbankStats(), FbankStats()
    sa.add(a, na)
    sb.add(b, nb)
    both = sa.merge(sb)
    real = np.concatenate([a[:na], b[:nb]]).astype(np.float64)
    assert both.count == real.size == (998 + 298) * 128
    assert both.mean == pytest.approx(real.mean(), rel=1e-9)
    assert both.std == pytest.approx(real.std(), rel=1e-9)
    # Padding would drag the mean towards 0: it is not counted.
    assert abs(both.mean - np.concatenate([a, b]).astype(np.float64).mean()) > 0.1
    assert np.isnan(FbankStats().mean)
