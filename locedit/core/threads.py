"""How many threads torch uses on a CPU: the cores this process may use, shared among the launch's processes.

torch's default is every CPU the machine shows, which is wrong in three common cases: a container or Slurm job
whose CPU quota is smaller than the machine (torch starts a thread per visible CPU and they wait on each other), the
processes of an `accelerate launch` or `torchrun` on one machine (each would take every core), and cores another
program is using (threads that wait at every barrier for one that is not scheduled: a tiny training 0.3 s alone,
1.1 s beside one busy process, 0.4 s with one thread). The commands set it once, before torch is imported
(`apply`), and the plans print the choice (`describe`):

- `OMP_NUM_THREADS` when set: the user's (or the launcher's) number, always;
- else the cores this process may use: its CPU affinity (`taskset`, Slurm's binding), capped by the cgroup's CPU
  quota (Docker's `--cpus`, Kubernetes' limits), divided by the processes of the launch on this machine.

Cores that other programs keep busy cannot be seen ahead; on shared cores `OMP_NUM_THREADS=1` is the number to set.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

_chosen: tuple[int, str] | None = None  # what `apply` chose in this process


def cpu_quota(cgroup: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The cgroup's CPU quota in cores (cgroup v2 `cpu.max`, else v1 `cpu.cfs_quota_us`), None when unlimited."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def usable_cores() -> tuple[int, str]:
    """The cores this process may use and where that number comes from."""
    try:
        cores, source = len(os.sched_getaffinity(0)), "of this process's CPU affinity"
    except AttributeError:  # macOS, Windows: no affinity call
        cores, source = os.cpu_count() or 1, "of this machine"
    quota = cpu_quota()
    if quota is not None and math.ceil(quota) < cores:
        cores, source = math.ceil(quota), f"of the cgroup's CPU quota ({quota:g})"
    return cores, source


def launch_processes_here(environ=os.environ) -> int:
    """The processes of the launch on this machine (1 without a launcher)."""
    if int(environ.get("WORLD_SIZE", "1")) <= 1:
        return 1
    return max(1, int(environ.get("LOCAL_WORLD_SIZE") or environ.get("WORLD_SIZE", "1")))


def choose(environ=os.environ) -> tuple[int, str]:
    """The number of threads for this process and why, as one phrase."""
    given = environ.get("OMP_NUM_THREADS", "").strip()
    if given.isdigit() and int(given) > 0:
        return int(given), f"OMP_NUM_THREADS={given}"
    cores, source = usable_cores()
    processes = launch_processes_here(environ)
    threads = max(1, cores // processes)
    reason = f"{cores} core{'s' if cores != 1 else ''} {source}"
    if processes > 1:
        reason += f", shared by the launch's {processes} processes on this machine"
    return threads, reason + "; OMP_NUM_THREADS sets another number"


def apply() -> tuple[int, str]:
    """Set torch's threads for this process (before torch is imported: through OMP_NUM_THREADS, which its child
    processes inherit; after: also torch.set_num_threads). Returns the number and why."""
    global _chosen
    threads, reason = choose()
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    _chosen = (threads, reason)
    return _chosen


def describe() -> str:
    """The plan's line: the threads torch uses here and why (`apply`'s choice, or torch's own number)."""
    if _chosen is not None:
        return f"{_chosen[0]} ({_chosen[1]})"
    torch = sys.modules.get("torch")  # the core never imports torch itself (`lint-imports`)
    if torch is None:
        return f"{choose()[0]} (when torch loads, unless a caller sets another number)"
    return f"{torch.get_num_threads()} (torch's own number: set by the caller, or its default)"
