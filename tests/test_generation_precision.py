"""One generation setting for evaluate, caption and training's evaluation, and its precision policy, on the
reference fixture (the original implementation's beam-search tokens); need_predict with a [PAD] that is not 0."""
from __future__ import annotations

import json

import pytest
import torch

from avcap.caption import CaptionConfig, Captioner
from avcap.checkpoint import save_checkpoint
from avcap.evaluate import caption_split
from avcap.generate import GenerationConfig, precision_parity
from avcap.model import AVCap, AVCapConfig
from avcap.tokenizer import decode_batch, encode_captions, tokenizer_from_vocab
from avcap.train_data import EvalBatch
from tests.fixtures_train import TINY_MODEL_OVERRIDES

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def reference_checkpoint(reference_dir, bert_layout_vocab, tmp_path_factory):
    model = AVCap(AVCapConfig.tiny())
    model.load_state_dict(torch.load(reference_dir / "avcap_state_dict.pt", weights_only=True))
    return save_checkpoint(tmp_path_factory.mktemp("ref") / "reference.pt", model, AVCapConfig.tiny(),
                           bert_layout_vocab, norm_stats={"mean": -4.346, "std": 4.332}, frames_per_clip=20)


def settings(reference_dir, precision: str) -> dict:
    ref = json.loads((reference_dir / "config.json").read_text())
    return dict(beam_size=ref["beam_size"], per_node_beam=ref["per_node_beam_size"],
                length_penalty=ref["length_penalty"], max_steps=ref["max_steps"], precision=precision)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_evaluate_and_caption_give_the_same_tokens(reference_checkpoint, reference_dir, reference_inputs,
                                                   reference_expected, precision):
    gen = GenerationConfig(**settings(reference_dir, precision))
    captioner = Captioner(CaptionConfig(checkpoint=str(reference_checkpoint), beam_size=gen.beam_size,
                                        per_node_beam=gen.per_node_beam, length_penalty=gen.length_penalty,
                                        max_gen_steps=gen.max_steps, gen_precision=precision))
    assert captioner.generation == gen
    audio, visual = reference_inputs["audio"], reference_inputs["visual"]
    tokens = captioner.generate(audio, visual, "av")
    keys = ["clip0", "clip1"]
    predictions, _ = caption_split(captioner.model, [EvalBatch(audio, visual, keys, [["r"], ["r"]])],
                                   captioner.tokenizer, gen)
    assert [predictions[k] for k in keys] == decode_batch(captioner.tokenizer, tokens)
    if precision == GenerationConfig.precision:  # the default reproduces the original's tokens
        assert torch.equal(tokens, reference_expected["predictions"])


def test_precision_parity_measures_every_policy(reference_checkpoint, reference_dir, reference_inputs,
                                                reference_expected):
    captioner = Captioner(CaptionConfig(checkpoint=str(reference_checkpoint)))
    checks = precision_parity(captioner.model, reference_inputs["audio"], reference_inputs["visual"],
                              reference_expected["predictions"],
                              GenerationConfig(**settings(reference_dir, "fp32")))
    assert [(c.precision, c.policy) for c in checks] == [
        ("fp32", "no autocast"), ("bf16", "fp32 head"), ("bf16", "plain autocast"), ("fp16", "fp32 head"),
        ("fp16", "plain autocast")]
    assert checks[0].ok and all(c.tokens_total == reference_expected["predictions"].numel() for c in checks)


def test_need_predict_is_zero_on_padding_whatever_the_pad_id():
    vocab = ["[UNK]", "[PAD]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "barks", "rain", "falls", "loudly"]
    tok = tokenizer_from_vocab(vocab)
    assert tok.pad_token_id == 1
    captions = ["a dog barks loudly", "rain falls"]
    batch = encode_captions(tok, captions)
    assert batch.tokens[1].tolist() == [2, 8, 9, 3, 1, 1]
    assert batch.need_predict.tolist() == [[0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0]]

    torch.manual_seed(0)
    cfg = AVCapConfig.tiny(**TINY_MODEL_OVERRIDES, vocab_size=len(vocab), cls_id=2, sep_id=3, pad_id=1,
                           dropout=0.0, attention_dropout=0.0)
    model = AVCap(cfg).eval()
    audio = torch.randn(2, cfg.audio_length, cfg.num_mel_bins)
    visual = torch.randn(2, 3, cfg.img_size, cfg.img_size)
    with torch.no_grad():
        padded = model(audio, visual, batch.tokens, batch.need_predict)["loss"]
        rows = [encode_captions(tok, [c]) for c in captions]
        losses = [model(audio[i:i + 1], visual[i:i + 1], r.tokens, r.need_predict)["loss"] for i, r in enumerate(rows)]
    counts = [int(r.need_predict[:, 1:].sum()) for r in rows]
    unpadded = sum(l * n for l, n in zip(losses, counts)) / sum(counts)
    torch.testing.assert_close(padded, unpadded, rtol=1e-5, atol=1e-6)
