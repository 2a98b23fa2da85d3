"""Checkpoint loading (every layout a user brings) and our own save/load format.

The numerical checks load tests/data/reference/tiny_avcap_seed1234 through avcap.checkpoint and compare with
what the ORIGINAL implementation computed on the same weights (features, logits, loss, beam-search ids).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from avcap.checkpoint import (CheckpointError, LoadReport, load_checkpoint, load_pretrained, map_state_dict,
                              read_torch_file, save_checkpoint)
from avcap.generate import beam_search, beam_search_features
from avcap.model import AVCap, AVCapConfig
from avcap.tokenizer import decode_batch
from tests.fixtures_model import FULL_SIZE_SHAPES, pretraining_only_keys

RTOL, ATOL = 1e-4, 1e-5


def fresh(config: AVCapConfig, seed: int = 99) -> AVCap:
    # A different seed from the reference's, so that a key that silently failed to load shows up as a mismatch.
    torch.manual_seed(seed)
    return AVCap(config).eval()


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL)


def check_encoder(model: AVCap, inputs, expected, modes: tuple[str, ...] = ("av", "audio", "visual")) -> None:
    with torch.no_grad():
        for mode in modes:
            name = {"av": "features_av", "audio": "features_audio", "visual": "features_visual"}[mode]
            assert_close(model.encode(inputs["audio"], inputs["visual"], mode), expected[name])


def check_decoder(model: AVCap, inputs, expected) -> None:
    with torch.no_grad():
        logits = model.decode(expected["features_av"], inputs["caption_tokens"])
        assert_close(logits, expected["logits"])
        tokens, _ = beam_search_features(model, expected["features_av"], beam_size=4, per_node_beam=2,
                                         length_penalty=0.6, max_steps=20)
    assert torch.equal(tokens, expected["predictions"])


# ------------------------------------------------------------------------------------- the reference, 3 layouts

def test_captioner_state_dict_reproduces_reference(tiny_config, original_checkpoints, reference_inputs,
                                                   reference_expected):
    model = fresh(tiny_config)
    report = load_pretrained(model, original_checkpoints["avcap_original"])
    assert report.kind == "avcap_original"
    assert len(report.loaded) == len(model.state_dict()) and not report.missing and not report.skipped
    check_encoder(model, reference_inputs, reference_expected)
    with torch.no_grad():
        out = model(reference_inputs["audio"], reference_inputs["visual"], reference_inputs["caption_tokens"],
                    reference_inputs["need_predict"])
        assert_close(out["logits"], reference_expected["logits"])
        assert_close(out["loss"], reference_expected["loss"])
        tokens, logprobs = beam_search(model, reference_inputs["audio"], reference_inputs["visual"], beam_size=4,
                                       per_node_beam=2, length_penalty=0.6, max_steps=20)
    assert torch.equal(tokens, reference_expected["predictions"])
    assert_close(logprobs.float(), reference_expected["logprobs"])


def test_cav_mae_file_alone_reproduces_encoder(tiny_config, original_checkpoints, reference_inputs,
                                               reference_expected):
    model = fresh(tiny_config)
    decoder_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("textual.")}
    report = load_pretrained(model, original_checkpoints["cav_mae"])
    assert report.kind == "cav_mae"
    assert sorted(report.loaded) == sorted(k for k in model.state_dict() if k.startswith("av_encoder."))
    assert sorted(report.not_covered) == sorted(decoder_before)
    check_encoder(model, reference_inputs, reference_expected)
    for k, v in decoder_before.items():  # a layout never touches what it does not hold
        assert torch.equal(model.state_dict()[k], v), k


def test_git_file_alone_reproduces_decoder(tiny_config, original_checkpoints, reference_inputs,
                                           reference_expected):
    model = fresh(tiny_config)
    report = load_pretrained(model, original_checkpoints["git_base"])
    assert report.kind == "git"
    # visual_projection -> av_projection: the original left this random; the reference logits need it loaded.
    assert {"textual.av_projection.0.weight", "textual.av_projection.0.bias", "textual.av_projection.1.weight",
            "textual.av_projection.1.bias"} <= set(report.loaded)
    assert [n.key for n in report.skipped] == ["image_encoder.patch_embed.weight"]
    check_decoder(model, reference_inputs, reference_expected)


def test_encoder_and_decoder_files_together_caption_like_reference(tiny_config, original_checkpoints,
                                                                   reference_inputs, reference_expected):
    model = fresh(tiny_config)
    load_pretrained(model, original_checkpoints["cav_mae"], kind="cav_mae")
    load_pretrained(model, original_checkpoints["git_base"], kind="git")
    with torch.no_grad():
        out = model(reference_inputs["audio"], reference_inputs["visual"], reference_inputs["caption_tokens"],
                    reference_inputs["need_predict"])
        tokens, _ = beam_search(model, reference_inputs["audio"], reference_inputs["visual"], max_steps=20)
    assert_close(out["loss"], reference_expected["loss"])
    assert torch.equal(tokens, reference_expected["predictions"])


# ------------------------------------------------------------------------------------------- other layouts

def test_cav_mae_pretraining_file_skips_mae_decoder(tiny_config, original_checkpoints, reference_inputs,
                                                    reference_expected):
    model = fresh(tiny_config)
    report = load_pretrained(model, original_checkpoints["cav_mae_pretrain"])
    assert report.kind == "cav_mae"
    assert len(report.skipped) == 173
    assert all("pretraining-only" in n.reason for n in report.skipped)
    # mlp_head is absent from released pretrained weights: reported missing, allowed, encoder output unaffected
    assert sorted(n.key for n in report.missing) == sorted(k for k in model.state_dict()
                                                           if k.startswith("av_encoder.mlp_head."))
    check_encoder(model, reference_inputs, reference_expected, modes=("av",))
    assert "pretraining-only" in report.summary()


def test_git_large_projection_is_skipped_and_stays_fresh(tiny_config, original_checkpoints, reference_expected):
    model = fresh(tiny_config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_pretrained(model, original_checkpoints["git_large"])
    assert report.kind == "git"
    skipped = {n.key for n in report.skipped}
    assert {"textual.av_projection.0.weight", "textual.av_projection.0.bias", "image_encoder.conv1.weight"} == skipped
    after = model.state_dict()
    assert torch.equal(after["textual.av_projection.0.weight"], before["textual.av_projection.0.weight"])
    ref = torch.load(original_checkpoints["avcap_original"], weights_only=True)
    for k in ("textual.av_projection.1.weight", "textual.embedding.words.weight",
              "textual.transformer.encoder.layer.1.output.dense.weight"):
        assert torch.equal(after[k], ref[k]), k
    assert "GiT-large projection" in report.summary()


def test_ddp_prefixed_captioner_loads(tiny_config, original_checkpoints, reference_inputs, reference_expected):
    model = fresh(tiny_config)
    report = load_pretrained(model, original_checkpoints["avcap_ddp"])
    assert report.kind == "avcap_original" and len(report.loaded) == len(model.state_dict())
    check_encoder(model, reference_inputs, reference_expected, modes=("av",))


def test_one_frame_encoder_into_four_frames_skips_visual_embedding(original_checkpoints):
    model = fresh(AVCapConfig.tiny(num_frames=4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_pretrained(model, original_checkpoints["cav_mae"])
    skipped = {n.key for n in report.skipped}
    assert skipped == {"av_encoder.patch_embed_v.proj.weight", "av_encoder.patch_embed_v.proj.bias",
                       "av_encoder.pos_embed_v"}
    ref = torch.load(original_checkpoints["cav_mae"], weights_only=True)
    after = model.state_dict()
    assert torch.equal(after["av_encoder.pos_embed_v"], before["av_encoder.pos_embed_v"])
    assert torch.equal(after["av_encoder.patch_embed_a.proj.weight"], ref["module.patch_embed_a.proj.weight"])
    assert torch.equal(after["av_encoder.blocks_v.3.attn.qkv.weight"], ref["module.blocks_v.3.attn.qkv.weight"])


def test_loading_keeps_freezing(tiny_config, original_checkpoints):
    model = fresh(tiny_config)
    model.freeze_decoder()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    load_pretrained(model, original_checkpoints["git_base"])
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    # the GiT projection is now loaded and still trainable (the original froze a random one)
    assert model.textual.av_projection[0].weight.requires_grad
    assert not model.textual.embedding.words.weight.requires_grad


def test_single_modality_model_still_loads_every_parameter(original_checkpoints, reference_inputs,
                                                           reference_expected):
    # An audio-only model holds (and loads) the visual branch too, only marked not trainable, so the same
    # weights can later run in another mode.
    model = fresh(AVCapConfig.tiny(mode="audio", dropout=0.0, attention_dropout=0.0))
    report = load_pretrained(model, original_checkpoints["avcap_original"])
    assert len(report.loaded) == len(model.state_dict())
    assert not model.av_encoder.patch_embed_v.proj.weight.requires_grad
    with torch.no_grad():
        assert_close(model.encode(None, reference_inputs["visual"], "visual"), reference_expected["features_visual"])


# ------------------------------------------------------------------------------ full size, shapes only (meta)

def _meta(shapes: dict[str, list[int]], prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: torch.empty(s, device="meta") for k, s in shapes.items()}


@pytest.mark.parametrize("num_frames", [1, 4])
def test_full_size_layouts_cover_every_reference_key(num_frames):
    shapes = json.loads(FULL_SIZE_SHAPES.read_text())
    encoder = shapes[f"cav_mae_finetune_encoder_frames{num_frames}"]
    textual = shapes["avcap_textual_decoder_base"]
    with torch.device("meta"):
        model = AVCap(AVCapConfig.full(cls_id=101, sep_id=102, pad_id=0, num_frames=num_frames))
    model_shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    expected = {"av_encoder." + k: s for k, s in encoder.items()} | textual
    assert model_shapes == expected

    # original captioner
    to_load, report = map_state_dict(model, _meta(expected), path="avcap.pt")
    assert report.kind == "avcap_original" and sorted(to_load) == sorted(expected)
    model.load_state_dict(to_load, strict=True)

    # CAV-MAE scale++: module. + 474 encoder keys (no mlp_head) + 173 pretraining-only keys
    cav = _meta({k: s for k, s in encoder.items() if not k.startswith("mlp_head.")}, "module.")
    cav |= {"module." + k: v.to("meta") for k, v in pretraining_only_keys(768).items()}
    assert len(cav) == 474 + 173
    to_load, report = map_state_dict(model, cav, path="cav-mae-scale++.pth")
    assert report.kind == "cav_mae" and len(report.loaded) == 474 and len(report.skipped) == 173
    assert {n.key for n in report.missing} == {"av_encoder.mlp_head." + s for s in
                                               ("0.weight", "0.bias", "1.weight", "1.bias")}

    # GiT base: {"model": ...}, module.textual.*, visual_projection, image_encoder
    git = {k.replace("textual.av_projection.", "textual.visual_projection."): s for k, s in textual.items()}
    git_base = _meta(git, "module.") | {"module.image_encoder.conv1.weight": torch.empty(768, 3, 16, 16,
                                                                                          device="meta")}
    to_load, report = map_state_dict(model, {"model": git_base}, path="model_git_base.pt")
    assert report.kind == "git" and sorted(report.loaded) == sorted(textual)

    # GiT large: no module. prefix, a [768, 1024] projection
    git_large = _meta(git) | {"textual.visual_projection.0.weight": torch.empty(768, 1024, device="meta")}
    to_load, report = map_state_dict(model, {"model": git_large}, path="model_git_large.pt")
    assert {n.key for n in report.skipped} == {"textual.av_projection.0.weight", "textual.av_projection.0.bias"}
    assert len(report.loaded) == len(textual) - 2

    if num_frames > 1:  # a one-frame CAV-MAE into a 4-frame model
        one = _meta(shapes["cav_mae_finetune_encoder_frames1"], "module.")
        _, report = map_state_dict(model, one, path="cav-mae-1frame.pth")
        assert {n.key for n in report.skipped} == {"av_encoder.patch_embed_v.proj.weight",
                                                   "av_encoder.patch_embed_v.proj.bias", "av_encoder.pos_embed_v"}


# ------------------------------------------------------------------------------------------- bad checkpoints

def test_truncated_file_names_the_file(original_checkpoints, tmp_path, tiny_config):
    data = original_checkpoints["avcap_original"].read_bytes()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.pt"):
        load_pretrained(fresh(tiny_config), bad)
    # the legacy (pre-zip) serialization fails differently inside torch; same kind of message here
    legacy = tmp_path / "legacy.pth"
    torch.save(torch.load(original_checkpoints["cav_mae"], weights_only=True), legacy,
               _use_new_zipfile_serialization=False)
    legacy.write_bytes(legacy.read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match=r"legacy\.pth: cannot read checkpoint \(truncated or corrupt"):
        load_pretrained(fresh(tiny_config), legacy)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.pt"):
        load_pretrained(fresh(tiny_config), tmp_path / "empty.pt")


def test_checkpoint_missing_keys_names_file_and_keys(original_checkpoints, tmp_path, tiny_config):
    state = torch.load(original_checkpoints["avcap_original"], weights_only=True)
    del state["av_encoder.blocks_v.7.mlp.fc2.weight"], state["textual.transformer.encoder.layer.1.output.dense.bias"]
    path = tmp_path / "cut.pt"
    torch.save(state, path)
    model = fresh(tiny_config)
    with pytest.raises(CheckpointError) as err:
        load_pretrained(model, path)
    msg = str(err.value)
    assert "cut.pt" in msg and "av_encoder.blocks_v.7.mlp.fc2.weight" in msg
    assert "textual.transformer.encoder.layer.1.output.dense.bias" in msg
    # non-strict loads the rest and reports the two as missing
    report = load_pretrained(model, path, strict=False)
    assert {n.key for n in report.missing} == {"av_encoder.blocks_v.7.mlp.fc2.weight",
                                               "textual.transformer.encoder.layer.1.output.dense.bias"}


def test_unrelated_file_names_file_and_keys(tmp_path, tiny_config):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3), "fc.bias": torch.zeros(10)}, path)
    with pytest.raises(CheckpointError, match=r"resnet\.pth.*conv1\.weight"):
        load_pretrained(fresh(tiny_config), path)


def test_shape_mismatch_names_file_and_keys(original_checkpoints, tiny_config):
    model = fresh(AVCapConfig.tiny(vocab_size=999))
    with pytest.raises(CheckpointError) as err:
        load_pretrained(model, original_checkpoints["git_base"])
    msg = str(err.value)
    assert "git.pt" in msg and "textual.embedding.words.weight" in msg and "[1000, 64]" in msg


def test_unknown_extra_key_is_an_error_when_strict(original_checkpoints, tmp_path, tiny_config):
    state = torch.load(original_checkpoints["avcap_original"], weights_only=True)
    state["av_encoder.blocks_u.1.attn.qkv.weight"] = torch.zeros(192, 64)  # a deeper model's block
    path = tmp_path / "deeper.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"deeper\.pt.*blocks_u\.1\.attn\.qkv\.weight"):
        load_pretrained(fresh(tiny_config), path)
    report = load_pretrained(fresh(tiny_config), path, strict=False)
    assert [n.key for n in report.unexpected] == ["av_encoder.blocks_u.1.attn.qkv.weight"]


def test_untied_output_weight_is_refused(original_checkpoints, tmp_path, tiny_config):
    state = torch.load(original_checkpoints["avcap_original"], weights_only=True)
    state["textual.output.weight"] = state["textual.output.weight"] + 1.0
    path = tmp_path / "untied.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"untied\.pt.*textual\.output\.weight"):
        load_pretrained(fresh(tiny_config), path)


def test_file_with_arbitrary_objects_is_refused(tmp_path, tiny_config):
    path = tmp_path / "pickled.pt"
    torch.save({"model": {"x": Path("/etc/passwd")}}, path)
    with pytest.raises(CheckpointError, match=r"pickled\.pt: .*objects other than tensors.*never loads"):
        load_pretrained(fresh(tiny_config), path)


def test_wrong_kind_is_refused(original_checkpoints, tiny_config):
    with pytest.raises(CheckpointError, match="cav_mae.pth"):
        load_pretrained(fresh(tiny_config), original_checkpoints["cav_mae"], kind="git")


# ------------------------------------------------------------------------------------------------ our format

def _save(path, model, config, vocab, **kw):
    kw.setdefault("norm_stats", {"mean": -4.346, "std": 4.332})
    kw.setdefault("frames_per_clip", 20)
    return save_checkpoint(path, model, config, vocab, **kw)


def test_our_checkpoint_alone_captions_like_reference(tiny_config, original_checkpoints, bert_layout_vocab,
                                                      reference_inputs, reference_expected, tmp_path):
    model = fresh(tiny_config)
    load_pretrained(model, original_checkpoints["avcap_original"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    rng = torch.get_rng_state()
    path = _save(tmp_path / "run" / "ckpt.pt", model, tiny_config, bert_layout_vocab,
                 extra={"optimizer": opt.state_dict(), "rng": rng, "step": 1})
    assert sorted(os.listdir(path.parent)) == ["ckpt.pt"]  # no temp file left behind

    raw = read_torch_file(path)  # weights_only=True
    assert raw["format_version"] == 1 and raw["config"]["frames_per_clip"] == 20
    loaded = load_checkpoint(path)
    assert loaded.config == tiny_config
    assert loaded.norm_stats == {"mean": -4.346, "std": 4.332} and loaded.frames_per_clip == 20
    assert loaded.vocab == bert_layout_vocab and loaded.tokenizer.cls_token_id == 101
    assert loaded.extra["step"] == 1 and torch.equal(loaded.extra["rng"], rng)
    assert loaded.extra["optimizer"]["param_groups"][0]["lr"] == 1e-4
    assert not loaded.model.training
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k
    # the tie survives the round trip: one parameter, not two copies
    assert loaded.model.textual.output.weight is loaded.model.textual.embedding.words.weight
    # the checkpoint alone captions: the original's token ids, decoded by the stored tokenizer
    with torch.no_grad():
        tokens, _ = beam_search(loaded.model, reference_inputs["audio"], reference_inputs["visual"], max_steps=20)
    assert torch.equal(tokens, reference_expected["predictions"])
    texts = decode_batch(loaded.tokenizer, tokens)
    assert texts[0].split()[0] == bert_layout_vocab[334]


def test_our_checkpoint_via_load_pretrained(tiny_config, original_checkpoints, bert_layout_vocab, tmp_path,
                                            reference_inputs, reference_expected):
    model = fresh(tiny_config)
    load_pretrained(model, original_checkpoints["avcap_original"])
    path = _save(tmp_path / "c.pt", model, tiny_config, "\n".join(bert_layout_vocab) + "\n")
    other = fresh(tiny_config, seed=5)
    report = load_pretrained(other, path)
    assert report.kind == "ours" and len(report.loaded) == len(other.state_dict())
    check_encoder(other, reference_inputs, reference_expected, modes=("av",))
    with pytest.raises(CheckpointError, match=r"c\.pt.*shape mismatch"):
        load_pretrained(fresh(AVCapConfig.tiny(num_frames=2)), path)


def test_save_refuses_inconsistent_or_unloadable_input(tiny_config, caption_vocab_path, bert_layout_vocab,
                                                       tmp_path):
    model = fresh(tiny_config)
    from avcap.tokenizer import read_vocab_file
    with pytest.raises(ValueError, match="cls_id=101 but the tokenizer's is 2"):
        _save(tmp_path / "a.pt", model, tiny_config, read_vocab_file(caption_vocab_path))
    with pytest.raises(ValueError, match="does not describe the model"):
        _save(tmp_path / "b.pt", model, AVCapConfig.tiny(text_layers=3), bert_layout_vocab)
    with pytest.raises(TypeError, match=r"extra\['paths'\]\[0\].*PosixPath"):
        _save(tmp_path / "c.pt", model, tiny_config, bert_layout_vocab, extra={"paths": [tmp_path]})
    with pytest.raises(TypeError, match=r"extra\['lr'\] is a float64"):  # numpy scalars fail weights_only loads
        _save(tmp_path / "c.pt", model, tiny_config, bert_layout_vocab, extra={"lr": np.float64(1e-4)})
    with pytest.raises(ValueError, match="reserved"):
        _save(tmp_path / "d.pt", model, tiny_config, bert_layout_vocab, extra={"config": {}})
    with pytest.raises(ValueError, match="frames_per_clip"):
        _save(tmp_path / "e.pt", model, tiny_config, bert_layout_vocab, frames_per_clip=0)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_our_checkpoint_from_newer_version_or_truncated(tiny_config, bert_layout_vocab, original_checkpoints,
                                                        tmp_path):
    model = fresh(tiny_config)
    path = _save(tmp_path / "c.pt", model, tiny_config, bert_layout_vocab)
    raw = torch.load(path, weights_only=True)
    raw["format_version"] = 99
    torch.save(raw, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match=r"future\.pt.*format_version 99"):
        load_checkpoint(tmp_path / "future.pt")
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) - 4096])
    with pytest.raises(CheckpointError, match=r"cut\.pt"):
        load_checkpoint(tmp_path / "cut.pt")
    with pytest.raises(CheckpointError, match="not one of our checkpoints"):
        load_checkpoint(original_checkpoints["avcap_original"])


def test_report_summary_is_readable(tiny_config, original_checkpoints):
    report = load_pretrained(fresh(tiny_config), original_checkpoints["git_large"])
    assert isinstance(report, LoadReport)
    text = report.summary()
    assert text.splitlines()[0].startswith(str(original_checkpoints["git_large"]))
    assert "loaded 40" in text and "skipped 3" in text and "not covered by this layout 478" in text
