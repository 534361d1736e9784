"""Test helpers for the converter: tiny random transformers checkpoints saved the way users get them."""

from __future__ import annotations

import copy
import json
import os
import shutil

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from uhd_jax.config import ModelConfig


def randomize(model, seed: int):
    """Every parameter random (norm weights near 1 or 0, as their kind wants), so no tensor equals another."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim > 1:
                p.copy_(noise * 0.05)
            elif "norm" in name and "language_model" not in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)  # LayerNorm scales
            else:
                p.copy_(0.1 * noise)  # biases, Qwen3.5's (1 + w) norms, A_log, dt_bias
    return model


def hf_model(cfg: ModelConfig, seed: int = 0):
    from transformers import MiniCPMV4_6Config, MiniCPMV4_6ForConditionalGeneration

    torch.manual_seed(seed)
    hf_cfg = MiniCPMV4_6Config(**cfg.to_hf_dict())
    for c in (hf_cfg, hf_cfg.vision_config, hf_cfg.text_config):
        c._attn_implementation = "eager"
    return randomize(MiniCPMV4_6ForConditionalGeneration(hf_cfg), seed).eval()


def save_hf(model, path: str, dtype=torch.float32, side_files=True, **kw) -> str:
    (copy.deepcopy(model).to(dtype) if dtype != torch.float32 else model).save_pretrained(
        path, safe_serialization=True, **kw)
    if side_files:  # stand-ins for the tokenizer and processor files a real checkpoint has
        for name, content in (("tokenizer_config.json", {"model_max_length": 1024}),
                              ("preprocessor_config.json", {"patch_size": 14})):
            with open(os.path.join(path, name), "w") as f:
                json.dump(content, f)
        with open(os.path.join(path, "chat_template.jinja"), "w") as f:
            f.write("{{ messages }}")
    return path


def read_all(path: str) -> dict[str, np.ndarray]:
    """Every tensor of a model dir via the safetensors library itself (single file or sharded)."""
    index = os.path.join(path, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) \
        else ["model.safetensors"]
    out = {}
    for fname in files:
        with safe_open(os.path.join(path, fname), "np") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    return out


def rewrite(src: str, dst: str, edit) -> str:
    """Copy of model dir `src` at `dst` with its tensors passed through `edit(dict) -> dict` (single file)."""
    shutil.copytree(src, dst)
    tensors = read_all(src)
    for f in os.listdir(dst):
        if f.endswith(".safetensors") or f.endswith(".index.json"):
            os.remove(os.path.join(dst, f))
    save_file(edit(dict(tensors)), os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return dst


def edit_config(path: str, edit):
    p = os.path.join(path, "config.json")
    with open(p) as f:
        d = json.load(f)
    edit(d)
    with open(p, "w") as f:
        json.dump(d, f)


def bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool((a.view(np.uint8) == b.view(np.uint8)).all())


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
