"""Robust image loading: file (or bytes, or PIL image) -> PIL RGB image, with errors that name the file.

Conversion to RGB follows the reference (`transformers.image_transforms.convert_to_rgb`, what
`MiniCPMV4_6ImageProcessorPil` applies to every PIL image it is given): an image with an alpha band
(RGBA, LA, PA) or a `transparency` entry (P / L / RGB with a transparent colour) is composited onto white;
everything else goes through PIL's `convert("RGB")` (L, P, CMYK, YCbCr, 1-bit, ...).

Choices that differ from one of the reference's two input routes (documented, each switchable):

* EXIF orientation: applied (`PIL.ImageOps.exif_transpose`), like the reference's own loader
  (`transformers.image_utils.load_image`, used when the processor is given a path or URL). The reference does
  NOT apply it to a PIL image handed to the processor; pass `exif_transpose=False` to get that behaviour.
* Alpha: composited onto white (the reference's `convert_to_rgb`). Its path loader instead calls plain
  `convert("RGB")`, which drops alpha and shows whatever colour sits under transparent pixels;
  `alpha="drop"` gives that.
* 16/32-bit integer and float images (modes I;16*, I, F): PIL's `convert("RGB")`, which the reference uses,
  clips every value above 255 to 255, so a 16-bit scan comes out almost white. By default we rescale instead
  (16-bit values and `I` images with values above 255 divided by 257, rounded; float images in [0, 1] times
  255); `high_bit_depth="clip"` gives the reference's clipping, `"error"` refuses such files.
* Animated images (GIF, APNG, WebP): the first frame.
* Decompression bombs: images with more than `max_pixels` pixels are refused before decoding (PIL's own global
  limit is bypassed so that this limit, not PIL's, applies).
* Truncated files are refused (PIL's `LOAD_TRUNCATED_IMAGES` is not consulted).

Bad records (an ImageLoadError is a data error) are skipped and counted by the grain pipeline, `uhd_jax.data.pipeline`.
"""

from __future__ import annotations

import dataclasses
import io
import os
import threading
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 100_000_000  # 8000x6000 (48 MP) passes; PIL's own default refuses > 179 MP


class ImageLoadError(ValueError):
    """An image that cannot be used. `source` names the file (or '<bytes>' / '<PIL image>'), `reason` says why."""

    def __init__(self, source: str, reason: str):
        self.source = source
        self.reason = reason
        super().__init__(f"{source}: {reason}")


@dataclasses.dataclass(frozen=True)
class LoadOptions:
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    exif_transpose: bool = True
    alpha: str = "white"  # "white" (reference convert_to_rgb) or "drop" (plain convert("RGB"))
    high_bit_depth: str = "scale"  # "scale", "clip" (reference), or "error"
    # Optional JPEG draft decoding at 1/2, 1/4 or 1/8 scale when the result stays at least this many times the
    # size the slicer needs. Changes pixels (not bit-exact with the reference): None = off (default).
    jpeg_draft_margin: float | None = None

    def __post_init__(self):
        if self.alpha not in ("white", "drop"):
            raise ValueError(f"alpha must be 'white' or 'drop', got {self.alpha!r}")
        if self.high_bit_depth not in ("scale", "clip", "error"):
            raise ValueError(f"high_bit_depth must be 'scale', 'clip' or 'error', got {self.high_bit_depth!r}")


_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_open_lock = threading.Lock()


def _source_name(src) -> str:
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return "<bytes>"
    if isinstance(src, Image.Image):
        return getattr(src, "filename", "") or "<PIL image>"
    return f"<{type(src).__name__}>"


def _open(src, name: str, max_pixels: int | None) -> Image.Image:
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if not os.path.exists(path):
            raise ImageLoadError(name, "no such file")
        if os.path.isdir(path):
            raise ImageLoadError(name, "is a directory, not an image file")
        try:
            size = os.path.getsize(path)
        except OSError as e:
            raise ImageLoadError(name, f"cannot stat file: {e}") from None
        if size == 0:
            raise ImageLoadError(name, "empty file (0 bytes)")
        fp = path
    elif isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise ImageLoadError(name, "empty data (0 bytes)")
        fp = io.BytesIO(bytes(src))
    else:
        raise ImageLoadError(name, f"unsupported image source type {type(src).__name__}")
    # PIL checks its global MAX_IMAGE_PIXELS inside open(); we apply our own limit instead.
    with _open_lock:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(fp)
        except UnidentifiedImageError:
            raise ImageLoadError(name, "not a recognized image format (unidentified or corrupt header)") from None
        except (OSError, ValueError, SyntaxError) as e:
            raise ImageLoadError(name, f"cannot open image: {e}") from None
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    _check_pixels(img, name, max_pixels)
    return img


def _check_pixels(img: Image.Image, name: str, max_pixels: int | None):
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageLoadError(name, f"image has no pixels ({w}x{h})")
    if max_pixels is not None and w * h > max_pixels:
        raise ImageLoadError(name, f"image of {w}x{h} = {w * h} pixels exceeds max_pixels={max_pixels} "
                                   "(decompression bomb guard)")


def _high_bit_to_l(img: Image.Image, name: str, how: str) -> Image.Image:
    if how == "error":
        raise ImageLoadError(name, f"{img.mode} ({'float' if img.mode == 'F' else 'high bit depth'}) images are "
                                   "not accepted (high_bit_depth='error')")
    if how == "clip":
        return img  # PIL's convert("RGB") clips at 255, as the reference does
    a = np.asarray(img)
    if img.mode == "F":
        a = a.astype(np.float64)
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
        if a.size and a.min() >= 0.0 and a.max() <= 1.0:
            a = a * 255.0
        a = np.clip(np.rint(a), 0, 255)
    else:
        a = a.astype(np.int64)
        sixteen = img.mode.startswith("I;16") or (a.size and a.max() > 255)
        if sixteen:
            a = np.rint(np.clip(a, 0, 65535) / 257.0)
        a = np.clip(a, 0, 255)
    return Image.fromarray(a.astype(np.uint8), "L")


def _exif_orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - a malformed EXIF block is not a reason to refuse the pixels
        return 1


def to_rgb(img: Image.Image, *, alpha: str = "white", high_bit_depth: str = "scale",
           name: str | None = None) -> Image.Image:
    """PIL image of any mode -> mode RGB (see the module notes)."""
    name = name or _source_name(img)
    if img.mode in _HIGH_BIT_MODES:
        img = _high_bit_to_l(img, name, high_bit_depth)
    has_alpha = "A" in img.getbands() or img.info.get("transparency") is not None
    if img.mode == "RGB" and not (has_alpha and alpha == "white"):
        return img
    if has_alpha and alpha == "white":
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(src, options: LoadOptions | None = None, *, target_size: tuple[int, int] | None = None,
               **kw) -> Image.Image:
    """Path / bytes / PIL image -> fully decoded PIL RGB image. Raises ImageLoadError naming the source.

    `target_size` (h, w px): the largest size the caller will resize to; only used with
    `options.jpeg_draft_margin` (JPEG draft decoding, off by default)."""
    options = dataclasses.replace(options or LoadOptions(), **kw) if kw else (options or LoadOptions())
    name = _source_name(src)
    if isinstance(src, Image.Image):
        img = src
        _check_pixels(img, name, options.max_pixels)
    else:
        img = _open(src, name, options.max_pixels)
    try:
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)  # animated: first frame
        if options.jpeg_draft_margin and target_size is not None and img.format == "JPEG" and img.mode in (
                "RGB", "L"):
            # draft() may only pick a scale whose result is >= the requested size
            th, tw = target_size
            m = options.jpeg_draft_margin
            img.draft("RGB" if img.mode == "RGB" else "L", (int(tw * m), int(th * m)))
        img.load()
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageLoadError(name, f"decompression bomb: {e}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        msg = str(e)
        if "truncated" in msg.lower():
            raise ImageLoadError(name, f"truncated image file ({msg})") from None
        raise ImageLoadError(name, f"cannot decode image: {msg}") from None
    try:
        if options.exif_transpose and _exif_orientation(img) in (2, 3, 4, 5, 6, 7, 8):
            img = ImageOps.exif_transpose(img)  # (exif_transpose copies even when there is nothing to do)
        return to_rgb(img, alpha=options.alpha, high_bit_depth=options.high_bit_depth, name=name)
    except ImageLoadError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageLoadError(name, f"cannot convert image to RGB: {e}") from None
