"""Which generation precision keeps the original's beam-search tokens: the measurement behind
GenerationConfig.precision (avcap.generate).

On tests/data/reference/tiny_avcap_seed1234 (the original implementation's expected tokens for 2 clips, beam 4,
2 candidates per beam, length penalty 0.6, 20 steps), `avcap.generate.precision_parity` runs beam search under
fp32 and under bf16 / fp16 autocast, the latter two both with generation's float32 head (projection, logits and
log-softmax in float32) and plain (everything under autocast), and counts the tokens that differ.

    .venv/bin/python benchmarks/bench_generation_precision.py [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
FIXTURE = REPO / "tests" / "data" / "reference" / "tiny_avcap_seed1234"


def main(argv: list[str] | None = None) -> int:
    import torch
    from avcap.generate import GenerationConfig, precision_parity
    from avcap.model import AVCap, AVCapConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load = lambda name: torch.load(FIXTURE / name, weights_only=True, map_location=device)  # noqa: E731
    ref = json.loads((FIXTURE / "config.json").read_text())
    model = AVCap(AVCapConfig.tiny())
    model.load_state_dict(load("avcap_state_dict.pt"))
    model.to(device).eval()
    inputs, expected = load("inputs.pt"), load("expected.pt")
    gen = GenerationConfig(beam_size=ref["beam_size"], per_node_beam=ref["per_node_beam_size"],
                           length_penalty=ref["length_penalty"], max_steps=ref["max_steps"])
    t0 = time.process_time()
    checks = precision_parity(model, inputs["audio"], inputs["visual"], expected["predictions"], gen)
    cpu_s = time.process_time() - t0
    print(f"device {device}, torch {torch.__version__}, {args.threads} thread(s), {cpu_s:.1f} CPU s for "
          f"{len(checks)} beam searches")
    print("| precision | policy | tokens differing from the reference |")
    print("|---|---|---|")
    for c in checks:
        print(f"| {c.precision} | {c.policy} | {c.tokens_differing} / {c.tokens_total} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
