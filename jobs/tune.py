"""Sweep context length x InfoNCE alpha with Ray Tune; val Hit@5 is the objective.

    python jobs/tune.py --smoke-test
    python jobs/tune.py --config configs/tune_demo.yaml
    python jobs/tune.py --config configs/tune_demo.yaml --resume       # after an interruption
    python jobs/tune.py --config configs/tune_demo.yaml --set tune.search=grid --set tune.name=grid
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/tune.py --smoke-test
"""

import argparse
import sys

from lvm_ray.cli import add_config_args
from lvm_ray.config import ConfigError
from lvm_ray.distributed.tune import add_tune_args, run_tune


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jobs/tune.py", description=__doc__.splitlines()[0])
    add_config_args(parser)
    add_tune_args(parser)
    args = parser.parse_args(argv)
    try:
        return run_tune(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"tune: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
