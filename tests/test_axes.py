"""Every parameter carries logical axis names that the one rules table knows, and the real model's parameters
shard the way tensor/fsdp parallelism needs on realistic meshes."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from uhd_jax.config import reference_config, tiny_config
from uhd_jax.data.synthetic import random_batch
from uhd_jax.model.minicpmv import MiniCPMV
from uhd_jax.parallel.axes import LOGICAL_AXIS_RULES, fit_spec, mesh_axes_of
from uhd_jax.parallel.mesh import make_mesh, param_shardings


def _boxed(cfg):
    batch = random_batch(cfg, batch_size=1, seq_len=64, views=[[(4, 4)]], views_per_row=1, tokens_per_view=16)
    return jax.eval_shape(MiniCPMV(cfg).init, jax.random.key(0), batch)["params"]  # shapes only, any size


def _leaves(boxed):
    return jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def test_every_parameter_has_known_logical_axes():
    known = {name for name, _ in LOGICAL_AXIS_RULES}
    leaves = _leaves(_boxed(tiny_config()))
    assert leaves
    for path, leaf in leaves:
        assert isinstance(leaf, nn.Partitioned), f"{jax.tree_util.keystr(path)} has no logical axis names"
        assert len(leaf.names) == len(leaf.value.shape), jax.tree_util.keystr(path)
        assert set(leaf.names) <= known, (jax.tree_util.keystr(path), leaf.names)


def test_shardings_on_a_real_mesh_cover_every_parameter():
    boxed = _boxed(tiny_config())
    mesh = make_mesh({"fsdp": -1})
    sh = param_shardings(boxed, mesh)
    assert jax.tree.structure(sh) == jax.tree.structure(nn.unbox(boxed))
    assert all(isinstance(s, jax.sharding.NamedSharding) and s.mesh == mesh for s in jax.tree.leaves(sh))


@pytest.mark.parametrize("sizes", [{"fsdp": 8, "tensor": 4}, {"data": 2, "fsdp": 4, "tensor": 2},
                                   {"fsdp": 16, "tensor": 8}])
def test_real_model_shards_on_realistic_meshes(sizes):
    """MiniCPM-V 4.6 at full size (abstract shapes): every large parameter is split over fsdp, the padded
    vocabulary splits over tensor, and every tensor split of a projection keeps heads whole."""
    cfg = reference_config()
    cfg = cfg.replace(text=cfg.text.with_vocab_multiple(sizes["tensor"]))
    unsplit = []
    for path, leaf in _leaves(_boxed(cfg)):
        name = jax.tree_util.keystr(path)
        shape = leaf.value.shape
        spec = tuple(fit_spec(shape, mesh_axes_of(leaf.names), sizes))
        wanted = mesh_axes_of(leaf.names)
        lost = [d for d, (w, g) in enumerate(zip(wanted, spec)) if w is not None and g is None]
        if np.prod(shape) >= 1 << 20 and lost:
            unsplit.append((name, shape, leaf.names, spec))
        if "vocab" in leaf.names:
            assert spec[leaf.names.index("vocab")] == "tensor", (name, shape)
    assert not unsplit, unsplit
    t = sizes["tensor"]
    text = cfg.text
    assert text.linear_num_key_heads % t == 0 and text.linear_num_value_heads % t == 0
    assert text.num_attention_heads % t == 0 and cfg.vision.num_attention_heads % t == 0
