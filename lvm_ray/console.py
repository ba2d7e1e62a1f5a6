"""lvm_ray's own progress lines, on stdout: jobs stream stdout back through `ray job logs`.

Written with sys.stdout.write rather than print: inside a Ray Train worker, print is patched to
go through Train's logger and also to the original stream, which showed every line twice.
"""

from __future__ import annotations

import sys
import time


def say(msg: str) -> None:
    sys.stdout.write(f"[lvm {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stdout.flush()
