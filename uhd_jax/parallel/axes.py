"""Logical axis names and the one table that maps them to mesh axes.

Layers name axes (`embed`, `mlp`, `heads`, ...), never mesh axes; `LOGICAL_AXIS_RULES` decides where
each goes on the (`data`, `fsdp`, `tensor`) mesh. Change sharding here, not in the layers.
"""

import flax.linen as nn

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_AXIS_RULES = (
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_views", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    # parameters
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("patch", None),
    ("positions", None),
    ("norm", None),
    ("conv", None),
    ("layers", None),
)


def with_axes(init, axes: tuple):
    """Wraps a parameter initializer so the parameter carries logical axis names."""
    return nn.with_logical_partitioning(init, axes)
