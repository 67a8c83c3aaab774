"""LoRA adapters (engine/model/lora.py): numerics against an fp64 weight-space reference, the base model
under ``lora_disabled``, merging, config errors, and every TP x PP x DP layout against one process.

The reference writes the adapted projection the other way round from the engine: the engine adds
``scale * (x A^T) B^T`` to the projection's output (inside the TP layers, before their reductions); the
reference runs the plain model with each weight replaced by ``W + scale * B @ A`` (torch.func), with A
and B as the differentiated leaves. In fp64 the two agree to rounding (~1e-15 relative), so the
1e-9 tolerance only allows for summation order; a wrong scale, a factor applied transposed or a
missing adapter is off by O(1).
"""
import copy
import dataclasses
import math

import pytest
import torch

import kernels
from engine.config import GLMConfig
from engine.model.glm import GLMForCausalLM
from engine.model.lora import (LORA_TARGETS, LoRAConfig, add_lora, adapters, has_lora, lora_disabled, lora_record,
                               lora_shapes, merge_lora_, merge_state_dict)
from engine.parallel import ParallelDims, ParallelLayout
from engine.parallel.pipeline import build_model_chunks
from engine.parallel.sharding import gather_full_state_dict, load_full_into
from engine.train import LRConfig, LRSchedule, OptimizerConfig, TrainConfig, Trainer, build_optimizer
from engine.train.checkpoint import CheckpointError, load_checkpoint, load_model_weights, save_checkpoint
from tests._dist import run_distributed
from tests.parallel.test_layouts import G, S, STEPS, _batches

LORA = LoRAConfig(rank=4, alpha=8.0)


def _config(layers: int = 2) -> GLMConfig:
    return GLMConfig.preset("tiny").replace(num_layers=layers)


def _random_b(model, seed: int = 1) -> None:
    """B starts at zero (the adapted model equals the base model); give it values so A's gradient and the
    adapters' effect are not zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in adapters(model):
            a.B.copy_(torch.randn(a.B.shape, generator=g, dtype=torch.float64) * 0.05)


def _batch(config, rows=3, seq=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (rows, seq + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def test_adapters_match_fp64_weight_space_reference():
    config = _config()
    torch.manual_seed(0)
    model = GLMForCausalLM(config).double()
    base = copy.deepcopy(model)
    trainable = add_lora(model, LORA, seed=3)
    _random_b(model)
    ids, labels = _batch(config)
    loss = kernels.cross_entropy(model(ids), labels)
    loss.backward()

    # reference: W' = W + scale B A in the plain model, A and B the leaves
    leaves = {}
    weights = dict(base.named_parameters())
    for name, module in model.named_modules():
        if getattr(module, "lora", None) is not None:
            a = module.lora.A.detach().clone().requires_grad_()
            b = module.lora.B.detach().clone().requires_grad_()
            leaves[name] = (a, b)
            weights[name + ".weight"] = weights[name + ".weight"].detach() + LORA.scale * b @ a
    ref_loss = kernels.cross_entropy(torch.func.functional_call(base, weights, (ids,)), labels)
    ref_loss.backward()

    assert len(leaves) == config.num_layers * len(LORA_TARGETS)
    assert math.isclose(loss.item(), ref_loss.item(), rel_tol=1e-12)
    for name, (a, b) in leaves.items():
        lora = model.get_submodule(name).lora
        for got, want in ((lora.A.grad, a.grad), (lora.B.grad, b.grad)):
            assert want.abs().max() > 0
            assert (got - want).abs().max() <= 1e-9 * want.abs().max(), name
    # only the adapters train: the base weights are frozen and get no gradient
    assert {id(p) for p in trainable} == {id(p) for p in model.parameters() if p.requires_grad}
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora." not in n)


def test_fresh_adapters_disabled_adapters_and_merging():
    config = _config()
    torch.manual_seed(0)
    model = GLMForCausalLM(config)
    ids, _ = _batch(config)
    with torch.no_grad():
        base_out = model(ids)
        add_lora(model, LORA, seed=3)
        assert torch.equal(model(ids), base_out)  # B = 0: the adapted model starts as the base model
        _random_b(model)
        adapted = model(ids)
        assert (adapted - base_out).abs().max() > 1e-2
        with lora_disabled(model):
            assert torch.equal(model(ids), base_out)  # the reference model, without a copy
        assert torch.equal(model(ids), adapted)  # adapters back on after the context
        merged = merge_lora_(copy.deepcopy(model))
        assert not has_lora(merged) and not any(".lora." in n for n, _ in merged.named_parameters())
        # fp32: the merged weight is rounded once; outputs of size ~1 agree to a few ulps of the logits
        assert (merged(ids) - adapted).abs().max() <= 1e-5 * adapted.abs().max()


def test_targets_subset_and_shapes():
    config = _config()
    model = GLMForCausalLM(config)
    add_lora(model, LoRAConfig(rank=2, targets=("qkv", "down")), seed=0)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == set(lora_shapes(config, LoRAConfig(rank=2, targets=("qkv", "down"))))
    assert {n.split(".")[3] for n in names} == {"qkv", "down"}
    qkv = model.get_submodule("layers.0.attention.qkv").lora
    assert qkv.A.shape == (2, config.hidden_size) and qkv.B.shape == (config.qkv_size, 2)
    bound = 1 / math.sqrt(config.hidden_size)
    assert qkv.A.abs().max() <= bound and qkv.A.std() > bound / 3 and torch.count_nonzero(qkv.B) == 0


@pytest.mark.parametrize("raw,match", [
    ({"rank": -1}, "rank=-1"), ({"rank": 1.5}, "rank=1.5"), ({"rank": 4, "alpha": 0}, "alpha=0"),
    ({"rank": 4, "alpha": float("nan")}, "alpha=nan"), ({"rank": 4, "targets": ["qkv", "o_proj"]}, "targets"),
    ({"rank": 4, "targets": ["qkv", "qkv"]}, "at most once"), ({"rank": 4, "targets": []}, "non-empty"),
    ({"rank": 4, "targets": "qkv"}, "non-empty list"), ({"rank": 4, "dropout": 0.1}, "unknown lora keys"),
])
def test_config_errors(raw, match):
    with pytest.raises(ValueError, match=match):
        LoRAConfig.from_dict(raw)


def test_add_lora_errors():
    from engine.model.glm import GLMForScalarHead
    model = GLMForCausalLM(_config())
    with pytest.raises(ValueError, match="rank > 0"):
        add_lora(model, LoRAConfig(rank=0))
    add_lora(model, LORA)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        add_lora(model, LORA)
    with pytest.raises(ValueError, match="the language model has LoRA adapters; fold them"):
        GLMForScalarHead.from_causal_lm(model)


def test_lora_disabled_nests():
    model = GLMForCausalLM(_config())
    add_lora(model, LORA)
    with lora_disabled(model):
        with lora_disabled(model):
            pass
        assert not any(a.enabled for a in adapters(model))  # the inner exit keeps the outer's state
    assert all(a.enabled for a in adapters(model))


# ---- every layout trains like one process ------------------------------------------------------------
# the global batches of tests/parallel/test_layouts.py: G rows of S tokens, STEPS + 1 of them, labels ignored unevenly
LR = LRConfig(lr=3e-3, min_lr=3e-4, warmup_steps=1, style="cosine")
OPT = dict(weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, clip_grad=0.5)  # below the norms (~0.75): clipping acts
# name -> (tp, pp, dp, sequence_parallel, OptimizerConfig extras); tiny has 2 KV groups, so tp4 replicates them
CASES = {"tp4_kv_sp": (4, 1, 1, True, {}), "tp2_pp2": (2, 2, 1, False, {}),
         "tp2_dp2_zero_sp": (2, 1, 2, True, {"use_distributed_optimizer": True}),
         "tp2_pp2_bf16": (2, 2, 1, False, {"mixed_precision": "bf16"})}
BF16_GRAD_REL, BF16_LOSS_REL = 5e-2, 5e-3  # as tests/parallel/test_layouts.py: bf16 weights and activations


def _full_state(config) -> dict:
    """Base weights and adapters (random B) of the full model, fp32."""
    torch.manual_seed(0)
    model = GLMForCausalLM(config)
    add_lora(model, LORA, seed=5)
    _random_b(model)
    return {k: v.float() for k, v in model.state_dict().items()}


def _single_process(config):
    """torch.optim.AdamW on the adapters of one model: losses before each step, the first step's grads,
    the final adapters."""
    model = GLMForCausalLM(config)
    add_lora(model, LORA)
    model.load_state_dict(_full_state(config))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR.lr, betas=OPT["betas"], eps=OPT["eps"], weight_decay=OPT["weight_decay"],
                            foreach=False)
    schedule = LRSchedule(LR, STEPS)
    losses, grads, norms = [], None, []
    for step, batch in enumerate(_batches(config)):
        loss = kernels.cross_entropy(model(batch["input_ids"]), batch["labels"])
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        if grads is None:
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        norm = torch.stack([p.grad.double().square().sum() for p in params]).sum().sqrt().item()
        norms.append(norm)
        for p in params:
            p.grad.mul_(min(1.0, OPT["clip_grad"] / (norm + 1e-6)))
        for group in opt.param_groups:
            group["lr"] = schedule(step)
        opt.step()
    return losses, grads, norms, {n: p.detach().clone() for n, p in model.state_dict().items()}


def _layout_case(layout, sp, extras, config):
    train = TrainConfig(global_batch_size=G, micro_batch_size=1, seq_length=S, sequence_parallel=sp)
    chunks = build_model_chunks(config, layout, sequence_parallel=sp)
    add_lora(chunks, LORA, layout)
    for chunk in chunks:
        load_full_into(chunk, _full_state(config), layout)
    trainer = Trainer(chunks, build_optimizer(chunks, layout, OptimizerConfig(**OPT, **extras), LR.lr), layout, config,
                      train, LRSchedule(LR, STEPS))
    grads = {}

    def first_grads(t):
        if grads:
            return
        local = {}
        for chunk in t.chunks:
            for name, p in chunk.named_parameters():
                if p.requires_grad:
                    g = p.main_grad.clone()
                    if extras.get("use_distributed_optimizer"):  # ZeRO keeps its reduced shard only
                        torch.distributed.all_reduce(g, group=layout.gradient_layout.dp_group)
                    local[name] = g
        grads.update(gather_full_state_dict(local, config, layout))

    steps = [trainer.train_step(batch, on_grads=first_grads) for batch in _batches(config)]
    losses, norms = [m.loss for m in steps], [m.grad_norm for m in steps]
    local_state = {}
    for chunk in chunks:
        local_state.update(chunk.state_dict())
    return {"losses": losses, "norms": norms, "grads": grads,
            "state": gather_full_state_dict(local_state, config, layout)}


def _checkpoint_loads(layout, config, directory):
    """A single-process LoRA checkpoint under ``layout``: resumed into adapted chunks (every tensor, adapters
    resharded), and as init-from weights into plain chunks (adapters folded into the weights)."""
    adapted = build_model_chunks(config, layout)
    add_lora(adapted, LORA, layout, seed=99)  # other initial adapters: the load must replace them
    load_checkpoint(directory, adapted, None, layout, config)
    plain = build_model_chunks(config, layout)
    load_model_weights(directory, plain, layout, config)
    states = []
    for chunks in (adapted, plain):
        local = {}
        for chunk in chunks:
            local.update(chunk.state_dict())
        states.append(gather_full_state_dict(local, config, layout))
    return states


def _layouts(rank, world_size, directory):
    config = _config()
    out = {}
    for name, (tp, pp, dp, sp, extras) in CASES.items():
        layout = ParallelLayout.build(ParallelDims(tp=tp, pp=pp, dp=dp), name=name)
        out[name] = _layout_case(layout, sp, extras, config)
        out[name]["resumed"], out[name]["merged"] = _checkpoint_loads(layout, config, directory)
    return out


def test_layouts_train_adapters_like_one_process(tmp_path):
    """Tolerance (fp32): layouts change only summation order (TP partial sums of both factors, DP and
    micro-batch accumulation), ~1e-7 relative per element; 1e-5 of each tensor's max for gradients,
    1e-5 relative for the losses (as tests/parallel/test_layouts.py). Adam divides each gradient by its own
    running scale, so for an element whose gradient is near zero a rounding-level gradient difference moves
    its update (~lr = 3e-3) by a visible fraction: the final adapters must agree to lr / 10 absolute
    (observed up to 3.2e-5), where a wrong update is off by ~lr. A factor's missing TP reduction, a wrong
    shard or a missing replicated-KV sum is off by O(1) in the gradients and losses.

    Each layout also loads a single-process LoRA checkpoint: resumed, its adapters are resharded bitwise;
    as init-from weights of a model without adapters, they are folded into the weights as
    ``merge_state_dict`` folds them (the same fp32 arithmetic on the same shards: bitwise)."""
    config = _config()
    ref_losses, ref_grads, ref_norms, ref_state = _single_process(config)
    assert min(ref_norms) > OPT["clip_grad"]  # every step clips: the norm (and its TP/DP counting) matters
    start = _full_state(config)
    saved = GLMForCausalLM(config, init=False)
    add_lora(saved, LORA)
    saved.load_state_dict(start)
    save_checkpoint(tmp_path / "ck", 1, saved, None, ParallelLayout.single(), config)
    merged = merge_state_dict(start, LORA.scale)
    assert set(merged) == {n for n in start if ".lora." not in n}
    moved = [(ref_state[n] - start[n]).abs().max().item() for n in start if ".lora." in n]
    assert min(moved) > 1e-3  # every adapter factor is updated (lr 3e-3 per Adam step)
    results = run_distributed(_layouts, 4, tmp_path / "ck")
    for name in CASES:
        bf16 = CASES[name][4].get("mixed_precision") == "bf16"
        grad_rel, loss_rel = (BF16_GRAD_REL, BF16_LOSS_REL) if bf16 else (1e-5, 1e-5)
        for rank, res in enumerate(results):
            r = res[name]
            assert r["resumed"].keys() == start.keys() and r["merged"].keys() == merged.keys()
            assert all(torch.equal(r["resumed"][n], start[n]) for n in start), (name, rank)
            assert all(torch.equal(r["merged"][n], merged[n]) for n in merged), (name, rank)
            assert set(r["grads"]) == set(ref_grads), (name, rank)
            for n, g in r["grads"].items():
                want = ref_grads[n]
                assert want.abs().max() > 0 and (g - want).abs().max() <= grad_rel * want.abs().max(), (name, rank, n)
            for step, (got, want) in enumerate(zip(r["losses"], ref_losses)):
                assert math.isclose(got, want, rel_tol=loss_rel), (name, rank, step, r["losses"], ref_losses)
            for step, (got, want) in enumerate(zip(r["norms"], ref_norms)):  # the clipped norm, counted once
                assert math.isclose(got, want, rel_tol=grad_rel), (name, rank, step, r["norms"], ref_norms)
            for n, t in r["state"].items():
                if ".lora." in n and not bf16:  # trained like the single process (Adam: ~lr-sized steps)
                    assert (t - ref_state[n]).abs().max() <= LR.lr / 10, (name, rank, n)
                elif ".lora." not in n:  # frozen: exactly the starting weights (bf16: stored rounded once)
                    assert torch.equal(t, start[n].to(t.dtype)) and t.dtype == (torch.bfloat16 if bf16 else
                                                                                 torch.float32), (name, rank, n)


def test_checkpoint_records_the_adapters_and_a_resume_needs_the_same(tmp_path):
    config = _config()
    layout = ParallelLayout.single()
    model = GLMForCausalLM(config)
    add_lora(model, LoRAConfig(rank=4, alpha=8.0, targets=("qkv", "down")))
    assert lora_record(model) == {"rank": 4, "scale": 2.0, "targets": ["down", "qkv"]}
    save_checkpoint(tmp_path / "ck", 1, model, None, layout, config)
    for other in (LoRAConfig(rank=2, targets=("qkv", "down")), LoRAConfig(rank=4, alpha=4.0, targets=("qkv", "down")),
                  LoRAConfig(rank=4, alpha=8.0)):
        fresh = GLMForCausalLM(config)
        add_lora(fresh, other)
        with pytest.raises(CheckpointError, match=r"saved with LoRA adapters \{'rank': 4, 'scale': 2.0, "
                                                  r"'targets': \['down', 'qkv'\]\}, this model has"):
            load_checkpoint(tmp_path / "ck", fresh, None, layout, config)
    with pytest.raises(CheckpointError, match="this model has None"):
        load_checkpoint(tmp_path / "ck", GLMForCausalLM(config), None, layout, config)


def test_reward_model_keeps_its_value_head_trainable():
    from engine.model.glm import GLMForScalarHead
    model = GLMForScalarHead(_config())
    trainable = add_lora(model, LORA, keep_trainable=("value_head.",))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "value_head.weight" in names and {id(p) for p in trainable} == {id(p) for p in model.parameters()
                                                                          if p.requires_grad}
    assert names - {"value_head.weight"} == set(lora_shapes(model.config, LORA))


def test_merge_state_dict_refuses_half_an_adapter():
    state = {"layers.0.mlp.down.weight": torch.zeros(4, 6), "layers.0.mlp.down.lora.A": torch.zeros(2, 6)}
    with pytest.raises(ValueError, match="lacks layers.0.mlp.down.lora.B"):
        merge_state_dict(state, 1.0)
    with pytest.raises(ValueError, match="lora.B factor without its lora.A"):
        merge_state_dict({"layers.0.mlp.down.weight": torch.zeros(4, 6), "layers.0.mlp.down.lora.B": torch.zeros(4, 2)},
                         1.0)


def test_launcher_sft_resume_export_and_dpo_with_adapters(tmp_path):
    """launch.train with --lora-rank: an SFT run from a checkpoint trains only the adapters (the saved base
    weights are the init-from ones, bitwise); 2 steps + a resumed third equal 3 straight steps bitwise (CPU,
    same layout); a resume without the adapters is refused; launch.convert exports the adapted model
    (adapters folded in); DPO from that LoRA checkpoint starts at exactly log 2 (fresh adapters: the policy
    is its reference, which is the same model with the adapters off) and its margins then move."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    from engine.train.checkpoint import read_full_model_state
    from launch.convert import convert_checkpoint
    root = Path(__file__).resolve().parent.parent
    config = _config()
    (tmp_path / "model.yaml").write_text("preset: tiny\nnum_layers: 2\n")
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "c0", 1, GLMForCausalLM(config), None, ParallelLayout.single(), config)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))

    def run(name, mode, *flags):
        cmd = [sys.executable, "-m", "launch.train", "--config", str(root / "configs" / "runs" / f"{mode}.yaml"),
               "--model", str(tmp_path / "model.yaml"), "--seq-length", "64", "--global-batch-size", "4",
               "--micro-batch-size", "2", "--eval-interval", "100", "--log-dir", str(tmp_path / name), *flags]
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines() if proc.returncode == 0 else []
        return proc, [json.loads(x) for x in lines if "loss" in json.loads(x)]

    lora = ("--lora-rank", "4", "--lora-alpha", "8")
    proc, straight = run("straight", "sft", "--init-from", str(tmp_path / "c0"), "--train-steps", "3", *lora)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "LoRA rank 4 alpha 8 on qkv,dense,gate_up,down" in proc.stdout
    proc, first = run("first", "sft", "--init-from", str(tmp_path / "c0"), "--train-steps", "2", "--save",
                      str(tmp_path / "ck"), *lora)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc, second = run("second", "sft", "--load", str(tmp_path / "ck"), "--train-steps", "3", *lora)
    assert proc.returncode == 0 and "resumed from" in proc.stdout, proc.stdout + proc.stderr
    assert [d["loss"] for d in first + second] == [d["loss"] for d in straight]
    proc, _ = run("plain", "sft", "--load", str(tmp_path / "ck"), "--train-steps", "3")
    assert proc.returncode == 2 and "saved with LoRA adapters {'rank': 4, 'scale': 2.0" in proc.stderr, proc.stderr

    _, base = read_full_model_state(tmp_path / "c0")
    _, trained = read_full_model_state(tmp_path / "ck")
    assert all(torch.equal(trained[n], base[n]) for n in base)  # frozen
    assert all(trained[n].abs().max() > 0 for n in trained if n.endswith(".lora.B"))  # the adapters trained
    out = convert_checkpoint(str(tmp_path / "ck"), str(tmp_path / "hf"))
    exported = GLMForCausalLM.from_hf(out).state_dict()
    merged = merge_state_dict(trained, 2.0)
    assert exported.keys() == merged.keys() and all(torch.equal(exported[n], merged[n]) for n in merged)

    dpo = ("--init-from", str(tmp_path / "ck"), *lora)
    proc, (d1, d2, d3) = run("dpo", "dpo", "--train-steps", "3", *dpo)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "reference: the --init-from weights with the adapters off" in proc.stdout
    assert d1["loss"] == pytest.approx(math.log(2), abs=1e-6) and d1["margin"] == 0.0
    assert abs(d2["margin"]) > 1e-6  # exactly 0 if the reference were the adapted policy itself
    assert d1["reference_s"] > 0  # the adapters-off forward, timed apart from the step
    # resumed: the held-out pairs are scored by the reference after the checkpoint's weights are in
    proc, _ = run("dpo_first", "dpo", "--train-steps", "2", "--save", str(tmp_path / "dpo_ck"), *dpo)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc, (resumed,) = run("dpo_resumed", "dpo", "--train-steps", "3", "--load", str(tmp_path / "dpo_ck"), *dpo)
    assert proc.returncode == 0 and "resumed from" in proc.stdout, proc.stdout + proc.stderr
    assert {k: resumed[k] for k in ("loss", "eval_loss", "eval_accuracy")} == \
        {k: d3[k] for k in ("loss", "eval_loss", "eval_accuracy")}
    proc, _ = run("offload", "dpo", "--init-from", str(tmp_path / "ck"), "--offload-reference", *lora)
    assert proc.returncode == 2 and "a LoRA run has no reference copy to offload" in proc.stderr, proc.stderr
    proc, _ = run("alpha_alone", "sft", "--lora-alpha", "8")
    assert proc.returncode == 2 and "lora.rank is 0 (no adapters): add --lora-rank R" in proc.stderr, proc.stderr


def test_peft_export_loads_into_transformers_with_the_same_logits(tmp_path):
    """launch.convert --to peft: the frozen weights as a GlmForCausalLM directory and the adapters as a PEFT
    LoRA adapter (q/k/v adapters from the fused one); peft.PeftModel on transformers.GlmForCausalLM gives the
    adapted engine model's logits. fp32, another summation order (HF projects q, k, v separately and adds
    the adapter in its own order): 1e-5 of the logits' scale, as tests/test_model_hf.py; a wrong split of B,
    a missing module or a wrong scale is off by O(1) (the adapters move the logits by ~1 here)."""
    peft = pytest.importorskip("peft")
    import transformers
    from launch.convert import main as convert
    config = GLMConfig(vocab_size=384, hidden_size=64, ffn_hidden_size=96, num_layers=2, num_attention_heads=4,
                       num_kv_groups=2, pad_token_id=0, eos_token_id=[1])
    torch.manual_seed(0)
    model = GLMForCausalLM(config).eval()
    lora = LoRAConfig(rank=4, alpha=8.0, targets=("qkv", "dense", "gate_up", "down"))
    add_lora(model, lora, seed=2)
    _random_b(model, seed=4)
    ids = torch.randint(2, config.vocab_size, (2, 9))
    with torch.no_grad():
        ours = model(ids)
        with lora_disabled(model):
            assert (ours - model(ids)).abs().max() > 0.1  # the adapters matter
    save_checkpoint(tmp_path / "ck", 1, model, None, ParallelLayout.single(), config)
    assert convert(["--checkpoint", str(tmp_path / "ck"), "--output", str(tmp_path / "out"), "--to", "peft"]) == 0
    base = transformers.GlmForCausalLM.from_pretrained(tmp_path / "out").eval()
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "out" / "adapter").eval()
    with torch.no_grad():
        theirs = adapted(ids).logits
    assert (theirs - ours).abs().max() <= 1e-5 * ours.abs().max()
    # a checkpoint without adapters has nothing to export as PEFT; --to peft needs a checkpoint
    save_checkpoint(tmp_path / "plain", 1, GLMForCausalLM(config), None, ParallelLayout.single(), config)
    assert convert(["--checkpoint", str(tmp_path / "plain"), "--output", str(tmp_path / "p"), "--to", "peft"]) == 2
    with pytest.raises(SystemExit):
        convert(["--input", str(tmp_path / "out"), "--output", str(tmp_path / "q"), "--to", "peft"])
