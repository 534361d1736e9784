"""Checkpoint conversion against transformers: bit-exact round trips, the real checkpoint's layout, and the
converted tiny model computing what the reference computes."""

import json
import math
import os

import jax
import numpy as np
import pytest
import torch

from tests.convert_ref import bits_equal, hf_model, read_all, rel, save_hf
from uhd_jax.config import ModelConfig, reference_config, tiny_config
from uhd_jax.convert import mapping
from uhd_jax.convert.__main__ import main as cli
from uhd_jax.convert.checkpoint import load_checkpoint
from uhd_jax.convert.hf_to_jax import hf_to_jax, load_hf
from uhd_jax.convert.jax_to_hf import jax_to_hf
from uhd_jax.convert.safetensors_io import SafetensorsReader, write_safetensors
from uhd_jax.convert.target import params_shape


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random MiniCPM-V 4.6 (Qwen3.5 text), saved in float32 and in bfloat16 (sharded)."""
    cfg = tiny_config(insert_layer_id=1)
    model = hf_model(cfg, seed=3)
    root = tmp_path_factory.mktemp("tiny")
    fp32 = save_hf(model, str(root / "fp32"))
    bf16 = save_hf(model, str(root / "bf16"), dtype=torch.bfloat16, max_shard_size="100KB")
    return cfg, model, fp32, bf16


@pytest.mark.parametrize("which", ["fp32", "bf16"])
def test_round_trip_bit_exact(tiny, tmp_path, which):
    _, _, fp32, bf16 = tiny
    src = fp32 if which == "fp32" else bf16
    if which == "bf16":
        assert os.path.exists(os.path.join(src, "model.safetensors.index.json")), "bf16 source must be sharded"
    ckpt, back = str(tmp_path / "ckpt"), str(tmp_path / "back")
    hf_to_jax(src, ckpt)
    # the checkpoint dir stands alone: config, processor, generation and tokenizer files next to the params
    for f in ("config.json", "generation_config.json", "preprocessor_config.json", "tokenizer_config.json",
              "chat_template.jinja"):
        assert os.path.exists(os.path.join(ckpt, f)), f
    loaded_cfg, params = load_checkpoint(ckpt)
    assert loaded_cfg == ModelConfig.from_json(src)
    want_dtype = np.float32 if which == "fp32" else jax.numpy.bfloat16
    assert all(a.dtype == want_dtype for a in jax.tree.leaves(params))

    jax_to_hf(ckpt, back, max_shard_size="150KB" if which == "fp32" else "5GB")
    a, b = read_all(src), read_all(back)
    assert sorted(a) == sorted(b) and len(a) == 199  # 200 state-dict entries, lm_head tied
    bad = [k for k in a if not bits_equal(a[k], b[k])]
    assert not bad, bad
    assert json.load(open(os.path.join(src, "config.json"))) == json.load(open(os.path.join(back, "config.json")))
    assert os.path.exists(os.path.join(back, "tokenizer_config.json"))


def test_transformers_loads_our_export(tiny, tmp_path):
    from transformers import MiniCPMV4_6ForConditionalGeneration

    cfg, model, fp32, _ = tiny
    out = str(tmp_path / "hf")
    _, params = load_hf(fp32)
    from uhd_jax.convert.jax_to_hf import save_hf as save_ours

    save_ours(cfg, params, out, max_shard_size="120KB")
    assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    again = MiniCPMV4_6ForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    ref, got = model.state_dict(), again.state_dict()
    assert sorted(ref) == sorted(got)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_cli_round_trip(tiny, tmp_path, capsys):
    _, _, fp32, _ = tiny
    ckpt, back = str(tmp_path / "ckpt"), str(tmp_path / "back")
    assert cli(["hf-to-jax", "--hf-dir", fp32, "--out", ckpt, "--dtype", "bfloat16"]) == 0
    assert json.load(open(os.path.join(ckpt, "config.json")))["dtype"] == "bfloat16"
    assert cli(["jax-to-hf", "--ckpt", ckpt, "--out", back]) == 0
    a, b = read_all(fp32), read_all(back)
    assert all(b[k].dtype == jax.numpy.bfloat16 for k in b)
    # float32 -> bfloat16 is the only change (round to nearest even, as torch's .to(bfloat16))
    bad = [k for k in a if not bits_equal(torch.from_numpy(a[k]).to(torch.bfloat16).view(torch.int16).numpy(),
                                          b[k].view(np.int16))]
    assert not bad, bad
    assert "wrote" in capsys.readouterr().out


def test_reader_matches_safetensors_library(tiny, tmp_path):
    _, _, fp32, bf16 = tiny
    for src in (fp32, bf16):
        ref = read_all(src)
        with SafetensorsReader(src) as r:
            assert not r.problems and sorted(r.keys()) == sorted(ref)
            assert all(bits_equal(r.read(k), ref[k]) for k in ref)
    # writer: shards, header alignment and dtypes as the library reads them
    rng = np.random.default_rng(0)
    arrays = {f"t{i}": rng.standard_normal((i + 1, 7)).astype(dt) for i, dt in
              enumerate([np.float32, jax.numpy.bfloat16, np.float16, np.float32, np.int64])}
    specs = [(k, a.dtype, a.shape) for k, a in arrays.items()]
    names = write_safetensors(str(tmp_path), specs, arrays.__getitem__, max_shard_bytes=100)
    assert "model.safetensors.index.json" in names and len(names) > 2
    back = read_all(str(tmp_path))
    assert all(bits_equal(back[k], arrays[k]) for k in arrays)


def test_converted_tiny_model_matches_reference(tiny):
    """Vision tokens and LLM logits of the converted checkpoint against transformers (float32)."""
    from transformers import MiniCPMV4_6ImageProcessorPil
    from PIL import Image

    from tests.vision_ref import navit_views
    from uhd_jax.data.layout import pack_views
    from uhd_jax.model.text_model import TextModel
    from uhd_jax.model.vision import VisionEncoder

    cfg, model, fp32, _ = tiny
    _, params = load_hf(fp32)

    # vision: two images, several slices, 16x mode
    proc = MiniCPMV4_6ImageProcessorPil(scale_resolution=112, max_slice_nums=4)
    rng = np.random.default_rng(0)
    views, ref_tokens = [], []
    for h, w in ((200, 300), (112, 112)):
        f = proc(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), return_tensors="np")
        with torch.no_grad():
            feats = model.model.get_image_features(torch.tensor(f["pixel_values"]), torch.tensor(f["target_sizes"]))
        ref_tokens += [t.numpy() for t in feats.pooler_output]
        views += navit_views(f["pixel_values"], f["target_sizes"], 14)
    batch = pack_views(views, patch_size=14, positions_per_side=cfg.vision.positions_per_side)
    tokens, _, _ = jax.jit(VisionEncoder(cfg, attn_impl="xla").apply)({"params": params["vision"]}, batch)
    errs = [rel(np.asarray(tokens)[i, :len(r)], r) for i, r in enumerate(ref_tokens)]
    assert len(errs) >= 4 and max(errs) < 1e-4, errs

    # text: logits of the converted LLM
    ids = rng.integers(0, cfg.text.vocab_size, (2, 12))
    with torch.no_grad():
        h = model.model.language_model(input_ids=torch.tensor(ids)).last_hidden_state
        ref_logits = model.lm_head(h).numpy()
    logits, _ = TextModel(cfg.text, attention_impl="xla").apply({"params": params["text"]}, jax.numpy.asarray(ids))
    assert rel(logits, ref_logits) < 1e-4, rel(logits, ref_logits)


def test_qwen3_text_round_trip(tmp_path):
    """The dense-LLM variant (Qwen3 text config): every tensor mapped, round trip bit-exact."""
    cfg = tiny_config(text_model="qwen3", merger_times=2)
    src = save_hf(hf_model(cfg, seed=1), str(tmp_path / "src"), side_files=False)
    ckpt, back = str(tmp_path / "ckpt"), str(tmp_path / "back")
    hf_to_jax(src, ckpt)
    jax_to_hf(ckpt, back)
    a, b = read_all(src), read_all(back)
    assert sorted(a) == sorted(b) and all(bits_equal(a[k], b[k]) for k in a)


def test_real_checkpoint_layout():
    """With the real config, the table covers exactly the 779 saved tensors of MiniCPM-V 4.6, shapes included."""
    from transformers import MiniCPMV4_6Config, MiniCPMV4_6ForConditionalGeneration

    cfg = reference_config()
    plan, problems = mapping.build_plan(cfg, params_shape(cfg))
    assert not problems, problems
    with torch.device("meta"):
        ref = MiniCPMV4_6ForConditionalGeneration(MiniCPMV4_6Config(**cfg.to_hf_dict()))
    assert sum(p.numel() for p in ref.parameters()) == 1_300_428_016
    saved = {k: tuple(v.shape) for k, v in ref.state_dict().items() if k != "lm_head.weight"}  # tied: not saved
    ours = {e.hf: e.hf_shape for e in plan.entries}
    assert len(saved) == 779
    assert ours == saved
    padding = (cfg.text.padded_vocab_size - cfg.text.vocab_size) * cfg.text.hidden_size  # our zero vocab rows
    assert padding == 98 * 1024
    assert sum(math.prod(leaf.shape) for leaf in plan.leaves.values()) == 1_300_428_016 + padding


def test_target_tree_is_the_full_models_tree():
    """The converter's abstract target equals what MiniCPMV.init creates (same paths, shapes, dtypes)."""
    import flax.linen as nn
    import jax

    from uhd_jax.config import tiny_config
    from uhd_jax.convert.target import params_shape
    from uhd_jax.data.batch import ModelBatch
    from uhd_jax.data.layout import pack_views
    from uhd_jax.model.minicpmv import MiniCPMV

    cfg = tiny_config()
    vision = pack_views([np.zeros((3, 56, 56), np.float32)], patch_size=14, positions_per_side=70)
    vision = jax.tree.map(lambda a: a[None], vision)  # [batch=1, views_per_row=1, ...]
    s = np.zeros((1, 8), np.int32)
    batch = ModelBatch(input_ids=s, attention_mask=s == 0, positions=s, visual_index=s, visual_mask=s != 0,
                       loss_mask=s != 0, vision=vision)
    model_tree = jax.eval_shape(MiniCPMV(cfg).init, jax.random.key(0), batch)["params"]
    unbox = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype), t,  # noqa: E731
                                   is_leaf=lambda x: hasattr(x, "shape"))
    assert unbox(nn.unbox(model_tree)) == unbox(nn.unbox(params_shape(cfg)))


@pytest.fixture(scope="module")
def padded(tmp_path_factory):
    """Tiny models whose vocab (520) is not a multiple of 128, tied (Qwen3.5) and untied (Qwen3): our parameters
    hold 640 vocab rows, 120 of them zero padding."""
    root = tmp_path_factory.mktemp("padded")
    out = {}
    for tied in (True, False):
        cfg = tiny_config(text_model="qwen3_5_text" if tied else "qwen3")
        cfg = cfg.replace(tie_word_embeddings=tied, text=cfg.text.replace(vocab_size=520, tie_word_embeddings=tied))
        model = hf_model(cfg, seed=5)
        out[tied] = cfg, model, save_hf(model, str(root / f"tied_{tied}"))
    return out


def _vocab_params(params, tied):
    """embed_tokens [Vp, D] and (untied) lm_head kernel transposed to [Vp, D]."""
    text = params["text"]
    head = [] if tied else [np.ascontiguousarray(np.asarray(text["lm_head"]["kernel"]).T)]
    return [np.asarray(text["embed_tokens"])] + head


@pytest.mark.parametrize("tied", [True, False])
def test_padded_vocab_conversion(padded, tmp_path, tied):
    """HF -> ours adds zero vocab rows, ours -> HF drops them: bit-exact both ways (load_hf, hf-to-jax, jax-to-hf,
    save_hf); the converted model's real logits are the reference's."""
    from uhd_jax.convert.jax_to_hf import save_hf as save_ours
    from uhd_jax.model.text_model import TextModel

    cfg, model, src = padded[tied]
    assert cfg.text.padded_vocab_size == 640
    a = read_all(src)
    hf_vocab = [a["model.language_model.embed_tokens.weight"]] + ([] if tied else [a["lm_head.weight"]])
    _, params = load_hf(src)
    for ours, hf in zip(_vocab_params(params, tied), hf_vocab, strict=True):
        assert ours.shape == (640, cfg.text.hidden_size) and bits_equal(ours[:520], hf) and not ours[520:].any()
    _, cast = load_hf(src, dtype="bfloat16")  # the casting path of the streaming fill
    for ours, hf in zip(_vocab_params(cast, tied), hf_vocab, strict=True):
        assert bits_equal(ours[:520], hf.astype(jax.numpy.bfloat16)) and not ours[520:].any()

    ckpt, back, saved = str(tmp_path / "ckpt"), str(tmp_path / "back"), str(tmp_path / "saved")
    hf_to_jax(src, ckpt)
    jax_to_hf(ckpt, back)
    save_ours(cfg, params, saved)
    for out in (back, saved):
        b = read_all(out)
        assert sorted(a) == sorted(b) and all(bits_equal(a[k], b[k]) for k in a), out

    ids = np.random.default_rng(0).integers(0, 520, (2, 9))
    with torch.no_grad():
        want = model.lm_head(model.model.language_model(input_ids=torch.tensor(ids)).last_hidden_state).numpy()
    logits, _ = TextModel(cfg.text, attention_impl="xla").apply({"params": params["text"]}, jax.numpy.asarray(ids))
    assert logits.shape[-1] == 640 and rel(logits[..., :520], want) < 1e-4
    assert np.all(np.asarray(logits[..., 520:]) == np.finfo(np.float32).min)


@pytest.mark.parametrize("tied", [True, False])
def test_checkpoint_vocab_padding_adapts(padded, tmp_path, tied):
    """Our checkpoint's stored vocab padding need not be the config's: loading cuts or zero-pads it to the
    config's padded_vocab_size (numpy or straight onto devices through a target), exporting drops it; a
    checkpoint with fewer rows than the vocabulary, or a target of another padding, is an error naming the
    parameter."""
    from uhd_jax.convert.checkpoint import write_checkpoint

    cfg, _, src = padded[tied]
    raw = json.load(open(os.path.join(src, "config.json")))
    a = read_all(src)
    hf_vocab = [a["model.language_model.embed_tokens.weight"]] + ([] if tied else [a["lm_head.weight"]])
    ckpt = str(tmp_path / "ckpt")
    hf_to_jax(src, ckpt)  # stored with the default padding: 640 rows

    def check(params, rows):
        for ours, hf in zip(_vocab_params(params, tied), hf_vocab, strict=True):
            assert ours.shape[0] == rows and bits_equal(ours[:520], hf) and not ours[520:].any()

    for multiple, rows in ((None, 640), (1, 520), (384, 768)):
        loaded_cfg, params = load_checkpoint(ckpt, vocab_pad_multiple=multiple)
        assert loaded_cfg.text.padded_vocab_size == rows
        check(params, rows)
    # onto devices: the target is the model's abstract tree for a 3-way tensor axis (lcm(128, 3) = 384 -> 768)
    big = cfg.replace(text=cfg.text.with_vocab_multiple(3))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), params_shape(big))
    _, on_device = load_checkpoint(ckpt, target, vocab_pad_multiple=big.text.vocab_pad_multiple)
    check(on_device, 768)
    assert isinstance(on_device["text"]["embed_tokens"], jax.Array)
    with pytest.raises(ValueError, match="target `text/embed_tokens`"):
        load_checkpoint(ckpt, target)  # config pads to 640, target has 768

    # a checkpoint stored with 768 rows exports bit-exactly and loads back as 640
    wide = str(tmp_path / "wide")
    write_checkpoint(wide, raw, jax.tree.map(np.asarray, on_device))
    check(load_checkpoint(wide)[1], 640)
    jax_to_hf(wide, str(tmp_path / "back"))
    b = read_all(str(tmp_path / "back"))
    assert sorted(a) == sorted(b) and all(bits_equal(a[k], b[k]) for k in a)

    # fewer rows than the vocabulary: not a padding difference
    _, params = load_checkpoint(ckpt)
    params["text"]["embed_tokens"] = params["text"]["embed_tokens"][:500]
    short = str(tmp_path / "short")
    write_checkpoint(short, raw, params)
    with pytest.raises(ValueError, match="`text/embed_tokens` .* 500 vocabulary entries, fewer than .* 520"):
        load_checkpoint(short)
