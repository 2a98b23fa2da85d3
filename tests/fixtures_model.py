"""Fixtures for the model, tokenizer and checkpoint tests (register as "tests.fixtures_model" in conftest).

- `reference_dir`, `reference_inputs`, `reference_expected`: tests/data/reference/tiny_avcap_seed1234 and its
  tensors (the original implementation's outputs for a tiny random model).
- `tiny_config`: AVCapConfig.tiny() with dropout off, the reference model's config.
- `caption_vocab_path` / `caption_tokenizer`: a 1000-piece uncased WordPiece vocab learned from AudioCaps train
  captions ([PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4).
- `bert_layout_vocab`: 1000 tokens laid out like bert-base-uncased ([PAD]=0, [unused*], [UNK]=100, [CLS]=101,
  [SEP]=102, [MASK]=103, then caption wordpieces), so it fits the reference model's special ids.
- `plain_loss`: the training loss in its plain form (before the training path skipped unread work), for
  tests/test_train_step.py and benchmarks/profile_train_step.py.
- `original_checkpoints`: the reference weights in every layout a user may bring, as files: the three reference
  files plus a CAV-MAE pretraining file (no mlp_head, with the MAE decoder keys), GiT-large (no `module.`, a
  1024-wide projection) and a DDP-saved captioner (`module.` prefix).
"""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from tests.conftest import AUDIOCAPS_DIR, REFERENCE_DIR

TINY_REFERENCE = REFERENCE_DIR / "tiny_avcap_seed1234"
FULL_SIZE_SHAPES = REFERENCE_DIR / "full_size_state_dict_shapes.json"
AUDIOCAPS_TRAIN = AUDIOCAPS_DIR / "train.csv"


def audiocaps_captions(limit: int = 2000) -> list[str]:
    with open(AUDIOCAPS_TRAIN, newline="", encoding="utf-8") as f:
        return [row["caption"] for _, row in zip(range(limit), csv.DictReader(f))]


def bert_layout(pieces: list[str], size: int = 1000) -> list[str]:
    """A vocab with bert-base-uncased's special ids, filled with `pieces` (special tokens among them dropped)."""
    head = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    rest = [p for p in pieces if p not in head]
    vocab = head + rest[:size - len(head)]
    if len(vocab) != size:
        raise ValueError(f"bert_layout: only {len(vocab)} tokens available for a vocab of {size}")
    return vocab


def spread_decoder_weights(model) -> None:
    """Scale a fresh model's decoder as the reference weights were (word embeddings x2, decoder Linear weights x10,
    output bias ~N(0,1)), so logits are spread and argmax decisions sit far from float ties: cached and recomputed
    generation can then be required to emit the same tokens."""
    with torch.no_grad():
        model.textual.embedding.words.weight.mul_(2.0)
        for name, mod in model.textual.named_modules():
            if isinstance(mod, torch.nn.Linear) and name != "output":
                mod.weight.mul_(10.0)
        model.textual.output.bias.normal_(0.0, 1.0)


def plain_loss(model, audio, visual, tokens, need_predict) -> torch.Tensor:
    """The training loss in its plain form, as the model computed it before the training path skipped unread
    work: every decoder layer over every row, logits at every position, then the label-smoothed KL as smoothed
    cross-entropy (log-softmax, gather, sum) minus the entropy of the target distribution."""
    import math

    import torch.nn.functional as F
    from avcap.model import prefix_mask

    text = model.textual
    prefix, emb = text.av_projection(model.encode(audio, visual)), text.embedding(tokens)
    P, T = prefix.shape[1], emb.shape[1]
    x = torch.cat([prefix, emb], dim=1)
    mask = prefix_mask(P, T, x.device)
    for layer in text.layers:
        x = layer.finish(x, layer.attend(*layer.qkv(x), mask))
    logits = text.output(x[:, P:])
    valid = need_predict[:, 1:] == 1
    logp = F.log_softmax(logits[:, :-1][valid].float(), dim=-1)
    target = tokens[:, 1:][valid]
    V, eps = logp.shape[-1], model.cfg.label_smoothing
    on, off = 1.0 - eps, eps / (V - 1)
    logp_target = logp.gather(-1, target[:, None]).squeeze(-1)
    ce = -(on * logp_target + off * (logp.sum(-1) - logp_target))
    entropy = -(on * math.log(on) + ((V - 1) * off * math.log(off) if off > 0 else 0.0))
    return (ce - entropy).mean()


def pretraining_only_keys(dim: int) -> dict[str, torch.Tensor]:
    """The 173 pretraining-only keys of a CAV-MAE release (MAE decoder, mask token), small random tensors."""
    g = torch.Generator().manual_seed(7)
    keys = {"mask_token": [1, 1, dim], "decoder_modality_a": [1, 1, dim], "decoder_modality_v": [1, 1, dim],
            "decoder_pos_embed_a": [1, 512, dim], "decoder_pos_embed_v": [1, 196, dim],
            "decoder_embed.weight": [dim, dim], "decoder_embed.bias": [dim], "decoder_norm.weight": [dim],
            "decoder_norm.bias": [dim], "decoder_pred_a.weight": [256, dim], "decoder_pred_a.bias": [256],
            "decoder_pred_v.weight": [768, dim], "decoder_pred_v.bias": [768]}
    block = ["norm1", "norm1_a", "norm1_v", "norm2", "norm2_a", "norm2_v"]
    for i in range(8):
        for n in block:
            keys[f"decoder_blocks.{i}.{n}.weight"] = [dim]
            keys[f"decoder_blocks.{i}.{n}.bias"] = [dim]
        for n, shape in (("attn.qkv", [3 * dim, dim]), ("attn.proj", [dim, dim]), ("mlp.fc1", [4 * dim, dim]),
                         ("mlp.fc2", [dim, 4 * dim])):
            keys[f"decoder_blocks.{i}.{n}.weight"] = shape
            keys[f"decoder_blocks.{i}.{n}.bias"] = shape[:1]
    assert len(keys) == 173
    return {k: torch.randn(s, generator=g) for k, s in keys.items()}


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    # The fixtures are part of the repository: a missing one is a broken checkout, so fail loudly.
    missing = [n for n in ("config.json", "inputs.pt", "expected.pt", "avcap_state_dict.pt", "cav_mae.pth", "git.pt")
               if not (TINY_REFERENCE / n).is_file()]
    if missing:
        pytest.fail(f"reference fixtures missing from {TINY_REFERENCE}: {', '.join(missing)}")
    return TINY_REFERENCE


@pytest.fixture(scope="session")
def reference_inputs(reference_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(reference_dir / "inputs.pt", weights_only=True)


@pytest.fixture(scope="session")
def reference_expected(reference_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(reference_dir / "expected.pt", weights_only=True)


@pytest.fixture
def tiny_config():
    from avcap.model import AVCapConfig
    return AVCapConfig.tiny(dropout=0.0, attention_dropout=0.0)


@pytest.fixture(scope="session")
def caption_vocab_path(tmp_path_factory) -> Path:
    from avcap.tokenizer import build_wordpiece_vocab
    return build_wordpiece_vocab(audiocaps_captions(), tmp_path_factory.mktemp("vocab") / "vocab.txt",
                                 vocab_size=1000)


@pytest.fixture(scope="session")
def caption_tokenizer(caption_vocab_path: Path):
    from avcap.tokenizer import load_tokenizer
    return load_tokenizer(caption_vocab_path)


@pytest.fixture(scope="session")
def bert_layout_vocab(caption_vocab_path: Path) -> list[str]:
    from avcap.tokenizer import read_vocab_file
    return bert_layout(read_vocab_file(caption_vocab_path))


@pytest.fixture(scope="session")
def original_checkpoints(reference_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """kind-ish name -> file: cav_mae, cav_mae_pretrain, git_base, git_large, avcap_original, avcap_ddp."""
    out = tmp_path_factory.mktemp("original_ckpts")
    full = torch.load(reference_dir / "avcap_state_dict.pt", weights_only=True)
    encoder = {k[len("av_encoder."):]: v for k, v in full.items() if k.startswith("av_encoder.")}
    textual = {k: v for k, v in full.items() if k.startswith("textual.")}
    dim = encoder["norm.weight"].shape[0]

    pretrain = {"module." + k: v for k, v in encoder.items() if not k.startswith("mlp_head.")}
    pretrain.update({"module." + k: v for k, v in pretraining_only_keys(dim).items()})
    torch.save(pretrain, out / "cav_mae_pretrain.pth")

    g = torch.Generator().manual_seed(11)
    large = {k.replace("textual.av_projection.", "textual.visual_projection."): v for k, v in textual.items()}
    large["textual.visual_projection.0.weight"] = torch.randn(textual["textual.av_projection.0.weight"].shape[0],
                                                              1024, generator=g)
    large["image_encoder.conv1.weight"] = torch.randn(8, 3, 4, 4, generator=g)
    torch.save({"model": large}, out / "git_large.pt")

    torch.save({"module." + k: v for k, v in full.items()}, out / "avcap_ddp.pt")
    return {"cav_mae": reference_dir / "cav_mae.pth", "cav_mae_pretrain": out / "cav_mae_pretrain.pth",
            "git_base": reference_dir / "git.pt", "git_large": out / "git_large.pt",
            "avcap_original": reference_dir / "avcap_state_dict.pt", "avcap_ddp": out / "avcap_ddp.pt"}
