"""The optimizer (uhd_jax.train.optimizer): schedules, AdamW equivalence, no-decay, lr multipliers, freezing (no
state, clipping over the trainable gradients only), and pattern errors. Small trees plus the tiny model's real
parameter paths (shapes only: nothing is compiled)."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from uhd_jax.config import tiny_config
from uhd_jax.data.synthetic import random_batch
from uhd_jax.model.minicpmv import MiniCPMV
from uhd_jax.parallel.mesh import make_mesh
from uhd_jax.train.optimizer import (DEFAULT_NO_DECAY, FREEZE_LLM, FREEZE_VISION, frozen_mask, make_optimizer,
                                     make_schedule, param_paths)
from uhd_jax.train.step import state_shardings


def toy_params(seed=0):
    r = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(r.standard_normal(s), jnp.float32)
    return {"vision": {"proj": {"kernel": f(4, 3), "bias": f(3)}, "norm": {"scale": f(3)}},
            "text": {"embed_tokens": f(6, 3), "mlp": {"kernel": f(3, 5)}, "norm": {"scale": f(5)}}}


def toy_grads(seed=1):
    return jax.tree.map(lambda a: a * 0.3, toy_params(seed))


def run(opt, params, grads_seq):
    state = opt.init(params)
    out = []
    for g in grads_seq:
        u, state = opt.update(g, state, params)
        params = optax.apply_updates(params, u)
        out.append(u)
    return params, out


def tree_max_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def model_shapes(text_model):
    """The tiny model's boxed parameter tree (ShapeDtypeStructs), and (model, batch) for state_shardings."""
    cfg = tiny_config(text_model=text_model)
    batch = random_batch(cfg, batch_size=2, seq_len=64, views=[[(8, 8)]], views_per_row=1, tokens_per_view=64)
    model = MiniCPMV(cfg)
    boxed = jax.eval_shape(lambda r: model.init(r, batch)["params"], jax.random.key(0))
    return boxed, model, batch


def nbytes(tree):
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------------------------- schedules


def test_schedules():
    lr = 1e-3
    cos = make_schedule(lr, warmup_steps=10, total_steps=110, end_lr_ratio=0.1)  # None + total_steps: cosine
    assert float(cos(0)) == 0.0
    np.testing.assert_allclose(float(cos(5)), 0.5 * lr, rtol=1e-6)
    np.testing.assert_allclose(float(cos(10)), lr, rtol=1e-6)
    np.testing.assert_allclose(float(cos(60)), lr * (0.1 + 0.9 * 0.5), rtol=1e-6)  # half-way down the cosine
    np.testing.assert_allclose(float(cos(110)), 0.1 * lr, rtol=1e-6)
    np.testing.assert_allclose(float(cos(500)), 0.1 * lr, rtol=1e-6)  # constant after total_steps

    lin = make_schedule(lr, schedule="linear", warmup_steps=10, total_steps=110, end_lr_ratio=0.0)
    np.testing.assert_allclose([float(lin(s)) for s in (0, 5, 10, 35, 60, 110, 200)],
                               [0, 0.5 * lr, lr, 0.75 * lr, 0.5 * lr, 0, 0], rtol=1e-6, atol=1e-12)
    lin0 = make_schedule(lr, schedule="linear", total_steps=100, end_lr_ratio=0.5)  # no warm-up: starts at peak
    np.testing.assert_allclose([float(lin0(s)) for s in (0, 50, 100)], [lr, 0.75 * lr, 0.5 * lr], rtol=1e-6)

    const = make_schedule(lr)  # no total_steps: constant
    assert float(const(0)) == np.float32(lr) and float(const(10**6)) == np.float32(lr)
    warm = make_schedule(lr, warmup_steps=4)
    np.testing.assert_allclose([float(warm(s)) for s in (0, 2, 4, 99)], [0, 0.5 * lr, lr, lr], rtol=1e-6)

    with pytest.raises(ValueError, match="total_steps is None"):
        make_schedule(lr, schedule="cosine")
    with pytest.raises(ValueError, match=r"total_steps \(10\) must be an integer > warmup_steps \(10\)"):
        make_schedule(lr, warmup_steps=10, total_steps=10)
    with pytest.raises(ValueError, match="'cosin' is not one of"):
        make_schedule(lr, schedule="cosin", total_steps=10)


# ---------------------------------------------------------------------------------------------- AdamW


def test_plain_adamw_equivalence():
    """No freezing or multipliers: exactly optax's clip + AdamW with the no-decay mask, bit for bit."""
    kw = dict(b1=0.9, b2=0.95, eps=1e-8)
    sched = make_schedule(1e-2, warmup_steps=2, total_steps=10)
    mask = jax.tree.map(lambda _: True, toy_params())
    for grp in ("vision", "text"):
        mask[grp]["norm"]["scale"] = False
    mask["vision"]["proj"]["bias"] = False
    mask["text"]["embed_tokens"] = False
    ref = optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(sched, weight_decay=0.1, mask=mask, **kw))
    ours = make_optimizer(1e-2, warmup_steps=2, total_steps=10, weight_decay=0.1, clip_norm=0.5, **kw)
    grads = [toy_grads(s) for s in range(1, 5)]
    p_ref, u_ref = run(ref, toy_params(), grads)
    p_ours, u_ours = run(ours, toy_params(), grads)
    assert tree_max_diff(p_ref, p_ours) == 0.0
    assert all(tree_max_diff(a, b) == 0.0 for a, b in zip(u_ref, u_ours))


def test_default_no_decay_on_the_model_tree():
    """Which of the real parameters DEFAULT_NO_DECAY exempts (both LLMs), and that decay acts exactly there: with
    zero gradients AdamW's update is -lr * wd * p on decayed parameters and 0 elsewhere."""
    import re

    for text_model in ("qwen3", "qwen3_5_text"):
        boxed, _, _ = model_shapes(text_model)
        paths = param_paths(boxed)
        exempt = [p for p in paths if any(re.fullmatch(r, p) for r in DEFAULT_NO_DECAY)]
        leaf = lambda p: p.split("/")[-1]
        assert {leaf(p) for p in exempt} <= {"bias", "scale", "A_log", "dt_bias", "embed_tokens",
                                             "position_embedding"}
        assert "text/embed_tokens" in exempt and "vision/vision_tower/position_embedding" in exempt
        assert all(leaf(p) == "kernel" or leaf(p) == "conv_kernel" for p in paths if p not in exempt), \
            [p for p in paths if p not in exempt and leaf(p) not in ("kernel", "conv_kernel")]
        if text_model == "qwen3_5_text":
            assert any(p.endswith("/A_log") for p in exempt) and any(p.endswith("/dt_bias") for p in exempt)

    params = toy_params()
    opt = make_optimizer(0.1, weight_decay=0.5, clip_norm=None)
    u, _ = opt.update(jax.tree.map(jnp.zeros_like, params), opt.init(params), params)
    np.testing.assert_allclose(u["text"]["mlp"]["kernel"], -0.1 * 0.5 * params["text"]["mlp"]["kernel"], rtol=1e-6)
    np.testing.assert_allclose(u["vision"]["proj"]["kernel"], -0.05 * params["vision"]["proj"]["kernel"], rtol=1e-6)
    for a in (u["text"]["embed_tokens"], u["text"]["norm"]["scale"], u["vision"]["proj"]["bias"],
              u["vision"]["norm"]["scale"]):
        assert float(jnp.max(jnp.abs(a))) == 0.0


def test_lr_multipliers():
    """A group's updates (Adam step and decay) are its factor times the plain optimizer's; first match wins.
    Without clipping Adam is elementwise, so the reference is AdamW with lr x factor on each group alone."""
    sched = make_schedule(1e-2, warmup_steps=1, total_steps=8)
    opt = make_optimizer(1e-2, warmup_steps=1, total_steps=8, weight_decay=0.1, clip_norm=None,
                         lr_multipliers=(("vision/proj/.*", 0.1), ("vision/.*", 3.0)))
    grads = [toy_grads(s) for s in range(1, 5)]
    _, updates = run(opt, toy_params(), grads)
    for sub, factor in ((("vision", "proj"), 0.1), (("vision", "norm"), 3.0), (("text",), 1.0)):
        pick = lambda t: t[sub[0]] if len(sub) == 1 else t[sub[0]][sub[1]]
        wd_mask = jax.tree_util.tree_map_with_path(
            lambda path, _: path[-1].key == "kernel", pick(toy_params()))  # only kernels decay in these groups
        ref = optax.adamw(lambda s, f=factor: f * sched(s), b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
                          mask=wd_mask)
        _, u_ref = run(ref, pick(toy_params()), [pick(g) for g in grads])
        for u, r in zip(updates, u_ref):  # updates, not parameters: p + u rounds at the parameters' scale
            scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(r))
            assert tree_max_diff(pick(u), r) <= 1e-6 * scale, (sub, tree_max_diff(pick(u), r), scale)


# ---------------------------------------------------------------------------------------------- freezing


@pytest.mark.parametrize("text_model", ["qwen3", "qwen3_5_text"])
def test_frozen_parameters_have_no_state(text_model):
    """On the tiny model's boxed tree (as state_shardings builds it): AdamW's state is exactly two moments of the
    trainable parameters plus two int32 counters; frozen parameters have nothing (MaskedNode) and the moments
    keep their parameters' logical names."""
    boxed, model, batch = model_shapes(text_model)
    plain = nn.unbox(boxed)
    total = nbytes(plain)
    vision, text = nbytes(plain["vision"]), nbytes(plain["text"])
    counters = 2 * 4  # scale_by_adam and scale_by_schedule step counts
    assert nbytes(jax.eval_shape(make_optimizer(1e-4).init, boxed)) == 2 * total + counters
    for frozen, trainable in ((FREEZE_VISION, text), (FREEZE_LLM, vision)):
        state = jax.eval_shape(make_optimizer(1e-4, weight_decay=0.1, frozen=frozen).init, boxed)
        assert nbytes(state) == 2 * trainable + counters, (frozen, nbytes(state), trainable)
        mu = state.inner_states["train"].inner_state[1].mu
        frozen_part = frozen[0].split("/")[0]
        assert isinstance(mu[frozen_part], optax.MaskedNode) or not jax.tree.leaves(mu[frozen_part])
        other = "text" if frozen_part == "vision" else "vision"
        assert all(isinstance(x, nn.Partitioned) for x in
                   jax.tree.leaves(mu[other], is_leaf=lambda x: isinstance(x, nn.Partitioned)))
    # the train step's sharding derivation works on it (boxes of frozen parameters are gone, not half-masked)
    sh = state_shardings(model, make_optimizer(1e-4, frozen=FREEZE_VISION), batch, make_mesh({"data": 1}))
    assert len(jax.tree.leaves(sh.opt_state)) == 2 * len(jax.tree.leaves(plain["text"])) + 2


def test_frozen_updates_and_clipping_over_trainable_only():
    """Frozen parameters get zero updates whatever their gradients; clipping sees only the trainable gradients:
    with huge frozen gradients the trainable updates equal those of the same optimizer on the trainable subtree
    alone (whose global norm is above clip_norm, so clipping is active)."""
    params = toy_params()
    grads = []
    for s in range(1, 4):
        g = toy_grads(s)
        g["vision"] = jax.tree.map(lambda a: a * 1e6, g["vision"])
        grads.append(g)
    assert float(optax.tree.norm(grads[0]["text"])) > 0.5
    kw = dict(warmup_steps=1, total_steps=10, weight_decay=0.1, clip_norm=0.5)
    p, updates = run(make_optimizer(1e-2, frozen=("vision/.*",), **kw), params, grads)
    assert all(float(jnp.max(jnp.abs(x))) == 0.0 for u in updates for x in jax.tree.leaves(u["vision"]))
    p_ref, _ = run(make_optimizer(1e-2, **kw), toy_params()["text"], [g["text"] for g in grads])
    assert tree_max_diff(p["text"], p_ref) == 0.0
    assert tree_max_diff(p["vision"], params["vision"]) == 0.0


def test_frozen_mask_paths():
    boxed, _, _ = model_shapes("qwen3")
    for frozen, part in ((FREEZE_VISION, "vision"), (FREEZE_LLM, "text")):
        m = frozen_mask(nn.unbox(boxed), frozen)
        assert all(jax.tree.leaves(m[part])) and not any(jax.tree.leaves(m["text" if part == "vision" else
                                                                                "vision"]))
    assert not any(jax.tree.leaves(frozen_mask(nn.unbox(boxed), ())))


# ---------------------------------------------------------------------------------------------- errors


def test_pattern_errors():
    params = toy_params()
    with pytest.raises(ValueError, match=r"frozen: pattern\(s\) 'visoin/\.\*' match no parameter"):
        make_optimizer(1e-3, frozen=("visoin/.*",)).init(params)
    with pytest.raises(ValueError, match=r"lr_multipliers: pattern\(s\) 'proj/.*' match no parameter"):
        make_optimizer(1e-3, lr_multipliers=(("proj/.*", 0.1),)).init(params)  # fullmatch: not a substring search
    with pytest.raises(ValueError, match="'vision/proj/.*' .every parameter it matches is taken by an earlier"):
        make_optimizer(1e-3, lr_multipliers=(("vision/.*", 0.1), ("vision/proj/.*", 2.0))).init(params)
    with pytest.raises(ValueError, match=r"no_decay: pattern\(s\) '.*/weight' match no parameter"):
        make_optimizer(1e-3, no_decay=(".*/bias", ".*/weight")).init(params)
    with pytest.raises(ValueError, match="freezes every parameter"):
        make_optimizer(1e-3, frozen=("vision/.*", "text/.*")).init(params)
    with pytest.raises(ValueError, match=r"frozen: invalid regular expression 'vision/\('"):
        make_optimizer(1e-3, frozen=("vision/(",))
    with pytest.raises(TypeError, match="sequence of patterns, got the string 'vision/.*'"):
        make_optimizer(1e-3, frozen="vision/.*")
    with pytest.raises(TypeError, match=r"lr_multipliers must be \(\(pattern, factor\), ...\)"):
        make_optimizer(1e-3, lr_multipliers=("vision/.*", 0.1))  # one pair without the outer tuple
    with pytest.raises(ValueError, match="factor 0.0 of 'vision/.*' must be > 0"):
        make_optimizer(1e-3, lr_multipliers=(("vision/.*", 0.0),))
    with pytest.raises(ValueError, match="frozen: pattern"):
        frozen_mask(params, ("vision",))
    # the boxed path (state_shardings' eval_shape) raises the same way
    boxed, _, _ = model_shapes("qwen3")
    with pytest.raises(ValueError, match="'llm/.*' match no parameter"):
        jax.eval_shape(make_optimizer(1e-3, frozen=("llm/.*",)).init, boxed)
