"""Training faults: a kill in the middle of a checkpoint write, a damaged checkpoint, a rank with no shard of
its own, a corrupt shard. SIGKILL mid-epoch + exact resume and a truncated shard under torchrun are in
tests/test_train.py; truncated checkpoint files in tests/test_checkpoint.py (see RELIABILITY.md).
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from avcap.checkpoint import CheckpointError
from avcap.training import TrainConfig, train
from tests.fixtures_train import TrainData, make_train_data

REPO = Path(__file__).resolve().parent.parent
RUN_TIMEOUT_S = 180

# The second checkpoint save dies half way through writing its bytes: a real SIGKILL at a chosen point.
_KILL_IN_SECOND_SAVE = """
import io, os, signal, sys
import torch
import avcap.checkpoint as ck
real_save, calls = torch.save, []
def save(obj, f, *a, **kw):
    calls.append(1)
    if len(calls) == 2:
        buf = io.BytesIO()
        real_save(obj, buf, *a, **kw)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *a, **kw)
ck.torch.save = save
import train
sys.exit(train.main(sys.argv[1:]))
"""


def _args(data: TrainData, out: Path, *extra: str) -> list[str]:
    return ["--data", str(data.root), "--out", str(out), "--vocab", str(data.vocab), "--model", "tiny",
            "--model-overrides", data.model_overrides, "--batch-size", "4", "--lr", "5e-3", "--warmup-epochs",
            "0.25", "--java", "no", "--no-progress", "--no-tensorboard", "--num-workers", "0", "--eval-every",
            "0", "--epochs", "1", "--ckpt-every", "3", *extra]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _losses(out: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if r.get("kind") == "train"}


def test_sigkill_mid_checkpoint_write_resumes_from_the_last_complete_one(learnable_data, tmp_path):
    # One process, 12 steps per epoch, a checkpoint every 3 steps: the save at step 6 is killed half written.
    ref = tmp_path / "ref"
    r = subprocess.run([sys.executable, "train.py", *_args(learnable_data, ref)], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert r.returncode == 0, r.stderr[-3000:]
    expected = _losses(ref)
    assert sorted(expected) == list(range(1, 13))

    out = tmp_path / "killed"
    r = subprocess.run([sys.executable, "-c", _KILL_IN_SECOND_SAVE, *_args(learnable_data, out)], cwd=REPO,
                       env=_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    ckpt_dir = out / "checkpoints"
    partial = [p for p in ckpt_dir.iterdir() if p.name.startswith(".latest.pt.tmp-")]
    assert len(partial) == 1, list(ckpt_dir.iterdir())
    # The finished name still holds the step-3 checkpoint, whole; the partial one never took it.
    state = torch.load(ckpt_dir / "latest.pt", weights_only=True)["training"]
    assert (state["step"], state["batch_in_epoch"]) == (3, 3)
    with pytest.raises(Exception):
        torch.load(partial[0], weights_only=True)

    r = subprocess.run([sys.executable, "train.py", *_args(learnable_data, out), "--resume", "latest"], cwd=REPO,
                       env=_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "partial checkpoint of a killed run" in r.stderr
    assert not [p for p in ckpt_dir.iterdir() if ".tmp-" in p.name]  # the partial file was removed
    resumed = _losses(out)
    assert sorted(resumed) == list(range(1, 13))
    for step in range(1, 13):  # from step 3 on, the same run as the one never killed
        assert resumed[step] == pytest.approx(expected[step], abs=1e-6, rel=0), step


def test_truncated_checkpoint_is_detected_and_not_loaded(learnable_data, tmp_path):
    out = tmp_path / "run"
    cfg = TrainConfig(data=str(learnable_data.root), out=str(out), vocab=str(learnable_data.vocab), model="tiny",
                      model_overrides=learnable_data.model_overrides, batch_size=4, num_workers=0, epochs=1,
                      max_steps=1, eval_every=0, progress=False, tensorboard=False)
    train(cfg)
    latest = out / "checkpoints" / "latest.pt"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size * 2 // 3])
    metrics_before = (out / "metrics.jsonl").read_text()
    with pytest.raises(CheckpointError, match=str(latest)):
        train(TrainConfig(**{**cfg.__dict__, "resume": "latest", "max_steps": 2}))
    assert (out / "metrics.jsonl").read_text() == metrics_before  # nothing trained from it


def test_a_rank_with_no_shard_of_its_own_does_not_hang(tmp_path):
    # One train shard, two ranks: the loader wraps around so both ranks get batches; the run ends on its own.
    data = make_train_data(tmp_path / "one", [16], [2])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "train.py"), *_args(data, tmp_path / "run")[:-2], "--ckpt-every", "0"]
    r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted(_losses(tmp_path / "run")) == [1, 2]  # 16 clips / (2 ranks x 4) = 2 steps


def test_a_shard_with_a_corrupt_member_is_named(tmp_path):
    data = make_train_data(tmp_path / "bad", [8, 8], [2])
    shard = data.root / "shards" / "train" / "train-00001.tar"
    # A whole, valid tar whose first fbank is garbage: the failure must say which shard and which sample.
    with tarfile.open(shard) as tf:
        members = [(ti, tf.extractfile(ti).read()) for ti in tf]
    bad_key = next(ti.name for ti, _ in members if ti.name.endswith(".fbank.npy")).split(".")[0]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tf:
        for ti, payload in members:
            if ti.name == f"{bad_key}.fbank.npy":
                payload = b"\x93NUMPY garbage" + bytes(len(payload) - 14)
            ti.size = len(payload)
            tf.addfile(ti, io.BytesIO(payload))
    cfg = TrainConfig(data=str(data.root), out=str(tmp_path / "run"), vocab=str(data.vocab), model="tiny",
                      model_overrides=data.model_overrides, batch_size=4, num_workers=0, epochs=1, eval_every=0,
                      progress=False, tensorboard=False)
    with pytest.raises(Exception) as e:
        train(cfg)
    assert "train-00001.tar" in str(e.value) and bad_key in str(e.value), str(e.value)
