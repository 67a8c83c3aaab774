"""launch.convert: HF <-> THUDM layouts on disk, and a clear error on a bad input directory."""
import subprocess
import sys

import torch

from engine import GLMConfig, GLMForCausalLM
from launch.convert import main


def test_convert_hf_to_thudm_and_back(tmp_path):
    cfg = GLMConfig.preset("tiny").replace(num_layers=2, vocab_size=256)
    torch.manual_seed(0)
    model = GLMForCausalLM(cfg)
    model.save_hf(tmp_path / "hf")
    assert main(["--input", str(tmp_path / "hf"), "--output", str(tmp_path / "thudm"), "--to", "thudm"]) == 0
    assert main(["--input", str(tmp_path / "thudm"), "--output", str(tmp_path / "hf2"), "--dtype", "bf16"]) == 0
    back = GLMForCausalLM.from_hf(tmp_path / "hf2")
    for k, v in model.state_dict().items():
        assert torch.equal(v.to(torch.bfloat16), back.state_dict()[k]), k


def test_convert_bad_input_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "launch.convert", "--input", str(tmp_path), "--output",
                           str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "no config.json" in proc.stderr
