"""An ensemble as a model deployment: one replica runs every member on one input and fuses their
neighbour lists (lvm_ray.serve.fusion). It answers the router exactly as ModelServer does
(predict, append, info), so the hybrid app serves an ensemble as Phase-2 or Phase-3 unchanged:

    serve run serve_configs/ensemble.yaml     # phase2_checkpoint: an ensemble.json
    lvm serve serve_configs/ensemble.yaml

Each of `phase2_checkpoint` / `phase3_checkpoint` is an ensemble.json (`lvm evaluate --ensemble`
writes one, weights chosen on val) or a plain checkpoint directory (a one-member ensemble).
"""

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve

from lvm_ray.config import from_dict, to_dict
from lvm_ray.data.bank import load_bank
from lvm_ray.serve.app import make_app
from lvm_ray.serve.config import ModelUserConfig
from lvm_ray.serve.fusion import EnsemblePredictor, read_spec
from lvm_ray.serve.metrics import ModelMetrics
from lvm_ray.serve.models import DEPLOYMENT_NAMES, INLINE_VECTORS, _client_error, _read_lanes
from lvm_ray.serve.schemas import RequestError
from lvm_ray.serve.sessions import SessionError, SessionState, check_compatible
from lvm_ray.predictor import PredictorInputError
from lvm_ray.storage import localize

ENSEMBLE_APP = "lvm_ray.serve.ensemble:build_app"


@serve.deployment(
    ray_actor_options={"num_cpus": 0.25},
    max_ongoing_requests=64,
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8},
    health_check_period_s=5,
)
class EnsembleServer:
    """Every member of an ensemble (or one checkpoint) + the concept bank, batched."""

    def __init__(self, name: str, spec: str, bank: str, device: str = "cpu"):
        self.name = name
        self.checkpoint = spec
        doc = read_spec(localize(spec))
        self.predictor = EnsemblePredictor(doc, load_bank(localize(bank)), device=device)
        self.fingerprint = self.predictor.fingerprint
        self.state_shape = self.predictor.state_shape
        self.metrics = ModelMetrics()
        self.user = ModelUserConfig()
        # lanes.json sits next to a checkpoint's weights, and next to an ensemble.json (written
        # by `lvm evaluate --ensemble` for the fusion it serves).
        local = Path(localize(spec))
        lanes_dir = (doc["members"][0]["checkpoint"] if len(doc["members"]) == 1 and
                     local.is_dir() else (local if local.is_dir() else local.parent))
        self.lanes, self.lanes_reason = _read_lanes(str(lanes_dir))

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.user = from_dict(ModelUserConfig, user_config or {}, "user_config")
        for fn in (self._predict_batch, self._append_batch):
            fn.set_max_batch_size(self.user.max_batch_size)
            fn.set_batch_wait_timeout_s(self.user.batch_wait_timeout_s)

    def info(self) -> dict[str, Any]:
        i = self.predictor.info()
        return {"name": self.name, "deployment": DEPLOYMENT_NAMES.get(self.name, self.name),
                "checkpoint": self.checkpoint, "fingerprint": self.fingerprint,
                "max_context": i["max_context"], "dim": self.predictor.dim,
                "state_shape": list(self.state_shape), "n_parameters": i["n_parameters"],
                "ensemble": {k: i[k] for k in ("ensemble", "fusion", "weights", "members")},
                "model_config": None, "epoch": None, "val_metrics": i["val_metrics"],
                "test_metrics": None, "bank_size": i["bank_size"],
                "bank_encoder": self.predictor.bank.meta.get("encoder"),
                "lanes": self.lanes, "lanes_reason": self.lanes_reason,
                "user_config": to_dict(self.user),
                "replica": serve.get_replica_context().replica_tag}

    def _vectors(self, vectors: np.ndarray | None, concept_ids: list[int] | None) -> np.ndarray:
        try:
            ctx = (self.predictor.vectors_for_ids(concept_ids) if concept_ids is not None
                   else vectors)
            return self.predictor.validate(ctx)  # (T, D)
        except PredictorInputError as e:
            raise RequestError(422, str(e)) from None

    async def predict(self, vectors: np.ndarray | None, concept_ids: list[int] | None,
                      k: int, return_vector: bool) -> dict[str, Any]:
        try:
            ctx = self._vectors(vectors, concept_ids)
        except RequestError as e:
            return _client_error(e.status, e.detail)
        return await self._predict_batch((ctx, k, return_vector))

    async def append(self, session: SessionState, vectors: np.ndarray | None,
                     concept_ids: list[int] | None, k: int, return_vector: bool) -> dict[str, Any]:
        try:
            check_compatible(session, self.name, self.fingerprint, self.state_shape,
                             self.predictor.dim)
            ctx = self._vectors(vectors, concept_ids)
        except SessionError as e:
            return _client_error(e.status, str(e))
        except RequestError as e:
            return _client_error(e.status, e.detail)
        return await self._append_batch((ctx, session.h, session.last, k, return_vector))

    def _result(self, pred, k: int, return_vector: bool, batch: int, ms: float) -> dict[str, Any]:
        return {"vector": pred.vector.tolist() if return_vector else None,
                "neighbors": [n.to_dict() for n in pred.neighbors[:k]],
                "context_used": pred.context_used, "model_ms": ms, "batch_size": batch}

    @staticmethod
    async def _run(fn, n_vectors: int, *args):
        if n_vectors <= INLINE_VECTORS:
            return fn(*args)
        return await asyncio.to_thread(fn, *args)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def _predict_batch(self, items: list[tuple]) -> list[dict[str, Any]]:
        kmax = max(it[1] for it in items)
        t0 = time.perf_counter()
        ctxs = [it[0] for it in items]
        preds = await self._run(self.predictor.predict_batch, sum(map(len, ctxs)), ctxs, kmax)
        ms = (time.perf_counter() - t0) * 1000
        self._observe("predict", len(items), ms)
        return [self._result(p, k, rv, len(items), ms) for p, (_, k, rv) in zip(preds, items)]

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def _append_batch(self, items: list[tuple]) -> list[dict[str, Any]]:
        kmax = max(it[3] for it in items)
        t0 = time.perf_counter()
        ctxs = [it[0] for it in items]
        outs = await self._run(self.predictor.append_batch, sum(map(len, ctxs)), ctxs,
                               [it[1] for it in items], [it[2] for it in items], kmax)
        ms = (time.perf_counter() - t0) * 1000
        self._observe("append", len(items), ms)
        results = []
        for (pred, h, last), (_, _, _, k, rv) in zip(outs, items):
            r = self._result(pred, k, rv, len(items), ms)
            r.update(h=h, last=last, fingerprint=self.fingerprint)
            results.append(r)
        return results

    def _observe(self, kind: str, batch: int, ms: float) -> None:
        tags = {"model": self.name, "kind": kind}
        self.metrics.forward.observe(ms, tags=tags)
        self.metrics.batch_size.observe(batch, tags=tags)


def build_app(args: dict[str, Any]):
    """The hybrid app with EnsembleServer for both models: what serve_configs/ensemble.yaml
    imports. Same args as lvm_ray.serve.app:build_app; each checkpoint may be an ensemble.json."""
    return make_app(args, model_deployment=EnsembleServer)
