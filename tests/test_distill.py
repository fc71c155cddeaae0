"""MLCD against analytic cases: a point-mass data distribution, whose flow velocity (x - x*) / t is linear in x
and whose ODE paths are straight lines, so every exact jump lands on the known trajectory."""
import os

import pytest
import torch

import distill
import flow
import checkpoint
import train
from conftest import read_log, tiny_checkpoint, train_killed_at

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def point_mass(target):
    return lambda x, t: (x - target) / t.view(-1, *([1] * (x.dim() - 1)))


def test_segment_start():
    t = torch.tensor([1.0, 0.75, 0.74, 0.5, 0.26, 0.25, 0.01])
    assert torch.equal(distill.segment_start(t, 4), torch.tensor([0.75, 0.5, 0.5, 0.25, 0.25, 0.0, 0.0]))
    t = distill.sample_times(10000, torch.Generator().manual_seed(0))
    assert ((t > 0) & (t <= 1)).all()
    counts = torch.bincount((distill.segment_start(t, 4) * 4).long(), minlength=4)
    assert counts.min() > 2300  # segments drawn about equally


def test_consistency_target_is_the_trajectory_point_at_segment_start():
    g = torch.Generator().manual_seed(0)
    x_star, eps = torch.randn(3, 2, 5, dtype=torch.float64, generator=g), torch.randn(3, 2, 5, dtype=torch.float64, generator=g)
    t = torch.tensor([0.9, 0.6, 0.3], dtype=torch.float64)
    s = distill.segment_start(t, 4)
    x_t = flow.interpolate(x_star, eps, t)
    target = distill.consistency_target(point_mass(x_star), point_mass(x_star), x_t, t, s, teacher_dt=1 / 64)
    assert torch.allclose(target, flow.interpolate(x_star, eps, s), atol=1e-12)


def test_loss_is_zero_when_student_is_the_teacher_ode_map():
    g = torch.Generator().manual_seed(1)
    x_star, eps = torch.randn(4, 3, 6, dtype=torch.float64, generator=g), torch.randn(4, 3, 6, dtype=torch.float64, generator=g)
    field = point_mass(x_star)
    t = distill.sample_times(4, g).double()
    assert distill.mlcd_loss(field, field, field, x_star, eps, t, 4, 64, huber_c=1e-3).item() == pytest.approx(0, abs=1e-12)
    wrong = lambda x, tt: field(x, tt) * 1.1
    assert distill.mlcd_loss(wrong, field, field, x_star, eps, t, 4, 64).item() > 1e-3


def test_jump_is_identity_at_the_boundary():
    x, v = torch.randn(2, 3), torch.randn(2, 3)
    t = torch.tensor([0.5, 0.25])
    assert torch.equal(distill.jump(x, t, t, v), x)


def test_pseudo_huber():
    a, b = torch.zeros(4), torch.tensor([0.0, 3.0, -4.0, 0.0])
    c = 1e-3
    expected = ((torch.tensor([0.0, 9.0, 16.0, 0.0]) + c * c).sqrt() - c).mean()
    assert distill.pseudo_huber(a, b, c).item() == pytest.approx(expected.item())


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A tiny 'base model' with random non-zero weights (a freshly initialised one predicts zero velocity)."""
    return tiny_checkpoint(tmp_path_factory.mktemp("base") / "base.safetensors",
                           {"kind": "base", "video_shape": [3, 4, 16, 16]})


def stage1_cfg(tmp_path, base, *extra):
    return train.load_config(os.path.join(ROOT, "configs", "stage1.yaml"), [
        f"run_dir={tmp_path / 'run'}", f"init={base}", f"teacher={base}", "batch_size=8", "num_frames=4",
        "size=16", "log_every=1", "warmup=1", "lr=3e-3", "compile=false", *extra])


def test_tiny_stage1_loss_decreases(tmp_path, tiny_base, one_fixed_batch):
    records = train.train(stage1_cfg(tmp_path, tiny_base, "steps=40", "ckpt_every=100", "target=stopgrad"))
    first, last = records[0]["loss"], sum(r["loss"] for r in records[-5:]) / 5
    assert last < 0.5 * first


def test_stage1_checkpoint_resumes_exactly_and_samples_in_k_steps(tmp_path, tiny_base, monkeypatch):
    straight = stage1_cfg(tmp_path / "a", tiny_base, "steps=4", "ckpt_every=2")
    train.train(straight)
    crashed = stage1_cfg(tmp_path / "b", tiny_base, "steps=4", "ckpt_every=2")
    train_killed_at(monkeypatch, crashed, 2)
    resumed = train.train(crashed)
    a = {r["step"]: r["loss"] for r in read_log(straight.run_dir)}
    assert [r["step"] for r in resumed] == [3, 4]
    assert all(a[r["step"]] == r["loss"] for r in resumed)
    from model import load_model
    _, meta = load_model(os.path.join(checkpoint.checkpoints(crashed.run_dir)[-1], "ema.safetensors"))
    assert meta["kind"] == "mlcd" and flow.sampler_settings(meta) == {"name": "euler", "steps": 4, "cfg": 1.0, "shift": 1.0}


def test_stage1_needs_a_model_to_distil():
    with pytest.raises(ValueError, match="init"):
        train.load_config(os.path.join(ROOT, "configs", "stage1.yaml"), ["init=", "teacher="])
