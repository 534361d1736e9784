"""FLOPs of the LLM forward pass, counted from the config (2 FLOPs per multiply-add).

Matrix products, attention and the Gated DeltaNet chunk algorithm as `gated_deltanet.py` runs it; norms,
activations, softmax and the causal conv are a fraction of a percent. Training (forward + backward without
rematerialisation) is 3x the forward.
"""

from __future__ import annotations

import math

from uhd_jax.config import TextConfig
from uhd_jax.model.gated_deltanet import ChunkOptions


def _unit_lower_inverse_flops(c: int) -> int:
    """Recursive 2x2 blocking: at block size b, c/b blocks of two (b/2)^3 products."""
    flops, b = 0, 2
    while b <= c:
        flops += c * b * b // 2
        b *= 2
    return flops


def deltanet_core_flops(seq: int, cfg: TextConfig, chunk: ChunkOptions = ChunkOptions()) -> int:
    """One sequence, all value heads, as `chunk_gated_delta_rule` computes it (padded to whole chunks)."""
    c, dk, dv = chunk.chunk_size, cfg.linear_key_head_dim, cfg.linear_value_head_dim
    n = math.ceil(seq / c)
    per_chunk = 2 * c * c * dk * 2  # k k^T and q k^T
    if chunk.solver == "blocked":  # T = (I + A)^-1, then u = T (beta v), w = T (beta e^g k)
        per_chunk += _unit_lower_inverse_flops(c) + 2 * c * c * (dv + dk)
    else:  # triangular solves for u and w
        per_chunk += c * c * (dv + dk)
    if chunk.state_pass == "transition":  # M, B; M S per chunk; v_new = u - w S batched
        per_chunk += 2 * c * dk * (dk + dv) + 2 * dk * dk * dv + 2 * c * dk * dv
    else:  # w S and k_tail^T v_new per chunk
        per_chunk += 2 * c * dk * dv * 2
    per_chunk += 2 * c * dk * dv + 2 * c * c * dv  # output: q S and attn v_new
    return cfg.linear_num_value_heads * n * per_chunk


def text_forward_flops(cfg: TextConfig, batch: int, seq: int, logits_tokens: int | None = None,
                       chunk: ChunkOptions = ChunkOptions()) -> dict[str, int]:
    """Forward FLOPs for `batch` rows of `seq` tokens (causal attention counted as half the square);
    `logits_tokens`: how many positions go through lm_head (default: all)."""
    d, i = cfg.hidden_size, cfg.intermediate_size
    tokens = batch * seq
    logits_tokens = tokens if logits_tokens is None else logits_tokens
    kdim = cfg.linear_num_key_heads * cfg.linear_key_head_dim
    vdim = cfg.linear_num_value_heads * cfg.linear_value_head_dim
    qdim = cfg.num_attention_heads * cfg.head_dim * (2 if cfg.attn_output_gate else 1)
    kvdim = cfg.num_key_value_heads * cfg.head_dim
    out = {"mlp": 0, "linear_proj": 0, "deltanet_core": 0, "attn_proj": 0, "attn_scores": 0}
    for t in cfg.layer_types:
        out["mlp"] += 2 * tokens * 3 * d * i
        if t == "linear_attention":
            out["linear_proj"] += 2 * tokens * (d * (2 * kdim + 2 * vdim + 2 * cfg.linear_num_value_heads) + vdim * d)
            out["deltanet_core"] += batch * deltanet_core_flops(seq, cfg, chunk)
        else:
            out["attn_proj"] += 2 * tokens * (d * (qdim + 2 * kvdim) + cfg.num_attention_heads * cfg.head_dim * d)
            out["attn_scores"] += batch * 2 * 2 * cfg.num_attention_heads * cfg.head_dim * seq * (seq + 1) // 2
    out["lm_head"] = 2 * logits_tokens * d * cfg.padded_vocab_size  # the padded vocab columns are computed too
    out["total"] = sum(out.values())
    return out
