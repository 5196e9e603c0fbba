"""Messages that name the real cause, help that fits a screen, and no notice a user cannot act on printed twice.

Each test shows the line a user now gets: a missing data file before any run-directory check, a mistyped flag with
the closest valid ones, a wrong type in a recipe file with the file, key and expected type, each command's own flags
grouped by purpose in its --help.
"""

from __future__ import annotations

import json
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
