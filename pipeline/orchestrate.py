"""Command line and Prefect flows of the data side (`flows.py` is the thin entry point over this module).

    python flows.py build --split train --out DIR [--csv train.csv] [--dask-address tcp://host:8786]
                          [--publish URL [--prune]]
    python flows.py audit --out DIR [--sample N] [--seed S]
    python flows.py serve --out DIR --split train [--csv train.csv] [--cron "0 3 * * *"]
    python flows.py publish --out DIR --publish URL [--prune]
    python flows.py doctor [--url-template T] [--cookies F] [--proxy P] [--out DIR] [--js-runtime NAME[:PATH]]
    python flows.py gallery --out DIR [--split S] [--results RESULTS.json] [--sample N] [--seed K]

`build_flow` is THE build: a module-level Prefect flow with plain JSON parameters, run by `flows.py build` and
by the scheduled `rebuild` deployment alike (a rebuild is the same build on the same DIR: the ledger and the
fixed shard count make it incremental). Each stage of `pipeline.build` is a Prefect task with its own retries
and time limit (STAGE_TASKS); parallelism inside a stage has its own limits: download threads
(`--download-workers`, so downloads are throttled apart from CPU work) and CPU processes (`--cpu-workers`), or
chunks of clips on a Dask cluster (`--dask-address`, pipeline.dask_runner). Downloads get no Prefect retries: their backoff
lives in pipeline.download, and a second layer would multiply it.

Secrets are never flow parameters (Prefect stores parameters in its database and shows them in the UI): the
proxy URL comes from the environment variable AVCAP_PROXY or from a Prefect Secret block named by
`proxy_secret`; `--proxy` sets AVCAP_PROXY for this process.

Prefect starts its own temporary local server when no PREFECT_API_URL is set: nothing to set up.

Exit status of `build`: 0 when the build finished (per-clip failures included), 1 when it could not run
(unreadable CSV, no ffmpeg, bad arguments, no space left on device, a read-only --out, another build of the
split running, a failed preflight such as no JS runtime for YouTube), 3 on a bot wall (or a run of no-formats
failures), 4 when more than --max-failure-rate of the clips failed, 5 when the build finished but publishing
failed, 6 when the site rate-limited the session (the clips not done stay pending: run again later), 128 + the
signal's number when Ctrl-C or SIGTERM stopped it (130, 143; a rerun continues). `audit`: 0 clean, 1 mismatch,
2 could not run. `doctor`: 0 a build can start, 1 it would stop.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


def _prefect_defaults() -> None:
    """Settings for Prefect's temporary server, unless the user set them. Read when prefect is imported."""
    # The first start in a fresh PREFECT_HOME migrates a database; on a busy machine that takes longer than
    # Prefect's default 20 s wait, and the build would die before its first stage.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    # The server would try to phone home on every start; builds often run offline.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The pipeline's progress lines (logger "avcap.*") also go to the flow run's log in the UI.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "avcap")
    # ... and outside a flow run (--no-prefect) they go to the console only, without a warning per line.
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")


_prefect_defaults()   # before the import below: Prefect reads its settings at import time

from prefect import flow, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from pipeline.audit import add_audit_arguments, audit_flow, audit_main  # noqa: E402
from pipeline.build import BuildError, check_out_writable, holding_build_lock, run_build  # noqa: E402
from pipeline.doctor import run_checks  # noqa: E402
from pipeline.gallery import add_gallery_arguments, build_gallery_artifact, gallery_main  # noqa: E402
from pipeline.params import PROXY_ENV, BuildParams, flow_signature  # noqa: E402
from pipeline.params import add_arguments as add_build_arguments  # noqa: E402
from pipeline.params import from_args as build_params_from_args  # noqa: E402
from pipeline.publish import PublishError, publish  # noqa: E402
from pipeline.publish import main as publish_main  # noqa: E402
from pipeline.report import build_report  # noqa: E402
from pipeline.schedule import add_serve_arguments, make_deployments, serve_config_from_args, serve_deployments  # noqa: E402
from pipeline.status import FAILED_PERMANENT, FAILED_TRANSIENT, OK, PENDING  # noqa: E402

EXIT_OK, EXIT_ERROR, EXIT_BOT_WALL, EXIT_FAILURE_RATE, EXIT_PUBLISH, EXIT_RATE_LIMIT = 0, 1, 3, 4, 5, 6


@dataclass(frozen=True)
class StageTask:
    retries: int = 0
    retry_delay_s: float = 0.0
    timeout_s: float | None = None


# Per stage: retries only where a retry is safe and useful. download: 0 (backoff lives in pipeline.download);
# process: 0 for the stage (a clip failure is an outcome, not an exception; on Dask a chunk whose worker died
# is re-run by Dask and redoes only its unfinished clips, see pipeline.dask_runner);
# captions, shards, manifest and publish are idempotent and atomic per file, so a transient I/O error is worth
# one more try.
# Time limits only where a bound is known: stage length otherwise scales with the clip count.
STAGE_TASKS = {
    "manifest": StageTask(timeout_s=600),
    "ledger": StageTask(timeout_s=600),
    "captions": StageTask(retries=1, retry_delay_s=5),
    "download": StageTask(),
    "process": StageTask(),
    "shards": StageTask(retries=1, retry_delay_s=5),
    "dataset-manifest": StageTask(retries=1, retry_delay_s=5, timeout_s=600),
    "publish": StageTask(retries=2, retry_delay_s=10),
    "report": StageTask(timeout_s=1800),
}


class BuildFailed(RuntimeError):
    """The build ran but must not count as done (bot wall, too many failures): the flow run is marked failed.
    `result` is the pipeline.build.BuildResult."""

    def __init__(self, message: str, result):
        super().__init__(message)
        self.result = result


def _stage_task(name: str, fn, *args, **kwargs):
    opts = STAGE_TASKS.get(name, StageTask())
    # NO_CACHE: stage inputs hold configs and paths, and a stage must run every time (the ledger decides what
    # is left to do).
    return task(fn, name=name, retries=opts.retries, retry_delay_seconds=opts.retry_delay_s,
                timeout_seconds=opts.timeout_s, cache_policy=NO_CACHE, log_prints=True)(*args, **kwargs)


def _proxy(proxy_secret: str | None) -> str | None:
    if proxy_secret:
        from prefect.blocks.system import Secret
        return Secret.load(proxy_secret).get()
    return os.environ.get(PROXY_ENV) or None


def failure_message(result) -> str:
    if result.bot_wall:
        return f"build stopped at a bot wall: {result.bot_wall}"
    if result.rate_limit:
        return f"build stopped at a rate limit: {result.rate_limit}"
    return (f"{100 * result.failure_rate:.1f}% of the clips failed, more than the max failure rate "
            f"(a wrong url template or a blocked network?); see {result.manifest_path} for the reasons")


def build_flow(**parameters):
    """Build (or incrementally rebuild) one split into out_dir; then the build report and artifacts, then
    publish to publish_url. Parameters: the fields of pipeline.params.BuildParams. Returns
    pipeline.build.BuildResult. Raises BuildFailed (the run fails) on a bot wall or too many failures, after the
    report, and without publishing."""
    p = BuildParams(**parameters)
    cfg = p.to_build_config(proxy=_proxy(p.proxy_secret))
    check_out_writable(cfg.out)
    # The lock covers the report and publishing too: a second build must not rewrite shards being published.
    with holding_build_lock(cfg):
        result = run_build(cfg, stage_runner=_stage_task, clip_runner=p.clip_runner())
        if p.report:
            _stage_task("report", build_report, result, True)
            _stage_task("gallery", build_gallery_artifact, p.out_dir, p.split)
        if not result.ok:
            raise BuildFailed(failure_message(result), result)
        if p.publish_url:
            result.publish = _stage_task("publish", publish, p.out_dir, p.publish_url, prune=p.prune)
    return result


# The flow's parameters are BuildParams' fields: Prefect reads them from the signature (UI form, validation).
build_flow.__signature__ = flow_signature()
build_flow = flow(name="avcap-build", flow_run_name="build-{split}", log_prints=True)(build_flow)


# ------------------------------------------------------------------------------------------------ CLI

def _add_build_args(p: argparse.ArgumentParser) -> None:
    add_build_arguments(p)
    # Not build parameters: the proxy is a secret (never a flow parameter), --no-prefect picks the runner.
    p.add_argument("--proxy", help=f"proxy URL for yt-dlp (or set {PROXY_ENV}); never stored by Prefect, "
                                   "redacted in the manifest")
    p.add_argument("--no-prefect", action="store_true",
                   help="run the stages directly, without a Prefect flow (no artifacts)")


@contextmanager
def _env(name: str, value: str | None):
    """`name` set to `value` for the block (unchanged when value is None)."""
    before = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if value is not None:
            if before is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = before


def _run_direct(p: BuildParams, proxy: str | None):
    """--no-prefect: the same build, stages called directly; report files and publishing as in the flow."""
    cfg = p.to_build_config(proxy=proxy)
    check_out_writable(cfg.out)
    with holding_build_lock(cfg):
        result = run_build(cfg, clip_runner=p.clip_runner())
        if p.report:
            build_report(result, artifacts=False)
            build_gallery_artifact(p.out_dir, p.split, artifacts=False)
        if not result.ok:
            raise BuildFailed(failure_message(result), result)
        if p.publish_url:
            result.publish = publish(p.out_dir, p.publish_url, prune=p.prune)
    return result


class BuildInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: unwinds the build like a KeyboardInterrupt (libraries clean up as for one)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def _stoppable():
    """Ctrl-C (SIGINT) and SIGTERM stop a build within seconds: the first unwinds it (the download stage kills
    its yt-dlp process groups, the CPU stage drops the clips not started, Prefect marks the run crashed and
    its temporary server is stopped at exit), the second ends the process at once, its child processes with
    it. Work already recorded stays: a rerun continues. (During a flow run Prefect replaces the SIGTERM
    handler with its own, which raises TerminationSignal the same way.)"""
    count = [0]

    def handler(signum, frame):
        count[0] += 1
        if count[0] > 1:
            _end_now(signum)
        raise BuildInterrupted(signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def _end_now(signum: int) -> None:
    """The second interrupt: kill every process this one started (downloads in their own sessions, CPU
    workers, Prefect's temporary server) and exit without waiting for anything."""
    import psutil
    os.write(2, f"build stopped by a second {signal.Signals(signum).name}: clips in flight are lost, finished "
                "clips are kept; run the same command again to continue\n".encode())
    for child in psutil.Process().children(recursive=True):
        try:
            child.kill()
        except psutil.Error:
            pass
    os._exit(128 + signum)


def _start_temporary_server() -> None:
    """Prefect's temporary server (when no PREFECT_API_URL is set), started here, before the flow, with SIGINT
    blocked so that the server process inherits the block. Ctrl-C in a terminal reaches the whole process
    group: a server that quit on it would leave the build unable to record that it stopped (Prefect retries
    its API for minutes). It stops at exit (Prefect's atexit hook), or is killed with the rest by a second
    Ctrl-C."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        SubprocessASGIServer().start()   # the instance Prefect's client uses (one per process)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def cmd_build(a: argparse.Namespace) -> int:
    with _stoppable():
        return _cmd_build(a)


def _cmd_build(a: argparse.Namespace) -> int:
    from prefect.exceptions import TerminationSignal


    proxy = a.proxy or os.environ.get(PROXY_ENV)
    try:
        params = build_params_from_args(a)
        # Bad arguments (a split without a bundled CSV, a missing --media-dir) and a read-only --out fail here,
        # before Prefect starts and before anything is written.
        params.to_build_config()
        check_out_writable(Path(params.out_dir))
        if a.no_prefect:
            result = _run_direct(params, proxy)
        else:
            _start_temporary_server()
            # The proxy reaches the flow through this process's environment, never as a parameter.
            with _env(PROXY_ENV, a.proxy):
                result = build_flow(**params.as_dict())
    except BuildFailed as e:
        result = e.result
        _print_summary(result)
        print(f"build failed: {e}", file=sys.stderr)
        return (EXIT_BOT_WALL if result.bot_wall else EXIT_RATE_LIMIT if result.rate_limit
                else EXIT_FAILURE_RATE)
    except PublishError as e:
        print(f"build finished but publishing failed: {e}", file=sys.stderr)
        return EXIT_PUBLISH
    except (BuildError, ValueError) as e:
        print(f"build failed: {e}", file=sys.stderr)
        return EXIT_ERROR
    except (KeyboardInterrupt, TerminationSignal) as e:
        signum = getattr(e, "signum", None) or getattr(e, "signal", None) or signal.SIGINT
        print(f"build interrupted by {signal.Signals(signum).name}: finished clips are kept; run the same "
              "command again to continue", file=sys.stderr)
        return 128 + signum
    _print_summary(result)
    if getattr(result, "publish", None) is not None:
        p = result.publish
        print(f"published to {p.url}: {len(p.uploaded)} files uploaded, {len(p.skipped)} already there, "
              f"manifest {'uploaded' if p.manifest_uploaded else 'unchanged'}"
              + (f", {len(p.pruned)} stale files pruned" if p.pruned else ""), file=sys.stderr)
    return EXIT_OK


def _print_summary(result) -> None:
    c = result.counts
    print(f"{result.split}: {c[OK]} ok, {c[FAILED_PERMANENT]} failed permanently, {c[FAILED_TRANSIENT]} "
          f"failed transiently, {c[PENDING]} pending of {result.total} clips; {len(result.shards)} shards; "
          f"manifest {result.manifest_path}", file=sys.stderr)
    ch = result.changes
    print(f"changes: {len(ch['added'])} samples added, {len(ch['removed'])} removed, {len(ch['updated'])} given "
          f"new captions, {len(ch['retried'])} clips retried, {len(ch['dropped_rows'])} rows gone from the CSV; "
          f"{len(ch['shards_written'])} shards written", file=sys.stderr)
    if result.row_errors:
        print(f"{len(result.row_errors)} bad rows skipped, first: {result.row_errors[0]}", file=sys.stderr)


def cmd_publish(a: argparse.Namespace) -> int:
    return publish_main(["--out", str(a.out), "--publish", a.publish] + (["--prune"] if a.prune else []))


def cmd_serve(a: argparse.Namespace) -> int:
    serve_deployments(make_deployments(build_flow, audit_flow, serve_config_from_args(a)), limit=a.concurrent_runs)
    return EXIT_OK


# ------------------------------------------------------------------------------------------- doctor CLI

DOCTOR_PARAMS = ("url_template", "cookies", "js_runtime", "allow_no_js", "max_per_hour", "on_rate_limit",
                 "extractor_args")


def add_doctor_arguments(parser: argparse.ArgumentParser) -> None:
    add_build_arguments(parser, only=DOCTOR_PARAMS, required=False)
    parser.add_argument("--out", dest="out_dir", help="the build directory: free disk is checked under it")
    parser.add_argument("--proxy", help="proxy URL the build would use (shown redacted)")


def doctor_main(a: argparse.Namespace) -> int:
    try:
        params = build_params_from_args(a, split="doctor", out_dir=a.out_dir or ".")
        cfg = params.download_config(a.proxy)
    except ValueError as e:
        print(f"doctor: {e}", file=sys.stderr)
        return 1
    report = run_checks(cfg, Path(a.out_dir) if a.out_dir else None)
    print(report.text())
    if report.failed:
        print(f"\n{len(report.failed)} check(s) failed: a build would stop before its first download.",
              file=sys.stderr)
        return 1
    print("\na build can start.")
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flows.py", description="\n\n".join(__doc__.split("\n\n")[:2]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="AudioCaps CSV -> WebDataset shards + manifest + ledger (incremental)",
                           description="Build or incrementally rebuild one split into --out. Exit 0 ok, 1 could "
                                       "not run, 3 bot wall, 4 too many failures, 5 publishing failed, 6 "
                                       "rate-limited (run again later).")
    _add_build_args(build)
    build.set_defaults(func=cmd_build)
    audit = sub.add_parser("audit", help="verify a build against its manifest (shards, fbank, frames, tools)",
                           description="Reproducibility audit of --out: shard sha256/counts, fbank recomputed "
                                       "and clips re-extracted for --sample clips, tool versions. Writes "
                                       "DIR/audit/audit-*.json. Exit 0 clean, 1 mismatch, 2 could not run.")
    add_audit_arguments(audit)
    audit.set_defaults(func=audit_main)
    serve = sub.add_parser("serve", help="serve the scheduled rebuild and audit deployments (blocks)",
                           description="Register the 'avcap-build/rebuild' and 'avcap-audit/audit' deployments "
                                       "with their cron schedules and run their flow runs from this process "
                                       "until interrupted. Set PREFECT_API_URL to use a Prefect server.")
    add_serve_arguments(serve)
    serve.set_defaults(func=cmd_serve)
    pub = sub.add_parser("publish", help="copy a finished build (shards, then manifest.json) to a URL",
                         description="Publish --out to an fsspec URL: shards first, manifest.json last.")
    pub.add_argument("--out", required=True, type=Path, help="build directory holding manifest.json")
    pub.add_argument("--publish", required=True, metavar="URL", help="destination: a path or fsspec URL")
    pub.add_argument("--prune", action="store_true", help="delete destination shards the manifest no longer lists")
    pub.set_defaults(func=cmd_publish)
    doctor = sub.add_parser("doctor", help="preflight of a download build: yt-dlp, JS runtime, EJS, PO tokens, "
                                           "ffmpeg, cookies, disk",
                            description="Check that a download build can start here (no request is made). Exit 0 "
                                        "a build can start, 1 a check would stop it.")
    add_doctor_arguments(doctor)
    doctor.set_defaults(func=doctor_main)
    gallery = sub.add_parser("gallery", help="an HTML page of a split's clips, failures and generated captions",
                             description="Write DIR/reports/gallery-SPLIT.html (+ its files in "
                                         "DIR/reports/gallery-SPLIT/): sampled clips with frames, audio, "
                                         "spectrogram and captions; with --results, generated captions and "
                                         "per-clip CIDEr-D. Exit 0 written, 1 could not.")
    add_gallery_arguments(gallery)
    gallery.set_defaults(func=gallery_main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    # Importing prefect already gave the root logger its console handler (at PREFECT_LOGGING_LEVEL, often
    # WARNING): the pipeline's progress is INFO and must show whatever that level is.
    logging.getLogger("avcap").setLevel(logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Prefect API call drowns the progress
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
