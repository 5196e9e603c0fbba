"""`locedit study`: its plan from a recipe, its report, and the whole toy study end to end."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from toy_reference import assert_same_study

from locedit import study
from locedit.cli import main as locedit_main
from locedit.config import parse_recipe
from locedit.core.errors import RecipeError
from locedit.data import load_questions
from locedit.pipelines import study as study_pipeline
from locedit.reporting import study as study_report

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TOY = str(RECIPES / "toy.yaml")


def _settings(recipe) -> dict:
    """Everything a recipe sets, but its name and where its runs go."""
    training = {k: v for k, v in recipe.training.to_dict().items() if k not in ("output_dir", "logging_dir")}
    parts = (recipe.edit, recipe.model, recipe.probe, recipe.eval)
    return {"training": training, **{type(part).__name__: dataclasses.asdict(part) for part in parts}}


def test_options_are_split_from_the_recipe_flags():
    options, rest = study_pipeline.parse_options(
        [TOY, "--study_random", "3", "--beta", "0.3", "--study_lr_all", "0.02"]
    )
    assert (options.random, options.single, options.lr_all, options.lr_single) == (3, 8, 0.02, None)
    assert rest == [TOY, "--beta", "0.3"]
    with pytest.raises(RecipeError, match="study_single -1 is not valid: it must be 0 or more"):
        study_pipeline.parse_options([TOY, "--study_single", "-1"])


def test_families_scale_the_learning_rate_as_the_paper():
    recipe = parse_recipe([TOY])
    families = dict(study_pipeline.family_flags(recipe, study_pipeline.StudyOptions(random=3, single=2)))
    assert list(families) == ["probe", "random", "single", "all"]
    assert families["probe"] == ["--heads", "probe:4"]
    assert families["random"] == ["--heads", "random:4", "--heads_draws", "3"]
    lr = recipe.training.learning_rate
    assert families["single"] == ["--heads", "single:2", "--learning_rate", f"{lr * 4:g}"]
    assert families["all"] == ["--heads", "all", "--learning_rate", f"{lr / 5:g}"]
    only = study_pipeline.family_flags(recipe, study_pipeline.StudyOptions(random=0, single=0, lr_all=0.123))
    assert only == [("probe", ["--heads", "probe:4"]), ("all", ["--heads", "all", "--learning_rate", "0.123"])]


@pytest.mark.parametrize(
    ("variant", "family"), [("toy_all_heads", "all"), ("toy_random_heads", "random"), ("toy_single_heads", "single")]
)
def test_toy_variant_recipes_are_the_study_families(variant, family):
    """Each toy_* recipe trains exactly what `locedit study recipes/toy.yaml` trains for its family."""
    flags = dict(study_pipeline.family_flags(parse_recipe([TOY]), study_pipeline.StudyOptions()))[family]
    assert _settings(parse_recipe([str(RECIPES / f"{variant}.yaml")])) == _settings(parse_recipe([TOY, *flags]))


def test_study_recipe_is_checked_before_any_work():
    with pytest.raises(RecipeError, match="set heads to probe:K, not 'all'"):
        study_pipeline.check_study_recipe(parse_recipe([TOY, "--heads", "all"]))
    with pytest.raises(RecipeError, match="same world.*dataset toy:entities=12"):
        study_pipeline.check_study_recipe(parse_recipe([TOY, "--dataset", "toy:entities=12"]))
    with pytest.raises(RecipeError, match="same world.*eval_corpus toy:seed=3"):
        study_pipeline.check_study_recipe(parse_recipe([TOY, "--eval_corpus", "toy:seed=3"]))
    with pytest.raises(RecipeError, match="eval_judge_info: unknown toy setting 'x'"):
        study_pipeline.check_study_recipe(parse_recipe([TOY, "--eval_judge_info", "toy:x"]))
    # Model settings may differ from the data's: only the world must be the same.
    study_pipeline.check_study_recipe(parse_recipe([TOY, "--model_name_or_path", "toy:layers=2"]))
    # One directory for every stage's runs: the second stage found the first's run there, after the probe and ITI.
    with pytest.raises(RecipeError, match="output_dir 'mine' names one run's directory.*under outputs/toy/"):
        study_pipeline.check_study_recipe(parse_recipe([TOY, "--output_dir", "mine"]))


def test_a_plugins_heuristic_is_a_study_heuristic(monkeypatch):
    """A plugin that registers a locator (a heuristic) when it is imported: the study takes its name."""
    from types import SimpleNamespace

    from locedit.core import plugins
    from locedit.locate import LOCATORS, Locator, register_locator

    def load():
        importance = LOCATORS["importance"]
        register_locator(Locator("plugged", "a plugin's scores", importance.find, importance.run, importance.scores))

    plugins.load_plugins()  # the installed ones (the toy world) first
    monkeypatch.setattr(plugins, "entry_points", lambda group: [SimpleNamespace(name="plugged", load=load)])
    plugins.load_plugins.cache_clear()
    try:
        study_pipeline.check_study_recipe(parse_recipe([TOY, "--study_heuristics", "plugged"]))
        with pytest.raises(RecipeError, match="study_heuristics names unplugged: not a heuristic"):
            study_pipeline.check_study_recipe(parse_recipe([TOY, "--study_heuristics", "unplugged"]))
    finally:
        LOCATORS.pop("plugged", None)
        plugins.load_plugins.cache_clear()


def test_study_command_reports_mistakes_in_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert locedit_main(["study", TOY, "--heads", "random:2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "locedit: error: the study compares edits at the probe heads with others: set heads to probe:K, not 'random:2'"
    ]
    assert not (tmp_path / "outputs").exists()


def test_summary_and_tables():
    rows = [
        {"model": "base model", "family": "base", "heads": "", "true": 0.5, "info": 1.0, "true_info": 0.5},
        {"model": "r", "family": "random", "heads": "L0H1", "true": 0.6, "info": 0.5, "true_info": 0.3},
        {"model": "r", "family": "random", "heads": "L1H1", "true": 0.8, "info": 1.0, "true_info": 0.8},
    ]
    summary = study_report.summary_rows(rows)
    assert [row["family"] for row in summary] == ["base", "random"]
    random = summary[1]
    assert random["edits"] == 2 and random["best_true_info"] == 0.8
    assert random["true"] == pytest.approx(0.7) and random["true_info"] == pytest.approx(0.55)
    table = study_report.format_table(rows).splitlines()
    assert table[0].split("|")[1:-1] == [" model      ", " heads ", " True  ", " Info  ", " True*Info "]
    assert "| base model | -     | 0.500 | 1.000 | 0.500     |" == table[2]
    assert "KL" not in table[0]  # a column no row has is left out


def test_summary_flags_broken_edits_and_leaves_them_out_of_the_best():
    rows = [
        {"family": "random", "mc2": 0.6, "kl": 0.05, "broken": "no", "ipo_loss": 0.4},
        {"family": "random", "mc2": 0.9, "kl": 0.50, "broken": "yes", "ipo_loss": 0.2},
    ]
    (random,) = study_report.summary_rows(rows, metric="mc2")
    assert random["best"] == 0.6 and random["broken"] == "1 of 2"
    assert random["kl"] == pytest.approx(0.275) and random["ipo_loss"] == pytest.approx(0.3)


# ---------------------------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------------------------


READBACK_PROJECT = "locedit-toy-readback"


@pytest.fixture(scope="module")
def small_toy_study(tmp_path_factory):
    """The whole study on the toy model (one random set and one single head instead of eight), tracked on trackio
    and on W&B offline: its directory, its report and W&B's directory."""
    from test_tracking import wandb_offline_in

    tmp_path = tmp_path_factory.mktemp("small-study")
    with pytest.MonkeyPatch.context() as monkeypatch, wandb_offline_in(tmp_path, monkeypatch):
        monkeypatch.chdir(tmp_path)
        tracking = ["--report_to", "trackio,wandb", "--wandb_project", READBACK_PROJECT]
        report = study.main([TOY, "--study_random", "1", "--study_single", "1", *tracking])
    return tmp_path, report


def test_toy_study_end_to_end(small_toy_study):
    """The whole study on the toy model (one random set and one single head instead of eight): the optimal edit at
    all heads must answer the held-out questions far more truly than the base model, and still informatively."""
    tmp_path, report = small_toy_study

    rows = {row["family"]: row for row in report["rows"]}
    families = ["base", "iti", "iti_random", "probe", "random", "single", "all"]
    assert [row["family"] for row in report["rows"]] == families
    # ITI and the optimal edit at the same random heads (Fig. 1a compares probe with random heads under both).
    assert rows["iti_random"]["heads"] == rows["random"]["heads"]
    base, best = rows["base"], rows["all"]
    assert best["true"] >= base["true"] + 0.2, (base["true"], best["true"])
    assert best["info"] >= 0.5
    assert base["true_misconceptions"] <= 0.2 <= 0.5 <= best["true_misconceptions"]  # the planted falsehoods
    assert best["kl"] is not None and base["kl"] is None  # measured on the world's statements, edits only

    test_questions = load_questions("toy")["test"].num_rows
    out = tmp_path / "outputs" / "toy" / "study"
    with open(out / "base" / "eval" / "metrics.json") as f:
        assert json.load(f)["questions"] == test_questions  # held-out questions only
    saved = json.loads((out / "study.json").read_text())
    assert [row["family"] for row in saved["rows"]] == list(rows)
    assert set(saved["timings"]) == {
        "model",
        "probe",
        "iti",
        "train probe",
        "train random",
        "train single",
        "train all",
        "eval",
        "report",
    }
    assert (out / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The paper's report of the same runs: its figures, and the verdict for both methods.
    for name in ["results.csv", "results.md", "verdict.md", "verdict.json"]:
        assert (out / "report" / name).is_file()
    assert {path.name for path in (out / "report").glob("*.png")} == {
        "fig1a_iti_probe_vs_random.png",
        "fig2_3_truth_info_tradeoff.png",
        "fig4a_single_heads.png",
        "fig1c_5_mc_vs_kl.png",
    }
    assert set(report["verdict"]["probe_vs_random"]) == {"iti", "ipo"}
    markdown = (out / "study.md").read_text()
    assert report["summary_table"] in markdown and report["table"] in markdown and "| total |" in markdown


def test_the_study_is_on_trackio_and_on_wandb_with_the_same_keys(small_toy_study):
    """`locedit study` leaves a trackio project holding the training curves, each model's metrics and generations,
    the probe's heatmap and top heads, and the study's tables, figures and verdict; the same runs and keys reach
    W&B (offline), each read back with its tracker's own reader."""
    from test_tracking import trackio_runs, wandb_offline_runs

    tmp_path, report = small_toy_study
    on_trackio, on_wandb = trackio_runs(READBACK_PROJECT), wandb_offline_runs(tmp_path)
    assert set(on_trackio) == set(on_wandb)
    stages = ("-eval", "-probe", "-study")
    training = {n: run for n, run in on_trackio.items() if not n.endswith(stages) and not n.startswith("iti-")}
    # One run per trained family (a family of several edits trains as one multi-edit run), in its family's group.
    assert len(training) == 4 and all({"train/loss", "train/rewards/margins"} <= r["keys"] for r in training.values())
    assert {run["group"] for run in training.values()} == {"probe-4", "random-4", "single-head", "all-heads"}
    all_heads = next(run for run in training.values() if run["group"] == "all-heads")
    assert any(key.startswith("train/edit/L0H0/") for key in all_heads["keys"])  # the norm at each edited head
    evaluated = [name for name in on_trackio if name.endswith("-eval")]
    assert len(evaluated) == len(report["rows"]) and "base-eval" in evaluated  # every model of the table
    assert {"toy-probe", "toy-study"} <= set(on_trackio)
    iti = [run for name, run in on_trackio.items() if name.startswith("iti-") and not name.endswith("-eval")]
    assert len(iti) == 2 and all("iti/edits" in run["keys"] for run in iti)  # at the probe heads, at random heads
    for name in evaluated:
        assert {"eval/true", "eval/info", "eval/mc2", "eval/generations"} <= on_trackio[name]["keys"]
    generations = next(log["eval/generations"] for log in on_trackio["base-eval"]["logs"] if "eval/generations" in log)
    assert generations["_type"] == "trackio.table"
    assert {"question", "answer", "truth", "info", "degenerate"} <= set(generations["_value"][0])
    assert {"probe/heatmap", "probe/top_heads"} <= on_trackio["toy-probe"]["keys"]
    study_keys = {"study/families", "study/edits", "study/study", "study/verdict", "study/fig1a_iti_probe_vs_random"}
    assert study_keys <= on_trackio["toy-study"]["keys"]

    summary_only = {"total_flos", "train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss"}
    for name, run in on_trackio.items():
        assert run["keys"] == on_wandb[name]["keys"] - summary_only, name
        assert run["group"] == on_wandb[name]["group"], name
    tracking = json.loads((tmp_path / "outputs" / "toy" / "study" / "tracking.json").read_text())
    assert tracking["project"] == READBACK_PROJECT and tracking["trackers"] == ["trackio", "wandb"]


@pytest.mark.parametrize(
    "flags, needle",
    [(["--study_single", "99"], "single:99"), (["--eval_judge_truth", "hf:/no/such/judge"], "/no/such/judge")],
    ids=["late-family", "judge"],
)
def test_a_real_study_refuses_a_late_stage_problem_before_any_stage_runs(flags, needle, capsys, tmp_path):
    """The real study plans every stage and checks the judges and corpus first, as its dry run does: a bad last
    family or a judge that cannot load ends it in one line, with nothing trained or written."""
    code = locedit_main(["study", TOY, *flags])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("locedit: error:")]
    assert code == 2 and len(errors) == 1 and needle in errors[0] and "Traceback" not in err
    assert not Path("outputs").exists()


def test_judged_columns_say_what_measured_them():
    labels = study_report.judged_labels({"truth": "cpu", "info": "cpu"})
    assert labels == {"true": "True (cpu)", "info": "Info (cpu)", "true_info": "True*Info (cpu)"}
    # BLEU acc measures closeness to the references: it is never called True.
    assert study_report.judged_labels({"truth": "similarity", "info": "none"}) == {"true": "BLEU acc"}
    assert study_report.judged_labels({"truth": "hf:x", "info": "cpu"})["true_info"] == "True*Info (hf x cpu)"
    rows = [{"model": "base model", "family": "base", "true": 0.5, "info": 1.0, "true_info": 0.5}]
    header = study_report.format_table(rows, study_report.table_columns(labels)).splitlines()[0]
    assert [cell.strip() for cell in header.split("|")[1:-1]] == [
        "model",
        "True (cpu)",
        "Info (cpu)",
        "True*Info (cpu)",
    ]


def test_a_study_given_a_probe_result_uses_it_and_collects_none(tmp_path, monkeypatch, capsys):
    """`probe_results` names the probes the study's heads and ITI read: the study does not collect its own."""
    import shutil

    monkeypatch.chdir(tmp_path)
    assert locedit_main(["probe", TOY]) == 0
    shutil.move("outputs/toy/probe", "given")
    capsys.readouterr()
    flags = ["--probe_results", "given", "--study_random", "1", "--study_single", "1", "--dry_run", "true"]
    assert locedit_main(["study", TOY, *flags]) == 0
    out = capsys.readouterr().out
    assert "locedit study: locedit probe" not in out and "(to collect)" not in out
    assert "probe        given" in out


def test_the_toy_study_prints_readmes_table(tmp_path, monkeypatch):
    """README's toy table and docs/toy_study are what `locedit study recipes/toy.yaml` prints: the toy model is the
    shipped one on every machine (locedit.toy.model), and the study is deterministic on a CPU: bit for bit where the
    reference was made, within another CPU's rounding elsewhere (tests/toy_reference.py)."""
    monkeypatch.chdir(tmp_path)
    report = study.main([TOY])
    readme = (RECIPES.parent / "README.md").read_text().splitlines()
    table = readme[next(i for i, line in enumerate(readme) if line.startswith("| family ")) :]
    readme_table = "\n".join(table[: table.index("")])
    documented = (RECIPES.parent / "docs" / "toy_study" / "study.md").read_text()
    assert readme_table in documented, "README's toy table is not docs/toy_study's"
    assert_same_study(report["summary_table"].strip(), readme_table)  # else README's table is stale: paste the study's
    assert_same_study((tmp_path / "outputs" / "toy" / "study" / "study.md").read_text(), documented)
