"""The faults of a shared cluster, each against an uninterrupted run or the files as they were: SIGTERM (alone and
under torchrun, DDP and fsdp) checkpoints the step reached and the rerun resumes it with each step logged once; a
write that fails (a file size limit standing in for a full disk) is one line and leaves the checkpoints before it
valid; a killed torchrun worker ends the job and the rerun (also at another process count) reaches the same losses;
a run folder in use refuses a second run, a dead run's lock does not; broken or disagreeing data shards are one line
naming them; outputs are whole or absent; Ctrl-C is one line and status 130."""
import os
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
import train
from conftest import read_log
from data import ShardDataset, write_shard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "stage0.yaml")
# min_lr_frac=1: a constant rate after warmup, so a run started for 500 steps and stopped takes the same steps as one
# started for fewer (the cosine decay reads `steps`)
TINY = ["model=tiny", "batch_size=4", "log_every=1", "warmup=1", "min_lr_frac=1", "compile=false", "num_frames=4",
        "size=16"]


def command(run_dir, *overrides, nproc=1, port=None):
    launcher = [sys.executable] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port)]
    return launcher + [os.path.join(ROOT, "train.py"), CONFIG, f"run_dir={run_dir}", *TINY, *overrides]


def clean_env():
    return {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), cwd=ROOT, **kw)


def finish(p, timeout=120):
    """(stdout, stderr) of a started process; killed, never left running, if it does not end in time."""
    try:
        return p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        raise AssertionError(f"did not end in {timeout} s: {err[-2000:]}") from None


def start_and_wait(cmd, run_dir, lines: int):
    """Start cmd and return it once its log holds `lines` records."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(), cwd=ROOT)
    log = os.path.join(run_dir, "log.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        if os.path.isfile(log) and len(open(log).read().splitlines()) >= lines:
            return p
        time.sleep(0.2)
    p.kill()
    raise AssertionError(f"the run did not log {lines} steps: {p.communicate()[1][-2000:]}")


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_log(run_dir)}


# ----------------------------------------------------------------------------------------------------------
# Preemption

@pytest.mark.parametrize("nproc, fsdp, sig", [(1, False, "SIGTERM"), (2, False, "SIGUSR1"), (2, True, "SIGTERM")])
def test_a_stop_signal_checkpoints_the_step_reached_and_the_rerun_resumes(tmp_path, nproc, fsdp, sig):
    """SIGTERM as SLURM sends it (to every task, and torchrun passes it on again: each worker sees it twice) or
    SIGUSR1 (SLURM's --signal, which torchrun forwards when told to)."""
    run_dir = str(tmp_path / "run")
    extra = ["steps=500", "ckpt_every=1000", f"fsdp={str(fsdp).lower()}"]
    cmd = command(run_dir, *extra, nproc=nproc, port=free_port())
    if sig == "SIGUSR1":
        cmd[3:3] = ["--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"]
    p = start_and_wait(cmd, run_dir, 3)
    if nproc > 1 and sig == "SIGTERM":
        for pid in workers(p.pid).values():
            os.kill(pid, signal.SIGTERM)
    p.send_signal(getattr(signal, sig))
    out, err = finish(p)
    steps = [r["step"] for r in read_log(run_dir)]
    n = steps[-1]
    assert steps == list(range(1, n + 1)) and f"{sig} received: stopped after step" in out, err[-2000:]
    assert [os.path.basename(c) for c in checkpoint.checkpoints(run_dir)] == [f"ckpt-{n:07d}"]  # all ranks agreed
    if nproc == 1:
        assert p.returncode == 0
    r = run(command(run_dir, *extra[1:], f"steps={n + 2}", nproc=nproc, port=free_port()))
    assert r.returncode == 0 and f"resumed from {run_dir}/ckpt-{n:07d}" in r.stdout, r.stderr[-2000:]
    assert [s["step"] for s in read_log(run_dir)] == list(range(1, n + 3))  # each step once
    if nproc == 1:  # the same losses as a run that was never stopped
        straight = str(tmp_path / "straight")
        assert run(command(straight, f"steps={n + 2}", "ckpt_every=1000")).returncode == 0
        assert losses(straight) == losses(run_dir)


# ----------------------------------------------------------------------------------------------------------
# Failed writes

def one_error_line(stderr: str) -> str:
    """The one `error:` line of a command's stderr (progress bars aside), with no traceback."""
    errors = [line for line in stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-2000:]
    return errors[0]


def limited(max_bytes: int):
    """A child process in which no file grows beyond max_bytes (EFBIG, as a full disk or a quota gives ENOSPC)."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return apply


@pytest.mark.parametrize("fsdp", [False, True])
def test_a_failed_checkpoint_write_is_one_line_and_the_rerun_completes(tmp_path, fsdp):
    run_dir = str(tmp_path / "run")
    extra = ["ckpt_every=2", f"fsdp={str(fsdp).lower()}"]  # safetensors files, or DCP shards and state.pt
    assert run(command(run_dir, "steps=2", *extra)).returncode == 0
    r = run(command(run_dir, "steps=4", *extra), preexec_fn=limited(64 * 1024))
    line = one_error_line(r.stderr)
    assert r.returncode == 2 and "cannot write checkpoint" in line and "ckpt-0000004': " in line
    assert "ckpt-0000002 is the newest): free the space" in line and ("File too large" in line or "stopped short" in line)
    assert [os.path.basename(c) for c in checkpoint.checkpoints(run_dir)] == ["ckpt-0000002"]
    assert not [n for n in os.listdir(run_dir) if n.startswith(".tmp")]  # no half checkpoint left
    assert run(command(run_dir, "steps=4", *extra)).returncode == 0  # the disk freed: it resumes
    assert [s["step"] for s in read_log(run_dir)] == [1, 2, 3, 4]
    straight = str(tmp_path / "straight")
    assert run(command(straight, "steps=4", *extra)).returncode == 0
    assert losses(straight) == losses(run_dir)
    broken = "state.pt" if fsdp else "ema.safetensors"  # what export reads: it says so in one line
    (tmp_path / "run" / "ckpt-0000004" / broken).write_bytes(b"cut short")
    r = run([sys.executable, "train.py", CONFIG, f"run_dir={run_dir}", *TINY, *extra, "--export",
             str(tmp_path / "w.safetensors")])
    assert r.returncode == 2 and "ckpt-0000004" in one_error_line(r.stderr)


def test_failed_output_writes_leave_the_old_file_and_no_partial_one(tmp_path):
    gif = tmp_path / "v.gif"
    gif.write_bytes(b"an older video")
    r = run([sys.executable, "sample.py", "--prompt", "a red circle moving right", "--out", str(gif)],
            preexec_fn=limited(16 * 1024))
    assert r.returncode == 2 and "cannot write" in one_error_line(r.stderr) and "v.gif" in r.stderr
    assert gif.read_bytes() == b"an older video" and os.listdir(tmp_path) == ["v.gif"]
    run_dir = str(tmp_path / "run")
    assert run(command(run_dir, "steps=2", "ckpt_every=2")).returncode == 0
    out = tmp_path / "w.safetensors"
    r = run([sys.executable, "train.py", CONFIG, f"run_dir={run_dir}", *TINY, "--export", str(out)],
            preexec_fn=limited(64 * 1024))
    assert r.returncode == 2 and "w.safetensors': File too large" in one_error_line(r.stderr)
    assert sorted(os.listdir(tmp_path)) == ["run", "v.gif"]


@pytest.mark.parametrize("sig, status, line", [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated")])
def test_ctrl_c_or_sigterm_is_one_line_with_nothing_written(tmp_path, sig, status, line):
    out = tmp_path / "base.gif"
    # Ctrl-C as a terminal delivers it: a test run started in the background (`nohup ... &`) hands its children
    # SIGINT ignored, which Python then keeps ignoring, as a background job should
    p = subprocess.Popen([sys.executable, "sample.py", "--model", "base", "--prompt", "a red circle moving right",
                          "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                         env={**clean_env(), "PYTHONUNBUFFERED": "1"},
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert p.stdout.readline().startswith("attention:")  # printed just before the 50 guided steps start
    time.sleep(1)
    p.send_signal(getattr(signal, sig))
    _, err = finish(p, 60)
    lines = [text for text in err.splitlines() if text.strip() and "sampling" not in text]
    assert p.returncode == status and lines == [line], err[-2000:]
    assert not os.listdir(tmp_path)


# ----------------------------------------------------------------------------------------------------------
# A rank dies

def workers(launcher_pid: int) -> dict:
    """{rank: pid} of a torchrun launcher's worker processes (its children that have a RANK)."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{pid}/stat").read()
            if int(stat.rsplit(")", 1)[1].split()[1]) != launcher_pid:  # the parent's pid, after the command name
                continue
            env = dict(kv.split("=", 1) for kv in open(f"/proc/{pid}/environ").read().split("\0") if "=" in kv)
        except OSError:  # a process that ended meanwhile
            continue
        if "RANK" in env:
            out[int(env["RANK"])] = int(pid)
    return out


@pytest.mark.parametrize("fsdp, rerun_nproc", [(False, 2), (True, 1)])
def test_a_killed_worker_ends_the_job_and_the_rerun_reaches_the_same_losses(tmp_path, fsdp, rerun_nproc):
    run_dir = str(tmp_path / "run")
    extra = ["ckpt_every=2", f"fsdp={str(fsdp).lower()}"]
    p = start_and_wait(command(run_dir, "steps=500", *extra, nproc=2, port=free_port()), run_dir, 3)
    os.kill(workers(p.pid)[1], signal.SIGKILL)
    t0 = time.time()
    finish(p)  # no hang: the job ends
    assert p.returncode != 0 and time.time() - t0 < 90
    done = len(read_log(run_dir))
    target = done + 3
    r = run(command(run_dir, f"steps={target}", *extra, nproc=rerun_nproc, port=free_port()))
    assert r.returncode == 0, r.stderr[-2000:]
    straight = str(tmp_path / "straight")
    assert run(command(straight, f"steps={target}", *extra, nproc=2, port=free_port())).returncode == 0
    a, b = losses(straight), losses(run_dir)
    assert sorted(b) == list(range(1, target + 1))
    assert all(abs(a[s] - b[s]) <= 1e-4 * abs(a[s]) for s in a), (a, b)


# ----------------------------------------------------------------------------------------------------------
# One writer per run folder

def test_a_run_folder_in_use_refuses_a_second_run_and_a_dead_runs_lock_does_not(tmp_path, monkeypatch, capsys):
    import fcntl
    cfg = train.load_config(CONFIG, [f"run_dir={tmp_path / 'run'}", *TINY, "steps=1"])
    os.makedirs(cfg.run_dir)
    lock = os.path.join(cfg.run_dir, ".lock")
    with open(lock, "w") as held:
        held.write("process 4242 on node-7")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ValueError, match="in use by process 4242 on node-7"):
            train.train(cfg)
        assert not checkpoint.checkpoints(cfg.run_dir)
    # the holder is gone (its lock file stays, unlocked): nothing to clean up by hand
    assert [r["step"] for r in train.train(cfg)] == [1]
    def no_flock(fd, op):  # a file system without flock: the run goes on, with a warning
        raise OSError(37, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_flock)
    capsys.readouterr()
    assert [r["step"] for r in train.train(train.load_config(CONFIG, [f"run_dir={tmp_path / 'nfs'}", *TINY,
                                                                      "steps=1"]))] == [1]
    assert "cannot be locked here (No locks available)" in capsys.readouterr().err
    r = run([sys.executable, "train.py", CONFIG, f"run_dir={cfg.run_dir}", *TINY, "steps=2"])
    assert r.returncode == 0, r.stderr[-2000:]


# ----------------------------------------------------------------------------------------------------------
# Data shards

def shard(folder, name, n=3, C=4, **fields):
    latents = fields.pop("latents", torch.randn(n, C, 2, 8, 8))
    text = {"text_emb": torch.randn(n, 5, 16), "text_mask": torch.ones(n, 5, dtype=torch.bool)}
    write_shard(str(folder / name), latents, **{**text, **fields})


@pytest.mark.parametrize("case, message", [
    ("truncated", "shard-00001.safetensors is truncated or not safetensors"),
    ("keys", "shard-00001.safetensors disagrees.*text_emb"),
    ("shape", r"shard-00001.safetensors disagrees.*latents \(\(4, 3, 8, 8\)"),
    ("dtype", "shard-00001.safetensors disagrees.*BF16"),
    ("nan latents", "shard-00001.safetensors item 2: its latents hold nan or inf"),
    ("inf text", "shard-00001.safetensors item 0: its text_emb hold nan or inf"),
])
def test_broken_or_disagreeing_shards_are_one_line_naming_them(tmp_path, case, message):
    shard(tmp_path, "shard-00000.safetensors")
    bad = torch.randn(3, 4, 2, 8, 8)
    if case == "truncated":
        shard(tmp_path, "shard-00001.safetensors")
        path = tmp_path / "shard-00001.safetensors"
        path.write_bytes(path.read_bytes()[:-100])
    elif case == "keys":
        write_shard(str(tmp_path / "shard-00001.safetensors"), bad)
    elif case == "shape":
        shard(tmp_path, "shard-00001.safetensors", latents=torch.randn(3, 4, 3, 8, 8))
    elif case == "dtype":
        shard(tmp_path, "shard-00001.safetensors", latents=bad.bfloat16())
    elif case == "nan latents":
        bad[2, 1, 0, 3, 3] = float("nan")
        shard(tmp_path, "shard-00001.safetensors", latents=bad)
    else:
        emb = torch.randn(3, 5, 16)
        emb[0, 4, 2] = float("inf")
        shard(tmp_path, "shard-00001.safetensors", text_emb=emb)
    with pytest.raises(ValueError, match=message):
        ShardDataset(str(tmp_path))
    r = run([sys.executable, "train.py", CONFIG, f"run_dir={tmp_path / 'run'}", f"data={tmp_path}", *TINY,
             "model_args.in_channels=4", "model_args.text_encoder=none", "model_args.text_dim=16", "steps=1"])
    assert r.returncode == 2 and "shard-00001" in one_error_line(r.stderr)


# ----------------------------------------------------------------------------------------------------------
# Outputs whole or absent; inputs that are not ours

def test_atomic_output_replaces_only_when_whole(tmp_path):
    from cli import atomic_output
    from evaluate import append_line
    path = tmp_path / "rows.jsonl"
    path.write_text("old\n")
    with pytest.raises(RuntimeError), atomic_output(str(path)) as tmp, open(tmp, "w") as f:
        f.write("half")
        raise RuntimeError("interrupted mid-write")
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["rows.jsonl"]
    append_line(str(path), "new")
    assert path.read_text() == "old\nnew\n" and os.listdir(tmp_path) == ["rows.jsonl"]
    folder = tmp_path / "export"  # a folder replaces a folder
    folder.mkdir()
    (folder / "a").write_text("1")
    with atomic_output(str(folder)) as tmp:
        os.makedirs(tmp)
        with open(os.path.join(tmp, "b"), "w") as f:
            f.write("2")
    assert os.listdir(folder) == ["b"] and sorted(os.listdir(tmp_path)) == ["export", "rows.jsonl"]


def test_files_that_are_not_ours_are_one_line_naming_them(tmp_path):
    from safetensors.torch import save_file
    text = tmp_path / "notes.safetensors"
    text.write_text("not a checkpoint")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    for path, what in [(text, "not a readable safetensors checkpoint"), (foreign, "has no model_config")]:
        r = run([sys.executable, "sample.py", "--checkpoint", str(path), "--prompt", "a red circle moving right"])
        assert r.returncode == 2 and what in one_error_line(r.stderr) and path.name in r.stderr
