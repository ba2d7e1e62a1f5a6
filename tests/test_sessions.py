"""Session state tokens (Ray-free): exact round trip, every rejection, and batched appends that
match Predictor.append one session at a time."""

import base64

import numpy as np
import pytest
import torch

from lvm_ray.serve.sessions import (
    SessionCodec,
    SessionExpired,
    SessionForged,
    SessionMalformed,
    SessionStale,
    SessionState,
    check_compatible,
    checkpoint_fingerprint,
    resolve_key,
)

KEY = b"k" * 32


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_state(layers=2, hidden=8, dim=4, seed=0) -> SessionState:
    rng = np.random.default_rng(seed)
    return SessionState("sid1", "phase2", "fp0123456789abcd", 42, 1000.0,
                        rng.standard_normal((layers, hidden)).astype(np.float32),
                        rng.standard_normal(dim).astype(np.float32))


def test_round_trip_is_exact():
    codec = SessionCodec(KEY, clock=Clock())
    s = make_state()
    back = codec.decode(codec.encode(s))
    assert (back.session_id, back.model, back.fingerprint, back.n_seen) == \
        ("sid1", "phase2", "fp0123456789abcd", 42)
    assert back.issued_at == s.issued_at
    np.testing.assert_array_equal(back.h, s.h)
    np.testing.assert_array_equal(back.last, s.last)
    assert back.h.dtype == np.float32 and back.h.shape == (2, 8) and back.last.shape == (4,)


def test_empty_session_round_trip():
    codec = SessionCodec(KEY, clock=Clock())
    s = SessionState("sid", "phase3", "", 0, 1000.0)
    back = codec.decode(codec.encode(s))
    assert back.h is None and back.last is None and back.model == "phase3"


def test_token_of_the_design_model_is_small():
    # 4 x 512 GRU state + a 768-d vector: what the biggest preset carries per request.
    token = SessionCodec(KEY).encode(make_state(layers=4, hidden=512, dim=768))
    assert len(token) < 20_000


@pytest.mark.parametrize("part", [1, 2, 3])
def test_any_altered_part_is_rejected_as_forged(part):
    codec = SessionCodec(KEY, clock=Clock())
    parts = codec.encode(make_state()).split(".")
    raw = bytearray(base64.urlsafe_b64decode(parts[part] + "=" * (-len(parts[part]) % 4)))
    raw[len(raw) // 2] ^= 0x01  # one flipped bit
    parts[part] = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    with pytest.raises(SessionForged, match="does not verify"):
        codec.decode(".".join(parts))


def test_forged_header_with_recomputed_payload_is_rejected():
    codec = SessionCodec(KEY, clock=Clock())
    other = SessionCodec(b"x" * 32, clock=Clock())
    with pytest.raises(SessionForged):
        codec.decode(other.encode(make_state()))


@pytest.mark.parametrize("token", ["", "abc", "v1.a.b", "v2.a.b.c", "v1.a.b.!!!", 7, None,
                                   "v1." + "A" * 10 + ".." + "x" * 5])
def test_malformed_tokens(token):
    codec = SessionCodec(KEY, clock=Clock())
    with pytest.raises((SessionMalformed, SessionForged)) as e:
        codec.decode(token)
    assert e.value.status in (400, 403)


def test_expired_after_ttl_and_fresh_within():
    clock = Clock()
    codec = SessionCodec(KEY, ttl_s=60, clock=clock)
    token = codec.encode(make_state())
    clock.t = 1000.0 + 59
    codec.decode(token)
    clock.t = 1000.0 + 61
    with pytest.raises(SessionExpired) as e:
        codec.decode(token)
    assert e.value.status == 410 and "expired" in str(e.value)


def test_check_compatible():
    s = make_state()
    check_compatible(s, "phase2", "fp0123456789abcd", (2, 8), 4)
    with pytest.raises(SessionStale, match="checkpoint") as e:
        check_compatible(s, "phase2", "another", (2, 8), 4)
    assert e.value.status == 409
    with pytest.raises(SessionStale, match="belongs to model"):
        check_compatible(s, "phase3", "fp0123456789abcd", (2, 8), 4)
    with pytest.raises(SessionStale, match="shaped"):
        check_compatible(s, "phase2", "fp0123456789abcd", (2, 16), 4)
    # No state yet: any checkpoint of the model may start the session.
    check_compatible(SessionState("s", "phase2", "", 0, 0.0), "phase2", "whatever", (2, 8), 4)


def test_key_from_env_wins(monkeypatch):
    monkeypatch.setenv("LVM_SESSION_KEY", "from-env-0123456789")
    assert resolve_key("from-args") == b"from-env-0123456789"
    monkeypatch.delenv("LVM_SESSION_KEY")
    assert resolve_key("from-args") == b"from-args"
    with pytest.raises(ValueError, match="LVM_SESSION_KEY"):
        resolve_key(None)
    with pytest.raises(ValueError, match="16 bytes"):
        SessionCodec(b"short")


def test_fingerprint_is_the_weights_digest():
    assert checkpoint_fingerprint({"sha256": {"model.safetensors": "ab" * 32}}) == "ab" * 8
    assert len(checkpoint_fingerprint({"epoch": 1})) == 16


# ----------------------------------------------------------------------------- batched appends


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    from lvm_ray.config import ModelConfig
    from lvm_ray.data.bank import save_bank
    from lvm_ray.data.synthetic import make_synthetic_bank
    from lvm_ray.model import build_model
    from lvm_ray.predictor import Predictor
    from lvm_ray.train.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("sess")
    save_bank(make_synthetic_bank(n_docs=6, doc_len=(20, 30), dim=16, seed=1), root / "bank.parquet")
    cfg = ModelConfig(d_in=16, hidden=12, layers=2, slots=4)
    torch.manual_seed(0)
    save_checkpoint(root / "ckpt", build_model(cfg), cfg, epoch=0, metrics={},
                    config={"window": {"context": 50}})
    return Predictor.from_paths(root / "ckpt", root / "bank.parquet", device="cpu")


def test_append_batch_matches_one_session_at_a_time(predictor):

    rng = np.random.default_rng(0)

    def unit(n):
        x = rng.standard_normal((n, 16)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    histories = [unit(7), None, unit(3)]  # two running sessions and a fresh one
    news = [unit(1), unit(4), unit(2)]  # different lengths: packed, not padded into the state
    states = [None if h is None else predictor.append(h)[1] for h in histories]
    out = predictor.append_batch(news,
                                 [None if s is None else s.h[:, 0].numpy() for s in states],
                                 [None if s is None else s.last[0].numpy() for s in states], k=3)
    for (pred, h, last), new, st, hist in zip(out, news, states, histories):
        ref, ref_state = predictor.append(new, st, k=3)
        np.testing.assert_allclose(pred.vector, ref.vector, atol=1e-5)
        np.testing.assert_allclose(h, ref_state.h[:, 0].numpy(), atol=1e-5)
        np.testing.assert_allclose(last, ref_state.last[0].numpy(), atol=1e-6)
        assert [n.concept_id for n in pred.neighbors] == [n.concept_id for n in ref.neighbors]
        assert pred.context_used == len(new)
        # ... and the incremental answer equals the full-context one.
        full = new if hist is None else np.concatenate([hist, new])
        np.testing.assert_allclose(pred.vector, predictor.predict(full).vector, atol=1e-5)
