"""Test helpers: a tiny random transformers MiniCPM-V 4.6 reference and its vision weights in our tree."""

from __future__ import annotations

import numpy as np
import torch

from uhd_jax.config import ModelConfig


def hf_model(cfg: ModelConfig, seed: int = 0):
    from transformers import MiniCPMV4_6Config, MiniCPMV4_6ForConditionalGeneration

    torch.manual_seed(seed)
    hf_cfg = MiniCPMV4_6Config(**cfg.to_hf_dict())
    hf_cfg._attn_implementation = "eager"
    hf_cfg.vision_config._attn_implementation = "eager"
    hf_cfg.text_config._attn_implementation = "eager"
    model = MiniCPMV4_6ForConditionalGeneration(hf_cfg).eval().float()
    # Fresh init leaves some norms at 1/0 and biases at 0; randomize everything so no term is trivially equal.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vision" in name or "merger" in name:
                p.copy_(torch.randn_like(p) * (0.02 if p.ndim > 1 else 0.1) + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return model


def _t(x):
    return np.asarray(x.detach().cpu().float().numpy())


def vision_params(model, cfg: ModelConfig) -> dict:
    """Our VisionEncoder parameter tree from the reference model's state dict, through the checkpoint converter."""
    from uhd_jax.convert.hf_to_jax import convert_state_dict

    sd = {k: _t(v) for k, v in model.state_dict().items()}
    return convert_state_dict(cfg, sd, parts=("vision",))


def navit_views(pixel_values: np.ndarray, target_sizes: np.ndarray, patch_size: int) -> list[np.ndarray]:
    """The reference's NaViT-packed pixels [1, C, P, N*P] -> per-view [C, h*P, w*P] images."""
    pv = pixel_values[0]
    c = pv.shape[0]
    views, start = [], 0
    for h, w in target_sizes:
        n = int(h) * int(w)
        block = pv[:, :, start * patch_size:(start + n) * patch_size]  # [C, P, n*P]
        x = block.reshape(c, patch_size, int(h), int(w), patch_size).transpose(0, 2, 1, 3, 4)
        views.append(x.reshape(c, int(h) * patch_size, int(w) * patch_size))
        start += n
    return views
