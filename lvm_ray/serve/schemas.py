"""Request and response models of the HTTP API, and the decoding of a request's context.

Plain pydantic + numpy (no Ray), so every bad-input rule is testable on its own. A context comes
in exactly one of four forms:

    {"vectors": [[...], ...]}                          JSON numbers, (T, D)
    {"vectors_b64": "...", "shape": [T, D]}            base64 of little-endian float32, row-major
    {"concept_ids": [12, 13, ...]}                     rows of the concept bank
    {"texts": ["...", ...]}                            encoded by the bank's encoder
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lvm_ray.predictor import vector_problem

ModelName = Literal["phase2", "phase3"]
CONTEXT_FIELDS = ("vectors", "vectors_b64", "concept_ids", "texts")


class RequestError(Exception):
    """A request the service cannot serve; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


# ----------------------------------------------------------------------------- requests


class ContextIn(BaseModel):
    # strict: "1.5" is not a number and 2.0 is not a concept id.
    model_config = ConfigDict(extra="forbid", strict=True)

    vectors: list[list[float]] | None = Field(None, description="context vectors (T, D)")
    vectors_b64: str | None = Field(
        None, description="base64 (standard alphabet) of little-endian float32, row-major (T, D)")
    shape: list[int] | None = Field(None, description="[T, D] of vectors_b64")
    concept_ids: list[int] | None = Field(None, description="concept ids (rows of the bank)")
    texts: list[str] | None = Field(None, description="texts, encoded by the bank's encoder")
    k: int = Field(5, ge=1, description="nearest concepts to return")
    return_vector: bool = Field(False, description="include the predicted vector")


class PredictRequest(ContextIn):
    model: ModelName | None = Field(None, description="force a model; default: the router decides")


class SessionOpenRequest(ContextIn):
    model: ModelName | None = Field(
        None, description="pin the session to a model; default: routed by the initial context")


class SessionAppendRequest(ContextIn):
    state: str = Field(description="the session state token of the previous response")


# ----------------------------------------------------------------------------- responses


class NeighborOut(BaseModel):
    concept_id: int
    text: str
    doc_id: str
    position: int
    score: float


class PredictionOut(BaseModel):
    model: str
    route: str = Field(description="why this model: short, canary, canary_skip, rolled_back, "
                                   "canary_blocked (Phase-3 fails the lane rule), explicit, "
                                   "session, or direct (a model application's own /v1/predict)")
    context_length: int = Field(description="vectors in the request (or appended)")
    context_used: int = Field(description="vectors the model read in this call")
    neighbors: list[NeighborOut]
    vector: list[float] | None = None
    batch_size: int = Field(description="requests the model served in the same forward pass")
    timings_ms: dict[str, float] = Field(
        description="decode (body -> context), encode (texts), model (forward + kNN of the "
                    "batch), model_call (router -> model round trip), total (inside the router)")


APPEND_URL = ("where to send this session's appends: the model's own endpoint when it runs as "
              "its own application (no router hop), else the router's")


class SessionOut(PredictionOut):
    session_id: str
    state: str = Field(description="send this back with the next append")
    n_seen: int = Field(description="vectors consumed by the session so far")
    append_url: str = Field(description=APPEND_URL)


class SessionOpenOut(BaseModel):
    session_id: str
    state: str
    model: str
    route: str
    n_seen: int
    append_url: str = Field(description=APPEND_URL)
    prediction: PredictionOut | None = None


# ----------------------------------------------------------------------------- decoding


@dataclass
class Context:
    vectors: np.ndarray | None  # (T, D) float32, finite
    concept_ids: list[int] | None
    texts: list[str] | None
    n: int  # T
    decode_ms: float = 0.0


def parse_request(body: bytes, model: type[BaseModel]) -> Any:
    """JSON body -> request model, or RequestError(422) naming each problem."""
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        problems = []
        for err in e.errors()[:5]:
            loc = ".".join(str(p) for p in err.get("loc", ())) or "body"
            problems.append(f"{loc}: {err.get('msg')}")
        more = f" (+{e.error_count() - 5} more)" if e.error_count() > 5 else ""
        raise RequestError(422, "invalid request: " + "; ".join(problems) + more) from None


def decode_context(req: ContextIn, max_vectors: int, required: bool = True,
                   max_text_chars: int | None = None) -> Context | None:
    """The request's context, checked for everything that does not need the model: exactly one
    form, shape, base64, finite values and norms, at most max_vectors vectors and, for texts, at
    most max_text_chars characters in all (413 above either cap)."""
    given = [f for f in CONTEXT_FIELDS if getattr(req, f) is not None]
    if req.shape is not None and req.vectors_b64 is None:
        raise RequestError(422, "shape is only used with vectors_b64")
    if not given:
        if required:
            raise RequestError(422, "no context: give one of " + ", ".join(CONTEXT_FIELDS))
        return None
    if len(given) > 1:
        raise RequestError(422, f"give exactly one context form, got {', '.join(given)}")
    form = given[0]
    if form == "concept_ids":
        ids = req.concept_ids
        check_count(len(ids), max_vectors)
        return Context(None, ids, None, len(ids))
    if form == "texts":
        texts = req.texts
        check_texts(texts, max_vectors, max_text_chars)
        return Context(None, None, texts, len(texts))
    if form == "vectors":
        rows = req.vectors
        check_count(len(rows), max_vectors)
        widths = {len(r) for r in rows}
        if len(widths) > 1:
            raise RequestError(422, f"vectors rows have different lengths {sorted(widths)[:5]}")
        arr = np.asarray(rows, dtype=np.float32).reshape(len(rows), -1)  # (T, D)
    else:
        arr = _decode_b64(req.vectors_b64, req.shape, max_vectors)
    problem = vector_problem(arr)
    if problem:
        raise RequestError(422, problem)
    return Context(arr, None, None, len(arr))



def check_count(n: int, max_vectors: int) -> None:
    if n == 0:
        raise RequestError(422, "context is empty: give at least one vector")
    if n > max_vectors:
        raise RequestError(413, f"context has {n} vectors; this service accepts at most "
                                f"{max_vectors} per request (router user_config "
                                "max_context_vectors)")


def check_texts(texts: list[str], max_vectors: int, max_text_chars: int | None) -> None:
    check_count(len(texts), max_vectors)
    chars = sum(map(len, texts))
    if max_text_chars is not None and chars > max_text_chars:
        # Encoder time grows with the characters, not the count: one 1 MB text costs seconds.
        raise RequestError(413, f"texts hold {chars} characters; this service encodes at most "
                                f"{max_text_chars} per request (user_config max_text_chars); "
                                "send fewer or shorter texts, or vectors")


def _decode_b64(data: str, shape: list[int] | None, max_vectors: int) -> np.ndarray:
    if shape is None or len(shape) != 2 or min(shape) < 0:
        raise RequestError(422, f"vectors_b64 needs shape [T, D] with T, D >= 0, got {shape}")
    t, d = shape
    check_count(t, max_vectors)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(422, "vectors_b64 is not valid base64 (standard alphabet, padded)") \
            from None
    if len(raw) != 4 * t * d:
        raise RequestError(422, f"vectors_b64 holds {len(raw)} bytes; shape {shape} of float32 "
                                f"needs {4 * t * d}")
    return np.frombuffer(raw, dtype="<f4").reshape(t, d).astype(np.float32, copy=False)


def encode_b64(vectors: np.ndarray) -> dict[str, Any]:
    """The vectors_b64 + shape form of a (T, D) array (what clients send)."""
    arr = np.ascontiguousarray(vectors, dtype="<f4")
    assert arr.ndim == 2, f"expected (T, D) vectors, got {arr.shape}"
    return {"vectors_b64": base64.b64encode(arr.tobytes()).decode("ascii"),
            "shape": list(arr.shape)}


def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """openapi_extra for an endpoint that parses its own body (so /docs still shows it)."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": model.model_json_schema()}}}}
