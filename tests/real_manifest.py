"""A real manifest.json for shards a test wrote by hand (synthetic samples, no pipeline run).

The loader reads one manifest form, the pipeline's: so the test datasets get theirs from shards.manifest's own
model and writer (`make_split_manifest`, `write_dataset_manifest`), with each shard's size and sha256 measured
and, when asked, its member index written by the shard writer's `write_shard_index`.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from pipeline.extract import ExtractConfig
from pipeline.features import FbankConfig
from shards.file_entry import FileEntry, ShardEntry
from shards.index import index_path
from shards.manifest import load_dataset_manifest, make_split_manifest, write_dataset_manifest
from shards.writer import ShardBuildResult, write_shard_index


def _index_entry(root: Path, rel: str) -> FileEntry:
    sha, size = write_shard_index(root / rel)
    return FileEntry(index_path(root / rel).relative_to(root).as_posix(), sha, size)


def write_real_manifest(root: Path, splits: dict[str, list[tuple[str, int]]], *, frames: int,
                        target_length: int = 1024, num_mel_bins: int = 128, indexed: bool = False) -> Path:
    """Write `root/manifest.json` for `splits` ({split: [(shard path relative to root, samples in it)]}) as a
    build would: every field of the schema, frames per clip and fbank shape in fingerprint_parts. `indexed`:
    give each shard its member index sidecar (manifest format 2), else `index: null` (header parsing)."""
    root = Path(root)
    extract_cfg = ExtractConfig(frames=frames)
    fbank_cfg = FbankConfig(target_length=target_length, num_mel_bins=num_mel_bins)
    for split, shards in splits.items():
        entries = [ShardEntry(**FileEntry.of_file(root / rel, rel).to_dict(), num_samples=n,
                              index=_index_entry(root, rel) if indexed else None) for rel, n in shards]
        total = sum(n for _, n in shards)
        build = ShardBuildResult(shards=entries, written=[e.path for e in entries], num_samples=total)
        write_dataset_manifest(root, make_split_manifest(
            split=split, config={"synthetic": True}, extract_cfg=extract_cfg, fbank_cfg=fbank_cfg, inputs=[],
            samples_per_shard=max([n for _, n in shards], default=1), num_shards=len(shards), build=build,
            counts={"ok": total}, failures=[]))
    return root


def index_shards(root: Path) -> Path:
    """Give every shard of the manifest at `root` its member index sidecar and record it (format 2)."""
    root = Path(root)
    for entry in load_dataset_manifest(root).splits.values():
        shards = [replace(s, index=_index_entry(root, s.path)) for s in entry.shards]
        write_dataset_manifest(root, replace(entry, shards=shards))
    return root
