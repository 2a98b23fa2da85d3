"""Loading the checkpoints a user brings, and saving/loading our own (docs/original.md §5).

Layouts read by `load_pretrained(model, path, kind="auto")`:
- `cav_mae`:        CAV-MAE release `.pth`, plain state dict `module.<encoder key>` (+ pretraining-only keys);
- `git`:            GiT `{"model": state_dict}`, `module.textual.*` (base) or `textual.*` (large), the projection
                    named `textual.visual_projection.*`, plus an unused `image_encoder.*`;
- `avcap_original`: the original trainer's captioner state dict, `av_encoder.*` and `textual.*`;
- `ours`:           `{format_version, model_state, config, ...extra}` written by `save_checkpoint`.

Every layout goes through an explicit key map. Keys are loaded, skipped for a stated reason (pretraining-only keys,
GiT-large's 1024-wide projection, the one-frame visual embedding of a checkpoint loaded into num_frames>1), or
refused: any other shape mismatch, an unknown key, a key the layout should hold but doesn't, or a file from which
nothing loads raises `CheckpointError` naming the file and the keys. `LoadReport.summary()` says what happened.

Our checkpoints store plain Python types only, so everything loads with `torch.load(weights_only=True)`:

    save_checkpoint("run/ckpt.pt", model, model_config, tokenizer_vocab=tok, norm_stats={"mean": -4.346,
                    "std": 4.332}, frames_per_clip=20, extra={"optimizer": opt.state_dict(), "step": step})
    ckpt = load_checkpoint("run/ckpt.pt")   # ckpt.model, ckpt.config, ckpt.tokenizer, ckpt.norm_stats, ...
"""
from __future__ import annotations

import dataclasses
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from avcap.tokenizer import (validate_vocab, parse_vocab_text, special_ids, tokenizer_from_vocab,
                             tokenizer_vocab)
from shards.atomic import fsync_dir, temp_path
from shards.atomic import remove_stale_temps as _remove_stale_temps

FORMAT_VERSION = 1
KINDS = ("cav_mae", "git", "avcap_original", "ours")
RESERVED_KEYS = ("format_version", "model_state", "config")

ENCODER_PREFIX = "av_encoder."
DECODER_PREFIX = "textual."
# Top-level names of the CAV-MAE encoder's state dict: how a bare CAV-MAE file is recognised.
_ENCODER_ROOTS = {"blocks_a", "blocks_v", "blocks_u", "patch_embed_a", "patch_embed_v", "pos_embed_a",
                  "pos_embed_v", "modality_a", "modality_v", "norm_a", "norm_v", "norm", "mlp_head"}
# Visual embedding keys that depend on num_frames (Conv2d for one frame, Conv3d over frame pairs otherwise).
_VISUAL_EMBED_KEYS = ("av_encoder.patch_embed_v.proj.weight", "av_encoder.patch_embed_v.proj.bias",
                      "av_encoder.pos_embed_v")
_GIT_PROJECTION = "textual.av_projection.0."


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file and the keys."""


@dataclass
class KeyNote:
    key: str
    reason: str


@dataclass
class LoadReport:
    """What load_pretrained did. Keys are the model's names, except `unexpected` and file-only `skipped` keys,
    which keep the file's names."""
    path: str
    kind: str
    loaded: list[str] = field(default_factory=list)
    skipped: list[KeyNote] = field(default_factory=list)      # in the file, deliberately not loaded
    missing: list[KeyNote] = field(default_factory=list)      # the layout may lack these; left as initialised
    unexpected: list[KeyNote] = field(default_factory=list)   # in the file, matching nothing (error when strict)
    not_covered: list[str] = field(default_factory=list)      # model keys this layout never holds

    def __str__(self) -> str:
        return self.summary()

    def summary(self) -> str:
        lines = [f"{self.path} ({self.kind}): loaded {len(self.loaded)}, skipped {len(self.skipped)}, "
                 f"missing {len(self.missing)}, unexpected {len(self.unexpected)}, "
                 f"not covered by this layout {len(self.not_covered)}"]
        for title, notes in (("skipped", self.skipped), ("missing", self.missing),
                             ("unexpected", self.unexpected)):
            for reason, keys in _group_by_reason(notes).items():
                lines.append(f"  {title} ({reason}): {_abbreviate(keys)}")
        if self.not_covered:
            lines.append(f"  not covered (left as they were): {_abbreviate(_roots(self.not_covered))}")
        return "\n".join(lines)


@dataclass
class LoadedCheckpoint:
    model: nn.Module            # in eval mode, on map_location
    config: Any                 # AVCapConfig
    tokenizer: Any              # BertTokenizerFast rebuilt from the stored vocab
    norm_stats: dict[str, Any]
    frames_per_clip: int
    extra: dict[str, Any]       # every top-level key save_checkpoint got in `extra` (optimizer, step, ...)
    report: LoadReport

    @property
    def vocab(self) -> list[str]:
        return tokenizer_vocab(self.tokenizer)


def _group_by_reason(notes: Sequence[KeyNote]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for n in notes:
        groups.setdefault(n.reason, []).append(n.key)
    return groups


def _roots(keys: Sequence[str]) -> list[str]:
    """'textual.transformer.encoder.layer.0.x' -> 'textual.transformer.*': keeps a summary line short."""
    return sorted({".".join(k.split(".")[:2]) + ".*" if k.count(".") > 1 else k for k in keys})


def _abbreviate(keys: Sequence[str], limit: int = 8) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


# ----------------------------------------------------------------------------------------------------- reading

def read_checkpoint_file(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """torch.load(weights_only=True), turning every failure into a CheckpointError that names the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            # weights_only refuses arbitrary objects; a legitimate checkpoint never needs them. torch's own text
            # advises loading the file with weights_only=False, i.e. running its code: never pass that on.
            found = re.search(r"GLOBAL (\S+)", str(e))
            raise CheckpointError(f"{path}: the file contains objects other than tensors and plain Python types"
                                  f"{f' ({found.group(1)})' if found else ''}, which unpickling would run as "
                                  f"code; this project never loads such files") from None
        raise CheckpointError(f"{path}: cannot read checkpoint (truncated or corrupt?): {e}") from e
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read checkpoint (truncated or corrupt?): "
                              f"{type(e).__name__}: {e}") from e


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _unwrap(obj: Any, path: str) -> tuple[dict[str, torch.Tensor], bool]:
    """The state dict inside a file, with a `module.` prefix removed when every key has it (DDP saves); returns
    whether the file is ours."""
    if isinstance(obj, Mapping) and "format_version" in obj and "model_state" in obj:
        if not _is_state_dict(obj["model_state"]):
            raise CheckpointError(f"{path}: 'model_state' is not a state dict of tensors")
        return dict(obj["model_state"]), True
    if isinstance(obj, Mapping) and not _is_state_dict(obj):
        for wrapper in ("model", "state_dict"):
            if wrapper in obj and _is_state_dict(obj[wrapper]):
                obj = obj[wrapper]
                break
    if not _is_state_dict(obj):
        top = list(obj.keys())[:10] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"{path}: not a state dict, nor one under 'model'/'state_dict', nor our format "
                              f"(top level: {top})")
    state = dict(obj)
    # Strip `module.` only when it is every key's prefix: the original's blind k[7:] mangled files without it.
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state, False


def detect_kind(state: Mapping[str, torch.Tensor], path: str = "<state dict>") -> str:
    """Which layout a state dict (already unwrapped) is in; our own format is recognised before unwrapping."""
    keys = list(state)
    if any(k.startswith(ENCODER_PREFIX) for k in keys):
        return "avcap_original"
    if any(k.startswith(DECODER_PREFIX) for k in keys):
        return "git"
    if any(k.split(".")[0] in _ENCODER_ROOTS for k in keys):
        return "cav_mae"
    raise CheckpointError(f"{path}: keys match no known checkpoint layout (CAV-MAE, GiT, AVCap captioner, ours); "
                          f"first keys: {_abbreviate(keys, 6)}")


# ------------------------------------------------------------------------------------------------------ key maps

def _map_cav_mae(key: str) -> tuple[str | None, str | None]:
    """File key -> (model key, None) or (None, skip reason)."""
    if key == "mask_token" or key.startswith("decoder_"):
        return None, "CAV-MAE pretraining-only (MAE decoder / mask token)"
    return ENCODER_PREFIX + key, None


def _map_git(key: str) -> tuple[str | None, str | None]:
    if key.startswith("image_encoder."):
        return None, "GiT image encoder (CLIP ViT), unused by AVCap"
    if key.startswith("textual.visual_projection."):
        # GiT's name for the prefix projection; the original never mapped it and left ours random.
        return "textual.av_projection." + key[len("textual.visual_projection."):], None
    return key, None


def _map_identity(key: str) -> tuple[str | None, str | None]:
    return key, None


_KEY_MAPS = {"cav_mae": _map_cav_mae, "git": _map_git, "avcap_original": _map_identity, "ours": _map_identity}


def _scope(kind: str, model_keys: Sequence[str]) -> set[str]:
    """Model keys a file of this layout is expected to hold."""
    if kind == "cav_mae":
        return {k for k in model_keys if k.startswith(ENCODER_PREFIX)}
    if kind == "git":
        return {k for k in model_keys if k.startswith(DECODER_PREFIX)}
    return set(model_keys)


def _may_be_missing(kind: str, key: str) -> str | None:
    """Reason a model key may be absent from a file of this layout, or None if its absence is an error."""
    if key.startswith(ENCODER_PREFIX + "mlp_head."):
        # Released CAV-MAE pretrained weights have no classification head; captioning never uses it.
        return "classification head, not in pretrained CAV-MAE files and unused for captioning"
    return None


def _tie_groups(model: nn.Module) -> list[list[str]]:
    """State-dict names that are one parameter (the output layer tied to the word embeddings)."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def map_state_dict(model: nn.Module, obj: Any, kind: str = "auto", path: str = "<memory>",
                   strict: bool = True) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """The planning half of load_pretrained: the model-keyed tensors to load and the report, without touching
    the model. `obj` is what torch.load returned. Works on a meta-device model (shapes only)."""
    if kind not in ("auto",) + KINDS:
        raise ValueError(f"kind must be 'auto' or one of {KINDS}, got {kind!r}")
    state, is_ours = _unwrap(obj, path)
    detected = "ours" if is_ours else detect_kind(state, path)
    if kind == "auto":
        kind = detected
    elif (kind == "ours") != is_ours:
        raise CheckpointError(f"{path}: asked to load as {kind!r} but the file is in the {detected!r} layout")
    if is_ours:
        version = obj["format_version"]
        if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
            raise CheckpointError(f"{path}: format_version {version!r} is not supported (this code reads "
                                  f"1..{FORMAT_VERSION})")

    model_state = model.state_dict()
    report = LoadReport(path=path, kind=kind)
    key_map = _KEY_MAPS[kind]
    to_load: dict[str, torch.Tensor] = {}
    file_key_of: dict[str, str] = {}
    mismatched: list[str] = []

    # The visual embedding of a one-frame checkpoint (Conv2d) into num_frames>1 (Conv3d): the original drops these
    # keys and starts them fresh; so do we, but only in that case, and say so.
    frames_skip = False
    pe_key = "av_encoder.patch_embed_v.proj.weight"
    if kind in ("cav_mae", "avcap_original") and pe_key in model_state:
        file_pe = state.get(pe_key if kind == "avcap_original" else pe_key[len(ENCODER_PREFIX):])
        frames_skip = file_pe is not None and file_pe.dim() == 4 and model_state[pe_key].dim() == 5

    for file_key, tensor in state.items():
        model_key, skip_reason = key_map(file_key)
        if model_key is None:
            report.skipped.append(KeyNote(file_key, skip_reason))
            continue
        if model_key not in model_state:
            if model_key.startswith(ENCODER_PREFIX + "mlp_head."):
                report.skipped.append(KeyNote(file_key, "classification head, unused for captioning"))
            else:
                report.unexpected.append(KeyNote(file_key, "no such key in the model"))
            continue
        if model_key in file_key_of:
            raise CheckpointError(f"{path}: keys {file_key_of[model_key]!r} and {file_key!r} both map to "
                                  f"{model_key!r}")
        file_key_of[model_key] = file_key
        expected = model_state[model_key]
        if frames_skip and model_key in _VISUAL_EMBED_KEYS:
            report.skipped.append(KeyNote(model_key, "one-frame visual embedding does not fit num_frames>1; "
                                                     "freshly initialised"))
            continue
        if tensor.shape != expected.shape:
            if (kind == "git" and model_key.startswith(_GIT_PROJECTION) and model_key.endswith(".weight")
                    and tensor.dim() == 2 and tensor.shape[0] == expected.shape[0]):
                # GiT-large projects 1024-wide CLIP features; ours projects the encoder's width.
                report.skipped.append(KeyNote(model_key, f"GiT-large projection {_shape(tensor)} does not fit "
                                                         f"{_shape(expected)}; freshly initialised"))
                continue
            mismatched.append(f"{file_key} {_shape(tensor)} vs model {model_key} {_shape(expected)}")
            continue
        to_load[model_key] = tensor
    if mismatched:
        raise CheckpointError(f"{path} ({kind}): shape mismatch for {len(mismatched)} key(s): "
                              + "; ".join(mismatched[:20]) + (" ..." if len(mismatched) > 20 else ""))

    # A Linear whose weight was skipped keeps its fresh weight, so its bias (trained for the other weight) goes too.
    skipped_model_keys = {n.key for n in report.skipped}
    for key in list(to_load):
        if key.startswith(_GIT_PROJECTION) and key.endswith(".bias") and \
                key[:-len("bias")] + "weight" in skipped_model_keys:
            del to_load[key]
            report.skipped.append(KeyNote(key, "bias of the skipped GiT-large projection; freshly initialised"))
    skipped_model_keys = {n.key for n in report.skipped}

    # Tied parameters: one name in the file fills the others; two names with different values is a broken file.
    for group in _tie_groups(model):
        present = [k for k in group if k in to_load]
        if not present:
            continue
        first = to_load[present[0]]
        for other in present[1:]:
            t = to_load[other]
            if not (first.is_meta or t.is_meta) and not torch.equal(first, t):
                raise CheckpointError(f"{path}: {file_key_of[present[0]]!r} and {file_key_of[other]!r} are one "
                                      f"tied parameter in the model but differ in the file")
        for absent in group:
            if absent not in to_load and absent not in skipped_model_keys:
                to_load[absent] = first

    scope = _scope(kind, list(model_state))
    report.loaded = [k for k in model_state if k in to_load]
    report.not_covered = [k for k in model_state if k not in scope and k not in to_load]
    not_allowed = []
    for key in model_state:
        if key in scope and key not in to_load and key not in skipped_model_keys:
            reason = _may_be_missing(kind, key)
            if reason is None:
                not_allowed.append(key)
                reason = "not in the file"
            report.missing.append(KeyNote(key, reason))

    if not report.loaded:
        raise CheckpointError(f"{path}: no key of the file fits the model as {kind!r} "
                              f"(file keys: {_abbreviate(list(state), 6)})")
    if strict and not_allowed:
        raise CheckpointError(f"{path} ({kind}): {len(not_allowed)} model key(s) missing from the file "
                              f"(truncated or wrong checkpoint?): {_abbreviate(not_allowed, 12)}")
    if strict and report.unexpected:
        raise CheckpointError(f"{path} ({kind}): {len(report.unexpected)} key(s) in the file match nothing in "
                              f"the model: {_abbreviate([n.key for n in report.unexpected], 12)}")
    return to_load, report


def load_pretrained(model: nn.Module, path: str | Path, kind: str = "auto", strict: bool = True) -> LoadReport:
    """Load a checkpoint of any supported layout into `model` in place; returns the report.

    `strict=False` turns missing and unexpected keys into report entries instead of errors; shape mismatches and
    a file from which nothing loads are errors either way. Parameters keep their requires_grad flags (freezing
    is decided by the model, not by the file).
    """
    obj = read_checkpoint_file(path)
    to_load, report = map_state_dict(model, obj, kind=kind, path=str(path), strict=strict)
    result = model.load_state_dict(to_load, strict=False)
    if result.unexpected_keys:  # map_state_dict only emits model keys; this would be a bug here, not in the file
        raise RuntimeError(f"internal error: load_state_dict rejected {result.unexpected_keys}")
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


def _config_class():
    from avcap.model import AVCapConfig  # late: model.py imports nothing from here, keep it that way
    return AVCapConfig


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


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Delete the temp files that a killed save_checkpoint left in `directory` (their pid is gone): a save that
    dies mid-write never replaces the finished file, but its temp file (the size of a checkpoint) would stay
    forever; a writer that is still running keeps its file. The project's one cleaner (shards.atomic)."""
    return _remove_stale_temps(directory)


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
    cfg = _plain_dict(model_config, "model_config")
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
    AVCapConfig = _config_class()
    with torch.device("meta"):  # shapes only: no memory, no init cost
        reference = type(model)(AVCapConfig(**_config_kwargs(cfg, AVCapConfig, str(path)))).state_dict()
    diff = sorted(set(state) ^ set(reference)) + sorted(
        k for k in set(state) & set(reference) if state[k].shape != reference[k].shape)
    if diff:
        raise ValueError(f"{path}: model_config does not describe the model (keys/shapes differ: "
                         f"{_abbreviate(diff, 8)})")

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


def _config_kwargs(cfg: Mapping[str, Any], config_class: type, where: str) -> dict[str, Any]:
    names = {f.name: f for f in dataclasses.fields(config_class)}
    unknown = sorted(set(cfg) - set(names))
    if unknown:
        raise CheckpointError(f"{where}: model config has fields {unknown} that {config_class.__name__} lacks "
                              "(written by a newer version?)")
    # JSON-like storage turns tuples into lists; give tuple-typed fields their tuples back.
    return {k: tuple(v) if isinstance(v, list) and "tuple" in str(names[k].type).lower() else v
            for k, v in cfg.items()}


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Rebuild a captioner from one of our checkpoints alone: model (eval mode), config, tokenizer,
    normalization stats, frames per clip, and the extra training state."""
    from avcap.model import AVCap

    path = Path(path)
    obj = read_checkpoint_file(path)
    if not (isinstance(obj, Mapping) and "format_version" in obj):
        raise CheckpointError(f"{path}: not one of our checkpoints (no format_version); use load_pretrained to "
                              "load CAV-MAE, GiT or original AVCap weights into a model")
    missing = [k for k in RESERVED_KEYS if k not in obj]
    config = obj.get("config")
    if missing or not isinstance(config, Mapping):
        raise CheckpointError(f"{path}: checkpoint lacks {missing or ['a config dict']}")
    absent = [k for k in ("model", "tokenizer", "norm_stats", "frames_per_clip") if k not in config]
    if absent:
        raise CheckpointError(f"{path}: config lacks {absent}")
    AVCapConfig = _config_class()
    model_config = AVCapConfig(**_config_kwargs(config["model"], AVCapConfig, str(path)))
    try:
        tokenizer = tokenizer_from_vocab(config["tokenizer"]["vocab"],
                                         do_lower_case=config["tokenizer"].get("do_lower_case", True),
                                         source=f"{path} config.tokenizer")
        _check_config_consistency(config["model"], config["tokenizer"]["vocab"], str(path))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: stored tokenizer is unusable: {e}") from e
    model = AVCap(model_config)
    to_load, report = map_state_dict(model, obj, kind="ours", path=str(path), strict=True)
    model.load_state_dict(to_load, strict=False)
    model.to(map_location).eval()
    extra = {k: v for k, v in obj.items() if k not in RESERVED_KEYS}
    return LoadedCheckpoint(model=model, config=model_config, tokenizer=tokenizer,
                            norm_stats=dict(config["norm_stats"]), frames_per_clip=int(config["frames_per_clip"]),
                            extra=extra, report=report)
