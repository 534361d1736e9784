"""Host-side layout of pixel views into the static arrays the vision encoder takes.

Each view's patches are laid out in *block order*: with `levels` rounds of 2x2 merging
(16x mode: intra-ViT merger + post-ViT merger = 2 levels; 4x mode: 1), the patch grid is cut into
(2^levels x 2^levels) blocks taken row-major, and inside each block the quadrants recursively
row-major, down to the 4 patches of a 2x2 window. Then every merge is the reshape
`[.., L, D] -> [.., L/4, 4D]`, and the final tokens come out in row-major order of the merged grid,
which is the reference's order. Positions are computed per patch before the reordering, so they
travel with their patch.

Views are padded to a fixed per-view token budget (`tokens_per_view`) and a fixed number of views;
`num_tokens` says how many leading entries of each view are real.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.struct
import numpy as np

MODES = ("16x", "4x")


def merge_levels(mode: str, merger_times: int = 1) -> int:
    """How many 2x2 folds a view goes through: the intra-ViT merger (16x only) plus the post-ViT rounds."""
    if mode not in MODES:
        raise ValueError(f"downsample mode must be one of {MODES}, got {mode!r}")
    return (1 if mode == "16x" else 0) + merger_times


def patches_per_token(mode: str, merger_times: int = 1) -> int:
    """Patches folded into one LLM token: 4^levels (16 in 16x mode, 4 in 4x mode, with one post-ViT round)."""
    return 1 << (2 * merge_levels(mode, merger_times))


def block_order(h: int, w: int, levels: int) -> np.ndarray:
    """Permutation `perm` [h*w] so that `row_major[perm]` is in block order. Needs h, w divisible by 2^levels."""
    b = 1 << levels
    if h % b or w % b:
        raise ValueError(f"patch grid {h}x{w} is not divisible by {b} (= 2^{levels} merge levels)")
    idx = np.arange(h * w).reshape((h // b,) + (2,) * levels + (w // b,) + (2,) * levels)
    # axes: R, r_{L-1}..r_0, C, c_{L-1}..c_0  ->  R, C, (r_{L-1}, c_{L-1}), ..., (r_0, c_0)
    row_axes = list(range(0, levels + 1))
    col_axes = list(range(levels + 1, 2 * levels + 2))
    order = [row_axes[0], col_axes[0]]
    for j in range(1, levels + 1):
        order += [row_axes[j], col_axes[j]]
    return idx.transpose(order).reshape(-1)


def nearest_position_ids(h: int, w: int, side: int) -> np.ndarray:
    """Row-major [h*w] indices into the side x side position table, nearest-position mapping.

    Same float32 arithmetic as the reference (`bucketize(arange(h)/h, arange(1/side, 1, 1/side), right=True)`).
    """
    # torch.arange(start, end, step) in float32 accumulates start + i*step in double, then casts
    boundaries = (1 / side + np.arange(side - 1, dtype=np.float64) * (1 / side)).astype(np.float32)
    bh = np.searchsorted(boundaries, np.arange(h, dtype=np.float32) / np.float32(h), side="right")
    bw = np.searchsorted(boundaries, np.arange(w, dtype=np.float32) / np.float32(w), side="right")
    return (bh[:, None] * side + bw[None, :]).reshape(-1).astype(np.int32)


def patchify(view: np.ndarray, patch_size: int) -> np.ndarray:
    """[C, H, W] pixels -> row-major patches [H/P * W/P, C*P*P] (channel, row, column inside a patch)."""
    c, hh, ww = view.shape
    if hh % patch_size or ww % patch_size:
        raise ValueError(f"view of {hh}x{ww} px is not a multiple of patch size {patch_size}")
    h, w = hh // patch_size, ww // patch_size
    x = view.reshape(c, h, patch_size, w, patch_size).transpose(1, 3, 0, 2, 4)
    return x.reshape(h * w, c * patch_size * patch_size)


@flax.struct.dataclass
class VisionBatch:
    """Static-shape input of the vision encoder. `...` are the view-slot dims: [V] from `pack_views`, [B, Vr]
    in a ModelBatch (each row's own slots); the encoder runs all slots as one batch of views.

    patches:    [..., T, C*P*P] float, block order, zero padding.
    pos_ids:    [..., T] int32 indices into the position table (0 on padding).
    num_tokens: [...] int32 real patches per view (0 for an empty view slot).
    grid:       [..., 2] int32 patch grid (h, w) of each view (0, 0 for an empty slot).
    mode:       "16x" or "4x" (static: part of the compiled program).
    merger_times: post-ViT merge rounds the layout was made for (static).
    """

    patches: np.ndarray
    pos_ids: np.ndarray
    num_tokens: np.ndarray
    grid: np.ndarray
    mode: str = flax.struct.field(pytree_node=False, default="16x")
    merger_times: int = flax.struct.field(pytree_node=False, default=1)

    @property
    def levels(self) -> int:
        return merge_levels(self.mode, self.merger_times)

    @property
    def patches_per_token(self) -> int:
        return patches_per_token(self.mode, self.merger_times)

    @property
    def tokens_per_view(self) -> int:
        return self.patches.shape[-2]

    @property
    def out_tokens_per_view(self) -> int:
        return self.tokens_per_view // self.patches_per_token


def view_token_count(h: int, w: int, mode: str, merger_times: int = 1) -> int:
    """Visual tokens one view of h x w patches gives the LLM."""
    return (h * w) // patches_per_token(mode, merger_times)


@functools.lru_cache(maxsize=512)
def view_order(h: int, w: int, levels: int, positions_per_side: int) -> tuple[np.ndarray, np.ndarray]:
    """(perm, pos_ids) of an h x w view in block order; cached, read-only."""
    perm = block_order(h, w, levels)
    pos = nearest_position_ids(h, w, positions_per_side)[perm]
    perm.setflags(write=False)
    pos.setflags(write=False)
    return perm, pos


def write_view(patches: np.ndarray, pos_ids: np.ndarray, num_tokens: np.ndarray, grid: np.ndarray, slot: int,
               view: np.ndarray, *, patch_size: int, levels: int, positions_per_side: int):
    """Writes one [C, H, W] view into slot `slot` of preallocated VisionBatch arrays (block order, positions).
    The rest of the slot is left as it is (zeros when freshly allocated)."""
    view = np.asarray(view)
    if view.ndim != 3:
        raise ValueError(f"expected [C, H, W] pixels, got shape {view.shape}")
    h, w = view.shape[1] // patch_size, view.shape[2] // patch_size
    perm, pos = view_order(h, w, levels, positions_per_side)
    flat = patchify(view, patch_size)
    n = h * w
    if n > patches.shape[1]:
        raise ValueError(f"{n} patches ({h}x{w}) do not fit tokens_per_view={patches.shape[1]}")
    out = patches[slot, :n]
    if out.dtype == flat.dtype:
        np.take(flat, perm, axis=0, out=out)
    else:
        out[...] = flat[perm]
    pos_ids[slot, :n] = pos
    num_tokens[slot] = n
    grid[slot] = (h, w)


def pack_views(views: Sequence[np.ndarray], *, patch_size: int, positions_per_side: int, mode: str = "16x",
               merger_times: int = 1, tokens_per_view: int | None = None, num_views: int | None = None,
               dtype=np.float32) -> VisionBatch:
    """Lays out normalized pixel views ([C, H, W] each, H and W multiples of patch_size * 2^levels)
    into a VisionBatch padded to `tokens_per_view` patches per view and `num_views` views."""
    levels = merge_levels(mode, merger_times)
    unit = patches_per_token(mode, merger_times)
    views = [np.asarray(v) for v in views]
    for i, v in enumerate(views):
        if v.ndim != 3:
            raise ValueError(f"view {i}: expected [C, H, W] pixels, got shape {v.shape}")
    counts = [(v.shape[1] // patch_size) * (v.shape[2] // patch_size) for v in views]
    longest = max(counts, default=unit)
    if tokens_per_view is None:
        tokens_per_view = -(-longest // unit) * unit
    if tokens_per_view % unit:
        raise ValueError(f"tokens_per_view={tokens_per_view} must be a multiple of {unit} in {mode} mode")
    if longest > tokens_per_view:
        raise ValueError(f"a view has {longest} patches, more than tokens_per_view={tokens_per_view}")
    num_views = len(views) if num_views is None else num_views
    if len(views) > num_views:
        raise ValueError(f"{len(views)} views do not fit num_views={num_views}")
    channels = views[0].shape[0] if views else 3
    patches = np.zeros((num_views, tokens_per_view, channels * patch_size * patch_size), dtype)
    pos_ids = np.zeros((num_views, tokens_per_view), np.int32)
    num_tokens = np.zeros((num_views,), np.int32)
    grid = np.zeros((num_views, 2), np.int32)
    for i, v in enumerate(views):
        try:
            write_view(patches, pos_ids, num_tokens, grid, i, v, patch_size=patch_size, levels=levels,
                       positions_per_side=positions_per_side)
        except ValueError as e:
            raise ValueError(f"view {i}: {e}") from None
    return VisionBatch(patches=patches, pos_ids=pos_ids, num_tokens=num_tokens, grid=grid, mode=mode,
                       merger_times=merger_times)
