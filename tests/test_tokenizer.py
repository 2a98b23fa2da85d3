"""WordPiece tokenizer: vocab building and loading, caption encoding (docs/original.md §1), decoding (docs/original.md §4)."""
from __future__ import annotations

import pytest
import torch

from avcap.tokenizer import (CaptionBatch, build_wordpiece_vocab, decode_batch, decode_tokens, encode_captions,
                             load_tokenizer, read_vocab_file, special_ids, tokenizer_from_vocab, tokenizer_vocab)
from tests.fixtures_model import audiocaps_captions


def test_built_vocab_has_bert_special_tokens_first(caption_vocab_path, caption_tokenizer):
    vocab = read_vocab_file(caption_vocab_path)
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert len(vocab) == len(set(vocab)) == 1000
    assert special_ids(caption_tokenizer) == special_ids(caption_tokenizer).__class__(cls=2, sep=3, pad=0, unk=1)
    assert tokenizer_vocab(caption_tokenizer) == vocab
    # a directory holding vocab.txt loads the same tokenizer
    assert tokenizer_vocab(load_tokenizer(caption_vocab_path.parent)) == vocab


def test_special_ids_come_from_the_vocab(bert_layout_vocab):
    tok = tokenizer_from_vocab(bert_layout_vocab)
    ids = special_ids(tok)
    assert (ids.pad, ids.unk, ids.cls, ids.sep) == (0, 100, 101, 102)
    batch = encode_captions(tok, ["a dog barks"])
    assert batch.tokens[0, 0] == 101 and batch.tokens[0, -1] == 102


def test_encode_layout_padding_and_need_predict(caption_tokenizer):
    captions = ["A dog barks", "Rain falls on a tin roof while thunder rumbles"]
    batch = encode_captions(caption_tokenizer, captions)
    assert isinstance(batch, CaptionBatch)
    tokens, need_predict = batch  # unpacks like a tuple
    assert tokens.dtype == need_predict.dtype == torch.long and tokens.shape == need_predict.shape
    pieces = [caption_tokenizer.tokenize(c) for c in captions]
    lengths = [len(p) + 2 for p in pieces]
    assert tokens.shape == (2, max(lengths))
    for i, (p, n) in enumerate(zip(pieces, lengths)):
        assert tokens[i, :n].tolist() == [2] + caption_tokenizer.convert_tokens_to_ids(p) + [3]
        assert need_predict[i, :n].tolist() == [0] + [1] * (n - 1)
        assert tokens[i, n:].eq(0).all() and need_predict[i, n:].eq(0).all()


def test_encode_truncates_to_40_wordpieces_and_lowercases(caption_tokenizer):
    long = " ".join(["birds chirp loudly"] * 30)
    batch = encode_captions(caption_tokenizer, [long, long.upper()])
    assert batch.tokens.shape == (2, 42)  # [CLS] + 40 + [SEP]
    assert batch.tokens[0, -1] == 3 and batch.need_predict[0].sum() == 41
    assert torch.equal(batch.tokens[0], batch.tokens[1])
    short = encode_captions(caption_tokenizer, [long], max_wordpieces=5)
    assert short.tokens.shape == (1, 7) and torch.equal(short.tokens[0, :6], batch.tokens[0, :6])


def test_decode_round_trips_audiocaps_captions(caption_tokenizer):
    captions = audiocaps_captions(300)[::15]
    batch = encode_captions(caption_tokenizer, captions)
    texts = decode_batch(caption_tokenizer, batch.tokens)
    for caption, text in zip(captions, texts):
        # WordPiece decoding rejoins the pieces; only the spacing around punctuation may change
        assert text.replace(" ", "") == caption.lower().replace(" ", ""), caption
    assert decode_tokens(caption_tokenizer, encode_captions(caption_tokenizer, ["A dog barks"]).tokens[0]) == \
        "a dog barks"


def test_decode_takes_tokens_between_first_cls_and_first_sep(caption_tokenizer):
    ids = encode_captions(caption_tokenizer, ["a dog barks", "a cat meows"]).tokens
    dog, cat = ids[0][ids[0] != 0].tolist(), ids[1][ids[1] != 0].tolist()
    # beam search output: [CLS] words [SEP] then [SEP] padding
    assert decode_tokens(caption_tokenizer, dog + [3] * 5) == "a dog barks"
    # anything after the first [SEP] is ignored, even another caption
    assert decode_tokens(caption_tokenizer, dog + cat) == "a dog barks"
    # no [SEP]: everything after [CLS]
    assert decode_tokens(caption_tokenizer, dog[:-1]) == "a dog barks"
    assert decode_tokens(caption_tokenizer, torch.tensor([2, 3, 3])) == ""
    with pytest.raises(ValueError, match="decode_batch"):
        decode_tokens(caption_tokenizer, ids)


def test_bad_vocab_files_are_refused(tmp_path, caption_vocab_path):
    vocab = read_vocab_file(caption_vocab_path)
    no_cls = tmp_path / "no_cls.txt"
    no_cls.write_text("\n".join(t for t in vocab if t != "[CLS]") + "\n")
    with pytest.raises(ValueError, match=r"no_cls\.txt.*\[CLS\]"):
        load_tokenizer(no_cls)
    dup = tmp_path / "dup.txt"
    dup.write_text("\n".join(vocab + ["dog"]) + "\n")
    with pytest.raises(ValueError, match=r"dup\.txt.*duplicate.*'dog'"):
        load_tokenizer(dup)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_tokenizer(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match="no vocab.txt"):
        load_tokenizer(tmp_path)


def test_unreachable_hub_name_fails_clearly():
    # HF is offline here (conftest sets HF_HUB_OFFLINE): a hub name must fail, not fall back to a 5-token vocab
    with pytest.raises(OSError, match="bert-base-uncased.*hub"):
        load_tokenizer("bert-base-uncased")


def test_bad_captions_are_refused(caption_tokenizer):
    with pytest.raises(ValueError, match="caption 1 has no wordpieces"):
        encode_captions(caption_tokenizer, ["a dog", "   "])
    with pytest.raises(TypeError, match="caption 0 is a int"):
        encode_captions(caption_tokenizer, [3])
    with pytest.raises(TypeError, match="single string"):
        encode_captions(caption_tokenizer, "a dog barks")


def test_build_vocab_is_deterministic(tmp_path):
    captions = audiocaps_captions(500)
    a = build_wordpiece_vocab(captions, tmp_path / "a.txt", vocab_size=300).read_text()
    b = build_wordpiece_vocab(captions, tmp_path / "b.txt", vocab_size=300).read_text()
    assert a == b and len(a.splitlines()) == 300
    with pytest.raises(ValueError, match="no captions"):
        build_wordpiece_vocab([], tmp_path / "c.txt")
