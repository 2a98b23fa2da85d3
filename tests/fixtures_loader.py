"""Small synthetic datasets in the shard layout of ARCHITECTURE.md, for the loader and augmentation tests.

Samples carry their identity in their data so tests can check what the loader returns: clip number c has
fbank value c everywhere (exact in float16 for c < 2048) and frame f of clip c is a flat JPEG of gray level
10*f (JPEG keeps flat images within a level or two), so the frame index is readable off the pixels.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shards.loader import LoaderConfig, make_loader
from tests.real_manifest import index_shards, write_real_manifest


def _jpeg(level: int, size: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (level, level, level)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def clip_key(c: int) -> str:
    return f"clip{c:04d}xxx_{c * 1000}_{c * 1000 + 10000}"   # an 11-character id, as YouTube's


def build_dataset(root: Path, shard_sizes: dict[str, list[int]], frames: int = 20, size: int = 224,
                  target_length: int = 1024, mel: int = 128, captions_per_clip: int = 2) -> Path:
    """Writes shards/{split}/{split}-{i:05d}.tar and manifest.json; clip numbers run on across splits."""
    import webdataset as wds
    jpegs = [_jpeg(10 * f, size) for f in range(frames)]
    splits: dict[str, list[tuple[str, int]]] = {}
    c = 0
    for split, sizes in shard_sizes.items():
        entries = splits.setdefault(split, [])
        for i, n in enumerate(sizes):
            rel = f"shards/{split}/{split}-{i:05d}.tar"
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            with wds.TarWriter(str(path)) as w:
                for _ in range(n):
                    fb = np.full((target_length, mel), c, dtype=np.float16)
                    npy = io.BytesIO()
                    np.save(npy, fb)
                    sample = {"__key__": clip_key(c), "fbank.npy": npy.getvalue(),
                              "flac": b"\0" * 1000,   # not read by the loader; stands in for the audio
                              "json": json.dumps({"key": clip_key(c), "split": split,
                                                  "captions": [f"clip {c} caption {k}" for k in range(captions_per_clip)]}).encode()}
                    for f in range(frames):
                        sample[f"frame{f:02d}.jpg"] = jpegs[f]
                    w.write(sample)
                    c += 1
            entries.append((rel, n))
    return write_real_manifest(root, splits, frames=frames, target_length=target_length, num_mel_bins=mel)


def add_member_indexes(root: Path) -> Path:
    """Give every shard of a hand-made dataset its member index sidecar and a format-2 manifest entry."""
    return index_shards(root)


def run_epoch(cfg: LoaderConfig, world_size: int, epoch: int = 0, start_batch: int = 0) -> list[list[dict]]:
    """Every rank's batches of one epoch (ranks one after another), checking each rank's batch count."""
    out = []
    for rank in range(world_size):
        it, n = make_loader(cfg, rank, world_size, epoch, start_batch=start_batch)
        batches = list(it)
        assert len(batches) == n - start_batch, f"rank {rank} yielded {len(batches)} of {n - start_batch} batches"
        out.append(batches)
    return out


def batches_as_data(per_rank: list[list[dict]]) -> list[list[tuple]]:
    """Batches as comparable data (copies: a batch's tensors may be reused buffers)."""
    return [[(b["keys"], b["frame_index"].tolist(), b["caption"], b["valid"].tolist(), b["fbank"].clone(),
              b["frames"].clone()) for b in r] for r in per_rank]


def same_batches(a: list[list[tuple]], b: list[list[tuple]]) -> None:
    """Tensor for tensor equality of two runs' batches_as_data."""
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert len(ra) == len(rb)
        for x, y in zip(ra, rb):
            assert x[:4] == y[:4] and torch.equal(x[4], y[4]) and torch.equal(x[5], y[5])


def clip_number(key: str) -> int:
    return int(key[4:8])


def check_batch_content(b: dict, F: int = 20) -> None:
    """Each sample's data is its own: fbank value = clip number, pixel level = 10 x frame index."""
    for i, key in enumerate(b["keys"]):
        c = clip_number(key)
        assert float(b["fbank"][i, 0, 0]) == c and float(b["fbank"][i, -1, -1]) == c
        for j in range(b["frames"].shape[1]):
            level = float(b["frames"][i, j].float().mean())
            assert abs(level - 10 * (int(b["frame_index"][i]) + j)) < 3, (key, j, level)
        assert b["caption"][i] in b["captions"][i]
        assert b["captions"][i][0] == f"clip {c} caption 0"


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """train: 3 uneven shards (5, 2, 9 clips); val: 1 shard of 7 clips (fewer shards than ranks x workers)."""
    return build_dataset(tmp_path_factory.mktemp("tiny_shards"), {"train": [5, 2, 9], "val": [7]})
