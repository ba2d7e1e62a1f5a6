"""Reliability of the served app: the bounded load generator, mixed load, a model replica killed
under load, every malformed request, and where Serve listens.

The load generator's own bounds are tested against a stdlib HTTP server (no Ray). The app tests
deploy the real app with tiny random-init checkpoints on the shared local Ray, as
test_serve_app.py does, and call the same functions bench/reliability.py uses for
RELIABILITY.md, with small numbers. Nothing here asserts a latency: speed is reported there.
"""

import http.server
import threading
import time

import httpx
import numpy as np
import pytest

from harness.loadgen import (AppMix, Kind, Request, app_kinds, check_caps, check_loopback,
                             percentiles, run_load)
from harness.net import free_port
from harness.serve_faults import (ServeTarget, http_bad_inputs, kill_replica_under_load,
                                  listening_hosts, load_levels)
from harness.service import APP, KEY, PRODUCT_APP, Service

# ----------------------------------------------------------------------------- the load generator


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://localhost:1/x",
                                 "http://127.5.6.7", "http://[::1]:8000/"])
def test_loopback_targets_are_accepted(url):
    assert check_loopback(url) == url.rstrip("/")


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000", "http://8.8.8.8", "http://0.0.0.0:8000",
                                 "http://[2001:db8::1]/", "http://host.invalid:8000",
                                 "ftp://127.0.0.1", "127.0.0.1:8000", "http://"])
def test_other_targets_are_refused(url):
    with pytest.raises(ValueError):
        check_loopback(url)
    with pytest.raises(ValueError):  # before any request is sent
        run_load(url, [Kind("x", 1, lambda r, m: Request("x", "GET", "/"))], concurrency=1,
                 max_requests=1, max_seconds=1)


@pytest.mark.parametrize("caps", [(0, 1, 1), (-5, 1, 1), (True, 1, 1), (10**9, 1, 1),
                                  (1.5, 1, 1), (1, 0, 1), (1, -1, 1), (1, float("inf"), 1),
                                  (1, float("nan"), 1), (1, 1e9, 1), (1, 1, 0), (1, 1, 5000)])
def test_caps_are_required_and_bounded(caps):
    with pytest.raises(ValueError):
        check_caps(*caps)


class _Handler(http.server.BaseHTTPRequestHandler):
    hits = 0
    lock = threading.Lock()

    def do_POST(self):  # noqa: N802
        with _Handler.lock:
            _Handler.hits += 1
        self.rfile.read(int(self.headers.get("content-length") or 0))
        if self.path == "/slow":
            time.sleep(0.05)
        status = 500 if self.path == "/fail" else 200
        body = b'{"ok": true}'
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def stub_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    th = threading.Thread(target=server.serve_forever, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def kind(name: str, path: str, weight: float = 1.0) -> Kind:
    return Kind(name, weight, lambda r, m: Request(name, "POST", path, b"{}"))


def test_load_stops_at_its_request_cap(stub_server):
    before = _Handler.hits
    res = run_load(stub_server, [kind("a", "/a"), kind("b", "/b", 3.0)], concurrency=4,
                   max_requests=57, max_seconds=600)
    assert res.stopped_by == "max_requests"
    assert len(res.records) == 57 and _Handler.hits - before == 57
    s = res.summary()
    assert s["errors"] == 0 and s["ok"] == 57 and set(s["by_kind"]) == {"a", "b"}
    assert s["by_kind"]["b"]["requests"] > s["by_kind"]["a"]["requests"]


def test_load_stops_at_its_duration_cap(stub_server):
    res = run_load(stub_server, [kind("slow", "/slow")], concurrency=2,
                   max_requests=10_000_000, max_seconds=0.5)
    assert res.stopped_by == "max_seconds" and 0 < len(res.records) < 10_000_000
    assert all(r.start_s < 0.5 for r in res.records)  # nothing started after the cap


def test_failures_are_recorded_not_raised(stub_server):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    res = run_load(stub_server, [kind("fail", "/fail")], concurrency=2, max_requests=6,
                   max_seconds=60)
    assert [r.status for r in res.records] == [500] * 6 and res.summary()["errors"] == 6
    res = run_load(dead, [kind("x", "/")], concurrency=1, max_requests=3, max_seconds=60)
    assert [r.status for r in res.records] == [0] * 3
    assert "ConnectError" in res.records[0].error


def test_percentiles_are_the_linear_interpolation_of_the_sorted_values():
    xs = [float(v) for v in np.random.default_rng(0).permutation(np.arange(1, 102))]  # 1..101
    assert percentiles(xs) == (51.0, 96.0, 100.0)  # rank q/100 * (n - 1) of the sorted values
    assert percentiles([10.0, 20.0], (50, 75)) == (15.0, 17.5)
    assert all(np.isnan(v) for v in percentiles([]))


# ----------------------------------------------------------------------------- the served app


@pytest.fixture(scope="module")
def target(ray_session, assets):
    """The app deployed like serve_configs/hybrid.yaml: Serve started with a port and no host."""
    from ray import serve

    from lvm_ray.predictor import Predictor

    serve.start(http_options={"port": free_port()})
    port = serve.context._get_global_client().http_config.port
    svc = Service(assets, port, import_path=PRODUCT_APP)  # the product app itself
    svc.deploy()
    bank = assets["bank_data"]
    t = ServeTarget(f"http://127.0.0.1:{port}", bank.dim, len(bank),
                    [str(x) for x in bank.texts[:200]],
                    Predictor.from_paths(assets["paths"]["phase2"], assets["bank"],
                                         device="cpu"),
                    app=APP)
    t.port, t.svc = port, svc
    yield t
    svc.http.close()
    serve.shutdown()  # later Train tests need the CPUs the replicas hold


@pytest.mark.ray
def test_serve_listens_on_loopback_only_by_default(target):
    assert listening_hosts(target.port) == ["127.0.0.1"]


@pytest.mark.ray
def test_mixed_load_at_concurrency_8_has_no_errors(target):
    (level,) = load_levels(target, (8,), seconds=300, max_requests=240)
    assert level["requests"] > 0 and level["errors"] == 0, level["errors_by_status"]
    assert set(level["by_kind"]) == {"predict_json", "predict_b64", "predict_texts",
                                     "predict_ids", "session_open", "session_append"}
    assert level["max_replicas"]["Phase2Model"] >= 1


@pytest.mark.ray
def test_every_malformed_request_is_a_4xx_with_a_message(target):
    target.svc.deploy(router={"max_context_vectors": 300, "max_body_bytes": 200_000,
                              "max_k": 20})
    try:
        rows = http_bad_inputs(target, 300, 200_000, 20, KEY)
    finally:
        target.svc.deploy()
    assert len(rows) >= 31  # 30 malformed requests at least, then the still-answering check
    problems = [f"{r['name']}: {r['problem']}" for r in rows if r["problem"]]
    assert not problems, "\n".join(problems)
    assert not [r for r in rows if r["status"] >= 500 or r["status"] == 0]


@pytest.mark.ray
@pytest.mark.slow
def test_replica_killed_under_load_is_replaced_and_sessions_survive(target):
    concurrency = 8
    out = kill_replica_under_load(target, "Phase2Model", concurrency=concurrency, kill_at_s=4,
                                  total_s=30, max_requests=100_000, n_sessions=3,
                                  mix=AppMix(b64_vectors=(16, 64)))
    assert out["recovery_s"] is not None, "Serve did not replace the killed replica"
    assert out["replacement"], "no new Phase2Model replica"
    # Only requests in flight on the dead replica may fail: at most one per client.
    assert out["failed"] <= concurrency, out["errors_around"]
    assert all(e.startswith("503 ") and "phase2" in e for e in out["errors_around"]), \
        out["errors_around"]
    assert out["after"] > 0 and out["failed_after"] == 0
    assert out["sessions_continued"] == out["sessions"] == 3
    # ... and the app answers as before.
    r = httpx.post(f"{target.base_url}/v1/predict", json={"concept_ids": [1, 2, 3]}, timeout=60)
    assert r.status_code == 200, r.text


def test_app_kinds_cover_every_input_form():
    kinds = {k.name for k in app_kinds(8, 100, ["a b", "c d"])}
    assert kinds == {"predict_json", "predict_b64", "predict_texts", "predict_ids",
                     "session_open", "session_append"}
    assert "predict_texts" not in {k.name for k in app_kinds(8, 100, None)}


def test_a_broken_request_kind_is_an_error_not_a_silent_short_run(stub_server):
    def broken(rng, memory):
        raise KeyError("no such body")

    with pytest.raises(KeyError, match="no such body"):
        run_load(stub_server, [Kind("broken", 1.0, broken)], concurrency=2, max_requests=10,
                 max_seconds=60)
