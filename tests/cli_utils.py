"""A tiny random checkpoint directory as the CLIs load it (config.json, params/, the tiny byte tokenizer and
processor files, generation_config.json), and small images and JSONL files for the CLI tests."""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import numpy as np

from tests.data_utils import random_image
from uhd_jax.config import tiny_config
from uhd_jax.convert.checkpoint import PARAMS_DIR, save_params
from uhd_jax.data.packer import Packer, PackerConfig
from uhd_jax.data.processor import Processor
from uhd_jax.data.tiny_tokenizer import write_tiny_model_dir
from uhd_jax.model.minicpmv import MiniCPMV

# small views (<= 8x8 patches): fast on CPU
PREPROCESSOR = dict(scale_resolution=112, max_slice_nums=2)
# the CLI flags that size the tiny runs (one prefill bucket, few views)
FLAGS = ["--prompt-buckets", "96", "--max-new-tokens", "6", "--views-per-row", "3", "--tokens-per-view", "128"]


def make_checkpoint(path: str, seed: int = 0, **generation) -> str:
    """A random tiny_config() model saved as a uhd_jax checkpoint directory; `generation` entries are added to
    its generation_config.json."""
    cfg = tiny_config()
    write_tiny_model_dir(path, cfg, **PREPROCESSOR)
    if generation:
        gp = os.path.join(path, "generation_config.json")
        gen = json.load(open(gp))
        gen.update(generation)
        json.dump(gen, open(gp, "w"))
    proc = Processor.from_pretrained(path)
    sample = proc("<|image_pad|>\nhi", [random_image(30, 40)])[0]
    batch = Packer(proc, PackerConfig(batch_size=1, seq_buckets=(64,), views_per_row=1,
                                      tokens_per_view=64)).pack([sample])
    params = nn.unbox(jax.jit(MiniCPMV(cfg).init)(jax.random.key(seed), batch))["params"]
    save_params(os.path.join(path, PARAMS_DIR), jax.tree.map(np.asarray, params))
    return path


def write_images(folder: str) -> dict[str, str]:
    """Two small images and a corrupt one: {"a": ..png, "b": ..jpg, "bad": ..jpg}."""
    os.makedirs(folder, exist_ok=True)
    paths = {"a": os.path.join(folder, "a.png"), "b": os.path.join(folder, "b.jpg"),
             "bad": os.path.join(folder, "bad.jpg")}
    random_image(40, 60, seed=1).save(paths["a"])
    random_image(100, 50, seed=2).save(paths["b"])
    with open(paths["bad"], "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return paths


def write_jsonl(path: str, rows) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
