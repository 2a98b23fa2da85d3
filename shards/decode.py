"""Decoding of the sample members the loader uses: fbank.npy without copying its data, a JPEG frame to RGB.

`what` names the shard and sample in the ShardError a member that does not decode raises.
"""
from __future__ import annotations

import io

import numpy as np
import torch
from torchvision.io import ImageReadMode
from torchvision.io import decode_jpeg as _decode

from shards.index import ShardError


def decode_npy(buf: bytes, what: str, header_cache: dict[bytes, tuple] | None = None) -> np.ndarray:
    """A .npy member to an array without copying the data (np.load on a BytesIO copies).

    numpy parses the header with ast.literal_eval (~0.1 ms); every sample of a dataset has the same header, so a
    cache keyed by the header bytes skips that.
    """
    head = bytes(buf[:128])
    if header_cache is not None and head in header_cache:
        shape, dtype, offset, count = header_cache[head]
        if len(buf) - offset == count * dtype.itemsize:
            return np.frombuffer(buf, dtype=dtype, count=count, offset=offset).reshape(shape)
    f = io.BytesIO(buf)
    try:
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(f)
    except ValueError as e:
        raise ShardError(f"{what}: fbank.npy is not a valid .npy file ({e})") from e
    count = int(np.prod(shape))
    if fortran or dtype.hasobject or len(buf) - f.tell() != count * dtype.itemsize:
        raise ShardError(f"{what}: fbank.npy holds {len(buf) - f.tell()} data bytes for shape {shape} {dtype}")
    if header_cache is not None and f.tell() <= 128:
        header_cache[head] = (shape, dtype, f.tell(), count)
    return np.frombuffer(buf, dtype=dtype, count=count, offset=f.tell()).reshape(shape)


def decode_jpeg(buf: bytes, what: str) -> torch.Tensor:
    """A JPEG member to a uint8 [3, H, W] RGB tensor (torchvision's decoder: libjpeg-turbo)."""
    try:
        return _decode(torch.frombuffer(bytearray(buf), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as e:
        raise ShardError(f"{what}: undecodable JPEG ({e})") from e
