"""The configuration of a training run: `TrainConfig`, one field per `train.py` flag (help text on the field), and
the flag parser generated from it (`build_arg_parser`, `config_from_args`; avcap.evaluate builds its own parser
the same way)."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from avcap.checkpoint import read_checkpoint_file
from avcap.generate import GenerationFlags, generation_from_flags
from shards.augment import AugmentConfig
from shards.index import ShardError
from shards.remote import RemoteReadError, remote_config_from_json

# What the user's flags, dataset or checkpoint can be wrong with: each such error's message names the input and
# what is wrong, so the command-line entries (train.py, avcap.evaluate) print it alone, without a traceback,
# and exit with 1 (2 stays argparse's, for flags it cannot parse). Any other exception is a bug and keeps its traceback; so does any error when AVCAP_TRACEBACK
# is set. ManifestError and CheckpointError are ValueErrors.
INPUT_ERRORS = (ValueError, FileNotFoundError, ShardError, RemoteReadError)


def run_command(prog: str, command: Callable[[], int]) -> int:
    """`command()`'s exit status; an input error (INPUT_ERRORS) is printed as "PROG: error: MESSAGE", status 1."""
    try:
        return command()
    except INPUT_ERRORS as e:
        if os.environ.get("AVCAP_TRACEBACK"):
            raise
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return 1

# -----------------------------------------------------------------------------
# config

def config_field(default: Any, help: str) -> Any:
    """A dataclass field carrying its --help text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


REMOTE_HELP = ("JSON object of shards.remote.RemoteConfig fields for shards read from a URL (requests in flight, "
               "connections, timeouts, retries, HTTP client), e.g. '{\"windows_ahead\": 12}'")   # --remote


@dataclass
class TrainConfig(GenerationFlags):
    # data
    data: str = config_field("", "dataset directory or URL of its manifest.json (its shard paths resolve under it)")
    shard_base: str = config_field("", "read the manifest's shard paths under this local path or URL instead (any fsspec "
                             "scheme, or 'pipe:CMD' with {path} where the path goes)")
    out: str = config_field("runs/avcap", "run directory: config.json, metrics.jsonl, checkpoints/, tb/, eval results")
    train_split: str = config_field("train", "split to train on")
    eval_split: str = config_field("val", "split evaluated after each epoch (model selection); test is for the report")
    num_workers: int = config_field(2, "loader worker processes per rank (decoding only)")
    shuffle_buffer: int = config_field(1000, "sample shuffle buffer per worker")
    skip_bad_shards: bool = config_field(False, "skip a damaged shard, or a sample that does not decode, with a warning "
                                      "instead of failing")
    remote: str = config_field("", REMOTE_HELP)
    noise: bool = config_field(AugmentConfig.noise, "noise + time-roll audio augmentation (the original README turns it on)")
    freqm: int = config_field(AugmentConfig.freqm, "SpecAugment: widest frequency mask in mel bins (0: off; the original: 48)")
    timem: int = config_field(AugmentConfig.timem, "SpecAugment: widest time mask in frames (0: off; the original: 192)")
    norm_mean: float = config_field(AugmentConfig.norm_mean, "fbank normalization mean (AudioCaps default; the manifest also has the train split's)")
    norm_std: float = config_field(AugmentConfig.norm_std, "fbank normalization std")
    # model
    model: str = config_field("full", "model size preset: full | tiny")
    num_frames: int = config_field(1, "video frames per sample fed to the encoder (1, or an even number for Conv3d)")
    mode: str = config_field("av", "encoder mode: av (audio-visual) | audio | visual")
    model_overrides: str = config_field("", "JSON object of avcap.model.AVCapConfig fields overriding the preset, e.g. '{\"depth_a\": 2}'")
    vocab: str = config_field("", "tokenizer: a local vocab.txt / tokenizer dir, or a hub name (default: the one that comes "
                        "with --pretrained-text when it is a Hugging Face folder or hub name, else "
                        "bert-base-uncased)")
    max_caption_tokens: int = config_field(40, "wordpieces kept per caption (plus [CLS] and [SEP])")
    pretrained_encoder: str = config_field("", "CAV-MAE checkpoint (.pth) to initialize the encoder from")
    pretrained_text: str = config_field("", "GiT weights to initialize the text decoder from: a Hugging Face hub name "
                                  "(e.g. microsoft/git-base, from the local hub cache), a save_pretrained folder, "
                                  "a .safetensors file, or an original GiT .pt")
    init_from: str = config_field("", "a trained captioner checkpoint to start from (weights only, a fresh run)")
    freeze_encoder: bool = config_field(False, "freeze the audio-visual encoder")
    freeze_text: bool = config_field(False, "freeze the text decoder (the projection stays trainable)")
    # optimization (docs/original.md §6 defaults)
    epochs: int = config_field(10, "training epochs")
    batch_size: int = config_field(8, "samples per rank per micro-batch")
    grad_accum: int = config_field(1, "micro-batches accumulated per optimizer step")
    lr: float = config_field(1e-4, "peak learning rate (AdamW)")
    weight_decay: float = config_field(5e-7, "AdamW weight decay")
    beta1: float = config_field(0.95, "AdamW beta1")
    beta2: float = config_field(0.999, "AdamW beta2")
    warmup_epochs: float = config_field(1.0, "linear warmup length in epochs (applied per step)")
    warmup_lr: float = config_field(2e-7, "learning rate at step 0")
    min_lr: float = config_field(1e-6, "learning rate at the end of the cosine")
    decay_epochs: float = config_field(0.0, "epochs over which the cosine decays to min_lr (0: --epochs; original: 50)")
    clip_grad: float = config_field(0.0, "clip the gradient's global L2 norm to this (0: off)")
    precision: str = config_field("auto", "auto (bf16 on GPUs that support it, fp32 on CPU) | fp32 | bf16 | fp16 (GradScaler)")
    seed: int = config_field(1234, "seed of all randomness (shuffles, augmentation, dropout, init)")
    max_steps: int = config_field(0, "stop after this many optimizer steps in total (0: run all epochs)")
    # checkpoints
    ckpt_every: int = config_field(0, "also checkpoint every N optimizer steps (0: only at each epoch's end)")
    resume: str = config_field("", "continue a run: a checkpoint path, or 'latest' for OUT/checkpoints/latest.pt")
    # evaluation
    eval_every: int = config_field(1, "evaluate on --eval-split every N epochs (0: never)")
    eval_batch_size: int = config_field(16, "samples per rank per evaluation batch")
    java: str = config_field("auto", "metrics with Java (PTB tokenizer, METEOR, SPICE): auto (when found) | yes (required) | "
                           "no (the Python PTB tokenizer; METEOR/SPICE unavailable)")
    spice_jars: str = config_field("", "directory with the Stanford CoreNLP 3.6.0 jars for SPICE/SPIDEr (optional)")
    # system
    device: str = config_field("auto", "auto | cpu | cuda")
    dist_timeout_s: int = config_field(600, "collective timeout: a rank that stops answering fails the run instead of hanging it")
    log_every: int = config_field(1, "write a metrics.jsonl / TensorBoard line every N optimizer steps")
    tensorboard: bool = config_field(True, "write TensorBoard scalars under OUT/tb")
    progress: bool = config_field(True, "rank-0 tqdm progress bar")

    def __post_init__(self) -> None:
        problems = []
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.grad_accum < 1:
            problems.append(f"grad_accum must be >= 1, got {self.grad_accum}")
        if self.epochs < 1:
            problems.append(f"epochs must be >= 1, got {self.epochs}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            problems.append(f"precision must be auto|fp32|bf16|fp16, got {self.precision!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            problems.append(f"device must be auto|cpu|cuda, got {self.device!r}")
        if self.model not in ("full", "tiny"):
            problems.append(f"model must be full|tiny, got {self.model!r}")
        if self.lr <= 0 or self.min_lr < 0 or self.warmup_lr < 0:
            problems.append(f"learning rates must be positive (lr={self.lr}, min_lr={self.min_lr}, warmup_lr={self.warmup_lr})")
        if self.clip_grad < 0:
            problems.append(f"clip_grad must be >= 0, got {self.clip_grad}")
        try:  # at start, not at the first evaluation an epoch later
            generation_from_flags(self)
        except ValueError as e:
            problems.append(str(e))
        try:
            remote_config_from_json(self.remote)
        except ValueError as e:
            problems.append(str(e))
        if problems:
            raise ValueError("invalid TrainConfig: " + "; ".join(problems))


def _arg_type(annotation: Any) -> type:
    # `from __future__ import annotations` makes annotations strings
    return {"str": str, "int": int, "float": float, "bool": bool}[annotation if isinstance(annotation, str) else annotation.__name__]


def build_arg_parser(cls: type = TrainConfig, description: str = "Train the AVCap captioner.") -> argparse.ArgumentParser:
    """One flag per dataclass field: `--field-name`, its type, its default, its help."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = _arg_type(f.type)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                help=f.metadata.get("help", ""))
        else:
            parser.add_argument(flag, dest=f.name, type=kind, default=default, help=f.metadata.get("help", ""))
    return parser


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    """The config of train.py's command line. With --resume, a flag not given takes the checkpoint's value (so
    `--resume latest` alone continues the run as it was); a given one is checked by check_resume_config."""
    parser = build_arg_parser()
    values = vars(parser.parse_args(argv))
    if values["resume"]:
        unset = object()
        probe = build_arg_parser()
        probe.set_defaults(**{k: unset for k in values})
        given = {k for k, v in vars(probe.parse_args(argv)).items() if v is not unset}
        saved = _saved_train_config(resolve_resume_path(values["resume"], values["out"]))
        values.update({k: v for k, v in saved.items() if k in values and k not in given and k != "resume"})
    return TrainConfig(**values)


def _saved_train_config(path: Path) -> dict[str, Any]:
    state = read_checkpoint_file(path).get("training")
    if not isinstance(state, dict) or not isinstance(state.get("train_config"), dict):
        raise ValueError(f"--resume {path}: a captioner checkpoint without training state "
                         "(use --init-from to fine-tune from it)")
    return state["train_config"]


def resolve_resume_path(resume: str, out: str) -> Path:
    path = Path(out) / "checkpoints" / "latest.pt" if resume == "latest" else Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"--resume {resume!r}: no checkpoint at {path}")
    return path

