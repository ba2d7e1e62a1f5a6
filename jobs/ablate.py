"""The ablation table (`lvm ablate`) as a job script: one trained checkpoint per row.

    python jobs/ablate.py --config configs/ablations/base.yaml
    python jobs/ablate.py --config configs/ablations/base.yaml --rows base,gru,ctx1000
    python jobs/ablate.py --smoke-test
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/ablate.py --smoke-test
"""

import sys

from lvm_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["ablate", *sys.argv[1:]]))
