"""GLMConfig: presets, YAML, HF/THUDM conversion, and validation errors that name the problem."""
import pytest

from engine.config import GLMConfig, available_presets, load_config


def test_presets_match_published_configs():
    c3 = GLMConfig.preset("chatglm3-6b")
    assert (c3.num_layers, c3.hidden_size, c3.ffn_hidden_size, c3.vocab_size) == (28, 4096, 13696, 65024)
    assert (c3.num_attention_heads, c3.num_kv_groups, c3.kv_channels, c3.rotary_dim) == (32, 2, 128, 64)
    assert abs(c3.num_parameters() / 1e9 - 6.24) < 0.01  # ChatGLM3-6B has 6.24B parameters
    g4 = GLMConfig.preset("glm-4-9b")
    assert (g4.num_layers, g4.vocab_size, g4.layernorm_epsilon) == (40, 151552, 1.5625e-07)
    assert abs(g4.num_parameters() / 1e9 - 9.40) < 0.01  # GLM-4-9B has 9.40B parameters
    assert {"tiny", "chatglm3-6b", "glm-4-9b"} <= set(available_presets())


def test_tiny_divides_every_test_layout():
    t = GLMConfig.preset("tiny")
    for tp in (1, 2, 4):
        assert t.num_attention_heads % tp == 0
        assert t.num_kv_groups % tp == 0 or tp % t.num_kv_groups == 0
    assert t.num_layers % (4 * 2) == 0  # pp=4 x vpp=2


def test_yaml_with_preset_override(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("model:\n  preset: tiny\n  num_layers: 2\n")
    c = load_config(str(p))
    assert c.num_layers == 2 and c.hidden_size == 256
    assert load_config("tiny") == GLMConfig.preset("tiny")


def test_hf_round_trip():
    t = GLMConfig.preset("tiny")
    back = GLMConfig.from_hf(t.to_hf())
    assert back.replace(name=t.name, initializer_range=t.initializer_range) == t


def test_thudm_field_names():
    thudm = {"num_layers": 28, "padded_vocab_size": 65024, "hidden_size": 4096, "ffn_hidden_size": 13696,
             "kv_channels": 128, "num_attention_heads": 32, "seq_length": 8192, "layernorm_epsilon": 1e-5,
             "rmsnorm": True, "apply_residual_connection_post_layernorm": False, "post_layer_norm": True,
             "add_bias_linear": False, "add_qkv_bias": True, "multi_query_attention": True,
             "multi_query_group_num": 2, "rope_ratio": 1, "eos_token_id": 2, "pad_token_id": 0}
    c = GLMConfig.from_chatglm(thudm)
    assert c.replace(name="chatglm3-6b") == GLMConfig.preset("chatglm3-6b")
    assert GLMConfig.from_chatglm(c.to_chatglm()).replace(name=c.name) == c
    assert GLMConfig.from_chatglm({**thudm, "rope_ratio": 500}).rope_base == 5_000_000


@pytest.mark.parametrize("changes, words", [
    (dict(hidden_size=250, head_dim=None), ["head_dim", "hidden_size=250", "num_attention_heads=8"]),
    (dict(num_kv_groups=3), ["num_attention_heads=8", "num_kv_groups=3"]),
    (dict(rotary_fraction=0.25, head_dim=36), ["rotary_fraction=0.25", "head_dim=36", "9.0"]),
    (dict(rotary_fraction=1.5), ["rotary_fraction=1.5"]),
    (dict(num_layers=0), ["num_layers=0"]),
    (dict(pad_token_id=5000), ["pad_token_id=5000", "vocab_size=4096"]),
])
def test_invalid_configs_name_the_fields(changes, words):
    with pytest.raises(ValueError) as e:
        GLMConfig.preset("tiny").replace(**changes)
    for w in words:
        assert w in str(e.value)


def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match="unknown model preset 'glm-99b'.*tiny"):
        GLMConfig.preset("glm-99b")
    with pytest.raises(ValueError, match="unknown GLMConfig fields \\['hiden_size'\\]"):
        GLMConfig.from_dict({"hiden_size": 3})
    with pytest.raises(ValueError, match="glm4.*sandwich"):
        GLMConfig.from_hf({"model_type": "glm4"})
