"""The parameters of a build, declared once.

`BuildParams` is the one list of what a user can set for a build. Everything else is generated from its fields:
the flags of `flows.py build` and `flows.py serve` (`add_arguments`), the parameters of the Prefect flow
`pipeline.orchestrate.build_flow` (`flow_signature`: Prefect reads the flow's signature for its UI form and validation), the
parameters of the served `rebuild` deployment (`deployment_parameters`), and the stage configs of
`pipeline.build` (`to_build_config`). Adding a build setting is one field here plus the code that uses it.

Every value is plain JSON (str, int, float, bool, list[str], None): Prefect stores flow parameters in its
database and shows them in its UI, so no secret is ever one. The proxy URL reaches a build through the
environment variable AVCAP_PROXY or a Prefect Secret block named by `proxy_secret`.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.build import BuildConfig
from pipeline.dask_runner import DaskClipRunner, validate_address
from pipeline.download import DEFAULT_URL_TEMPLATE, DownloadConfig, default_max_per_hour
from pipeline.extract import ExtractConfig

# The AudioCaps CSVs ship with the project (data/audiocaps/{train,val,test}.csv): `--split S` alone builds them.
BUNDLED_CSV_DIR = Path(__file__).resolve().parent.parent / "data" / "audiocaps"
PROXY_ENV = "AVCAP_PROXY"


def _param(help: str, *, flag: str | None = None, path: bool = False, cli: bool = True,
           required: bool = False, metavar: str | None = None, choices: tuple[str, ...] | None = None) -> dict:
    """Field metadata: the flag's help text; `flag` when it is not `--field-name`; `path` for values the served
    deployment must hold as absolute paths (its runs may start in another directory); `cli=False` for
    parameters only the flow takes; `choices` for a closed set of values."""
    return {"help": help, "flag": flag, "path": path, "cli": cli, "required": required, "metavar": metavar,
            "choices": choices}


@dataclass(frozen=True)
class BuildParams:
    split: str = field(metadata=_param("split name: train, val, test, ... (names files)", required=True))
    out_dir: str = field(metadata=_param("output directory (shards, ledger, manifest)", flag="--out",
                                         path=True, required=True))
    csv: list[str] | None = field(default=None, metadata=_param(
        "AudioCaps CSV or AVCap JSON (repeat to merge several files into the split); default: the bundled "
        "data/audiocaps/SPLIT.csv", path=True))
    media_dir: str | None = field(default=None, metadata=_param(
        "build from media on disk ({youtube_id}_{start_time}.* clips or {youtube_id}.* videos), no downloads",
        path=True))
    url_template: str | None = field(default=None, metadata=_param(
        "URL with {youtube_id}; default: the YouTube watch URL"))
    limit: int | None = field(default=None, metadata=_param("only the first N clips of the CSV"))
    download_workers: int = field(default=4, metadata=_param("concurrent downloads"))
    cpu_workers: int | None = field(default=None, metadata=_param(
        "processes for extraction + fbank on this machine (default: one per core)"))
    samples_per_shard: int = field(default=256, metadata=_param(
        "sets the shard count at the split's first build; later builds keep it"))
    frames: int = field(default=20, metadata=_param("video frames per clip"))
    cookies: str | None = field(default=None, metadata=_param("Netscape cookies file for yt-dlp", path=True))
    sleep_s: float = field(default=0.0, metadata=_param("seconds between two download requests", flag="--sleep"))
    clip_timeout_s: float = field(default=300.0, metadata=_param("time limit per download attempt, seconds",
                                                                 flag="--clip-timeout"))
    max_retries: int = field(default=3, metadata=_param("retries of a transient download failure"))
    backoff_s: float = field(default=2.0, metadata=_param("first backoff delay, seconds (doubles per retry)",
                                                          flag="--backoff"))
    retry_permanent: bool = field(default=False, metadata=_param(
        "also retry clips that failed permanently (removed, private, ...) in an earlier run"))
    retry_reason: list[str] | None = field(default=None, metadata=_param(
        "also retry the failed clips whose recorded reason is one of these (e.g. login-required after adding "
        "--cookies; repeatable)", metavar="REASON[,REASON]"))
    js_runtime: str = field(default="deno", metadata=_param(
        "JavaScript runtime yt-dlp solves YouTube's challenges with: deno (installed with yt-dlp), node, quickjs "
        "or bun, optionally NAME:PATH", metavar="NAME[:PATH]"))
    allow_no_js: bool = field(default=False, metadata=_param(
        "start a YouTube build even without a usable JavaScript runtime (most clips then fail with no-formats)"))
    max_per_hour: float | None = field(default=None, metadata=_param(
        "download attempts per hour over all workers; default for YouTube 250 without --cookies, 1000 with "
        "(under its guest and account limits), none for other URL templates; 0: no cap", metavar="N"))
    on_rate_limit: str = field(default="stop", metadata=_param(
        "when the site rate-limits the session: stop the build (exit 6, clips stay pending) or wait "
        "--rate-limit-pause seconds and go on", choices=("stop", "wait")))
    rate_limit_pause_s: float = field(default=3600.0, metadata=_param(
        "with --on-rate-limit wait: seconds all downloads pause", flag="--rate-limit-pause"))
    cache_dir: str | None = field(default=None, metadata=_param(
        "yt-dlp's cache shared by all downloads (player JS, solved challenges); default DIR/.cache/yt-dlp",
        path=True))
    extractor_args: list[str] | None = field(default=None, metadata=_param(
        "passed to yt-dlp's --extractor-args (e.g. youtube:player_client=web; repeatable); recorded in the "
        "manifest with tokens redacted", metavar="IE_KEY:ARGS"))
    max_failure_rate: float = field(default=0.5, metadata=_param(
        "exit non-zero when more than this fraction of the clips failed"))
    dask_address: str | None = field(default=None, metadata=_param(
        "run extraction + fbank on the Dask scheduler at URL (e.g. tcp://host:8786) instead of local "
        "processes; every worker needs this code and DIR on a shared filesystem", metavar="URL"))
    dask_chunk: int = field(default=64, metadata=_param(
        "with --dask-address: at most this many clips per Dask task (orchestration costs per chunk)"))
    publish_url: str | None = field(default=None, metadata=_param(
        "after a successful build, copy shards then manifest.json to URL (any fsspec URL or path)",
        flag="--publish", metavar="URL"))
    prune: bool = field(default=False, metadata=_param(
        "with --publish: delete shards at URL that the new manifest no longer lists"))
    report: bool = field(default=True, metadata=_param("skip DIR/reports/build-<split>.md and its plots",
                                                       flag="--no-report"))
    strict_decode: bool = field(default=False, metadata=_param(
        "fail a clip whose decode reported any error (default: keep it when its audio and frames are complete, "
        "with ffmpeg's errors recorded)"))
    wait_lock: bool = field(default=False, metadata=_param(
        "when another build of this split into --out is running, wait for it instead of exiting at once"))
    proxy_secret: str | None = field(default=None, metadata=_param(
        "name of a Prefect Secret block holding the proxy URL", cli=False))

    def __post_init__(self) -> None:
        if self.prune and not self.publish_url:
            raise ValueError("--prune needs --publish URL")
        if self.dask_chunk < 1:
            raise ValueError(f"--dask-chunk must be >= 1, got {self.dask_chunk}")
        if self.dask_address:
            validate_address(self.dask_address)

    # ------------------------------------------------------------------ derived values

    def csv_paths(self) -> list[Path]:
        """The CSVs of this build: those given, else the bundled AudioCaps file of the split."""
        if self.csv:
            return [Path(c) for c in self.csv]
        bundled = BUNDLED_CSV_DIR / f"{self.split}.csv"
        if not bundled.is_file():
            shipped = ", ".join(sorted(p.stem for p in BUNDLED_CSV_DIR.glob("*.csv"))) or "none"
            raise ValueError(f"no --csv given and split {self.split!r} has no bundled CSV ({bundled.name}; "
                             f"bundled splits: {shipped}); pass --csv FILE")
        return [bundled]

    def to_build_config(self, proxy: str | None = None):
        """pipeline.build.BuildConfig of these parameters (and the proxy, which is never a parameter)."""
        return BuildConfig(csv=self.csv_paths(), split=self.split, out=Path(self.out_dir),
                           media_dir=Path(self.media_dir) if self.media_dir else None, limit=self.limit,
                           cpu_workers=self.cpu_workers or max(1, os.cpu_count() or 1),
                           samples_per_shard=self.samples_per_shard, retry_permanent=self.retry_permanent,
                           retry_reasons=self.retry_reasons(), max_failure_rate=self.max_failure_rate,
                           wait_lock=self.wait_lock, download=self.download_config(proxy),
                           extract=ExtractConfig(frames=self.frames, strict_decode=self.strict_decode))

    def download_config(self, proxy: str | None = None):
        """pipeline.download.DownloadConfig of these parameters (the build's, and what `flows.py doctor` checks)."""
        template = self.url_template or DEFAULT_URL_TEMPLATE
        return DownloadConfig(url_template=template, cookies=Path(self.cookies) if self.cookies else None,
                              proxy=proxy, sleep_s=self.sleep_s, workers=self.download_workers,
                              timeout_s=self.clip_timeout_s, max_retries=self.max_retries,
                              backoff_base_s=self.backoff_s, js_runtime=self.js_runtime,
                              allow_no_js=self.allow_no_js,
                              cache_dir=Path(self.cache_dir) if self.cache_dir
                              else Path(self.out_dir) / ".cache" / "yt-dlp",
                              max_per_hour=default_max_per_hour(template, self.cookies)
                              if self.max_per_hour is None else (self.max_per_hour or None),
                              on_rate_limit=self.on_rate_limit, rate_limit_pause_s=self.rate_limit_pause_s,
                              extractor_args=tuple(self.extractor_args or ()))

    def retry_reasons(self) -> list[str]:
        """--retry-reason values, commas and repeats alike."""
        return [r.strip() for v in self.retry_reason or () for r in v.split(",") if r.strip()]

    def clip_runner(self):
        """Where the process stage runs its clips: the Dask cluster at dask_address, else None (local pool)."""
        if not self.dask_address:
            return None
        return DaskClipRunner(self.dask_address, self.out_dir, chunk_size=self.dask_chunk)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


FIELDS = {f.name: f for f in dataclasses.fields(BuildParams)}
_HINTS = typing.get_type_hints(BuildParams)


def _flag(f: dataclasses.Field) -> str:
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = (),
                  only: tuple[str, ...] | None = None, required: bool = True) -> None:
    """One flag per BuildParams field (the CLI of `flows.py build`, and of `serve` for its rebuilds); `only`
    some of them (`flows.py doctor`), `required=False` to make none of them required."""
    for name, f in FIELDS.items():
        if not f.metadata["cli"] or name in exclude or (only is not None and name not in only):
            continue
        hint = _HINTS[name]
        base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
        kw: dict[str, Any] = {"dest": name, "help": f.metadata["help"]}
        if f.metadata["metavar"]:
            kw["metavar"] = f.metadata["metavar"]
        if f.metadata["choices"]:
            kw["choices"] = f.metadata["choices"]
        if base is bool:
            # A True default is switched off by its --no-... flag, a False one on by its flag.
            kw["action"] = "store_false" if f.default else "store_true"
        elif typing.get_origin(base) is list:
            kw["action"] = "append"
        else:
            kw["type"] = base
            if f.metadata["required"] and required:
                kw["required"] = True
            elif f.default is not None:
                kw["default"] = f.default
                kw["help"] += f" (default {f.default})"
        parser.add_argument(_flag(f), **kw)


def from_args(a: argparse.Namespace, **extra: Any) -> BuildParams:
    """BuildParams from parsed `add_arguments` flags; `extra` sets the fields that have no flag."""
    values = {name: getattr(a, name) for name, f in FIELDS.items() if f.metadata["cli"] and hasattr(a, name)}
    return BuildParams(**{**values, **extra})


def flow_signature() -> inspect.Signature:
    """build_flow's signature: one keyword parameter per field, with its type and default (Prefect builds the
    flow's parameter schema, its UI form and its validation from this)."""
    params = []
    for name, f in FIELDS.items():
        default = inspect.Parameter.empty if f.metadata["required"] else f.default
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=_HINTS[name]))
    return inspect.Signature(params)


def deployment_parameters(p: BuildParams) -> dict[str, Any]:
    """The served rebuild's parameters: every field, paths absolute (served runs may start elsewhere). The
    default CSV is resolved now, so the deployment shows which file it rebuilds."""
    d = p.as_dict()
    d["csv"] = [str(c) for c in p.csv_paths()]
    for name, f in FIELDS.items():
        if f.metadata["path"] and d[name] is not None:
            d[name] = [str(Path(v).absolute()) for v in d[name]] if isinstance(d[name], list) \
                else str(Path(d[name]).absolute())
    return d
