"""Where lvm commands find Ray: a dead recorded cluster is noticed within seconds (a TCP probe)
and replaced by a local Ray, with a message; an explicit address that does not answer fails at
once, naming it."""

import subprocess
import sys

import pytest
import ray

from harness.net import free_port
from lvm_ray.distributed import runtime


@pytest.fixture
def fake_ray(monkeypatch):
    seen = {}
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    return seen


@pytest.mark.timeout(60)
def test_a_dead_recorded_cluster_is_replaced_by_a_local_ray(fake_ray, monkeypatch, capsys):
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setattr(runtime, "recorded_address", lambda: dead)
    runtime.init_ray()
    assert fake_ray["address"] == "local"
    out = capsys.readouterr().out
    assert dead in out and "does not answer" in out and "ray stop" in out


@pytest.mark.timeout(60)
def test_a_live_recorded_cluster_is_joined(fake_ray, monkeypatch):
    import socket

    with socket.socket() as srv:  # a stand-in for a head's GCS port
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        live = f"127.0.0.1:{srv.getsockname()[1]}"
        monkeypatch.setattr(runtime, "recorded_address", lambda: live)
        runtime.init_ray()
    assert fake_ray["address"] == live


@pytest.mark.timeout(60)
@pytest.mark.parametrize("address", ["auto", "127.0.0.1:{port}"])
def test_an_explicit_address_that_does_not_answer_fails_at_once(fake_ray, monkeypatch, address):
    monkeypatch.setattr(runtime, "recorded_address", lambda: f"127.0.0.1:{free_port()}")
    address = address.format(port=free_port())
    with pytest.raises(runtime.RayUnreachable, match="--address local"):
        runtime.init_ray(address=address)
    assert fake_ray == {}  # ray.init never called: no 10-minute wait


def test_address_local_always_starts_a_new_ray(fake_ray, monkeypatch):
    monkeypatch.setattr(runtime, "recorded_address", lambda: "127.0.0.1:1")
    runtime.init_ray(num_cpus=1, address="local")
    assert fake_ray["address"] == "local" and fake_ray["num_cpus"] == 1


@pytest.mark.timeout(120)
def test_cli_names_the_unreachable_address_in_one_line(tmp_path):
    dead = f"127.0.0.1:{free_port()}"
    p = subprocess.run([sys.executable, "-m", "lvm_ray.cli", "tune", "--smoke-test", "--address",
                        dead, "--set", f"run.storage_path={tmp_path}"],
                       capture_output=True, text=True, timeout=110)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert f"lvm tune: error: no Ray cluster answers at {dead}" in p.stderr
