"""Scheduled rebuilds and audit deployments.

- `make_deployments(build_flow, audit_flow, cfg)`: the `rebuild` deployment of pipeline.orchestrate.build_flow (the one build
  flow: run on the same DIR it is an incremental rebuild) and the `audit` deployment of
  pipeline.audit.audit_flow, with their cron schedules. Deployment parameters are stored in Prefect's database
  and shown in its UI, so no secret is one (the proxy comes from the serving process's AVCAP_PROXY or a Prefect
  Secret block named by the `proxy_secret` parameter).
- `serve_deployments`: `prefect.serve` in this process, which registers the deployments and
  polls the API for scheduled and manually triggered runs (`python flows.py serve`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prefect import Flow, serve
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron

from pipeline.params import add_arguments, deployment_parameters, from_args

REBUILD_DEPLOYMENT = "rebuild"
AUDIT_DEPLOYMENT = "audit"


@dataclass
class ScheduleConfig:
    out_dir: str
    rebuild_cron: str | None = "0 3 * * *"    # nightly; None: the rebuild runs only when triggered
    audit_cron: str | None = "0 5 * * 0"      # weekly, after a rebuild had time to finish
    timezone: str = "UTC"
    rebuild_parameters: dict[str, Any] = field(default_factory=dict)  # pipeline.params.BuildParams beyond out_dir
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

    Either flow may be None to deploy only the other. The rebuild flow (normally flows.build_flow) must
    accept `out_dir` plus the keys of cfg.rebuild_parameters (for build_flow: csv and split at least); the
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


def add_serve_arguments(parser) -> None:
    """Arguments of `flows.py serve`: the schedules, plus every build parameter for the rebuilds."""
    add_arguments(parser)
    parser.add_argument("--cron", default="0 3 * * *", help="rebuild schedule (cron); 'none': only on demand")
    parser.add_argument("--audit-cron", default="0 5 * * 0", help="audit schedule (cron); 'none': only on demand")
    parser.add_argument("--timezone", default="UTC", help="IANA time zone of both schedules")
    parser.add_argument("--audit-sample", type=int, default=8, help="clips each scheduled audit re-checks")
    parser.add_argument("--concurrent-runs", type=int, help="at most this many concurrent flow runs in this process")


def serve_config_from_args(a) -> ScheduleConfig:
    def cron(v: str | None) -> str | None:
        return None if v is None or v.lower() == "none" else v
    params = deployment_parameters(from_args(a))
    out_dir = params.pop("out_dir")
    return ScheduleConfig(out_dir=out_dir, rebuild_cron=cron(a.cron), audit_cron=cron(a.audit_cron),
                          timezone=a.timezone, rebuild_parameters=params, audit_sample=a.audit_sample)
