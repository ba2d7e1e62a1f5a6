"""An ensemble served as a model deployment (serve_configs/ensemble.yaml's app): one replica runs
every member on one input; answers equal the Ray-free EnsemblePredictor's, sessions continue, and
a plain checkpoint behind the same deployment answers like that checkpoint."""

import json

import numpy as np
import pytest

from harness.net import free_port
from harness.service import Service, ok, unit
from lvm_ray.eval.ensemble import ensemble_document
from lvm_ray.serve.ensemble import ENSEMBLE_APP
from lvm_ray.serve.fusion import EnsemblePredictor, read_spec
from lvm_ray.serve.schemas import encode_b64

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def svc(ray_session, assets):
    from ray import serve

    spec_dir = assets["root"] / "pair"
    spec_dir.mkdir(exist_ok=True)
    doc = ensemble_document("pair", [("p2", str(assets["paths"]["phase2"])),
                                     ("p3b", str(assets["paths"]["phase3b"]))],
                            {"score": [0.3, 0.7], "rrf": [0.5, 0.5]}, {"score": 0.2, "rrf": 0.1},
                            "score")
    (spec_dir / "ensemble.json").write_text(json.dumps(doc))
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    s = Service(assets, serve.context._get_global_client().http_config.port,
                import_path=ENSEMBLE_APP)
    s.args["phase2_checkpoint"] = str(spec_dir)
    s.deploy()
    s.ref = EnsemblePredictor.from_paths(spec_dir, assets["bank"], device="cpu")
    yield s
    s.http.close()
    serve.shutdown()  # later Train tests need the CPUs the replicas hold


def test_ensemble_answers_like_the_predictor(svc):
    x = unit(7, 40)
    out = ok(svc.predict(**encode_b64(x), model="phase2", k=5, return_vector=True))
    want = svc.ref.predict(x, k=5)
    assert [n["concept_id"] for n in out["neighbors"]] == [n.concept_id for n in want.neighbors]
    np.testing.assert_allclose(out["vector"], want.vector, atol=1e-5)
    info = ok(svc.http.get("/v1/models"))["models"]["phase2"]
    assert [m["name"] for m in info["ensemble"]["members"]] == ["p2", "p3b"]
    assert info["ensemble"]["weights"] == [0.3, 0.7] and info["lanes"] is None


def test_ensemble_sessions_continue(svc):
    x = unit(9, 41)
    opened = ok(svc.http.post("/v1/sessions", json={**encode_b64(x[:4]), "model": "phase2"}))
    out = ok(svc.http.post(f"/v1/sessions/{opened['session_id']}/append",
                           json={**encode_b64(x[4:]), "state": opened["state"], "k": 5}))
    want = svc.ref.predict(x, k=5)
    assert out["n_seen"] == 9
    assert [n["concept_id"] for n in out["neighbors"]] == [n.concept_id for n in want.neighbors]


def test_a_plain_checkpoint_behind_the_ensemble_deployment(svc, assets):
    x = unit(12, 42)
    out = ok(svc.predict(**encode_b64(x), model="phase3", k=5))
    want = assets["refs"]["phase3"].predict(x, k=5)
    assert [n["concept_id"] for n in out["neighbors"]] == [n.concept_id for n in want.neighbors]
    assert read_spec(assets["paths"]["phase3"])["weights"] == {"score": [1.0]}
