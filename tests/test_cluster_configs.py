"""cluster/ and docs/cluster.md, checked offline.

- The cluster launcher config passes Ray's JSON schema and Ray's own preparation (the part of
  `ray up` that runs without cloud credentials: defaults merged, setup commands merged, node types
  filled in, validated again), and keeps its promises: CPU head, autoscaling CPU and GPU workers,
  torch pinned and installed before the project, dashboard on loopback, token auth, shared storage.
- The KubeRay manifests have the fields KubeRay requires, with the types its CRDs take.
- Every job command that a manifest or the docs name exists in jobs/, parses its arguments, and
  its --preset/--set values make a valid config.
- The RayService's serveConfigV2 is serve_configs/hybrid.yaml, verbatim.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
LAUNCHER = REPO / "cluster" / "aws.yaml"
KUBERAY = REPO / "cluster" / "kuberay"
SERVE_CONFIG = REPO / "serve_configs" / "hybrid.yaml"
DOCS = REPO / "docs" / "cluster.md"
SHARED_MOUNT, SHARED_CLAIM = "/mnt/shared", "lvm-shared"


def ray_pin() -> str:
    """'2.60' from pyproject's `ray[...]==2.60.*`."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray,) = [d for d in deps if re.match(r"ray(\[|=)", d)]
    return re.search(r"==\s*([\d.]+?)(\.\*)?$", ray).group(1)


def torch_pin() -> str:
    """'torch==2.13.0' from the Makefile, which installs torch before the project."""
    return re.search(r"^TORCH\s*\?=\s*(\S+)", (REPO / "Makefile").read_text(), re.M).group(1)


# ----------------------------------------------------------------------------- launcher


@pytest.fixture(scope="module")
def launcher() -> dict:
    return yaml.safe_load(LAUNCHER.read_text())


@pytest.fixture(scope="module")
def prepared(launcher) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(copy.deepcopy(launcher))
    validate_config(cfg)  # schema again, head type, min_workers vs max_workers, synced files
    return cfg


def test_launcher_config_matches_rays_schema(launcher):
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(launcher, schema)


def test_launcher_config_passes_rays_preparation(prepared, launcher):
    assert prepared["provider"]["type"] == launcher["provider"]["type"]
    assert set(prepared["available_node_types"]) == set(launcher["available_node_types"])
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0


def test_launcher_cpu_head_and_autoscaling_cpu_and_gpu_workers(prepared):
    types = prepared["available_node_types"]
    head = prepared["head_node_type"]
    assert types[head]["resources"].get("GPU", 0) == 0
    workers = {n: t for n, t in types.items() if n != head}
    gpu = [n for n, t in workers.items() if t["resources"].get("GPU", 0) >= 1]
    cpu = [n for n, t in workers.items()
           if t["resources"].get("GPU", 0) == 0 and t["resources"].get("CPU", 0) >= 1]
    assert gpu and cpu, f"want CPU and GPU worker types, have {workers}"
    for n in gpu + cpu:
        t = workers[n]
        assert 0 <= t["min_workers"] < t["max_workers"] <= prepared["max_workers"], \
            f"{n}: not autoscaling ({t['min_workers']}..{t['max_workers']})"


def _setup_commands(prepared: dict, node_type: str) -> list[str]:
    """What `ray up` runs on a node of this type (after prepare_config merged the lists)."""
    if node_type == prepared["head_node_type"]:
        return prepared["head_setup_commands"]
    t = prepared["available_node_types"][node_type]
    return t.get("worker_setup_commands", prepared["worker_setup_commands"])


def test_launcher_installs_pinned_torch_then_the_project(prepared):
    (mount,) = [remote for remote, local in prepared["file_mounts"].items()
                if (REPO / os.path.expanduser(local)).resolve() == REPO]
    for name, t in prepared["available_node_types"].items():
        cmds = _setup_commands(prepared, name)
        torch_i = [i for i, c in enumerate(cmds) if "pip install" in c and "torch" in c]
        proj_i = [i for i, c in enumerate(cmds) if "pip install" in c and mount in c]
        assert torch_i and proj_i, f"{name}: no torch or project install in {cmds}"
        assert torch_i[0] < proj_i[0], f"{name}: torch must be installed before the project"
        assert torch_pin() in cmds[torch_i[0]].split(), f"{name}: torch not pinned to {torch_pin()}"
        if t["resources"].get("GPU", 0) == 0:
            assert "download.pytorch.org/whl/cpu" in cmds[torch_i[0]], \
                f"{name}: a CPU node would pull torch's CUDA packages"


def test_launcher_images_match_the_pinned_ray(launcher):
    docker = launcher["docker"]
    images = [docker["image"]] + [t["docker"]["worker_image"]
                                  for t in launcher["available_node_types"].values()
                                  if "worker_image" in t.get("docker", {})]
    for image in images:
        m = re.fullmatch(r"rayproject/ray:([\d.]+)-py3(\d+)-(cpu|gpu|cu\d+)", image)
        assert m, f"unexpected image {image}"
        assert m.group(1).startswith(ray_pin() + "."), f"{image}: not Ray {ray_pin()}"
        assert int(m.group(2)) >= 11, f"{image}: the project needs Python >= 3.11"


def test_launcher_dashboard_private_and_token_auth(prepared):
    head_start = " ".join(prepared["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in head_start
    for perm in prepared["provider"].get("security_group", {}).get("IpPermissions", []):
        assert not perm.get("FromPort", 0) <= 8265 <= perm.get("ToPort", -1), \
            "the security group must not open the dashboard port"
    for cmds in (prepared["head_start_ray_commands"], prepared["worker_start_ray_commands"]):
        (start,) = [c for c in cmds if "ray start" in c]
        assert "RAY_AUTH_MODE=token" in start
    assert "~/.ray/auth_token" in prepared["file_mounts"]


def test_launcher_mounts_shared_storage_on_every_node(prepared):
    assert any(f"{SHARED_MOUNT}:{SHARED_MOUNT}" in o for o in prepared["docker"]["run_options"])
    assert any("mount -t nfs4" in c and SHARED_MOUNT in c
               for c in prepared["initialization_commands"])


# ----------------------------------------------------------------------------- KubeRay


def manifest(name: str, kind: str) -> dict:
    docs = [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d]
    (doc,) = [d for d in docs if d.get("kind") == kind]
    return doc


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _str_map_problems(m, where: str) -> list[str]:
    if not isinstance(m, dict):
        return [f"{where}: expected a mapping"]
    return [f"{where}.{k}: {v!r} must be a string (map[string]string)"
            for k, v in m.items() if not isinstance(k, str) or not isinstance(v, str)]


def pod_template_problems(tpl, where: str) -> list[str]:
    if not isinstance(tpl, dict) or not isinstance(tpl.get("spec"), dict):
        return [f"{where}: a pod template with a spec is required"]
    spec = tpl["spec"]
    containers = spec.get("containers")
    if not isinstance(containers, list) or not containers:
        return [f"{where}.spec.containers: a non-empty list is required"]
    problems = []
    volumes = {v.get("name"): v for v in spec.get("volumes", [])}
    for i, c in enumerate(containers):
        at = f"{where}.spec.containers[{i}]"
        for key in ("name", "image"):
            if not isinstance(c.get(key), str) or not c[key]:
                problems.append(f"{at}.{key}: a string is required")
        for kind, quantities in (c.get("resources") or {}).items():
            for res, q in quantities.items():
                if not isinstance(q, (str, int, float)) or isinstance(q, bool):
                    problems.append(f"{at}.resources.{kind}.{res}: {q!r} is not a quantity")
        mounts = {m.get("mountPath"): m.get("name") for m in c.get("volumeMounts", [])}
        for path, vol in mounts.items():
            if vol not in volumes:
                problems.append(f"{at}: volumeMount {path} names no volume {vol!r}")
        claim = (volumes.get(mounts.get(SHARED_MOUNT)) or {}).get("persistentVolumeClaim", {})
        if claim.get("claimName") != SHARED_CLAIM:
            problems.append(f"{at}: {SHARED_MOUNT} must be the {SHARED_CLAIM} claim")
    return problems


def cluster_spec_problems(spec, where: str) -> list[str]:
    """RayClusterSpec: what KubeRay requires and what this project promises (private dashboard,
    token auth, the Ray version of pyproject, shared storage on every pod)."""
    if not isinstance(spec, dict):
        return [f"{where}: expected a mapping"]
    problems = []
    version = spec.get("rayVersion")
    if not isinstance(version, str) or not version.startswith(ray_pin() + "."):
        problems.append(f"{where}.rayVersion: {version!r} is not Ray {ray_pin()} (a string)")
    if (spec.get("authOptions") or {}).get("mode") != "token":
        problems.append(f"{where}.authOptions.mode: token auth is required")
    head = spec.get("headGroupSpec")
    if not isinstance(head, dict):
        return problems + [f"{where}.headGroupSpec: required"]
    if head.get("serviceType", "ClusterIP") != "ClusterIP" or head.get("enableIngress"):
        problems.append(f"{where}.headGroupSpec: the dashboard must not be exposed")
    problems += _str_map_problems(head.get("rayStartParams", {}), f"{where}.headGroupSpec"
                                  ".rayStartParams")
    problems += pod_template_problems(head.get("template"), f"{where}.headGroupSpec.template")
    groups = spec.get("workerGroupSpecs", [])
    if not isinstance(groups, list):
        return problems + [f"{where}.workerGroupSpecs: expected a list"]
    names = [g.get("groupName") for g in groups]
    if len(set(names)) != len(names):
        problems.append(f"{where}.workerGroupSpecs: duplicate groupName")
    for i, g in enumerate(groups):
        at = f"{where}.workerGroupSpecs[{i}]"
        if not isinstance(g.get("groupName"), str) or not g["groupName"]:
            problems.append(f"{at}.groupName: a string is required")
        lo, hi = g.get("minReplicas"), g.get("maxReplicas")
        n = g.get("replicas", lo)
        if not (_is_int(lo) and _is_int(hi) and _is_int(n) and 0 <= lo <= n <= hi):
            problems.append(f"{at}: need integers 0 <= minReplicas <= replicas <= maxReplicas, "
                            f"got {lo!r}, {n!r}, {hi!r}")
        problems += _str_map_problems(g.get("rayStartParams", {}), f"{at}.rayStartParams")
        problems += pod_template_problems(g.get("template"), f"{at}.template")
    return problems


def resource_problems(doc: dict, kind: str) -> list[str]:
    problems = []
    if doc.get("apiVersion") != "ray.io/v1" or doc.get("kind") != kind:
        problems.append(f"want apiVersion ray.io/v1, kind {kind}")
    name = (doc.get("metadata") or {}).get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name):
        problems.append(f"metadata.name {name!r} is not a DNS-1123 label")
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        return problems + ["spec: required"]
    if kind == "RayCluster":
        problems += cluster_spec_problems(spec, "spec")
    elif kind == "RayJob":
        if not isinstance(spec.get("entrypoint"), str) or not spec["entrypoint"].strip():
            problems.append("spec.entrypoint: a command string is required")
        if ("rayClusterSpec" in spec) == ("clusterSelector" in spec):
            problems.append("spec: exactly one of rayClusterSpec and clusterSelector")
        if "rayClusterSpec" in spec:
            problems += cluster_spec_problems(spec["rayClusterSpec"], "spec.rayClusterSpec")
        if "clusterSelector" in spec:
            problems += _str_map_problems(spec["clusterSelector"], "spec.clusterSelector")
        if "runtimeEnvYAML" in spec and not (isinstance(spec["runtimeEnvYAML"], str) and
                                             isinstance(yaml.safe_load(spec["runtimeEnvYAML"]),
                                                        dict)):
            problems.append("spec.runtimeEnvYAML: a string holding a YAML mapping is required")
        for key in ("ttlSecondsAfterFinished", "activeDeadlineSeconds", "backoffLimit"):
            if key in spec and not (_is_int(spec[key]) and spec[key] >= 0):
                problems.append(f"spec.{key}: a non-negative integer is required")
        if not isinstance(spec.get("shutdownAfterJobFinishes", False), bool):
            problems.append("spec.shutdownAfterJobFinishes: a boolean is required")
    elif kind == "RayService":
        problems += cluster_spec_problems(spec.get("rayClusterConfig"), "spec.rayClusterConfig")
        if not isinstance(spec.get("serveConfigV2"), str):
            problems.append("spec.serveConfigV2: a string holding the Serve config is required")
    return problems


MANIFESTS = [("raycluster.yaml", "RayCluster"), ("rayjob-train.yaml", "RayJob"),
             ("rayjob-tune.yaml", "RayJob"), ("rayservice.yaml", "RayService")]


@pytest.mark.parametrize("name,kind", MANIFESTS)
def test_kuberay_manifest_fields_and_types(name, kind):
    assert resource_problems(manifest(name, kind), kind) == []


def test_kuberay_checks_catch_broken_manifests():
    good = manifest("rayjob-train.yaml", "RayJob")
    assert resource_problems(good, "RayJob") == []
    breakages = {
        "int rayStartParams": lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]
        ["rayStartParams"].update({"num-cpus": 0}),
        "no head template": lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]
        .pop("template"),
        "selector and spec": lambda d: d["spec"].update(clusterSelector={"ray.io/cluster": "x"}),
        "no entrypoint": lambda d: d["spec"].pop("entrypoint"),
        "min > max": lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
        .update(minReplicas=3),
        "public dashboard": lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]
        .update(serviceType="LoadBalancer"),
        "no shared volume": lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
        ["spec"]["containers"][0].pop("volumeMounts"),
    }
    for what, breakage in breakages.items():
        doc = copy.deepcopy(good)
        breakage(doc)
        assert resource_problems(doc, "RayJob"), f"{what} went unnoticed"


def test_raycluster_autoscales_cpu_and_gpu_groups_and_creates_the_shared_claim():
    spec = manifest("raycluster.yaml", "RayCluster")["spec"]
    assert spec.get("enableInTreeAutoscaling") is True
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu = [n for n, g in groups.items()
           if any("nvidia.com/gpu" in (c.get("resources") or {}).get("limits", {})
                  for c in g["template"]["spec"]["containers"])]
    assert gpu and len(gpu) < len(groups), "want both CPU and GPU worker groups"
    assert all(g["minReplicas"] < g["maxReplicas"] for g in groups.values())
    claim = manifest("raycluster.yaml", "PersistentVolumeClaim")
    assert claim["metadata"]["name"] == SHARED_CLAIM
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


def test_tune_rayjob_selects_the_raycluster():
    cluster = manifest("raycluster.yaml", "RayCluster")["metadata"]["name"]
    assert manifest("rayjob-tune.yaml", "RayJob")["spec"]["clusterSelector"] == {
        "ray.io/cluster": cluster}


def test_rayservice_serve_config_is_a_serve_deploy_config():
    from ray.serve.schema import ServeDeploySchema

    text = manifest("rayservice.yaml", "RayService")["spec"]["serveConfigV2"]
    config = ServeDeploySchema.model_validate(yaml.safe_load(text))
    assert config.applications and all(app.import_path for app in config.applications)


def test_rayservice_serve_config_is_hybrid_yaml_verbatim():
    serve_config = manifest("rayservice.yaml", "RayService")["spec"]["serveConfigV2"]
    assert serve_config == SERVE_CONFIG.read_text(), \
        "rayservice.yaml drifted from serve_configs/hybrid.yaml: python cluster/sync_rayservice.py"


def _sync_module():
    spec = importlib.util.spec_from_file_location("sync_rayservice",
                                                  REPO / "cluster" / "sync_rayservice.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("content", [
    "applications: []\n", "no newline at the end", "two\n\n\n", "  leading: spaces\nx: 1\n",
    "# comment\n\napplications:\n  - name: a\n\n    import_path: m:app  \n", "", "tab\tin it\n",
    "carriage\r\nreturns\r\n", "unicode: é ✓\n",
])
def test_sync_rayservice_writes_any_serve_config_verbatim(content):
    sync = _sync_module()
    original = sync.RAYSERVICE.read_text()
    updated = sync.replace_block(original, content)
    assert sync._serve_config(updated) == content
    assert sync._rest(updated) == sync._rest(original)  # nothing else changed
    assert sync.replace_block(updated, sync._serve_config(original)) == original


# ----------------------------------------------------------------------------- job commands


def job_commands() -> list[tuple[str, list[str]]]:
    """(where, ["python", "jobs/X.py", args...]) for every job command in the RayJobs and in
    docs/cluster.md's code blocks."""
    found = []
    for name in ("rayjob-train.yaml", "rayjob-tune.yaml"):
        found.append((name, shlex.split(manifest(name, "RayJob")["spec"]["entrypoint"])))
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", DOCS.read_text(), re.S)
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            if "python jobs/" in line:
                argv = shlex.split(line[line.index("python jobs/"):], comments=True)
                found.append((DOCS.name, argv))
    return found


JOB_COMMANDS = job_commands()


def test_every_job_script_is_used_somewhere():
    used = {argv[1] for _, argv in JOB_COMMANDS}
    assert {"jobs/train.py", "jobs/tune.py", "jobs/ingest.py", "jobs/evaluate.py"} <= used


def _config_problem(script: str, args: list[str]) -> str | None:
    """Load the config the command's --config/--preset/--set/--smoke-test make, without running
    anything: unknown keys and wrong types are errors."""
    from lvm_ray.cli import add_config_args, config_from_args
    from lvm_ray.config import ConfigError

    parser = argparse.ArgumentParser(add_help=False)
    add_config_args(parser)
    parser.add_argument("--name")
    ns, _ = parser.parse_known_args(args)
    if ns.config and not os.path.isabs(ns.config):
        ns.config = str(REPO / ns.config)
    try:
        config_from_args(ns, {"tune": {"name": ns.name}} if ns.name else None)
    except ConfigError as e:
        return str(e)
    return None


@pytest.mark.parametrize("where,argv", JOB_COMMANDS,
                         ids=[f"{w}:{' '.join(a[1:4])}" for w, a in JOB_COMMANDS])
def test_job_command_exists_and_parses(where, argv):
    assert argv[0] == "python" and argv[1].startswith("jobs/"), f"{where}: {argv}"
    script, args = argv[1], argv[2:]
    assert (REPO / script).is_file(), f"{where} names {script}, which does not exist"
    # argparse reads every option up to the final --help (types included), then prints help.
    env = dict(os.environ, HF_HUB_OFFLINE="1", RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, script, *args, "--help"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, f"{where}: {' '.join(argv)}\n{out.stdout}\n{out.stderr}"
    flags = {a.split("=", 1)[0] for a in args if a.startswith("--")}
    unknown = sorted(f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])",
                                                       out.stdout))
    assert not unknown, f"{where}: {script} does not take {unknown}"
    assert _config_problem(script, args) is None, f"{where}: {_config_problem(script, args)}"
