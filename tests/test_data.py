"""Tests for data.py and evaluate.py (CPU, a few seconds; fidelity against the shipped model: about 10 s).

Run:  cd /work/main && python -m pytest tests/test_data.py -q
Leaves out: GPU rendering (render is device-agnostic torch; run `python data.py --device cuda` there).
"""
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so plain `pytest` finds the repo modules

from data import (COLOURS, DIRECTIONS, SHAPES, MovingShapes, ShardDataset, captions, collate,
                  moving_shapes_batch, positions, render, sample_params, to_uint8, validation_prompts, write_shard)
from evaluate import evaluate_model, judge, largest_blob, parse_caption, score

ROOT = str(Path(__file__).resolve().parents[1])

RED, GREEN = torch.tensor([1.0, -1, -1]), torch.tensor([-1.0, 1, -1])


def _blank(t=16, s=32):
    return torch.full((3, t, s, s), -1.0)


def test_deterministic_and_splits():
    a, ca = moving_shapes_batch(8, 123)
    b, cb = moving_shapes_batch(8, torch.Generator().manual_seed(123))
    assert torch.equal(a, b) and ca == cb
    assert not torch.equal(a, moving_shapes_batch(8, 124)[0])
    train1, train2 = iter(MovingShapes(8, seed=0)), iter(MovingShapes(8, seed=0))
    for _ in range(2):
        (x, cx), (y, cy) = next(train1), next(train2)
        assert torch.equal(x, y) and cx == cy
    val, val_caps = next(iter(MovingShapes(8, seed=0, split="val")))
    assert not torch.equal(val, next(iter(MovingShapes(8, seed=0)))[0])
    assert torch.equal(val, moving_shapes_batch(8, 10**9)[0])  # documented val seed offset
    assert val.shape == (8, 3, 16, 32, 32) and val.dtype == torch.float32
    with pytest.raises(ValueError):
        MovingShapes(8, split="test")


def test_video_invariants():
    n, t, s = 512, 16, 32
    params = sample_params(n, torch.Generator().manual_seed(1))
    videos, caps = render(params, t, s), captions(params)
    pos = positions(params, t)  # [n, T, 2] top-left corner
    size = params["size"][:, None, None]
    assert ((params["size"] >= 0.25) & (params["size"] <= 0.40)).all()
    assert (pos >= -1e-6).all() and (pos + size <= 1 + 1e-6).all()  # bbox inside every frame
    shift = pos[:, -1] - pos[:, 0]  # [n, 2]
    assert (shift.abs().amax(1) >= 1 / 3 - 1e-6).all() and (shift.abs().amin(1) == 0).all()
    steps = pos[:, 1:] - pos[:, :-1]  # [n, T-1, 2]
    assert torch.allclose(steps, steps[:, :1].expand_as(steps), atol=1e-5)  # constant speed
    for video, cap in zip(videos, caps):
        colour, shape, direction = parse_caption(cap).values()
        assert cap == f"a {colour} {shape} moving {direction}"
        rgb = torch.tensor(COLOURS[colour]) / 127.5 - 1
        lit = (video > -1).any(0)  # [T, H, W]
        assert lit.flatten(1).any(1).all()  # object visible in every frame
        pixels = video.permute(1, 2, 3, 0)[lit]  # [P, 3]
        assert torch.equal(pixels, rgb.expand_as(pixels))  # exactly one colour, the caption's
        assert ((video == -1) | (video == 1)).all()
        width = lit.any(1).sum(1).float()  # [T] lit columns per frame
        assert (width >= 0.25 * s - 1).all() and (width <= 0.40 * s + 1).all()


def test_validation_prompts_balanced():
    prompts = validation_prompts(84, seed=3)
    parsed = [tuple(parse_caption(p).values()) for p in prompts]
    assert len(set(parsed)) == 84 and None not in sum(parsed, ())
    assert validation_prompts(64, seed=3) == prompts[:64] and validation_prompts(64, seed=4) != prompts[:64]
    for i, names in enumerate((COLOURS, SHAPES, DIRECTIONS)):
        counts = [sum(p[i] == name for p in parsed[:64]) for name in names]
        assert max(counts) - min(counts) <= 1


def test_judge_scores_dataset():  # acceptance criterion: ground-truth videos score ~1.0
    videos, prompts = next(iter(MovingShapes(256, seed=0, split="val")))
    result = score(videos, prompts)
    assert result["n"] == 256
    for k in ("colour", "shape", "direction", "overall"):
        assert result[k] >= 0.98, result
    assert 0 <= result["area_spread"] < 0.15


def test_judge_hand_drawn():
    video = _blank()
    for t in range(16):  # 10x10 red square moving right by 1 px per frame
        video[:, t, 10:20, 2 + t:12 + t] = RED[:, None, None]
    assert judge(video) == dict(colour="red", shape="square", direction="right", area_spread=0.0)
    assert judge(video.flip(1))["direction"] == "left"  # frames reversed
    assert judge(video.transpose(2, 3))["direction"] == "down"
    assert judge(video[:, torch.tensor([0] * 16)])["direction"] is None  # no motion

    tri = _blank()
    for t in range(16):  # green upward triangle, height 12 and base 12, moving up 1 px per frame
        top = 18 - t
        for row in range(12):
            half = (row + 1) // 2
            tri[:, t, top + row, 16 - half:16 + half + (row % 2 == 0)] = GREEN[:, None]
    got = judge(tri)
    assert (got["colour"], got["shape"], got["direction"]) == ("green", "triangle", "up")
    assert judge(tri.flip(2))["shape"] != "triangle"  # upside down is no upward triangle

    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    circ = _blank()
    for t in range(16):  # white disc of radius 5.5 moving left
        disc = (yy - 15.5) ** 2 + (xx - (25 - t)) ** 2 <= 5.5**2
        circ[:, t, disc] = 1.0
    got = judge(circ)
    assert (got["colour"], got["shape"], got["direction"]) == ("white", "circle", "left")


def test_judge_robust():
    empty = judge(_blank())
    assert empty == dict(colour=None, shape=None, direction=None, area_spread=1.0)
    video = _blank()
    video[:, 3, 5:15, 5:15] = RED[:, None, None]  # one lit frame: no direction, no crash, no NaN
    video[:, 3, 30, 30] = GREEN  # a stray pixel is ignored by the largest-blob filter
    got = judge(video)
    assert (got["colour"], got["shape"], got["direction"]) == ("red", "square", None)
    assert math.isfinite(got["area_spread"]) and got["area_spread"] > 1
    noise = torch.rand(3, 16, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert math.isfinite(judge(noise)["area_spread"])
    mask = torch.zeros(1, 6, 6, dtype=torch.bool)
    mask[0, 0, 0] = True
    mask[0, 3:5, 3:6] = True
    assert largest_blob(mask).sum() == 6 and not largest_blob(mask)[0, 0, 0]


def test_score_and_evaluate_model():
    assert parse_caption("A Red square, moving LEFT") == dict(colour="red", shape="square", direction="left")
    assert parse_caption("nothing") == dict(colour=None, shape=None, direction=None)
    videos, prompts = moving_shapes_batch(12, 5)
    table = dict(zip(prompts, videos))
    result = evaluate_model(lambda ps: torch.stack([table[p] for p in ps]), prompts, batch_size=5)
    assert result["overall"] == 1.0 and result["n"] == 12
    wrong = score(videos.flip(2), prompts)  # time-reversed videos: every direction wrong
    assert wrong["direction"] == 0.0 and wrong["overall"] == 0.0 and wrong["colour"] == 1.0


def test_uint8_round_trip():
    videos, _ = moving_shapes_batch(2, 0)
    frames = to_uint8(videos[0])
    assert frames.shape == (16, 32, 32, 3) and frames.dtype == torch.uint8
    assert torch.equal(frames.permute(3, 0, 1, 2).float() / 127.5 - 1, videos[0])  # the colours, exactly


def test_shards_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    lat = [torch.randn(n, 4, 3, 8, 8, generator=g) for n in (3, 2)]
    caps = [["a", "b", "c"], ["d", "e"]]
    for i in range(2):
        write_shard(tmp_path / "caps" / f"shard-{i:05d}.safetensors", lat[i], captions=caps[i])
    ds = ShardDataset(str(tmp_path / "caps"))
    assert len(ds) == 5 and set(ds[0]) == {"video", "caption"}
    assert torch.equal(torch.stack([ds[i]["video"] for i in range(5)]), torch.cat(lat))
    assert [ds[i]["caption"] for i in range(5)] == sum(caps, [])
    batch = collate([ds[i] for i in (4, 0)])
    assert batch["caption"] == ["e", "a"] and torch.equal(batch["video"], torch.stack([lat[1][1], lat[0][0]]))

    emb = [torch.randn(n, 7, 16, generator=g).half() for n in (3, 2)]
    mask = [torch.rand(n, 7, generator=g) > 0.5 for n in (3, 2)]
    for i in range(2):
        write_shard(str(tmp_path / "emb" / f"shard-{i:05d}.safetensors"), lat[i], text_emb=emb[i], text_mask=mask[i])
    ds = ShardDataset(str(tmp_path / "emb"))
    assert set(ds[0]) == {"video", "text_emb", "text_mask"}
    batch = collate([ds[i] for i in range(5)])
    assert torch.equal(batch["text_emb"], torch.cat(emb)) and torch.equal(batch["text_mask"], torch.cat(mask))
    assert batch["text_mask"].dtype == torch.bool

    with pytest.raises(ValueError, match="missing"):
        ShardDataset(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        ShardDataset(str(tmp_path / "empty"))
    write_shard(str(tmp_path / "caps" / "shard-00002.safetensors"), torch.randn(2, 4, 3, 4, 4), captions=["f", "g"])
    with pytest.raises(ValueError, match="disagrees"):
        ShardDataset(str(tmp_path / "caps"))
    with pytest.raises(ValueError):
        write_shard(str(tmp_path / "bad.safetensors"), lat[0], captions=["only one"])


def test_psnr_against_a_known_solution():
    """A video off its reference by a constant d on the [-1, 1] scale is off by d / 2 on [0, 1]: PSNR
    = 10 log10(4 / d^2); pixels beyond [-1, 1] count as clamped; overall PSNR pools every pixel (10 log10(1 / the
    mean MSE)); equal videos are at the cap."""
    from evaluate import PSNR_CAP, fidelity, psnr
    videos = moving_shapes_batch(3, 1)[0] / 2  # in [-0.5, 0.5]
    for d in (0.1, 0.5):
        assert psnr(videos + d, videos) == pytest.approx(torch.full((3,), 10 * math.log10(4 / d**2)), rel=1e-5)
    assert torch.equal(psnr(videos * 4, videos), psnr((videos * 4).clamp(-1, 1), videos))
    mixed = torch.cat([videos[:1] + 0.5, videos[1:]])  # one video off by 0.5, two equal
    result = fidelity(mixed, videos)
    assert result["psnr"] == pytest.approx(10 * math.log10(3 * 4 / 0.5**2), rel=1e-5)
    assert result["psnr_per_video"][1:] == [PSNR_CAP, PSNR_CAP]
    same = fidelity(videos, videos)
    assert same["psnr"] == PSNR_CAP and same["ssim"] == pytest.approx(1.0, abs=1e-6)


def _ssim_by_windows(x, y):
    """SSIM of two [H, W] images in [0, 1], window by window: each valid 11 x 11 window's Gaussian-weighted
    statistics computed directly in float64 (no convolution), the SSIM map averaged."""
    g = torch.exp(-(torch.arange(11.0, dtype=torch.float64) - 5) ** 2 / (2 * 1.5**2))
    w = g[:, None] * g[None, :] / g.sum() ** 2
    values = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            a, b = x[i:i + 11, j:j + 11].double(), y[i:i + 11, j:j + 11].double()
            ma, mb = (w * a).sum(), (w * b).sum()
            va, vb, cab = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum(), (w * (a - ma) * (b - mb)).sum()
            values.append((2 * ma * mb + 1e-4) * (2 * cab + 9e-4) / ((ma**2 + mb**2 + 1e-4) * (va + vb + 9e-4)))
    return torch.stack(values).mean().item()


def test_ssim_against_a_window_by_window_computation():
    from evaluate import ssim
    g = torch.Generator().manual_seed(0)
    videos, _ = moving_shapes_batch(1, 2, num_frames=2, size=16)
    other = (videos + 0.3 * torch.randn(videos.shape, generator=g)).clamp(-1, 1)
    expected = sum(_ssim_by_windows((other[0, c, t] + 1) / 2, (videos[0, c, t] + 1) / 2)
                   for c in range(3) for t in range(2)) / 6
    assert ssim(other, videos).item() == pytest.approx(expected, abs=1e-5)
    assert 0 < expected < 0.9  # the noise costs structure
    with pytest.raises(ValueError, match="at least 11 x 11"):
        ssim(videos[..., :8, :8], videos[..., :8, :8])


def test_evaluate_reports_fidelity_against_a_reference_on_the_same_noise(tmp_path):
    """evaluate.py --reference: the model sampled against itself is identical (same prompts, seeds and noise: PSNR
    at the cap, SSIM 1); under a sparse plan (no retraining) it drifts from its full-attention self, and each row
    gives the sparsity it ran at (the plan file's mean_sparsity, written by the search)."""
    import evaluate
    mlcd = os.path.join(ROOT, "checkpoints", "mlcd.safetensors")
    out = tmp_path / "rows.jsonl"
    common = ["--checkpoint", mlcd, "--reference", mlcd, "--n", "3", "--batch-size", "2", "--json", str(out)]
    evaluate.main(common)
    evaluate.main(common + ["--plan", os.path.join(ROOT, "configs", "plan-r0.4.yaml")])
    same, sparse = (json.loads(line) for line in out.read_text().splitlines())
    assert same["psnr"] == evaluate.PSNR_CAP and same["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert 5 < sparse["psnr"] < evaluate.PSNR_CAP and 0 < sparse["ssim"] < 1
    assert len(sparse["psnr_per_video"]) == 3 and sparse["reference"] == mlcd
    with open(os.path.join(ROOT, "configs", "plan-r0.4.yaml")) as f:
        written = yaml.safe_load(f)["mean_sparsity"]  # by the search that made the plan
    assert same["sparsity%"] == 0 and sparse["sparsity%"] == pytest.approx(100 * written, abs=0.05)


def test_evaluate_under_several_seeds_repeats_each_alone_and_adds_their_mean_and_spread(tmp_path):
    """evaluate.py --seed 1 2: the two rows are what --seed 1 and --seed 2 give alone (own prompts and noise), and
    a last row holds their means and the overall score's spread, computed here from the two rows."""
    import evaluate
    mlcd = os.path.join(ROOT, "checkpoints", "mlcd.safetensors")
    common = ["--checkpoint", mlcd, "--n", "3", "--batch-size", "2", "--steps", "2"]
    rows = lambda path: [json.loads(line) for line in path.read_text().splitlines()]  # noqa: E731
    evaluate.main(common + ["--seed", "1", "2", "--json", str(tmp_path / "both.jsonl")])
    for seed in (1, 2):
        evaluate.main(common + ["--seed", str(seed), "--json", str(tmp_path / "alone.jsonl")])
    both, alone = rows(tmp_path / "both.jsonl"), rows(tmp_path / "alone.jsonl")
    timing = lambda r: {k: v for k, v in r.items() if not k.startswith("s_per_video")}  # noqa: E731
    assert [timing(r) for r in both[:2]] == [timing(r) for r in alone] and [r["seed"] for r in alone] == [1, 2]
    mean = both[2]
    assert mean["seed"] == "mean" and mean["seeds"] == [1, 2] and mean["steps"] == 2
    for k in ("colour", "shape", "direction", "overall"):
        assert mean[k] == pytest.approx((alone[0][k] + alone[1][k]) / 2)
    assert mean["overall_spread"] == pytest.approx(abs(alone[0]["overall"] - alone[1]["overall"]))


def test_bounce_paths_turn_at_the_walls():
    """bounce_path against a step-by-step simulation: move, and where the object passes a wall, mirror it back."""
    from data import bounce_path
    g = torch.Generator().manual_seed(0)
    start, speed = torch.rand(50, generator=g) * 0.7, 0.02 + torch.rand(50, generator=g) * 0.1
    span = torch.full((50,), 0.7)
    speed = torch.where(torch.rand(50, generator=g) < 0.5, speed, -speed)
    path = bounce_path(start, speed, span, torch.arange(40.0))
    x, v = start.double().clone(), speed.double().clone()
    for t in range(40):
        assert torch.allclose(path[:, t].double(), x, atol=1e-5)
        x = x + v
        over, under = x > 0.7, x < 0
        x = torch.where(over, 1.4 - x, torch.where(under, -x, x))
        v = torch.where(over | under, -v, v)


def test_the_bounce_judge_scores_ground_truth_at_one_and_broken_time_near_chance():
    """Rendered bouncing shapes score 1.000 on every attribute; the same videos with their frames shuffled or
    frozen at frame 0 score 0 overall (colour and shape are per-frame facts, what breaks is the motion), another
    video's captions score near chance, captions with every direction reversed score near 0 on direction and
    bounce, and objects that vanish after frame 8 are not there."""
    from data import DOMAINS, bounce_batch, bounce_validation_prompts
    from evaluate import judge_bounce, score_bounce
    videos, prompts = bounce_batch(96, 3)
    assert score_bounce(videos, prompts) == {"colour": 1.0, "shape": 1.0, "direction": 1.0, "bounce": 1.0,
                                             "overall": 1.0, "n": 96}
    g = torch.Generator().manual_seed(0)
    shuffled = torch.stack([v[:, torch.randperm(v.shape[1], generator=g)] for v in videos])
    for broken in (shuffled, videos[:, :, :1].expand_as(videos)):
        result = score_bounce(broken, prompts)
        assert result["overall"] < 0.05 and result["bounce"] < 0.05, result
    assert score_bounce(videos, prompts[1:] + prompts[:1])["overall"] < 0.05
    # score_bounce finds the objects of many videos at once; one video judged alone gets the same verdicts
    noisy = (videos[:8] + 0.8 * torch.randn(videos[:8].shape, generator=g)).clamp(-1, 1)
    per_video = [judge_bounce(v, p) for v, p in zip(noisy, prompts)]
    alone = {k: sum(o[k] for r in per_video for o in r) / 16 for k in ("colour", "shape", "direction", "bounce")}
    alone.update(overall=sum(all(all(o.values()) for o in r) for r in per_video) / 8, n=8)
    assert score_bounce(noisy, prompts[:8]) == alone and 0 < alone["shape"] < 1, alone
    with pytest.raises(ValueError, match="8 videos but 7 prompts"):
        score_bounce(noisy, prompts[:7])
    swap = {"left": "right", "right": "left", "up": "down", "down": "up"}
    mirrored = score_bounce(videos, [" ".join(swap.get(w, w) for w in p.split()) for p in prompts])
    assert mirrored["direction"] < 0.1 and mirrored["bounce"] < 0.1, mirrored  # motion drawn the other way
    gone = videos.clone()
    gone[:, :, 8:] = -1  # both objects vanish after frame 8
    assert score_bounce(gone, prompts)["colour"] == 0.0
    longest = len(DOMAINS["bounce"].longest_caption)
    assert max(len(p) for p in prompts + bounce_validation_prompts(420)) <= longest
    assert len({p.split(" and ")[1].split()[1] for p in bounce_validation_prompts(84)}) == 7  # every colour second
