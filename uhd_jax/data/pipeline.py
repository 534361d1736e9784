"""The grain input pipeline: a random-access source -> static-shape numpy ModelBatches of this host's rows.

    source indices -> this host's shard [shard_index::shard_count] -> shuffle (seeded, a new order each epoch)
      -> repeat (num_epochs, or forever) -> read record + Processor.build (images loaded, sliced) + Packer.fit
      -> groups of `batch_size_per_host` good samples (packer_config.pack: as many as fill that many rows)
      -> Packer.pack -> [worker processes] -> bad-record guard

Everything up to the packing is grain (`grain.MapDataset` range / slice / shuffle / repeat / map,
`to_iter_dataset` with `ReadOptions` threads, `mp_prefetch` worker processes whose batches come back through
shared memory). Two steps are ours, because grain has no skip-and-report for failed elements:
`_PackIterDataset` (in each worker) fills a batch with good samples and carries the bad records it skipped, and
`BatchIterator` (in this process) counts them, logs each by name, and stops the run when they are too many.

Only data errors are bad records: `DataError` (malformed record, image tags that do not match the images),
`ImageLoadError` (unreadable / corrupt / missing image) and `SampleDoesNotFit` (too large even after the overflow
policy). Any other exception (TypeError, a bug) propagates and stops the run, from worker processes too.

Determinism: the stream is a function of (source, seed, shard, num_epochs, shuffle, batch size, num_workers):
with workers, worker k packs the records k, k + W, ... of the host's stream and batches are taken from the
workers in turn, so changing `num_workers` changes how records group into batches (never which records come).
`BatchIterator.get_state()` / `set_state()` (JSON-able) resume exactly; save it with Orbax through
`grain.checkpoint.CheckpointSave(iterator)` / `CheckpointRestore(iterator)` (see `make_batches`).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from typing import Any, Callable

import grain
import numpy as np

from uhd_jax.data.batch import ModelBatch
from uhd_jax.data.image_io import ImageLoadError
from uhd_jax.data.packer import Packer, PackerConfig, RowFiller, SampleDoesNotFit
from uhd_jax.data.processor import Processor, Sample, SampleRequest
from uhd_jax.data.sources import DataError

log = logging.getLogger(__name__)

DATA_ERRORS = (DataError, ImageLoadError, SampleDoesNotFit)
_KEEP_EXAMPLES = 5  # bad records named in the state and in the error that stops a run


class DataPipelineError(RuntimeError):
    """The pipeline as a whole failed: too many bad records, or no batch at all."""


@dataclasses.dataclass(frozen=True)
class BadRecord:
    name: str
    reason: str


def count_image_tokens(req: SampleRequest, image_token: str) -> int:
    """Image tokens in a request's text that take an image from `req.images` (image parts of list contents
    bring their own image and are not counted)."""
    if req.messages is None:
        return (req.text or "").count(image_token)
    n = 0
    for m in req.messages:
        c = m.get("content", "")
        if isinstance(c, str):
            n += c.count(image_token)
        else:
            for part in c:
                txt = part if isinstance(part, str) else (part.get("text", "") if part.get("type") == "text" else "")
                n += txt.count(image_token)
    return n


class _Prepare:
    """Record index -> packable Sample, or BadRecord for a data error (grain map transform; runs in workers)."""

    def __init__(self, source, packer: Packer, to_request: Callable[[Any], SampleRequest] | None):
        self.source = source
        self.packer = packer
        self.to_request = to_request
        self.n = len(source)

    def __call__(self, index: int) -> Sample | BadRecord:
        name = f"record {index % self.n} of {self.source!r}"
        try:
            rec = self.source[index % self.n]
            req = rec if self.to_request is None else self.to_request(rec)
            if not isinstance(req, SampleRequest):
                raise TypeError(f"{name}: the source (or to_request) returned {type(req).__name__}, not a "
                                "SampleRequest")
            name = req.name or name
            proc = self.packer.processor
            k = count_image_tokens(req, proc.tokens.image_token)
            if k != len(req.images):
                raise DataError(name, f"{k} image tokens in the text but {len(req.images)} images")
            return self.packer.fit(proc.build(req))
        except DATA_ERRORS as e:
            if isinstance(e, DataError) and name.startswith("record "):  # raised by the source: it named the record
                name = e.record
            msg = str(e)
            msg = msg[len(name) + 2:] if msg.startswith(name + ": ") else msg  # the name is said once
            return BadRecord(name, f"{type(e).__name__}: {msg}")


class _PackIterDataset(grain.IterDataset):
    """Groups `batch_size` good samples into one packed ModelBatch; passes the skipped bad records along."""

    def __init__(self, parent: grain.IterDataset, packer: Packer, in_shared_memory: bool):
        super().__init__(parent)
        self._packer = packer
        self._shm = in_shared_memory

    def __iter__(self):
        return _PackIterator(self._parent.__iter__(), self._packer, self._shm)

    def __str__(self):
        return "_PackIterDataset"


class _PackIterator(grain.DatasetIterator):
    """Element: {"batch": ModelBatch | None, "ok": int, "bad": [[name, reason], ...]}.

    Without packing it holds nothing between elements, so its state is its parent's. With packing the batch is
    full only when a sample does not fit its last row; that sample was read but belongs to the next batch: it is
    held, and the state is the parent's from before it was read (restoring reads it again)."""

    def __init__(self, parent: grain.DatasetIterator, packer: Packer, in_shared_memory: bool):
        super().__init__(parent)
        self._packer = packer
        self._alloc = _shm_zeros if in_shared_memory else None
        self._held = None  # (sample, the parent's state before it was read)

    def __next__(self) -> dict:
        samples, bad = [], []
        filler = RowFiller(self._packer.config)
        if self._held is not None:
            x, _ = self._held
            self._held = None
            filler.add(x)
            samples.append(x)
        while not filler.full:
            before = copy.deepcopy(self._parent.get_state()) if self._packer.config.pack else None
            try:
                x = next(self._parent)
            except StopIteration:
                break
            if isinstance(x, BadRecord):
                bad.append([x.name, x.reason])
            elif filler.add(x) is None:
                self._held = (x, before)
                break
            else:
                samples.append(x)
        if not samples and not bad:
            raise StopIteration
        # bad records at the very end still travel (batch None) so that the guard counts them
        batch = self._packer.pack(samples, alloc=self._alloc) if samples else None
        return {"batch": batch, "ok": len(samples), "bad": bad}

    def get_state(self):
        return self._parent.get_state() if self._held is None else copy.deepcopy(self._held[1])

    def set_state(self, state):
        self._held = None
        self._parent.set_state(state)


def _shm_zeros(specs) -> dict:
    """Packer allocator for worker processes: arrays in grain SharedMemoryArrays (new POSIX shared memory is
    zero-filled), which grain's mp_prefetch hands to the main process by name instead of copying them again."""
    from uhd_jax.data.packer import _dtype

    try:  # grain's own transport type (not public API): without it, grain copies plain arrays to shared memory
        from grain._src.python.ipc.shared_memory_array import SharedMemoryArray
    except ImportError:
        return {name: np.zeros(shape, _dtype(dtype)) for name, shape, dtype in specs}
    out = {}
    for name, shape, dtype in specs:
        dt = _dtype(dtype)
        out[name] = SharedMemoryArray(shape, dt) if math.prod(shape) else np.zeros(shape, dt)
    return out


class _GuardIterDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, max_bad_fraction: float, min_records: int, description: str):
        super().__init__(parent)
        self._args = (max_bad_fraction, min_records, description)

    def __iter__(self) -> "BatchIterator":
        return BatchIterator(self._parent.__iter__(), *self._args)

    def __str__(self):
        return "_GuardIterDataset"


class BatchIterator(grain.DatasetIterator):
    """Iterator of numpy ModelBatches ([batch_size_per_host, S] text arrays, vision [batch_size_per_host,
    views_per_row, tokens_per_view, C*P*P]) with grain's `get_state()` / `set_state()` (a JSON-able dict: the
    grain pipeline's state plus the record counters) and `close()` (stops worker processes).

    `stats`: {"records_ok", "records_bad", "batches"} since the start of the run (restored with the state);
    `bad_examples`: the first few bad records (name, reason)."""

    def __init__(self, parent: grain.DatasetIterator, max_bad_fraction: float, min_records: int, description: str):
        super().__init__(parent)
        self.max_bad_fraction = max_bad_fraction
        self.min_records = min_records
        self.description = description
        self.ok = 0
        self.bad = 0
        self.batches = 0
        self.bad_examples: list[list[str]] = []

    @property
    def stats(self) -> dict:
        return {"records_ok": self.ok, "records_bad": self.bad, "batches": self.batches}

    def __next__(self) -> ModelBatch:
        while True:
            try:
                el = next(self._parent)
            except StopIteration:
                if self.batches == 0:
                    raise DataPipelineError(f"the pipeline produced no batches ({self.description}): "
                                            f"{self.ok} good and {self.bad} bad records"
                                            + self._examples()) from None
                raise
            self.ok += int(el["ok"])
            for name, reason in el["bad"]:
                self._bad(name, reason)
            if el["batch"] is not None:
                self.batches += 1
                return el["batch"]

    def _bad(self, name: str, reason: str):
        self.bad += 1
        log.warning("skipped bad record %s: %s", name, reason)
        if len(self.bad_examples) < _KEEP_EXAMPLES:
            self.bad_examples.append([name, reason])
        n = self.ok + self.bad
        if n >= self.min_records and self.bad > self.max_bad_fraction * n:
            raise DataPipelineError(
                f"{self.bad} of {n} records are bad ({self.bad / n:.1%} > max_bad_fraction="
                f"{self.max_bad_fraction:.1%}; {self.description}); stopping: check the data (image root, "
                "file format) or raise max_bad_fraction" + self._examples())

    def _examples(self) -> str:
        if not self.bad_examples:
            return ""
        return "; first bad records:\n" + "\n".join(f"  {n}: {r}" for n, r in self.bad_examples)

    def get_state(self) -> dict:
        return {"pipeline": self._parent.get_state(), "records_ok": self.ok, "records_bad": self.bad,
                "batches": self.batches, "bad_examples": [list(x) for x in self.bad_examples]}

    def set_state(self, state: dict):
        mine, saved = self._parent.get_state(), state.get("pipeline")
        if not isinstance(saved, dict) or set(saved) != set(mine):
            raise ValueError("this data-iterator state was saved by a pipeline of another shape (num_workers "
                             f"differs?): it has {sorted(saved) if isinstance(saved, dict) else saved!r}, this "
                             f"pipeline {sorted(mine)}; resume with the same make_batches arguments")
        self._parent.set_state(saved)
        self.ok, self.bad, self.batches = int(state["records_ok"]), int(state["records_bad"]), int(state["batches"])
        self.bad_examples = [list(x) for x in state.get("bad_examples", [])]

    def __str__(self):
        return "BatchIterator"


def _absl_flags_parsed():
    """grain <= 0.2.18's mp_prefetch reads an absl flag without a default fallback and fails in programs that do
    not parse absl flags (google/grain#1355, fixed by #1362): mark them parsed (defaults) if nobody has."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_dataset(source, processor: Processor, packer_config: PackerConfig, *, batch_size_per_host: int,
                 seed: int | None = None, num_epochs: int | None = None, shuffle: bool = True, num_workers: int = 0,
                 max_bad_fraction: float = 0.01, min_records_for_bad_fraction: int | None = None,
                 shard_index: int | None = None, shard_count: int | None = None,
                 to_request: Callable[[Any], SampleRequest] | None = None, read_threads: int = 1,
                 read_buffer: int | None = None, worker_buffer: int = 1) -> grain.IterDataset:
    """The grain dataset behind `make_batches`; `iter(dataset)` is a fresh BatchIterator (same arguments)."""
    if not hasattr(source, "__len__") or not hasattr(source, "__getitem__"):
        raise TypeError(f"source must support len() and [i] (random access), got {type(source).__name__}")
    n = len(source)
    if n == 0:
        raise ValueError(f"{source!r} has no records")
    if shard_index is None or shard_count is None:
        import jax

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
    if n <= shard_index:
        raise ValueError(f"{source!r} has {n} records: host shard {shard_index} of {shard_count} would be empty")
    if shuffle and seed is None:
        raise ValueError("shuffle=True needs a seed (the order must be reproducible to resume)")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1 or None (forever), got {num_epochs}")
    if not 0 <= max_bad_fraction <= 1:
        raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
    if num_workers < 0 or read_threads < 1 or worker_buffer < 1:
        raise ValueError("need num_workers >= 0, read_threads >= 1, worker_buffer >= 1")
    if packer_config.batch_size not in (1, batch_size_per_host):
        raise ValueError(f"packer_config.batch_size={packer_config.batch_size} but batch_size_per_host="
                         f"{batch_size_per_host} (leave packer_config.batch_size at 1 or make them equal)")
    packer = Packer(processor, dataclasses.replace(packer_config, batch_size=batch_size_per_host))
    if min_records_for_bad_fraction is None:
        # below 1/max_bad_fraction records a single bad one already exceeds the fraction: wait for that many
        min_records_for_bad_fraction = max(20, math.ceil(1 / max_bad_fraction)) if max_bad_fraction > 0 else 1

    ds = grain.MapDataset.range(n)
    if shard_count > 1:
        ds = ds[shard_index::shard_count]
    if shuffle:
        ds = ds.shuffle(seed=int(seed))  # per-epoch permutations: repeat() below reseeds each epoch
    ds = ds.repeat(num_epochs)
    ds = ds.map(_Prepare(source, packer, to_request))
    # a few samples decoded ahead per process: a sample holds float32 views (up to ~24 MB for a 10-view image)
    read = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=read_buffer or batch_size_per_host)
    it = _PackIterDataset(ds.to_iter_dataset(read), packer, in_shared_memory=num_workers > 0)
    if num_workers > 0:
        _absl_flags_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                         per_worker_buffer_size=worker_buffer))
    desc = (f"{source!r}, host shard {shard_index} of {shard_count}, "
            f"{'shuffled, seed ' + str(seed) if shuffle else 'in order'}, "
            f"{'forever' if num_epochs is None else str(num_epochs) + ' epoch(s)'}")
    return _GuardIterDataset(it, float(max_bad_fraction), int(min_records_for_bad_fraction), desc)


def make_batches(source, processor: Processor, packer_config: PackerConfig, *, batch_size_per_host: int,
                 seed: int | None = None, num_epochs: int | None = None, shuffle: bool = True, num_workers: int = 0,
                 max_bad_fraction: float = 0.01, min_records_for_bad_fraction: int | None = None,
                 shard_index: int | None = None, shard_count: int | None = None,
                 to_request: Callable[[Any], SampleRequest] | None = None, read_threads: int = 1,
                 read_buffer: int | None = None, worker_buffer: int = 1) -> BatchIterator:
    """Iterator of this host's static-shape numpy ModelBatches from a random-access `source`.

    source: `len(source)` records, `source[i]` a SampleRequest (sources.py), or anything `to_request` turns into
      one. `processor` builds samples; `packer_config` sets the static shapes (its batch_size is replaced by
      `batch_size_per_host`: rows of this host; leave it at 1 or equal). With `packer_config.pack` each batch
      holds as many samples as fill its rows (next-fit, in stream order; batches carry segment_ids).
    seed: shuffle seed (required when shuffle); each epoch is a different permutation of this host's shard.
    num_epochs: None = forever; an int = that many passes, then StopIteration (the last batch may have padding
      rows: all padding, attention_mask False; with workers, each worker's last batch may). Eval: shuffle=False,
      num_epochs=1 gives a fixed held-out stream.
    num_workers: grain worker processes (0 = in this process); each packs whole batches, returned through
      shared memory. read_threads / read_buffer: grain ReadOptions per process (threads decoding records, samples
      decoded ahead; default one batch). worker_buffer: batches each worker keeps ready (with grain's own
      queues about 4 + 2 * worker_buffer packed batches per worker are in shared memory at a time).
    shard_index / shard_count: this host's slice of the records (default jax.process_index() / process_count());
      hosts get disjoint records covering the source.
    max_bad_fraction: bad records (data errors, see the module notes) are skipped, counted and logged by name;
      once at least `min_records_for_bad_fraction` records were seen (default max(20, 1/max_bad_fraction)),
      a bad fraction above this stops the run with DataPipelineError naming the count and examples. A run that
      yields no batch at all also raises DataPipelineError.

    Returns a BatchIterator: next() -> ModelBatch; get_state() / set_state(state) to resume exactly; close().

    Checkpointing with Orbax (grain's handler writes one JSON file per process, process_<i>-of-<n>.json):
        mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(train_state),
                                                data=grain.checkpoint.CheckpointSave(it)))
        restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                             data=grain.checkpoint.CheckpointRestore(it)))
    where `it` is a fresh make_batches(...) iterator with the same arguments (restore sets its state in place).
    """
    return iter(make_dataset(source, processor, packer_config, batch_size_per_host=batch_size_per_host, seed=seed,
                             num_epochs=num_epochs, shuffle=shuffle, num_workers=num_workers,
                             max_bad_fraction=max_bad_fraction,
                             min_records_for_bad_fraction=min_records_for_bad_fraction, shard_index=shard_index,
                             shard_count=shard_count, to_request=to_request, read_threads=read_threads,
                             read_buffer=read_buffer, worker_buffer=worker_buffer))
