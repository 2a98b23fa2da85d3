"""The batcher: decodes the samples a loader slot reads into batches, each member straight into its row.

Batches are dicts of CPU tensors / lists:
    fbank        float16 [B, T, M]        unnormalized (T=1024, M=128), as stored
    frames       uint8   [B, nf, 3, H, W] the chosen consecutive frames (H=W=224), a channels-last view: memory is
                                          [B, nf, H, W, 3], the JPEG decoder's layout, because transposing on
                                          the loader's core costs ~40 µs per frame; shards.augment makes it
                                          contiguous on the training device
    frame_index  int64   [B]              index of the first chosen frame
    keys         list[str]
    captions     list[list[str]]          every caption of the clip (the references in eval)
    caption      list[str]                train: one caption picked per sample; eval: the first
    valid        bool    [B]              False for eval padding (duplicates to drop)
    tokens, need_predict  int64 [B, L]    only with a tokenizer (LoaderConfig.tokenizer; avcap.tokenizer)

The tensors live in a shards.buffer_pool.BatchBufferPool: a batch's memory is reused once the consumer has
dropped it, and in a DataLoader worker every tensor of a batch is a view of one shared storage.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from avcap.tokenizer import encode_captions
from shards.buffer_pool import BatchBufferPool, nbytes
from shards.decode import decode_jpeg
from shards.index import ShardError
from shards.sample_format import FBANK_MEMBER, JSON_MEMBER, SampleFormatError, decode_json, decode_npy, frame_member
from shards.split_info import SplitInfo


def sample_members(frame0: int, num_frames: int, frames_per_clip: int) -> list[str]:
    """The members of a sample a batch row uses: fbank, json and `num_frames` frames from `frame0`."""
    return [FBANK_MEMBER, JSON_MEMBER] + [frame_member(frame0 + j, frames_per_clip) for j in range(num_frames)]


class Batcher:
    """Decodes each sample as it is added straight into the batch tensors (one copy per member).

    Decoding at `add` (not when the batch is full) is what lets a caller skip one sample that does not decode:
    `add` raises ShardError and the row it was filling is simply filled by the next sample. `tokenizer` (an
    avcap.tokenizer tokenizer, or None) adds tokens + need_predict of the picked captions to each batch."""

    def __init__(self, info: SplitInfo, *, batch_size: int, num_frames: int, tokenizer, max_caption_tokens: int):
        self.info, self.tok, self.max_caption_tokens = info, tokenizer, max_caption_tokens
        self.nf = num_frames
        self.B = batch_size
        self.npy_headers: dict[bytes, tuple] = {}
        self.memory = BatchBufferPool()
        self._start()

    def _start(self) -> None:
        self.n = 0
        self.fbank: torch.Tensor | None = None
        self.frames: torch.Tensor | None = None   # [B, nf, H, W, 3]: the JPEG decoder's layout (module docstring)
        self.keys: list[str] = []
        self.captions: list[list[str]] = []
        self.caption: list[str] = []
        self.frame_index: list[int] = []
        self.valid: list[bool] = []

    def __len__(self) -> int:
        return self.n

    def add(self, url: str, key: str, members: dict[str, bytes], frame0: int, caption_pick: int, valid: bool) -> None:
        """Decode one sample into row len(self); ShardError (naming shard and key) leaves the batch as it was."""
        T, M, i = self.info.target_length, self.info.num_mel_bins, self.n
        what = f"shard {url} sample {key}"
        used = sample_members(frame0, self.nf, self.info.frames_per_clip)
        missing = [m for m in used if m not in members]
        if missing:
            raise ShardError(f"{what}: missing member(s) {missing}")
        try:
            caps = list(decode_json(members[JSON_MEMBER], f"{what}: {JSON_MEMBER}")["captions"])
        except SampleFormatError as e:
            raise ShardError(str(e)) from e
        except (KeyError, TypeError) as e:
            raise ShardError(f"{what}: json member lacks a 'captions' list ({e})") from e
        if not caps or not all(isinstance(c, str) for c in caps):
            raise ShardError(f"{what}: json 'captions' must be a non-empty list of strings, got {caps!r}")
        try:
            fb = decode_npy(members[FBANK_MEMBER], f"{what}: {FBANK_MEMBER}", self.npy_headers)
        except SampleFormatError as e:
            raise ShardError(str(e)) from e
        if fb.shape != (T, M) or fb.dtype != np.float16:
            raise ShardError(f"{what}: {FBANK_MEMBER} is {fb.dtype}{list(fb.shape)}, expected float16[{T}, {M}]")
        frames = used[2:]   # after fbank and json
        hwcs = [decode_jpeg(members[m], what).permute(1, 2, 0).numpy() for m in frames]
        if self.frames is None:   # the batch's first sample: its frames' shape is the batch's
            self._open(hwcs[0].shape)
        for j, hwc in enumerate(hwcs):
            if hwc.shape != tuple(self.frames.shape[2:]):
                raise ShardError(f"{what}: frame {frame0 + j} is {list(hwc.shape)} (HWC), "
                                 f"other frames {list(self.frames.shape[2:])}")
        # Copy through numpy: the decoded arrays are read-only views of the tar bytes.
        self.fbank.numpy()[i] = fb
        frames_np = self.frames.numpy()
        for j, hwc in enumerate(hwcs):
            frames_np[i, j] = hwc
        self.n += 1
        self.keys.append(key)
        self.captions.append(caps)
        self.caption.append(caps[caption_pick % len(caps)])
        self.frame_index.append(frame0)
        self.valid.append(valid)

    def _open(self, hwc: tuple[int, ...]) -> None:
        """The batch's fbank and frames tensors, in memory reserved for every tensor of the batch (emit)."""
        B, T, M = self.B, self.info.target_length, self.info.num_mel_bins
        frames, fbank = (B, self.nf, *hwc), (B, T, M)
        size = (nbytes(frames, torch.uint8) + nbytes(fbank, torch.float16) + nbytes((B,), torch.int64)
                + nbytes((B,), torch.bool))
        if self.tok is not None:   # tokens and need_predict: at most [CLS] + max_caption_tokens + [SEP] per row
            size += 2 * nbytes((B, self.max_caption_tokens + 2), torch.long)
        self.memory.open_batch(size)
        self.frames = self.memory.empty(frames, torch.uint8)
        self.fbank = self.memory.empty(fbank, torch.float16)

    def emit(self) -> dict[str, Any]:
        assert self.n == self.B and self.fbank is not None and self.frames is not None
        place = self.memory.place
        batch: dict[str, Any] = dict(fbank=self.fbank, frames=self.frames.permute(0, 1, 4, 2, 3),
                                     frame_index=place(torch.tensor(self.frame_index)), keys=self.keys,
                                     captions=self.captions, caption=self.caption,
                                     valid=place(torch.tensor(self.valid, dtype=torch.bool)))
        if self.tok is not None:
            tokens, need_predict = encode_captions(self.tok, self.caption,
                                                   max_wordpieces=self.max_caption_tokens)
            batch["tokens"] = place(torch.as_tensor(tokens))
            batch["need_predict"] = place(torch.as_tensor(need_predict))
        self._start()
        return batch
