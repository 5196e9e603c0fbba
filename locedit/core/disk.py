"""A full disk, told as one line: where the command was writing and how much room is left there.

A write that runs out of room fails differently in each library: Python's own files raise OSError ENOSPC,
safetensors a SafetensorError that quotes the OS error, and torch.save (what the Trainer's checkpoints use) a
RuntimeError about a stream position, with no errno at all. `disk_full_problem` recognises each, the last by the
disk it was writing to being full, so that `run_cli` can say so instead of printing a traceback. The places a command
writes to (its run directories and the cache) are recorded as it opens them (`writes_to`).
"""

from __future__ import annotations

import errno
import os

DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# How the libraries quote ENOSPC and EDQUOT in an error's text (safetensors: "I/O error: ... (os error 28)").
_DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122")
# torch.save's zip writer reports a short write by its stream position, not by the OS error under it.
_SHORT_WRITE_TEXTS = ("inline_container", "PytorchStreamWriter", "file write failed")
# A write failed for want of room when less than this is left where it was writing.
NEARLY_FULL_BYTES = 1 << 20

_places: list[str] = []  # the directories this command writes to, first recorded first


def writes_to(path: str | os.PathLike) -> None:
    """Record a directory this command writes to, so that a full disk can be named where it happened."""
    path = os.path.abspath(os.fspath(path))
    if path not in _places:
        _places.append(path)


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes free to this user on the filesystem that holds `path` (or its closest existing parent)."""
    path = os.path.abspath(os.fspath(path))
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        stats = os.statvfs(path)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


def _size(n: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _chain(err: BaseException):
    """`err` and the errors it was raised from or while handling, innermost last."""
    seen = 0
    while err is not None and seen < 8:
        yield err
        err, seen = err.__cause__ or err.__context__, seen + 1


def disk_full_problem(err: BaseException) -> str | None:
    """One line for an error that a full disk caused (where, how much is left, what to do), else None."""
    errors = list(_chain(err))
    said = any(
        getattr(e, "errno", None) in DISK_FULL_ERRNOS or any(text in str(e) for text in _DISK_FULL_TEXTS)
        for e in errors
    )
    short_write = any(any(text in str(e) for text in _SHORT_WRITE_TEXTS) for e in errors)
    named = next((e.filename for e in errors if isinstance(getattr(e, "filename", None), str)), None)
    named_dir = os.path.dirname(os.path.abspath(named)) if named else None
    places = ([named_dir] if named else []) + _places[::-1] + [os.getcwd()]
    room = {place: free_bytes(place) for place in places}
    fullest = min((place for place in places if room[place] is not None), key=lambda p: room[p], default=None)
    if not said and not (short_write and fullest is not None and room[fullest] < NEARLY_FULL_BYTES):
        return None
    where = named or fullest or os.getcwd()
    left = room.get(named_dir or fullest)
    left_text = f"; {_size(left)} free there now" if left is not None else ""
    return (
        f"the disk is full: writing '{where}' failed{left_text}; free some space there (or give output_dir or "
        "LOCEDIT_CACHE another disk), then run the same command again to resume"
    )
