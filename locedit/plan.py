"""The run plan: everything a training or ITI recipe resolves to before any weights are loaded.

Every check that can fail on a user's mistake (recipe keys, head spec, data file, model layout, a locator's saved
result) runs here, so a typo ends the run in seconds with one line, not after the weights have loaded. The recipe's
head spec is parsed here, once (`plan.spec`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .config import LocEditConfig
from .core import threads
from .core.args import PAIR_SCORING_SWITCHES, EditArguments, ModelArguments
from .core.cache import check_cache_writable
from .core.errors import RecipeError
from .core.recipe import Recipe
from .data import load_preference_splits, question_counts, validate_dataset_arg
from .edit import HeadEditConfig
from .heads import HeadSpec, format_heads, heads_by_layer
from .locate import LOCATORS
from .models.chat import chat_tokenizer
from .models.layout import AttentionLayout
from .models.loading import config_head_dim, read_model_config
from .rundir import check_output_dir, output_dir_of


@dataclass
class RunPlan:
    """Everything resolved before any weights are loaded.

    A score-driven spec (`probe:K`, `importance:K`) whose locator has no saved result yet leaves `heads` and
    `edit_config` None: the locator must run on the loaded model first (`locedit.pipelines.locate.locate_heads`),
    writing its result to `located_dirs[locator]`.
    """

    model_path: str
    layout: AttentionLayout
    head_dim: int
    spec: HeadSpec
    heads: list[tuple[int, int]] | None
    edit_config: HeadEditConfig | None
    splits: object  # datasets.DatasetDict
    output_dir: str
    recipe_name: str
    located: dict[str, object] = field(default_factory=dict)  # locator name -> its result, once there is one
    located_dirs: dict[str, str] = field(default_factory=dict)  # locator name -> where its result is or will be
    finished: bool = False  # output_dir holds this very run, finished
    data_rows_skipped: int = 0  # bad data rows left out under `bad_rows: skip`, recorded in metrics.json

    @property
    def probe_result(self):
        """ITI's probes (locedit.locate.ProbeResult), once there are some."""
        return self.located.get("probe")

    @property
    def probe_dir(self) -> str | None:
        return self.located_dirs.get("probe")

    @property
    def missing(self) -> list[str]:
        """The locators the run needs whose result must be computed on the loaded model."""
        return [name for name in self.located_dirs if self.located.get(name) is None]

    def use_result(self, locator: str, result, directory: str, recipe: Recipe) -> None:
        """Keep a locator's result; a spec that ranks its scores resolves from it."""
        self.located[locator], self.located_dirs[locator] = result, directory
        if self.spec.locator == locator:
            self.heads = self.spec.resolve(self.layout, LOCATORS[locator].scores(result))
            self.edit_config = edit_config_for(self.layout, self.heads, recipe)

    @property
    def trainable_parameters(self) -> int:
        per_layer = self.layout.num_heads * self.head_dim
        vectors = 2 if self.edit_config.edit_strength == "adaptive" else 1
        return vectors * per_layer * len(heads_by_layer(self.heads))

    def _draws(self) -> str:
        if not self.spec.is_multi_edit:
            return ""
        return f" ({len(self.spec.edits(self.layout))} edits trained in one pass; the first)"

    def heads_line(self) -> str:
        """What the head spec resolved to, or, for a score-driven spec with no result yet, what will happen."""
        spec, locator = self.spec, self.spec.locator
        if self.heads is None:
            what = LOCATORS[locator].score_name
            return (
                f"{spec} -> the {spec.count} heads of highest {what}, known after the {locator} stage: no {locator} "
                f"result at {self.located_dirs[locator]} yet, so the {locator} stage runs first"
            )
        heads = format_heads(self.heads)
        if len(heads) > 80:
            heads = heads[:77] + "..."
        layers = len(heads_by_layer(self.heads))
        count = f"{len(self.heads)} heads in {layers} layer{'s' if layers != 1 else ''}"
        if len(self.heads) == 1:
            count = "1 head"  # its name says its layer
        line = f"{spec}{self._draws()} -> {count}: {heads}"
        if locator is not None and self.located.get(locator) is not None:
            scores = LOCATORS[locator].scores(self.located[locator])
            picked = [float(scores[layer][head]) for layer, head in self.heads]
            line += (
                f" ({locator} {self.located_dirs[locator]}: {LOCATORS[locator].score_name} "
                f"{min(picked):.3g}-{max(picked):.3g})"
            )
        return line

    def data_line(self, edit_args: EditArguments) -> str:
        pairs = {name: len(split) for name, split in self.splits.items()}
        questions = question_counts(self.splits)
        data = ", ".join(f"{name} {pairs[name]} pairs ({questions[name]} questions)" for name in pairs)
        skipped = f"; {self.data_rows_skipped} bad row(s) left out (bad_rows: skip)" if self.data_rows_skipped else ""
        return f"{edit_args.dataset}: {data}{skipped}"

    def describe(self, model_args: ModelArguments, edit_args: EditArguments, args: LocEditConfig) -> str:
        if self.edit_config is None:
            edit = f"{edit_args.edit_strength} strength; trainable parameters known once the heads are"
        else:
            read = "every head" if self.edit_config.edit_read == "all" else "the selected heads"
            edit = (
                f"{self.edit_config.edit_strength} strength reading {read}; "
                f"{self.trainable_parameters} trainable parameters"
            )
        lines = [
            "locedit plan",
            f"  model        {model_args.model_name_or_path} ({self.layout.model_type}, {self.layout.shape}, "
            f"head_dim {self.head_dim})",
            f"  threads      {threads.describe()}",
            f"  heads        {self.heads_line()}",
            f"  edit         {edit}",
            f"  data         {self.data_line(edit_args)}",
            f"  training     IPO tau {args.beta:g}, lr {args.learning_rate:g} {_plain(args.lr_scheduler_type)}, "
            f"{_length(args)}, batch {args.per_device_train_batch_size} per device, "
            f"optim {_plain(args.optim)}, bf16 {args.bf16}",
            f"  output_dir   {self.output_dir}",
        ]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------


def _length(args: LocEditConfig) -> str:
    """How long the run trains (max_steps, when set, overrides the epochs) and how its pairs are drawn."""
    length = f"{args.max_steps} steps" if args.max_steps > 0 else f"{args.num_train_epochs:g} epoch(s)"
    if args.pair_draw == "question":
        return f"{length} over the training questions, a fresh pair of each per epoch (pair_draw question)"
    return f"{length} over the training pairs (pair_draw pair)"


def _plain(value) -> str:
    """An enum's value (TrainingArguments turns some strings into enums), else the value itself."""
    return str(getattr(value, "value", value))


def edit_config_for(layout: AttentionLayout, heads: list[tuple[int, int]], recipe: Recipe) -> HeadEditConfig:
    """The edit config of a recipe at `heads`: its edit_read and edit_strength, a's init seeded by its seed."""
    edit_args = recipe.edit
    return HeadEditConfig.for_heads(
        layout,
        heads,
        edit_read=edit_args.edit_read,
        edit_strength=edit_args.edit_strength,
        init_seed=recipe.training.seed,
    )


def check_pair_scoring(recipe: Recipe) -> None:
    """The pair-scoring switches against what they cannot work with, before any weights load."""
    args = recipe.training
    attention = recipe.model.attn_implementation or ""
    if (args.share_prompt or args.pack_sequences) and attention.startswith("flash"):
        raise RecipeError(
            f"share_prompt and pack_sequences need an attention that takes a block mask, not attn_implementation "
            f"'{attention}'; use sdpa or eager, or set both to false"
        )
    sharded = args.fsdp or args.deepspeed or os.environ.get("ACCELERATE_USE_FSDP") == "true"
    sharded = sharded or os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"
    if sharded and any(getattr(args, name) for name in PAIR_SCORING_SWITCHES):
        raise RecipeError(
            f"{', '.join(PAIR_SCORING_SWITCHES)} do not work with FSDP or DeepSpeed (they run parts of the model on "
            "their own); set them to false"
        )


def check_max_length(recipe: Recipe, model_path: str, pairs, tokenizer=None) -> None:
    """max_length leaves a completion token in some training pair (TRL cuts each sequence to it, keeping its start):
    one line now, not an empty batch after the weights load. Needs only the tokenizer (`tokenizer`, when the plan
    loaded it already); a model directory without one is left to the loader."""
    from transformers import AutoTokenizer

    max_length, args = recipe.training.max_length, recipe.training
    if max_length is None or len(pairs) == 0:
        return
    prompts = pairs["prompt"]
    # A token covers at least one byte of text, so a text prompt has at most its bytes' count of tokens plus the
    # few special ones the tokenizer adds: when the shortest is well below max_length, no tokenizer is needed.
    if not isinstance(prompts[0], list) and min(len(p.encode()) for p in prompts) + 16 < max_length:
        return
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                model_path, revision=recipe.model.model_revision, trust_remote_code=args.trust_remote_code
            )
        except (OSError, ValueError):
            return
    if isinstance(prompts[0], list):  # conversations: the chat template's prompt, as TRL tokenizes it
        encoded = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True) for p in prompts]
        lengths = [len(e["input_ids"] if hasattr(e, "keys") else e) for e in encoded]
    else:
        lengths = [len(ids) for ids in tokenizer(list(prompts))["input_ids"]]
    if min(lengths) >= max_length:
        raise RecipeError(
            f"max_length {max_length} leaves no completion token in any training pair: the shortest prompt is "
            f"{min(lengths)} tokens (the longest {max(lengths)}); set max_length above {min(lengths)}"
        )


def make_plan(recipe: Recipe, need_probe: bool = False, output_dir: str | None = None) -> RunPlan:
    """Check the recipe and resolve everything that needs no weights. `need_probe` (ITI) looks for a probe result
    whatever the head spec; a `probe:K` spec always does. `output_dir` defaults to the recipe's training run
    directory."""
    edit_args = recipe.edit
    spec = HeadSpec.of(edit_args)
    output_dir = output_dir or output_dir_of(recipe, spec)
    if float(edit_args.split_fractions[2]) <= 0:  # three numbers: EditArguments checks that
        raise RecipeError(
            f"split_fractions {list(edit_args.split_fractions)} leave no test questions; locedit evaluates every edit "
            "on held-out test questions, so give the test split (the third number) a fraction > 0"
        )
    if spec.is_multi_edit and not recipe.training.precompute_ref_log_probs:
        raise RecipeError(
            f"heads '{edit_args.heads}' with heads_draws {edit_args.heads_draws} trains many edits in one run, which "
            "needs precompute_ref_log_probs: true"
        )
    check_pair_scoring(recipe)
    check_cache_writable()  # models built, reference log-probs and frozen prefixes are kept there
    # What the run reads (data, model) is checked before where it writes: a missing data file or model is named as
    # such, never hidden behind a run directory that holds a run on other data.
    validate_dataset_arg(edit_args.dataset)
    # A dry run loads no weights: a GGUF model is not converted for it (its config and tokenizer are read instead).
    weights = not edit_args.dry_run
    model_path, config, layout = read_model_config(recipe.model, recipe.training.trust_remote_code, weights)
    tokenizer = None
    if edit_args.chat_template:  # the tokenizer must have one: one line now, not TRL's error after the weights load
        tokenizer = chat_tokenizer(model_path, recipe.model, recipe.training.trust_remote_code)
    spec.check(layout)  # K against the model's heads, before any data is read
    # A multi-edit spec (single:K, or heads_draws > 1) is checked on every draw; the plan shows the first.
    draws = spec.edits(layout)
    heads = None if spec.locator else [draw.resolve(layout) for draw in draws][0]
    splits = load_preference_splits(**edit_args.pair_source())
    if len(splits["train"]) == 0:
        raise RecipeError(f"data set '{edit_args.dataset}' gives no training pairs")
    check_max_length(recipe, model_path, splits["train"], tokenizer)
    if len(splits["test"]) == 0:
        raise RecipeError(
            f"data set '{edit_args.dataset}' gives no test questions with split_fractions "
            f"{list(edit_args.split_fractions)}: too few questions for a test split"
        )
    finished = check_output_dir(output_dir, recipe)  # creatable, writable, and no other run's
    plan = RunPlan(
        model_path=model_path,
        layout=layout,
        head_dim=config_head_dim(config, layout),
        spec=spec,
        heads=heads,
        edit_config=None if heads is None else edit_config_for(layout, heads, recipe),
        splits=splits,
        output_dir=output_dir,
        recipe_name=recipe.name,
        finished=finished,
        data_rows_skipped=splits.skipped_rows,
    )
    # The locators the run needs: the spec's own (probe:K, importance:K), and ITI's probes (`need_probe`).
    for locator in dict.fromkeys([*([spec.locator] if spec.locator else []), *(["probe"] if need_probe else [])]):
        result, directory = LOCATORS[locator].find(recipe, model_path, layout)
        plan.located_dirs[locator] = directory
        if result is not None:
            plan.use_result(locator, result, directory, recipe)
    return plan
