"""The build: AudioCaps CSV -> media -> staged samples -> shards + manifest.json, without Prefect.

`run_build(cfg)` chains the stage functions below; each is usable on its own. `pipeline.orchestrate.build_flow` runs the same
stage functions as Prefect tasks by passing a `stage_runner` (so there is one implementation of the build).

Stages and where their state lives (all under `cfg.out`, nothing is written elsewhere):
  load_clips      the CSV/JSON rows -> validated clips (bad rows reported with file and line)
  prepare_ledger  ledger.sqlite: new clips become pending, clips whose row is gone `removed`; the clips this
                  run must do
  caption_stage   finished clips whose captions/audiocap_ids changed in the CSV get the new json (a staged
                  sample is rewritten; a sample in a shard gets staging/{split}/{key}.json, the json alone);
                  audio and frames are kept, nothing is decoded again, so only its shard changes
  download_stage  media/{key}.mp4 (or the user's --media-dir); download failures recorded as they land; the
                  preflight (pipeline.doctor) first, and a bot wall or rate limit stops the stage
  process_stage   staging/{split}/{key}.tar via pipeline.stage.stage_clip (extract + fbank + encode), one
                  clip per CPU worker (a local process pool, or a `clip_runner` such as pipeline.dask_runner);
                  outcomes recorded as they land
  shard_stage     shards/{split}/*.tar from the ok clips, each sample read from its staged tar or from the old
                  shard that holds it (deterministic, only changed shards rewritten)
  manifest_stage  manifest.json entry of the split; once it is durable, the staged copies of the samples now in
                  a shard are deleted (shards.writer.discard_staged): one copy of each sample stays on disk
Every finished clip is recorded before the next one starts, so a killed build loses at most the clips in flight.
An ok clip whose sample has no copy left (no staged tar, and its shard missing or failing its sha256 check) is
made pending again by prepare_ledger, with a warning naming the shard, and made again from its media.

A full disk stops the build with a BuildError ("no space left on device"): clips finished before it are kept
(media, staged samples, ledger rows), clips that hit it are `failed-transient disk-full`, and no shard or
manifest is written from a partial stage. Freeing space and running again completes the build.
"""
from __future__ import annotations

import errno
import logging
import multiprocessing
import shutil
import signal
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from pipeline.buildlock import LockHeld, build_lock
from pipeline.clip_list import Clip, ClipListError, RowError, read_clip_lists
from pipeline.doctor import download_tool_versions, run_checks
from pipeline.download import DownloadConfig, download_many, expected_hours, find_local_media, local_media_names
from pipeline.extract import ExtractConfig, ExtractError
from pipeline.features import FbankConfig
from pipeline.ledger import Ledger, LedgerError
from pipeline.stage import stage_clip
from pipeline.status import FAILED_PERMANENT, FAILED_TRANSIENT, OK, PENDING, ClipStatus
from shards import manifest as dataset_manifest
from shards.atomic import crash_point, temp_path
from shards.hashing import file_sha256
from shards.writer import ShardBuildResult, build_shards, discard_staged, split_samples, staged_path, validate_split

log = logging.getLogger("avcap.build")

LEDGER_NAME = "ledger.sqlite"
DISK_FULL = "disk-full"
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_UNWRITABLE_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)


class BuildError(RuntimeError):
    """The build could not run or finish; the message says what to fix."""


@dataclass
class BuildConfig:
    csv: list[Path]
    split: str
    out: Path
    media_dir: Path | None = None          # build from media on disk instead of downloading
    limit: int | None = None               # the first N clips of the manifest
    cpu_workers: int = 1
    samples_per_shard: int = 256
    retry_permanent: bool = False
    retry_reasons: list[str] = field(default_factory=list)   # permanent failures with these reasons are retried
    max_failure_rate: float = 0.5
    wait_lock: bool = False                # another build of this split into `out` running: wait, not exit
    download: DownloadConfig = field(default_factory=DownloadConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    fbank: FbankConfig = field(default_factory=FbankConfig)

    def __post_init__(self) -> None:
        self.csv = [Path(p) for p in ([self.csv] if isinstance(self.csv, (str, Path)) else self.csv)]
        self.out = Path(self.out)
        self.media_dir = Path(self.media_dir) if self.media_dir is not None else None
        validate_split(self.split)
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        if self.cpu_workers < 1 or self.samples_per_shard < 1:
            raise ValueError(f"cpu_workers ({self.cpu_workers}) and samples_per_shard ({self.samples_per_shard}) "
                             "must be >= 1")
        if not 0.0 <= self.max_failure_rate <= 1.0:
            raise ValueError(f"max_failure_rate must be in [0, 1], got {self.max_failure_rate}")
        if self.media_dir is not None and not self.media_dir.is_dir():
            # Checked up front: otherwise every clip would fail as media-not-found, one by one.
            raise ValueError(f"--media-dir {self.media_dir}: no such directory")

    def as_record(self) -> dict:
        """Every parameter, as plain JSON values (the manifest redacts secrets from it)."""
        d = asdict(self)
        return _plain(d)


@dataclass
class LoadedClips:
    clips: list[Clip]                 # this run's clips (the first --limit of them)
    errors: list[RowError]            # bad rows, skipped
    listed: list[str]                 # keys of every valid row, --limit or not (rows gone from it are removed)


@dataclass
class MediaRef:
    clip: Clip
    path: Path
    offset: float                     # where the window starts in the file
    media_sha256: str | None = None


@dataclass
class DownloadStageResult:
    media: list[MediaRef]
    failed: int = 0
    bot_wall: str | None = None       # the message, when the site put up a bot check
    rate_limit: str | None = None     # the message, when the site rate-limited the session
    disk_full: list[str] = field(default_factory=list)   # keys whose download hit a full disk


@dataclass
class ProcessJob:
    key: str
    media_path: str
    offset: float
    meta: dict
    out_path: str
    extract: ExtractConfig
    fbank: FbankConfig
    media_sha256: str | None = None
    local_media: bool = False         # the user's --media-dir: a truncated file will not get better by itself


@dataclass
class ProcessOutcome:
    key: str
    status: ClipStatus
    reason: str | None = None
    message: str | None = None
    media_sha256: str | None = None
    duration: float | None = None


@dataclass
class LedgerPlan:
    """What prepare_ledger decided: the clips to do this run, and how the clip list changed."""
    todo: list[Clip]
    new: list[str] = field(default_factory=list)       # keys first seen in this run's clip list
    retried: list[str] = field(default_factory=list)   # keys in `todo` that failed in an earlier run
    dropped: list[str] = field(default_factory=list)   # keys whose CSV row is gone: marked `removed` this run


@dataclass
class StageStats:
    clips: int = 0          # clips the stage handled this run
    failed: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0   # this process's CPU time in the stage (all its threads): the driver's share

    @property
    def clips_per_s(self) -> float:
        return self.clips / self.seconds if self.seconds > 0 else 0.0


@dataclass
class BuildResult:
    split: str
    out: Path
    total: int                         # clips of the split in this manifest (after --limit)
    counts: dict[str, int]
    failure_rate: float
    row_errors: list[str]
    shards: list[dict] = field(default_factory=list)
    manifest_path: Path | None = None
    bot_wall: str | None = None
    rate_limit: str | None = None
    too_many_failures: bool = False
    stages: dict[str, StageStats] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)   # "status/reason" -> clips, over this clip list
    changes: dict = field(default_factory=dict)             # keys added/removed/retried/updated, rows new/dropped
    seconds: float = 0.0
    ok_keys: list[str] = field(default_factory=list)        # the samples in the shards
    publish: Any = None                                     # pipeline.publish.PublishReport, when published

    @property
    def ok(self) -> bool:
        return self.bot_wall is None and self.rate_limit is None and not self.too_many_failures


StageRunner = Callable[..., Any]
# Runs the CPU stage's jobs somewhere (a Dask cluster, ...) and yields each outcome as it lands, in any order.
# A runner may also have a `preflight()` method, which run_build calls before the first stage.
ClipRunner = Callable[[list["ProcessJob"]], Iterable["ProcessOutcome"]]


def _direct(name: str, fn: Callable, *args, **kwargs):
    return fn(*args, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Stages

def check_tools() -> None:
    missing = [t for t in ("ffmpeg", "ffprobe") if shutil.which(t) is None]
    if missing:
        raise BuildError(f"{' and '.join(missing)} not found on PATH: install ffmpeg (scripts/setup.sh does it "
                         "on Debian) and run again")


def load_clips(cfg: BuildConfig) -> LoadedClips:
    try:
        result = read_clip_lists(cfg.csv, cfg.split)
    except ClipListError as e:
        raise BuildError(f"cannot read the clip list: {e}") from e
    for err in result.errors:
        log.warning("skipping bad row %s", err)
    listed = [c.key for c in result.clips]
    clips = result.clips[: cfg.limit] if cfg.limit is not None else result.clips
    if not clips:
        raise BuildError(f"no valid rows in {', '.join(map(str, cfg.csv))} ({len(result.errors)} bad rows)")
    return LoadedClips(clips=clips, errors=result.errors, listed=listed)


def prepare_ledger(cfg: BuildConfig, clips: list[Clip], listed: list[str] | None = None) -> LedgerPlan:
    """Register new clips as pending; decide the clips this run must do (pending, transient, maybe permanent).

    Clips the ledger knows whose row is no longer in the CSV (`listed`: every valid row's key, default the
    clips) are marked `removed` and `dropped` from this run, its shards and its counts; their history is kept,
    and they come back as pending if their row does. Rows only left out by --limit are not removed."""
    wanted = {c.key for c in clips}
    in_csv = set(listed) if listed is not None else wanted
    with Ledger(cfg.out / LEDGER_NAME, cfg.split) as ledger:
        before = {e.key: e.status for e in ledger.entries()}
        ledger.upsert_pending(clips)
        gone = sorted(k for k, status in before.items() if k not in in_csv)
        ledger.mark_removed(gone)
        # An ok clip whose sample has no copy left (staged tar deleted by hand, its shard gone or damaged) has
        # to be made again; the shards that failed their check are named, since their clips are what is lost.
        samples = split_samples(cfg.out, cfg.split)
        lost = [e.key for e in ledger.entries(OK) if e.key not in samples]
        if lost:
            damaged = "".join(f"; {p.name} is not used: {why}" for p, why in sorted(samples.damaged.items()))
            log.warning("%d ok clips have no staged sample and are in no intact shard (e.g. %s); they are built "
                        "again from their media%s", len(lost), ", ".join(sorted(lost)[:3]), damaged)
            ledger.set_pending(lost)
        todo = set(ledger.keys_to_process(cfg.retry_permanent, cfg.retry_reasons))
    chosen = [c for c in clips if c.key in todo]
    plan = LedgerPlan(todo=chosen, new=sorted(wanted - set(before)),
                      retried=sorted(c.key for c in chosen if before.get(c.key) in (FAILED_PERMANENT, FAILED_TRANSIENT)),
                      dropped=gone)
    log.info("ledger: %d clips, %d new, %d to do this run (%d retried), %d no longer listed (removed)",
             len(clips), len(plan.new), len(chosen), len(plan.retried), len(plan.dropped))
    return plan


# The json fields that come from the CSV row and may change while the media stays the same.
CAPTION_FIELDS = ("captions", "audiocap_ids")


def caption_stage(cfg: BuildConfig, clips: list[Clip]) -> list[str]:
    """Finished clips whose captions or audiocap_ids changed in the CSV get a sample with the new json.

    Only the json member changes (the audio, fbank and frames depend on the media alone): a staged sample is
    rewritten, a sample already in a shard gets a staged json update (shards.writer.SplitSamples.update_json);
    the sample's shard then changes at the shard stage, the others keep their bytes. Returns the updated keys."""
    with Ledger(cfg.out / LEDGER_NAME, cfg.split) as ledger:
        ok = {e.key for e in ledger.entries(OK)}
    samples = split_samples(cfg.out, cfg.split)
    updated = []
    for clip in clips:
        if clip.key not in ok or clip.key not in samples:
            continue
        meta = samples.meta(clip.key)
        want = {"captions": list(clip.captions), "audiocap_ids": list(clip.audiocap_ids)}
        if all(meta.get(k) == want[k] for k in CAPTION_FIELDS):
            continue
        samples.update_json(clip.key, dict(meta, **want))
        updated.append(clip.key)
    if updated:
        log.info("captions: %d finished clips have new captions or audiocap_ids; their samples are updated",
                 len(updated))
    return updated


def download_stage(cfg: BuildConfig, clips: list[Clip]) -> DownloadStageResult:
    """Media for each clip: the user's --media-dir, else a download into DIR/media/. Failures go to the ledger."""
    result = DownloadStageResult(media=[])
    progress = _Progress("download", len(clips))
    with Ledger(cfg.out / LEDGER_NAME, cfg.split) as ledger:
        if cfg.media_dir is not None:
            for clip in clips:
                found = find_local_media(clip, cfg.media_dir)
                if found is None:
                    # Transient: adding the file and running again is exactly how a user fixes it.
                    names = " or ".join(f"{stem}.*" for stem, _ in local_media_names(clip))
                    ledger.record(clip.key, FAILED_TRANSIENT, "media-not-found",
                                  f"no {names} in {cfg.media_dir}", stage="download")
                    result.failed += 1
                else:
                    result.media.append(MediaRef(clip, found.path, found.offset))
                progress.step(ok=found is not None)
            return result

        def on_result(clip: Clip, r) -> None:
            if r.status == OK:
                # The attempts are real requests even when the last one succeeded; the status comes later.
                ledger.add_attempts(clip.key, r.attempts)
                result.media.append(MediaRef(clip, r.path, 0.0, r.media_sha256))
            else:
                ledger.record(clip.key, r.status, r.reason, r.message, stage="download", attempts=r.attempts)
                result.failed += 1
                if r.reason == DISK_FULL:
                    result.disk_full.append(clip.key)
            progress.step(ok=r.status == OK)

        if clips:
            check_downloads(cfg, len(clips))
        batch = download_many(clips, cfg.download, cfg.out / "media", on_result)
        for stop in (batch.bot_wall, batch.rate_limit):
            if stop is not None:
                log.error("download stopped: %s (%d clips left pending)", stop, len(batch.untried))
        result.bot_wall = str(batch.bot_wall) if batch.bot_wall is not None else None
        result.rate_limit = str(batch.rate_limit) if batch.rate_limit is not None else None
    if result.disk_full:
        raise BuildError(_disk_full_message(cfg, f"{len(result.disk_full)} downloads hit it"))
    return result


def check_downloads(cfg: BuildConfig, clips: int) -> None:
    """The preflight of `flows.py doctor`, in short, before the first download; a failed check (no JS runtime
    for YouTube, no ffmpeg, a bad cookies file, a full disk) stops the build here, before any request."""
    report = run_checks(cfg.download, cfg.out)
    log.info("preflight: %s", report.short())
    hours = expected_hours(clips, cfg.download)
    pace = f"at most {cfg.download.max_per_hour:g}/hour" if cfg.download.max_per_hour else "no per-hour cap"
    log.info("download: %d clips, %s%s", clips, pace,
             "" if hours is None else f": expected {hours:.1f} h or more" if hours >= 1
             else f": expected {60 * hours:.0f} min or more")
    if report.failed:
        raise BuildError("preflight failed: " + "; ".join(c.line() for c in report.failed)
                         + " (python flows.py doctor shows every check)")


def process_stage(cfg: BuildConfig, media: list[MediaRef], clip_runner: ClipRunner | None = None) -> dict[str, int]:
    """Extract + fbank + staged sample for each clip, `cfg.cpu_workers` clips at a time on this machine, or
    wherever `clip_runner` sends them. Returns outcome counts."""
    jobs = [_job(cfg, m) for m in sorted(media, key=lambda m: m.clip.key)]
    progress = _Progress("process", len(jobs))
    counts = {OK: 0, FAILED_PERMANENT: 0, FAILED_TRANSIENT: 0}
    disk_full: list[str] = []
    media_of = {j.key: Path(j.media_path) for j in jobs}
    with Ledger(cfg.out / LEDGER_NAME, cfg.split) as ledger:
        def land(o: ProcessOutcome) -> None:
            ledger.record(o.key, o.status, o.reason, o.message, media_sha256=o.media_sha256,
                          stage="process" if o.status == OK else "extract", attempts=0)
            if o.reason == "truncated" and cfg.media_dir is None:
                # Our own download ended early: drop it so the next run downloads the clip again.
                media_of[o.key].unlink(missing_ok=True)
            if o.reason == DISK_FULL:
                disk_full.append(o.key)
            counts[o.status] += 1
            progress.step(ok=o.status == OK)

        if clip_runner is not None:
            for outcome in clip_runner(jobs):
                land(outcome)
        elif cfg.cpu_workers == 1 or len(jobs) <= 1:
            for job in jobs:
                land(process_clip(job))
        else:
            # spawn: the parent runs threads (downloads, Prefect), which fork would copy mid-flight.
            ctx = multiprocessing.get_context("spawn")
            pool = ProcessPoolExecutor(cfg.cpu_workers, mp_context=ctx, initializer=_worker_init)
            try:
                for fut in as_completed([pool.submit(process_clip, j) for j in jobs]):
                    land(fut.result())
            except BaseException:
                # Interrupted: the clips not started are dropped (they stay pending), the running ones end in
                # seconds; waiting for the whole queue would keep a stopped build busy for minutes.
                pool.shutdown(wait=False, cancel_futures=True)
                raise
            pool.shutdown()
    if disk_full:
        raise BuildError(_disk_full_message(cfg, f"{len(disk_full)} clips could not be staged"))
    return counts


def process_clip(job: ProcessJob) -> ProcessOutcome:
    """One clip to one staged sample; every failure becomes an outcome, never an exception."""
    try:
        sha = job.media_sha256 or file_sha256(Path(job.media_path))
        meta = dict(job.meta, media_sha256=sha)
        sample = stage_clip(Path(job.media_path), job.offset, meta, Path(job.out_path), job.extract, job.fbank)
        errors = sample.meta.get("decode_errors")
        note = (f"kept: decoded audio and frames are complete, but ffmpeg reported {errors['count']} decode "
                f"errors; first: " + " | ".join(errors["first_lines"])) if errors else None
        return ProcessOutcome(job.key, OK, message=note, media_sha256=sha, duration=sample.meta["duration"])
    except ExtractError as e:
        # A truncated download is fetched again next run; a truncated file of the user's stays what it is.
        transient = e.reason == "timeout" or (e.reason == "truncated" and not job.local_media)
        status = FAILED_TRANSIENT if transient else FAILED_PERMANENT
        return ProcessOutcome(job.key, status, e.reason, e.message, media_sha256=job.media_sha256)
    except OSError as e:
        if e.errno not in _DISK_FULL_ERRNOS:
            return _internal_error(job, e)
        return ProcessOutcome(job.key, FAILED_TRANSIENT, DISK_FULL, f"{type(e).__name__}: {e}",
                              media_sha256=job.media_sha256)
    except Exception as e:  # noqa: BLE001 - recorded with its traceback; a bug shows up as failures, loudly
        return _internal_error(job, e)


def _internal_error(job: ProcessJob, e: BaseException) -> ProcessOutcome:
    return ProcessOutcome(job.key, FAILED_TRANSIENT, "internal-error",
                          f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}")


def shard_stage(cfg: BuildConfig, clips: list[Clip]) -> tuple[ShardBuildResult, int]:
    """Shards from the ok clips of this manifest; the shard count is the one fixed at the split's first build."""
    plan = dataset_manifest.shard_plan(cfg.out, cfg.split, len(clips), cfg.samples_per_shard)
    wanted = {c.key for c in clips}
    with Ledger(cfg.out / LEDGER_NAME, cfg.split) as ledger:
        ok = {e.key for e in ledger.entries(OK)}
    # keep: ok clips this run leaves out (--limit) keep their sample for a later run without the limit.
    result = build_shards(cfg.out, cfg.split, plan.num_shards, sorted(ok & wanted), keep=ok - wanted)
    log.info("shards: %d samples in %d shards (%d written, %d unchanged, %d removed)", result.num_samples,
             len(result.shards), len(result.written), len(result.unchanged), len(result.removed))
    return result, plan.num_shards


def manifest_stage(cfg: BuildConfig, clips: list[Clip], shards: ShardBuildResult, num_shards: int,
                   retried: int = 0, updated: int = 0) -> Path:
    """The split's manifest entry, then, once it is durable, the deletion of the staged copies of the samples
    now in a shard. `changes`: samples added to/removed from the shards (read from the shards themselves),
    `retried`, the clips this run tried again after an earlier failure, and `updated`, the samples whose
    captions changed."""
    counts, failures = _split_status(cfg, clips)
    plan = dataset_manifest.shard_plan(cfg.out, cfg.split, len(clips), cfg.samples_per_shard)
    changes = dataset_manifest.Changes(added=len(shards.added_keys), removed=len(shards.removed_keys),
                                       retried=retried, updated=updated)
    entry = dataset_manifest.make_split_manifest(
        split=cfg.split, config=cfg.as_record(), extract_cfg=cfg.extract, fbank_cfg=cfg.fbank, inputs=cfg.csv,
        samples_per_shard=plan.samples_per_shard, num_shards=num_shards, build=shards, counts=counts,
        failures=failures, changes=changes,
        extra_tools=download_tool_versions(cfg.download) if cfg.media_dir is None else None)
    dataset_manifest.write_dataset_manifest(cfg.out, entry)
    crash_point("manifest-written")
    discarded = discard_staged(cfg.out, cfg.split, shards.keys)
    if discarded:
        log.info("staging: %d staged files deleted, their samples are in the shards now", discarded)
    return cfg.out / dataset_manifest.MANIFEST_NAME


def check_fingerprint(cfg: BuildConfig) -> None:
    """A split is built with one set of sample settings: mixing them in one DIR would mix sample formats."""
    path = cfg.out / dataset_manifest.MANIFEST_NAME
    if not path.exists():
        return
    entry = dataset_manifest.load_dataset_manifest(path).splits.get(cfg.split)
    if entry is None:
        return
    want = dataset_manifest.fingerprint(dataset_manifest.fingerprint_parts(cfg.extract, cfg.fbank))
    if entry.fingerprint != want:
        raise BuildError(f"{cfg.out}: split {cfg.split!r} was built with other sample settings (frames, fbank or "
                         f"extract parameters; fingerprint {entry.fingerprint[:12]} != {want[:12]}); build into "
                         "a new --out directory")


def run_build(cfg: BuildConfig, stage_runner: StageRunner = _direct, clip_runner: ClipRunner | None = None
              ) -> BuildResult:
    """All stages in order. Raises BuildError when the build cannot run; per-clip failures, a bot wall and
    too many failures are reported in the result (`result.ok`).

    `stage_runner(name, fn, *args)` runs each stage (flows.py passes one that makes it a Prefect task);
    `clip_runner` runs the CPU stage's clips elsewhere (flows.py: a Dask cluster) instead of a local pool.

    A full disk (ENOSPC anywhere, or the ledger failing) is a BuildError naming cfg.out, and so are a read-only
    or unwritable cfg.out and another build of the split holding its lock (pipeline.buildlock)."""
    check_tools()
    check_out_writable(cfg.out)
    try:
        with holding_build_lock(cfg):
            return _run_build(cfg, stage_runner, clip_runner)
    except OSError as e:
        if e.errno in _UNWRITABLE_ERRNOS:
            raise BuildError(_unwritable_message(cfg.out, e)) from e
        if e.errno not in _DISK_FULL_ERRNOS:
            raise
        raise BuildError(_disk_full_message(cfg, f"{type(e).__name__}: {e}")) from e
    except LedgerError as e:
        if _looks_full(cfg, e):
            raise BuildError(_disk_full_message(cfg, str(e))) from e
        raise BuildError(f"{cfg.out}: {e}") from e


@contextmanager
def holding_build_lock(cfg: BuildConfig) -> Iterator[None]:
    """The build lock of (cfg.out, cfg.split) for the block; another build holding it is a BuildError (or,
    with cfg.wait_lock, waited for). Re-entrant: flows hold it around run_build, report and publish."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    try:
        with build_lock(cfg.out, cfg.split, wait=cfg.wait_lock):
            yield
    except LockHeld as e:   # only ever raised on entry
        raise BuildError(str(e)) from None


def check_out_writable(out: Path) -> None:
    """A read-only or unwritable --out is said to be one up front (the build would otherwise fail at its first
    write, blamed on free space or as a raw EROFS traceback)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = temp_path(out / ".write-probe")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        if e.errno in _UNWRITABLE_ERRNOS:
            raise BuildError(_unwritable_message(out, e)) from e
        if e.errno in _DISK_FULL_ERRNOS:
            raise BuildError(f"{out}: no space left on device; free space and run again") from e
        raise BuildError(f"{out}: cannot write the output directory ({type(e).__name__}: {e})") from e


def _unwritable_message(out: Path, e: OSError) -> str:
    why = "is on a read-only file system" if e.errno == errno.EROFS else "is not writable by this user"
    return (f"{out} {why} ({e.strerror}: {e.filename or out}): the build writes its ledger, media, samples and "
            "shards there; pass a writable --out (or remount it read-write)")


def _run_build(cfg: BuildConfig, stage_runner: StageRunner, clip_runner: ClipRunner | None) -> BuildResult:
    t0 = time.monotonic()
    check_fingerprint(cfg)
    preflight = getattr(clip_runner, "preflight", None)
    if preflight is not None:
        preflight()     # e.g. a Dask cluster whose workers cannot see DIR: stop before the downloads
    stages: dict[str, StageStats] = {}

    def timed(name: str, fn: Callable, *args):
        t, cpu = time.monotonic(), time.process_time()
        out = stage_runner(name, fn, *args)
        stages[name] = StageStats(seconds=time.monotonic() - t, cpu_seconds=time.process_time() - cpu)
        return out

    loaded = timed("manifest", load_clips, cfg)
    clips = loaded.clips
    plan = timed("ledger", prepare_ledger, cfg, clips, loaded.listed)
    updated = timed("captions", caption_stage, cfg, [c for c in clips if c.key not in {t.key for t in plan.todo}])
    stages["captions"].clips = len(updated)
    downloaded = timed("download", download_stage, cfg, plan.todo)
    stages["download"].clips, stages["download"].failed = len(plan.todo), downloaded.failed
    if clip_runner is None:
        processed = timed("process", process_stage, cfg, downloaded.media)
    else:
        processed = timed("process", process_stage, cfg, downloaded.media, clip_runner)
    stages["process"].clips = sum(processed.values())
    stages["process"].failed = stages["process"].clips - processed[OK]
    shards, num_shards = timed("shards", shard_stage, cfg, clips)
    stages["shards"].clips = shards.num_samples
    manifest_path = timed("dataset-manifest", manifest_stage, cfg, clips, shards, num_shards, len(plan.retried),
                          len(updated))

    counts, failures = _split_status(cfg, clips)
    wanted = {c.key for c in clips}
    with Ledger(cfg.out / LEDGER_NAME, cfg.split) as ledger:
        ok_keys = sorted(e.key for e in ledger.entries(OK) if e.key in wanted)
    failed = counts[FAILED_PERMANENT] + counts[FAILED_TRANSIENT]
    rate = failed / len(clips)
    reasons: dict[str, int] = {}
    for e in failures:
        label = f"{e.status}/{e.reason or 'unknown'}"
        reasons[label] = reasons.get(label, 0) + 1
    changes = {"added": shards.added_keys, "removed": shards.removed_keys, "retried": plan.retried,
               "updated": updated, "new_rows": plan.new, "dropped_rows": plan.dropped,
               "shards_written": list(shards.written),
               "shards_removed": list(shards.removed)}
    result = BuildResult(split=cfg.split, out=cfg.out, total=len(clips), counts=counts, failure_rate=rate,
                         row_errors=[str(e) for e in loaded.errors],
                         shards=[asdict(s) for s in shards.shards], manifest_path=manifest_path,
                         bot_wall=downloaded.bot_wall, rate_limit=downloaded.rate_limit,
                         too_many_failures=rate > cfg.max_failure_rate,
                         stages=stages, reasons=dict(sorted(reasons.items())), changes=changes,
                         seconds=time.monotonic() - t0, ok_keys=ok_keys)
    log.info("build of %s: %s, failure rate %.1f%% in %.1f s; shards: %d samples added, %d removed, %d clips "
             "retried", cfg.split, counts, 100 * rate, result.seconds, len(shards.added_keys),
             len(shards.removed_keys), len(plan.retried))
    return result


# ---------------------------------------------------------------------------------------------------------
# Helpers

def _disk_full_message(cfg: BuildConfig, detail: str) -> str:
    return (f"{cfg.out}: no space left on device; free space and run again: finished clips are kept "
            f"({detail})")


def _looks_full(cfg: BuildConfig, e: LedgerError) -> bool:
    """Whether a ledger failure is the disk being full (SQLite only says "disk I/O error" at times)."""
    text = f"{e} {e.__cause__}".lower()
    if "no space left" in text or "disk is full" in text:
        return True
    try:
        return shutil.disk_usage(cfg.out).free < 2**20
    except OSError:
        return False


def _job(cfg: BuildConfig, m: MediaRef) -> ProcessJob:
    c = m.clip
    # media_offset: where the window was cut in the media file; the audit derives it again from the file's name.
    meta = {"key": c.key, "youtube_id": c.youtube_id, "start_time": c.start_time, "split": cfg.split,
            "captions": list(c.captions), "audiocap_ids": list(c.audiocap_ids), "media_offset": m.offset}
    return ProcessJob(key=c.key, media_path=str(Path(m.path).absolute()), offset=m.offset, meta=meta,
                      out_path=str(staged_path(cfg.out, cfg.split, c.key)), extract=cfg.extract, fbank=cfg.fbank,
                      media_sha256=m.media_sha256, local_media=cfg.media_dir is not None)


def _split_status(cfg: BuildConfig, clips: list[Clip]) -> tuple[dict[str, int], list]:
    """Counts and failures over this manifest's clips (the ledger may also hold clips since removed)."""
    wanted = {c.key for c in clips}
    with Ledger(cfg.out / LEDGER_NAME, cfg.split) as ledger:
        entries = [e for e in ledger.entries() if e.key in wanted]
    counts = {s: 0 for s in (OK, FAILED_PERMANENT, FAILED_TRANSIENT, PENDING)}
    for e in entries:
        counts[e.status] += 1
    failures = [e for e in entries if e.status in (FAILED_PERMANENT, FAILED_TRANSIENT)]
    return counts, failures


def _worker_init() -> None:
    # Ctrl-C reaches the whole process group: the parent decides what stops (workers would only print
    # tracebacks and leave their clip half done).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # One clip per core: torch's intra-op threads would only fight the other workers.
    import torch
    torch.set_num_threads(1)


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


class _Progress:
    """Log lines per stage (about 20 per stage, whatever its size): readable in a terminal and in Prefect's log."""

    def __init__(self, stage: str, total: int):
        self.stage, self.total, self.done, self.failed = stage, total, 0, 0
        self.every = max(1, total // 20)
        self.t0 = time.monotonic()
        log.info("%s: %d clips", stage, total)

    def step(self, ok: bool) -> None:
        self.done += 1
        self.failed += 0 if ok else 1
        if self.done % self.every == 0 or self.done == self.total:
            rate = self.done / max(1e-9, time.monotonic() - self.t0)
            log.info("%s: %d/%d done, %d failed (%.2f clips/s)", self.stage, self.done, self.total, self.failed,
                     rate)
