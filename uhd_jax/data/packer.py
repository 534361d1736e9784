"""Processed samples -> the static-shape ModelBatch the model takes.

Shapes come only from the config: [batch_size, S] with S from `seq_buckets` (the smallest that fits the
longest sample), and [batch_size, views_per_row, tokens_per_view, C*P*P] for the vision input. So a run
compiles at most `len(seq_buckets)` programs.

Each row owns its view slots, so splitting the batch dimension over devices (or building rows on different
hosts) keeps a row and its views together. Visual-token placement is row-local: the encoder turns row b's views
into [views_per_row, T_out, D] (T_out = tokens_per_view / 4^levels), flattened to [views_per_row * T_out, D];
the j-th image token of the row's k-th view sits at (b, s) with `visual_index[b, s] = k * T_out + j` and
`visual_mask[b, s] = True`. Block order (layout.py) makes the first `view_token_count` outputs of a view its
real tokens, in the reference's row-major order.

Rows hold real tokens first (attention_mask True), then `pad_token_id`; positions count 0.. on real tokens
and are 0 on padding; loss_mask[b, s] is True where token s itself is a training target (the model shifts).
Rows beyond the samples given are all padding. View slots beyond a row's views are zero with num_tokens 0.
With `views_per_row=0` batches are text-only (vision None).

Packing (`pack=True`): a row holds several samples, placed greedily in order (next-fit): a sample goes into the
current row if its tokens fit the largest bucket and its views the row's free view slots, otherwise it starts the
next row; S is then the smallest bucket that holds the longest row. Within a row the samples follow one another
(real tokens still left-aligned), `segment_ids` numbers them 1, 2, ... (0 on padding), positions restart at 0 for
each, and a sample's views take the row's next view slots, so `visual_index` stays row-local. The model keeps the
samples apart (uhd_jax.model.segments) and no next-token target crosses from one to the next. With `pack=False`
(the default) rows and arrays are exactly as without the option (segment_ids None).

When a sample does not fit (a view above `tokens_per_view` patches, more views than `views_per_row`, more
tokens than the largest bucket), `overflow` decides: "error" raises SampleDoesNotFit naming the sample and the
reason; "fewer_slices" rebuilds it with a smaller `max_slice_nums` (down to 1: thumbnail only) until it fits,
and raises if even that does not (fewer slices do not shrink a thumbnail: an extreme-aspect image whose
thumbnail exceeds `tokens_per_view` needs a larger `tokens_per_view`). Image tokens are never dropped or
truncated.

The dataset pipeline (records -> Samples -> these batches, in grain worker processes, bad records skipped and
counted) is `uhd_jax.data.pipeline.make_batches`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from uhd_jax.data.batch import ModelBatch, check_text_slots, round_text_slots, text_count
from uhd_jax.data.layout import VisionBatch, merge_levels, patches_per_token, write_view
from uhd_jax.data.processor import Processor, Sample, check_placeholders

OVERFLOW_POLICIES = ("error", "fewer_slices")
_BATCH_FIELDS = ("input_ids", "attention_mask", "positions", "visual_index", "visual_mask", "loss_mask")


def _dtype(name) -> np.dtype:
    """numpy dtype from a name; "bfloat16" through ml_dtypes (installed with jax)."""
    if isinstance(name, str) and name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _zeros(specs) -> dict:
    return {name: np.zeros(shape, dtype) for name, shape, dtype in specs}


class SampleDoesNotFit(ValueError):
    """A sample that cannot be packed under the configured budgets (the message names it)."""


@dataclasses.dataclass(frozen=True)
class PackerConfig:
    batch_size: int = 1
    seq_buckets: tuple[int, ...] = (512, 1024, 2048, 4096)
    tokens_per_view: int = 1152  # patches per view slot; 1152 holds every view of images with aspect < 9:1
    views_per_row: int = 10  # view slots of each row (0: text-only batches, vision=None)
    overflow: str = "error"  # "error" or "fewer_slices"
    positions_per_side: int = 70  # side of the ViT's learned position table
    merger_times: int | None = None  # the processor's (None); a different value is an error
    patches_dtype: str = "float32"  # or "bfloat16": half the host memory and transfer, not bit-exact pixels
    pack: bool = False  # several samples per row (segment_ids); False: one sample per row
    # ModelBatch.text_slots for the visual cuts (3) and (4): the most text tokens of any row rounded up to this
    # multiple (at most S). None (default): text_slots stays None, so batches (and the number of compiled
    # programs, one per sequence bucket) are unchanged for models without cuts. 128 is the usual choice.
    text_slot_multiple: int | None = None

    def __post_init__(self):
        if self.overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}, got {self.overflow!r}")
        if not self.seq_buckets or list(self.seq_buckets) != sorted(set(self.seq_buckets)):
            raise ValueError(f"seq_buckets must be increasing and non-empty, got {self.seq_buckets}")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.views_per_row < 0:
            raise ValueError(f"views_per_row must be >= 0, got {self.views_per_row}")
        if not isinstance(self.pack, bool):
            raise ValueError(f"pack must be True or False, got {self.pack!r}")
        if self.text_slot_multiple is not None and not (isinstance(self.text_slot_multiple, int)
                                                        and self.text_slot_multiple >= 1):
            raise ValueError(f"text_slot_multiple must be a positive int or None, got {self.text_slot_multiple!r}")


class RowFiller:
    """Which row of a batch each next sample goes to; the one rule that `Packer.pack`, `Packer.batches` and the
    grain pipeline share. `add(sample)` returns the row index, or None when the sample does not fit this batch
    (it starts the next one); `full` says no further sample can fit (so nothing more needs to be read).
    pack=False: one sample per row. pack=True: next-fit, a row holds samples while their tokens fit the largest
    bucket and their views the row's view slots. Samples must already fit a row alone (`Packer.fit`)."""

    def __init__(self, config: PackerConfig):
        self.config = config
        self.rows = 0  # rows started
        self.tokens = 0  # tokens and views of the last row
        self.views = 0

    def add(self, s: Sample) -> int | None:
        c = self.config
        n, v = len(s), s.num_views
        if c.pack and self.rows and self.tokens + n <= c.seq_buckets[-1] and self.views + v <= c.views_per_row:
            self.tokens, self.views = self.tokens + n, self.views + v
            return self.rows - 1
        if self.rows == c.batch_size:
            return None
        self.rows, self.tokens, self.views = self.rows + 1, n, v
        return self.rows - 1

    @property
    def full(self) -> bool:
        if self.rows < self.config.batch_size:
            return False
        return not self.config.pack or self.tokens >= self.config.seq_buckets[-1]


class Packer:
    """Packs Samples from `processor` into ModelBatches of fixed shapes."""

    def __init__(self, processor: Processor, config: PackerConfig = PackerConfig()):
        self.processor = processor
        self.config = config
        sc = processor.slice_config
        self.mode = sc.downsample_mode
        self.patch_size = sc.patch_size
        mt = sc.merger_times
        if config.merger_times is not None and config.merger_times != mt:
            raise ValueError(f"PackerConfig.merger_times={config.merger_times} but the processor slices for "
                             f"merger_times={mt} (leave it None to take the processor's)")
        self.merger_times = mt
        self.levels = merge_levels(self.mode, mt)
        unit = patches_per_token(self.mode, mt)
        if config.tokens_per_view % unit:
            raise ValueError(f"tokens_per_view={config.tokens_per_view} must be a multiple of {unit} in "
                             f"{self.mode} mode")
        self.out_tokens_per_view = config.tokens_per_view // unit

    # ------------------------------------------------------------------ fitting one sample
    def _problem(self, s: Sample, view_budget: int) -> str | None:
        c = self.config
        for i, (h, w) in enumerate(s.view_grids):
            if h * w > c.tokens_per_view:
                return (f"view {i} has a {h}x{w} patch grid = {h * w} patches > tokens_per_view="
                        f"{c.tokens_per_view} (raise tokens_per_view or lower scale_resolution)")
        if s.num_views > view_budget:
            return f"{s.num_views} views > {view_budget} view slots per row (views_per_row)"
        if len(s) > c.seq_buckets[-1]:
            return f"{len(s)} tokens > the largest sequence bucket {c.seq_buckets[-1]}"
        return None

    def fit(self, s: Sample, view_budget: int | None = None) -> Sample:
        """Returns `s`, or `s` rebuilt with fewer slices ("fewer_slices"), so that it fits one batch alone;
        raises SampleDoesNotFit (naming the sample and the reason) otherwise."""
        view_budget = self.config.views_per_row if view_budget is None else view_budget
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

    def assign_rows(self, samples: Sequence[Sample]) -> list[int]:
        """The row of each sample (`RowFiller`: sample i in row i, or packed next-fit with `pack`); raises
        ValueError if they need more than `batch_size` rows. Samples must fit alone (`fit`)."""
        filler, out = RowFiller(self.config), []
        for i, s in enumerate(samples):
            r = filler.add(s)
            if r is None:
                raise ValueError(f"{len(samples)} samples need more than batch_size={self.config.batch_size} rows "
                                 f"(sample {i}, {s.name}, does not fit)" + (" with pack=True" if self.config.pack
                                                                           else ""))
            out.append(r)
        return out

    def pack(self, samples: Sequence[Sample], *, alloc: Callable[[list], dict] | None = None) -> ModelBatch:
        """One ModelBatch of `batch_size` rows (missing rows are all padding); sample i is row i with its views
        in that row's slots, or with `pack` several samples per row (`assign_rows`). Applies the overflow policy to
        samples that do not fit.

        `alloc(specs)`, specs a list of (name, shape, dtype), returns zero-filled arrays by name (default:
        np.zeros); the grain pipeline's workers use it to pack straight into shared memory."""
        c = self.config
        if len(samples) > c.batch_size and not c.pack:
            raise ValueError(f"{len(samples)} samples > batch_size={c.batch_size}")
        samples = [self.fit(s) for s in samples]
        row_of = self.assign_rows(samples)
        row_len = np.zeros(c.batch_size, np.int64)
        for s, r in zip(samples, row_of):
            row_len[r] += len(s)
        S = self.bucket(max(int(row_len.max()), 1))
        B, V, T = c.batch_size, c.views_per_row, c.tokens_per_view
        pdim = 3 * self.patch_size**2
        fields = _BATCH_FIELDS + (("segment_ids",) if c.pack else ())
        specs = [(f, (B, S), np.int32 if f in ("input_ids", "positions", "visual_index", "segment_ids") else np.bool_)
                 for f in fields]
        if V > 0:
            specs += [("vision.patches", (B, V, T, pdim), _dtype(c.patches_dtype)),
                      ("vision.pos_ids", (B, V, T), np.int32), ("vision.num_tokens", (B, V), np.int32),
                      ("vision.grid", (B, V, 2), np.int32)]
        arr = (alloc or _zeros)(specs)
        input_ids = arr["input_ids"]
        input_ids[...] = self.processor.pad_token_id
        T_out = self.out_tokens_per_view
        offset = np.zeros(B, np.int64)  # next free token of each row
        first_slot = np.zeros(B, np.int64)  # next free view slot of each row
        count = np.zeros(B, np.int32)  # samples in each row so far
        for s, b in zip(samples, row_of):
            L, o, k0 = len(s), int(offset[b]), int(first_slot[b])
            input_ids[b, o:o + L] = s.input_ids
            arr["attention_mask"][b, o:o + L] = True
            arr["positions"][b, o:o + L] = np.arange(L, dtype=np.int32)
            arr["loss_mask"][b, o:o + L] = s.loss_mask
            if c.pack:
                count[b] += 1
                arr["segment_ids"][b, o:o + L] = count[b]
            runs = check_placeholders(s.input_ids, s.view_grids, self.processor.image_token_id, self.mode, s.name,
                                      self.merger_times)
            for i, ((start, n), v) in enumerate(zip(runs, s.views)):
                slot = k0 + i
                arr["visual_index"][b, o + start:o + start + n] = slot * T_out + np.arange(n, dtype=np.int32)
                arr["visual_mask"][b, o + start:o + start + n] = True
                self._put_view(arr, b, slot, v, s.name)
            offset[b] += L
            first_slot[b] += s.num_views
        vision = None
        if V > 0:
            vision = VisionBatch(patches=arr["vision.patches"], pos_ids=arr["vision.pos_ids"],
                                 num_tokens=arr["vision.num_tokens"], grid=arr["vision.grid"], mode=self.mode,
                                 merger_times=self.merger_times)
        text_slots = None
        if c.text_slot_multiple is not None:  # every row's text tokens fit: the model's compaction never overflows
            most = int(text_count(arr["attention_mask"], arr["visual_mask"]).max())
            text_slots = round_text_slots(most, c.text_slot_multiple, S)
            check_text_slots(arr["attention_mask"], arr["visual_mask"], text_slots)
        return ModelBatch(**{f: arr[f] for f in _BATCH_FIELDS}, vision=vision,
                          segment_ids=arr["segment_ids"] if c.pack else None, text_slots=text_slots)

    def _put_view(self, arr, row: int, slot: int, view: np.ndarray, name: str):
        """Writes one view into view slot `slot` of row `row`, in place (no second copy of the batch)."""
        try:
            write_view(arr["vision.patches"][row], arr["vision.pos_ids"][row], arr["vision.num_tokens"][row],
                       arr["vision.grid"][row], slot, view, patch_size=self.patch_size, levels=self.levels,
                       positions_per_side=self.config.positions_per_side)
        except ValueError as e:
            raise ValueError(f"{name}: view in row {row}, slot {slot}: {e}") from None

    def batches(self, samples: Iterable[Sample], *, on_skip: Callable[[Sample, Exception], None] | None = None,
                alloc: Callable[[list], dict] | None = None) -> Iterator[ModelBatch]:
        """Streaming batcher: `batch_size` samples per batch (with `pack`: as many as fill `batch_size` rows), in
        order (the last one may have padding rows). A sample that does not fit raises, or with `on_skip` is
        reported there and skipped (counted by the caller; its image tokens are never silently dropped)."""
        cur: list[Sample] = []
        filler = RowFiller(self.config)
        for s in samples:
            try:
                s = self.fit(s)
            except SampleDoesNotFit as e:
                if on_skip is None:
                    raise
                on_skip(s, e)
                continue
            if filler.add(s) is None:  # pack: this sample starts the next batch
                yield self.pack(cur, alloc=alloc)
                cur, filler = [], RowFiller(self.config)
                filler.add(s)
            cur.append(s)
            if filler.full:
                yield self.pack(cur, alloc=alloc)
                cur, filler = [], RowFiller(self.config)
        if cur:
            yield self.pack(cur, alloc=alloc)


def pack_samples(processor: Processor, samples: Sequence[Sample], **config) -> ModelBatch:
    """Convenience: one ModelBatch from samples, sizes from `config` (PackerConfig fields); by default
    batch_size = len(samples) and views_per_row = the most views of any sample."""
    config.setdefault("batch_size", max(1, len(samples)))
    config.setdefault("views_per_row", max((s.num_views for s in samples), default=0))
    return Packer(processor, PackerConfig(**config)).pack(samples)
