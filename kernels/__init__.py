"""Fused kernels for the GLM block. Every op takes ``backend="auto" | "torch" | "triton" | ...``."""
from .adamw import FusedAdamW, fused_adamw_step
from .cross_entropy import cross_entropy, token_logprobs
from .flash_attention import flash_attention
from .flash_decode import flash_decode
from .rms_norm import rms_norm
from .rotary import apply_rotary
from .swiglu import swiglu

__all__ = ["rms_norm", "apply_rotary", "swiglu", "flash_attention", "flash_decode", "cross_entropy", "token_logprobs",
           "fused_adamw_step", "FusedAdamW"]
