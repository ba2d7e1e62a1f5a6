"""Lane experts (the design's Phase-4: one specialist per TMD lane, with routing).

With `model.experts` set, the recurrent trunk (MemoryGRU or GRU, `model.kind`) is shared and its
single output head is replaced by `model.expert_lanes` expert heads, one per lane. A router picks
the mix for each prediction:

- "hard": the expert of the lane of the last context concept, i.e. its nearest lane centroid
  (for a bank concept that is its lane: k-means lanes assign each concept to its nearest centroid).
- "soft": a learned gate, softmax over lanes of Linear([z ; cos(x_last, centroids)]), z being the
  trunk's features.

The lane centroids (lanes, D) are a buffer set before training from the training split
(`set_lanes`; lvm_ray.train.loop fits the same lanes the per-lane evaluation uses) and saved with
the weights, so a served model routes inside its replica with no bank lookup. All experts run as
two dense matmuls over E*r hidden units with the routing weights applied between them: exact for
hard routing (one-hot weights, so only the chosen expert gets a gradient) and cheap at E=16, r=64.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lvm_ray.config import ModelConfig


class LaneExperts(nn.Module):
    """(..., H) trunk features, (..., D) last input vector -> (..., D) head output."""

    def __init__(self, cfg: ModelConfig, delta_init_scale: float):
        super().__init__()
        E, r, H, D = cfg.expert_lanes, cfg.expert_hidden, cfg.hidden, cfg.d_in
        self.routing = cfg.experts
        self.n, self.width, self.dim = E, r, D
        self.register_buffer("centroids", torch.zeros(E, D))  # (E, D) unit rows once fitted
        self.inner = nn.Linear(H, E * r)  # every expert's first layer, side by side
        self.drop = nn.Dropout(cfg.dropout)
        # Second layers (E, r, D). In delta mode they start small, like the plain head, so the
        # prediction starts near the anchor.
        std = (delta_init_scale if cfg.delta else 1.0) / math.sqrt(r * (D if cfg.delta else 1))
        self.outer = nn.Parameter(torch.randn(E, r, D) * std)
        self.outer_bias = nn.Parameter(torch.zeros(E, D))
        self.gate = nn.Linear(H + E, E) if cfg.experts == "soft" else None

    def set_lanes(self, centroids: Tensor) -> None:
        """Install the lane centroids (E, D) the router compares the last input with."""
        if tuple(centroids.shape) != (self.n, self.dim):
            raise ValueError(f"centroids must be ({self.n}, {self.dim}), got "
                             f"{tuple(centroids.shape)}")
        self.centroids.copy_(F.normalize(centroids.float(), dim=-1))

    def route(self, z: Tensor, x_last: Tensor) -> Tensor:
        """Routing weights over the experts. (..., E); rows sum to 1 (one-hot when hard)."""
        if not bool(self.centroids.any()):
            raise RuntimeError("lane experts have no lane centroids: call set_lanes() first "
                               "(training does; a checkpoint carries them)")
        sims = F.normalize(x_last, dim=-1) @ self.centroids.T.to(x_last.dtype)  # (..., E)
        if self.gate is None:
            return F.one_hot(sims.argmax(dim=-1), self.n).to(z.dtype)
        return torch.softmax(self.gate(torch.cat([z, sims.to(z.dtype)], dim=-1)), dim=-1)

    def forward(self, z: Tensor, x_last: Tensor) -> Tensor:
        if z.shape[:-1] != x_last.shape[:-1] or x_last.shape[-1] != self.dim:
            raise ValueError(f"z (..., H) and x_last (..., {self.dim}) must share leading dims; "
                             f"got {tuple(z.shape)} and {tuple(x_last.shape)}")
        g = self.route(z, x_last)  # (..., E)
        a = self.drop(F.gelu(self.inner(z)))  # (..., E*r)
        a = (a.unflatten(-1, (self.n, self.width)) * g[..., None]).flatten(-2)  # (..., E*r)
        return a @ self.outer.reshape(-1, self.dim) + g @ self.outer_bias  # (..., D)


def set_lanes(model: nn.Module, centroids: Tensor) -> int:
    """Give every LaneExperts head in `model` the lane centroids; returns how many it found."""
    heads = [m for m in model.modules() if isinstance(m, LaneExperts)]
    for m in heads:
        m.set_lanes(centroids.to(m.centroids.device))
    return len(heads)
