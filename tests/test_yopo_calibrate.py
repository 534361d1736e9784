"""`python -m uhd_jax.yopo calibrate`: the chunk-wise attention mass equals a dense softmax written here; on a
model built so that chosen heads attend only to text (visual keys scored -20, text keys 0) exactly those heads
come out inactive; the command end to end on a tiny checkpoint (npz format, --alpha / --target-heads, --plot,
skipped records, usage errors, no overwrite)."""

import dataclasses
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.cli_utils import make_checkpoint, write_images, write_jsonl
from uhd_jax.compile_counter import count_compilations
from uhd_jax.infer import cli
from uhd_jax.yopo import calibrate
from uhd_jax.yopo.__main__ import main as yopo_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = ["--prompt-buckets", "96,192", "--views-per-row", "3", "--tokens-per-view", "128"]


def _dense_mass(q, k, real, visual):
    """Full [N, S, S] softmax per row in float64, GQA by repeating each KV head over its group of query heads."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    b, s, n, h = q.shape
    k = np.repeat(k, n // k.shape[2], axis=2)  # query head i uses KV head i // (N / K)
    vis_out, txt_out = np.zeros((b, n)), np.zeros((b, n))
    for row in range(b):
        for head in range(n):
            logits = q[row, :, head] @ k[row, :, head].T / np.sqrt(h)  # [S, S]
            allowed = np.tril(np.ones((s, s), bool)) & real[row][None, :]
            logits = np.where(allowed, logits, -np.inf)
            p = np.exp(logits - logits.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            p = p[real[row]]  # real queries only
            vis_out[row, head] = p[:, visual[row] & real[row]].sum()
            txt_out[row, head] = p[:, ~visual[row] & real[row]].sum()
    return vis_out, txt_out


@pytest.mark.parametrize("chunk", [1, 7, 16, 37, 64])
def test_chunked_mass_equals_dense_softmax(chunk):
    """S = 37 (chunks 7 and 16 do not divide it), 6 query heads over 2 KV heads, two rows with padding at the end
    and the image in different places."""
    rs = np.random.RandomState(0)
    b, s, n, kh, h = 2, 37, 6, 2, 8
    q = rs.normal(size=(b, s, n, h)).astype(np.float32) * 2
    k = rs.normal(size=(b, s, kh, h)).astype(np.float32) * 2
    real = np.zeros((b, s), bool)
    real[0, :37], real[1, :30] = True, True
    visual = np.zeros((b, s), bool)
    visual[0, 5:20], visual[1, 3:9], visual[1, 12:25] = True, True, True
    visual[1, 31:] = True  # padding marked visual: must not count
    vis, txt = jax.jit(calibrate.visual_text_mass, static_argnums=4)(q, k, real, visual, chunk)
    want_vis, want_txt = _dense_mass(q, k, real, visual)
    np.testing.assert_allclose(np.asarray(vis), want_vis, rtol=2e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(txt), want_txt, rtol=2e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(vis + txt), real.sum(1)[:, None] * np.ones(n), rtol=1e-5)


@pytest.mark.parametrize("text_model", ["qwen3_5_text", "qwen3"])
def test_full_attention_qk_equals_numpy_projection(text_model):
    """full_attention_qk (the model's modules on one layer's sliced parameters) against q/k written here in numpy:
    input RMSNorm, q_proj (Qwen3.5: the query half of each head's [query, gate]), k_proj, q/k RMSNorm, rotate-half
    rope on the first rotary_dim dims. The last full-attention layer (scan group > 0 in both models)."""
    import jax.numpy as jnp

    from uhd_jax.config import tiny_config
    from uhd_jax.model.text_model import TextModel
    from uhd_jax.yopo.attention_qk import full_attention_layers, full_attention_qk, layer_params

    t = tiny_config(text_model=text_model).text
    params = jax.jit(TextModel(t).init)(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"]
    params = jax.tree.map(lambda a: np.asarray(getattr(a, "value", a), np.float64), params,
                          is_leaf=lambda a: hasattr(a, "value"))
    rs = np.random.RandomState(2)
    params = jax.tree.map(lambda a: a + rs.normal(size=a.shape) * 0.3, params)  # norms' scales not trivial
    layer = full_attention_layers(t)[-1]
    period = 4 if text_model == "qwen3_5_text" else 1
    p = jax.tree.map(lambda a: a[layer // period], params["layers"][f"layer_{layer % period}"])
    b, s, d, n, kh, h = 2, 11, t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim
    x = rs.normal(size=(b, s, d))
    pos = np.stack([np.arange(s), np.arange(s) + 5])

    def rms(v, w):
        y = v / np.sqrt(np.mean(v * v, -1, keepdims=True) + t.rms_norm_eps)
        return y * (1 + w) if t.is_hybrid else y * w

    def rope(v):
        r = t.rotary_dim
        ang = pos[..., None] / t.rope_theta ** (np.arange(0, r, 2) / r)  # [B, S, R/2]
        cos, sin = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
        x1, x2 = v[..., :r // 2], v[..., r // 2:r]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, v[..., r:]], -1)

    hn = rms(x, p["input_layernorm"]["scale"])
    a = p["self_attn"]
    q = (hn @ a["q_proj"]["kernel"]).reshape(b, s, n, -1)[..., :h]
    k = (hn @ a["k_proj"]["kernel"]).reshape(b, s, kh, h)
    want_q, want_k = rope(rms(q, a["q_norm"]["scale"])), rope(rms(k, a["k_norm"]["scale"]))
    f32 = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), params)
    got_q, got_k = jax.jit(lambda pp, xx, ps: full_attention_qk(t, layer_params(pp, t, layer), xx, ps))(
        f32, jnp.asarray(x, jnp.float32), jnp.asarray(pos, jnp.int32))
    np.testing.assert_allclose(np.asarray(got_q), want_q, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(got_k), want_k, rtol=1e-4, atol=1e-4)


def test_mask_threshold_majority_and_target():
    """head_mask: active (r > alpha) on more than `majority` of the samples; alpha_for_target's alpha keeps the
    total closest to K per layer; build_result fills DeltaNet rows and layers before first_layer."""
    r = np.array([[[0.1, 0.5, 0.9]], [[0.2, 0.05, 0.8]], [[0.3, 0.6, 0.01]]])  # 3 samples, 1 layer, 3 heads
    np.testing.assert_array_equal(calibrate.head_mask(r, 0.4, 0.25), [[False, True, True]])  # 1/3, 2/3, 2/3
    np.testing.assert_array_equal(calibrate.head_mask(r, 0.7, 0.0), [[True, True, True]])
    np.testing.assert_array_equal(calibrate.head_mask(r, 0.7, 0.05), [[True, False, False]])  # 0.05 is not > 0.05
    # one sample: target K keeps exactly the K largest
    one = np.array([[[0.4, 0.1, 0.3, 0.2], [0.05, 0.9, 0.7, 0.6]]])
    for k, want in [(1, {(1, 1), (1, 2)}), (2, {(1, 1), (1, 2), (0, 0), (1, 3)}), (4, None)]:
        a = calibrate.alpha_for_target(one, 0.4, k)
        kept = calibrate.head_mask(one, 0.4, a)
        assert kept.sum() == 2 * k
        if want is not None:
            assert set(zip(*np.nonzero(kept))) == want
    res = calibrate.build_result(one, ("linear_attention", "full_attention", "linear_attention", "full_attention"),
                                 [1, 3], alpha=0.35, target_heads=None, majority=0.4, first_layer=2)
    np.testing.assert_array_equal(res.mask, [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]])
    assert np.isnan(res.ratios[[0, 2]]).all() and np.allclose(res.ratios[[1, 3]], one[0])


# ------------------------------------------------------------------------------------------------ a tiny checkpoint
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("calibrate")
    im = write_images(str(d / "img"))
    good = [{"id": "a", "image": im["a"], "conversations": [{"role": "user", "content": "<image>\nWhat is it?"},
                                                             {"role": "assistant", "content": "a cat"}]},
            {"id": "b", "image": im["b"], "conversations": [{"role": "user", "content": "Describe <image> please"}]}]
    bad = [{"id": "bad", "image": im["bad"], "conversations": [{"role": "user", "content": "<image>\nAnd?"}]},
           {"id": "text", "conversations": [{"role": "user", "content": "Hello there"}]}]
    return dict(dir=str(d), ckpt=make_checkpoint(str(d / "ckpt"), seed=3), images=im,
                data=write_jsonl(str(d / "calib.jsonl"), [good[0], bad[0], good[1], bad[1]]),
                one=write_jsonl(str(d / "one.jsonl"), [good[1]]),
                unusable=write_jsonl(str(d / "unusable.jsonl"), bad))


def _designed(params, cfg, positive):
    """Parameters under which the residual stream is the token embeddings up to layer 3's MLP (all o_proj /
    out_proj / down_proj zero but layer 3's MLP); text embeddings are 0 on dim 0 and 1 on dim 1, every visual token
    is e0 + e1 (the merger's last layer: zero kernel, that bias). In each full-attention layer l, head n's query is
    s * x_1 e_j (s = +1 if n is in positive[l], else -1; x normalised by the input RMSNorm), q_norm scale 4 on
    dim j = 8 (past the 4 rotary dims): after the q norm q = 20 sign(s x_1) e_j. Every key is x_0 e_j: 0 for text
    tokens, 4 e_j for visual ones after the k norm. Scores: 0 on text keys, 20 sign(s x_1) on visual keys: heads
    with s x_1 < 0 give visual keys weight e^-20 of a text key's.
    Layer 3's MLP adds -3/64 silu(x_1) x_1 to dim 1 (x normalised), which turns dim 1 negative for every token
    (text -1.9, visual -0.5): layer 7 sees x_1 < 0, so its active heads are those NOT in positive[7]. Reading
    the wrong layer's input (the embeddings, or layer 3's output for layer 3) flips a layer's mask."""
    p = jax.tree.map(np.array, params)
    t, n, kh, h, j = cfg.text, cfg.text.num_attention_heads, cfg.text.num_key_value_heads, cfg.text.head_dim, 8
    emb = p["text"]["embed_tokens"]
    emb[:, 0], emb[:, 1] = 0.0, 1.0
    m = p["vision"]["merger"]["mlp_0"]["linear_2"]
    m["kernel"][:] = 0.0
    m["bias"][:] = 0.0
    m["bias"][:2] = 1.0
    for name, layer in p["text"]["layers"].items():
        layer["mlp"]["down_proj"]["kernel"][:] = 0.0
        if "linear_attn" in layer:
            layer["linear_attn"]["out_proj"]["kernel"][:] = 0.0
            continue
        a = layer["self_attn"]
        a["o_proj"]["kernel"][:] = 0.0
        layer["input_layernorm"]["scale"][:] = 0.0
        qk = a["q_proj"]["kernel"].reshape(-1, t.hidden_size, n, 2 * h)  # [groups, D, heads, (query h, gate h)]
        qk[..., :h] = 0.0
        kk = a["k_proj"]["kernel"].reshape(-1, t.hidden_size, kh, h)
        kk[:] = 0.0
        kk[:, 0, :, j] = 1.0
        a["q_norm"]["scale"][:] = 0.0
        a["q_norm"]["scale"][:, j] = 4.0
        a["k_norm"]["scale"][:] = 0.0
        for group in range(qk.shape[0]):
            layer_index = group * 4 + int(name.split("_")[1])
            for head in range(n):
                qk[group, 1, head, j] = 1.0 if head in positive[layer_index] else -1.0
    mlp = p["text"]["layers"]["layer_3"]["mlp"]  # layer 3 = scan group 0, position 3 of the period
    for name in ("gate_proj", "up_proj"):
        mlp[name]["kernel"][:] = 0.0
        mlp[name]["kernel"][0, 1, 0] = 1.0
    mlp["down_proj"]["kernel"][0, 0, 1] = -3.0 / 64
    p["text"]["layers"]["layer_3"]["post_attention_layernorm"]["scale"][0] = 0.0
    return p


def test_heads_attending_only_to_text_are_inactive(files):
    args = calibrate.parser().parse_args(["--checkpoint", files["ckpt"], "--data", files["data"], "--alpha", "0.01",
                                          "--out", "x.npz", *SIZES, "--query-chunk", "24"])
    setup = cli.load_setup(args)
    assert setup.cfg.text.layer_types == ("linear_attention",) * 3 + ("full_attention",) + \
        ("linear_attention",) * 3 + ("full_attention",)
    setup = dataclasses.replace(setup, params=jax.tree.map(np.asarray, _designed(
        setup.params, setup.cfg, positive={3: {0, 3}, 7: {1, 2}})))
    active = {3: {0, 3}, 7: {0, 3}}  # layer 7's input has x_1 < 0: its query signs are flipped
    m = calibrate.measure(setup, args)
    with count_compilations() as c:  # same buckets again: nothing recompiles (static shapes)
        again = calibrate.measure(setup, args)
    assert c.count == 0 and np.array_equal(again.r, m.r)
    assert m.ids == ["a", "b"] and [i for i, _ in m.skipped] == ["bad", "text"]
    r = m.r  # [2 samples, 2 full layers, 4 heads]
    for j, layer in enumerate((3, 7)):
        for head in range(4):
            if head in active[layer]:
                assert (r[:, j, head] > 1).all(), (layer, head, r[:, j, head])
            else:
                assert (r[:, j, head] < 1e-6).all(), (layer, head, r[:, j, head])
    res = calibrate.build_result(r, setup.cfg.text.layer_types, [3, 7], alpha=0.01, target_heads=None,
                                 majority=0.4, first_layer=2)
    want = np.ones((8, 4), bool)
    want[3], want[7] = [True, False, False, True], [True, False, False, True]
    np.testing.assert_array_equal(res.mask, want)
    # --target-heads 2: 4 of the 8 heads is what the two layers have active; any alpha between keeps exactly them
    res = calibrate.build_result(r, setup.cfg.text.layer_types, [3, 7], alpha=None, target_heads=2,
                                 majority=0.4, first_layer=2)
    np.testing.assert_array_equal(res.mask, want)


# ------------------------------------------------------------------------------------------------ the command
def test_command_end_to_end(files, capsys):
    d = files["dir"]
    out, png = os.path.join(d, "mask.npz"), os.path.join(d, "heat.png")
    base = ["--checkpoint", files["ckpt"], "--data", files["data"], *SIZES]
    assert yopo_main(["calibrate", *base, "--alpha", "0", "--first-layer", "0", "--out", out, "--plot", png]) == 0
    cap = capsys.readouterr()
    assert "4/4 requests" in cap.err and "skipped 2 of 4 records" in cap.err
    assert "'bad': " in cap.err and "ImageLoadError" in cap.err and "'text': the prompt has no image" in cap.err
    assert "full attention" in cap.out and "kept 8 of 8 heads" in cap.out
    z = np.load(out)
    assert sorted(z.files) == ["alpha", "first_layer", "majority", "mask", "ratios"]
    assert z["mask"].shape == (8, 4) and z["mask"].dtype == bool and z["mask"].all()  # every r > 0
    assert z["ratios"].shape == (8, 4) and z["ratios"].dtype == np.float64
    assert np.isnan(z["ratios"][[0, 1, 2, 4, 5, 6]]).all() and (z["ratios"][[3, 7]] > 0).all()
    assert float(z["alpha"]) == 0 and float(z["majority"]) == 0.4 and int(z["first_layer"]) == 0
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    # an existing --out is refused (usage error), --overwrite replaces it; alpha above every r keeps only the
    # layers before --first-layer
    with pytest.raises(SystemExit) as e:
        calibrate.main([*base, "--alpha", "1e9", "--first-layer", "4", "--out", out])
    assert e.value.code == 2 and "exists (pass --overwrite" in capsys.readouterr().err
    assert calibrate.main([*base, "--alpha", "1e9", "--first-layer", "4", "--out", out, "--overwrite"]) == 0
    z2 = np.load(out)
    assert z2["mask"][3].all() and not z2["mask"][7].any() and int(z2["first_layer"]) == 4
    np.testing.assert_allclose(z2["ratios"], z["ratios"], rtol=1e-6)  # the same measurement
    capsys.readouterr()

    # one sample: --target-heads K keeps the K * 2 heads of largest r, and prints the alpha it chose
    out1 = os.path.join(d, "one.npz")
    assert calibrate.main(["--checkpoint", files["ckpt"], "--data", files["one"], *SIZES, "--target-heads", "1.5",
                           "--first-layer", "0", "--out", out1]) == 0
    err = capsys.readouterr().err
    z1 = np.load(out1)
    assert f"alpha {float(z1['alpha']):.9g}" in err
    r = z1["ratios"][[3, 7]].ravel()
    top3 = set(np.argsort(r)[-3:])
    assert set(np.flatnonzero(z1["mask"][[3, 7]].ravel())) == top3

    # nothing usable: a clear error
    out0 = os.path.join(d, "none.npz")
    assert calibrate.main(["--checkpoint", files["ckpt"], "--data", files["unusable"], *SIZES, "--alpha", "1",
                           "--out", out0]) == 1
    assert "error: no usable calibration sample" in capsys.readouterr().err and not os.path.exists(out0)


@pytest.mark.parametrize("extra, needle", [
    (["--alpha", "-1"], "argument --alpha: must be a finite number >= 0"),
    (["--alpha", "1", "--target-heads", "2"], "not allowed with argument"),
    ([], "one of the arguments --alpha --target-heads is required"),
    (["--target-heads", "0"], "argument --target-heads: must be a finite number > 0"),
    (["--alpha", "1", "--majority", "1"], "argument --majority: must be in [0, 1)"),
    (["--alpha", "1", "--first-layer", "-1"], "argument --first-layer: must be >= 0"),
    (["--alpha", "1", "--query-chunk", "0"], "argument --query-chunk: must be >= 1"),
    (["--alpha", "1", "--first-layer", "9"], "--first-layer 9 is past the model's 8 layers"),
    (["--target-heads", "5"], "--target-heads 5 is more than the 4 heads"),
    (["--target-heads", "2", "--first-layer", "8"], "no full-attention layer at or after --first-layer 8"),
])
def test_bad_values_are_usage_errors(files, capsys, extra, needle):
    argv = ["--checkpoint", files["ckpt"], "--data", files["data"], "--out",
            os.path.join(files["dir"], "never.npz"), *extra]
    with pytest.raises(SystemExit) as e:
        calibrate.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "usage: python -m uhd_jax.yopo calibrate" in err and "Traceback" not in err


def test_usage_errors_from_the_command_line(files, tmp_path):
    """As a subprocess: exit code 2 and no traceback for a bad value, a wrong --out suffix, a missing --data."""
    base = [sys.executable, "-m", "uhd_jax.yopo", "calibrate", "--checkpoint", files["ckpt"]]
    for argv, needle in [(["--data", files["data"], "--alpha", "x", "--out", "m.npz"], "--alpha: invalid"),
                         (["--data", files["data"], "--alpha", "1", "--out", "m.txt"], "must end in .npz"),
                         (["--data", str(tmp_path / "no.jsonl"), "--alpha", "1", "--out", "m.npz"], "--data: ")]:
        r = subprocess.run(base + argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "uhd_jax.yopo", "prune"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "unknown command 'prune'" in r.stderr
