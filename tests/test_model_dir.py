"""Training runs that start from a Hugging Face or THUDM model directory: ``load_model_weights`` reads each
rank's shards tensor by tensor (any tp / pp layout, replicated KV heads included) and gives exactly the
weights ``from_hf`` gives; ``--model DIR`` takes the config from it, ``--tokenizer`` the run's tokenizer; a
directory that does not fit the model is refused, naming what differs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.config import GLMConfig, load_config
from engine.model.glm import GLMForCausalLM, GLMForScalarHead
from engine.parallel import ParallelDims, ParallelLayout
from engine.parallel.pipeline import build_model_chunks
from engine.parallel.sharding import gather_full_state_dict
from engine.train.checkpoint import CheckpointError, load_model_weights
from tests._dist import run_distributed

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parent.parent


def _config() -> GLMConfig:
    return GLMConfig.preset("tiny").replace(num_layers=2)  # 8 heads, 2 KV groups; the built-in tokenizer's vocab


def _hf_dir(path: Path, reward: bool = False, seed: int = 0, max_shard_size: str = "1MB") -> Path:
    """A random transformers GlmForCausalLM (or GlmForSequenceClassification, num_labels=1) saved as
    safetensors shards with an index; biases and norms randomised so their mapping shows."""
    torch.manual_seed(seed)
    hf_config = _config().to_hf()
    if reward:
        hf_config.num_labels = 1
        model = transformers.GlmForSequenceClassification(hf_config)
    else:
        model = transformers.GlmForCausalLM(hf_config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return path


def _layouts(rank, world_size, directories):
    out = {}
    for name, dims in (("tp2_pp2", ParallelDims(tp=2, pp=2)), ("tp4", ParallelDims(tp=4))):
        layout = ParallelLayout.build(dims, name=name)
        states = {}
        for kind, cls, directory, allow in (("lm", GLMForCausalLM, directories["lm"], ()),
                                            ("critic", GLMForScalarHead, directories["lm"], ("value_head.",)),
                                            ("reward", GLMForScalarHead, directories["reward"], ()),
                                            ("thudm", GLMForCausalLM, directories["thudm"], ())):
            chunks = build_model_chunks(_config(), layout, model_cls=cls, seed=None)
            missing = load_model_weights(directory, chunks, layout, _config(), allow_missing=allow)
            local = {}
            for chunk in chunks:
                local.update(chunk.state_dict())
            states[kind] = (gather_full_state_dict(local, _config(), layout), missing)
        out[name] = states
    return out


def test_model_directories_load_on_every_layout_like_from_hf(tmp_path):
    from launch.convert import main as convert
    lm, reward = _hf_dir(tmp_path / "lm"), _hf_dir(tmp_path / "rm", reward=True, seed=1)
    assert (lm / "model.safetensors.index.json").is_file()  # several shards
    assert convert(["--input", str(lm), "--output", str(tmp_path / "thudm"), "--to", "thudm"]) == 0
    from engine.model.hf_adapter import ARCHITECTURE_FIELDS
    for directory in (lm, tmp_path / "thudm"):  # --model DIR: the config from config.json
        assert all(getattr(load_config(str(directory)), k) == getattr(_config(), k) for k in ARCHITECTURE_FIELDS)
    want_lm = GLMForCausalLM.from_hf(lm).state_dict()
    want_rm = GLMForScalarHead.from_hf(reward).state_dict()
    # one process
    model = GLMForCausalLM(_config())
    assert load_model_weights(lm, model, ParallelLayout.single(), _config()) == []
    assert all(torch.equal(model.state_dict()[k], v) for k, v in want_lm.items())
    results = run_distributed(_layouts, 4, {"lm": lm, "reward": reward, "thudm": tmp_path / "thudm"})
    for rank, r in enumerate(results):
        for layout, states in r.items():
            for kind, want in (("lm", want_lm), ("reward", want_rm), ("thudm", want_lm)):
                got, missing = states[kind]
                assert missing == [] and got.keys() == want.keys(), (layout, kind)
                assert all(torch.equal(got[k], want[k]) for k in want), (layout, kind, rank)
            got, missing = states["critic"]  # a critic from the LM: the trunk, a fresh value head (last stage)
            last_stage = layout == "tp4" or rank // 2 == 1  # tp2 x pp2: ranks 2 and 3 hold the second stage
            assert missing == (["value_head.weight"] if last_stage else []), (layout, rank, missing)
            assert all(torch.equal(got[k], want_lm[k]) for k in got if k != "value_head.weight"), (layout, rank)


def test_model_directory_errors(tmp_path):
    lm, reward = _hf_dir(tmp_path / "lm"), _hf_dir(tmp_path / "rm", reward=True)
    single = ParallelLayout.single()
    other = _config().replace(hidden_size=128, ffn_hidden_size=344)
    with pytest.raises(CheckpointError, match=r"config.json describes another model: hidden_size: 256 there vs 128 "
                                              r"in this run; ffn_hidden_size: 688 there vs 344"):
        load_model_weights(lm, GLMForCausalLM(other), single, other)
    with pytest.raises(CheckpointError, match=r"lacks \['value_head.weight'\] of this GLMForScalarHead"):
        load_model_weights(lm, GLMForScalarHead(_config()), single, _config(), allow_missing=())
    with pytest.raises(CheckpointError, match=r"lacks \['output_layer.weight'\] of this GLMForCausalLM"):
        load_model_weights(reward, GLMForCausalLM(_config()), single, _config(), allow_missing=())
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "config.json").write_text((lm / "config.json").read_text())
    from safetensors.torch import save_file
    save_file({"model.vision_tower.weight": torch.zeros(2)}, str(extra / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"holds \['model.vision_tower.weight'\], which a GLMForCausalLM has no "
                                              "place for"):
        load_model_weights(extra, GLMForCausalLM(_config()), single, _config())


def test_launchers_start_from_model_directories(tmp_path):
    """launch.train --model DIR --init-from DIR --tokenizer FILE (SFT on the built-in conversations; DPO with
    the directory as its reference) and launch.rlhf --model DIR --actor-from DIR --reward-from RM_DIR: all run
    from Hugging Face directories."""
    from engine.data.tokenizer import default_tokenizer
    lm, reward = _hf_dir(tmp_path / "lm"), _hf_dir(tmp_path / "rm", reward=True, seed=1)
    default_tokenizer(tmp_path / "cache")
    (tokenizer,) = (tmp_path / "cache").glob("default-tokenizer-*.model")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    sft = [sys.executable, "-m", "launch.train", "--mode", "sft", "--model", str(lm), "--init-from", str(lm),
           "--tokenizer", str(tokenizer), "--train-steps", "1", "--seq-length", "64", "--global-batch-size", "2",
           "--micro-batch-size", "1", "--eval-fraction", "0", "--log-dir", str(tmp_path / "sft")]
    proc = subprocess.run(sft, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"initialised from the weights in {lm}" in proc.stdout
    (line,) = [json.loads(x) for x in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert 0 < line["loss"] < 20
    # DPO: the directory is the policy's start and its frozen reference (fingerprinted for resumes)
    dpo = [a if a != "sft" else "dpo" for a in sft]
    dpo[dpo.index("--log-dir") + 1] = str(tmp_path / "dpo")
    proc = subprocess.run(dpo, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (line,) = [json.loads(x) for x in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert line["loss"] == pytest.approx(0.6931472, abs=1e-6)  # log 2: the policy is its reference
    ppo = [sys.executable, "-m", "launch.rlhf", "--model", str(lm), "--actor-from", str(lm), "--reward-from",
           str(reward), "--tokenizer", str(tokenizer), "--iterations", "1", "--rollout-prompts", "2",
           "--samples-per-prompt", "2", "--mini-batch-size", "4", "--micro-batch-size", "2", "--max-new-tokens", "4",
           "--log-dir", str(tmp_path / "ppo")]
    proc = subprocess.run(ppo, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (line,) = [json.loads(x) for x in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert line["step"] == 0 and line["ppo_steps"] >= 0
    # a tokenizer with more ids than the model's rows is refused
    small = tmp_path / "small"
    small.mkdir()
    cfg = json.loads((lm / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**cfg, "vocab_size": 1024}))
    bad = sft[:]
    bad[bad.index("--model") + 1] = str(small)
    proc = subprocess.run(bad[:bad.index("--init-from")] + bad[bad.index("--init-from") + 2:], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "more than the model's vocab_size=1024" in proc.stderr, proc.stderr


def test_tokenizer_and_directory_checks(tmp_path, capsys):
    """--tokenizer: a missing path is refused before any process group; a dataset tokenized by another
    tokenizer is refused; starting from a model directory needs the model's tokenizer. Directories: one that
    is both an engine checkpoint and a model directory, or holds another model type, is refused by name; RoPE
    scaling is refused; a model directory's fingerprint (DPO's reference id) follows its files."""
    from engine.data.tokenizer import default_tokenizer, train_tokenizer
    from engine.train.checkpoint import checkpoint_fingerprint, save_checkpoint
    from launch import preprocess
    from launch.train import main
    lm = _hf_dir(tmp_path / "lm")
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello there"}]}) + "\n")
    assert preprocess.main(["--input", str(chat), "--output-prefix", str(tmp_path / "chat"), "--kind", "chat",
                            "--quiet", "--tokenizer", "default"]) == 0
    (tmp_path / "other").mkdir()  # a directory: its tokenizer.model
    other = train_tokenizer([default_tokenizer().decode(list(range(200, 400)))] * 4, 600, tmp_path / "other")
    base = ["--mode", "sft", "--model", "tiny", "--train-steps", "1", "--seq-length", "32", "--global-batch-size", "1",
            "--micro-batch-size", "1", "--eval-fraction", "0", "--log-dir", str(tmp_path / "run")]
    assert main(base + ["--tokenizer", str(tmp_path / "nowhere")]) == 2
    assert f"--tokenizer {tmp_path / 'nowhere'}: no such file or directory" in capsys.readouterr().err
    assert main(base + ["--data-path", str(tmp_path / "chat"), "--tokenizer", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert other.fingerprint() in err and default_tokenizer().fingerprint() in err, err
    assert main(base + ["--model", str(lm), "--init-from", str(lm)]) == 2
    assert "is a released model directory: pass its tokenizer with --tokenizer" in capsys.readouterr().err
    # directories
    config = _config()
    both = _hf_dir(tmp_path / "both")
    save_checkpoint(both, 1, GLMForCausalLM(config), None, ParallelLayout.single(), config)
    with pytest.raises(CheckpointError, match="holds both an engine checkpoint"):
        load_model_weights(both, GLMForCausalLM(config), ParallelLayout.single(), config)
    glm4 = tmp_path / "glm4"
    glm4.mkdir()
    (glm4 / "config.json").write_text(json.dumps({"model_type": "glm4"}))
    with pytest.raises(CheckpointError, match="found 'glm4': Glm4ForCausalLM has sandwich norms"):
        load_model_weights(glm4, GLMForCausalLM(config), ParallelLayout.single(), config)
    raw = json.loads((lm / "config.json").read_text())
    with pytest.raises(ValueError, match="rope_type 'linear' is not supported"):
        GLMConfig.from_hf({**raw, "rope_scaling": {"rope_type": "linear", "factor": 4.0}})
    first = checkpoint_fingerprint(lm)
    assert checkpoint_fingerprint(lm) == first
    (lm / "config.json").write_text(json.dumps({**raw, "max_position_embeddings": 1234}))
    assert checkpoint_fingerprint(lm) != first
