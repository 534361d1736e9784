"""The full model (vision -> placement -> LLM) against transformers' MiniCPMV4_6ForConditionalGeneration."""

import dataclasses

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from tests.text_ref_utils import randomize_norms, rel_err, text_params_from_torch
from tests.vision_ref import hf_model, navit_views
from uhd_jax.config import tiny_config
from uhd_jax.convert.hf_to_jax import convert_state_dict
from uhd_jax.data.batch import ModelBatch
from uhd_jax.data.layout import merge_levels, pack_views
from uhd_jax.model.minicpmv import MiniCPMV, check_visual_placement

PATCH, SCALE, TOL = 14, 112, 1e-4


def _image_inputs(sizes, seed):
    """Per image: (NaViT pixel_values [1, C, P, N*P], target_sizes [views, 2]) from the reference processor."""
    from transformers import MiniCPMV4_6ImageProcessorPil

    proc = MiniCPMV4_6ImageProcessorPil(scale_resolution=SCALE, max_slice_nums=4)
    rng = np.random.default_rng(seed)
    out = []
    for h, w in sizes:
        f = proc(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), return_tensors="np")
        out.append((f["pixel_values"], f["target_sizes"]))
    return out


def _sample(images, rng, cfg):
    """Token ids with one run of image placeholders per view, separated by random text; and the views."""
    levels = merge_levels(cfg.merger.downsample_mode)
    ids, views, view_tokens = list(rng.integers(0, 400, 5)), [], []
    for pv, ts in images:
        views += navit_views(pv, ts, PATCH)
        for h, w in ts:
            n = int(h) * int(w) >> (2 * levels)
            ids += [cfg.image_token_id] * n + list(rng.integers(0, 400, 2))
            view_tokens.append(n)
    ids += list(rng.integers(0, 400, 4))
    return np.array(ids, np.int64), views, view_tokens


def _batch(samples, cfg, seq, views_per_row, tokens_per_view=64):
    """The static ModelBatch the packer would build, written independently of it: rows right-padded, each row's
    views in its own slots [B, views_per_row, ...], visual_index counting the row's flattened visual tokens."""
    b = len(samples)
    ids = np.full((b, seq), 7, np.int32)
    mask = np.zeros((b, seq), bool)
    vindex = np.zeros((b, seq), np.int32)
    vmask = np.zeros((b, seq), bool)
    rows = []
    t_out = tokens_per_view >> (2 * merge_levels(cfg.merger.downsample_mode))
    for r, (s_ids, views, view_tokens) in enumerate(samples):
        ids[r, :len(s_ids)] = s_ids
        mask[r, :len(s_ids)] = True
        starts = np.flatnonzero(np.diff(np.concatenate([[0], (s_ids == cfg.image_token_id).astype(int)])) == 1)
        for slot, (start, n) in enumerate(zip(starts, view_tokens)):
            vindex[r, start:start + n] = slot * t_out + np.arange(n)
            vmask[r, start:start + n] = True
        rows.append(pack_views(views, patch_size=PATCH, positions_per_side=cfg.vision.positions_per_side,
                               mode=cfg.merger.downsample_mode, tokens_per_view=tokens_per_view,
                               num_views=views_per_row))
    vision = jax.tree.map(lambda *a: np.stack(a), *rows)
    positions = np.broadcast_to(np.arange(seq, dtype=np.int32), (b, seq)).copy()
    return ModelBatch(input_ids=ids, attention_mask=mask, positions=positions, visual_index=vindex, visual_mask=vmask,
                      loss_mask=mask.copy(), vision=vision)


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_config(insert_layer_id=1)
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, head_dim=32))
    ref = hf_model(cfg, seed=3)
    randomize_norms(ref.model.language_model, 3)
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    params = convert_state_dict(cfg, sd)
    return cfg, ref, params, sd


def test_converter_text_tree_matches_test_mapping(setup):
    cfg, _, params, sd = setup
    mine = text_params_from_torch(sd, cfg.text, prefix="model.language_model.")
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, params["text"]), mine)


def test_matches_reference_with_0_1_2_images(setup):
    """Rows: text only; one image (several slices); two images of different shapes. One padded batch."""
    cfg, ref, params, _ = setup
    rng = np.random.default_rng(0)
    images = _image_inputs([(200, 300), (112, 112), (150, 600)], seed=1)
    samples = [_sample([], rng, cfg), _sample(images[:1], rng, cfg), _sample(images[1:], rng, cfg)]
    assert len({len(s[1]) for s in samples}) == 3  # 0, several and several views
    seq = max(len(s[0]) for s in samples) + 3
    batch = _batch(samples, cfg, seq, views_per_row=max(len(s[1]) for s in samples) + 1)
    check_visual_placement(batch, cfg.image_token_id)

    model = MiniCPMV(cfg, attention_impl="xla")
    logits, out = jax.jit(model.apply)({"params": params}, batch)
    logits = np.asarray(logits)
    worst = 0.0
    for r, (s_ids, _, _) in enumerate(samples):
        kw = {}
        if r:
            imgs = images[:1] if r == 1 else images[1:]
            kw = dict(pixel_values=torch.from_numpy(np.concatenate([pv for pv, _ in imgs], axis=-1)),
                      target_sizes=torch.from_numpy(np.concatenate([ts for _, ts in imgs])))
        with torch.no_grad():
            want = ref(input_ids=torch.from_numpy(s_ids)[None], output_hidden_states=True, **kw)
        n = len(s_ids)
        err = rel_err(logits[r, :n], want.logits[0].numpy())
        assert err < TOL, (r, err)
        assert rel_err(np.asarray(out["embeds"])[r, :n], want.hidden_states[0][0].numpy()) < TOL
        assert rel_err(np.asarray(out["layer_03"])[r, :n], want.hidden_states[4][0].numpy()) < TOL
        worst = max(worst, err)
    print(f"max logits rel err {worst:.2e}")


def test_placement_check_raises_clearly(setup):
    cfg, _, _, _ = setup
    rng = np.random.default_rng(1)
    images = _image_inputs([(112, 112)], seed=2)
    s = _sample(images, rng, cfg)
    good = _batch([s], cfg, len(s[0]) + 2, views_per_row=2)
    check_visual_placement(good, cfg.image_token_id)

    extra = good.input_ids.copy()
    extra[0, 0] = cfg.image_token_id  # one placeholder more than visual tokens
    with pytest.raises(ValueError, match="1 positions receive|image placeholder"):
        check_visual_placement(good.replace(input_ids=extra), cfg.image_token_id)
    # the view claims 16 patches (1 visual token in 16x) while the ids hold its 4 placeholders
    assert good.vision.num_tokens[0, 0] == 64
    short = good.replace(vision=good.vision.replace(num_tokens=np.array([[16, 0]], np.int32)))
    with pytest.raises(ValueError, match="yield 1 visual tokens"):
        check_visual_placement(short, cfg.image_token_id)
    with pytest.raises(ValueError, match="no images"):
        check_visual_placement(good.replace(vision=None), cfg.image_token_id)
    dup = good.visual_index.copy()
    dup[good.visual_mask] = 0
    with pytest.raises(ValueError, match="more than once"):
        check_visual_placement(good.replace(visual_index=dup), cfg.image_token_id)
