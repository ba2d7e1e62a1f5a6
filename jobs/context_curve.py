"""`lvm context-curve` as a job script: runs locally or through `ray job submit`.

    python jobs/context_curve.py --help
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/context_curve.py ...
"""

import sys

from lvm_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["context-curve", *sys.argv[1:]]))
