"""Engine vs transformers.GlmForCausalLM: forward tokens/s and generation (decode) tokens/s.

    python -m launch.bench model [--configs tiny,mid] [--batch 4] [--seq 256] [--new-tokens 64]
                                 [--repeats 5] [--dtype fp32] [--device cpu] [--json FILE]
                                 [--stop-tokens K] [--samples-per-prompt N]

Both models hold the same weights (the engine loads the HF model). Forward: logits for a
[batch, seq] batch under inference mode. Generation: greedy, fixed number of new tokens (no EOS),
tokens/s = batch * new_tokens / wall time (prefill included, the same for both). Median of
--repeats runs after one warm-up; all numbers come from one run, side by side.

``--stop-tokens K`` adds a rollout measurement: sampling at temperature 1 with ids 1..K as EOS, so
response lengths vary as in RLHF rollouts (about geometric with mean vocab / K on a random model),
engine with and without dropping finished rows from the decoding batch (``SamplingParams.compact``);
tokens/s counts generated tokens up to each row's EOS. Both runs sample the same tokens.
``--samples-per-prompt N`` (> 1) repeats each of batch / N prompts N times, as PPO / GRPO rollouts do,
and also times the rollout with each row prefilled on its own (``SamplingParams.share_prompts`` off).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

MID = dict(hidden_size=1024, ffn_hidden_size=2816, num_layers=8, num_attention_heads=16, num_kv_groups=2,
           head_dim=64, name="mid")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _config(name: str):
    from engine.config import GLMConfig
    tiny = GLMConfig.preset("tiny")
    return tiny if name == "tiny" else tiny.replace(**MID) if name == "mid" else GLMConfig.preset(name)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_time(fn, repeats: int, device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_rollout(ours, prompt, mask, new_tokens: int, stop_tokens: int, repeats: int, device,
                  samples_per_prompt: int = 1) -> dict:
    """Sampled rollout with stop tokens 1..stop_tokens: compaction of finished rows on vs off, and with
    ``samples_per_prompt`` > 1 (each prompt repeated) the shared prefill on vs off."""
    if samples_per_prompt > 1:
        keep = prompt.shape[0] // samples_per_prompt
        prompt = prompt[:keep].repeat_interleave(samples_per_prompt, 0)
        mask = mask[:keep].repeat_interleave(samples_per_prompt, 0)

    def run(compact: bool, share: bool = True):
        return ours.generate(prompt, mask, max_new_tokens=new_tokens, do_sample=True, seed=0,
                             eos_token_id=list(range(1, stop_tokens + 1)), compact=compact, share_prompts=share)
    lengths = run(True).response_mask.sum(1).float()
    on = _median_time(lambda: run(True), repeats, device)
    off = _median_time(lambda: run(False), repeats, device)
    tokens = float(lengths.sum())
    out = {"stop_tokens": stop_tokens, "samples_per_prompt": samples_per_prompt, "mean_length": float(lengths.mean()),
           "max_length": float(lengths.max()),
           "tokens_per_s": {"compact": tokens / on, "no_compact": tokens / off, "speedup": off / on}}
    if samples_per_prompt > 1:
        alone = _median_time(lambda: run(True, share=False), repeats, device)
        out["shared_prefill_tokens_per_s"] = {"shared": tokens / on, "per_row": tokens / alone, "speedup": alone / on}
    return out


def bench_one(name: str, batch: int, seq: int, new_tokens: int, repeats: int, dtype, device,
              stop_tokens: int = 0, samples_per_prompt: int = 1) -> dict:
    import transformers
    from engine.model.glm import GLMForCausalLM
    cfg = _config(name)
    torch.manual_seed(0)
    hf = transformers.GlmForCausalLM(cfg.to_hf()).to(device=device, dtype=dtype).eval()
    ours = GLMForCausalLM.from_hf(hf).to(device=device, dtype=dtype).eval()
    ids = torch.randint(3, cfg.vocab_size, (batch, seq), device=device)
    prompt = ids[:, : max(1, seq // 4)]
    mask = torch.ones_like(prompt)

    with torch.inference_mode():
        fwd_ours = _median_time(lambda: ours(ids), repeats, device)
        fwd_hf = _median_time(lambda: hf(ids).logits, repeats, device)
        gen_ours = _median_time(lambda: ours.generate(prompt, mask, max_new_tokens=new_tokens, eos_token_id=[]),
                                repeats, device)
        gen_hf = _median_time(lambda: hf.generate(prompt, attention_mask=mask, do_sample=False,
                                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                  pad_token_id=cfg.pad_token_id, eos_token_id=None),
                              repeats, device)
        rollout = (bench_rollout(ours, prompt, mask, new_tokens, stop_tokens, repeats, device, samples_per_prompt)
                   if stop_tokens else None)
    fwd_tokens, gen_tokens = batch * seq, batch * new_tokens
    return {"rollout": rollout, 
        "config": name, "params_M": round(cfg.num_parameters() / 1e6, 1), "batch": batch, "seq": seq,
        "new_tokens": new_tokens, "dtype": str(dtype).replace("torch.", ""), "device": str(device),
        "forward_tokens_per_s": {"engine": fwd_tokens / fwd_ours, "transformers": fwd_tokens / fwd_hf,
                                 "speedup": fwd_hf / fwd_ours},
        "generate_tokens_per_s": {"engine": gen_tokens / gen_ours, "transformers": gen_tokens / gen_hf,
                                  "speedup": gen_hf / gen_ours},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.bench model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="tiny,mid")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None)
    p.add_argument("--stop-tokens", type=int, default=0,
                   help="also time a sampled rollout with ids 1..K as EOS, compaction of finished rows on/off")
    p.add_argument("--samples-per-prompt", type=int, default=1,
                   help="with --stop-tokens: each of batch / N prompts repeated N times; also times the prefill "
                        "of every row on its own")
    args = p.parse_args(argv)
    if args.stop_tokens < 0:
        p.error(f"--stop-tokens must be >= 0, got {args.stop_tokens}")
    if args.samples_per_prompt > 1 and not args.stop_tokens:
        p.error("--samples-per-prompt times the rollout measurement: add --stop-tokens K")
    if args.samples_per_prompt < 1 or args.batch % args.samples_per_prompt:
        p.error(f"--samples-per-prompt {args.samples_per_prompt} must be >= 1 and divide --batch {args.batch}")
    import transformers
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {device}, "
          f"threads {torch.get_num_threads()}, dtype {args.dtype}")
    results = []
    for name in args.configs.split(","):
        r = bench_one(name, args.batch, args.seq, args.new_tokens, args.repeats, DTYPES[args.dtype], device,
                      args.stop_tokens, args.samples_per_prompt)
        results.append(r)
        f, g = r["forward_tokens_per_s"], r["generate_tokens_per_s"]
        print(f"{name:>6} ({r['params_M']}M params)  forward tok/s: engine {f['engine']:.0f}  transformers "
              f"{f['transformers']:.0f}  ({f['speedup']:.2f}x)   generate tok/s: engine {g['engine']:.1f}  "
              f"transformers {g['transformers']:.1f}  ({g['speedup']:.2f}x)")
        if r["rollout"]:
            o, t = r["rollout"], r["rollout"]["tokens_per_s"]
            print(f"{'':>6} rollout ({args.stop_tokens} stop ids; length mean {o['mean_length']:.1f}, max "
                  f"{o['max_length']:.0f} of {args.new_tokens}) tok/s: compact {t['compact']:.1f}  no-compact "
                  f"{t['no_compact']:.1f}  ({t['speedup']:.2f}x)")
            if "shared_prefill_tokens_per_s" in o:
                s = o["shared_prefill_tokens_per_s"]
                print(f"{'':>6} rollout, {args.samples_per_prompt} samples per prompt, tok/s: shared prefill "
                      f"{s['shared']:.1f}  per-row prefill {s['per_row']:.1f}  ({s['speedup']:.2f}x)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0
