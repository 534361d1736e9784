"""Test helpers for the vision path: the reference model comes from convert_ref, views from data_utils."""

from __future__ import annotations

import numpy as np

from tests.convert_ref import hf_model  # noqa: F401  (re-exported for the vision tests)
from tests.data_utils import reference_views as navit_views  # noqa: F401
from uhd_jax.config import ModelConfig


def vision_params(model, cfg: ModelConfig) -> dict:
    """Our VisionEncoder parameter tree from the reference model's state dict, through the checkpoint converter."""
    from uhd_jax.convert.hf_to_jax import convert_state_dict

    sd = {k: np.asarray(v.detach().cpu().float().numpy()) for k, v in model.state_dict().items()}
    return convert_state_dict(cfg, sd, parts=("vision",))
