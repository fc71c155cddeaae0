"""Data: two built-in procedural domains ("shapes", the demo; "bounce", the harder one; DOMAINS) and
safetensors shards (real data).

Run:  python data.py [--data bounce] [--n 256] [--device cuda] [--gif shapes.gif]   # render, print captions, time

Moving shapes: one object per video (SHAPES x COLOURS x DIRECTIONS = 84 prompts), videos [3, T, H, W]
  in [-1, 1] on a black (-1) background, caption "a {colour} {shape} moving {direction}".
  All geometry is in fractions of the frame side; pixel centres sit at (i + 0.5) / size; edges are hard.
  Seeds: MovingShapes(split="train") draws its batch stream from torch.Generator seeded with `seed`,
  split="val" from `seed + VAL_SEED_OFFSET` (10**9), so the two splits never share a generator seed.
  The first val batch of size n equals moving_shapes_batch(n, seed + 10**9).

Bouncing shapes (`data: bounce`): two objects per video, 32 frames, each moving left/right (or both up/down) at its
  own constant speed and turning at the walls, so where an object is late in the clip depends on where it started;
  a grey curtain down the middle hides objects moving left or right while they pass behind it (they come out
  where and when their motion says). Caption "a {colour} {shape} moving {direction} and a {colour} {shape}
  moving {direction}" (the directions at frame 0; the two colours differ). evaluate.score_bounce judges it.

Shard format: a folder of shard-00000.safetensors, shard-00001.safetensors, ... each holding
  tensors   latents   [n, C, T, H, W]   (any dtype)
            text_emb  [n, L, D]         (optional, always together with text_mask)
            text_mask [n, L]            (bool or uint8)
  metadata  "captions": JSON list of n strings (optional)
  All shards must hold the same keys with the same per-item shapes and dtypes. Beside them, null.safetensors
  (optional, with text_emb) holds the empty caption's embedding: text_emb [L, D] and text_mask [L], the
  unconditional input of caption dropout and guidance (without it: a single zero token). A pretrained text
  encoder's empty caption is not zero: for Wan, write umT5's embedding of "" (wan.py's `embed`).

Synthetic latents (`data: synthetic` in a training config): random latents and text embeddings at a real shape,
  for benchmarks with no dataset (SyntheticLatents).

Leaves out: decoding/VAE-encoding real footage into shards, augmentation, DataLoader worker sharding
  (use batch_size=None, num_workers=0: MovingShapes yields whole batches rendered on the device).
"""
import glob
import json
import os
from dataclasses import dataclass
from typing import Callable

import torch

from cli import ArgumentParser, UserError, atomic_output, check_output_path, entry_point, positive_int, seed_int

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
    "magenta": (255, 0, 255), "cyan": (0, 255, 255), "white": (255, 255, 255),
}
DIRECTIONS = ("left", "right", "up", "down")
VAL_SEED_OFFSET = 10**9
CAPTION_FORM = "a {colour} {shape} moving {direction}"
VOCABULARY = sorted({"a", "moving", *SHAPES, *COLOURS, *DIRECTIONS})  # every word of every caption
_STEPS = ((-1, 0), (1, 0), (0, -1), (0, 1))  # unit (dx, dy) per direction; image y grows downwards


# ----------------------------------------------------------------------------- moving shapes

def _generator(seed_or_generator):
    if isinstance(seed_or_generator, torch.Generator):
        return seed_or_generator
    return torch.Generator().manual_seed(int(seed_or_generator))


def colour_table(device=None):
    """[7, 3] RGB of COLOURS (in dict order) on the [-1, 1] scale."""
    return torch.tensor(list(COLOURS.values()), dtype=torch.float32, device=device) / 127.5 - 1


def sample_params(n, generator):
    """Random videos as a dict of CPU tensors; positions/sizes are fractions of the frame side.
    shape/colour/direction: [n] long indices into SHAPES / COLOURS / DIRECTIONS
    size: [n] object side (= circle diameter = triangle width = height), U(0.25, 0.40)
    distance: [n] path length over the clip, U(1/3, 1 - size); speed = distance / (T - 1) per frame
    start: [n, 2] (x, y) of the object's bbox top-left corner in the first frame."""
    g = _generator(generator)
    u = lambda: torch.rand(n, generator=g)
    shape = torch.randint(len(SHAPES), (n,), generator=g)
    colour = torch.randint(len(COLOURS), (n,), generator=g)
    direction = torch.randint(len(DIRECTIONS), (n,), generator=g)
    size = 0.25 + 0.15 * u()
    distance = 1 / 3 + (1 - size - 1 / 3) * u()
    low = (1 - size - distance) * u()  # smallest corner coordinate reached along the motion axis
    across = (1 - size) * u()  # fixed corner coordinate on the other axis
    step = torch.tensor(_STEPS, dtype=torch.float32)[direction]  # [n, 2]
    along = torch.where(step.sum(1) > 0, low, low + distance)  # left/up start at the far end
    horizontal = step[:, 0] != 0
    start = torch.stack([torch.where(horizontal, along, across), torch.where(horizontal, across, along)], 1)
    return dict(shape=shape, colour=colour, direction=direction, size=size, distance=distance, start=start)


def positions(params, num_frames=16):
    """[n, T, 2] (x, y) bbox top-left corner per frame, fractions of the frame side."""
    start, distance = params["start"], params["distance"]
    step = torch.tensor(_STEPS, dtype=start.dtype, device=start.device)[params["direction"]]  # [n, 2]
    t = torch.linspace(0, 1, num_frames, device=start.device) if num_frames > 1 else start.new_zeros(1)
    return start[:, None] + step[:, None] * distance[:, None, None] * t[None, :, None]


def pixel_centres(size, device=None):
    """[size] the centres of a frame's pixel rows (or columns), fractions of the side."""
    return (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size


def shape_masks(shape, side, pos, size=32):
    """Each video's object as a bool mask [n, T, H, W]: shape [n] (index into SHAPES), side [n] and pos [n, T, 2]
    (its bbox top-left corner per frame) in fractions of the frame side, on pos's device."""
    device = pos.device
    s = side.to(device)[:, None, None, None]  # [n, 1, 1, 1]
    c = pixel_centres(size, device)
    dx = c[None, None, None, :] - pos[..., 0, None, None]  # [n, T, 1, W] from the bbox left edge
    dy = c[None, None, :, None] - pos[..., 1, None, None]  # [n, T, H, 1] from the bbox top edge
    in_x, in_y = (dx >= 0) & (dx <= s), (dy >= 0) & (dy <= s)
    masks = {
        "circle": (dx - s / 2) ** 2 + (dy - s / 2) ** 2 <= (s / 2) ** 2,
        "square": in_x & in_y,
        "triangle": in_y & ((dx - s / 2).abs() <= dy / 2),  # apex at top centre, base = bottom edge
    }
    kind = shape.to(device)[:, None, None, None]
    mask = torch.zeros(len(kind), pos.shape[1], size, size, dtype=torch.bool, device=device)
    for i, name in enumerate(SHAPES):
        mask |= (kind == i) & masks[name]  # [n, T, H, W]
    return mask


def render(params, num_frames=16, size=32, device=None):
    """Draw all videos at once: [n, 3, T, H, W] float32 in [-1, 1]."""
    device = device if device is not None else params["start"].device
    p = {k: v.to(device) for k, v in params.items()}
    mask = shape_masks(p["shape"], p["size"], positions(p, num_frames), size)
    rgb = colour_table(device)[p["colour"]]  # [n, 3]
    return torch.where(mask[:, None], rgb[:, :, None, None, None], torch.tensor(-1.0, device=device))


def captions(params):
    names = list(COLOURS)
    return [CAPTION_FORM.format(colour=names[c], shape=SHAPES[s], direction=DIRECTIONS[d]) for c, s, d in
            zip(params["colour"].tolist(), params["shape"].tolist(), params["direction"].tolist())]


def normalize_prompt(text: str) -> str:
    """The caption form: lower case, single spaces, no final period ("A Red  Circle." -> "a red circle")."""
    return " ".join(text.lower().split()).rstrip(".").rstrip()


def unknown_words(text: str, vocabulary) -> list[str]:
    """The words of a (normalised) prompt that are not in the vocabulary, in order."""
    known = set(vocabulary)
    return [w for w in text.split() if w not in known]


def moving_shapes_batch(n, seed_or_generator, num_frames=16, size=32, device=None):
    """(videos [n, 3, T, H, W] in [-1, 1], captions); deterministic given the seed."""
    return DOMAINS["shapes"].batch(n, seed_or_generator, num_frames, size, device)


class MovingShapes(torch.utils.data.IterableDataset):
    """Endless stream of (videos, captions) batches; each fresh iterator restarts the same stream."""

    def __init__(self, batch_size, seed=0, split="train", num_frames=16, size=32, device=None):
        if split not in ("train", "val"):
            raise UserError(f"split must be 'train' or 'val', got {split!r}")
        self.batch_size, self.num_frames, self.size, self.device = batch_size, num_frames, size, device
        self.seed = seed + (VAL_SEED_OFFSET if split == "val" else 0)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        while True:
            yield moving_shapes_batch(self.batch_size, g, self.num_frames, self.size, self.device)


def _shuffled_labels(seed):
    """The colour, shape and direction names, each list shuffled by `seed` (the validation prompts' labels)."""
    g = torch.Generator().manual_seed(seed)
    return ([list(COLOURS)[i] for i in torch.randperm(len(COLOURS), generator=g)],
            [SHAPES[i] for i in torch.randperm(len(SHAPES), generator=g)],
            [DIRECTIONS[i] for i in torch.randperm(len(DIRECTIONS), generator=g)])


def validation_prompts(n=64, seed=0):
    """Fixed prompt list. Prompt i uses colour i%7, shape i%3, direction i%4 (labels shuffled by `seed`):
    7, 3, 4 are coprime, so the first 84 prompts are all combinations and every prefix is balanced."""
    cols, shps, dirs = _shuffled_labels(seed)
    return [f"a {cols[i % 7]} {shps[i % 3]} moving {dirs[i % 4]}" for i in range(n)]


# ----------------------------------------------------------------------------- bouncing shapes (the harder domain)

BOUNCE_FRAMES = 32
BOUNCE_CAPTION_FORM = "a {colour} {shape} moving {direction} and a {colour2} {shape2} moving {direction2}"
BOUNCE_VOCABULARY = sorted({*VOCABULARY, "and"})
CURTAIN = (0.40625, 0.59375)  # the grey band in front of both objects: x from, to (6 of 32 columns)
LEAD_FRAMES = 3  # an object moves this many frames the captioned way before it first turns
CURTAIN_GAP = 0.05  # an object moving up or down keeps this far from the curtain (1.6 pixels at 32)
CURTAIN_GREY = -0.5  # its value on every channel ([-1, 1]): not bright, so the judge never takes it for an object


def bounce_params(n, generator):
    """Random two-object videos: a dict of CPU tensors, [n, 2] each (object 0 drawn first, object 1 over it).
    shape/colour/direction: indices into SHAPES / COLOURS / DIRECTIONS, the two colours distinct, both directions
    on one axis (so the objects' lanes never cross); size
    U(0.19, 0.25) of the side; speed U(0.03, 0.05) of the side per frame (every object reaches a wall and turns);
    along: the bbox corner on the motion axis at frame 0, in [0, 1 - size] at least LEAD_FRAMES frames of motion
    from the wall it moves toward (so frame 0 shows which way it goes); across: on the other axis, in the
    object's lane (object 0 in the top half or left of the curtain, object 1 in the bottom half or right of it:
    objects moving up or down are never behind the curtain, objects moving left or right cross it)."""
    g = _generator(generator)
    u = lambda: torch.rand(n, 2, generator=g)  # noqa: E731
    colour = torch.stack([torch.randperm(len(COLOURS), generator=g)[:2] for _ in range(n)])
    shape = torch.randint(len(SHAPES), (n, 2), generator=g)
    axis = 2 * torch.randint(2, (n, 1), generator=g)  # 0: both move left or right, 2: both up or down
    direction = axis + torch.randint(2, (n, 2), generator=g)
    size, speed, along = 0.19 + 0.06 * u(), 0.03 + 0.02 * u(), u()
    lead = LEAD_FRAMES * speed  # room to move the captioned way before the first wall
    toward_end = (direction == 1) | (direction == 3)  # right, down
    along = torch.where(toward_end, 0, lead) + (1 - size - lead) * along
    horizontal = direction < 2  # left, right
    lane_low = torch.where(horizontal, torch.tensor([0.0, 0.5]), torch.tensor([0.0, CURTAIN[1] + CURTAIN_GAP]))
    lane_high = torch.where(horizontal, torch.tensor([0.5, 1.0]),
                            torch.tensor([CURTAIN[0] - CURTAIN_GAP, 1.0])) - size
    across = lane_low + (lane_high - lane_low) * u()
    return dict(shape=shape, colour=colour, direction=direction, size=size, speed=speed, along=along,
                across=across)


def bounce_path(start, velocity, span, t):
    """Positions of a point moving from `start` at `velocity` per frame inside [0, span], reflected at both ends:
    start, velocity, span [...] and t [T] -> [..., T]."""
    u = start[..., None] + velocity[..., None] * t  # the unfolded path
    m = torch.remainder(u, 2 * span[..., None])
    return torch.where(m <= span[..., None], m, 2 * span[..., None] - m)


def bounce_positions(params, num_frames=BOUNCE_FRAMES):
    """[n, 2, T, 2] (x, y) bbox top-left corner of each object per frame, fractions of the frame side."""
    step = torch.tensor(_STEPS, dtype=torch.float32)[params["direction"]]  # [n, 2, 2]
    horizontal = step[..., 0] != 0  # [n, 2]
    sign = step.sum(-1)  # +1 right/down, -1 left/up
    t = torch.arange(num_frames, dtype=torch.float32)
    moving = bounce_path(params["along"], sign * params["speed"], 1 - params["size"], t)  # [n, 2, T]
    fixed = params["across"][..., None].expand_as(moving)
    return torch.stack([torch.where(horizontal[..., None], moving, fixed),
                        torch.where(horizontal[..., None], fixed, moving)], -1)


def render_bounce(params, num_frames=BOUNCE_FRAMES, size=32, device=None):
    """Draw all videos: object 0, object 1 over it, then the curtain over both. -> [n, 3, T, H, W] in [-1, 1]."""
    device = device if device is not None else "cpu"
    pos = bounce_positions(params, num_frames)
    video = torch.full((len(pos), 3, num_frames, size, size), -1.0, device=device)
    colours = colour_table(device)
    for i in range(2):
        mask = shape_masks(params["shape"][:, i], params["size"][:, i], pos[:, i].to(device), size)  # [n, T, H, W]
        rgb = colours[params["colour"][:, i].to(device)]
        video = torch.where(mask[:, None], rgb[:, :, None, None, None], video)
    c = pixel_centres(size, device)
    curtain = (c >= CURTAIN[0]) & (c <= CURTAIN[1])
    video[..., curtain] = CURTAIN_GREY
    return video


def bounce_captions(params):
    names = list(COLOURS)
    return [BOUNCE_CAPTION_FORM.format(colour=names[c[0]], shape=SHAPES[s[0]], direction=DIRECTIONS[d[0]],
                                       colour2=names[c[1]], shape2=SHAPES[s[1]], direction2=DIRECTIONS[d[1]])
            for c, s, d in zip(params["colour"].tolist(), params["shape"].tolist(), params["direction"].tolist())]


def bounce_batch(n, seed_or_generator, num_frames=BOUNCE_FRAMES, size=32, device=None):
    """(videos [n, 3, T, H, W] in [-1, 1], captions) of bouncing shapes; deterministic given the seed."""
    return DOMAINS["bounce"].batch(n, seed_or_generator, num_frames, size, device)


def bounce_validation_prompts(n=64, seed=0):
    """Fixed prompt list: object 0 as validation_prompts' prompt i; object 1 with colour i + 1 + (i // 7) % 6
    (never object 0's) and shape i // 3 (mod 3) of the same shuffled labels, and a direction on object 0's axis:
    the axis's first (left, up) or second (right, down) as i // 4 is even or odd."""
    cols, shps, dirs = _shuffled_labels(seed)
    second = lambda d, i: DIRECTIONS[DIRECTIONS.index(d) // 2 * 2 + i // 4 % 2]  # noqa: E731 - on d's axis
    return [BOUNCE_CAPTION_FORM.format(colour=cols[i % 7], shape=shps[i % 3], direction=dirs[i % 4],
                                       colour2=cols[(i + 1 + (i // 7) % 6) % 7], shape2=shps[(i // 3) % 3],
                                       direction2=second(dirs[i % 4], i)) for i in range(n)]


# ----------------------------------------------------------------------------- the built-in domains

@dataclass(frozen=True)
class Domain:
    """A built-in procedural video domain, as a training config's `data:` names it: how it draws videos and
    captions, every word its captions use (checkpoints carry it, sample.py checks prompts against it), its fixed
    validation prompts (evaluate.py, the mask search) and its video size. evaluate.SCORES holds its judge."""
    params: Callable  # (n, generator) -> each video's random parameters: a dict of CPU tensors, n first
    render: Callable  # (params, num_frames, size, device) -> videos [n, 3, T, H, W] in [-1, 1], no randomness
    captions: Callable  # (params) -> n captions
    vocabulary: list
    prompts: Callable  # (n, seed) -> n validation prompts
    num_frames: int
    longest_caption: str  # its longest caption (a model's byte encoder must read it whole)
    size: int = 32

    def batch(self, n, seed_or_generator, num_frames=None, size=None, device=None):
        """(videos [n, 3, T, H, W] in [-1, 1], captions); deterministic given the seed."""
        params = self.params(n, _generator(seed_or_generator))
        return self.render(params, num_frames or self.num_frames, size or self.size, device), self.captions(params)


DOMAINS = {
    "shapes": Domain(sample_params, render, captions, VOCABULARY, validation_prompts, 16,  # the demo: one object
                     "a magenta triangle moving right"),
    "bounce": Domain(bounce_params, render_bounce, bounce_captions, BOUNCE_VOCABULARY,  # the harder one
                     bounce_validation_prompts, BOUNCE_FRAMES,
                     "a magenta triangle moving right and a yellow triangle moving right"),
}


def checkpoint_domain(meta: dict) -> str:
    """The built-in domain a checkpoint was trained on (checkpoints before the second domain: shapes)."""
    return meta.get("domain", "shapes")


# ----------------------------------------------------------------------------- safetensors shards

def write_shard(path, latents, captions=None, text_emb=None, text_mask=None):
    """Save one shard (format in the module docstring)."""
    from safetensors.torch import save_file
    n = latents.shape[0]
    if (text_emb is None) != (text_mask is None):
        raise ValueError("text_emb and text_mask go together")
    tensors = {"latents": latents} if text_emb is None else \
        {"latents": latents, "text_emb": text_emb, "text_mask": text_mask}
    if any(v.shape[0] != n for v in tensors.values()) or (captions is not None and len(captions) != n):
        raise ValueError(f"all fields of shard {path} need the same leading size {n}")
    meta = None if captions is None else {"captions": json.dumps(list(captions))}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_output(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=meta)


NULL_FILE = "null.safetensors"  # the empty caption's embedding, beside the shards


def shard_header(path) -> dict:
    """What a shard holds, from its header alone: {field: (per-item shape, dtype)}, and its item count per field
    (captions included). A truncated or corrupt file is one line naming it."""
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt") as f:
            fields = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors' own error: not a file it can read
        raise UserError(f"shard {path} is truncated or not safetensors: {str(e).splitlines()[0]}") from None
    counts = {k: shape[0] if shape else 0 for k, (shape, _) in fields.items()}
    if "captions" in meta:
        try:
            counts["captions"] = len(json.loads(meta["captions"]))
        except ValueError:
            raise UserError(f"shard {path}: its captions metadata is not a JSON list") from None
    return {"fields": {k: (shape[1:], dtype) for k, (shape, dtype) in fields.items()},
            "captions": "captions" in meta, "counts": counts}


def shard_paths(folder: str) -> list[str]:
    """The shards of a data folder (its *.safetensors but null.safetensors), sorted by name; none is an error."""
    paths = sorted(glob.glob(os.path.join(folder, "*.safetensors"))) if os.path.isdir(folder) else []
    paths = [p for p in paths if os.path.basename(p) != NULL_FILE]
    if not paths:
        raise UserError(f"no *.safetensors shards in {folder!r} (folder missing or empty)")
    return paths


def check_shard_headers(paths: list[str]):
    """Every shard of a folder holds latents, the same fields with the same per-item shapes and dtypes, and as
    many items in each; the first that does not is one line naming it and what differs."""
    headers = [shard_header(p) for p in paths]
    ref = headers[0]
    for path, h in zip(paths, headers):
        if "latents" not in h["fields"]:
            raise UserError(f"shard {path} has no 'latents' (it holds {sorted(h['fields'])}; see data.py)")
        if ("text_emb" in h["fields"]) != ("text_mask" in h["fields"]):
            raise UserError(f"shard {path}: text_emb and text_mask go together")
        differ = [f"{k} {h['fields'].get(k)} vs {ref['fields'].get(k)}" for k in sorted(set(h["fields"]) | set(ref["fields"]))
                  if h["fields"].get(k) != ref["fields"].get(k)]
        if h["captions"] != ref["captions"]:
            differ.append(f"captions {h['captions']} vs {ref['captions']}")
        if differ:
            raise UserError(f"shard {path} disagrees with {paths[0]} (per-item shape, dtype): {'; '.join(differ)}")
        if len(set(h["counts"].values())) != 1:
            raise UserError(f"shard {path} has fields of different lengths: {h['counts']}")


def _load_shard(path):
    from safetensors import safe_open
    from safetensors.torch import load_file
    try:
        shard = load_file(path)
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - the header read, the data did not
        raise UserError(f"shard {path} does not read: {str(e).splitlines()[0]}") from None
    for key in ("latents", "text_emb"):
        if key in shard and shard[key].is_floating_point():
            finite = torch.isfinite(shard[key].flatten(1)).all(1)
            if not finite.all():
                raise UserError(f"shard {path} item {int((~finite).nonzero()[0])}: its {key} hold nan or inf")
    if "captions" in meta:
        shard["captions"] = json.loads(meta["captions"])
    return shard


class ShardDataset(torch.utils.data.Dataset):
    """All *.safetensors shards of a folder (sorted by name), loaded eagerly into memory after their headers agree
    (check_shard_headers); `null_text`: the (text_emb, text_mask) of its null.safetensors, or None."""

    def __init__(self, folder):
        paths = shard_paths(folder)
        check_shard_headers(paths)
        shards = [_load_shard(p) for p in paths]
        self.data = {k: torch.cat([s[k] for s in shards]) for k in shards[0] if k != "captions"}
        self.captions = [c for s in shards for c in s["captions"]] if "captions" in shards[0] else None
        self.null_text = read_null_text(os.path.join(folder, NULL_FILE), self.data.get("text_emb"))

    def __len__(self):
        return len(self.data["latents"])

    def __getitem__(self, i):
        item = {"video": self.data["latents"][i]}
        if self.captions is not None:
            item["caption"] = self.captions[i]
        for k in ("text_emb", "text_mask"):
            if k in self.data:
                item[k] = self.data[k][i]
        return item


def read_null_text(path, text_emb=None):
    """(text_emb [L, D], text_mask [L] bool) of a null.safetensors file, checked against the shards' text_emb
    [n, L, D]; None where there is no such file."""
    if not os.path.isfile(path):
        return None
    from safetensors.torch import load_file
    try:
        null = load_file(path)
    except Exception as e:  # noqa: BLE001 - truncated or not safetensors
        raise UserError(f"{path!r} does not read as safetensors: {str(e).splitlines()[0]}") from None
    if set(null) != {"text_emb", "text_mask"} or null["text_emb"].dim() != 2 or \
            null["text_mask"].shape != null["text_emb"].shape[:1]:
        raise UserError(f"{path!r} must hold text_emb [L, D] and text_mask [L] (the empty caption's embedding); "
                        f"it holds {({k: tuple(v.shape) for k, v in null.items()})}")
    if null["text_emb"].is_floating_point() and not torch.isfinite(null["text_emb"]).all():
        raise UserError(f"{path!r}: its text_emb hold nan or inf")
    if text_emb is not None and null["text_emb"].shape != text_emb.shape[1:]:
        raise UserError(f"{path!r}: text_emb {tuple(null['text_emb'].shape)} does not match the shards' per-item "
                        f"{tuple(text_emb.shape[1:])}")
    return null["text_emb"], null["text_mask"].bool()


SYNTHETIC_TEXT_LEN = 300  # text tokens per synthetic sample


class SyntheticLatents(torch.utils.data.Dataset):
    """Random latents [C, T, H, W] with random text embeddings [text_len, text_dim] (and a fixed caption), item i
    drawn from a generator seeded with i. SYNTHETIC: for measuring speed and memory at a real shape (OSP-1.2's
    latents by default) with no dataset; a model trained on it learns nothing."""

    null_text = None

    def __init__(self, shape, text_dim: int, text_len: int = SYNTHETIC_TEXT_LEN, size: int = 1 << 20):
        self.shape, self.text_dim, self.text_len, self.size = list(shape), text_dim, text_len, size

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(int(i))
        return {"video": torch.randn(self.shape, generator=g), "caption": "synthetic latents",
                "text_emb": torch.randn(self.text_len, self.text_dim, generator=g),
                "text_mask": torch.ones(self.text_len, dtype=torch.bool)}


def open_dataset(data: str, synthetic_shape, model_cfg):
    """A training config's `data` as a dataset for a model of model_cfg: None for a built-in domain (DOMAINS,
    rendered on the fly), SyntheticLatents for "synthetic", otherwise the ShardDataset of that folder, checked to
    hold what the model reads (model.ModelConfig.reads_captions: captions, or text_emb)."""
    if data in DOMAINS:
        return None
    dataset = SyntheticLatents(synthetic_shape, model_cfg.text_dim) if data == "synthetic" else ShardDataset(data)
    need = "caption" if model_cfg.reads_captions else "text_emb"
    if need not in dataset[0]:
        raise UserError(f"the shards in {data!r} have no {need!r}, which a model with "
                        f"text_encoder={model_cfg.text_encoder!r} reads (see data.py for the shard format)")
    return dataset


def collate(items):
    """List of ShardDataset items -> dict of stacked tensors (captions stay a list of str)."""
    return {k: torch.stack([it[k] for it in items]) if torch.is_tensor(items[0][k]) else [it[k] for it in items]
            for k in items[0]}


# ----------------------------------------------------------------------------- pixels <-> uint8

def to_image(pixels):
    """uint8 [H, W, 3] or [H, W] -> a PIL image (no numpy needed)."""
    from PIL import Image
    pixels = pixels.to(torch.uint8).contiguous().clone()  # a fresh storage holding exactly these bytes
    mode = "RGB" if pixels.dim() == 3 else "L"
    return Image.frombytes(mode, (pixels.shape[1], pixels.shape[0]), bytes(pixels.untyped_storage()))


def to_uint8(video):
    """[3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3]."""
    return ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0)


def save_animation(frames, path: str, scale: int, duration_ms: int):
    """uint8 [T, H, W, 3] -> a video file by the extension: .mp4 (H.264 through PyAV) or an animated image Pillow
    writes (.gif, .webp, ...), frames enlarged by nearest neighbour; written whole or not at all."""
    from PIL import Image
    images = [to_image(f).resize((f.shape[1] * scale, f.shape[0] * scale), Image.NEAREST) for f in frames]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_output(path) as tmp:  # an interrupted or failed write leaves no partial file
        if path.lower().endswith(".mp4"):
            save_mp4(images, tmp, round(1000 / duration_ms))
        else:
            images[0].save(tmp, save_all=True, append_images=images[1:], duration=duration_ms, loop=0)


def save_mp4(images, path: str, fps: int):
    """PIL images -> an H.264 MP4 (yuv420p, so an odd width or height loses its last pixel column or row)."""
    import av
    w, h = images[0].width // 2 * 2, images[0].height // 2 * 2
    with av.open(path, mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": "18"}
        for image in images:
            container.mux(stream.encode(av.VideoFrame.from_image(image.crop((0, 0, w, h)))))
        container.mux(stream.encode())  # flush


@entry_point
def main(argv=None):
    import time
    ap = ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="shapes", choices=list(DOMAINS), help="the built-in domain")
    ap.add_argument("--n", type=positive_int, default=256)
    ap.add_argument("--seed", type=seed_int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--gif", default=None, help="save the first 8 videos side by side as a GIF")
    args = ap.parse_args(argv)
    from parallel import pick_device
    device = pick_device(args.device)
    if args.gif:
        check_output_path(args.gif, {".gif"})
    domain = DOMAINS[args.data]
    domain.batch(8, 0, domain.num_frames, domain.size, device=device)  # warm-up
    t0 = time.time()
    videos, caps = domain.batch(args.n, args.seed, domain.num_frames, domain.size, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"rendered {tuple(videos.shape)} on {device} in {1000 * (time.time() - t0):.1f} ms")
    print("\n".join(caps[:8]))
    if args.gif:
        save_animation(torch.cat([to_uint8(v.cpu()) for v in videos[:8]], dim=2), args.gif, 4, 120)  # [T, H, 8W, 3]
        print(f"saved {args.gif}")


if __name__ == "__main__":
    main()
