"""A catalogue of malformed HTTP requests for the served app, each with the 4xx it must get."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

from harness.loadgen import unit_vectors
from lvm_ray.serve.schemas import encode_b64


@dataclass(frozen=True)
class BadRequest:
    name: str
    method: str
    path: str  # "{sid}" is replaced by a live session's id
    body: Any = None  # JSON-able (sent as JSON), bytes (sent as is), or a callable -> iterator
    # of bytes (sent chunked, no content-length)
    status: int = 422  # the expected answer
    match: str = ""  # a word the message must contain (case-insensitive)


def bad_requests(dim: int, state: str, max_context: int, max_body: int, max_k: int,
                 other_key_state: str, expired_hint: str = "") -> list[BadRequest]:
    """Malformed requests for the hybrid app, each with the 4xx it must get. `state` is a live
    session's token (the session's id goes in "{sid}"), `other_key_state` the same state signed
    with another key; max_* are the router's user_config caps."""
    rng = np.random.default_rng(7)
    v = unit_vectors(2, dim, rng)
    b64 = encode_b64(v)
    inf = v.copy()
    inf[0, 0] = np.inf
    nan_body = json.dumps({"vectors": v.tolist()}).replace(repr(float(v[0, 0])), "NaN", 1)
    head, header, payload, sig = state.split(".")
    flipped = payload[:-4] + ("AAAA" if payload[-4:] != "AAAA" else "BBBB")
    one = encode_b64(v[:1])
    big_token = "v1." + "A" * (4 * 1024 * 1024 + 8)
    p, s = "/v1/predict", "/v1/sessions/{sid}/append"
    return [
        BadRequest("wrong dimension", "POST", p, {"vectors": v[:, : dim - 1].tolist()}, 422,
                   f"(T, {dim})"),
        BadRequest("NaN in vectors", "POST", p, nan_body.encode(), 422, "NaN"),
        BadRequest("Inf in vectors_b64", "POST", p, encode_b64(inf), 422, "Inf"),
        BadRequest("empty vectors", "POST", p, {"vectors": []}, 422, "empty"),
        BadRequest("empty vectors_b64", "POST", p, {"vectors_b64": "", "shape": [0, dim]}, 422,
                   "empty"),
        BadRequest("empty texts", "POST", p, {"texts": []}, 422, "empty"),
        BadRequest("more vectors than max_context_vectors", "POST", p,
                   encode_b64(unit_vectors(max_context + 1, dim, rng)), 413,
                   f"at most {max_context}"),
        BadRequest("vectors not a list", "POST", p, {"vectors": "abc"}, 422, "vectors"),
        BadRequest("ragged rows", "POST", p, {"vectors": [[0.1] * dim, [0.1] * (dim - 1)]}, 422,
                   "different lengths"),
        BadRequest("numbers as strings", "POST", p, {"vectors": [["0.1"] * dim]}, 422,
                   "vectors"),
        BadRequest("k as a string", "POST", p, {**b64, "k": "5"}, 422, "k"),
        BadRequest("k = 0", "POST", p, {**b64, "k": 0}, 422, "k"),
        BadRequest("k above max_k", "POST", p, {**b64, "k": max_k + 1}, 422,
                   f"k must be <= {max_k}"),
        BadRequest("float concept ids", "POST", p, {"concept_ids": [1.5]}, 422, "concept_ids"),
        BadRequest("concept id above int64", "POST", p, {"concept_ids": [2**70]}, 422,
                   "concept"),
        BadRequest("negative concept id", "POST", p, {"concept_ids": [-1]}, 422,
                   "unknown concept id"),
        BadRequest("unknown concept id", "POST", p, {"concept_ids": [10**9]}, 422,
                   "unknown concept id"),
        BadRequest("texts not strings", "POST", p, {"texts": [1, 2]}, 422, "texts"),
        BadRequest("return_vector not a bool", "POST", p, {**b64, "return_vector": "yes"}, 422,
                   "return_vector"),
        BadRequest("invalid base64", "POST", p, {"vectors_b64": "@@@@", "shape": [1, dim]}, 422,
                   "base64"),
        BadRequest("shape does not match the bytes", "POST", p, {**b64, "shape": [3, dim]}, 422,
                   f"needs {4 * 3 * dim}"),
        BadRequest("vectors_b64 without shape", "POST", p, {"vectors_b64": b64["vectors_b64"]},
                   422, "shape"),
        BadRequest("shape not 2-d", "POST", p, {**b64, "shape": [2 * dim]}, 422, "shape"),
        BadRequest("negative shape", "POST", p, {**b64, "shape": [-2, -dim]}, 422, "shape"),
        BadRequest("shape without vectors_b64", "POST", p, {"vectors": v.tolist(),
                                                            "shape": [2, dim]}, 422, "shape"),
        BadRequest("two context forms", "POST", p, {**b64, "concept_ids": [1]}, 422,
                   "exactly one"),
        BadRequest("no context", "POST", p, {"k": 3}, 422, "no context"),
        BadRequest("unknown field", "POST", p, {**b64, "contxt": 1}, 422, "contxt"),
        BadRequest("unknown model", "POST", p, {**b64, "model": "phase9"}, 422, "model"),
        BadRequest("truncated JSON", "POST", p, b'{"vectors": [[1, 2', 422, "json"),
        BadRequest("JSON array, not an object", "POST", p, b"[1, 2]", 422, "invalid request"),
        BadRequest("empty body", "POST", p, b"", 422, "invalid request"),
        BadRequest("not UTF-8", "POST", p, b"\xff\xfe{\x00", 422, "invalid request"),
        BadRequest("body above max_body_bytes", "POST", p, b"x" * (max_body + 1), 413,
                   f"limit is {max_body}"),
        BadRequest("chunked body above max_body_bytes", "POST", p,
                   lambda: iter([b"x" * (max_body // 2 + 1)] * 3), 413, f"exceeds {max_body}"),
        BadRequest("GET on a POST endpoint", "GET", p, None, 405, "method not allowed"),
        BadRequest("unknown path", "POST", "/v1/nothing", {}, 404, "not found"),
        BadRequest("session: bad context (wrong dimension)", "POST", "/v1/sessions",
                   {"vectors": v[:, : dim - 1].tolist()}, 422, f"(T, {dim})"),
        BadRequest("session: unknown model", "POST", "/v1/sessions", {"model": "phase9"}, 422,
                   "model"),
        BadRequest("append: no state", "POST", s, one, 422, "state"),
        BadRequest("append: state not a token", "POST", s, {"state": "garbage", **one}, 400,
                   "not a v1 token"),
        BadRequest("append: state altered (payload bytes changed)", "POST", s,
                   {"state": ".".join([head, header, flipped, sig]), **one}, 403,
                   "does not verify"),
        BadRequest("append: state signed with another key", "POST", s,
                   {"state": other_key_state, **one}, 403, "another session key"),
        BadRequest("append: signature stripped", "POST", s,
                   {"state": ".".join([head, header, payload, ""]), **one}, 403,
                   "does not verify"),
        BadRequest("append: state of another session", "POST", "/v1/sessions/nope/append",
                   {"state": state, **one}, 404, "unknown session 'nope'"),
        # Over the token cap (4 MiB): 400 from the session codec, or 413 from the body cap first.
        BadRequest("append: oversized state token", "POST", s, {"state": big_token, **one},
                   400 if max_body > len(big_token) + 1024 else 413,
                   "larger than any" if max_body > len(big_token) + 1024 else "limit"),
        BadRequest("append: no context", "POST", s, {"state": state}, 422, "no context"),
    ]


def send_bad(http: httpx.Client, case: BadRequest, session_id: str) -> httpx.Response:
    path = case.path.replace("{sid}", session_id)
    headers = {"content-type": "application/json"}
    body = case.body
    if callable(body):
        return http.request(case.method, path, content=body(), headers=headers)
    if isinstance(body, bytes):
        return http.request(case.method, path, content=body, headers=headers)
    if body is None:
        return http.request(case.method, path)
    return http.request(case.method, path, json=body)


def check_bad(resp: httpx.Response, case: BadRequest) -> str | None:
    """None if the answer is the expected 4xx with a JSON message containing case.match; else
    what is wrong."""
    try:
        detail = resp.json().get("detail")
    except (ValueError, AttributeError):
        return f"{resp.status_code} without a JSON detail: {resp.text[:120]!r}"
    text = detail if isinstance(detail, str) else json.dumps(detail)
    if resp.status_code != case.status:
        return f"got {resp.status_code}, expected {case.status}: {text[:160]}"
    if not text or case.match.lower() not in text.lower():
        return f"message {text[:160]!r} does not mention {case.match!r}"
    return None


