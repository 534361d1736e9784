"""The plan of the visual-token cuts that the LLM reads (the paper's four cuts, see `uhd_jax.yopo.flops` for their
FLOPs): one `Cuts` per model, resolved per layer (`layer_cuts`) and grouped into runs of identical layer periods
(`segments`: the stack scans inside each run), plus the head-mask file the calibration command writes.

Semantics (the same as the FLOPs accounting; None switches a cut off):
(1) window w: visual queries attend to visual keys of their own view within a w x w square (full-attention layers).
(2) heads: per full-attention layer, the active heads; the others neither attend to nor update visual tokens.
(3) drop_layer L: from layer L on (all layers), visual tokens leave the sequence: no query attends to them and they
    are not updated; the DeltaNet layers >= L run over the text tokens only.
(4) ffn_ratio r: visual tokens use the first intermediate_size / r FFN neurons (gate/up columns, down rows), all
    layers; text tokens use the whole FFN.
`Cuts` is a frozen dataclass of ints, floats and tuples, hashable, so it can be a static field of a flax module.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from fractions import Fraction
from typing import NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np

from uhd_jax.config import TextConfig

CUT_ORDER = ("window", "heads", "drop", "ffn")  # the paper's numbering (1)-(4); savings are attributed in this order


def _frac(x) -> Fraction:
    """An int or float as the fraction it is written as (1.6 -> 8/5, not the binary double's value)."""
    return Fraction(str(x)) if isinstance(x, float) else Fraction(x)


def _tuples(h):
    """Lists (e.g. from JSON) -> tuples, recursively, so that a Cuts stays hashable."""
    return tuple(_tuples(e) for e in h) if isinstance(h, (list, tuple)) else h


@dataclasses.dataclass(frozen=True)
class Cuts:
    """One setting of the four cuts; None switches a cut off.

    window: odd side w of the visual attention window (paper: 5).
    heads: one entry per LLM layer (None on DeltaNet layers): active-head count, tuple of active-head indices,
        or None for all heads (paper: about half, layers 0 and 1 keep all). A count serves FLOPs estimates only;
        the model needs the indices (`from_head_mask`).
    drop_layer: L, the first layer without visual tokens (paper: half the depth).
    ffn_ratio: r, visual tokens use intermediate_size / r FFN neurons (paper: 2); I / r must be an integer.
    """

    window: int | None = None
    heads: tuple | None = None
    drop_layer: int | None = None
    ffn_ratio: int | float | None = None

    def __post_init__(self):
        if self.heads is not None:
            object.__setattr__(self, "heads", _tuples(self.heads))

    @property
    def any(self) -> bool:
        """Some cut is on (the model then runs the stack by `segments`)."""
        return any(v is not None for v in (self.window, self.heads, self.drop_layer, self.ffn_ratio))

    def validate(self, cfg: TextConfig) -> "Cuts":
        w = self.window
        if w is not None and (not isinstance(w, numbers.Integral) or w < 1 or w % 2 == 0):
            raise ValueError(f"window must be an odd positive int (a square centred on the query), got {self.window!r}")
        if self.heads is not None:
            if len(self.heads) != cfg.num_hidden_layers:
                raise ValueError(f"heads has {len(self.heads)} entries for {cfg.num_hidden_layers} layers")
            for i, (t, h) in enumerate(zip(cfg.layer_types, self.heads)):
                if h is None:
                    continue
                if t != "full_attention":
                    raise ValueError(f"heads[{i}]: layer {i} is a {t} layer; the head cut acts on full-attention "
                                     f"layers only, give None")
                if isinstance(h, numbers.Integral):
                    if not 0 <= h <= cfg.num_attention_heads:
                        raise ValueError(f"heads[{i}] = {h} is not in [0, {cfg.num_attention_heads}]")
                elif len(set(h)) != len(h) or not all(0 <= j < cfg.num_attention_heads for j in h):
                    raise ValueError(f"heads[{i}] = {h!r}: indices must be distinct and in [0, "
                                     f"{cfg.num_attention_heads})")
        if self.drop_layer is not None and not 0 <= self.drop_layer <= cfg.num_hidden_layers:
            raise ValueError(f"drop_layer {self.drop_layer} is not in [0, {cfg.num_hidden_layers}]")
        if self.ffn_ratio is not None:
            kept = Fraction(cfg.intermediate_size) / _frac(self.ffn_ratio)
            if self.ffn_ratio < 1 or kept.denominator != 1:
                raise ValueError(f"ffn_ratio {self.ffn_ratio}: intermediate_size {cfg.intermediate_size} / r must be a "
                                 f"whole number of neurons and r >= 1")
        return self

    def validate_for_model(self, cfg: TextConfig) -> "Cuts":
        """`validate`, plus what the model needs beyond the FLOPs estimate: head indices, not counts."""
        self.validate(cfg)
        if self.heads is not None:
            for i, h in enumerate(self.heads):
                if isinstance(h, numbers.Integral):
                    raise ValueError(f"heads[{i}] = {h} is a head count (FLOPs estimates only); the model needs the "
                                     f"tuple of active head indices (Cuts.from_head_mask)")
        return self

    def only(self, names: Sequence[str]) -> "Cuts":
        """This setting with only the named cuts (from CUT_ORDER) kept on."""
        unknown = set(names) - set(CUT_ORDER)
        if unknown:
            raise ValueError(f"unknown cuts {sorted(unknown)}; known: {CUT_ORDER}")
        return Cuts(window=self.window if "window" in names else None,
                    heads=self.heads if "heads" in names else None,
                    drop_layer=self.drop_layer if "drop" in names else None,
                    ffn_ratio=self.ffn_ratio if "ffn" in names else None)

    @classmethod
    def from_head_mask(cls, mask, cfg: TextConfig, first_layer: int = 2, **other) -> "Cuts":
        """mask [layers, heads] bool (True = active for visual tokens; `load_head_mask`) -> Cuts with `heads`:
        the active head indices on full-attention layers from `first_layer` on, None elsewhere (DeltaNet layers,
        and layers before first_layer, which keep every head). `other`: the other cuts' fields."""
        m = np.asarray(mask, bool)
        want = (cfg.num_hidden_layers, cfg.num_attention_heads)
        if m.shape != want:
            raise ValueError(f"head mask has shape {list(m.shape)}, expected [layers, heads] = {list(want)}")
        heads = tuple(tuple(int(j) for j in np.flatnonzero(m[i]))
                      if t == "full_attention" and i >= first_layer else None
                      for i, t in enumerate(cfg.layer_types))
        return cls(heads=heads, **other).validate(cfg)

    @classmethod
    def from_settings(cls, cfg: TextConfig, *, window: int = 0, head_mask: str = "", drop_fraction: float = 0.0,
                      ffn_ratio: int = 1) -> "Cuts":
        """The cuts as users set them (the trainer's `model.cuts` fields, the generate / evaluate flags): window
        (odd, 0 off), head_mask (a calibration .npz path, "" off; its mask already keeps every head on the layers
        it spares), drop_fraction (visual tokens leave at layer round(fraction x layers), 0 off), ffn_ratio
        (visual FFN width / r, 1 off). ValueError names the setting."""
        if not isinstance(window, numbers.Integral) or window < 0 or (window and window % 2 == 0):
            raise ValueError(f"window must be 0 (off) or an odd int >= 1, got {window!r}")
        if not 0.0 <= drop_fraction <= 1.0:  # the trainer's check_config bound (1: drop_layer = layers)
            raise ValueError(f"drop_fraction must be in [0, 1] (0: off), got {drop_fraction!r}")
        if not isinstance(ffn_ratio, numbers.Integral) or ffn_ratio < 1:
            raise ValueError(f"ffn_ratio must be an int >= 1 (1: off), got {ffn_ratio!r}")
        drop = round(drop_fraction * cfg.num_hidden_layers) if drop_fraction else None
        other = dict(window=int(window) or None, ffn_ratio=int(ffn_ratio) if ffn_ratio > 1 else None,
                     drop_layer=drop)
        if not head_mask:
            return cls(**other).validate(cfg)
        if not os.path.isfile(head_mask):
            raise ValueError(f"head mask {head_mask}: no such file")
        mask = load_head_mask(head_mask)  # its errors name the file
        try:
            return cls.from_head_mask(mask, cfg, first_layer=0, **other)
        except ValueError as e:
            raise ValueError(f"head mask {head_mask}: {e}") from e

    def describe(self) -> str:
        """One line for logs and result files, e.g. "window 5, heads on 4 layers, drop from layer 12, ffn / 2"."""
        on = []
        if self.window is not None:
            on.append(f"window {self.window}")
        if self.heads is not None:
            on.append(f"heads cut on {sum(h is not None for h in self.heads)} layers")
        if self.drop_layer is not None:
            on.append(f"visual tokens dropped from layer {self.drop_layer}")
        if self.ffn_ratio is not None:
            on.append(f"visual ffn / {self.ffn_ratio}")
        return ", ".join(on) or "none"


class LayerCuts(NamedTuple):
    """What the cuts do on one layer (hashable).

    active_heads: the heads that still see visual tokens (cut 2), None for all; always None on DeltaNet layers and
        dropped layers. ffn_width: FFN neurons of visual tokens (cut 4); intermediate_size when not sliced, and on
        dropped layers (no visual token is left to slice). dropped: the layer runs without visual tokens (cut 3).
    window: visual attention window (cut 1) on full-attention layers that are not dropped, else None."""

    active_heads: tuple[int, ...] | None
    ffn_width: int
    dropped: bool
    window: int | None


def layer_cuts(cfg: TextConfig, cuts: Cuts, i: int) -> LayerCuts:
    """The cuts on layer i."""
    dropped = cuts.drop_layer is not None and i >= cuts.drop_layer
    full = cfg.layer_types[i] == "full_attention"
    width = cfg.intermediate_size
    if cuts.ffn_ratio is not None and not dropped:
        width = int(Fraction(cfg.intermediate_size) / _frac(cuts.ffn_ratio))
    heads = None
    if cuts.heads is not None and full and not dropped and cuts.heads[i] is not None:
        heads = tuple(sorted(cuts.heads[i])) if not isinstance(cuts.heads[i], numbers.Integral) else cuts.heads[i]
    return LayerCuts(active_heads=heads, ffn_width=width, dropped=dropped,
                     window=cuts.window if full and not dropped else None)


class VisualLayout(NamedTuple):
    """Where the visual tokens come from, for cuts (1) window and (2) heads (`visual_attention.build_visual_index`,
    built once per forward). visual_index [B, S] int (`ModelBatch.visual_index`: slot view * T_out + output token),
    grid [B, Vr, 2] int (each view's PATCH grid, `VisionBatch.grid`), levels and out_tokens_per_view: Python ints
    (`VisionBatch.levels`, `VisionBatch.out_tokens_per_view`; static, part of the program). Build it inside the
    jitted function (MiniCPMV does), so that the two ints stay static."""

    visual_index: object
    grid: object
    levels: int
    out_tokens_per_view: int

    @classmethod
    def from_batch(cls, batch) -> "VisualLayout | None":
        """The layout of a ModelBatch (None without images)."""
        v = batch.vision
        if v is None:
            return None
        return cls(jnp.asarray(batch.visual_index), jnp.asarray(v.grid), v.levels, v.out_tokens_per_view)


class Segment(NamedTuple):
    """Layer periods [start, stop) (scan steps of the stack) with identical settings `layers` (one LayerCuts per
    layer of the period). enter_drop: index within the period of the first dropped layer when the visual tokens
    leave the sequence inside this segment (then the segment is one period long), else None."""

    start: int
    stop: int
    layers: tuple[LayerCuts, ...]
    enter_drop: int | None


def segments(cfg: TextConfig, cuts: Cuts, period: int) -> tuple[Segment, ...]:
    """Consecutive layer periods (of `period` layers, the stack's scan unit) grouped where their settings are
    identical. The period where the visual tokens leave (drop_layer) is a segment of its own."""
    n = cfg.num_hidden_layers
    if n % period:
        raise ValueError(f"period {period} does not divide {n} layers")
    out: list[Segment] = []
    for p in range(n // period):
        lcs = tuple(layer_cuts(cfg, cuts, p * period + j) for j in range(period))
        enter = None
        if cuts.drop_layer is not None and p * period <= cuts.drop_layer < (p + 1) * period:
            enter = cuts.drop_layer - p * period
        if out and enter is None and out[-1].enter_drop is None and out[-1].layers == lcs:
            out[-1] = out[-1]._replace(stop=p + 1)
        else:
            out.append(Segment(p, p + 1, lcs, enter))
    return tuple(out)


# ---------------------------------------------------------------------------------------------------------------
# Head mask file (the calibration command writes it, `Cuts.from_head_mask` reads it)

def save_head_mask(path: str | os.PathLike, mask, cfg: TextConfig | None = None) -> None:
    """Writes a head mask as .npz with one array "mask" [layers, heads] bool (True = active for visual tokens;
    DeltaNet layers all True). `mask` is that array, or a Cuts whose `heads` hold indices (then `cfg` is needed;
    None entries become all True)."""
    if isinstance(mask, Cuts):
        if cfg is None:
            raise ValueError("save_head_mask from a Cuts needs the TextConfig (layers, heads)")
        m = np.ones((cfg.num_hidden_layers, cfg.num_attention_heads), bool)
        if mask.heads is not None:
            mask.validate_for_model(cfg)
            for i, h in enumerate(mask.heads):
                if h is not None:
                    m[i] = False
                    m[i, list(h)] = True
        mask = m
    m = np.asarray(mask)
    if m.ndim != 2 or m.dtype != np.bool_:
        raise ValueError(f"a head mask is a [layers, heads] bool array, got {m.dtype} of shape {list(m.shape)}")
    np.savez(path, mask=m)


def load_head_mask(path: str | os.PathLike) -> np.ndarray:
    """The [layers, heads] bool array written by `save_head_mask`."""
    try:
        f = np.load(path, allow_pickle=False)
    except OSError:
        raise
    except Exception as e:  # a corrupt or foreign file: name it
        raise ValueError(f"{path}: not a head-mask .npz ({type(e).__name__}: {e})") from e
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: not a head-mask .npz (a single array; save_head_mask writes an .npz)")
    with f:
        if "mask" not in f:
            raise ValueError(f"{path}: no 'mask' array (a head mask file holds mask [layers, heads] bool)")
        m = f["mask"]
    if m.ndim != 2 or m.dtype != np.bool_:
        raise ValueError(f"{path}: mask must be [layers, heads] bool, got {m.dtype} of shape {list(m.shape)}")
    return m


# ---------------------------------------------------------------------------------------------------------------
# Inside jit: where the text tokens are

def text_plan(attention_mask, visual_mask, text_slots: int):
    """attention_mask, visual_mask [B, S] bool (real tokens first) -> (text_index [B, T] int32, text_valid [B, T]
    bool, slot [B, S] int32, is_text [B, S] bool, count [B] int32), T = text_slots (static).

    Text tokens = real and not visual. text_index[b, j] is the position of row b's j-th text token (original order)
    for j < count[b]; the slots after point at other positions and are marked invalid. slot[b, s] is the compact
    slot of text position s (clipped into [0, T) elsewhere, where is_text is False). Both are gathers, never a
    scatter that could drop: a stable sort puts every row's text positions first, so with count[b] <= T (checked on
    the host by the Packer, `check_text_slots`) every text token has its slot. A row with count[b] > T is marked by
    the model (its outputs become NaN), never silently truncated."""
    s = attention_mask.shape[1]
    if not 1 <= text_slots <= s:
        raise ValueError(f"text_slots {text_slots} must be in [1, sequence length {s}]")
    is_text = attention_mask.astype(bool) & ~visual_mask.astype(bool)
    order = jnp.argsort(~is_text, axis=1, stable=True).astype(jnp.int32)  # text positions first, in order
    text_index = order[:, :text_slots]
    count = is_text.sum(-1).astype(jnp.int32)
    text_valid = jnp.arange(text_slots, dtype=jnp.int32)[None] < count[:, None]
    slot = jnp.clip(jnp.cumsum(is_text, axis=1, dtype=jnp.int32) - 1, 0, text_slots - 1)
    return text_index, text_valid, slot, is_text, count


def gather_rows(a, index):
    """a [B, S, ...], index [B, T] -> [B, T, ...] (a per-row gather)."""
    return jnp.take_along_axis(a, index.reshape(index.shape + (1,) * (a.ndim - 2)), axis=1)


def scatter_back(compact, base, slot, is_text):
    """compact [B, T, D] text rows, base [B, S, D] -> [B, S, D]: text positions take their compact row, the others
    keep base (written as a gather: nothing can be dropped)."""
    return jnp.where(is_text[..., None], gather_rows(compact, slot).astype(base.dtype), base)
