"""A toy world where the truth is known exactly, so the whole study runs on a CPU in minutes and shows a real effect.

- `locedit.toy.world`: made-up creatures with known attributes, TruthfulQA-shaped questions about them, and the
  pre-training text, in which some attributes carry a planted misconception (`dataset: toy`).
- `locedit.toy.model`: a small Llama pre-trained on that text, shipped with locedit (`model_name_or_path: toy`).
- `locedit.toy.judge`: the exact judge (`eval_judge_truth: toy`, `eval_judge_info: toy`).

The toy world is a plugin (the `locedit.plugins` entry point): importing this package registers its data set, model,
judge, corpus and study hooks with locedit's registries (`locedit.toy.plugin`); the core never imports it.
"""

from ..core.lazy import lazy_exports
from .plugin import register

# Public name -> the module that defines it (loaded on first use: registering the plugin imports no model code).
_EXPORTS = {
    "ATTRIBUTES": ".world",
    "NO_COMMENT": ".world",
    "Attribute": ".world",
    "ToyJudge": ".judge",
    "ToySettings": ".world",
    "ToySpecError": ".world",
    "ToyWorld": ".world",
    "build_toy_model": ".model",
    "is_toy_spec": ".world",
    "judge_answer": ".world",
    "make_world": ".world",
    "parse_toy_spec": ".world",
    "read_toy_info": ".model",
    "resolve_toy_model": ".model",
    "toy_model_dir": ".model",
    "toy_questions": ".world",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

register()
