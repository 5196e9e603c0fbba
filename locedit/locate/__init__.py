"""Locate: score every head for the behaviour and rank the heads: ITI's probes (`probe:K`) and gradient head
importance under the IPO loss (`importance:K`), each a `Locator` of `LOCATORS`."""

from .activations import ProbeExamples, build_probe_examples, collect_head_activations
from .importance import ImportanceResult, gate_importance, run_importance_stage
from .locators import LOCATORS, Locator, register_locator
from .probes import (
    ProbeResult,
    compute_probe_result,
    fit_logistic_probes,
    load_probe_result,
    mass_mean_directions,
    probe_accuracy,
)
from .stage import ProbeStage, find_probe_result, make_probe_stage, probe_recipe, run_probe_stage

__all__ = [
    "LOCATORS",
    "ImportanceResult",
    "Locator",
    "gate_importance",
    "register_locator",
    "run_importance_stage",
    "ProbeExamples",
    "ProbeResult",
    "ProbeStage",
    "build_probe_examples",
    "collect_head_activations",
    "compute_probe_result",
    "find_probe_result",
    "fit_logistic_probes",
    "load_probe_result",
    "make_probe_stage",
    "mass_mean_directions",
    "probe_accuracy",
    "probe_recipe",
    "run_probe_stage",
]
