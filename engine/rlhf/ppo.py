"""PPO with the ChatGLM-RLHF recipe (arXiv 2404.00934): actor, critic, reference and reward models
co-located on the same ranks of one TP x DP layout.

One iteration (``PPOLoop.iteration``):

    rollout   each DP replica (its TP group) samples ``samples_per_prompt`` responses for its slice of
              ``rollout_prompts`` prompts with the actor's KV cache (TP ranks gather the vocab-sharded
              logits and draw the same token)
    score     on the same slice, no grad: actor log-probs (the behaviour policy, recomputed by a full
              forward so they match the training forward's numerics), reference log-probs, critic
              values, reward-model scores; the reference baseline r(x, y_ref) of each prompt (y_ref:
              the reference model's greedy response), computed once per prompt and cached
    gather    the scored slices are all-gathered over DP ("rollout" traffic): every rank holds the
              global rollout, so filtering, advantages and whitening need no further reduction
    advantage score - baseline (``reference_baseline``); prompts whose k responses score alike are
              dropped (``min_reward_spread``); per-token reward -kl_coef * KL(actor || reference) with
              the score at the last token; GAE; advantages whitened over the rollout
    update    ``ppo_epochs`` passes over seeded mini-batches: the actor's Trainer steps the clipped
              surrogate (plus ``ptx_coef`` times the language-model loss on SFT data: PPO-ptx), the
              critic's Trainer the clipped value loss (``engine.rlhf.objectives``)

``save(DIR)`` / ``load(DIR)`` checkpoint the actor and critic (weights and optimizer state, any layout
on load), the iteration and the reference-baseline cache; the rollout's prompts and sampling seeds are
functions of the iteration, so a resumed run continues exactly (bitwise on CPU at the same layout).

``generation_tp=tp_g`` (a divisor of the training tp) reshards the actor for the rollout onto the
generation layout (``ParallelLayout.for_generation``: tp_g-way TP, world / tp_g replicas): each rank
all-gathers the shards of its tp / tp_g neighbouring training TP ranks ("reshard" traffic, (tp/tp_g - 1)
x its local bytes; tp_g = 1: the whole actor on every rank, no per-token communication), each
generation replica samples its own slice of the rollout, and the copy is dropped before scoring.

The pure math lives in ``engine.rlhf.core``. Not here yet: resharding across pipeline stages and
offloading idle models.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

import kernels
from engine.config import GLMConfig
from engine.model.generation import SamplingParams, generate
from engine.parallel import ParallelDims, ParallelLayout, comm
from engine.rlhf.core import (RunningMoments, adaptive_kl_coef, gae_advantages, kl_estimate, masked_mean, masked_whiten,
                              reference_baseline, reward_spread_filter, shape_rewards)
from engine.rlhf.objectives import PolicyObjective, ValueObjective
from engine.train.lr import LRConfig, LRSchedule
from engine.train.objectives import IGNORE_INDEX, LanguageModelObjective, record_vocab_parallel_loss
from engine.train.step import OptimizerConfig, TrainConfig, Trainer, build_optimizer

KL_KINDS = ("k1", "k2", "k3")
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
    samples on the training layout; a smaller tp_g reshards the actor for the rollout (an all-gather over
    tp / tp_g neighbouring training TP ranks, freed after sampling) so world / tp_g replicas each sample
    a slice of the rollout with tp_g-way per-token communication (none at tp_g = 1). The trade: (tp/tp_g
    - 1) x the local actor bytes received per iteration and a tp/tp_g times larger actor copy during
    generation, for fewer per-token collectives and more sampling replicas."""
    ppo_epochs: int = 1
    """Passes over each rollout."""
    mini_batch_size: int = 8
    """Sequences per optimizer step (global); divides rollout_prompts * samples_per_prompt."""
    micro_batch_size: int = 2
    """Sequences per forward/backward on one rank."""
    clip_eps: float = 0.2
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
    gamma: float = 1.0
    lam: float = 0.95
    reference_baseline: bool = True
    """Score relative to the reference model's greedy response to the same prompt (ChatGLM-RLHF)."""
    min_reward_spread: float = 0.0
    """Drop prompts whose k responses' scores span less than this (0: keep all; needs k >= 2)."""
    whiten_advantages: bool = True
    normalize_scores: bool = False
    """Divide the (baseline-adjusted) scores by their running std over all rollouts so far
    (``core.RunningMoments``), so the KL coefficient keeps its meaning whatever the reward model's
    scale."""
    score_clip: float = 0.0
    """Clip the (normalised) scores to [-score_clip, score_clip] (0: off)."""
    ptx_coef: float = 0.0
    """PPO-ptx: weight of the language-model loss on SFT data in the actor's step (0: off)."""
    seed: int = 1234

    @property
    def rollout_rows(self) -> int:
        return self.rollout_prompts * self.samples_per_prompt

    def validate(self, dp: int, tp: int = 1) -> "PPOConfig":
        """ValueError naming every problem, for a training layout of ``dp`` x ``tp`` ranks."""
        problems = []
        ints = ("iterations", "rollout_prompts", "samples_per_prompt", "max_prompt_length", "max_new_tokens",
                "ppo_epochs", "mini_batch_size", "micro_batch_size")
        for name in ints:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                problems.append(f"{name}={value!r} must be a positive integer")
        if self.generation_tp is not None and not (isinstance(self.generation_tp, int) and self.generation_tp >= 1):
            problems.append(f"generation_tp={self.generation_tp!r} must be None or a positive divisor of the "
                            "training tp")
        elif self.generation_tp is not None and tp % self.generation_tp:
            problems.append(f"generation_tp={self.generation_tp} must divide the training tp={tp} (the generation "
                            "layout regroups the training TP shards)")
        if not problems:
            replicas = dp * tp // self.generation_tp if self.generation_tp else dp  # a multiple of dp
            if self.rollout_rows % replicas:
                who = (f"dp={dp}" if replicas == dp else
                       f"the {replicas} sampling replicas of generation_tp={self.generation_tp} (world / generation_tp)")
                problems.append(f"rollout_prompts x samples_per_prompt = {self.rollout_rows} must be divisible by "
                                f"{who}: each samples an equal slice")
            if self.rollout_rows % self.mini_batch_size:
                problems.append(f"mini_batch_size={self.mini_batch_size} must divide rollout_prompts x "
                                f"samples_per_prompt = {self.rollout_rows}")
            if self.mini_batch_size % (self.micro_batch_size * dp):
                problems.append(f"mini_batch_size={self.mini_batch_size} must be divisible by micro_batch_size="
                                f"{self.micro_batch_size} x dp={dp}")
        if self.kl_kind not in KL_KINDS:
            problems.append(f"kl_kind={self.kl_kind!r} must be one of {KL_KINDS}")
        for name in ("kl_coef", "kl_target", "ptx_coef", "min_reward_spread", "score_clip"):
            if not getattr(self, name) >= 0:
                problems.append(f"{name}={getattr(self, name)} must be >= 0")
        if not (isinstance(self.kl_horizon, int) and self.kl_horizon >= 1):
            problems.append(f"kl_horizon={self.kl_horizon!r} must be a positive integer (samples)")
        if self.kl_target > 0 and not self.kl_coef > 0:
            problems.append(f"kl_target={self.kl_target} adapts kl_coef multiplicatively: it needs kl_coef > 0, "
                            f"got {self.kl_coef}")
        if self.min_reward_spread > 0 and self.samples_per_prompt < 2:
            problems.append("min_reward_spread compares a prompt's responses: it needs samples_per_prompt >= 2")
        if not (self.temperature > 0 and 0 < self.top_p <= 1 and self.top_k >= 0):
            problems.append(f"temperature={self.temperature} must be > 0, top_p={self.top_p} in (0, 1], "
                            f"top_k={self.top_k} >= 0")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1 and self.clip_eps > 0 and self.value_clip_eps > 0):
            problems.append(f"gamma={self.gamma} and lam={self.lam} must be in [0, 1], clip_eps={self.clip_eps} "
                            f"and value_clip_eps={self.value_clip_eps} > 0")
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
    ``baselines`` ``[R]`` (fp32); ``prompt_index`` ``[R]`` into the prompt list."""

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


class PPOLoop:
    """PPO on one TP x DP layout (pp = 1). ``actor``/``critic``: trainable ``GLMForCausalLM`` /
    ``GLMForScalarHead`` built for ``layout`` (``pipeline.build_model_chunks(...)[0]``); ``reference``
    and ``reward``: frozen models of the same classes. ``prompts``: token-id lists (chat prompts ending
    in the assistant tag). ``ptx_batches(step) -> {"input_ids", "labels"} [mini_batch_size, P + T]``
    (SFT data; needed when ``ptx_coef > 0``). ``eos_ids``/``pad_id``: the tokenizer's stop and pad
    tokens."""

    def __init__(self, config: PPOConfig, model_config: GLMConfig, layout, actor, critic, reference, reward,
                 prompts: Sequence[Sequence[int]], eos_ids: Sequence[int], pad_id: int,
                 actor_optim: OptimizerConfig = OptimizerConfig(), critic_optim: OptimizerConfig = OptimizerConfig(),
                 actor_lr: Optional[LRConfig] = None, critic_lr: Optional[LRConfig] = None,
                 ptx_batches: Optional[Callable[[int], dict]] = None):
        if layout.pp_size != 1:
            raise ValueError(f"PPOLoop runs on a TP x DP layout; got pp={layout.pp_size} (generation needs every "
                             "layer on the rank)")
        self.config = config.validate(layout.dp_size, layout.tp_size)
        tp_g = layout.tp_size if config.generation_tp is None else config.generation_tp
        self.reshard = tp_g < layout.tp_size
        if self.reshard:
            validate_generation_dims(tp_g, layout.world_size, model_config)
        # built once (creating process groups is collective and slow); ranks regrouped for the fewest bytes
        self.generation_layout = ParallelLayout.for_generation(layout, tp_g) if self.reshard else layout
        actor_lr, critic_lr = actor_lr or PPO_LR, critic_lr or PPO_LR
        if config.ptx_coef > 0 and ptx_batches is None:
            raise ValueError("ptx_coef > 0 needs ptx_batches (SFT data for the PPO-ptx loss)")
        self.model_config, self.layout = model_config, layout
        self.actor, self.critic, self.reference, self.reward = actor, critic, reference, reward
        for frozen in (reference, reward):
            frozen.eval()
            for p in frozen.parameters():
                p.requires_grad_(False)
        self.prompts = [list(p) for p in prompts if len(p) <= config.max_prompt_length]
        self.dropped_prompts = len(prompts) - len(self.prompts)
        if len(self.prompts) < config.rollout_prompts:
            raise ValueError(f"{len(self.prompts)} prompts fit max_prompt_length={config.max_prompt_length} "
                             f"({self.dropped_prompts} longer ones left out), fewer than rollout_prompts="
                             f"{config.rollout_prompts}")
        self.eos_ids, self.pad_id = list(eos_ids), int(pad_id)
        self.ptx_batches = ptx_batches
        self.seq_length = config.max_prompt_length + config.max_new_tokens
        steps = config.iterations * config.ppo_epochs * (config.rollout_rows // config.mini_batch_size)
        train = TrainConfig(global_batch_size=config.mini_batch_size, micro_batch_size=config.micro_batch_size,
                            seq_length=self.seq_length, train_steps=steps, seed=config.seed)
        self.actor_trainer = Trainer([actor], build_optimizer([actor], layout, actor_optim, actor_lr.lr), layout,
                                     model_config, train, LRSchedule(actor_lr, steps),
                                     PolicyObjective(config.clip_eps, config.temperature))
        self.critic_trainer = Trainer([critic], build_optimizer([critic], layout, critic_optim, critic_lr.lr), layout,
                                      model_config, train, LRSchedule(critic_lr, steps), ValueObjective(config.value_clip_eps))
        self.device = next(actor.parameters()).device
        self.iterations_done = 0
        self._baseline_cache: dict[int, float] = {}
        self.score_moments = RunningMoments()  # of the adjusted scores of kept rows (normalize_scores)
        self.kl_coef = float(config.kl_coef)  # adapted after every rollout when kl_target > 0

    # ---- rollout ------------------------------------------------------------------------------
    def prompt_indices(self, iteration: int) -> torch.Tensor:
        """The ``rollout_prompts`` prompts of an iteration: consecutive slices of a seeded permutation,
        reshuffled per epoch over the prompt list."""
        c, n = self.config, len(self.prompts)
        out = []
        start = iteration * c.rollout_prompts
        orders: dict[int, np.ndarray] = {}  # one permutation per epoch the slice touches
        for i in range(start, start + c.rollout_prompts):
            epoch, j = divmod(i, n)
            if epoch not in orders:
                orders[epoch] = np.random.default_rng([c.seed, epoch]).permutation(n)
            out.append(int(orders[epoch][j]))
        return torch.tensor(out, dtype=torch.long)

    def _token_logprobs(self, model, sequences, mask, responses) -> torch.Tensor:
        """Log-probs ``[r, T]`` of the response tokens under ``logits / temperature`` (vocab-parallel)."""
        P = self.config.max_prompt_length
        logits = model(sequences, mask)[:, P - 1:-1]
        if self.config.temperature != 1.0:
            logits = logits / self.config.temperature
        group = None
        if self.layout.tp_size > 1:
            group = self.layout.tp_group
            record_vocab_parallel_loss(self.layout, responses.numel())
        return kernels.token_logprobs(logits, responses, group=group, backend=model.spec.kernels.cross_entropy)

    def _baselines(self, prompt_index: torch.Tensor) -> torch.Tensor:
        """r(x, y_ref) per row: the reward model's score of the reference model's greedy response to the
        row's prompt, computed once per prompt (cached)."""
        c = self.config
        todo = sorted({int(i) for i in prompt_index.tolist()} - set(self._baseline_cache))
        if todo:
            ids, mask = left_pad_prompts([self.prompts[i] for i in todo], c.max_prompt_length, self.pad_id)
            out = generate(self.reference, ids.to(self.device), mask.to(self.device),
                           SamplingParams(max_new_tokens=c.max_new_tokens, eos_token_id=self.eos_ids,
                                          pad_token_id=self.pad_id))
            resp, resp_mask = self._pad_response(out.response_ids, out.response_mask)
            seq, seq_mask = torch.cat([out.prompt_ids, resp], 1), torch.cat([out.prompt_mask.long(), resp_mask], 1)
            scores = self.reward.reward(seq, seq_mask).float().cpu()
            self._baseline_cache.update({i: float(s) for i, s in zip(todo, scores)})
        return torch.tensor([self._baseline_cache[int(i)] for i in prompt_index.tolist()], dtype=torch.float32)

    def _sample(self, model, ids: torch.Tensor, mask: torch.Tensor, seed: int):
        c = self.config
        return generate(model, ids.to(self.device), mask.to(self.device),
                        SamplingParams(max_new_tokens=c.max_new_tokens, do_sample=True, temperature=c.temperature,
                                       top_k=c.top_k, top_p=c.top_p, eos_token_id=self.eos_ids,
                                       pad_token_id=self.pad_id, seed=seed))

    def generation_model(self):
        """The actor resharded to the generation layout: a ``GLMForCausalLM`` with tp_g-way tensor
        parallelism (a plain whole model at tp_g = 1) built from ``sharding.reshard_tp`` of the training
        shards ("reshard" traffic in the layout's ledger). The caller drops it after sampling."""
        from engine.model.glm import GLMForCausalLM
        from engine.model.spec import ModelSpec
        from engine.parallel.sharding import reshard_tp
        from engine.parallel.tensor_parallel import tensor_parallel_spec
        gen = self.generation_layout
        state = reshard_tp(self.actor, self.model_config, self.layout, gen)
        kernel_plan = self.actor.spec.kernels
        spec = (ModelSpec(kernels=kernel_plan) if gen.tp_size == 1
                else tensor_parallel_spec(self.model_config, gen, kernels=kernel_plan))
        # Parameters on the meta device, then the resharded tensors assigned as they are (their device
        # and dtype): one copy of the generation shard, no allocation or init of a throwaway model.
        # Replicated tensors (norms) stay shared with the actor; the copy is only read.
        with torch.device("meta"):
            model = GLMForCausalLM(self.model_config, spec, init=False)
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval().requires_grad_(False)

    def _generate_resharded(self, rows: torch.Tensor, iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample on the generation layout: generation replica g of G = world / tp_g samples rows
        ``[g R/G, (g+1) R/G)`` of the global ``rows`` (seed per (iteration, g), shared by its TP ranks).
        The f = tp / tp_g replicas (d f + o, o < f) split training DP replica d's rows and are exactly
        this rank's training TP subgroup of size f, in order, so an all-gather over it ("rollout"
        traffic) returns the ``[R / dp, T]`` responses and masks of this rank's training replica."""
        c, gen = self.config, self.generation_layout
        model = self.generation_model()
        per = c.rollout_rows // gen.dp_size
        slice_ = rows[gen.dp_rank * per:(gen.dp_rank + 1) * per]
        ids, pmask = left_pad_prompts([self.prompts[int(i)] for i in slice_], c.max_prompt_length, self.pad_id)
        seed = int(np.random.default_rng([c.seed, iteration, gen.dp_rank, 1]).integers(2**62))
        out = self._sample(model, ids, pmask, seed)
        del model  # the resharded copy lives only while sampling
        responses, mask = self._pad_response(out.response_ids, out.response_mask)
        siblings, _ = self.layout.tp_subgroup(self.layout.tp_size // gen.tp_size)
        return (comm.all_gather(responses.contiguous(), 0, siblings, self.layout.ledger, "rollout"),
                comm.all_gather(mask.contiguous(), 0, siblings, self.layout.ledger, "rollout"))

    def _pad_response(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.config.max_new_tokens
        pad = t - ids.shape[1]
        return (torch.nn.functional.pad(ids, (0, pad), value=self.pad_id),
                torch.nn.functional.pad(mask.long(), (0, pad), value=0))

    @torch.no_grad()
    def rollout(self, iteration: int) -> tuple[Rollout, dict]:
        """Sample, score and all-gather the global rollout of ``iteration``; returns it and phase times."""
        c, layout = self.config, self.layout
        t0 = time.perf_counter()
        rows = self.prompt_indices(iteration).repeat_interleave(c.samples_per_prompt)
        per_rank = c.rollout_rows // layout.dp_size
        mine = rows[layout.dp_rank * per_rank:(layout.dp_rank + 1) * per_rank]
        ids, pmask = left_pad_prompts([self.prompts[int(i)] for i in mine], c.max_prompt_length, self.pad_id)
        if self.reshard:  # sampled on the generation layout, returned for this DP replica's rows
            responses, response_mask = self._generate_resharded(rows, iteration)
        else:
            # one seed per (iteration, DP replica): the TP ranks of a replica draw the same tokens
            seed = int(np.random.default_rng([c.seed, iteration, layout.dp_rank]).integers(2**62))
            out = self._sample(self.actor, ids, pmask, seed)
            responses, response_mask = self._pad_response(out.response_ids, out.response_mask)
        prompt_ids, prompt_mask = ids.to(self.device), pmask.to(self.device)
        sequences = torch.cat([prompt_ids, responses], 1)
        attention = torch.cat([prompt_mask, response_mask], 1)
        t1 = time.perf_counter()

        for model in (self.actor, self.critic):
            model.eval()
        logprobs = self._token_logprobs(self.actor, sequences, attention, responses)
        ref_logprobs = self._token_logprobs(self.reference, sequences, attention, responses)
        values = self.critic(sequences, attention)[:, c.max_prompt_length - 1:-1].float()
        scores = self.reward.reward(sequences, attention).float()
        for model in (self.actor, self.critic):
            model.train()
        baselines = (self._baselines(mine) if c.reference_baseline else torch.zeros(len(mine))).to(self.device)
        t2 = time.perf_counter()

        def gather(t: torch.Tensor) -> torch.Tensor:
            return comm.all_gather(t.contiguous(), 0, layout.dp_group, layout.ledger, "rollout")

        rollout = Rollout(gather(sequences), gather(attention), gather(responses), gather(response_mask),
                          gather(logprobs.float()), gather(ref_logprobs.float()), gather(values), gather(scores),
                          gather(baselines), rows)
        return rollout, {"generate_s": t1 - t0, "score_s": t2 - t1, "gather_s": time.perf_counter() - t2}

    # ---- advantages ---------------------------------------------------------------------------
    def advantages(self, r: Rollout) -> tuple[dict, dict]:
        """Filter, shape rewards, GAE and whiten: the aligned ``[R, S]`` tensors of the PPO update, and
        rollout statistics. The same on every rank (pure functions of the global rollout)."""
        c = self.config
        adjusted = reference_baseline(r.scores, r.baselines) if c.reference_baseline else r.scores
        keep = torch.ones(c.rollout_rows, dtype=torch.bool, device=r.scores.device)
        if c.min_reward_spread > 0:
            spread_ok = reward_spread_filter(r.scores.view(c.rollout_prompts, c.samples_per_prompt),
                                             c.min_reward_spread)
            keep = spread_ok.repeat_interleave(c.samples_per_prompt)
        mask = r.response_mask.bool() & keep[:, None]
        if c.normalize_scores and keep.any():
            self.score_moments.update(adjusted[keep])  # the global rollout: the same on every rank
            adjusted = adjusted / self.score_moments.std
        if c.score_clip > 0:
            adjusted = adjusted.clamp(-c.score_clip, c.score_clip)
        rewards, kl = shape_rewards(adjusted, r.logprobs, r.ref_logprobs, mask, self.kl_coef, c.kl_kind)
        adv, returns = gae_advantages(rewards, r.values, mask, c.gamma, c.lam)
        if c.whiten_advantages and int(mask.sum()) >= 2:  # whitening needs a variance
            adv = masked_whiten(adv, mask)
        P = c.max_prompt_length
        labels = align(torch.where(mask, r.responses, torch.full_like(r.responses, IGNORE_INDEX)), P, IGNORE_INDEX)
        batch = {"input_ids": r.sequences, "attention_mask": r.attention_mask, "labels": labels,
                 "old_logprobs": align(r.logprobs * mask, P, 0.0), "advantages": align(adv, P, 0.0),
                 "old_values": align(r.values * mask, P, 0.0), "returns": align(returns, P, 0.0)}
        all_tokens = r.response_mask.bool()
        seq_kl = (kl_estimate(r.logprobs, r.ref_logprobs, "k1") * all_tokens).sum(1)  # KL of each response
        stats = {"reward": r.scores.mean().item(), "reward_vs_reference": (r.scores - r.baselines).mean().item(),
                 "reference_reward": r.baselines.mean().item(), "kl": seq_kl.mean().item(),
                 "response_length": all_tokens.sum(1).float().mean().item(),
                 "kept_fraction": keep.float().mean().item(), "kl_coef": self.kl_coef,
                 "value_mean": masked_mean(r.values, all_tokens).item() if all_tokens.any() else 0.0}
        return batch, stats

    # ---- update -------------------------------------------------------------------------------
    def update(self, batch: dict, iteration: int) -> dict:
        """``ppo_epochs`` passes of actor and critic steps over seeded mini-batches of the rollout."""
        c = self.config
        G, R = c.mini_batch_size, c.rollout_rows
        sums: dict[str, float] = {}
        steps = skipped = 0
        for epoch in range(c.ppo_epochs):
            order = torch.from_numpy(np.random.default_rng([c.seed, iteration, epoch, 7]).permutation(R))
            for i in range(0, R, G):
                rows = order[i:i + G]
                mb = {k: v[rows] for k, v in batch.items()}
                if not (mb["labels"] != IGNORE_INDEX).any():
                    skipped += 1  # every row filtered out or empty: nothing to learn from
                    continue
                extra = ()
                if c.ptx_coef > 0:
                    extra = ((LanguageModelObjective(), self.ptx_batches(self.actor_trainer.steps_done), c.ptx_coef),)
                actor = self.actor_trainer.train_step(mb, extra=extra)
                critic = self.critic_trainer.train_step(mb)
                record = {"policy_loss": actor.loss, "value_loss": critic.loss, "actor_grad_norm": actor.grad_norm,
                          "critic_grad_norm": critic.grad_norm, **actor.stats, **critic.stats}
                for k, v in record.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                steps += 1
        out = {k: v / steps for k, v in sums.items()} if steps else {}
        out.update(ppo_steps=steps, skipped_minibatches=skipped, actor_lr=float(self.actor_trainer.lr(
            max(0, self.actor_trainer.steps_done - 1))))
        if "lm_loss" in out:
            out["ptx_loss"] = out.pop("lm_loss")
        return out

    # ---- checkpoints --------------------------------------------------------------------------
    def save(self, directory, keep_last: Optional[int] = None, tokenizer_fingerprint: Optional[str] = None) -> None:
        """``DIR/actor`` and ``DIR/critic`` checkpoints (``engine.train.checkpoint``, collective) at step =
        iterations done; the baseline caches of all DP replicas are merged into the actor's extra state."""
        from pathlib import Path

        from engine.train.checkpoint import save_checkpoint
        caches = [self._baseline_cache]
        if torch.distributed.is_initialized() and self.layout.world_size > 1:
            caches = [None] * self.layout.world_size
            torch.distributed.all_gather_object(caches, self._baseline_cache)
        merged = {str(k): v for cache in caches for k, v in sorted(cache.items())}
        merged = dict(sorted(merged.items(), key=lambda kv: int(kv[0])))  # the same JSON on every rank
        for name, model, trainer in (("actor", self.actor, self.actor_trainer),
                                     ("critic", self.critic, self.critic_trainer)):
            extra = {"mode": f"ppo_{name}", "iteration": self.iterations_done, "trainer_steps": trainer.steps_done}
            if name == "actor":
                extra["reference_baselines"] = merged
                extra["score_moments"] = self.score_moments.state_dict()
                extra["kl_coef"] = self.kl_coef
            save_checkpoint(Path(directory) / name, self.iterations_done, [model], trainer.optimizer, self.layout,
                            self.model_config, extra_state=extra, keep_last=keep_last,
                            tokenizer_fingerprint=tokenizer_fingerprint)

    def load(self, directory, tokenizer_fingerprint: Optional[str] = None) -> None:
        """Resume from ``save(DIR)``: weights, optimizer states, iteration, LR-schedule position and the
        reference-baseline cache (the layout may differ from the saving run's)."""
        from pathlib import Path

        from engine.train.checkpoint import CheckpointError, load_checkpoint
        states = {}
        for name, model, trainer in (("actor", self.actor, self.actor_trainer),
                                     ("critic", self.critic, self.critic_trainer)):
            extra = load_checkpoint(Path(directory) / name, [model], trainer.optimizer, self.layout,
                                    self.model_config, tokenizer_fingerprint=tokenizer_fingerprint)
            if extra.get("mode") != f"ppo_{name}":
                raise CheckpointError(f"{Path(directory) / name} holds a {extra.get('mode')!r} checkpoint, not a "
                                      f"PPO {name}")
            trainer.steps_done = int(extra["trainer_steps"])
            states[name] = extra
        if states["actor"]["iteration"] != states["critic"]["iteration"]:
            raise CheckpointError(f"{directory}: actor at iteration {states['actor']['iteration']}, critic at "
                                  f"{states['critic']['iteration']}: not one save")
        self.iterations_done = int(states["actor"]["iteration"])
        self._baseline_cache = {int(k): float(v) for k, v in states["actor"]["reference_baselines"].items()}
        self.score_moments.load_state_dict(states["actor"]["score_moments"])
        # The adapted coefficient is run state, resumed with the run; a fixed one is configuration, so the
        # resuming run's value holds (also for checkpoints written before the controller existed).
        if self.config.kl_target > 0 and "kl_coef" in states["actor"]:
            self.kl_coef = float(states["actor"]["kl_coef"])

    def iteration(self) -> dict:
        """One rollout + update; returns the iteration's metrics (the same on every rank)."""
        t0 = time.perf_counter()
        it = self.iterations_done
        rollout, times = self.rollout(it)
        batch, stats = self.advantages(rollout)
        c = self.config
        if c.kl_target > 0:  # the next rollout's coefficient (the same on every rank: global rollout)
            self.kl_coef = adaptive_kl_coef(self.kl_coef, stats["kl"], c.kl_target, c.kl_horizon, c.rollout_rows)
        t1 = time.perf_counter()
        stats.update(self.update(batch, it))
        stats.update(times, train_s=time.perf_counter() - t1, seconds=time.perf_counter() - t0, step=it)
        self.iterations_done += 1
        return stats


__all__ = ["PPOConfig", "PPOLoop", "Rollout", "align", "left_pad_prompts"]
