"""FLOPs of the visual tokens in the LLM, with and without the paper's four cuts (2 FLOPs per multiply-add).

Two accountings:

`paper_visual_flops`: the paper's own formula (its Table 2), nothing else: n visual tokens on every layer,
projections 4 n d^2, attention 2 n^2 d (the full square, no causal half, no text), FFN 3 n d m; with the cuts
  2 * sum_{l < L} (4 n d^2 h_l/H + 2 n w^2 d h_l/H + 3 n d m / r).
It gives 7.63 T (LLaVA-1.5-7B), 14.89 T (13B) and 1.91 T (7B, head mask `HEADMASK_7B_16`, L 16, r 2, w 5).

`llm_visual_flops` etc.: ours, for a `TextConfig` (Qwen3 dense or the Qwen3.5 hybrid) and a token layout, built
on the per-token and per-pair costs of `uhd_jax.model.text_flops` (matrix products, attention, the chunked
Gated DeltaNet; norms, activations and softmax not counted), plus the DeltaNet causal conv, which text_flops
leaves out and which we count under its own key `deltanet_conv` (2 K C per token, C = 2 kdim + vdim).

What "visual FLOPs" means here. The prefill's work splits exactly in two (their sum, less `deltanet_conv`, is
`text_forward_flops` of the same sequence; `llm_text_flops` + `llm_visual_flops` with no cuts):
- visual part: everything done on visual-token rows (attention projections incl. the output gate, DeltaNet
  projections, conv and chunked recurrence per token, FFN), and every attention (query, key) pair where the
  query or the key is visual: visual queries to text keys before them (`attn_scores_vt`), visual queries to
  visual keys (`attn_scores_vv`), and text queries to visual keys (`attn_scores_tv`, the text after the image);
- text part: text-token rows, text-to-text pairs, lm_head (and the DeltaNet chunk padding, see below).
The text part does not change with the cuts; text queries to visual keys are in the visual part because cuts
(2) and (3) remove them. The paper's formula counts only visual queries to visual keys (full square).

Layout: a sequence of segments, `int` = a run of text tokens, `(rows, cols)` = one view's visual-token grid,
in sequence order (`image_layout` builds thumbnail + slices with text before, between and after). Without
cuts, attention is causal over the whole sequence (pairs with key <= query, as text_flops counts them).

The cuts (`Cuts`), as the paper's released code applies them (reference facts copied from the paper and its
code, ZhangAIPI/YOPO_MLLM_Pruning):
(1) window w: a visual query attends to the visual keys of its own view with |drow|, |dcol| <= w // 2
    (bidirectional, clipped at the grid's borders) plus every text token before it; text queries still attend
    to all visual keys. `window_area="exact"` counts the clipped squares; `"paper"` counts w^2 keys per visual
    query as the paper's formula does (more than exact at the borders, and more than the view when w > side).
(2) heads: per full-attention layer, the number of active heads h (or the tuple of their indices); in the
    H - h inactive heads, visual tokens neither attend nor are attended: visual q / gate / o projections and
    every visual pair scale by h / H. K and V of visual tokens are needed for the KV groups holding an active
    head: with indices, exactly those groups; with a count, min(h, KV heads) groups (every active head in its
    own group: the most that can be needed, so the savings are never overstated; exact for MHA).
(3) drop_layer L: from layer L on (all layers, DeltaNet included) no visual FLOPs at all.
(4) ffn_ratio r: visual tokens use I / r FFN neurons (all layers).
In the hybrid LLM (1) and (2) act on the full-attention layers; a `heads` entry of a DeltaNet layer must be None.

DeltaNet chunked recurrence: text_flops counts it per whole chunk of the padded sequence; a visual token is
charged core(one chunk) / chunk_size (floored to an integer), and the text part takes the rest, padding included.
"""

from __future__ import annotations

import dataclasses
import numbers
from fractions import Fraction
from typing import Sequence, Union

from uhd_jax.config import ModelConfig, TextConfig
from uhd_jax.data.slicer import merge_factor
from uhd_jax.model.flops import vision_flops
from uhd_jax.model.gated_deltanet import ChunkOptions
from uhd_jax.model.text_flops import deltanet_core_flops, text_forward_flops
from uhd_jax.model.visual_cuts import CUT_ORDER, Cuts, _frac  # noqa: F401  (Cuts lives with the model; re-exported)

# ---------------------------------------------------------------------------------------------------------------
# The paper's formula and its shapes (facts from the paper's Table 2 and its released code, ZhangAIPI/YOPO_MLLM_Pruning,
# as recorded in the project's reference notes on the paper)

LLAVA15_VISUAL_TOKENS = 576  # CLIP ViT-L/14 at 336 px: a 24 x 24 grid
LLAVA15_7B = {"hidden": 4096, "intermediate": 11008, "num_layers": 32, "num_heads": 32}
LLAVA15_13B = {"hidden": 5120, "intermediate": 13824, "num_layers": 40, "num_heads": 40}
# The released head mask "headmask_7b_16" (LLaVA-1.5-7B): active heads per layer 0..31 (499 of 1024); layers 0, 1
# keep all heads.
HEADMASK_7B_16 = (32, 32, 9, 5, 10, 4, 5, 15, 18, 13, 15, 20, 23, 24, 27, 23,
                  27, 17, 14, 18, 18, 16, 15, 8, 14, 10, 15, 5, 7, 11, 5, 24)
# The paper's settings with that mask: L = 16 of 32 (13B: 20 of 40), r = 2, w = 5 -> 1.91 T, its "YOPO (25%)" row.
# Its "12%" rows (0.92 T for 7B, 1.79 T for 13B) use masks that were not released with these numbers; not derivable.
PAPER_WINDOW, PAPER_FFN_RATIO = 5, 2


def paper_visual_flops(n: int, hidden: int, intermediate: int, num_layers: int, num_heads: int,
                       heads: Sequence[int] | None = None, drop_layer: int | None = None,
                       ffn_ratio: float | None = None, window: int | None = None) -> float:
    """The paper's visual-token prefill FLOPs: 2 * sum_{l < L} (4 n d^2 h_l/H + 2 n s d h_l/H + 3 n d m / r), where
    s = w^2 with a window and n without; defaults (all None) give the original 2 * layers * (4nd^2 + 2n^2 d + 3ndm)."""
    d, m, big_h = hidden, intermediate, num_heads
    hs = [big_h] * num_layers if heads is None else list(heads)
    if len(hs) != num_layers:
        raise ValueError(f"heads has {len(hs)} entries for {num_layers} layers")
    stop = num_layers if drop_layer is None else min(drop_layer, num_layers)
    r = Fraction(1) if ffn_ratio is None else _frac(ffn_ratio)
    span = n if window is None else window * window
    total = Fraction(0)
    for h in hs[:stop]:
        f = Fraction(h, big_h)
        total += 4 * n * d * d * f + 2 * n * span * d * f + 3 * n * d * m / r
    return float(2 * total)


# ---------------------------------------------------------------------------------------------------------------
# Our accounting

Segment = Union[int, tuple]  # int: text tokens; (rows, cols): one view's visual-token grid
HeadSpec = Union[int, Sequence[int], None]  # active-head count, active-head indices, or None (all heads)

VISUAL_KEYS = ("attn_proj", "attn_scores_vt", "attn_scores_vv", "attn_scores_tv",
               "linear_proj", "deltanet_conv", "deltanet_core", "mlp")
TEXT_KEYS = ("attn_proj", "attn_scores_tt", "linear_proj", "deltanet_conv", "deltanet_core", "mlp", "lm_head")


def half_heads(cfg: TextConfig, fraction: float = 0.5, keep_first: int = 2) -> tuple:
    """A `Cuts.heads` in the paper's proportions without a calibrated mask: the first `keep_first` full-attention
    layers keep every head, the others keep round(H * fraction); None on DeltaNet layers."""
    out, seen = [], 0
    for t in cfg.layer_types:
        if t != "full_attention":
            out.append(None)
            continue
        out.append(cfg.num_attention_heads if seen < keep_first else round(cfg.num_attention_heads * fraction))
        seen += 1
    return tuple(out)


def paper_cuts(cfg: TextConfig) -> Cuts:
    """The paper's combination on our models: w 5, about half the heads (`half_heads`), L = half depth, r 2."""
    return Cuts(window=PAPER_WINDOW, heads=half_heads(cfg), drop_layer=cfg.num_hidden_layers // 2,
                ffn_ratio=PAPER_FFN_RATIO).validate(cfg)


def image_layout(grids: Sequence[tuple[int, int]], text_before: int = 0, text_after: int = 0,
                 between: int = 0) -> tuple:
    """Segments for one image: `text_before` text tokens, the views' grids with `between` text tokens between
    consecutive views, then `text_after` text tokens (zero-length text runs left out)."""
    seg: list = [text_before] if text_before else []
    for i, g in enumerate(grids):
        if i and between:
            seg.append(between)
        seg.append((int(g[0]), int(g[1])))
    if text_after:
        seg.append(text_after)
    return tuple(seg)


def _is_view(s) -> bool:
    return not isinstance(s, int)


def layout_counts(layout: Sequence[Segment]) -> tuple[int, int]:
    """(text tokens, visual tokens) of a layout."""
    t = sum(s for s in layout if not _is_view(s))
    v = sum(s[0] * s[1] for s in layout if _is_view(s))
    return t, v


def _window_1d(n: int, w: int) -> int:
    """Sum over the n positions of a line of the keys within w // 2 on either side, clipped at the ends."""
    r = w // 2
    return sum(min(i + r, n - 1) - max(i - r, 0) + 1 for i in range(n))


def window_pairs(rows: int, cols: int, window: int, window_area: str = "exact") -> int:
    """Visual (query, key) pairs of one view under the w x w window: exact (clipped squares; the window is separable
    so the count is the product of the two 1-D sums) or the paper's w^2 per query."""
    if window_area == "paper":
        return rows * cols * window * window
    if window_area != "exact":
        raise ValueError(f"window_area must be 'exact' or 'paper', got {window_area!r}")
    return _window_1d(rows, window) * _window_1d(cols, window)


def attention_pairs(layout: Sequence[Segment], window: int | None = None, window_area: str = "exact") -> dict:
    """Causal (query, key) pairs by kind: tt (text q, text k), tv (text q, visual k), vt (visual q, text k),
    vv (visual q, visual k). With a window, vv counts each view's window pairs and vt stays all earlier text."""
    text = vis = 0
    pairs = {"tt": 0, "tv": 0, "vt": 0, "vv": 0}
    for s in layout:
        if _is_view(s):
            n = s[0] * s[1]
            pairs["vt"] += n * text
            if window is None:
                pairs["vv"] += n * vis + n * (n + 1) // 2
            else:
                pairs["vv"] += window_pairs(s[0], s[1], window, window_area)
            vis += n
        else:
            pairs["tt"] += s * text + s * (s + 1) // 2
            pairs["tv"] += s * vis
            text += s
    return pairs


@dataclasses.dataclass(frozen=True)
class _TokenCosts:
    """Per-token (and per-pair) costs of one layer type, read off text_flops."""

    mlp: int
    attn_proj: int = 0  # q (+ gate), k, v, o of one token
    attn_kv: int = 0  # the k and v part of attn_proj
    pair: int = 0  # one (query, key) pair over all heads: QK^T and AV
    linear_proj: int = 0
    conv: int = 0
    core_chunk: int = 0  # DeltaNet core of one whole chunk (all value heads)
    chunk_size: int = 1


def _token_costs(cfg: TextConfig, layer_type: str, chunk: ChunkOptions) -> _TokenCosts:
    # one layer of this type, one token: text_flops' per-token terms; at seq 1 attention has exactly one pair
    f = text_forward_flops(cfg.replace(num_hidden_layers=1, layer_types=(layer_type,)), 1, 1, logits_tokens=0,
                           chunk=chunk)
    if layer_type == "full_attention":
        kv = 2 * cfg.hidden_size * 2 * cfg.num_key_value_heads * cfg.head_dim
        return _TokenCosts(mlp=f["mlp"], attn_proj=f["attn_proj"], attn_kv=kv, pair=f["attn_scores"])
    conv_dim = 2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim \
        + cfg.linear_num_value_heads * cfg.linear_value_head_dim
    return _TokenCosts(mlp=f["mlp"], linear_proj=f["linear_proj"], conv=2 * cfg.linear_conv_kernel_dim * conv_dim,
                       core_chunk=deltanet_core_flops(chunk.chunk_size, cfg, chunk), chunk_size=chunk.chunk_size)


def _active(cfg: TextConfig, spec: HeadSpec) -> tuple[int, int]:
    """(active query heads, KV heads whose visual K/V are needed) for one layer's head entry."""
    big_h, kvh = cfg.num_attention_heads, cfg.num_key_value_heads
    if spec is None:
        return big_h, kvh
    if isinstance(spec, numbers.Integral):
        return int(spec), min(int(spec), kvh)
    group = big_h // kvh
    return len(spec), len({int(j) // group for j in spec})


def llm_visual_flops(cfg: TextConfig, layout: Sequence[Segment], cuts: Cuts = Cuts(), window_area: str = "exact",
                     chunk: ChunkOptions = ChunkOptions()) -> dict:
    """The visual part of the LLM prefill (module docstring) under `cuts`: {"layers": [per-layer dict over
    VISUAL_KEYS], each key: its sum over layers, "total"}."""
    cuts.validate(cfg)
    _, n_vis = layout_counts(layout)
    full = attention_pairs(layout)
    win = full if cuts.window is None else attention_pairs(layout, cuts.window, window_area)
    costs = {t: _token_costs(cfg, t, chunk) for t in set(cfg.layer_types)}
    stop = cfg.num_hidden_layers if cuts.drop_layer is None else cuts.drop_layer
    i_size = cfg.intermediate_size
    kept = i_size if cuts.ffn_ratio is None else int(Fraction(i_size) / _frac(cuts.ffn_ratio))
    layers = []
    for l, t in enumerate(cfg.layer_types):
        row = dict.fromkeys(VISUAL_KEYS, 0)
        layers.append(row)
        if l >= stop:
            continue
        c = costs[t]
        row["mlp"] = n_vis * c.mlp * kept // i_size
        if t == "full_attention":
            big_h, kvh = cfg.num_attention_heads, cfg.num_key_value_heads
            h, g = _active(cfg, None if cuts.heads is None else cuts.heads[l])
            row["attn_proj"] = n_vis * ((c.attn_proj - c.attn_kv) * h // big_h + c.attn_kv * g // kvh)
            pair = c.pair * h // big_h
            row["attn_scores_vt"] = win["vt"] * pair
            row["attn_scores_vv"] = win["vv"] * pair
            row["attn_scores_tv"] = win["tv"] * pair
        else:
            row["linear_proj"] = n_vis * c.linear_proj
            row["deltanet_conv"] = n_vis * c.conv
            row["deltanet_core"] = n_vis * c.core_chunk // c.chunk_size
    out: dict = {"layers": layers}
    for k in VISUAL_KEYS:
        out[k] = sum(r[k] for r in layers)
    out["total"] = sum(out[k] for k in VISUAL_KEYS)
    return out


def llm_text_flops(cfg: TextConfig, layout: Sequence[Segment], logits_tokens: int = 1,
                   chunk: ChunkOptions = ChunkOptions()) -> dict:
    """The text part of the LLM prefill (module docstring; the cuts do not change it): {each of TEXT_KEYS,
    "total"}. `logits_tokens`: positions through lm_head (1: a prefill's last position)."""
    n_text, n_vis = layout_counts(layout)
    seq = n_text + n_vis
    tt = attention_pairs(layout)["tt"]
    out = dict.fromkeys(TEXT_KEYS, 0)
    costs = {t: _token_costs(cfg, t, chunk) for t in set(cfg.layer_types)}
    core_seq = deltanet_core_flops(seq, cfg, chunk)
    for t in cfg.layer_types:
        c = costs[t]
        out["mlp"] += n_text * c.mlp
        if t == "full_attention":
            out["attn_proj"] += n_text * c.attn_proj
            out["attn_scores_tt"] += tt * c.pair
        else:
            out["linear_proj"] += n_text * c.linear_proj
            out["deltanet_conv"] += n_text * c.conv
            out["deltanet_core"] += core_seq - n_vis * c.core_chunk // c.chunk_size
    out["lm_head"] = text_forward_flops(cfg.replace(num_hidden_layers=0, layer_types=()), 1, 1,
                                        logits_tokens=logits_tokens, chunk=chunk)["lm_head"]
    out["total"] = sum(out[k] for k in TEXT_KEYS)
    return out


def savings_by_cut(cfg: TextConfig, layout: Sequence[Segment], cuts: Cuts, window_area: str = "exact",
                   chunk: ChunkOptions = ChunkOptions()) -> dict:
    """Visual FLOPs before and after `cuts`, and what each cut saves, attributed in CUT_ORDER (each cut's saving
    is measured with the earlier ones already on, so the savings add up to before - after):
    {"before", "after", "by_cut": {cut: saved}, "layers": [{"before", "after", cut: saved, ...} per layer]}."""
    runs = [llm_visual_flops(cfg, layout, cuts.only(CUT_ORDER[:i]), window_area, chunk)
            for i in range(len(CUT_ORDER) + 1)]
    layers = []
    for l in range(cfg.num_hidden_layers):
        row = {"before": runs[0]["layers"][l], "after": runs[-1]["layers"][l]}
        for i, name in enumerate(CUT_ORDER):
            row[name] = sum(runs[i]["layers"][l].values()) - sum(runs[i + 1]["layers"][l].values())
        layers.append(row)
    return {"before": runs[0]["total"], "after": runs[-1]["total"],
            "by_cut": {name: runs[i]["total"] - runs[i + 1]["total"] for i, name in enumerate(CUT_ORDER)},
            "layers": layers}


def prefill_flops(cfg: ModelConfig, layout: Sequence[Segment], cuts: Cuts = Cuts(), logits_tokens: int = 1,
                  window_area: str = "exact", chunk: ChunkOptions = ChunkOptions()) -> dict:
    """The whole prefill of one sample: vision encoder (`model/flops.py`, views of grid * patches-per-token
    patches in cfg's downsample mode) + LLM text part + LLM visual part under `cuts`, and "total"."""
    per_token = merge_factor(cfg.merger.downsample_mode, cfg.merger.merger_times) ** 2
    patches = [s[0] * s[1] * per_token for s in layout if _is_view(s)]
    out = {"vision": vision_flops(cfg, patches, cfg.merger.downsample_mode)["total"] if patches else 0,
           "llm_text": llm_text_flops(cfg.text, layout, logits_tokens, chunk)["total"],
           "llm_visual": llm_visual_flops(cfg.text, layout, cuts, window_area, chunk)["total"]}
    out["total"] = out["vision"] + out["llm_text"] + out["llm_visual"]
    return out

