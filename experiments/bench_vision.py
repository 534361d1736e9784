"""Vision-path benchmark: the full-size architecture (real config, random weights, bf16) on one GPU.

Encodes 1344x1344 images (thumbnail + 3x3 slices = 10 views of 32x32 patches) in 16x and 4x mode,
one image and a batch of 8; prints ms (median), FLOPs counted by the project and by XLA's cost
analysis, achieved TFLOP/s and the program's device memory (arguments + outputs + temporaries). If torch + transformers with MiniCPM-V 4.6 are
importable on a CUDA device, times the reference in the same process for the ratio.

    python experiments/bench_vision.py [--iters 30] [--impls cudnn,xla] [--no-reference]
Results also go to $OUT/bench_vision.json when OUT is set.
"""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")  # leave room for the torch reference

import argparse
import json
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from uhd_jax.config import reference_config
from uhd_jax.data.layout import pack_views
from uhd_jax.model.flops import vision_flops
from uhd_jax.model.vision import VisionEncoder

VIEW_PX = 448  # 1344x1344 -> 448x448 thumbnail + 3x3 slices of 448x448
VIEWS_PER_IMAGE = 10


def make_batch(cfg, images: int, mode: str, seed: int):
    rng = np.random.default_rng(seed)
    views = [rng.standard_normal((3, VIEW_PX, VIEW_PX), dtype=np.float32) for _ in range(images * VIEWS_PER_IMAGE)]
    return pack_views(views, patch_size=cfg.vision.patch_size, positions_per_side=cfg.vision.positions_per_side,
                      mode=mode, dtype=np.float32)


def time_fn(fn, args_list, iters):
    """Median ms over `iters` calls, rotating among input sets; synchronizes on the output."""
    for a in args_list:
        jax.block_until_ready(fn(*a))
    ts = []
    for i in range(iters):
        a = args_list[i % len(args_list)]
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*a))
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts), min(ts)


def bench_ours(cfg, params, images, mode, impl, iters, unroll=1):
    enc = VisionEncoder(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, attn_impl=impl, unroll=unroll)
    batches = [jax.device_put(make_batch(cfg, images, mode, s)) for s in range(3)]
    f = jax.jit(lambda p, b: enc.apply({"params": p}, b)[0])
    t0 = time.perf_counter()
    compiled = f.lower(params, batches[0]).compile()
    compile_s = time.perf_counter() - t0
    ms, best = time_fn(compiled, [(params, b) for b in batches], iters)
    counted = vision_flops(cfg, [1024] * (images * VIEWS_PER_IMAGE), mode)["total"]
    mem = compiled.memory_analysis()
    peak = (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes) if mem else float("nan")
    return dict(impl=f"jax-{impl}" + ("-unrolled" if unroll is True else ""), mode=mode, images=images, ms=ms, best_ms=best, flops=counted,
                xla_flops=xla_cost_flops(cfg, params, batches[0]), tflops_per_s=counted / ms / 1e9,
                compile_s=compile_s, peak_gib=peak / 2**30)


def xla_cost_flops(cfg, params, batch):
    """XLA's own FLOP count of the same computation, from the CPU compiler: GPU cost analysis does not see
    cuBLAS/cuDNN calls, and loops hide their bodies' FLOPs, so this lowers a variant with unrolled layers and
    einsum attention for the CPU backend (compiled, never run)."""
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu), (params, batch))
    enc = VisionEncoder(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, attn_impl="xla", unroll=True)
    cost = jax.jit(lambda p, b: enc.apply({"params": p}, b)[0]).lower(*spec).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan"))) if cost else float("nan")


def bench_reference(cfg, images, mode, iters):
    import torch
    from transformers import MiniCPMV4_6Config, MiniCPMV4_6ForConditionalGeneration

    hf_cfg = MiniCPMV4_6Config(**cfg.to_hf_dict())
    with torch.device("cuda"):
        model = MiniCPMV4_6ForConditionalGeneration(hf_cfg).to(torch.bfloat16).eval()
    n = images * VIEWS_PER_IMAGE
    side = VIEW_PX // cfg.vision.patch_size
    pv = torch.randn(1, 3, cfg.vision.patch_size, n * side * side * cfg.vision.patch_size, device="cuda",
                     dtype=torch.bfloat16)
    ts = torch.tensor([[side, side]] * n, device="cuda", dtype=torch.int32)
    with torch.no_grad():
        for _ in range(3):
            model.model.get_image_features(pv, ts, downsample_mode=mode)
        torch.cuda.synchronize()
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            model.model.get_image_features(pv, ts, downsample_mode=mode)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
    ms = statistics.median(times)
    counted = vision_flops(cfg, [1024] * n, mode)["total"]
    peak = torch.cuda.max_memory_allocated() / 2**30
    del model
    torch.cuda.empty_cache()
    return dict(impl=f"transformers-{hf_cfg.vision_config._attn_implementation}", mode=mode, images=images, ms=ms,
                best_ms=min(times), flops=counted, xla_flops=float("nan"), tflops_per_s=counted / ms / 1e9,
                compile_s=0.0, peak_gib=peak)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--impls", default="cudnn,xla")
    ap.add_argument("--images", default="1,8")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--unroll", default="1", help="comma list of layer-scan unrolls: 1 (rolled) and/or true")
    args = ap.parse_args()

    cfg = reference_config()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
    enc = VisionEncoder(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    params = jax.jit(enc.init)(jax.random.key(0), make_batch(cfg, 1, "16x", 0))["params"]
    nparams = sum(x.size for x in jax.tree.leaves(params))
    print(f"vision params: {nparams / 1e6:.1f} M", flush=True)

    rows = []
    # bf16 + cuDNN against float32 + einsum attention on the same weights and views: the fast path's error
    batch = make_batch(cfg, 1, "16x", 7)
    fast = jax.jit(lambda p, b: VisionEncoder(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16).apply({"params": p}, b)[0])
    ref32 = VisionEncoder(cfg, dtype=jnp.float32, param_dtype=jnp.float32, attn_impl="xla")
    with jax.default_matmul_precision("highest"):
        p32 = jax.tree.map(lambda x: x.astype(jnp.float32), params)
        exact = jax.jit(lambda p, b: ref32.apply({"params": p}, b)[0])(p32, batch)
    got = fast(params, batch).astype(jnp.float32)
    err = float(jnp.linalg.norm(got - exact) / jnp.linalg.norm(exact))
    print(f"bf16 cuDNN vs float32 XLA, relative error of the visual tokens: {err:.2e}", flush=True)

    for images in [int(x) for x in args.images.split(",")]:
        for mode in ("16x", "4x"):
            for impl in args.impls.split(","):
                for unroll in args.unroll.split(","):
                    if impl == "xla" and images > 1:
                        continue  # the einsum path materializes [V, N, T, T] logits; one image is enough
                    r = bench_ours(cfg, params, images, mode, impl, args.iters,
                                   unroll=True if unroll == "true" else int(unroll))
                    rows.append(r)
                    print(json.dumps(r), flush=True)
    if not args.no_reference:
        try:
            import torch

            assert torch.cuda.is_available()
            for images in (1,):
                for mode in ("16x", "4x"):
                    r = bench_reference(cfg, images, mode, args.iters)
                    rows.append(r)
                    print(json.dumps(r), flush=True)
        except Exception as e:  # the reference is optional
            print(f"reference not timed: {type(e).__name__}: {e}", flush=True)

    print()
    print(f"{'impl':24s} {'mode':4s} {'imgs':>4s} {'ms':>8s} {'TFLOP':>7s} {'XLA TFLOP':>9s} {'TFLOP/s':>8s} "
          f"{'mem GiB':>8s} {'compile s':>9s}")
    for r in rows:
        print(f"{r['impl']:24s} {r['mode']:4s} {r['images']:4d} {r['ms']:8.2f} {r['flops'] / 1e12:7.2f} "
              f"{r['xla_flops'] / 1e12:9.2f} {r['tflops_per_s']:8.1f} {r['peak_gib']:8.2f} {r['compile_s']:9.1f}")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_vision.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
