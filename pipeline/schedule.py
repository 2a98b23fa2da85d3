"""Scheduled rebuilds, audit deployments and the scale-out task runner.

Deployments are built from flow objects passed in (the rebuild flow lives in flows.py, which imports this
module; taking the flow as an argument avoids the import cycle). `serve_deployments` runs them in this
process with `prefect.serve`, which polls the API for scheduled and manually triggered runs; that is what
`python flows.py serve` calls.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prefect import Flow, serve
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

REBUILD_DEPLOYMENT = "rebuild"
AUDIT_DEPLOYMENT = "audit"


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

    Either flow may be None to deploy only the other. The rebuild flow must accept `out_dir` plus the keys of
    cfg.rebuild_parameters; the audit flow is pipeline.audit.audit_flow (out_dir, sample, seed).
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
