"""The built-in OCR task: record i is an image with a random string rendered on it, and that string as the answer.

Needs no files: each record is rendered on demand from (seed, i), so record i is the same image and text in every
process and every run. Images vary in size and aspect ratio (each side `min_side`..`max_side` px, aspect up to
`max_aspect`), the background is a colour gradient or (a `photo_fraction` of the time) a crop of a photograph
shipped in scikit-image (astronaut, coffee, chelsea, rocket; `photos=ALL_PHOTOS` adds page, a scan of printed
text, which makes the question ambiguous), and the text is 1..`max_words` words of
letters and digits (or one of the smaller alphabets of `CHARSETS`) in a small font (PIL's built-in FreeType font, `ImageFont.load_default(size=...)`, Pillow >=
10.1). Small text in a large image is what slicing is for: the thumbnail alone cannot read it.
"""

from __future__ import annotations

import functools
import string

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from uhd_jax.data.processor import DEFAULT_SPECIAL_TOKENS, SampleRequest

CHARS = string.ascii_letters + string.digits
# the alphabets a record's words are drawn from (`chars=`): fewer symbols make an easier task (a small model learns
# to read digits in far fewer steps than 62 case-sensitive symbols)
CHARSETS = {"alnum": CHARS, "digits": string.digits, "upper": string.ascii_uppercase,
            "lower": string.ascii_lowercase}
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
# skimage's page() is a scan of printed text: as a background it would make "the text in the image" ambiguous
ALL_PHOTOS = PHOTOS + ("page",)
QUESTION = "What is the text in the image?"
_MIN_FONT = 8


@functools.lru_cache(maxsize=None)
def _photo(name: str) -> Image.Image:
    """A scikit-image sample photograph as RGB (bundled with the package: no download)."""
    try:
        import skimage.data
    except ImportError as e:
        raise ImportError("SyntheticOCRSource with photo_fraction > 0 needs scikit-image (pip install "
                          "'scikit-image>=0.24'), or pass photo_fraction=0") from e
    a = getattr(skimage.data, name)()
    img = Image.fromarray(a)
    return img.convert("RGB")


@functools.lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont:
    font = ImageFont.load_default(size=size)
    if not isinstance(font, ImageFont.FreeTypeFont):  # Pillow without FreeType: a fixed bitmap font
        raise RuntimeError("SyntheticOCRSource needs Pillow >= 10.1 built with FreeType "
                           "(ImageFont.load_default(size=...) returned a bitmap font)")
    return font


class SyntheticOCRSource:
    """Random-access source of OCR records; `source[i]` is a SampleRequest named "synthetic:i" whose user turn is
    the image and QUESTION and whose assistant turn is the rendered text (words joined by single spaces, in
    reading order). `render(i)` gives (PIL RGB image, text)."""

    def __init__(self, num_records: int, seed: int = 0, *, min_side: int = 64, max_side: int = 800,
                 max_aspect: float = 4.0, photo_fraction: float = 0.3, font_sizes: tuple[int, int] = (10, 24),
                 max_words: int = 4, max_word_len: int = 8, chars: str = "alnum", question: str = QUESTION,
                 photos: tuple[str, ...] = PHOTOS, image_token: str = DEFAULT_SPECIAL_TOKENS["image_token"]):
        if num_records < 1:
            raise ValueError(f"num_records must be >= 1, got {num_records}")
        if not 16 <= min_side <= max_side:
            raise ValueError(f"need 16 <= min_side <= max_side, got {min_side}, {max_side}")
        if max_aspect < 1:
            raise ValueError(f"max_aspect must be >= 1, got {max_aspect}")
        if not 0 <= photo_fraction <= 1:
            raise ValueError(f"photo_fraction must be in [0, 1], got {photo_fraction}")
        if not _MIN_FONT <= font_sizes[0] <= font_sizes[1]:
            raise ValueError(f"font_sizes must be (lo, hi) with {_MIN_FONT} <= lo <= hi, got {font_sizes}")
        if max_words < 1 or max_word_len < 1:
            raise ValueError("max_words and max_word_len must be >= 1")
        if chars not in CHARSETS:
            raise ValueError(f"chars must be one of {sorted(CHARSETS)}, got {chars!r}")
        bad = [p for p in photos if p not in ALL_PHOTOS]
        if bad or (photo_fraction > 0 and not photos):
            raise ValueError(f"photos must be a non-empty subset of {ALL_PHOTOS}, got {photos}")
        self.num_records = int(num_records)
        self.seed = int(seed)
        self.min_side, self.max_side, self.max_aspect = int(min_side), int(max_side), float(max_aspect)
        self.photo_fraction = float(photo_fraction)
        self.font_sizes = (int(font_sizes[0]), int(font_sizes[1]))
        self.max_words, self.max_word_len = int(max_words), int(max_word_len)
        self.chars = chars
        self.question = question
        self.photos = tuple(photos)
        self.image_token = image_token

    def __len__(self) -> int:
        return self.num_records

    def __repr__(self) -> str:
        return f"SyntheticOCRSource(num_records={self.num_records}, seed={self.seed})"

    def __getitem__(self, i: int) -> SampleRequest:
        img, text = self.render(i)
        return SampleRequest(messages=[{"role": "user", "content": f"{self.image_token}\n{self.question}"},
                                       {"role": "assistant", "content": text}],
                             images=[img], name=f"synthetic:{int(i)}")

    # ------------------------------------------------------------------ rendering
    def render(self, i: int) -> tuple[Image.Image, str]:
        """Record i's image (RGB, h and w in [min_side, max_side]) and its text."""
        i = int(i)
        if not 0 <= i < self.num_records:
            raise IndexError(f"record {i} out of range for {self!r}")
        # a generator of its own per record: record i never depends on which records were rendered before
        rng = np.random.default_rng([self.seed, i])
        w, h = self._size(rng)
        img = self._background(rng, w, h)
        words = ["".join(rng.choice(list(CHARSETS[self.chars]), int(rng.integers(1, self.max_word_len + 1))))
                 for _ in range(int(rng.integers(1, self.max_words + 1)))]
        size = int(rng.integers(self.font_sizes[0], self.font_sizes[1] + 1))
        lines, font = self._layout(words, size, w, h)
        text = " ".join(" ".join(line) for line in lines)
        self._draw(rng, img, lines, font)
        return img, text

    def _size(self, rng) -> tuple[int, int]:
        lo, hi = np.log(self.min_side), np.log(self.max_side)
        long_side = float(np.exp(rng.uniform(lo, hi)))
        # aspect capped so that the short side stays >= min_side (no pile-up of images at min_side)
        aspect = float(np.exp(rng.uniform(0.0, np.log(min(self.max_aspect, long_side / self.min_side)))))
        short_side = max(self.min_side, long_side / aspect)
        a, b = int(round(long_side)), int(round(short_side))
        return (a, b) if rng.random() < 0.5 else (b, a)

    def _background(self, rng, w: int, h: int) -> Image.Image:
        if rng.random() < self.photo_fraction:
            photo = _photo(self.photos[int(rng.integers(len(self.photos)))])
            pw, ph = photo.size
            # largest crop of the photo's aspect-matched window, scaled by 0.5..1, at a random place
            scale = rng.uniform(0.5, 1.0)
            cw = min(pw, ph * w / h) * scale
            ch = cw * h / w
            x0, y0 = rng.uniform(0, pw - cw), rng.uniform(0, ph - ch)
            return photo.resize((w, h), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
        c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        t = np.linspace(0.0, 1.0, w if rng.random() < 0.5 else h, dtype=np.float32)
        ramp = (c0[None] * (1 - t[:, None]) + c1[None] * t[:, None]).astype(np.uint8)  # [n, 3]
        a = np.broadcast_to(ramp[None], (h, w, 3)) if len(t) == w else np.broadcast_to(ramp[:, None], (h, w, 3))
        return Image.fromarray(np.ascontiguousarray(a), "RGB")

    @staticmethod
    def _layout(words: list[str], size: int, w: int, h: int):
        """Greedy line wrapping within the image (margin 2 px); shrinks the font, then cuts characters / lines,
        so the returned lines are exactly what fits and gets drawn."""
        width, height = w - 4, h - 4
        while True:
            font = _font(size)
            fits = all(font.getlength(wd) <= width for wd in words) and _line_height(font) <= height
            if fits or size == _MIN_FONT:
                break
            size -= 1
        words = [_cut(wd, font, width) for wd in words]
        lines: list[list[str]] = []
        for wd in words:
            if lines and font.getlength(" ".join(lines[-1] + [wd])) <= width:
                lines[-1].append(wd)
            else:
                lines.append([wd])
        line_h = _line_height(font)
        keep = max(1, min(len(lines), height // line_h))
        return lines[:keep], font

    @staticmethod
    def _draw(rng, img: Image.Image, lines, font):
        w, h = img.size
        line_h = _line_height(font)
        block_w = max(int(np.ceil(font.getlength(" ".join(line)))) for line in lines)
        block_h = line_h * len(lines)
        x = 2 + int(rng.integers(0, max(1, w - 4 - block_w + 1)))
        y = 2 + int(rng.integers(0, max(1, h - 4 - block_h + 1)))
        # dark text on a light background and vice versa, judged on the pixels under the text
        under = np.asarray(img.crop((x, y, min(w, x + block_w), min(h, y + block_h))), np.float32)
        luma = float((under @ np.array([0.299, 0.587, 0.114], np.float32)).mean()) if under.size else 128.0
        color = tuple(int(c) for c in (rng.integers(0, 50, 3) if luma > 128 else rng.integers(205, 256, 3)))
        draw = ImageDraw.Draw(img)
        for k, line in enumerate(lines):
            draw.text((x, y + k * line_h), " ".join(line), font=font, fill=color)


def _line_height(font) -> int:
    ascent, descent = font.getmetrics()
    return ascent + descent


def _cut(word: str, font, width: float) -> str:
    while len(word) > 1 and font.getlength(word) > width:
        word = word[:-1]
    return word
