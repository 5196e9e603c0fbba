"""locedit: is a behaviour of a language model really localized where a heuristic says it is?

Importing locedit imports nothing else and changes nothing in other libraries: its public names load on first use
(`from locedit import load_edit`), PEFT learns saved edits once an edit is built or loaded (`locedit.load_edit`, or
`locedit.register_with_peft()` before `peft.PeftModel.from_pretrained(model, edit_dir)`), and the commands quiet the
libraries' notices only when they run (`locedit.core.errors.run_cli`).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public name -> the module that defines it (docs/python-api.md).
_EXPORTS = {
    "AttentionLayout": "locedit.models",
    "EditLoadError": "locedit.core.errors",
    "HeadEditConfig": "locedit.edit",
    "HeadEditLayer": "locedit.edit",
    "HeadSpec": "locedit.heads",
    "HeadSpecError": "locedit.core.errors",
    "LocEditError": "locedit.core.errors",
    "add_edit": "locedit.edit",
    "edit_layers": "locedit.edit",
    "edit_norms": "locedit.edit",
    "format_heads": "locedit.heads",
    "load_edit": "locedit.edit",
    "register_with_peft": "locedit.edit",
    "resolve_heads": "locedit.heads",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    # PEP 562: torch, transformers and PEFT load when a name that needs them is first used, not on `import locedit`.
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'locedit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
