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
    assert "uhd_jax.demo" in first_block[0] and first_block[0].startswith("pip install -r requirements.txt")
    assert "pytest" in first_block[1]
    test_cmd = first_block[1].split("&&")[-1].split("#")[0].strip()
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert test_cmd in f.read(), "CI must run exactly the README's test command"


def test_python_example_runs(tmp_path, monkeypatch):
    # A tokenizer carrying the real special-token ids needs the real vocabulary size.
    cfg = tiny_config()
    cfg = cfg.replace(text=cfg.text.replace(vocab_size=248320), image_token_id=248056, video_token_id=248057)
    model_dir = tmp_path / "MiniCPM-V-4_6"
    save_hf(hf_model(cfg), str(model_dir), side_files=False)
    make_model_dir(str(model_dir))
    random_image(600, 900).save(tmp_path / "cat.jpg")
    monkeypatch.chdir(tmp_path)

    code = re.search(r"### Python entry points\n\n```python\n(.*?)```", readme(), re.S).group(1)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    logits, out, sample = scope["logits"], scope["out"], scope["sample"]
    assert logits.shape == (1, 1024, 248320)
    n_views = len(sample.views)
    assert out["vision"]["tokens"].shape[:3] == (1, 10, 1152 // 16) and n_views > 1
    assert np.isfinite(np.asarray(logits[0, : len(sample)])).all()
    assert 0 <= scope["next_token"] < 248320
