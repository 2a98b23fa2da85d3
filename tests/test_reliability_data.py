"""Untrusted datasets and run settings: a manifest is data (never a command, never a path outside its own
location, each shard once), a sample that does not decode is skipped like a bad shard, a resume refuses settings
that would change the model or the data, an unusable eval split fails before training, a pickled checkpoint is
refused in the project's words. One test per case; see RELIABILITY.md."""
from __future__ import annotations

import io
import json
import shutil
import tarfile
import threading
import warnings
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from shards.file_entry import FileEntry
from shards.index import ShardError
from shards.loader import LoaderConfig, make_loader
from shards.split_info import load_split
from tests.fixtures_loader import build_dataset, clip_number

REPO = Path(__file__).resolve().parent.parent


def _edit_manifest(root: Path, edit) -> None:
    m = json.loads((root / "manifest.json").read_text())
    edit(m)
    (root / "manifest.json").write_text(json.dumps(m, indent=1))


def _epoch(cfg: LoaderConfig, world_size: int) -> list[list[dict]]:
    out = []
    for rank in range(world_size):
        it, n = make_loader(cfg, rank, world_size, 0)
        batches = list(it)
        assert len(batches) == n, f"rank {rank}: {len(batches)} of {n} batches"
        out.append(batches)
    return out


# ------------------------------------------------------------------ 1: a manifest is data, never a command

class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory) -> Path:
    """train: 2 shards (3, 4 clips); val: 1 shard of 3 clips."""
    return build_dataset(tmp_path_factory.mktemp("small"), {"train": [3, 4], "val": [3]}, frames=2, size=32)


HOSTILE_PATHS = [
    "pipe:touch {marker}",                       # a shell command through webdataset.gopen
    "{root}/shards/val/val-00000.tar",           # an absolute path (anywhere on the machine)
    "../outside/val-00000.tar",                  # escapes the dataset directory
    "shards/%2e%2e/%2E%2E/../val-00000.tar",     # the same, percent-encoded
    "shards/%2e%2e%2f%2e%2e%2fx.tar",            # an encoded slash
    "http://127.0.0.1:9/val-00000.tar",          # another scheme and host
    "file:///etc/passwd",
    "C:\\shards\\val-00000.tar",
]


def test_a_manifest_entry_that_is_a_command_or_leaves_the_dataset_is_refused_by_name(small_shards, tmp_path,
                                                                                     ops_build):
    from pipeline.audit_checks import run_audit
    from pipeline.audit_report import AuditConfig, AuditError
    from pipeline.publish import PublishError, publish
    from tests.fixtures_ops import copy_build

    root = tmp_path / "ds"
    shutil.copytree(small_shards, root)
    marker = tmp_path / "PWNED"
    good = json.loads((root / "manifest.json").read_text())
    for hostile in HOSTILE_PATHS:
        path = hostile.format(marker=marker, root=root)
        _edit_manifest(root, lambda m: m["splits"]["val"]["shards"][0].update(path=path))
        with pytest.raises(ValueError) as e:
            info = load_split(str(root), "val")
            list(make_loader(LoaderConfig(data=str(root), split="val", batch_size=3, num_workers=0,
                                          train=False))[0])
            pytest.fail(f"{path!r} was accepted as {info.shards[0].url}")
        msg = str(e.value)
        assert "manifest.json" in msg and "'val'" in msg and "#0" in msg and repr(path) in msg, msg
        assert not marker.exists(), path
    # A manifest read over HTTP: its entries resolve on the same scheme and host, and a command is refused.
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/ds/manifest.json"
        (root / "manifest.json").write_text(json.dumps(good))
        assert [s.url for s in load_split(url, "train").shards] == [
            f"http://127.0.0.1:{server.server_port}/ds/shards/train/train-0000{i}.tar" for i in (0, 1)]
        _edit_manifest(root, lambda m: m["splits"]["val"]["shards"][0].update(path=f"pipe:touch {marker}"))
        with pytest.raises(ValueError, match=r"split 'val' shard #0 'pipe:touch .*' is a URL or command"):
            list(make_loader(LoaderConfig(data=url, split="val", batch_size=3, num_workers=0, train=False))[0])
        assert not marker.exists()
    finally:
        server.shutdown()
        server.server_close()

    # train.py the same, before anything else happens
    _edit_manifest(root, lambda m: m["splits"]["train"]["shards"][1].update(path=f"pipe:touch {marker}"))
    from avcap.train_config import config_from_args
    from avcap.training import train

    def train_main(argv):   # what train.py runs
        return train(config_from_args(argv))
    with pytest.raises(ValueError, match=r"split 'train' shard #1 'pipe:touch .*' is a URL or command"):
        train_main(["--data", str(root), "--out", str(tmp_path / "run"), "--model", "tiny", "--num-workers", "0",
                    "--no-progress", "--no-tensorboard"])
    assert not marker.exists() and not (tmp_path / "run" / "checkpoints" / "latest.pt").exists()

    # Shards elsewhere are the user's choice, typed on the command line: --shard-base (pipe: included).
    (root / "manifest.json").write_text(json.dumps(good))
    moved = tmp_path / "elsewhere"
    shutil.move(root / "shards", moved / "shards")
    cfg = LoaderConfig(data=str(root), split="val", batch_size=3, num_workers=0, train=False)
    for base in (str(moved), f"file://{moved}", f"pipe:cat {moved}/{{path}}"):
        (batches,) = _epoch(LoaderConfig(**{**cfg.__dict__, "shard_base": base}), 1)
        assert sorted(clip_number(k) for b in batches for k in b["keys"]) == [7, 8, 9], base

    # The audit and publishing read manifests through the same reader: an absolute path is refused there too.
    build = copy_build(ops_build, tmp_path / "build")
    m = json.loads((build.out_dir / "manifest.json").read_text())
    shard = m["splits"]["test"]["shards"][0]
    shard["path"] = str(build.out_dir / shard["path"])
    (build.out_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(AuditError, match=r"'test' shard #0 .*absolute"):
        run_audit(AuditConfig(build.out_dir, sample=0))
    with pytest.raises(PublishError, match=r"'test' shard #0 .*absolute"):
        publish(build.out_dir, f"file://{tmp_path / 'published'}")
    assert not (tmp_path / "published" / "manifest.json").exists()


# ------------------------------------------------------------------ 8: each shard once, counts add up

def test_a_shard_listed_twice_or_counts_that_do_not_add_up_are_refused(small_shards, tmp_path, ops_build):
    from pipeline.audit_checks import run_audit
    from pipeline.audit_report import AuditConfig, AuditError
    from tests.fixtures_ops import copy_build

    root = tmp_path / "ds"
    shutil.copytree(small_shards, root)
    _edit_manifest(root, lambda m: m["splits"]["val"]["shards"].append(
        dict(m["splits"]["val"]["shards"][0], path="shards/./val/val-00000.tar")))
    with pytest.raises(ValueError, match=r"'val' shard #1 'shards/./val/val-00000.tar' is listed twice"):
        load_split(str(root), "val")

    build = copy_build(ops_build, tmp_path / "build")
    m = json.loads((build.out_dir / "manifest.json").read_text())
    entry = m["splits"]["test"]
    entry["shards"].append(dict(entry["shards"][0]))
    entry["num_samples"] += entry["shards"][0]["num_samples"]
    (build.out_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(AuditError, match=r"'test' shard #\d+ '.*' is listed twice"):
        run_audit(AuditConfig(build.out_dir, sample=0))
    entry["shards"].pop()   # one shard each, but the split's count is not their sum
    (build.out_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(AuditError, match=r"split 'test': num_samples \d+ is not the sum over its shards"):
        run_audit(AuditConfig(build.out_dir, sample=0))


# ------------------------------------------------------------------ 6: a member that does not decode

def test_skip_bad_shards_also_skips_a_sample_whose_jpeg_does_not_decode(small_shards, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(small_shards, root)
    shard = root / "shards" / "train" / "train-00001.tar"
    with tarfile.open(shard) as tf:
        members = [(ti, tf.extractfile(ti).read()) for ti in tf]
    bad_key = members[0][0].name.split(".")[0]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tf:
        for ti, payload in members:
            if ti.name.startswith(bad_key + ".frame"):   # every frame: whichever the loader draws is corrupt
                payload = payload[:20] + b"\xff\xd9" + bytes(len(payload) - 22)
            tf.addfile(ti, io.BytesIO(payload))
    cfg = LoaderConfig(data=str(root), split="train", batch_size=2, num_workers=0, shuffle_buffer=2)
    with pytest.raises(ShardError, match=f"train-00001.tar sample {bad_key}: undecodable JPEG"):
        _epoch(cfg, 1)
    skipping = LoaderConfig(**{**cfg.__dict__, "skip_bad_shards": True})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        per_rank = _epoch(skipping, 2)
    assert [len(r) for r in per_rank] == [1, 1]   # 7 clips // (2 ranks x 2): every rank the same count
    assert all(b["fbank"].shape[0] == 2 for r in per_rank for b in r)
    skipped = [str(w.message) for w in caught if "skipped sample" in str(w.message)]
    assert skipped and all(bad_key in s and "train-00001.tar" in s and "JPEG" in s for s in skipped), skipped
    assert bad_key not in {k for r in per_rank for b in r for k in b["keys"]}
    # eval: every other clip exactly once, batches padded to the same count per worker
    ev = LoaderConfig(data=str(root), split="train", batch_size=2, num_workers=0, train=False,
                      skip_bad_shards=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        per_rank = _epoch(ev, 2)
    assert len({len(r) for r in per_rank}) == 1
    seen = [k for r in per_rank for b in r for k, v in zip(b["keys"], b["valid"]) if v]
    assert len(seen) == 6 and len(set(seen)) == 6 and bad_key not in seen


# ------------------------------------------------------------------ 7 and 9: run settings checked up front

def _cfg(data, out: Path, **kw):
    from avcap.training import TrainConfig
    return TrainConfig(**{**dict(data=str(data.root), out=str(out), vocab=str(data.vocab), model="tiny",
                                 model_overrides=data.model_overrides, batch_size=4, num_workers=0, epochs=1,
                                 eval_every=0, progress=False, tensorboard=False), **kw})


def test_resume_refuses_changed_model_or_data_settings_and_logs_allowed_changes(learnable_data, tmp_path, capsys):
    from avcap.training import TrainConfig, train
    out = tmp_path / "run"
    cfg = _cfg(learnable_data, out, max_steps=1, lr=1e-3)
    train(cfg)
    overrides = json.loads(cfg.model_overrides) | {"depth_a": 2}
    changed = TrainConfig(**{**cfg.__dict__, "resume": "latest", "max_steps": 2,
                             "model_overrides": json.dumps(overrides), "freqm": 7, "weight_decay": 0.5})
    metrics = (out / "metrics.jsonl").read_text()
    with pytest.raises(ValueError) as e:
        train(changed)
    msg = str(e.value)
    assert "model_overrides" in msg and "freqm: checkpoint 48, now 7" in msg and "weight_decay: checkpoint" not in msg, msg
    assert (out / "metrics.jsonl").read_text() == metrics   # nothing trained

    capsys.readouterr()
    train(TrainConfig(**{**cfg.__dict__, "resume": "latest", "max_steps": 2, "lr": 2e-3, "weight_decay": 0.5}))
    log = capsys.readouterr().out
    assert "lr: checkpoint 0.001, now 0.002" in log and "weight_decay: checkpoint 5e-07, now 0.5" in log, log
    run = json.loads((out / "config.json").read_text())
    assert run["train_config"]["lr"] == 2e-3 and run["resumed_changes"]["lr"] == [1e-3, 2e-3]
    state = torch.load(out / "checkpoints" / "latest.pt", weights_only=True)["training"]
    group = state["optimizer"]["param_groups"][0]
    assert group["weight_decay"] == 0.5 and group["initial_lr"] == 2e-3   # what config.json says is what ran
    # On the command line a flag left out of a resume takes the checkpoint's value; a flag given is checked.
    from avcap.train_config import config_from_args
    again = config_from_args(["--out", str(out), "--resume", "latest", "--lr", "3e-3"])
    assert again == TrainConfig(**{**cfg.__dict__, "resume": "latest", "max_steps": 2, "lr": 3e-3,
                                   "weight_decay": 0.5})
    # The settings that may change are the documented ones.
    from avcap.train_state import RESUME_MAY_CHANGE
    readme = (REPO / "README.md").read_text()
    assert all(f"`--{f.replace('_', '-')}`" in readme for f in RESUME_MAY_CHANGE)
    assert set(RESUME_MAY_CHANGE) <= {f for f in TrainConfig.__dataclass_fields__}


def test_missing_or_empty_eval_split_fails_before_training(learnable_data, tmp_path):
    from avcap.training import train
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"--eval-split 'nope'.*no split 'nope'"):
        train(_cfg(learnable_data, out, eval_every=1, eval_split="nope", max_steps=1))
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints" / "latest.pt").exists()
    root = tmp_path / "ds"
    shutil.copytree(learnable_data.root, root)
    (root / "shards" / "empty").mkdir()
    tarfile.open(root / "shards" / "empty" / "empty-00000.tar", "w").close()
    empty = FileEntry.of_file(root / "shards" / "empty" / "empty-00000.tar", "shards/empty/empty-00000.tar")
    _edit_manifest(root, lambda m: m["splits"].update(empty={
        **m["splits"]["train"], "split": "empty", "num_samples": 0,
        "shards": [{**empty.to_dict(), "num_samples": 0, "index": None}]}))
    data = type(learnable_data)(**{**learnable_data.__dict__, "root": root})
    with pytest.raises(ValueError, match=r"--eval-split 'empty'.*holds no samples"):
        train(_cfg(data, out, eval_every=1, eval_split="empty", max_steps=1))
    assert not (out / "metrics.jsonl").exists()


# ------------------------------------------------------------------ 14b: a pickled checkpoint

def test_a_pickled_checkpoint_is_refused_without_advice_to_unpickle_it(tmp_path):
    from avcap.checkpoint import CheckpointError, read_checkpoint_file
    path = tmp_path / "pickled.pt"
    torch.save({"model": {"x": Path("/etc/passwd")}}, path)
    with pytest.raises(CheckpointError) as e:
        read_checkpoint_file(path)
    msg = str(e.value)
    assert str(path) in msg and "objects other than tensors" in msg and "never loads such files" in msg, msg
    assert "weights_only" not in msg and "False" not in msg, msg
