"""Shared pieces of the benchmarks: a model of a chosen shape with random weights, preference data, step timing.

Every benchmark compares two ways of doing the same work in the same process, and prints the ratio.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

from locedit.core.errors import quiet_library_notices  # noqa: E402

quiet_library_notices()  # as the commands do: the libraries below print nothing a reader can act on

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402

from locedit.config import LocEditConfig  # noqa: E402
from locedit.data import load_preference_splits  # noqa: E402
from locedit.models.tiny import build_tiny_model  # noqa: E402


@dataclass
class Shape:
    layers: int
    hidden: int
    heads: int

    def describe(self) -> str:
        return f"Llama {self.layers} layers x {self.heads} heads, hidden {self.hidden}"


SMALL = Shape(layers=2, hidden=64, heads=4)  # CI-sized: proves the script runs
CPU = Shape(layers=4, hidden=256, heads=8)  # a meaningful size for 2 CPU cores


def model_dir(shape: Shape, root: str | None = None) -> str:
    """A saved Llama of this shape with random weights and locedit's locally made tokenizer (no download)."""
    root = root or tempfile.mkdtemp(prefix="locedit-bench-")
    path = os.path.join(root, f"llama-{shape.layers}x{shape.heads}-{shape.hidden}")
    if not os.path.isdir(path):
        build_tiny_model("llama", path, num_layers=shape.layers, hidden_size=shape.hidden, num_heads=shape.heads)
    return path


def load(path: str, dtype: torch.dtype = torch.float32):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    return model, AutoTokenizer.from_pretrained(path)


def preference_data(num_questions: int = 120):
    columns = ["prompt", "chosen", "rejected"]
    return load_preference_splits(f"synthetic:{num_questions}")["train"].select_columns(columns)


def training_args(output_dir: str, steps: int, batch_size: int = 8, **overrides) -> LocEditConfig:
    settings = dict(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=1e-3,
        logging_steps=10**6,
        save_strategy="no",
        report_to="none",
        optim="adamw_torch",
        dataloader_pin_memory=False,
        disable_tqdm=True,
        seed=0,
    )
    settings.update(overrides)
    return LocEditConfig(**settings)


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (synchronised on GPU)."""

    def __init__(self):
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        _sync()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        _sync()
        self.times.append(time.perf_counter() - self._start)

    def median(self, warmup: int = 2) -> float:
        times = self.times[warmup:] if len(self.times) > warmup else self.times
        return statistics.median(times)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    """(result, seconds) of fn()."""
    _sync()
    start = time.perf_counter()
    result = fn()
    _sync()
    return result, time.perf_counter() - start
