"""Batched decoding with a KV cache: greedy, temperature, top-k, top-p, per-sequence EOS stopping.

Prompts are left-padded so that every row's last prompt token sits in the same column and decoding
writes one column per step. The returned log-probs are those of the sampled tokens under the
temperature-scaled distribution *before* top-k/top-p filtering, i.e. log_softmax(logits / T): what
a forward over prompt+response gives, which is what PPO's old log-probs must equal.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each new token."""

    max_new_tokens: int = 32
    """Upper bound on generated tokens per sequence."""
    do_sample: bool = False
    """False: greedy (argmax). True: sample from the filtered distribution."""
    temperature: float = 1.0
    """Logits are divided by this before sampling and before the returned log-probs."""
    top_k: int = 0
    """Keep only the k most likely tokens (0: off)."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches top_p (1.0: off)."""
    eos_token_id: Optional[Sequence[int]] = None
    """Tokens that end a sequence; None uses the model config's eos ids."""
    pad_token_id: Optional[int] = None
    """Written after a sequence has ended; None uses the model config's pad id."""
    seed: Optional[int] = None
    """Seed of a private generator for sampling (None: torch's global RNG)."""
    compact: bool = True
    """Drop finished rows (and their KV cache) from the decoding batch once they are half of it, so a
    long-tailed batch decodes only the rows still running. Each step draws the sampling noise for
    every prompt row (``sample_tokens``), so outputs do not depend on it beyond float rounding: a
    smaller batch may round its matmuls differently and flip a near-tie."""
    share_prompts: bool = True
    """Prefill identical prompt rows once (PPO and GRPO sample several responses per prompt) and copy
    their KV cache and last-token logits to every row that repeats them: the prefill costs the unique
    prompts only. The same outputs up to float rounding, as for ``compact``."""

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (use do_sample=False for greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class GenerationOutput:
    """Result of `generate`. P = padded prompt length, N = number of decoding steps run (<= max_new_tokens)."""

    prompt_ids: torch.Tensor
    """[b, P] left-padded prompts."""
    prompt_mask: torch.Tensor
    """[b, P] 1 on real prompt tokens."""
    response_ids: torch.Tensor
    """[b, N] generated tokens; pad after a row's EOS."""
    response_mask: torch.Tensor
    """[b, N] 1 on generated tokens up to and including EOS."""
    logprobs: torch.Tensor
    """[b, N] fp32 log-prob of each generated token (0 where response_mask is 0)."""

    @property
    def sequences(self) -> torch.Tensor:
        """[b, P + N] prompt and response."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    def responses(self) -> list[list[int]]:
        return [r[m.bool()].tolist() for r, m in zip(self.response_ids, self.response_mask)]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lists of token ids -> ``ids [b, P]``, ``mask [b, P]``, padded on the left."""
    if len(prompts) == 0:
        raise ValueError("generate: the prompt batch is empty")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"generate: prompt {i} is empty; every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k / nucleus to -inf. ``logits [b, v]`` fp32."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked before it already reach top_p (the top one always stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_tokens(scaled: torch.Tensor, params: SamplingParams, rows: torch.Tensor, batch: int,
                  gen: Optional[torch.Generator]) -> torch.Tensor:
    """Next token ``[n]`` of the decoded rows from their temperature-scaled logits ``[n, v]`` fp32.

    Sampling is Gumbel-max: ``argmax(filtered logits + Gumbel noise)`` picks token i with its
    filtered softmax probability. The noise is drawn for all ``batch`` prompt rows and indexed by
    ``rows`` (each decoded row's prompt row), so a row's sample does not depend on which other rows
    are still being decoded. ``u`` is kept in (0, 1): ``torch.rand`` can return 0, whose noise -inf on
    every kept token would let argmax pick a filtered one."""
    if not params.do_sample:
        return scaled.argmax(-1)
    u = torch.rand((batch, scaled.shape[-1]), generator=gen, device=scaled.device)[rows]
    u = u.clamp_(min=torch.finfo(u.dtype).tiny)
    return (filter_logits(scaled, params.top_k, params.top_p) - torch.log(-torch.log(u))).argmax(-1)


@torch.no_grad()
def generate(model, prompts: Union[torch.Tensor, Sequence[Sequence[int]]], attention_mask: Optional[torch.Tensor] = None,
             params: SamplingParams = SamplingParams()) -> GenerationOutput:
    """Decode up to ``params.max_new_tokens`` tokens for each prompt with ``model``'s KV cache.

    ``prompts``: list of token-id lists (left-padded here) or a left-padded ``[b, P]`` tensor with
    ``attention_mask [b, P]``. ``model`` is a GLMForCausalLM (or anything with ``new_cache`` and
    ``forward(ids, attention_mask, position_ids, cache)``).
    """
    config = model.config
    pad = config.pad_token_id if params.pad_token_id is None else params.pad_token_id
    eos_ids = list(config.eos_token_id if params.eos_token_id is None else params.eos_token_id)
    device = next(model.parameters()).device
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2 or prompts.shape[0] == 0 or prompts.shape[1] == 0:
            raise ValueError(f"generate: prompt tensor must be a non-empty [batch, seq], got shape {tuple(prompts.shape)}")
        ids = prompts.to(device)
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(device).long()
        if mask.shape != ids.shape:
            raise ValueError(f"generate: attention_mask shape {tuple(mask.shape)} != prompts shape {tuple(ids.shape)}")
        if (mask[:, -1] == 0).any():
            raise ValueError("generate: prompts must be left-padded (the last column must be real tokens in every row)")
        if (mask.sum(1) == 0).any():
            raise ValueError("generate: a prompt row has no real tokens")
    else:
        ids, mask = left_pad(prompts, pad, device)
    b, p_len = ids.shape
    n_max = params.max_new_tokens
    gen = None
    if params.seed is not None:
        gen = torch.Generator(device=device).manual_seed(params.seed)

    was_training = model.training
    model.eval()
    full_mask = torch.cat([mask, torch.ones(b, n_max, dtype=mask.dtype, device=device)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    next_pos = positions[:, -1:] + 1  # [b, 1]
    eos = torch.tensor(eos_ids, device=device)

    out_ids = torch.full((b, n_max), pad, dtype=torch.long, device=device)
    out_logp = torch.zeros((b, n_max), dtype=torch.float32, device=device)
    out_mask = torch.zeros((b, n_max), dtype=torch.long, device=device)
    rows = torch.arange(b, device=device)  # the prompt row of each row being decoded (compaction drops rows)
    done = torch.zeros(b, dtype=torch.bool, device=device)

    gather_vocab = model.spec.gather_vocab or (lambda x: x)  # tensor parallel: full-vocabulary logits
    unique, inverse = None, None
    if params.share_prompts:  # (ids, mask) rows: the same ids under another padding are another prompt
        unique, inverse = torch.unique(torch.cat([ids, mask.to(ids.dtype)], 1), dim=0, return_inverse=True)
    if unique is not None and unique.shape[0] < b:
        u_ids, u_mask = unique[:, :p_len], unique[:, p_len:]
        cache = model.new_cache(unique.shape[0], p_len + n_max)
        u_logits = model(u_ids, u_mask, (u_mask.cumsum(-1) - 1).clamp(min=0), cache, last_only=True)[:, -1]
        logits = gather_vocab(u_logits).float()[inverse]  # [b, v]
        cache.select_rows(inverse)
    else:
        cache = model.new_cache(b, p_len + n_max)
        logits = gather_vocab(model(ids, full_mask[:, :p_len], positions, cache, last_only=True)[:, -1]).float()  # [b, v]
    steps = 0
    for t in range(n_max):
        if bool(torch.isnan(logits).any()):  # argmax would pick NaN entries: fail loudly instead
            raise FloatingPointError(f"generate: the model's logits hold NaN at decoding step {t} (rows "
                                     f"{rows[torch.isnan(logits).any(-1)].tolist()[:8]}): diverged or corrupted weights?")
        scaled = logits / params.temperature if params.temperature != 1.0 else logits
        logp = torch.log_softmax(scaled, dim=-1)
        token = sample_tokens(scaled, params, rows, b, gen)
        live = ~done
        token = torch.where(live, token, torch.full_like(token, pad))
        out_ids[rows, t] = token
        out_logp[rows, t] = torch.where(live, logp.gather(1, token[:, None]).squeeze(1), torch.zeros_like(logp[:, 0]))
        out_mask[rows, t] = live.long()
        done = done | torch.isin(token, eos)
        steps = t + 1
        if bool(done.all()) or t == n_max - 1:
            break
        if params.compact and 2 * int(done.sum()) >= done.numel():
            # Finished rows would go on costing attention over their cache and a share of every matmul.
            # Copying the live rows' cache when half the batch has finished costs at most one cache copy
            # in all (the batch at least halves each time).
            keep = (~done).nonzero().squeeze(1)
            cache.select_rows(keep)
            rows, token, done = rows[keep], token[keep], done[keep]
            full_mask, next_pos = full_mask[keep], next_pos[keep]
        logits = gather_vocab(model(token[:, None], full_mask[:, :p_len + t + 1], next_pos + t, cache,
                                    last_only=True)[:, -1]).float()
    model.train(was_training)
    return GenerationOutput(ids, mask, out_ids[:, :steps], out_mask[:, :steps], out_logp[:, :steps])
