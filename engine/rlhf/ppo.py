"""PPO with the ChatGLM-RLHF recipe (arXiv 2404.00934): actor, critic, reference and reward models
co-located on the same ranks of one TP x PP x DP (x CP) layout.

One iteration (``PPOLoop.iteration``):

    rollout   each DP replica (its TP group) samples ``samples_per_prompt`` responses for its slice of
              ``rollout_prompts`` prompts with the actor's KV cache (TP ranks gather the vocab-sharded
              logits and draw the same token), keeping the log-prob it gave each token (compared with the
              scoring forward's in the metrics; ``rollout_is_cap`` weights the policy loss by their ratio)
    score     on the same slice, no grad, in micro-batches of ``score_micro_batch_size`` rows (under
              pp > 1 with the forward-only pipeline schedule, results broadcast from the last stage):
              actor log-probs (the behaviour policy, recomputed by a full forward so they match the
              training forward's numerics), reference log-probs, critic values, reward-model scores and/or
              a rule-based reward function's (``engine.rlhf.rewards``; their sum when both); the reference
              baseline r(x, y_ref) of each prompt (y_ref: the reference model's greedy response),
              computed once per prompt and cached
    gather    the scored slices are all-gathered over DP (under cp > 1 the rows were first gathered over
              the cp ranks; "rollout" traffic): every rank holds the
              global rollout, so filtering, advantages and whitening need no further reduction
    advantage score - baseline (``reference_baseline``); prompts whose k responses score alike are
              dropped (``min_reward_spread``); per-token reward -kl_coef * KL(actor || reference) with
              the score at the last token; GAE; advantages whitened over the rollout
    update    ``ppo_epochs`` passes over seeded mini-batches: the actor's Trainer steps the clipped
              surrogate (plus ``ptx_coef`` times the language-model loss on SFT data: PPO-ptx), the
              critic's Trainer the clipped value loss (``engine.rlhf.objectives``)

``advantage_estimator="grpo"`` or ``"rloo"`` replaces the critic and GAE by a group baseline: each
response's advantage is its score relative to the other responses to its prompt
(``core.group_advantages``), on every token of the response, less its KL penalty (``kl_coef`` times its
summed KL to the reference: folded into the score for RLOO, centred over the group after GRPO's
normalisation). No critic is built, scored, trained or saved, and the reference baseline is skipped (a
per-prompt constant cancels in the group). ``"reinforce++"`` (Hu et al. 2025, OpenRLHF) keeps PPO's
per-token rewards (KL penalty on every token, the score at the last) but no critic: each token's advantage
is the (discounted) sum of the rewards from it to the end, whitened over the rollout; the reference
baseline applies as under gae. ``"reinforce++-baseline"`` first subtracts the mean score of the prompt's
responses (so the reference baseline is skipped). ``kl_loss_coef`` adds GRPO's KL term to the actor's loss
instead (any estimator).

``save(DIR)`` / ``load(DIR)`` checkpoint the actor and critic (weights and optimizer state, any layout
on load), the iteration and the reference-baseline cache; the rollout's prompts and sampling seeds are
functions of the prompt-draw counter (saved), so a resumed run continues exactly (bitwise on CPU at the same
layout). A run resumed with another reward or another prompt list recomputes the cached baselines, with a
warning (another reward also restarts the score statistics).

``generation_tp=tp_g`` (a divisor of the training tp), pp > 1, cp > 1 or sequence-parallel models reshard
the actor for the rollout onto
the generation layout (``ParallelLayout.for_generation``: tp_g-way TP, no pipeline, world / tp_g
replicas): each rank gathers the shards of its tp / tp_g neighbouring training TP ranks of every stage
(``sharding.reshard_for_generation``, "reshard" traffic: the analytic minimum M (1/tp_g - 1/(tp pp));
tp_g = 1: the whole actor on every rank, no per-token communication), each generation replica samples
its own slice of the rollout, and the copy is dropped before scoring. When the training chunks cannot decode
(pp > 1, cp > 1, sequence parallel) the reference model's greedy baseline responses are sampled the same
way, on a resharded copy of the reference.

``offload=True`` keeps every model and optimizer state that the current phase does not use in host
memory (``engine.rlhf.offload``): sampling holds only the actor's generation copy (the training copy
leaves once resharded, before the KV cache is allocated; without resharding, the actor's weights);
scoring one model at a time; each update one model with its optimizer state (the actor's steps run
before the critic's). At tp_g = tp when resharding (pp > 1, cp > 1, sequence parallel) the rank's own
part of the generation copy is the training copy itself (shared, not duplicated), so it stays while
sampling. Every phase records the
device bytes of what it holds (``resident_bytes_<phase>``, measured from the tensors' storages) and,
on CUDA, the allocator's peak (``peak_memory_<phase>``).

``pack_sequences=True`` scores and trains on packed rows (``batches.pack_padded_rows``): the sequences,
each its prompt and response without padding, go first-fit decreasing into rows of P + T tokens with
segment ids (no attention across sequences) and per-sequence positions; scoring reads each value back
at its token's place, and the update's Trainer takes the packed mini-batch's row count
(``TrainConfig.variable_rows``).

Context parallelism (a layout with cp > 1, for long responses): scoring and the updates split every
sequence over the cp ranks of a replica (2 of 2 cp chunks each, ``engine.parallel.context_parallel``;
``forward_rows`` gathers the per-token outputs back into whole rows, the Trainer sums each rank's chunks'
loss and averages gradients over dp x cp). Sampling decodes whole sequences with a KV cache, so it runs on
a cp = 1 generation copy of the actor (``reshard`` is always on; at tp_g = tp and pp = 1 no bytes move),
and the cp ranks of a replica, being replicas of its weights, each sample their own share of its rows and
all-gather them (``_over_cp``), as a reward function's scoring does: sampling has dp x cp x tp / tp_g
replicas (x pp).

The pure math lives in ``engine.rlhf.core``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch

import kernels
from engine.config import GLMConfig
from engine.model.generation import SamplingParams, generate
from engine.model.glm import default_positions, head_positions, last_token_index
from engine.model.lora import attach_adapters, has_lora, lora_disabled, lora_record
from engine.parallel import ParallelDims, ParallelLayout, comm
from engine.parallel.context_parallel import ContextParallel
from engine.parallel.pipeline import activation_shape, chunk_forward
from engine.parallel.schedules import run_schedule
from engine.rlhf.core import (GROUP_ESTIMATORS, IS_LEVELS, IS_MODES, LOSS_AGG_MODES, POLICY_LOSSES, RunningMoments,
                              adaptive_kl_coef, gae_advantages, group_advantages, kl_estimate, loss_token_weights,
                              masked_mean, masked_whiten, overlong_penalty, reference_baseline, reward_spread_filter,
                              shape_rewards, truncated_importance_weights)
from engine.rlhf.objectives import PolicyObjective, ValueObjective
from engine.rlhf.offload import Offloader
from engine.train.batches import pack_padded_rows
from engine.train.lr import LRConfig, LRSchedule
from engine.train.metrics import peak_memory, reset_peak_memory
from engine.train.objectives import IGNORE_INDEX, LanguageModelObjective, record_vocab_parallel_loss
from engine.train.step import OptimizerConfig, TrainConfig, Trainer, build_optimizer

KL_KINDS = ("k1", "k2", "k3")
REINFORCE_ESTIMATORS = ("reinforce++", "reinforce++-baseline")
ESTIMATORS = ("gae", *GROUP_ESTIMATORS, *REINFORCE_ESTIMATORS)
PPO_LR = LRConfig(lr=1e-5, min_lr=1e-6)  # the default of actor and critic: a fine-tuning rate


@dataclass(frozen=True)
class PPOConfig:
    """Rollout shape, PPO hyper-parameters and the ChatGLM-RLHF options."""

    iterations: int = 10
    """Rollout + update rounds."""
    rollout_prompts: int = 8
    """Prompts per iteration, over all DP replicas."""
    samples_per_prompt: int = 2
    """Responses sampled per prompt (k); the reward-spread filter compares them."""
    max_prompt_length: int = 32
    """Prompts are left-padded to this many tokens (longer prompts are left out, and counted)."""
    max_new_tokens: int = 32
    """Response length limit (responses are right-padded to it)."""
    temperature: float = 1.0
    """Sampling temperature; the PPO log-probs are those of ``softmax(logits / temperature)``."""
    top_p: float = 1.0
    top_k: int = 0
    """Nucleus / top-k truncation of the sampling. The PPO log-probs (old and new alike) stay those of the
    untruncated tempered softmax, as in OpenRLHF: an approximation of the sampling policy when either is
    set; the ratio still starts at 1."""
    generation_tp: Optional[int] = None
    """TP degree tp_g the actor generates with, a divisor of the training tp: None (or the training tp)
    samples on the training layout when pp = cp = 1 without sequence parallel (otherwise on a copy, the
    stages' layers gathered under pp > 1, at tp_g = tp); a smaller tp_g reshards the actor for the rollout
    (an all-gather over tp / tp_g neighbouring training TP ranks, freed after sampling) so world / tp_g replicas each sample
    a slice of the rollout with tp_g-way per-token communication (none at tp_g = 1). The trade: (tp/tp_g
    - 1) x the local actor bytes received per iteration and a tp/tp_g times larger actor copy during
    generation, for fewer per-token collectives and more sampling replicas."""
    ppo_epochs: int = 1
    """Passes over each rollout."""
    mini_batch_size: int = 8
    """Sequences per optimizer step (global); divides rollout_prompts * samples_per_prompt."""
    micro_batch_size: int = 2
    """Sequences per forward/backward on one rank."""
    score_micro_batch_size: int = 0
    """Sequences per scoring forward (no grad: log-probs, values, rewards) on one rank; 0: micro_batch_size."""
    generation_batch_size: int = 0
    """Rows per ``generate`` call on one sampling replica (its slice of the rollout or of an evaluation in
    chunks of this many), so the KV cache holds at most this many rows; 0: the whole slice at once. The
    samples depend on it (each chunk draws its own noise)."""
    pack_sequences: bool = False
    """Pack the prompt + response sequences into as few rows as hold them (``batches.pack_padded_rows``:
    first-fit decreasing, no attention across sequences, positions per sequence) instead of one
    left/right-padded row each, for the scoring forwards (the whole rollout) and each update mini-batch: the same
    log-probs, values, scores, losses and gradients for less padding compute. micro_batch_size and
    score_micro_batch_size then count packed rows; a step takes as many as its mini-batch needs."""
    policy_loss: str = "ppo"
    """The actor's surrogate (``core.ppo_policy_loss``): "ppo" (each token's ratio clipped), "gspo" (GSPO: each
    response's ratio, the geometric mean of its tokens', clipped per response; the paper uses clip ranges of
    3e-4 / 4e-4 and seq-mean-token-mean) or "cispo" (MiniMax-M1's CISPO: the importance weight is clipped and
    detached, so every token keeps a gradient; no dual_clip)."""
    clip_eps: float = 0.2
    """The policy ratio is clipped to [1 - clip_eps, 1 + clip_eps_high] (cispo: its importance weight)."""
    clip_eps_high: Optional[float] = None
    """Upper clip range (None: clip_eps). Larger than clip_eps: DAPO's clip-higher (e.g. 0.28 with 0.2), so
    unlikely tokens with a positive advantage can gain more per step."""
    dual_clip: float = 0.0
    """0: off; c > 1 (usually 3): dual-clip PPO, the loss of a negative-advantage token capped at -c A, so a
    ratio far above 1 cannot make an unbounded step (``core.ppo_policy_loss``)."""
    rollout_is_cap: float = 0.0
    """0: off. >= 1 (e.g. 2): truncated importance sampling, each token's policy loss weighted by
    min(pi_train / pi_sampler, cap), the training forward's probability of the token over the sampling copy's
    (``core.truncated_importance_weights``), so the update follows the trained policy even where the sampling
    copy (another layout, a KV cache) rounds differently. ``rollout_logprob_diff_max`` and ``rollout_kl`` in
    the metrics measure that difference whether or not this corrects for it. Both sides are the tempered
    distribution before top-k / top-p filtering (as ``generate`` reports it): neither the metrics nor the
    weights account for that truncation, only for numeric and layout differences."""
    rollout_is_level: str = "token"
    """Which ratio the rollout_is_cap weights take (``core.IS_LEVELS``): "token" (each token's own),
    "sequence" (the response's probability ratio, on each of its tokens) or "geometric" (the geometric mean of
    its token ratios: the per-response ratio GSPO clips)."""
    rollout_is_mode: str = "truncate"
    """What rollout_is_cap does to a ratio (``core.IS_MODES``): "truncate" caps it at the cap; "mask" (masked
    importance sampling) keeps ratios in [1 / cap, cap] and drops the tokens (or, at the sequence and
    geometric levels, responses) outside, which then train nothing. ``rollout_is_truncated`` in the metrics
    counts the tokens it acted on."""
    loss_agg_mode: str = "token-mean"
    """How the policy loss (and the kl_loss term) of a mini-batch averages over tokens and responses
    (``core.loss_token_weights``): "token-mean" (every token alike), "seq-mean-token-mean" (every response
    alike: the original GRPO), "seq-mean-token-sum", "seq-mean-token-sum-norm" (Dr. GRPO: summed over
    tokens, divided by max_new_tokens and the responses; verl's mode of that name does not divide by the
    responses). The value loss stays a token mean."""
    entropy_coef: float = 0.0
    """Entropy bonus in the actor's loss: minus this weight times the entropy of the sampling distribution
    at each trained token, aggregated like the policy loss (0: off)."""
    value_clip_eps: float = 0.2
    kl_coef: float = 0.05
    """Weight of the per-token KL(actor || reference) penalty in the reward (the initial one when
    ``kl_target`` is set)."""
    kl_target: float = 0.0
    """0: a fixed ``kl_coef``. > 0: after each rollout the coefficient follows the adaptive controller
    (``core.adaptive_kl_coef``) toward this KL per response (the logged ``kl``)."""
    kl_horizon: int = 10000
    """Samples over which the adaptive controller closes the gap (larger: slower): with R rollout rows
    an iteration moves the coefficient by at most a factor 1 +- 0.2 R / kl_horizon (Ziegler et al.
    used 10000 with large rollouts; a small demo rollout needs a smaller horizon to adapt visibly)."""
    kl_kind: str = "k1"
    """KL estimator of the penalty: k1, k2 or k3 (``core.kl_estimate``)."""
    kl_loss_coef: float = 0.0
    """> 0: a KL term in the actor's loss, this weight times the ``kl_loss_kind`` estimate of
    KL(actor || reference) summed over response tokens like the policy loss (``core.kl_penalty``; GRPO's
    form, usually with ``kl_coef = 0``); logged as ``ref_kl`` per token. As a loss on the rollout's own
    samples (no importance weight) its gradient is not exactly that of KL(actor || reference): GRPO's
    published choice."""
    kl_loss_kind: str = "k3"
    """k3 (GRPO) or k2; not k1, whose gradient averages to zero over on-policy samples."""
    gamma: float = 1.0
    lam: float = 0.95
    advantage_estimator: str = "gae"
    """"gae": a critic and generalized advantage estimation (PPO, ChatGLM-RLHF). "grpo" / "rloo": no
    critic; each response's advantage relative to the other responses to its prompt
    (``core.group_advantages``; needs samples_per_prompt >= 2). "reinforce++": no critic; the returns of the
    per-token rewards (gamma), whitened over the rollout. "reinforce++-baseline": the same after subtracting
    the mean score of each prompt's responses (needs samples_per_prompt >= 2). Module doc."""
    grpo_normalize_std: bool = True
    """GRPO divides each group's centred scores by their std; False: centred only (Dr. GRPO)."""
    reference_baseline: bool = True
    """Score relative to the reference model's greedy response to the same prompt (ChatGLM-RLHF; gae and
    reinforce++ only: under a group baseline a per-prompt constant cancels, so the reference answers are
    skipped and ``normalize_scores`` / ``score_clip`` act on the raw scores)."""
    min_reward_spread: float = 0.0
    """Drop prompts whose k responses' scores span less than this (0: keep all; needs k >= 2)."""
    sampling_rounds: int = 1
    """Dynamic sampling (DAPO): up to this many rollouts of ``rollout_prompts`` new prompts per iteration,
    until ``rollout_prompts`` prompts pass ``min_reward_spread``; the first that pass train (the rest of the
    places filled by filtered prompts, which train nothing). 1: one rollout (filtered prompts only shrink
    the update)."""
    whiten_advantages: bool = True
    """Whiten the GAE / REINFORCE++ advantages over the rollout (group advantages are already relative)."""
    normalize_scores: bool = False
    """Divide the (baseline-adjusted) scores by their running std over all rollouts so far
    (``core.RunningMoments``), so the KL coefficient keeps its meaning whatever the reward model's
    scale."""
    score_clip: float = 0.0
    """Clip the (normalised) scores to [-score_clip, score_clip] (0: off)."""
    overlong_buffer: int = 0
    """DAPO's soft overlong punishment (``core.overlong_penalty``): responses within the last this many tokens
    of ``max_new_tokens`` lose up to ``overlong_penalty`` from their (normalised, clipped) score, linearly;
    0: off."""
    overlong_penalty: float = 1.0
    """The most the overlong punishment takes (at ``max_new_tokens``)."""
    mask_truncated: bool = False
    """Leave responses cut off at ``max_new_tokens`` (no stop token) out of the loss (DAPO's overlong
    filtering): their score says nothing about how the answer would have ended. They still count in their
    group's baseline."""
    ptx_coef: float = 0.0
    """PPO-ptx: weight of the language-model loss on SFT data in the actor's step (0: off)."""
    critic_warmup: int = 0
    """The first this many iterations train the critic alone (gae): a fresh value head learns the scale of the
    returns before its advantages move the actor (verl's critic_warmup). The actor's LR schedule spans the
    iterations after it."""
    eval_interval: int = 0
    """Evaluate on the held-out prompts (``PPOLoop(eval_prompts=...)``) every this many iterations, at the start
    of the iteration (its record then describes the policy after that many updates); 0: never."""
    eval_samples: int = 1
    """Answers per held-out prompt: 1 greedy; k > 1 sampled at ``eval_temperature`` (``PPOLoop.evaluate``: the
    mean and the best of k)."""
    eval_temperature: float = 1.0
    offload: bool = False
    """Keep the models and optimizer states a phase does not use in host memory (module docstring): the
    device holds one model (or the generation copy and its KV cache) at a time, for two host copies
    of each moved tensor per iteration."""
    seed: int = 1234

    @property
    def uses_reference_baseline(self) -> bool:
        """Whether scores are taken relative to the reference's answer: only where no group baseline cancels it."""
        return self.reference_baseline and self.advantage_estimator in ("gae", "reinforce++")

    @property
    def rollout_rows(self) -> int:
        return self.rollout_prompts * self.samples_per_prompt

    def validate(self, dp: int, tp: int = 1, pp: int = 1, vpp: int = 1, cp: int = 1,
                 sequence_parallel: bool = False) -> "PPOConfig":
        """ValueError naming every problem, for a training layout of ``dp`` x ``tp`` x ``pp`` x ``cp`` ranks
        with ``vpp`` virtual stages each (``sequence_parallel``: the models split the sequence over TP)."""
        problems = []
        ints = ("iterations", "rollout_prompts", "samples_per_prompt", "max_prompt_length", "max_new_tokens",
                "ppo_epochs", "mini_batch_size", "micro_batch_size")
        for name in ints:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                problems.append(f"{name}={value!r} must be a positive integer")
        if not isinstance(self.pack_sequences, bool):
            problems.append(f"pack_sequences={self.pack_sequences!r} must be true or false")
        if not (isinstance(self.generation_batch_size, int) and self.generation_batch_size >= 0):
            problems.append(f"generation_batch_size={self.generation_batch_size!r} must be a positive integer or 0 "
                            "(the whole slice at once)")
        if not (isinstance(self.score_micro_batch_size, int) and self.score_micro_batch_size >= 0):
            problems.append(f"score_micro_batch_size={self.score_micro_batch_size!r} must be a positive integer or 0 "
                            "(micro_batch_size)")
        if self.generation_tp is not None and not (isinstance(self.generation_tp, int) and self.generation_tp >= 1):
            problems.append(f"generation_tp={self.generation_tp!r} must be None or a positive divisor of the "
                            "training tp")
        elif self.generation_tp is not None and tp % self.generation_tp:
            problems.append(f"generation_tp={self.generation_tp} must divide the training tp={tp} (the generation "
                            "layout regroups the training TP shards)")
        if not problems:
            # each DP replica scores an equal slice; the sampling replicas within it (its cp ranks, and the
            # generation replicas of a resharded actor) take equal slices of it padded by repeating the last row
            if self.rollout_rows % dp:
                problems.append(f"rollout_prompts x samples_per_prompt = {self.rollout_rows} must be divisible by "
                                f"dp={dp}: each DP replica samples and scores an equal slice")
            if self.rollout_rows % self.mini_batch_size:
                problems.append(f"mini_batch_size={self.mini_batch_size} must divide rollout_prompts x "
                                f"samples_per_prompt = {self.rollout_rows}")
            if self.mini_batch_size % (self.micro_batch_size * dp):
                problems.append(f"mini_batch_size={self.mini_batch_size} must be divisible by micro_batch_size="
                                f"{self.micro_batch_size} x dp={dp}")
            elif vpp > 1 and (self.mini_batch_size // (self.micro_batch_size * dp)) % pp:
                m = self.mini_batch_size // (self.micro_batch_size * dp)
                problems.append(f"mini_batch_size={self.mini_batch_size} gives {m} micro-batches per DP rank; the "
                                f"interleaved schedule (vpp={vpp}) needs a multiple of pp={pp}: mini_batch_size = "
                                "k x pp x micro_batch_size x dp")
            if cp > 1 and (self.max_prompt_length + self.max_new_tokens) % (2 * cp):
                problems.append(f"context parallelism (cp={cp}) splits every sequence into 2 x cp = {2 * cp} equal "
                                f"chunks: max_prompt_length + max_new_tokens = "
                                f"{self.max_prompt_length + self.max_new_tokens} must be divisible by {2 * cp}")
            S = self.max_prompt_length + self.max_new_tokens
            if sequence_parallel and tp > 1 and (S // cp) % tp:
                problems.append(f"sequence parallel splits each rank's {S // cp} tokens (max_prompt_length + "
                                f"max_new_tokens{f' / cp={cp}' if cp > 1 else ''}) over tp={tp}: they must be "
                                "divisible by tp")
        if self.advantage_estimator not in ESTIMATORS:
            problems.append(f"advantage_estimator={self.advantage_estimator!r} must be one of {ESTIMATORS}")
        elif self.advantage_estimator not in ("gae", "reinforce++") and self.samples_per_prompt < 2:
            problems.append(f"advantage_estimator={self.advantage_estimator!r} compares a prompt's responses: it "
                            f"needs samples_per_prompt >= 2, got {self.samples_per_prompt}")
        if self.kl_kind not in KL_KINDS:
            problems.append(f"kl_kind={self.kl_kind!r} must be one of {KL_KINDS}")
        if self.kl_loss_kind not in ("k2", "k3"):
            problems.append(f"kl_loss_kind={self.kl_loss_kind!r} must be k2 or k3 (k1's gradient averages to zero "
                            "over on-policy samples: as a loss it does nothing in expectation)")
        for name in ("kl_coef", "kl_target", "kl_loss_coef", "ptx_coef", "min_reward_spread", "score_clip",
                     "entropy_coef"):
            if not 0 <= getattr(self, name) < math.inf:
                problems.append(f"{name}={getattr(self, name)} must be >= 0 and finite")
        if not (isinstance(self.overlong_buffer, int) and 0 <= self.overlong_buffer <= self.max_new_tokens):
            problems.append(f"overlong_buffer={self.overlong_buffer!r} must be an integer in [0, max_new_tokens="
                            f"{self.max_new_tokens}] (0: off)")
        if not 0 <= self.overlong_penalty < math.inf:
            problems.append(f"overlong_penalty={self.overlong_penalty} must be >= 0 and finite")
        if not isinstance(self.grpo_normalize_std, bool):
            problems.append(f"grpo_normalize_std={self.grpo_normalize_std!r} must be true or false")
        if not isinstance(self.mask_truncated, bool):
            problems.append(f"mask_truncated={self.mask_truncated!r} must be true or false")
        if not (isinstance(self.critic_warmup, int) and 0 <= self.critic_warmup < max(self.iterations, 1)):
            problems.append(f"critic_warmup={self.critic_warmup!r} must be an integer in [0, iterations="
                            f"{self.iterations}) (iterations that train the critic alone)")
        elif self.critic_warmup and self.advantage_estimator != "gae":
            problems.append(f"critic_warmup={self.critic_warmup} warms up the critic: advantage_estimator="
                            f"{self.advantage_estimator!r} has none")
        if not (isinstance(self.eval_samples, int) and self.eval_samples >= 1 and 0 < self.eval_temperature < math.inf):
            problems.append(f"eval_samples={self.eval_samples!r} must be a positive integer and eval_temperature="
                            f"{self.eval_temperature} > 0")
        if not (isinstance(self.eval_interval, int) and self.eval_interval >= 0):
            problems.append(f"eval_interval={self.eval_interval!r} must be a non-negative integer (0: no evaluation)")
        if not (isinstance(self.kl_horizon, int) and self.kl_horizon >= 1):
            problems.append(f"kl_horizon={self.kl_horizon!r} must be a positive integer (samples)")
        if self.kl_target > 0 and not self.kl_coef > 0:
            problems.append(f"kl_target={self.kl_target} adapts kl_coef multiplicatively: it needs kl_coef > 0, "
                            f"got {self.kl_coef}")
        if not (isinstance(self.sampling_rounds, int) and self.sampling_rounds >= 1):
            problems.append(f"sampling_rounds={self.sampling_rounds!r} must be a positive integer (1: no dynamic "
                            "sampling)")
        elif self.sampling_rounds > 1 and not self.min_reward_spread > 0:
            problems.append(f"sampling_rounds={self.sampling_rounds} resamples prompts that the reward-spread filter "
                            "drops: it needs min_reward_spread > 0")
        if self.min_reward_spread > 0 and self.samples_per_prompt < 2:
            problems.append("min_reward_spread compares a prompt's responses: it needs samples_per_prompt >= 2")
        if not (self.temperature > 0 and 0 < self.top_p <= 1 and self.top_k >= 0):
            problems.append(f"temperature={self.temperature} must be > 0, top_p={self.top_p} in (0, 1], "
                            f"top_k={self.top_k} >= 0")
        if self.clip_eps_high is not None and not 0 < self.clip_eps_high < math.inf:
            problems.append(f"clip_eps_high={self.clip_eps_high} must be > 0 and finite (or null: clip_eps)")
        if not (self.dual_clip == 0 or 1 < self.dual_clip < math.inf):
            problems.append(f"dual_clip={self.dual_clip} must be 0 (off) or > 1 (the cap -c A on negative advantages; "
                            "3 is usual)")
        if self.policy_loss not in POLICY_LOSSES:
            problems.append(f"policy_loss={self.policy_loss!r} must be one of {POLICY_LOSSES}")
        elif self.policy_loss == "cispo" and self.dual_clip:
            problems.append(f"dual_clip={self.dual_clip} caps PPO's clipped surrogate; policy_loss=cispo already "
                            "bounds each token's weight: set dual_clip 0")
        if self.rollout_is_level not in IS_LEVELS:
            problems.append(f"rollout_is_level={self.rollout_is_level!r} must be one of {IS_LEVELS}")
        if self.rollout_is_mode not in IS_MODES:
            problems.append(f"rollout_is_mode={self.rollout_is_mode!r} must be one of {IS_MODES}")
        if not (self.rollout_is_cap == 0 or 1 <= self.rollout_is_cap < math.inf):
            problems.append(f"rollout_is_cap={self.rollout_is_cap} must be 0 (off) or >= 1 and finite (the cap of "
                            "the weights pi_train / pi_sampler; 2 is usual)")
        if self.loss_agg_mode not in LOSS_AGG_MODES:
            problems.append(f"loss_agg_mode={self.loss_agg_mode!r} must be one of {LOSS_AGG_MODES}")
        if not 0 < self.clip_eps < math.inf:
            problems.append(f"clip_eps={self.clip_eps} must be > 0 and finite (the ratio's range [1 - clip_eps, "
                            "1 + clip_eps_high])")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            problems.append(f"gamma={self.gamma} and lam={self.lam} must be in [0, 1]")
        if not 0 < self.value_clip_eps < math.inf:
            problems.append(f"value_clip_eps={self.value_clip_eps} must be > 0 and finite")
        if problems:
            raise ValueError("invalid PPO configuration: " + "; ".join(problems))
        return self


def validate_generation_dims(generation_tp: int, world_size: int, model_config: GLMConfig) -> None:
    """ValueError unless the model can be split ``generation_tp`` ways (heads, KV groups, ffn, vocab),
    checked before any process group is created."""
    try:
        ParallelDims(tp=generation_tp, pp=1, dp=None).validate(world_size, model_config)
    except ValueError as e:
        raise ValueError(f"generation_tp={generation_tp}: the generation layout is invalid: {e}") from None


@dataclass
class Rollout:
    """The global rollout of one iteration (every rank holds all of it).

    R rows = rollout_prompts x samples_per_prompt, S = P + T. ``sequences``/``attention_mask`` ``[R, S]``;
    ``responses``/``response_mask``, ``logprobs``, ``ref_logprobs``, ``values`` ``[R, T]``; ``scores``,
    ``baselines`` ``[R]`` (fp32); ``prompt_index`` ``[R]`` into the prompt list. ``sampler_logprobs`` ``[R, T]``:
    the log-probs the sampling copy gave its tokens (``logprobs`` are the training layout's, recomputed; the
    two differ by the kernels' and layouts' rounding only). ``score_parts``: with both a
    reward model and a reward function, each one's ``[R]`` part of ``scores`` ("reward_model",
    "reward_function"); empty otherwise."""

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    responses: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    baselines: torch.Tensor
    prompt_index: torch.Tensor
    sampler_logprobs: torch.Tensor
    score_parts: dict = field(default_factory=dict)

    def to(self, device) -> "Rollout":
        """This rollout with its tensors on ``device`` (``prompt_index``, an index into the host prompt list,
        stays where it is); the tensors themselves where they are there already."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "score_parts"}
        fields = {k: v if k == "prompt_index" else v.to(device) for k, v in fields.items()}
        return Rollout(**fields, score_parts={k: v.to(device) for k, v in self.score_parts.items()})


def left_pad_prompts(prompts: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> left-padded ``([n, length] ids, [n, length] mask)``."""
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p) > length:
            raise ValueError(f"prompt {i} has {len(p)} tokens, more than max_prompt_length={length}")
        if len(p):
            ids[i, length - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[i, length - len(p):] = 1
    return ids, mask


def align(per_token: torch.Tensor, prompt_length: int, fill) -> torch.Tensor:
    """``[R, T]`` response-token quantities -> ``[R, P + T]`` at the positions whose output concerns them
    (token j: position P + j - 1; ``objectives`` module doc); ``fill`` elsewhere."""
    r, t = per_token.shape
    out = torch.full((r, prompt_length + t), fill, dtype=per_token.dtype, device=per_token.device)
    out[:, prompt_length - 1:prompt_length - 1 + t] = per_token
    return out


def _chunks(model) -> list[torch.nn.Module]:
    """A model or this rank's pipeline chunks -> a list of chunks."""
    return [model] if isinstance(model, torch.nn.Module) else list(model)


class PPOLoop:
    """PPO on one TP x PP x DP (x CP) layout (any vpp). ``actor``/``critic``: trainable ``GLMForCausalLM`` /
    ``GLMForScalarHead`` chunks built for ``layout`` (``pipeline.build_model_chunks``, vpp per rank; at pp = 1
    the one model may be passed as it is; ``critic=None`` with a group estimator); ``reference`` and
    ``reward``: frozen chunks of the same classes (``reward=None`` when ``reward_fn`` scores alone). An actor
    with LoRA adapters (``engine.model.lora.add_lora``) may take ``reference=None``: its reference is then
    itself with the adapters off (scoring, and the baseline answers), so no reference copy is held or
    offloaded; its generation copy carries the adapters (not merged: at tp_g = tp the copy's tensors stay
    the training ones).
    ``prompts``: token-id lists (chat prompts ending in the assistant tag). ``ptx_batches(step) ->
    {"input_ids", "labels"} [mini_batch_size, P + T]`` (SFT data; needed when ``ptx_coef > 0``).
    ``eos_ids``/``pad_id``: the tokenizer's stop and pad tokens.

    ``reward_fn(prompt_index [n], responses [n, T], response_mask [n, T]) -> [n]`` (``rewards.FunctionReward``;
    prompt_index into ``prompts``, then ``eval_prompts``: held-out prompt j is ``len(prompts) + j``): a
    rule-based score, added to the reward model's when both are given; it runs on one rank of each
    model-parallel group, whose other ranks receive its scores (under cp > 1 each cp rank's group scores 1/cp
    of the replica's rows). ``reward_source``: what the reward is (e.g.
    the checkpoint and function names), saved with the reference baselines; a run resumed with another
    reward recomputes them and restarts the score statistics. ``eval_prompts``: held-out prompts for ``evaluate``."""

    def __init__(self, config: PPOConfig, model_config: GLMConfig, layout, actor, critic, reference, reward,
                 prompts: Sequence[Sequence[int]], eos_ids: Sequence[int], pad_id: int,
                 actor_optim: OptimizerConfig = OptimizerConfig(), critic_optim: OptimizerConfig = OptimizerConfig(),
                 actor_lr: Optional[LRConfig] = None, critic_lr: Optional[LRConfig] = None,
                 ptx_batches: Optional[Callable[[int], dict]] = None, reward_fn: Optional[Callable] = None,
                 reward_source: Optional[str] = None, eval_prompts: Sequence[Sequence[int]] = ()):
        # sequence parallel is how the models were built (their spec); every model must agree
        built_sp = {name: _chunks(m)[-1].spec.gather_sequence is not None
                    for name, m in (("actor", actor), ("critic", critic), ("reference", reference), ("reward", reward))
                    if m is not None}
        if len(set(built_sp.values())) > 1:
            raise ValueError(f"the models disagree on sequence parallelism ({built_sp}): build all of them with the same "
                             "sequence_parallel")
        self.sequence_parallel = built_sp["actor"]
        self.config = config.validate(layout.dp_size, layout.tp_size, layout.pp_size, layout.vpp_size, layout.cp_size,
                                      self.sequence_parallel)
        self.base_reference = reference is None  # the reference is the LoRA actor with its adapters off
        if self.base_reference and not has_lora(actor):
            raise ValueError("reference=None needs an actor with LoRA adapters (its reference is then the actor "
                             "with them off); pass the reference model's chunks otherwise")
        tp_g = layout.tp_size if config.generation_tp is None else config.generation_tp
        # The cp ranks of a DP replica hold the same weights: for sampling (and anything else done per row) they
        # are replicas of their own, the gradient layout's dp x cp ranks.
        self.replicas = layout.gradient_layout
        # The training chunks decode only when each holds every layer (pp = 1) and whole sequences (cp = 1, no
        # sequence parallel: a one-token decoding step cannot be split). Otherwise the actor (and the reference,
        # for its answers) samples on a generation copy (at tp_g = tp and pp = 1 no bytes move: the copy's
        # tensors are the training shards).
        self.chunks_decode = layout.pp_size == 1 and layout.cp_size == 1 and not self.sequence_parallel
        self.reshard = tp_g < layout.tp_size or not self.chunks_decode
        if self.reshard:
            validate_generation_dims(tp_g, layout.world_size, model_config)
        # built once (creating process groups is collective and slow); ranks regrouped for the fewest bytes
        self.generation_layout = ParallelLayout.for_generation(self.replicas, tp_g) if self.reshard else layout
        actor_lr, critic_lr = actor_lr or PPO_LR, critic_lr or PPO_LR
        if config.ptx_coef > 0 and ptx_batches is None:
            raise ValueError("ptx_coef > 0 needs ptx_batches (SFT data for the PPO-ptx loss)")
        self.model_config, self.layout = model_config, layout
        self.uses_critic = config.advantage_estimator == "gae"
        if self.uses_critic != (critic is not None):
            raise ValueError(f"advantage_estimator={config.advantage_estimator!r} "
                             + ("needs a critic" if self.uses_critic else "uses no critic: pass critic=None"))
        if reward is None and reward_fn is None:
            raise ValueError("PPO needs a reward: a reward model, a reward function (reward_fn), or both")
        self.actor, self.critic = _chunks(actor), _chunks(critic) if self.uses_critic else []
        self.reference = self.actor if self.base_reference else _chunks(reference)
        self.reward = _chunks(reward) if reward is not None else []
        self.reward_fn, self.reward_source = reward_fn, reward_source
        models = [("actor", self.actor), ("critic", self.critic), ("reference", self.reference),
                  ("reward", self.reward)]
        for name, chunks in models:
            if not chunks and name in ("critic", "reward"):  # none under a group estimator / with reward_fn alone
                continue
            if len(chunks) != layout.vpp_size:
                raise ValueError(f"{name}: {len(chunks)} model chunks on this rank, the layout has vpp="
                                 f"{layout.vpp_size} (pipeline.build_model_chunks builds one per virtual stage)")
        for frozen in ((*self.reference, *self.reward) if not self.base_reference else self.reward):
            frozen.eval()
            for p in frozen.parameters():
                p.requires_grad_(False)
        empty = [i for i, p in enumerate(prompts) if len(p) == 0]
        if empty:  # the first response token would be predicted from a padding position
            raise ValueError(f"prompts {empty[:5]} are empty; every prompt needs at least one token (e.g. BOS)")
        fits = [i for i, p in enumerate(prompts) if len(p) <= config.max_prompt_length]
        self.prompts = [list(prompts[i]) for i in fits]
        self.prompt_source = torch.tensor(fits, dtype=torch.long)  # self.prompts[i] is prompts[prompt_source[i]]
        # the reference-baseline cache is keyed by position in self.prompts: saved with this, checked on load
        self.prompts_fingerprint = hashlib.sha256(json.dumps(self.prompts).encode()).hexdigest()[:16]
        self.dropped_prompts = len(prompts) - len(self.prompts)
        if len(self.prompts) < config.rollout_prompts:
            raise ValueError(f"{len(self.prompts)} prompts fit max_prompt_length={config.max_prompt_length} "
                             f"({self.dropped_prompts} longer ones left out), fewer than rollout_prompts="
                             f"{config.rollout_prompts}")
        fits = [j for j, p in enumerate(eval_prompts) if 0 < len(p) <= config.max_prompt_length]
        if len(fits) < len(eval_prompts):
            raise ValueError(f"{len(eval_prompts) - len(fits)} of {len(eval_prompts)} eval prompts are empty or longer "
                             f"than max_prompt_length={config.max_prompt_length}: held-out prompts are never left out "
                             "silently; shorten or drop them")
        self.eval_prompts = [list(p) for p in eval_prompts]
        self.eval_source = torch.arange(len(eval_prompts)) + len(prompts)  # the reward function's numbering
        if config.eval_interval and not self.eval_prompts:
            raise ValueError(f"eval_interval={config.eval_interval} needs eval_prompts (held-out prompts)")
        self._eval_reference: Optional[torch.Tensor] = None  # the reference's eval scores, computed once
        self.eos_ids, self.pad_id = list(eos_ids), int(pad_id)
        self.ptx_batches = ptx_batches
        self.seq_length = config.max_prompt_length + config.max_new_tokens
        per_iteration = config.ppo_epochs * (config.rollout_rows // config.mini_batch_size)
        steps = config.iterations * per_iteration
        actor_steps = (config.iterations - config.critic_warmup) * per_iteration  # the actor waits out the warm-up
        train = TrainConfig(global_batch_size=config.mini_batch_size, micro_batch_size=config.micro_batch_size,
                            seq_length=self.seq_length, train_steps=steps, seed=config.seed,
                            variable_rows=config.pack_sequences, sequence_parallel=self.sequence_parallel)
        self.actor_trainer = Trainer(self.actor, build_optimizer(self.actor, layout, actor_optim, actor_lr.lr),
                                     layout, model_config, train, LRSchedule(actor_lr, actor_steps),
                                     PolicyObjective(config.clip_eps, config.temperature, config.kl_loss_coef,
                                                     config.kl_loss_kind, config.clip_eps_high, config.dual_clip,
                                                     weighted=config.loss_agg_mode != "token-mean",
                                                     entropy_coef=config.entropy_coef, mode=config.policy_loss,
                                                     rollout_is=config.rollout_is_cap > 0))
        self.critic_trainer = None
        if self.uses_critic:
            self.critic_trainer = Trainer(self.critic, build_optimizer(self.critic, layout, critic_optim, critic_lr.lr),
                                          layout, model_config, train, LRSchedule(critic_lr, steps),
                                          ValueObjective(config.value_clip_eps))
        self.device = next(self.actor[0].parameters()).device
        self.offloader = Offloader(self.device, enabled=config.offload)
        self._savers: dict = {}  # model name -> AsyncCheckpointer (save(async_save=True))
        self._prune_after = None  # (directory, keep_last) of the last save, applied once every model committed
        self.offloader.add_model("actor", self.actor, self.actor_trainer.optimizer)
        if self.uses_critic:
            self.offloader.add_model("critic", self.critic, self.critic_trainer.optimizer)
        if not self.base_reference:
            self.offloader.add_model("reference", self.reference)
        if self.reward:
            self.offloader.add_model("reward", self.reward)
        self._resident_peaks: dict[str, int] = {}  # phase -> the most device bytes it held (this iteration)
        self.iterations_done = 0
        self.prompt_draws = 0  # rollouts drawn so far: the iterations, plus the extra rounds of dynamic sampling
        self.last_rollout: Optional[Rollout] = None  # the latest iteration's (global) rollout
        self._reward_fn_seconds = 0.0
        self._baseline_cache: dict[int, float] = {}
        self.score_moments = RunningMoments()  # of the adjusted scores of kept rows (normalize_scores)
        self.kl_coef = float(config.kl_coef)  # adapted after every rollout when kl_target > 0

    # ---- rollout ------------------------------------------------------------------------------
    def prompt_indices(self, draw: int) -> torch.Tensor:
        """The ``rollout_prompts`` prompts of a rollout (draw ``draw``: the iteration, unless dynamic sampling
        drew more): consecutive slices of a seeded permutation, reshuffled per epoch over the prompt list."""
        c, n = self.config, len(self.prompts)
        out = []
        start = draw * c.rollout_prompts
        orders: dict[int, np.ndarray] = {}  # one permutation per epoch the slice touches
        for i in range(start, start + c.rollout_prompts):
            epoch, j = divmod(i, n)
            if epoch not in orders:
                orders[epoch] = np.random.default_rng([c.seed, epoch]).permutation(n)
            out.append(int(orders[epoch][j]))
        return torch.tensor(out, dtype=torch.long)

    def _resident(self, phase: str, *groups: str, extra: Sequence[torch.Tensor] = ()) -> None:
        """Exactly ``groups`` on the device (``Offloader.ensure``; all of them when offloading is off), and
        ``phase``'s ledger entry raised to the device bytes now held by them plus ``extra``. The reference of a
        LoRA actor is the actor's group."""
        if self.base_reference:
            groups = tuple(dict.fromkeys("actor" if g == "reference" else g for g in groups))
        self.offloader.ensure(*groups)
        held = self.offloader.resident_bytes(extra)
        self._resident_peaks[phase] = max(self._resident_peaks.get(phase, 0), held)

    @torch.no_grad()
    def forward_rows(self, chunks, sequences: torch.Tensor, attention: torch.Tensor, output_fn: Callable,
                     row_shape: tuple[int, ...], extra: Optional[dict] = None,
                     outputs_at: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``output_fn(head output, micro-batch) -> fp32 [rows, *row_shape]`` over ``sequences`` /
        ``attention`` ``[n, S]`` in micro-batches of ``score_micro_batch_size`` rows, concatenated
        ``[n, *row_shape]``. Under pp > 1: the forward-only pipeline schedule (the last micro-batch
        padded by repeating a row: stages exchange fixed shapes), the result broadcast from the last
        stage to every rank of the PP group ("pp" traffic). ``extra``: more ``[n, ...]`` tensors split
        with the rows (the micro-batch dict carries them to ``output_fn``). ``outputs_at``: bool
        ``[n, S]``, the positions whose head output ``output_fn`` reads; the head then computes only
        those (``[k, ...]``, flat positions in ``mb["output_index"]``; the flags stay in ``mb["outputs_at"]``).
        ``mb["next_ids"]``: the token after each position (0 after the last), the target whose log-prob a
        position's logits give.

        Under context parallelism (cp > 1) every cp rank of the replica forwards its 2 chunks of each row
        (``ContextParallel.split`` of every ``[n, S]`` tensor, positions counted over whole rows first), so
        ``output_fn`` must give one value per position (``row_shape`` = ``(S,)``): it sees this rank's tokens,
        and the values are all-gathered over the cp group back into whole rows ("cp" traffic). Collective
        over the model-parallel group (and the cp group)."""
        layout = self.layout
        cp = ContextParallel.of(layout)
        mbs = self.config.score_micro_batch_size or self.config.micro_batch_size
        n, S = sequences.shape
        if cp is not None and tuple(row_shape) != (S,):
            raise ValueError(f"forward_rows under context parallelism (cp={cp.size}): output_fn must give one value "
                             f"per position, row_shape ({S},), not {tuple(row_shape)}")
        # the targets of every position, taken from whole rows: a cp rank's chunks lack their successors
        next_ids = torch.cat([sequences[:, 1:], torch.zeros_like(sequences[:, :1])], dim=1)
        tensors = {"input_ids": sequences, "attention_mask": attention, "next_ids": next_ids, **(extra or {})}
        if outputs_at is not None:
            tensors["outputs_at"] = outputs_at
        if cp is not None:
            if "position_ids" not in tensors:  # a rank cannot count positions from its chunks
                tensors["position_ids"] = default_positions(sequences, attention)
            tensors = {k: cp.split(v) for k, v in tensors.items()}
        pad = -n % mbs if layout.pp_size > 1 else 0
        if pad:
            tensors = {k: torch.cat([v, v[-1:].expand(pad, *v.shape[1:])]) for k, v in tensors.items()}
        micro = [{k: v[i:i + mbs] for k, v in tensors.items()} for i in range(0, n + pad, mbs)]
        for mb in micro:
            if outputs_at is not None:
                mb["output_index"] = head_positions(mb["outputs_at"])
        if layout.pp_size == 1:
            out = torch.cat([output_fn(chunk_forward(chunks[0], mb["input_ids"], None, mb["attention_mask"],
                                                     mb.get("position_ids"), mb.get("segment_ids"),
                                                     mb.get("output_index")), mb) for mb in micro])
            return out if cp is None else cp.gather_tokens(out)
        shape = activation_shape(mbs, S // layout.cp_size, self.model_config.hidden_size, layout.tp_size,
                                 self.sequence_parallel)
        result = run_schedule(chunks, layout, micro, shape, forward_only=True, output_fn=output_fn, timed=False)
        if layout.is_last_stage:
            out = torch.cat(result.outputs)
            out = out if cp is None else cp.gather_tokens(out)
        else:
            out = torch.empty((n + pad, *row_shape), dtype=torch.float32, device=self.device)
        return comm.broadcast(out, layout.pp_ranks[-1], layout.pp_group, layout.ledger, "pp")[:n]

    @staticmethod
    def pack_rows(sequences: torch.Tensor, attention: torch.Tensor) -> dict:
        """Scoring rows ``[n, S]`` packed (``batches.pack_padded_rows``), with ``origin``: each packed real
        token's flat index in ``[n, S]`` (-1 on padding), where ``forward_packed`` puts its value back."""
        n, S = sequences.shape
        flat = torch.arange(n * S, device=sequences.device).view(n, S)
        origin = torch.where(attention.bool(), flat, -1)
        return pack_padded_rows({"input_ids": sequences, "attention_mask": attention, "origin": origin},
                                fill={"origin": -1})

    def forward_packed(self, chunks, packed: dict, shape: tuple[int, int], token_fn: Callable,
                       outputs_at: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``token_fn(head output, micro-batch) -> fp32 [rows, S]`` (one value per position) over the packed
        rows of ``pack_rows``, returned in the unpacked rows' layout ``shape`` = ``[n, S]``; padding positions
        hold 0 (callers read real positions only). ``token_fn`` must not look across positions of a row
        beyond the next one (whose token, at a sequence's last position, belongs to the next sequence).
        ``outputs_at``: bool ``shape``, the unpacked positions whose values are read (``forward_rows``)."""
        S = shape[1]
        if outputs_at is not None:  # to the packed layout: each packed token keeps its origin's flag
            origin = packed["origin"].to(outputs_at.device)
            outputs_at = (origin >= 0) & outputs_at.reshape(-1)[origin.clamp(min=0)]
        out = self.forward_rows(chunks, packed["input_ids"], packed["attention_mask"], token_fn, (S,),
                                {"position_ids": packed["position_ids"], "segment_ids": packed["segment_ids"]},
                                outputs_at)
        real = packed["origin"] >= 0
        result = torch.zeros(shape[0] * S, dtype=out.dtype, device=out.device)
        result[packed["origin"][real].to(out.device)] = out[real.to(out.device)]
        return result.view(shape)

    def _token_logprobs(self, chunks, sequences, mask, packed: Optional[dict] = None) -> torch.Tensor:
        """Log-probs ``[r, T]`` of the response tokens under ``logits / temperature`` (vocab-parallel).
        ``packed``: ``pack_rows(sequences, mask)`` when ``pack_sequences`` (packed here when None), so a
        rollout scored by several models packs its rows once; likewise for ``_values`` and ``_scores``."""
        P, temperature = self.config.max_prompt_length, self.config.temperature
        backend = chunks[-1].spec.kernels.cross_entropy

        def logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            if temperature != 1.0:
                logits = logits / temperature
            group = None
            if self.layout.tp_size > 1:
                group = self.layout.tp_group
                record_vocab_parallel_loss(self.layout, targets.numel())
            return kernels.token_logprobs(logits, targets, group=group, backend=backend).float()

        def next_token(logits: torch.Tensor, mb: dict) -> torch.Tensor:
            """Log-prob ``[rows, S]`` of the token after each position the head computed (0 elsewhere)."""
            ids, index = mb["next_ids"], mb["output_index"]
            out = torch.zeros(ids.numel(), dtype=torch.float32, device=logits.device)
            out[index] = logprobs(logits, ids.reshape(-1)[index])
            # 0 at the stand-in position of an empty selection too (``head_positions``): under cp it may fall
            # inside the response span of a rank's chunk
            return torch.where(mb["outputs_at"], out.view(ids.shape), 0.0)

        # logits only where a real response token is predicted: positions [P - 1, S - 1), read back there
        outputs_at = torch.zeros_like(mask, dtype=torch.bool)
        outputs_at[:, P - 1:-1] = mask[:, P:].bool()
        if self.config.pack_sequences:
            packed = packed or self.pack_rows(sequences, mask)
            return self.forward_packed(chunks, packed, sequences.shape, next_token, outputs_at)[:, P - 1:-1]
        return self.forward_rows(chunks, sequences, mask, next_token, (sequences.shape[1],),
                                 outputs_at=outputs_at)[:, P - 1:-1]

    def _values(self, chunks, sequences, mask, packed: Optional[dict] = None) -> torch.Tensor:
        """Critic values ``[r, T]`` of the states before each response token."""
        P = self.config.max_prompt_length
        return self._token_values(chunks, sequences, mask, packed)[:, P - 1:-1]

    def _token_values(self, chunks, sequences, mask, packed: Optional[dict] = None) -> torch.Tensor:
        """Scalar-head values ``[n, S]`` at every position of ``sequences`` (0 at the padding of packed rows)."""
        def per_token(values: torch.Tensor, mb: dict) -> torch.Tensor:
            return values.float()
        if self.config.pack_sequences:
            packed = packed or self.pack_rows(sequences, mask)
            return self.forward_packed(chunks, packed, sequences.shape, per_token)
        return self.forward_rows(chunks, sequences, mask, per_token, (sequences.shape[1],))

    def _scores(self, chunks, sequences, mask, packed: Optional[dict] = None) -> torch.Tensor:
        """Reward-model scores ``[r]``: the value at each row's last real token."""
        if self.config.pack_sequences or self.layout.cp_size > 1:
            # the values of every position, read at each sequence's last token (under cp: on whichever rank)
            values = self._token_values(chunks, sequences, mask, packed)
            last = last_token_index(sequences, mask).to(values.device)
            return values.gather(1, last[:, None]).squeeze(1)

        def output_fn(values: torch.Tensor, mb: dict) -> torch.Tensor:
            last = last_token_index(mb["input_ids"], mb["attention_mask"])
            return values.gather(1, last[:, None]).squeeze(1).float()
        return self.forward_rows(chunks, sequences, mask, output_fn, ())

    def _rule_scores(self, origin: torch.Tensor, responses: torch.Tensor, response_mask: torch.Tensor
                     ) -> torch.Tensor:
        """``reward_fn`` scores ``[n]`` (fp32, on the device) of this DP replica's rows: computed on the first rank
        of the model-parallel group and broadcast to the others ("rollout" traffic), so every rank of the
        replica trains on the same scores even if the function is not deterministic. When the function
        fails, the broadcast carries a failure flag instead, so every rank of the group raises (the source
        rank the function's own error) rather than waiting for scores that never come. Under context
        parallelism the cp ranks of the replica score a slice of the rows each (``_over_cp``)."""
        layout = self.layout
        source = layout.mp_ranks[0]
        errors = []

        def score(origin: torch.Tensor, responses: torch.Tensor, response_mask: torch.Tensor) -> tuple:
            n = origin.numel()
            message = torch.zeros(n, 2, dtype=torch.float32, device=self.device)  # per row: score, 1.0 on failure
            if layout.rank == source:
                t0 = time.perf_counter()
                try:
                    scores = torch.as_tensor(self.reward_fn(origin.cpu(), responses.cpu(), response_mask.cpu()),
                                             dtype=torch.float32)
                    if scores.shape != origin.shape:
                        raise ValueError(f"reward_fn returned scores of shape {tuple(scores.shape)} for {n} rows: "
                                         "one score per row")
                    message[:, 0] = scores.to(self.device)
                except Exception as e:
                    errors.append(e)
                    message[:, 1] = 1.0
                self._reward_fn_seconds += time.perf_counter() - t0
            comm.broadcast(message, source, layout.mp_group, layout.ledger, "rollout")
            return (message,)

        message, = self._over_cp(score, origin, responses, response_mask)
        if errors:
            raise errors[0]
        if message[:, 1].any():
            raise RuntimeError("the reward function failed on a rank that scores this rank's rows (rank "
                               f"{source}{' or a cp peer' if layout.cp_size > 1 else ''}; its error is in that "
                               "rank's output)")
        return message[:, 0]

    def _replicas_agree(self, fn: Callable):
        """``fn()``, this DP replica's reward scoring (which runs user code: a reward function, a service), then
        a failure flag all-reduced over the DP group ("rollout" traffic): when ``fn`` raised on any replica,
        every rank raises (the failing ones their own error) instead of the other replicas waiting in the
        next DP collective for ranks that left it. ``fn`` raises on every rank of a replica or on none
        (``_rule_scores`` makes sure of it)."""
        error, out = None, None
        try:
            out = fn()
        except Exception as e:
            error = e
        failed = torch.tensor([float(error is not None)], device=self.device)
        comm.all_reduce(failed, self.layout.dp_group, self.layout.ledger, "rollout", op=torch.distributed.ReduceOp.MAX)
        if error is not None:
            raise error
        if failed.item():
            raise RuntimeError("scoring failed on another DP replica (its error is in that replica's output); every "
                               "replica stops with it")
        return out

    def _over_cp(self, fn: Callable, *rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``fn(*rows)`` (a tuple of ``[n, ...]`` tensors) for this DP replica's rows ``[n, ...]``. Under context
        parallelism the replica's cp ranks hold the same rows and each applies ``fn`` to a contiguous 1/cp of
        them (the rows padded to a multiple of cp by repeating the last); the results are all-gathered over
        the cp group ("rollout" traffic) and trimmed to ``n``: per-row work that needs no split sequence
        (sampling, reward functions) is done once, not cp times. ``fn`` must give every cp rank's slice the
        same shapes (responses are padded to ``max_new_tokens``)."""
        layout = self.layout
        if layout.cp_size == 1:
            return fn(*rows)
        n, cp = rows[0].shape[0], layout.cp_size
        per = -(-n // cp)
        index = torch.arange(per * cp).clamp(max=n - 1)[layout.cp_rank * per:(layout.cp_rank + 1) * per]
        out = fn(*(t[index.to(t.device)] for t in rows))
        return tuple(comm.all_gather(t.contiguous(), 0, layout.cp_group, layout.ledger, "rollout")[:n] for t in out)

    def _rewards(self, origin: torch.Tensor, sequences: torch.Tensor, attention: torch.Tensor,
                 responses: torch.Tensor, response_mask: torch.Tensor, packed: Optional[dict] = None,
                 phase: str = "score") -> tuple[torch.Tensor, dict]:
        """Scores ``[n]`` of this replica's rows (origin ``[n]``: each row's prompt in the caller's numbering,
        ``prompt_source`` / ``eval_source``; sequences / attention ``[n, S]``,
        responses / response_mask ``[n, T]``): the reward model's, the reward function's, or their sum; and
        the parts when both ({"reward_model", "reward_function"}: ``[n]`` each)."""
        parts = {}
        if self.reward:
            self._resident(phase, "reward")
            parts["reward_model"] = self._scores(self.reward, sequences, attention, packed)
        if self.reward_fn is not None:
            parts["reward_function"] = self._rule_scores(origin, responses, response_mask)
        scores = sum(parts.values())
        return scores, parts if len(parts) > 1 else {}

    def _baselines(self, prompt_index: torch.Tensor) -> torch.Tensor:
        """r(x, y_ref) per row: the score (``_rewards``: reward model and/or function) of the reference model's
        greedy response to the row's prompt, computed once per prompt (cached). Collective over the
        model-parallel group and the cp group (the ranks of one training DP replica hold the same rows)."""
        c = self.config
        todo = sorted({int(i) for i in prompt_index.tolist()} - set(self._baseline_cache))
        if todo:
            ids, mask = left_pad_prompts([self.prompts[i] for i in todo], c.max_prompt_length, self.pad_id)
            scores, _ = self._answer_scores("reference", ids, mask, self.prompt_source[torch.tensor(todo)], "score")
            self._baseline_cache.update({i: float(s) for i, s in zip(todo, scores.cpu())})
        return torch.tensor([self._baseline_cache[int(i)] for i in prompt_index.tolist()], dtype=torch.float32)

    def _answer_scores(self, name: str, ids: torch.Tensor, mask: torch.Tensor, origin: torch.Tensor, phase: str,
                       params: Optional[SamplingParams] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores ``[n]`` (``_rewards``) and lengths ``[n]`` of the responses of model ``name`` ("actor" or
        "reference") to this DP replica's left-padded prompts ``ids`` / ``mask`` ``[n, P]`` (``origin``: their
        numbering for the reward function), greedy unless ``params`` says otherwise. Sampled like the rollout:
        on the generation layout when the actor is resharded for it, and always when the training chunks
        cannot decode (pp > 1: no stage holds every layer; cp > 1 or sequence parallel: split sequences)."""
        c = self.config
        params = params or SamplingParams(max_new_tokens=c.max_new_tokens, eos_token_id=self.eos_ids,
                                          pad_token_id=self.pad_id)
        if not self.chunks_decode or (name == "actor" and self.reshard):
            resp, resp_mask, _ = self._generate_split(name, ids, mask, params, phase)
        else:
            self._resident(phase, name)
            with self._as_model(name):
                resp, resp_mask, _ = self._generate_rows(getattr(self, name)[0], ids, mask, params)
        seq = torch.cat([ids.to(self.device), resp], 1)
        seq_mask = torch.cat([mask.to(self.device), resp_mask], 1)
        scores, _ = self._rewards(origin, seq, seq_mask, resp, resp_mask, phase=phase)
        return scores, resp_mask.sum(1)

    def _as_model(self, name: str):
        """The context in which the training chunks of ``name`` compute as that model: for the reference of a
        LoRA actor (``base_reference``), the actor with its adapters off."""
        return lora_disabled(self.actor) if name == "reference" and self.base_reference else contextlib.nullcontext()

    def _sampling(self, seed: int) -> SamplingParams:
        c = self.config
        return SamplingParams(max_new_tokens=c.max_new_tokens, do_sample=True, temperature=c.temperature,
                              top_k=c.top_k, top_p=c.top_p, eos_token_id=self.eos_ids, pad_token_id=self.pad_id,
                              seed=seed)

    def generation_model(self, chunks=None, adapters: bool = True):
        """``chunks`` (default: the actor's) resharded to the generation layout: a ``GLMForCausalLM``
        with tp_g-way tensor parallelism and every layer (a plain whole model at tp_g = 1) built from
        ``sharding.reshard_for_generation`` of the training shards ("reshard" traffic in the layout's
        ledger), with the chunks' LoRA adapters, resharded like their weights, unless ``adapters`` is False
        (the base model: a LoRA actor's reference; its adapters are not moved). The adapters stay beside their
        weights, never folded into them: in bf16, W + scale B A rounds a young adapter's small delta away
        (a delta of 5e-4 x |W| keeps about a tenth of its effect), and the sampler would drift from the
        trained policy (docs/benchmarks.md, LoRA). The caller drops it after sampling."""
        from engine.model.glm import GLMForCausalLM
        from engine.model.spec import ModelSpec
        from engine.parallel.sharding import reshard_for_generation
        from engine.parallel.tensor_parallel import tensor_parallel_spec
        chunks = self.actor if chunks is None else _chunks(chunks)
        gen = self.generation_layout
        record = lora_record(chunks) if adapters else None
        local = {k: v for chunk in chunks for k, v in chunk.state_dict().items() if record or ".lora." not in k}
        state = reshard_for_generation(local, self.model_config, self.replicas, gen)
        if self.layout.tp_size > gen.tp_size:
            # Only the replicated norms still share the training copy's flat buffers; own copies (a few
            # KB) let those buffers leave the device while sampling instead of being pinned by a view.
            # (tp_g = tp under pp > 1: this stage's tensors are all shared and are the generation copy.)
            training = {p.untyped_storage().data_ptr() for chunk in chunks for p in chunk.parameters()}
            state = {k: v.clone() if v.untyped_storage().data_ptr() in training else v for k, v in state.items()}
        kernel_plan = chunks[0].spec.kernels
        spec = (ModelSpec(kernels=kernel_plan) if gen.tp_size == 1
                else tensor_parallel_spec(self.model_config, gen, kernels=kernel_plan))
        # Parameters on the meta device, then the resharded tensors assigned as they are (their device
        # and dtype): one copy of the generation shard, no allocation or init of a throwaway model.
        # Tensors still shared with the training model (at tp_g = tp, this stage's) are only read.
        with torch.device("meta"):
            model = GLMForCausalLM(self.model_config, spec, init=False)
            if record:
                attach_adapters(model, record)
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval().requires_grad_(False)

    def _generate_split(self, name: str, ids: torch.Tensor, mask: torch.Tensor, params: SamplingParams,
                        phase: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Responses ``[n, T]``, masks and the sampler's log-probs to the left-padded prompts ``ids``/``mask``
        ``[n, P]`` of this rank's training DP replica, sampled on the generation layout: the replica's k = f pp
        generation replicas (f = tp / tp_g) each sample a contiguous slice (the list padded to a multiple of k by
        repeating the last prompt), and an all-gather over the PP group, then over the TP subgroup of
        size f, puts the slices back in order (``ParallelLayout.for_generation``; "rollout" traffic).
        ``name``: the model ("actor" or "reference") whose generation copy (``generation_model``) samples;
        its training copy goes back to host memory before sampling when offloading (safe swap order:
        the KV cache is allocated after), and the copy is dropped once sampled. Under context parallelism
        the replica's cp ranks first split the rows (``_over_cp``), each cp rank being k generation replicas."""
        layout, gen = self.replicas, self.generation_layout
        self._resident(phase, name)  # resharding reads the training shards
        model = self.generation_model(getattr(self, name), adapters=not (name == "reference" and self.base_reference))
        self._resident(phase, extra=list(model.parameters()))
        out = self._over_cp(lambda i, m: self._sample_slice(model, i, m, params), ids, mask)
        del model  # the resharded copy lives only while sampling
        return out

    def _sample_slice(self, model, ids: torch.Tensor, mask: torch.Tensor, params: SamplingParams
                      ) -> tuple[torch.Tensor, ...]:
        """``_generate_split``'s sampling of the rows ``ids`` / ``mask`` ``[n, P]`` of one (dp x cp) replica by
        its k generation replicas, put back in order."""
        layout, gen = self.replicas, self.generation_layout
        f = layout.tp_size // gen.tp_size
        k, q = f * layout.pp_size, gen.dp_rank % (f * layout.pp_size)  # slice q = offset * pp + stage
        n = ids.shape[0]
        per = -(-n // k)
        pad = per * k - n
        if pad:
            ids, mask = torch.cat([ids, ids[-1:].expand(pad, -1)]), torch.cat([mask, mask[-1:].expand(pad, -1)])
        sampled = self._generate_rows(model, ids[q * per:(q + 1) * per], mask[q * per:(q + 1) * per], params)
        siblings, _ = layout.tp_subgroup(f)
        gathered = []
        for t in sampled:
            t = comm.all_gather(t.contiguous(), 0, layout.pp_group, layout.ledger, "rollout")
            gathered.append(comm.all_gather(t.contiguous(), 0, siblings, layout.ledger, "rollout")[:n])
        return tuple(gathered)

    def _generate_rows(self, model, ids: torch.Tensor, mask: torch.Tensor, params: SamplingParams
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Responses, masks and the sampler's log-probs ``[n, T]`` (on the device; fp32, 0 after a row's end) of
        ``model`` to the left-padded prompts ``ids`` / ``mask`` ``[n, P]``, generated ``generation_batch_size``
        rows at a time (all at once when 0), so the KV cache holds at most that many rows. Chunk j > 0 samples
        with a seed derived from (``params.seed``, j): one chunk is exactly the unchunked call, and the samples
        are deterministic for a given chunk size."""
        size = self.config.generation_batch_size or ids.shape[0]
        responses, masks, logprobs = [], [], []
        for j, start in enumerate(range(0, ids.shape[0], size)):
            chunk = params
            if j and params.seed is not None:
                chunk = dataclasses.replace(params, seed=int(np.random.default_rng([params.seed, j]).integers(2**62)))
            out = generate(model, ids[start:start + size].to(self.device), mask[start:start + size].to(self.device),
                           chunk)
            r, m = self._pad_response(out.response_ids, out.response_mask)
            responses.append(r)
            masks.append(m)
            logprobs.append(torch.nn.functional.pad(out.logprobs.float(), (0, r.shape[1] - out.logprobs.shape[1])))
        return torch.cat(responses), torch.cat(masks), torch.cat(logprobs)

    def _pad_response(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.config.max_new_tokens
        pad = t - ids.shape[1]
        return (torch.nn.functional.pad(ids, (0, pad), value=self.pad_id),
                torch.nn.functional.pad(mask.long(), (0, pad), value=0))

    @torch.no_grad()
    def rollout(self, draw: int) -> tuple[Rollout, dict]:
        """Sample, score and all-gather the global rollout of prompt draw ``draw`` (``prompt_indices``: the
        iteration's index unless dynamic sampling drew more); returns it and phase times."""
        c, layout = self.config, self.layout
        t0 = time.perf_counter()
        rows = self.prompt_indices(draw).repeat_interleave(c.samples_per_prompt)
        per_rank = c.rollout_rows // layout.dp_size
        mine = rows[layout.dp_rank * per_rank:(layout.dp_rank + 1) * per_rank]
        ids, pmask = left_pad_prompts([self.prompts[int(i)] for i in mine], c.max_prompt_length, self.pad_id)
        self._resident_peaks = {}
        self._reward_fn_seconds = 0.0  # on the rank that runs reward_fn
        reset_peak_memory(self.device)
        if self.reshard:  # sampled on the generation layout, returned for this DP replica's rows
            # one seed per (draw, generation replica), shared by its TP ranks
            seed = int(np.random.default_rng([c.seed, draw, self.generation_layout.dp_rank, 1]).integers(2**62))
            responses, response_mask, sampler_logprobs = self._generate_split("actor", ids, pmask, self._sampling(seed),
                                                                              "generate")
        else:
            # one seed per (draw, DP replica): the TP ranks of a replica draw the same tokens
            seed = int(np.random.default_rng([c.seed, draw, layout.dp_rank]).integers(2**62))
            self._resident("generate", "actor")
            responses, response_mask, sampler_logprobs = self._generate_rows(self.actor[0], ids, pmask,
                                                                             self._sampling(seed))
        prompt_ids, prompt_mask = ids.to(self.device), pmask.to(self.device)
        sequences = torch.cat([prompt_ids, responses], 1)
        attention = torch.cat([prompt_mask, response_mask], 1)
        t1 = time.perf_counter()
        peaks = {"generate": peak_memory(self.device)}
        reset_peak_memory(self.device)

        for model in (*self.actor, *self.critic):  # no critic chunks under a group estimator
            model.eval()
        packed = self.pack_rows(sequences, attention) if c.pack_sequences else None  # once for all four models
        self._resident("score", "actor")
        logprobs = self._token_logprobs(self.actor, sequences, attention, packed)
        self._resident("score", "reference")
        with self._as_model("reference"):
            ref_logprobs = self._token_logprobs(self.reference, sequences, attention, packed)
        values = None  # no critic: zeros of the global shape after the gather (no traffic for them)
        if self.uses_critic:
            self._resident("score", "critic")
            values = self._values(self.critic, sequences, attention, packed)

        def rewards() -> tuple:
            scores, parts = self._rewards(self.prompt_source[mine], sequences, attention, responses, response_mask,
                                          packed)
            baselines = self._baselines(mine).to(self.device) if c.uses_reference_baseline else None
            return scores, parts, baselines
        scores, parts, baselines = self._replicas_agree(rewards)
        for model in (*self.actor, *self.critic):
            model.train()
        t2 = time.perf_counter()
        peaks["score"] = peak_memory(self.device)

        def gather(t: torch.Tensor) -> torch.Tensor:
            return comm.all_gather(t.contiguous(), 0, layout.dp_group, layout.ledger, "rollout")

        logprobs = gather(logprobs)
        values = gather(values) if values is not None else torch.zeros_like(logprobs)
        scores = gather(scores)
        baselines = gather(baselines) if baselines is not None else torch.zeros_like(scores)
        rollout = Rollout(gather(sequences), gather(attention), gather(responses), gather(response_mask),
                          logprobs, gather(ref_logprobs), values, scores, baselines, rows, gather(sampler_logprobs),
                          {k: gather(v) for k, v in parts.items()})
        times = {"generate_s": t1 - t0, "score_s": t2 - t1, "gather_s": time.perf_counter() - t2}
        if self.reward_fn is not None:  # part of score_s (rank 0's, as every metric)
            times["reward_fn_s"] = self._reward_fn_seconds
        times.update({f"peak_memory_{k}": v for k, v in peaks.items() if v is not None})
        return rollout, times

    def dynamic_rollout(self) -> tuple[Rollout, dict]:
        """The iteration's rollout with dynamic sampling (``sampling_rounds``): rollouts of the next prompt draws
        (``prompt_draws`` advances by one each) until ``rollout_prompts`` prompts pass the reward-spread filter
        or the rounds run out; returns a rollout of the first ``rollout_prompts`` passing prompts' groups (in
        draw order), then filtered groups to fill it, and the summed phase times with ``sampling_rounds`` and
        ``passing_fraction`` (passing prompts / prompts sampled). One round when sampling_rounds = 1."""
        c = self.config
        rollouts, passing, times, peaks = [], [], {}, {}
        for _ in range(c.sampling_rounds):
            r, t = self.rollout(self.prompt_draws)
            self.prompt_draws += 1
            for phase, held in self._resident_peaks.items():
                peaks[phase] = max(peaks.get(phase, 0), held)
            for k, v in t.items():
                times[k] = max(times.get(k, 0), v) if k.startswith("peak_memory") else times.get(k, 0) + v
            # finished rounds wait in host memory: the device holds one round's rollout, not sampling_rounds of them
            rollouts.append(r.to("cpu") if c.sampling_rounds > 1 else r)
            ok = torch.ones(c.rollout_prompts, dtype=torch.bool)
            if c.min_reward_spread > 0:
                ok = reward_spread_filter(r.scores.view(c.rollout_prompts, c.samples_per_prompt),
                                          c.min_reward_spread).cpu()
            passing.append(ok)
            if int(torch.cat(passing).sum()) >= c.rollout_prompts:
                break
        self._resident_peaks = peaks
        passing = torch.cat(passing)
        times.update(sampling_rounds=len(rollouts), passing_fraction=passing.float().mean().item())
        if len(rollouts) == 1:
            return rollouts[0].to(self.device), times
        # passing groups first (draw order), then the others; the first rollout_prompts groups make the rollout
        order = torch.cat([torch.nonzero(passing).flatten(), torch.nonzero(~passing).flatten()])[:c.rollout_prompts]
        rows = (order[:, None] * c.samples_per_prompt + torch.arange(c.samples_per_prompt)).flatten()

        def pick(per_round) -> torch.Tensor:
            return torch.cat(list(per_round))[rows]
        names = [f.name for f in dataclasses.fields(Rollout) if f.name != "score_parts"]
        parts = {k: pick(r.score_parts[k] for r in rollouts) for k in rollouts[0].score_parts}
        picked = Rollout(**{name: pick(getattr(r, name) for r in rollouts) for name in names}, score_parts=parts)
        return picked.to(self.device), times

    # ---- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Greedy answers of the actor to the held-out ``eval_prompts``, scored like the rollout (reward model
        and/or function), against the reference model's greedy answers to the same prompts (scored once,
        then cached: the reference does not change). Each training DP replica answers a slice; the results
        are all-gathered. Returns (the same on every rank):

            eval_reward            mean score of the actor's answers
            eval_reference_reward  mean score of the reference's answers
            eval_win_rate          fraction of prompts where the actor's answer scores higher (ties, within
                                   1e-5 x max(1, |reference score|): half),
                                   the reward's verdict of ChatGLM-RLHF's win rate against the SFT model
            eval_response_length   mean length of the actor's answers (tokens)

        With ``eval_samples = k > 1`` the actor samples k answers per prompt (``eval_temperature``, seeded by the
        iteration) instead of one greedy answer: the means above are over all of them (each compared with the
        reference's greedy answer), and ``eval_best_reward`` is the mean over prompts of the best of the k
        (pass@k for a 0/1 checker)."""
        if not self.eval_prompts:
            raise ValueError("evaluate() needs eval_prompts (held-out prompts given to PPOLoop)")
        c, layout, n = self.config, self.layout, len(self.eval_prompts)
        k = c.eval_samples

        def answers(name: str, prompts: torch.Tensor, params: Optional[SamplingParams] = None):
            """Scores and lengths of ``name``'s answers to ``prompts`` (indices ``[m]``, the same on every
            rank): each DP replica answers a slice (the last prompt repeated to fill them), all-gathered."""
            m = prompts.numel()
            per = -(-m // layout.dp_size)
            mine = prompts[torch.arange(per * layout.dp_size).clamp(max=m - 1)][layout.dp_rank * per:
                                                                                (layout.dp_rank + 1) * per]
            ids, mask = left_pad_prompts([self.eval_prompts[int(i)] for i in mine], c.max_prompt_length, self.pad_id)
            out = self._replicas_agree(lambda: self._answer_scores(name, ids, mask, self.eval_source[mine], "eval",
                                                                   params))
            return [comm.all_gather(t.float().contiguous(), 0, layout.dp_group, layout.ledger, "rollout")[:m]
                    for t in out]

        t0 = time.perf_counter()
        prompts = torch.arange(n)
        if self._eval_reference is None:
            self._eval_reference = answers("reference", prompts)[0]
        sampled = None
        if k > 1:  # one seed per (evaluation, sampling replica): every replica draws its own noise
            replica = self.generation_layout.dp_rank if self.reshard else layout.dp_rank
            seed = int(np.random.default_rng([c.seed, self.iterations_done, replica, 2]).integers(2**62))
            sampled = SamplingParams(max_new_tokens=c.max_new_tokens, do_sample=True, temperature=c.eval_temperature,
                                     eos_token_id=self.eos_ids, pad_token_id=self.pad_id, seed=seed)
        scores, lengths = answers("actor", prompts.repeat_interleave(k), sampled)
        reference = self._eval_reference.repeat_interleave(k)
        # scores within fp32 rounding of a forward's batch composition (~1e-6 relative) are ties: otherwise two
        # identical answers, scored in differently sized batches, would win or lose at random
        tie = (scores - reference).abs() <= 1e-5 * reference.abs().clamp(min=1.0)
        wins = torch.where(tie, 0.5, (scores > reference).float())
        out = {"eval_reward": scores.mean().item(), "eval_reference_reward": self._eval_reference.mean().item(),
               "eval_win_rate": wins.mean().item(), "eval_response_length": lengths.mean().item()}
        if k > 1:
            out["eval_best_reward"] = scores.view(n, k).max(1).values.mean().item()
        out["eval_s"] = time.perf_counter() - t0
        return out

    # ---- advantages ---------------------------------------------------------------------------
    def advantages(self, r: Rollout) -> tuple[dict, dict]:
        """Filter, shape rewards, GAE and whiten (or the group advantages): the aligned ``[R, S]`` tensors of
        the PPO update, and rollout statistics. The same on every rank (pure functions of the global
        rollout)."""
        c = self.config
        adjusted = reference_baseline(r.scores, r.baselines) if c.uses_reference_baseline else r.scores
        keep = torch.ones(c.rollout_rows, dtype=torch.bool, device=r.scores.device)
        if c.min_reward_spread > 0:
            spread_ok = reward_spread_filter(r.scores.view(c.rollout_prompts, c.samples_per_prompt),
                                             c.min_reward_spread)
            keep = spread_ok.repeat_interleave(c.samples_per_prompt)
        lengths = r.response_mask.sum(1)
        last = r.responses.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1)
        stopped = torch.isin(last, torch.tensor(self.eos_ids, device=last.device)) & (lengths > 0)
        truncated = (lengths == c.max_new_tokens) & ~stopped
        trains = keep & ~truncated if c.mask_truncated else keep
        mask = r.response_mask.bool() & trains[:, None]
        if c.normalize_scores and keep.any():
            self.score_moments.update(adjusted[keep])  # the global rollout: the same on every rank
            adjusted = adjusted / self.score_moments.std
        if c.score_clip > 0:
            adjusted = adjusted.clamp(-c.score_clip, c.score_clip)
        if c.overlong_buffer:
            length_penalty = overlong_penalty(lengths, c.max_new_tokens, c.overlong_buffer, c.overlong_penalty)
            adjusted = adjusted + length_penalty
        groups = (c.rollout_prompts, c.samples_per_prompt)
        if c.advantage_estimator == "reinforce++-baseline":  # each score relative to its prompt's mean
            adjusted = (adjusted.view(groups) - adjusted.view(groups).mean(1, keepdim=True)).view(-1)
        rewards, kl = shape_rewards(adjusted, r.logprobs, r.ref_logprobs, mask, self.kl_coef, c.kl_kind)
        if self.uses_critic or c.advantage_estimator in REINFORCE_ESTIMATORS:
            # REINFORCE++ is GAE with zero values and lam = 1: the discounted sum of the rewards to the end
            values = r.values if self.uses_critic else torch.zeros_like(rewards)
            adv, returns = gae_advantages(rewards, values, mask, c.gamma, c.lam if self.uses_critic else 1.0)
            if c.whiten_advantages and int(mask.sum()) >= 2:  # whitening needs a variance
                adv = masked_whiten(adv, mask)
        else:
            # each response's score relative to its prompt's group, on every token of the response (an
            # empty response still counts in its group's baseline); the KL penalty, summed per response:
            # RLOO folds it into the score (Ahmadian et al.); GRPO normalises the score alone and
            # subtracts the group-centred penalty, so KL noise never becomes a unit-size advantage when
            # a group's scores tie
            penalty = (self.kl_coef * kl.sum(1)).view(groups)
            if c.advantage_estimator == "rloo":
                relative = group_advantages(adjusted.view(groups) - penalty, "rloo")
            else:
                relative = (group_advantages(adjusted.view(groups), "grpo", normalize_std=c.grpo_normalize_std)
                            - (penalty - penalty.mean(1, keepdim=True)))
            adv = torch.where(mask, relative.view(-1)[:, None], torch.zeros((), device=mask.device))
            returns = torch.zeros_like(adv)
        P = c.max_prompt_length
        labels = align(torch.where(mask, r.responses, torch.full_like(r.responses, IGNORE_INDEX)), P, IGNORE_INDEX)
        batch = {"input_ids": r.sequences, "attention_mask": r.attention_mask, "labels": labels,
                 "old_logprobs": align(r.logprobs * mask, P, 0.0), "advantages": align(adv, P, 0.0)}
        if self.uses_critic:
            batch.update(old_values=align(r.values * mask, P, 0.0), returns=align(returns, P, 0.0))
        if c.kl_loss_coef > 0:
            batch["ref_logprobs"] = align(r.ref_logprobs * mask, P, 0.0)
        all_tokens = r.response_mask.bool()
        # the sampling copy's log-probs against the training forward's, over every sampled token: a resharding
        # or kernel bug shows here first (fp32: rounding only, ~1e-6)
        diff = torch.where(all_tokens, r.logprobs - r.sampler_logprobs, torch.zeros((), device=all_tokens.device))
        mismatch = {"rollout_logprob_diff_max": diff.abs().max().item() if all_tokens.any() else 0.0,
                    "rollout_kl": (masked_mean(kl_estimate(r.sampler_logprobs, r.logprobs, "k3"), all_tokens).item()
                                   if all_tokens.any() else 0.0)}
        if c.rollout_is_cap > 0:
            # (not "truncated": that name holds the responses cut off at max_new_tokens)
            weights, capped = truncated_importance_weights(r.logprobs, r.sampler_logprobs, mask, c.rollout_is_cap,
                                                           c.rollout_is_level, c.rollout_is_mode)
            batch["rollout_is_weights"] = align(weights, P, 0.0)
            mismatch["rollout_is_truncated"] = (capped.sum() / mask.sum().clamp(min=1)).item()
        seq_kl = (kl_estimate(r.logprobs, r.ref_logprobs, "k1") * all_tokens).sum(1)  # KL of each response
        stats = {"reward": r.scores.mean().item(), "kl": seq_kl.mean().item(),
                 "response_length": all_tokens.sum(1).float().mean().item(),
                 "kept_fraction": keep.float().mean().item(), "kl_coef": self.kl_coef,
                 "truncated_fraction": truncated.float().mean().item(),
                 "trained_fraction": (mask.any(1)).float().mean().item(), **mismatch}
        if c.overlong_buffer:
            stats["overlong_penalty"] = length_penalty.mean().item()
        stats.update({name: part.mean().item() for name, part in r.score_parts.items()})
        if c.uses_reference_baseline:  # (a group baseline needs no reference answers)
            stats.update(reward_vs_reference=(r.scores - r.baselines).mean().item(),
                         reference_reward=r.baselines.mean().item())
        if self.uses_critic:
            stats["value_mean"] = masked_mean(r.values, all_tokens).item() if all_tokens.any() else 0.0
        return batch, stats

    # ---- update -------------------------------------------------------------------------------
    def update(self, batch: dict, iteration: int) -> dict:
        """``ppo_epochs`` passes of actor and critic steps over seeded mini-batches of the rollout: every
        actor step first, then every critic step (the two models are independent, so the order changes
        nothing but what must be resident: one model and its optimizer state at a time)."""
        c = self.config
        G, R = c.mini_batch_size, c.rollout_rows
        minibatches, skipped = [], 0  # row indices (each pass slices its mini-batches when it uses them)
        for epoch in range(c.ppo_epochs):
            order = torch.from_numpy(np.random.default_rng([c.seed, iteration, epoch, 7]).permutation(R))
            for i in range(0, R, G):
                if (batch["labels"][order[i:i + G]] != IGNORE_INDEX).any():
                    minibatches.append(order[i:i + G])
                else:
                    skipped += 1  # every row filtered out or empty: nothing to learn from
        sums: dict[str, float] = {}
        peaks: list[int] = []  # each step's allocator peak (CUDA; the Trainer resets it per step)

        def add(record: dict, step) -> None:
            for k, v in record.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            if step.peak_memory_bytes is not None:
                peaks.append(step.peak_memory_bytes)

        def rows_of(rows: torch.Tensor, weighted: bool = False) -> dict:
            mb = {k: v[rows] for k, v in batch.items()}
            if weighted:  # over the whole mini-batch, before the Trainer splits it over micro-batches and ranks
                mb["token_weights"] = loss_token_weights(mb["labels"] != IGNORE_INDEX, c.loss_agg_mode,
                                                         c.max_new_tokens)
            if not c.pack_sequences:
                return mb
            # sequences without a trained token (filtered prompts, empty responses) add nothing to the loss:
            # in a packed row they would only cost compute, so they are left out
            return pack_padded_rows(mb, self.actor_trainer.train.row_multiple(self.layout.dims),
                                    fill={"labels": IGNORE_INDEX}, keep=(mb["labels"] != IGNORE_INDEX).any(1))

        train_actor = iteration >= c.critic_warmup  # (the critic's warm-up leaves the actor off the device)
        if train_actor:
            self._resident("update", "actor", "actor.optim")
        for rows in minibatches if train_actor else ():
            extra = ()
            if c.ptx_coef > 0:
                extra = ((LanguageModelObjective(), self.ptx_batches(self.actor_trainer.steps_done), c.ptx_coef),)
            mb = rows_of(rows, weighted=c.loss_agg_mode != "token-mean")
            actor = self.actor_trainer.train_step(mb, extra=extra)
            add({"policy_loss": actor.loss, "actor_grad_norm": actor.grad_norm, "update_rows": len(mb["labels"]),
                 **actor.stats}, actor)
        if train_actor:
            self._resident("update", "actor", "actor.optim")  # measured again: the steps allocated gradients
        if self.uses_critic:
            self._resident("update", "critic", "critic.optim")
            for rows in minibatches:
                critic = self.critic_trainer.train_step(rows_of(rows))
                add({"value_loss": critic.loss, "critic_grad_norm": critic.grad_norm, **critic.stats}, critic)
            self._resident("update", "critic", "critic.optim")
        steps = len(minibatches)
        out = {k: v / steps for k, v in sums.items()} if steps else {}
        out.update(ppo_steps=steps, skipped_minibatches=skipped)
        if train_actor:
            out["actor_lr"] = float(self.actor_trainer.lr(max(0, self.actor_trainer.steps_done - 1)))
        if peaks:
            out["peak_memory_update"] = max(peaks)
        if "lm_loss" in out:
            out["ptx_loss"] = out.pop("lm_loss")
        return out

    # ---- checkpoints --------------------------------------------------------------------------
    def _trained(self) -> list[tuple[str, list, Trainer]]:
        """(name, chunks, trainer) of the trained models: the actor, and the critic under gae."""
        out = [("actor", self.actor, self.actor_trainer)]
        return out + [("critic", self.critic, self.critic_trainer)] if self.uses_critic else out

    def save(self, directory, keep_last: Optional[int] = None, tokenizer_fingerprint: Optional[str] = None,
             async_save: bool = False) -> None:
        """``DIR/actor`` and ``DIR/critic`` (gae only) checkpoints (``engine.train.checkpoint``, collective) at
        step = iterations done; the baseline caches of all DP replicas are merged into the actor's extra
        state. ``async_save``: each model's checkpoint is written in the background by its own
        ``AsyncCheckpointer`` (so the actor's and the critic's writes overlap each other and the next
        iteration); ``wait_for_saves`` / ``close_savers`` wait for them. A save first waits for the
        previous one. ``keep_last`` prunes only steps older than the newest ``keep_last`` that every model
        committed, once they have: a job killed between two models' commits still resumes (``load``)."""
        from pathlib import Path

        from engine.train.checkpoint import AsyncCheckpointer, save_checkpoint
        self.wait_for_saves()  # in flight: its temp dirs and commits must not race this save's
        caches = [self._baseline_cache]
        if torch.distributed.is_initialized() and self.layout.world_size > 1:
            caches = [None] * self.layout.world_size
            torch.distributed.all_gather_object(caches, self._baseline_cache)
        merged = {str(k): v for cache in caches for k, v in sorted(cache.items())}
        merged = dict(sorted(merged.items(), key=lambda kv: int(kv[0])))  # the same JSON on every rank
        for name, model, trainer in self._trained():
            self.offloader.ensure(name, f"{name}.optim")  # collectives over device tensors
            extra = {"mode": f"ppo_{name}", "iteration": self.iterations_done, "trainer_steps": trainer.steps_done}
            if name == "actor":
                extra["advantage_estimator"] = self.config.advantage_estimator
                extra["reference_baselines"] = merged
                extra["reward_source"] = self.reward_source
                extra["prompts_fingerprint"] = self.prompts_fingerprint
                extra["score_moments"] = self.score_moments.state_dict()
                extra["kl_coef"] = self.kl_coef
                extra["prompt_draws"] = self.prompt_draws
            if async_save and name not in self._savers:
                self._savers[name] = AsyncCheckpointer(self.layout)  # collective: every rank saves at once
            save = self._savers[name].save if async_save else save_checkpoint
            save(Path(directory) / name, self.iterations_done, model, trainer.optimizer, self.layout,
                 self.model_config, extra_state=extra, tokenizer_fingerprint=tokenizer_fingerprint)
        self._prune_after = (Path(directory), keep_last) if keep_last is not None else None
        if not async_save:
            self._prune()

    def _prune(self) -> None:
        """Apply the last save's ``keep_last`` once every model has committed it: keep each model's steps from
        the oldest of the newest ``keep_last`` steps they all hold (rank 0 deletes; the filesystem is shared)."""
        from engine.train.checkpoint import committed_steps, remove_steps
        pending, self._prune_after = self._prune_after, None
        if pending is None or self.layout.rank != 0:
            return
        directory, keep_last = pending
        names = [name for name, _, _ in self._trained()]
        common = sorted(set.intersection(*(set(committed_steps(directory / n)) for n in names)))
        if common:
            oldest = common[-keep_last:][0]
            for n in names:
                remove_steps(directory / n, [s for s in committed_steps(directory / n) if s < oldest])

    def wait_for_saves(self) -> None:
        """Block until every asynchronous save in flight is committed (raising the first error, after
        waiting for all of them), then apply its ``keep_last``."""
        errors = []
        for saver in self._savers.values():
            try:
                saver.wait()
            except BaseException as e:  # wait for them all: a save still running would race the next one
                errors.append(e)
        if errors:
            self._prune_after = None  # a model may lack the step: keep what is there
            raise errors[0]
        self._prune()

    def close_savers(self) -> None:
        """``wait_for_saves``, then release the savers' process groups (a later ``save(async_save=True)``
        builds new ones)."""
        try:
            self.wait_for_saves()
        finally:
            savers, self._savers = self._savers, {}
            for saver in savers.values():
                saver.close()  # every save has finished (or failed) by now: this releases the group

    def load(self, directory, tokenizer_fingerprint: Optional[str] = None) -> None:
        """Resume from ``save(DIR)``: weights, optimizer states, iteration, LR-schedule position and the
        reference-baseline cache (the layout may differ from the saving run's)."""
        from pathlib import Path

        from engine.train.checkpoint import CheckpointError, committed_steps, load_checkpoint, read_extra_state
        # The estimator is part of the run: checked before anything is loaded. Checkpoints written before
        # it was recorded hold a critic exactly when they were gae runs.
        saved = read_extra_state(Path(directory) / "actor").get("advantage_estimator")
        if saved is None and (Path(directory) / "critic").is_dir():
            saved = "gae"
        if saved is not None and saved != self.config.advantage_estimator:
            raise CheckpointError(
                f"{directory} is a {saved!r} PPO run ({'with' if saved == 'gae' else 'without'} a critic); this "
                f"run uses advantage_estimator={self.config.advantage_estimator!r}: resume with the same estimator, "
                f"or start a new run from its actor (--actor-from {Path(directory) / 'actor'})")
        # The newest iteration every trained model committed: a job killed between the actor's and the
        # critic's commits leaves one of them a step ahead, and that step is not a whole save.
        names = [name for name, _, _ in self._trained()]
        common = set.intersection(*(set(committed_steps(Path(directory) / n)) for n in names))
        if not common:
            raise CheckpointError(f"{directory}: no iteration that {' and '.join(names)}{' both' if len(names) > 1 else ''}"
                                  " committed (steps: "
                                  + "; ".join(f"{n} {committed_steps(Path(directory) / n)}" for n in names) + ")")
        step = max(common)
        states = {}
        for name, model, trainer in self._trained():
            self.offloader.ensure(name, f"{name}.optim")
            extra = load_checkpoint(Path(directory) / name, model, trainer.optimizer, self.layout,
                                    self.model_config, step=step, tokenizer_fingerprint=tokenizer_fingerprint)
            if extra.get("mode") != f"ppo_{name}":
                raise CheckpointError(f"{Path(directory) / name} holds a {extra.get('mode')!r} checkpoint, not a "
                                      f"PPO {name}")
            trainer.steps_done = int(extra["trainer_steps"])
            states[name] = extra
        if "critic" in states and states["actor"]["iteration"] != states["critic"]["iteration"]:
            raise CheckpointError(f"{directory}: actor at iteration {states['actor']['iteration']}, critic at "
                                  f"{states['critic']['iteration']}: not one save")
        self.iterations_done = int(states["actor"]["iteration"])
        # one draw per iteration in checkpoints from before dynamic sampling
        self.prompt_draws = int(states["actor"].get("prompt_draws", self.iterations_done))
        self._baseline_cache = {int(k): float(v) for k, v in states["actor"]["reference_baselines"].items()}
        self.score_moments.load_state_dict(states["actor"]["score_moments"])
        import warnings
        saved_reward = states["actor"].get("reward_source")  # absent in checkpoints from before it was recorded
        if "reward_source" in states["actor"] and saved_reward != self.reward_source:
            # scores on another reward's scale: the cached baselines and the score statistics start over
            warnings.warn(f"{directory}: saved with reward {saved_reward!r}, resumed with {self.reward_source!r}: "
                          "the reference baselines are recomputed and the score statistics restart")
            self._baseline_cache, self.score_moments = {}, RunningMoments()
        saved_prompts = states["actor"].get("prompts_fingerprint")
        if saved_prompts is not None and saved_prompts != self.prompts_fingerprint:
            # the cache is keyed by prompt position: another prompt list (other data, another held-out split)
            # would pair its prompts with other prompts' baselines
            warnings.warn(f"{directory}: saved with another prompt list (fingerprint {saved_prompts}, now "
                          f"{self.prompts_fingerprint}): the reference baselines are recomputed, and the prompt order "
                          "continues from the saved position in the new list")
            self._baseline_cache = {}
        # The adapted coefficient is run state, resumed with the run; a fixed one is configuration, so the
        # resuming run's value holds (also for checkpoints written before the controller existed).
        if self.config.kl_target > 0 and "kl_coef" in states["actor"]:
            self.kl_coef = float(states["actor"]["kl_coef"])

    def iteration(self) -> dict:
        """One rollout + update; returns the iteration's metrics (the same on every rank)."""
        t0 = time.perf_counter()
        it = self.iterations_done
        c = self.config
        evaluation, eval_peaks = {}, {}
        if c.eval_interval and it % c.eval_interval == 0:
            self._resident_peaks = {}
            evaluation, eval_peaks = self.evaluate(), self._resident_peaks
        rollout, times = self.dynamic_rollout()  # (starts a new ledger of resident bytes)
        self.last_rollout = rollout  # for sample logging (launch.rlhf --log-samples)
        self._resident_peaks.update(eval_peaks)
        batch, stats = self.advantages(rollout)
        stats.update(evaluation)
        if c.kl_target > 0:  # the next rollout's coefficient (the same on every rank: global rollout)
            self.kl_coef = adaptive_kl_coef(self.kl_coef, stats["kl"], c.kl_target, c.kl_horizon, c.rollout_rows)
        t1 = time.perf_counter()
        stats.update(self.update(batch, it))
        stats.update(times, train_s=time.perf_counter() - t1, seconds=time.perf_counter() - t0, step=it)
        stats.update({f"resident_bytes_{phase}": held for phase, held in self._resident_peaks.items()})
        self.iterations_done += 1
        return stats


__all__ = ["PPOConfig", "PPOLoop", "Rollout", "align", "left_pad_prompts"]
