"""Our checkpoint directory, and writing any output directory all-or-nothing.

A checkpoint directory is self-contained:
    config.json                 the Hugging Face model config (ModelConfig.from_json reads it)
    params/                     Orbax checkpoint of the parameter tree (numpy arrays, per-tensor dtypes)
    generation_config.json, preprocessor_config.json, tokenizer files, ...   copied from the source
Outputs are built in a hidden sibling directory and renamed into place at the end, so a failed or
interrupted conversion leaves no half-written output.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile

import jax
import ml_dtypes
import numpy as np

from uhd_jax.config import ModelConfig, TextConfig

PARAMS_DIR = "params"
CONFIG_FILE = "config.json"
# weights in any format: never copied as side files (they are what we convert)
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth", ".ckpt",
                   ".h5", ".msgpack", ".gguf", ".onnx", ".npz")

DTYPE_NAMES = {"float32": np.float32, "fp32": np.float32, "bfloat16": ml_dtypes.bfloat16, "bf16": ml_dtypes.bfloat16,
               "float16": np.float16, "fp16": np.float16}


def parse_dtype(dtype) -> np.dtype | None:
    """None / 'keep' -> None (keep each tensor's dtype); 'bfloat16', 'float32', 'float16' or a dtype."""
    if dtype is None or (isinstance(dtype, str) and dtype.lower() in ("keep", "auto", "")):
        return None
    if isinstance(dtype, str):
        try:
            return np.dtype(DTYPE_NAMES[dtype.lower()])
        except KeyError:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPE_NAMES)} or 'keep'") from None
    return np.dtype(dtype)


def side_files(src_dir: str) -> list[str]:
    """Top-level files of a model directory that are not weights (configs, tokenizer, chat template...)."""
    out = []
    for name in sorted(os.listdir(src_dir)):
        p = os.path.join(src_dir, name)
        if os.path.isfile(p) and not name.endswith(WEIGHT_SUFFIXES) and not name.startswith("."):
            out.append(name)
    return out


def copy_side_files(src_dir: str, dst_dir: str, skip=()) -> list[str]:
    copied = []
    for name in side_files(src_dir):
        if name not in skip:
            shutil.copyfile(os.path.join(src_dir, name), os.path.join(dst_dir, name))
            copied.append(name)
    return copied


def write_config(path: str, config: dict, dtype: np.dtype | None = None):
    """Writes an HF config dict; with a cast, its `dtype` / `torch_dtype` name the new dtype."""
    config = dict(config)
    if dtype is not None:
        name = np.dtype(dtype).name
        config["dtype"] = name
        if "torch_dtype" in config:
            config["torch_dtype"] = name
    with open(path, "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


def check_not_overlapping(out_dir: str, inputs=()):
    """ValueError if `out_dir` is one of the `inputs` directories, inside one, or contains one (symlinks resolved):
    writing there, or replacing it (overwrite), would corrupt or delete the source."""
    out = os.path.realpath(out_dir)
    for src in inputs:
        real = os.path.realpath(src)
        resolved = "" if (out, real) == (os.path.abspath(out_dir), os.path.abspath(src)) else \
            f" (resolved: {out} and {real})"
        if out == real:
            raise ValueError(f"output directory {out_dir} is the input directory {src}{resolved}; "
                             f"write to another directory")
        if os.path.commonpath([out, real]) == real:
            raise ValueError(f"output directory {out_dir} is inside the input directory {src}{resolved}; "
                             f"write to a directory outside it")
        if os.path.commonpath([out, real]) == out:
            raise ValueError(f"input directory {src} is inside the output directory {out_dir}{resolved}; "
                             f"replacing the output would delete the input")


def check_output_dir(out_dir: str, overwrite: bool, inputs=()):
    """Before anything is read or written: `out_dir` must not overlap the input directories, and may exist only
    with overwrite."""
    check_not_overlapping(out_dir, inputs)
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True (--overwrite) to replace it")


@contextlib.contextmanager
def staging(out_dir: str, overwrite: bool = False, inputs=()):
    """Yields a temporary directory next to `out_dir`; on success it replaces `out_dir`, on error it is removed.
    `inputs`: directories the output must not overlap (`check_not_overlapping`)."""
    check_output_dir(out_dir, overwrite, inputs)
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        yield tmp
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            os.rename(out_dir, os.path.join(old, "x"))
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_params(path: str, params: dict):
    """Orbax checkpoint of a tree of arrays (each keeps its dtype), written as numpy arrays.

    The save is synchronous, so Orbax's defensive copy of host arrays is switched off, and so is compression:
    bf16 weights hardly compress, and both cost a full extra copy of the weights in memory (and time). Plain
    per-array zarr directories (no OCDBT) write twice as fast here and restore as fast, and a converted model
    has only ~100 arrays.
    """
    import orbax.checkpoint as ocp

    params = jax.tree.map(np.asarray, params)
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, ocp.type_handlers.ArrayHandler()))
    handler = ocp.PyTreeCheckpointHandler(use_compression=False, use_ocdbt=False,
                                          type_handler_registry=registry)
    with ocp.Checkpointer(handler) as ckpt:
        ckpt.save(os.path.abspath(path), args=ocp.args.PyTreeSave(params))


def _resize(a: np.ndarray, axis: int, n: int) -> np.ndarray:
    """a cut or zero-padded to n entries along axis."""
    if a.shape[axis] >= n:
        return a[(slice(None),) * axis + (slice(0, n),)]
    pad = [(0, 0)] * a.ndim
    pad[axis] = (0, n - a.shape[axis])
    return np.pad(a, pad)


def load_params(path: str, target=None, text: TextConfig | None = None) -> dict:
    """Restores the parameter tree: numpy arrays, or per `target` (a tree of jax.ShapeDtypeStruct with
    shardings) straight onto devices.

    With `text`, the vocab dim of embed_tokens [Vp, D] / lm_head [D, Vp] comes out as text.padded_vocab_size
    whatever padding the checkpoint was saved with (padding rows dropped or zero rows added; the padding is never
    used, so this is exact); a target must then have that size. Raises ValueError naming the parameter if the
    checkpoint holds fewer than text.vocab_size entries (a different vocabulary) or the target disagrees.
    """
    import orbax.checkpoint as ocp

    from uhd_jax.convert import mapping

    path = os.path.abspath(path)
    with ocp.StandardCheckpointer() as ckpt:
        if text is None:
            return ckpt.restore(path, target)
        stored = mapping.flatten(ckpt.metadata(path).item_metadata.tree)
    axes = mapping.vocab_params(mapping.unflatten(stored))
    n = text.padded_vocab_size
    for p, axis in axes.items():
        if stored[p].shape[axis] < text.vocab_size:
            raise ValueError(f"checkpoint parameter `{mapping.path_str(p)}` {list(stored[p].shape)} has "
                             f"{stored[p].shape[axis]} vocabulary entries, fewer than the config's vocab_size "
                             f"{text.vocab_size} (a checkpoint of another vocabulary?)")
    if target is None:
        with ocp.StandardCheckpointer() as ckpt:
            flat = mapping.flatten(ckpt.restore(path))
        for p, axis in axes.items():
            flat[p] = _resize(np.asarray(flat[p]), axis, n)
        return mapping.unflatten(flat)
    flat_target = mapping.flatten(target)
    for p, axis in axes.items():
        if p in flat_target and flat_target[p].shape[axis] != n:
            raise ValueError(f"target `{mapping.path_str(p)}` {list(flat_target[p].shape)} has "
                             f"{flat_target[p].shape[axis]} vocabulary entries; the config pads to {n}: build "
                             f"the target from the same TextConfig")
    restore_args = mapping.flatten(ocp.checkpoint_utils.construct_restore_args(target))
    for p in axes:
        if p in restore_args:  # orbax cuts the stored padding or pads with zeros
            restore_args[p] = dataclasses.replace(restore_args[p], strict=False)
    with ocp.PyTreeCheckpointer() as ckpt:
        return ckpt.restore(path, args=ocp.args.PyTreeRestore(item=target,
                                                              restore_args=mapping.unflatten(restore_args)))


TRAIN_STATE_DIR = "state"  # a trainer step: WORKDIR/checkpoints/STEP/state (params + optimizer state)
TRAIN_MODEL_DIR = "model"  # the trainer writes the model's config.json and side files to WORKDIR/model


def model_files_dir(ckpt_dir: str) -> str:
    """Where config.json and the side files of a checkpoint are: the directory itself (hf-to-jax, from-separate),
    or WORKDIR/model for a trainer step WORKDIR/checkpoints/STEP."""
    if os.path.isdir(os.path.join(ckpt_dir, TRAIN_STATE_DIR)) and not os.path.isdir(os.path.join(ckpt_dir, PARAMS_DIR)):
        model = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(ckpt_dir))), TRAIN_MODEL_DIR)
        if not os.path.isfile(os.path.join(model, CONFIG_FILE)):
            raise FileNotFoundError(f"{ckpt_dir} is a trainer step but {model}/{CONFIG_FILE} is missing")
        return model
    if not os.path.isdir(os.path.join(ckpt_dir, PARAMS_DIR)):
        raise FileNotFoundError(f"{ckpt_dir} has no {PARAMS_DIR}/ (not a uhd_jax checkpoint directory, nor a "
                                f"trainer step WORKDIR/checkpoints/STEP)")
    return ckpt_dir


def _load_train_step(step_dir: str, text: TextConfig) -> dict:
    """The parameters of a trainer step (numpy), vocabulary padding set to `text`'s. Restores the whole train state
    (parameters and optimizer moments) on the host and keeps the parameters."""
    import orbax.checkpoint as ocp

    from uhd_jax.convert import mapping

    with ocp.StandardCheckpointer() as ckpt:
        params = ckpt.restore(os.path.abspath(os.path.join(step_dir, TRAIN_STATE_DIR)))["params"]
    flat = mapping.flatten(params)
    for p, axis in mapping.vocab_params(params).items():
        flat[p] = _resize(np.asarray(flat[p]), axis, text.padded_vocab_size)
    return mapping.unflatten(flat)


def load_checkpoint(ckpt_dir: str, target=None, *, vocab_pad_multiple: int | None = None) -> tuple[ModelConfig, dict]:
    """(config, params) from a checkpoint directory written by `hf-to-jax` or `from-separate`, or from a trainer
    step `WORKDIR/checkpoints/STEP` (numpy only: `target` is not supported there).

    The vocabulary padding of the parameters is the config's (`TextConfig.padded_vocab_size`; config.json does
    not hold it: `vocab_pad_multiple` sets it, default TextConfig's), whatever the checkpoint was saved with.
    """
    files = model_files_dir(ckpt_dir)
    cfg = ModelConfig.from_json(files)
    if vocab_pad_multiple is not None:
        cfg = cfg.replace(text=cfg.text.replace(vocab_pad_multiple=vocab_pad_multiple))
        cfg.text.validate()
    if files != ckpt_dir:
        if target is not None:
            raise ValueError(f"{ckpt_dir}: restoring a trainer step onto a target is the trainer's job (resume it)")
        return cfg, _load_train_step(ckpt_dir, cfg.text)
    return cfg, load_params(os.path.join(ckpt_dir, PARAMS_DIR), target, cfg.text)


def write_checkpoint(out_dir: str, config: dict, params: dict, *, side_from: list[str] = (),
                     dtype: np.dtype | None = None, overwrite: bool = False):
    """Writes config.json, params/ and the side files of the directories in `side_from` (first one wins),
    all-or-nothing."""
    with staging(out_dir, overwrite, inputs=side_from) as tmp:
        save_params(os.path.join(tmp, PARAMS_DIR), params)
        done = {CONFIG_FILE}
        for src in side_from:
            done |= set(copy_side_files(src, tmp, skip=done))
        write_config(os.path.join(tmp, CONFIG_FILE), config, dtype)
