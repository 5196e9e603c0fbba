"""What locedit builds once and keeps: the cache directory, its keys, and building an entry safely."""

from __future__ import annotations

import contextlib
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

from .disk import writes_to
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


MANIFEST = ".locedit-manifest.json"  # each file of a built entry and its size, written as the entry is built


def damage(directory: Path) -> str | None:
    """What is wrong with a built entry, by its manifest (a file missing, or of another size: cut short by a crash or
    a full disk, or edited), or None when it is whole. An entry from before manifests is taken as whole."""
    manifest = Path(directory) / MANIFEST
    try:
        sizes = json.loads(manifest.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return f"its {MANIFEST} cannot be read"
    for name, size in sizes.items():
        path = Path(directory) / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} is {path.stat().st_size} bytes, not {size}"
    return None


def _write_manifest(directory: Path) -> None:
    sizes = {
        str(path.relative_to(directory)): path.stat().st_size
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }
    (directory / MANIFEST).write_text(json.dumps(sizes, indent=1))


def build_cached(target: Path, build: Callable[[Path], object]) -> Path:
    """`target`, built by `build(directory)` first if it does not exist yet; returns `target`.

    Safe when several processes ask for the same target at once: each builds into its own temporary directory
    and renames it into place; a loser of the race discards its copy and uses the winner's. Under `accelerate
    launch` only the first process of each node builds and the others wait for its copy: with a process group up,
    transformers' `save_pretrained` writes the weights on the main process only, so another process's copy would
    have none. Each entry records its files' sizes (`MANIFEST`); an entry found damaged (`damage`) is set aside and
    built again, with one line saying so.
    """
    target = Path(target)
    if target.is_dir():
        wrong = damage(target)
        if wrong is None:
            return target
        if local_launch_rank() == 0:
            print(f"locedit: the cached '{target}' is damaged ({wrong}); building it again", file=sys.stderr)
            aside = target.with_name(f".{target.name}.damaged-{os.getpid()}")
            with contextlib.suppress(FileNotFoundError):
                os.rename(target, aside)  # out of the way at once; another process may have moved it first
            shutil.rmtree(aside, ignore_errors=True)
    if local_launch_rank() > 0:
        print(f"locedit: waiting for the launch's first process to build '{target}'", file=sys.stderr, flush=True)
        while not target.is_dir() or damage(target) is not None:
            time.sleep(0.5)  # if that process fails, the launcher stops this one
        return target
    check_cache_writable(target.parent)
    writes_to(target.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        _write_manifest(tmp)
        try:
            # Renaming a directory is atomic and fails if the target exists and is not empty.
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
