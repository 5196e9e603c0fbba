"""Named model sources: `tiny:llama` (built here), `smollm2` or a `.gguf` file (`locedit.models.gguf`), or a
plugin's (`toy`), resolved to a local model folder.

A source is a prefix (`tiny`, `toy`) and a function from the whole name (`tiny:llama`, `toy:layers=2`) to a local
model directory, built and cached on first use. Any other name (a Hub id, a local path) is passed on unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..core.cache import build_cached, cache_key, cache_root
from ..core.errors import RecipeError
from ..core.plugins import load_plugins
from .gguf import is_gguf_path, resolve_gguf_file, resolve_smollm2

MODEL_SOURCES: dict[str, Callable[[str], str]] = {}
# Sources that can give a model's config and tokenizer without its weights (for dry runs), as `resolve(name,
# weights=False)`: those whose weights take long to build.
CONFIG_SOURCES: set[str] = set()


def register_model_source(prefix: str, resolve: Callable[..., str], config_only: bool = False) -> None:
    """Make `PREFIX` and `PREFIX:SETTINGS` model names resolve to the directory `resolve(name)` returns; with
    `config_only`, `resolve(name, weights=False)` may return a folder of the config and tokenizer only."""
    MODEL_SOURCES[prefix] = resolve
    if config_only:
        CONFIG_SOURCES.add(prefix)


def source_of(name: str) -> Callable[[str], str] | None:
    """The source a model name belongs to (`tiny:llama` -> tiny's), or None for a Hub id or a path."""
    prefix = name.strip().partition(":")[0]
    if prefix not in MODEL_SOURCES:
        load_plugins()
    return MODEL_SOURCES.get(prefix)


def resolve_model_path(name_or_path: str, weights: bool = True) -> str:
    """The local directory of a named source's model or of a GGUF file (built on first use); any other name
    unchanged. With `weights=False` (a dry run), a GGUF model's config and tokenizer alone where its converted
    folder is not built yet (`locedit.models.gguf.is_config_only`)."""
    if is_gguf_path(name_or_path):
        return resolve_gguf_file(name_or_path, weights=weights)
    source = source_of(name_or_path)
    if source is None:
        return name_or_path
    name = name_or_path.strip()
    if not weights and name.partition(":")[0] in CONFIG_SOURCES:
        return source(name, weights=False)
    return source(name)


def tiny_cache_dir() -> Path:
    """Where `tiny:` models are cached: `$LOCEDIT_CACHE/tiny`, by default `~/.cache/locedit/tiny`."""
    return cache_root() / "tiny"


def resolve_tiny_model(name: str) -> str:
    """`tiny:ARCH`: a randomly initialised tiny model of that architecture (`locedit.models.tiny`), cached."""
    from . import tiny

    arch = name.partition(":")[2]
    if arch not in tiny.TINY_ARCHITECTURES:
        valid = ", ".join(f"tiny:{name}" for name in tiny.TINY_ARCHITECTURES)
        raise RecipeError(f"unknown tiny model {name!r}; valid: {valid}")
    # The builder's source is in the key so that any change to how models are built invalidates old copies.
    key = cache_key({"arch": arch, **tiny.TINY_DEFAULTS}, [Path(tiny.__file__)])
    target = tiny_cache_dir() / f"{arch}-{key}"
    return str(build_cached(target, lambda tmp: tiny.build_tiny_model(arch, tmp, **tiny.TINY_DEFAULTS)))


register_model_source("tiny", resolve_tiny_model)
register_model_source("smollm2", resolve_smollm2, config_only=True)
