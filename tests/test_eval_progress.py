"""`locedit eval`'s progress: a line and a bar for every phase, each model's wall time per phase (printed and in its
metrics' `timings`, saved as eval/timings.json beside metrics.json), and each model's files written as soon as it
is judged: at once by judges that run no model, after the model-based judges, which run once for all models at the
end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import locedit.evaluation.run as eval_module
from locedit import add_edit, edit_layers
from locedit.config import parse_recipe
from locedit.eval import cli
from locedit.evaluation.judges import HFJudge, Judge, OpenAIJudge, SimilarityJudge
from locedit.evaluation.run import is_model_based
from locedit.models.tiny import _default_corpus
from locedit.plan import make_plan
from locedit.rundir import write_run_description
from locedit.toy import ToyJudge

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "recipes" / "tiny.yaml")


@pytest.fixture
def edit_run(tiny_model_dir, tmp_path) -> Path:
    """One run directory as `locedit train` writes it, with a random nonzero edit of two heads of the tiny Llama
    (a fresh one per test: an evaluation with other settings is not overwritten)."""
    path = tmp_path / "outputs" / "tiny" / "two"
    base = tiny_model_dir("llama")
    recipe = parse_recipe([TINY, "--model_name_or_path", str(base), "--dataset", "synthetic:40", "--heads",
                           "L0H1,L1H2", "--output_dir", str(path)])  # fmt: skip
    plan = make_plan(recipe)
    write_run_description(plan.output_dir, recipe, plan.heads, plan.layout, plan.splits)
    edited = add_edit(AutoModelForCausalLM.from_pretrained(base), plan.edit_config)
    generator = torch.Generator().manual_seed(0)
    for layer in edit_layers(edited).values():
        weight = layer.lora_B["default"].weight
        weight.data = torch.randn(weight.shape, generator=generator) * 0.5
    edited.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(_default_corpus()[:6]))
    return path


def eval_argv(run: Path, corpus: Path, truth: str) -> list[str]:
    return [
        str(run), "--base", "--eval_judge_truth", truth, "--eval_judge_info", "none", "--eval_corpus", str(corpus),
        "--eval_corpus_max_tokens", "24", "--eval_max_new_tokens", "6", "--eval_batch_size", "8",
        "--eval_max_questions", "5", "--report_to", "none",
    ]  # fmt: skip


@pytest.fixture
def events(monkeypatch) -> list[tuple[str, str]]:
    """What happens in which order: ("eval", model), ("judge", spec) at a model judge's load, ("write", model)."""
    happened = []
    real_evaluate, real_write, real_load = eval_module.evaluate_model, eval_module.write_evaluation, HFJudge.load

    def evaluate_model(model, tokenizer, questions, target, *args, **kwargs):
        happened.append(("eval", target.name))
        return real_evaluate(model, tokenizer, questions, target, *args, **kwargs)

    def write_evaluation(output_dir, records, metrics):
        happened.append(("write", Path(output_dir).name))
        real_write(output_dir, records, metrics)

    def load(self):
        if self.model is None:  # load() returns at once when the weights are in memory
            happened.append(("judge", self.spec))
        real_load(self)

    monkeypatch.setattr(eval_module, "evaluate_model", evaluate_model)
    monkeypatch.setattr(eval_module, "write_evaluation", write_evaluation)
    monkeypatch.setattr(HFJudge, "load", load)
    return happened


def test_every_phase_shows_progress_and_each_models_files_are_written_when_it_is_done(
    edit_run, corpus, events, capsys
):
    assert cli(eval_argv(edit_run, corpus, "similarity")) == 0
    # The similarity judge needs no model: each model is judged and written before the next one is evaluated.
    assert events == [("eval", "base"), ("write", "base"), ("eval", "two"), ("write", "two")]
    captured = capsys.readouterr()
    out = captured.out
    for line in [
        "locedit eval: base: generating 5 answers",
        "locedit eval: base: MC on ",
        " answers of 5 questions",
        "locedit eval: base: CE on 6 documents",
        "locedit eval: two: KL/CE on 6 documents",
        "locedit eval: base: judging truth with similarity",
        "locedit eval: two: judging truth with similarity",
    ]:
        assert line in out, out
    for phase in ["generating", "MC answer log-probs", "KL and CE on the corpus", "judging truth"]:
        assert phase in captured.err  # a tqdm bar for each phase
    for name, run_dir in [("base", edit_run.parent / "base"), ("two", edit_run)]:
        timings = json.loads((run_dir / "eval" / "timings.json").read_text())
        assert "timings" not in json.loads((run_dir / "eval" / "metrics.json").read_text())  # the same on a rerun
        assert set(timings) == {"generation", "mc", "corpus", "judging"} and min(timings.values()) >= 0
        line = f"locedit eval: {name}: generation {timings['generation']:.1f} s, MC {timings['mc']:.1f} s, "
        assert line + f"corpus {timings['corpus']:.1f} s, judging {timings['judging']:.1f} s" in out


def test_model_based_judges_run_once_for_all_models_before_their_files_are_written(
    edit_run, corpus, events, tiny_model_dir, capsys
):
    judge = f"hf:{tiny_model_dir('llama', seed=3)}"
    assert cli(eval_argv(edit_run, corpus, judge)) == 0
    assert events == [("eval", "base"), ("eval", "two"), ("judge", judge), ("write", "base"), ("write", "two")]
    assert f"locedit eval: judging truth with {judge} (10 answers of 2 models)" in capsys.readouterr().out
    for run_dir in [edit_run.parent / "base", edit_run]:
        metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
        timings = json.loads((run_dir / "eval" / "timings.json").read_text())
        assert set(timings) == {"generation", "mc", "corpus", "judging_all_models"}
        assert "true" in metrics and metrics["mc_source"] == "answers"


def test_a_judge_is_model_based_when_it_runs_a_model():
    assert is_model_based(HFJudge("some/judge", "truth")) and is_model_based(OpenAIJudge("gpt-judge", "info"))
    assert not is_model_based(SimilarityJudge("", "truth")) and not is_model_based(ToyJudge("", "truth"))

    class LocalJudge(Judge):  # a plugin's judge says so itself
        kind, model_based = "local", True

        def score_prompts(self, prompts):
            return [0.0 for _ in prompts]

    assert is_model_based(LocalJudge("x", "truth"))


def test_the_metrics_evaluate_returns_carry_the_timings(tiny_model_dir, tmp_path):
    from locedit.evaluation import evaluate

    argv = [TINY, "--model_name_or_path", str(tiny_model_dir("llama")), "--dataset", "synthetic:20",
            "--eval_judge_truth", "none", "--eval_judge_info", "none", "--eval_corpus", "none", "--eval_mc", "false",
            "--eval_max_new_tokens", "4", "--eval_output_dir", str(tmp_path)]  # fmt: skip
    recipe = parse_recipe(argv)
    (metrics,) = evaluate(recipe, base=True)
    assert set(metrics["timings"]) == {"generation"} and metrics["mc_source"] is None
    assert json.loads((tmp_path / "eval" / "timings.json").read_text()) == metrics["timings"]
