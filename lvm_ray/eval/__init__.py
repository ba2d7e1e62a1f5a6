"""Evaluation as ../shared/EVAL_PROTOCOL.md defines it: metrics, baselines, reports.

report.py imports matplotlib, so it is not re-exported here; import lvm_ray.eval.report directly.
"""

from lvm_ray.eval.baselines import (ContextMean, CopyLast, Ridge, evaluate_baselines,
                                    fit_baselines)
from lvm_ray.eval.metrics import (bank_ranks, bank_ranks_for_windows, evaluate, evaluate_detailed,
                                  select_key, select_score)

__all__ = ["ContextMean", "CopyLast", "Ridge", "bank_ranks", "bank_ranks_for_windows",
           "evaluate", "evaluate_baselines", "evaluate_detailed", "fit_baselines", "select_key",
           "select_score"]
