"""The decode cache: explicit state with its own type, driven through `MiniCPMV.prefill` / `MiniCPMV.decode_step`.

One `DecodeCache` holds, for B rows and a capacity of T token slots:
  - `layers`: per scanned block of the LLM (leading axis G = num_layers / period), per layer of the period
    (`layer_0` ..): full attention {"k", "v": [G, B, T, K, H]}; Gated DeltaNet {"conv": [G, B, K-1, C] (the last
    conv inputs), "state": [G, B, Hv, Dk, Dv] float32}.
  - `lengths` [B] int32: tokens each row holds, in slots 0 .. lengths-1 (positions 0 .. lengths-1: the slot is
    the rope position). A row whose length exceeds `capacity` has overflowed: its last writes were dropped and
    its logits are not to be used (`overflowed`); the engine refuses such requests before they run.
  - `visual` [B, T] bool or None: slots holding a visual token (a model with the head cut (2): decode queries, text,
    do not see visual keys in a layer's inactive heads). Filled by a prefill with cuts; decode slots are text.
  - `text_lengths` [B] int32 or None: tokens each row holds in the layers from `Cuts.drop_layer` on (the layer drop
    cut (3)): those layers' KV caches hold only the text tokens, compacted to slots 0 .. text_lengths-1, and their
    DeltaNet states ran over the text tokens only; a decode token goes to slot text_lengths[b] there (and to slot
    lengths[b] in the layers before; its rope position is lengths[b], its index in the whole sequence). -1: the
    prompt had more text tokens than `ModelBatch.text_slots` (the row is `overflowed`; its logits are NaN).
    Both are None for a model without these cuts (its cache is exactly as before the cuts existed).
  - `capacity` (static): T.
  - `empty` (static): True only for a cache that holds nothing in any row (`init_cache`, `reset`): its prefill
    attends inside the new tokens only and writes the buffers from slot 0. A cache coming out of `prefill`,
    `decode_step` or `insert` is never empty, so a prefill on it appends (continued prefill).

Inside a decode loop the engines carry `layers` per block (`text_model.unstack_cache`: a tuple of G dicts without
the leading axis, so no step copies a block's states out of the stack and back) and restack it after the loop;
`insert` and `take` accept either form.

Rows are independent: `insert` writes rows of one cache into slots of another (continuous batching: a request is
prefilled alone, then takes a free slot while the other slots keep decoding).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from uhd_jax.config import ModelConfig, TextConfig
from uhd_jax.model.text_model import init_cache as _init_text_cache
from uhd_jax.model.text_model import stack_cache, unstack_cache
from uhd_jax.model.visual_cuts import Cuts


@flax.struct.dataclass
class DecodeCache:
    layers: dict
    lengths: jax.Array
    capacity: int = flax.struct.field(pytree_node=False)
    empty: bool = flax.struct.field(pytree_node=False, default=False)
    visual: jax.Array | None = None  # [B, T] bool (head cut); None without it
    text_lengths: jax.Array | None = None  # [B] int32 (layer drop cut); None without it

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def overflowed(self):
        """[B] bool: rows that received more tokens than the capacity, or (layer drop cut) whose prompt had more
        text tokens than its text_slots (text_lengths -1): their cache is incomplete."""
        over = self.lengths > self.capacity
        return over if self.text_lengths is None else over | (self.text_lengths < 0)

    def reset(self) -> "DecodeCache":
        """Every row emptied (buffers left as they are: an empty cache's prefill overwrites what it reads)."""
        return self.replace(lengths=jnp.zeros_like(self.lengths), empty=True,
                            visual=None if self.visual is None else jnp.zeros_like(self.visual),
                            text_lengths=None if self.text_lengths is None else jnp.zeros_like(self.text_lengths))

    def insert(self, rows: "DecodeCache", slots) -> "DecodeCache":
        """Rows 0..n-1 of `rows` (same capacity and layer shapes, n rows) written into slots `slots` [n] int of
        this cache. `slots` may be traced: one compiled program serves every slot."""
        if rows.capacity != self.capacity:
            raise ValueError(f"cannot insert rows of a cache of capacity {rows.capacity} into one of "
                             f"{self.capacity}")
        if (rows.visual is None) != (self.visual is None) or (rows.text_lengths is None) != (self.text_lengths is None):
            raise ValueError("cannot insert rows of a cache made for other visual cuts (visual / text_lengths "
                             "fields differ): create both with init_cache(..., cuts=model.cuts)")
        slots = jnp.asarray(slots, jnp.int32).reshape(-1)
        if isinstance(self.layers, tuple):  # per-block layers (a decode loop's form): batch is axis 0
            layers = jax.tree.map(lambda big, small: big.at[slots].set(small.astype(big.dtype)), self.layers,
                                  unstack_cache(rows.layers))
        else:
            layers = jax.tree.map(lambda big, small: big.at[:, slots].set(small.astype(big.dtype)), self.layers,
                                  stack_cache(rows.layers))
        put = lambda big, small: None if big is None else big.at[slots].set(small.astype(big.dtype))
        return self.replace(layers=layers, lengths=self.lengths.at[slots].set(rows.lengths), empty=False,
                            visual=put(self.visual, rows.visual), text_lengths=put(self.text_lengths,
                                                                                   rows.text_lengths))

    def take(self, rows) -> "DecodeCache":
        """The cache of rows `rows` [n] int (e.g. one conversation out of a batch, to continue it alone)."""
        rows = jnp.asarray(rows, jnp.int32).reshape(-1)
        pick = lambda a: None if a is None else a[rows]
        ax = 0 if isinstance(self.layers, tuple) else 1  # per-block layers (`unstack_cache`): batch is axis 0
        return self.replace(layers=jax.tree.map(lambda a: jnp.take(a, rows, axis=ax), self.layers),
                            lengths=self.lengths[rows],
                            visual=pick(self.visual), text_lengths=pick(self.text_lengths))


def init_cache(config: ModelConfig | TextConfig, batch_size: int, capacity: int, dtype=jnp.bfloat16,
               cuts: Cuts | None = None) -> DecodeCache:
    """An empty cache of `capacity` token slots per row. KV and conv windows in `dtype`; the DeltaNet recurrent
    state is always float32. cuts: the model's visual cuts (`MiniCPMV.cuts`): with the head cut the cache gets
    `visual`, with the layer drop `text_lengths` (a prefill with cuts adds them anyway; giving them here keeps the
    cache's structure the same before and after, which `insert` needs)."""
    text = config.text if isinstance(config, ModelConfig) else config
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    c = _init_text_cache(text, batch_size, capacity, dtype)
    cuts = Cuts() if cuts is None else cuts
    return DecodeCache(layers=c["layers"], lengths=c["lengths"], capacity=capacity, empty=True,
                       visual=jnp.zeros((batch_size, capacity), bool) if cuts.heads is not None else None,
                       text_lengths=jnp.zeros((batch_size,), jnp.int32) if cuts.drop_layer is not None else None)
