"""Read AudioCaps CSVs and the original AVCap JSON into validated clips.

A clip is one 10 s window of one YouTube video: rows that share (youtube_id, start_time) are grouped into one
clip that carries all their captions and audiocap_ids. Ids and start times are validated here, before any URL or
path is formed from them: everything downstream builds paths and URLs from `Clip.key` only.

A bad row is reported (file, line, what is wrong) and skipped; the rest of the file goes on: that includes a CSV
row with bytes that are not UTF-8, and a row whose audiocap_id was already used for another clip or caption (in
any of the files given together). A row repeated verbatim is merged (it adds nothing). A file that cannot be read
at all (missing, a header that is not UTF-8 or lacks a column, a JSON file that is not UTF-8 or not a list, a CSV
that breaks the csv module's strict quoting or whose quoted field runs over lines that are rows of the file: a
quote left open) raises `ClipListError`, naming the file and the line.
"""
from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

# YouTube ids are 11 characters of the URL-safe base64 alphabet. Many begin with '-', which is why an id must
# never be passed where a command-line parser could read it as an option.
_YOUTUBE_ID = re.compile(r"[A-Za-z0-9_-]{11}")
_DIGITS = re.compile(r"[0-9]+")
CSV_HEADER = ("audiocap_id", "youtube_id", "start_time", "caption")
CLIP_SECONDS = 10
# Far beyond any real video length; it only stops an absurd number from turning into an absurd path.
MAX_START_TIME = 10_000_000


class ClipListError(ValueError):
    """The clip list file (CSV or JSON) as a whole cannot be read."""


@dataclass
class RowError:
    file: str
    line: int  # CSV: physical line number (header = 1); JSON: 1-based index of the entry in the list
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


@dataclass
class Clip:
    youtube_id: str
    start_time: int
    captions: list[str] = field(default_factory=list)
    audiocap_ids: list[int] = field(default_factory=list)
    split: str = ""
    sources: list[str] = field(default_factory=list)  # "file:line" of every row that contributed

    @property
    def key(self) -> str:
        return clip_key(self.youtube_id, self.start_time)


@dataclass
class ClipListResult:
    clips: list[Clip]
    errors: list[RowError]


def validate_youtube_id(s: object) -> str:
    if not isinstance(s, str) or not _YOUTUBE_ID.fullmatch(s):
        raise ValueError(f"youtube_id {s!r} is not 11 characters of [A-Za-z0-9_-]")
    return s


def validate_start_time(v: object) -> int:
    """Integer seconds >= 0, given as an int, a string of digits, or an integral float (some JSON writers)."""
    if isinstance(v, bool):
        raise ValueError(f"start_time {v!r} is not an integer number of seconds")
    if isinstance(v, int):
        t = v
    elif isinstance(v, float) and v.is_integer():
        t = int(v)
    elif isinstance(v, str) and _DIGITS.fullmatch(v.strip()):
        t = int(v.strip())
    else:
        raise ValueError(f"start_time {v!r} is not an integer number of seconds >= 0")
    if t < 0 or t > MAX_START_TIME:
        raise ValueError(f"start_time {t} is out of range [0, {MAX_START_TIME}]")
    return t


def clip_key(youtube_id: str, start_time: int) -> str:
    """`{youtube_id}_{start_ms}_{end_ms}` of the nominal window; validates both parts."""
    yid = validate_youtube_id(youtube_id)
    t = validate_start_time(start_time)
    return f"{yid}_{t * 1000}_{(t + CLIP_SECONDS) * 1000}"


def _validate_row(raw: dict) -> tuple[str, int, str, int]:
    yid = validate_youtube_id(raw.get("youtube_id"))
    start = validate_start_time(raw.get("start_time"))
    caption = raw.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"caption {caption!r} is empty or not text")
    acid = raw.get("audiocap_id")
    if isinstance(acid, str) and _DIGITS.fullmatch(acid.strip()):
        acid = int(acid.strip())
    if not isinstance(acid, int) or isinstance(acid, bool) or acid < 0:
        raise ValueError(f"audiocap_id {raw.get('audiocap_id')!r} is not a non-negative integer")
    return yid, start, caption.strip(), acid


def _not_utf8(values) -> str | None:
    """surrogateescape turns each byte that is not UTF-8 into one lone surrogate: name the first one."""
    for v in values:
        for ch in v:
            if "\udc80" <= ch <= "\udcff":
                return f"not UTF-8 text: byte 0x{ord(ch) - 0xdc00:02x} in {v.encode('utf-8', 'surrogateescape')[:60]!r}"
    return None


def _looks_like_row(line: str, names: list[str]) -> bool:
    """Whether one physical line would parse as a row of this file on its own (field count and youtube_id)."""
    try:
        values = next(csv.reader([line]), [])
    except csv.Error:
        return False
    if len(values) != len(names):
        return False
    return bool(_YOUTUBE_ID.fullmatch(values[names.index("youtube_id")].strip()))


def _csv_rows(path: Path):
    # surrogateescape: one row with a stray byte is reported with its line and skipped, not the whole file;
    # utf-8-sig tolerates a BOM; newline="" lets the csv module handle the CRLF line ends.
    text = path.read_bytes().decode("utf-8-sig", errors="surrogateescape")
    # strict: a quote in the wrong place is an error, not a field that silently eats what follows.
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    start = 1   # physical line where the row being read begins (reader.line_num is where it ends)
    try:
        header = next(reader, None)
        if header is None:
            raise ClipListError(f"{path}: empty file, expected header {','.join(CSV_HEADER)}")
        bad = _not_utf8(header)
        if bad:
            raise ClipListError(f"{path}:1: header is {bad}; expected UTF-8 with header {','.join(CSV_HEADER)}")
        names = [h.strip() for h in header]
        missing = [h for h in CSV_HEADER if h not in names]
        if missing:
            raise ClipListError(f"{path}:1: header {names} lacks {missing}; expected {','.join(CSV_HEADER)}")
        start = reader.line_num + 1
        for values in reader:
            line, start = start, reader.line_num + 1
            if not values or all(not v.strip() for v in values):
                continue
            # A quoted field may hold a line break, but one whose lines are rows of this file is a quote left
            # open: the rows it swallowed would be lost and their text stored as a caption.
            for v in values:
                inner = v.splitlines()[1:]
                swallowed = next((i for i, t in enumerate(inner, start=1) if _looks_like_row(t, names)), None)
                if swallowed is not None:
                    raise ClipListError(
                        f"{path}:{line}: a quoted field opened on line {line} runs to line {reader.line_num} over "
                        f"lines that are rows of this file (line {line + swallowed}: {inner[swallowed - 1][:60]!r});"
                        " close the quote (a quote inside a field is written twice: \"\")")
            if len(values) != len(names):
                yield line, None, f"expected {len(names)} fields, found {len(values)}"
                continue
            bad = _not_utf8(values)
            if bad:
                yield line, None, bad
                continue
            yield line, dict(zip(names, values)), None
    except csv.Error as e:
        what = ("a quote opened here is never closed" if "end of data" in str(e)
                else "a quote in the wrong place")
        raise ClipListError(f"{path}:{start}: malformed CSV ({e}: {what}); the file is refused so that no row is "
                            "silently lost") from e


def _json_rows(path: Path):
    raw = path.read_bytes()
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ClipListError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); one JSON document cannot "
                            "skip a row, so the file is refused") from e
    except json.JSONDecodeError as e:
        raise ClipListError(f"{path}:{e.lineno}: not a JSON document ({e.msg})") from e
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise ClipListError(f"{path}: expected a JSON list of objects with youtube_id, start_time, caption, audiocap_id")
    for i, entry in enumerate(data, start=1):
        if not isinstance(entry, dict):
            yield i, None, f"entry is {type(entry).__name__}, expected an object"
        else:
            yield i, entry, None


def _rows(path: Path):
    if not path.is_file():
        raise ClipListError(f"{path}: no such file")
    rows = _json_rows(path) if path.suffix.lower() == ".json" else _csv_rows(path)
    for line, raw, problem in rows:
        yield str(path), line, raw, problem


def read_clip_list(path: str | Path, split: str) -> ClipListResult:
    """Read one AudioCaps CSV or AVCap JSON file into clips grouped by (youtube_id, start_time)."""
    return read_clip_lists([path], split)


def read_clip_lists(paths: list[str | Path], split: str) -> ClipListResult:
    """Several files into one split, read as one list of rows: a clip listed in two files gets the captions of
    both, and an audiocap_id reused across files is reported as within one file."""
    return _group((r for p in paths for r in _rows(Path(p))), split)


def _merge(clip: Clip, captions: list[str], acids: list[int], sources: list[str]) -> None:
    for cap, acid, src in zip(captions, acids, sources):
        if acid in clip.audiocap_ids:  # the same row seen twice adds nothing
            continue
        clip.captions.append(cap)
        clip.audiocap_ids.append(acid)
        clip.sources.append(src)


def _group(rows, split: str) -> ClipListResult:
    """(file, line, row, problem) -> clips. A row repeated verbatim is merged (it adds nothing); an audiocap_id
    reused for a different clip or caption is an error on the later row, in the same file or another: one of
    the two is wrong and we cannot tell which."""
    clips: dict[str, Clip] = {}
    errors: list[RowError] = []
    seen: dict[int, tuple[str, str, str, int]] = {}  # audiocap_id -> (key, caption, file, line)
    for file, line, raw, problem in rows:
        if problem is None:
            try:
                yid, start, caption, acid = _validate_row(raw)
            except ValueError as e:
                problem = str(e)
        if problem is None and acid in seen and seen[acid][:2] != (clip_key(yid, start), caption):
            where = f"line {seen[acid][3]}" + ("" if seen[acid][2] == file else f" of {seen[acid][2]}")
            problem = f"audiocap_id {acid} is already used on {where} for another clip or caption; the first is kept"
        if problem is not None:
            errors.append(RowError(file, line, problem))
            continue
        key = clip_key(yid, start)
        seen.setdefault(acid, (key, caption, file, line))
        clip = clips.setdefault(key, Clip(yid, start, [], [], split, []))
        _merge(clip, [caption], [acid], [f"{file}:{line}"])
    return ClipListResult(list(clips.values()), errors)
