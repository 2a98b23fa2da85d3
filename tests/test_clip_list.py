import json

import pytest

from pipeline.clip_list import (ClipListError, clip_key, read_clip_list, read_clip_lists, validate_start_time,
                               validate_youtube_id)
from tests.conftest import AUDIOCAPS_DIR


def test_real_test_csv_groups_975_clips_of_five_captions():
    result = read_clip_list(AUDIOCAPS_DIR / "test.csv", "test")
    assert result.errors == []
    assert len(result.clips) == 975
    assert all(len(c.captions) == 5 and len(c.audiocap_ids) == 5 for c in result.clips)
    first = result.clips[0]
    assert (first.youtube_id, first.start_time, first.split) == ("7fmOlUlwoNg", 20, "test")
    assert first.key == "7fmOlUlwoNg_20000_30000"
    assert first.captions[0] == "Constant rattling noise and sharp vibrations"  # CRLF stripped
    assert 103549 in first.audiocap_ids
    assert first.sources[0].endswith("test.csv:2")
    assert any(c.youtube_id.startswith("-") for c in result.clips)


def test_bad_rows_are_reported_with_file_and_line_and_the_rest_goes_on(tmp_path):
    p = tmp_path / "mixed.csv"
    p.write_bytes(b"audiocap_id,youtube_id,start_time,caption\r\n"
                  b"1,-abcdefghij,0,a dog barks\r\n"
                  b"2,short,0,too short an id\r\n"
                  b"3,abcdefghij$,0,bad character\r\n"
                  b"4,ABCDEFGHIJK,-5,negative start\r\n"
                  b"5,ABCDEFGHIJK,1.5,fractional start\r\n"
                  b"6,ABCDEFGHIJK,7,\r\n"
                  b"7,ABCDEFGHIJK,7,\"a car, then rain\"\r\n"
                  b"x,ABCDEFGHIJK,7,bad audiocap id\r\n"
                  b"9,ABCDEFGHIJK,7\r\n"
                  b"10,-abcdefghij,0,a dog barks twice\r\n")
    r = read_clip_list(p, "train")
    assert [(e.line, e.file) for e in r.errors] == [(n, str(p)) for n in (3, 4, 5, 6, 7, 9, 10)]
    assert "youtube_id 'short'" in r.errors[0].message
    assert "start_time '-5'" in r.errors[2].message
    assert "caption" in r.errors[4].message
    assert "fields" in r.errors[6].message
    keys = {c.key: c for c in r.clips}
    assert set(keys) == {"-abcdefghij_0_10000", "ABCDEFGHIJK_7000_17000"}
    assert keys["-abcdefghij_0_10000"].captions == ["a dog barks", "a dog barks twice"]
    assert keys["-abcdefghij_0_10000"].audiocap_ids == [1, 10]
    assert keys["ABCDEFGHIJK_7000_17000"].captions == ["a car, then rain"]


def test_avcap_json_is_read_like_the_csv(tmp_path):
    p = tmp_path / "avcap.json"
    p.write_text(json.dumps([
        {"youtube_id": "7fmOlUlwoNg", "start_time": 20, "caption": "rattling", "audiocap_id": 1},
        {"youtube_id": "7fmOlUlwoNg", "start_time": "20", "caption": "vibrations", "audiocap_id": "2"},
        {"youtube_id": "../../etc/pw", "start_time": 0, "caption": "path traversal", "audiocap_id": 3},
        "not an object",
    ]))
    r = read_clip_list(p, "val")
    assert len(r.clips) == 1 and r.clips[0].captions == ["rattling", "vibrations"]
    assert [e.line for e in r.errors] == [3, 4]


def test_unreadable_files_raise_a_clear_error(tmp_path):
    with pytest.raises(ClipListError, match="no such file"):
        read_clip_list(tmp_path / "missing.csv", "train")
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("id,url\n1,x\n")
    with pytest.raises(ClipListError, match="lacks"):
        read_clip_list(wrong, "train")
    binary = tmp_path / "bin.csv"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ClipListError, match="UTF-8"):
        read_clip_list(binary, "train")
    notlist = tmp_path / "x.json"
    notlist.write_text('{"a": 1}')
    with pytest.raises(ClipListError, match="JSON list"):
        read_clip_list(notlist, "train")


def test_validation_rejects_ids_that_could_become_options_or_paths():
    assert validate_youtube_id("--0w1YA1Hm4") == "--0w1YA1Hm4"
    for bad in ["abc", "abcdefghijkl", "abc/defghij", "abc defghij", "abcdefghij\n", None, 12345678901]:
        with pytest.raises(ValueError):
            validate_youtube_id(bad)
    assert validate_start_time("30") == 30 and validate_start_time(30.0) == 30
    for bad in [-1, "1e3", "3.5", True, None, " ", 10**9]:
        with pytest.raises(ValueError):
            validate_start_time(bad)
    assert clip_key("-NrFeH-kBSM", 0) == "-NrFeH-kBSM_0_10000"


def test_two_files_into_one_split_merge_captions(tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text("audiocap_id,youtube_id,start_time,caption\n1,ABCDEFGHIJK,0,one\n")
    b.write_text("audiocap_id,youtube_id,start_time,caption\n2,ABCDEFGHIJK,0,two\n1,ABCDEFGHIJK,0,one\n")
    r = read_clip_lists([a, b], "train")
    assert len(r.clips) == 1 and r.clips[0].captions == ["one", "two"]
