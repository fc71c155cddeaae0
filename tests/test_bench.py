"""bench.py in its tiny CPU mode: a smoke run of every mode (no timing assertions), and the sparsity-targeted
plans it benchmarks."""
import json
import os

import pytest
import torch
from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

import attention
import bench
from attention import density

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("mode", ["attention", "model", "e2e"])
def test_modes_run_tiny_on_cpu(mode, tmp_path):
    out = tmp_path / "out.json"
    bench.main([mode, "--tiny", "--repeat", "1", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r.get("ms", r.get("ms/forward", r.get("s/video"))) > 0 for r in rows)
    if mode == "attention":  # every sparse backend ran every mask (a failing kernel drops its row) and agrees with
        checked = {(r["kernel"], r["mask"]): float(r["max_err"]) for r in rows if r.get("max_err")}  # SDPA's
        assert set(checked) == {(k, m) for k in ("flex_triton", "gather", "merge") for m in ("2:2", "1:3")}, checked
        assert all(err < 1e-4 for err in checked.values()), checked


def test_model_mode_reports_the_full_forwards_difference_from_diffusers(tmp_path, monkeypatch):
    """--diffusers: the full-attention row carries our output's difference from diffusers' eager one (here a stand-in
    for diffusers: our own full forward with 0.25 added to one element, so both differences are known), the sparse
    rows none. (It went missing once: computed after the plan loop, where the last plan is a sparse one.)"""
    expected = {}

    def stand_in(model, x, text, args):
        with torch.no_grad():
            ones = torch.ones(text.shape[:2], dtype=torch.bool)
            reference = model(x, torch.full((x.shape[0],), 0.5), text, ones)
        reference.view(-1)[7] += 0.25
        expected["rel_l2"] = 0.25 / reference.norm().item()
        rows = [{"plan": "full", "sparsity%": 0.0, "ms": 2.0, "backend": f"diffusers {how}"} for how in ("eager", "compiled")]
        return rows, reference
    monkeypatch.setattr(bench, "bench_diffusers", stand_in)
    out = tmp_path / "out.json"
    bench.main(["model", "--tiny", "--model", "wan2.1-1.3b", "--diffusers", "--sparsity", "0.5", "--repeat", "1",
                "--json", str(out)])
    ours = [r for r in json.loads(out.read_text())["rows"] if not r["backend"].startswith("diffusers")]
    assert [r["plan"] for r in ours][0] == "full" and len(ours) == 2
    assert abs(ours[0]["max_diff_vs_diffusers"] - 0.25) < 1e-3
    assert abs(ours[0]["rel_l2_vs_diffusers"] - expected["rel_l2"]) < 1e-3 * expected["rel_l2"] + 1e-5
    assert "max_diff_vs_diffusers" not in ours[1]


def test_sp_mode_spawns_torchrun_tiny(tmp_path):
    out = tmp_path / "sp.json"
    bench.main(["sp", "--tiny", "--gpus", "1", "2", "--repeat", "1", "--profile", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert sorted({r["gpus"] for r in rows}) == [1, 2]
    # the profile finds the all-to-alls only where there are two processes, and attention and matmuls in both
    assert all((r["comm_ms"] > 0) == (r["gpus"] == 2) and r["attention_ms"] > 0 and r["matmul_ms"] > 0 for r in rows)


@pytest.mark.parametrize("T,target", [(8, 0.45), (8, 0.55), (24, 0.45), (24, 0.55)])
def test_plan_for_sparsity(T, target):
    plan, achieved = attention.plan_for_sparsity(T, 32, target)
    assert len(plan) == 32 and abs(achieved - target) < 0.02
    assert achieved == pytest.approx(sum(1 - density(T, k) for k in plan) / 32)


def test_plans_mode_on_a_checkpoint(tmp_path):
    from model import DiT, model_config, save_model
    m = DiT(model_config("tiny"))
    ckpt = str(tmp_path / "m.safetensors")
    save_model(ckpt, m, {"video_shape": [3, 4, 16, 16]})
    plan = tmp_path / "plan.yaml"
    plan.write_text("plan: [1, 2]\n")
    out = tmp_path / "plans.json"
    bench.main(["plans", "--checkpoint", ckpt, "--plans", str(plan), "--repeat", "1", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["plan"] for r in rows] == ["full", str(plan)]
    expected = 100 * (1 - (density(4, 1) + density(4, 2)) / 2)
    assert rows[0]["sparsity%"] == 0 and rows[1]["sparsity%"] == pytest.approx(expected, abs=0.1)
    assert all(r["attention_ms"] > 0 and r["forward_ms"] > 0 for r in rows)


def test_train_mode_runs_every_stage_through_train_py(tmp_path):
    out = tmp_path / "train.json"
    bench.main(["train", "--tiny", "--repeat", "1", "--stages", "0", "1", "2", "3", "--profile", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["stage"] for r in rows] == [0, 1, 2, 3] and all(r["s/step"] > 0 and r["tokens/s"] > 0 for r in rows)
    assert all(r["step_ms"] > 0 for r in rows if r["stage"] != 2)  # read from train.py's profile=2 traces


@pytest.mark.parametrize("plan", [["full"], [1, 2]])
def test_forward_flops_against_a_count_by_hand(plan):
    """The FLOP counter's count of the model, against the architecture counted by hand: every matmul (2 m n k) of
    the patch embedding, time MLP, text projection, each block (q, k, v, output; cross-attention's q on the video
    and k, v on the text; the MLP) and the output layer, plus attention (4 N^2 D at the layer's kept-tile density,
    4 N L D across)."""
    cfg = bench.bench_config(tiny=True)
    C, T, H, W = latents = [4, 4, 8, 8]
    L, D, F = 5, cfg.hidden, cfg.mlp_width
    N = T * H * W // 4  # patches of 1 x 2 x 2
    P = C * 4  # a patch's values
    per_block = 2 * N * (4 * D * D + 2 * D * D + 2 * D * F) + 2 * L * 2 * D * D + 4 * N * L * D
    cross_attention = cfg.depth * 4 * N * L * D
    attention = sum(4 * N * N * D * (density(T, k) if k != "full" else 1.0) for k in plan * (cfg.depth // len(plan)))
    whole = 2 * N * P * D + 2 * (256 * D + D * D + D * 6 * D) + 2 * L * (cfg.text_dim * D + D * D) + \
        cfg.depth * per_block + attention + 2 * N * D * P
    flops = bench.forward_flops(cfg, latents, L, plan)
    assert flops["total"] == pytest.approx(whole, rel=1e-9)
    assert flops["blocks"] == pytest.approx(cfg.depth * per_block + attention)
    assert flops["attention"] == pytest.approx(attention + cross_attention)


def _cpu_sdpa_flops(q, k, v, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(q, k, v)


def _cpu_sdpa_backward_flops(grad, q, k, v, *args, out_shape=None, **kwargs):
    return sdpa_backward_flop_count(grad, q, k, v)


# torch's FLOP counter knows the GPU attention kernels; the CPU one it is told here (the same formulas)
CPU_ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
                       torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
                       _cpu_sdpa_backward_flops}


def test_train_flops_accounts_for_each_stage_as_a_real_step_runs(tmp_path):
    """torch's FLOP counter around one real training step of each stage (the student's forward and backward, the
    frozen forwards of its objective) against train_flops: the same ratio for every stage (the counter counts a
    few ops train_flops leaves out, the text encoding of the step's captions among them), and the recompute of
    activation checkpointing in HFU alone: the blocks' forward under "full", without the attention kernels under
    "save_attention", nothing under "save_matmuls"."""
    import train
    from torch.utils.flop_counter import FlopCounterMode

    from data import SYNTHETIC_TEXT_LEN
    from model import DiT, save_model
    cfg, shape = bench.bench_config(tiny=True), [4, 4, 8, 8]
    init = str(tmp_path / "init.safetensors")
    save_model(init, DiT(cfg), {"kind": "mlcd", "video_shape": shape, "sampler": {"name": "euler", "steps": 2}})
    (tmp_path / "plan.yaml").write_text("plan: [1]\n")
    ratios = {}
    model_args = json.dumps({"depth": cfg.depth, "hidden": cfg.hidden, "heads": cfg.heads, "text_dim": cfg.text_dim})
    for stage, policy in [(0, None), (1, None), (3, None), (0, "full"), (0, "save_attention"),
                          (0, "save_matmuls")]:
        run = train.load_config(os.path.join(ROOT, "configs", f"stage{stage}.yaml"), [
            f"run_dir={tmp_path / f'{stage}-{policy}'}", "model=osp12", f"model_args={model_args}",
            "data=synthetic", f"synthetic_shape={shape}", "batch_size=1", "steps=1", "save=false",
            "compile=false", f"activation_checkpointing={str(policy is not None).lower()}",
            f"checkpoint_policy={policy or 'full'}", "caption_dropout=0"]
            + ([f"init={init}", f"teacher={init}", f"kd_plan={tmp_path / 'plan.yaml'}"] if stage else []))
        with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
            train.train(run)
        flops = bench.train_flops(stage, cfg, shape, SYNTHETIC_TEXT_LEN, [1] if stage == 3 else ["full"], policy)
        ratios[stage, policy] = counter.get_total_flops() / flops["hardware" if policy else "model"]
    assert max(ratios.values()) / min(ratios.values()) < 1.03, ratios


def test_trace_split_timeline_against_a_rasterised_one(tmp_path, monkeypatch):
    """busy / exposed comm / idle from interval unions equal a millisecond-by-millisecond count of a random
    trace with overlapping kernels on two streams."""
    g = torch.Generator().manual_seed(0)
    kernels = []
    for i in range(60):
        ts, dur = torch.randint(0, 900, (2,), generator=g).tolist()
        name = "ncclDevKernel_AllGather" if i % 3 == 0 else ("nvjet_gemm" if i % 3 == 1 else "elementwise")
        kernels.append({"cat": "kernel", "name": name, "ts": ts, "dur": dur % 60 + 1})  # in ms here
    steps = [{"cat": "user_annotation", "name": f"ProfilerStep#{i}", "ts": 500 * i, "dur": 500} for i in range(2)]
    us = [{**e, "ts": 1000 * e["ts"], "dur": 1000 * e["dur"]} for e in steps + kernels]  # traces count in us
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": us}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    split = bench.trace_split(path)
    comm, compute = torch.zeros(1000, dtype=torch.bool), torch.zeros(1000, dtype=torch.bool)
    for k in kernels:
        (comm if k["name"].startswith("nccl") else compute)[k["ts"]:k["ts"] + k["dur"]] = True
    ms = lambda mask: mask.sum().item() / 2  # noqa: E731  (per step: two steps)
    assert split["step_ms"] == 500
    assert split["busy_ms"] == pytest.approx(ms(comm | compute)) and 0 < split["busy_ms"] < 500
    assert split["exposed_comm_ms"] == pytest.approx(ms(comm & ~compute)) and split["exposed_comm_ms"] > 0
    assert split["idle_ms"] == pytest.approx(500 - ms(comm | compute))
    assert split["comm_ms"] == pytest.approx(sum(k["dur"] for k in kernels if k["name"].startswith("nccl")) / 2)


def test_profile_split_names_the_dearest_other_kernels():
    """On a CPU the split is by op: a call with a matmul, a large layer norm and a tiny GELU puts the matmul under
    matmul_ms, and other_top lists the norm first, dearest first, within other_ms; without top there is no
    list."""
    a, w = torch.randn(384, 384), torch.randn(384, 384)
    big, small = torch.randn(1024, 4096), torch.randn(4, 8)

    def call():
        a @ w
        torch.nn.functional.layer_norm(big, (4096,))
        torch.nn.functional.gelu(small)

    split = bench.profile_split(call, top=2)
    names = [name for name, _, _ in split["other_top"]]
    assert len(names) == 2 and names[0] == "aten::native_layer_norm", split["other_top"]
    ms = [m for _, m, _ in split["other_top"]]
    assert ms == sorted(ms, reverse=True) and sum(ms) <= split["other_ms"] + 0.1
    assert split["matmul_ms"] > 0 and all(not n.startswith("aten::mm") for n in names)
    assert "other_top" not in bench.profile_split(call)
