"""Logical axis names and the one table that maps them to mesh axes.

Layers name axes (`embed`, `mlp`, `heads`, ...), never mesh axes; `LOGICAL_AXIS_RULES` decides where
each goes on the (`data`, `fsdp`, `tensor`) mesh. Change sharding here, not in the layers.
"""

import flax.linen as nn
import jax

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

# Activation layouts at layer boundaries: views of the vision encoder [views, tokens, dim] and the LLM's
# sequences [batch, length, dim].
VIEW_ACTIVATIONS = ("activation_views", "activation_length", "activation_embed")
TOKEN_ACTIVATIONS = ("activation_batch", "activation_length", "activation_embed")


def with_axes(init, axes: tuple):
    """Wraps a parameter initializer so the parameter carries logical axis names."""
    return nn.with_logical_partitioning(init, axes)


def mesh_axes_of(logical: tuple, rules=LOGICAL_AXIS_RULES) -> tuple:
    """Logical names -> mesh axes (a name, a tuple of names, or None per dim) through the rules table."""
    table = dict(rules)
    out = []
    for name in logical:
        if name is not None and name not in table:
            raise KeyError(f"logical axis {name!r} has no rule in LOGICAL_AXIS_RULES")
        out.append(None if name is None else table[name])
    return tuple(out)


def fit_spec(shape, mesh_axes, axis_sizes: dict) -> jax.sharding.PartitionSpec:
    """PartitionSpec for an array of `shape`: each dim keeps the longest prefix of its rule's mesh axes that are
    in the mesh, not used by an earlier dim, and whose product divides it (the rest of the rule is dropped)."""
    used, spec = set(), []
    for dim, axes in zip(shape, mesh_axes):
        axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        keep, prod = [], 1
        for a in axes:
            size = axis_sizes.get(a)
            if size is None or a in used or dim % (prod * size):
                break
            keep.append(a)
            prod *= size
        used.update(keep)
        spec.append(None if not keep else (keep[0] if len(keep) == 1 else tuple(keep)))
    return jax.sharding.PartitionSpec(*spec)


def constrain(x, logical: tuple):
    """Sharding constraint on an activation by logical names, inside `jax.set_mesh(mesh)`; a no-op without a mesh
    (single device, tests). Unlike `nn.with_logical_constraint`, a dim that a mesh axis does not divide (a decode
    batch of 1 on data=8) stays unsharded instead of failing to compile."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, fit_spec(x.shape, mesh_axes_of(logical), dict(mesh.shape)))
