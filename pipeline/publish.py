"""Publish a finished build to object storage through fsspec.

Readers find shards through manifest.json, so the order of uploads is the whole consistency story:
every shard and its member index sidecar (`*.idx.json`, manifest format 2) is uploaded (and checked) first
and the manifest goes last. A reader therefore sees either
the previous manifest (whose shards are still there: we never delete before the new manifest is up,
and only delete when asked) or the new one with all of its shards present.

Each file is written atomically where the filesystem allows: on a local or mounted filesystem we write
a temporary name and rename it over the destination (rename is atomic within one filesystem); object
stores (s3, gcs, azure, memory) only make an object visible once its upload has completed, so we upload
straight to the final key there.

Publishing is idempotent: a destination file with the manifest's size and sha256 is left alone.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from shards.atomic import temp_path
from shards.index import INDEX_SUFFIX
from shards.file_entry import FileEntry, FileEntryError, ShardEntry
from shards.manifest import MANIFEST_NAME, DatasetManifest, parse_manifest
from shards.hashing import stream_sha256

class PublishError(RuntimeError):
    """The build cannot be published as it stands (missing or corrupt shard, bad manifest, failed upload)."""


@dataclass
class PublishReport:
    url: str
    uploaded: list[str] = field(default_factory=list)   # relative paths written this time
    skipped: list[str] = field(default_factory=list)    # already present with the same size and sha256
    pruned: list[str] = field(default_factory=list)     # old shards deleted after the new manifest went up
    manifest_uploaded: bool = False
    bytes_uploaded: int = 0

    def to_json(self) -> dict:
        return asdict(self)


def _sha256_remote(fs: fsspec.AbstractFileSystem, path: str) -> str:
    with fs.open(path, "rb") as f:
        return stream_sha256(f)


def manifest_shard_entries(manifest: DatasetManifest) -> list[ShardEntry]:
    """Every shard file the manifest lists, over all splits, in a stable order (paths checked relative to the
    build root by shards.manifest.check_manifest when the manifest was read)."""
    return [s for name in sorted(manifest.splits) for s in manifest.splits[name].shards]


def manifest_files(manifest: DatasetManifest) -> list[FileEntry]:
    """Every shard and index file the manifest lists, each shard followed by its index (format 2)."""
    return [f for s in manifest_shard_entries(manifest) for f in s.files()]


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def _put_atomic(fs: fsspec.AbstractFileSystem, dest: str, *, local: Path | None = None,
                data: bytes | None = None) -> None:
    """Write a local file or bytes to `dest` so that a reader never sees a partial file."""
    fs.makedirs(fs._parent(dest), exist_ok=True)
    if _is_local(fs):
        parent, name = dest.rsplit("/", 1)
        tmp = f"{parent}/{temp_path(Path(name)).name}"  # hidden, never a shard name; carries our pid
        try:
            if local is not None:
                fs.put_file(str(local), tmp)
            else:
                fs.pipe_file(tmp, data)
            os.replace(tmp, dest)  # atomic on one filesystem; fails rather than moving into a directory
        finally:
            if fs.exists(tmp):
                fs.rm_file(tmp)
    elif local is not None:
        # Object stores expose an object only once its upload completed.
        fs.put_file(str(local), dest)
    else:
        fs.pipe_file(dest, data)


def _already_there(fs: fsspec.AbstractFileSystem, dest: str, entry: FileEntry, size: int) -> bool:
    try:
        info = fs.info(dest)
    except FileNotFoundError:
        return False
    if info.get("size") != size:
        return False
    return _sha256_remote(fs, dest) == entry.sha256


def publish(out_dir: str | Path, url: str, *, prune: bool = False,
            storage_options: dict | None = None) -> PublishReport:
    """Copy DIR's shards and their member indexes, then DIR/manifest.json, to `url` (any fsspec URL or a
    local path).

    Every local shard and index is checked against the manifest's size and sha256 before anything is
    uploaded, so a corrupt build is refused whole rather than half-published. `prune=True` deletes destination
    shards and indexes (`*.tar`, `*.idx.json` under shards/) that the new manifest does not list, after the
    manifest is up.
    """
    out = Path(out_dir)
    manifest_path = out / MANIFEST_NAME
    if not manifest_path.is_file():
        raise PublishError(f"{out}: no {MANIFEST_NAME}; is this a finished build?")
    # The bytes read here are the ones published: a manifest rewritten meanwhile cannot slip in unchecked.
    manifest_bytes = manifest_path.read_bytes()
    try:
        manifest = DatasetManifest.from_dict(parse_manifest(manifest_bytes, str(manifest_path)),
                                             where=str(manifest_path))
    except (ValueError, TypeError) as e:
        raise PublishError(f"{manifest_path}: not a dataset manifest: {e}") from e
    if not manifest_shard_entries(manifest):
        raise PublishError(f"{manifest_path}: lists no shards; nothing to publish")
    files = manifest_files(manifest)

    for f in files:
        try:
            f.check(out / f.path, listed_in=str(manifest_path))
        except FileEntryError as err:
            raise PublishError(str(err)) from err

    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    root = root.rstrip("/")
    report = PublishReport(url=url)
    for f in files:
        dest = f"{root}/{f.path}"
        if _already_there(fs, dest, f, f.bytes):
            report.skipped.append(f.path)
            continue
        try:
            _put_atomic(fs, dest, local=out / f.path)
        except OSError as err:
            raise PublishError(f"{url}: uploading {f.path} failed ({err}); manifest not published") from err
        # Confirm the upload before the manifest can point at it.
        if fs.info(dest).get("size") != f.bytes:
            raise PublishError(f"{url}: uploaded {f.path} has the wrong size; manifest not published")
        report.uploaded.append(f.path)
        report.bytes_uploaded += f.bytes

    manifest_dest = f"{root}/{MANIFEST_NAME}"
    if fs.exists(manifest_dest) and fs.cat_file(manifest_dest) == manifest_bytes:
        report.skipped.append(MANIFEST_NAME)
    else:
        _put_atomic(fs, manifest_dest, data=manifest_bytes)
        report.manifest_uploaded = True
        report.bytes_uploaded += len(manifest_bytes)

    if prune:
        report.pruned = _prune(fs, root, files)
    return report


def _prune(fs: fsspec.AbstractFileSystem, root: str, files: list[FileEntry]) -> list[str]:
    """Delete shard and index files under root/shards that the (already published) manifest no longer lists."""
    root = fs._strip_protocol(root).rstrip("/")
    listed = {f"{root}/{f.path}" for f in files}
    shards_root = f"{root}/shards"
    pruned: list[str] = []
    if not fs.exists(shards_root):
        return pruned
    for p in sorted(fs.find(shards_root)):
        p = fs._strip_protocol(p)
        if p.endswith((".tar", INDEX_SUFFIX)) and p not in listed:
            fs.rm_file(p)
            pruned.append(p[len(root) + 1:])
    return pruned


def main(argv: list[str] | None = None) -> int:
    import argparse
    p = argparse.ArgumentParser(description="Publish a finished build (shards, then manifest.json) via fsspec.")
    p.add_argument("--out", required=True, type=Path, help="build directory holding manifest.json")
    p.add_argument("--publish", required=True, metavar="URL", help="destination: a path or fsspec URL")
    p.add_argument("--prune", action="store_true",
                   help="delete destination shards and indexes the manifest no longer lists")
    args = p.parse_args(argv)
    try:
        report = publish(args.out, args.publish, prune=args.prune)
    except PublishError as e:
        print(f"publish failed: {e}")
        return 1
    print(f"published {args.out} to {args.publish}: {len(report.uploaded)} files uploaded, "
          f"{len(report.skipped)} files already there, manifest {'uploaded' if report.manifest_uploaded else 'unchanged'}"
          + (f", {len(report.pruned)} stale files pruned" if report.pruned else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
