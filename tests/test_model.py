"""AVCap model: checkpoint layout at full size, modes, trainability, masks, loss, input checks."""
import json

import pytest
import torch
import torch.nn.functional as F

from avcap.model import AVCap, AVCapConfig, label_smoothed_kl, prefix_mask
from tests.conftest import REFERENCE_DIR

SHAPES = REFERENCE_DIR / "full_size_state_dict_shapes.json"
IDS = dict(cls_id=101, sep_id=102, pad_id=0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def full_on_meta(**kw) -> AVCap:
    # shapes and names only: no memory, no init cost
    with torch.device("meta"):
        return AVCap(AVCapConfig.full(**IDS, **kw))


def small(num_frames: int = 1, mode: str = "av", dtype=torch.float32) -> AVCap:
    torch.manual_seed(0)
    cfg = AVCapConfig.tiny(depth_a=1, depth_v=1, depth_u=1, vocab_size=200, num_frames=num_frames, mode=mode)
    return AVCap(cfg).to(dtype)


def inputs(cfg: AVCapConfig, batch: int = 2, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    audio = torch.randn(batch, cfg.audio_length, cfg.num_mel_bins, generator=g).to(dtype)
    shape = (batch, 3, 224, 224) if cfg.num_frames == 1 else (batch, 3, cfg.num_frames, 224, 224)
    return audio, torch.randn(*shape, generator=g).to(dtype)


@pytest.mark.parametrize("num_frames,group", [(1, "cav_mae_finetune_encoder_frames1"),
                                              (4, "cav_mae_finetune_encoder_frames4")])
def test_full_size_state_dict_is_the_original_layout(num_frames, group):
    ref = json.loads(SHAPES.read_text())
    want = {**{f"av_encoder.{k}": v for k, v in ref[group].items()}, **ref["avcap_textual_decoder_base"]}
    got = {k: list(v.shape) for k, v in full_on_meta(num_frames=num_frames).state_dict().items()}
    assert sorted(set(want) - set(got)) == [] and sorted(set(got) - set(want)) == []
    assert {k: got[k] for k in want if got[k] != want[k]} == {}


def test_full_size_parameter_counts_and_prefix_lengths():
    model = full_on_meta()
    enc = sum(p.numel() for p in model.av_encoder.parameters())
    dec = sum(p.numel() for p in model.textual.parameters())  # the tied output weight counts once
    assert model.textual.output.weight is model.textual.embedding.words.weight
    assert (round(enc / 1e6, 1), round(dec / 1e6, 1), round((enc + dec) / 1e6, 1)) == (164.9, 67.4, 232.3)
    lengths = {nf: AVCapConfig.full(**IDS, num_frames=nf).num_prefix_tokens() for nf in (1, 2, 4, 8)}
    assert lengths == {1: 708, 2: 708, 4: 904, 8: 1296}
    nf8 = full_on_meta(num_frames=8).av_encoder
    assert tuple(nf8.patch_embed_v.proj.weight.shape) == (768, 3, 2, 16, 16)
    assert tuple(nf8.pos_embed_v.shape) == (1, 784, 768)


def test_unused_parameters_are_not_trainable_per_mode():
    model = full_on_meta()
    frozen = lambda m: {n for n, p in m.av_encoder.named_parameters() if not p.requires_grad}  # noqa: E731
    av = frozen(model)
    assert len(av) == 192  # the tensors the original's DDP needed find_unused_parameters for
    assert all("norm1_" in n or "norm2_" in n or n.startswith(("norm_a.", "norm_v.", "mlp_head.")) for n in av)
    audio = frozen(full_on_meta(mode="audio"))
    assert "blocks_u.0.norm1_a.weight" not in audio and "blocks_u.0.norm1.weight" in audio
    assert "norm_a.weight" not in audio and "norm.weight" in audio and "pos_embed_v" in audio
    assert not any(n.startswith("blocks_a.") and ".norm1." in n for n in audio)
    model = full_on_meta(mode="visual")
    visual = frozen(model)
    assert "blocks_u.0.norm2_v.bias" not in visual and "patch_embed_a.proj.weight" in visual
    assert all(p.requires_grad for p in model.textual.parameters())


def _trainable(model) -> list[str]:
    # what avcap.optim.build_optimizer hands to AdamW
    return [n for n, p in model.named_parameters() if p.requires_grad]


def test_freezing_keeps_the_projection_trainable():
    model = full_on_meta()
    model.freeze_decoder()
    names = set(_trainable(model))
    assert {n for n in names if n.startswith("textual.")} == {
        "textual.av_projection.0.weight", "textual.av_projection.0.bias",
        "textual.av_projection.1.weight", "textual.av_projection.1.bias"}
    assert any(n.startswith("av_encoder.blocks_a.") for n in names)
    model.freeze_encoder()
    assert not any(n.startswith("av_encoder.") for n in _trainable(model))
    assert len(_trainable(model)) == 4
    model.freeze_decoder(False)
    model.freeze_encoder(False)
    assert len(_trainable(model)) == len([p for p in model.parameters()]) - 192


@pytest.mark.parametrize("mode", ["av", "audio", "visual"])
def test_every_trainable_parameter_gets_a_gradient(mode):
    # the condition under which DDP works without find_unused_parameters
    model = small(mode=mode).train()
    audio, visual = inputs(model.cfg)
    tokens = torch.tensor([[101, 5, 6, 7, 102], [101, 8, 9, 102, 0]])
    need = torch.tensor([[0, 1, 1, 1, 1], [0, 1, 1, 1, 0]])
    model(audio, visual, tokens, need)["loss"].backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


@pytest.mark.parametrize("num_frames", [1, 2, 4, 8])
def test_encode_shapes_for_every_mode(num_frames):
    model = small(num_frames).eval()
    audio, visual = inputs(model.cfg, batch=1)
    with torch.no_grad():
        for mode, n in (("av", model.cfg.num_prefix_tokens("av")), ("audio", 512),
                        ("visual", model.cfg.num_visual_tokens)):
            feats = model.encode(audio if mode != "visual" else None, visual if mode != "audio" else None, mode)
            assert feats.shape == (1, n, 64)
            assert torch.isfinite(feats).all()


def test_audio_positions_are_2d_sincos_column_then_row():
    pe = small().av_encoder.pos_embed_a.detach()[0].view(8, 64, 64)  # mel rows x time columns x channels
    # first half of the channels encodes the column (time), second half the row (mel band)
    assert torch.allclose(pe[:, :, :32], pe[:1, :, :32].expand(8, 64, 32))
    assert torch.allclose(pe[:, :, 32:], pe[:, :1, 32:].expand(8, 64, 32))
    assert not torch.allclose(pe[0, 0], pe[0, 1])
    assert pe[0, 0, 0] == 0.0 and pe[0, 0, 16] == 1.0  # sin(0), cos(0)


def test_prefix_mask_layout():
    m = prefix_mask(3, 4, torch.device("cpu"))
    assert m[:3, :3].all() and not m[:3, 3:].any() and m[3:, :3].all()
    assert torch.equal(m[3:, 3:], torch.ones(4, 4, dtype=torch.bool).tril())


def test_later_tokens_never_change_earlier_logits():
    model = small(dtype=torch.float64).eval()
    feats = torch.randn(2, 30, 64, dtype=torch.float64)
    tokens = torch.randint(1, 200, (2, 8))
    with torch.no_grad():
        base = model.decode(feats, tokens)
        for t in range(1, 8):
            changed = tokens.clone()
            changed[:, t:] = torch.randint(1, 200, (2, 8 - t))
            out = model.decode(feats, changed)
            torch.testing.assert_close(out[:, :t], base[:, :t], rtol=1e-12, atol=1e-12)
            assert not torch.allclose(out[:, t], base[:, t])  # while the changed position itself does move


def test_prefix_never_sees_the_text():
    model = small(dtype=torch.float64).eval()
    feats = torch.randn(1, 30, 64, dtype=torch.float64)
    seen = []
    # the last layer returns text rows only (its prefix rows are keys/values, never read): watch the one before
    hook = model.textual.layers[-2].register_forward_hook(lambda mod, args, out: seen.append(out[:, :30].clone()))
    with torch.no_grad():
        for tokens in (torch.tensor([[101, 5, 6]]), torch.tensor([[101, 9, 8, 7, 6, 5, 4]])):
            model.decode(feats, tokens)
    hook.remove()
    torch.testing.assert_close(seen[0], seen[1], rtol=1e-12, atol=1e-12)


def test_loss_is_the_label_smoothed_kl_over_predicted_positions():
    model = small().eval()
    audio, visual = inputs(model.cfg)
    tokens = torch.tensor([[101, 5, 6, 7, 102], [101, 8, 9, 102, 0]])
    need = torch.tensor([[0, 1, 1, 1, 1], [0, 1, 1, 1, 0]])
    with torch.no_grad():
        out = model(audio, visual, tokens, need)
    logits = out["logits"][:, :-1][need[:, 1:] == 1]
    target = tokens[:, 1:][need[:, 1:] == 1]
    V = logits.shape[-1]
    q = torch.full_like(logits, 0.1 / (V - 1)).scatter(1, target[:, None], 0.9)
    want = F.kl_div(F.log_softmax(logits, -1), q, reduction="none").sum(-1).mean()
    torch.testing.assert_close(out["loss"], want, rtol=1e-5, atol=1e-6)
    assert out["logits"].shape == (2, 5, 200)
    # KL = smoothed CE - H(q): at the full vocabulary the offset is -1.358 (docs/original.md §3)
    lg = torch.randn(4, 30522)
    tg = torch.randint(0, 30522, (4,))
    q = torch.full_like(lg, 0.1 / 30521).scatter(1, tg[:, None], 0.9)
    ce = -(q * F.log_softmax(lg, -1)).sum(-1).mean()
    assert (label_smoothed_kl(lg, tg, 0.1) - ce).item() == pytest.approx(-1.358, abs=1e-3)


def test_bad_inputs_are_clear_errors():
    model = small(num_frames=4)
    audio, visual = inputs(model.cfg, batch=1)
    with pytest.raises(ValueError, match=r"audio: expected \[B, 1024, 128\]"):
        model.encode(audio.transpose(1, 2), visual)
    with pytest.raises(ValueError, match="visual: expected .*num_frames=4"):
        model.encode(audio, visual[:, :, :2])
    with pytest.raises(ValueError, match="visual is required"):
        model.encode(audio, None, "av")
    with pytest.raises(ValueError, match="mode='both'"):
        model.encode(audio, visual, "both")
    tokens = torch.tensor([[101, 5, 102]])
    with pytest.raises(ValueError, match="need_predict: no position to predict"):
        model(audio, visual, tokens, torch.zeros_like(tokens))
    with pytest.raises(ValueError, match="must both be"):
        model(audio, visual, tokens, torch.ones(1, 2, dtype=torch.long))
    one = small(num_frames=1).eval()
    a1, v1 = inputs(one.cfg, batch=1)
    with torch.no_grad():  # a stacked single frame is accepted as the plain image
        torch.testing.assert_close(one.encode(a1, v1[:, :, None]), one.encode(a1, v1))


def test_config_validation_and_round_trip():
    cfg = AVCapConfig.full(**IDS, num_frames=4, mode="audio")
    assert AVCapConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown keys.*'bogus'"):
        AVCapConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="num_frames=3"):
        AVCapConfig.full(**IDS, num_frames=3)
    with pytest.raises(ValueError, match="mode='video'"):
        AVCapConfig.full(**IDS, mode="video")
    with pytest.raises(ValueError, match="sep_id=40000"):
        AVCapConfig.full(cls_id=101, sep_id=40000, pad_id=0)
    with pytest.raises(TypeError):  # special ids come from the tokenizer: no defaults
        AVCapConfig()


def test_dropout_only_in_training():
    model = small()
    audio, visual = inputs(model.cfg, batch=1)
    tokens = torch.tensor([[101, 5, 6, 102]])
    need = torch.tensor([[0, 1, 1, 1]])
    with torch.no_grad():
        model.train()
        a, b = model(audio, visual, tokens, need)["logits"], model(audio, visual, tokens, need)["logits"]
        assert not torch.equal(a, b)
        model.eval()
        assert torch.equal(model(audio, visual, tokens, need)["logits"], model(audio, visual, tokens, need)["logits"])
