"""The fields of a locedit recipe: what to edit, which data, which model, probing, evaluation and the study.

Plain dataclasses: how to train is TRL's DPOConfig with locedit's defaults, `locedit.config.LocEditConfig`, so that
`locedit.core` imports nothing of torch, transformers or TRL."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

# The marker of a field whose value determines a run's result (in its metadata): a run directory holding a run made
# with another value is refused, not overwritten (locedit.rundir.run_result_settings, locedit.evaluation.plan).
RESULT_KEY = "result"


def result_settings(*classes) -> tuple[str, ...]:
    """The result-determining fields of these argument classes, in order: those marked RESULT_KEY, and the fields a
    class inherits from TRL that determine a result too (its `inherited_result_settings`)."""
    names = []
    for cls in classes:
        names += [f.name for f in dataclasses.fields(cls) if f.metadata.get(RESULT_KEY)]
        names += [name for name in getattr(cls, "inherited_result_settings", ()) if name not in names]
    return tuple(names)


# The degenerate share above which an edit is broken by default (locedit.evaluation.breakage).
DEFAULT_MAX_DEGENERATE = 0.25

# What the edit strength reads, and what it is (locedit.edit): choices of the recipe fields below.
EDIT_READS = ("all", "heads")
EDIT_STRENGTHS = ("adaptive", "constant")
# How a training run draws its pairs (LocEditConfig.pair_draw): question by question, or uniformly over pairs.
PAIR_DRAWS = ("question", "pair")
# What a recipe's `bad_rows` does with a data row that cannot make a pair (locedit.data.sources.bad_row_problem):
# refuse the data set with one line naming the row, or leave the row out and count it.
BAD_ROW_POLICIES = ("refuse", "skip")


@dataclass
class EditArguments:
    """Where the edit goes, what it is, and the preference data it is trained on."""

    heads: str = field(
        default="all",
        metadata={
            RESULT_KEY: True,
            "help": "Heads to edit (0-based), e.g. 'all', 'L12H3,L14H0' or 'random:16'; `locedit train --help` "
            "lists every form (the selector registry, locedit.heads).",
        },
    )
    heads_seed: int = field(
        default=0, metadata={RESULT_KEY: True, "help": "Seed of the draw for 'random:K' head specs."}
    )
    heads_draws: int = field(
        default=1,
        metadata={
            RESULT_KEY: True,
            "help": "Train this many random draws of the head spec (seeds heads_seed, heads_seed+1, ...) in one pass "
            "per step; 'single:K' is K distinct random single heads.",
        },
    )
    edit_read: str = field(
        default="all",
        metadata={
            RESULT_KEY: True,
            "help": "What the edit strength <a, o> reads: 'all' heads (the paper) or only the selected 'heads'.",
            "choices": list(EDIT_READS),
        },
    )
    edit_strength: str = field(
        default="adaptive",
        metadata={
            RESULT_KEY: True,
            "help": "'adaptive': o + <a,o>(m*b) (the paper); 'constant': o + m*b, a learned vector at the heads.",
            "choices": list(EDIT_STRENGTHS),
        },
    )
    dataset: str = field(
        default="truthfulqa/truthful_qa",
        metadata={
            RESULT_KEY: True,
            "help": "Preference data: a Hub id, a local .csv/.json/.jsonl/.parquet file, 'synthetic' "
            "(a small question set the project generates) or 'toy' / 'toy:key=value,...' (the toy world's questions).",
        },
    )
    dataset_config: str | None = field(
        default="generation", metadata={RESULT_KEY: True, "help": "Hub config of the data set."}
    )
    split_fractions: list[float] = field(
        default_factory=lambda: [0.6, 0.2, 0.2],
        metadata={
            RESULT_KEY: True,
            "help": "Fractions of questions for train, validation and test (split by question).",
        },
    )
    split_seed: int = field(default=0, metadata={RESULT_KEY: True, "help": "Seed of the question split."})
    prompt_template: str = field(
        default="Q: {question}\nA:", metadata={RESULT_KEY: True, "help": "Prompt built from a question."}
    )
    completion_template: str = field(
        default=" {answer}", metadata={RESULT_KEY: True, "help": "Completion built from an answer."}
    )
    chat_template: bool = field(
        default=False,
        metadata={RESULT_KEY: True, "help": "Wrap prompts in the tokenizer's own chat template (instruct models)."},
    )
    group_by: str | None = field(
        default=None,
        metadata={
            RESULT_KEY: True,
            "help": "Column kept together by the split (default: the question, or the prompt).",
        },
    )
    max_pairs_per_question: int | None = field(
        default=None, metadata={RESULT_KEY: True, "help": "Keep at most this many (seeded) pairs per question."}
    )
    # Not result-determining: a data set with bad rows either fails ("refuse") or trains on its good rows ("skip").
    bad_rows: str = field(
        default="refuse",
        metadata={
            "help": "A data row that cannot make a pair (a value that is not text, an empty field, chosen equal to "
            "rejected): 'refuse' (one line naming the file, line and field) or 'skip' (left out, counted as "
            "data_rows_skipped in metrics.json).",
            "choices": list(BAD_ROW_POLICIES),
        },
    )
    wandb_project: str | None = field(
        default=None,
        metadata={
            "help": "The project of the runs on trackio and W&B (report_to); default locedit-RECIPE (the recipe "
            "file's name)."
        },
    )
    dry_run: bool = field(
        default=False,
        metadata={"help": "Check the recipe, resolve the heads without loading weights, print the plan and stop."},
    )

    def split_source(self) -> dict:
        """The arguments of `locedit.data.load_questions` that fix which questions land in which split."""
        return {
            "dataset": self.dataset,
            "dataset_config": self.dataset_config,
            "split_fractions": tuple(self.split_fractions),
            "seed": self.split_seed,
            "group_by": self.group_by,
            "bad_rows": self.bad_rows,
        }

    def split_settings(self) -> dict:
        """The same settings as a result made on the split records them (probe and importance results)."""
        return {
            "dataset": self.dataset,
            "dataset_config": self.dataset_config,
            "split_fractions": [float(f) for f in self.split_fractions],
            "split_seed": self.split_seed,
            "group_by": self.group_by,
        }

    def pair_source(self) -> dict:
        """The arguments of `locedit.data.load_preference_splits` that make this recipe's pairs."""
        return {
            **self.split_source(),
            "prompt_template": self.prompt_template,
            "completion_template": self.completion_template,
            "max_pairs_per_question": self.max_pairs_per_question,
            "chat_template": self.chat_template,
        }

    def __post_init__(self):
        # argparse checks `choices` on the command line only, not on values that come from a recipe.
        check_choice("edit_read", self.edit_read, EDIT_READS)
        check_choice("edit_strength", self.edit_strength, EDIT_STRENGTHS)
        check_choice("bad_rows", self.bad_rows, BAD_ROW_POLICIES)
        if len(self.split_fractions) != 3:
            raise ValueError(f"split_fractions {self.split_fractions} must be three numbers: train, validation, test")
        check_at_least("heads_draws", self.heads_draws, 1)


@dataclass
class StudyArguments:
    """`locedit study`: how many random head sets and single heads it trains, and their learning rates."""

    study_random: int = field(default=8, metadata={"help": "Random sets of K heads (the paper draws 16)."})
    study_single: int = field(default=8, metadata={"help": "Random single heads (the paper draws 24)."})
    study_lr_all: float | None = field(
        default=None, metadata={"help": "Learning rate of the all-heads edit; default the recipe's x 0.2 (paper)."}
    )
    study_lr_single: float | None = field(
        default=None, metadata={"help": "Learning rate of single-head edits; default the recipe's x 4 (paper)."}
    )
    study_metric: str | None = field(
        default=None,
        metadata={
            "help": "The verdict's score (a metric `locedit report --metric` takes, e.g. mc2, mc2_sc); default "
            "true_info with both judges, true with a truth judge alone, else mc2."
        },
    )
    study_heuristics: str = field(
        default="none",
        metadata={
            "help": "Localization heuristics besides the probes whose K best heads get their own optimal edit, "
            "comma-separated ('importance': gradient head importance); 'none' (the default) for none."
        },
    )

    def __post_init__(self):
        for name in ("study_random", "study_single"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} {getattr(self, name)} is not valid: it must be 0 or more")
        for name in ("study_lr_all", "study_lr_single"):
            if getattr(self, name) is not None:
                check_positive(name, getattr(self, name))


@dataclass
class ProbeArguments:
    """Probing heads for the behaviour (ITI's localization heuristic) and ITI's own edit."""

    probe_results: str | None = field(
        default=None, metadata={"help": "A saved probe result directory, read by 'probe:K' head specs."}
    )
    probe_template: str = field(
        default="Q: {question} A: {answer} Q: {other_question}",
        metadata={
            RESULT_KEY: True,
            "help": "Probe example: a question, a correct (label 1) or incorrect (0) answer, another question.",
        },
    )
    probe_val_fraction: float = field(
        default=0.2,
        metadata={RESULT_KEY: True, "help": "Fraction of the training questions held out to score the probes."},
    )
    probe_seed: int = field(
        default=0,
        metadata={
            RESULT_KEY: True,
            "help": "Seed of the other question in each probe example and of the held-out part.",
        },
    )
    probe_standardize: bool = field(
        default=False,
        metadata={
            RESULT_KEY: True,
            "help": "Fit the probes on z-scored activations (ITI fits raw ones; with C=1 raw activations of a tiny "
            "scale give constant probes).",
        },
    )
    probe_batch_size: int = field(default=16, metadata={"help": "Examples per forward pass when collecting."})
    probe_output_dir: str | None = field(
        default=None, metadata={"help": "Where probe results go; default outputs/<recipe>/probe."}
    )
    iti_alpha: float = field(default=15.0, metadata={RESULT_KEY: True, "help": "ITI's intervention strength alpha."})

    def __post_init__(self):
        if not (isinstance(self.iti_alpha, int | float) and math.isfinite(self.iti_alpha)):
            raise ValueError(f"iti_alpha {self.iti_alpha} is not valid: it must be a finite number")


@dataclass
class EvalArguments:
    """Evaluating edits by what the edited model generates, and by how much it disturbs the model elsewhere."""

    eval_after_train: bool = field(
        default=False, metadata={"help": "Evaluate the edit on the test questions when training ends."}
    )
    eval_judge_truth: str = field(
        default="auto",
        metadata={
            RESULT_KEY: True,
            "help": "Truth judge: 'auto' (the open 7B judge hf:allenai/truthfulqa-truth-judge-llama2-7B where a GPU "
            "is, the cpu judge elsewhere), 'cpu' (trains and runs on a CPU, from eval_judge_data), 'hf:MODEL' (local "
            "causal LM), 'openai:MODEL' (OPENAI_BASE_URL), 'similarity' (BLEU against the references), 'toy' (the "
            "toy world's exact judge) or 'none'.",
        },
    )
    eval_judge_info: str = field(
        default="auto",
        metadata={RESULT_KEY: True, "help": "Informativeness judge, as eval_judge_truth (auto: the 7B info judge)."},
    )
    eval_judge_data: str | None = field(
        default=None,
        metadata={
            RESULT_KEY: True,
            "help": "Where 'cpu' judges are trained from on first use: a folder with TruthfulQA's judge data "
            "(finetune_truth.jsonl, finetune_info.jsonl) and TruthfulQA.csv.",
        },
    )
    eval_rejudge: bool = field(
        default=False,
        metadata={
            "help": "An earlier evaluation made with other judges (or judge data) alone is judged again from its "
            "saved generations, MC and corpus scores (nothing is generated again); false: it is refused."
        },
    )
    eval_judge_dtype: str = field(
        default="auto",
        metadata={
            RESULT_KEY: True,
            "help": "Weights dtype of hf: judges.",
            "choices": ["auto", "bfloat16", "float16", "float32"],
        },
    )
    eval_prompt: str = field(
        default="none",
        metadata={
            RESULT_KEY: True,
            "help": "What precedes the training prompt_template: 'none', ITI's 'instruction', TruthfulQA's QA "
            "'primer' (six Q/A pairs), or 'iti' (instruction then primer, ITI's evaluation).",
            "choices": ["none", "instruction", "primer", "iti"],
        },
    )
    eval_max_new_tokens: int = field(
        default=50, metadata={RESULT_KEY: True, "help": "Most tokens generated per answer."}
    )
    eval_batch_size: int = field(default=16, metadata={"help": "Prompts per batch for generation and scoring."})
    eval_max_questions: int | None = field(
        default=None,
        metadata={RESULT_KEY: True, "help": "Evaluate only the first N test questions (by id), for quick checks."},
    )
    eval_mc: bool = field(default=True, metadata={RESULT_KEY: True, "help": "Compute MC1/MC2 from answer log-probs."})
    eval_mc_share_prompt: bool = field(
        default=True,
        metadata={
            "help": "Score a question's MC choices in one sequence that runs its prompt once (exact; sdpa or eager "
            "attention); false: each choice with its own copy of the prompt."
        },
    )
    eval_mc_targets: str | None = field(
        default="auto",
        metadata={
            RESULT_KEY: True,
            "help": "The choices of MC1/MC2: 'auto' (TruthfulQA's Hub multiple_choice configuration for the Hub "
            "TruthfulQA generation data, else the data's answers), 'answers' or 'none' (the data's best, correct "
            "and incorrect answers), or a local .json/.jsonl/.parquet file in the multiple_choice format.",
        },
    )
    eval_corpus: str = field(
        default="stas/openwebtext-10k",
        metadata={
            RESULT_KEY: True,
            "help": "Text for KL and cross-entropy: a Hub data set with a 'text' column (streamed), a local "
            ".jsonl/.json file ('text' field) or text file (documents separated by blank lines), 'toy' (the toy "
            "world's statements) or 'none'.",
        },
    )
    eval_corpus_docs: int = field(
        default=100, metadata={RESULT_KEY: True, "help": "Documents of eval_corpus used (the first N)."}
    )
    eval_corpus_max_tokens: int = field(
        default=128, metadata={RESULT_KEY: True, "help": "Each document is cut at this many tokens."}
    )
    eval_max_kl: float | None = field(
        default=None,
        metadata={
            "help": "The break detector: an edit whose KL from the base model is above this is broken (flagged, and "
            "left out of every best and verdict); null: KL alone breaks nothing."
        },
    )
    eval_max_degenerate: float | None = field(
        default=DEFAULT_MAX_DEGENERATE,
        metadata={
            "help": "The break detector: an edit with more than this share of degenerate answers (empty, "
            "repetitive, the prompt's format, cut off) is broken; a diverged training always is; null: off."
        },
    )
    eval_merge: bool = field(
        default=True,
        metadata={"help": "Merge the edit into the weights for generation (not for quantised weights)."},
    )
    eval_output_dir: str | None = field(
        default=None, metadata={"help": "Where the base model's evaluation goes; default <runs' parent>/base."}
    )

    def __post_init__(self):
        # Checked as the recipe is read, so every command (a dry run, a training that evaluates later) refuses them.
        for name in ("eval_max_new_tokens", "eval_batch_size", "eval_corpus_docs"):
            check_at_least(name, getattr(self, name), 1)
        if self.eval_max_questions is not None:
            check_at_least("eval_max_questions", self.eval_max_questions, 1)
        check_at_least("eval_corpus_max_tokens", self.eval_corpus_max_tokens, 2)  # cross-entropy predicts a token
        if self.eval_max_kl is not None and not (
            isinstance(self.eval_max_kl, int | float) and math.isfinite(self.eval_max_kl) and self.eval_max_kl >= 0
        ):
            raise ValueError(f"eval_max_kl {self.eval_max_kl} is not valid: it must be a KL, 0 or more, or null")
        if self.eval_max_degenerate is not None and not (
            isinstance(self.eval_max_degenerate, int | float) and 0 <= self.eval_max_degenerate <= 1
        ):
            raise ValueError(
                f"eval_max_degenerate {self.eval_max_degenerate} is not valid: it must be a share from 0 to 1, or null"
            )


@dataclass
class ModelArguments:
    """The base model. Like TRL's ModelConfig without its LoRA fields: locedit builds its own adapter.

    (`trust_remote_code` is a field of the training arguments, as in TRL's DPOConfig.)
    """

    model_name_or_path: str = field(
        default="tiny:llama",
        metadata={
            RESULT_KEY: True,
            "help": "Hub id or local path of the base model, 'tiny:ARCH' for a tiny model built locally, or 'toy' "
            "for the toy world's pre-trained model.",
        },
    )
    model_revision: str = field(default="main", metadata={RESULT_KEY: True, "help": "Model revision on the Hub."})
    dtype: str | None = field(
        default="auto",
        metadata={RESULT_KEY: True, "help": "Weights dtype.", "choices": ["auto", "bfloat16", "float16", "float32"]},
    )
    attn_implementation: str | None = field(default=None, metadata={"help": "e.g. 'sdpa' or 'flash_attention_2'."})
    load_in_8bit: bool = field(
        default=False, metadata={RESULT_KEY: True, "help": "Load the base model in 8-bit (bitsandbytes)."}
    )
    load_in_4bit: bool = field(
        default=False, metadata={RESULT_KEY: True, "help": "Load the base model in 4-bit (bitsandbytes)."}
    )
    bnb_4bit_quant_type: str = field(
        default="nf4", metadata={RESULT_KEY: True, "help": "4-bit quantisation type.", "choices": ["fp4", "nf4"]}
    )
    use_bnb_nested_quant: bool = field(default=False, metadata={"help": "Nested 4-bit quantisation."})
    bnb_4bit_quant_storage: str | None = field(default=None, metadata={"help": "Storage dtype of 4-bit weights."})

    def __post_init__(self):
        check_choice("dtype", self.dtype, ("auto", "bfloat16", "float16", "float32", None))
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("load_in_4bit and load_in_8bit are both set; choose one")


# LocEditConfig's switches of how the pairs' log-probs are computed (locedit.training.pair_logps), all exact.
PAIR_SCORING_SWITCHES = ("score_completions_only", "share_prompt", "frozen_prefix", "pack_sequences")


_warned: set[str] = set()


def warn_once(message: str) -> None:
    """A notice is said once per process, however many recipes are parsed (a sweep parses one per run)."""
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def check_positive(name: str, value, meaning: str = "") -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        what = f" ({meaning})" if meaning else ""
        raise ValueError(f"{name}{what} {value} is not valid: it must be a number > 0")


def check_at_least(name: str, value, least: int) -> None:
    if not (isinstance(value, int) and value >= least):
        raise ValueError(f"{name} {value} is not valid: it must be an integer >= {least}")


def check_choice(name: str, value, valid) -> None:
    if value not in valid:
        raise ValueError(f"{name} '{value}' is not valid; choose one of {', '.join(str(v) for v in valid if v)}")
