"""safetensors in and out: `python -m avcap.export` folders, and safetensors files of the foreign layouts."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from avcap.checkpoint import CheckpointError, load_checkpoint, load_pretrained, save_checkpoint
from avcap.export import main as export_main
from avcap.model import AVCap, AVCapConfig
from shards.manifest import load_dataset_manifest
from tests.real_manifest import write_real_manifest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run_checkpoint(tmp_path_factory, reference_dir, bert_layout_vocab):
    """The reference captioner saved as a training run would leave it: OUT/checkpoints/best.pt with training
    state, OUT/config.json naming the dataset manifest, best.json and metrics.jsonl."""
    run = tmp_path_factory.mktemp("run")
    data = run / "data"
    data.mkdir()
    write_real_manifest(data, {"train": []}, frames=20)
    write_real_manifest(data, {"val": []}, frames=10)   # another extraction: another fingerprint
    config = AVCapConfig.tiny()
    model = AVCap(config)
    model.load_state_dict(torch.load(reference_dir / "avcap_state_dict.pt", weights_only=True))
    training = {"step": 120, "train_config": {"data": str(data), "lr": 1e-4, "epochs": 3}}
    ckpt = save_checkpoint(run / "checkpoints" / "best.pt", model, config, bert_layout_vocab,
                           norm_stats={"mean": -4.0, "std": 4.5}, frames_per_clip=20, extra={"training": training})
    (run / "config.json").write_text(json.dumps({"manifest": str(data / "manifest.json")}))
    (run / "checkpoints" / "best.json").write_text(json.dumps({"metric": "CIDEr", "value": 0.42, "epoch": 2}))
    (run / "metrics.jsonl").write_text(json.dumps({"kind": "train", "loss": 3.0}) + "\n"
                                       + json.dumps({"kind": "eval", "CIDEr": 0.42, "epoch": 2}) + "\n")
    return ckpt


def test_export_round_trip_is_bit_identical(run_checkpoint, tmp_path, capsys):
    out = tmp_path / "export"
    assert export_main([str(run_checkpoint), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "vocab.txt"]
    config = json.loads((out / "config.json").read_text())
    assert config["avcap_format"] == "avcap-export" and "model_type" not in config
    # the tie is stored once (safetensors refuses shared tensors)
    stored = load_file(out / "model.safetensors")
    assert "textual.embedding.words.weight" in stored and "textual.output.weight" not in stored

    source = torch.load(run_checkpoint, weights_only=True)["model_state"]
    loaded = load_checkpoint(out)
    state = loaded.model.state_dict()
    assert sorted(state) == sorted(source)
    for k, v in source.items():
        assert state[k].dtype == v.dtype and torch.equal(state[k], v), k
    assert loaded.model.textual.output.weight is loaded.model.textual.embedding.words.weight
    pt = load_checkpoint(run_checkpoint)
    assert (loaded.config, loaded.vocab, loaded.norm_stats, loaded.frames_per_clip) == (
        pt.config, pt.vocab, pt.norm_stats, pt.frames_per_clip)

    card = (out / "README.md").read_text()
    data = run_checkpoint.parent.parent / "data"   # the manifest the run recorded
    prints = {n: e.fingerprint for n, e in load_dataset_manifest(data).splits.items()}
    assert len(set(prints.values())) == 2
    assert prints["train"] in card and prints["val"] in card   # the manifest's fingerprints
    assert '"lr": 0.0001' in card and "step 120" in card     # the training config
    assert '"value": 0.42' in card and '"CIDEr": 0.42' in card  # the run's metrics

    # load_pretrained takes the folder (ours) and the bare file (the original captioner layout)
    model = AVCap(AVCapConfig.tiny())
    assert load_pretrained(model, out).kind == "ours"
    report = load_pretrained(AVCap(AVCapConfig.tiny()), out / "model.safetensors")
    assert report.kind == "avcap_original" and len(report.loaded) == len(source)

    # an existing folder is never overwritten
    assert export_main([str(run_checkpoint), "--out", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err


def test_safetensors_of_foreign_layouts_and_damaged_files(reference_dir, tmp_path, reference_inputs,
                                                          reference_expected):
    cav = torch.load(reference_dir / "cav_mae.pth", weights_only=True)
    save_file({k: v.contiguous() for k, v in cav.items()}, tmp_path / "cav_mae.safetensors")
    model = AVCap(AVCapConfig.tiny(dropout=0.0, attention_dropout=0.0)).eval()
    report = load_pretrained(model, tmp_path / "cav_mae.safetensors")
    assert report.kind == "cav_mae"
    with torch.no_grad():
        feats = model.encode(reference_inputs["audio"], reference_inputs["visual"], "av")
    torch.testing.assert_close(feats, reference_expected["features_av"], rtol=1e-4, atol=1e-5)

    data = (tmp_path / "cav_mae.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: cannot read safetensors file"):
        load_pretrained(model, tmp_path / "cut.safetensors")
    folder = tmp_path / "half"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"avcap_format": "avcap-export", "format_version": 1,
                                                    "tokenizer": {}}))
    with pytest.raises(CheckpointError, match=r"half: export folder lacks its vocab"):
        load_checkpoint(folder)
    (folder / "vocab.txt").write_text("[PAD]\n")
    with pytest.raises(CheckpointError, match=r"half/model\.safetensors: safetensors file does not exist"):
        load_checkpoint(folder)


def test_an_export_is_built_under_the_projects_temp_name_and_a_killed_ones_folder_is_cleaned(
        tmp_path, monkeypatch, bert_layout_vocab):
    """save_export writes into `.{name}.tmp-{pid}-{random}` (shards.atomic's one scheme) with the usual folder
    mode, so the one cleaner, remove_stale_temps, removes what a killed export left and spares a live one."""
    import os
    import subprocess
    import sys

    import safetensors.torch

    from avcap.checkpoint import save_export
    from shards.atomic import remove_stale_temps, temp_owner

    seen = []
    real = safetensors.torch.save_file

    def spy(tensors, filename, metadata=None):
        seen.append(os.path.basename(os.path.dirname(filename)))
        return real(tensors, filename, metadata=metadata)
    monkeypatch.setattr(safetensors.torch, "save_file", spy)
    config = AVCapConfig.tiny()
    out = save_export(tmp_path / "exp", AVCap(config), config, bert_layout_vocab, {"mean": -4.0, "std": 4.5}, 20)
    assert len(seen) == 1 and seen[0].startswith(".exp.tmp-") and temp_owner(seen[0]) == os.getpid()
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == (0o777 & ~umask)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".exp2.tmp-{dead.pid}-abcd1234").mkdir()
    (tmp_path / seen[0]).mkdir()          # a live writer's (ours)
    assert remove_stale_temps(tmp_path) == [tmp_path / f".exp2.tmp-{dead.pid}-abcd1234"]
    assert (tmp_path / seen[0]).is_dir() and (out / "model.safetensors").is_file()


def test_an_export_names_a_manifest_it_cannot_use_and_writes_nothing(run_checkpoint, tmp_path, capsys):
    bad = tmp_path / "data"
    bad.mkdir()
    (bad / "manifest.json").write_text('{"format_version": 2, "splits": {"train": {"shards": []}}}')
    out = tmp_path / "export"
    assert export_main([str(run_checkpoint), "--out", str(out), "--manifest", str(bad)]) == 1
    err = capsys.readouterr().err
    assert str(bad / "manifest.json") in err and "train" in err
    assert not out.exists() or not any(out.iterdir())
