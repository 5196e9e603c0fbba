"""A recipe's flags and keys checked by name, with the closest valid names, before TRL's schema is imported.

The recipe's fields are TRL's DPOConfig (with transformers' TrainingArguments) and locedit's own (`core.args`,
`locedit.config.LocEditConfig`): knowing them all takes the import of TRL, about 7 s. Whenever a recipe parser is
built, the names of its flags and keys are kept in `$LOCEDIT_CACHE/recipe_fields/` (keyed by the TRL and transformers
versions and locedit's schema sources), so the next mistyped flag or recipe key is one line in well under a second
(`precheck`). Without that list (the first command on a fresh install, or a read-only cache) the same check runs
after the import (`check_names`), with the same message.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import yaml

from .cache import cache_root
from .errors import RecipeError
from .files import write_json_atomic, yaml_problem

# The help flags the commands answer themselves, before any recipe is read.
HELP_FLAGS = ("-h", "--help")
HELP_ALL = "--help-all"
# The recipe file's keys beside the fields: TrlParser's `env` (environment variables to set).
EXTRA_KEYS = ("env",)
# The sources of the recipe's schema inside the package (a change to them may add or rename a field).
SCHEMA_SOURCES = ("config.py", "core/args.py")


def config_argv(argv: list[str]) -> list[str]:
    """A leading positional `.yaml` is taken as `--config`, so `python -m locedit.train recipes/x.yaml` works."""
    if argv and not argv[0].startswith("-") and argv[0].endswith((".yaml", ".yml")):
        return ["--config", *argv]
    return list(argv)


def recipe_path(argv: list[str]) -> str | None:
    """The recipe file of a command line (after `config_argv`), or None."""
    if "--config" not in argv:
        return None
    index = argv.index("--config") + 1
    return argv[index] if index < len(argv) else ""


def read_recipe_file(path: str) -> dict:
    """A recipe file's mapping of keys to values; one line when it is missing, a directory, unreadable or not a
    YAML mapping."""
    if os.path.isdir(path):
        raise RecipeError(f"recipe '{path}' is a directory, not a recipe file")
    if not os.path.isfile(path):
        raise RecipeError(f"recipe file '{path}' does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            recipe = yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe '{path}' is not valid YAML, at {yaml_problem(err)}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"recipe '{path}' cannot be read: it is not UTF-8 text") from None
    except OSError as err:
        raise RecipeError(f"recipe '{path}' cannot be read ({err.strerror or err})") from None
    if not isinstance(recipe, dict):
        raise RecipeError(f"recipe '{path}' must be a YAML mapping of keys to values")
    return recipe


def given_flags(argv: list[str]) -> list[str]:
    """The `--name` flags of a command line, as typed (without `=value`), up to a lone `--`."""
    flags = []
    for arg in argv:
        if arg == "--":
            break
        if arg.startswith("--") and len(arg) > 2:
            flags.append(arg.split("=", 1)[0])
    return flags


def _suggestion(name: str, known: list[str], prefix: str) -> str:
    """' (did you mean --x?)', from the known names closest to `name` (dashes read as underscores), or ''."""
    close = difflib.get_close_matches(name.replace("-", "_"), known, n=3, cutoff=0.6)
    if not close:
        return ""
    named = [f"{prefix}{match}" for match in close]
    listed = named[0] if len(named) == 1 else ", ".join(named[:-1]) + f" or {named[-1]}"
    return f" (did you mean {listed}?)"


def check_names(argv: list[str], options: set[str], keys: set[str], prog: str, recipe: dict | None = None) -> None:
    """Every flag of `argv` is one of `options` (a parser's option strings) and every key of the recipe file one of
    `keys` (its fields): else one line naming each unknown one with the closest valid names."""
    fields = sorted(key for key in keys if key not in EXTRA_KEYS)
    options = {*options, "--config", *HELP_FLAGS, HELP_ALL}  # taken by TrlParser itself, and by the commands
    unknown = list(dict.fromkeys(flag for flag in given_flags(argv) if flag not in options))
    if unknown:
        described = [flag + _suggestion(flag[2:], fields, "--") for flag in unknown]
        flags = "flag" if len(unknown) == 1 else "flags"
        raise RecipeError(f"unknown {flags} {_and(described)}; {prog} --help lists the flags")
    unknown = sorted(key for key in (recipe or {}) if key not in keys)
    if unknown:
        described = [str(key) + _suggestion(str(key), fields, "") for key in unknown]
        plural = "s" if len(unknown) > 1 else ""
        raise RecipeError(
            f"unknown recipe key{plural} {_and(described)} in '{recipe_path(argv)}'; {prog} --help lists the keys"
        )


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + f" and {items[-1]}"


# ---------------------------------------------------------------------------------------------------------------------
# The cached names
# ---------------------------------------------------------------------------------------------------------------------


def _installed(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "none"


@cache
def fields_key() -> str:
    """What the recipe's names depend on: the TRL and transformers versions (their dataclasses) and locedit's schema
    sources. Read without importing any of them."""
    package = Path(__file__).resolve().parents[1]
    blob = json.dumps(
        {
            "trl": _installed("trl"),
            "transformers": _installed("transformers"),
            "sources": [hashlib.sha256((package / source).read_bytes()).hexdigest() for source in SCHEMA_SOURCES],
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def fields_file() -> Path:
    return cache_root() / "recipe_fields" / f"{fields_key()}.json"


def remember_names(options: set[str], keys: set[str]) -> None:
    """Keep a recipe parser's option strings and keys for `precheck` (once per schema; a cache that cannot be
    written only leaves the check to run after the import)."""
    path = fields_file()
    if path.is_file():
        return
    with contextlib.suppress(OSError):
        write_json_atomic(path, {"options": sorted(options), "keys": sorted(keys)})


def cached_names() -> tuple[set[str], set[str]] | None:
    """(option strings, keys) of the recipe parser as last built with this schema, or None."""
    try:
        with open(fields_file(), encoding="utf-8") as f:
            names = json.load(f)
        return set(names["options"]), set(names["keys"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def precheck(argv: list[str], prog: str) -> None:
    """Before TRL is imported: the recipe file is there and readable, and its keys and the flags are known names
    (when the names are cached). Anything else is left to the full parse."""
    argv = config_argv(argv)
    path = recipe_path(argv)
    recipe = read_recipe_file(path) if path is not None else None
    names = cached_names()
    if names is not None:
        check_names(argv, *names, prog, recipe)
