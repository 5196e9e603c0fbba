"""Result files are written atomically: to a temporary file beside the target, then renamed into place.

A reader never sees a half-written file, and an interrupted write leaves neither a half file nor a stray temporary
one. Every result locedit writes (metrics, evaluations, probe results, reports, sweep logs) goes through here, and a
file read back that is damaged anyway (a copy that stopped, a hand edit) is one DamagedFileError line naming it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator

from .disk import writes_to
from .errors import DamagedFileError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temporary path to write `path`'s content to; renamed to `path` when the block ends without an error."""
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    writes_to(directory)
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


@contextlib.contextmanager
def staged_directory(directory: str | os.PathLike, writes: bool = True) -> Iterator[str]:
    """A staging directory inside `directory` for a writer that writes several files (`save_pretrained`): when the
    block ends without an error they are moved into `directory` one by one, each rename atomic, so a writer that
    fails midway (a full disk) leaves no file of `directory` cut short. `writes=False` (a launch's other processes,
    which write nothing) only names the same path."""
    directory = os.fspath(directory)
    staging = os.path.join(directory, ".locedit-staging")
    if writes:
        shutil.rmtree(staging, ignore_errors=True)  # left by a crash
        os.makedirs(staging)
        writes_to(directory)
    try:
        yield staging
        if writes:
            for name in os.listdir(staging):
                target = os.path.join(directory, name)
                if os.path.isdir(target) and not os.path.islink(target):
                    shutil.rmtree(target)
                os.replace(os.path.join(staging, name), target)
    finally:
        if writes:
            shutil.rmtree(staging, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def write_json_atomic(path: str | os.PathLike, payload, indent: int = 2) -> None:
    write_text_atomic(path, json.dumps(payload, indent=indent, default=str))


def read_json(path: str | os.PathLike, fix: str = "restore it or remove it") -> dict:
    """A JSON object from a file, or {} when the file does not exist; a file that is not one (cut short, edited
    by hand) is a DamagedFileError naming it and `fix`, what to do."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            loaded = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DamagedFileError(f"'{path}' is damaged ({str(err).splitlines()[0]}); {fix}") from None
    if not isinstance(loaded, dict):
        raise DamagedFileError(f"'{path}' is damaged (not a JSON object); {fix}")
    return loaded


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """What keeps a safetensors file from being whole, or None: its header must parse and the file must hold every
    byte the header promises (a copy that stopped or a full disk cuts it short). Reads the header only."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            (header_size,) = struct.unpack("<Q", f.read(8))
            if header_size > size - 8:
                return f"its header says {header_size} bytes, the file has {size}"
            header = json.loads(f.read(header_size))
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except (OSError, struct.error, ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
        return str(err).splitlines()[0] if str(err) else type(err).__name__
    if 8 + header_size + end > size:
        return f"cut short: {size} of {8 + header_size + end} bytes"
    return None


def check_safetensors(path: str | os.PathLike, fix: str) -> None:
    """A safetensors file whole (`safetensors_problem`), else one DamagedFileError line naming it and `fix`."""
    os.stat(path)  # a file that is not there is a FileNotFoundError, as before, not a damaged one
    problem = safetensors_problem(path)
    if problem is None:
        return
    if problem.startswith("cut short: "):
        raise DamagedFileError(f"'{path}' is cut short ({problem.removeprefix('cut short: ')}); {fix}")
    raise DamagedFileError(f"'{path}' is damaged ({problem}); {fix}")


def file_digest(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (hex): what a cache keys a file by, so that a file edited in place is new."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def yaml_problem(err) -> str:
    """A YAML parser's error as 'line L, column C: what' (PyYAML's marks count from 0), for one error line."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    what = getattr(err, "problem", None) or str(err).splitlines()[0]
    if getattr(err, "context", None) and getattr(err, "problem", None):
        what = f"{what} ({err.context})"
    return f"line {mark.line + 1}, column {mark.column + 1}: {what}" if mark is not None else what
