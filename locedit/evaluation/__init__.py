"""Evaluation: generations judged for truth and informativeness, MC1/MC2, KL and cross-entropy on held-out text.

Its names load on first use (`locedit.core.lazy`): importing one module of the package loads no other.
"""

from ..core.lazy import lazy_exports

# Public name -> the module that defines it.
_EXPORTS = {
    "EvalPlan": ".plan",
    "EvalResources": ".plan",
    "MAIN": ".metric_registry",
    "Metric": ".metric_registry",
    "Target": ".plan",
    "all_metrics": ".metric_registry",
    "check_settings": ".plan",
    "evaluate": ".run",
    "evaluate_after_training": ".run",
    "evaluate_model": ".run",
    "get_metric": ".metric_registry",
    "plan_evaluation": ".plan",
    "preference_data": ".plan",
    "register_metric": ".metric_registry",
    "run_evaluation": ".run",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
