"""The main job on the built-in tiny default: pretrain -> SFT -> reward model on CPU, then sample and score.

    python -m launch.demo [--out runs/demo] [--pretrain-steps 120] [--sft-steps 100] [--rm-steps 120]
                          [--seq-length 128] [--max-new-tokens 32]

Runs the three ``launch.train`` modes back to back on the ``tiny`` preset with the built-in data (the
default tokenizer and ``pydoc_data.topics``: raw text, then conversations, then preference pairs;
``engine.data.builtin``), each stage starting from the previous stage's checkpoint (``--init-from``).
Then the SFT model answers a few held-out questions (sampled with its KV cache) and the reward model
scores each answer against a deliberately off-topic one. Writes each stage's metrics.jsonl and
checkpoint under --out, and Hugging Face exports of the SFT model (GlmForCausalLM) and the reward
model (GlmForSequenceClassification). The RLHF stage (PPO) extends this chain once it exists.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "configs" / "runs"


def _stage(mode: str, out: Path, steps: int, seq_length: int, init_from: Path | None, **train) -> Path:
    """Run one ``launch.train`` mode in this process; returns its checkpoint directory."""
    from launch.train import load_run_config, train as run_training, validate_run
    ckpt = out / mode / "ckpt"
    overrides = {"train": {"train_steps": steps, "seq_length": seq_length, **train},
                 "checkpoint": {"save": str(ckpt), "init_from": str(init_from) if init_from else None},
                 "log_dir": str(out / mode)}
    run = load_run_config(RUNS / f"{mode}.yaml", overrides)
    validate_run(run, 1)
    print(f"\n== {mode}: {steps} steps ({RUNS / f'{mode}.yaml'})", flush=True)
    if run_training(run) != 0:
        raise SystemExit(f"the {mode} stage failed")
    lines = [json.loads(x) for x in (out / mode / "metrics.jsonl").read_text().splitlines()]
    summary = f"{mode}: loss {lines[0]['loss']:.3f} -> {lines[-1]['loss']:.3f}"
    for key in ("eval_loss", "eval_accuracy"):
        if key in lines[-1]:
            summary += f", held-out {key.removeprefix('eval_')} {lines[-1][key]:.3f}"
    print(summary, flush=True)
    return ckpt


def _load(model_cls, ckpt: Path):
    from engine.train.checkpoint import read_full_model_state
    config, state = read_full_model_state(ckpt)
    model = model_cls(config, init=False)
    model.load_state_dict(state, strict=True)
    return model.eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrain-steps", type=int, default=120)
    p.add_argument("--sft-steps", type=int, default=100)
    p.add_argument("--rm-steps", type=int, default=120)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/demo")
    args = p.parse_args(argv)
    if min(args.pretrain_steps, args.sft_steps, args.rm_steps) < 1 or args.seq_length < 48:
        p.error("every --*-steps must be >= 1 and --seq-length >= 48 (a built-in question and the start of "
                "its answer)")

    from engine.data.builtin import builtin_preference_pairs, split_indices
    from engine.data.tokenizer import default_tokenizer
    from engine.model.glm import GLMForCausalLM, GLMForScalarHead
    t0 = time.perf_counter()
    out = Path(args.out)
    tok = default_tokenizer()
    print(f"default tokenizer ready ({tok.vocab_size} tokens) [{time.perf_counter() - t0:.1f}s]")

    pt = _stage("pretrain", out, args.pretrain_steps, args.seq_length, None)
    sft = _stage("sft", out, args.sft_steps, args.seq_length, pt, eval_interval=0)
    rm = _stage("rm", out, args.rm_steps, args.seq_length, sft, eval_interval=0)

    # sample answers to held-out questions (the rm run's split: pairs it never trained on) and score
    # each, in the training format, against the off-topic answer of the same pair
    from launch.train import load_run_config
    rm_run = load_run_config(RUNS / "rm.yaml")
    actor, reward_model = _load(GLMForCausalLM, sft), _load(GLMForScalarHead, rm)
    pairs = builtin_preference_pairs()
    _, held = split_indices(len(pairs), rm_run.data.eval_fraction, rm_run.train.seed)
    shown = [pairs[int(i)] for i in held[:3]]
    prompts = [tok.encode_prompt(pair["prompt"]) for pair in shown]
    gen = actor.generate(prompts, max_new_tokens=args.max_new_tokens, do_sample=True, temperature=0.7,
                         top_p=0.9, eos_token_id=tok.stop_ids, seed=args.seed)
    print("\n== samples from the SFT model, scored by the reward model (higher is better)")
    with torch.no_grad():
        for pair, answer in zip(shown, gen.responses()):
            text = tok.decode(answer).strip()
            scores = []
            for reply in (text, pair["rejected"]):
                ids, _ = tok.encode_chat([{"role": "user", "content": pair["prompt"]},
                                          {"role": "assistant", "content": reply}])
                scores.append(reward_model.reward(torch.tensor([ids[:args.seq_length]])).item())
            print(f"Q: {pair['prompt']}\nA: {' '.join(text.split())}\n   reward {scores[0]:+.3f}   "
                  f"(an off-topic answer: {scores[1]:+.3f})")
    actor.save_hf(out / "hf_sft")
    reward_model.save_hf(out / "hf_rm")
    print(f"\nwrote metrics and checkpoints under {out}/{{pretrain,sft,rm}}, Hugging Face exports in "
          f"{out / 'hf_sft'} and {out / 'hf_rm'} [{time.perf_counter() - t0:.1f}s total]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
