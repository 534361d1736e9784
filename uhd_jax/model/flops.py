"""FLOPs of the vision path, per stage, counted from the config (2 FLOPs per multiply-add).

Matrix products and attention only; norms, activations and softmax are a fraction of a percent.
`tokens` is per-view patch counts: pass the padded budget for every view to count what the compiled
program executes (compare with XLA's cost analysis), or the real counts for useful work.
"""

from __future__ import annotations

from typing import Sequence

from uhd_jax.config import ModelConfig


def _vit_layer(n: int, d: int, i: int) -> int:
    return 2 * n * (4 * d * d + 2 * d * i) + 4 * n * n * d


def vision_flops(cfg: ModelConfig, tokens: Sequence[int], mode: str) -> dict[str, int]:
    """Per-stage FLOPs for views of `tokens[i]` patches each, and the total under "total"."""
    v = cfg.vision
    d, i = v.hidden_size, v.intermediate_size
    stages = {"patch_embed": 0, "vit_full_res": 0, "window_merger": 0, "vit_merged": 0, "merger": 0}
    n_pre = v.insert_layer_id + 1
    for n in tokens:
        stages["patch_embed"] += 2 * n * v.patch_dim * d
        if mode == "16x":
            stages["vit_full_res"] += n_pre * _vit_layer(n, d, i)
            # window attention: projections on all n tokens, each token attends to its 4-token window
            stages["window_merger"] += 2 * n * 4 * d * d + 4 * n * 4 * d
            stages["window_merger"] += 2 * (n // 4) * (4 * d * 4 * i + 4 * i * d)
            m = n // 4
            stages["vit_merged"] += (v.num_hidden_layers - n_pre) * _vit_layer(m, d, i)
        else:
            stages["vit_full_res"] += v.num_hidden_layers * _vit_layer(n, d, i)
            m = n
        for r in range(cfg.merger.merger_times):
            out = cfg.text.hidden_size if r == cfg.merger.merger_times - 1 else d
            m //= 4
            stages["merger"] += 2 * m * (4 * d * 4 * d + 4 * d * out)
    stages["total"] = sum(stages.values())
    return stages
