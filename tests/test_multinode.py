"""A real two-node Ray cluster on one machine: the training smoke job runs its two Ray Train
workers on two different nodes and writes its checkpoints to the shared storage path.

The head has 1 CPU and the second node (joined on 127.0.0.1, custom resource node_b) has 1 CPU;
each of the 2 workers needs 1 CPU, so Ray Train's placement group must span both nodes. The job's
driver, the Train controller and Ray Data's split coordinator take 0 CPUs and stay on the head.
Node ids come from Ray's state API, matched to the pids each rank records (--record-pids).
"""

from __future__ import annotations

import json
import uuid

import pytest
from harness.cluster import start_head, start_node, submit_job, train_actors, wait_for_job, \
    wait_until

pytestmark = pytest.mark.slow


def alive_nodes(url: str) -> list:
    from ray.util.state import list_nodes

    return list_nodes(address=url, filters=[("state", "=", "ALIVE")], detail=True)


def test_training_workers_span_two_nodes(tmp_path):
    shared, name = tmp_path / "shared", f"multinode_{uuid.uuid4().hex[:6]}"
    nodes = []
    try:
        head, gcs_port, url = start_head(1)
        nodes.append(head)
        nodes.append(start_node(f"--address=127.0.0.1:{gcs_port}", "--num-cpus=1",
                                '--resources={"node_b": 1}', head=False, name="node_b"))
        wait_until(lambda: len(alive_nodes(url)) == 2, 180, "second node", nodes)

        sid = submit_job(url, [
            "python", "jobs/train.py", "--smoke-test", "--workers", "2", "--record-pids",
            "--set", "scaling.cpus_per_worker=1",
            "--set", f"run.storage_path={shared}", "--set", f"run.name={name}",
            "--set", f"bank_path={shared / 'data' / 'bank.parquet'}",
        ])
        status, logs = wait_for_job(url, sid, timeout_s=300)
        if status != "SUCCEEDED":
            print("\n".join(f"---- {n.log_path.name} ----\n{n.log_tail()}" for n in nodes))
        assert status == "SUCCEEDED", f"job {sid} ended {status}"

        cluster = {n.node_id: n for n in alive_nodes(url)}
        (head_id,) = [i for i, n in cluster.items() if n.is_head_node]
        (b_id,) = [i for i, n in cluster.items() if "node_b" in (n.resources_total or {})]
        node_of_pid = {a.pid: a.node_id for a in train_actors(url)}
    finally:
        for node in reversed(nodes):
            node.stop()

    run_dir = shared / name
    ranks = {}
    for r in range(2):
        pid = int((run_dir / "worker_pids" / f"rank{r}.pid").read_text())
        assert pid in node_of_pid, f"rank {r} pid {pid} is not a RayTrainWorker: {node_of_pid}"
        ranks[r] = (pid, node_of_pid[pid])
    label = {head_id: "head", b_id: "node_b"}
    print(f"\njob {sid}: Ray Train workers")
    for r, (pid, node) in ranks.items():
        print(f"  rank {r}: pid {pid} on node {node} ({label.get(node, '?')})")
    assert {node for _, node in ranks.values()} == {head_id, b_id}, \
        "the two training workers did not run on the two different nodes"

    # Both ranks wrote into the shared storage path; Ray Train persisted checkpoints there.
    assert sorted(run_dir.glob("epoch_*/model.safetensors")), f"no checkpoint in {run_dir}"
    assert (run_dir / "checkpoint_manager_snapshot.json").is_file()
    for rel in ("best/checkpoint.json", "best/model.safetensors", "training_history.json",
                "report.md"):
        assert (run_dir / rel).is_file(), f"missing {rel} in {run_dir}"
    history = json.loads((run_dir / "training_history.json").read_text())
    assert history, "empty training history"
    assert "on 2 worker(s)" in logs
