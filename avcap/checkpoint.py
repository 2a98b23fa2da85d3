"""Our own checkpoint format: saving and loading captioners, and the public entry for loading any weights
(docs/original.md §5).

Two containers, one content:
- a `.pt` file written by `save_checkpoint` (training writes these): `{format_version, model_state, config,
  ...extra}`, plain Python types only, so it loads with `torch.load(weights_only=True)`;
- an export folder written by `save_export` (`python -m avcap.export`): `model.safetensors` (the tied output
  weight stored once: safetensors refuses shared tensors), `config.json` with our format marker
  (`"avcap_format": "avcap-export"`, never mistaken for a Hugging Face folder, which says `model_type: "git"`),
  `vocab.txt` and a README.md model card.

    save_checkpoint("run/ckpt.pt", model, model_config, tokenizer_vocab=tok, norm_stats={"mean": -4.346,
                    "std": 4.332}, frames_per_clip=20, extra={"optimizer": opt.state_dict(), "step": step})
    ckpt = load_checkpoint("run/ckpt.pt")   # or an export folder: ckpt.model, ckpt.config, ckpt.tokenizer, ...

`load_pretrained(model, path)` loads weights of any supported layout into a model: ours (either container) here,
the foreign ones (CAV-MAE, GiT, Hugging Face GiT, the original captioner) through avcap.foreign. Every layout goes
through avcap.statemap's engine: keys are loaded, skipped for a stated reason, or refused, and
`LoadReport.summary()` says what happened.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from avcap import foreign
from avcap.model import AVCap, AVCapConfig
from avcap.statemap import (CheckpointError, KeyNote, Layout, LoadReport, abbreviate, apply, is_state_dict,
                            map_onto, read_safetensors_file, read_torch_file, tie_groups, unwrap)
from avcap.tokenizer import (validate_vocab, parse_vocab_text, read_vocab_file, special_ids, tokenizer_from_vocab,
                             tokenizer_vocab)
from shards.atomic import fsync_dir, temp_path

__all__ = ["CheckpointError", "KeyNote", "LoadReport", "LoadedCheckpoint", "load_pretrained", "map_state_dict",
           "save_checkpoint", "save_export", "load_checkpoint", "read_torch_file", "read_checkpoint_file",
           "is_export_dir"]

# The reader of our .pt checkpoints (and of every torch file): avcap.statemap's, under the name callers use.
read_checkpoint_file = read_torch_file

FORMAT_VERSION = 1
KINDS = foreign.KINDS + ("ours",)
RESERVED_KEYS = ("format_version", "model_state", "config")
EXPORT_MARKER = "avcap-export"
EXPORT_VERSION = 1
EXPORT_WEIGHTS = "model.safetensors"
EXPORT_VOCAB = "vocab.txt"
OURS = Layout("ours", lambda key: (key, None))


@dataclass
class LoadedCheckpoint:
    model: nn.Module            # in eval mode, on map_location
    config: Any                 # AVCapConfig
    tokenizer: Any              # BertTokenizerFast rebuilt from the stored vocab
    norm_stats: dict[str, Any]
    frames_per_clip: int
    extra: dict[str, Any]       # every top-level key save_checkpoint got in `extra` (optimizer, step, ...)
    report: LoadReport
    path: str = ""

    @property
    def vocab(self) -> list[str]:
        return tokenizer_vocab(self.tokenizer)


def _is_ours(obj: Any) -> bool:
    return isinstance(obj, Mapping) and "format_version" in obj and "model_state" in obj


def is_export_dir(path: str | Path) -> bool:
    """A folder written by save_export (its config.json carries our marker)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("avcap_format") == EXPORT_MARKER
    except (OSError, ValueError, AttributeError):
        return False


def map_state_dict(model: nn.Module, obj: Any, kind: str = "auto", path: str = "<memory>",
                   strict: bool = True) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """The planning half of load_pretrained for what torch.load returned (or a state dict): the model-keyed tensors
    to load and the report, without touching the model. Works on a meta-device model (shapes only)."""
    if kind not in ("auto",) + KINDS:
        raise ValueError(f"kind must be 'auto' or one of {KINDS}, got {kind!r}")
    if _is_ours(obj):
        if not is_state_dict(obj["model_state"]):
            raise CheckpointError(f"{path}: 'model_state' is not a state dict of tensors")
        version = obj["format_version"]
        if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
            raise CheckpointError(f"{path}: format_version {version!r} is not supported (this code reads "
                                  f"1..{FORMAT_VERSION})")
        state, detected = dict(obj["model_state"]), "ours"
    else:
        state = unwrap(obj, path)
        detected = foreign.detect_kind(state, path)
    if kind != "auto" and kind != detected:
        raise CheckpointError(f"{path}: asked to load as {kind!r} but the file is in the {detected!r} layout")
    layout = OURS if detected == "ours" else foreign.LAYOUTS[detected]
    return map_onto(model, state, layout, path, strict)


def load_pretrained(model: nn.Module, path: str | Path, kind: str = "auto", strict: bool = True) -> LoadReport:
    """Load weights of any supported layout into `model` in place; returns the report.

    `path`: one of our `.pt` checkpoints or export folders; a CAV-MAE, GiT or original-captioner file (`.pt`,
    `.pth`, `.bin` or `.safetensors`); a Hugging Face GiT folder (save_pretrained, sharded or not) or hub name.
    `strict=False` turns missing, unexpected and untied keys into report entries instead of errors; shape
    mismatches and a file from which nothing loads are errors either way. Parameters keep their requires_grad
    flags (freezing is decided by the model, not by the file).
    """
    p = Path(path)
    if p.is_dir() and is_export_dir(p):
        if kind not in ("auto", "ours"):
            raise CheckpointError(f"{p}: asked to load as {kind!r} but the folder is one of our exports")
        _read_export_config(p)
        to_load, report = map_onto(model, read_safetensors_file(p / EXPORT_WEIGHTS), OURS, str(p), strict)
    elif p.is_file() and not p.name.endswith(".safetensors"):
        to_load, report = map_state_dict(model, read_torch_file(p), kind=kind, path=str(p), strict=strict)
    else:
        if kind == "ours":
            raise CheckpointError(f"{path}: not one of our checkpoints or export folders")
        state, layout, label = foreign.read_foreign(model, path, kind)
        to_load, report = map_onto(model, state, layout, label, strict)
    apply(model, to_load)
    return report


# --------------------------------------------------------------------------------------------- our own format

# Exact types: numpy scalars subclass float but torch.load(weights_only=True) refuses them.
_PLAIN = {str, int, float, bool, type(None), bytes, complex}
_TORCH_LEAVES = (torch.Tensor, torch.Size, torch.dtype, torch.device)


def _check_loadable(obj: Any, where: str) -> None:
    """Refuse at save time what torch.load(weights_only=True) would refuse at load time."""
    if type(obj) in _PLAIN or isinstance(obj, _TORCH_LEAVES):
        return
    if type(obj) in (dict, OrderedDict):
        for k, v in obj.items():
            if type(k) not in _PLAIN:
                raise TypeError(f"{where}: key {k!r} is a {type(k).__name__}; use str/int keys")
            _check_loadable(v, f"{where}[{k!r}]")
        return
    if type(obj) in (list, tuple, set):
        for i, v in enumerate(obj):
            _check_loadable(v, f"{where}[{i}]")
        return
    raise TypeError(f"{where} is a {type(obj).__name__}, which torch.load(weights_only=True) cannot read; "
                    "store plain types (dict/list/str/int/float/bool) and tensors")


def _plain_dict(value: Any, what: str) -> dict[str, Any]:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a dataclass or a mapping, got {type(value).__name__}")
    value = {k: list(v) if isinstance(v, tuple) else v for k, v in value.items()}
    _check_loadable(value, what)
    return value


def _vocab_list(tokenizer_vocab_or_tok: Any) -> list[str]:
    if isinstance(tokenizer_vocab_or_tok, str):
        vocab = parse_vocab_text(tokenizer_vocab_or_tok)
    elif isinstance(tokenizer_vocab_or_tok, (list, tuple)):
        vocab = list(tokenizer_vocab_or_tok)
    elif hasattr(tokenizer_vocab_or_tok, "get_vocab"):
        vocab = tokenizer_vocab(tokenizer_vocab_or_tok)
    else:
        raise TypeError("tokenizer_vocab must be a list of tokens, the text of a vocab.txt or a tokenizer, got "
                        f"{type(tokenizer_vocab_or_tok).__name__}")
    validate_vocab(vocab, "tokenizer_vocab")
    return vocab


def _bare(model: nn.Module) -> nn.Module:
    # DDP/compile wrappers prefix every key; a checkpoint holds the bare model's names.
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def _model_config_dict(model_config: Any) -> dict[str, Any]:
    """What a checkpoint stores: AVCapConfig.to_dict() (a mapping is taken as that dict)."""
    if isinstance(model_config, AVCapConfig):
        model_config = model_config.to_dict()
    return _plain_dict(model_config, "model_config")


def _check_config_consistency(config: dict[str, Any], vocab: list[str], where: str) -> None:
    """The stored config must agree with the stored vocab, or the checkpoint could not caption."""
    tok = tokenizer_from_vocab(vocab, source=where)
    ids = special_ids(tok)
    if "vocab_size" in config and config["vocab_size"] != len(vocab):
        raise ValueError(f"{where}: model config vocab_size {config['vocab_size']} != tokenizer vocab size "
                         f"{len(vocab)}")
    for name, value in (("cls_id", ids.cls), ("sep_id", ids.sep), ("pad_id", ids.pad)):
        if name in config and config[name] != value:
            raise ValueError(f"{where}: model config {name}={config[name]} but the tokenizer's is {value}")



def save_checkpoint(path: str | Path, model: nn.Module, model_config: Any, tokenizer_vocab: Any,
                    norm_stats: Any = None, frames_per_clip: int | None = None,
                    extra: Mapping[str, Any] | None = None) -> Path:
    """Write `{format_version, model_state, config, **extra}` atomically (temp file, fsync, rename).

    config = {"model": model_config as a dict, "tokenizer": {"vocab": [...], "do_lower_case": True},
    "norm_stats": {...}, "frames_per_clip": int}: enough for load_checkpoint to rebuild a captioner.
    `tokenizer_vocab` is a token list (index = id), the text of a vocab.txt, or the tokenizer itself.
    `extra` (optimizer, scheduler, step, ...) is stored under its own top-level keys. norm_stats and
    frames_per_clip are required; when not passed they are taken from extra["norm_stats"] /
    extra["frames_per_clip"] (which then also stay in extra).
    """
    path = Path(path)
    model = _bare(model)
    cfg = _model_config_dict(model_config)
    vocab = _vocab_list(tokenizer_vocab)
    _check_config_consistency(cfg, vocab, str(path))
    extra = dict(extra or {})
    if norm_stats is None:
        norm_stats = extra.get("norm_stats")
    if frames_per_clip is None:
        frames_per_clip = extra.get("frames_per_clip")
    if norm_stats is None:
        raise ValueError(f"{path}: norm_stats is required (the audio normalization the model was trained with)")
    stats = _plain_dict(norm_stats, "norm_stats")
    if isinstance(frames_per_clip, bool) or not isinstance(frames_per_clip, int) or frames_per_clip < 1:
        raise ValueError(f"{path}: frames_per_clip must be a positive int, got {frames_per_clip!r}")
    clash = [k for k in extra if k in RESERVED_KEYS]
    if clash:
        raise ValueError(f"extra may not use the reserved keys {clash}")
    _check_loadable(extra, "extra")

    state = model.state_dict()
    # The config must rebuild exactly this model, or the checkpoint would not load on its own.
    try:
        rebuilt = AVCapConfig.from_dict(cfg)
    except ValueError as e:
        raise CheckpointError(f"{path}: model_config: {e}") from e
    with torch.device("meta"):  # shapes only: no memory, no init cost
        reference = type(model)(rebuilt).state_dict()
    diff = sorted(set(state) ^ set(reference)) + sorted(
        k for k in set(state) & set(reference) if state[k].shape != reference[k].shape)
    if diff:
        raise ValueError(f"{path}: model_config does not describe the model (keys/shapes differ: "
                         f"{abbreviate(diff, 8)})")

    payload = {
        "format_version": FORMAT_VERSION,
        "model_state": state,
        "config": {"model": cfg, "tokenizer": {"vocab": vocab, "do_lower_case": True},
                   "norm_stats": stats, "frames_per_clip": frames_per_clip},
        **extra,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)  # the rename is durable only once the directory entry is on disk
    return path


def _rebuild(path: str, config: Mapping[str, Any], vocab: Any, state: Mapping[str, torch.Tensor],
             map_location: str | torch.device, extra: dict[str, Any]) -> LoadedCheckpoint:
    """A captioner from a stored config, vocab and state (either container)."""
    absent = [k for k in ("model", "tokenizer", "norm_stats", "frames_per_clip") if k not in config]
    if absent:
        raise CheckpointError(f"{path}: config lacks {absent}")
    try:
        model_config = AVCapConfig.from_dict(config["model"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: stored model config is unusable: {e}") from e
    try:
        tokenizer = tokenizer_from_vocab(vocab, do_lower_case=config["tokenizer"].get("do_lower_case", True),
                                         source=f"{path} tokenizer")
        _check_config_consistency(config["model"], list(vocab), path)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: stored tokenizer is unusable: {e}") from e
    model = AVCap(model_config)
    to_load, report = map_onto(model, state, OURS, path, strict=True)
    apply(model, to_load)
    model.to(map_location).eval()
    return LoadedCheckpoint(model=model, config=model_config, tokenizer=tokenizer,
                            norm_stats=dict(config["norm_stats"]), frames_per_clip=int(config["frames_per_clip"]),
                            extra=extra, report=report, path=path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Rebuild a captioner from one of our checkpoints alone (a `.pt` file or an export folder): model (eval
    mode), config, tokenizer, normalization stats, frames per clip, and the extra training state (`.pt` only)."""
    path = Path(path)
    if path.is_dir():
        config = _read_export_config(path)
        vocab_file = path / config["tokenizer"].get("vocab_file", EXPORT_VOCAB)
        if not vocab_file.is_file():
            raise CheckpointError(f"{path}: export folder lacks its vocab ({vocab_file.name})")
        return _rebuild(str(path), config, read_vocab_file(vocab_file),
                        read_safetensors_file(path / EXPORT_WEIGHTS), map_location, extra={})
    obj = read_torch_file(path)
    if not (isinstance(obj, Mapping) and "format_version" in obj):
        raise CheckpointError(f"{path}: not one of our checkpoints (no format_version); use load_pretrained to "
                              "load CAV-MAE, GiT or original AVCap weights into a model")
    missing = [k for k in RESERVED_KEYS if k not in obj]
    config = obj.get("config")
    if missing or not isinstance(config, Mapping):
        raise CheckpointError(f"{path}: checkpoint lacks {missing or ['a config dict']}")
    if not isinstance(config.get("tokenizer"), Mapping) or "vocab" not in config["tokenizer"]:
        raise CheckpointError(f"{path}: stored tokenizer is unusable: config.tokenizer has no vocab")
    version = obj["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise CheckpointError(f"{path}: format_version {version!r} is not supported (this code reads "
                              f"1..{FORMAT_VERSION})")
    if not is_state_dict(obj["model_state"]):
        raise CheckpointError(f"{path}: 'model_state' is not a state dict of tensors")
    extra = {k: v for k, v in obj.items() if k not in RESERVED_KEYS}
    return _rebuild(str(path), config, config["tokenizer"]["vocab"], obj["model_state"], map_location, extra)


# ------------------------------------------------------------------------------------------ export folders

def _read_export_config(folder: Path) -> dict[str, Any]:
    config = foreign.read_json(folder / "config.json")
    if config.get("avcap_format") != EXPORT_MARKER:
        raise CheckpointError(f"{folder / 'config.json'}: not one of our export folders (no "
                              f"avcap_format: {EXPORT_MARKER!r})")
    version = config.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= EXPORT_VERSION:
        raise CheckpointError(f"{folder}: export format_version {version!r} is not supported (this code reads "
                              f"1..{EXPORT_VERSION})")
    if not isinstance(config.get("tokenizer"), Mapping):
        raise CheckpointError(f"{folder / 'config.json'}: lacks a tokenizer entry")
    return config


def save_export(out: str | Path, model: nn.Module, model_config: Any, tokenizer_vocab: Any, norm_stats: Any,
                frames_per_clip: int, card: str = "") -> Path:
    """Write an export folder: model.safetensors, config.json (our marker), vocab.txt, README.md (`card`).

    Built in a temporary sibling folder and renamed into place, so `out` is either complete or absent; an
    existing non-empty `out` is refused rather than overwritten."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: already exists and is not an empty folder; choose another --out")
    model = _bare(model)
    cfg = _model_config_dict(model_config)
    vocab = _vocab_list(tokenizer_vocab)
    _check_config_consistency(cfg, vocab, str(out))
    state = model.state_dict()
    # safetensors refuses tensors that share memory: store each tied group under its first name only; loading
    # fills the others from it (avcap.statemap's tie rule).
    for group in tie_groups(model):
        for name in group[1:]:
            state.pop(name, None)
    config = {"avcap_format": EXPORT_MARKER, "format_version": EXPORT_VERSION, "model": cfg,
              "tokenizer": {"vocab_file": EXPORT_VOCAB, "do_lower_case": True},
              "norm_stats": _plain_dict(norm_stats, "norm_stats"), "frames_per_clip": int(frames_per_clip)}
    # The project's temp naming (shards.atomic), so remove_stale_temps can tell a killed export's folder; made
    # with mkdir rather than temp_dir's mkdtemp, which would leave the export readable by its owner only.
    tmp = temp_path(out)
    tmp.mkdir(parents=True)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, tmp / EXPORT_WEIGHTS,
                  metadata={"format": "pt", "avcap_format": EXPORT_MARKER})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (tmp / EXPORT_VOCAB).write_text("".join(t + "\n" for t in vocab), encoding="utf-8")
        (tmp / "README.md").write_text(card, encoding="utf-8")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(out.parent)
    return out
