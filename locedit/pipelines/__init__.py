"""Pipelines: the stages put together (train then evaluate, ITI run directories, the study, sweeps)."""
