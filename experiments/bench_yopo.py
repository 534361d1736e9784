"""Speed of the four visual cuts (the paper "Treat Visual Tokens as Text?", `uhd_jax.yopo`) in our model (not a test).

    PYTHONUNBUFFERED=1 python experiments/bench_yopo.py [--model reference|qwen3-8b|tiny] [--images 1,8]
        [--cuts none,window,heads,drop,ffn,all] [--text-layers N] [--repeats 10] [--no-prefill] [--out FILE.json]

Setup: random weights in bf16 (params and compute), batch 1, one sequence of N square images (default 1344 x 1344,
sliced by the model's own slicing settings: MiniCPM-V 4.6 gives a thumbnail + 3 x 3 slices of 64 visual tokens
each) with SEP text tokens between consecutive views and 128 text tokens after the images.
Models: `reference` = MiniCPM-V 4.6 (`uhd_jax.config.reference_config()`: Qwen3.5 hybrid LLM); `qwen3-8b` = the
LLaVA-UHD v4 setup of configs/llava_uhd_v4.py (built there by `convert from-separate` from SigLIP2-so400m +
Qwen3-8B directories; here: the reference vision encoder with Qwen3-8B's published config.json as the LLM); `tiny`
= `tiny_config()` with small slices (CPU smoke test). `--text-layers N` keeps only the LLM's first N layers (a
multiple of its layer period; when the full LLM does not fit): the output says so, and drop_layer / heads follow
the truncated depth.
Cut settings: none; each cut alone; all = the paper's combination (window 5, about half the heads via
`uhd_jax.yopo.flops.half_heads` (the first two full-attention layers keep all heads; active heads = the first
round(H / 2) indices, standing in for a calibrated mask: same work), drop_layer = half depth, ffn_ratio 2).
Measured (median of --repeats after a warm-up call, `jax.block_until_ready`), per setting:
  llm_ms:     the text model alone on precomputed visual embeddings (`TextModel` with `placed_embeds`), last logits
              only: the part the cuts act on, not diluted by the vision encoder;
  prefill_ms: the whole prefill without a cache (vision encoder + placement + LLM), last logits only.
Ratios are against `none`; the LLM FLOPs ratio is (llm_text_flops + llm_visual_flops) with / without the cuts
(`uhd_jax.yopo.flops`, exact window area). Prints a table; writes JSON (--out, default $OUT/bench_yopo.json when
OUT is set).
Not covered: decoding (decode tokens are text: the cuts change only which cached visual keys a head sees and how
many the dropped layers hold).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from uhd_jax.config import ModelConfig, REFERENCE_CONFIG_DIR, reference_config, tiny_config  # noqa: E402
from uhd_jax.data.batch import ModelBatch  # noqa: E402
from uhd_jax.data.layout import pack_views, patches_per_token  # noqa: E402
from uhd_jax.data.slicer import SliceConfig, slice_image  # noqa: E402
from uhd_jax.model.minicpmv import MiniCPMV, gather_visual_tokens  # noqa: E402
from uhd_jax.model.text_model import TextModel, layer_period  # noqa: E402
from uhd_jax.model.vision import VisionEncoder  # noqa: E402
from uhd_jax.model.visual_cuts import Cuts, VisualLayout  # noqa: E402
from uhd_jax.yopo.flops import half_heads, llm_text_flops, llm_visual_flops  # noqa: E402

TEXT_AFTER = 128  # text tokens after the images
SEP = 2  # text tokens between consecutive views (the template's markers)
SETTINGS = ("none", "window", "heads", "drop", "ffn", "all")

# Qwen3-8B's config.json (huggingface.co/Qwen/Qwen3-8B), the LLM of LLaVA-UHD v4 (configs/llava_uhd_v4.py)
QWEN3_8B = {"model_type": "qwen3", "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288,
            "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
            "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000, "attention_bias": False,
            "tie_word_embeddings": False, "max_position_embeddings": 40960}


def model_config(name: str, text_layers: int | None) -> tuple[ModelConfig, SliceConfig, str]:
    if name == "reference":
        cfg, desc = reference_config(), "MiniCPM-V 4.6 (Qwen3.5 hybrid LLM)"
        slicing = SliceConfig.from_preprocessor_config(REFERENCE_CONFIG_DIR)
    elif name == "qwen3-8b":
        from uhd_jax.convert.from_separate import text_config_from
        ref = reference_config()
        cfg = ref.replace(text=text_config_from(QWEN3_8B))
        desc = "LLaVA-UHD v4 setup: reference vision encoder + Qwen3-8B (dense LLM)"
        slicing = SliceConfig.from_preprocessor_config(REFERENCE_CONFIG_DIR)
    elif name == "tiny":
        cfg, desc = tiny_config(), "tiny_config (smoke test)"
        slicing = SliceConfig(scale_resolution=112, max_slice_nums=4)
    else:
        raise SystemExit(f"--model must be reference, qwen3-8b or tiny, got {name!r}")
    if text_layers is not None:
        t = cfg.text
        p = layer_period(t.layer_types)
        if not 0 < text_layers <= t.num_hidden_layers or text_layers % p:
            raise SystemExit(f"--text-layers {text_layers} must be a positive multiple of the layer period {p} and "
                             f"at most {t.num_hidden_layers}")
        cfg = cfg.replace(text=t.replace(num_hidden_layers=text_layers, layer_types=t.layer_types[:text_layers]))
        desc += f", LLM TRUNCATED to its first {text_layers} of {t.num_hidden_layers} layers"
    slicing = slicing.replace(downsample_mode=cfg.merger.downsample_mode, merger_times=cfg.merger.merger_times)
    return cfg, slicing, desc


def cut_settings(cfg: ModelConfig, window: int = 5) -> dict[str, Cuts]:
    t = cfg.text
    counts = half_heads(t)
    heads = tuple(None if c is None or c == t.num_attention_heads else tuple(range(c)) for c in counts)
    all_ = Cuts(window=window, heads=heads, drop_layer=t.num_hidden_layers // 2, ffn_ratio=2)
    return {"none": Cuts(), "window": all_.only(["window"]), "heads": all_.only(["heads"]),
            "drop": all_.only(["drop"]), "ffn": all_.only(["ffn"]), "all": all_}


def make_batch(cfg: ModelConfig, slicing: SliceConfig, n_images: int, size: int, seed: int = 0):
    """(ModelBatch of one row, flops layout) for n_images random size x size images + text."""
    rng = np.random.default_rng(seed)
    sliced = [slice_image(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), slicing) for _ in range(n_images)]
    views = [v for s in sliced for v in s.views]
    unit = patches_per_token(cfg.merger.downsample_mode, cfg.merger.merger_times)
    side = int(round(unit ** 0.5))
    patch = cfg.vision.patch_size
    grids = [(v.shape[1] // patch // side, v.shape[2] // patch // side) for v in views]
    tpv = max(r * c for r, c in grids) * unit
    vision = pack_views(views, patch_size=patch, positions_per_side=cfg.vision.positions_per_side,
                        mode=cfg.merger.downsample_mode, merger_times=cfg.merger.merger_times, tokens_per_view=tpv)
    t_out = vision.out_tokens_per_view
    ids, vindex, layout = [], [], []
    for k, (r, c) in enumerate(grids):
        if k:
            ids += list(rng.integers(0, 1000, SEP))
            vindex += [0] * SEP
            layout.append(SEP)
        ids += [cfg.image_token_id] * (r * c)
        vindex += [k * t_out + j for j in range(r * c)]
        layout.append((r, c))
    ids += list(rng.integers(0, 1000, TEXT_AFTER))
    vindex += [0] * TEXT_AFTER
    layout.append(TEXT_AFTER)
    n = len(ids)
    s = -(-n // 128) * 128
    pad = lambda a, v: np.array([list(a) + [v] * (s - n)])
    vis = pad([i == cfg.image_token_id for i in ids], False)
    n_text = int(n - vis.sum())
    batch = ModelBatch(input_ids=pad(ids, 0).astype(np.int32), attention_mask=pad([True] * n, False),
                       positions=np.arange(s, dtype=np.int32)[None], visual_index=pad(vindex, 0).astype(np.int32),
                       visual_mask=vis, loss_mask=np.zeros((1, s), bool),
                       vision=jax.tree.map(lambda a: np.asarray(a)[None], vision),
                       text_slots=min(s, -(-n_text // 128) * 128))
    return batch, tuple(layout)


def timed(fn, args, repeats: int) -> tuple[float, float]:
    """(median ms over repeats after a warm-up call, compile + first call s)."""
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3, first


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="reference")
    ap.add_argument("--images", default="1,8", help="comma-separated image counts, one sequence each")
    ap.add_argument("--image-size", type=int, default=1344)
    ap.add_argument("--cuts", default=",".join(SETTINGS))
    ap.add_argument("--text-layers", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--window", type=int, default=5)
    ap.add_argument("--no-prefill", action="store_true", help="time the LLM part only")
    ap.add_argument("--attention-impl", default="auto")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    cfg, slicing, desc = model_config(args.model, args.text_layers)
    settings = cut_settings(cfg, args.window)
    names = [c for c in args.cuts.split(",") if c]
    if "none" not in names:
        names = ["none"] + names
    unknown = set(names) - set(SETTINGS)
    if unknown:
        raise SystemExit(f"--cuts: unknown {sorted(unknown)}; known: {SETTINGS}")
    dt = jnp.bfloat16
    print(f"model: {desc}; device: {jax.devices()[0].device_kind}; bf16 random weights", flush=True)

    results = {"model": args.model, "description": desc, "device": jax.devices()[0].device_kind,
               "text_layers": args.text_layers, "image_size": args.image_size, "text_after": TEXT_AFTER,
               "sep": SEP, "settings": {k: repr(settings[k]) for k in names}, "runs": []}
    params = None
    for n_img in [int(x) for x in args.images.split(",") if x]:
        batch, layout = make_batch(cfg, slicing, n_img, args.image_size)
        s = batch.input_ids.shape[1]
        n_vis = int(batch.visual_mask.sum())
        print(f"\n{n_img} image(s): {len(layout) // 2 + 1} views, {n_vis} visual + "
              f"{int(batch.attention_mask.sum()) - n_vis} text tokens, S = {s}, text_slots = {batch.text_slots}",
              flush=True)
        if params is None:
            model = MiniCPMV(cfg, dt, dt, attention_impl=args.attention_impl)
            params = jax.jit(model.init)(jax.random.PRNGKey(0), batch)["params"]
            params = jax.tree.map(lambda a: a.unbox() if hasattr(a, "unbox") else a, params,
                                  is_leaf=lambda a: hasattr(a, "unbox"))
        vision = jax.jit(lambda p, v: VisionEncoder(cfg, dt, dt, attn_impl=args.attention_impl).apply(
            {"params": p}, v)[0])
        tokens = vision(params["vision"], batch.vision)
        placed = gather_visual_tokens(tokens, jnp.asarray(batch.visual_index))
        levels, t_out = batch.vision.levels, batch.vision.out_tokens_per_view
        base = None
        for name in names:
            cuts = settings[name].validate_for_model(cfg.text)
            text = TextModel(cfg.text, dt, dt, attention_impl=args.attention_impl, cuts=cuts)

            def llm(p, ids, mask, emb, vmask, vindex, grid, text=text):
                return text.apply({"params": p}, ids, attention_mask=mask, placed_embeds=emb, placed_mask=vmask,
                                  last_logits_only=True, text_slots=batch.text_slots,
                                  visual_layout=VisualLayout(vindex, grid, levels, t_out))[0]
            llm_args = (params["text"], batch.input_ids, batch.attention_mask, placed, batch.visual_mask,
                        batch.visual_index, batch.vision.grid)
            llm_ms, llm_first = timed(jax.jit(llm), llm_args, args.repeats)
            row = {"images": n_img, "setting": name, "seq": s, "visual_tokens": n_vis, "llm_ms": llm_ms,
                   "llm_compile_s": llm_first}
            if not args.no_prefill:
                full = MiniCPMV(cfg, dt, dt, attention_impl=args.attention_impl, cuts=cuts)
                pre = jax.jit(lambda p, b, full=full: full.apply({"params": p}, b, last_logits_only=True)[0])
                row["prefill_ms"], row["prefill_compile_s"] = timed(pre, (params, batch), args.repeats)
            fl = llm_text_flops(cfg.text, layout)["total"] + llm_visual_flops(cfg.text, layout, cuts)["total"]
            row["llm_flops"] = fl
            if base is None:
                base = row
            row["llm_flops_ratio"] = fl / base["llm_flops"]
            row["llm_time_ratio"] = llm_ms / base["llm_ms"]
            if "prefill_ms" in row:
                row["prefill_time_ratio"] = row["prefill_ms"] / base["prefill_ms"]
            results["runs"].append(row)
            print(f"  {name:7s} llm {llm_ms:9.2f} ms (x{row['llm_time_ratio']:.3f}, FLOPs x{row['llm_flops_ratio']:.3f})"
                  + (f"  prefill {row['prefill_ms']:9.2f} ms (x{row['prefill_time_ratio']:.3f})"
                     if "prefill_ms" in row else ""), flush=True)

    print(f"\n{desc}; {jax.devices()[0].device_kind}; median of {args.repeats}")
    hdr = f"{'images':>6} {'setting':8} {'LLM ms':>10} {'LLM time x':>10} {'LLM FLOPs x':>11} {'prefill ms':>11} " \
          f"{'prefill x':>9}"
    print(hdr)
    print("-" * len(hdr))
    for r in results["runs"]:
        print(f"{r['images']:>6} {r['setting']:8} {r['llm_ms']:>10.2f} {r['llm_time_ratio']:>10.3f} "
              f"{r['llm_flops_ratio']:>11.3f} {r.get('prefill_ms', float('nan')):>11.2f} "
              f"{r.get('prefill_time_ratio', float('nan')):>9.3f}")
    out = args.out or (os.path.join(os.environ["OUT"], "bench_yopo.json") if os.environ.get("OUT") else None)
    if out:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
