"""Evaluation: generations judged for truth and informativeness, MC1/MC2, KL and cross-entropy on held-out text."""

from .metric_registry import MAIN, Metric, all_metrics, get_metric, register_metric
from .plan import EvalPlan, EvalResources, Target, check_settings, plan_evaluation
from .run import evaluate, evaluate_after_training, evaluate_model, run_evaluation

__all__ = [
    "EvalPlan",
    "EvalResources",
    "MAIN",
    "Metric",
    "Target",
    "all_metrics",
    "check_settings",
    "evaluate",
    "evaluate_after_training",
    "evaluate_model",
    "get_metric",
    "plan_evaluation",
    "register_metric",
    "run_evaluation",
]
