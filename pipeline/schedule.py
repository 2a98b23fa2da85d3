"""Scheduled rebuilds, audit deployments and the scale-out task runner.

- `rebuild_flow`: the incremental rebuild as a deployable flow (module level, JSON parameters), then an
  optional publish. Deployment parameters are stored in Prefect's database and shown in its UI, so no secret
  is a parameter here (a proxy with credentials or cookies belongs in the serving process's environment).
- `make_deployments(rebuild_flow, audit_flow, cfg)`: the two deployments with their cron schedules; the flows
  are passed in so another rebuild flow can be deployed the same way.
- `serve_deployments` / `serve_main`: `prefect.serve` in this process, which registers the deployments and
  polls the API for scheduled and manually triggered runs (`python flows.py serve`).
- `task_runner_for(address)`: prefect-dask's DaskTaskRunner on a running scheduler, or the local thread pool.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import Flow, flow, serve, task
from prefect.cache_policies import NO_CACHE
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

REBUILD_DEPLOYMENT = "rebuild"
AUDIT_DEPLOYMENT = "audit"


def _as_task(name: str, fn, *args, **kwargs):
    # One Prefect task per build stage, as flows.build_flow does; NO_CACHE because the ledger, not Prefect,
    # decides what is left to do, and retries stay in pipeline.download's backoff.
    return task(fn, name=name, retries=0, cache_policy=NO_CACHE, log_prints=True)(*args, **kwargs)


# A module-level flow with JSON parameters: deployments store parameters as JSON and load the flow from its
# entrypoint ("pipeline/schedule.py:rebuild_flow"), which flows.build_flow (a closure over a BuildConfig) cannot be.
@flow(name="avcap-rebuild", log_prints=True)
def rebuild_flow(out_dir: str, csv: list[str], split: str, media_dir: str | None = None,
                 url_template: str | None = None, cpu_workers: int = 1, samples_per_shard: int = 256,
                 retry_permanent: bool = False, max_failure_rate: float = 0.5,
                 publish_url: str | None = None) -> dict:
    """Incremental rebuild of one split into out_dir (only new/changed clips are processed: the ledger and the
    fixed shard count do that), then publish to publish_url when given. Fails the run on a bot wall or too many
    failures, so a scheduled rebuild that went wrong shows up as failed."""
    from pipeline.build import BuildConfig, run_build
    from pipeline.download import DownloadConfig

    download = DownloadConfig(url_template=url_template) if url_template else DownloadConfig()
    cfg = BuildConfig(csv=[Path(c) for c in csv], split=split, out=Path(out_dir),
                      media_dir=Path(media_dir) if media_dir else None, cpu_workers=cpu_workers,
                      samples_per_shard=samples_per_shard, retry_permanent=retry_permanent,
                      max_failure_rate=max_failure_rate, download=download)
    result = run_build(cfg, stage_runner=_as_task)
    summary = {"split": result.split, "total": result.total, "counts": result.counts,
               "failure_rate": result.failure_rate, "shards": len(result.shards),
               "manifest": str(result.manifest_path)}
    if not result.ok:
        why = f"bot wall: {result.bot_wall}" if result.bot_wall else \
            f"{100 * result.failure_rate:.1f}% of clips failed (limit {100 * max_failure_rate:g}%)"
        raise RuntimeError(f"rebuild of {out_dir} ({split}) did not finish: {why}")
    if publish_url:
        from pipeline.publish import publish
        summary["publish"] = _as_task("publish", publish, out_dir, publish_url).to_json()
    return summary


@dataclass
class ScheduleConfig:
    out_dir: str
    rebuild_cron: str | None = "0 3 * * *"    # nightly; None: the rebuild runs only when triggered
    audit_cron: str | None = "0 5 * * 0"      # weekly, after a rebuild had time to finish
    timezone: str = "UTC"
    rebuild_parameters: dict[str, Any] = field(default_factory=dict)  # beyond out_dir, e.g. csv paths
    audit_sample: int = 8
    audit_seed: int = 0
    tags: list[str] = field(default_factory=lambda: ["avcap"])


def _schedules(cron: str | None, timezone: str) -> list:
    if cron is None:
        return []
    # Cron() validates the string and the timezone name, so a typo fails here, not at 3 am.
    return [Cron(cron, timezone=timezone)]


def make_deployments(rebuild_flow: Flow | None, audit_flow: Flow | None,
                     cfg: ScheduleConfig) -> list[RunnerDeployment]:
    """Deployments of the rebuild and audit flows, parameterised with cfg.out_dir and scheduled by cron.

    Either flow may be None to deploy only the other. The rebuild flow (normally `rebuild_flow` above) must
    accept `out_dir` plus the keys of cfg.rebuild_parameters (for rebuild_flow: csv and split at least); the
    audit flow is pipeline.audit.audit_flow (out_dir, sample, seed).
    """
    deployments: list[RunnerDeployment] = []
    if rebuild_flow is not None:
        deployments.append(rebuild_flow.to_deployment(
            name=REBUILD_DEPLOYMENT,
            schedules=_schedules(cfg.rebuild_cron, cfg.timezone),
            parameters={"out_dir": cfg.out_dir, **cfg.rebuild_parameters},
            description="Incremental rebuild of the AudioCaps shards: only changed clips are redone.",
            tags=cfg.tags,
            # Two rebuilds on one output directory would race on the ledger and the shards.
            concurrency_limit=1,
        ))
    if audit_flow is not None:
        deployments.append(audit_flow.to_deployment(
            name=AUDIT_DEPLOYMENT,
            schedules=_schedules(cfg.audit_cron, cfg.timezone),
            parameters={"out_dir": cfg.out_dir, "sample": cfg.audit_sample, "seed": cfg.audit_seed},
            description="Reproducibility audit of the published shards against manifest.json.",
            tags=cfg.tags,
        ))
    if not deployments:
        raise ValueError("make_deployments: both rebuild_flow and audit_flow are None; nothing to deploy")
    return deployments


def serve_deployments(deployments: list[RunnerDeployment], limit: int | None = None) -> None:
    """Serve the deployments from this process until interrupted (blocks).

    `limit` caps concurrent flow runs in this process.
    """
    serve(*deployments, limit=limit, print_starting_message=True)


def task_runner_for(dask_address: str | None, max_workers: int | None = None) -> TaskRunner:
    """The task runner for the CPU stages: a Dask cluster at `dask_address` (e.g. "tcp://host:8786"),
    or Prefect's thread pool on this machine when None."""
    if dask_address:
        if "://" not in dask_address:
            raise ValueError(f"dask address {dask_address!r}: expected a scheduler URL like tcp://host:8786")
        # Imported here so a local run does not need distributed to start up.
        from prefect_dask import DaskTaskRunner
        return DaskTaskRunner(address=dask_address)
    return ThreadPoolTaskRunner(max_workers=max_workers)


def add_serve_arguments(parser) -> None:
    """Arguments of `flows.py serve`."""
    parser.add_argument("--out", required=True, help="output directory the deployments rebuild and audit")
    parser.add_argument("--csv", required=True, action="append", help="AudioCaps CSV/JSON (repeat to merge)")
    parser.add_argument("--split", required=True, help="split the rebuild makes: train, val, test, ...")
    parser.add_argument("--cron", default="0 3 * * *", help="rebuild schedule (cron); 'none': only on demand")
    parser.add_argument("--audit-cron", default="0 5 * * 0", help="audit schedule (cron); 'none': only on demand")
    parser.add_argument("--timezone", default="UTC", help="IANA time zone of both schedules")
    parser.add_argument("--media-dir", help="rebuild from media on disk instead of downloading")
    parser.add_argument("--url-template", help="download URL with {youtube_id} (default: YouTube)")
    parser.add_argument("--cpu-workers", type=int, default=1)
    parser.add_argument("--publish", metavar="URL", help="publish each finished rebuild to this fsspec URL")
    parser.add_argument("--audit-sample", type=int, default=8, help="clips each scheduled audit re-checks")
    parser.add_argument("--limit", type=int, help="at most this many concurrent flow runs in this process")


def serve_config_from_args(a) -> ScheduleConfig:
    def cron(v: str | None) -> str | None:
        return None if v is None or v.lower() == "none" else v
    params: dict[str, Any] = {"csv": [str(Path(c).absolute()) for c in a.csv], "split": a.split,
                              "cpu_workers": a.cpu_workers}
    if a.media_dir:
        params["media_dir"] = str(Path(a.media_dir).absolute())
    if a.url_template:
        params["url_template"] = a.url_template
    if a.publish:
        params["publish_url"] = a.publish
    # Absolute paths: the served runs may start in another working directory than this command.
    return ScheduleConfig(out_dir=str(Path(a.out).absolute()), rebuild_cron=cron(a.cron),
                          audit_cron=cron(a.audit_cron), timezone=a.timezone, rebuild_parameters=params,
                          audit_sample=a.audit_sample)


def serve_main(a) -> int:
    """`flows.py serve`: serve the rebuild and audit deployments until interrupted."""
    from pipeline.audit import audit_flow
    serve_deployments(make_deployments(rebuild_flow, audit_flow, serve_config_from_args(a)), limit=a.limit)
    return 0
