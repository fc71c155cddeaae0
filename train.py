"""Training: one loop for every stage of the recipe.

    python train.py configs/stage0.yaml                      # stage 0: the base (teacher) model from scratch
    torchrun --nproc_per_node 4 train.py configs/stage0.yaml # the same, data parallel
    python train.py configs/stage0.yaml steps=2000 lr=1e-4   # key=value overrides, checked against the config
    python train.py configs/stage0.yaml --export checkpoints/base.safetensors  # bf16 EMA weights to ship

Rerunning a command resumes from the newest checkpoint in its run_dir. Every random draw of a step (data,
caption dropout, times, noise) comes from a generator seeded by (seed, step, rank), so a resumed run takes the
same batches as an uninterrupted one; torch's global RNG state is saved too. Checkpoints are folders
run_dir/ckpt-NNNNNNN with model.safetensors and ema.safetensors (config in the metadata) and state.pt
(optimizer, step, RNG), written to a temporary folder and renamed, so a crash never leaves half a checkpoint.

Data: `data: shapes` renders the built-in moving-shapes videos on the fly; any other value is a folder of
safetensors shards of latents (data.py documents the format). Leaves out: sampling (sample.py), evaluation
(evaluate.py), the distillation objectives of later stages (distill.py).
"""
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import torch
import yaml
from tqdm import tqdm

import distill
import flow
import parallel
from data import ShardDataset, collate, moving_shapes_batch
from attention import load_plan
from model import DiT, load_model, model_config, num_params, save_model


STAGES = {0: "base", 1: "mlcd", 2: "mask search", 3: "sparse"}


@dataclass
class TrainConfig:
    stage: int = 0                       # 0 base, 1 MLCD, 2 mask search, 3 sparse KD (distill.py)
    run_dir: str = "runs/stage0"
    model: str = "demo"                  # preset in model.py
    model_args: dict = field(default_factory=dict)  # overrides of the preset, e.g. {depth: 4}
    init: str = ""                       # weights to start from (later stages); empty = random init
    data: str = "shapes"                 # "shapes" or a folder of safetensors shards
    num_frames: int = 16                 # shapes data only
    size: int = 32                       # shapes data only
    batch_size: int = 64                 # global, split over data-parallel ranks
    sp_size: int = 1                     # ranks sharing one sample's sequence (Ulysses; torchrun only)
    steps: int = 10000
    lr: float = 3e-4
    warmup: int = 500
    min_lr_frac: float = 1.0             # < 1: cosine decay after warmup, down to lr * min_lr_frac at `steps`
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.99)
    grad_clip: float = 1.0
    ema: float = 0.999
    caption_dropout: float = 0.1         # for classifier-free guidance
    t_dist: str = "logit_normal"
    t_shift: float = 1.0                 # > 1: train more at high noise (flow.shift_t)
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 1000
    keep: int = 2                        # checkpoints kept in run_dir
    max_minutes: float = 0.0             # > 0: checkpoint and stop after this much wall time (leases)
    compile: bool = True                 # torch.compile the model (GPU only)
    bf16: bool = True                    # bf16 autocast (GPU only)
    device: str = ""                     # empty: cuda if available
    sample_steps: int = 50               # default sampler written into the checkpoint for sample.py
    sample_cfg: float = 5.0
    sample_shift: float = 1.0
    # stage 1 (MLCD): the teacher is the `teacher` checkpoint (default: `init`), frozen
    teacher: str = ""
    segments: int = 4                    # K: the student samples in K steps
    teacher_steps: int = 64              # the teacher's Euler step is 1 / teacher_steps
    teacher_cfg: float = 5.0             # guidance inside the teacher's step
    target: str = "ema"                  # "ema" (the EMA student) or "stopgrad" (the student itself)
    huber_c: float = 1e-3
    # stage 2 (mask search on the `init` model; writes run_dir/plan.yaml and PNGs)
    threshold: float = 0.1               # r: the largest relative L2 error of a layer's attention output
    candidates: list = field(default_factory=list)  # k values to try; empty: 1 .. T-1
    calib_prompts: int = 16
    calib_seeds: int = 2
    sweep: list = field(default_factory=lambda: [0.025, 0.05, 0.1, 0.2, 0.4])  # also write plan-r{r}.yaml
    # stage 3 (KD: `init` weights under `plan` learn from the same weights with full attention)
    plan: str = ""                       # a stage-2 plan.yaml
    kd_output_weight: float = 1.0
    kd_attn_weight: float = 1.0


# ----------------------------------------------------------------------------------------------------------
# Config: YAML + key=value overrides through one validator

def _coerce(name, value, default):
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
    elif isinstance(default, (int, float)) and not isinstance(default, bool):
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number, got {value!r}")
        if isinstance(default, int) and value != int(value):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return type(default)(value)
    elif isinstance(default, str) and not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {value!r}")
    elif isinstance(default, dict) and not isinstance(value, dict):
        raise ValueError(f"{name} must be a mapping, got {value!r}")
    elif isinstance(default, list) and not isinstance(value, list):
        raise ValueError(f"{name} must be a list, got {value!r}")
    elif isinstance(default, tuple):
        return tuple(value)
    return value


def make_config(values: dict) -> TrainConfig:
    defaults = TrainConfig()
    valid = {f.name: getattr(defaults, f.name) for f in fields(TrainConfig)}
    unknown = set(values) - set(valid)
    if unknown:
        raise ValueError(f"unknown config keys {sorted(unknown)}; valid keys: {sorted(valid)}")
    cfg = TrainConfig(**{k: _coerce(k, v, valid[k]) for k, v in values.items()})
    model_config(cfg.model, **cfg.model_args)  # validates the model part now, not after start-up
    if cfg.batch_size < 1 or cfg.steps < 0 or cfg.log_every < 1 or cfg.ckpt_every < 1:
        raise ValueError("batch_size, log_every and ckpt_every must be >= 1 and steps >= 0")
    if cfg.stage not in STAGES:
        raise ValueError(f"stage must be one of {sorted(STAGES)}, got {cfg.stage}")
    if cfg.stage >= 1 and not (cfg.init or cfg.teacher):
        raise ValueError(f"stage {cfg.stage} distils a trained model: set init (and optionally teacher)")
    if cfg.stage == 3 and not cfg.plan:
        raise ValueError("stage 3 needs plan: the plan.yaml written by stage 2")
    if cfg.target not in ("ema", "stopgrad") or cfg.segments < 1 or cfg.teacher_steps < cfg.segments:
        raise ValueError("target must be 'ema' or 'stopgrad', segments >= 1 and teacher_steps >= segments")
    return cfg


def load_config(path: str, overrides: list[str] = ()) -> TrainConfig:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} not found")
    with open(path) as f:
        values = yaml.safe_load(f) or {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw)
        if key.startswith("model_args."):
            values.setdefault("model_args", {})[key.split(".", 1)[1]] = value
        else:
            values[key] = value
    return make_config(values)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints

def checkpoints(run_dir: str) -> list[str]:
    if not os.path.isdir(run_dir):
        return []
    names = sorted(n for n in os.listdir(run_dir) if n.startswith("ckpt-") and n[5:].isdigit())
    return [os.path.join(run_dir, n) for n in names if os.path.isfile(os.path.join(run_dir, n, "state.pt"))]


def save_checkpoint(cfg, model, ema, opt, step, meta):
    final = os.path.join(cfg.run_dir, f"ckpt-{step:07d}")
    tmp = os.path.join(cfg.run_dir, f".tmp-ckpt-{step:07d}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_model(os.path.join(tmp, "model.safetensors"), model.state_dict(), model.cfg, meta)
    save_model(os.path.join(tmp, "ema.safetensors"), ema.state_dict(), model.cfg, meta)
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    torch.save({"optimizer": opt.state_dict(), "step": step, "rng": rng, "config": asdict(cfg)},
               os.path.join(tmp, "state.pt"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in checkpoints(cfg.run_dir)[: -cfg.keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path, model, ema, opt):
    from safetensors.torch import load_file
    model.load_state_dict(load_file(os.path.join(path, "model.safetensors")))
    ema.load_state_dict(load_file(os.path.join(path, "ema.safetensors")))
    state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=False)
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["cpu"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"]


def export(cfg: TrainConfig, out: str):
    """The newest checkpoint's EMA weights in bf16, for shipping."""
    found = checkpoints(cfg.run_dir)
    if not found:
        raise FileNotFoundError(f"no checkpoint in {cfg.run_dir!r} to export")
    model, meta = load_model(os.path.join(found[-1], "ema.safetensors"))
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    save_model(out, model.state_dict(), model.cfg, {k: v for k, v in meta.items() if k != "model_config"},
               dtype=torch.bfloat16)
    print(f"exported {found[-1]} (EMA, bf16) -> {out} ({os.path.getsize(out) / 2**20:.1f} MiB)")


# ----------------------------------------------------------------------------------------------------------
# Data and objective

def step_generator(cfg, step, rank, device):
    g = torch.Generator(device=device)
    g.manual_seed(((cfg.seed * 1_000_003 + step) * 1009 + rank) % 2**63)
    return g


def null_text(model, n, like=None):
    """The unconditional input: the empty caption, or a single zero token for precomputed embeddings."""
    if model.text_encoder is not None:
        return model.tokenize([""] * n)
    emb = torch.zeros_like(like)
    mask = torch.zeros(emb.shape[:2], dtype=torch.bool)
    mask[:, 0] = True
    return emb, mask


def get_batch(cfg, model, dataset, step, rank, local_bs, device):
    """-> x0 [B, C, T, H, W], text, text_mask on device; the same for the same (seed, step, rank)."""
    g = step_generator(cfg, step, rank, "cpu")
    if dataset is None:
        x0, captions = moving_shapes_batch(local_bs, g, cfg.num_frames, cfg.size, device)
        text, mask = model.tokenize(captions)
        null, null_mask = null_text(model, local_bs)
    else:
        batch = collate([dataset[i] for i in torch.randint(len(dataset), (local_bs,), generator=g).tolist()])
        x0 = batch["video"].to(device)
        if model.text_encoder is not None:
            text, mask = model.tokenize(batch["caption"])
            null, null_mask = null_text(model, local_bs)
        else:
            text, mask = batch["text_emb"].float(), batch["text_mask"].bool()
            null, null_mask = null_text(model, local_bs, text)
    drop = torch.rand(local_bs, generator=g) < cfg.caption_dropout
    text = torch.where(drop.view(-1, *[1] * (text.dim() - 1)), null, text)
    mask = torch.where(drop[:, None], null_mask, mask)
    return x0, text.to(device), mask.to(device)


def learning_rate(cfg, step):
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def stage0_loss(model, cfg, x0, text, mask, g):
    """Rectified flow: regress the velocity eps - x0 at a random point of the straight path."""
    t = flow.sample_t(x0.shape[0], g, x0.device, cfg.t_dist, cfg.t_shift)
    eps = torch.randn(x0.shape, generator=g, device=x0.device)
    return flow.flow_loss(lambda xt, tt: model(xt, tt, text, mask), x0, t, eps)


def stage1_loss(net, teacher, target, cfg, x0, text, mask, uncond, g):
    """MLCD (distill.py): the student's jump to the segment start matches the teacher-step-then-target jump.
    uncond: the teacher's encoding of the empty caption (the same every step)."""
    t = distill.sample_times(x0.shape[0], g, x0.device)
    eps = torch.randn(x0.shape, generator=g, device=x0.device)
    with torch.no_grad():
        cond = teacher.encode_text(text, mask)
    return distill.mlcd_loss(
        student_fn=lambda x, tt: net(x, tt, text, mask),
        teacher_fn=lambda x, tt: flow.cfg_velocity(teacher, x, tt, cond, uncond, cfg.teacher_cfg),
        target_fn=lambda x, tt: target(x, tt, text, mask),
        x0=x0, eps=eps, t=t, num_segments=cfg.segments, teacher_steps=cfg.teacher_steps, huber_c=cfg.huber_c)


def stage3_loss(net, teacher, recorders, cfg, x0, text, mask, g):
    """KD (distill.py): the sparse student matches the full-attention teacher's velocity and every layer's
    attention output on the same noisy input."""
    t = distill.sample_times(x0.shape[0], g, x0.device)
    x_t = flow.interpolate(x0, torch.randn(x0.shape, generator=g, device=x0.device), t)
    with torch.no_grad():
        v_teacher = teacher(x_t, t, text, mask)
    v_student = net(x_t, t, text, mask)
    student, teach = recorders
    return distill.kd_loss(v_student, v_teacher, student.take(), teach.take(), cfg.kd_output_weight,
                           cfg.kd_attn_weight, teacher.sp_group)


def make_objective(cfg, model, net, ema, env):
    """-> loss(x0, text, mask, g) for the configured stage, with what that stage needs loaded once."""
    if cfg.stage == 0:
        return lambda x0, text, mask, g: stage0_loss(net, cfg, x0, text, mask, g)
    device = env.device
    teacher, _ = load_model(cfg.teacher or cfg.init, device, torch.bfloat16 if device.type == "cuda" else None)
    teacher.requires_grad_(False).enable_sequence_parallel(env.sp_group)
    if cfg.stage == 3:
        teacher.set_mask_plan(["full"])
        recorders = distill.AttentionRecorder(model, detach=False), distill.AttentionRecorder(teacher, detach=True)
        return lambda x0, text, mask, g: stage3_loss(net, teacher, recorders, cfg, x0, text, mask, g)
    target = ema if cfg.target == "ema" else model
    uncond = {}  # batch size -> the teacher's encoding of the empty caption, computed once

    def loss(x0, text, mask, g):
        n = x0.shape[0]
        if n not in uncond:
            with torch.no_grad():
                uncond[n] = teacher.encode_text(*(x.to(device) for x in null_text(model, n, text)))
        return stage1_loss(net, teacher, target, cfg, x0, text, mask, uncond[n], g)
    return loss


def checkpoint_meta(cfg, video_shape, init_meta):
    """What sample.py needs to know: the kind of model and how it samples (stage 3 keeps its init's sampler)."""
    sampler = {"name": "euler", "steps": cfg.sample_steps, "cfg": cfg.sample_cfg, "shift": cfg.sample_shift}
    if cfg.stage == 1:
        sampler = {"name": "euler", "steps": cfg.segments, "cfg": 1.0, "shift": 1.0}
    elif cfg.stage == 3:
        sampler = init_meta["sampler"]
    return {"kind": STAGES[cfg.stage], "train_config": asdict(cfg), "video_shape": video_shape, "sampler": sampler}


def mask_search(cfg, env):
    """Stage 2 (distill.py): measure every layer's error under every candidate mask along the model's own
    sampling trajectories, pick the plan for threshold r, write plan.yaml and the PNGs, print the table."""
    from data import validation_prompts
    from sample import generate
    model, meta = load_model(cfg.init, env.device)
    model.set_mask_plan(["full"])  # errors are measured against full attention
    T = meta["video_shape"][1] // model.cfg.patch_size[0]
    candidates = sorted(cfg.candidates) or list(range(1, T))
    probe = distill.AttentionProbe(candidates, model.cfg.depth, T)
    for i, block in enumerate(model.blocks):
        block.attn.observer = probe.observer(i)
    prompts = validation_prompts(cfg.calib_prompts, seed=cfg.seed + 1)  # evaluation uses seed 0
    for seed in tqdm(range(cfg.calib_seeds), desc="calibration", disable=not env.is_main):
        generate(model, meta, prompts, seed=10_000 + seed)
    errors = probe.errors()
    plan = distill.choose_plan(errors, candidates, cfg.threshold)
    rows = distill.plan_report(plan, errors, candidates, T)
    if not env.is_main:  # under torchrun every rank searches alike; one writes
        return rows
    os.makedirs(cfg.run_dir, exist_ok=True)
    sparsity = distill.write_plan(os.path.join(cfg.run_dir, "plan.yaml"), rows, cfg.threshold, T)
    torch.save({"errors": errors, "candidates": candidates, "tiles": probe.tiles / probe.count[:, None, None]},
               os.path.join(cfg.run_dir, "search.pt"))
    layers = sorted({0, model.cfg.depth // 2, model.cfg.depth - 1})
    distill.save_tile_maps_png(os.path.join(cfg.run_dir, "tile_maps.png"), probe.tiles, layers, plan)
    distill.save_plan_png(os.path.join(cfg.run_dir, "plan.png"), rows, T)
    print(f"{'layer':>5} {'mask':>6} {'error':>8} {'density':>8}   errors for k = {candidates}")
    for r, e in zip(rows, errors.tolist()):
        print(f"{r['layer']:>5} {r['mask']:>6} {r['error']:>8.4f} {r['density']:>8.3f}   "
              + " ".join(f"{x:.3f}" for x in e))
    print(f"r = {cfg.threshold}: mean attention sparsity {100 * sparsity:.1f}%; wrote {cfg.run_dir}/plan.yaml")
    for r in cfg.sweep:  # the same measurements under other thresholds (the paper's r sweep)
        p = distill.choose_plan(errors, candidates, r)
        sparsity = distill.write_plan(os.path.join(cfg.run_dir, f"plan-r{r}.yaml"),
                                      distill.plan_report(p, errors, candidates, T), r, T)
        print(f"  r = {r:<5}: mean sparsity {100 * sparsity:5.1f}%  plan {p}  -> plan-r{r}.yaml")
    return rows


# ----------------------------------------------------------------------------------------------------------
# The loop

def train(cfg: TrainConfig) -> list[dict]:
    """Runs (or resumes) the configured stage; returns the log records written by this call."""
    env = parallel.setup(cfg.device or None, cfg.sp_size)
    device = env.device
    if cfg.batch_size % env.dp_size:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {env.dp_size} data-parallel groups")
    local_bs = cfg.batch_size // env.dp_size
    torch.manual_seed(cfg.seed)

    if cfg.stage == 2:
        return mask_search(cfg, env)
    init_meta = {}
    if cfg.init:
        model, init_meta = load_model(cfg.init)
    else:
        model = DiT(model_config(cfg.model, **cfg.model_args))
    if cfg.stage == 3:
        model.set_mask_plan(load_plan(cfg.plan))
    model.to(device).train()
    model.enable_sequence_parallel(env.sp_group)
    ema = DiT(model.cfg).to(device).eval().requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    ema.enable_sequence_parallel(env.sp_group)
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas,
                            fused=device.type == "cuda")

    start = 0
    found = checkpoints(cfg.run_dir)
    if found:
        start = load_checkpoint(found[-1], model, ema, opt)
    dataset = None if cfg.data == "shapes" else ShardDataset(cfg.data)
    if dataset is not None:
        need = "caption" if model.text_encoder is not None else "text_emb"
        if need not in dataset[0]:
            raise ValueError(f"the shards in {cfg.data!r} have no {need!r}, which a model with text_encoder="
                             f"{model.cfg.text_encoder!r} reads (see data.py for the shard format)")
    shape = [model.cfg.in_channels, cfg.num_frames, cfg.size, cfg.size] if dataset is None else \
        list(dataset[0]["video"].shape)
    meta = checkpoint_meta(cfg, shape, init_meta)

    net = model
    if env.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if cfg.compile and device.type == "cuda":
        net = torch.compile(net)
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=cfg.bf16 and device.type == "cuda")
    objective = make_objective(cfg, model, net, ema, env)

    if env.is_main:
        os.makedirs(cfg.run_dir, exist_ok=True)
        print(f"stage {cfg.stage}: {num_params(model) / 1e6:.2f}M parameters on {env.world} x {device} "
              f"(sequence parallel {env.sp_size} x data parallel {env.dp_size}), "
              f"steps {start} -> {cfg.steps}" + (f" (resumed from {found[-1]})" if found else ""))
    log_path = os.path.join(cfg.run_dir, "log.jsonl")
    records, bad = [], torch.zeros((), dtype=torch.bool, device=device)
    pbar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not env.is_main, dynamic_ncols=True)
    t_start = t_last = time.time()
    step_last = start
    for step in pbar:
        lr = learning_rate(cfg, step)
        for group in opt.param_groups:
            group["lr"] = lr
        # one batch per data-parallel group: the ranks of a sequence-parallel group draw the same data, times
        # and noise
        x0, text, mask = get_batch(cfg, model, dataset, step, env.dp_rank, local_bs, device)
        g = step_generator(cfg, step, env.dp_rank, device)
        with autocast:
            loss = objective(x0, text, mask, g)
        opt.zero_grad(set_to_none=True)
        # each rank's gradients cover its own tokens: their sum over an SP group is the sample's gradient, and
        # DDP averages over all ranks, hence the factor sp_size
        (loss * env.sp_size).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - cfg.ema)
        bad |= ~torch.isfinite(loss.detach())

        done = step + 1
        out_of_time = cfg.max_minutes > 0 and done % cfg.log_every == 0 and \
            parallel.any_rank(time.time() - t_start > 60 * cfg.max_minutes, device)
        last_step = done == cfg.steps or out_of_time
        if done % cfg.log_every == 0 or done % cfg.ckpt_every == 0 or last_step:
            if bad.item():  # the only host sync: once per interval
                last = checkpoints(cfg.run_dir)
                raise FloatingPointError(f"loss became {loss.item()} by step {done}; stopping. Last good "
                                         f"checkpoint: {last[-1] if last else 'none'} (rerun to resume from it, "
                                         "e.g. with a lower lr)")
            now = time.time()
            rate = (done - step_last) / max(now - t_last, 1e-9)
            rec = {"step": done, "loss": loss.item(), "grad_norm": grad_norm.item(), "lr": lr, "it_s": rate,
                   "videos_s": rate * cfg.batch_size, "time": now}
            if device.type == "cuda":
                rec["mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
            t_last, step_last = now, done
            records.append(rec)
            if env.is_main:
                pbar.set_postfix(loss=f"{rec['loss']:.4f}", it_s=f"{rate:.1f}")
                with open(log_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
        if (done % cfg.ckpt_every == 0 or last_step) and env.is_main:
            save_checkpoint(cfg, model, ema, opt, done, {**meta, "step": done})
        parallel.barrier()
        if out_of_time:
            if env.is_main:
                print(f"max_minutes={cfg.max_minutes} reached at step {done}; rerun to resume")
            break
    pbar.close()
    return records


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        sys.exit("usage: python train.py CONFIG.yaml [key=value ...] [--export OUT.safetensors]")
    out = None
    if "--export" in argv:
        i = argv.index("--export")
        if i + 1 >= len(argv):
            sys.exit("--export needs an output path")
        out = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    try:
        cfg = load_config(argv[0], argv[1:])
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    if out:
        export(cfg, out)
        return
    try:
        train(cfg)
    except FloatingPointError as e:
        sys.exit(f"error: {e}")
    finally:
        parallel.cleanup()


if __name__ == "__main__":
    main()
