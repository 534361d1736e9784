"""LLaVA-UHD slicing of one image into a thumbnail plus a grid of slices, as MiniCPM-V 4.6 does it.

Matches `transformers`' `MiniCPMV4_6ImageProcessorPil` exactly (same arithmetic, including Python's
banker's `round` in `ensure_divide`; same PIL bicubic resizes; same float32 rescale + normalize):

* `get_sliced_grid` picks a (rows, cols) grid among `multiple - 1, multiple, multiple + 1` slices
  (`multiple = min(ceil(area / scale_resolution^2), max_slice_nums)`) whose aspect is closest in log space;
  ties go to more rows. `None` (no slices) when `multiple <= 1`.
* The thumbnail is the whole image resized by `find_best_resize` (to about `scale_resolution^2` px, each side
  rounded to a multiple of `patch_size * merge`, merge 4 in "16x" mode and 2 in "4x" mode; upscaling only when
  there are no slices).
* `merger_times` (the model's post-ViT merge rounds, config.json; the reference processor has no such setting and
  assumes 1) doubles `merge` per extra round, so every view's patch grid divides by 2^levels and folds exactly;
  with merger_times=1 (MiniCPM-V 4.6) every size and pixel is the reference's.
* The slices come from one resize of the whole image to `get_refine_size`, cut into the grid, row by row.
* Views are in the order thumbnail, then slices row-major; each is a [3, H, W] float32 array,
  `(x * rescale_factor - mean) / std`, computed through a 256-entry table per channel that reproduces the
  reference's float64-rescale-then-float32-normalize bit for bit.

Everything but the resizes is integer / table arithmetic, so `plan_slices` (sizes only, no pixels) is cheap and
is what the processor uses to count placeholder tokens.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Sequence

import numpy as np
from PIL import Image

from uhd_jax.data.layout import MODES, merge_levels

# The reference processor's defaults (class attributes of MiniCPMV4_6ImageProcessorPil).
DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.5, 0.5, 0.5)


@dataclasses.dataclass(frozen=True)
class SliceConfig:
    """Image-processing settings; `from_preprocessor_config` reads a HF `preprocessor_config.json`."""

    max_slice_nums: int = 9
    scale_resolution: int = 448
    patch_size: int = 14
    slice_mode: bool = True
    downsample_mode: str = "16x"
    use_image_id: bool = True
    image_mean: tuple[float, ...] = DEFAULT_MEAN
    image_std: tuple[float, ...] = DEFAULT_STD
    rescale_factor: float = 1 / 255
    merger_times: int = 1  # the model's post-ViT merge rounds (config.json), not a preprocessor_config key

    def __post_init__(self):
        if self.downsample_mode not in MODES:
            raise ValueError(f"downsample_mode must be one of {MODES}, got {self.downsample_mode!r}")
        if self.max_slice_nums < 1:
            raise ValueError(f"max_slice_nums must be >= 1, got {self.max_slice_nums}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("image_mean and image_std need 3 entries (RGB)")
        if not isinstance(self.merger_times, int) or isinstance(self.merger_times, bool) or self.merger_times < 1:
            raise ValueError(f"merger_times must be an integer >= 1, got {self.merger_times!r}")

    @property
    def merge_factor(self) -> int:
        return merge_factor(self.downsample_mode, self.merger_times)

    @property
    def token_divisor(self) -> int:
        """Patches per visual token: 16 in "16x" mode, 4 in "4x" mode (x4 per extra merger round)."""
        return self.merge_factor**2

    def replace(self, **kw) -> "SliceConfig":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_dict(cls, d: dict, **overrides) -> "SliceConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in fields}
        kw.update(overrides)
        for k in ("image_mean", "image_std"):
            if k in kw:
                v = kw[k]
                kw[k] = tuple(float(x) for x in (v if isinstance(v, (list, tuple)) else [v] * 3))
        return cls(**kw)

    @classmethod
    def from_preprocessor_config(cls, path: str | os.PathLike, **overrides) -> "SliceConfig":
        """`path`: a preprocessor_config.json file or a model directory holding one."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "preprocessor_config.json")
        with open(path) as f:
            return cls.from_dict(json.load(f), **overrides)


def merge_factor(downsample_mode: str, merger_times: int = 1) -> int:
    """Side of the patch block one visual token covers: 4 ("16x": two 2x2 merges) or 2 ("4x"), doubled for each
    post-ViT merger round beyond the first."""
    if downsample_mode not in MODES:
        raise ValueError(f"downsample_mode must be one of {MODES}, got {downsample_mode!r}")
    return 1 << merge_levels(downsample_mode, merger_times)


def ensure_divide(length: float, divisor: int) -> int:
    """Nearest multiple of `divisor` (Python's banker's `round`), at least `divisor`."""
    return max(round(length / divisor) * divisor, divisor)


def find_best_resize(image_size: tuple[float, float], scale_resolution: int, patch_size: int,
                     downsample_mode: str = "16x", allow_upscale: bool = False,
                     merger_times: int = 1) -> tuple[int, int]:
    """(height, width) in px: about scale_resolution^2 px if the image is larger (or `allow_upscale`),
    each side a multiple of patch_size * merge_factor."""
    height, width = image_size
    if (height * width > scale_resolution * scale_resolution) or allow_upscale:
        aspect_ratio = width / height
        height = int(scale_resolution / math.sqrt(aspect_ratio))
        width = int(height * aspect_ratio)
    m = merge_factor(downsample_mode, merger_times)
    best_width = ensure_divide(width, patch_size * m)
    best_height = ensure_divide(height, patch_size * m)
    return best_height, best_width


def get_refine_size(image_size: tuple[int, int], grid: Sequence[int], scale_resolution: int, patch_size: int,
                    downsample_mode: str = "16x", allow_upscale: bool = False,
                    merger_times: int = 1) -> tuple[int, int]:
    """(height, width) in px of the resize that is then cut into the grid of slices."""
    height, width = image_size
    grid_y, grid_x = grid
    refine_width = ensure_divide(width, grid_x)
    refine_height = ensure_divide(height, grid_y)
    best_height, best_width = find_best_resize((refine_height / grid_y, refine_width / grid_x), scale_resolution,
                                               patch_size, downsample_mode, allow_upscale, merger_times)
    return best_height * grid_y, best_width * grid_x


def get_sliced_grid(image_size: tuple[int, int], max_slice_nums: int, scale_resolution: int) -> list[int] | None:
    """[rows, cols] of slices, or None when the image gets no slices."""
    original_height, original_width = image_size
    log_ratio = math.log(original_width / original_height)
    ratio = original_width * original_height / (scale_resolution * scale_resolution)
    multiple = min(math.ceil(ratio), max_slice_nums)
    if multiple <= 1:
        return None
    best_grid = [1, 1]
    min_error = float("inf")
    for num_slices in (multiple - 1, multiple, multiple + 1):
        if num_slices == 1 or num_slices > max_slice_nums:
            continue
        for num_rows in range(1, num_slices + 1):
            if num_slices % num_rows == 0:
                num_cols = num_slices // num_rows
                error = abs(log_ratio - math.log(num_cols / num_rows))
                if error < min_error:
                    best_grid = [num_rows, num_cols]
                    min_error = error
                elif error == min_error and num_rows > best_grid[0]:
                    best_grid = [num_rows, num_cols]
    return best_grid


@dataclasses.dataclass(frozen=True)
class SlicePlan:
    """Sizes only. image_size, thumb_size, refine_size: (height, width) px; grid: (rows, cols) or None;
    view_sizes: px (h, w) of every view, thumbnail first then slices row by row;
    target_sizes: patch grid (h, w) of every view (the reference's `target_sizes`);
    merger_times: post-ViT merge rounds the sizes were made for."""

    image_size: tuple[int, int]
    grid: tuple[int, int] | None
    thumb_size: tuple[int, int]
    refine_size: tuple[int, int] | None
    view_sizes: tuple[tuple[int, int], ...]
    target_sizes: tuple[tuple[int, int], ...]
    downsample_mode: str
    merger_times: int = 1

    @property
    def num_views(self) -> int:
        return len(self.view_sizes)

    @property
    def view_tokens(self) -> tuple[int, ...]:
        """LLM tokens (<|image_pad|> placeholders) per view: h * w / 16 ("16x") or / 4 ("4x"), / 4 more per extra
        merger round."""
        d = merge_factor(self.downsample_mode, self.merger_times) ** 2
        return tuple(h * w // d for h, w in self.target_sizes)


def plan_slices(image_size: tuple[int, int], cfg: SliceConfig, max_slice_nums: int | None = None) -> SlicePlan:
    """The reference's sizes for an image of (height, width) px, without touching pixels."""
    h, w = int(image_size[0]), int(image_size[1])
    if h < 1 or w < 1:
        raise ValueError(f"image size must be positive, got {h}x{w}")
    msn = cfg.max_slice_nums if max_slice_nums is None else int(max_slice_nums)
    if msn < 1:
        raise ValueError(f"max_slice_nums must be >= 1, got {msn}")
    p, mode, mt = cfg.patch_size, cfg.downsample_mode, cfg.merger_times
    grid = get_sliced_grid((h, w), msn, cfg.scale_resolution) if cfg.slice_mode else None
    thumb = find_best_resize((h, w), cfg.scale_resolution, p, mode, allow_upscale=grid is None, merger_times=mt)
    views = [thumb]
    refine = None
    if grid is not None:
        refine = get_refine_size((h, w), grid, cfg.scale_resolution, p, mode, allow_upscale=True, merger_times=mt)
        sh, sw = refine[0] // grid[0], refine[1] // grid[1]
        views += [(sh, sw)] * (grid[0] * grid[1])
    targets = tuple((vh // p, vw // p) for vh, vw in views)
    return SlicePlan(image_size=(h, w), grid=None if grid is None else (grid[0], grid[1]), thumb_size=thumb,
                     refine_size=refine, view_sizes=tuple(views), target_sizes=targets, downsample_mode=mode,
                     merger_times=mt)


_LUT_CACHE: dict = {}


def normalize_table(cfg: SliceConfig) -> np.ndarray:
    """[3, 256] float32: uint8 value -> normalized value, exactly the reference's
    `float32(float64(x) * rescale_factor)` then float32 `(x - mean) / std`."""
    key = (cfg.rescale_factor, cfg.image_mean, cfg.image_std)
    lut = _LUT_CACHE.get(key)
    if lut is None:
        x = (np.arange(256, dtype=np.float64) * cfg.rescale_factor).astype(np.float32)
        mean = np.asarray(cfg.image_mean, np.float32)[:, None]
        std = np.asarray(cfg.image_std, np.float32)[:, None]
        lut = ((x[None, :] - mean) / std).astype(np.float32)
        lut.setflags(write=False)
        _LUT_CACHE[key] = lut
    return lut


def normalize_image(rgb: np.ndarray, cfg: SliceConfig) -> np.ndarray:
    """[H, W, 3] uint8 -> [3, H, W] float32 normalized."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected [H, W, 3] uint8 pixels, got {rgb.dtype} {rgb.shape}")
    lut = normalize_table(cfg)
    chw = np.ascontiguousarray(rgb.transpose(2, 0, 1))
    out = np.empty(chw.shape, np.float32)
    for c in range(3):
        out[c] = lut[c][chw[c]]
    return out


def _as_rgb_pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            raise ValueError(f"slice_image needs an RGB image, got mode {image.mode!r} (use image_io.to_rgb)")
        return image
    a = np.asarray(image)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected a PIL RGB image or [H, W, 3] uint8 array, got {a.dtype} {a.shape}")
    return Image.fromarray(a, "RGB")


def _resize(img: Image.Image, size_hw: tuple[int, int]) -> Image.Image:
    # The reference converts to PIL and calls .resize((w, h), BICUBIC, reducing_gap=None); PIL returns a copy
    # when the size is unchanged, so this is the same in that case too.
    if img.size == (size_hw[1], size_hw[0]):
        return img
    return img.resize((size_hw[1], size_hw[0]), resample=Image.Resampling.BICUBIC)


@dataclasses.dataclass
class SlicedImage:
    plan: SlicePlan
    views: list[np.ndarray]  # [3, H, W] float32, thumbnail first, then slices row by row

    @property
    def grid(self):
        return self.plan.grid

    @property
    def target_sizes(self):
        return self.plan.target_sizes


def slice_image(image, cfg: SliceConfig, max_slice_nums: int | None = None,
                plan_size: tuple[int, int] | None = None) -> SlicedImage:
    """Thumbnail + slices of one RGB image (PIL RGB or [H, W, 3] uint8), normalized, [3, H, W] float32 each.

    `plan_size`: plan the slices for this (h, w) instead of the image's own size (used when the image was
    decoded at reduced scale, e.g. JPEG draft mode; the views then have the sizes the full image would give)."""
    img = _as_rgb_pil(image)
    plan = plan_slices(plan_size or (img.height, img.width), cfg, max_slice_nums)
    views = [normalize_image(np.asarray(_resize(img, plan.thumb_size)), cfg)]
    if plan.grid is not None:
        refine = normalize_image(np.asarray(_resize(img, plan.refine_size)), cfg)
        gy, gx = plan.grid
        sh, sw = plan.view_sizes[1]
        for r in range(gy):
            for c in range(gx):
                views.append(np.ascontiguousarray(refine[:, r * sh:(r + 1) * sh, c * sw:(c + 1) * sw]))
    return SlicedImage(plan=plan, views=views)
