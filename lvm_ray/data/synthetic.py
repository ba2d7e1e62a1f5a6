"""A synthetic concept bank whose next vector is predictable, but not from the last one alone.

Each document is a trajectory of a second-order nonlinear map on a torus (a coupled Chirikov
standard map): theta[t+1] = 2 theta[t] - theta[t-1] + kick * sin(theta[t] + roll(theta[t])).
The velocity theta[t] - theta[t-1] is hidden and differs in size and sign between documents, so
the last vector alone cannot tell which way a document moves; the last two can. Angles go through
a fixed random nonlinear embedding into `dim` dims, plus small noise, then L2 normalisation.
Used by tests and smoke runs, where a model with context must beat copy-last and one-step models.
"""

from __future__ import annotations

import numpy as np

from lvm_ray.config import SplitConfig
from lvm_ray.data.bank import ConceptBank
from lvm_ray.data.windows import assign_splits


def _embedding(rng: np.random.Generator, k: int, dim: int):
    hidden = 4 * dim
    w1 = rng.standard_normal((2 * k, hidden)) * 1.5
    b1 = rng.uniform(-1.0, 1.0, hidden)
    w2 = rng.standard_normal((hidden, dim)) / np.sqrt(hidden)

    def embed(theta: np.ndarray) -> np.ndarray:  # (T, k) angles -> (T, dim)
        u = np.concatenate([np.cos(theta), np.sin(theta)], axis=-1)
        return np.tanh(u @ w1 + b1) @ w2

    # Centre on the torus mean so cosines measure movement, not a shared offset.
    centre = embed(rng.uniform(0.0, 2 * np.pi, (4096, k))).mean(axis=0)
    return lambda theta: embed(theta) - centre


def make_synthetic_bank(n_docs: int = 24, doc_len: tuple[int, int] = (60, 120), dim: int = 32,
                        latent: int = 4, noise: float = 0.05, seed: int = 0,
                        split_cfg: SplitConfig = SplitConfig(), kick: float = 0.15,
                        speed: tuple[float, float] = (0.35, 0.7)) -> ConceptBank:
    """n_docs documents of doc_len[0]..doc_len[1] unit vectors in `dim` dims, driven by
    latent // 2 coupled angles. Deterministic in seed."""
    if latent < 2 or latent % 2:
        raise ValueError(f"latent must be an even number >= 2 (pairs of cos/sin), got {latent}")
    if n_docs < 1 or doc_len[0] < 3 or doc_len[1] < doc_len[0]:
        raise ValueError(f"need n_docs >= 1 and 3 <= doc_len[0] <= doc_len[1], got {doc_len}")
    rng = np.random.default_rng(seed)
    k = latent // 2
    embed = _embedding(rng, k, dim)
    doc_ids, positions, vectors = [], [], []
    for d in range(n_docs):
        n = int(rng.integers(doc_len[0], doc_len[1] + 1))
        theta = np.zeros((n, k))
        theta[0] = rng.uniform(0.0, 2 * np.pi, k)
        theta[1] = theta[0] + rng.uniform(*speed, k) * rng.choice([-1.0, 1.0], k)
        for t in range(1, n - 1):
            coupled = theta[t] + np.roll(theta[t], 1)
            theta[t + 1] = 2 * theta[t] - theta[t - 1] + kick * np.sin(coupled)
        x = embed(theta)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        x += noise * rng.standard_normal(x.shape) / np.sqrt(dim)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        doc_ids += [f"syn-{d:04d}"] * n
        positions.append(np.arange(n, dtype=np.int32))
        vectors.append(x.astype(np.float32))
    split_of = assign_splits(sorted(set(doc_ids)), split_cfg)
    doc_ids_arr = np.array(doc_ids, dtype=object)
    pos = np.concatenate(positions)
    return ConceptBank(
        doc_ids=doc_ids_arr,
        positions=pos,
        texts=np.array([f"{d} #{p}" for d, p in zip(doc_ids, pos)], dtype=object),
        vectors=np.concatenate(vectors),  # (N, dim)
        splits=np.array([split_of[d] for d in doc_ids], dtype=object),
        lanes=np.full(len(doc_ids), -1, dtype=np.int16),
        meta={
            "encoder": "synthetic",
            "dim": dim,
            "synthetic": {"n_docs": n_docs, "doc_len": list(doc_len), "latent": latent,
                          "noise": noise, "seed": seed, "kick": kick, "speed": list(speed)},
            "split": {"fractions": [split_cfg.train, split_cfg.val, split_cfg.test],
                      "salt": split_cfg.salt},
        },
    )
