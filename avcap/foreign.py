"""Weights in layouts other than ours: CAV-MAE, GiT (original and Hugging Face), the original captioner
(docs/original.md §5). Our own checkpoint format lives in avcap.checkpoint; `avcap.checkpoint.load_pretrained` is
the public entry for both.

Layouts (`kind`), auto-detected from the keys:
- `cav_mae`:        CAV-MAE release `.pth` (or `.safetensors`), `module.<encoder key>` (+ pretraining-only keys);
- `git`:            original GiT `{"model": state_dict}`, `module.textual.*` (base) or `textual.*` (large), the
                    projection named `textual.visual_projection.*`, plus an unused `image_encoder.*`;
- `avcap_original`: the original trainer's captioner state dict, `av_encoder.*` and `textual.*` (also the
                    `model.safetensors` of our export folders when given as a bare file);
- `hf-git`:         Hugging Face `GitForCausalLM` (`microsoft/git-base`, ...): `git.*` and `output.*`.

Where the weights come from (`resolve_source`): a file (`.pt`/`.pth`/`.bin` through torch.load(weights_only=True),
`.safetensors`), a folder written by `save_pretrained` (config.json with `model_type: "git"` and
`model.safetensors`, a sharded `model.safetensors.index.json`, or `pytorch_model.bin[.index.json]`), or a hub name
such as `microsoft/git-base`, taken from the local Hugging Face cache and downloaded only when the cache lacks it
and the hub is reachable.

The Hugging Face key map is the inverse of transformers' `convert_git_to_pytorch.py`:
`git.embeddings.word_embeddings` = `textual.embedding.words`, `git.embeddings.position_embeddings` =
`textual.embedding.positions`, `git.embeddings.LayerNorm` = `textual.embedding.layer_norm`, `git.encoder.layer.N` =
`textual.transformer.encoder.layer.N` (same sub-module names), `git.visual_projection.visual_projection.{0,1}` =
`textual.av_projection.{0,1}`, `output` = `textual.output`; the CLIP image encoder and the video temporal
embeddings are reported skips. Embedding LayerNorm eps: the original GiT uses 1e-8, transformers' GitConfig
1e-12; the weights were trained with 1e-8 and the original captioner (and our reference fixture) uses it, so we
keep 1e-8 for every layout. Over embeddings of unit-order variance the two differ by ~1e-8 relative.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from avcap.statemap import CheckpointError, Layout, abbreviate, read_weights_file, unwrap

ENCODER_PREFIX = "av_encoder."
DECODER_PREFIX = "textual."
HF_KIND = "hf-git"
KINDS = ("cav_mae", "git", "avcap_original", HF_KIND)
# Top-level names of the CAV-MAE encoder's state dict: how a bare CAV-MAE file is recognised.
_ENCODER_ROOTS = {"blocks_a", "blocks_v", "blocks_u", "patch_embed_a", "patch_embed_v", "pos_embed_a",
                  "pos_embed_v", "modality_a", "modality_v", "norm_a", "norm_v", "norm", "mlp_head"}
# Visual embedding keys that depend on num_frames (Conv2d for one frame, Conv3d over frame pairs otherwise).
_VISUAL_EMBED_KEYS = ("av_encoder.patch_embed_v.proj.weight", "av_encoder.patch_embed_v.proj.bias",
                      "av_encoder.pos_embed_v")
_PROJECTION = "textual.av_projection.0."

# Files of a Hugging Face model folder, in order of preference.
HF_WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                   "pytorch_model.bin")
# What a hub snapshot needs: weights, config and the tokenizer's WordPiece files.
HF_HUB_PATTERNS = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors",
                   "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"]
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


# ------------------------------------------------------------------------------------------------ key maps

def _map_cav_mae(key: str) -> tuple[str | None, str | None]:
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


_HF_RENAMES = (("git.embeddings.word_embeddings.", "textual.embedding.words."),
               ("git.embeddings.position_embeddings.", "textual.embedding.positions."),
               ("git.embeddings.LayerNorm.", "textual.embedding.layer_norm."),
               ("git.encoder.layer.", "textual.transformer.encoder.layer."),
               ("git.visual_projection.visual_projection.", "textual.av_projection."),
               ("output.", "textual.output."))


def _map_hf_git(key: str) -> tuple[str | None, str | None]:
    if key.startswith("git.image_encoder."):
        return None, "GiT image encoder (CLIP ViT), unused by AVCap"
    if key.startswith("git.img_temporal_embedding."):
        return None, "GiT video temporal embeddings of CLIP frames, unused by AVCap"
    if key == "git.embeddings.position_ids":
        return None, "position id buffer (recomputed)"
    for theirs, ours in _HF_RENAMES:
        if key.startswith(theirs):
            return ours + key[len(theirs):], None
    return key, None  # matches nothing in the model: reported unexpected


def _encoder_scope(key: str) -> bool:
    return key.startswith(ENCODER_PREFIX)


def _decoder_scope(key: str) -> bool:
    return key.startswith(DECODER_PREFIX)


def _may_lack_head(key: str) -> str | None:
    if key.startswith(ENCODER_PREFIX + "mlp_head."):
        # Released CAV-MAE pretrained weights have no classification head; captioning never uses it.
        return "classification head, not in pretrained CAV-MAE files and unused for captioning"
    return None


def _encoder_misfit(model_key: str, tensor: torch.Tensor, expected: torch.Tensor) -> str | None:
    if model_key.startswith(ENCODER_PREFIX + "mlp_head."):
        return "classification head of another label set (unused for captioning)"
    return None


def _git_misfit(model_key: str, tensor: torch.Tensor, expected: torch.Tensor) -> str | None:
    if model_key == _PROJECTION + "weight" and tensor.dim() == 2 and tensor.shape[0] == expected.shape[0]:
        # GiT-large projects 1024-wide CLIP features; ours projects the encoder's width.
        return "GiT-large projection"
    return None


def _one_frame_into_many(prefix: str):
    def pre_skip(state: Mapping[str, torch.Tensor], model_state: Mapping[str, torch.Tensor]) -> dict[str, str]:
        # The visual embedding of a one-frame checkpoint (Conv2d) into num_frames>1 (Conv3d): the original drops
        # these keys and starts them fresh; so do we, but only in that case, and say so.
        pe = "av_encoder.patch_embed_v.proj.weight"
        file_pe = state.get(prefix + pe[len(ENCODER_PREFIX):] if prefix != ENCODER_PREFIX else pe)
        if pe in model_state and file_pe is not None and file_pe.dim() == 4 and model_state[pe].dim() == 5:
            return {k: "one-frame visual embedding does not fit num_frames>1; freshly initialised"
                    for k in _VISUAL_EMBED_KEYS}
        return {}
    return pre_skip


LAYOUTS = {
    "cav_mae": Layout("cav_mae", _map_cav_mae, _encoder_scope, _may_lack_head, _encoder_misfit,
                      _one_frame_into_many("")),
    "git": Layout("git", _map_git, _decoder_scope, misfit=_git_misfit),
    "avcap_original": Layout("avcap_original", _map_identity, may_be_missing=_may_lack_head,
                             misfit=_encoder_misfit, pre_skip=_one_frame_into_many(ENCODER_PREFIX)),
    HF_KIND: Layout(HF_KIND, _map_hf_git, _decoder_scope, misfit=_git_misfit),
}


def detect_kind(state: Mapping[str, torch.Tensor], path: str = "<state dict>") -> str:
    """Which foreign layout a state dict (already unwrapped) is in."""
    keys = list(state)
    if any(k.startswith(ENCODER_PREFIX) for k in keys):
        return "avcap_original"
    if any(k.startswith(DECODER_PREFIX) for k in keys):
        return "git"
    if any(k.startswith("git.") for k in keys):
        return HF_KIND
    if any(k.split(".")[0] in _ENCODER_ROOTS for k in keys):
        return "cav_mae"
    raise CheckpointError(f"{path}: keys match no known checkpoint layout (CAV-MAE, GiT, Hugging Face GiT, AVCap "
                          f"captioner, ours); first keys: {abbreviate(keys, 6)}")


# ---------------------------------------------------------------------------------------------- sources

@dataclass
class Source:
    """Where a foreign load reads from: the weight files, the Hugging Face config.json (when there is one) and the
    folder holding both (the tokenizer's home)."""
    label: str                      # what the user passed (for messages)
    files: list[Path]
    hf_config: dict | None = None
    folder: Path | None = None


def is_hub_name(name: str) -> bool:
    """`owner/name` that is not a local path: a Hugging Face hub repository."""
    return bool(_HUB_NAME.fullmatch(name)) and not Path(name).exists() and not name.startswith((".", "/", "~"))


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON: {e}") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def hub_snapshot(name: str) -> Path:
    """The local snapshot folder of hub repository `name`: the cached one, else downloaded when the hub is
    reachable. A CheckpointError saying how to fetch it when neither works."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, allow_patterns=HF_HUB_PATTERNS, local_files_only=True))
    except IncompleteSnapshotError as e:
        # Some optional file (e.g. tokenizer_config.json) was not fetched: enough when config and weights are there.
        partial = Path(e.snapshot_path)
        if (partial / "config.json").is_file() and any((partial / f).is_file() for f in HF_WEIGHT_FILES):
            return partial
    except LocalEntryNotFoundError:
        pass
    where = f"{name}: no such file or folder here, and not in the local Hugging Face cache ({constants.HF_HUB_CACHE})"
    how = (f"fetch it once where the hub is reachable (`hf download {name}` or huggingface_hub.snapshot_download"
           f"({name!r})) into the cache, or pass the folder of a save_pretrained copy")
    if constants.HF_HUB_OFFLINE:
        raise CheckpointError(f"{where}, and the hub is switched off (HF_HUB_OFFLINE=1); {how}")
    try:
        return Path(snapshot_download(name, allow_patterns=HF_HUB_PATTERNS))
    except Exception as e:  # unreachable hub, unknown or gated repository: the same advice
        raise CheckpointError(f"{where}, and downloading it failed ({type(e).__name__}: {e}); {how}") from e


def hf_folder_files(folder: Path) -> list[Path]:
    """The weight files of a save_pretrained folder (all shards of a sharded one)."""
    for name in HF_WEIGHT_FILES:
        f = folder / name
        if not f.is_file():
            continue
        if name.endswith(".index.json"):
            weight_map = read_json(f).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{f}: no weight_map in the shard index")
            shards = [folder / s for s in sorted(set(weight_map.values()))]
            absent = [s.name for s in shards if not s.is_file()]
            if absent:
                raise CheckpointError(f"{f}: shards listed in the index are missing: {abbreviate(absent)}")
            return shards
        return [f]
    raise CheckpointError(f"{folder}: a Hugging Face model folder without weights (looked for "
                          f"{', '.join(HF_WEIGHT_FILES)})")


def resolve_source(path: str | Path) -> Source:
    """A foreign weights file, a save_pretrained folder, or a hub name -> the files to read."""
    label = str(path)
    p = Path(path)
    if p.is_file():
        return Source(label, [p])
    if p.is_dir():
        config_file = p / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{p}: a folder without config.json is neither a Hugging Face model folder nor "
                                  "one of our export folders")
        config = read_json(config_file)
        if config.get("model_type") != "git":
            raise CheckpointError(f"{config_file}: model_type {config.get('model_type')!r} is not a GiT model "
                                  "('git'), and the file lacks our export marker")
        return Source(label, hf_folder_files(p), hf_config=config, folder=p)
    if is_hub_name(label):
        snapshot = hub_snapshot(label)
        source = resolve_source(snapshot)
        return Source(label, source.files, source.hf_config, source.folder)
    raise CheckpointError(f"{label}: no such file or folder, and not a Hugging Face hub name (owner/name)")


def read_state(source: Source) -> dict[str, torch.Tensor]:
    """The unwrapped state dict of a source, shards merged; a key in two shards is an error."""
    state: dict[str, torch.Tensor] = {}
    for f in source.files:
        part = unwrap(read_weights_file(f), str(f))
        clash = sorted(set(part) & set(state))
        if clash:
            raise CheckpointError(f"{f}: keys also in another shard: {abbreviate(clash)}")
        state.update(part)
    return state


def tokenizer_source(path: str | Path) -> str | None:
    """Where the tokenizer of a pretrained-text source lives: a Hugging Face GiT folder holding BERT's WordPiece
    vocab.txt, the cached snapshot folder of a hub name, or None (a bare file; a folder without vocab.txt)."""
    p = Path(path)
    if p.is_dir():
        return str(p) if (p / "vocab.txt").is_file() else None
    if not p.exists() and is_hub_name(str(path)):
        return str(hub_snapshot(str(path)))
    return None


# -------------------------------------------------------------------------------------- Hugging Face config

# GitConfig field -> (our AVCapConfig field); shapes show most, but not the head count or the activation.
_HF_SIZES = (("vocab_size", "vocab_size"), ("hidden_size", "text_hidden"), ("num_hidden_layers", "text_layers"),
             ("num_attention_heads", "text_heads"), ("intermediate_size", "text_ffn"),
             ("max_position_embeddings", "max_positions"), ("pad_token_id", "pad_id"), ("bos_token_id", "cls_id"),
             ("eos_token_id", "sep_id"))


def check_hf_config(config: Mapping[str, Any], model_config: Any, where: str) -> None:
    """A Hugging Face GitConfig that disagrees with our model config is an error naming both values."""
    problems = [f"{theirs}={config[theirs]} vs model {ours}={getattr(model_config, ours)}"
                for theirs, ours in _HF_SIZES if theirs in config and config[theirs] is not None
                and config[theirs] != getattr(model_config, ours)]
    act = config.get("hidden_act", "gelu")
    if act != "gelu":
        problems.append(f"hidden_act={act!r} vs model's erf GELU ('gelu')")
    if problems:
        raise CheckpointError(f"{where}: the Hugging Face config does not fit the model: " + "; ".join(problems))


def read_foreign(model: torch.nn.Module, path: str | Path, kind: str = "auto") -> tuple[dict[str, torch.Tensor], Layout, str]:
    """(state dict, its layout, label) of a foreign source, after the Hugging Face config check."""
    if kind not in ("auto",) + KINDS:
        raise ValueError(f"kind must be 'auto', 'ours' or one of {KINDS}, got {kind!r}")
    source = resolve_source(path)
    label = source.label if source.folder is None or source.label == str(source.folder) \
        else f"{source.label} ({source.folder})"
    state = read_state(source)
    detected = HF_KIND if source.hf_config is not None else detect_kind(state, label)
    if kind != "auto" and kind != detected:
        raise CheckpointError(f"{label}: asked to load as {kind!r} but the file is in the {detected!r} layout")
    if source.hf_config is not None and hasattr(model, "cfg"):
        check_hf_config(source.hf_config, model.cfg, str(source.folder / "config.json"))
    return state, LAYOUTS[detected], label
