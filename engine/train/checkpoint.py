"""Sharded training checkpoints on torch.distributed.checkpoint (DCP): atomic, verified, reshardable.

On disk (``DIR`` is the checkpoint directory of a run)::

    DIR/latest                          "step_000123": the newest committed step, written last
    DIR/step_000123/manifest.json       format version, step, model config, layout, tensor chunk table,
                                        optimizer hyper-parameters, the caller's extra state, and the
                                        size + sha256 of every other file of the step
    DIR/step_000123/.metadata           DCP metadata (a pickle: read only through an allow-list)
    DIR/step_000123/__<r>_0.distcp      DCP data written by rank r
    DIR/step_000123/rng/rank_<r>.json   python / numpy / torch (/ cuda) RNG states of rank r

Logical chunks. Every tensor is stored as row ranges of the FULL (unsharded) tensor along its
tensor-parallel split dim (dim 1 for the row-parallel ``dense`` / ``down`` weights, dim 0 otherwise),
one DCP key per range: ``<space>/<name>@<lo>:<hi>``, space in ``model``, ``optim.master``,
``optim.exp_avg``, ``optim.exp_avg_sq``. A TP rank's shard is 1 range (vocab rows, columns, a
replicated norm), 2 (gate | up) or 3 (q | k | v, see ``engine.parallel.sharding``). Each element is
written exactly once: replicated tensors by tp rank 0, a replicated KV head by the first rank of its
replica group, and each parameter by one DP rank (parameters are spread over the DP ranks by size,
so they share the writing; under context parallelism over the dp x cp ranks, which all hold the same
parameters). To load, a rank works out which full rows each of its local tensors needs under ITS
layout, reads the chunks that intersect them and assembles them; so any tp / pp / dp / vpp / cp, with
or without ZeRO-1, loads any checkpoint. Optimizer state is per parameter (fp32
master and both moments; ``DistributedOptimizer.param_states`` all-gathers ZeRO-1 shards over DP,
``load_param_states`` keeps this rank's shard), chunked like the parameters.

Commit protocol (save): rank 0 makes ``DIR/.tmp_step_000123_<nonce>``; DCP writes the data and
metadata with fsync; each rank writes its RNG file and hashes the files it wrote; rank 0 writes the
manifest, fsyncs, renames the temp dir to ``step_000123``, fsyncs ``DIR``, then replaces ``latest``
(temp file, fsync, ``os.replace``), and only then applies keep-last-k. A failure at any point (on
any rank) raises ``CheckpointError`` on every rank and leaves ``latest`` and its step untouched; a
temp dir left by a killed job is never taken for a step and is removed by the next save.

Trust: the only pickle read is DCP's ``.metadata`` (torch's own reader calls plain ``pickle.load``),
checked against the manifest's sha256 and unpickled with an allow-list of DCP metadata classes;
tensors are read by DCP with ``torch.load(weights_only=True)``; DCP byte items (which it would
``torch.load(weights_only=False)``) are refused. Manifest and RNG files are JSON.

LoRA (``engine.model.lora``): adapter factors are tensors like any other (``<projection>.lora.A`` /
``.B``, chunked along their projection's split dim), and the manifest records the adapters' rank, scale
and targets. A resume needs the same adapters; ``load_model_weights`` (a new run starting from a
checkpoint) folds a checkpoint's adapters into the projection weights it loads, so the new run starts
from the adapted model (with fresh adapters of its own, if it has any).

RNG: restored per rank when the layout (tp, pp, dp, vpp, cp, world size) equals the checkpoint's.
After a layout change the per-rank streams have no counterpart, so they are left as the caller
seeded them (a warning names both layouts); training is then reproducible but not bitwise equal to
an uninterrupted run. Resharded weights and optimizer states are bitwise equal (pure data movement).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import inspect
import io
import json
import os
import pickle
import random
import re
import shutil
import threading
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from engine.config import GLMConfig
from engine.model.lora import folded, lora_record
from engine.parallel.sharding import _role, kv_heads_of_rank, kv_replication

FORMAT = "glm-engine-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest"
DCP_METADATA = ".metadata"
OPTIM_KEYS = ("master", "exp_avg", "exp_avg_sq")
MODEL_SPACE = "model"
OPTIM_SPACES = tuple(f"optim.{k}" for k in OPTIM_KEYS)
_STEP_RE = re.compile(r"^step_(\d{6,})$")
_HASH_BLOCK = 8 * 2**20
_QUIET_DCP = ".*assuming the intent is to (load|save) in a single process.*"  # we choose no_dist on purpose


class CheckpointError(ValueError):
    """A checkpoint cannot be written or read: names the file (and field) at fault."""


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


# ---- logical chunks -------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Piece:
    local_lo: int    # start along ``dim`` in the local tensor
    full_lo: int     # start along ``dim`` in the full tensor
    length: int
    owner: bool      # this TP rank writes the piece (False for a replica another rank writes)


@dataclass(frozen=True)
class _TensorMap:
    dim: int
    full_shape: tuple
    pieces: tuple


def _tensor_map(name: str, local_shape: tuple, config: GLMConfig, tp: int, tp_rank: int) -> _TensorMap:
    """Where the local tensor ``name`` of ``tp_rank`` lies in the full tensor (see module docstring)."""
    role = _role(name)
    if role == "replicated" or tp == 1 and role != "qkv":
        dim = 1 if role == "columns" else 0
        return _TensorMap(dim, local_shape, (_Piece(0, 0, local_shape[dim], tp_rank == 0),))
    if role in ("vocab", "columns"):
        dim = 1 if role == "columns" else 0
        n = local_shape[dim]
        full = list(local_shape)
        full[dim] = n * tp
        return _TensorMap(dim, tuple(full), (_Piece(0, tp_rank * n, n, True),))
    if role == "gate_up":
        half = local_shape[0] // 2
        f = half * tp
        return _TensorMap(0, (2 * f,) + local_shape[1:],
                          (_Piece(0, tp_rank * half, half, True), _Piece(half, f + tp_rank * half, half, True)))
    # qkv: [q_r | k_r | v_r]; a replicated KV head is written by the first rank of its replica group
    d, hq, g = config.kv_channels, config.num_attention_heads, config.num_kv_groups
    q_rows = hq // tp * d
    heads = kv_heads_of_rank(config, tp, tp_rank)
    kv_lo, kv_rows = heads.start * d, len(heads) * d
    kv_owner = tp_rank % kv_replication(config, tp) == 0
    return _TensorMap(0, (config.qkv_size,) + local_shape[1:], (
        _Piece(0, tp_rank * q_rows, q_rows, True),
        _Piece(q_rows, hq * d + kv_lo, kv_rows, kv_owner),
        _Piece(q_rows + kv_rows, (hq + g) * d + kv_lo, kv_rows, kv_owner)))


def _key(space: str, name: str, lo: int, hi: int) -> str:
    return f"{space}/{name}@{lo}:{hi}"


def _named_params(model) -> dict[str, nn.Parameter]:
    """Parameters of a model or of a list of model chunks (virtual pipeline), by engine name."""
    chunks = list(model) if isinstance(model, (list, tuple, nn.ModuleList)) else [model]
    out: dict[str, nn.Parameter] = {}
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            if name in out:
                raise CheckpointError(f"parameter {name!r} appears in two model chunks")
            out[name] = p
    if not out:
        raise CheckpointError("the model has no parameters")
    return out


def _maps(params: dict, config: GLMConfig, layout) -> dict[str, _TensorMap]:
    return {n: _tensor_map(n, tuple(p.shape), config, layout.tp_size, layout.tp_rank) for n, p in params.items()}


def _writers(params: dict, dp: int) -> dict[str, int]:
    """DP rank that writes each parameter: largest first onto the least-loaded rank (deterministic,
    identical on every DP rank of a TP/PP slice, which all hold the same names and shapes)."""
    load = [0] * dp
    out = {}
    for name in sorted(params, key=lambda n: (-params[n].numel(), n)):
        r = min(range(dp), key=lambda i: (load[i], i))
        out[name] = r
        load[r] += params[name].numel()
    return out


# ---- process-group agreement --------------------------------------------------------------------
def _distributed(layout) -> bool:
    """Collectives span the default group whenever the layout has more than one rank."""
    if layout.world_size == 1:
        return False
    if not dist.is_initialized() or dist.get_world_size() != layout.world_size:
        raise CheckpointError(f"the layout has {layout.world_size} ranks but torch.distributed has "
                              f"{dist.get_world_size() if dist.is_initialized() else 'no process group'}")
    return True


def _all_gather(obj, layout, group=None) -> list:
    """Every rank's ``obj``, over the default group or ``group`` (one spanning every rank: the async
    saver's own)."""
    if not _distributed(layout):
        return [obj]
    out: list = [None] * layout.world_size
    dist.all_gather_object(out, obj, group=group)
    return out


def _agree(error: Optional[str], layout, what: str, group=None) -> None:
    """Raise the same CheckpointError on every rank if any rank failed (so no rank hangs in a later
    collective waiting for one that gave up)."""
    errors = [(r, e) for r, e in enumerate(_all_gather(error, layout, group)) if e]
    if errors:
        detail = "; ".join(f"rank {r}: {e}" for r, e in errors[:4])
        raise CheckpointError(f"{what} failed: {detail}")


def _describe(e: BaseException) -> str:
    failures = getattr(e, "failures", None)  # DCP's CheckpointException: {rank: (exception, stack)}
    if isinstance(failures, dict) and failures:
        return "; ".join(f"DCP rank {r}: {_describe(f[0] if isinstance(f, tuple) else f)}"
                         for r, f in sorted(failures.items()))
    return str(e) if isinstance(e, CheckpointError) else f"{type(e).__name__}: {e}"


def _dcp_errors() -> tuple:
    """DCP raises CheckpointException, a BaseException, for failures on any rank."""
    from torch.distributed.checkpoint.api import CheckpointException
    return (Exception, CheckpointException)


# ---- files --------------------------------------------------------------------------------------
def _digest(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return path.stat().st_size, h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _replace_durable(path: Path, data: bytes) -> None:
    """Atomically replace ``path``: temp file in the same dir, fsync, os.replace, fsync the dir."""
    tmp = path.with_name(f".{path.name}.tmp_{uuid.uuid4().hex[:8]}")
    _write_durable(tmp, data)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _remove_dir(path: Path) -> None:
    """Rename out of sight first (so a half-deleted dir never looks like a step), then delete."""
    trash = path.with_name(f".trash_{path.name}_{uuid.uuid4().hex[:8]}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _committed_steps(directory: Path) -> list[int]:
    if not directory.is_dir():
        return []
    return sorted(int(m.group(1)) for p in directory.iterdir()
                  if (m := _STEP_RE.match(p.name)) and (p / MANIFEST).is_file())


def committed_steps(directory: Union[str, Path]) -> list[int]:
    """The steps of ``DIR`` whose save completed (they have a manifest), oldest first."""
    return _committed_steps(Path(directory))


def remove_steps(directory: Union[str, Path], steps: Sequence[int]) -> None:
    """Delete these steps of ``DIR`` (each renamed out of sight first, then ``DIR`` fsynced). Call it on one
    rank; for savers that prune together (``keep_last`` across several models' directories)."""
    directory = Path(directory)
    for step in steps:
        _remove_dir(directory / step_dir_name(step))
    _fsync_dir(directory)


# ---- RNG ------------------------------------------------------------------------------------------
def _rng_state() -> dict:
    py = random.getstate()
    npy = np.random.get_state()
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return {"python": [py[0], list(py[1]), py[2]],
            "numpy": [npy[0], npy[1].tolist(), int(npy[2]), int(npy[3]), float(npy[4])],
            "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
            "cuda": cuda}


def _bytes_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def _rng_setter(state: dict, path: Path):
    """Validate a saved RNG state and return a function that installs it (so a bad file fails while
    loading, on the rank that reads it, before any rank changes anything)."""
    try:
        v, internal, gauss = state["python"]
        py = (int(v), tuple(int(x) for x in internal), None if gauss is None else float(gauss))
        kind, keys, pos, has_gauss, cached = state["numpy"]
        npy = (str(kind), np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached))
        cpu = _bytes_tensor(state["torch"])
        cuda = [_bytes_tensor(c) for c in state["cuda"]] if state.get("cuda") else None
        random.Random().setstate(py)
        np.random.RandomState().set_state(npy)
    except (KeyError, TypeError, ValueError, binascii.Error) as e:
        raise CheckpointError(f"{path} is corrupted ({type(e).__name__}: {e})") from None

    def install() -> None:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    return install


def _rng_file(rank: int) -> str:
    return f"rng/rank_{rank:05d}.json"


# ---- DCP metadata through an allow-list ---------------------------------------------------------
def _allowed_globals() -> dict:
    """(module, name) -> object of every global DCP's FileSystemWriter pickles into .metadata. Each is a
    plain data class, enum, path or lookup function: calling it builds a value and runs nothing else."""
    import collections
    import pathlib

    import torch.distributed.checkpoint.filesystem as dcp_fs
    import torch.distributed.checkpoint.metadata as dcp_md
    allowed = {("torch", "Size"): torch.Size, ("collections", "OrderedDict"): collections.OrderedDict,
               ("torch.serialization", "_get_layout"): torch.serialization._get_layout,  # name -> torch.layout
               ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): dcp_fs._StorageInfo}
    for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "TensorProperties",
                 "ChunkStorageMetadata", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"):
        if hasattr(dcp_md, name):
            allowed[("torch.distributed.checkpoint.metadata", name)] = getattr(dcp_md, name)
    for name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"):
        allowed[("pathlib", name)] = getattr(pathlib, name)
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata only: a global outside the allow-list (os.system, builtins.open, eval,
    ...: anything a hostile ``__reduce__`` would call) raises before it can be called."""

    def __init__(self, file):
        super().__init__(file)
        self.allowed = _allowed_globals()

    def find_class(self, module: str, name: str):
        if (module, name) in self.allowed:
            return self.allowed[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)  # dtypes are values, not callables
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in DCP metadata")


def _read_dcp_metadata(path: Path, expected: dict):
    data = _read_verified(path, expected)
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except Exception as e:
        raise CheckpointError(f"{path}: refused to load DCP metadata ({_describe(e)})") from None
    from torch.distributed.checkpoint.metadata import Metadata
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path}: not DCP metadata (got {type(metadata).__name__})")
    return metadata


def _read_verified(path: Path, expected: dict) -> bytes:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    data = path.read_bytes()
    if len(data) != expected["size"]:
        raise CheckpointError(f"{path} is truncated or corrupted: {len(data)} bytes, the manifest says "
                              f"{expected['size']}")
    if hashlib.sha256(data).hexdigest() != expected["sha256"]:
        raise CheckpointError(f"{path} is corrupted: its sha256 differs from the manifest's")
    return data


def _verify_file(path: Path, expected: dict) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    size = path.stat().st_size
    if size != expected["size"]:
        raise CheckpointError(f"{path} is truncated or corrupted: {size} bytes, the manifest says {expected['size']}")
    if _digest(path)[1] != expected["sha256"]:
        raise CheckpointError(f"{path} is corrupted: its sha256 differs from the manifest's")


# ---- DCP read ---------------------------------------------------------------------------------
def _dcp_load(step_dir: Path, metadata, keys_by_file: dict[str, dict[str, torch.Tensor]]) -> None:
    """Fill the tensors of ``keys_by_file`` ({file: {key: tensor}}) from ``step_dir``, one DCP load
    per data file (so an error names the file); no collectives."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import StorageMeta

    class VerifiedReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):  # never torch's pickle.load of .metadata
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class TensorOnlyPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):  # DCP would torch.load(weights_only=False) these
            raise CheckpointError(f"{read_item.dest_index.fqn} is stored as pickled bytes; refused")

    for fname, sd in keys_by_file.items():
        kwargs = {"no_dist": True} if "no_dist" in inspect.signature(dcp.load).parameters else {}
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_QUIET_DCP)
                if kwargs:
                    dcp.load(sd, storage_reader=VerifiedReader(step_dir), planner=TensorOnlyPlanner(), **kwargs)
                else:  # torch < 2.5: dcp.load has no no_dist switch
                    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
                    _load_state_dict(sd, VerifiedReader(step_dir), planner=TensorOnlyPlanner(), no_dist=True)
        except _dcp_errors() as e:
            raise CheckpointError(f"{step_dir / fname}: cannot read tensors ({_describe(e)[:2000]})") from None


# ---- manifest ----------------------------------------------------------------------------------
def _resolve_step_dir(directory: Path, step: Optional[int]) -> Path:
    if step is None:
        step = latest_step(directory)
        if step is None:
            raise CheckpointError(f"no checkpoint in {directory} (no {directory / LATEST} and no step directories)")
    step_dir = directory / step_dir_name(step)
    if not step_dir.is_dir():
        have = [step_dir_name(s) for s in _committed_steps(directory)]
        raise CheckpointError(f"{step_dir} does not exist (committed steps in {directory}: {have})")
    return step_dir


def _read_manifest(step_dir: Path) -> dict:
    """The step's manifest, checked for structure, chunk tiling, and presence and size of every file."""
    path = step_dir / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {step_dir} is not a committed checkpoint")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is corrupted (not valid JSON: {e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {manifest.get('version')!r}; this engine reads "
                              f"version {FORMAT_VERSION}")
    try:
        _check_manifest(step_dir, manifest)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path} is corrupted ({type(e).__name__}: {e})") from None
    return manifest


def _check_manifest(step_dir: Path, manifest: dict) -> None:
    path = step_dir / MANIFEST
    missing = [k for k in ("step", "config", "layout", "tensors", "files") if k not in manifest]
    if missing:
        raise CheckpointError(f"{path} is corrupted: missing fields {missing}")
    wrong = [k for k in ("config", "layout", "tensors", "files") if not isinstance(manifest[k], dict)]
    wrong += [] if isinstance(manifest["step"], int) else ["step"]
    if wrong:
        raise CheckpointError(f"{path} is corrupted: fields {wrong} have the wrong type")
    for space, entries in manifest["tensors"].items():
        for name, entry in entries.items():
            problem = _tiling_problem(entry)
            if problem:
                raise CheckpointError(f"{path} is corrupted: {space}/{name}: {problem}")
    for fname, info in manifest["files"].items():
        parts = Path(fname).parts
        if Path(fname).is_absolute() or ".." in parts or not parts:
            raise CheckpointError(f"{path} lists a file outside the step directory: {fname!r}")
        if not (step_dir / fname).is_file():
            raise CheckpointError(f"{step_dir / fname} is missing (listed in {path})")
        size = (step_dir / fname).stat().st_size
        if size != int(info["size"]) or not isinstance(info["sha256"], str):
            raise CheckpointError(f"{step_dir / fname} is truncated or corrupted: {size} bytes, {path} says "
                                  f"{info['size']}")
    if DCP_METADATA not in manifest["files"]:
        raise CheckpointError(f"{path} lists no {DCP_METADATA} file")


def _config_diff(saved: dict, config: GLMConfig) -> list[str]:
    mine = json.loads(json.dumps(config.to_dict()))
    return [f"{k}: checkpoint {saved.get(k)!r} vs this run {mine.get(k)!r}"
            for k in sorted(set(saved) | set(mine)) if k != "name" and saved.get(k) != mine.get(k)]


def _layout_dict(layout) -> dict:
    out = {"tp": layout.tp_size, "pp": layout.pp_size, "dp": layout.dp_size, "vpp": layout.vpp_size,
           "world_size": layout.world_size}
    if layout.cp_size > 1:  # absent at cp = 1, so manifests written before context parallelism still match
        out["cp"] = layout.cp_size
    return out


# ---- public API -------------------------------------------------------------------------------
def read_extra_state(directory: Union[str, Path], step: Optional[int] = None) -> dict:
    """The ``extra_state`` a checkpoint was saved with (the latest committed step by default), read from
    its manifest alone: a caller can check it before loading anything."""
    return dict(_read_manifest(_resolve_step_dir(Path(directory), step)).get("extra_state") or {})


def checkpoint_fingerprint(directory: Union[str, Path], step: Optional[int] = None) -> str:
    """A short hash of a committed checkpoint's manifest (the latest step by default): the same for the same
    saved weights wherever the directory is, different for any other save. For a Hugging Face / THUDM model
    directory: a hash of its config.json and of each weight file's name and size (reading no weights)."""
    import hashlib
    directory = Path(directory)
    if _model_dir(directory):
        h = hashlib.sha256((directory / "config.json").read_bytes())
        for f in sorted(directory.iterdir()):
            if f.suffix in (".safetensors", ".bin") or f.name.endswith(".index.json"):
                h.update(f"{f.name}:{f.stat().st_size}".encode())
        return h.hexdigest()[:16]
    manifest = _resolve_step_dir(directory, step) / MANIFEST
    return hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]


def _model_dir(directory: Path) -> bool:
    """Whether ``directory`` is a released model directory (config.json, no engine checkpoint): True for a
    Hugging Face GLM / THUDM ChatGLM one; CheckpointError for another model type, or for a directory that
    holds both layouts (which of them a run means is not clear)."""
    from engine.model.hf_adapter import model_dir_config, model_dir_type
    if not (directory / "config.json").is_file():
        return False
    if (directory / LATEST).exists():
        raise CheckpointError(f"{directory} holds both an engine checkpoint ({LATEST}) and a model config.json: "
                              "keep exported model directories apart from checkpoint directories")
    if model_dir_type(directory) is None:
        try:
            model_dir_config(directory)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    return True


def latest_step(directory: Union[str, Path]) -> Optional[int]:
    """Step named by ``DIR/latest``; None when ``DIR`` holds no checkpoint at all. Raises
    CheckpointError when ``latest`` is unreadable or points nowhere, or is missing while committed
    steps exist (never a silent fresh start)."""
    directory = Path(directory)
    pointer = directory / LATEST
    if not pointer.is_file():
        steps = _committed_steps(directory)
        if steps:
            raise CheckpointError(f"{pointer} is missing but {directory} holds committed checkpoints "
                                  f"{[step_dir_name(s) for s in steps]}; pass step= explicitly")
        return None
    text = pointer.read_text(errors="replace").strip()
    m = _STEP_RE.match(text)
    if not m:
        raise CheckpointError(f"{pointer} does not name a step directory (step_NNNNNN): {text[:80]!r}")
    if not (directory / text).is_dir():
        raise CheckpointError(f"{pointer} points to {directory / text}, which does not exist")
    return int(m.group(1))


def save_checkpoint(directory: Union[str, Path], step: int, model, optimizer, layout, config: GLMConfig,
                    extra_state: Optional[dict] = None, keep_last: Optional[int] = None,
                    tokenizer_fingerprint: Optional[str] = None) -> Path:
    """Save ``DIR/step_<step>`` and point ``DIR/latest`` at it (collective over every rank of ``layout``).

    ``model``: the model or this rank's list of model chunks; ``optimizer``: a DistributedOptimizer
    or None; ``extra_state``: JSON-serialisable, the same on every rank (LR-scheduler state, data
    position, ...), returned by ``load_checkpoint``; ``keep_last``: after the commit, delete all but
    the newest ``keep_last`` steps. Returns the step directory. ``AsyncCheckpointer`` writes the same
    checkpoint while training goes on.
    """
    snapshot = _snapshot(Path(directory), step, model, optimizer, layout, config, extra_state, keep_last,
                         tokenizer_fingerprint, to_host=False)
    return _persist(snapshot, layout)


@dataclass
class _Snapshot:
    """What a save writes, taken at the moment of the save: this rank's tensor chunks (``sd``, keys
    ``<space>/<name>@<lo>:<hi>``) and their table, its RNG state, and the manifest fields."""
    directory: Path
    name: str
    sd: dict
    table: list  # (space, name, dim, full_shape, dtype, lo, hi)
    rng: bytes
    manifest: dict
    keep_last: Optional[int]


def _snapshot(directory: Path, step, model, optimizer, layout, config: GLMConfig, extra_state, keep_last,
              tokenizer_fingerprint, to_host: bool, staging: Optional[dict] = None) -> _Snapshot:
    """Plan a save and copy what it writes (collective: the planning agreement, and under ZeRO-1 the
    optimizer's gather over DP). ``to_host``: the copies go to host memory (page-locked on CUDA), so
    the device memory is free again when this returns; ``staging`` (key -> host tensor) holds them from
    one save to the next, reused when shape and dtype match (page-locked allocation is slow)."""
    # 1. plan (local, no collectives), then agree: a bad argument on one rank fails every rank
    error, params, maps, extra_json = None, {}, {}, "{}"
    try:
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise CheckpointError(f"step={step!r} must be a non-negative integer")
        if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
            raise CheckpointError(f"keep_last={keep_last!r} must be a positive integer or None")
        params = _named_params(model)
        maps = _maps(params, config, layout)
        try:
            extra_json = json.dumps(extra_state or {}, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"extra_state is not JSON-serialisable: {e}") from None
        if optimizer is not None:
            ids = {id(p) for p in params.values()}
            unknown = [optimizer.names[i] for i, p in enumerate(optimizer.params) if id(p) not in ids]
            if unknown:
                raise CheckpointError(f"optimizer parameters {unknown[:5]} are not parameters of the model")
    except Exception as e:
        error = _describe(e)
    _agree(error, layout, "checkpoint save (planning)")
    extras = set(_all_gather(extra_json, layout))
    if len(extras) != 1:
        raise CheckpointError("checkpoint save: extra_state differs between ranks; it must be the same on all")

    # 2. this rank's DCP state dict: its chunks of the params it writes (optimizer state is gathered
    #    over DP first under ZeRO-1, a collective every DP rank joins)
    # every dp x cp rank holds the same parameters (and joins the optimizer's gather): split the writes over them
    replicas = layout.gradient_layout
    writers = _writers(params, replicas.dp_size)
    mine = [n for n in params if writers[n] == replicas.dp_rank]
    sd: dict[str, torch.Tensor] = {}
    table: list = []

    def copy(key: str, t: torch.Tensor) -> torch.Tensor:
        if not to_host:
            return t.clone()
        host = None if staging is None else staging.get(key)
        if host is None or host.shape != t.shape or host.dtype != t.dtype:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
            if staging is not None:
                staging[key] = host
        return host.copy_(t, non_blocking=t.is_cuda)

    def add(space: str, name: str, t: torch.Tensor) -> None:
        m = maps[name]
        for piece in m.pieces:
            if piece.owner:
                lo, hi = piece.full_lo, piece.full_lo + piece.length
                key = _key(space, name, lo, hi)
                sd[key] = copy(key, t.detach().narrow(m.dim, piece.local_lo, piece.length))
                table.append((space, name, m.dim, list(m.full_shape), str(t.dtype).removeprefix("torch."), lo, hi))

    error = None
    try:
        for name in mine:
            add(MODEL_SPACE, name, params[name])
    except Exception as e:  # e.g. no host memory for the copy: every rank must learn it (no one hangs)
        error = _describe(e)
    optim_meta = None
    if optimizer is not None:
        by_id = {id(p): n for n, p in params.items()}
        indices = [i for i, p in enumerate(optimizer.params) if writers[by_id[id(p)]] == replicas.dp_rank]
        states = optimizer.param_states(indices)  # a collective under ZeRO-1: every rank joins
        try:
            for i, state in states.items():
                for key, space in zip(OPTIM_KEYS, OPTIM_SPACES):
                    add(space, by_id[id(optimizer.params[i])], state[key])
        except Exception as e:
            error = error or _describe(e)
        optim_meta = {"step": optimizer.step_count, "lr": optimizer.lr, "betas": list(optimizer.betas),
                      "eps": optimizer.eps, "weight_decay": optimizer.weight_decay,
                      "use_distributed_optimizer": optimizer.distributed,
                      "mixed_precision": optimizer.mixed_precision}
    if to_host and torch.cuda.is_available():
        torch.cuda.synchronize()  # the non-blocking copies have landed before anyone reads them
    _agree(error, layout, "checkpoint save (copying this rank's state)")
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "step": step, "config": config.to_dict(),
                "layout": _layout_dict(layout), "model_class": _model_class(model), "lora": lora_record(model),
                "tokenizer_fingerprint": tokenizer_fingerprint, "optimizer": optim_meta,
                "extra_state": json.loads(extra_json), "torch_version": torch.__version__,
                "rng_files": [_rng_file(r) for r in range(layout.world_size)]}
    return _Snapshot(directory, step_dir_name(step), sd, table, json.dumps(_rng_state()).encode(), manifest,
                     keep_last)


def _persist(snap: _Snapshot, layout, group=None) -> Path:
    """Write, hash and commit a snapshot (collective over every rank, on the default group or ``group``)."""
    directory, name, rank = snap.directory, snap.name, layout.rank
    # 3. temp dir (rank 0 names it for everyone)
    tmp_name, error = None, None
    if rank == 0:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            for stale in directory.glob(".tmp_step_*"):  # left by a killed save: never a step
                shutil.rmtree(stale, ignore_errors=True)
            tmp_name = f".tmp_{name}_{uuid.uuid4().hex[:8]}"
            (directory / tmp_name / "rng").mkdir(parents=True)
        except Exception as e:
            error = _describe(e)
    tmp_name, error = _all_gather((tmp_name, error), layout, group)[0]
    if error:
        raise CheckpointError(f"checkpoint save: cannot create a temp dir in {directory}: {error}")
    tmp = directory / tmp_name
    try:
        gathered = _write_files(tmp, snap, layout, group)
        # 4. rank 0: manifest, rename, latest, keep-last-k; every rank learns the outcome
        error = None
        if rank == 0:
            try:
                _write_manifest(tmp, dict(snap.manifest), gathered)
                _commit(directory, tmp, name, snap.keep_last)
            except Exception as e:
                error = _describe(e)
        _agree(error, layout, f"checkpoint commit of {directory / name}", group)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory / name


class AsyncCheckpointer:
    """Checkpoint saves that overlap training (Megatron's ``--async-save``). ``save`` takes the snapshot,
    the collective part (planning, the ZeRO-1 gather, a copy of this rank's chunks to host memory),
    and returns; a background thread then writes, hashes and commits it, with the same files and the
    same atomic protocol as ``save_checkpoint``: ``latest`` moves only once the step is complete, so
    a job killed mid-write resumes from the previous step. The thread coordinates the ranks over a
    gloo group of its own, so its collectives never interleave with training's. One save is in
    flight at a time: ``save``, ``wait`` and ``close`` first wait for the previous one and raise its
    error (the same ``CheckpointError`` on every rank). Build it on every rank (``new_group`` is
    collective) and call ``close`` before the process group goes away. Costs host memory for one
    rank's share of the checkpoint, kept from one save to the next (page-locked allocation is slow on
    CUDA) until ``close``."""

    def __init__(self, layout):
        self.layout = layout
        self.group = dist.new_group(backend="gloo") if _distributed(layout) else None
        if self.group is None:  # the thread cannot scope a filter (catch_warnings is not thread-safe)
            warnings.filterwarnings("ignore", message=_QUIET_DCP)
        self._thread: Optional[threading.Thread] = None
        self._outcome: Optional[tuple] = None  # (step dir, None) or (None, exception)
        self._closed = False
        self._staging: dict = {}  # DCP key -> host copy, reused by the next save once this one is written

    def save(self, directory: Union[str, Path], step: int, model, optimizer, layout, config: GLMConfig,
             extra_state: Optional[dict] = None, keep_last: Optional[int] = None,
             tokenizer_fingerprint: Optional[str] = None) -> None:
        """Start saving ``DIR/step_<step>`` (arguments as ``save_checkpoint``); returns once the state is
        copied."""
        if self._closed:
            raise CheckpointError("AsyncCheckpointer.save after close(): build a new one")
        if layout.world_size != self.layout.world_size:
            raise CheckpointError(f"AsyncCheckpointer was built for {self.layout.world_size} ranks, save got a "
                                  f"layout of {layout.world_size}")
        self.wait()
        snapshot = _snapshot(Path(directory), step, model, optimizer, layout, config, extra_state, keep_last,
                             tokenizer_fingerprint, to_host=True, staging=self._staging)
        # a new thread starts on CUDA device 0; DCP's writer touches the current stream, which would make
        # every rank of a node open a context on GPU 0
        device = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        self._thread = threading.Thread(target=self._run, args=(snapshot, layout, device), name=f"checkpoint-{step}",
                                        daemon=True)
        self._thread.start()

    def _run(self, snapshot: _Snapshot, layout, device: Optional[int]) -> None:
        try:
            if device is not None:
                torch.cuda.set_device(device)
            self._outcome = (_persist(snapshot, layout, self.group), None)
        except BaseException as e:  # handed to the training thread by wait()
            self._outcome = (None, e)

    @property
    def in_flight(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> Optional[Path]:
        """Block until the save in flight (if any) is committed; return its step dir, or raise its error."""
        if self._thread is None:
            return None
        self._thread.join()
        self._thread = None
        (path, error), self._outcome = self._outcome, None
        if error is not None:
            raise error if isinstance(error, CheckpointError) else CheckpointError(
                f"async checkpoint save failed: {_describe(error)}") from error
        return path

    def close(self) -> Optional[Path]:
        """``wait``, then release the gloo group."""
        self._closed = True
        try:
            return self.wait()
        finally:
            self._staging = {}
            if self.group is not None:
                dist.destroy_process_group(self.group)
                self.group = None


def _model_class(model) -> str:
    chunks = list(model) if isinstance(model, (list, tuple, nn.ModuleList)) else [model]
    return type(chunks[0]).__name__


def _write_files(tmp: Path, snap: _Snapshot, layout, group=None) -> list:
    """DCP data + metadata, then each rank's RNG file; returns every rank's (file hashes, chunk table)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
    rank = layout.rank
    error = None
    try:
        kwargs = {}
        if not _distributed(layout) and "no_dist" in inspect.signature(dcp.save).parameters:
            kwargs["no_dist"] = True
        elif group is not None:
            kwargs["process_group"] = group
        writer = FileSystemWriter(tmp, single_file_per_rank=True, sync_files=True, thread_count=1)
        if threading.current_thread() is threading.main_thread():
            with warnings.catch_warnings():  # not thread-safe: the async saver's thread leaves the filters alone
                warnings.filterwarnings("ignore", message=_QUIET_DCP)
                dcp.save(snap.sd, storage_writer=writer, **kwargs)
        else:
            dcp.save(snap.sd, storage_writer=writer, **kwargs)
    except _dcp_errors() as e:  # DCP raises on every rank when one rank's write fails
        error = f"DCP write failed ({_describe(e)[:2000]})"
    _agree(error, layout, f"checkpoint save to {tmp}", group)

    # each rank: its RNG file (the state at the snapshot), and the size + sha256 of the files it wrote
    files, error = {}, None
    try:
        rng_path = tmp / _rng_file(rank)
        _write_durable(rng_path, snap.rng)
        written = [p for p in tmp.iterdir() if p.is_file() and p.name.startswith(f"__{rank}_")]
        if rank == 0:
            written.append(tmp / DCP_METADATA)
        for p in written + [rng_path]:
            size, sha = _digest(p)
            files[p.relative_to(tmp).as_posix()] = {"size": size, "sha256": sha}
    except Exception as e:
        error = _describe(e)
    gathered = _all_gather((files, snap.table, error), layout, group)
    _agree(error, layout, f"checkpoint save to {tmp} (hashing)", group)
    return [(f, t) for f, t, _ in gathered]


def _write_manifest(tmp: Path, manifest: dict, gathered: list) -> None:
    """Merge every rank's files and chunks, check the chunks tile each tensor, write the manifest."""
    all_files, tensors = {}, {}
    for r_files, r_table in gathered:
        all_files.update(r_files)
        for space, name, dim, shape, dtype, lo, hi in r_table:
            entry = tensors.setdefault(space, {}).setdefault(name, {"dim": dim, "shape": shape, "dtype": dtype,
                                                                     "chunks": []})
            entry["chunks"].append([lo, hi])
    on_disk = {p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file()}
    if on_disk != set(all_files):
        raise CheckpointError(f"{tmp}: files on disk {sorted(on_disk - set(all_files))} were not hashed by any "
                              f"rank, or hashed files {sorted(set(all_files) - on_disk)} are missing")
    for space, entries in tensors.items():  # every element written exactly once
        for name, entry in entries.items():
            entry["chunks"].sort()
            problem = _tiling_problem(entry)
            if problem:
                raise CheckpointError(f"{space}/{name}: {problem} (is every rank's model built for this layout?)")
    manifest.update(tensors=tensors, files=dict(sorted(all_files.items())))
    _write_durable(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
    _fsync_dir(tmp / "rng")
    _fsync_dir(tmp)


def _tiling_problem(entry) -> Optional[str]:
    """Why a manifest tensor entry is malformed, or None when its chunks tile [0, full size) exactly."""
    try:
        dim, shape, chunks = entry["dim"], [int(n) for n in entry["shape"]], entry["chunks"]
        size, end = shape[dim], 0
        for lo, hi in chunks:
            if lo != end or hi <= lo:
                return f"chunks {chunks} do not tile [0, {size})"
            end = hi
        return None if end == size and isinstance(entry["dtype"], str) else f"chunks {chunks} end at {end}, not {size}"
    except (KeyError, TypeError, ValueError, IndexError) as e:
        return f"malformed entry ({type(e).__name__}: {e})"


def _commit(directory: Path, tmp: Path, name: str, keep_last: Optional[int]) -> None:
    final = directory / name
    if final.exists():  # re-saving a step (e.g. after resuming from an older one): replace it
        _remove_dir(final)
    os.rename(tmp, final)
    _fsync_dir(directory)
    _replace_durable(directory / LATEST, (name + "\n").encode())
    if keep_last is not None:
        for s in _committed_steps(directory)[:-keep_last]:
            if step_dir_name(s) != name:
                _remove_dir(directory / step_dir_name(s))
        _fsync_dir(directory)


@dataclass
class _Need:
    """One local tensor to fill: ``target`` (this rank's shard) from the chunks of ``space/name``."""
    space: str
    name: str
    target: torch.Tensor
    tmap: _TensorMap


def _plan_reads(manifest: dict, needs: list[_Need], path: Path) -> dict:
    """{DCP key: (space, name, manifest entry, lo, hi)} of every chunk the needs intersect; raises on
    tensors the checkpoint lacks or holds with another full shape."""
    keys, problems = {}, []
    for need in needs:
        entry = manifest["tensors"].get(need.space, {}).get(need.name)
        if entry is None:
            problems.append(f"{need.space}/{need.name}: not in the checkpoint")
            continue
        if entry["dim"] != need.tmap.dim or tuple(entry["shape"]) != tuple(need.tmap.full_shape):
            problems.append(f"{need.space}/{need.name}: checkpoint has full shape {tuple(entry['shape'])} "
                            f"(split dim {entry['dim']}), this run needs {tuple(need.tmap.full_shape)}")
            continue
        for piece in need.tmap.pieces:
            for lo, hi in entry["chunks"]:
                if lo < piece.full_lo + piece.length and hi > piece.full_lo:
                    keys[_key(need.space, need.name, lo, hi)] = (need.space, need.name, entry, lo, hi)
    if problems:
        raise CheckpointError(f"{path} does not fit this model: " + "; ".join(problems[:10])
                              + (" ..." if len(problems) > 10 else ""))
    return keys


def _read_needs(step_dir: Path, manifest: dict, needs: list[_Need], verify: bool) -> None:
    """Read and verify the chunks ``needs`` intersect and assemble each target (no collectives)."""
    keys = _plan_reads(manifest, needs, step_dir / MANIFEST)
    metadata = _read_dcp_metadata(step_dir / DCP_METADATA, manifest["files"][DCP_METADATA])
    by_file: dict[str, dict[str, torch.Tensor]] = {}
    chunks: dict[str, torch.Tensor] = {}
    for key, (space, name, entry, lo, hi) in keys.items():
        md = metadata.state_dict_metadata.get(key)
        shape = list(entry["shape"])
        shape[entry["dim"]] = hi - lo
        dtype = getattr(torch, entry["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"{step_dir / MANIFEST}: {key} has an unknown dtype {entry['dtype']!r}")
        if (md is None or not hasattr(md, "chunks") or tuple(md.size) != tuple(shape)
                or md.properties.dtype != dtype):
            raise CheckpointError(f"{step_dir / DCP_METADATA} has no tensor {key} of shape {shape} and dtype "
                                  f"{entry['dtype']} (the manifest lists it; found {type(md).__name__})")
        files = {info.relative_path for idx, info in metadata.storage_data.items() if idx.fqn == key}
        if len(files) != 1 or next(iter(files)) not in manifest["files"]:
            raise CheckpointError(f"{step_dir / DCP_METADATA}: {key} is stored in {sorted(files)}, not in one "
                                  f"file listed in the manifest")
        if any(getattr(info, "transform_descriptors", None) for idx, info in metadata.storage_data.items()
               if idx.fqn == key):
            raise CheckpointError(f"{step_dir / DCP_METADATA}: {key} uses storage transforms, which this "
                                  "engine never writes")
        chunks[key] = torch.empty(shape, dtype=dtype)
        by_file.setdefault(next(iter(files)), {})[key] = chunks[key]
    if verify:
        for fname in by_file:
            _verify_file(step_dir / fname, manifest["files"][fname])
    _dcp_load(step_dir, metadata, by_file)
    for need in needs:
        entry = manifest["tensors"][need.space][need.name]
        dim = entry["dim"]
        for piece in need.tmap.pieces:
            for lo, hi in entry["chunks"]:
                a, b = max(lo, piece.full_lo), min(hi, piece.full_lo + piece.length)
                if a < b:
                    src = chunks[_key(need.space, need.name, lo, hi)].narrow(dim, a - lo, b - a)
                    need.target.narrow(dim, piece.local_lo + a - piece.full_lo, b - a).copy_(src)


def load_checkpoint(directory: Union[str, Path], model, optimizer, layout, config: GLMConfig,
                    step: Optional[int] = None, tokenizer_fingerprint: Optional[str] = None,
                    verify: bool = True) -> dict:
    """Load ``DIR/step_<step>`` (``latest`` when ``step`` is None) into ``model`` (a model or this rank's
    chunks) and ``optimizer`` (or None) under ``layout``, whatever layout saved it; restore this
    rank's RNG when the layout is unchanged. Collective over every rank of ``layout``; nothing is
    changed unless every rank read and verified everything it needs. Returns the saved extra_state
    (with ``"step"`` added). ``verify``: check the sha256 of every file read (sizes always)."""
    directory = Path(directory)
    error, state = None, None
    try:
        state = _read_for_rank(directory, step, model, optimizer, layout, config, tokenizer_fingerprint, verify)
    except Exception as e:
        error = _describe(e)
    _agree(error, layout, f"checkpoint load from {directory}")
    with torch.no_grad():
        for name, t in state.targets.items():
            state.params[name].copy_(t)
    if optimizer is not None:
        # the checkpoint's hyper-parameters: resuming continues the same run (the LR schedule passes
        # each step's lr to optimizer.step anyway)
        h = state.hyper
        optimizer.lr, optimizer.betas, optimizer.eps, optimizer.weight_decay = h["lr"], h["betas"], h["eps"], h["wd"]
        optimizer.load_param_states(state.opt_states, h["step"])
    if state.install_rng is not None:
        state.install_rng()
    extra = dict(state.manifest.get("extra_state") or {})
    extra.setdefault("step", state.manifest["step"])
    return extra


@dataclass
class _Loaded:
    """Everything one rank read and verified, applied only once every rank has succeeded."""
    manifest: dict
    params: dict
    targets: dict
    opt_states: dict
    hyper: Optional[dict]
    install_rng: Optional[Callable[[], None]]


def _read_for_rank(directory: Path, step, model, optimizer, layout, config, tokenizer_fingerprint, verify):
    step_dir = _resolve_step_dir(directory, step)
    manifest = _read_manifest(step_dir)
    path = step_dir / MANIFEST
    diff = _config_diff(manifest["config"], config)
    if diff:
        raise CheckpointError(f"{path} was saved with a different model config: " + "; ".join(diff))
    saved_fp = manifest.get("tokenizer_fingerprint")
    if tokenizer_fingerprint is not None and saved_fp is not None and saved_fp != tokenizer_fingerprint:
        raise CheckpointError(f"{path} was saved with tokenizer {saved_fp}, this run uses {tokenizer_fingerprint}")
    saved_lora, lora = manifest.get("lora"), lora_record(model)
    if saved_lora != lora:
        raise CheckpointError(f"{path} was saved with LoRA adapters {saved_lora}, this model has {lora}: resume with "
                              "the same lora rank, alpha and targets (to start a new run from these weights, use "
                              "init-from, which merges the saved adapters)")
    opt_states: dict = {}
    hyper = None
    if optimizer is not None:
        om = manifest.get("optimizer")
        if not om:
            raise CheckpointError(f"{path} holds no optimizer state (saved with optimizer=None)")
        try:
            hyper = {"lr": float(om["lr"]), "betas": tuple(float(b) for b in om["betas"]), "eps": float(om["eps"]),
                     "wd": float(om["weight_decay"]), "step": int(om["step"])}
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path} is corrupted: optimizer entry ({type(e).__name__}: {e})") from None
        if len(hyper["betas"]) != 2 or hyper["step"] < 0:
            raise CheckpointError(f"{path} is corrupted: optimizer entry {om}")
    params = _named_params(model)
    maps = _maps(params, config, layout)
    targets = {n: torch.empty(p.shape, dtype=p.dtype) for n, p in params.items()}
    needs = [_Need(MODEL_SPACE, n, targets[n], maps[n]) for n in params]
    if optimizer is not None:
        by_id = {id(p): n for n, p in params.items()}
        for i, p in enumerate(optimizer.params):
            if id(p) not in by_id:
                raise CheckpointError(f"optimizer parameter {optimizer.names[i]} is not a parameter of the model")
            name = by_id[id(p)]
            opt_states[i] = {k: torch.empty(p.shape, dtype=torch.float32) for k in OPTIM_KEYS}
            needs += [_Need(space, name, opt_states[i][k], maps[name]) for k, space in zip(OPTIM_KEYS, OPTIM_SPACES)]
    _read_needs(step_dir, manifest, needs, verify)
    rng = None
    if manifest["layout"] == _layout_dict(layout):
        fname = _rng_file(layout.rank)
        if fname not in manifest["files"]:
            raise CheckpointError(f"{path} lists no RNG file {fname}")
        data = _read_verified(step_dir / fname, manifest["files"][fname]) if verify else (step_dir / fname).read_bytes()
        try:
            rng = _rng_setter(json.loads(data), step_dir / fname)
        except ValueError as e:
            raise CheckpointError(f"{step_dir / fname} is corrupted ({e})") from None
    elif layout.rank == 0:
        warnings.warn(f"{step_dir}: saved with layout {manifest['layout']}, loading with {_layout_dict(layout)}: "
                      "weights and optimizer state are resharded; RNG states are not restored")
    return _Loaded(manifest, params, targets, opt_states, hyper, rng)


def load_model_weights(directory: Union[str, Path], model, layout, config: GLMConfig,
                       step: Optional[int] = None, verify: bool = True,
                       tokenizer_fingerprint: Optional[str] = None,
                       allow_missing: Optional[Sequence[str]] = None) -> list[str]:
    """Initialise ``model`` (a model or this rank's chunks) from the model weights of a checkpoint saved
    under any layout, e.g. SFT from a pretraining run or a reward model from an SFT run. Nothing else
    is restored (no optimizer, step or RNG). The one checkpoint tensor a model may lack is an LM's
    ``output_layer`` when starting a scalar-head model (reward model / critic); any other tensor of
    the checkpoint that the (full) model has no place for is an error, never silently dropped. The
    checkpoint's LoRA adapters are folded into the projection weights they adapt (``W + scale B A``, in
    fp32); the model's own adapters, if any, are never loaded (a new run trains fresh ones). The
    model's parameters the checkpoint lacks keep their initial values and are returned; with
    ``allow_missing`` (name prefixes, e.g. ``("value_head.",)``) any other missing parameter but an
    adapter is an error, raised on every rank together (under pipeline parallelism only some ranks hold
    a given parameter). Collective over every rank of ``layout``; nothing changes unless every rank read
    everything it needs.

    ``directory`` may also be a Hugging Face (``GlmForCausalLM`` / ``GlmForSequenceClassification``) or THUDM
    ChatGLM model directory (config.json + safetensors or .bin): each rank reads the full tensors of its own
    parameters one at a time and keeps its shard (``_load_model_dir``); its config.json must agree with
    ``config`` on every field that shapes the tensors or the block's numerics."""
    directory = Path(directory)
    if _model_dir(directory):
        return _load_model_dir(directory, model, layout, config, allow_missing)
    error, loaded = None, None
    try:
        step_dir = _resolve_step_dir(directory, step)
        manifest = _read_manifest(step_dir)
        diff = _config_diff(manifest["config"], config)
        if diff:
            raise CheckpointError(f"{step_dir / MANIFEST} was saved with a different model config: " + "; ".join(diff))
        saved_fp = manifest.get("tokenizer_fingerprint")
        if tokenizer_fingerprint is not None and saved_fp is not None and saved_fp != tokenizer_fingerprint:
            raise CheckpointError(f"{step_dir / MANIFEST} was saved with tokenizer {saved_fp}, this run uses "
                                  f"{tokenizer_fingerprint}")
        params = _named_params(model)
        maps = _maps(params, config, layout)
        saved = manifest["tensors"].get(MODEL_SPACE, {})
        from engine.model.hf_adapter import expected_shapes  # the full model's names, every pipeline stage
        scalar_head = _model_class(model) == "GLMForScalarHead"
        saved_adapters = {n for n in saved if ".lora." in n}
        unplaced = sorted(n for n in set(saved) - saved_adapters - set(expected_shapes(config, value_head=scalar_head))
                          if not (scalar_head and n.startswith("output_layer.")))
        if unplaced:
            raise CheckpointError(f"{step_dir / MANIFEST} holds {unplaced[:5]}, which a {_model_class(model)} has no "
                                  "place for (a checkpoint of another model class or version)")
        targets = {n: torch.empty(p.shape, dtype=p.dtype) for n, p in params.items()
                   if n in saved and ".lora." not in n}
        missing = _missing(params, targets, allow_missing, model, str(step_dir / MANIFEST))
        needs = [_Need(MODEL_SPACE, n, t, maps[n]) for n, t in targets.items()]
        deltas = _adapter_needs(step_dir, manifest, saved_adapters, targets, config, layout)
        _read_needs(step_dir, manifest, needs + [need for pair in deltas.values() for need in pair], verify)
        scale = manifest["lora"]["scale"] if deltas else None
        for weight, (a, b) in deltas.items():  # fold the saved adapters in: W + scale B A
            w = targets[weight]
            w.copy_(folded(w, a.target, b.target, scale))
        loaded = (params, targets, missing)
    except Exception as e:
        error = _describe(e)
    return _commit_weights(error, loaded, layout, directory)


def _adapter_needs(step_dir: Path, manifest: dict, saved_adapters: set, targets: dict, config: GLMConfig,
                   layout) -> dict[str, tuple[_Need, _Need]]:
    """For each projection weight this rank loads that the checkpoint has an adapter for: the reads of
    this rank's shards of its A and B (the low-rank factorisation of the weight's shard, see
    ``engine.model.lora``), by weight name."""
    record = manifest.get("lora")
    if saved_adapters and not (isinstance(record, dict) and isinstance(record.get("scale"), (int, float))):
        raise CheckpointError(f"{step_dir / MANIFEST} holds LoRA adapters but no record of their scale (corrupted?)")
    deltas = {}
    for a_name in sorted(n for n in saved_adapters if n.endswith(".lora.A")):
        projection = a_name[:-len(".lora.A")]
        weight, b_name = projection + ".weight", projection + ".lora.B"
        if weight not in targets:  # another pipeline stage's layer
            continue
        if b_name not in saved_adapters:
            raise CheckpointError(f"{step_dir / MANIFEST} holds {a_name} without {b_name}")
        rank = manifest["tensors"][MODEL_SPACE][a_name]["shape"][0]
        out_features, in_features = targets[weight].shape
        pair = []
        for name, shape in ((a_name, (rank, in_features)), (b_name, (out_features, rank))):
            pair.append(_Need(MODEL_SPACE, name, torch.empty(shape, dtype=torch.float32),
                              _tensor_map(name, shape, config, layout.tp_size, layout.tp_rank)))
        deltas[weight] = tuple(pair)
    return deltas


def _commit_weights(error: Optional[str], loaded, layout, directory: Path) -> list[str]:
    """Every rank learns whether every rank read what it needs (``_agree``: one error stops them all), then
    copies its tensors in, so the model changes only when all succeeded. Returns the missing names."""
    _agree(error, layout, f"loading model weights from {directory}")
    params, targets, missing = loaded
    with torch.no_grad():
        for name, t in targets.items():
            params[name].copy_(t)
    return missing


def _missing(params: dict, targets: dict, allow_missing, model, source: str) -> list[str]:
    """The model's parameters ``source`` does not fill (sorted); CheckpointError when it fills none, or (with
    ``allow_missing`` prefixes) lacks one that is neither allowed nor a LoRA adapter (which starts fresh)."""
    if not targets:
        raise CheckpointError(f"{source} holds none of this model's parameters")
    missing = sorted(set(params) - set(targets))
    if allow_missing is not None:
        lacking = [n for n in missing if not n.startswith(tuple(allow_missing)) and ".lora." not in n]
        if lacking:
            raise CheckpointError(f"{source} lacks {lacking[:5]} of this {_model_class(model)}")
    return missing


def _load_model_dir(directory: Path, model, layout, config: GLMConfig, allow_missing) -> list[str]:
    """``load_model_weights`` from a Hugging Face / THUDM model directory (see there)."""
    from engine.model.hf_adapter import ARCHITECTURE_FIELDS, ModelDirReader, expected_shapes, model_dir_config
    from engine.parallel.sharding import tp_slice
    error, loaded = None, None
    try:
        saved = model_dir_config(directory)
        diff = [f"{k}: {getattr(saved, k)!r} there vs {getattr(config, k)!r} in this run" for k in ARCHITECTURE_FIELDS
                if getattr(saved, k) != getattr(config, k)]
        if diff:
            raise CheckpointError(f"{directory}/config.json describes another model: " + "; ".join(diff)
                                  + f" (--model {directory} takes the model config from it)")
        reader = ModelDirReader(directory, config)
        unplaced = reader.unplaced()
        if unplaced:
            raise CheckpointError(f"{directory} holds {unplaced[:5]}, which a {_model_class(model)} has no place for")
        params = _named_params(model)
        full_shapes = expected_shapes(config, value_head=_model_class(model) == "GLMForScalarHead")
        have, targets = reader.names(), {}
        for name, p in params.items():
            if name in have and ".lora." not in name:
                full = reader.get(name)
                if tuple(full.shape) != full_shapes[name]:
                    raise CheckpointError(f"{directory}: {name} has shape {tuple(full.shape)}, the model needs "
                                          f"{full_shapes[name]}")
                targets[name] = tp_slice(name, full, config, layout.tp_size, layout.tp_rank).to(p.dtype)
        missing = _missing(params, targets, allow_missing, model, str(directory))
        loaded = (params, targets, missing)
    except Exception as e:
        error = _describe(e)
    return _commit_weights(error, loaded, layout, directory)


def read_manifest(directory: Union[str, Path], step: Optional[int] = None) -> dict:
    """The verified-readable manifest of a step (``latest`` when ``step`` is None)."""
    return _read_manifest(_resolve_step_dir(Path(directory), step))


def read_full_model_state(directory: Union[str, Path], step: Optional[int] = None,
                          verify: bool = True) -> tuple[GLMConfig, dict[str, torch.Tensor]]:
    """(config, full engine state dict) of a checkpoint, assembled from its chunks in one process
    (no process group needed): what ``launch.convert --checkpoint`` exports."""
    step_dir = _resolve_step_dir(Path(directory), step)
    manifest = _read_manifest(step_dir)
    try:
        config = GLMConfig.from_dict(manifest["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{step_dir / MANIFEST}: invalid model config ({e})") from None
    full, needs = {}, []
    for name, entry in manifest["tensors"].get(MODEL_SPACE, {}).items():
        dtype = getattr(torch, entry["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"{step_dir / MANIFEST}: {name} has an unknown dtype {entry['dtype']!r}")
        full[name] = torch.empty(entry["shape"], dtype=dtype)
        n = entry["shape"][entry["dim"]]
        needs.append(_Need(MODEL_SPACE, name, full[name],
                           _TensorMap(entry["dim"], tuple(entry["shape"]), (_Piece(0, 0, n, True),))))
    if not needs:
        raise CheckpointError(f"{step_dir / MANIFEST} lists no model tensors")
    _read_needs(step_dir, manifest, needs, verify)
    return config, full


__all__ = ["CheckpointError", "latest_step", "load_checkpoint", "load_model_weights", "read_full_model_state",
           "read_manifest",
           "save_checkpoint", "step_dir_name"]
