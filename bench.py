"""Speed at Open-Sora-Plan 1.2 scale: the attention kernels alone and the whole model forward.

    python bench.py attention --profile    # 29 and 93 frames at 720p, 24 x 96 heads, bf16 (GPU); every backend
    python bench.py attention --backward   # the same, forward + backward
    python bench.py model --compile --backend merge auto   # osp12 forward: full plan vs ~45% / ~55% plans, per backend
    python bench.py model --compile --backward --depth 4 --backend gather auto   # a training step's fwd + bwd
    python bench.py e2e --compile          # seconds per video: base recipe vs student recipes
    python bench.py sp --gpus 1 2 4        # sequence-parallel scaling (spawns torchrun per count)
    python bench.py sp --gpus 1 4 --profile  # ... with each forward's device time split: comm / attention / matmul
    python bench.py train --compile --gpus 1 2   # train.py's steps for stages 0, 1, 3 on synthetic osp12 latents
    python bench.py plans --checkpoint checkpoints/mlcd.safetensors --plans runs/stage2/plan-r*.yaml
                                           # a trained model at its own shape under stage-2 plans (CPU or GPU)
    python bench.py attention --tiny       # a CPU smoke run of the same code, tiny shapes
    python bench.py model --tiny --json out.json

Each mode prints a table and can write JSON. Timings are medians over repeats after warm-up, measured with
CUDA events on GPU; speedups are ratios within one process on one card (train: read back from train.py's log).
"""
import contextlib
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from cli import (ArgumentParser, UserError, atomic_output, check_output_path, entry_point, first_line, fraction,
                 positive_int)
from attention import (BACKENDS, density, entry_num_ref, expand_plan, load_plan, plan_for_sparsity, plan_sparsity,
                       save_plan, tile_attention, tile_block_mask, tile_dense_mask)
from model import CHECKPOINT_POLICIES

TABLE1_MASKS = {8: [4, 3, 2, 1], 24: [12, 8, 6, 4, 3]}  # the paper's Table 1: k per latent frame count
FRAMES = {8: "29f", 24: "93f"}


def timeit(fn, warmup=3, repeat=10):
    """Median milliseconds of fn()."""
    for _ in range(warmup):
        fn()
    cuda = torch.cuda.is_available()
    times = []
    for _ in range(repeat):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def print_table(rows, cols):
    widths = [max(len(c), *(len(f"{r.get(c, '')}") for r in rows)) for c in cols]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(f"{r.get(c, '')}".rjust(w) for c, w in zip(cols, widths)))


def fmt(x, nd=2):
    return round(x, nd) if isinstance(x, float) else x


# ----------------------------------------------------------------------------------------------------------

def fwd_bwd(fn, q, k, v, backward: bool):
    """-> a function of no arguments: fn(q, k, v), or with --backward fn's forward and its backward, returning
    (out, dq) so that the gradient can be checked too."""
    if not backward:
        return lambda: (fn(q, k, v), None)
    g = torch.randn(q.shape, generator=torch.Generator(q.device).manual_seed(0), device=q.device, dtype=q.dtype)
    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))

    def run():
        out = fn(qg, kg, vg)
        return out, torch.autograd.grad(out, (qg, kg, vg), g)[0]
    return run


def dense_kernels(q, k, v, args, fa4: bool) -> dict:
    """ms of the dense kernels on q, k, v (forward, or forward + backward with --backward): cuDNN and Flash-2
    SDPA on a GPU (plain SDPA on a CPU), FlexAttention's Triton kernel, and FA4 where it runs."""
    import attention
    dense = {}
    if q.is_cuda:
        for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("fa2_sdpa", SDPBackend.FLASH_ATTENTION)):
            def sdpa(q, k, v, be=be):
                with sdpa_kernel([be]):
                    return F.scaled_dot_product_attention(q, k, v)
            try:
                dense[name] = timeit(fwd_bwd(sdpa, q, k, v, args.backward), 2, args.repeat)
            except RuntimeError as e:
                print(f"{name} unavailable: {str(e)[:80]}", file=sys.stderr)
    else:
        dense["sdpa"] = timeit(fwd_bwd(F.scaled_dot_product_attention, q, k, v, args.backward), 2, args.repeat)
    if not args.skip_triton:
        dense["flex_triton"] = timeit(fwd_bwd(lambda q, k, v: attention._flex(q, k, v, None), q, k, v,
                                              args.backward), 2, args.repeat)
    if fa4:
        try:
            dense["flash"] = timeit(fwd_bwd(lambda q, k, v: attention._flex(q, k, v, None, attention.FLASH),
                                            q, k, v, args.backward), 2, args.repeat)
        except Exception as e:  # noqa: BLE001 - a kernel that fails is reported, not the end of the run
            print(f"flash dense failed: {str(e).strip().splitlines()[-1][:160]}", file=sys.stderr)
    return dense


def sparse_kernels(S: int, dev: str, args, fa4: bool) -> dict:
    """name -> kernel(q, k, v, T, num_ref) for each sparse backend timed: FA4's block sparsity (flash; forward
    only, also on the backward's 128 x 128 blocks: flash_128), the dense rewrites on the fastest dense kernel
    (FA4 where it runs) and on SDPA (cuDNN: *_sdpa; merge only forward), and FlexAttention's Triton kernel."""
    import attention
    kernels = {} if args.skip_triton else \
        {"flex_triton": lambda q, k, v, T, num_ref: attention._flex(q, k, v, tile_block_mask(T, S, num_ref, dev))}
    rewrites = ["gather"] + ([] if args.backward else ["merge"])
    for backend in (["flash"] if fa4 else []) + rewrites:
        kernels[backend] = lambda q, k, v, T, num_ref, b=backend: tile_attention(q, k, v, T, num_ref, b)
    if fa4:
        if not args.backward:
            kernels["flash_128"] = lambda q, k, v, T, num_ref: attention._flex(
                q, k, v, tile_block_mask(T, S, num_ref, dev, (128, 128)), attention.FLASH)
        for name in rewrites:
            rewrite = getattr(attention, f"{name}_attention")
            kernels[f"{name}_sdpa"] = lambda q, k, v, T, num_ref, f=rewrite: f(q, k, v, T, num_ref, fa4=False)
    return kernels


def mask_row(name, kernel, q, k, v, T, num_ref, base_ms, flops, args) -> dict | None:
    """One sparse kernel on one mask: ms, against cuDNN (base_ms) and its line (base x density), and its largest
    error on head 0 against fp32 SDPA under the dense boolean mask (up to 30,000 tokens; with --backward, dq's
    too). None where the kernel fails."""
    S, dev, head = q.shape[2] // T, q.device, slice(0, 1)
    fn = fwd_bwd(lambda q, k, v: kernel(q, k, v, T, num_ref), q, k, v, args.backward)
    try:
        ms = timeit(fn, 2, args.repeat)
    except Exception as e:  # noqa: BLE001 - a kernel that fails here is reported, not the end of the run
        print(f"{name} {num_ref}:{T - num_ref} failed: {str(e).strip().splitlines()[-1][:160]}", file=sys.stderr)
        return None
    err = float("nan")
    if q.shape[2] <= 30000:
        ref, ref_dq = fwd_bwd(lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, attn_mask=tile_dense_mask(T, S, num_ref, dev)), *(x[:, head].float() for x in (q, k, v)),
            args.backward)()
        out, _ = fn()
        err = (out[:, head].float() - ref).abs().max().item()
        if args.backward:  # dq of the same loss restricted to head 0 (heads are independent)
            g = fwd_bwd(lambda q, k, v: kernel(q, k, v, T, num_ref), *(x[:, head] for x in (q, k, v)), True)
            err = max(err, (g()[1].float() - ref_dq).abs().max().item())
    dens = density(T, num_ref)
    return {"mask": f"{num_ref}:{T - num_ref}", "ms": fmt(ms),
            "sparsity%": fmt(tile_block_mask(T, S, num_ref, dev).sparsity()), "speedup": fmt(base_ms / ms),
            "ideal": fmt(1 / dens), "%line": fmt(100 * base_ms / ms * dens, 1), "line_ms": fmt(base_ms * dens),
            "TFLOP/s": fmt(flops * dens / ms / 1e9, 1), "max_err": f"{err:.1e}",
            **(profile_split(lambda: fn()) if args.profile else {})}


def bench_attention(args):
    """Self-attention alone: the dense kernels, then every Table-1 mask on each sparse kernel, forward (or forward +
    backward with --backward). Baseline: cuDNN SDPA; `line_ms` = cuDNN dense x density; `%fa4_line`: against FA4's
    dense kernel x density."""
    import attention
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    H, D, S = (24, 96, 3600) if not args.tiny else (2, 32, 96)
    shapes = TABLE1_MASKS if not args.tiny else {4: [2, 1]}
    shapes = {T: ks for T, ks in shapes.items() if args.tiny or T in args.latent_frames}
    fa4 = attention.flash_available(dev, dtype, D)
    rows = []
    for T, ks in shapes.items():
        N = T * S
        q, k, v = (torch.randn(1, H, N, D, device=dev, dtype=dtype) for _ in range(3))
        flops = 4 * N * N * D * H * (3.5 if args.backward else 1)  # QK^T and PV, dense (backward: 2.5x more)
        where = {"frames": FRAMES.get(T, T), "tokens": N}
        dense = dense_kernels(q, k, v, args, fa4)
        base = dense.get("cudnn", min(dense.values()))
        for name, ms in dense.items():
            rows.append({**where, "kernel": name, "mask": "full", "ms": fmt(ms), "sparsity%": 0.0,
                         "speedup": fmt(base / ms), "TFLOP/s": fmt(flops / ms / 1e9, 1)})
        for num_ref in ks:
            for name, kernel in sparse_kernels(S, dev, args, fa4).items():
                row = mask_row(name, kernel, q, k, v, T, num_ref, base, flops, args)
                if row is not None:
                    if "flash" in dense:  # FA4's own line: its dense kernel x density
                        row["%fa4_line"] = fmt(100 * dense["flash"] * density(T, num_ref) / row["ms"], 1)
                    rows.append({**where, "kernel": name, **row})
    print(f"attention {'forward + backward' if args.backward else 'forward'}; speedup and %line against cuDNN")
    print_table(rows, ["frames", "tokens", "kernel", "mask", "ms", "sparsity%", "speedup", "ideal", "%line",
                       "line_ms", "%fa4_line", "TFLOP/s", "max_err"] + (["attention_ms", "other_ms"] if args.profile else []))
    return rows


def bench_config(tiny: bool, depth: int | None = None, preset: str = "osp12"):
    """The preset's config (or a tiny stand-in of its shape), optionally cut to `depth` layers."""
    from model import model_config
    if tiny:
        cfg = model_config("wan-tiny") if preset.startswith("wan") else \
            model_config("osp12", depth=2, hidden=64, heads=4, text_dim=32)
    else:
        cfg = model_config(preset)
    if depth:
        cfg.depth = depth
    return cfg


def latent_shape(args, cfg) -> list:
    """The latents [C, T, H, W] a mode runs at: OSP-1.2's 720p at --frames latent frames (8 = 29 frames), or a Wan
    preset's own video (wan.VIDEO_SHAPES: 81 frames at 480p / 720p), with --frames / --hw overriding."""
    import wan
    if args.tiny:
        return [cfg.in_channels, 4, 8, 8]
    C, T, H, W = wan.VIDEO_SHAPES.get(args.model, [cfg.in_channels, 8, 90, 160])
    H, W = args.hw or (H, W)
    return [C, args.frames or T, H, W]


def bench_model_inputs(args, dev, dtype):
    """The --model (or a tiny stand-in) with random weights (small noise on every weight, so that zero-initialised
    output layers do not hide a difference), and one input at its latent_shape with random text embeddings."""
    from model import DiT
    cfg = bench_config(args.tiny, args.depth, args.model)
    text_len = 8 if args.tiny else 512 if args.model.startswith("wan") else 300
    torch.manual_seed(0)
    with torch.device(dev):
        model = DiT(cfg, attn_backend=args.backend[0]).to(dtype).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=0.02)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, *latent_shape(args, cfg), generator=g).to(dev, dtype)
    text = torch.randn(1, text_len, cfg.text_dim, generator=g).to(dev, dtype)
    mask = torch.ones(1, text_len, dtype=torch.bool, device=dev)
    return model, x, text, mask


def model_plans(T, depth, targets=(0.45, 0.55)):
    plans = {"full": (["full"], 0.0)}
    for target in targets:  # by default the paper's r = 0.1 and r = 0.4 points
        plan, achieved = plan_for_sparsity(T, depth, target)
        plans[f"~{int(100 * target)}% ({'/'.join(sorted({f'{k}:{T - k}' for k in plan}))})"] = (plan, achieved)
    return plans


def model_call(model, x, text, mask, args, batch=1):
    """-> a function of no arguments that runs one forward (blocks compiled with --compile), or with
    --backward a training step's forward and backward (weight gradients accumulate in place)."""
    x, text, mask = (torch.cat([a] * batch) for a in (x, text, mask))
    t = torch.full((batch,), 0.5, device=x.device)
    fn = model.compile_blocks() if args.compile else model

    def call():
        if getattr(args, "backward", False):  # as train.py trains: fp32 weights under bf16 autocast
            with torch.autocast(x.device.type, torch.bfloat16, enabled=x.is_cuda):
                loss = fn(x, t, text, mask).float().square().mean()
            loss.backward()
            return None
        with torch.no_grad():
            return fn(x, t, text, mask)
    return call


def forward_ms(model, x, text, mask, args, batch=1):
    return timeit(model_call(model, x, text, mask, args, batch), warmup=2, repeat=args.repeat)


_KINDS = [("comm", r"nccl|all_to_all|alltoall|gloo|c10d"),
          ("attention", r"attention|fmha|flash|sdpa|cudnn|triton_tem"),
          ("matmul", r"gemm|xmma|cutlass|nvjet|aten::(add|b)?mm$")]
SPLIT_COLS = [f"{kind}_ms" for kind, _ in _KINDS] + ["other_ms"]  # profile_split's keys
OTHER_TOP = 8  # bench.py model --profile lists this many of the dearest other kernels per row


def kernel_kind(name: str) -> str:
    """A kernel's (or CPU op's) kind by its name: comm, attention, matmul or other."""
    import re
    return next((k for k, pattern in _KINDS if re.search(pattern, name, re.IGNORECASE)), "other")


def profile_split(call, top: int = 0):
    """One profiled call: its own device time (GPU kernels; CPU ops on a CPU) in ms, split into
    communication, attention, matmuls and the rest, by kernel / op name. top > 0 adds "other_top": the `top`
    dearest kernels of the rest, [name (cut to 60 characters), ms, calls], dearest first: where fusion can go."""
    from torch.profiler import ProfilerActivity, profile
    cuda = torch.cuda.is_available()
    call()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        call()
        if cuda:
            torch.cuda.synchronize()
    split, other = dict.fromkeys(SPLIT_COLS, 0.0), []
    for e in prof.key_averages():
        if cuda and e.device_type != torch.autograd.DeviceType.CUDA:
            continue  # an op or compiled region on the CPU side: its kernels are counted as kernels
        us = e.self_device_time_total if cuda else e.self_cpu_time_total
        kind = kernel_kind(e.key)
        split[f"{kind}_ms"] += us / 1e3
        if kind == "other":
            other.append([e.key[:60], fmt(us / 1e3, 2), e.count])
    split = {k: fmt(v, 1) for k, v in split.items()}
    return {**split, "other_top": sorted(other, key=lambda o: -o[1])[:top]} if top else split


def attention_share(split: dict) -> float:
    """The percentage of a profile_split's device time spent in attention kernels (its other_top list aside)."""
    return fmt(100 * split["attention_ms"] / max(sum(split[k] for k in SPLIT_COLS), 1e-9), 1)


def kernel_line(model, backend, args) -> str:
    import attention
    p = next(model.parameters())
    dtype = torch.bfloat16 if p.is_cuda else p.dtype  # bf16 weights, or fp32 ones under bf16 autocast
    return attention.describe_backend(backend, p.device, dtype, model.cfg.head_dim, getattr(args, "backward", False))


def diffusers_wan(model):
    """diffusers' own WanTransformer3DModel holding `model`'s weights (wan.to_diffusers), in the dtypes its
    from_pretrained gives: the modules it keeps in fp32 (_keep_in_fp32_modules) in fp32, the rest as `model`."""
    import wan
    from diffusers import WanTransformer3DModel
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed
    conf = {k: v for k, v in wan.diffusers_config(model.cfg).items() if not k.startswith("_")}
    with torch.device("meta"):
        d = WanTransformer3DModel(**conf)
    d.load_state_dict(wan.to_diffusers(model.state_dict(), model.cfg), assign=True)
    with torch.device(model.out.weight.device):  # its RoPE tables are buffers, not in the state dict
        d.rope = WanRotaryPosEmbed(conf["attention_head_dim"], conf["patch_size"], conf["rope_max_seq_len"])
    for name, p in d.named_parameters():
        if set(name.split(".")) & set(d._keep_in_fp32_modules):
            p.data = p.data.float()
    return d.eval()


def bench_diffusers(model, x, text, args) -> tuple[list, torch.Tensor]:
    """Rows for diffusers' forward with the same weights and input, eager (its default attention) and with its
    regional compile (compile_repeated_blocks), and its eager output."""
    d = diffusers_wan(model)
    t = torch.full((x.shape[0],), 0.5, device=x.device)

    def call():
        with torch.no_grad():
            return d(hidden_states=x, timestep=1000 * t, encoder_hidden_states=text, return_dict=False)[0]
    reference = call()
    rows = []
    for how in ("eager", "compile_repeated_blocks"):
        if how != "eager":
            torch._dynamo.reset()
            d.compile_repeated_blocks(fullgraph=True)
        try:
            ms = timeit(call, warmup=2, repeat=args.repeat)
        except Exception as e:  # noqa: BLE001 - a compile failure is a result to report, not a reason to stop
            print(f"diffusers {how} failed: {first_line(e)[:200]}", file=sys.stderr)
            rows.append({"plan": "full", "sparsity%": 0.0, "ms": float("nan"), "backend": f"diffusers {how} (failed)"})
            continue
        split = profile_split(call, top=OTHER_TOP * args.profile)
        rows.append({"plan": "full", "sparsity%": 0.0, "ms": fmt(ms, 1), "backend": f"diffusers {how}",
                     "attention%": attention_share(split),
                     "compiled": how != "eager", **(split if args.profile else {})})
    d = None  # frees its weights before ours run
    torch._dynamo.reset()
    return rows, reference


def bench_model(args):
    """The --model forward (or, with --backward, forward + backward) under full attention and plans of ~45% /
    ~55% sparsity (--sparsity), on each --backend; the share of device time in attention kernels comes from
    profile_split. With --diffusers (a Wan preset), diffusers' own forward with the same weights first, eager and
    compiled, and the difference of our full-attention output from its eager one. Where FA4 runs, full attention on
    cuDNN too (fa4_off), and every row's speed-up over it. With --fp8, the plans once more on the first backend with
    float8 linear layers (DiT.use_fp8), last, since quantising is for good."""
    import attention
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" and not args.backward else torch.float32
    model, x, text, mask = bench_model_inputs(args, dev, dtype)
    T = x.shape[2] // model.cfg.patch_size[0]
    rows, reference = bench_diffusers(model, x, text, args) if args.diffusers else ([], None)
    runs = [(backend, "") for backend in args.backend]
    if dev == "cuda" and attention.flash_available(dev, dtype, model.cfg.head_dim) and not args.diffusers:
        runs.append(("gather", "cudnn"))  # full attention on cuDNN (FA4 off): the line the field compares against
    if args.fp8:
        runs.append((args.backend[0], "fp8"))  # last: quantising is for good
    cudnn_row = None
    for backend, mode in runs:
        model.set_attn_backend(backend)
        if mode == "fp8":
            model.use_fp8()
        first = len(rows)
        label = {"": backend, "cudnn": "cuDNN (FA4 off)", "fp8": f"{backend}, fp8 linear"}[mode]
        with fa4_off() if mode == "cudnn" else contextlib.nullcontext():
            print(f"attention ({label}): {kernel_line(model, backend, args)}")
            for name, (plan, sparsity) in model_plans(T, model.cfg.depth, () if mode == "cudnn" else args.sparsity).items():
                model.set_mask_plan(plan)
                torch._dynamo.reset()
                ms = forward_ms(model, x, text, mask, args)
                split = profile_split(model_call(model, x, text, mask, args), top=OTHER_TOP * args.profile)
                rows.append({"plan": name, "sparsity%": fmt(100 * sparsity, 1), "ms": fmt(ms, 1),
                             "attention%": attention_share(split),
                             "compiled": args.compile, "backend": label, **(split if args.profile else {})})
                rows[-1]["vs_full_same_backend"] = fmt(rows[first]["ms"] / rows[-1]["ms"])
                if reference is not None and plan == ["full"]:
                    out = model_call(model, x, text, mask, args)().float()
                    rows[-1]["max_diff_vs_diffusers"] = fmt((out - reference.float()).abs().max().item(), 4)
                    rows[-1]["rel_l2_vs_diffusers"] = fmt(((out - reference).norm() / reference.float().norm()).item(), 5)
            if mode == "cudnn":
                cudnn_row = rows[-1]
    for r in rows:
        r.update({"model": args.model if not args.tiny else f"tiny {args.model}", "layers": model.cfg.depth,
                  "latents": "x".join(map(str, x.shape[1:])), "tokens": x[0, 0].numel() // math.prod(model.cfg.patch_size)})
        r["speedup"] = fmt(rows[0]["ms"] / r["ms"])  # against the first row: diffusers eager, or full attention
        if cudnn_row is not None:
            r["vs_cudnn_full"] = fmt(cudnn_row["ms"] / r["ms"])
        if args.diffusers:
            r["vs_diffusers_compiled"] = fmt(rows[1]["ms"] / r["ms"])
    split = SPLIT_COLS if args.profile else []
    print(f"ms per {'forward + backward' if args.backward else 'forward'}; speedup against the first row")
    print_table(rows, ["model", "layers", "latents", "tokens", "plan", "sparsity%", "ms", "attention%", "speedup"]
                + (["vs_diffusers_compiled", "max_diff_vs_diffusers", "rel_l2_vs_diffusers"] if args.diffusers else [])
                + ["vs_cudnn_full"] * (cudnn_row is not None) + ["vs_full_same_backend", "compiled", "backend"] + split)
    for r in rows if args.profile else ():
        print(f"{r['plan']} ({r['backend']}): the dearest other kernels, ms (calls): "
              + "; ".join(f"{name} {ms} ({n})" for name, ms, n in r.get("other_top", [])))
    return rows


@contextlib.contextmanager
def fa4_off():
    """FA4 reported absent: full attention (and the dense rewrites) then run on cuDNN SDPA, the line a model's
    speed-up is counted against. Compiled code is made again inside (torch._dynamo.reset per plan)."""
    import attention
    flash_available = attention.flash_available
    attention.flash_available = lambda device, dtype, head_dim: False
    try:
        yield
    finally:
        attention.flash_available = flash_available
        torch._dynamo.reset()


def sampling_loop(model, x, text, mask, steps):
    """-> a function of no arguments that samples one video as sample.py does (Euler, no guidance)."""
    import flow
    with torch.no_grad():
        cond = model.encode_text(text, mask)
    return lambda: flow.euler_sample(lambda z, t: flow.cfg_velocity(model, z, t, cond, cond, 1.0), x, steps)


def host_syncs(fn) -> str:
    """Runs fn() with CUDA's sync debug mode set to error: "none", or the first call that waited on the GPU."""
    if not torch.cuda.is_available():
        return "n/a (cpu)"
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return "none"
    except RuntimeError as e:
        return "sync: " + str(e).splitlines()[0][:60]
    finally:
        torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()


def bench_e2e(args):
    """Seconds per video = forwards x ms per forward (measured at batch 2 for CFG, 1 without), OSP-1.2 shape:
    the base recipe (full attention, on the first --backend), then the student recipes on every --backend (and, with
    --fp8, again on the first with float8 linear layers: last, since quantising is for good)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    model, x, text, mask = bench_model_inputs(args, dev, dtype)
    T = x.shape[2] // model.cfg.patch_size[0]
    plans = model_plans(T, model.cfg.depth, args.sparsity)
    recipes = [("base", args.base_steps, True, "full", args.backend[0])] + [
        ("student", args.student_steps, False, p, b) for b in args.backend for p in plans]
    fp8 = f"{args.backend[0]}, fp8 linear"
    recipes += [("student", args.student_steps, False, p, fp8) for p in plans] if args.fp8 else []
    rows, seconds = [], []  # seconds unrounded: a tiny CPU run's s/video rounds to 0.00
    for i, (name, steps, cfg, plan_name, backend) in enumerate(recipes):
        if backend == fp8 and recipes[i - 1][4] != fp8:
            model.use_fp8()
        model.set_attn_backend(args.backend[0] if backend == fp8 else backend)
        model.set_mask_plan(plans[plan_name][0])
        torch._dynamo.reset()
        ms = forward_ms(model, x, text, mask, args, batch=2 if cfg else 1)
        rows.append({"recipe": name, "steps": steps, "cfg": cfg, "plan": plan_name, "backend": backend,
                     "s/video": fmt(steps * ms / 1e3, 4)})
        seconds.append(steps * ms / 1e3)
        if not cfg:  # the student's whole sampling loop, timed as it runs, and checked for host syncs
            loop = sampling_loop(model.compile_blocks() if args.compile else model, x, text, mask, steps)
            rows[-1]["loop_s"] = fmt(timeit(loop, warmup=1, repeat=max(1, args.repeat // 2)) / 1e3, 2)
            rows[-1]["host_sync"] = host_syncs(loop)
    for r, s in zip(rows, seconds):
        r["speedup"] = fmt(seconds[0] / s)
    print_table(rows, ["recipe", "steps", "cfg", "plan", "backend", "s/video", "speedup", "loop_s", "host_sync"])
    print("paper (OSP-1.2, 29f 720p): MLCD 5.00x, + r=0.1 7.05x, + r=0.4 7.80x")
    return rows


def bench_plans(args):
    """A checkpoint at its own video shape under each plan (and full): all layers' self-attention (random q/k/v
    of the real shape, each layer's mask) and the whole forward, in ms, with speedups over full attention.
    The plans take turns within every repeat, so a slow spell of a shared machine hits them all alike."""
    from model import load_model
    if not args.checkpoint:
        raise UserError("plans mode needs --checkpoint (and --plans)")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    model, meta = load_model(args.checkpoint, dev, dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, *meta["video_shape"], generator=g).to(dev, dtype)
    pt, ph, pw = model.cfg.patch_size
    T, S = x.shape[2] // pt, x.shape[2] // pt * (x.shape[3] // ph) * (x.shape[4] // pw)
    q, k, v = torch.randn(3, args.batch, model.cfg.heads, S, model.cfg.head_dim, generator=g).to(dev, dtype)
    t = torch.full((args.batch,), 0.5, device=dev)
    text, mask = (a.to(dev) for a in model.tokenize(["a red circle moving right"] * args.batch))
    plans = [("full", ["full"])] + [(p, load_plan(p)) for p in args.plans]
    ks = {name: [entry_num_ref(e, T) for e in expand_plan(plan, model.cfg.depth)] for name, plan in plans}
    ms = {name: {"attention": [], "forward": []} for name, _ in plans}
    with torch.inference_mode():
        for i in range(args.repeat + 1):  # round 0 warms up
            for name, plan in plans:
                model.set_mask_plan(plan)
                a = timeit(lambda: [tile_attention(q, k, v, T, num_ref) for num_ref in ks[name]], warmup=0, repeat=1)
                f = timeit(lambda: model(x, t, text, mask), warmup=0, repeat=1)
                if i:
                    ms[name]["attention"].append(a)
                    ms[name]["forward"].append(f)
    rows = [{"plan": name, "sparsity%": fmt(100 * plan_sparsity(ks[name], T), 1),
             "attention_ms": fmt(statistics.median(ms[name]["attention"])),
             "forward_ms": fmt(statistics.median(ms[name]["forward"]), 1)} for name, _ in plans]
    for r in rows:
        r["attention_speedup"] = fmt(rows[0]["attention_ms"] / r["attention_ms"])
        r["forward_speedup"] = fmt(rows[0]["forward_ms"] / r["forward_ms"])
    print(f"{args.checkpoint}: {T} latent frames x {S // T} tokens, batch {args.batch}, {dtype}")
    print_table(rows, ["plan", "sparsity%", "attention_ms", "attention_speedup", "forward_ms", "forward_speedup"])
    return rows


def bench_sp(args):
    """Sequence-parallel scaling: run as a driver (spawns torchrun per GPU count) or, under torchrun, as a worker."""
    import subprocess
    if "RANK" not in os.environ:
        rows = []
        for n in args.gpus:
            out = f"/tmp/bench_sp_{os.getpid()}_{n}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), __file__, "sp",
                   "--model", args.model, "--json", out, "--repeat", str(args.repeat), "--backend", args.backend[0]]
            cmd += (["--frames", str(args.frames)] if args.frames else []) + (["--hw", *map(str, args.hw)] if args.hw else [])
            cmd += [flag for flag, on in (("--tiny", args.tiny), ("--compile", args.compile),
                                          ("--profile", args.profile)) if on]
            cmd += ["--depth", str(args.depth)] if args.depth else []
            cmd += ["--sparsity", *map(str, args.sparsity)]
            subprocess.run(cmd, check=True)
            with open(out) as f:
                rows += json.load(f)["rows"]
        base = {r["plan"]: r["ms/forward"] for r in rows if r["gpus"] == 1}
        for r in rows:
            r["speedup"] = fmt(base[r["plan"]] / r["ms/forward"]) if r["plan"] in base else ""
        split = SPLIT_COLS + ["comm_ms_by_rank"] if args.profile else []
        print_table(rows, ["gpus", "frames", "plan", "ms/forward", "speedup"] + split)
        return rows
    import parallel
    dist = parallel.setup(sp_size=int(os.environ["WORLD_SIZE"]))
    dev, dtype = dist.device, torch.bfloat16 if dist.device.type == "cuda" else torch.float32
    torch.cuda.set_device(dev) if dev.type == "cuda" else None
    model, x, text, mask = bench_model_inputs(args, dev, dtype)
    model.enable_sequence_parallel(dist.sp_group)
    T = x.shape[2] // model.cfg.patch_size[0]
    rows = []
    plans = list(model_plans(T, model.cfg.depth, args.sparsity).items())
    for name, (plan, _) in [plans[0], plans[-1]]:  # full and the sparsest
        model.set_mask_plan(plan)
        parallel.barrier()
        rows.append({"gpus": dist.world, "frames": x.shape[2], "plan": name,
                     "ms/forward": fmt(forward_ms(model, x, text, mask, args), 1)})
        if args.profile:  # rank 0's device time by kind (its NCCL time includes waiting for the others)
            rows[-1].update(profile_split(model_call(model, x, text, mask, args)))
            if dist.world > 1:  # and every rank's NCCL time: the slowest rank waits least
                comm = [None] * dist.world
                torch.distributed.all_gather_object(comm, rows[-1]["comm_ms"])
                rows[-1]["comm_ms_by_rank"] = "/".join(f"{c:.1f}" for c in comm)
    if dist.is_main and args.json:
        with atomic_output(args.json) as tmp, open(tmp, "w") as f:
            json.dump({"rows": rows}, f)
    parallel.cleanup()
    sys.exit(0)


PEAK_BF16_TFLOPS = 989.4  # H100 SXM and H200, dense bf16 tensor cores (NVIDIA's figure), for MFU


INIT_STEPS = 4  # the sampling steps of bench_train's random student (stage 2 calibrates along them)


def forward_flops(cfg, latents: list, text_len: int, plan) -> dict:
    """FLOPs of one sample's forward through a model of cfg, counted by torch's FLOP counter on the meta device
    (nothing is computed): every matmul the model runs, at latents [C, T, H, W] and text_len text tokens, with
    self-attention under `plan` on the exact gather rewrite, which computes only the plan's kept tiles.
    -> {"total": the whole forward, "blocks": its blocks' share (what activation checkpointing recomputes),
    "attention": the blocks' attention kernels (what checkpoint_policy save_attention keeps)}"""
    from torch.utils.flop_counter import FlopCounterMode

    from model import DiT
    with torch.device("meta"):
        model = DiT(cfg, mask_plan=plan, attn_backend="gather")
        x, t = torch.empty(1, *latents), torch.empty(1)
        text = torch.empty(1, text_len, dtype=torch.long) if cfg.reads_captions else torch.empty(1, text_len,
                                                                                                  cfg.text_dim)
        mask = torch.ones(1, text_len, dtype=torch.bool)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t, text, mask)
    blocks = {name: ops for name, ops in counter.get_flop_counts().items()
              if name.startswith("DiT.blocks.") and name.count(".") == 2}
    return {"total": float(counter.get_total_flops()),
            "blocks": float(sum(sum(ops.values()) for ops in blocks.values())),
            # SDPA on the meta device runs its math form: attention is the blocks' bmm (the projections are addmm)
            "attention": float(sum(n for ops in blocks.values() for op, n in ops.items() if "bmm" in str(op)))}


def train_flops(stage: int, cfg, latents: list, text_len: int, plan, checkpointing: str | None) -> dict:
    """One training sample's FLOPs as the field counts them. model (MFU): the student's forward and backward
    (3 forwards) under its plan, plus the frozen models' forwards the objective runs: stage 1's teacher with
    guidance (2) and target (1), stage 3's full-attention teacher (1). hardware (HFU): model, plus what activation
    checkpointing (a model.CHECKPOINT_POLICIES key, or None) recomputes: the blocks' forward, without their
    attention kernels under save_attention, none of their matmuls under save_matmuls (HFU = MFU)."""
    student = forward_flops(cfg, latents, text_len, plan)
    full = student if plan == ["full"] else forward_flops(cfg, latents, text_len, ["full"])
    frozen = {0: 0.0, 1: 3 * full["total"], 3: full["total"]}[stage]
    model = 3 * student["total"] + frozen
    recomputed = {None: 0.0, "full": student["blocks"], "save_attention": student["blocks"] - student["attention"],
                  "save_matmuls": 0.0}
    return {"model": model, "hardware": model + recomputed[checkpointing]}


def train_overrides(args, cfg, shape, stage: int, n: int, run_dir: str, init: list, policy: str | None) -> list:
    """train.py's key=value overrides for one bench run: the model (as a preset plus what differs from it),
    synthetic latents of `shape`, a batch per sequence-parallel group, the timed and profiled steps, no
    checkpoints; stage 2: one prompt and seed through the search."""
    from dataclasses import fields

    from model import model_config
    common = [f"run_dir={run_dir}", "data=synthetic", f"synthetic_shape={json.dumps(shape)}"]
    if stage == 2:
        return common + ["search_prompts=1", "search_seeds=1", init[0]]
    preset = ("wan-tiny" if args.model.startswith("wan") else "osp12") if args.tiny else args.model
    base = model_config(preset)
    model_args = {f.name: getattr(cfg, f.name) for f in fields(cfg) if getattr(cfg, f.name) != getattr(base, f.name)}
    sp = min(args.sp, n)
    return common + [f"model={preset}", f"model_args={json.dumps(model_args)}", f"batch_size={n // sp * args.batch}",
                     f"sp_size={sp}", f"steps={args.repeat + 2 + PROFILED_STEPS * args.profile}", "log_every=1",
                     "save=false", "warmup=1", f"profile={PROFILED_STEPS * args.profile}",
                     f"compile={str(args.compile).lower()}", f"fsdp={str(args.fsdp).lower()}",
                     f"activation_checkpointing={str(policy is not None).lower()}",
                     f"checkpoint_policy={policy or 'full'}", *init]


def run_train(stage: int, n: int, overrides: list) -> list | None:
    """train.py for `stage` on n processes (torchrun for n > 1) -> its log records, or None (the error printed)."""
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    launcher = [sys.executable] if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                                str(n)]
    r = subprocess.run(launcher + [os.path.join(here, "train.py"), os.path.join(here, "configs", f"stage{stage}.yaml"),
                                   *overrides], capture_output=True, text=True)
    if r.returncode:
        print(f"stage {stage} on {n} GPU(s) failed:\n{r.stderr[-2000:]}", file=sys.stderr)
        return None
    run_dir = next(o.split("=", 1)[1] for o in overrides if o.startswith("run_dir="))
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def random_student(path: str, cfg, shape):
    """A random model of cfg saved (bf16) as a stage-1 student to distil from, once."""
    from flow import euler_sampler
    from model import DiT, save_model
    if not os.path.exists(path):
        save_model(path, DiT(cfg), {"kind": "mlcd", "video_shape": shape, "sampler": euler_sampler(INIT_STEPS)},
                   dtype=torch.bfloat16)


def bench_train(args):
    """Training steps of stages 0, 1 and 3 on synthetic latents at the --model's shape (random: speed and memory
    only), each run as `python train.py` (or torchrun over --gpus, with sp_size min(--sp, gpus) and --fsdp), read
    back from its log: s/step, tokens/s, peak GiB, MFU and HFU (train_flops). Stage 2 (one process): the mask
    search over one synthetic prompt and seed, its seconds per probed sampling step and peak GiB."""
    import tempfile

    from data import SYNTHETIC_TEXT_LEN
    cfg = bench_config(args.tiny, args.depth, args.model)
    shape = latent_shape(args, cfg)
    T, tokens = shape[1], math.prod(n // p for n, p in zip(shape[1:], cfg.patch_size))
    work = tempfile.mkdtemp(prefix="bench_train_")
    plan, sparsity = plan_for_sparsity(T, cfg.depth, args.sparsity[-1]) if args.sparsity else (["full"], 0.0)
    save_plan(plan_file := os.path.join(work, "plan.yaml"), plan, T)  # stage 3's
    policies = [None] if args.checkpointing is None else args.checkpointing or ["full"]
    rows = []
    for stage in args.stages:
        init = []
        if stage:
            random_student(init_path := os.path.join(work, "init.safetensors"), cfg, shape)
            init = [f"init={init_path}", f"teacher={init_path}"] + ([f"kd_plan={plan_file}"] if stage == 3 else [])
        runs = [(n, policy) for n in (args.gpus if torch.cuda.is_available() and stage != 2 else [1])
                for policy in (policies if stage != 2 else [None])]
        for n, policy in runs:
            run_dir = os.path.join(work, f"stage{stage}-{n}-{policy}")
            log = run_train(stage, n, train_overrides(args, cfg, shape, stage, n, run_dir, init, policy))
            if log is None:
                continue
            if stage == 2:  # each threshold's record carries the calibration's cost; s/step: per sampling step
                rows.append({"stage": 2, "gpus": 1, "sp": 1, "plan": "search",
                             "s/step": fmt(log[0]["seconds"] / INIT_STEPS, 3),
                             "tokens/s": fmt(tokens * INIT_STEPS / log[0]["seconds"], 0),
                             "peak_GiB": fmt(log[0].get("mem_gb", 0.0), 1), "MFU%": "n/a", "HFU%": "n/a"})
                continue
            timed = log[2:2 + args.repeat]  # the first two steps compile and warm up
            s_step = statistics.median(1 / rec["it_s"] for rec in timed)
            sp = min(args.sp, n)
            samples = n // sp * args.batch  # the global batch (an SP group's ranks share their samples' tokens)
            flops = train_flops(stage, cfg, shape, SYNTHETIC_TEXT_LEN, plan if stage == 3 else ["full"], policy)
            utilisation = {f"{name}%": fmt(100 * flops[kind] * samples / s_step / 1e12 / PEAK_BF16_TFLOPS / n, 1)
                           if torch.cuda.is_available() else "n/a (cpu)"
                           for name, kind in (("MFU", "model"), ("HFU", "hardware"))}
            rows.append({"stage": stage, "gpus": n, "sp": sp, "plan": f"{100 * sparsity:.0f}%" if stage == 3 else
                         "full", "recompute": policy or "none",
                         "s/step": fmt(s_step, 3), "tokens/s": fmt(samples * tokens / s_step, 0),
                         "peak_GiB": fmt(max(rec.get("mem_gb", 0.0) for rec in timed), 1), **utilisation,
                         **(trace_split(os.path.join(run_dir, "trace-rank0.json")) if args.profile else {})})
    for r in rows:  # throughput against the same stage and policy on one GPU
        one = [x for x in rows if x["stage"] == r["stage"] and x.get("recompute") == r.get("recompute")
               and x["gpus"] == 1]
        r["scaling"] = fmt(r["tokens/s"] / one[0]["tokens/s"], 2) if one else ""
    print(f"synthetic latents {shape} (random: speed and memory only), {tokens} tokens per sample, batch "
          f"{args.batch} per sequence-parallel group, compile {args.compile}; recompute: activation "
          "checkpointing's policy. MFU: model FLOPs (the student's forward and backward under its plan, and the frozen forwards: "
          "stage 1's guided teacher and target, stage 3's teacher), counted by torch's FLOP counter "
          "(bench.train_flops); HFU adds what checkpointing recomputes; both against the bf16 peak")
    print_table(rows, ["stage", "gpus", "sp", "plan", "recompute", "s/step", "tokens/s", "peak_GiB",
                       "MFU%", "HFU%", "scaling"]
                + (["step_ms"] + SPLIT_COLS + TIMELINE_COLS if args.profile else []))
    return rows


PROFILED_STEPS = 2  # bench.py train --profile: traced after the timed steps


def _covered(intervals) -> float:
    """The length of the union of (start, end) intervals."""
    total, reach = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > reach:
            total += b - max(a, reach)
            reach = b
    return total


TIMELINE_COLS = ["busy_ms", "exposed_comm_ms", "idle_ms"]  # trace_split's timeline keys


def trace_split(path) -> dict:
    """A train.py trace (profile: N) -> rank 0's mean step: wall ms; GPU kernel ms by kind (comm, attention,
    matmul, other: kernels on different streams overlap, so the kinds may add up to more than the wall time);
    and the step's timeline: busy (some kernel runs), exposed comm (only communication kernels run: NCCL
    kernels also spin while they wait for another rank) and idle (no kernel runs: the GPU waits for the CPU).
    wall = busy + idle (idle is clamped at 0: a step's kernels can run past its CPU span). On a CPU only the
    wall time."""
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    steps = [e["dur"] for e in events if e.get("cat") == "user_annotation"  # the GPU's copies are gpu_user_annotation
             and e.get("name", "").startswith("ProfilerStep#")]
    if not steps:
        raise ValueError(f"{path} holds no profiled step")
    n, wall = len(steps), sum(steps) / len(steps) / 1e3
    kinds = dict.fromkeys(SPLIT_COLS, 0.0)
    spans = {"comm": [], "compute": []}
    for e in events:
        if e.get("cat") == "kernel":
            kind = kernel_kind(e["name"])
            kinds[f"{kind}_ms"] += e["dur"] / 1e3 / n
            spans["comm" if kind == "comm" else "compute"].append((e["ts"], e["ts"] + e["dur"]))
    if not torch.cuda.is_available():
        return {"step_ms": fmt(wall, 1), **dict.fromkeys(SPLIT_COLS + TIMELINE_COLS, "n/a (cpu)")}
    busy = _covered(spans["comm"] + spans["compute"]) / 1e3 / n
    exposed = busy - _covered(spans["compute"]) / 1e3 / n
    return {"step_ms": fmt(wall, 1), **{k: fmt(v, 1) for k, v in kinds.items()},
            "busy_ms": fmt(busy, 1), "exposed_comm_ms": fmt(exposed, 1), "idle_ms": fmt(max(wall - busy, 0.0), 1)}


@entry_point
def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=["attention", "model", "e2e", "sp", "plans", "train"])
    p.add_argument("--tiny", action="store_true", help="tiny shapes: a smoke run that works on CPU")
    p.add_argument("--model", default="osp12", choices=["osp12", "wan2.1-1.3b", "wan2.1-14b", "wan2.2-5b"],
                   help="model/e2e/sp/train: the preset, with random weights")
    p.add_argument("--frames", type=positive_int, default=None,
                   help="latent frames for model/e2e/sp/train (osp12: 8 = 29f (default), 24 = 93f; Wan: 21 = 81f)")
    p.add_argument("--hw", type=positive_int, nargs=2, default=None,
                   help="latent height and width (default: osp12 90 160 = 720p; Wan: the preset's video)")
    p.add_argument("--diffusers", action="store_true",
                   help="model, Wan presets: diffusers' own forward too (eager and compiled), and the difference")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (model/e2e/sp)")
    p.add_argument("--profile", action="store_true",
                   help="attention, model, sp, train: split one call's (train: step's) device time by kind")
    p.add_argument("--backend", default=["auto"], nargs="+", choices=BACKENDS,
                   help="model/e2e: the attention backends to compare in one run (attention.py); sp: the first")
    p.add_argument("--backward", action="store_true", help="attention, model: time forward + backward")
    p.add_argument("--fp8", action="store_true", help="model, e2e: the plans again with float8 linear layers "
                   "(DiT.use_fp8, torchao; a GPU of sm89 or newer), after the bf16 rows")
    p.add_argument("--stages", type=int, nargs="*", default=[0, 1, 3], choices=[0, 1, 2, 3], help="train: the stages")
    p.add_argument("--sp", type=positive_int, default=1, help="train: sp_size (at most the GPU count of a run)")
    p.add_argument("--fsdp", action="store_true", help="train: fsdp=true (FSDP2 over every rank)")
    p.add_argument("--checkpointing", nargs="*", default=None, choices=list(CHECKPOINT_POLICIES),
                   help="train: activation checkpointing under each policy given (none given: full)")
    p.add_argument("--skip-triton", action="store_true", help="attention: leave out flex on its Triton kernel")
    p.add_argument("--latent-frames", type=positive_int, nargs="*", default=[8, 24],
                   help="attention: 8 (29f) and/or 24 (93f)")
    p.add_argument("--depth", type=positive_int, default=None, help="model/e2e/sp: cut osp12 to this many layers")
    p.add_argument("--sparsity", type=fraction, nargs="*", default=[0.45, 0.55],
                   help="model/e2e/sp: the mean sparsities of the plans timed beside full attention")
    p.add_argument("--repeat", type=positive_int, default=5)
    p.add_argument("--base-steps", type=positive_int, default=100)
    p.add_argument("--student-steps", type=positive_int, default=4, help="the stage-1 student's step count")
    p.add_argument("--gpus", type=positive_int, nargs="*", default=[1, 2, 4], help="process counts for sp")
    p.add_argument("--checkpoint", default=None, help="plans: a trained checkpoint")
    p.add_argument("--plans", nargs="*", default=[], help="plans: stage-2 plan files")
    p.add_argument("--batch", type=positive_int, default=1, help="plans: videos per forward")
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)
    if args.json:
        check_output_path(args.json)
    if args.fp8 and (args.mode not in ("model", "e2e") or args.backward):
        raise UserError("--fp8 times sampling forwards (modes model and e2e, without --backward)")
    if args.fp8 and not torch.cuda.is_available():
        raise UserError("--fp8 needs a GPU with float8 matmuls (sm89 or newer)")
    if args.mode == "sp" and "RANK" not in os.environ:  # the process counts, checked before any is started
        from parallel import check_heads
        for n in args.gpus:
            check_heads(bench_config(args.tiny, None, args.model).heads, n, "--gpus")
        visible = torch.cuda.device_count()
        if torch.cuda.is_available() and max(args.gpus) > visible:
            raise UserError(f"--gpus {max(args.gpus)}: only {visible} GPU(s) are visible")
    info = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "date": time.strftime("%Y-%m-%d")}
    print(f"# {args.mode} on {info['device']}, torch {info['torch']}, {info['date']}")
    rows = {"attention": bench_attention, "model": bench_model, "e2e": bench_e2e, "sp": bench_sp,
            "plans": bench_plans, "train": bench_train}[args.mode](args)
    if args.json:
        with atomic_output(args.json) as tmp, open(tmp, "w") as f:
            json.dump({**info, "mode": args.mode, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
