"""shards.writer: staged samples, deterministic shards, incremental rewrites, atomicity under SIGKILL."""
from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from pipeline.features import compute_fbank, num_fbank_frames
from pipeline.stage import stage_clip
from shards.index import ShardIndex, index_path
from shards.readers import IndexedShardReader
from shards.sample_format import decode_flac, encode_flac, encode_json, encode_sample
from shards.split_info import ShardInfo
from shards.writer import (Sample, build_shards, discard_staged, num_shards_for, read_staged_sample, shard_index,
                           shard_name_re, split_samples, staged_path, write_shard, write_staged_sample)
from tests.media import MediaSpec, make_media
from tests.test_features import spec_fbank

REPO = Path(__file__).resolve().parent.parent


def _jpeg(level: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (224, 224), (level, 255 - level, 0)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def synthetic_sample(i: int, split: str = "train", seconds: float = 1.0) -> Sample:
    """A small but real sample: fbank computed from its own waveform, 20 JPEG frames."""
    rng = np.random.default_rng(i)
    wav = (rng.standard_normal(int(16000 * seconds)) * 3000).astype(np.int16)
    key = f"{'-' if i % 3 == 0 else 'a'}{i:010d}_{i * 1000}_{i * 1000 + 10000}"
    meta = {"key": key, "youtube_id": key[:11], "start_time": i, "split": split, "captions": [f"clip {i}"] * 5,
            "audiocap_ids": list(range(5)), "duration": seconds, "media_sha256": "0" * 64,
            "fbank_frames": num_fbank_frames(len(wav))}
    return Sample(key, encode_sample(fbank=compute_fbank(wav), waveform=wav, sample_rate=16000,
                                     frames=[_jpeg((i * 7 + f) % 256) for f in range(20)], meta=meta))


def stage(out: Path, samples: list[Sample], split: str = "train") -> None:
    for s in samples:
        write_staged_sample(staged_path(out, split, s.key), s)


def test_shard_index_is_sha256_of_key_and_counts():
    key = "7fmOlUlwoNg_20000_30000"
    assert shard_index(key, 7) == int(hashlib.sha256(key.encode()).hexdigest(), 16) % 7
    assert shard_index(key, 1) == 0
    spread = {shard_index(f"k{i:010d}_0_10000", 4) for i in range(200)}
    assert spread == {0, 1, 2, 3}
    assert num_shards_for(0, 256) == 1 and num_shards_for(256, 256) == 1 and num_shards_for(257, 256) == 2
    with pytest.raises(ValueError):
        shard_index(key, 0)


def test_flac_is_lossless_and_deterministic():
    w = (np.random.default_rng(0).standard_normal(32000) * 5000).astype(np.int16)
    a, b = encode_flac(w, 16000), encode_flac(w.copy(), 16000)
    assert a == b and a[:4] == b"fLaC"
    back, sr = decode_flac(a, "flac")
    assert sr == 16000 and back.dtype == np.int16 and np.array_equal(back, w)


def test_staged_sample_roundtrip_and_validation(tmp_path):
    s = synthetic_sample(1)
    path = staged_path(tmp_path, "train", s.key)
    write_staged_sample(path, s)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    back = read_staged_sample(path)
    assert back.key == s.key and back.members == s.members
    assert len(back.frames) == 20 and back.meta["captions"] == ["clip 1"] * 5
    with pytest.raises(ValueError, match="sample key"):
        staged_path(tmp_path, "train", "not a key")
    with pytest.raises(ValueError, match="split"):
        staged_path(tmp_path, "../etc", s.key)
    bad = tmp_path / "x" / f"{s.key}.tar"
    bad.parent.mkdir()
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable tar"):
        read_staged_sample(bad)


def test_stage_clip_from_real_media_fbank_equals_its_flac(tmp_path):
    media = make_media(tmp_path / "clip.mp4", MediaSpec(12, sample_rate=48000, channels=2, tone_hz=900))
    key = "-NrFeH-kBSM_1000_11000"
    meta = {"key": key, "youtube_id": "-NrFeH-kBSM", "start_time": 1, "split": "test",
            "captions": [f"caption {i}" for i in range(5)], "audiocap_ids": [1, 2, 3, 4, 5], "media_sha256": "ab"}
    s = stage_clip(media, 1, meta, staged_path(tmp_path, "test", key))
    back = read_staged_sample(staged_path(tmp_path, "test", key))
    assert back.members == s.members
    m = back.meta
    assert m["captions"] == meta["captions"] and m["audiocap_ids"] == [1, 2, 3, 4, 5]
    assert m["duration"] == 10.0 and m["fbank_frames"] == 998 and m["frames"] == 20 and m["split"] == "test"
    wav, sr = decode_flac(back.members["flac"], "flac")
    assert sr == 16000 and wav.shape == (160000,)
    # The stored fbank is exactly torchaudio's Kaldi fbank of the stored FLAC (docs/original.md §1).
    ref = spec_fbank(wav)
    fb = back.fbank
    assert fb.shape == (1024, 128) and fb.dtype == np.float16
    assert np.array_equal(fb[:998], ref.numpy().astype(np.float16)) and not fb[998:].any()


def _shard_files(out: Path, split: str = "train") -> dict[str, bytes]:
    pat = shard_name_re(split)
    return {p.name: p.read_bytes() for p in (out / "shards" / split).iterdir() if pat.match(p.name)}


def test_shards_are_deterministic_sorted_and_normalized(tmp_path):
    samples = [synthetic_sample(i) for i in range(12)]
    a, b = tmp_path / "a", tmp_path / "b"
    stage(a, samples)
    stage(b, list(reversed(samples)))          # staging order must not matter
    ra, rb = build_shards(a, "train", 3), build_shards(b, "train", 3)
    assert _shard_files(a) == _shard_files(b) and len(_shard_files(a)) == 3
    assert [(s.path, s.sha256, s.bytes, s.num_samples) for s in ra.shards] == \
           [(s.path, s.sha256, s.bytes, s.num_samples) for s in rb.shards]
    assert sum(s.num_samples for s in ra.shards) == 12 == ra.num_samples
    for info in ra.shards:
        path = a / info.path
        assert hashlib.sha256(path.read_bytes()).hexdigest() == info.sha256 and path.stat().st_size == info.bytes
        with tarfile.open(path) as tf:
            members = tf.getmembers()
        assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" and m.gname == ""
                   and m.mode == 0o644 for m in members)
        keys = [m.name.split(".", 1)[0] for m in members]
        assert keys == sorted(keys)
        assert {shard_index(k, 3) for k in keys} == {int(path.name[-9:-4])}
    # webdataset reads them back, every member intact.
    urls = [str(a / s.path) for s in ra.shards]
    got = {d["__key__"]: d for d in wds.WebDataset(urls, shardshuffle=False)}
    assert set(got) == {s.key for s in samples}
    for s in samples:
        assert all(got[s.key][k] == v for k, v in s.members.items())
    # Stats over real frames of every sample (1 s clips: 98 real frames each).
    assert ra.stats.count == 12 * 98 * 128


def test_adding_or_removing_a_clip_rewrites_only_its_shard(tmp_path):
    samples = [synthetic_sample(i) for i in range(16)]
    stage(tmp_path, samples)
    n = 8
    first = build_shards(tmp_path, "train", n, keys=[s.key for s in samples[:15]])
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (tmp_path / "shards/train").iterdir()}
    new = samples[15]
    added = build_shards(tmp_path, "train", n, keys=[s.key for s in samples])
    target = f"shards/train/train-{shard_index(new.key, n):05d}.tar"
    assert added.written == [target] and len(added.unchanged) == len(first.shards) - (target in before and 1 or 0)
    assert first.added_keys == sorted(s.key for s in samples[:15]) and first.removed_keys == []
    assert added.added_keys == [new.key] and added.removed_keys == []
    for p in (tmp_path / "shards/train").iterdir():   # other shards and their indexes untouched
        if p.name not in (Path(target).name, index_path(Path(target)).name):
            assert (p.stat().st_ino, p.stat().st_mtime_ns) == before[p.name]
    # Remove every clip of one shard: that shard file goes, the rest stay untouched.
    victim = shard_index(samples[0].key, n)
    keep = [s.key for s in samples if shard_index(s.key, n) != victim]
    removed = build_shards(tmp_path, "train", n, keys=keep)
    assert removed.removed == [f"shards/train/train-{victim:05d}.tar"] and removed.written == []
    assert removed.removed_keys == sorted(s.key for s in samples if shard_index(s.key, n) == victim)
    assert removed.added_keys == []
    assert not (tmp_path / removed.removed[0]).exists()
    assert not index_path(tmp_path / removed.removed[0]).exists()   # its index goes with it
    # Same set again from a clean directory: identical bytes (order of history does not matter).
    other = tmp_path / "other"
    stage(other, samples)
    build_shards(other, "train", n, keys=keep)
    assert _shard_files(other) == _shard_files(tmp_path)


def test_missing_staged_sample_is_an_error(tmp_path):
    stage(tmp_path, [synthetic_sample(1)])
    with pytest.raises(FileNotFoundError, match="no staged file"):
        build_shards(tmp_path, "train", 1, keys=[synthetic_sample(1).key, synthetic_sample(2).key])


def test_write_shard_rejects_duplicates(tmp_path):
    s = synthetic_sample(1)
    with pytest.raises(ValueError, match="duplicate"):
        write_shard(tmp_path / "train-00000.tar", [s, s])


_CHILD = """
import sys
from shards.writer import build_shards
build_shards(sys.argv[1], "train", int(sys.argv[2]))
"""


def test_sigkilled_build_leaves_no_fake_shard_and_rerun_matches(tmp_path):
    # Big enough samples (5 s of audio each) that the child is caught writing a shard.
    samples = [synthetic_sample(i, seconds=5.0) for i in range(16)]
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    stage(killed, samples)
    stage(clean, samples)
    build_shards(clean, "train", 4)
    expected = _shard_files(clean)

    shards_dir = killed / "shards" / "train"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(killed), "4"], cwd=REPO)
    saw_temp = False
    deadline = time.monotonic() + 60
    while child.poll() is None and time.monotonic() < deadline:
        if shards_dir.is_dir() and any(".tmp-" in p.name for p in shards_dir.iterdir()):
            os.kill(child.pid, signal.SIGKILL)
            saw_temp = True
            break
        time.sleep(0.0005)
    child.wait()
    if saw_temp:
        assert child.returncode == -signal.SIGKILL
        assert any(".tmp-" in p.name for p in shards_dir.iterdir())
    # Whatever survived under a shard name is a complete, correct shard; a half-written file never is.
    for name, data in _shard_files(killed).items():
        assert data == expected[name], name
    rerun = build_shards(killed, "train", 4)
    assert _shard_files(killed) == expected
    assert not [p for p in shards_dir.iterdir() if ".tmp-" in p.name]
    assert {s.sha256 for s in rerun.shards} == {hashlib.sha256(d).hexdigest() for d in expected.values()}


def test_sample_json_is_canonical():
    s = synthetic_sample(4)
    raw = s.members["json"]
    assert raw == json.dumps(json.loads(raw), sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


def test_member_index_matches_the_tar_members_and_is_deterministic(tmp_path):
    samples = [synthetic_sample(i) for i in range(7)]
    a, b = tmp_path / "a", tmp_path / "b"
    stage(a, samples)
    stage(b, list(reversed(samples)))
    ra, rb = build_shards(a, "train", 2), build_shards(b, "train", 2)
    assert [s.index for s in ra.shards] == [s.index for s in rb.shards]
    for info in ra.shards:
        shard, sidecar = a / info.path, a / info.index.path
        assert sidecar == index_path(shard) and sidecar.name == shard.name.replace(".tar", ".idx.json")
        data = sidecar.read_bytes()
        assert data == (b / info.index.path).read_bytes()    # same shard, same index bytes
        assert (hashlib.sha256(data).hexdigest(), len(data)) == (info.index.sha256, info.index.bytes)
        index = ShardIndex.from_json(data, str(sidecar))
        assert (index.shard, index.shard_bytes, index.shard_sha256) == (shard.name, info.bytes, info.sha256)
        with tarfile.open(shard) as tf:
            members = [(m.name, m.offset_data, m.size) for m in tf]
        assert index.keys == sorted({n.split(".", 1)[0] for n, _, _ in members}) and len(index) == info.num_samples
        listed = {(f"{k}.{suffix}", off, size) for i, k in enumerate(index.keys)
                  for suffix, off, size in zip(index.members, index.offsets[i], index.sizes[i]) if off is not None}
        assert listed == set(members)
        # What the index says, read back through the loader's indexed reader: each sample's exact members.
        by_key = {s.key: s for s in samples}
        reader = IndexedShardReader(ShardInfo(info, str(shard), index_url=str(sidecar)))
        read = {k: {suffix: bytes(b) for suffix, b in ms.items()}
                for k, ms in reader.samples(lambda k: set(index.members))}
        reader.close()
        assert list(read) == index.keys and read == {k: by_key[k].members for k in index.keys}
    # A shard built before indexes existed (no sidecar) gets its index on the next build, bytes untouched.
    first = a / ra.shards[0].path
    stat = (first.stat().st_ino, first.stat().st_mtime_ns)
    index_path(first).unlink()
    again = build_shards(a, "train", 2)
    assert again.written == [] and (first.stat().st_ino, first.stat().st_mtime_ns) == stat
    assert again.shards == ra.shards and index_path(first).read_bytes() == (b / ra.shards[0].index.path).read_bytes()
    # A sidecar that describes other bytes (a stale one) is replaced.
    index_path(first).write_bytes((a / ra.shards[1].index.path).read_bytes())
    assert build_shards(a, "train", 2).shards == ra.shards
    assert index_path(first).read_bytes() == (b / ra.shards[0].index.path).read_bytes()


# ---------------------------------------------------------------- one copy on disk: shards as the sample source

def _staging_files(out: Path, split: str = "train") -> list[str]:
    d = out / "staging" / split
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def _with_captions(s: Sample, caption: str) -> Sample:
    return Sample(s.key, dict(s.members, json=encode_json(dict(s.meta, captions=[caption] * 5))))


def test_incremental_build_from_old_shards_equals_a_fresh_build_byte_for_byte(tmp_path):
    samples = [synthetic_sample(i) for i in range(14)]
    inc = tmp_path / "inc"
    stage(inc, samples[:10])
    first = build_shards(inc, "train", 3)
    assert discard_staged(inc, "train", first.keys) == 10 and _staging_files(inc) == []
    # The shards are the only copy now, and every sample reads back from them exactly.
    found = split_samples(inc, "train")
    assert found.keys() == sorted(s.key for s in samples[:10]) and not found.staged and not found.damaged
    assert all(found.sample(s.key).members == s.members for s in samples[:10])

    # New clips staged, two removed, one caption changed (a json-only update: nothing else is staged).
    stage(inc, samples[10:])
    changed = samples[3]
    found = split_samples(inc, "train")
    found.update_json(changed.key, dict(changed.meta, captions=["a new caption"] * 5))
    assert _staging_files(inc) == sorted([f"{changed.key}.json"] + [f"{s.key}.tar" for s in samples[10:]])
    assert split_samples(inc, "train").meta(changed.key)["captions"] == ["a new caption"] * 5
    gone = {samples[0].key, samples[7].key}
    keys = sorted(s.key for s in samples if s.key not in gone)
    second = build_shards(inc, "train", 3, keys)
    assert second.keys == keys and second.removed_keys == sorted(gone)
    assert second.added_keys == sorted(s.key for s in samples[10:])
    discard_staged(inc, "train", second.keys)
    assert _staging_files(inc) == []

    fresh = tmp_path / "fresh"
    stage(fresh, [_with_captions(s, "a new caption") if s.key == changed.key else s
                  for s in samples if s.key not in gone])
    expected = build_shards(fresh, "train", 3)
    assert _shard_files(inc) == _shard_files(fresh)
    assert {p.name: p.read_bytes() for p in (inc / "shards/train").glob("*.idx.json")} == \
           {p.name: p.read_bytes() for p in (fresh / "shards/train").glob("*.idx.json")}
    assert second.shards == expected.shards and second.stats == expected.stats
    # Nothing changed: nothing rewritten, every sample still read from the shards.
    again = build_shards(inc, "train", 3, keys)
    assert again.written == [] and again.shards == expected.shards


def test_a_damaged_old_shard_is_never_read_and_its_samples_are_named_missing(tmp_path):
    samples = [synthetic_sample(i) for i in range(8)]
    stage(tmp_path, samples)
    built = build_shards(tmp_path, "train", 2)
    discard_staged(tmp_path, "train", built.keys)
    victim = tmp_path / built.shards[0].path
    blob = bytearray(victim.read_bytes())
    blob[len(blob) // 2] ^= 0xFF           # one flipped bit in a member's data: headers and size still fine
    victim.write_bytes(bytes(blob))
    found = split_samples(tmp_path, "train")
    assert list(found.damaged) == [victim] and "differs from" in found.damaged[victim]
    lost = sorted(k for k in (s.key for s in samples) if shard_index(k, 2) == 0)
    assert lost and all(k not in found for k in lost) and all(k in found for k in built.keys if k not in lost)
    with pytest.raises(FileNotFoundError, match=rf"in no intact shard.*{victim.name} is not used: .*damaged"):
        build_shards(tmp_path, "train", 2, built.keys)
    assert victim.read_bytes() == bytes(blob)     # refused before anything was written
    # The lost samples staged again (the build makes them from their media): same shards as before the damage.
    stage(tmp_path, [s for s in samples if s.key in lost])
    build_shards(tmp_path, "train", 2, built.keys)
    clean = tmp_path / "clean"
    stage(clean, samples)
    build_shards(clean, "train", 2)
    assert _shard_files(tmp_path) == _shard_files(clean)


def test_kept_and_moving_samples_are_staged_again_before_their_shard_goes(tmp_path):
    samples = [synthetic_sample(i) for i in range(9)]
    out = tmp_path / "out"
    stage(out, samples)
    discard_staged(out, "train", build_shards(out, "train", 2).keys)
    # A --limit run: only three samples in the shards, the others kept (staged again from their old shards).
    some = sorted(s.key for s in samples[:3])
    rest = {s.key for s in samples[3:]}
    limited = build_shards(out, "train", 2, some, keep=rest)
    assert limited.keys == some and _staging_files(out) == sorted(f"{k}.tar" for k in rest)
    assert all(split_samples(out, "train").sample(s.key).members == s.members for s in samples)
    discard_staged(out, "train", limited.keys)
    # Another shard count (the split's manifest lost): samples move between shards, none is lost on the way.
    moved = build_shards(out, "train", 3, sorted(s.key for s in samples))
    fresh = tmp_path / "fresh"
    stage(fresh, samples)
    assert moved.shards == build_shards(fresh, "train", 3).shards and _shard_files(out) == _shard_files(fresh)
