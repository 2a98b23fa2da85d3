"""Processes of a run: torchrun's environment -> a process group (nccl on GPU, gloo on CPU), and the few
collectives the loop and evaluation use."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

# -----------------------------------------------------------------------------
# distributed

@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str = "auto", timeout_s: int = 600) -> DistEnv:
    """Read torchrun's env vars; start a process group when there is more than one process.

    nccl needs one GPU per process; gloo runs the same collectives on CPU (tests, CPU machines).
    The timeout turns a rank that never reaches a collective into an error instead of a hang.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s),
                                **({"device_id": dev} if use_cuda else {}))
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def teardown_distributed(clean: bool = True) -> None:
    if dist.is_initialized():
        if clean:
            # Ranks leave together: a rank tearing gloo down while its peer still holds the connection can abort
            # the peer at exit ("terminate called without an active exception") after a successful run.
            try:
                dist.barrier()
            except Exception:  # noqa: BLE001 - the peer is already gone; nothing left to wait for
                pass
        dist.destroy_process_group()


def gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    if not env.enabled:
        return [obj]
    gathered: list[Any] = [None] * env.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def all_reduce_sum(env: DistEnv, values: list[float]) -> list[float]:
    """Sum `values` over ranks (one collective). Used once per optimizer step for logging and the data check."""
    t = torch.tensor(values, dtype=torch.float64, device=env.device if env.device.type == "cuda" else "cpu")
    if env.enabled:
        dist.all_reduce(t)
    return t.tolist()
