"""What `python -m uhd_jax.generate` and `python -m uhd_jax.evaluate` share: flags, loading a checkpoint, turning
JSONL conversation records into prompts, and running many requests through the SlotEngine (or beam search) with
a progress line, writing each result as it finishes.

Records (the trainer's JSONL conversation format, `uhd_jax.data.sources.JsonlSource`): `{"id": ..., "image": path
| {"<image_00>": path, ...}, "conversations": [{"role": "user", "content": "<image>\\n..."}, ...]}`. The last turn,
if it is the assistant's, is not part of the prompt: it is the reference answer (written to the output as
"reference"). The rest is rendered with the checkpoint's chat template (`ChatTemplate`, generation prompt added,
`enable_thinking` from --thinking) and processed (images sliced per --max-slice-nums / --downsample-mode).
A record without an "id" gets its 0-based line index among the file's non-empty lines.

A record that cannot run (bad JSON, an image that does not load, a prompt longer than the largest bucket or than
--capacity allows with --max-new-tokens, more views than --views-per-row, a conversation the chat template
rejects) gives an output row {"id", "error"} and the run goes on. Only those failures (`REQUEST_ERRORS`) become
error rows: any other exception is a bug in our code and stops the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable, Iterable, Iterator

import numpy as np

import jinja2

DTYPES = ("float32", "bfloat16")
# What one request may fail with while the run goes on: bad data (ValueError and its kinds: DataError,
# ImageLoadError, SampleDoesNotFit, CacheCapacityError), an unreadable file (OSError), a conversation the chat
# template refuses (its raise_exception). Anything else (TypeError, KeyError, ...) is our bug: it propagates.
REQUEST_ERRORS = (ValueError, OSError, jinja2.exceptions.TemplateError)


# ------------------------------------------------------------------------------------------------ flags
def positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def non_negative_int(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def non_negative_float(text: str) -> float:
    v = float(text)
    if not np.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return v


def positive_float(text: str) -> float:
    v = float(text)
    if not np.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return v


def unit_float(text: str) -> float:
    v = float(text)
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return v


def int_list(text: str) -> tuple[int, ...]:
    try:
        v = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {text!r}") from None
    if not v or any(x < 1 for x in v) or list(v) != sorted(set(v)):
        raise argparse.ArgumentTypeError(f"must be increasing positive integers, got {text!r}")
    return v


def on_off(text: str) -> bool:
    if text.lower() in ("on", "true", "1", "yes"):
        return True
    if text.lower() in ("off", "false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"must be on or off, got {text!r}")


def add_model_flags(p: argparse.ArgumentParser):
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="a converted checkpoint directory (python -m uhd_jax.convert hf-to-jax) or a trainer step "
                        "WORKDIR/checkpoints/STEP")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="compute dtype (default: float32 on CPU, bfloat16 on accelerators); parameters keep theirs")
    p.add_argument("--downsample-mode", choices=("16x", "4x"), default=None,
                   help="visual token compression (default: preprocessor_config.json's)")
    p.add_argument("--max-slice-nums", type=positive_int, default=None, metavar="N",
                   help="at most N slices per image (default: preprocessor_config.json's)")
    p.add_argument("--thinking", type=on_off, default=None, metavar="on|off",
                   help="the chat template's enable_thinking (default: not passed, the template's default)")
    p.add_argument("--max-new-tokens", type=positive_int, default=None, metavar="N",
                   help="tokens to generate at most (default: generation_config.json's max_new_tokens, else 512)")
    p.add_argument("--num-beams", type=positive_int, default=None, metavar="N",
                   help="beam search with N beams (no sampling); 1: greedy or sampling")
    p.add_argument("--temperature", type=non_negative_float, default=None,
                   help="> 0 samples at this temperature; 0 is greedy")
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="sampling: keep the K most likely (0: off)")
    p.add_argument("--top-p", type=unit_float, default=None, metavar="P", help="sampling: nucleus mass (1: off)")
    p.add_argument("--repetition-penalty", type=positive_float, default=None, metavar="R",
                   help="transformers' repetition penalty over prompt + generated tokens (1: off)")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed of sampled requests (default 0)")
    p.add_argument("--slots", type=positive_int, default=8, metavar="N",
                   help="requests decoded together (continuous batching; default 8)")
    p.add_argument("--prompt-buckets", type=int_list, default=(256, 1024, 4096), metavar="N,N,..",
                   help="prompt-length buckets (one compiled prefill each; default 256,1024,4096)")
    p.add_argument("--capacity", type=positive_int, default=None, metavar="N",
                   help="cache slots per request: prompt + new tokens (default: largest bucket + max new tokens)")
    p.add_argument("--views-per-row", type=positive_int, default=None, metavar="N",
                   help="image views per request (default: max slice nums + 1, one image; every request's "
                        "prefill pays for all of them in the vision encoder)")
    p.add_argument("--tokens-per-view", type=positive_int, default=None, metavar="N",
                   help="patch slots per view (default: 9/8 of scale_resolution^2 / patch^2, rounded up)")
    g = p.add_argument_group("visual cuts (the paper 'Treat Visual Tokens as Text?'; README: Visual savings)")
    g.add_argument("--cuts-window", type=non_negative_int, default=0, metavar="W",
                   help="(1) a visual query sees the visual keys in a W x W window of its view (odd; 0: off)")
    g.add_argument("--cuts-head-mask", default="", metavar="MASK.npz",
                   help="(2) the active heads of `python -m uhd_jax.yopo calibrate` ('': off)")
    g.add_argument("--cuts-drop-fraction", type=non_negative_float, default=0.0, metavar="F",
                   help="(3) visual tokens leave the sequence at layer round(F x layers) (0: off)")
    g.add_argument("--cuts-ffn-ratio", type=positive_int, default=1, metavar="R",
                   help="(4) visual tokens use the first intermediate_size / R FFN neurons (1: off)")
    p.add_argument("--image-root", default=None, metavar="DIR",
                   help="relative image paths in JSONL records are relative to this (default: the file's folder)")


# ------------------------------------------------------------------------------------------------ loading
@dataclasses.dataclass
class Setup:
    cfg: Any
    model: Any
    params: Any
    processor: Any
    chat: Any
    generation_config: dict
    model_dir: str


def load_setup(args) -> Setup:
    """Model, parameters, processor (slicing overrides from the flags), chat template and generation_config.json
    of --checkpoint. FileNotFoundError / ValueError name what is wrong."""
    import jax
    import jax.numpy as jnp

    from uhd_jax.convert.checkpoint import load_checkpoint, model_files_dir
    from uhd_jax.data.processor import Processor
    from uhd_jax.infer.chat import ChatTemplate
    from uhd_jax.model.minicpmv import MiniCPMV
    from uhd_jax.model.visual_cuts import Cuts

    if not os.path.isdir(args.checkpoint):
        raise FileNotFoundError(f"--checkpoint {args.checkpoint}: no such directory")
    model_dir = model_files_dir(args.checkpoint)
    cfg, params = load_checkpoint(args.checkpoint)
    dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    try:
        # commands without the cut flags (`yopo calibrate`) get the model without cuts
        cuts = Cuts.from_settings(cfg.text, window=getattr(args, "cuts_window", 0),
                                  head_mask=getattr(args, "cuts_head_mask", ""),
                                  drop_fraction=getattr(args, "cuts_drop_fraction", 0.0),
                                  ffn_ratio=getattr(args, "cuts_ffn_ratio", 1))
    except ValueError as e:
        raise ValueError(f"visual cuts (--cuts-*): {e}") from e
    compute = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    # bfloat16: the weights are held in bfloat16 too (the model casts every weight to the compute dtype where it is
    # used, so the outputs are the same; a float32 copy would double the bytes each decode step reads)
    model = MiniCPMV(cfg, dtype=compute, param_dtype=compute, cuts=cuts)
    overrides = {}
    if args.downsample_mode is not None:
        overrides["downsample_mode"] = args.downsample_mode
    if args.max_slice_nums is not None:
        overrides["max_slice_nums"] = args.max_slice_nums
    processor = Processor.from_pretrained(model_dir, **overrides)
    gen_path = os.path.join(model_dir, "generation_config.json")
    gen = json.load(open(gen_path)) if os.path.exists(gen_path) else {}
    params = jax.tree.map(lambda a: jnp.asarray(a, compute if jnp.issubdtype(a.dtype, jnp.floating) else None),
                          params)
    return Setup(cfg=cfg, model=model, params=params, processor=processor,
                 chat=ChatTemplate.from_pretrained(model_dir), generation_config=gen, model_dir=model_dir)


def setup_or_usage_error(p: argparse.ArgumentParser, args, *, use_generation_config: bool):
    """(Setup, Decoding) of the flags; a checkpoint that does not load or a bad decoding flag is a usage error."""
    try:
        from uhd_jax.infer.engine import serving_params

        setup = load_setup(args)
        setup.params = serving_params(setup.model, setup.params)  # every layer stack split per layer, once
        return setup, decoding(args, setup.generation_config, use_generation_config=use_generation_config)
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))


@dataclasses.dataclass
class Decoding:
    """How to pick tokens: beams (num_beams > 1) or the sampler's per-request params (greedy when do_sample is
    False), the token budget."""

    num_beams: int
    sampling: dict
    max_new_tokens: int
    seed: int

    @property
    def plain_greedy(self) -> bool:
        """Greedy without a repetition penalty: the engine's plain argmax picker does (no per-row settings)."""
        s = self.sampling
        return (not s["do_sample"] or s["temperature"] <= 0) and float(s["repetition_penalty"]) == 1.0

    @property
    def repetition_penalty(self) -> float:
        return float(self.sampling["repetition_penalty"])

    def describe(self) -> str:
        s = self.sampling
        if self.num_beams > 1:
            how = f"beam search ({self.num_beams} beams)"
        elif not s["do_sample"] or s["temperature"] <= 0:
            how = "greedy"
        else:
            how = (f"sampling (temperature {float(s['temperature']):g}, top_k {int(s['top_k'])}, "
                   f"top_p {1 - float(s['top_p_cut']):g}, seed {self.seed})")
        return f"{how}, repetition_penalty {self.repetition_penalty:g}, max_new_tokens {self.max_new_tokens}"


def decoding(args, gen: dict, *, use_generation_config: bool) -> Decoding:
    """The decoding settings: flags first, then (use_generation_config) generation_config.json, then transformers'
    defaults. --temperature 0 is greedy whatever the config says; --temperature > 0 turns sampling on."""
    from uhd_jax.infer.sampler import params_from_generation_config

    base = dict(gen) if use_generation_config else {}
    if args.temperature is not None:
        base["do_sample"] = args.temperature > 0
    params = params_from_generation_config(base, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                           repetition_penalty=args.repetition_penalty)
    num_beams = args.num_beams or int(base.get("num_beams") or 1)
    if num_beams > 1 and params["do_sample"]:
        if args.temperature is not None and args.temperature > 0 and args.num_beams:
            raise ValueError("--num-beams > 1 is beam search without sampling; drop --temperature (or set it 0)")
        params["do_sample"] = np.bool_(False)
    max_new = args.max_new_tokens or int(base.get("max_new_tokens") or 512)
    return Decoding(num_beams=num_beams, sampling=params, max_new_tokens=max_new, seed=args.seed)


# ------------------------------------------------------------------------------------------------ records
@dataclasses.dataclass
class Item:
    """One record: its id, the processed prompt (Sample) or why it cannot run, the reference answer (the dropped
    last assistant turn) and the raw JSON object (for other fields, e.g. "answers")."""

    id: Any
    sample: Any = None
    error: str | None = None
    reference: str | None = None
    record: dict | None = None
    seed: int = 0
    answers: list | None = None  # evaluate's reference answers


def prompt_messages(messages: list[dict]) -> tuple[list[dict], str | None]:
    """(the messages up to the generation prompt, the reference answer): a final assistant turn is dropped."""
    if messages and messages[-1]["role"] == "assistant":
        return messages[:-1], messages[-1]["content"]
    return messages, None


def build_sample(setup: Setup, messages, images, *, name: str, thinking: bool | None):
    """Chat messages (content with the processor's image token, images in token order) -> processed Sample."""
    from uhd_jax.data.processor import SampleRequest

    if not messages or messages[-1]["role"] == "assistant":
        raise ValueError("the conversation has no user turn to answer")
    prompt, images = setup.chat.build_prompt(messages, images, add_generation_prompt=True, enable_thinking=thinking)
    return setup.processor.build(SampleRequest(text=prompt, images=list(images), name=name))


def error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def jsonl_items(setup: Setup, path: str, *, image_root: str | None, thinking: bool | None, seed: int,
                skip: Callable[[Any], bool] = lambda _id: False, limit: int | None = None
                ) -> tuple[int, Iterator[Item]]:
    """(number of records, an iterator of Items, processed lazily) of a JSONL file (its first `limit` records);
    records whose id `skip` says are done are not processed nor yielded."""
    from uhd_jax.data.sources import DataError, JsonlSource, jsonl_request

    src = JsonlSource(path, image_root=image_root)
    n = len(src) if limit is None else min(len(src), limit)

    def items():
        for i in range(n):
            name = src.line_name(i)
            try:
                obj = json.loads(src.read_line(i))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                if not skip(i):
                    yield Item(id=i, error=f"{name}: not valid JSON: {e}")
                continue
            rid = obj.get("id", i) if isinstance(obj, dict) else i
            if skip(rid):
                continue
            item = Item(id=rid, record=obj if isinstance(obj, dict) else None, seed=seed)
            try:
                if isinstance(obj, dict) and obj.get("seed") is not None:
                    if not isinstance(obj["seed"], int) or isinstance(obj["seed"], bool):
                        raise DataError(name, f"'seed' must be an integer, got {obj['seed']!r}")
                    item.seed = obj["seed"]
                req = jsonl_request(obj, name, src.image_root, setup.processor.tokens.image_token)
                messages, item.reference = prompt_messages(req.messages)
                item.sample = build_sample(setup, messages, req.images, name=req.name, thinking=thinking)
            except DataError as e:
                item.error = str(e)
            except REQUEST_ERRORS as e:  # this record's error row
                item.error = f"{name}: {error_text(e)}"
            yield item

    return n, items()


def read_jsonl(path: str) -> list[dict]:
    """The readable rows of a JSONL file."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


def read_done_ids(path: str) -> set[str]:
    """Ids (as JSON text) of the rows already in an output file. A last line cut short by an interrupted run is
    dropped from the file (rewritten without it)."""
    if not os.path.exists(path):
        return set()
    done, good, bad = set(), [], 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                done.add(json.dumps(row["id"]))
                good.append(line if line.endswith("\n") else line + "\n")
            except (json.JSONDecodeError, KeyError, TypeError):
                bad += 1
    if bad:
        with open(path, "w") as f:
            f.writelines(good)
        print(f"resume: dropped {bad} unreadable line(s) of {path}", file=sys.stderr)
    return done


# ------------------------------------------------------------------------------------------------ running
class Progress:
    """A progress report on stderr: requests done / total, requests/s, generated tokens/s, errors. On a terminal
    one line rewritten in place; otherwise (a log file) a line every `every` seconds and at the end."""

    def __init__(self, total: int, stream=None, every: float = 10.0):
        self.total, self.done, self.tokens, self.errors = total, 0, 0, 0
        self.start = self.last = time.perf_counter()
        self.stream = sys.stderr if stream is None else stream
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = every

    def update(self, tokens: int = 0, error: bool = False):
        self.done += 1
        self.tokens += tokens
        self.errors += int(error)
        self.show()

    def line(self) -> str:
        dt = max(time.perf_counter() - self.start, 1e-9)
        return (f"{self.done}/{self.total} requests, {self.done / dt:.2f} requests/s, {self.tokens / dt:.1f} tokens/s"
                + (f", {self.errors} errors" if self.errors else ""))

    def show(self):
        if self.tty:
            self.stream.write("\r" + self.line())
        elif time.perf_counter() - self.last >= self.every:
            self.last = time.perf_counter()
            self.stream.write(self.line() + "\n")
        else:
            return
        self.stream.flush()

    def close(self):
        self.stream.write(("\r" if self.tty else "") + self.line() + "\n")
        self.stream.flush()


def view_budget(setup: Setup, args) -> tuple[int, int]:
    """(views_per_row, tokens_per_view) for the packer: the flags, or defaults from the slicing config."""
    from uhd_jax.data.layout import patches_per_token

    sc = setup.processor.slice_config
    views = args.views_per_row or sc.max_slice_nums + 1
    unit = patches_per_token(sc.downsample_mode, sc.merger_times)
    if args.tokens_per_view:
        tokens = args.tokens_per_view
    else:
        side = sc.scale_resolution / sc.patch_size
        tokens = int(np.ceil(side * side * 9 / 8))
    return views, -(-tokens // unit) * unit


def run_items(setup: Setup, args, dec: Decoding, items: Iterable[Item], on_result: Callable[[Item, dict], None],
              progress: Progress | None = None):
    """Generates for every Item (error Items pass straight through) and calls on_result(item, row) as each one
    finishes, row = {"id", "prediction", "finish_reason", "num_tokens"} or {"id", "error"}. num_beams == 1: the
    SlotEngine (continuous batching over --slots); else beam search one request at a time."""
    from uhd_jax.data.packer import Packer, PackerConfig

    views, tokens = view_budget(setup, args)
    buckets = tuple(args.prompt_buckets)
    capacity = args.capacity or (max(buckets) + dec.max_new_tokens)
    proc = setup.processor

    def finish(item, row):
        on_result(item, row)
        if progress is not None:
            progress.update(tokens=row.get("num_tokens", 0), error="error" in row)

    def result(item, toks, reason):
        toks = np.asarray(toks)
        return {"id": item.id, "prediction": proc.decode(toks), "finish_reason": reason, "num_tokens": int(len(toks))}

    if dec.num_beams > 1:
        from uhd_jax.infer.beam_generate import BeamGenerator
        from uhd_jax.infer.engine import CacheCapacityError, text_slot_multiple

        packer = Packer(proc, PackerConfig(batch_size=1, seq_buckets=buckets, views_per_row=views,
                                           tokens_per_view=tokens,
                                           text_slot_multiple=text_slot_multiple(setup.model)))
        gen = BeamGenerator(setup.model, num_beams=dec.num_beams, eos_token_ids=proc.eos_token_ids,
                            pad_token_id=proc.pad_token_id, repetition_penalty=dec.repetition_penalty)
        for item in items:
            if item.error is not None:
                finish(item, {"id": item.id, "error": item.error})
                continue
            try:
                sample = packer.fit(item.sample)
                bucket = packer.bucket(len(sample))
                if len(sample) + dec.max_new_tokens > capacity:
                    raise CacheCapacityError(f"{sample.name}: {len(sample)} prompt + {dec.max_new_tokens} new "
                                             f"tokens > capacity {capacity}")
                out = gen.generate(setup.params, packer.pack([sample]), max_new_tokens=dec.max_new_tokens,
                                   capacity=bucket + dec.max_new_tokens)
            except REQUEST_ERRORS as e:
                finish(item, {"id": item.id, "error": error_text(e)})
                continue
            finish(item, result(item, out.tokens[0], out.finish_reasons[0]))
        return

    from uhd_jax.infer.engine import Request, SlotEngine, greedy
    from uhd_jax.infer.sampler import make_pick_fn

    engine = SlotEngine(setup.model, setup.params, proc, slots=args.slots, capacity=capacity,
                        max_new_tokens=dec.max_new_tokens, prompt_buckets=buckets, views_per_row=views,
                        tokens_per_view=tokens, pick_fn=greedy if dec.plain_greedy else make_pick_fn(setup.cfg.text),
                        sampling_defaults=None if dec.plain_greedy else dec.sampling)
    pending: dict[Any, Item] = {}
    source = iter(items)
    exhausted = False
    key = 0
    while True:
        # keep at most `slots` requests waiting: samples hold their pixels until they run
        while not exhausted and len(engine.queue) < args.slots:
            item = next(source, None)
            if item is None:
                exhausted = True
                break
            if item.error is not None:
                finish(item, {"id": item.id, "error": item.error})
                continue
            try:
                engine.submit(Request(item.sample, max_new_tokens=dec.max_new_tokens, seed=item.seed, id=key))
            except REQUEST_ERRORS as e:  # does not fit the buckets / views / cache
                finish(item, {"id": item.id, "error": error_text(e)})
                continue
            pending[key] = item
            key += 1
        if not engine.queue and not engine.running:
            if exhausted:
                break
            continue
        for f in engine.step():
            item = pending.pop(f.id)
            finish(item, result(item, f.tokens, f.finish_reason))


def run_to_jsonl(setup: Setup, args, dec: Decoding, items: Iterable[Item], path: str, *, append: bool, total: int,
                 on_result: Callable[[Item, dict], None], progress_stream=None):
    """run_items over `items`, each row appended to `path` (after the rows already there when `append`) as soon as
    it finishes, once on_result(item, row) has added its fields; a progress line over `total` requests."""
    writer = JsonlWriter(path, append=append)
    progress = Progress(total, progress_stream)

    def write(item, row):
        on_result(item, row)
        writer.write(row)

    try:
        run_items(setup, args, dec, items, write, progress)
    finally:
        progress.close()
        writer.close()


class JsonlWriter:
    """Appends one JSON row per line, flushed at once (an interrupted run keeps every finished row)."""

    def __init__(self, path: str, append: bool):
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        self.f = open(path, "a" if append else "w")

    def write(self, row: dict):
        self.f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.f.flush()

    def close(self):
        self.f.close()


def check_file_run(p: argparse.ArgumentParser, args, flag: str, path: str):
    """Usage errors of a file run, before anything loads: the input file, cache capacity vs prompt buckets."""
    from uhd_jax.data.sources import JsonlSource

    try:
        JsonlSource(path)
    except (FileNotFoundError, ValueError) as e:
        p.error(f"{flag}: {e}")
    if args.capacity is not None and args.capacity < max(args.prompt_buckets):
        p.error(f"--capacity {args.capacity} is smaller than the largest --prompt-buckets entry "
                f"{max(args.prompt_buckets)}")
