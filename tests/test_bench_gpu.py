"""benchmarks/bench_gpu.py runs end to end on CPU with the tiny model (so the GPU script never rots), and its
FLOP counting and MFU table are right."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "bench_gpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_on_cpu_writes_json_and_table(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--device", "cpu", "--model", "tiny", "--frames", "1,4",
           "--steps", "2", "--warmup", "0", "--threads", "1", "--beam-repeats", "1", "--max-gen-steps", "4",
           "--parity", "yes"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((out / "bench_gpu.json").read_text())
    table = (out / "bench_gpu.md").read_text()

    train = {(r["frames"], r["decoder"]): r for r in report["train"]}
    assert sorted(train) == [(1, "frozen"), (1, "trainable"), (4, "frozen"), (4, "trainable")]
    for r in train.values():
        assert r["precision"] == "fp32" and r["batch"] == 2 and r["fused_adamw"]
        assert r["steps_per_s"] > 0 and r["samples_per_s"] == pytest.approx(2 * r["steps_per_s"])
        assert r["mfu"] is None  # no MFU on CPU
        assert r["peak_rss_gib"] > 0
        assert torch.isfinite(torch.tensor([r["loss_first"], r["loss_last"]])).all()
    for nf in (1, 4):
        frozen, trainable = train[(nf, "frozen")], train[(nf, "trainable")]
        # a frozen decoder computes no weight gradients: fewer FLOPs and fewer parameters to train
        assert 0 < frozen["tflop_per_step"] < trainable["tflop_per_step"]
        assert frozen["trainable_parameters"] < trainable["trainable_parameters"]
    assert train[(4, "frozen")]["prefix_tokens"] == 512 + 392 and train[(1, "frozen")]["prefix_tokens"] == 708
    assert train[(4, "frozen")]["tflop_per_step"] > train[(1, "frozen")]["tflop_per_step"]

    assert [r["frames"] for r in report["beam"]] == [1, 4]
    assert all(r["captions_per_s"] > 0 for r in report["beam"])
    parity = report["parity"]
    # the fixture's own tokens come back in fp32, generation's default precision
    assert parity["fp32_equals_expected"] is True
    assert {(r["precision"], r["policy"]) for r in parity["checks"]} >= {("fp32", "no autocast"), ("bf16", "fp32 head")}
    assert report["machine"]["device"] == "cpu" and report["skipped"] == []
    assert table.count("\n| 1 | frozen |") == 1 and "captions/s" in table and "Generation precision" in table


def test_flop_count_includes_cpu_flash_attention(bench):
    """Counted FLOPs of the CPU flash kernel equal torch's formula for the CUDA kernels (4·B·h·N²·d forward)."""
    from torch.utils.flop_counter import FlopCounterMode
    B, h, N, d = 2, 4, 64, 16
    q, k, v = (torch.randn(B, h, N, d, requires_grad=True) for _ in range(3))
    counter = FlopCounterMode(display=False, custom_mapping=bench.cpu_flash_attention_flops())
    with counter:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert counter.get_total_flops() == 4 * B * h * N * N * d
    with counter:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        out.sum().backward()
    assert counter.get_total_flops() == (4 + 10) * B * h * N * N * d  # backward: 5 matmuls (scores recomputed)


@pytest.mark.parametrize("name,tflops", [("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.5),
                                         ("NVIDIA H200", 989.4), ("NVIDIA A100-SXM4-80GB", 312.0),
                                         ("NVIDIA L40S", 362.1), ("NVIDIA GeForce RTX 4090", 165.2),
                                         ("NVIDIA T4", None)])
def test_peak_table(bench, name, tflops):
    assert bench.peak_bf16_tflops(name) == tflops
