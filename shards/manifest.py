"""Stage 7, Dataset manifest: `DIR/manifest.json` says what was built, from what, with which tools.

One file per output directory; one entry per split under `splits` (building another split into the same DIR adds
or replaces only that split's entry). Written atomically (temp file, fsync, rename) under a lock file, so two
splits built at once into one DIR do not lose each other's entry.

Schema (format_version 2); every field is always present:

    {
      "format_version": 2,
      "frames_per_clip": 20,            # copies of fingerprint_parts.extract.frames / .fbank, present while all
      "fbank": {...},                   # splits agree, else null
      "splits": {
        "<split>": {
          "split": "train",
          "updated_at": "2026-01-01T00:00:00+00:00",       # UTC, when this entry was written
          "config": {...},              # every build parameter; secrets redacted: credentials inside URLs
                                        # (proxy "http://user:pw@host" -> "http://***@host") and values of
                                        # keys named like password/token/secret become "***"; the cookies
                                        # file PATH is kept, its content never read here
          "fingerprint": "<sha256>",    # sha256 of the canonical JSON of fingerprint_parts
          "fingerprint_parts": {        # everything that changes the bytes of a sample, and that the loader and
            "sample_format": 1,         # the model must agree with:
            "extract": {"sample_rate", "frames", "size", "jpeg_quality", "jpeg_subsampling", "downmix",
                        "frame_times", "min_duration_s", "resize"},
            "fbank": {all FbankConfig fields: sample_frequency, num_mel_bins, frame_length, frame_shift,
                      window_type, htk_compat, use_energy, dither, preemphasis_coefficient, remove_dc_offset,
                      round_to_power_of_two, low_freq, high_freq, snip_edges, subtract_mean, target_length, dtype}
          },
          "tool_versions": {"python", "platform", "torch", "torchaudio", "ffmpeg", "yt-dlp", "webdataset",
                            "pillow", "numpy", "soundfile", "libsndfile", "ffmpeg-python"},
          "inputs": [{"path": "...", "sha256": "...", "bytes": 123}],     # the CSV/JSON files read
          "samples_per_shard": 256,     # the setting at the split's first build
          "num_shards": 4,              # fixed at the split's first build; later builds reuse it
          "num_samples": 1000,          # samples in the shards (= counts["ok"] after a full build)
          "shards": [{"path": "shards/train/train-00000.tar", "sha256": "...", "bytes": 1, "num_samples": 1,
                      "index": {"path": "shards/train/train-00000.idx.json", "sha256": "...", "bytes": 1}}],
          "counts": {"ok": 1000, "failed-permanent": 3, "failed-transient": 0, "pending": 0},
          "failures": [{"key": "...", "status": "failed-permanent", "reason": "unavailable", "message": "..."}],
          "norm_stats": {"mean": -4.3, "std": 4.3, "count": 1234, "over": "real-frames"},  # or null
          "changes": {"added": 0, "removed": 0, "retried": 0,   # samples vs the shards before this build
                      "updated": 0,                              # samples given new captions (json only)
                      "shards_written": ["shards/train/train-00003.tar"], "shards_unchanged": 3,
                      "shards_removed": []}
        }
      }
    }

Versions: 2 added each shard's member index sidecar (`index`, see shards.index; null when a shard has none), so
the loader reads only the members it uses. Version 1 manifests (no `index`) are still read: their shards load
by header parsing. Writing an entry into a version 1 manifest rewrites the file as version 2 (its older splits
keep `index: null` until rebuilt).

`norm_stats` is the mean/std of fbank values over the real (unpadded) frames of every sample of the split (the
fbank as stored: float16); padding rows are excluded because their amount depends on clip lengths, not audio.
The loader normalizes with the train split's pair only when told to (its default is the AudioCaps pair from
docs/original.md, for checkpoint compatibility).
"""
from __future__ import annotations

import fcntl
import importlib.metadata
import json
import platform
import posixpath
import re
import shlex
import subprocess
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlparse, uses_relative

import soundfile

from pipeline.status import COUNTED
from shards.atomic import atomic_write_bytes
from shards.file_entry import FileEntry, ShardEntry
from shards.hashing import bytes_sha256
from shards.tls import certificate_failure, fsspec_tls_options
from shards.writer import ShardBuildResult, num_shards_for, validate_split

FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)   # 1: shards without a member index
SAMPLE_FORMAT_VERSION = 1   # bump when the member layout of a sample changes
MANIFEST_NAME = "manifest.json"
_SECRET_KEY_RE = re.compile(r"pass(word)?|secret|token|api[_-]?key|credential|auth", re.IGNORECASE)
_URL_USERINFO_RE = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^@/\s]+)@")
# KEY=VALUE inside a string whose KEY looks secret, e.g. yt-dlp's --extractor-args "youtube:po_token=web.gvs+T".
_KV_SECRET_RE = re.compile(r"(?P<key>[\w-]*(?:pass(?:word)?|secret|token|api[_-]?key|credential|auth|visitor_data)"
                           r"[\w-]*)=(?P<value>[^;&\s]+)", re.IGNORECASE)


@dataclass
class Failure:
    key: str
    status: str
    reason: str
    message: str


@dataclass
class NormStats:
    mean: float
    std: float
    count: int
    over: str = "real-frames"


@dataclass
class Changes:
    added: int = 0
    removed: int = 0
    retried: int = 0
    updated: int = 0       # samples whose json changed (new captions / audiocap_ids), same audio and frames
    shards_written: list[str] = field(default_factory=list)
    shards_unchanged: int = 0
    shards_removed: list[str] = field(default_factory=list)


@dataclass
class SplitManifest:
    split: str
    config: dict
    fingerprint: str
    fingerprint_parts: dict
    tool_versions: dict
    inputs: list[FileEntry]
    samples_per_shard: int
    num_shards: int
    num_samples: int
    shards: list[ShardEntry]
    counts: dict[str, int]
    failures: list[Failure]
    norm_stats: NormStats | None
    changes: Changes
    updated_at: str = ""

    @classmethod
    def from_dict(cls, d: dict, where: str = "manifest") -> "SplitManifest":
        names = {f.name for f in fields(cls)}
        missing = names - set(d)
        if missing:
            raise ValueError(f"{where}: split entry lacks fields {sorted(missing)}")
        d = {k: d[k] for k in names}
        d["inputs"] = [FileEntry.from_dict(x, f"{where} input #{i}") for i, x in enumerate(d["inputs"])]
        d["shards"] = [ShardEntry.from_dict(x, f"{where} shard #{i}") for i, x in enumerate(d["shards"])]
        d["failures"] = [Failure(**x) for x in d["failures"]]
        d["norm_stats"] = NormStats(**d["norm_stats"]) if d["norm_stats"] is not None else None
        d["changes"] = Changes(**d["changes"])
        return cls(**d)


@dataclass
class DatasetManifest:
    format_version: int = FORMAT_VERSION
    splits: dict[str, SplitManifest] = field(default_factory=dict)
    # Dataset-wide copies of what the loader needs, present while every split agrees (else null: read the
    # split's fingerprint_parts).
    frames_per_clip: int | None = None
    fbank: dict | None = None

    def refresh_shared(self) -> None:
        frames = {s.fingerprint_parts["extract"]["frames"] for s in self.splits.values()}
        fbanks = {json.dumps(s.fingerprint_parts["fbank"], sort_keys=True) for s in self.splits.values()}
        self.frames_per_clip = frames.pop() if len(frames) == 1 else None
        self.fbank = json.loads(fbanks.pop()) if len(fbanks) == 1 else None

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")

    @classmethod
    def from_dict(cls, d: Any, where: str = "manifest") -> "DatasetManifest":
        check_manifest(d, where)
        version = check_format_version(d, where)
        return cls(version, {name: SplitManifest.from_dict(s, f"{where} split {name!r}")
                             for name, s in d["splits"].items()},
                   frames_per_clip=d.get("frames_per_clip"), fbank=d.get("fbank"))


# ---------------------------------------------------------------- config parts

def redact(obj: Any) -> Any:
    """Copy of a config with secrets removed: URL credentials and values of secret-looking keys."""
    if isinstance(obj, dict):
        return {k: ("***" if _SECRET_KEY_RE.search(str(k)) and obj[k] not in (None, "") else redact(v))
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        obj = _URL_USERINFO_RE.sub(lambda m: f"{m.group('scheme')}***@", obj)
        return _KV_SECRET_RE.sub(lambda m: f"{m.group('key')}=***", obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def fingerprint_parts(extract_cfg, fbank_cfg) -> dict:
    """What changes sample bytes, from an ExtractConfig and a FbankConfig."""
    return {"sample_format": SAMPLE_FORMAT_VERSION, "extract": extract_cfg.fingerprint_parts(),
            "fbank": fbank_cfg.fingerprint_parts()}


def fingerprint(parts: dict) -> str:
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return bytes_sha256(canonical.encode("ascii"))


def _pkg_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not-installed"


def ffmpeg_version(ffmpeg_bin: str = "ffmpeg") -> str:
    """'5.1.9-0+deb12u1' from the first line of `ffmpeg -version`."""
    try:
        out = subprocess.run([ffmpeg_bin, "-version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"cannot run {ffmpeg_bin!r} -version: {e}") from e
    m = re.match(r"\S+ version (\S+)", out)
    return m.group(1) if m else out.splitlines()[0] if out else "unknown"


def tool_versions(ffmpeg_bin: str = "ffmpeg") -> dict:
    return {"python": platform.python_version(), "platform": platform.platform(),
            "torch": _pkg_version("torch"), "torchaudio": _pkg_version("torchaudio"),
            "ffmpeg": ffmpeg_version(ffmpeg_bin), "yt-dlp": _pkg_version("yt-dlp"),
            "webdataset": _pkg_version("webdataset"), "pillow": _pkg_version("pillow"),
            "numpy": _pkg_version("numpy"), "soundfile": _pkg_version("soundfile"),
            "libsndfile": soundfile.__libsndfile_version__, "ffmpeg-python": _pkg_version("ffmpeg-python")}


def _failure(x: Any) -> Failure:
    get = (lambda k: x.get(k)) if isinstance(x, dict) else (lambda k: getattr(x, k, None))
    return Failure(key=str(get("key")), status=str(get("status")), reason=str(get("reason") or ""),
                   message=str(get("message") or ""))


def make_split_manifest(*, split: str, config: dict, extract_cfg, fbank_cfg, inputs: list[Path],
                        samples_per_shard: int, num_shards: int, build: ShardBuildResult,
                        counts: dict[str, int], failures: list, changes: Changes | None = None,
                        ffmpeg_bin: str = "ffmpeg", extra_tools: dict | None = None) -> SplitManifest:
    """Assemble one split's entry from the build's parts (failures: dicts or objects with key/status/reason/
    message, e.g. the ledger's rows); `extra_tools` joins the tool versions (the download stage's JS runtime)."""
    validate_split(split)
    parts = fingerprint_parts(extract_cfg, fbank_cfg)
    # Added/removed samples come from the shards themselves; `retried` only the caller (the ledger) knows.
    changes = changes or Changes(added=len(build.added_keys), removed=len(build.removed_keys))
    changes.shards_written = list(build.written)
    changes.shards_unchanged = len(build.unchanged)
    changes.shards_removed = list(build.removed)
    stats = build.stats
    norm = NormStats(mean=stats.mean, std=stats.std, count=stats.count) if stats.count else None
    return SplitManifest(
        split=split, config=redact(config), fingerprint=fingerprint(parts), fingerprint_parts=parts,
        tool_versions=tool_versions(ffmpeg_bin) | dict(extra_tools or {}), inputs=[FileEntry.of_file(p) for p in inputs],
        samples_per_shard=samples_per_shard, num_shards=num_shards, num_samples=build.num_samples,
        shards=list(build.shards),
        counts={s: int(counts.get(s, 0)) for s in COUNTED} | {k: int(v) for k, v in counts.items()},
        failures=sorted((_failure(f) for f in failures), key=lambda f: f.key), norm_stats=norm, changes=changes,
        updated_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))


# ---------------------------------------------------------------- read / write

class ManifestError(ValueError):
    """A dataset manifest that cannot be used as it stands; the message names the file and the entry."""


def manifest_location(data: str | Path) -> str:
    """Where `--data` (a dataset directory, its manifest file, or a URL of either: anything with '://') keeps
    its manifest.json."""
    s = str(data)
    if s.endswith(".json"):
        return s
    return s.rstrip("/") + "/" + MANIFEST_NAME if "://" in s else str(Path(s) / MANIFEST_NAME)


_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")


def _path_problem(path: Any) -> str | None:
    """Why a manifest file path is not a plain relative path inside the dataset, or None.

    Checked on the percent-decoded text too: a server (or fsspec) decodes `%2e%2e` to `..` and `%2f` to `/`."""
    if not isinstance(path, str) or not path:
        return "is not a non-empty string"
    for text in (path, unquote(path)):
        if any(ord(c) < 32 for c in text):
            return "holds a control character"
        if "\\" in text:
            return "holds a backslash"
        if text.startswith(("/", "~")):
            return "is an absolute path"
        if _SCHEME_RE.match(text):
            return "is a URL or command (a scheme such as pipe: or http:); shards elsewhere are the user's " \
                   "choice: --shard-base"
        if ".." in text.split("/"):
            return "climbs out of the dataset directory ('..')"
    return None


def check_manifest(data: Any, location: str) -> dict:
    """The checks every reader of a dataset manifest relies on (the loader, the audit, publishing), on its JSON.

    A manifest is data from someone else: every shard and index path must be a relative path that stays under
    the manifest's own location (`_path_problem`), each file is listed once over all splits, and a split's
    `num_samples`, where recorded, is the sum over its shards. Returns `data`."""
    if not isinstance(data, dict):
        raise ManifestError(f"dataset manifest {location}: expected a JSON object, got {type(data).__name__}")
    splits = data.get("splits")
    if not isinstance(splits, dict):
        raise ManifestError(f"dataset manifest {location}: 'splits' must be an object")
    seen: dict[str, str] = {}
    for name, entry in splits.items():
        where = f"dataset manifest {location}: split {name!r}"
        shards = entry.get("shards") if isinstance(entry, dict) else None
        if not isinstance(shards, list):
            raise ManifestError(f"{where}: 'shards' must be a list")
        total = 0
        for i, s in enumerate(shards):
            if not isinstance(s, dict) or "path" not in s or "num_samples" not in s:
                raise ManifestError(f"{where} shard #{i} lacks path or num_samples: {s!r}")
            n = s["num_samples"]
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise ManifestError(f"{where} shard #{i} {s['path']!r}: num_samples {n!r} is not a count")
            total += n
            index = s.get("index")
            if index is not None and not (isinstance(index, dict) and "path" in index and "sha256" in index):
                raise ManifestError(f"{where} shard #{i} has a malformed index entry: {index!r}")
            files = [("shard", s["path"])] + ([("index", index["path"])] if index is not None else [])
            for kind, path in files:
                problem = _path_problem(path)
                if problem:
                    raise ManifestError(f"{where} {kind} #{i} {path!r} {problem}")
                same = posixpath.normpath(unquote(path))
                here = f"split {name!r} #{i}"
                if same in seen:
                    raise ManifestError(f"{where} {kind} #{i} {path!r} is listed twice ({seen[same]} and {here}): "
                                        f"each shard is read once")
                seen[same] = here
        recorded = entry.get("num_samples")
        if recorded is not None and recorded != total:
            raise ManifestError(f"dataset manifest {location}: split {name!r}: num_samples {recorded!r} is not the "
                                f"sum over its shards ({total})")
    return data


def check_format_version(data: dict, where: str) -> int:
    """The manifest's format_version, when this code reads it; else a `ManifestError` saying what to do."""
    version = data.get("format_version")
    if version not in READABLE_FORMAT_VERSIONS:
        raise ManifestError(f"{where}: format_version {version!r} is not supported (this code reads "
                            f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))}); rebuild the dataset or use a "
                            f"matching version of this code")
    return version


def parse_manifest(raw: bytes, location: str) -> dict:
    """JSON of a manifest's bytes, checked (`check_manifest`)."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"dataset manifest {location} is not valid JSON: {e}") from e
    return check_manifest(data, location)


def read_manifest(data: str | Path) -> tuple[str, dict]:
    """(location, checked JSON) of the manifest of `data`: a local directory, the file itself, or an fsspec URL.

    The one reader of manifests: the loader, the audit and publishing all come through here or parse_manifest."""
    location = manifest_location(data)
    try:
        if "://" not in location:
            raw = Path(location).read_bytes()
        else:
            import fsspec
            # cat_file is one GET; open() asks for the size first (a HEAD over http: one more round trip)
            fs, path = fsspec.core.url_to_fs(location, **fsspec_tls_options(urlparse(location).scheme))
            raw = fs.cat_file(path)
    except OSError as e:
        # fsspec's HTTP open turns any failure, a certificate refused too, into FileNotFoundError(url)
        unverified = certificate_failure(e)
        if unverified is not None:
            raise ManifestError(f"dataset manifest {location} cannot be read: {unverified}") from e
        if isinstance(e, FileNotFoundError):
            raise FileNotFoundError(f"dataset manifest {location} does not exist") from e
        raise
    return location, parse_manifest(raw, location)


def read_split(data: str | Path, split: str) -> tuple[str, SplitManifest]:
    """(location, full-schema entry of `split`) of the manifest of `data` (as `read_manifest`).

    Only that split's entry is parsed, so a damaged entry of another split does not keep this one from being
    read; anything wrong with it is a `ManifestError` naming the file, the split and the field."""
    location, raw = read_manifest(data)
    check_format_version(raw, f"dataset manifest {location}")
    splits = raw["splits"]
    if split not in splits:
        raise ManifestError(f"dataset manifest {location} has no split {split!r} (splits: {sorted(splits)})")
    try:
        return location, SplitManifest.from_dict(splits[split], f"dataset manifest {location} split {split!r}")
    except (TypeError, ValueError) as e:   # TypeError: a record with other fields than its dataclass
        raise ManifestError(str(e) if isinstance(e, ValueError) else
                            f"dataset manifest {location} split {split!r}: {e}") from e


def resolve_path(location: str, path: str, shard_base: str = "") -> str:
    """The absolute local path or URL of a (checked) manifest file path.

    By default under the manifest's own directory: a local manifest gives an absolute local path, a URL one the
    same scheme and host. `shard_base` (the user's --shard-base) replaces that directory with any local path or
    URL, `pipe:` included; a `{path}` in it is replaced by the path, else the path is appended after a '/'. In a
    `pipe:` command the path is shell-quoted: it comes from the manifest."""
    if shard_base:
        part = shlex.quote(path) if shard_base.startswith("pipe:") else path
        return shard_base.replace("{path}", part) if "{path}" in shard_base else shard_base.rstrip("/") + "/" + part
    if "://" not in location:
        return str(Path(location).absolute().parent / path)
    if urlparse(location).scheme in uses_relative:
        return urljoin(location, path)
    # urljoin knows only the schemes in uses_relative: for s3://, gs://, memory:// ... it would return the bare
    # relative path, which then opens as a local file.
    return location.rsplit("/", 1)[0] + "/" + path


def load_dataset_manifest(dir_or_url: str | Path) -> DatasetManifest:
    """Read `DIR/manifest.json` (a local directory, the file itself, or any fsspec URL) in the full schema."""
    location, data = read_manifest(dir_or_url)
    try:
        return DatasetManifest.from_dict(data, where=location)
    except ManifestError:
        raise
    except ValueError as e:   # the schema's own checks name the file and the entry; one error type for callers
        raise ManifestError(str(e)) from e


@contextmanager
def _locked(out_dir: Path):
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".manifest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def write_dataset_manifest(out_dir: Path, entry: SplitManifest) -> DatasetManifest:
    """Add or replace `entry`'s split in `DIR/manifest.json`, keeping the other splits; atomic."""
    out_dir = Path(out_dir)
    with _locked(out_dir):
        path = out_dir / MANIFEST_NAME
        manifest = load_dataset_manifest(path) if path.exists() else DatasetManifest()
        manifest.splits[entry.split] = entry
        manifest.splits = dict(sorted(manifest.splits.items()))
        manifest.format_version = FORMAT_VERSION   # an older file is upgraded; its other splits stay readable
        manifest.refresh_shared()
        atomic_write_bytes(path, manifest.to_json())
    return manifest


@dataclass
class ShardPlan:
    num_shards: int
    samples_per_shard: int
    recorded: bool      # True: taken from the manifest (an earlier build of this split)


def shard_plan(out_dir: Path, split: str, num_clips: int, samples_per_shard: int = 256) -> ShardPlan:
    """The split's shard count: the one recorded at its first build, else max(1, ceil(clips/per_shard)).

    Keeping it fixed is what makes adding or removing a clip rewrite only that clip's shard."""
    path = Path(out_dir) / MANIFEST_NAME
    if path.exists():
        entry = load_dataset_manifest(path).splits.get(split)
        if entry is not None:
            return ShardPlan(entry.num_shards, entry.samples_per_shard, recorded=True)
    return ShardPlan(num_shards_for(num_clips, samples_per_shard), samples_per_shard, recorded=False)
