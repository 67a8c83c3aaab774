"""PPO iteration throughput per layout: time of each phase and tokens/s.

    python -m launch.bench rlhf [--config tiny] [--layouts "1,1 2,1 2,1,1 1,2"] [--iterations 3]
                                [--rollout-prompts 8] [--samples-per-prompt 2] [--prompt-length 32]
                                [--max-new-tokens 32] [--mini-batch 8] [--micro-batch 2] [--json FILE]
                                [--min-prompt-length N] [--stop-tokens K] [--pack] [--lora-rank R [--critic-lora]]

Layouts are ``tp,dp[,generation_tp[,pp[,cp]]]`` (generation_tp < tp: the actor is resharded to that TP
degree for sampling, 1 = a whole model per rank, ``PPOConfig.generation_tp``; pp > 1: pipeline stages for
scoring and training, the actor gathered to every layer per rank for sampling; cp > 1: every sequence split
over cp ranks for scoring and training, each of them sampling its share of the rows); each runs
``--iterations`` PPO iterations (``engine.rlhf.ppo.PPOLoop``; the first is a warm-up and is not timed) in
its own gloo process group, one thread per process. Actor, critic (with ``--advantage-estimator gae``, the
default), reference and reward models are randomly initialised copies of ``--config`` (all on every rank);
prompts are random token ids of ``--prompt-length`` (or uniformly ``--min-prompt-length`` to it); the stop
tokens are ids 1..K (``--stop-tokens K``, default 1, which a random model rarely samples, so responses run
almost always to ``--max-new-tokens``; K / vocab is each step's stop probability, which spreads response
lengths like real ones); tokens/s use the measured lengths. ``--pack``: ``PPOConfig.pack_sequences``. Reported
per phase (median over the timed iterations): generate (sampling with the KV cache), score (actor, reference,
critic and reward forwards; the reference answers of prompts not seen before, gae and reinforce++ only), update (the actor's
and the critic's optimizer steps), and the whole iteration; generated tokens/s = rollout responses' tokens /
generate time; trained tokens/s = the rollout's real tokens (prompt + response, padding not counted) x
PPO epochs / update time; update rows: rows per optimizer step (fewer with ``--pack``); resident MiB:
the device bytes each phase held (weights, optimizer state, gradient buffers, the generation copy:
``resident_bytes_<phase>``, measured from the tensors' storages; the KV cache and activations are not in it),
with ``--offload`` holding only what the phase uses.
"act MiB": the peak of what autograd held for backward during one more (untimed) update, actor and critic
(``SavedActivationMeter``: activations, parameters excluded; device-independent), which context and
sequence parallelism (``--sequence-parallel``, layouts with tp > 1) reduce. "dlogp max": the largest
|log p_train - log p_sampler| of a sampled token over the timed iterations (``rollout_logprob_diff_max``;
``rollout_kl`` in the JSON): rounding only in fp32, in bf16 the sampler/trainer gap that
``--rollout-is-cap`` corrects (on GPU: the Triton decoding path against the training kernels).
``--lora-rank R``: the actor trains LoRA adapters of rank R (``engine.model.lora``) and its reference is
itself with them off, so no reference model is built (``--critic-lora``: the critic trains adapters too);
the resident bytes show the reference's weights and the frozen weights' optimizer state gone.
``--device cuda`` runs each layout as one process on the GPU (tp = pp = dp = 1) and adds the allocator's
peak per phase (``peak_memory_<phase>``, KV cache and activations included) to the JSON and the table.
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

from launch.bench_train import spawn_workers


PHASES = ("generate", "score", "update")


def _run(tp: int, dp: int, gen_tp, pp: int, cp: int, args) -> dict:
    from engine.config import load_config
    from engine.model.glm import GLMForCausalLM, GLMForScalarHead
    from engine.parallel import ParallelDims, ParallelLayout
    from engine.parallel.pipeline import build_model_chunks
    from engine.rlhf.ppo import PPOConfig, PPOLoop
    from engine.train.lr import LRConfig
    from engine.train.step import OptimizerConfig

    config = load_config(args.config)
    layout = ParallelLayout.build(ParallelDims(tp=tp, pp=pp, dp=dp, cp=cp))
    device = torch.device(args.device)
    critic_free = args.advantage_estimator != "gae"
    sp = args.sequence_parallel and tp > 1
    models = [None if (i == 1 and critic_free) else
              [chunk.to(device) for chunk in build_model_chunks(config, layout, model_cls=cls, seed=i,
                                                                sequence_parallel=sp)]
              for i, cls in enumerate((GLMForCausalLM, GLMForScalarHead, GLMForCausalLM, GLMForScalarHead))]
    if args.lora_rank:  # the reference: the actor with its adapters off
        from engine.model.lora import LoRAConfig, add_lora
        lora = LoRAConfig(rank=args.lora_rank)
        add_lora(models[0], lora, layout, seed=0)
        models[2] = None
        if args.critic_lora and models[1] is not None:
            add_lora(models[1], lora, layout, seed=1, keep_trainable=("value_head.",))
    g = torch.Generator().manual_seed(0)
    n_prompts = args.rollout_prompts * args.iterations
    lengths = torch.randint(args.min_prompt_length or args.prompt_length, args.prompt_length + 1, (n_prompts,),
                            generator=g)
    prompts = [torch.randint(args.stop_tokens + 2, config.vocab_size, (int(n),), generator=g).tolist()
               for n in lengths]
    ppo = PPOConfig(iterations=args.iterations, rollout_prompts=args.rollout_prompts,
                    samples_per_prompt=args.samples_per_prompt, max_prompt_length=args.prompt_length,
                    max_new_tokens=args.max_new_tokens, mini_batch_size=args.mini_batch,
                    micro_batch_size=args.micro_batch, generation_tp=gen_tp, offload=args.offload,
                    advantage_estimator=args.advantage_estimator, pack_sequences=args.pack, seed=0)
    optim = OptimizerConfig(clip_grad=1.0, mixed_precision=args.dtype)
    loop = PPOLoop(ppo, config, layout, *models, prompts=prompts, eos_ids=list(range(1, args.stop_tokens + 1)),
                   pad_id=0, actor_optim=optim,
                   critic_optim=optim, actor_lr=LRConfig(lr=1e-6, min_lr=1e-7), critic_lr=LRConfig(lr=1e-6, min_lr=1e-7))
    records = [loop.iteration() for _ in range(args.iterations)][1:]
    # one more update of the last rollout, untimed, for the activation memory of the actor's and critic's steps
    from engine.train.metrics import SavedActivationMeter
    batch, _ = loop.advantages(loop.last_rollout)
    # every model resident and offloading paused for it: an onload re-points the parameters at new storages,
    # which the meter would then count as activations (so with --offload this update needs the memory of a run
    # without it)
    loop.offloader.ensure_all()
    loop.offloader.enabled = False
    trained = [p for chunks in (loop.actor, loop.critic) for chunk in chunks for p in chunk.parameters()]
    with SavedActivationMeter(exclude=trained) as meter:
        loop.update(batch, args.iterations)
    keys = ("generate_s", "score_s", "gather_s", "train_s", "seconds", "response_length",
            *(f"resident_bytes_{phase}" for phase in PHASES))
    keys += tuple(f"peak_memory_{phase}" for phase in PHASES if f"peak_memory_{phase}" in records[0])
    keys += ("update_rows",) if all("update_rows" in r for r in records) else ()  # rows per optimizer step
    out = {k: statistics.median(r[k] for r in records) for k in keys}
    rows = ppo.rollout_rows
    out["generated_tokens_per_s"] = rows * out["response_length"] / out["generate_s"]
    # real tokens (prompt + response) trained per second, padding not counted: what packing changes
    out["trained_tokens_per_s"] = (sum(map(len, prompts)) / n_prompts + out["response_length"]) * rows \
        * ppo.ppo_epochs / out["train_s"]
    out["reshard_bytes_per_iteration"] = layout.ledger.received("reshard") / args.iterations
    out["host_bytes"] = loop.offloader.host_bytes()  # the offloaded copies' arenas (page-locked on CUDA)
    out["peak_saved_activation_bytes_update"] = meter.peak
    # the sampling copy's log-probs against the training forward's, over every timed iteration: rounding only in
    # fp32; in bf16 the gap TIS (--rollout-is-cap) would correct
    out["rollout_logprob_diff_max"] = max(r["rollout_logprob_diff_max"] for r in records)
    out["rollout_kl"] = statistics.median(r["rollout_kl"] for r in records)
    out["sequence_parallel"] = sp
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.bench rlhf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", help="model preset or YAML")
    p.add_argument("--layouts", default="1,1 2,1 2,1,1 1,2",
                   help="space-separated tp,dp[,generation_tp[,pp[,cp]]]")
    p.add_argument("--iterations", type=int, default=3, help="PPO iterations per layout (the first is not timed)")
    p.add_argument("--rollout-prompts", type=int, default=8)
    p.add_argument("--samples-per-prompt", type=int, default=2)
    p.add_argument("--prompt-length", type=int, default=32)
    p.add_argument("--min-prompt-length", type=int, default=0,
                   help="prompt lengths uniform in [this, --prompt-length] (0: all --prompt-length)")
    p.add_argument("--stop-tokens", type=int, default=1, help="ids 1..K stop a response")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--mini-batch", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="actor and critic parameters")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: one process on the GPU per layout (layouts must be 1,1)")
    p.add_argument("--offload", action="store_true", help="PPOConfig.offload: idle models in host memory")
    p.add_argument("--pack", action="store_true", help="PPOConfig.pack_sequences: packed update rows")
    p.add_argument("--sequence-parallel", action="store_true", help="layouts with tp > 1: sequence parallel models")
    p.add_argument("--lora-rank", type=int, default=0, help="> 0: LoRA actor of this rank, no reference model")
    p.add_argument("--critic-lora", action="store_true", help="with --lora-rank: LoRA critic too")
    from engine.rlhf.ppo import ESTIMATORS
    p.add_argument("--advantage-estimator", choices=ESTIMATORS, default="gae",
                   help="gae: with a critic; the others: critic-free")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.iterations < 2:
        p.error("--iterations must be >= 2 (the first is a warm-up)")
    if args.lora_rank < 0 or (args.critic_lora and not args.lora_rank):
        p.error("--lora-rank must be >= 0, and --critic-lora needs --lora-rank")
    if args.critic_lora and args.advantage_estimator != "gae":
        p.error(f"--critic-lora: --advantage-estimator {args.advantage_estimator} trains no critic")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    print(f"PPO on {args.config}: {args.rollout_prompts} prompts x {args.samples_per_prompt} samples, prompt "
          f"{args.prompt_length} + {args.max_new_tokens} new tokens, mini-batch {args.mini_batch}, "
          f"{args.dtype}{', offload' if args.offload else ''}{', sequence parallel' if args.sequence_parallel else ''}, "
          f"{args.advantage_estimator}"
          + (f", LoRA rank {args.lora_rank} actor{' and critic' if args.critic_lora else ''}" if args.lora_rank else "")
          + "; "
          f"median of {args.iterations - 1} iterations; "
          "resident MiB on rank 0")
    header = (f"{'tp':>3}{'pp':>3}{'dp':>3}{'cp':>3}{'gen':>4}  {'generate s':>10}  {'score s':>8}  {'update s':>9}  "
              f"{'iter s':>7}  "
              f"{'gen tok/s':>9}  {'train tok/s':>11}  {'rows':>5}  {'resident MiB gen/score/update':>29}  "
              f"{'act MiB':>7}  {'dlogp max':>9}")
    print(f"{header}\n{'-' * len(header)}")
    out = {"args": vars(args), "layouts": []}
    for item in args.layouts.split():
        spec = [int(x) for x in item.split(",")]
        if not 2 <= len(spec) <= 5:
            p.error(f"--layouts item {item!r}: expected tp,dp[,generation_tp[,pp[,cp]]]")
        tp, dp = spec[0], spec[1]
        gen_tp = spec[2] if len(spec) > 2 else None
        pp = spec[3] if len(spec) > 3 else 1
        cp = spec[4] if len(spec) > 4 else 1
        if args.device == "cuda" and tp * dp * pp * cp != 1:
            p.error(f"--layouts item {item!r}: --device cuda runs one process (one GPU): use 1,1")
        r = spawn_workers(_run, tp * pp * dp * cp, tp, dp, gen_tp, pp, cp, args,
                          what=f"PPO layout tp={tp} pp={pp} dp={dp} cp={cp} gen_tp={gen_tp}")
        resident = "/".join(f"{r[f'resident_bytes_{phase}'] / 2**20:.2f}" for phase in PHASES)
        peaks = "/".join(f"{r[f'peak_memory_{phase}'] / 2**20:.0f}" for phase in PHASES if f"peak_memory_{phase}" in r)
        print(f"{tp:>3}{pp:>3}{dp:>3}{cp:>3}{gen_tp or tp:>4}  {r['generate_s']:>10.2f}  {r['score_s']:>8.2f}  "
              f"{r['train_s']:>9.2f}  {r['seconds']:>7.2f}  {r['generated_tokens_per_s']:>9.0f}  "
              f"{r['trained_tokens_per_s']:>11.0f}  {r.get('update_rows', 0):>5.1f}  {resident:>29}  "
              f"{r['peak_saved_activation_bytes_update'] / 2**20:>7.2f}  {r['rollout_logprob_diff_max']:>9.1e}"
              + (f"  peak MiB {peaks}" if peaks else ""),
              flush=True)
        out["layouts"].append({"tp": tp, "pp": pp, "dp": dp, "cp": cp, "generation_tp": gen_tp or tp, **r})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0
