"""The ChatGLM2/3 / GLM-4 decoder, written once for every parallel layout.

Block (pre-norm):  h = x + Dense(Attn(Rope(QKV(RMSNorm(x)))));  y = h + Down(SwiGLU(GateUp(RMSNorm(h))))
QKV is one fused projection with bias, laid out [q (hq*d) | k (hkv*d) | v (hkv*d)]; rotary covers the
first half of each head with interleaved pairs; no other biases; the output layer is untied.

Shapes (batch-first throughout): b batch, s sequence, h hidden, hq/hkv query/KV heads on this rank,
d head dim, v vocab (or this rank's vocab shard).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.utils.checkpoint

import kernels
from engine.config import GLMConfig
from engine.model.spec import ModelSpec, at_positions


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, backend: str):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps, backend=self.backend)


class KVCache:
    """Pre-allocated keys/values for decoding: per layer ``[b, max_len, hkv, d]``; ``length`` filled."""

    def __init__(self, num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.k = [torch.empty(batch, max_len, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.empty_like(t) for t in self.k]
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k, v`` ``[b, s, hkv, d]`` after the filled part; return all keys/values so far."""
        end = self.length + k.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} tokens > max_len {self.max_len}")
        self.k[layer][:, self.length:end] = k
        self.v[layer][:, self.length:end] = v
        return self.k[layer][:, :end], self.v[layer][:, :end]

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep only the batch rows ``index`` ``[n]`` (decoding drops finished sequences). One layer at a
        time, so the copy needs one layer's worth of extra memory."""
        for layer in range(len(self.k)):
            self.k[layer] = self.k[layer].index_select(0, index)
            self.v[layer] = self.v[layer].index_select(0, index)

    def advance(self, s: int) -> None:
        self.length += s

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class GLMAttention(nn.Module):
    def __init__(self, config: GLMConfig, spec: ModelSpec, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.head_dim = config.kv_channels
        self.num_heads = config.num_attention_heads // spec.tp_size
        # With tp > KV groups each rank keeps one KV head, replicated across the ranks sharing a group.
        self.num_kv_heads = max(1, config.num_kv_groups // spec.tp_size)
        self.rotary_dim = config.rotary_dim
        self.rope_base = config.rope_base
        self.kernels = spec.kernels
        self.context_parallel = spec.context_parallel
        self.qkv = spec.column_linear(config.hidden_size, config.qkv_size, config.qkv_bias, "qkv")
        self.dense = spec.row_linear(config.num_attention_heads * self.head_dim, config.hidden_size, False, "dense")

    def core_attention(self, q, k, v, attention_mask, segment_ids=None):
        """Causal attention of q over k, v; under context parallelism q holds this rank's two sequence
        chunks and k, v (and the mask and segment ids) the whole sequence."""
        if self.context_parallel is not None:
            return self.context_parallel.attention(q, k, v, attention_mask, segment_ids, self._attend)
        return self._attend(q, k, v, attention_mask, segment_ids)

    def _attend(self, q, k, v, attention_mask, segment_ids):
        return kernels.flash_attention(q, k, v, causal=True, attention_mask=attention_mask, segment_ids=segment_ids,
                                       backend=self.kernels.attention)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, attention_mask: Optional[torch.Tensor],
                cache: Optional[KVCache] = None, recompute_core: bool = False,
                segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        # [b, s, (hq + 2 hkv) d]; s is this rank's whole sequence even under sequence parallel (under context
        # parallelism: its 2 chunks, S / cp tokens)
        qkv = self.qkv(x)
        b, s, _ = qkv.shape
        d = self.head_dim
        hq, hkv = self.num_heads, self.num_kv_heads
        # q and k are adjacent in the fused projection: rotate both heads groups in one kernel call
        qk, v = qkv.split([(hq + hkv) * d, hkv * d], dim=-1)
        qk = kernels.apply_rotary(qk.reshape(b, s, hq + hkv, d), positions, self.rotary_dim, self.rope_base,
                                  backend=self.kernels.rotary)
        q, k = qk.split([hq, hkv], dim=2)
        v = v.view(b, s, hkv, d)
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)
        if self.context_parallel is not None:
            # outside the selective-recompute region: the gather is not repeated in backward
            k, v = self.context_parallel.gather_kv(k, v)
        if recompute_core and torch.is_grad_enabled():
            # Selective recompute: keep only q, k, v; the attention core is recomputed in backward.
            o = torch.utils.checkpoint.checkpoint(self.core_attention, q, k, v, attention_mask, segment_ids,
                                                  use_reentrant=False)
        else:
            o = self.core_attention(q, k, v, attention_mask, segment_ids)
        return self.dense(o.reshape(b, s, hq * d))


class GLMMLP(nn.Module):
    def __init__(self, config: GLMConfig, spec: ModelSpec):
        super().__init__()
        self.gate_up = spec.column_linear(config.hidden_size, 2 * config.ffn_hidden_size, False, "gate_up")
        self.down = spec.row_linear(config.ffn_hidden_size, config.hidden_size, False, "down")
        self.backend = spec.kernels.swiglu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(kernels.swiglu(self.gate_up(x), backend=self.backend))


class GLMBlock(nn.Module):
    def __init__(self, config: GLMConfig, spec: ModelSpec, layer_index: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.layernorm_epsilon, spec.kernels.rms_norm)
        self.attention = GLMAttention(config, spec, layer_index)
        self.mlp_norm = RMSNorm(config.hidden_size, config.layernorm_epsilon, spec.kernels.rms_norm)
        self.mlp = GLMMLP(config, spec)

    def forward(self, x, positions, attention_mask=None, cache=None, recompute_core=False, segment_ids=None):
        x = x + self.attention(self.attn_norm(x), positions, attention_mask, cache, recompute_core, segment_ids)
        return x + self.mlp(self.mlp_norm(x))


def default_positions(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], offset: int = 0) -> torch.Tensor:
    """Position ids ``[b, s]``: count of real tokens before each one, so left padding is skipped."""
    if attention_mask is None:
        return torch.arange(offset, offset + input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp_(min=0)[:, -input_ids.shape[1]:]


class GLMTransformer(nn.Module):
    """Embedding, blocks and final norm: the trunk shared by the LM and the scalar-head model.

    ``layer_indices`` selects which blocks this instance owns (pipeline stages own a slice);
    ``pre_process`` / ``post_process`` say whether it holds the embedding / the final norm and head.
    """

    def __init__(self, config: GLMConfig, spec: Optional[ModelSpec] = None, layer_indices=None,
                 pre_process: bool = True, post_process: bool = True):
        super().__init__()
        spec = spec or ModelSpec()
        self.config, self.spec = config, spec
        self.pre_process, self.post_process = pre_process, post_process
        self.layer_indices = list(range(config.num_layers)) if layer_indices is None else list(layer_indices)
        self.embedding = spec.embedding(config.vocab_size, config.hidden_size) if pre_process else None
        # Blocks are stored under their global index so checkpoint names don't depend on the pipeline split.
        self.layers = nn.ModuleDict({str(i): GLMBlock(config, spec, i) for i in self.layer_indices})
        self.final_norm = RMSNorm(config.hidden_size, config.layernorm_epsilon, spec.kernels.rms_norm) if post_process else None
        self.recompute = "none"  # "none" | "full" (whole block) | "selective" (attention core only)

    def set_recompute(self, mode: str) -> None:
        if mode not in ("none", "full", "selective"):
            raise ValueError(f"recompute must be 'none', 'full' or 'selective', got {mode!r}")
        self.recompute = mode

    def init_weights(self, generator: Optional[torch.Generator] = None) -> None:
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    p.normal_(0.0, std, generator=generator)

    def run_layers(self, hidden: torch.Tensor, positions: torch.Tensor, attention_mask=None,
                   cache: Optional[KVCache] = None, segment_ids=None) -> torch.Tensor:
        """The blocks on ``hidden``. Under context parallelism every input holds this rank's tokens
        (``ContextParallel.split``); the key mask and segment ids are gathered here, once for all layers."""
        cp = self.spec.context_parallel
        if cp is not None:
            if cache is not None:
                raise ValueError("context parallelism splits whole sequences for training and scoring; KV-cache "
                                 "decoding needs a layout with cp=1")
            attention_mask, segment_ids = cp.gather_keys(attention_mask), cp.gather_keys(segment_ids)
        for block in self.layers.values():
            if self.recompute == "full" and torch.is_grad_enabled() and cache is None:
                hidden = torch.utils.checkpoint.checkpoint(block, hidden, positions, attention_mask, None, False,
                                                           segment_ids, use_reentrant=False)
            else:
                hidden = block(hidden, positions, attention_mask, cache, self.recompute == "selective", segment_ids)
        return hidden

    def trunk(self, input_ids: torch.Tensor, attention_mask=None, position_ids=None,
              cache: Optional[KVCache] = None, segment_ids=None) -> torch.Tensor:
        """Final-norm hidden states ``[b, s, h]`` for a model holding every stage. ``segment_ids [b, s]``
        (packed sequences): tokens attend only within their own segment (document); pass the
        per-document ``position_ids`` with them."""
        _check_inputs(input_ids, attention_mask, position_ids, self.config, cache, segment_ids)
        check_context_parallel_positions(self.spec, position_ids)
        if position_ids is None:
            position_ids = default_positions(input_ids, attention_mask, cache.length if cache is not None else 0)
        hidden = self.embedding(input_ids)
        hidden = self.run_layers(hidden, position_ids, attention_mask, cache, segment_ids)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        return self.final_norm(hidden)

    def new_cache(self, batch: int, max_len: int, dtype=None, device=None) -> KVCache:
        any_block = next(iter(self.layers.values()))
        p = next(self.parameters())
        return KVCache(self.config.num_layers, batch, max_len, any_block.attention.num_kv_heads,
                       self.config.kv_channels, dtype or p.dtype, device or p.device)


def check_context_parallel_positions(spec: ModelSpec, position_ids: Optional[torch.Tensor]) -> None:
    """Under context parallelism a rank sees two chunks of each sequence, so it cannot count positions
    itself: the caller computes them over whole sequences and splits them like the tokens."""
    if spec.context_parallel is not None and position_ids is None:
        raise ValueError("context parallelism needs position_ids: compute them over the whole sequences and split "
                         "them like input_ids (ContextParallel.split), as Trainer.microbatches does")


def _check_inputs(input_ids, attention_mask, position_ids, config: GLMConfig, cache, segment_ids=None) -> None:
    if input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(f"input_ids must be an integer tensor [batch, seq], got {input_ids.dtype} {tuple(input_ids.shape)}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids is empty: shape {tuple(input_ids.shape)}")
    if attention_mask is not None:
        expected_s = input_ids.shape[1] + (cache.length if cache is not None else 0)
        if tuple(attention_mask.shape) != (input_ids.shape[0], expected_s):
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} must be [batch, seq"
                             f"{' + cached' if cache is not None else ''}] = {(input_ids.shape[0], expected_s)}")
    if position_ids is not None and tuple(position_ids.shape) != tuple(input_ids.shape):
        raise ValueError(f"position_ids shape {tuple(position_ids.shape)} != input_ids shape {tuple(input_ids.shape)}")
    if segment_ids is not None:
        if cache is not None:
            raise ValueError("segment_ids (packed sequences) are for training/scoring forwards, not KV-cache decoding")
        if tuple(segment_ids.shape) != tuple(input_ids.shape):
            raise ValueError(f"segment_ids shape {tuple(segment_ids.shape)} != input_ids shape {tuple(input_ids.shape)}")


class GLMForCausalLM(GLMTransformer):
    """GLM language model: ``model(input_ids, attention_mask=None, position_ids=None) -> logits [b, s, v]``
    (``segment_ids=`` for packed sequences, see ``trunk``)."""

    def __init__(self, config: GLMConfig, spec: Optional[ModelSpec] = None, layer_indices=None,
                 pre_process: bool = True, post_process: bool = True, init: bool = True):
        super().__init__(config, spec, layer_indices, pre_process, post_process)
        self.output_layer = self.spec.column_linear(config.hidden_size, config.vocab_size, False, "output") if post_process else None
        if init:
            self.init_weights()

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, cache: Optional[KVCache] = None,
                last_only: bool = False, segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits ``[b, s, v]`` (``[b, 1, v]`` with ``last_only``, as decoding needs)."""
        hidden = self.trunk(input_ids, attention_mask, position_ids, cache, segment_ids)
        if last_only and self.spec.gather_sequence is None:
            return self.output_layer(hidden[:, -1:])
        # under sequence parallel the output layer gathers the sequence itself; slice after it
        logits = self.head(hidden)
        return logits[:, -1:] if last_only else logits

    def head(self, hidden: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Final-norm hidden states -> logits ``[b, s, v(/tp)]`` (the last pipeline chunk's output), or
        ``[n, v(/tp)]`` at the flat positions ``index`` only (``head_positions``)."""
        return self.output_layer(hidden) if index is None else self.output_layer(hidden, index=index)

    # Hugging Face interchange lives in engine.model.hf_adapter; these are thin entry points.
    @classmethod
    def from_hf(cls, path_or_model, spec: Optional[ModelSpec] = None, dtype: Optional[torch.dtype] = None) -> "GLMForCausalLM":
        from engine.model.hf_adapter import load_hf
        return load_hf(cls, path_or_model, spec=spec, dtype=dtype)

    def save_hf(self, directory, max_shard_bytes: int = 5 * 2**30) -> None:
        from engine.model.hf_adapter import save_hf
        save_hf(self, directory, max_shard_bytes=max_shard_bytes)

    @torch.no_grad()
    def generate(self, prompts, attention_mask=None, **sampling):
        from engine.model.generation import SamplingParams, generate
        return generate(self, prompts, attention_mask, SamplingParams(**sampling))


class GLMForScalarHead(GLMTransformer):
    """The GLM trunk with a scalar head (one value per token): the critic and the reward model.

    ``model(input_ids, attention_mask) -> values [b, s]``; ``model.reward(...) -> [b]`` reads the value
    at the last non-pad token of each row. The head is bias-free (as in OpenRLHF / DeepSpeed-Chat) so it
    is exactly ``transformers.GlmForSequenceClassification``'s ``score`` with num_labels=1: the ranking
    loss is shift-invariant, and a critic learns any offset through the trunk.
    """

    def __init__(self, config: GLMConfig, spec: Optional[ModelSpec] = None, layer_indices=None,
                 pre_process: bool = True, post_process: bool = True, init: bool = True):
        super().__init__(config, spec, layer_indices, pre_process, post_process)
        self.value_head = nn.Linear(config.hidden_size, 1, bias=False) if post_process else None
        if init:
            self.init_weights()
            if self.value_head is not None:
                with torch.no_grad():  # small head init so initial scores are near zero
                    self.value_head.weight.normal_(0.0, 1.0 / math.sqrt(config.hidden_size + 1))

    def forward(self, input_ids, attention_mask=None, position_ids=None, segment_ids=None) -> torch.Tensor:
        return self.head(self.trunk(input_ids, attention_mask, position_ids, segment_ids=segment_ids))

    def head(self, hidden: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Final-norm hidden states -> fp32 values ``[b, s]`` (the last pipeline chunk's output), or ``[n]`` at
        the flat positions ``index`` (``head_positions``); under sequence parallel the sequence is gathered
        first, so every TP rank holds all values."""
        if self.spec.gather_sequence is not None:
            hidden = self.spec.gather_sequence(hidden)
        if index is not None:
            hidden = at_positions(hidden, index)
        return self.value_head(hidden).squeeze(-1).float()

    def reward(self, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
        values = self.forward(input_ids, attention_mask, position_ids)
        return values.gather(1, last_token_index(input_ids, attention_mask)[:, None]).squeeze(1)

    # Hugging Face interchange (GlmForSequenceClassification, num_labels=1) lives in engine.model.hf_adapter.
    @classmethod
    def from_hf(cls, path_or_model, spec: Optional[ModelSpec] = None, dtype: Optional[torch.dtype] = None) -> "GLMForScalarHead":
        """From a HF GlmForSequenceClassification dir or model; for a causal LM use
        ``from_causal_lm(GLMForCausalLM.from_hf(...))`` (trunk only, fresh head)."""
        from engine.model.hf_adapter import load_hf
        return load_hf(cls, path_or_model, spec=spec, dtype=dtype)

    def save_hf(self, directory, max_shard_bytes: int = 5 * 2**30) -> None:
        from engine.model.hf_adapter import save_hf
        save_hf(self, directory, max_shard_bytes=max_shard_bytes)

    @classmethod
    def from_causal_lm(cls, lm: GLMForCausalLM) -> "GLMForScalarHead":
        """Critic/reward init from an LM: copy the trunk, fresh value head."""
        if any(".lora." in name for name in lm.state_dict()):
            raise ValueError("from_causal_lm: the language model has LoRA adapters; fold them into its weights first "
                             "(engine.model.lora.merge_lora_ on a copy) or add adapters to the scalar-head model itself")
        model = cls(lm.config, lm.spec, lm.layer_indices, lm.pre_process, lm.post_process)
        missing, unexpected = model.load_state_dict(lm.state_dict(), strict=False)
        heads = (["output_layer.weight"], ["value_head.weight"]) if lm.post_process else ([], [])  # not on earlier stages
        if (unexpected, missing) != heads:
            raise RuntimeError(f"trunk copy mismatch: missing {missing}, unexpected {unexpected}")
        return model.to(next(lm.parameters()).dtype)


def head_positions(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices ``[n]`` of the True positions of ``mask [b, s]``: where a model's head computes its
    outputs (``head(hidden, index)``, ``pipeline.chunk_forward``), so the output layer skips positions no
    loss or score reads; its logits are most of a step's activation memory at a 65k vocabulary. Built
    with the micro-batch, so the forward has no host sync. An empty selection keeps position 0
    (kernels need a row): callers give it no weight."""
    index = mask.reshape(-1).nonzero().squeeze(1)
    return index if index.numel() else index.new_zeros(1)


def last_token_index(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Index ``[b]`` of the last real token per row (works for left and right padding)."""
    if attention_mask is None:
        return torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device, dtype=torch.long)
    s = attention_mask.shape[1]
    idx = torch.arange(s, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), idx, -1).max(dim=1).values.clamp(min=0)
