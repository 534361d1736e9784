"""Packer: static shapes, visual-token placement, buckets, overflow policies, streaming batches (the dataset
pipeline with worker processes and bad records: tests/test_pipeline.py)."""

import jax
import numpy as np
import pytest

from tests.data_utils import make_model_dir, random_image
from uhd_jax.data.batch import ModelBatch
from uhd_jax.data.packer import Packer, PackerConfig, SampleDoesNotFit, pack_samples
from uhd_jax.data.processor import Processor

IM = "<|image_pad|>"


@pytest.fixture(scope="module")
def proc(tmp_path_factory):
    return Processor.from_pretrained(make_model_dir(tmp_path_factory.mktemp("model")))


def _chat(proc, images, q="What is it?", a="A cat.", name=None):
    parts = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": q}]
    return proc.encode_chat([{"role": "user", "content": parts}, {"role": "assistant", "content": a}], name=name)


def _token_patches(batch: ModelBatch, row: int, index: int) -> np.ndarray:
    """The patches [unit, C*P*P] that make up visual token `index` of row `row` (its views flattened)."""
    v = batch.vision
    unit = 16 if v.mode == "16x" else 4
    k, j = divmod(int(index), v.out_tokens_per_view)
    return v.patches[row, k, j * unit:(j + 1) * unit]


def _expected_patches(view: np.ndarray, j: int, mode: str, patch_size: int = 14) -> np.ndarray:
    """Cell j (row-major) of the merged grid of a [C, H, W] view, written out by hand: the pixels of the patches
    one output token sees, in the order the merges fold them (16x: the four 2x2 quadrants of a 4x4 block
    row-major, each quadrant's patches row-major; 4x: a 2x2 block row-major). Independent of layout.py."""
    b = 4 if mode == "16x" else 2
    w_cells = view.shape[2] // patch_size // b
    r0, c0 = (j // w_cells) * b, (j % w_cells) * b
    order = [(qr + r, qc + c) for qr in (0, 2) for qc in (0, 2) for r in (0, 1) for c in (0, 1)] if b == 4 \
        else [(r, c) for r in (0, 1) for c in (0, 1)]
    p = patch_size
    return np.stack([view[:, (r0 + r) * p:(r0 + r + 1) * p, (c0 + c) * p:(c0 + c + 1) * p].reshape(-1)
                     for r, c in order])


def _n_tokens(view: np.ndarray, mode: str) -> int:
    """Visual tokens of a view, by hand: patches / 16 (16x) or / 4 (4x)."""
    return (view.shape[1] // 14) * (view.shape[2] // 14) // (16 if mode == "16x" else 4)


@pytest.mark.parametrize("mode", ["16x", "4x"])
def test_pack_shapes_and_placement(proc, mode):
    p = Processor(proc.tokenizer, proc.slice_config.replace(downsample_mode=mode, max_slice_nums=4), proc.tokens)
    s1 = _chat(p, [random_image(700, 1000, 1)], name="s1")
    s2 = _chat(p, [], q="hello", a="hello world")
    s3 = _chat(p, [random_image(100, 60, 2), random_image(30, 900, 3)], name="s3")
    tpv = 1152 if mode == "16x" else 1160
    cfg = PackerConfig(batch_size=4, seq_buckets=(256, 1024, 4096), tokens_per_view=tpv, views_per_row=8)
    b = Packer(p, cfg).pack([s1, s2, s3])
    assert isinstance(b, ModelBatch)
    S = 1024 if mode == "16x" else 4096
    L = max(len(s1), len(s2), len(s3))
    assert b.input_ids.shape == (4, S) and L <= S
    for a in (b.attention_mask, b.positions, b.visual_index, b.visual_mask, b.loss_mask):
        assert a.shape == (4, S)
    assert b.vision.patches.shape == (4, 8, tpv, 3 * 14 * 14)
    assert b.vision.num_tokens.shape == (4, 8) and b.vision.grid.shape == (4, 8, 2)
    assert b.vision.mode == mode
    # rows: real tokens left-aligned, positions 0.., padding with the pad id, an empty 4th row
    for r, s in enumerate([s1, s2, s3]):
        n = len(s)
        assert b.attention_mask[r, :n].all() and not b.attention_mask[r, n:].any()
        np.testing.assert_array_equal(b.input_ids[r, :n], s.input_ids)
        assert (b.input_ids[r, n:] == p.pad_token_id).all()
        np.testing.assert_array_equal(b.positions[r, :n], np.arange(n))
        np.testing.assert_array_equal(b.loss_mask[r, :n], s.loss_mask)
    assert not b.attention_mask[3].any() and not b.visual_mask[3].any()
    # visual mask is exactly the image tokens; row-local indices unique and within the row's views
    np.testing.assert_array_equal(b.visual_mask, (b.input_ids == p.image_token_id) & b.attention_mask)
    assert (b.visual_index[~b.visual_mask] == 0).all()
    for r, s in enumerate([s1, s2, s3, None]):
        views = [] if s is None else s.views
        idx = b.visual_index[r][b.visual_mask[r]]
        assert len(np.unique(idx)) == idx.size == sum(_n_tokens(v, mode) for v in views)
        assert b.vision.num_tokens[r].tolist() == [v.shape[1] * v.shape[2] // 196 for v in views] + \
            [0] * (8 - len(views))
        assert (b.vision.patches[r, len(views):] == 0).all()
    # the j-th placeholder of each view receives the token built from cell j (row-major) of that view
    for r, s in [(0, s1), (2, s3)]:
        pos = np.flatnonzero(b.visual_mask[r])
        off = 0
        for k, v in enumerate(s.views):
            n = _n_tokens(v, mode)
            for j in (0, n // 2, n - 1):
                index = b.visual_index[r, pos[off + j]]
                assert divmod(int(index), b.vision.out_tokens_per_view) == (k, j)
                np.testing.assert_array_equal(_token_patches(b, r, index), _expected_patches(v, j, mode))
            off += n


def test_rows_are_independent(proc):
    """A row and its views do not depend on the other rows: packing samples together gives, row for row, what
    packing each alone gives (so each host can build only its own rows)."""
    samples = [_chat(proc, [random_image(900, 900, 1)], name="a"), _chat(proc, [], q="hi", a="ok"),
               _chat(proc, [random_image(200, 700, 2), random_image(64, 64, 3)], name="c")]
    pk = Packer(proc, PackerConfig(batch_size=3, seq_buckets=(1024,), views_per_row=6))
    together = pk.pack(samples)
    one = Packer(proc, PackerConfig(batch_size=1, seq_buckets=(1024,), views_per_row=6))
    for r, s in enumerate(samples):
        alone = one.pack([s])
        for f in ("input_ids", "attention_mask", "positions", "visual_index", "visual_mask", "loss_mask"):
            np.testing.assert_array_equal(getattr(together, f)[r], getattr(alone, f)[0])
        for f in ("patches", "pos_ids", "num_tokens", "grid"):
            np.testing.assert_array_equal(getattr(together.vision, f)[r], getattr(alone.vision, f)[0])


def test_text_only_batch_keeps_static_vision(proc):
    s = _chat(proc, [], q="hi", a="ok")
    b = Packer(proc, PackerConfig(batch_size=2, seq_buckets=(32, 64), views_per_row=3)).pack([s])
    assert b.input_ids.shape == (2, 32) and b.vision.patches.shape == (2, 3, 1152, 588)
    assert (b.vision.num_tokens == 0).all() and not b.visual_mask.any()
    b0 = Packer(proc, PackerConfig(batch_size=1, seq_buckets=(32,), views_per_row=0)).pack([s])
    assert b0.vision is None


def test_buckets(proc):
    pk = Packer(proc, PackerConfig(batch_size=1, seq_buckets=(24, 48, 96), views_per_row=1))
    short = _chat(proc, [], q="hi", a="ok")
    assert len(short) <= 24 and pk.pack([short]).input_ids.shape == (1, 24)
    mid = _chat(proc, [], q="Describe this image in detail. " * 2, a="ok")
    assert pk.pack([mid]).input_ids.shape[1] == pk.bucket(len(mid))
    long = _chat(proc, [], q="Describe this image in detail. " * 30, a="ok", name="long-one")
    with pytest.raises(SampleDoesNotFit, match="long-one.*largest sequence bucket 96"):
        pk.pack([long])


def test_overflow_error_names_sample(proc):
    s = _chat(proc, [random_image(1344, 1344, 1)], name="big.jpg")
    assert s.num_views == 10
    pk = Packer(proc, PackerConfig(batch_size=1, seq_buckets=(2048,), views_per_row=5, overflow="error"))
    with pytest.raises(SampleDoesNotFit, match=r"big.jpg.*10 views > 5"):
        pk.pack([s])


def test_overflow_fewer_slices(proc):
    img = random_image(1344, 1344, 1)
    s = _chat(proc, [img], name="big.jpg")
    pk = Packer(proc, PackerConfig(batch_size=1, seq_buckets=(512, 2048), views_per_row=5, overflow="fewer_slices"))
    b = pk.pack([s])
    # re-sliced with a smaller max_slice_nums: 4 slices + thumbnail, all image tokens placed
    assert (b.vision.num_tokens > 0).sum() == 5
    n_pad = int((b.input_ids == proc.image_token_id).sum())
    assert int(b.visual_mask.sum()) == n_pad == sum(int(h) * int(w) // 16 for h, w in b.vision.grid[0, :5])
    # sequence budget drives it too: 10 views (~700 tokens) into a 400-token bucket
    pk2 = Packer(proc, PackerConfig(batch_size=1, seq_buckets=(400,), views_per_row=10, overflow="fewer_slices"))
    b2 = pk2.pack([s])
    assert b2.input_ids.shape == (1, 400) and int(b2.visual_mask.sum()) == int(
        (b2.input_ids == proc.image_token_id).sum())
    # text alone too long: an error naming the sample, even with fewer slices
    pk3 = Packer(proc, PackerConfig(batch_size=1, seq_buckets=(40,), views_per_row=10, overflow="fewer_slices"))
    with pytest.raises(SampleDoesNotFit, match="big.jpg.*max_slice_nums=1"):
        pk3.pack([s])


def test_oversized_view(proc):
    s = _chat(proc, [random_image(5, 4000, 1)], name="strip.png")  # very wide thumbnail
    assert max(h * w for h, w in s.view_grids) > 1152
    pk = Packer(proc, PackerConfig(batch_size=1, seq_buckets=(4096,), views_per_row=4, overflow="fewer_slices"))
    with pytest.raises(SampleDoesNotFit, match="strip.png.*tokens_per_view=1152"):
        pk.pack([s])


def test_streaming_batches_static_shapes(proc):
    samples = [_chat(proc, [random_image(300 + 50 * i, 400, i)] * (i % 3), name=f"s{i}") for i in range(7)]
    samples.insert(3, _chat(proc, [random_image(1344, 1344, 9)], name="too-many-views"))
    pk = Packer(proc, PackerConfig(batch_size=3, seq_buckets=(128, 512, 1024), views_per_row=6))
    skipped = []
    batches = list(pk.batches(samples, on_skip=lambda s, e: skipped.append((s.name, str(e)))))
    assert [n for n, _ in skipped] == ["too-many-views"] and "10 views > 6" in skipped[0][1]
    shapes = {(b.input_ids.shape, b.vision.patches.shape) for b in batches}
    assert {s[0][0] for s in shapes} == {3} and {s[1] for s in shapes} == {(3, 6, 1152, 588)}
    assert {s[0][1] for s in shapes} <= {128, 512, 1024}
    # every kept sample appears once, in order, with all its image tokens placed
    kept = [s for s in samples if s.name != "too-many-views"]
    rows = [b.input_ids[r][b.attention_mask[r]] for b in batches for r in range(3) if b.attention_mask[r].any()]
    assert len(rows) == len(kept)
    for r, s in zip(rows, kept):
        np.testing.assert_array_equal(r, s.input_ids)
    for b in batches:
        assert int(b.visual_mask.sum()) == int(((b.input_ids == proc.image_token_id) & b.attention_mask).sum())
    with pytest.raises(SampleDoesNotFit):
        list(pk.batches(samples))


def test_pack_samples_convenience(proc):
    s = proc(["Look: " + IM], [random_image(448, 448, 1)])
    b = pack_samples(proc, s, seq_buckets=(512,))
    assert b.vision.patches.shape[:2] == (1, 1) and b.input_ids.shape == (1, 512)
    assert int(b.visual_mask.sum()) == 64


@pytest.mark.parametrize("mode", ["16x", "4x"])
def test_vision_arrays_equal_layout_pack_views(proc, mode):
    """The packer writes views in place; the result is exactly layout.pack_views's."""
    from uhd_jax.data.layout import pack_views

    p = Processor(proc.tokenizer, proc.slice_config.replace(downsample_mode=mode), proc.tokens)
    s = _chat(p, [random_image(900, 1600, 1), random_image(33, 71, 2)])
    cfg = PackerConfig(batch_size=1, seq_buckets=(4096,), tokens_per_view=1160 if mode == "4x" else 1152,
                       views_per_row=16)
    got = jax.tree.map(lambda a: a[0], Packer(p, cfg).pack([s]).vision)
    want = pack_views(s.views, patch_size=14, positions_per_side=70, mode=mode, tokens_per_view=cfg.tokens_per_view,
                      num_views=16)
    for f in ("patches", "pos_ids", "num_tokens", "grid"):
        np.testing.assert_array_equal(getattr(got, f), getattr(want, f))
    assert (got.mode, got.merger_times) == (want.mode, want.merger_times)
