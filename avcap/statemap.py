"""Mapping a weights file onto the model: the one engine behind every layout (docs/original.md §5).

A `Layout` says how a file's keys become the model's (`map_key`), which model keys such a file should hold
(`in_scope`), which of those may be absent (`may_be_missing`), which shape misfits are a stated skip rather than an
error (`misfit`), and which keys to skip because of what the rest of the file holds (`pre_skip`). `map_onto`
applies one to a state dict and returns the model-keyed tensors to load and a `LoadReport`, without touching the
model. Foreign layouts live in avcap.foreign, our own format in avcap.checkpoint; both read files through the
two readers here (torch.load with weights_only=True, safetensors), so a file never runs code.

Tied parameters (the output layer shares the word embeddings): one name in the file fills the others; two names
whose values differ are reported as `untied` and refused when strict (the model can only hold one of them: the
word embeddings win, as the original ties output to input).
"""
from __future__ import annotations

import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file and the keys."""


@dataclass
class KeyNote:
    key: str
    reason: str


@dataclass
class LoadReport:
    """What a load did. Keys are the model's names, except `unexpected` and file-only `skipped` keys, which keep
    the file's names."""
    path: str
    kind: str
    loaded: list[str] = field(default_factory=list)
    skipped: list[KeyNote] = field(default_factory=list)      # in the file, deliberately not loaded
    missing: list[KeyNote] = field(default_factory=list)      # the layout may lack these; left as initialised
    unexpected: list[KeyNote] = field(default_factory=list)   # in the file, matching nothing (error when strict)
    untied: list[KeyNote] = field(default_factory=list)       # tied in the model, different in the file
    not_covered: list[str] = field(default_factory=list)      # model keys this layout never holds

    def __str__(self) -> str:
        return self.summary()

    def summary(self) -> str:
        lines = [f"{self.path} ({self.kind}): loaded {len(self.loaded)}, skipped {len(self.skipped)}, "
                 f"missing {len(self.missing)}, unexpected {len(self.unexpected)}, "
                 f"not covered by this layout {len(self.not_covered)}"]
        for title, notes in (("skipped", self.skipped), ("missing", self.missing),
                             ("unexpected", self.unexpected), ("untied", self.untied)):
            for reason, keys in _group_by_reason(notes).items():
                lines.append(f"  {title} ({reason}): {abbreviate(keys)}")
        if self.not_covered:
            lines.append(f"  not covered (left as they were): {abbreviate(_roots(self.not_covered))}")
        return "\n".join(lines)


def _group_by_reason(notes: Sequence[KeyNote]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for n in notes:
        groups.setdefault(n.reason, []).append(n.key)
    return groups


def _roots(keys: Sequence[str]) -> list[str]:
    """'textual.transformer.encoder.layer.0.x' -> 'textual.transformer.*': keeps a summary line short."""
    return sorted({".".join(k.split(".")[:2]) + ".*" if k.count(".") > 1 else k for k in keys})


def abbreviate(keys: Sequence[str], limit: int = 8) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


# ----------------------------------------------------------------------------------------------------- reading

def read_torch_file(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
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


def read_safetensors_file(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file (a format that holds tensors only), errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: safetensors file does not exist")
    try:
        return load_file(path, device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors file (truncated or corrupt?): "
                              f"{type(e).__name__}: {e}") from e


def read_weights_file(path: str | Path) -> Any:
    """A .safetensors file by its format, anything else through torch.load(weights_only=True)."""
    return read_safetensors_file(path) if str(path).endswith(".safetensors") else read_torch_file(path)


def is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def unwrap(obj: Any, path: str) -> dict[str, torch.Tensor]:
    """The state dict inside a foreign file: itself or under 'model'/'state_dict', with a `module.` prefix removed
    when every key has it (DDP saves)."""
    if isinstance(obj, Mapping) and not is_state_dict(obj):
        for wrapper in ("model", "state_dict"):
            if wrapper in obj and is_state_dict(obj[wrapper]):
                obj = obj[wrapper]
                break
    if not is_state_dict(obj):
        top = list(obj.keys())[:10] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"{path}: not a state dict, nor one under 'model'/'state_dict', nor our format "
                              f"(top level: {top})")
    state = dict(obj)
    # Strip `module.` only when it is every key's prefix: the original's blind k[7:] mangled files without it.
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


# ------------------------------------------------------------------------------------------------------ layouts

def _everything(key: str) -> bool:
    return True


def _never(key: str) -> str | None:
    return None


def _no_misfit(model_key: str, tensor: torch.Tensor, expected: torch.Tensor) -> str | None:
    return None


def _no_pre_skip(state: Mapping[str, torch.Tensor], model_state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    return {}


@dataclass(frozen=True)
class Layout:
    kind: str
    # file key -> (model key, None) or (None, reason the key is skipped)
    map_key: Callable[[str], tuple[str | None, str | None]]
    in_scope: Callable[[str], bool] = _everything
    may_be_missing: Callable[[str], str | None] = _never
    # (model key, file tensor, model tensor) of a shape mismatch -> reason to skip it, or None (an error)
    misfit: Callable[[str, torch.Tensor, torch.Tensor], str | None] = _no_misfit
    # (file state, model state) -> {model key: reason} of keys to skip whatever their shape
    pre_skip: Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], dict[str, str]] = _no_pre_skip


def tie_groups(model: nn.Module) -> list[list[str]]:
    """State-dict names that are one parameter (the output layer tied to the word embeddings), in module order."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def map_onto(model: nn.Module, state: Mapping[str, torch.Tensor], layout: Layout, path: str,
             strict: bool = True) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """The model-keyed tensors to load and the report. Works on a meta-device model (shapes only)."""
    model_state = model.state_dict()
    report = LoadReport(path=path, kind=layout.kind)
    to_load: dict[str, torch.Tensor] = {}
    file_key_of: dict[str, str] = {}
    mismatched: list[str] = []
    misfit_weights: set[str] = set()
    pre_skipped = layout.pre_skip(state, model_state)

    for file_key, tensor in state.items():
        model_key, skip_reason = layout.map_key(file_key)
        if model_key is None:
            report.skipped.append(KeyNote(file_key, skip_reason or "not used by AVCap"))
            continue
        if model_key not in model_state:
            report.unexpected.append(KeyNote(file_key, "no such key in the model"))
            continue
        if model_key in file_key_of:
            raise CheckpointError(f"{path}: keys {file_key_of[model_key]!r} and {file_key!r} both map to "
                                  f"{model_key!r}")
        file_key_of[model_key] = file_key
        expected = model_state[model_key]
        if model_key in pre_skipped:
            report.skipped.append(KeyNote(model_key, pre_skipped[model_key]))
            continue
        if tensor.shape != expected.shape:
            reason = layout.misfit(model_key, tensor, expected)
            if reason is not None:
                report.skipped.append(KeyNote(model_key, f"{reason} {_shape(tensor)} does not fit "
                                                         f"{_shape(expected)}; freshly initialised"))
                misfit_weights.add(model_key)
                continue
            mismatched.append(f"{file_key} {_shape(tensor)} vs model {model_key} {_shape(expected)}")
            continue
        to_load[model_key] = tensor
    if mismatched:
        raise CheckpointError(f"{path} ({layout.kind}): shape mismatch for {len(mismatched)} key(s): "
                              + "; ".join(mismatched[:20]) + (" ..." if len(mismatched) > 20 else ""))

    # A Linear whose weight misfit keeps its fresh weight, so its bias (trained for the other weight) goes too.
    for key in list(to_load):
        if key.endswith(".bias") and key[:-len("bias")] + "weight" in misfit_weights:
            del to_load[key]
            report.skipped.append(KeyNote(key, "bias of a skipped weight; freshly initialised"))
    skipped_model_keys = {n.key for n in report.skipped}

    for group in tie_groups(model):
        present = [k for k in group if k in to_load]
        if not present:
            continue
        first = to_load[present[0]]
        for other in present[1:]:
            t = to_load[other]
            if not (first.is_meta or t.is_meta) and not torch.equal(first, t):
                report.untied.append(KeyNote(file_key_of[other], f"differs from {file_key_of[present[0]]}; the "
                                                                 f"model ties them and keeps {present[0]}"))
                to_load[other] = first
        for absent in group:
            if absent not in to_load and absent not in skipped_model_keys:
                to_load[absent] = first

    report.loaded = [k for k in model_state if k in to_load]
    report.not_covered = [k for k in model_state if not layout.in_scope(k) and k not in to_load]
    not_allowed = []
    for key in model_state:
        if layout.in_scope(key) and key not in to_load and key not in skipped_model_keys:
            reason = layout.may_be_missing(key)
            if reason is None:
                not_allowed.append(key)
                reason = "not in the file"
            report.missing.append(KeyNote(key, reason))

    if not report.loaded:
        raise CheckpointError(f"{path}: no key of the file fits the model as {layout.kind!r} "
                              f"(file keys: {abbreviate(list(state), 6)})")
    if strict and not_allowed:
        raise CheckpointError(f"{path} ({layout.kind}): {len(not_allowed)} model key(s) missing from the file "
                              f"(truncated or wrong checkpoint?): {abbreviate(not_allowed, 12)}")
    if strict and report.unexpected:
        raise CheckpointError(f"{path} ({layout.kind}): {len(report.unexpected)} key(s) in the file match nothing "
                              f"in the model: {abbreviate([n.key for n in report.unexpected], 12)}")
    if strict and report.untied:
        raise CheckpointError(f"{path} ({layout.kind}): " + "; ".join(f"{n.key} {n.reason}" for n in report.untied)
                              + " (an untied output layer; load with strict=False to keep the word embeddings "
                                "for both)")
    return to_load, report


def apply(model: nn.Module, to_load: Mapping[str, torch.Tensor]) -> None:
    """Copy planned tensors into the model in place (requires_grad flags stay the model's)."""
    result = model.load_state_dict(dict(to_load), strict=False)
    if result.unexpected_keys:  # map_onto only emits model keys; this would be a bug here, not in the file
        raise RuntimeError(f"internal error: load_state_dict rejected {result.unexpected_keys}")
