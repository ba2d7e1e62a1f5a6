"""Models and losses: recurrent and attention next-vector predictors and their training loss."""

from torch import nn

from lvm_ray.config import ModelConfig
from lvm_ray.model.experts import LaneExperts, set_lanes
from lvm_ray.model.losses import info_nce, lvm_loss
from lvm_ray.model.memory_gru import (
    GRUModel,
    MemoryGRU,
    RecurrentState,
    count_parameters,
    unwrap,
)
from lvm_ray.model.memory_gru import build_model as _build_recurrent
from lvm_ray.model.transformer import TransformerLVM, TransformerState


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model cfg.kind names: memory_gru, gru or transformer."""
    if cfg.kind == "transformer" and cfg.d_in is not None:
        return TransformerLVM(cfg)
    return _build_recurrent(cfg)  # (which also refuses an unset d_in, saying why)


__all__ = [
    "GRUModel",
    "LaneExperts",
    "MemoryGRU",
    "RecurrentState",
    "TransformerLVM",
    "TransformerState",
    "build_model",
    "count_parameters",
    "info_nce",
    "lvm_loss",
    "set_lanes",
    "unwrap",
]
