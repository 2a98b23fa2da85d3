"""shards.sample_format: the member names, the key/suffix rule and the npy/flac/json codecs, each defined once; the
writer, the member index and the shard readers all apply the same rule (and refuse the same names)."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from shards.index import ShardError, scan_tar
from shards.readers import TarSampleReader
from shards.sample_format import (FBANK_MEMBER, FLAC_MEMBER, JSON_MEMBER, SampleFormatError, decode_flac, decode_json,
                                  decode_npy, encode_flac, encode_json, encode_npy, encode_sample, frame_member,
                                  frame_members, split_member_name, validate_key)
from shards.writer import read_staged_sample

KEY = "-abcdefghij_0_10000"


def test_npy_round_trip_is_exact_and_copies_nothing():
    fb = (np.random.default_rng(0).standard_normal((1024, 128)) * 4).astype(np.float16)
    data = encode_npy(fb)
    back = decode_npy(data, "x")
    assert back.dtype == np.float16 and back.shape == (1024, 128) and np.array_equal(back, fb)
    assert np.shares_memory(back, np.frombuffer(data, np.uint8)) and not back.flags.writeable
    cache: dict = {}
    assert np.array_equal(decode_npy(data, "x", cache), fb) and len(cache) == 1
    again = decode_npy(encode_npy(fb + 1), "x", cache)          # same header: the cached parse
    assert np.array_equal(again, fb + 1) and len(cache) == 1
    assert encode_npy(np.asfortranarray(fb)) == data            # always C order: same array, same bytes


def test_npy_decode_refuses_bad_members_naming_them():
    fb = np.zeros((4, 3), np.float16)
    with pytest.raises(SampleFormatError, match=r"^shard s sample k: fbank\.npy: not a valid \.npy file"):
        decode_npy(b"\x93NUMPX" + bytes(200), "shard s sample k: fbank.npy")
    with pytest.raises(SampleFormatError, match=r"^member m: holds 23 data bytes for shape \(4, 3\)"):
        decode_npy(encode_npy(fb)[:-1], "member m")
    obj = io.BytesIO()
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)   # a pickle: never loaded
    with pytest.raises(SampleFormatError, match=r"^m: holds .* object"):
        decode_npy(obj.getvalue(), "m")
    fortran = io.BytesIO()
    np.lib.format.write_array(fortran, np.asfortranarray(np.arange(6, dtype=np.float16).reshape(2, 3)))
    with pytest.raises(SampleFormatError, match=r"Fortran order"):
        decode_npy(fortran.getvalue(), "m")


def test_flac_round_trip_is_lossless_and_its_errors_name_the_member():
    w = (np.random.default_rng(1).standard_normal(16000) * 8000).astype(np.int16)
    data = encode_flac(w, 16000)
    assert data == encode_flac(w.copy(), 16000) and data[:4] == b"fLaC"
    back, sr = decode_flac(memoryview(data), "x")          # readers hand out views
    assert sr == 16000 and back.dtype == np.int16 and np.array_equal(back, w)
    with pytest.raises(SampleFormatError, match=r"^sample k: flac: not a decodable FLAC"):
        decode_flac(bytes(64), "sample k: flac")
    with pytest.raises(ValueError, match="1-D int16"):
        encode_flac(w.astype(np.float32), 16000)


def test_json_is_canonical_and_its_errors_name_the_member():
    a = encode_json({"b": 1, "a": ["é", 2]})
    assert a == encode_json({"a": ["é", 2], "b": 1}) == '{"a":["é",2],"b":1}'.encode("utf-8")
    assert decode_json(a, "x") == {"a": ["é", 2], "b": 1}
    for bad, what in ((b"\xff{}", "not valid JSON"), (b"{", "not valid JSON"), (b"[1, 2]", "a JSON list")):
        with pytest.raises(SampleFormatError, match=rf"^k\.json: {what}"):
            decode_json(bad, "k.json")


def test_split_member_name_is_webdatasets_rule_and_refuses_names_of_no_sample():
    assert split_member_name(f"{KEY}.{FBANK_MEMBER}") == (KEY, "fbank.npy")
    assert split_member_name(f"{KEY}.frame07.jpg") == (KEY, "frame07.jpg")
    assert split_member_name("dir.v1/k.json") == ("dir.v1/k", "json")     # dots of a directory are not the split
    assert split_member_name("k.a.b") == ("k", "a.b")
    for bad, why in (("noext", "no suffix"), ("dir.x/noext", "no suffix"), (".json", "empty key"),
                     ("d/.json", "empty key"), ("k.", "empty suffix")):
        with pytest.raises(SampleFormatError, match=rf"^member '{bad}' has (an )?{why}"):
            split_member_name(bad)


def test_frame_member_names_sort_in_frame_order():
    assert frame_member(0, 20) == "frame00.jpg" and frame_member(19, 20) == "frame19.jpg"
    assert frame_member(5, 101) == "frame005.jpg" and frame_member(100, 101) == "frame100.jpg"
    for n in (1, 20, 100, 101, 1000):
        names = [frame_member(i, n) for i in range(n)]
        assert sorted(names) == names and frame_members(names[::-1] + [JSON_MEMBER, FLAC_MEMBER]) == names
    for i, n in ((20, 20), (-1, 20)):
        with pytest.raises(ValueError, match="does not exist"):
            frame_member(i, n)
    assert frame_members(["frame1.jpg", "frame01.png", "xframe01.jpg", "frame01.jpg"]) == ["frame01.jpg"]


def test_encode_sample_names_every_member_by_the_format():
    meta = {"key": KEY, "duration": 1.0, "fbank_frames": 98, "captions": ["a"]}
    wav = np.zeros(16000, np.int16)
    for n in (3, 101):
        members = encode_sample(fbank=np.zeros((1024, 128), np.float16), waveform=wav, sample_rate=16000,
                                frames=[bytes([i % 256]) for i in range(n)], meta=meta)
        assert list(members) == [FBANK_MEMBER, FLAC_MEMBER] + [frame_member(i, n) for i in range(n)] + [JSON_MEMBER]
        assert decode_json(members[JSON_MEMBER], "j") == meta
    with pytest.raises(ValueError, match="sample key"):
        encode_sample(fbank=np.zeros((2, 2)), waveform=wav, sample_rate=16000, frames=[b"x"],
                      meta=dict(meta, key="a.b_0_1"))
    with pytest.raises(ValueError, match=r"json lacks \['fbank_frames'\]"):
        encode_sample(fbank=np.zeros((2, 2)), waveform=wav, sample_rate=16000, frames=[b"x"],
                      meta={"key": KEY, "duration": 1.0})


def test_validate_key():
    assert validate_key(KEY) == KEY
    for bad in ("", "short_0_1", "-abcdefghij_0", "-abcdefghij_0_1.x", None):
        with pytest.raises(ValueError, match="bad sample key"):
            validate_key(bad)


def _tar(path: Path, names: list[str]) -> Path:
    with tarfile.open(path, "w") as tf:
        for n in names:
            ti = tarfile.TarInfo(n)
            ti.size = 2
            tf.addfile(ti, io.BytesIO(b"{}"))
    return path


def test_the_index_the_reader_and_the_writer_apply_the_one_rule(tmp_path):
    """A member name that belongs to no sample is refused by all three, each naming its file and the member."""
    bad = _tar(tmp_path / f"{KEY}.tar", [f"{KEY}.json", "README"])
    with pytest.raises(ValueError, match=r"member 'README' has no suffix"):
        scan_tar(bad)
    reader = TarSampleReader(str(bad))
    with pytest.raises(ShardError, match=rf"shard {bad}: member 'README' has no suffix"):
        list(reader.samples(lambda k: {"json"}))
    reader.close()
    with pytest.raises(ValueError, match=rf"{bad}: member 'README' has no suffix"):
        read_staged_sample(bad)
    # And they agree on what a good name means: the same (key, suffix) from all three.
    good = _tar(tmp_path / "good.tar", [f"{KEY}.json", f"{KEY}.frame00.jpg", "o_1_2.json"])
    assert scan_tar(good).keys == [KEY, "o_1_2"] and scan_tar(good).members == ["frame00.jpg", "json"]
    reader = TarSampleReader(str(good))
    assert [(k, sorted(m)) for k, m in reader.samples(lambda k: {"json", "frame00.jpg"})] == \
           [(KEY, ["frame00.jpg", "json"]), ("o_1_2", ["json"])]
    reader.close()
    (tmp_path / "staged").mkdir()
    staged = _tar(tmp_path / "staged" / f"{KEY}.tar", [f"{KEY}.{m}" for m in (FBANK_MEMBER, FLAC_MEMBER,
                                                                                "frame00.jpg", JSON_MEMBER)])
    assert sorted(read_staged_sample(staged).members) == [FBANK_MEMBER, FLAC_MEMBER, "frame00.jpg", JSON_MEMBER]
