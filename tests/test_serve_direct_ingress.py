"""`lvm serve --direct-ingress`: each application's replicas also answer HTTP on their own ports
(Serve's direct ingress, no proxy hop), printed at start-up, with the proxy's answers.

Direct ingress is read by Ray's processes when they start, so this runs `lvm serve` as its own
process with its own local Ray (not the tests' shared one), stopped by its pid, also on failure.
"""

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import yaml

from harness.net import free_port
from harness.service import hybrid_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _read_until(proc: subprocess.Popen, pattern: str, timeout_s: float) -> list[str]:
    """Lines of proc's stdout up to the first matching `pattern` (RuntimeError on exit/timeout)."""
    lines, deadline = [], time.time() + timeout_s
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                raise RuntimeError(f"lvm serve exited ({proc.returncode}):\n" + "".join(lines))
            continue
        lines.append(line)
        if re.search(pattern, line):
            return lines
    raise RuntimeError(f"no {pattern!r} within {timeout_s} s:\n" + "".join(lines))


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # lvm serve: serve.shutdown(), then its Ray ends
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def test_direct_ingress_answers_at_each_replica_port_like_the_proxy(assets, tmp_path):
    port = free_port()
    cfg = hybrid_config(assets["paths"]["phase2"], assets["paths"]["phase3"], assets["bank"],
                        models={"append_step": "fp32"}, port=port)
    cfg["http_options"]["host"] = "127.0.0.1"
    path = tmp_path / "hybrid.yaml"
    path.write_text(yaml.safe_dump(cfg))
    apps = {a["name"]: a for a in cfg["applications"]}
    phase2 = next(n for n, a in apps.items() if a["args"].get("model") == "phase2")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # No load balancer in front here: a stopping replica need not stay up 30 s to be dropped.
    env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "1"
    proc = subprocess.Popen([sys.executable, "-m", "lvm_ray.cli", "serve", str(path),
                             "--direct-ingress", "--address", "local"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = _read_until(proc, r"Ctrl-C stops it", timeout_s=240)
        # The per-app lines follow the address line.
        lines += _read_until(proc, rf"^\s+{re.escape(phase2)}: direct ingress", timeout_s=30)
        urls = re.search(rf"{re.escape(phase2)}: direct ingress \(no proxy hop\) at (.+)$",
                         "".join(lines), re.M).group(1).split(", ")
        assert urls and all(re.fullmatch(r"http://[\d.]+:\d+", u) for u in urls), urls
        assert f":{port}" not in urls[0]  # the replica's own port, not the proxy's

        ctx = np.random.default_rng(0).standard_normal((12, 32)).astype(np.float32)
        body = {"vectors": ctx.tolist(), "k": 5}
        route = f"/{phase2}/v1/predict"
        with httpx.Client(timeout=60) as http:
            via_proxy = http.post(f"http://127.0.0.1:{port}{route}", json=body)
            via_replica = http.post(urls[0] + route, json=body)
            refused = http.post(urls[0] + route, json={"vectors": ctx[:, :5].tolist()})
        assert via_proxy.status_code == 200 and via_replica.status_code == 200, via_replica.text
        a, b = via_proxy.json(), via_replica.json()
        assert a["route"] == b["route"] == "direct" and a["model"] == b["model"] == "phase2"
        assert [n["concept_id"] for n in a["neighbors"]] == \
            [n["concept_id"] for n in b["neighbors"]]
        np.testing.assert_allclose([n["score"] for n in a["neighbors"]],
                                   [n["score"] for n in b["neighbors"]], atol=1e-6)
        assert refused.status_code == 422  # the replica's own server applies the same checks
    finally:
        _stop(proc)
