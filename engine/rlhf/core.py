"""PPO math of the ChatGLM-RLHF recipe (arXiv 2404.00934) as pure torch functions.

No process groups and no model code: every function takes tensors and returns tensors, so the whole
file is tested on CPU against fp64 references. Distributed callers reduce the ``reduction="sum"``
results (and the count of masked tokens) over micro-batches and ranks themselves.

Conventions (shape legend: b = responses in the batch, t = padded response length, p = prompts,
k = sampled responses per prompt):
    responses are RIGHT-padded ``[b, t]``; ``mask [b, t]`` is 1 on real response tokens, a
    contiguous prefix of each row (a row may have 0 tokens). Masks may be bool or 0/1 int/float;
    anything else raises ValueError.
    Math is fp32: inputs are cast to fp32 (bf16/fp16 upcast; fp64 is computed in fp32 too, so the
    dtype of every result is predictable) and results are fp32.
    Values outside the mask never reach a result or a gradient: they are replaced by 0 with
    ``torch.where`` BEFORE any arithmetic, so padding garbage (even inf/nan) cannot produce
    ``0 * inf = nan`` in the forward or the backward.
    Bad input raises ValueError naming the tensor and its shape. Checks that read tensor values (0/1
    masks, prefix masks, element counts) synchronise with the device once per call; these
    functions run once per micro-batch, not per layer, so the cost is negligible.

    masked_sum / masked_mean / masked_var / masked_whiten   reductions over real tokens
    kl_estimate                 k1 / k2 / k3 per-token estimators of KL(pi || pi_ref)
    kl_penalty                  their masked reduction, differentiable: a KL term in the policy loss
    shape_rewards               -kl_coef * KL per token + the sequence score at the last token
    adaptive_kl_coef            the KL coefficient's proportional controller toward a target KL
    gae_advantages              generalized advantage estimation and returns
    ppo_policy_loss, value_loss clipped PPO surrogate (asymmetric and dual clipping; GSPO's sequence ratio,
                                CISPO's clipped importance weight) and clipped value loss
    sequence_mean               each token's mean over its sequence (GSPO's sequence log-ratio)
    truncated_importance_weights  pi_train / pi_sampler per token, capped (TIS: sampler/trainer mismatch)
    loss_token_weights          per-token weights giving the sequence-level loss aggregations
    reference_baseline          r(x, y) - r(x, y_ref)            (ChatGLM-RLHF)
    reward_spread_filter        drop prompts whose k rewards are alike (ChatGLM-RLHF)
    overlong_penalty            DAPO's soft punishment of responses that run into the length limit
    group_advantages            critic-free advantages relative to the prompt's k responses (GRPO, RLOO)
    RunningMoments              running reward mean/std, mergeable across ranks
"""
from __future__ import annotations

import math
import numbers

import torch

KL_KINDS = ("k1", "k2", "k3")
REDUCTIONS = ("mean", "sum")
POLICY_LOSSES = ("ppo", "gspo", "cispo")
IS_LEVELS = ("token", "sequence", "geometric")
IS_MODES = ("truncate", "mask")
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
SPREAD_STATISTICS = ("range", "std")
GROUP_ESTIMATORS = ("grpo", "rloo")


# ---- validation helpers ---------------------------------------------------------------------------

def _shape(x: torch.Tensor) -> tuple:
    return tuple(x.shape)


def _check_dim(name: str, x: torch.Tensor, dim: int, legend: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor {legend}, got {type(x).__name__}")
    if x.dim() != dim:
        raise ValueError(f"{name} must be {legend} ({dim}-D), got shape {_shape(x)}")


def _check_same_shape(ref_name: str, ref: torch.Tensor, **others: torch.Tensor) -> None:
    for name, x in others.items():
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor shaped like {ref_name} {_shape(ref)}, "
                             f"got {type(x).__name__}")
        if x.shape != ref.shape:
            raise ValueError(f"{name} has shape {_shape(x)} but {ref_name} has shape {_shape(ref)}; "
                             "they must match")


def _bool_mask(mask: torch.Tensor, like: torch.Tensor, like_name: str, name: str = "mask") -> torch.Tensor:
    """Validate ``mask`` against ``like`` and return it as bool. Accepts bool, or int/float holding
    only 0 and 1: a fractional "mask" would be a weighting, which these functions do not define."""
    if not isinstance(like, torch.Tensor):
        raise ValueError(f"{like_name} must be a torch.Tensor, got {type(like).__name__}")
    _check_same_shape(like_name, like, **{name: mask})
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name} {_shape(mask)} of dtype {mask.dtype} must be bool or hold only 0 and 1")
    return mask != 0


def _check_prefix(mask: torch.Tensor, name: str = "mask") -> None:
    """GAE and the score position read "the last real token" as ``length - 1``: that is only right
    when each row's real tokens are a contiguous prefix (right padding)."""
    if mask.shape[-1] > 1 and bool((mask[:, 1:] & ~mask[:, :-1]).any()):
        raise ValueError(f"{name} {_shape(mask)} must be a contiguous prefix of each row (right-padded "
                         "responses): a 0 is followed by a 1 in some row")


def _finite_number(name: str, value) -> float:
    """A python float from a real number or a 1-element tensor; ValueError naming ``name`` otherwise."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a 1-element tensor, got shape {_shape(value)}")
        value = value.item()
    # numbers.Real also admits numpy scalars (e.g. a coefficient read from a numpy schedule)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _check_clip_eps(name: str, eps) -> float:
    eps = _finite_number(name, eps)
    if eps <= 0:
        raise ValueError(f"{name} must be > 0, got {eps}")
    return eps


def _masked_fp32(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """fp32 copy of x with 0 outside the mask (padding never enters arithmetic, see module doc)."""
    return torch.where(mask, x.float(), torch.zeros((), dtype=torch.float32, device=x.device))


def _reduce(per_token: torch.Tensor, mask: torch.Tensor, reduction: str,
            weights: torch.Tensor | None = None) -> torch.Tensor:
    """Masked mean or sum of ``per_token``, each token first scaled by ``weights`` (constants) when given."""
    if weights is not None:
        per_token = per_token * _masked_fp32(weights.detach(), mask)
    return masked_mean(per_token, mask) if reduction == "mean" else masked_sum(per_token, mask)


# ---- masked reductions ------------------------------------------------------------------------------

def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """Sum of ``x`` over the elements where ``mask`` is 1.

    x: any shape, any real dtype; mask: same shape, bool or 0/1. dim: None (all elements, 0-dim
    result) or the dim(s) reduced as in ``torch.sum``. Returns fp32."""
    m = _bool_mask(mask, x, "x")
    xm = _masked_fp32(x, m)
    return xm.sum() if dim is None else xm.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """Mean of ``x`` over the elements where ``mask`` is 1; 0 (not nan) where the mask is empty along
    ``dim`` (an empty response contributes nothing rather than poisoning a batch statistic).

    x: any shape; mask: same shape, bool or 0/1; dim as in :func:`masked_sum`. Returns fp32."""
    m = _bool_mask(mask, x, "x")
    xm = _masked_fp32(x, m)
    if dim is None:
        return xm.sum() / m.sum().clamp(min=1).float()
    # the sum is exactly 0 where the count is 0, so clamping the count gives 0 there
    return xm.sum(dim=dim) / m.sum(dim=dim).clamp(min=1).float()


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over ALL elements where ``mask`` is 1 (one global statistic, not per row).

    x: any shape; mask: same shape, bool or 0/1. ``unbiased`` divides by ``n - 1`` (Bessel), else by
    ``n``. Returns a 0-dim fp32 tensor. Raises ValueError when the mask selects no element (or a
    single one with ``unbiased``): the variance is undefined there, and a silent 0 or nan would
    turn whitening into a division by ~eps."""
    m = _bool_mask(mask, x, "x")
    n = int(m.sum())
    if n < (2 if unbiased else 1):
        raise ValueError(f"masked_var of x {_shape(x)} needs at least {2 if unbiased else 1} masked "
                         f"element(s) (unbiased={unbiased}), the mask selects {n}")
    mean = masked_mean(x, m)
    centered = torch.where(m, _masked_fp32(x, m) - mean, torch.zeros((), dtype=torch.float32, device=x.device))
    return centered.pow(2).sum() / (n - 1 if unbiased else n)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
                  ) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` with mean and (unbiased) variance over all masked elements;
    with ``shift_mean=False`` the mean is added back (only the scale changes). Zeros outside the mask.

    x: any shape (advantages ``[b, t]``); mask: same shape, bool or 0/1. Returns fp32, same shape.
    Statistics are local to this call: under data parallelism, whiten with global statistics by
    reducing masked_sum / counts across ranks in the caller."""
    m = _bool_mask(mask, x, "x")
    mean = masked_mean(x, m)
    var = masked_var(x, m, unbiased=True)
    # from the zero-filled copy: garbage on padding must not reach the backward of the scale either
    white = (_masked_fp32(x, m) - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        white = white + mean
    return torch.where(m, white, torch.zeros((), dtype=torch.float32, device=x.device))


# ---- KL and rewards ---------------------------------------------------------------------------------

def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of ``KL(pi || pi_ref)`` from tokens sampled from ``pi``
    (http://joschu.net/blog/kl-approx.html), with ``d = ref_logprobs - logprobs = log(pi_ref/pi)``:

        k1 = -d                       unbiased, high variance, can be negative per token
        k2 = 0.5 * d^2                biased (low for close policies), low variance, >= 0
        k3 = exp(d) - 1 - d           unbiased and >= 0 (Schulman's estimator)

    logprobs, ref_logprobs: ``[b, t]`` log-probabilities of the sampled tokens under pi and pi_ref.
    Returns ``[b, t]`` fp32 (no masking: pass the result through a masked reduction)."""
    _check_dim("logprobs", logprobs, 2, "[b, t]")
    _check_same_shape("logprobs", logprobs, ref_logprobs=ref_logprobs)
    if kind not in KL_KINDS:
        raise ValueError(f"kl kind must be one of {KL_KINDS}, got {kind!r}")
    d = ref_logprobs.float() - logprobs.float()
    if kind == "k1":
        return -d
    if kind == "k2":
        return 0.5 * d.pow(2)
    # expm1 keeps exp(d) - 1 accurate for the small d of close policies (plain exp cancels)
    return torch.expm1(d) - d


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, kind: str = "k3",
               reduction: str = "mean", weights: torch.Tensor | None = None) -> torch.Tensor:
    """``kl_estimate`` reduced over the real tokens, as a loss term: the gradient flows into ``logprobs``
    (the current policy; ``ref_logprobs`` are constants). GRPO puts this in the policy loss (k3) instead
    of a per-token penalty in the reward. ``d = ref_logprobs - logprobs`` is clamped to [-20, 20] first
    (as verl does): one token the reference finds e^20 times likelier cannot overflow k3 or its gradient
    (there the gradient is 0).

    logprobs, ref_logprobs, mask: ``[b, t]``; reduction "mean" (over masked tokens, 0 if none) or "sum";
    weights: optional ``[b, t]`` per-token weights (``loss_token_weights``). Returns a 0-dim fp32 tensor."""
    _check_dim("logprobs", logprobs, 2, "[b, t]")
    _check_same_shape("logprobs", logprobs, ref_logprobs=ref_logprobs)
    if weights is not None:
        _check_same_shape("logprobs", logprobs, weights=weights)
    m = _bool_mask(mask, logprobs, "logprobs")
    _check_reduction(reduction)
    logp = _masked_fp32(logprobs, m)
    ref = logp + (_masked_fp32(ref_logprobs.detach(), m) - logp).clamp(-20.0, 20.0)
    return _reduce(kl_estimate(logp, ref, kind), m, reduction, weights)


def shape_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float, kl_kind: str = "k1") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO rewards: ``-kl_coef * KL`` on every real token, plus the sequence score at each
    row's last real token (the reward model scores the whole response; the KL penalty keeps the
    policy near the reference token by token). Rows with no real token get nothing.

    scores: ``[b]`` sequence scores (e.g. :func:`reference_baseline` output); logprobs, ref_logprobs:
    ``[b, t]``; mask: ``[b, t]`` bool or 0/1, contiguous prefix per row; kl_coef >= 0.
    Returns ``(rewards [b, t], kl [b, t])``, fp32, zeros outside the mask, DETACHED: rewards are
    constants of the PPO update."""
    _check_dim("logprobs", logprobs, 2, "[b, t]")
    _check_dim("scores", scores, 1, "[b]")
    if scores.shape[0] != logprobs.shape[0]:
        raise ValueError(f"scores has shape {_shape(scores)} but logprobs has shape {_shape(logprobs)}: "
                         "need one score per row")
    _check_same_shape("logprobs", logprobs, ref_logprobs=ref_logprobs)
    m = _bool_mask(mask, logprobs, "logprobs")
    _check_prefix(m)
    kl_coef = _finite_number("kl_coef", kl_coef)
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    with torch.no_grad():
        kl = torch.where(m, kl_estimate(logprobs.detach(), ref_logprobs.detach(), kl_kind),
                         torch.zeros((), dtype=torch.float32, device=logprobs.device))
        rewards = -kl_coef * kl
        lengths = m.sum(dim=1)
        last = (lengths - 1).clamp(min=0)  # a clamped index of an empty row adds a 0 below
        score = torch.where(lengths > 0, scores.detach().float(),
                            torch.zeros((), dtype=torch.float32, device=scores.device))
        rewards.scatter_add_(1, last[:, None], score[:, None])
    return rewards, kl


def adaptive_kl_coef(kl_coef: float, observed_kl: float, target_kl: float, horizon: float,
                     n_samples: int, max_error: float = 0.2) -> float:
    """The next KL coefficient of the adaptive controller of Ziegler et al. 2019 ("Fine-Tuning Language
    Models from Human Preferences", sec. 2.2), used by InstructGPT-style PPO::

        error = clip(observed_kl / target_kl - 1, -max_error, max_error)
        kl_coef' = kl_coef * (1 + error * n_samples / horizon)

    A proportional controller on log(kl_coef): the coefficient grows while the policy's KL to the
    reference (``observed_kl``, per response, e.g. the rollout mean of summed per-token k1) is above
    ``target_kl`` and shrinks below it; ``horizon`` (in samples) sets how fast, and the clip keeps one
    noisy rollout from moving it by more than ``max_error * n_samples / horizon``. Python floats in
    and out (the rollout's mean KL is one number)."""
    kl_coef, observed_kl = _finite_number("kl_coef", kl_coef), _finite_number("observed_kl", observed_kl)
    target_kl, horizon = _finite_number("target_kl", target_kl), _finite_number("horizon", horizon)
    max_error = _finite_number("max_error", max_error)
    if kl_coef < 0 or target_kl <= 0 or horizon <= 0 or max_error <= 0:
        raise ValueError(f"adaptive_kl_coef needs kl_coef >= 0, target_kl > 0, horizon > 0 and max_error > 0; got "
                         f"kl_coef={kl_coef}, target_kl={target_kl}, horizon={horizon}, max_error={max_error}")
    if not isinstance(n_samples, numbers.Integral) or n_samples < 0:
        raise ValueError(f"n_samples must be a non-negative integer, got {n_samples!r}")
    error = min(max(observed_kl / target_kl - 1.0, -max_error), max_error)
    return kl_coef * (1.0 + error * n_samples / horizon)


def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                   lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over each row's real tokens:

        delta_t = r_t + gamma * V_{t+1} - V_t,    A_t = delta_t + gamma * lam * A_{t+1}

    with ``V`` and ``A`` after a row's last real token equal to 0 (the episode ends there: the
    response is complete, nothing is bootstrapped). ``returns = A + V`` (the value target).

    rewards, values: ``[b, t]``; mask: ``[b, t]`` bool or 0/1, contiguous prefix per row;
    0 <= gamma, lam <= 1. Returns ``(advantages [b, t], returns [b, t])``, fp32, zeros outside the
    mask, DETACHED (advantages and returns are constants of the PPO update; a graph here would
    leak gradient into the critic through its own target). Vectorised over b, a reverse loop over t."""
    _check_dim("rewards", rewards, 2, "[b, t]")
    _check_same_shape("rewards", rewards, values=values)
    m = _bool_mask(mask, rewards, "rewards")
    _check_prefix(m)
    gamma, lam = _finite_number("gamma", gamma), _finite_number("lam", lam)
    for name, v in (("gamma", gamma), ("lam", lam)):
        if not 0 <= v <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {v}")
    with torch.no_grad():
        r = _masked_fp32(rewards.detach(), m)
        v = _masked_fp32(values.detach(), m)
        advantages = torch.zeros_like(r)
        next_value = r.new_zeros(r.shape[0])  # [b]
        next_adv = r.new_zeros(r.shape[0])
        for t in reversed(range(r.shape[1])):
            # r, v are 0 on padding and padding only follows real tokens, so next_value/next_adv are 0
            # at each row's last real token: the terminal condition without a per-row length
            delta = r[:, t] + gamma * next_value - v[:, t]
            adv = torch.where(m[:, t], delta + gamma * lam * next_adv, torch.zeros_like(delta))
            advantages[:, t] = adv
            next_value, next_adv = v[:, t], adv
        returns = torch.where(m, advantages + v, torch.zeros_like(v))
    return advantages, returns


# ---- losses -----------------------------------------------------------------------------------------

def sequence_mean(x: torch.Tensor, mask: torch.Tensor, sequence_index: torch.Tensor | None = None,
                  num_sequences: int | None = None, all_reduce=None) -> torch.Tensor:
    """Each token's mean of ``x`` over the masked tokens of its sequence, broadcast back to the token:
    ``[b, t]`` fp32, detached, 0 outside the mask (and for a sequence with no masked token). GSPO's
    sequence log-ratio is ``sequence_mean(logprobs - old_logprobs, mask)``.

    x, mask: ``[b, t]``. sequence_index: optional ``[b, t]`` integer id in ``[0, num_sequences)`` of each
    token's sequence, read where the mask is set (default: the row, for rows that hold one sequence each;
    packed rows hold several). all_reduce: optional in-place sum of a ``[2, num_sequences]`` fp64 tensor
    (each sequence's token sum and count) over the processes that hold the other tokens of the same
    sequences, e.g. context-parallel ranks; without it this call must see every token of a sequence."""
    _check_dim("x", x, 2, "[b, t]")
    m = _bool_mask(mask, x, "x")
    if sequence_index is None:
        if num_sequences is not None:
            raise ValueError("num_sequences is the range of sequence_index; without sequence_index the rows are "
                             "the sequences")
        sequence_index, num_sequences = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(x), x.shape[0]
    else:
        _check_same_shape("x", x, sequence_index=sequence_index)
        if sequence_index.dtype.is_floating_point or sequence_index.dtype == torch.bool:
            raise ValueError(f"sequence_index must be an integer tensor, got {sequence_index.dtype}")
        if not isinstance(num_sequences, int) or isinstance(num_sequences, bool) or num_sequences < 1:
            raise ValueError(f"num_sequences must be a positive integer (the range of sequence_index), got "
                             f"{num_sequences!r}")
        ids = sequence_index[m]
        if ids.numel() and not bool(((ids >= 0) & (ids < num_sequences)).all()):
            raise ValueError(f"sequence_index holds ids outside [0, num_sequences={num_sequences}) on masked tokens "
                             f"(min {int(ids.min())}, max {int(ids.max())})")
    index = torch.where(m, sequence_index.long(), torch.zeros((), dtype=torch.long, device=x.device)).reshape(-1)
    totals = torch.zeros(2, num_sequences, dtype=torch.float64, device=x.device)  # fp64: long sequences, exact sums
    totals[0].index_add_(0, index, _masked_fp32(x.detach(), m).double().reshape(-1))
    totals[1].index_add_(0, index, m.double().reshape(-1))
    if all_reduce is not None:
        all_reduce(totals)
    means = (totals[0] / totals[1].clamp(min=1)).float()
    return torch.where(m, means[index].view_as(x), torch.zeros((), dtype=torch.float32, device=x.device))


def truncated_importance_weights(logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor,
                                 cap: float, level: str = "token", mode: str = "truncate"
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated importance sampling (TIS) weights ``min(ratio, cap)`` ``[b, t]`` (fp32, detached, 0 outside the
    mask), and which tokens the cap acted on ``[b, t]`` bool. ``mode="mask"`` (masked importance sampling)
    instead keeps the ratio inside ``[1 / cap, cap]`` and gives 0 to the tokens outside it, which then train
    nothing. ``level`` picks the ratio (rows are responses):

        token       exp(logprobs - sampler_logprobs) of each token
        sequence    the response's probability ratio, exp(sum over its tokens), on each of its tokens: the
                    unbiased correction of a response-level objective, with a variance that grows with length
        geometric   exp(mean over its tokens): the geometric mean of the token ratios (GSPO's per-response
                    ratio), on each of its tokens

    The rollout's tokens were drawn by a sampling copy of the actor (another layout, a KV cache, other
    kernels) whose probabilities ``sampler_logprobs`` differ from those of the training forward,
    ``logprobs``: the policy gradient then estimates the sampler's objective, not the trained policy's.
    Weighting each token's loss by the ratio corrects it; the cap bounds the variance a rare token with a
    tiny sampler probability would add (Yao et al. 2025, "Your efficient RL framework secretly brings you
    off-policy RL training"). logprobs, sampler_logprobs, mask: ``[b, t]``; cap: >= 1."""
    _check_dim("logprobs", logprobs, 2, "[b, t]")
    _check_same_shape("logprobs", logprobs, sampler_logprobs=sampler_logprobs)
    m = _bool_mask(mask, logprobs, "logprobs")
    cap = _finite_number("cap", cap)
    if cap < 1:
        raise ValueError(f"cap must be >= 1 (a cap below 1 would scale every token's loss down), got {cap}")
    if level not in IS_LEVELS:
        raise ValueError(f"importance sampling level must be one of {IS_LEVELS}, got {level!r}")
    if mode not in IS_MODES:
        raise ValueError(f"importance sampling mode must be one of {IS_MODES}, got {mode!r}")
    with torch.no_grad():
        log_ratio = _masked_fp32(logprobs, m) - _masked_fp32(sampler_logprobs, m)
        if level == "sequence":
            log_ratio = log_ratio.sum(1, keepdim=True).expand_as(log_ratio)
        elif level == "geometric":
            log_ratio = (log_ratio.sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1)).expand_as(log_ratio)
        # clamped like the policy ratio: a log-ratio above 20 is far past any cap (exp overflows fp32 past ~88)
        ratio = torch.exp(log_ratio.clamp(-20.0, 20.0))
        zero = torch.zeros((), dtype=torch.float32, device=ratio.device)
        if mode == "mask":
            outside = m & ((ratio > cap) | (ratio < 1.0 / cap))
            return torch.where(m & ~outside, ratio, zero), outside
        truncated = m & (ratio > cap)
        return torch.where(m, ratio.clamp(max=cap), zero), truncated


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip_eps: float = 0.2, reduction: str = "mean",
                    clip_eps_high: float | None = None, dual_clip: float = 0.0,
                    weights: torch.Tensor | None = None, mode: str = "ppo",
                    sequence_log_ratio: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy surrogate of the PPO family, per token (``mode``):

        ppo    ratio = exp(logprobs - old_logprobs)
               loss  = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A)
               loss  = min(loss, -c * A)   where A < 0, when dual_clip = c > 1
        gspo   as ppo, with ratio = exp(sg[s] + logprobs - sg[logprobs]): the value is the sequence's
               ratio exp(s), s = ``sequence_log_ratio`` (its mean token log-ratio, ``sequence_mean``), and
               the gradient flows through each token's own log-prob. GSPO-token (Zheng et al. 2025); with
               one advantage per sequence and the seq-mean-token-mean aggregation it is GSPO's sequence
               objective, clipped per sequence (the paper's clip range is tiny: 3e-4 / 4e-4).
        cispo  loss = -sg[clip(ratio, 1 - eps, 1 + eps_high)] * A * exp(logprobs - sg[logprobs]): the value is
               the truncated importance weight times -A and every token keeps the gradient -w A grad log p,
               however far its ratio moved (MiniMax-M1's CISPO; clipping the weight, not the update, keeps
               the rare tokens PPO's clip would silence). No dual clip.

    ``clip_eps_high`` (default ``clip_eps``): a larger upper bound lets unlikely tokens with positive
    advantage gain more per step (DAPO's clip-higher, against entropy collapse). ``dual_clip`` (0: off;
    else c > 1, usually 3): for negative advantages the loss is capped at ``-c * A``, so a token whose ratio
    has grown far above 1 cannot produce an unbounded step (Ye et al. 2020, dual-clip PPO; there the
    gradient is 0). ``weights``: optional ``[b, t]`` per-token weights of the loss (not of the stats;
    ``loss_token_weights``).

    logprobs: ``[b, t]`` under the current policy (carries the gradient); old_logprobs, advantages:
    ``[b, t]`` from the rollout, treated as constants (detached here); mask: ``[b, t]`` bool or 0/1
    (any pattern); sequence_log_ratio (gspo only, required there): ``[b, t]``, constant. reduction:
    "mean" = mean over all masked tokens of the batch (0 when there are none); "sum" = masked sum, so
    that a caller can divide by a global token count across micro-batches and ranks.

    Returns ``(loss, stats)``: loss a 0-dim fp32 tensor; stats detached 0-dim fp32 tensors reduced
    exactly like the loss (token means for "mean", token sums for "sum"; divide by the same count):
        clipfrac       ppo, gspo: tokens where the clipped term is strictly the active one (gradient 0);
                       cispo: tokens whose importance weight was truncated (they keep a gradient)
        dual_clipfrac  (dual_clip only) tokens where the cap -c A is strictly the active one (gradient 0)
        approx_kl      k3 estimate of KL(pi_old || pi) from the rollout samples, from each token's own
                       ratio r: r - 1 - log(r)
        ratio_mean     the ratio the loss used (gspo: the sequence's)"""
    _check_dim("logprobs", logprobs, 2, "[b, t]")
    _check_same_shape("logprobs", logprobs, old_logprobs=old_logprobs, advantages=advantages)
    if weights is not None:
        _check_same_shape("logprobs", logprobs, weights=weights)
    if mode not in POLICY_LOSSES:
        raise ValueError(f"policy loss mode must be one of {POLICY_LOSSES}, got {mode!r}")
    if (mode == "gspo") != (sequence_log_ratio is not None):
        raise ValueError("mode 'gspo' needs sequence_log_ratio (core.sequence_mean of the token log-ratios), and "
                         f"only gspo takes it (mode {mode!r}, sequence_log_ratio "
                         f"{'given' if sequence_log_ratio is not None else 'None'})")
    if sequence_log_ratio is not None:
        _check_same_shape("logprobs", logprobs, sequence_log_ratio=sequence_log_ratio)
    m = _bool_mask(mask, logprobs, "logprobs")
    clip_eps = _check_clip_eps("clip_eps", clip_eps)
    clip_high = clip_eps if clip_eps_high is None else _check_clip_eps("clip_eps_high", clip_eps_high)
    dual_clip = _finite_number("dual_clip", dual_clip)
    if dual_clip != 0 and dual_clip <= 1:
        raise ValueError(f"dual_clip must be 0 (off) or > 1 (the cap -c A of negative advantages), got {dual_clip}")
    if dual_clip != 0 and mode == "cispo":
        raise ValueError("dual_clip caps PPO's clipped surrogate; cispo already bounds every token's weight: use "
                         "dual_clip=0")
    _check_reduction(reduction)
    # clamped to [-20, 20] (as verl does): a ratio of e^20 is already far outside any clip range, and exp
    # of a larger one overflows to inf, whose backward is 0 * inf = nan even where the loss does not use it
    lp = _masked_fp32(logprobs, m)
    token_log_ratio = (lp - _masked_fp32(old_logprobs.detach(), m)).clamp(-20.0, 20.0)
    if mode == "gspo":  # value: the sequence's log-ratio; gradient: this token's log-prob
        log_ratio = (lp - lp.detach() + _masked_fp32(sequence_log_ratio.detach(), m)).clamp(-20.0, 20.0)
    else:
        log_ratio = token_log_ratio
    adv = _masked_fp32(advantages.detach(), m)
    ratio = torch.exp(log_ratio)
    stats = {}
    if mode == "cispo":
        weight = ratio.detach().clamp(1.0 - clip_eps, 1.0 + clip_high)
        per_token = -adv * weight * torch.exp(lp - lp.detach())  # exp(.) is 1 with gradient grad log p
        truncated = (weight != ratio.detach()).float()
    else:
        unclipped = -adv * ratio
        clipped = -adv * ratio.clamp(1.0 - clip_eps, 1.0 + clip_high)
        per_token = torch.maximum(unclipped, clipped)
        truncated = (clipped > unclipped).float()
    if dual_clip:
        cap = -adv * dual_clip
        capped = (adv < 0) & (per_token > cap)
        per_token = torch.where(capped, cap, per_token)
        stats["dual_clipfrac"] = _reduce(capped.float(), m, reduction).detach()
    loss = _reduce(per_token, m, reduction, weights)
    with torch.no_grad():
        stats.update(clipfrac=_reduce(truncated, m, reduction),
                     # pi_old sampled the tokens, so KL(pi_old || pi) is the k3 of (pi_old, pi):
                     # expm1(log_ratio) - log_ratio = ratio - 1 - log(ratio) >= 0
                     approx_kl=_reduce(kl_estimate(torch.zeros_like(token_log_ratio), token_log_ratio.detach(), "k3"),
                                       m, reduction),
                     ratio_mean=_reduce(ratio, m, reduction))
    return loss, stats


def loss_token_weights(mask: torch.Tensor, mode: str, max_length: int | None = None) -> torch.Tensor:
    """Per-token weights ``w [b, t]`` (fp32, 0 outside the mask) such that the token mean over the batch,
    ``sum(w * loss) / N``, is the loss aggregation ``mode`` of one global mini-batch. With ``N_i`` the
    masked tokens of row i, ``N = sum N_i`` and ``B`` the rows with ``N_i > 0``:

        token-mean                (1/N) sum_i sum_t loss        w = 1 (every token alike; DAPO)
        seq-mean-token-mean       (1/B) sum_i (1/N_i) sum_t     w = N / (B N_i) (each response alike; GRPO)
        seq-mean-token-sum        (1/B) sum_i sum_t             w = N / B
        seq-mean-token-sum-norm   (1/(B L)) sum_i sum_t         w = N / (B L), L = ``max_length`` (Dr. GRPO:
                                                                a constant in place of the length N_i)

    (verl's mode of the last name divides by L but not by B, per micro-batch: B times this one's scale.)

    Expressed as weights, a mode keeps the token-mean normalisation that a Trainer applies across
    micro-batches, data-parallel ranks and packed rows (each token carries its weight), and the stats
    stay token means. Compute them over the whole global mini-batch (``mask [b, t]``: its rows, any
    pattern), before it is split. An all-False mask gives all-zero weights."""
    _check_dim("mask", mask, 2, "[b, t]")
    m = _bool_mask(mask, mask, "mask")
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss aggregation mode must be one of {LOSS_AGG_MODES}, got {mode!r}")
    if mode == "seq-mean-token-sum-norm" and not (isinstance(max_length, int) and max_length >= 1):
        raise ValueError(f"seq-mean-token-sum-norm divides by a constant length: max_length must be a positive "
                         f"integer, got {max_length!r}")
    per_row = m.sum(1, keepdim=True).double()  # N_i
    n, rows = per_row.sum(), (per_row > 0).sum()
    if mode == "token-mean" or rows == 0:
        w = torch.ones_like(per_row)
    elif mode == "seq-mean-token-mean":
        w = n / (rows * per_row.clamp(min=1))
    elif mode == "seq-mean-token-sum":
        w = (n / rows).expand_as(per_row)
    else:
        w = (n / (rows * max_length)).expand_as(per_row)
    return torch.where(m, w.float().expand_as(m), torch.zeros((), dtype=torch.float32, device=m.device))


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_eps: float = 0.2, reduction: str = "mean") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss, per token:

        v_clip = old_v + clip(v - old_v, -eps, eps)
        loss   = 0.5 * max((v - R)^2, (v_clip - R)^2)

    (the critic may not move a value more than ``eps`` from its rollout value to lower its loss).
    values: ``[b, t]`` from the current critic (carries the gradient); old_values, returns: ``[b, t]``
    from the rollout, treated as constants (detached here); mask: ``[b, t]`` bool or 0/1.
    ``eps`` is in the units of the values. reduction as in :func:`ppo_policy_loss`.

    Returns ``(loss, stats)``: loss 0-dim fp32; stats detached 0-dim fp32, reduced like the loss:
        vf_clipfrac  tokens where the clipped term is strictly the larger one (their gradient is 0)"""
    _check_dim("values", values, 2, "[b, t]")
    _check_same_shape("values", values, old_values=old_values, returns=returns)
    m = _bool_mask(mask, values, "values")
    clip_eps = _check_clip_eps("clip_eps", clip_eps)
    _check_reduction(reduction)
    v = _masked_fp32(values, m)
    old_v = _masked_fp32(old_values.detach(), m)
    ret = _masked_fp32(returns.detach(), m)
    v_clip = old_v + (v - old_v).clamp(-clip_eps, clip_eps)
    unclipped = (v - ret).pow(2)
    clipped = (v_clip - ret).pow(2)
    loss = 0.5 * _reduce(torch.maximum(unclipped, clipped), m, reduction)
    with torch.no_grad():
        stats = {"vf_clipfrac": _reduce((clipped > unclipped).float(), m, reduction)}
    return loss, stats


# ---- ChatGLM-RLHF reward baseline and prompt filtering ------------------------------------------------

def reference_baseline(scores: torch.Tensor, ref_scores: torch.Tensor) -> torch.Tensor:
    """Reward relative to the reference (SFT) model: ``r(x, y) - r(x, y_ref)``, where ``y_ref`` is the
    reference model's response to the same prompt, scored once per prompt. Removes the prompt's
    own difficulty/verbosity from the reward (ChatGLM-RLHF, sec. on reward bias reduction).

    scores, ref_scores: ``[b]`` (repeat a prompt's ref score for each of its responses). Returns ``[b]`` fp32."""
    _check_dim("scores", scores, 1, "[b]")
    _check_same_shape("scores", scores, ref_scores=ref_scores)
    return scores.float() - ref_scores.float()


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment of a response of ``L`` tokens, to add to its score::

        0                                        L <= max_length - buffer
        -factor * (L - (max_length - buffer)) / buffer   within the last ``buffer`` tokens (reaching -factor)

    so answers that run into the length limit (and are likely cut off) lose reward gradually rather than
    all at once. lengths: ``[b]`` integer token counts (<= max_length); returns ``[b]`` fp32."""
    _check_dim("lengths", lengths, 1, "[b]")
    if not (isinstance(max_length, int) and isinstance(buffer, int) and 1 <= buffer <= max_length):
        raise ValueError(f"overlong buffer={buffer!r} must be an integer in [1, max_length={max_length!r}]")
    factor = _finite_number("factor", factor)
    if factor < 0:
        raise ValueError(f"factor must be >= 0, got {factor}")
    over = (lengths.float() - (max_length - buffer)) / buffer
    return -factor * over.clamp(0.0, 1.0)


def reward_spread_filter(rewards: torch.Tensor, min_spread: float, statistic: str = "range") -> torch.Tensor:
    """Keep prompts whose k sampled responses score differently enough to carry a learning signal
    (ChatGLM-RLHF drops prompts whose responses all score alike).

    rewards: ``[p, k]``, k >= 1 responses per prompt. statistic: "range" = max - min, "std" =
    population std (ddof 0, so k = 1 gives 0 like "range" does, never nan). min_spread >= 0; a prompt
    is kept when its spread >= min_spread (a nan reward drops its prompt). Returns bool ``[p]``."""
    _check_dim("rewards", rewards, 2, "[p, k]")
    if rewards.shape[1] < 1:
        raise ValueError(f"rewards {_shape(rewards)} must hold k >= 1 responses per prompt")
    if statistic not in SPREAD_STATISTICS:
        raise ValueError(f"statistic must be one of {SPREAD_STATISTICS}, got {statistic!r}")
    min_spread = _finite_number("min_spread", min_spread)
    if min_spread < 0:
        raise ValueError(f"min_spread must be >= 0, got {min_spread}")
    r = rewards.detach().float()
    if statistic == "range":
        spread = r.amax(dim=1) - r.amin(dim=1)
    else:
        spread = r.std(dim=1, unbiased=False)
    return spread >= min_spread


def group_advantages(scores: torch.Tensor, kind: str = "grpo", eps: float = 1e-6, normalize_std: bool = True
                     ) -> torch.Tensor:
    """Critic-free advantages: each response's score relative to the other responses to its prompt.

    scores: ``[p, k]`` sequence scores, k >= 2 responses per prompt. kind:
        "grpo"  (s_i - mean) / (std + eps), mean and unbiased std over the prompt's k scores (Shao et
                al. 2024, DeepSeekMath); a group whose scores are all equal gets 0
        "rloo"  s_i - mean_{j != i} s_j = k / (k - 1) (s_i - mean), the leave-one-out baseline
                (Ahmadian et al. 2024): unbiased, no division by the spread
    ``normalize_std=False`` (grpo): s_i - mean, without the division (Dr. GRPO, Liu et al. 2025: dividing by
    the spread weights prompts whose answers nearly agree, too easy or too hard, the most).
    Returns ``[p, k]`` fp32, detached (constants of the policy update)."""
    _check_dim("scores", scores, 2, "[p, k]")
    k = scores.shape[1]
    if k < 2:
        raise ValueError(f"scores {_shape(scores)} must hold k >= 2 responses per prompt: a group baseline "
                         "compares a response with the others")
    if kind not in GROUP_ESTIMATORS:
        raise ValueError(f"kind must be one of {GROUP_ESTIMATORS}, got {kind!r}")
    eps = _finite_number("eps", eps)
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    s = scores.detach().float()
    centred = s - s.mean(dim=1, keepdim=True)
    if kind == "rloo":
        return centred * (k / (k - 1))
    return centred / (s.std(dim=1, keepdim=True) + eps) if normalize_std else centred


# ---- running reward statistics ----------------------------------------------------------------------

class RunningMoments:
    """Running mean and standard deviation of a stream of rewards (e.g. to normalise scores).

    Kept as (count, mean, M2 = sum of squared deviations from the mean) in python floats (fp64:
    the stream may hold millions of values) and merged with Chan et al.'s parallel update, which is
    exact for any split of the stream and stays accurate where ``sum(x^2) - n * mean^2`` cancels:

        n = n_a + n_b,  delta = mean_b - mean_a,  mean = mean_a + delta * n_b / n,
        M2 = M2_a + M2_b + delta^2 * n_a * n_b / n

    ``std`` is the unbiased sample std ``sqrt(M2 / (count - 1))``, and 1.0 until two values have been
    seen, so that dividing by it is the identity before there is a spread to measure."""

    def __init__(self) -> None:
        self._count = 0.0
        self._mean = 0.0
        self._m2 = 0.0

    @property
    def count(self) -> float:
        return self._count

    @property
    def mean(self) -> float:
        return self._mean

    @property
    def std(self) -> float:
        return math.sqrt(self._m2 / (self._count - 1)) if self._count > 1 else 1.0

    def update(self, x: torch.Tensor) -> tuple[float, float]:
        """Add the values of ``x`` (any shape, at least one element; fp64 statistics). Returns the
        batch's ``(mean, std)`` as floats (std unbiased, 0.0 for a single value)."""
        if not isinstance(x, torch.Tensor) or x.numel() == 0:
            shape = _shape(x) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"RunningMoments.update needs a non-empty tensor x, got {shape}")
        xd = x.detach().double().flatten()
        n = xd.numel()
        mean = xd.mean()
        m2 = (xd - mean).pow(2).sum()
        mean, m2 = float(mean), float(m2)
        if not (math.isfinite(mean) and math.isfinite(m2)):
            raise ValueError(f"RunningMoments.update got non-finite values in x {_shape(x)}")
        self.update_from(n, mean, m2)
        return mean, (math.sqrt(m2 / (n - 1)) if n > 1 else 0.0)

    def update_from(self, count, mean, m2) -> None:
        """Merge the moments of new data: ``count`` values with mean ``mean`` and
        ``m2 = sum((x - mean)^2)`` (numbers or 1-element tensors). For data parallelism, reduce over
        the ranks first, e.g. ``count = all_reduce(n)``, ``mean = all_reduce(sum x) / count``,
        ``m2 = all_reduce(sum (x - mean)^2)``, and call this on every rank. ``count == 0`` is a no-op."""
        count, mean, m2 = (_finite_number("count", count), _finite_number("mean", mean),
                           _finite_number("m2", m2))
        if count < 0 or m2 < 0:
            raise ValueError(f"count ({count}) and m2 ({m2}) must be >= 0; compute m2 as sum((x - mean)^2), "
                             "which cannot cancel below 0")
        if count == 0:
            return
        total = self._count + count
        delta = mean - self._mean
        self._mean += delta * count / total
        self._m2 += m2 + delta * delta * self._count * count / total
        self._count = total

    def state_dict(self) -> dict[str, float]:
        return {"count": self._count, "mean": self._mean, "m2": self._m2}

    def load_state_dict(self, state: dict) -> None:
        missing = {"count", "mean", "m2"} - set(state)
        if missing:
            raise ValueError(f"RunningMoments state is missing {sorted(missing)}; has {sorted(state)}")
        count, mean, m2 = (_finite_number("count", state["count"]), _finite_number("mean", state["mean"]),
                           _finite_number("m2", state["m2"]))
        if count < 0 or m2 < 0:
            raise ValueError(f"RunningMoments state has count={count}, m2={m2}; both must be >= 0")
        self._count, self._mean, self._m2 = count, mean, m2


__all__ = ["GROUP_ESTIMATORS", "IS_LEVELS", "IS_MODES", "KL_KINDS", "LOSS_AGG_MODES", "POLICY_LOSSES", "REDUCTIONS",
           "SPREAD_STATISTICS", "RunningMoments", "adaptive_kl_coef", "gae_advantages", "group_advantages",
           "kl_estimate", "kl_penalty", "loss_token_weights", "masked_mean", "masked_sum", "masked_var",
           "masked_whiten", "overlong_penalty", "ppo_policy_loss", "reference_baseline", "reward_spread_filter",
           "sequence_mean", "shape_rewards", "truncated_importance_weights", "value_loss"]
