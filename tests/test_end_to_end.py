"""End to end through the public API: chat messages -> Processor -> Packer -> MiniCPMV, against transformers'
MiniCPMV4_6Processor -> MiniCPMV4_6ForConditionalGeneration on the same chats (tiny random model saved to disk
and loaded back with `load_hf`, the test tokenizer with the real special-token ids).

Nothing here builds a batch by hand: the only inputs are the chat messages and the images. Both rows of one
padded batch are compared position by position with the reference run on each chat alone.
"""

import jax
import numpy as np
import pytest
import torch

from tests.convert_ref import hf_model, save_hf
from tests.data_utils import make_model_dir, random_image, reference_processor
from uhd_jax.config import tiny_config
from uhd_jax.convert import load_hf
from uhd_jax.data.packer import Packer, PackerConfig
from uhd_jax.data.processor import Processor
from uhd_jax.model.minicpmv import MiniCPMV, check_visual_placement

IM = "<|image_pad|>"
TOL = 1e-4
# A small slice resolution keeps the reference fast on CPU: views are at most 8x8 patches (112 px), so the
# 1344x1344 image gives a thumbnail plus a 2x2 grid of slices instead of the full-size 3x3 grid of 32x32.
SLICE = dict(scale_resolution=112, max_slice_nums=4)


def chat_images():
    # tiny (upscaled, no slices), very wide (1 x N slices, views of a different shape), 1344x1344 (2x2 slices)
    return {"tiny": random_image(20, 30, seed=1), "wide": random_image(40, 1000, seed=2),
            "big": random_image(1344, 1344, seed=3)}


def two_chats(im):
    """Two chats of different lengths: (our messages, the same conversation as the reference's raw ChatML text,
    its images in order)."""
    a = ([{"role": "system", "content": "You are a helpful assistant."},
          {"role": "user", "content": [{"type": "image", "image": im["tiny"]}, {"type": "image", "image": im["wide"]},
                                       {"type": "image", "image": im["big"]},
                                       {"type": "text", "text": "What is written on the sign?"}]},
          {"role": "assistant", "content": "The sign says hello world."}],
         "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
         f"<|im_start|>user\n{IM}\n{IM}\n{IM}\nWhat is written on the sign?<|im_end|>\n"
         "<|im_start|>assistant\nThe sign says hello world.<|im_end|>\n",
         [im["tiny"], im["wide"], im["big"]])
    b = ([{"role": "user", "content": [{"type": "image", "image": im["wide"]}, "Describe this image in detail."]}],
         f"<|im_start|>user\n{IM}\nDescribe this image in detail.<|im_end|>\n<|im_start|>assistant\n",
         [im["wide"]])
    return [a, b]


def saved_model(tmp_path_factory, merger_times=1):
    """A tiny random reference model saved like a real checkpoint, with the test tokenizer and processor files."""
    # the test tokenizer carries the real special-token ids, so the model needs the real vocabulary size
    cfg = tiny_config(insert_layer_id=1, merger_times=merger_times)
    cfg = cfg.replace(text=cfg.text.replace(vocab_size=248320), image_token_id=248056, video_token_id=248057)
    model_dir = str(tmp_path_factory.mktemp("e2e") / "model")
    ref_model = hf_model(cfg, seed=5 + merger_times)
    save_hf(ref_model, model_dir, side_files=False)
    make_model_dir(model_dir, **SLICE)
    loaded_cfg, params = load_hf(model_dir)
    return model_dir, ref_model, loaded_cfg, params


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    saved = saved_model(tmp_path_factory)
    return saved + (reference_processor(saved[0], **SLICE),)


def _reference(rp, ref_model, raw, images, mode):
    """The reference processor and model on one chat alone (no padding); the merger's per-view output too."""
    enc = rp(text=[raw], images=images, downsample_mode=mode, return_tensors="pt")
    caught = []
    hook = ref_model.model.merger.register_forward_hook(lambda m, i, o: caught.extend(o))
    try:
        with torch.no_grad():
            out = ref_model(input_ids=enc["input_ids"], pixel_values=enc["pixel_values"],
                            target_sizes=enc["target_sizes"], downsample_mode=mode, output_hidden_states=True)
    finally:
        hook.remove()
    return enc, out, [f.numpy() for f in caught]


def rel(a, b) -> float:
    """Worst relative error over positions (norm over the last axis), so one wrong position cannot hide."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)).max())


@pytest.mark.parametrize("mode", ["16x", "4x"])
def test_chat_batch_matches_reference(setup, mode):
    model_dir, ref_model, cfg, params, rp = setup
    im = chat_images()
    chats = two_chats(im)
    proc = Processor.from_pretrained(model_dir, downsample_mode=mode)
    samples = [proc.encode_chat(msgs, add_generation_prompt=r == 1) for r, (msgs, _, _) in enumerate(chats)]
    # the images take the paths they are meant to exercise
    plans = samples[0].plans
    assert plans[0].grid is None and plans[1].grid[0] == 1 and plans[1].grid[1] >= 3
    assert plans[2].grid[0] * plans[2].grid[1] >= 4 and len(set(samples[0].view_grids)) >= 3
    assert len(samples[0]) != len(samples[1])

    packer = Packer(proc, PackerConfig(batch_size=2, seq_buckets=(160, 288), tokens_per_view=160,
                                       views_per_row=12))
    batch = packer.pack(samples)
    check_visual_placement(batch, cfg.image_token_id)
    logits, out = jax.jit(MiniCPMV(cfg, attention_impl="xla").apply)({"params": params}, batch)
    logits = np.asarray(logits)  # the other row and the padding share the batch: the reference runs each chat alone
    tokens = np.asarray(out["vision"]["tokens"])

    errs = {}
    for r, (s, (_, raw, images)) in enumerate(zip(samples, chats)):
        enc, want, feats = _reference(rp, ref_model, raw, images, mode)
        n = len(s)
        np.testing.assert_array_equal(s.input_ids, enc["input_ids"][0].numpy())  # same token ids in
        errs[f"row{r}.logits"] = rel(logits[r, :n], want.logits[0].numpy())
        errs[f"row{r}.embeds"] = rel(np.asarray(out["embeds"])[r, :n], want.hidden_states[0][0].numpy())
        errs[f"row{r}.layer_03"] = rel(np.asarray(out["layer_03"])[r, :n], want.hidden_states[4][0].numpy())
        assert len(feats) == s.num_views
        errs[f"row{r}.visual"] = max(rel(tokens[r, k, :len(f)], f) for k, f in enumerate(feats))
    print(mode, {k: f"{v:.1e}" for k, v in errs.items()})
    bad = {k: v for k, v in errs.items() if not v < TOL}
    assert not bad, bad

