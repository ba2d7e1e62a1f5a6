"""lvm_ray's own progress lines, on stdout: jobs stream stdout back through `ray job logs`."""

from __future__ import annotations

import time


def say(msg: str) -> None:
    print(f"[lvm {time.strftime('%H:%M:%S')}] {msg}", flush=True)
