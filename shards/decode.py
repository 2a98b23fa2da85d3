"""Decoding of a JPEG frame to an RGB tensor, for the loader and the captioner (torchvision's decoder).

The other members' codecs (npy, flac, json) are the sample format's: shards.sample_format. Kept apart from it
because this one needs torch, which the writer, the index and the sample format do not import.
"""
from __future__ import annotations

import torch
from torchvision.io import ImageReadMode
from torchvision.io import decode_jpeg as _decode

from shards.index import ShardError


def decode_jpeg(buf: bytes, what: str) -> torch.Tensor:
    """A JPEG member to a uint8 [3, H, W] RGB tensor (torchvision's decoder: libjpeg-turbo)."""
    try:
        return _decode(torch.frombuffer(bytearray(buf), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as e:
        raise ShardError(f"{what}: undecodable JPEG ({e})") from e
