"""The build report: statistics a person reads, plots a person looks at, and the Prefect artifacts of both.

`build_report(result)` writes DIR/reports/build-<split>.md with three PNG plots next to it
(build-<split>-durations.png, -loudness.png, -failures.png) and, inside a Prefect flow run, publishes
- a table artifact `avcap-build-<split>-stats`: clips by status and by failure reason, and per stage the
  clips handled, seconds and clips/s (the throughput);
- a markdown artifact `avcap-build-<split>-report`: the same report with the plots embedded (PNG data URIs,
  so the UI shows them without access to DIR).

Durations and loudness (RMS of the stored 16 kHz waveform, in dBFS) come from the samples of the split's ok
clips, wherever they are now (shards.writer.split_samples: the shards, or staging for samples not yet in one); on large splits a seeded sample of `max_clips` of them is plotted, and the report says so.
"""
from __future__ import annotations

import base64
import io
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.status import FAILED_PERMANENT, FAILED_TRANSIENT, OK, PENDING
from shards.sample_format import FLAC_MEMBER, JSON_MEMBER, decode_flac, decode_json
from shards.writer import split_samples


@dataclass
class ReportFiles:
    markdown: Path
    plots: dict[str, Path]        # name -> PNG
    clips_measured: int


def rms_dbfs(waveform: np.ndarray) -> float:
    """RMS level of an int16 waveform in dB relative to full scale (a full-scale square wave is 0 dBFS)."""
    if waveform.size == 0:
        raise ValueError("rms_dbfs: empty waveform")
    x = waveform.astype(np.float64) / 32768.0
    rms = math.sqrt(float(np.mean(x * x)))
    return 20.0 * math.log10(rms) if rms > 0 else -120.0   # digital silence: a floor, not -inf


def measure_clips(out: Path, split: str, keys: list[str], max_clips: int = 2000,
                  seed: int = 0) -> tuple[list[float], list[float]]:
    """(durations in s, loudness in dBFS) of the samples of `keys` (a seeded sample of max_clips); only their
    json and flac members are read."""
    keys = sorted(keys)
    if len(keys) > max_clips:
        keys = sorted(random.Random(seed).sample(keys, max_clips))
    durations, loudness = [], []
    samples = split_samples(out, split)
    for key in keys:
        members = samples.members(key, {JSON_MEMBER, FLAC_MEMBER})
        durations.append(float(decode_json(members[JSON_MEMBER], f"sample {key}: {JSON_MEMBER}")["duration"]))
        wav, _sr = decode_flac(members[FLAC_MEMBER], f"sample {key}: {FLAC_MEMBER}")
        loudness.append(rms_dbfs(np.asarray(wav)))
    return durations, loudness


def stats_table(result) -> list[dict]:
    """Rows of the table artifact: one per status, failure reason and stage."""
    rows = [{"section": "status", "name": s, "clips": n, "seconds": "", "clips_per_s": ""}
            for s, n in result.counts.items()]
    rows += [{"section": "failure reason", "name": r, "clips": n, "seconds": "", "clips_per_s": ""}
             for r, n in result.reasons.items()]
    rows += [{"section": "stage", "name": name, "clips": st.clips, "seconds": round(st.seconds, 2),
              "clips_per_s": round(st.clips_per_s, 3)} for name, st in result.stages.items()]
    ch = result.changes
    rows += [{"section": "changes", "name": k, "clips": len(ch[k]), "seconds": "", "clips_per_s": ""}
             for k in ("added", "removed", "retried", "new_rows", "dropped_rows")]
    return rows


def _plots(durations: list[float], loudness: list[float], reasons: dict[str, int], split: str) -> dict[str, bytes]:
    import matplotlib
    matplotlib.use("Agg")   # files only: no display on build machines
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    def png(fig) -> bytes:
        for ax in fig.axes:    # counts of clips: whole numbers on the count axis
            (ax.xaxis if ax.get_xlabel() == "clips" else ax.yaxis).set_major_locator(MaxNLocator(integer=True))
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})
        plt.close(fig)
        return buf.getvalue()

    out = {}
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.hist(durations, bins=np.arange(0, 10.75, 0.25), color="#4477aa", edgecolor="white")
    ax.set(title=f"{split}: clip durations ({len(durations)} clips)", xlabel="duration (s)", ylabel="clips",
           xlim=(0, 10.5))
    out["durations"] = png(fig)

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.hist(loudness, bins=np.arange(-90, 1, 3), color="#228833", edgecolor="white")
    ax.set(title=f"{split}: loudness ({len(loudness)} clips)", xlabel="RMS level (dBFS)", ylabel="clips")
    out["loudness"] = png(fig)

    fig, ax = plt.subplots(figsize=(6, max(1.6, 0.45 * len(reasons) + 1.0)))
    if reasons:
        names = list(reasons)[::-1]
        ax.barh(names, [reasons[n] for n in names], color="#cc6677")
        for i, n in enumerate(names):
            ax.text(reasons[n], i, f" {reasons[n]}", va="center")
        ax.set(xlabel="clips")
    else:
        ax.text(0.5, 0.5, "no failures", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    ax.set_title(f"{split}: failure reasons (status/reason)")
    out["failures"] = png(fig)
    return out


def _markdown(result, rows: list[dict], measured: int, images: dict[str, str]) -> str:
    c = result.counts
    lines = [f"# Build of split `{result.split}`", "",
             f"- output: `{result.out}`; manifest `{result.manifest_path}`",
             f"- {result.total} clips: {c[OK]} ok, {c[FAILED_PERMANENT]} failed permanently, "
             f"{c[FAILED_TRANSIENT]} failed transiently, {c[PENDING]} pending "
             f"(failure rate {100 * result.failure_rate:.1f}%); {len(result.shards)} shards",
             f"- this run: {len(result.changes['added'])} samples added, {len(result.changes['removed'])} removed, "
             f"{len(result.changes['retried'])} clips retried, {len(result.changes['shards_written'])} shards "
             f"written, in {result.seconds:.1f} s", ""]
    for section in ("status", "failure reason", "stage", "changes"):
        part = [r for r in rows if r["section"] == section]
        if not part:
            continue
        if section == "stage":
            lines += ["| stage | clips | seconds | clips/s |", "|---|---:|---:|---:|"]
            lines += [f"| {r['name']} | {r['clips']} | {r['seconds']} | {r['clips_per_s']} |" for r in part]
        else:
            lines += [f"| {section} | clips |", "|---|---:|"]
            lines += [f"| {r['name']} | {r['clips']} |" for r in part]
        lines.append("")
    note = f"{measured} of {c[OK]} ok clips measured" + (" (a seeded sample)" if measured < c[OK] else "")
    lines += [f"## Plots ({note})", ""]
    lines += [f"![{name}]({src})" for name, src in images.items()]
    return "\n".join(lines) + "\n"


def artifact_key(split: str, what: str) -> str:
    # Prefect artifact keys: lowercase letters, digits and dashes only.
    return re.sub(r"[^a-z0-9-]+", "-", f"avcap-build-{split.lower()}-{what}")


def build_report(result, artifacts: bool = True, max_clips: int = 2000) -> ReportFiles:
    """Write DIR/reports/build-<split>.md and its PNGs from a pipeline.build.BuildResult; with `artifacts`,
    also the Prefect table and markdown artifacts (call inside a flow or task run)."""
    out = Path(result.out)
    reports = out / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    durations, loudness = measure_clips(out, result.split, result.ok_keys, max_clips)
    pngs = _plots(durations, loudness, result.reasons, result.split)
    paths = {}
    for name, data in pngs.items():
        paths[name] = reports / f"build-{result.split}-{name}.png"
        paths[name].write_bytes(data)
    rows = stats_table(result)
    md_path = reports / f"build-{result.split}.md"
    md_path.write_text(_markdown(result, rows, len(durations), {n: p.name for n, p in paths.items()}))
    if artifacts:
        from prefect.artifacts import create_markdown_artifact, create_table_artifact
        create_table_artifact(table=rows, key=artifact_key(result.split, "stats"),
                              description=f"Build statistics of split {result.split} in {out}")
        inline = {n: "data:image/png;base64," + base64.b64encode(d).decode("ascii") for n, d in pngs.items()}
        create_markdown_artifact(markdown=_markdown(result, rows, len(durations), inline),
                                 key=artifact_key(result.split, "report"),
                                 description=f"Build report of split {result.split}: {md_path}")
    return ReportFiles(md_path, paths, len(durations))
