"""The audit's report model: its settings (AuditConfig), what it found (Mismatch, AuditReport: JSON and markdown)
and the two ways it ends without a report (AuditError) or with mismatches (AuditFailed).

pipeline.audit_checks fills a report, pipeline.audit runs it as a Prefect flow or from the command line.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path


class AuditError(RuntimeError):
    """The audit could not run at all (no manifest, unreadable manifest)."""


class AuditFailed(RuntimeError):
    """The audit ran and found mismatches (raised by audit_flow so the Prefect run is marked failed)."""


@dataclass
class AuditConfig:
    out_dir: Path
    sample: int = 8             # clips to recompute/re-extract; 0 skips those checks, -1 audits every clip
    seed: int = 0
    fbank_tolerance: float = 2e-2  # max abs fbank difference allowed when the platform differs (pipeline.audit_checks)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        if self.sample < -1:
            raise ValueError(f"AuditConfig.sample={self.sample}: use a count >= 0, or -1 for every clip")
        if not self.fbank_tolerance >= 0:
            raise ValueError(f"AuditConfig.fbank_tolerance={self.fbank_tolerance} must be >= 0")


@dataclass
class Mismatch:
    check: str     # e.g. "shard-sha256", "fbank", "frame", "tool-version"
    target: str    # the shard path, clip key (with member) or tool name concerned
    message: str

    def __str__(self) -> str:
        return f"[{self.check}] {self.target}: {self.message}"


@dataclass
class AuditReport:
    out_dir: str
    started_at: str
    finished_at: str = ""
    shards_checked: int = 0
    samples_counted: int = 0
    clips_sampled: list[str] = field(default_factory=list)
    fbank_comparison: str = ""          # "bitwise" or "tolerance 0.02 (...why...)"
    tool_versions_manifest: dict[str, dict[str, str]] = field(default_factory=dict)  # by split
    tool_versions_here: dict[str, str] = field(default_factory=dict)
    mismatches: list[Mismatch] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    report_path: str = ""

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def to_json(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d

    def to_markdown(self) -> str:
        status = "PASSED" if self.ok else f"FAILED ({len(self.mismatches)} mismatches)"
        lines = [
            f"# Audit {status}",
            "",
            f"- build: `{self.out_dir}`",
            f"- shards checked: {self.shards_checked} ({self.samples_counted} samples)",
            f"- clips re-computed and re-extracted: {len(self.clips_sampled)}",
            f"- fbank comparison: {self.fbank_comparison}",
            f"- report: `{self.report_path}`",
            "",
        ]
        if self.mismatches:
            lines += ["| check | target | message |", "|---|---|---|"]
            lines += [f"| {m.check} | `{m.target}` | {m.message.replace('|', '/')} |" for m in self.mismatches]
            lines.append("")
        if self.notes:
            lines += ["## Notes", ""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines)
