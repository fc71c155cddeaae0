"""Sample a video from a checkpoint and write it as a GIF or MP4 (or, for latent models, its latents).

    python sample.py --prompt "a red circle moving right"            # the efficient model: 4 steps, sparse
    python sample.py --prompt "a cyan square moving up" --model base  # the base model: 50 guided steps
    python sample.py --prompt "..." --model base --steps 20 --cfg 3 --seed 1 --out cyan.mp4
    python sample.py --prompt "..." --checkpoint runs/stage0/ckpt-0012000/ema.safetensors
    torchrun --nproc_per_node 4 sample.py --prompt "..."     # sequence parallel over 4 processes

    # Wan: prompts through the pipeline's umT5, video through its VAE (a diffusers Wan pipeline folder)
    python sample.py --pipeline Wan2.1-T2V-1.3B-Diffusers --prompt "a cat surfing" --out cat.mp4   # Wan itself
    python sample.py --pipeline Wan2.1-T2V-1.3B-Diffusers --checkpoint runs/wan/student --prompt "..." --out a.mp4
    python sample.py --checkpoint runs/wan/student --text-emb prompt.safetensors --out latents.safetensors

The checkpoint's metadata says what it is and how it samples (sampler, steps, guidance, mask plan), so no
flags are needed; --steps and --cfg override it. A model that reads precomputed text embeddings takes them from
--pipeline (encoded here, and the video decoded) or from --text-emb files (`python wan.py embed` writes one), and
without a pipeline writes latents [C, T, H, W] as safetensors. Leaves out: decoders other than a diffusers Wan
pipeline's VAE.
"""
import os
import time

import torch
from tqdm import tqdm

import flow
import parallel
from attention import describe_backend
from cli import (PRECISIONS, ArgumentParser, UserError, atomic_output, check_output_path, entry_point,
                 non_negative_float, positive_int, seed_int)
from data import (CAPTION_FORM, COLOURS, DIRECTIONS, SHAPES, normalize_prompt, read_null_text, save_animation,
                  to_uint8, unknown_words)
from model import ModelConfig, load_model_in, read_metadata
from parallel import check_heads

# the shipped checkpoints (checkpoints/README.md): stage 3, stage 1 and stage 0 of the recipe
SHIPPED = {name: os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", f"{name}.safetensors")
           for name in ("efficient", "mlcd", "base")}


def save_gif(video, path: str, scale: int = 8, fps: int = 8):
    """video [3, T, H, W] in [-1, 1] -> animated GIF, MP4 or another format by the extension, enlarged by nearest
    neighbour."""
    save_animation(to_uint8(video), path, scale, 1000 // fps)


def image_extensions() -> set[str]:
    """Video formats written here: .mp4 (PyAV), and the animations Pillow writes (.gif; .png, .webp where built in)."""
    from PIL import Image
    Image.init()
    return {".mp4"} | {ext for ext, fmt in Image.registered_extensions().items()
                       if fmt in Image.SAVE_ALL and ext in (".gif", ".png", ".apng", ".webp")}


PROMPT_HELP = (f"the video's caption. The shipped models know the form '{CAPTION_FORM}' with colour in "
               f"{'/'.join(COLOURS)}, shape in {'/'.join(SHAPES)}, direction in {'/'.join(DIRECTIONS)}; case, "
               "extra spaces and a final period do not matter. A prompt is at most 47 bytes for these models "
               "(the checkpoint's text_len - 1). A checkpoint trained on the built-in data names any word it "
               "never saw and stops (it would draw something else)")


def parse_args(argv=None):
    p = ArgumentParser(description="Sample a video from a text prompt.")
    p.add_argument("--prompt", default=None, help=PROMPT_HELP)
    p.add_argument("--model", choices=list(SHIPPED), default="efficient",
                   help="a shipped checkpoint: efficient (stage 3: 4 steps, sparse attention), mlcd (stage 1: "
                        "4 steps), base (stage 0: 50 steps with guidance)")
    p.add_argument("--checkpoint", default=None, help="any other checkpoint: a .safetensors file, or a diffusers Wan "
                                                      "transformer folder (default with --pipeline: its transformer)")
    p.add_argument("--pipeline", default=None, help="a diffusers Wan pipeline folder: its umT5 encodes the prompt and "
                                                    "its VAE decodes the video (for models reading text embeddings)")
    p.add_argument("--negative-prompt", default=None, help="with --pipeline: the guidance's unconditional prompt "
                                                           "(default: the empty one)")
    p.add_argument("--text-emb", default=None, help="instead of --prompt: a prompt's embedding (text_emb [L, D], "
                                                    "text_mask [L] in safetensors; `python wan.py embed` writes one)")
    p.add_argument("--negative-emb", default=None, help="with --text-emb: the unconditional embedding (default: the "
                                                        "empty caption's zero token)")
    p.add_argument("--frames", type=positive_int, default=None, help="with --pipeline: video frames (default: the "
                                                                     "checkpoint's, e.g. Wan's 81)")
    p.add_argument("--height", type=positive_int, default=None, help="with --pipeline: pixels (default: the checkpoint's)")
    p.add_argument("--width", type=positive_int, default=None, help="with --pipeline: pixels (default: the checkpoint's)")
    p.add_argument("--steps", type=positive_int, default=None, help="sampling steps (default: the checkpoint's)")
    p.add_argument("--cfg", type=non_negative_float, default=None,
                   help="guidance scale, 1 = none (default: the checkpoint's)")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--out", default="sample.gif", help="output file: .gif or .mp4 (or another animation format Pillow "
                                                       "writes, such as .webp); latents: .safetensors")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="the weights: fp32, bf16, or fp8 linear layers (a GPU of sm89 or newer, torchao; "
                        "DiT.use_fp8). Default: bf16 for a model reading embeddings on a GPU (Wan), else fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the model's blocks (GPU; pays off over "
                                                          "many steps or videos)")
    args = p.parse_args(argv)
    if args.checkpoint is None:
        args.checkpoint = args.pipeline or SHIPPED[args.model]  # a pipeline folder: its transformer/
    if (args.prompt is None) == (args.text_emb is None):
        p.error("give --prompt or --text-emb (one of them)")
    if args.prompt is not None and not args.prompt.strip() and not args.pipeline:
        p.error("--prompt is empty")
    if args.pipeline and (args.text_emb or args.negative_emb):
        p.error("--text-emb and --negative-emb are for sampling without --pipeline (which encodes the prompts itself)")
    if not args.pipeline and (args.frames or args.height or args.width or args.negative_prompt is not None):
        p.error("--frames, --height, --width and --negative-prompt go with --pipeline (its VAE and text encoder)")
    return args


def prepare_prompt(prompt: str, meta: dict) -> str:
    """The prompt as the checkpoint's training captions were written; a word outside its vocabulary is an error."""
    vocabulary = meta.get("vocabulary")
    if not vocabulary:  # trained on the user's own captions: only surrounding spaces are dropped
        return prompt.strip()
    prompt = normalize_prompt(prompt)
    if not prompt:
        raise UserError("--prompt is empty once case, spaces and a final period are normalised")
    unknown = unknown_words(prompt, vocabulary)
    if unknown:
        raise UserError(f"--prompt: this model never saw the word(s) {', '.join(map(repr, unknown))} and would "
                        f"not follow them; it knows: {' '.join(vocabulary)}")
    return prompt


def video_shape(meta: dict, args, vae: dict | None) -> list:
    """The latents [C, T, H, W] to sample: the checkpoint's, or the pixels asked for through the pipeline's VAE
    (its config: Wan 2.1 T = (frames - 1) / 4 + 1, H = height / 8), checked to fit the model's patches."""
    C, T, H, W = meta["video_shape"]
    if vae is None or not (args.frames or args.height or args.width):
        return [C, T, H, W]
    st, ss = vae.get("scale_factor_temporal", 4), vae.get("scale_factor_spatial", 8)
    pt, ph, pw = meta["model_config"]["patch_size"]
    frames, height, width = args.frames or (T - 1) * st + 1, args.height or H * ss, args.width or W * ss
    if (frames - 1) % (st * pt) or height % (ss * ph) or width % (ss * pw):
        raise UserError(f"--frames must be {st * pt} k + 1 and --height / --width multiples of {ss * ph} / "
                        f"{ss * pw} for this VAE and model; got {frames} x {height} x {width}")
    return [C, (frames - 1) // st + 1, height // ss, width // ss]


def text_inputs(args, meta, model, pipe, guided: bool):
    """-> (the prompt as generate takes it, the unconditional embedding or None). Byte-encoder models take the
    prompt as text; embedding models take it encoded by the pipeline or read from --text-emb."""
    if model.cfg.reads_captions:
        return [prepare_prompt(args.prompt, meta)], None
    if pipe is not None:
        import wan
        emb, mask = wan.encode_prompts(pipe, [args.prompt.strip(), args.negative_prompt or ""], model.cfg.text_len)
        return (emb[:1], mask[:1]), (emb[1], mask[1]) if guided else None
    emb, mask = read_embedding(args.text_emb, model.cfg.text_dim, "--text-emb")
    null = None
    if args.negative_emb:
        null = read_embedding(args.negative_emb, model.cfg.text_dim, "--negative-emb")
        if null[0].shape != emb.shape:
            raise UserError(f"--negative-emb holds {tuple(null[0].shape)} embeddings, --text-emb {tuple(emb.shape)}: "
                            "write both at the same length (python wan.py embed does)")
    return (emb[None], mask[None]), null


def read_embedding(path: str, text_dim: int, flag: str):
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path!r}: no such file")
    emb, mask = read_null_text(path)
    if emb.shape[-1] != text_dim:
        raise UserError(f"{flag} {path!r}: embeddings of width {emb.shape[-1]}; this model reads {text_dim}")
    return emb.float(), mask


@entry_point
def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    meta = read_metadata(args.checkpoint)  # cheap: everything below is checked before the model loads
    embeds = not ModelConfig(**meta["model_config"]).reads_captions
    if not embeds:
        if args.pipeline or args.text_emb:
            raise UserError(f"{args.checkpoint!r} has its own byte-level text encoder: give --prompt, without "
                            "--pipeline or --text-emb")
        prepare_prompt(args.prompt, meta)
    elif not (args.pipeline or args.text_emb):
        raise UserError(f"{args.checkpoint!r} reads precomputed text embeddings: give --pipeline DIR (a diffusers "
                        "Wan pipeline folder, to encode --prompt) or --text-emb FILE")
    if "video_shape" not in meta:
        raise UserError(f"{args.checkpoint!r} has no video_shape in its metadata: cannot size the noise")
    sampler = flow.sampler_settings(meta, args.steps, args.cfg)
    if args.text_emb and sampler["cfg"] != 1.0 and not args.negative_emb and "source" in meta:
        raise UserError(f"{args.checkpoint!r} is a pretrained model sampled with guidance (cfg {sampler['cfg']}): give "
                        "--negative-emb, its text encoder's empty prompt (python wan.py embed --prompt ''), or --cfg 1")
    vae = None
    if args.pipeline:
        import wan
        vae = wan.check_pipeline(args.pipeline, ModelConfig(**meta["model_config"]))
    shape = video_shape(meta, args, vae)
    latents = (meta["model_config"].get("in_channels") != 3 and not args.pipeline)
    out = os.path.splitext(args.out)[0] + ".safetensors" if latents else args.out
    check_output_path(out, {".safetensors"} if latents else image_extensions())
    world = int(os.environ.get("WORLD_SIZE", 1))  # under torchrun every process shares each video's tokens
    check_heads(meta["model_config"].get("heads", 1), world, "processes")
    try:
        dist = parallel.setup(args.device, sp_size=world)
        # by default a model reading embeddings (Wan) runs in bf16 on a GPU, where FA4 takes it; the demo models in fp32
        precision = args.precision or ("bf16" if embeds and dist.device.type == "cuda" else "fp32")
        model, meta = load_model_in(args.checkpoint, dist.device, precision)
        pipe = wan.load_pipeline(args.pipeline, dist.device) if args.pipeline else None
        prompts, null = text_inputs(args, meta, model, pipe, sampler["cfg"] != 1.0)
        if model.cfg.reads_captions:
            model.tokenize(prompts)  # a prompt too long for the model fails here, before sampling
        model.enable_sequence_parallel(dist.sp_group)
        if args.compile and dist.device.type == "cuda":
            model.compile_blocks()
        if dist.is_main:
            print("attention: " + describe_backend(model.attn_backend, dist.device, next(model.parameters()).dtype,
                                                  model.cfg.head_dim))
        bar = (lambda r: tqdm(r, desc="sampling", leave=False)) if dist.is_main else None
        videos = flow.generate(model, prompts, shape, sampler, args.seed, bar, null=null)
        if not torch.isfinite(videos).all():
            raise UserError(f"the sample of {args.checkpoint!r} is not finite (nan or inf); nothing written. "
                            "A checkpoint trained into nan, or a --cfg too large?")
        if pipe is not None and dist.is_main:
            videos = wan.decode(pipe, videos)
    finally:
        parallel.cleanup()
    if not dist.is_main:
        return
    if latents:
        from safetensors.torch import save_file
        with atomic_output(out) as tmp:
            save_file({"latents": videos[0].float().cpu().contiguous()}, tmp,
                      metadata={"checkpoint": args.checkpoint, "seed": str(args.seed), "steps": str(sampler["steps"])})
    elif pipe is not None:
        save_gif(videos[0].float().cpu(), out, scale=1, fps=meta.get("fps", 16))
    else:
        save_gif(videos[0].float().cpu(), out)
    print(f"wrote {out} in {time.time() - t0:.1f}s ({meta.get('kind', '?')} model, {sampler['steps']} steps, "
          f"cfg {sampler['cfg']}, {dist.world} x {dist.device})")


if __name__ == "__main__":
    main()
