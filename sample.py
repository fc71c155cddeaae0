"""Sample a video from a checkpoint and write it as an animated GIF.

    python sample.py --prompt "a red circle moving right"            # the efficient model: 4 steps, sparse
    python sample.py --prompt "a cyan square moving up" --model base  # the base model: 50 guided steps
    python sample.py --prompt "..." --model base --steps 20 --cfg 3 --seed 1 --out cyan.gif
    python sample.py --prompt "..." --checkpoint runs/stage0/ckpt-0012000/ema.safetensors
    torchrun --nproc_per_node 4 sample.py --prompt "..."     # sequence parallel over 4 processes

The checkpoint's metadata says what it is and how it samples (sampler, steps, guidance, mask plan), so no
flags are needed; --steps and --cfg override it. Leaves out: the latent decoder for real-data checkpoints
(their output is latents, saved as .pt).
"""
import os
import time

import torch
from tqdm import tqdm

import flow
import parallel
from attention import describe_backend
from cli import ArgumentParser, UserError, check_output_path, entry_point, non_negative_float, positive_int, seed_int
from data import (CAPTION_FORM, COLOURS, DIRECTIONS, SHAPES, normalize_prompt, save_animation, to_uint8,
                  unknown_words)
from model import load_model, read_metadata
from parallel import check_heads

# the shipped checkpoints (checkpoints/README.md): stage 3, stage 1 and stage 0 of the recipe
SHIPPED = {name: os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", f"{name}.safetensors")
           for name in ("efficient", "mlcd", "base")}


def save_gif(video, path: str, scale: int = 8, fps: int = 8):
    """video [3, T, H, W] in [-1, 1] -> animated GIF (or another animation format), enlarged by nearest neighbour."""
    save_animation(to_uint8(video), path, scale, 1000 // fps)


def image_extensions() -> set[str]:
    """Animation formats Pillow can write here (.gif always; .png, .webp where built in)."""
    from PIL import Image
    Image.init()
    return {ext for ext, fmt in Image.registered_extensions().items()
            if fmt in Image.SAVE_ALL and ext in (".gif", ".png", ".apng", ".webp")}


PROMPT_HELP = (f"the video's caption. The shipped models know the form '{CAPTION_FORM}' with colour in "
               f"{'/'.join(COLOURS)}, shape in {'/'.join(SHAPES)}, direction in {'/'.join(DIRECTIONS)}; case, "
               "extra spaces and a final period do not matter. A prompt is at most 47 bytes for these models "
               "(the checkpoint's text_len - 1). A checkpoint trained on the built-in data names any word it "
               "never saw and stops (it would draw something else)")


def parse_args(argv=None):
    p = ArgumentParser(description="Sample a video from a text prompt.")
    p.add_argument("--prompt", required=True, help=PROMPT_HELP)
    p.add_argument("--model", choices=list(SHIPPED), default="efficient",
                   help="a shipped checkpoint: efficient (stage 3: 4 steps, sparse attention), mlcd (stage 1: "
                        "4 steps), base (stage 0: 50 steps with guidance)")
    p.add_argument("--checkpoint", default=None, help="any other checkpoint file (instead of --model)")
    p.add_argument("--steps", type=positive_int, default=None, help="sampling steps (default: the checkpoint's)")
    p.add_argument("--cfg", type=non_negative_float, default=None,
                   help="guidance scale, 1 = none (default: the checkpoint's)")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--out", default="sample.gif", help="output file: .gif (or another animation format Pillow "
                                                       "writes, such as .webp); latents of real-data models: .pt")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model's blocks (GPU; pays off over "
                                                          "many steps or videos)")
    args = p.parse_args(argv)
    args.checkpoint = args.checkpoint or SHIPPED[args.model]
    if not args.prompt.strip():
        p.error("--prompt is empty")
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


@entry_point
def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    meta = read_metadata(args.checkpoint)  # cheap: everything below is checked before the model loads
    prompt = prepare_prompt(args.prompt, meta)
    if "video_shape" not in meta:
        raise UserError(f"{args.checkpoint!r} has no video_shape in its metadata: cannot size the noise")
    if meta["model_config"].get("text_encoder") != "bytes":  # checked again by flow.generate, after loading
        raise UserError(f"{args.checkpoint!r} reads precomputed text embeddings (text_encoder: none); sample.py "
                        "prompts models with their own byte-level text encoder")
    sampler = flow.sampler_settings(meta, args.steps, args.cfg)
    latents = meta["model_config"].get("in_channels") != 3
    out = os.path.splitext(args.out)[0] + ".pt" if latents else args.out
    check_output_path(out, None if latents else image_extensions())
    world = int(os.environ.get("WORLD_SIZE", 1))  # under torchrun every process shares each video's tokens
    check_heads(meta["model_config"].get("heads", 1), world, "processes")
    try:
        env = parallel.setup(args.device, sp_size=world)
        model, meta = load_model(args.checkpoint, env.device)
        model.tokenize([prompt])  # a prompt too long for the model fails here, before sampling
        model.enable_sequence_parallel(env.sp_group)
        if args.compile and env.device.type == "cuda":
            model.compile_blocks()
        if env.is_main:
            print("attention: " + describe_backend(model.cfg.attn_backend, env.device, next(model.parameters()).dtype,
                                                  model.cfg.head_dim))
        bar = (lambda r: tqdm(r, desc="sampling", leave=False)) if env.is_main else None
        videos = flow.generate(model, [prompt], meta["video_shape"], sampler, args.seed, bar)
    finally:
        parallel.cleanup()
    if not torch.isfinite(videos).all():
        raise UserError(f"the sample of {args.checkpoint!r} is not finite (nan or inf); nothing written. "
                        "A checkpoint trained into nan, or a --cfg too large?")
    if not env.is_main:
        return
    if latents:
        torch.save(videos[0].cpu(), out)
    else:
        save_gif(videos[0].float().cpu(), out)
    print(f"wrote {out} in {time.time() - t0:.1f}s ({meta.get('kind', '?')} model, {sampler['steps']} steps, "
          f"cfg {sampler['cfg']}, {env.world} x {env.device})")


if __name__ == "__main__":
    main()
