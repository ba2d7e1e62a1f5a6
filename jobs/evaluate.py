"""`lvm evaluate` as a job script: runs locally or through `ray job submit`.

    python jobs/evaluate.py --help
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/evaluate.py ...
"""

import sys

from lvm_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
