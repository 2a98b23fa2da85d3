"""The reproducibility audit as a Prefect flow and as `flows.py audit`.

`audit_flow` runs pipeline.audit_checks.run_audit (the checks are listed there) and publishes the report
(pipeline.audit_report) as a markdown artifact; it fails (after writing the report and artifact) on any
mismatch, so a scheduled audit that finds a problem shows up as a failed run. The report is written to
DIR/audit/audit-<UTC timestamp>.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from pipeline.audit_checks import run_audit
from pipeline.audit_report import AuditConfig, AuditError, AuditFailed


# A decorated module-level function, so a deployment's entrypoint ("pipeline/audit.py:audit_flow") loads the flow.
@flow(name="avcap-audit", log_prints=True)
def audit_flow(out_dir: str, sample: int = 8, seed: int = 0, fbank_tolerance: float = 2e-2) -> dict:
    """Audit a build, publish the report as a markdown artifact, fail the run on any mismatch."""
    report = run_audit(AuditConfig(Path(out_dir), sample=sample, seed=seed, fbank_tolerance=fbank_tolerance))
    create_markdown_artifact(markdown=report.to_markdown(), key="avcap-audit",
                             description=f"Reproducibility audit of {out_dir}")
    if not report.ok:
        raise AuditFailed(f"audit of {out_dir} found {len(report.mismatches)} mismatches (report "
                          f"{report.report_path}): " + "; ".join(str(m) for m in report.mismatches[:5]))
    return report.to_json()


def add_audit_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--out", required=True, type=Path, help="build directory holding manifest.json")
    parser.add_argument("--sample", type=int, default=8,
                        help="clips whose fbank is recomputed and which are re-extracted (-1: all, 0: none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the clip sample")
    parser.add_argument("--fbank-tolerance", type=float, default=2e-2,
                        help="max abs fbank difference allowed when the platform differs from the manifest's")
    parser.add_argument("--no-prefect", action="store_true",
                        help="run the audit directly, without a Prefect flow run (no artifact)")
    return parser


def _latest_report(out: Path) -> dict:
    reports = sorted((out / "audit").glob("audit-*.json"))
    if not reports:
        raise AuditError(f"{out}/audit: the audit wrote no report")
    return json.loads(reports[-1].read_text())


def audit_main(args: argparse.Namespace) -> int:
    """`flows.py audit`: run the audit (as the audit_flow Prefect flow unless --no-prefect), print what it found.
    Exit status 0 when clean, 1 on any mismatch, 2 when the audit could not run (no or unreadable manifest)."""
    try:
        if args.no_prefect:
            d = run_audit(AuditConfig(args.out, sample=args.sample, seed=args.seed,
                                      fbank_tolerance=args.fbank_tolerance)).to_json()
        else:
            try:
                d = audit_flow(out_dir=str(args.out), sample=args.sample, seed=args.seed,
                               fbank_tolerance=args.fbank_tolerance)
            except AuditFailed:
                d = _latest_report(args.out)   # the failed run's report: the newest one in DIR/audit
    except AuditError as e:
        print(f"audit could not run: {e}")
        return 2
    print(f"audit {'passed' if d['ok'] else 'FAILED'}: {d['shards_checked']} shards, "
          f"{len(d['clips_sampled'])} clips re-checked; fbank {d['fbank_comparison']}")
    for m in d["mismatches"]:
        print(f"  [{m['check']}] {m['target']}: {m['message']}")
    print(f"report: {d['report_path']}")
    return 0 if d["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(audit_main(add_audit_arguments(argparse.ArgumentParser(description=__doc__)).parse_args()))
