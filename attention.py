"""Attention Tile: the k:(T-k) sparse 3D attention of Efficient-vDiT (arXiv 2502.06155), as FlexAttention,
and mask plans (one entry per layer).

Video tokens are frame-major: T frames of S tokens, N = T*S. The mask "k:(T-k)" keeps k evenly spaced
reference frames R = {round(i*T/k)}; a query in frame fq sees a key in frame fk iff fq == fk, fk in R or fq in R.
k = T is full attention. In code, k is `num_ref` (the number of reference frames).

    tile_dense_mask   the reference definition, a bool [N, N] (tests and plots only)
    tile_block_mask   the same mask as a FlexAttention BlockMask, built from the frame structure (no N x N tensor)
    tile_attention    one self-attention call: dense SDPA when the mask is full, else the chosen sparse backend

Plans: a plan entry is FULL or num_ref (text "k:(T-k)" is read too); parse_entry, expand_plan (one entry per
layer), load_plan / save_plan (YAML), mask_label, density, plan_sparsity and plan_for_sparsity are the whole API.

Backends (all exact, tested against SDPA with the dense mask):
    "flash"   compiled flex_attention on FlashAttention-4 (kernel_options={"BACKEND": "FLASH"}): the cached
              BlockMask for sparse layers (at FA4's own forward tile where no gradient is needed,
              flash_block_size), no mask for full layers; forward and backward. Needs flash-attn-4
              (requirements-gpu.txt), a Hopper or Blackwell GPU and fp16/bf16.
    "gather"  the mask rewritten as two dense calls: reference-frame queries over all keys, every other
              frame over its own keys plus the reference keys (gathered per frame), batched over frames
    "merge"   the same split without the per-frame gather: every other frame attends to its own keys (frames
              folded into the batch) and, in one call, to the reference keys; the two partial softmaxes are
              merged by their log-sum-exps. No backward (the lse carries no gradient).
    "auto"    (the default) "flash" wherever it runs; elsewhere "merge" when no gradient is needed and a kernel
              returns the log-sum-exp (CPU; fp16/bf16 on sm80+ GPUs), "gather" otherwise (training, fp32 on a
              GPU). BENCHMARKS.md has the timings.
The dense calls (full layers, and the rewrites' calls) run on the fastest dense kernel there is (dense_attention):
FA4 without a mask where it runs, else SDPA, cuDNN first.

Not here: the mask search (distill.py) and sequence parallelism (parallel.py).
"""
import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, flex_attention

from cli import UserError, atomic_output, warn

BLOCK_SIZE = 128  # FlexAttention's sparse block (query and key side)
FULL = "full"
BACKENDS = ("auto", "flash", "gather", "merge")


# ----------------------------------------------------------------------------------------------------------
# The mask and mask plans

def reference_frames(num_frames: int, num_ref: int) -> list[int]:
    """R = {round(i*T/k) : i < k}, evenly spaced (Python round)."""
    if not 1 <= num_ref <= num_frames:
        raise ValueError(f"num_ref must be in 1..{num_frames} for {num_frames} frames, got {num_ref}")
    return sorted({round(i * num_frames / num_ref) for i in range(num_ref)})


def parse_entry(entry):
    """A plan entry as written ("full", an int k, or "k:(T-k)" text like "1:7") -> FULL or num_ref (an int >= 1)."""
    if entry is None or entry == FULL:
        return FULL
    if isinstance(entry, str):
        head = entry.split(":")[0].strip()
        if ":" not in entry or not head.isdigit():
            raise UserError(f"mask entry {entry!r}: expected 'full', an int k, or 'k:(T-k)' like '1:7'")
        entry = int(head)
    if isinstance(entry, bool) or not isinstance(entry, int) or entry < 1:
        raise UserError(f"mask entry {entry!r}: k must be a positive int (or 'full')")
    return entry


def entry_num_ref(entry, num_frames: int) -> int:
    """A parsed entry's reference-frame count at T frames: T for FULL, k clipped to T (so k >= T is full)."""
    return num_frames if entry == FULL else min(entry, num_frames)


def mask_label(entry, num_frames: int) -> str:
    """A parsed entry as text: "full" or "k:(T-k)"."""
    k = entry_num_ref(entry, num_frames)
    return FULL if entry == FULL else f"{k}:{num_frames - k}"


def expand_plan(plan, depth: int) -> list:
    """A mask plan (a list with one entry per layer or one for all layers, a single entry, or the path of a YAML
    plan file) -> one parsed entry per layer."""
    if isinstance(plan, str) and plan.endswith((".yaml", ".yml")):
        plan = load_plan(plan)
    if plan is None or isinstance(plan, (str, int)):
        plan = [plan]
    plan = [parse_entry(e) for e in plan]
    if len(plan) == 1:
        plan = plan * depth
    if len(plan) != depth:
        raise UserError(f"mask plan has {len(plan)} entries for {depth} layers")
    return plan


def load_plan(path: str) -> list:
    """A mask plan from a YAML file with a `plan:` list (stage 2 writes one), e.g. `plan: [full, 2, 1, full]`."""
    import yaml
    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
    except OSError as e:
        raise UserError(f"mask plan {path!r} cannot be read ({e.strerror}): run stage 2 or give another plan") from None
    except yaml.YAMLError as e:
        raise UserError(f"mask plan {path!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("plan"), list):
        raise UserError(f"{path!r} has no `plan:` list")
    return doc["plan"]


def save_plan(path: str, plan: list, num_frames: int, header: dict | None = None, layers: list | None = None):
    """Write a plan file that load_plan reads: `header` keys, T, the mean sparsity at T, `plan:`, and per-layer
    `layers:` rows if given (stage 2's errors). -> the mean sparsity."""
    import yaml
    sparsity = plan_sparsity(plan, num_frames)
    doc = {**(header or {}), "num_frames": num_frames, "mean_sparsity": round(sparsity, 4), "plan": list(plan)}
    if layers is not None:
        doc["layers"] = layers
    with atomic_output(path) as tmp, open(tmp, "w") as f:
        yaml.safe_dump(doc, f, sort_keys=False)
    return sparsity


def frame_mask(num_frames: int, num_ref: int, device=None) -> torch.Tensor:
    """bool [T, T]: which frame tiles are kept."""
    ref = torch.zeros(num_frames, dtype=torch.bool, device=device)
    ref[reference_frames(num_frames, num_ref)] = True
    same = torch.eye(num_frames, dtype=torch.bool, device=device)
    return same | ref[None, :] | ref[:, None]


def density(num_frames: int, num_ref: int) -> float:
    """Fraction of kept frame tiles: (2kT - k^2 + T - k) / T^2."""
    return frame_mask(num_frames, num_ref).float().mean().item()


def plan_sparsity(plan, num_frames: int) -> float:
    """Mean frame-tile sparsity of a plan (one entry per layer) at T frames."""
    return 1 - sum(density(num_frames, entry_num_ref(parse_entry(e), num_frames)) for e in plan) / len(plan)


def plan_for_sparsity(num_frames: int, depth: int, target: float) -> tuple[list, float]:
    """A plan of mean sparsity ~target (benchmarks): the layers split between the two adjacent num_ref that
    bracket it. -> (plan, its sparsity)."""
    T = num_frames
    sp = {k: 1 - density(T, k) for k in range(1, T + 1)}  # decreasing in k
    hi = max((k for k in sp if sp[k] >= target), default=1)  # sparsest side
    lo = min(hi + 1, T)
    frac = 1.0 if sp[hi] == sp[lo] else (target - sp[lo]) / (sp[hi] - sp[lo])  # share of layers at `hi`
    n_hi = round(min(max(frac, 0.0), 1.0) * depth)
    plan = [hi] * n_hi + [lo] * (depth - n_hi)
    return plan, plan_sparsity(plan, T)


def tile_dense_mask(num_frames: int, tokens_per_frame: int, num_ref: int, device=None) -> torch.Tensor:
    """The reference definition: bool [N, N], True where a query (row) may attend to a key (column)."""
    tiles = frame_mask(num_frames, num_ref, device)
    return tiles.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)


def tile_mask_mod(num_frames: int, tokens_per_frame: int, num_ref: int, device=None):
    """The mask as a FlexAttention mask_mod closure, attention-gym style."""
    ref = torch.zeros(num_frames, dtype=torch.bool, device=device)
    ref[reference_frames(num_frames, num_ref)] = True
    S = tokens_per_frame

    def attention_tile(b, h, q_idx, kv_idx):
        fq, fk = q_idx // S, kv_idx // S
        return (fq == fk) | ref[fk] | ref[fq]

    return attention_tile


# ----------------------------------------------------------------------------------------------------------
# BlockMask from the frame structure

@lru_cache(maxsize=64)
@torch.inference_mode(False)  # cached: made under sampling's inference mode, still usable in training
def _tile_block_mask(T: int, S: int, k: int, device: str, block_size: tuple[int, int]) -> BlockMask:
    N = T * S
    tiles = frame_mask(T, k, device).float()  # [T, T]
    frames = torch.arange(T, device=device)

    def incidence(size):  # -> [blocks, T]: block b (tokens [b*size, min((b+1)*size, N))) touches frame f
        start = torch.arange(-(-N // size), device=device) * size
        first, last = start // S, (torch.clamp(start + size, max=N) - 1) // S
        return ((frames[None] >= first[:, None]) & (frames[None] <= last[:, None])).float()

    def ragged(size):  # the last block holds padding: let mask_mod see it
        r = torch.zeros(-(-N // size), dtype=torch.bool, device=device)
        r[-1] = N % size != 0
        return r

    q_touch, kv_touch = incidence(block_size[0]), incidence(block_size[1])
    any_kept = (q_touch @ tiles @ kv_touch.T) > 0          # some (q, kv) pair in the block is kept
    any_dropped = (q_touch @ (1 - tiles) @ kv_touch.T) > 0  # some pair is masked out
    full = any_kept & ~any_dropped & ~ragged(block_size[0])[:, None] & ~ragged(block_size[1])[None, :]
    partial = any_kept & ~full

    def to_indices(blocks):  # [q blocks, kv blocks] bool -> (num [1,1,nq], indices [1,1,nq,nkv]), kept first
        num = blocks.sum(-1, dtype=torch.int32)
        idx = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        return num[None, None], idx[None, None]

    return BlockMask.from_kv_blocks(
        *to_indices(partial), *to_indices(full), BLOCK_SIZE=block_size,
        mask_mod=tile_mask_mod(T, S, k, device), seq_lengths=(N, N))


def tile_block_mask(num_frames: int, tokens_per_frame: int, num_ref: int, device="cpu",
                    block_size=BLOCK_SIZE) -> BlockMask:
    """The k:(T-k) mask as a BlockMask of (query, key) blocks of block_size (an int: square), cached per
    (shape, k, device, block size). Never materialises N x N."""
    size = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
    return _tile_block_mask(num_frames, tokens_per_frame, num_ref, str(torch.device(device)), size)


# ----------------------------------------------------------------------------------------------------------
# FlashAttention-4 through FlexAttention (kernel_options={"BACKEND": "FLASH"})

FLASH = {"BACKEND": "FLASH"}


def flash_block_size(device, head_dim: int = 128, needs_grad: bool = True) -> tuple[int, int]:
    """The BlockMask blocks FA4's block sparsity runs on (query block, key block). Hopper: its backward takes
    128-key blocks only, so a mask that trains is 128 x 128; a forward-only mask gets the forward kernel's own dense
    tile, 192 x 144 at head dim <= 96 (192 x 128 at <= 64, 128 x 128 above: FA4's sm90 tile table). Blackwell's
    forward works on two 128-row query tiles at once, hence 256 x 128."""
    device = torch.device(device)
    major = torch.cuda.get_device_capability(device)[0] if device.type == "cuda" else 9
    if major >= 10:
        return (256, 128)
    if needs_grad or head_dim > 96:
        return (128, 128)
    return (192, 128) if head_dim <= 64 else (192, 144)


@torch.compiler.disable  # eager and cached: DiT.block_masks makes them before the compiled blocks, which take them
def flash_block_mask(num_frames: int, tokens_per_frame: int, num_ref: int, device, head_dim: int = 128,
                     needs_grad: bool = True) -> BlockMask | None:
    """The mask FA4 is given: the tile BlockMask at flash_block_size, or None where it has no full block (FA4
    does not take a partial-only mask yet; the caller falls back to another backend)."""
    bm = tile_block_mask(num_frames, tokens_per_frame, num_ref, device, flash_block_size(device, head_dim, needs_grad))
    return bm if _has_full_block(bm) else None


@lru_cache(maxsize=64)
def _has_full_block(bm: BlockMask) -> bool:
    return bool(bm.full_kv_num_blocks.sum().item() > 0)


@lru_cache(maxsize=16)
def flash_available(device: str, dtype: torch.dtype, head_dim: int) -> bool:
    """Can FA4 run attention on these inputs: a Hopper or Blackwell GPU, fp16/bf16, head dim a multiple of 8 up
    to 256, and flash-attn-4 installed (looked up, not imported, so CPU runs never load it)."""
    device = torch.device(device)
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16) or head_dim % 8 or head_dim > 256:
        return False
    if torch.cuda.get_device_capability(device)[0] not in (9, 10):
        return False
    import importlib.util
    try:
        return importlib.util.find_spec("flash_attn") is not None and importlib.util.find_spec("flash_attn.cute") is not None
    except (ImportError, ValueError):
        return False


_compiled_flex = None
FLEX_RECOMPILE_LIMIT = 64  # one compiled flex per (shape, mask family, kernel, with or without gradient)


def _flex(q, k, v, block_mask, kernel_options=None, return_lse: bool = False):
    """flex_attention compiled once (dynamic=False); inside an outer torch.compile the raw op is traced. FA4 runs
    only compiled: uncompiled, or past dynamo's recompile limit, flex_attention quietly takes its unfused
    reference path (an N x N score matrix), so the limit is raised for it. return_lse: -> (out, log-sum-exp
    [B, H, N], natural log)."""
    global _compiled_flex
    aux = {"return_aux": AuxRequest(lse=True)} if return_lse else {}
    if torch.compiler.is_compiling():
        out = flex_attention(q, k, v, block_mask=block_mask, kernel_options=kernel_options, **aux)
    else:
        if _compiled_flex is None:
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, FLEX_RECOMPILE_LIMIT)
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        out = _compiled_flex(q, k, v, block_mask=block_mask, kernel_options=kernel_options, **aux)
    return (out[0], out[1].lse * _flash_lse_scale(kernel_options)) if return_lse else out


@torch.compiler.assume_constant_result  # a compiled block bakes it in
def _flash_lse_scale_for(backend: str) -> float:
    """torch before the fix of pytorch#181645 (2.11 among them) returns FA4's log-sum-exp through flex_attention
    multiplied by ln 2: its finaliser took every backend's statistics for base 2."""
    return 1.0 if backend != "FLASH" or _flex_lse_fixed() else 1 / math.log(2)


@lru_cache(maxsize=1)
def _flex_lse_fixed() -> bool:
    """Does flex_attention know which backends keep base-2 statistics? The fix gave its finaliser a
    stats_are_log2 argument: looked for in the compiled code (no source needed), torch 2.11 has none."""
    import inspect

    def names(code):
        yield from code.co_varnames
        for const in code.co_consts:
            if inspect.iscode(const):
                yield from names(const)
    return "stats_are_log2" in set(names(inspect.unwrap(flex_attention).__code__))


def _flash_lse_scale(kernel_options) -> float:
    return _flash_lse_scale_for((kernel_options or {}).get("BACKEND", "TRITON"))


_DENSE_PRIORITY = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                   SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@torch.compiler.assume_constant_result  # a compiled block bakes it in
def _fa4_for(device: str, dtype: str, head_dim: int) -> bool:
    return flash_available(device, getattr(torch, dtype.split(".")[-1]), head_dim)


def _fa4_runs(q) -> bool:
    return q.is_cuda and _fa4_for(str(q.device), str(q.dtype), q.shape[-1])


def dense_attention(q, k, v, attn_mask=None, fa4: bool = True):
    """Dense attention on the fastest kernel there is: FA4 (through FlexAttention, no mask) where it runs and fa4,
    else SDPA preferring cuDNN then Flash on GPU (BENCHMARKS.md)."""
    if attn_mask is None and fa4 and _fa4_runs(q):
        return _flex(q, k, v, None, FLASH)
    if q.is_cuda and attn_mask is None:
        with sdpa_kernel(_DENSE_PRIORITY, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def _frame_split(T: int, k: int, device) -> tuple:
    """(reference frames, the other frames) as index tensors on the device. Eager calls reuse one pair per
    (T, k, device), since a Python-list index would be copied to the GPU on every call; under torch.compile
    they are graph constants."""
    if torch.compiler.is_compiling():
        return _frame_split_uncached(T, k, device)
    return _frame_split_cached(T, k, str(device))


def _frame_split_uncached(T: int, k: int, device) -> tuple:
    ref = reference_frames(T, k)
    rest = [f for f in range(T) if f not in set(ref)]
    return torch.tensor(ref, device=device), torch.tensor(rest, device=device)


@lru_cache(maxsize=64)
def _frame_split_cached(T: int, k: int, device: str) -> tuple:
    with torch.inference_mode(False):  # made under sampling's inference mode, still usable in training
        return _frame_split_uncached(T, k, device)


def _with_reference_rows(q, k, v, num_frames: int, num_ref: int, fa4: bool):
    """The start shared by the dense rewrites (gather, merge): q, k, v as [B, H, T, S, D], the frame split, and the output
    [B, H, T, S, D] with the reference frames' rows done (their queries attend to every key)."""
    T = num_frames
    ref, rest = _frame_split(T, num_ref, q.device)
    q5, k5, v5 = (x.unflatten(2, (T, -1)) for x in (q, k, v))
    out = torch.empty_like(q5)
    rows = dense_attention(q5.index_select(2, ref).flatten(2, 3), k, v, fa4=fa4)
    out.index_copy_(2, ref, rows.unflatten(2, (len(ref), -1)))
    return q5, k5, v5, out, ref, rest


def _by_frame(x5):
    """[B, H, F, S, D] -> [B*F, H, S, D]: frames folded into the batch (a view when B == 1)."""
    return x5.transpose(1, 2).flatten(0, 1)


def gather_attention(q, k, v, num_frames: int, num_ref: int, fa4: bool = True):
    """The tile mask as two dense kernels (dense_attention: FA4 where it runs and fa4, else SDPA), reference keys
    gathered per frame. q, k, v: [B, H, T*S, D] -> same."""
    q5, k5, v5, out, ref, rest = _with_reference_rows(q, k, v, num_frames, num_ref, fa4)
    B, H, _, S, D = q5.shape
    if len(rest):
        # every other frame: its own S keys then the k*S reference keys, frames folded into the batch
        def own_plus_ref(x5):  # -> [B*F, H, S + k*S, D]
            xr = x5.index_select(2, ref).flatten(2, 3).unsqueeze(2).expand(B, H, len(rest), len(ref) * S, D)
            return _by_frame(torch.cat([x5.index_select(2, rest), xr], dim=3))
        o = dense_attention(_by_frame(q5.index_select(2, rest)), own_plus_ref(k5), own_plus_ref(v5), fa4=fa4)
        out.index_copy_(2, rest, o.unflatten(0, (B, len(rest))).transpose(1, 2))
    return out.flatten(2, 3)


def _lse_kernel(q) -> str | None:
    return _lse_kernel_for(q.device, q.dtype, q.shape[-1]) if q.is_cuda else "cpu"


def _lse_kernel_for(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """The dense kernel that can return its log-sum-exp for these inputs, or None. Called directly, the
    private cuDNN and Flash ops skip SDPA's input checks (cuDNN would run fp32 inputs through half-precision
    kernels), so the checks are made here: cuDNN on sm90+ and Flash on sm80+ take fp16/bf16 with head dim
    <= 128 (a multiple of 8); the CPU kernel takes anything."""
    if device.type != "cuda":
        return "cpu"
    if dtype not in (torch.float16, torch.bfloat16) or head_dim % 8 or head_dim > 128:
        return None
    major, _ = torch.cuda.get_device_capability(device)
    return "cudnn" if major >= 9 else "flash" if major >= 8 else None


def _attention_lse(q, k, v, fa4: bool = True):
    """Dense attention and its log-sum-exp per query (natural log, fp32, [B, H, Sq]): FA4 where it runs and fa4,
    else the SDPA kernel of _lse_kernel. The lse carries no gradient in these ops, so this is for inference only."""
    if fa4 and _fa4_runs(q):
        out, lse = _flex(q, k, v, None, FLASH, return_lse=True)
        return out, lse.float()
    kernel = _lse_kernel(q)
    if kernel == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[:2]
    elif kernel == "cudnn":
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True)[:2]
    elif kernel == "flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[:2]
    else:
        raise ValueError(f"no log-sum-exp kernel for {q.dtype} head dim {q.shape[-1]} on {q.device}")
    return out, lse.reshape(q.shape[:-1]).float()


def merge_attention(q, k, v, num_frames: int, num_ref: int, fa4: bool = True):
    """The tile mask as three dense kernels (FA4 where it runs and fa4, else SDPA) and a log-sum-exp merge, with no
    key/value copied per frame: reference-frame queries over all keys; every other frame over its own keys
    (frames folded into the batch) and, in one call, over the reference keys; the two partial softmaxes merged by
    their log-sum-exps. Inference only. q, k, v: [B, H, T*S, D] -> [B, H, T*S, D]."""
    q5, k5, v5, out, ref, rest = _with_reference_rows(q, k, v, num_frames, num_ref, fa4)
    B, num_rest, S = q5.shape[0], len(rest), q5.shape[3]
    if num_rest:
        q_rest, k_rest, v_rest = (x.index_select(2, rest) for x in (q5, k5, v5))  # [B, H, F, S, D]
        o_own, lse_own = _attention_lse(_by_frame(q_rest), _by_frame(k_rest), _by_frame(v_rest), fa4)
        k_ref, v_ref = (x.index_select(2, ref).flatten(2, 3) for x in (k5, v5))
        o_ref, lse_ref = _attention_lse(q_rest.flatten(2, 3), k_ref, v_ref, fa4)
        o_own, lse_own = o_own.unflatten(0, (B, num_rest)).transpose(1, 2), lse_own.unflatten(0, (B, num_rest)).transpose(1, 2)
        share = torch.sigmoid(lse_ref.unflatten(2, (num_rest, S)) - lse_own)  # softmax mass on the reference keys
        out.index_copy_(2, rest, torch.lerp(o_own, o_ref.unflatten(2, (num_rest, S)), share.unsqueeze(-1).to(q.dtype)))
    return out.flatten(2, 3)


def backend_name(name: str) -> str:
    """A backend's name, checked: one of BACKENDS, or a one-line error."""
    if name not in BACKENDS:
        raise UserError(f"attn_backend {name!r}: use one of {', '.join(BACKENDS)}")
    return name


@torch.compiler.assume_constant_result  # decided once per kind of input; a compiled block bakes it in
def choose_backend(backend: str, device: str, dtype: str, head_dim: int, needs_grad: bool) -> str:
    """The kernel family for a layer's inputs (dtype as str(torch.dtype)). "auto": FA4 ("flash") where it runs,
    else "merge" when no gradient is needed and a kernel returns the log-sum-exp, else "gather". An explicit
    "flash" where FA4 cannot run takes the "auto" choice with a warning (a checkpoint saved on a Hopper GPU still
    samples on a CPU); an explicit "merge" with a gradient is "gather" (merge has no backward)."""
    dt = getattr(torch, dtype.split(".")[-1])
    if backend not in BACKENDS:
        raise UserError(f"unknown attention backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if backend == "flash" and not flash_available(device, dt, head_dim):
        warn(f"attn_backend 'flash' needs flash-attn-4 (requirements-gpu.txt) on a Hopper or Blackwell GPU with "
             f"fp16/bf16 inputs; here: {device}, {dtype}, head dim {head_dim}. Using 'auto'")
        backend = "auto"
    if backend == "auto" and flash_available(device, dt, head_dim):
        return "flash"
    if backend == "auto" or (backend == "merge" and needs_grad):
        return _dense_rewrite(needs_grad, _lse_kernel_for(torch.device(device), dt, head_dim))
    return backend


def _dense_rewrite(needs_grad: bool, lse_kernel: str | None) -> str:
    """The exact dense rewrite to run: "merge" needs no gradient and a kernel that returns the log-sum-exp."""
    return "gather" if needs_grad or lse_kernel is None else "merge"


def describe_backend(backend: str, device, dtype: torch.dtype, head_dim: int, needs_grad: bool = False) -> str:
    """One line saying which kernels a model's attention runs (sample.py and bench.py print it)."""
    chosen = choose_backend(backend, str(torch.device(device)), str(dtype), head_dim, needs_grad)
    if chosen == "flash":
        from importlib.metadata import version
        return f"flash: FlexAttention BlockMasks on FlashAttention-4 {version('flash-attn-4')}, full and sparse layers"
    cuda = torch.device(device).type == "cuda"
    dense = "FA4" if cuda and _fa4_for(str(torch.device(device)), str(dtype), head_dim) else \
        "cuDNN/Flash SDPA" if cuda else "SDPA"
    return f"{chosen}: the tile mask as dense {dense} calls ({'log-sum-exp merge' if chosen == 'merge' else 'reference keys gathered per frame'}); full layers {dense}"


def kernel_dtype(dtype: torch.dtype, is_cuda: bool) -> torch.dtype:
    """The dtype attention kernels run in: under CUDA bf16/fp16 autocast, the autocast dtype (q, k, v may still
    be fp32 when they reach attention), else the tensors' own."""
    if is_cuda and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return dtype


def tile_attention(q, k, v, num_frames: int, num_ref: int, backend: str = "auto", block_mask=None):
    """Self-attention over T frames with the k:(T-k) mask. q, k, v: [B, H, N, D]; k >= T is full attention.
    "auto" runs FA4 through FlexAttention where it can (choose_backend), else the exact dense rewrites: "merge"
    when no gradient is needed (sampling, evaluation, the mask search), "gather" when one is (training) or when
    no kernel returns a log-sum-exp for these inputs (fp32 on a GPU); full layers then run dense attention.
    block_mask: the layer's flash_block_mask, made before a compiled region (DiT.block_masks) so that the region
    takes it as an input; None: looked up here (in a compiled region, a graph break)."""
    N = q.shape[2]
    if N % num_frames:
        raise ValueError(f"{N} tokens do not split into {num_frames} frames")
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    dtype = kernel_dtype(q.dtype, q.is_cuda)
    backend = choose_backend(backend, str(q.device), str(dtype), q.shape[-1], needs_grad)
    if q.is_cuda and _fa4_for(str(q.device), str(dtype), q.shape[-1]):  # FA4 takes the autocast dtype only
        q, k, v = (x.to(dtype) for x in (q, k, v))
    if backend == "flash":
        if num_ref >= num_frames:
            return _flex(q, k, v, None, FLASH)
        # a mask made for the other tile (forward-only or training) is made again; checked eagerly only: compiled
        # blocks take theirs from DiT.block_masks, and dynamo on torch 2.11 fails comparing a BlockMask's size
        stale = block_mask is not None and not torch.compiler.is_compiling() and \
            block_mask.BLOCK_SIZE != flash_block_size(q.device, q.shape[-1], needs_grad)
        if block_mask is None or stale:
            block_mask = flash_block_mask(num_frames, N // num_frames, num_ref, q.device, q.shape[-1], needs_grad)
        if block_mask is not None:
            return _flex(q, k, v, block_mask, FLASH)
        backend = _dense_rewrite(needs_grad, _lse_kernel(q))  # a mask with no full block: FA4 does not take it
    if num_ref >= num_frames:
        return dense_attention(q, k, v)
    if backend == "gather":
        return gather_attention(q, k, v, num_frames, num_ref)
    return merge_attention(q, k, v, num_frames, num_ref)
