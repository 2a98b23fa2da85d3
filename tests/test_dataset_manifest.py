"""shards.manifest: DIR/manifest.json schema, fingerprint, redaction, splits added, shard plan, loading."""
from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import torch

from pipeline.extract import ExtractConfig
from pipeline.features import FbankConfig
from shards.manifest import (FORMAT_VERSION, Changes, fingerprint, fingerprint_parts, load_dataset_manifest,
                             make_split_manifest, redact, shard_plan, write_dataset_manifest)
from shards.writer import build_shards
from tests.test_shards_writer import stage, synthetic_sample


def _csv(tmp_path: Path, name: str) -> Path:
    p = tmp_path / name
    p.write_bytes(b"audiocap_id,youtube_id,start_time,caption\r\n1,7fmOlUlwoNg,20,A dog barks\r\n")
    return p


def _entry(out: Path, split: str, keys_from: int, n: int, tmp_path: Path, **kw):
    samples = [synthetic_sample(i, split=split) for i in range(keys_from, keys_from + n)]
    stage(out, samples, split)
    plan = shard_plan(out, split, num_clips=n, samples_per_shard=4)
    build = build_shards(out, split, plan.num_shards)
    config = {"csv": str(tmp_path / "x.csv"), "split": split, "proxy": "http://alice:s3cret@proxy:3128",
              "cookies": "/srv/avcap/cookies.txt", "api_token": "abc", "samples_per_shard": 4, "frames": 20}
    return plan, make_split_manifest(
        split=split, config=config, extract_cfg=kw.get("extract_cfg", ExtractConfig()), fbank_cfg=FbankConfig(),
        inputs=[_csv(tmp_path, f"{split}.csv")], samples_per_shard=plan.samples_per_shard,
        num_shards=plan.num_shards, build=build,
        counts={"ok": n, "failed-permanent": 1},
        failures=[{"key": "3MoF8myFs8Y_0_10000", "status": "failed-permanent", "reason": "http-404",
                   "message": "HTTP Error 404: Not Found"}],
        changes=Changes(added=n))


def test_manifest_roundtrip_schema_and_contents(tmp_path):
    out = tmp_path / "ds"
    plan, entry = _entry(out, "train", 0, 10, tmp_path)
    written = write_dataset_manifest(out, entry)
    raw = json.loads((out / "manifest.json").read_text())
    assert raw["format_version"] == FORMAT_VERSION and list(raw["splits"]) == ["train"]
    m = load_dataset_manifest(out)
    assert m == written
    t = m.splits["train"]
    # Shard count fixed from samples_per_shard at the first build; shard records match the files.
    assert plan.num_shards == 3 == t.num_shards and not plan.recorded and t.num_samples == 10
    for s in t.shards:
        data = (out / s.path).read_bytes()
        assert s.path.startswith("shards/train/train-") and hashlib.sha256(data).hexdigest() == s.sha256
        assert len(data) == s.bytes
        index = (out / s.index.path).read_bytes()   # format 2: each shard's member index, with its checksum
        assert s.index.path == s.path[: -len(".tar")] + ".idx.json"
        assert (hashlib.sha256(index).hexdigest(), len(index)) == (s.index.sha256, s.index.bytes)
    assert sum(s.num_samples for s in t.shards) == 10
    # Secrets redacted; the cookies path kept.
    assert t.config["proxy"] == "http://***@proxy:3128" and t.config["api_token"] == "***"
    assert t.config["cookies"] == "/srv/avcap/cookies.txt" and "s3cret" not in (out / "manifest.json").read_text()
    # Tool versions: ffmpeg's own version string, and the python packages.
    ff = subprocess.run(["ffmpeg", "-version"], capture_output=True, text=True).stdout.split()[2]
    assert t.tool_versions["ffmpeg"] == ff
    assert {"python", "torch", "torchaudio", "yt-dlp", "webdataset", "pillow", "numpy"} <= set(t.tool_versions)
    csv = tmp_path / "train.csv"
    assert t.inputs[0].sha256 == hashlib.sha256(csv.read_bytes()).hexdigest() and t.inputs[0].bytes == csv.stat().st_size
    assert t.counts == {"ok": 10, "failed-permanent": 1, "failed-transient": 0, "pending": 0}
    assert t.failures[0].reason == "http-404"
    assert t.norm_stats is not None and t.norm_stats.count == 10 * 98 * 128 and t.norm_stats.std > 0
    assert t.changes.added == 10 and len(t.changes.shards_written) == 3
    # What the loader and the model must agree on is at hand.
    assert t.fingerprint_parts["extract"]["frames"] == 20 and m.frames_per_clip == 20
    assert m.fbank["target_length"] == 1024 and m.fbank["num_mel_bins"] == 128
    assert t.fingerprint == fingerprint(t.fingerprint_parts)


def test_fingerprint_tracks_byte_affecting_settings_only():
    base = fingerprint(fingerprint_parts(ExtractConfig(), FbankConfig()))
    assert base == fingerprint(fingerprint_parts(ExtractConfig(threads=4, timeout_s=5), FbankConfig()))
    assert base != fingerprint(fingerprint_parts(ExtractConfig(frames=10), FbankConfig()))
    assert base != fingerprint(fingerprint_parts(ExtractConfig(jpeg_quality=80), FbankConfig()))
    assert base != fingerprint(fingerprint_parts(ExtractConfig(downmix="first"), FbankConfig()))
    assert base != fingerprint(fingerprint_parts(ExtractConfig(), FbankConfig(num_mel_bins=64)))


def test_second_split_is_added_and_rebuild_reuses_shard_count(tmp_path):
    out = tmp_path / "ds"
    write_dataset_manifest(out, _entry(out, "train", 0, 10, tmp_path)[1])
    write_dataset_manifest(out, _entry(out, "val", 100, 3, tmp_path)[1])
    m = load_dataset_manifest(out)
    assert sorted(m.splits) == ["train", "val"] and m.splits["val"].num_shards == 1
    # The recorded shard count wins over a new clip count or samples_per_shard.
    plan = shard_plan(out, "train", num_clips=1000, samples_per_shard=1)
    assert plan.recorded and plan.num_shards == 3 and plan.samples_per_shard == 4
    # Rebuilding train replaces only train's entry.
    plan2, again = _entry(out, "train", 0, 11, tmp_path)
    assert plan2.num_shards == 3
    write_dataset_manifest(out, again)
    m2 = load_dataset_manifest(out)
    assert m2.splits["val"] == m.splits["val"] and m2.splits["train"].num_samples == 11
    assert len(m2.splits["train"].changes.shards_written) == 1   # the new clip's shard only
    assert m2.splits["train"].changes.added == 11   # _entry passes its own Changes(added=n)
    # Without an explicit Changes, added/removed come from the shards: one sample removed here.
    stage(out, [synthetic_sample(i) for i in range(10)])
    build = build_shards(out, "train", 3, keys=[synthetic_sample(i).key for i in range(10)])
    auto = make_split_manifest(split="train", config={}, extract_cfg=ExtractConfig(), fbank_cfg=FbankConfig(),
                               inputs=[], samples_per_shard=4, num_shards=3, build=build, counts={"ok": 10},
                               failures=[])
    assert (auto.changes.added, auto.changes.removed) == (0, 1)


def test_frames_disagreeing_across_splits_clear_the_shared_copy(tmp_path):
    out = tmp_path / "ds"
    write_dataset_manifest(out, _entry(out, "train", 0, 2, tmp_path)[1])
    write_dataset_manifest(out, _entry(out, "val", 50, 2, tmp_path, extract_cfg=ExtractConfig(frames=10))[1])
    m = load_dataset_manifest(out)
    assert m.frames_per_clip is None and m.splits["val"].fingerprint_parts["extract"]["frames"] == 10


def test_load_by_file_url_and_loud_version_errors(tmp_path):
    out = tmp_path / "ds"
    write_dataset_manifest(out, _entry(out, "train", 0, 2, tmp_path)[1])
    by_url = load_dataset_manifest(f"file://{out}")
    assert by_url == load_dataset_manifest(out / "manifest.json") and "train" in by_url.splits
    raw = json.loads((out / "manifest.json").read_text())
    raw["format_version"] = 99
    bad = tmp_path / "bad" / "manifest.json"
    bad.parent.mkdir()
    bad.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="format_version 99"):
        load_dataset_manifest(bad.parent)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_dataset_manifest(bad)
    with pytest.raises(FileNotFoundError):
        load_dataset_manifest(tmp_path / "nowhere")
    del raw["format_version"]
    bad.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="format_version None"):
        load_dataset_manifest(bad)


def test_redact_nested_and_untouched_values():
    cfg = {"download": {"proxy": "socks5://u:p@h:1080", "password": "x", "urls": ["https://k:v@a/b", "c"]},
           "frames": 20, "token": None}
    r = redact(cfg)
    assert r == {"download": {"proxy": "socks5://***@h:1080", "password": "***", "urls": ["https://***@a/b", "c"]},
                 "frames": 20, "token": None}
    assert cfg["download"]["password"] == "x"   # the input is not modified


def test_format_1_manifest_still_loads_and_is_upgraded_when_written(tmp_path):
    """A manifest from before member indexes (format_version 1, no `index` per shard) loads; the loader reads
    its shards by header parsing; adding a split rewrites it as format 2 with the old split's index null."""
    from shards.loader import LoaderConfig, make_loader
    from shards.split_info import load_split
    out = tmp_path / "ds"
    write_dataset_manifest(out, _entry(out, "train", 0, 6, tmp_path)[1])
    batches_v2 = list(make_loader(LoaderConfig(data=str(out), split="train", batch_size=2, num_workers=0,
                                               train=False))[0])
    raw = json.loads((out / "manifest.json").read_text())
    raw["format_version"] = 1
    for s in raw["splits"]["train"]["shards"]:
        del s["index"]
        (out / s["path"].replace(".tar", ".idx.json")).unlink()   # as a format-1 build left it
    (out / "manifest.json").write_text(json.dumps(raw))
    m = load_dataset_manifest(out)
    assert m.format_version == 1 and all(s.index is None for s in m.splits["train"].shards)
    assert all(s.index_url is None for s in load_split(str(out), "train").shards)
    batches_v1 = list(make_loader(LoaderConfig(data=str(out), split="train", batch_size=2, num_workers=0,
                                               train=False))[0])
    assert [b["keys"] for b in batches_v1] == [b["keys"] for b in batches_v2]
    assert all(torch.equal(a["fbank"], b["fbank"]) and torch.equal(a["frames"], b["frames"])
               for a, b in zip(batches_v1, batches_v2))
    written = write_dataset_manifest(out, _entry(out, "val", 100, 2, tmp_path)[1])
    raw = json.loads((out / "manifest.json").read_text())
    assert raw["format_version"] == FORMAT_VERSION == written.format_version == 2
    assert all(s["index"] is None for s in raw["splits"]["train"]["shards"])
    assert all(s["index"]["path"].endswith(".idx.json") for s in raw["splits"]["val"]["shards"])


def test_file_entry_is_the_one_record_and_names_the_file_and_what_differs(tmp_path):
    """Inputs, shards and indexes are one record (shards.file_entry): the writer's entries are the manifest's,
    they round-trip through the manifest's JSON, a malformed one is refused naming it, and the check of a local
    file says which file and what differs (missing, size before sha256)."""
    from shards.file_entry import FileEntry, FileEntryError, ShardEntry
    out = tmp_path / "ds"
    _, entry = _entry(out, "train", 0, 3, tmp_path)
    write_dataset_manifest(out, entry)
    raw = json.loads((out / "manifest.json").read_text())["splits"]["train"]
    assert all(type(s) is ShardEntry and type(s.index) is FileEntry for s in entry.shards)
    assert [s.to_dict() for s in entry.shards] == raw["shards"]
    assert [list(s) for s in raw["shards"]] == [["bytes", "index", "num_samples", "path", "sha256"]] * len(raw["shards"])
    assert [FileEntry.from_dict(x) for x in raw["inputs"]] == entry.inputs
    shard = entry.shards[0]
    assert shard.files() == [shard, shard.index]
    assert FileEntry.of_file(out / shard.path, shard.path) == FileEntry(shard.path, shard.sha256, shard.bytes)
    shard.check(out / shard.path)
    shard.index.check(out / shard.index.path)

    for bad, message in [({**raw["shards"][0], "bytes": "12"}, "bytes '12' is not of type int"),
                         ({k: v for k, v in raw["shards"][0].items() if k != "sha256"}, r"lacks fields \['sha256'\]"),
                         ({**raw["shards"][0], "extra": 1}, r"unknown fields \['extra'\]"),
                         ({**raw["shards"][0], "num_samples": -1}, "num_samples -1 is negative"),
                         ({**raw["shards"][0], "index": {"path": "x.idx.json"}}, "shard #0 index: lacks fields")]:
        with pytest.raises(FileEntryError, match=message):
            ShardEntry.from_dict(bad, "shard #0")
    broken = {"train": {**raw, "inputs": [{"path": "train.csv", "sha256": "0" * 64}]}}
    with pytest.raises(ValueError, match=r"split 'train' input #0: lacks fields \['bytes'\]"):
        load_dataset_manifest_from(tmp_path, broken)

    local = out / shard.path
    data = local.read_bytes()
    local.write_bytes(data[:-1])
    problem = shard.mismatch(local)
    assert (problem.what, problem.where, problem.detail) == (
        "size", str(local), f"{len(data) - 1} bytes, manifest says {shard.bytes}")
    local.write_bytes(bytes([data[0] ^ 1]) + data[1:])
    with pytest.raises(FileEntryError, match=rf"^{local}: sha256 [0-9a-f]{{64}} does not match manifest "
                                             rf"{shard.sha256}$") as e:
        shard.check(local)
    assert e.value.what == "sha256"
    local.unlink()
    assert shard.mismatch(local, listed_in="DIR/manifest.json").detail == "listed in DIR/manifest.json but missing"


def load_dataset_manifest_from(tmp_path: Path, splits: dict):
    """Load a manifest whose split entries are `splits` (written as JSON by hand)."""
    bad = tmp_path / "hand" / "manifest.json"
    bad.parent.mkdir(exist_ok=True)
    bad.write_text(json.dumps({"format_version": FORMAT_VERSION, "splits": splits}))
    return load_dataset_manifest(bad)
