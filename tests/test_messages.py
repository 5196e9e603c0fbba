"""Messages that name the real cause, help that fits a screen, and no notice a user cannot act on printed twice.

Each test shows the line a user now gets: a missing data file before any run-directory check, a mistyped flag with
the closest valid ones, a wrong type in a recipe file with the file, key and expected type, each command's own flags
grouped by purpose in its --help.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from locedit.cli import main as locedit
from locedit.config import parse_recipe
from locedit.rundir import METRICS, output_dir_of, resolved_recipe

REPO = Path(__file__).resolve().parents[1]
TINY = "recipes/tiny.yaml"


def one_error_line(capsys, code: int, *needles: str) -> str:
    """The one `locedit: error:` line of a command that returned 2, with each needle in it."""
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("locedit: error:")]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


# ---------------------------------------------------------------------------------------------------------------------
# What the run reads is checked before where it writes
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_run_there(own_working_directory) -> Path:
    """The tiny recipe's default run directory holding a finished run on its synthetic data (as README's first
    `python -m locedit.train recipes/tiny.yaml` leaves it): its recipe.yaml and the metrics.json that marks it
    finished."""
    recipe = parse_recipe([TINY])
    run = Path(output_dir_of(recipe))
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text(json.dumps(resolved_recipe(recipe, str(run))))
    (run / METRICS).write_text("{}")
    return run


def test_a_missing_data_file_is_named_before_the_run_directory_is_checked(tiny_run_there, capsys):
    code = locedit(["train", TINY, "--dataset", "/no/such.jsonl", "--dry_run", "true"])
    line = one_error_line(capsys, code, "dataset file not found: /no/such.jsonl")
    assert "holds a run" not in line


def test_a_missing_model_is_named_before_the_run_directory_is_checked(tiny_run_there, capsys):
    code = locedit(["train", TINY, "--model_name_or_path", "/no/such/model", "--dry_run", "true"])
    one_error_line(capsys, code, "model directory '/no/such/model' does not exist")


def test_an_unreadable_data_file_is_one_line(tmp_path, capsys, monkeypatch):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "Q", "chosen": " a", "rejected": " b"}\n')
    real_open = Path.open

    def refuse(self, *args, **kwargs):  # root reads any file whatever its mode: refuse this one as a disk would
        if self == data:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refuse)
    code = locedit(["train", TINY, "--dataset", str(data), "--dry_run", "true"])
    one_error_line(capsys, code, f"dataset file {data} cannot be read (Permission denied)")


def test_a_run_directory_on_other_data_says_the_data_differs_and_how_to_choose(tiny_run_there, capsys):
    code = locedit(["train", TINY, "--dataset", "synthetic:50", "--dry_run", "true"])
    one_error_line(
        capsys,
        code,
        f"output_dir '{tiny_run_there}' holds a run on other data (dataset 'synthetic' there, 'synthetic:50' now)",
        "give this run its own with --output_dir DIR",
    )
    assert locedit(["train", TINY, "--dataset", "synthetic:50", "--dry_run", "true", "--output_dir", "other"]) == 0


def test_a_recipe_path_that_is_a_directory_or_unreadable_is_one_line(tmp_path, capsys):
    one_error_line(capsys, locedit(["train", str(tmp_path / "none.yaml")]), "does not exist")
    (tmp_path / "dir.yaml").mkdir()
    one_error_line(capsys, locedit(["train", str(tmp_path / "dir.yaml")]), "is a directory, not a recipe file")
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00\x01")
    one_error_line(capsys, locedit(["train", str(tmp_path / "binary.yaml")]), "cannot be read")


# ---------------------------------------------------------------------------------------------------------------------
# A mistyped flag or key: the closest valid names, before TRL loads once they are known
# ---------------------------------------------------------------------------------------------------------------------

TYPO_IN_A_FRESH_PROCESS = """
import sys
from locedit.cli import main

code = main(sys.argv[1:])
heavy = {"torch", "transformers", "trl", "peft", "datasets", "accelerate"} & set(sys.modules)
print(code, sorted(heavy))
"""


def test_a_mistyped_flag_names_the_closest_valid_flag(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("LOCEDIT_CACHE", str(tmp_path / "cache"))  # nothing known yet: checked after TRL's import
    code = locedit(["train", TINY, "--learning_rat", "0.01"])
    line = one_error_line(capsys, code, "unknown flag --learning_rat (did you mean --learning_rate?)")
    assert line.endswith("; locedit train --help lists the flags"), line
    assert list((tmp_path / "cache" / "recipe_fields").glob("*.json"))  # the names are kept for the next command
    code = locedit(["train", TINY, "--lerning-rate", "0.01", "--bta", "0.2"])
    one_error_line(
        capsys, code, "unknown flags --lerning-rate (did you mean --learning_rate", "--bta (did you mean --beta?)"
    )
    code = locedit(["study", "recipes/toy.yaml", "--study_randm", "2"])
    one_error_line(capsys, code, "unknown flag --study_randm (did you mean --study_random")


def test_a_mistyped_flag_is_one_line_before_trl_is_imported(tmp_path):
    """Once any recipe parser has been built with this TRL, transformers and schema (here: parse_recipe), a typo is
    answered from the kept names, without importing torch, transformers or TRL (about 0.2 s instead of 7 s)."""
    parse_recipe([TINY])
    for argv, needle in [
        (["train", TINY, "--learning_rat", "0.01"], "unknown flag --learning_rat (did you mean --learning_rate?)"),
        (["eval", "--eval_judge_truht", "none"], "did you mean --eval_judge_truth,"),
        (["train", str(tmp_path / "none.yaml")], "does not exist"),
    ]:
        result = subprocess.run(
            [sys.executable, "-c", TYPO_IN_A_FRESH_PROCESS, *argv], capture_output=True, text=True, timeout=300
        )
        assert result.stdout.strip().splitlines()[-1] == "2 []", result.stdout + result.stderr
        assert "locedit: error: " in result.stderr and needle in result.stderr, result.stderr


def test_a_mistyped_recipe_key_names_the_file_and_the_closest_key(tmp_path, capsys):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("model_name_or_path: tiny:llama\nlearnin_rate: 0.01\n")
    one_error_line(
        capsys,
        locedit(["train", str(recipe)]),
        f"unknown recipe key learnin_rate (did you mean learning_rate?) in '{recipe}'",
    )


def test_a_stray_argument_is_one_line(capsys):
    one_error_line(capsys, locedit(["train", TINY, "extra"]), "unexpected arguments ['extra']")


# ---------------------------------------------------------------------------------------------------------------------
# A value of the wrong type: the file, the key (or the flag) and the type it takes
# ---------------------------------------------------------------------------------------------------------------------

BAD_RECIPE_VALUES = {
    "epochs-in-words": (
        "num_train_epochs: two",
        "num_train_epochs 'two' in recipe '{}' is not valid: it must be a number",
    ),
    "steps-not-whole": ("max_steps: 2.5", "max_steps 2.5 in recipe '{}' is not valid: it must be an integer"),
    "bool-in-words": (
        "chat_template: maybe",
        "chat_template 'maybe' in recipe '{}' is not valid: it must be true or false",
    ),
    "list-item": (
        "split_fractions: [0.6, a, 0.2]",
        "split_fractions 'a' in recipe '{}' is not valid: each of its values must be a number",
    ),
    "list-for-a-number": ("beta: [0.1]", "beta [0.1] in recipe '{}' is not valid: it must be a number"),
}


@pytest.mark.parametrize("line, needle", BAD_RECIPE_VALUES.values(), ids=BAD_RECIPE_VALUES.keys())
def test_a_value_of_the_wrong_type_in_a_recipe_names_the_file_the_key_and_the_type(line, needle, tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"model_name_or_path: tiny:llama\ndataset: synthetic\n{line}\n")
    one_error_line(capsys, locedit(["train", str(recipe), "--dry_run", "true"]), needle.format(recipe))


def test_a_flag_given_replaces_the_recipe_value_so_its_type_is_not_checked(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model_name_or_path: tiny:llama\ndataset: synthetic\nnum_train_epochs: two\n")
    assert parse_recipe([str(recipe), "--num_train_epochs", "3"]).training.num_train_epochs == 3


BAD_FLAG_VALUES = {
    "float": (["--num_train_epochs", "two"], "--num_train_epochs 'two' is not valid: it must be a number"),
    "int": (["--max_steps", "2.5"], "--max_steps '2.5' is not valid: it must be an integer"),
    "bool": (["--chat_template", "maybe"], "--chat_template 'maybe' is not valid: it must be true or false"),
}


@pytest.mark.parametrize("flags, needle", BAD_FLAG_VALUES.values(), ids=BAD_FLAG_VALUES.keys())
def test_a_flag_of_the_wrong_type_names_the_flag_and_the_type(flags, needle, capsys):
    one_error_line(capsys, locedit(["train", TINY, *flags]), needle)


def test_every_recipe_in_the_repository_passes_the_type_check():
    from locedit.config import check_recipe_types, make_parser
    from locedit.core.flags import read_recipe_file

    parser = make_parser()
    recipes = sorted((REPO / "recipes").glob("*.yaml"))
    assert len(recipes) > 5
    for path in recipes:
        check_recipe_types(parser, read_recipe_file(str(path)), str(path), [])


# ---------------------------------------------------------------------------------------------------------------------
# Help: each command's own flags by purpose, on a screen, then the pointer to every field
# ---------------------------------------------------------------------------------------------------------------------

HELP_COMMANDS = ["train", "probe", "iti", "eval", "study"]


@pytest.mark.parametrize("command", HELP_COMMANDS)
def test_a_commands_help_fits_a_screen_and_ends_with_the_pointer_to_every_field(command, capsys):
    assert locedit([command, "--help"]) == 0
    lines = capsys.readouterr().out.rstrip("\n").splitlines()
    assert lines[0].startswith(f"usage: locedit {command} "), lines[0]
    assert lines[-1] == f"all training fields: locedit {command} --help-all"
    assert len(lines) - 1 <= 60, len(lines)
    assert max(len(line) for line in lines) <= 118


def test_train_help_leads_with_its_own_flags_grouped_by_purpose(capsys):
    assert locedit(["train", "-h"]) == 0
    out = capsys.readouterr().out
    groups = [line for line in out.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert groups == ["model and data:", "heads and edit:", "IPO training:", "evaluation:", "tracking:"]
    for flag in ["learning_rate LR", "beta TAU", "num_train_epochs N", "max_steps N", "output_dir DIR"]:
        assert f"  --{flag} " in out, flag
    assert "  --beta TAU                      IPO's tau: the target log-ratio margin is 1/(2 tau) (default 0.1)" in out
    assert "--gradient_checkpointing" not in out  # TRL's other fields are --help-all's


def test_study_help_lists_every_study_flag(capsys):
    import dataclasses

    from locedit.core.args import StudyArguments

    assert locedit(["study", "--help"]) == 0
    out = capsys.readouterr().out
    for field in dataclasses.fields(StudyArguments):
        assert f"\n  --{field.name} " in out, field.name


def test_sweep_help_points_to_the_recipe_fields(capsys):
    with pytest.raises(SystemExit) as exit_:
        locedit(["sweep", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: locedit sweep") and "--gpus" in out and "--log_dir" in out
    assert out.rstrip().endswith("all training fields: locedit train --help-all")


def test_help_all_prints_every_field_with_the_commands_name(capsys):
    assert locedit(["train", "--help-all"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: locedit train ")
    assert "--gradient_checkpointing" in out and "--study_random" in out and "--eval_judge_truth" in out
    assert "'importance:16' the 16 heads of highest gradient importance" in " ".join(out.split())


def test_the_head_spec_help_lists_every_registered_selector(monkeypatch):
    from locedit import heads
    from locedit.pipelines.usage import command_help

    text = command_help("train")
    for selector in heads.SELECTORS.values():
        assert f"    {selector.form} " in text, selector.form
    assert len(heads.SELECTORS) >= 7
    monkeypatch.setitem(
        heads.SELECTORS,
        "first",
        heads.Selector("first", "first:4", lambda spec, layout, scores: [], lambda spec: "first", help="the first K"),
    )
    assert "first:4" in command_help("train") and "'first:4' the first K" in heads.heads_help()


def test_the_short_helps_training_defaults_are_the_configs():
    import dataclasses

    from locedit.config import LocEditConfig
    from locedit.pipelines.usage import TRAINING_DEFAULTS

    fields = {field.name: field for field in dataclasses.fields(LocEditConfig)}
    for name, shown in TRAINING_DEFAULTS.items():
        field = fields[name]
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        assert str(getattr(default, "value", default)) == str(shown), name


HELP_IN_A_FRESH_PROCESS = """
import sys
from locedit.cli import main

code = main(sys.argv[1:])
heavy = {"torch", "transformers", "trl", "peft", "datasets", "accelerate"} & set(sys.modules)
print(code, sorted(heavy), file=sys.stderr)
"""


@pytest.mark.parametrize("command", ["train", "study"])
def test_a_commands_help_imports_no_model_library(command):
    result = subprocess.run(
        [sys.executable, "-c", HELP_IN_A_FRESH_PROCESS, command, "--help"], capture_output=True, text=True, timeout=300
    )
    assert result.stderr.strip().splitlines()[-1] == "0 []", result.stderr


# ---------------------------------------------------------------------------------------------------------------------
# Noise: what a user cannot act on is said once, or not at all
# ---------------------------------------------------------------------------------------------------------------------


def evaluated_run(root: Path, name: str, method: str, family: str, truth: float) -> Path:
    """A finished, evaluated run (or the base model's evaluation) of 10 questions."""
    import yaml

    run = root / name
    (run / "eval").mkdir(parents=True)
    verdicts = [(q < truth * 10, True) for q in range(10)]
    if method != "base":
        (run / "heads.json").write_text(json.dumps({"spec": "all", "heads_seed": 0, "family": family}))
        (run / "recipe.yaml").write_text(yaml.safe_dump({"beta": 0.1, "learning_rate": 5e-4}))
        (run / "metrics.json").write_text(json.dumps({"train_loss": 1.0}))
    metrics = {"true": truth, "info": 1.0, "true_info": truth, "mc1": truth / 2, "mc2": truth / 2, "ce": 3.0}
    if method != "base":
        metrics["kl"] = 0.1
    (run / "eval" / "metrics.json").write_text(json.dumps(metrics))
    lines = [json.dumps({"question_id": q, "truthful": t, "informative": i}) for q, (t, i) in enumerate(verdicts)]
    (run / "eval" / "generations.jsonl").write_text("\n".join(lines) + "\n")
    return run


def test_a_report_draws_only_the_figures_it_has_data_for(tmp_path, capsys):
    runs, report = tmp_path / "runs", tmp_path / "report"
    evaluated_run(runs, "base", "base", "base", 0.3)
    assert locedit(["report", str(runs), "--output_dir", str(report)]) == 0
    # The base model alone: its point in the truth-info plane and at KL 0; no ITI edit, no single heads.
    assert sorted(path.name for path in report.glob("*.png")) == [
        "fig1c_5_mc_vs_kl.png",
        "fig2_3_truth_info_tradeoff.png",
    ]
    (runs / "base" / "eval" / "metrics.json").write_text(json.dumps({"mc1": 0.2, "mc2": 0.3, "ce": 3.0}))
    assert locedit(["report", str(runs), "--output_dir", str(report), "--metric", "mc2"]) == 0
    assert sorted(path.name for path in report.glob("*.png")) == ["fig1c_5_mc_vs_kl.png"]  # not judged

    evaluated_run(runs, "all", "ipo", "all-heads", 0.8)  # no ITI edit, no single heads
    assert locedit(["report", str(runs), "--output_dir", str(report)]) == 0
    assert sorted(path.name for path in report.glob("*.png")) == [
        "fig1c_5_mc_vs_kl.png",
        "fig2_3_truth_info_tradeoff.png",
    ]
    capsys.readouterr()


def test_a_report_removes_a_figure_its_runs_no_longer_have_data_for(tmp_path):
    runs, report = tmp_path / "runs", tmp_path / "report"
    evaluated_run(runs, "base", "base", "base", 0.3)
    report.mkdir()
    (report / "fig4a_single_heads.png").write_bytes(b"an earlier report's figure")
    assert locedit(["report", str(runs), "--output_dir", str(report)]) == 0
    assert not (report / "fig4a_single_heads.png").exists()


def test_truthfulqas_cleaning_notice_is_one_line_said_once_in_a_study_dry_run(shared_data_dir):
    """Every stage of the study reads the data (6 times here): the notice that 31 empty answers were dropped was
    printed each time with Python's file, line and source line (`_warn(...)`); it is one line, once. (A process of
    its own: in this one the test runner records warnings instead of printing them.)"""
    csv = shared_data_dir / "truthfulqa" / "TruthfulQA.csv"
    argv = [sys.executable, "-m", "locedit.cli", "study", "recipes/tiny_probe.yaml", "--dataset", str(csv)]
    argv += ["--eval_judge_truth", "none", "--eval_judge_info", "none", "--eval_corpus", "none", "--dry_run", "true"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    err = result.stderr
    assert result.returncode == 0, err
    notices = [line for line in err.splitlines() if "dropped 31 empty answer(s)" in line]
    assert notices == [f"locedit: {csv}: dropped 31 empty answer(s) in 29 question(s)"], err
    assert "_warn(" not in err and "DataWarning" not in err


def test_a_tiny_run_on_a_cpu_warns_of_no_pinned_memory(capsys):
    import warnings

    from locedit.train import main as train

    recipe = parse_recipe([TINY, "--dataset", "synthetic:40", "--max_steps", "4", "--save_strategy", "no"])
    assert recipe.training.dataloader_pin_memory is False  # pinning needs an accelerator; this machine has none
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(recipe)
    assert not [w for w in caught if "pin_memory" in str(w.message)], [str(w.message) for w in caught]


def test_a_plan_of_one_head_says_one_head(capsys):
    assert locedit(["train", TINY, "--heads", "single:2", "--dry_run", "true"]) == 0
    out = capsys.readouterr().out
    assert "single:2 (2 edits trained in one pass; the first) -> 1 head: L" in out
    assert "1 heads" not in out and "in 1 layers" not in out


@pytest.mark.parametrize("command", ["probe", "study"])
def test_a_missing_data_file_is_named_before_the_model_is_built(command, capsys, monkeypatch):
    """The probe stage (alone, and first in the study) read the model first: a real model's GGUF file was converted
    (42 s, 1.8 GB) before a mistyped data path was reported."""
    import locedit.models.loading as loading

    def no_model(name):
        raise AssertionError(f"the model {name} was resolved before the data file was checked")

    monkeypatch.setattr(loading, "resolve_model_path", no_model)  # what reading a model's config resolves first
    code = locedit([command, "recipes/tiny_probe.yaml", "--dataset", "/no/such.csv", "--dry_run", "true"])
    one_error_line(capsys, code, "dataset file not found: /no/such.csv")


@pytest.mark.parametrize("command", ["train", "study"])
def test_help_into_a_closed_pipe_ends_without_a_traceback(command):
    """`locedit train --help-all | head`: the reader goes away before the help is written."""
    import os

    read, write = os.pipe()
    os.close(read)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "locedit.cli", command, "--help"],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
        )
    finally:
        os.close(write)
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr
    assert result.returncode == 1
