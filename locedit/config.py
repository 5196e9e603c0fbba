"""The parts of a recipe that need TRL: how to train (`LocEditConfig`, TRL's DPOConfig with locedit's defaults) and
the parser (`parse_recipe`, TRL's TrlParser over every argument set).

`train`, `probe`, `iti`, `eval` and `study` all read the same recipe file with the same parser, so one YAML describes
a whole experiment and an unknown key is an error for every command alike. The plain argument sets and the `Recipe`
they make are `locedit.core.args` and `locedit.core.recipe` (core imports nothing of torch, transformers or TRL).
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
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
from .core.flags import (
    EXTRA_KEYS,
    check_names,
    config_argv,
    given_flags,
    read_recipe_file,
    recipe_path,
    remember_names,
)
from .core.recipe import Recipe
from .core.tracking import check_trackers, recipe_project


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
    report_to: str | list[str] = field(
        default="none",
        metadata={
            "help": "Where the runs are tracked: 'trackio' (a local dashboard: `locedit dashboard`), 'wandb', "
            "'trackio,wandb', or 'none'."
        },
    )

    def __post_init__(self):
        self.output_dir_was_given = self.output_dir is not None
        names = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to or [])
        if any("," in name for name in names):  # `--report_to trackio,wandb`: both
            self.report_to = [part.strip() for name in names for part in name.split(",") if part.strip()]
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
        if self.dataloader_pin_memory and not torch.accelerator.is_available():
            # Pinned memory only speeds up copies to an accelerator; without one torch's data loader warns on every
            # loader (twice per tiny run) that it pins nothing.
            self.dataloader_pin_memory = False
        if str(self.optim).startswith("paged") and not torch.cuda.is_available():
            # bitsandbytes' paged optimizers need CUDA; on a CPU the same update is plain AdamW.
            warn_once(f"locedit: optim '{self.optim}' needs a GPU; using adamw_torch instead")
            self.optim = "adamw_torch"
        super().__post_init__()


class RecipeParser(TrlParser):
    """TrlParser whose argument errors (a bad value, an unknown flag) are one RecipeError line, not a usage dump."""

    def error(self, message: str):
        raise RecipeError(_flag_value_error(message) or message)

    @staticmethod
    def _parse_dataclass_field(parser, field):
        # HfArgumentParser hands a field's metadata to argparse's add_argument; locedit's own marker of the settings
        # that determine a run's result (`core.args.RESULT`) is not an argparse keyword.
        if RESULT_KEY in field.metadata:
            field = copy.copy(field)
            field.metadata = types.MappingProxyType({k: v for k, v in field.metadata.items() if k != RESULT_KEY})
        return TrlParser._parse_dataclass_field(parser, field)


# argparse's own words for a value its type refused: "argument --x/--x-y: invalid float value: 'two'", and those of
# transformers' string_to_bool: "argument --x/--x-y: Truthy value expected: got maybe but expected one of ...".
_INVALID_VALUE = re.compile(r"^argument (--[\w-]+)(?:/--[\w-]+)*: invalid (\w+) value: (.*)$")
_INVALID_BOOL = re.compile(r"^argument (--[\w-]+)(?:/--[\w-]+)*: Truthy value expected: got (.*) but expected")
# What each of the parser's value types takes, in a user's words.
_EXPECTED = {"float": "a number", "int": "an integer", "string_to_bool": "true or false"}


def _flag_value_error(message: str) -> str | None:
    """A flag's value of the wrong type, as one line naming the flag and the type it takes; None for other errors."""
    match = _INVALID_BOOL.match(message)
    if match is not None:
        flag, value = match.groups()
        return f"{flag} '{value}' is not valid: it must be {_EXPECTED['string_to_bool']}"
    match = _INVALID_VALUE.match(message)
    if match is None or match.group(2) not in _EXPECTED:
        return None
    flag, kind, value = match.groups()
    return f"{flag} {value} is not valid: it must be {_EXPECTED[kind]}"


def parser_names(parser: argparse.ArgumentParser) -> tuple[set[str], set[str]]:
    """(option strings, recipe keys) of a parser: every flag it takes and every field a recipe file may set."""
    options = {option for action in parser._actions for option in action.option_strings}
    keys = {action.dest for action in parser._actions if action.dest != "help"} | set(EXTRA_KEYS)
    return options, keys


def make_parser(prog: str = "locedit") -> TrlParser:
    # No abbreviations: argparse would otherwise take a typo such as --learning_rat for --learning_rate.
    dataclass_types = (EditArguments, ModelArguments, ProbeArguments, EvalArguments, LocEditConfig, StudyArguments)
    parser = RecipeParser(dataclass_types, prog=prog, allow_abbrev=False)
    remember_names(*parser_names(parser))  # for the next command's check of its flags before TRL loads
    return parser


def parse_dataclasses(parser: TrlParser, argv: list[str], recipe: dict | None = None) -> tuple:
    """TrlParser's recipe file + flags parse; its errors become one RecipeError line: an unknown flag or recipe key
    with the closest valid names, a value of the wrong type with the flag (or file and key) and the type it takes.
    `recipe`: the recipe file's mapping, when the caller has read it."""
    path = recipe_path(argv)
    if path is not None and recipe is None:
        recipe = read_recipe_file(path)
    check_names(argv, *parser_names(parser), parser.prog, recipe)
    if recipe:
        check_recipe_types(parser, recipe, path, given_flags(argv))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return parser.parse_args_and_config(argv)
    except ValueError as err:
        message = str(err).splitlines()[0]
        if message.startswith("Some specified arguments are not used"):  # flags are known: these are positional
            extra = message.partition(": ")[2]
            raise RecipeError(
                f"unexpected arguments {extra}: give the recipe file first, then --key value flags "
                f"({parser.prog} --help)"
            ) from None
        raise RecipeError(message) from None


def check_recipe_types(parser: argparse.ArgumentParser, recipe: dict, path: str, flags: list[str]) -> None:
    """Each value of a recipe file is of its field's type (a flag given on the command line replaces the file's
    value, so its key is not checked): else one line naming the file, the key and the type. argparse converts a
    text value as it would a flag's, and would name only the flag."""
    for action in parser._actions:
        if action.dest not in recipe or action.dest == "help" or set(action.option_strings) & set(flags):
            continue
        kind = getattr(action.type, "__name__", "")  # TRL's wrapper of an optional field's type keeps its name
        expected = _EXPECTED.get(kind)
        value = recipe[action.dest]
        if expected is None or value is None:
            continue
        several = action.nargs in ("+", "*")
        for item in value if several and isinstance(value, list) else [value]:
            if not _is_of_type(item, action.type, kind):
                shown = f"'{item}'" if isinstance(item, str) else repr(item)
                what = f"each of its values must be {expected}" if several else f"it must be {expected}"
                raise RecipeError(f"{action.dest} {shown} in recipe '{path}' is not valid: {what}")


def _is_of_type(value, convert, kind: str) -> bool:
    """Whether a recipe value reads as its field's type (`convert`, named `kind`: float, int, string_to_bool) as
    argparse would read it: a text value through `convert`, another as the YAML value it is."""
    if isinstance(value, str):
        try:
            convert(value)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            return False
        return True
    if kind == "float":
        return isinstance(value, int | float)
    if kind == "int":
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    return isinstance(value, bool)


def parse_recipe(argv: list[str] | None = None, prog: str = "locedit") -> Recipe:
    """Parse a recipe file and CLI flags (flags override the file)."""
    argv = config_argv(list(sys.argv[1:] if argv is None else argv))
    name, recipe = "cli", None
    path = recipe_path(argv)
    if path is not None:
        recipe = read_recipe_file(path)
        name = Path(path).stem
    if processes.count() > 1:
        # The launch's process group first: the training arguments' own device setup would otherwise take every CPU
        # process of a launch for a lone one (locedit.processes.state).
        processes.state()
    edit, model, probe, evaluation, training, study = parse_dataclasses(make_parser(prog), argv, recipe)
    if edit.chat_template:
        # Set at all, even to its default, a template says the user expects it to shape the prompts: it does not.
        flags = {flag[2:] for flag in given_flags(argv)}
        given = [key for key in ("prompt_template", "completion_template") if key in set(recipe or {}) | flags]
        if given:
            them = "them" if len(given) > 1 else "it"
            raise RecipeError(
                f"chat_template: true puts the question in a user turn and the answer in an assistant turn of the "
                f"tokenizer's chat template; {' and '.join(given)} would not be used: remove {them} from the recipe"
            )
    edit.wandb_project = recipe_project(edit.wandb_project, name)
    check_trackers(training.report_to, edit.wandb_project)
    return Recipe(edit=edit, model=model, probe=probe, eval=evaluation, training=training, study=study, name=name)
