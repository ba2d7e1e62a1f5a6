"""Malformed corpora, banks, configs and checkpoints for the CLI and the job scripts, shared by
tests/test_bad_input_cli.py and bench/reliability.py: each case must exit non-zero with one line
naming the problem, print no traceback and write nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from lvm_ray.config import ModelConfig
from lvm_ray.data.bank import save_bank, to_table
from lvm_ray.data.synthetic import make_synthetic_bank
from lvm_ray.model import build_model
from lvm_ray.train.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class CliCase:
    name: str
    argv: list[str]  # `lvm` arguments (or, with script, the job script's)
    match: str  # a word the one-line error must contain (case-insensitive)
    script: str | None = None  # run jobs/<script> instead of the `lvm` CLI
    kind: str = "config"  # "config": a bad setting; "data": a bad corpus, bank or checkpoint


def cli_inputs(tmp: Path) -> dict[str, Path]:
    """Malformed corpora, banks, configs and a corrupted checkpoint under tmp/inputs; the
    outputs of every case go under tmp/out (which must stay empty)."""
    d = tmp / "inputs"
    d.mkdir(parents=True, exist_ok=True)
    (d / "unknown_key.yaml").write_text("train:\n  lr: 0.001\n  learning_rate: 0.01\n")
    (d / "broken.yaml").write_text("train: [lr: 0.001\n")
    (d / "list.yaml").write_text("- train\n- lr\n")
    (d / "empty_folder").mkdir(exist_ok=True)
    (d / "no_text_files").mkdir(exist_ok=True)
    (d / "no_text_files" / "speech.pdf").write_bytes(b"%PDF-1.4 not text")
    (d / "blank_docs").mkdir(exist_ok=True)
    (d / "blank_docs" / "a.txt").write_text("   \n\n")
    (d / "blank_docs" / "b.txt").write_bytes(b"\xff\xfe\x00 not utf-8 \xc3\x28")
    (d / "bad.jsonl").write_text('{"id": 1, "text": "ok"\nnot json\n[1, 2]\n{"id": 2}\n'
                                 '{"text": "no id"}\n{"id": 3, "text": "   "}\n')
    (d / "garbage.parquet").write_bytes(os.urandom(4096))
    bank = make_synthetic_bank(n_docs=8, doc_len=(30, 40), dim=32, seed=0)
    save_bank(bank, d / "ok_bank.parquet")
    nan = make_synthetic_bank(n_docs=8, doc_len=(30, 40), dim=32, seed=0)
    nan.vectors[3, 5] = np.nan
    save_bank(nan, d / "nan_bank.parquet")
    pq.write_table(to_table(bank).drop_columns(["vector"]), d / "no_vector_bank.parquet")
    cfg = ModelConfig(d_in=32, hidden=8, layers=1, slots=2)
    torch.manual_seed(0)
    ck = save_checkpoint(d / "corrupt_ckpt", build_model(cfg), cfg, epoch=0, metrics={},
                         config={"window": {"context": 16}})
    w = ck / "model.safetensors"
    w.write_bytes(w.read_bytes()[: len(w.read_bytes()) // 2])  # a write cut short
    return {p.name: p for p in d.iterdir()}


def cli_cases(tmp: Path) -> list[CliCase]:
    """At least 10 malformed corpora / configs for `lvm ingest|train|evaluate` and the job
    scripts; each must exit non-zero with one line naming the problem and write nothing."""
    i = cli_inputs(tmp)
    out = tmp / "out"
    sets = ["--set", f"bank_path={out / 'bank.parquet'}", "--set",
            f"run.storage_path={out / 'runs'}"]

    def src(kind: str, path: Path) -> list[str]:
        return ["--set", f"corpus.source={kind}", "--set", f"corpus.path={path}"]

    smoke_bank = ["--smoke-test", *src("bank", i["ok_bank.parquet"])]
    return [
        CliCase("config file with an unknown key", ["train", "--local", "--config",
                str(i["unknown_key.yaml"]), *smoke_bank, *sets], "train.learning_rate"),
        CliCase("config file that is not YAML", ["train", "--local", "--config",
                str(i["broken.yaml"]), *smoke_bank, *sets], "not valid YAML"),
        CliCase("config file whose top level is a list", ["ingest", "--config",
                str(i["list.yaml"]), *sets], "mapping"),
        CliCase("config file that does not exist", ["ingest", "--config",
                str(tmp / "nope.yaml"), *sets], "not found"),
        CliCase("unknown preset", ["train", "--local", "--preset", "huge", *sets],
                "unknown preset"),
        CliCase("--set without '='", ["train", "--local", *smoke_bank, "--set", "train.lr",
                *sets], "section.key=value"),
        CliCase("--set value of the wrong type", ["train", "--local", *smoke_bank, "--set",
                "train.lr=fast", *sets], "expected a number"),
        CliCase("split fractions that do not sum to 1", ["ingest", "--smoke-test", "--set",
                "split.train=0.9", *sets], "sum to 1"),
        CliCase("window.context = 0", ["train", "--local", *smoke_bank, "--set",
                "window.context=0", *sets], "window.context"),
        CliCase("corpus.max_docs = 0", ["ingest", *src("folder", i["empty_folder"]), "--set",
                "corpus.max_docs=0", *sets], "max_docs"),
        CliCase("corpus folder that does not exist", ["ingest", *src("folder",
                tmp / "missing_folder"), *sets], "not found", kind="data"),
        CliCase("corpus folder with no .txt/.md files", ["ingest", *src("folder",
                i["no_text_files"]), *sets], "no .txt/.md files", kind="data"),
        CliCase("corpus folder whose files are blank or not UTF-8", ["ingest", *src("folder",
                i["blank_docs"]), "--set", "encoder.name=hashing-32", *sets],
                "no usable documents", kind="data"),
        CliCase("JSONL corpus with no usable record", ["ingest", *src("jsonl", i["bad.jsonl"]),
                "--set", "encoder.name=hashing-32", *sets], "no usable documents", kind="data"),
        CliCase("JSONL corpus path that does not exist", ["ingest", *src("jsonl",
                tmp / "missing.jsonl"), *sets], "not found", kind="data"),
        CliCase("bank that is not Parquet", ["train", "--local", "--smoke-test",
                *src("bank", i["garbage.parquet"]), *sets], "not a readable Parquet", kind="data"),
        CliCase("bank without a vector column", ["train", "--local", "--smoke-test",
                *src("bank", i["no_vector_bank.parquet"]), *sets], "vector", kind="data"),
        CliCase("bank with NaN vectors (validated on ingest)", ["ingest", "--smoke-test",
                *src("bank", i["nan_bank.parquet"]), *sets], "NaN", kind="data"),
        CliCase("bank whose dimension differs from model.d_in", ["train", "--local",
                *smoke_bank, "--set", "model.d_in=384", *sets], "d_in"),
        CliCase("batch larger than the training set", ["train", "--local", *smoke_bank,
                "--set", "train.batch_size=100000", *sets], "too few training windows"),
        CliCase("evaluate a checkpoint cut short mid-write", ["evaluate", *smoke_bank,
                "--checkpoint", f"bad={i['corrupt_ckpt']}", "--out", str(out / "eval"), *sets],
                "checksum", kind="data"),
        CliCase("evaluate a checkpoint path that does not exist", ["evaluate", *smoke_bank,
                "--checkpoint", str(tmp / "no_ckpt"), "--out", str(out / "eval"), *sets],
                "not a checkpoint", kind="data"),
        CliCase("coherence gate given as a value and as a quantile", ["train", "--local",
                *smoke_bank, "--set", "window.min_coherence=0.3", "--set",
                "window.min_coherence_quantile=0.5", *sets], "not both"),
        CliCase("--ensemble without NAME=", ["evaluate", *smoke_bank, "--ensemble",
                str(tmp / "no_ckpt"), "--out", str(out / "eval"), *sets], "NAME=PATH"),
        CliCase("ensemble member that is not a checkpoint", ["evaluate", *smoke_bank,
                "--ensemble", f"pair={i['corrupt_ckpt']},{tmp / 'no_ckpt'}", "--out",
                str(out / "eval"), *sets], "checksum", kind="data"),
        CliCase("job script: JSONL corpus with no usable record", [*src("jsonl", i["bad.jsonl"]),
                "--set", "encoder.name=hashing-32", *sets], "no usable documents",
                script="ingest.py", kind="data"),
        CliCase("job script: unknown config key on the command line", ["--smoke-test",
                "--set", "train.epochs=3", *sets], "train.epochs", script="train.py"),
    ]


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def run_cli_case(case: CliCase, tmp: Path, timeout_s: float = 600) -> dict[str, Any]:
    """Run one case as its own process (`python -m lvm_ray.cli` or `python jobs/...`):
    exit code, the last stderr line, whether a traceback was printed, what it wrote."""
    out = tmp / "out"
    before = files_under(out)
    cmd = [sys.executable, str(ROOT / "jobs" / case.script)] if case.script else \
        [sys.executable, "-m", "lvm_ray.cli"]
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    t0 = time.time()
    p = subprocess.run(cmd + case.argv, capture_output=True, text=True, timeout=timeout_s,
                       cwd=tmp, env=env)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ": error: " in ln]
    written = [f for f in files_under(out) if f not in before]
    message = errors[-1] if errors else (lines[-1] if lines else "")
    return {"name": case.name, "command": ("jobs/" + case.script) if case.script else
            f"lvm {case.argv[0]}", "exit": p.returncode, "message": message,
            "traceback": "Traceback (most recent call last)" in p.stderr,
            "written": written, "seconds": time.time() - t0,
            "ok": p.returncode != 0 and bool(errors) and case.match.lower() in message.lower()
            and "Traceback" not in p.stderr and not written}
