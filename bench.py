"""Speed at Open-Sora-Plan 1.2 scale: the attention kernels alone and the whole model forward.

    python bench.py attention              # 29 and 93 frames at 720p, 24 x 96 heads, bf16 (GPU)
    python bench.py model                  # osp12 forward, full plan vs sparse plans (GPU)
    python bench.py attention --tiny       # a CPU smoke run of the same code, tiny shapes
    python bench.py model --tiny --json out.json

Each mode prints a table and can write JSON. Timings are medians over repeats after warm-up, measured with
CUDA events on GPU; speedups are ratios within one process on one card. Leaves out: training speed.
"""
import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import flex_attention

from attention import density, tile_attention, tile_block_mask, tile_dense_mask

SPEC_MASKS = {8: [4, 3, 2, 1], 24: [12, 8, 6, 4, 3]}  # SPEC section 1, Table 1
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

def bench_attention(args):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    H, D, S = (24, 96, 3600) if not args.tiny else (2, 32, 96)
    shapes = SPEC_MASKS if not args.tiny else {4: [2, 1]}
    flex_dense = torch.compile(flex_attention, dynamic=False)
    rows = []
    for T, ks in shapes.items():
        N = T * S
        q, k, v = (torch.randn(1, H, N, D, device=dev, dtype=dtype) for _ in range(3))
        flops = 4 * N * N * D * H  # QK^T and PV, dense
        dense = {}
        if dev == "cuda":
            for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
                try:
                    with sdpa_kernel([be]):
                        dense[name] = timeit(lambda: F.scaled_dot_product_attention(q, k, v))
                except RuntimeError as e:
                    print(f"{name} unavailable: {str(e)[:80]}", file=sys.stderr)
        dense["sdpa_default"] = timeit(lambda: F.scaled_dot_product_attention(q, k, v))
        dense["flex_dense"] = timeit(lambda: flex_dense(q, k, v))
        best = min(dense.values())
        for name, ms in dense.items():
            rows.append({"frames": FRAMES.get(T, T), "tokens": N, "kernel": name, "mask": "full", "ms": fmt(ms),
                         "sparsity%": 0.0, "speedup": fmt(best / ms), "TFLOP/s": fmt(flops / ms / 1e9, 1)})
        for kk in ks:
            bm = tile_block_mask(T, S, kk, dev)
            dens = density(T, kk)
            # correctness on a slice of heads: against SDPA with the dense boolean mask
            sl = slice(0, 1)
            ref = F.scaled_dot_product_attention(q[:, sl].float(), k[:, sl].float(), v[:, sl].float(),
                                                 attn_mask=tile_dense_mask(T, S, kk, dev)) if N <= 30000 else None
            for backend in ("flex", "tile"):
                fn = lambda: tile_attention(q, k, v, T, kk, backend)
                ms = timeit(fn)
                err = (fn()[:, sl].float() - ref).abs().max().item() if ref is not None else float("nan")
                rows.append({"frames": FRAMES.get(T, T), "tokens": N, "kernel": backend, "mask": f"{kk}:{T - kk}",
                             "ms": fmt(ms), "sparsity%": fmt(bm.sparsity()), "speedup": fmt(best / ms),
                             "ideal": fmt(1 / dens), "%ideal": fmt(100 * best / ms * dens, 1),
                             "line_ms": fmt(best * dens), "TFLOP/s": fmt(flops * dens / ms / 1e9, 1),
                             "max_err": f"{err:.1e}"})
            del ref
    print_table(rows, ["frames", "tokens", "kernel", "mask", "ms", "sparsity%", "speedup", "ideal", "%ideal",
                       "line_ms", "TFLOP/s", "max_err"])
    return rows


def bench_model(args):
    from model import DiT, model_config
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    if args.tiny:
        cfg, latent, text_len = model_config("osp12", depth=2, hidden=64, heads=2, text_dim=32), (4, 4, 8, 8), 8
    else:
        cfg, latent = model_config("osp12"), (4, args.frames, 90, 160)
        text_len = 300
    T = latent[1] // cfg.patch_size[0]
    with torch.device(dev):
        model = DiT(cfg).to(dtype).eval()
    x = torch.randn(1, *latent, device=dev, dtype=dtype)
    t = torch.rand(1, device=dev)
    text = torch.randn(1, text_len, cfg.text_dim, device=dev, dtype=dtype)
    mask = torch.ones(1, text_len, dtype=torch.bool, device=dev)
    plans = {"full": ["full"], **{f"all {k}:{T - k}": [k] for k in (SPEC_MASKS.get(T, [1])[-1:])}}
    rows = []
    for name, plan in plans.items():
        model.set_mask_plan(plan)
        with torch.no_grad():
            ms = timeit(lambda: model(x, t, text, mask), warmup=2, repeat=5)
        rows.append({"model": "osp12" if not args.tiny else "tiny-osp", "frames": latent[1], "plan": name,
                     "ms/forward": fmt(ms, 1)})
    base = rows[0]["ms/forward"]
    for r in rows:
        r["speedup"] = fmt(base / r["ms/forward"])
    print_table(rows, ["model", "frames", "plan", "ms/forward", "speedup"])
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=["attention", "model"])
    p.add_argument("--tiny", action="store_true", help="tiny shapes: a smoke run that works on CPU")
    p.add_argument("--frames", type=int, default=8, help="latent frames for `model` (8 = 29f, 24 = 93f)")
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)
    info = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "date": time.strftime("%Y-%m-%d")}
    print(f"# {args.mode} on {info['device']}, torch {info['torch']}, {info['date']}")
    rows = {"attention": bench_attention, "model": bench_model}[args.mode](args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**info, "mode": args.mode, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
