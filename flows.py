"""Command line of the data side: `python flows.py build ...` runs the pipeline as a Prefect flow.

Prefect starts its own temporary local server when no PREFECT_API_URL is set: nothing to set up. Each stage of
`pipeline.build` is one Prefect task (so the UI and logs show progress per stage); the work inside a stage is
parallel on its own terms: download threads (`--download-workers`) and CPU processes (`--cpu-workers`). Tasks
have no Prefect retries: the download backoff is the only retry layer.

Exit status: 0 when the build finished (per-clip failures included), 1 when it could not run (unreadable CSV,
no ffmpeg, bad arguments), 3 on a bot wall, 4 when more than --max-failure-rate of the clips failed.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

EXIT_OK, EXIT_ERROR, EXIT_BOT_WALL, EXIT_FAILURE_RATE = 0, 1, 3, 4


def build_flow(cfg):
    """The build as a Prefect flow run; returns pipeline.build.BuildResult."""
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE

    from pipeline.build import run_build

    def as_task(name, fn, *args, **kwargs):
        # NO_CACHE: stage inputs hold configs and paths, and a stage must run every time (the ledger decides
        # what is left to do). retries=0: backoff lives in pipeline.download only.
        return task(fn, name=name, retries=0, cache_policy=NO_CACHE, log_prints=True)(*args, **kwargs)

    # The config reaches the flow through the closure, not as a parameter: Prefect stores flow parameters in its
    # database, and the config may hold proxy credentials.
    @flow(name="avcap-build", flow_run_name=f"build-{cfg.split}", log_prints=True)
    def avcap_build():
        return run_build(cfg, stage_runner=as_task)

    return avcap_build()


def _add_build_args(p: argparse.ArgumentParser) -> None:
    from pipeline.download import DEFAULT_URL_TEMPLATE

    p.add_argument("--csv", required=True, action="append", type=Path,
                   help="AudioCaps CSV or AVCap JSON (repeat to merge several files into the split)")
    p.add_argument("--split", required=True, help="split name: train, val, test, ... (names files)")
    p.add_argument("--out", required=True, type=Path, help="output directory (shards, ledger, manifest)")
    p.add_argument("--url-template", default=DEFAULT_URL_TEMPLATE,
                   help="URL with {youtube_id}; default: the YouTube watch URL")
    p.add_argument("--media-dir", type=Path,
                   help="build from media on disk ({youtube_id}_{start_time}.* clips or {youtube_id}.* videos), "
                        "no downloads")
    p.add_argument("--limit", type=int, help="only the first N clips of the CSV")
    p.add_argument("--download-workers", type=int, default=4)
    p.add_argument("--cpu-workers", type=int, default=max(1, os.cpu_count() or 1),
                   help="processes for extraction + fbank (default: one per core)")
    p.add_argument("--samples-per-shard", type=int, default=256,
                   help="sets the shard count at the split's first build; later builds keep it")
    p.add_argument("--frames", type=int, default=20, help="video frames per clip")
    p.add_argument("--cookies", type=Path, help="Netscape cookies file for yt-dlp")
    p.add_argument("--proxy", help="proxy URL for yt-dlp (credentials are redacted in the manifest)")
    p.add_argument("--sleep", type=float, default=0.0, help="seconds between two download requests")
    p.add_argument("--clip-timeout", type=float, default=300.0, help="time limit per download attempt, seconds")
    p.add_argument("--max-retries", type=int, default=3, help="retries of a transient download failure")
    p.add_argument("--backoff", type=float, default=2.0, help="first backoff delay, seconds (doubles per retry)")
    p.add_argument("--retry-permanent", action="store_true",
                   help="also retry clips that failed permanently (removed, private, ...) in an earlier run")
    p.add_argument("--max-failure-rate", type=float, default=0.5,
                   help="exit non-zero when more than this fraction of the clips failed")
    p.add_argument("--no-prefect", action="store_true", help="run the stages directly, without a Prefect flow")


def config_from_args(a: argparse.Namespace):
    from pipeline.build import BuildConfig
    from pipeline.download import DownloadConfig
    from pipeline.extract import ExtractConfig

    download = DownloadConfig(url_template=a.url_template, cookies=a.cookies, proxy=a.proxy, sleep_s=a.sleep,
                              workers=a.download_workers, timeout_s=a.clip_timeout, max_retries=a.max_retries,
                              backoff_base_s=a.backoff)
    return BuildConfig(csv=a.csv, split=a.split, out=a.out, media_dir=a.media_dir, limit=a.limit,
                       cpu_workers=a.cpu_workers, samples_per_shard=a.samples_per_shard,
                       retry_permanent=a.retry_permanent, max_failure_rate=a.max_failure_rate,
                       download=download, extract=ExtractConfig(frames=a.frames))


def cmd_build(a: argparse.Namespace) -> int:
    from pipeline.build import BuildError, run_build

    try:
        cfg = config_from_args(a)
        result = run_build(cfg) if a.no_prefect else build_flow(cfg)
    except (BuildError, ValueError) as e:
        print(f"build failed: {e}", file=sys.stderr)
        return EXIT_ERROR
    c = result.counts
    print(f"{result.split}: {c['ok']} ok, {c['failed-permanent']} failed permanently, {c['failed-transient']} "
          f"failed transiently, {c['pending']} pending of {result.total} clips; {len(result.shards)} shards; "
          f"manifest {result.manifest_path}", file=sys.stderr)
    if result.row_errors:
        print(f"{len(result.row_errors)} bad rows skipped, first: {result.row_errors[0]}", file=sys.stderr)
    if result.bot_wall:
        print(f"build stopped at a bot wall: {result.bot_wall}", file=sys.stderr)
        return EXIT_BOT_WALL
    if result.too_many_failures:
        print(f"build failed: {100 * result.failure_rate:.1f}% of the clips failed, more than --max-failure-rate "
              f"{a.max_failure_rate:g} (a wrong --url-template or a blocked network?); see {result.manifest_path} "
              "for the reasons", file=sys.stderr)
        return EXIT_FAILURE_RATE
    return EXIT_OK


def _prefect_defaults() -> None:
    """Settings for Prefect's temporary server, unless the user set them. Read when prefect is imported."""
    # The first start in a fresh PREFECT_HOME migrates a database; on a busy machine that takes longer than
    # Prefect's default 20 s wait, and the build would die before its first stage.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    # The server would try to phone home on every start; builds often run offline.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def main(argv: list[str] | None = None) -> int:
    _prefect_defaults()
    parser = argparse.ArgumentParser(prog="flows.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="AudioCaps CSV -> WebDataset shards + manifest + ledger")
    _add_build_args(build)
    build.set_defaults(func=cmd_build)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Prefect API call drowns the progress
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
