"""The run plan: everything a training or ITI recipe resolves to before any weights are loaded.

Every check that can fail on a user's mistake (recipe keys, head spec, data file, model layout, probe result) runs
here, so a typo ends the run in seconds with one line, not after the weights have loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .core.args import PAIR_SCORING_SWITCHES, EditArguments, LocEditConfig, ModelArguments
from .core.errors import RecipeError
from .core.recipe import Recipe
from .data import load_preference_splits, question_counts, validate_dataset_arg
from .edit import HeadEditConfig
from .heads import (
    expand_head_specs,
    format_heads,
    heads_by_layer,
    is_multi_edit,
    is_probe_spec,
    probe_head_count,
    resolve_heads,
)
from .locate import find_probe_result, make_probe_stage, run_probe_stage
from .models.chat import chat_tokenizer
from .models.layout import AttentionLayout
from .models.loading import config_head_dim, read_model_config
from .rundir import check_output_dir, output_dir_of


@dataclass
class RunPlan:
    """Everything resolved before any weights are loaded.

    A `probe:K` spec with no probe result yet leaves `heads` and `edit_config` None: the probe stage must run on the
    loaded model first (`resolve_probe_heads`), writing its result to `probe_dir`.
    """

    model_path: str
    layout: AttentionLayout
    head_dim: int
    heads: list[tuple[int, int]] | None
    edit_config: HeadEditConfig | None
    splits: object  # datasets.DatasetDict
    output_dir: str
    recipe_name: str
    probe_dir: str | None = None  # where the probe result is, or will be written
    probe_result: object = None  # locedit.locate.ProbeResult, once there is one
    finished: bool = False  # output_dir holds this very run, finished

    def use_probe_result(self, result, probe_dir: str, recipe: Recipe) -> None:
        """Resolve a `probe:K` spec from a probe result (the K heads of highest validation accuracy)."""
        self.probe_result, self.probe_dir = result, probe_dir
        if is_probe_spec(recipe.edit.heads):
            self.heads = resolve_heads(recipe.edit.heads, self.layout, probe_scores=result.val_accuracy.tolist())
            self.edit_config = edit_config_for(self.layout, self.heads, recipe)

    @property
    def trainable_parameters(self) -> int:
        per_layer = self.layout.num_heads * self.head_dim
        vectors = 2 if self.edit_config.edit_strength == "adaptive" else 1
        return vectors * per_layer * len(heads_by_layer(self.heads))

    def _draws(self, edit_args: EditArguments) -> str:
        if not is_multi_edit(edit_args.heads, edit_args.heads_draws):
            return ""
        count = len(expand_head_specs(edit_args.heads, edit_args.heads_seed, edit_args.heads_draws, self.layout))
        return f" ({count} edits trained in one pass; the first)"

    def heads_line(self, edit_args: EditArguments) -> str:
        """What the head spec resolved to, or, for a probe spec with no probe result yet, what will happen."""
        if self.heads is None:
            return (
                f"{edit_args.heads} -> the {probe_head_count(edit_args.heads, self.layout)} best-probing heads, "
                f"known after probing: no probe result at {self.probe_dir} yet, so the probe stage runs first"
            )
        heads = format_heads(self.heads)
        if len(heads) > 80:
            heads = heads[:77] + "..."
        line = (
            f"{edit_args.heads}{self._draws(edit_args)} -> {len(self.heads)} heads in "
            f"{len(heads_by_layer(self.heads))} layers: {heads}"
        )
        if is_probe_spec(edit_args.heads) and self.probe_result is not None:
            accuracy = self.probe_result.val_accuracy
            picked = [float(accuracy[layer, head]) for layer, head in self.heads]
            line += f" (probe {self.probe_dir}: validation accuracy {min(picked):.3f}-{max(picked):.3f})"
        return line

    def data_line(self, edit_args: EditArguments) -> str:
        pairs = {name: len(split) for name, split in self.splits.items()}
        questions = question_counts(self.splits)
        data = ", ".join(f"{name} {pairs[name]} pairs ({questions[name]} questions)" for name in pairs)
        return f"{edit_args.dataset}: {data}"

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
            f"  heads        {self.heads_line(edit_args)}",
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
    """How long the run trains: max_steps, when set, overrides the epochs."""
    return f"{args.max_steps} steps" if args.max_steps > 0 else f"{args.num_train_epochs:g} epochs"


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


def make_plan(recipe: Recipe, need_probe: bool = False, output_dir: str | None = None) -> RunPlan:
    """Check the recipe and resolve everything that needs no weights. `need_probe` (ITI) looks for a probe result
    whatever the head spec; a `probe:K` spec always does. `output_dir` defaults to the recipe's training run
    directory."""
    edit_args = recipe.edit
    output_dir = output_dir or output_dir_of(recipe)
    if float(edit_args.split_fractions[2]) <= 0:  # three numbers: EditArguments checks that
        raise RecipeError(
            f"split_fractions {list(edit_args.split_fractions)} leave no test questions; locedit evaluates every edit "
            "on held-out test questions, so give the test split (the third number) a fraction > 0"
        )
    if is_multi_edit(edit_args.heads, edit_args.heads_draws) and not recipe.training.precompute_ref_log_probs:
        raise RecipeError(
            f"heads '{edit_args.heads}' with heads_draws {edit_args.heads_draws} trains many edits in one run, which "
            "needs precompute_ref_log_probs: true"
        )
    check_pair_scoring(recipe)
    finished = check_output_dir(output_dir, recipe)  # creatable, writable, and no other run's
    validate_dataset_arg(edit_args.dataset)
    model_path, config, layout = read_model_config(recipe.model, recipe.training.trust_remote_code)
    if edit_args.chat_template:  # the tokenizer must have one: one line now, not TRL's error after the weights load
        chat_tokenizer(model_path, recipe.model, recipe.training.trust_remote_code)
    probe_spec = is_probe_spec(edit_args.heads)
    if probe_spec:
        probe_head_count(edit_args.heads, layout)  # K against the model's heads, before any data is read
    # A multi-edit spec (single:K, or heads_draws > 1) is checked on every draw; the plan shows the first.
    draws = expand_head_specs(edit_args.heads, edit_args.heads_seed, edit_args.heads_draws, layout)
    heads = None if probe_spec else [resolve_heads(spec, layout, seed=seed) for spec, seed in draws][0]
    splits = load_preference_splits(
        **edit_args.split_source(),
        prompt_template=edit_args.prompt_template,
        completion_template=edit_args.completion_template,
        max_pairs_per_question=edit_args.max_pairs_per_question,
        chat_template=edit_args.chat_template,
    )
    if len(splits["train"]) == 0:
        raise RecipeError(f"data set '{edit_args.dataset}' gives no training pairs")
    if len(splits["test"]) == 0:
        raise RecipeError(
            f"data set '{edit_args.dataset}' gives no test questions with split_fractions "
            f"{list(edit_args.split_fractions)}: too few questions for a test split"
        )
    plan = RunPlan(
        model_path=model_path,
        layout=layout,
        head_dim=config_head_dim(config, layout),
        heads=heads,
        edit_config=None if heads is None else edit_config_for(layout, heads, recipe),
        splits=splits,
        output_dir=output_dir,
        recipe_name=recipe.name,
        finished=finished,
    )
    if probe_spec or need_probe:
        result, plan.probe_dir = find_probe_result(recipe, model_path, layout)
        if result is not None:
            plan.use_probe_result(result, plan.probe_dir, recipe)
    return plan


def resolve_probe_heads(plan: RunPlan, recipe: Recipe, model, tokenizer) -> None:
    """Run the probe stage on the loaded model (once, on the main process first), then resolve the heads from it."""
    from accelerate import PartialState

    stage = make_probe_stage(recipe, plan.model_path, plan.layout)
    with PartialState().main_process_first():
        result = run_probe_stage(stage, recipe, model, tokenizer)
    plan.use_probe_result(result, stage.output_dir, recipe)
