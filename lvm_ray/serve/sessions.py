"""Session state tokens: the server keeps no session state, the client carries it.

A session is a recurrent model's state after the vectors appended so far (GRU state h and the last
vector; for a transformer, h is its last max_context vectors), plus which model and checkpoint
produced it. The router serialises it (float32
little-endian, base64url) and signs it with HMAC-SHA256; the client sends the token back with each
append and gets a new one. Any replica holding the key can continue any session, so sessions
survive replica restarts, scaling and redeploys of the same checkpoint.

    token = "v1.<header b64url>.<payload b64url>.<hmac b64url>"
    header  = JSON {sid, model, fp, n, iat, h: [layers, H] | null, d: D | null}
    payload = h (layers, H) then last (D,), float32 little-endian

Rejections (each a SessionError with the HTTP status the router answers):
malformed 400, bad signature 403 (forged, corrupted, or signed with another key), expired 410
(idle longer than the TTL), stale 409 (made by another checkpoint or model).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Callable

import numpy as np

VERSION = "v1"
KEY_ENV = "LVM_SESSION_KEY"
# A token for the design's model (4 x 512 state + 768-d last vector) is ~15 kB; anything far
# larger is not ours and is rejected before any decoding work.
MAX_TOKEN_CHARS = 4 * 1024 * 1024


class SessionError(ValueError):
    status = 400


class SessionMalformed(SessionError):
    status = 400


class SessionForged(SessionError):
    status = 403


class SessionUnknown(SessionError):
    status = 404


class SessionStale(SessionError):
    status = 409


class SessionExpired(SessionError):
    status = 410


@dataclass
class SessionState:
    session_id: str
    model: str  # the deployment the session is pinned to ("phase2" / "phase3")
    fingerprint: str  # checkpoint_fingerprint() of the checkpoint that produced h
    n_seen: int  # vectors consumed so far
    issued_at: float  # unix seconds; refreshed by every append
    h: np.ndarray | None = None  # (layers, H) float32; None before the first vector
    last: np.ndarray | None = None  # (D,) float32

    @classmethod
    def new(cls, model: str, fingerprint: str) -> "SessionState":
        return cls(uuid.uuid4().hex, model, fingerprint, 0, time.time())


def new_key() -> str:
    return secrets.token_hex(32)


def resolve_key(configured: str | None) -> bytes:
    """LVM_SESSION_KEY from the environment wins, then the key passed in the app args."""
    key = os.environ.get(KEY_ENV) or configured
    if not key:
        raise ValueError(f"no session key: set {KEY_ENV} or pass session_key in the app args")
    return key.encode()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class SessionCodec:
    """Encode, sign, verify and decode session tokens. ttl_s: idle lifetime of a token."""

    def __init__(self, key: bytes, ttl_s: float = 3600.0, clock: Callable[[], float] = time.time):
        if len(key) < 16:
            raise ValueError("session key must be at least 16 bytes")
        self._key = key
        self.ttl_s = float(ttl_s)
        self._clock = clock

    def _sign(self, signed_part: str) -> bytes:
        return hmac.new(self._key, signed_part.encode("ascii"), hashlib.sha256).digest()

    def encode(self, s: SessionState) -> str:
        if (s.h is None) != (s.last is None):
            raise ValueError("session state needs both h and last, or neither")
        header = {"sid": s.session_id, "model": s.model, "fp": s.fingerprint, "n": int(s.n_seen),
                  "iat": float(s.issued_at), "h": None, "d": None}
        payload = b""
        if s.h is not None:
            h = np.ascontiguousarray(s.h, dtype="<f4")
            last = np.ascontiguousarray(s.last, dtype="<f4").reshape(-1)
            assert h.ndim == 2, f"session h must be (layers, H), got {h.shape}"
            header["h"], header["d"] = list(h.shape), int(last.shape[0])
            payload = h.tobytes() + last.tobytes()
        signed = f"{VERSION}.{_b64(json.dumps(header, separators=(',', ':')).encode())}.{_b64(payload)}"
        return f"{signed}.{_b64(self._sign(signed))}"

    def decode(self, token: object) -> SessionState:
        """Verify and decode; raise a SessionError subclass saying what is wrong."""
        if not isinstance(token, str) or not token:
            raise SessionMalformed("session state must be the non-empty string a previous "
                                   "response returned")
        if len(token) > MAX_TOKEN_CHARS:
            raise SessionMalformed(f"session state is {len(token)} characters, larger than any "
                                   "this service issues")
        parts = token.split(".")
        if len(parts) != 4 or parts[0] != VERSION:
            raise SessionMalformed(f"session state is not a {VERSION} token "
                                   "(expected 4 dot-separated parts)")
        signed = ".".join(parts[:3])
        try:
            sig = _unb64(parts[3])
        except (binascii.Error, ValueError):
            raise SessionMalformed("session state signature is not base64url") from None
        if _b64(sig) != parts[3]:  # unused padding bits set: one signature, one spelling
            raise SessionMalformed("session state signature is not canonical base64url")
        # Checked before anything else is decoded: nothing unsigned is parsed.
        if not hmac.compare_digest(sig, self._sign(signed)):
            raise SessionForged("session state signature does not verify: the token was altered, "
                                "corrupted, or issued by a deployment with another session key")
        try:
            header = json.loads(_unb64(parts[1]))
            payload = _unb64(parts[2])
            state = SessionState(str(header["sid"]), str(header["model"]), str(header["fp"]),
                                 int(header["n"]), float(header["iat"]))
            if header["h"] is not None:
                layers, hidden = (int(v) for v in header["h"])
                d = int(header["d"])
                if len(payload) != 4 * (layers * hidden + d):
                    raise ValueError("payload size does not match its shape")
                flat = np.frombuffer(payload, dtype="<f4").astype(np.float32)
                state.h = flat[: layers * hidden].reshape(layers, hidden)
                state.last = flat[layers * hidden :]
        except (ValueError, KeyError, TypeError, binascii.Error) as e:
            # Only reachable with a validly signed token from an incompatible encoder.
            raise SessionMalformed(f"session state cannot be decoded: {e}") from None
        age = self._clock() - state.issued_at
        if age > self.ttl_s:
            raise SessionExpired(f"session {state.session_id} expired: idle for {age:.0f} s, "
                                 f"longer than the {self.ttl_s:.0f} s limit; open a new session")
        return state


def check_compatible(state: SessionState, model: str, fingerprint: str,
                     state_shape: tuple[int | None, int], dim: int) -> None:
    """Raise SessionStale if `state` was not produced by this model's checkpoint (a session
    with no vectors yet fits any checkpoint of its model). A None in state_shape matches any
    size: a transformer session's h is its last T vectors (T, D)."""
    if state.model != model:
        raise SessionStale(f"session {state.session_id} belongs to model {state.model!r}, "
                           f"not {model!r}")
    if state.h is not None and state.fingerprint != fingerprint:
        raise SessionStale(f"session {state.session_id} was made by checkpoint {state.fingerprint} "
                           f"of {model!r}, which now serves checkpoint {fingerprint}; "
                           "open a new session")
    fits = state.h is None or (state.h.ndim == len(state_shape) and all(
        w is None or g == w for g, w in zip(state.h.shape, state_shape)))
    if state.h is not None and (not fits or state.last.shape != (dim,)):
        raise SessionStale(f"session state is shaped h {tuple(state.h.shape)}, last "
                           f"{state.last.shape}; model {model!r} needs h {tuple(state_shape)}, "
                           f"last ({dim},)")


def checkpoint_fingerprint(meta: dict) -> str:
    """A short id of a checkpoint's weights (the SHA-256 its metadata records)."""
    digest = (meta.get("sha256") or {}).get("model.safetensors")
    if not digest:
        digest = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()
    return digest[:16]
