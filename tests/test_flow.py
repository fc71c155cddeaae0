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
