"""What every entry point does with a request before any model work, shared by the Router and a
model deployment's own session endpoint, over HTTP and gRPC: read the body within its cap, parse
it, decode the context, verify a session token; and how answers are shaped.

Plain Starlette / protobuf / numpy, no Ray: testable on its own.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.requests import Request

from lvm_ray.serve.config import RequestLimits
from lvm_ray.serve.protos import lvm_pb2
from lvm_ray.serve.schemas import (Context, RequestError, check_count, check_texts,
                                   decode_context, parse_request)
from lvm_ray.serve.sessions import SessionCodec, SessionError, SessionState, SessionUnknown
from lvm_ray.predictor import vector_problem

# An over-limit body is still read (and dropped) up to this many bytes, so the client gets to
# read the 413 instead of a connection reset; past it the answer also closes the connection.
DRAIN_BYTES = 64 * 1024 * 1024


def http_api(title: str, description: str) -> FastAPI:
    """A FastAPI app whose RequestError / SessionError become JSON {"detail": message} answers
    with their status (and headers: a 413's Connection: close)."""
    api = FastAPI(title=title, version="1", description=description)

    @api.exception_handler(RequestError)
    async def _request_error(_: Request, e: RequestError) -> JSONResponse:
        return JSONResponse({"detail": e.detail}, status_code=e.status,
                            headers=getattr(e, "headers", None))

    @api.exception_handler(SessionError)
    async def _session_error(_: Request, e: SessionError) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, status_code=e.status)

    return api


class BodyTooLarge(RequestError):
    """413 for a body over max_body_bytes; answered with `Connection: close`."""

    headers = {"connection": "close"}


async def _drain(stream: AsyncIterator[bytes], already: int) -> None:
    """Read the rest of `stream` (one request.stream(): Starlette refuses a second) and drop it,
    up to DRAIN_BYTES in all."""
    seen = already
    async for chunk in stream:
        seen += len(chunk)
        if seen > DRAIN_BYTES:
            return


async def read_body(request: Request, cap: int) -> bytes:
    """The request body, or BodyTooLarge (413) once it is known to exceed `cap` bytes: by its
    Content-Length, or while streaming a chunked body. The rest of the body is drained first:
    a server that answers while the client is still sending and then closes the socket makes the
    client's kernel reset the connection, and the client never reads the answer."""
    declared = request.headers.get("content-length")
    stream = request.stream()
    if declared and declared.isdigit() and int(declared) > cap:
        await _drain(stream, 0)
        raise BodyTooLarge(413, f"request body is {declared} bytes; the limit is {cap} "
                                "(user_config max_body_bytes); send vectors_b64, fewer "
                                "vectors, or use a session")
    chunks, size = [], 0
    async for chunk in stream:
        size += len(chunk)
        if size > cap:
            await _drain(stream, size)
            raise BodyTooLarge(413, f"request body exceeds {cap} bytes (user_config "
                                    "max_body_bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


async def parse(request: Request, model: type[BaseModel], limits: RequestLimits,
                required: bool = True) -> tuple[Any, Context | None]:
    """Body -> (request model, context) under `limits`; RequestError says what is wrong."""
    body = await read_body(request, limits.max_body_bytes)
    t0 = time.perf_counter()
    req = parse_request(body, model)
    check_k(req.k, limits)
    ctx = decode_context(req, limits.max_context_vectors, required=required,
                         max_text_chars=limits.max_text_chars)
    if ctx is not None:
        ctx.decode_ms = (time.perf_counter() - t0) * 1000
    return req, ctx


def check_k(k: int, limits: RequestLimits) -> None:
    if k > limits.max_k:
        raise RequestError(422, f"k must be <= {limits.max_k}, got {k}")


def session_state(codec: SessionCodec, token: str, session_id: str) -> SessionState:
    """Verify a state token and check it belongs to `session_id` (SessionError otherwise)."""
    state = codec.decode(token)
    if state.session_id != session_id:
        raise SessionUnknown(f"unknown session {session_id!r}: the state token belongs to "
                             f"session {state.session_id!r}")
    return state


def advance(state: SessionState, out: dict[str, Any], n_new: int) -> None:
    """Move a session's state past an append whose model answer is `out`."""
    state.h, state.last, state.fingerprint = out["h"], out["last"], out["fingerprint"]
    state.n_seen += n_new
    state.issued_at = time.time()


def prediction(out: dict, model: str, route: str, n: int, timings: dict) -> dict[str, Any]:
    """The PredictionOut body of a model's answer."""
    return {"model": model, "route": route, "context_length": n,
            "context_used": out["context_used"], "neighbors": out["neighbors"],
            "vector": out["vector"], "batch_size": out["batch_size"], "timings_ms": timings}


# ----------------------------------------------------------------------------- gRPC

_GRPC_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 403: grpc.StatusCode.PERMISSION_DENIED,
               404: grpc.StatusCode.NOT_FOUND, 409: grpc.StatusCode.FAILED_PRECONDITION,
               410: grpc.StatusCode.FAILED_PRECONDITION, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
               422: grpc.StatusCode.INVALID_ARGUMENT, 503: grpc.StatusCode.UNAVAILABLE}


def grpc_error(grpc_context, status: int, detail: str) -> lvm_pb2.Prediction:
    """Set the gRPC status that stands for HTTP `status` and return an empty answer."""
    grpc_context.set_code(_GRPC_CODES.get(status, grpc.StatusCode.UNKNOWN))
    grpc_context.set_details(f"{status}: {detail}")
    return lvm_pb2.Prediction()


def proto_context(msg: lvm_pb2.Context, limits: RequestLimits) -> Context:
    """A gRPC Context message -> Context, with the checks decode_context makes over HTTP."""
    forms = [f for f, on in (("vectors", bool(msg.vectors) or msg.rows > 0),
                             ("concept_ids", len(msg.concept_ids) > 0),
                             ("texts", len(msg.texts) > 0)) if on]
    if len(forms) != 1:
        raise RequestError(422, "give exactly one context form: vectors (+ rows, dim), "
                                f"concept_ids or texts; got {forms or 'none'}")
    if forms[0] == "concept_ids":
        check_count(len(msg.concept_ids), limits.max_context_vectors)
        return Context(None, list(msg.concept_ids), None, len(msg.concept_ids))
    if forms[0] == "texts":
        texts = list(msg.texts)
        check_texts(texts, limits.max_context_vectors, limits.max_text_chars)
        return Context(None, None, texts, len(texts))
    t, d = msg.rows, msg.dim
    check_count(t, limits.max_context_vectors)
    if d < 1 or len(msg.vectors) != 4 * t * d:
        raise RequestError(422, f"vectors holds {len(msg.vectors)} bytes; rows {t} x dim {d} "
                                f"of float32 needs {4 * t * max(d, 0)}")
    arr = np.frombuffer(msg.vectors, dtype="<f4").reshape(t, d).astype(np.float32, copy=False)
    problem = vector_problem(arr)
    if problem:
        raise RequestError(422, problem)
    return Context(arr, None, None, t)


def proto_prediction(body: dict[str, Any]) -> lvm_pb2.Prediction:
    """A PredictionOut / SessionOut body -> the gRPC Prediction message."""
    vec = body.get("vector")
    return lvm_pb2.Prediction(
        model=body["model"], route=body["route"], context_length=body["context_length"],
        context_used=body["context_used"], batch_size=body["batch_size"],
        neighbors=[lvm_pb2.Neighbor(**n) for n in body["neighbors"]],
        vector=np.asarray(vec, dtype="<f4").tobytes() if vec is not None else b"",
        timings_ms=body["timings_ms"], session_id=body.get("session_id", ""),
        state=body.get("state", ""), n_seen=body.get("n_seen", 0))
