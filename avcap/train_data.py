"""The seam between the training loop and the data: shards.loader for batches, shards.augment for the batched
augmentation on the training device."""
from __future__ import annotations

from typing import Any, Iterator

import torch

from avcap.distributed import DistEnv
from avcap.train_config import TrainConfig
from avcap.train_state import derive_seed


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



class TrainData:
    """The seam between the training loop and shards.loader / shards.augment."""

    def __init__(self, cfg: TrainConfig, split: Any, env: DistEnv, vocab_file: str | None = None):
        self.cfg, self.split, self.env, self.vocab_file = cfg, split, env, vocab_file

    def _loader_config(self, train: bool) -> Any:
        from shards.loader import LoaderConfig
        cfg = self.cfg
        return LoaderConfig(data=cfg.data, shard_base=cfg.shard_base,
                            split=cfg.train_split if train else cfg.eval_split, train=train,
                            batch_size=cfg.batch_size if train else cfg.eval_batch_size,
                            num_frames=cfg.num_frames, num_workers=cfg.num_workers,
                            shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed, skip_bad_shards=cfg.skip_bad_shards,
                            tokenizer=self.vocab_file if train else None,
                            max_caption_tokens=cfg.max_caption_tokens,
                            pin_memory=self.env.device.type == "cuda")

    def batches_per_epoch(self) -> int:
        from shards.epoch_plan import batches_per_epoch
        return int(batches_per_epoch(self.split, self.env.world_size, self.cfg.num_workers, self.cfg.batch_size,
                                     train=True))

    def open(self, epoch: int, train: bool, start_batch: int = 0) -> Iterator[Any]:
        from shards.loader import make_loader
        # Worker seeds derive from the global RNG when the loader starts: pin it to (seed, epoch, rank).
        torch.manual_seed(derive_seed(self.cfg.seed, "loader", epoch, self.env.rank, int(train)))
        batches, _ = make_loader(self._loader_config(train), self.env.rank, self.env.world_size, epoch,
                                 start_batch=start_batch)
        return iter(batches)

    def _augment_config(self) -> Any:
        from shards.augment import AugmentConfig
        return AugmentConfig(freqm=self.cfg.freqm, timem=self.cfg.timem, noise=self.cfg.noise,
                             norm_mean=self.cfg.norm_mean, norm_std=self.cfg.norm_std)

    def prepare(self, batch: Any, train: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Augmentation draws from the global RNG, which the loop reseeds per micro-batch."""
        from shards.augment import prepare_batch
        b = prepare_batch(batch, self._augment_config(), train=train, device=self.env.device)
        if "tokens" not in b:
            raise RuntimeError("the train loader produced no tokens (LoaderConfig.tokenizer unset)")
        return b["audio"], b["visual"], b["tokens"], b["need_predict"]

    def prepare_eval(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, list[str], list[list[str]]]:
        """Eval batches carry padding rows (valid=False) so every worker yields as many batches: drop them."""
        from shards.augment import prepare_batch
        b = prepare_batch(batch, self._augment_config(), train=False, device=self.env.device)
        valid = batch["valid"].tolist()
        keep = torch.tensor(valid, dtype=torch.bool, device=b["audio"].device)
        keys = [k for k, v in zip(batch["keys"], valid) if v]
        refs = [c for c, v in zip(batch["captions"], valid) if v]
        return b["audio"][keep], b["visual"][keep], keys, refs
