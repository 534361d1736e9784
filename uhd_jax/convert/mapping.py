"""The one table from Hugging Face tensor names to our parameter paths, and the plan it gives for a config.

Each row of `RULES` is (part, HF name, our path, transform). Both names share placeholders:
  {vit}  ViT layer i. HF `...encoder.layers.{i}`; ours `layers_pre/layers` for i <= insert_layer_id, else
         `layers_post/layers`, at slot i (or i - insert_layer_id - 1) of the scanned leading axis.
  {llm}  LLM layer i. HF `...layers.{i}`; ours `layers/layer_{i % period}` at slot i // period, where the
         period is that of `layer_types` (Qwen3.5: 4, Qwen3: 1), as `text_model.DecoderBlock` scans them.
  {m}    post-ViT merger round m: HF `mlp.{m}`, ours `mlp_{m}`.
  {word} any other placeholder takes the words listed in the row, the same on both sides.
Our paths are relative to the part's root in the parameter tree: the dict holding `vision_tower` (part
"vision") or `embed_tokens` (part "text"), wherever the full model puts them.

A row yields an entry only where the model has that parameter, so layer types, biases and an untied lm_head
follow the model code. Nothing is silently lost: a checkpoint tensor no entry consumes and a parameter no
entry fills are both reported (`check_source`, `build_plan`).

Transforms are exact (transposes, reshapes, channel permutations, zero vocab padding that HF -> ours adds and
ours -> HF drops), so HF -> ours -> HF is bit-exact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import re
import string
from collections import defaultdict
from typing import Any, Callable, Mapping

import numpy as np

from uhd_jax.config import ModelConfig

FLOAT_DTYPES = ("F32", "BF16", "F16")


# -------------------------------------------------------------------------------------------- fast copies

@contextlib.contextmanager
def plain_pages():
    """NumPy asks the kernel for huge pages on large arrays; where the kernel then compacts memory on each
    first touch (THP defrag=madvise), filling fresh arrays runs 2x slower. Converting touches every byte of
    freshly allocated memory once, so ask for ordinary pages meanwhile."""
    try:
        from numpy._core.multiarray import _set_madvise_hugepage
    except ImportError:  # numpy < 2
        try:
            from numpy.core.multiarray import _set_madvise_hugepage
        except ImportError:
            _set_madvise_hugepage = None
    if _set_madvise_hugepage is None:
        yield
        return
    previous = _set_madvise_hugepage(False)
    try:
        yield
    finally:
        _set_madvise_hugepage(previous)


TILE = 128  # transposing tile by tile keeps both sides in cache: ~4x faster than numpy's strided copy


def transpose_into(dst: np.ndarray, src: np.ndarray) -> np.ndarray:
    """dst[...] = src.T for 2D arrays (casting to dst's dtype), tile by tile."""
    n, m = src.shape
    for i in range(0, n, TILE):
        for j in range(0, m, TILE):
            dst[j:j + TILE, i:i + TILE] = src[i:i + TILE, j:j + TILE].T
    return dst


# ---------------------------------------------------------------------------------------------- transforms

class Identity:
    name = "identity"

    def to_ours(self, a, cfg):
        return a

    def to_hf(self, a, cfg):
        return a

    def hf_shape(self, shape, cfg):
        return tuple(shape)

    def into_ours(self, dst, a, cfg):
        """dst[...] = to_ours(a), dst a preallocated (slot of a) parameter."""
        dst[...] = self.to_ours(a, cfg)

    def direct(self, dst, cfg):
        """The part of dst that takes the HF tensor exactly as read (the rest of dst filled here), or None when
        the tensor needs transforming: lets `fill` read straight into place."""
        return dst if type(self) is Identity else None

    def hf_array(self, a, cfg, dtype=None):
        """The HF tensor, C-contiguous, in `dtype` (default a's)."""
        out = np.ascontiguousarray(self.to_hf(a, cfg))
        return out if dtype is None else out.astype(dtype, copy=False)


class Linear(Identity):
    """torch Linear weight [out, in] <-> our Dense kernel [in, out]."""

    name = "linear"

    def to_ours(self, a, cfg):
        return a.T

    def to_hf(self, a, cfg):
        return a.T

    def hf_shape(self, shape, cfg):
        return tuple(shape[::-1])

    def into_ours(self, dst, a, cfg):
        transpose_into(dst, a)

    def hf_array(self, a, cfg, dtype=None):
        return transpose_into(np.empty(a.shape[::-1], dtype or a.dtype), a)


class PatchConv(Identity):
    """Conv2d patch embedding [D, C, P, P] <-> Dense kernel [C*P*P, D] (patches flattened channel, row, column)."""

    name = "patch_conv"

    def to_ours(self, a, cfg):
        return a.reshape(a.shape[0], -1).T

    def to_hf(self, a, cfg):
        return a.T.reshape(self.hf_shape(a.shape, cfg))

    def hf_shape(self, shape, cfg):
        p = cfg.vision.patch_size
        return (shape[-1], cfg.vision.num_channels, p, p)


class DepthwiseConv1d(Identity):
    """Depthwise Conv1d weight [C, 1, K] <-> our conv kernel [K, C]."""

    name = "conv1d"

    def to_ours(self, a, cfg):
        return a[:, 0, :].T

    def to_hf(self, a, cfg):
        return a.T[:, None, :]

    def hf_shape(self, shape, cfg):
        return (shape[1], 1, shape[0])


class KeyHeadGrouped(Identity):
    """`base` (Linear or DepthwiseConv1d) on the Gated DeltaNet's fused q|k|v channels, which HF orders all q |
    all k | all v and we group per key head (`gated_deltanet.qkv_hf_order`). The channels are the HF tensor's
    axis 0 and our parameter's last axis."""

    def __init__(self, base: Identity):
        self.base, self.name = base, f"key_head_grouped_{base.name}"

    @staticmethod
    def order(cfg) -> np.ndarray:
        from uhd_jax.model.gated_deltanet import qkv_hf_order  # the model owns its layout

        return qkv_hf_order(cfg.text)

    def to_ours(self, a, cfg):
        return self.base.to_ours(a, cfg)[..., self.order(cfg)]

    def to_hf(self, a, cfg):
        return self.base.to_hf(a[..., np.argsort(self.order(cfg))], cfg)

    def hf_shape(self, shape, cfg):
        return self.base.hf_shape(shape, cfg)

    def into_ours(self, dst, a, cfg):
        self.base.into_ours(dst, a[self.order(cfg)], cfg)

    def hf_array(self, a, cfg, dtype=None):
        return self.base.hf_array(a[..., np.argsort(self.order(cfg))], cfg, dtype)


class VocabPadded(Identity):
    """`base` on a vocabulary-sized tensor (HF vocab axis 0; ours `axis`) whose vocab dim we pad with zeros to
    `TextConfig.padded_vocab_size` (so it shards evenly): HF -> ours adds the zero rows, ours -> HF drops them."""

    def __init__(self, base: Identity, axis: int):
        self.base, self.axis, self.name = base, axis, f"vocab_padded_{base.name}"

    def _split(self, a, cfg):
        """(real part, padding) of our array, views along the vocab axis."""
        lead = (slice(None),) * self.axis
        v = cfg.text.vocab_size
        return a[lead + (slice(0, v),)], a[lead + (slice(v, None),)]

    def to_ours(self, a, cfg):
        a = self.base.to_ours(a, cfg)
        pad = [(0, 0)] * a.ndim
        pad[self.axis] = (0, cfg.text.padded_vocab_size - cfg.text.vocab_size)
        return np.pad(a, pad)

    def to_hf(self, a, cfg):
        return self.base.to_hf(self._split(a, cfg)[0], cfg)

    def hf_shape(self, shape, cfg):
        shape = list(shape)
        shape[self.axis] = cfg.text.vocab_size
        return self.base.hf_shape(tuple(shape), cfg)

    def into_ours(self, dst, a, cfg):
        real, pad = self._split(dst, cfg)
        pad[...] = 0
        self.base.into_ours(real, a, cfg)

    def direct(self, dst, cfg):
        real, pad = self._split(dst, cfg)
        view = self.base.direct(real, cfg)
        if view is not None:
            pad[...] = 0
        return view

    def hf_array(self, a, cfg, dtype=None):
        return self.base.hf_array(self._split(a, cfg)[0], cfg, dtype)


IDENTITY, LINEAR, PATCH_CONV, CONV1D = Identity(), Linear(), PatchConv(), DepthwiseConv1d()
QKV_LINEAR, QKV_CONV1D = KeyHeadGrouped(LINEAR), KeyHeadGrouped(CONV1D)
VOCAB_ROWS, VOCAB_LINEAR = VocabPadded(IDENTITY, 0), VocabPadded(LINEAR, 1)


@dataclasses.dataclass(frozen=True)
class Rule:
    part: str
    hf: str
    ours: str
    transform: Identity = IDENTITY
    choices: tuple[tuple[str, tuple[str, ...]], ...] = ()


def _rule(part, hf, ours, transform=IDENTITY, **choices):
    return Rule(part, hf, ours, transform, tuple(sorted(choices.items())))


VT, LM = "model.vision_tower", "model.language_model"
ATTN = ("q_proj", "k_proj", "v_proj", "out_proj")

RULES = (
    # ViT: embeddings, encoder layers (scanned in two stacks around the window merger), post layernorm
    _rule("vision", f"{VT}.embeddings.patch_embedding.weight", "vision_tower/patch_embedding/kernel", PATCH_CONV),
    _rule("vision", f"{VT}.embeddings.patch_embedding.bias", "vision_tower/patch_embedding/bias"),
    _rule("vision", f"{VT}.embeddings.position_embedding.weight", "vision_tower/position_embedding"),
    _rule("vision", VT + ".encoder.layers.{vit}.{ln}.weight", "vision_tower/{vit}/{ln}/scale",
          ln=("layer_norm1", "layer_norm2")),
    _rule("vision", VT + ".encoder.layers.{vit}.{ln}.bias", "vision_tower/{vit}/{ln}/bias",
          ln=("layer_norm1", "layer_norm2")),
    _rule("vision", VT + ".encoder.layers.{vit}.self_attn.{proj}.weight", "vision_tower/{vit}/self_attn/{proj}/kernel",
          LINEAR, proj=ATTN),
    _rule("vision", VT + ".encoder.layers.{vit}.self_attn.{proj}.bias", "vision_tower/{vit}/self_attn/{proj}/bias",
          proj=ATTN),
    _rule("vision", VT + ".encoder.layers.{vit}.mlp.{fc}.weight", "vision_tower/{vit}/mlp/{fc}/kernel", LINEAR,
          fc=("fc1", "fc2")),
    _rule("vision", VT + ".encoder.layers.{vit}.mlp.{fc}.bias", "vision_tower/{vit}/mlp/{fc}/bias", fc=("fc1", "fc2")),
    _rule("vision", VT + ".post_layernorm.weight", "vision_tower/post_layernorm/scale"),
    _rule("vision", VT + ".post_layernorm.bias", "vision_tower/post_layernorm/bias"),
    # intra-ViT window merger
    _rule("vision", VT + ".vit_merger.{ln}.weight", "vision_tower/vit_merger/{ln}/scale", ln=("layer_norm1", "pre_norm")),
    _rule("vision", VT + ".vit_merger.{ln}.bias", "vision_tower/vit_merger/{ln}/bias", ln=("layer_norm1", "pre_norm")),
    _rule("vision", VT + ".vit_merger.self_attn.{proj}.weight", "vision_tower/vit_merger/self_attn/{proj}/kernel",
          LINEAR, proj=ATTN),
    _rule("vision", VT + ".vit_merger.self_attn.{proj}.bias", "vision_tower/vit_merger/self_attn/{proj}/bias",
          proj=ATTN),
    _rule("vision", VT + ".vit_merger.{lin}.weight", "vision_tower/vit_merger/{lin}/kernel", LINEAR,
          lin=("linear_1", "linear_2")),
    _rule("vision", VT + ".vit_merger.{lin}.bias", "vision_tower/vit_merger/{lin}/bias", lin=("linear_1", "linear_2")),
    # post-ViT merger
    _rule("vision", "model.merger.mlp.{m}.pre_norm.weight", "merger/{m}/pre_norm/scale"),
    _rule("vision", "model.merger.mlp.{m}.pre_norm.bias", "merger/{m}/pre_norm/bias"),
    _rule("vision", "model.merger.mlp.{m}.{lin}.weight", "merger/{m}/{lin}/kernel", LINEAR, lin=("linear_1", "linear_2")),
    _rule("vision", "model.merger.mlp.{m}.{lin}.bias", "merger/{m}/{lin}/bias", lin=("linear_1", "linear_2")),
    # LLM (Qwen3.5 hybrid or Qwen3 dense)
    _rule("text", f"{LM}.embed_tokens.weight", "embed_tokens", VOCAB_ROWS),
    _rule("text", f"{LM}.norm.weight", "norm/scale"),
    _rule("text", "lm_head.weight", "lm_head/kernel", VOCAB_LINEAR),  # only when not tied
    _rule("text", LM + ".layers.{llm}.{ln}.weight", "{llm}/{ln}/scale", ln=("input_layernorm", "post_attention_layernorm")),
    _rule("text", LM + ".layers.{llm}.mlp.{proj}.weight", "{llm}/mlp/{proj}/kernel", LINEAR,
          proj=("gate_proj", "up_proj", "down_proj")),
    _rule("text", LM + ".layers.{llm}.self_attn.{proj}.weight", "{llm}/self_attn/{proj}/kernel", LINEAR,
          proj=("q_proj", "k_proj", "v_proj", "o_proj")),
    _rule("text", LM + ".layers.{llm}.self_attn.{proj}.bias", "{llm}/self_attn/{proj}/bias",
          proj=("q_proj", "k_proj", "v_proj", "o_proj")),  # attention_bias only
    _rule("text", LM + ".layers.{llm}.self_attn.{n}.weight", "{llm}/self_attn/{n}/scale", n=("q_norm", "k_norm")),
    _rule("text", LM + ".layers.{llm}.linear_attn.in_proj_qkv.weight", "{llm}/linear_attn/in_proj_qkv/kernel",
          QKV_LINEAR),
    _rule("text", LM + ".layers.{llm}.linear_attn.{proj}.weight", "{llm}/linear_attn/{proj}/kernel", LINEAR,
          proj=("in_proj_z", "in_proj_b", "in_proj_a", "out_proj")),
    _rule("text", LM + ".layers.{llm}.linear_attn.conv1d.weight", "{llm}/linear_attn/conv_kernel", QKV_CONV1D),
    _rule("text", LM + ".layers.{llm}.linear_attn.{p}", "{llm}/linear_attn/{p}", p=("A_log", "dt_bias")),
    _rule("text", LM + ".layers.{llm}.linear_attn.norm.weight", "{llm}/linear_attn/norm/scale"),
)

# our vocabulary-sized parameters (path in the text part) -> their padded vocab axis
VOCAB_AXES = {tuple(r.ours.split("/")): r.transform.axis for r in RULES if isinstance(r.transform, VocabPadded)}

PARTS = ("vision", "text")
PART_ANCHORS = {"vision": "vision_tower", "text": "embed_tokens"}  # a key that marks the part's root dict
STACKED = ("vit", "llm")


# ------------------------------------------------------------------------------------------- placeholders

def _domains(cfg: ModelConfig, parts) -> dict[str, list[tuple[str, str, int | None]]]:
    """Placeholder -> [(HF text, our text, slot on the scanned axis or None)]."""
    v = cfg.vision
    n_pre = v.insert_layer_id + 1
    out = {
        "vit": [(str(i), "layers_pre/layers", i) if i < n_pre else (str(i), "layers_post/layers", i - n_pre)
                for i in range(v.num_hidden_layers)],
        "m": [(str(i), f"mlp_{i}", None) for i in range(cfg.merger.merger_times)],
        "llm": [],
    }
    if "text" in parts:
        from uhd_jax.model.text_model import layer_period  # the model decides how layers are grouped

        p = layer_period(cfg.text.layer_types)
        out["llm"] = [(str(i), f"layers/layer_{i % p}", i // p) for i in range(cfg.text.num_hidden_layers)]
    return out


def _fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def expand(rule: Rule, domains) -> list[tuple[str, str, int | None]]:
    """All (HF name, our path, slot) a rule gives for a config."""
    choices = dict(rule.choices)
    names = _fields(rule.hf)
    options = []
    for f in names:
        options.append(domains[f] if f in domains else [(c, c, None) for c in choices[f]])
    out = []
    for combo in itertools.product(*options):
        hf = rule.hf.format(**{f: c[0] for f, c in zip(names, combo)})
        ours = rule.ours.format(**{f: c[1] for f, c in zip(names, combo)})
        slots = [c[2] for c in combo if c[2] is not None]
        out.append((hf, ours, slots[0] if slots else None))
    return out


def rule_regex(rule: Rule) -> re.Pattern:
    """The HF side of a rule as a regex (layer numbers unrestricted): to explain tensors nothing consumed."""
    choices = dict(rule.choices)
    pattern = ""
    for literal, f, _, _ in string.Formatter().parse(rule.hf):
        pattern += re.escape(literal)
        if f:
            pattern += r"\d+" if f in ("vit", "llm", "m") else "(?:" + "|".join(map(re.escape, choices[f])) + ")"
    return re.compile(pattern + "$")


_RULE_REGEXES = [(r, rule_regex(r)) for r in RULES]


# ------------------------------------------------------------------------------------------ the param tree

def flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        d = out
        for k in path[:-1]:
            d = d.setdefault(k, {})
        d[path[-1]] = v
    return out


def part_roots(tree: Mapping, parts) -> dict[str, tuple[str, ...]]:
    """Where each part's root dict is in the full tree (the first dict, breadth first, holding its anchor key)."""
    roots, queue = {}, [((), tree)]
    while queue:
        path, d = queue.pop(0)
        for part in parts:
            if PART_ANCHORS[part] in d and part not in roots:
                roots[part] = path
        queue += [(path + (k,), v) for k, v in d.items() if isinstance(v, Mapping)]
    missing = [p for p in parts if p not in roots]
    if missing:
        raise ValueError(f"the parameter tree has no {missing} part (looked for keys "
                         f"{[PART_ANCHORS[p] for p in missing]})")
    return roots


def path_str(path) -> str:
    return "/".join(path)


def vocab_params(tree: Mapping) -> dict[tuple[str, ...], int]:
    """Paths of the vocabulary-sized parameters in `tree` (full or text-only; {} without a text part) -> vocab axis."""
    try:
        root = part_roots(tree, ("text",))["text"]
    except ValueError:
        return {}
    flat = flatten(tree)
    return {root + p: axis for p, axis in VOCAB_AXES.items() if root + p in flat}


# ----------------------------------------------------------------------------------------------- the plan

@dataclasses.dataclass(frozen=True)
class Entry:
    """One HF tensor <-> one parameter (or one slot of a scanned parameter)."""

    hf: str
    path: tuple[str, ...]
    slot: int | None
    transform: Identity
    hf_shape: tuple[int, ...]

    def where(self) -> str:
        return path_str(self.path) + ("" if self.slot is None else f"[{self.slot}]")


@dataclasses.dataclass
class Plan:
    entries: list[Entry]
    leaves: dict[tuple[str, ...], Any]  # path -> abstract leaf (shape, dtype) of every parameter in the parts
    by_hf: dict[str, Entry]
    by_path: dict[tuple[str, ...], list[Entry]]
    roots: dict[str, tuple[str, ...]]
    cfg: ModelConfig


def build_plan(cfg: ModelConfig, tree: Mapping, parts=PARTS) -> tuple[Plan, list[str]]:
    """Entries for every parameter of `tree` (abstract or real) in `parts`; problems if the table and the model
    disagree (a parameter no row fills, a slot filled twice or never)."""
    problems = []
    roots = part_roots(tree, parts)
    flat = flatten(tree)
    leaves = {p: v for p, v in flat.items() if any(p[:len(roots[part])] == roots[part] for part in parts)}
    domains = _domains(cfg, parts)
    entries = []
    for rule in RULES:
        if rule.part not in parts:
            continue
        for hf, ours, slot in expand(rule, domains):
            path = roots[rule.part] + tuple(ours.split("/"))
            leaf = leaves.get(path)
            if leaf is None:
                continue
            shape = tuple(leaf.shape)
            if slot is not None:
                if not shape or slot >= shape[0]:
                    problems.append(f"`{hf}` maps to slot {slot} of `{path_str(path)}` {list(shape)}, which has "
                                    f"no such slot (config and model disagree on the layer split)")
                    continue
                shape = shape[1:]
            entries.append(Entry(hf, path, slot, rule.transform, rule.transform.hf_shape(shape, cfg)))
    by_hf, by_path = {}, defaultdict(list)
    for e in entries:
        if e.hf in by_hf:
            problems.append(f"`{e.hf}` is mapped twice: to `{by_hf[e.hf].where()}` and `{e.where()}`")
        by_hf[e.hf] = e
        by_path[e.path].append(e)
    for path, leaf in leaves.items():
        es = by_path.get(path, [])
        if not es:
            problems.append(f"parameter `{path_str(path)}` {list(leaf.shape)} is filled by no row of the mapping")
        elif any(e.slot is not None for e in es):
            slots = sorted(e.slot for e in es if e.slot is not None)
            if slots != list(range(leaf.shape[0])) or len(slots) != len(es):
                problems.append(f"parameter `{path_str(path)}` {list(leaf.shape)}: mapped slots {slots} do not "
                                f"cover its {leaf.shape[0]} layers once each")
        elif len(es) > 1:
            problems.append(f"parameter `{path_str(path)}` is filled by several tensors: {[e.hf for e in es]}")
    return Plan(entries, leaves, by_hf, dict(by_path), roots, cfg), problems


def explain_unused(name: str, cfg: ModelConfig) -> str:
    """Why a checkpoint tensor is consumed by nothing, as far as we can tell."""
    if name.startswith("mtp."):
        return "multi-token-prediction weights; the model has no MTP head"
    if name == "lm_head.weight" and cfg.text.tie_word_embeddings:
        return "the config ties the embeddings (tie_word_embeddings=true), so lm_head.weight is not a parameter"
    for rule, rx in _RULE_REGEXES:
        if rx.match(name):
            return (f"its name fits `{rule.hf}`, but this config has no such parameter (check the layer count, "
                    f"layer_types, insert_layer_id, merger_times, attention_bias)")
    return "no mapping row matches this name"


def check_source(plan: Plan, infos: Mapping[str, Any], *, skip_unused: bool = False, dtype=None,
                 ignore: Callable[[str], bool] | None = None) -> tuple[list[str], list[str]]:
    """Compares a checkpoint's tensors (name -> info with .shape and .dtype as safetensors codes) with the plan.

    Returns (problems, unused names). Unused tensors are problems unless `skip_unused`; `ignore(name)` marks
    tensors that are expected to be left over (e.g. the text part when converting only the vision part).
    """
    problems = []
    for e in plan.entries:
        info = infos.get(e.hf)
        if info is None:
            problems.append(f"missing tensor `{e.hf}` (expected {list(e.hf_shape)}, fills `{e.where()}`)")
            continue
        name = f"`{e.hf}`" + (f" (from `{info.origin}`)" if getattr(info, "origin", "") else "")
        if tuple(info.shape) != e.hf_shape:
            problems.append(f"tensor {name} has shape {list(info.shape)}, the config expects {list(e.hf_shape)} "
                            f"(for `{e.where()}`)")
        if info.dtype not in FLOAT_DTYPES:
            problems.append(f"tensor {name} has dtype {info.dtype}; parameters take {', '.join(FLOAT_DTYPES)}")
    if dtype is None:  # a scanned parameter keeps the checkpoint's dtype only if all its layers share it
        for path, es in plan.by_path.items():
            seen = {infos[e.hf].dtype: e.hf for e in es if e.hf in infos}
            if len(seen) > 1:
                problems.append(f"parameter `{path_str(path)}` would stack tensors of different dtypes "
                                f"({', '.join(f'{d}: `{n}`' for d, n in sorted(seen.items()))}); pass a dtype to cast")
    unused = [n for n in infos if n not in plan.by_hf and not (ignore and ignore(n))]
    if not skip_unused:
        for n in sorted(unused):
            info = infos[n]
            origin = f" (from `{info.origin}`)" if getattr(info, "origin", "") else ""
            problems.append(f"unused tensor `{n}`{origin} {info.dtype} {list(info.shape)}: "
                            f"{explain_unused(n, plan.cfg)} (skip_unused drops it)")
    return problems, sorted(unused)


def fill(plan: Plan, infos: Mapping[str, Any], read: Callable[..., np.ndarray], dtype=None) -> dict:
    """Builds the parameter tree: one array per parameter, allocated once, each tensor read and placed in turn.

    `read(name, out=None)` returns the HF tensor (into `out` when given). Layer stacking writes each layer
    straight into its slot, so peak memory is the tree plus one tensor.
    """
    cast = None if dtype is None else np.dtype(dtype)
    arrays = {}
    with plain_pages():
        for path, es in plan.by_path.items():
            arrays[path] = np.empty(tuple(plan.leaves[path].shape), cast or infos[es[0].hf].np_dtype)
        # read in file order: sequential IO on each shard
        order = sorted(plan.entries, key=lambda e: (getattr(infos[e.hf], "file", ""),
                                                    getattr(infos[e.hf], "offset", 0)))
        for e in order:
            dest = arrays[e.path] if e.slot is None else arrays[e.path][e.slot]
            view = e.transform.direct(dest, plan.cfg) if dest.dtype == infos[e.hf].np_dtype else None
            if view is not None:
                read(e.hf, out=view)  # straight into place
            else:
                e.transform.into_ours(dest, read(e.hf), plan.cfg)
    return unflatten(arrays)


def check_params(plan: Plan, params: Mapping) -> list[str]:
    """Problems with a parameter tree we are about to export: missing, extra, misshapen or non-float leaves."""
    problems = []
    flat = flatten(params)
    for path, leaf in plan.leaves.items():
        got = flat.get(path)
        if got is None:
            problems.append(f"parameter `{path_str(path)}` {list(leaf.shape)} is missing from the checkpoint")
        elif tuple(got.shape) != tuple(leaf.shape):
            problems.append(f"parameter `{path_str(path)}` has shape {list(got.shape)}, the config expects "
                            f"{list(leaf.shape)}")
        elif np.dtype(got.dtype).name not in ("float32", "bfloat16", "float16"):
            problems.append(f"parameter `{path_str(path)}` has dtype {np.dtype(got.dtype).name}; expected a "
                            f"floating type")
    for path in flat:
        if path not in plan.leaves and any(path[:len(r)] == r for r in plan.roots.values()):
            problems.append(f"parameter `{path_str(path)}` {list(flat[path].shape)} is not part of the model for "
                            f"this config")
    return problems


def to_hf_tensor(plan: Plan, e: Entry, params_flat: Mapping, dtype=None) -> np.ndarray:
    """The HF tensor of one entry, C-contiguous."""
    a = params_flat[e.path]
    return e.transform.hf_array(np.asarray(a if e.slot is None else a[e.slot]), plan.cfg, dtype)
