"""The README's visual-savings FLOPs tables: visual FLOPs in the LLM before and after the paper's four cuts, and
their share of the whole prefill, for MiniCPM-V 4.6 and for the LLaVA-UHD v4 setup (SigLIP2 + Qwen3-8B).

    python3 experiments/yopo_flops_table.py [--window-area exact|paper] [--layers]

One 1344x1344 image: the slicer gives a thumbnail + 3x3 slices = 10 views of 32x32 patches -> 8x8 visual tokens
per view in 16x mode, 16x16 in 4x. 128 text tokens: 8 before the image (chat header, image id), 2 between
consecutive views (the view markers, 18), 102 after (the question); logits for the last position only.
Vision encoder FLOPs from `uhd_jax/model/flops.py` (the same SigLIP2 ViT and mergers in both setups; the last
merger's width follows the LLM), LLM FLOPs from `uhd_jax/yopo/flops.py` (matrix products, attention and the
chunked DeltaNet; 2 FLOPs per multiply-add). Cuts: the paper's combination (`paper_cuts`): window 5 (exact
clipped windows unless --window-area paper), half the heads of each full-attention layer except the first two
full-attention layers (K/V of visual tokens kept for min(active heads, KV heads) groups: no KV saving at these
shapes), visual tokens dropped from layer L = half depth, visual FFN at I / 2. Counts only: no model change and
nothing measured.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from uhd_jax.config import MergerConfig, TextConfig, reference_config  # noqa: E402
from uhd_jax.data.slicer import SliceConfig, plan_slices  # noqa: E402
from uhd_jax.yopo.flops import (CUT_ORDER, image_layout, llm_visual_flops, paper_cuts, prefill_flops,  # noqa: E402
                                savings_by_cut)

# Qwen/Qwen3-8B config.json (the LLM of LLaVA-UHD v4; `convert from-separate` reads the same keys from its
# directory): hidden 4096, FFN 12288, 36 layers, 32 heads of 128, 8 KV heads, untied 151,936-token vocabulary.
QWEN3_8B = {"model_type": "qwen3", "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288,
            "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
            "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000, "attention_bias": False,
            "tie_word_embeddings": False, "max_position_embeddings": 40960, "use_sliding_window": False}

IMAGE_PX = (1344, 1344)
TEXT_BEFORE, BETWEEN, TEXT_AFTER = 8, 2, 102


def setups():
    ref = reference_config()
    yield "MiniCPM-V 4.6 (Qwen3.5 hybrid LLM)", ref
    yield "LLaVA-UHD v4 (SigLIP2 + Qwen3-8B)", ref.replace(text=TextConfig.from_hf_dict(QWEN3_8B))


def layout_for(mode: str):
    plan = plan_slices(IMAGE_PX, SliceConfig(downsample_mode=mode))
    side = 4 if mode == "16x" else 2  # patches per token side
    grids = [(h // side, w // side) for h, w in plan.target_sizes]
    layout = image_layout(grids, text_before=TEXT_BEFORE, text_after=TEXT_AFTER, between=BETWEEN)
    assert sum(s for s in layout if isinstance(s, int)) == 128
    return grids, layout


def t(x: int) -> str:
    return f"{x / 1e12:.3f}" if x >= 1e12 else f"{x / 1e12:.4f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--window-area", default="exact", choices=("exact", "paper"))
    ap.add_argument("--layers", action="store_true", help="also print the per-layer visual FLOPs and savings")
    args = ap.parse_args()

    rows, cut_rows, layer_tables = [], [], []
    for name, base in setups():
        for mode in ("16x", "4x"):
            cfg = base.replace(merger=MergerConfig(downsample_mode=mode))
            grids, layout = layout_for(mode)
            cuts = paper_cuts(cfg.text)
            before = prefill_flops(cfg, layout)
            after = prefill_flops(cfg, layout, cuts, window_area=args.window_area)
            s = savings_by_cut(cfg.text, layout, cuts, args.window_area)
            assert (s["before"], s["after"]) == (before["llm_visual"], after["llm_visual"])
            n_vis = sum(h * w for h, w in grids)
            rows.append(
                f"| {name} | {mode}: {len(grids)} x {grids[0][0]}x{grids[0][1]} = {n_vis} | {t(before['vision'])} "
                f"| {t(before['llm_text'])} | {t(before['llm_visual'])} | **{t(after['llm_visual'])}** "
                f"({after['llm_visual'] / before['llm_visual']:.1%}) "
                f"| {before['llm_visual'] / before['total']:.1%} -> {after['llm_visual'] / after['total']:.1%} "
                f"| {t(before['total'])} -> {t(after['total'])} ({1 - after['total'] / before['total']:.1%} less) |")
            by = s["by_cut"]
            cut_rows.append(f"| {name}, {mode} | {t(s['before'])} | " + " | ".join(
                f"{t(by[c])} ({by[c] / s['before']:.1%})" for c in CUT_ORDER) + f" | {t(s['after'])} |")
            if args.layers:
                v = llm_visual_flops(cfg.text, layout)
                lines = [f"\n{name}, {mode}: per layer (GFLOPs; savings attributed in the order "
                         f"{', '.join(CUT_ORDER)})",
                         "| layer | type | heads kept | visual before | " + " | ".join(CUT_ORDER) + " | after |",
                         "|---|---|---|---|" + "---|" * len(CUT_ORDER) + "---|"]
                for l, row in enumerate(s["layers"]):
                    kept = cuts.heads[l] if cuts.heads[l] is not None else "-"
                    lines.append(f"| {l} | {cfg.text.layer_types[l].split('_')[0]} | {kept} | "
                                 f"{sum(row['before'].values()) / 1e9:.2f} | "
                                 + " | ".join(f"{row[c] / 1e9:.2f}" for c in CUT_ORDER)
                                 + f" | {sum(row['after'].values()) / 1e9:.2f} |")
                assert sum(sum(r.values()) for r in v["layers"]) == s["before"]
                layer_tables.append("\n".join(lines))

    print(f"One 1344x1344 image + 128 text tokens, prefill, TFLOPs; cuts: w 5 ({args.window_area} window), "
          f"half the heads, L = half depth, r 2\n")
    print("| model | visual tokens | vision encoder | LLM text | LLM visual, before | LLM visual, after "
          "| LLM visual share of the prefill | whole prefill |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\nWhat each cut saves (TFLOPs, share of the uncut LLM visual FLOPs; each cut measured with the ones to "
          "its left already on)\n")
    print("| model, mode | LLM visual, before | (1) window 5 | (2) half the heads | (3) drop from L | (4) FFN / 2 "
          "| after |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(cut_rows))
    for table in layer_tables:
        print(table)


if __name__ == "__main__":
    main()
