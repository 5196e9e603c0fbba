"""The processes of an `accelerate launch`: each stage that spreads its work takes this process's share here, and
waits for the others here.

    accelerate launch --num_processes 8 -m locedit.study recipes/single_head.yaml

Under the launcher (WORLD_SIZE > 1) the process group is accelerate's `PartialState` (NCCL on GPUs, gloo on CPUs;
`state()` makes it, and every part of locedit takes it from there); in a plain process every call but `state()` is
the single-process case and imports nothing. On CPUs, `accelerate launch --multi_gpu --num_processes N` (or `torchrun
--nproc_per_node N`) starts N processes; `accelerate launch --cpu` starts one. Work is shared round robin by
position (`share`), so neighbouring items, often alike in cost, go to different processes, and results come back in
position order on every process (`gather`), exactly as one process would have made them. A file is written by one
process only: the one whose share made it, or the main process (`is_main`), while the others wait
(`wait_for_everyone`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")

# What a launcher sets for each process of a group; a child process started without them runs alone.
LAUNCHER_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_NAME",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "ACCELERATE_USE_DEEPSPEED",
    "ACCELERATE_USE_FSDP",
)


def count() -> int:
    """How many processes the launcher started (1 without one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def state():
    """accelerate's `PartialState` of this process, made here first: on a machine without a GPU, accelerate joins
    the processes of a launch into one (gloo) group only when told `cpu` (else each process thinks it is alone)."""
    import torch
    from accelerate import PartialState

    cpu = not torch.cuda.is_available()
    if cpu and count() > 1:
        # transformers' training arguments make the state again, as CPU processes only when this says so.
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    return PartialState(cpu=cpu)


def index() -> int:
    return state().process_index if count() > 1 else 0


def is_main() -> bool:
    return index() == 0


def wait_for_everyone() -> None:
    if count() > 1:
        state().wait_for_everyone()


def end_launch() -> None:
    """The end of a command under a launch: every process done with the group, then the group destroyed.

    Not `Trainer.end()`: that destroys the group at once, on each process alone, and the DDP model's reducer then
    holds its last reference. Freed with the trainer, the reducer destroys the gloo group on the main thread, which
    holds the GIL and joins the group's worker thread, while that thread still waits for the GIL to release the
    tensors of the last all-gather: the process never exits (rank 1 of a 2-process training, 3 times in 5 here).
    After a barrier and a moment without the GIL, the workers are idle and the group goes without waiting on them.
    """
    if count() == 1:
        return
    import time

    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        time.sleep(0.1)  # the GIL released: a worker thread finishing the last collective's work can take it
        dist.destroy_process_group()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """The main process runs the block first (say, building a cached model), the others after it (finding it)."""
    if count() == 1:
        yield
        return
    with state().main_process_first():
        yield


def share(items: Sequence[T]) -> list[tuple[int, T]]:
    """This process's share of `items` with their positions: every count()-th item from position index()."""
    processes, mine = count(), index()
    return [(position, item) for position, item in enumerate(items) if position % processes == mine]


def gather(pairs: list[tuple[int, T]]) -> list[T]:
    """Every process's (position, value) pairs, as one list in position order, on every process."""
    if count() > 1:
        from accelerate.utils import gather_object

        pairs = gather_object(list(pairs))
    return [value for _, value in sorted(pairs, key=lambda pair: pair[0])]


def solo_environment() -> dict[str, str]:
    """The environment for a child process that runs alone, on this process's device: without the launcher's
    variables, and with CUDA_VISIBLE_DEVICES narrowed to this process's GPU (when there is one)."""
    env = {key: value for key, value in os.environ.items() if key not in LAUNCHER_VARIABLES}
    if count() > 1:
        device = state().device
        if device.type == "cuda":
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            ids = visible.split(",") if visible else [str(i) for i in range(device.index + 1)]
            env["CUDA_VISIBLE_DEVICES"] = ids[device.index]
    return env


def can_run_alone_here() -> bool:
    """Whether `alone()` can run work as a single process inside this one: on CPUs. On GPUs transformers' single
    process takes every visible GPU (cuda:0 and DataParallel), so work alone there goes to a child process on this
    process's GPU (`solo_environment`)."""
    import torch

    return not torch.cuda.is_available()


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Within the block this process of a launch works as a process started alone (accelerate's state and the
    launcher's variables of one process; the launch's process group is kept, unused, for after): a study's
    training runs make exactly the edits of one process, without a fresh interpreter per run. On CPUs only
    (`can_run_alone_here`); outside a launch it changes nothing."""
    if count() == 1:
        yield
        return
    import logging

    from accelerate.state import AcceleratorState, PartialState

    state()  # the launch's state exists before it is put aside
    saved_env = {key: os.environ.pop(key) for key in (*LAUNCHER_VARIABLES, "FORK_LAUNCHED") if key in os.environ}
    # accelerate's own switch that keeps the process group when a run ends (`trainer.end()` would destroy the
    # launch's group, which is still this process's).
    os.environ["FORK_LAUNCHED"] = "1"
    saved = dict(PartialState._shared_state), dict(AcceleratorState._shared_state)
    AcceleratorState._reset_state(reset_partial_state=True)
    # transformers warns that a process group exists while training runs as one process: here that is the point.
    quiet = _DropMessage("torch.distributed process group is initialized")
    logger = logging.getLogger("transformers.training_args")
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)
        os.environ.pop("FORK_LAUNCHED")
        AcceleratorState._reset_state(reset_partial_state=True)
        PartialState._shared_state.update(saved[0])
        AcceleratorState._shared_state.update(saved[1])
        os.environ.update(saved_env)


class _DropMessage:
    """A logging filter that drops records whose message starts with `prefix`."""

    def __init__(self, prefix: str):
        self.prefix = prefix

    def filter(self, record) -> bool:
        return not str(record.getMessage()).startswith(self.prefix)


def die_with_parent():
    """A preexec_fn that makes a child process receive SIGTERM when its parent dies (Linux's PR_SET_PDEATHSIG), else
    None: a sweep's runs, a study's training runs, never left running on when what started them is killed.

    Only the prctl call runs in the child, prepared here, as preexec_fn must not take locks (a sweep has threads).
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    set_parent_death_signal, sigterm = 1, int(signal.SIGTERM)
    return lambda: prctl(set_parent_death_signal, sigterm)
