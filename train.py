"""Train the AVCap captioner from the pipeline's shards.

    python train.py --data DIR --out runs/x ...                       # one process (CPU or one GPU)
    torchrun --nproc_per_node 8 train.py --data DIR --out runs/x ...  # DDP: nccl on GPUs, gloo on CPU
    torchrun --nproc_per_node 8 train.py ... --resume latest          # continue exactly where it stopped

Every flag is a field of avcap.train_config.TrainConfig (`--help` lists them with their defaults).
"""
import sys

from avcap.train_config import config_from_args, run_command
from avcap.training import train


def main(argv: list[str] | None = None) -> int:
    def command() -> int:
        result = train(config_from_args(argv))
        if result.is_main:
            print(f"[train] done: step {result.step}, epoch {result.epoch}, last loss {result.last_loss}, "
                  f"best {result.best}", file=sys.stderr)
        return 0
    return run_command("train.py", command)


if __name__ == "__main__":
    sys.exit(main())
