"""What the loader needs to know about one split of a dataset, read from its manifest: the shards (resolved
URLs, sample counts, size and sha256, member index), frames per clip and the fbank shape.

Every later stage (the epoch plan, the shard readers, the batcher, the dataset) takes these records, so the
manifest is read in the calling process, never in a worker: once per run by training (every epoch's loader
takes the split it read), once per loader otherwise.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from shards.file_entry import ShardEntry
from shards.hashing import bytes_sha256
from shards.manifest import ManifestError, read_split, resolve_path


@dataclass(frozen=True)
class ShardInfo:
    """A shard as the loader opens it: the manifest's entry (shards.file_entry.ShardEntry, paths relative to the
    manifest) and where its files are, resolved (absolute local paths or URLs). Its own type rather than the
    entry because what a reader opens is the resolved URL, never the manifest's path; the size, sha256 and
    count are the entry's, not copies."""
    entry: ShardEntry
    url: str
    index_url: str | None = None      # member index sidecar (manifest format 2), else header parsing

    @property
    def num_samples(self) -> int:
        return self.entry.num_samples

    @property
    def bytes(self) -> int:
        return self.entry.bytes

    @property
    def sha256(self) -> str:
        return self.entry.sha256

    @property
    def index_sha256(self) -> str | None:
        return self.entry.index.sha256 if self.entry.index is not None else None


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

    def shard_list_digest(self) -> str:
        """sha256 of what an epoch plan depends on: each shard's manifest path, sample count and sha256, in order
        (not where the shards are read from: ranks may read one dataset from different mirrors)."""
        rows = [[s.entry.path, s.num_samples, s.sha256] for s in self.shards]
        return bytes_sha256(json.dumps([self.split, rows], separators=(",", ":")).encode())


def load_split(data: str, split: str, shard_base: str = "") -> SplitInfo:
    """Read the shard list of `split` from the dataset manifest (a directory or a manifest URL).

    The manifest is read and checked by shards.manifest (`read_split`: relative paths only, each shard once,
    counts that add up, the split's entry in the full schema); every shard and index path resolves under the
    manifest's location, or under `shard_base` when the user gives one (shards.manifest.resolve_path)."""
    url, entry = read_split(data, split)
    if not entry.shards:
        raise ManifestError(f"dataset manifest {url}: split {split!r} lists no shards")
    shards = [ShardInfo(s, resolve_path(url, s.path, shard_base),
                        resolve_path(url, s.index.path, shard_base) if s.index is not None else None)
              for s in entry.shards]
    if not sum(s.num_samples for s in shards):
        raise ManifestError(f"dataset manifest {url}: split {split!r} holds no samples")
    parts = entry.fingerprint_parts
    try:
        frames, fbank = int(parts["extract"]["frames"]), dict(parts["fbank"])
        target_length, num_mel_bins = int(fbank["target_length"]), int(fbank["num_mel_bins"])
    except (KeyError, TypeError, ValueError) as e:
        raise ManifestError(f"dataset manifest {url}: split {split!r} does not say its frames per clip and fbank "
                            f"shape (fingerprint_parts.extract.frames, .fbank.target_length and .num_mel_bins: "
                            f"{type(e).__name__} {e})") from e
    return SplitInfo(split=split, shards=shards, frames_per_clip=frames, manifest_url=url, fbank=fbank,
                     target_length=target_length, num_mel_bins=num_mel_bins)
