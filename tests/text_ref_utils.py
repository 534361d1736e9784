"""Test helpers: the transformers LLMs built in-process as references, and a test-local weight mapping.

The real checkpoint converter is a separate module; this mapping only serves the parity tests.
"""

from __future__ import annotations

import numpy as np
import torch

from uhd_jax.config import TextConfig
from uhd_jax.model.text_model import layer_period


def reference_llm(cfg: TextConfig, seed: int = 0):
    """Qwen3_5ForCausalLM or Qwen3ForCausalLM with random weights (float32, eval, eager attention)."""
    d = cfg.to_hf_dict()
    torch.manual_seed(seed)
    if cfg.model_type == "qwen3_5_text":
        from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig
        hf_cfg = Qwen3_5TextConfig(**d)
        hf_cfg._attn_implementation = "eager"
        model = Qwen3_5ForCausalLM(hf_cfg)
    else:
        from transformers import Qwen3Config, Qwen3ForCausalLM
        hf_cfg = Qwen3Config(**d)
        hf_cfg._attn_implementation = "eager"
        model = Qwen3ForCausalLM(hf_cfg)
    randomize_norms(model, seed)
    return model.float().eval()


def randomize_norms(model, seed: int):
    """Fresh models have norm weights 0 or 1 and dt_bias 1; random values make the parity tests see them."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def _t(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to(torch.float32).cpu().numpy()
    return np.asarray(x, np.float32)


def per_key_head(w: np.ndarray, cfg: TextConfig) -> np.ndarray:
    """DeltaNet fused channels on axis 0, HF order (all q | all k | all v) -> ours: per key head i, q_i, k_i,
    then the value heads i*g .. i*g+g-1 (g = Hv / Hk) that key head serves."""
    hk, hv, dk, dv = (cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                      cfg.linear_value_head_dim)
    g = hv // hk
    q, k, v = w[:hk * dk], w[hk * dk:2 * hk * dk], w[2 * hk * dk:]
    groups = []
    for i in range(hk):
        groups += [q[i * dk:(i + 1) * dk], k[i * dk:(i + 1) * dk]]
        groups += [v[j * dv:(j + 1) * dv] for j in range(i * g, (i + 1) * g)]
    return np.concatenate(groups)


def text_params_from_torch(state_dict: dict, cfg: TextConfig, prefix: str = "model.", lm_head: str = "lm_head.weight"):
    """Reference state dict -> our TextModel parameter tree (plain arrays, layers stacked per scanned block)."""
    sd = {k: _t(v) for k, v in state_dict.items()}
    period = layer_period(cfg.layer_types)
    groups = cfg.num_hidden_layers // period

    def layer(l: int) -> dict:
        p = f"{prefix}layers.{l}."
        out = {"input_layernorm": {"scale": sd[p + "input_layernorm.weight"]},
               "post_attention_layernorm": {"scale": sd[p + "post_attention_layernorm.weight"]},
               "mlp": {n: {"kernel": sd[f"{p}mlp.{n}.weight"].T} for n in ("gate_proj", "up_proj", "down_proj")}}
        if cfg.layer_types[l] == "linear_attention":
            a = p + "linear_attn."
            out["linear_attn"] = {
                **{n: {"kernel": sd[f"{a}{n}.weight"].T} for n in ("in_proj_z", "in_proj_b", "in_proj_a", "out_proj")},
                "in_proj_qkv": {"kernel": per_key_head(sd[a + "in_proj_qkv.weight"], cfg).T},
                "conv_kernel": per_key_head(sd[a + "conv1d.weight"][:, 0, :], cfg).T,
                "A_log": sd[a + "A_log"], "dt_bias": sd[a + "dt_bias"],
                "norm": {"scale": sd[a + "norm.weight"]},
            }
        else:
            a = p + "self_attn."
            att = {}
            for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
                att[n] = {"kernel": sd[f"{a}{n}.weight"].T}
                if f"{a}{n}.bias" in sd:
                    att[n]["bias"] = sd[f"{a}{n}.bias"]
            att["q_norm"] = {"scale": sd[a + "q_norm.weight"]}
            att["k_norm"] = {"scale": sd[a + "k_norm.weight"]}
            out["self_attn"] = att
        return out

    layers = [layer(l) for l in range(cfg.num_hidden_layers)]
    stacked = {}
    for i in range(period):
        members = [layers[g * period + i] for g in range(groups)]
        stacked[f"layer_{i}"] = _stack(members)
    pad = np.zeros((cfg.padded_vocab_size - cfg.vocab_size, cfg.hidden_size), np.float32)  # our vocab padding
    params = {"embed_tokens": np.concatenate([sd[prefix + "embed_tokens.weight"], pad]), "layers": stacked,
              "norm": {"scale": sd[prefix + "norm.weight"]}}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = {"kernel": np.concatenate([sd[lm_head], pad]).T}
    return params


def _stack(trees: list):
    if isinstance(trees[0], dict):
        return {k: _stack([t[k] for t in trees]) for k in trees[0]}
    return np.stack(trees)


def rel_err(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
