"""bench.py in its tiny CPU mode: a smoke run of every mode (no timing assertions), and the sparsity-targeted
plans it benchmarks."""
import json

import pytest

import bench
from attention import density


@pytest.mark.parametrize("mode", ["attention", "model", "e2e"])
def test_modes_run_tiny_on_cpu(mode, tmp_path):
    out = tmp_path / "out.json"
    bench.main([mode, "--tiny", "--repeat", "1", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r.get("ms", r.get("ms/forward", r.get("s/video"))) > 0 for r in rows)
    if mode == "attention":  # every sparse backend agrees with SDPA on the dense mask
        assert all(float(r["max_err"]) < 1e-4 for r in rows if "max_err" in r)


def test_sp_mode_spawns_torchrun_tiny(tmp_path):
    out = tmp_path / "sp.json"
    bench.main(["sp", "--tiny", "--gpus", "1", "2", "--repeat", "1", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert sorted({r["gpus"] for r in rows}) == [1, 2]


@pytest.mark.parametrize("T,target", [(8, 0.45), (8, 0.55), (24, 0.45), (24, 0.55)])
def test_plan_for_sparsity(T, target):
    plan, achieved = bench.plan_for_sparsity(T, 32, target)
    assert len(plan) == 32 and abs(achieved - target) < 0.02
    assert achieved == pytest.approx(sum(1 - density(T, k) for k in plan) / 32)
