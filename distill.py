"""Distillation: stage 1 (MLCD), stage 2 (layer-wise mask search) and stage 3 (knowledge distillation).

    torchrun train.py configs/stage1.yaml        # train.py runs every stage; this file holds the math
    python train.py configs/stage2.yaml
    torchrun train.py configs/stage3.yaml

MLCD (Efficient-vDiT stage 1, after Heek et al. 2024, "Multistep Consistency Models", arXiv 2403.06807),
for a rectified-flow model (flow.py: x_t = (1 - t) x0 + t eps, dx/dt = v):

    Split [0, 1] into K equal segments with starts s_j = j / K. For data x0, noise eps and a time t inside
    segment j (s_j < t <= s_j+1), with x_t on the straight path:
      teacher:  x_t' = x_t + (t' - t) v_teacher^w(x_t, t),   t' = max(t - 1/N, s_j)
                one Euler step of the frozen base model with classifier-free guidance w, toward s_j
      jump:     f(x, t; v) = x + (s_j - t) v(x, t)          the segment's consistency function; f = x at t = s_j
      loss:     pseudo_huber( f(x_t, t; v_student),  stopgrad f(x_t', t'; v_target) ),
                pseudo_huber(a, b) = mean( sqrt((a - b)^2 + c^2) - c )
    The target network is an EMA of the student or the student itself under stop-gradient.
    Sampling takes one Euler jump per segment from t = 1 down to 0: K forward passes and no guidance, which
    is flow.euler_sample with K steps (sample.py reads K from the checkpoint).

Stage 2, mask search: on calibration inputs (prompts x seeds x the student's sampling times), every layer runs
full attention; for each candidate k the same layer's q, k, v also go through the k:(T-k) mask, and the error
is the relative L2 deviation ||O_k - O_full|| / ||O_full|| of the attention output (summed over the whole
calibration set before the ratio). Each layer gets the sparsest k whose error is <= r, else full attention.

Stage 3, knowledge distillation: the stage-1 model with full attention teaches the same weights under the
searched plan: loss = w_out * MSE(v_student, v_teacher) + w_attn * mean over layers of MSE(O_student, O_teacher),
O being each layer's attention output, on the same noisy input.
"""
import os
import time
from contextlib import contextmanager

import torch
from tqdm import tqdm

import flow
import parallel
from attention import FULL, density, entry_num_ref, frame_mask, mask_label, save_plan, tile_attention
from cli import UserError, atomic_output
from data import DOMAINS, checkpoint_domain, collate, open_dataset, to_image
from model import load_model

CALIBRATION_SEED = 10_000  # noise seeds of the stage-2 calibration samples: 10_000, 10_001, ...


def segment_start(t, num_segments: int):
    """s_j for each t in (0, 1]: the start (data side) of the segment holding t."""
    return torch.clamp(torch.ceil(t * num_segments) - 1, min=0) / num_segments


def sample_times(n, generator=None, device=None):
    """t uniform in (0, 1]: every segment is drawn equally often and t never sits on a segment start (t = 0)."""
    return 1 - torch.rand(n, generator=generator, device=device)


def jump(x, t, s, v):
    """Euler jump from time t to time s along velocity v (broadcast over a batch of times)."""
    return x + (s - t).view(-1, *([1] * (x.dim() - 1))) * v


def pseudo_huber(a, b, c: float = 1e-3):
    return (torch.sqrt((a.float() - b.float()).pow(2) + c * c) - c).mean()


def consistency_target(teacher_fn, target_fn, x_t, t, s, teacher_dt: float):
    """The teacher's solver step from t toward the segment start s, then the target network's jump to s."""
    t_prev = torch.maximum(t - teacher_dt, s)
    x_prev = jump(x_t, t, t_prev, teacher_fn(x_t, t))
    return jump(x_prev, t_prev, s, target_fn(x_prev, t_prev))


def mlcd_loss(student_fn, teacher_fn, target_fn, x0, eps, t, num_segments: int, teacher_steps: int,
              huber_c: float = 1e-3):
    """student_fn / teacher_fn / target_fn: (x, t) -> velocity. teacher_fn includes guidance; the teacher and
    target are evaluated without gradients."""
    s = segment_start(t, num_segments)
    x_t = flow.interpolate(x0, eps, t)
    with torch.no_grad():
        target = consistency_target(teacher_fn, target_fn, x_t, t, s, 1.0 / teacher_steps)
    return pseudo_huber(jump(x_t, t, s, student_fn(x_t, t)), target, huber_c)


# ----------------------------------------------------------------------------------------------------------
# Stage 2: layer-wise mask search

class AttentionProbe:
    """Observer of every layer (model.SelfAttention.observer) of a model running full attention: accumulates,
    per candidate k, the squared deviation of the sparse output from the layer's full output, and the
    attention mass per frame-to-frame tile. Attached only inside `with probe.attached(model):`."""

    def __init__(self, candidates, depth, num_frames):
        self.candidates = list(candidates)
        self.sq_err = torch.zeros(depth, len(self.candidates), dtype=torch.float64)
        self.sq_ref = torch.zeros(depth, dtype=torch.float64)
        self.tiles = torch.zeros(depth, num_frames, num_frames, dtype=torch.float64)
        self.count = torch.zeros(depth)

    def observer(self, layer):
        def observe(q, k, v, out, num_frames):
            full = out  # the layer's own output, under full attention
            self.sq_ref[layer] += full.double().pow(2).sum().cpu()
            for j, num_ref in enumerate(self.candidates):
                self.sq_err[layer, j] += (tile_attention(q, k, v, num_frames, num_ref) - full).double().pow(2).sum().cpu()
            self.tiles[layer] += tile_mass(q, k, num_frames).double().cpu()
            self.count[layer] += 1
        return observe

    @contextmanager
    def attached(self, model):
        model.set_observers([self.observer(i) for i in range(len(model.blocks))])
        try:
            yield self
        finally:
            model.set_observers(None)

    def errors(self):
        return (self.sq_err / self.sq_ref[:, None]).sqrt()  # [depth, candidates] relative L2


def tile_mass(q, k, num_frames):
    """Mean attention probability from frame fq's queries to frame fk's keys: [T, T], rows sum to 1. Computed one
    (query frame, key frame) pair at a time from log-sum-exps, so memory is [B, H, S, S], never N x N."""
    B, H, N, D = q.shape
    T, S = num_frames, N // num_frames
    qf, kf = (x.float().unflatten(2, (T, S)) for x in (q, k))  # [B, H, T, S, D]
    out = torch.zeros(T, T, device=q.device)
    for fq in range(T):
        # lse[fk]: [B, H, S] log-sum-exp of frame fq's queries over frame fk's keys
        lse = torch.stack([torch.logsumexp(qf[:, :, fq] @ kf[:, :, fk].transpose(-1, -2) / D**0.5, dim=-1)
                           for fk in range(T)])  # [T, B, H, S]
        out[fq] = torch.softmax(lse, dim=0).mean((1, 2, 3))  # each key frame's share of every query's softmax
    return out


def choose_plan(errors, candidates, threshold: float):
    """Per layer, the sparsest candidate k (fewest reference frames) with error <= threshold, else full."""
    plan = []
    for layer_err in errors.tolist():
        ok = [num_ref for num_ref, e in zip(candidates, layer_err) if e <= threshold]
        plan.append(min(ok) if ok else FULL)
    return plan


def plan_report(plan, errors, candidates, num_frames):
    """Rows for the plan file and the printed table: layer, mask, measured error, density."""
    rows = []
    for layer, entry in enumerate(plan):
        k = entry_num_ref(entry, num_frames)
        err = 0.0 if entry == FULL else errors[layer, candidates.index(k)].item()
        rows.append({"layer": layer, "mask": mask_label(entry, num_frames), "k": entry,
                     "error": round(err, 5), "density": round(density(num_frames, k), 4)})
    return rows


def write_plan(path, rows, threshold, num_frames):
    """A stage-2 plan file (attention.save_plan) with its threshold and per-layer errors. -> mean sparsity."""
    return save_plan(path, [r["k"] for r in rows], num_frames, layers=rows, header={
        "threshold": threshold, "metric": "relative L2 of the attention output vs full attention"})


def calibration_embeddings(cfg, model):
    """The calibration conditions of a model that reads precomputed text embeddings: those of the first
    cfg.search_prompts items of cfg.data (a shard folder, or `synthetic`). -> ((text_emb, text_mask), the data's
    empty-caption embedding or None)"""
    if cfg.data in DOMAINS:
        raise UserError("this model reads precomputed text embeddings: give stage 2 `data:` a folder of shards "
                        "with text_emb (or `synthetic` to measure speed) to calibrate on")
    dataset = open_dataset(cfg.data, cfg.synthetic_shape, model.cfg)
    batch = collate([dataset[i % len(dataset)] for i in range(cfg.search_prompts)])
    return (batch["text_emb"].float(), batch["text_mask"].bool()), dataset.null_text


def mask_search(cfg, device, is_main: bool = True) -> list[dict]:
    """Stage 2: measure every layer's error under every candidate mask along the `cfg.init` model's own
    sampling trajectories (cfg.search_prompts prompts x cfg.search_seeds seeds), pick the plan for threshold
    cfg.search_threshold (and for each r of cfg.search_sweep), write plan.yaml, plan-r{r}.yaml, search.pt and the PNGs to
    cfg.run_dir (rank 0), print the table. -> one record per threshold: r, plan, mean sparsity, file."""
    model, meta = load_model(cfg.init, device)
    model.set_mask_plan([FULL])  # errors are measured against full attention
    T = meta["video_shape"][1] // model.cfg.patch_size[0]
    candidates = sorted(cfg.search_candidates) or list(range(1, T))
    probe = AttentionProbe(candidates, model.cfg.depth, T)
    prompts, null = (DOMAINS[checkpoint_domain(meta)].prompts(cfg.search_prompts, seed=cfg.seed + 1), None) \
        if model.cfg.reads_captions else calibration_embeddings(cfg, model)  # (evaluation's prompts: seed 0)
    sampler = flow.sampler_settings(meta)
    start = time.time()
    with probe.attached(model):
        for seed in tqdm(range(cfg.search_seeds), desc="calibration", disable=not is_main):
            flow.generate(model, prompts, meta["video_shape"], sampler, seed=CALIBRATION_SEED + seed, null=null)
    errors = probe.errors()
    cost = {"seconds": round(time.time() - start, 2)}  # the calibration's time (and peak memory on a GPU)
    if device.type == "cuda":
        cost["mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    records = []
    for r in [cfg.search_threshold] + list(cfg.search_sweep):  # the paper's r sweep reuses the same measurements
        plan = choose_plan(errors, candidates, r)
        name = "plan.yaml" if not records else f"plan-r{r}.yaml"
        records.append({"threshold": r, "plan": plan, "mean_sparsity": None, "file": os.path.join(cfg.run_dir, name),
                        "rows": plan_report(plan, errors, candidates, T), **cost})
    if not is_main:  # under torchrun every rank searches alike; one writes
        return records
    os.makedirs(cfg.run_dir, exist_ok=True)
    for rec in records:
        rec["mean_sparsity"] = round(write_plan(rec["file"], rec["rows"], rec["threshold"], T), 4)
    with atomic_output(os.path.join(cfg.run_dir, "search.pt")) as tmp:
        torch.save({"errors": errors, "candidates": candidates, "tiles": probe.tiles / probe.count[:, None, None]}, tmp)
    layers = sorted({0, model.cfg.depth // 2, model.cfg.depth - 1})
    save_tile_maps_png(os.path.join(cfg.run_dir, "tile_maps.png"), probe.tiles, layers, records[0]["plan"])
    save_plan_png(os.path.join(cfg.run_dir, "plan.png"), records[0]["rows"], T)
    print(f"{'layer':>5} {'mask':>6} {'error':>8} {'density':>8}   errors for k = {candidates}")
    for row, e in zip(records[0]["rows"], errors.tolist(), strict=True):
        print(f"{row['layer']:>5} {row['mask']:>6} {row['error']:>8.4f} {row['density']:>8.3f}   "
              + " ".join(f"{x:.3f}" for x in e))
    first, *sweep = records
    print(f"r = {first['threshold']}: mean attention sparsity {100 * first['mean_sparsity']:.1f}%; wrote {first['file']}")
    for rec in sweep:
        print(f"  r = {rec['threshold']:<5}: mean sparsity {100 * rec['mean_sparsity']:5.1f}%  plan {rec['plan']}  "
              f"-> {os.path.basename(rec['file'])}")
    return records


def _enlarge(x, scale: int):
    """[h, w, ...] -> [h * scale, w * scale, ...], nearest neighbour."""
    return x.repeat_interleave(scale, 0).repeat_interleave(scale, 1)


def _heat(x):
    """[h, w] in [0, 1] -> uint8 RGB [h, w, 3], black -> red -> yellow -> white."""
    x = x.clamp(0, 1)
    return (torch.stack([x * 3, x * 3 - 1, x * 3 - 2], -1).clamp(0, 1) * 255).to(torch.uint8)


def save_tile_maps_png(path, tiles, layers, plan, scale=12):
    """The paper's Figure 1 for a few layers: attention mass per frame tile (log scale), with the chosen
    mask's kept tiles outlined below each map."""
    from PIL import Image, ImageDraw
    T = tiles.shape[-1]
    side, pad = T * scale, 20
    img = Image.new("RGB", (len(layers) * (side + pad) + pad, 2 * side + 3 * pad), "black")
    draw = ImageDraw.Draw(img)
    for i, layer in enumerate(layers):
        m = tiles[layer].float().clamp_min(1e-4).log10()
        m = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-6)
        heat = _enlarge(_heat(m), scale)
        x0 = pad + i * (side + pad)
        img.paste(to_image(heat), (x0, pad))
        kept = _enlarge(frame_mask(T, entry_num_ref(plan[layer], T)).float(), scale)
        img.paste(to_image(kept * 255).convert("RGB"), (x0, side + 2 * pad))
        draw.text((x0, 4), f"layer {layer}", fill="white")
        draw.text((x0, side + pad + 4), mask_label(plan[layer], T), fill="white")
    with atomic_output(path) as tmp:
        img.save(tmp)


def save_plan_png(path, rows, num_frames, scale=6):
    """Every layer's chosen mask side by side (white: computed tile), with its error."""
    from PIL import Image, ImageDraw
    side, pad = num_frames * scale, 8
    img = Image.new("RGB", (len(rows) * (side + pad) + pad, side + 3 * pad + 12), "black")
    draw = ImageDraw.Draw(img)
    for i, r in enumerate(rows):
        kept = frame_mask(num_frames, entry_num_ref(r["k"], num_frames)).to(torch.uint8) * 255
        tile = _enlarge(kept, scale)
        x0 = pad + i * (side + pad)
        img.paste(to_image(tile).convert("RGB"), (x0, 2 * pad + 12))
        draw.text((x0, 2), f"L{r['layer']} {r['mask']}", fill="white")
    with atomic_output(path) as tmp:
        img.save(tmp)


# ----------------------------------------------------------------------------------------------------------
# Stage 3: knowledge distillation into the sparse model

class AttentionRecorder:
    """Every layer's attention output of the forwards run inside `with recorder:` (in layer order), as the blocks
    return them to DiT.forward (outside the compiled blocks); outside it the model records nothing."""

    def __init__(self, model, detach: bool):
        self.model, self.detach, self.outputs = model, detach, []

    def __call__(self, out):
        self.outputs.append(out.detach() if self.detach else out)

    def __enter__(self):
        self.outputs = []
        self.model.recorder = self
        return self

    def __exit__(self, *exc):
        self.model.recorder = None


class _MeanSquaredError(torch.autograd.Function):
    """mean((a - b)^2) in fp32 that keeps only a and b for its backward. Written with autograd ops, the square
    would keep each layer's fp32 difference until the backward: at osp12, 29 frames, 7.9 GiB over 32 layers (the
    recorded outputs a and b are bf16 and held anyway)."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return (a.float() - b.float()).pow(2).mean()

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        return ((a.float() - b.float()) * (2 * grad / a.numel())).to(a.dtype), None


def mean_squared_error(a, b):
    """mean((a - b)^2) in fp32, gradient to a only (b is the teacher's, detached)."""
    return _MeanSquaredError.apply(a, b.detach())


def kd_loss(v_student, v_teacher, attn_student, attn_teacher, w_out: float, w_attn: float, sp_group=None):
    """Output MSE plus the mean over layers of the attention-output MSE. Under sequence parallelism each rank
    records its own heads (a 1/P share of each layer's mean): it backpropagates that share and logs the total."""
    loss = w_out * mean_squared_error(v_student, v_teacher)
    if w_attn:
        if not attn_student or len(attn_student) != len(attn_teacher):
            raise ValueError(f"layer-wise KD pairs layers one to one: the student recorded {len(attn_student)} "
                             f"attention outputs, the teacher {len(attn_teacher)}")
        layer = torch.stack([mean_squared_error(a, b) for a, b in zip(attn_student, attn_teacher, strict=True)]).mean()
        loss = loss + w_attn * parallel.mean_over_heads(layer, sp_group)
    return loss
