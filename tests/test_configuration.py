import dataclasses
import json

import pytest
import torch
import transformers

from apertus_hf import PRESETS, ApertusConfig, ApertusForCausalLM
from tests.helpers import tiny_config

StockConfig = transformers.models.apertus.ApertusConfig

# config.json of the released swiss-ai/Apertus-8B-Instruct-2509 (v4.56 era): rope_theta + rope_scaling and the
# leftover architecture flags, as the release wrote them.
RELEASE_8B_CONFIG = {
    "architectures": ["ApertusForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 68,
    "hidden_act": "xielu",
    "hidden_dropout": 0.0,
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 21504,
    "max_position_embeddings": 65536,
    "mlp_bias": False,
    "model_type": "apertus",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pad_token_id": 3,
    "post_norm": False,
    "qk_norm": True,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 12000000,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.56.0.dev0",
    "use_cache": True,
    "vocab_size": 131072,
}


def test_fields_and_defaults_equal_stock_config():
    ours = {field.name: field.default for field in dataclasses.fields(ApertusConfig)}
    stock = {field.name: field.default for field in dataclasses.fields(StockConfig)}
    assert ours == stock
    assert ApertusConfig().to_dict().keys() == StockConfig().to_dict().keys()
    assert ApertusConfig().rope_parameters == StockConfig().rope_parameters


def test_config_json_is_interchangeable_with_stock(tmp_path):
    ApertusConfig.from_preset("apertus-8b").save_pretrained(tmp_path / "ours")
    StockConfig(**ApertusConfig.from_preset("apertus-8b").to_diff_dict()).save_pretrained(tmp_path / "stock")
    ours_json = json.loads((tmp_path / "ours" / "config.json").read_text())
    stock_json = json.loads((tmp_path / "stock" / "config.json").read_text())
    assert ours_json.keys() == stock_json.keys()
    assert ours_json == stock_json

    assert (
        StockConfig.from_pretrained(tmp_path / "ours").to_dict()
        == StockConfig.from_pretrained(tmp_path / "stock").to_dict()
    )
    assert (
        ApertusConfig.from_pretrained(tmp_path / "stock").to_dict()
        == ApertusConfig.from_pretrained(tmp_path / "ours").to_dict()
    )


def test_head_dim_is_serialized_only_when_set(tmp_path):
    assert "head_dim" not in ApertusConfig().to_dict()
    config = tiny_config(head_dim=24)
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["head_dim"] == 24
    assert StockConfig.from_pretrained(tmp_path).head_dim == 24
    assert ApertusConfig.from_pretrained(tmp_path).resolved_head_dim == 24


def test_release_8b_config_json_loads(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(RELEASE_8B_CONFIG))
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, ApertusConfig)
    assert config.rope_parameters == {
        "rope_type": "llama3",
        "rope_theta": 12000000,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert (config.num_key_value_heads, config.intermediate_size, config.eos_token_id) == (8, 21504, 68)
    assert config.dtype == torch.bfloat16
    preset = ApertusConfig.from_preset("apertus-8b")
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        assert getattr(config, name) == getattr(preset, name)
    with torch.device("meta"):
        model = ApertusForCausalLM(config)
    assert 8.0e9 < model.num_parameters() < 8.1e9


@pytest.mark.parametrize(
    ("name", "layers", "hidden", "heads", "kv_heads", "mlp", "low", "high"),
    [
        ("apertus-8b", 32, 4096, 32, 8, 21504, 8.0e9, 8.1e9),
        ("apertus-70b", 80, 8192, 64, 8, 43008, 70.0e9, 71.0e9),
    ],
)
def test_release_presets_have_release_shapes(name, layers, hidden, heads, kv_heads, mlp, low, high):
    config = ApertusConfig.from_preset(name)
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (layers, hidden, heads)
    assert (config.num_key_value_heads, config.intermediate_size, config.resolved_head_dim) == (kv_heads, mlp, 128)
    assert config.vocab_size == 131072 and config.max_position_embeddings == 65536
    assert config.rope_parameters["rope_type"] == "llama3" and config.rope_parameters["factor"] == 8.0
    with torch.device("meta"):
        model = ApertusForCausalLM(config)
    assert low < model.num_parameters() < high


def test_small_presets_build_and_presets_are_not_shared():
    for name in ("tiny", "small"):
        model = ApertusForCausalLM(ApertusConfig.from_preset(name))
        assert model.num_parameters() > 0
    overridden = ApertusConfig.from_preset("tiny", rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    assert overridden.rope_parameters["rope_type"] == "default"
    assert PRESETS["tiny"]["rope_parameters"]["rope_type"] == "llama3"


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="apertus-8b"):
        ApertusConfig.from_preset("apertus-9b")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"hidden_size": 65}, "hidden_size=65 must be divisible by num_attention_heads=4"),
        ({"num_key_value_heads": 3}, "num_key_value_heads=3 must divide num_attention_heads=4"),
        ({"num_key_value_heads": 0}, "num_key_value_heads=0 must be a positive integer"),
        ({"num_hidden_layers": 0}, "num_hidden_layers=0 must be a positive integer"),
        ({"head_dim": 15}, "head_dim=15 must be a positive even integer"),
        ({"hidden_act": "swoosh"}, "hidden_act='swoosh' is not an activation of transformers' ACT2FN"),
        ({"rope_parameters": {"rope_type": "spiral", "rope_theta": 1e4}}, "rope_type'\\]='spiral' is unknown"),
        ({"pad_token_id": 256}, r"pad_token_id=256 lies outside the vocabulary \[0, 256\)"),
        ({"eos_token_id": [2, 999]}, r"eos_token_id=\[2, 999\] lies outside the vocabulary"),
        ({"bos_token_id": -1}, "bos_token_id=-1 lies outside the vocabulary"),
        ({"rms_norm_eps": 0.0}, "rms_norm_eps=0.0 must be positive"),
        ({"attention_dropout": 1.5}, "attention_dropout=1.5 must be in"),
        ({"attention_bias": True}, "attention_bias=True is not an Apertus architecture"),
        ({"qk_norm": False}, "qk_norm=False describes another architecture"),
        ({"post_norm": True}, "post_norm=True describes another architecture"),
        ({"mlp_bias": True}, "mlp_bias=True describes another architecture"),
    ],
)
def test_invalid_values_raise_value_error_naming_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_invalid_config_json_fails_to_load_with_value_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**RELEASE_8B_CONFIG, "num_key_value_heads": 7}))
    with pytest.raises(ValueError, match="num_key_value_heads=7 must divide num_attention_heads=32"):
        ApertusConfig.from_pretrained(tmp_path)
