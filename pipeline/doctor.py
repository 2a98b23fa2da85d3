"""`flows.py doctor`: can a download build start here? The preflight a user runs before a week-long build, and
the checks every download build runs (in short) before its first request.

    python flows.py doctor [--url-template T] [--cookies F] [--proxy P] [--out DIR] [--js-runtime NAME[:PATH]]

Each check is ok, warn (worth knowing, the build still starts) or fail (the build would stop: exit 1). What is
detected comes from yt-dlp itself wherever yt-dlp knows it: the JS runtime through the YoutubeDL the download
stage configures (its `js_runtimes` detection, which also says whether the version is supported), the EJS
solver scripts through yt-dlp's dependency probe, PO-token providers through yt-dlp's plugin registry, the
cookies file through yt-dlp's own Netscape cookie jar. No request leaves the machine.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from pipeline.download import DownloadConfig, is_youtube_template
from shards.manifest import ffmpeg_version, redact

OK, WARN, FAIL = "ok", "warn", "fail"
# YouTube changes its player faster than this; an older yt-dlp is the first suspect when clips start failing.
MAX_YTDLP_AGE_DAYS = 60
# An AudioCaps train split's media and shards need about this much. Only a warning: a build that fills the disk
# stops cleanly with its finished clips kept (pipeline.build), so low space never stops one up front.
LOW_FREE_BYTES = 20 << 30
JS_INSTALL_HINT = ("install one: `pip install 'yt-dlp[default,deno]'` (the project's pins bring deno and the EJS "
                   "scripts), or pass --js-runtime node|quickjs[:PATH]; --allow-no-js starts anyway")


@dataclass
class Check:
    name: str
    status: str          # ok | warn | fail
    detail: str

    def line(self) -> str:
        return f"{self.name}: {self.detail}"


@dataclass
class DoctorReport:
    checks: list[Check] = field(default_factory=list)

    def add(self, name: str, status: str, detail: str) -> None:
        self.checks.append(Check(name, status, detail))

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == FAIL]

    def short(self) -> str:
        return "; ".join(f"{c.line()}" + ("" if c.status == OK else f" [{c.status.upper()}]") for c in self.checks)

    def text(self) -> str:
        width = max(len(c.name) for c in self.checks)
        return "\n".join(f"{c.status.upper():4}  {c.name:<{width}}  {c.detail}" for c in self.checks)


# ------------------------------------------------------------------------------------------- detections

def ytdlp_release(version: str) -> date | None:
    """yt-dlp versions are release dates: 2026.10.26 (a nightly has a fourth part)."""
    try:
        y, m, d = (int(p) for p in version.split(".")[:3])
        return date(y, m, d)
    except ValueError:
        return None


def js_runtime_info(cfg: DownloadConfig):
    """yt-dlp's JsRuntimeInfo (name, path, version, supported) for the configured runtime, or None when it
    cannot be run: found by the YoutubeDL the download stage configures, exactly as a download finds it."""
    import yt_dlp

    name, _ = cfg.js_runtime_name_path()
    opts = {"quiet": True, "no_warnings": True, "logger": _Silent(), **cfg.ytdlp_options()}
    with yt_dlp.YoutubeDL(opts) as ydl:
        runtime = ydl._js_runtimes.get(name)
        return runtime.info if runtime is not None else None


def ejs_version() -> str | None:
    from yt_dlp.dependencies import yt_dlp_ejs
    return getattr(yt_dlp_ejs, "version", "unknown") if yt_dlp_ejs is not None else None


def ejs_supported_version() -> str:
    from yt_dlp.extractor.youtube.jsc._builtin import vendor
    return vendor.VERSION


def pot_providers() -> list[str]:
    """PO-token providers yt-dlp has registered (bgutil-ytdlp-pot-provider's, ...) after loading its plugins."""
    from yt_dlp.plugins import load_all_plugins
    import yt_dlp.extractor.youtube  # noqa: F401 - registers the built-in providers, if any
    from yt_dlp.extractor.youtube.pot._registry import _pot_providers

    load_all_plugins()
    return sorted(_pot_providers.value)


def download_tool_versions(cfg: DownloadConfig) -> dict:
    """The download stage's tools for the manifest: the JS runtime the build passes to yt-dlp (as yt-dlp found
    it), the EJS scripts and the PO-token providers."""
    info = js_runtime_info(cfg)
    return {"js-runtime": f"{info.name} {info.version}" if info else f"{cfg.js_runtime} (not found)",
            "yt-dlp-ejs": ejs_version() or "not-installed",
            "po-token-providers": ", ".join(pot_providers()) or "none"}


def cookie_summary(path: Path) -> tuple[int, int, float | None]:
    """(youtube.com cookies, of which unexpired, earliest expiry of those) from a Netscape cookies file, parsed
    by yt-dlp's cookie jar; raises ValueError when it is not one. Values are never read out."""
    from yt_dlp.cookies import YoutubeDLCookieJar

    jar = YoutubeDLCookieJar(str(path))
    try:
        jar.load(ignore_discard=True, ignore_expires=True)
    except Exception as e:  # noqa: BLE001 - http.cookiejar.LoadError, OSError, ...: all mean "not usable"
        raise ValueError(f"{path} is not a Netscape cookies file: {e}") from e
    now = time.time()
    yt = [c for c in jar if c.domain.lstrip(".").endswith("youtube.com")]
    live = [c for c in yt if c.expires is None or c.expires > now]
    expiries = [c.expires for c in live if c.expires is not None]
    return len(yt), len(live), min(expiries) if expiries else None


def _tool_version(binary: str) -> str | None:
    if shutil.which(binary) is None:
        return None
    try:
        return ffmpeg_version(binary)   # "X version V ..." is the first line of ffprobe too
    except RuntimeError:
        return None


class _Silent:
    def debug(self, msg: str) -> None:
        pass

    info = warning = error = debug


# ------------------------------------------------------------------------------------------- the checks

def run_checks(cfg: DownloadConfig, out: Path | None = None, today: date | None = None) -> DoctorReport:
    import yt_dlp.version

    report = DoctorReport()
    youtube = is_youtube_template(cfg.url_template)

    version = yt_dlp.version.__version__
    released = ytdlp_release(version)
    age = (today or date.today()) - released if released else None
    if age is not None and age.days > MAX_YTDLP_AGE_DAYS:
        report.add("yt-dlp", WARN, f"{version}, released {released} ({age.days} days ago; YouTube changes faster "
                                   f"than that: pip install -U yt-dlp alone, see README)")
    else:
        report.add("yt-dlp", OK, f"{version}" + (f", released {released}" if released else ""))

    no_js = FAIL if youtube and not cfg.allow_no_js else WARN
    info = js_runtime_info(cfg)
    if info is None:
        report.add("js-runtime", no_js, f"{cfg.js_runtime} not found or not runnable; {JS_INSTALL_HINT}")
    elif not info.supported:
        report.add("js-runtime", no_js, f"{info.name} {info.version} at {info.path} is older than yt-dlp supports; "
                                        f"{JS_INSTALL_HINT}")
    else:
        report.add("js-runtime", OK, f"{info.name} {info.version} ({info.path})")

    ejs, want = ejs_version(), ejs_supported_version()
    if ejs is None:
        report.add("ejs", no_js, f"yt-dlp-ejs not installed (yt-dlp {version} wants {want}); {JS_INSTALL_HINT}")
    elif ejs.split(".")[:2] != want.split(".")[:2]:
        report.add("ejs", no_js, f"yt-dlp-ejs {ejs}, but yt-dlp {version} wants {want}: pip install "
                                 f"'yt-dlp-ejs=={want}'")
    else:
        report.add("ejs", OK, f"yt-dlp-ejs {ejs}")

    providers = pot_providers()
    report.add("po-token", OK, ", ".join(providers) if providers else
               "no provider plugin (optional: pip install -e '.[pot]', README: PO tokens)")

    for tool in ("ffmpeg", "ffprobe"):
        v = _tool_version(tool)
        report.add(tool, OK if v else FAIL, v or "not found on PATH: install ffmpeg")

    if cfg.cookies is None:
        report.add("cookies", OK, "none (guest session" + (", paced to a guest's limit)" if youtube else ")"))
    else:
        try:
            total, live, first_expiry = cookie_summary(cfg.cookies)
        except ValueError as e:
            report.add("cookies", FAIL, str(e))
        else:
            detail = f"{cfg.cookies}: {live} of {total} youtube.com cookies unexpired"
            if first_expiry is not None:
                detail += f", first expiry {date.fromtimestamp(first_expiry)}"
            report.add("cookies", OK if live else (FAIL if youtube else WARN),
                       detail + ("" if live else ": export them again from a logged-in browser"))

    if cfg.proxy:
        report.add("proxy", OK, redact(cfg.proxy))

    if out is not None:
        where = Path(out)
        while not where.exists() and where != where.parent:
            where = where.parent
        free = shutil.disk_usage(where).free
        report.add("disk", WARN if free < LOW_FREE_BYTES else OK, f"{free / 2**30:.1f} GiB free under {out}")

    pace = f"{cfg.max_per_hour:g} downloads/hour" if cfg.max_per_hour else "no per-hour cap"
    report.add("pacing", OK, pace + (f", rate limit: {cfg.on_rate_limit}"))
    return report
