"""glm-engine: a Megatron-style training engine for ChatGLM-family models."""
from engine.config import GLMConfig, available_presets, load_config
from engine.model import GLMForCausalLM, GLMForScalarHead, KernelPlan, ModelSpec

__all__ = ["GLMConfig", "available_presets", "load_config", "GLMForCausalLM", "GLMForScalarHead",
           "KernelPlan", "ModelSpec"]
