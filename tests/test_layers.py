"""Dependencies inside lvm_ray point one way, down the layers of ../shared/STYLE.md: a module
may import its own layer and the layers below it, never one above, and no import cycle exists.
Imports inside functions count: they hide a cycle, they do not remove it."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "lvm_ray"
# Layer of each top-level name under lvm_ray/ (a package's modules share its layer).
LAYERS = {
    "config": 0, "device": 0, "storage": 0, "console": 0,
    "data": 1,
    "model": 2,
    "eval": 3,
    "train": 4,
    "predictor": 5,
    "distributed": 6,
    "serve": 7,
    "workflows": 8,
    "cli": 9,
}
API = "lvm_ray"  # the package root (its __init__) is the public API: it may import anything


def modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def imports_of(path: Path, known: set[str]) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out |= {n for n in names if n in known}
    return out


def layer(module: str) -> int | None:
    parts = module.split(".")
    if parts == [API]:
        return None
    return LAYERS[parts[1]]


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: {t for t in imports_of(p, set(mods)) if t != m and not m.startswith(t + ".")}
            for m, p in mods.items()}


def test_every_module_has_a_layer():
    unknown = sorted(m for m in modules() if m != API and m.split(".")[1] not in LAYERS)
    assert not unknown, f"modules with no layer in LAYERS (add them deliberately): {unknown}"


def test_no_import_reaches_a_higher_layer():
    upward = []
    for m, targets in graph().items():
        if layer(m) is None:
            continue
        for t in targets:
            if layer(t) is None or layer(t) > layer(m):
                upward.append(f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})")
    assert not upward, "\n".join(sorted(upward))


def test_no_import_cycle():
    g = graph()
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    cycles = []

    def visit(u: str, stack: list[str]) -> None:
        state[u] = 1
        for v in sorted(g[u]):
            if state.get(v) == 1:
                cycles.append(" -> ".join(stack[stack.index(v):] + [v]))
            elif v not in state:
                visit(v, stack + [v])
        state[u] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


@pytest.mark.parametrize("source,bad", [
    ("from lvm_ray.serve.app import build_app\n", "lvm_ray.serve.app"),
    ("def f():\n    import lvm_ray.workflows.train\n", "lvm_ray.workflows.train"),
])
def test_the_checker_sees_top_level_and_function_level_imports(tmp_path, source, bad):
    f = tmp_path / "m.py"
    f.write_text(source)
    assert imports_of(f, set(modules())) == {bad}
