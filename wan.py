"""Wan 2.1 / 2.2 in and out of diffusers: a pretrained Wan transformer folder becomes our DiT (a preset of model.py),
and a trained student goes back into a user's diffusers pipeline at its trained sparsity.

    model.load_model("Wan2.1-T2V-1.3B-Diffusers")     # a diffusers pipeline folder, or its transformer/ folder
    python train.py configs/wan/stage1.yaml init=Wan2.1-T2V-1.3B-Diffusers data=LATENTS
    python train.py configs/wan/stage3.yaml --export runs/wan-student     # a folder diffusers loads
    python sample.py --pipeline Wan2.1-T2V-1.3B-Diffusers --checkpoint runs/wan-student --prompt "..." --out a.mp4

    # in a diffusers pipeline: the student's weights, its mask plan on FlexAttention / FA4, its 4-step grid
    transformer = WanTransformer3DModel.from_pretrained("runs/wan-student")
    pipe = WanPipeline.from_pretrained(WAN, transformer=wan.apply_mask_plan(transformer, "runs/wan-student/mask_plan.yaml"),
                                       scheduler=wan.student_scheduler(4))
    video = pipe("a cat surfing", num_inference_steps=4, guidance_scale=1.0).frames[0]

Reading and writing use json and safetensors only (no diffusers import, no network): config.json's fields map to
ModelConfig, and the weights map by name (`_BLOCK` and `_TOP` below), with four reshapes: q/k/v (and cross k/v)
are fused into one matmul here, the patch embedding is a Linear over (c, pt, ph, pw) where diffusers has a Conv3d,
the output projection orders its rows (c, pt, ph, pw) where diffusers orders them (pt, ph, pw, c), and the adaLN
tables have no leading 1. Conversions are exact both ways (tests/test_wan.py checks both against diffusers).

diffusers is imported only by `TileAttnProcessor` / `apply_mask_plan` (running inside a diffusers model) and by the
pipeline helpers that sample.py uses to encode prompts with umT5 and decode latents with Wan's VAE.
Leaves out: image-conditioned Wan transformers (I2V, FLF2V, VACE: image_dim / added_kv_proj_dim), Wan 2.2's
two-expert A14B (two transformers switched by noise level), and TI2V's per-token timesteps (its text-to-video mode
gives every token the same time, which is what this model takes).
"""
import json
import os

import torch

from attention import FULL, expand_plan, save_plan
from cli import UserError, atomic_output, entry_point
from flow import euler_sampler, time_grid
from model import (PRESETS, TIME_FEATURES, WAN, Attend, DiT, ModelConfig, config_dict, load_safetensors, model_config,
                   model_from_weights, rope_tables)

CLASS = "WanTransformer3DModel"
DIFFUSERS_VERSION = "0.42.1"  # the version our conversion is tested against (requirements.txt)
WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = WEIGHTS + ".index.json"
OURS = "tile_vdit.json"  # what our export adds beside config.json: kind, sampler, video shape, mask plan
PLAN = "mask_plan.yaml"  # the student's plan, for apply_mask_plan
SHARD_BYTES = 5 * 2**30  # export shards (diffusers' own default is 10 GB)

# WanTransformer3DModel's defaults (diffusers 0.42.1), for keys a config.json leaves out
DIFFUSERS_DEFAULTS = dict(patch_size=[1, 2, 2], num_attention_heads=40, attention_head_dim=128, in_channels=16,
                          out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40,
                          cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None,
                          added_kv_proj_dim=None, rope_max_seq_len=1024, pos_embed_seq_len=None)

# Wan's own sampling defaults (generate.py and wan/configs of Wan-Video/Wan2.1 and Wan2.2: 50 steps, guide scale
# 5, flow shift 5) and the video each model was made for, as latents [C, T, H, W]: 81 frames -> 21 latent frames
# (the first latent frame is the first video frame alone, every other one 4 frames), 480p / 720p through the
# 8x VAE of Wan 2.1, 121 frames at 704 x 1280 through Wan 2.2's 16x VAE. A time shift s maps t -> s t / (1 + (s-1) t)
# in both codebases (flow.shift_t); our sampler is Euler where Wan's pipelines default to UniPC.
WAN_SAMPLER = euler_sampler(50, cfg=5.0, shift=5.0)
FPS = {"wan2.2-5b": 24}  # the frame rate each model was made for (Wan 2.1: 16)
VIDEO_SHAPES = {"wan2.1-1.3b": [16, 21, 60, 104], "wan2.1-14b": [16, 21, 90, 160], "wan2.2-5b": [48, 31, 44, 80],
                "wan-tiny": [16, 3, 8, 8]}


# ----------------------------------------------------------------------------------------------------------
# config.json <-> ModelConfig

def transformer_folder(path: str) -> str:
    """A transformer folder (config.json + weights) from itself or from a pipeline folder holding transformer/."""
    if os.path.isfile(os.path.join(path, "model_index.json")):
        check_pipeline_index(path)
        path = os.path.join(path, "transformer")
    if not os.path.isfile(os.path.join(path, "config.json")):
        if os.path.isfile(os.path.join(path, "state.pt")):
            raise UserError(f"{path!r} is a training checkpoint folder: give its ema.safetensors (or "
                            "model.safetensors), or export it (train.py --export)")
        raise UserError(f"{path!r} has no config.json: give a diffusers Wan transformer folder (or the pipeline "
                        "folder holding transformer/)")
    return path


def check_pipeline_index(folder: str) -> dict:
    """A diffusers pipeline folder's model_index.json, refused where it is a pipeline this code does not run
    (Wan 2.2 A14B: two transformers switched by noise level)."""
    try:
        with open(os.path.join(folder, "model_index.json")) as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{folder!r}: model_index.json does not read ({e})") from None
    if (index.get("transformer_2") or [None])[0] is not None or index.get("boundary_ratio") is not None:
        raise UserError(f"{folder!r} is a two-expert Wan 2.2 pipeline (transformer_2, boundary_ratio): this code "
                        "runs one transformer (Wan 2.1 T2V, Wan 2.2 TI2V 5B)")
    return index


def pipeline_configs(folder: str) -> tuple[dict, dict]:
    """(vae/config.json, text_encoder/config.json) of a diffusers Wan pipeline folder, read before anything loads."""
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        raise UserError(f"--pipeline {folder!r} is not a diffusers pipeline folder (no model_index.json)")
    check_pipeline_index(folder)
    configs = []
    for part in ("vae", "text_encoder"):
        try:
            with open(os.path.join(folder, part, "config.json")) as f:
                configs.append(json.load(f))
        except (OSError, ValueError) as e:
            raise UserError(f"--pipeline {folder!r}: {part}/config.json does not read ({e})") from None
    return configs[0], configs[1]


def check_pipeline(folder: str, cfg: ModelConfig) -> dict:
    """A pipeline folder whose VAE and text encoder fit a model of cfg (latent channels, text width), checked
    from their config.json before anything loads. -> the VAE's config"""
    vae, encoder = pipeline_configs(folder)
    if vae.get("z_dim") != cfg.in_channels or encoder.get("d_model") != cfg.text_dim:
        raise UserError(f"--pipeline {folder!r} does not fit this model: its VAE has {vae.get('z_dim')} latent "
                        f"channels and its text encoder {encoder.get('d_model')} wide embeddings; the model reads "
                        f"{cfg.in_channels} and {cfg.text_dim}")
    return vae


def read_config(folder: str) -> dict:
    """config.json of a diffusers WanTransformer3DModel folder, with diffusers' defaults for keys it leaves out."""
    try:
        with open(os.path.join(folder, "config.json")) as f:
            conf = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{folder!r}: config.json does not read ({e})") from None
    cls = conf.get("_class_name") if isinstance(conf, dict) else None
    if cls != CLASS:
        raise UserError(f"{folder!r} holds a diffusers {cls or 'unknown'} model; this code reads {CLASS} folders "
                        "(Wan 2.1 / 2.2 text-to-video)")
    return {**DIFFUSERS_DEFAULTS, **conf}


def config_from_diffusers(conf: dict, where: str) -> ModelConfig:
    """The ModelConfig of a Wan transformer's config.json; a feature this DiT does not have is a one-line error."""
    image = {k: conf[k] for k in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len") if conf[k] is not None}
    if image:
        raise UserError(f"{where!r} is an image-conditioned Wan transformer ({image}); this code runs the "
                        "text-to-video ones (Wan 2.1 T2V, Wan 2.2 TI2V)")
    fixed = {"cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "freq_dim": TIME_FEATURES}
    other = {k: conf[k] for k, v in fixed.items() if conf[k] != v}
    if other or conf["out_channels"] not in (None, conf["in_channels"]):
        raise UserError(f"{where!r}: a Wan transformer with {other or {'out_channels': conf['out_channels']}} "
                        f"is not supported (Wan's own models have {fixed} and out_channels = in_channels)")
    heads, head_dim = conf["num_attention_heads"], conf["attention_head_dim"]
    return ModelConfig(**{**WAN, "in_channels": conf["in_channels"], "patch_size": tuple(conf["patch_size"]),
                          "hidden": heads * head_dim, "depth": conf["num_layers"], "heads": heads,
                          "mlp_hidden": conf["ffn_dim"], "text_dim": conf["text_dim"]})


def check_exportable(cfg: ModelConfig):
    """A model whose weights mean what a WanTransformer3DModel's mean, or a one-line error saying what differs."""
    wan = {k: WAN[k] for k in ("qk_norm", "cross_qk_norm", "rope_float64")}
    differ = {k: getattr(cfg, k) for k, v in {**wan, "text_encoder": "none", "max_frames": 0}.items()
              if getattr(cfg, k) != v}
    if differ:
        raise UserError(f"only Wan-shaped models export to diffusers ({wan}, text_encoder 'none', max_frames 0); "
                        f"this one has {differ}")


def diffusers_config(cfg: ModelConfig) -> dict:
    """config.json for a WanTransformer3DModel with cfg's shape."""
    return {"_class_name": CLASS, "_diffusers_version": DIFFUSERS_VERSION, **DIFFUSERS_DEFAULTS,
            "patch_size": list(cfg.patch_size), "num_attention_heads": cfg.heads, "attention_head_dim": cfg.head_dim,
            "in_channels": cfg.in_channels, "out_channels": cfg.in_channels, "text_dim": cfg.text_dim,
            "ffn_dim": cfg.mlp_width, "num_layers": cfg.depth}


def preset_of(cfg: ModelConfig) -> str | None:
    """The name of the preset with cfg's architecture, if any."""
    return next((name for name in PRESETS if config_dict(model_config(name)) == config_dict(cfg)), None)


def read_metadata(path: str) -> dict:
    """What model.read_metadata returns for one of our checkpoints, for a diffusers Wan folder: its model config,
    kind "pretrained" and Wan's sampler and video shape (or, for a folder we exported, the student's own)."""
    folder = transformer_folder(path)
    cfg = config_from_diffusers(read_config(folder), folder)
    preset = preset_of(cfg)
    meta = {"model_config": config_dict(cfg), "kind": "pretrained", "source": f"diffusers {CLASS}",
            "preset": preset, "sampler": dict(WAN_SAMPLER),
            "video_shape": VIDEO_SHAPES.get(preset, [cfg.in_channels, 21, 60, 104]), "fps": FPS.get(preset, 16)}
    ours = os.path.join(folder, OURS)
    if os.path.isfile(ours):
        with open(ours) as f:
            saved = json.load(f)
        meta.update(saved)
    return meta


# ----------------------------------------------------------------------------------------------------------
# Weights: our names <-> diffusers' names

_TOP = {"patch_embed": "patch_embedding", "t_embed.0": "condition_embedder.time_embedder.linear_1",
        "t_embed.2": "condition_embedder.time_embedder.linear_2", "t_block.1": "condition_embedder.time_proj",
        "text_proj.0": "condition_embedder.text_embedder.linear_1",
        "text_proj.2": "condition_embedder.text_embedder.linear_2", "out": "proj_out", "out_table": "scale_shift_table"}
_BLOCK = {"attn.qkv": ["attn1.to_q", "attn1.to_k", "attn1.to_v"], "attn.q_norm": ["attn1.norm_q"],
          "attn.k_norm": ["attn1.norm_k"], "attn.proj": ["attn1.to_out.0"], "norm_cross": ["norm2"],
          "cross.q": ["attn2.to_q"], "cross.kv": ["attn2.to_k", "attn2.to_v"], "cross.q_norm": ["attn2.norm_q"],
          "cross.k_norm": ["attn2.norm_k"], "cross.proj": ["attn2.to_out.0"], "mlp.0": ["ffn.net.0.proj"],
          "mlp.2": ["ffn.net.2"], "scale_shift_table": ["scale_shift_table"]}


def diffusers_names(key: str) -> list[str]:
    """The diffusers tensor(s) one of our tensors is made of (two or three for a fused projection)."""
    module, dot, leaf = key.rpartition(".") if key.endswith((".weight", ".bias")) else (key, "", "")
    if module.startswith("blocks."):
        _, i, rest = module.split(".", 2)
        return [f"blocks.{i}.{name}{dot}{leaf}" for name in _BLOCK[rest]]
    return [f"{_TOP[module]}{dot}{leaf}"]


def _patch_rows(cfg):
    return cfg.in_channels, *cfg.patch_size  # the output projection's rows: ours (c, pt, ph, pw)


def to_diffusers(state_dict: dict, cfg: ModelConfig) -> dict:
    """Our state dict -> diffusers' WanTransformer3DModel state dict (exact: splits, reshapes and permutations)."""
    out = {}
    for key, value in state_dict.items():
        names = diffusers_names(key)
        if key == "patch_embed.weight":
            value = value.unflatten(1, _patch_rows(cfg))  # [D, C, pt, ph, pw]: the Conv3d's kernel
        elif key.startswith("out."):  # rows (c, pt, ph, pw) -> (pt, ph, pw, c)
            value = value.unflatten(0, _patch_rows(cfg)).movedim(0, 3).flatten(0, 3)
        elif key.endswith(("scale_shift_table", "out_table")):
            value = value[None]
        for name, part in zip(names, value.chunk(len(names)), strict=True):
            out[name] = part.contiguous()
    return out


def to_ours(weights: dict, cfg: ModelConfig, where: str) -> dict:
    """diffusers' state dict -> ours; a tensor it lacks or one we do not know is a one-line error."""
    with torch.device("meta"):
        keys = list(DiT(cfg).state_dict())
    used, out = set(), {}
    for key in keys:
        names = diffusers_names(key)
        missing = [n for n in names if n not in weights]
        if missing:
            raise UserError(f"{where!r} has no tensor {missing[0]!r}: a shard missing, or not a {CLASS} of this shape")
        value = torch.cat([weights[n] for n in names]) if len(names) > 1 else weights[names[0]]
        used.update(names)
        if key == "patch_embed.weight":
            value = value.flatten(1)
        elif key.startswith("out."):  # rows (pt, ph, pw, c) -> (c, pt, ph, pw)
            value = value.unflatten(0, (*cfg.patch_size, cfg.in_channels)).movedim(3, 0).flatten(0, 3)
        elif key.endswith(("scale_shift_table", "out_table")):
            value = value.squeeze(0)
        out[key] = value
    extra = sorted(set(weights) - used - {"norm_added_q.weight"})  # diffusers ignores that one too
    if extra:
        raise UserError(f"{where!r} holds tensors this model does not have: {extra[:3]}")
    return out


def read_weights(folder: str) -> dict:
    """All tensors of a diffusers folder: one safetensors file, or the shards its index names."""
    single, index = os.path.join(folder, WEIGHTS), os.path.join(folder, INDEX)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"{index!r} is not a safetensors index ({e})") from None
    elif os.path.isfile(single):
        files = [WEIGHTS]
    else:
        raise UserError(f"{folder!r} has neither {WEIGHTS} nor {INDEX}")
    weights = {}
    for name in files:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise UserError(f"{folder!r}: shard {name!r} (named in {INDEX}) is missing")
        weights.update(load_safetensors(path))
    return weights


def load_diffusers(path: str, device="cpu", dtype=torch.float32):
    """A diffusers Wan transformer (or pipeline) folder -> (our DiT in eval mode, metadata), like model.load_model."""
    meta = read_metadata(path)
    folder = transformer_folder(path)
    cfg = ModelConfig(**meta["model_config"])
    return model_from_weights(meta, to_ours(read_weights(folder), cfg, folder), folder, device, dtype), meta


def check_export_folder(folder: str):
    """An export may replace an earlier export of ours, never another folder; its parent must be writable."""
    from cli import check_output_path
    if os.path.exists(folder) and not os.path.isfile(os.path.join(folder, OURS)):
        raise UserError(f"--export {folder!r} exists and is not an export of this code: give a new folder")
    check_output_path(os.path.join(folder, WEIGHTS))


def save_diffusers(folder: str, model, meta: dict | None = None, dtype=None):
    """Write a folder diffusers' WanTransformer3DModel.from_pretrained loads: config.json and the weights (sharded
    above SHARD_BYTES, with diffusers' index), plus tile_vdit.json (kind, sampler, video shape, plan: what
    read_metadata gives back) and, for a sparse plan, mask_plan.yaml (apply_mask_plan). Written to a temporary
    folder that replaces `folder` when complete (cli.atomic_output), so a failed export leaves no half folder."""
    from safetensors.torch import save_file
    cfg = model.cfg
    check_exportable(cfg)
    check_export_folder(folder)
    tensors = to_diffusers({k: v.to(dtype) if dtype is not None and v.is_floating_point() else v
                            for k, v in model.state_dict().items()}, cfg)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    shards, size = [[]], 0
    for name, t in tensors.items():
        if shards[-1] and size + t.nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += t.nbytes
    files = [WEIGHTS] if len(shards) == 1 else \
        [f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    with atomic_output(folder) as tmp:
        os.makedirs(tmp)
        for name, keys in zip(files, shards, strict=True):
            save_file({k: tensors[k] for k in keys}, os.path.join(tmp, name), metadata={"format": "pt"})
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
                     "weight_map": {k: name for name, keys in zip(files, shards) for k in keys}}
            with open(os.path.join(tmp, INDEX), "w") as f:
                json.dump(index, f, indent=2)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(diffusers_config(cfg), f, indent=2)
        ours = {k: v for k, v in (meta or {}).items() if k in ("kind", "sampler", "video_shape", "fps")}
        with open(os.path.join(tmp, OURS), "w") as f:
            json.dump({**ours, **model.run_settings()}, f, indent=2)
        if any(e != FULL for e in model.mask_plan):
            frames = (meta or {}).get("video_shape", [0, cfg.patch_size[0]])[1] // cfg.patch_size[0]
            save_plan(os.path.join(tmp, PLAN), model.mask_plan, frames, header={"model": "exported student"})


# ----------------------------------------------------------------------------------------------------------
# A mask plan inside a diffusers Wan model

class TileAttnProcessor:
    """A diffusers attention processor for a Wan self-attention layer (attn1) that runs our attend step
    (model.Attend: RoPE, the layer's Attention Tile mask on FA4 / FlexAttention or the exact dense rewrites) on
    diffusers' own projections and norms. num_frames comes from `frames`, which apply_mask_plan's hook fills
    before each forward. Not for diffusers' context parallelism (use our Ulysses: parallel.py)."""

    def __init__(self, entry, backend: str, frames: dict):
        self.attention = Attend(backend)
        self.attention.plan_entry = entry
        self.frames = frames

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None or attention_mask is not None or rotary_emb is None:
            raise ValueError("TileAttnProcessor is for Wan's self-attention (attn1), which has RoPE and no mask")
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q, k, v = (x.unflatten(2, (attn.heads, -1)) for x in (attn.norm_q(q), attn.norm_k(k), v))  # [B, N, H, Dh]
        cos, sin = (r[0, :, 0, 0::2] for r in rotary_emb)  # [1, N, 1, Dh], each pair's angle twice -> [N, Dh/2]
        o, _ = self.attention.attend(q, k, v, rope_tables(cos, sin), self.frames["num_frames"])
        return attn.to_out[1](attn.to_out[0](o.type_as(q)))


def apply_mask_plan(transformer, plan, backend: str = "auto"):
    """Give every self-attention layer of a diffusers WanTransformer3DModel its Attention Tile mask: plan is a list
    (one entry per layer, or one for all), a plan YAML (a student's mask_plan.yaml) or "full". Full layers run dense
    (FA4 where it runs, else SDPA). -> transformer"""
    entries = expand_plan(plan, len(transformer.blocks))
    frames = {}

    def note_frames(module, args, kwargs):
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        frames["num_frames"] = x.shape[2] // module.config.patch_size[0]

    old = getattr(transformer, "_tile_frames_hook", None)
    if old is not None:
        old.remove()
    transformer._tile_frames_hook = transformer.register_forward_pre_hook(note_frames, with_kwargs=True)
    for block, entry in zip(transformer.blocks, entries, strict=True):
        block.attn1.set_processor(TileAttnProcessor(entry, backend, frames))
    return transformer


def student_scheduler(steps: int, shift: float = 1.0):
    """A diffusers FlowMatchEulerDiscreteScheduler that steps through our sampler's grid (flow.time_grid): a stage-1
    or stage-3 student's K segment starts, (1, 0.75, 0.5, 0.25) for K = 4, which diffusers' own K-step grid
    (1, 0.67, 0.33, 0.001) misses. In a WanPipeline: pipe.scheduler = wan.student_scheduler(4), then
    pipe(..., num_inference_steps=4, guidance_scale=1.0): the student's sampler, as sample.py runs it."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)  # no shift of its own: the grid carries ours
    sigmas = time_grid(steps, shift=shift)[:-1].numpy().astype(np.float32)
    set_timesteps = scheduler.set_timesteps

    def our_grid(num_inference_steps=None, device=None, **kwargs):
        if num_inference_steps not in (None, steps):
            raise ValueError(f"this scheduler samples in the student's {steps} steps, not {num_inference_steps}")
        set_timesteps(sigmas=sigmas.tolist(), device=device)
    scheduler.set_timesteps = our_grid
    return scheduler


# ----------------------------------------------------------------------------------------------------------
# The rest of a diffusers Wan pipeline (sample.py --pipeline): umT5 prompts in, Wan's VAE out

def load_pipeline(folder: str, device):
    """A diffusers Wan pipeline folder's tokenizer, text encoder (umT5: bf16 on a GPU, fp32 on a CPU) and VAE (fp32,
    as Wan's pipelines recommend, read as such from its files), without its transformer (ours runs instead)."""
    pipeline_configs(folder)
    from diffusers import AutoencoderKLWan, WanPipeline
    device = torch.device(device)
    try:
        vae = AutoencoderKLWan.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32)
        pipe = WanPipeline.from_pretrained(folder, transformer=None, vae=vae, torch_dtype=torch.bfloat16
                                           if device.type == "cuda" else torch.float32)
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"--pipeline {folder!r} does not load as a WanPipeline: {str(e).splitlines()[0]}") from None
    return pipe.to(device)


def encode_prompts(pipe, prompts: list[str], max_len: int):
    """umT5 embeddings as Wan's pipelines make them: [n, max_len, D], zero after each prompt's tokens, and a mask
    that is all true (Wan's cross-attention reads every position, the zero padding included)."""
    emb, _ = pipe.encode_prompt(prompt=prompts, do_classifier_free_guidance=False, max_sequence_length=max_len,
                                device=pipe.text_encoder.device)
    return emb.float(), torch.ones(emb.shape[:2], dtype=torch.bool, device=emb.device)


@torch.no_grad()
def decode(pipe, latents):
    """Latents [n, C, T, H, W] -> videos [n, 3, F, H', W'] in [-1, 1] through the pipeline's VAE, with Wan's latent
    normalisation undone exactly as WanPipeline does it."""
    vae = pipe.vae
    shape = (1, vae.config.z_dim, 1, 1, 1)
    latents = latents.to(vae.device, vae.dtype)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents)
    return vae.decode(latents / inv_std + mean, return_dict=False)[0]


def write_embedding(path: str, emb, mask):
    """One prompt's embedding as sample.py --text-emb and a data folder's null.safetensors read it."""
    from safetensors.torch import save_file
    with atomic_output(path) as tmp:
        save_file({"text_emb": emb.float().contiguous().cpu(), "text_mask": mask.contiguous().cpu()}, tmp)


@entry_point
def main(argv=None):
    """python wan.py embed --pipeline DIR --prompt "..." --out FILE: one prompt's umT5 embedding (text_emb [512, D],
    text_mask [512]) for sample.py --text-emb / --negative-emb; with --prompt "" it is a data folder's
    null.safetensors."""
    from cli import ArgumentParser, check_output_path
    from parallel import pick_device
    p = ArgumentParser(description="Write a prompt's umT5 embedding with a diffusers Wan pipeline's text encoder.")
    p.add_argument("command", choices=["embed"])
    p.add_argument("--pipeline", required=True, help="a diffusers Wan pipeline folder (model_index.json, text_encoder/)")
    p.add_argument("--prompt", required=True, help='the prompt ("" for the empty caption: null.safetensors)')
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    check_output_path(args.out, {".safetensors"})
    pipe = load_pipeline(args.pipeline, pick_device(args.device))
    emb, mask = encode_prompts(pipe, [args.prompt], WAN["text_len"])
    write_embedding(args.out, emb[0], mask[0])
    print(f"wrote {args.out}: text_emb {tuple(emb.shape[1:])}, {int((emb[0].abs().sum(-1) > 0).sum())} tokens")


if __name__ == "__main__":
    main()
