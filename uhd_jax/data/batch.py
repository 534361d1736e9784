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
    text_slots:     static int or None: the compact length that the visual cuts (3) and (4) gather each row's text
                    tokens (real and not visual) into; every row's text-token count must be <= text_slots (the
                    packer checks it on the host). Set by the Packer (`PackerConfig.text_slot_multiple`): the
                    largest count of any row rounded up to that multiple (at most S). Not a pytree leaf: a new
                    value is a new program. None: the cuts refuse the batch.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    positions: np.ndarray
    visual_index: np.ndarray
    visual_mask: np.ndarray
    loss_mask: np.ndarray
    vision: VisionBatch | None = None
    segment_ids: np.ndarray | None = None
    text_slots: int | None = flax.struct.field(pytree_node=False, default=None)


# ---------------------------------------------------------------------------------------------------------------
# Text-slot bookkeeping (host-side; the visual cuts (3) and (4) gather text tokens into text_slots)

def text_count(attention_mask, visual_mask) -> np.ndarray:
    """Host-side: [B] text tokens per row (real and not visual)."""
    return (np.asarray(attention_mask, bool) & ~np.asarray(visual_mask, bool)).sum(-1)


def check_text_slots(attention_mask, visual_mask, text_slots: int) -> None:
    """Host-side: every row's text tokens fit `text_slots`; ValueError naming the rows otherwise (inside jit the
    compaction would have nowhere to put them)."""
    n = text_count(attention_mask, visual_mask)
    bad = np.flatnonzero(n > text_slots)
    if len(bad):
        raise ValueError(f"rows {bad.tolist()} hold {n[bad].tolist()} text tokens > text_slots={text_slots}")


def round_text_slots(count: int, multiple: int, seq_len: int) -> int:
    """`count` rounded up to a multiple of `multiple`, at most seq_len (and at least 1)."""
    return max(1, min(-(-int(count) // multiple) * multiple, seq_len))
