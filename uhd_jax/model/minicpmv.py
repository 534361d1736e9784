"""MiniCPM-V 4.6 / LLaVA-UHD v4: vision encoder -> visual tokens placed at the image placeholders -> LLM.

Parameters: {"vision": VisionEncoder tree, "text": TextModel tree} (the converter's layout). The placement is
static-shape and row-local: the vision encoder runs the views of all rows as one batch and emits [B, Vr, T_out, D]
tokens; row b's are flattened to [Vr * T_out, D] and sequence position (b, s) takes entry `visual_index[b, s]`
wherever `visual_mask[b, s]`. The host builds those indices (`uhd_jax.data.packer`) and `check_visual_placement`
verifies them before anything runs on the device.
Generation goes through two methods with an explicit cache (`uhd_jax.infer.cache.DecodeCache`, created by
`uhd_jax.infer.cache.init_cache`):
    logits, cache = model.apply(variables, batch, cache, method="prefill")       # prompts (with images) in
    logits, cache = model.apply(variables, tokens, cache, method="decode_step")  # one token per row
Both return float32 logits [B, Vp] of each row's last token. A prefill on a cache that already holds tokens
continues it (multi-turn chat without recomputing the history). The host-side engine is `uhd_jax.infer.engine`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from uhd_jax.config import ModelConfig
from uhd_jax.data.batch import ModelBatch
from uhd_jax.model.gated_deltanet import ChunkOptions
from uhd_jax.model.text_model import TextModel
from uhd_jax.model.vision import VisionEncoder
from uhd_jax.model.visual_cuts import Cuts, VisualLayout

Dtype = Any


def check_visual_placement(batch: ModelBatch, image_token_id: int) -> None:
    """Host-side: every real <|image_pad|> position receives exactly one valid visual token of its own row's views,
    and every valid visual token is placed once. Raises ValueError listing every mismatch (the reference raises
    "Multimodal features and tokens do not match" only after running the vision tower)."""
    ids = np.asarray(batch.input_ids)
    real = np.asarray(batch.attention_mask, bool)
    vmask = np.asarray(batch.visual_mask, bool)
    vindex = np.asarray(batch.visual_index)
    placeholders = (ids == image_token_id) & real
    problems = []
    for b in range(ids.shape[0]):
        n_ph, n_placed = int(placeholders[b].sum()), int(vmask[b].sum())
        if n_ph != n_placed or (vmask[b] != placeholders[b]).any():
            problems.append(f"row {b}: {n_ph} image placeholder tokens (id {image_token_id}) but {n_placed} "
                            f"positions receive visual tokens"
                            + ("" if n_ph != n_placed else " at other positions"))
    if (vmask & ~real).any():
        problems.append("visual tokens placed at padding positions (attention_mask False)")
    if batch.vision is None:
        if vmask.any():
            problems.append(f"{int(vmask.sum())} positions expect visual tokens but the batch has no images")
    else:
        v = batch.vision
        num_tokens = np.asarray(v.num_tokens)
        if num_tokens.shape[:1] != ids.shape[:1] or num_tokens.ndim != 2:
            raise ValueError(f"vision arrays must have leading dims [batch, views_per_row] = [{ids.shape[0]}, Vr], "
                             f"got num_tokens of shape {list(num_tokens.shape)}")
        t_out = v.out_tokens_per_view
        per_view = num_tokens // v.patches_per_token  # [B, Vr]
        for b in range(ids.shape[0]):
            n_tokens = int(per_view[b].sum())
            used = vindex[b][vmask[b]]
            if len(used) != n_tokens:
                problems.append(f"row {b}: {len(used)} image placeholder positions but its "
                                f"{int((per_view[b] > 0).sum())} views yield {n_tokens} visual tokens")
            slot, j = used // t_out, used % t_out
            bad = (used < 0) | (slot >= per_view.shape[1])
            bad[~bad] |= j[~bad] >= per_view[b, slot[~bad]]
            if bad.any():
                problems.append(f"row {b}: {int(bad.sum())} visual_index entries point at padding or past the "
                                f"row's views (e.g. {used[bad][:5].tolist()})")
            if len(np.unique(used)) != len(used):
                problems.append(f"row {b}: some visual tokens are placed more than once")
    if problems:
        raise ValueError("visual token placement does not match the placeholders:\n  " + "\n  ".join(problems))


def gather_visual_tokens(tokens, visual_index):
    """tokens [B, Vr, T_out, D] (each row's own views) -> [B, S, D]: at (b, s) row b's token `visual_index[b, s]`
    of its views flattened to [Vr * T_out, D]. A per-row gather, so a batch-sharded input needs no communication."""
    b, vr, t_out, d = tokens.shape
    return jnp.take_along_axis(tokens.reshape(b, vr * t_out, d), visual_index[..., None].astype(jnp.int32), axis=1)


def _text_cache(cache) -> dict:
    """The text model's cache dict of a DecodeCache (the cut entries only where present)."""
    d = {"layers": cache.layers, "lengths": cache.lengths}
    for f in ("visual", "text_lengths"):
        if getattr(cache, f, None) is not None:
            d[f] = getattr(cache, f)
    return d


def _new_cache(cache, new: dict):
    return cache.replace(layers=new["layers"], lengths=new["lengths"], empty=False,
                         **{f: new[f] for f in ("visual", "text_lengths") if f in new})


class MiniCPMV(nn.Module):
    """ModelBatch -> (logits [B, S, Vp] (or [B, 1, Vp] with last_logits_only; None with compute_logits=False), out).
    Vp = config.text.padded_vocab_size; the padded columns hold the most negative finite value, so they never win
    an argmax and have probability 0.

    out: "vision" (the encoder's intermediates, with "tokens" [B, Vr, T_out, D]) and the text model's intermediates
    ("embeds" after placement, "layer_XX", "norm", and "cache" when a cache is passed)."""

    config: ModelConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    remat_policy: str = "none"
    chunk: ChunkOptions = ChunkOptions()
    vision_remat_policy: str | None = None  # the vision encoder's; None: remat_policy
    unroll: int | bool = 1  # layers (vision) / blocks (text) per layer-scan iteration; True: straight-line code
    cuts: Cuts = Cuts()  # visual-token cuts in the LLM (uhd_jax.model.visual_cuts; needs batch.text_slots)

    def text_model(self, **kw) -> TextModel:
        """The LLM alone, configured as here (unbound; its params are params["text"]), e.g. for text-only scoring."""
        kw = {"cuts": self.cuts, "parent": None, **kw}  # parent None: a free module, not a child of this one
        return TextModel(self.config.text, self.dtype, self.param_dtype, remat_policy=self.remat_policy,
                         attention_impl=self.attention_impl, chunk=self.chunk, **kw)

    def prefill(self, batch: ModelBatch, cache):
        """Appends the batch's prompts (images encoded once per view, visual tokens placed) to each row's cache:
        the KV of the full-attention layers from slot cache.lengths[b] on, the DeltaNet conv window and recurrent
        state continued, positions continuing from cache.lengths[b] (batch.positions is not used). Any padding
        layout with contiguous real tokens (right or left). Returns (float32 logits [B, Vp] of each row's last
        real token, the new cache). Rows whose tokens do not fit the capacity come out `overflowed`.
        With visual cuts (`cuts`): into an empty cache only (a continued prefill raises NotImplementedError); the
        cache then also records the visual slots (head cut) and the text-only lengths (layer drop), which
        `decode_step` uses so that decoding gives the logits of the no-cache cut forward over prompt + tokens."""
        logits, out = self(batch, cache=_text_cache(cache), last_logits_only=True, _cache_empty=cache.empty,
                           _logits_dtype=jnp.float32)
        return logits[:, 0], _new_cache(cache, out["cache"])

    def decode_step(self, tokens, cache, active=None):
        """tokens [B] int: one new token per row, at slot / position cache.lengths[b]. active [B] bool (default
        all): rows where False keep their cache unchanged (finished rows, free slots). Returns (float32 logits
        [B, Vp], the new cache)."""
        tokens = jnp.asarray(tokens, jnp.int32).reshape(-1, 1)
        ones = jnp.ones(tokens.shape, bool)
        zeros = jnp.zeros(tokens.shape, jnp.int32)
        step = ModelBatch(input_ids=tokens, attention_mask=ones, positions=zeros, visual_index=zeros,
                          visual_mask=~ones, loss_mask=~ones)
        logits, out = self(step, cache=_text_cache(cache), _decode=True, _active=active, _logits_dtype=jnp.float32)
        return logits[:, 0], _new_cache(cache, out["cache"])

    @nn.compact
    def __call__(self, batch: ModelBatch, *, cache=None, last_logits_only: bool = False, compute_logits: bool = True,
                 _decode: bool = False, _cache_empty: bool = False, _active=None, _logits_dtype=None):
        """The forward pass; `cache` (the text model's {"layers", "lengths"} dict) and the underscored arguments
        serve `prefill` / `decode_step`. With a cache, positions continue from its lengths."""
        out = {}
        placed = None
        if batch.vision is not None:
            slots, rows = batch.vision.num_tokens.shape, batch.input_ids.shape[0]
            if len(slots) != 2 or slots[0] != rows:
                raise ValueError(f"ModelBatch.vision must hold each row's own view slots, [batch={rows}, "
                                 f"views_per_row, ...]; got num_tokens of shape {list(slots)}")
            tokens, _, out["vision"] = VisionEncoder(self.config, self.dtype, self.param_dtype,
                                                     attn_impl=self.attention_impl,
                                                     remat=self.remat_policy if self.vision_remat_policy is None
                                                     else self.vision_remat_policy, unroll=self.unroll,
                                                     name="vision")(batch.vision)
            placed = gather_visual_tokens(tokens, jnp.asarray(batch.visual_index))
        text = TextModel(self.config.text, self.dtype, self.param_dtype, remat_policy=self.remat_policy,
                         attention_impl=self.attention_impl, chunk=self.chunk, scan_unroll=self.unroll,
                         cuts=self.cuts, name="text")
        logits, text_out = text(jnp.asarray(batch.input_ids), attention_mask=jnp.asarray(batch.attention_mask),
                                positions=None if cache is not None else jnp.asarray(batch.positions), cache=cache,
                                last_logits_only=last_logits_only, compute_logits=compute_logits,
                                segment_ids=None if batch.segment_ids is None else jnp.asarray(batch.segment_ids),
                                placed_embeds=placed, placed_mask=None if placed is None else batch.visual_mask,
                                decode=_decode, cache_empty=_cache_empty, active=_active, logits_dtype=_logits_dtype,
                                text_slots=batch.text_slots,
                                visual_layout=VisualLayout.from_batch(batch) if self.cuts.any else None)
        out.update(text_out)
        return logits, out
