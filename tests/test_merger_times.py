"""`merger_times` >= 2 (extra post-ViT 2x2 merge rounds, config.json) works end to end: the slicer makes every patch
grid divisible by 2^levels, the processor counts h*w/4^levels placeholders, the packer and model fold accordingly,
and the logits match the transformers reference MODEL. The reference processor has no merger_times (its views only
divide by 4 and its counts assume one round), so the reference model is fed our token ids and views by hand."""

import json
import os

import jax
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.data_utils import random_image, reference_image_processor, reference_plan
from tests.test_end_to_end import TOL, chat_images, rel, saved_model, two_chats
from uhd_jax.data.packer import Packer, PackerConfig
from uhd_jax.data.processor import Processor
from uhd_jax.data.slicer import SliceConfig, plan_slices, slice_image
from uhd_jax.model.minicpmv import MiniCPMV, check_visual_placement

# 2x2 folds per view: the intra-ViT merger (16x only) + merger_times post-ViT rounds
LEVELS = {("16x", 1): 2, ("4x", 1): 1, ("16x", 2): 3, ("4x", 2): 2, ("16x", 3): 4, ("4x", 3): 3}


@pytest.fixture(scope="module")
def ref_ip():
    return reference_image_processor()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(h=st.integers(1, 6000), w=st.integers(1, 6000), mode=st.sampled_from(["16x", "4x"]),
       mt=st.sampled_from([2, 3]), msn=st.integers(1, 12))
def test_plans_fold_exactly(ref_ip, h, w, mode, mt, msn):
    """Every view's patch grid divides by 2^levels and gives h*w/4^levels tokens; the slice grid (rows x cols) is
    the reference's, which does not depend on the merge."""
    p = plan_slices((h, w), SliceConfig(downsample_mode=mode, max_slice_nums=msn, merger_times=mt))
    b = 1 << LEVELS[mode, mt]
    for (vh, vw), (th, tw), n in zip(p.view_sizes, p.target_sizes, p.view_tokens, strict=True):
        assert th % b == 0 and tw % b == 0 and th > 0 and tw > 0 and (vh, vw) == (th * 14, tw * 14)
        assert n == th * tw // (b * b)
    grid, _ = reference_plan(ref_ip, h, w, mode, True, msn)
    assert (list(p.grid) if p.grid else [0, 0]) == list(grid)


def test_merger_times_1_is_the_reference(ref_ip):
    for h, w in [(900, 1600), (20, 4000), (1344, 1344), (449, 447)]:
        p = plan_slices((h, w), SliceConfig(merger_times=1))
        assert [list(t) for t in p.target_sizes] == reference_plan(ref_ip, h, w, "16x", True, 9)[1]


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_config_refuses_non_integer_or_zero(bad):
    from uhd_jax.config import ConfigError, ModelConfig, tiny_config

    d = tiny_config().to_hf_dict()
    d["merger_times"] = bad
    with pytest.raises(ConfigError, match="merger_times"):
        ModelConfig.from_hf_dict(d)


def test_views_and_placeholders_with_merger_times_2():
    # 900x1600, scale 448, by hand: grid 2x4 as with one round; sides now multiples of 14*8 = 112 px: thumbnail
    # 336x560 px -> 24x40 patches -> 15 tokens; slices 448x448 px -> 32x32 patches -> 16 tokens
    img = random_image(900, 1600, 1)
    s = slice_image(img, SliceConfig(merger_times=2))
    assert s.plan.grid == (2, 4) and s.plan.view_sizes == ((336, 560),) + ((448, 448),) * 8
    assert [v.shape for v in s.views] == [(3, 336, 560)] + [(3, 448, 448)] * 8
    assert s.plan.view_tokens == (15,) + (16,) * 8
    with pytest.raises(ValueError, match="merger_times"):
        SliceConfig(merger_times=0)


def test_processor_reads_merger_times_from_config_json(tmp_path):
    from tests.data_utils import make_model_dir

    d = make_model_dir(str(tmp_path / "m"))
    assert Processor.from_pretrained(d).slice_config.merger_times == 1  # no config.json: one round
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({"merger_times": 2}, f)
    proc = Processor.from_pretrained(d)
    assert proc.slice_config.merger_times == 2
    assert Processor.from_pretrained(d, merger_times=3).slice_config.merger_times == 3  # an override wins
    s = proc.encode_chat([{"role": "user", "content": [{"type": "image", "image": random_image(900, 1600, 1)}]}])
    assert _run_lengths(s.input_ids == proc.image_token_id) == [15] + [16] * 8  # the hand count above
    # the packer takes the processor's rounds; a packer set up for another number is refused
    assert Packer(proc, PackerConfig(views_per_row=9)).pack([s]).vision.merger_times == 2
    with pytest.raises(ValueError, match="PackerConfig.merger_times=1 but the processor slices for merger_times=2"):
        Packer(proc, PackerConfig(views_per_row=9, merger_times=1))


def _run_lengths(mask):
    out, n = [], 0
    for m in list(mask) + [False]:
        if m:
            n += 1
        elif n:
            out, n = out + [n], 0
    return out


@pytest.fixture(scope="module")
def model_mt2(tmp_path_factory):
    return saved_model(tmp_path_factory, merger_times=2)


@pytest.mark.parametrize("mode", ["16x", "4x"])
def test_matches_reference_model(model_mt2, mode):
    model_dir, ref_model, cfg, params = model_mt2
    assert cfg.merger.merger_times == 2
    chats = two_chats(chat_images())
    proc = Processor.from_pretrained(model_dir, downsample_mode=mode)  # merger_times from config.json
    samples = [proc.encode_chat(msgs, add_generation_prompt=r == 1) for r, (msgs, _, _) in enumerate(chats)]
    b, per_token = (8, 64) if mode == "16x" else (4, 16)  # by hand: 3 (16x) or 2 (4x) folds
    for s in samples:
        assert all(h % b == 0 and w % b == 0 for h, w in s.view_grids)
        assert int((s.input_ids == cfg.image_token_id).sum()) == sum(h * w for h, w in s.view_grids) // per_token

    batch = Packer(proc, PackerConfig(batch_size=2, seq_buckets=(128, 256), tokens_per_view=320, views_per_row=12,
                                      merger_times=2)).pack(samples)
    check_visual_placement(batch, cfg.image_token_id)
    logits, out = jax.jit(MiniCPMV(cfg, attention_impl="xla").apply)({"params": params}, batch)
    logits, tokens = np.asarray(logits), np.asarray(out["vision"]["tokens"])
    ip = reference_image_processor()
    errs = {}
    for r, s in enumerate(samples):
        pv = np.concatenate([ip.reshape_by_patch(v, 14) for v in s.views], axis=-1)[None]  # the reference's packing
        caught = []
        hook = ref_model.model.merger.register_forward_hook(lambda m, i, o: caught.extend(o))
        try:
            with torch.no_grad():
                want = ref_model(input_ids=torch.from_numpy(s.input_ids.astype(np.int64))[None],
                                 pixel_values=torch.from_numpy(pv), target_sizes=torch.tensor(s.view_grids),
                                 downsample_mode=mode, output_hidden_states=True)
        finally:
            hook.remove()
        n = len(s)
        errs[f"row{r}.logits"] = rel(logits[r, :n], want.logits[0].numpy())
        errs[f"row{r}.embeds"] = rel(np.asarray(out["embeds"])[r, :n], want.hidden_states[0][0].numpy())
        assert [len(f) for f in caught] == s.view_tokens
        errs[f"row{r}.visual"] = max(rel(tokens[r, k, :len(f)], f.numpy()) for k, f in enumerate(caught))
    print(f"merger_times=2 {mode}", {k: f"{v:.1e}" for k, v in errs.items()})
    bad = {k: v for k, v in errs.items() if not v < TOL}
    assert not bad, bad
