"""Every TP x PP x DP layout trains exactly like the single-process model, and sends the analytic bytes.

Three gloo launches (world size 2, 4 and 8), each running all its layouts in one process group:

    ws 2: (tp, pp, dp) = (2,1,1) +-SP, (1,2,1), (1,1,2)
    ws 4: (4,1,1) (2 KV groups -> replicated KV heads) +-SP, (1,4,1) vpp=2, (2,2,1) +-SP and bf16,
          (2,1,2) distributed optimizer +-SP
    ws 8: (2,2,2) +-SP
    context parallel (cp in the options): ws 2 cp2 (fp32 and bf16); ws 4 tp2 x cp2 +SP full recompute,
    cp2 x dp2 with the distributed optimizer, pp2 x vpp2 x cp2 full recompute; ws 8 tp2 x cp2 x pp2
    selective recompute

Each case runs ``Trainer.train_step`` on 4 global batches. After the first backward (gradients
synced over TP/DP, before clipping) every parameter's gradient, gathered to the full model, must
equal the single-process gradient of the mean token loss over the global batch; the loss before
each of the 4 steps must equal the reference's (torch.optim.AdamW, same clipping and lr schedule).
The global batch has unevenly ignored labels, so any per-micro-batch or per-rank averaging shows.
The bytes each rank sent per group during a step (ledger delta) must equal
``accounting.analytic_step_bytes`` for that rank, to float rounding. (One term is not measured: the
vocab-parallel cross entropy calls torch.distributed itself, so the Trainer records its two small
all-reduces from the kernel's documented scheme; everything else goes through engine.parallel.comm.)

Tolerances (fp32): layouts only change summation order (TP partial sums, DP and micro-batch
accumulation): ~1e-7 relative per element; gradients must agree to 1e-5 of each tensor's max
(observed <= 1e-6), losses over 4 steps to 1e-5 relative. A wrong shard, scale or missing reduction
is off by O(1). The bf16 case (bf16 params, activations and pipeline messages, fp32 master weights)
against the fp32 reference: bf16 rounds every weight and activation to 2^-9 relative, and the
gradient products accumulate it, so 5e-2 of each tensor's max (observed 1.2e-2) and 5e-3 on the
loss (observed 1e-4) -- still far below the O(1) of a real bug. Bytes: the ledger and the analytic formulas add the same terms in another order
(rel 1e-9).
"""
import dataclasses
import math

import pytest
import torch

import kernels
from engine.config import GLMConfig
from engine.model.glm import GLMForCausalLM
from engine.parallel import CommLedger, ParallelDims, ParallelLayout, comm
from engine.parallel.accounting import analytic_step_bytes
from engine.parallel.context_parallel import split_sequence
from engine.parallel.pipeline import build_model_chunks
from engine.parallel.sharding import gather_full_state_dict, load_full_into
from engine.train import LRConfig, LRSchedule, OptimizerConfig, TrainConfig, Trainer, build_optimizer
from tests._dist import run_distributed

G, S, STEPS = 8, 16, 3   # S divisible by tp=4 (sequence parallel); STEPS updates -> 4 losses
REL = 1e-5
BF16_GRAD_REL, BF16_LOSS_REL = 5e-2, 5e-3
LR = LRConfig(lr=3e-3, min_lr=3e-4, warmup_steps=1, style="cosine")
OPT = dict(weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, clip_grad=1.0)

# name -> (tp, pp, dp, vpp, sequence_parallel, extra TrainConfig/OptimizerConfig options)
CASES = {
    2: {
        "tp2": (2, 1, 1, 1, False, {"recompute": "full"}),
        "tp2_sp": (2, 1, 1, 1, True, {"recompute": "selective"}),
        "pp2": (1, 2, 1, 1, False, {"recompute": "full"}),
        "dp2": (1, 1, 2, 1, False, {"bucket_size_bytes": 2**20, "micro_batch_size": 2}),
        "cp2": (1, 1, 1, 1, False, {"cp": 2, "micro_batch_size": 2}),
        "cp2_bf16": (1, 1, 1, 1, False, {"cp": 2, "mixed_precision": "bf16"}),
    },
    4: {
        "tp4_kv": (4, 1, 1, 1, False, {}),
        "tp4_kv_sp": (4, 1, 1, 1, True, {}),
        "pp4_vpp2": (1, 4, 1, 2, False, {}),
        "tp2_pp2": (2, 2, 1, 1, False, {}),
        "tp2_pp2_sp": (2, 2, 1, 1, True, {"recompute": "full"}),
        "tp2_pp2_bf16": (2, 2, 1, 1, False, {"mixed_precision": "bf16"}),
        "tp2_dp2_zero": (2, 1, 2, 1, False, {"use_distributed_optimizer": True, "bucket_size_bytes": 2**20}),
        "tp2_dp2_zero_sp": (2, 1, 2, 1, True, {"use_distributed_optimizer": True}),
        "tp2_cp2_sp": (2, 1, 1, 1, True, {"cp": 2, "recompute": "full"}),
        "cp2_dp2_zero": (1, 1, 2, 1, False, {"cp": 2, "use_distributed_optimizer": True, "bucket_size_bytes": 2**20}),
        "pp2_vpp2_cp2": (1, 2, 1, 2, False, {"cp": 2, "recompute": "full"}),
    },
    8: {
        "tp2_pp2_dp2": (2, 2, 2, 1, False, {}),
        "tp2_pp2_dp2_sp": (2, 2, 2, 1, True, {"use_distributed_optimizer": True}),
        "tp2_cp2_pp2": (2, 2, 1, 1, False, {"cp": 2, "recompute": "selective"}),
    },
}
_TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)} | {"cp"}


def _config(pp: int, vpp: int) -> GLMConfig:
    """The tiny preset (hidden 256, 8 heads / 2 KV groups), with as few layers as the layout allows."""
    return GLMConfig.preset("tiny").replace(num_layers=max(2, pp * vpp))


def _batches(config):
    """4 global batches [G, S]; some labels ignored, unevenly over rows (micro-batches / DP ranks)."""
    g = torch.Generator().manual_seed(7)
    out = []
    for step in range(STEPS + 1):
        ids = torch.randint(0, config.vocab_size, (G, S + 1), generator=g)
        labels = ids[:, 1:].clone()
        labels[0, : 3 + step] = -100
        labels[5, 4:] = -100
        out.append({"input_ids": ids[:, :-1].contiguous(), "labels": labels})
    return out


def _init_state(config):
    torch.manual_seed(0)
    return GLMForCausalLM(config).state_dict()


def _reference(config):
    """Single process: losses before each of STEPS+1 steps, and the first step's gradients."""
    model = GLMForCausalLM(config)
    model.load_state_dict(_init_state(config))
    params = list(model.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2]},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=LR.lr, betas=OPT["betas"], eps=OPT["eps"], weight_decay=OPT["weight_decay"],
                            foreach=False)
    schedule = LRSchedule(LR, STEPS)
    losses, grads = [], None
    for step, batch in enumerate(_batches(config)):
        loss = kernels.cross_entropy(model(batch["input_ids"]), batch["labels"])
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        if grads is None:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        norm = torch.stack([p.grad.double().square().sum() for p in params]).sum().sqrt().item()
        if OPT["clip_grad"] / (norm + 1e-6) < 1.0:
            for p in params:
                p.grad.mul_(OPT["clip_grad"] / (norm + 1e-6))
        for group in opt.param_groups:
            group["lr"] = schedule(step)
        opt.step()
    return losses, grads


def _full_grads(trainer, config, layout, distributed: bool) -> dict:
    """Every parameter's synced gradient, gathered to the full model (test traffic on its own ledger)."""
    side = dataclasses.replace(layout, ledger=CommLedger())
    local = {}
    for chunk in trainer.chunks:
        for name, p in chunk.named_parameters():
            g = p.main_grad.clone()
            if distributed:  # ZeRO keeps only its reduced shard: sum the (already 1/dp scaled) local grads
                comm.all_reduce(g, layout.gradient_layout.dp_group, None, "dp")
            local[name] = g
    return gather_full_state_dict(local, config, side)


def _run_case(layout, tp, pp, dp, vpp, sp, extra, reference):
    config = _config(pp, vpp)
    train = TrainConfig(global_batch_size=G, micro_batch_size=extra.get("micro_batch_size", 1), seq_length=S,
                        sequence_parallel=sp, recompute=extra.get("recompute", "none"))
    optim = OptimizerConfig(**OPT, **{k: v for k, v in extra.items() if k not in _TRAIN_FIELDS})
    chunks = build_model_chunks(config, layout, sequence_parallel=sp)
    full = _init_state(config)
    for chunk in chunks:
        load_full_into(chunk, full, layout)
    trainer = Trainer(chunks, build_optimizer(chunks, layout, optim, LR.lr), layout, config, train,
                      LRSchedule(LR, STEPS))
    ref_losses, ref_grads = reference
    grad_errors = {}

    def check_grads(t):
        if grad_errors:
            return
        full_grads = _full_grads(t, config, layout, optim.use_distributed_optimizer)
        assert set(full_grads) == set(ref_grads)
        for name, g in full_grads.items():
            ref = ref_grads[name]
            grad_errors[name] = ((g - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()

    losses, comm_bytes, analytic = [], [], []
    for batch in _batches(config):
        metrics = trainer.train_step(batch, on_grads=check_grads)
        losses.append(metrics.loss)
        comm_bytes.append(metrics.comm_bytes)
        analytic.append(analytic_step_bytes(
            config, layout.dims, layout.pp_rank, layout.tp_rank, global_batch_size=G,
            micro_batch_size=train.micro_batch_size, seq_length=S, sequence_parallel=sp, recompute=train.recompute,
            use_distributed_optimizer=optim.use_distributed_optimizer, bucket_size_bytes=optim.bucket_size_bytes,
            param_bytes=2 if optim.mixed_precision == "bf16" else 4,
            loss_rows=_loss_rows(batch["labels"], layout, train.micro_batch_size)))
    return {"losses": losses, "ref_losses": ref_losses, "grad_errors": grad_errors, "comm": comm_bytes,
            "analytic": analytic, "coords": (layout.tp_rank, layout.pp_rank, layout.dp_rank)}


def _loss_rows(labels, layout, micro_batch_size: int) -> int:
    """Label positions that take loss in this rank's micro-batches (its DP rows, its CP chunks), at least 1
    per micro-batch: the rows its vocab-parallel loss reduces statistics for."""
    rows = G // layout.dp_size
    mine = split_sequence(labels[layout.dp_rank * rows:(layout.dp_rank + 1) * rows], layout.cp_size, layout.cp_rank)
    return sum(max(1, int((mine[i:i + micro_batch_size] != -100).sum())) for i in range(0, rows, micro_batch_size))


def _world(rank, world_size, cases, references):
    out = {}
    for name, (tp, pp, dp, vpp, sp, extra) in cases.items():
        layout = ParallelLayout.build(ParallelDims(tp=tp, pp=pp, dp=dp, vpp=vpp, cp=extra.get("cp", 1)), name=name)
        out[name] = _run_case(layout, tp, pp, dp, vpp, sp, extra, references[(pp, vpp)])
    return out


_RESULTS: dict = {}


def _results(world_size):
    if world_size not in _RESULTS:
        cases = CASES[world_size]
        references = {(pp, vpp): _reference(_config(pp, vpp)) for (_, pp, _, vpp, _, _) in cases.values()}
        _RESULTS[world_size] = run_distributed(_world, world_size, cases, references)
    return _RESULTS[world_size]


_ALL = [(ws, name) for ws, cases in CASES.items() for name in cases]


@pytest.mark.parametrize("world_size,case", _ALL)
def test_layout_matches_single_process(world_size, case):
    bf16 = CASES[world_size][case][5].get("mixed_precision") == "bf16"
    grad_rel, loss_rel = (BF16_GRAD_REL, BF16_LOSS_REL) if bf16 else (REL, REL)
    for rank, res in enumerate(_results(world_size)):
        r = res[case]
        bad = {n: e for n, e in r["grad_errors"].items() if not e <= grad_rel}
        assert r["grad_errors"] and not bad, (case, rank, bad)
        assert len(r["losses"]) == STEPS + 1
        for step, (got, want) in enumerate(zip(r["losses"], r["ref_losses"])):
            assert math.isclose(got, want, rel_tol=loss_rel), (case, rank, step, r["losses"], r["ref_losses"])
    assert r["ref_losses"][-1] < r["ref_losses"][0] - 0.01  # the updates do change the model


@pytest.mark.parametrize("world_size,case", _ALL)
def test_layout_comm_bytes_match_analytic(world_size, case):
    for rank, res in enumerate(_results(world_size)):
        r = res[case]
        for step, (measured, analytic) in enumerate(zip(r["comm"], r["analytic"])):
            assert set(measured) == set(analytic), (case, rank, r["coords"], measured, analytic)
            for group, want in analytic.items():
                assert math.isclose(measured[group], want, rel_tol=1e-9), \
                    (case, rank, r["coords"], step, group, measured[group], want)
