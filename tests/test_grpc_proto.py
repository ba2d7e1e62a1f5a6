"""The committed gRPC code is what lvm.proto generates (regenerated here with grpcio-tools), and
its messages live in an importable module (Ray unpickles them in the replicas by module name)."""

import pickle
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROTO = "lvm_ray/serve/protos/lvm.proto"


def test_generated_code_matches_the_proto(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the dev extra) regenerates the code")
    out = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", ".",
                          f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}", PROTO],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for name in ("lvm_pb2.py", "lvm_pb2_grpc.py"):
        fresh = (tmp_path / "lvm_ray/serve/protos" / name).read_text()
        assert fresh == (ROOT / "lvm_ray/serve/protos" / name).read_text(), \
            f"{name} is stale: regenerate it (see the header of {PROTO})"


def test_messages_pickle_by_their_package_module():
    from lvm_ray.serve.protos import lvm_pb2

    assert lvm_pb2.AppendRequest.__module__ == "lvm_ray.serve.protos.lvm_pb2"
    msg = lvm_pb2.AppendRequest(session_id="s", state="t", k=3)
    assert pickle.loads(pickle.dumps(msg)) == msg
