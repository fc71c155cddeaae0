"""train.py end to end on the tiny model: overfitting, exact resume, config validation, NaN handling, the
shard data path, export and sample.py."""
import os
import subprocess
import sys
from dataclasses import fields

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import train
from conftest import read_log, tiny_checkpoint, train_killed_at
from data import write_shard
from model import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "stage0.yaml")


def cfg_for(tmp_path, *overrides):
    base = [f"run_dir={tmp_path / 'run'}", "model=tiny", "batch_size=4", "log_every=1", "ckpt_every=2",
            "warmup=1", "compile=false"]
    return train.load_config(CONFIG, base + list(overrides))


def test_save_then_resume_gives_identical_next_steps(tmp_path, monkeypatch):
    straight = cfg_for(tmp_path / "a", "steps=5")
    train.train(straight)
    crashed = cfg_for(tmp_path / "b", "steps=5", "ckpt_every=3")
    train_killed_at(monkeypatch, crashed, 3)  # killed after the step-3 checkpoint
    records = train.train(crashed)  # the same command again resumes from ckpt-0000003
    assert [r["step"] for r in records] == [4, 5]
    a = {r["step"]: r["loss"] for r in read_log(straight.run_dir)}
    b = {r["step"]: r["loss"] for r in read_log(crashed.run_dir)}
    assert a[4] == b[4] and a[5] == b[5]
    wa = load_file(os.path.join(straight.run_dir, "ckpt-0000005", "ema.safetensors"))
    wb = load_file(os.path.join(crashed.run_dir, "ckpt-0000005", "ema.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    from model import DiT, model_config
    import flow
    m = DiT(model_config("tiny")).train()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 3, 4, 16, 16, generator=g) * 2 - 1
    t, eps = torch.rand(2, generator=g), torch.randn(x0.shape, generator=g)
    ids, mask = m.tokenize(["a red circle moving left", "a blue square moving up"])
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss = flow.flow_loss(lambda xt, tt: m(xt, tt, ids, mask), x0, t, eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="unknown config keys.*valid keys"):
        train.load_config(CONFIG, ["stpes=3"])
    with pytest.raises(ValueError, match="must be a number"):
        train.load_config(CONFIG, ["lr=fast"])
    with pytest.raises(ValueError, match="must be an integer"):
        train.load_config(CONFIG, ["steps=2.5"])
    with pytest.raises(ValueError, match="key=value"):
        train.load_config(CONFIG, ["steps"])
    with pytest.raises(ValueError, match="unknown model keys"):
        train.load_config(CONFIG, ["model_args.dept=2"])
    with pytest.raises(ValueError, match="not found"):
        train.load_config(str(tmp_path / "none.yaml"))
    cfg = train.load_config(CONFIG, ["steps=7", "model_args.depth=3", "lr=1e-3"])
    assert cfg.steps == 7 and cfg.model_args == {"depth": 3} and cfg.lr == 1e-3


@pytest.mark.parametrize("override", [
    "batch_size=0", "micro_batch=-1", "steps=-1", "lr=0", "lr=-1e-4", "warmup=-1", "ema=1", "ema=-0.1", "keep=0",
    "ckpt_every=0", "log_every=0", "sp_size=0", "search_threshold=0", "search_candidates=[0, 2]", "search_candidates=[1.5]",
    "kd_attn_weight=-1", "kd_output_weight=-0.5", "weight_decay=-1", "grad_clip=0", "betas=[0.9, 1.0]",
    "caption_dropout=1.5", "min_lr_frac=2", "t_shift=0", "max_minutes=-1", "sample_steps=0", "sample_shift=0",
    "mlcd_huber_c=0", "search_sweep=[0.1, -0.2]", "search_prompts=0", "mlcd_segments=0", "seed=-1", "lr=.nan", "lr=.inf",
    "synthetic_shape=[4, 0, 8, 8]", "profile=-1"])
def test_every_numeric_key_is_checked_against_its_range(override):
    """A value out of range is one line naming the key (and is never taken)."""
    with pytest.raises(ValueError, match=override.split("=")[0] + " must be in"):
        train.load_config(CONFIG, [override])


def test_the_stage_keys_earlier_names_still_load(tmp_path):
    """configs and overrides written before the stage keys carried their stage's name, and a run saved then."""
    s2 = train.load_config(os.path.join(ROOT, "configs", "stage2.yaml"), ["threshold=0.2", "calib_prompts=3",
                                                                           "sweep=[0.1]", "candidates=[1, 2]"])
    assert (s2.search_threshold, s2.search_prompts, s2.search_sweep, s2.search_candidates) == (0.2, 3, [0.1], [1, 2])
    s1 = train.make_config({"stage": 1, "init": "x", "segments": 8, "teacher_steps": 32, "teacher_cfg": 3.0,
                            "target": "stopgrad", "huber_c": 0.01})
    assert (s1.mlcd_segments, s1.mlcd_teacher_steps, s1.mlcd_teacher_cfg, s1.mlcd_target, s1.mlcd_huber_c) == \
        (8, 32, 3.0, "stopgrad", 0.01)
    assert train.make_config({"stage": 3, "init": "x", "plan": "p.yaml"}).kd_plan == "p.yaml"
    cfg = cfg_for(tmp_path, "steps=2")
    train.train(cfg)
    state_path = os.path.join(checkpoint.checkpoints(cfg.run_dir)[-1], "state.pt")
    state = torch.load(state_path, weights_only=True)
    old = {({v: k for k, v in train.ALIASES.items()}).get(k, k): v for k, v in state["config"].items()}
    # a run saved under the earlier names, and with a key since taken out (it said how a step ran), resumes
    torch.save({**state, "config": {**old, "fp8": True}}, state_path)
    assert [r["step"] for r in train.train(cfg_for(tmp_path, "steps=3"))] == [3]
    # set to false (in a file or an override) it is left out; asked for, it is an error
    assert train.current_names({"fp8": False, "steps": 3}) == {"steps": 3}
    cfg_for(tmp_path, "fp8=false")
    for ask in (lambda: cfg_for(tmp_path, "fp8=true"), lambda: train.make_config({"fp8": True})):
        with pytest.raises(train.UserError, match="taken out"):
            ask()


def test_a_model_trained_from_a_pretrained_one_keeps_its_frame_rate_and_source():
    """A checkpoint trained from a Wan folder (any stage, stage 0 too: fine-tuning the base) keeps the folder's
    frame rate and source, by which sample.py asks for the encoder's empty caption for guidance and stage 1 for
    its null.safetensors; one trained from scratch has neither."""
    wan = {"kind": "pretrained", "source": "diffusers WanTransformer3DModel", "fps": 16,
           "sampler": {"name": "euler", "steps": 50, "cfg": 5.0, "shift": 5.0}}
    for stage, more in ((0, {}), (1, {"init": "x"}), (3, {"init": "x", "kd_plan": "p.yaml"})):
        cfg = train.make_config({"stage": stage, "model": "tiny", **more})
        meta = train.checkpoint_meta(cfg, [3, 4, 16, 16], wan)
        assert (meta["source"], meta["fps"]) == (wan["source"], 16), stage
    assert not {"source", "fps"} & set(train.checkpoint_meta(train.make_config({"stage": 0}), [3, 4, 16, 16], {}))


def test_every_numeric_key_has_a_range_and_the_bounds_that_are_allowed_pass():
    numeric = {f.name for f in fields(train.TrainConfig) if f.name != "stage" and not isinstance(f.default, bool)
               and (isinstance(f.default, (int, float))
                    or f.name in ("betas", "search_candidates", "search_sweep", "synthetic_shape"))}
    assert numeric == set(train.RANGES)  # a new key gets a range
    train.load_config(CONFIG, ["ema=0", "caption_dropout=1", "min_lr_frac=0", "warmup=0", "micro_batch=0",
                               "kd_attn_weight=0", "seed=0", "steps=0"])


def test_a_teacher_of_another_model_is_one_line(tmp_path):
    init = tiny_checkpoint(tmp_path / "a.safetensors", {"kind": "base", "video_shape": [3, 4, 16, 16]})
    deeper = tiny_checkpoint(tmp_path / "b.safetensors", {"kind": "base", "video_shape": [3, 4, 16, 16]}, depth=3)
    wider = tiny_checkpoint(tmp_path / "c.safetensors", {"kind": "base", "video_shape": [3, 4, 16, 16]}, text_dim=32)
    (tmp_path / "plan.yaml").write_text("plan: [1]\n")
    s3 = os.path.join(ROOT, "configs", "stage3.yaml")
    with pytest.raises(ValueError, match="depth 3 vs 2.*pairs their layers"):
        train.train(train.load_config(s3, [f"init={init}", f"teacher={deeper}", f"plan={tmp_path / 'plan.yaml'}",
                                           f"run_dir={tmp_path / 'r'}"]))
    s1 = os.path.join(ROOT, "configs", "stage1.yaml")
    with pytest.raises(ValueError, match="text_dim 32 vs 64.*latents and text"):
        train.train(train.load_config(s1, [f"init={init}", f"teacher={wider}", f"run_dir={tmp_path / 'r'}"]))
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    for key in ("init", "teacher"):
        with pytest.raises(ValueError, match=f"{key}: .*notes.txt.* is not a readable safetensors checkpoint"):
            train.train(train.load_config(s1, [f"init={init}", f"{key}={tmp_path / 'notes.txt'}",
                                               f"run_dir={tmp_path / 'r'}"]))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = cfg_for(tmp_path, "steps=6")
    import flow
    real = flow.flow_loss  # stage 0's objective
    calls = iter(range(100))
    def poisoned(*a, **kw):
        loss = real(*a, **kw)
        return loss * float("nan") if next(calls) >= 2 else loss  # step 3 goes bad
    monkeypatch.setattr(flow, "flow_loss", poisoned)
    with pytest.raises(FloatingPointError, match="ckpt-0000002"):
        train.train(cfg)
    assert [os.path.basename(p) for p in checkpoint.checkpoints(cfg.run_dir)] == ["ckpt-0000002"]
    weights = load_file(os.path.join(cfg.run_dir, "ckpt-0000002", "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


@pytest.mark.parametrize("with_embeddings", [False, True])
def test_trains_on_safetensors_shards(tmp_path, with_embeddings):
    folder = tmp_path / "shards"
    folder.mkdir()
    for i in range(2):
        latents = torch.randn(3, 4, 2, 8, 8)
        if with_embeddings:
            write_shard(str(folder / f"shard-{i:05d}.safetensors"), latents, text_emb=torch.randn(3, 6, 16),
                        text_mask=torch.ones(3, 6, dtype=torch.bool))
        else:
            write_shard(str(folder / f"shard-{i:05d}.safetensors"), latents, captions=["a", "b", "c"])
    args = [f"data={folder}", "steps=2", "model_args.in_channels=4"]
    if with_embeddings:
        args += ["model_args.text_encoder=none", "model_args.text_dim=16"]
    cfg = cfg_for(tmp_path, *args)
    records = train.train(cfg)
    assert len(records) == 2 and all(r["loss"] > 0 for r in records)
    _, meta = load_model(os.path.join(checkpoint.checkpoints(cfg.run_dir)[-1], "ema.safetensors"))
    assert meta["video_shape"] == [4, 2, 8, 8]


def test_export_and_sample_cli(tmp_path):
    cfg = cfg_for(tmp_path, "steps=2", "num_frames=4", "size=16")
    train.train(cfg)
    out = str(tmp_path / "w.safetensors")
    checkpoint.export(cfg.run_dir, out)
    m, meta = load_model(out)
    assert next(m.parameters()).dtype == torch.float32 and meta["kind"] == "base"
    gif = tmp_path / "v.gif"
    run = lambda *a: subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *a],
                                    capture_output=True, text=True, cwd=tmp_path)
    r = run("--prompt", "a red circle moving left", "--checkpoint", out, "--steps", "3", "--out", str(gif))
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and gif.exists()
    from PIL import Image
    im = Image.open(gif)
    assert im.n_frames == 4 and im.size == (16 * 8, 16 * 8)
    for bad, msg in [(["--prompt", "  "], "empty"), (["--prompt", "a", "--steps", "0"], "steps"),
                     (["--prompt", "a", "--checkpoint", "nope.safetensors"], "no checkpoint")]:
        r = run(*bad)
        assert r.returncode != 0 and msg in r.stderr and "Traceback" not in r.stderr


def test_shipped_checkpoints_sample_with_no_flags(tmp_path):
    """The README's second command: the default (efficient) model and --model base both load and write a GIF
    (one step each here, to stay quick)."""
    from model import read_metadata
    from sample import SHIPPED
    assert read_metadata(SHIPPED["efficient"])["kind"] == "sparse"
    assert read_metadata(SHIPPED["base"])["kind"] == "base" and read_metadata(SHIPPED["mlcd"])["kind"] == "mlcd"
    for extra in ([], ["--model", "base"]):
        gif = tmp_path / "v.gif"
        r = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--prompt", "a red circle moving left",
                            "--steps", "1", "--out", str(gif), *extra], capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 0 and gif.exists(), r.stderr
        assert ("sparse model" if not extra else "base model") in r.stdout
        assert "attention: merge" in r.stdout  # the kernel line: the CPU path, no FA4 here


def test_shards_without_what_the_model_reads_are_a_clear_error(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    write_shard(str(folder / "shard-00000.safetensors"), torch.randn(2, 4, 2, 8, 8), captions=["a", "b"])
    cfg = cfg_for(tmp_path, f"data={folder}", "steps=1", "model_args.in_channels=4",
                  "model_args.text_encoder=none", "model_args.text_dim=16")
    with pytest.raises(ValueError, match="no 'text_emb'"):
        train.train(cfg)


class _Payload:
    """Unpickling this runs code: it creates the file `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_resume_skips_a_broken_newest_checkpoint_and_never_unpickles_code(tmp_path, capsys):
    cfg = cfg_for(tmp_path, "steps=6")
    train.train(cfg)  # ckpt-4 and ckpt-6 kept (keep=2)
    run = cfg.run_dir
    marker = tmp_path / "pwned"
    torch.save({"step": 6, "optimizer": _Payload(str(marker))}, os.path.join(run, "ckpt-0000006", "state.pt"))
    more = cfg_for(tmp_path, "steps=8")
    records = train.train(more)
    assert not marker.exists()  # the payload never ran
    err = capsys.readouterr().err
    assert "ckpt-0000006 does not load" in err
    assert [r["step"] for r in records] == [5, 6, 7, 8]  # resumed from ckpt-0000004
    assert os.path.isdir(os.path.join(run, "broken-ckpt-0000006"))

    # a truncated newest checkpoint: named, set aside, the one before is taken
    weights = os.path.join(run, "ckpt-0000008", "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    records = train.train(cfg_for(tmp_path, "steps=9"))
    assert "ckpt-0000008 does not load" in capsys.readouterr().err
    assert [r["step"] for r in records] == [7, 8, 9]
    steps = [r["step"] for r in read_log(run)]
    assert steps == sorted(set(steps)) == list(range(1, 10))  # each step once in the log


def test_kill_and_rerun_logs_each_step_once(tmp_path, monkeypatch):
    cfg = cfg_for(tmp_path, "steps=5", "ckpt_every=2")
    train_killed_at(monkeypatch, cfg, 3)  # step 3 was logged, the last checkpoint is step 2
    assert [r["step"] for r in read_log(cfg.run_dir)] == [1, 2, 3]
    train.train(cfg)
    assert [r["step"] for r in read_log(cfg.run_dir)] == [1, 2, 3, 4, 5]


def test_resume_under_another_config_stops_with_the_differences(tmp_path):
    train.train(cfg_for(tmp_path, "steps=2"))
    with pytest.raises(train.UserError, match=r"lr: 0.0003 -> 0.001; model: 'tiny' -> 'demo'"):
        train.train(cfg_for(tmp_path, "steps=4", "model=demo", "lr=1e-3"))
    records = train.train(cfg_for(tmp_path, "steps=4", "log_every=2", "ckpt_every=4"))  # run-length keys may change
    assert [r["step"] for r in records] == [4]


def test_a_checkpoint_from_before_the_wan_model_keys_resumes(tmp_path):
    """A run saved before ModelConfig had mlp_hidden, cross_qk_norm and rope_float64, and when qk_norm was a bool
    (what its checkpoints' metadata holds), resumes: the saved model config is read with today's defaults and
    spellings, so the new keys do not read as a changed config."""
    import json
    from safetensors import safe_open
    from safetensors.torch import save_file
    cfg = cfg_for(tmp_path, "steps=2")
    train.train(cfg)
    ckpt = checkpoint.checkpoints(cfg.run_dir)[-1]
    for name in ("model.safetensors", "ema.safetensors"):
        path = os.path.join(ckpt, name)
        with safe_open(path, "pt") as f:
            meta = f.metadata()
        old = json.loads(meta["model_config"])
        for key in ("mlp_hidden", "cross_qk_norm", "rope_float64"):
            del old[key]
        old["qk_norm"] = True
        save_file(load_file(path), path, metadata={**meta, "model_config": json.dumps(old)})
    records = train.train(cfg_for(tmp_path, "steps=3"))
    assert [r["step"] for r in records] == [3]
    with pytest.raises(ValueError, match="model depth: 2 -> 3"):  # a real change still stops the run
        train.train(cfg_for(tmp_path, "steps=4", "model_args.depth=3"))


def test_micro_batches_give_the_same_step(tmp_path):
    """Gradient accumulation over micro-batches is the same step as the whole batch at once."""
    whole = train.train(cfg_for(tmp_path / "a", "steps=2", "micro_batch=4"))
    split = train.train(cfg_for(tmp_path / "b", "steps=2", "micro_batch=3"))  # 3 + 1
    assert len(whole) == 2
    for a, b in zip(whole, split, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


@pytest.mark.parametrize("stage", [0, 3])
def test_activation_checkpointing_changes_no_loss_or_gradient(tmp_path, stage):
    """Per-block activation checkpointing recomputes the same numbers (stage 3: with the layer-wise KD term), under
    every policy: "full" runs every attention kernel's forward again in the backward, "save_attention" never does,
    "save_matmuls" runs no matmul twice either (counted at the dispatcher, where a kept output is not recomputed)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import model

    class CountAttention(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls, self.matmuls = 0, 0

        def __torch_dispatch__(self, op, types, args=(), kwargs=None):
            self.calls += op in model._attention_ops()
            self.matmuls += op in model._attention_and_matmul_ops() and op not in model._attention_ops()
            return op(*args, **(kwargs or {}))

    extra = [] if stage == 0 else [
        f"init={tiny_checkpoint(tmp_path / 'init.safetensors', {'kind': 'mlcd', 'video_shape': [3, 4, 16, 16], 'sampler': {'name': 'euler', 'steps': 2, 'cfg': 1.0, 'shift': 1.0}})}",
        "plan=" + str(tmp_path / "plan.yaml"), "num_frames=4", "size=16"]
    (tmp_path / "plan.yaml").write_text("plan: [1, 2]\n")
    config = os.path.join(ROOT, "configs", f"stage{stage}.yaml")
    runs, calls, matmuls = {}, {}, {}
    for ac, policy in (("false", "full"), ("true", "full"), ("true", "save_attention"), ("true", "save_matmuls")):
        cfg = train.load_config(config, [f"run_dir={tmp_path / ac / policy}", "batch_size=4", "steps=3",
                                         "log_every=1", "ckpt_every=3", "warmup=1", "compile=false",
                                         f"activation_checkpointing={ac}", f"checkpoint_policy={policy}",
                                         *([] if stage else ["model=tiny"]), *extra])
        with CountAttention() as counter:
            runs[ac, policy] = train.train(cfg)
        calls[ac, policy], matmuls[ac, policy] = counter.calls, counter.matmuls
    assert calls["true", "full"] > calls["false", "full"] == calls["true", "save_attention"] > 0, calls
    assert calls["true", "save_matmuls"] == calls["false", "full"], calls
    assert matmuls["true", "save_attention"] > matmuls["false", "full"] == matmuls["true", "save_matmuls"] > 0, matmuls
    for run in (runs["true", "full"], runs["true", "save_attention"], runs["true", "save_matmuls"]):
        for a, b in zip(runs["false", "full"], run, strict=True):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6, abs=1e-7)
    with pytest.raises(train.UserError, match="checkpoint_policy must be one of full, save_attention, save_matmuls"):
        train.load_config(config, ["checkpoint_policy=most"])


def test_a_run_whose_checkpoints_all_fail_is_never_restarted_from_scratch(tmp_path):
    cfg = cfg_for(tmp_path, "steps=2")
    train.train(cfg)
    (tmp_path / "run" / "ckpt-0000002" / "state.pt").write_bytes(b"truncated")
    for _ in range(2):  # the first run sets it aside, the second finds only the set-aside folder
        with pytest.raises(train.UserError, match="broken-ckpt-0000002"):
            train.train(cfg_for(tmp_path, "steps=4"))
    assert [r["step"] for r in read_log(cfg.run_dir)] == [1, 2]  # the log is kept
    moved = train.train(cfg_for(tmp_path / "elsewhere", "steps=1"))  # another run_dir starts afresh
    assert [r["step"] for r in moved] == [1]


def test_sample_generators_differ_for_every_step_index_and_stream():
    """A sample's draws depend on (seed, step, index, stream) alone: no two of these collide (a linear mix of
    step and index would repeat sample 1009 of step s as sample 0 of step s + 1)."""
    cfg = train.make_config({})
    keys = [(s, i, k) for s in (0, 1, 2) for i in (0, 1, 1008, 1009, 2018) for k in (train.DATA, train.NOISE)]
    draws = {torch.rand(4, generator=train.sample_generator(cfg, s, i, "cpu", k)).sum().item() for s, i, k in keys}
    assert len(draws) == len(keys)
    again = train.sample_generator(cfg, 2, 1009, "cpu", train.NOISE)
    assert torch.equal(torch.rand(4, generator=again), torch.rand(4, generator=train.sample_generator(
        cfg, 2, 1009, "cpu", train.NOISE)))


@pytest.mark.parametrize("domain", ["shapes", "bounce"])
def test_a_built_in_domain_batch_renders_each_sample_as_its_own_generator_draws_it(domain):
    """get_batch draws every sample's parameters from the sample's own generator and renders them in one call: the
    same videos, captions and dropped captions as drawing each sample alone (what it did before, and what makes a
    sample independent of the batch and process it falls in)."""
    from data import DOMAINS
    from model import DiT, model_config
    cfg = train.make_config({"data": domain, "model": "tiny", "caption_dropout": 0.5})
    cfg.num_frames, cfg.size = 5, 16
    model = DiT(model_config("tiny", max_frames=8, text_len=80))
    x0, text, mask = train.get_batch(cfg, model, None, 3, 2, 6, "cpu")
    videos, dropped = [], []
    for index in range(2, 8):
        g = train.sample_generator(cfg, 3, index, "cpu", train.DATA)
        video, caption = DOMAINS[domain].batch(1, g, 5, 16)
        videos.append(video[0])
        dropped.append(torch.rand(1, generator=g)[0] < 0.5)
        ids, ids_mask = model.tokenize(["" if dropped[-1] else caption[0]])
        assert torch.equal(text[index - 2], ids[0]) and torch.equal(mask[index - 2], ids_mask[0])
    assert torch.equal(x0, torch.stack(videos)) and 0 < sum(dropped) < 6


def test_fsdp_checkpoint_with_a_missing_shard_is_set_aside(tmp_path, capsys):
    """fsdp: true in one process writes DCP checkpoints; one whose shard file is gone is named, set aside, and the
    run resumes from the one before it, with the same steps as a run that was never interrupted."""
    cfg = cfg_for(tmp_path, "steps=4", "fsdp=true", "keep=3")
    train.train(cfg)
    shard = [n for n in os.listdir(os.path.join(cfg.run_dir, "ckpt-0000004", "dcp")) if n.endswith(".distcp")]
    os.remove(os.path.join(cfg.run_dir, "ckpt-0000004", "dcp", shard[0]))
    records = train.train(cfg)
    assert "ckpt-0000004 does not load" in capsys.readouterr().err
    assert [r["step"] for r in records] == [3, 4] and os.path.isdir(os.path.join(cfg.run_dir, "broken-ckpt-0000004"))
    straight = cfg_for(tmp_path / "straight", "steps=4", "fsdp=true")
    train.train(straight)
    assert [r["loss"] for r in read_log(cfg.run_dir)] == [r["loss"] for r in read_log(straight.run_dir)]


def test_profile_traces_the_last_steps(tmp_path):
    """profile: N writes a Chrome trace of the run's last N steps (profiler steps count from 0)."""
    import json
    cfg = cfg_for(tmp_path, "steps=4", "profile=2", "save=false")
    train.train(cfg)
    with open(os.path.join(cfg.run_dir, "trace-rank0.json")) as f:
        events = json.load(f)["traceEvents"]
    assert sorted(e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")) == \
        ["ProfilerStep#2", "ProfilerStep#3"]


def test_profile_longer_than_the_run_traces_the_steps_there_are(tmp_path):
    """profile larger than the steps left traces those steps (no empty extra step), and a rerun of a finished
    run leaves its trace alone; a negative profile is a config error."""
    import json
    cfg = cfg_for(tmp_path, "steps=2", "profile=5")
    train.train(cfg)
    path = os.path.join(cfg.run_dir, "trace-rank0.json")
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    assert sorted(e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")) == \
        ["ProfilerStep#0", "ProfilerStep#1"]
    before = os.path.getmtime(path)
    train.train(cfg)  # nothing left to run
    assert os.path.getmtime(path) == before
    with pytest.raises(ValueError, match="profile must be in"):
        cfg_for(tmp_path, "profile=-1")


def test_a_run_folder_in_the_layout_before_run_settings_resumes_and_exports_under_its_plan(tmp_path):
    """Before 2026-12-01 a run chose its backend through model_args, its checkpoints kept the mask plan and the
    backend inside model_config (the first sessions' backends under the names tile and flex), and its stage keys
    had other names: such a folder resumes, and exports its student under its plan and backend."""
    import json
    from safetensors import safe_open
    from safetensors.torch import save_file
    init = tiny_checkpoint(tmp_path / "init.safetensors", {"kind": "mlcd", "video_shape": [3, 4, 16, 16],
                                                           "sampler": {"name": "euler", "steps": 2}})
    (tmp_path / "plan.yaml").write_text("plan: [1, full]\n")
    s3 = os.path.join(ROOT, "configs", "stage3.yaml")
    old_style = [f"run_dir={tmp_path / 'run'}", f"init={init}", f"plan={tmp_path / 'plan.yaml'}", "batch_size=4",
                 "log_every=1", "ckpt_every=2", "warmup=1", "compile=false", "model_args.attn_backend=gather"]
    train.train(train.load_config(s3, old_style + ["steps=2"]))
    ckpt = checkpoint.checkpoints(str(tmp_path / "run"))[-1]
    for name in ("model.safetensors", "ema.safetensors"):  # the layout the earlier code wrote
        path = os.path.join(ckpt, name)
        with safe_open(path, "pt") as f:
            meta = f.metadata()
        config = {**json.loads(meta.pop("model_config")), "mask_plan": json.loads(meta.pop("mask_plan")),
                  "attn_backend": "tile"}
        meta.pop("attn_backend")
        save_file(load_file(path), path, metadata={**meta, "model_config": json.dumps(config)})
    state = torch.load(os.path.join(ckpt, "state.pt"), weights_only=True)
    old_names = {v: k for k, v in train.ALIASES.items()}
    config = {old_names.get(k, k): v for k, v in state["config"].items() if k != "attn_backend"}
    torch.save({**state, "config": {**config, "model_args": {"attn_backend": "gather"}}},
               os.path.join(ckpt, "state.pt"))
    assert [r["step"] for r in train.train(train.load_config(s3, old_style + ["steps=3"]))] == [3]
    out = str(tmp_path / "student.safetensors")
    checkpoint.export(str(tmp_path / "run"), out)
    student, meta = load_model(out)
    assert student.mask_plan == [1, "full"] and student.attn_backend == "gather" and meta["attn_backend"] == "gather"


def test_stages_inherit_their_inits_backend_unless_the_config_names_one(tmp_path):
    from model import save_model
    from conftest import tiny_model
    m = tiny_model(attn_backend="gather")
    init = str(tmp_path / "init.safetensors")
    save_model(init, m, {"kind": "mlcd", "video_shape": [3, 4, 16, 16], "sampler": {"name": "euler", "steps": 2}})
    (tmp_path / "plan.yaml").write_text("plan: [1]\n")
    s3 = os.path.join(ROOT, "configs", "stage3.yaml")
    for name, extra, want in [("inherit", [], "gather"), ("named", ["attn_backend=merge"], "merge")]:
        run = str(tmp_path / name)
        train.train(train.load_config(s3, [f"run_dir={run}", f"init={init}", f"kd_plan={tmp_path / 'plan.yaml'}",
                                           "batch_size=2", "steps=1", "compile=false", *extra]))
        assert load_model(os.path.join(checkpoint.checkpoints(run)[-1], "ema.safetensors"))[0].attn_backend == want


def test_kd_times_sampler_draws_only_the_inits_sampling_times(tmp_path, monkeypatch):
    """kd_times: sampler: stage 3 trains at the times the init's sampler queries (its Euler grid without the
    final 0, shift applied), each about equally often; uniform stays stage 1's draw; a training step uses it."""
    import distill
    import flow
    from model import save_model
    from conftest import tiny_model
    draws = lambda cfg, init: torch.cat([train.kd_times(cfg, init, "cpu")(torch.Generator().manual_seed(i))
                                         for i in range(400)])
    sampler = {"sampler": flow.euler_sampler(4, shift=3.0)}
    grid = flow.time_grid(4, shift=3.0)[:-1]
    t = draws(train.make_config({"stage": 3, "init": "x", "kd_plan": "p", "kd_times": "sampler"}), sampler)
    counts = [(t == g).sum().item() for g in grid]
    assert sum(counts) == 400 and min(counts) > 70, counts
    uniform = draws(train.make_config({"stage": 3, "init": "x", "kd_plan": "p"}), sampler)
    assert torch.equal(uniform, torch.cat([distill.sample_times(1, torch.Generator().manual_seed(i))
                                           for i in range(400)]))
    with pytest.raises(train.UserError, match="kd_times must be 'uniform' or 'sampler'"):
        train.check_inputs(train.make_config({"stage": 3, "init": "x", "kd_plan": "p", "kd_times": "edges"}))
    init = str(tmp_path / "init.safetensors")
    save_model(init, tiny_model(), {"kind": "mlcd", "video_shape": [3, 4, 16, 16], "sampler": flow.euler_sampler(2)})
    (tmp_path / "plan.yaml").write_text("plan: [1]\n")
    seen, draw = [], train.draw_noise
    monkeypatch.setattr(train, "draw_noise", lambda *a: seen.append(draw(*a)[0]) or draw(*a))
    train.train(train.load_config(os.path.join(ROOT, "configs", "stage3.yaml"), [
        f"run_dir={tmp_path / 'run'}", f"init={init}", f"kd_plan={tmp_path / 'plan.yaml'}", "kd_times=sampler",
        "batch_size=4", "steps=2", "compile=false"]))
    assert len(seen) == 2 and set(torch.cat(seen).tolist()) <= {1.0, 0.5}, seen


def test_a_key_under_both_its_names_is_refused_and_an_override_wins_under_either():
    with pytest.raises(ValueError, match="plan and kd_plan are one key"):
        train.make_config({"stage": 3, "init": "x", "plan": "a.yaml", "kd_plan": "b.yaml"})
    s3 = os.path.join(ROOT, "configs", "stage3.yaml")  # it sets kd_plan
    assert train.load_config(s3, ["plan=mine.yaml"]).kd_plan == "mine.yaml"


def test_the_bounce_domain_through_training_export_evaluation_and_the_search(tmp_path, capsys):
    """data: bounce runs the same code paths as the demo domain: stage 0 on its videos, a checkpoint that names
    the domain and its vocabulary, evaluate.py scoring it with the two-object judge on its prompts, and the mask
    search calibrating on its prompts (a tiny model, 8 frames, a few steps: the paths, not a model)."""
    import dataclasses
    import json

    import data
    import evaluate
    from data import BOUNCE_VOCABULARY, bounce_validation_prompts
    from model import read_metadata
    small = ["model=tiny", "num_frames=8", "batch_size=2", "steps=2", "log_every=1", "warmup=1"]
    run = train.load_config(os.path.join(ROOT, "configs", "bounce", "stage0.yaml"),
                            [f"run_dir={tmp_path / 'stage0'}", *small])
    assert run.data == "bounce" and run.model_args == {"max_frames": 32, "text_len": 80}
    with pytest.raises(train.UserError, match="captions run to 66 bytes, this model reads 47"):
        train.train(train.load_config(os.path.join(ROOT, "configs", "bounce", "stage0.yaml"),
                                      [f"run_dir={tmp_path / 'short'}", *small, "model_args={}"]))
    small.append("model_args={text_len: 80}")
    train.train(train.load_config(os.path.join(ROOT, "configs", "bounce", "stage0.yaml"),
                                  [f"run_dir={tmp_path / 'stage0'}", *small]))
    base = str(tmp_path / "base.safetensors")
    train.main([os.path.join(ROOT, "configs", "bounce", "stage0.yaml"), f"run_dir={tmp_path / 'stage0'}", *small,
                "--export", base])
    meta = read_metadata(base)
    assert meta["domain"] == "bounce" and meta["vocabulary"] == BOUNCE_VOCABULARY and meta["video_shape"][1] == 8
    with pytest.raises(train.UserError, match="data: shapes, but init / teacher were trained on data: bounce"):
        train.train(train.load_config(os.path.join(ROOT, "configs", "bounce", "stage1.yaml"), [
            f"run_dir={tmp_path / 'stage1'}", f"init={base}", f"teacher={base}", "data=shapes"]))
    assert train.load_config(os.path.join(ROOT, "configs", "bounce", "stage1.yaml"), ["num_frames=0"]).num_frames == 32
    rows = tmp_path / "rows.jsonl"
    evaluate.main(["--checkpoint", base, "--n", "2", "--steps", "2", "--json", str(rows)])
    row = json.loads(rows.read_text())
    assert set(evaluate.BOUNCE_ATTRS) <= set(row) and row["n"] == 2  # the two-object judge scored it
    seen = []
    real = data.DOMAINS["bounce"].prompts
    bounce = data.DOMAINS["bounce"]
    data.DOMAINS["bounce"] = dataclasses.replace(bounce, prompts=lambda n, seed: seen.append(n) or real(n, seed))
    try:
        train.train(train.load_config(os.path.join(ROOT, "configs", "bounce", "stage2.yaml"), [
            f"run_dir={tmp_path / 'stage2'}", f"init={base}", "search_prompts=2", "search_seeds=1",
            "search_candidates=[1, 4]", "search_sweep=[]"]))
    finally:
        data.DOMAINS["bounce"] = bounce
    assert seen == [2] and (tmp_path / "stage2" / "plan.yaml").exists()
    assert bounce_validation_prompts(2)[0].count(" and ") == 1
