"""The Router: the FastAPI ingress of the hybrid service (parse -> route -> call -> respond).

It decodes a request's context, encodes texts through the TextEncoder, picks Phase-2 or Phase-3
with the routing policy (lvm_ray.serve.routing), calls that model deployment and signs session
state (lvm_ray.serve.sessions). Request checks live in lvm_ray.serve.schemas and .ingress.

Sessions: the routing decision for a session is made once, at open. When each model runs as its
own application (AppArgs.model_apps, the shipped config), the open answer's `append_url` points
at that model's own endpoint, so appends skip this router (one Serve hop less); the router's own
append URL keeps working. gRPC (lvm.proto): Predict and Append, the same answers as over HTTP.

Why this file is long: the HTTP endpoints, their gRPC twins and the guardrail bookkeeping around
every model call belong to the one ingress class; the request checks live elsewhere.
"""

import asyncio
import time
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from ray import serve
from ray.serve.handle import DeploymentHandle

from lvm_ray.config import from_dict, to_dict
from lvm_ray.serve import ingress
from lvm_ray.serve.config import RouterUserConfig
from lvm_ray.serve.metrics import RouterMetrics
from lvm_ray.serve.models import DEPLOYMENT_NAMES, short_error
from lvm_ray.serve.routing import PHASE2, PHASE3, RoutingPolicy
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
)
from lvm_ray.serve.sessions import SessionCodec, SessionError, SessionState, resolve_key

api = ingress.http_api("lvm_ray", "Next-concept prediction with latent vector models (Phase-2 / "
                       "Phase-3 hybrid routing, sessions). Errors are JSON {\"detail\": message}.")


@serve.deployment(
    name="Router",
    ray_actor_options={"num_cpus": 0.25},
    max_ongoing_requests=256,
)
@serve.ingress(api)
class Router:
    def __init__(self, phase2: DeploymentHandle | str, phase3: DeploymentHandle | str,
                 encoder: DeploymentHandle, session_key: str | None = None):
        """A model given as a string is the name of its own application (route prefix
        /<name>), whose ingress also serves that model's session appends."""
        models = {PHASE2: phase2, PHASE3: phase3}
        self.handles = {m: serve.get_deployment_handle(DEPLOYMENT_NAMES[m], app_name=h,
                                                       _check_exists=False)
                        if isinstance(h, str) else h for m, h in models.items()}
        self.append_prefix = {m: f"/{h}" if isinstance(h, str) else "" for m, h in models.items()}
        self.encoder = encoder
        self.user = RouterUserConfig()
        self.policy = RoutingPolicy(self.user)
        self.codec = SessionCodec(resolve_key(session_key), ttl_s=self.user.session_ttl_s)
        self.metrics = RouterMetrics()
        self.metrics.rolled_back.set(0)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.user = from_dict(RouterUserConfig, user_config or {}, "user_config")
        self.policy.configure(self.user)
        self.codec.ttl_s = self.user.session_ttl_s
        self.metrics.rolled_back.set(1 if self.policy.rolled_back else 0)

    # ------------------------------------------------------------------ helpers

    async def _parse(self, request: Request, model: type[BaseModel], required: bool = True):
        return await ingress.parse(request, model, self.user, required)

    async def _vectors(self, ctx: Context, timings: dict[str, float]) -> None:
        """Texts -> vectors through the encoder deployment (in place)."""
        if ctx.texts is None:
            return
        t0 = time.perf_counter()
        try:
            out = await self.encoder.encode.remote(ctx.texts)
        except Exception as e:  # noqa: BLE001  a failed encoder replica is a 503, not a crash
            raise RequestError(503, f"text encoder failed: {short_error(e)}") from None
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
            raise RequestError(503, f"model {model} failed: {short_error(e)}") from None
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
        out = {n: (i if not isinstance(i, BaseException) else {"error": short_error(i)})
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
            enc = {"error": short_error(e)}
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
                "user_config": to_dict(self.user),
                "replica": serve.get_replica_context().replica_tag}

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
        return ingress.prediction(out, r.model, r.reason, ctx.n, timings)

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
            prediction = ingress.prediction(out, r.model, r.reason, ctx.n, timings)
        return {"session_id": state.session_id, "state": self.codec.encode(state),
                "model": r.model, "route": r.reason, "n_seen": state.n_seen,
                "append_url": self._append_url(state), "prediction": prediction}

    def _append_url(self, state: SessionState) -> str:
        """Where the session's appends go: its model's own endpoint when the model is its own
        application (no router hop), else this router's."""
        return f"{self.append_prefix[state.model]}/v1/sessions/{state.session_id}/append"

    @api.post("/v1/sessions/{session_id}/append", response_model=SessionOut,
              openapi_extra=body_schema(SessionAppendRequest))
    async def append(self, session_id: str, request: Request) -> JSONResponse:
        """Append vectors (or texts, ids) to a session and predict the next concept: O(1) model
        work in the session's length."""
        return await self._timed("session_append", self._append_endpoint, session_id, request)

    async def _append_endpoint(self, session_id: str, request: Request) -> dict[str, Any]:
        t0 = time.perf_counter()
        req, ctx = await self._parse(request, SessionAppendRequest)
        return await self._append_session(session_id, req.state, ctx, req, t0)

    async def _append_session(self, session_id: str, token: str, ctx: Context, req,
                              t0: float) -> dict[str, Any]:
        state = ingress.session_state(self.codec, token, session_id)
        if state.model not in self.handles:
            raise RequestError(409, f"session model {state.model!r} is not deployed")
        timings = {"decode": ctx.decode_ms}
        out = await self._append(state, ctx, req, timings, t0)
        result = ingress.prediction(out, state.model, "session", ctx.n, timings)
        result.update(session_id=state.session_id, state=self.codec.encode(state),
                      n_seen=state.n_seen, append_url=self._append_url(state))
        return result

    async def _append(self, state: SessionState, ctx: Context, req, timings: dict,
                      t0: float) -> dict[str, Any]:
        """Run the append on the session's model and advance `state` in place."""
        await self._vectors(ctx, timings)
        out, call_ms = await self._call(state.model, "append", state, ctx.vectors,
                                        ctx.concept_ids, req.k, req.return_vector)
        ingress.advance(state, out, ctx.n)
        timings.update(model=out["model_ms"], model_call=call_ms,
                       total=(time.perf_counter() - t0) * 1000)
        return out

    # ------------------------------------------------------------------ gRPC (lvm.proto)

    async def Predict(self, request, grpc_context=None):  # lvm_pb2.PredictRequest -> Prediction
        """gRPC twin of POST /v1/predict."""
        return await self._grpc(self._predict_proto, request, grpc_context)

    # No protobuf annotations on methods: Serve pickles the ingress class by value, and
    # protobuf descriptors do not pickle.
    async def Append(self, request, grpc_context=None):  # lvm_pb2.AppendRequest -> Prediction
        """gRPC twin of POST /v1/sessions/{id}/append (through this router)."""
        return await self._grpc(self._append_proto, request, grpc_context)

    async def _grpc(self, fn, request, grpc_context):
        try:
            return ingress.proto_prediction(await fn(request))
        except (RequestError, SessionError) as e:
            detail = e.detail if isinstance(e, RequestError) else str(e)
            return ingress.grpc_error(grpc_context, e.status, detail)

    async def _predict_proto(self, msg) -> dict[str, Any]:  # msg: lvm_pb2.PredictRequest
        t0 = time.perf_counter()
        k = msg.k or 5
        ingress.check_k(k, self.user)
        ctx = ingress.proto_context(msg.context, self.user)
        timings = {"decode": (time.perf_counter() - t0) * 1000}
        await self._vectors(ctx, timings)
        r = await self._route(ctx.n, msg.model or None)
        out, call_ms = await self._call(r.model, "predict", ctx.vectors, ctx.concept_ids, k,
                                        msg.return_vector)
        timings.update(model=out["model_ms"], model_call=call_ms,
                       total=(time.perf_counter() - t0) * 1000)
        return ingress.prediction(out, r.model, r.reason, ctx.n, timings)

    async def _append_proto(self, msg) -> dict[str, Any]:  # msg: lvm_pb2.AppendRequest
        t0 = time.perf_counter()
        k = msg.k or 5
        ingress.check_k(k, self.user)
        ctx = ingress.proto_context(msg.context, self.user)
        ctx.decode_ms = (time.perf_counter() - t0) * 1000
        req = SessionAppendRequest.model_construct(state=msg.state, k=k,
                                                   return_vector=msg.return_vector)
        return await self._append_session(msg.session_id, msg.state, ctx, req, t0)
