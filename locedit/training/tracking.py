"""transformers' trackio and W&B callbacks with the run's group, which their own `init` calls do not pass."""

from __future__ import annotations

import functools
import os

from ..core.tracking import GROUP_ENV


@functools.cache
def grouping_callbacks() -> dict[type, type]:
    """transformers' reporting callbacks -> locedit's, which put the run in its group (`GROUP_ENV`, set per run).
    Made on first use: importing transformers' integrations changes warning filters and loggers, which importing
    locedit must not."""
    from transformers.integrations import TrackioCallback, WandbCallback

    class TrackioGroupCallback(TrackioCallback):
        """TrackioCallback whose run is in the run's group, so that a study's runs are grouped by head family."""

        def setup(self, args, state, model, **kwargs):
            super().setup(args, state, model, **kwargs)
            run = self._trackio.context_vars.current_run.get()
            group = os.environ.get(GROUP_ENV)
            if state.is_world_process_zero and run is not None and group:
                # Read from the run's config when it is first logged (the callback's first log comes after this).
                run.group = group
                run.config["_Group"] = group

    class WandbGroupCallback(WandbCallback):
        """WandbCallback whose run is in the run's group: the run is started here with it, and the callback logs to
        it (it starts one only when none is running). wandb reads WANDB_RUN_GROUP once per process, so the second
        run of a study would otherwise be in the first one's group, or none."""

        def setup(self, args, state, model, **kwargs):
            if state.is_world_process_zero and self._wandb is not None and self._wandb.run is None:
                self._wandb.init(
                    project=os.getenv("WANDB_PROJECT", "huggingface"),
                    group=os.environ.get(GROUP_ENV),
                    name=args.run_name,
                    job_type="train",
                )
            super().setup(args, state, model, **kwargs)

    return {TrackioCallback: TrackioGroupCallback, WandbCallback: WandbGroupCallback}


def group_tracked_runs(trainer) -> None:
    """Give `trainer` the grouping callbacks in place of transformers' own (for the trackers it reports to)."""
    reporting = {type(callback) for callback in trainer.callback_handler.callbacks}
    if not {"TrackioCallback", "WandbCallback"} & {kind.__name__ for kind in reporting}:
        return  # nothing reported: transformers' integrations stay unimported
    for theirs, ours in grouping_callbacks().items():
        if theirs in reporting:
            trainer.remove_callback(theirs)
            trainer.add_callback(ours)
