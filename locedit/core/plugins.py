"""Plugins: packages that register data sources, model sources, judges or corpora with locedit's registries.

A plugin is an entry point of the group `locedit.plugins` (the toy world is one: `locedit.toy`, declared in
pyproject.toml); importing it registers what it provides. The registries call `load_plugins` before they answer
"unknown name", so the core never names a plugin.
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import entry_points

GROUP = "locedit.plugins"


@cache
def load_plugins() -> tuple[str, ...]:
    """Import every installed plugin once per process; returns their names."""
    names = []
    for entry in entry_points(group=GROUP):
        entry.load()
        names.append(entry.name)
    return tuple(names)
