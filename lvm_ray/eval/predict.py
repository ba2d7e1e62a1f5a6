"""Model predictions for windows: the one place a model is run over a WindowSet, for
evaluation during training, reports and the context curve."""

from __future__ import annotations

import numpy as np
import torch

from lvm_ray.data.windows import WindowSet, gather_batch
from lvm_ray.model import unwrap


@torch.no_grad()
def predict_windows(model: torch.nn.Module, vectors: np.ndarray, ws: WindowSet,
                    batch_size: int = 128, device: torch.device | str = "cpu") -> np.ndarray:
    """Predictions (M, D) for every window. Windows are sorted by length so each batch pads
    little; results come back in window order."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    device = torch.device(device)
    order = np.argsort(ws.lengths, kind="stable")
    out = np.empty((len(ws), vectors.shape[1]), dtype=np.float32)
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        ctx, lengths, _, _ = gather_batch(vectors, ws, idx)
        pred, _ = model(torch.from_numpy(ctx).to(device), lengths=torch.from_numpy(lengths))
        out[idx] = pred.float().cpu().numpy()
    model.train(was_training)
    return out
