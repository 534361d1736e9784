"""The static-shape model batch: text arrays plus the vision arrays, and where visual tokens go.

Each row owns its view slots: the vision encoder turns row b's views (`vision.patches[b]`, [Vr, T, C*P*P])
into visual tokens [Vr, T_out, D_llm] (T_out = T / 4^levels); flattened to [Vr*T_out, D_llm], the row's token
`visual_index[b, s]` is written at sequence position (b, s) wherever `visual_mask[b, s]` is True. Sharding
the batch dimension therefore keeps every row with its views. The host builds and checks these indices;
nothing data-dependent happens inside `jit`.
"""

from __future__ import annotations

import flax.struct
import numpy as np

from uhd_jax.data.layout import VisionBatch


@flax.struct.dataclass
class ModelBatch:
    """input_ids:     [B, S] int32 token ids (padding: any id, masked by attention_mask).
    attention_mask: [B, S] bool, True for real tokens (the packer puts them first; the model accepts any
                    layout where each row's real tokens are contiguous, e.g. left padding).
    positions:      [B, S] int32 rope positions (0.. for real tokens, 0 on padding).
    visual_index:   [B, S] int32 index into the row's own flattened visual tokens [Vr*T_out] (0 where unused).
    visual_mask:    [B, S] bool, True at <|image_pad|> positions that receive a visual token.
    loss_mask:      [B, S] bool, True where the token is a training target (assistant turns).
    vision:         VisionBatch with leading dims [B, Vr] (Vr view slots per row), or None for a text-only batch.
    segment_ids:    [B, S] int32 or None. None: one sample per row. Packed rows (`PackerConfig.pack`): the row's
                    samples numbered 1, 2, ... and padding 0; positions restart at 0 for each sample, a sample's
                    views take consecutive view slots of the row (visual_index stays row-local), and the model
                    keeps the samples apart (attention, DeltaNet conv and state reset where the id changes;
                    no next-token target crosses a change). Batch-sharded like input_ids.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    positions: np.ndarray
    visual_index: np.ndarray
    visual_mask: np.ndarray
    loss_mask: np.ndarray
    vision: VisionBatch | None = None
    segment_ids: np.ndarray | None = None
