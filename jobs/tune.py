"""Sweep context length x InfoNCE alpha with Ray Tune; val Hit@5 is the objective.

    python jobs/tune.py --smoke-test
    python jobs/tune.py --config configs/tune_demo.yaml
    python jobs/tune.py --config configs/tune_demo.yaml --resume       # after an interruption
    python jobs/tune.py --config configs/tune_demo.yaml --set tune.search=grid --set tune.name=grid
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/tune.py --smoke-test
"""

import sys

from lvm_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
