"""A small learnable dataset in the shard layout, a tiny vocab and model sizes, for the training tests.

Each clip belongs to one of four classes, and both modalities say which: the fbank is loud in the class's mel
band (a tone in a frequency band) and the frames are the class's colour. The captions are fixed per class, so
a model that learns drops its loss well below the start within a few dozen steps.

Sizes are cut down (128 fbank frames instead of 1024, 32x32 frames, 4 frames per clip) so that a 2-process
torchrun run takes seconds on a laptop CPU; the manifest states those sizes, and the model config matches them.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.real_manifest import write_real_manifest

CLASSES = [
    ("a dog barks", "a dog is barking loudly", (200, 30, 30)),
    ("rain falls on a roof", "heavy rain is falling", (30, 200, 30)),
    ("a car engine revs", "an engine is running", (30, 30, 200)),
    ("people talk and laugh", "a crowd of people talking", (200, 200, 30)),
]
TARGET_LENGTH = 128
MEL_BINS = 128
IMG = 32
FRAMES = 4

# AVCapConfig fields for a model that fits the data above and runs fast on CPU.
TINY_MODEL_OVERRIDES = {
    "depth_a": 1, "depth_v": 1, "depth_u": 1, "embed_dim": 32, "num_heads": 2,
    "audio_length": TARGET_LENGTH, "num_mel_bins": MEL_BINS, "img_size": IMG,
    "text_hidden": 32, "text_heads": 2, "text_ffn": 64, "text_layers": 1, "max_positions": 64,
}


@dataclass
class TrainData:
    root: Path          # dataset dir (manifest.json + shards/)
    vocab: Path         # vocab.txt built from the captions
    model_overrides: str  # JSON for --model-overrides
    train_sizes: list[int]
    val_sizes: list[int]

    def references(self, split: str) -> dict[str, list[str]]:
        refs = {}
        manifest = json.loads((self.root / "manifest.json").read_text())
        import webdataset as wds
        for shard in manifest["splits"][split]["shards"]:
            for sample in wds.WebDataset(str(self.root / shard["path"]), shardshuffle=False):
                refs[sample["__key__"]] = json.loads(sample["json"])["captions"]
        return refs


def _jpeg(rgb: tuple[int, int, int], shade: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (IMG, IMG), tuple(min(255, c + shade) for c in rgb)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _fbank(cls: int, rng: np.random.Generator) -> np.ndarray:
    # Log-mel-like values: quiet background around -8, the class's band of 32 mel bins loud around +2.
    x = rng.normal(-8.0, 1.0, size=(TARGET_LENGTH, MEL_BINS))
    band = slice(32 * cls, 32 * cls + 32)
    x[:, band] += 10.0
    return x.astype(np.float16)


def build_learnable_dataset(root: Path, splits: dict[str, list[int]], seed: int = 0) -> Path:
    """shards/{split}/{split}-{i:05d}.tar + manifest.json; clip n is class n % 4."""
    import webdataset as wds
    rng = np.random.default_rng(seed)
    shards: dict[str, list[tuple[str, int]]] = {}
    n = 0
    for split, sizes in splits.items():
        entries = shards.setdefault(split, [])
        for i, size in enumerate(sizes):
            rel = f"shards/{split}/{split}-{i:05d}.tar"
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            with wds.TarWriter(str(path)) as w:
                for _ in range(size):
                    cls = n % len(CLASSES)
                    cap_a, cap_b, rgb = CLASSES[cls]
                    key = f"syn{n:05d}xyzw_{n * 1000}_{n * 1000 + 10000}"
                    npy = io.BytesIO()
                    np.save(npy, _fbank(cls, rng))
                    sample = {"__key__": key, "fbank.npy": npy.getvalue(), "flac": b"\0" * 64,
                              "json": json.dumps({"key": key, "split": split, "captions": [cap_a, cap_b],
                                                  "youtube_id": f"syn{n:05d}xyzw", "start_time": n}).encode()}
                    for f in range(FRAMES):
                        sample[f"frame{f:02d}.jpg"] = _jpeg(rgb, 5 * f)
                    w.write(sample)
                    n += 1
            entries.append((rel, size))
    return write_real_manifest(root, shards, frames=FRAMES, target_length=TARGET_LENGTH, num_mel_bins=MEL_BINS)


def make_train_data(root: Path, train_sizes: list[int], val_sizes: list[int]) -> TrainData:
    from avcap.tokenizer import build_wordpiece_vocab
    build_learnable_dataset(root, {"train": train_sizes, "val": val_sizes})
    captions = [c for a, b, _ in CLASSES for c in (a, b)]
    vocab = build_wordpiece_vocab(captions * 4, root / "vocab.txt", vocab_size=200)
    return TrainData(root=root, vocab=vocab, model_overrides=json.dumps(TINY_MODEL_OVERRIDES),
                     train_sizes=train_sizes, val_sizes=val_sizes)


@pytest.fixture(scope="session")
def learnable_data(tmp_path_factory) -> TrainData:
    """train: 3 uneven shards (20, 4, 24 clips); val: one shard of 6 clips (fewer shards than ranks)."""
    return make_train_data(tmp_path_factory.mktemp("learnable"), [20, 4, 24], [6])
