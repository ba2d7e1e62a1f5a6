"""Faster CPU inference: the same checkpoint with int8 (dynamic quantization) or bf16 weights.

    model = quantize_model(ck.model, "int8")          # a quantized copy; ck.model is untouched
    predictor = quantized_predictor("runs/x/best", "data/bank.parquet", "int8")  # lvm_ray.predictor

int8: torch dynamic quantization of every nn.Linear and the nn.GRU. Weights are stored as int8
(per tensor) and activations are quantized on the fly, per call, so no calibration data is
needed. The memory slots, LayerNorm and the delta anchor stay float32.
bf16: every weight and activation in bfloat16; inputs, outputs and the recurrent state stay
float32 at the boundary, so callers (Predictor, Serve sessions) see no difference.

What it costs in quality and gains in speed is measured by bench/bench_quant.py (BENCHMARKS.md,
section "quant"): the goal is <= 1 point of test bank-Hit@5 lost for >= 1.5x speed. int8 costs
under 0.1 point at every trained size. It pays on the GRU recurrence over a long context (over
90% of a 1000-vector forward: about 1.4x at hidden 128, 2x at 256), on batched session steps,
and on every call of a hidden-512 model, whose weight matrices dominate (3x or more). A batch-1
step of a hidden-128/256 model is some 60 small framework calls on vectors of a few hundred
floats, about half of it Python and module overhead; int8 weights do not shorten those calls and
a quantized Linear adds an activation quantization per call, so that step is no faster in int8.
bf16 is slower than fp32 on the 1000-vector forward at every size measured.
"""

from __future__ import annotations

import copy
import warnings
from typing import Literal

import torch
import torch.nn as nn
from torch import Tensor

from lvm_ray.model.memory_gru import RecurrentState

Precision = Literal["fp32", "int8", "bf16"]
PRECISIONS: tuple[str, ...] = ("fp32", "int8", "bf16")


class BF16Model(nn.Module):
    """A model run in bfloat16 behind a float32 interface (same forward signature)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.to(torch.bfloat16)
        self.cfg = model.cfg

    def forward(self, context: Tensor, state: RecurrentState | None = None,
                lengths: Tensor | None = None, all_steps: bool = False
                ) -> tuple[Tensor, RecurrentState]:
        if state is not None:
            state = RecurrentState(state.h.to(torch.bfloat16), state.last.to(torch.bfloat16))
        pred, new = self.model(context.to(torch.bfloat16), state, lengths, all_steps)
        return pred.float(), RecurrentState(new.h.float(), new.last.float())

    def step(self, x: Tensor, state: RecurrentState | None = None
             ) -> tuple[Tensor, RecurrentState]:
        return self(x[:, None], state)


def quantize_model(model: nn.Module, precision: Precision = "int8") -> nn.Module:
    """A CPU inference copy of `model` in eval mode at the given precision."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    model = copy.deepcopy(model).cpu().eval()
    if precision == "fp32":
        return model
    if precision == "bf16":
        return BF16Model(model).eval()
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao, but still ships and works in
        # torch 2.x; torchao is not a dependency of this project.
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        q = quantize_dynamic(model, {nn.Linear, nn.GRU}, dtype=torch.qint8)
    return q.eval()
