"""Fetch the 10 s window of each clip with yt-dlp, or find it among media the user already has.

Retries live in exactly one layer, this module's exponential backoff: yt-dlp runs with its own retries off and
the Prefect task that calls us has none. Each attempt runs yt-dlp's Python API in a child process (see
`_worker_main`) so that a stalled download, including the ffmpeg that yt-dlp starts for the section download,
can be killed as a whole when the per-clip time limit runs out; the URL travels to it on stdin, never on a
command line.

Errors are classified from yt-dlp's and ffmpeg's messages (`ERROR_TABLE`, one row per message the pinned yt-dlp
raises; tests/ytdlp_messages.py holds the exact strings) into permanent (the video is gone or never will be
reachable for us: retrying wastes requests and invites throttling), transient (retry later), and two stops that
end the download stage at once, leaving the clip and every untried one pending: the bot wall (a bot check or
captcha: every further request would fail the same way) and the rate limit (YouTube's "try again later", or an
HTTP 429 that outlasts the retries), which `on_rate_limit="wait"` turns into a pause of all workers instead.

YouTube needs a JavaScript runtime (deno, from the `deno` package pinned with yt-dlp) and yt-dlp's EJS solver
scripts (the `yt-dlp-ejs` package): both are installed, never fetched at run time (`remote_components` is empty),
and the runtime is passed explicitly so the one used is known. All download children share one yt-dlp cache
directory (player JS, solved challenges): yt-dlp writes each entry to a temporary file and renames it into place,
so concurrent children never see half an entry.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

from pipeline.clip_list import Clip, validate_youtube_id
from pipeline.status import FAILED_PERMANENT, FAILED_TRANSIENT, OK, ClipStatus
from shards.atomic import finalize, remove_stale_temps, temp_dir
from shards.hashing import file_sha256

log = logging.getLogger("avcap.download")

DEFAULT_URL_TEMPLATE = "https://www.youtube.com/watch?v={youtube_id}"
DEFAULT_JS_RUNTIME = "deno"
JS_RUNTIMES = ("deno", "node", "quickjs", "bun")   # yt-dlp's supported runtimes (yt_dlp.globals)
# YouTube lets a guest session fetch about 300 videos an hour and an account about 2000 (yt-dlp's wiki on
# extractors); the defaults stay well under both, since a rate-limited session is blocked for up to an hour.
GUEST_MAX_PER_HOUR = 250
COOKIES_MAX_PER_HOUR = 1000
RATE_LIMIT_PAUSE_S = 3600.0   # YouTube: "rate-limited ... for up to an hour"
ON_RATE_LIMIT = ("stop", "wait")
# The smallest video of at least 224 px (the frames are 224x224 crops) plus the best audio; `?` lets formats of
# unknown height (direct links) pass. `+res` sorts ascending, so "best" under the filter is the smallest.
DEFAULT_FORMAT = "bv*[height>=?224]+ba/b[height>=?224]/bv*+ba/b"
DEFAULT_FORMAT_SORT = ("+res", "+size")
MEDIA_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".m4a", ".flv", ".avi", ".mp3", ".wav", ".flac", ".ogg", ".opus")



class BotWallError(RuntimeError):
    """The site answers every request with a bot check; continuing would fail every remaining clip."""


class RateLimitError(RuntimeError):
    """The site rate-limits this session; every request before the limit lifts would fail."""


@dataclass
class DownloadConfig:
    url_template: str = DEFAULT_URL_TEMPLATE
    cookies: Path | None = None
    proxy: str | None = None
    sleep_s: float = 0.0          # minimum gap between two requests, over all workers
    workers: int = 4
    timeout_s: float = 300.0      # per attempt; the attempt is killed after it
    max_retries: int = 3          # transient failures: attempts = 1 + max_retries
    backoff_base_s: float = 2.0   # delay before retry i (0-based): base * 2**i, jittered to [50%, 100%]
    backoff_max_s: float = 120.0
    socket_timeout_s: float = 30.0
    format: str = DEFAULT_FORMAT
    format_sort: tuple[str, ...] = DEFAULT_FORMAT_SORT
    clip_seconds: int = 10
    js_runtime: str = DEFAULT_JS_RUNTIME   # NAME[:PATH], NAME one of JS_RUNTIMES
    allow_no_js: bool = False              # let a YouTube build start without a usable JS runtime
    cache_dir: Path | None = None          # yt-dlp's cache, shared by all download children; None: no cache
    max_per_hour: float | None = None      # clip attempts per hour over all workers (token bucket); None: no cap
    on_rate_limit: str = "stop"            # stop | wait
    rate_limit_pause_s: float = RATE_LIMIT_PAUSE_S
    extractor_args: tuple[str, ...] = ()   # yt-dlp --extractor-args values, e.g. youtube:player_client=web
    no_formats_streak: int = 20            # this many no-formats failures in a row stop the stage
    no_formats_window: int = 50            # ... or more than half of the first this many outcomes

    def __post_init__(self) -> None:
        validate_url_template(self.url_template)
        self.extractor_args = tuple(self.extractor_args or ())
        self.cache_dir = Path(self.cache_dir) if self.cache_dir is not None else None
        if self.on_rate_limit not in ON_RATE_LIMIT:
            raise ValueError(f"on_rate_limit must be one of {', '.join(ON_RATE_LIMIT)}, got {self.on_rate_limit!r}")
        if self.rate_limit_pause_s < 0 or (self.max_per_hour is not None and self.max_per_hour <= 0):
            raise ValueError(f"invalid pacing: max_per_hour={self.max_per_hour} (must be > 0) "
                             f"rate_limit_pause_s={self.rate_limit_pause_s}")
        self.ytdlp_options()   # a bad --js-runtime or --extractor-args fails here, before any request
        if self.cookies is not None:
            self.cookies = Path(self.cookies)
            if not self.cookies.is_file():
                raise ValueError(f"cookies file {self.cookies} does not exist")
        if self.workers < 1 or self.max_retries < 0 or self.timeout_s <= 0 or self.sleep_s < 0:
            raise ValueError(f"invalid download settings: workers={self.workers} max_retries={self.max_retries} "
                             f"timeout_s={self.timeout_s} sleep_s={self.sleep_s}")


    def js_runtime_name_path(self) -> tuple[str, str | None]:
        name, _, path = self.js_runtime.partition(":")
        return name.lower(), path or None

    def ytdlp_options(self) -> dict:
        """`js_runtimes` and `extractor_args` as yt-dlp's own option parser makes them from its flags."""
        name, path = self.js_runtime_name_path()
        if name not in JS_RUNTIMES:
            raise ValueError(f"--js-runtime {self.js_runtime!r}: the runtime must be one of {', '.join(JS_RUNTIMES)}"
                             " (optionally NAME:PATH)")
        argv = ["--ignore-config", "--no-js-runtimes", "--js-runtimes", self.js_runtime]
        for arg in self.extractor_args:
            key, sep, value = arg.partition(":")
            if not sep or not key or not value:
                raise ValueError(f"--extractor-args {arg!r}: expected IE_KEY:ARG=VALUE[;ARG=VALUE]")
            argv += ["--extractor-args", arg]
        import yt_dlp
        try:
            parsed = yt_dlp.parse_options(argv).ydl_opts
        except SystemExit as e:   # optparse's way of saying "bad option"
            raise ValueError(f"yt-dlp rejected --js-runtime/--extractor-args {argv[3:]}") from e
        return {"js_runtimes": parsed["js_runtimes"], "extractor_args": parsed["extractor_args"]}


def default_max_per_hour(url_template: str, cookies) -> float | None:
    """The pacing a build gets unless told otherwise: under YouTube's guest (or account) limit for YouTube,
    none for other sites (a mirror or a loopback server has its own limits, if any)."""
    if not is_youtube_template(url_template):
        return None
    return COOKIES_MAX_PER_HOUR if cookies else GUEST_MAX_PER_HOUR


@dataclass
class DownloadResult:
    status: ClipStatus           # ok | failed-permanent | failed-transient
    path: Path | None = None
    reason: str | None = None    # e.g. http-404, private, timeout
    message: str | None = None   # tail of yt-dlp's / ffmpeg's output
    attempts: int = 0            # 0 when the clip was already on disk
    media_sha256: str | None = None


@dataclass
class DownloadBatch:
    results: dict[str, DownloadResult] = field(default_factory=dict)
    untried: list[str] = field(default_factory=list)   # keys left pending after a stop (bot wall, rate limit)
    bot_wall: BotWallError | None = None
    rate_limit: RateLimitError | None = None
    rate_limit_pauses: int = 0                          # --on-rate-limit wait: how often all workers paused


def validate_url_template(template: str) -> str:
    if "{youtube_id}" not in template:
        raise ValueError(f"URL template {template!r} has no {{youtube_id}} placeholder")
    probe = build_url(template, "abcdefghijk", check=False)
    parts = urlsplit(probe)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"URL template {template!r} does not give an http(s) URL")
    return template


def build_url(template: str, youtube_id: str, check: bool = True) -> str:
    # str.replace, not str.format: a template may legitimately hold other braces, and only a validated id
    # may enter the URL.
    yid = validate_youtube_id(youtube_id) if check else youtube_id
    return template.replace("{youtube_id}", yid)


def is_youtube_template(template: str) -> bool:
    host = (urlsplit(build_url(template, "abcdefghijk", check=False)).hostname or "").lower()
    return host == "youtu.be" or host == "youtube.com" or host.endswith(".youtube.com")


BOT_WALL, RATE_LIMIT, PERMANENT, TRANSIENT = "bot-wall", "rate-limit", "permanent", "transient"
NO_FORMATS = "no-formats"
NO_FORMATS_HINT = ("yt-dlp found no usable format: YouTube withholds formats from clients without a working "
                   "JavaScript runtime (run `python flows.py doctor`) or, for some clients, without a PO token "
                   "(README: PO tokens)")

# (pattern, kind, reason), matched against the lowercased ERROR part of a message; the first match wins, so the
# stops and the specific causes come before the generic "video unavailable" that YouTube puts in front of many
# of them. Each row stands for messages the pinned yt-dlp raises (tests/ytdlp_messages.py holds them verbatim).
ERROR_TABLE: list[tuple[str, str, str]] = [
    # Our disk, not the site: the clip is fine and a rerun after freeing space gets it. Before the rest:
    # ffmpeg's failure to write can come wrapped in anything.
    (r"no space left on device|disk quota exceeded", TRANSIENT, "disk-full"),
    # _video.py: "... This content isn't available, try again later. The current session has been rate-limited
    # by YouTube for up to an hour ..."
    (r"try again later|rate-limited|rate limited", RATE_LIMIT, "rate-limit"),
    # _video.py: "... YouTube is requiring a captcha challenge before playback"
    (r"captcha", BOT_WALL, "captcha"),
    (r"confirm you.re not a bot", BOT_WALL, "bot-wall"),
    # _video.py: "All player responses are invalid. Your IP is likely being blocked by Youtube"
    (r"your ip is likely being blocked", BOT_WALL, "ip-blocked"),
    # YoutubeDL.py: "Requested format is not available ...", "No video formats found!": mostly a missing JS
    # runtime or PO token on our side, so never permanent (a streak of them stops the stage instead).
    (r"requested format is not available|no video formats found", TRANSIENT, NO_FORMATS),
    # The clip's window starts at or after the end of the video: no download can ever give its 10 s.
    (r"starts past the end", PERMANENT, "start-past-end"),
    (r"private video|video is private", PERMANENT, "private"),
    # Before "removed": YouTube says "no longer available due to a copyright claim".
    (r"copyright", PERMANENT, "copyright"),
    (r"removed by the (user|uploader)|account associated with this video has been terminated"
     r"|video has been removed|no longer available", PERMANENT, "removed"),
    (r"confirm your age|age[- ]restricted|inappropriate for some users", PERMANENT, "age-restricted"),
    (r"available in your country|blocked it in your country|geo[- ]?restrict|not available from your location",
     PERMANENT, "geo-restricted"),
    (r"members[- ]only|join this channel", PERMANENT, "members-only"),
    # common.py raise_login_required's default and YouTube's "Login details are needed": a rerun with
    # --cookies and --retry-reason login-required gets them.
    (r"only available for registered users|login details are needed|login required", PERMANENT, "login-required"),
    (r"drm protected", PERMANENT, "drm"),
    # "No suitable extractor": the URL is outside the extractors we allow (YouTube only for a YouTube template).
    (r"unsupported url|no suitable extractor", PERMANENT, "unsupported-url"),
    (r"video unavailable|is not available|this video is unavailable", PERMANENT, "unavailable"),
]
_NETWORK = [
    (r"^truncated download", "truncated"),
    (r"timed out|timeout", "timeout"),
    (r"connection (reset|refused|aborted)|remote end closed|broken pipe|incomplete ?read|eof occurred"
     r"|temporary failure in name resolution|network is unreachable|end of file|ends prematurely", "network"),
]
# yt-dlp: "HTTP Error 404: Not Found"; ffmpeg (section downloads): "Server returned 404 Not Found".
_HTTP_STATUS = re.compile(r"(?:http error|server returned) (\d{3})")
_WARNING = re.compile(r"^\s*warning:", re.IGNORECASE)


_FF_DURATION = re.compile(r"Duration: (\d+):(\d{2}):(\d{2}(?:\.\d+)?)")
_FF_TIME = re.compile(r"time=(\d+):(\d{2}):(\d{2}(?:\.\d+)?)")
TRUNCATION_TOLERANCE_S = 1.0


def _seconds(m: re.Match) -> float:
    return int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))


def truncation(ffmpeg_log: str, start: float, window: float,
               tolerance_s: float = TRUNCATION_TOLERANCE_S) -> str | None:
    """A message when the window ffmpeg copied ends well before where the source says it does, else None.

    yt-dlp's ffmpeg re-muxes the window into a new file whose header only knows what arrived, so a transfer
    cut short looks like a short video afterwards; only ffmpeg's log still has the source's declared
    `Duration:` (first input) and the `time=` it reached."""
    declared = _FF_DURATION.search(ffmpeg_log)
    reached = None
    for reached in _FF_TIME.finditer(ffmpeg_log):
        pass
    if declared is None or reached is None:
        return None
    total, got = _seconds(declared), _seconds(reached)
    expected = min(total - start, window)
    if expected - got <= tolerance_s:
        return None
    return (f"truncated download: ffmpeg copied {got:.2f} s of the window but the source declares {total:.2f} s "
            f"({expected:.2f} s expected from {start:g} s): the transfer ended early")


def start_past_end(ffmpeg_log: str, start: float) -> str | None:
    """A message when the window starts at or after the end the source declares (ffmpeg's first `Duration:`),
    else None: yt-dlp then "succeeds" with a file of a few stray frames, and no later request can do better.
    The message is classified by ERROR_TABLE's start-past-end row."""
    declared = _FF_DURATION.search(ffmpeg_log)
    if declared is None or start < _seconds(declared):
        return None
    return f"the window starts past the end of the video (start {start:g} s, video {_seconds(declared):.2f} s)"


def error_part(message: str) -> str:
    """The message without its WARNING lines: a warning (such as the missing-JS-runtime one) comes with many
    failures without being their cause, so it never classifies a clip."""
    return "\n".join(line for line in message.splitlines() if not _WARNING.match(line))


def classify_error(message: str) -> tuple[str, str]:
    """(kind, reason) with kind in bot-wall / rate-limit / permanent / transient; unknown messages are
    transient (a rerun tries again; a wrong permanent would lose the clip for good)."""
    m = error_part(message).lower()
    for pattern, kind, reason in ERROR_TABLE:
        if re.search(pattern, m):
            return kind, reason
    status = _HTTP_STATUS.search(m)
    if status:
        code = int(status.group(1))
        # 404/410: the resource is gone; 416 on ffmpeg's `bytes=0-` request: it is empty (or ends before the
        # window). Everything else (403 from expired signed URLs, 429, 5xx) can pass.
        return (PERMANENT if code in (404, 410, 416) else TRANSIENT), f"http-{code}"
    for pattern, reason in _NETWORK:
        if re.search(pattern, m):
            return TRANSIENT, reason
    return TRANSIENT, "unknown-error"


def backoff_delay(retry: int, cfg: DownloadConfig, rng: random.Random | None = None) -> float:
    """Full-range jitter on the upper half: spreads workers that failed together without ever waiting ~0."""
    rng = rng or random
    ceiling = min(cfg.backoff_max_s, cfg.backoff_base_s * (2 ** retry))
    return ceiling * rng.uniform(0.5, 1.0)


class RequestPacer:
    """When the next request may start, over all download threads: at least `interval_s` apart (`--sleep`), at
    most `per_hour` an hour (`--max-per-hour`, a token bucket holding up to `burst` requests), and none while
    paused (`pause`, after a rate limit). Written here because the cap spans threads and the child processes
    they start, and yt-dlp's own sleep options pace one process only."""

    def __init__(self, interval_s: float = 0.0, per_hour: float | None = None, burst: int = 1,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        self.interval_s = interval_s
        self.rate = per_hour / 3600.0 if per_hour else None
        self.burst = max(1, burst)
        self._clock, self._sleep = clock, sleep
        self._tokens = float(self.burst)
        self._updated = clock()
        self._next = 0.0
        self._paused_until = 0.0
        self._lock = threading.Lock()

    def pause(self, seconds: float) -> None:
        with self._lock:
            self._paused_until = max(self._paused_until, self._clock() + seconds)

    def wait(self) -> None:
        while True:
            with self._lock:
                now = self._clock()
                if self.rate is not None:
                    self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
                self._updated = now
                delays = [self._paused_until - now, self._next - now]
                if self.rate is not None:
                    delays.append((1.0 - self._tokens) / self.rate)
                delay = max(delays)
                if delay <= 0:
                    if self.rate is not None:
                        self._tokens -= 1.0
                    self._next = now + self.interval_s
                    return
            self._sleep(delay)


def expected_hours(clips: int, cfg: DownloadConfig) -> float | None:
    """The least time `clips` downloads take under the pacing (None: unpaced)."""
    rates = [cfg.max_per_hour] if cfg.max_per_hour else []
    if cfg.sleep_s > 0:
        rates.append(3600.0 / cfg.sleep_s)
    return clips / min(rates) if rates else None




@dataclass(frozen=True)
class LocalMedia:
    """A media file found for a clip on disk, and where the clip's window starts in it."""
    path: Path       # as the user named it: absolute, links NOT resolved (the name decides the offset)
    offset: float    # seconds: 0 in a cut clip (the user's or a build's cache), start_time in a whole video
    name: str        # the matched name


def local_media_names(clip: Clip) -> list[tuple[str, float]]:
    """(file stem, window offset) that a clip's media may have on disk, most specific first: the user's cut
    clip `{youtube_id}_{start_time}`, a build's own media cache `{key}` (DIR/media: the window cut out), the
    whole video `{youtube_id}`. The one rule that maps a name to an offset (the build and the audit use it)."""
    yid = validate_youtube_id(clip.youtube_id)  # no glob metacharacters can follow from here
    return [(f"{yid}_{clip.start_time}", 0.0), (clip.key, 0.0), (yid, float(clip.start_time))]


def find_local_media(clip: Clip, media_dir: Path) -> LocalMedia | None:
    """The clip's media in `media_dir` by the names of `local_media_names`, or None.

    The offset comes from the name found here, before anything resolves a link: git-annex and DVC keep
    `{youtube_id}.mp4` as a symlink into a store whose names say nothing, so symlinks, hard links and a
    symlinked directory are plain files to us. The path stays the one the user gave."""
    media_dir = Path(media_dir).absolute()
    for stem, offset in local_media_names(clip):
        hits = sorted(p for p in media_dir.glob(f"{stem}.*")
                      if p.is_file() and p.suffix.lower() in MEDIA_SUFFIXES and p.stem == stem)
        if hits:
            return LocalMedia(hits[0], offset, hits[0].name)
    return None


class DownloadsStopped(RuntimeError):
    """The download stage was interrupted (Ctrl-C, SIGTERM): the clip was not tried to the end."""


class _Attempts:
    """The yt-dlp child processes of one download batch, and its stop flag: a stop kills them (their whole
    process group) and no new attempt or retry starts, so a stopped stage ends within seconds."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self._procs: set[subprocess.Popen] = set()
        self._lock = threading.Lock()

    def add(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self._procs.add(proc)
        if self.stop.is_set():
            _kill_group(proc)

    def discard(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self._procs.discard(proc)

    def kill_all(self) -> None:
        self.stop.set()
        with self._lock:
            procs = list(self._procs)
        for proc in procs:
            _kill_group(proc)


def download_clip(clip: Clip, cfg: DownloadConfig, media_dir: Path, pacer: RequestPacer | None = None,
                  sleep: Callable[[float], None] | None = None, attempts: _Attempts | None = None
                  ) -> DownloadResult:
    """Download the clip's window to `media_dir/{key}.mp4` (atomic), retrying transient errors with backoff.

    Raises BotWallError on a bot check, RateLimitError on a rate limit (also an HTTP 429 through every retry),
    DownloadsStopped when `attempts` was stopped. A file already at the destination is returned as is."""
    attempts = attempts or _Attempts()
    sleep = sleep or attempts.stop.wait   # a backoff that a stop cuts short
    media_dir = Path(media_dir)
    final = media_dir / f"{clip.key}.mp4"
    if final.is_file():
        return DownloadResult(OK, final, attempts=0, media_sha256=file_sha256(final))
    url = build_url(cfg.url_template, clip.youtube_id)
    tmp_root = media_dir / ".tmp"
    tmp_root.mkdir(parents=True, exist_ok=True)
    last: DownloadResult | None = None
    for attempt in range(cfg.max_retries + 1):
        if attempt:
            sleep(backoff_delay(attempt - 1, cfg))
        if pacer is not None:
            pacer.wait()
        if attempts.stop.is_set():
            raise DownloadsStopped(f"{clip.key}: downloads stopped")
        # The pid in the name lets a later run tell a killed build's leftovers from a running build's work.
        tmp = temp_dir(tmp_root, clip.key)
        try:
            ok, produced, message = _run_attempt(url, clip, cfg, tmp, attempts)
            if attempts.stop.is_set():
                raise DownloadsStopped(f"{clip.key}: downloads stopped")
            past = start_past_end(message, clip.start_time)
            if past is not None:
                ok, message = False, f"{past}\n{message[-1000:]}"
            cut = truncation(message, clip.start_time, cfg.clip_seconds) if ok else None
            if cut is not None:
                ok, message = False, f"{cut}\n{message[-1000:]}"
            if ok:
                finalize(produced, final)  # same filesystem: the finished name appears only when complete
                return DownloadResult(OK, final, attempts=attempt + 1, media_sha256=file_sha256(final))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        kind, reason = classify_error(message)
        if kind == BOT_WALL:
            raise BotWallError(f"{url}: the site asks to sign in to confirm this is not a bot ({reason}); stopping "
                               f"downloads (pass --cookies FILE from a logged-in browser, or slow down with "
                               f"--max-per-hour). yt-dlp said: {error_part(message).strip()[-300:]}")
        if kind == RATE_LIMIT:
            raise RateLimitError(_rate_limit_message(url, error_part(message)))
        if reason == NO_FORMATS:
            message = f"{NO_FORMATS_HINT}\n{message}"
        status = FAILED_PERMANENT if kind == PERMANENT else FAILED_TRANSIENT
        last = DownloadResult(status, None, reason, message[-2000:], attempts=attempt + 1)
        if kind == PERMANENT:
            return last
    if last is not None and last.reason == "http-429":
        # Too Many Requests through every retry: the site's limit, not this clip's problem.
        raise RateLimitError(_rate_limit_message(url, last.message, f"HTTP 429 after {last.attempts} attempts"))
    return last


def _rate_limit_message(url: str, said: str, what: str = "rate-limited") -> str:
    return (f"{url}: {what}: the site rate-limits this session; stopping downloads (the clip and every untried "
            f"clip stay pending: run the same build again in an hour, with a lower --max-per-hour, or pass "
            f"--on-rate-limit wait). yt-dlp said: {said.strip()[-300:]}")


def remove_stale_attempts(media_dir: Path) -> int:
    """Delete the attempt dirs in `media_dir/.tmp` left by killed builds (their pid is gone); returns how many."""
    return len(remove_stale_temps(Path(media_dir) / ".tmp"))


def download_many(clips: list[Clip], cfg: DownloadConfig, media_dir: Path,
                  on_result: Callable[[Clip, DownloadResult], None] | None = None,
                  pacer: RequestPacer | None = None) -> DownloadBatch:
    """Download with `cfg.workers` threads; `on_result` sees each outcome as it lands (record it right away,
    so a killed build loses nothing). A bot wall, a rate limit (unless `cfg.on_rate_limit == "wait"`) or a run
    of no-formats failures stops new attempts; clips not finished stay in `untried`."""
    batch = DownloadBatch()
    remove_stale_attempts(media_dir)
    if pacer is None:
        pacer = RequestPacer(cfg.sleep_s, cfg.max_per_hour, burst=cfg.workers)
    queue = list(clips)
    stop = threading.Event()
    streak = 0
    first: list[bool] = []   # of the first no_formats_window outcomes: whether each was no-formats
    live = _Attempts()
    with ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="download") as pool:
        running: dict[Future, Clip] = {}
        try:
            while queue or running:
                while queue and len(running) < cfg.workers and not stop.is_set():
                    clip = queue.pop(0)
                    running[pool.submit(download_clip, clip, cfg, media_dir, pacer, attempts=live)] = clip
                if not running:
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    clip = running.pop(fut)
                    try:
                        result = fut.result()
                    except BotWallError as e:
                        batch.bot_wall = batch.bot_wall or e
                        stop.set()
                        batch.untried.append(clip.key)  # attempted, but it stays pending like the rest
                        continue
                    except RateLimitError as e:
                        if cfg.on_rate_limit == "wait" and not stop.is_set():
                            batch.rate_limit_pauses += 1
                            log.warning("rate limited: all downloads pause for %g s, then go on (%s)",
                                        cfg.rate_limit_pause_s, e)
                            pacer.pause(cfg.rate_limit_pause_s)
                            queue.insert(0, clip)
                        else:
                            batch.rate_limit = batch.rate_limit or e
                            stop.set()
                            batch.untried.append(clip.key)
                        continue
                    batch.results[clip.key] = result
                    if on_result is not None:
                        on_result(clip, result)
                    no_formats = result.reason == NO_FORMATS
                    streak = streak + 1 if no_formats else 0
                    if len(first) < cfg.no_formats_window:
                        first.append(no_formats)
                    wall = _no_formats_wall(streak, first, cfg)
                    if wall is not None and batch.bot_wall is None:
                        batch.bot_wall = BotWallError(wall)
                        stop.set()
        except BaseException:
            # Interrupted (Ctrl-C, SIGTERM, an error in on_result): kill the running attempts now, or leaving
            # the pool would wait for each stalled download to reach its time limit. Their clips stay as they
            # were in the ledger, so the next run tries them again.
            live.kill_all()
            raise
        batch.untried.extend(c.key for c in queue)
    return batch


def _no_formats_wall(streak: int, first: list[bool], cfg: DownloadConfig) -> str | None:
    """Why the stage stops for no-formats failures (they look the same for every clip when the JS runtime or
    PO token is what is missing), or None."""
    bad = sum(first)
    if streak >= cfg.no_formats_streak:
        what = f"{streak} clips in a row"
    elif 2 * bad > cfg.no_formats_window:
        what = f"{bad} of the first {cfg.no_formats_window} clips"
    else:
        return None
    return (f"{what} failed with no usable format; stopping downloads instead of trying the whole list. "
            f"{NO_FORMATS_HINT}")


# ---------------------------------------------------------------------------------------------------------
# The child process: one yt-dlp attempt.

def worker_job(url: str, clip: Clip, cfg: DownloadConfig, tmp: Path) -> dict:
    """What the download child gets on stdin: everything it needs, as JSON."""
    return {
        "url": url,
        "tmp": str(tmp.resolve()),
        "start": clip.start_time,
        "end": clip.start_time + cfg.clip_seconds,
        "format": cfg.format,
        "format_sort": list(cfg.format_sort),
        "cookies": str(Path(cfg.cookies).resolve()) if cfg.cookies else None,
        "proxy": cfg.proxy,
        "socket_timeout": cfg.socket_timeout_s,
        # yt-dlp names a plugin that overrides an extractor NAME+PLUGIN (its plugin mechanism): such plugins
        # (a user's, or the tests' stand-in for YouTube's answers) stay allowed.
        "extractors": [r"youtube(\+\w+)*"] if is_youtube_template(cfg.url_template) else [r"generic(\+\w+)*"],
        "cache_dir": str(Path(cfg.cache_dir).resolve()) if cfg.cache_dir else None,
        **cfg.ytdlp_options(),
    }


def _run_attempt(url: str, clip: Clip, cfg: DownloadConfig, tmp: Path, attempts: _Attempts | None = None
                 ) -> tuple[bool, Path | None, str]:
    """(ok, produced file, message): on failure the error, on success the tools' log (to check truncation)."""
    job = worker_job(url, clip, cfg, tmp)
    # Own session: on timeout the whole group goes, the ffmpeg that yt-dlp started included.
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.download", "--worker"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            cwd=str(Path(__file__).resolve().parent.parent))
    if attempts is not None:
        attempts.add(proc)
    try:
        out, err = proc.communicate(json.dumps(job).encode(), timeout=cfg.timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        return False, None, f"timed out after {cfg.timeout_s:g} s (time limit per clip). {_tail(err)}"
    finally:
        if proc.poll() is None:
            _kill_group(proc)
        if attempts is not None:
            attempts.discard(proc)
    try:
        answer = json.loads(out.decode().strip().splitlines()[-1])
    except (IndexError, ValueError):
        return False, None, f"download worker exited {proc.returncode} without an answer: {_tail(err)}"
    if answer["ok"]:
        return True, Path(answer["path"]), err.decode("utf-8", errors="replace")
    # yt-dlp only says "ffmpeg exited with code 1"; ffmpeg's own words (on the worker's stderr) name the cause.
    tool = _tail(err, 1000).strip()
    return False, None, answer["message"] + (f"\n{tool}" if tool else "")


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, 9)
    except ProcessLookupError:
        pass
    proc.wait()


def _tail(b: bytes, n: int = 1500) -> str:
    return b.decode(errors="replace")[-n:]


class _Collect:
    """yt-dlp logger that keeps the messages for classification instead of printing them."""

    def __init__(self):
        self.lines: list[str] = []

    def debug(self, msg: str) -> None:
        pass

    def info(self, msg: str) -> None:
        pass

    def warning(self, msg: str) -> None:
        # yt-dlp hands warnings over without a prefix; errors arrive as "ERROR: ...".
        self.lines.append(msg if msg.startswith("WARNING:") else f"WARNING: {msg}")

    def error(self, msg: str) -> None:
        self.lines.append(msg)


def _worker_main() -> int:
    import yt_dlp
    from yt_dlp.utils import download_range_func

    job = json.loads(sys.stdin.read())
    tmp = Path(job["tmp"])
    log = _Collect()
    opts = {
        "format": job["format"],
        "format_sort": job["format_sort"],
        "download_ranges": download_range_func(None, [(job["start"], job["end"])]),
        "outtmpl": {"default": str(tmp / "clip.%(ext)s")},
        "merge_output_format": "mp4",
        "postprocessors": [{"key": "FFmpegVideoRemuxer", "preferedformat": "mp4"}],
        # One retry layer: ours. yt-dlp's own retries would multiply with it.
        "retries": 0, "fragment_retries": 0, "extractor_retries": 0, "file_access_retries": 0,
        "socket_timeout": job["socket_timeout"],
        "noplaylist": True,
        "allowed_extractors": job["extractors"],
        # The build's one cache (player JS, solved challenges), or none.
        "cachedir": job["cache_dir"] or False,
        # The runtime is named (the one used is known, and recorded in the manifest) and nothing is fetched
        # at run time: the EJS solver scripts come from the yt-dlp-ejs package.
        "js_runtimes": job["js_runtimes"],
        "remote_components": [],
        "extractor_args": job["extractor_args"],
        "overwrites": True,
        # Not quiet: yt-dlp would pass `-loglevel quiet` to ffmpeg, and ffmpeg's message is what names the cause
        # of a failed section download. Everything goes to `log`, nothing to the terminal.
        "quiet": False, "no_warnings": False, "noprogress": True,
        "logger": log,
    }
    if job["cookies"]:
        opts["cookiefile"] = job["cookies"]
    if job["proxy"]:
        opts["proxy"] = job["proxy"]
    try:
        with yt_dlp.YoutubeDL(opts) as ydl:
            code = ydl.download([job["url"]])
        produced = sorted(p for p in tmp.glob("clip.*") if p.suffix == ".mp4")
        if code == 0 and produced:
            answer = {"ok": True, "path": str(produced[0])}
        else:
            answer = {"ok": False, "message": "\n".join(log.lines) or f"yt-dlp finished ({code}) without a file"}
    except Exception as e:  # noqa: BLE001 - everything yt-dlp raises is reported to the parent for classification
        answer = {"ok": False, "message": "\n".join(log.lines + [f"{type(e).__name__}: {e}"])}
    print(json.dumps(answer), flush=True)
    return 0


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    sys.exit(_worker_main())
