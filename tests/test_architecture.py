"""The package's shape: no module imports another module's private (`_name`) names.

(The layer contract, each stage importing only the stages below it, is import-linter's: `lint-imports`, run by
.ci/run with the contract in pyproject.toml.)
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "locedit"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def private_imports(path: Path, source_text: str | None = None) -> list[str]:
    """`from M import _name` in `path` (or in `source_text` as if it were that file) where M is another locedit
    module than the file's own."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text() if source_text is None else source_text, str(path))):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        if source.split(".")[0] != "locedit" or source == name:
            continue
        found += [f"{name} imports {source}.{alias.name}" for alias in node.names if alias.name.startswith("_")]
    return found


def test_no_module_imports_another_modules_private_names():
    found = [line for path in sorted(PACKAGE.rglob("*.py")) for line in private_imports(path)]
    assert not found, "\n".join(found)


def test_the_check_sees_a_private_import():
    command = PACKAGE / "probe.py"
    assert private_imports(command, "from .data.sources import _read_csv, load_rows\n") == [
        "locedit.probe imports locedit.data.sources._read_csv"
    ]
    assert private_imports(command, "from locedit.core.files import write_json_atomic\n") == []
    # Only other modules count: a module naming its own private names is not flagged.
    assert private_imports(PACKAGE / "data" / "pairs.py", "from .pairs import _warn\n") == []


IMPORT_CHECK = """
import logging, sys, warnings

import locedit
loaded = {"torch", "transformers", "trl", "peft"} & set(sys.modules)
assert not loaded, f"import locedit loaded {loaded}"

import peft.mapping as mapping

def state():
    return (
        dict(mapping.PEFT_TYPE_TO_CONFIG_MAPPING),
        dict(mapping.PEFT_TYPE_TO_TUNER_MAPPING),
        list(warnings.filters),
        [(name, logging.getLogger(name).level, list(logging.getLogger(name).filters))
         for name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub")],
    )

before = state()
import locedit.edit, locedit.heads, locedit.plan, locedit.training
from locedit import load_edit
assert state() == before, "importing locedit changed PEFT's mappings, the warning filters or the loggers"
from locedit import HeadEditConfig
config = HeadEditConfig(heads=[[0, 1]], num_layers=2, num_heads=4, model_type="llama", edit_layers={"o": 0})
assert mapping.PEFT_TYPE_TO_CONFIG_MAPPING["LORA"].__name__ == "_LoraConfigWithEdits", "an edit registers with PEFT"
print("ok")
"""


def test_importing_locedit_changes_nothing_in_other_libraries():
    """`import locedit` loads none of torch, transformers, TRL or PEFT; importing its modules leaves PEFT's mappings,
    the warning filters and the libraries' loggers as they were; PEFT learns saved edits once an edit is built."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", IMPORT_CHECK], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"
