"""Every serve config validates offline (no Ray cluster): the deploy schema, each autoscaling block
(keys and values, which ServeDeploySchema does not check), each user_config against the
deployment's own model, the app args, and that each import_path imports and builds an app whose
deployments are the ones the config names."""

from pathlib import Path

import pytest
import yaml
from ray._common.utils import import_attr
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import ServeDeploySchema

from lvm_ray.config import from_dict
from lvm_ray.serve.app import model_app_name
from lvm_ray.serve.config import AppArgs, ModelAppArgs, ModelUserConfig, RouterUserConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "serve_configs").glob("*.yaml"))
USER_CONFIGS = {"Router": RouterUserConfig, "Phase2Model": ModelUserConfig,
                "Phase3Model": ModelUserConfig}
# import path -> (its args, the deployments it builds)
HYBRID = {"Router", "Phase2Model", "Phase3Model", "TextEncoder"}
APPS = {"lvm_ray.serve.app:build_app": (AppArgs, HYBRID),
        "lvm_ray.serve.app:build_model_app": (ModelAppArgs, None),
        "lvm_ray.serve.ensemble:build_app": (AppArgs, HYBRID)}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_there_are_configs():
    assert ROOT / "serve_configs" / "hybrid.yaml" in CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_deploy_schema(path):
    raw = load(path)
    cfg = ServeDeploySchema.model_validate(raw)
    assert cfg.applications, "no applications"
    # ServeDeploySchema ignores unknown keys: compare them with its fields ourselves.
    assert set(raw) <= set(ServeDeploySchema.model_fields), set(raw) - set(ServeDeploySchema.model_fields)
    # Loopback by default: no host in the file, and Serve's default (env unset) is loopback.
    assert raw.get("http_options", {}).get("host", "127.0.0.1") == "127.0.0.1"
    assert path.read_text().startswith("# serve run serve_configs/"), "start with the command"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_autoscaling_and_user_configs(path):
    fields = set(AutoscalingConfig.model_fields)
    for app in load(path)["applications"]:
        for dep in app.get("deployments", []):
            block = dep.get("autoscaling_config")
            if block is not None:
                assert set(block) <= fields, f"{dep['name']}: unknown {set(block) - fields}"
                ac = AutoscalingConfig.model_validate(block)
                assert 1 <= ac.min_replicas <= ac.max_replicas, dep["name"]
                assert "num_replicas" not in dep or dep["num_replicas"] == "auto"
            if "user_config" in dep:
                from_dict(USER_CONFIGS[dep["name"]], dep["user_config"])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_fits_two_cores(path):
    """At full scale every replica's CPU reservation fits a 2-core machine."""
    total = 0.0
    for app in load(path)["applications"]:
        for dep in app.get("deployments", []):
            cpus = dep.get("ray_actor_options", {}).get("num_cpus")
            assert cpus is not None and 0 < cpus < 1, f"{dep['name']}: set num_cpus below 1"
            scale = (dep["autoscaling_config"]["max_replicas"] if "autoscaling_config" in dep
                     else dep.get("num_replicas", 1))
            total += cpus * scale
    assert total <= 2.0, total


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_import_path_builds(path, monkeypatch):
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.build_app import build_app

    monkeypatch.setenv("LVM_SESSION_KEY", "k" * 32)  # model apps need the shared key
    apps = load(path)["applications"]
    for app in apps:
        args_cls, expected = APPS[app["import_path"]]
        args = from_dict(args_cls, app.get("args", {}))
        if args_cls is ModelAppArgs:
            expected = {"Phase2Model" if args.model == "phase2" else "Phase3Model"}
        builder = import_attr(app["import_path"])
        built = build_app(call_user_app_builder_with_args_if_necessary(builder, app.get("args", {})),
                          name=app["name"])
        names = {d.name for d in built.deployments}
        if args_cls is AppArgs and args.model_apps is not None:
            expected = {"Router", "TextEncoder"}
            # The router finds each model at the application named for it, route /<name>.
            for model in ("phase2", "phase3"):
                mine = [a for a in apps if a["name"] == model_app_name(args.model_apps, model)]
                assert len(mine) == 1, f"no application {model_app_name(args.model_apps, model)}"
                assert mine[0]["route_prefix"] == "/" + mine[0]["name"]
                assert mine[0]["args"]["model"] == model
        assert names == expected, (app["name"], names)
        assert {d["name"] for d in app.get("deployments", [])} <= names


def test_model_apps_refuse_to_build_without_a_shared_key(monkeypatch):
    from lvm_ray.serve.app import make_app, make_model_app

    monkeypatch.delenv("LVM_SESSION_KEY", raising=False)
    with pytest.raises(ValueError, match="LVM_SESSION_KEY"):
        make_app({"model_apps": "lvm-"})
    with pytest.raises(ValueError, match="LVM_SESSION_KEY"):
        make_model_app({"model": "phase2"})


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_python_deploy_applies_the_same_options(path, monkeypatch):
    """run_config (`lvm serve`) deploys through the Python API: each config block must become
    the same deployment options there."""
    from ray.serve._private.build_app import build_app

    from lvm_ray.serve.deploy import app_from_config

    monkeypatch.setenv("LVM_SESSION_KEY", "k" * 32)
    for app in load(path)["applications"]:
        built = {d.name: d for d in build_app(app_from_config(app), name=app["name"]).deployments}
        for dep in app.get("deployments", []):
            d = built[dep["name"]]
            if "user_config" in dep:
                assert d.user_config == dep["user_config"]
            if "ray_actor_options" in dep:
                assert d.ray_actor_options["num_cpus"] == dep["ray_actor_options"]["num_cpus"]
            if "autoscaling_config" in dep:
                ac = d._deployment_config.autoscaling_config
                assert ac.max_replicas == dep["autoscaling_config"]["max_replicas"]
            if "max_ongoing_requests" in dep:
                assert d.max_ongoing_requests == dep["max_ongoing_requests"]


def test_hybrid_defaults_point_at_the_demo():
    apps = {a["name"]: a["args"] for a in load(ROOT / "serve_configs" / "hybrid.yaml")
            ["applications"]}
    assert apps["lvm"] == {"bank": "data/sotu_demo_bank.parquet", "model_apps": "lvm-"}
    assert apps["lvm-phase2"] == {"model": "phase2", "checkpoint": "runs/demo/phase2/best",
                                  "bank": "data/sotu_demo_bank.parquet", "index": "Flat"}
    assert apps["lvm-phase3"] == {"model": "phase3", "checkpoint": "runs/demo/phase3/best",
                                  "bank": "data/sotu_demo_bank.parquet", "index": "Flat"}
    assert ModelAppArgs() == from_dict(ModelAppArgs, apps["lvm-phase2"])


def test_unknown_keys_are_errors():
    with pytest.raises(ValueError, match="phase2_ckpt"):
        from_dict(AppArgs, {"phase2_ckpt": "x"})
    with pytest.raises(ValueError, match="canary"):
        from_dict(RouterUserConfig, {"canary": 0.5})
    with pytest.raises(ValueError):
        from_dict(RouterUserConfig, {"canary_fraction": 2.0})
    with pytest.raises(ValueError):
        from_dict(ModelUserConfig, {"max_batch_size": 0})


def test_router_user_config_cross_field_rules():
    with pytest.raises(ValueError, match="min_samples"):
        from_dict(RouterUserConfig, {"window": 5, "min_samples": 10})


def test_uri_args_are_fetched_once_into_a_cache(tmp_path):
    from lvm_ray.storage import localize

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "checkpoint.json").write_text("{}")
    (tmp_path / "bank.parquet").write_bytes(b"PAR1")
    cache = tmp_path / "cache"
    local_dir = Path(localize(f"file://{ckpt}", cache=cache))
    local_file = Path(localize(f"file://{tmp_path / 'bank.parquet'}", cache=cache))
    assert local_dir.parent.parent == cache and local_dir.name == "ckpt"
    assert (local_dir / "checkpoint.json").read_text() == "{}"
    assert local_file.read_bytes() == b"PAR1"
    (ckpt / "checkpoint.json").write_text("changed")
    assert localize(f"file://{ckpt}", cache=cache) == str(local_dir)  # cached, not re-copied
    assert (local_dir / "checkpoint.json").read_text() == "{}"
    assert localize(f"file://{ckpt}") == str(ckpt)  # file:// without a cache: in place
    assert localize("relative/x") == str(Path("relative/x").resolve())


def test_serve_default_host_is_loopback_without_the_env_override():
    import subprocess
    import sys

    code = ("from ray.serve.config import HTTPOptions; print(HTTPOptions().host)")
    env = {k: v for k, v in __import__("os").environ.items()
           if k != "RAY_SERVE_DEFAULT_HTTP_HOST"}
    out = subprocess.check_output([sys.executable, "-c", code], env=env, text=True).strip()
    assert out in ("127.0.0.1", "localhost"), out



def test_lvm_serve_starts_ray_with_the_fast_serve_settings(monkeypatch):
    """`lvm serve` puts Serve's throughput-optimized settings in the environment before its local
    Ray starts (the processes Ray starts read them), unless the user set them otherwise."""
    import argparse

    from lvm_ray import cli
    from lvm_ray.serve import deploy

    for k in deploy.FAST_SERVE_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RAY_SERVE_ENABLE_DIRECT_INGRESS", "1")  # a user's own choice wins
    seen = {}
    monkeypatch.setattr(cli, "init_ray", lambda **kw: seen.update(
        {k: __import__("os").environ.get(k) for k in deploy.FAST_SERVE_ENV}))
    monkeypatch.setattr(deploy, "run_config", lambda path, blocking: None)
    cli.cmd_serve(argparse.Namespace(serve_config="serve_configs/hybrid.yaml", address=None,
                                     verbose=False, direct_ingress=False))
    assert seen == {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}
    # Without the user's setting: off unless --direct-ingress (replica ports must be reachable).
    monkeypatch.delenv("RAY_SERVE_ENABLE_DIRECT_INGRESS")
    for flag, want in ((False, "0"), (True, "1")):
        monkeypatch.delenv("RAY_SERVE_ENABLE_DIRECT_INGRESS", raising=False)
        cli.cmd_serve(argparse.Namespace(serve_config="serve_configs/hybrid.yaml", address=None,
                                         verbose=False, direct_ingress=flag))
        assert seen["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == want
