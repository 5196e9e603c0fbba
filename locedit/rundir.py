"""The run directory: its name, what it holds, how it is written and read, and when it is finished.

A run directory is what a training run, ITI or a multi-edit run leaves behind, and what evaluation and the report
read. It holds the adapter (`adapter_config.json`, `adapter_model.safetensors`), `recipe.yaml` (the resolved
recipe), `heads.json`, `splits.json` (the question ids of each split), the trainer's state and `metrics.json`,
written last: its presence marks a finished run. A multi-edit run's top directory has no adapter; its
`metrics.json` lists the directories of its edits under "edits". `eval/` holds an evaluation: `generations.jsonl`,
then `metrics.json` (written last, so its presence marks a finished evaluation).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import yaml

from .core.args import EditArguments, ModelArguments, ProbeArguments, result_settings
from .core.disk import writes_to
from .core.errors import DamagedFileError, RecipeError
from .core.files import read_json, write_json_atomic, write_text_atomic
from .heads import HeadSpec, format_heads

METRICS = "metrics.json"
LOCK = ".locedit.lock"
HEADS = "heads.json"
SPLITS = "splits.json"
RECIPE = "recipe.yaml"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # what PeftModel.save_pretrained writes
EVAL_DIR = "eval"
GENERATIONS = "generations.jsonl"
TRAINER_STATE = "trainer_state.json"


# ---------------------------------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------------------------------


def default_output_dir(edit_args, args, recipe_name: str, spec: HeadSpec | None = None) -> str:
    """outputs/<recipe>/<heads>[-<edit>]-lr<lr>-tau<tau>-seed<seed>[-split<split_seed>]: unique per run of a
    sweep. `spec`: the head spec of `edit_args`, when the caller holds it already (else it is parsed here)."""
    slug = (spec or HeadSpec.of(edit_args)).slug
    if edit_args.edit_strength != "adaptive":
        slug += f"-{edit_args.edit_strength}"
    if edit_args.edit_read != "all":
        slug += f"-read{edit_args.edit_read}"
    name = f"{slug}-lr{args.learning_rate:g}-tau{args.beta:g}-seed{args.seed}{_split_part(edit_args)}"
    return os.path.join("outputs", recipe_name, name)


def _split_part(edit_args) -> str:
    # Runs on another question split train on other questions: they get their own directory.
    return f"-split{edit_args.split_seed}" if edit_args.split_seed else ""


def iti_output_dir(edit_args, alpha: float, recipe_name: str, spec: HeadSpec | None = None) -> str:
    """outputs/<recipe>/iti-<heads>-alpha<alpha>: one directory per head set and strength (`spec`: as for
    default_output_dir)."""
    slug = (spec or HeadSpec.of(edit_args)).slug
    return os.path.join("outputs", recipe_name, f"iti-{slug}-alpha{alpha:g}{_split_part(edit_args)}")


def output_dir_of(recipe, spec: HeadSpec | None = None) -> str:
    """The training run directory of a recipe: its output_dir, else the default name (`spec`: as for
    default_output_dir)."""
    args = recipe.training
    return args.output_dir if args.output_dir_was_given else default_output_dir(recipe.edit, args, recipe.name, spec)


def eval_dir(output_dir: str) -> str:
    return os.path.join(output_dir, EVAL_DIR)


# ---------------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------------


# libyaml where it is installed (its output is the same): the pure-Python emitter and parser cost 40 ms per recipe,
# once per edit of a multi-edit run.
_YAML_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def resolved_recipe(recipe, output_dir: str) -> dict:
    """Every setting of a recipe, as recipe.yaml records it."""
    resolved = {
        **asdict(recipe.edit),
        **asdict(recipe.model),
        **asdict(recipe.probe),
        **asdict(recipe.eval),
        **json.loads(recipe.training.to_json_string()),
        "output_dir": output_dir,
    }
    # As it reads back: lists, plain values.
    return yaml.load(yaml.dump(resolved, Dumper=_YAML_DUMPER, sort_keys=False), Loader=_YAML_LOADER)


def split_question_ids(splits) -> dict[str, list]:
    """The question ids of each split, as splits.json records them."""
    return {name: sorted(set(split["question_id"])) for name, split in splits.items()}


def write_run_description(
    output_dir: str,
    recipe,
    heads,
    layout,
    splits,
    located: dict[str, str] | None = None,
    question_ids: dict | None = None,
    spec: HeadSpec | None = None,
) -> None:
    """The resolved recipe, the heads and the question split, written at the start of a run. `located`: the
    directory of each locator result the run used (`probe` -> DIR); `question_ids` (split_question_ids(splits))
    saves reading the splits again when many runs share them; `spec`: the head spec of the recipe, when the caller
    holds it already (else it is parsed here)."""
    os.makedirs(output_dir, exist_ok=True)
    edit_args = recipe.edit
    write_text_atomic(
        os.path.join(output_dir, RECIPE),
        yaml.dump(resolved_recipe(recipe, output_dir), Dumper=_YAML_DUMPER, sort_keys=False),
    )
    write_json_atomic(
        os.path.join(output_dir, HEADS),
        {
            "spec": edit_args.heads,
            "heads_seed": edit_args.heads_seed,
            "family": (spec or HeadSpec.of(edit_args)).family,
            "heads": [list(h) for h in heads],
            "model_type": layout.model_type,
            "num_layers": layout.num_layers,
            "num_heads": layout.num_heads,
            # Where the scores that chose the heads (probe:K, importance:K) and ITI's probe came from.
            **{f"{locator}_results": directory for locator, directory in (located or {}).items()},
        },
    )
    write_json_atomic(
        os.path.join(output_dir, SPLITS),
        {
            "dataset": edit_args.dataset,
            "dataset_config": edit_args.dataset_config,
            "split_fractions": list(edit_args.split_fractions),
            "split_seed": edit_args.split_seed,
            "question_ids": question_ids if question_ids is not None else split_question_ids(splits),
        },
    )


def clear_finished(output_dir: str) -> None:
    """Remove the marker before a directory's results are written again: a rewrite stopped half way then does not
    look finished."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(output_dir, METRICS))


def write_metrics(output_dir: str, metrics: dict) -> None:
    """metrics.json, written last: it marks the run finished."""
    write_json_atomic(os.path.join(output_dir, METRICS), metrics)


def write_evaluation(output_dir: str, records: list[dict], metrics: dict) -> None:
    """eval/generations.jsonl, then eval/metrics.json last: a metrics.json always belongs to the generations
    beside it."""
    directory = eval_dir(output_dir)
    os.makedirs(directory, exist_ok=True)
    stale = os.path.join(directory, METRICS)
    if os.path.exists(stale):
        os.remove(stale)
    lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    write_text_atomic(os.path.join(directory, GENERATIONS), lines)
    write_json_atomic(os.path.join(directory, METRICS), metrics)


# ---------------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------------


def is_finished(output_dir: str) -> bool:
    return os.path.isfile(os.path.join(output_dir, METRICS))


def is_evaluated(output_dir: str) -> bool:
    return os.path.isfile(os.path.join(eval_dir(output_dir), METRICS))


def has_edit(output_dir: str) -> bool:
    return os.path.isfile(os.path.join(output_dir, ADAPTER_CONFIG))


# What to do about a damaged file of a run directory (core.files.DamagedFileError names the file).
RERUN = "run the same command again to redo the run, or remove the run directory"
RETRAIN = "train the run again (locedit train), or restore the run directory's files from a copy"
REEVALUATE = "evaluate the run again (locedit eval), or remove its eval directory"


def read_metrics(output_dir: str) -> dict:
    return read_json(os.path.join(output_dir, METRICS), RERUN)


def read_training_loss(output_dir: str) -> tuple[float, float] | None:
    """(first, reached) IPO loss of the run: the first logged (trainer_state.json) and the one it reached, on its
    training pairs after training where that was measured (`train_pairs_loss`), else the last logged. For an edit
    of a multi-edit run the first is that run's logged mean over its edits, the reached one the edit's own. None
    when no loss was logged."""
    run_dir, reached = output_dir, None
    if os.path.isfile(os.path.join(output_dir, METRICS)):
        metrics = read_metrics(output_dir)
        run_dir = metrics.get("multi_edit_run") or output_dir
        reached = metrics.get("train_pairs_loss")
    state = os.path.join(run_dir, TRAINER_STATE)
    if not os.path.isfile(state):
        return None
    losses = [entry["loss"] for entry in read_json(state).get("log_history", []) if "loss" in entry]
    if not losses:
        return None
    return float(losses[0]), float(losses[-1] if reached is None else reached)


def training_divergence(output_dir: str) -> str | None:
    """Why the run's training diverged (`train_divergence` in its metrics.json), or None: it did not, or it was
    trained before locedit measured it."""
    if not os.path.isfile(os.path.join(output_dir, METRICS)):
        return None
    return divergence_of(read_metrics(output_dir))


def divergence_of(metrics: dict) -> str | None:
    """Why a run with this metrics.json diverged, or None."""
    return (metrics.get("train_divergence") or "it diverged") if metrics.get("train_diverged") else None


def read_heads(output_dir: str) -> dict:
    return read_json(os.path.join(output_dir, HEADS), RETRAIN)


def read_heads_spec(output_dir: str) -> str:
    """An edit's heads as its heads.json lists them, as an explicit spec, e.g. `L0H1,L2H3`."""
    return format_heads([tuple(head) for head in read_heads(output_dir)["heads"]])


def read_recipe(output_dir: str) -> dict:
    path = os.path.join(output_dir, RECIPE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise DamagedFileError(f"'{path}' is damaged ({str(err).splitlines()[0]}); {RETRAIN}") from None
    return loaded if isinstance(loaded, dict) else {}


def read_evaluation(output_dir: str) -> tuple[dict, list[dict]]:
    """(eval/metrics.json, the records of eval/generations.jsonl) of an evaluated run."""
    directory = Path(eval_dir(output_dir))
    metrics = read_json(directory / METRICS, REEVALUATE)
    generations = directory / GENERATIONS
    records = []
    if generations.is_file():
        lines = generations.read_text(encoding="utf-8", errors="replace").splitlines()
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DamagedFileError(f"'{generations}' is damaged (line {number}: {err}); {REEVALUATE}") from None
    return metrics, records


def find_evaluated(path: str) -> list[Path]:
    """Every evaluated run directory below `path` (its `eval/metrics.json` marks it), in sorted order."""
    return [metrics.parent.parent for metrics in sorted(Path(path).glob(f"**/{EVAL_DIR}/{METRICS}"))]


def expand_run_dirs(run_dirs: list[str]) -> list[str]:
    """Run directories as given, with a multi-edit run's directory replaced by the edits it trained.

    A multi-edit run lists its edits by name; they are the directories of those names inside it, wherever the run
    directory is now (moved, copied, or read from another working directory).
    """
    expanded = []
    for run_dir in run_dirs:
        if not has_edit(run_dir) and is_finished(run_dir):
            edits = read_metrics(run_dir).get("edits")
            if isinstance(edits, list) and edits:
                expanded += [_edit_dir(run_dir, str(edit)) for edit in edits]
                continue
        expanded.append(run_dir)
    return list(dict.fromkeys(os.path.normpath(run_dir) for run_dir in expanded))


def _edit_dir(run_dir: str, edit: str) -> str:
    inside = os.path.join(run_dir, os.path.basename(os.path.normpath(edit)))
    # Files written before edits were listed by name hold paths; one that is not inside the run is taken as it is.
    return inside if os.path.isdir(inside) or not os.path.isdir(edit) else edit


def read_run_dir(run_dir: str) -> tuple[dict, dict, dict]:
    """(resolved recipe, split, heads) of an edit's run directory, or a RecipeError naming what is missing."""
    if not os.path.isdir(run_dir):
        raise RecipeError(f"run directory '{run_dir}' does not exist")
    if not has_edit(run_dir):
        raise RecipeError(f"'{run_dir}' holds no trained edit (no {ADAPTER_CONFIG})")
    split_file = os.path.join(run_dir, SPLITS)
    if not os.path.isfile(split_file):
        raise RecipeError(f"run directory '{run_dir}' has no {SPLITS}: its test questions are unknown")
    split = read_json(split_file, RETRAIN)
    test = (split.get("question_ids") or {}).get("test")
    if not isinstance(test, list) or not test:
        raise RecipeError(f"'{split_file}' lists no test questions")
    recipe_file = os.path.join(run_dir, RECIPE)
    if not os.path.isfile(recipe_file):
        raise RecipeError(f"run directory '{run_dir}' has no {RECIPE}: its base model is unknown")
    settings = read_recipe(run_dir)
    if not settings.get("model_name_or_path"):
        raise RecipeError(f"'{recipe_file}' names no model_name_or_path")
    return settings, split, read_heads(run_dir)


def read_adapter_config(run_dir: str) -> dict:
    return read_json(os.path.join(run_dir, ADAPTER_CONFIG), RETRAIN)


# ---------------------------------------------------------------------------------------------------------------------
# Starting a run in a directory
# ---------------------------------------------------------------------------------------------------------------------

# The settings that determine a run's result: a run started in a directory whose recipe.yaml has other values is
# refused (it would resume, or overwrite, another run's results). How long it trains is not among them: a run
# started again with more steps or epochs goes on from its last checkpoint.
LENGTH_SETTINGS = ("num_train_epochs", "max_steps")
# The settings that name the data a run trains on. The default run directory's name leaves them out (a name holds
# no file path), so a run on other data is told that the data is what differs, and how to give it its own directory.
DATA_SETTINGS = ("dataset", "dataset_config")


@functools.cache
def run_result_settings() -> tuple[str, ...]:
    """The settings that determine a run's result, as the recipe's fields mark them (core.args.result_settings): a
    run directory holding a run made with other values is refused, not overwritten. (Read on first use: the recipe
    schema is TRL's, which the commands that only read results, such as `locedit report`, never import.)"""
    from .config import LocEditConfig

    return result_settings(ModelArguments, EditArguments, ProbeArguments, LocEditConfig)


def settings_difference(old: dict, new: dict, keys=None) -> str | None:
    """The first setting whose value differs between two resolved recipes (of `keys`, by default the run's result
    settings), described, else None."""
    for key in run_result_settings() if keys is None else keys:
        if key in old and key in new and old[key] != new[key]:
            return f"{key} {old[key]!r} there, {new[key]!r} now"
    return None


def check_output_dir(output_dir: str, recipe) -> bool:
    """Check before any work that a run can use `output_dir`; returns whether it already holds this run, finished
    (a finished run asked to train longer is not: it goes on).

    The directory must be creatable and writable (checked by creating a directory where it would go), and, when it
    holds a run already, that run must have the same result-determining settings (`run_result_settings`), unless it
    stopped before it saved anything (no metrics.json, no checkpoint): then the corrected command starts over there.
    """
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise RecipeError(f"output_dir '{output_dir}' is a file, not a directory; give another output_dir")
    check_writable(output_dir)
    if not os.path.isfile(os.path.join(output_dir, RECIPE)):
        return False
    old, new = read_recipe(output_dir), resolved_recipe(recipe, output_dir)
    data_difference = settings_difference(old, new, DATA_SETTINGS)
    difference = data_difference or settings_difference(old, new)
    if difference and not is_finished(output_dir) and not has_checkpoints(output_dir):
        # A run that stopped before it saved anything (a crash after the weights loaded) left only its description:
        # nothing of it can be resumed, so the corrected command starts over in its place.
        print(
            f"locedit: '{output_dir}' holds a run that stopped before saving anything ({difference}); starting "
            "over with these settings",
            file=sys.stderr,
        )
        return False
    if data_difference and recipe.training.output_dir_was_given:
        raise RecipeError(
            f"output_dir '{output_dir}' holds a run on other data ({data_difference}); give another output_dir "
            "or remove that one"
        )
    if data_difference:
        raise RecipeError(
            f"output_dir '{output_dir}' holds a run on other data ({data_difference}): the default run directory's "
            "name leaves the data out; give this run its own with --output_dir DIR (or a recipe file of another "
            "name: runs go to outputs/<recipe name>/), or remove that one"
        )
    if difference:
        raise RecipeError(
            f"output_dir '{output_dir}' holds a run with other settings ({difference}); give another output_dir "
            "or remove that one"
        )
    return is_finished(output_dir) and settings_difference(old, new, LENGTH_SETTINGS) is None


def has_checkpoints(output_dir: str) -> bool:
    """Whether a run saved any checkpoint (`checkpoint-N`, the Trainer's): something a restart would resume."""
    return any(name.startswith("checkpoint-") for name in os.listdir(output_dir))


def check_writable(directory: str) -> None:
    """`directory` exists and is writable, or can be created: a probe directory is made and removed where the
    nearest existing parent is."""
    parent = os.path.abspath(directory)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise RecipeError(f"cannot create '{directory}': '{parent}' is a file")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".locedit-write-check-", dir=parent))
    except OSError as err:
        raise RecipeError(f"cannot write '{directory}': {err.strerror} ('{parent}')") from None


@contextlib.contextmanager
def run_lock(directory: str) -> Iterator[None]:
    """Hold `directory` for this process: a second run (or probe, or eval) into it refuses with one line while this
    one lives. A lock left by a process that no longer runs is stale, and taken over with a notice. Holding it again
    in the same process is a no-op; a directory the lock created and that is still empty is removed at the end."""
    created = not os.path.isdir(directory)
    os.makedirs(directory, exist_ok=True)
    writes_to(directory)
    path = os.path.join(directory, LOCK)
    while True:
        try:
            handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            owner = _lock_owner(path)
            if owner == os.getpid():
                yield  # already held by this process
                return
            if owner is None and _age_s(path) < 10:
                owner = -1  # just created, its pid not written yet: busy
            if owner == -1 or (owner is not None and _is_running(owner)):
                who = "another process" if owner == -1 else f"process {owner}"
                raise RecipeError(
                    f"'{directory}' is in use by {who} (its lock {path}); wait for that run to end or stop it"
                ) from None
            if owner is not None:
                print(f"locedit: taking over the stale lock of process {owner} in '{directory}'", file=sys.stderr)
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            continue
        try:
            with os.fdopen(handle, "w") as f:
                f.write(str(os.getpid()))
        except OSError:
            os.remove(path)  # a full disk: an empty lock would read as busy to the command run again
            raise
        break
    try:
        yield
    finally:
        if _lock_owner(path) == os.getpid():
            os.remove(path)
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(directory)  # only if empty: a run that failed before writing anything leaves nothing


def _lock_owner(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip() or 0) or None
    except (OSError, ValueError):
        return None


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _age_s(path: str) -> float:
    try:
        return time.time() - os.path.getmtime(path)
    except OSError:
        return float("inf")
