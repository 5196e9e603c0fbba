"""Shared fixtures: offline settings and tiny models saved to disk, built once per test session."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Set before transformers, TRL or wandb are imported by any test module: no network, no telemetry, no prompts.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "LOCEDIT_CACHE" not in os.environ:
    # `tiny:` models resolved during the tests go to a throwaway cache, not the user's ~/.cache.
    _session_cache = tempfile.mkdtemp(prefix="locedit-test-cache-")
    os.environ["LOCEDIT_CACHE"] = _session_cache
    atexit.register(shutil.rmtree, _session_cache, ignore_errors=True)

if "TRACKIO_DIR" not in os.environ:
    # The recipes' trackio projects (their default tracker) go to a throwaway directory, not the user's dashboard.
    _session_trackio = tempfile.mkdtemp(prefix="locedit-test-trackio-")
    os.environ["TRACKIO_DIR"] = _session_trackio
    atexit.register(shutil.rmtree, _session_trackio, ignore_errors=True)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def own_working_directory(tmp_path_factory, monkeypatch):
    """Every test runs in a fresh directory of its own (with `recipes/` linked in, as the README's commands use
    it), so what a user's own runs left in `outputs/` can never change a test's result, nor a test leave outputs."""
    work = tmp_path_factory.mktemp("cwd")
    (work / "recipes").symlink_to(REPO / "recipes", target_is_directory=True)
    monkeypatch.chdir(work)
    return work


# The layouts every feature must handle: plain multi-head, grouped-query, Conv1D projections, fused GPT-NeoX.
CORE_ARCHS = ["llama", "qwen2", "gpt2", "gpt_neox"]

# Settings per architecture beyond build_tiny_model's defaults (2 layers, hidden 64, 4 heads of 16 dims).
ARCH_SETTINGS = {"qwen2": {"num_kv_heads": 2}}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: `tiny_model_dir(arch, **overrides)` gives the directory of a saved tiny model, built once per
    session for each distinct set of arguments."""
    from locedit.models.tiny import build_tiny_model

    built: dict[tuple, Path] = {}

    def make(arch: str, **overrides) -> Path:
        settings = {**ARCH_SETTINGS.get(arch, {}), **overrides}
        key = (arch, tuple(sorted(settings.items())))
        if key not in built:
            built[key] = build_tiny_model(arch, tmp_path_factory.mktemp(f"tiny-{arch}"), **settings)
        return built[key]

    return make


@pytest.fixture(scope="session", params=CORE_ARCHS, ids=CORE_ARCHS)
def core_arch_dir(request, tiny_model_dir) -> Path:
    """The saved tiny model of each core architecture in turn (its config.model_type names the arch)."""
    return tiny_model_dir(request.param)


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The read-only reference data next to the repository (`../shared/data`)."""
    path = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path}")
    return path


@pytest.fixture
def head_spec_parses(monkeypatch) -> list[str]:
    """The text of every head spec parsed from here on (a recipe's spec is parsed once, then handed down)."""
    from locedit.heads import HeadSpec

    parsed, parse = [], HeadSpec.parse.__func__

    def spy(cls, text, *args, **kwargs):
        parsed.append(text)
        return parse(cls, text, *args, **kwargs)

    monkeypatch.setattr(HeadSpec, "parse", classmethod(spy))
    return parsed
