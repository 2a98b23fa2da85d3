"""AVCap: a CAV-MAE audio-visual encoder feeding a GiT text decoder (docs/original.md §2-3).

The module tree is laid out so that `state_dict()` keys are exactly the original captioner's:
`av_encoder.*` (CAV-MAE fine-tuning encoder) and `textual.*` (GiT `TransformerDecoderTextualHead` with a
BERT encoder used as a decoder). Checkpoint loaders (avcap.checkpoint) rely on that, so renaming a module here
breaks loading real weights; tests/test_model.py checks every key and shape against
tests/data/reference/full_size_state_dict_shapes.json.

Attention everywhere goes through `F.scaled_dot_product_attention`. The decoder's layers expose `qkv` and
`finish` separately so that avcap.generate can run them one token at a time against a KV cache.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp

MODES = ("av", "audio", "visual")
NUM_FRAMES = (1, 2, 4, 8)


@dataclass(kw_only=True)
class AVCapConfig:
    """Sizes and behaviour of the captioner. Special token ids have no defaults: they come from the tokenizer."""

    cls_id: int
    sep_id: int
    pad_id: int
    vocab_size: int = 30522
    # encoder (CAV-MAE)
    embed_dim: int = 768
    depth_a: int = 11
    depth_v: int = 11
    depth_u: int = 1
    num_heads: int = 12
    mlp_ratio: float = 4.0
    audio_length: int = 1024  # fbank frames (time)
    num_mel_bins: int = 128
    img_size: int = 224
    patch_size: int = 16
    num_frames: int = 1
    num_classes: int = 527  # mlp_head: unused for captioning, kept so checkpoints round-trip
    # decoder (GiT)
    text_hidden: int = 768
    text_layers: int = 6
    text_heads: int = 12
    text_ffn: int = 3072
    max_positions: int = 1024
    # behaviour
    mode: str = "av"
    dropout: float = 0.1  # decoder embeddings and hidden states
    attention_dropout: float = 0.1  # decoder attention probabilities
    label_smoothing: float = 0.1

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"AVCapConfig.mode={self.mode!r}: must be one of {MODES}")
        if self.num_frames not in NUM_FRAMES:
            raise ValueError(f"AVCapConfig.num_frames={self.num_frames}: must be one of {NUM_FRAMES}")
        for name, dim, heads in (("embed_dim", self.embed_dim, self.num_heads),
                                 ("text_hidden", self.text_hidden, self.text_heads)):
            if dim % heads:
                raise ValueError(f"AVCapConfig.{name}={dim} is not divisible by its {heads} heads")
        if self.embed_dim % 4:
            raise ValueError(f"AVCapConfig.embed_dim={self.embed_dim}: 2-D sin-cos positions need a multiple of 4")
        if self.img_size % self.patch_size or self.audio_length % self.patch_size or self.num_mel_bins % self.patch_size:
            raise ValueError(f"AVCapConfig: img_size {self.img_size}, audio_length {self.audio_length} and "
                             f"num_mel_bins {self.num_mel_bins} must be multiples of patch_size {self.patch_size}")
        for name in ("cls_id", "sep_id", "pad_id"):
            tid = getattr(self, name)
            if not 0 <= tid < self.vocab_size:
                raise ValueError(f"AVCapConfig.{name}={tid} is outside the vocabulary [0, {self.vocab_size})")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"AVCapConfig.label_smoothing={self.label_smoothing}: must be in [0, 1)")

    # --- derived sizes ---
    @property
    def num_audio_tokens(self) -> int:
        return (self.num_mel_bins // self.patch_size) * (self.audio_length // self.patch_size)

    @property
    def num_visual_tokens(self) -> int:
        per_frame = (self.img_size // self.patch_size) ** 2
        # more than one frame: a Conv3d with temporal kernel and stride 2 pairs up frames
        return per_frame if self.num_frames == 1 else per_frame * (self.num_frames // 2)

    def num_prefix_tokens(self, mode: str | None = None) -> int:
        mode = mode or self.mode
        return {"av": self.num_audio_tokens + self.num_visual_tokens,
                "audio": self.num_audio_tokens, "visual": self.num_visual_tokens}[mode]

    # --- presets and serialization ---
    @classmethod
    def full(cls, *, cls_id: int, sep_id: int, pad_id: int, num_frames: int = 1, **overrides) -> "AVCapConfig":
        """The original's size: CAV-MAE base encoder (768 wide, 11+1 blocks) and GiT-base decoder (6 layers)."""
        return cls(cls_id=cls_id, sep_id=sep_id, pad_id=pad_id, num_frames=num_frames, **overrides)

    @classmethod
    def tiny(cls, **overrides) -> "AVCapConfig":
        """Matches tests/data/reference/tiny_avcap_seed1234/config.json (its vocab has [CLS]=101, [SEP]=102,
        [PAD]=0: those are the reference's ids, not defaults for real tokenizers)."""
        base = dict(cls_id=101, sep_id=102, pad_id=0, vocab_size=1000, embed_dim=64, num_heads=4,
                    depth_a=11, depth_v=11, depth_u=1, text_hidden=64, text_layers=2, text_heads=4, text_ffn=256,
                    max_positions=1024, num_frames=1)
        base.update(overrides)
        return cls(**base)

    def to_dict(self) -> dict:
        """Plain types only: what a checkpoint stores (avcap.checkpoint)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AVCapConfig":
        """The inverse of to_dict; a key this class lacks is an error, not silently dropped."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"AVCapConfig.from_dict: unknown keys {unknown} (written by a newer version?)")
        return cls(**d)


# ----------------------------------------------------------------------------------------------------------
# Encoder (CAV-MAE fine-tuning variant)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """MAE-style fixed 2-D positions [grid_h*grid_w, dim]: first half of channels encodes the column, second
    half the row; token order is row-major (row*grid_w + col), matching the patch flattening."""
    def one_axis(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    cols, rows = np.meshgrid(np.arange(grid_w, dtype=np.float32), np.arange(grid_h, dtype=np.float32))
    emb = np.concatenate([one_axis(dim // 2, cols), one_axis(dim // 2, rows)], axis=1)
    return torch.from_numpy(emb).float()


class PatchEmbed(nn.Module):
    """Conv patchifier; a Conv3d with temporal kernel 2 when several frames are stacked."""

    def __init__(self, in_chans: int, dim: int, patch: int, temporal: int = 1):
        super().__init__()
        if temporal == 1:
            self.proj = nn.Conv2d(in_chans, dim, patch, stride=patch)
        else:
            self.proj = nn.Conv3d(in_chans, dim, (temporal, patch, patch), stride=(temporal, patch, patch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Fused-qkv multi-head self-attention (timm key names `qkv`, `proj`) through SDPA."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    """Pre-norm ViT block with three LayerNorm pairs: the plain pair for the joint stream, `_a`/`_v` pairs when
    the shared block processes a single modality."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.norm1_a = nn.LayerNorm(dim)
        self.norm1_v = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.norm2_a = nn.LayerNorm(dim)
        self.norm2_v = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))  # fc1, exact GELU, fc2

    def norms(self, modality: str | None) -> tuple[nn.LayerNorm, nn.LayerNorm]:
        if modality is None:
            return self.norm1, self.norm2
        return (self.norm1_a, self.norm2_a) if modality == "a" else (self.norm1_v, self.norm2_v)

    def forward(self, x: torch.Tensor, modality: str | None = None) -> torch.Tensor:
        n1, n2 = self.norms(modality)
        x = x + self.attn(n1(x))
        return x + self.mlp(n2(x))


class CAVMAEEncoder(nn.Module):
    def __init__(self, cfg: AVCapConfig):
        super().__init__()
        D = cfg.embed_dim
        self.cfg = cfg
        self.patch_embed_a = PatchEmbed(1, D, cfg.patch_size)
        self.patch_embed_v = PatchEmbed(3, D, cfg.patch_size, temporal=1 if cfg.num_frames == 1 else 2)
        self.modality_a = nn.Parameter(torch.zeros(1, 1, D))
        self.modality_v = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed_a = nn.Parameter(torch.zeros(1, cfg.num_audio_tokens, D))
        self.pos_embed_v = nn.Parameter(torch.zeros(1, cfg.num_visual_tokens, D))
        self.blocks_a = nn.ModuleList(Block(D, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth_a))
        self.blocks_v = nn.ModuleList(Block(D, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth_v))
        self.blocks_u = nn.ModuleList(Block(D, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth_u))
        self.norm_a = nn.LayerNorm(D)
        self.norm_v = nn.LayerNorm(D)
        self.norm = nn.LayerNorm(D)
        self.mlp_head = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, cfg.num_classes))
        self._init_weights()

    def _init_weights(self) -> None:
        cfg = self.cfg
        with torch.no_grad():
            self.pos_embed_a.copy_(sincos_pos_embed_2d(
                cfg.embed_dim, cfg.num_mel_bins // cfg.patch_size, cfg.audio_length // cfg.patch_size)[None])
            side = math.isqrt(cfg.num_visual_tokens)
            if side * side == cfg.num_visual_tokens:
                self.pos_embed_v.copy_(sincos_pos_embed_2d(cfg.embed_dim, side, side)[None])
            else:  # e.g. 392 tokens for 4 frames: no square grid, so the original starts from noise
                nn.init.normal_(self.pos_embed_v, std=0.02)
            nn.init.normal_(self.modality_a, std=0.02)
            nn.init.normal_(self.modality_v, std=0.02)
        for pe in (self.patch_embed_a, self.patch_embed_v):
            w = pe.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def embed_audio(self, audio: torch.Tensor) -> torch.Tensor:
        # [B, T, F] -> [B, 1, F, T]: mel is the image height, time its width
        a = self.patch_embed_a(audio.unsqueeze(1).transpose(2, 3))
        return a + self.pos_embed_a + self.modality_a

    def embed_visual(self, visual: torch.Tensor) -> torch.Tensor:
        return self.patch_embed_v(visual) + self.pos_embed_v + self.modality_v

    def forward(self, audio: torch.Tensor | None, visual: torch.Tensor | None, mode: str) -> torch.Tensor:
        if mode == "av":
            a, v = self.embed_audio(audio), self.embed_visual(visual)
            for blk in self.blocks_a:
                a = blk(a)
            for blk in self.blocks_v:
                v = blk(v)
            x = torch.cat([a, v], dim=1)
            for blk in self.blocks_u:
                x = blk(x)
            return self.norm(x)
        if mode == "audio":
            x = self.embed_audio(audio)
            for blk in self.blocks_a:
                x = blk(x)
            for blk in self.blocks_u:
                x = blk(x, "a")
            return self.norm_a(x)
        x = self.embed_visual(visual)
        for blk in self.blocks_v:
            x = blk(x)
        for blk in self.blocks_u:
            x = blk(x, "v")
        return self.norm_v(x)

    def unused_parameter_names(self, mode: str) -> set[str]:
        """Names (relative to this module) of parameters `mode` never touches: they get no gradient, so they
        are marked not trainable and DDP needs no find_unused_parameters."""
        names = {n for n, _ in self.named_parameters()}
        unused = {n for n in names if n.startswith(("mlp_head.",))}
        blocks_plain_only = ("blocks_a.", "blocks_v.")
        if mode == "av":
            unused |= {n for n in names if "norm1_" in n or "norm2_" in n}
            unused |= {n for n in names if n.startswith(("norm_a.", "norm_v."))}
        else:
            keep, drop = ("a", "v") if mode == "audio" else ("v", "a")
            unused |= {n for n in names if n.startswith((f"blocks_{drop}.", f"patch_embed_{drop}.", f"pos_embed_{drop}",
                                                         f"modality_{drop}", "norm.", f"norm_{drop}."))}
            # modality blocks always run with the plain norms; the shared blocks with this modality's norms
            unused |= {n for n in names if n.startswith(blocks_plain_only) and ("norm1_" in n or "norm2_" in n)}
            unused |= {n for n in names if n.startswith("blocks_u.") and
                       (n.split(".")[2] in ("norm1", "norm2", f"norm1_{drop}", f"norm2_{drop}"))}
        return unused


# ----------------------------------------------------------------------------------------------------------
# Decoder (GiT textual head: BERT encoder layers used as a decoder over [prefix; text])


class WordAndPositionalEmbedding(nn.Module):
    def __init__(self, cfg: AVCapConfig):
        super().__init__()
        self.words = nn.Embedding(cfg.vocab_size, cfg.text_hidden, padding_idx=cfg.pad_id)
        self.positions = nn.Embedding(cfg.max_positions, cfg.text_hidden)
        self.layer_norm = nn.LayerNorm(cfg.text_hidden, eps=1e-8)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        """tokens [B, T] at positions start..start+T-1 -> [B, T, H]."""
        pos = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        return self.dropout(self.layer_norm(self.words(tokens) + self.positions(pos)))


class SelfAttention(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)


class DenseNorm(nn.Module):
    """BERT's `dense` + dropout + residual + LayerNorm (post-norm)."""

    def __init__(self, d_in: int, hidden: int, dropout: float):
        super().__init__()
        self.dense = nn.Linear(d_in, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class AttentionBlock(nn.Module):
    def __init__(self, hidden: int, dropout: float):
        super().__init__()
        self.self = SelfAttention(hidden)
        self.output = DenseNorm(hidden, hidden, dropout)


class Intermediate(nn.Module):
    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.dense = nn.Linear(hidden, ffn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # erf GELU, as BERT's "gelu"


class TextLayer(nn.Module):
    """A post-norm BERT layer. `qkv` and `finish` are split out so generation can run it incrementally."""

    def __init__(self, cfg: AVCapConfig):
        super().__init__()
        self.num_heads = cfg.text_heads
        self.attn_dropout = cfg.attention_dropout
        self.attention = AttentionBlock(cfg.text_hidden, cfg.dropout)
        self.intermediate = Intermediate(cfg.text_hidden, cfg.text_ffn)
        self.output = DenseNorm(cfg.text_ffn, cfg.text_hidden, cfg.dropout)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        return x.view(B, N, self.num_heads, C // self.num_heads).transpose(1, 2)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, N, H] -> q, k, v each [B, heads, N, H/heads]."""
        sa = self.attention.self
        return self.split_heads(sa.query(x)), self.split_heads(sa.key(x)), self.split_heads(sa.value(x))

    def kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values only, for tokens whose own output is never read."""
        sa = self.attention.self
        return self.split_heads(sa.key(x)), self.split_heads(sa.value(x))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
        """SDPA; mask is boolean, True = may attend. Returns [B, heads, Nq, H/heads]."""
        p = self.attn_dropout if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)

    def finish(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """Everything after the attention weights: ctx [B, heads, N, dh] merged, output dense/norm, FFN."""
        B, N, C = x.shape
        ctx = ctx.transpose(1, 2).reshape(B, N, C)
        h = self.attention.output(ctx, x)
        return self.output(self.intermediate(h), h)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, first_query: int = 0) -> torch.Tensor:
        """x [B, N, H] -> [B, N - first_query, H]: rows before `first_query` serve only as keys and values, so
        their queries, attention outputs and FFN (work whose result nobody reads) are not computed."""
        if first_query == 0:
            return self.finish(x, self.attend(*self.qkv(x), mask))
        k, v = self.kv(x)
        xq = x[:, first_query:]
        q = self.split_heads(self.attention.self.query(xq))
        return self.finish(xq, self.attend(q, k, v, None if mask is None else mask[first_query:]))


class TextEncoder(nn.Module):
    def __init__(self, cfg: AVCapConfig):
        super().__init__()
        self.layer = nn.ModuleList(TextLayer(cfg) for _ in range(cfg.text_layers))


class TextTransformer(nn.Module):
    """Holds `encoder.layer.*` to match GiT's `BertEncoderAsDecoder` key names."""

    def __init__(self, cfg: AVCapConfig):
        super().__init__()
        self.encoder = TextEncoder(cfg)


def prefix_mask(num_prefix: int, num_text: int, device: torch.device) -> torch.Tensor:
    """Boolean [P+T, P+T] mask, True = may attend: prefix->prefix open, prefix->text blocked,
    text->prefix open, text->text causal."""
    n = num_prefix + num_text
    mask = torch.ones(n, n, dtype=torch.bool, device=device)
    mask[:num_prefix, num_prefix:] = False
    mask[num_prefix:, num_prefix:] = torch.ones(num_text, num_text, dtype=torch.bool, device=device).tril()
    return mask


class TextualHead(nn.Module):
    def __init__(self, cfg: AVCapConfig):
        super().__init__()
        self.cfg = cfg
        self.av_projection = nn.Sequential(nn.Linear(cfg.embed_dim, cfg.text_hidden), nn.LayerNorm(cfg.text_hidden))
        self.embedding = WordAndPositionalEmbedding(cfg)
        self.transformer = TextTransformer(cfg)
        self.output = nn.Linear(cfg.text_hidden, cfg.vocab_size)
        self._init_weights()
        self.output.weight = self.embedding.words.weight  # tied; the bias stays its own

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.embedding.words.weight[self.cfg.pad_id].zero_()

    @property
    def layers(self) -> nn.ModuleList:
        return self.transformer.encoder.layer

    @staticmethod
    def _run(module: nn.Module, x: torch.Tensor, fp32: bool) -> torch.Tensor:
        if fp32 and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return module(x.float())
        return module(x)

    def project(self, features: torch.Tensor, fp32: bool = False) -> torch.Tensor:
        """The prefix projection; `fp32` runs it in float32 even under autocast (generation's precision policy)."""
        return self._run(self.av_projection, features, fp32)

    def logits(self, hidden: torch.Tensor, fp32: bool = False) -> torch.Tensor:
        """Vocabulary logits of decoder outputs; `fp32` as in `project`."""
        return self._run(self.output, hidden, fp32)

    def hidden(self, features: torch.Tensor, tokens: torch.Tensor, fp32_head: bool = False) -> torch.Tensor:
        """Teacher-forced text hidden states [B, T, H] for tokens [B, T] given encoder features [B, P, D].

        Only text rows are read at the end, so the last layer runs its queries and FFN on the text rows alone
        (the prefix there is keys and values only): ~1/6 of the decoder's work over the prefix saved."""
        prefix = self.project(features, fp32_head)
        text = self.embedding(tokens)
        P, T = prefix.shape[1], text.shape[1]
        if T > self.cfg.max_positions:
            raise ValueError(f"tokens: {T} positions exceed max_positions={self.cfg.max_positions}")
        x = torch.cat([prefix, text], dim=1)
        mask = prefix_mask(P, T, x.device)
        for i, layer in enumerate(self.layers):
            x = layer(x, mask, first_query=P if i + 1 == len(self.layers) else 0)
        return x

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, fp32_head: bool = False) -> torch.Tensor:
        """Teacher-forced logits [B, T, V] for tokens [B, T] given encoder features [B, P, D]."""
        return self.logits(self.hidden(features, tokens, fp32_head), fp32_head)


# ----------------------------------------------------------------------------------------------------------
# The captioner


def label_smoothed_kl(logits: torch.Tensor, target: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Mean over rows of KL(q || softmax(logits)), q = 1-eps on the target and eps/(V-1) elsewhere (GiT's form),
    in float32.

    Smoothed cross-entropy minus the constant entropy of q. torch's label smoothing spreads s/V over every class
    (the target included), so s = eps*V/(V-1) gives exactly GiT's q: -(1-s)*logp_t - s/V*sum(logp) =
    -(on-off)*logp_t - off*sum(logp). One fused op, no [N, V] one-hot nor log-probability copies."""
    V = logits.shape[-1]
    on, off = 1.0 - smoothing, smoothing / (V - 1)
    ce = F.cross_entropy(logits.float(), target, label_smoothing=smoothing * V / (V - 1))
    entropy = -(on * math.log(on) + ((V - 1) * off * math.log(off) if off > 0 else 0.0))
    return ce - entropy


class AVCap(nn.Module):
    def __init__(self, cfg: AVCapConfig):
        super().__init__()
        self.cfg = cfg
        self.av_encoder = CAVMAEEncoder(cfg)
        self.textual = TextualHead(cfg)
        self._encoder_frozen = False
        self._decoder_frozen = False
        self._update_trainable()

    # --- trainability ---
    def _update_trainable(self) -> None:
        unused = self.av_encoder.unused_parameter_names(self.cfg.mode)
        for name, p in self.av_encoder.named_parameters():
            p.requires_grad_(not self._encoder_frozen and name not in unused)
        for name, p in self.textual.named_parameters():
            # The projection bridges encoder and decoder: it stays trainable when the decoder is frozen
            # (what the original's --freeze_text meant; its whitelist named a module that didn't exist).
            frozen = self._decoder_frozen and not name.startswith("av_projection.")
            p.requires_grad_(not frozen)

    def freeze_encoder(self, frozen: bool = True) -> None:
        self._encoder_frozen = frozen
        self._update_trainable()

    def freeze_decoder(self, frozen: bool = True) -> None:
        """Freeze the text decoder except `textual.av_projection`."""
        self._decoder_frozen = frozen
        self._update_trainable()

    # --- input checks ---
    def _check_audio(self, audio: torch.Tensor | None) -> torch.Tensor:
        c = self.cfg
        if audio is None:
            raise ValueError("audio is required in this mode but was None")
        if audio.dim() != 3 or tuple(audio.shape[1:]) != (c.audio_length, c.num_mel_bins):
            raise ValueError(f"audio: expected [B, {c.audio_length}, {c.num_mel_bins}] (time x mel), "
                             f"got {list(audio.shape)}")
        return audio

    def _check_visual(self, visual: torch.Tensor | None) -> torch.Tensor:
        c = self.cfg
        if visual is None:
            raise ValueError("visual is required in this mode but was None")
        if c.num_frames == 1 and visual.dim() == 5 and visual.shape[2] == 1:
            visual = visual[:, :, 0]
        want = ((3, c.img_size, c.img_size) if c.num_frames == 1
                else (3, c.num_frames, c.img_size, c.img_size))
        if tuple(visual.shape[1:]) != want:
            raise ValueError(f"visual: expected [B, {', '.join(map(str, want))}] for num_frames={c.num_frames}, "
                             f"got {list(visual.shape)}")
        return visual

    # --- forward passes ---
    def encode(self, audio: torch.Tensor | None, visual: torch.Tensor | None, mode: str | None = None) -> torch.Tensor:
        """Encoder features [B, N, D]; N = 512 + Nv ("av"), 512 ("audio") or Nv ("visual")."""
        mode = mode or self.cfg.mode
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: must be one of {MODES}")
        a = self._check_audio(audio) if mode in ("av", "audio") else None
        v = self._check_visual(visual) if mode in ("av", "visual") else None
        if a is not None and v is not None and a.shape[0] != v.shape[0]:
            raise ValueError(f"audio batch {a.shape[0]} != visual batch {v.shape[0]}")
        return self.av_encoder(a, v, mode)

    def decode(self, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits [B, T, V]."""
        return self.textual(features, tokens)

    def forward(self, audio: torch.Tensor | None, visual: torch.Tensor | None, tokens: torch.Tensor,
                need_predict: torch.Tensor, mode: str | None = None,
                return_logits: bool = True) -> dict[str, torch.Tensor]:
        """Teacher-forced pass. logits[:, t] predict tokens[:, t+1]; the loss covers positions where
        need_predict[:, t+1] == 1 (label-smoothed KL, float32). return_logits=False (training) skips the
        [B, T, V] logits: the vocabulary projection then runs only on the positions the loss reads."""
        if tokens.dim() != 2 or tokens.shape != need_predict.shape:
            raise ValueError(f"tokens {list(tokens.shape)} and need_predict {list(need_predict.shape)} "
                             "must both be [B, T]")
        if tokens.dtype != torch.long:
            raise ValueError(f"tokens: expected torch.long, got {tokens.dtype}")
        hidden = self.textual.hidden(self.encode(audio, visual, mode), tokens)
        valid = need_predict[:, 1:] == 1
        if not bool(valid.any()):
            raise ValueError("need_predict: no position to predict (all zeros after the first column)")
        target = tokens[:, 1:][valid]
        if return_logits:
            logits = self.textual.output(hidden)
            return {"loss": label_smoothed_kl(logits[:, :-1][valid], target, self.cfg.label_smoothing),
                    "logits": logits}
        predicted = self.textual.output(hidden[:, :-1][valid])
        return {"loss": label_smoothed_kl(predicted, target, self.cfg.label_smoothing)}
