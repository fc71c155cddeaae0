"""A video diffusion transformer in the Open-Sora-Plan 1.2 shape, with a per-layer Attention Tile mask plan.

    latent video [B, C, T, H, W] -> 3D patches -> tokens in frame-major (t, h, w) order
    -> depth x [adaLN-single self-attention over all video tokens (3D RoPE), cross-attention to text, MLP]
    -> modulated norm + linear -> unpatchify -> flow-matching velocity [B, C, T, H, W]

The network knows nothing of noise schedules (flow.py) or training (train.py). `python model.py` prints the
presets and their parameter counts. The text side is either a small byte-level encoder trained with the model
(`text_encoder="bytes"`, the demo) or precomputed embeddings such as T5's (`text_encoder="none"`, OSP-1.2).
"""
import functools
import json
import math
import os
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

import parallel
from cli import UserError, atomic_output
from attention import (FLEX_RECOMPILE_LIMIT, FULL, backend_name, choose_backend, entry_num_ref, expand_plan,
                       flash_block_mask, kernel_dtype, tile_attention)


@dataclass
class ModelConfig:
    """What the weights mean (the architecture). How a model runs (its mask plan and attention backend) is chosen
    per run and lives on the DiT; checkpoints save both, the run settings beside the config."""
    in_channels: int = 4
    patch_size: tuple = (1, 2, 2)       # (t, h, w)
    hidden: int = 2304
    depth: int = 32
    heads: int = 24
    mlp_ratio: float = 4.0
    mlp_hidden: int = 0                 # > 0: the MLP's hidden width, overriding mlp_ratio (Wan's 8960 for 1536)
    qk_norm: str = "none"               # RMSNorm of self-attention's q and k: "none", "head" (each head) or
                                        # "across_heads" (one norm over all heads, as Wan)
    cross_qk_norm: bool = False         # RMSNorm of cross-attention's q and k over all heads (Wan)
    rope_float64: bool = False          # RoPE angles computed in float64, then cast (Wan); float32 otherwise
    max_frames: int = 0                 # > 0: add a learned absolute embedding per latent frame (up to this many)
    text_dim: int = 4096                # width of the text embeddings the model reads
    text_len: int = 512                 # max text tokens
    text_encoder: str = "none"          # "none": embeddings are given; "bytes": train a byte-level encoder
    text_encoder_depth: int = 2

    def __post_init__(self):
        self.patch_size = tuple(self.patch_size)
        if self.hidden % self.heads:
            raise UserError(f"hidden {self.hidden} is not divisible by heads {self.heads}")
        if self.text_encoder not in ("none", "bytes"):
            raise UserError(f"text_encoder must be 'none' or 'bytes', got {self.text_encoder!r}")
        self.qk_norm = {True: "head", False: "none"}.get(self.qk_norm, self.qk_norm)  # checkpoints saved a bool
        if self.qk_norm not in QK_NORMS:
            raise UserError(f"qk_norm {self.qk_norm!r}: use one of {', '.join(QK_NORMS)}")

    @property
    def head_dim(self):
        return self.hidden // self.heads

    @property
    def mlp_width(self):
        return self.mlp_hidden or int(self.hidden * self.mlp_ratio)

    @property
    def reads_captions(self) -> bool:
        """The one answer to which text a model reads: captions, through its own byte-level encoder (the demo), or
        precomputed embeddings (OSP-1.2, Wan: umT5 / mT5 outputs)."""
        return self.text_encoder == "bytes"


QK_NORMS = ("none", "head", "across_heads")
# Wan 2.1 / 2.2 (diffusers' WanTransformer3DModel): umT5-XXL embeddings, 512 text tokens, q/k RMSNorm over all heads
# in both attentions, 128-d heads, RoPE in float64; wan.py converts their diffusers folders to and from this model
WAN = dict(in_channels=16, patch_size=(1, 2, 2), text_dim=4096, text_len=512, qk_norm="across_heads",
           cross_qk_norm=True, rope_float64=True)
PRESETS = {
    "tiny": dict(in_channels=3, patch_size=(1, 4, 4), hidden=64, depth=2, heads=2, max_frames=16,
                 text_dim=64, text_len=48, text_encoder="bytes", text_encoder_depth=1, qk_norm="head"),
    "demo": dict(in_channels=3, patch_size=(1, 4, 4), hidden=256, depth=8, heads=4, mlp_ratio=2.5, max_frames=16,
                 text_dim=128, text_len=48, text_encoder="bytes", text_encoder_depth=1, qk_norm="head"),
    "osp12": dict(),  # the dataclass defaults are OSP-1.2: 32 x 2304 (24 heads x 96), patch 1x2x2, 4096-d text
    "wan2.1-1.3b": dict(WAN, hidden=1536, depth=30, heads=12, mlp_hidden=8960),
    "wan2.1-14b": dict(WAN, hidden=5120, depth=40, heads=40, mlp_hidden=13824),
    "wan2.2-5b": dict(WAN, in_channels=48, hidden=3072, depth=30, heads=24, mlp_hidden=14336),
    "wan-tiny": dict(WAN, hidden=64, depth=2, heads=4, mlp_hidden=96, text_dim=32),  # tests and the CPU
}


def model_config(preset: str = "demo", **overrides) -> ModelConfig:
    if preset not in PRESETS:
        raise UserError(f"unknown model preset {preset!r}; choose from {sorted(PRESETS)}")
    valid = {f.name for f in fields(ModelConfig)}
    unknown = set(overrides) - valid
    if unknown & set(RUN_SETTINGS):
        raise UserError(f"{sorted(unknown & set(RUN_SETTINGS))} are run settings, not model keys: a training config "
                        "sets `attn_backend:` and stage 3's `kd_plan:`")
    if unknown:
        raise UserError(f"unknown model keys {sorted(unknown)}; valid keys: {sorted(valid)}")
    return ModelConfig(**{**PRESETS[preset], **overrides})


RUN_SETTINGS = ("mask_plan", "attn_backend")  # how a model runs: saved beside its config, not in it


def split_config(saved: dict) -> tuple[dict, dict]:
    """A saved model config -> (the architecture, the run settings it carried: checkpoints written before
    2026-12-01 kept the mask plan and the attention backend inside the model config)."""
    arch = {k: v for k, v in saved.items() if k not in RUN_SETTINGS}
    return arch, {k: saved[k] for k in RUN_SETTINGS if k in saved}


# ----------------------------------------------------------------------------------------------------------
# Pieces

def modulate(x, shift, scale):
    return x * (1 + scale) + shift


TIME_FEATURES = 256  # sinusoidal features of the diffusion time, before the timestep MLP
BYTE_VOCAB = 256 + 2  # the byte-level text encoder's tokens: pad (0), start (1), then the 256 bytes


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal features of t in [0, 1] (scaled by 1000). t: [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_3d(grid, head_dim, device, theta=10000.0, dtype=torch.float32):
    """RoPE's tables (rope_tables) for tokens on a (T, H, W) grid, frame-major. The head dim is split over the
    three axes (time gets the remainder), each axis rotating its own pairs of channels; the angles are computed in
    `dtype` (Wan: float64)."""
    T, H, W = grid
    d_hw = (head_dim // 3) // 2 * 2
    dims = (head_dim - 2 * d_hw, d_hw, d_hw)
    pos = torch.stack(torch.meshgrid(*(torch.arange(n, device=device) for n in grid), indexing="ij"), -1)
    pos = pos.reshape(-1, 3).to(dtype)  # [N, 3]
    angles = []
    for axis, d in enumerate(dims):
        inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, device=device, dtype=dtype) / d)
        angles.append(pos[:, axis, None] * inv_freq[None])
    angles = torch.cat(angles, dim=-1)  # [N, head_dim/2]
    return rope_tables(angles.cos().float(), angles.sin().float())


def rope_tables(cos, sin):
    """cos, sin of each channel pair's angle [N, D / 2] -> the tables apply_rope reads, [N, D] (in their dtype:
    float32 from rope_3d): cos for both channels of a pair, sin signed (-, +) for its (first, second) channel."""
    return cos.repeat_interleave(2, -1), torch.stack([-sin, sin], -1).flatten(-2)


def apply_rope(x, cos, sin):
    """x: [B, N, H, D] (token-major, as the projections write it); cos, sin: rope_tables [N, D]. Rotates channel
    pairs (2i, 2i+1) by the token's angles: (x1 cos - x2 sin, x2 cos + x1 sin), computed as x cos + (x with each
    pair swapped) sin, which inductor compiles to contiguous loads (on one H200, osp12's q and k at 29 frames: 0.14
    ms a layer, against 0.21 for the same sums taken as two strided halves). Token-major in and out: the kernel
    reads and writes whole rows, and FA4 through FlexAttention, whose output takes q's layout, hands the output
    projection its input without a copy."""
    xf = x.float()
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return (xf * cos[:, None] + swapped * sin[:, None]).type_as(x)


class Attend(nn.Module):
    """The attention call of one self-attention layer, apart from its projections (diffusers' processors make the
    same cut): the Ulysses exchange, RoPE, the layer's Attention Tile mask on the chosen backend, and the observer
    that the mask search attaches. wan.TileAttnProcessor runs it inside a diffusers model, so the two share every
    line of it."""

    def __init__(self, backend: str = "auto"):
        super().__init__()
        self.backend = backend
        self.plan_entry = FULL  # this layer's mask: FULL or its number of reference frames (DiT.set_mask_plan)
        self.observer = None  # observer(q, k, v, out, num_frames): the mask search (eager: it keeps Python state)

    def attend(self, q, k, v, rope, num_frames, sp_group=None, block_mask=None):
        """q, k, v: [B, n, H, Dh], this rank's n tokens (all N without sequence parallelism) -> ([B, n, H * Dh],
        the attention output [B, H, N, Dh]: this rank's heads, every token, what layer-wise distillation compares).
        block_mask: this layer's FA4 BlockMask where DiT.block_masks made one."""
        N = rope[0].shape[0]  # real tokens: the sequence-parallel shards may carry padding
        if sp_group is not None:  # my tokens x all heads -> all tokens x my heads, q, k, v in one exchange
            q, k, v = parallel.seq_to_heads(torch.stack([q, k, v], 2), sp_group)[:, :N].unbind(2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = (rearrange(x, "b n h d -> b h n d") for x in (q, k, v))  # views: the tensors stay token-major
        o = tile_attention(q, k, v, num_frames, entry_num_ref(self.plan_entry, num_frames), self.backend, block_mask)
        if self.observer is not None:
            self.observer(q, k, v, o, num_frames)
        out = rearrange(o, "b h n d -> b n h d")
        if sp_group is not None:  # and back, padding restored so that every rank gets an equal shard
            out = parallel.heads_to_seq(F.pad(out, (0, 0, 0, 0, 0, -N % parallel.group_size(sp_group))), sp_group)
        return out.flatten(2), o


def qk_norm(kind: str, cfg: ModelConfig) -> nn.Module:
    """RMSNorm of q or k ([B, n, hidden]): over each head ("head"), over all heads at once ("across_heads"), or none.
    Both run before the Ulysses exchange, where every rank holds its tokens' heads whole."""
    if kind == "across_heads":
        return nn.RMSNorm(cfg.hidden, eps=1e-6)
    return HeadRMSNorm(cfg.heads, cfg.head_dim) if kind == "head" else nn.Identity()


class HeadRMSNorm(nn.RMSNorm):
    def __init__(self, heads: int, head_dim: int):
        super().__init__(head_dim, eps=1e-6)
        self.heads = heads

    def forward(self, x):
        return super().forward(x.unflatten(-1, (self.heads, -1))).flatten(-2)


class SelfAttention(Attend):
    """q, k, v projections (one matmul) and q/k norms, then the attend step, then the output projection.
    -> (output, the attention output before the projection: Attend.attend's)"""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden)
        self.q_norm, self.k_norm = qk_norm(cfg.qk_norm, cfg), qk_norm(cfg.qk_norm, cfg)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)

    def forward(self, x, rope, num_frames, sp_group=None, block_mask=None):
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # [B, n, hidden] each
        q, k, v = (y.unflatten(-1, (self.heads, -1)) for y in (self.q_norm(q), self.k_norm(k), v))  # [B, n, H, Dh]
        out, o = self.attend(q, k, v, rope, num_frames, sp_group, block_mask)
        return self.proj(out), o


class CrossAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q = nn.Linear(cfg.hidden, cfg.hidden)
        self.kv = nn.Linear(cfg.hidden, 2 * cfg.hidden)
        norm = "across_heads" if cfg.cross_qk_norm else "none"
        self.q_norm, self.k_norm = qk_norm(norm, cfg), qk_norm(norm, cfg)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)

    def forward(self, x, context, context_mask):
        k, v = self.kv(context).chunk(2, dim=-1)
        q = rearrange(self.q_norm(self.q(x)), "b n (h d) -> b h n d", h=self.heads)
        k, v = (rearrange(y, "b l (h d) -> b h l d", h=self.heads) for y in (self.k_norm(k), v))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=context_mask[:, None, None, :])
        return self.proj(rearrange(o, "b h n d -> b n (h d)"))


@functools.lru_cache(maxsize=1)
def _attention_ops() -> frozenset:
    """The attention kernels' ops (SDPA's and FlexAttention's, FA4 included): their outputs are the attention
    output and the log-sum-exp that the backward kernel reads."""
    aten = torch.ops.aten
    return frozenset({aten._scaled_dot_product_flash_attention.default,
                      aten._scaled_dot_product_cudnn_attention.default,
                      aten._scaled_dot_product_efficient_attention.default,
                      aten._scaled_dot_product_flash_attention_for_cpu.default, torch.ops.higher_order.flex_attention})


@functools.lru_cache(maxsize=1)
def _attention_and_matmul_ops() -> frozenset:
    """The attention kernels and the matmuls (nn.Linear under autograd: addmm with a bias, mm without, bmm)."""
    aten = torch.ops.aten
    return _attention_ops() | {aten.mm.default, aten.addmm.default, aten.bmm.default}


def _keeper(ops):
    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in ops() else CheckpointPolicy.PREFER_RECOMPUTE
    return functools.partial(create_selective_checkpoint_contexts, policy)


# Activation checkpointing of a block (Block.checkpoint_policy): what its backward may keep of the forward.
# full: the block's input alone, everything else is recomputed (the attention kernels' forward too);
# save_attention: also every attention output and its log-sum-exp (selective checkpointing, torch's policy API), so
# the attention forward runs once and only the cheap rest (norms, modulation, RoPE, projections, MLP) is recomputed
# (osp12 at 29 frames: 4.8 GiB more than full; fits an 80 GB card);
# save_matmuls: also every matmul's output, so only what runs between them (norms, modulation, RoPE, GELU, gates)
# is recomputed: no FLOP counted twice, for ~1.3 GiB more per osp12 layer at 29 frames (a 141 GB card's policy).
CHECKPOINT_POLICIES = {"full": None, "save_attention": _keeper(_attention_ops),
                       "save_matmuls": _keeper(_attention_and_matmul_ops)}


class MLP(nn.Sequential):
    """Linear -> GELU (tanh) -> Linear. Sampling on a GPU runs the first Linear and its GELU as one cuBLASLt call
    (the GELU in the matmul's epilogue, as torch's CUDA addmm offers it, in tanh form), so the wide hidden
    activation is written once, not written, read and written again (osp12, 29 frames: the GELU kernel took 11.8 of
    the 53 ms outside matmuls and attention; fused, the forward is 8 ms faster, BENCHMARKS.md). Training keeps the
    two ops (the fused op has no backward); a CPU's version of the op computes the exact GELU, so CPUs keep them too,
    and so does a float8 layer (DiT.use_fp8), which the op would bypass."""

    def __init__(self, dim: int, width: int):
        super().__init__(nn.Linear(dim, width), nn.GELU(approximate="tanh"), nn.Linear(width, dim))

    def forward(self, x):
        fc1, _, fc2 = self
        plain = type(fc1) is nn.Linear and type(fc1.weight) in (torch.Tensor, nn.Parameter)  # not a float8 one
        if (plain and x.is_cuda and not torch.is_grad_enabled() and x.dtype == fc1.weight.dtype
                and not torch.is_autocast_enabled(x.device.type)):
            h = torch._addmm_activation(fc1.bias, x.flatten(0, -2), fc1.weight.t(), use_gelu=True)
            return fc2(h.unflatten(0, x.shape[:-1]))
        return super().forward(x)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D = cfg.hidden
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(cfg)
        self.norm_cross = nn.LayerNorm(D, eps=1e-6)
        self.cross = CrossAttention(cfg)
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(D, cfg.mlp_width)
        self.scale_shift_table = nn.Parameter(torch.zeros(6, D))  # adaLN-single: per-block offsets
        self.checkpoint_policy = None  # a key of CHECKPOINT_POLICIES: recompute in training (DiT.set_checkpointing)

    def forward(self, *args):
        """(x, t_mod, context, context_mask, rope, num_frames, sp_group, block_mask) -> (x, the self-attention
        output: SelfAttention's, which layer-wise distillation records). The checkpoint sits inside the block, so a
        compiled block compiles its policy with it and FSDP gathers the weights outside it. The attention output
        is returned, not handed to an observer: a side effect inside a compiled checkpoint breaks its graph, and
        appending to one list from every layer made dynamo guard on the list's length, compiling the block once
        per layer until its recompile limit (8) left the rest eager."""
        if self.checkpoint_policy is None or not torch.is_grad_enabled():
            return self.body(*args)
        context_fn = CHECKPOINT_POLICIES[self.checkpoint_policy]
        return checkpoint(self.body, *args, use_reentrant=False, **({"context_fn": context_fn} if context_fn else {}))

    def body(self, x, t_mod, context, context_mask, rope, num_frames, sp_group=None, block_mask=None):
        # t_mod: [B, 6, D] shared by all blocks; the table makes it block specific
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = (self.scale_shift_table[None] + t_mod).unbind(1)
        a, o = self.attn(modulate(self.norm1(x), shift_a[:, None], scale_a[:, None]), rope, num_frames, sp_group,
                         block_mask)
        x = x + gate_a[:, None] * a
        x = x + self.cross(self.norm_cross(x), context, context_mask)
        x = x + gate_m[:, None] * self.mlp(modulate(self.norm2(x), shift_m[:, None], scale_m[:, None]))
        return x, o


PERSISTENT_ROW_MAX = 4096  # the widest row reduction compiled blocks keep in registers (inductor's own limit: 1,024)


def widen_persistent_reductions():
    """Let inductor's Triton code keep a row reduction of up to PERSISTENT_ROW_MAX elements in registers (a
    "persistent" reduction) instead of looping over the row twice, once for its statistics and once to normalise:
    its own limit is 1,024 for reductions it hints INNER and 64 for the rest, below the blocks' hidden-width norms
    (osp12's rows are 2,304 wide; Wan's 1,536 (1.3B), 3,072 (5B) and 5,120 (14B: left as it is)). Widened for the
    hints INNER and DEFAULT, not OUTER (columns). DEFAULT is inductor's hint for a reduction over many rows (64 or
    more per SM: every norm of a video's tokens) that its coalescing scores did not make INNER; among the blocks'
    norms that is the cross-attention's input norm, which reads the gate as a broadcast. On one H200, osp12's
    forward at 29 frames under a ~55% plan spent 42.0 -> 35.3 ms in kernels outside attention and matmuls with
    INNER alone, then 33.3 -> 29.7 ms with DEFAULT too (RoPE token-major in both: apply_rope; BENCHMARKS.md). Off
    where inductor's persistent reductions are (its config switch). Installed through inductor's seam for its
    heuristics (V.set_choices_handler: for this thread, from the next compilation on); heuristics someone else
    installed are left alone. Inductor's graph cache does not key on it: a block cached before runs as it was
    compiled."""
    from torch._inductor import config
    from torch._inductor.choices import InductorChoices
    from torch._inductor.runtime.hints import ReductionHint
    from torch._inductor.virtualized import V

    class WideRows(InductorChoices):
        @staticmethod
        def should_use_persistent_reduction(features, cooperative_reduction, *args, **kwargs):
            n = features.reduction_numel
            if (config.triton.persistent_reductions and not cooperative_reduction
                    and features.get_reduction_hint() in (ReductionHint.INNER, ReductionHint.DEFAULT)
                    and getattr(n, "is_number", False) and int(n) <= PERSISTENT_ROW_MAX):
                return True
            return InductorChoices.should_use_persistent_reduction(features, cooperative_reduction, *args, **kwargs)

    if type(V.choices) is InductorChoices:
        V.set_choices_handler(WideRows())


class ByteTextEncoder(nn.Module):
    """Captions as UTF-8 bytes -> a small transformer. Token 0 pads, 1 starts every caption (so the empty
    caption, used for classifier-free guidance, is one BOS token and never an all-masked row)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed = nn.Embedding(BYTE_VOCAB, cfg.text_dim)
        self.pos = nn.Parameter(torch.zeros(cfg.text_len, cfg.text_dim))
        layer = nn.TransformerEncoderLayer(cfg.text_dim, max(1, cfg.text_dim // 64), 4 * cfg.text_dim,
                                           dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, cfg.text_encoder_depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.text_dim)

    def forward(self, ids, mask):
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        return self.norm(self.layers(x, src_key_padding_mask=~mask))


def tokenize(prompts: list[str], text_len: int):
    """Byte tokens: ids [B, text_len] (long), mask [B, text_len] (bool)."""
    ids = torch.zeros(len(prompts), text_len, dtype=torch.long)
    for i, p in enumerate(prompts):
        b = list(p.encode("utf-8"))
        if len(b) + 1 > text_len:
            raise UserError(f"prompt is {len(b)} bytes; this model reads at most {text_len - 1}: {p[:40]!r}...")
        ids[i, : len(b) + 1] = torch.tensor([1] + [c + 2 for c in b])
    return ids, ids > 0


# ----------------------------------------------------------------------------------------------------------
# The model

def check_fp8(device: torch.device):
    """A one-line error unless `device` runs float8 matmuls (a GPU of sm89 or newer: Ada, Hopper, Blackwell)."""
    device = torch.device(device)
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        raise UserError(f"fp8 needs a GPU with float8 matmuls (sm89 or newer), not {device}")


class DiT(nn.Module):
    """The network of cfg, run with a mask plan (one Attention Tile entry per layer, attention.expand_plan) on an
    attention backend (attention.BACKENDS); both can change at any time (set_mask_plan, set_attn_backend)."""

    def __init__(self, cfg: ModelConfig, mask_plan=FULL, attn_backend: str = "auto"):
        super().__init__()
        self.cfg = cfg
        D, pt, ph, pw = cfg.hidden, *cfg.patch_size
        self.patch_dim = cfg.in_channels * pt * ph * pw
        self.patch_embed = nn.Linear(self.patch_dim, D)
        # optional: RoPE is relative; an absolute frame index makes "which frame comes first" a per-token fact
        self.frame_embed = nn.Parameter(torch.zeros(cfg.max_frames, D)) if cfg.max_frames else None
        self.t_embed = nn.Sequential(nn.Linear(TIME_FEATURES, D), nn.SiLU(), nn.Linear(D, D))
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))  # adaLN-single
        self.text_encoder = ByteTextEncoder(cfg) if cfg.text_encoder == "bytes" else None
        self.text_proj = nn.Sequential(nn.Linear(cfg.text_dim, D), nn.GELU(approximate="tanh"), nn.Linear(D, D))
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.norm_out = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.out_table = nn.Parameter(torch.zeros(2, D))
        self.out = nn.Linear(D, self.patch_dim)
        self._rope_cache = {}
        self.sp_group = None  # set by enable_sequence_parallel
        self.recorder = None  # recorder(attention output [B, H, N, Dh]) after each layer (distill.AttentionRecorder)
        self.initialize_weights()
        self.set_mask_plan(mask_plan)
        self.set_attn_backend(attn_backend)

    def initialize_weights(self):
        """All init in one place: xavier linears, zeroed output layer and cross-attention outputs (each
        block starts close to the identity), small random adaLN tables."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.t_embed[0].weight, std=0.02)
        nn.init.normal_(self.t_embed[2].weight, std=0.02)
        nn.init.normal_(self.t_block[1].weight, std=0.02)
        for b in self.blocks:
            nn.init.normal_(b.scale_shift_table, std=self.cfg.hidden ** -0.5)
            nn.init.zeros_(b.cross.proj.weight)
        nn.init.normal_(self.out_table, std=self.cfg.hidden ** -0.5)
        if self.frame_embed is not None:
            nn.init.normal_(self.frame_embed, std=0.02)
        nn.init.zeros_(self.out.weight)
        if self.text_encoder is not None:
            nn.init.normal_(self.text_encoder.embed.weight, std=0.02)
            nn.init.normal_(self.text_encoder.pos, std=0.02)

    def set_mask_plan(self, plan):
        """Give each layer its Attention Tile entry (attention.expand_plan). The model runs unchanged on any plan."""
        self.mask_plan = expand_plan(plan, self.cfg.depth)
        for block, entry in zip(self.blocks, self.mask_plan, strict=True):
            block.attn.plan_entry = entry

    def set_attn_backend(self, backend: str):
        """Run every self-attention layer on `backend` (attention.BACKENDS)."""
        self.attn_backend = backend_name(backend)
        for block in self.blocks:
            block.attn.backend = self.attn_backend

    def set_checkpointing(self, policy: str | None):
        """Activation checkpointing of every block in training: a key of CHECKPOINT_POLICIES, or None (keep all)."""
        if policy is not None and policy not in CHECKPOINT_POLICIES:
            raise UserError(f"checkpoint policy {policy!r}: choose one of {', '.join(CHECKPOINT_POLICIES)}")
        for block in self.blocks:
            block.checkpoint_policy = policy

    def set_observers(self, observers):
        """Attach one observer per self-attention layer (model.Attend.observer: the mask search reads q, k, v and
        each layer's output through it), or detach them all with None."""
        for block, observer in zip(self.blocks, observers or [None] * len(self.blocks), strict=True):
            block.attn.observer = observer

    def run_settings(self) -> dict:
        """What a checkpoint saves beside the config so that it samples as it was trained: the plan and backend."""
        return {"mask_plan": list(self.mask_plan), "attn_backend": self.attn_backend}

    def compile_blocks(self):
        """Regional compilation: each transformer block is compiled on its own (nn.Module.compile, dynamic=False),
        and the identical blocks share one graph per mask entry, so the model compiles in the time of one block.
        The patch embedding, timestep MLP and output layer stay eager (a few small kernels per forward). Weights
        keep their names (no `_orig_mod.`), so saving needs no unwrapping. A graph per mask entry, grad mode and
        shape: dynamo's recompile limit (8 per function) is raised as for FlexAttention, since past it the blocks
        would quietly run eager (a searched plan at Wan's 21 frames may hold more than 8 entries). The norms compile
        as persistent reductions (widen_persistent_reductions). -> self"""
        import torch._dynamo
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, FLEX_RECOMPILE_LIMIT)
        widen_persistent_reductions()
        for block in self.blocks:
            if getattr(block, "_compiled_call_impl", None) is None:
                block.compile(dynamic=False)
        return self

    def use_fp8(self):
        """Sampling with every block's Linear layers in float8 (torchao: e4m3 weights and activations, a scale per
        row computed on the fly), in place and inference only. On one H200 the osp12 forward at 29 frames under a
        ~55% plan fell from 462 to 369 ms, the matmuls from 187 to 91 ms, and the demo's judge stayed within its
        seed-to-seed noise (BENCHMARKS.md). Needs torchao and a GPU with float8 matmuls (sm89+: Ada, Hopper,
        Blackwell), the model in bf16. Compile the blocks afterwards (compile_blocks), as torchao's float8 recipes
        expect: the figures above are compiled. -> self"""
        weight = self.blocks[0].mlp[0].weight
        check_fp8(weight.device)
        if weight.dtype != torch.bfloat16:
            raise UserError(f"fp8 quantises a bf16 model; this one is {weight.dtype} (load it in bf16)")
        try:
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
        except ImportError:
            raise UserError("fp8 needs torchao: pip install -r requirements.txt") from None
        quantize_(self.blocks, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
        return self

    def block_masks(self, grid, x) -> list:
        """Each layer's FA4 BlockMask where the flash backend will run a sparse layer on this input, else None.
        Made here, eagerly (cached per shape), so that a compiled block takes its mask as an input: a lookup
        inside would break the block's graph, and a graph break inside an activation checkpoint leaves the policy
        blind to the FA4 kernel (its forward then runs again)."""
        masks = [None] * len(self.blocks)
        dtype = kernel_dtype(self.patch_embed.weight.dtype, x.is_cuda)
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        if choose_backend(self.attn_backend, str(x.device), str(dtype), self.cfg.head_dim, needs_grad) != "flash":
            return masks
        T, S = grid[0], grid[1] * grid[2]
        for i, entry in enumerate(self.mask_plan):
            num_ref = entry_num_ref(entry, T)
            if num_ref < T:
                masks[i] = flash_block_mask(T, S, num_ref, x.device, self.cfg.head_dim, needs_grad)
        return masks

    def enable_sequence_parallel(self, group):
        """Shard the token sequence over `group` (Ulysses, parallel.py); None turns it off."""
        if group is not None:
            parallel.check_heads(self.cfg.heads, parallel.group_size(group))
        self.sp_group = group

    def tokenize(self, prompts: list[str]):
        return tokenize(prompts, self.cfg.text_len)

    def text_input(self, batch: dict):
        """What this model reads of a collated batch: its captions as byte ids, or its precomputed embeddings.
        -> (text, mask)"""
        if self.cfg.reads_captions:
            return self.tokenize(batch["caption"])
        return batch["text_emb"].float(), batch["text_mask"].bool()

    def encode_text(self, text, text_mask):
        """Byte ids [B, L] (byte encoder) or embeddings [B, L, text_dim] -> context [B, L, hidden], mask."""
        if self.text_encoder is not None:
            text = self.text_encoder(text, text_mask)
        return self.text_proj(text), text_mask

    def rope(self, grid, device):
        key = (grid, str(device))
        if key not in self._rope_cache:
            dtype = torch.float64 if self.cfg.rope_float64 else torch.float32
            with torch.inference_mode(False):  # cached: made while sampling, still usable in training
                self._rope_cache[key] = rope_3d(grid, self.cfg.head_dim, device, dtype=dtype)
        return self._rope_cache[key]

    def forward(self, x, t, text, text_mask, encoded: bool = False):
        """x: [B, C, T, H, W] noisy latents, t: [B] in [0, 1], text: ids, embeddings or (encoded=True) the
        output of encode_text; text_mask: [B, L] bool. Returns the velocity, shaped like x."""
        B, C, T, H, W = x.shape
        pt, ph, pw = self.cfg.patch_size
        if C != self.cfg.in_channels or T % pt or H % ph or W % pw:
            raise UserError(f"input {tuple(x.shape)} does not fit {C=} patches {self.cfg.patch_size}")
        grid = (T // pt, H // ph, W // pw)
        context, context_mask = (text, text_mask) if encoded else self.encode_text(text, text_mask)

        x = rearrange(x, "b c (t pt) (h ph) (w pw) -> b (t h w) (c pt ph pw)", pt=pt, ph=ph, pw=pw)
        x = self.patch_embed(x)  # [B, N, D], frame-major tokens
        if self.frame_embed is not None:
            if grid[0] > self.cfg.max_frames:
                raise UserError(f"{grid[0]} latent frames, but this model embeds at most {self.cfg.max_frames}")
            x = (x.unflatten(1, (grid[0], -1)) + self.frame_embed[: grid[0], None]).flatten(1, 2)
        N = x.shape[1]
        if self.sp_group is not None:
            x = parallel.shard_seq(x, self.sp_group)  # [B, ceil(N/P), D]: this rank's tokens (padded)
        t_emb = self.t_embed(timestep_embedding(t, TIME_FEATURES).to(x.dtype))  # [B, D]
        t_mod = self.t_block(t_emb).unflatten(1, (6, -1))  # [B, 6, D]
        rope = self.rope(grid, x.device)
        masks = self.block_masks(grid, x)
        for block, block_mask in zip(self.blocks, masks, strict=True):
            x, o = block(x, t_mod, context, context_mask, rope, grid[0], self.sp_group, block_mask)
            if self.recorder is not None:  # layer-wise distillation (distill.AttentionRecorder)
                self.recorder(o)
        shift, scale = (self.out_table[None] + t_emb[:, None]).unbind(1)
        x = self.out(modulate(self.norm_out(x), shift[:, None], scale[:, None]))  # [B, N, patch_dim]
        if self.sp_group is not None:
            x = parallel.gather_seq(x, self.sp_group)[:, :N]
        return rearrange(x, "b (t h w) (c pt ph pw) -> b c (t pt) (h ph) (w pw)",
                         t=grid[0], h=grid[1], w=grid[2], pt=pt, ph=ph, pw=pw)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def config_dict(cfg: ModelConfig) -> dict:
    d = asdict(cfg)
    d["patch_size"] = list(cfg.patch_size)
    return d


# ----------------------------------------------------------------------------------------------------------
# Weights on disk: safetensors with the resolved config (and anything else the caller adds) in the metadata

def save_model(path: str, model: "DiT", meta: dict | None = None, dtype=None):
    """Atomically write a model's weights, its config and run settings (mask plan, backend) and `meta`; meta values
    are JSON-encoded into safetensors' string metadata."""
    from safetensors.torch import save_file
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous().cpu()
               for k, v in model.state_dict().items()}
    metadata = {"model_config": json.dumps(config_dict(model.cfg))}
    metadata.update({k: json.dumps(v) for k, v in {**(meta or {}), **model.run_settings()}.items()})
    with atomic_output(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def read_metadata(path: str) -> dict:
    """A checkpoint's metadata (model_config, kind, sampler, ...), read from its header alone. path: one of our
    .safetensors files, or a diffusers Wan transformer (or pipeline) folder (wan.py)."""
    from safetensors import safe_open
    if os.path.isdir(path):
        import wan
        return wan.read_metadata(path)
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path!r}: give the path of a .safetensors file or a diffusers Wan folder")
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise UserError(f"{path!r} is not a readable safetensors checkpoint: {str(e).splitlines()[0]}") from None
    if "model_config" not in meta:
        raise UserError(f"{path!r} has no model_config in its metadata: not a checkpoint of this project")
    return normalize_metadata({k: json.loads(v) for k, v in meta.items()})


OLD_BACKENDS = {"tile": "gather", "flex": "auto"}  # what checkpoints of the first sessions named them


def normalize_metadata(meta: dict) -> dict:
    """A checkpoint's metadata with the architecture alone under model_config and the run settings beside it
    (moved out of the config for checkpoints written before 2026-12-01), backends under today's names: the one
    place old metadata is read into today's form."""
    arch, run = split_config(meta["model_config"])
    meta = {**run, **meta, "model_config": arch}
    if "attn_backend" in meta:
        meta["attn_backend"] = OLD_BACKENDS.get(meta["attn_backend"], meta["attn_backend"])
    return meta


def load_model(path: str, device="cpu", dtype=torch.float32):
    """-> (DiT in eval mode, metadata dict), under the mask plan and backend saved beside its config. path: one of our
    .safetensors checkpoints, or a diffusers Wan transformer (or pipeline) folder, converted on the way in (wan.py)."""
    if os.path.isdir(path):
        import wan
        return wan.load_diffusers(path, device, dtype)
    meta = read_metadata(path)
    return model_from_weights(meta, load_safetensors(path), path, device, dtype), meta


def load_model_in(path: str, device, precision: str):
    """load_model for sampling in one of cli.PRECISIONS: fp32 or bf16 weights, or bf16 with the blocks' Linear
    layers in float8 (DiT.use_fp8)."""
    model, meta = load_model(path, device, torch.float32 if precision == "fp32" else torch.bfloat16)
    if precision == "fp8":
        model.use_fp8()
    return model, meta


def load_safetensors(path: str) -> dict:
    """All tensors of a safetensors file; a truncated or corrupt one is one line (its header can read fine while
    its tensors do not)."""
    from safetensors.torch import load_file
    try:
        return load_file(path)
    except Exception as e:  # noqa: BLE001 - safetensors' own errors
        raise UserError(f"{path!r} is truncated or corrupt: {str(e).splitlines()[0]}") from None


def model_from_weights(meta: dict, weights: dict, where: str, device="cpu", dtype=torch.float32):
    """The DiT that a checkpoint's metadata describes (its config and run settings) holding exactly `weights` (our
    names): built on the meta device, so no memory or time goes to a random init that the weights replace. A
    missing, extra or misshapen tensor is a one-line error."""
    with torch.device("meta"):
        model = DiT(ModelConfig(**meta["model_config"]), meta.get("mask_plan", FULL), meta.get("attn_backend", "auto"))
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise UserError(f"{where!r} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    wrong = [f"{k} {tuple(weights[k].shape)} (the config needs {tuple(v.shape)})" for k, v in expected.items()
             if weights[k].shape != v.shape]
    if wrong:
        raise UserError(f"{where!r} does not match its config: {wrong[0]}" + (f" and {len(wrong) - 1} more" if len(wrong) > 1 else ""))
    model.load_state_dict(weights, assign=True)
    return model.to(device=device, dtype=dtype or torch.float32).eval()  # the stored dtype (bf16) never leaks through


if __name__ == "__main__":
    for name in PRESETS:
        with torch.device("meta"):
            m = DiT(model_config(name))
        print(f"{name:12s} {num_params(m) / 1e6:9.2f} M parameters")
