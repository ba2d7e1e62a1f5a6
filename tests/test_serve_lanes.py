"""The lane rule in the served app: /v1/status shows each model's per-lane Hit@5 exactly as its
checkpoint's lanes.json holds it, and a Phase-3 that fails the rule gets no canary traffic until
the router's `enforce_lane_rule: false` overrides it.

The app is the one test_serve_app.py deploys (harness.service), with a lanes.json
written into each checkpoint first: Phase-2 passes the rule, Phase-3's lane 3 fails it.
"""

import json

import pytest

from harness.net import free_port
from harness.service import Service, lane_doc, ok, unit
from lvm_ray.serve.schemas import encode_b64

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def svc(ray_session, assets):
    from ray import serve

    from lvm_ray.eval.lanes import write_lanes

    for name, lane3_hit_rate in (("phase2", 0.5), ("phase3", 0.05)):
        write_lanes(assets["paths"][name], lane_doc(lane3_hit_rate))
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    s = Service(assets, serve.context._get_global_client().http_config.port)
    s.deploy(router={"canary_fraction": 1.0})
    yield s
    s.http.close()
    serve.shutdown()  # later Train tests need the CPUs the replicas hold


def lanes_json(assets, name: str) -> dict:
    return json.loads((assets["paths"][name] / "lanes.json").read_text())


def test_status_shows_the_per_lane_numbers_of_lanes_json(svc, assets):
    status = ok(svc.http.get("/v1/status"))
    models = ok(svc.http.get("/v1/models"))["models"]
    for name, passes in (("phase2", True), ("phase3", False)):
        want = lanes_json(assets, name)
        got = status["models"][name]
        assert got["lanes_reason"] is None and got["lane_rule_ok"] is passes
        assert got["lanes"]["lanes"] == want["lanes"]  # n, hit, lo, hi, below_threshold per lane
        for key in ("average", "threshold", "canary_ok", "canary_confident_fail", "source",
                    "rule"):
            assert got["lanes"][key] == want[key], (name, key)
        assert models[name]["lanes"] == got["lanes"]
    assert status["routing"]["lane_rule"]["phase3_report_read"] is True


def test_failing_lane_report_blocks_canary_traffic_until_overridden(svc):
    long_ctx = encode_b64(unit(11, 30))
    routes = {(o["model"], o["route"]) for o in (ok(svc.predict(**long_ctx)) for _ in range(10))}
    assert routes == {("phase2", "canary_blocked")}
    s = ok(svc.http.post("/v1/sessions", json=long_ctx))
    assert (s["model"], s["route"]) == ("phase2", "canary_blocked")
    assert ok(svc.predict(**long_ctx, model="phase3"))["model"] == "phase3"  # explicit: served
    st = ok(svc.http.get("/v1/status"))["routing"]
    assert st["state"] == "canary_blocked"
    assert st["canary_blocked"].startswith("phase3 fails the lane rule: lane 3 Hit@5 0.0")
    assert st["decisions"]["phase2:canary_blocked"] == 11
    # The operator's override, applied live: canary traffic reaches Phase-3 again.
    before = svc.replicas()
    svc.deploy(router={"canary_fraction": 1.0, "enforce_lane_rule": False})
    out = ok(svc.predict(**long_ctx))
    assert (out["model"], out["route"]) == ("phase3", "canary")
    st = ok(svc.http.get("/v1/status"))["routing"]
    assert st["state"] == "full" and st["canary_blocked"] is None
    assert st["lane_rule"]["phase3_failure"].startswith("lane 3 Hit@5")
    assert svc.replicas() == before, "a user_config change must not restart replicas"
