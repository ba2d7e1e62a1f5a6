"""Shared by every benchmark script: machine description and a section writer for
BENCHMARKS.md, so several scripts can each own one section of the file."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "BENCHMARKS.md"
HEADER = ("# lvm_ray benchmarks\n\nWritten by `make bench` (bench/run_all.py); each section by "
          "the script named in it. Numbers are from the machine and date shown in the section.\n")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except Exception:  # noqa: BLE001  torch missing is fine for the description
        gpu = "unknown GPU"
    return f"{os.cpu_count()} cores ({cpu}), {mem_gb:.0f} GB RAM, {gpu}, Python {platform.python_version()}"


def stamp() -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"_Machine: {machine()}. Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
            f"Load average (1/5/15 min) at the end: {load}; other processes inflate times._")


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


def write_section(name: str, title: str, body: str, command: str) -> None:
    """Replace (or append) section `name` of BENCHMARKS.md and print it."""
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else HEADER
    section = (f"<!-- section:{name} -->\n## {title}\n\n{stamp()} Command: `{command}`\n\n"
               f"{body.strip()}\n<!-- /section:{name} -->")
    pattern = re.compile(rf"<!-- section:{re.escape(name)} -->.*?<!-- /section:{re.escape(name)} -->",
                         re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else \
        text.rstrip() + "\n\n" + section + "\n"
    BENCHMARKS.write_text(text)
    print(section)


def git_rev() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                       text=True).strip()
    except Exception:  # noqa: BLE001
        return "unknown"
