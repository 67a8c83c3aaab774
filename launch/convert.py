"""Convert GLM checkpoints between layouts.

    python -m launch.convert --input DIR --output DIR [--to hf|thudm] [--dtype fp32|bf16|fp16]

--input: a Hugging Face GLM directory (model_type "glm") or an original THUDM ChatGLM2/3 / GLM-4
directory (model_type "chatglm"); nothing from the directory is executed. --to hf (default) writes
safetensors + config.json that ``transformers.GlmForCausalLM.from_pretrained`` loads; --to thudm
writes the THUDM tensor names and config fields.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def convert(input_dir: str, output_dir: str, to: str = "hf", dtype: str | None = None) -> Path:
    from engine.model.glm import GLMForCausalLM
    model = GLMForCausalLM.from_hf(input_dir, dtype=DTYPES[dtype] if dtype else None)
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="checkpoint directory to read")
    p.add_argument("--output", required=True, help="directory to write")
    p.add_argument("--to", choices=["hf", "thudm"], default="hf")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast weights (default: keep)")
    args = p.parse_args(argv)
    try:
        out = convert(args.input, args.output, args.to, args.dtype)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.to} checkpoint to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
