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
