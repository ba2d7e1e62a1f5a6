"""`make bench`: run every benchmark script; each rewrites its own section of BENCHMARKS.md.
The scale benchmark (about an hour, several GB) runs on its own: `make bench-scale`."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = sorted(p for p in HERE.glob("bench_*.py") if p.name != "bench_scale.py")

if __name__ == "__main__":
    failed = []
    for script in SCRIPTS:
        print(f"== {script.name}", flush=True)
        if subprocess.call([sys.executable, str(script), *sys.argv[1:]]) != 0:
            failed.append(script.name)
    if failed:
        print(f"failed: {', '.join(failed)}")
        sys.exit(1)
