"""Self-describing checkpoints: safetensors weights + JSON (model config, epoch, metrics, data and
encoder identity) + an optional training state for exact resumption. Nothing is unpickled.

A checkpoint is a directory. It is written into a temporary sibling and renamed into place, and
checkpoint.json (written last) records the SHA-256 of the weights, so a directory interrupted
mid-write is never taken for a valid checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lvm_ray.config import ModelConfig, from_dict, to_dict
from lvm_ray.model import build_model, count_parameters, unwrap

CKPT_FORMAT = 1
WEIGHTS = "model.safetensors"
META = "checkpoint.json"
STATE = "train_state.pt"


class CheckpointError(ValueError):
    """Missing, incomplete or corrupted checkpoint."""


@dataclass
class LoadedCheckpoint:
    model: torch.nn.Module
    model_config: ModelConfig
    meta: dict[str, Any]
    path: Path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(path: str | Path, model: torch.nn.Module, model_cfg: ModelConfig, *,
                    epoch: int, metrics: dict[str, Any], data: dict[str, Any] | None = None,
                    config: dict[str, Any] | None = None,
                    train_state: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint directory atomically and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp"))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
        save_file(state, str(tmp / WEIGHTS))
        if train_state is not None:
            torch.save(train_state, tmp / STATE)
        meta = {
            "format": CKPT_FORMAT,
            "model_config": to_dict(model_cfg),
            "n_parameters": count_parameters(unwrap(model)),
            "epoch": epoch,
            "metrics": metrics,
            "data": data or {},
            "config": config or {},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "sha256": {WEIGHTS: _sha256(tmp / WEIGHTS)},
        }
        if train_state is not None:
            meta["sha256"][STATE] = _sha256(tmp / STATE)
        (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True))
        if path.exists():
            old = path.with_name(f".{path.name}.old{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def read_meta(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """checkpoint.json of a complete checkpoint; raises CheckpointError otherwise."""
    path = Path(path)
    meta_path = path / META
    if not meta_path.is_file():
        raise CheckpointError(f"{path}: not a checkpoint (no {META}; incomplete or wrong path)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_path}: corrupted JSON: {e}") from e
    if meta.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{path}: unsupported checkpoint format {meta.get('format')!r}")
    if verify:
        for name, digest in meta.get("sha256", {}).items():
            f = path / name
            if not f.is_file() or _sha256(f) != digest:
                raise CheckpointError(f"{path}: {name} is missing or does not match its checksum")
    return meta


def is_valid_checkpoint(path: str | Path) -> bool:
    try:
        read_meta(path)
        return True
    except CheckpointError:
        return False


# Model fields added after checkpoints existed, with the value those checkpoints were trained with
# (a later change of the default must not change what an old checkpoint means).
LEGACY_MODEL_DEFAULTS = {"anchor": "last"}


def _with_defaults_of_their_time(model_config: dict) -> dict:
    return {**LEGACY_MODEL_DEFAULTS, **model_config}


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Rebuild the model from the checkpoint's own config and load its weights (no pickle)."""
    path = Path(path)
    meta = read_meta(path)
    model_cfg = from_dict(ModelConfig, _with_defaults_of_their_time(meta["model_config"]))
    model = build_model(model_cfg)
    state = load_file(str(path / WEIGHTS), device="cpu")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the model config "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.to(device).eval()
    return LoadedCheckpoint(model=model, model_config=model_cfg, meta=meta, path=path)


def load_train_state(path: str | Path) -> dict[str, Any] | None:
    """Optimizer/scheduler/early-stopping/RNG state, loaded with weights_only=True (no pickle)."""
    f = Path(path) / STATE
    if not f.is_file():
        return None
    read_meta(path)  # verifies the checksum of the state file too
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as e:
        # weights_only rejects any pickle that would build an object other than tensors and
        # plain containers: a crafted train_state.pt (even with a matching checksum) is refused.
        raise CheckpointError(f"{f}: refusing to load: not a plain tensor state "
                              f"({str(e).splitlines()[0][:200]})") from None
