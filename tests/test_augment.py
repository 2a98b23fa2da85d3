"""shards.augment: batched SpecAugment / noise / roll / normalization, checked against their definitions."""
from __future__ import annotations

import pytest
import torch

from shards.augment import AugmentConfig, augment_audio, normalize_frames, prepare_batch

MEAN, STD = -4.346, 4.332


def make_batch(B: int = 4, nf: int = 1, value: float = 5.0) -> dict:
    return {"fbank": torch.full((B, 1024, 128), value, dtype=torch.float16),
            "frames": torch.randint(0, 256, (B, nf, 3, 224, 224), dtype=torch.uint8),
            "valid": torch.ones(B, dtype=torch.bool)}


def test_eval_is_normalization_only():
    batch = make_batch(nf=1)
    batch["fbank"][0, :10] = 0   # padding rows, as stored
    out = prepare_batch(batch, AugmentConfig(noise=True), train=False)
    expect = (batch["fbank"].float() - MEAN) / STD
    assert out["audio"].dtype == torch.float32 and torch.allclose(out["audio"], expect)
    assert torch.allclose(out["audio"][0, 0, 0], torch.tensor(4.346 / 4.332))   # padding -> +1.003
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert out["visual"].shape == (4, 3, 224, 224)
    assert torch.allclose(out["visual"], (batch["frames"][:, 0].float() / 255 - mean) / std, atol=1e-5)
    assert out["valid"].all()


def test_frame_windows_come_out_in_conv3d_layout():
    batch = make_batch(nf=4)
    out = prepare_batch(batch, AugmentConfig(), train=False)
    assert out["visual"].shape == (4, 3, 4, 224, 224)
    # frame j of sample i lands at visual[i, :, j]
    direct = normalize_frames(batch["frames"][:, 2:3], AugmentConfig())
    assert torch.equal(out["visual"][:, :, 2], direct)


def test_specaugment_masks_are_contiguous_bands_per_sample_before_normalization():
    cfg = AugmentConfig(freqm=48, timem=192, noise=False)
    torch.manual_seed(0)
    audio = augment_audio(make_batch(B=16)["fbank"], cfg, train=True)
    masked_value, kept_value = (0 - MEAN) / STD, (5.0 - MEAN) / STD
    assert torch.all(torch.isclose(audio, torch.tensor(masked_value)) | torch.isclose(audio, torch.tensor(kept_value)))
    widths = []
    for x in audio:
        masked = torch.isclose(x, torch.tensor(masked_value))
        full_mel = masked.all(dim=0).nonzero().flatten()    # mel bins masked at every time step
        full_time = masked.all(dim=1).nonzero().flatten()   # time steps masked at every mel bin
        for band, limit in ((full_mel, 48), (full_time, 192)):
            if len(band):
                assert band[-1] - band[0] + 1 == len(band), "one contiguous band"
                assert len(band) < limit
        # every masked cell lies in the mel band or the time band
        union = torch.zeros_like(masked)
        union[:, full_mel] = True
        union[full_time, :] = True
        assert torch.equal(masked, union)
        widths.append((len(full_mel), len(full_time)))
    assert len(set(widths)) > 8, "masks are drawn per sample (iid), not shared by the batch"


def test_noise_and_roll_per_sample():
    cfg = AugmentConfig(freqm=0, timem=0, noise=True)
    ramp = torch.arange(1024, dtype=torch.float32).view(1, 1024, 1).expand(8, 1024, 128).half()
    g = torch.Generator().manual_seed(1)
    out = augment_audio(ramp, cfg, train=True, generator=g)
    clean = (ramp.float() - MEAN) / STD
    shifts = []
    for i in range(8):
        # torch.roll(x, s, 0): out[t] = x[(t - s) mod T]; recover s from where the ramp's start moved to
        s = int(torch.argmin(out[i, :, 0]))
        rolled = torch.roll(clean[i], s, dims=0)
        noise = out[i] - rolled
        assert noise.min() >= -1e-4 and noise.max() < 0.1 + 1e-4, "noise is U(0,1) * U(0,1) / 10"
        shifts.append(s)
    assert len(set(shifts)) > 4


def test_generator_makes_augmentation_reproducible_and_leaves_global_rng_alone():
    cfg = AugmentConfig(noise=True)
    fb = torch.randn(4, 1024, 128).half()
    state = torch.get_rng_state()
    a = augment_audio(fb, cfg, train=True, generator=torch.Generator().manual_seed(42))
    assert torch.equal(torch.get_rng_state(), state)
    b = augment_audio(fb, cfg, train=True, generator=torch.Generator().manual_seed(42))
    c = augment_audio(fb, cfg, train=True, generator=torch.Generator().manual_seed(43))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # without a generator the global RNG drives it (train.py reseeds it per micro-batch)
    torch.manual_seed(9)
    d = augment_audio(fb, cfg, train=True)
    torch.manual_seed(9)
    assert torch.equal(d, augment_audio(fb, cfg, train=True))


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="frames must be uint8"):
        normalize_frames(torch.zeros(2, 1, 3, 8, 8), AugmentConfig())
    with pytest.raises(ValueError, match=r"fbank must be \[B, time, mel\]"):
        augment_audio(torch.zeros(1024, 128), AugmentConfig(), train=False)
