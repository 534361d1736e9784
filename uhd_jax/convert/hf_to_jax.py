"""Hugging Face MiniCPM-V 4.6 directory -> our parameter tree (`load_hf`) or checkpoint directory (`hf_to_jax`).

Everything is validated before any tensor is read or any file written: the config parses, every safetensors
header is sound, every parameter has its tensor with the right shape and a float dtype, every tensor is used.
All problems are raised together in one `ConversionError`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import numpy as np

from uhd_jax.config import ConfigError, ModelConfig
from uhd_jax.convert import mapping
from uhd_jax.convert.checkpoint import CONFIG_FILE, check_output_dir, parse_dtype, write_checkpoint
from uhd_jax.convert.errors import raise_if
from uhd_jax.convert.safetensors_io import DTYPE_CODES, SafetensorsReader, TensorInfo
from uhd_jax.convert.target import params_shape

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Loaded:
    config: ModelConfig
    params: dict
    unused: list[str]  # tensors left out (skip_unused, or belonging to a part not asked for)


def read_config(model_dir: str, problems: list[str]) -> tuple[ModelConfig | None, dict | None]:
    try:
        with open(os.path.join(model_dir, CONFIG_FILE)) as f:
            raw = json.load(f)
        return ModelConfig.from_hf_dict(raw), raw
    except FileNotFoundError:
        problems.append(f"{CONFIG_FILE}: missing in {model_dir}")
    except json.JSONDecodeError as e:
        problems.append(f"{CONFIG_FILE}: not valid JSON: {e}")
    except (ConfigError, TypeError, ValueError) as e:
        problems.append(f"{CONFIG_FILE}: {e}")
    return None, None


def _other_parts(parts):
    others = [(r, rx) for r, rx in mapping._RULE_REGEXES if r.part not in parts]
    return lambda name: any(rx.match(name) for _, rx in others)


def load_from_reader(cfg: ModelConfig, reader, *, problems: list[str] | None = None, skip_unused: bool = False,
                     dtype=None, parts=mapping.PARTS, context: str = "") -> Loaded:
    """Validates `reader`'s tensors against the model built from `cfg`, then fills the parameter tree.

    `reader` has `.tensors` (name -> info with shape, dtype code, np_dtype) and `.read(name, out=None)`.
    """
    problems = list(problems or [])
    dtype = parse_dtype(dtype)
    plan, plan_problems = mapping.build_plan(cfg, params_shape(cfg, parts), parts)
    problems += plan_problems
    ignore = _other_parts(parts) if tuple(parts) != mapping.PARTS else None
    source_problems, unused = mapping.check_source(plan, reader.tensors, skip_unused=skip_unused, dtype=dtype,
                                                   ignore=ignore)
    raise_if(problems + source_problems, context)
    if unused:
        log.warning("skipping %d unused tensors: %s", len(unused), ", ".join(unused[:8]) + (" ..." if len(unused) > 8 else ""))
    params = mapping.fill(plan, reader.tensors, reader.read, dtype)
    skipped = sorted(set(reader.tensors) - set(plan.by_hf))
    return Loaded(cfg, params, skipped)


class ArraySource:
    """In-memory tensors (name -> numpy array) behind the reader interface, e.g. a torch state dict as numpy."""

    def __init__(self, arrays: dict):
        self.arrays = arrays
        self.tensors = {n: TensorInfo(n, DTYPE_CODES.get(np.dtype(a.dtype), str(a.dtype)), tuple(a.shape), "", 0,
                                      a.nbytes) for n, a in arrays.items()}

    def read(self, name, out=None):
        a = np.asarray(self.arrays[name])
        if out is None:
            return a
        out[...] = a
        return out


def convert_state_dict(cfg: ModelConfig, arrays: dict, *, skip_unused: bool = False, dtype=None,
                       parts=mapping.PARTS) -> dict:
    """HF-named numpy arrays (e.g. `{k: v.numpy() for k, v in model.state_dict().items()}`) -> our params.
    Same table and validation as `load_hf`; `lm_head.weight` is dropped when the embeddings are tied."""
    arrays = dict(arrays)
    if cfg.text.tie_word_embeddings:
        arrays.pop("lm_head.weight", None)  # a live tied model's state dict repeats the embedding here
    return load_from_reader(cfg, ArraySource(arrays), skip_unused=skip_unused, dtype=dtype, parts=parts).params


def load(hf_dir: str, *, skip_unused: bool = False, dtype=None, parts=mapping.PARTS) -> Loaded:
    problems = []
    cfg, _ = read_config(hf_dir, problems)
    with SafetensorsReader(hf_dir) as reader:
        problems += reader.problems
        if cfg is None:
            raise_if(problems, hf_dir)
        return load_from_reader(cfg, reader, problems=problems, skip_unused=skip_unused, dtype=dtype, parts=parts,
                                context=hf_dir)


def load_hf(hf_dir: str, *, skip_unused: bool = False, dtype=None, parts=mapping.PARTS) -> tuple[ModelConfig, dict]:
    """A Hugging Face MiniCPM-V 4.6 directory -> (ModelConfig, params as nested dicts of numpy arrays).

    parts=("vision",) gives the VisionEncoder tree only ({'vision_tower', 'merger'}), ("text",) the TextModel
    tree; both give {'vision': ..., 'text': ...}. Tensors keep their checkpoint dtype unless `dtype` is given
    ('bfloat16', 'float32', 'float16'). Raises ConversionError listing every problem.
    """
    loaded = load(hf_dir, skip_unused=skip_unused, dtype=dtype, parts=parts)
    return loaded.config, loaded.params


def hf_to_jax(hf_dir: str, out_dir: str, *, skip_unused: bool = False, dtype=None, overwrite: bool = False) -> Loaded:
    """Converts a Hugging Face directory into our checkpoint directory (see `checkpoint.py`), all-or-nothing."""
    check_output_dir(out_dir, overwrite, inputs=[hf_dir])
    problems = []
    _, raw = read_config(hf_dir, problems)
    loaded = load(hf_dir, skip_unused=skip_unused, dtype=dtype)
    write_checkpoint(out_dir, raw, loaded.params, side_from=[hf_dir], dtype=parse_dtype(dtype), overwrite=overwrite)
    return loaded


def tree_summary(params: dict) -> tuple[int, int, dict]:
    """(parameter count, bytes, {dtype: count})."""
    n = b = 0
    dtypes: dict = {}
    for a in mapping.flatten(params).values():
        n += a.size
        b += a.nbytes
        dtypes[np.dtype(a.dtype).name] = dtypes.get(np.dtype(a.dtype).name, 0) + a.size
    return n, b, dtypes
