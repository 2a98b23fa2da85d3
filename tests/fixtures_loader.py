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
from PIL import Image


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
    manifest = {"format_version": 1, "frames_per_clip": frames,
                "fbank": {"target_length": target_length, "num_mel_bins": mel}, "splits": {}}
    c = 0
    for split, sizes in shard_sizes.items():
        entries = []
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
            entries.append({"path": rel, "num_samples": n, "bytes": path.stat().st_size})
        manifest["splits"][split] = {"shards": entries}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return root


def clip_number(key: str) -> int:
    return int(key[4:8])


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """train: 3 uneven shards (5, 2, 9 clips); val: 1 shard of 7 clips (fewer shards than ranks x workers)."""
    return build_dataset(tmp_path_factory.mktemp("tiny_shards"), {"train": [5, 2, 9], "val": [7]})
