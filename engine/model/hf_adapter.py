"""Weight mapping between the engine and Hugging Face GLM / original THUDM ChatGLM checkpoints.

All name translation and QKV fusion lives here (STYLE.md 4); the model never sees foreign names.

Engine names (per block i):
    embedding.weight                          [v, h]
    layers.i.attn_norm.weight                 [h]
    layers.i.attention.qkv.weight / .bias     [(hq + 2 hkv) d, h] / [(hq + 2 hkv) d]   rows [q | k | v]
    layers.i.attention.dense.weight           [h, hq d]
    layers.i.mlp_norm.weight                  [h]
    layers.i.mlp.gate_up.weight               [2 f, h]   rows [gate | up]
    layers.i.mlp.down.weight                  [h, f]
    final_norm.weight, output_layer.weight    [h], [v, h]
    value_head.weight                         [1, h]     (GLMForScalarHead, in place of output_layer)
Hugging Face ``GlmForCausalLM`` keeps q/k/v separate; THUDM ChatGLM2/3 and GLM-4 fuse them in the
same [q | k | v] order as the engine, so only names change.

A GLMForScalarHead (reward model / critic) is a Hugging Face ``GlmForSequenceClassification`` with
num_labels=1: the same ``model.*`` trunk and ``score.weight`` [1, h] (bias-free, like our head).
HF pools at the last token != ``pad_token_id``, ``GLMForScalarHead.reward`` at the last token the
attention mask marks: the two agree when exactly the pad positions are masked out. THUDM has no
reward-model layout.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from engine.config import GLMConfig

_HF_LAYER = "model.layers.{i}."
_THUDM_LAYER = "transformer.encoder.layers.{i}."
HF_REWARD_ARCHITECTURE = "GlmForSequenceClassification"


def expected_shapes(config: GLMConfig, value_head: bool = False) -> dict[str, tuple[int, ...]]:
    """Engine state-dict names and full (unsharded) shapes of a GLMForCausalLM, or with ``value_head``
    of a GLMForScalarHead."""
    h, f, v, d = config.hidden_size, config.ffn_hidden_size, config.vocab_size, config.kv_channels
    head = ("value_head.weight", (1, h)) if value_head else ("output_layer.weight", (v, h))
    shapes = {"embedding.weight": (v, h), "final_norm.weight": (h,), head[0]: head[1]}
    for i in range(config.num_layers):
        p = f"layers.{i}."
        shapes[p + "attn_norm.weight"] = (h,)
        shapes[p + "attention.qkv.weight"] = (config.qkv_size, h)
        if config.qkv_bias:
            shapes[p + "attention.qkv.bias"] = (config.qkv_size,)
        shapes[p + "attention.dense.weight"] = (h, config.num_attention_heads * d)
        shapes[p + "mlp_norm.weight"] = (h,)
        shapes[p + "mlp.gate_up.weight"] = (2 * f, h)
        shapes[p + "mlp.down.weight"] = (h, f)
    return shapes


def _rename_map(config: GLMConfig, layer_fmt: str, names: dict[str, str], top: dict[str, str]) -> dict[str, str]:
    """foreign name -> engine name."""
    out = dict(top)
    for i in range(config.num_layers):
        for foreign, ours in names.items():
            out[layer_fmt.format(i=i) + foreign] = f"layers.{i}." + ours
    return out


def _thudm_names(config: GLMConfig) -> dict[str, str]:
    return _rename_map(config, _THUDM_LAYER, {
        "input_layernorm.weight": "attn_norm.weight",
        "self_attention.query_key_value.weight": "attention.qkv.weight",
        "self_attention.query_key_value.bias": "attention.qkv.bias",
        "self_attention.dense.weight": "attention.dense.weight",
        "post_attention_layernorm.weight": "mlp_norm.weight",
        "mlp.dense_h_to_4h.weight": "mlp.gate_up.weight",
        "mlp.dense_4h_to_h.weight": "mlp.down.weight",
    }, {"transformer.embedding.word_embeddings.weight": "embedding.weight",
        "transformer.encoder.final_layernorm.weight": "final_norm.weight",
        "transformer.output_layer.weight": "output_layer.weight"})


def _hf_names(config: GLMConfig) -> dict[str, str]:
    return _rename_map(config, _HF_LAYER, {
        "input_layernorm.weight": "attn_norm.weight",
        "self_attn.o_proj.weight": "attention.dense.weight",
        "post_attention_layernorm.weight": "mlp_norm.weight",
        "mlp.gate_up_proj.weight": "mlp.gate_up.weight",
        "mlp.down_proj.weight": "mlp.down.weight",
    }, {"model.embed_tokens.weight": "embedding.weight", "model.norm.weight": "final_norm.weight",
        "lm_head.weight": "output_layer.weight", "score.weight": "value_head.weight"})


class CheckpointMismatchError(ValueError):
    """A checkpoint's tensors don't match the model config: lists every missing/unexpected/mis-shaped key."""


def _meta_engine_sd(config: GLMConfig, value_head: bool = False) -> dict[str, torch.Tensor]:
    return {k: torch.empty(shape, device="meta") for k, shape in expected_shapes(config, value_head).items()}


def validate_keys(sd: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], config: GLMConfig, source: str) -> None:
    """Raise CheckpointMismatchError listing every missing, unexpected and mis-shaped key (in ``sd``'s naming)."""
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f"{k}: checkpoint {tuple(sd[k].shape)} vs expected {expected[k]}"
             for k in expected if k in sd and tuple(sd[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        lines = [f"checkpoint {source} does not match the model config ({config.name}):"]
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
            if items:
                lines.append(f"  {label} ({len(items)}): {items[:20]}{' ...' if len(items) > 20 else ''}")
        raise CheckpointMismatchError("\n".join(lines))


def _ignored(name: str) -> bool:
    # rotary inverse frequencies are recomputed from the config, never loaded
    return name.endswith("rotary_emb.inv_freq") or name.endswith("rotary_pos_emb.inv_freq")


def hf_to_engine(hf_sd: dict[str, torch.Tensor], config: GLMConfig, source: str = "<state dict>",
                 value_head: bool = False) -> dict[str, torch.Tensor]:
    """Hugging Face GlmForCausalLM (``value_head``: GlmForSequenceClassification, num_labels=1) state
    dict -> engine state dict (q/k/v fused into qkv)."""
    hf_sd = {k: v for k, v in hf_sd.items() if not _ignored(k)}
    expected = {k: tuple(v.shape) for k, v in engine_to_hf(_meta_engine_sd(config, value_head), config).items()}
    validate_keys(hf_sd, expected, config, source)
    names = _hf_names(config)
    out = {}
    for i in range(config.num_layers):
        p = _HF_LAYER.format(i=i) + "self_attn."
        for kind in ("weight", "bias") if config.qkv_bias else ("weight",):
            out[f"layers.{i}.attention.qkv.{kind}"] = torch.cat([hf_sd[p + f"{x}_proj.{kind}"] for x in "qkv"], dim=0)
    out.update({names[k]: t for k, t in hf_sd.items() if k in names})
    return out


def engine_to_hf(sd: dict[str, torch.Tensor], config: GLMConfig) -> dict[str, torch.Tensor]:
    names = {v: k for k, v in _hf_names(config).items()}
    d, hq, hkv = config.kv_channels, config.num_attention_heads, config.num_kv_groups
    out = {}
    for k, t in sd.items():
        if ".attention.qkv." in k:
            i, kind = k.split(".")[1], k.rsplit(".", 1)[1]
            q, kk, v = t.split([hq * d, hkv * d, hkv * d], dim=0)
            for name, part in (("q", q), ("k", kk), ("v", v)):
                out[_HF_LAYER.format(i=i) + f"self_attn.{name}_proj.{kind}"] = part.contiguous()
        elif k in names:
            out[names[k]] = t.contiguous()
        else:
            raise KeyError(f"engine state dict has an unknown key {k!r}")
    return out


def thudm_to_engine(sd: dict[str, torch.Tensor], config: GLMConfig, source: str = "<state dict>") -> dict[str, torch.Tensor]:
    """Original THUDM ChatGLM2/3 / GLM-4 state dict -> engine state dict (names only)."""
    sd = {k: v for k, v in sd.items() if not _ignored(k)}
    expected = {k: tuple(v.shape) for k, v in engine_to_thudm(_meta_engine_sd(config), config).items()}
    validate_keys(sd, expected, config, source)
    names = _thudm_names(config)
    return {names[k]: t for k, t in sd.items()}


def engine_to_thudm(sd: dict[str, torch.Tensor], config: GLMConfig) -> dict[str, torch.Tensor]:
    if "value_head.weight" in sd:
        raise ValueError("THUDM ChatGLM has no reward-model layout for a value head; export a GLMForScalarHead "
                         f"to the Hugging Face {HF_REWARD_ARCHITECTURE} layout instead")
    names = {v: k for k, v in _thudm_names(config).items()}
    return {names[k]: t for k, t in sd.items()}


# ---- files ----------------------------------------------------------------------------------------

def _weight_files(path: Path) -> list[Path]:
    """The weight files of a HF-style directory: its *.safetensors (those its index lists, when it has one), or
    else its pytorch_model*.bin files."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        files = sorted(path.glob("pytorch_model*.bin"))
        if not files:
            raise FileNotFoundError(f"{path}: no *.safetensors or pytorch_model*.bin weight files found")
        return files
    index = path / "model.safetensors.index.json"
    if index.is_file():
        wanted = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [w for w in wanted if not (path / w).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shard files that do not exist: {missing}")
        files = [path / w for w in wanted]
    return files


def read_checkpoint_dir(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a HF-style directory: *.safetensors (with or without index) or pytorch_model*.bin."""
    from safetensors.torch import load_file
    files = _weight_files(path)
    sd = {}
    if files[0].suffix == ".bin":
        for f in files:
            sd.update(torch.load(f, map_location="cpu", weights_only=True))
        return sd
    for f in files:
        try:
            sd.update(load_file(str(f)))
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
            raise ValueError(f"cannot read weight file {f}: {e}") from e
    return sd


# ---- reading a model directory tensor by tensor (training runs starting from HF / THUDM weights) -------------
ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads",
                       "num_kv_groups", "kv_channels", "rotary_fraction", "rope_ratio", "layernorm_epsilon", "qkv_bias")
"""The config fields that decide a checkpoint's tensors and the block's numerics (not token ids or names)."""


def model_dir_type(path) -> Optional[str]:
    """"glm" (Hugging Face GlmForCausalLM / GlmForSequenceClassification) or "chatglm" (THUDM ChatGLM2/3, GLM-4)
    when ``path`` is a model directory (config.json with that model_type), else None."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        return None
    try:
        model_type = json.loads(cfg_file.read_text()).get("model_type")
    except (ValueError, AttributeError):
        return None
    return model_type if model_type in ("glm", "chatglm") else None


def model_dir_config(path) -> GLMConfig:
    """The GLMConfig of a Hugging Face or THUDM model directory's config.json."""
    path = Path(path)
    model_type = model_dir_type(path)
    if model_type is None:
        found = None
        if (path / "config.json").is_file():
            try:
                found = json.loads((path / "config.json").read_text()).get("model_type")
            except (ValueError, AttributeError):
                found = "unreadable"
        raise ValueError(f"{path}: not a GLM model directory (expected config.json with model_type 'glm' or "
                         f"'chatglm'; found {found!r}"
                         + (": Glm4ForCausalLM has sandwich norms, a different block" if found == "glm4" else "") + ")")
    raw = json.loads((path / "config.json").read_text())
    return GLMConfig.from_hf(raw) if model_type == "glm" else GLMConfig.from_chatglm(raw)


class ModelDirReader:
    """Engine-named full tensors of a Hugging Face (``glm``) or THUDM (``chatglm``) model directory, read one at
    a time (safetensors headers and lazy slices; ``pytorch_model*.bin`` files are loaded whole, memory-mapped),
    so a rank reading its shards never holds more than one full tensor beyond them."""

    def __init__(self, path, config: GLMConfig):
        from safetensors import safe_open
        self.path, self.config = Path(path), config
        self.model_type = model_dir_type(self.path)
        if self.model_type is None:
            raise ValueError(f"{self.path}: not a GLM model directory")
        self._files: dict[str, object] = {}  # source name -> safe_open handle or a loaded dict
        for f in _weight_files(self.path):
            if f.suffix == ".bin":
                try:
                    handle = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError:  # a pre-zipfile .bin cannot be memory-mapped: read it whole
                    handle = torch.load(f, map_location="cpu", weights_only=True)
            else:
                try:
                    handle = safe_open(str(f), framework="pt")
                except Exception as e:  # safetensors' own error types for truncated/corrupt files
                    raise ValueError(f"cannot read weight file {f}: {e}") from e
            self._files.update({k: handle for k in handle.keys() if not _ignored(k)})
        if self.model_type == "glm":
            self._sources = {v: k for k, v in _hf_names(config).items()}
            for i in range(config.num_layers):
                for kind in ("weight", "bias"):
                    self._sources[f"layers.{i}.attention.qkv.{kind}"] = tuple(
                        _HF_LAYER.format(i=i) + f"self_attn.{x}_proj.{kind}" for x in "qkv")
        else:
            self._sources = {v: k for k, v in _thudm_names(config).items()}

    def names(self) -> set[str]:
        """The engine names this directory has every source tensor of."""
        out = set()
        for name, source in self._sources.items():
            parts = source if isinstance(source, tuple) else (source,)
            if all(p in self._files for p in parts):
                out.add(name)
        return out

    def unplaced(self) -> list[str]:
        """Source tensors no engine name reads (another model's tensors)."""
        used = {p for s in self._sources.values() for p in (s if isinstance(s, tuple) else (s,))}
        return sorted(set(self._files) - used)

    def _read(self, source: str) -> torch.Tensor:
        handle = self._files[source]
        return handle[source] if isinstance(handle, dict) else handle.get_tensor(source)

    def get(self, name: str) -> torch.Tensor:
        """The full tensor ``name`` (engine naming; qkv fused from HF's q/k/v)."""
        source = self._sources[name]
        if isinstance(source, tuple):
            return torch.cat([self._read(s) for s in source], dim=0)
        return self._read(source)


def _is_scalar_head(cls) -> bool:
    from engine.model.glm import GLMForScalarHead
    return issubclass(cls, GLMForScalarHead)


def _num_labels(d: dict) -> int:
    """num_labels of a config.json dict as transformers reads it: the field, else len(id2label), else 2."""
    if d.get("num_labels") is not None:
        return int(d["num_labels"])
    return len(d["id2label"]) if d.get("id2label") else 2


def _tensor_names(path: Path) -> set[str]:
    """Tensor names of a HF directory without reading the tensors (safetensors headers / index)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    from safetensors import safe_open
    names: set[str] = set()
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            names.update(st.keys())
    return names


def is_reward_model_dir(path) -> bool:
    """Whether a HF checkpoint directory holds a GlmForSequenceClassification: its config.json's
    ``architectures`` decide; without them, a ``score.weight`` tensor (as ``load_hf`` decides)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        return False
    architectures = json.loads(cfg_file.read_text()).get("architectures") or []
    return HF_REWARD_ARCHITECTURE in architectures if architectures else "score.weight" in _tensor_names(path)


def _check_head(cls, is_reward_model: bool, num_labels: int, source: str) -> None:
    """A causal LM loads only into GLMForCausalLM, a num_labels=1 sequence classifier only into GLMForScalarHead."""
    if _is_scalar_head(cls) and not is_reward_model:
        raise ValueError(f"{source} is a causal LM, not a {HF_REWARD_ARCHITECTURE}; to start a reward model or critic "
                         "from it use GLMForScalarHead.from_causal_lm(GLMForCausalLM.from_hf(...)) (trunk only, fresh head)")
    if not _is_scalar_head(cls) and is_reward_model:
        raise ValueError(f"{source} is a {HF_REWARD_ARCHITECTURE} (reward model), not a causal LM; "
                         "load it with GLMForScalarHead.from_hf")
    if is_reward_model and num_labels != 1:
        raise ValueError(f"{source}: {HF_REWARD_ARCHITECTURE} with num_labels={num_labels}; the engine's scalar head "
                         "(reward model / critic) needs num_labels=1")


def load_hf(cls, path_or_model, spec=None, dtype: Optional[torch.dtype] = None):
    """Build ``cls`` from Hugging Face or THUDM weights. Runs no remote code.

    GLMForCausalLM: a HF GlmForCausalLM model/dir or a THUDM ChatGLM dir. GLMForScalarHead: a HF
    GlmForSequenceClassification (num_labels=1) model/dir."""
    value_head = _is_scalar_head(cls)
    if isinstance(path_or_model, (str, Path)):
        path = Path(path_or_model)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face GLM or THUDM ChatGLM checkpoint directory)")
        raw = json.loads(cfg_file.read_text())
        model_type = raw.get("model_type")
        if model_type == "chatglm" and value_head:
            raise ValueError(f"{path} is a THUDM ChatGLM language model (THUDM has no reward-model layout); "
                             "start a scalar head from it with GLMForScalarHead.from_causal_lm(GLMForCausalLM.from_hf(...))")
        readers = {"glm": GLMConfig.from_hf, "chatglm": GLMConfig.from_chatglm}
        if model_type not in readers:
            raise ValueError(f"{cfg_file}: model_type {model_type!r} is not supported; expected 'glm' "
                             "(transformers GlmForCausalLM / GlmForSequenceClassification) or 'chatglm' "
                             "(THUDM ChatGLM2/3, GLM-4)")
        config = readers[model_type](raw)
        sd = read_checkpoint_dir(path)
        if model_type == "glm":
            # the declared architecture decides; without one, the tensors do
            architectures = raw.get("architectures") or []
            is_reward_model = HF_REWARD_ARCHITECTURE in architectures if architectures else "score.weight" in sd
            _check_head(cls, is_reward_model, _num_labels(raw), str(path))
            engine_sd = hf_to_engine(sd, config, source=str(path), value_head=value_head)
        else:
            engine_sd = thudm_to_engine(sd, config, source=str(path))
    else:
        hf = path_or_model
        if not hasattr(hf, "config") or not hasattr(hf, "state_dict"):
            raise TypeError(f"from_hf expects a path or a transformers GlmForCausalLM / {HF_REWARD_ARCHITECTURE}, "
                            f"got {type(hf).__name__}")
        # GlmForSequenceClassification holds its head as ``score``, GlmForCausalLM as ``lm_head``
        _check_head(cls, hasattr(hf, "score"), hf.config.num_labels, type(hf).__name__)
        config = GLMConfig.from_hf(hf.config)
        engine_sd = hf_to_engine(hf.state_dict(), config, source=type(hf).__name__, value_head=value_head)
    model = cls(config, spec, init=False)
    model.load_state_dict(engine_sd, strict=True)
    if dtype is not None:
        model = model.to(dtype)
    return model


# LoRA adapters (engine/model/lora.py) as a PEFT adapter of GlmForCausalLM: the fused qkv adapter becomes one
# adapter per q/k/v projection, each with the shared A and its rows of B (exact: q/k/v rows of B A)
_PEFT_MODULES = {"attention.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                 "attention.dense": ("self_attn.o_proj",), "mlp.gate_up": ("mlp.gate_up_proj",),
                 "mlp.down": ("mlp.down_proj",)}
_PEFT_PREFIX = "base_model.model."


def engine_lora_to_peft(sd: dict[str, torch.Tensor], config: GLMConfig) -> dict[str, torch.Tensor]:
    """The adapter factors of a full engine state dict (``layers.i.<projection>.lora.A/B``), by PEFT name
    (``base_model.model.model.layers.i.self_attn.q_proj.lora_A.weight``); other tensors are left out."""
    d, hq, hkv = config.kv_channels, config.num_attention_heads, config.num_kv_groups
    out = {}
    for k, t in sd.items():
        if ".lora." not in k:
            continue
        _, i, rest = k.split(".", 2)
        projection, factor = rest.rsplit(".lora.", 1)
        modules = _PEFT_MODULES[projection]
        parts = t.split([hq * d, hkv * d, hkv * d], dim=0) if factor == "B" and len(modules) == 3 else [t] * len(modules)
        for module, part in zip(modules, parts):
            out[_PEFT_PREFIX + _HF_LAYER.format(i=i) + f"{module}.lora_{factor}.weight"] = part.clone()  # own storage
    return out


def save_peft_adapter(sd: dict[str, torch.Tensor], config: GLMConfig, rank: int, alpha: float, directory,
                      base_model: str = "") -> Path:
    """``adapter_model.safetensors`` + ``adapter_config.json`` that ``peft.PeftModel.from_pretrained(
    GlmForCausalLM, directory)`` loads: the adapters of the full engine state dict ``sd`` (rank, alpha:
    their ``LoRAConfig``; scale alpha / rank, PEFT's default scaling); ``base_model`` goes into the config's
    ``base_model_name_or_path``."""
    from safetensors.torch import save_file
    tensors = engine_lora_to_peft(sd, config)
    if not tensors:
        raise ValueError("the state dict holds no LoRA adapters (layers.i.<projection>.lora.A / .B)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu() for k, v in tensors.items()}, str(directory / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    modules = sorted({k.split(".")[-3] for k in tensors})  # q_proj, k_proj, ..., gate_up_proj
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
           "target_modules": modules, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
           "inference_mode": True, "base_model_name_or_path": base_model}
    (directory / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return directory


def save_hf(model, directory, max_shard_bytes: int = 5 * 2**30) -> None:
    """safetensors + config.json loadable by ``transformers.GlmForCausalLM.from_pretrained``, or for a
    GLMForScalarHead by ``transformers.GlmForSequenceClassification.from_pretrained`` (num_labels=1)."""
    from safetensors.torch import save_file
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf_sd = engine_to_hf({k: v.detach().cpu() for k, v in model.state_dict().items()}, model.config)
    cfg = model.config.to_hf_dict()
    if _is_scalar_head(type(model)):
        # HF pools at the last token != pad_token_id (to_hf_dict sets it), so batches need it
        cfg.update(architectures=[HF_REWARD_ARCHITECTURE], num_labels=1,
                   id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    cfg["torch_dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    shards, current, size = [], {}, 0
    for k, t in hf_sd.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k], size = t, size + nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(directory / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for n, shard in enumerate(shards):
            fname = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(directory / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in hf_sd.values())
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
