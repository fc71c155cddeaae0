"""The flow objective and sampler against known solutions."""
import pytest
import torch

import flow


def test_interpolate_endpoints_and_velocity():
    x0, eps = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    assert torch.allclose(flow.interpolate(x0, eps, torch.zeros(3)), x0)
    assert torch.allclose(flow.interpolate(x0, eps, torch.ones(3)), eps)
    # the exact velocity has zero loss
    loss = flow.flow_loss(lambda xt, t: eps - x0, x0, torch.rand(3), eps)
    assert loss.item() == 0


@pytest.mark.parametrize("steps,shift", [(1, 1.0), (4, 1.0), (50, 1.0), (7, 3.0)])
def test_euler_recovers_the_point_mass_exactly(steps, shift):
    """For data concentrated at x*, the flow's velocity is v(x, t) = (x - x*) / t, linear in x, and its paths
    are straight: Euler integrates it exactly from any noise, in any number of steps."""
    target = torch.randn(2, 3, 4, 5, 5, dtype=torch.float64)
    noise = torch.randn_like(target)
    out = flow.euler_sample(lambda x, t: (x - target) / t.view(-1, 1, 1, 1, 1), noise, steps, shift)
    assert torch.allclose(out, target, atol=1e-10)


def test_euler_constant_field_and_time_grid():
    c = torch.randn(1, 3)
    out = flow.euler_sample(lambda x, t: c.expand_as(x), torch.zeros(1, 3), 5)
    assert torch.allclose(out, -c)  # x(0) = x(1) - c
    ts = flow.time_grid(10, shift=3.0)
    assert ts[0] == 1 and ts[-1] == 0 and (ts[1:] < ts[:-1]).all()


def test_cfg_velocity_combines_both_halves():
    class Fake(torch.nn.Module):
        def forward(self, x, t, ctx, mask, encoded):
            return x * 0 + ctx[:, :1, :1].view(-1, 1)  # velocity = the context's first value
    cond, uncond = (torch.full((2, 3, 1), 2.0), torch.ones(2, 3, dtype=torch.bool)), \
                   (torch.full((2, 3, 1), 0.5), torch.ones(2, 3, dtype=torch.bool))
    x, t = torch.zeros(2, 4), torch.rand(2)
    v = flow.cfg_velocity(Fake(), x, t, cond, uncond, 3.0)
    assert torch.allclose(v, torch.full_like(x, 0.5 + 3.0 * (2.0 - 0.5)))
    assert torch.allclose(flow.cfg_velocity(Fake(), x, t, cond, uncond, 1.0), torch.full_like(x, 2.0))


def test_sample_t():
    g = torch.Generator().manual_seed(0)
    for dist in ("uniform", "logit_normal"):
        t = flow.sample_t(1000, g, dist=dist)
        assert ((t > 0) & (t < 1)).all()
    with pytest.raises(ValueError):
        flow.sample_t(3, g, dist="beta")
    plain = flow.sample_t(4000, torch.Generator().manual_seed(1))
    shifted = flow.sample_t(4000, torch.Generator().manual_seed(1), shift=3.0)
    assert torch.allclose(shifted, 3 * plain / (1 + 2 * plain)) and (shifted >= plain).all()


def test_generate_from_precomputed_embeddings_is_guided_euler():
    """flow.generate for a model that reads text embeddings (OSP-1.2's kind): the Euler steps with guidance
    against the single-zero-token unconditional input, written out by hand."""
    from conftest import tiny_model
    m = tiny_model(text_encoder="none", text_dim=16)
    emb, mask = torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    out = flow.generate(m, (emb, mask), [3, 2, 8, 8], {"name": "euler", "steps": 2, "cfg": 3.0, "shift": 1.0}, seed=1)
    null, null_mask = torch.zeros_like(emb), torch.zeros(2, 5, dtype=torch.bool)
    null_mask[:, 0] = True
    x = torch.randn(2, 3, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for t0, t1 in ((1.0, 0.5), (0.5, 0.0)):
            t = torch.full((2,), t0)
            v_cond, v_uncond = m(x, t, emb, mask), m(x, t, null, null_mask)
            x = x + (t1 - t0) * (v_uncond + 3.0 * (v_cond - v_uncond))
    assert torch.allclose(out, x, atol=1e-5)
    with pytest.raises(ValueError, match="precomputed text embeddings"):
        flow.generate(m, ["a red circle"], [3, 2, 8, 8], {"name": "euler", "steps": 1, "cfg": 1.0, "shift": 1.0})
