"""Behaviour pinned across refactors: the shipped checkpoints' videos and a stage-2 search on the shipped student,
against values recorded from the code before the 2026-11-27 restructuring (CPU, torch 2.13). Compared as decoded
frames and numbers with a tolerance that holds on any x86-64 CPU and thread count, never as bytes: the frames in
tests/data/shipped_frames.npz were recorded on 2026-12-01 (Intel Xeon, 2 threads) by code whose float outputs equal
the 2026-11-27 code's bit for bit there; a 1e-3 perturbation of a video moves no decoded GIF pixel by more than one
level, a changed model or sampler moves most of them."""
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

import train
from attention import load_plan
from conftest import assert_frames_close, gif_frames

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRAMES = os.path.join(ROOT, "tests", "data", "shipped_frames.npz")  # "model|prompt" -> uint8 [T, 32, 32, 3]

# calib_prompts=2, calib_seeds=1, candidates [1, 2, 4] on checkpoints/mlcd.safetensors: relative L2 per layer
SEARCH_ERRORS = [
    [0.18625723103907468, 0.1416499887488432, 0.08715290856166104],
    [0.5760486729347682, 0.32056900013824213, 0.16095362542866862],
    [0.313656109580972, 0.24303388694159725, 0.14420482774285287],
    [0.3232558680762328, 0.22292306781215354, 0.13435300136212672],
    [0.30615974987545647, 0.21804916854992454, 0.13020802361407693],
    [0.3082952934269908, 0.21317001443840433, 0.13459560081090874],
    [0.25196218800335296, 0.17972087296937245, 0.11446212947159864],
    [0.142035081044731, 0.09370565914817573, 0.0575205232006843],
]


def test_shipped_checkpoints_give_the_same_videos(tmp_path):
    """sample.py --steps 4 --seed 0 on each shipped checkpoint: the GIF's frames (enlarged 8 x by nearest
    neighbour, so every 8th pixel is one of the model's) against the recorded ones."""
    reference = np.load(FRAMES)

    def sample(key):
        name, prompt = key.split("|")
        out = tmp_path / f"{name}-{prompt.replace(' ', '_')}.gif"
        r = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--model", name, "--prompt", prompt,
                            "--steps", "4", "--out", str(out)], capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        return gif_frames(out)[:, ::8, ::8]
    with ThreadPoolExecutor(2) as pool:
        got = dict(zip(reference.files, pool.map(sample, reference.files)))
    for key in reference.files:
        assert_frames_close(got[key], reference[key], key)


def test_stage2_search_on_the_shipped_student_is_unchanged(tmp_path):
    cfg = train.load_config(os.path.join(ROOT, "configs", "stage2.yaml"), [
        f"run_dir={tmp_path}", f"init={ROOT}/checkpoints/mlcd.safetensors", "calib_prompts=2", "calib_seeds=1",
        "candidates=[1, 2, 4]", "sweep=[]", "threshold=0.4"])
    train.train(cfg)
    search = torch.load(tmp_path / "search.pt", weights_only=True)
    torch.testing.assert_close(search["errors"], torch.tensor(SEARCH_ERRORS, dtype=torch.float64), rtol=1e-4, atol=0)
    assert load_plan(str(tmp_path / "plan.yaml")) == [1, 2, 1, 1, 1, 1, 1, 1]
