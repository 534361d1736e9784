"""ModelConfig against the real config.json and transformers' own config classes."""

import json

import pytest

from uhd_jax.config import REFERENCE_CONFIG_DIR, ConfigError, ModelConfig, reference_config, tiny_config


def load_reference_dict():
    with open(f"{REFERENCE_CONFIG_DIR}/config.json") as f:
        return json.load(f)


def test_real_config_loads_with_the_documented_facts():
    cfg = reference_config()
    assert cfg.vision.num_hidden_layers == 27 and cfg.vision.hidden_size == 1152
    assert cfg.vision.positions_per_side == 70 and cfg.vision.insert_layer_id == 6
    assert cfg.text.model_type == "qwen3_5_text" and cfg.text.is_hybrid
    assert cfg.text.layer_types[:4] == ("linear_attention",) * 3 + ("full_attention",)
    assert cfg.text.rotary_dim == 64 and cfg.text.rope_theta == 1e7
    assert cfg.text.num_attention_heads == 8 and cfg.text.num_key_value_heads == 2
    assert cfg.merger.downsample_mode == "16x" and cfg.tie_word_embeddings


def test_round_trip_keeps_every_key(tmp_path):
    src = load_reference_dict()
    cfg = ModelConfig.from_hf_dict(src)
    back = cfg.to_hf_dict()
    for k, v in src.items():
        if k in ("vision_config", "text_config"):
            for kk, vv in v.items():
                assert back[k][kk] == vv, (k, kk)
        else:
            assert back[k] == v, k
    cfg.to_json(tmp_path / "config.json")
    assert ModelConfig.from_json(tmp_path) == cfg


def test_transformers_reads_what_we_write():
    from transformers import MiniCPMV4_6Config

    for cfg in (reference_config(), tiny_config(insert_layer_id=2, downsample_mode="4x"), tiny_config(text_model="qwen3")):
        hf = MiniCPMV4_6Config(**cfg.to_hf_dict())
        assert hf.insert_layer_id == hf.vision_config.insert_layer_id == cfg.vision.insert_layer_id
        assert hf.downsample_mode == cfg.merger.downsample_mode
        assert hf.text_config.model_type == cfg.text.model_type
        assert list(hf.text_config.layer_types) == list(cfg.text.layer_types)
        back = ModelConfig.from_hf_dict(hf.to_dict())
        assert back.vision.replace(extra=()) == cfg.vision.replace(extra=())
        assert back.text.replace(extra=()) == cfg.text.replace(extra=())


@pytest.mark.parametrize("path,value,key", [
    (("vision_config", "window_kernel_size"), [3, 3], "vision_config.window_kernel_size"),
    (("vision_config", "hidden_act"), "relu", "vision_config.hidden_act"),
    (("text_config", "hidden_act"), "gelu", "text_config.hidden_act"),
    (("text_config", "model_type"), "llama", "text_config.model_type"),
    (("merge_kernel_size",), [3, 3], "merge_kernel_size"),
    (("downsample_mode",), "8x", "downsample_mode"),
    (("insert_layer_id",), 40, "insert_layer_id"),
])
def test_unsupported_values_name_the_key(path, value, key):
    d = load_reference_dict()
    node = d
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        ModelConfig.from_hf_dict(d)


def test_unknown_layer_type_names_the_index(tmp_path):
    d = load_reference_dict()
    d["text_config"]["layer_types"][5] = "sliding_attention"
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=r"config\.json.*text_config\.layer_types\[5\]"):
        ModelConfig.from_json(tmp_path)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_json(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json(tmp_path)


def test_vocab_padding_is_ours_and_divides_the_tensor_axis():
    cfg = reference_config()
    assert cfg.text.vocab_size == 248094 and cfg.text.vocab_pad_multiple == 128
    assert cfg.text.padded_vocab_size == 248192  # 1939 * 128
    for t in (1, 2, 3, 4, 6, 8, 12, 16, 64, 256):
        text = cfg.text.with_vocab_multiple(t)
        assert text.padded_vocab_size % t == 0 and text.padded_vocab_size % 128 == 0
        assert 0 <= text.padded_vocab_size - text.vocab_size < text.vocab_pad_multiple
    assert cfg.text.with_vocab_multiple(3).vocab_pad_multiple == 384
    assert tiny_config().text.padded_vocab_size == 512  # already a multiple: no padding
    # not a Hugging Face key: config.json round-trips unchanged whatever the padding
    padded = cfg.replace(text=cfg.text.with_vocab_multiple(3))
    assert "vocab_pad_multiple" not in padded.to_hf_dict()["text_config"]
    assert padded.to_hf_dict() == cfg.to_hf_dict()
    with pytest.raises(ValueError, match="positive int"):
        cfg.text.with_vocab_multiple(0)
    with pytest.raises(ConfigError, match="vocab_pad_multiple"):
        cfg.text.replace(vocab_pad_multiple=0).validate()
    with pytest.raises(ConfigError, match="linear_num_value_heads"):
        cfg.text.replace(linear_num_value_heads=24).validate()
