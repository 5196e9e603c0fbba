"""Locate: probe every head for the behaviour (ITI's localization heuristic) and rank the heads."""

from .activations import ProbeExamples, build_probe_examples, collect_head_activations
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
