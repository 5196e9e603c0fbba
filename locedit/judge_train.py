"""`locedit judge-train`: train one's own truth or info judge on the GPT-judge data: the cpu judge, or a causal LM
fine-tuned with TRL.

    locedit judge-train --judge_kind cpu --judge_data TruthfulQA/data/finetune_truth.jsonl --model_name_or_path smollm2
    locedit judge-train --judge_data TruthfulQA/data/finetune_truth.jsonl --model_name_or_path meta-llama/Llama-2-7b-hf
    python -m locedit.judge_train --judge_data finetune_info.jsonl --judge_max_examples 2000 --num_train_epochs 1

The output directory is a judge: `locedit eval ... --eval_judge_truth cpu:OUTPUT_DIR` (or `hf:OUTPUT_DIR`).
"""

from __future__ import annotations

import sys

from .core.args import ModelArguments
from .core.errors import run_cli

__all__ = ["main", "make_parser"]


def make_parser():
    """The judge recipe's parser (TRL's TrlParser over the judge's data, model and training arguments)."""
    from .config import RecipeParser
    from .evaluation.judge_training import JudgeDataArguments, JudgeTrainConfig

    return RecipeParser((JudgeDataArguments, ModelArguments, JudgeTrainConfig), prog="locedit judge-train")


def main(data_args, model_args: ModelArguments, args) -> dict:
    """Train the judge (JudgeDataArguments, ModelArguments, JudgeTrainConfig), save it, score the held-out questions
    and write judge_metrics.json. Returns the metrics."""
    from .evaluation.judge_training import train_judge

    return train_judge(data_args, model_args, args)


def cli(argv: list[str] | None = None) -> int:
    """`locedit judge-train [RECIPE.yaml] [--key value ...]`: a user's mistake prints one line and exits 2."""

    def run():
        # The libraries load here, inside run_cli, after it has quieted their notices.
        from .config import config_argv, parse_dataclasses

        return main(*parse_dataclasses(make_parser(), config_argv(list(sys.argv[1:] if argv is None else argv))))

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(cli())
