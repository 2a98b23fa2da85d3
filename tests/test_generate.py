"""Generation: the KV cache gives the same tokens as the original's full recompute; beam-search rules."""
import pytest
import torch

from avcap.generate import (CachedStepper, Hypotheses, RecomputeStepper, beam_search, beam_search_features,
                            greedy_search, greedy_search_features)
from avcap.model import AVCap, AVCapConfig
from avcap.tokenizer import caption_token_ids
from tests.fixtures_model import spread_decoder_weights

CLS, SEP, PAD = 101, 102, 0


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_model(num_frames: int = 1, seed: int = 0, sep_bias: float = 0.0, vocab: int = 300) -> AVCap:
    """A shallow float64 model with weights spread as in the reference (so decisions are far from ties)."""
    torch.manual_seed(seed)
    cfg = AVCapConfig.tiny(depth_a=1, depth_v=1, depth_u=1, vocab_size=vocab, num_frames=num_frames, text_layers=2)
    model = AVCap(cfg).double().eval()
    spread_decoder_weights(model)
    with torch.no_grad():
        model.textual.output.bias[SEP] += sep_bias  # make captions end at varied lengths
    return model


def random_inputs(cfg: AVCapConfig, batch: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    audio = torch.randn(batch, cfg.audio_length, cfg.num_mel_bins, generator=g, dtype=torch.float64)
    shape = (batch, 3, cfg.img_size, cfg.img_size) if cfg.num_frames == 1 else \
        (batch, 3, cfg.num_frames, cfg.img_size, cfg.img_size)
    return audio, torch.randn(*shape, generator=g, dtype=torch.float64)


def check_rows(tokens: torch.Tensor, max_steps: int) -> None:
    assert tokens.shape[1] == max_steps
    for row in tokens.tolist():
        assert row[0] == CLS
        first_sep = row.index(SEP)
        assert all(t == SEP for t in row[first_sep:])
        assert CLS not in row[1:first_sep]


@pytest.mark.parametrize("num_frames,batch", [(1, 1), (1, 3), (2, 2), (4, 2)])
def test_cached_beam_search_matches_full_recompute(num_frames, batch):
    model = small_model(num_frames, seed=num_frames * 10 + batch, sep_bias=3.0)
    audio, visual = random_inputs(model.cfg, batch, seed=batch)
    cached = beam_search(model, audio, visual, max_steps=12, use_cache=True)
    with torch.no_grad():
        feats = model.encode(audio, visual)
    assert feats.shape[1] == model.cfg.num_prefix_tokens()
    full = beam_search_features(model, feats, max_steps=12, use_cache=False)
    assert torch.equal(cached[0], full[0])
    torch.testing.assert_close(cached[1], full[1], rtol=1e-9, atol=1e-9)
    check_rows(cached[0], 12)
    assert cached[1].shape == (batch, 1) and cached[0].dtype == torch.long


def test_cached_beam_search_matches_recompute_in_every_mode_and_beam_width():
    model = small_model(1, seed=5, sep_bias=2.0)
    audio, visual = random_inputs(model.cfg, 2, seed=7)
    for mode in ("audio", "visual"):
        with torch.no_grad():
            feats = model.encode(audio if mode == "audio" else None, visual if mode == "visual" else None, mode)
        for beam, per_node in ((1, 2), (3, 3)):
            a = beam_search_features(model, feats, beam, per_node, 0.6, 12, use_cache=True)
            b = beam_search_features(model, feats, beam, per_node, 0.6, 12, use_cache=False)
            assert torch.equal(a[0], b[0]), (mode, beam)
            torch.testing.assert_close(a[1], b[1])


def test_search_exercises_finished_hypotheses_and_early_stop():
    # a strong [SEP] bias makes captions finish early; the stopping rule then ends the search before max_steps
    model = small_model(1, seed=3, sep_bias=6.0)
    feats = torch.randn(3, 708, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    tokens, logprobs = beam_search_features(model, feats, max_steps=30, use_cache=True)
    lengths = [row.index(SEP) for row in tokens.tolist()]
    assert max(lengths) < 29, lengths  # every kept hypothesis ended on a real [SEP]
    assert torch.equal(tokens, beam_search_features(model, feats, max_steps=30, use_cache=False)[0])
    # the reported score is the length-normalized sum (len counts [CLS]): recompute it from the decoder
    with torch.no_grad():
        for b, L in enumerate(lengths):
            row = tokens[b:b + 1, :L + 1]
            logp = torch.log_softmax(model.decode(feats[b:b + 1], row), -1)[0]
            total = sum(logp[t, row[0, t + 1]].item() for t in range(L))
            norm = (5 + L) ** 0.6 / 6 ** 0.6
            assert logprobs[b, 0].item() == pytest.approx(total / norm, rel=1e-9)


def test_batched_search_equals_one_sample_at_a_time():
    model = small_model(1, seed=11, sep_bias=3.0)
    feats = torch.randn(3, 708, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    batched, lp = beam_search_features(model, feats, max_steps=14)
    for b in range(3):
        single, lp1 = beam_search_features(model, feats[b:b + 1], max_steps=14)
        assert torch.equal(single[0], batched[b])
        torch.testing.assert_close(lp1[0], lp[b])


def test_cached_step_logits_equal_teacher_forced_logits_after_reorders():
    model = small_model(1, seed=2)
    beam, steps = 3, 6
    feats = torch.randn(2, 40, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        stepper = CachedStepper(model.textual, feats, beam, max_len=steps)
        recompute = RecomputeStepper(model.textual, feats, beam)
        hist = torch.full((2 * beam, 1), CLS, dtype=torch.long)
        for _ in range(steps):
            got = stepper.step(hist)
            torch.testing.assert_close(got, recompute.step(hist), rtol=1e-10, atol=1e-10)
            # shuffle beams within each sample (with repeats), as beam search does
            local = torch.randint(0, beam, (2, beam), generator=g)
            rows = (local + torch.arange(2)[:, None] * beam).view(-1)
            hist = torch.cat([hist[rows], torch.randint(0, 300, (2 * beam, 1), generator=g)], dim=1)
            stepper.reorder(local)


def test_greedy_cached_matches_recompute_and_format():
    model = small_model(1, seed=8, sep_bias=3.0)
    audio, visual = random_inputs(model.cfg, 3, seed=2)
    a = greedy_search(model, audio, visual, max_steps=15, use_cache=True)
    with torch.no_grad():
        feats = model.encode(audio, visual)
    b = greedy_search_features(model, feats, max_steps=15, use_cache=False)
    assert torch.equal(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])
    check_rows(a[0], 15)
    # greedy picks the argmax at every step: check the first word against the decoder directly
    with torch.no_grad():
        first = model.decode(feats, torch.full((3, 1), CLS, dtype=torch.long))[:, -1].argmax(-1)
    assert torch.equal(a[0][:, 1], first)


def test_generation_restores_training_mode_and_needs_no_grad():
    model = small_model(1, seed=1)
    model.train()
    audio, visual = random_inputs(model.cfg, 1)
    tokens, logprobs = beam_search(model, audio, visual, max_steps=5)
    assert model.training
    assert not logprobs.requires_grad


def test_bad_generation_arguments_are_clear_errors():
    model = small_model(1)
    feats = torch.randn(1, 20, 64, dtype=torch.float64)
    with pytest.raises(ValueError, match="per_node_beam"):
        beam_search_features(model, feats, per_node_beam=1)
    with pytest.raises(ValueError, match="max_steps"):
        beam_search_features(model, feats, max_steps=2000)
    with pytest.raises(ValueError, match=r"features: expected \[B, N, 64\]"):
        beam_search_features(model, torch.randn(1, 20, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="visual"):
        beam_search(model, torch.randn(1, 1024, 128, dtype=torch.float64), torch.randn(1, 3, 64, 64))


def test_hypotheses_keep_the_best_and_apply_the_stopping_rule():
    h = Hypotheses(1, max_steps=10, length_penalty=0.6)
    assert not h.is_done(-1.0)
    h.add([CLS, 5, 6], -3.0)
    h.add([CLS, 7], -2.5)  # score -2.5/norm(2) vs -3/norm(3)
    norm = lambda n: (5 + n) ** 0.6 / 6 ** 0.6  # noqa: E731
    best = max((-3.0 / norm(3), [CLS, 5, 6]), (-2.5 / norm(2), [CLS, 7]))
    assert h.best() == best and len(h.hyp) == 1
    # done once the kept score beats anything reachable: best running sum normalized at max length (9)
    assert h.is_done(best[0] * norm(9) - 1e-6)
    assert not h.is_done(best[0] * norm(9) + 1e-3)


def test_caption_token_ids():
    assert caption_token_ids(torch.tensor([CLS, 5, 6, SEP, SEP]), CLS, SEP) == [5, 6]
    assert caption_token_ids([CLS, SEP, SEP], CLS, SEP) == []
