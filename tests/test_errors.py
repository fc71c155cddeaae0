"""A user's mistake at any entry point ends in a short message that names the input, a non-zero exit and no
traceback, before any expensive work (each case runs as its own process, as a user would run it)."""
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = os.path.join(ROOT, "configs")


def run(args, cwd, torchrun=0):
    launcher = [sys.executable] if not torchrun else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(torchrun), "--master_port", "0"]
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run(launcher + args, capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def cases(tmp):
    """(command, what the message must name) for every kind of bad input."""
    (tmp / "bad.yaml").write_text("stage: 0\nsteps: [1\n")
    (tmp / "afile").write_text("")
    py = lambda name: os.path.join(ROOT, name)
    out = [
        ([py("sample.py"), "--prompt", "a red circle moving right", "--cfg", "nan"], "--cfg"),
        ([py("sample.py"), "--prompt", "a red circle moving right", "--out", "v.txt"], "v.txt"),
        ([py("sample.py"), "--prompt", "a red circle moving right", "--out", "afile/v.gif"], "afile"),
        ([py("sample.py"), "--prompt", "a purple hexagon flying"], "'purple', 'hexagon', 'flying'"),
        ([py("sample.py"), "--prompt", " ".join(["a red circle moving right"] * 3)], "bytes"),
        ([py("sample.py"), "--prompt", "a red circle", "--checkpoint", "nope.safetensors"], "nope.safetensors"),
        ([py("sample.py"), "--prompt", "  "], "--prompt"),
        ([py("sample.py"), "--prompt", "a red circle", "--steps", "0"], "--steps"),
        ([py("evaluate.py"), "--checkpoint", "nope.safetensors"], "nope.safetensors"),
        ([py("evaluate.py"), "--dataset", "--n", "0"], "--n"),
        ([py("evaluate.py"), "--checkpoint", os.path.join(ROOT, "checkpoints", "mlcd.safetensors"),
          "--plan", "nope.yaml"], "nope.yaml"),
        ([py("train.py"), os.path.join(CFG, "stage1.yaml"), "init=nope.safetensors"], "init"),
        ([py("train.py"), os.path.join(CFG, "stage1.yaml"), f"init={ROOT}/checkpoints/base.safetensors",
          "teacher=nope.safetensors"], "teacher"),
        ([py("train.py"), os.path.join(CFG, "stage3.yaml"), f"init={ROOT}/checkpoints/mlcd.safetensors",
          "plan=nope.yaml"], "nope.yaml"),
        ([py("train.py"), os.path.join(CFG, "stage3.yaml"), "plan="], "plan"),
        ([py("train.py"), os.path.join(CFG, "stage0.yaml"), "data=no_such_folder"], "no_such_folder"),
        ([py("train.py"), os.path.join(CFG, "stage0.yaml"), "fp8=true"], "taken out"),
        ([py("train.py"), os.path.join(CFG, "stage0.yaml"), "run_dir=empty", "--export", "o.safetensors"], "--export"),
        ([py("train.py"), "bad.yaml"], "bad.yaml"),
        ([py("train.py"), os.path.join(CFG, "stage0.yaml"), "stpes=3"], "stpes"),
        ([py("train.py"), os.path.join(CFG, "stage0.yaml"), "sp_size=2"], "sp_size"),
        ([py("bench.py"), "plans"], "--checkpoint"),
        ([py("bench.py"), "sp", "--tiny", "--gpus", "3"], "--gpus"),
        ([py("data.py"), "--n", "0"], "--n"),
        ([py("data.py"), "--gif", "afile/x.gif"], "afile"),
    ]
    if not torch.cuda.is_available():
        out += [([py("sample.py"), "--prompt", "a red circle", "--device", "cuda"], "cuda"),
                ([py("evaluate.py"), "--checkpoint", os.path.join(ROOT, "checkpoints", "mlcd.safetensors"),
                  "--device", "cuda"], "cuda"),
                ([py("train.py"), os.path.join(CFG, "stage0.yaml"), "device=cuda"], "cuda"),
                ([py("sample.py"), "--prompt", "a red circle", "--precision", "fp8"], "fp8"),
                ([py("bench.py"), "model", "--tiny", "--fp8"], "--fp8")]
    return out


def test_bad_inputs_give_one_short_line(tmp_path):
    todo = cases(tmp_path)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda case: run(case[0], tmp_path), todo))
    for (args, names), r in zip(todo, results):
        shown = " ".join(os.path.basename(a) for a in args)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode != 0, f"{shown}: exit 0"
        assert "Traceback" not in r.stderr + r.stdout, f"{shown}:\n{r.stderr}"
        assert 1 <= len(lines) <= 3 and lines[-1].startswith("error: "), f"{shown}:\n{r.stderr}"
        assert names in r.stderr, f"{shown}: the message does not name {names!r}:\n{r.stderr}"
    assert not list(tmp_path.glob("*.gif")) and not (tmp_path / "empty").exists()  # nothing written


def test_sample_normalises_the_prompt(tmp_path):
    """Case, spaces and a final period do not change the video: the same GIF bytes as the caption form."""
    py = os.path.join(ROOT, "sample.py")
    a = run([py, "--prompt", "a red circle moving right", "--steps", "1", "--out", "a.gif"], tmp_path)
    b = run([py, "--prompt", "  A Red   Circle Moving RIGHT. ", "--steps", "1", "--out", "b.gif"], tmp_path)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert (tmp_path / "a.gif").read_bytes() == (tmp_path / "b.gif").read_bytes()


def test_torchrun_with_a_process_count_that_does_not_split_the_heads(tmp_path):
    """Rank 0 says once which counts work (torchrun then reports the failed processes itself)."""
    r = run([os.path.join(ROOT, "sample.py"), "--prompt", "a red circle moving right"], tmp_path, torchrun=3)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: processes=3: the model's 4 attention heads do not split over 3 processes; "
                      "use one of 1, 2, 4"], r.stderr
    assert 'sample.py", line' not in r.stderr  # no traceback from our code
