"""Model configuration: frozen dataclasses read from and written back to a Hugging Face `config.json`.

`ModelConfig.from_hf_dict(d).to_hf_dict() == d` for every key we read; keys we do not interpret are
kept verbatim in `extra` so that a converted checkpoint writes the same config back.
Values we cannot run (a non-2x2 window, an unknown layer type, an activation we do not implement)
raise `ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

SUPPORTED_VISION_ACTS = ("gelu_pytorch_tanh",)
SUPPORTED_TEXT_ACTS = ("silu",)
SUPPORTED_LAYER_TYPES = ("linear_attention", "full_attention")
SUPPORTED_TEXT_MODELS = ("qwen3_5_text", "qwen3")
DOWNSAMPLE_MODES = ("16x", "4x")


class ConfigError(ValueError):
    """A config value we cannot run; the message names the key."""


def _freeze(v):
    return json.dumps(v, sort_keys=True)


def _split(d: dict, known: tuple[str, ...]) -> tuple[dict, tuple]:
    extra = tuple(sorted((k, _freeze(v)) for k, v in d.items() if k not in known))
    return {k: d[k] for k in known if k in d}, extra


def _thaw(extra: tuple) -> dict:
    return {k: json.loads(v) for k, v in extra}


def _require(cond: bool, key: str, msg: str):
    if not cond:
        raise ConfigError(f"config key `{key}`: {msg}")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """SigLIP2 ViT with the intra-ViT window-attention merger (`vision_config` in config.json)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 980
    patch_size: int = 14
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    insert_layer_id: int = 6
    window_kernel_size: tuple[int, int] = (2, 2)
    extra: tuple = ()

    _KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
             "image_size", "patch_size", "hidden_act", "layer_norm_eps", "insert_layer_id", "window_kernel_size")

    def replace(self, **kw) -> "VisionConfig":
        return dataclasses.replace(self, **kw)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def positions_per_side(self) -> int:
        """Side of the learned position table (70 for image_size 980, patch 14)."""
        return self.image_size // self.patch_size

    @property
    def patch_dim(self) -> int:
        return self.num_channels * self.patch_size * self.patch_size

    @classmethod
    def from_hf_dict(cls, d: dict, insert_layer_id: int | None = None) -> "VisionConfig":
        known, extra = _split(d, cls._KEYS)
        if "window_kernel_size" in known:
            known["window_kernel_size"] = tuple(known["window_kernel_size"])
        if insert_layer_id is not None:  # the top-level key wins, as in the reference
            known["insert_layer_id"] = insert_layer_id
        cfg = cls(**known, extra=extra)
        cfg.validate()
        return cfg

    def to_hf_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self._KEYS}
        d["window_kernel_size"] = list(self.window_kernel_size)
        d.update(_thaw(self.extra))
        return d

    def validate(self):
        p = "vision_config."
        _require(tuple(self.window_kernel_size) == (2, 2), p + "window_kernel_size",
                 f"only (2, 2) windows are implemented, got {self.window_kernel_size}")
        _require(self.hidden_act in SUPPORTED_VISION_ACTS, p + "hidden_act",
                 f"unsupported activation {self.hidden_act!r}; supported: {SUPPORTED_VISION_ACTS}")
        _require(self.hidden_size % self.num_attention_heads == 0, p + "num_attention_heads",
                 f"hidden_size {self.hidden_size} is not divisible by {self.num_attention_heads} heads")
        _require(0 <= self.insert_layer_id < self.num_hidden_layers, "insert_layer_id",
                 f"must be in [0, {self.num_hidden_layers}), got {self.insert_layer_id}")
        _require(self.image_size % self.patch_size == 0, p + "image_size",
                 f"{self.image_size} is not a multiple of patch_size {self.patch_size}")


@dataclasses.dataclass(frozen=True)
class MergerConfig:
    """Post-ViT merger: `merger_times` rounds of 2x2 fold + MLP into the LLM width."""

    downsample_mode: str = "16x"
    merge_kernel_size: tuple[int, int] = (2, 2)
    merger_times: int = 1

    def validate(self):
        _require(self.downsample_mode in DOWNSAMPLE_MODES, "downsample_mode",
                 f"must be one of {DOWNSAMPLE_MODES}, got {self.downsample_mode!r}")
        _require(tuple(self.merge_kernel_size) == (2, 2), "merge_kernel_size",
                 f"only (2, 2) merges are implemented, got {self.merge_kernel_size}")
        # any integer >= 1 runs end to end (the slicer makes views divide by 2^levels); a float or string would not
        _require(isinstance(self.merger_times, int) and not isinstance(self.merger_times, bool)
                 and self.merger_times >= 1, "merger_times", f"must be an integer >= 1, got {self.merger_times!r}")


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The LLM: Qwen3.5 hybrid (`qwen3_5_text`) or Qwen3 dense (`qwen3`)."""

    model_type: str = "qwen3_5_text"
    vocab_size: int = 248094
    hidden_size: int = 1024
    intermediate_size: int = 3584
    num_hidden_layers: int = 24
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int = 256
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e7
    partial_rotary_factor: float = 1.0
    layer_types: tuple[str, ...] = ()
    attn_output_gate: bool = False
    attention_bias: bool = False
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 16
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 262144
    vocab_pad_multiple: int = 128  # ours, not a Hugging Face key (never in config.json): see padded_vocab_size
    extra: tuple = ()

    _KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps",
             "layer_types", "attn_output_gate", "attention_bias", "linear_conv_kernel_dim", "linear_key_head_dim",
             "linear_value_head_dim", "linear_num_key_heads", "linear_num_value_heads", "tie_word_embeddings",
             "max_position_embeddings")

    def replace(self, **kw) -> "TextConfig":
        return dataclasses.replace(self, **kw)

    @property
    def is_hybrid(self) -> bool:
        return self.model_type == "qwen3_5_text"

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def padded_vocab_size(self) -> int:
        """Rows of our embed_tokens [Vp, D] and columns of lm_head [D, Vp]: vocab_size rounded up to a multiple of
        vocab_pad_multiple, so the vocab dim shards evenly. Padded rows are zero and their logits are masked."""
        m = self.vocab_pad_multiple
        _require(isinstance(m, int) and m >= 1, "vocab_pad_multiple", f"must be a positive int, got {m!r}")
        return -(-self.vocab_size // m) * m

    def with_vocab_multiple(self, t: int) -> "TextConfig":
        """This config with the vocabulary padded to a multiple of both vocab_pad_multiple and t (e.g. the
        tensor-parallel axis size): vocab_pad_multiple becomes lcm(vocab_pad_multiple, t)."""
        if not isinstance(t, int) or t < 1:
            raise ValueError(f"the vocab multiple must be a positive int, got {t!r}")
        return self.replace(vocab_pad_multiple=math.lcm(self.vocab_pad_multiple, t))

    @classmethod
    def from_hf_dict(cls, d: dict) -> "TextConfig":
        d = dict(d)
        model_type = d.get("model_type", "qwen3_5_text")
        _require(model_type in SUPPORTED_TEXT_MODELS, "text_config.model_type",
                 f"unsupported LLM {model_type!r}; supported: {SUPPORTED_TEXT_MODELS}")
        known, extra = _split(d, cls._KEYS)
        rope = d.get("rope_parameters") or {}
        known["rope_theta"] = float(rope.get("rope_theta", d.get("rope_theta", 1e6 if model_type == "qwen3" else 1e7)))
        known["partial_rotary_factor"] = float(
            rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 0.25 if model_type != "qwen3" else 1.0)))
        _require(rope.get("rope_type", "default") == "default", "text_config.rope_parameters.rope_type",
                 f"only default rope is implemented, got {rope.get('rope_type')!r}")
        n = known.get("num_hidden_layers", cls.num_hidden_layers)
        if known.get("layer_types") is None:
            if model_type == "qwen3":
                known["layer_types"] = ("full_attention",) * n
            else:
                interval = d.get("full_attention_interval", 4)
                known["layer_types"] = tuple("linear_attention" if (i + 1) % interval else "full_attention"
                                             for i in range(n))
        known["layer_types"] = tuple(known["layer_types"])
        if "num_key_value_heads" not in known or known["num_key_value_heads"] is None:
            known["num_key_value_heads"] = known.get("num_attention_heads", cls.num_attention_heads)
        if model_type == "qwen3":
            known.setdefault("attn_output_gate", False)
            _require(not d.get("use_sliding_window", False), "text_config.use_sliding_window",
                     "sliding-window Qwen3 is not implemented")
        cfg = cls(**known, extra=extra)
        cfg.validate()
        return cfg

    def to_hf_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self._KEYS}
        d["layer_types"] = list(self.layer_types)
        d.update(_thaw(self.extra))
        rope = dict(d.get("rope_parameters") or {})
        rope["rope_theta"] = self.rope_theta if self.rope_theta != int(self.rope_theta) else int(self.rope_theta)
        rope.setdefault("rope_type", "default")
        if self.is_hybrid or "partial_rotary_factor" in rope:
            rope["partial_rotary_factor"] = self.partial_rotary_factor
        d["rope_parameters"] = rope
        return d

    def validate(self):
        p = "text_config."
        _require(self.hidden_act in SUPPORTED_TEXT_ACTS, p + "hidden_act",
                 f"unsupported activation {self.hidden_act!r}; supported: {SUPPORTED_TEXT_ACTS}")
        _require(len(self.layer_types) == self.num_hidden_layers, p + "layer_types",
                 f"has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        for i, t in enumerate(self.layer_types):
            _require(t in SUPPORTED_LAYER_TYPES, f"{p}layer_types[{i}]",
                     f"unknown layer type {t!r}; supported: {SUPPORTED_LAYER_TYPES}")
            _require(self.is_hybrid or t == "full_attention", f"{p}layer_types[{i}]",
                     f"{t!r} is not a Qwen3 layer type")
        _require(self.num_attention_heads % self.num_key_value_heads == 0, p + "num_key_value_heads",
                 f"{self.num_attention_heads} query heads are not a multiple of {self.num_key_value_heads}")
        _require(self.rotary_dim % 2 == 0 and 0 < self.rotary_dim <= self.head_dim, p + "partial_rotary_factor",
                 f"gives rotary dim {self.rotary_dim} for head_dim {self.head_dim}")
        _require(isinstance(self.vocab_pad_multiple, int) and self.vocab_pad_multiple >= 1, "vocab_pad_multiple",
                 f"(ours, not Hugging Face's) must be a positive int, got {self.vocab_pad_multiple!r}")
        _require(not self.is_hybrid or self.linear_num_value_heads % self.linear_num_key_heads == 0,
                 p + "linear_num_value_heads", f"{self.linear_num_value_heads} value heads are not a multiple of "
                 f"{self.linear_num_key_heads} key heads")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The whole MiniCPM-V 4.6 / LLaVA-UHD v4 model."""

    vision: VisionConfig = VisionConfig()
    merger: MergerConfig = MergerConfig()
    text: TextConfig = TextConfig()
    model_type: str = "minicpmv4_6"
    image_token_id: int | None = 248056
    video_token_id: int | None = 248057
    image_size: int = 1120
    tie_word_embeddings: bool = True
    drop_vision_last_layer: bool = False  # read and written back; the reference model ignores it too
    extra: tuple = ()

    _KEYS = ("model_type", "image_token_id", "video_token_id", "image_size", "tie_word_embeddings",
             "drop_vision_last_layer", "insert_layer_id", "downsample_mode", "merge_kernel_size", "merger_times",
             "vision_config", "text_config")

    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        known, extra = _split(d, cls._KEYS)
        _require("vision_config" in known, "vision_config", "missing")
        _require("text_config" in known, "text_config", "missing")
        vision = VisionConfig.from_hf_dict(known.pop("vision_config"), known.pop("insert_layer_id", None))
        text = TextConfig.from_hf_dict(known.pop("text_config"))
        merger = MergerConfig(
            downsample_mode=known.pop("downsample_mode", "16x"),
            merge_kernel_size=tuple(known.pop("merge_kernel_size", (2, 2))),
            merger_times=known.pop("merger_times", 1),
        )
        merger.validate()
        return cls(vision=vision, merger=merger, text=text, extra=extra, **known)

    def to_hf_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("model_type", "image_token_id", "video_token_id", "image_size",
                                           "tie_word_embeddings", "drop_vision_last_layer")}
        d["insert_layer_id"] = self.vision.insert_layer_id
        d["downsample_mode"] = self.merger.downsample_mode
        d["merge_kernel_size"] = list(self.merger.merge_kernel_size)
        d["merger_times"] = self.merger.merger_times
        d["vision_config"] = self.vision.to_hf_dict()
        d["text_config"] = self.text.to_hf_dict()
        d.update(_thaw(self.extra))
        return d

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "ModelConfig":
        """Reads a `config.json` file, or the `config.json` inside a model directory."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"no model config at {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        try:
            return cls.from_hf_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_json(self, path: str | os.PathLike):
        """Writes config.json atomically (temporary file, then rename)."""
        path = os.fspath(path)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_hf_dict(), f, indent=2)
        os.replace(tmp, path)

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


REFERENCE_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                    "configs", "reference", "minicpm-v-4.6")


def reference_config() -> ModelConfig:
    """The real MiniCPM-V 4.6 config (a copy ships in configs/reference/minicpm-v-4.6)."""
    return ModelConfig.from_json(REFERENCE_CONFIG_DIR)


def tiny_config(insert_layer_id: int = 1, downsample_mode: str = "16x", text_model: str = "qwen3_5_text",
                merger_times: int = 1, width: int = 1) -> ModelConfig:
    """A small random-weight config for tests and the demo; same structure as the real one. `width` multiplies
    every hidden size and head dim (`small_config` is width 4)."""
    w = int(width)
    vision = VisionConfig(hidden_size=64 * w, intermediate_size=96 * w, num_hidden_layers=4, num_attention_heads=4,
                          image_size=980, patch_size=14, insert_layer_id=insert_layer_id)
    layer_types = (("linear_attention",) * 3 + ("full_attention",)) * 2 if text_model == "qwen3_5_text" \
        else ("full_attention",) * 4
    text = TextConfig(model_type=text_model, vocab_size=512, hidden_size=64 * w, intermediate_size=128 * w,
                      num_hidden_layers=len(layer_types), num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16 * w,
                      partial_rotary_factor=0.25 if text_model == "qwen3_5_text" else 1.0,
                      rope_theta=1e7 if text_model == "qwen3_5_text" else 1e6,
                      layer_types=layer_types, attn_output_gate=text_model == "qwen3_5_text",
                      linear_key_head_dim=16 * w, linear_value_head_dim=16 * w, linear_num_key_heads=2,
                      linear_num_value_heads=4)
    vision.validate()
    text.validate()
    merger = MergerConfig(downsample_mode=downsample_mode, merger_times=merger_times)
    merger.validate()
    return ModelConfig(vision=vision, merger=merger, text=text, image_token_id=500, video_token_id=501)


def small_config(downsample_mode: str = "16x", text_model: str = "qwen3_5_text") -> ModelConfig:
    """`tiny_config` 4x wider (ViT 256, LLM 256, 12.2M parameters): the experiments' model that can learn the
    synthetic OCR task in minutes on a GPU; the tiny byte tokenizer (vocab 512) serves both."""
    return tiny_config(downsample_mode=downsample_mode, text_model=text_model, width=4)
