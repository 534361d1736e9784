"""Random static-shape ModelBatches straight from a model config: no tokenizer, no images on disk.

For tests, benchmarks and smoke runs of the train step. Each row: some text, then for each of its views a run of
image placeholders (one per visual token of the view) followed by two text tokens, then more text; the loss mask
covers the text after the images. Views are random pixels of the given patch grids, laid out as the packer does
(`layout.write_view`), so the batch passes `check_visual_placement`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from uhd_jax.config import ModelConfig
from uhd_jax.data.batch import ModelBatch
from uhd_jax.data.layout import VisionBatch, merge_levels, patches_per_token, view_order, write_view

BANK_SIZE = 8


def random_batch(cfg: ModelConfig, *, batch_size: int, seq_len: int, views: Sequence[Sequence[tuple[int, int]]],
                 views_per_row: int, tokens_per_view: int, seed: int = 0, text_tokens: int = 16,
                 counting: bool = False, dtype=np.float32, bank: dict | None = None) -> ModelBatch:
    """`views[b]`: the (h, w) patch grids of row b's views (rows beyond len(views) are padding rows; each grid
    divisible by 2^levels). Raises if a row does not fit `seq_len` or its view slots. `counting`: the text after
    the images cycles through 32 tokens from a random start (a learnable target: a training run's loss falls).
    `bank`: a dict to keep random patch arrays in and reuse (BANK_SIZE per grid): host cost of a copy instead of
    drawing and laying out fresh noise (the full-size benchmark's 40 views per step)."""
    rng = np.random.default_rng(seed)
    mode, mt = cfg.merger.downsample_mode, cfg.merger.merger_times
    levels, unit = merge_levels(mode, mt), patches_per_token(mode, mt)
    p, side = cfg.vision.patch_size, cfg.vision.positions_per_side
    if tokens_per_view % unit:
        raise ValueError(f"tokens_per_view={tokens_per_view} is not a multiple of {unit} ({mode})")
    t_out = tokens_per_view // unit
    vocab = cfg.text.vocab_size
    special = {t for t in (cfg.image_token_id, cfg.video_token_id) if t is not None}
    text_ids = np.array([t for t in range(min(vocab, 4096)) if t not in special], np.int32)

    ids = np.zeros((batch_size, seq_len), np.int32)
    amask = np.zeros((batch_size, seq_len), bool)
    vindex = np.zeros((batch_size, seq_len), np.int32)
    vmask = np.zeros((batch_size, seq_len), bool)
    lmask = np.zeros((batch_size, seq_len), bool)
    shape = (batch_size, views_per_row)
    vb = {"patches": np.zeros(shape + (tokens_per_view, 3 * p * p), dtype), "pos_ids": np.zeros(
        shape + (tokens_per_view,), np.int32), "num_tokens": np.zeros(shape, np.int32),
        "grid": np.zeros(shape + (2,), np.int32)}
    if len(views) > batch_size:
        raise ValueError(f"{len(views)} rows of views for batch_size={batch_size}")
    for b, grids in enumerate(views):
        if len(grids) > views_per_row:
            raise ValueError(f"row {b}: {len(grids)} views > views_per_row={views_per_row}")
        row, placed, index = list(rng.choice(text_ids, text_tokens)), [False] * text_tokens, [0] * text_tokens
        for slot, (h, w) in enumerate(grids):
            if bank is None:
                view = rng.standard_normal((3, h * p, w * p)).astype(np.float32)  # the batches the tests were tuned on
                write_view(vb["patches"][b], vb["pos_ids"][b], vb["num_tokens"][b], vb["grid"][b], slot, view,
                           patch_size=p, levels=levels, positions_per_side=side)
            else:  # noise needs no layout: copy ready patches, positions from the block order of the grid
                pool = bank.setdefault((h, w), [])
                k = int(rng.integers(0, BANK_SIZE))
                while len(pool) <= k:
                    pool.append(np.random.default_rng((h, w, len(pool))).standard_normal((h * w, 3 * p * p),
                                                                                         dtype=np.float32))
                vb["patches"][b, slot, :h * w] = pool[k]
                vb["pos_ids"][b, slot, :h * w] = view_order(h, w, levels, side)[1]
                vb["num_tokens"][b, slot], vb["grid"][b, slot] = h * w, (h, w)
            n = h * w // unit
            row += [cfg.image_token_id] * n + list(rng.choice(text_ids, 2))
            placed += [True] * n + [False] * 2
            index += [slot * t_out + j for j in range(n)] + [0, 0]
        start = len(row)
        if counting:  # a cycle through 32 tokens from a random start: learnable in a few dozen steps
            first = int(rng.integers(0, 32))
            row += [int(text_ids[(first + j) % 32]) for j in range(text_tokens)]
        else:
            row += list(rng.choice(text_ids, text_tokens))
        placed += [False] * text_tokens
        index += [0] * text_tokens
        if len(row) > seq_len:
            raise ValueError(f"row {b} has {len(row)} tokens > seq_len={seq_len}")
        n = len(row)
        ids[b, :n], amask[b, :n], vmask[b, :n], vindex[b, :n] = row, True, placed, index
        lmask[b, start:n] = True
    positions = np.where(amask, np.arange(seq_len)[None], 0).astype(np.int32)
    vision = VisionBatch(**vb, mode=mode, merger_times=mt) if views_per_row else None
    return ModelBatch(input_ids=ids, attention_mask=amask, positions=positions, visual_index=vindex,
                      visual_mask=vmask, loss_mask=lmask, vision=vision)


class RandomBatches:
    """Endless random batches of this host's rows (the `random` data source): row r of global batch i gets 0, 1
    or 2 views of random grids, a counting text target, all from a seed derived from (seed, i, r), so every host
    builds only its own rows and a restored state continues exactly. `get_state`/`set_state` as grain's."""

    GRIDS = ((4, 4), (4, 8), (8, 4), (8, 8))

    def __init__(self, cfg: ModelConfig, *, global_batch: int, seq_len: int, views_per_row: int,
                 tokens_per_view: int, seed: int = 0, shard_index: int = 0, shard_count: int = 1,
                 views: int = -1, grid: int = 0):
        """views: views per row (-1: 0, 1 or 2 at random); grid: every view S x S patches (0: small random grids).
        views=10, grid=32 is the benchmark workload: one 1344x1344 image (thumbnail + 3x3 slices) per row."""
        if global_batch % shard_count:
            raise ValueError(f"batch_size {global_batch} is not divisible by {shard_count} hosts")
        self.cfg, self.seq_len, self.vpr, self.tpv, self.seed = cfg, seq_len, views_per_row, tokens_per_view, seed
        self.rows = global_batch // shard_count
        self.first_row = shard_index * self.rows
        side = int(np.sqrt(tokens_per_view))
        self.grids = [g for g in self.GRIDS if g[0] * g[1] <= tokens_per_view and max(g) <= side] or [(4, 4)]
        if grid:
            if grid * grid > tokens_per_view:
                raise ValueError(f"views of {grid}x{grid} patches do not fit tokens_per_view={tokens_per_view}")
            self.grids = [(grid, grid)]
        if views > views_per_row:
            raise ValueError(f"{views} views per row > views_per_row={views_per_row}")
        self.views = views
        self.bank = {}
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self) -> ModelBatch:
        rows = []
        for r in range(self.first_row, self.first_row + self.rows):
            rng = np.random.default_rng((self.seed, self.index, r))
            n = self.views if self.views >= 0 else (int(rng.integers(0, min(self.vpr, 2) + 1)) if self.vpr else 0)
            rows.append([self.grids[int(k)] for k in rng.integers(0, len(self.grids), n)])
        batch = random_batch(self.cfg, batch_size=self.rows, seq_len=self.seq_len, views=rows,
                             views_per_row=self.vpr, tokens_per_view=self.tpv, counting=True,
                             seed=hash((self.seed, self.index, self.first_row)) % (1 << 31), text_tokens=24,
                             bank=self.bank)
        self.index += 1
        return batch

    def get_state(self) -> dict:
        return {"index": self.index}

    def set_state(self, state: dict) -> None:
        self.index = int(state["index"])
