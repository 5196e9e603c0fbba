"""A toy world where the truth is known exactly, so the whole study runs on a CPU in minutes and shows a real effect.

- `locedit.toy.world`: made-up creatures with known attributes, TruthfulQA-shaped questions about them, and the
  pre-training text, in which some attributes carry a planted misconception (`dataset: toy`).
- `locedit.toy.model`: a small Llama pre-trained on that text, cached once per machine (`model_name_or_path: toy`).
- `locedit.toy.judge`: the exact judge (`eval_judge_truth: toy`, `eval_judge_info: toy`).

The toy world is a plugin (the `locedit.plugins` entry point): importing this package registers its data set, model,
judge, corpus and study hooks with locedit's registries (`locedit.toy.plugin`); the core never imports it.
"""

from .judge import ToyJudge
from .model import build_toy_model, read_toy_info, resolve_toy_model, toy_model_dir
from .plugin import register
from .world import (
    ATTRIBUTES,
    NO_COMMENT,
    Attribute,
    ToySettings,
    ToySpecError,
    ToyWorld,
    is_toy_spec,
    judge_answer,
    make_world,
    parse_toy_spec,
    toy_questions,
)

register()

__all__ = [
    "ATTRIBUTES",
    "NO_COMMENT",
    "Attribute",
    "ToyJudge",
    "ToySettings",
    "ToySpecError",
    "ToyWorld",
    "build_toy_model",
    "is_toy_spec",
    "judge_answer",
    "make_world",
    "parse_toy_spec",
    "read_toy_info",
    "resolve_toy_model",
    "toy_model_dir",
    "toy_questions",
]
