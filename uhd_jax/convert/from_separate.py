"""A new LLaVA-UHD v4 model from separate checkpoints: a SigLIP / SigLIP2 vision tower + a Qwen3 / Qwen3.5 LLM.

The two directories are presented to the converter under the MiniCPM-V 4.6 tensor names, with the tensors
the combined model needs but neither checkpoint has made on the fly, so they go through the same table
(`mapping.RULES`) and the same validation as a MiniCPM-V checkpoint:

- intra-ViT window merger, initialised from ViT layer k (`merger_init_layer`, default `insert_layer_id`: the
  layer whose output the merger reads, so the merger starts as a window-local repeat of it):
  layer_norm1 and self_attn (q/k/v/out) copied from layer k; pre_norm (4D) = layer k's layer_norm2 tiled 4x;
  linear_1 [4I, 4D] = four copies of fc1 on the block diagonal (bias fc1.bias tiled 4x);
  linear_2 [D, 4I] = fc2 four times side by side, divided by 4 (bias fc2.bias). With the merger's residual
  = mean of the window, a window of 4 equal tokens then comes out as layer k applied to that token with
  attention restricted to its window (see tests/test_convert_separate.py for what exactly is shown).
- post-ViT merger: initialised as a fresh model would be (our `Merger` initialisers, `seed`).
- position table: our ViT looks positions up in a `positions_per_side`^2 (70 x 70) table. A source table of
  another size is resized the way the source model itself resizes it at run time: bicubic
  (align_corners=False) for SigLIP / non-naflex SigLIP2 (model_type "siglip", as in
  `SiglipVisionEmbeddings.interpolate_pos_encoding`), bilinear with antialias for naflex SigLIP2
  (model_type "siglip2", as in `Siglip2VisionEmbeddings.resize_positional_embeddings`); computed in float64,
  stored in the table's dtype. A naflex patch embedding (Linear over patches flattened row, column, channel)
  is permuted into the Conv2d layout [D, C, P, P].

Dropped on purpose (listed in the report): SigLIP's pooling head and text tower (`head.*`, `text_model.*`,
`logit_scale`, `logit_bias`), Qwen3.5's vision tower (`model.visual.*`) and MTP weights (`mtp.*`), and
`lm_head.weight` when the LLM ties its embeddings. Any other tensor left over is an error, as is anything
missing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import numpy as np

from uhd_jax.config import REFERENCE_CONFIG_DIR, ConfigError, MergerConfig, ModelConfig, TextConfig, VisionConfig
from uhd_jax.convert import mapping
from uhd_jax.convert.checkpoint import check_output_dir, parse_dtype, write_checkpoint
from uhd_jax.convert.errors import raise_if
from uhd_jax.convert.hf_to_jax import Loaded, load_from_reader
from uhd_jax.convert.safetensors_io import SafetensorsReader

VT, LM = mapping.VT, mapping.LM
SIGLIP_TYPES = ("siglip", "siglip_vision_model")
SIGLIP2_TYPES = ("siglip2", "siglip2_vision_model")
DROPPED = (r"(vision_model\.)?head\..*", r"text_model\..*", r"logit_scale", r"logit_bias",
           r"model\.visual\..*", r"mtp\..*")


# ------------------------------------------------------------------------------------------- resampling

def _cubic_weights(t: float, a: float = -0.75) -> list[float]:
    def c1(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def c2(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return [c2(t + 1), c1(t), c1(1 - t), c2(2 - t)]


def resize_matrix(n_in: int, n_out: int, mode: str) -> np.ndarray:
    """[n_out, n_in] weights of torch's 1D resampling (align_corners=False): 'bicubic' (a = -0.75, edge
    clamped) or 'bilinear_aa' (bilinear with antialias)."""
    w = np.zeros((n_out, n_in), np.float64)
    scale = n_in / n_out
    for i in range(n_out):
        if mode == "bicubic":
            src = scale * (i + 0.5) - 0.5
            x0 = math.floor(src)
            for k, c in enumerate(_cubic_weights(src - x0)):
                w[i, min(max(x0 - 1 + k, 0), n_in - 1)] += c
        elif mode == "bilinear_aa":
            support = scale if scale >= 1 else 1.0
            inv = 1 / scale if scale >= 1 else 1.0
            center = scale * (i + 0.5)
            lo = max(int(center - support + 0.5), 0)
            hi = min(int(center + support + 0.5), n_in)
            for j in range(lo, hi):
                w[i, j] = max(0.0, 1 - abs((j - center + 0.5) * inv))
            w[i] /= w[i].sum()
        else:
            raise ValueError(f"unknown resize mode {mode!r}")
    return w


def resize_positions(table: np.ndarray, side: int, mode: str) -> np.ndarray:
    """[s*s, D] position table -> [side*side, D], resampled as a 2D grid."""
    s = math.isqrt(table.shape[0])
    if s * s != table.shape[0]:
        raise ValueError(f"position table of {table.shape[0]} entries is not a square grid")
    if s == side:
        return table
    m = resize_matrix(s, side, mode)
    grid = table.astype(np.float64).reshape(s, s, -1)
    out = np.einsum("ai,bj,ijd->abd", m, m, grid)
    return out.reshape(side * side, -1).astype(table.dtype)


# ------------------------------------------------------------------------------------------ the sources

@dataclasses.dataclass(frozen=True)
class Virtual:
    """A tensor under its MiniCPM-V name: shape, dtype code, and how to make it."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    make: object  # () -> np.ndarray
    file: str = ""
    offset: int = 0
    origin: str = ""  # the source tensor it comes from, for messages

    @property
    def np_dtype(self):
        from uhd_jax.convert.safetensors_io import DTYPES

        return DTYPES[self.dtype]


class Combined:
    """Virtual tensors under MiniCPM-V names (the interface of SafetensorsReader: `.tensors`, `.read`)."""

    def __init__(self, tags: dict):
        self.tensors: dict[str, Virtual] = {}
        self.tags = tags  # reader id -> "vision" / "llm"
        self.taken: set[tuple[int, str]] = set()  # (reader id, source name) of every aliased source tensor

    def add(self, v: Virtual):
        self.tensors[v.name] = v

    def alias(self, name: str, reader: SafetensorsReader, src: str, fn=None, shape=None):
        info = reader.tensors[src]
        make = (lambda: reader.read(src)) if fn is None else (lambda: fn(reader.read(src)))
        origin = f"{self.tags[id(reader)]}: {src}"
        self.add(Virtual(name, tuple(shape or info.shape), info.dtype, make, info.file, info.offset, origin))
        self.taken.add((id(reader), src))

    def read(self, name, out=None):
        a = np.asarray(self.tensors[name].make())
        if out is None:
            return a
        out[...] = a
        return out


def _read_json(path: str, problems: list[str]) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        problems.append(f"{path}: missing")
    except json.JSONDecodeError as e:
        problems.append(f"{path}: not valid JSON: {e}")
    return None


def vision_config_from(d: dict, *, insert_layer_id: int, positions_per_side: int) -> tuple[VisionConfig, str]:
    """SigLIP(2) config.json -> (our VisionConfig, kind 'siglip' or 'siglip2')."""
    model_type = d.get("model_type", "")
    if "vision_config" in d:  # a full SigLIP (vision + text) checkpoint
        d = dict(d["vision_config"], model_type=d["vision_config"].get("model_type", model_type + "_vision_model"))
        model_type = d["model_type"]
    if model_type in SIGLIP_TYPES:
        kind = "siglip"
    elif model_type in SIGLIP2_TYPES:
        kind = "siglip2"
    else:
        raise ConfigError(f"vision config: model_type {model_type!r} is not a SigLIP or SigLIP2 vision model")
    patch = d.get("patch_size", 16)
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
            "hidden_act", "layer_norm_eps")
    cfg = VisionConfig(**{k: d[k] for k in keys if k in d}, patch_size=patch, image_size=positions_per_side * patch,
                       insert_layer_id=insert_layer_id)
    cfg.validate()
    return cfg, kind


def text_config_from(d: dict) -> TextConfig:
    """Qwen3 / Qwen3.5 config.json (causal LM, or Qwen3.5 multimodal with a text_config) -> TextConfig."""
    if "text_config" in d:
        d = dict(d["text_config"], tie_word_embeddings=d.get("tie_word_embeddings",
                                                              d["text_config"].get("tie_word_embeddings", True)))
    keep = {k: v for k, v in d.items() if k not in ("architectures", "auto_map", "transformers_version", "dtype",
                                                    "torch_dtype", "bos_token_id", "eos_token_id", "pad_token_id")}
    return TextConfig.from_hf_dict(keep)


def _find_image_token(llm_dir: str) -> int | None:
    """Id of <|image_pad|> in the LLM's tokenizer files, if it has one."""
    for fname in ("tokenizer.json", "tokenizer_config.json"):
        p = os.path.join(llm_dir, fname)
        if not os.path.exists(p):
            continue
        with open(p) as f:
            d = json.load(f)
        for t in d.get("added_tokens", []):
            if t.get("content") == "<|image_pad|>":
                return int(t["id"])
        for i, t in (d.get("added_tokens_decoder") or {}).items():
            if t.get("content") == "<|image_pad|>":
                return int(i)
    return None


@dataclasses.dataclass
class Report:
    config: ModelConfig
    vision_kind: str
    merger_init_layer: int
    positions: str
    dropped: list[str]
    fresh: list[str]

    def lines(self) -> list[str]:
        groups: dict[str, int] = {}
        for n in self.dropped:  # "vision: head.mlp.fc1.weight" -> "vision: head.*"
            tag, name = n.split(": ", 1)
            parts = name.split(".")
            key = f"{tag}: " + ".".join(parts[:2 if parts[0] in ("vision_model", "model") else 1]) + ".*"
            groups[key] = groups.get(key, 0) + 1
        v, t = self.config.vision, self.config.text
        return [
            f"vision: {self.vision_kind}, {v.num_hidden_layers} layers, width {v.hidden_size}, patch {v.patch_size}; "
            f"window merger after layer {v.insert_layer_id}, initialised from layer {self.merger_init_layer}",
            f"positions: {self.positions}",
            f"llm: {t.model_type}, {t.num_hidden_layers} layers, width {t.hidden_size}, "
            f"tied embeddings: {t.tie_word_embeddings}",
            f"freshly initialised: {', '.join(self.fresh)}",
            f"dropped {len(self.dropped)} tensors: " + ", ".join(f"{k} ({n})" for k, n in sorted(groups.items())),
        ]


def _vision_sources(src: Combined, reader: SafetensorsReader, cfg: ModelConfig, kind: str, k: int) -> str:
    """Adds the ViT tensors under MiniCPM-V names; returns how the position table was made."""
    names = reader.tensors
    pre = "vision_model." if any(n.startswith("vision_model.embeddings.") for n in names) else ""
    d, p, c = cfg.vision.hidden_size, cfg.vision.patch_size, cfg.vision.num_channels
    for n in names:
        if not n.startswith(pre):
            continue
        rest = n[len(pre):]
        if rest.startswith(("encoder.layers.", "post_layernorm.")) or rest == "embeddings.patch_embedding.bias":
            src.alias(f"{VT}.{rest}", reader, n)
    w = pre + "embeddings.patch_embedding.weight"
    if w in names:
        if kind == "siglip2":  # Linear [D, P*P*C] over (row, column, channel) -> Conv2d [D, C, P, P]
            fn = lambda a: np.ascontiguousarray(a.reshape(a.shape[0], p, p, -1).transpose(0, 3, 1, 2))
            src.alias(f"{VT}.embeddings.patch_embedding.weight", reader, w, fn, (names[w].shape[0], c, p, p))
        else:
            src.alias(f"{VT}.embeddings.patch_embedding.weight", reader, w)
    pos = pre + "embeddings.position_embedding.weight"
    side = cfg.vision.positions_per_side
    how = "missing"
    if pos in names:
        n_src = names[pos].shape[0]
        s = math.isqrt(n_src)
        mode = "bilinear_aa" if kind == "siglip2" else "bicubic"
        if s == side:
            how = f"{s}x{s} table copied"
        else:
            how = f"{s}x{s} table resized to {side}x{side} ({mode.replace('_aa', ' with antialias')}, " \
                  f"align_corners=False)"
        src.alias(f"{VT}.embeddings.position_embedding.weight", reader, pos,
                  lambda a: resize_positions(a, side, mode), (side * side, names[pos].shape[1]))

    # window merger from layer k, built in HF layout
    layer = f"{VT}.encoder.layers.{k}."
    need = [layer + s for s in ("layer_norm1.weight", "layer_norm1.bias", "layer_norm2.weight", "layer_norm2.bias",
                                "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")]
    if not all(n in src.tensors for n in need):
        return how  # the missing layer-k tensors are reported as missing by the plan
    m = f"{VT}.vit_merger."
    get = lambda s: src.read(layer + s)
    info = lambda s: src.tensors[layer + s]
    for s in ("layer_norm1.weight", "layer_norm1.bias") + tuple(
            f"self_attn.{q}.{wb}" for q in mapping.ATTN for wb in ("weight", "bias")):
        if layer + s in src.tensors:
            t = info(s)
            src.add(Virtual(m + s, t.shape, t.dtype, (lambda s=s: get(s)), t.file, t.offset))
    inter = info("mlp.fc1.weight").shape[0]

    def tiled(s):
        return lambda: np.tile(get(s), 4)

    def block_diag():
        w1 = get("mlp.fc1.weight")
        out = np.zeros((4 * w1.shape[0], 4 * w1.shape[1]), w1.dtype)
        for i in range(4):
            out[i * w1.shape[0]:(i + 1) * w1.shape[0], i * w1.shape[1]:(i + 1) * w1.shape[1]] = w1
        return out

    def side_by_side():
        w2 = get("mlp.fc2.weight")
        return (np.tile(w2.astype(np.float32), (1, 4)) / 4).astype(w2.dtype)

    dt = lambda s: info(s).dtype
    src.add(Virtual(m + "pre_norm.weight", (4 * d,), dt("layer_norm2.weight"), tiled("layer_norm2.weight")))
    src.add(Virtual(m + "pre_norm.bias", (4 * d,), dt("layer_norm2.bias"), tiled("layer_norm2.bias")))
    src.add(Virtual(m + "linear_1.weight", (4 * inter, 4 * d), dt("mlp.fc1.weight"), block_diag))
    src.add(Virtual(m + "linear_1.bias", (4 * inter,), dt("mlp.fc1.bias"), tiled("mlp.fc1.bias")))
    src.add(Virtual(m + "linear_2.weight", (d, 4 * inter), dt("mlp.fc2.weight"), side_by_side))
    src.add(Virtual(m + "linear_2.bias", (d,), dt("mlp.fc2.bias"), lambda: get("mlp.fc2.bias")))
    return how


def _llm_sources(src: Combined, reader: SafetensorsReader, tied: bool):
    names = reader.tensors
    nested = any(n.startswith(f"{LM}.") for n in names)  # Qwen3.5 multimodal layout
    for n in names:
        if nested and n.startswith(f"{LM}."):
            src.alias(n, reader, n)
        elif not nested and n.startswith("model."):
            src.alias(f"{LM}.{n[len('model.'):]}", reader, n)
        elif n == "lm_head.weight" and not tied:
            src.alias(n, reader, n)


def _fresh_merger(src: Combined, cfg: ModelConfig, seed: int, dtype_code: str) -> list[str]:
    """The post-ViT merger as a fresh model initialises it, added as HF-layout tensors."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from uhd_jax.convert.safetensors_io import DTYPES
    from uhd_jax.model.merger import Merger
    from uhd_jax.data.layout import patches_per_token

    t = patches_per_token("4x", cfg.merger.merger_times)  # tokens folded by the post-ViT merger alone
    module = Merger(cfg.merger.merger_times, cfg.text.hidden_size)
    fresh = nn.unbox(module.init(jax.random.PRNGKey(seed), jnp.zeros((1, t, cfg.vision.hidden_size))))["params"]
    tree = {"vision_tower": {}, "merger": jax.tree.map(np.asarray, fresh)}
    plan, _ = mapping.build_plan(cfg, tree, ("vision",))
    flat = mapping.flatten(tree)
    for e in plan.entries:
        a = np.ascontiguousarray(e.transform.to_hf(flat[e.path], cfg)).astype(DTYPES[dtype_code])
        src.add(Virtual(e.hf, a.shape, dtype_code, (lambda a=a: a)))
    return [e.hf for e in plan.entries]


def build_from_separate(vision_dir: str, llm_dir: str, *, insert_layer_id: int = 6,
                        merger_init_layer: int | None = None, downsample_mode: str = "16x", merger_times: int = 1,
                        positions_per_side: int = 70, image_token_id: int | None = None, seed: int = 0,
                        dtype=None, skip_unused: bool = False) -> tuple[Loaded, Report, dict]:
    """(loaded params, report, HF config dict) of the combined model; raises ConversionError with every problem."""
    problems = []
    vraw = _read_json(os.path.join(vision_dir, "config.json"), problems)
    lraw = _read_json(os.path.join(llm_dir, "config.json"), problems)
    vision = text = kind = None
    try:
        if vraw is not None:
            vision, kind = vision_config_from(vraw, insert_layer_id=insert_layer_id,
                                              positions_per_side=positions_per_side)
    except (ConfigError, TypeError) as e:
        problems.append(f"vision config: {e}")
    try:
        if lraw is not None:
            text = text_config_from(lraw)
    except (ConfigError, TypeError) as e:
        problems.append(f"llm config: {e}")
    k = insert_layer_id if merger_init_layer is None else merger_init_layer
    if vision is not None and not 0 <= k < vision.num_hidden_layers:
        problems.append(f"merger_init_layer {k} is not a layer of the {vision.num_hidden_layers}-layer ViT")
    with SafetensorsReader(vision_dir) as vreader, SafetensorsReader(llm_dir) as lreader:
        problems += [f"vision: {p}" for p in vreader.problems] + [f"llm: {p}" for p in lreader.problems]
        if vision is None or text is None or problems:
            raise_if(problems, f"{vision_dir} + {llm_dir}")
        merger = MergerConfig(downsample_mode=downsample_mode, merger_times=merger_times)
        merger.validate()
        if image_token_id is None:
            image_token_id = _find_image_token(llm_dir)
        cfg = ModelConfig(vision=vision, merger=merger, text=text, image_token_id=image_token_id,
                          video_token_id=None, tie_word_embeddings=text.tie_word_embeddings,
                          extra=(("architectures", json.dumps(["MiniCPMV4_6ForConditionalGeneration"])),))

        src = Combined({id(vreader): "vision", id(lreader): "llm"})
        positions = _vision_sources(src, vreader, cfg, kind, k)
        _llm_sources(src, lreader, text.tie_word_embeddings)
        fc1 = src.tensors.get(f"{VT}.encoder.layers.0.mlp.fc1.weight")
        fresh = _fresh_merger(src, cfg, seed, fc1.dtype if fc1 else "F32")
        dropped = []
        for tag, reader in (("vision", vreader), ("llm", lreader)):
            for n, info in reader.tensors.items():
                if (id(reader), n) in src.taken:
                    continue
                if any(re.fullmatch(p, n) for p in DROPPED) or (n == "lm_head.weight" and text.tie_word_embeddings):
                    dropped.append(f"{tag}: {n}")
                else:  # left over and not expected: the plan reports it as unused
                    src.add(Virtual(f"{tag}: {n}", info.shape, info.dtype, (lambda r=reader, n=n: r.read(n)),
                                    info.file, info.offset))
        loaded = load_from_reader(cfg, src, skip_unused=skip_unused, dtype=dtype,
                                  context=f"{vision_dir} + {llm_dir}")
    report = Report(cfg, kind, k, positions, sorted(dropped), [f"post-ViT merger ({len(fresh)} tensors, seed {seed})"])
    return loaded, report, cfg.to_hf_dict()


def from_separate(vision_dir: str, llm_dir: str, out_dir: str, *, dtype=None, overwrite: bool = False,
                  **kw) -> Report:
    """Builds the combined model (see `build_from_separate`) and writes it as our checkpoint directory, with the
    LLM's tokenizer and generation config and MiniCPM-V 4.6's preprocessor config (patch size adjusted)."""
    import tempfile

    check_output_dir(out_dir, overwrite, inputs=[vision_dir, llm_dir])
    loaded, report, hf_config = build_from_separate(vision_dir, llm_dir, dtype=dtype, **kw)
    with tempfile.TemporaryDirectory() as extra:
        with open(os.path.join(REFERENCE_CONFIG_DIR, "preprocessor_config.json")) as f:
            pre = json.load(f)
        pre["patch_size"] = report.config.vision.patch_size
        vpre = os.path.join(vision_dir, "preprocessor_config.json")
        if os.path.exists(vpre):  # the ViT's own normalisation
            with open(vpre) as f:
                v = json.load(f)
            for key in ("image_mean", "image_std"):
                if key in v:
                    pre[key] = v[key]
        with open(os.path.join(extra, "preprocessor_config.json"), "w") as f:
            json.dump(pre, f, indent=2)
        write_checkpoint(out_dir, hf_config, loaded.params, side_from=[extra, llm_dir], dtype=parse_dtype(dtype),
                         overwrite=overwrite)
    return report
