"""Train (Ray Train), then evaluate the best checkpoint on test against the baselines.

    python jobs/train.py --preset small --preset phase2
    python jobs/train.py --smoke-test
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/train.py --smoke-test
"""

import sys

from lvm_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
