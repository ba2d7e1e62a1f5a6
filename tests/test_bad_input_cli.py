"""Malformed corpora and configs through `lvm` and the job scripts: each is a non-zero exit with
one line naming the problem, never a traceback, and nothing is written (no partial bank,
checkpoint or report). The cases are bench/reliability.py's, which also runs each as its own
process for RELIABILITY.md; here the CLI cases run in-process (fast) and the job scripts as
processes. A malformed job submitted with `ray job submit` is in test_job_submit.py.
"""

import contextlib
import io

import pytest

from harness.cli_cases import cli_cases, files_under, run_cli_case
from lvm_ray import cli


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad_input")
    return tmp, cli_cases(tmp)


def test_there_are_at_least_ten_cases_of_each_kind(cases):
    _, cs = cases
    kinds = [c.kind for c in cs]
    assert kinds.count("config") >= 10 and kinds.count("data") >= 10, kinds
    assert set(kinds) == {"config", "data"}
    assert sum(c.script is not None for c in cs) >= 2
    assert len({c.name for c in cs}) == len(cs)


def _in_process(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as e:  # argparse's own usage errors
            code = e.code
    return code, err.getvalue()


def test_every_malformed_input_is_one_clear_line_and_writes_nothing(cases, monkeypatch):
    tmp, cs = cases
    monkeypatch.chdir(tmp)
    out = tmp / "out"
    failures = []
    for c in cs:
        argv = c.argv if c.script is None else [c.script.removesuffix(".py"), *c.argv]
        code, stderr = _in_process(argv)  # an uncaught exception fails the test here
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith(f"lvm {argv[0]}: error: ")]
        problems = []
        if code == 0:
            problems.append("exit 0")
        if len(errors) != 1:
            problems.append(f"{len(errors)} error lines")
        elif c.match.lower() not in errors[0].lower():
            problems.append(f"message {errors[0]!r} does not mention {c.match!r}")
        if "Traceback" in stderr:
            problems.append("traceback")
        if files_under(out):
            problems.append(f"wrote {files_under(out)}")
        if problems:
            failures.append(f"{c.name}: {'; '.join(problems)}")
    assert not failures, "\n".join(failures)
    assert not [p for p in tmp.rglob("*") if ".tmp" in p.name], "temporary files left behind"


def test_job_scripts_exit_non_zero_with_one_line(cases):
    tmp, cs = cases
    for c in [c for c in cs if c.script is not None]:
        r = run_cli_case(c, tmp)
        assert r["ok"], r
        assert r["exit"] == 2 and r["message"].startswith("lvm ")
