"""The static-shape model batch: text arrays plus the vision arrays, and where visual tokens go.

The vision encoder turns `vision` ([V, T, C*P*P] patches) into visual tokens [V, T_out, D_llm]
(T_out = T / 4^levels); flattened to [V*T_out, D_llm], token `visual_index[b, s]` is written at
sequence position (b, s) wherever `visual_mask[b, s]` is True. The host builds and checks these
indices; nothing data-dependent happens inside `jit`.
"""

from __future__ import annotations

import flax.struct
import numpy as np

from uhd_jax.data.layout import VisionBatch


@flax.struct.dataclass
class ModelBatch:
    """input_ids:     [B, S] int32 token ids (padding: any id, masked by attention_mask).
    attention_mask: [B, S] bool, True for real tokens (left-aligned: real tokens first).
    positions:      [B, S] int32 rope positions (0.. for real tokens, 0 on padding).
    visual_index:   [B, S] int32 row of the flattened visual tokens to place here (0 where unused).
    visual_mask:    [B, S] bool, True at <|image_pad|> positions that receive a visual token.
    loss_mask:      [B, S] bool, True where the token is a training target (assistant turns).
    vision:         VisionBatch or None for a text-only batch.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    positions: np.ndarray
    visual_index: np.ndarray
    visual_mask: np.ndarray
    loss_mask: np.ndarray
    vision: VisionBatch | None = None
