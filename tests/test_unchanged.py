"""Behaviour pinned across refactors: the shipped checkpoints' GIFs and a stage-2 search on the shipped student,
against values recorded from the code before the 2026-11-27 restructuring (CPU, torch 2.13)."""
import hashlib
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import torch

import train
from attention import load_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GIFS = [  # (model, prompt, first 16 hex digits of the GIF's sha256), each with --steps 4 --seed 0
    ("efficient", "a red circle moving right", "12bf04300899f202"),
    ("efficient", "a cyan triangle moving up", "299f082ccd4e656c"),
    ("efficient", "a white square moving down", "80abf4764d6a0302"),
    ("mlcd", "a cyan triangle moving up", "723da18fa7dc5105"),
    ("base", "a white square moving down", "894dc409baf93c10"),
]

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


def test_shipped_checkpoints_give_the_same_gif_bytes(tmp_path):
    def sample(case):
        name, prompt, _ = case
        out = tmp_path / f"{name}-{prompt.replace(' ', '_')}.gif"
        r = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--model", name, "--prompt", prompt,
                            "--steps", "4", "--out", str(out)], capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        return hashlib.sha256(out.read_bytes()).hexdigest()[:16]
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(sample, GIFS))
    assert got == [want for *_, want in GIFS]


def test_stage2_search_on_the_shipped_student_is_unchanged(tmp_path):
    cfg = train.load_config(os.path.join(ROOT, "configs", "stage2.yaml"), [
        f"run_dir={tmp_path}", f"init={ROOT}/checkpoints/mlcd.safetensors", "calib_prompts=2", "calib_seeds=1",
        "candidates=[1, 2, 4]", "sweep=[]", "threshold=0.4"])
    train.train(cfg)
    search = torch.load(tmp_path / "search.pt", weights_only=True)
    torch.testing.assert_close(search["errors"], torch.tensor(SEARCH_ERRORS, dtype=torch.float64), rtol=1e-6, atol=0)
    assert load_plan(str(tmp_path / "plan.yaml")) == [1, 2, 1, 1, 1, 1, 1, 1]
