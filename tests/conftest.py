import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def read_log(run_dir):
    """The JSONL records train.py wrote to run_dir/log.jsonl."""
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture
def one_fixed_batch(monkeypatch):
    """Every step of train.train sees step 0's batch, times and noise, so a loss curve shows learning rather
    than batch noise."""
    import train
    fixed = {}
    batch, gen = train.get_batch, train.sample_generator
    monkeypatch.setattr(train, "get_batch",
                        lambda cfg, m, d, step, *a: fixed[0] if fixed else fixed.setdefault(0, batch(cfg, m, d, 0, *a)))
    monkeypatch.setattr(train, "sample_generator", lambda cfg, step, *a: gen(cfg, 0, *a))


def tiny_model(mask_plan="full", attn_backend="auto", **overrides):
    """The tiny preset with random non-zero weights (seed 0): the zero-initialised output layers of a fresh model
    would predict zero velocity and hide every difference."""
    import torch
    from model import DiT, model_config
    torch.manual_seed(0)
    m = DiT(model_config("tiny", **overrides), mask_plan, attn_backend)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return m.eval()


def tiny_checkpoint(path, meta, **overrides):
    """tiny_model(**overrides) saved at path with the given metadata (kind, video_shape, sampler); -> path."""
    from model import save_model
    m = tiny_model(**overrides)
    save_model(str(path), m, meta)
    return str(path)


def train_killed_at(monkeypatch, cfg, step):
    """Run train.train(cfg) and kill it (KeyboardInterrupt) as it starts step index `step`, as a crash or a
    lost lease would; the next train.train(cfg) resumes."""
    import train
    real = train.get_batch

    def killed(c, model, dataset, s, *a):
        if s == step:
            raise KeyboardInterrupt
        return real(c, model, dataset, s, *a)
    monkeypatch.setattr(train, "get_batch", killed)
    with pytest.raises(KeyboardInterrupt):
        train.train(cfg)
    monkeypatch.setattr(train, "get_batch", real)


def gif_frames(path):
    """The frames of an animated GIF as uint8 [T, H, W, 3]."""
    import numpy as np
    from PIL import Image, ImageSequence
    return np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(Image.open(path))])


def assert_frames_close(got, want, what=""):
    """Decoded frames equal up to what another CPU or thread count changes (a level or two where a float lands on
    the other side of a rounding or palette boundary), not up to a changed model, sampler or prompt."""
    import numpy as np
    assert got.shape == want.shape, (what, got.shape, want.shape)
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert diff.max() <= 4 and diff.mean() <= 0.1, f"{what}: frames differ by up to {diff.max()} levels, mean {diff.mean():.3f}"
