"""The main job on the embedded corpus (what `make demo` runs).

    python jobs/demo.py            # about 10 minutes on 2 cores after set-up
    python jobs/demo.py --quick    # a smaller subset, a few minutes
"""

import sys

from lvm_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
