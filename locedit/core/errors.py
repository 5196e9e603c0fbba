"""Every mistake a user can make is a `LocEditError` whose message is one line; `run_cli` prints it as such.

The subclasses say which stage found the mistake; commands never need to know them all, only the root.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable

from . import threads
from .disk import disk_full_problem


class LocEditError(ValueError):
    """A user's mistake (recipe, data, heads, model, judge, ...); the message is one line meant for the user."""


class RecipeError(LocEditError):
    """A recipe that cannot run."""


class DataError(LocEditError):
    """A problem with the user's data or data settings."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A local data file that does not exist (both a `DataError` and a `FileNotFoundError`)."""


class HeadSpecError(LocEditError):
    """A head selection (or model) that cannot be resolved."""


class EditLoadError(LocEditError):
    """A saved edit that does not fit the model it is loaded onto."""


class JudgeError(RecipeError):
    """A judge that cannot be used (not a causal LM, endpoint unreachable or unauthorised)."""


class DamagedFileError(LocEditError):
    """A file locedit reads and did not just write that is cut short, unparsable or holds unusable values."""


class ProbeResultError(RecipeError):
    """A probe result that is missing, unreadable, or made for another model."""


class DamagedResultError(ProbeResultError, DamagedFileError):
    """A saved probe or importance result that is cut short, unreadable or fails its checksum; `problem` says how.
    The stage that made it computes it again; one given by name is this one line."""

    def __init__(self, message: str, problem: str = ""):
        super().__init__(message)
        self.problem = problem or message


class DamagedCacheWarning(UserWarning):
    """A cached result found damaged (cut short, unreadable, failing its checksum) and computed again."""


def say_damaged(what: str, problem: str, again: str = "computing it again") -> None:
    """The one line for a damaged cache entry that is computed again: `locedit: the cached WHAT is damaged
    (PROBLEM); AGAIN` under the commands, said once per process however often the entry is looked at."""
    warnings.warn(f"the cached {what} is damaged ({problem}); {again}", DamagedCacheWarning, stacklevel=3)


# What a user's mistake raises: locedit's own errors, and a file named on the command line that does not exist.
USER_ERRORS = (LocEditError, FileNotFoundError)


def quiet_library_notices() -> None:
    """What the libraries print that a locedit user cannot act on, silenced for the commands (never on import)."""
    # bitsandbytes warns on import on CPUs without its optional `kernels` package; locedit never runs 4-bit on a CPU.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # With `kernels` installed (bitsandbytes 0.50 pulls it in), its offline notice comes with that same import.
    logging.getLogger("kernels._internals.hf_hub").addFilter(
        lambda record: not record.getMessage().startswith("Skipping publisher trust check")
    )
    # PEFT and TRL still read transformers' deprecated `is_gradient_checkpointing`, once per model wrap: it buried
    # every stage's output of the study under repeats.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


_said: set[str] = set()


def format_locedit_warning(message, category, filename, lineno, line=None) -> str:
    """`warnings.formatwarning` for the commands: a warning of locedit's own (data cleaned, ...) is one line `locedit:
    MESSAGE`, said once per process however often the data is read (a study's dry run reads it once per stage),
    without Python's file, line and source line; any other library's warning is formatted as Python formats it.
    (Formatting, not showing, is replaced: whatever records warnings, as a test runner does, still sees them all.)"""
    if not category.__module__.startswith("locedit."):
        return _formatted_before[0](message, category, filename, lineno, line)
    text = f"locedit: {message}"
    if text in _said:
        return ""
    _said.add(text)
    return text + "\n"


# How warnings were formatted before the commands' format took over (Python's own, or another's).
_formatted_before = [warnings.formatwarning]


def format_warnings_as_lines() -> None:
    """Make the commands format locedit's warnings as `format_locedit_warning` does (others as they were)."""
    if warnings.formatwarning is not format_locedit_warning:
        _formatted_before[0] = warnings.formatwarning
        warnings.formatwarning = format_locedit_warning


class Terminated(KeyboardInterrupt):
    """SIGTERM (what Slurm, Kubernetes and torchrun send before they kill), raised where the process is, as Ctrl-C's
    KeyboardInterrupt is: every `finally` runs (run locks released, nothing half-written) on the way out."""


def _raise_terminated(signum, frame):
    raise Terminated


def _deliver_again(unraisable, hook_before) -> None:
    """sys.unraisablehook: an interrupt raised where Python cannot raise it (a signal handled while a weakref callback
    or a `__del__` runs, as in the garbage collection accelerate starts before each training) is ignored, and the
    command would run on to its end. Send the same signal to the main thread again, a moment later, where it ends
    the command; any other unraisable exception is printed as before."""
    kind = unraisable.exc_type
    if kind is not None and issubclass(kind, KeyboardInterrupt):
        signum = signal.SIGTERM if issubclass(kind, Terminated) else signal.SIGINT
        again = threading.Timer(0.05, signal.pthread_kill, (threading.main_thread().ident, signum))
        again.daemon = True
        again.start()
        return
    hook_before(unraisable)


@contextlib.contextmanager
def terminated_as_interrupt():
    """SIGTERM ends the command as Ctrl-C does (a `Terminated`), in the main thread where a handler can be set; an
    interrupt that lands where it cannot be raised is delivered again (`_deliver_again`)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    hook_before = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: _deliver_again(unraisable, hook_before)
    try:
        yield
    finally:
        sys.unraisablehook = hook_before
        signal.signal(signal.SIGTERM, previous)


def _speaks_for_the_launch() -> bool:
    """Whether this process is the first of its launch (torchrun's RANK), or runs alone."""
    return os.environ.get("RANK", "0") == "0"


def run_cli(main: Callable[[], object]) -> int:
    """Run a command; a user's mistake prints one line `locedit: error: ...` and returns 2 (no traceback).

    Returns the command's own exit code when it returns an int (a sweep with failed runs: 1), else 0; 130 after
    Ctrl-C and 143 after SIGTERM, with one line instead of a traceback (the same command resumes); 1 with one line when
    the disk is full (the same command resumes once there is room); 1, silently, when the reader of its output went
    away (`locedit train --help-all | head`).
    """
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    quiet_library_notices()
    format_warnings_as_lines()
    threads.apply()  # before the libraries load: torch reads OMP_NUM_THREADS once
    # Each line as it is printed, also into a pipe or a log file: the stages' headers (stdout) in order with the
    # libraries' progress bars (stderr).
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    try:
        with terminated_as_interrupt():
            result = main()
        sys.stdout.flush()  # here, where a closed pipe can still be answered without a traceback
    except BrokenPipeError:
        # Nothing more can be said to the reader; what is left in the buffer goes nowhere, not to a shutdown error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except USER_ERRORS as err:
        print(f"locedit: error: {err}", file=sys.stderr)
        return 2
    except Terminated:
        # The launcher forwards SIGTERM to each process of a launch; one of them says so.
        if _speaks_for_the_launch():
            print("\nlocedit: stopped by SIGTERM; run the same command again to resume", file=sys.stderr)
        return 143  # 128 + SIGTERM, as a shell reports a process it ended
    except KeyboardInterrupt:
        # Ctrl-C: what was written is whole (results are written atomically, checkpoints checked on resume).
        if _speaks_for_the_launch():
            print("\nlocedit: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as err:
        # A full disk is not a bug to show a traceback for: where, and that the same command resumes. What was
        # written is whole (results atomically, checkpoints checked on resume).
        problem = disk_full_problem(err)
        if problem is None:
            raise
        print(f"\nlocedit: error: {problem}", file=sys.stderr)  # on a line of its own after a progress bar
        return 1
    return result if type(result) is int else 0
