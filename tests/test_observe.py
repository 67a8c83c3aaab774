"""observe.py (FLOPs/MFU, progress bar, TensorBoard) and launch.plot."""
from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from engine.config import GLMConfig
from engine.train.observe import ProgressBar, TensorBoardLogger, flops_per_token, mfu
from launch.plot import main as plot_main, plot_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_flops_per_token_by_hand():
    # h=8, hq=2, hkv=1, d=4, f=16, V=10, L=3, s=5
    c = GLMConfig(vocab_size=10, hidden_size=8, ffn_hidden_size=16, num_layers=3, num_attention_heads=2,
                  num_kv_groups=1, head_dim=4)
    weights = 2 * (8 * 4 * 4 + 2 * 4 * 8 + 3 * 8 * 16)  # 2*(128 + 64 + 384) = 1152
    attn = 2 * 2 * 5 * 2 * 4                              # 160
    head = 2 * 8 * 10                                     # 160
    assert weights == 1152 and attn == 160 and head == 160
    assert flops_per_token(c, 5, training=False) == 3 * (1152 + 160) + 160
    assert flops_per_token(c, 5) == 3 * (3 * 1312 + 160)                        # 12288
    assert flops_per_token(c, 5, recompute="full") == 12288 + 3 * 1312
    assert flops_per_token(c, 5, recompute="selective") == 12288 + 3 * 160
    assert flops_per_token(c, 5, causal=True) == 3 * (3 * (1152 + 80) + 160)
    h = c.hidden_size  # a scalar head: 2 h FLOPs per token instead of 2 h V (160 here)
    assert flops_per_token(c, 5, lm_head=False) == 12288 - 3 * (160 - 2 * h)
    # LoRA rank 2 on qkv and down: adapters 2 r (in + out) = 4 (8 + 16) + 4 (16 + 8) = 192 per layer; frozen
    # weights and output layer take 2x (forward, input gradient), adapters and attention 3x
    from engine.model.lora import LoRAConfig
    lora = LoRAConfig(rank=2, targets=("qkv", "down"))
    assert flops_per_token(c, 5, lora=lora) == 2 * (3 * 1152 + 160) + 3 * 3 * (192 + 160)
    assert flops_per_token(c, 5, lora=lora, recompute="full") == 2 * (3 * 1152 + 160) + 4 * 3 * (192 + 160) + 3 * 1152
    assert flops_per_token(c, 5, lora=lora, training=False) == 3 * (1152 + 192 + 160) + 160
    assert flops_per_token(c, 5, lora=lora, lm_head=False) == 2 * 3 * 1152 + 3 * 2 * h + 3 * 3 * (192 + 160)
    assert flops_per_token(c, 5, lora=LoRAConfig()) == 12288  # rank 0: no adapters
    assert mfu(1000.0, 12288.0, 1.2288e7 * 2, num_devices=1) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="recompute"):
        flops_per_token(c, 5, recompute="some")


def test_flops_glm4_9b_order_of_magnitude():
    # GLM-4-9B: ~9.4B params -> ~6 * N FLOPs per token, plus attention at s=4096
    c = GLMConfig(vocab_size=151552, hidden_size=4096, ffn_hidden_size=13696, num_layers=40,
                  num_attention_heads=32, num_kv_groups=2, head_dim=128)
    assert 6 * 8.5e9 < flops_per_token(c, 4096) < 6 * 11e9


def test_progress_bar_rank_and_tty():
    class Tty(io.StringIO):
        def isatty(self):
            return True
    assert not ProgressBar(10, rank=1, stream=Tty()).enabled
    assert not ProgressBar(10, rank=1, force=True, stream=Tty()).enabled
    assert not ProgressBar(10, rank=0, stream=io.StringIO()).enabled  # not a tty
    out = Tty()
    bar = ProgressBar(3, rank=0, stream=out)
    assert bar.enabled
    bar.update({"loss": 1.25, "tokens_per_s": 900.0})
    bar.close()
    assert "loss=1.2500" in out.getvalue() and "1/3" in out.getvalue()


def test_tensorboard_logger_writes(tmp_path):
    tb = TensorBoardLogger(tmp_path / "tb", rank=0)
    if tb.writer is None:
        pytest.skip("tensorboard not installed")
    tb.log({"step": 1, "loss": 2.0, "schedule": "x"})
    tb.close()
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())
    assert TensorBoardLogger(tmp_path / "tb1", rank=1).writer is None


def _write(run, records):
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_plot_writes_pngs(tmp_path):
    run = tmp_path / "run"
    _write(run, [{"step": i, "loss": 3 - 0.1 * i, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 100.0 + i,
                  "kl": 0.01 * i, "schedule": "1f1b"} for i in range(5)])
    paths = plot_run(run, tmp_path / "out")
    assert {p.name for p in paths} == {"loss.png", "lr.png", "grad_norm.png", "throughput.png", "kl.png"}
    for p in paths:
        data = p.read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_MAGIC)


def test_plot_errors_clearly(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_run(tmp_path / "nope")
    _write(tmp_path / "empty", [])
    with pytest.raises(ValueError, match="empty"):
        plot_run(tmp_path / "empty")
    _write(tmp_path / "odd", [{"step": 0, "foo": 1.0}])
    with pytest.raises(ValueError, match="no known numeric key"):
        plot_run(tmp_path / "odd")
    assert plot_main([str(tmp_path / "nope")]) == 2
    assert "error:" in capsys.readouterr().err


def test_plot_cli(tmp_path):
    _write(tmp_path / "r", [{"step": 0, "loss": 1.0}, {"step": 1, "loss": 0.5}])
    proc = subprocess.run([sys.executable, "-m", "launch.plot", str(tmp_path / "r")], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "r" / "plots" / "loss.png").read_bytes().startswith(PNG_MAGIC)


def test_saved_activation_meter_counts_each_saved_storage_once_until_backward_frees_it():
    import torch
    from engine.train.metrics import SavedActivationMeter
    w = torch.nn.Parameter(torch.randn(64, 32))
    x = torch.randn(8, 64, requires_grad=True)
    with SavedActivationMeter(exclude=[w]) as meter:
        y = (x @ w).relu()   # matmul saves x and w (a parameter: excluded); relu saves its output
        z = (y * y[:, :16].repeat(1, 2)).sum()  # saves y and a new tensor; y's storage is counted once
        held = meter.current
        z.backward()
    assert held == (8 * 64 + 8 * 32 + 8 * 32) * 4
    assert meter.peak == held and meter.current == 0  # backward released everything
    with SavedActivationMeter() as meter:  # a graph dropped without backward frees its tensors too
        loss = (x.exp() * 2).sum()
        assert meter.current == 8 * 64 * 4
        del loss
    assert meter.current == 0 and meter.peak == 8 * 64 * 4
