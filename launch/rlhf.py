"""RLHF with PPO (ChatGLM-RLHF recipe): actor, critic, reference and reward models on the same ranks.

    python -m launch.rlhf --config configs/runs/ppo.yaml --actor-from SFT_CKPT --reward-from RM_CKPT \\
        [--critic-from CKPT] [--tp T] [--pp P] [--vpp V] [--cp C] [--sequence-parallel] [--iterations N]
        [--log-dir DIR] [--save DIR] [--ptx-coef C]
    torchrun --nproc-per-node N -m launch.rlhf ...          # dp = world_size / (tp pp cp)

The actor and the reference start from ``--actor-from`` (an SFT checkpoint of ``launch.train``, any
layout), the reward model from ``--reward-from`` (an rm checkpoint), the critic from ``--critic-from``
(default: the reward model, else the actor; a language-model checkpoint works: trunk copied, fresh value
head). ``--reward-fn module:function`` (or ``file.py:function``) scores responses with a Python function of
(prompt, response, record) instead of a reward model, or on top of one (the scores add up;
``engine.rlhf.rewards``, e.g. ``engine.rlhf.rewards:math_answer``). Prompts: ``data.prompts`` (JSONL, one
``{"prompt": str, ["system": str,] ...}`` or conversation ``{"messages": [{"role", "content"}, ...], ...}`` per
line (``read_prompts``), encoded with the chat template; the whole record reaches the reward function) or the
built-in questions (``engine.data.builtin``). PPO-ptx data (``ppo.ptx_coef > 0``): ``data.ptx_path``
(a chat indexed dataset) or the built-in conversations. Rank 0 appends one JSON line per iteration to
``DIR/metrics.jsonl`` (reward, reward_vs_reference, kl, policy/value losses, clipfrac, ...). ``--save DIR
[--save-interval N]`` writes actor and critic checkpoints (``DIR/actor``, ``DIR/critic``, with optimizer
states; export them with ``launch.convert --checkpoint``); ``--load DIR`` resumes a PPO run (weights,
optimizers, iteration, reference baselines; any TP x PP x DP x CP layout). ``--cp C`` (context parallelism)
splits every prompt + response sequence over C ranks for scoring and the updates (long responses); each of
the C ranks samples its own share of the rows on a cp = 1 copy of the actor.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import yaml

from engine.config import GLMConfig, config_section, model_from_spec, read_run_file, run_dict
from engine.model.lora import LoRAConfig, add_lora
from engine.rlhf.core import IS_LEVELS, IS_MODES, LOSS_AGG_MODES, POLICY_LOSSES
from engine.rlhf.ppo import ESTIMATORS, PPO_LR, PPOConfig
from engine.train.lr import LRConfig
from engine.train.step import OptimizerConfig
from launch.runtime import Processes, check_tokenizer, close_after_error, error, exit_process

PROG = "launch.rlhf"
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "runs" / "ppo.yaml"


@dataclass(frozen=True)
class RLHFData:
    prompts: Optional[str] = None
    """JSONL, one prompt per line (``read_prompts``: a question, with an optional system message, or a
    conversation; the whole record reaches a reward function); None: the built-in questions."""
    ptx_path: Optional[str] = None
    """Chat indexed dataset for PPO-ptx; None: the built-in conversations."""
    eval_prompts: Optional[str] = None
    """Held-out prompts (JSONL like ``prompts``) evaluated every ``ppo.eval_interval`` iterations."""
    eval_fraction: float = 0.0
    """Or: hold out this fraction of the prompts (seeded) for evaluation instead."""
    tokenizer: Optional[str] = None
    """A ChatGLM tokenizer.model (or the model directory holding it); None: the built-in tokenizer."""
    tokenizer_cache: Optional[str] = None
    """Cache directory of the default tokenizer and built-in datasets (None: ~/.cache/glm-engine)."""


@dataclass(frozen=True)
class RLHFReward:
    function: Optional[str] = None
    """Rule-based reward ``"package.module:function"`` or ``"path/file.py:function"``, called as
    ``fn(prompt, response, record) -> float`` (``engine.rlhf.rewards``); added to the reward model's score
    when ``checkpoint.reward_from`` is also set. None: the reward model alone."""
    workers: int = 1
    """Threads calling the function at once (> 1 for checkers that wait on a sandbox, a service or a judge)."""
    url: Optional[str] = None
    """Or: a reward service, ``http(s)://...``, sent each scoring batch as JSON ``{"prompts", "responses",
    "records"}`` and answering ``{"rewards": [...]}`` (``engine.rlhf.rewards.RemoteReward``); like a function,
    added to the reward model's score when both are set."""
    timeout: float = 60.0
    """Seconds per request to ``url`` (failed requests are retried 3 times)."""


@dataclass(frozen=True)
class RLHFCheckpoints:
    actor_from: Optional[str] = None
    """SFT checkpoint: the actor's and the reference's weights (required)."""
    reward_from: Optional[str] = None
    """Reward-model checkpoint (required unless ``reward.function`` or ``reward.url`` is set)."""
    critic_from: Optional[str] = None
    """Critic weights (None: the reward model's, else the actor's trunk with a fresh value head)."""
    save: Optional[str] = None
    """Write actor and critic checkpoints here (``DIR/actor``, ``DIR/critic``) at the end of the run."""
    save_interval: int = 0
    """Also save every N iterations (0: only at the end)."""
    load: Optional[str] = None
    """Resume from the PPO checkpoints in this directory (may equal ``save``)."""
    keep_last: Optional[int] = None
    """Keep only the newest K checkpoints of each model (None: keep all)."""
    async_save: bool = False
    """Write the checkpoints in the background while PPO goes on (``checkpoint.AsyncCheckpointer``)."""


@dataclass(frozen=True)
class RLHFRun:
    model: GLMConfig
    tp: int = 1
    pp: int = 1
    """Pipeline stages of the training layout; the actor is resharded to every layer per rank for
    sampling (``ppo.generation_tp``, default tp)."""
    vpp: int = 1
    """Virtual pipeline stages per rank (the interleaved schedule; needs pp > 1)."""
    cp: int = 1
    """Context-parallel degree: every sequence split over cp ranks for scoring and the updates; sampling
    and per-row work (reward functions) split the rows over them instead."""
    sequence_parallel: bool = False
    """Megatron's sequence parallelism (tp > 1): the residual stream split over the TP ranks for scoring and
    the updates (sampling runs on a copy without it)."""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    actor_optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    actor_lr: LRConfig = field(default_factory=lambda: PPO_LR)
    critic_optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    critic_lr: LRConfig = field(default_factory=lambda: PPO_LR)
    data: RLHFData = field(default_factory=RLHFData)
    reward: RLHFReward = field(default_factory=RLHFReward)
    checkpoint: RLHFCheckpoints = field(default_factory=RLHFCheckpoints)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA adapters on the actor (``rank`` > 0): only they train, and the reference is the actor with them off
    (no reference copy is held)."""
    critic_lora: bool = False
    """With ``lora``: the critic trains the same kind of adapters (and its value head) instead of its weights."""
    log_dir: str = "runs/ppo"
    log_samples: int = 0
    """Rank 0 appends this many decoded rollout samples per iteration (prompt, response, score) to
    ``log_dir/samples.jsonl``."""

    def to_dict(self) -> dict:
        return run_dict(self)


SECTIONS = {"model", "tp", "pp", "vpp", "cp", "sequence_parallel", "ppo", "actor_optim", "actor_lr", "critic_optim",
            "critic_lr", "data", "reward", "checkpoint", "lora", "critic_lora", "log_dir", "log_samples"}


def load_rlhf_run(path, overrides: Optional[dict] = None) -> RLHFRun:
    """Parse a PPO run YAML, with ``overrides`` ``{section: {field: value}}`` (``tp``/``pp``/``vpp``/``cp``/``log_dir``:
    a value)."""
    raw, base = read_run_file(path, SECTIONS, overrides)
    return RLHFRun(model=model_from_spec(raw.get("model", "tiny"), base), tp=int(raw.get("tp", 1)),
                   pp=int(raw.get("pp", 1)), vpp=int(raw.get("vpp", 1)), cp=int(raw.get("cp", 1)),
                   sequence_parallel=raw.get("sequence_parallel", False),
                   ppo=config_section(PPOConfig, raw.get("ppo"), "ppo"),
                   actor_optim=config_section(OptimizerConfig, raw.get("actor_optim"), "actor_optim"),
                   actor_lr=config_section(LRConfig, raw.get("actor_lr"), "actor_lr") if raw.get("actor_lr") else PPO_LR,
                   critic_optim=config_section(OptimizerConfig, raw.get("critic_optim"), "critic_optim"),
                   critic_lr=config_section(LRConfig, raw.get("critic_lr"), "critic_lr") if raw.get("critic_lr") else PPO_LR,
                   data=config_section(RLHFData, raw.get("data"), "data"),
                   reward=config_section(RLHFReward, raw.get("reward"), "reward"),
                   checkpoint=config_section(RLHFCheckpoints, raw.get("checkpoint"), "checkpoint"),
                   lora=LoRAConfig.from_dict(raw.get("lora")), critic_lora=raw.get("critic_lora", False),
                   log_dir=str(raw.get("log_dir", "runs/ppo")), log_samples=raw.get("log_samples", 0))


def validate_rlhf_run(run: RLHFRun, world_size: int):
    """Every check that needs no process group: ValueError naming each problem. Returns the dims."""
    from engine.parallel import ParallelDims
    dims = ParallelDims(tp=run.tp, pp=run.pp, vpp=run.vpp, dp=None, cp=run.cp).validate(world_size, run.model)
    if not isinstance(run.sequence_parallel, bool) or (run.sequence_parallel and run.tp == 1):
        raise ValueError(f"sequence_parallel={run.sequence_parallel!r} must be true or false, and true needs tp > 1 "
                         f"(it splits the sequence over the TP ranks; tp={run.tp})")
    run.ppo.validate(dims.dp, run.tp, run.pp, run.vpp, run.cp, run.sequence_parallel)
    if run.ppo.generation_tp is not None and run.ppo.generation_tp < run.tp:
        from engine.rlhf.ppo import validate_generation_dims
        validate_generation_dims(run.ppo.generation_tp, world_size, run.model)
    ck = run.checkpoint
    check_tokenizer(run.data.tokenizer, ck.actor_from, "--actor-from")
    if not isinstance(run.critic_lora, bool) or (run.critic_lora and not run.lora.enabled):
        raise ValueError(f"critic_lora={run.critic_lora!r} must be true or false, and true needs lora.rank > 0 "
                         "(--lora-rank): the critic takes the actor's adapter settings")
    if run.critic_lora and run.ppo.advantage_estimator != "gae":
        raise ValueError(f"critic_lora: advantage_estimator={run.ppo.advantage_estimator!r} trains no critic")
    if not (isinstance(run.log_samples, int) and run.log_samples >= 0):
        raise ValueError(f"log_samples={run.log_samples!r} must be a non-negative integer (samples per iteration)")
    if not ck.actor_from or not (ck.reward_from or run.reward.function or run.reward.url):
        raise ValueError("PPO needs --actor-from (an SFT checkpoint) and a reward: --reward-from (a reward-model "
                         "checkpoint) and/or --reward-fn (a Python function, module:function or file.py:function) or "
                         "--reward-url (a reward service)")
    if run.reward.workers != 1 and not run.reward.function:
        raise ValueError(f"reward.workers={run.reward.workers} sets the threads calling reward.function, which is not "
                         "set (a reward service is sent one request per batch)")
    if run.reward.function and run.reward.url:
        raise ValueError(f"give reward.function ({run.reward.function}) or reward.url ({run.reward.url}), not both")
    if run.reward.url and not (run.reward.url.startswith(("http://", "https://")) and run.reward.timeout > 0):
        raise ValueError(f"reward.url={run.reward.url!r} must start with http:// or https:// and reward.timeout="
                         f"{run.reward.timeout} must be > 0")
    if not (isinstance(run.reward.workers, int) and run.reward.workers >= 1):
        raise ValueError(f"reward.workers={run.reward.workers!r} must be a positive integer")
    if run.reward.function:
        from engine.rlhf.rewards import load_reward_fn
        load_reward_fn(run.reward.function)  # a typo or an import error fails here, before any model is loaded
    if ck.critic_from and run.ppo.advantage_estimator != "gae":
        raise ValueError(f"--critic-from {ck.critic_from}: advantage_estimator={run.ppo.advantage_estimator!r} "
                         "trains no critic (drop --critic-from, or use gae)")
    for name in ("actor_optim", "critic_optim"):
        if getattr(run, name).mixed_precision not in ("fp32", "bf16"):
            raise ValueError(f"{name}.mixed_precision must be fp32 or bf16")
    for lr in (run.actor_lr, run.critic_lr):
        lr.validate()
    d = run.data
    if not 0.0 <= d.eval_fraction < 1.0:
        raise ValueError(f"data.eval_fraction={d.eval_fraction} must be in [0, 1)")
    if d.eval_prompts and d.eval_fraction:
        raise ValueError("give data.eval_prompts or data.eval_fraction, not both")
    held_out = bool(d.eval_prompts or d.eval_fraction)
    if held_out != bool(run.ppo.eval_interval):
        raise ValueError("evaluation needs both held-out prompts (--eval-prompts FILE or --eval-fraction F) and "
                         f"--eval-interval N > 0; got eval_interval={run.ppo.eval_interval} and "
                         + (f"eval_prompts={d.eval_prompts!r}" if d.eval_prompts
                            else f"eval_fraction={d.eval_fraction}"))
    if ck.save_interval < 0 or (ck.save_interval and not ck.save):
        raise ValueError(f"checkpoint.save_interval={ck.save_interval} must be >= 0 and needs --save DIR")
    if ck.keep_last is not None and ck.keep_last < 1:
        raise ValueError(f"checkpoint.keep_last={ck.keep_last} must be >= 1 (or unset: keep every checkpoint)")
    if ck.async_save and not ck.save:
        raise ValueError("--async-save needs --save DIR")
    return dims


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="PPO run YAML (default: configs/runs/ppo.yaml)")
    p.add_argument("--model", help="model preset name, model YAML, or a Hugging Face / THUDM model directory "
                                   "(its config.json)")
    p.add_argument("--lora-rank", type=int, help="train LoRA adapters of this rank on the actor instead of its weights; "
                                                 "its reference is then the actor with them off (no copy)")
    p.add_argument("--lora-alpha", type=float, help="LoRA: adapters' outputs are scaled by alpha / rank (default 16)")
    p.add_argument("--lora-targets", type=lambda v: tuple(v.split(",")),
                   help="LoRA: comma-separated projections to adapt (default qkv,dense,gate_up,down)")
    p.add_argument("--critic-lora", action=argparse.BooleanOptionalAction, default=None,
                   help="with --lora-rank: the critic trains adapters (and its value head) too")
    p.add_argument("--tp", type=int)
    p.add_argument("--pp", type=int, help="pipeline stages of the training layout (sampling gathers every layer)")
    p.add_argument("--vpp", type=int, help="virtual pipeline stages per rank (interleaved schedule)")
    p.add_argument("--cp", type=int, help="context parallel: split each prompt + response sequence over C ranks for "
                   "scoring and the updates (max_prompt_length + max_new_tokens divisible by 2 C)")
    p.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=None,
                   help="split the residual stream over the TP ranks for scoring and the updates (tp > 1)")
    p.add_argument("--iterations", type=int)
    p.add_argument("--rollout-prompts", type=int)
    p.add_argument("--samples-per-prompt", type=int)
    p.add_argument("--mini-batch-size", type=int)
    p.add_argument("--micro-batch-size", type=int)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--kl-coef", type=float)
    p.add_argument("--kl-target", type=float, help="> 0: adapt kl_coef toward this KL per response")
    p.add_argument("--kl-horizon", type=int, help="samples over which the adaptive KL controller closes the gap")
    p.add_argument("--kl-loss-coef", type=float,
                   help="> 0: a KL(actor || reference) term (ppo.kl_loss_kind, default k3) in the actor's loss")
    p.add_argument("--ptx-coef", type=float)
    p.add_argument("--policy-loss", choices=POLICY_LOSSES, help="the actor's surrogate: ppo (per-token clip, "
                   "default), gspo (per-response ratio and clip) or cispo (clipped, detached importance weight)")
    p.add_argument("--clip-eps", type=float, help="clip range of the policy ratio: [1 - clip_eps, 1 + clip_eps_high] "
                   "(default 0.2; GSPO's paper: 3e-4 and 4e-4)")
    p.add_argument("--rollout-is-cap", type=float, help=">= 1 (e.g. 2): weight each token's policy loss by "
                   "min(pi_train / pi_sampler, cap), truncated importance sampling against the sampling copy's "
                   "rounding (0: off)")
    p.add_argument("--rollout-is-level", choices=IS_LEVELS, help="the ratio --rollout-is-cap weights take: each "
                   "token's (default), the response's (sequence) or the geometric mean of its tokens' (geometric)")
    p.add_argument("--rollout-is-mode", choices=IS_MODES, help="truncate: cap the ratio at --rollout-is-cap "
                   "(default); mask: drop the tokens whose ratio is outside [1 / cap, cap]")
    p.add_argument("--clip-eps-high", type=float, help="upper clip range of the policy ratio (clip-higher; default "
                   "clip_eps)")
    p.add_argument("--dual-clip", type=float, help="c > 1: cap the loss of negative-advantage tokens at -c A "
                   "(dual-clip PPO; 0: off)")
    p.add_argument("--grpo-normalize-std", action=argparse.BooleanOptionalAction, default=None,
                   help="GRPO divides the centred group scores by their std (default; --no-...: Dr. GRPO)")
    p.add_argument("--critic-warmup", type=int, help="the first N iterations train the critic alone (gae)")
    p.add_argument("--min-reward-spread", type=float, help="drop prompts whose responses' scores span less than this")
    p.add_argument("--sampling-rounds", type=int, help="dynamic sampling (DAPO): up to N rollouts per iteration until "
                   "--rollout-prompts prompts pass --min-reward-spread")
    p.add_argument("--overlong-buffer", type=int, help="DAPO's soft overlong punishment: responses within the last "
                   "N tokens of --max-new-tokens lose up to ppo.overlong_penalty (default 1) of their score")
    p.add_argument("--mask-truncated", action=argparse.BooleanOptionalAction, default=None,
                   help="leave responses cut off at --max-new-tokens out of the loss (DAPO's overlong filtering)")
    p.add_argument("--entropy-coef", type=float, help="entropy bonus weight in the actor's loss (default 0)")
    p.add_argument("--loss-agg-mode", choices=LOSS_AGG_MODES, help="how the policy loss averages over tokens and "
                   "responses (default token-mean)")
    p.add_argument("--generation-batch-size", type=int, help="rows per generate call on a sampling replica (bounds the "
                   "KV cache; 0: the whole slice at once)")
    p.add_argument("--generation-tp", type=int,
                   help="TP degree to sample with (divides --tp): the actor is resharded for the rollout; 1 = a whole "
                        "model per rank")
    p.add_argument("--advantage-estimator", choices=ESTIMATORS,
                   help="gae: a critic (PPO); grpo / rloo: no critic, advantages relative to the prompt's responses; "
                   "reinforce++(-baseline): no critic, whitened returns of the per-token rewards")
    p.add_argument("--offload", action="store_true", default=None,
                   help="keep the models and optimizer states a phase does not use in host memory")
    p.add_argument("--pack-sequences", action=argparse.BooleanOptionalAction, default=None,
                   help="pack prompt + response sequences into rows for scoring and updates (no padding compute; "
                        "on in configs/runs/ppo.yaml)")
    p.add_argument("--seed", type=int)
    p.add_argument("--eval-interval", type=int, help="evaluate on the held-out prompts every N iterations (and at "
                   "the end): greedy answers of the actor vs the reference, scored by the reward")
    p.add_argument("--prompts", help="prompts JSONL, one {\"prompt\": str, ...} per line (data.prompts; default: the "
                   "built-in questions)")
    p.add_argument("--eval-prompts", help="held-out prompts JSONL (like data.prompts)")
    p.add_argument("--tokenizer", help="ChatGLM tokenizer.model, or the model directory holding it (default: the "
                                       "built-in tokenizer of the tiny model)")
    p.add_argument("--eval-samples", type=int, help="answers per held-out prompt: 1 greedy (default); k > 1 sampled "
                   "at --eval-temperature, reporting the mean and the best of k (eval_best_reward)")
    p.add_argument("--eval-temperature", type=float)
    p.add_argument("--eval-fraction", type=float, help="hold out this fraction of the prompts for evaluation")
    p.add_argument("--actor-from")
    p.add_argument("--reward-from")
    p.add_argument("--reward-fn", help="rule-based reward: module:function or path/file.py:function, called as "
                   "fn(prompt, response, record) -> float (added to the reward model's score if both)")
    p.add_argument("--reward-workers", type=int, help="threads calling --reward-fn at once (default 1)")
    p.add_argument("--reward-url", help="reward service http(s)://...: POST {prompts, responses, records} -> "
                   "{rewards} per scoring batch (engine.rlhf.rewards.RemoteReward)")
    p.add_argument("--critic-from")
    p.add_argument("--save")
    p.add_argument("--save-interval", type=int)
    p.add_argument("--load")
    p.add_argument("--keep-last", type=int, help="keep only the newest K checkpoints of each model")
    p.add_argument("--async-save", action="store_true", default=None,
                   help="write checkpoints in the background while PPO goes on")
    p.add_argument("--log-dir")
    p.add_argument("--log-samples", type=int, help="append N decoded rollout samples per iteration to "
                   "LOG_DIR/samples.jsonl")
    return p


_PPO_FLAGS = ("iterations", "rollout_prompts", "samples_per_prompt", "mini_batch_size", "micro_batch_size",
              "max_new_tokens", "kl_coef", "kl_target", "kl_horizon", "kl_loss_coef", "ptx_coef", "seed",
              "generation_tp", "offload", "advantage_estimator", "pack_sequences", "policy_loss", "clip_eps",
              "clip_eps_high", "dual_clip", "rollout_is_cap", "rollout_is_level", "rollout_is_mode", "loss_agg_mode",
              "eval_interval", "eval_samples", "eval_temperature", "entropy_coef", "overlong_buffer", "mask_truncated",
              "min_reward_spread", "sampling_rounds", "critic_warmup", "grpo_normalize_std", "generation_batch_size")
_CKPT_FLAGS = ("actor_from", "reward_from", "critic_from", "save", "save_interval", "load", "keep_last", "async_save")


def cli_overrides(args) -> dict:
    out: dict = {}
    for name in _PPO_FLAGS:
        if getattr(args, name) is not None:
            out.setdefault("ppo", {})[name] = getattr(args, name)
    for name in _CKPT_FLAGS:
        if getattr(args, name) is not None:
            out.setdefault("checkpoint", {})[name] = getattr(args, name)
    for name in ("prompts", "eval_prompts", "eval_fraction", "tokenizer"):
        if getattr(args, name) is not None:
            out.setdefault("data", {})[name] = getattr(args, name)
    for flag, name in (("reward_fn", "function"), ("reward_workers", "workers"), ("reward_url", "url")):
        if getattr(args, flag) is not None:
            out.setdefault("reward", {})[name] = getattr(args, flag)
    for flag, name in (("lora_rank", "rank"), ("lora_alpha", "alpha"), ("lora_targets", "targets")):
        if getattr(args, flag) is not None:
            out.setdefault("lora", {})[name] = getattr(args, flag)
    for name in ("tp", "pp", "vpp", "cp", "sequence_parallel", "log_dir", "model", "log_samples", "critic_lora"):
        if getattr(args, name) is not None:
            out[name] = getattr(args, name)
    return out


def _error(message: str) -> int:
    return error(PROG, message)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        run = load_rlhf_run(args.config, cli_overrides(args))
        run.lora.check_flags(args.lora_alpha is not None, args.lora_targets is not None)
        validate_rlhf_run(run, world_size)
    except (ValueError, FileNotFoundError, yaml.YAMLError) as e:
        return _error(str(e))
    return train_ppo(run)


# ---- data --------------------------------------------------------------------------------------
def read_prompts(path: str) -> list[dict]:
    """The records of a JSONL file (other fields are kept for the reward function), each one of:

        {"prompt": "question", ["system": "system message"], ...}      one user turn
        {"prompt": [{"role": ..., "content": ...}, ...], ...}          a conversation (also as "messages")

    A conversation (roles system, user, assistant, observation) must end with a user or observation turn:
    the actor answers it as the assistant. A bad line raises naming file:line."""
    prompts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
            problem = _prompt_problem(record)
            if problem:
                raise ValueError(f"{path}:{n}: {problem}")
            prompts.append(record)
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


_PROMPT_FORMS = ('expected {"prompt": non-empty string} or a conversation {"prompt" (or "messages"): [{"role", '
                 '"content"}, ...]}')


def _conversation(record: dict) -> Optional[list]:
    """The record's message list, or None when its prompt is a string."""
    messages = record.get("messages", record.get("prompt"))
    return messages if isinstance(messages, list) else None


def _prompt_problem(record) -> Optional[str]:
    if not isinstance(record, dict):
        return _PROMPT_FORMS
    if "prompt" in record and "messages" in record:
        return 'give "prompt" or "messages", not both'
    messages = _conversation(record)
    if messages is None:
        if not isinstance(record.get("prompt"), str) or not record["prompt"]:
            return _PROMPT_FORMS
        if not isinstance(record.get("system", ""), (str, type(None))):
            return f'"system" must be a string, got {type(record["system"]).__name__}'
        return None
    if record.get("system") is not None:
        return 'a conversation carries its system message as its first turn ({"role": "system", ...}), not "system"'
    if not messages or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
        return _PROMPT_FORMS
    if not all(isinstance(m.get("metadata", ""), str) for m in messages):
        return '"metadata" of a message must be a string (ChatGLM3 writes it on the role line, e.g. a tool name)'
    if not messages[-1]["content"]:
        return "the last turn's content is empty: there is nothing to answer"
    from engine.data.tokenizer import ROLES  # the chat template's roles
    roles = [m.get("role") for m in messages]
    unknown = [r for r in roles if r not in ROLES]
    if unknown:
        return f"unknown role {unknown[0]!r} ({', '.join(ROLES[:-1])} or {ROLES[-1]})"
    if roles[-1] not in ("user", "observation"):
        return f"the conversation ends with a {roles[-1]} turn; it must end with the user (or observation) turn to answer"
    return None


def prompt_ids(record: dict, tokenizer) -> list[int]:
    """The generation prompt of a ``read_prompts`` record: the chat template up to ``<|assistant|>``."""
    messages = _conversation(record)
    if messages is None:
        return tokenizer.encode_prompt(record["prompt"], system=record.get("system") or None)  # "" or null: none
    return tokenizer.encode_chat(messages, add_generation_prompt=True)[0]


def prompt_text(record: dict) -> str:
    """What a reward function receives as the prompt: the question, or a conversation's last user turn (the
    whole conversation is in the record)."""
    messages = _conversation(record)
    if messages is None:
        return record["prompt"]
    users = [m["content"] for m in messages if m["role"] == "user"]
    return users[-1] if users else messages[-1]["content"]


def _ptx_batches(run: RLHFRun, tokenizer, seq_length: int, rank: int, procs):
    from engine.data.builtin import builtin_dataset
    from engine.data.datasets import SFTDataset
    from engine.data.indexed_dataset import IndexedDataset
    from engine.train.batches import DatasetBatches
    if run.data.ptx_path:
        indexed = IndexedDataset(run.data.ptx_path, tokenizer)
    else:
        prefix = procs.rank0_first(rank, lambda: builtin_dataset("chat", tokenizer, run.data.tokenizer_cache))
        indexed = IndexedDataset(prefix, tokenizer)
    return DatasetBatches(SFTDataset(indexed, seq_length), run.ppo.mini_batch_size, run.ppo.seed,
                          ("input_ids", "labels", "attention_mask"))


def split_eval(records: list, data: RLHFData, seed: int, fits: Optional[Sequence[bool]] = None
               ) -> tuple[list, list]:
    """(training, held-out) prompts (records, or anything listed per prompt): ``data.eval_fraction`` of ``records``
    held out (at least one, chosen by a seeded permutation among the prompts that ``fits`` max_prompt_length; both
    lists keep the file's order); else none (``data.eval_prompts``, a file of its own, is the caller's to read)."""
    if not data.eval_fraction:
        return records, []
    candidates = [i for i in range(len(records)) if fits is None or fits[i]]
    k = max(1, round(data.eval_fraction * len(candidates)))
    if k >= len(candidates):
        raise ValueError(f"data.eval_fraction={data.eval_fraction} of the {len(candidates)} prompts that fit "
                         "max_prompt_length leaves none to train on")
    order = np.random.default_rng([seed, 11]).permutation(len(candidates))[:k]
    held = {candidates[j] for j in order.tolist()}
    return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])


def reward_source(run: RLHFRun) -> str:
    """What scores the responses, as saved with the reference baselines: "reward model DIR + function SPEC"."""
    parts = [f"reward model {run.checkpoint.reward_from}" if run.checkpoint.reward_from else None,
             f"function {run.reward.function}" if run.reward.function else None,
             f"service {run.reward.url}" if run.reward.url else None]
    return " + ".join(p for p in parts if p)


def write_samples(path: Path, step: int, rollout, tokenizer, n: int) -> None:
    """Append the first ``n`` rows of ``rollout`` (decoded prompt and response, score) to ``path`` (JSONL)."""
    P = rollout.sequences.shape[1] - rollout.responses.shape[1]
    with open(path, "a", encoding="utf-8") as f:
        for i in range(min(n, rollout.sequences.shape[0])):
            prompt = rollout.sequences[i, :P][rollout.attention_mask[i, :P].bool()].tolist()
            response = rollout.responses[i][rollout.response_mask[i].bool()].tolist()
            record = {"step": step, "row": i, "prompt": tokenizer.decode(prompt),
                      "response": tokenizer.decode([t for t in response if t < tokenizer.vocab_size]),
                      "response_tokens": len(response), "score": float(rollout.scores[i])}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def print_eval(stats: dict) -> None:
    print(f"eval {stats['step']:4d}  reward {stats['eval_reward']:+.3f}"
          f"  reference {stats['eval_reference_reward']:+.3f}"
          f"  win rate {stats['eval_win_rate']:.2f}  len {stats['eval_response_length']:.1f}"
          f"  [{stats['eval_s']:.1f}s]", flush=True)


# ---- main ----------------------------------------------------------------------------------------
def _load(model_cls, path: str, run: RLHFRun, layout, device, fingerprint: str, allow_missing=()):
    from engine.parallel.pipeline import build_model_chunks
    from engine.train.checkpoint import load_model_weights
    chunks = build_model_chunks(run.model, layout, model_cls=model_cls, seed=run.ppo.seed,
                                sequence_parallel=run.sequence_parallel)
    load_model_weights(path, chunks, layout, run.model, tokenizer_fingerprint=fingerprint, allow_missing=allow_missing)
    return [chunk.to(device) for chunk in chunks]


def train_ppo(run: RLHFRun) -> int:
    from engine.model.glm import GLMForCausalLM, GLMForScalarHead
    from engine.parallel import ParallelDims, ParallelLayout
    from engine.rlhf.ppo import PPOLoop
    from engine.train.checkpoint import CheckpointError
    from engine.train.metrics import MetricsWriter

    with Processes() as procs:
        device = procs.device
        dims = ParallelDims(tp=run.tp, pp=run.pp, vpp=run.vpp, dp=None, cp=run.cp)
        layout = ParallelLayout.build(dims) if procs.distributed else ParallelLayout.single()
        rank = layout.rank
        torch.manual_seed(run.ppo.seed)
        ck, c = run.checkpoint, run.ppo
        try:
            tokenizer = procs.tokenizer(rank, run.data.tokenizer, run.data.tokenizer_cache, run.model.vocab_size)
            if run.data.prompts:
                records = read_prompts(run.data.prompts)
            else:
                from engine.data.builtin import builtin_prompts
                records = [{"prompt": t} for t in builtin_prompts()]
            items = [(r, prompt_ids(r, tokenizer)) for r in records]  # each prompt encoded once
            items, held = split_eval(items, run.data, c.seed, [len(ids) <= c.max_prompt_length for _, ids in items])
            if run.data.eval_prompts:
                held = [(r, prompt_ids(r, tokenizer)) for r in read_prompts(run.data.eval_prompts)]
            records, prompts = [r for r, _ in items], [ids for _, ids in items]
            eval_records, eval_prompts = [r for r, _ in held], [ids for _, ids in held]
            texts, eval_texts = [prompt_text(r) for r in records], [prompt_text(r) for r in eval_records]
            reward_fn = None
            if run.reward.function:  # numbering: the training prompts, then the held-out ones (PPOLoop)
                from engine.rlhf.rewards import FunctionReward, load_reward_fn
                reward_fn = FunctionReward(load_reward_fn(run.reward.function), tokenizer.decode, texts + eval_texts,
                                           records + eval_records, name=run.reward.function,
                                           vocab_size=tokenizer.vocab_size, workers=run.reward.workers)
            elif run.reward.url:
                from engine.rlhf.rewards import RemoteReward
                reward_fn = RemoteReward(run.reward.url, tokenizer.decode, texts + eval_texts, records + eval_records,
                                         vocab_size=tokenizer.vocab_size, timeout=run.reward.timeout)
            seq_length = c.max_prompt_length + c.max_new_tokens
            ptx = _ptx_batches(run, tokenizer, seq_length, rank, procs) if c.ptx_coef > 0 else None
            fingerprint = tokenizer.fingerprint()  # checkpoints trained on another tokenizer are refused
            actor = _load(GLMForCausalLM, ck.actor_from, run, layout, device, fingerprint)
            if run.lora.enabled:  # the reference is the actor with its adapters off
                add_lora(actor, run.lora, layout, seed=c.seed)
                reference = None
            else:
                reference = _load(GLMForCausalLM, ck.actor_from, run, layout, device, fingerprint)
            reward = None
            if ck.reward_from:
                reward = _load(GLMForScalarHead, ck.reward_from, run, layout, device, fingerprint)
            critic = None
            if c.advantage_estimator == "gae":
                critic = _load(GLMForScalarHead, ck.critic_from or ck.reward_from or ck.actor_from, run, layout, device,
                               fingerprint, allow_missing=("value_head.",))
                if run.critic_lora:
                    add_lora(critic, run.lora, layout, seed=c.seed + 1, keep_trainable=("value_head.",))
            loop = PPOLoop(c, run.model, layout, actor, critic, reference, reward, prompts, tokenizer.stop_ids,
                           tokenizer.pad_id, run.actor_optim, run.critic_optim, run.actor_lr, run.critic_lr,
                           ptx_batches=ptx, reward_fn=reward_fn,
                           eval_prompts=eval_prompts,
                           reward_source=reward_source(run))
        except (ValueError, CheckpointError, FileNotFoundError) as e:
            return _error(str(e))
        try:
            if ck.load:
                from engine.train.checkpoint import latest_step
                if latest_step(Path(ck.load) / "actor") is not None:
                    loop.load(ck.load, tokenizer_fingerprint=fingerprint)
                    if rank == 0:
                        print(f"{PROG}: resumed from {ck.load} at iteration {loop.iterations_done}", flush=True)
                elif ck.load != ck.save:  # never a silent fresh start from a mistyped --load
                    return _error(f"--load {ck.load}: no PPO checkpoint found there (expected {ck.load}/actor)")
        except CheckpointError as e:
            return _error(str(e))
        writer = None
        if rank == 0:
            Path(run.log_dir).mkdir(parents=True, exist_ok=True)
            (Path(run.log_dir) / "config.json").write_text(json.dumps(run.to_dict(), indent=2))
            writer = MetricsWriter(run.log_dir)
            print(f"{PROG}: PPO ({c.advantage_estimator}) on {run.model.name} ({run.model.num_parameters() / 1e6:.1f}M "
                  f"params per model, {1 + (not loop.base_reference) + loop.uses_critic + bool(loop.reward)} models"
                  + (f", LoRA rank {run.lora.rank} on the actor{' and critic' if run.critic_lora else ''} (reference: "
                     "the actor with its adapters off)" if run.lora.enabled else "")
                  + (f", reward function {run.reward.function}" if run.reward.function else "")
                  + (f", reward service {run.reward.url}" if run.reward.url else "")
                  + f"), tp={layout.tp_size} "
                  f"pp={layout.pp_size} vpp={layout.vpp_size} cp={layout.cp_size} dp={layout.dp_size}"
                  f"{' sequence-parallel' if loop.sequence_parallel else ''}, "  # as the models were built
                  f"{len(loop.prompts)} prompts"
                  + (f" + {len(loop.eval_prompts)} held out" if loop.eval_prompts else "")
                  + (f" ({loop.dropped_prompts} longer than max_prompt_length left out)" if loop.dropped_prompts else "")
                  + f", device {device}", flush=True)
        start = loop.iterations_done
        try:
            while loop.iterations_done < c.iterations:
                stats = loop.iteration()
                if writer is not None:
                    writer.write_record(stats)
                    vs_ref = f"  vs ref {stats['reward_vs_reference']:+.3f}" if "reward_vs_reference" in stats else ""
                    print(f"iter {stats['step']:4d}  reward {stats['reward']:+.3f}{vs_ref}"
                          f"  kl {stats['kl']:.3f}  len {stats['response_length']:.1f}"
                          + ((f"  policy {stats['policy_loss']:+.4f}" if "policy_loss" in stats
                              else "  (critic warm-up)")
                             + (f"  value {stats['value_loss']:.4f}" if loop.uses_critic else "")
                             + (f"  clip {stats['clipfrac']:.2f}" if "clipfrac" in stats else "")
                             if stats["ppo_steps"] else "  (no update: nothing kept)")
                          + f"  [{stats['seconds']:.1f}s]", flush=True)
                    if "eval_reward" in stats:
                        print_eval(stats)
                    if run.log_samples:
                        write_samples(Path(run.log_dir) / "samples.jsonl", stats["step"], loop.last_rollout, tokenizer,
                                      run.log_samples)
                if ck.save and ck.save_interval and loop.iterations_done % ck.save_interval == 0:
                    loop.save(ck.save, ck.keep_last, fingerprint, ck.async_save)
            if ck.save and (not ck.save_interval or loop.iterations_done % ck.save_interval):
                loop.save(ck.save, ck.keep_last, fingerprint, ck.async_save)
            if c.eval_interval and loop.iterations_done > start:  # the final policy, in a record of its own
                stats = {"step": loop.iterations_done, **loop.evaluate()}
                if writer is not None:
                    writer.write_record(stats)
                    print_eval(stats)
        except BaseException:
            close_after_error(loop.close_savers, PROG)  # the PPO error is the one to report
            raise
        loop.close_savers()  # the saves in flight complete (or raise) before the process group goes
        if writer is not None:
            writer.close()
        procs.done()
        return 0


if __name__ == "__main__":
    exit_process(main())
