"""Slicer vs transformers' MiniCPMV4_6ImageProcessorPil: grids, patch grids, pixels; properties over sizes."""

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.data_utils import random_image, reference_image_processor, reference_plan, reference_views
from uhd_jax.data.layout import block_order, merge_levels, view_token_count
from uhd_jax.data.slicer import (SliceConfig, ensure_divide, normalize_image, normalize_table, plan_slices,
                                 slice_image)

# (height, width): tiny, patch-sized, extreme aspect, around one view, odd primes, large; 8000x6000 once.
SIZES = [
    (10, 10), (14, 14), (1, 1), (3, 500), (20, 4000), (4000, 20), (56, 56), (100, 300), (223, 227),
    (448, 448), (449, 447), (447, 449), (480, 640), (640, 480), (509, 1021), (997, 661), (700, 1000),
    (768, 1024), (1024, 768), (896, 896), (900, 1600), (1080, 1920), (1344, 1344), (1343, 1345),
    (1500, 500), (500, 1500), (2003, 1999), (1201, 3001), (2500, 700), (3000, 4000), (4000, 3000),
    (6001, 211), (1, 10000), (10000, 1), (8000, 6000),
]
# (mode, slice_mode, max_slice_nums) combinations; each size gets two of them for the pixel comparison
COMBOS = [(m, sm, n) for m in ("16x", "4x") for sm in (True, False) for n in (9, 4, 2, 16, 1)]
COMBOS = [c for c in COMBOS if c[1] or c[2] == 9]  # max_slice_nums is moot without slicing
LARGE = {(8000, 6000), (6001, 211), (3000, 4000), (4000, 3000), (1, 10000), (10000, 1)}


def _pixel_cases():
    cases = []
    for i, size in enumerate(SIZES):
        picks = [COMBOS[(2 * i) % len(COMBOS)], COMBOS[(2 * i + 1) % len(COMBOS)]]
        if size in LARGE:
            picks = picks[:1]  # big images once
        if size == (8000, 6000):
            picks = [("16x", True, 9)]  # the biggest one with the full slicing path
        for c in picks:
            cases.append((size, c))
    return cases


PIXEL_CASES = _pixel_cases()
assert len(SIZES) >= 30
assert {c for _, c in PIXEL_CASES} == set(COMBOS)


@pytest.fixture(scope="module")
def ref():
    return reference_image_processor()


@pytest.mark.parametrize("size,combo", PIXEL_CASES, ids=[f"{s[0]}x{s[1]}-{c[0]}-{'slice' if c[1] else 'noslice'}"
                                                         f"-{c[2]}" for s, c in PIXEL_CASES])
def test_views_match_reference(ref, size, combo):
    mode, slice_mode, msn = combo
    h, w = size
    img = random_image(h, w, seed=h * 7 + w)
    out = ref(img, downsample_mode=mode, slice_mode=slice_mode, max_slice_nums=msn, return_tensors="np")
    cfg = SliceConfig(downsample_mode=mode, slice_mode=slice_mode, max_slice_nums=msn)
    mine = slice_image(img, cfg)
    ref_grid = out["grids"][0]
    assert (list(mine.grid) if mine.grid else [0, 0]) == list(ref_grid)
    assert [list(t) for t in mine.target_sizes] == out["target_sizes"].tolist()
    ref_v = reference_views(out["pixel_values"], out["target_sizes"])
    assert len(ref_v) == len(mine.views)
    for a, b in zip(mine.views, ref_v):
        assert a.shape == b.shape and a.dtype == np.float32
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
        assert np.array_equal(a, b)  # in fact bit-identical


@pytest.mark.parametrize("mode", ["16x", "4x"])
def test_plans_match_reference_all_sizes(ref, mode):
    """Grids and patch grids for every size x slice mode x max_slice_nums (no pixels, so all combinations)."""
    n = 0
    for (h, w), slice_mode, msn in itertools.product(SIZES, (True, False), (1, 2, 4, 9, 16)):
        cfg = SliceConfig(downsample_mode=mode, slice_mode=slice_mode, max_slice_nums=msn)
        p = plan_slices((h, w), cfg)
        g, ts = reference_plan(ref, h, w, mode, slice_mode, msn)
        assert (list(p.grid) if p.grid else [0, 0]) == list(g), (h, w, slice_mode, msn)
        assert [list(t) for t in p.target_sizes] == ts, (h, w, slice_mode, msn)
        n += 1
    assert n == len(SIZES) * 10


def test_ensure_divide_uses_bankers_rounding():
    assert ensure_divide(28, 56) == 56  # 0.5 -> 0 -> at least 56
    assert ensure_divide(84, 56) == 112  # 1.5 -> 2
    assert ensure_divide(140, 56) == 112  # 2.5 -> 2 (banker's), not 168
    assert ensure_divide(141, 56) == 168
    assert ensure_divide(5, 56) == 56


def test_normalize_table_is_the_reference_arithmetic():
    from transformers.image_transforms import normalize, rescale

    x = np.arange(256, dtype=np.uint8).reshape(1, 16, 16).repeat(3, 0)
    cfg = SliceConfig(image_mean=(0.48145466, 0.4578275, 0.40821073), image_std=(0.26862954, 0.26130258, 0.27577711))
    want = normalize(rescale(x, 1 / 255), cfg.image_mean, cfg.image_std, input_data_format="channels_first")
    got = normalize_image(np.ascontiguousarray(x.transpose(1, 2, 0)), cfg)
    assert np.array_equal(got, want)
    assert normalize_table(cfg).dtype == np.float32


def test_numpy_input_and_mode_check():
    img = random_image(100, 130)
    cfg = SliceConfig()
    a = slice_image(img, cfg)
    b = slice_image(np.asarray(img), cfg)
    assert all(np.array_equal(x, y) for x, y in zip(a.views, b.views))
    with pytest.raises(ValueError, match="RGB"):
        slice_image(img.convert("L"), cfg)


def test_config_from_preprocessor_config(tmp_path):
    from tests.data_utils import make_model_dir

    d = make_model_dir(tmp_path / "m", max_slice_nums=4)
    cfg = SliceConfig.from_preprocessor_config(d)
    assert (cfg.max_slice_nums, cfg.scale_resolution, cfg.patch_size, cfg.slice_mode) == (4, 448, 14, True)
    assert cfg.image_mean == (0.5, 0.5, 0.5) and cfg.downsample_mode == "16x"
    with pytest.raises(ValueError):
        SliceConfig(downsample_mode="8x")


side = st.integers(1, 10000)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(h=side, w=side, mode=st.sampled_from(["16x", "4x"]), slice_mode=st.booleans(), msn=st.integers(1, 16))
def test_plan_properties(ref, h, w, mode, slice_mode, msn):
    cfg = SliceConfig(downsample_mode=mode, slice_mode=slice_mode, max_slice_nums=msn)
    p = plan_slices((h, w), cfg)
    m, levels = {"16x": (4, 2), "4x": (2, 1)}[mode]  # patch-block side one LLM token covers, 2x2 folds
    assert (cfg.merge_factor, merge_levels(mode)) == (m, levels)
    if p.grid is not None:
        assert slice_mode and 2 <= p.grid[0] * p.grid[1] <= msn
        assert p.num_views == 1 + p.grid[0] * p.grid[1]
    else:
        assert p.num_views == 1
    for (vh, vw), (th, tw), n in zip(p.view_sizes, p.target_sizes, p.view_tokens):
        assert vh == th * 14 and vw == tw * 14
        assert th % m == 0 and tw % m == 0 and th > 0 and tw > 0
        assert n == th * tw // m**2 == view_token_count(th, tw, mode)  # placeholders == tokens the model emits
        assert block_order(th, tw, levels).shape == (th * tw,)
    g, ts = reference_plan(ref, h, w, mode, slice_mode, msn)
    assert (list(p.grid) if p.grid else [0, 0]) == list(g)
    assert [list(t) for t in p.target_sizes] == ts


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(h=st.integers(1, 700), w=st.integers(1, 700), mode=st.sampled_from(["16x", "4x"]), msn=st.integers(1, 9))
def test_pixel_property_small(ref, h, w, mode, msn):
    img = random_image(h, w, seed=h + w)
    out = ref(img, downsample_mode=mode, max_slice_nums=msn, return_tensors="np")
    mine = slice_image(img, SliceConfig(downsample_mode=mode, max_slice_nums=msn))
    for a, b in zip(mine.views, reference_views(out["pixel_values"], out["target_sizes"]), strict=True):
        assert np.array_equal(a, b)
