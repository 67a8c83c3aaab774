"""Training throughput: tokens/s and MFU per parallel layout, and the engine's step vs transformers'.

    python -m launch.bench train [--config tiny] [--seq 128] [--global-batch 8] [--micro-batch 1]
                                 [--steps 4] [--layouts "1,1,1 2,1,1 1,2,1 1,1,2 1,2,1,2 1,1,1,1,2"]
                                 [--hf-batch 4] [--dtypes fp32,bf16] [--json FILE]

Layouts are ``tp,pp,dp[,vpp[,cp]]`` (cp: context parallel, each sequence split over cp ranks); each
runs ``--steps`` training steps (the first is a warm-up and is not timed) in its own gloo process
group, one thread per process, on synthetic tokens. tokens/s is the global batch's tokens over the
median step time. "act MiB" is rank 0's peak of what autograd held for backward during one more
(untimed) step (``engine.train.metrics.SavedActivationMeter``: activations, parameters excluded), a
device-independent measure of activation memory.

MFU = model FLOPs per second / peak, where the peak is the fp32 matmul rate measured here
(``--mm-size`` square matmuls, one thread) times the number of processes that can run at once
(min(world size, CPU cores)). Model FLOPs per token (Megatron's count, Narayanan et al. 2021 eq. 3,
adapted to GQA and SwiGLU; training = 3 x forward: forward + 2 x backward; recompute is not counted):

    forward = L (2 h (hq + 2 hkv) d          fused QKV, hkv KV heads instead of hq
                 + 4 s hq d                  scores and attention-weighted values (full s x s, as Megatron)
                 + 2 hq d h                  output projection
                 + 6 h f)                    SwiGLU: gate and up (2 x 2 h f), down (2 f h)
              + 2 h V                        logits

The engine-vs-transformers comparison trains the same config and batch on one process:
``Trainer.train_step`` (DistributedOptimizer, fused AdamW, clip 1.0) against
``transformers.GlmForCausalLM`` forward with labels + backward + clip_grad_norm_ + torch.optim.AdamW.
fp32 for both; bf16: the engine's bf16 params with fp32 master weights vs transformers under
``torch.autocast("cpu", bfloat16)`` with fp32 params (its usual mixed-precision path).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time

import torch

MM_SIZE = 1024  # square fp32 matmul for the peak rate: large enough to reach the BLAS plateau on one core


def training_flops_per_token(config, seq_length: int) -> float:
    """Model FLOPs per trained token (see the module docstring)."""
    h, d, f, v = config.hidden_size, config.kv_channels, config.ffn_hidden_size, config.vocab_size
    hq, hkv = config.num_attention_heads, config.num_kv_groups
    layer = 2 * h * (hq + 2 * hkv) * d + 4 * seq_length * hq * d + 2 * hq * d * h + 6 * h * f
    return 3.0 * (config.num_layers * layer + 2 * h * v)


def matmul_rate(size: int = MM_SIZE, repeats: int = 5) -> float:
    """Measured fp32 matmul FLOP/s on this thread (best of ``repeats``)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size ** 3 / best


# ---- one layout, several processes ---------------------------------------------------------------
def _layout_worker(rank, world_size, port, fn, fn_args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import torch.distributed as dist
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        queue.put((rank, fn(*fn_args)))
    except BaseException as e:  # noqa: BLE001 - report, the parent prints it
        queue.put((rank, {"error": f"{type(e).__name__}: {e}"}))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn_workers(fn, world: int, *fn_args, what: str = "benchmark") -> dict:
    """Run ``fn(*fn_args)`` on ``world`` fresh gloo processes (one thread each); rank 0's result.
    ``fn`` must be importable (spawned processes pickle it by name)."""
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_layout_worker, args=(r, world, port, fn, fn_args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=1800) for _ in range(world))
    for p in procs:
        p.join(timeout=60)
    errors = [r["error"] for r in results.values() if "error" in r]
    if errors:
        raise RuntimeError(f"{what} failed: {errors[0]}")
    return results[0]


def _trainer(config, layout, args, mixed_precision="fp32", micro_batch=None, global_batch=None):
    from engine.parallel.pipeline import build_model_chunks
    from engine.train import LRConfig, LRSchedule, OptimizerConfig, TrainConfig, Trainer, build_optimizer
    train = TrainConfig(global_batch_size=global_batch or args.global_batch,
                        micro_batch_size=micro_batch or args.micro_batch, seq_length=args.seq)
    chunks = build_model_chunks(config, layout)
    optimizer = build_optimizer(chunks, layout, OptimizerConfig(clip_grad=1.0, mixed_precision=mixed_precision,
                                                                overlap_grad_reduce=args.overlap == "on",
                                                                bucket_size_bytes=args.bucket_mb * 2**20), 1e-4)
    return Trainer(chunks, optimizer, layout, config, train, LRSchedule(LRConfig(lr=1e-4, min_lr=1e-5), args.steps))


def _batch(config, global_batch, seq, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, config.vocab_size, (global_batch, seq + 1), generator=g)
    return {"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous()}


def _run_layout(spec, args) -> dict:
    from engine.parallel import ParallelDims, ParallelLayout
    tp, pp, dp, vpp, cp = spec
    config = _config(args.config)
    layout = ParallelLayout.build(ParallelDims(tp=tp, pp=pp, dp=dp, vpp=vpp, cp=cp))
    trainer = _trainer(config, layout, args)
    batch = _batch(config, args.global_batch, args.seq)
    metrics = [trainer.train_step(batch) for _ in range(args.steps)][1:]
    seconds = statistics.median(m.seconds for m in metrics)
    last = metrics[-1]
    # one more step, untimed, for the activation memory: what autograd held for backward at its peak
    from engine.train.metrics import SavedActivationMeter
    with SavedActivationMeter(exclude=[p for chunk in trainer.chunks for p in chunk.parameters()]) as meter:
        trainer.train_step(batch)
    return {"seconds": seconds, "tokens": last.tokens, "comm_bytes": last.comm_bytes,
            "peak_saved_activation_bytes": meter.peak,
            "bubble": last.bubble_fraction, "bubble_cpu": last.bubble_fraction_cpu,
            "bubble_analytic": last.bubble_fraction_analytic, "loss": last.loss,
            "peak_memory_bytes": last.peak_memory_bytes}


def run_layout(spec, args) -> dict:
    tp, pp, dp, vpp, cp = spec
    return spawn_workers(_run_layout, tp * pp * dp * cp, spec, args,
                         what=f"layout tp={tp} pp={pp} dp={dp} vpp={vpp} cp={cp}")


# ---- engine vs transformers ----------------------------------------------------------------------
def _median(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def engine_vs_hf(args, dtype: str) -> dict:
    import transformers

    from engine.parallel import ParallelLayout
    config = _config(args.config)
    batch = _batch(config, args.hf_batch, args.seq)
    trainer = _trainer(config, ParallelLayout.single(), args, mixed_precision=dtype, micro_batch=args.hf_batch,
                       global_batch=args.hf_batch)
    torch.manual_seed(0)
    hf = transformers.GlmForCausalLM(config.to_hf())
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    ids = torch.cat([batch["input_ids"], batch["labels"][:, -1:]], dim=1)

    def hf_step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = hf(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss  # HF shifts the labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)

    engine_s = _median(lambda: trainer.train_step(batch), args.repeats)
    hf_s = _median(hf_step, args.repeats)
    engine_s = min(engine_s, _median(lambda: trainer.train_step(batch), args.repeats))  # interleave: load drift
    hf_s = min(hf_s, _median(hf_step, args.repeats))
    tokens = args.hf_batch * args.seq
    return {"dtype": dtype, "engine_s": engine_s, "transformers_s": hf_s, "engine_tokens_per_s": tokens / engine_s,
            "transformers_tokens_per_s": tokens / hf_s, "speedup": hf_s / engine_s}


def _config(name: str):
    from engine.config import load_config
    return load_config(name)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.bench train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", help="model preset or YAML")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=4, help="steps per layout (the first is not timed)")
    p.add_argument("--layouts", default="1,1,1 2,1,1 1,2,1 1,1,2 1,2,1,2 1,1,1,1,2",
                   help="space-separated tp,pp,dp[,vpp[,cp]]")
    p.add_argument("--hf-batch", type=int, default=4, help="batch of the engine vs transformers step")
    p.add_argument("--dtypes", default="fp32,bf16", help="engine vs transformers precisions ('' to skip)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--mm-size", type=int, default=MM_SIZE)
    p.add_argument("--overlap", choices=("on", "off"), default="on",
                   help="reduce DP gradient buckets during the last backward (on) or after it (off)")
    p.add_argument("--bucket-mb", type=float, default=40.0, help="DP gradient bucket size in MiB")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error("--steps must be >= 2 (the first step is a warm-up)")
    torch.set_num_threads(1)
    config = _config(args.config)
    rate = matmul_rate(args.mm_size)
    flops_token = training_flops_per_token(config, args.seq)
    cores = os.cpu_count() or 1
    print(f"model {config.name}: {config.num_parameters() / 1e6:.1f}M params, {flops_token / 1e6:.1f} MFLOP per "
          f"trained token (seq {args.seq}); fp32 matmul {args.mm_size}^3, 1 thread: {rate / 1e9:.1f} GFLOP/s; "
          f"{cores} CPU cores")
    out = {"config": config.name, "seq": args.seq, "matmul_flops_per_s": rate, "flops_per_token": flops_token,
           "cpu_cores": cores, "layouts": [], "engine_vs_transformers": []}
    header = (f"{'tp':>3}{'pp':>3}{'dp':>3}{'vpp':>4}{'cp':>3}  {'tokens/s':>9}  {'MFU':>6}  {'bubble':>6}  {'cpu-bub':>7}"
              f"  {'analytic':>8}  {'act MiB':>7}  comm MiB/step (rank 0)")
    print(f"\nglobal batch {args.global_batch} x {args.seq} tokens, micro-batch {args.micro_batch}, median of "
          f"{args.steps - 1} steps\n{header}\n{'-' * len(header)}")
    for item in args.layouts.split():
        spec = tuple(int(x) for x in item.split(","))
        spec = spec + (1,) * (5 - len(spec))
        r = run_layout(spec, args)
        world = spec[0] * spec[1] * spec[2] * spec[4]
        tps = r["tokens"] / r["seconds"]
        mfu = flops_token * tps / (rate * min(world, cores))
        comm = ", ".join(f"{g} {b / 2**20:.2f}" for g, b in sorted(r["comm_bytes"].items()) if g != "mp") or "-"
        print(f"{spec[0]:>3}{spec[1]:>3}{spec[2]:>3}{spec[3]:>4}{spec[4]:>3}  {tps:>9.0f}  {mfu:>6.1%}  {r['bubble']:>6.2f}  "
              f"{r['bubble_cpu']:>7.2f}  {r['bubble_analytic']:>8.2f}  "
              f"{r['peak_saved_activation_bytes'] / 2**20:>7.1f}  {comm}", flush=True)
        out["layouts"].append({"tp": spec[0], "pp": spec[1], "dp": spec[2], "vpp": spec[3], "cp": spec[4],
                               "tokens_per_s": tps,
                               "mfu": mfu, **r})
    dtypes = [d for d in args.dtypes.split(",") if d]
    if dtypes:
        print(f"\nengine vs transformers.GlmForCausalLM, one process, batch {args.hf_batch} x {args.seq}, "
              f"median of {args.repeats} steps (best of 2 interleaved rounds)")
        for dtype in dtypes:
            r = engine_vs_hf(args, dtype)
            print(f"  {dtype}: engine {r['engine_tokens_per_s']:.0f} tok/s ({r['engine_s'] * 1e3:.1f} ms/step), "
                  f"transformers {r['transformers_tokens_per_s']:.0f} tok/s ({r['transformers_s'] * 1e3:.1f} ms/step), "
                  f"speedup {r['speedup']:.2f}x", flush=True)
            out["engine_vs_transformers"].append(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
