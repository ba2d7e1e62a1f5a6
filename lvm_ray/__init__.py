"""lvm_ray: train and serve latent vector models (next-concept-vector prediction) on Ray.

    import lvm_ray
    p = lvm_ray.load("runs/demo/phase2/best", "data/sotu_demo_bank.parquet")
    print(p.predict_texts(["We must rebuild our economy."]).neighbors[0].text)

The package root is the Python API; everything it needs is imported when first used, so
`import lvm_ray` stays cheap (no torch, FAISS or Ray).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lvm_ray.predictor import Predictor

try:
    __version__ = version("lvm_ray")
except PackageNotFoundError:  # a checkout that was never installed
    __version__ = "0+unknown"


def load(checkpoint: str | Path, bank: str | Path, device: str = "auto",
         allow_bank_mismatch: bool = False) -> "Predictor":
    """A checkpoint and the concept bank it was trained on, ready to predict: `predict(vectors)`,
    `predict_texts(texts)` (the bank's own encoder), `append(vectors, state)` for O(1)
    incremental sessions, `encode(texts)`. Refuses a bank the checkpoint was not trained on
    unless allow_bank_mismatch."""
    from lvm_ray.predictor import Predictor

    return Predictor.from_paths(checkpoint, bank, device=device,
                                allow_bank_mismatch=allow_bank_mismatch)


__all__ = ["__version__", "load"]
