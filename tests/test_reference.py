"""Reproduce the original implementation's outputs on tests/data/reference/tiny_avcap_seed1234.

The captioner checkpoint's keys are the model's own, so it loads strictly with `load_state_dict`. The other two
layouts (CAV-MAE .pth, GiT .pt) go through avcap.checkpoint and are tested with it.
"""
import json

import pytest
import torch

from avcap.generate import beam_search
from avcap.model import AVCap, AVCapConfig
from tests.conftest import REFERENCE_DIR

TINY = REFERENCE_DIR / "tiny_avcap_seed1234"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def reference():
    load = lambda name: torch.load(TINY / name, weights_only=True)  # noqa: E731
    model = AVCap(AVCapConfig.tiny())
    model.load_state_dict(load("avcap_state_dict.pt"), strict=True)
    model.eval()
    return model, load("inputs.pt"), load("expected.pt")


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def test_tiny_preset_matches_reference_config():
    ref = json.loads((TINY / "config.json").read_text())
    cfg = AVCapConfig.tiny()
    assert (cfg.embed_dim, cfg.num_heads, cfg.depth_a, cfg.depth_a + cfg.depth_u) == (
        ref["embed_dim"], ref["num_heads"], ref["modality_specific_depth"], ref["total_depth"])
    assert (cfg.text_hidden, cfg.text_layers, cfg.text_heads, cfg.text_ffn, cfg.vocab_size, cfg.max_positions) == (
        ref["text_hidden"], ref["text_layers"], ref["text_heads"], ref["text_ffn"], ref["vocab_size"],
        ref["max_positions"])
    assert (cfg.cls_id, cfg.sep_id, cfg.pad_id, cfg.num_frames, cfg.label_smoothing) == (
        ref["cls_id"], ref["sep_id"], ref["pad_id"], ref["num_frames"], ref["label_smoothing"])


@pytest.mark.parametrize("mode,key", [("av", "features_av"), ("audio", "features_audio"),
                                      ("visual", "features_visual")])
def test_encoder_features(reference, mode, key):
    model, inputs, expected = reference
    with torch.no_grad():
        feats = model.encode(inputs["audio"], inputs["visual"], mode)
    assert feats.shape == expected[key].shape
    assert rel_err(feats, expected[key]) < 1e-4


def test_logits_and_loss(reference):
    model, inputs, expected = reference
    with torch.no_grad():
        out = model(inputs["audio"], inputs["visual"], inputs["caption_tokens"], inputs["need_predict"])
    assert out["logits"].shape == expected["logits"].shape
    assert rel_err(out["logits"], expected["logits"]) < 1e-4
    assert out["loss"].item() == pytest.approx(expected["loss"].item(), rel=1e-4)


@pytest.mark.parametrize("use_cache", [True, False])
def test_beam_search_predictions(reference, use_cache):
    model, inputs, expected = reference
    ref_cfg = json.loads((TINY / "config.json").read_text())
    tokens, logprobs = beam_search(model, inputs["audio"], inputs["visual"], beam_size=ref_cfg["beam_size"],
                                   per_node_beam=ref_cfg["per_node_beam_size"],
                                   length_penalty=ref_cfg["length_penalty"], max_steps=ref_cfg["max_steps"],
                                   use_cache=use_cache)
    assert torch.equal(tokens, expected["predictions"])
    torch.testing.assert_close(logprobs, expected["logprobs"], rtol=1e-4, atol=1e-4)
