"""Demo: slice a generated high-resolution image and encode it with a random-weight model.

    python -m uhd_jax.demo                       # tiny config, 1344x1344 image, 16x mode
    python -m uhd_jax.demo --mode 4x --height 900 --width 2400
    python -m uhd_jax.demo --config reference    # the real MiniCPM-V 4.6 architecture (slow on CPU)

Prints the views and their patch grids, token counts per stage, FLOPs per stage and timings.
No downloads: weights are random, the image is generated.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from PIL import Image

from uhd_jax.config import reference_config, tiny_config
from uhd_jax.data.layout import pack_views, patches_per_token
from uhd_jax.data.slicer import SliceConfig, slice_image
from uhd_jax.model.flops import vision_flops
from uhd_jax.model.vision import VisionEncoder


def generated_image(height: int, width: int, seed: int = 0) -> Image.Image:
    """A smooth colour field with noise: not a photo, but every view gets different pixels."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([128 + 100 * np.sin(x / 97), 128 + 100 * np.cos(y / 61), 128 + 60 * np.sin((x + y) / 150)], -1)
    rgb += rng.normal(0, 12, rgb.shape)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=("tiny", "reference"), default="tiny")
    ap.add_argument("--mode", choices=("16x", "4x"), default="16x")
    ap.add_argument("--height", type=int, default=1344)
    ap.add_argument("--width", type=int, default=1344)
    ap.add_argument("--max-slice-nums", type=int, default=9)
    ap.add_argument("--tokens-per-view", type=int, default=1024, help="per-view patch budget (padding bucket)")
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args(argv)

    cfg = tiny_config(insert_layer_id=1, downsample_mode=args.mode) if args.config == "tiny" else reference_config()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; model config: {args.config}, mode {args.mode}")

    slicing = SliceConfig(downsample_mode=args.mode, max_slice_nums=args.max_slice_nums)
    t0 = time.perf_counter()
    sliced = slice_image(generated_image(args.height, args.width), slicing)
    slice_ms = (time.perf_counter() - t0) * 1e3
    plan = sliced.plan
    grid = "none (single view)" if plan.grid is None else f"{plan.grid[0]} rows x {plan.grid[1]} cols"
    print(f"\nimage {args.height}x{args.width} px -> thumbnail {plan.thumb_size[0]}x{plan.thumb_size[1]} px, "
          f"slice grid {grid}  ({slice_ms:.0f} ms on the host)")

    budget = max(args.tokens_per_view, max(h * w for h, w in plan.target_sizes))
    unit = patches_per_token(args.mode)
    budget = -(-budget // unit) * unit
    batch = pack_views(sliced.views, patch_size=cfg.vision.patch_size,
                       positions_per_side=cfg.vision.positions_per_side, mode=args.mode, tokens_per_view=budget)
    after_window = 4 if args.mode == "16x" else 1
    print(f"\n{'view':>4s} {'pixels':>10s} {'patch grid':>10s} {'patches':>8s} {'after ViT merger':>16s} "
          f"{'LLM tokens':>10s}")
    for i, ((ph, pw), (gh, gw)) in enumerate(zip(plan.view_sizes, plan.target_sizes)):
        name = "thumb" if i == 0 else str(i)
        print(f"{name:>4s} {f'{ph}x{pw}':>10s} {f'{gh}x{gw}':>10s} {gh * gw:8d} {gh * gw // after_window:16d} "
              f"{gh * gw // unit:10d}")
    counts = [h * w for h, w in plan.target_sizes]
    print(f"{'all':>4s} {'':>10s} {'':>10s} {sum(counts):8d} {sum(counts) // after_window:16d} "
          f"{sum(counts) // unit:10d}")
    print(f"static batch: patches {batch.patches.shape} (views x tokens_per_view x C*P*P), "
          f"{sum(counts) / batch.patches[..., 0].size:.0%} of slots real")

    enc = VisionEncoder(cfg, attn_impl="auto")
    params = jax.jit(enc.init)(jax.random.key(0), batch)["params"]
    nparams = sum(x.size for x in jax.tree.leaves(params))
    f = jax.jit(enc.apply)
    t0 = time.perf_counter()
    tokens, valid, _ = jax.block_until_ready(f({"params": params}, batch))
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        jax.block_until_ready(f({"params": params}, batch))
        times.append(time.perf_counter() - t0)
    ms = float(np.median(times)) * 1e3

    useful = vision_flops(cfg, counts, args.mode)
    executed = vision_flops(cfg, [budget] * len(counts), args.mode)
    print(f"\nvision params: {nparams / 1e6:.2f} M; output tokens {tuple(tokens.shape)}, "
          f"{int(np.asarray(valid).sum())} valid (= placeholders in the prompt)")
    print(f"\n{'stage':>14s} {'GFLOP (real tokens)':>20s} {'GFLOP (executed)':>17s}")
    for k in useful:
        print(f"{k:>14s} {useful[k] / 1e9:20.3f} {executed[k] / 1e9:17.3f}")
    print(f"\nfirst call (compile + run): {first:.2f} s; steady state: {ms:.1f} ms "
          f"({executed['total'] / ms / 1e9:.3f} TFLOP/s executed)")
    assert int(np.asarray(valid).sum()) == sum(counts) // unit
    assert np.isfinite(np.asarray(tokens)).all()


if __name__ == "__main__":
    main()
