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


def tiny_model(**overrides):
    """The tiny preset with random non-zero weights (seed 0): the zero-initialised output layers of a fresh model
    would predict zero velocity and hide every difference."""
    import torch
    from model import DiT, model_config
    torch.manual_seed(0)
    m = DiT(model_config("tiny", **overrides))
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return m.eval()


def tiny_checkpoint(path, meta, **overrides):
    """tiny_model(**overrides) saved at path with the given metadata (kind, video_shape, sampler); -> path."""
    from model import save_model
    m = tiny_model(**overrides)
    save_model(str(path), m.state_dict(), m.cfg, meta)
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
