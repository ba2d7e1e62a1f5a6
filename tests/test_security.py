"""Security properties, each with a payload that would show if it broke:

- checkpoints and banks load without running any pickle (a crafted train_state.pt with a
  matching checksum, a pickle beside the weights, a bank with Ray Data's pickled-object column);
- no loader in lvm_ray can unpickle (a scan of the source);
- request bodies, contexts and k are capped by the router's config;
- the CLI's local Ray puts its dashboard on 127.0.0.1 (Serve's default host is checked in
  test_serve_config.py, the live socket in test_reliability_serve.py);
- session state a client holds is authenticated: no single-byte change is accepted;
- the docs say how to turn on Ray token auth (docs/security.md -> docs/cluster.md).
"""

import json
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from lvm_ray.config import ModelConfig
from lvm_ray.data.bank import BankError, load_bank, to_table
from lvm_ray.data.synthetic import make_synthetic_bank
from lvm_ray.model import build_model
from lvm_ray.train.checkpoint import (CheckpointError, load_checkpoint, load_train_state,
                                      save_checkpoint)

REPO = Path(__file__).resolve().parent.parent
CFG = ModelConfig(d_in=16, hidden=16, layers=1, slots=2)


class Payload:
    """Unpickling this writes the marker file: proof that a pickle ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _checksum(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_crafted_train_state_with_a_valid_checksum_is_not_unpickled(tmp_path):
    marker = tmp_path / "PWNED"
    ck = save_checkpoint(tmp_path / "ck", build_model(CFG), CFG, epoch=0, metrics={},
                         train_state={"epoch": 0})
    state = ck / "train_state.pt"
    torch.save({"epoch": 0, "optimizer": Payload(marker)}, state)
    # Whoever can write the checkpoint can also fix its checksum: only weights_only stops it.
    meta = json.loads((ck / "checkpoint.json").read_text())
    meta["sha256"]["train_state.pt"] = _checksum(state)
    (ck / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_train_state(ck)
    assert not marker.exists()
    # The payload is live: a plain unpickler would have run it.
    torch.load(state, weights_only=False)
    assert marker.read_text() == "pwned"


def test_weights_load_from_safetensors_only(tmp_path):
    marker = tmp_path / "PWNED"
    ck = save_checkpoint(tmp_path / "ck", build_model(CFG), CFG, epoch=0, metrics={})
    for name in ("model.pt", "pytorch_model.bin", "model.pkl"):
        torch.save(Payload(marker), ck / name)
    header_len = int.from_bytes((ck / "model.safetensors").read_bytes()[:8], "little")
    header = json.loads((ck / "model.safetensors").read_bytes()[8:8 + header_len])
    assert all("dtype" in v for k, v in header.items() if k != "__metadata__")
    load_checkpoint(ck)
    assert not marker.exists()


def test_a_bank_with_a_pickled_object_column_is_refused_unread(tmp_path):
    """Ray Data registers the `ray.data.arrow_pickled_object` extension type; reading such a
    column's values unpickles them. A bank is plain Arrow types, checked before any value is
    read."""
    import ray.data  # noqa: F401  registers Ray's extension types, as in a Ray worker
    from ray.data._internal.object_extensions.arrow import ArrowPythonObjectArray

    marker = tmp_path / "PWNED"
    bank = make_synthetic_bank(n_docs=3, doc_len=(5, 6), dim=8, seed=0)
    table = to_table(bank)
    evil = ArrowPythonObjectArray.from_objects([Payload(marker)] * len(table))
    i = table.column_names.index("text")
    table = table.set_column(i, pa.field("text", evil.type), evil) \
        .replace_schema_metadata(table.schema.metadata)
    pq.write_table(table, tmp_path / "evil.parquet")
    with pytest.raises(BankError, match="extension type.*refusing"):
        load_bank(tmp_path / "evil.parquet")
    assert not marker.exists()
    # The file is live: reading the column's values the ordinary way runs the payload.
    pq.read_table(tmp_path / "evil.parquet").column("text").to_pylist()
    assert marker.exists()


def test_a_bank_column_of_the_wrong_type_is_refused(tmp_path):
    bank = make_synthetic_bank(n_docs=3, doc_len=(5, 6), dim=8, seed=0)
    table = to_table(bank)
    i = table.column_names.index("text")
    blob = pa.array([b"x"] * len(table), pa.binary())
    pq.write_table(table.set_column(i, pa.field("text", pa.binary()), blob),
                   tmp_path / "b.parquet")
    with pytest.raises(BankError, match="'text' must be a string"):
        load_bank(tmp_path / "b.parquet")


UNSAFE = [
    (r"\bpickle\.loads?\(", "pickle.load"),
    (r"\bcloudpickle\.loads?\(", "cloudpickle.load"),
    (r"\bjoblib\.load\(", "joblib.load"),
    (r"read_pickle\(", "pandas.read_pickle"),
    (r"allow_pickle\s*=\s*True", "np.load(allow_pickle=True)"),
    (r"weights_only\s*=\s*False", "torch.load(weights_only=False)"),
]


def test_no_loader_in_lvm_ray_can_unpickle():
    found = []
    for f in sorted((REPO / "lvm_ray").rglob("*.py")):
        text = f.read_text()
        for pattern, what in UNSAFE:
            if re.search(pattern, text):
                found.append(f"{f.relative_to(REPO)}: {what}")
        for call in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in call.group(1):
                found.append(f"{f.relative_to(REPO)}: torch.load without weights_only=True")
    assert not found, found


def test_request_caps_are_configured_and_enforced():
    from lvm_ray.config import from_dict
    from lvm_ray.serve.config import RouterUserConfig
    from lvm_ray.serve.schemas import ContextIn, RequestError, decode_context

    router = next(d for d in yaml.safe_load((REPO / "serve_configs/hybrid.yaml").read_text())
                  ["applications"][0]["deployments"] if d["name"] == "Router")["user_config"]
    for key in ("max_body_bytes", "max_context_vectors", "max_k", "max_text_chars",
                "session_ttl_s"):
        assert key in router, f"hybrid.yaml does not set the router's {key}"
    uc = from_dict(RouterUserConfig, router)
    assert uc.max_body_bytes <= 64 * 1024 * 1024 and uc.max_context_vectors <= 16384
    with pytest.raises(ValueError):
        RouterUserConfig(max_body_bytes=10)  # a cap cannot be switched off by a tiny value
    req = ContextIn(vectors_b64="", shape=[5, 4])
    with pytest.raises(RequestError) as e:
        decode_context(req, max_vectors=4)
    assert e.value.status == 413 and "at most 4" in e.value.detail


def test_cli_local_ray_binds_the_dashboard_to_loopback(monkeypatch):
    import ray

    from lvm_ray.distributed import runtime
    from lvm_ray.distributed.runtime import init_ray

    seen = {}
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(runtime, "recorded_address", lambda: None)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    init_ray()
    assert seen.get("dashboard_host") == "127.0.0.1"


def test_hybrid_config_sets_no_public_host():
    raw = yaml.safe_load((REPO / "serve_configs/hybrid.yaml").read_text())
    assert "host" not in (raw.get("http_options") or {})
    assert raw.get("proxy_location") == "HeadOnly"
    # Ray 2.60's gRPC proxy binds [::] (every interface): gRPC stays opt-in.
    assert "grpc_options" not in raw


def _flip(token: str, i: int) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."
    c = token[i]
    return token[:i] + alphabet[(alphabet.index(c) + 1) % len(alphabet)] + token[i + 1:]


def test_no_single_character_change_to_a_session_state_is_accepted():
    from lvm_ray.serve.sessions import SessionCodec, SessionError, SessionState

    codec = SessionCodec(b"k" * 32, clock=lambda: 1000.0)
    rng = np.random.default_rng(0)
    state = SessionState("sid", "phase2", "fp", 10, 1000.0, rng.standard_normal((2, 8))
                         .astype(np.float32), rng.standard_normal(4).astype(np.float32))
    token = codec.encode(state)
    accepted = []
    for i in range(len(token)):
        try:
            codec.decode(_flip(token, i))
            accepted.append(i)
        except SessionError as e:
            assert e.status in (400, 403)
    # Header and payload are signed as text; the signature must be spelled canonically (its
    # last character's unused bits are not a second valid spelling).
    assert accepted == [], accepted


def test_docs_say_how_to_turn_on_token_auth():
    sec = (REPO / "docs/security.md").read_text()
    cluster = (REPO / "docs/cluster.md").read_text()
    assert "cluster.md#token-authentication" in sec
    assert "## Token authentication" in cluster
    for text in (sec, cluster):
        assert "RAY_AUTH_MODE=token" in text
    assert "ray get-auth-token --generate" in cluster
    for doc in ("RELIABILITY.md", "serve.md"):
        assert doc in sec


@pytest.mark.skipif(os.environ.get("RAY_SERVE_DEFAULT_HTTP_HOST") is not None,
                    reason="the environment overrides Serve's default host")
def test_run_config_keeps_serve_on_loopback():
    """`lvm serve` passes hybrid.yaml's http_options through; with no host there Serve's
    HTTPOptions default (loopback) applies."""
    from ray.serve.config import HTTPOptions

    raw = yaml.safe_load((REPO / "serve_configs/hybrid.yaml").read_text())
    assert HTTPOptions(**raw["http_options"]).host in ("127.0.0.1", "localhost")
