"""The Ray Serve application: two model deployments, a text encoder and a FastAPI router.

    HTTP -> proxy -> Router (FastAPI: parse, decode, route, sign sessions)
                       |-> Phase2Model (ModelServer: 500-context checkpoint, batched)
                       |-> Phase3Model (ModelServer: 1000-context checkpoint, batched)
                       '-> TextEncoder (the bank's encoder, for text input)

    serve run serve_configs/hybrid.yaml                     # the config names paths in `args`
    serve run lvm_ray.serve.app:build_app phase2_checkpoint=... phase3_checkpoint=... bank=...

The deployments translate; the math lives in lvm_ray.predictor, the routing policy in
lvm_ray.serve.routing, the session tokens in lvm_ray.serve.sessions and the request checks in
lvm_ray.serve.schemas (all three Ray-free).
"""

import asyncio
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from lvm_ray.serve.metrics import ModelMetrics, RouterMetrics
from lvm_ray.serve.routing import (MODELS, PHASE2, PHASE3, RoutingConfig, RoutingPolicy,
                                   lane_summary)
from lvm_ray.serve.schemas import (
    Context,
    PredictionOut,
    PredictRequest,
    RequestError,
    SessionAppendRequest,
    SessionOpenOut,
    SessionOpenRequest,
    SessionOut,
    body_schema,
    decode_context,
    parse_request,
)
from lvm_ray.serve.sessions import (
    SessionCodec,
    SessionError,
    SessionState,
    SessionUnknown,
    check_compatible,
    checkpoint_fingerprint,
    new_key,
    resolve_key,
)

if TYPE_CHECKING:
    from lvm_ray.predictor import Predictor

DEPLOYMENT_NAMES = {PHASE2: "Phase2Model", PHASE3: "Phase3Model"}
INLINE_VECTORS = 64  # batches of at most this many vectors skip the thread hand-off


# ----------------------------------------------------------------------------- configuration


class AppArgs(BaseModel):
    """`args` of the app (serve config or `serve run ... key=value`). Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    phase2_checkpoint: str = "runs/demo/phase2/best"
    phase3_checkpoint: str = "runs/demo/phase3/best"
    bank: str = "data/sotu_demo_bank.parquet"
    # A local sentence-transformers directory, when the bank's encoder is not one lvm_ray knows.
    encoder: str | None = None
    # HMAC key of session tokens; LVM_SESSION_KEY in the replicas' environment wins. Without
    # either, each deploy makes a new key and earlier sessions stop verifying.
    session_key: str | None = None
    device: str = "cpu"


class ModelUserConfig(BaseModel):
    """user_config of Phase2Model / Phase3Model, applied live by reconfigure()."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(16, ge=1, le=256)  # 1 = no batching
    # 0 = no waiting: a batch is whatever queued while the previous one ran.
    batch_wait_timeout_s: float = Field(0.0, ge=0.0, le=1.0)
    inject_latency_ms: float = Field(0.0, ge=0.0, le=60_000.0)  # tests: a slow model
    inject_error_rate: float = Field(0.0, ge=0.0, le=1.0)  # tests: a failing model


class RouterUserConfig(BaseModel):
    """user_config of the Router, applied live by reconfigure()."""

    model_config = ConfigDict(extra="forbid")

    threshold: int = Field(500, ge=0)
    canary_fraction: float = Field(0.05, ge=0.0, le=1.0)
    p95_limit_ms: float = Field(10.0, gt=0.0)
    error_rate_limit: float = Field(0.001, ge=0.0, le=1.0)
    window: int = Field(200, ge=1)
    min_samples: int = Field(20, ge=1)
    rollout_id: str = ""
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    max_context_vectors: int = Field(4096, ge=1)
    max_k: int = Field(50, ge=1)
    session_ttl_s: float = Field(3600.0, gt=0.0)
    # The design's lane rule blocks canary traffic to a Phase-3 whose lanes.json fails it;
    # false lets it through anyway (the status still shows the failure).
    enforce_lane_rule: bool = True

    def routing(self) -> RoutingConfig:
        return RoutingConfig(**self.model_dump(include=set(RoutingConfig.__dataclass_fields__)))

    @model_validator(mode="after")
    def _check_routing(self) -> "RouterUserConfig":
        self.routing()  # cross-field rules (min_samples <= window) live in RoutingConfig
        return self


def localize(uri: str, cache: Path | None = None) -> str:
    """A local path for a path or URI. file:// and plain paths are used in place; other URIs
    (s3://, gs://, ... anything pyarrow.fs reads) are copied once into a per-URI cache."""
    if "://" not in uri:
        return str(Path(uri).expanduser().resolve())
    if uri.startswith("file://") and cache is None:
        return uri[len("file://"):]
    import pyarrow.fs as pafs

    cache = cache or Path(tempfile.gettempdir()) / "lvm_ray_cache"
    target = cache / hashlib.sha1(uri.encode()).hexdigest()[:16] / Path(uri.rstrip("/")).name
    if target.exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent))
    try:
        src_fs, src = pafs.FileSystem.from_uri(uri)
        out = tmp / target.name
        if src_fs.get_file_info(src).type == pafs.FileType.Directory:
            out.mkdir()
        pafs.copy_files(src, str(out), source_filesystem=src_fs,
                        destination_filesystem=pafs.LocalFileSystem())
        try:
            os.replace(out, target)  # atomic: a replica copying the same URI never sees half
        except OSError:
            if not target.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def encoder_name_for_bank(bank_encoder: str | None, override: str | None) -> str | None:
    """EncoderConfig.name for a bank's recorded encoder; None when it has no text encoder."""
    if override:
        return override
    if bank_encoder == "all-MiniLM-L6-v2":
        return "minilm"
    if bank_encoder and re.fullmatch(r"hashing-\d+", bank_encoder):
        return bank_encoder
    return None


# ----------------------------------------------------------------------------- model


def _read_lanes(ckpt_dir: str) -> tuple[dict[str, Any] | None, str | None]:
    """The checkpoint's lane summary, or None and why (never made-up numbers)."""
    from lvm_ray.eval.lanes import LANES_JSON, lane_report

    try:
        report = lane_report(ckpt_dir)
    except (OSError, ValueError) as e:  # a corrupt file must not keep the model from serving
        return None, f"{LANES_JSON} in {ckpt_dir} is unreadable: {_short(e)}"
    if report is None:
        return None, (f"no {LANES_JSON} in {ckpt_dir}: the checkpoint was not evaluated with "
                      "lanes, so the lane rule is not checked")
    return lane_summary(report), None


def _client_error(status: int, detail: str) -> dict[str, Any]:
    # Returned, not raised: a client's bad input is an answer, not a replica failure.
    return {"error": detail, "status": status}


@serve.deployment(
    ray_actor_options={"num_cpus": 0.25},
    max_ongoing_requests=64,
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8},
    health_check_period_s=5,
)
class ModelServer:
    """One checkpoint + the concept bank (FAISS index) behind @serve.batch methods."""

    def __init__(self, name: str, checkpoint: str, bank: str, device: str = "cpu"):
        from lvm_ray.predictor import Predictor

        self.name = name
        self.checkpoint = checkpoint
        ckpt_dir = localize(checkpoint)
        self.predictor = Predictor.from_paths(ckpt_dir, localize(bank), device=device)
        cfg = self.predictor.model.cfg
        self.state_shape = (cfg.layers, cfg.hidden)
        self.fingerprint = checkpoint_fingerprint(self.predictor.meta)
        self.metrics = ModelMetrics()
        self.user = ModelUserConfig()
        self.lanes, self.lanes_reason = _read_lanes(ckpt_dir)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.user = ModelUserConfig.model_validate(user_config or {})
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
                "bank_size": i["bank_size"], "bank_encoder": self.predictor.bank.meta.get("encoder"),
                "lanes": self.lanes, "lanes_reason": self.lanes_reason,
                "user_config": self.user.model_dump(),
                "replica": serve.get_replica_context().replica_tag}

    def noop(self) -> dict[str, Any]:
        return {}

    async def _inject(self) -> None:
        if self.user.inject_latency_ms > 0:
            await asyncio.sleep(self.user.inject_latency_ms / 1000)
        if self.user.inject_error_rate > 0 and random.random() < self.user.inject_error_rate:
            raise RuntimeError("injected failure (user_config inject_error_rate)")

    def _vectors(self, vectors: np.ndarray | None, concept_ids: list[int] | None) -> np.ndarray:
        from lvm_ray.predictor import PredictorInputError

        try:
            ctx = self.predictor.vectors_for_ids(concept_ids) if concept_ids is not None else vectors
            return self.predictor.validate(ctx)  # (T, D)
        except PredictorInputError as e:
            raise RequestError(422, str(e)) from None

    async def predict(self, vectors: np.ndarray | None, concept_ids: list[int] | None,
                      k: int, return_vector: bool) -> dict[str, Any]:
        """A full context -> prediction; the model reads the last max_context vectors."""
        await self._inject()
        try:
            ctx = self._vectors(vectors, concept_ids)
        except RequestError as e:
            return _client_error(e.status, e.detail)
        return await self._predict_batch((ctx, k, return_vector))

    async def append(self, session: SessionState, vectors: np.ndarray | None,
                     concept_ids: list[int] | None, k: int, return_vector: bool) -> dict[str, Any]:
        """Continue `session` with new vectors: O(len(new vectors)) model work."""
        await self._inject()
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


# ----------------------------------------------------------------------------- encoder


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64)
class TextEncoder:
    """The bank's encoder, so text input lands in the same vector space as the bank."""

    def __init__(self, bank: str, encoder: str | None = None):
        from lvm_ray.config import EncoderConfig
        from lvm_ray.data.bank import read_bank_meta
        from lvm_ray.data.encoders import get_encoder

        meta = read_bank_meta(localize(bank))
        self.bank_encoder = meta.get("encoder")
        self.dim = meta.get("dim")
        self.name = encoder_name_for_bank(self.bank_encoder, encoder)
        self.encoder = None
        if self.name is not None:
            self.encoder = get_encoder(EncoderConfig(name=self.name, device="cpu"))
            if self.dim is not None and self.encoder.dim != self.dim:
                raise ValueError(f"encoder {self.name} makes {self.encoder.dim}-d vectors but the "
                                 f"bank holds {self.dim}-d ones")

    def info(self) -> dict[str, Any]:
        return {"bank_encoder": self.bank_encoder, "encoder": self.name,
                "text_input": self.encoder is not None}

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


# ----------------------------------------------------------------------------- router

api = FastAPI(title="lvm_ray", version="1",
              description="Next-concept prediction with latent vector models (Phase-2 / Phase-3 "
                          "hybrid routing, sessions). Errors are JSON {\"detail\": message}.")


@api.exception_handler(RequestError)
async def _request_error(_: Request, e: RequestError) -> JSONResponse:
    return JSONResponse({"detail": e.detail}, status_code=e.status)


@api.exception_handler(SessionError)
async def _session_error(_: Request, e: SessionError) -> JSONResponse:
    return JSONResponse({"detail": str(e)}, status_code=e.status)


def _short(e: BaseException) -> str:
    """The last line of a (possibly remote) exception: a message, not a traceback."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[-1][:300] if lines else ''}"


@serve.deployment(
    name="Router",
    ray_actor_options={"num_cpus": 0.25},
    max_ongoing_requests=256,
)
@serve.ingress(api)
class Router:
    def __init__(self, phase2: DeploymentHandle, phase3: DeploymentHandle,
                 encoder: DeploymentHandle, session_key: str | None = None):
        self.handles = {PHASE2: phase2, PHASE3: phase3}
        self.encoder = encoder
        self.user = RouterUserConfig()
        self.policy = RoutingPolicy(self.user.routing())
        self.codec = SessionCodec(resolve_key(session_key), ttl_s=self.user.session_ttl_s)
        self.metrics = RouterMetrics()
        self.metrics.rolled_back.set(0)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.user = RouterUserConfig.model_validate(user_config or {})
        self.policy.configure(self.user.routing())
        self.codec.ttl_s = self.user.session_ttl_s
        self.metrics.rolled_back.set(1 if self.policy.rolled_back else 0)

    # ------------------------------------------------------------------ helpers

    async def _body(self, request: Request) -> bytes:
        cap = self.user.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > cap:
            raise RequestError(413, f"request body is {declared} bytes; the limit is {cap} "
                                    "(router user_config max_body_bytes); send vectors_b64, "
                                    "fewer vectors, or use a session")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                raise RequestError(413, f"request body exceeds {cap} bytes (router user_config "
                                        "max_body_bytes)")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _parse(self, request: Request, model: type[BaseModel], required: bool = True):
        body = await self._body(request)
        t0 = time.perf_counter()
        req = parse_request(body, model)
        if req.k > self.user.max_k:
            raise RequestError(422, f"k must be <= {self.user.max_k}, got {req.k}")
        ctx = decode_context(req, self.user.max_context_vectors, required=required)
        if ctx is not None:
            ctx.decode_ms = (time.perf_counter() - t0) * 1000
        return req, ctx

    async def _vectors(self, ctx: Context, timings: dict[str, float]) -> None:
        """Texts -> vectors through the encoder deployment (in place)."""
        if ctx.texts is None:
            return
        t0 = time.perf_counter()
        try:
            out = await self.encoder.encode.remote(ctx.texts)
        except Exception as e:  # noqa: BLE001  a failed encoder replica is a 503, not a crash
            raise RequestError(503, f"text encoder failed: {_short(e)}") from None
        if isinstance(out, dict):
            raise RequestError(out["status"], out["error"])
        ctx.vectors, ctx.texts = out, None
        timings["encode"] = (time.perf_counter() - t0) * 1000

    async def _call(self, model: str, method: str, *args) -> tuple[dict, float]:
        """Call a model deployment; feed the guardrail; map its answers to HTTP errors."""
        t0 = time.perf_counter()
        try:
            out = await getattr(self.handles[model], method).remote(*args)
        except Exception as e:  # noqa: BLE001  any replica failure counts against the model
            self._observe_model(model, (time.perf_counter() - t0) * 1000, ok=False)
            raise RequestError(503, f"model {model} failed: {_short(e)}") from None
        ms = (time.perf_counter() - t0) * 1000
        if "error" in out:  # the client's bad input: not the model's latency or error rate
            raise RequestError(out["status"], out["error"])
        self._observe_model(model, ms, ok=True)
        return out, ms

    def _observe_model(self, model: str, ms: float, ok: bool) -> None:
        self.metrics.model_latency.observe(ms, tags={"model": model})
        rb = self.policy.record(model, ms, ok)
        if model == PHASE3:
            self.metrics.phase3_p95.set(self.policy.p95_ms())
            self.metrics.phase3_error_rate.set(self.policy.error_rate())
        if rb is not None:
            self.metrics.rollbacks.inc(tags={"reason": rb.reason})
            self.metrics.rolled_back.set(1)

    async def _infos(self, names: list[str]) -> dict[str, dict[str, Any]]:
        """info() of each model; Phase-3's lane report also goes to the routing policy."""
        infos = await asyncio.gather(*(self.handles[n].info.remote() for n in names),
                                     return_exceptions=True)
        out = {n: (i if not isinstance(i, BaseException) else {"error": _short(i)})
               for n, i in zip(names, infos)}
        if "lanes" in out.get(PHASE3, {}):
            self.policy.set_canary_lanes(out[PHASE3]["lanes"])
        return out

    async def _route(self, n: int, explicit: str | None):
        if explicit is None and n > self.user.threshold and not self.policy.lanes_read:
            # The first long context waits for Phase-3's lane report (once per router replica,
            # whose Phase-3 checkpoint is fixed; /v1/status and /v1/models refresh it). If
            # Phase-3 does not answer, the request is routed unchecked and the next one retries.
            await self._infos([PHASE3])
        try:
            r = self.policy.route(n, explicit)
        except ValueError as e:
            raise RequestError(422, str(e)) from None
        self.metrics.routes.inc(tags={"model": r.model, "reason": r.reason})
        return r

    def _prediction(self, out: dict, model: str, route: str, n: int, timings: dict) -> dict:
        return {"model": model, "route": route, "context_length": n,
                "context_used": out["context_used"], "neighbors": out["neighbors"],
                "vector": out["vector"], "batch_size": out["batch_size"], "timings_ms": timings}

    async def _timed(self, endpoint: str, fn, *args) -> JSONResponse:
        """Run an endpoint body with request/error/latency metrics around it. The body is
        returned as is: the response_model documents it (tests check it), and skipping its
        re-validation saves time on every request."""
        t0 = time.perf_counter()
        model = "none"
        try:
            result = await fn(*args)
            model = result.get("model", "none")
            return JSONResponse(result)
        except (RequestError, SessionError) as e:
            status = e.status
            self.metrics.errors.inc(tags={"endpoint": endpoint, "model": model,
                                          "status": str(status)})
            raise
        finally:
            self.metrics.requests.inc(tags={"endpoint": endpoint, "model": model})
            self.metrics.latency.observe((time.perf_counter() - t0) * 1000,
                                         tags={"endpoint": endpoint, "model": model})

    # ------------------------------------------------------------------ endpoints

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        """What is deployed: each model's checkpoint, context length, test metrics and lanes."""
        enc = self.encoder.info.remote()  # in flight while the models answer
        out = await self._infos(list(self.handles))
        try:
            enc = await enc
        except Exception as e:  # noqa: BLE001  shown, not raised: the models still answer
            enc = {"error": _short(e)}
        return {"models": out, "encoder": enc}

    @api.get("/v1/status")
    async def status(self) -> dict[str, Any]:
        """This router replica's routing state: rollout, rolling Phase-3 stats, rollbacks, the
        lane rule, and each model's per-lane Hit@5 and lane verdict."""
        infos = await self._infos(list(self.handles))
        models = {n: ({"error": i["error"]} if "error" in i else
                      {"checkpoint": i["checkpoint"], "fingerprint": i["fingerprint"],
                       "lanes": i["lanes"], "lanes_reason": i["lanes_reason"],
                       "lane_rule_ok": i["lanes"]["canary_ok"] if i["lanes"] else None})
                  for n, i in infos.items()}
        return {"routing": self.policy.status(), "models": models,
                "user_config": self.user.model_dump(),
                "replica": serve.get_replica_context().replica_tag}

    @api.post("/v1/noop")
    async def noop(self, request: Request, hops: str = "router") -> dict[str, Any]:
        """Serve's floor for benchmarks: read the body, optionally one hop to Phase2Model."""
        await self._body(request)
        if hops == "model":
            await self.handles[PHASE2].noop.remote()
        elif hops != "router":
            raise RequestError(422, "hops must be 'router' or 'model'")
        return {}

    @api.post("/v1/predict", response_model=PredictionOut,
              openapi_extra=body_schema(PredictRequest))
    async def predict(self, request: Request) -> JSONResponse:
        """Predict the next concept after a full context (any of the four input forms)."""
        return await self._timed("predict", self._predict, request)

    async def _predict(self, request: Request) -> dict[str, Any]:
        t0 = time.perf_counter()
        req, ctx = await self._parse(request, PredictRequest)
        timings = {"decode": ctx.decode_ms}
        await self._vectors(ctx, timings)
        r = await self._route(ctx.n, req.model)
        out, call_ms = await self._call(r.model, "predict", ctx.vectors,
                                        ctx.concept_ids, req.k, req.return_vector)
        timings.update(model=out["model_ms"], model_call=call_ms,
                       total=(time.perf_counter() - t0) * 1000)
        return self._prediction(out, r.model, r.reason, ctx.n, timings)

    @api.post("/v1/sessions", response_model=SessionOpenOut,
              openapi_extra=body_schema(SessionOpenRequest))
    async def open_session(self, request: Request) -> JSONResponse:
        """Open a session (optionally with an initial context). The returned `state` carries
        the session; send it back with each append."""
        return await self._timed("session_open", self._open, request)

    async def _open(self, request: Request) -> dict[str, Any]:
        t0 = time.perf_counter()
        req, ctx = await self._parse(request, SessionOpenRequest, required=False)
        r = await self._route(ctx.n if ctx else 0, req.model)
        # The checkpoint fingerprint is taken from the first append: an empty session has no
        # state yet, so any checkpoint of its model may start it.
        state = SessionState.new(r.model, fingerprint="")
        prediction = None
        if ctx is not None:
            timings = {"decode": ctx.decode_ms}
            out = await self._append(state, ctx, req, timings, t0)
            prediction = self._prediction(out, r.model, r.reason, ctx.n, timings)
        return {"session_id": state.session_id, "state": self.codec.encode(state),
                "model": r.model, "route": r.reason, "n_seen": state.n_seen,
                "prediction": prediction}

    @api.post("/v1/sessions/{session_id}/append", response_model=SessionOut,
              openapi_extra=body_schema(SessionAppendRequest))
    async def append(self, session_id: str, request: Request) -> JSONResponse:
        """Append vectors (or texts, ids) to a session and predict the next concept: O(1) model
        work in the session's length."""
        return await self._timed("session_append", self._append_endpoint, session_id, request)

    async def _append_endpoint(self, session_id: str, request: Request) -> dict[str, Any]:
        t0 = time.perf_counter()
        req, ctx = await self._parse(request, SessionAppendRequest)
        state = self.codec.decode(req.state)
        if state.session_id != session_id:
            raise SessionUnknown(f"unknown session {session_id!r}: the state token belongs to "
                                 f"session {state.session_id!r}")
        if state.model not in self.handles:
            raise RequestError(409, f"session model {state.model!r} is not deployed")
        timings = {"decode": ctx.decode_ms}
        out = await self._append(state, ctx, req, timings, t0)
        result = self._prediction(out, state.model, "session", ctx.n, timings)
        result.update(session_id=state.session_id, state=self.codec.encode(state),
                      n_seen=state.n_seen)
        return result

    async def _append(self, state: SessionState, ctx: Context, req, timings: dict,
                      t0: float) -> dict[str, Any]:
        """Run the append on the session's model and advance `state` in place."""
        await self._vectors(ctx, timings)
        out, call_ms = await self._call(state.model, "append", state, ctx.vectors,
                                        ctx.concept_ids, req.k, req.return_vector)
        state.h, state.last, state.fingerprint = out["h"], out["last"], out["fingerprint"]
        state.n_seen += ctx.n
        state.issued_at = time.time()
        timings.update(model=out["model_ms"], model_call=call_ms,
                       total=(time.perf_counter() - t0) * 1000)
        return out


# ----------------------------------------------------------------------------- app


def build_app(args: dict[str, Any]) -> Application:
    """The whole app from its args (see AppArgs): what `serve run` / `serve deploy` import."""
    return make_app(args)


def make_app(args: dict[str, Any] | AppArgs, options: dict[str, dict[str, Any]] | None = None
             ) -> Application:
    """build_app with per-deployment option overrides for Python callers (tests, benchmarks),
    e.g. {"Router": {"user_config": {...}}}: what a serve config's `deployments` list does.
    Paths are resolved here, in the process that builds the app; without a session key each
    build makes a fresh one."""
    a = args if isinstance(args, AppArgs) else AppArgs.model_validate(dict(args or {}))
    options = dict(options or {})
    key = os.environ.get("LVM_SESSION_KEY") or a.session_key or new_key()

    def path(p: str) -> str:
        return p if "://" in p else str(Path(p).expanduser().resolve())

    def opts(name: str) -> dict[str, Any]:
        return {"name": name, **options.pop(name, {})}

    bank = path(a.bank)
    phase2 = ModelServer.options(**opts(DEPLOYMENT_NAMES[PHASE2])).bind(
        PHASE2, path(a.phase2_checkpoint), bank, a.device)
    phase3 = ModelServer.options(**opts(DEPLOYMENT_NAMES[PHASE3])).bind(
        PHASE3, path(a.phase3_checkpoint), bank, a.device)
    encoder = TextEncoder.options(**opts("TextEncoder")).bind(bank, a.encoder)
    app = Router.options(**opts("Router")).bind(phase2, phase3, encoder, key)
    if options:
        raise ValueError(f"unknown deployment(s) {sorted(options)}; the app has Router, "
                         f"{', '.join(DEPLOYMENT_NAMES.values())}, TextEncoder")
    return app


def app_from_config(app: dict[str, Any]) -> Application:
    """One `applications` entry of a serve config -> the app, its `deployments` entries applied
    as deployment options (what Serve does when it deploys the config)."""
    options = {d["name"]: {k: v for k, v in d.items() if k != "name"}
               for d in app.get("deployments", [])}
    return make_app(app.get("args", {}), options)


def run_config(path: str | Path, blocking: bool = True) -> dict[str, DeploymentHandle]:
    """Deploy a serve config file (e.g. serve_configs/hybrid.yaml) on the current Ray (started
    locally if needed) through the Python API: what `serve run CONFIG` does, for `lvm serve`.
    With blocking=True it serves until interrupted. Returns the ingress handle of each app."""
    import ray
    import yaml
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load(Path(path).read_text())
    cfg = ServeDeploySchema.model_validate(raw)  # the same checks `serve deploy` makes
    if not ray.is_initialized():
        ray.init()
    serve.start(http_options=raw.get("http_options") or {})
    handles = {}
    for app in raw["applications"]:
        if app["import_path"] != "lvm_ray.serve.app:build_app":
            raise ValueError(f"{path}: run_config deploys lvm_ray apps only, got "
                             f"{app['import_path']}; use `serve run {path}`")
        handles[app["name"]] = serve.run(app_from_config(app), name=app["name"],
                                         route_prefix=app.get("route_prefix", "/"))
    host, port = cfg.http_options.host, cfg.http_options.port
    print(f"lvm_ray serving on http://{host}:{port}/ (OpenAPI at /docs); Ctrl-C stops it",
          flush=True)
    if blocking:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.shutdown()
    return handles


def demo_query(phase2_checkpoint: str, phase3_checkpoint: str, bank: str,
               texts: list[str] | None = None) -> dict[str, Any]:
    """For `make demo`: deploy the app on the running Ray, ask it over HTTP for the concept after
    a few sentences (one prediction, then a session fed one sentence at a time), print the
    answers, shut Serve down. Returns the predict response."""
    import socket

    import httpx

    texts = texts or ["We must rebuild our economy.", "Our workers deserve better wages.",
                      "Tonight I ask the Congress to act."]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(make_app({"phase2_checkpoint": phase2_checkpoint,
                            "phase3_checkpoint": phase3_checkpoint, "bank": bank}),
                  name="lvm", route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
            r = http.post("/v1/predict", json={"texts": texts, "k": 3})
            r.raise_for_status()
            out = r.json()
            print(f"context: {texts}\n{out['model']} ({out['route']}) predicts the next concept "
                  f"is near:", flush=True)
            for n in out["neighbors"]:
                print(f"  {n['score']:.3f}  [{n['doc_id']} #{n['position']}] {n['text'][:100]}")
            s = http.post("/v1/sessions", json={}).json()
            for t in texts:
                r = http.post(f"/v1/sessions/{s['session_id']}/append",
                              json={"state": s["state"], "texts": [t], "k": 1})
                r.raise_for_status()
                s = r.json()
            same = s["neighbors"][0]["concept_id"] == out["neighbors"][0]["concept_id"]
            print(f"a session fed the same {s['n_seen']} sentences one at a time "
                  f"{'agrees' if same else 'DIFFERS'}: {s['neighbors'][0]['text'][:100]!r} "
                  f"(last append {s['timings_ms']['total']:.1f} ms in the router)", flush=True)
        return out
    finally:
        serve.shutdown()


__all__ = ["AppArgs", "MODELS", "ModelServer", "ModelUserConfig", "Router", "RouterUserConfig",
           "TextEncoder", "app_from_config", "build_app", "demo_query", "make_app",
           "run_config"]
