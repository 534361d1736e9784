"""Robust image loading: every bad-input case, mode conversions vs transformers, EXIF, animation (skipping bad
records in a dataset: tests/test_pipeline.py)."""

import numpy as np
import pytest
from PIL import Image

from tests.data_utils import jpeg_bytes, random_image
from uhd_jax.data.image_io import ImageLoadError, load_image


def _ref_convert(img):
    from transformers.image_transforms import convert_to_rgb

    return convert_to_rgb(img, return_numpy=True)


@pytest.fixture()
def rgb():
    return random_image(37, 53, seed=3)


# ------------------------------------------------------------------------------------------------ bad input

def test_missing_file(tmp_path):
    p = tmp_path / "nope.jpg"
    with pytest.raises(ImageLoadError, match="no such file") as e:
        load_image(p)
    assert e.value.source == str(p) and str(p) in str(e.value)


def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    with pytest.raises(ImageLoadError, match=r"empty file \(0 bytes\)") as e:
        load_image(p)
    assert str(p) in str(e.value)
    with pytest.raises(ImageLoadError, match="empty data"):
        load_image(b"")


def test_truncated_jpeg(tmp_path, rgb):
    data = jpeg_bytes(random_image(300, 400, 1))
    p = tmp_path / "cut.jpg"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="truncated") as e:
        load_image(p)
    assert str(p) in str(e.value)


def test_text_file_named_png(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("this is not a picture\n" * 10)
    with pytest.raises(ImageLoadError, match="not a recognized image format") as e:
        load_image(p)
    assert str(p) in str(e.value)


def test_directory(tmp_path):
    with pytest.raises(ImageLoadError, match="directory"):
        load_image(tmp_path)


def test_decompression_bomb(tmp_path):
    # the limit is ours and configurable: checked on the header, before decoding
    before = Image.MAX_IMAGE_PIXELS
    p = tmp_path / "bomb.png"
    Image.new("L", (4000, 3000)).save(p, optimize=True)
    with pytest.raises(ImageLoadError, match="max_pixels=1000000") as e:
        load_image(p, max_pixels=1_000_000)
    assert "decompression bomb" in str(e.value) and str(p) in str(e.value)
    assert load_image(p, max_pixels=12_000_000).size == (4000, 3000)
    big = tmp_path / "huge.png"
    Image.new("1", (15000, 15000)).save(big)  # 225 MP > PIL's own 179 MP error threshold
    with pytest.raises(ImageLoadError, match="exceeds max_pixels"):
        load_image(big)  # default limit (100 MP) applies, not PIL's DecompressionBombError
    assert Image.MAX_IMAGE_PIXELS == before  # the PIL global is left as it was


def test_unsupported_source_type():
    with pytest.raises(ImageLoadError, match="unsupported"):
        load_image(12345)


# ------------------------------------------------------------------------------------------------ modes

@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "L", "P", "CMYK", "1", "YCbCr", "PA"])
def test_modes_match_reference_convert_to_rgb(tmp_path, rgb, mode):
    a = np.asarray(rgb)
    if mode == "RGBA":
        alpha = (np.arange(a.shape[0] * a.shape[1]) % 256).reshape(a.shape[:2]).astype(np.uint8)
        img = Image.fromarray(np.dstack([a, alpha]), "RGBA")
    elif mode == "LA":
        img = rgb.convert("LA")
        img.putalpha(Image.fromarray((np.indices(a.shape[:2]).sum(0) * 9 % 256).astype(np.uint8)))
    elif mode == "PA":
        img = rgb.convert("P").convert("PA")
    else:
        img = rgb.convert(mode)
    want = _ref_convert(img)
    got = load_image(img)
    assert got.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(got), want)
    # and through a file where the format can hold the mode
    if mode in ("YCbCr", "PA"):  # no common file format stores these modes as such
        return
    ext = {"CMYK": "tiff"}.get(mode, "png")
    p = tmp_path / f"x.{ext}"
    img.save(p)
    np.testing.assert_array_equal(np.asarray(load_image(p)), _ref_convert(Image.open(p)))


def test_palette_with_transparency_composited_on_white(tmp_path):
    img = Image.new("P", (8, 8), 0)
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    img.putpixel((1, 1), 1)
    img.info["transparency"] = 0
    p = tmp_path / "t.png"
    img.save(p, transparency=0)
    got = np.asarray(load_image(p))
    assert tuple(got[0, 0]) == (255, 255, 255) and tuple(got[1, 1]) == (200, 100, 50)
    np.testing.assert_array_equal(got, _ref_convert(Image.open(p)))


def test_alpha_drop_option(rgb):
    a = np.asarray(rgb)
    img = Image.fromarray(np.dstack([a, np.zeros(a.shape[:2], np.uint8)]), "RGBA")
    assert (np.asarray(load_image(img)) == 255).all()  # fully transparent -> white
    np.testing.assert_array_equal(np.asarray(load_image(img, alpha="drop")), a)


def test_cmyk_jpeg(tmp_path, rgb):
    p = tmp_path / "c.jpg"
    rgb.convert("CMYK").save(p, quality=95)
    got = load_image(p)
    np.testing.assert_array_equal(np.asarray(got), _ref_convert(Image.open(p)))
    assert np.abs(np.asarray(got).astype(int) - np.asarray(rgb).astype(int)).mean() < 12


def test_sixteen_bit(tmp_path):
    a = (np.arange(64 * 48, dtype=np.uint32).reshape(48, 64) * 21 % 65536).astype(np.uint16)
    img = Image.new("I;16", (64, 48))
    img.frombytes(a.astype("<u2").tobytes())
    p = tmp_path / "g16.png"
    img.save(p)
    got = np.asarray(load_image(p))
    want = np.rint(a / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(got[..., 0], want)
    assert (got[..., 0] == got[..., 1]).all() and (got[..., 1] == got[..., 2]).all()
    # reference behaviour (PIL convert: clip at 255) on request; refusal on request
    clipped = np.asarray(load_image(p, high_bit_depth="clip"))
    np.testing.assert_array_equal(clipped, _ref_convert(Image.open(p)))
    with pytest.raises(ImageLoadError, match="high bit depth") as e:
        load_image(p, high_bit_depth="error")
    assert str(p) in str(e.value)


def test_float_and_int32_images():
    f = Image.fromarray(np.linspace(0, 1, 100, dtype=np.float32).reshape(10, 10), "F")
    got = np.asarray(load_image(f))[..., 0]
    np.testing.assert_array_equal(got, np.rint(np.linspace(0, 1, 100).reshape(10, 10) * 255).astype(np.uint8))
    i8 = Image.fromarray(np.arange(100, dtype=np.int32).reshape(10, 10), "I")  # 8-bit range kept as is
    np.testing.assert_array_equal(np.asarray(load_image(i8))[..., 0], np.arange(100).reshape(10, 10))


def test_one_bit(tmp_path):
    img = Image.fromarray((np.indices((20, 30)).sum(0) % 2 * 255).astype(np.uint8)).convert("1")
    p = tmp_path / "b.png"
    img.save(p)
    got = np.asarray(load_image(p))
    assert set(np.unique(got)) <= {0, 255}
    np.testing.assert_array_equal(got, _ref_convert(Image.open(p)))


# ------------------------------------------------------------------------------------------------ EXIF, animation

def test_exif_orientation_applied_like_reference_loader(tmp_path):
    from transformers.image_utils import load_image as ref_load_image

    base = random_image(40, 60, 5)  # h=40, w=60
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    p = tmp_path / "o.jpg"
    base.save(p, exif=exif, quality=95)
    got = load_image(p)
    assert got.size == (40, 60)  # displayed as 60 high x 40 wide
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref_load_image(str(p))))
    raw = load_image(p, exif_transpose=False)  # what the reference processor sees for an opened PIL image
    assert raw.size == (60, 40)
    np.testing.assert_array_equal(np.asarray(raw), _ref_convert(Image.open(p)))


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 12), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    p = tmp_path / "a.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=50, loop=0)
    im = Image.open(p)
    assert im.n_frames == 3
    im.seek(2)  # even when the handle sits on a later frame
    got = np.asarray(load_image(im))
    assert tuple(got[0, 0]) == (255, 0, 0)
    assert tuple(np.asarray(load_image(p))[5, 5]) == (255, 0, 0)


def test_bytes_and_jpeg_draft(rgb):
    data = jpeg_bytes(random_image(800, 1200, 2))
    full = load_image(data)
    assert full.size == (1200, 800)
    d = load_image(data, jpeg_draft_margin=1.0, target_size=(200, 300))
    assert d.size[0] < 1200 and d.size[0] >= 300 and d.size[1] >= 200  # decoded at reduced scale
