"""The commands' help: each command's own flags grouped by purpose, on one screen, then a pointer to every field.

`locedit COMMAND --help` (train, probe, iti, eval, study) lists the flags a user of that command sets most, grouped as
TRL's DPOConfig groups its parameters, with their defaults, and ends with the pointer to `--help-all`: the recipe
parser's help of every field (TRL's DPOConfig and transformers' TrainingArguments included). The short help imports
none of torch, transformers or TRL; the head-spec forms come from the selector registry (`locedit.heads`).
"""

from __future__ import annotations

import dataclasses
import textwrap

from ..core.args import EditArguments, EvalArguments, ModelArguments, ProbeArguments, StudyArguments
from ..core.flags import HELP_ALL, HELP_FLAGS
from ..heads import heads_help, selector_help

# The defaults of the training fields the short help lists (LocEditConfig's, or TRL's where locedit keeps them; a test
# holds them to the dataclass). None: no default is shown.
TRAINING_DEFAULTS = {
    "learning_rate": 5e-4,
    "beta": 0.1,
    "num_train_epochs": 2.0,
    "max_steps": -1,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "pair_draw": "question",
    "seed": 42,
    "output_dir": None,
    "eval_strategy": "no",
    "report_to": "none",
    "logging_steps": 10,
}

HEADS = "heads"  # its lines are the selector registry's forms


def _group(title: str, *flags: tuple[str, str, str]) -> tuple[str, tuple[tuple[str, str, str], ...]]:
    return title, flags


MODEL = ("model_name_or_path", "NAME", "base model: Hub id, local directory or .gguf, 'tiny:ARCH', 'toy'")
DTYPE = ("dtype", "DTYPE", "weights dtype: auto, bfloat16, float16 or float32")
DATASET = (
    "dataset",
    "DATA",
    "preference or question data: a Hub id, a .csv/.json/.jsonl/.parquet file, synthetic[:N] or toy",
)
DATASET_CONFIG = ("dataset_config", "NAME", "the Hub data set's configuration")
SPLIT = ("split_fractions", "T V T", "question fractions for train, validation and test")
SPLIT_SEED = ("split_seed", "N", "seed of the question split")
CHAT = ("chat_template", "BOOL", "wrap prompts in the tokenizer's chat template (instruct models)")
HEADS_FLAG = (HEADS, "SPEC", "the heads to edit (0-based), one of:")
HEADS_SEED = ("heads_seed", "N", "seed of random:K and single:K draws")
PROBE_RESULTS = ("probe_results", "DIR", "a probe result (locedit probe) that probe:K reads")
DRY_RUN = ("dry_run", "BOOL", "check everything and print the plan; load no weights, run nothing")
OUTPUT_DIR = ("output_dir", "DIR", "run directory; default outputs/<recipe>/<heads>-lr<lr>-tau<tau>-seed<seed>")
JUDGE_TRUTH = ("eval_judge_truth", "JUDGE", "auto, cpu[:DIR], hf:MODEL, openai:MODEL, similarity, toy or none")
JUDGE_INFO = ("eval_judge_info", "JUDGE", "informativeness judge, as eval_judge_truth")
CORPUS = ("eval_corpus", "TEXT", "KL/CE text: a Hub data set, a local file, toy or none")
LEARNING_RATE = ("learning_rate", "LR", "the paper: 1e-4 all heads, 5e-4 16 heads, 2e-3 one head")
BETA = ("beta", "TAU", "IPO's tau: the target log-ratio margin is 1/(2 tau)")
SEED = ("seed", "N", "the edit's initialisation and the pairs' order")
ITI_ALPHA = ("iti_alpha", "ALPHA", "ITI's intervention strength alpha")

COMMANDS = {
    "train": (
        "locedit train [RECIPE.yaml] [--key value ...]",
        "Train the optimal edit at a set of attention heads with IPO (TRL's DPOTrainer). A recipe file's keys and the "
        "flags are the same settings; flags override the file.",
        [
            _group("model and data", MODEL, DTYPE, DATASET, DATASET_CONFIG, SPLIT, SPLIT_SEED, CHAT),
            _group(
                "heads and edit",
                HEADS_FLAG,
                HEADS_SEED,
                ("heads_draws", "N", "train N draws of random:K in one pass"),
                ("edit_read", "WHAT", "what <a, o> reads: all heads (the paper) or the selected heads"),
                ("edit_strength", "KIND", "adaptive: o + <a, o>(m*b) (the paper); constant: o + m*b"),
                PROBE_RESULTS,
            ),
            _group(
                "IPO training",
                LEARNING_RATE,
                BETA,
                ("num_train_epochs", "N", "epochs over the training questions"),
                ("max_steps", "N", "train this many steps instead, when > 0"),
                ("per_device_train_batch_size", "N", "pairs per device per step"),
                ("gradient_accumulation_steps", "N", "steps whose gradients make one update"),
                ("pair_draw", "HOW", "question: each question once an epoch; pair: all pairs shuffled"),
                SEED,
                OUTPUT_DIR,
                DRY_RUN,
            ),
            _group(
                "evaluation",
                ("eval_after_train", "BOOL", "evaluate the edit on the test questions when training ends"),
                ("eval_strategy", "WHEN", "validation IPO loss during training: no, steps or epoch"),
                JUDGE_TRUTH,
                JUDGE_INFO,
                CORPUS,
            ),
            _group(
                "tracking",
                ("report_to", "WHERE", "trackio (a local dashboard: locedit dashboard), wandb, trackio,wandb or none"),
                ("wandb_project", "NAME", "the project on trackio and W&B (default locedit-RECIPE)"),
                ("logging_steps", "N", "log every N steps"),
            ),
        ],
    ),
    "probe": (
        "locedit probe [RECIPE.yaml] [--key value ...]",
        "Probe every head of the model on the training questions (ITI's localization): each head's validation "
        "accuracy, ITI's direction u and strength sigma, in probe.json, probe.safetensors and heatmap.png.",
        [
            _group("model and data", MODEL, DTYPE, DATASET, DATASET_CONFIG, SPLIT, SPLIT_SEED, CHAT),
            _group(
                "probing",
                ("probe_template", "TEXT", "a probe example: a question, an answer (the label) and another question"),
                ("probe_val_fraction", "F", "fraction of the training questions held out to score the probes"),
                ("probe_seed", "N", "seed of the other question of each example and of the held-out part"),
                ("probe_standardize", "BOOL", "fit the probes on z-scored activations (ITI fits raw ones)"),
                ("probe_batch_size", "N", "examples per forward pass"),
                ("probe_output_dir", "DIR", "where the result goes; default outputs/<recipe>/probe"),
                DRY_RUN,
            ),
        ],
    ),
    "iti": (
        "locedit iti [RECIPE.yaml] [--key value ...]",
        "Make ITI's edit (alpha * sigma * u at the selected heads) as a run directory, from the recipe's probes "
        "(probed first when there are none).",
        [
            _group("model and data", MODEL, DTYPE, DATASET, DATASET_CONFIG, SPLIT, SPLIT_SEED),
            _group(
                "heads and ITI's edit",
                HEADS_FLAG,
                HEADS_SEED,
                ("heads_draws", "N", "make N draws of random:K, each its own edit"),
                ITI_ALPHA,
                PROBE_RESULTS,
                ("probe_output_dir", "DIR", "where the probes go when they run first; default outputs/<recipe>/probe"),
                ("output_dir", "DIR", "run directory; default outputs/<recipe>/iti-<heads>-alpha<alpha>"),
                DRY_RUN,
            ),
        ],
    ),
    "eval": (
        "locedit eval [RECIPE.yaml] [RUN_DIR ...] [--base] [--key value ...]",
        "Evaluate the edits in RUN_DIRs (one base model, loaded once) on their test questions, and with --base the "
        "base model too (on the runs' test questions, or the recipe's split without RUN_DIRs). A multi-edit run "
        "directory stands for all its edits.",
        [
            _group(
                "what is evaluated",
                ("RUN_DIR ...", "", "run directories of edits (train, iti), positional"),
                ("base", "", "the base model too (into eval_output_dir)"),
                ("eval_max_questions", "N", "only the first N test questions (by id), for quick checks"),
                ("eval_output_dir", "DIR", "where the base model's evaluation goes; default <runs' parent>/base"),
                DRY_RUN,
            ),
            _group(
                "judges",
                JUDGE_TRUTH,
                JUDGE_INFO,
                ("eval_judge_data", "DIR", "TruthfulQA's judge data, from which cpu judges train on first use"),
                ("eval_rejudge", "BOOL", "judge an earlier evaluation's saved answers again with other judges"),
            ),
            _group(
                "scores",
                ("eval_prompt", "WHAT", "what precedes the prompt: none, instruction, primer or iti"),
                ("eval_max_new_tokens", "N", "most tokens generated per answer"),
                ("eval_mc", "BOOL", "MC1/MC2 from the answers' log-probs"),
                ("eval_mc_targets", "WHAT", "the MC choices: auto, answers, none or a multiple_choice file"),
                CORPUS,
                ("eval_corpus_docs", "N", "documents of eval_corpus used"),
            ),
            _group(
                "break detector",
                ("eval_max_kl", "KL", "an edit with a larger KL from the base model is broken; null: off"),
                ("eval_max_degenerate", "SHARE", "an edit with a larger share of degenerate answers is broken"),
            ),
            _group(
                "speed",
                ("eval_batch_size", "N", "prompts per batch"),
                ("eval_merge", "BOOL", "merge the edit into the weights for generation"),
            ),
        ],
    ),
    "study": (
        "locedit study RECIPE.yaml [--key value ...]",
        "The paper's comparison from one probe:K recipe, each stage as its own command runs it: probe every head; "
        "ITI's edit at the K probe heads and at random sets of K heads; the optimal (IPO) edit at the probe heads, "
        "at random sets, at single heads and at all heads; evaluate the base model and every edit; the table, "
        "figures, p-values and verdict in outputs/<recipe>/study/. Recipe flags apply to every stage.",
        [
            _group(
                "the study",
                ("study_random", "N", "random sets of K heads (the paper draws 16)"),
                ("study_single", "N", "random single heads (the paper draws 24)"),
                ("study_lr_all", "LR", "learning rate of the all-heads edit; default the recipe's x 0.2 (the paper)"),
                ("study_lr_single", "LR", "learning rate of single-head edits; default the recipe's x 4 (the paper)"),
                ("study_heuristics", "NAMES", "other heuristics whose K best heads get an edit: importance"),
                ("study_metric", "METRIC", "the verdict's score, e.g. true_info, mc2; default by the judges"),
            ),
            _group(
                "the recipe (every stage)",
                ("heads", "probe:K", "the K heads ITI's probes score highest; every family has K heads"),
                MODEL,
                DATASET,
                LEARNING_RATE,
                BETA,
                SEED,
                ITI_ALPHA,
                JUDGE_TRUTH,
                JUDGE_INFO,
                DRY_RUN,
            ),
        ],
    ),
}

ARGUMENT_CLASSES = (EditArguments, ModelArguments, ProbeArguments, EvalArguments, StudyArguments)
WIDTH = 118
FLAG_WIDTH = 34


def help_request(argv: list[str]) -> str | None:
    """'all' for --help-all, 'short' for -h/--help, else None."""
    if HELP_ALL in argv:
        return "all"
    if any(arg in HELP_FLAGS for arg in argv):
        return "short"
    return None


def _defaults() -> dict[str, object]:
    defaults = dict(TRAINING_DEFAULTS)
    for cls in ARGUMENT_CLASSES:
        for field in dataclasses.fields(cls):
            if field.default is not dataclasses.MISSING:
                defaults[field.name] = field.default
            elif field.default_factory is not dataclasses.MISSING:
                defaults[field.name] = field.default_factory()
    return defaults


def _shown(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value) if isinstance(value, str) and (not value or " " in value or "\n" in value) else str(value)


def _entry(name: str, metavar: str, text: str, default) -> list[str]:
    flag = name if name.isupper() or " " in name else f"--{name}"
    left = f"  {flag} {metavar}".rstrip()
    shown = _shown(default)
    if shown is not None and name != HEADS:
        text += f" (default {shown})"
    if name == HEADS:
        text = text.replace("one of:", f"default {shown}; one of:")
    if len(left) >= FLAG_WIDTH:
        lines = [left]
        left = ""
    else:
        lines = []
    wrapped = textwrap.wrap(text, WIDTH - FLAG_WIDTH) or [""]
    lines.append(f"{left:<{FLAG_WIDTH}}{wrapped[0]}")
    lines += [" " * FLAG_WIDTH + line for line in wrapped[1:]]
    if name == HEADS and metavar == "SPEC":
        forms = selector_help()
        width = max(len(form) for form, _ in forms) + 2
        lines += [" " * (FLAG_WIDTH + 2) + f"{form:<{width}}{what}".rstrip() for form, what in forms]
    return lines


def command_help(command: str) -> str:
    """`locedit COMMAND --help`: usage, what it does, its own flags by purpose, and the pointer to --help-all."""
    usage, about, groups = COMMANDS[command]
    defaults = _defaults()
    lines = [f"usage: {usage}", "", *textwrap.wrap(about, WIDTH)]
    for title, flags in groups:
        lines += ["", f"{title}:"]
        for name, metavar, text in flags:
            lines += _entry(name, metavar, text, defaults.get(name))
    lines += ["", f"all training fields: locedit {command} --help-all"]
    return "\n".join(lines)


def full_help(command: str) -> str:
    """`locedit COMMAND --help-all`: the recipe parser's help of every field (imports TRL), heads from the registry."""
    from ..config import make_parser

    parser = make_parser(f"locedit {command}")
    for action in parser._actions:
        if action.dest == HEADS:
            action.help = heads_help()
    return parser.format_help()


def answer_help(command: str, argv: list[str]) -> bool:
    """Print the help `argv` asks for (-h/--help, --help-all), if any; returns whether it did."""
    request = help_request(argv)
    if request is None:
        return False
    text = full_help(command) if request == "all" else command_help(command)
    print(text)
    return True
