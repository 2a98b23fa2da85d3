"""Caption generation: the original's beam search (docs/original.md §4) and greedy decoding, with or without a KV cache.

Two interchangeable decoder "steppers" produce the next-token logits for every live row:

- `RecomputeStepper` mirrors the original: every step re-runs the projection and all decoder layers over
  [prefix; all tokens so far] for every beam, and the vocabulary projection over every text position.
- `CachedStepper`: the prefix never attends to text (docs/original.md §3 mask), so its keys/values per layer are computed
  once per sample and shared by that sample's beams; text keys/values are appended as tokens arrive and each
  step runs only the newest token through the layers, and the vocabulary projection only on it.

Cache layout, per layer: one key buffer and one value buffer [B, heads, P + beam*max_len, dh] holding the
sample's P prefix keys followed by text keys in step-major order (slot P + s*beam + j = position s of beam j).
A step feeds the beams of a sample as `beam` queries of one attention call over that buffer, with a static
mask letting beam j see the prefix and only its own text slots. So the prefix keys are neither copied per beam
nor re-concatenated per step, and reordering beams only gathers the small text part.

The beam-search bookkeeping (candidate selection, finished hypotheses, length normalization, stopping rule,
output rows) follows the original exactly, so both steppers give the same token ids (up to float rounding in
near-ties) and `max_steps=1024` reproduces the original.

`GenerationConfig` holds every setting that changes a caption (beam size, per-node beam, length penalty, max
steps, precision); `generate` is the one call evaluation, training's evaluation and avcap.caption make, so the
same checkpoint, clip and settings give the same tokens in all three.

Precision. Generation runs in float32 by default, whatever the training precision. Measured on the reference
fixture (benchmarks/bench_generation_precision.py, `precision_parity`): under bf16 autocast plain beam search
changes 4 of the 40 expected tokens, and keeping autocast but computing the projection, the output logits and
the log-softmax in float32 changes 7; float32 reproduces all of them. fp16 autocast keeps them either way.
`precision="bf16"|"fp16"` remains available (autocast with that float32 head) and is recorded with the results.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Protocol

import torch
import torch.nn.functional as F

from avcap.model import AVCap, TextualHead


class Stepper(Protocol):
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B*beam, t] (whole history) -> logits [B*beam, V] for position t."""

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """beam_idx [B, beam]: row j of sample b continues from its beam beam_idx[b, j]."""


class RecomputeStepper:
    """The original's decoding step: full recompute over [prefix; tokens] for every beam."""

    def __init__(self, textual: TextualHead, features: torch.Tensor, beam: int, fp32_head: bool = True):
        B, P, D = features.shape
        self.textual = textual
        self.fp32_head = fp32_head
        self.features = features.unsqueeze(1).expand(B, beam, P, D).reshape(B * beam, P, D)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.textual(self.features, tokens, fp32_head=self.fp32_head)[:, -1]

    def reorder(self, beam_idx: torch.Tensor) -> None:
        pass  # all state is in the token history, which the caller reorders


class CachedStepper:
    """Prefix K/V computed once per sample and shared by its beams; text K/V cached; one token per step."""

    def __init__(self, textual: TextualHead, features: torch.Tensor, beam: int, max_len: int,
                 fp32_head: bool = True):
        self.textual = textual
        self.beam = beam
        self.fp32_head = fp32_head
        B, P, _ = features.shape
        self.B, self.P = B, P
        self.t = 0  # text positions cached so far
        x = textual.project(features, fp32_head)
        layers = textual.layers
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for i, layer in enumerate(layers):
            last = i + 1 == len(layers)
            if last:  # the last layer's prefix outputs are never read: text only needs its prefix K/V
                k, v = layer.kv(x)
            else:
                q, k, v = layer.qkv(x)
            heads, dh = k.shape[1], k.shape[3]
            kbuf = k.new_empty(B, heads, P + beam * max_len, dh)
            vbuf = torch.empty_like(kbuf)
            kbuf[:, :, :P] = k
            vbuf[:, :, :P] = v
            self.keys.append(kbuf)
            self.values.append(vbuf)
            if not last:
                x = layer.finish(x, layer.attend(q, k, v, None))
        # beam query j may see every prefix slot and the text slots (s, j) of its own beam
        slot_beam = torch.arange(beam * max_len, device=features.device) % beam
        own = slot_beam[None, :] == torch.arange(beam, device=features.device)[:, None]
        self.mask = torch.cat([torch.ones(beam, P, dtype=torch.bool, device=features.device), own], dim=1)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        B, nb, P, t = self.B, self.beam, self.P, self.t
        if tokens.shape[1] != t + 1:
            raise RuntimeError(f"CachedStepper: expected a history of {t + 1} tokens, got {tokens.shape[1]}")
        x = self.textual.embedding(tokens[:, -1:], start=t)  # [B*nb, 1, H]
        end = P + (t + 1) * nb
        for layer, kbuf, vbuf in zip(self.textual.layers, self.keys, self.values):
            q, k, v = layer.qkv(x)  # [B*nb, heads, 1, dh]
            heads, dh = q.shape[1], q.shape[3]
            # the sample's beams become the query axis of one attention call
            q = q.view(B, nb, heads, dh).transpose(1, 2)
            kbuf[:, :, P + t * nb:end] = k.view(B, nb, heads, dh).transpose(1, 2)
            vbuf[:, :, P + t * nb:end] = v.view(B, nb, heads, dh).transpose(1, 2)
            ctx = layer.attend(q, kbuf[:, :, :end], vbuf[:, :, :end], self.mask[:, :end])  # [B, heads, nb, dh]
            ctx = ctx.transpose(1, 2).reshape(B * nb, heads, 1, dh)
            x = layer.finish(x, ctx)
        self.t = t + 1
        return self.textual.logits(x[:, 0], self.fp32_head)

    def reorder(self, beam_idx: torch.Tensor) -> None:
        B, nb, P, t = self.B, self.beam, self.P, self.t
        if t == 0:
            return
        for buf in (*self.keys, *self.values):
            heads, dh = buf.shape[1], buf.shape[3]
            text = buf[:, :, P:P + t * nb].view(B, heads, t, nb, dh)
            idx = beam_idx.view(B, 1, 1, nb, 1).expand(B, heads, t, nb, dh)
            text.copy_(text.gather(3, idx))


def make_stepper(model: AVCap, features: torch.Tensor, beam: int, max_len: int, use_cache: bool,
                 fp32_head: bool = True) -> Stepper:
    """`fp32_head`: the projection and the logits in float32 even under autocast (a no-op without autocast)."""
    if use_cache:
        return CachedStepper(model.textual, features, beam, max_len, fp32_head)
    return RecomputeStepper(model.textual, features, beam, fp32_head)


@contextmanager
def inference(model: AVCap) -> Iterator[None]:
    """Eval mode (no dropout) and no autograd for the duration; the caller's train/eval state is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


class Hypotheses:
    """Finished hypotheses of one sample, kept as the original does (its `BeamHypotheses`, early_stopping off)."""

    def __init__(self, n_keep: int, max_steps: int, length_penalty: float):
        self.max_length = max_steps - 1  # the original does not count the start token here
        self.length_penalty = length_penalty
        self.n_keep = n_keep
        self.hyp: list[tuple[float, list[int]]] = []
        self.worst_score = 1e9

    def length_norm(self, length: int) -> float:
        return (5 + length) ** self.length_penalty / (5 + 1) ** self.length_penalty

    def add(self, hyp: list[int], sum_logprobs: float) -> None:
        score = sum_logprobs / self.length_norm(len(hyp))
        if len(self.hyp) < self.n_keep or score > self.worst_score:
            self.hyp.append((score, hyp))
            if len(self.hyp) > self.n_keep:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.hyp))
                del self.hyp[ranked[0][1]]
                self.worst_score = ranked[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_logprobs: float) -> bool:
        if len(self.hyp) < self.n_keep:
            return False
        return self.worst_score >= best_sum_logprobs / self.length_norm(self.max_length)

    def best(self) -> tuple[float, list[int]]:
        return max(self.hyp, key=lambda h: h[0])


def _log_softmax(logits: torch.Tensor) -> torch.Tensor:
    # The original scores in float32; a float64 model keeps float64 (used by tests to rule out near-ties).
    # Outside autocast, so that a bf16/fp16 run still scores in float32.
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    with torch.autocast(logits.device.type, enabled=False):
        return F.log_softmax(logits.to(dtype), dim=-1)


def _check_args(model: AVCap, features: torch.Tensor, max_steps: int) -> None:
    if features.dim() != 3 or features.shape[-1] != model.cfg.embed_dim:
        raise ValueError(f"features: expected [B, N, {model.cfg.embed_dim}], got {list(features.shape)}")
    if not 2 <= max_steps <= model.cfg.max_positions + 1:
        raise ValueError(f"max_steps={max_steps}: must be in [2, max_positions+1={model.cfg.max_positions + 1}]")


def beam_search_features(model: AVCap, features: torch.Tensor, beam_size: int = 4, per_node_beam: int = 2,
                         length_penalty: float = 0.6, max_steps: int = 42,
                         use_cache: bool = True, fp32_head: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search from encoder features [B, N, D]. Returns (tokens [B, max_steps] long: [CLS] words [SEP] then
    [SEP] padding; logprobs [B, 1]: the kept hypothesis' length-normalized score)."""
    _check_args(model, features, max_steps)
    if beam_size < 1:
        raise ValueError(f"beam_size={beam_size}: must be >= 1")
    if per_node_beam < 2:
        # with one candidate per beam a [SEP] leaves the beam short, which the original cannot handle either
        raise ValueError(f"per_node_beam={per_node_beam}: must be >= 2")
    cls_id, sep_id = model.cfg.cls_id, model.cfg.sep_id
    B, nb = features.shape[0], beam_size
    device = features.device
    with inference(model):
        stepper = make_stepper(model, features, nb, max_steps, use_cache, fp32_head)
        input_ids = torch.full((B * nb, 1), cls_id, dtype=torch.long, device=device)
        beam_scores = None  # created on the first step, in the scoring dtype
        hyps = [Hypotheses(1, max_steps, length_penalty) for _ in range(B)]
        done = [False] * B
        cur_len = 1
        while cur_len < max_steps:
            logits = stepper.step(input_ids)
            logp = _log_softmax(logits)
            V = logp.shape[-1]
            if beam_scores is None:
                # only beam 0 is live at the start: all beams hold the same [CLS]
                beam_scores = torch.zeros(B, nb, dtype=logp.dtype, device=device)
                beam_scores[:, 1:] = -1e9
                beam_scores = beam_scores.view(-1)
            scores = (logp + beam_scores[:, None]).view(B, nb * V)
            top_scores, top_ids = torch.topk(scores, per_node_beam * nb, dim=1, largest=True, sorted=True)
            top_scores, top_ids = top_scores.tolist(), top_ids.tolist()
            histories = input_ids.tolist() if not all(done) else None
            next_score: list[float] = []
            next_word: list[int] = []
            next_beam: list[int] = []  # beam within the sample
            last = cur_len + 1 == max_steps
            for b in range(B):
                done[b] = done[b] or hyps[b].is_done(max(top_scores[b]))
                if done[b]:
                    # a finished sample's rows are padding from here on; keep them in place
                    next_score += [0.0] * nb
                    next_word += [sep_id] * nb
                    next_beam += list(range(nb))
                    continue
                sent: list[tuple[float, int, int]] = []
                for idx, score in zip(top_ids[b], top_scores[b]):
                    beam_id, word_id = divmod(idx, V)
                    if word_id == sep_id or last:
                        hyps[b].add(histories[b * nb + beam_id][:cur_len], score)
                    else:
                        sent.append((score, word_id, beam_id))
                    if len(sent) == nb:
                        break
                if not sent:
                    sent = [(0.0, sep_id, j) for j in range(nb)]
                next_score += [s for s, _, _ in sent]
                next_word += [w for _, w, _ in sent]
                next_beam += [j for _, _, j in sent]
            beam_scores = torch.tensor(next_score, dtype=beam_scores.dtype, device=device)
            local = torch.tensor(next_beam, dtype=torch.long, device=device).view(B, nb)
            rows = (local + torch.arange(B, device=device)[:, None] * nb).view(-1)
            words = torch.tensor(next_word, dtype=torch.long, device=device)
            input_ids = torch.cat([input_ids[rows], words[:, None]], dim=1)
            stepper.reorder(local)
            cur_len += 1
            if all(done):
                break

        tokens = torch.full((B, max_steps), sep_id, dtype=torch.long, device=device)
        logprobs = torch.empty(B, 1, dtype=beam_scores.dtype if beam_scores is not None else torch.float32,
                               device=device)
        for b, h in enumerate(hyps):
            score, hyp = h.best()
            tokens[b, :len(hyp)] = torch.tensor(hyp, dtype=torch.long)
            logprobs[b, 0] = score
    return tokens, logprobs


def greedy_search_features(model: AVCap, features: torch.Tensor, max_steps: int = 42,
                           use_cache: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding from encoder features. Same row format as beam search ([CLS] words [SEP], [SEP]
    padding; at most max_steps-2 words). logprobs [B, 1]: sum of the emitted tokens' log-probabilities
    (the [SEP] included when the model chose it), no length normalization."""
    _check_args(model, features, max_steps)
    cls_id, sep_id = model.cfg.cls_id, model.cfg.sep_id
    B, device = features.shape[0], features.device
    with inference(model):
        stepper = make_stepper(model, features, 1, max_steps, use_cache)
        tokens = torch.full((B, 1), cls_id, dtype=torch.long, device=device)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        total = None
        keep = torch.zeros(B, 1, dtype=torch.long, device=device)
        for _ in range(max_steps - 2):
            logits = stepper.step(tokens)
            logp = _log_softmax(logits)
            best_logp, word = logp.max(dim=-1)
            total = torch.zeros_like(best_logp) if total is None else total
            total = total + torch.where(finished, torch.zeros_like(best_logp), best_logp)
            word = torch.where(finished, torch.full_like(word, sep_id), word)
            tokens = torch.cat([tokens, word[:, None]], dim=1)
            stepper.reorder(keep)
            finished |= word == sep_id
            if bool(finished.all()):
                break
        out = torch.full((B, max_steps), sep_id, dtype=torch.long, device=device)
        out[:, :tokens.shape[1]] = tokens
        logprobs = (total if total is not None else torch.zeros(B, device=device))[:, None]
    return out, logprobs


def beam_search(model: AVCap, audio: torch.Tensor | None, visual: torch.Tensor | None, beam_size: int = 4,
                per_node_beam: int = 2, length_penalty: float = 0.6, max_steps: int = 42, use_cache: bool = True,
                mode: str | None = None, fp32_head: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode and beam-search. audio [B,1024,128], visual [B,3,224,224] or [B,3,nf,224,224] (None when the mode
    does not use it). Returns (tokens [B, max_steps] long, logprobs [B, 1])."""
    with inference(model):
        features = model.encode(audio, visual, mode)
    return beam_search_features(model, features, beam_size, per_node_beam, length_penalty, max_steps, use_cache,
                                fp32_head)


def greedy_search(model: AVCap, audio: torch.Tensor | None, visual: torch.Tensor | None, max_steps: int = 42,
                  use_cache: bool = True, mode: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode and decode greedily; same output format as `beam_search`."""
    with inference(model):
        features = model.encode(audio, visual, mode)
    return greedy_search_features(model, features, max_steps, use_cache)


# ----------------------------------------------------------------------------------------------------------
# One set of generation settings for evaluation, training's evaluation and avcap.caption

PRECISIONS = ("fp32", "bf16", "fp16")
_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

MAX_STEPS_HELP = ("generation steps, [CLS] included: [CLS] + 40 wordpieces + [SEP], the longest training caption "
                  "(docs/original.md §1); the original runs up to 1024. The steps before the cap are the same "
                  "computation, so whenever the search ends (best hypothesis finished, no live beam can beat it) "
                  "before the cap, the caption equals the 1024-step one")


def _gen_field(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class GenerationConfig:
    """Everything that changes a generated caption. Evaluate, training's evaluation and caption take their
    defaults and --help texts from here."""
    beam_size: int = _gen_field(4, "beam search width")
    per_node_beam: int = _gen_field(2, "candidates each beam proposes per step (the original's per_node_beam_size)")
    length_penalty: float = _gen_field(0.6, "length normalization exponent ((5+len)^a / 6^a, the original's)")
    max_steps: int = _gen_field(42, MAX_STEPS_HELP)
    precision: str = _gen_field("fp32", "generation precision: fp32 (measured to keep the reference tokens; the "
                                        "default whatever the training precision) | bf16 | fp16 (autocast with the "
                                        "projection, logits and log-softmax in float32)")

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"generation precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.beam_size < 1:
            raise ValueError(f"beam_size={self.beam_size}: must be >= 1")
        if self.per_node_beam < 2:
            raise ValueError(f"per_node_beam={self.per_node_beam}: must be >= 2")
        if self.max_steps < 2:
            raise ValueError(f"max_steps={self.max_steps}: must be >= 2")

    @classmethod
    def help(cls, name: str) -> str:
        return cls.__dataclass_fields__[name].metadata["help"]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def autocast(self, device: torch.device | str):
        """The autocast context of this precision; fp32 switches off any autocast around it."""
        device_type = torch.device(device).type
        dtype = _AUTOCAST[self.precision]
        if dtype is None:
            return torch.autocast(device_type, enabled=False)
        return torch.autocast(device_type, dtype=dtype)


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def generate(model: AVCap, audio: torch.Tensor | None, visual: torch.Tensor | None, gen: GenerationConfig,
             mode: str | None = None, use_cache: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search under `gen`'s settings and precision: the call every captioning path makes."""
    with gen.autocast(_device_of(model)):
        return beam_search(model, audio, visual, beam_size=gen.beam_size, per_node_beam=gen.per_node_beam,
                           length_penalty=gen.length_penalty, max_steps=gen.max_steps, use_cache=use_cache,
                           mode=mode, fp32_head=True)


@dataclass
class PrecisionCheck:
    precision: str           # fp32 | bf16 | fp16
    policy: str              # "no autocast" (fp32) | "fp32 head" (what generate does under bf16/fp16) |
                             # "plain autocast" (everything under autocast)
    tokens_differing: int    # from the expected tokens
    tokens_total: int

    @property
    def ok(self) -> bool:
        return self.tokens_differing == 0


def precision_parity(model: AVCap, audio: torch.Tensor | None, visual: torch.Tensor | None,
                     expected: torch.Tensor | None = None, gen: GenerationConfig | None = None,
                     precisions: tuple[str, ...] = PRECISIONS, mode: str | None = None) -> list[PrecisionCheck]:
    """How many beam-search tokens each precision changes, on the model's device.

    `expected`: the tokens to reproduce (e.g. a reference fixture's); by default the float32 tokens. For bf16
    and fp16 both policies are measured: `generate`'s (autocast, float32 head) and plain autocast. The
    measurement behind the default generation precision; benchmarks run it on CPU and on CUDA (inputs are moved
    to the model's device)."""
    gen = gen or GenerationConfig()
    device = _device_of(model)
    audio = audio.to(device) if audio is not None else None
    visual = visual.to(device) if visual is not None else None
    if expected is None:
        expected, _ = generate(model, audio, visual, GenerationConfig(**{**gen.to_dict(), "precision": "fp32"}),
                               mode)
    expected = expected.to(device)
    checks = []
    for precision in precisions:
        setting = GenerationConfig(**{**gen.to_dict(), "precision": precision})
        policies = [("no autocast", True)] if precision == "fp32" else [("fp32 head", True),
                                                                        ("plain autocast", False)]
        for policy, fp32_head in policies:
            with setting.autocast(device):
                tokens, _ = beam_search(model, audio, visual, beam_size=gen.beam_size,
                                        per_node_beam=gen.per_node_beam, length_penalty=gen.length_penalty,
                                        max_steps=gen.max_steps, mode=mode, fp32_head=fp32_head)
            if tokens.shape != expected.shape:
                raise ValueError(f"expected tokens {list(expected.shape)} but generation gave {list(tokens.shape)} "
                                 f"(max_steps={gen.max_steps})")
            checks.append(PrecisionCheck(precision, policy, int((tokens != expected).sum()), tokens.numel()))
    return checks


# The flags (config field names) of evaluate, train and caption that make a GenerationConfig.
FLAG_FIELDS = {"beam_size": "beam_size", "per_node_beam": "per_node_beam", "length_penalty": "length_penalty",
               "max_gen_steps": "max_steps", "gen_precision": "precision"}


@dataclass(kw_only=True)
class GenerationFlags:
    """The generation settings as fields of a command's config (TrainConfig, EvalConfig, CaptionConfig inherit
    them): names are FLAG_FIELDS', defaults and help GenerationConfig's, so the three commands cannot drift."""
    beam_size: int = _gen_field(GenerationConfig.beam_size, GenerationConfig.help("beam_size"))
    per_node_beam: int = _gen_field(GenerationConfig.per_node_beam, GenerationConfig.help("per_node_beam"))
    length_penalty: float = _gen_field(GenerationConfig.length_penalty, GenerationConfig.help("length_penalty"))
    max_gen_steps: int = _gen_field(GenerationConfig.max_steps, GenerationConfig.help("max_steps"))
    gen_precision: str = _gen_field(GenerationConfig.precision, GenerationConfig.help("precision"))


def generation_from_flags(cfg: Any) -> GenerationConfig:
    """The GenerationConfig of a command's config (EvalConfig, TrainConfig, CaptionConfig)."""
    return GenerationConfig(**{ours: getattr(cfg, flag) for flag, ours in FLAG_FIELDS.items()})
