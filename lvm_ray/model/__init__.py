"""Models and losses: recurrent next-vector predictors and their training loss."""

from lvm_ray.model.experts import LaneExperts, set_lanes
from lvm_ray.model.losses import info_nce, lvm_loss
from lvm_ray.model.memory_gru import (
    GRUModel,
    MemoryGRU,
    RecurrentState,
    build_model,
    count_parameters,
    unwrap,
)

__all__ = [
    "GRUModel",
    "LaneExperts",
    "MemoryGRU",
    "RecurrentState",
    "build_model",
    "count_parameters",
    "info_nce",
    "lvm_loss",
    "set_lanes",
    "unwrap",
]
