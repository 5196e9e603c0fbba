"""The probe stage of a recipe: probe examples from its training questions, activations (cached), probes, saved.

    locedit probe recipes/probe_heads_16.yaml

The probes train on part of the training questions and are scored on the rest (`probe_val_fraction`, split by
question); validation, test and other-split questions are never used. A result is reused when it was made from
exactly the same model, examples and settings (`probe_key`), and activations are reused from the cache likewise.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass

import torch

from .. import processes
from ..core import threads
from ..core.errors import DamagedResultError, DataError, RecipeError, say_damaged
from ..core.recipe import Recipe
from ..core.tracking import Image, Table, tracked_run
from ..data import hold_out, load_questions, validate_dataset_arg
from ..heads import format_heads
from ..models.layout import AttentionLayout
from ..models.loading import load_model_and_tokenizer, place_for_inference, read_model_config
from ..rundir import run_lock
from .activations import (
    ProbeExamples,
    activations_key,
    activations_path,
    build_probe_examples,
    check_probe_template,
    collect_head_activations,
    load_activations,
    save_activations,
)
from .probes import HEATMAP, PROBE_C, PROBE_FORMAT, PROBE_JSON, ProbeResult, compute_probe_result, load_probe_result


@dataclass
class ProbeStage:
    """Everything the probe stage needs before weights are loaded: the examples, their split, keys, paths."""

    model_path: str
    layout: AttentionLayout
    examples: ProbeExamples
    is_val: list[bool]
    output_dir: str
    activations_key: str
    probe_key: str
    info: dict

    @property
    def activations_file(self) -> str:
        return activations_path(self.output_dir, self.activations_key)

    def existing_result(self) -> ProbeResult | None:
        """The result already in output_dir if it was made from exactly these examples and settings."""
        json_path = os.path.join(self.output_dir, PROBE_JSON)
        if not os.path.isfile(json_path):
            return None
        try:
            with open(json_path) as f:
                made = json.load(f)
            if not isinstance(made, dict):
                raise ValueError(f"{PROBE_JSON} is not a JSON object")
        except (OSError, ValueError) as err:
            # Cut short or overwritten (written atomically, so not by a run that stopped): made again, said once.
            say_damaged(f"probe result '{self.output_dir}'", str(err).splitlines()[0], "probing again")
            return None
        if made.get("probe_key") != self.probe_key:
            return None
        try:
            return load_probe_result(self.output_dir, self.layout)
        except DamagedResultError as err:
            say_damaged(f"probe result '{self.output_dir}'", err.problem, "probing again")
            return None


def default_probe_dir(recipe: Recipe) -> str:
    return recipe.probe.probe_output_dir or os.path.join("outputs", recipe.name, "probe")


def make_probe_stage(recipe: Recipe, model_path: str, layout: AttentionLayout) -> ProbeStage:
    """Build the probe examples from the training questions (the recipe's own split) and hold part of them out."""
    probe_args, edit_args, model_args = recipe.probe, recipe.edit, recipe.model
    if not 0 < probe_args.probe_val_fraction < 1:
        raise RecipeError(f"probe_val_fraction must be between 0 and 1, got {probe_args.probe_val_fraction}")
    if probe_args.probe_batch_size < 1:
        raise RecipeError(f"probe_batch_size must be at least 1, got {probe_args.probe_batch_size}")
    check_probe_template(probe_args.probe_template)
    # With chat_template the examples are rendered by the tokenizer's template: it must have one (checked now).
    tokenizer = None
    if edit_args.chat_template:
        from ..models.chat import chat_tokenizer

        tokenizer = chat_tokenizer(model_path, model_args, recipe.training.trust_remote_code)
    questions = load_questions(**edit_args.split_source())["train"]
    question_ids = sorted(set(questions["question_id"]))
    if len(question_ids) < 2:
        raise DataError(
            f"probing needs at least 2 training questions, data set '{edit_args.dataset}' gives {len(question_ids)}"
        )
    examples = build_probe_examples(
        questions, probe_args.probe_template, seed=probe_args.probe_seed, tokenizer=tokenizer
    )
    # The probes' held-out part: whole questions, drawn with their own seed.
    val_ids = hold_out(question_ids, probe_args.probe_val_fraction, f"probe-val-{probe_args.probe_seed}")
    is_val = [qid in val_ids for qid in examples.question_ids]

    model_id = {
        "model": model_path,
        "revision": model_args.model_revision,
        "dtype": model_args.dtype,
        "load_in_4bit": model_args.load_in_4bit,
        "load_in_8bit": model_args.load_in_8bit,
        "bnb_4bit_quant_type": model_args.bnb_4bit_quant_type if model_args.load_in_4bit else None,
    }
    act_key = activations_key(model_id, examples)
    probe_blob = json.dumps(
        {
            "activations": act_key,
            "val": sorted(val_ids),
            "c": PROBE_C,
            "standardize": probe_args.probe_standardize,
            "format": PROBE_FORMAT,
        }
    )
    probe_key = hashlib.sha256(probe_blob.encode()).hexdigest()[:16]
    train_ids = sorted(set(question_ids) - val_ids)
    info = {
        "format": PROBE_FORMAT,
        "probe_key": probe_key,
        "activations_key": act_key,
        "model": model_args.model_name_or_path,
        "model_path": model_path,
        "model_type": layout.model_type,
        **edit_args.split_settings(),
        "probe_template": probe_args.probe_template,
        "chat_template": edit_args.chat_template,
        "probe_seed": probe_args.probe_seed,
        "probe_val_fraction": probe_args.probe_val_fraction,
        "c": PROBE_C,
        "standardize": probe_args.probe_standardize,
        "examples": {"train": is_val.count(False), "validation": is_val.count(True)},
        "question_ids": {"train": train_ids, "validation": sorted(val_ids)},
    }
    return ProbeStage(
        model_path=model_path,
        layout=layout,
        examples=examples,
        is_val=is_val,
        output_dir=default_probe_dir(recipe),
        activations_key=act_key,
        probe_key=probe_key,
        info=info,
    )


def find_probe_result(recipe: Recipe, model_path: str, layout: AttentionLayout) -> tuple[ProbeResult | None, str]:
    """The probe result a recipe uses, without loading weights: `probe_results` when given (checked against the
    model), else an up-to-date result in the probe output dir, else None. Also returns its directory."""
    given = recipe.probe.probe_results
    if given:
        result = load_probe_result(given, layout)
        check_same_split(result, recipe)
        made_on = result.info.get("model_path")
        if made_on and made_on != model_path:
            print(f"locedit: note: probe result '{given}' was made on model '{made_on}'", file=sys.stderr)
        return result, given
    stage = make_probe_stage(recipe, model_path, layout)
    return stage.existing_result(), stage.output_dir


def run_probe_stage(
    stage: ProbeStage, recipe: Recipe, model=None, tokenizer=None, progress: bool = True, together: bool = False
):
    """The probe result for the stage: the saved one if up to date, else collected (or read from the activation
    cache) and fitted, then saved. Loads the model only when activations must be collected.

    `together`: every process of an `accelerate launch` calls this at once (`locedit probe`, the study): each
    collects its share of the examples, the main process fits the probes on all of them and saves the result, and
    the others read it. Otherwise one process works alone (the others wait for it or find its result)."""
    existing = stage.existing_result()
    if existing is not None:
        return existing
    if together and processes.count() > 1:
        return _run_probe_stage_together(stage, recipe, progress)
    with run_lock(stage.output_dir):  # a second probe writing the same result and cache refuses meanwhile
        activations = load_activations(stage.activations_file, stage.examples)
        if activations is None:
            if model is None:
                model, tokenizer = load_model_and_tokenizer(
                    stage.model_path, recipe.model, recipe.training.trust_remote_code
                )
            place_for_inference(model)
            activations = collect_head_activations(
                model, tokenizer, stage.examples.texts, batch_size=recipe.probe.probe_batch_size, progress=progress
            )
            save_activations(stage.activations_file, activations, stage.examples, {"key": stage.activations_key})
        return fit_and_save(stage, recipe, activations)


def fit_and_save(stage: ProbeStage, recipe: Recipe, activations: torch.Tensor) -> ProbeResult:
    """The probes fitted on the stage's activations, saved to its output directory."""
    result = compute_probe_result(
        activations,
        torch.tensor(stage.examples.labels),
        torch.tensor(stage.is_val),
        info={**stage.info, "activations_file": os.path.basename(stage.activations_file)},
        standardize=recipe.probe.probe_standardize,
    )
    result.check_fits(stage.layout)
    result.save(stage.output_dir)
    return result


def _run_probe_stage_together(stage: ProbeStage, recipe: Recipe, progress: bool) -> ProbeResult:
    activations = load_activations(stage.activations_file, stage.examples)
    collected = activations is None
    if collected:
        model, tokenizer = load_model_and_tokenizer(stage.model_path, recipe.model, recipe.training.trust_remote_code)
        place_for_inference(model)
        activations = collect_head_activations(
            model,
            tokenizer,
            stage.examples.texts,
            batch_size=recipe.probe.probe_batch_size,
            progress=progress and processes.is_main(),
            spread=True,
        )
        del model
    if processes.is_main():
        with run_lock(stage.output_dir):
            if collected:
                save_activations(stage.activations_file, activations, stage.examples, {"key": stage.activations_key})
            fit_and_save(stage, recipe, activations)
    processes.wait_for_everyone()
    return stage.existing_result()


def describe_stage(stage: ProbeStage, recipe: Recipe) -> str:
    examples = stage.info["examples"]
    questions = stage.info["question_ids"]
    cached = (
        "up to date"
        if stage.existing_result() is not None
        else ("cached activations" if os.path.isfile(stage.activations_file) else "to collect")
    )
    return "\n".join(
        [
            "locedit probe",
            f"  model        {recipe.model.model_name_or_path} ({stage.layout.model_type}, {stage.layout.shape})",
            f"  threads      {threads.describe()}",
            f"  examples     {len(stage.examples)} from {len(questions['train']) + len(questions['validation'])} "
            f"training questions of {recipe.edit.dataset}: probes train on {examples['train']} "
            f"({len(questions['train'])} questions), score on {examples['validation']} "
            f"({len(questions['validation'])} questions)",
            f"  template     {recipe.probe.probe_template!r}"
            + (" (as a conversation in the tokenizer's chat template)" if recipe.edit.chat_template else ""),
            f"  output_dir   {stage.output_dir} ({cached})",
        ]
    )


def describe_result(result: ProbeResult, top: int = 10) -> str:
    heads = result.top_heads(min(top, result.num_layers * result.num_heads))
    best = ", ".join(f"{format_heads([h])} {result.val_acc(h):.3f}" for h in heads)
    mean = float(result.val_accuracy.mean())
    return f"  best heads   {best}\n  mean         validation accuracy {mean:.3f} over {result.shape}"


def probe_recipe(recipe: Recipe) -> ProbeResult | ProbeStage:
    """Probe every head of the recipe's model on its training questions and save the result."""
    validate_dataset_arg(recipe.edit.dataset)  # a missing data file now, not after the model is built or converted
    weights = not recipe.edit.dry_run  # a dry run converts no GGUF model
    model_path, _, layout = read_model_config(recipe.model, recipe.training.trust_remote_code, weights)
    stage = make_probe_stage(recipe, model_path, layout)
    main = processes.is_main()  # under `accelerate launch`, every process takes part and the main one speaks
    if main:
        print(describe_stage(stage, recipe), flush=True)
    if recipe.edit.dry_run:
        return stage
    result = run_probe_stage(stage, recipe, together=True)
    if main:
        print(describe_result(result), flush=True)
        print(f"  saved        {os.path.join(stage.output_dir, PROBE_JSON)}", flush=True)
        track_probe(result, recipe, stage.output_dir)
    return result


def track_probe(result: ProbeResult, recipe: Recipe, output_dir: str, top: int = 16) -> None:
    """The probe as a tracked run named `probe` (report_to: trackio and/or W&B): its heatmap as an image, its
    `top` heads by validation accuracy as a table."""
    heads = result.top_heads(top)
    rows = [[rank, layer, head, result.val_acc((layer, head))] for rank, (layer, head) in enumerate(heads, 1)]
    config = {"model": recipe.model.model_name_or_path, "dataset": recipe.edit.dataset, "heads": result.shape}
    with tracked_run(
        recipe.training.report_to, recipe.edit.wandb_project, f"{recipe.name}-probe", "probe", "probe", config
    ) as run:
        if run is not None:
            run.log(
                {
                    "probe/heatmap": Image(os.path.join(output_dir, HEATMAP)),
                    "probe/top_heads": Table(["rank", "layer", "head", "val_accuracy"], rows),
                }
            )
            run.summary({"probe/best_val_accuracy": rows[0][3]})


def check_same_split(result: ProbeResult, recipe: Recipe) -> None:
    """A probe result must come from the recipe's own training questions: made on another split, its heads would
    have been chosen on questions that are now validation or test questions (a leak)."""
    edit_args = recipe.edit
    for key, value in edit_args.split_settings().items():
        made = result.info.get(key)
        if key == "split_fractions" and made is not None:
            made = [float(f) for f in made]
        if key in result.info and made != value:
            raise RecipeError(
                f"probe result '{result.path}' was made with {key} {made!r}, but this recipe has {value!r}: its "
                "heads were chosen on questions that are not this recipe's training questions; probe again with "
                "this recipe (locedit probe) or give the same split settings"
            )
