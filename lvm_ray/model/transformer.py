"""A causal Transformer LVM: the attention model beside MemoryGRU and GRU, same interface.

    input LayerNorm -> Linear(D, H) -> `layers` pre-LayerNorm blocks (causal self-attention with
    rotary positions, GELU MLP) -> LayerNorm -> the same head, delta and anchor options as GRU

It reads every context vector at every step, so it can use a long context directly where a GRU
must carry it in a fixed-size state. Its state is a KV cache: `forward(new, state)` attends from
the new vectors to every cached position, so a prediction made piece by piece equals the one made
over the whole context (up to float rounding). Rotary positions are relative, so the cache never
needs re-encoding when it is cut.

    pred, state = model(context)                   # (B, D), TransformerState
    pred, state = model(next_vectors, state)       # continue the same sequences (KV cache)
    preds, state = model(context, all_steps=True)  # (B, T, D), every step causal

Right padding is safe without a padding mask: the mask is causal and padding comes after every
valid position, so a valid position never attends to it (callers ignore outputs past a row's
length). A state taken from a padded call holds the padding's keys: continue only from unpadded
calls, as with the recurrent models' all_steps.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lvm_ray.config import ModelConfig
from lvm_ray.model.memory_gru import (_anchor, _anchors_all, _check_inputs, _make_head,
                                      _make_log_beta, _predict)

ROTARY_BASE = 10000.0
MLP_RATIO = 4


class TransformerState(NamedTuple):
    """KV cache after the vectors consumed so far, and the delta anchor (as RecurrentState.last)."""

    k: Tensor  # (layers, B, heads, S, H / heads) rotary-encoded keys of the S positions so far
    v: Tensor  # (layers, B, heads, S, H / heads)
    last: Tensor  # (B, D) the anchor after the last position


def rotary(x: Tensor, pos: Tensor) -> Tensor:
    """Rotate channel pairs (i, i + hd/2) of x (B, heads, T, hd) by angle pos * base^(-2i/hd):
    the dot product of a rotated query and key depends only on their distance."""
    half = x.shape[-1] // 2
    inv_freq = ROTARY_BASE ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    ang = pos.to(torch.float32)[:, None] * inv_freq[None, :]  # (T, half)
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Block(nn.Module):
    """Pre-LayerNorm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, MLP_RATIO * hidden), nn.GELU(),
                                 nn.Linear(MLP_RATIO * hidden, hidden))
        self.drop = nn.Dropout(dropout)
        self.p_attn = dropout

    def forward(self, x: Tensor, past: tuple[Tensor, Tensor] | None,
                pos0: int) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T, H) at positions pos0 .. pos0+T-1, past keys/values (B, heads, S, hd) of
        positions 0 .. S-1 (S == pos0) -> x (B, T, H), keys and values of all S+T positions."""
        B, T, H = x.shape
        hd = H // self.heads
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
        pos = torch.arange(pos0, pos0 + T, device=x.device)
        q, k = rotary(q, pos), rotary(k, pos)  # (B, heads, T, hd)
        p = self.p_attn if self.training else 0.0
        if past is None:
            att = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
            # New query i (position pos0 + i) sees every cached key and the new ones up to itself.
            mask = torch.arange(k.shape[2], device=x.device)[None, :] <= pos[:, None]  # (T, S+T)
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        x = x + self.drop(self.proj(att.transpose(1, 2).reshape(B, T, H)))
        x = x + self.drop(self.mlp(self.norm2(x)))
        return x, k, v


class TransformerLVM(nn.Module):
    """Causal Transformer next-vector model; forward(context, state) like MemoryGRU."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        H = cfg.hidden
        self.in_norm = nn.LayerNorm(cfg.d_in)
        self.inp = nn.Linear(cfg.d_in, H)
        self.blocks = nn.ModuleList(Block(H, cfg.heads, cfg.dropout) for _ in range(cfg.layers))
        self.out_norm = nn.LayerNorm(H)
        self.drop = nn.Dropout(cfg.dropout)
        self.head = _make_head(cfg)
        self.beta_logit = _make_log_beta(cfg)

    def log_beta(self) -> Tensor | None:
        return None if self.beta_logit is None else F.logsigmoid(self.beta_logit)

    def _check_state(self, state: TransformerState | None, B: int) -> None:
        if state is None:
            return
        if not isinstance(state, TransformerState):
            raise ValueError(f"state must be a TransformerState, got {type(state).__name__}")
        c = self.cfg
        want = (c.layers, B, c.heads, c.hidden // c.heads)
        for name, t in (("k", state.k), ("v", state.v)):
            got = tuple(t.shape)
            if len(got) != 5 or got[:3] != want[:3] or got[4] != want[3]:
                raise ValueError(f"state.{name} must be ({c.layers}, {B}, {c.heads}, S, "
                                 f"{want[3]}), got {got}")
        if tuple(state.last.shape) != (B, c.d_in):
            raise ValueError(f"state.last must be ({B}, {c.d_in}), got {tuple(state.last.shape)}")

    def forward(
        self,
        context: Tensor,
        state: TransformerState | None = None,
        lengths: Tensor | None = None,
        all_steps: bool = False,
    ) -> tuple[Tensor, TransformerState]:
        """context (B, T, D) right-padded, lengths (B,) or None -> prediction (B, D), state.
        all_steps: predictions after every step (B, T, D) instead."""
        lengths = _check_inputs(self.cfg, context, None, lengths)
        B, T, _ = context.shape
        self._check_state(state, B)
        if state is not None and lengths is not None and int(lengths.min()) < T:
            # Cached positions are shared by the batch: padding would sit inside the sequence.
            raise ValueError("a KV-cache continuation needs equal-length rows (lengths == T)")
        pos0 = 0 if state is None else int(state.k.shape[3])
        x = self.inp(self.in_norm(context))  # (B, T, H)
        ks, vs = [], []
        for i, block in enumerate(self.blocks):
            x, k, v = block(x, None if state is None else (state.k[i], state.v[i]), pos0)
            ks.append(k)
            vs.append(v)
        z = self.drop(self.out_norm(x))  # (B, T, H)
        k_all, v_all = torch.stack(ks), torch.stack(vs)  # (layers, B, heads, S+T, hd)
        log_beta = self.log_beta()
        if all_steps:
            anchors = _anchors_all(context, state, log_beta)  # (B, T, D)
            pred = _predict(self.cfg, self.head(z), anchors)  # (B, T, D)
            return pred, TransformerState(k_all, v_all, anchors[:, -1])
        idx = torch.full((B,), T - 1) if lengths is None else lengths - 1
        z_last = z[torch.arange(B, device=z.device), idx.to(z.device)]  # (B, H)
        anchor = _anchor(context, state, lengths, log_beta)  # (B, D)
        return _predict(self.cfg, self.head(z_last), anchor), TransformerState(k_all, v_all, anchor)

    def step(self, x: Tensor, state: TransformerState | None = None
             ) -> tuple[Tensor, TransformerState]:
        """One new vector x (B, D) -> prediction (B, D), state."""
        if not isinstance(x, Tensor) or x.dim() != 2:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be (B, {self.cfg.d_in}), got {shape}")
        return self(x[:, None], state)
