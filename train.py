"""Training: one loop for every stage of the recipe.

    python train.py configs/stage0.yaml                      # stage 0: the base (teacher) model from scratch
    torchrun --nproc_per_node 4 train.py configs/stage0.yaml # the same, data parallel
    torchrun --nproc_per_node 8 train.py configs/stage3.yaml sp_size=2 fsdp=true activation_checkpointing=true
    python train.py configs/stage0.yaml steps=2000 lr=1e-4   # key=value overrides, checked against the config
    python train.py configs/stage0.yaml --export checkpoints/base.safetensors  # bf16 EMA weights to ship

Rerunning a command resumes from the newest checkpoint in its run_dir. Every random draw of a sample (data,
caption dropout, time, noise) comes from a generator seeded by (seed, step, the sample's place in the global
batch), so a resumed run takes the same batches as an uninterrupted one, at any world size; torch's global RNG
state is saved too. The run folder (its lock, checkpoints, resume, log, SIGTERM / SIGUSR1 preemption and
export) is checkpoint.py's: the loop calls one RunFolder.

Scale: DDP by default; `fsdp: true` shards weights, gradients, optimizer state and the EMA over every rank
with FSDP2 (bf16 weights in compute, fp32 gradient reduction and master weights); `sp_size` splits each
sample's tokens (Ulysses, parallel.py); `activation_checkpointing` recomputes each block in the backward. The
frozen teacher of stages 1 and 3 is kept whole in bf16 on every rank.

Data: `data: shapes` (or `bounce`, the harder built-in domain) renders videos on the fly; any other value is a
folder of safetensors shards of latents (data.py documents the format). Leaves out: sampling (sample.py),
evaluation (evaluate.py), the distillation objectives of later stages (distill.py), the run folder
(checkpoint.py).
"""
import copy
import hashlib
import json
import math
import os
import sys
import time
import warnings
from contextlib import nullcontext
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields

import torch
import yaml
from tqdm import tqdm

import checkpoint
import distill
import flow
import parallel
from attention import FULL, backend_name, load_plan
from cli import UserError, atomic_output, entry_point, warn
from data import (DOMAINS, NULL_FILE, check_shard_headers, checkpoint_domain, collate, open_dataset,
                  shard_paths)
from model import (CHECKPOINT_POLICIES, DiT, ModelConfig, config_dict, load_model, model_config,
                   num_params, read_metadata)


CPU_MICRO_BATCH = 8  # keeps a CPU run of the demo model near 4 GB of memory whatever the batch size
# DCP reading or writing a checkpoint in one process (fsdp: true without torchrun) is what we mean to do
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
# keys a resumed run may change: how long it runs and how it executes, never what it computes
RUN_KEYS = ("steps", "max_minutes", "log_every", "ckpt_every", "keep", "save", "micro_batch", "sp_size",
            "compile", "activation_checkpointing", "checkpoint_policy", "run_dir", "device", "profile",
            "attn_backend")


@dataclass
class TrainConfig:
    """Every key of a training config (configs/*.yaml), its default and what it does (what each stage is:
    STAGES below). Keys of one stage carry
    its name: mlcd_* (stage 1), search_* (stage 2), kd_* (stage 3); their earlier names (segments,
    threshold, plan, ...) still load (ALIASES)."""
    stage: int = 0                       # 0 base, 1 MLCD, 2 mask search, 3 sparse KD (distill.py)
    run_dir: str = "runs/stage0"
    model: str = "demo"                  # preset in model.py
    model_args: dict = field(default_factory=dict)  # overrides of the preset, e.g. {depth: 4}
    init: str = ""                       # weights to start from (later stages); empty = random init
    data: str = "shapes"                 # "shapes", "bounce" (data.DOMAINS), a shard folder, or "synthetic"
    synthetic_shape: list = field(default_factory=lambda: [4, 8, 90, 160])  # data: synthetic: [C, T, H, W]
    num_frames: int = 0                  # built-in domains only; 0: the domain's own (shapes 16, bounce 32)
    size: int = 32                       # built-in domains only
    batch_size: int = 64                 # global, split over data-parallel ranks
    micro_batch: int = 0                 # samples per forward/backward, gradients summed over the batch;
                                         # 0: the whole local batch on a GPU, CPU_MICRO_BATCH on a CPU
    sp_size: int = 1                     # ranks sharing one sample's sequence (Ulysses; torchrun only)
    fsdp: bool = False                   # shard weights, gradients, optimizer and EMA over all ranks (FSDP2)
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
    save: bool = True                    # false: write no checkpoint (benchmarks)
    max_minutes: float = 0.0             # > 0: checkpoint and stop after this much wall time (leases)
    profile: int = 0                     # > 0: trace the last N steps to run_dir/trace-rank{R}.json
    compile: bool = True                 # torch.compile the model's blocks (GPU only)
    attn_backend: str = ""               # "auto", "flash", "gather", "merge"; empty: init's own, else auto
    activation_checkpointing: bool = False  # recompute each block in the backward instead of keeping it
    checkpoint_policy: str = "full"      # what it keeps: "full" (each block's input), "save_attention" (also
                                         # the attention outputs: their forward runs once) or "save_matmuls"
                                         # (also every matmul's output); model.CHECKPOINT_POLICIES
    bf16: bool = True                    # bf16 autocast (GPU only)
    device: str = ""                     # empty: cuda if available
    sample_steps: int = 50               # the sampler a stage-0 checkpoint carries for sample.py
    sample_cfg: float = 5.0
    sample_shift: float = 1.0
    teacher: str = ""                    # stages 1 and 3: the frozen teacher (default: init)
    # stage 1, MLCD (distill.py)
    mlcd_segments: int = 4               # K: the student samples in K steps
    mlcd_teacher_steps: int = 64         # the teacher's Euler step is 1 / mlcd_teacher_steps
    mlcd_teacher_cfg: float = 5.0        # guidance inside the teacher's step
    mlcd_target: str = "ema"             # "ema" (the EMA student) or "stopgrad" (the student itself)
    mlcd_huber_c: float = 1e-3
    # stage 2, the mask search on `init` (distill.py): run_dir/plan.yaml, plan-r{r}.yaml, search.pt and PNGs
    search_threshold: float = 0.1        # r: the largest relative L2 error of a layer's attention output
    search_candidates: list = field(default_factory=list)  # k values to try; empty: 1 .. T-1
    search_prompts: int = 16             # calibration prompts (or data items, for embedding models)
    search_seeds: int = 2                # calibration noise seeds per prompt
    search_sweep: list = field(default_factory=lambda: [0.025, 0.05, 0.1, 0.2, 0.4])  # plan-r{r}.yaml each
    # stage 3, KD: `init` under `kd_plan` learns from the same weights with full attention (distill.py)
    kd_plan: str = ""                    # a stage-2 plan.yaml
    kd_output_weight: float = 1.0
    kd_attn_weight: float = 1.0
    kd_times: str = "uniform"            # "uniform" in (0, 1], or "sampler": the init's own sampling times only


# the earlier names of the stage keys: configs, overrides and saved runs that use them still load
ALIASES = {"segments": "mlcd_segments", "teacher_steps": "mlcd_teacher_steps",
           "teacher_cfg": "mlcd_teacher_cfg", "target": "mlcd_target", "huber_c": "mlcd_huber_c",
           "threshold": "search_threshold", "candidates": "search_candidates",
           "calib_prompts": "search_prompts", "calib_seeds": "search_seeds", "sweep": "search_sweep",
           "plan": "kd_plan"}
# keys taken out, and why: a run saved with one resumes without it (it only said how a step ran)
RETIRED = {"fp8": "fp8 (float8 matmuls in training) was taken out on 2026-12-02: on one H200 it made a 29-frame "
                  "osp12 step 1.02x faster, within the step-to-step spread (BENCHMARKS.md); drop the key. Float8 "
                  "sampling stays: sample.py --precision fp8"}


def current_names(values: dict) -> dict:
    """A config's values under today's names: the stage keys' earlier names (ALIASES; a key given under both
    names is an error), a backend chosen through model_args (where it lived before 2026-12-01) moved up to
    attn_backend, and RETIRED keys left out."""
    both = [k for k in values if k in ALIASES and ALIASES[k] in values]
    if both:
        raise UserError(f"{both[0]} and {ALIASES[both[0]]} are one key (its earlier and its current name): "
                        "keep one")
    values = {ALIASES.get(k, k): v for k, v in values.items() if k not in RETIRED}
    model_args = values.get("model_args")
    if isinstance(model_args, dict) and "attn_backend" in model_args:
        model_args = dict(model_args)
        values = {"attn_backend": model_args.pop("attn_backend"), **values, "model_args": model_args}
    return values


def check_retired(values: dict):
    """A config that asks for a RETIRED key's feature is an error (one set to false or empty is left out)."""
    asked = [k for k in RETIRED if values.get(k)]
    if asked:
        raise UserError(RETIRED[asked[0]])


# ----------------------------------------------------------------------------------------------------------
# Config: YAML + key=value overrides through one validator

def _coerce(name, value, default):
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise UserError(f"{name} must be true or false, got {value!r}")
    elif isinstance(default, (int, float)) and not isinstance(default, bool):
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{name} must be a number, got {value!r}")
        if isinstance(default, int) and value != int(value):
            raise UserError(f"{name} must be an integer, got {value!r}")
        return type(default)(value)
    elif isinstance(default, str) and value is None:  # `key=` or `key:` with nothing after it
        return ""
    elif isinstance(default, str) and not isinstance(value, str):
        raise UserError(f"{name} must be a string, got {value!r}")
    elif isinstance(default, dict) and not isinstance(value, dict):
        raise UserError(f"{name} must be a mapping, got {value!r}")
    elif isinstance(default, list) and not isinstance(value, list):
        raise UserError(f"{name} must be a list, got {value!r}")
    elif isinstance(default, tuple):
        return tuple(value)
    return value


# every numeric key's range: (lowest, highest, whether each end is allowed); a list key: each item's
_POSITIVE, _NON_NEGATIVE = (0, math.inf, False, False), (0, math.inf, True, False)
_FRACTION, _BELOW_1, _AT_LEAST_1 = (0, 1, True, True), (0, 1, True, False), (1, math.inf, True, False)
RANGES = {
    "batch_size": _AT_LEAST_1, "micro_batch": _NON_NEGATIVE, "sp_size": _AT_LEAST_1, "steps": _NON_NEGATIVE,
    "lr": _POSITIVE, "warmup": _NON_NEGATIVE, "min_lr_frac": _FRACTION, "weight_decay": _NON_NEGATIVE,
    "betas": _BELOW_1, "grad_clip": _POSITIVE, "ema": _BELOW_1, "caption_dropout": _FRACTION,
    "t_shift": _POSITIVE, "seed": (0, 2**63 - 1, True, True), "log_every": _AT_LEAST_1,
    "ckpt_every": _AT_LEAST_1,
    "keep": _AT_LEAST_1, "max_minutes": _NON_NEGATIVE, "profile": _NON_NEGATIVE, "num_frames": _NON_NEGATIVE,
    "size": (4, math.inf, True, False), "synthetic_shape": _AT_LEAST_1, "sample_steps": _AT_LEAST_1,
    "sample_cfg": _NON_NEGATIVE, "sample_shift": _POSITIVE, "mlcd_segments": _AT_LEAST_1,
    "mlcd_teacher_steps": _AT_LEAST_1, "mlcd_teacher_cfg": _NON_NEGATIVE, "mlcd_huber_c": _POSITIVE,
    "search_threshold": _POSITIVE, "search_candidates": _AT_LEAST_1, "search_prompts": _AT_LEAST_1,
    "search_seeds": _AT_LEAST_1, "search_sweep": _POSITIVE, "kd_output_weight": _NON_NEGATIVE,
    "kd_attn_weight": _NON_NEGATIVE,
}


def check_ranges(cfg: TrainConfig):
    """Every numeric key within its range (RANGES), and finite: one line naming the key and the range."""
    for key, (lo, hi, lo_ok, hi_ok) in RANGES.items():
        value = getattr(cfg, key)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            kind = int if key in ("search_candidates", "synthetic_shape") else (int, float)
            inside = isinstance(v, kind) and not isinstance(v, bool) and math.isfinite(v) and \
                (lo < v or (lo_ok and v == lo)) and (v < hi or (hi_ok and v == hi))
            if not inside:
                top = "inf" if hi == math.inf else hi
                span = f"{'[' if lo_ok else '('}{lo}, {top}{']' if hi_ok else ')'}"
                each = " (each item)" if isinstance(value, (list, tuple)) else ""
                raise UserError(f"{key} must be in {span}{each}, got {value!r}")
    if len(cfg.synthetic_shape) != 4 or len(cfg.betas) != 2:
        raise UserError(f"synthetic_shape is [C, T, H, W] and betas a pair, got {cfg.synthetic_shape} and "
                        f"{cfg.betas}")


def make_config(values: dict) -> TrainConfig:
    """A TrainConfig from a dict of values (earlier key names read too), checked now, before any start-up:
    keys, types, ranges, the model preset and its overrides, the backend's name and what the stage needs."""
    check_retired(values)
    values = current_names(values)
    defaults = TrainConfig()
    valid = {f.name: getattr(defaults, f.name) for f in fields(TrainConfig)}
    unknown = set(values) - set(valid)
    if unknown:
        raise UserError(f"unknown config keys {sorted(unknown)}; valid keys: {sorted(valid)}")
    cfg = TrainConfig(**{k: _coerce(k, v, valid[k]) for k, v in values.items()})
    model_config(cfg.model, **cfg.model_args)
    if cfg.attn_backend:
        cfg.attn_backend = backend_name(cfg.attn_backend)
    if cfg.num_frames == 0 and cfg.data in DOMAINS:
        cfg.num_frames = DOMAINS[cfg.data].num_frames
    check_ranges(cfg)
    if cfg.stage not in STAGES:
        raise UserError(f"stage must be one of {sorted(STAGES)}, got {cfg.stage}")
    for group in STAGES[cfg.stage].needs:
        if not any(getattr(cfg, key) for key in group):
            raise UserError(f"stage {cfg.stage} ({STAGES[cfg.stage].kind}) needs {' or '.join(group)}: "
                            f"{NEEDED[group[0]]}")
    if cfg.checkpoint_policy not in CHECKPOINT_POLICIES:
        raise UserError(f"checkpoint_policy must be one of {', '.join(CHECKPOINT_POLICIES)}, got "
                        f"{cfg.checkpoint_policy!r}")
    if cfg.mlcd_target not in ("ema", "stopgrad") or cfg.mlcd_teacher_steps < cfg.mlcd_segments:
        raise UserError("mlcd_target must be 'ema' or 'stopgrad', and mlcd_teacher_steps >= mlcd_segments")
    if cfg.kd_times not in ("uniform", "sampler"):
        raise UserError(f"kd_times must be 'uniform' or 'sampler', got {cfg.kd_times!r}")
    return cfg


def load_config(path: str, overrides: list[str] = ()) -> TrainConfig:
    if not os.path.isfile(path):
        raise UserError(f"config file {path!r} not found (the stages' configs are in configs/)")
    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {path!r} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(values, dict):
        raise UserError(f"config file {path!r} must hold key: value lines, got a {type(values).__name__}")
    check_retired(values)
    values = current_names(values)
    for item in overrides:  # an override wins over the file, under either name of a key
        if "=" not in item:
            raise UserError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise UserError(f"override {item!r}: the value is not valid YAML") from None
        if key.startswith("model_args."):
            values.setdefault("model_args", {})[key.split(".", 1)[1]] = value
        else:
            values[ALIASES.get(key, key)] = value
    return make_config(values)


def check_inputs(cfg: TrainConfig):
    """Everything a run reads, checked before any model is built: checkpoints, plan, data folder, device, and
    that sp_size splits the model's heads."""
    metas = {}  # init's and teacher's metadata, read once
    for key in ("init", "teacher"):
        path = getattr(cfg, key)
        if path:
            try:
                metas[key] = read_metadata(path)
            except UserError as e:
                where = "" if os.path.isabs(path) else f" (relative to the current folder, {os.getcwd()})"
                raise UserError(f"{key}: {e}{where}") from None
    stage = STAGES[cfg.stage]
    if stage.teacher_shares and cfg.init and cfg.teacher:
        keys, why = stage.teacher_shares
        student, teacher = (config_dict(ModelConfig(**metas[key]["model_config"]))
                            for key in ("init", "teacher"))
        differ = [f"{k} {teacher[k]} vs {student[k]}" for k in keys if teacher[k] != student[k]]
        if differ:
            raise UserError(f"teacher: {cfg.teacher!r} is another model than init {cfg.init!r} "
                            f"({'; '.join(differ)}): {why}")
    if stage.teacher_shares and cfg.data in DOMAINS:  # a distilled model learns its teacher's domain
        trained = {checkpoint_domain(meta) for meta in metas.values()
                   if "vocabulary" in meta}  # trained on built-in data
        if trained - {cfg.data}:
            raise UserError(f"data: {cfg.data}, but init / teacher were trained on data: "
                            f"{sorted(trained - {cfg.data})[0]}: give the data they were trained on")
    pretrained = [getattr(cfg, key) for key, meta in metas.items() if "source" in meta]
    uses_null = cfg.caption_dropout > 0 or (stage.guided_teacher and cfg.mlcd_teacher_cfg != 1)
    null_file = os.path.join(cfg.data, NULL_FILE)
    if pretrained and uses_null and cfg.data not in DOMAINS and not os.path.isfile(null_file):
        raise UserError(f"{pretrained[0]!r} is a pretrained model: its empty caption is its text encoder's "
                        f"embedding, not a zero token, and caption dropout or guidance needs it as "
                        f"{null_file} (python wan.py embed --pipeline PIPELINE --prompt '' --out ...)")
    arch = metas["init"]["model_config"] if cfg.init else asdict(model_config(cfg.model, **cfg.model_args))
    heads = arch["heads"]
    if cfg.data in DOMAINS and arch.get("text_encoder") == "bytes" and \
            arch["text_len"] - 1 < (longest := len(DOMAINS[cfg.data].longest_caption)):
        raise UserError(f"data: {cfg.data}'s captions run to {longest} bytes, this model reads "
                        f"{arch['text_len'] - 1}: set model_args: {{text_len: {longest + 1}}} or more")
    parallel.check_heads(heads, cfg.sp_size)
    if stage.uses("kd_plan"):
        load_plan(cfg.kd_plan)
    if cfg.data not in (*DOMAINS, "synthetic"):
        if not os.path.isdir(cfg.data):
            raise UserError(f"data: {cfg.data!r} is not a folder; use {', '.join(map(repr, DOMAINS))}, "
                            "'synthetic' or a folder of safetensors shards")
        check_shard_headers(shard_paths(cfg.data))
    parallel.pick_device(cfg.device or None)


# ----------------------------------------------------------------------------------------------------------
# Data and objective

DATA, NOISE = 0, 1  # a sample's two random streams: what it shows, and its training time and noise


def sample_generator(cfg, step, index, device, stream):
    """The generator of one stream of one sample's random draws at one step. index is the sample's place in
    the step's global batch, so a step draws the same batch whatever the world size, sp_size or micro-
    batch."""
    key = hashlib.blake2b(f"{cfg.seed}/{step}/{index}/{stream}".encode(), digest_size=8).digest()
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(key, "little") % 2**63)
    return g


def get_batch(cfg, model, dataset, step, first, n, device):
    """-> x0 [n, C, T, H, W], text, text_mask on device: samples first .. first + n - 1 of the step's global
    batch (a video, its caption or text embedding, and whether caption dropout blanks it). A built-in domain draws
    each sample's parameters from the sample's own generator and renders the n videos in one call on the device
    (rendered one at a time on the CPU, 128 bouncing-shapes videos took 0.25 s on a 2-core machine, while an H200
    trained at 2 steps a second)."""
    generators = [sample_generator(cfg, step, index, "cpu", DATA) for index in range(first, first + n)]
    if dataset is None:
        domain = DOMAINS[cfg.data]
        drawn = [domain.params(1, g) for g in generators]
        params = {key: torch.cat([p[key] for p in drawn]) for key in drawn[0]}
        batch = {"video": domain.render(params, cfg.num_frames, cfg.size, device), "caption": domain.captions(params)}
    else:
        batch = collate([dataset[int(torch.randint(len(dataset), (1,), generator=g))] for g in generators])
    batch["drop"] = torch.stack([torch.rand(1, generator=g)[0] < cfg.caption_dropout for g in generators])
    text, mask = model.text_input(batch)
    null, null_mask = flow.null_text(model, n, text, getattr(dataset, "null_text", None))
    drop = batch["drop"]
    text = torch.where(drop.view(-1, *[1] * (text.dim() - 1)), null, text)
    mask = torch.where(drop[:, None], null_mask, mask)
    return batch["video"].to(device), text.to(device), mask.to(device)


def learning_rate(cfg, step):
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def draw_noise(cfg, times, x0, step, first):
    """The times t [B] (times: Parts.times, drawing on x0's device) and noise eps (shaped like x0) of samples
    first .. first + B - 1 of a step, drawn before the local batch is split into micro-batches."""
    ts, eps = [], []
    for j in range(x0.shape[0]):
        g = sample_generator(cfg, step, first + j, x0.device, NOISE)
        ts.append(times(g))
        eps.append(torch.randn(x0.shape[1:], generator=g, device=x0.device))
    return torch.cat(ts), torch.stack(eps)


# ----------------------------------------------------------------------------------------------------------
# The stages: what each one trains, and how

def load_teacher(cfg, dist, compile_: bool) -> DiT:
    """The frozen teacher of stages 1 and 3 (`teacher`, default `init`): bf16 on a GPU, kept whole on every
    rank, sequence-parallel like the student."""
    device = dist.device
    dtype = torch.bfloat16 if device.type == "cuda" else None
    teacher, _ = load_model(cfg.teacher or cfg.init, device, dtype)
    teacher.set_attn_backend(cfg.attn_backend or teacher.attn_backend)
    teacher.requires_grad_(False).enable_sequence_parallel(dist.sp_group)
    if compile_:
        teacher.compile_blocks()
    return teacher


def base_objective(cfg, parts, dist, compile_):
    """Stage 0, rectified flow: regress the velocity eps - x0 at time t of the straight path."""
    def loss(x0, text, mask, t, eps):
        return flow.flow_loss(lambda x_t, tt: parts.wrapped(x_t, tt, text, mask), x0, t, eps)
    return loss


def mlcd_objective(cfg, parts, dist, compile_):
    """Stage 1, MLCD (distill.py): the student's jump to its segment start matches the teacher's guided Euler
    step followed by the target network's jump (the EMA student, or the student itself: `target`). The
    teacher's unconditional input is the data's empty caption, encoded once per batch size."""
    teacher = load_teacher(cfg, dist, compile_)
    target = parts.ema if cfg.mlcd_target == "ema" else parts.model
    uncond = {}

    def loss(x0, text, mask, t, eps):
        n = x0.shape[0]
        with torch.no_grad():
            if n not in uncond:
                null = flow.null_text(parts.model, n, text, parts.null_text)
                uncond[n] = teacher.encode_text(*(x.to(dist.device) for x in null))
            cond = teacher.encode_text(text, mask)
        return distill.mlcd_loss(
            student_fn=lambda x, tt: parts.wrapped(x, tt, text, mask),
            teacher_fn=lambda x, tt: flow.cfg_velocity(teacher, x, tt, cond, uncond[n], cfg.mlcd_teacher_cfg),
            target_fn=lambda x, tt: target(x, tt, text, mask),
            x0=x0, eps=eps, t=t, num_segments=cfg.mlcd_segments, teacher_steps=cfg.mlcd_teacher_steps,
            huber_c=cfg.mlcd_huber_c)
    return loss


def kd_objective(cfg, parts, dist, compile_):
    """Stage 3, KD (distill.py): the sparse student matches the full-attention teacher's velocity and every
    layer's attention output on the same noisy input."""
    teacher = load_teacher(cfg, dist, compile_)
    teacher.set_mask_plan(FULL)
    student_attn = distill.AttentionRecorder(parts.model, detach=False)
    teacher_attn = distill.AttentionRecorder(teacher, detach=True)

    def loss(x0, text, mask, t, eps):
        x_t = flow.interpolate(x0, eps, t)
        with torch.no_grad(), teacher_attn:
            v_teacher = teacher(x_t, t, text, mask)
        with student_attn:
            v_student = parts.wrapped(x_t, t, text, mask)
        value = distill.kd_loss(v_student, v_teacher, student_attn.outputs, teacher_attn.outputs,
                                cfg.kd_output_weight, cfg.kd_attn_weight, teacher.sp_group)
        student_attn.outputs, teacher_attn.outputs = [], []  # the loss holds what its backward needs
        return value
    return loss


@dataclass(frozen=True)
class Stage:
    """One stage of the recipe as every part of train.py reads it: the checkpoint kind it writes, the keys it
    needs (of each tuple, one), the model keys its teacher must share with the student and why, whether its
    objective guides the teacher, how it draws a sample's training time, its objective and the sampler its
    checkpoints carry; or (stage 2) a search instead of training."""
    kind: str
    needs: tuple = ()
    teacher_shares: tuple = ()  # (model keys the teacher must share with the student, why)
    guided_teacher: bool = False
    times: Callable | None = None  # (cfg, the init checkpoint's metadata, device) -> draw(generator) -> t [1]
    objective: Callable | None = None  # (cfg, parts, dist, compile) -> loss(x0, text, mask, t, eps)
    sampler: Callable | None = None  # (cfg, the init checkpoint's metadata) -> flow.euler_sampler(...)
    search: Callable | None = None  # (cfg, device, is_main) -> records

    def uses(self, key: str) -> bool:
        return any(key in group for group in self.needs)


def segment_times(cfg, init, device):
    """Stage 1: a time uniform in (0, 1], every MLCD segment drawn equally often (distill.sample_times)."""
    return lambda g: distill.sample_times(1, g, device)


def kd_times(cfg, init, device):
    """Stage 3: as stage 1 (kd_times: uniform), or only the times the init's sampler queries, each equally often
    (kd_times: sampler; a 4-step student: 1, 0.75, 0.5, 0.25), where the student will be used."""
    if cfg.kd_times == "uniform":
        return segment_times(cfg, init, device)
    s = flow.sampler_settings(init)
    grid = flow.time_grid(s["steps"], device, s["shift"])[:-1]  # made once, not per sample
    return lambda g: grid[torch.randint(len(grid), (1,), generator=g, device=device)]


ARCH_KEYS = tuple(f.name for f in fields(ModelConfig))
INPUT_KEYS = ("in_channels", "patch_size", "text_encoder", "text_dim", "text_len")  # what a model reads
STAGES = {
    0: Stage("base", times=lambda cfg, init, device: lambda g: flow.sample_t(1, g, device, cfg.t_dist, cfg.t_shift),
             objective=base_objective,
             sampler=lambda cfg, init: flow.euler_sampler(cfg.sample_steps, cfg.sample_cfg,
                                                          cfg.sample_shift)),
    1: Stage("mlcd", needs=(("init", "teacher"),), guided_teacher=True,
             teacher_shares=(INPUT_KEYS, "stage 1's teacher must read the student's latents and text"),
             times=segment_times, objective=mlcd_objective,
             sampler=lambda cfg, init: flow.euler_sampler(cfg.mlcd_segments)),
    2: Stage("mask search", needs=(("init",),), search=distill.mask_search),
    3: Stage("sparse", needs=(("init", "teacher"), ("kd_plan",)),
             teacher_shares=(ARCH_KEYS, "stage 3 pairs their layers one to one"),
             times=kd_times, objective=kd_objective,
             sampler=lambda cfg, init: init["sampler"]),
}
NEEDED = {"init": "a trained model to distil", "teacher": "a trained model to distil",
          "kd_plan": "the plan.yaml written by stage 2"}


def checkpoint_meta(cfg, video_shape, init_meta):
    """What sample.py needs to know: the kind of model, how it samples, the latents' shape, a pretrained video
    model's frame rate and source (Wan: a model trained from it reads the same text encoder, so its empty caption
    is still that encoder's, which guidance and caption dropout need; check_inputs, sample.py) and the built-in
    data's vocabulary (to check prompts against)."""
    meta = {"kind": STAGES[cfg.stage].kind, "train_config": asdict(cfg), "video_shape": video_shape,
            "sampler": STAGES[cfg.stage].sampler(cfg, init_meta)}
    meta.update({key: init_meta[key] for key in ("fps", "source") if key in init_meta})
    if cfg.data in DOMAINS:
        meta.update(domain=cfg.data, vocabulary=DOMAINS[cfg.data].vocabulary)
    return meta


# ----------------------------------------------------------------------------------------------------------
# Set-up: the student, its EMA, compilation, sharding, the optimizer

@dataclass
class Parts:
    """What a training step works on."""
    model: DiT  # the student, its weights as saved (FSDP shards them in place)
    ema: DiT
    wrapped: torch.nn.Module  # the model as the objective calls it: in DDP (torchrun without fsdp), or as is
    opt: torch.optim.Optimizer
    dataset: object  # None: a built-in domain, rendered on the fly (get_batch)
    null_text: tuple | None  # the data's empty-caption embedding (data.py's null.safetensors)
    local_batch: int  # this data-parallel group's share of batch_size
    micro_batch: int
    autocast: object
    sharded: bool  # FSDP2
    times: Callable  # (generator on the run's device) -> t [1]: the stage's training times (Stage.times)
    objective: Callable | None = None


def build_student(cfg, dist) -> tuple[DiT, dict]:
    """The student: `init`'s weights (or a fresh cfg.model), stage 3's plan, the run's backend, on the device,
    activation checkpointing as asked, sequence-parallel. -> (model, init's metadata)"""
    init_meta = {}
    if cfg.init:
        model, init_meta = load_model(cfg.init)
    else:
        model = DiT(model_config(cfg.model, **cfg.model_args))
    if STAGES[cfg.stage].uses("kd_plan"):
        model.set_mask_plan(load_plan(cfg.kd_plan))
    model.set_attn_backend(cfg.attn_backend or model.attn_backend)
    model.to(dist.device).train()
    model.enable_sequence_parallel(dist.sp_group)
    model.set_checkpointing(cfg.checkpoint_policy if cfg.activation_checkpointing else None)
    return model, init_meta


def build_ema(model: DiT, dist) -> DiT:
    """The EMA of the student's weights (stage 1's target network, and what --export ships)."""
    ema = DiT(copy.deepcopy(model.cfg), model.mask_plan, model.attn_backend).to(dist.device)
    ema.eval().requires_grad_(False).load_state_dict(model.state_dict())
    ema.enable_sequence_parallel(dist.sp_group)
    return ema


def build_optimizer(cfg, model) -> torch.optim.Optimizer:
    """AdamW, weight decay on matrices only; fused on a GPU (FSDP2's shards too)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas,
                             fused=next(model.parameters()).is_cuda)


def set_up(cfg, dist, run) -> tuple[Parts, int, dict]:
    """Student, EMA, compiled blocks, FSDP2, optimizer, the resumed checkpoint, data, DDP (around the resumed
    model) and objective, in that order. FSDP2 (fsdp: true on several processes; in one, it changes only the
    checkpoint format) gathers weights in bf16, reduces gradients in fp32 and keeps the fp32 master weights
    sharded. -> (parts, the step to start from, the metadata every checkpoint carries)"""
    device = dist.device
    model, init_meta = build_student(cfg, dist)
    ema = build_ema(model, dist)
    compile_ = cfg.compile and device.type == "cuda"
    if compile_:
        model.compile_blocks()
        ema.compile_blocks()
    sharded = cfg.fsdp and dist.world > 1
    if sharded:
        bf16 = torch.bfloat16 if cfg.bf16 and device.type == "cuda" else None
        parallel.fully_shard_model(model, device, bf16)
        parallel.fully_shard_model(ema, device, bf16)
    opt = build_optimizer(cfg, model)
    start, resumed = run.resume(model, ema, opt)
    dataset = open_dataset(cfg.data, cfg.synthetic_shape, model.cfg)
    shape = [model.cfg.in_channels, cfg.num_frames, cfg.size, cfg.size] if dataset is None else \
        list(dataset[0]["video"].shape)
    wrapped = model
    if dist.world > 1 and not sharded:
        ids = [device] if device.type == "cuda" else None
        wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    local = cfg.batch_size // dist.dp_size
    micro = min(cfg.micro_batch or (local if device.type == "cuda" else CPU_MICRO_BATCH), local)
    parts = Parts(model=model, ema=ema, wrapped=wrapped, opt=opt, dataset=dataset,
                  null_text=getattr(dataset, "null_text", None), local_batch=local, micro_batch=micro,
                  autocast=torch.autocast("cuda", torch.bfloat16, enabled=cfg.bf16 and device.type == "cuda"),
                  sharded=sharded,
                  times=STAGES[cfg.stage].times(cfg, init_meta, device))
    parts.objective = STAGES[cfg.stage].objective(cfg, parts, dist, compile_)
    if dist.is_main:
        print(f"stage {cfg.stage}: {num_params(model) / 1e6:.2f}M parameters on {dist.world} x {device} "
              f"(sequence parallel {dist.sp_size} x data parallel {dist.dp_size}"
              f"{', FSDP' if sharded else ''}, "
              f"micro-batch {parts.micro_batch}), steps {start} -> {cfg.steps}"
              + (f" (resumed from {resumed})" if resumed else ""))
    return parts, start, checkpoint_meta(cfg, shape, init_meta)


# ----------------------------------------------------------------------------------------------------------
# The loop

def train(cfg: TrainConfig) -> list[dict]:
    """Runs (or resumes) the configured stage; returns the log records written by this call."""
    check_inputs(cfg)
    dist = parallel.setup(cfg.device or None, cfg.sp_size)
    if cfg.batch_size % dist.dp_size:
        raise UserError(f"batch_size={cfg.batch_size} does not split over {dist.dp_size} data-parallel "
                        f"groups "
                        f"({dist.world} processes / sp_size {dist.sp_size}): make it a multiple of "
                        f"{dist.dp_size}")
    torch.manual_seed(cfg.seed)
    with checkpoint.RunFolder(cfg, dist, RUN_KEYS, current_names) as run:
        stage = STAGES[cfg.stage]
        if stage.search:
            return run_search(cfg, dist, run, stage)
        parts, start, meta = set_up(cfg, dist, run)
        return train_loop(cfg, dist, run, parts, start, meta)


def run_search(cfg, dist, run, stage) -> list[dict]:
    """Stage 2: no training; the search measures and writes its plans (distill.py), its records to the log."""
    records = stage.search(cfg, dist.device, dist.is_main)
    if dist.is_main:
        with atomic_output(run.log_path) as tmp, open(tmp, "w") as f:
            f.writelines(json.dumps({k: v for k, v in r.items() if k != "rows"}) + "\n" for r in records)
    return records


def train_step(cfg, dist, parts: Parts, step: int):
    """One optimizer step: this group's slice of the step's global batch in micro-batches (gradients summed),
    the AdamW update with the gradient norm clipped over all shards, and the EMA (sharded like the model:
    each rank updates its own shard). The ranks of a sequence-parallel group draw the same samples, times
    and noise. -> (loss: a tensor, no host sync; gradient norm; learning rate)"""
    lr = learning_rate(cfg, step)
    for group in parts.opt.param_groups:
        group["lr"] = lr
    first = dist.dp_rank * parts.local_batch
    x0, text, mask = get_batch(cfg, parts.model, parts.dataset, step, first, parts.local_batch, dist.device)
    t, eps = draw_noise(cfg, parts.times, x0, step, first)
    parts.opt.zero_grad(set_to_none=True)
    loss, micro, n = 0.0, parts.micro_batch, parts.local_batch
    for i in range(0, n, micro):
        part = slice(i, i + micro)
        with parts.autocast, gradient_sync(parts.wrapped, last=i + micro >= n):
            share = len(t[part]) / n
            part_loss = parts.objective(x0[part], text[part], mask[part], t[part], eps[part]) * share
            parallel.backward(part_loss, dist.sp_size)
        loss = loss + part_loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(parts.model.parameters(), cfg.grad_clip)
    parts.opt.step()
    if parts.sharded:  # stage 1's target forward leaves the EMA's root weights gathered (FSDP keeps a root's)
        parts.ema.reshard()
    with torch.no_grad():
        torch._foreach_lerp_([parallel.local_tensor(p) for p in parts.ema.parameters()],
                             [parallel.local_tensor(p) for p in parts.model.parameters()], 1 - cfg.ema)
    return loss, grad_norm, lr


def train_loop(cfg, dist, run, parts: Parts, start: int, meta: dict) -> list[dict]:
    """Steps start .. cfg.steps: a log record every log_every steps (the only host sync), a checkpoint every
    ckpt_every and at the end; a stop signal or max_minutes ends it after a checkpoint. Every rank returns
    once rank 0's last checkpoint is on disk. -> the log records"""
    records, nonfinite = [], torch.zeros((), dtype=torch.bool, device=dist.device)
    pbar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not dist.is_main,
                dynamic_ncols=True)
    t_start = t_last = time.time()
    step_last = start
    prof = step_profiler(cfg, start, dist)
    # a profiler stops (and writes its trace) however the loop ends; a stop signal ends it after a checkpoint
    with prof or nullcontext(), run.preemptible():
        for step in pbar:
            loss, grad_norm, lr = train_step(cfg, dist, parts, step)
            nonfinite |= ~torch.isfinite(loss)
            done = step + 1
            if done == start + 1 and dist.device.type == "cpu":
                warn_if_slow(cfg, done, time.time() - t_start)
            # one CPU all-reduce a step (no GPU sync): every rank stops after the same step
            stop, out_of_time = run.should_stop(0 < cfg.max_minutes < (time.time() - t_start) / 60)
            last_step = done == cfg.steps or out_of_time or stop
            if done % cfg.log_every == 0 or done % cfg.ckpt_every == 0 or last_step:
                if parallel.any_rank(nonfinite.item(), dist.device):
                    last = checkpoint.checkpoints(cfg.run_dir)
                    raise FloatingPointError(
                        f"loss became {loss.item()} by step {done}; stopping. Last good checkpoint: "
                        f"{last[-1] if last else 'none'} (rerun to resume from it, e.g. with a lower lr)")
                now = time.time()
                rate = (done - step_last) / max(now - t_last, 1e-9)
                rec = log_record(cfg, dist, done, loss, grad_norm, lr, rate)
                t_last, step_last = now, done
                records.append(rec)
                if dist.is_main:
                    pbar.set_postfix(loss=f"{rec['loss']:.4f}", it_s=f"{rec['it_s']:.1f}")
                run.log(rec)
            if (done % cfg.ckpt_every == 0 or last_step) and cfg.save:
                run.save(done, parts.model, parts.ema, parts.opt, {**meta, "step": done})
                stop = stop or (not last_step and run.should_stop()[0])  # a signal during the save counts now
            if prof:
                prof.step()
            if out_of_time or stop:
                if dist.is_main:
                    why = f"max_minutes={cfg.max_minutes} reached" if out_of_time else \
                        f"{run.stop_signal or 'a stop signal'} received"
                    saved = " with a checkpoint" if cfg.save else ""
                    print(f"{why}: stopped after step {done}{saved}; rerun to resume")
                break
    pbar.close()
    parallel.barrier()
    return records


def log_record(cfg, dist, step, loss, grad_norm, lr, rate) -> dict:
    """One log line: the loss (mean over ranks), gradient norm, learning rate, speed, time and peak memory."""
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    rec = {"step": step, "loss": parallel.mean_over_ranks(loss).item(), "grad_norm": grad_norm.item(),
           "lr": lr, "it_s": rate, "videos_s": rate * cfg.batch_size, "time": time.time()}
    if dist.device.type == "cuda":
        rec["mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return rec


def warn_if_slow(cfg, done: int, seconds: float):
    """A GPU-sized config on a CPU: say what it will take."""
    hours = seconds * (cfg.steps - done) / 3600
    if hours > 1:
        warn(f"on this CPU one step takes {seconds:.0f} s: {cfg.steps - done} more steps will take about "
             f"{hours:.0f} h. The configs/smoke/ recipe is sized for a CPU")


def step_profiler(cfg, start, dist):
    """None, or (cfg.profile > 0 and steps left to run) a torch.profiler that records the run's last
    cfg.profile steps (each with its logging and any checkpoint it writes), after one warm-up step, and
    writes them to run_dir/trace-rank{R}.json; the loop runs inside it and calls .step() after each step."""
    active = min(cfg.profile, cfg.steps - start)
    if active <= 0:
        return None
    from torch.profiler import ProfilerActivity, profile, schedule
    skip = cfg.steps - start - active
    path = os.path.join(cfg.run_dir, f"trace-rank{dist.rank}.json")
    if os.path.exists(path):  # an older run's trace is not this one's
        os.remove(path)
    cuda = [ProfilerActivity.CUDA] if dist.device.type == "cuda" else []
    return profile(activities=[ProfilerActivity.CPU] + cuda,
                   schedule=schedule(wait=max(0, skip - 1), warmup=min(1, skip), active=active, repeat=1),
                   on_trace_ready=lambda p: p.export_chrome_trace(path))


def gradient_sync(wrapped, last: bool):
    """A context in which DDP's backward all-reduces the gradients only on the `last` micro-batch. FSDP
    reduce-scatters after every micro-batch (the shards accumulate), so no unsharded gradient outlives one."""
    if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) and not last:
        return wrapped.no_sync()
    return nullcontext()


USAGE = "usage: python train.py CONFIG.yaml [key=value ...] [--export OUT.safetensors | --export OUT_FOLDER]"


@entry_point
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        if argv and argv[0] in ("-h", "--help"):
            print(USAGE + "\n\n" + __doc__.strip().split("\n\n")[0])
            return
        raise UserError(f"no config file given ({USAGE})")
    out = None
    if "--export" in argv:
        i = argv.index("--export")
        if i + 1 >= len(argv):
            raise UserError("--export needs an output path")
        out = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    cfg = load_config(argv[0], argv[1:])
    if out:
        checkpoint.export(cfg.run_dir, out)
        return
    try:
        train(cfg)
    except FloatingPointError as e:
        raise UserError(str(e)) from None
    finally:
        parallel.cleanup()


if __name__ == "__main__":
    main()
