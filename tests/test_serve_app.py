"""The real Serve app on the shared local Ray, called over HTTP: every endpoint and input form,
routing by length, canary fraction, rollback on an injected slow or failing Phase-3, sessions
across a replica restart and a redeploy, and every bad input answered with a 4xx.

The app is deployed the way `serve deploy` does it (a config with user_config blocks), so config
changes are live reconfigures: the tests check that no replica restarts for them.
"""

import concurrent.futures as cf
import json
import time

import httpx
import numpy as np
import pytest

from harness.net import free_port
from harness.service import APP, DIM, KEY, Service, ok, unit
from lvm_ray.serve.schemas import PredictionOut, SessionOpenOut, SessionOut, encode_b64
from lvm_ray.serve.sessions import SessionCodec

# A session append runs the fused int8 step by default (ModelUserConfig.append_step), a full
# context the eager model: they agree to this (the fused step's own bounds: test_fused_step.py).
APPEND_ATOL = 1e-4

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def svc(ray_session, assets):
    from ray import serve

    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    port = serve.context._get_global_client().http_config.port
    s = Service(assets, port)
    s.deploy()
    yield s
    s.http.close()
    # Train tests later in the session need the CPUs the replicas hold.
    serve.shutdown()


def assert_4xx(r: httpx.Response, status: int | None = None, match: str = "") -> str:
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    if status is not None:
        assert r.status_code == status, (r.status_code, r.text)
    detail = r.json()["detail"]
    text = detail if isinstance(detail, str) else json.dumps(detail)
    assert text and match.lower() in text.lower(), text
    return text


# ----------------------------------------------------------------------------- endpoints


def test_health_models_status_and_docs(svc, assets):
    assert ok(svc.http.get("/healthz")) == {"status": "ok"}
    models = ok(svc.http.get("/v1/models"))
    p2, p3 = models["models"]["phase2"], models["models"]["phase3"]
    assert (p2["max_context"], p3["max_context"]) == (500, 1000)
    assert p2["deployment"] == "Phase2Model" and p3["deployment"] == "Phase3Model"
    assert p2["test_metrics"] == {"bank_hit@5": 0.0} and p3["test_metrics"] == {"bank_hit@5": 0.1}
    assert p2["fingerprint"] != p3["fingerprint"] and p2["dim"] == DIM
    assert p2["bank_size"] == len(assets["bank_data"])
    assert models["encoder"] == {"bank_encoder": "hashing-32", "encoder": "hashing-32",
                                 "backend": "torch", "text_input": True}
    status = ok(svc.http.get("/v1/status"))
    assert status["routing"]["state"] == "phase2_only" and status["routing"]["rolled_back"] is None
    # No lanes.json in these checkpoints: no numbers, a reason, and nothing blocked.
    for m in ("phase2", "phase3"):
        assert status["models"][m]["lanes"] is None and models["models"][m]["lanes"] is None
        assert "no lanes.json" in status["models"][m]["lanes_reason"]
    assert status["routing"]["canary_blocked"] is None
    assert svc.http.get("/docs").status_code == 200
    spec = ok(svc.http.get("/openapi.json"))
    for path in ("/v1/predict", "/v1/sessions", "/v1/sessions/{session_id}/append",
                 "/v1/models", "/v1/status", "/healthz"):
        assert path in spec["paths"], path
    body = spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]["application/json"]
    assert {"vectors", "vectors_b64", "shape", "concept_ids", "texts"} <= set(
        body["schema"]["properties"])


def test_every_input_form_gives_the_reference_prediction(svc, assets):
    ref, bank = assets["refs"]["phase2"], assets["bank_data"]
    ids = list(range(40, 52))
    ctx = bank.vectors[ids]
    expected = ref.predict(ctx, k=4)
    want = [n.concept_id for n in expected.neighbors]
    forms = {"vectors": {"vectors": ctx.tolist()}, "b64": encode_b64(ctx),
             "ids": {"concept_ids": ids}, "texts": {"texts": [str(bank.texts[i]) for i in ids]}}
    for name, form in forms.items():
        out = ok(svc.predict(**form, k=4, return_vector=True, model="phase2"))
        PredictionOut.model_validate(out)  # the documented response schema
        assert out["model"] == "phase2" and out["route"] == "explicit", name
        assert out["context_length"] == 12 and out["context_used"] == 12
        np.testing.assert_allclose(out["vector"], expected.vector, atol=1e-5, err_msg=name)
        assert [n["concept_id"] for n in out["neighbors"]] == want, name
        n0 = out["neighbors"][0]
        assert n0["text"] == bank.texts[n0["concept_id"]]
        assert n0["doc_id"] == bank.doc_ids[n0["concept_id"]]
        assert n0["position"] == bank.positions[n0["concept_id"]]
        assert {"decode", "model", "model_call", "total"} <= set(out["timings_ms"])
    assert "encode" in ok(svc.predict(texts=["topic 3"]))["timings_ms"]
    assert ok(svc.predict(vectors=ctx.tolist()))["vector"] is None  # only on request


# ----------------------------------------------------------------------------- routing


def test_routing_by_length_and_context_caps(svc):
    svc.deploy(router={"canary_fraction": 1.0})
    short, long_ = unit(10, 1), unit(11, 2)
    assert (lambda o: (o["model"], o["route"]))(ok(svc.predict(**encode_b64(short)))) == \
        ("phase2", "short")
    assert (lambda o: (o["model"], o["route"]))(ok(svc.predict(**encode_b64(long_)))) == \
        ("phase3", "canary")
    assert ok(svc.predict(**encode_b64(short), model="phase3"))["route"] == "explicit"
    # Each model reads at most the context it was trained on.
    big = unit(1200, 3)
    assert ok(svc.predict(**encode_b64(big)))["context_used"] == 1000
    assert ok(svc.predict(**encode_b64(big), model="phase2"))["context_used"] == 500
    # The threshold changes live.
    before = svc.replicas()
    svc.deploy(router={"canary_fraction": 1.0, "threshold": 20})
    assert ok(svc.predict(**encode_b64(long_)))["model"] == "phase2"
    svc.deploy(router={"canary_fraction": 0.0})
    assert ok(svc.predict(**encode_b64(long_)))["route"] == "canary_skip"
    assert svc.replicas() == before, "a user_config change must not restart replicas"


def test_canary_fraction_over_many_requests(svc):
    frac, n = 0.25, 400
    svc.deploy(router={"canary_fraction": frac})
    body = encode_b64(unit(11, 4))
    with cf.ThreadPoolExecutor(8) as pool:
        models = list(pool.map(lambda _: ok(svc.predict(**body))["model"], range(n)))
    share = models.count("phase3") / n
    sd = (frac * (1 - frac) / n) ** 0.5
    assert abs(share - frac) < 4 * sd, share  # ~1 in 16,000 chance of a false failure
    decisions = ok(svc.http.get("/v1/status"))["routing"]["decisions"]
    assert decisions["phase3:canary"] >= models.count("phase3")


def test_slow_phase3_rolls_back_and_rearms(svc):
    svc.deploy(router={"canary_fraction": 1.0, "p95_limit_ms": 40.0, "window": 10,
                       "min_samples": 5}, phase3={"inject_latency_ms": 80})
    body = encode_b64(unit(11, 5))
    routes = [(o["model"], o["route"]) for o in (ok(svc.predict(**body)) for _ in range(12))]
    assert routes[:5] == [("phase3", "canary")] * 5
    assert routes[5:] == [("phase2", "rolled_back")] * 7, routes
    st = ok(svc.http.get("/v1/status"))["routing"]
    assert st["state"] == "rolled_back" and st["rolled_back"]["reason"] == "p95"
    assert st["rolled_back"]["p95_ms"] > 40
    # Phase-3 fixed; the operator starts a new rollout: traffic returns without restarts.
    svc.deploy(router={"canary_fraction": 1.0, "p95_limit_ms": 40_000.0, "window": 10,
                       "min_samples": 5, "rollout_id": "retry"}, phase3={})
    assert ok(svc.predict(**body))["model"] == "phase3"
    assert ok(svc.http.get("/v1/status"))["routing"]["state"] == "full"


def test_failing_phase3_rolls_back_on_error_rate(svc):
    svc.deploy(router={"canary_fraction": 1.0, "window": 10, "min_samples": 5},
               phase3={"inject_error_rate": 1.0})
    body = encode_b64(unit(11, 6))
    codes = [svc.predict(**body).status_code for _ in range(5)]
    assert codes == [503] * 5  # a failing model is a 503 with a message, never a hang
    assert "injected failure" in svc.predict(**body, model="phase3").json()["detail"]
    out = ok(svc.predict(**body))
    assert (out["model"], out["route"]) == ("phase2", "rolled_back")
    st = ok(svc.http.get("/v1/status"))["routing"]
    assert st["rolled_back"]["reason"] == "error_rate" and st["rolled_back"]["error_rate"] == 1.0
    svc.deploy()


# ----------------------------------------------------------------------------- sessions


def append(svc, session: dict, **body) -> dict:
    return ok(svc.http.post(f"/v1/sessions/{session['session_id']}/append",
                            json={"state": session["state"], **body}))


def test_session_matches_full_context_with_every_input_form(svc, assets):
    ref, bank = assets["refs"]["phase2"], assets["bank_data"]
    ids = list(range(100, 112))
    s = ok(svc.http.post("/v1/sessions", json={"vectors": bank.vectors[ids[:5]].tolist(),
                                              "return_vector": True}))
    SessionOpenOut.model_validate(s)
    assert (s["model"], s["route"], s["n_seen"]) == ("phase2", "short", 5)
    np.testing.assert_allclose(s["prediction"]["vector"], ref.predict(bank.vectors[ids[:5]]).vector,
                               atol=APPEND_ATOL)
    steps = [({"vectors": bank.vectors[ids[5:6]].tolist()}, 1),
             (encode_b64(bank.vectors[ids[6:8]]), 2),
             ({"concept_ids": ids[8:10]}, 2),
             ({"texts": [str(bank.texts[i]) for i in ids[10:12]]}, 2)]
    n_seen = 5
    for form, n_new in steps:
        out = append(svc, s, **form, return_vector=True, k=3)
        SessionOut.model_validate(out)
        n_seen += n_new
        assert out["n_seen"] == n_seen and out["session_id"] == s["session_id"]
        # O(1) model work: the model read only the new vectors, not the session's history.
        assert out["context_used"] == out["context_length"] == n_new
        expected = ref.predict(bank.vectors[ids[:n_seen]], k=3)
        # Appends run the served fused int8 step (append_step); tests/test_fused_step.py bounds it.
        np.testing.assert_allclose(out["vector"], expected.vector, atol=APPEND_ATOL)
        assert [n["concept_id"] for n in out["neighbors"]] == \
            [n.concept_id for n in expected.neighbors]
        s = out


def test_session_is_pinned_to_its_model(svc, assets):
    svc.deploy(router={"canary_fraction": 1.0})
    s = ok(svc.http.post("/v1/sessions", json=encode_b64(unit(11, 7))))
    assert (s["model"], s["route"]) == ("phase3", "canary")
    empty = ok(svc.http.post("/v1/sessions", json={"model": "phase3"}))
    assert empty["prediction"] is None and empty["n_seen"] == 0
    svc.deploy(router={"canary_fraction": 0.0})
    out = append(svc, s, **encode_b64(unit(1, 8)), return_vector=True)
    assert (out["model"], out["route"], out["n_seen"]) == ("phase3", "session", 12)
    np.testing.assert_allclose(
        out["vector"], assets["refs"]["phase3"].predict(np.concatenate([unit(11, 7), unit(1, 8)])
                                                         ).vector, atol=APPEND_ATOL)
    first = append(svc, empty, **encode_b64(unit(3, 9)))
    assert first["model"] == "phase3" and first["n_seen"] == 3


def test_session_rejections(svc):
    s = ok(svc.http.post("/v1/sessions", json={"vectors": unit(2, 10).tolist()}))
    url = f"/v1/sessions/{s['session_id']}/append"
    vec = {"vectors": unit(1, 11).tolist()}
    head, header, payload, sig = s["state"].split(".")
    tampered = ".".join([head, header, payload[:-4] + ("AAAA" if payload[-4:] != "AAAA" else "BBBB"),
                         sig])
    other_key = SessionCodec(b"another-key-0123456789").encode(
        SessionCodec(KEY.encode()).decode(s["state"]))
    assert_4xx(svc.http.post(url, json={"state": tampered, **vec}), 403, "does not verify")
    assert_4xx(svc.http.post(url, json={"state": other_key, **vec}), 403, "another session key")
    assert_4xx(svc.http.post(url, json={"state": "garbage", **vec}), 400, "not a v1 token")
    assert_4xx(svc.http.post(url, json=vec), 422, "state")
    assert_4xx(svc.http.post("/v1/sessions/nope/append", json={"state": s["state"], **vec}), 404,
               "unknown session 'nope'")
    svc.deploy(router={"session_ttl_s": 1.0})
    time.sleep(1.5)
    assert_4xx(svc.http.post(url, json={"state": s["state"], **vec}), 410, "expired")
    svc.deploy()
    fresh = ok(svc.http.post("/v1/sessions", json={"vectors": unit(2, 10).tolist()}))
    append(svc, fresh, **vec)


def find_replica_actor(deployment: str, replica_tag: str):
    import ray

    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["name"].startswith(f"SERVE_REPLICA::{APP}#{deployment}#") and \
                a["name"].endswith(replica_tag):
            return ray.get_actor(a["name"], namespace=a["namespace"])
    raise LookupError(f"no replica actor {deployment}#{replica_tag}")


def test_session_survives_replica_restart(svc, assets):
    import ray

    ref = assets["refs"]["phase2"]
    ctx = unit(6, 12)
    s = ok(svc.http.post("/v1/sessions", json=encode_b64(ctx[:4])))
    s = append(svc, s, **encode_b64(ctx[4:5]))
    old = svc.replicas()["phase2"]
    ray.kill(find_replica_actor("Phase2Model", old), no_restart=True)
    deadline = time.time() + 90
    while time.time() < deadline:  # Serve notices the dead replica and starts a new one
        try:
            if svc.replicas()["phase2"] != old:
                break
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(0.5)
    assert svc.replicas()["phase2"] != old, "no new Phase2Model replica"
    out = append(svc, s, **encode_b64(ctx[5:6]), return_vector=True)
    assert out["n_seen"] == 6
    np.testing.assert_allclose(out["vector"], ref.predict(ctx).vector, atol=APPEND_ATOL)


# ----------------------------------------------------------------------------- bad input


def bad_cases():
    v = unit(2, 20)
    b64 = encode_b64(v)
    inf = v.copy()
    inf[0, 0] = np.inf
    zero, huge = v.copy(), v.copy()
    zero[1] = 0.0
    huge[0] = 3e38  # finite values whose norm overflows float32
    nan_json = json.dumps({"vectors": v.tolist()}).replace(str(v.tolist()[0][0]), "NaN", 1)
    return [
        ("wrong dimension", {"json": {"vectors": unit(2, 1)[:, :31].tolist()}}, 422, "(T, 32)"),
        ("NaN", {"content": nan_json}, 422, "NaN"),
        ("Inf", {"json": encode_b64(inf)}, 422, "Inf"),
        ("zero-norm vector", {"json": encode_b64(zero)}, 422, "vector at row 1 has a norm that is zero"),
        ("zero-norm JSON vector", {"json": {"vectors": zero.tolist()}}, 422, "row 1"),
        ("overflowing norm", {"json": encode_b64(huge)}, 422, "row 0 has a norm that is not finite"),
        ("text budget", {"json": {"texts": ["x" * 600, "y" * 600]}}, 413, "max_text_chars"),
        ("empty vectors", {"json": {"vectors": []}}, 422, "empty"),
        ("empty b64", {"json": {"vectors_b64": "", "shape": [0, 32]}}, 422, "empty"),
        ("empty texts", {"json": {"texts": []}}, 422, "empty"),
        ("above max context", {"json": encode_b64(unit(301, 2))}, 413, "at most 300"),
        ("vectors not a list", {"json": {"vectors": "abc"}}, 422, "vectors"),
        ("ragged rows", {"json": {"vectors": [[0.1] * 32, [0.1] * 31]}}, 422, "different lengths"),
        ("string numbers", {"json": {"vectors": [["0.1"] * 32]}}, 422, "vectors"),
        ("k as string", {"json": {**b64, "k": "5"}}, 422, "k"),
        ("k zero", {"json": {**b64, "k": 0}}, 422, "k"),
        ("k above max", {"json": {**b64, "k": 1000}}, 422, "k must be <= 50"),
        ("float ids", {"json": {"concept_ids": [1.5]}}, 422, "concept_ids"),
        ("huge id", {"json": {"concept_ids": [2**70]}}, 422, "concept"),
        ("negative id", {"json": {"concept_ids": [-1]}}, 422, "unknown concept id"),
        ("unknown id", {"json": {"concept_ids": [10**6]}}, 422, "unknown concept id"),
        ("texts not strings", {"json": {"texts": [1, 2]}}, 422, "texts"),
        ("return_vector string", {"json": {**b64, "return_vector": "yes"}}, 422, "return_vector"),
        ("bad base64", {"json": {"vectors_b64": "@@@@", "shape": [1, 32]}}, 422, "base64"),
        ("shape mismatch", {"json": {**b64, "shape": [3, 32]}}, 422, "needs 384"),
        ("shape missing", {"json": {"vectors_b64": b64["vectors_b64"]}}, 422, "shape"),
        ("shape not 2-d", {"json": {**b64, "shape": [64]}}, 422, "shape"),
        ("shape without b64", {"json": {"vectors": v.tolist(), "shape": [2, 32]}}, 422, "shape"),
        ("two forms", {"json": {**b64, "concept_ids": [1]}}, 422, "exactly one"),
        ("no context", {"json": {"k": 3}}, 422, "no context"),
        ("unknown field", {"json": {**b64, "contxt": 1}}, 422, "contxt"),
        ("unknown model", {"json": {**b64, "model": "phase9"}}, 422, "model"),
        ("invalid JSON", {"content": "{\"vectors\": [[1, 2"}, 422, "json"),
        ("JSON not an object", {"content": "[1, 2]"}, 422, "invalid request"),
        ("empty body", {"content": ""}, 422, "invalid request"),
        ("oversized body", {"content": "x" * 300_000}, 413, "limit is 200000"),
        ("oversized chunked body", {"content": lambda: iter([b"x" * 100_000] * 3)}, 413,
         "exceeds 200000"),
    ]


def test_every_bad_input_is_a_4xx_with_a_message(svc):
    svc.deploy(router={"max_context_vectors": 300, "max_body_bytes": 200_000,
                       "max_text_chars": 1000})
    s = ok(svc.http.post("/v1/sessions", json={"vectors": unit(2, 21).tolist()}))
    failures = []
    for name, kwargs, status, match in bad_cases():
        for url, extra in (("/v1/predict", {}), ("/v1/sessions", {}),
                           (f"/v1/sessions/{s['session_id']}/append", {"state": s["state"]})):
            if name == "no context" and url == "/v1/sessions":
                continue  # a session may open empty
            kw = dict(kwargs)
            if "json" in kw:
                kw["json"] = {**kw["json"], **extra}
            elif extra and isinstance(kw["content"], str) and kw["content"].startswith("{"):
                kw["content"] = kw["content"].replace("{", json.dumps(extra)[:-1] + ", ", 1)
            if callable(kw.get("content")):
                kw["content"] = kw["content"]()  # a generator: sent chunked, no content-length
            r = svc.http.post(url, headers={"content-type": "application/json"}, **kw)
            try:
                assert_4xx(r, status, match)
            except AssertionError as e:
                failures.append(f"{name} @ {url}: {e}")
    assert not failures, "\n".join(failures)
    assert svc.http.get("/v1/predict").status_code == 405
    assert svc.http.get("/v1/nothing").status_code == 404
    # ... and the service still answers.
    assert ok(svc.predict(vectors=unit(3, 22).tolist()))["model"] == "phase2"
    append(svc, s, vectors=unit(1, 23).tolist())
    svc.deploy()


def test_metrics_reach_prometheus(svc):
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    want = ["ray_lvm_requests_total", "ray_lvm_errors_total", "ray_lvm_request_latency_ms_bucket",
            "ray_lvm_route_decisions_total", "ray_lvm_rollbacks_total",
            "ray_lvm_model_forward_ms_bucket", "ray_lvm_phase3_rolled_back"]
    deadline, missing = time.time() + 60, want
    while time.time() < deadline and missing:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        missing = [m for m in want if m not in text]
        time.sleep(2)
    assert not missing, missing
    assert 'reason="p95"' in text and 'model="phase3"' in text


def test_sessions_survive_a_redeploy_but_not_a_checkpoint_change(svc, assets):
    s2 = ok(svc.http.post("/v1/sessions", json={**encode_b64(unit(3, 13)), "model": "phase2"}))
    s3 = ok(svc.http.post("/v1/sessions", json={**encode_b64(unit(3, 14)), "model": "phase3"}))
    before = svc.replicas()
    # Same key and Phase-2 checkpoint, a new Phase-3 checkpoint: new args rebuild the app and
    # replace every replica. (Last of the module's main tests: the app keeps this config.)
    svc.deploy(args={"phase3_checkpoint": str(assets["paths"]["phase3b"])})
    deadline = time.time() + 60
    while time.time() < deadline and any(a == b for a, b in zip(svc.replicas().values(),
                                                                 before.values())):
        time.sleep(0.5)
    after = svc.replicas()
    assert all(after[k] != before[k] for k in before), (before, after)
    out = append(svc, s2, **encode_b64(unit(1, 15)), return_vector=True)
    np.testing.assert_allclose(
        out["vector"],
        assets["refs"]["phase2"].predict(np.concatenate([unit(3, 13), unit(1, 15)])).vector,
        atol=APPEND_ATOL)
    r = svc.http.post(f"/v1/sessions/{s3['session_id']}/append",
                      json={"state": s3["state"], **encode_b64(unit(1, 15))})
    assert_4xx(r, 409, "open a new session")


@pytest.mark.slow
def test_text_input_without_a_text_encoder_is_a_4xx(svc, assets):
    """A bank of the "synthetic" encoder has no text encoder: text input is a 422, vectors work."""
    from ray import serve

    svc.deploy(name="lvm_syn", prefix="/syn", args={"bank": str(assets["synthetic_bank"])})
    try:
        text = assert_4xx(svc.http.post("/syn/v1/predict", json={"texts": ["hello"]}), 422,
                          "'synthetic'")
        assert "vectors" in text
        assert ok(svc.http.post("/syn/v1/predict", json={"vectors": unit(2, 24).tolist()}))
        assert ok(svc.http.get("/syn/v1/models"))["encoder"]["text_input"] is False
    finally:
        serve.delete("lvm_syn")
