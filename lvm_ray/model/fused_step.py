"""The served append path: one recurrent step of a MemoryGRU / GRUModel as a hand-fused GRU cell in
plain tensor ops, traced and frozen with TorchScript, in fp32 or int8.

    step = FusedStep.build(model, "int8")           # a traced copy; `model` is untouched
    h, a = step.advance(x, h, a)                     # x (B, D), h (layers, B, H), a (B, D)
    pred = step.readout(h[-1], a)                    # (B, D) unit vector

Why: an eager batch-1 step of a hidden-128/256 model is some 60 small framework calls on vectors
of a few hundred floats, and about half of its time is Python and nn.Module overhead (input
checks, module hooks, nn.GRU's generic sequence path). The same maths as a few fused tensor ops
in a frozen trace drops that overhead; int8 weights (dynamic quantization of every Linear,
including the GRU's input and hidden projections) then add their own gain
(BENCHMARKS.md, section quant).

The step reproduces the eager model exactly in fp32 (tests/test_fused_step.py compares them to
1e-5): LayerNorm -> GRU layers (PyTorch's gate order r, z, n) -> anchor update -> memory read ->
fuse -> head -> delta prediction. The prediction after a step depends only on the new state
(h, a), so appending T vectors is T `advance` calls and one `readout`.
"""

from __future__ import annotations

import copy
import warnings
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lvm_ray.model.memory_gru import GRUModel, MemoryGRU

StepPrecision = Literal["fp32", "int8"]


def _linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


class _Advance(nn.Module):
    """(x (B, D), h (layers, B, H), a (B, D)) -> (h', a'): LayerNorm, the GRU layers, the anchor."""

    def __init__(self, model: nn.Module):
        super().__init__()
        cfg, gru, norm = model.cfg, model.gru, model.in_norm
        self.layers, self.hidden = cfg.layers, cfg.hidden
        self.norm_shape = tuple(norm.normalized_shape)
        self.norm_eps = float(norm.eps)
        self.register_buffer("norm_w", norm.weight.detach().clone())
        self.register_buffer("norm_b", norm.bias.detach().clone())
        self.ih = nn.ModuleList(_linear(getattr(gru, f"weight_ih_l{i}"), getattr(gru, f"bias_ih_l{i}"))
                                for i in range(cfg.layers))
        self.hh = nn.ModuleList(_linear(getattr(gru, f"weight_hh_l{i}"), getattr(gru, f"bias_hh_l{i}"))
                                for i in range(cfg.layers))
        with torch.no_grad():
            log_beta = model.log_beta()
        self.decay = log_beta is not None
        self.beta = float(log_beta.exp()) if log_beta is not None else 0.0

    def forward(self, x: Tensor, h: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
        inp = F.layer_norm(x, self.norm_shape, self.norm_w, self.norm_b, self.norm_eps)  # (B, D)
        out = []
        for i, (ih, hh) in enumerate(zip(self.ih, self.hh)):
            hi = h[i]  # (B, H)
            i_r, i_z, i_n = ih(inp).chunk(3, dim=-1)
            h_r, h_z, h_n = hh(hi).chunk(3, dim=-1)
            r = torch.sigmoid(i_r + h_r)
            z = torch.sigmoid(i_z + h_z)
            n = torch.tanh(i_n + r * h_n)
            inp = n + z * (hi - n)  # (1 - z) * n + z * h, as nn.GRU
            out.append(inp)
        a = x + self.beta * a if self.decay else x
        return torch.stack(out), a


class _Readout(nn.Module):
    """(h_top (B, H), a (B, D)) -> (B, D) unit prediction: memory read, fuse and head."""

    def __init__(self, model: nn.Module):
        super().__init__()
        cfg = model.cfg
        self.delta = cfg.delta
        self.memory = isinstance(model, MemoryGRU) and cfg.slots > 0
        if self.memory:
            self.query = copy.deepcopy(model.query)
            with torch.no_grad():  # keys normalised and divided by the temperature once
                keys = F.normalize(model.mem_keys, dim=-1) / model.temperature()
            self.register_buffer("keys_t", keys.T.contiguous())  # (H, S)
            self.register_buffer("values", model.mem_values.detach().clone())  # (S, H)
        self.fuse = copy.deepcopy(model.fuse) if isinstance(model, MemoryGRU) else None
        self.head1 = copy.deepcopy(model.head[0])
        self.head2 = copy.deepcopy(model.head[-1])

    def forward(self, h_top: Tensor, a: Tensor) -> Tensor:
        z = h_top
        if self.fuse is not None:
            if self.memory:
                q = F.normalize(self.query(h_top), dim=-1)  # (B, H)
                mem = torch.softmax(q @ self.keys_t, dim=-1) @ self.values  # (B, H)
                z = torch.cat([h_top, mem], dim=-1)
            z = F.gelu(self.fuse(z))  # (B, H)
        out = self.head2(F.gelu(self.head1(z)))  # (B, D); dropout is off in inference
        if self.delta:
            return F.normalize(F.normalize(a, dim=-1) + out, dim=-1)
        return F.normalize(out, dim=-1)


class FusedStep:
    """Traced `advance` and `readout` of one model at one precision (CPU)."""

    def __init__(self, advance, readout, precision: StepPrecision, layers: int, hidden: int,
                 dim: int):
        self.advance, self.readout = advance, readout
        self.precision = precision
        self.layers, self.hidden, self.dim = layers, hidden, dim

    @staticmethod
    def supports(model: nn.Module) -> bool:
        # A quantize_dynamic copy has no plain nn.GRU weights to fuse: it keeps its eager path.
        return isinstance(model, (MemoryGRU, GRUModel)) and type(model.gru) is nn.GRU

    @classmethod
    def build(cls, model: nn.Module, precision: StepPrecision = "fp32") -> "FusedStep":
        if not cls.supports(model):
            raise ValueError(f"FusedStep covers MemoryGRU and GRUModel, not {type(model).__name__}")
        if precision not in ("fp32", "int8"):
            raise ValueError(f"precision must be fp32 or int8, got {precision!r}")
        model = copy.deepcopy(model).float().cpu().eval()
        cfg = model.cfg
        advance, readout = _Advance(model).eval(), _Readout(model).eval()
        if precision == "int8":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.ao.quantization deprecation notice
                from torch.ao.quantization import quantize_dynamic

                advance = quantize_dynamic(advance, {nn.Linear}, dtype=torch.qint8)
                readout = quantize_dynamic(readout, {nn.Linear}, dtype=torch.qint8)
        B = 2  # traced at B=2 (not 1) so no size-1 broadcast is baked in; runs at any B
        x = torch.randn(B, cfg.d_in)
        h = torch.randn(cfg.layers, B, cfg.hidden)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # TorchScript deprecation notices
            advance = torch.jit.freeze(torch.jit.trace(advance, (x, h, x)))
            readout = torch.jit.freeze(torch.jit.trace(readout, (h[-1], x)))
        return cls(advance, readout, precision, cfg.layers, cfg.hidden, cfg.d_in)

    @torch.no_grad()
    def run(self, x: Tensor, lengths: list[int], h: Tensor, a: Tensor
            ) -> tuple[Tensor, Tensor, Tensor]:
        """Append x (B, T, D), row b valid for its first lengths[b] steps, after state h
        (layers, B, H), a (B, D). Returns prediction (B, D), h', a'."""
        B, T, D = x.shape
        assert D == self.dim and tuple(h.shape) == (self.layers, B, self.hidden) and \
            tuple(a.shape) == (B, D), (f"expected x (B, T, {self.dim}), h ({self.layers}, B, "
                                       f"{self.hidden}), a (B, {self.dim}); got {tuple(x.shape)}, "
                                       f"{tuple(h.shape)}, {tuple(a.shape)}")
        uneven = min(lengths) != T
        lens = torch.tensor(lengths)
        for t in range(T):
            h2, a2 = self.advance(x[:, t], h, a)
            if uneven:  # rows already at their end keep their state
                keep = (lens <= t)
                h2 = torch.where(keep[None, :, None], h, h2)
                a2 = torch.where(keep[:, None], a, a2)
            h, a = h2, a2
        return self.readout(h[-1], a), h, a
