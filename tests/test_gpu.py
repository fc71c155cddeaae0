"""On a GPU (skipped elsewhere): the FA4 path, FlexAttention with kernel_options={"BACKEND": "FLASH"} through the
project's BlockMask, equals SDPA with the dense reference mask, forward and backward, in a compiled model too; the
MLP's fused GELU epilogue and float8 sampling stay close to their references.

    python -m pytest -q tests/test_gpu.py      # on a Hopper or Blackwell GPU with flash-attn-4 installed
"""
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import attention
from attention import tile_attention, tile_dense_mask
from conftest import tiny_model

needs_fa4 = pytest.mark.skipif(not torch.cuda.is_available() or not attention.flash_available("cuda", torch.bfloat16, 96),
                               reason="needs flash-attn-4 on a Hopper or Blackwell GPU")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
needs_fp8 = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                               reason="needs a GPU with float8 matmuls (sm89 or newer)")


def close(a, b, what):
    err = (a.float() - b.float()).abs().max().item()
    assert err < 3e-2 * max(1.0, b.float().abs().max().item()), f"{what}: max error {err}"


def relative_error(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def model_step(plan, backend=None, compiled=False, policy=None):
    """One forward and backward of a random 3-layer osp12-shaped model in bf16 on 8 frames x 300 tokens -> (output,
    every block gradient, flat). Its q/k/v weights are drawn at std 0.2 (the rest at 0.02) so that attention is not
    near uniform: then a wrong mask in any layer moves the output by 9-19% and the gradients by 4-7% (measured on a
    CPU with the gather backend, fp32), against bf16's own error of 1% and 0.6%."""
    from model import DiT, model_config
    torch.manual_seed(0)
    m = DiT(model_config("osp12", depth=3, hidden=192, heads=2, text_dim=32), mask_plan=plan)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.02)
    for block in m.blocks:
        torch.nn.init.normal_(block.attn.qkv.weight, std=0.2)
    m = m.cuda().to(torch.bfloat16)
    m.set_attn_backend(backend or "auto")
    torch._dynamo.reset()
    if compiled:
        m.compile_blocks()
    m.set_checkpointing(policy)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, 4, 8, 30, 40, device="cuda", dtype=torch.bfloat16, generator=g)
    text = torch.randn(1, 8, 32, device="cuda", dtype=torch.bfloat16, generator=g)
    out = m(x, torch.full((1,), 0.5, device="cuda"), text, torch.ones(1, 8, dtype=torch.bool, device="cuda"))
    out.float().square().mean().backward()
    return out.detach(), torch.cat([p.grad.flatten() for p in m.blocks.parameters()])


@needs_fa4
@pytest.mark.parametrize("T,S,k", [(8, 450, 1), (8, 450, 2), (8, 450, 8), (6, 200, 2), (24, 150, 3)])
def test_flash_equals_sdpa_with_dense_mask_fwd_and_bwd(T, S, k):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, key, v = (torch.randn(2, 4, T * S, 96, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
                for _ in range(3))
    grad = torch.randn(q.shape, device="cuda", generator=g, dtype=torch.bfloat16)
    ref = F.scaled_dot_product_attention(*(x.float() for x in (q, key, v)), attn_mask=tile_dense_mask(T, S, k, "cuda"))
    ref_grads = torch.autograd.grad(ref, (q, key, v), grad.float())
    assert attention.choose_backend("auto", "cuda:0", "torch.bfloat16", 96, True) == "flash"
    out = tile_attention(q, key, v, T, k, "flash")
    grads = torch.autograd.grad(out, (q, key, v), grad)
    close(out, ref, "output")
    for name, a, b in zip("qkv", grads, ref_grads):
        close(a, b, f"d{name}")


@needs_fa4
def test_compiled_model_on_flash_equals_gather():
    """The compiled model on FA4 against the gather rewrite (dense SDPA calls), eager: the same output and block
    gradients, where the same model under another plan is measurably different (the check can fail)."""
    plan = [1, "full", 2]
    flash = model_step(plan, "flash", compiled=True)
    gather = model_step(plan, "gather")
    other = model_step(["full", "full", "full"], "gather")
    assert relative_error(flash[0], gather[0]) < 3e-2 and relative_error(flash[1], gather[1]) < 2e-2, \
        (relative_error(flash[0], gather[0]), relative_error(flash[1], gather[1]))
    assert relative_error(other[0], gather[0]) > 6e-2, relative_error(other[0], gather[0])  # a wrong mask would show


@needs_fa4
@pytest.mark.parametrize("head_dim", [96, 128])
@pytest.mark.parametrize("T,S,k", [(8, 450, 1), (8, 450, 3), (24, 150, 3)])
def test_forward_tiles_and_rewrites_on_fa4_equal_sdpa_with_dense_mask(T, S, k, head_dim):
    """A forward-only BlockMask at FA4's own tile (192 x 144 at head dim 96), and the dense rewrites with their
    dense calls on FA4 (gather forward and backward, merge forward) against fp32 SDPA under the dense mask."""
    g = torch.Generator(device="cuda").manual_seed(1)
    q, key, v = (torch.randn(1, 4, T * S, head_dim, device="cuda", generator=g, dtype=torch.bfloat16)
                 for _ in range(3))
    ref = F.scaled_dot_product_attention(*(x.float() for x in (q, key, v)), attn_mask=tile_dense_mask(T, S, k, "cuda"))
    with torch.no_grad():
        assert attention.flash_block_size("cuda", head_dim, needs_grad=False) == ((192, 144) if head_dim == 96 else
                                                                                  (128, 128))
        for backend in ("flash", "merge", "gather"):
            with mock.patch.object(attention, "_flex", wraps=attention._flex) as flex:  # the rewrites' calls: FA4's
                close(tile_attention(q, key, v, T, k, backend), ref, f"{backend} forward")
            assert flex.call_count >= (1 if backend == "flash" else 2), (backend, flex.call_count)
    grad = torch.randn(q.shape, device="cuda", generator=g, dtype=torch.bfloat16)
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, key, v))
    with mock.patch.object(attention, "_flex", wraps=attention._flex) as flex:
        grads = torch.autograd.grad(attention.gather_attention(qg, kg, vg, T, k), (qg, kg, vg), grad)
    assert flex.call_count >= 2, flex.call_count
    qf, kf, vf = (x.float().requires_grad_() for x in (q, key, v))
    ref_grads = torch.autograd.grad(F.scaled_dot_product_attention(qf, kf, vf, attn_mask=tile_dense_mask(
        T, S, k, "cuda")), (qf, kf, vf), grad.float())
    for name, a, b in zip("qkv", grads, ref_grads):
        close(a, b, f"gather on FA4: d{name}")


@needs_fa4
def test_checkpoint_policies_in_a_compiled_model_on_fa4_give_the_same_gradients():
    """Activation checkpointing inside the compiled blocks under each policy (FA4's outputs kept by two), against
    no checkpointing: the same output and block gradients (the same kernels: to 1%)."""
    plan = [1, "full", 2]
    plain = model_step(plan, "flash", compiled=True)
    for policy in ("full", "save_attention", "save_matmuls"):
        out, grads = model_step(plan, "flash", compiled=True, policy=policy)
        assert relative_error(out, plain[0]) < 1e-2, (policy, relative_error(out, plain[0]))
        assert relative_error(grads, plain[1]) < 1e-2, (policy, relative_error(grads, plain[1]))


@needs_gpu
def test_mlp_with_gelu_in_the_matmul_epilogue_equals_the_two_ops():
    """Sampling on a GPU runs the MLP's first Linear and its GELU (tanh) as one cuBLASLt call (model.MLP): its
    output against the fp32 MLP no further from it than the two separate ops in bf16 are."""
    from model import MLP
    torch.manual_seed(0)
    mlp = MLP(192, 768).cuda()
    x = torch.randn(2, 300, 192, device="cuda")
    reference = mlp(x).detach()  # fp32, with gradients enabled: the two ops
    mlp.to(torch.bfloat16)
    with torch.no_grad():
        with mock.patch("torch._addmm_activation", wraps=torch._addmm_activation) as fused:
            out = mlp(x.to(torch.bfloat16))
        assert fused.call_count == 1
    two_ops = mlp(x.to(torch.bfloat16))  # with gradients enabled: the two ops
    err, err_two = ((y.float() - reference).abs().max().item() for y in (out, two_ops))
    assert err <= 1.5 * err_two + 1e-3, (err, err_two)


@needs_gpu
def test_compiled_blocks_run_their_norms_as_persistent_reductions():
    """At osp12's width (2,304) inductor's own rule loops over each norm's row twice (`triton_red_` kernels, the
    control: compile_blocks leaves heuristics someone else installed, here inductor's own); under compile_blocks'
    rule (model.widen_persistent_reductions) every LayerNorm + modulation kernel keeps the row in registers
    (`triton_per_` kernels), and the compiled model equals the eager one. 9,216 tokens: at 64 rows or more per SM
    inductor hints its norms DEFAULT unless its coalescing scores make them INNER, and the cross-attention's input
    norm stays DEFAULT, so the rule for INNER alone (a second control) leaves a norm looped. Each compilation starts
    from an empty inductor cache."""
    import re

    from torch._inductor import utils
    from torch._inductor.choices import InductorChoices
    from torch._inductor.runtime.hints import ReductionHint
    from torch._inductor.virtualized import V
    from model import DiT, model_config
    fresh_cache = getattr(utils, "fresh_cache", None) or utils.fresh_inductor_cache
    torch.manual_seed(0)
    m = DiT(model_config("osp12", depth=1, text_dim=32))
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.02)
    m = m.cuda().to(torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, 4, 4, 96, 96, device="cuda", dtype=torch.bfloat16, generator=g)
    t, text = torch.full((1,), 0.5, device="cuda"), torch.randn(1, 8, 32, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(1, 8, dtype=torch.bool, device="cuda")

    class InnerOnly(InductorChoices):
        @staticmethod
        def should_use_persistent_reduction(features, cooperative_reduction, *args, **kwargs):
            n = features.reduction_numel
            if (features.get_reduction_hint() == ReductionHint.INNER and not cooperative_reduction
                    and getattr(n, "is_number", False) and int(n) <= 4096):
                return True
            return InductorChoices.should_use_persistent_reduction(features, cooperative_reduction, *args, **kwargs)

    def compiled_with(choices):
        V.set_choices_handler(choices)
        torch._dynamo.reset()
        for block in m.blocks:
            block._compiled_call_impl = None
        with torch.no_grad(), fresh_cache():
            out, code = utils.run_and_get_code(m.compile_blocks(), x, t, text, mask)
        return out, set(re.findall(r"def (triton_(?:per|red)_fused\w*layer_norm\w*)\(", "\n".join(code)))
    before = V.choices
    try:
        with torch.no_grad():
            eager = m(x, t, text, mask)
        _, inductors = compiled_with(type("Theirs", (InductorChoices,), {})())
        _, inner_only = compiled_with(InnerOnly())
        compiled, ours = compiled_with(InductorChoices())
    finally:
        V.set_choices_handler(before)
    assert inductors and not any(k.startswith("triton_per_") for k in inductors), inductors
    assert any(k.startswith("triton_red_") for k in inner_only), inner_only
    assert ours and all(k.startswith("triton_per_") for k in ours), ours
    assert relative_error(compiled, eager) < 1e-2


SMALL = dict(hidden=256, heads=4, depth=2, text_dim=128, mlp_ratio=2.5)  # the FP8 test's model (float8 matmuls
# need sizes in multiples of 16), from conftest.tiny_model: random non-zero weights, so no block is hidden


@needs_fp8
def test_fp8_linear_layers_stay_close_to_bf16_compiled_and_eager():
    """DiT.use_fp8 (torchao, rowwise float8) on a small model: the forward stays near the bf16 one (float8's e4m3
    keeps 3 mantissa bits, so a few percent), compiled equals eager, and the MLP leaves the fused GELU epilogue
    (which cannot take a float8 weight) for its two ops."""
    pytest.importorskip("torchao")
    m = tiny_model(**SMALL).cuda().to(torch.bfloat16)
    x = torch.randn(2, 3, 8, 32, 32, device="cuda", dtype=torch.bfloat16)
    t = torch.rand(2, device="cuda")
    text, mask = (a.cuda() for a in m.tokenize(["a red circle moving right", "a blue square"]))
    with torch.no_grad():
        bf16 = m(x, t, text, mask).float()
        m.use_fp8()
        with mock.patch("torch._addmm_activation", wraps=torch._addmm_activation) as fused:
            eager = m(x, t, text, mask).float()
        assert fused.call_count == 0
        compiled = m.compile_blocks()(x, t, text, mask).float()
    assert 0 < relative_error(eager, bf16) < 0.15, relative_error(eager, bf16)  # a wrong scale would be off by ~1
    assert relative_error(compiled, eager) < 0.05, relative_error(compiled, eager)
