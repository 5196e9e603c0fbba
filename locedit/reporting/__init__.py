"""Reporting: the table, the paper's figures and the verdict (p-values, bootstrap) from evaluated runs."""

from .report import check_metric, default_metric, scoring_metrics, write_report
from .runs import SETTINGS, Run, find_runs, read_run
from .stats import best_per_head_set, paired_bootstrap, permutation_p_value, verdict

__all__ = [
    "SETTINGS",
    "Run",
    "best_per_head_set",
    "check_metric",
    "default_metric",
    "find_runs",
    "paired_bootstrap",
    "permutation_p_value",
    "read_run",
    "scoring_metrics",
    "verdict",
    "write_report",
]
