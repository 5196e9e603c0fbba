"""transformers' trackio callback with the run's group: its own `trackio.init` passes none."""

from __future__ import annotations

import os

from transformers.integrations import TrackioCallback

from ..core.tracking import GROUP_ENV


class TrackioGroupCallback(TrackioCallback):
    """TrackioCallback whose run is in the group W&B's callback reads (`GROUP_ENV`, which locedit sets per run), so
    that a study's runs are grouped by head family on both dashboards."""

    def setup(self, args, state, model, **kwargs):
        super().setup(args, state, model, **kwargs)
        run = self._trackio.context_vars.current_run.get()
        group = os.environ.get(GROUP_ENV)
        if state.is_world_process_zero and run is not None and group:
            # Read from the run's config when it is first logged (the callback's first log comes after this).
            run.group = group
            run.config["_Group"] = group


def group_trackio_runs(trainer) -> None:
    """Give `trainer` the grouping trackio callback in place of transformers' own (when it reports to trackio)."""
    if any(isinstance(callback, TrackioCallback) for callback in trainer.callback_handler.callbacks):
        trainer.remove_callback(TrackioCallback)
        trainer.add_callback(TrackioGroupCallback)
