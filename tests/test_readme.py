"""The README's commands and Python example run as written (on a tiny random model saved like a real one)."""

import os
import re

import numpy as np

from tests.convert_ref import hf_model, save_hf
from tests.data_utils import make_model_dir, random_image
from uhd_jax.config import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def test_readme_starts_with_install_demo_and_test_commands():
    first_block = re.search(r"```bash\n(.*?)```", readme(), re.S).group(1).strip().splitlines()
    assert "uhd_jax.train --config configs/tiny.py" in first_block[0]
    assert first_block[0].startswith("pip install -r requirements.txt")
    assert "pytest" in first_block[1]
    test_cmd = first_block[1].split("&&")[-1].split("#")[0].strip()
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert test_cmd in f.read(), "CI must run exactly the README's test command"


def test_python_example_matches_reference(tmp_path, monkeypatch):
    """The README's Python example, executed as written, gives the transformers model's logits on the same chat."""
    import torch

    from tests.data_utils import reference_processor

    # A tokenizer carrying the real special-token ids needs the real vocabulary size.
    cfg = tiny_config()
    cfg = cfg.replace(text=cfg.text.replace(vocab_size=248320), image_token_id=248056, video_token_id=248057)
    model_dir = tmp_path / "MiniCPM-V-4_6"
    ref_model = hf_model(cfg)
    save_hf(ref_model, str(model_dir), side_files=False)
    make_model_dir(str(model_dir))
    random_image(600, 900).save(tmp_path / "cat.jpg")
    monkeypatch.chdir(tmp_path)

    code = re.search(r"### Python entry points\n\n```python\n(.*?)```", readme(), re.S).group(1)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    logits, out, sample = scope["logits"], scope["out"], scope["sample"]
    assert logits.shape == (1, 1024, 248320)
    assert out["vision"]["tokens"].shape[:3] == (1, 10, 1152 // 16) and len(sample.views) > 1

    # the same chat through the reference processor (which opens cat.jpg itself) and model
    raw = "<|im_start|>user\n<|image_pad|>\nWhat is it?<|im_end|>\n<|im_start|>assistant\n"
    enc = reference_processor(str(model_dir))(text=[raw], images=["cat.jpg"], return_tensors="pt")
    np.testing.assert_array_equal(sample.input_ids, enc["input_ids"][0].numpy())
    with torch.no_grad():
        want = ref_model(**{k: enc[k] for k in ("input_ids", "pixel_values", "target_sizes")}).logits[0].numpy()
    got = np.asarray(logits[0, :len(sample)], np.float64)
    err = np.linalg.norm(got - want, axis=-1) / np.linalg.norm(want, axis=-1)  # per position
    print(f"README example logits: max per-position rel err {err.max():.1e}")
    assert err.max() < 1e-4, err.max()
    assert scope["next_token"] == int(want[-1].argmax())


def test_sharding_example_runs():
    code = re.search(r"### Sharding and the train step\n\n```python\n(.*?)```", readme(), re.S).group(1)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    metrics, state = scope["metrics"], scope["state"]
    assert int(state.step) == 1 and np.isfinite(float(metrics["loss"])) and int(metrics["tokens"]) > 0
