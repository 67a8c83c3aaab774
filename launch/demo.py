"""The main job on the built-in tiny default: pretrain a tiny GLM on CPU, then generate with it.

    python -m launch.demo [--steps 60] [--seq-length 128] [--batch-size 8] [--out runs/demo]

Trains the default tokenizer on `pydoc_data.topics` (cached), pretrains the `tiny` preset on the same
text for a few steps, prints the loss curve, greedy-decodes a few prompts, and writes a Hugging Face
checkpoint plus metrics.jsonl to --out. (The RLHF demo replaces this once the PPO loop exists.)
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

import kernels
from engine.config import GLMConfig
from engine.model.glm import GLMForCausalLM


def pack_corpus(texts: list[str], tokenizer, seq_length: int) -> torch.Tensor:
    """Concatenate documents separated by EOS and cut into ``[n, seq_length + 1]`` samples."""
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer.encode(t))
        ids.append(tokenizer.eos_id)
    n = len(ids) // (seq_length + 1)
    return torch.tensor(ids[: n * (seq_length + 1)], dtype=torch.long).view(n, seq_length + 1)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--max-new-tokens", type=int, default=24)
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.seq_length < 8:
        p.error("--steps and --batch-size must be >= 1 and --seq-length >= 8")

    from engine.data.tokenizer import default_corpus, default_tokenizer
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tok = default_tokenizer()
    config = GLMConfig.preset("tiny").replace(vocab_size=tok.vocab_size, pad_token_id=tok.pad_id, eos_token_id=[tok.eos_id])
    samples = pack_corpus(default_corpus(), tok, args.seq_length)
    print(f"tokenizer ready ({tok.vocab_size} tokens) and corpus packed: {samples.shape[0]} samples of "
          f"{args.seq_length} tokens [{time.perf_counter() - t0:.1f}s]")

    model = GLMForCausalLM(config)
    print(f"model: tiny GLM, {config.num_parameters() / 1e6:.1f}M parameters, {config.num_layers} layers, "
          f"{config.num_attention_heads} heads / {config.num_kv_groups} KV groups")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    order = torch.randperm(samples.shape[0], generator=torch.Generator().manual_seed(args.seed))
    metrics = open(out / "metrics.jsonl", "w")
    for step in range(args.steps):
        idx = order[(step * args.batch_size + torch.arange(args.batch_size)) % samples.shape[0]]
        batch = samples[idx]
        lr = lr_at(step, args.steps, args.lr, warmup=max(1, args.steps // 10))
        for g in opt.param_groups:
            g["lr"] = lr
        t = time.perf_counter()
        logits = model(batch[:, :-1])
        loss = kernels.cross_entropy(logits, batch[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        dt = time.perf_counter() - t
        rec = {"step": step + 1, "loss": loss.item(), "grad_norm": grad_norm.item(), "lr": lr,
               "tokens_per_s": batch[:, 1:].numel() / dt}
        metrics.write(json.dumps(rec) + "\n")
        if step == 0 or (step + 1) % 10 == 0 or step + 1 == args.steps:
            print(f"step {step + 1:4d}  loss {rec['loss']:.3f}  grad_norm {rec['grad_norm']:.2f}  lr {lr:.2e}  "
                  f"{rec['tokens_per_s']:.0f} tok/s")
    metrics.close()

    prompts = ["The import statement", "Boolean operations", "A class definition"]
    gen = model.generate([tok.encode(s) for s in prompts], max_new_tokens=args.max_new_tokens,
                         do_sample=True, temperature=0.8, top_p=0.9, seed=args.seed)
    for s, ids in zip(prompts, gen.responses()):
        text = " ".join(tok.decode(ids).split())  # newlines flattened so samples read on one line
        print(f">>> {s} ... {text}")
    model.save_hf(out / "hf")
    print(f"\nwrote {out / 'metrics.jsonl'} and a Hugging Face checkpoint in {out / 'hf'} "
          f"[{time.perf_counter() - t0:.1f}s total]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
