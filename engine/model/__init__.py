from engine.model.glm import GLMForCausalLM, GLMForScalarHead, GLMTransformer, KVCache
from engine.model.spec import KernelPlan, ModelSpec

__all__ = ["GLMForCausalLM", "GLMForScalarHead", "GLMTransformer", "KVCache", "KernelPlan", "ModelSpec"]
