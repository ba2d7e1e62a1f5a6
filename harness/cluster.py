"""Real Ray clusters for tests and benchmarks: `ray start --head --block` processes with their
own ports and --temp-dir, stopped by pid, and `ray job submit` helpers.

The head runs with --block in the foreground of its own process, in its own session, with its own
ports and its own --temp-dir: it neither collides with other Ray instances on the machine nor is
found by them (`ray.init()` elsewhere looks for /tmp/ray/ray_current_cluster, which a head with
the default temp dir would write and leave behind). It is stopped by its pid; anything it started
and left running is then killed by pid. Used by test_job_submit.py, test_multinode.py,
harness/train_faults.py and bench/reliability.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from harness.net import free_port

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the virtual environment: its `ray`, and the `python` jobs run
# The working dir is uploaded to the cluster: leave out environments, data and run outputs.
EXCLUDES = ["/.venv/", "/.git/", "/runs/", "/data/", "__pycache__", "/.pytest_cache/"]


def ray_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(
        RAY_AUTH_MODE="disabled",  # RAY_NOTES: a stray ~/.ray/auth_token would turn auth on
        RAY_USAGE_STATS_ENABLED="0",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # SIGTERM stops at once instead of draining 30 s
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # entrypoints' `python` = the venv's
    )
    return env


def _proc_stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time) of a live process, from /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
    return int(fields[1]), fields[19]


def descendants(pid: int) -> dict[int, str]:
    """Every live descendant of `pid` -> its start time (which tells a reused pid apart)."""
    stats = {int(p.name): _proc_stat(int(p.name)) for p in Path("/proc").iterdir()
             if p.name.isdigit()}
    children: dict[int, list[int]] = {}
    for child, st in stats.items():
        if st is not None:
            children.setdefault(st[0], []).append(child)
    out, todo = {}, list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out[p] = stats[p][1]
        todo.extend(children.get(p, []))
    return out


@dataclass
class RayNode:
    """One `ray start --block` process and what it needs to be stopped and debugged."""

    proc: subprocess.Popen
    temp_dir: str
    log_path: Path
    known_children: dict[int, str] = field(default_factory=dict)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM the --block process (it stops what it started), SIGKILL after a grace
        period, then SIGKILL by pid any of its processes that outlived it."""
        self.known_children.update(descendants(self.proc.pid))
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        deadline = time.monotonic() + 15
        while True:
            alive = {p: t for p, t in self.known_children.items()
                     if (st := _proc_stat(p)) is not None and st[1] == t}
            if not alive or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        for p in alive:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_node(*args: str, head: bool, name: str) -> RayNode:
    """Start `ray start --block` with every port of its own and its own --temp-dir.

    The temp dir is short (Unix socket paths must stay under ~107 bytes) and outside /tmp/ray."""
    temp_dir = tempfile.mkdtemp(prefix="lvmr", dir="/tmp")
    log_path = Path(temp_dir) / f"{name}.log"
    ports = [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
             f"--dashboard-agent-listen-port={free_port()}",
             f"--dashboard-agent-grpc-port={free_port()}",
             f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
    if head:
        ports.append(f"--ray-client-server-port={free_port()}")
    cmd = [str(BIN / "ray"), "start", *(["--head"] if head else []), "--block",
           "--disable-usage-stats", f"--temp-dir={temp_dir}",
           "--object-store-memory=200000000", *ports, *args]
    with open(log_path, "w") as log:
        # Its own session: Ray's reaper signals its process group if this process dies.
        proc = subprocess.Popen(cmd, env=ray_env(), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, cwd=REPO)
    print(f"started {name}: pid {proc.pid}: {' '.join(cmd)}")
    return RayNode(proc, temp_dir, log_path)


def start_head(num_cpus: int, *extra: str) -> tuple[RayNode, int, str]:
    """A head on 127.0.0.1 with its dashboard on loopback; returns (node, gcs port, dashboard
    URL) once the Jobs API answers."""
    gcs_port, dash_port = free_port(), free_port()
    head = start_node(f"--port={gcs_port}", "--dashboard-host=127.0.0.1",
                      f"--dashboard-port={dash_port}", f"--num-cpus={num_cpus}", *extra,
                      head=True, name="head")
    url = f"http://127.0.0.1:{dash_port}"
    try:
        wait_until(lambda: _http_ok(f"{url}/api/jobs/"), 180, "the head's Jobs API", [head])
    except BaseException:
        head.stop()
        raise
    return head, gcs_port, url


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def wait_until(ok, timeout_s: float, what: str, nodes: list[RayNode]) -> None:
    deadline = time.monotonic() + timeout_s
    while not ok():
        for node in nodes:
            if node.proc.poll() is not None:
                raise RuntimeError(f"ray start exited ({node.proc.returncode}) while waiting "
                                   f"for {what}:\n{node.log_tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} after {timeout_s:.0f} s:\n"
                               + "\n".join(n.log_tail() for n in nodes))
        time.sleep(1)


def submit_job(url: str, entrypoint: list[str]) -> str:
    """`ray job submit --no-wait` of `entrypoint` with this checkout as the working dir."""
    submission_id = f"lvm_test_{uuid.uuid4().hex[:10]}"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", url, "--submission-id",
           submission_id, "--no-wait", "--working-dir", str(REPO),
           "--runtime-env-json", json.dumps({"excludes": EXCLUDES}), "--", *entrypoint]
    out = subprocess.run(cmd, env=ray_env(), cwd=REPO, capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0, f"ray job submit failed:\n{out.stdout}\n{out.stderr}"
    return submission_id


def wait_for_job(url: str, submission_id: str, timeout_s: float) -> tuple[str, str]:
    """Poll until the job ends; returns (status, logs). Stops the job on timeout."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(url)
    deadline = time.monotonic() + timeout_s
    status = client.get_job_status(submission_id)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(2)
        status = client.get_job_status(submission_id)
    if not status.is_terminal():
        client.stop_job(submission_id)
    logs = client.get_job_logs(submission_id)
    if status != JobStatus.SUCCEEDED:
        info = client.get_job_info(submission_id)
        print(f"job {submission_id}: {status} after <= {timeout_s:.0f} s ({info.message})\n"
              f"---- job logs ----\n{logs}")
    return status.value, logs


def train_actors(url: str) -> list:
    """The Ray Train worker actors this cluster has run (alive or dead)."""
    from ray.util.state import list_actors

    return list_actors(address=url, filters=[("class_name", "=", "RayTrainWorker")],
                       detail=True, limit=1000)
