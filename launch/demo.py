"""The main job on the built-in tiny default, the RLHF demo on CPU: pretrain -> SFT -> reward model -> PPO.

    python -m launch.demo [--out runs/demo] [--pretrain-steps 120] [--sft-steps 100] [--rm-steps 120]
                          [--ppo-iterations 20] [--seq-length 128] [--max-new-tokens 32]

Runs the three ``launch.train`` modes back to back on the ``tiny`` preset with the built-in data (the
default tokenizer and ``pydoc_data.topics``: raw text, then conversations, then preference pairs;
``engine.data.builtin``), each stage starting from the previous stage's checkpoint (``--init-from``),
then PPO (``launch.rlhf``: actor and reference from the SFT checkpoint, reward model and critic from
the RM checkpoint). Finally the SFT and the PPO actors answer a few held-out questions (sampled with
the KV cache) and the reward model scores both answers. Writes each stage's metrics.jsonl and
checkpoints under --out, and Hugging Face exports of the PPO actor (GlmForCausalLM) and the reward
model (GlmForSequenceClassification).
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


def _metrics(path: Path, skip: int = 0) -> list[dict]:
    """The JSON lines of a metrics.jsonl after its first ``skip`` (a rerun into the same --out appends to
    the earlier runs' lines: a stage reads only its own)."""
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(x) for x in lines[skip:]]


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
    earlier = len(_metrics(out / mode / "metrics.jsonl"))
    if run_training(run) != 0:
        raise SystemExit(f"the {mode} stage failed")
    lines = _metrics(out / mode / "metrics.jsonl", earlier)
    summary = f"{mode}: loss {lines[0]['loss']:.3f} -> {lines[-1]['loss']:.3f}"
    for key in ("eval_loss", "eval_accuracy"):
        if key in lines[-1]:
            summary += f", held-out {key.removeprefix('eval_')} {lines[-1][key]:.3f}"
    print(summary, flush=True)
    return ckpt


def _ppo_stage(out: Path, sft: Path, rm: Path, iterations: int) -> Path:
    """PPO (``launch.rlhf``) from the SFT and RM checkpoints; returns the directory of its actor/critic."""
    from launch.rlhf import load_rlhf_run, train_ppo, validate_rlhf_run
    save = out / "ppo" / "ckpt"
    run = load_rlhf_run(RUNS / "ppo.yaml", {"ppo": {"iterations": iterations}, "log_dir": str(out / "ppo"),
                                            "checkpoint": {"actor_from": str(sft), "reward_from": str(rm),
                                                           "save": str(save)}})
    validate_rlhf_run(run, 1)
    print(f"\n== ppo: {iterations} iterations ({RUNS / 'ppo.yaml'})", flush=True)
    earlier = len(_metrics(out / "ppo" / "metrics.jsonl"))
    if train_ppo(run) != 0:
        raise SystemExit("the ppo stage failed")
    lines = [r for r in _metrics(out / "ppo" / "metrics.jsonl", earlier) if "reward" in r]  # not eval-only records
    k = max(1, len(lines) // 4)  # mean of the first and last quarter: single rollouts are noisy
    first, last = (sum(r["reward"] for r in rs) / len(rs) for rs in (lines[:k], lines[-k:]))
    print(f"ppo: reward {first:+.3f} -> {last:+.3f} (mean of the first / last {k} iterations), KL to the "
          f"reference {lines[-1]['kl']:.3f}", flush=True)
    return save


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
    p.add_argument("--ppo-iterations", type=int, default=20)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/demo")
    args = p.parse_args(argv)
    if min(args.pretrain_steps, args.sft_steps, args.rm_steps, args.ppo_iterations) < 1 or args.seq_length < 48:
        p.error("every --*-steps and --ppo-iterations must be >= 1 and --seq-length >= 48 (a built-in question "
                "and the start of its answer)")

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

    ppo = _ppo_stage(out, sft, rm, args.ppo_iterations)

    # sample answers to held-out questions (the rm run's split: pairs it never trained on) from the SFT
    # and the PPO actor, and score both, in the training format, with the reward model
    from launch.train import load_run_config
    rm_run = load_run_config(RUNS / "rm.yaml")
    reward_model = _load(GLMForScalarHead, rm)
    actors = {"SFT": _load(GLMForCausalLM, sft), "PPO": _load(GLMForCausalLM, ppo / "actor")}
    pairs = builtin_preference_pairs()
    _, held = split_indices(len(pairs), rm_run.data.eval_fraction, rm_run.train.seed)
    shown = [pairs[int(i)] for i in held[:3]]
    prompts = [tok.encode_prompt(pair["prompt"]) for pair in shown]
    answers = {name: actor.generate(prompts, max_new_tokens=args.max_new_tokens, do_sample=True, temperature=0.7,
                                    top_p=0.9, eos_token_id=tok.stop_ids, seed=args.seed).responses()
               for name, actor in actors.items()}
    print("\n== held-out questions: answers of the SFT and the PPO actor, scored by the reward model")
    with torch.no_grad():
        for i, pair in enumerate(shown):
            print(f"Q: {pair['prompt']}")
            for name in actors:
                text = tok.decode(answers[name][i]).strip()
                ids, _ = tok.encode_chat([{"role": "user", "content": pair["prompt"]},
                                          {"role": "assistant", "content": text}])
                score = reward_model.reward(torch.tensor([ids[:args.seq_length]])).item()
                print(f"  {name} (reward {score:+.3f}): {' '.join(text.split())}")
    actors["PPO"].save_hf(out / "hf_actor")
    reward_model.save_hf(out / "hf_rm")
    print(f"\nwrote metrics and checkpoints under {out}/{{pretrain,sft,rm,ppo}}, Hugging Face exports in "
          f"{out / 'hf_actor'} and {out / 'hf_rm'} [{time.perf_counter() - t0:.1f}s total]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
