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
    batch, gen = train.get_batch, train.step_generator
    monkeypatch.setattr(train, "get_batch",
                        lambda cfg, m, d, step, *a: fixed[0] if fixed else fixed.setdefault(0, batch(cfg, m, d, 0, *a)))
    monkeypatch.setattr(train, "step_generator", lambda cfg, step, rank, device: gen(cfg, 0, rank, device))
