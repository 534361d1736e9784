"""Our parameter tree or checkpoint directory -> a Hugging Face directory `transformers` loads
(`MiniCPMV4_6ForConditionalGeneration.from_pretrained`).

The tree is checked against the model for the config before anything is written; tensors are then
produced and written one at a time (`write_safetensors`), and a parameter is dropped as soon as its last
tensor is out, so peak memory stays near one copy of the weights.
"""

from __future__ import annotations

import os
import re

from uhd_jax.config import ModelConfig
from uhd_jax.convert import mapping
from uhd_jax.convert.checkpoint import (CONFIG_FILE, check_output_dir, copy_side_files, load_checkpoint,
                                        model_files_dir, parse_dtype, staging, write_config)
from uhd_jax.convert.errors import raise_if
from uhd_jax.convert.safetensors_io import write_safetensors
from uhd_jax.convert.target import params_shape

DEFAULT_MAX_SHARD_BYTES = 5 * 1024 ** 3


def parse_size(size) -> int | None:
    """'5GB', '500MB', '1.5GiB', 12345 -> bytes; None / 0 -> no sharding."""
    if not size:
        return None
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?i?B)?\s*", str(size), re.I)
    if not m:
        raise ValueError(f"cannot read size {size!r} (e.g. 5GB, 500MB)")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    return int(float(m.group(1)) * base ** "BKMGT".index(unit[0]))


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def write_hf_weights(out_dir: str, cfg: ModelConfig, flat: dict, *, dtype=None, max_shard_bytes=None,
                     context: str = "") -> list[str]:
    """Validates the flat parameter dict (path tuple -> array) and writes the safetensors files.

    `flat` is consumed: each parameter is removed once all its tensors are written.
    """
    plan, problems = mapping.build_plan(cfg, params_shape(cfg), mapping.PARTS)
    problems += mapping.check_params(plan, mapping.unflatten(flat))
    raise_if(problems, context)
    entries = sorted(plan.entries, key=lambda e: _natural(e.hf))
    left = {path: len(es) for path, es in plan.by_path.items()}
    specs = [(e.hf, dtype or flat[e.path].dtype, e.hf_shape) for e in entries]

    def tensor(name):
        e = plan.by_hf[name]
        out = mapping.to_hf_tensor(plan, e, flat, dtype)
        left[e.path] -= 1
        if not left[e.path]:
            del flat[e.path]  # last tensor of this parameter: free it
        return out

    with mapping.plain_pages():
        return write_safetensors(out_dir, specs, tensor, max_shard_bytes=max_shard_bytes)


def save_hf(cfg: ModelConfig, params: dict, out_dir: str, *, hf_config: dict | None = None,
            side_from: list[str] = (), dtype=None, max_shard_size=DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False):
    """Writes `params` ({'vision': ..., 'text': ...}) as a Hugging Face directory, all-or-nothing.

    config.json is `hf_config` if given (kept verbatim, e.g. the source's), else `cfg.to_hf_dict()`.
    """
    dtype = parse_dtype(dtype)
    flat = mapping.flatten(params)
    with staging(out_dir, overwrite, inputs=side_from) as tmp:
        write_hf_weights(tmp, cfg, flat, dtype=dtype, max_shard_bytes=parse_size(max_shard_size), context=out_dir)
        done = {CONFIG_FILE}
        for src in side_from:
            done |= set(copy_side_files(src, tmp, skip=done))
        config = hf_config if hf_config is not None else _hf_config(cfg)
        write_config(os.path.join(tmp, CONFIG_FILE), config, dtype)


def _hf_config(cfg: ModelConfig) -> dict:
    d = cfg.to_hf_dict()
    d.setdefault("architectures", ["MiniCPMV4_6ForConditionalGeneration"])
    return d


def jax_to_hf(ckpt_dir: str, out_dir: str, *, dtype=None, max_shard_size=DEFAULT_MAX_SHARD_BYTES,
              overwrite: bool = False):
    """Our checkpoint directory -> Hugging Face directory (config.json and side files carried over)."""
    import json

    check_output_dir(out_dir, overwrite, inputs=[ckpt_dir])
    files = model_files_dir(ckpt_dir)  # the directory itself, or WORKDIR/model for a trainer step
    check_output_dir(out_dir, overwrite, inputs=[ckpt_dir, files])
    with open(os.path.join(files, CONFIG_FILE)) as f:
        hf_config = json.load(f)
    cfg, params = load_checkpoint(ckpt_dir)
    flat = mapping.flatten(params)  # the only reference: freed as written
    del params
    dtype = parse_dtype(dtype)
    with staging(out_dir, overwrite, inputs=[ckpt_dir, files]) as tmp:
        write_hf_weights(tmp, cfg, flat, dtype=dtype, max_shard_bytes=parse_size(max_shard_size), context=ckpt_dir)
        copy_side_files(files, tmp, skip={CONFIG_FILE})
        write_config(os.path.join(tmp, CONFIG_FILE), hf_config, dtype)
