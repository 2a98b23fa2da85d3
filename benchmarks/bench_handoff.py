"""A batch handed from a DataLoader worker to the training process: one shared storage per batch (the loader's
shards.buffer_pool) against a shared storage per tensor (what the loader did before).

    .venv/bin/python benchmarks/bench_handoff.py --batches 400 --rounds 3

One worker (the loader's forkserver context) yields batches of the loader's layout (shards.batching: fbank
float16 [B, 1024, 128], frames uint8 [B, 1, 224, 224, 3], frame_index, valid, tokens and need_predict [B, 42]),
touching one byte of fbank and frames only, so that what is measured is making and handing over the memory, not
decoding into it. Each storage handed over is a file descriptor passed through a connection to the worker and an
authentication. CPU ms per batch of both processes (the worker's through psutil as its last batch arrives),
median of the rounds; the two layouts take turns.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Only what the loader's forkserver has loaded at the top: the worker runs this script as it starts.
from shards.buffer_pool import BatchBufferPool, nbytes  # noqa: E402

B, T, M, HW, L = 16, 1024, 128, 224, 42
SHAPES = {"fbank": ((B, T, M), torch.float16), "frames": ((B, 1, HW, HW, 3), torch.uint8),
          "frame_index": ((B,), torch.int64), "valid": ((B,), torch.bool), "tokens": ((B, L), torch.int64),
          "need_predict": ((B, L), torch.int64)}


class Batches(torch.utils.data.IterableDataset):
    def __init__(self, layout: str, n: int):
        self.layout, self.n = layout, n

    def __iter__(self):
        pool = BatchBufferPool()
        for _ in range(self.n):
            if self.layout == "one storage":
                pool.open_batch(sum(nbytes(shape, dtype) for shape, dtype in SHAPES.values()))
                batch = {k: pool.empty(shape, dtype) for k, (shape, dtype) in SHAPES.items()}
            else:
                batch = {k: torch.empty(0, dtype=dtype).set_(torch.UntypedStorage._new_shared(
                    nbytes(shape, dtype)), 0, shape) for k, (shape, dtype) in SHAPES.items()}
            for t in batch.values():
                t.view(-1)[0] = 1
            batch["keys"] = [str(i) for i in range(B)]
            yield batch


def run(layout: str, n: int) -> tuple[float, float, float]:
    """(batches/s, main CPU ms per batch, worker CPU ms per batch) after the first batch."""
    import psutil
    from shards.loader import _worker_context
    dl = torch.utils.data.DataLoader(Batches(layout, n), batch_size=None, num_workers=1, prefetch_factor=4,
                                     multiprocessing_context=_worker_context())
    it = iter(dl)
    next(it)
    worker = psutil.Process(it._workers[0].pid)
    w0, c0, wc0 = time.perf_counter(), time.process_time(), sum(worker.cpu_times()[:2])
    k, wc = 0, 0.0
    for _ in it:
        k += 1
        if k == n - 2:   # the worker ends with its last batch: read its CPU just before
            wc = sum(worker.cpu_times()[:2]) - wc0
    wall, main = time.perf_counter() - w0, time.process_time() - c0
    return k / wall, main / k * 1e3, wc / (n - 2) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from benchmarks.bench_dask import machine
    print(f"{machine()} at the start; batch {B}: {sum(nbytes(s, d) for s, d in SHAPES.values()) / 1e6:.1f} MB",
          flush=True)
    got: dict[str, list[tuple[float, float, float]]] = {}
    for r in range(args.rounds):
        for layout in (("one storage", "a storage per tensor") if r % 2 == 0 else
                       ("a storage per tensor", "one storage")):
            got.setdefault(layout, []).append(run(layout, args.batches))
            print(f"  {r} {layout:<22} {got[layout][-1][0]:6.0f} batches/s, main {got[layout][-1][1]:.2f} ms, "
                  f"worker {got[layout][-1][2]:.2f} ms CPU per batch", flush=True)
    med = {k: [statistics.median(x[i] for x in v) for i in range(3)] for k, v in got.items()}
    print("\n| layout | batches/s | main process CPU ms / batch | worker CPU ms / batch |")
    print("|---|---|---|---|")
    for layout in ("a storage per tensor", "one storage"):
        rate, main_ms, worker_ms = med[layout]
        print(f"| {layout} | {rate:,.0f} | {main_ms:.2f} | {worker_ms:.2f} |")
    one, per = med["one storage"], med["a storage per tensor"]
    print(f"| one / per tensor | {one[0] / per[0]:.2f}× | {one[1] / per[1]:.2f}× | {one[2] / per[2]:.2f}× |")


if __name__ == "__main__":
    main()
