"""GLMForScalarHead (reward model / critic) against transformers.GlmForSequenceClassification (num_labels=1).

Random weights, fp32. Tolerance: both sides run the same fp32 math, possibly in another op order (fused
QKV vs three matmuls, our SDPA mask vs HF's), so per-token values can differ by rounding only; 1e-5 of
the values' scale is ~100 fp32 ulps (observed: exactly 0 on CPU, where both hit the same kernels). The
reward is a gather of one value per row on both sides (exact), so it inherits the same bound.
"""
import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from engine import GLMConfig, GLMForCausalLM, GLMForScalarHead
from engine.model.hf_adapter import CheckpointMismatchError, engine_to_thudm, read_checkpoint_dir
from engine.parallel import ParallelLayout
from engine.train.checkpoint import save_checkpoint
from launch.convert import main as convert_main

REL_TOL = 1e-5
PAD = 0
# real tokens never equal PAD: HF pools at the last token != pad_token_id, we at the last masked-in one
ROWS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 21, 22, 23, 24]]


def tiny(**changes) -> GLMConfig:
    base = dict(vocab_size=384, hidden_size=64, ffn_hidden_size=96, num_layers=2, num_attention_heads=4,
                num_kv_groups=2, head_dim=None, pad_token_id=PAD, eos_token_id=[1])
    base.update(changes)
    return GLMConfig(**base)


def hf_reward_model(cfg: GLMConfig, seed=0, num_labels=1):
    torch.manual_seed(seed)
    hf_cfg = cfg.to_hf()  # partial_rotary_factor=0.5, attention_bias=True, explicit pad/eos ids
    hf_cfg.num_labels = num_labels
    m = transformers.GlmForSequenceClassification(hf_cfg).eval()
    with torch.no_grad():  # HF inits biases and norms to constants; randomise them so they are checked too
        for name, p in m.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(1.0 if "norm" in name else 0.0, 0.1)
        m.score.weight.normal_(0.0, cfg.hidden_size ** -0.5)  # values of order 1, not 0.02
    return m


def random_scalar_head(cfg: GLMConfig, seed=0) -> GLMForScalarHead:
    torch.manual_seed(seed)
    model = GLMForScalarHead(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    return model


def batch(padding: str):
    """ids, attention mask ``[3, 7]`` and position ids (real tokens counted from 0) for ROWS."""
    s = max(map(len, ROWS))
    ids = torch.full((len(ROWS), s), PAD)
    mask = torch.zeros(len(ROWS), s, dtype=torch.long)
    for r, row in enumerate(ROWS):
        cols = slice(s - len(row), s) if padding == "left" else slice(0, len(row))
        ids[r, cols], mask[r, cols] = torch.tensor(row), 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def hf_values(hf, ids, mask, pos) -> torch.Tensor:
    """Per-token score ``[b, s]``: HF's ``logits`` are already pooled to ``[b, num_labels]``."""
    hidden = hf.model(ids, attention_mask=mask, position_ids=pos).last_hidden_state
    return hf.score(hidden)[..., 0]


def assert_close_rel(a, b, tol=REL_TOL):
    scale = b.abs().max().item()
    err = (a - b).abs().max().item()
    assert err <= tol * scale, f"max abs error {err:.3e} > {tol} x values scale {scale:.3e}"


def assert_same_rewards(ours: GLMForScalarHead, hf, padding: str):
    ids, mask, pos = batch(padding)
    with torch.no_grad():
        values, want_values = ours(ids, mask), hf_values(hf, ids, mask, pos)
        rewards, want_rewards = ours.reward(ids, mask), hf(ids, attention_mask=mask, position_ids=pos).logits[:, 0]
    real = mask.bool()
    assert_close_rel(values[real], want_values[real])
    assert_close_rel(rewards, want_rewards)


@pytest.mark.parametrize("changes", [dict(), dict(num_kv_groups=1, head_dim=24, num_attention_heads=6)],
                         ids=["gqa2", "mqa-headdim24"])
@pytest.mark.parametrize("padding", ["right", "left"])
def test_values_and_rewards_match_transformers(changes, padding):
    cfg = tiny(**changes)
    hf = hf_reward_model(cfg)
    assert_same_rewards(GLMForScalarHead.from_hf(hf).eval(), hf, padding)


def test_value_head_is_bias_free():
    model = GLMForScalarHead(tiny())
    assert model.value_head.bias is None
    assert [n for n in model.state_dict() if n.startswith("value_head")] == ["value_head.weight"]


@pytest.mark.parametrize("max_shard_bytes", [5 * 2**30, 50_000], ids=["one-file", "sharded"])
def test_save_hf_loads_in_transformers(tmp_path, max_shard_bytes):
    cfg = tiny()
    ours = random_scalar_head(cfg, seed=1)
    ours.save_hf(tmp_path, max_shard_bytes=max_shard_bytes)
    assert (tmp_path / "model.safetensors.index.json").is_file() == (max_shard_bytes < 2**30)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["architectures"] == ["GlmForSequenceClassification"] and raw["pad_token_id"] == PAD
    assert raw["num_labels"] == 1 and raw["id2label"] == {"0": "LABEL_0"} and raw["label2id"] == {"LABEL_0": 0}
    names = set(read_checkpoint_dir(tmp_path))
    assert "score.weight" in names and all(n.startswith("model.") for n in names - {"score.weight"})
    hf = transformers.GlmForSequenceClassification.from_pretrained(tmp_path).eval()
    assert hf.config.num_labels == 1
    for padding in ("right", "left"):
        assert_same_rewards(ours, hf, padding)


def test_from_hf_directory_and_model_and_exact_round_trip(tmp_path):
    cfg = tiny()
    hf = hf_reward_model(cfg, seed=2)
    hf.save_pretrained(tmp_path / "hf")
    from_dir = GLMForScalarHead.from_hf(tmp_path / "hf").eval()
    from_model = GLMForScalarHead.from_hf(hf).eval()
    for k, v in from_model.state_dict().items():
        assert torch.equal(v, from_dir.state_dict()[k]), k
    assert_same_rewards(from_dir, hf, "left")
    # HF -> engine -> HF gives back the very same tensors, and engine -> HF -> engine the same model
    from_dir.save_hf(tmp_path / "ours")
    written = read_checkpoint_dir(tmp_path / "ours")
    hf_sd = hf.state_dict()
    assert set(written) == set(hf_sd)
    for k, v in hf_sd.items():
        assert torch.equal(v, written[k]), k
    back = GLMForScalarHead.from_hf(tmp_path / "ours").eval()
    for k, v in from_dir.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    ids, mask, _ = batch("right")
    with torch.no_grad():
        assert torch.equal(back.reward(ids, mask), from_dir.reward(ids, mask))


def test_num_labels_other_than_one_is_refused(tmp_path):
    hf = hf_reward_model(tiny(), num_labels=2)
    with pytest.raises(ValueError, match="num_labels=2; the engine's scalar head .* needs num_labels=1"):
        GLMForScalarHead.from_hf(hf)
    hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="num_labels=2"):
        GLMForScalarHead.from_hf(tmp_path)


def test_wrong_kind_of_checkpoint_is_refused(tmp_path):
    cfg = tiny()
    torch.manual_seed(3)
    GLMForCausalLM(cfg).save_hf(tmp_path / "lm")
    with pytest.raises(ValueError, match=r"is a causal LM.*from_causal_lm"):
        GLMForScalarHead.from_hf(tmp_path / "lm")
    with pytest.raises(ValueError, match=r"is a causal LM.*from_causal_lm"):
        GLMForScalarHead.from_hf(transformers.GlmForCausalLM(cfg.to_hf()))
    # the explicit way to start a reward model from an LM: trunk copied, fresh head
    rm = GLMForScalarHead.from_causal_lm(GLMForCausalLM.from_hf(tmp_path / "lm"))
    assert rm.value_head.weight.shape == (1, cfg.hidden_size)
    random_scalar_head(cfg).save_hf(tmp_path / "rm")
    with pytest.raises(ValueError, match="GlmForSequenceClassification .*load it with GLMForScalarHead.from_hf"):
        GLMForCausalLM.from_hf(tmp_path / "rm")
    with pytest.raises(ValueError, match="THUDM ChatGLM has no reward-model layout"):
        engine_to_thudm(rm.state_dict(), cfg)
    (tmp_path / "thudm").mkdir()
    (tmp_path / "thudm" / "config.json").write_text(json.dumps(cfg.to_chatglm()))
    with pytest.raises(ValueError, match="THUDM has no reward-model layout"):
        GLMForScalarHead.from_hf(tmp_path / "thudm")


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    cfg = tiny()
    random_scalar_head(cfg).save_hf(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    sd["lm_head.weight"] = sd.pop("score.weight").expand(cfg.vocab_size, -1).contiguous()
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError) as e:
        GLMForScalarHead.from_hf(tmp_path)
    msg = str(e.value)
    assert "missing keys (1): ['score.weight']" in msg and "unexpected keys (1): ['lm_head.weight']" in msg


# ---- launch.convert ---------------------------------------------------------------------------

def test_convert_scalar_head_checkpoint_to_hf(tmp_path, capsys):
    cfg = tiny()
    ours = random_scalar_head(cfg, seed=4)
    save_checkpoint(tmp_path / "ckpt", 3, ours, None, ParallelLayout.single(), cfg)
    assert convert_main(["--checkpoint", str(tmp_path / "ckpt"), "--output", str(tmp_path / "hf")]) == 0
    hf = transformers.GlmForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    for padding in ("right", "left"):
        assert_same_rewards(ours, hf, padding)
    assert convert_main(["--checkpoint", str(tmp_path / "ckpt"), "--output", str(tmp_path / "t"), "--to", "thudm"]) == 2
    assert "THUDM ChatGLM has no reward-model layout" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_convert_hf_reward_model_round_trips(tmp_path, capsys):
    hf = hf_reward_model(tiny(), seed=5)
    hf.save_pretrained(tmp_path / "in")
    assert convert_main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["GlmForSequenceClassification"]
    written = read_checkpoint_dir(tmp_path / "out")
    assert set(written) == set(hf.state_dict())
    assert all(torch.equal(v, written[k]) for k, v in hf.state_dict().items())
    assert convert_main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "t"), "--to", "thudm"]) == 2
    assert "THUDM ChatGLM has no reward-model layout" in capsys.readouterr().err


def test_config_without_architectures_is_told_apart_by_its_tensors(tmp_path):
    cfg = tiny()
    ours = random_scalar_head(cfg)
    ours.save_hf(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    del raw["architectures"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    back = GLMForScalarHead.from_hf(tmp_path)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in ours.state_dict().items())
    with pytest.raises(ValueError, match="not a causal LM"):
        GLMForCausalLM.from_hf(tmp_path)
    # launch.convert --input tells it apart the same way
    from engine.model.hf_adapter import is_reward_model_dir
    from launch.convert import convert
    assert is_reward_model_dir(tmp_path)
    convert(str(tmp_path), str(tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["GlmForSequenceClassification"]
