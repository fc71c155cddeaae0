"""Rectified flow: the training loss and the samplers, apart from the network.

Convention: x_t = (1 - t) x0 + t eps, t = 0 is data, t = 1 is noise; the network predicts the velocity
v = eps - x0, so dx/dt = v and one Euler step from t to s is x_s = x_t + (s - t) v.
Used by train.py (stage 0 loss), sample.py, evaluate.py and the mask search (`generate`: prompts -> videos in a
checkpoint's recipe) and distill.py (the teacher's solver step). Leaves out: anything about the network's
shape; the text goes through the model's own tokenize / encode_text.
"""
import torch

from cli import UserError


def interpolate(x0, eps, t):
    """x_t for a batch of times t: [B]."""
    t = t.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - t) * x0 + t * eps


def shift_t(t, shift: float):
    """SD3's time shift: shift > 1 moves times toward the noise end (t = 1), keeping 0 and 1 fixed."""
    return shift * t / (1 + (shift - 1) * t)


def sample_t(n, generator=None, device=None, dist="logit_normal", shift: float = 1.0):
    """Training times in (0, 1): logit-normal (SD3) puts more weight on the middle of the path; shift > 1
    trains more at high noise, where a video's global layout (and its motion) is decided."""
    if dist == "uniform":
        t = torch.rand(n, generator=generator, device=device)
    elif dist == "logit_normal":
        t = torch.sigmoid(torch.randn(n, generator=generator, device=device))
    else:
        raise ValueError(f"unknown t distribution {dist!r}: use 'uniform' or 'logit_normal'")
    return shift_t(t, shift)


def flow_loss(velocity_fn, x0, t, eps):
    """Mean squared error of the predicted velocity. velocity_fn(x_t, t) -> v."""
    return (velocity_fn(interpolate(x0, eps, t), t).float() - (eps - x0).float()).pow(2).mean()


def cfg_velocity(model, x, t, cond, uncond, scale: float):
    """Classifier-free guidance: v_u + w (v_c - v_u), both halves in one batch. cond/uncond are
    (context, mask) pairs from model.encode_text; scale 1 skips the unconditional pass."""
    if scale == 1.0:
        return model(x, t, *cond, encoded=True)
    ctx = torch.cat([cond[0], uncond[0]]), torch.cat([cond[1], uncond[1]])
    v_c, v_u = model(torch.cat([x, x]), torch.cat([t, t]), *ctx, encoded=True).chunk(2)
    return v_u + scale * (v_c - v_u)


def time_grid(steps: int, device=None, shift: float = 1.0):
    """steps + 1 times from 1 to 0; shift > 1 spends more steps near the noise end (SD3's time shift)."""
    return shift_t(torch.linspace(1, 0, steps + 1, device=device), shift)


@torch.no_grad()
def euler_sample(velocity_fn, noise, steps: int, shift: float = 1.0, progress=None):
    """Integrate dx/dt = v from t = 1 (noise) to t = 0. velocity_fn(x, t[B]) -> v."""
    x = noise
    ts = time_grid(steps, noise.device, shift)
    for i in (progress or (lambda r: r))(range(steps)):
        t = ts[i].expand(x.shape[0])
        x = x + (ts[i + 1] - ts[i]) * velocity_fn(x, t).to(x.dtype)
    return x


def euler_sampler(steps: int, cfg: float = 1.0, shift: float = 1.0) -> dict:
    """The sampler a checkpoint's metadata names (sampler_settings reads it): Euler, `steps` steps, guidance `cfg`
    (1: none), time shift `shift`."""
    return {"name": "euler", "steps": steps, "cfg": cfg, "shift": shift}


DEFAULT_SAMPLER = euler_sampler(50)


def sampler_settings(meta: dict, steps=None, cfg=None, shift=None) -> dict:
    """The checkpoint's sampler (its metadata's `sampler`), with any of steps / cfg / shift overridden."""
    s = {**DEFAULT_SAMPLER, **meta.get("sampler", {})}
    for key, value in (("steps", steps), ("cfg", cfg), ("shift", shift)):
        if value is not None:
            s[key] = value
    if s["name"] != "euler":
        raise UserError(f"the checkpoint asks for sampler {s['name']!r}; this code knows 'euler'")
    return s


def null_text(model, n, like=None, null=None):
    """The unconditional input of n samples: the empty caption; for a model reading precomputed embeddings (`like`
    one of them), `null`, the empty caption's own embedding and mask ([L, D], [L]: a data folder's
    null.safetensors, or a --negative-emb file), or else a single zero token."""
    if model.cfg.reads_captions:
        return model.tokenize([""] * n)
    if null is not None:
        emb, mask = null
        return emb.to(like).expand(n, -1, -1), mask.to(like.device, torch.bool).expand(n, -1)
    emb = torch.zeros_like(like)
    mask = torch.zeros(emb.shape[:2], dtype=torch.bool, device=emb.device)
    mask[:, 0] = True
    return emb, mask


@torch.inference_mode()
def generate(model, prompts, video_shape, sampler: dict, seed: int = 0, progress=None, null=None):
    """-> videos [n, *video_shape] for the prompts (a list of strings, or for a model without a text encoder a
    pair of precomputed text embeddings [n, L, text_dim] and mask [n, L]) with a sampler from sampler_settings.
    The noise depends only on the seed (drawn on the CPU); the unconditional input (null_text, with `null` for an
    embedding model) is encoded only where guidance needs it."""
    if isinstance(prompts, tuple):
        text, mask = prompts
    elif not model.cfg.reads_captions:
        raise UserError("this checkpoint reads precomputed text embeddings (text_encoder: none); prompts need a "
                        "model with its own byte-level text encoder")
    else:
        text, mask = model.tokenize(prompts)
    weight = next(model.parameters())
    inputs = lambda x: x.to(weight.device, weight.dtype if x.is_floating_point() else x.dtype)  # noqa: E731
    noise = torch.randn(len(text), *video_shape, generator=torch.Generator().manual_seed(seed)).to(weight.device)
    cond = model.encode_text(inputs(text), inputs(mask))
    uncond = None if sampler["cfg"] == 1.0 else \
        model.encode_text(*(inputs(x) for x in null_text(model, len(text), text, null)))
    # the path is integrated in float32 whatever the model's dtype (a bf16 model on a GPU)
    return euler_sample(lambda x, t: cfg_velocity(model, inputs(x), t, cond, uncond, sampler["cfg"]),
                        noise, sampler["steps"], sampler["shift"], progress)
