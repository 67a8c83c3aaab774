"""The engine's GLM model against transformers.GlmForCausalLM (random weights, fp32).

Tolerance: both sides run the same fp32 math with different op order (fused QKV vs three matmuls,
our SDPA mask vs HF's), so differences are rounding only; 1e-5 of the logits' scale is ~100 fp32 ulps.
"""
import json

import pytest
import torch
import transformers

from engine import GLMConfig, GLMForCausalLM, GLMForScalarHead
from engine.model.generation import left_pad
from engine.model.glm import KVCache
from engine.model.hf_adapter import CheckpointMismatchError, engine_to_thudm

REL_TOL = 1e-5


def tiny(**changes) -> GLMConfig:
    base = dict(vocab_size=384, hidden_size=64, ffn_hidden_size=96, num_layers=2, num_attention_heads=4,
                num_kv_groups=2, head_dim=None, pad_token_id=0, eos_token_id=[1])
    base.update(changes)
    return GLMConfig(**base)


def hf_model(cfg: GLMConfig, seed=0):
    torch.manual_seed(seed)
    m = transformers.GlmForCausalLM(cfg.to_hf()).eval()
    with torch.no_grad():  # HF inits biases and norms to constants; randomise them so they are checked too
        for name, p in m.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    return m


def assert_close_rel(a, b, tol=REL_TOL):
    scale = b.abs().max().item()
    err = (a - b).abs().max().item()
    assert err <= tol * scale, f"max abs error {err:.3e} > {tol} x logits scale {scale:.3e}"


SHAPES = [
    dict(num_kv_groups=1),                          # multi-query
    dict(num_kv_groups=2),                          # GLM's 2 groups
    dict(num_kv_groups=4),                          # = heads (plain MHA)
    dict(head_dim=24, num_attention_heads=6, num_kv_groups=2),  # head_dim != hidden/heads and != 128
]


@pytest.mark.parametrize("changes", SHAPES, ids=["mqa", "gqa2", "mha", "headdim24"])
@pytest.mark.parametrize("seq", [1, 7, 33])
def test_logits_match_transformers(changes, seq):
    cfg = tiny(**changes)
    hf = hf_model(cfg)
    ours = GLMForCausalLM.from_hf(hf).eval()
    ids = torch.randint(0, cfg.vocab_size, (3, seq))
    with torch.no_grad():
        assert_close_rel(ours(ids), hf(ids).logits)


def test_logits_with_left_padding_match_transformers():
    cfg = tiny()
    hf = hf_model(cfg, seed=1)
    ours = GLMForCausalLM.from_hf(hf).eval()
    ids, mask = left_pad([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 21, 22, 23, 24]], cfg.pad_token_id)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=pos).logits
        got = ours(ids, attention_mask=mask)  # default positions skip the left padding
    real = mask.bool()
    assert_close_rel(got[real], ref[real])
    assert torch.isfinite(got).all()


def test_save_hf_round_trip_is_exact(tmp_path):
    cfg = tiny(num_kv_groups=1, head_dim=24)
    torch.manual_seed(0)
    ours = GLMForCausalLM(cfg).eval()
    ours.save_hf(tmp_path / "ckpt")
    hf = transformers.GlmForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    back = GLMForCausalLM.from_hf(tmp_path / "ckpt").eval()
    for k, v in ours.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        assert_close_rel(hf(ids).logits, ours(ids))
        assert torch.equal(back(ids), ours(ids))


def test_sharded_safetensors_round_trip(tmp_path):
    cfg = tiny()
    torch.manual_seed(0)
    ours = GLMForCausalLM(cfg)
    ours.save_hf(tmp_path, max_shard_bytes=50_000)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    back = GLMForCausalLM.from_hf(tmp_path)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in ours.state_dict().items())


def _write_thudm_checkpoint(path, cfg, hf):
    """A THUDM ChatGLM-layout checkpoint built from the HF one by the known renaming + QKV fusion."""
    from safetensors.torch import save_file
    hf_sd = hf.state_dict()
    thudm = {}
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}.", f"transformer.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            thudm[dst + f"self_attention.query_key_value.{kind}"] = torch.cat(
                [hf_sd[src + f"self_attn.{x}_proj.{kind}"] for x in "qkv"])
        thudm[dst + "self_attention.dense.weight"] = hf_sd[src + "self_attn.o_proj.weight"]
        thudm[dst + "input_layernorm.weight"] = hf_sd[src + "input_layernorm.weight"]
        thudm[dst + "post_attention_layernorm.weight"] = hf_sd[src + "post_attention_layernorm.weight"]
        thudm[dst + "mlp.dense_h_to_4h.weight"] = hf_sd[src + "mlp.gate_up_proj.weight"]
        thudm[dst + "mlp.dense_4h_to_h.weight"] = hf_sd[src + "mlp.down_proj.weight"]
    thudm["transformer.embedding.word_embeddings.weight"] = hf_sd["model.embed_tokens.weight"]
    thudm["transformer.encoder.final_layernorm.weight"] = hf_sd["model.norm.weight"]
    thudm["transformer.output_layer.weight"] = hf_sd["lm_head.weight"]
    thudm["transformer.rotary_pos_emb.inv_freq"] = torch.zeros(cfg.rotary_dim // 2)
    path.mkdir()
    save_file({k: v.contiguous() for k, v in thudm.items()}, str(path / "model.safetensors"))
    # auto_map would make transformers run remote code; from_hf must ignore it and run nothing
    cfg_json = {**cfg.to_chatglm(), "auto_map": {"AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration"}}
    (path / "config.json").write_text(json.dumps(cfg_json))
    (path / "modeling_chatglm.py").write_text("raise SystemExit('remote code must never run')\n")
    return thudm


def test_thudm_checkpoint_loads_to_same_logits(tmp_path):
    cfg = tiny()
    hf = hf_model(cfg, seed=2)
    _write_thudm_checkpoint(tmp_path / "thudm", cfg, hf)
    ours = GLMForCausalLM.from_hf(tmp_path / "thudm").eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 11))
    with torch.no_grad():
        assert_close_rel(ours(ids), hf(ids).logits)
    # and the engine -> THUDM names mapping is the exact inverse
    thudm = engine_to_thudm(ours.state_dict(), cfg)
    assert "transformer.encoder.layers.1.self_attention.query_key_value.weight" in thudm


def test_missing_and_misshaped_keys_are_listed(tmp_path):
    from safetensors.torch import load_file, save_file
    cfg = tiny()
    torch.manual_seed(0)
    GLMForCausalLM(cfg).save_hf(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    del sd["model.layers.1.mlp.down_proj.weight"]
    sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(5, cfg.hidden_size)
    sd["model.layers.0.extra.weight"] = torch.zeros(1)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError) as e:
        GLMForCausalLM.from_hf(tmp_path)
    msg = str(e.value)
    assert "missing keys" in msg and "model.layers.1.mlp.down_proj.weight" in msg
    assert "unexpected keys" in msg and "model.layers.0.extra.weight" in msg
    assert "wrong shapes" in msg and "model.layers.0.self_attn.k_proj.weight: checkpoint (5, 64)" in msg


def test_not_a_checkpoint_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        GLMForCausalLM.from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type 'llama' is not supported"):
        GLMForCausalLM.from_hf(tmp_path)


# ---- generation -------------------------------------------------------------------------------

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 21, 22, 23, 24]]


def test_greedy_generation_matches_transformers_generate():
    cfg = tiny(num_layers=3)
    hf = hf_model(cfg, seed=3)
    ours = GLMForCausalLM.from_hf(hf).eval()
    ids, mask = left_pad(PROMPTS, cfg.pad_token_id)
    n = 12
    ref = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                      pad_token_id=cfg.pad_token_id, eos_token_id=None)[:, ids.shape[1]:]
    out = ours.generate(PROMPTS, max_new_tokens=n, eos_token_id=[])
    assert torch.equal(out.response_ids, ref)


def test_generation_logprobs_equal_full_forward():
    cfg = tiny()
    torch.manual_seed(4)
    ours = GLMForCausalLM(cfg).eval()
    for sampling in (dict(), dict(do_sample=True, temperature=0.7, top_k=50, top_p=0.9, seed=0)):
        out = ours.generate(PROMPTS, max_new_tokens=9, eos_token_id=[], **sampling)
        with torch.no_grad():
            logits = ours(out.sequences, out.attention_mask).float() / sampling.get("temperature", 1.0)
        p = out.prompt_ids.shape[1]
        ref = logits[:, p - 1:-1].log_softmax(-1).gather(-1, out.response_ids[..., None]).squeeze(-1)
        assert (ref - out.logprobs).abs().max() <= 1e-5


def test_eos_stops_each_sequence():
    cfg = tiny()
    torch.manual_seed(5)
    ours = GLMForCausalLM(cfg).eval()
    free = ours.generate(PROMPTS, max_new_tokens=8, eos_token_id=[])
    stop_token = int(free.response_ids[0, 2])  # row 0 emits it at step 2; others may or may not
    out = ours.generate(PROMPTS, max_new_tokens=8, eos_token_id=[stop_token])
    for row in range(len(PROMPTS)):
        resp = free.response_ids[row].tolist()
        end = resp.index(stop_token) + 1 if stop_token in resp else len(resp)
        assert out.response_mask[row].sum() == end
        assert out.response_ids[row, :end].tolist() == resp[:end]
        assert (out.response_ids[row, end:] == cfg.pad_token_id).all()
        assert (out.logprobs[row, end:] == 0).all()
    assert out.responses()[0][-1] == stop_token


def test_sampling_is_seeded_and_filters():
    cfg = tiny()
    torch.manual_seed(6)
    ours = GLMForCausalLM(cfg).eval()
    a = ours.generate(PROMPTS, max_new_tokens=6, eos_token_id=[], do_sample=True, seed=11)
    b = ours.generate(PROMPTS, max_new_tokens=6, eos_token_id=[], do_sample=True, seed=11)
    assert torch.equal(a.response_ids, b.response_ids)
    # top_k=1 sampling is greedy
    greedy = ours.generate(PROMPTS, max_new_tokens=6, eos_token_id=[])
    k1 = ours.generate(PROMPTS, max_new_tokens=6, eos_token_id=[], do_sample=True, top_k=1, seed=3)
    assert torch.equal(greedy.response_ids, k1.response_ids)


@pytest.mark.parametrize("sampling", [dict(), dict(do_sample=True, temperature=0.8, top_p=0.95, seed=2)])
def test_compacting_finished_rows_changes_no_output(sampling, monkeypatch):
    """Rows that stop early leave the decoding batch (KVCache.select_rows); every row's tokens, mask and
    log-probs equal those of a run that decodes all rows to the end. Log-probs to 1e-5: the decoded
    batch is smaller, so the matmuls may block differently (fp32 rounding only)."""
    cfg = tiny()
    torch.manual_seed(8)
    ours = GLMForCausalLM(cfg).eval()
    prompts = [[5 + i, 6 + 2 * i, 7] for i in range(8)] + PROMPTS
    free = ours.generate(prompts, max_new_tokens=10, eos_token_id=[], compact=False, **sampling)
    # stop tokens that end most rows at different early steps, leaving a long tail
    stops = sorted({int(free.response_ids[r, r % 4]) for r in range(len(prompts) - 2)})
    calls = []
    original = KVCache.select_rows
    monkeypatch.setattr(KVCache, "select_rows", lambda self, idx: (calls.append(idx.numel()), original(self, idx)))
    full = ours.generate(prompts, max_new_tokens=10, eos_token_id=stops, compact=False, **sampling)
    assert calls == []
    compacted = ours.generate(prompts, max_new_tokens=10, eos_token_id=stops, **sampling)
    assert calls and calls == sorted(calls, reverse=True)  # the batch shrank, at least once
    assert full.response_mask.sum(1).min() < full.response_mask.shape[1]  # some rows stopped early
    assert torch.equal(compacted.response_ids, full.response_ids)
    assert torch.equal(compacted.response_mask, full.response_mask)
    assert (compacted.logprobs - full.logprobs).abs().max() <= 1e-5


@pytest.mark.parametrize("sampling", [dict(), dict(do_sample=True, top_k=20, seed=4)])
def test_repeated_prompts_are_prefilled_once(sampling, monkeypatch):
    """Several responses per prompt (PPO, GRPO): the prefill runs on the 3 distinct prompts and their KV
    cache is copied to the 9 rows; tokens, masks and log-probs equal a prefill of all 9 rows (log-probs to
    1e-5: other GEMM shapes round differently). The same ids under another left padding stay distinct."""
    cfg = tiny()
    torch.manual_seed(10)
    model = GLMForCausalLM(cfg).eval()
    prompts = [p for p in PROMPTS for _ in range(3)]
    caches = []
    new_cache = GLMForCausalLM.new_cache
    monkeypatch.setattr(GLMForCausalLM, "new_cache", lambda self, b, n, **kw: (caches.append(b), new_cache(self, b, n, **kw))[1])
    shared = model.generate(prompts, max_new_tokens=6, eos_token_id=[], **sampling)
    alone = model.generate(prompts, max_new_tokens=6, eos_token_id=[], share_prompts=False, **sampling)
    assert caches == [3, 9]
    assert torch.equal(shared.response_ids, alone.response_ids) and torch.equal(shared.response_mask, alone.response_mask)
    assert (shared.logprobs - alone.logprobs).abs().max() <= 1e-5
    ids, mask = left_pad([[5, 6, 7], [5, 6, 7]], cfg.pad_token_id)
    ids, mask = torch.cat([ids, ids]), torch.cat([mask, mask])
    mask[2:, 0] = 0  # rows 2 and 3: the same ids, the first one now padding
    caches.clear()
    model.generate(ids, mask, max_new_tokens=2, eos_token_id=[])
    assert caches == [2]


def test_gumbel_sampling_never_picks_a_filtered_token_or_nan(monkeypatch):
    """torch.rand can return exactly 0: the noise must stay finite so a filtered token can never win
    (all-zero draws make every kept token -inf otherwise, and argmax returns token 0); NaN logits raise."""
    from engine.model.generation import SamplingParams, sample_tokens
    scaled = torch.full((2, 10), -3.0)
    scaled[0, 5], scaled[1, 7] = 2.0, 4.0
    rows = torch.arange(2)
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: torch.zeros(*shape, dtype=torch.float32))
    for params in (SamplingParams(do_sample=True, top_k=1), SamplingParams(do_sample=True, top_p=0.5)):
        assert sample_tokens(scaled, params, rows, 2, None).tolist() == [5, 7]
    monkeypatch.undo()
    cfg = tiny()
    torch.manual_seed(9)
    model = GLMForCausalLM(cfg).eval()
    with torch.no_grad():
        model.output_layer.weight[3] = float("nan")
    with pytest.raises(FloatingPointError, match="logits hold NaN at decoding step 0"):
        model.generate(PROMPTS, max_new_tokens=2, do_sample=True, seed=0)


def test_filter_logits_top_p():
    from engine.model.generation import filter_logits
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, 0, 0.8))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(filter_logits(logits, 0, 0.81))
    assert kept.tolist() == [[True, True, True, False]]
    assert torch.isfinite(filter_logits(logits, 2, 1.0)).tolist() == [[True, True, False, False]]


def test_kv_cache_decoding_equals_full_forward():
    cfg = tiny()
    torch.manual_seed(7)
    ours = GLMForCausalLM(cfg).eval()
    ids, mask = left_pad(PROMPTS, cfg.pad_token_id)
    extra = torch.randint(0, cfg.vocab_size, (3, 4))
    full_ids = torch.cat([ids, extra], 1)
    full_mask = torch.cat([mask, torch.ones_like(extra)], 1)
    with torch.no_grad():
        full = ours(full_ids, full_mask)
        cache = ours.new_cache(3, full_ids.shape[1])
        steps = [ours(ids, mask, cache=cache)]
        for t in range(4):
            steps.append(ours(extra[:, t:t + 1], full_mask[:, :ids.shape[1] + t + 1], cache=cache))
    inc = torch.cat(steps, 1)
    real = full_mask.bool()
    assert_close_rel(inc[real], full[real])


@pytest.mark.parametrize("bad, match", [
    ([], "prompt batch is empty"),
    ([[1, 2], []], "prompt 1 is empty"),
])
def test_bad_prompts(bad, match):
    ours = GLMForCausalLM(tiny())
    with pytest.raises(ValueError, match=match):
        ours.generate(bad, max_new_tokens=2)


def test_bad_sampling_and_inputs():
    ours = GLMForCausalLM(tiny())
    with pytest.raises(ValueError, match="temperature must be > 0"):
        ours.generate([[1]], temperature=0.0)
    with pytest.raises(ValueError, match="top_p must be in"):
        ours.generate([[1]], top_p=0.0)
    with pytest.raises(ValueError, match="left-padded"):
        ours.generate(torch.tensor([[3, 0]]), torch.tensor([[1, 0]]))
    with pytest.raises(ValueError, match="input_ids must be an integer tensor"):
        ours(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="attention_mask shape"):
        ours(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 4))


# ---- scalar head (critic / reward model) -------------------------------------------------------

def test_scalar_head_reward_reads_last_real_token():
    cfg = tiny()
    torch.manual_seed(8)
    lm = GLMForCausalLM(cfg)
    rm = GLMForScalarHead.from_causal_lm(lm).eval()
    for k, v in lm.state_dict().items():
        if k != "output_layer.weight":
            assert torch.equal(v, rm.state_dict()[k])
    ids, mask = left_pad(PROMPTS, cfg.pad_token_id)
    with torch.no_grad():
        rewards = rm.reward(ids, mask)
        values = rm(ids, mask)
        assert values.shape == ids.shape and rewards.shape == (3,)
        for row, p in enumerate(PROMPTS):
            alone = rm.reward(torch.tensor([p]))
            assert torch.allclose(rewards[row], alone[0], rtol=1e-5, atol=1e-6)
        # right padding works too
        right = torch.tensor([PROMPTS[1] + [0, 0]]), torch.tensor([[1, 1, 1, 0, 0]])
        assert torch.allclose(rm.reward(*right), rm.reward(torch.tensor([PROMPTS[1]])), rtol=1e-5, atol=1e-6)
