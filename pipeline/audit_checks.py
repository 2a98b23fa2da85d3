"""The checks of the reproducibility audit of a finished build (DIR/manifest.json + DIR/shards + DIR/media), and
`run_audit`, which runs them all into a pipeline.audit_report.AuditReport.

Checks, each reported by name with the file or clip it concerns:
- `shard-sha256`, `shard-size`, `shard-samples`, `shard-missing`: every shard against the manifest.
- `index-sha256`, `index-size`, `index-missing`: every shard's member index sidecar (manifest format 2) against
  the manifest (the loader trusts the offsets in it, so a changed index must not go unnoticed).
- `fbank`: the fbank of sampled clips recomputed from their stored flac with the manifest's fbank config.
  Bitwise when the platform and tool versions recorded in the manifest match this machine (same code, same
  libraries: any difference is a real change); otherwise within `fbank_tolerance`, and the report says which
  comparison was made. The default 0.02 is about two float16 steps at the fbank's magnitudes (a step is 0.0078
  for |x| in [8, 16)): another FFT/BLAS build moves the float32 result by far less than a step, so a stored value
  can flip by one step, while a changed fbank parameter moves values by whole units.
- `waveform`, `frame`, `frame-count`, `media`, `extract`: sampled clips re-extracted from DIR/media with the
  manifest's extract config, waveform and per-frame hashes compared with the stored sample.
- `tool-version`: the versions that decide a sample's content, recorded in the manifest against this machine's:
  the OS and CPU architecture (taken from the recorded platform string), python, numpy, torch, torchaudio
  and ffmpeg (REPRODUCIBILITY_TOOLS). A difference there is a mismatch: the build is not reproducible here as
  recorded. Everything else (the kernel release and libc in the platform string, yt-dlp, webdataset, pillow,
  soundfile, ...) is compared too and named in the report's notes as information, not as a mismatch: an audit
  on another host of the same OS and architecture must not fail because its kernel is newer.

Shards are read as the loader reads an unindexed shard: tar headers through shards.index.scan_tar (every key
and member; the member index sidecar is only checked here, never trusted), members through
shards.readers.TarSampleReader, decoded by the codecs of shards.sample_format. The report is written to
DIR/audit/audit-<UTC timestamp>.json.
"""
from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pipeline.audit_report import AuditConfig, AuditError, AuditReport, Mismatch
from pipeline.clip_list import Clip
from pipeline.download import find_local_media
from pipeline.extract import ExtractConfig, ExtractError, extract_clip
from pipeline.features import FbankConfig, compute_fbank
from shards.atomic import atomic_write_text
from shards.hashing import bytes_sha256, file_sha256
from shards.index import ShardError, ShardIndex, scan_tar
from shards.manifest import fingerprint, load_dataset_manifest, tool_versions
from shards.readers import TarSampleReader
from shards.sample_format import (FBANK_MEMBER, FLAC_MEMBER, JSON_MEMBER, decode_flac, decode_json, decode_npy,
                                  frame_members)


def _config_from(cls, recorded: dict, where: str):
    """The config dataclass `cls` with the manifest's recorded values. Recorded keys that are not fields
    (descriptive ones such as extract's "resize") are checked by the caller through fingerprint_parts()."""
    names = {f.name for f in dataclasses.fields(cls)}
    try:
        return cls(**{k: v for k, v in recorded.items() if k in names})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: recorded {cls.__name__} is not valid here: {e}") from e


def _diff_dicts(recorded: dict, here: dict) -> list[str]:
    keys = sorted(set(recorded) | set(here))
    return [f"{k}: manifest {recorded.get(k, '(absent)')!r}, here {here.get(k, '(absent)')!r}"
            for k in keys if recorded.get(k, "(absent)") != here.get(k, "(absent)")]


# Versions that decide a sample's content (see the module doc); "os" and "arch" come from the platform string.
REPRODUCIBILITY_TOOLS = ("os", "arch", "python", "numpy", "torch", "torchaudio", "ffmpeg")
# The subset that decides whether a recomputed fbank must be bitwise identical: the same Python/numpy/torch
# build on the same OS and CPU architecture runs the same kernels.
BITWISE_TOOLS = ("os", "arch", "python", "numpy", "torch", "torchaudio")
_ARCHES = {"x86_64", "amd64", "i386", "i486", "i586", "i686", "aarch64", "arm64", "armv7l", "armv6l", "ppc64le",
           "ppc64", "s390x", "riscv64"}


def platform_parts(platform_string: str) -> dict[str, str]:
    """{"os", "arch"} of a `platform.platform()` string, e.g. "Linux-6.1.0-18-amd64-x86_64-with-glibc2.36" ->
    os "Linux", arch "x86_64" (the last architecture name before "-with-": a kernel flavour such as "amd64"
    may come earlier). "unknown" when the string names none."""
    head = platform_string.split("-with-")[0]
    tokens = head.split("-")
    arches = [t for t in tokens if t.lower() in _ARCHES]
    return {"os": tokens[0] if tokens and tokens[0] else "unknown", "arch": arches[-1] if arches else "unknown"}


def essential_versions(versions: dict) -> dict[str, str]:
    """The REPRODUCIBILITY_TOOLS entries of a tool_versions() dict."""
    out = platform_parts(str(versions.get("platform", "")))
    out.update({t: versions.get(t, "(not recorded)") for t in REPRODUCIBILITY_TOOLS if t not in out})
    return out


@dataclass
class SplitPlan:
    """How one split's sampled clips are re-checked: with its recorded configs, bitwise or within tolerance."""
    split: str
    extract_cfg: ExtractConfig
    fbank_cfg: FbankConfig
    bitwise: bool
    media_dir: Path | None = None     # the build's --media-dir, when it read media from the user's directory


def _rel(path: Path, out: Path) -> str:
    try:
        return path.relative_to(out).as_posix()
    except ValueError:
        return str(path)


# ------------------------------------------------------------------------------------------------ checks

def check_shards(out: Path, split, report: AuditReport) -> dict[str, ShardIndex]:
    """sha256, size and sample count of every shard of one split. Returns, by shard path, what the tar headers
    of each readable shard say (shards.index.scan_tar: its keys and members), for reading sampled clips."""
    scanned: dict[str, ShardIndex] = {}
    for s in split.shards:
        path = out / s.path
        sha256 = _check_file(report, "shard", out, s)
        if sha256 is None:
            continue
        report.shards_checked += 1
        try:
            headers = scan_tar(path, sha256)
        except (ValueError, OSError, EOFError) as e:   # scan_tar names the shard and what is wrong
            report.mismatches.append(Mismatch("shard-samples", s.path, f"not a readable shard: {e}"))
            continue
        report.samples_counted += len(headers)
        if len(headers) != s.num_samples:
            report.mismatches.append(Mismatch("shard-samples", s.path,
                                              f"holds {len(headers)} samples, manifest says {s.num_samples}"))
        scanned[s.path] = headers
        if s.index is not None:
            check_index(out, s.index, report)
    return scanned


def check_index(out: Path, index, report: AuditReport) -> None:
    """Size and sha256 of one member index sidecar (a shards.file_entry.FileEntry) against the manifest."""
    _check_file(report, "index", out, index)


def _check_file(report: AuditReport, kind: str, out: Path, entry) -> str | None:
    """A file the manifest vouches for (path, bytes, sha256): `{kind}-missing/-size/-sha256` mismatches.
    Returns the file's sha256, or None when it does not exist, so callers can go on to read it."""
    path = out / entry.path
    if not path.is_file():
        report.mismatches.append(Mismatch(f"{kind}-missing", entry.path, "listed in the manifest but not on disk"))
        return None
    size = path.stat().st_size
    if size != entry.bytes:
        report.mismatches.append(Mismatch(f"{kind}-size", entry.path, f"{size} bytes, manifest says {entry.bytes}"))
    got = file_sha256(path)
    if got != entry.sha256:
        report.mismatches.append(Mismatch(f"{kind}-sha256", entry.path,
                                          f"sha256 {got} does not match manifest {entry.sha256}"))
    return got


def read_samples(path: Path, headers: ShardIndex, wanted: set[str]) -> dict[str, dict[str, bytes]]:
    """key -> {member: bytes}, every member of each wanted key of the shard at `path` (`headers`: its scan_tar),
    through the loader's header-parsing reader."""
    every = set(headers.members)
    samples: dict[str, dict[str, bytes]] = {}
    reader = TarSampleReader(str(path))
    try:
        for key, members in reader.samples(lambda k: every if k in wanted else None):
            if members is not None:
                samples[key] = {m: bytes(b) for m, b in members.items()}
    finally:
        reader.close()
    return samples


def check_tool_versions(split_name: str, recorded: dict, here: dict, report: AuditReport) -> None:
    """Differences in REPRODUCIBILITY_TOOLS are mismatches; any other difference is a note (information)."""
    rec, now = essential_versions(recorded), essential_versions(here)
    for name in REPRODUCIBILITY_TOOLS:
        if rec[name] != now[name]:
            report.mismatches.append(Mismatch("tool-version", name,
                                              f"split {split_name}: manifest {rec[name]!r}, here {now[name]!r}"))
    for name in sorted(set(recorded) | set(here)):
        a, b = recorded.get(name, "(not recorded)"), here.get(name, "(unknown here)")
        if a != b and name not in REPRODUCIBILITY_TOOLS:
            report.notes.append(f"info, not a mismatch: split {split_name}: {name} differs (manifest {a!r}, "
                                f"here {b!r}); it does not decide sample content")


def check_fbank(key: str, sample: dict[str, bytes], plan: SplitPlan, tol: float, report: AuditReport) -> None:
    """Recompute the fbank from the stored flac with the manifest's fbank config and compare."""
    if FLAC_MEMBER not in sample or FBANK_MEMBER not in sample:
        missing = [m for m in (FLAC_MEMBER, FBANK_MEMBER) if m not in sample]
        report.mismatches.append(Mismatch("sample-members", key, f"sample lacks {missing}"))
        return
    try:
        wav, _sr = decode_flac(sample[FLAC_MEMBER], f"stored {key}.{FLAC_MEMBER}")
        stored = decode_npy(sample[FBANK_MEMBER], f"stored {key}.{FBANK_MEMBER}")
        fresh = compute_fbank(wav, plan.fbank_cfg)
    except ValueError as e:
        report.mismatches.append(Mismatch("fbank", f"{key}.{FBANK_MEMBER}", str(e)))
        return
    if stored.shape != fresh.shape or stored.dtype != fresh.dtype:
        report.mismatches.append(Mismatch("fbank", f"{key}.{FBANK_MEMBER}",
                                          f"stored {stored.dtype}{list(stored.shape)}, recomputed with the "
                                          f"manifest's fbank config {fresh.dtype}{list(fresh.shape)}"))
        return
    diff = np.abs(stored.astype(np.float32) - fresh.astype(np.float32))
    max_diff = float(np.nanmax(diff)) if diff.size else 0.0
    if plan.bitwise:
        if stored.tobytes() != fresh.tobytes():
            n = int(np.count_nonzero(stored.view(np.uint16) != fresh.view(np.uint16)))
            report.mismatches.append(Mismatch("fbank", f"{key}.{FBANK_MEMBER}",
                                              f"not bitwise equal to the fbank recomputed from the stored flac: "
                                              f"{n} values differ, max abs diff {max_diff:.4g}"))
    elif not max_diff <= tol:
        report.mismatches.append(Mismatch("fbank", f"{key}.{FBANK_MEMBER}",
                                          f"recomputed fbank differs by up to {max_diff:.4g} (tolerance {tol:g})"))


def locate_media(out: Path, meta: dict, media_dir: Path | None) -> tuple[Path, float] | None:
    """Where the build read the clip from, and where its window starts in that file, by the build's own rule
    (pipeline.download.find_local_media): the user's --media-dir (recorded in the manifest config) first, then
    DIR/media/{key}.* that the downloader leaves (the window cut out: starts at 0)."""
    if "youtube_id" in meta and "start_time" in meta:
        clip = Clip(youtube_id=meta["youtube_id"], start_time=int(meta["start_time"]))
        for d in ([media_dir] if media_dir is not None else []) + [out / "media"]:
            found = find_local_media(clip, d)
            if found is not None:
                return found.path, found.offset
        return None
    hits = sorted(p for p in (out / "media").glob(f"{meta['key']}.*") if p.is_file() and not p.name.startswith("."))
    return (hits[0], 0.0) if hits else None


def check_reextract(out: Path, key: str, sample: dict[str, bytes], plan: SplitPlan, report: AuditReport) -> None:
    """Re-extract the clip from DIR/media/{key}.* and compare waveform and frame hashes with the stored sample."""
    try:
        meta = decode_json(sample[JSON_MEMBER], f"stored {key}.{JSON_MEMBER}") if JSON_MEMBER in sample else {}
    except ValueError as e:
        report.mismatches.append(Mismatch("sample-members", f"{key}.{JSON_MEMBER}", str(e)))
        return
    meta.setdefault("key", key)
    located = locate_media(out, meta, plan.media_dir)
    if located is None:
        where = f"{out / 'media' / key}.*" + (f" or {plan.media_dir}" if plan.media_dir else "")
        report.mismatches.append(Mismatch("media", key, f"no cached media ({where}) to re-extract from"))
        return
    media, start = located
    recorded = meta.get("media_offset")
    if recorded is not None and float(recorded) != start:
        # The name of the media file now says another window than the one the sample was cut from.
        report.mismatches.append(Mismatch("media-offset", key, f"the sample was cut at {float(recorded):g} s "
                                          f"of its media, but {media.name} gives {start:g} s by its name"))
    if meta.get("media_sha256") and file_sha256(media) != meta["media_sha256"]:
        report.mismatches.append(Mismatch("media", _rel(media, out),
                                          "sha256 differs from the sample's media_sha256: the cached media changed"))
    try:
        ex = extract_clip(media, start, plan.extract_cfg, duration=10.0)
    except ExtractError as e:
        report.mismatches.append(Mismatch("extract", key, f"re-extraction failed: {e}"))
        return
    if FLAC_MEMBER in sample:
        try:
            stored, _sr = decode_flac(sample[FLAC_MEMBER], f"stored {key}.{FLAC_MEMBER}")
        except ValueError as e:
            report.mismatches.append(Mismatch("waveform", f"{key}.{FLAC_MEMBER}", str(e)))
        else:
            if bytes_sha256(stored.tobytes()) != bytes_sha256(ex.waveform.tobytes()):
                detail = f"{len(stored)} stored samples vs {len(ex.waveform)} re-extracted"
                if len(stored) == len(ex.waveform):
                    d = np.abs(stored.astype(np.int32) - ex.waveform.astype(np.int32))
                    detail = f"{int(np.count_nonzero(d))} of {len(d)} samples differ, max abs diff {int(d.max())}"
                report.mismatches.append(Mismatch("waveform", f"{key}.{FLAC_MEMBER}",
                                                  f"waveform hash differs from re-extraction: {detail}"))
    stored_frames = frame_members(sample)
    if len(stored_frames) != len(ex.frames):
        report.mismatches.append(Mismatch("frame-count", key, f"{len(stored_frames)} stored frames, "
                                                              f"{len(ex.frames)} re-extracted"))
    fresh = {bytes_sha256(b): i for i, b in reversed(list(enumerate(ex.frames)))}
    for i, name in enumerate(stored_frames[: len(ex.frames)]):
        h = bytes_sha256(sample[name])
        if h == bytes_sha256(ex.frames[i]):
            continue
        j = fresh.get(h)
        hint = f"; it is re-extracted frame {j:02d} (frames out of order)" if j is not None else ""
        report.mismatches.append(Mismatch("frame", f"{key}.{name}",
                                          f"hash differs from re-extracted frame {i:02d}{hint}"))


def check_config(split_name: str, part: str, recorded: dict, cfg, report: AuditReport) -> None:
    """The recorded fingerprint part against what this code's config would record for the same values."""
    for d in _diff_dicts(recorded, cfg.fingerprint_parts()):
        report.mismatches.append(Mismatch("config", f"{split_name}.{part}", d))


def check_shared(manifest, split_name: str, parts: dict, report: AuditReport) -> None:
    """The dataset-wide copies the loader reads (manifest.fbank, manifest.frames_per_clip) against the split's
    recorded parameters: a loader must not be told other settings than the samples were made with."""
    if manifest.fbank is not None:
        for d in _diff_dicts(parts.get("fbank", {}), manifest.fbank):
            report.mismatches.append(Mismatch("config", "manifest.fbank", f"split {split_name}: {d}"))
    frames = parts.get("extract", {}).get("frames")
    if manifest.frames_per_clip is not None and manifest.frames_per_clip != frames:
        report.mismatches.append(Mismatch("config", "manifest.frames_per_clip",
                                          f"split {split_name}: manifest {manifest.frames_per_clip}, "
                                          f"split recorded {frames}"))


# ------------------------------------------------------------------------------------------------ driver

def sample_clips(keys: list[str], sample: int, seed: int) -> list[str]:
    """`sample` keys (all when -1) chosen by `seed`, independent of the order keys were found in; sorted."""
    keys = sorted(set(keys))
    n = len(keys) if sample < 0 else min(sample, len(keys))
    return sorted(random.Random(seed).sample(keys, n))


def run_audit(cfg: AuditConfig) -> AuditReport:
    """Audit the build in cfg.out_dir; write DIR/audit/audit-<timestamp>.json and return the report."""
    out = cfg.out_dir
    if not (out / "manifest.json").is_file():
        raise AuditError(f"{out}: no manifest.json; audit needs a finished build (--out DIR)")
    try:
        manifest = load_dataset_manifest(out)
    except ValueError as e:
        raise AuditError(str(e)) from e

    started = datetime.now(timezone.utc)
    report = AuditReport(out_dir=str(out), started_at=started.isoformat(timespec="seconds"))
    here = tool_versions()
    report.tool_versions_here = here

    plans: dict[str, SplitPlan] = {}
    key_shard: dict[str, tuple[str, str]] = {}  # key -> (split, shard path)
    scanned: dict[str, ShardIndex] = {}         # shard path -> its tar headers (check_shards)
    comparisons: set[str] = set()
    for name, split in manifest.splits.items():
        report.tool_versions_manifest[name] = dict(split.tool_versions)
        check_tool_versions(name, split.tool_versions, here, report)
        parts = split.fingerprint_parts
        if fingerprint(parts) != split.fingerprint:
            report.mismatches.append(Mismatch("fingerprint", name, "recorded fingerprint is not the sha256 of the "
                                                                  "recorded fingerprint_parts: the manifest was edited"))
        try:
            extract_cfg = _config_from(ExtractConfig, parts.get("extract", {}), f"split {name} extract")
            fbank_cfg = _config_from(FbankConfig, parts.get("fbank", {}), f"split {name} fbank")
        except ValueError as e:
            report.mismatches.append(Mismatch("config", name, str(e)))
            continue
        check_config(name, "extract", parts.get("extract", {}), extract_cfg, report)
        check_config(name, "fbank", parts.get("fbank", {}), fbank_cfg, report)
        check_shared(manifest, name, parts, report)
        rec, now = essential_versions(split.tool_versions), essential_versions(here)
        same_platform = all(rec[t] == now[t] for t in BITWISE_TOOLS)
        media_dir = split.config.get("media_dir") if isinstance(split.config, dict) else None
        plans[name] = SplitPlan(name, extract_cfg, fbank_cfg, bitwise=same_platform,
                                 media_dir=Path(media_dir) if media_dir else None)
        if same_platform:
            comparisons.add(f"split {name}: bitwise ({', '.join(BITWISE_TOOLS)} match the manifest)")
        else:
            differ = [t for t in BITWISE_TOOLS if rec[t] != now[t]]
            comparisons.add(f"split {name}: within tolerance {cfg.fbank_tolerance:g} (differs from the manifest: "
                            f"{', '.join(differ)})")
        for shard, headers in check_shards(out, split, report).items():
            scanned[shard] = headers
            for k in headers.keys:
                if k in key_shard:
                    report.mismatches.append(Mismatch("shard-samples", shard, f"sample {k} is also in "
                                                                              f"{key_shard[k][1]}"))
                key_shard[k] = (name, shard)
    report.fbank_comparison = "; ".join(sorted(comparisons))

    if cfg.sample == 0:
        report.notes.append("sample=0: fbank recompute and re-extraction skipped; shards and tool versions checked")
    chosen = sample_clips([k for k, (split, _) in key_shard.items() if split in plans], cfg.sample, cfg.seed)
    report.clips_sampled = chosen
    by_shard: dict[str, set[str]] = {}
    for k in chosen:
        by_shard.setdefault(key_shard[k][1], set()).add(k)
    for shard, wanted in sorted(by_shard.items()):
        try:
            samples = read_samples(out / shard, scanned[shard], wanted)
        except (ShardError, OSError) as e:
            report.mismatches.append(Mismatch("shard-samples", shard, f"cannot read sampled clips: {e}"))
            continue
        for key in sorted(wanted):
            plan = plans[key_shard[key][0]]
            check_fbank(key, samples[key], plan, cfg.fbank_tolerance, report)
            check_reextract(out, key, samples[key], plan, report)

    report.finished_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    audit_dir = out / "audit"
    audit_dir.mkdir(exist_ok=True)
    path = audit_dir / f"audit-{started.strftime('%Y%m%dT%H%M%S%fZ')}.json"
    report.report_path = str(path)
    atomic_write_text(path, json.dumps(report.to_json(), indent=2) + "\n")
    return report
