"""What the loader needs to know about one split of a dataset, read from its manifest: the shards (resolved
URLs, sample counts, size and sha256, member index), frames per clip and the fbank shape.

Every later stage (the epoch plan, the shard readers, the batcher, the dataset) takes these records, so the
manifest is read once per loader, in the calling process, and not again in each worker.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ShardInfo:
    url: str
    num_samples: int
    bytes: int | None = None          # size and sha256 from the manifest, when it records them
    sha256: str | None = None
    index_url: str | None = None      # member index sidecar (manifest format 2), else header parsing
    index_sha256: str | None = None


@dataclass
class SplitInfo:
    """What the loader needs from the dataset manifest for one split."""
    split: str
    shards: list[ShardInfo]
    frames_per_clip: int
    manifest_url: str
    fbank: dict[str, Any] = field(default_factory=dict)
    target_length: int = 1024
    num_mel_bins: int = 128

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)


def load_split(data: str, split: str, shard_base: str = "") -> SplitInfo:
    """Read the shard list of `split` from the dataset manifest (a directory or a manifest URL).

    The manifest is read and checked by shards.manifest (relative paths only, each shard once, counts that add
    up); every shard and index path resolves under the manifest's location, or under `shard_base` when the user
    gives one (shards.manifest.resolve_path)."""
    from shards.manifest import ManifestError, read_manifest, resolve_path
    url, raw = read_manifest(data)
    splits = raw["splits"]
    if split not in splits:
        raise ManifestError(f"dataset manifest {url} has no split {split!r} (splits: {sorted(splits)})")
    entry = splits[split]
    if not entry["shards"]:
        raise ManifestError(f"dataset manifest {url}: split {split!r} lists no shards")
    shards = []
    for s in entry["shards"]:
        index = s.get("index")
        shards.append(ShardInfo(resolve_path(url, s["path"], shard_base), s["num_samples"],
                                bytes=int(s["bytes"]) if s.get("bytes") is not None else None,
                                sha256=s.get("sha256"),
                                index_url=resolve_path(url, index["path"], shard_base) if index else None,
                                index_sha256=index["sha256"] if index else None))
    if not sum(s.num_samples for s in shards):
        raise ManifestError(f"dataset manifest {url}: split {split!r} holds no samples")
    # Two manifest shapes: the pipeline's (shards.manifest: per split, fingerprint_parts.extract/fbank) and a
    # flat one (top-level frames_per_clip / fbank) that hand-made test datasets use.
    parts = entry.get("fingerprint_parts") or {}
    frames = (parts.get("extract") or {}).get("frames", raw.get("frames_per_clip"))
    if frames is None:
        raise ManifestError(f"dataset manifest {url}: split {split!r} does not say its frames per clip")
    fbank = parts.get("fbank") or raw.get("fbank") or {}
    return SplitInfo(split=split, shards=shards, frames_per_clip=int(frames), manifest_url=url, fbank=dict(fbank),
                     target_length=int(fbank.get("target_length", 1024)),
                     num_mel_bins=int(fbank.get("num_mel_bins", 128)))
