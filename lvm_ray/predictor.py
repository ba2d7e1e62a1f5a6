"""Checkpoint + concept bank -> next-concept prediction and its nearest concepts.

This is the whole inference path; Serve deployments only wrap it. Full-context requests read the
last `max_context` vectors (the context length the model was trained with). Incremental use
(`append`) costs O(1) model work per appended vector whatever the history length for the recurrent
models. A transformer session instead carries its last `max_context` vectors and recomputes over
them: O(max_context) per append, and the answer equals a full-context predict at any length
(BENCHMARKS.md, section transformer_append, measures it beside a KV-cache append).
Nearest concepts come from a Retrieval (lvm_ray.data.index): the bank's memory-mapped index and
columns when opened from paths (shared by every process on a node), or an in-memory index over a
ConceptBank.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lvm_ray.config import EncoderConfig
from lvm_ray.data.bank import ConceptBank, check_identity, load_bank
from lvm_ray.data.encoders import encoder_for_bank, get_encoder
from lvm_ray.data.index import Retrieval
from lvm_ray.device import resolve_device
from lvm_ray.model import RecurrentState
from lvm_ray.model.fused_step import FusedStep, StepPrecision
from lvm_ray.model.quantize import Precision, quantize_model
from lvm_ray.train.checkpoint import LoadedCheckpoint, load_checkpoint


# Appends of up to this many new vectors take the fused step (one call per vector); longer ones
# (a session opened with a whole document) run the eager model's sequence kernel.
FUSED_MAX_T = 8


class PredictorInputError(ValueError):
    """The request's context cannot be used (shape, dtype, NaN/Inf, zero norm, empty, unknown
    ids)."""


def vector_problem(arr: np.ndarray) -> str | None:
    """Why a (T, D) context cannot be a sequence of sentence embeddings, naming the first bad row,
    or None. A zero vector has no direction (the model normalises its inputs), and a norm that
    overflows float32 is no embedding either."""
    finite = np.isfinite(arr).all(axis=1)  # (T,)
    if not finite.all():
        return f"context contains NaN or Inf (first at row {int(np.flatnonzero(~finite)[0])})"
    with np.errstate(over="ignore"):
        norms = np.linalg.norm(arr, axis=1)  # (T,) in float32: overflows to inf
    bad = np.flatnonzero((norms == 0) | ~np.isfinite(norms))
    if len(bad):
        row = int(bad[0])
        what = "zero" if norms[row] == 0 else "not finite (float32 overflow)"
        return (f"vector at row {row} has a norm that is {what}: every context vector must be a "
                f"non-zero embedding ({len(bad)} such row(s))")
    return None


@dataclass
class Neighbor:
    concept_id: int
    text: str
    doc_id: str
    position: int
    score: float

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


@dataclass
class Prediction:
    vector: np.ndarray  # (D,) unit norm
    neighbors: list[Neighbor]
    context_used: int  # how many context vectors the model read


class Predictor:
    """A checkpoint paired with the bank it was trained on: a bank whose recorded identity
    differs (other vectors, documents or encoder) is refused unless allow_bank_mismatch."""

    def __init__(self, ckpt: LoadedCheckpoint, bank: ConceptBank | Retrieval,
                 device: str = "auto", max_context: int | None = None,
                 allow_bank_mismatch: bool = False, bank_name: str = "(in memory)"):
        # Exact inner-product search (cosine on unit vectors) for an in-memory bank.
        self.retrieval = bank if isinstance(bank, Retrieval) else Retrieval.from_bank(bank)
        if self.retrieval.dim != ckpt.model_config.d_in:
            raise ValueError(f"bank is {self.retrieval.dim}-d but the checkpoint expects "
                             f"{ckpt.model_config.d_in}-d vectors")
        self.bank_mismatch = check_identity(ckpt.meta.get("data"), self.retrieval,
                                            str(ckpt.path), bank_name, allow_bank_mismatch)
        self.device = resolve_device(device)
        self.model = ckpt.model.to(self.device).eval()
        self.meta = ckpt.meta
        self.test_metrics = _read_json(ckpt.path / "test_metrics.json")
        self.dim = self.retrieval.dim
        trained_ctx = ckpt.meta.get("config", {}).get("window", {}).get("context")
        self.max_context = int(max_context or trained_ctx or 1000)
        self._encoder = None  # the bank's text encoder, loaded by encode() on first use
        self.step: FusedStep | None = None  # set_append_step: the fused append path

    def set_append_step(self, precision: StepPrecision | None) -> str:
        """Run short appends (up to FUSED_MAX_T new vectors) through the fused, traced step at
        `precision` (lvm_ray.model.fused_step); None = the eager model. CPU only: on a GPU the
        eager model's fused kernels already are the fast path. Returns what appends now use."""
        self.step = None
        if precision is not None and self.device == "cpu" and FusedStep.supports(self.model):
            self.step = FusedStep.build(self.model, precision)
        return f"fused-{self.step.precision}" if self.step is not None else "eager"

    @classmethod
    def from_paths(cls, checkpoint: str | Path, bank: str | Path, device: str = "auto",
                   max_context: int | None = None, allow_bank_mismatch: bool = False,
                   index: str = "Flat", build_index: bool = True,
                   index_files: str | Path | None = None) -> "Predictor":
        """The checkpoint with the bank's memory-mapped serving files (`index` is an
        index_factory string; the files, in index_files or beside the bank, are built first
        when missing or stale if build_index, else refused)."""
        retrieval = Retrieval.open(bank, index, build=build_index,
                                   files=index_files)
        return cls(load_checkpoint(checkpoint), retrieval, device, max_context,
                   allow_bank_mismatch, str(bank))

    @property
    def recomputes(self) -> bool:
        """Whether sessions carry their context window and recompute (the transformer): a KV
        cache in the signed session token would be 2 x layers x hidden / D times the window."""
        return self.model.cfg.kind == "transformer"

    def session_shape(self) -> tuple[int | None, int]:
        """Shape of a session's state h: (layers, hidden) for the recurrent models; (T, D) for the
        transformer, T (None here) up to max_context: its last vectors."""
        cfg = self.model.cfg
        return (None, self.dim) if self.recomputes else (cfg.layers, cfg.hidden)

    def info(self) -> dict[str, Any]:
        return {
            "model_config": self.meta.get("model_config"),
            "n_parameters": self.meta.get("n_parameters"),
            "epoch": self.meta.get("epoch"),
            "metrics": self.meta.get("metrics"),
            "test_metrics": self.test_metrics,
            "data": self.meta.get("data"),
            "max_context": self.max_context,
            "bank_size": len(self.retrieval),
            "index": self.retrieval.factory,
            "bank_mismatch": self.bank_mismatch,  # non-empty only when explicitly allowed
        }

    # ------------------------------------------------------------------ input checks

    def validate(self, context: Any) -> np.ndarray:
        """Return the context as float32 (T, D) or raise PredictorInputError saying why."""
        try:
            arr = np.asarray(context, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise PredictorInputError(f"context must be numbers shaped (T, {self.dim}): {e}")
        if arr.ndim != 2 or arr.shape[1] != self.dim:
            raise PredictorInputError(
                f"context must be shaped (T, {self.dim}), got {tuple(arr.shape)}")
        if arr.shape[0] == 0:
            raise PredictorInputError("context is empty: give at least one vector")
        problem = vector_problem(arr)
        if problem:
            raise PredictorInputError(problem)
        return arr

    def vectors_for_ids(self, ids: list[int]) -> np.ndarray:
        ids_arr = np.asarray(ids)
        if ids_arr.ndim != 1 or not np.issubdtype(ids_arr.dtype, np.integer):
            raise PredictorInputError("concept_ids must be a list of integers")
        n = len(self.retrieval)
        bad = ids_arr[(ids_arr < 0) | (ids_arr >= n)]
        if len(bad):
            raise PredictorInputError(f"unknown concept id(s) {bad[:5].tolist()}; "
                                      f"the bank has ids 0..{n - 1}")
        return self.retrieval.vectors(ids_arr)

    # ------------------------------------------------------------------ inference

    def neighbors(self, preds: np.ndarray, k: int) -> list[list[Neighbor]]:
        scores, ids = self.retrieval.search(preds, k)  # (B, k) each
        found = ids[ids >= 0]
        rows = dict(zip(found.tolist(), self.retrieval.rows(found)))  # one read per batch
        return [[Neighbor(int(i), *rows[int(i)], float(s)) for s, i in zip(srow, irow) if i >= 0]
                for srow, irow in zip(scores, ids)]

    @torch.no_grad()
    def predict_batch(self, contexts: list[np.ndarray], k: int = 5) -> list[Prediction]:
        """Several contexts of different lengths in one padded forward pass."""
        if not contexts:
            return []
        ctxs = [self.validate(c)[-self.max_context :] for c in contexts]
        lengths = np.array([len(c) for c in ctxs])
        pred = padded_forward(self.model, ctxs, self.device)
        nbrs = self.neighbors(pred, k)
        return [Prediction(p, n, int(t)) for p, n, t in zip(pred, nbrs, lengths)]

    def predict(self, context: np.ndarray, k: int = 5) -> Prediction:
        return self.predict_batch([context], k)[0]

    # ------------------------------------------------------------------ text

    def encode(self, texts: list[str]) -> np.ndarray:
        """Texts -> (T, D) vectors with the bank's own encoder (loaded on first use)."""
        if self._encoder is None:
            name = encoder_for_bank(self.retrieval.meta.get("encoder"))
            if name is None:
                raise PredictorInputError(
                    f"the bank's encoder {self.retrieval.meta.get('encoder')!r} is not one lvm_ray "
                    "can rebuild here; encode the texts yourself and call predict(vectors)")
            self._encoder = get_encoder(EncoderConfig(name=name, device=str(self.device)))
        if isinstance(texts, str) or not texts:
            raise PredictorInputError("texts must be a non-empty list of strings")
        return self._encoder.encode(list(texts))

    def predict_texts(self, texts: list[str], k: int = 5) -> Prediction:
        """The concept after these texts (one per concept, in order)."""
        return self.predict(self.encode(texts), k)

    # ------------------------------------------------------------------ incremental

    def append(self, vectors: np.ndarray, state: RecurrentState | None = None,
               k: int = 5) -> tuple[Prediction, RecurrentState]:
        """Feed new vectors after `state` (None = start); O(len(vectors)) model work for the
        recurrent models. For the transformer, state.h is its window (T, 1, D): append_batch."""
        h = last = None
        if state is not None:
            h = state.h[:, 0].float().cpu().numpy()
            last = state.last[0].float().cpu().numpy()
        pred, h, last = self.append_batch([vectors], [h], [last], k)[0]
        return pred, RecurrentState(torch.from_numpy(h[:, None]).to(self.device),
                                    torch.from_numpy(last[None]).to(self.device))

    @torch.no_grad()
    def append_batch(self, contexts: list[np.ndarray], hs: list[np.ndarray | None],
                     lasts: list[np.ndarray | None],
                     k: int = 5) -> list[tuple[Prediction, np.ndarray, np.ndarray]]:
        """Several sessions' appends in one forward pass: context i (T_i, D) continues from its
        own state (h (layers, H), last (D,)) or from the start (None). Returns
        (Prediction, new h, new last) per session; O(max T_i) model work whatever the history.
        Transformer: h is the session's last vectors (T, D) and the model reads the last
        max_context of h + the new ones; the new h is that window, last its last vector."""
        contexts = [self.validate(c) for c in contexts]
        if self.recomputes:
            windows = [(c if h is None else np.concatenate([self.validate(h), c]))
                       [-self.max_context:] for c, h in zip(contexts, hs)]
            preds = self.predict_batch(windows, k)
            return [(p, np.ascontiguousarray(w), w[-1].copy()) for p, w in zip(preds, windows)]
        cfg = self.model.cfg
        lengths = [len(c) for c in contexts]
        batch = np.zeros((len(contexts), max(lengths), self.dim), dtype=np.float32)  # (B, T, D)
        for i, c in enumerate(contexts):
            batch[i, : len(c)] = c
        # A zero state is exactly nn.GRU's default start; `last` is only read from the new input.
        h0 = np.stack([np.zeros((cfg.layers, cfg.hidden), np.float32) if h is None else h
                       for h in hs], axis=1)  # (layers, B, H)
        last0 = np.stack([np.zeros(self.dim, np.float32) if x is None else x
                          for x in lasts])  # (B, D)
        dev = self.device
        x, h0, last0 = (torch.from_numpy(a).to(dev) for a in (batch, h0, last0))
        if self.step is not None and max(lengths) <= FUSED_MAX_T:
            pred, h, last = self.step.run(x, lengths, h0, last0)
        else:
            lens = None if len(set(lengths)) == 1 else torch.tensor(lengths)
            pred, new = self.model(x, RecurrentState(h0, last0), lens)
            h, last = new.h, new.last
        pred = pred.float().cpu().numpy()  # (B, D)
        h, last = h.float().cpu().numpy(), last.float().cpu().numpy()
        nbrs = self.neighbors(pred, k)
        return [(Prediction(pred[i], nbrs[i], lengths[i]), np.ascontiguousarray(h[:, i]),
                 last[i]) for i in range(len(contexts))]


@torch.no_grad()
def padded_forward(model: torch.nn.Module, contexts: list[np.ndarray],
                   device: torch.device | str) -> np.ndarray:
    """Contexts (T_i, D) of different lengths, zero-padded into one batch -> (B, D) predictions
    (each read up to its own length)."""
    lengths = np.array([len(c) for c in contexts])
    batch = np.zeros((len(contexts), lengths.max(), contexts[0].shape[1]), dtype=np.float32)
    for i, c in enumerate(contexts):
        batch[i, : len(c)] = c  # (B, T, D)
    pred, _ = model(torch.from_numpy(batch).to(device), lengths=torch.from_numpy(lengths))
    return pred.float().cpu().numpy()


def quantized_predictor(checkpoint: str | Path, bank: str | Path | ConceptBank,
                        precision: Precision = "int8", max_context: int | None = None
                        ) -> Predictor:
    """A CPU Predictor whose model runs at `precision` (lvm_ray.model.quantize);
    `predictor.precision` says which."""
    ck = load_checkpoint(checkpoint)
    ck = dataclasses.replace(ck, model=quantize_model(ck.model, precision))
    bank = bank if isinstance(bank, ConceptBank) else load_bank(bank)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized modules warn on .to(); the device is CPU
        predictor = Predictor(ck, bank, device="cpu", max_context=max_context)
    predictor.precision = precision
    return predictor


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON side file next to a checkpoint (e.g. test_metrics.json), if present and valid."""
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:
        return None
