"""Every config in configs/ builds, and runs one training step on a scaled-down model: the fine-tuning configs
start from a tiny checkpoint converted from a transformers model (`convert hf-to-jax`, as users do) and read a
small JSONL dataset with images."""

import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.convert_ref import hf_model, save_hf
from tests.data_utils import random_image
from uhd_jax.config import tiny_config
from uhd_jax.data.tiny_tokenizer import write_tiny_model_dir
from uhd_jax.train.config import check_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
VARIANTS = {"tiny.py": ["", "text_model=qwen3,mode=4x", "data=synthetic_ocr"],
            "minicpmv46_sft.py": ["", "freeze=llm", "freeze=none,mode=4x"],
            "llava_uhd_v4.py": ["stage=align", "stage=pretrain", "stage=sft,mode=4x"],
            "yopo_finetune.py": ["", "window=0,drop=0,ffn=1", "window=3,drop=0.25,ffn=4,mode=4x,freeze=llm"]}


def _load(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_config_file_is_covered():
    assert sorted(os.path.basename(p) for p in CONFIGS) == sorted(VARIANTS)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_variants_build(path):
    mod = _load(path)
    for arg in VARIANTS[os.path.basename(path)]:
        c = mod.get_config(arg or None)
        if c.model.name == "dir":  # the fine-tuning configs need a checkpoint and data from the command line
            c.init.checkpoint, c.data.path = "ckpt", "data.jsonl"
        check_config(c)
    with pytest.raises(ValueError, match="unknown config argument"):
        mod.get_config("nonsense=1")


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    """{text_model: converted checkpoint dir with the tiny tokenizer}, and a JSONL file with three images."""
    root = tmp_path_factory.mktemp("cfgs")
    out = {}
    for text_model in ("qwen3_5_text", "qwen3"):
        cfg = tiny_config(text_model=text_model)
        hf_dir, ckpt = str(root / f"hf_{text_model}"), str(root / f"ckpt_{text_model}")
        save_hf(hf_model(cfg), hf_dir, side_files=False)
        r = subprocess.run([sys.executable, "-m", "uhd_jax.convert", "hf-to-jax", "--hf-dir", hf_dir, "--out", ckpt],
                           cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
        assert r.returncode == 0, r.stderr[-3000:]
        tok = write_tiny_model_dir(str(root / f"tok_{text_model}"), cfg)
        for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
                     "generation_config.json"):
            shutil.copy(os.path.join(tok, name), ckpt)
        out[text_model] = ckpt
    data = root / "data"
    data.mkdir()
    lines = []
    for i, (h, w) in enumerate([(120, 200), (300, 90), (64, 64)]):
        random_image(h, w, seed=i).save(data / f"im{i}.jpg")
        lines.append({"id": str(i), "image": f"im{i}.jpg", "conversations": [
            {"role": "user", "content": "<image>\nWhat is in the image?"},
            {"role": "assistant", "content": f"A picture number {i}."}]})
    with open(data / "train.jsonl", "w") as f:
        f.write("\n".join(json.dumps(x) for x in lines) + "\n")
    out["jsonl"] = str(data / "train.jsonl")
    return out


SCALED_DOWN = ["--config.train.steps=1", "--config.train.batch_size=2", "--config.optimizer.warmup_steps=0",
               "--config.data.seq_len=256", "--config.data.views_per_row=5", "--config.data.tokens_per_view=320",
               "--config.data.num_workers=0", "--config.train.eval_every=0", "--config.model.dtype=float32",
               "--config.model.remat=none", "--config.data.max_bad_fraction=0.0"]


@pytest.mark.parametrize("config,text_model", [("minicpmv46_sft.py", "qwen3_5_text"),
                                               ("llava_uhd_v4.py:stage=align", "qwen3")])
def test_one_step_on_a_scaled_down_model(tmp_path, tiny_checkpoints, config, text_model):
    cmd = [sys.executable, "-m", "uhd_jax.train", f"--config=configs/{config}", f"--workdir={tmp_path / 'run'}",
           f"--config.init.checkpoint={tiny_checkpoints[text_model]}", f"--config.data.path={tiny_checkpoints['jsonl']}",
           *SCALED_DOWN]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "step 1/1" in r.stdout and os.path.isdir(tmp_path / "run" / "checkpoints" / "1")


def test_yopo_finetune_one_step_with_a_calibrated_mask(tmp_path, tiny_checkpoints):
    """The visual-savings recipe: all four cuts on (a head mask as the calibration command writes it), one step;
    a bad cut value is an error naming the key."""
    from uhd_jax.model.visual_cuts import save_head_mask

    cfg = tiny_config(text_model="qwen3_5_text").text
    mask = np.ones((cfg.num_hidden_layers, cfg.num_attention_heads), bool)
    mask[[i for i, t in enumerate(cfg.layer_types) if t == "full_attention"], 1:] = False  # one head stays active
    save_head_mask(tmp_path / "heads.npz", mask)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "uhd_jax.train", f"--config=configs/yopo_finetune.py:mask={tmp_path / 'heads.npz'}",
           f"--workdir={tmp_path / 'run'}", f"--config.init.checkpoint={tiny_checkpoints['qwen3_5_text']}",
           f"--config.data.path={tiny_checkpoints['jsonl']}", *SCALED_DOWN]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "step 1/1" in r.stdout and "visual cuts: window 5" in r.stdout and "drop_layer 4, ffn_ratio 2" in r.stdout
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert rows and all(row["mfu"] is None for row in rows)  # the dense FLOPs count does not apply
    bad = subprocess.run(cmd[:-len(SCALED_DOWN)] + SCALED_DOWN + ["--config.model.cuts.window=4"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "model.cuts.window" in bad.stdout + bad.stderr
