"""Generation: prefill on the device, then the whole decode loop inside one jit.

Two front ends over one device-side loop:
  - `Generator.generate(params, batch, max_new_tokens=..)`: a ModelBatch of prompts (with images, any padding
    layout with contiguous real tokens) -> prefill (vision encoder once per view, visual tokens placed, KV and
    DeltaNet states filled) -> `jax.lax.while_loop` of decode steps until every row has stopped, all in one
    compiled call: no Python and no host round trip per token (unless a `stream` callback is given). Each row
    stops at its own stop token (`stop_ids`, e.g. `generation_config.json`'s eos ids) or its own
    `max_new_tokens`. Passing the `cache` of an earlier call continues it (multi-turn chat: the new batch holds
    the next turn only; the history is not recomputed).
  - `SlotEngine`: continuous batching over a fixed number of slots. Requests wait in a queue; a free slot takes
    the next one (prefilled alone at the smallest prompt-length bucket that holds it, then inserted) while the
    other slots keep their decoding state. Shapes are static: one prefill program per prompt bucket, one insert
    program, one decode program, whatever requests come and go.

Picking tokens. The loop calls `pick_fn(logits, ctx) -> tokens`:
    logits  [B, Vp] float32, each row's next-token logits (padded vocab columns hold the most negative float32);
    ctx     `PickContext`:
              key          [B] typed PRNG keys, fold_in(the row's key, ctx.step): a row's draws do not depend on
                           the other rows, on its slot or on when it was scheduled;
              step         [B] int32, tokens the row has generated so far (this pick is token number `step`);
              generated    [B, N] int32, the row's generated tokens (valid where column < step);
              prompt       [B, S] int32 and prompt_mask [B, S] bool: the row's prompt ids of this call (e.g. for
                           a repetition penalty over prompt + generated, as transformers applies it);
              params       the per-row sampling parameters pytree given with the requests (leaves [B, ...]:
                           temperature, top_k, top_p, repetition_penalty...), or None;
    returns [B] int32 token ids. It runs inside jit: it must be a pure jax function of its arguments.
`greedy` (argmax of the float32 logits) is the default; a sampler (`uhd_jax.infer.sampling`) plugs in the same
way: `Generator(model, stop_ids=.., pick_fn=sampler)`, per-row params through `sampling_params=`.

Cache capacity. A request whose prompt + max_new_tokens does not fit the cache is refused on the host with a
`CacheCapacityError` before anything runs. Inside the loop a row whose cache is full (possible only after a
continued prefill by hand) stops with finish reason "cache_full"; a decode step never writes past the capacity.
The cache after generation holds each row's prompt and its generated tokens except the last one (which was
picked but not fed): a next turn starts with that token (e.g. <|im_end|>) followed by the new messages.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from uhd_jax.data.batch import ModelBatch, check_text_slots
from uhd_jax.data.packer import Packer, PackerConfig
from uhd_jax.infer.cache import DecodeCache, init_cache
from uhd_jax.model.layers import UNSTACKED, unstack
from uhd_jax.model.minicpmv import MiniCPMV, check_visual_placement
from uhd_jax.model.text_model import check_padding, stack_cache, unstack_cache, unstack_layers

RUNNING, STOP, LENGTH, CACHE_FULL = 0, 1, 2, 3
FINISH_REASONS = {STOP: "stop", LENGTH: "length", CACHE_FULL: "cache_full"}


class CacheCapacityError(ValueError):
    """A request whose prompt + max_new_tokens does not fit the cache (the message names it)."""


@flax.struct.dataclass
class PickContext:
    key: jax.Array
    step: jax.Array
    generated: jax.Array
    prompt: jax.Array
    prompt_mask: jax.Array
    params: Any = None


PickFn = Callable[[jax.Array, PickContext], jax.Array]


def greedy(logits, ctx: PickContext):
    """The most likely token of the float32 logits (first index on ties, as torch.argmax)."""
    del ctx
    return jnp.argmax(logits.astype(jnp.float32), axis=-1).astype(jnp.int32)


@flax.struct.dataclass
class DecodeState:
    """Everything the loop carries, per row: the cache, the generated tokens [B, N], how many, done flags and
    finish reasons, the row's token budget, PRNG key, prompt (for the pick context) and sampling params."""

    cache: DecodeCache
    tokens: jax.Array  # [B, N] int32, -1 past each row's count
    num_tokens: jax.Array  # [B] int32
    done: jax.Array  # [B] bool
    reason: jax.Array  # [B] int32: RUNNING, STOP, LENGTH, CACHE_FULL
    max_new: jax.Array  # [B] int32
    keys: jax.Array  # [B] typed PRNG keys
    prompt: jax.Array  # [B, S] int32
    prompt_mask: jax.Array  # [B, S] bool
    params: Any = None  # sampling parameters, leaves [B, ...]

    def insert(self, row: "DecodeState", slot) -> "DecodeState":
        """Row 0 of `row` (a one-row state: cache of the same capacity, same buffer sizes) into slot `slot`."""
        put = lambda big, small: big.at[slot].set(small[0])
        rest = {f.name: jax.tree.map(put, getattr(self, f.name), getattr(row, f.name))
                for f in dataclasses.fields(self) if f.name != "cache"}
        return self.replace(cache=self.cache.insert(row.cache, jnp.reshape(slot, (1,))), **rest)


@dataclasses.dataclass
class Generation:
    """Host-side result of `Generator.generate`: per row the generated ids (the stop token included when one ended
    the row) and the finish reason ("stop", "length", "cache_full"; None for a row without prompt tokens); the
    cache to continue from."""

    tokens: list[np.ndarray]
    finish_reasons: list[str | None]
    cache: DecodeCache


# --------------------------------------------------------------------------- the device-side loop
def _pick(pick_fn, st: DecodeState, logits):
    keys = jax.vmap(jax.random.fold_in)(st.keys, st.num_tokens)
    ctx = PickContext(key=keys, step=st.num_tokens, generated=st.tokens, prompt=st.prompt,
                      prompt_mask=st.prompt_mask, params=st.params)
    return pick_fn(logits, ctx).astype(jnp.int32)


def _record(st: DecodeState, tok, take, stop_ids, stream) -> DecodeState:
    """Rows `take` append `tok`; a stop id or the row's budget ends them."""
    b, n = st.tokens.shape
    col = jnp.where(take, st.num_tokens, n)  # out of range: dropped
    tokens = st.tokens.at[jnp.arange(b), col].set(tok, mode="drop")
    num = st.num_tokens + take.astype(jnp.int32)
    stop = take & jnp.isin(tok, stop_ids)
    length = take & ~stop & (num >= st.max_new)
    reason = jnp.where(stop, STOP, jnp.where(length, LENGTH, st.reason))
    if stream is not None:
        jax.debug.callback(stream, tok, take, ordered=True)
    return st.replace(tokens=tokens, num_tokens=num, reason=reason, done=st.done | stop | length)


def _start(st: DecodeState, logits, pick_fn, stop_ids, stream) -> DecodeState:
    """After a prefill: overflowed rows stop ("cache_full"); the others pick their first token."""
    over = ~st.done & st.cache.overflowed
    st = st.replace(done=st.done | over, reason=jnp.where(over, CACHE_FULL, st.reason))
    return _record(st, _pick(pick_fn, st, logits), ~st.done, stop_ids, stream)


def text_slot_multiple(model) -> int | None:
    """The packer's `text_slot_multiple` for prompts of `model`: a model with visual cuts needs ModelBatch.text_slots
    (rounded up to 128: few programs); without cuts None, and the batches are as before the cuts existed."""
    return 128 if model.cuts.any else None


def serving_params(model: MiniCPMV, params) -> dict:
    """The "params" collection in the serving layout: the weights of every layer stack (vision encoder, LLM) split
    per layer (`layers.unstack`; one copy, made once), so that neither the prefill nor the decode loop slices them
    out of a stack at every layer, a device-to-device copy before each matrix product on the GPU (H100,
    MiniCPM-V 4.6, one 1344px image: 913 copies in a 40 ms time to first token). The same tokens as with the
    stacked layout; `Generator`, `SlotEngine` and beam search take either. A model with visual cuts keeps its LLM
    layers stacked (its cut prefill scans segments of the stack; its decode loop splits them once per call).
    Parameters already in this layout are returned as they are. Training and the trainer's checkpoints keep the
    stacked layout."""
    out = dict(params)
    vision = out.get("vision")
    if vision is not None and "vision_tower" in vision:
        tower = dict(vision["vision_tower"])
        for name, sub in tower.items():
            if name.startswith("layers_") and isinstance(sub, dict) and "layers" in sub:
                tower[name] = {UNSTACKED: unstack(sub["layers"])}
        out["vision"] = dict(vision, vision_tower=tower)
    if not model.cuts.any:
        out["text"] = unstack_layers(out["text"])
    return out


def decode_variables(params) -> dict:
    """The variables a decode loop applies `MiniCPMV.decode_step` with: the LLM's layer weights split per block
    (`text_model.unstack_layers`: one copy before the loop unless `serving_params` made it already), so no step
    slices them out of the stack."""
    return {"params": dict(params, text=unstack_layers(params["text"]))}


def _decode_loop(model, variables, st: DecodeState, *, pick_fn, stop_ids, stream, max_steps, stop_on_finish):
    """Decode steps while a row runs, at most `max_steps`; with `stop_on_finish` (traced bool) also return as
    soon as a row finishes (so the host can give its slot to a waiting request)."""
    variables = decode_variables(variables["params"])
    done0 = st.done
    b = st.done.shape[0]

    def cond(carry):
        st, i = carry
        finished = jnp.any(st.done & ~done0)
        return jnp.any(~st.done) & (i < max_steps) & ~(stop_on_finish & finished)

    def body(carry):
        st, i = carry
        running = ~st.done
        full = running & (st.cache.lengths >= st.cache.capacity)  # no slot left for the token to feed
        feed = running & ~full
        last = st.tokens[jnp.arange(b), jnp.maximum(st.num_tokens - 1, 0)]
        logits, cache = model.apply(variables, last, st.cache, feed, method=MiniCPMV.decode_step)
        st = st.replace(cache=cache, done=st.done | full, reason=jnp.where(full, CACHE_FULL, st.reason))
        return _record(st, _pick(pick_fn, st, logits), feed, stop_ids, stream), i + 1

    # the loop carries the cache per block (one copy in, one out: per call of the SlotEngine's decode program,
    # which runs until a row finishes), so no step slices a block's DeltaNet states out of the stack and back
    st = st.replace(cache=st.cache.replace(layers=unstack_cache(st.cache.layers)))
    st, _ = jax.lax.while_loop(cond, body, (st, jnp.zeros((), jnp.int32)))
    return st.replace(cache=st.cache.replace(layers=stack_cache(st.cache.layers)))


def row_keys(key, b: int):
    """Per-row PRNG keys [b]: from an int seed s, row r gets fold_in(key(s), r); from a sequence of b int seeds,
    key(seed) each (what a `Request` with that seed gets in the SlotEngine); [b] typed keys as they are."""
    if key is None:
        key = 0
    if isinstance(key, (int, np.integer)):
        return _seed_rows(np.int64(key), b)
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != (b,):
            raise ValueError(f"expected {b} keys, got shape {key.shape}")
        return key
    seeds = np.asarray(key)
    if seeds.shape != (b,):
        raise ValueError(f"expected an int seed or {b} seeds, got {key!r}")
    return _seed_keys(seeds)


# one compiled call each (eagerly, the vmapped key ops were several launches before every generation)
_seed_rows = jax.jit(lambda seed, b: jax.vmap(lambda r: jax.random.fold_in(jax.random.key(seed), r))(jnp.arange(b)),
                     static_argnums=1)
_seed_keys = jax.jit(jax.vmap(jax.random.key))


# --------------------------------------------------------------------------- batch generation
class Generator:
    """Batch generation with a model and a fixed decoding setup; compiled programs are kept between calls (one
    per batch shape, max_new_tokens buffer and cache capacity).

    model: the MiniCPMV module; stop_ids: token ids that end a row (e.g. `Processor.eos_token_ids`, read from
    generation_config.json); pick_fn: see the module docstring; cache_dtype: KV / conv cache dtype (default the
    model's compute dtype); stream: optional host callback `stream(tokens [B], took [B] bool)` called once per
    decode step from inside the loop (a host round trip per step: for streaming only)."""

    def __init__(self, model: MiniCPMV, *, stop_ids: Sequence[int] = (), pick_fn: PickFn = greedy, cache_dtype=None,
                 stream: Callable[[np.ndarray, np.ndarray], None] | None = None):
        self.model = model
        self.stop_ids = tuple(int(i) for i in stop_ids)  # passed to the compiled loop as an array argument
        self.pick_fn = pick_fn
        self.cache_dtype = jnp.dtype(model.dtype if cache_dtype is None else cache_dtype)
        self.stream = stream
        self._generate = jax.jit(self._generate_impl, static_argnames=("max_new_tokens", "capacity"))
        self._prefill = jax.jit(lambda p, batch, cache: model.apply({"params": p}, batch, cache,
                                                                     method=MiniCPMV.prefill))

    def new_cache(self, batch_size: int, capacity: int) -> DecodeCache:
        return init_cache(self.model.config, batch_size, capacity, self.cache_dtype, cuts=self.model.cuts)

    def _generate_impl(self, params, batch, cache, max_new, keys, sampling, stop_ids, *, max_new_tokens,
                       capacity=None):
        variables = {"params": params}
        if cache is None:  # a new cache: made inside the program (as dozens of eager zeros it cost launches)
            cache = self.new_cache(np.shape(batch.input_ids)[0], capacity)
        logits, cache = self.model.apply(variables, batch, cache, method=MiniCPMV.prefill)
        b = cache.batch_size
        mask = jnp.asarray(batch.attention_mask, bool)
        empty = ~mask.any(-1)
        st = DecodeState(cache=cache, tokens=jnp.full((b, max_new_tokens), -1, jnp.int32),
                         num_tokens=jnp.zeros((b,), jnp.int32), done=empty, reason=jnp.zeros((b,), jnp.int32),
                         max_new=max_new, keys=keys, prompt=jnp.asarray(batch.input_ids, jnp.int32), prompt_mask=mask,
                         params=sampling)
        st = _start(st, logits, self.pick_fn, stop_ids, self.stream)
        return _decode_loop(self.model, variables, st, pick_fn=self.pick_fn, stop_ids=stop_ids,
                            stream=self.stream, max_steps=max_new_tokens, stop_on_finish=False)

    def check(self, batch: ModelBatch, max_new, cache: DecodeCache | None, capacity: int) -> np.ndarray:
        """Host checks before anything runs: padding layout, visual placement, capacity. Returns prompt lengths."""
        check_padding(batch.attention_mask)
        check_visual_placement(batch, self.model.config.image_token_id)
        if self.model.cuts.any and batch.text_slots is not None:  # a cut model's compaction must hold every text token
            check_text_slots(batch.attention_mask, batch.visual_mask, batch.text_slots)
        lengths = np.asarray(batch.attention_mask, bool).sum(-1)
        held = np.zeros_like(lengths) if cache is None else np.asarray(cache.lengths)
        need = held + lengths + np.where(lengths > 0, max_new, 0)
        bad = np.flatnonzero(need > capacity)
        if len(bad):
            raise CacheCapacityError(
                "requests do not fit the cache: " + "; ".join(
                    f"row {r}: {held[r]} cached + {lengths[r]} prompt + {max_new[r]} new tokens > capacity "
                    f"{capacity}" for r in bad))
        return lengths

    def generate(self, params, batch: ModelBatch, *, max_new_tokens: int | Sequence[int],
                 cache: DecodeCache | None = None, capacity: int | None = None, key=None,
                 sampling_params=None, stop_ids: Sequence[int] | None = None) -> Generation:
        """Generates for every row of `batch` (rows without real tokens are skipped). max_new_tokens: one budget or
        one per row. cache: continue these rows' conversations (None: a new cache of `capacity` slots, default
        prompt length + max_new_tokens). key: an int seed, one key (split per row) or [B] keys.
        sampling_params: per-row parameters for pick_fn (leaves [B, ...]). stop_ids: this call's (default the
        generator's; a set of the same size reuses the compiled program). Raises CacheCapacityError (nothing
        runs) when a row's prompt + max_new_tokens does not fit."""
        b = np.asarray(batch.input_ids).shape[0]
        max_new = np.broadcast_to(np.asarray(max_new_tokens, np.int32), (b,)).copy()
        if (max_new < 1).any():
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new.tolist()}")
        n = int(max_new.max())
        if cache is None:
            capacity = np.asarray(batch.input_ids).shape[1] + n if capacity is None else capacity
            if capacity < 1:
                raise ValueError(f"capacity must be >= 1, got {capacity}")
        else:
            if capacity is not None and capacity != cache.capacity:
                raise ValueError(f"capacity={capacity} but the cache given has {cache.capacity}")
            if cache.batch_size != b:
                raise ValueError(f"the cache has {cache.batch_size} rows, the batch {b}")
            capacity = None  # the program takes the cache's
        self.check(batch, max_new, cache, cache.capacity if capacity is None else capacity)
        stops = np.asarray(self.stop_ids if stop_ids is None else tuple(stop_ids), np.int32)
        st = self._generate(params, batch, cache, max_new, row_keys(key, b), sampling_params, stops,
                            max_new_tokens=n, capacity=capacity)
        tokens, num, reason = (np.asarray(x) for x in (st.tokens, st.num_tokens, st.reason))
        return Generation(tokens=[tokens[r, :num[r]] for r in range(b)],
                          finish_reasons=[FINISH_REASONS.get(int(x)) for x in reason], cache=st.cache)

    def prefill(self, params, batch: ModelBatch, cache: DecodeCache):
        """Host-checked `MiniCPMV.prefill` (float32 last-token logits [B, Vp], new cache); refuses rows that would
        not fit the cache."""
        self.check(batch, np.zeros(cache.batch_size, np.int32), cache, cache.capacity)
        return self._prefill(params, batch, cache)


# --------------------------------------------------------------------------- continuous batching
@dataclasses.dataclass
class Request:
    """One generation request: a processed prompt (`Processor.encode_chat(..., add_generation_prompt=True)` or
    `Processor(...)`), its token budget, its PRNG seed and sampling parameters (a pytree of scalars shaped like
    the engine's `sampling_defaults`; None: the defaults)."""

    sample: Any  # uhd_jax.data.processor.Sample
    max_new_tokens: int
    seed: int = 0
    sampling: Any = None
    id: Any = None


@dataclasses.dataclass
class Finished:
    id: Any
    tokens: np.ndarray
    finish_reason: str


class SlotEngine:
    """Continuous batching over `slots` rows of one cache of `capacity` token slots per row.

    `submit` queues requests (refused at once if they cannot fit: SampleDoesNotFit from the packer, or
    CacheCapacityError when prompt + max_new_tokens > capacity); `step` fills free slots from the queue (each
    request prefilled alone at its prompt bucket, then inserted into its slot) and runs the decode loop for at
    most `steps_per_sync` tokens, returning early when a row finishes while requests wait; `run` steps until
    everything submitted has finished. Only `step`'s return reads anything back to the host.

    Compiled programs: one prefill per prompt bucket (`prompt_buckets`), one insert, one decode loop; nothing
    recompiles as requests come and go."""

    def __init__(self, model: MiniCPMV, params, processor, *, slots: int, capacity: int, max_new_tokens: int,
                 prompt_buckets: Sequence[int] = (128, 512, 2048), views_per_row: int = 10,
                 tokens_per_view: int = 1152, stop_ids: Sequence[int] | None = None, pick_fn: PickFn = greedy,
                 sampling_defaults=None, cache_dtype=None, steps_per_sync: int = 64):
        if max(prompt_buckets) > capacity:
            raise ValueError(f"the largest prompt bucket ({max(prompt_buckets)}) exceeds the capacity ({capacity})")
        self.model, self.processor = model, processor
        self.params = serving_params(model, params)  # one copy into the serving layout (see serving_params)
        self.slots, self.capacity, self.max_new_tokens = slots, capacity, max_new_tokens
        self.stop_ids = tuple(processor.eos_token_ids if stop_ids is None else stop_ids)
        self.pick_fn, self.sampling_defaults = pick_fn, sampling_defaults
        self.cache_dtype = jnp.dtype(model.dtype if cache_dtype is None else cache_dtype)
        self.steps_per_sync = steps_per_sync
        self.packer = Packer(processor, PackerConfig(batch_size=1, seq_buckets=tuple(prompt_buckets),
                                                     views_per_row=views_per_row, tokens_per_view=tokens_per_view,
                                                     text_slot_multiple=text_slot_multiple(model)))
        self.prompt_width = max(prompt_buckets)
        self.queue: collections.deque[Request] = collections.deque()
        self.running: dict[int, Request] = {}  # slot -> request
        self._next_id = 0
        self._prefill_row = jax.jit(self._prefill_row_impl)
        self._insert = jax.jit(lambda st, row, slot: st.insert(row, slot), donate_argnums=0)
        self._decode = jax.jit(self._decode_impl, donate_argnums=1)
        self.state = self._empty_state()

    def _sampling(self, value, rows: int):
        value = self.sampling_defaults if value is None else value
        return None if value is None else jax.tree.map(lambda x: jnp.broadcast_to(jnp.asarray(x), (rows,)
                                                                                   + jnp.shape(x)), value)

    def _empty_state(self) -> DecodeState:
        b, w = self.slots, self.prompt_width
        cache = init_cache(self.model.config, b, self.capacity, self.cache_dtype,
                           cuts=self.model.cuts).replace(empty=False)
        return DecodeState(cache=cache, tokens=jnp.full((b, self.max_new_tokens), -1, jnp.int32),
                           num_tokens=jnp.zeros((b,), jnp.int32), done=jnp.ones((b,), bool),
                           reason=jnp.zeros((b,), jnp.int32), max_new=jnp.zeros((b,), jnp.int32),
                           keys=jax.random.split(jax.random.key(0), b), prompt=jnp.zeros((b, w), jnp.int32),
                           prompt_mask=jnp.zeros((b, w), bool), params=self._sampling(None, b))

    def _prefill_row_impl(self, params, batch, max_new, key, sampling):
        cache = init_cache(self.model.config, 1, self.capacity, self.cache_dtype, cuts=self.model.cuts)
        logits, cache = self.model.apply({"params": params}, batch, cache, method=MiniCPMV.prefill)
        pad = self.prompt_width - batch.input_ids.shape[1]
        st = DecodeState(cache=cache, tokens=jnp.full((1, self.max_new_tokens), -1, jnp.int32),
                         num_tokens=jnp.zeros((1,), jnp.int32), done=jnp.zeros((1,), bool),
                         reason=jnp.zeros((1,), jnp.int32), max_new=max_new[None], keys=key[None],
                         prompt=jnp.pad(jnp.asarray(batch.input_ids, jnp.int32), ((0, 0), (0, pad))),
                         prompt_mask=jnp.pad(jnp.asarray(batch.attention_mask, bool), ((0, 0), (0, pad))),
                         params=sampling)
        return _start(st, logits, self.pick_fn, jnp.asarray(self.stop_ids, jnp.int32), None)

    def _decode_impl(self, params, st, stop_on_finish):
        return _decode_loop(self.model, {"params": params}, st, pick_fn=self.pick_fn,
                            stop_ids=jnp.asarray(self.stop_ids, jnp.int32),
                            stream=None, max_steps=self.steps_per_sync, stop_on_finish=stop_on_finish)

    def submit(self, request: Request):
        """Queues a request; returns its id. Raises at once if it can never run."""
        if not 1 <= request.max_new_tokens <= self.max_new_tokens:
            raise ValueError(f"max_new_tokens={request.max_new_tokens} is not in [1, {self.max_new_tokens}] "
                             f"(the engine's output buffer)")
        sample = self.packer.fit(request.sample)  # SampleDoesNotFit: too many views / tokens for the buckets
        if len(sample) + request.max_new_tokens > self.capacity:
            raise CacheCapacityError(f"{sample.name}: {len(sample)} prompt + {request.max_new_tokens} new tokens "
                                     f"> capacity {self.capacity}")
        if request.id is None:
            request.id = self._next_id
        self._next_id += 1
        self.queue.append(dataclasses.replace(request, sample=sample))
        return request.id

    def _fill(self):
        free = [s for s in range(self.slots) if s not in self.running]
        while free and self.queue:
            req, slot = self.queue.popleft(), free.pop(0)
            batch = self.packer.pack([req.sample])
            row = self._prefill_row(self.params, batch, jnp.int32(req.max_new_tokens), jax.random.key(req.seed),
                                    self._sampling(req.sampling, 1))
            self.state = self._insert(self.state, row, jnp.int32(slot))
            self.running[slot] = req

    def step(self) -> list[Finished]:
        """Fills free slots, decodes up to `steps_per_sync` tokens; returns the requests that finished."""
        self._fill()
        if not self.running:
            return []
        self.state = self._decode(self.params, self.state, jnp.asarray(bool(self.queue)))
        done, num, reason = jax.device_get((self.state.done, self.state.num_tokens, self.state.reason))
        finished = [s for s in list(self.running) if done[s]]
        out = []
        if finished:
            tokens = np.asarray(self.state.tokens)
            for s in finished:
                req = self.running.pop(s)
                out.append(Finished(req.id, tokens[s, :num[s]].copy(), FINISH_REASONS[int(reason[s])]))
        return out

    def run(self) -> dict[Any, Finished]:
        """Steps until the queue is empty and every slot has finished; results by request id."""
        results = {}
        while self.queue or self.running:
            for f in self.step():
                results[f.id] = f
        return results
