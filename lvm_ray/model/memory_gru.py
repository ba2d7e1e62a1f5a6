"""Next-vector models: a memory-augmented GRU (the design's model) and a plain GRU baseline.

Both read a right-padded sequence of unit sentence embeddings and predict the next one, as a unit
vector. Both are recurrent: `forward(context, state)` continues from `state`, so serving can feed
one new vector at a time at O(1) cost in the context length and still match the full-context call.

    pred, state = model(context)                 # (B, D), RecurrentState
    pred, state = model(next_vectors, state)     # continue the same sequences
    pred, state = model.step(x, state)           # one vector (B, D)
    preds, state = model(context, all_steps=True)  # (B, T, D): a prediction after every step

`all_steps` is for training: one pass over a sequence scores every position as a target (teacher
forcing), instead of one target per full forward; the prediction at step t equals what a window
ending at t would get from the plain call.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import pack_padded_sequence

from lvm_ray.config import ModelConfig
from lvm_ray.model.experts import LaneExperts

# Bounds on the memory's softmax temperature (scores are cosines in [-1, 1]): below 0.01 the read
# collapses to a one-hot argmax, above 1 it is close to a uniform average.
_TEMP_MIN, _TEMP_MAX, _TEMP_INIT = 0.01, 1.0, 0.1
# Final head layer init: the delta's norm starts near this, so the delta-mode prediction starts at
# the copy-last baseline (cos(pred, x_last) ~ 0.999) instead of at a random direction.
_DELTA_INIT_SCALE = 0.05


class RecurrentState(NamedTuple):
    """What a model remembers after consuming a context."""

    h: Tensor  # (layers, B, H) GRU state after each row's last valid step
    # (B, D) the delta anchor: each row's last valid input vector (model.anchor="last"), or the
    # decayed sum of all its inputs (anchor="decay")
    last: Tensor


# ----------------------------------------------------------------------------- shared pieces


def _check_inputs(
    cfg: ModelConfig, context: Tensor, state: RecurrentState | None, lengths: Tensor | None
) -> Tensor | None:
    """Raise ValueError on malformed inputs; return lengths on the CPU (None = all valid)."""
    D, H, L = cfg.d_in, cfg.hidden, cfg.layers
    if not isinstance(context, Tensor):
        raise ValueError(f"context must be a torch.Tensor (B, T, {D}), got {type(context).__name__}")
    if context.dim() != 3 or context.shape[-1] != D:
        raise ValueError(f"context must be (B, T, {D}), got {tuple(context.shape)}")
    B, T, _ = context.shape
    if B < 1:
        raise ValueError(f"context must be (B, T, {D}) with B >= 1, got {tuple(context.shape)}")
    if T < 1:
        raise ValueError(f"context is empty: (B, T, {D}) needs T >= 1, got {tuple(context.shape)}")
    if not context.is_floating_point():
        raise ValueError(f"context must be a float tensor, got {context.dtype}")
    if not bool(torch.isfinite(context).all()):
        raise ValueError("context contains NaN or Inf values")
    if state is not None:
        if not isinstance(state, RecurrentState):
            raise ValueError(f"state must be a RecurrentState, got {type(state).__name__}")
        if tuple(state.h.shape) != (L, B, H):
            raise ValueError(f"state.h must be ({L}, {B}, {H}), got {tuple(state.h.shape)}")
        if tuple(state.last.shape) != (B, D):
            raise ValueError(f"state.last must be ({B}, {D}), got {tuple(state.last.shape)}")
    if lengths is None:
        return None
    if not isinstance(lengths, Tensor) or lengths.dim() != 1 or lengths.shape[0] != B:
        shape = tuple(lengths.shape) if isinstance(lengths, Tensor) else type(lengths).__name__
        raise ValueError(f"lengths must be a LongTensor ({B},), got {shape}")
    if lengths.is_floating_point() or lengths.dtype == torch.bool:
        raise ValueError(f"lengths must be an integer tensor, got {lengths.dtype}")
    lengths = lengths.detach().to("cpu", torch.int64)
    if int(lengths.min()) < 1 or int(lengths.max()) > T:
        raise ValueError(f"lengths must lie in [1, T={T}], got {lengths.tolist()}")
    return lengths


def _run_gru_all(
    norm: nn.LayerNorm, gru: nn.GRU, context: Tensor, state: RecurrentState | None
) -> tuple[Tensor, Tensor]:
    """Top-layer output after every step (B, T, H) and h after the last step (layers, B, H). The
    GRU is causal, so right padding only changes outputs past each row's length (callers mask)."""
    return gru(norm(context), None if state is None else state.h)


def _run_gru(
    norm: nn.LayerNorm,
    gru: nn.GRU,
    context: Tensor,
    state: RecurrentState | None,
    lengths: Tensor | None,
) -> Tensor:
    """Consume context (B, T, D) from `state`; only each row's first lengths[b] steps count.
    Returns h (layers, B, H) after each row's last valid step."""
    B, T, _ = context.shape
    x = norm(context)  # (B, T, D), per-vector so padding and chunking cannot leak across steps
    h0 = None if state is None else state.h
    if lengths is None or int(lengths.min()) == T:
        # Only h_n is needed: the memory read happens once, from the final state.
        _, h = gru(x, h0)  # (layers, B, H)
        return h
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    _, h = gru(packed, h0)  # (layers, B, H), rows back in input order
    return h


def _anchor(context: Tensor, state: RecurrentState | None, lengths: Tensor | None,
            log_beta: Tensor | None) -> Tensor:
    """What delta mode adds to, after each row's last valid step. (B, D).

    log_beta None: the last input vector. Otherwise the decayed sum a_t = x_t + beta * a_{t-1}
    (beta = exp(log_beta) in (0, 1)) continued from state.last: a generalised context-mean that
    still fits in one vector, so incremental use stays O(1)."""
    B, T, _ = context.shape
    n = torch.full((B,), T, dtype=torch.int64) if lengths is None else lengths
    n = n.to(context.device)
    if log_beta is None:
        return context[torch.arange(B, device=context.device), n - 1]
    t = torch.arange(T, device=context.device)
    age = (n[:, None] - 1 - t[None, :]).clamp(min=0).to(context.dtype)  # (B, T) steps ago
    w = torch.exp(age * log_beta) * (t[None, :] < n[:, None])  # (B, T), zero on padding
    a = torch.einsum("bt,btd->bd", w, context)
    if state is not None:
        a = a + torch.exp(n.to(context.dtype) * log_beta)[:, None] * state.last
    return a


def _anchors_all(context: Tensor, state: RecurrentState | None,
                 log_beta: Tensor | None) -> Tensor:
    """_anchor after every step. (B, T, D)."""
    if log_beta is None:
        return context
    beta = torch.exp(log_beta)
    a = None if state is None else state.last
    out = []
    for t in range(context.shape[1]):  # T small vector ops: cheap beside the GRU
        a = context[:, t] if a is None else context[:, t] + beta * a
        out.append(a)
    return torch.stack(out, dim=1)


def _make_head(cfg: ModelConfig) -> nn.Module:
    if cfg.experts != "none":
        return LaneExperts(cfg, _DELTA_INIT_SCALE)
    H, D = cfg.hidden, cfg.d_in
    head = nn.Sequential(nn.Linear(H, 2 * H), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(2 * H, D))
    if cfg.delta:
        out = head[-1]
        nn.init.normal_(out.weight, std=_DELTA_INIT_SCALE / math.sqrt(out.in_features * D))
        nn.init.zeros_(out.bias)
    return head


def _apply_head(head: nn.Module, z: Tensor, x_last: Tensor) -> Tensor:
    """(..., H) features -> (..., D) head output; lane experts also route on the last input."""
    return head(z, x_last) if isinstance(head, LaneExperts) else head(z)


def _last_input(context: Tensor, lengths: Tensor | None) -> Tensor:
    """Each row's last valid input vector. (B, D)."""
    B, T, _ = context.shape
    if lengths is None:
        return context[:, -1]
    return context[torch.arange(B, device=context.device), lengths.to(context.device) - 1]


def _predict(cfg: ModelConfig, head_out: Tensor, anchor: Tensor) -> Tensor:
    """(..., D) head output -> (..., D) unit prediction."""
    if cfg.delta:
        # Predict a change from the anchor (the last vector, or the decayed context sum): copying
        # it is free, the model learns the rest.
        return F.normalize(F.normalize(anchor, dim=-1) + head_out, dim=-1)
    return F.normalize(head_out, dim=-1)


def _make_log_beta(cfg: ModelConfig) -> nn.Parameter | None:
    # beta = sigmoid(0) = 0.5 at init: the anchor starts near a mean of the last two or three.
    return nn.Parameter(torch.zeros(())) if cfg.anchor == "decay" else None


def _make_gru(cfg: ModelConfig) -> nn.GRU:
    # nn.GRU warns when dropout is set with a single layer (it only acts between layers).
    dropout = cfg.dropout if cfg.layers > 1 else 0.0
    return nn.GRU(cfg.d_in, cfg.hidden, cfg.layers, batch_first=True, dropout=dropout)


# ----------------------------------------------------------------------------- models


class MemoryGRU(nn.Module):
    """LayerNorm -> GRU -> content-addressed read of `slots` learned memory slots -> fuse -> head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        H = cfg.hidden
        self.in_norm = nn.LayerNorm(cfg.d_in)
        self.gru = _make_gru(cfg)
        if cfg.slots > 0:
            self.query = nn.Linear(H, H)
            self.mem_keys = nn.Parameter(torch.randn(cfg.slots, H))  # (S, H), compared by cosine
            self.mem_values = nn.Parameter(torch.randn(cfg.slots, H) / math.sqrt(H))  # (S, H)
            # Learned temperature, kept as a log so it stays positive.
            self.log_temp = nn.Parameter(torch.tensor(math.log(_TEMP_INIT)))
        self.fuse = nn.Linear(2 * H if cfg.slots > 0 else H, H)
        self.drop = nn.Dropout(cfg.dropout)
        self.head = _make_head(cfg)
        self.beta_logit = _make_log_beta(cfg)

    def log_beta(self) -> Tensor | None:
        return None if self.beta_logit is None else F.logsigmoid(self.beta_logit)

    def temperature(self) -> Tensor:
        return self.log_temp.exp().clamp(_TEMP_MIN, _TEMP_MAX)

    def read_memory(self, h_top: Tensor) -> Tensor:
        """(..., H) top-layer state -> (..., H) attention-weighted mix of the memory values."""
        q = F.normalize(self.query(h_top), dim=-1)  # (..., H)
        k = F.normalize(self.mem_keys, dim=-1)  # (S, H)
        attn = torch.softmax(q @ k.T / self.temperature(), dim=-1)  # (..., S)
        return attn @ self.mem_values  # (..., H)

    def _out(self, h_top: Tensor, last: Tensor, x_last: Tensor) -> Tensor:
        """(..., H) top-layer state, (..., D) anchor, (..., D) last input -> (..., D) unit
        prediction."""
        z = torch.cat([h_top, self.read_memory(h_top)], dim=-1) if self.cfg.slots > 0 else h_top
        z = self.drop(F.gelu(self.fuse(z)))  # (..., H)
        return _predict(self.cfg, _apply_head(self.head, z, x_last), last)

    def forward(
        self,
        context: Tensor,
        state: RecurrentState | None = None,
        lengths: Tensor | None = None,
        all_steps: bool = False,
    ) -> tuple[Tensor, RecurrentState]:
        """context (B, T, D) right-padded, lengths (B,) or None -> prediction (B, D), state.
        all_steps: predictions after every step (B, T, D) instead; the state is then the one
        after step T (padding included), so continue only from unpadded calls."""
        lengths = _check_inputs(self.cfg, context, state, lengths)
        log_beta = self.log_beta()
        if all_steps:
            out, h = _run_gru_all(self.in_norm, self.gru, context, state)
            anchors = _anchors_all(context, state, log_beta)  # (B, T, D)
            return self._out(out, anchors, context), RecurrentState(h, anchors[:, -1])
        h = _run_gru(self.in_norm, self.gru, context, state, lengths)
        state = RecurrentState(h, _anchor(context, state, lengths, log_beta))
        return self._out(h[-1], state.last, _last_input(context, lengths)), state  # (B, D)

    def step(self, x: Tensor, state: RecurrentState | None = None) -> tuple[Tensor, RecurrentState]:
        """One new vector x (B, D) -> prediction (B, D), state."""
        if not isinstance(x, Tensor) or x.dim() != 2:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be (B, {self.cfg.d_in}), got {shape}")
        return self(x[:, None], state)


class GRUModel(nn.Module):
    """Baseline: LayerNorm -> GRU -> head, the same interface as MemoryGRU and no memory."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.in_norm = nn.LayerNorm(cfg.d_in)
        self.gru = _make_gru(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.head = _make_head(cfg)
        self.beta_logit = _make_log_beta(cfg)

    def log_beta(self) -> Tensor | None:
        return None if self.beta_logit is None else F.logsigmoid(self.beta_logit)

    def forward(
        self,
        context: Tensor,
        state: RecurrentState | None = None,
        lengths: Tensor | None = None,
        all_steps: bool = False,
    ) -> tuple[Tensor, RecurrentState]:
        """context (B, T, D) right-padded, lengths (B,) or None -> prediction (B, D), state.
        all_steps: predictions after every step (B, T, D), as in MemoryGRU.forward."""
        lengths = _check_inputs(self.cfg, context, state, lengths)
        log_beta = self.log_beta()
        if all_steps:
            out, h = _run_gru_all(self.in_norm, self.gru, context, state)
            anchors = _anchors_all(context, state, log_beta)  # (B, T, D)
            pred = _predict(self.cfg, _apply_head(self.head, self.drop(out), context),
                            anchors)  # (B, T, D)
            return pred, RecurrentState(h, anchors[:, -1])
        h = _run_gru(self.in_norm, self.gru, context, state, lengths)
        state = RecurrentState(h, _anchor(context, state, lengths, log_beta))
        z = self.drop(h[-1])  # (B, H)
        pred = _predict(self.cfg, _apply_head(self.head, z, _last_input(context, lengths)),
                        state.last)  # (B, D)
        return pred, state

    def step(self, x: Tensor, state: RecurrentState | None = None) -> tuple[Tensor, RecurrentState]:
        """One new vector x (B, D) -> prediction (B, D), state."""
        if not isinstance(x, Tensor) or x.dim() != 2:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be (B, {self.cfg.d_in}), got {shape}")
        return self(x[:, None], state)


def build_model(cfg: ModelConfig) -> nn.Module:
    if cfg.d_in is None:
        raise ValueError("model.d_in is unset: training takes it from the bank; give it "
                         "explicitly to build a model without one")
    if cfg.kind == "memory_gru":
        return MemoryGRU(cfg)
    if cfg.kind == "gru":
        return GRUModel(cfg)
    raise ValueError(f"unknown model kind {cfg.kind!r}; choose 'memory_gru' or 'gru'")


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module under DDP / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
