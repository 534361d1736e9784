"""Processed samples -> the static-shape ModelBatch the model takes.

Shapes come only from the config: [batch_size, S] with S from `seq_buckets` (the smallest that fits the
longest sample), and [num_views, tokens_per_view, C*P*P] for the vision input. So a run compiles at most
`len(seq_buckets)` programs.

Visual-token placement: the encoder turns the views into [num_views, T_out, D] (T_out = tokens_per_view /
4^levels), flattened to [num_views * T_out, D]. The j-th image token of the k-th view of the batch sits at
(b, s) with `visual_index[b, s] = k * T_out + j` and `visual_mask[b, s] = True`. Block order (layout.py) makes
the first `view_token_count` outputs of a view its real tokens, in the reference's row-major order.

When a sample does not fit (its views exceed `num_views`, or its tokens the largest bucket), `overflow`
decides: "error" raises an error naming the sample; "fewer_slices" rebuilds it with a smaller
`max_slice_nums` (down to 1: thumbnail only) until it fits, and raises if even that does not. Image tokens are
never dropped or truncated. A view larger than `tokens_per_view` patches always raises (fewer slices do not
shrink a thumbnail): raise `tokens_per_view` or lower `scale_resolution`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from uhd_jax.data.batch import ModelBatch
from uhd_jax.data.layout import merge_levels, pack_views
from uhd_jax.data.processor import Processor, Sample, check_placeholders

OVERFLOW_POLICIES = ("error", "fewer_slices")


class SampleDoesNotFit(ValueError):
    """A sample that cannot be packed under the configured budgets (the message names it)."""


@dataclasses.dataclass(frozen=True)
class PackerConfig:
    batch_size: int = 1
    seq_buckets: tuple[int, ...] = (512, 1024, 2048, 4096)
    tokens_per_view: int = 1152  # patches per view slot; 1152 holds every view of images with aspect < 9:1
    num_views: int = 10  # view slots per batch (0: text-only batches, vision=None)
    overflow: str = "error"  # "error" or "fewer_slices"
    positions_per_side: int = 70  # side of the ViT's learned position table
    merger_times: int = 1
    patches_dtype: str = "float32"

    def __post_init__(self):
        if self.overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}, got {self.overflow!r}")
        if not self.seq_buckets or list(self.seq_buckets) != sorted(set(self.seq_buckets)):
            raise ValueError(f"seq_buckets must be increasing and non-empty, got {self.seq_buckets}")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")


class Packer:
    """Packs Samples from `processor` into ModelBatches of fixed shapes."""

    def __init__(self, processor: Processor, config: PackerConfig = PackerConfig()):
        self.processor = processor
        self.config = config
        sc = processor.slice_config
        self.mode = sc.downsample_mode
        self.patch_size = sc.patch_size
        self.levels = merge_levels(self.mode, config.merger_times)
        unit = 1 << (2 * self.levels)
        if config.tokens_per_view % unit:
            raise ValueError(f"tokens_per_view={config.tokens_per_view} must be a multiple of {unit} in "
                             f"{self.mode} mode")
        self.out_tokens_per_view = config.tokens_per_view >> (2 * self.levels)

    # ------------------------------------------------------------------ fitting one sample
    def _problem(self, s: Sample, view_budget: int) -> str | None:
        c = self.config
        for i, (h, w) in enumerate(s.view_grids):
            if h * w > c.tokens_per_view:
                return (f"view {i} has a {h}x{w} patch grid = {h * w} patches > tokens_per_view="
                        f"{c.tokens_per_view} (raise tokens_per_view or lower scale_resolution)")
        if s.num_views > view_budget:
            return f"{s.num_views} views > {view_budget} view slots (num_views)"
        if len(s) > c.seq_buckets[-1]:
            return f"{len(s)} tokens > the largest sequence bucket {c.seq_buckets[-1]}"
        return None

    def fit(self, s: Sample, view_budget: int | None = None) -> Sample:
        """Returns `s`, or `s` rebuilt with fewer slices ("fewer_slices"), so that it fits one batch alone;
        raises SampleDoesNotFit (naming the sample and the reason) otherwise."""
        view_budget = self.config.num_views if view_budget is None else view_budget
        why = self._problem(s, view_budget)
        if why is None:
            return s
        if self.config.overflow == "error" or s.request is None:
            raise SampleDoesNotFit(f"{s.name}: does not fit: {why} (overflow={self.config.overflow!r})")
        msn = s.max_slice_nums
        while why is not None and msn > 1:
            msn -= 1
            s = self.processor.build(s.request, max_slice_nums=msn)
            why = self._problem(s, view_budget)
        if why is not None:
            raise SampleDoesNotFit(f"{s.name}: does not fit even with max_slice_nums=1: {why}")
        return s

    # ------------------------------------------------------------------ packing
    def bucket(self, length: int) -> int:
        for b in self.config.seq_buckets:
            if length <= b:
                return b
        raise SampleDoesNotFit(f"{length} tokens > the largest sequence bucket {self.config.seq_buckets[-1]}")

    def pack(self, samples: Sequence[Sample]) -> ModelBatch:
        """One ModelBatch of `batch_size` rows (missing rows are all padding). Applies the overflow policy to
        samples that do not fit; several samples that fit alone but not together raise (use `batches`)."""
        c = self.config
        if len(samples) > c.batch_size:
            raise ValueError(f"{len(samples)} samples > batch_size={c.batch_size}")
        samples = [self.fit(s) for s in samples]
        total_views = sum(s.num_views for s in samples)
        if total_views > c.num_views:
            if c.overflow == "fewer_slices":
                samples = self._shrink_together(samples)
            else:
                names = ", ".join(s.name for s in samples)
                raise SampleDoesNotFit(f"{total_views} views in the batch > num_views={c.num_views} ({names})")
        S = self.bucket(max((len(s) for s in samples), default=1))
        B = c.batch_size
        input_ids = np.full((B, S), self.processor.pad_token_id, np.int32)
        attention_mask = np.zeros((B, S), bool)
        positions = np.zeros((B, S), np.int32)
        visual_index = np.zeros((B, S), np.int32)
        visual_mask = np.zeros((B, S), bool)
        loss_mask = np.zeros((B, S), bool)
        views: list[np.ndarray] = []
        T_out = self.out_tokens_per_view
        for b, s in enumerate(samples):
            L = len(s)
            input_ids[b, :L] = s.input_ids
            attention_mask[b, :L] = True
            positions[b, :L] = np.arange(L, dtype=np.int32)
            loss_mask[b, :L] = s.loss_mask
            runs = check_placeholders(s.input_ids, s.view_grids, self.processor.image_token_id, self.mode, s.name,
                                      c.merger_times)
            for (start, n), v in zip(runs, s.views):
                slot = len(views)
                visual_index[b, start:start + n] = slot * T_out + np.arange(n, dtype=np.int32)
                visual_mask[b, start:start + n] = True
                views.append(v)
        vision = None
        if c.num_views > 0:
            vision = pack_views(views, patch_size=self.patch_size, positions_per_side=c.positions_per_side,
                                mode=self.mode, merger_times=c.merger_times, tokens_per_view=c.tokens_per_view,
                                num_views=c.num_views, dtype=np.dtype(c.patches_dtype))
        elif views:
            raise SampleDoesNotFit("num_views=0 (text-only batches) but the batch has images")
        return ModelBatch(input_ids=input_ids, attention_mask=attention_mask, positions=positions,
                          visual_index=visual_index, visual_mask=visual_mask, loss_mask=loss_mask, vision=vision)

    def _shrink_together(self, samples: list[Sample]) -> list[Sample]:
        samples = list(samples)
        while sum(s.num_views for s in samples) > self.config.num_views:
            i = max(range(len(samples)), key=lambda k: (samples[k].num_views, -k))
            s = samples[i]
            if s.max_slice_nums <= 1 or s.request is None or s.num_views <= len(s.plans):
                names = ", ".join(x.name for x in samples)
                raise SampleDoesNotFit(f"{sum(x.num_views for x in samples)} views > num_views="
                                       f"{self.config.num_views} even with fewer slices ({names})")
            samples[i] = self.processor.build(s.request, max_slice_nums=s.max_slice_nums - 1)
        return samples

    def batches(self, samples: Iterable[Sample], *, on_skip: Callable[[Sample, Exception], None] | None = None
                ) -> Iterator[ModelBatch]:
        """Greedy streaming batcher: fills a batch in order until the next sample would exceed batch_size or
        num_views, then emits it. A sample that does not fit alone raises, or with `on_skip` is reported there
        and skipped (counted by the caller; its image tokens are never silently dropped)."""
        cur: list[Sample] = []
        views = 0
        for s in samples:
            try:
                s = self.fit(s)
            except SampleDoesNotFit as e:
                if on_skip is None:
                    raise
                on_skip(s, e)
                continue
            if cur and (len(cur) == self.config.batch_size or views + s.num_views > self.config.num_views):
                yield self.pack(cur)
                cur, views = [], 0
            cur.append(s)
            views += s.num_views
        if cur:
            yield self.pack(cur)


def pack_samples(processor: Processor, samples: Sequence[Sample], **config) -> ModelBatch:
    """Convenience: one ModelBatch from samples, sizes from `config` (PackerConfig fields); by default
    batch_size = len(samples) and num_views = the samples' total views."""
    config.setdefault("batch_size", max(1, len(samples)))
    config.setdefault("num_views", sum(s.num_views for s in samples))
    return Packer(processor, PackerConfig(**config)).pack(samples)
