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


def _linear(sd, prefix):
    return {"kernel": _t(sd[prefix + ".weight"]).T, "bias": _t(sd[prefix + ".bias"])}


def _ln(sd, prefix):
    return {"scale": _t(sd[prefix + ".weight"]), "bias": _t(sd[prefix + ".bias"])}


def _attn(sd, prefix):
    return {n: _linear(sd, f"{prefix}.{n}") for n in ("q_proj", "k_proj", "v_proj", "out_proj")}


def _layer(sd, prefix):
    return {
        "layer_norm1": _ln(sd, prefix + ".layer_norm1"),
        "self_attn": _attn(sd, prefix + ".self_attn"),
        "layer_norm2": _ln(sd, prefix + ".layer_norm2"),
        "mlp": {"fc1": _linear(sd, prefix + ".mlp.fc1"), "fc2": _linear(sd, prefix + ".mlp.fc2")},
    }


def _stack(trees):
    import jax

    return jax.tree.map(lambda *xs: np.stack(xs), *trees)


def vision_params(model, cfg: ModelConfig) -> dict:
    """Our VisionEncoder parameter tree from the reference model's state dict (test-local mapping)."""
    sd = model.state_dict()
    vt = "model.vision_tower"
    k = cfg.vision.insert_layer_id
    layers = [_layer(sd, f"{vt}.encoder.layers.{i}") for i in range(cfg.vision.num_hidden_layers)]
    w = _t(sd[f"{vt}.embeddings.patch_embedding.weight"])
    tower = {
        "patch_embedding": {"kernel": w.reshape(w.shape[0], -1).T, "bias": _t(sd[f"{vt}.embeddings.patch_embedding.bias"])},
        "position_embedding": _t(sd[f"{vt}.embeddings.position_embedding.weight"]),
        "layers_pre": {"layers": _stack(layers[: k + 1])},
        "vit_merger": {
            "layer_norm1": _ln(sd, f"{vt}.vit_merger.layer_norm1"),
            "self_attn": _attn(sd, f"{vt}.vit_merger.self_attn"),
            "pre_norm": _ln(sd, f"{vt}.vit_merger.pre_norm"),
            "linear_1": _linear(sd, f"{vt}.vit_merger.linear_1"),
            "linear_2": _linear(sd, f"{vt}.vit_merger.linear_2"),
        },
        "post_layernorm": _ln(sd, f"{vt}.post_layernorm"),
    }
    if k + 1 < len(layers):
        tower["layers_post"] = {"layers": _stack(layers[k + 1:])}
    merger = {
        f"mlp_{i}": {
            "pre_norm": _ln(sd, f"model.merger.mlp.{i}.pre_norm"),
            "linear_1": _linear(sd, f"model.merger.mlp.{i}.linear_1"),
            "linear_2": _linear(sd, f"model.merger.mlp.{i}.linear_2"),
        }
        for i in range(cfg.merger.merger_times)
    }
    return {"vision_tower": tower, "merger": merger}


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
