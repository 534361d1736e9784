"""Every parameter carries logical axis names that the one rules table knows."""

import flax.linen as nn
import jax
import numpy as np

from uhd_jax.config import tiny_config
from uhd_jax.data.layout import pack_views
from uhd_jax.model.vision import VisionEncoder
from uhd_jax.parallel.axes import LOGICAL_AXIS_RULES


def test_vision_parameters_have_known_logical_axes():
    cfg = tiny_config()
    batch = pack_views([np.zeros((3, 56, 56), np.float32)], patch_size=14, positions_per_side=70)
    boxed = jax.eval_shape(VisionEncoder(cfg).init, jax.random.key(0), batch)["params"]
    known = {name for name, _ in LOGICAL_AXIS_RULES}
    leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves
    for path, leaf in leaves:
        assert isinstance(leaf, nn.Partitioned), f"{jax.tree_util.keystr(path)} has no logical axis names"
        assert len(leaf.names) == len(leaf.value.shape), jax.tree_util.keystr(path)
        assert set(leaf.names) <= known, (jax.tree_util.keystr(path), leaf.names)
    specs = nn.logical_to_mesh(nn.get_partition_spec(boxed), LOGICAL_AXIS_RULES)
    assert jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
