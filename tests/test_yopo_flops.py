"""FLOPs of the visual tokens in the LLM and of the four cuts (uhd_jax/yopo/flops.py): the paper's numbers from its
formula, hand-worked tiny cases, and consistency with the project's text_flops."""

import numpy as np
import pytest

from uhd_jax.config import MergerConfig, TextConfig, reference_config, tiny_config
from uhd_jax.model.flops import vision_flops
from uhd_jax.model.gated_deltanet import ChunkOptions
from uhd_jax.model.text_flops import deltanet_core_flops, text_forward_flops
from uhd_jax.yopo.flops import (CUT_ORDER, HEADMASK_7B_16, LLAVA15_13B, LLAVA15_7B, Cuts, attention_pairs,
                                half_heads, image_layout, llm_text_flops, llm_visual_flops, paper_cuts,
                                paper_visual_flops, prefill_flops, savings_by_cut, window_pairs)


def dense(d=8, i=16, layers=2, heads=2, kv=1, hd=4, vocab=128):
    return TextConfig(model_type="qwen3", vocab_size=vocab, hidden_size=d, intermediate_size=i,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd,
                      layer_types=("full_attention",) * layers, attn_output_gate=False, partial_rotary_factor=1.0)


LLAVA_7B_TEXT = dense(d=4096, i=11008, layers=32, heads=32, kv=32, hd=128, vocab=32000)  # LLaVA-1.5-7B (Vicuna)


# --- the paper's formula ----------------------------------------------------------------------------------------

def test_paper_formula_reproduces_table_2():
    assert round(paper_visual_flops(576, **LLAVA15_7B) / 1e12, 2) == 7.63
    assert round(paper_visual_flops(576, **LLAVA15_13B) / 1e12, 2) == 14.89
    assert sum(HEADMASK_7B_16) == 499 and HEADMASK_7B_16[:2] == (32, 32)
    cut = paper_visual_flops(576, **LLAVA15_7B, heads=HEADMASK_7B_16, drop_layer=16, ffn_ratio=2, window=5)
    assert round(cut / 1e12, 2) == 1.91
    assert round(cut / paper_visual_flops(576, **LLAVA15_7B), 3) == 0.251  # the "YOPO (25%)" row
    # the exact values (integers: every h_l / H term has n d^2 or n d divisible by H = 32)
    assert paper_visual_flops(576, **LLAVA15_7B) == 7_634_304_368_640
    assert cut == 1_913_019_531_264


def test_paper_formula_by_hand():
    # n 4, d 2, m 3, 2 layers, H 2: original per layer 4*4*4 + 2*16*2 + 3*4*2*3 = 64 + 64 + 72 = 200 -> 2*2*200
    assert paper_visual_flops(4, 2, 3, 2, 2) == 800
    # heads (2, 1), L 1, r 2, w 1: only layer 0 (h 2/2): 4*4*4 + 2*4*1*2 + 3*4*2*3/2 = 64 + 16 + 36 = 116 -> 232
    assert paper_visual_flops(4, 2, 3, 2, 2, heads=(2, 1), drop_layer=1, ffn_ratio=2, window=1) == 232
    # without the drop, layer 1 (h 1/2): 32 + 8 + 36 = 76 -> 2 * (116 + 76)
    assert paper_visual_flops(4, 2, 3, 2, 2, heads=(2, 1), ffn_ratio=2, window=1) == 384


def test_our_accounting_gives_the_papers_number_with_its_conventions():
    """LLaVA-1.5-7B shapes, one 24x24 view and no text: with the paper's w^2 window our cut count is the paper's
    1.91 T exactly (the window replaces the only place the two differ); uncut, ours counts the causal half."""
    layout = [(24, 24)]
    heads = tuple(HEADMASK_7B_16)
    cuts = Cuts(window=5, heads=heads, drop_layer=16, ffn_ratio=2)
    ours = llm_visual_flops(LLAVA_7B_TEXT, layout, cuts, window_area="paper")
    assert ours["total"] == 1_913_019_531_264
    n, d = 576, 4096
    uncut = llm_visual_flops(LLAVA_7B_TEXT, layout)["total"]
    # paper: 2 * 2 n^2 d per layer (full square); ours: n (n + 1) / 2 pairs x 4 d
    assert uncut == paper_visual_flops(n, **LLAVA15_7B) - 32 * (4 * n * n * d - 2 * n * (n + 1) * d)
    # the exact (clipped) window on 24x24: per axis 24 * 5 - 2 * 3 = 114, so 114^2 pairs instead of 576 * 25
    exact = llm_visual_flops(LLAVA_7B_TEXT, layout, cuts)["total"]
    assert exact == ours["total"] - sum(h * 4 * 128 for h in heads[:16]) * (576 * 25 - 114 ** 2)


# --- hand-worked tiny cases -------------------------------------------------------------------------------------

def test_dense_by_hand():
    """d 8, I 16, 2 layers, 2 heads of 4, 1 KV head, vocab 128; layout: 2 text, a 2x3 view, 1 text (9 tokens).
    Per token (FLOPs = 2 x MACs): attention projections q 8*8 + k,v 2*8*4 + o 8*8 = 192 MACs -> 384 (k, v: 128);
    one (query, key) pair over both heads: QK 8 + AV 8 = 16 MACs -> 32; FFN 3*8*16 = 384 MACs -> 768.
    Causal pairs: text(2): tt 3; view(6): vt 6*2 = 12, vv 6*7/2 = 21; text(1): tt +1*2+1 = 3 -> 6, tv 1*6 = 6;
    6 + 12 + 21 + 6 = 45 = 9*10/2."""
    cfg = dense()
    layout = [2, (2, 3), 1]
    assert attention_pairs(layout) == {"tt": 6, "tv": 6, "vt": 12, "vv": 21}
    v = llm_visual_flops(cfg, layout)
    # per layer: proj 6*384 = 2304, vt 12*32 = 384, vv 21*32 = 672, tv 6*32 = 192, FFN 6*768 = 4608 -> 8160
    assert v["layers"][0] == {"attn_proj": 2304, "attn_scores_vt": 384, "attn_scores_vv": 672, "attn_scores_tv": 192,
                              "linear_proj": 0, "deltanet_conv": 0, "deltanet_core": 0, "mlp": 4608}
    assert v["total"] == 2 * 8160
    t = llm_text_flops(cfg, layout)
    # per layer: proj 3*384 = 1152, tt 6*32 = 192, FFN 3*768 = 2304 -> 3648; lm_head 2*8*128 = 2048 (one position)
    assert t["attn_scores_tt"] == 2 * 192 and t["lm_head"] == 2048 and t["total"] == 2 * 3648 + 2048
    assert v["total"] + t["total"] == text_forward_flops(cfg, 1, 9, logits_tokens=1)["total"] == 25664

    # window 3 on the 2x3 grid, clipped: rows 2 + 2 = 4, cols 2 + 3 + 2 = 7 -> 28 pairs (bidirectional, so more
    # than the causal 21 on a view this small); the paper's w^2: 6 * 9 = 54
    assert window_pairs(2, 3, 3) == 28 and window_pairs(2, 3, 3, "paper") == 54
    w = llm_visual_flops(cfg, layout, Cuts(window=3))
    assert w["layers"][1]["attn_scores_vv"] == 28 * 32 and w["attn_scores_vt"] == v["attn_scores_vt"]

    # heads (2, 1): layer 1 keeps 1 of 2 heads and its 1 KV head: proj 6 * ((384 - 128) / 2 + 128) = 1536,
    # pairs at 16 FLOPs: vt 192, vv 336, tv 96
    h = llm_visual_flops(cfg, layout, Cuts(heads=(2, 1)))
    assert h["layers"][0] == v["layers"][0]
    assert (h["layers"][1]["attn_proj"], h["layers"][1]["attn_scores_vt"], h["layers"][1]["attn_scores_vv"],
            h["layers"][1]["attn_scores_tv"]) == (1536, 192, 336, 96)

    # drop from layer 1: layer 1 has no visual FLOPs; r 2: FFN 6 * 3 * 8 * 8 * 2 = 2304
    assert llm_visual_flops(cfg, layout, Cuts(drop_layer=1))["total"] == 8160
    assert llm_visual_flops(cfg, layout, Cuts(ffn_ratio=2))["layers"][0]["mlp"] == 2304

    # all four: layer 0 = 2304 + 384 + 28*32 + 192 + 2304 = 6080, layer 1 dropped
    s = savings_by_cut(cfg, layout, Cuts(window=3, heads=(2, 1), drop_layer=1, ffn_ratio=2))
    assert s["before"] == 16320 and s["after"] == 6080
    # in order: window +224 per layer (28 - 21 pairs x 32) -> -448; heads on layer 1 (window on): 1536 + 192 + 28*16
    # + 96 = 2272 vs 2304 + 384 + 896 + 192 = 3776 -> 1504; drop: layer 1's 2272 + 4608 = 6880; FFN: 2304 on layer 0
    assert s["by_cut"] == {"window": -448, "heads": 1504, "drop": 6880, "ffn": 2304}


def test_head_indices_count_kv_groups():
    """H 4, KV 2 (groups {0,1}, {2,3}), one layer, a 1x1 view alone. q + o per head: 2 * (8*4 + 4*8) = 128 FLOPs,
    k + v per KV head: 2 * 2 * 8*4 = 128. Heads (0, 1): one group -> 2*128 + 128 = 384; (0, 2): two -> 512; a count
    of 2: min(2, 2) = 2 groups (the most that can be needed) -> 512."""
    cfg = dense(d=8, i=8, layers=1, heads=4, kv=2, hd=4)
    proj = lambda heads: llm_visual_flops(cfg, [(1, 1)], Cuts(heads=(heads,)))["attn_proj"]
    assert proj(None) == 4 * 128 + 2 * 128
    assert (proj((0, 1)), proj((0, 2)), proj(2), proj(0)) == (384, 512, 512, 0)
    # a calibrated mask may come as numpy integers
    assert (proj(np.int64(2)), proj(np.array([0, 1]))) == (512, 384)


def test_hybrid_by_hand():
    """tiny hybrid (d 64, I 128, 8 layers: 3 DeltaNet + 1 attention, twice; 4 heads of 16 with output gate, 2 KV
    heads; DeltaNet 2 key heads and 4 value heads of 16, conv 4); one 2x2 view and 4 text tokens after it.
    DeltaNet per token: projections 64 * (2*32 + 2*64 + 2*4) + 64*64 = 16896 MACs -> 33792; conv 2 * 4 * (2*32 + 64)
    = 1024; core: one chunk's cost / chunk size. Attention per token: q+gate 64*128, k,v 2*64*32, o 64*64 = 16384
    MACs -> 32768; pair 2 * 2 * 64 = 256. FFN 3 * 64 * 128 = 24576 MACs -> 49152."""
    cfg = tiny_config().text
    chunk = ChunkOptions(chunk_size=8)
    layout = [(2, 2), 4]
    v = llm_visual_flops(cfg, layout, chunk=chunk)
    core = deltanet_core_flops(8, cfg, chunk) // 8
    assert v["layers"][0] == {"attn_proj": 0, "attn_scores_vt": 0, "attn_scores_vv": 0, "attn_scores_tv": 0,
                              "linear_proj": 4 * 33792, "deltanet_conv": 4 * 1024, "deltanet_core": 4 * core,
                              "mlp": 4 * 49152}
    # attention layer: vv 4*5/2 = 10 pairs, tv 4*4 = 16, vt 0
    assert v["layers"][3] == {"attn_proj": 4 * 32768, "attn_scores_vt": 0, "attn_scores_vv": 10 * 256,
                              "attn_scores_tv": 16 * 256, "linear_proj": 0, "deltanet_conv": 0, "deltanet_core": 0,
                              "mlp": 4 * 49152}
    # 8 tokens = one chunk exactly: visual + text (less the conv, which text_flops leaves out) is text_flops
    t = llm_text_flops(cfg, layout, chunk=chunk)
    assert t["deltanet_core"] == 6 * (deltanet_core_flops(8, cfg, chunk) - 4 * core)
    assert v["total"] + t["total"] - v["deltanet_conv"] - t["deltanet_conv"] == \
        text_forward_flops(cfg, 1, 8, logits_tokens=1, chunk=chunk)["total"]
    # the cuts on the hybrid: window and heads act on layers 3 and 7 only; drop and FFN on every layer
    with pytest.raises(ValueError, match="full-attention layers only"):
        Cuts(heads=(2,) * 8).validate(cfg)
    w = llm_visual_flops(cfg, layout, Cuts(window=1, heads=(None, None, None, 2) * 2), chunk=chunk)
    assert w["layers"][0] == v["layers"][0]
    # layer 3: 2 of 4 heads, 2 KV groups kept (count): q+gate+o halves: (64*128 + 64*64) / 2 + 2*64*32 MACs per
    # token = 10240 -> 20480; window 1: 4 pairs (each token itself), at half the heads: 4 * 128; tv 16 * 128
    assert (w["layers"][3]["attn_proj"], w["layers"][3]["attn_scores_vv"], w["layers"][3]["attn_scores_tv"]) == \
        (4 * 20480, 4 * 128, 16 * 128)
    d = llm_visual_flops(cfg, layout, Cuts(drop_layer=2, ffn_ratio=4), chunk=chunk)
    assert all(sum(r.values()) == 0 for r in d["layers"][2:])
    assert d["layers"][0]["mlp"] == 4 * 49152 // 4 and d["layers"][0]["linear_proj"] == 4 * 33792


# --- consistency ---------------------------------------------------------------------------------------------------

CONFIGS = {"dense_tiny": tiny_config(text_model="qwen3").text, "hybrid_tiny": tiny_config().text,
           "minicpmv46": reference_config().text}
LAYOUTS = {"one_image": image_layout([(8, 8)] * 10, text_before=16, text_after=112, between=2),
           "views_only": [(4, 6), (5, 5)], "text_first": [7, (3, 3), 1, (2, 2)]}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_uncut_split_adds_up_to_text_flops(name, layout):
    """No cuts: visual part + text part = text_flops of the whole sequence (the conv aside), for any layout."""
    cfg, seg = CONFIGS[name], LAYOUTS[layout]
    v, t = llm_visual_flops(cfg, seg), llm_text_flops(cfg, seg, logits_tokens=3)
    n = sum(s if isinstance(s, int) else s[0] * s[1] for s in seg)
    assert v["total"] + t["total"] - v["deltanet_conv"] - t["deltanet_conv"] == \
        text_forward_flops(cfg, 1, n, logits_tokens=3)["total"]
    assert v["total"] == sum(sum(r.values()) for r in v["layers"])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_visual_only_sequence_is_text_flops_of_its_tokens(name):
    """Views alone, 256 tokens (two whole DeltaNet chunks): the visual part is text_flops' count without lm_head."""
    cfg = CONFIGS[name]
    v = llm_visual_flops(cfg, [(8, 16), (16, 8)])
    f = text_forward_flops(cfg, 1, 256, logits_tokens=0)
    assert v["total"] - v["deltanet_conv"] == f["total"]
    for k in ("mlp", "linear_proj", "deltanet_core", "attn_proj"):
        assert v[k] == f[k]
    assert v["attn_scores_vv"] == f["attn_scores"] and v["attn_scores_vt"] == v["attn_scores_tv"] == 0


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_each_cut_changes_exactly_its_component(name):
    cfg, seg = CONFIGS[name], LAYOUTS["one_image"]
    full = [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"]
    cuts = paper_cuts(cfg) if name == "minicpmv46" else \
        Cuts(window=3, heads=half_heads(cfg, keep_first=1), drop_layer=2, ffn_ratio=2).validate(cfg)
    base = llm_visual_flops(cfg, seg)
    for cut in CUT_ORDER:
        got = llm_visual_flops(cfg, seg, cuts.only([cut]))
        assert got["total"] < base["total"], cut
        for l, (b, g) in enumerate(zip(base["layers"], got["layers"])):
            changed = {k for k in b if b[k] != g[k]}
            if cut == "window":
                assert changed == ({"attn_scores_vv"} if l in full else set())
                assert g["attn_scores_vt"] == b["attn_scores_vt"] and g["attn_scores_tv"] == b["attn_scores_tv"]
            elif cut == "heads":
                assert changed <= {"attn_proj", "attn_scores_vt", "attn_scores_vv", "attn_scores_tv"}
                assert (changed != set()) == (l in full and cuts.heads[l] < cfg.num_attention_heads)
            elif cut == "drop":
                assert all(v == 0 for v in g.values()) if l >= cuts.drop_layer else not changed
            else:
                assert changed == {"mlp"} and g["mlp"] * cuts.ffn_ratio == b["mlp"]
    s = savings_by_cut(cfg, seg, cuts)
    assert s["before"] - s["after"] == sum(s["by_cut"].values())
    for row in s["layers"]:
        assert sum(row["before"].values()) - sum(row["after"].values()) == sum(row[c] for c in CUT_ORDER)
    # the text part does not depend on the cuts; the cut visual part is below the uncut one
    assert s["after"] == llm_visual_flops(cfg, seg, cuts)["total"] < s["before"]


def test_window_area_exact_and_paper():
    # 8x8 grid, w 5: per axis 3 + 4 + 5*4 + 4 + 3 = 34 -> 1156 pairs; the paper's 64 * 25 = 1600
    assert window_pairs(8, 8, 5) == 34 ** 2 and window_pairs(8, 8, 5, "paper") == 1600
    # a window wider than the view: every pair of the view, both ways
    assert window_pairs(3, 2, 9) == 36 and window_pairs(1, 1, 5) == 1
    for n in range(5, 12):  # n w - r (r + 1) per axis once n >= w
        assert window_pairs(n, 1, 5) == 5 * n - 6


def test_cut_validation():
    cfg = dense(layers=2)
    for bad, msg in ((Cuts(window=4), "odd"), (Cuts(heads=(2,)), "entries"), (Cuts(heads=(3, None)), r"\[0, 2\]"),
                     (Cuts(heads=((0, 0), None)), "distinct"), (Cuts(drop_layer=3), "drop_layer"),
                     (Cuts(ffn_ratio=3), "whole number")):
        with pytest.raises(ValueError, match=msg):
            bad.validate(cfg)
    assert Cuts(ffn_ratio=1.6).validate(dense(i=16)) and Cuts(heads=((1,), None)).validate(cfg)


def test_paper_cuts_on_our_models():
    ref = reference_config().text
    c = paper_cuts(ref)
    assert (c.window, c.drop_layer, c.ffn_ratio) == (5, 12, 2)
    full = [h for h in c.heads if h is not None]
    assert len(full) == 6 and full[:2] == [8, 8] and full[2:] == [4] * 4
    assert c.heads[0] is None and c.heads[3] == 8


@pytest.mark.parametrize("mode,grid", [("16x", 8), ("4x", 16)])
def test_prefill_counts_the_vision_encoder_of_the_views(mode, grid):
    """One 1344x1344 image: 10 views of 32x32 patches, 64 (16x) or 256 (4x) visual tokens each."""
    cfg = reference_config()
    cfg = cfg.replace(merger=MergerConfig(downsample_mode=mode))
    layout = image_layout([(grid, grid)] * 10, text_after=128)
    p = prefill_flops(cfg, layout, paper_cuts(cfg.text))
    assert p["vision"] == vision_flops(cfg, [1024] * 10, mode)["total"]
    assert p["llm_text"] == llm_text_flops(cfg.text, layout)["total"]
    assert p["total"] == p["vision"] + p["llm_text"] + p["llm_visual"]
