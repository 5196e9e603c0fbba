"""What locedit builds once and keeps: the cache directory, its keys, and building an entry safely."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

from .errors import RecipeError


def cache_root() -> Path:
    """Where locedit caches the models it builds: `$LOCEDIT_CACHE`, by default `~/.cache/locedit`."""
    return Path(os.environ.get("LOCEDIT_CACHE") or Path.home() / ".cache" / "locedit")


def cache_key(settings: dict, sources: list[Path]) -> str:
    """A short hash of what a cached model depends on: its settings, the source of the code that builds it, and the
    library versions (a config saved by one transformers version may not load in an older one). The versions are the
    installed distributions' (the same strings as the modules' __version__), read without importing them."""
    blob = json.dumps(
        {
            "settings": settings,
            "sources": [hashlib.sha256(Path(source).read_bytes()).hexdigest() for source in sources],
            "transformers": version("transformers"),
            "tokenizers": version("tokenizers"),
            "torch": version("torch"),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def check_cache_writable(directory: Path | None = None) -> None:
    """The cache directory (or a directory in it) exists and takes files, or can be made; else one RecipeError line
    naming it and LOCEDIT_CACHE (a read-only disk, or a path below a file)."""
    directory = Path(directory or cache_root())
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".locedit-write-test-"):
            pass
    except OSError as err:
        raise RecipeError(
            f"cache directory '{directory}' cannot be written ({err.strerror or err}); set LOCEDIT_CACHE to a "
            "writable directory"
        ) from None


def local_launch_rank() -> int:
    """This process's place among the processes of an `accelerate launch` on its node (0 without a launcher)."""
    return int(os.environ.get("LOCAL_RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def build_cached(target: Path, build: Callable[[Path], object]) -> Path:
    """`target`, built by `build(directory)` first if it does not exist yet; returns `target`.

    Safe when several processes ask for the same target at once: each builds into its own temporary directory
    and renames it into place; a loser of the race discards its copy and uses the winner's. Under `accelerate
    launch` only the first process of each node builds and the others wait for its copy: with a process group up,
    transformers' `save_pretrained` writes the weights on the main process only, so another process's copy would
    have none.
    """
    target = Path(target)
    if target.is_dir():
        return target
    if local_launch_rank() > 0:
        print(f"locedit: waiting for the launch's first process to build '{target}'", file=sys.stderr, flush=True)
        while not target.is_dir():
            time.sleep(0.5)  # if that process fails, the launcher stops this one
        return target
    check_cache_writable(target.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        try:
            # Renaming a directory is atomic and fails if the target exists and is not empty.
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
