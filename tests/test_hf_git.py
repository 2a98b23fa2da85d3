"""Hugging Face GiT weights (avcap.foreign, kind `hf-git`) against transformers' own GitForCausalLM.

The reference nobody here wrote: a tiny random GitForCausalLM built by transformers, saved with its own
save_pretrained, and run by its own forward with the image encoder replaced by a module that returns our prefix
features. Every way of passing the weights (folder, sharded folder, pytorch_model.bin folder, bare .safetensors,
hub name from an offline cache) must give the same decoder.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from avcap.checkpoint import CheckpointError, load_pretrained
from avcap.generate import greedy_search_features
from avcap.model import AVCap, AVCapConfig

REPO = Path(__file__).resolve().parent.parent
CLS, SEP, PAD, VOCAB = 101, 102, 0, 1000

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def git_config(**overrides):
    from transformers import GitConfig
    kw = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
              max_position_embeddings=1024, pad_token_id=PAD, bos_token_id=CLS, eos_token_id=SEP,
              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
              vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                 image_size=32, patch_size=16))
    kw.update(overrides)
    return GitConfig(**kw)


def our_model(seed: int = 99, **overrides) -> AVCap:
    torch.manual_seed(seed)  # unlike the GiT model's: a key that failed to load shows up as a mismatch
    kw = dict(depth_a=1, depth_v=1, depth_u=1, dropout=0.0, attention_dropout=0.0)
    kw.update(overrides)
    return AVCap(AVCapConfig.tiny(**kw)).eval()


@pytest.fixture(scope="module")
def hf_git(tmp_path_factory, bert_layout_vocab):
    """A random GitForCausalLM with released-style tied output weights (equal values, stored twice), spread so
    that greedy decisions are far from float ties, saved by transformers in the three folder layouts."""
    from transformers import GitForCausalLM

    torch.manual_seed(0)
    model = GitForCausalLM(git_config()).eval()
    with torch.no_grad():
        words = model.git.embeddings.word_embeddings.weight
        words.mul_(20.0)
        for name, mod in model.git.encoder.named_modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.mul_(10.0)
        model.output.weight.copy_(words)
        model.output.bias.normal_(0.0, 1.0)
        model.output.bias[SEP] = -50.0  # never ends: greedy runs its full 10 steps
    root = tmp_path_factory.mktemp("hf_git")
    folders = {"safetensors": root / "git-tiny", "sharded": root / "git-tiny-sharded", "bin": root / "git-tiny-bin"}
    model.save_pretrained(folders["safetensors"])
    model.save_pretrained(folders["sharded"], max_shard_size="300KB")
    folders["bin"].mkdir()
    shutil.copy(folders["safetensors"] / "config.json", folders["bin"] / "config.json")
    torch.save(model.state_dict(), folders["bin"] / "pytorch_model.bin")
    for f in folders.values():
        (f / "vocab.txt").write_text("".join(t + "\n" for t in bert_layout_vocab), encoding="utf-8")
    assert (folders["sharded"] / "model.safetensors.index.json").is_file()
    return SimpleNamespace(model=model, root=root, **folders)


class Features(torch.nn.Module):
    """Stands in for GiT's CLIP encoder: ignores the pixels, returns the prefix features it was given."""

    def __init__(self, features: torch.Tensor):
        super().__init__()
        self.features = features

    def forward(self, pixel_values, interpolate_pos_encoding=False):
        return SimpleNamespace(last_hidden_state=self.features)


def transformers_logits(hf, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Text logits from transformers' forward over [projected features; tokens]."""
    hf.git.image_encoder = Features(features)
    hf.git.embeddings.LayerNorm.eps = 1e-8  # ours (the original GiT's); transformers' default is 1e-12
    with torch.no_grad():
        out = hf(input_ids=tokens, pixel_values=torch.zeros(features.shape[0], 3, 32, 32))
    return out.logits[:, features.shape[1]:]


def inputs(batch: int = 2, prefix: int = 9, text: int = 7):
    g = torch.Generator().manual_seed(3)
    features = torch.randn(batch, prefix, 64, generator=g)
    tokens = torch.randint(200, VOCAB, (batch, text), generator=g)
    tokens[:, 0] = CLS
    return features, tokens


def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def check_against_transformers(model: AVCap, hf) -> None:
    features, tokens = inputs()
    with torch.no_grad():
        ours = model.decode(features, tokens)
    assert rel_err(ours, transformers_logits(hf, features, tokens)) <= 1e-5


@pytest.mark.parametrize("layout", ["safetensors", "sharded", "bin", "bare"])
def test_every_layout_gives_transformers_logits(hf_git, layout):
    path = hf_git.safetensors / "model.safetensors" if layout == "bare" else getattr(hf_git, layout)
    model = our_model()
    report = load_pretrained(model, path)
    assert report.kind == "hf-git"
    assert sorted(report.loaded) == sorted(k for k in model.state_dict() if k.startswith("textual."))
    skipped = {n.key for n in report.skipped}
    assert skipped and all(k.startswith("git.image_encoder.") for k in skipped)
    assert not report.untied and not report.unexpected and not report.missing
    assert "GiT image encoder" in report.summary()
    check_against_transformers(model, hf_git.model)


def test_greedy_with_kv_cache_equals_transformers_argmax(hf_git):
    model = our_model()
    load_pretrained(model, hf_git.safetensors)
    features, _ = inputs(batch=2)
    steps = 10
    ours, _ = greedy_search_features(model, features, max_steps=steps + 2, use_cache=True)
    tokens = torch.full((2, 1), CLS, dtype=torch.long)
    for _ in range(steps):  # transformers recomputes the whole sequence every step
        nxt = transformers_logits(hf_git.model, features, tokens)[:, -1].argmax(-1)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
    assert torch.equal(ours[:, :steps + 1], tokens)
    assert len(set(tokens[:, 1:].flatten().tolist())) > 3  # a real sequence, not one token repeated


def test_config_mismatch_names_both_values(hf_git):
    # Two heads instead of four: every shape agrees, only config.json can tell.
    with pytest.raises(CheckpointError, match=r"num_attention_heads=4 vs model text_heads=2"):
        load_pretrained(our_model(text_heads=2), hf_git.safetensors)
    with pytest.raises(CheckpointError, match=r"git-tiny.*shape mismatch"):
        load_pretrained(our_model(vocab_size=999), hf_git.safetensors / "model.safetensors")


def test_untied_output_weight_is_reported_and_refused_when_strict(hf_git, tmp_path):
    from safetensors.torch import load_file, save_file
    state = load_file(hf_git.safetensors / "model.safetensors")
    state["output.weight"] = state["output.weight"] + 0.5
    folder = tmp_path / "untied"
    folder.mkdir()
    shutil.copy(hf_git.safetensors / "config.json", folder / "config.json")
    save_file(state, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"untied.*output\.weight differs from git\.embeddings\.word_embeddings"):
        load_pretrained(our_model(), folder)
    model = our_model()
    report = load_pretrained(model, folder, strict=False)
    assert [n.key for n in report.untied] == ["output.weight"]
    assert "untied" in report.summary()
    # the tie holds: both names are the file's word embeddings
    assert torch.equal(model.textual.output.weight, state["git.embeddings.word_embeddings.weight"])
    assert model.textual.output.weight is model.textual.embedding.words.weight


def test_a_folder_that_is_not_git_is_refused(hf_git, tmp_path):
    folder = tmp_path / "bert"
    shutil.copytree(hf_git.safetensors, folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "bert"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model_type 'bert' is not a GiT model"):
        load_pretrained(our_model(), folder)
    with pytest.raises(CheckpointError, match=r"nowhere/at-all.*no such file"):
        load_pretrained(our_model(), "./nowhere/at-all")


HUB_SCRIPT = """
import sys
from avcap.checkpoint import CheckpointError, load_pretrained
from avcap.foreign import tokenizer_source
from avcap.model import AVCap, AVCapConfig
from avcap.tokenizer import load_tokenizer
model = AVCap(AVCapConfig.tiny(depth_a=1, depth_v=1, depth_u=1))
report = load_pretrained(model, "avcap-test/git-tiny")
print("KIND", report.kind, len(report.loaded))
tok = load_tokenizer(tokenizer_source("avcap-test/git-tiny"))
print("CLS", tok.cls_token_id, len(tok))
try:
    load_pretrained(model, "avcap-test/not-cached")
except CheckpointError as e:
    print("ERROR", e)
"""


def test_hub_name_resolves_from_an_offline_cache(hf_git, tmp_path):
    # The hub cache layout huggingface_hub reads: models--OWNER--NAME/{refs/main, snapshots/<commit>/...}
    cache = tmp_path / "hub"
    repo = cache / "models--avcap-test--git-tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(hf_git.safetensors, repo / "snapshots" / commit)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", HUB_SCRIPT], env=env, cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in r.stdout.splitlines() if " " in line}
    assert lines["KIND"] == f"hf-git {sum(k.startswith('textual.') for k in our_model().state_dict())}"
    assert lines["CLS"] == f"{CLS} {VOCAB}"
    error = lines["ERROR"]
    assert "avcap-test/not-cached: no such file or folder here, and not in the local Hugging Face cache" in error
    assert "HF_HUB_OFFLINE=1" in error and "hf download avcap-test/not-cached" in error


def test_train_takes_decoder_and_tokenizer_from_a_hugging_face_folder(learnable_data, tmp_path, capsys):
    """train.py --pretrained-text FOLDER without --vocab: the folder's weights and its vocab.txt."""
    from transformers import GitForCausalLM
    from avcap.checkpoint import load_checkpoint
    from avcap.tokenizer import load_tokenizer, read_vocab_file, special_ids
    from avcap.training import TrainConfig, train
    from tests.fixtures_train import TINY_MODEL_OVERRIDES as O

    ids = special_ids(load_tokenizer(learnable_data.vocab))
    vocab = read_vocab_file(learnable_data.vocab)
    torch.manual_seed(1)
    hf = GitForCausalLM(git_config(vocab_size=len(vocab), hidden_size=O["text_hidden"],
                                   num_hidden_layers=O["text_layers"], num_attention_heads=O["text_heads"],
                                   intermediate_size=O["text_ffn"], max_position_embeddings=O["max_positions"],
                                   pad_token_id=ids.pad, bos_token_id=ids.cls, eos_token_id=ids.sep,
                                   vision_config=dict(hidden_size=O["embed_dim"], intermediate_size=64,
                                                      num_hidden_layers=1, num_attention_heads=2, image_size=32,
                                                      patch_size=16)))
    with torch.no_grad():
        hf.output.weight.copy_(hf.git.embeddings.word_embeddings.weight)
    folder = tmp_path / "git-for-train"
    hf.save_pretrained(folder)
    shutil.copy(learnable_data.vocab, folder / "vocab.txt")

    out = tmp_path / "run"
    cfg = TrainConfig(data=str(learnable_data.root), out=str(out), pretrained_text=str(folder), model="tiny",
                      model_overrides=learnable_data.model_overrides, batch_size=4, num_workers=0, epochs=1,
                      max_steps=1, eval_every=0, progress=False, tensorboard=False, lr=1e-12, warmup_lr=0.0,
                      freeze_encoder=True)
    assert cfg.vocab == ""
    train(cfg)
    assert f"pretrained weights from {folder}" in capsys.readouterr().out
    assert read_vocab_file(out / "vocab.txt") == vocab  # the folder's tokenizer, not bert-base-uncased
    state = load_checkpoint(out / "checkpoints" / "latest.pt").model.state_dict()
    # one step at lr ~0 (AdamW's first step moves by ~lr): the decoder is the file's
    torch.testing.assert_close(state["textual.transformer.encoder.layer.0.intermediate.dense.weight"],
                               hf.git.encoder.layer[0].intermediate.dense.weight, rtol=0, atol=1e-9)
    torch.testing.assert_close(state["textual.av_projection.0.weight"],
                               hf.git.visual_projection.visual_projection[0].weight, rtol=0, atol=1e-9)


def test_a_wider_projection_like_git_large_is_a_reported_skip(hf_git, tmp_path):
    from safetensors.torch import load_file, save_file
    state = load_file(hf_git.safetensors / "model.safetensors")
    state["git.visual_projection.visual_projection.0.weight"] = torch.randn(64, 96)  # 96-wide image features
    folder = tmp_path / "wide"
    folder.mkdir()
    config = json.loads((hf_git.safetensors / "config.json").read_text())
    config["vision_config"]["hidden_size"] = 96
    (folder / "config.json").write_text(json.dumps(config))
    save_file(state, folder / "model.safetensors")
    model = our_model()
    fresh = model.textual.av_projection[0].weight.clone()
    report = load_pretrained(model, folder)
    skipped = {n.key: n.reason for n in report.skipped if n.key.startswith("textual.")}
    assert set(skipped) == {"textual.av_projection.0.weight", "textual.av_projection.0.bias"}
    assert "GiT-large projection [64, 96] does not fit [64, 64]" in skipped["textual.av_projection.0.weight"]
    assert torch.equal(model.textual.av_projection[0].weight, fresh)
    assert torch.equal(model.textual.embedding.words.weight, state["git.embeddings.word_embeddings.weight"])
