"""An ensemble behind the Predictor's interface: every member runs on the same input and their
neighbour lists are fused (lvm_ray.eval.ensemble) with the weights chosen on val. Ray-free; the
Serve deployment (lvm_ray.serve.ensemble) wraps it as ModelServer wraps Predictor.

A spec is an ensemble.json written by `lvm evaluate --ensemble` (members, fusion, weights), or a
plain checkpoint directory, served as a one-member ensemble: that equals the checkpoint itself.
One Predictor holds the bank and its index for all members; each member reads at most the context
it was trained with.

Sessions: the state of an ensemble is every member's (h, last), flattened into one row
h (1, S) that the session codec carries; `last` repeats the first member's last vector.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lvm_ray.data.bank import ConceptBank, check_identity
from lvm_ray.data.index import Retrieval
from lvm_ray.eval.ensemble import (ENSEMBLE_JSON, RRF_DEPTH, RRF_K0, check_ensemble_document,
                                   fuse_vectors)
from lvm_ray.model import RecurrentState
from lvm_ray.predictor import Neighbor, Prediction, Predictor, padded_forward
from lvm_ray.serve.sessions import checkpoint_fingerprint
from lvm_ray.storage import is_uri, localize
from lvm_ray.train.checkpoint import is_valid_checkpoint, load_checkpoint


def read_spec(path: str | Path) -> dict[str, Any]:
    """An ensemble.json (file, or a directory holding one), or a checkpoint directory as a
    one-member ensemble."""
    p = Path(path)
    if p.is_dir() and is_valid_checkpoint(p):
        return {"name": p.name, "members": [{"name": p.name, "checkpoint": str(p)}],
                "fusion": "score", "weights": {"score": [1.0]}}
    f = p / ENSEMBLE_JSON if p.is_dir() else p
    try:
        doc = check_ensemble_document(json.loads(f.read_text()))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: neither a checkpoint nor a readable {ENSEMBLE_JSON}: {e}")
    # Relative member paths are relative to the spec file (lvm evaluate writes them so).
    for m in doc["members"]:
        if not is_uri(m["checkpoint"]) and not Path(m["checkpoint"]).is_absolute():
            m["checkpoint"] = str((f.parent / m["checkpoint"]).resolve())
    return doc


@dataclass
class _Member:
    name: str
    model: torch.nn.Module
    context: int
    state_size: int  # layers * hidden
    layers: int
    hidden: int


class EnsemblePredictor:
    def __init__(self, spec: dict[str, Any], bank: ConceptBank | Retrieval, device: str = "auto",
                 allow_bank_mismatch: bool = False, bank_name: str = "(in memory)"):
        spec = check_ensemble_document(spec)
        ckpts = [load_checkpoint(localize(m["checkpoint"])) for m in spec["members"]]
        # The bank's retrieval and the input checks, shared by every member.
        self.base = Predictor(ckpts[0], bank, device, None, allow_bank_mismatch, bank_name)
        self.retrieval, self.device, self.dim = self.base.retrieval, self.base.device, self.base.dim
        self.bank_mismatch = list(self.base.bank_mismatch)
        self.members = []
        for m, ck in zip(spec["members"], ckpts):
            if ck.model_config.d_in != self.dim:
                raise ValueError(f"member {m['name']} expects {ck.model_config.d_in}-d vectors; "
                                 f"the bank holds {self.dim}-d ones")
            if ck.model_config.kind == "transformer":
                raise ValueError(f"member {m['name']} is a transformer: a served ensemble "
                                 "carries recurrent members' states only (memory_gru, gru)")
            self.bank_mismatch += check_identity(ck.meta.get("data"), self.retrieval,
                                                 m["checkpoint"], bank_name, allow_bank_mismatch)
            cfg = ck.model_config
            ctx = int(ck.meta.get("config", {}).get("window", {}).get("context") or 1000)
            self.members.append(_Member(m["name"], ck.model.to(self.device).eval(), ctx,
                                        cfg.layers * cfg.hidden, cfg.layers, cfg.hidden))
        self.spec = spec
        self.fusion = spec["fusion"]
        self.weights = np.asarray(spec["weights"][self.fusion], dtype=np.float64)
        self.depth = int(spec.get("rrf", {}).get("depth", RRF_DEPTH))
        self.k0 = float(spec.get("rrf", {}).get("k0", RRF_K0))
        prints = [checkpoint_fingerprint(ck.meta) for ck in ckpts]
        self.fingerprint = hashlib.sha256(json.dumps(
            [prints, self.fusion, self.weights.tolist()]).encode()).hexdigest()[:16]
        # Session state: each member's h (layers*hidden) then its last (D), one row.
        self.state_shape = (1, sum(m.state_size + self.dim for m in self.members))
        self.max_context = max(m.context for m in self.members)
        self.member_meta = [{"name": m["name"], "checkpoint": m["checkpoint"],
                             "fingerprint": p, "n_parameters": ck.meta.get("n_parameters"),
                             "epoch": ck.meta.get("epoch")}
                            for m, ck, p in zip(spec["members"], ckpts, prints)]

    @classmethod
    def from_paths(cls, spec: str | Path, bank: str | Path, device: str = "auto",
                   allow_bank_mismatch: bool = False, index: str = "Flat",
                   build_index: bool = True, index_files: str | Path | None = None
                   ) -> "EnsemblePredictor":
        """As Predictor.from_paths: the bank's memory-mapped serving files."""
        retrieval = Retrieval.open(bank, index, build=build_index,
                                   files=index_files)
        return cls(read_spec(spec), retrieval, device, allow_bank_mismatch, str(bank))

    def session_shape(self) -> tuple[int, int]:
        return self.state_shape

    def set_append_step(self, precision: str | None) -> str:
        """Members append with their eager models (the fused step is per model)."""
        return "eager"

    def validate(self, context: Any) -> np.ndarray:
        return self.base.validate(context)

    def vectors_for_ids(self, ids: list[int]) -> np.ndarray:
        return self.base.vectors_for_ids(ids)

    def info(self) -> dict[str, Any]:
        """Predictor.info's keys (no single model config, epoch or test metrics) + the
        ensemble's own."""
        return {"ensemble": self.spec["name"], "fusion": self.fusion,
                "weights": self.weights.tolist(), "members": self.member_meta,
                "n_parameters": sum(m["n_parameters"] or 0 for m in self.member_meta),
                "max_context": self.max_context, "bank_size": len(self.retrieval),
                "index": self.retrieval.factory, "bank_mismatch": self.bank_mismatch,
                "model_config": None, "epoch": None, "test_metrics": None,
                "metrics": self.spec.get("val_bank_hit@5")}

    # ------------------------------------------------------------------ fusion

    def _fuse(self, preds: list[np.ndarray], k: int) -> list[Prediction]:
        """Member predictions [(B, D)] -> fused Predictions with k neighbours."""
        if self.fusion == "score":
            fused = fuse_vectors(preds, self.weights)  # (B, D)
            return [Prediction(v, n, 0) for v, n in zip(fused, self.base.neighbors(fused, k))]
        # RRF: each member's top-depth list, fused by weighted reciprocal rank.
        depth = max(self.depth, k)
        lists = [self.retrieval.search(np.ascontiguousarray(p, dtype=np.float32), depth)[1]
                 for p in preds]
        out = []
        for i in range(len(preds[0])):
            score: dict[int, float] = {}
            for w, ids in zip(self.weights, lists):
                for r, c in enumerate(ids[i]):
                    if c >= 0:
                        score[int(c)] = score.get(int(c), 0.0) + w / (self.k0 + 1.0 + r)
            top = sorted(score, key=lambda c: (-score[c], c))[:k]
            rows = self.retrieval.rows(np.asarray(top, dtype=np.int64))
            nbrs = [Neighbor(c, *row, float(score[c])) for c, row in zip(top, rows)]
            # RRF makes no vector; the weighted mean of the members' predictions stands in.
            out.append(Prediction(fuse_vectors([p[i : i + 1] for p in preds], self.weights)[0],
                                  nbrs, 0))
        return out

    # ------------------------------------------------------------------ full context

    @torch.no_grad()
    def predict_batch(self, contexts: list[np.ndarray], k: int = 5) -> list[Prediction]:
        if not contexts:
            return []
        ctxs = [self.validate(c) for c in contexts]
        preds = []
        for m in self.members:
            preds.append(padded_forward(m.model, [c[-m.context :] for c in ctxs], self.device))
        out = self._fuse(preds, k)
        for p, c in zip(out, ctxs):
            p.context_used = min(len(c), self.max_context)
        return out

    def predict(self, context: np.ndarray, k: int = 5) -> Prediction:
        return self.predict_batch([context], k)[0]

    # ------------------------------------------------------------------ sessions

    def _unpack(self, h: np.ndarray | None) -> list[tuple[np.ndarray | None, np.ndarray | None]]:
        if h is None:
            return [(None, None)] * len(self.members)
        flat, out, i = np.asarray(h, dtype=np.float32).reshape(-1), [], 0
        for m in self.members:
            out.append((flat[i : i + m.state_size].reshape(m.layers, m.hidden),
                        flat[i + m.state_size : i + m.state_size + self.dim]))
            i += m.state_size + self.dim
        return out

    @torch.no_grad()
    def append_batch(self, contexts: list[np.ndarray], hs: list[np.ndarray | None],
                     lasts: list[np.ndarray | None], k: int = 5
                     ) -> list[tuple[Prediction, np.ndarray, np.ndarray]]:
        """Every member continues its own state on the same new vectors (lasts is unused: the
        packed h holds each member's last)."""
        contexts = [self.validate(c) for c in contexts]
        lengths = [len(c) for c in contexts]
        batch = np.zeros((len(contexts), max(lengths), self.dim), dtype=np.float32)  # (B, T, D)
        for i, c in enumerate(contexts):
            batch[i, : len(c)] = c
        states = [self._unpack(h) for h in hs]  # per session, per member
        lens = None if len(set(lengths)) == 1 else torch.tensor(lengths)
        preds, new_parts = [], []
        for j, m in enumerate(self.members):
            h0 = np.stack([np.zeros((m.layers, m.hidden), np.float32) if s[j][0] is None
                           else s[j][0] for s in states], axis=1)  # (layers, B, H)
            last0 = np.stack([np.zeros(self.dim, np.float32) if s[j][1] is None else s[j][1]
                              for s in states])  # (B, D)
            state = RecurrentState(torch.from_numpy(h0).to(self.device),
                                   torch.from_numpy(last0).to(self.device))
            pred, new = m.model(torch.from_numpy(batch).to(self.device), state, lens)
            preds.append(pred.float().cpu().numpy())
            h, last = new.h.float().cpu().numpy(), new.last.float().cpu().numpy()
            new_parts.append((h, last))
        fused = self._fuse(preds, k)
        out = []
        for i, p in enumerate(fused):
            p.context_used = lengths[i]
            packed = np.concatenate([np.concatenate([h[:, i].reshape(-1), last[i]])
                                     for h, last in new_parts])[None]  # (1, S)
            out.append((p, np.ascontiguousarray(packed), new_parts[0][1][i]))
        return out
