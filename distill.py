"""Distillation objectives: stage 1, multi-step latent consistency distillation (MLCD).

    torchrun train.py configs/stage1.yaml        # train.py runs the loop; this file holds the math

MLCD (Efficient-vDiT stage 1, after Heek et al. 2024, "Multistep Consistency Models", arXiv 2403.06807),
for a rectified-flow model (flow.py: x_t = (1 - t) x0 + t eps, dx/dt = v):

    Split [0, 1] into K equal segments with starts s_j = j / K. For data x0, noise eps and a time t inside
    segment j (s_j < t <= s_j+1), with x_t on the straight path:
      teacher:  x_t' = x_t + (t' - t) v_teacher^w(x_t, t),   t' = max(t - 1/N, s_j)
                one Euler step of the frozen base model with classifier-free guidance w, toward s_j
      jump:     f(x, t; v) = x + (s_j - t) v(x, t)          the segment's consistency function; f = x at t = s_j
      loss:     pseudo_huber( f(x_t, t; v_student),  stopgrad f(x_t', t'; v_target) ),
                pseudo_huber(a, b) = mean( sqrt((a - b)^2 + c^2) - c )
    The target network is an EMA of the student or the student itself under stop-gradient.
    Sampling takes one Euler jump per segment from t = 1 down to 0: K forward passes and no guidance, which
    is flow.euler_sample with K steps (sample.py reads K from the checkpoint).

Leaves out: the mask search and sparse distillation (stages 2 and 3, later in this file).
"""
import torch

import flow


def segment_start(t, num_segments: int):
    """s_j for each t in (0, 1]: the start (data side) of the segment holding t."""
    return torch.clamp(torch.ceil(t * num_segments) - 1, min=0) / num_segments


def sample_segment_times(n, num_segments: int, generator=None, device=None):
    """t uniform in (0, 1], so every segment is drawn equally often and t never sits on a segment start."""
    return 1 - torch.rand(n, generator=generator, device=device)


def jump(x, t, s, v):
    """Euler jump from time t to time s along velocity v (broadcast over a batch of times)."""
    return x + (s - t).view(-1, *([1] * (x.dim() - 1))) * v


def pseudo_huber(a, b, c: float = 1e-3):
    return (torch.sqrt((a.float() - b.float()).pow(2) + c * c) - c).mean()


def consistency_target(teacher_fn, target_fn, x_t, t, s, teacher_dt: float):
    """The teacher's solver step from t toward the segment start s, then the target network's jump to s."""
    t_prev = torch.maximum(t - teacher_dt, s)
    x_prev = jump(x_t, t, t_prev, teacher_fn(x_t, t))
    return jump(x_prev, t_prev, s, target_fn(x_prev, t_prev))


def mlcd_loss(student_fn, teacher_fn, target_fn, x0, eps, t, num_segments: int, teacher_steps: int,
              huber_c: float = 1e-3):
    """student_fn / teacher_fn / target_fn: (x, t) -> velocity. teacher_fn includes guidance; the teacher and
    target are evaluated without gradients."""
    s = segment_start(t, num_segments)
    x_t = flow.interpolate(x0, eps, t)
    with torch.no_grad():
        target = consistency_target(teacher_fn, target_fn, x_t, t, s, 1.0 / teacher_steps)
    return pseudo_huber(jump(x_t, t, s, student_fn(x_t, t)), target, huber_c)
