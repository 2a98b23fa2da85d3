"""Full-size AVCap on whatever device is there: train-step throughput, memory and MFU, beam-search captions/s,
and (on CUDA) the generation precision-parity check. One command, one JSON and one markdown table:

    python benchmarks/bench_gpu.py --out bench-gpu            # a GPU machine: about 3 minutes on an H100
    python benchmarks/bench_gpu.py --out DIR --device cpu --model tiny --steps 2 --warmup 1   # the smoke test

What runs, for one and four frames:
- train steps through `avcap.training.train_step`, the function train.py's loop calls (forward under autocast,
  backward, GradScaler, AdamW built by `build_optimizer`: fused on CUDA), with the text decoder frozen as in the
  README recipe (`--freeze-text`) and fully trainable; synthetic inputs already on the device, so this is the
  model's step alone (the loader is benchmarks/bench_loader.py's business);
- model FLOPs of one step counted once per setup with torch.utils.flop_counter.FlopCounterMode (forward and
  backward as actually run: a frozen decoder computes no weight gradients), MFU = FLOPs / step time / the
  device's peak dense bf16 FLOPs (table below; `--peak-tflops` for other GPUs; no MFU on CPU);
- batched beam search (`avcap.generate.beam_search`, KV cache) in captions/s, under the same autocast evaluation
  uses. Random weights rarely emit [SEP], so captions run to --max-gen-steps: the worst case;
- parity: the reference fixture's model (tests/data/reference/tiny_avcap_seed1234) beam-searched by
  avcap.generate.precision_parity under fp32, bf16 and fp16 generation: how many of the fixture's tokens each
  precision changes on this device (the measurement behind generation's fp32 default).

Needs only torch and what avcap.model imports (timm, which pulls torchvision; numpy): on a bare GPU machine
`pip install torch==2.11.0 torchvision==0.26.0 timm==1.0.31` (the project's pins), then run from the repository
root. Compile (`--compile`) is off by default: it costs about a minute per setup, and the loss' data-dependent
choice of predicted rows (and its input check) splits the graph in two. Setups that run out of memory are
reported, not fatal; `--budget-s` skips what would start after that many seconds so a short GPU lease still gets
its JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from avcap.generate import GenerationConfig, beam_search, precision_parity  # noqa: E402
from avcap.model import AVCap, AVCapConfig  # noqa: E402
from avcap.optim import build_optimizer, resolve_precision
from avcap.train_config import TrainConfig
from avcap.training import train_step  # noqa: E402

REFERENCE = REPO / "tests" / "data" / "reference" / "tiny_avcap_seed1234"

# Peak dense (no sparsity) bf16 tensor-core TFLOP/s, fp32 accumulate, from the vendors' datasheets; the first
# substring of the device name that matches wins (H100 PCIe before the SXM default).
PEAK_BF16_TFLOPS = (
    ("H200", 989.4),
    ("H100 PCIe", 756.5),
    ("H100", 989.4),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("RTX 4090", 165.2),
)


def peak_bf16_tflops(device_name: str) -> float | None:
    return next((tf for key, tf in PEAK_BF16_TFLOPS if key in device_name), None)


def peak_tflops(device: torch.device, override: float) -> float | None:
    if override:
        return override
    return peak_bf16_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_flash_attention_flops() -> dict[Any, Any]:
    """FlopCounterMode knows the CUDA SDPA kernels but not the CPU flash kernel: count it with torch's own
    SDPA formulas so CPU runs report the same FLOPs as GPU runs."""
    from torch.utils import flop_counter as fc
    aten = torch.ops.aten

    def fwd(query, key, value, *args, out_shape=None, **kwargs):
        return fc.sdpa_flop_count(query, key, value)

    def bwd(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        return fc.sdpa_backward_flop_count(grad_out, query, key, value)

    return {aten._scaled_dot_product_flash_attention_for_cpu: fwd,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: bwd}


# -----------------------------------------------------------------------------
# inputs and models

def model_config(size: str, num_frames: int) -> AVCapConfig:
    if size == "tiny":
        return AVCapConfig.tiny(num_frames=num_frames)
    # bert-base-uncased's ids and vocabulary, the README's tokenizer
    return AVCapConfig.full(cls_id=101, sep_id=102, pad_id=0, num_frames=num_frames)


def synthetic_batch(cfg: AVCapConfig, batch: int, caption_tokens: int, device: torch.device,
                    seed: int) -> tuple[torch.Tensor, ...]:
    """Normalized-fbank-like audio, frames, and full-length captions ([CLS] words [SEP], no padding)."""
    g = torch.Generator().manual_seed(seed)
    audio = torch.randn(batch, cfg.audio_length, cfg.num_mel_bins, generator=g)
    shape = (batch, 3, cfg.img_size, cfg.img_size) if cfg.num_frames == 1 else \
        (batch, 3, cfg.num_frames, cfg.img_size, cfg.img_size)
    visual = torch.randn(*shape, generator=g)
    low = max(cfg.cls_id, cfg.sep_id, cfg.pad_id) + 1
    tokens = torch.randint(low, cfg.vocab_size, (batch, caption_tokens), generator=g)
    tokens[:, 0], tokens[:, -1] = cfg.cls_id, cfg.sep_id
    need_predict = torch.ones_like(tokens)
    need_predict[:, 0] = 0
    return tuple(t.to(device) for t in (audio, visual, tokens, need_predict))


def build_model(cfg: AVCapConfig, device: torch.device, seed: int) -> AVCap:
    torch.manual_seed(seed)
    with device:  # initialized where it runs: a full-size init on one CPU core takes seconds
        return AVCap(cfg)


# -----------------------------------------------------------------------------
# train steps

def bench_train(args: argparse.Namespace, device: torch.device, num_frames: int, decoder: str, batch_size: int,
                peak: float | None) -> dict[str, Any]:
    cfg = model_config(args.model, num_frames)
    row: dict[str, Any] = {"kind": "train", "frames": num_frames, "decoder": decoder, "batch": batch_size,
                           "precision": args.precision, "compile": args.compile,
                           "prefix_tokens": cfg.num_prefix_tokens(), "caption_tokens": args.caption_tokens}
    model = build_model(cfg, device, args.seed)
    model.freeze_decoder(decoder == "frozen")
    model.train()
    row["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    precision = resolve_precision(args.precision, device)
    row["precision"] = precision.name
    optimizer = build_optimizer(model, TrainConfig())
    row["fused_adamw"] = bool(optimizer.defaults.get("fused"))
    scaler = torch.amp.GradScaler(device.type, enabled=precision.name == "fp16")
    batch = synthetic_batch(cfg, batch_size, args.caption_tokens, device, args.seed)

    def step(m: torch.nn.Module) -> torch.Tensor:
        return train_step(m, batch, optimizer, scaler, precision).loss

    # FLOPs of one step, counted on the eager model (the compiled one runs the same math).
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False, custom_mapping=cpu_flash_attention_flops())
    with counter:
        step(model)
    row["tflop_per_step"] = counter.get_total_flops() / 1e12

    runner = torch.compile(model) if args.compile else model
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step(runner)
    sync(device)
    row["warmup_s"] = time.perf_counter() - t0

    profiler = make_profiler(device) if args.profile else nullcontext()
    times, losses = [], []
    cpu0 = time.process_time()
    with profiler:
        for _ in range(args.steps):
            t = time.perf_counter()
            losses.append(step(runner))
            sync(device)
            times.append(time.perf_counter() - t)
    row["cpu_s_per_step"] = (time.process_time() - cpu0) / args.steps
    losses_f = [float(x) for x in losses]
    if not all(map(lambda v: v == v and abs(v) != float("inf"), losses_f)):
        raise RuntimeError(f"non-finite training loss in {row}: {losses_f}")
    step_s = statistics.median(times)
    row.update(step_s=step_s, mean_step_s=sum(times) / len(times), steps_per_s=1.0 / step_s,
               samples_per_s=batch_size / step_s, loss_first=losses_f[0], loss_last=losses_f[-1],
               achieved_tflops=row["tflop_per_step"] / step_s)
    row["mfu"] = row["achieved_tflops"] / peak if peak else None
    if precision.name == "fp16":
        row["loss_scale"] = float(scaler.get_scale())
    row.update(memory_stats(device))
    if args.profile:
        row["profile"] = top_operators(profiler, device, args.profile_rows)
    del runner, model, optimizer, batch
    return row


def make_profiler(device: torch.device) -> torch.profiler.profile:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=activities)


def top_operators(prof: torch.profiler.profile, device: torch.device, rows: int) -> list[dict[str, Any]]:
    """The operators with the most self time (device time on CUDA, CPU time otherwise), per step totals."""
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) or 1
    return [{"op": e.key, "calls": e.count, "self_ms": getattr(e, key) / 1e3, "share": getattr(e, key) / total}
            for e in events[:rows]]


def memory_stats(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
    import resource
    # ru_maxrss: the process's peak so far (KiB on Linux), so later setups include earlier ones
    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


# -----------------------------------------------------------------------------
# generation

def bench_beam(args: argparse.Namespace, device: torch.device, num_frames: int) -> dict[str, Any]:
    cfg = model_config(args.model, num_frames)
    row: dict[str, Any] = {"kind": "beam", "frames": num_frames, "batch": args.beam_batch,
                           "beam_size": args.beam_size, "max_gen_steps": args.max_gen_steps}
    model = build_model(cfg, device, args.seed).eval()
    precision = resolve_precision(args.precision, device)
    row["precision"] = precision.name
    audio, visual, _, _ = synthetic_batch(cfg, args.beam_batch, 2, device, args.seed + 1)

    def run() -> torch.Tensor:
        with precision.autocast(device):  # as evaluation generates (avcap.evaluate.caption_split)
            tokens, _ = beam_search(model, audio, visual, beam_size=args.beam_size, max_steps=args.max_gen_steps)
        return tokens

    run()  # warm-up: allocator, kernels
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.beam_repeats):
        tokens = run()
    sync(device)
    seconds = (time.perf_counter() - t0) / args.beam_repeats
    lengths = [(row_ids == cfg.sep_id).int().argmax().item() + 1 if (row_ids == cfg.sep_id).any() else
               args.max_gen_steps for row_ids in tokens[:, 1:]]
    row.update(seconds_per_batch=seconds, captions_per_s=args.beam_batch / seconds,
               mean_caption_tokens=sum(lengths) / len(lengths), **memory_stats(device))
    return row


def generation_parity(device: torch.device, dtypes: tuple[str, ...]) -> dict[str, Any]:
    """The generation precision check on this device (avcap.generate.precision_parity): the reference fixture's
    model beam-searched under each generation precision, with generate()'s policy (autocast, float32 head) and
    with plain autocast, against the fixture's expected tokens. generate() is what evaluate, caption and
    training's evaluation all call, so equal settings give them equal tokens; this measures which precision
    keeps the original's tokens."""
    ref_cfg = json.loads((REFERENCE / "config.json").read_text())
    model = AVCap(AVCapConfig.tiny())
    model.load_state_dict(torch.load(REFERENCE / "avcap_state_dict.pt", weights_only=True), strict=True)
    model.to(device).eval()
    inputs = torch.load(REFERENCE / "inputs.pt", weights_only=True)
    expected = torch.load(REFERENCE / "expected.pt", weights_only=True)["predictions"]
    gen = GenerationConfig(beam_size=ref_cfg["beam_size"], per_node_beam=ref_cfg["per_node_beam_size"],
                           length_penalty=ref_cfg["length_penalty"], max_steps=ref_cfg["max_steps"])
    checks = precision_parity(model, inputs["audio"], inputs["visual"], expected=expected, gen=gen,
                              precisions=("fp32", *dtypes))
    rows = [dataclasses.asdict(c) for c in checks]
    return {"kind": "parity", "clips": int(expected.shape[0]), "checks": rows,
            "fp32_equals_expected": any(r["precision"] == "fp32" and r["tokens_differing"] == 0 for r in rows)}


# -----------------------------------------------------------------------------
# report

def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
                            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "cpu": cpu_model(), "load_average": list(os.getloadavg())}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30, cuda=torch.version.cuda,
                    capability=f"{props.major}.{props.minor}")
    return info


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def fmt(v: Any, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    where = m.get("gpu") or f"CPU {m['cpu']}, {m['torch_threads']} torch thread(s)"
    lines = [f"Run {report['date']} on {where}; torch {m['torch']}; `{report['command']}`", "",
             "| frames | decoder | precision | compile | batch | steps/s | samples/s | step ms | host CPU s/step | "
             "TFLOP/step | TFLOP/s | MFU | peak memory GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["train"]:
        if "error" in r:
            lines.append(f"| {r['frames']} | {r['decoder']} | {r['precision']} | {r['compile']} | {r['batch']} | "
                         f"{r['error']} ||||||||")
            continue
        mem = r.get("peak_allocated_gib", r.get("peak_rss_gib"))
        lines.append(f"| {r['frames']} | {r['decoder']} | {r['precision']} | {r['compile']} | {r['batch']} | "
                     f"{r['steps_per_s']:.2f} | {r['samples_per_s']:.1f} | {r['step_s'] * 1e3:.1f} | "
                     f"{r['cpu_s_per_step']:.3g} | "
                     f"{r['tflop_per_step']:.3g} | {r['achieved_tflops']:.3g} | "
                     f"{fmt(r['mfu'] and 100 * r['mfu'], '.1f')}{'%' if r['mfu'] else ''} | {mem:.2f} |")
    if report["beam"]:
        lines += ["", "| frames | beam batch | beam | max steps | precision | captions/s | s per batch | peak memory GiB |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in report["beam"]:
            if "error" in r:
                lines.append(f"| {r['frames']} | {r['batch']} | {r['beam_size']} | {r['max_gen_steps']} | "
                             f"{r['error']} ||||")
                continue
            mem = r.get("peak_allocated_gib", r.get("peak_rss_gib"))
            lines.append(f"| {r['frames']} | {r['batch']} | {r['beam_size']} | {r['max_gen_steps']} | "
                         f"{r['precision']} | {r['captions_per_s']:.1f} | {r['seconds_per_batch']:.3f} | {mem:.2f} |")
    p = report.get("parity")
    if p:
        lines += ["", f"Generation precision on the reference fixture ({p['clips']} clips): fp32 gives the fixture's "
                  f"tokens: {p['fp32_equals_expected']}.", "",
                  "| precision | policy | tokens differing from the fixture |", "|---|---|---|"]
        lines += [f"| {r['precision']} | {r['policy']} | {r['tokens_differing']} of {r['tokens_total']} |"
                  for r in p["checks"]]
    if report["skipped"]:
        lines += ["", "Skipped (time budget): " + ", ".join(report["skipped"])]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for bench_gpu.json and bench_gpu.md")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--model", default="full", choices=("full", "tiny"))
    p.add_argument("--frames", default="1,4", help="comma-separated frame counts")
    p.add_argument("--decoder", default="frozen,trainable", help="frozen (README recipe) and/or trainable")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                   help="autocast of the train steps and the beam search (auto: bf16 on CUDA, fp32 on CPU; "
                        "fp16 adds the GradScaler)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (off: eager)")
    p.add_argument("--batch-size", default="", help="comma-separated samples per train step (default: 8 (the "
                                                     "README recipe, per GPU) and 32 on CUDA; 2 on CPU)")
    p.add_argument("--caption-tokens", type=int, default=42, help="caption length incl. [CLS]/[SEP] (42: the cap)")
    p.add_argument("--steps", type=int, default=20, help="timed train steps per setup")
    p.add_argument("--warmup", type=int, default=3, help="untimed train steps per setup (after the FLOP count)")
    p.add_argument("--beam-batch", type=int, default=0, help="clips per beam-search call (0: 64 on CUDA, 2 on CPU)")
    p.add_argument("--beam-size", type=int, default=4)
    p.add_argument("--max-gen-steps", type=int, default=42)
    p.add_argument("--beam-repeats", type=int, default=3, help="timed beam-search calls per frame count")
    p.add_argument("--no-beam", dest="beam", action="store_false", help="skip the beam-search benchmark")
    p.add_argument("--parity", default="auto", choices=("auto", "yes", "no"),
                   help="generation parity check (auto: on CUDA only)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="peak dense bf16 TFLOP/s (overrides the table)")
    p.add_argument("--profile", action="store_true", help="torch.profiler over the timed steps: top operators")
    p.add_argument("--profile-rows", type=int, default=15)
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    p.add_argument("--budget-s", type=float, default=330.0, help="start no new setup after this many seconds")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t_start = time.perf_counter()
    dev_name = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    device = torch.device(dev_name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {args.device}: torch sees no CUDA device")
        torch.cuda.set_device(device)
        # TF32 stays at torch's defaults, which train.py and avcap.caption also run with (the parity check's fp32)
        device = torch.device("cuda", torch.cuda.current_device())
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in (args.batch_size or ("8,32" if device.type == "cuda" else "2")).split(",")]
    args.beam_batch = args.beam_batch or (64 if device.type == "cuda" else 2)
    frames = [int(f) for f in args.frames.split(",")]
    decoders = args.decoder.split(",")
    for d in decoders:
        if d not in ("frozen", "trainable"):
            raise SystemExit(f"--decoder: {d!r} is neither 'frozen' nor 'trainable'")
    peak = peak_tflops(device, args.peak_tflops)

    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/bench_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(device), "model": args.model, "peak_bf16_tflops": peak,
        "train": [], "beam": [], "parity": None, "skipped": []}

    def within_budget(label: str) -> bool:
        if time.perf_counter() - t_start > args.budget_s:
            report["skipped"].append(label)
            return False
        return True

    def guarded(fn, label: str, base: dict[str, Any], *a) -> dict[str, Any]:
        try:
            return fn(*a)
        except torch.OutOfMemoryError as e:
            print(f"[bench_gpu] {label}: out of memory: {str(e).splitlines()[0]}", file=sys.stderr, flush=True)
            return {**base, "error": "out of memory"}
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()

    for nf in frames:
        for dec in decoders:
            for bs in batches:
                label = f"train frames={nf} decoder={dec} batch={bs}"
                if not within_budget(label):
                    continue
                base = {"kind": "train", "frames": nf, "decoder": dec, "batch": bs, "precision": args.precision,
                        "compile": args.compile}
                report["train"].append(guarded(bench_train, label, base, args, device, nf, dec, bs, peak))
                print(f"[bench_gpu] {label}: {report['train'][-1].get('steps_per_s', 'error')} steps/s",
                      file=sys.stderr, flush=True)
    if args.beam:
        for nf in frames:
            label = f"beam frames={nf}"
            if within_budget(label):
                base = {"kind": "beam", "frames": nf, "batch": args.beam_batch, "beam_size": args.beam_size,
                        "max_gen_steps": args.max_gen_steps}
                report["beam"].append(guarded(bench_beam, label, base, args, device, nf))
    if args.parity == "yes" or (args.parity == "auto" and device.type == "cuda"):
        dtypes = ("bf16", "fp16") if device.type == "cuda" else ("bf16",)  # CPU autocast: bf16 only
        if within_budget("parity"):
            report["parity"] = generation_parity(device, dtypes)
    report["total_s"] = time.perf_counter() - t_start

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_gpu.json").write_text(json.dumps(report, indent=1))
    (out / "bench_gpu.md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
