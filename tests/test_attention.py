"""Attention Tile masks and kernels against independent references: a re-derived dense mask, SDPA with that
boolean mask, and the paper's Table 1 sparsities (Efficient-vDiT, section 3 and Table 1)."""
import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from attention import (FULL, density, entry_num_ref, expand_plan, mask_label, parse_entry, plan_sparsity,
                       reference_frames, tile_attention, tile_block_mask,
                       tile_dense_mask)

CASES = [(4, 50, 1), (5, 37, 2), (6, 100, 1), (6, 100, 2), (6, 100, 3), (6, 100, 6), (3, 200, 1), (8, 45, 2)]


def rederived_mask(T, S, k):
    """Token by token, straight from the definition: fq == fk, fk in R or fq in R."""
    refs = set(int(round(i * T / k)) for i in range(k))
    N = T * S
    m = torch.zeros(N, N, dtype=torch.bool)
    for i in range(N):
        fq = i // S
        for fk in range(T):
            if fq == fk or fk in refs or fq in refs:
                m[i, fk * S:(fk + 1) * S] = True
    return m


@pytest.mark.parametrize("T,S,k", CASES)
def test_dense_mask_matches_rederivation(T, S, k):
    assert torch.equal(tile_dense_mask(T, S, k), rederived_mask(T, S, k))


def test_full_mask_and_density():
    assert tile_dense_mask(5, 7, 5).all()
    for T, k in [(8, 1), (8, 3), (24, 4)]:
        kept = 2 * k * T - k * k + T - k  # kept frame tiles, counted by hand
        assert density(T, k) == pytest.approx(kept / T**2)


def test_reference_frames():
    assert reference_frames(8, 1) == [0]
    assert reference_frames(8, 2) == [0, 4]
    assert reference_frames(24, 3) == [0, 8, 16]
    assert reference_frames(8, 8) == list(range(8))
    with pytest.raises(ValueError):
        reference_frames(8, 9)


def qkv(N, H=2, D=16, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, H, N, D, generator=g).requires_grad_(grad) for _ in range(3)]


def materialise(bm, N):
    """A BlockMask as the bool [N, N] token mask it stands for: full blocks all True, partial blocks by its
    mask_mod, every other block False (the reading FA4 and flex kernels make of it)."""
    bq, bk = bm.BLOCK_SIZE
    dense = torch.zeros(N, N, dtype=torch.bool)
    q_idx, kv_idx = torch.arange(N)[:, None], torch.arange(N)[None, :]
    for nums, idx, full in ((bm.kv_num_blocks, bm.kv_indices, False), (bm.full_kv_num_blocks, bm.full_kv_indices, True)):
        for i in range(nums.shape[-1]):
            for j in idx[0, 0, i, :nums[0, 0, i]].tolist():
                rows, cols = slice(i * bq, (i + 1) * bq), slice(j * bk, (j + 1) * bk)
                dense[rows, cols] = True if full else bm.mask_mod(0, 0, q_idx[rows], kv_idx[:, cols])
    return dense


@pytest.mark.parametrize("T,S,k", [(6, 100, 1), (6, 100, 2), (4, 300, 1), (8, 45, 3), (3, 200, 1)])
def test_the_block_mask_fa4_is_given_is_the_dense_mask(T, S, k):
    """flash_block_mask (what the "flash" backend hands FA4: on Hopper 128 x 128 blocks where a gradient is needed,
    the forward kernel's own tile, 192 x 144 at head dim 96, where none is) and the Blackwell form (256 x 128)
    stand for exactly the dense reference mask."""
    from attention import flash_block_mask
    for needs_grad, size in ((True, (128, 128)), (False, (192, 144))):
        bm = flash_block_mask(T, S, k, "cpu", head_dim=96, needs_grad=needs_grad)
        if bm is not None:  # None: no full block, so the backend falls back (checked below)
            assert bm.BLOCK_SIZE == size and bm.full_kv_num_blocks.sum() > 0
            assert torch.equal(materialise(bm, T * S), tile_dense_mask(T, S, k))
        else:
            assert tile_block_mask(T, S, k, block_size=size).full_kv_num_blocks.sum() == 0
    assert torch.equal(materialise(tile_block_mask(T, S, k, block_size=(256, 128)), T * S), tile_dense_mask(T, S, k))


@pytest.mark.parametrize("T,S,k", [(6, 100, 2), (5, 37, 2)])
def test_compiled_flex_with_the_block_mask_equals_sdpa_with_dense_mask(T, S, k):
    """The BlockMask through compiled flex_attention (CPU kernel here, FA4 on a GPU) computes the masked softmax."""
    import attention
    q, key, v = qkv(T * S)
    ref = F.scaled_dot_product_attention(q, key, v, attn_mask=tile_dense_mask(T, S, k))
    out = attention._flex(q, key, v, tile_block_mask(T, S, k))
    assert (out - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("T,S,k", CASES)
def test_tile_backend_equals_sdpa_with_dense_mask_fwd_and_bwd(T, S, k):
    q, key, v = qkv(T * S, grad=True)
    ref = F.scaled_dot_product_attention(q, key, v, attn_mask=tile_dense_mask(T, S, k))
    g_ref = torch.autograd.grad(ref.square().sum(), (q, key, v))
    out = tile_attention(q, key, v, T, k, backend="gather")
    g_out = torch.autograd.grad(out.square().sum(), (q, key, v))
    assert (out - ref).abs().max().item() < 1e-4
    for a, b in zip(g_out, g_ref):
        assert (a - b).abs().max().item() < 1e-4


@pytest.mark.parametrize("T,S,k", CASES)
@pytest.mark.parametrize("batch", [1, 2])
def test_merge_backend_equals_sdpa_with_dense_mask(T, S, k, batch):
    g = torch.Generator().manual_seed(T * S + k)
    q, key, v = (torch.randn(batch, 2, T * S, 16, generator=g) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, key, v, attn_mask=tile_dense_mask(T, S, k))
    with torch.no_grad():
        assert (tile_attention(q, key, v, T, k, backend="merge") - ref).abs().max().item() < 1e-5


def test_auto_backend_is_merge_for_inference_and_gather_for_training(monkeypatch, capsys):
    import attention
    seen = []
    for name in ("merge_attention", "gather_attention"):
        real = getattr(attention, name)
        monkeypatch.setattr(attention, name, lambda *a, _real=real, _name=name: seen.append(_name) or _real(*a))
    q, key, v = qkv(4 * 30, grad=True)
    with torch.no_grad():
        tile_attention(q, key, v, 4, 1)
    tile_attention(q, key, v, 4, 1).sum().backward()  # the training path has a backward
    assert seen == ["merge_attention", "gather_attention"] and q.grad is not None
    tile_attention(q, key, v, 4, 1, backend="merge").sum().backward()  # merge has no backward: gather trains
    assert seen[-1] == "gather_attention"
    tile_attention(q, key, v, 4, 4, backend="merge").sum().backward()  # a full layer: dense SDPA, any backend
    with torch.no_grad():
        tile_attention(q, key, v, 4, 1, backend="flash")  # no FA4 on a CPU: the auto choice, with a warning
    assert seen[-1] == "merge_attention" and "flash-attn-4" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown attention backend"):
        tile_attention(q, key, v, 4, 1, backend="tile-ish")


def test_auto_picks_fa4_by_capability_once(monkeypatch):
    """FA4 where it runs (Hopper/Blackwell, fp16/bf16, head dim <= 256, flash-attn-4 installed), the CPU path
    elsewhere; the CPU test run never imports flash-attn."""
    import importlib.util
    import sys
    import attention
    choose = attention.choose_backend
    assert choose("auto", "cpu", "torch.float32", 64, False) == "merge"
    assert choose("auto", "cpu", "torch.bfloat16", 96, True) == "gather"
    assert "flash_attn" not in sys.modules
    attention.flash_available.cache_clear()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    real_find = importlib.util.find_spec
    looked_up = []

    def find_spec(name, *a):
        if name.startswith("flash_attn"):
            looked_up.append(name)
            return object()
        return real_find(name, *a)
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    try:
        assert choose("auto", "cuda:0", "torch.bfloat16", 96, True) == "flash"
        looked = len(looked_up)
        for _ in range(3):  # the same kind of input again: decided once, flash-attn-4 not looked up again
            assert choose("auto", "cuda:0", "torch.bfloat16", 96, True) == "flash"
        assert looked > 0 and len(looked_up) == looked
        assert choose("auto", "cuda:0", "torch.bfloat16", 96, False) == "flash"
        assert choose("auto", "cuda:0", "torch.float32", 96, False) == "gather"  # FA4 takes fp16/bf16 only
        assert choose("auto", "cuda:0", "torch.bfloat16", 512, False) == "gather"
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
        attention.flash_available.cache_clear()
        assert choose("auto", "cuda:0", "torch.bfloat16", 96, False) == "merge"  # an A100: no FA4
    finally:
        attention.flash_available.cache_clear()


def test_merge_needs_a_log_sum_exp_kernel():
    """The private cuDNN / Flash ops skip SDPA's checks, so fp32 or a large head dim on a GPU must not reach
    them: auto falls back to gather there."""
    import attention
    cuda = torch.device("cuda")
    assert attention._lse_kernel_for(cuda, torch.float32, 64) is None
    assert attention._lse_kernel_for(cuda, torch.bfloat16, 256) is None
    # on the CPU any head dim has one: merge at head dim 256 equals SDPA under the dense mask
    g = torch.Generator().manual_seed(0)
    q, key, v = (torch.randn(1, 2, 4 * 8, 256, generator=g) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, key, v, attn_mask=tile_dense_mask(4, 8, 1))
    assert (tile_attention(q, key, v, 4, 1, backend="merge") - ref).abs().max() < 1e-5


def test_block_mask_equals_dense_mask_blockwise():
    """Every 128x128 block the BlockMask skips is all-False in the dense mask; every 'full' block is all-True."""
    T, S, k = 6, 100, 2
    bm = tile_block_mask(T, S, k)
    dense = tile_dense_mask(T, S, k)
    N, B = T * S, 128
    nb = -(-N // B)
    kept = bm.to_dense()[0, 0].bool()  # partial or full
    full = torch.zeros(nb, nb, dtype=torch.bool)
    for i in range(nb):
        for j in range(bm.full_kv_num_blocks[0, 0, i]):
            full[i, bm.full_kv_indices[0, 0, i, j]] = True
    for i in range(nb):
        for j in range(nb):
            tile = dense[i * B:(i + 1) * B, j * B:(j + 1) * B]
            assert kept[i, j] == tile.any()
            if full[i, j]:
                assert tile.all() and tile.shape == (B, B)


# the paper's Table 1 (S = 3600, 128 x 128 blocks)
TABLE1 = [(8, 4, 17.60), (8, 3, 29.88), (8, 2, 45.47), (8, 1, 64.38),
          (24, 12, 21.51), (24, 8, 40.30), (24, 6, 51.88), (24, 4, 64.98), (24, 3, 72.05)]


@pytest.mark.parametrize("T,k,sparsity", TABLE1)
def test_block_mask_sparsity_matches_paper_table(T, k, sparsity):
    bm = tile_block_mask(T, 3600, k)
    assert abs(bm.sparsity() - sparsity) < 0.05
    # built from the frame structure: its tensors hold O(blocks^2) ints, never N x N
    N = T * 3600
    held = sum(t.numel() * t.element_size() for t in (bm.kv_indices, bm.full_kv_indices, bm.q_indices))
    assert held < N * N / 1000


def test_no_recompile_across_masks_of_one_shape():
    import attention
    T, S = 6, 100
    q, key, v = qkv(T * S, seed=1)
    attention._flex(q, key, v, tile_block_mask(T, S, 1))  # compiled (or reused) for this shape
    before = counters["stats"]["unique_graphs"]
    for k in (2, 3, 1, 2):
        attention._flex(q, key, v, tile_block_mask(T, S, k))
    assert counters["stats"]["unique_graphs"] == before


def test_full_plan_entry_runs_plain_sdpa():
    q, key, v = qkv(4 * 30)
    for backend in ("gather", "merge"):
        assert torch.equal(tile_attention(q, key, v, 4, 4, backend), F.scaled_dot_product_attention(q, key, v))


def test_plan_entries():
    assert parse_entry("full") == FULL and parse_entry(None) == FULL
    assert parse_entry("1:7") == 1 and parse_entry(3) == 3
    assert entry_num_ref(FULL, 8) == 8 and entry_num_ref(3, 8) == 3 and entry_num_ref(12, 8) == 8
    assert mask_label(FULL, 8) == "full" and mask_label(2, 8) == "2:6" and mask_label(12, 8) == "8:0"
    assert expand_plan("1:7", 3) == [1, 1, 1] and expand_plan(["full", "2:6", 3], 3) == [FULL, 2, 3]
    assert plan_sparsity([FULL, 1], 8) == pytest.approx((1 - density(8, 1)) / 2)
    for bad in ("one", 0, -1, "x:7", 1.5):
        with pytest.raises(ValueError):
            parse_entry(bad)
    with pytest.raises(ValueError, match="2 entries for 3 layers"):
        expand_plan([1, 2], 3)
    with pytest.raises(ValueError):
        tile_attention(*qkv(10), 3, 1)  # 10 tokens do not split into 3 frames
