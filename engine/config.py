"""Model configuration: one typed dataclass, presets, YAML, and Hugging Face / THUDM conversions."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class GLMConfig:
    """A ChatGLM2/3 / GLM-4 decoder: pre-RMSNorm, fused QKV with bias, GQA, partial rotary, SwiGLU."""

    vocab_size: int = 65024
    """Rows of the embedding and output layer (ChatGLM's padded_vocab_size)."""
    hidden_size: int = 4096
    """Width of the residual stream."""
    ffn_hidden_size: int = 13696
    """Width of the SwiGLU MLP (the gate and up projections each have this many outputs)."""
    num_layers: int = 28
    """Number of transformer blocks."""
    num_attention_heads: int = 32
    """Query heads."""
    num_kv_groups: int = 2
    """Key/value heads (ChatGLM's multi_query_group_num); must divide num_attention_heads."""
    head_dim: Optional[int] = None
    """Channels per head (ChatGLM's kv_channels); None means hidden_size // num_attention_heads."""
    rotary_fraction: float = 0.5
    """Fraction of each head's channels that are rotated (GLM: half)."""
    rope_ratio: float = 1.0
    """Rotary base is 10000 * rope_ratio (ChatGLM3-6B-32k and GLM-4 use larger ratios)."""
    layernorm_epsilon: float = 1e-5
    """RMSNorm epsilon."""
    max_position_embeddings: int = 8192
    """Longest sequence the model is meant for (ChatGLM's seq_length); not a hard limit for rotary."""
    qkv_bias: bool = True
    """Bias on the fused QKV projection (the only bias in a GLM block)."""
    initializer_range: float = 0.02
    """Std of the normal init of linear and embedding weights."""
    pad_token_id: int = 0
    """Token used to pad batches."""
    eos_token_id: list[int] = field(default_factory=lambda: [2])
    """Token ids that end a sequence during generation."""
    name: str = "custom"
    """Preset name, for logs."""

    def __post_init__(self) -> None:
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        self.eos_token_id = list(self.eos_token_id)
        problems = []
        for f in ("vocab_size", "hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads", "num_kv_groups"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                problems.append(f"{f}={v!r} must be a positive integer")
        if problems:
            raise ValueError("invalid GLMConfig: " + "; ".join(problems))
        if self.head_dim is None and self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"invalid GLMConfig: head_dim is not given and hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}; set head_dim (kv_channels) explicitly")
        if self.head_dim is not None and (not isinstance(self.head_dim, int) or self.head_dim <= 0):
            raise ValueError(f"invalid GLMConfig: head_dim={self.head_dim!r} must be a positive integer")
        if self.num_attention_heads % self.num_kv_groups != 0:
            raise ValueError(
                f"invalid GLMConfig: num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_kv_groups={self.num_kv_groups}")
        if not 0.0 < self.rotary_fraction <= 1.0:
            raise ValueError(f"invalid GLMConfig: rotary_fraction={self.rotary_fraction} must be in (0, 1]")
        rd = self.kv_channels * self.rotary_fraction
        if rd != int(rd) or int(rd) % 2 != 0:
            raise ValueError(
                f"invalid GLMConfig: rotary_fraction={self.rotary_fraction} * head_dim={self.kv_channels} = {rd} "
                "must be an even integer (rotary pairs)")
        if self.rope_ratio <= 0 or self.layernorm_epsilon <= 0:
            raise ValueError(f"invalid GLMConfig: rope_ratio={self.rope_ratio} and layernorm_epsilon="
                             f"{self.layernorm_epsilon} must be positive")
        if not 0 <= self.pad_token_id < self.vocab_size or any(not 0 <= e < self.vocab_size for e in self.eos_token_id):
            raise ValueError(f"invalid GLMConfig: pad_token_id={self.pad_token_id} and eos_token_id={self.eos_token_id} "
                             f"must be in [0, vocab_size={self.vocab_size})")

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def kv_channels(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.kv_channels * self.rotary_fraction)

    @property
    def rope_base(self) -> float:
        return 10000.0 * self.rope_ratio

    @property
    def qkv_size(self) -> int:
        return (self.num_attention_heads + 2 * self.num_kv_groups) * self.kv_channels

    def num_parameters(self) -> int:
        h, d = self.hidden_size, self.kv_channels
        attn = h * self.qkv_size + (self.qkv_size if self.qkv_bias else 0) + self.num_attention_heads * d * h
        mlp = h * 2 * self.ffn_hidden_size + self.ffn_hidden_size * h
        return self.num_layers * (attn + mlp + 2 * h) + 2 * self.vocab_size * h + h

    # ---- construction --------------------------------------------------------------------------
    def replace(self, **changes) -> "GLMConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GLMConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown GLMConfig fields {unknown}; valid fields are {sorted(names)}")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "GLMConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"model config file {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of GLMConfig fields, got {type(data).__name__}")
        data = data.get("model", data)
        base = data.pop("preset", None)
        return (cls.preset(base).replace(**data) if base else cls.from_dict(data))

    @classmethod
    def preset(cls, name: str) -> "GLMConfig":
        path = CONFIG_DIR / "models" / f"{name}.yaml"
        if not path.is_file():
            raise ValueError(f"unknown model preset {name!r}; available presets: {available_presets()}")
        return cls.from_yaml(path)

    # ---- Hugging Face GlmConfig ----------------------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        """config.json contents for ``transformers.GlmForCausalLM``."""
        return {
            "architectures": ["GlmForCausalLM"],
            "model_type": "glm",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.ffn_hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_kv_groups,
            "head_dim": self.kv_channels,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.layernorm_epsilon,
            "attention_bias": self.qkv_bias,
            "attention_dropout": 0.0,
            "initializer_range": self.initializer_range,
            "tie_word_embeddings": False,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": self.eos_token_id if len(self.eos_token_id) > 1 else self.eos_token_id[0],
            "rope_theta": self.rope_base,
            "partial_rotary_factor": self.rotary_fraction,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_base,
                                "partial_rotary_factor": self.rotary_fraction},
        }

    def to_hf(self):
        from transformers import GlmConfig
        d = self.to_hf_dict()
        d.pop("architectures"), d.pop("model_type")
        return GlmConfig(**d)

    @classmethod
    def from_hf(cls, hf) -> "GLMConfig":
        """From a ``transformers.GlmConfig`` or its config.json dict (model_type 'glm')."""
        d = hf if isinstance(hf, dict) else hf.to_dict()
        if d.get("model_type") not in (None, "glm"):
            raise ValueError(f"expected a Hugging Face config with model_type 'glm', got {d.get('model_type')!r}"
                             + (" (Glm4ForCausalLM has sandwich norms and is a different block)" if d.get("model_type") == "glm4" else ""))
        if d.get("tie_word_embeddings"):
            raise ValueError("GLM models have an untied output layer; this config has tie_word_embeddings=True")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"GLM uses SwiGLU (hidden_act 'silu'), config has hidden_act={d.get('hidden_act')!r}")
        rope = d.get("rope_parameters") or {}
        for entry in (rope, d.get("rope_scaling") or {}):  # rope_scaling: the older field of the same
            if entry.get("rope_type", entry.get("type", "default")) != "default":
                raise ValueError(f"rope_type {entry.get('rope_type', entry.get('type'))!r} is not supported, only "
                                 "'default' (no RoPE scaling)")
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        fraction = rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 0.5))
        eos = d.get("eos_token_id")
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], ffn_hidden_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"], num_attention_heads=d["num_attention_heads"],
            num_kv_groups=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim"), rotary_fraction=fraction, rope_ratio=theta / 10000.0,
            layernorm_epsilon=d.get("rms_norm_eps", 1e-5),
            max_position_embeddings=d.get("max_position_embeddings", 8192),
            qkv_bias=d.get("attention_bias", True), initializer_range=d.get("initializer_range", 0.02),
            pad_token_id=d.get("pad_token_id") if d.get("pad_token_id") is not None else 0,
            eos_token_id=eos if eos is not None else [2], name=d.get("_name_or_path") or "hf")

    # ---- original THUDM ChatGLMConfig (config.json of THUDM/chatglm3-6b, glm-4-9b) --------------
    @classmethod
    def from_chatglm(cls, d: dict[str, Any]) -> "GLMConfig":
        """From THUDM ChatGLMConfig field names (num_layers, ffn_hidden_size, multi_query_group_num, ...)."""
        if not d.get("add_qkv_bias", True) is True:
            raise ValueError("only ChatGLM checkpoints with add_qkv_bias=True are supported")
        if d.get("add_bias_linear", False):
            raise ValueError("add_bias_linear=True (biases on dense layers) is not a GLM2/3/4 block")
        if not d.get("rmsnorm", True) or d.get("apply_residual_connection_post_layernorm", False) \
                or not d.get("post_layer_norm", True):
            raise ValueError("only pre-RMSNorm ChatGLM blocks (rmsnorm=True, post_layer_norm=True, "
                             "apply_residual_connection_post_layernorm=False) are supported")
        heads = d["num_attention_heads"]
        groups = d.get("multi_query_group_num", heads) if d.get("multi_query_attention", False) else heads
        eos = d.get("eos_token_id", 2)
        return cls(
            vocab_size=d.get("padded_vocab_size", d.get("vocab_size")), hidden_size=d["hidden_size"],
            ffn_hidden_size=d["ffn_hidden_size"], num_layers=d["num_layers"], num_attention_heads=heads,
            num_kv_groups=groups, head_dim=d.get("kv_channels"), rotary_fraction=0.5,
            rope_ratio=float(d.get("rope_ratio", 1.0)), layernorm_epsilon=d.get("layernorm_epsilon", 1e-5),
            max_position_embeddings=d.get("seq_length", 8192), qkv_bias=True,
            pad_token_id=d.get("pad_token_id", 0) or 0, eos_token_id=eos,
            name=d.get("_name_or_path") or "chatglm")

    def to_chatglm(self) -> dict[str, Any]:
        return {
            "model_type": "chatglm", "num_layers": self.num_layers, "padded_vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "ffn_hidden_size": self.ffn_hidden_size,
            "kv_channels": self.kv_channels, "num_attention_heads": self.num_attention_heads,
            "seq_length": self.max_position_embeddings, "layernorm_epsilon": self.layernorm_epsilon,
            "rmsnorm": True, "apply_residual_connection_post_layernorm": False, "post_layer_norm": True,
            "add_bias_linear": False, "add_qkv_bias": self.qkv_bias, "multi_query_attention": True,
            "multi_query_group_num": self.num_kv_groups, "rope_ratio": self.rope_ratio,
            "pad_token_id": self.pad_token_id, "eos_token_id": self.eos_token_id,
        }


def available_presets() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "models").glob("*.yaml"))


def config_section(cls, values: Any, where: str):
    """``cls(**values)`` for a YAML section, with a ValueError naming unknown fields (and listing the
    valid ones); YAML lists become tuples for the tuple-typed fields ``betas`` and ``layers_per_stage``."""
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping of {cls.__name__} fields, got {type(values).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; valid fields are {sorted(names)}")
    return cls(**{k: tuple(v) if isinstance(v, list) and k in ("betas", "layers_per_stage") else v
                  for k, v in values.items()})


def run_dict(run) -> dict:
    """A run dataclass (with a ``model: GLMConfig`` field) as the plain dict written to config.json."""
    d = dataclasses.asdict(run)
    d["model"] = run.model.to_dict()
    return d


def read_run_file(path, sections: set, overrides: Optional[dict] = None) -> tuple[dict, Path]:
    """A run YAML's top-level mapping (unknown sections refused, naming the valid ones) with
    ``overrides`` ``{section: {field: value}}`` merged in (a non-mapping override replaces the section),
    and the folder relative model paths resolve against (the file's, else the working directory)."""
    raw: dict = {}
    base = Path.cwd()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"run config {p} does not exist")
        raw = yaml.safe_load(p.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{p}: expected a mapping with sections {sorted(sections)}")
        unknown = sorted(set(raw) - set(sections))
        if unknown:
            raise ValueError(f"{p}: unknown section(s) {unknown}; valid sections are {sorted(sections)}")
        base = p.parent
    for section, values in (overrides or {}).items():
        raw[section] = {**(raw.get(section) or {}), **values} if isinstance(values, dict) else values
    return raw, base


def model_from_spec(spec: Any, base_dir: Optional[Path] = None) -> GLMConfig:
    """``model:`` of a run file: a preset name, a model YAML path or a Hugging Face / THUDM model directory
    (relative paths also tried against ``base_dir``, the run file's folder, for YAML files), or a mapping
    ``{preset: tiny, field: value, ...}`` / full fields."""
    if isinstance(spec, str):
        if base_dir is not None and not Path(spec).is_absolute() and (Path(base_dir) / spec).is_file():
            return GLMConfig.from_yaml(Path(base_dir) / spec)
        return load_config(spec)
    if isinstance(spec, dict):
        spec = dict(spec)
        preset = spec.pop("preset", None)
        return GLMConfig.preset(preset).replace(**spec) if preset else GLMConfig.from_dict(spec)
    raise ValueError(f"model: expected a preset name, a YAML path or a mapping, got {spec!r}")


def load_config(path_or_preset: str) -> GLMConfig:
    """A preset name (``tiny``, ``chatglm3-6b``, ``glm-4-9b``), a YAML file path, or a Hugging Face / THUDM
    model directory (its config.json)."""
    if Path(path_or_preset).is_dir() and (Path(path_or_preset) / "config.json").is_file():
        from engine.model.hf_adapter import model_dir_config
        return model_dir_config(path_or_preset)
    if Path(path_or_preset).suffix in (".yaml", ".yml") or Path(path_or_preset).is_file():
        return GLMConfig.from_yaml(path_or_preset)
    return GLMConfig.preset(path_or_preset)
