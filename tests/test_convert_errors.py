"""Bad checkpoints: every problem reported at once, by name, and nothing left in the output directory."""

import json
import os

import numpy as np
import pytest

from tests.convert_ref import edit_config, hf_model, read_all, rewrite, save_hf
from uhd_jax.config import tiny_config
from uhd_jax.convert.__main__ import main as cli
from uhd_jax.convert.checkpoint import PARAMS_DIR
from uhd_jax.convert.errors import ConversionError
from uhd_jax.convert.hf_to_jax import hf_to_jax, load_hf
from uhd_jax.convert.jax_to_hf import jax_to_hf

VT = "model.vision_tower"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    cfg = tiny_config(insert_layer_id=1)
    root = tmp_path_factory.mktemp("good")
    return save_hf(hf_model(cfg, seed=5), str(root / "hf"))


def convert_fails(src, out) -> ConversionError:
    """hf_to_jax must raise and leave neither the output nor a temporary directory behind."""
    parent = os.path.dirname(out)
    before = set(os.listdir(parent))
    with pytest.raises(ConversionError) as e:
        hf_to_jax(src, out)
    assert not os.path.exists(out)
    assert set(os.listdir(parent)) == before, "temporary files left behind"
    return e.value


def test_every_problem_at_once(good, tmp_path):
    def edit(t):
        del t[f"{VT}.post_layernorm.bias"]  # missing
        t["model.merger.mlp.0.linear_2.bias"] = np.zeros(65, np.float32)  # wrong shape
        t["model.language_model.norm.weight"] = np.zeros(64, np.int32)  # wrong dtype
        t["mtp.fc.weight"] = np.zeros((4, 4), np.float32)  # unused
        t[f"{VT}.encoder.layers.9.mlp.fc1.bias"] = np.zeros(96, np.float32)  # a layer the config does not have
        return t

    src = rewrite(good, str(tmp_path / "bad"), edit)
    err = convert_fails(src, str(tmp_path / "out"))
    msg = str(err)
    assert len(err.problems) == 5, msg
    assert "missing tensor `model.vision_tower.post_layernorm.bias`" in msg
    assert "`model.merger.mlp.0.linear_2.bias` has shape [65], the config expects [64]" in msg
    assert "`model.language_model.norm.weight` has dtype I32" in msg
    assert "unused tensor `mtp.fc.weight`" in msg and "multi-token-prediction" in msg
    assert "unused tensor `model.vision_tower.encoder.layers.9.mlp.fc1.bias`" in msg and "fits" in msg


def test_skip_unused(good, tmp_path):
    src = rewrite(good, str(tmp_path / "mtp"), lambda t: {**t, "mtp.fc.weight": np.ones((4, 4), np.float32),
                                                          "mtp.norm.weight": np.ones(4, np.float32)})
    with pytest.raises(ConversionError, match="mtp.fc.weight"):
        load_hf(src)
    loaded = hf_to_jax(src, str(tmp_path / "out"), skip_unused=True)
    assert loaded.unused == ["mtp.fc.weight", "mtp.norm.weight"]
    assert os.path.isdir(os.path.join(tmp_path, "out", PARAMS_DIR))


def test_stacked_layers_of_mixed_dtype(good, tmp_path):
    import ml_dtypes

    name = f"{VT}.encoder.layers.0.mlp.fc1.weight"
    src = rewrite(good, str(tmp_path / "mixed"), lambda t: {**t, name: t[name].astype(ml_dtypes.bfloat16)})
    err = convert_fails(src, str(tmp_path / "out"))
    assert len(err.problems) == 1
    assert "vision_tower/layers_pre/layers/mlp/fc1/kernel` would stack tensors of different dtypes" in str(err)
    _, params = load_hf(src, dtype="float32")  # casting resolves it
    assert params["vision"]["vision_tower"]["layers_pre"]["layers"]["mlp"]["fc1"]["kernel"].dtype == np.float32


def test_truncated_and_corrupt_files(good, tmp_path):
    trunc = rewrite(good, str(tmp_path / "trunc"), lambda t: t)
    path = os.path.join(trunc, "model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    err = convert_fails(trunc, str(tmp_path / "out"))
    truncated = [p for p in err.problems if "truncated file" in p]
    assert len(truncated) == 1 and truncated[0].startswith("tensor `")
    missing = [p for p in err.problems if p.startswith("missing tensor")]
    assert len(missing) == 1  # the truncated tensor is also not available: named, once

    corrupt = rewrite(good, str(tmp_path / "corrupt"), lambda t: t)
    with open(os.path.join(corrupt, "model.safetensors"), "r+b") as f:
        f.seek(8)
        f.write(b"\x00garbage")
    err = convert_fails(corrupt, str(tmp_path / "out"))
    assert "model.safetensors: corrupt safetensors header" in str(err)

    tiny = rewrite(good, str(tmp_path / "tiny"), lambda t: t)
    with open(os.path.join(tiny, "model.safetensors"), "wb") as f:
        f.write(b"\x01\x02")
    assert "no header" in str(convert_fails(tiny, str(tmp_path / "out")))


def test_missing_shard(good, tmp_path):
    import shutil

    src = str(tmp_path / "sharded")
    shutil.copytree(good, src)
    os.remove(os.path.join(src, "model.safetensors"))
    from uhd_jax.convert.safetensors_io import write_safetensors

    tensors = read_all(good)
    names = write_safetensors(src, [(k, a.dtype, a.shape) for k, a in tensors.items()], tensors.__getitem__,
                              max_shard_bytes=200_000)
    assert len(names) > 3
    os.remove(os.path.join(src, names[1]))
    err = convert_fails(src, str(tmp_path / "out"))
    assert any(p.startswith(f"shard {names[1]} listed in model.safetensors.index.json is missing")
               for p in err.problems)
    assert any(p.startswith("missing tensor") for p in err.problems)


def test_config_not_matching_tensors(good, tmp_path):
    src = rewrite(good, str(tmp_path / "cfg"), lambda t: t)
    edit_config(src, lambda d: d["vision_config"].update(num_hidden_layers=3, intermediate_size=100))
    err = convert_fails(src, str(tmp_path / "out"))
    msg = str(err)
    for i in range(3):  # every layer's fc1/fc2 by name
        assert f"`{VT}.encoder.layers.{i}.mlp.fc1.weight` has shape [96, 64], the config expects [100, 64]" in msg
    assert f"unused tensor `{VT}.encoder.layers.3.mlp.fc2.weight`" in msg

    bad_json = rewrite(good, str(tmp_path / "json"), lambda t: t)
    with open(os.path.join(bad_json, "config.json"), "w") as f:
        f.write("{not json")
    assert "config.json: not valid JSON" in str(convert_fails(bad_json, str(tmp_path / "out")))

    unsupported = rewrite(good, str(tmp_path / "act"), lambda t: t)
    edit_config(unsupported, lambda d: d["vision_config"].update(hidden_act="relu"))
    assert "vision_config.hidden_act" in str(convert_fails(unsupported, str(tmp_path / "out")))


def test_output_dir_rules(good, tmp_path):
    out = str(tmp_path / "out")
    os.makedirs(out)
    with open(os.path.join(out, "keep.txt"), "w") as f:
        f.write("x")
    with pytest.raises(FileExistsError):
        hf_to_jax(good, out)
    bad = rewrite(good, str(tmp_path / "bad"), lambda t: {k: v for k, v in t.items() if "merger" not in k})
    with pytest.raises(ConversionError):
        hf_to_jax(bad, out, overwrite=True)
    assert os.listdir(out) == ["keep.txt"]  # a failed overwrite leaves the old output alone
    hf_to_jax(good, out, overwrite=True)
    assert "keep.txt" not in os.listdir(out) and PARAMS_DIR in os.listdir(out)


def test_jax_to_hf_rejects_bad_params(good, tmp_path):
    from uhd_jax.convert.checkpoint import write_checkpoint

    cfg_d = json.load(open(os.path.join(good, "config.json")))
    _, params = load_hf(good)
    params["vision"]["merger"]["mlp_0"]["linear_1"]["bias"] = np.zeros(3, np.float32)
    del params["text"]["norm"]
    params["text"]["extra_head"] = {"kernel": np.zeros((2, 2), np.float32)}
    ckpt = str(tmp_path / "ckpt")
    write_checkpoint(ckpt, cfg_d, params)
    out = str(tmp_path / "hf")
    with pytest.raises(ConversionError) as e:
        jax_to_hf(ckpt, out)
    msg = str(e.value)
    assert len(e.value.problems) == 3, msg
    assert "`vision/merger/mlp_0/linear_1/bias` has shape [3], the config expects [256]" in msg
    assert "`text/norm/scale` [64] is missing" in msg
    assert "`text/extra_head/kernel` [2, 2] is not part of the model" in msg
    assert not os.path.exists(out) and sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_cli_reports_problems(good, tmp_path, capsys):
    bad = rewrite(good, str(tmp_path / "bad"), lambda t: {**t, "mtp.x": np.zeros(2, np.float32)})
    assert cli(["hf-to-jax", "--hf-dir", bad, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "1 problem" in err and "unused tensor `mtp.x`" in err
    assert cli(["hf-to-jax", "--hf-dir", bad, "--out", str(tmp_path / "out"), "--skip-unused"]) == 0
    assert "skipped 1 unused tensors: mtp.x" in capsys.readouterr().out


def _snapshot(root):
    """Every file under root with its bytes (to prove nothing changed)."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


def test_output_dir_overlapping_the_input_is_refused(good, tmp_path, capsys):
    """--out equal to the input, inside it, containing it, or a symlink to it: refused with both paths named,
    before anything is read, written or deleted (the source stays byte-identical, no temporary directories)."""
    import shutil

    src = str(tmp_path / "parent" / "hf")
    shutil.copytree(good, src)
    before = _snapshot(str(tmp_path))
    link = str(tmp_path / "link")
    os.symlink(src, link)
    cases = [(src, "is the input directory"), (os.path.join(src, "sub"), "is inside the input directory"),
             (str(tmp_path / "parent"), f"input directory {src} is inside the output directory"),
             (link, "is the input directory"), (os.path.join(link, "x"), "is inside the input directory")]
    for out, says in cases:
        assert cli(["hf-to-jax", "--hf-dir", src, "--out", out, "--overwrite"]) == 2, out
        err = capsys.readouterr().err
        assert says in err and out in err and src in err, err
        if out.startswith(link):
            assert f"(resolved: {os.path.realpath(out)} and {src})" in err
        with pytest.raises(ValueError, match=says):
            hf_to_jax(src, out, overwrite=True)
    # relative spellings of the same directory
    cwd = os.getcwd()
    try:
        os.chdir(str(tmp_path / "parent"))
        assert cli(["hf-to-jax", "--hf-dir", "hf", "--out", "./hf/../hf", "--overwrite"]) == 2
        assert "output directory ./hf/../hf is the input directory hf" in capsys.readouterr().err
    finally:
        os.chdir(cwd)
    os.remove(link)
    assert _snapshot(str(tmp_path)) == before

    # jax-to-hf and from-separate: refused before their inputs are even read
    ckpt = str(tmp_path / "ckpt")
    os.makedirs(ckpt)
    assert cli(["jax-to-hf", "--ckpt", ckpt, "--out", os.path.join(ckpt, "hf"), "--overwrite"]) == 2
    assert f"output directory {os.path.join(ckpt, 'hf')} is inside the input directory {ckpt}" in \
        capsys.readouterr().err
    with pytest.raises(ValueError, match="is the input directory"):
        jax_to_hf(ckpt, ckpt, overwrite=True)
    from uhd_jax.convert.from_separate import from_separate

    vision, llm = str(tmp_path / "siglip"), str(tmp_path / "qwen")
    for d in (vision, llm):
        os.makedirs(d)
    assert cli(["from-separate", "--vision-dir", vision, "--llm-dir", llm, "--out", llm, "--overwrite"]) == 2
    assert f"output directory {llm} is the input directory {llm}" in capsys.readouterr().err
    with pytest.raises(ValueError, match=f"input directory {vision} is inside the output directory"):
        from_separate(vision, llm, str(tmp_path), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "parent", "qwen", "siglip"]
    assert os.listdir(ckpt) == [] and os.listdir(llm) == []
