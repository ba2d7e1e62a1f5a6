"""Training loss for next-vector prediction: MSE + cosine + a contrastive InfoNCE term.

    loss = w_mse * MSE(pred, target) + w_cos * mean(1 - cos(pred, target)) + alpha * InfoNCE

MSE and cosine pull the prediction onto its target; InfoNCE also pushes it away from the other
targets in the batch (and, with `bank` negatives, from concepts sampled from the training bank),
which is what nearest-neighbour retrieval (Hit@K) rewards; hard negatives add, per row, the
concepts that follow its target in its own document. A mask removes candidates that the
evaluation never ranks against a window: its own context and duplicates of its target.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lvm_ray.config import LossConfig


def _check_pair(pred: Tensor, target: Tensor) -> None:
    if pred.dim() != 2 or pred.shape[0] < 1:
        raise ValueError(f"pred must be (B, D), got {tuple(pred.shape)}")
    if target.shape != pred.shape:
        raise ValueError(f"target must be (B, D) = {tuple(pred.shape)}, got {tuple(target.shape)}")


def info_nce(
    pred: Tensor,
    target: Tensor,
    temperature: float,
    extra_negatives: Tensor | None = None,
    mask: Tensor | None = None,
    row_negatives: Tensor | None = None,
    row_mask: Tensor | None = None,
) -> Tensor:
    """Cross-entropy of picking row i's own target among all candidates, by cosine / temperature.

    candidates = [target ; extra_negatives], so row i's positive is column i; the other targets of
    the batch and every extra negative are its negatives. Extra negatives carry no gradient.
    mask (B, B+K) bool, True = not a candidate for that row (its diagonal must be False).
    row_negatives (B, H, D): negatives of row i alone (hard negatives), no gradient either;
    row_mask (B, H) bool, True = not a candidate (past the end of its document).
    """
    _check_pair(pred, target)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    B = pred.shape[0]
    candidates = target  # (B, D)
    if extra_negatives is not None:
        D = pred.shape[1]
        if extra_negatives.dim() != 2 or extra_negatives.shape[1] != D:
            raise ValueError(f"extra_negatives must be (K, {D}), got {tuple(extra_negatives.shape)}")
        candidates = torch.cat([target, extra_negatives.detach().to(target.dtype)], dim=0)  # (B+K, D)
    logits = F.normalize(pred, dim=-1) @ F.normalize(candidates, dim=-1).T / temperature  # (B, B+K)
    if mask is not None:
        if tuple(mask.shape) != tuple(logits.shape) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be bool {tuple(logits.shape)}, got {mask.dtype} "
                             f"{tuple(mask.shape)}")
        if bool(mask.diagonal().any()):
            raise ValueError("mask must not remove a row's own positive (its diagonal)")
        logits = logits.masked_fill(mask, float("-inf"))
    if row_negatives is not None:
        if row_negatives.dim() != 3 or row_negatives.shape[0] != B \
                or row_negatives.shape[2] != pred.shape[1]:
            raise ValueError(f"row_negatives must be (B={B}, H, D={pred.shape[1]}), got "
                             f"{tuple(row_negatives.shape)}")
        own = torch.einsum("bd,bhd->bh", F.normalize(pred, dim=-1),
                           F.normalize(row_negatives.detach().to(pred.dtype), dim=-1))
        own = own / temperature  # (B, H)
        if row_mask is not None:
            if tuple(row_mask.shape) != tuple(own.shape) or row_mask.dtype != torch.bool:
                raise ValueError(f"row_mask must be bool {tuple(own.shape)}, got "
                                 f"{row_mask.dtype} {tuple(row_mask.shape)}")
            own = own.masked_fill(row_mask, float("-inf"))
        logits = torch.cat([logits, own], dim=1)  # (B, B+K+H)
    labels = torch.arange(B, device=pred.device)
    return F.cross_entropy(logits, labels)


def lvm_loss(
    pred: Tensor,
    target: Tensor,
    cfg: LossConfig,
    extra_negatives: Tensor | None = None,
    mask: Tensor | None = None,
    row_negatives: Tensor | None = None,
    row_mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """pred, target (B, D); extra_negatives (K, D): other workers' targets (`gathered`) or bank
    samples (`bank`); mask (B, B+K) or (B, B) as in info_nce; row_negatives (B, H, D) and
    row_mask (B, H): each row's own hard negatives -> (scalar loss, components)."""
    _check_pair(pred, target)
    mse = F.mse_loss(pred, target)
    cos = (1.0 - F.cosine_similarity(pred, target, dim=-1)).mean()
    loss = cfg.w_mse * mse + cfg.w_cos * cos
    nce_value = 0.0
    if cfg.negatives != "none" and cfg.alpha != 0:
        negatives = extra_negatives if cfg.negatives in ("gathered", "bank") else None
        if negatives is None and mask is not None:
            mask = mask[:, : pred.shape[0]]
        nce = info_nce(pred, target, cfg.temperature, negatives, mask, row_negatives, row_mask)
        loss = loss + cfg.alpha * nce
        nce_value = float(nce.detach())
    parts = {
        "loss": float(loss.detach()),
        "mse": float(mse.detach()),
        "cos": float(cos.detach()),
        "infonce": nce_value,
    }
    return loss, parts
