"""Wan against diffusers' own WanTransformer3DModel, the independent reference, on tiny random models: a diffusers
folder (one file or sharded) loaded here gives diffusers' output; with a sparse plan our model equals diffusers
under the dense boolean tile mask; our processor inside diffusers equals our model; the export round-trips
bit-exactly and diffusers loads it; mistakes in a folder are one-line errors; and the recipe (stages 1-3, export,
sampling with and without a pipeline, two processes) runs on the CPU from a tiny random diffusers folder."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

import checkpoint
import train
import wan
from attention import tile_dense_mask
from conftest import read_log
from data import write_shard
from model import load_model, read_metadata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WAN_CONFIGS = os.path.join(ROOT, "configs", "wan")
TINY = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=256, ffn_dim=96, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32)  # the wan-tiny preset, in diffusers' terms


def diffusers_wan(seed=0, **overrides):
    """A tiny WanTransformer3DModel with every weight perturbed (the norms' ones and zeros would hide a swap)."""
    torch.manual_seed(seed)
    d = WanTransformer3DModel(**{**TINY, **overrides}).eval()
    with torch.no_grad():
        for p in d.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return d


def inputs(B=2, T=4, H=8, W=6, L=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 16, T, H, W, generator=g), torch.rand(B, generator=g),
            torch.randn(B, L, TINY["text_dim"], generator=g))


def reference(d, x, t, emb):
    with torch.no_grad():
        return d(hidden_states=x, timestep=1000 * t, encoder_hidden_states=emb).sample


def ours(m, x, t, emb):
    with torch.no_grad():
        return m(x, t, emb, torch.ones(emb.shape[:2], dtype=torch.bool))


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The tiny model saved by diffusers (one file) -> (its folder, the model)."""
    d = diffusers_wan()
    path = tmp_path_factory.mktemp("wan") / "transformer"
    d.save_pretrained(path)
    return str(path), d


@pytest.mark.parametrize("layout", ["one file", "sharded", "pipeline folder"])
def test_a_diffusers_folder_loads_and_matches_diffusers(folder, tmp_path, layout):
    path, d = folder
    if layout == "sharded":
        path = str(tmp_path / "sharded")
        d.save_pretrained(path, max_shard_size="40KB")
        assert os.path.isfile(os.path.join(path, wan.INDEX))
    elif layout == "pipeline folder":  # a pipeline's folder: its transformer/ is read
        (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
        os.symlink(path, tmp_path / "transformer")
        path = str(tmp_path)
    m, meta = load_model(path)
    assert meta["kind"] == "pretrained" and meta["preset"] == "wan-tiny"
    x, t, emb = inputs()
    assert rel_err(ours(m, x, t, emb), reference(d, x, t, emb)) <= 1e-5


class DenseTileProcessor(WanAttnProcessor):
    """diffusers' own Wan attention with the reference mask: SDPA under the dense boolean k:(T-k) mask."""

    def __init__(self, num_frames, num_ref):
        super().__init__()
        self.num_frames, self.num_ref = num_frames, num_ref

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        S = hidden_states.shape[1] // self.num_frames
        mask = tile_dense_mask(self.num_frames, S, self.num_ref)
        return super().__call__(attn, hidden_states, None, mask, rotary_emb)


@pytest.mark.parametrize("backend", ["gather", "merge"])
def test_sparse_plan_equals_diffusers_under_the_dense_tile_mask(folder, backend):
    path, d = folder
    x, t, emb = inputs(T=5)
    m, _ = load_model(path)
    m.set_mask_plan([1, 2])
    m.set_attn_backend(backend)
    d = copy.deepcopy(d)
    for block, k in zip(d.blocks, [1, 2]):
        block.attn1.set_processor(DenseTileProcessor(5, k))
    want = reference(d, x, t, emb)
    assert rel_err(ours(m, x, t, emb), want) <= 1e-5
    assert rel_err(reference(folder[1], x, t, emb), want) > 1e-2  # the mask matters at this size


def test_our_processor_inside_diffusers_equals_our_model(folder):
    path, d = folder
    x, t, emb = inputs(T=5)
    m, _ = load_model(path)
    m.set_mask_plan([1, "full"])
    d = wan.apply_mask_plan(copy.deepcopy(d), [1, "full"])
    assert rel_err(reference(d, x, t, emb), ours(m, x, t, emb)) <= 1e-5
    # with a gradient (the gather backend), and again after a plan change (the frame hook replaced, not added)
    wan.apply_mask_plan(d, [2])
    assert len(d._forward_pre_hooks) == 1
    m.set_mask_plan([2])
    out = d(hidden_states=x, timestep=1000 * t, encoder_hidden_states=emb).sample
    out.square().mean().backward()
    assert d.blocks[0].attn1.to_q.weight.grad.abs().sum() > 0
    assert rel_err(out.detach(), ours(m, x, t, emb)) <= 1e-5


def test_export_round_trips_bit_exactly_and_diffusers_loads_it(folder, tmp_path, monkeypatch):
    path, d = folder
    m, meta = load_model(path)
    m.set_mask_plan([1, "full"])
    meta = {**meta, "kind": "sparse", "video_shape": [16, 4, 8, 6]}
    monkeypatch.setattr(wan, "SHARD_BYTES", 60_000)  # sharded, with diffusers' index
    out = str(tmp_path / "export")
    wan.save_diffusers(out, m, meta)
    assert os.path.isfile(os.path.join(out, wan.INDEX)) and os.path.isfile(os.path.join(out, wan.PLAN))
    back = WanTransformer3DModel.from_pretrained(out).eval()
    want = d.state_dict()
    assert set(back.state_dict()) == set(want)
    assert all(torch.equal(v, want[k]) for k, v in back.state_dict().items())  # diffusers' tensors, bit for bit
    m2, meta2 = load_model(out)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in m2.state_dict().items())
    assert meta2["kind"] == "sparse" and m2.mask_plan == [1, "full"]
    x, t, emb = inputs()
    wan.apply_mask_plan(back, os.path.join(out, wan.PLAN))
    assert rel_err(reference(back, x, t, emb), ours(m2, x, t, emb)) <= 1e-5
    with pytest.raises(ValueError, match="not an export of this code"):
        wan.save_diffusers(str(tmp_path), m, meta)  # never over a folder of something else


def test_mistakes_in_a_folder_are_one_line_errors(folder, tmp_path):
    path, d = folder
    def variant(name, edit=None, drop=None, sharded=False):
        p = tmp_path / name
        d.save_pretrained(p, max_shard_size="40KB" if sharded else "10GB")
        if edit:
            conf = json.loads((p / "config.json").read_text())
            (p / "config.json").write_text(json.dumps({**conf, **edit}))
        if drop:
            os.remove(p / sorted(f for f in os.listdir(p) if f.startswith(drop))[1])
        return str(p)
    cases = [
        (variant("unet", {"_class_name": "UNet2DConditionModel"}), "diffusers UNet2DConditionModel"),
        (variant("i2v", {"image_dim": 1280}), "image-conditioned"),
        (variant("shard", drop="diffusion_pytorch_model-0", sharded=True), "is missing"),
        (variant("shape", {"ffn_dim": 97}), r"blocks.0.mlp.0.weight \(96, 64\) \(the config needs \(97, 64\)\)"),
        (str(tmp_path), "no config.json"),
    ]
    for where, message in cases:
        with pytest.raises(ValueError, match=message):
            load_model(where)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--checkpoint", cases[0][0], "--prompt", "x"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "UNet2DConditionModel" in r.stderr


# ----------------------------------------------------------------------------------------------------------
# The recipe on the CPU, from a tiny random diffusers folder

def tiny_pipeline(path, transformer):
    """A diffusers WanPipeline folder of tiny random parts: a word-level tokenizer, umT5, Wan's VAE."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel
    words = "a the cat dog runs on grass in snow video of red blue".split()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(vocab), d_model=TINY["text_dim"], d_kv=8, d_ff=64,
                                          num_layers=1, num_heads=4, pad_token_id=0, eos_token_id=1))
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    WanPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae, transformer=transformer,
                scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0)).save_pretrained(path)
    return str(path)


def run(args, nproc=1):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                                    str(nproc), "--master_port", str(29500 + os.getpid() % 1000)]
    r = subprocess.run(launcher + args, capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_the_recipe_runs_on_a_tiny_wan_from_a_diffusers_folder(folder, tmp_path):
    import av
    path, d = folder
    data = tmp_path / "latents"
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(4, 6, TINY["text_dim"], generator=g)
    write_shard(str(data / "shard-00000.safetensors"), torch.randn(4, 16, 3, 8, 8, generator=g),
                text_emb=emb, text_mask=torch.ones(4, 6, dtype=torch.bool))
    wan.write_embedding(str(data / "null.safetensors"), torch.randn(6, TINY["text_dim"], generator=g),
                        torch.ones(6, dtype=torch.bool))
    common = [f"data={data}", "batch_size=2", "steps=2", "log_every=1", "ckpt_every=2", "warmup=1", "compile=false"]
    cfg = lambda stage, *more: train.load_config(os.path.join(WAN_CONFIGS, f"stage{stage}.yaml"),  # noqa: E731
                                                 [f"run_dir={tmp_path / f's{stage}'}", *more])
    s1 = cfg(1, f"init={path}", f"teacher={path}", "teacher_steps=8", *common)
    train.train(s1)
    assert len(read_log(s1.run_dir)) == 2
    mlcd = str(tmp_path / "mlcd.safetensors")
    checkpoint.export(s1.run_dir, mlcd)
    assert read_metadata(mlcd)["sampler"]["steps"] == 4
    [rec] = train.train(cfg(2, f"init={mlcd}", f"data={data}", "calib_prompts=1", "candidates=[1, 2]", "sweep=[]",
                            "threshold=10"))
    assert rec["plan"] == [1, 1]
    s3 = cfg(3, f"init={mlcd}", f"plan={rec['file']}", *common)
    train.train(s3)
    student = str(tmp_path / "student")
    checkpoint.export(s3.run_dir, student)  # a diffusers folder, with the plan
    m, meta = load_model(student)
    assert meta["kind"] == "sparse" and m.mask_plan == [1, 1] and meta["video_shape"] == [16, 3, 8, 8]
    back = wan.apply_mask_plan(WanTransformer3DModel.from_pretrained(student).eval(), os.path.join(student, wan.PLAN))
    x, t, e = inputs(T=3, H=8, W=8)
    assert rel_err(reference(back.float(), x, t, e), ours(m, x, t, e)) <= 1e-5

    # sampling: latents from an embedding file, on one and on two processes (Ulysses)
    prompt = str(tmp_path / "prompt.safetensors")
    wan.write_embedding(prompt, emb[0], torch.ones(6, dtype=torch.bool))
    outs = []
    for n in (1, 2):
        out = str(tmp_path / f"latents{n}.safetensors")
        run(["sample.py", "--checkpoint", student, "--text-emb", prompt, "--out", out, "--device", "cpu"], n)
        from safetensors.torch import load_file
        outs.append(load_file(out)["latents"])
    assert outs[0].shape == (16, 3, 8, 8) and torch.allclose(outs[0], outs[1], atol=1e-4)

    # and a video through a pipeline's umT5 and VAE: 3 latent frames -> 9 frames of 64 x 64
    pipe = tiny_pipeline(tmp_path / "pipe", d)

    # the student inside diffusers' own WanPipeline (its processor, its scheduler on our grid) samples what ours does
    from diffusers import WanPipeline
    import flow
    noise = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    diffusers_pipe = WanPipeline.from_pretrained(pipe, transformer=back.float(), scheduler=wan.student_scheduler(4))
    got = diffusers_pipe(prompt_embeds=emb[:1], num_inference_steps=4, guidance_scale=1.0, latents=noise.clone(),
                         height=64, width=64, num_frames=9, output_type="latent").frames
    want = flow.generate(m, (emb[:1], torch.ones(1, 6, dtype=torch.bool)), [16, 3, 8, 8], meta["sampler"], seed=0)
    assert meta["sampler"]["steps"] == 4 and rel_err(got, want) <= 1e-5
    null = str(tmp_path / "null.safetensors")  # the empty caption's umT5 embedding, as Wan's pipeline makes it
    run(["wan.py", "embed", "--pipeline", pipe, "--prompt", "", "--out", null])
    from diffusers import WanPipeline
    want = WanPipeline.from_pretrained(pipe, transformer=None).encode_prompt([""], do_classifier_free_guidance=False,
                                                                              max_sequence_length=512)[0][0]
    from data import read_null_text
    got, got_mask = read_null_text(null)
    assert torch.equal(got, want) and got.shape == (512, TINY["text_dim"]) and got_mask.all()
    video = str(tmp_path / "v.mp4")
    run(["sample.py", "--pipeline", pipe, "--checkpoint", student, "--prompt", "a red cat runs", "--cfg", "3",
         "--out", video])
    with av.open(video) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 9 and frames[0].shape == (64, 64, 3)
    run(["sample.py", "--pipeline", pipe, "--prompt", "a cat", "--steps", "2", "--frames", "5", "--height", "32",
         "--width", "48", "--out", str(tmp_path / "w.gif")])  # the pipeline's own transformer, resized
    from PIL import Image, ImageSequence
    frames = list(ImageSequence.Iterator(Image.open(tmp_path / "w.gif")))
    assert len(frames) == 5 and frames[0].size == (48, 32)

    # mistakes are one line each, found before any model loads
    other = str(tmp_path / "other.safetensors")  # a model whose text width this pipeline's umT5 does not give
    from model import DiT, model_config, save_model
    o = DiT(model_config("wan-tiny", text_dim=24))
    save_model(other, o, {"kind": "base", "video_shape": [16, 3, 8, 8]})
    ckpt_dir = checkpoint.checkpoints(s3.run_dir)[-1]
    (tmp_path / "a14b").mkdir()
    (tmp_path / "a14b" / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline",
                                                                     "transformer_2": ["diffusers", "X"]}))
    for args, message in [
        (["--pipeline", pipe, "--checkpoint", other, "--prompt", "a cat"], "does not fit this model"),
        (["--pipeline", pipe, "--prompt", "a cat", "--height", "40"], "multiples of 16"),
        (["--pipeline", pipe, "--prompt", "a cat", "--negative-emb", prompt], "--negative-emb"),
        (["--checkpoint", student, "--text-emb", prompt, "--negative-prompt", "x"], "--negative-prompt"),
        (["--checkpoint", path, "--text-emb", prompt], "--negative-emb"),  # Wan itself samples with guidance
        (["--checkpoint", ckpt_dir, "--text-emb", prompt], "ema.safetensors"),
        (["--pipeline", str(tmp_path / "a14b"), "--prompt", "a cat"], "two-expert"),
    ]:
        r = subprocess.run([sys.executable, "sample.py", *args, "--out", str(tmp_path / "x.gif")], capture_output=True,
                           text=True, cwd=ROOT)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and message in r.stderr, (args, r.stderr)
    with pytest.raises(ValueError, match="folder name without an extension"):
        checkpoint.export(s3.run_dir, str(tmp_path / "student.pt"))
    os.remove(data / "null.safetensors")  # guidance from a pretrained teacher needs its empty caption
    with pytest.raises(ValueError, match="null.safetensors"):
        train.train(cfg(1, f"init={path}", f"teacher={path}", "run_dir=" + str(tmp_path / "s1b"), *common))
