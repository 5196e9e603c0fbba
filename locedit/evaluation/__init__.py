"""Evaluation: generations judged for truth and informativeness, MC1/MC2, KL and cross-entropy on held-out text."""

from .plan import EvalPlan, EvalResources, Target, check_settings, plan_evaluation
from .run import evaluate, evaluate_after_training, evaluate_model, run_evaluation

__all__ = [
    "EvalPlan",
    "EvalResources",
    "Target",
    "check_settings",
    "evaluate",
    "evaluate_after_training",
    "evaluate_model",
    "plan_evaluation",
    "run_evaluation",
]
