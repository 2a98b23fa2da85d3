"""Beam search with the KV cache against the original's full recompute, full-size AVCap on CPU.

Each variant runs in its own subprocess so that its peak resident memory (ru_maxrss) is its own. Both build the
same seeded random model (full size: 768 wide, one frame -> 708-token prefix, vocab 30522), encode the same
random clip(s), and beam-search with beam 4, 2 candidates per beam, length penalty 0.6. The decoder weights are
spread as in tests/data/reference (word embeddings x2, decoder Linear weights x10, output bias ~N(0,1)) so
that argmax decisions are far from float32 ties and the two variants can be required to emit the same tokens.

    .venv/bin/python benchmarks/bench_generate.py --threads 2 --max-steps 42
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def run_variant(args: argparse.Namespace) -> dict:
    import torch
    from avcap.generate import beam_search_features
    from avcap.model import AVCap, AVCapConfig
    from tests.fixtures_model import spread_decoder_weights

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = AVCapConfig.full(cls_id=101, sep_id=102, pad_id=0, num_frames=args.num_frames)
    model = AVCap(cfg).eval()
    spread_decoder_weights(model)
    audio = torch.randn(args.batch, cfg.audio_length, cfg.num_mel_bins)
    visual = torch.randn(args.batch, 3, cfg.img_size, cfg.img_size) if args.num_frames == 1 else \
        torch.randn(args.batch, 3, args.num_frames, cfg.img_size, cfg.img_size)
    rss_model_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    t0, c0 = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        features = model.encode(audio, visual)
    t_enc, c_enc = time.perf_counter() - t0, time.process_time() - c0
    if args.variant == "cached":  # one untimed warm-up so one-off allocator/kernel setup isn't counted
        beam_search_features(model, features, max_steps=3, use_cache=True)
    t0, c0 = time.perf_counter(), time.process_time()
    tokens, logprobs = beam_search_features(model, features, beam_size=4, per_node_beam=2, length_penalty=0.6,
                                            max_steps=args.max_steps, use_cache=args.variant == "cached")
    t_search, c_search = time.perf_counter() - t0, time.process_time() - c0
    return {
        "variant": args.variant, "encode_s": t_enc, "search_s": t_search,
        "encode_cpu_s": c_enc, "search_cpu_s": c_search, "prefix_tokens": features.shape[1],
        "tokens": tokens.tolist(), "logprobs": logprobs.flatten().tolist(),
        "rss_after_model_mib": rss_model_mib,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=42)
    p.add_argument("--batch", type=int, default=1, help="clips per call")
    p.add_argument("--num-frames", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default="cached,recompute")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant in this process
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.variant:
        Path(args.result).write_text(json.dumps(run_variant(args)))
        return

    load_start = os.getloadavg()
    results = {}
    for variant in args.variants.split(","):
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            out = f.name
        cmd = [sys.executable, __file__, "--variant", variant, "--result", out, "--threads", str(args.threads),
               "--max-steps", str(args.max_steps), "--batch", str(args.batch), "--num-frames", str(args.num_frames),
               "--seed", str(args.seed)]
        subprocess.run(cmd, check=True)
        results[variant] = json.loads(Path(out).read_text())
        os.unlink(out)

    load = os.getloadavg()
    print(f"load average at start {load_start[0]:.2f}/{load_start[1]:.2f}/{load_start[2]:.2f}")
    print(f"torch threads {args.threads}, os.cpu_count {os.cpu_count()}, load average at end {load[0]:.2f}/"
          f"{load[1]:.2f}/{load[2]:.2f}; batch {args.batch}, num_frames {args.num_frames}, "
          f"prefix {next(iter(results.values()))['prefix_tokens']} tokens, max_steps {args.max_steps}")
    # On a shared box wall time depends on the neighbours; process CPU time is the work done (it also counts
    # OpenMP spin-waiting when threads > 1).
    print("| variant | encoder wall s | beam search wall s | beam search CPU s | captions/s (encoder+search, wall) "
          "| peak RSS MiB | RSS after model MiB |")
    print("|---|---|---|---|---|---|---|")
    for v, r in results.items():
        cps = args.batch / (r["encode_s"] + r["search_s"])
        print(f"| {v} | {r['encode_s']:.2f} | {r['search_s']:.2f} | {r['search_cpu_s']:.2f} | {cps:.3f} | "
              f"{r['peak_rss_mib']:.0f} | {r['rss_after_model_mib']:.0f} |")
    if {"cached", "recompute"} <= set(results):
        c, r = results["cached"], results["recompute"]
        same = c["tokens"] == r["tokens"]
        print(f"same token ids: {same}; logprobs cached {c['logprobs']} recompute {r['logprobs']}")
        print(f"speedup: beam search {r['search_s'] / c['search_s']:.1f}x wall, "
              f"{r['search_cpu_s'] / c['search_cpu_s']:.1f}x CPU; encoder+search "
              f"{(r['encode_s'] + r['search_s']) / (c['encode_s'] + c['search_s']):.1f}x wall")
        if not same:
            sys.exit("FAIL: cached and recompute token ids differ")
    for v, res in results.items():
        print(f"{v} tokens: {res['tokens']}")


if __name__ == "__main__":
    main()
