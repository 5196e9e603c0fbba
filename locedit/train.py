"""Train the optimal edit at a set of attention heads with IPO, from a recipe.

    accelerate launch -m locedit.train recipes/single_head.yaml
    python -m locedit.train recipes/tiny.yaml --heads L0H1 --learning_rate 2.0e-3
    python -m locedit.train recipes/all_heads.yaml --dry_run true

Every check that can fail on a user's mistake (recipe keys, head spec, data file, model layout) runs before any
weights are loaded, and ends the run with one line on stderr.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass

import yaml

from .config import EditArguments, LocEditConfig, ModelArguments
from .data import load_preference_splits, question_counts, validate_dataset_arg
from .edit import HeadEditConfig
from .heads import AttentionLayout, format_heads, heads_by_layer, is_probe_spec, probe_head_count, resolve_heads
from .multi import expand_head_specs, is_multi_edit
from .recipe import Recipe, RecipeError, run_command
from .tiny import resolve_model_path


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
    probe_result: object = None  # locedit.probe.ProbeResult, once there is one

    def use_probe_result(self, result, probe_dir: str, recipe: Recipe) -> None:
        """Resolve a `probe:K` spec from a probe result (the K heads of highest validation accuracy)."""
        self.probe_result, self.probe_dir = result, probe_dir
        if is_probe_spec(recipe.edit.heads):
            self.heads = resolve_heads(recipe.edit.heads, self.layout, probe_scores=result.val_accuracy.tolist())
            self.edit_config = _edit_config(self.layout, self.heads, recipe)

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
            f"{args.num_train_epochs:g} epochs, batch {args.per_device_train_batch_size} per device, "
            f"optim {_plain(args.optim)}, bf16 {args.bf16}",
            f"  output_dir   {self.output_dir}",
        ]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Planning: everything that can fail on a user's mistake, before any weights are loaded
# ---------------------------------------------------------------------------------------------------------------------


def read_model_config(recipe: Recipe):
    """The model's path (a `tiny:` name built and resolved), its config and its attention layout; no weights."""
    from transformers import AutoConfig

    model_args = recipe.model
    if model_args.load_in_4bit or model_args.load_in_8bit:
        import torch

        if not torch.cuda.is_available():
            raise RecipeError("load_in_4bit/load_in_8bit need a CUDA GPU (bitsandbytes); none is available")
    validate_dataset_arg(recipe.edit.dataset)
    model_path = resolve_model_path(model_args.model_name_or_path)
    try:
        config = AutoConfig.from_pretrained(
            model_path, revision=model_args.model_revision, trust_remote_code=recipe.training.trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise RecipeError(
            f"cannot read the config of model '{model_args.model_name_or_path}': {str(err).splitlines()[0]}"
        ) from None
    return model_path, config, AttentionLayout.from_config(config)


def _edit_config(layout: AttentionLayout, heads: list[tuple[int, int]], recipe: Recipe) -> HeadEditConfig:
    edit_args = recipe.edit
    return HeadEditConfig.for_heads(
        layout,
        heads,
        edit_read=edit_args.edit_read,
        edit_strength=edit_args.edit_strength,
        init_seed=recipe.training.seed,
    )


def make_plan(recipe: Recipe, need_probe: bool = False) -> RunPlan:
    """Check the recipe and resolve everything that needs no weights. `need_probe` (ITI) looks for a probe result
    whatever the head spec; a `probe:K` spec always does."""
    edit_args, args = recipe.edit, recipe.training
    model_path, config, layout = read_model_config(recipe)
    probe_spec = is_probe_spec(edit_args.heads)
    if probe_spec:
        probe_head_count(edit_args.heads, layout)  # K against the model's heads, before any data is read
    # A multi-edit spec (single:K, or heads_draws > 1) is checked on every draw; the plan shows the first.
    draws = expand_head_specs(edit_args.heads, edit_args.heads_seed, edit_args.heads_draws, layout)
    heads = None if probe_spec else [resolve_heads(spec, layout, seed=seed) for spec, seed in draws][0]
    splits = load_preference_splits(
        dataset=edit_args.dataset,
        dataset_config=edit_args.dataset_config,
        split_fractions=tuple(edit_args.split_fractions),
        seed=edit_args.split_seed,
        prompt_template=edit_args.prompt_template,
        completion_template=edit_args.completion_template,
        group_by=edit_args.group_by,
        max_pairs_per_question=edit_args.max_pairs_per_question,
    )
    if len(splits["train"]) == 0:
        raise RecipeError(f"data set '{edit_args.dataset}' gives no training pairs")
    output_dir = args.output_dir if args.output_dir_was_given else default_output_dir(edit_args, args, recipe.name)
    plan = RunPlan(
        model_path=model_path,
        layout=layout,
        head_dim=config_head_dim(config, layout),
        heads=heads,
        edit_config=None if heads is None else _edit_config(layout, heads, recipe),
        splits=splits,
        output_dir=output_dir,
        recipe_name=recipe.name,
    )
    if probe_spec or need_probe:
        from .probe import find_probe_result  # here: the probe stage itself loads models through this module

        result, plan.probe_dir = find_probe_result(recipe, model_path, layout)
        if result is not None:
            plan.use_probe_result(result, plan.probe_dir, recipe)
    return plan


def resolve_probe_heads(plan: RunPlan, recipe: Recipe, model, tokenizer) -> None:
    """Run the probe stage on the loaded model (once, on the main process first), then resolve the heads from it."""
    from accelerate import PartialState

    from .probe import make_probe_stage, run_probe_stage

    stage = make_probe_stage(recipe, plan.model_path, plan.layout)
    with PartialState().main_process_first():
        result = run_probe_stage(stage, recipe, model, tokenizer)
    plan.use_probe_result(result, stage.output_dir, recipe)


def _plain(value) -> str:
    """An enum's value (TrainingArguments turns some strings into enums), else the value itself."""
    return str(getattr(value, "value", value))


def config_head_dim(config, layout: AttentionLayout) -> int:
    """head_dim as the config states it (for the plan; the edit itself reads it off the loaded module)."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    head_dim = getattr(text_config, "head_dim", None) or getattr(text_config, "head_size", None)
    return int(head_dim or text_config.hidden_size // layout.num_heads)


def head_family(spec: str) -> str:
    """The family a head spec belongs to, for grouping runs in W&B: all, random-16, single-head, ..."""
    kind, _, arg = spec.strip().lower().partition(":")
    if kind == "all":
        return "all-heads"
    if kind == "random":
        return "single-head" if arg.strip() == "1" else f"random-{arg.strip()}"
    if kind == "layers":
        return "layers"
    if kind == "probe":
        return f"probe-{arg.strip()}"
    count = len(spec.split(","))
    return "single-head" if count == 1 else f"explicit-{count}"


def heads_slug(edit_args: EditArguments) -> str:
    """The head spec as a directory name part: probe16, random16-hs3, L0H1_L1H3, ..."""
    slug = edit_args.heads.strip().replace(":", "").replace(",", "_").replace(" ", "")
    if edit_args.heads.strip().lower().startswith(("random", "single")):
        slug += f"-hs{edit_args.heads_seed}"
    if edit_args.heads_draws > 1:
        slug += f"x{edit_args.heads_draws}"
    if len(slug) > 40:
        slug = slug[:24] + "-" + hashlib.sha1(slug.encode()).hexdigest()[:8]
    return slug


def default_output_dir(edit_args: EditArguments, args: LocEditConfig, recipe_name: str) -> str:
    """outputs/<recipe>/<heads>[-<edit>]-lr<lr>-tau<tau>-seed<seed>: unique per run of a sweep."""
    slug = heads_slug(edit_args)
    if edit_args.edit_strength != "adaptive":
        slug += f"-{edit_args.edit_strength}"
    if edit_args.edit_read != "all":
        slug += f"-read{edit_args.edit_read}"
    name = f"{slug}-lr{args.learning_rate:g}-tau{args.beta:g}-seed{args.seed}"
    return os.path.join("outputs", recipe_name, name)


# ---------------------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------------------


# The W&B group locedit last chose, so that a later run in the same process (`locedit study` trains several head
# families) gets its own family's group, while a group the user set stays.
_chosen_group: str | None = None


def setup_wandb(edit_args: EditArguments, args: LocEditConfig, plan: RunPlan, is_main: bool) -> None:
    """Name and group the W&B run; go offline with one notice when there are no credentials (never prompt)."""
    global _chosen_group
    if "wandb" not in (args.report_to or []):
        return
    os.environ.setdefault("WANDB_PROJECT", edit_args.wandb_project)
    if os.environ.get("WANDB_RUN_GROUP") in (None, _chosen_group):
        _chosen_group = os.environ["WANDB_RUN_GROUP"] = head_family(edit_args.heads)
    if args.run_name is None:
        args.run_name = os.path.basename(os.path.normpath(plan.output_dir))
    if os.environ.get("WANDB_MODE") is None and not _have_wandb_credentials():
        os.environ["WANDB_MODE"] = "offline"
        if is_main:
            print("locedit: no W&B credentials found; logging offline (sync later with `wandb sync`)", file=sys.stderr)


def finish_wandb(args: LocEditConfig) -> None:
    """End the run's W&B run: the Trainer leaves it open, and the next run in the same process would log into it."""
    if "wandb" in (args.report_to or []):
        import wandb

        if wandb.run is not None:
            wandb.finish()


def _have_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc

    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _write_json_atomic(path: str, payload: dict) -> None:
    """Write to a temporary file and rename, so an interrupted run never leaves a complete-looking half file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    os.replace(tmp, path)


def write_run_description(plan: RunPlan, recipe: Recipe) -> None:
    """The resolved recipe, the heads and the question split, written at the start of a run."""
    os.makedirs(plan.output_dir, exist_ok=True)
    edit_args = recipe.edit
    resolved = {
        **asdict(recipe.edit),
        **asdict(recipe.model),
        **asdict(recipe.probe),
        **asdict(recipe.eval),
        **json.loads(recipe.training.to_json_string()),
        "output_dir": plan.output_dir,
    }
    with open(os.path.join(plan.output_dir, "recipe.yaml"), "w") as f:
        yaml.safe_dump(resolved, f, sort_keys=False)
    _write_json_atomic(
        os.path.join(plan.output_dir, "heads.json"),
        {
            "spec": edit_args.heads,
            "heads_seed": edit_args.heads_seed,
            "family": head_family(edit_args.heads),
            "heads": [list(h) for h in plan.heads],
            "model_type": plan.layout.model_type,
            "num_layers": plan.layout.num_layers,
            "num_heads": plan.layout.num_heads,
            **({"probe_results": plan.probe_dir} if plan.probe_dir else {}),
        },
    )
    _write_json_atomic(
        os.path.join(plan.output_dir, "splits.json"),
        {
            "dataset": edit_args.dataset,
            "dataset_config": edit_args.dataset_config,
            "split_fractions": list(edit_args.split_fractions),
            "split_seed": edit_args.split_seed,
            "question_ids": {name: sorted(set(split["question_id"])) for name, split in plan.splits.items()},
        },
    )


def load_model_and_tokenizer(model_path: str, model_args: ModelArguments, trust_remote_code: bool = False):
    """The base model and its tokenizer as the recipe asks (dtype, attention, 4/8-bit), with a pad token."""
    import torch
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import get_quantization_config

    quantization_config = get_quantization_config(model_args)
    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    model = AutoModelForCausalLM.from_pretrained(
        model_path,
        revision=model_args.model_revision,
        dtype=dtype,
        attn_implementation=model_args.attn_implementation,
        trust_remote_code=trust_remote_code,
        quantization_config=quantization_config,
        # A quantised model is placed at load time, one whole copy per process (the usual k-bit device map).
        device_map={"": PartialState().local_process_index} if quantization_config is not None else None,
    )
    tokenizer = AutoTokenizer.from_pretrained(
        model_path, revision=model_args.model_revision, trust_remote_code=trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def main(recipe: Recipe) -> dict | RunPlan:
    """Plan, then (unless dry_run) train the edit and write the run directory. Returns the plan or the metrics."""
    from accelerate import PartialState

    from .trainer import LocEditTrainer

    edit_args, model_args, training_args = recipe.edit, recipe.model, recipe.training
    plan = make_plan(recipe)
    is_main = PartialState().is_main_process
    if is_main:
        print(plan.describe(model_args, edit_args, training_args), flush=True)
    # eval_after_train: the judges and the corpus are checked now (in every process, so all stop alike), not after
    # hours of training; the main process evaluates.
    eval_resources = check_eval_after_train(recipe)
    if edit_args.dry_run:
        return plan

    training_args.output_dir = plan.output_dir
    setup_wandb(edit_args, training_args, plan, is_main)
    model = tokenizer = None
    if plan.heads is None:
        # probe:K with no probe result yet: probe the loaded model, then train at the heads it ranks first.
        model, tokenizer = load_model_and_tokenizer(plan.model_path, model_args, training_args.trust_remote_code)
        resolve_probe_heads(plan, recipe, model, tokenizer)
        if is_main:
            print(f"  heads        {plan.heads_line(edit_args)}", flush=True)
    if is_main:
        write_run_description(plan, recipe)
    if model is None:
        model, tokenizer = load_model_and_tokenizer(plan.model_path, model_args, training_args.trust_remote_code)
    if is_multi_edit(edit_args.heads, edit_args.heads_draws):
        from . import multi

        metrics = multi.main(recipe, plan, model, tokenizer)
        del model, tokenizer
        finish_wandb(training_args)
        evaluate_if_asked(recipe, [plan.output_dir], eval_resources)
        return metrics
    trainer = LocEditTrainer(
        model=model,
        args=training_args,
        **preference_datasets(plan),
        processing_class=tokenizer,
        peft_config=plan.edit_config,
    )
    metrics = train_and_validate(trainer, plan.output_dir)
    trainer.save_model(plan.output_dir)
    trainer.save_state()
    if trainer.is_world_process_zero():
        _write_json_atomic(os.path.join(plan.output_dir, "metrics.json"), metrics)  # last: marks the run finished
    if hasattr(trainer, "end"):
        trainer.end()
    del trainer, model
    finish_wandb(training_args)
    evaluate_if_asked(recipe, [plan.output_dir], eval_resources)
    return metrics


def preference_datasets(plan: RunPlan) -> dict:
    """The trainer's train and eval (validation) datasets: the pairs' prompt, chosen and rejected columns."""
    columns = ["prompt", "chosen", "rejected"]
    validation = plan.splits["validation"]
    return {
        "train_dataset": plan.splits["train"].select_columns(columns),
        "eval_dataset": validation.select_columns(columns) if len(validation) else None,
    }


def train_and_validate(trainer, output_dir: str) -> dict:
    """Train (resuming from the last checkpoint in output_dir, if any), then score the validation pairs."""
    from accelerate import PartialState
    from transformers.trainer_utils import get_last_checkpoint

    last_checkpoint = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    if last_checkpoint and PartialState().is_main_process:
        print(f"locedit: resuming from {last_checkpoint}", flush=True)
    train_result = trainer.train(resume_from_checkpoint=last_checkpoint)
    metrics = {f"train_{k}" if not k.startswith("train_") else k: v for k, v in train_result.metrics.items()}
    if trainer.eval_dataset is not None:
        metrics.update(trainer.evaluate())
    return metrics


def check_eval_after_train(recipe: Recipe):
    """The checked judges and loaded corpus when the recipe sets eval_after_train, else None."""
    if not recipe.eval.eval_after_train:
        return None
    from .eval import check_settings

    return check_settings(recipe.eval)


def evaluate_if_asked(recipe: Recipe, run_dirs: list[str], eval_resources) -> None:
    """eval_after_train: evaluate the edits just written, in the main process, once the training model is freed."""
    from accelerate import PartialState

    if eval_resources is None or not PartialState().is_main_process:
        return
    import gc

    import torch

    from .eval import evaluate_after_training

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    evaluate_after_training(recipe, run_dirs, eval_resources)


def cli(argv: list[str] | None = None) -> int:
    """`python -m locedit.train RECIPE [--key value ...]`: a user's mistake prints one line and exits 2."""
    return run_command(main, argv, prog="python -m locedit.train")


if __name__ == "__main__":
    sys.exit(cli())
