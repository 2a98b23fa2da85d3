"""shards.buffer_pool.BatchBufferPool: a buffer is handed out again only once the consumer holds no tensor or
view of it; in a DataLoader worker each batch is one fresh shared storage (nothing pooled there)."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from shards.buffer_pool import BatchBufferPool, nbytes
from shards.loader import LoaderConfig, _worker_context, make_loader
from tests.fixtures_loader import build_dataset

SHAPE = (2, 3, 4)


def test_a_buffer_is_reused_only_after_every_tensor_and_view_of_it_is_dropped():
    pool = BatchBufferPool(keep=4)
    a = pool.empty(SHAPE, torch.float16)
    pa = a.data_ptr()
    view = a.permute(2, 0, 1)[1:]        # a torch view of the batch tensor
    del a
    b = pool.empty(SHAPE, torch.float16)
    assert b.data_ptr() != pa            # the view still uses a's buffer
    pb = b.data_ptr()
    as_numpy = b.numpy()                 # a numpy view (what the batcher copies rows through)
    del b
    c = pool.empty(SHAPE, torch.float16)
    assert c.data_ptr() not in (pa, pb)
    del view
    d = pool.empty(SHAPE, torch.float16)
    assert d.data_ptr() == pa            # nothing refers to a's buffer any more
    del as_numpy
    e = pool.empty(SHAPE, torch.float16)
    assert e.data_ptr() == pb            # c and d still hold theirs
    assert len(pool.pool) == 3 and not pool.in_worker
    assert not e.is_shared()


def test_only_buffers_of_the_same_shape_and_dtype_are_reused_and_at_most_keep_are_pooled():
    pool = BatchBufferPool(keep=2)
    a = pool.empty(SHAPE, torch.float16)
    pa = a.data_ptr()
    del a
    other = [pool.empty((3, 2, 4), torch.float16), pool.empty(SHAPE, torch.uint8)]
    assert pa not in [t.data_ptr() for t in other]
    assert len(pool.pool) == 2                       # a's and the first of the others; the uint8 one is not kept
    beyond = pool.empty(SHAPE, torch.uint8)          # not pooled: allocated anew while `other` holds its own
    assert beyond.data_ptr() != other[1].data_ptr() and len(pool.pool) == 2
    again = pool.empty(SHAPE, torch.float16)
    assert again.data_ptr() == pa and again.dtype == torch.float16 and tuple(again.shape) == SHAPE
    del other
    assert pool.empty((3, 2, 4), torch.float16).data_ptr() == pool.pool[1].ctypes.data


def test_a_batch_the_consumer_still_views_is_never_overwritten_by_the_loader(tmp_path):
    """Through the real loader in-process: a held view of batch 0 keeps its memory (and its data) out of the
    pool; once dropped, a later batch reuses that memory."""
    data = build_dataset(tmp_path, {"train": [12]}, frames=2, size=32, target_length=16, mel=8)
    cfg = LoaderConfig(data=str(data), batch_size=2, num_workers=0, train=False)
    loader, total = make_loader(cfg)
    assert total == 6
    it = iter(loader)
    b0 = next(it)
    frames0 = b0["frames"][0]                              # a view of batch 0's frames
    fbank0 = b0["fbank"].numpy()[1]                        # and a numpy view of its fbank
    want_frames, want_fbank = frames0.clone(), fbank0.copy()
    p_frames, p_fbank = b0["frames"].data_ptr(), b0["fbank"].data_ptr()
    del b0
    b1 = next(it)
    assert b1["frames"].data_ptr() != p_frames and b1["fbank"].data_ptr() != p_fbank
    del b1
    b2 = next(it)                                          # b1's memory is free again, b0's is not
    assert b2["frames"].data_ptr() != p_frames and b2["fbank"].data_ptr() != p_fbank
    assert torch.equal(frames0, want_frames) and np.array_equal(fbank0, want_fbank)
    assert float(b2["fbank"][0, 0, 0]) == 4.0              # clip 4: b2's own data (eval keeps shard order)
    del frames0, fbank0, b2
    b3 = next(it)
    assert b3["frames"].data_ptr() == p_frames and b3["fbank"].data_ptr() == p_fbank
    assert float(b3["fbank"][0, 0, 0]) == 6.0


class _WorkerPoolProbe(IterableDataset):
    """In a DataLoader worker: what the pool hands out there for two batches of a tensor and a placed label."""

    def __iter__(self):
        pool = BatchBufferPool(keep=4)
        for value in (7, 3):
            pool.open_batch(nbytes(SHAPE, torch.float16) + nbytes((2,), torch.int64))
            t = pool.empty(SHAPE, torch.float16)
            t.fill_(value)
            label = pool.place(torch.tensor([value, -value]))
            yield {"in_worker": pool.in_worker, "shared": t.is_shared(), "pooled": len(pool.pool), "tensor": t,
                   "label": label}
        pool.open_batch(nbytes(SHAPE, torch.float16))
        pool.empty(SHAPE, torch.float16)
        try:
            pool.place(torch.zeros(1))
        except RuntimeError as e:
            yield {"error": str(e)}


def test_in_a_worker_a_batch_is_one_shared_storage_and_nothing_is_pooled():
    dl = DataLoader(_WorkerPoolProbe(), batch_size=None, num_workers=1, multiprocessing_context=_worker_context())
    *got, refused = list(dl)
    assert [g["in_worker"] for g in got] == [True, True] and all(g["shared"] for g in got)
    assert [g["pooled"] for g in got] == [0, 0]   # the main process owns the memory once it is sent
    for g, value in zip(got, (7, 3)):
        assert g["tensor"].dtype == torch.float16 and tuple(g["tensor"].shape) == SHAPE
        assert bool((g["tensor"] == value).all()) and g["label"].tolist() == [value, -value]
        # the label lies in the tensor's storage, after it: the batch crossed as one piece of shared memory
        assert g["label"].untyped_storage().data_ptr() == g["tensor"].untyped_storage().data_ptr()
        assert g["label"].data_ptr() - g["tensor"].data_ptr() == nbytes(SHAPE, torch.float16)
    # more than open_batch reserved is a bug of the caller, named, never a write past the storage
    assert "more bytes for torch.float32[1] than open_batch reserved" in refused["error"]


def test_a_loader_worker_hands_over_each_batch_as_one_storage(tmp_path, caption_vocab_path):
    """Through the real loader with a worker and a tokenizer: every tensor of a batch (fbank, frames, frame_index,
    valid, tokens, need_predict) is a view of one shared storage, so the batch passes one file descriptor."""
    data = build_dataset(tmp_path, {"train": [6]}, frames=2, size=32, target_length=16, mel=8)
    cfg = LoaderConfig(data=str(data), batch_size=3, num_workers=1, train=True, shuffle_buffer=2,
                       tokenizer=str(caption_vocab_path))
    loader, total = make_loader(cfg)
    batches = list(loader)
    assert len(batches) == total == 2
    for b in batches:
        tensors = {k: v for k, v in b.items() if isinstance(v, torch.Tensor)}
        assert set(tensors) == {"fbank", "frames", "frame_index", "valid", "tokens", "need_predict"}
        assert len({t.untyped_storage().data_ptr() for t in tensors.values()}) == 1
        assert all(t.is_shared() for t in tensors.values())
        assert b["valid"].all() and b["tokens"].shape == b["need_predict"].shape and b["tokens"].shape[0] == 3
