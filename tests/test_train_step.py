"""avcap.training.train_step, the one step train.py's loop and benchmarks/bench_gpu.py run, against the plain
form of the same math on the reference fixture (tests/data/reference/tiny_avcap_seed1234).

The training path skips work whose result is never read (the last decoder layer's prefix queries and FFN, the
vocabulary projection of positions the loss ignores, the [B, T, V] logits) and uses the fused loss and AdamW:
the losses must stay those of the plain form within 1e-6 in float32.
"""
from __future__ import annotations

import math

import pytest
import torch

from avcap.model import AVCap, AVCapConfig
from avcap.optim import build_optimizer, resolve_precision
from avcap.train_config import TrainConfig
from avcap.training import train_step
from tests.fixtures_model import plain_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def reference_model(reference_dir, **overrides) -> AVCap:
    model = AVCap(AVCapConfig.tiny(**overrides))
    model.load_state_dict(torch.load(reference_dir / "avcap_state_dict.pt", weights_only=True), strict=True)
    return model


def batch(reference_inputs):
    return (reference_inputs["audio"], reference_inputs["visual"], reference_inputs["caption_tokens"],
            reference_inputs["need_predict"])


def test_training_loss_equals_the_plain_form(reference_dir, reference_inputs, reference_expected):
    model = reference_model(reference_dir).eval()
    b = batch(reference_inputs)
    with torch.no_grad():
        fast = model(*b, return_logits=False)
        full = model(*b)
        plain = plain_loss(model, *b)
    assert "logits" not in fast
    assert fast["loss"].dtype == torch.float32
    assert abs(fast["loss"].item() - plain.item()) <= 1e-6 * abs(plain.item())
    assert abs(full["loss"].item() - plain.item()) <= 1e-6 * abs(plain.item())
    # and both are the original implementation's loss (its own float order: the fixture's 1e-4)
    assert fast["loss"].item() == pytest.approx(reference_expected["loss"].item(), rel=1e-4)


@pytest.mark.parametrize("freeze_text", [False, True])
def test_train_steps_equal_plain_steps(reference_dir, reference_inputs, freeze_text):
    """Three optimizer steps through train_step (fused AdamW) and through the plain form (per-op AdamW): the same
    losses within 1e-6, with the text decoder frozen as in the README recipe and fully trainable."""
    b = batch(reference_inputs)
    cfg = TrainConfig(lr=1e-3)
    precision = resolve_precision("fp32", torch.device("cpu"))

    def fresh() -> AVCap:
        m = reference_model(reference_dir, dropout=0.0, attention_dropout=0.0)
        m.freeze_decoder(freeze_text)
        return m.train()

    model = fresh()
    optimizer = build_optimizer(model, cfg)
    assert optimizer.defaults["fused"]
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    got = [train_step(model, b, optimizer, scaler, precision).loss.item() for _ in range(3)]

    ref = fresh()
    ref_opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=cfg.lr,
                                betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay, foreach=False)
    want = []
    for _ in range(3):
        loss = plain_loss(ref, *b)
        loss.backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        want.append(loss.item())
    assert want[2] < want[0]  # the steps did train
    for g, w in zip(got, want):
        assert abs(g - w) <= 1e-6 * abs(w), (got, want)
    frozen = [n for n, p in model.textual.named_parameters() if not p.requires_grad]
    assert bool(frozen) == freeze_text and all(not n.startswith("av_projection.") for n in frozen)


def test_accumulated_micro_batches_step_once(reference_dir, reference_inputs):
    """Two micro-batches of one clip each: one optimizer step, at the second, with their mean gradient."""
    audio, visual, tokens, need = batch(reference_inputs)
    precision = resolve_precision("fp32", torch.device("cpu"))
    model = reference_model(reference_dir, dropout=0.0, attention_dropout=0.0).train()
    optimizer = build_optimizer(model, TrainConfig(lr=1e-3))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    before = [p.detach().clone() for p in model.parameters()]
    halves = [tuple(t[i:i + 1] for t in (audio, visual, tokens, need)) for i in range(2)]
    first = train_step(model, halves[0], optimizer, scaler, precision, micro=0, num_micro=2, clip_grad=1.0)
    assert not first.stepped and first.grad_norm is None
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    second = train_step(model, halves[1], optimizer, scaler, precision, micro=1, num_micro=2, clip_grad=1.0)
    assert second.stepped and second.samples == 1
    assert second.grad_norm is not None and math.isfinite(second.grad_norm)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(p.grad is None for p in model.parameters())
    # the first micro-batch's contribution was half its loss' gradient
    model2 = reference_model(reference_dir, dropout=0.0, attention_dropout=0.0).train()
    (model2(*halves[0])["loss"] / 2).backward()
    for g, p in zip(grads, model2.parameters()):
        if g is not None:
            torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-8)
