"""Publish a finished build to object storage through fsspec.

Readers find shards through manifest.json, so the order of uploads is the whole consistency story:
every shard is uploaded (and checked) first and the manifest goes last. A reader therefore sees either
the previous manifest (whose shards are still there: we never delete before the new manifest is up,
and only delete when asked) or the new one with all of its shards present.

Each file is written atomically where the filesystem allows: on a local or mounted filesystem we write
a temporary name and rename it over the destination (rename is atomic within one filesystem); object
stores (s3, gcs, azure, memory) only make an object visible once its upload has completed, so we upload
straight to the final key there.

Publishing is idempotent: a destination file with the manifest's size and sha256 is left alone.
"""
from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

MANIFEST_NAME = "manifest.json"
_CHUNK = 1 << 20


class PublishError(RuntimeError):
    """The build cannot be published as it stands (missing or corrupt shard, bad manifest, failed upload)."""


@dataclass
class ShardEntry:
    """One file the manifest promises: path relative to the build root, its sha256 and size in bytes."""
    path: str
    sha256: str
    size: int | None = None


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


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _sha256_remote(fs: fsspec.AbstractFileSystem, path: str) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest_shard_entries(manifest: dict, manifest_path: str = MANIFEST_NAME) -> list[ShardEntry]:
    """The shard files a manifest.json (parsed) lists, with their checksums.

    Accepts the shards.manifest schema: a top-level "shards" list of objects carrying the shard's path
    (relative to the build root) as "path", its "sha256" and "size"/"bytes"; split sections are also read
    when shards are listed per split ("splits": {name: {"shards": [...]}}).
    """
    raw: list[dict] = []
    if isinstance(manifest.get("shards"), list):
        raw.extend(manifest["shards"])
    splits = manifest.get("splits")
    if isinstance(splits, dict):
        for split in splits.values():
            if isinstance(split, dict) and isinstance(split.get("shards"), list):
                raw.extend(split["shards"])
    if not raw:
        raise PublishError(f"{manifest_path}: lists no shards (expected a 'shards' list)")
    entries: list[ShardEntry] = []
    seen: set[str] = set()
    for i, s in enumerate(raw):
        if not isinstance(s, dict):
            raise PublishError(f"{manifest_path}: shard entry {i} is not an object: {s!r}")
        path = s.get("path") or s.get("file") or s.get("name")
        sha = s.get("sha256")
        if not isinstance(path, str) or not isinstance(sha, str) or len(sha) != 64:
            raise PublishError(f"{manifest_path}: shard entry {i} lacks a path or a 64-hex sha256: {s!r}")
        if Path(path).is_absolute() or ".." in Path(path).parts:
            raise PublishError(f"{manifest_path}: shard path {path!r} must be relative to the build root")
        if path in seen:
            continue
        seen.add(path)
        size = s.get("size", s.get("bytes"))
        entries.append(ShardEntry(path=path, sha256=sha, size=int(size) if size is not None else None))
    return entries


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def _put_atomic(fs: fsspec.AbstractFileSystem, local: Path, dest: str) -> None:
    fs.makedirs(fs._parent(dest), exist_ok=True)
    if _is_local(fs):
        tmp = f"{dest}.tmp-{uuid.uuid4().hex}"
        try:
            fs.put_file(str(local), tmp)
            fs.mv(tmp, dest)  # os.replace underneath: atomic on one filesystem
        finally:
            if fs.exists(tmp):
                fs.rm_file(tmp)
    else:
        # Object stores expose an object only once the upload completed.
        fs.put_file(str(local), dest)


def _already_there(fs: fsspec.AbstractFileSystem, dest: str, entry: ShardEntry, size: int) -> bool:
    try:
        info = fs.info(dest)
    except FileNotFoundError:
        return False
    if info.get("size") != size:
        return False
    return _sha256_remote(fs, dest) == entry.sha256


def publish(out_dir: str | Path, url: str, *, prune: bool = False,
            storage_options: dict | None = None) -> PublishReport:
    """Copy DIR's shards, then DIR/manifest.json, to `url` (any fsspec URL or a local path).

    Every local shard is checked against the manifest's sha256 before anything is uploaded, so a corrupt
    build is refused whole rather than half-published. `prune=True` deletes destination shards (*.tar under
    shards/) that the new manifest does not list, after the manifest is up.
    """
    out = Path(out_dir)
    manifest_path = out / MANIFEST_NAME
    if not manifest_path.is_file():
        raise PublishError(f"{out}: no {MANIFEST_NAME}; is this a finished build?")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise PublishError(f"{manifest_path}: not valid JSON: {e}") from e
    entries = manifest_shard_entries(manifest, str(manifest_path))

    sizes: dict[str, int] = {}
    for e in entries:
        local = out / e.path
        if not local.is_file():
            raise PublishError(f"{local}: listed in {manifest_path} but missing")
        sizes[e.path] = local.stat().st_size
        if e.size is not None and sizes[e.path] != e.size:
            raise PublishError(f"{local}: {sizes[e.path]} bytes, manifest says {e.size}")
        got = sha256_file(local)
        if got != e.sha256:
            raise PublishError(f"{local}: sha256 {got} does not match manifest {e.sha256}")

    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    root = root.rstrip("/")
    report = PublishReport(url=url)
    for e in entries:
        dest = f"{root}/{e.path}"
        if _already_there(fs, dest, e, sizes[e.path]):
            report.skipped.append(e.path)
            continue
        _put_atomic(fs, out / e.path, dest)
        # Confirm the upload before the manifest can point at it.
        if fs.info(dest).get("size") != sizes[e.path]:
            raise PublishError(f"{url}: uploaded {e.path} has the wrong size; manifest not published")
        report.uploaded.append(e.path)
        report.bytes_uploaded += sizes[e.path]

    manifest_dest = f"{root}/{MANIFEST_NAME}"
    local_bytes = manifest_path.read_bytes()
    same = False
    if fs.exists(manifest_dest):
        same = fs.cat_file(manifest_dest) == local_bytes
    if same:
        report.skipped.append(MANIFEST_NAME)
    else:
        _put_atomic(fs, manifest_path, manifest_dest)
        report.manifest_uploaded = True
        report.bytes_uploaded += len(local_bytes)

    if prune:
        report.pruned = _prune(fs, root, entries)
    return report


def _prune(fs: fsspec.AbstractFileSystem, root: str, entries: list[ShardEntry]) -> list[str]:
    """Delete shard files under root/shards that the (already published) manifest no longer lists."""
    root = fs._strip_protocol(root).rstrip("/")
    listed = {f"{root}/{e.path}" for e in entries}
    shards_root = f"{root}/shards"
    pruned: list[str] = []
    if not fs.exists(shards_root):
        return pruned
    for p in sorted(fs.find(shards_root)):
        p = fs._strip_protocol(p)
        if p.endswith(".tar") and p not in listed:
            fs.rm_file(p)
            pruned.append(p[len(root) + 1:])
    return pruned
