"""Batched augmentation and normalization on the training device: a step of the train loop, not of the workers.

The original applied SpecAugment, noise, roll and normalization per sample in every loader worker (1.3 ms per
sample on one core). Here the loader only decodes, and `prepare_batch` does the same operations on a whole
batch at once on the training device (GPU in production, CPU in tests), in the original's order (docs/original.md §1):

    audio:  FrequencyMasking(48) + TimeMasking(192) on [B,1,mel,time], iid per sample (train only)
            -> (fbank - mean) / std          (masks and padding become +1.003 at the AudioCaps defaults)
            -> + U(0,1)[time,mel] * U(0,1) / 10, then roll the time axis by U{-T..T-1}   (train, noise=True)
    visual: uint8 frames -> [0,1] -> ImageNet normalization. The frames are stored 224x224 center-cropped, where
            the original's Resize(224)+CenterCrop(224) is the identity, so no resampling happens here.

Frame choice (random frame / window in train, the middle in eval) happens in the loader so workers decode only
the frames used; tokenization happens in the loader workers when LoaderConfig.tokenizer is set.

Randomness: with `generator=None` everything draws from the device's global RNG (train.py reseeds it per
micro-batch). With a generator, every draw derives from it: torchaudio's masking takes no generator, so it runs
under a forked global RNG seeded from the generator, leaving the caller's global RNG state untouched.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torchaudio


@dataclass
class AugmentConfig:
    freqm: int = 48                  # FrequencyMasking max width (mel bins); 0 disables
    timem: int = 192                 # TimeMasking max width (frames); 0 disables
    noise: bool = False              # noise + time roll (the original README turns it on)
    norm_mean: float = -4.346        # AudioCaps defaults; CAV-MAE's AudioSet values are -5.081 / 4.4849
    norm_std: float = 4.332
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)


def _fork_rng(device: torch.device, generator: torch.Generator | None):
    """Global RNG for torchaudio's masks: the caller's own, or a fork seeded from `generator`."""
    if generator is None:
        return nullcontext()

    class _Forked:
        def __enter__(self):
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
            if device.type == "cuda":
                idx = device.index if device.index is not None else torch.cuda.current_device()
                self.ctx = torch.random.fork_rng(devices=[idx], device_type="cuda")
                self.ctx.__enter__()
                torch.cuda.default_generators[idx].manual_seed(seed)
            else:
                self.ctx = torch.random.fork_rng(devices=[])
                self.ctx.__enter__()
                torch.random.default_generator.manual_seed(seed)

        def __exit__(self, *exc):
            return self.ctx.__exit__(*exc)

    return _Forked()


def augment_audio(fbank: torch.Tensor, cfg: AugmentConfig, train: bool,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """[B,T,M] unnormalized fbank (any float dtype, on the device) -> [B,T,M] float32 normalized, augmented."""
    if fbank.dim() != 3:
        raise ValueError(f"fbank must be [B, time, mel], got shape {list(fbank.shape)}")
    x = fbank.float()
    if train and (cfg.freqm > 0 or cfg.timem > 0):
        spec = x.transpose(1, 2).unsqueeze(1)                 # [B,1,mel,time], as torchaudio expects
        with _fork_rng(x.device, generator):
            if cfg.freqm > 0:
                spec = torchaudio.transforms.FrequencyMasking(cfg.freqm, iid_masks=True)(spec)
            if cfg.timem > 0:
                spec = torchaudio.transforms.TimeMasking(cfg.timem, iid_masks=True)(spec)
        x = spec.squeeze(1).transpose(1, 2)
    x = (x - cfg.norm_mean).div_(cfg.norm_std)
    if train and cfg.noise:
        B, T, M = x.shape
        scale = torch.rand(B, 1, 1, device=x.device, generator=generator) / 10
        x.add_(torch.rand(B, T, M, device=x.device, generator=generator).mul_(scale))
        # torch.roll(x_b, s_b, dims=0) per sample: out[t] = x[(t - s) mod T]
        shift = torch.randint(-T, T, (B, 1), device=x.device, generator=generator)
        idx = (torch.arange(T, device=x.device).unsqueeze(0) - shift) % T
        x = torch.gather(x, 1, idx.unsqueeze(-1).expand(B, T, M))
    return x.contiguous()


def normalize_frames(frames: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    """uint8 [B,nf,3,H,W] -> float32 [B,3,H,W] (nf=1) or [B,3,nf,H,W] (nf>1), ImageNet-normalized."""
    if frames.dim() != 5 or frames.shape[2] != 3:
        raise ValueError(f"frames must be uint8 [B, nf, 3, H, W], got {frames.dtype} {list(frames.shape)}")
    if frames.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8 (as decoded), got {frames.dtype}")
    mean = torch.tensor(cfg.image_mean, device=frames.device).view(1, 1, 3, 1, 1) * 255
    std = torch.tensor(cfg.image_std, device=frames.device).view(1, 1, 3, 1, 1) * 255
    x = (frames.float() - mean).div_(std)
    if x.shape[1] == 1:
        return x[:, 0].contiguous()
    return x.permute(0, 2, 1, 3, 4).contiguous()               # Conv3d layout [B,3,nf,H,W]


def prepare_batch(batch: dict[str, Any], cfg: AugmentConfig, train: bool, device: torch.device | str = "cpu",
                  generator: torch.Generator | None = None) -> dict[str, Any]:
    """A loader batch -> model inputs on `device`: audio [B,T,M] and visual, float32, normalized.

    Tensors move with non_blocking=True (pin the loader's memory for truly asynchronous copies). `tokens` and
    `need_predict` are moved along when the loader produced them; `valid` too (eval padding flags).
    """
    device = torch.device(device)
    out: dict[str, Any] = {
        "audio": augment_audio(batch["fbank"].to(device, non_blocking=True), cfg, train, generator),
        "visual": normalize_frames(batch["frames"].to(device, non_blocking=True), cfg),
    }
    for k in ("tokens", "need_predict", "valid"):
        if k in batch:
            out[k] = batch[k].to(device, non_blocking=True)
    return out
