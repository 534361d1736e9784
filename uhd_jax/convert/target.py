"""The shape-only parameter tree the converter fills, taken from the model code itself (`jax.eval_shape`)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uhd_jax.config import ModelConfig


def _vision_batch(cfg: ModelConfig):
    from uhd_jax.data.layout import VisionBatch, patches_per_token

    # always 16x: the window merger's parameters exist in both modes (4x skips it at run time)
    t = patches_per_token("16x", cfg.merger.merger_times)
    return VisionBatch(patches=np.zeros((1, t, cfg.vision.patch_dim), np.float32),
                       pos_ids=np.zeros((1, t), np.int32), num_tokens=np.full((1,), t, np.int32),
                       grid=np.full((1, 2), int(np.sqrt(t)), np.int32), mode="16x",
                       merger_times=cfg.merger.merger_times)


def vision_params_shape(cfg: ModelConfig) -> dict:
    """Abstract VisionEncoder params: {'vision_tower': ..., 'merger': ...}."""
    from uhd_jax.model.vision import VisionEncoder

    model = VisionEncoder(cfg)
    init = lambda: nn.unbox(model.init(jax.random.PRNGKey(0), _vision_batch(cfg)))["params"]
    return jax.eval_shape(init)


def text_params_shape(cfg: ModelConfig) -> dict:
    """Abstract TextModel params: {'embed_tokens', 'layers', 'norm'(, 'lm_head')}."""
    from uhd_jax.model.text_model import TextModel

    model = TextModel(cfg.text)
    init = lambda: nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))["params"]
    return jax.eval_shape(init)


def params_shape(cfg: ModelConfig, parts=("vision", "text")) -> dict:
    """The abstract tree for `parts`. One part: that module's own tree (what its `apply` takes). Both parts:
    {'vision': ..., 'text': ...}, the layout of the full model's params."""
    trees = {}
    if "vision" in parts:
        trees["vision"] = vision_params_shape(cfg)
    if "text" in parts:
        trees["text"] = text_params_shape(cfg)
    if len(trees) == 1:
        return next(iter(trees.values()))
    return trees
