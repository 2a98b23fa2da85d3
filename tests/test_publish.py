"""pipeline.publish: shards and their member indexes, then manifest.json, through fsspec; verified, atomic per file,
idempotent; a published dataset trains through shards.loader."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile

import fsspec
import pytest

from pipeline.publish import PublishError, publish
from shards.hashing import file_sha256
from shards.loader import LoaderConfig, make_loader
from shards.manifest import load_dataset_manifest
from tests.fixtures_ops import copy_build


def _read_back(url: str) -> dict[str, int]:
    """What a reader sees at `url`: the manifest, then every shard it names, opened through fsspec."""
    manifest = load_dataset_manifest(url)
    counts = {}
    for split in manifest.splits.values():
        for s in split.shards:
            with fsspec.open(f"{url.rstrip('/')}/{s.path}", "rb") as f:
                data = f.read()
            assert hashlib.sha256(data).hexdigest() == s.sha256, s.path
            with tarfile.open(fileobj=io.BytesIO(data)) as tf:
                keys = {n.partition(".")[0] for n in tf.getnames()}
            assert len(keys) == s.num_samples, s.path
            counts[s.path] = len(keys)
    return counts


def _files(out) -> list[str]:
    """Shard and index paths the manifest of `out` lists (each shard followed by its index)."""
    paths = []
    for s in load_dataset_manifest(out).splits["test"].shards:
        assert s.index is not None, f"{s.path}: format 2 build without an index"
        paths += [s.path, s.index.path]
    return sorted(paths)


def _load_batches(data: str) -> list[str]:
    """Every sample key of the test split, read as batches through the training loader from `data`."""
    cfg = LoaderConfig(data=data, split="test", batch_size=2, num_workers=0, train=False)
    it, n = make_loader(cfg)
    keys = []
    for batch in it:
        assert batch["fbank"].shape[1:] == (1024, 128) and batch["frames"].shape[0] == len(batch["keys"])
        keys += [k for k, ok in zip(batch["keys"], batch["valid"].tolist()) if ok]
    assert n >= 1
    return sorted(keys)


def test_publish_to_file_url_then_idempotent(ops_build, tmp_path):
    dest = tmp_path / "bucket" / "avcap"
    url = f"file://{dest}"
    report = publish(ops_build.out_dir, url)
    local = load_dataset_manifest(ops_build.out_dir)
    shard_paths = sorted(s.path for s in local.splits["test"].shards)
    files = _files(ops_build.out_dir)
    assert sorted(report.uploaded) == files and report.manifest_uploaded
    assert (dest / "manifest.json").read_bytes() == (ops_build.out_dir / "manifest.json").read_bytes()
    assert sum(_read_back(url).values()) == len(ops_build.keys)
    for s in local.splits["test"].shards:   # each index arrives as the manifest describes it
        assert file_sha256(dest / s.index.path) == s.index.sha256
    # Only what readers need goes out: no ledger, staging, media, and no temporary files left behind.
    published = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert published == sorted(files + ["manifest.json"])
    # The destination is a dataset: the training loader reads every sample from it (indexed, local reader).
    assert _load_batches(url) == ops_build.keys

    again = publish(ops_build.out_dir, url)
    assert again.uploaded == [] and not again.manifest_uploaded and again.bytes_uploaded == 0
    assert sorted(again.skipped) == sorted(files + ["manifest.json"])

    # A damaged copy at the destination is replaced; the intact ones are left alone.
    victim = dest / shard_paths[0]
    victim.write_bytes(victim.read_bytes()[:-1] + b"\1")
    fixed = publish(ops_build.out_dir, url)
    assert fixed.uploaded == [shard_paths[0]] and file_sha256(victim) == file_sha256(ops_build.out_dir / shard_paths[0])


def test_publish_to_memory_store_and_plain_path(ops_build, tmp_path):
    url = "memory://avcap-test/published"
    report = publish(ops_build.out_dir, url)
    assert report.manifest_uploaded and sorted(report.uploaded) == _files(ops_build.out_dir)
    assert sum(_read_back(url).values()) == len(ops_build.keys)
    assert _load_batches(url) == ops_build.keys       # an object store: read through fsspec

    plain = tmp_path / "plain"
    publish(ops_build.out_dir, str(plain))
    assert sum(_read_back(str(plain)).values()) == len(ops_build.keys)
    assert _load_batches(str(plain)) == ops_build.keys


def test_corrupt_shard_is_refused_before_anything_is_published(ops_build, tmp_path):
    b = copy_build(ops_build, tmp_path / "out")
    shard = load_dataset_manifest(b.out_dir).splits["test"].shards[1]
    path = b.out_dir / shard.path
    data = bytearray(path.read_bytes())
    data[1000] ^= 0xFF
    path.write_bytes(bytes(data))
    dest = tmp_path / "dest"
    with pytest.raises(PublishError, match=f"{shard.path}: sha256 .* does not match manifest"):
        publish(b.out_dir, str(dest))
    assert not dest.exists()


def test_corrupt_or_missing_index_is_refused_before_anything_is_published(ops_build, tmp_path):
    b = copy_build(ops_build, tmp_path / "out")
    index = load_dataset_manifest(b.out_dir).splits["test"].shards[0].index
    path = b.out_dir / index.path
    good = path.read_bytes()
    path.write_bytes(good.replace(b'"members"', b'"Members"'))   # same size, other bytes
    dest = tmp_path / "dest"
    with pytest.raises(PublishError, match=f"{index.path}: sha256 .* does not match manifest"):
        publish(b.out_dir, str(dest))
    path.unlink()
    with pytest.raises(PublishError, match=f"{index.path}: listed in .* but missing"):
        publish(b.out_dir, str(dest))
    assert not dest.exists()


def test_failed_shard_upload_leaves_no_manifest(ops_build, tmp_path):
    """The manifest goes last: when a shard cannot be written, readers still see no (or the old) manifest."""
    dest = tmp_path / "dest"
    shards = sorted(s.path for s in load_dataset_manifest(ops_build.out_dir).splits["test"].shards)
    (dest / shards[1]).mkdir(parents=True)      # a directory where the second shard must go: rename fails
    with pytest.raises(PublishError, match=f"uploading {shards[1]} failed.*manifest not published"):
        publish(ops_build.out_dir, str(dest))
    assert (dest / shards[0]).is_file()
    assert not (dest / "manifest.json").exists()
    assert not [p for p in dest.rglob(".*tmp-*")], "temporary upload left behind"


def test_prune_removes_only_unlisted_shards_after_the_manifest(ops_build, tmp_path):
    dest = tmp_path / "dest"
    publish(ops_build.out_dir, str(dest))
    stale = dest / "shards" / "test" / "test-00009.tar"
    stale.write_bytes(b"old shard")
    stale_index = dest / "shards" / "test" / "test-00009.idx.json"
    stale_index.write_bytes(b"{}")
    kept = publish(ops_build.out_dir, str(dest))
    assert kept.pruned == [] and stale.exists() and stale_index.exists()
    pruned = publish(ops_build.out_dir, str(dest), prune=True)
    assert pruned.pruned == ["shards/test/test-00009.idx.json", "shards/test/test-00009.tar"]
    assert not stale.exists() and not stale_index.exists()
    assert sum(_read_back(str(dest)).values()) == len(ops_build.keys)
    published = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert published == sorted(_files(ops_build.out_dir) + ["manifest.json"])   # listed indexes are kept
    assert _load_batches(str(dest)) == ops_build.keys


def test_not_a_build_is_a_clear_error(tmp_path):
    with pytest.raises(PublishError, match="no manifest.json"):
        publish(tmp_path, str(tmp_path / "dest"))
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 99, "splits": {}}))
    with pytest.raises(PublishError, match="format_version"):
        publish(tmp_path, str(tmp_path / "dest"))
