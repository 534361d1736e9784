"""Vision path against transformers' MiniCPMV4_6Model.get_image_features (CPU, float32, tiny random configs)."""

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from tests.vision_ref import hf_model, navit_views, vision_params
from uhd_jax.compile_counter import count_compilations
from uhd_jax.config import tiny_config
from uhd_jax.data.layout import block_order, merge_levels, pack_views
from uhd_jax.model.vision import VisionEncoder

PATCH = 14
SCALE = 112  # slice resolution for tests: 8x8-patch views keep the reference fast on CPU
# (height, width): single view, 3x3 grid, 1x9 strip, 9x1 tall, and assorted sizes / aspect ratios
IMAGE_SIZES = [(112, 112), (336, 336), (112, 1008), (1008, 112), (900, 150), (200, 300), (150, 600),
               (257, 389), (60, 40), (500, 90)]


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def reference_views(sizes, mode, seed=0, max_slice_nums=9):
    from transformers import MiniCPMV4_6ImageProcessorPil

    proc = MiniCPMV4_6ImageProcessorPil(scale_resolution=SCALE, max_slice_nums=max_slice_nums)
    rng = np.random.default_rng(seed)
    out = []
    for h, w in sizes:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        f = proc(img, return_tensors="np", downsample_mode=mode)
        out.append((f["pixel_values"], f["target_sizes"], f["grids"][0]))
    return out


def run_reference(model, pv, ts, mode):
    vt = model.model.vision_tower
    caught = {}
    hooks = [vt.post_layernorm.register_forward_hook(lambda m, i, o: caught.__setitem__("post_layernorm", o)),
             vt.encoder.layers[-1].register_forward_hook(lambda m, i, o: caught.__setitem__("last_hidden", o))]
    if mode == "16x":
        hooks.append(vt.vit_merger.register_forward_hook(lambda m, i, o: caught.__setitem__("after_window_merger", o)))
    with torch.no_grad():
        feats = model.model.get_image_features(torch.tensor(pv), torch.tensor(ts), downsample_mode=mode)
    for h in hooks:
        h.remove()
    inter = {k: v[0].numpy() for k, v in caught.items()}
    return [t.numpy() for t in feats.pooler_output], inter


def split_rows(x, counts):
    """[sum(counts), D] -> list of per-view arrays."""
    return np.split(x, np.cumsum(counts)[:-1])


@pytest.mark.parametrize("mode,insert_layer_id", [("16x", 0), ("16x", 1), ("16x", 3), ("4x", 1), ("4x", 2)])
def test_matches_reference(mode, insert_layer_id):
    cfg = tiny_config(insert_layer_id=insert_layer_id, downsample_mode=mode)
    model = hf_model(cfg, seed=insert_layer_id)
    params = vision_params(model, cfg)
    levels = merge_levels(mode)

    views, ref_tokens, ref_inter, grids = [], [], {}, []
    for pv, ts, grid in reference_views(IMAGE_SIZES, mode, seed=insert_layer_id):
        toks, inter = run_reference(model, pv, ts, mode)
        views += navit_views(pv, ts, PATCH)
        ref_tokens += toks
        grids += [tuple(int(v) for v in g) for g in ts]
        for k, v in inter.items():
            counts = [h * w // (4 if (k == "after_window_merger" or mode == "16x") else 1) for h, w in grids[-len(ts):]]
            ref_inter.setdefault(k, []).extend(split_rows(v, counts))
    assert len(views) >= 30 and any(g == (8, 8) for g in grids)

    batch = pack_views(views, patch_size=PATCH, positions_per_side=cfg.vision.positions_per_side, mode=mode)
    assert (batch.num_tokens < batch.tokens_per_view).any(), "some views must be padded"
    enc = VisionEncoder(cfg, attn_impl="xla")
    tokens, valid, out = jax.jit(enc.apply)({"params": params}, batch)
    tokens, valid = np.asarray(tokens), np.asarray(valid)

    for i, (ref, (h, w)) in enumerate(zip(ref_tokens, grids)):
        n = ref.shape[0]
        assert n == (h * w) >> (2 * levels)
        assert valid[i].sum() == n and valid[i, :n].all()
        assert rel(tokens[i, :n], ref) < 1e-4, (i, (h, w), rel(tokens[i, :n], ref))
        assert not tokens[i, n:].any()

    # Intermediates, mapped from our block order back to the reference's row-major order.
    if mode == "16x" and insert_layer_id == cfg.vision.num_hidden_layers - 1:
        del ref_inter["last_hidden"]  # the hooked last layer is the insert layer: its output precedes the merger
    for key in ref_inter:
        ours = np.asarray(out[key])
        for i, (ref, (h, w)) in enumerate(zip(ref_inter[key], grids)):
            if key == "after_window_merger" or mode == "16x":
                perm = block_order(h // 2, w // 2, levels - 1)
            else:
                perm = block_order(h, w, levels)
            got = ours[i, : len(perm)]
            assert rel(got, ref[perm]) < 1e-4, (key, i, rel(got, ref[perm]))


def test_padding_does_not_leak():
    cfg = tiny_config(insert_layer_id=1)
    model = hf_model(cfg)
    params = vision_params(model, cfg)
    views = []
    for pv, ts, _ in reference_views([(200, 300), (60, 40), (336, 336)], "16x"):
        views += navit_views(pv, ts, PATCH)
    batch = pack_views(views, patch_size=PATCH, positions_per_side=70, mode="16x", tokens_per_view=128,
                       num_views=len(views) + 2)
    f = jax.jit(VisionEncoder(cfg, attn_impl="xla").apply)
    tokens, valid, _ = f({"params": params}, batch)

    rng = np.random.default_rng(1)
    pad = np.arange(batch.tokens_per_view)[None, :] >= batch.num_tokens[:, None]
    noisy = batch.replace(
        patches=np.where(pad[..., None], rng.normal(size=batch.patches.shape) * 100, batch.patches).astype(np.float32),
        pos_ids=np.where(pad, rng.integers(0, 4900, batch.pos_ids.shape), batch.pos_ids).astype(np.int32))
    tokens2, valid2, _ = f({"params": params}, noisy)
    np.testing.assert_array_equal(np.asarray(valid), np.asarray(valid2))
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(tokens2))
    assert np.isfinite(np.asarray(tokens)).all()
    # and padding really was changed
    assert not np.array_equal(noisy.patches, batch.patches)


def test_no_recompile_for_same_buckets():
    cfg = tiny_config(insert_layer_id=1)
    enc = VisionEncoder(cfg, attn_impl="xla")

    def batch_of(sizes, seed):
        views = []
        for pv, ts, _ in reference_views(sizes, "16x", seed=seed):
            views += navit_views(pv, ts, PATCH)
        return pack_views(views, patch_size=PATCH, positions_per_side=70, mode="16x", tokens_per_view=128,
                          num_views=12)

    b1 = batch_of([(336, 336)], 0)  # 10 views
    b2 = batch_of([(200, 300), (60, 40)], 1)  # different grids, same buckets
    params = enc.init(jax.random.key(0), b1)["params"]
    f = jax.jit(enc.apply)
    with count_compilations() as c:
        jax.block_until_ready(f({"params": params}, b1))
    assert c.count >= 1
    with count_compilations() as c:
        jax.block_until_ready(f({"params": params}, b2))
        jax.block_until_ready(f({"params": params}, b1))
    assert c.count == 0


def test_block_order_folds_to_row_major():
    """Folding groups of 4 `levels` times must give the reference's row-major order of the merged grid."""
    for levels in (1, 2, 3):
        b = 1 << levels
        for h, w in [(b, b), (2 * b, 3 * b), (5 * b, b)]:
            grid = np.arange(h * w).reshape(h, w)
            x = grid.reshape(-1)[block_order(h, w, levels)]
            for lv in range(levels):
                gh, gw = h >> lv, w >> lv
                # reference merge of the current row-major grid
                ref = grid.reshape(gh // 2, 2, gw // 2, 2).transpose(0, 2, 1, 3).reshape(-1, 4)
                ours = x.reshape(-1, 4)
                # our groups hold the same 2x2 windows as the reference, in block order of the merged grid
                perm = block_order(gh // 2, gw // 2, levels - lv - 1)
                np.testing.assert_array_equal(ours, ref[perm])
                grid = ref[:, 0].reshape(gh // 2, gw // 2)  # represent each window by its first element
                x = ours[:, 0]
            np.testing.assert_array_equal(x, grid.reshape(-1))


def test_layout_rejects_bad_views():
    with pytest.raises(ValueError, match="view 1"):
        pack_views([np.zeros((3, 56, 56)), np.zeros((3, 42, 56))], patch_size=14, positions_per_side=70, mode="16x")
    with pytest.raises(ValueError, match="tokens_per_view"):
        pack_views([np.zeros((3, 112, 112))], patch_size=14, positions_per_side=70, tokens_per_view=32)
    with pytest.raises(ValueError, match="num_views"):
        pack_views([np.zeros((3, 56, 56))] * 3, patch_size=14, positions_per_side=70, num_views=2)


@pytest.mark.cpu  # XLA:GPU cost analysis does not see cuBLAS/cuDNN calls
@pytest.mark.parametrize("mode", ["16x", "4x"])
def test_flop_count_matches_xla_cost_analysis(mode):
    """The project's FLOPs formula agrees with XLA's count of the compiled program (unrolled, einsum attention)."""
    from uhd_jax.config import VisionConfig
    from uhd_jax.model.flops import vision_flops

    cfg = tiny_config(insert_layer_id=1).replace(vision=VisionConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, insert_layer_id=1))
    batch = pack_views([np.zeros((3, 224, 224), np.float32)] * 2, patch_size=PATCH, positions_per_side=70, mode=mode)
    enc = VisionEncoder(cfg, attn_impl="xla", unroll=True)
    params = jax.eval_shape(enc.init, jax.random.key(0), batch)["params"]
    cost = jax.jit(enc.apply).lower({"params": params}, batch).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    ours = vision_flops(cfg, [batch.tokens_per_view] * 2, mode)["total"]
    assert 1.0 <= cost["flops"] / ours < 1.04, (cost["flops"], ours)


@pytest.mark.parametrize("mode", ["16x", "4x"])
def test_gradients_match_reference(mode):
    """d(sum(tokens * R))/d(params) against torch autograd, every vision parameter (mapped by the converter)."""
    from uhd_jax.convert.hf_to_jax import convert_state_dict

    cfg = tiny_config(insert_layer_id=1, downsample_mode=mode)
    model = hf_model(cfg, seed=5)
    params = vision_params(model, cfg)
    (pv, ts, _), = reference_views([(200, 300)], mode, seed=5)
    feats = model.model.get_image_features(torch.tensor(pv), torch.tensor(ts), downsample_mode=mode).pooler_output
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal(tuple(f.shape)).astype(np.float32) for f in feats]
    torch_loss = sum((f * torch.tensor(w)).sum() for f, w in zip(feats, weights))
    model.zero_grad()
    torch_loss.backward()
    ref_grads = convert_state_dict(cfg, {k: np.zeros(tuple(p.shape), np.float32) if p.grad is None else p.grad.numpy()
                                         for k, p in model.named_parameters() if "vision" in k or "merger" in k},
                                   parts=("vision",))  # 4x mode leaves the window merger unused: zero gradient

    batch = pack_views(navit_views(pv, ts, PATCH), patch_size=PATCH, positions_per_side=70, mode=mode,
                       tokens_per_view=256, num_views=len(weights) + 1)
    enc = VisionEncoder(cfg, attn_impl="xla", remat="full")
    w = np.zeros((batch.patches.shape[0], batch.out_tokens_per_view, cfg.text.hidden_size), np.float32)
    for i, wi in enumerate(weights):
        w[i, : wi.shape[0]] = wi

    def loss(p):
        tokens, _, _ = enc.apply({"params": p}, batch)
        return (tokens * w).sum()

    grads = jax.jit(jax.grad(loss))(params)
    flat_ref = dict(jax.tree_util.tree_leaves_with_path(ref_grads))
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    assert len(leaves) == len(flat_ref) > 20
    for path, g in leaves:
        name = jax.tree_util.keystr(path)
        if "k_proj']['bias" in name:  # softmax is invariant to a key bias: its true gradient is 0
            assert np.abs(np.asarray(g)).max() < 1e-5 and np.abs(flat_ref[path]).max() < 1e-5, name
            continue
        assert rel(g, flat_ref[path]) < 1e-4, (name, rel(g, flat_ref[path]))
