"""A bounded HTTP load generator for the served app, and a catalogue of malformed requests.

Bounded three ways, so that it stops by itself: it only talks to loopback addresses, it sends at
most `max_requests` requests, and it stops starting new ones after `max_seconds` (requests in
flight then finish or time out after `request_timeout_s`). It is a closed loop: each of
`concurrency` clients (threads, one keep-alive connection each) sends its next request when its
last one returns, picking a request kind at random by weight.

    from harness.loadgen import app_kinds, run_load
    kinds = app_kinds(dim=384, n_concepts=9000, texts=["..."])
    res = run_load("http://127.0.0.1:8000", kinds, concurrency=8, max_requests=20_000,
                   max_seconds=60)
    print(res.summary())

No Ray here: the load generator is a client and could run anywhere on the serving host.
"""

from __future__ import annotations

import ipaddress
import json
import math
import random
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np

from lvm_ray.serve.schemas import encode_b64

MAX_REQUESTS = 10_000_000  # hard ceilings: a typo in a cap must not make an unbounded run
MAX_SECONDS = 6 * 3600.0


# ----------------------------------------------------------------------------- bounds


def check_loopback(base_url: str) -> str:
    """base_url without a trailing slash if every address its host resolves to is loopback;
    ValueError otherwise (this tool must never load someone else's server)."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"target {base_url!r} must be an http(s) URL with a host")
    host = parts.hostname
    try:
        addrs = {ai[4][0] for ai in socket.getaddrinfo(host, parts.port or 80,
                                                       proto=socket.IPPROTO_TCP)}
    except socket.gaierror as e:
        raise ValueError(f"target host {host!r} does not resolve: {e}") from None
    bad = sorted(a for a in addrs if not ipaddress.ip_address(a.split("%")[0]).is_loopback)
    if not addrs or bad:
        raise ValueError(f"refusing to load {host!r}: it resolves to non-loopback address(es) "
                         f"{bad}; the load generator only targets 127.0.0.0/8 or ::1")
    return base_url.rstrip("/")


def check_caps(max_requests: int, max_seconds: float, concurrency: int) -> None:
    if isinstance(max_requests, bool) or not isinstance(max_requests, int) \
            or not 1 <= max_requests <= MAX_REQUESTS:
        raise ValueError(f"max_requests must be an integer in [1, {MAX_REQUESTS}], "
                         f"got {max_requests!r}")
    if not isinstance(max_seconds, (int, float)) or not math.isfinite(max_seconds) \
            or not 0 < max_seconds <= MAX_SECONDS:
        raise ValueError(f"max_seconds must be in (0, {MAX_SECONDS:.0f}], got {max_seconds!r}")
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) \
            or not 1 <= concurrency <= 1024:
        raise ValueError(f"concurrency must be an integer in [1, 1024], got {concurrency!r}")


# ----------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class Request:
    kind: str
    method: str
    path: str
    content: bytes | None = None  # a JSON body, already encoded
    on_ok: Callable[[httpx.Response], None] | None = None  # e.g. keep a session's new state


@dataclass(frozen=True)
class Kind:
    """A request kind: `build(rng, memory)` makes the next request of this kind; `memory` is
    the client's own dict (a session's latest state lives there)."""

    name: str
    weight: float
    build: Callable[[random.Random, dict], Request]


@dataclass
class Record:
    start_s: float  # since the run started
    latency_ms: float
    status: int  # HTTP status; 0 = no HTTP answer (connection refused, reset, timeout)
    kind: str
    error: str = ""  # the error detail (truncated) of a non-2xx answer or transport failure


def percentiles(xs: Sequence[float], qs: Sequence[float] = (50, 95, 99)) -> tuple[float, ...]:
    """Percentiles of xs (numpy's linear interpolation); NaN for an empty list."""
    if len(xs) == 0:
        return tuple(float("nan") for _ in qs)
    a = np.asarray(xs, dtype=np.float64)
    return tuple(float(np.percentile(a, q)) for q in qs)


@dataclass
class LoadResult:
    records: list[Record]
    wall_s: float
    concurrency: int
    stopped_by: str  # "max_requests" or "max_seconds"
    started_at: float  # unix time of start_s == 0

    def ok(self, r: Record) -> bool:
        return 200 <= r.status < 300

    def window(self, t0: float, t1: float) -> list[Record]:
        """Records of requests started in [t0, t1) seconds after the start."""
        return [r for r in self.records if t0 <= r.start_s < t1]

    def summary(self, records: list[Record] | None = None) -> dict[str, Any]:
        recs = self.records if records is None else records
        lat = [r.latency_ms for r in recs if self.ok(r)]
        p50, p95, p99 = percentiles(lat)
        errors: dict[str, int] = {}
        for r in recs:
            if not self.ok(r):
                key = str(r.status)
                errors[key] = errors.get(key, 0) + 1
        kinds = sorted({r.kind for r in recs})
        return {
            "requests": len(recs), "ok": len(lat), "errors": len(recs) - len(lat),
            "errors_by_status": errors, "rps": len(lat) / self.wall_s if self.wall_s else 0.0,
            "p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "wall_s": self.wall_s,
            "concurrency": self.concurrency, "stopped_by": self.stopped_by,
            "by_kind": {k: _kind_summary([r for r in recs if r.kind == k], self.ok)
                        for k in kinds},
        }


def _kind_summary(recs: list[Record], ok) -> dict[str, Any]:
    lat = [r.latency_ms for r in recs if ok(r)]
    p50, p95, p99 = percentiles(lat)
    return {"requests": len(recs), "errors": len(recs) - len(lat), "p50_ms": p50,
            "p95_ms": p95, "p99_ms": p99}


def run_load(base_url: str, kinds: Sequence[Kind], *, concurrency: int, max_requests: int,
             max_seconds: float, request_timeout_s: float = 30.0, seed: int = 0,
             on_record: Callable[[Record], None] | None = None) -> LoadResult:
    """Closed-loop load: `concurrency` clients, at most `max_requests` requests, no new request
    after `max_seconds`. Every outcome is recorded; nothing raises for a failed request."""
    base = check_loopback(base_url)
    check_caps(max_requests, max_seconds, concurrency)
    if not kinds or any(k.weight < 0 for k in kinds) or sum(k.weight for k in kinds) <= 0:
        raise ValueError("give at least one request kind, with weights >= 0 summing to > 0")
    lock = threading.Lock()
    issued = [0]
    records: list[Record] = []
    t_start, wall0 = time.perf_counter(), time.time()
    deadline = t_start + float(max_seconds)
    weights = [k.weight for k in kinds]

    def claim() -> bool:
        with lock:
            if issued[0] >= max_requests or time.perf_counter() >= deadline:
                return False
            issued[0] += 1
            return True

    crashed: list[BaseException] = []

    def client(i: int) -> None:
        try:
            run_client(i)
        except BaseException as e:  # noqa: BLE001  a bug in a kind: re-raised after the join
            crashed.append(e)

    def run_client(i: int) -> None:
        rng = random.Random(seed * 100_003 + i)
        memory: dict = {}
        headers = {"content-type": "application/json"}
        with httpx.Client(base_url=base, timeout=request_timeout_s) as http:
            while claim():
                req = rng.choices(kinds, weights)[0].build(rng, memory)
                t = time.perf_counter()
                status, error = 0, ""
                try:
                    r = http.request(req.method, req.path, content=req.content, headers=headers)
                    status = r.status_code
                    if 200 <= status < 300:
                        if req.on_ok is not None:
                            req.on_ok(r)
                    else:
                        error = r.text[:200]
                except httpx.HTTPError as e:
                    error = f"{type(e).__name__}: {e}"[:200]
                except (ValueError, KeyError) as e:  # a 2xx answer we could not read
                    status, error = 0, f"bad answer: {type(e).__name__}: {e}"[:200]
                rec = Record(t - t_start, (time.perf_counter() - t) * 1000, status, req.kind,
                             error)
                with lock:
                    records.append(rec)
                if on_record is not None:
                    on_record(rec)

    threads = [threading.Thread(target=client, args=(i,), daemon=True, name=f"loadgen-{i}")
               for i in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if crashed:
        raise crashed[0]
    wall = time.perf_counter() - t_start
    stopped = "max_requests" if issued[0] >= max_requests else "max_seconds"
    records.sort(key=lambda r: r.start_s)
    return LoadResult(records, wall, concurrency, stopped, wall0)


# ----------------------------------------------------------------------------- the app's kinds


def unit_vectors(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@dataclass
class AppMix:
    """Which requests `app_kinds` mixes and how often. Context sizes are in vectors; bodies are
    pre-encoded (a few variants each) so the client spends its CPU on sending, not encoding."""

    json_vectors: int = 32  # predict, JSON numbers
    b64_vectors: tuple[int, ...] = (64, 256, 600)  # predict, base64 float32 (600: a long one)
    n_texts: int = 3  # predict, texts encoded by the bank's encoder
    n_ids: int = 50  # predict, concept ids
    open_vectors: int = 16  # session open with a first context
    appends_per_session: int = 20  # a client opens a new session after this many appends
    weights: dict[str, float] = field(default_factory=lambda: {
        "predict_json": 1.0, "predict_b64": 2.0, "predict_texts": 1.0, "predict_ids": 1.0,
        "session_open": 0.5, "session_append": 3.0})
    variants: int = 4
    seed: int = 0


def app_kinds(dim: int, n_concepts: int, texts: Sequence[str] | None,
              mix: AppMix | None = None) -> list[Kind]:
    """The mixed request kinds of the hybrid app: predict with each input form, session open
    and session append (which opens its client's session first when it has none). `texts` None:
    the bank has no text encoder, so no text requests."""
    mix = mix or AppMix()
    rng = np.random.default_rng(mix.seed)

    def bodies(make) -> list[bytes]:
        return [json.dumps(make()).encode() for _ in range(mix.variants)]

    pools = {
        "predict_json": bodies(lambda: {"vectors": unit_vectors(mix.json_vectors, dim,
                                                                rng).tolist()}),
        "predict_b64": [json.dumps(encode_b64(unit_vectors(n, dim, rng))).encode()
                        for n in mix.b64_vectors for _ in range(mix.variants)],
        "predict_ids": bodies(lambda: {"concept_ids": sorted(
            rng.choice(n_concepts, size=min(mix.n_ids, n_concepts), replace=False).tolist())}),
        "session_open": bodies(lambda: encode_b64(unit_vectors(mix.open_vectors, dim, rng))),
    }
    if texts:
        pools["predict_texts"] = bodies(lambda: {"texts": [
            str(texts[i]) for i in rng.choice(len(texts), size=mix.n_texts)]})
    one = [encode_b64(unit_vectors(1, dim, rng)) for _ in range(mix.variants)]

    def fixed(name: str, path: str) -> Callable[[random.Random, dict], Request]:
        return lambda r, _mem: Request(name, "POST", path, r.choice(pools[name]))

    def keep_session(mem: dict) -> Callable[[httpx.Response], None]:
        def on_ok(resp: httpx.Response) -> None:
            out = resp.json()
            mem["session"] = (out["session_id"], out["state"], 0)
        return on_ok

    def open_session(r: random.Random, mem: dict) -> Request:
        return Request("session_open", "POST", "/v1/sessions", r.choice(pools["session_open"]),
                       keep_session(mem))

    def append(r: random.Random, mem: dict) -> Request:
        s = mem.get("session")
        if s is None or s[2] >= mix.appends_per_session:
            return open_session(r, mem)
        sid, state, n = s

        def on_ok(resp: httpx.Response) -> None:
            mem["session"] = (sid, resp.json()["state"], n + 1)

        body = json.dumps({"state": state, **r.choice(one)}).encode()
        return Request("session_append", "POST", f"/v1/sessions/{sid}/append", body, on_ok)

    builders = {"predict_json": fixed("predict_json", "/v1/predict"),
                "predict_b64": fixed("predict_b64", "/v1/predict"),
                "predict_texts": fixed("predict_texts", "/v1/predict"),
                "predict_ids": fixed("predict_ids", "/v1/predict"),
                "session_open": open_session, "session_append": append}
    return [Kind(name, w, builders[name]) for name, w in mix.weights.items()
            if w > 0 and (name in pools or name == "session_append")]


__all__ = ["AppMix", "Kind", "LoadResult", "Record", "Request", "app_kinds", "check_caps",
           "check_loopback", "percentiles", "run_load", "unit_vectors"]
