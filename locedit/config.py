"""The parts of a recipe that need TRL: how to train (`LocEditConfig`, TRL's DPOConfig with locedit's defaults) and
the parser (`parse_recipe`, TRL's TrlParser over every argument set).

`train`, `probe`, `iti`, `eval` and `study` all read the same recipe file with the same parser, so one YAML describes
a whole experiment and an unknown key is an error for every command alike. The plain argument sets and the `Recipe`
they make are `locedit.core.args` and `locedit.core.recipe` (core imports nothing of torch, transformers or TRL).
"""

from __future__ import annotations

import copy
import os
import sys
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import yaml
from trl import DPOConfig, TrlParser

from . import processes
from .core.args import (
    PAIR_DRAWS,
    RESULT_KEY,
    EditArguments,
    EvalArguments,
    ModelArguments,
    ProbeArguments,
    StudyArguments,
    check_at_least,
    check_choice,
    check_positive,
    warn_once,
)
from .core.errors import RecipeError
from .core.recipe import Recipe


@dataclass
class LocEditConfig(DPOConfig):
    """TRL's DPOConfig with the paper's defaults (appendix A) and defaults that also work on a CPU.

    The loss is IPO and `beta` is the paper's tau. `output_dir` defaults to a directory unique to the run (derived
    from the recipe, heads, learning rate, tau and seed), so the runs of a sweep never share one.
    """

    # TRL's fields (kept at TRL's defaults, so not declared here) that determine a run's result, beside the fields
    # below marked RESULT_KEY (`core.args.result_settings`).
    inherited_result_settings: ClassVar[tuple[str, ...]] = (
        "warmup_steps",
        "weight_decay",
        "max_grad_norm",
        "gradient_accumulation_steps",
        "optim",
        "seed",
        "max_length",
    )

    output_dir: str | None = field(
        default=None, metadata={"help": "Run directory; default outputs/<recipe>/<heads>-lr<lr>-tau<tau>-seed<seed>."}
    )
    loss_type: list[str] = field(
        default_factory=lambda: ["ipo"], metadata={RESULT_KEY: True, "help": "IPO, as in the paper."}
    )
    beta: float = field(
        default=0.1, metadata={RESULT_KEY: True, "help": "IPO's tau: the target log-ratio margin is 1/(2 tau)."}
    )
    learning_rate: float = field(
        default=5.0e-4,
        metadata={RESULT_KEY: True, "help": "Learning rate (paper: 1e-4 all heads, 5e-4 16 heads, 2e-3 single head)."},
    )
    num_train_epochs: float = field(default=2.0, metadata={"help": "Epochs over the training pairs."})
    lr_scheduler_type: str = field(default="cosine", metadata={RESULT_KEY: True, "help": "Learning-rate schedule."})
    per_device_train_batch_size: int = field(
        default=4, metadata={RESULT_KEY: True, "help": "Pairs per device per step."}
    )
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Pairs per device per eval step."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Trade compute for memory."})
    bf16: bool | None = field(
        default=None, metadata={RESULT_KEY: True, "help": "bf16 mixed precision; default: on where the GPU has it."}
    )
    precompute_ref_log_probs: bool = field(
        default=True, metadata={"help": "Compute the base model's log-probs once before training."}
    )
    cache_ref_log_probs: bool = field(
        default=True,
        metadata={
            "help": "Keep the reference log-probs of each pair in $LOCEDIT_CACHE/ref_logps and reuse them in every "
            "run on the same base model and pairs (sweeps, multi-edit runs, study stages)."
        },
    )
    max_eval_pairs: int | None = field(
        default=512,
        metadata={
            "help": "Validate on at most this many (seeded) validation pairs, when eval_strategy is not 'no'; "
            "null for all of them."
        },
    )
    score_completions_only: bool = field(
        default=True,
        metadata={
            "help": "Run the LM head only where a completion token is scored (exact; TRL does so only with Triton "
            "on CUDA/XPU); the log-only entropy, mean logits and top-1 accuracy are left out of training steps."
        },
    )
    share_prompt: bool = field(
        default=True,
        metadata={
            "help": "Run each pair's prompt once: one sequence [prompt, chosen, rejected] with a block attention mask "
            "(exact; needs sdpa or eager attention)."
        },
    )
    frozen_prefix: bool = field(
        default=True,
        metadata={
            "help": "Compute the hidden states entering the lowest edited layer once per pair and start each step "
            "there (exact with dropout off)."
        },
    )
    pack_sequences: bool = field(
        default=True,
        metadata={
            "help": "Lay a batch's sequences side by side in rows no longer than its longest, each seeing only "
            "itself: almost no padding, the same batches and numbers (exact; sdpa or eager attention)."
        },
    )
    frozen_prefix_max_memory_gb: float = field(
        default=4.0, metadata={"help": "Memory for the frozen prefix; beyond it, it is kept on disk."}
    )
    train_sampling_strategy: str = field(
        default="random",
        metadata={
            "help": "'random' (the Trainer's); 'group_by_length': batches of similar length (seeded by seed and the "
            "epoch, resumable), which changes which pairs share a step and so what is learned: on the toy study it "
            "lowered the all-heads edit's True from 0.81 to 0.59. pack_sequences removes padding exactly."
        },
    )
    pair_draw: str = field(
        default="question",
        metadata={
            RESULT_KEY: True,
            "help": "Which pairs each step trains on. 'question': epoch by epoch over the training questions, every "
            "question once per epoch with a fresh (seeded) pair of it, so N steps cover N x batch questions; "
            "'pair': the Trainer's shuffle of all pairs (questions with many pairs dominate; the paper's epochs "
            "over all 6,560 pairs).",
            "choices": list(PAIR_DRAWS),
        },
    )
    include_num_input_tokens_seen: str = field(
        default="non_padding", metadata={"help": "Count the tokens trained on (for tokens/s); 'no' to skip."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every this many steps."})
    save_strategy: str = field(default="epoch", metadata={"help": "When to checkpoint (resumable runs)."})
    report_to: str | list[str] = field(default="none", metadata={"help": "'wandb' to track the run in W&B."})

    def __post_init__(self):
        self.output_dir_was_given = self.output_dir is not None
        # Ranges the optimizer, the loss or the data loader would reject only after the weights load (or not at all).
        check_positive("learning_rate", self.learning_rate)
        check_positive("beta", self.beta, "IPO's tau")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            check_at_least(name, getattr(self, name), 1)
        if self.max_eval_pairs is not None:
            check_at_least("max_eval_pairs", self.max_eval_pairs, 1)
        check_choice("pair_draw", self.pair_draw, PAIR_DRAWS)
        check_positive("frozen_prefix_max_memory_gb", self.frozen_prefix_max_memory_gb)
        for name in ("seed", "data_seed"):  # numpy and torch take seeds in 0 .. 2**32 - 1
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and 0 <= value < 2**32):
                raise ValueError(f"{name} {value} is not valid: it must be an integer from 0 to 2**32 - 1")
        if self.max_length is not None:
            check_at_least("max_length", self.max_length, 2)
        if self.frozen_prefix and not self.disable_dropout:
            raise ValueError(
                "frozen_prefix needs disable_dropout: true (with dropout the layers below the edit are random); "
                "set frozen_prefix: false to train with dropout"
            )
        if not (self.max_steps > 0 or self.num_train_epochs > 0):  # max_steps > 0 overrides the epochs
            raise ValueError(
                f"num_train_epochs {self.num_train_epochs} is not valid: it must be > 0 (or set max_steps > 0)"
            )
        if self.bf16 is None:
            self.bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported() and not self.fp16
        if str(self.optim).startswith("paged") and not torch.cuda.is_available():
            # bitsandbytes' paged optimizers need CUDA; on a CPU the same update is plain AdamW.
            warn_once(f"locedit: optim '{self.optim}' needs a GPU; using adamw_torch instead")
            self.optim = "adamw_torch"
        super().__post_init__()


class RecipeParser(TrlParser):
    """TrlParser whose argument errors (a bad value, an unknown flag) are one RecipeError line, not a usage dump."""

    def error(self, message: str):
        raise RecipeError(message)

    @staticmethod
    def _parse_dataclass_field(parser, field):
        # HfArgumentParser hands a field's metadata to argparse's add_argument; locedit's own marker of the settings
        # that determine a run's result (`core.args.RESULT`) is not an argparse keyword.
        if RESULT_KEY in field.metadata:
            field = copy.copy(field)
            field.metadata = types.MappingProxyType({k: v for k, v in field.metadata.items() if k != RESULT_KEY})
        return TrlParser._parse_dataclass_field(parser, field)


def make_parser(prog: str = "locedit") -> TrlParser:
    # No abbreviations: argparse would otherwise take a typo such as --learning_rat for --learning_rate.
    dataclass_types = (EditArguments, ModelArguments, ProbeArguments, EvalArguments, LocEditConfig, StudyArguments)
    return RecipeParser(dataclass_types, prog=prog, allow_abbrev=False)


def config_argv(argv: list[str]) -> list[str]:
    """A leading positional `.yaml` is taken as `--config`, so `python -m locedit.train recipes/x.yaml` works."""
    if argv and not argv[0].startswith("-") and argv[0].endswith((".yaml", ".yml")):
        return ["--config", *argv]
    return list(argv)


def parse_dataclasses(parser: TrlParser, argv: list[str]) -> tuple:
    """TrlParser's recipe file + flags parse; its errors become one RecipeError line."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return parser.parse_args_and_config(argv)
    except ValueError as err:
        raise RecipeError(str(err).splitlines()[0]) from None


def parse_recipe(argv: list[str] | None = None, prog: str = "locedit") -> Recipe:
    """Parse a recipe file and CLI flags (flags override the file)."""
    argv = config_argv(list(sys.argv[1:] if argv is None else argv))
    name, keys = "cli", set()
    if "--config" in argv:
        index = argv.index("--config") + 1
        config_path = argv[index] if index < len(argv) else ""
        if not os.path.isfile(config_path):
            raise RecipeError(f"recipe file '{config_path}' does not exist")
        name = Path(config_path).stem
        keys = _check_recipe_keys(config_path, prog)
    if processes.count() > 1:
        # The launch's process group first: the training arguments' own device setup would otherwise take every CPU
        # process of a launch for a lone one (locedit.processes.state).
        processes.state()
    edit, model, probe, evaluation, training, study = parse_dataclasses(make_parser(prog), argv)
    if edit.chat_template:
        # Set at all, even to its default, a template says the user expects it to shape the prompts: it does not.
        flags = {arg[2:].split("=")[0] for arg in argv if arg.startswith("--")}
        given = [key for key in ("prompt_template", "completion_template") if key in keys | flags]
        if given:
            them = "them" if len(given) > 1 else "it"
            raise RecipeError(
                f"chat_template: true puts the question in a user turn and the answer in an assistant turn of the "
                f"tokenizer's chat template; {' and '.join(given)} would not be used: remove {them} from the recipe"
            )
    return Recipe(edit=edit, model=model, probe=probe, eval=evaluation, training=training, study=study, name=name)


def _check_recipe_keys(config_path: str, prog: str) -> set[str]:
    """Unknown recipe keys are an error naming them (TrlParser's own message is a list dump). Returns the keys."""
    try:
        with open(config_path) as f:
            recipe = yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe '{config_path}' is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(recipe, dict):
        raise RecipeError(f"recipe '{config_path}' must be a YAML mapping of keys to values")
    known = {action.dest for action in make_parser(prog)._actions} | {"env"}
    unknown = sorted(set(recipe) - known)
    if unknown:
        raise RecipeError(
            f"unknown recipe key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} in '{config_path}' "
            f"(see {prog} --help)"
        )
    return set(recipe)
