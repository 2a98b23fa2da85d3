"""Training: config/flags, schedule, checkpoints, and real torchrun runs (2 gloo processes on CPU).

The torchrun tests use the learnable synthetic dataset of tests/fixtures_train.py (class = mel band = frame colour
= caption), a model cut down to its sizes, and `python -m torch.distributed.run`, the same entry as `torchrun`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from avcap.optim import WarmupCosine
from avcap.train_config import TrainConfig, build_arg_parser, config_from_args
from avcap.train_data import check_dataset_matches
from avcap.training import train
from tests.fixtures_train import TrainData, make_train_data

REPO = Path(__file__).resolve().parent.parent
RUN_TIMEOUT_S = 180  # a hang fails the test instead of stalling the suite


def _torchrun(data: TrainData, out: Path, *extra: str, nproc: int = 2, popen: bool = False):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(REPO / "train.py"), "--data", str(data.root), "--out", str(out), "--vocab", str(data.vocab),
           "--model", "tiny", "--model-overrides", data.model_overrides, "--batch-size", "4", "--lr", "5e-3",
           "--warmup-epochs", "0.25", "--java", "no", "--no-progress", "--no-tensorboard", *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    if popen:
        # Own session: SIGKILL to the group hits the agent and both workers at once, like a node dying.
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def _records(out: Path, kind: str = "train") -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("kind") == kind]


def _losses_by_step(out: Path) -> dict[int, float]:
    # A resumed run re-logs the steps between its checkpoint and the crash: the last line per step wins.
    return {r["step"]: r["loss"] for r in _records(out)}


# ----------------------------------------------------------------------------- config and schedule

def test_every_trainconfig_field_is_one_flag():
    parser = build_arg_parser()
    dests = {a.dest for a in parser._actions if a.dest != "help"}
    assert dests == {f.name for f in dataclasses.fields(TrainConfig)}
    help_text = parser.format_help()
    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in help_text
    cfg = config_from_args(["--data", "d", "--grad-accum", "3", "--no-tensorboard", "--clip-grad", "1.5",
                            "--precision", "fp32"])
    assert (cfg.data, cfg.grad_accum, cfg.tensorboard, cfg.clip_grad, cfg.precision) == ("d", 3, False, 1.5, "fp32")
    # docs/original.md §6 defaults
    d = TrainConfig()
    assert (d.lr, d.weight_decay, d.beta1, d.beta2, d.warmup_lr, d.min_lr) == (1e-4, 5e-7, 0.95, 0.999, 2e-7, 1e-6)


def test_bad_config_is_refused_with_the_field_named():
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(grad_accum=0)
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8")


def test_bad_input_on_the_command_line_is_one_line_naming_it_without_a_traceback(learnable_data, tmp_path):
    """train.py and avcap.evaluate print an input error (flags, dataset, checkpoint) as "PROG: error: ..." and
    exit with 1; AVCAP_TRACEBACK=1 shows the traceback."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cases = [([sys.executable, "train.py", "--data", str(learnable_data.root), "--out", str(tmp_path / "a"),
               "--batch-size", "0"], "train.py: error: invalid TrainConfig: batch_size must be >= 1, got 0"),
             ([sys.executable, "train.py", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "b")],
              f"train.py: error: dataset manifest {tmp_path / 'none' / 'manifest.json'} does not exist"),
             ([sys.executable, "-m", "avcap.evaluate", "--checkpoint", str(tmp_path / "none.pt"), "--data",
               str(learnable_data.root)], f"avcap.evaluate: error: {tmp_path / 'none.pt'}: checkpoint file does not "
                                          f"exist")]
    for cmd, said in cases:
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        assert (r.returncode, r.stderr.strip().splitlines()[-1]) == (1, said), r.stderr[-2000:]
        assert "Traceback" not in r.stderr
    r = subprocess.run(cases[0][0], cwd=REPO, env=dict(env, AVCAP_TRACEBACK="1"), capture_output=True, text=True,
                       timeout=RUN_TIMEOUT_S)
    assert r.returncode == 1 and "Traceback" in r.stderr and "batch_size must be >= 1" in r.stderr


def test_warmup_cosine_per_step():
    s = WarmupCosine(lr=1e-4, warmup_lr=2e-7, min_lr=1e-6, warmup_steps=10, total_steps=110)
    assert s.lr_at(0) == pytest.approx(2e-7)
    assert s.lr_at(5) == pytest.approx(2e-7 + (1e-4 - 2e-7) / 2)
    assert s.lr_at(10) == pytest.approx(1e-4)
    assert s.lr_at(60) == pytest.approx(1e-6 + 0.5 * (1e-4 - 1e-6))        # half way down the cosine
    assert s.lr_at(110) == pytest.approx(1e-6) and s.lr_at(500) == pytest.approx(1e-6)
    assert all(s.lr_at(i) >= s.lr_at(i + 1) for i in range(10, 120))


def test_dataset_that_disagrees_with_the_model_is_refused(learnable_data):
    from avcap.model import AVCapConfig
    from shards.split_info import load_split
    split = load_split(str(learnable_data.root), "train")
    overrides = json.loads(learnable_data.model_overrides)
    ok = AVCapConfig.tiny(**overrides)
    check_dataset_matches(split, ok, "DATA")
    with pytest.raises(ValueError, match=r"num_frames=8 .* 4 frames per clip"):
        check_dataset_matches(split, AVCapConfig.tiny(**{**overrides, "num_frames": 8}), "DATA")
    with pytest.raises(ValueError, match=r"target_length: the dataset DATA has 128, the model config has 1024"):
        check_dataset_matches(split, AVCapConfig.tiny(**{**overrides, "audio_length": 1024}), "DATA")
    with pytest.raises(ValueError, match=r"checkpoint was trained on 20 frames per clip .* has 4"):
        check_dataset_matches(split, ok, "DATA", frames_per_clip=20)


# ----------------------------------------------------------------------------- single process

def test_single_process_accumulation_clipping_and_loadable_checkpoint(learnable_data, tmp_path):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        assert var not in os.environ
    cfg = TrainConfig(data=str(learnable_data.root), out=str(tmp_path / "run"), vocab=str(learnable_data.vocab),
                      model="tiny", model_overrides=learnable_data.model_overrides, batch_size=4, grad_accum=2,
                      clip_grad=0.5, num_workers=0, epochs=1, max_steps=3, eval_every=0, progress=False,
                      tensorboard=False, lr=1e-3)
    result = train(cfg)
    assert result.step == 3
    recs = _records(tmp_path / "run")
    # 48 clips / batch 4 = 12 micro-batches per epoch; 2 per optimizer step
    assert [r["batch_in_epoch"] for r in recs] == [2, 4, 6]
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in recs)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "latest.pt", weights_only=True)
    state = ckpt["training"]
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (3, 0, 6)
    assert state["train_config"]["grad_accum"] == 2 and state["world_size"] == 1
    assert state["optimizer"]["state"] and state["scheduler"]["last_epoch"] == 3
    assert len(state["rng"]) == 1 and isinstance(state["rng"][0]["torch"], torch.Tensor)
    # the checkpoint alone rebuilds the captioner (avcap.checkpoint), and the optimizer holds only trainable params
    from avcap.checkpoint import load_checkpoint
    loaded = load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt")
    n_trainable = sum(1 for p in loaded.model.parameters() if p.requires_grad)
    assert len(state["optimizer"]["param_groups"][0]["params"]) == n_trainable
    assert n_trainable < sum(1 for _ in loaded.model.parameters())   # mode "av" leaves some encoder norms unused
    run_config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert run_config["train_config"] == dataclasses.asdict(cfg) and run_config["batches_per_epoch"] == 12


def test_an_epoch_opened_ahead_starts_its_workers_at_once_and_gives_the_batches_of_one_opened_then(
        learnable_data, tmp_path):
    """TrainData.prefetch(e) starts epoch e's loader workers before anyone asks for a batch (the loop calls it
    as an epoch's last `open_ahead_at()` batches train); open(e) takes that loader (its batches those of a loader
    opened then), and opening another epoch or resuming mid-epoch drops it (its workers end)."""
    from avcap.distributed import DistEnv
    from avcap.train_data import TrainData as Data
    from shards.split_info import load_split
    cfg = TrainConfig(data=str(learnable_data.root), out=str(tmp_path), model="tiny", batch_size=4, num_workers=1,
                      shuffle_buffer=8, progress=False, tensorboard=False)
    data = Data(cfg, load_split(cfg.data, cfg.train_split), DistEnv(0, 1, 0, torch.device("cpu")),
                vocab_file=str(learnable_data.vocab))
    want = [b["keys"] for b in data.open(1)]
    data.prefetch(1)
    ahead = data._ahead[1]
    assert all(w.is_alive() for w in ahead._workers)   # started, nothing asked yet
    assert data.open(1) is ahead and data._ahead is None
    assert [b["keys"] for b in ahead] == want
    data.prefetch(2)
    workers = list(data._ahead[1]._workers)
    resumed = data.open(2, start_batch=1)                # not what was opened ahead: dropped, its workers end
    for w in workers:
        w.join(timeout=30)
    assert not any(w.is_alive() for w in workers) and data._ahead is None
    assert len(list(resumed)) == len(want) - 1
    data.prefetch(3)
    again = data._ahead[1]
    data.prefetch(3)                                     # the loop asks at each of the epoch's last steps
    assert data._ahead[1] is again
    data.close()
    assert data._ahead is None
    assert data.open_ahead_at() == 4 * 1                 # the loader's prefetch_factor x its workers


# ----------------------------------------------------------------------------- torchrun

def test_torchrun_two_gloo_processes_learn_and_evaluate(learnable_data, tmp_path):
    out = tmp_path / "ddp"
    r = _torchrun(learnable_data, out, "--epochs", "4", "--num-workers", "1", "--eval-every", "4")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    losses = [rec["loss"] for rec in _records(out)]
    # 48 train clips over 2 ranks x batch 4 = 6 steps per epoch
    assert len(losses) == 24
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 1.0, losses
    info = json.loads((out / "config.json").read_text())
    assert info["world_size"] == 2 and info["steps_per_epoch"] == 6
    # each epoch's wait for its first batch is logged; epochs 1-3 were opened during their previous epoch's end
    starts = _records(out, "epoch")
    assert [r["epoch"] for r in starts] == [0, 1, 2, 3] and [r["step"] for r in starts] == [0, 6, 12, 18]
    assert all(0 <= r["loader_wait_s"] < 60 for r in starts), starts
    (ev,) = _records(out, "eval")
    assert ev["num_clips"] == 6 and ev["CIDEr"] is not None and ev["METEOR"] is None and ev["selection"] == "CIDEr"
    results = json.loads(Path(json.loads((out / "checkpoints" / "best.json").read_text())["results"]).read_text())
    assert sorted(x["image_id"] for x in results) == sorted(learnable_data.references("val"))
    assert (out / "checkpoints" / "best.pt").is_file()


def test_uneven_shards_do_not_hang_and_a_truncated_shard_fails_every_rank(tmp_path):
    # 2 shards of 30 and 2 clips over 2 ranks: rank 1 reads a 2-clip shard for its 4 batches of 4.
    data = make_train_data(tmp_path / "uneven", [30, 2], [3])
    r = _torchrun(data, tmp_path / "run", "--epochs", "2", "--num-workers", "1", "--eval-every", "0")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    steps = [rec["step"] for rec in _records(tmp_path / "run")]
    assert steps == list(range(1, 9))  # 32 // (2 * 4) = 4 steps per epoch on both ranks

    # A truncated shard: the rank reading it fails with the shard named; the other rank is not left waiting.
    shard = data.root / "shards" / "train" / "train-00000.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    t0 = time.monotonic()
    r = _torchrun(data, tmp_path / "bad", "--epochs", "1", "--num-workers", "0", "--eval-every", "0")
    assert r.returncode != 0
    assert "train-00000.tar" in r.stdout + r.stderr and "truncated" in r.stdout + r.stderr
    assert time.monotonic() - t0 < RUN_TIMEOUT_S


def test_sigkill_mid_epoch_then_resume_gives_the_same_losses(learnable_data, tmp_path):
    args = ("--epochs", "3", "--num-workers", "1", "--eval-every", "0", "--ckpt-every", "4", "--noise")
    ref = tmp_path / "uninterrupted"
    r = _torchrun(learnable_data, ref, *args)
    assert r.returncode == 0, r.stdout[-3000:]
    expected = _losses_by_step(ref)
    assert sorted(expected) == list(range(1, 19))

    out = tmp_path / "killed"
    proc = _torchrun(learnable_data, out, *args, popen=True)
    try:
        # Step 9 logged means the step-8 checkpoint (epoch 1, 2 of 6 batches) is on disk; kill right there.
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while max(_losses_by_step(out), default=0) < 9:
            assert proc.poll() is None, f"run ended before the kill: {proc.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, "run made no progress"
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stdout.close()
    killed_at = max(_losses_by_step(out))
    assert killed_at < 18, "the kill came after the run had finished"
    state = torch.load(out / "checkpoints" / "latest.pt", weights_only=True)["training"]
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (8, 1, 2)

    r = _torchrun(learnable_data, out, *args, "--resume", "latest")
    assert r.returncode == 0, r.stdout[-3000:]
    resumed = _losses_by_step(out)
    assert sorted(resumed) == list(range(1, 19))
    for step in range(1, 19):
        assert resumed[step] == pytest.approx(expected[step], abs=1e-6, rel=0), (step, resumed, expected)
