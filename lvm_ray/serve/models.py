"""The model and encoder deployments: a checkpoint + the concept bank behind batched predict and
session-append methods, and the bank's text encoder. The maths lives in lvm_ray.predictor; a
client's bad input is returned as {"error", "status"} (an answer, not a replica failure).

A model deployment is also an HTTP / gRPC ingress for its sessions' appends
(POST /v1/sessions/{id}/append, gRPC Append): when it runs as its own application (the shipped
config), clients append to it directly, with no router hop; the router signs and this replica
verifies the same session tokens.
"""

import asyncio
import os
import time
from typing import Any

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.deployment import Deployment

from lvm_ray.config import EncoderConfig, from_dict, to_dict
from lvm_ray.data.bank import read_bank_meta
from lvm_ray.data.encoders import encoder_for_bank, get_encoder
from lvm_ray.eval.lanes import LANES_JSON, lane_report
from lvm_ray.predictor import Predictor, PredictorInputError
from lvm_ray.serve import ingress
from lvm_ray.serve.config import ModelUserConfig
from lvm_ray.serve.metrics import ModelMetrics
from lvm_ray.serve.routing import PHASE2, PHASE3, lane_summary
from lvm_ray.serve.schemas import (PredictionOut, PredictRequest, RequestError,
                                   SessionAppendRequest, SessionOut, body_schema)
from lvm_ray.serve.sessions import (SessionCodec, SessionError, SessionState, check_compatible,
                                    checkpoint_fingerprint, resolve_key, KEY_ENV)
from lvm_ray.storage import is_uri, localize

DEPLOYMENT_NAMES = {PHASE2: "Phase2Model", PHASE3: "Phase3Model"}
INLINE_VECTORS = 64  # batches of at most this many vectors skip the thread hand-off


def short_error(e: BaseException) -> str:
    """The last line of a (possibly remote) exception: a message, not a traceback."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[-1][:300] if lines else ''}"


def _read_lanes(ckpt_dir: str) -> tuple[dict[str, Any] | None, str | None]:
    """The checkpoint's lane summary, or None and why (never made-up numbers)."""
    try:
        report = lane_report(ckpt_dir)
    except (OSError, ValueError) as e:  # a corrupt file must not keep the model from serving
        return None, f"{LANES_JSON} in {ckpt_dir} is unreadable: {short_error(e)}"
    if report is None:
        return None, (f"no {LANES_JSON} in {ckpt_dir}: the checkpoint was not evaluated with "
                      "lanes, so the lane rule is not checked")
    return lane_summary(report), None


def _client_error(status: int, detail: str) -> dict[str, Any]:
    # Returned, not raised: a client's bad input is an answer, not a replica failure.
    return {"error": detail, "status": status}


model_api = ingress.http_api("lvm_ray model", "A model's own session-append endpoint (no router "
                             "hop). Open sessions at the router; its answer's append_url points "
                             "here.")


class ModelServer:
    """One checkpoint + the concept bank (FAISS index) behind @serve.batch methods. A plain
    class: model_deployment() makes it a deployment, an HTTP / gRPC ingress too when it is its
    own application (Serve allows one FastAPI ingress per application: the router's, otherwise)."""

    def __init__(self, name: str, checkpoint: str, bank: str, device: str = "cpu",
                 session_key: str | None = None, allow_bank_mismatch: bool = False,
                 index: str = "Flat"):
        self.name = name
        self.checkpoint = checkpoint
        # The bank's index files are memory-mapped (shared by the replicas of a node); the app
        # builder made them, so a replica never builds one and refuses stale ones.
        files = localize(bank.rstrip("/") + ".index") if is_uri(bank) else None
        self.predictor, self.fingerprint, lanes_dir = self._open(
            localize(checkpoint), localize(bank), device, allow_bank_mismatch, index, files)
        # Warm the mapped index now: otherwise the first few hundred ANN searches of a fresh
        # replica each pay thousands of page faults (BENCHMARKS.md, scale_1m_rerun).
        self.predictor.retrieval.populate()
        self.state_shape = self.predictor.session_shape()
        self.metrics = ModelMetrics()
        self.user = ModelUserConfig()
        self.append_step = self._set_append_step(self.user.append_step)
        # Verifies the tokens the router signs (the same key); None: this replica only serves
        # handle calls (appends come through the router).
        self.codec = (SessionCodec(resolve_key(session_key), ttl_s=self.user.session_ttl_s)
                      if session_key or os.environ.get(KEY_ENV) else None)
        self.lanes, self.lanes_reason = _read_lanes(lanes_dir)

    @staticmethod
    def _open(checkpoint: str, bank: str, device: str, allow_bank_mismatch: bool, index: str,
              index_files: str | None) -> tuple[Any, str, str]:
        """(predictor, its fingerprint, the directory of its lanes.json) for local paths; the
        ensemble deployment (lvm_ray.serve.ensemble) opens an EnsemblePredictor instead."""
        predictor = Predictor.from_paths(checkpoint, bank, device=device,
                                         allow_bank_mismatch=allow_bank_mismatch, index=index,
                                         build_index=False, index_files=index_files)
        return predictor, checkpoint_fingerprint(predictor.meta), checkpoint

    def _set_append_step(self, step: str) -> str:
        return self.predictor.set_append_step(None if step == "eager" else step)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        old = self.user
        self.user = from_dict(ModelUserConfig, user_config or {}, "user_config")
        if self.user.append_step != old.append_step:
            self.append_step = self._set_append_step(self.user.append_step)
        if self.codec is not None:
            self.codec.ttl_s = self.user.session_ttl_s
        self.predictor.retrieval.set_search_params(self.user.nprobe, self.user.ef_search)
        for fn in (self._predict_batch, self._append_batch):
            fn.set_max_batch_size(self.user.max_batch_size)
            fn.set_batch_wait_timeout_s(self.user.batch_wait_timeout_s)

    def info(self) -> dict[str, Any]:
        i = self.predictor.info()
        return {"name": self.name, "deployment": DEPLOYMENT_NAMES.get(self.name, self.name),
                "checkpoint": self.checkpoint, "fingerprint": self.fingerprint,
                "max_context": i["max_context"], "dim": self.predictor.dim,
                "state_shape": list(self.state_shape), "n_parameters": i["n_parameters"],
                "model_config": i["model_config"], "epoch": i["epoch"],
                "val_metrics": i["metrics"], "test_metrics": i["test_metrics"],
                "bank_size": i["bank_size"], "bank_mismatch": i["bank_mismatch"],
                "bank_encoder": self.predictor.retrieval.meta.get("encoder"),
                "index": self.predictor.retrieval.factory,
                "lanes": self.lanes, "lanes_reason": self.lanes_reason,
                "append_step": self.append_step, "user_config": to_dict(self.user),
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
        """A full context -> prediction; the model reads the last max_context vectors."""
        try:
            ctx = self._vectors(vectors, concept_ids)
        except RequestError as e:
            return _client_error(e.status, e.detail)
        return await self._predict_batch((ctx, k, return_vector))

    async def append(self, session: SessionState, vectors: np.ndarray | None,
                     concept_ids: list[int] | None, k: int, return_vector: bool) -> dict[str, Any]:
        """Continue `session` with new vectors: O(len(new vectors)) model work."""
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
        """Large batches run in a thread so the event loop keeps queueing the next batch; a few
        vectors (a typical append) cost less than the thread hand-off, so they run inline."""
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

    # ------------------------------------------------------ direct predicts and session appends

    @model_api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @model_api.post("/v1/predict", response_model=PredictionOut,
                    openapi_extra=body_schema(PredictRequest))
    async def predict_http(self, request: Request) -> JSONResponse:
        """Predict with this model, as the router's /v1/predict does, without the router hop
        (one Serve hop less: BENCHMARKS.md, scale). Vectors, vectors_b64 or concept_ids."""
        t0 = time.perf_counter()
        req, ctx = await ingress.parse(request, PredictRequest, self.user)
        return JSONResponse(await self._predict_direct(ctx, req.model, req.k,
                                                       req.return_vector, t0))

    # No protobuf annotations on methods: Serve pickles the ingress class by value, and
    # protobuf descriptors do not pickle.
    async def Predict(self, request, grpc_context=None):  # lvm_pb2.PredictRequest -> Prediction
        """gRPC twin of predict_http."""
        return await self._grpc(request, grpc_context, lambda ctx, k, t0: self._predict_direct(
            ctx, request.model or None, k, request.return_vector, t0))

    async def _grpc(self, request, grpc_context, call):
        """Decode a gRPC request's context, await call(ctx, k, t0), answer a Prediction (or the
        error's gRPC status)."""
        t0 = time.perf_counter()
        try:
            k = request.k or 5
            ingress.check_k(k, self.user)
            ctx = ingress.proto_context(request.context, self.user)
            return ingress.proto_prediction(await call(ctx, k, t0))
        except (RequestError, SessionError) as e:
            detail = e.detail if isinstance(e, RequestError) else str(e)
            return ingress.grpc_error(grpc_context, e.status, detail)

    async def _predict_direct(self, ctx, model: str | None, k: int, return_vector: bool,
                              t0: float) -> dict[str, Any]:
        if model is not None and model != self.name:
            raise RequestError(409, f"this endpoint serves model {self.name!r}, not {model!r}: "
                                    "predict at that model's application or at the router")
        self._no_texts(ctx, "predict")
        timings = {"decode": ctx.decode_ms}
        t1 = time.perf_counter()
        out = await self.predict(ctx.vectors, ctx.concept_ids, k, return_vector)
        if "error" in out:
            raise RequestError(out["status"], out["error"])
        timings.update(model=out["model_ms"], model_call=(time.perf_counter() - t1) * 1000,
                       total=(time.perf_counter() - t0) * 1000)
        return ingress.prediction(out, self.name, "direct", ctx.n, timings)

    @staticmethod
    def _no_texts(ctx, what: str) -> None:
        if ctx.texts is not None:
            raise RequestError(422, f"text input is encoded by the router: {what} texts at the "
                                    f"router's endpoint; this one takes vectors, vectors_b64 or "
                                    "concept_ids")

    @model_api.post("/v1/sessions/{session_id}/append", response_model=SessionOut,
                    openapi_extra=body_schema(SessionAppendRequest))
    async def append_http(self, session_id: str, request: Request) -> JSONResponse:
        """Append to a session of this model, as the router's endpoint of the same path does,
        without the router hop. Vectors, vectors_b64 or concept_ids (texts go to the router,
        which holds the text encoder)."""
        t0 = time.perf_counter()
        req, ctx = await ingress.parse(request, SessionAppendRequest, self.user)
        return JSONResponse(await self._append_direct(session_id, req.state, ctx, req.k,
                                                      req.return_vector, t0))

    async def Append(self, request, grpc_context=None):  # lvm_pb2.AppendRequest -> Prediction
        """gRPC twin of append_http."""
        return await self._grpc(request, grpc_context, lambda ctx, k, t0: self._append_direct(
            request.session_id, request.state, ctx, k, request.return_vector, t0))

    async def _append_direct(self, session_id: str, token: str, ctx, k: int,
                             return_vector: bool, t0: float) -> dict[str, Any]:
        if self.codec is None:
            raise RequestError(503, "this model deployment has no session key, so it cannot "
                                    "verify session tokens: append through the router, or set "
                                    "LVM_SESSION_KEY / args.session_key for every application")
        self._no_texts(ctx, "append")
        timings = {"decode": ctx.decode_ms}
        state = ingress.session_state(self.codec, token, session_id)
        if state.model != self.name:
            raise RequestError(409, f"session {session_id} belongs to model {state.model!r}, not "
                                    f"{self.name!r}: append at the append_url its open returned")
        t1 = time.perf_counter()
        out = await self.append(state, ctx.vectors, ctx.concept_ids, k, return_vector)
        if "error" in out:
            raise RequestError(out["status"], out["error"])
        ingress.advance(state, out, ctx.n)
        timings.update(model=out["model_ms"], model_call=(time.perf_counter() - t1) * 1000,
                       total=(time.perf_counter() - t0) * 1000)
        result = ingress.prediction(out, self.name, "session", ctx.n, timings)
        result.update(session_id=state.session_id, state=self.codec.encode(state),
                      n_seen=state.n_seen,
                      # This app's route prefix is /<app name> (lvm_ray.serve.app.model_app_name).
                      append_url=f"/{serve.get_replica_context().app_name}"
                                 f"/v1/sessions/{state.session_id}/append")
        return result


# ModelServer as its own application's ingress (model_api: direct session appends). Made once:
# serve.ingress binds model_api's routes to the class it wraps, in place.
_ModelServerIngress = serve.ingress(model_api)(ModelServer)


def model_deployment(cls: type = ModelServer, ingress: bool = False) -> Deployment:
    """`cls` (ModelServer or a subclass: an ensemble, a test's fault injection) as a Serve
    deployment inside the router's application; with ingress, ModelServer as its own
    application, serving model_api too."""
    if ingress and cls is not ModelServer:
        raise ValueError(f"a model application serves ModelServer, not {cls.__name__}: deploy "
                         "it inside the router's application (model_apps: null)")
    return serve.deployment(
        ray_actor_options={"num_cpus": 0.25},
        max_ongoing_requests=64,
        autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8},
        health_check_period_s=5,
    )(_ModelServerIngress if ingress else cls)


# ----------------------------------------------------------------------------- encoder


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64)
class TextEncoder:
    """The bank's encoder, so text input lands in the same vector space as the bank."""

    def __init__(self, bank: str, encoder: str | None = None):
        meta = read_bank_meta(localize(bank))
        self.bank_encoder = meta.get("encoder")
        self.dim = meta.get("dim")
        self.name = encoder_for_bank(self.bank_encoder, encoder)
        self.encoder = None
        # The backend the bank was embedded with (lvm_ray.data.onnx_encoder), so texts land
        # exactly where the bank's own vectors do.
        self.backend = meta.get("encoder_backend", "torch")
        if self.name is not None:
            self.encoder = get_encoder(EncoderConfig(name=self.name, device="cpu",
                                                     backend=self.backend))
            if self.dim is not None and self.encoder.dim != self.dim:
                raise ValueError(f"encoder {self.name} makes {self.encoder.dim}-d vectors but the "
                                 f"bank holds {self.dim}-d ones")

    def info(self) -> dict[str, Any]:
        return {"bank_encoder": self.bank_encoder, "encoder": self.name,
                "backend": self.backend, "text_input": self.encoder is not None}

    async def encode(self, texts: list[str]) -> np.ndarray | dict[str, Any]:
        if self.encoder is None:
            return _client_error(422, f"text input is not available: the bank's encoder is "
                                      f"{self.bank_encoder!r}, which has no text encoder here; "
                                      "send vectors, vectors_b64 or concept_ids (or deploy with "
                                      "args.encoder = a local model directory)")
        return await self._encode_batch(texts)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def _encode_batch(self, batches: list[list[str]]) -> list[np.ndarray]:
        flat = [t for texts in batches for t in texts]
        vecs = await asyncio.to_thread(self.encoder.encode, flat)  # (sum T, D)
        out, i = [], 0
        for texts in batches:
            out.append(vecs[i : i + len(texts)])
            i += len(texts)
        return out
