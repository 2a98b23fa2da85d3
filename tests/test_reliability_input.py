"""Hostile manifest input: every bad row is rejected or merged as documented, named by file and line, and no id
ever becomes an option, a path outside --out, or part of a command line built from a string.

The end-to-end test runs a real build (yt-dlp over loopback HTTP, ffmpeg) in a child process that records every
subprocess it starts (a Python audit hook) with ffmpeg/ffprobe behind PATH wrappers that record their argv, so
what is checked is the argv the tools really got, including the ffmpeg that yt-dlp starts.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.clip_list import ClipListError, read_clip_list
from pipeline.ledger import Ledger
from tests.media import MediaSpec, Route, make_media

REPO = Path(__file__).resolve().parent.parent
HEADER = b"audiocap_id,youtube_id,start_time,caption\r\n"
DASH_IDS = ("-NrFeH-kBSM", "--0w1YA1Hm4")  # real AudioCaps test ids that look like options


def _csv(tmp_path: Path, body: bytes, name: str = "m.csv", header: bytes = HEADER) -> Path:
    p = tmp_path / name
    p.write_bytes(header + body)
    return p


def _errors(result) -> dict[int, str]:
    return {e.line: e.message for e in result.errors}


def test_ids_that_are_paths_urls_or_the_wrong_length_are_rejected_by_line(tmp_path):
    hostile = ["../../etc/pa", "abc/defghij", "..abcdefghi", "abc?def&ghi", "abc%2Fdefgh", "abc#defghij",
               "http://a.bc", "abc defghij", "abcdefghij", "abcdefghijkl", "", "abc\\defghij", "-o/tmp/xxxx"]
    body = b"".join(f"{i},{yid},0,a caption\r\n".encode() for i, yid in enumerate(hostile))
    body += b"99,-NrFeH-kBSM,0,a real id that begins with a dash\r\n"
    p = _csv(tmp_path, body)
    r = read_clip_list(p, "test")
    errors = _errors(r)
    assert sorted(errors) == list(range(2, 2 + len(hostile)))
    for line, yid in enumerate(hostile, start=2):
        assert f"youtube_id {yid!r}" in errors[line] and "11 characters" in errors[line]
        assert str(r.errors[0]).startswith(f"{p}:")
    assert [c.key for c in r.clips] == ["-NrFeH-kBSM_0_10000"]


def test_start_times_captions_and_missing_fields(tmp_path):
    p = _csv(tmp_path, b"1,ABCDEFGHIJK,-5,negative\r\n"
                       b"2,ABCDEFGHIJK,2.5,fraction\r\n"
                       b"3,ABCDEFGHIJK,1e3,exponent\r\n"
                       b"4,ABCDEFGHIJK,99999999999,huge\r\n"
                       b"5,ABCDEFGHIJK,,empty\r\n"
                       b"6,ABCDEFGHIJK,0x10,hex\r\n"
                       b"7,ABCDEFGHIJK,30,\r\n"
                       b"8,ABCDEFGHIJK,30,   \r\n"
                       b"9,ABCDEFGHIJK,30\r\n"
                       b"10,ABCDEFGHIJK,30,a caption,extra\r\n"
                       b"11,ABCDEFGHIJK,30,a good row\r\n")
    r = read_clip_list(p, "train")
    errors = _errors(r)
    assert sorted(errors) == list(range(2, 12))
    for line in range(2, 8):
        assert "start_time" in errors[line]
    assert "out of range" in errors[5]
    assert "caption" in errors[8] and "caption" in errors[9]
    assert "fields" in errors[10] and "fields" in errors[11]
    assert [(c.key, c.captions) for c in r.clips] == [("ABCDEFGHIJK_30000_40000", ["a good row"])]


def test_bytes_that_are_not_utf8_reject_their_row_only(tmp_path):
    p = _csv(tmp_path, "1,ABCDEFGHIJK,0,a café\r\n".encode("latin-1") + b"2,ABCDEFGHIJK,0,fine\r\n"
             b"3,ABCDEFGHIJK,0,\xff\xfe\r\n")
    r = read_clip_list(p, "train")
    errors = _errors(r)
    assert sorted(errors) == [2, 4]
    assert "not UTF-8" in errors[2] and "0xe9" in errors[2] and "0xff" in errors[4]
    assert r.clips[0].captions == ["fine"]
    # A header that is not UTF-8 (e.g. a UTF-16 file) cannot be read at all: the file is named, line 1.
    utf16 = tmp_path / "utf16.csv"
    utf16.write_bytes("audiocap_id,youtube_id,start_time,caption\r\n".encode("utf-16"))
    with pytest.raises(ClipListError, match=rf"{utf16}:1: header is not UTF-8"):
        read_clip_list(utf16, "train")
    # JSON is one document: a stray byte refuses the file, with the line it is on.
    bad_json = tmp_path / "bad.json"
    bad_json.write_bytes(b'[\n{"youtube_id": "ABCDEFGHIJK",\n "caption": "caf\xe9"}]')
    with pytest.raises(ClipListError, match=rf"{bad_json}:3: not UTF-8"):
        read_clip_list(bad_json, "train")


def test_duplicates_are_merged_and_conflicts_named(tmp_path):
    p = _csv(tmp_path, b"1,ABCDEFGHIJK,0,a dog barks\r\n"
                       b"1,ABCDEFGHIJK,0,a dog barks\r\n"        # verbatim repeat: merged
                       b"2,ABCDEFGHIJK,0,a cat meows\r\n"
                       b"2,ABCDEFGHIJK,0,something else\r\n"     # same audiocap_id, other caption
                       b"1,BBBBBBBBBBB,0,a dog barks\r\n")       # same audiocap_id, other clip
    r = read_clip_list(p, "train")
    errors = _errors(r)
    assert sorted(errors) == [5, 6]
    assert "audiocap_id 2 is already used on line 4" in errors[5]
    assert "audiocap_id 1 is already used on line 2" in errors[6]
    (clip,) = r.clips
    assert (clip.captions, clip.audiocap_ids) == (["a dog barks", "a cat meows"], [1, 2])


def test_bom_and_missing_columns(tmp_path):
    bom = _csv(tmp_path, b"1,ABCDEFGHIJK,0,with a BOM\r\n", "bom.csv", b"\xef\xbb\xbf" + HEADER)
    r = read_clip_list(bom, "train")
    assert r.errors == [] and r.clips[0].captions == ["with a BOM"]
    no_caption = _csv(tmp_path, b"1,ABCDEFGHIJK,0\r\n", "nocap.csv", b"audiocap_id,youtube_id,start_time\r\n")
    with pytest.raises(ClipListError, match=rf"{no_caption}:1: header .* lacks \['caption'\]"):
        read_clip_list(no_caption, "train")
    empty = _csv(tmp_path, b"", "empty.csv", b"")
    with pytest.raises(ClipListError, match=f"{empty}: empty file"):
        read_clip_list(empty, "train")


# ------------------------------------------------------------------------------------------ end to end

_AUDITED = """
import json, sys
LOG = sys.argv.pop(1)
def hook(event, args):
    if event in ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.startfile"):
        with open(LOG, "a") as f:
            f.write(json.dumps([event, [a if isinstance(a, (str, int, float, type(None))) else
                                        (list(map(str, a)) if isinstance(a, (list, tuple)) else repr(a))
                                        for a in args[:2]]]) + "\\n")
sys.addaudithook(hook)
from pipeline import orchestrate as flows
sys.exit(flows.main(sys.argv[1:]))
"""

_WRAPPER = """#!{python}
import json, os, sys
with open({log!r}, "a") as f:
    f.write(json.dumps(sys.argv) + "\\n")
os.execv({real!r}, [{real!r}] + sys.argv[1:])
"""


def test_hostile_manifest_build_dash_ids_never_options_nothing_outside_out(media_server, tmp_path):
    media = make_media(tmp_path / "src" / "v.mp4", MediaSpec(10, width=160, height=120))
    for yid in DASH_IDS:
        media_server.routes[f"/input/{yid}.mp4"] = Route(file=media)
    rows = [f"{i},{yid},0,a tone for clip {i}" for i, yid in enumerate(DASH_IDS)]
    rows += ["7,../../../tmp/pwned,0,traversal", "8,-o/tmp/pwned,0,option and path", "9,abc?x=1&y=2,0,url",
             "10,ABCDEFGHIJK,-1,negative start", "11,ABCDEFGHIJK,0,"]
    csv_path = tmp_path / "hostile.csv"
    csv_path.write_bytes(("audiocap_id,youtube_id,start_time,caption\r\n" + "\r\n".join(rows) + "\r\n").encode())

    bin_dir, log_dir, tmp_dir, out = tmp_path / "bin", tmp_path / "logs", tmp_path / "tmpdir", tmp_path / "out"
    for d in (bin_dir, log_dir, tmp_dir):
        d.mkdir()
    for tool in ("ffmpeg", "ffprobe"):
        w = bin_dir / tool
        w.write_text(_WRAPPER.format(python=sys.executable, log=str(log_dir / "tools.jsonl"), real=shutil.which(tool)))
        w.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", TMPDIR=str(tmp_dir))
    cmd = [sys.executable, "-c", _AUDITED, str(log_dir / "popen.jsonl"), "build", "--no-prefect", "--csv",
           str(csv_path), "--split", "test", "--out", str(out), "--url-template",
           media_server.url_template("/input/"), "--frames", "2", "--cpu-workers", "1", "--max-retries", "0",
           "--samples-per-shard", "4"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Bad rows named by file and line; the dash ids built.
    assert f"5 bad rows skipped, first: {csv_path}:4: youtube_id '../../../tmp/pwned'" in proc.stderr
    with Ledger(out / "ledger.sqlite", "test") as ledger:
        assert {e.key: e.status for e in ledger.entries()} == {f"{y}_0_10000": "ok" for y in DASH_IDS}

    popens = [json.loads(line)[1] for line in (log_dir / "popen.jsonl").read_text().splitlines()]
    tools = [json.loads(line) for line in (log_dir / "tools.jsonl").read_text().splitlines()]
    assert popens and any(Path(t[0]).name == "ffmpeg" and len(t) > 2 for t in tools)
    for executable, argv in popens:
        assert isinstance(argv, list), f"a command line built from a string: {argv!r}"
    workers = [argv for _, argv in popens if "pipeline.download" in argv]
    assert workers and all(argv == [sys.executable, "-m", "pipeline.download", "--worker"] for argv in workers), \
        "the download worker gets its URL on stdin, never on its command line"
    # Every argument that mentions an id, in every process, the yt-dlp-started ffmpeg included, is an absolute
    # path (yt-dlp writes ffmpeg's output as `file:/abs/path`) or an http URL: never an option, never relative.
    mentions = [a for argv in [a for _, a in popens] + tools for a in argv[1:] if any(y in a for y in DASH_IDS)]
    assert mentions, "expected the tools to see the clips"
    for a in mentions:
        assert a.startswith(("/", "file:/", "http://127.0.0.1:")), a
    assert not list(tmp_path.glob("**/pwned*")) and not Path("/tmp/pwned").exists()
    # Nothing written outside --out: the temp dir is left empty and no new entries appear next to --out.
    assert list(tmp_dir.iterdir()) == []
    assert {p.name for p in tmp_path.iterdir()} == {"src", "hostile.csv", "bin", "logs", "tmpdir", "out"}
