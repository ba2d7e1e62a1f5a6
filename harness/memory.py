"""Memory of a process tree, sampled: what bench/bench_scale.py reports per stage.

RSS counts a page shared by several processes (the object store's, a memory-mapped index) once
per process; PSS divides it between them, so the PSS of all processes adds up to the memory the
tree really uses. Both come from /proc/PID/smaps_rollup (Linux). Roles are read from the
process title Ray sets (ray::RayTrainWorker, ServeReplica:..., raylet, ...).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np

from lvm_ray.data.index import mem_available as _mem_available

ROLES = (("RayTrainWorker", "train worker"), ("ServeReplica", "serve replica"),
         ("ProxyActor", "serve proxy"), ("ServeController", "serve controller"),
         ("MapWorker", "ingest actor"), ("raylet", "raylet"), ("gcs_server", "gcs"),
         ("ray::", "ray worker"))


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(d.name))
    return kids


def tree(root: int) -> list[int]:
    kids, out, todo = _children(), [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def usage(pid: int) -> tuple[int, int] | None:
    """(rss, pss) in bytes, or None when the process is gone."""
    try:
        vals = {}
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            parts = line.split()
            if parts and parts[0] in ("Rss:", "Pss:"):
                vals[parts[0]] = int(parts[1]) * 1024
        return vals["Rss:"], vals["Pss:"]
    except (OSError, KeyError):
        return None


def role(pid: int, root: int) -> str:
    if pid == root:
        return "driver"
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        cmd = raw.replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "other"
    for key, name in ROLES:
        if key in cmd:
            return name
    return "other"


class Sampler:
    """Samples the tree under `root` every `period` s in a thread; `peak` keeps, per quantity,
    the largest total seen and the per-role breakdown at that moment."""

    def __init__(self, root: int | None = None, period: float = 0.5):
        self.root, self.period = root or os.getpid(), period
        self.peak_pss = self.peak_rss = 0
        self.roles_at_peak: dict[str, tuple[int, int]] = {}  # role -> (count, pss)
        self.totals: list[int] = []  # total PSS of every sample (median: the steady state)
        self.role_totals: list[dict[str, int]] = []  # role -> PSS, every sample
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        total_rss = total_pss = 0
        roles: dict[str, tuple[int, int]] = {}
        for pid in tree(self.root):
            u = usage(pid)
            if u is None:
                continue
            total_rss += u[0]
            total_pss += u[1]
            r = role(pid, self.root)
            n, p = roles.get(r, (0, 0))
            roles[r] = (n + 1, p + u[1])
        self.peak_rss = max(self.peak_rss, total_rss)
        self.totals.append(total_pss)
        self.role_totals.append({r: p for r, (_, p) in roles.items()})
        if total_pss > self.peak_pss:
            self.peak_pss, self.roles_at_peak = total_pss, roles

    @property
    def roles_median(self) -> dict[str, float]:
        """role -> median PSS over the samples (0 where the role was absent)."""
        names = {r for t in self.role_totals for r in t}
        return {r: float(np.median([t.get(r, 0) for t in self.role_totals])) for r in names}

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.period)

    def __enter__(self) -> "Sampler":
        self.t0 = time.perf_counter()
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
        self.seconds = time.perf_counter() - self.t0


def mem_available() -> int:
    return _mem_available() or 0
