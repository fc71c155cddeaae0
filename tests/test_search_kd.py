"""Stages 2 and 3: the mask search on constructed attention patterns, the search and KD runs end to end on a tiny
model, and the plan's round trip through checkpoints."""
import os

import pytest
import torch

import distill
import checkpoint
import train
from attention import FULL, load_plan
from conftest import read_log, tiny_checkpoint
from data import SyntheticLatents
from model import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_search_picks_full_for_spread_attention_and_sparse_for_frame_local():
    T, S, D = 6, 8, 8
    g = torch.Generator().manual_seed(0)
    v = torch.randn(1, 2, T * S, D, generator=g)
    frame = torch.arange(T * S) // S
    spread_q = torch.zeros(1, 2, T * S, D)  # uniform attention over every frame
    local = torch.zeros(1, 2, T * S, D)
    local[..., :T] = 30.0 * torch.nn.functional.one_hot(frame, T).float()  # q.k large only within a frame
    probe = distill.AttentionProbe([1, 2, 3], depth=2, num_frames=T)
    sdpa = torch.nn.functional.scaled_dot_product_attention  # the layers' own outputs under full attention
    probe.observer(0)(spread_q, spread_q, v, sdpa(spread_q, spread_q, v), T)
    probe.observer(1)(local, local, v, sdpa(local, local, v), T)
    errors = probe.errors()
    assert errors[0].min() > 0.2 and errors[1].max() < 1e-3
    assert distill.choose_plan(errors, [1, 2, 3], 0.1) == [FULL, 1]
    tiles = probe.tiles / probe.count[:, None, None]
    assert torch.allclose(tiles.sum(-1), torch.ones(2, T, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(tiles[1], torch.eye(T, dtype=torch.float64), atol=1e-4)  # the Figure-1 map


def test_choose_plan_takes_the_sparsest_mask_under_threshold():
    errors = torch.tensor([[0.30, 0.20, 0.05], [0.08, 0.01, 0.0], [0.5, 0.35, 0.3]])
    assert distill.choose_plan(errors, [1, 2, 4], 0.1) == [4, 1, FULL]
    assert distill.choose_plan(errors, [1, 2, 4], 0.4) == [1, 1, 2]


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A tiny 'stage-1 student' with random non-zero weights and a 2-step sampler."""
    return tiny_checkpoint(tmp_path_factory.mktemp("s1") / "mlcd.safetensors", {
        "kind": "mlcd", "video_shape": [3, 4, 16, 16], "sampler": {"name": "euler", "steps": 2, "cfg": 1.0, "shift": 1.0}},
        depth=3)


def test_all_full_plan_reproduces_the_stage1_model(student):
    m, _ = load_model(student)
    x, t = torch.randn(2, 3, 4, 16, 16), torch.rand(2)
    ids, mask = m.tokenize(["a red circle moving left", "a blue square moving up"])
    with torch.no_grad():
        ref = m(x, t, ids, mask)
        m.set_mask_plan([1, 2, 1])
        assert not torch.equal(m(x, t, ids, mask), ref)
        m.set_mask_plan(["full"])
        assert torch.equal(m(x, t, ids, mask), ref)


def test_search_then_kd_end_to_end(tmp_path, student, one_fixed_batch):
    s2 = train.load_config(os.path.join(ROOT, "configs", "stage2.yaml"), [
        f"run_dir={tmp_path / 's2'}", f"init={student}", "calib_prompts=2", "calib_seeds=1", "threshold=0.4",
        "sweep=[0.4, 1000.0, 1.0e-9]"])
    records = train.train(s2)  # one per threshold: r = 0.4, then the sweep's
    assert [r["threshold"] for r in records] == [0.4, 0.4, 1000.0, 1e-9]
    assert [r["threshold"] for r in read_log(tmp_path / "s2")] == [0.4, 0.4, 1000.0, 1e-9]
    for name in ("plan.yaml", "tile_maps.png", "plan.png"):
        assert os.path.getsize(tmp_path / "s2" / name) > 0
    plan = load_plan(str(tmp_path / "s2" / "plan.yaml"))
    assert plan == records[0]["plan"] == [row["k"] for row in records[0]["rows"]] and len(plan) == 3
    # the sweep's plans come from the same measurements: r = threshold again, anything goes, nothing goes
    assert load_plan(str(tmp_path / "s2" / "plan-r0.4.yaml")) == plan
    assert load_plan(str(tmp_path / "s2" / "plan-r1000.0.yaml")) == [1, 1, 1]
    assert load_plan(str(tmp_path / "s2" / "plan-r1e-09.yaml")) == ["full"] * 3

    # stage 3 (on one fixed batch) with a plan sparse in every layer
    (tmp_path / "plan.yaml").write_text("plan: [1, 1, 2]\n")
    s3 = train.load_config(os.path.join(ROOT, "configs", "stage3.yaml"), [
        f"run_dir={tmp_path / 's3'}", f"init={student}", f"plan={tmp_path / 'plan.yaml'}", "batch_size=4",
        "num_frames=4", "size=16", "steps=60", "log_every=1", "warmup=1", "lr=3e-4", "compile=false"])
    records = train.train(s3)
    assert sum(r["loss"] for r in records[-5:]) / 5 < 0.5 * records[0]["loss"]
    m, meta = load_model(os.path.join(checkpoint.checkpoints(s3.run_dir)[-1], "ema.safetensors"))
    assert meta["kind"] == "sparse" and meta["sampler"]["steps"] == 2
    assert m.mask_plan == [1, 1, 2] and [b.attn.plan_entry for b in m.blocks] == [1, 1, 2]


def test_stage3_needs_a_plan():
    with pytest.raises(ValueError, match="plan"):
        train.load_config(os.path.join(ROOT, "configs", "stage3.yaml"), ["plan="])
    with pytest.raises(ValueError, match="must be a list"):
        train.load_config(os.path.join(ROOT, "configs", "stage2.yaml"), ["candidates=3"])


def test_attention_recording_is_scoped_and_pairs_layers_strictly():
    from conftest import tiny_model
    m = tiny_model(depth=3)
    x = torch.randn(1, 3, 4, 16, 16)
    t = torch.full((1,), 0.5)
    ids, mask = m.tokenize(["a red circle moving left"])
    recorder = distill.AttentionRecorder(m, detach=True)
    with torch.no_grad(), recorder:
        v = m(x, t, ids, mask)
    assert len(recorder.outputs) == 3 and m.recorder is None
    with torch.no_grad():
        m(x, t, ids, mask)  # a forward outside the context records nothing
    assert len(recorder.outputs) == 3
    assert distill.kd_loss(v, v, recorder.outputs, recorder.outputs, 1.0, 1.0).item() == 0.0
    with pytest.raises(ValueError, match="one to one"):
        distill.kd_loss(v, v, recorder.outputs, recorder.outputs[:2], 1.0, 1.0)


def test_kd_loss_is_the_output_mse_plus_the_layers_mean_attention_mse_by_hand():
    """kd_loss against values worked out by hand: outputs 0.5 apart everywhere (MSE 0.25), three layers whose
    attention outputs are 0, 1 and 2 apart (MSEs 0, 1, 4: their mean 5/3), under weights 2 and 3; each weight at 0
    leaves the other term alone; the gradient reaches the student's tensors only."""
    v_teacher = torch.zeros(2, 3, 4, 4, 4)
    v_student = (v_teacher + 0.5).requires_grad_()
    teacher = [torch.zeros(2, 6, 5) for _ in range(3)]
    student = [(a + c).requires_grad_() for a, c in zip(teacher, (0.0, 1.0, 2.0))]
    loss = distill.kd_loss(v_student, v_teacher, student, teacher, 2.0, 3.0)
    assert loss.item() == pytest.approx(2.0 * 0.25 + 3.0 * 5 / 3)
    assert distill.kd_loss(v_student, v_teacher, student, teacher, 2.0, 0.0).item() == pytest.approx(0.5)
    assert distill.kd_loss(v_student, v_teacher, student, teacher, 0.0, 3.0).item() == pytest.approx(5.0)
    loss.backward()  # d/da mean((a - b)^2) = 2 (a - b) / n, times the weights (the layers' mean: 1/3 each)
    assert torch.allclose(v_student.grad, torch.full_like(v_student, 2.0 * 2 * 0.5 / v_student.numel()))
    assert torch.allclose(student[2].grad, torch.full_like(student[2], 3.0 / 3 * 2 * 2.0 / student[2].numel()))


def test_recording_from_compiled_checkpointed_blocks_compiles_once_and_keeps_gradients():
    """Stage 3 records every layer's attention output from compiled blocks under activation checkpointing. The
    blocks return it (DiT.forward records it, outside them): an observer appending to one list inside them broke
    the checkpoint's graph, and made dynamo guard on the list's length, compiling the block once per layer until
    its recompile limit (8) left the deeper layers eager. Here, 10 layers: one graph per mask entry and grad mode
    (the student's two entries, the teacher's full attention), no graph break, each layer recorded once, and the
    eager model's loss and gradients under each policy (dynamo with eager kernels: a CPU runs no compiled
    backward of these)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from model import DiT, model_config
    torch.manual_seed(0)
    cfg = model_config("tiny", hidden=64, heads=2, depth=10)
    m = DiT(cfg, mask_plan=[1, 2] * 5, attn_backend="gather")
    teacher = DiT(cfg, attn_backend="gather").requires_grad_(False)
    x, t = torch.randn(1, 3, 4, 16, 16), torch.rand(1)
    ids, mask = m.tokenize(["a red circle moving left"])
    recorder, teacher_recorder = distill.AttentionRecorder(m, detach=False), distill.AttentionRecorder(teacher, True)

    def step():
        m.zero_grad(set_to_none=True)
        with torch.no_grad(), teacher_recorder:
            target = teacher(x, t, ids, mask)
        with recorder:
            out = m(x, t, ids, mask)
        loss = distill.kd_loss(out, target, recorder.outputs, teacher_recorder.outputs, 1.0, 1.0)
        loss.backward()
        return loss.detach(), len(recorder.outputs), [p.grad.clone() for p in m.blocks.parameters()]

    reference = step()
    for policy in ("full", "save_attention", "save_matmuls"):
        torch._dynamo.reset()
        counters.clear()
        m.set_checkpointing(policy)
        for block in [*m.blocks, *teacher.blocks]:  # compile_blocks, with kernels dynamo's CPU backward can run
            block._compiled_call_impl = None
            block.compile(backend="aot_eager", dynamic=False)
        for _ in range(2):
            loss, recorded, grads = step()
        assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
        assert counters["stats"]["unique_graphs"] == 3, dict(counters["stats"])
        assert recorded == 10 and torch.allclose(loss, reference[0], rtol=1e-5)
        for a, b in zip(grads, reference[2], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("B,H,T,S", [(1, 2, 4, 6), (2, 3, 5, 8)])
def test_tile_mass_by_frame_pairs_equals_the_dense_softmax(B, H, T, S):
    """The stage-2 map computed frame pair by frame pair (no N x N) against the full attention matrix."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, B, H, T * S, 16, generator=g)
    p = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1)  # [B, H, N, N]
    dense = p.unflatten(3, (T, S)).sum(-1).unflatten(2, (T, S)).mean((0, 1, 3))  # [T, T]
    torch.testing.assert_close(distill.tile_mass(q, k, T), dense, rtol=1e-5, atol=1e-6)


def test_search_on_an_embedding_model_calibrates_on_the_data_embeddings(tmp_path):
    """A model without a text encoder (OSP-1.2's kind) calibrates on the text embeddings of `data` (here the
    synthetic latents' random ones): the search runs, reports its cost, and `data: shapes` is a clear error."""
    init = tiny_checkpoint(tmp_path / "emb.safetensors", {
        "kind": "mlcd", "video_shape": [3, 4, 16, 16], "sampler": {"name": "euler", "steps": 2, "cfg": 1.0, "shift": 1.0}},
        depth=2, text_encoder="none", text_dim=16)
    args = [f"run_dir={tmp_path / 's2'}", f"init={init}", "calib_prompts=2", "calib_seeds=1", "sweep=[]"]
    cfg = train.load_config(os.path.join(ROOT, "configs", "stage2.yaml"), args + ["data=synthetic",
                                                                                    "synthetic_shape=[3, 4, 16, 16]"])
    (emb, mask), null = distill.calibration_embeddings(cfg, load_model(init)[0])
    assert emb.shape == (2, 300, 16) and mask.all()
    assert torch.equal(emb[1], SyntheticLatents([3, 4, 16, 16], 16)[1]["text_emb"])
    [record] = train.train(cfg)
    assert len(record["plan"]) == 2 and record["seconds"] > 0
    with pytest.raises(ValueError, match="precomputed text embeddings"):
        train.train(train.load_config(os.path.join(ROOT, "configs", "stage2.yaml"), args))


def test_mean_squared_error_matches_autograd_and_keeps_only_its_inputs():
    """The KD term's MSE: value and gradient equal the plain autograd expression (float64 and bf16 inputs), and
    what it keeps for the backward is a and b themselves, not an fp32 difference per layer."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float64, torch.bfloat16):
        a = torch.randn(2, 6, 4, 8, generator=g).to(dtype).requires_grad_()
        b = torch.randn(2, 6, 4, 8, generator=g).to(dtype)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            loss = distill.mean_squared_error(a, b)
        assert {t.data_ptr() for t in saved} <= {a.data_ptr(), b.data_ptr()} and saved
        (grad,) = torch.autograd.grad(loss, a)
        ref_a = a.detach().float().requires_grad_()
        ref = (ref_a - b.float()).pow(2).mean()
        ref.backward()
        assert torch.allclose(loss, ref, rtol=1e-6) and grad.dtype == dtype
        assert torch.allclose(grad.float(), ref_a.grad, rtol=1e-2 if dtype == torch.bfloat16 else 1e-12, atol=1e-6)
