"""Ulysses sequence parallelism against single-process runs: forward and gradients of the model with 2 and 3
gloo processes (35 tokens, so both pad; and a Wan-shaped model, whose q/k norm spans every head), torchrun sampling that writes the same frames as one process, and
torchrun training (stages 0 and 3) that logs the same losses and gradient norms as one process."""
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import assert_frames_close, gif_frames, read_log, tiny_checkpoint
from model import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PRESETS = {"tiny": dict(hidden=48, heads=6), "wan-tiny": {}}  # wan-tiny: q/k RMSNorm across all 4 heads


def _worker(rank, world, port, plans, preset="tiny"):
    sys.path.insert(0, ROOT)
    from model import DiT, model_config
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        m = DiT(model_config(preset, **PRESETS[preset]))
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.1)
        g = torch.Generator().manual_seed(1)
        pt, ph, pw = m.cfg.patch_size  # 5 frames of 7 x 1 tokens: 35, padded for 2 and 3
        x = torch.randn(2, m.cfg.in_channels, 5, 7 * ph, pw, generator=g)
        t = torch.rand(2, generator=g)
        if m.text_encoder is not None:
            ids, mask = m.tokenize(["a red circle moving left", "a blue square"])
        else:
            ids, mask = torch.randn(2, 5, m.cfg.text_dim, generator=g), torch.ones(2, 5, dtype=torch.bool)
        for plan in plans:
            m.set_mask_plan(plan)
            m.enable_sequence_parallel(None)
            m.zero_grad()
            ref = m(x, t, ids, mask)
            ref.square().sum().backward()
            ref_grads = {n: p.grad.clone() for n, p in m.named_parameters()}
            m.zero_grad()
            m.enable_sequence_parallel(dist.group.WORLD)
            out = m(x, t, ids, mask)
            out.square().sum().backward()
            err = (out - ref).abs().max().item()
            assert err < 1e-5, f"plan {plan}: forward differs by {err}"
            with torch.no_grad():  # inference takes the merge backend
                err = (m(x, t, ids, mask) - ref).abs().max().item()
            assert err < 1e-5, f"plan {plan}: inference forward differs by {err}"
            for n, p in m.named_parameters():  # each rank holds its tokens' share of every gradient
                dist.all_reduce(p.grad)
                gerr = (p.grad - ref_grads[n]).abs().max().item()
                assert gerr < 1e-4 * max(1.0, ref_grads[n].abs().max().item()), f"plan {plan}: grad {n} off by {gerr}"
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world, preset", [(2, "tiny"), (3, "tiny"), (2, "wan-tiny")])
def test_sequence_parallel_equals_single_process(world, preset):
    mp.spawn(_worker, args=(world, free_port(), [["full"], [1, 2]], preset), nprocs=world)


def _heads_worker(rank, world, port):
    sys.path.insert(0, ROOT)
    from model import DiT, model_config
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        m = DiT(model_config("tiny"))  # 2 heads
        with pytest.raises(ValueError, match="2 attention heads.*3 processes; use one of 1, 2"):
            m.enable_sequence_parallel(dist.group.WORLD)
    finally:
        dist.destroy_process_group()


def test_heads_not_divisible_is_a_clear_error():
    mp.spawn(_heads_worker, args=(3, free_port()), nprocs=3)


def test_torchrun_sampling_writes_the_same_frames(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "m.safetensors", {"kind": "base", "video_shape": [3, 3, 16, 20],
                                                         "sampler": {"name": "euler", "steps": 3, "cfg": 3.0}})
    common = [os.path.join(ROOT, "sample.py"), "--prompt", "a red circle moving left", "--checkpoint", ckpt,
              "--seed", "3", "--device", "cpu"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    one = subprocess.run([sys.executable, *common, "--out", str(tmp_path / "one.gif")], capture_output=True,
                         text=True, env=env)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(free_port()), *common, "--out", str(tmp_path / "two.gif")],
                         capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr
    a, b = gif_frames(tmp_path / "one.gif"), gif_frames(tmp_path / "two.gif")
    assert len(a) == 3
    assert_frames_close(b, a, "2 processes vs 1")


def torchrun(nproc, args):
    """python -m torch.distributed.run with nproc gloo processes; -> the CompletedProcess (asserted to succeed)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    launcher = [sys.executable] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port())]
    r = subprocess.run(launcher + args, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def assert_same_log(one, other, steps, rtol=1e-4):
    """Every logged step's loss and gradient norm agree."""
    for key in ("loss", "grad_norm"):
        a, b = [r[key] for r in read_log(one)], [r[key] for r in read_log(other)]
        assert len(a) == len(b) == steps
        assert all(abs(x - y) < rtol * abs(x) for x, y in zip(a, b)), (key, a, b)


def train_args(*args, steps):
    return [os.path.join(ROOT, "train.py"), *args, f"steps={steps}", "log_every=1", "warmup=1", "compile=false",
            "device=cpu"]


STAGE0 = [os.path.join(ROOT, "configs", "stage0.yaml"), "model=tiny", "model_args.hidden=48", "model_args.heads=6",
          "num_frames=3", "size=20", "batch_size=2"]


def test_torchrun_training_sp2_matches_one_process(tmp_path):
    """DDP with sp_size=2: same batches, times and noise; each rank's gradient covers its tokens; losses and
    gradient norms of the first steps (the later ones after updates) match the single-process run."""
    args = train_args(*STAGE0, steps=3)
    torchrun(1, args + [f"run_dir={tmp_path / 'one'}"])
    torchrun(2, args + [f"run_dir={tmp_path / 'two'}", "sp_size=2"])
    assert_same_log(tmp_path / "one", tmp_path / "two", 3)


def dcp_weights(ckpt) -> dict:
    """{"model": ..., "ema": ...} full fp32 state dicts of a DCP checkpoint folder, read in this process."""
    import torch.distributed.checkpoint as dcp
    from model import DiT, ModelConfig
    meta = torch.load(os.path.join(ckpt, "state.pt"), weights_only=True)["meta"]
    out = {}
    for key in ("model", "ema"):
        state = {key: DiT(ModelConfig(**meta["model_config"])).state_dict()}
        dcp.load(state, checkpoint_id=os.path.join(ckpt, "dcp"))
        out[key] = state[key]
    return out


def test_fsdp_4_processes_match_one_and_resume_at_2(tmp_path):
    """FSDP2 over 4 ranks with sp_size=2 (2 data-parallel groups, each taking half the batch) matches one process
    step by step; its DCP checkpoint of step 2 resumes at 2 processes (another sharding, 2 micro-batches per rank)
    and steps 3 and 4 (the second one after an update with the reloaded optimizer state) match too, as do the
    final weights and EMA (ema=0.5, so it moves); --export gathers the EMA shards into one file."""
    args = lambda steps: train_args(*STAGE0, "batch_size=4", "fsdp=true", "ckpt_every=2", "ema=0.5",  # noqa: E731
                                    steps=steps)
    torchrun(1, args(4) + [f"run_dir={tmp_path / 'one'}"])
    torchrun(4, args(2) + [f"run_dir={tmp_path / 'four'}", "sp_size=2"])
    torchrun(2, args(4) + [f"run_dir={tmp_path / 'four'}", "sp_size=1", "micro_batch=1"])  # resumes at step 2
    assert_same_log(tmp_path / "one", tmp_path / "four", 4)
    a, b = (dcp_weights(tmp_path / run / "ckpt-0000004") for run in ("one", "four"))
    for key in ("model", "ema"):
        assert all(torch.allclose(a[key][k], b[key][k], atol=1e-6, rtol=1e-4) for k in a[key]), key
    moved = max((a["ema"][k] - dcp_weights(tmp_path / "four" / "ckpt-0000002")["ema"][k]).abs().max() for k in a["ema"])
    assert moved > 1e-4  # the EMA of steps 3 and 4 changed, by far more than the tolerance above
    torchrun(1, args(4) + [f"run_dir={tmp_path / 'four'}", "--export", str(tmp_path / "four.safetensors")])
    exported = load_model(str(tmp_path / "four.safetensors"))[0].state_dict()
    assert all(torch.equal(exported[k], b["ema"][k].bfloat16().float()) for k in exported)


def test_torchrun_stage3_sp2_matches_one_process(tmp_path):
    """Stage 3 under DDP with sp_size=2: each rank records only its own heads, so it backpropagates its share of
    the mean over all heads (and logs the total); loss and gradient norm match one process."""
    plan = tmp_path / "plan.yaml"
    plan.write_text("plan: [1, full, 2, 1, 1, full, 3, 1]\n")
    args = train_args(os.path.join(ROOT, "configs", "stage3.yaml"), f"plan={plan}",
                      f"init={os.path.join(ROOT, 'checkpoints', 'mlcd.safetensors')}", "num_frames=4", "size=32",
                      "batch_size=2", steps=2)
    torchrun(1, args + [f"run_dir={tmp_path / 'one'}"])
    torchrun(2, args + [f"run_dir={tmp_path / 'two'}", "sp_size=2"])
    assert_same_log(tmp_path / "one", tmp_path / "two", 2)


def test_torchrun_stage3_fsdp_sp2_matches_one_process(tmp_path):
    """Stage 3 on 4 ranks (FSDP, sp_size=2, activation checkpointing): each rank records only its own heads, so
    it backpropagates its share of the mean over all heads (and logs the total); every step matches one process."""
    plan = tmp_path / "plan.yaml"
    plan.write_text("plan: [1, full, 2, 1, 1, full, 3, 1]\n")
    args = train_args(os.path.join(ROOT, "configs", "stage3.yaml"), f"plan={plan}",
                      f"init={os.path.join(ROOT, 'checkpoints', 'mlcd.safetensors')}", "num_frames=4", "size=32",
                      "batch_size=2", "fsdp=true", "activation_checkpointing=true", steps=3)
    torchrun(1, args + [f"run_dir={tmp_path / 'one'}"])
    torchrun(4, args + [f"run_dir={tmp_path / 'four'}", "sp_size=2"])
    assert_same_log(tmp_path / "one", tmp_path / "four", 3)


def test_torchrun_stage1_fsdp_sp2_matches_one_process(tmp_path):
    """Stage 1 under FSDP: the sharded EMA is the MLCD target (its forward gathers the shards, and its update
    after the step works on shards again), so step 2's loss, which reads the EMA of step 1, matches one process."""
    args = train_args(os.path.join(ROOT, "configs", "stage1.yaml"),
                      f"init={os.path.join(ROOT, 'checkpoints', 'base.safetensors')}", "num_frames=4", "size=32",
                      "batch_size=2", "teacher_steps=8", "segments=2", "ema=0.5", "fsdp=true", steps=2)
    torchrun(1, args + [f"run_dir={tmp_path / 'one'}"])
    torchrun(2, args + [f"run_dir={tmp_path / 'two'}", "sp_size=2"])
    assert_same_log(tmp_path / "one", tmp_path / "two", 2)
