"""`python -m avcap.evaluate`: caption a split with a checkpoint, write the COCO results file, score it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from avcap.evaluate import score_and_write, selection_metric
from tests.fixtures_train import TINY_MODEL_OVERRIDES

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_checkpoint(learnable_data, tmp_path_factory) -> Path:
    """A freshly initialised tiny captioner saved with avcap.checkpoint, as training would save it."""
    from avcap.checkpoint import save_checkpoint
    from avcap.model import AVCap, AVCapConfig
    from avcap.tokenizer import load_tokenizer, special_ids, tokenizer_vocab
    import torch
    tok = load_tokenizer(learnable_data.vocab)
    ids = special_ids(tok)
    cfg = AVCapConfig.tiny(**TINY_MODEL_OVERRIDES, vocab_size=len(tok), cls_id=ids.cls, sep_id=ids.sep,
                           pad_id=ids.pad)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, AVCap(cfg), cfg, tokenizer_vocab(tok), norm_stats={"mean": -4.346, "std": 4.332},
                    frames_per_clip=4)
    return path


def _evaluate(*args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                 "-m"] if nproc > 1 else [sys.executable, "-m"])
    return subprocess.run([*launcher, "avcap.evaluate", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=180)


def test_selection_prefers_spider_and_falls_back_to_cider():
    assert selection_metric({"CIDEr": 0.5, "SPICE": None, "SPIDEr": None}) == ("CIDEr", 0.5)
    assert selection_metric({"CIDEr": 0.5, "SPICE": 0.1, "SPIDEr": 0.3}) == ("SPIDEr", 0.3)
    with pytest.raises(KeyError):
        selection_metric({"Bleu_1": 1.0})


def test_score_and_write_perfect_and_disjoint_predictions(tmp_path):
    refs = {"a": ["a dog barks loudly", "the dog is barking"], "b": ["rain falls on a roof", "heavy rain"]}
    scores = score_and_write({"a": "a dog barks loudly", "b": "rain falls on a roof"}, refs, tmp_path / "r.json",
                             java="no")
    # each prediction equals one reference: clipped n-gram precision 1 at every order, and the LCS is the whole caption
    assert scores["Bleu_1"] == pytest.approx(1.0) and scores["Bleu_4"] == pytest.approx(1.0)
    assert scores["ROUGE_L"] == pytest.approx(1.0)
    assert scores["METEOR"] is None and "METEOR" in scores["unavailable"] and scores["SPIDEr"] is None
    assert json.loads((tmp_path / "r.json").read_text()) == [
        {"image_id": "a", "caption": "a dog barks loudly"}, {"image_id": "b", "caption": "rain falls on a roof"}]
    assert json.loads((tmp_path / "r.metrics.json").read_text())["num_clips"] == 2
    zero = score_and_write({"a": "music plays", "b": "music plays"}, refs, tmp_path / "z.json", java="no")
    assert zero["Bleu_1"] == pytest.approx(0.0, abs=1e-6) and zero["CIDEr"] == 0.0


def test_evaluate_cli_writes_results_for_every_clip_once(learnable_data, tiny_checkpoint, tmp_path):
    out = tmp_path / "val.json"
    r = _evaluate("--checkpoint", str(tiny_checkpoint), "--data", str(learnable_data.root), "--split", "val",
                  "--out", str(out), "--java", "no", "--num-workers", "0", "--batch-size", "4",
                  "--max-gen-steps", "8")
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(out.read_text())
    refs = learnable_data.references("val")
    assert sorted(x["image_id"] for x in results) == sorted(refs)
    assert all(isinstance(x["caption"], str) for x in results)
    metrics = json.loads(out.with_name("val.metrics.json").read_text())
    assert metrics["num_clips"] == len(refs) and metrics["CIDEr"] is not None and metrics["METEOR"] is None
    printed = json.loads(r.stdout[r.stdout.index("{"):])
    assert printed["results"] == str(out) and printed["CIDEr"] == metrics["CIDEr"]


def test_evaluate_under_torchrun_reads_each_clip_once(learnable_data, tiny_checkpoint, tmp_path):
    # the val split has one shard: 2 ranks x 1 worker share it sample by sample; rank 0 gathers
    out = tmp_path / "val2.json"
    r = _evaluate("--checkpoint", str(tiny_checkpoint), "--data", str(learnable_data.root), "--split", "val",
                  "--out", str(out), "--java", "no", "--num-workers", "1", "--batch-size", "2",
                  "--max-gen-steps", "8", nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    keys = [x["image_id"] for x in json.loads(out.read_text())]
    assert sorted(keys) == sorted(learnable_data.references("val")) and len(keys) == len(set(keys))


def test_evaluate_refuses_a_dataset_with_other_frames_per_clip(learnable_data, tiny_checkpoint, tmp_path):
    manifest = json.loads((learnable_data.root / "manifest.json").read_text())
    manifest["splits"]["val"]["fingerprint_parts"]["extract"]["frames"] = 10
    other = tmp_path / "manifest.json"
    other.write_text(json.dumps(manifest))
    from avcap.evaluate import EvalConfig, evaluate_checkpoint
    with pytest.raises(ValueError, match=r"trained on 4 frames per clip but the dataset .* has 10"):
        evaluate_checkpoint(EvalConfig(checkpoint=str(tiny_checkpoint), data=str(other), split="val", java="no",
                                       num_workers=0, out=str(tmp_path / "never.json"),
                                       shard_base=str(learnable_data.root)))
    assert not (tmp_path / "never.json").exists()


def test_exported_folder_evaluates_like_the_checkpoint_and_records_generation(learnable_data, tiny_checkpoint,
                                                                              tmp_path):
    from avcap.evaluate import EvalConfig, evaluate_checkpoint
    from avcap.export import export
    folder = export(tiny_checkpoint, tmp_path / "exported")
    results = {}
    for name, ckpt in (("pt", tiny_checkpoint), ("folder", folder)):
        out = tmp_path / f"{name}.json"
        evaluate_checkpoint(EvalConfig(checkpoint=str(ckpt), data=str(learnable_data.root), split="val",
                                       java="no", num_workers=0, batch_size=4, max_gen_steps=8, out=str(out)))
        results[name] = json.loads(out.read_text())
        metrics = json.loads(out.with_name(f"{name}.metrics.json").read_text())
        assert metrics["generation"] == {"beam_size": 4, "per_node_beam": 2, "length_penalty": 0.6,
                                         "max_steps": 8, "precision": "fp32"}
    assert results["folder"] == results["pt"] and len(results["pt"]) == len(learnable_data.references("val"))
