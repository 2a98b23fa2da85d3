"""The epoch plan: which samples each loader slot (rank x worker) reads in an epoch, and how many batches every
rank yields, both from the manifest's counts alone, so every rank knows them without communication.

- train: every rank yields exactly `batches_per_epoch = max(1, total // (world_size * batch_size))` batches; a
  slot whose shards hold fewer samples than its quota wraps around (the dataset re-reads its shards,
  reshuffled), so uneven shards never leave a DDP rank waiting on another;
- eval: every clip is read exactly once across all ranks and workers; when a split has fewer shards than
  slots, the slots that share a shard take every k-th sample of it. Every worker yields the same number of
  batches (the dataset pads the last ones with samples flagged invalid).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from shards.hashing import stable_hash
from shards.split_info import SplitInfo


def eval_frame_start(frames_per_clip: int, num_frames: int) -> int:
    """First frame evaluation feeds (the loader's eval mode, single-clip captioning, the gallery's large frame):
    the middle one, or a run of `num_frames` centred on the clip. Training draws its start per sample instead."""
    return frames_per_clip // 2 if num_frames == 1 else (frames_per_clip - num_frames) // 2


@dataclass
class SlotPart:
    """Samples of one shard read by one slot: those with index % stride == offset."""
    shard: int       # index into SplitInfo.shards
    stride: int = 1
    offset: int = 0

    def count(self, num_samples: int) -> int:
        return len(range(self.offset, num_samples, self.stride))


def plan_epoch(info: SplitInfo, num_slots: int, seed: int, epoch: int, train: bool) -> list[list[SlotPart]]:
    """Which samples each of `num_slots` (= world_size x workers, slot = rank*workers + worker) reads this epoch.

    Shards are shuffled by (seed, epoch) in train and kept in manifest order in eval. With at least as many
    shards as slots, slot s takes whole shards s, s+S, ...; otherwise slots share shards sample by sample, so
    eval still reads every clip exactly once.
    """
    order = list(range(len(info.shards)))
    if train:
        random.Random(stable_hash("shards", seed, epoch)).shuffle(order)
    n = len(order)
    if n >= num_slots:
        return [[SlotPart(order[i]) for i in range(s, n, num_slots)] for s in range(num_slots)]
    plan = []
    for s in range(num_slots):
        pos = s % n
        sharing = len(range(pos, num_slots, n))
        plan.append([SlotPart(order[pos], stride=sharing, offset=s // n)])
    return plan


def batches_per_epoch(info: SplitInfo, world_size: int, num_workers: int, batch_size: int, train: bool) -> int:
    """Batches every rank yields per epoch, from the manifest's counts alone."""
    if info.num_samples == 0:
        raise ValueError(f"split {info.split!r} of {info.manifest_url} holds no samples")
    if train:
        return max(1, info.num_samples // (world_size * batch_size))
    workers = max(1, num_workers)
    plan = plan_epoch(info, world_size * workers, 0, 0, train=False)
    per_slot = [sum(p.count(info.shards[p.shard].num_samples) for p in parts) for parts in plan]
    return workers * max(1, max(-(-c // batch_size) for c in per_slot))
