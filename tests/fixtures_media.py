"""Session fixtures: generated AudioCaps-like media served to yt-dlp from a loopback HTTP server.

`media_server`: a running `tests.media.MediaServer` (empty routes; other tests add their own paths).
`audiocaps_media`: about a dozen clips under real ids of the AudioCaps test split, with their real rows (five
captions each), written as a CRLF CSV like the real one, the media for each clip (the whole video, start_time+10 s
long, also usable as `--media-dir`), served under `/v/{youtube_id}.mp4`, and the outcome each clip must have.

Register in tests/conftest.py: `pytest_plugins = ["tests.fixtures_media"]`.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.media import HTML_PAGE, MediaServer, MediaSpec, Route, make_media

from tests.conftest import AUDIOCAPS_DIR

AUDIOCAPS_TEST_CSV = AUDIOCAPS_DIR / "test.csv"


@dataclass
class ClipCase:
    youtube_id: str
    start_time: int
    kind: str                       # what the media is: ok, 48k-stereo, short-3s, 404, no-audio, no-video, html
    status: str                     # the ledger status the build must end with
    reason: str | None = None       # the failure reason it must record
    duration: float = 10.0          # the real duration the sample json must carry (ok clips)
    spec: MediaSpec | None = None   # None: nothing served (404) or HTML
    captions: list[str] = field(default_factory=list)
    audiocap_ids: list[int] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.youtube_id}_{self.start_time * 1000}_{(self.start_time + 10) * 1000}"


@dataclass
class AudioCapsMedia:
    server: MediaServer
    url_template: str
    csv_path: Path          # CRLF AudioCaps CSV: the cases' real rows plus one bad row
    bad_row_line: int       # the line of the bad row in csv_path
    media_dir: Path         # {youtube_id}.mp4 whole videos (HTML page included as a .mp4 that is not one)
    cases: dict[str, ClipCase]  # by key

    def ok_cases(self) -> list[ClipCase]:
        return [c for c in self.cases.values() if c.status == "ok"]


# (youtube_id, start_time) of real test-split rows; ids beginning with '-' and '--' on purpose.
_CASES = [
    ("7fmOlUlwoNg", 20, "ok", MediaSpec(30, tone_hz=300)),
    ("6BJ455B1aAs", 0, "ok", MediaSpec(10, tone_hz=500)),
    ("-NrFeH-kBSM", 0, "ok", MediaSpec(10, tone_hz=700)),
    ("--0w1YA1Hm4", 30, "ok", MediaSpec(40, tone_hz=900)),
    ("-NsC63dA01g", 10, "ok", MediaSpec(20, tone_hz=1100)),
    ("sVYTOURVsQ0", 0, "ok", MediaSpec(10, width=640, height=360, fps=25, tone_hz=1300)),
    ("7D7xgd4WJ50", 0, "ok", MediaSpec(10, width=240, height=320, tone_hz=1500)),  # portrait
    ("CO6-i8NLbeo", 0, "ok", MediaSpec(10, tone_hz=1700, channels=1)),
    ("qZEIs6tS5vk", 0, "48k-stereo", MediaSpec(10, sample_rate=48000, channels=2, tone_hz=1900)),
    ("YEYeQ0lIkBQ", 0, "short-3s", MediaSpec(3, tone_hz=2100)),
    ("3MoF8myFs8Y", 0, "404", None),
    ("PMMkPq5jJXY", 0, "no-audio", MediaSpec(10, audio=False)),
    ("7P6lcyeDKNI", 0, "no-video", MediaSpec(10, video=False, tone_hz=2300)),
    ("TQr9v-PQOc4", 0, "html", None),
]
_EXPECT = {
    "ok": ("ok", None), "48k-stereo": ("ok", None), "short-3s": ("ok", None),
    "404": ("failed-permanent", "http-404"), "html": ("failed-permanent", "unsupported-url"),
    "no-audio": ("failed-permanent", "no-audio-stream"), "no-video": ("failed-permanent", "no-video-stream"),
}


def _real_rows(path: Path, wanted: set[tuple[str, int]]) -> dict[tuple[str, int], list[dict]]:
    rows: dict[tuple[str, int], list[dict]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            k = (r["youtube_id"], int(r["start_time"]))
            if k in wanted:
                rows.setdefault(k, []).append(r)
    return rows


@pytest.fixture(scope="session")
def media_server():
    with MediaServer() as server:
        yield server


@pytest.fixture(scope="session")
def audiocaps_media(media_server, tmp_path_factory) -> AudioCapsMedia:
    root = tmp_path_factory.mktemp("audiocaps_media")
    media_dir = root / "videos"
    media_dir.mkdir()
    rows = _real_rows(AUDIOCAPS_TEST_CSV, {(y, s) for y, s, _, _ in _CASES})
    cases: dict[str, ClipCase] = {}
    csv_lines = ["audiocap_id,youtube_id,start_time,caption"]
    for yid, start, kind, spec in _CASES:
        real = rows[(yid, start)]
        assert len(real) == 5, f"{yid}: expected 5 captions in {AUDIOCAPS_TEST_CSV}, found {len(real)}"
        status, reason = _EXPECT[kind]
        case = ClipCase(yid, start, kind, status, reason, spec=spec,
                        duration=min(10.0, spec.duration - start) if spec else 10.0,
                        captions=[r["caption"] for r in real], audiocap_ids=[int(r["audiocap_id"]) for r in real])
        cases[case.key] = case
        path = f"/v/{yid}.mp4"
        if spec is not None:
            make_media(media_dir / f"{yid}.mp4", spec)
            media_server.routes[path] = Route(file=media_dir / f"{yid}.mp4")
        elif kind == "html":
            (media_dir / f"{yid}.mp4").write_bytes(HTML_PAGE)
            media_server.routes[path] = Route(body=HTML_PAGE, content_type="text/html; charset=utf-8")
        for r in real:
            caption = r["caption"]
            if any(ch in caption for ch in ',"\n'):
                caption = '"' + caption.replace('"', '""') + '"'
            csv_lines.append(f"{r['audiocap_id']},{yid},{start},{caption}")
    csv_lines.append("999999,not-an-id!,0,A row whose id is not a YouTube id")
    csv_path = root / "test_subset.csv"
    csv_path.write_bytes(("\r\n".join(csv_lines) + "\r\n").encode())
    return AudioCapsMedia(server=media_server, url_template=media_server.url_template(), csv_path=csv_path,
                          bad_row_line=len(csv_lines), media_dir=media_dir, cases=cases)
