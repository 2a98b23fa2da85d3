"""avcap.checkpointer.Checkpointer on its own: when a training run saves latest.pt, and which evaluation best.pt
keeps (the torchrun tests in tests/test_train.py and tests/test_reliability_train.py run it inside the loop)."""
from __future__ import annotations

import json

import torch

from avcap.checkpoint import load_checkpoint
from avcap.checkpointer import Checkpointer
from avcap.distributed import DistEnv
from avcap.model import AVCap
from avcap.optim import build_optimizer, build_scheduler
from avcap.tokenizer import tokenizer_from_vocab
from avcap.train_config import TrainConfig
from avcap.train_state import Position


def _saved_position(path) -> tuple[int, int, int]:
    state = torch.load(path, weights_only=True)["training"]
    return state["step"], state["epoch"], state["batch_in_epoch"]


def test_saves_when_due_and_keeps_the_best_evaluation(tmp_path, tiny_config, bert_layout_vocab):
    cfg = TrainConfig(out=str(tmp_path / "run"), ckpt_every=2, progress=False, tensorboard=False)
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    checkpoints = Checkpointer(cfg, env)
    assert checkpoints.dir.is_dir() and checkpoints.best is None and checkpoints.latest is None
    model = AVCap(tiny_config)
    optimizer = build_optimizer(model, cfg)
    checkpoints.track(model, tiny_config, tokenizer_from_vocab(bert_layout_vocab), 20, optimizer,
                      build_scheduler(optimizer, cfg, steps_per_epoch=4), torch.amp.GradScaler("cpu", enabled=False))
    latest = checkpoints.dir / "latest.pt"

    checkpoints.save_if_due(Position(1, 0, 1), batches_per_epoch=4, stop=False)
    assert not latest.exists()
    checkpoints.save_if_due(Position(2, 0, 2), batches_per_epoch=4, stop=False)  # every --ckpt-every steps
    assert checkpoints.latest == latest and _saved_position(latest) == (2, 0, 2)
    checkpoints.save_if_due(Position(3, 0, 3), batches_per_epoch=4, stop=True)   # --max-steps stops mid-epoch
    assert _saved_position(latest) == (3, 0, 3)
    checkpoints.save_if_due(Position(4, 0, 4), batches_per_epoch=4, stop=False)  # the epoch's end saves instead
    assert _saved_position(latest) == (3, 0, 3)
    checkpoints.save_epoch_end(step=4, epoch=0)
    assert _saved_position(latest) == (4, 1, 0)
    loaded = load_checkpoint(latest)
    assert loaded.frames_per_clip == 20 and loaded.norm_stats == {"mean": cfg.norm_mean, "std": cfg.norm_std}

    results = tmp_path / "run" / "eval" / "val-epoch000.json"
    checkpoints.keep_best({"CIDEr": 0.5, "SPIDEr": None}, results, epoch=0, step=4)
    best = {"metric": "CIDEr", "value": 0.5, "epoch": 0, "step": 4, "results": str(results)}
    assert checkpoints.best == best == json.loads((checkpoints.dir / "best.json").read_text())
    assert (checkpoints.dir / "best.pt").read_bytes() == latest.read_bytes()

    checkpoints.save_epoch_end(step=8, epoch=1)
    checkpoints.keep_best({"CIDEr": 0.4}, results, epoch=1, step=8)       # worse: best.pt stays epoch 0's
    checkpoints.keep_best(None, results, epoch=1, step=8)                 # what ranks other than 0 pass
    assert checkpoints.best == best and _saved_position(checkpoints.dir / "best.pt") == (4, 1, 0)
    # SPICE became available: another metric restarts the comparison, even with a lower value
    checkpoints.keep_best({"CIDEr": 0.3, "SPIDEr": 0.1}, results, epoch=1, step=8)
    assert checkpoints.best["metric"] == "SPIDEr" and checkpoints.best["value"] == 0.1
    assert _saved_position(checkpoints.dir / "best.pt") == (8, 2, 0)

    assert Checkpointer(cfg, env).best == checkpoints.best  # a resumed run compares with the saved best
