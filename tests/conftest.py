"""Shared fixtures. Ray tests share ONE session-scoped local Ray (RAY_NOTES: ~4 s to start)."""

import os
from pathlib import Path

# Ray's worker processes inherit this: Serve replicas import harness.faults from the checkout.
_ROOT = str(Path(__file__).resolve().parents[1])
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=512 * 1024**2,
                 log_to_driver=False)
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:  # noqa: BLE001  Serve may never have started
        pass
    ray.shutdown()


@pytest.fixture(scope="session")
def experiment_script():
    """Load scripts/experiments/NAME.py as a module (the scripts are not a package)."""
    import importlib.util

    def load(name: str):
        spec = importlib.util.spec_from_file_location(
            name, Path(_ROOT) / "scripts" / "experiments" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load


@pytest.fixture(scope="session")
def synthetic_bank():
    from lvm_ray.data.synthetic import make_synthetic_bank

    return make_synthetic_bank(n_docs=40, doc_len=(60, 100), dim=32, seed=0)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Serve test assets (harness.service.make_assets): a 32-d bank with a text encoder and
    three random-init checkpoints."""
    from harness.service import make_assets

    return make_assets(tmp_path_factory.mktemp("serve"))
