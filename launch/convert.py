"""Convert GLM checkpoints between layouts.

    python -m launch.convert --input DIR --output DIR [--to hf|thudm] [--dtype fp32|bf16|fp16]
    python -m launch.convert --checkpoint DIR [--step N] --output DIR [--to hf|thudm|peft] [--dtype ...]

--input: a Hugging Face GLM directory (model_type "glm": GlmForCausalLM, or GlmForSequenceClassification
with num_labels=1 for a reward model) or an original THUDM ChatGLM2/3 / GLM-4 directory (model_type
"chatglm"); nothing from the directory is executed. --checkpoint: an engine training checkpoint
directory (``engine.train.checkpoint``, any tp/pp/dp layout; the step named by its ``latest`` file, or
--step N), verified against its manifest and assembled in this process; a LoRA run's adapters are
folded into the weights they adapt (``W + alpha / r * B A``), unless --to peft: then DIR holds the frozen
weights in the HF layout and DIR/adapter the adapters as a PEFT LoRA adapter (``peft.PeftModel.from_pretrained(
GlmForCausalLM.from_pretrained(DIR), DIR/adapter)``; the fused qkv adapter becomes q/k/v adapters sharing A).
--to hf (default) writes safetensors + config.json that ``transformers.GlmForCausalLM.from_pretrained``
loads, or for a scalar-head model (GLMForScalarHead: reward model / critic) what
``transformers.GlmForSequenceClassification.from_pretrained`` loads (``model.*`` + ``score.weight``);
--to thudm writes the THUDM tensor names and config fields (language models only: THUDM has no
reward-model layout).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _check_target(value_head: bool, to: str, source: str) -> None:
    if value_head and to == "thudm":
        raise ValueError(f"{source} is a scalar-head model (reward model / critic) and THUDM ChatGLM has no "
                         "reward-model layout; use --to hf (GlmForSequenceClassification)")


def _write(model, output_dir: str, to: str) -> Path:
    out = Path(output_dir)
    if to == "hf":
        model.save_hf(out)
    else:
        from safetensors.torch import save_file
        from engine.model.hf_adapter import engine_to_thudm
        out.mkdir(parents=True, exist_ok=True)
        sd = engine_to_thudm({k: v.detach().contiguous() for k, v in model.state_dict().items()}, model.config)
        save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
        (out / "config.json").write_text(json.dumps(model.config.to_chatglm(), indent=2))
    return out


def convert(input_dir: str, output_dir: str, to: str = "hf", dtype: str | None = None) -> Path:
    from engine.model.glm import GLMForCausalLM, GLMForScalarHead
    from engine.model.hf_adapter import is_reward_model_dir
    value_head = is_reward_model_dir(input_dir)
    _check_target(value_head, to, input_dir)
    cls = GLMForScalarHead if value_head else GLMForCausalLM
    model = cls.from_hf(input_dir, dtype=DTYPES[dtype] if dtype else None)
    return _write(model, output_dir, to)


def convert_checkpoint(checkpoint_dir: str, output_dir: str, step: Optional[int] = None, to: str = "hf",
                       dtype: str | None = None) -> Path:
    """Export an engine training checkpoint (model weights only) to the HF or THUDM layout: a
    GLMForCausalLM as GlmForCausalLM, a GLMForScalarHead as GlmForSequenceClassification (HF only)."""
    from engine.model.glm import GLMForCausalLM, GLMForScalarHead
    from engine.model.hf_adapter import expected_shapes
    from engine.train.checkpoint import CheckpointError, read_full_model_state, read_manifest
    classes = {c.__name__: c for c in (GLMForCausalLM, GLMForScalarHead)}
    manifest = read_manifest(checkpoint_dir, step)
    model_class = manifest.get("model_class")
    lora = manifest.get("lora")
    if to == "peft" and (not lora or model_class != "GLMForCausalLM"):
        raise CheckpointError(f"{checkpoint_dir}: --to peft exports LoRA adapters of a language model; this checkpoint "
                              + ("holds none (use --to hf)" if not lora else f"is a {model_class}"))
    if model_class not in classes:
        raise CheckpointError(f"{checkpoint_dir}: manifest model_class {model_class!r} is not one of {list(classes)}")
    value_head = model_class == "GLMForScalarHead"
    _check_target(value_head, to, checkpoint_dir)
    config, sd = read_full_model_state(checkpoint_dir, step)
    adapters = None
    if to == "peft":  # the frozen weights as they are, the adapters beside them
        adapters, sd = sd, {k: v for k, v in sd.items() if ".lora." not in k}
    elif lora:  # a LoRA run: export the adapted model, adapters folded into the weights
        from engine.model.lora import merge_state_dict
        sd = merge_state_dict(sd, lora["scale"])
    expected = expected_shapes(config, value_head)
    if set(sd) != set(expected):
        extra, missing = sorted(set(sd) - set(expected)), sorted(set(expected) - set(sd))
        hint = ("; value_head.bias is from before the value head became bias-free (HF's score has no bias), "
                "so it cannot be exported exactly" if "value_head.bias" in extra else "")
        raise CheckpointError(f"{checkpoint_dir}: tensors do not match a {model_class} of its config "
                              f"(unexpected {extra[:5]}, missing {missing[:5]}){hint}")
    model = classes[model_class](config, init=False)
    model.load_state_dict(sd, strict=True)
    if dtype:
        model = model.to(DTYPES[dtype])
    if adapters is not None:
        from engine.model.hf_adapter import save_peft_adapter
        out = _write(model, output_dir, "hf")
        adapters = {k: v.to(DTYPES[dtype]) if dtype else v for k, v in adapters.items()}
        save_peft_adapter(adapters, config, lora["rank"], lora["scale"] * lora["rank"], out / "adapter", str(out))
        return out
    return _write(model, output_dir, to)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="HF GLM or THUDM ChatGLM directory to read")
    source.add_argument("--checkpoint", help="engine training checkpoint directory to export")
    p.add_argument("--step", type=int, default=None, help="with --checkpoint: the step (default: latest)")
    p.add_argument("--output", required=True, help="directory to write")
    p.add_argument("--to", choices=["hf", "thudm", "peft"], default="hf",
                   help="peft (--checkpoint of a LoRA run): the frozen weights (hf) and DIR/adapter (PEFT LoRA)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast weights (default: keep)")
    args = p.parse_args(argv)
    if args.step is not None and args.checkpoint is None:
        p.error("--step needs --checkpoint")
    if args.to == "peft" and args.checkpoint is None:
        p.error("--to peft exports the adapters of a LoRA training checkpoint: it needs --checkpoint")
    try:
        if args.checkpoint is not None:
            out = convert_checkpoint(args.checkpoint, args.output, args.step, args.to, args.dtype)
        else:
            out = convert(args.input, args.output, args.to, args.dtype)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.to} checkpoint to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
