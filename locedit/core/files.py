"""Result files are written atomically: to a temporary file beside the target, then renamed into place.

A reader never sees a half-written file, and an interrupted write leaves neither a half file nor a stray temporary
one. Every result locedit writes (metrics, evaluations, probe results, reports, sweep logs) goes through here.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temporary path to write `path`'s content to; renamed to `path` when the block ends without an error."""
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    suffix = os.path.splitext(path)[1]  # some writers (matplotlib, safetensors) read the format off the name
    handle, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.tmp-", suffix=suffix)
    os.close(handle)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def write_json_atomic(path: str | os.PathLike, payload, indent: int = 2) -> None:
    write_text_atomic(path, json.dumps(payload, indent=indent, default=str))


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object from a file, or {} when the file does not exist."""
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)
