"""BERT uncased WordPiece tokenizer for captions (docs/original.md §1 "Text", §4 "Text").

The captioner was trained with `bert-base-uncased` ([CLS]=101, [SEP]=102, [PAD]=0, vocab 30522), but nothing here
assumes those numbers: every special id is read from the tokenizer, so a small vocab built for tests or a demo
(where [CLS]=2) works the same way.

    tok = load_tokenizer("path/to/vocab.txt")          # or a directory holding vocab.txt, or "bert-base-uncased"
    batch = encode_captions(tok, ["A dog barks", "Rain falls"])   # batch.tokens, batch.need_predict: [B, T]
    text = decode_tokens(tok, batch.tokens[0])          # "a dog barks"

`build_wordpiece_vocab(captions, path)` trains a small vocab with the `tokenizers` WordPieceTrainer.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import torch
from transformers import BertTokenizerFast

# Tokens every vocab must hold; the first five lines of a vocab we build, in this order ([PAD] = 0 as in
# bert-base-uncased; any other [PAD] id works too: tokens are padded with it, need_predict always with 0).
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
MAX_WORDPIECES = 40  # docs/original.md §1: [CLS] + wordpieces[:40] + [SEP]


@dataclass(frozen=True)
class SpecialIds:
    cls: int
    sep: int
    pad: int
    unk: int


class CaptionBatch(NamedTuple):
    """Unpacks like `(tokens, need_predict)`; both LongTensor [B, T], tokens padded with the pad id and
    need_predict with 0 (padding is never predicted, whatever the pad id)."""
    tokens: torch.Tensor
    need_predict: torch.Tensor


def validate_vocab(vocab: Sequence[str], source: str) -> dict[str, int]:
    """Vocab list (index = id) -> dict, refusing what BertTokenizer would silently paper over."""
    if len(vocab) == 0:
        raise ValueError(f"{source}: vocab is empty")
    index: dict[str, int] = {}
    duplicates = []
    for i, token in enumerate(vocab):
        if not isinstance(token, str) or token == "":
            raise ValueError(f"{source}: vocab entry {i} (line {i + 1}) is not a token: {token!r}")
        if token in index:
            duplicates.append(f"{token!r} (lines {index[token] + 1} and {i + 1})")
        index[token] = i
    if duplicates:
        # A duplicated token has two ids; BERT's vocab loader silently keeps the last, so one line's id is dead.
        raise ValueError(f"{source}: duplicate vocab tokens: {', '.join(duplicates[:10])}")
    absent = [t for t in SPECIAL_TOKENS if t not in index]
    if absent:
        # BertTokenizer falls back to ids 2/3 for a missing [CLS]/[SEP]: refuse rather than invent ids.
        raise ValueError(f"{source}: vocab lacks the special tokens {absent}")
    return index


def tokenizer_from_vocab(vocab: Sequence[str], do_lower_case: bool = True,
                         source: str = "<vocab list>") -> BertTokenizerFast:
    """A BERT WordPiece tokenizer from an in-memory vocab (index = id), e.g. the one stored in a checkpoint."""
    index = validate_vocab(vocab, source)
    return BertTokenizerFast(vocab=index, do_lower_case=do_lower_case)


def parse_vocab_text(text: str) -> list[str]:
    """The tokens of a BERT vocab.txt: one per line, the line number being the id. Only the line break is
    stripped, so that a token is never altered."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def read_vocab_file(path: str | Path) -> list[str]:
    return parse_vocab_text(Path(path).read_text(encoding="utf-8"))


def load_tokenizer(source: str | Path, do_lower_case: bool = True) -> BertTokenizerFast:
    """Tokenizer from a vocab.txt file, a directory holding vocab.txt, or a Hugging Face hub name.

    A hub name needs the hub to be reachable (or cached); offline it fails with a message saying so.
    """
    path = Path(source)
    if path.is_file():
        return tokenizer_from_vocab(read_vocab_file(path), do_lower_case, source=str(path))
    if path.is_dir():
        vocab_file = path / "vocab.txt"
        if not vocab_file.is_file():
            raise FileNotFoundError(f"{path}: directory has no vocab.txt")
        return tokenizer_from_vocab(read_vocab_file(vocab_file), do_lower_case, source=str(vocab_file))
    name = str(source)
    if name.endswith(".txt") or name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{name}: vocab file does not exist")
    # Resolve the hub's vocab.txt explicitly: BertTokenizerFast.from_pretrained on an unreachable or unknown name
    # quietly returns a 5-token default vocab, which would turn every caption into [UNK].
    from huggingface_hub import hf_hub_download
    try:
        vocab_file = hf_hub_download(name, "vocab.txt")
    except Exception as e:  # offline, unknown repo, no vocab.txt: all the same to the caller
        raise OSError(f"{name}: not a local vocab file or directory, and fetching its vocab.txt from the Hugging "
                      f"Face hub failed (offline, or no such tokenizer): {type(e).__name__}: {e}") from e
    return tokenizer_from_vocab(read_vocab_file(vocab_file), do_lower_case, source=f"{name} ({vocab_file})")


def tokenizer_vocab(tok: BertTokenizerFast) -> list[str]:
    """The vocab as a list (index = id): what a checkpoint stores so that it can rebuild the tokenizer."""
    vocab = tok.get_vocab()
    ordered = [""] * len(vocab)
    for token, i in vocab.items():
        if not 0 <= i < len(vocab) or ordered[i]:
            raise ValueError(f"tokenizer ids are not a dense range 0..{len(vocab) - 1} (id {i} of {token!r})")
        ordered[i] = token
    return ordered


def special_ids(tok: BertTokenizerFast) -> SpecialIds:
    ids = SpecialIds(cls=tok.cls_token_id, sep=tok.sep_token_id, pad=tok.pad_token_id, unk=tok.unk_token_id)
    if None in (ids.cls, ids.sep, ids.pad, ids.unk):
        raise ValueError(f"tokenizer lacks a special token: {ids}")
    return ids


def encode_captions(tok: BertTokenizerFast, captions: Sequence[str],
                    max_wordpieces: int = MAX_WORDPIECES) -> CaptionBatch:
    """[CLS] + wordpieces[:max_wordpieces] + [SEP] per caption, padded with the pad id to the longest caption of
    the batch; need_predict 1 on the wordpieces and [SEP], 0 at [CLS] and on padding (docs/original.md §1)."""
    if isinstance(captions, str):
        raise TypeError("encode_captions takes a list of captions, got a single string")
    if max_wordpieces < 1:
        raise ValueError(f"max_wordpieces must be >= 1, got {max_wordpieces}")
    if len(captions) == 0:
        raise ValueError("encode_captions: no captions")
    for i, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise TypeError(f"caption {i} is a {type(caption).__name__}, not a str: {caption!r}")
    ids = special_ids(tok)
    pieces = tok(list(captions), add_special_tokens=False)["input_ids"]
    for i, (caption, p) in enumerate(zip(captions, pieces)):
        if not p:
            raise ValueError(f"caption {i} has no wordpieces (empty or whitespace only): {caption!r}")
    rows = [[ids.cls] + p[:max_wordpieces] + [ids.sep] for p in pieces]
    length = max(len(r) for r in rows)
    tokens = torch.full((len(rows), length), ids.pad, dtype=torch.long)
    # zeros, not the pad id: with a vocab whose [PAD] is not 0, padding would otherwise enter the loss
    need_predict = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        need_predict[i, 1:len(row)] = 1
    return CaptionBatch(tokens, need_predict)


def decode_tokens(tok: BertTokenizerFast, ids: Sequence[int] | torch.Tensor) -> str:
    """Caption text from one row of ids: the tokens strictly between the first [CLS] and the first [SEP] after it
    (the whole row after [CLS] if it has no [SEP]), WordPiece-decoded (docs/original.md §4)."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1:
            raise ValueError(f"decode_tokens takes one row of ids, got shape {tuple(ids.shape)}; "
                             "use decode_batch for [B, T]")
        ids = ids.tolist()
    special = special_ids(tok)
    body = caption_token_ids(ids, special.cls, special.sep)
    return tok.decode(body, skip_special_tokens=True, clean_up_tokenization_spaces=True).strip()


def caption_token_ids(row: torch.Tensor | Sequence[int], cls_id: int, sep_id: int) -> list[int]:
    """Token ids strictly between the first [CLS] and the first [SEP] after it (the whole row after [CLS] if it has
    no [SEP]; docs/original.md §4)."""
    ids = [int(i) for i in (row.tolist() if isinstance(row, torch.Tensor) else row)]
    start = ids.index(cls_id) + 1 if cls_id in ids else 0
    rest = ids[start:]
    return rest[:rest.index(sep_id)] if sep_id in rest else rest


def decode_batch(tok: BertTokenizerFast, ids: torch.Tensor) -> list[str]:
    """decode_tokens for every row of a [B, T] tensor (e.g. beam search output)."""
    if ids.dim() != 2:
        raise ValueError(f"decode_batch takes [B, T] ids, got shape {tuple(ids.shape)}")
    return [decode_tokens(tok, row) for row in ids]


def build_wordpiece_vocab(captions: Iterable[str], path: str | Path, vocab_size: int = 1000,
                          min_frequency: int = 1) -> Path:
    """Train a small uncased WordPiece vocab on `captions` and write it as a BERT vocab.txt: the special tokens
    first ([PAD]=0, [UNK], [CLS], [SEP], [MASK]), then the learned pieces. For tests and demos; real models use the
    bert-base-uncased vocab their decoder was trained with."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    captions = list(captions)
    if not captions:
        raise ValueError("build_wordpiece_vocab: no captions to learn from")
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must exceed the {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}")
    # The same normalizer and pre-tokenizer as BertTokenizerFast, so that the learned pieces are what it will see.
    model = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    model.normalizer = normalizers.BertNormalizer(lowercase=True)
    model.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    model.train_from_iterator(captions, trainer)
    # The trainer breaks frequency ties in hash order, so its ids change from run to run; ids carry no meaning
    # for WordPiece (greedy longest match), so sort the learned pieces to make the file reproducible.
    learned = sorted((t for t in model.get_vocab() if t not in SPECIAL_TOKENS),
                     key=lambda t: (t.startswith("##"), t))
    vocab = list(SPECIAL_TOKENS) + learned
    validate_vocab(vocab, "trained vocab")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(t + "\n" for t in vocab), encoding="utf-8")
    return path
