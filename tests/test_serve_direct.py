"""The shipped Serve layout, deployed the way `lvm serve` does (run_config on
serve_configs/hybrid.yaml with the test assets): the router app plus one app per model. Session
appends and predicts go straight to the model's own endpoint and give the router's answers; gRPC
gives the HTTP answers; `lvm serve` prints the address Serve really bound; an over-limit append body is
answered with a 413 the client can read.
"""

import contextlib
import io
import re

import grpc
import httpx
import numpy as np
import pytest
import yaml

from harness.net import free_port
from harness.service import hybrid_config, ok, unit
from lvm_ray.serve.protos import lvm_pb2, lvm_pb2_grpc
from lvm_ray.serve.schemas import PredictionOut, SessionOpenOut, SessionOut, encode_b64

pytestmark = pytest.mark.ray
GRPC_SERVICER = "lvm_ray.serve.protos.lvm_pb2_grpc.add_LVMServicer_to_server"
ROUTER = {"threshold": 10, "canary_fraction": 0.0, "p95_limit_ms": 60_000.0,
          "max_body_bytes": 200_000}
MODELS = {"append_step": "fp32", "max_body_bytes": 200_000}


@pytest.fixture(scope="module")
def live(ray_session, assets, tmp_path_factory):
    from ray import serve

    from lvm_ray.serve.deploy import run_config

    port, grpc_port = free_port(), free_port()
    # Serve already running on `port`: the config's own port (8000) must not be what is printed.
    serve.start(http_options={"host": "127.0.0.1", "port": port},
                grpc_options={"port": grpc_port, "grpc_servicer_functions": [GRPC_SERVICER]})
    cfg = hybrid_config(assets["paths"]["phase2"], assets["paths"]["phase3"], assets["bank"],
                        router=ROUTER, models=MODELS, port=8000)
    path = tmp_path_factory.mktemp("cfg") / "hybrid.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        run_config(path, blocking=False)
    printed = out.getvalue()
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    yield {"http": http, "port": port, "printed": printed,
           "stub": lvm_pb2_grpc.LVMStub(channel), "assets": assets}
    channel.close()
    http.close()
    serve.shutdown()


def test_lvm_serve_prints_the_address_serve_bound(live):
    line = next(ln for ln in live["printed"].splitlines() if "serving on" in ln)
    assert f"http://127.0.0.1:{live['port']}/" in line and ":8000" not in line, line
    assert "gRPC on [::]:" in line  # Ray 2.60's gRPC proxy binds every interface: said so
    addr = re.search(r"(http://\S+?)/ ", line).group(1)
    assert httpx.get(f"{addr}/healthz", timeout=10).json() == {"status": "ok"}


def test_appends_go_to_the_model_and_equal_the_router_and_the_reference(live):
    http, ref = live["http"], live["assets"]["refs"]["phase2"]
    ctx = unit(8, 40)
    s = ok(http.post("/v1/sessions", json={**encode_b64(ctx[:5]), "return_vector": True}))
    SessionOpenOut.model_validate(s)
    assert s["model"] == "phase2"
    assert s["append_url"] == f"/lvm-phase2/v1/sessions/{s['session_id']}/append"
    body = {"state": s["state"], **encode_b64(ctx[5:6]), "return_vector": True, "k": 4}
    direct = ok(http.post(s["append_url"], json=body))
    via_router = ok(http.post(f"/v1/sessions/{s['session_id']}/append", json=body))
    SessionOut.model_validate(direct)
    for out in (direct, via_router):
        assert (out["model"], out["route"], out["n_seen"]) == ("phase2", "session", 6)
    assert direct["vector"] == via_router["vector"]
    assert direct["neighbors"] == via_router["neighbors"]
    expected = ref.predict(ctx[:6], k=4)
    np.testing.assert_allclose(direct["vector"], expected.vector, atol=1e-4)
    assert [n["concept_id"] for n in direct["neighbors"]] == \
        [n.concept_id for n in expected.neighbors]
    # The direct answer's token continues at either URL.
    nxt = ok(http.post(direct["append_url"], json={"state": direct["state"],
                                                   **encode_b64(ctx[6:8]), "return_vector": True}))
    np.testing.assert_allclose(nxt["vector"], ref.predict(ctx).vector, atol=1e-4)
    models = ok(http.get("/v1/models"))["models"]
    assert models["phase2"]["append_step"] == "fused-fp32"


def test_direct_endpoint_refusals(live):
    http = live["http"]
    s2 = ok(http.post("/v1/sessions", json={**encode_b64(unit(3, 41)), "model": "phase2"}))
    s3 = ok(http.post("/v1/sessions", json={**encode_b64(unit(3, 42)), "model": "phase3"}))
    assert s3["append_url"].startswith("/lvm-phase3/")
    vec = encode_b64(unit(1, 43))
    wrong_model = http.post(f"/lvm-phase2/v1/sessions/{s3['session_id']}/append",
                            json={"state": s3["state"], **vec})
    assert wrong_model.status_code == 409 and "append_url" in wrong_model.json()["detail"]
    texts = http.post(s2["append_url"], json={"state": s2["state"], "texts": ["a text"]})
    assert texts.status_code == 422 and "router" in texts.json()["detail"]
    forged = http.post(s2["append_url"], json={"state": s2["state"][:-2] + "AA", **vec})
    assert forged.status_code in (400, 403)
    zero = http.post(s2["append_url"], json={"state": s2["state"],
                                             "vectors": [[0.0] * unit(1, 0).shape[1]]})
    assert zero.status_code == 422 and "row 0" in zero.json()["detail"]


def test_predict_at_the_model_app_equals_the_router_and_the_reference(live):
    http, stub, ref = live["http"], live["stub"], live["assets"]["refs"]["phase2"]
    ctx = unit(6, 46)
    body = {**encode_b64(ctx), "k": 4, "return_vector": True}
    via_router = ok(http.post("/v1/predict", json={**body, "model": "phase2"}))
    direct = ok(http.post("/lvm-phase2/v1/predict", json=body))
    PredictionOut.model_validate(direct)
    assert (direct["model"], direct["route"], direct["context_length"]) == ("phase2", "direct", 6)
    assert direct["neighbors"] == via_router["neighbors"]
    np.testing.assert_allclose(direct["vector"], ref.predict(ctx, k=4).vector, atol=1e-4)
    ids = ok(http.post("/lvm-phase2/v1/predict", json={"concept_ids": [3, 4, 5], "k": 2}))
    assert ids["context_length"] == 3 and len(ids["neighbors"]) == 2
    g = stub.Predict(lvm_pb2.PredictRequest(context=_proto_ctx(ctx), k=4, return_vector=True),
                     metadata=(("application", "lvm-phase2"),))
    assert (g.model, g.route) == ("phase2", "direct")
    assert [n.concept_id for n in g.neighbors] == [n["concept_id"] for n in direct["neighbors"]]
    # Another model, texts (the router holds the encoder) and bad vectors are refused.
    other = http.post("/lvm-phase2/v1/predict", json={**body, "model": "phase3"})
    assert other.status_code == 409 and "phase3" in other.json()["detail"]
    texts = http.post("/lvm-phase2/v1/predict", json={"texts": ["a text"]})
    assert texts.status_code == 422 and "router" in texts.json()["detail"]
    zero = http.post("/lvm-phase2/v1/predict", json={"vectors": [[0.0] * ctx.shape[1]]})
    assert zero.status_code == 422 and "row 0" in zero.json()["detail"]
    with pytest.raises(grpc.RpcError) as e:
        stub.Predict(lvm_pb2.PredictRequest(context=_proto_ctx(ctx), model="phase3"),
                     metadata=(("application", "lvm-phase2"),))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize("where", ["router", "model"])
def test_an_over_limit_append_body_gets_a_readable_413(live, where):
    """A 4 MB body against a 200 kB limit: the client must read the 413, not a reset."""
    http = live["http"]
    s = ok(http.post("/v1/sessions", json=encode_b64(unit(2, 44))))
    url = s["append_url"] if where == "model" else f"/v1/sessions/{s['session_id']}/append"
    big = b'{"state": "' + s["state"].encode() + b'", "vectors": [' + b"0.5," * 1_000_000 + b"0.5]}"
    with httpx.Client(base_url=f"http://127.0.0.1:{live['port']}", timeout=60) as c:
        r = c.post(url, content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413, (r.status_code, r.text[:200])
    assert "200000" in r.json()["detail"]
    # ... and chunked (no Content-Length): the limit is found while reading.
    with httpx.Client(base_url=f"http://127.0.0.1:{live['port']}", timeout=60) as c:
        r = c.post(url, content=iter([big[i : i + 65536] for i in range(0, len(big), 65536)]),
                   headers={"content-type": "application/json"})
    assert r.status_code == 413, (r.status_code, r.text[:200])


def _proto_ctx(vectors: np.ndarray) -> lvm_pb2.Context:
    v = np.ascontiguousarray(vectors, dtype="<f4")
    return lvm_pb2.Context(vectors=v.tobytes(), rows=v.shape[0], dim=v.shape[1])


def test_grpc_gives_the_http_answers(live):
    http, stub = live["http"], live["stub"]
    ctx = unit(7, 45)
    h = ok(http.post("/v1/predict", json={**encode_b64(ctx), "k": 3, "return_vector": True}))
    g = stub.Predict(lvm_pb2.PredictRequest(context=_proto_ctx(ctx), k=3, return_vector=True),
                     metadata=(("application", "lvm"),))
    assert (g.model, g.route, g.context_length) == (h["model"], h["route"], 7)
    assert [n.concept_id for n in g.neighbors] == [n["concept_id"] for n in h["neighbors"]]
    np.testing.assert_allclose(np.frombuffer(g.vector, "<f4"), h["vector"], atol=1e-6)
    ids = stub.Predict(lvm_pb2.PredictRequest(context=lvm_pb2.Context(concept_ids=[3, 4, 5])),
                       metadata=(("application", "lvm"),))
    assert ids.context_length == 3 and len(ids.neighbors) == 5

    s = ok(http.post("/v1/sessions", json=encode_b64(ctx[:4])))
    body = {"state": s["state"], **encode_b64(ctx[4:5]), "return_vector": True}
    h = ok(http.post(s["append_url"], json=body))
    req = lvm_pb2.AppendRequest(session_id=s["session_id"], state=s["state"],
                                context=_proto_ctx(ctx[4:5]), return_vector=True)
    for app in ("lvm-phase2", "lvm"):  # the model's own ingress, and through the router
        g = stub.Append(req, metadata=(("application", app),))
        assert (g.model, g.route, g.n_seen) == ("phase2", "session", 5), app
        assert [n.concept_id for n in g.neighbors] == [n["concept_id"] for n in h["neighbors"]]
        np.testing.assert_allclose(np.frombuffer(g.vector, "<f4"), h["vector"], atol=1e-6)
    # Errors carry the HTTP status's meaning.
    with pytest.raises(grpc.RpcError) as e:
        stub.Append(lvm_pb2.AppendRequest(session_id=s["session_id"], state="garbage",
                                          context=_proto_ctx(ctx[4:5])),
                    metadata=(("application", "lvm-phase2"),))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "v1 token" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.Predict(lvm_pb2.PredictRequest(context=_proto_ctx(np.zeros((2, ctx.shape[1])))),
                     metadata=(("application", "lvm"),))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "row 0" in e.value.details()
