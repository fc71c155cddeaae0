"""Prompt-following scores for the built-in domains, judged from pixels only (no model, no learned metric), and
fidelity (PSNR, SSIM) against a reference model sampled on the same noise.

Run:  python evaluate.py --dataset [--data bounce] [--n 64] [--seed 0]   # scores ground-truth videos (1.000)
From code: evaluate_model(sample_fn, prompts, batch_size), sample_fn(list[str]) -> [n, 3, T, H, W] in [-1, 1].

Moving shapes (score), per frame: object = largest 8-connected blob of bright pixels (max channel > 0 on the
  [-1, 1] scale); colour = nearest of the 7 COLOURS to its mean RGB; shape: triangle if the centroid sits low in
  the bbox (upward triangle ~0.65 of the height vs 0.5), else square if fill ratio area / bbox area > 0.9 and
  >= 3 bbox corners are lit (rasterised circles: fill 0.6-0.94, no lit corner), else circle; colour and shape are
  majority votes over non-empty frames. Direction = dominant axis and sign of the centroid shift from the first
  to the last non-empty frame (y grows downwards, so "up" is y decreasing), None if that shift is under MIN_SHIFT
  of the frame side. area_spread = std / mean of blob area over frames.
Bouncing shapes (score_bounce): each captioned object found by its colour; shape, initial direction and its
  bouncing path judged on the frames where it is seen whole (judge_bounce).
Run:  python evaluate.py --checkpoint checkpoints/base.safetensors [--steps 50 4] [--cfg 5] [--shift 1 3]
                          [--plan P.yaml] [--reference R.safetensors] [--json out.json]
  scores a model (optionally under a stage-2 mask plan) on its domain's fixed validation prompts: one row per
  (steps, cfg, shift) setting, with the mean attention sparsity it runs at, forward passes and seconds per video
  on the device used; with --reference, PSNR and SSIM of its videos against the reference's on the same
  prompts, seeds and noise.
Leaves out: FVD / CLIP-style metrics, motion smoothness beyond area_spread.
"""
import itertools
import json
import math
import os
import re
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from cli import (PRECISIONS, ArgumentParser, UserError, WriteError, check_output_path, entry_point,
                 non_negative_float, positive_int, seed_int)
from data import (COLOURS, CURTAIN, DIRECTIONS, DOMAINS, SHAPES, VAL_SEED_OFFSET, bounce_path, checkpoint_domain,
                  colour_table)

ATTRS = ("colour", "shape", "direction")
MIN_SHIFT = 0.125  # smallest centroid shift (fraction of the frame side) that counts as a direction
SQUARE_FILL = 0.9  # a square fills its bbox (~1) and has >= 3 of its 4 bbox corners lit; circles have none
TRIANGLE_CENTROID = 0.59  # relative centroid height in the bbox above which a blob is a triangle
SEED_STRIDE = 7919  # noise seed of batch i (from 1; 0 is the warm-up's) under --seed s: s * SEED_STRIDE + i
                    # (a prime, so runs never share one)


def largest_blob(mask):
    """[N, H, W] bool -> [N, H, W] bool keeping only the largest 8-connected component of each image."""
    n, h, w = mask.shape
    ids = torch.arange(1, n * h * w + 1, dtype=torch.float64).view(n, 1, h, w)
    labels = torch.where(mask[:, None], ids, 0.0)  # every pixel starts as its own component
    active = torch.arange(n)  # the images whose labels still change
    for _ in range(h * w):  # spread the max label within each component until nothing changes
        now = labels[active]
        grown = torch.where(mask[active, None], F.max_pool2d(now, 3, stride=1, padding=1), 0.0)
        changed = (grown != now).flatten(1).any(1)
        labels[active] = grown
        active = active[changed]
        if not len(active):
            break
    labels = labels.view(n, h * w).long()  # component id per pixel, 0 = background
    sizes = torch.bincount(labels.flatten(), minlength=n * h * w + 1)
    sizes[0] = 0
    best = labels.gather(1, sizes[labels].argmax(1, keepdim=True))  # [N, 1] id of the largest blob
    return ((labels == best) & (best > 0)).view(n, h, w)


def _majority(idx, names):
    return names[torch.bincount(idx).argmax().item()] if len(idx) else None


def _bbox(rows_or_cols):
    """[T, L] bool occupancy -> first and last occupied index per frame, each [T]."""
    length = rows_or_cols.shape[1]
    first = rows_or_cols.int().argmax(1)
    last = length - 1 - rows_or_cols.flip(1).int().argmax(1)
    return first, last


def judge(video, obj=None):
    """video [3, T, H, W] in [-1, 1] -> dict(colour, shape, direction: str | None, area_spread: float). obj: the
    object's pixels per frame [T, H, W], where the caller has found them (default: the largest bright blob)."""
    v = video.detach().float().cpu()
    _, t, h, w = v.shape
    obj = largest_blob(v.amax(0) > 0) if obj is None else obj  # [T, H, W]
    area = obj.flatten(1).sum(1).float()  # [T]
    valid = area > 0
    if not valid.any():
        return dict(colour=None, shape=None, direction=None, area_spread=1.0)
    safe = area.clamp(min=1)
    mean_rgb = (v * obj).sum((2, 3)).T / safe[:, None]  # [T, 3]
    colour_idx = torch.cdist(mean_rgb, colour_table()).argmin(1)  # [T]
    ys = torch.arange(h, dtype=torch.float32)[:, None]
    xs = torch.arange(w, dtype=torch.float32)[None, :]
    cy = (obj * ys).sum((1, 2)) / safe  # [T] centroid row
    cx = (obj * xs).sum((1, 2)) / safe  # [T] centroid column
    top, bottom = _bbox(obj.any(2))
    left, right = _bbox(obj.any(1))
    height, width = (bottom - top + 1).float(), (right - left + 1).float()
    fill = area / (height * width)
    i = torch.arange(t)
    corners = sum(obj[i, r, c].int() for r in (top, bottom) for c in (left, right))  # [T] lit bbox corners
    rel_cy = (cy - top + 0.5) / height  # 0.5 for symmetric shapes, ~0.65 for an upward triangle
    square = (fill > SQUARE_FILL) & (corners >= 3)
    shape_idx = torch.where(rel_cy > TRIANGLE_CENTROID, SHAPES.index("triangle"),
                            torch.where(square, SHAPES.index("square"), SHAPES.index("circle")))
    frames = valid.nonzero()[:, 0]
    first, last = frames[0], frames[-1]
    dx, dy = (cx[last] - cx[first]).item(), (cy[last] - cy[first]).item()
    if max(abs(dx) / w, abs(dy) / h) < MIN_SHIFT:
        direction = None
    elif abs(dx) / w >= abs(dy) / h:
        direction = "right" if dx > 0 else "left"
    else:
        direction = "down" if dy > 0 else "up"
    return dict(colour=_majority(colour_idx[valid], list(COLOURS)), shape=_majority(shape_idx[valid], SHAPES),
                direction=direction, area_spread=(area.std(unbiased=False) / area.mean()).item())


def parse_caption(text):
    """'a red square moving left' -> dict(colour='red', shape='square', direction='left'); None where absent."""
    words = re.findall(r"[a-z]+", text.lower())
    pick = lambda names: next((word for word in words if word in names), None)
    return dict(colour=pick(COLOURS), shape=pick(SHAPES), direction=pick(DIRECTIONS))


def score(videos, prompts):
    """videos [n, 3, T, H, W] (or a list of [3, T, H, W]) vs prompts -> accuracies, overall, area_spread, n."""
    if len(videos) != len(prompts):
        raise ValueError(f"{len(videos)} videos but {len(prompts)} prompts")
    hits = {k: 0 for k in ATTRS + ("overall",)}
    spread = 0.0
    for video, prompt in zip(videos, prompts):
        got, want = judge(video), parse_caption(prompt)
        ok = [got[k] is not None and got[k] == want[k] for k in ATTRS]
        for k, good in zip(ATTRS + ("overall",), ok + [all(ok)]):
            hits[k] += good
        spread += got["area_spread"]
    n = len(prompts)
    result = {k: hits[k] / max(n, 1) for k in hits}
    result.update(area_spread=spread / max(n, 1), n=n)
    return result


# ----------------------------------------------------------------------------------------------------------
# The bouncing-shapes judge: two objects, each found by its captioned colour

BOUNCE_ATTRS = ("colour", "shape", "direction", "bounce")
MIN_AREA = 6  # pixels: smaller blobs of a colour are noise, not an object
WHOLE = 0.7  # an object is seen whole where its area is this share of its largest (small shapes' areas vary)
MIN_CLEAN = 4  # frames in which an object must be seen whole for its shape and path to be judged
BOUNCE_TOLERANCE = 0.03  # mean distance (fraction of the side) from the best bouncing path that still passes
SIGN_SLACK = 0.005  # the captioned way fits no worse than the other way, up to this (clean frames may fit both)
PRESENT = 0.6  # an object is there if seen in this share of the frames (ground truth: >= 0.75, behind the curtain)
_SPEEDS = torch.arange(0.02, 0.0601, 0.0005)  # speeds (side per frame) the judge's path fit tries
JUDGE_BATCH = 64  # videos whose objects score_bounce finds in one pass (~0.2 GB of temporaries at 32 x 32 x 32)


def parse_bounce_caption(text):
    """'a red circle moving left and a blue square moving up' -> two dicts as parse_caption's (None where
    absent)."""
    halves = re.split(r"\band\b", text.lower(), maxsplit=1) + [""]
    return [parse_caption(half) for half in halves[:2]]


def _object_frames(videos, colours):
    """The largest blob of one colour per frame of each video: bright pixels (max channel > 0) nearest that
    video's colour (a name, or None: no pixels). videos [n, 3, T, H, W], n colours -> [n, T, H, W] bool."""
    v = videos.float()
    bright = v.amax(1) > 0  # [n, T, H, W]
    pixels = v.permute(0, 2, 3, 4, 1).reshape(len(v), -1, 3)
    nearest = torch.cdist(pixels, colour_table().expand(len(v), -1, -1)).argmin(-1)
    want = torch.tensor([list(COLOURS).index(c) if c else -1 for c in colours]).view(-1, 1, 1, 1)
    return largest_blob((bright & (nearest.view(bright.shape) == want)).flatten(0, 1)).view(bright.shape)


def _best_path_error(coord, frames, size, sign):
    """The smallest mean distance of measured positions coord [F] at frames [F] from a bouncing path of the given
    sign (+1, -1) inside [0, 1 - size], over every start in [0, 1 - size] and every speed in _SPEEDS."""
    span = torch.tensor(max(1 - size, 1e-3))
    starts = torch.linspace(0, 1, 129) * span
    s, v = torch.meshgrid(starts, sign * _SPEEDS, indexing="ij")
    paths = bounce_path(s, v, span.expand_as(s), frames.float())  # [starts, speeds, F]
    return (paths - coord).abs().mean(-1).min().item()


def judge_bounce(video, prompt, objects=None):
    """video [3, T, H, W] in [-1, 1] and its caption -> per object (in caption order) dict(colour, shape,
    direction, bounce: bool). colour: an object of the captioned colour is seen (>= MIN_AREA pixels) in PRESENT of
    the frames or more; the rest is judged on its clean frames (seen whole: clear of the curtain, at least WHOLE
    of its largest area there): shape by the single-object judge's majority vote; bounce: its bbox corner along the
    captioned axis stays within BOUNCE_TOLERANCE (mean) of a path that starts the captioned way and bounces
    between the walls at a constant speed, no worse (SIGN_SLACK) than any path starting the other way, and its
    other coordinate within BOUNCE_TOLERANCE of constant; direction: it moves along the captioned axis, and the
    paths starting the captioned way fit it no worse (SIGN_SLACK) than those starting the other way. objects:
    each captioned object's pixels per frame [T, H, W] (_object_frames), where the caller has found them."""
    _, T, H, W = video.shape
    wants = parse_bounce_caption(prompt)
    if objects is None:
        objects = _object_frames(video[None].expand(len(wants), -1, -1, -1, -1), [w["colour"] for w in wants])
    results = []
    for want, obj in zip(wants, objects, strict=True):
        got = dict.fromkeys(BOUNCE_ATTRS, False)
        results.append(got)
        if want["colour"] is None:
            continue
        area = obj.flatten(1).sum(1)
        seen = area >= MIN_AREA
        got["colour"] = bool(seen.float().mean() >= PRESENT)
        if not got["colour"]:
            continue
        top, bottom = _bbox(obj.any(2))
        left, right = _bbox(obj.any(1))
        c0, c1 = int(CURTAIN[0] * W), int(math.ceil(CURTAIN[1] * W))  # curtain columns [c0, c1)
        clear = (right < c0 - 1) | (left > c1)
        largest = area[seen & clear].max() if (seen & clear).any() else 0
        clean = seen & clear & (area >= WHOLE * largest)
        if clean.sum() < MIN_CLEAN:
            continue
        whole = obj & clean[:, None, None]  # this object on its clean frames: one blob a frame, so its own largest
        got["shape"] = judge(torch.where(whole[None], video, -1.0), whole)["shape"] == want["shape"]
        frames = clean.nonzero()[:, 0]
        horizontal = want["direction"] in ("left", "right")
        along = (left if horizontal else top)[frames].float() / (W if horizontal else H)
        across = (top if horizontal else left)[frames].float() / (H if horizontal else W)
        size = ((right - left) if horizontal else (bottom - top))[frames].float().median().item() + 1
        size /= W if horizontal else H
        sign = 1.0 if want["direction"] in ("right", "down") else -1.0
        fit, flipped = (_best_path_error(along, frames, size, s) for s in (sign, -sign))
        still = (across - across.median()).abs().mean().item() < BOUNCE_TOLERANCE
        right_way = fit <= flipped + SIGN_SLACK
        got["bounce"] = fit < BOUNCE_TOLERANCE and still and right_way
        moved_along = along.max() - along.min() > across.max() - across.min()
        got["direction"] = bool(moved_along) and right_way
    return results


def score_bounce(videos, prompts):
    """videos [n, 3, T, H, W] vs two-object prompts -> per-attribute accuracy over the 2n objects, overall (every
    attribute of both objects right) over the n videos, n."""
    if len(videos) != len(prompts):
        raise ValueError(f"{len(videos)} videos but {len(prompts)} prompts")
    hits = dict.fromkeys(BOUNCE_ATTRS, 0)
    overall = 0
    wants = [parse_bounce_caption(p) for p in prompts]
    objects = [None] * len(prompts)
    for i in range(0, len(prompts), JUDGE_BATCH):  # every object of a batch of videos found at once
        chunk = torch.stack(list(videos[i:i + JUDGE_BATCH]))
        found = [_object_frames(chunk, [w[j]["colour"] for w in wants[i:i + JUDGE_BATCH]]) for j in (0, 1)]
        objects[i:i + JUDGE_BATCH] = zip(*found)
    for video, prompt, objs in zip(videos, prompts, objects, strict=True):
        judged = judge_bounce(video, prompt, objs)
        for got in judged:
            for k in BOUNCE_ATTRS:
                hits[k] += got[k]
        overall += all(all(got.values()) for got in judged)
    n = len(prompts)
    return {**{k: hits[k] / max(2 * n, 1) for k in BOUNCE_ATTRS}, "overall": overall / max(n, 1), "n": n}


SCORES = {"shapes": score, "bounce": score_bounce}  # each built-in domain's judge (data.DOMAINS)


# ----------------------------------------------------------------------------------------------------------
# Fidelity: a model's videos against a reference model's on the same prompts, seeds and noise

SSIM_WINDOW, SSIM_SIGMA = 11, 1.5  # Wang et al. (2004): an 11 x 11 Gaussian window, sigma 1.5, valid positions
SSIM_C1, SSIM_C2 = 0.01 ** 2, 0.03 ** 2  # on pixels in [0, 1]


def _unit(videos):
    """Pixels as the metrics read them: clamped to [-1, 1] (a sampler's output is not), then mapped to [0, 1]."""
    return (videos.float().clamp(-1, 1) + 1) / 2


def mse(videos, references):
    """Mean squared error of each video against its reference on [0, 1] pixels: [n, 3, T, H, W] twice -> [n]."""
    return (_unit(videos) - _unit(references)).pow(2).flatten(1).mean(1)


def psnr(videos, references):
    """Peak signal-to-noise ratio in dB of each video against its reference, pixels [-1, 1] read as [0, 1]:
    10 log10(1 / MSE). [n, 3, T, H, W] twice -> [n] (inf where a video equals its reference)."""
    return 10 * torch.log10(1 / mse(videos, references))


def ssim(videos, references):
    """Structural similarity of each video to its reference (Wang et al. 2004): local means, variances and
    covariance under an 11 x 11 Gaussian window (sigma 1.5) at every valid position of every frame and channel,
    pixels [-1, 1] read as [0, 1], averaged over them. [n, 3, T, H, W] twice -> [n]."""
    n, c, t, h, w = videos.shape
    if min(h, w) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs frames of at least {SSIM_WINDOW} x {SSIM_WINDOW} pixels, got {h} x {w}")
    x, y = (_unit(v).transpose(1, 2).reshape(n * t * c, 1, h, w) for v in (videos, references))
    g = torch.exp(-(torch.arange(SSIM_WINDOW) - SSIM_WINDOW // 2).float().pow(2) / (2 * SSIM_SIGMA ** 2))
    window = (g[:, None] * g[None, :] / g.sum() ** 2)[None, None].to(x.device)
    blur = lambda z: F.conv2d(z, window)  # noqa: E731
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    local = ((2 * mx * my + SSIM_C1) * (2 * cxy + SSIM_C2)) / ((mx ** 2 + my ** 2 + SSIM_C1) * (vx + vy + SSIM_C2))
    return local.view(n, -1).mean(1)


def fidelity(videos, references) -> dict:
    """PSNR (dB) and SSIM of videos against their references: overall (PSNR of every pixel at once, 10 log10(1 /
    the mean MSE), so no single near-identical video dominates it; SSIM's mean over videos) and per video (a video
    equal to its reference at PSNR_CAP)."""
    p, s = psnr(videos, references).clamp(max=PSNR_CAP), ssim(videos, references)
    pooled = min(10 * math.log10(1 / max(mse(videos, references).mean().item(), 1e-300)), PSNR_CAP)
    return {"psnr": pooled, "ssim": s.mean().item(), "psnr_per_video": [round(v, 3) for v in p.tolist()],
            "ssim_per_video": [round(v, 4) for v in s.tolist()]}


PSNR_CAP = 100.0  # dB: where a video equals its reference (MSE 0)


@torch.no_grad()
def sample_all(sample_fn, prompts, batch_size=16):
    """Call sample_fn on prompts in chunks of batch_size (chunk i is sample_fn's i-th call) -> videos on the
    CPU."""
    prompts = list(prompts)
    videos = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="sampling", unit="batch", leave=False,
                  disable=len(prompts) <= batch_size):
        chunk = prompts[i:i + batch_size]
        out = sample_fn(chunk)
        if out.shape[0] != len(chunk):
            raise ValueError(f"sample_fn returned {out.shape[0]} videos for {len(chunk)} prompts")
        videos.append(out.detach().float().cpu())
    return torch.cat(videos) if videos else []


def evaluate_model(sample_fn, prompts, batch_size=16, domain: str = "shapes"):
    """Sample the prompts (sample_all), then score all videos against their prompts with the domain's judge."""
    return SCORES[domain](sample_all(sample_fn, prompts, batch_size), prompts)


def print_table(result, title=None):
    if title:
        print(title)
    width = max(len(k) for k in result)
    print(f"{'metric':<{width}}  value")
    for k, v in result.items():
        print(f"{k:<{width}}  {v:.3f}" if isinstance(v, float) else f"{k:<{width}}  {v}")


@entry_point
def main(argv=None):
    ap = ArgumentParser(description="prompt-following score (and fidelity) for the built-in domains")
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", action="store_true", help="score ground-truth videos of --data")
    source.add_argument("--checkpoint", help="score a model's samples of the validation prompts")
    ap.add_argument("--steps", type=positive_int, nargs="*", default=[None], help="sampling steps (default: checkpoint's)")
    ap.add_argument("--cfg", type=non_negative_float, nargs="*", default=[None], help="guidance scales (default: checkpoint's)")
    ap.add_argument("--shift", type=non_negative_float, nargs="*", default=[None],
                    help="sampling time shifts (default: checkpoint's)")
    ap.add_argument("--plan", default=None, help="a stage-2 plan.yaml to apply to the checkpoint (no retraining)")
    ap.add_argument("--reference", default=None,
                    help="fidelity: PSNR and SSIM against this model's videos (its own saved plan and sampler, "
                         "with --steps, --cfg and --shift where given) of the same prompts, seeds and noise, e.g. "
                         "the full-attention model")
    ap.add_argument("--precision", default="fp32", choices=PRECISIONS,
                    help="the checkpoint's weights (not --reference's): fp32, bf16, or fp8 linear layers on a GPU "
                         "(DiT.use_fp8, torchao)")
    ap.add_argument("--batch-size", type=positive_int, default=16)
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", default=None, help="append the result rows to this JSON-lines file")
    ap.add_argument("--n", type=positive_int, default=64, help="number of videos")
    ap.add_argument("--seed", type=seed_int, nargs="+", default=[0],
                    help="each seed draws its own prompts and noise; with several, a last row gives the means and "
                         "overall_spread (the judge's seed-to-seed noise)")
    ap.add_argument("--data", default="shapes", choices=list(DOMAINS), help="--dataset: the built-in domain")
    ap.add_argument("--num-frames", type=positive_int, default=None,
                    help="--dataset: frames (default: the domain's)")
    ap.add_argument("--size", type=positive_int, default=32)
    args = ap.parse_args(argv)
    if args.json:
        check_output_path(args.json)
    if args.dataset:
        domain = DOMAINS[args.data]
        for seed in args.seed:
            videos, prompts = domain.batch(args.n, seed + VAL_SEED_OFFSET, args.num_frames or domain.num_frames,
                                           args.size)
            print_table(SCORES[args.data](videos, prompts), title=f"ground-truth {args.data} videos (seed {seed})")
        return
    evaluate_checkpoint(args)


def append_line(path: str, line: str):
    """Add a line to a JSON-lines file, whole or not at all: under a lock (several jobs may share the file), one
    unbuffered write, and a write that fails or stops short cut back to what the file held."""
    import fcntl
    data = (line + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
        raise WriteError(path, e.strerror) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.lseek(fd, 0, os.SEEK_END)
        try:
            if os.write(fd, data) < len(data):
                raise OSError(27, "File too large")
        except BaseException as e:
            os.ftruncate(fd, size)
            if isinstance(e, OSError):
                raise WriteError(path, e.strerror or str(e)) from None
            raise
    finally:
        os.close(fd)


def evaluate_checkpoint(args):
    import flow
    import parallel
    from attention import load_plan, plan_sparsity
    from model import load_model, load_model_in
    if any(shift == 0 for shift in args.shift if shift is not None):
        raise UserError("--shift must be > 0")
    device = parallel.pick_device(args.device)
    plan = load_plan(args.plan) if args.plan else None
    model, meta = load_model_in(args.checkpoint, device, args.precision)
    if plan is not None:
        model.set_mask_plan(plan)
    domain = checkpoint_domain(meta)
    sparsity = 100 * plan_sparsity(model.mask_plan, meta["video_shape"][1] // model.cfg.patch_size[0])
    reference = None
    if args.reference:
        reference, ref_meta = load_model(args.reference, device)
        if ref_meta.get("video_shape") != meta.get("video_shape"):
            raise UserError(f"--reference {args.reference!r} makes videos {ref_meta.get('video_shape')}, the "
                            f"checkpoint {meta.get('video_shape')}: fidelity compares videos of one shape")
        references = {}  # per seed and resolved sampler setting: the reference's videos
    for steps, cfg, shift in itertools.product(args.steps, args.cfg, args.shift):
        s = flow.sampler_settings(meta, steps, cfg, shift)
        rows = []
        for seed in args.seed:  # each seed its own prompts and noise
            prompts = DOMAINS[domain].prompts(args.n, seed)
            if not rows:
                sampler(model, meta, s, seed, args.checkpoint, first=0)(prompts[:1])  # warm-up, out of the timing
            t0 = time.time()
            videos = sample_all(sampler(model, meta, s, seed, args.checkpoint, first=1), prompts, args.batch_size)
            per_video = (time.time() - t0) / len(prompts)
            result = SCORES[domain](videos, prompts)
            if reference is not None:  # the same prompts, noise seeds and --steps / --cfg / --shift (else its own)
                r = flow.sampler_settings(ref_meta, steps, cfg, shift)
                key = (seed, r["steps"], r["cfg"], r["shift"])
                if key not in references:
                    references[key] = sample_all(sampler(reference, ref_meta, r, seed, args.reference, first=1),
                                                 prompts, args.batch_size)
                result.update(fidelity(videos, references[key]), reference=args.reference)
            rows.append({"checkpoint": args.checkpoint, "plan": args.plan or "", "sparsity%": round(sparsity, 1),
                         "precision": args.precision,
                         "kind": meta.get("kind", "?"), "seed": seed,
                         "steps": s["steps"], "cfg": s["cfg"], "shift": s["shift"],
                         "forward_passes": s["steps"] * (1 if s["cfg"] == 1.0 else 2), **result,
                         f"s_per_video_{device.type}_batch{args.batch_size}": per_video})
        if len(rows) > 1:
            rows.append(seed_summary(rows))
        for row in rows:
            print_table({k: v for k, v in row.items() if not k.endswith("_per_video")},
                        title=f"{args.checkpoint}: {s['steps']} steps, cfg {s['cfg']}, shift {row['shift']}, "
                              f"seed {row['seed']}")
            if args.json:
                append_line(args.json, json.dumps(row))


def seed_summary(rows: list[dict]) -> dict:
    """Rows of one setting under several seeds -> one row: what they share, each number that varies as its mean
    over the seeds (seed "mean"), and overall_spread, the largest minus the smallest overall score: the judge's
    seed-to-seed noise for this model."""
    numeric = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    summary = {}
    for k, v in rows[0].items():
        values = [r[k] for r in rows]
        if all(x == v for x in values):
            summary[k] = v
        elif all(map(numeric, values)):
            summary[k] = sum(values) / len(values)
    overall = [r["overall"] for r in rows]
    return {**summary, "seed": "mean", "seeds": [r["seed"] for r in rows], "overall_spread": max(overall) - min(overall)}


def sampler(model, meta, settings, seed: int, name, first: int = 0):
    """-> sample_fn(prompts) -> videos: the model under its sampler settings; the noise of its i-th call (from 0)
    is seeded seed * SEED_STRIDE + first + i, the same for every model, so a reference sees the same noise."""
    import flow
    batches = itertools.count(first)

    def sample_fn(chunk):
        videos = flow.generate(model, chunk, meta["video_shape"], settings, seed=seed * SEED_STRIDE + next(batches))
        if not torch.isfinite(videos).all():
            raise UserError(f"{name!r} samples nan or inf at steps {settings['steps']}, cfg {settings['cfg']}: "
                            "not scored")
        return videos
    return sample_fn


if __name__ == "__main__":
    main()
