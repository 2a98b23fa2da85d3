"""The seam between the model side and the data: shards.loader for batches, shards.augment for the batched
augmentation and normalization on the training device. `TrainData` is training's side; `EvalData` is
evaluation's (a split read once across ranks), shared by training's per-epoch evaluation and avcap.evaluate."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple

import torch

from avcap.distributed import DistEnv, gather_objects
from avcap.train_config import TrainConfig
from avcap.train_state import derive_seed
from shards.augment import AugmentConfig, prepare_batch
from shards.epoch_plan import batches_per_epoch
from shards.loader import LoaderConfig, make_loader
from shards.remote import remote_config_from_json


def check_dataset_matches(split: Any, model_config: Any, data: str, frames_per_clip: int | None = None) -> None:
    """Refuse a dataset whose frames per clip or fbank parameters disagree with the model, naming both.

    `split` is shards.split_info.SplitInfo (what the manifest says); `frames_per_clip` is what a checkpoint's model
    was trained with, when known (the eval frame F//2 and the train frame spacing depend on it).
    """
    problems = []
    nf = int(model_config.num_frames)
    if nf > split.frames_per_clip:
        problems.append(f"the model config takes num_frames={nf} per sample but the dataset {data} has "
                        f"{split.frames_per_clip} frames per clip")
    if frames_per_clip is not None and int(frames_per_clip) != split.frames_per_clip:
        problems.append(f"the checkpoint was trained on {frames_per_clip} frames per clip but the dataset {data} "
                        f"has {split.frames_per_clip}")
    for name, have, want in (("target_length", split.target_length, model_config.audio_length),
                             ("num_mel_bins", split.num_mel_bins, model_config.num_mel_bins)):
        if int(have) != int(want):
            problems.append(f"fbank {name}: the dataset {data} has {have}, the model config has {want}")
    rate = split.fbank.get("sample_frequency", split.fbank.get("sample_rate"))
    if rate is not None and int(rate) != 16000:
        problems.append(f"fbank sample rate: the dataset {data} has {rate} Hz, the encoder was pretrained on 16000 Hz")
    if problems:
        raise ValueError("dataset does not fit the model: " + "; ".join(problems))


def check_same_split_on_every_rank(split: Any, env: DistEnv, data: str) -> None:
    """Refuse a run whose ranks read different shard lists (a manifest republished while the ranks started):
    their epoch plans would differ, each rank reading its share of another dataset. Every rank raises."""
    digests = gather_objects(split.shard_list_digest(), env)
    if len(set(digests)) > 1:
        groups: dict[str, list[int]] = {}
        for rank, d in enumerate(digests):
            groups.setdefault(d, []).append(rank)
        seen = "; ".join(f"ranks {ranks}: {d[:12]}" for d, ranks in groups.items())
        raise ValueError(f"the ranks read different shard lists for split {split.split!r} of {data} (the manifest "
                         f"changed while the run started?): {seen}; start the run again")


def _seed_loader_workers(seed: int, epoch: int, rank: int, train: bool) -> None:
    # Worker seeds derive from the global RNG when the loader starts: pin it to (seed, epoch, rank).
    torch.manual_seed(derive_seed(seed, "loader", epoch, rank, int(train)))


class TrainData:
    """Training's batches: the train split's loader per epoch and its augmented model inputs."""

    def __init__(self, cfg: TrainConfig, split: Any, env: DistEnv, vocab_file: str):
        self.cfg, self.split, self.env, self.vocab_file = cfg, split, env, vocab_file
        self.augment = AugmentConfig(freqm=cfg.freqm, timem=cfg.timem, noise=cfg.noise, norm_mean=cfg.norm_mean,
                                     norm_std=cfg.norm_std)
        self._ahead: tuple[int, Iterator[Any]] | None = None   # an epoch opened early (prefetch)

    def batches_per_epoch(self) -> int:
        return int(batches_per_epoch(self.split, self.env.world_size, self.cfg.num_workers, self.cfg.batch_size,
                                     train=True))

    def open_ahead_at(self) -> int:
        """Batches left in an epoch when the loop opens the next one (`prefetch`): by then the epoch's loader
        has asked its workers for every batch it still gives, so the next epoch's workers start (and, from a
        remote store, fetch their first indexes and windows) while this epoch's last batches are trained on."""
        return self._loader_config().prefetch_factor * max(1, self.cfg.num_workers)

    def prefetch(self, epoch: int) -> None:
        """Open `epoch`'s batches now, for `open(epoch)` to take: its loader workers start and read ahead while
        the caller does other work (the end of the epoch before, its checkpoint and evaluation). Once per
        epoch: asked again for the same epoch, it keeps what it opened."""
        if self._ahead is not None and self._ahead[0] == epoch:
            return
        self.close()
        self._ahead = (epoch, self.open(epoch))

    def close(self) -> None:
        """Drop an epoch opened early and not taken (its workers end)."""
        self._ahead = None

    def open(self, epoch: int, start_batch: int = 0) -> Iterator[Any]:
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == epoch and start_batch == 0:
            return ahead[1]
        del ahead   # another epoch or a resumed one: its workers end before this one's start
        cfg, loader_cfg = self.cfg, self._loader_config()
        _seed_loader_workers(cfg.seed, epoch, self.env.rank, train=True)
        # the split read once for the run: every epoch reads the shard list the run started with
        batches, _ = make_loader(loader_cfg, self.env.rank, self.env.world_size, epoch, start_batch=start_batch,
                                 info=self.split)
        return iter(batches)

    def _loader_config(self) -> LoaderConfig:
        cfg = self.cfg
        return LoaderConfig(data=cfg.data, shard_base=cfg.shard_base, split=cfg.train_split, train=True,
                            batch_size=cfg.batch_size, num_frames=cfg.num_frames, num_workers=cfg.num_workers,
                            shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed, skip_bad_shards=cfg.skip_bad_shards,
                            tokenizer=self.vocab_file, max_caption_tokens=cfg.max_caption_tokens,
                            remote=remote_config_from_json(cfg.remote), pin_memory=self.env.device.type == "cuda")

    def prepare(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Augmentation draws from the global RNG, which the loop reseeds per micro-batch."""
        b = prepare_batch(batch, self.augment, train=True, device=self.env.device)
        if "tokens" not in b:
            raise RuntimeError("the train loader produced no tokens (LoaderConfig.tokenizer unset)")
        return b["audio"], b["visual"], b["tokens"], b["need_predict"]


class EvalBatch(NamedTuple):
    """One evaluation batch, padding rows dropped: model inputs on the device, clip keys, reference captions."""
    audio: torch.Tensor
    visual: torch.Tensor
    keys: list[str]
    references: list[list[str]]


@dataclass(frozen=True)
class EvalData:
    """What an evaluation reads: `split` of `data`, every clip exactly once across ranks, its middle `num_frames`
    frames, the fbank normalized with (norm_mean, norm_std) and not augmented. Training's per-epoch evaluation
    (`eval_data_of`) and avcap.evaluate open their batches here."""
    data: str
    split: str
    num_frames: int
    batch_size: int
    norm_mean: float
    norm_std: float
    shard_base: str = ""
    num_workers: int = 2
    skip_bad_shards: bool = False
    remote: str = ""   # --remote: RemoteConfig fields as JSON (shards.remote.remote_config_from_json)
    seed: int = 0   # nothing read depends on it; it pins the loader workers' seeds, as training's loader does

    def open(self, env: DistEnv, epoch: int = 0) -> Iterator[EvalBatch]:
        """This rank's share of the split."""
        loader_cfg = LoaderConfig(data=self.data, shard_base=self.shard_base, split=self.split, train=False,
                                  batch_size=self.batch_size, num_frames=self.num_frames,
                                  num_workers=self.num_workers, skip_bad_shards=self.skip_bad_shards,
                                  remote=remote_config_from_json(self.remote), pin_memory=env.device.type == "cuda")
        augment = AugmentConfig(norm_mean=self.norm_mean, norm_std=self.norm_std)
        _seed_loader_workers(self.seed, epoch, env.rank, train=False)
        batches, _ = make_loader(loader_cfg, env.rank, env.world_size, epoch)
        return (_eval_batch(batch, augment, env.device) for batch in batches)


def eval_data_of(cfg: TrainConfig) -> EvalData:
    """The eval split of a training run, read with the run's frames, normalization and loader settings."""
    return EvalData(data=cfg.data, split=cfg.eval_split, num_frames=cfg.num_frames, batch_size=cfg.eval_batch_size,
                    norm_mean=cfg.norm_mean, norm_std=cfg.norm_std, shard_base=cfg.shard_base,
                    num_workers=cfg.num_workers, skip_bad_shards=cfg.skip_bad_shards, remote=cfg.remote,
                    seed=cfg.seed)


def _eval_batch(batch: Any, augment: AugmentConfig, device: torch.device) -> EvalBatch:
    # Eval batches carry padding rows (valid=False) so every worker yields as many batches: drop them.
    b = prepare_batch(batch, augment, train=False, device=device)
    valid = batch["valid"].tolist()
    keep = torch.tensor(valid, dtype=torch.bool, device=b["audio"].device)
    keys = [k for k, v in zip(batch["keys"], valid) if v]
    refs = [c for c, v in zip(batch["captions"], valid) if v]
    return EvalBatch(b["audio"][keep], b["visual"][keep], keys, refs)
