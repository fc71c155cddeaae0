"""The DiT: plans route to the right attention (vs plain SDPA, with and without the dense mask), RoPE's
relative-position property, forward/backward, a few optimizer steps, and weights round-tripping to disk."""
import pytest
import torch
import torch.nn.functional as F

import model as model_lib
from conftest import tiny_model
from attention import tile_dense_mask
from model import DiT, apply_rope, load_model, model_config, rope_3d, rope_tables, save_model


tiny = tiny_model


def inputs(m, B=2, T=4, H=16, W=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, m.cfg.in_channels, T, H, W, generator=g)
    t = torch.rand(B, generator=g)
    ids, mask = m.tokenize(["a red circle moving left", ""][:B] + ["x"] * (B - 2))
    return x, t, ids, mask


def sdpa_reference(num_frames_plan):
    """A stand-in for tile_attention: SDPA with the dense boolean mask (or no mask for full)."""
    def attend(q, k, v, num_frames, num_ref, backend="auto", block_mask=None):
        if num_ref >= num_frames:
            return F.scaled_dot_product_attention(q, k, v)
        S = q.shape[2] // num_frames
        num_frames_plan.append(num_ref)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=tile_dense_mask(num_frames, S, num_ref))
    return attend


@pytest.mark.parametrize("plan", [["full"], [1, 2], ["full", "1:3"]])
@pytest.mark.parametrize("backend", ["gather", "merge"])
def test_model_equals_sdpa_reference(plan, backend, monkeypatch):
    m = tiny(attn_backend=backend)
    m.set_mask_plan(plan)
    x, t, ids, mask = inputs(m)
    with torch.no_grad():
        out = m(x, t, ids, mask)
        seen = []
        monkeypatch.setattr(model_lib, "tile_attention", sdpa_reference(seen))
        ref = m(x, t, ids, mask)
    assert (out - ref).abs().max().item() < 1e-4
    assert len(seen) == sum(e != "full" for e in m.mask_plan)
    assert out.shape == x.shape


def test_sparse_plan_changes_the_output():
    m = tiny()
    x, t, ids, mask = inputs(m)
    with torch.no_grad():
        full = m(x, t, ids, mask)
        m.set_mask_plan([1])
        sparse = m(x, t, ids, mask)
    assert (full - sparse).abs().max().item() > 1e-3


def test_rope_rotates_each_channel_pair_by_its_angle():
    """apply_rope against the rotation written out: channel pair (2i, 2i+1) of token n becomes
    (x1 cos - x2 sin, x1 sin + x2 cos) at the pair's angle, for every head, in any head layout."""
    g = torch.Generator().manual_seed(0)
    N, H, D = 6, 3, 8
    angles = torch.rand(N, D // 2, generator=g) * 6.3
    x = torch.randn(2, N, H, D, generator=g)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]
    expected = torch.empty_like(x)
    expected[..., 0::2], expected[..., 1::2] = x1 * cos - x2 * sin, x1 * sin + x2 * cos
    torch.testing.assert_close(apply_rope(x, *rope_tables(angles.cos(), angles.sin())), expected)
    heads_first = x.transpose(1, 2).contiguous().transpose(1, 2)  # the same values, another memory layout
    torch.testing.assert_close(apply_rope(heads_first, *rope_tables(angles.cos(), angles.sin())), expected)


def test_rope_scores_depend_on_relative_position_only():
    cos, sin = rope_3d((3, 4, 5), 24, "cpu")
    q, k = torch.randn(24), torch.randn(24)
    grid = torch.arange(60).view(3, 4, 5)
    def score(i, j):
        qi = apply_rope(q.expand(1, 60, 1, 24), cos, sin)[0, i, 0]
        kj = apply_rope(k.expand(1, 60, 1, 24), cos, sin)[0, j, 0]
        return (qi * kj).sum()
    # the same (dt, dh, dw) offset from two different places gives the same score
    assert score(grid[0, 0, 0], grid[1, 2, 3]) == pytest.approx(score(grid[1, 1, 1], grid[2, 3, 4]).item(), abs=1e-4)
    assert score(grid[0, 0, 0], grid[1, 2, 3]) != pytest.approx(score(grid[0, 0, 0], grid[2, 2, 3]).item(), abs=1e-4)


def test_forward_backward_and_a_few_steps_reduce_loss():
    torch.manual_seed(0)
    m = DiT(model_config("tiny")).train()
    x, t, ids, mask = inputs(m, B=4)
    target = torch.randn_like(x)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = (m(x, t, ids, mask) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in m.parameters() if p.requires_grad)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


def test_sparse_plan_trains_on_cpu():
    m = tiny(mask_plan=[1]).train()
    x, t, ids, mask = inputs(m)
    m(x, t, ids, mask).square().mean().backward()
    assert m.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_a_model_trains_after_sampling_in_the_same_process():
    """Sampling runs under inference_mode; what it caches on the way (RoPE tables, the sparse backends' frame
    indices) must still serve a training step afterwards (stage 2 then stage 3 in one process)."""
    import flow
    m = tiny(mask_plan=[1])
    flow.generate(m, ["a red circle moving left"], [3, 4, 16, 16], {"name": "euler", "steps": 1, "cfg": 1.0, "shift": 1.0})
    x, t, ids, mask = inputs(m)
    m.train()(x, t, ids, mask).square().mean().backward()
    assert m.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_precomputed_text_embeddings():
    torch.manual_seed(0)
    m = DiT(model_config("tiny", text_encoder="none", text_dim=24)).eval()
    x = torch.randn(2, 3, 2, 8, 8)
    emb, mask = torch.randn(2, 5, 24), torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    assert m(x, torch.rand(2), emb, mask).shape == x.shape


def test_a_checkpoint_that_kept_its_plan_in_the_model_config_still_samples_under_it():
    """The shipped efficient model was saved when the mask plan and backend lived in the model config: they are
    read from there (the plan stage 3 trained it under, configs/plan-r0.4.yaml)."""
    import os
    from attention import load_plan
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    m, meta = load_model(os.path.join(root, "checkpoints", "efficient.safetensors"))
    assert m.mask_plan == load_plan(os.path.join(root, "configs", "plan-r0.4.yaml")) == meta["mask_plan"]
    assert "mask_plan" not in meta["model_config"] and m.attn_backend == "auto"


def test_save_load_roundtrip(tmp_path):
    m = tiny()
    m.set_mask_plan([2, "full"])
    m.set_attn_backend("gather")
    path = str(tmp_path / "w.safetensors")
    save_model(path, m, {"kind": "test", "sampler": {"steps": 3}})
    m2, meta = load_model(path)
    assert meta["kind"] == "test" and meta["sampler"] == {"steps": 3} and "mask_plan" not in meta["model_config"]
    assert m2.mask_plan == [2, "full"] and [b.attn.plan_entry for b in m2.blocks] == [2, "full"]
    assert m2.attn_backend == "gather" and all(b.attn.backend == "gather" for b in m2.blocks)
    x, t, ids, mask = inputs(m)
    with torch.no_grad():
        assert torch.equal(m(x, t, ids, mask), m2(x, t, ids, mask))


def test_plan_from_a_file(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text("plan: [full, 1]\n")
    assert DiT(model_config("tiny"), mask_plan=str(path)).mask_plan == ["full", 1]
    path.write_text("layers: []\n")
    with pytest.raises(ValueError, match="no `plan:` list"):
        DiT(model_config("tiny"), mask_plan=str(path))


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown model preset"):
        model_config("huge")
    with pytest.raises(ValueError, match="unknown model keys"):
        model_config("tiny", dept=3)
    with pytest.raises(ValueError, match="2 layers"):
        DiT(model_config("tiny"), mask_plan=[1, 2, 3])
    with pytest.raises(ValueError, match="run settings, not model keys"):
        model_config("tiny", attn_backend="gather")
    with pytest.raises(ValueError, match="attn_backend 'fast'"):
        tiny().set_attn_backend("fast")
    with pytest.raises(ValueError, match="bytes"):
        tiny().tokenize(["x" * 100])
    with pytest.raises(ValueError, match="no checkpoint"):
        load_model(str(tmp_path / "missing.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError):
        load_model(str(tmp_path / "junk.safetensors"))
    m = tiny()
    with pytest.raises(ValueError, match="does not fit"):
        m(torch.randn(1, 3, 2, 10, 10), torch.rand(1), *m.tokenize(["a"]))


def test_whole_model_traces_without_graph_breaks():
    import torch._dynamo
    m = tiny(mask_plan=["full", 1])
    x, t, ids, mask = inputs(m, T=4)
    with torch.no_grad():
        explained = torch._dynamo.explain(m)(x, t, ids, mask)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


def test_compiled_blocks_compile_every_mask_entry_of_a_long_plan():
    """A graph per mask entry: past dynamo's recompile limit (8 per function) the blocks would quietly run eager,
    so compile_blocks raises it. A plan of 10 distinct entries at 12 frames: 10 graphs, the eager model's output."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    m = tiny(mask_plan=[*range(1, 10), "full"], depth=10)
    x, t, ids, mask = inputs(m, T=12)
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=8):  # dynamo's default, whatever ran before
        reference = m(x, t, ids, mask)
        m.compile_blocks()
        torch._dynamo.reset()
        counters.clear()
        for block in m.blocks:  # compile_blocks' settings, kernels eager (quick on a CPU)
            block._compiled_call_impl = None
            block.compile(backend="aot_eager", dynamic=False)
        out = m(x, t, ids, mask)
    assert counters["stats"]["unique_graphs"] == 10, dict(counters["stats"])
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)


def test_compiled_blocks_keep_norm_rows_up_to_4096_wide_in_registers():
    """compile_blocks installs widen_persistent_reductions' heuristics for inductor: a row reduction (hint INNER or
    DEFAULT) of up to 4,096 elements is made persistent; a wider one, a column one (OUTER), a cooperative one, or
    any where inductor's persistent reductions are switched off is left to inductor's own rule; heuristics someone
    else installed are kept. (On a GPU, tests/test_gpu.py sees the kernels.)"""
    from unittest import mock

    import sympy
    from torch._inductor import config as inductor_config
    from torch._inductor.choices import InductorChoices
    from torch._inductor.runtime.hints import ReductionHint
    from torch._inductor.virtualized import V

    class Features:
        def __init__(self, n, hint=ReductionHint.INNER):
            self.reduction_numel, self.hint = sympy.sympify(n), hint

        def get_reduction_hint(self):
            return self.hint

    before = V.choices
    try:
        theirs = type("Theirs", (InductorChoices,), {})()
        V.set_choices_handler(theirs)
        tiny(depth=1).compile_blocks()
        assert V.choices is theirs
        V.set_choices_handler(InductorChoices())
        tiny(depth=1).compile_blocks()
        choices = V.choices
        assert type(choices) is not InductorChoices
        with mock.patch.object(InductorChoices, "should_use_persistent_reduction", return_value="inductor's"):
            decide = choices.should_use_persistent_reduction
            assert decide(Features(2304), False) is True and decide(Features(4096), False) is True
            assert decide(Features(4097), False) == "inductor's"
            assert decide(Features(2304, ReductionHint.OUTER), False) == "inductor's"
            assert decide(Features(2304, ReductionHint.OUTER_TINY), False) == "inductor's"
            assert decide(Features(2304, ReductionHint.DEFAULT), False) is True
            assert decide(Features(2304), True) == "inductor's"
            assert decide(Features(sympy.Symbol("s0")), False) == "inductor's"
            with inductor_config.patch({"triton.persistent_reductions": False}):  # inductor's switch still rules
                assert decide(Features(2304), False) == "inductor's"
    finally:
        V.set_choices_handler(before)


def test_compiled_blocks_take_their_block_masks_as_inputs(monkeypatch):
    """Where the flash backend runs a sparse layer, DiT.block_masks makes its BlockMask before the compiled blocks,
    which take it as an input: no graph break (looked up inside a block, it broke the block's graph, and inside an
    activation checkpoint that hid FA4 from the checkpoint's policy). FlexAttention's eager kernel stands in for
    FA4 here (on a CPU it runs inference only); the output is the dense rewrite's."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    import attention
    monkeypatch.setattr(attention, "flash_available", lambda device, dtype, head_dim: True)
    monkeypatch.setattr(attention, "FLASH", None)
    torch.manual_seed(0)
    m = DiT(model_config("tiny", hidden=256, heads=2), mask_plan=[1, "full"], attn_backend="gather")
    x, t = torch.randn(1, 3, 4, 64, 64), torch.rand(1)  # 4 frames of 256 tokens: 128-token blocks, some full
    ids, mask = m.tokenize(["a red circle moving right"])
    with torch.no_grad():
        reference = m(x, t, ids, mask)
        m.set_attn_backend("flash")
        assert [bm is not None for bm in m.block_masks((4, 16, 16), x)] == [True, False]
        breaks = {}
        for made_before in (True, False):
            if not made_before:  # the lookup inside the block, as before
                monkeypatch.setattr(DiT, "block_masks", lambda self, grid, x: [None] * len(self.blocks))
            torch._dynamo.reset()
            counters.clear()
            for block in m.blocks:  # dynamo as compile_blocks runs it; the kernels eager (a CPU flex detail)
                block._compiled_call_impl = None
                block.compile(backend="aot_eager", dynamic=False)
            out = m(x, t, ids, mask)
            breaks[made_before] = sum(counters["graph_break"].values())
            assert (out - reference).abs().max().item() < 1e-4
    assert breaks[True] == 0 and breaks[False] > 0, breaks
