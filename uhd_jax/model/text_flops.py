"""FLOPs of the LLM forward pass, counted from the config (2 FLOPs per multiply-add).

Matrix products, attention and the Gated DeltaNet chunk algorithm as `gated_deltanet.py` runs it; norms,
activations, softmax and the causal conv are a fraction of a percent. Training (forward + backward without
rematerialisation) is 3x the forward.
"""

from __future__ import annotations

import math

from uhd_jax.config import TextConfig


def _associative_combines(n: int) -> int:
    """Element combines that `jax.lax.associative_scan` performs on n elements."""
    if n < 2:
        return 0
    return n // 2 + _associative_combines(n // 2) + (n // 2 - 1 if n % 2 == 0 else n // 2)


def _unit_lower_inverse_flops(c: int) -> int:
    """Recursive 2x2 blocking: at block size b, c/b blocks of two (b/2)^3 products."""
    flops, b = 0, 2
    while b <= c:
        flops += c * b * b // 2
        b *= 2
    return flops


def deltanet_core_flops(seq: int, cfg: TextConfig, chunk_size: int = 64, state_scan: str = "associative") -> int:
    """One sequence, all value heads: intra-chunk UT transform + the state recurrence across chunks."""
    c, dk, dv = chunk_size, cfg.linear_key_head_dim, cfg.linear_value_head_dim
    n = math.ceil(seq / c)
    per_chunk = (2 * c * c * dk * 2  # k_beta k^T and q k^T
                 + _unit_lower_inverse_flops(c)  # (I + A)^-1
                 + 2 * c * c * (dv + dk)  # u = T v_beta, w = T k_beta
                 + 2 * c * dk * (dk + dv)  # transition M and bias B
                 + 2 * c * dk * dv * 2 + 2 * c * c * dv)  # outputs: w S, q S, attn v_new
    if state_scan == "associative":  # compositions (M2 M1, M2 B1)
        scan = _associative_combines(n) * 2 * dk * dk * (dk + dv)
    else:  # n steps of M S
        scan = n * 2 * dk * dk * dv
    return cfg.linear_num_value_heads * (n * per_chunk + scan)


def text_forward_flops(cfg: TextConfig, batch: int, seq: int, logits_tokens: int | None = None,
                       chunk_size: int = 64, state_scan: str = "associative") -> dict[str, int]:
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
            out["deltanet_core"] += batch * deltanet_core_flops(seq, cfg, chunk_size, state_scan)
        else:
            out["attn_proj"] += 2 * tokens * (d * (qdim + 2 * kvdim) + cfg.num_attention_heads * cfg.head_dim * d)
            out["attn_scores"] += batch * 2 * 2 * cfg.num_attention_heads * cfg.head_dim * seq * (seq + 1) // 2
    out["lm_head"] = 2 * logits_tokens * d * cfg.vocab_size
    out["total"] = sum(out.values())
    return out
