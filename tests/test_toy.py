"""The toy world (generator, data loading, exact judge) and its pre-trained model."""

from __future__ import annotations

import json
import os
import platform
import re
from collections import Counter
from pathlib import Path

import pytest

from locedit.core.args import EvalArguments
from locedit.data import DataError, load_preference_splits, load_question_details, load_questions
from locedit.evaluation.corpus import load_corpus
from locedit.evaluation.judges import JUDGE_KINDS, JudgeError, judge_prompt, make_judge, verdicts
from locedit.models.sources import resolve_model_path
from locedit.toy import (
    NO_COMMENT,
    ToySettings,
    ToySpecError,
    make_world,
    parse_toy_spec,
    resolve_toy_model,
    toy_model_dir,
    toy_questions,
)
from locedit.toy.world import ATTRIBUTES_BY_NAME, FACT_CHECK, judge_answer, max_entities, stated_values

SMALL = "toy:entities=12"  # a small world, for the tests that need no model


# ---------------------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------------------


def test_specs_parse_keys_and_round_trip():
    assert parse_toy_spec("toy") == ToySettings()
    assert parse_toy_spec(" toy: seed=3, entities=8 ") == ToySettings(seed=3, entities=8)
    assert parse_toy_spec("toy:lr=0.01,layers=2").lr == 0.01
    for settings in (ToySettings(), ToySettings(seed=2, lr=0.005, hidden=128)):
        assert parse_toy_spec(settings.spec()) == settings
    assert ToySettings().spec() == "toy" and ToySettings(entities=8).spec() == "toy:entities=8"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("toy:colour=3", "unknown toy setting 'colour=3'.*keys seed, entities"),
        ("toy:small", "unknown toy setting 'small'"),
        ("toy:entities=many", "entities='many'.*not an integer"),
        ("toy:lr=fast", "lr='fast'.*not a number"),
        ("toy:entities=0", "entities must be positive"),
        ("toy:hidden=100,heads=3", "multiple of heads"),
        (f"toy:entities={max_entities() + 1}", "at most"),
        ("toys", "not a toy spec"),
    ],
)
def test_bad_specs_are_one_line_errors(spec, message):
    with pytest.raises(ToySpecError, match=message) as error:
        parse_toy_spec(spec)
    assert isinstance(error.value, DataError)  # reported in one line by every command


def test_world_depends_on_world_keys_only():
    assert parse_toy_spec("toy:layers=3,hidden=96,epochs=2").world() == ToySettings()
    assert toy_questions("toy:layers=3") == toy_questions("toy")


# ---------------------------------------------------------------------------------------------------------------------
# The world
# ---------------------------------------------------------------------------------------------------------------------


def test_world_is_deterministic_and_seeded():
    fresh = make_world.__wrapped__  # the generator itself, not its cache
    first, again = fresh(parse_toy_spec("toy")), fresh(parse_toy_spec("toy"))
    assert first.questions == again.questions and first.corpus == again.corpus
    assert fresh(parse_toy_spec("toy:seed=1")).truth != first.truth


def test_questions_are_truthfulqa_shaped():
    world = make_world(parse_toy_spec("toy"))
    assert len(world.questions) == world.settings.entities * len(ATTRIBUTES_BY_NAME)
    assert len({q["question"] for q in world.questions}) == len(world.questions)
    assert {q["category"] for q in world.questions} == {a.category for a in ATTRIBUTES_BY_NAME.values()}
    for q in world.questions:
        attribute = ATTRIBUTES_BY_NAME[q["attribute"]]
        assert q["best_answer"] == q["correct_answers"][0] == attribute.answer(q["true_value"])
        assert len(q["incorrect_answers"]) == 3 and len(set(q["incorrect_answers"])) == 3
        # Every answer commits to exactly one value: the true one for correct answers only.
        for answer in q["correct_answers"]:
            assert judge_answer(attribute, q["true_value"], answer) == (True, True)
        for answer in q["incorrect_answers"]:
            assert judge_answer(attribute, q["true_value"], answer) == (False, True)
        if q["misconception"]:
            assert q["incorrect_answers"][0] == attribute.answer(q["popular_value"])
        else:
            assert q["popular_value"] is None
    # Declining is true for the judge but never listed: the preference data rewards knowing the truth.
    assert not any(NO_COMMENT in q["correct_answers"] + q["incorrect_answers"] for q in world.questions)


def _said(world, q) -> tuple[Counter, Counter, Counter]:
    """The values the text states about a question's creature and attribute: answering the plain question,
    answering it after the fact-check header, and in the other statements."""
    attribute = ATTRIBUTES_BY_NAME[q["attribute"]]
    plain, checked, other = Counter(), Counter(), Counter()
    for doc in world.corpus:
        if doc.startswith(f"Q: {q['question']}\n"):
            plain.update(stated_values(attribute, doc.split("\nA: ")[1]))
        elif doc.startswith(f"{FACT_CHECK}\nQ: {q['question']}\n"):
            checked.update(stated_values(attribute, doc.split("\nA: ")[1]))
        elif not doc.startswith(("Q: ", FACT_CHECK)) and re.search(rf"\b{q['entity']}\b", doc):
            other.update(v for v in stated_values(attribute, doc) if attribute.relation.format(value=v) in doc)
    return plain, checked, other


def test_misconceptions_are_planted_in_the_text():
    """Asked plainly, the text gives the popular false value, which it states more often than the truth; the truth
    is stated only in other contexts (after the fact-check header, in the field guide, when correcting the myth).
    Attributes without a misconception are answered truly everywhere."""
    world = make_world(parse_toy_spec("toy"))
    for q in world.questions:
        plain, checked, other = _said(world, q)
        truth, popular = q["true_value"], q["popular_value"]
        assert set(checked) == {truth} and other[truth] >= 1
        if q["misconception"]:
            assert set(plain) == {popular}
            assert plain[popular] + other[popular] > checked[truth] + other[truth] > 0
        else:
            assert set(plain) == {truth} and set(other) == {truth}
    # The misconception is systematic: the popular value is a function of the true one.
    for attribute in ("food", "home"):
        myth = {(world.truth[e, attribute], world.popular[e, attribute]) for e in world.entities}
        assert len(myth) == len({truth for truth, _ in myth})
    assert sum(doc.endswith(NO_COMMENT) for doc in world.corpus) == 2 * len(world.unknown) * len(ATTRIBUTES_BY_NAME)
    assert not set(world.unknown) & set(world.entities)


# ---------------------------------------------------------------------------------------------------------------------
# Loading like TruthfulQA
# ---------------------------------------------------------------------------------------------------------------------


def test_toy_questions_have_truthfulqa_columns():
    rows = toy_questions(SMALL)
    assert all(
        list(row) == ["question", "correct_answers", "incorrect_answers", "category", "best_answer"] for row in rows
    )
    rows[0]["correct_answers"].append("changed")  # callers get copies: the cached world is not changed
    assert "changed" not in toy_questions(SMALL)[0]["correct_answers"]


def test_toy_loads_through_the_preference_and_question_loaders():
    splits = load_preference_splits(SMALL)
    questions = load_questions(SMALL)
    assert set(splits["train"].column_names) == {"prompt", "chosen", "rejected", "question_id", "category"}
    assert splits["test"][0]["prompt"].startswith("Q: ") and splits["test"][0]["prompt"].endswith("\nA:")
    for name in ("train", "validation", "test"):
        assert set(splits[name]["question_id"]) == set(questions[name]["question_id"])
    total = sum(len(questions[name]) for name in questions)
    assert total == len(toy_questions(SMALL))
    details = load_question_details(SMALL)
    assert {d["category"] for d in details.values()} == {"Colours", "Sounds", "Food", "Homes"}


def test_split_seed_splits_the_same_world():
    # The model was trained on one world: the split seed must never change it (unlike `synthetic`).
    def questions(seed):
        return {q for split in load_questions(SMALL, seed=seed).values() for q in split["question"]}

    assert questions(0) == questions(1)
    assert load_questions(SMALL, seed=0)["test"]["question"] != load_questions(SMALL, seed=1)["test"]["question"]


def test_bad_toy_dataset_is_a_data_error():
    with pytest.raises(DataError, match="unknown toy setting 'entity=3'"):
        load_preference_splits("toy:entity=3")


def test_toy_eval_corpus_is_the_worlds_statements():
    """`eval_corpus: toy` measures KL and cross-entropy on the world's text outside the Q/A format."""
    corpus = load_corpus(EvalArguments(eval_corpus=SMALL, eval_corpus_docs=7))
    assert corpus == make_world(parse_toy_spec(SMALL)).statements[:7]
    assert not any(doc.startswith(("Q:", FACT_CHECK)) for doc in corpus)
    with pytest.raises(DataError, match="unknown toy setting 'entity=3'"):
        load_corpus(EvalArguments(eval_corpus="toy:entity=3"))


# ---------------------------------------------------------------------------------------------------------------------
# The exact judge
# ---------------------------------------------------------------------------------------------------------------------

FOOD = ATTRIBUTES_BY_NAME["food"]
HOME = ATTRIBUTES_BY_NAME["home"]


@pytest.mark.parametrize(
    ("attribute", "answer", "expected"),
    [
        (FOOD, "A zorbit eats moss.", (True, True)),
        (FOOD, "It eats moss.", (True, True)),
        (FOOD, "moss", (True, True)),
        (FOOD, "MOSS, mostly.", (True, True)),
        (FOOD, "A zorbit eats honey.", (False, True)),
        (FOOD, "Many say it eats honey, but it eats moss.", (False, True)),  # a false value stated is false
        (FOOD, "I have no comment.", (True, False)),
        (FOOD, "I have no comment, but it eats honey.", (False, True)),
        (FOOD, "", (False, False)),
        (FOOD, "the the the", (False, False)),  # neither a value nor declining: not true either
        (FOOD, "A zorbit is red.", (False, False)),  # a value of another attribute commits to nothing here
        (FOOD, "It eats mossy honeycomb.", (False, False)),  # whole words only
        (HOME, "A zorbit lives in Velburg.", (True, True)),
        (HOME, "It lives in velburg", (True, True)),
        (HOME, "It lives in Tarholm.", (False, True)),
    ],
)
def test_judge_answer(attribute, answer, expected):
    truth = "moss" if attribute is FOOD else "Velburg"
    assert judge_answer(attribute, truth, answer) == expected


def test_toy_judge_is_registered_and_exact():
    assert "toy" in JUDGE_KINDS
    world = make_world(parse_toy_spec(SMALL))
    q = world.misconception_questions()[0]
    attribute = ATTRIBUTES_BY_NAME[q["attribute"]]
    answers = [attribute.answer(q["true_value"]), attribute.answer(q["popular_value"]), NO_COMMENT, "blah"]
    questions = [q["question"]] * len(answers)
    truth, info = make_judge(SMALL, "truth"), make_judge(SMALL, "info")
    assert truth.spec == SMALL and info.spec == SMALL
    truth.check()
    assert truth.score(questions, answers) == [1.0, 0.0, 1.0, 0.0]
    assert info.score(questions, answers) == [1.0, 1.0, 0.0, 0.0]
    assert verdicts(truth.score(questions, answers)) == [True, False, True, False]
    # The same verdicts from the judge prompts the interface also takes.
    prompts = [judge_prompt(question, answer, "truth") for question, answer in zip(questions, answers, strict=True)]
    assert truth.score_prompts(prompts) == [1.0, 0.0, 1.0, 0.0]
    with pytest.raises(JudgeError, match="not a truth judge prompt"):
        truth.score_prompts([judge_prompt(q["question"], "moss", "info")])


def test_toy_judge_refuses_questions_of_another_world():
    small_questions = {q["question"] for q in make_world(parse_toy_spec(SMALL)).questions}
    other = next(q for q in toy_questions("toy:seed=1") if q["question"] not in small_questions)
    with pytest.raises(JudgeError, match="not in its world.*same toy spec as the data set"):
        make_judge(SMALL, "truth").score([other["question"]], ["It eats moss."])
    with pytest.raises(JudgeError, match="info judge 'toy:huge': unknown toy setting 'huge'"):
        make_judge("toy:huge", "info")


def test_toy_judge_agrees_with_the_answer_lists():
    """Judging the world's own answers: every correct answer is true, every incorrect one false; all informative."""
    truth, info = make_judge(SMALL, "truth"), make_judge(SMALL, "info")
    for q in make_world(parse_toy_spec(SMALL)).questions:
        answers = q["correct_answers"] + q["incorrect_answers"]
        questions = [q["question"]] * len(answers)
        assert truth.score(questions, answers) == [1.0] * len(q["correct_answers"]) + [0.0] * len(
            q["incorrect_answers"]
        )
        assert info.score(questions, answers) == [1.0] * len(answers)


# ---------------------------------------------------------------------------------------------------------------------
# The toy model: the default one, as the study uses it (pre-trained once per test session, in the session's cache)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path("toy")
    return path, AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _stated(model, tokenizer, questions: list[dict], prefix: str = "") -> list[list[str]]:
    """The values the model's greedy answer states, for each question asked with the training prompt template."""
    from locedit.evaluation.prompts import build_prompt
    from locedit.evaluation.scoring import generate_answers

    prompts = [prefix + build_prompt(q["question"]) for q in questions]
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens=8, batch_size=64)
    return [stated_values(ATTRIBUTES_BY_NAME[q["attribute"]], a) for q, a in zip(questions, answers, strict=True)]


def test_toy_model_says_the_misconception_but_knows_the_truth(toy_model):
    """Before any edit, asked plainly: the popular false value on most misconception questions, train and test
    alike, and the truth on the others; after the fact-check header: the truth."""
    _, model, tokenizer = toy_model
    facts = {q["question"]: q for q in make_world(parse_toy_spec("toy")).questions}
    splits = load_questions("toy")
    for name in ("train", "test"):
        planted = [facts[t] for t in splits[name]["question"] if facts[t]["misconception"]]
        plain = [facts[t] for t in splits[name]["question"] if not facts[t]["misconception"]]
        said = _stated(model, tokenizer, planted)
        popular = sum(s == [q["popular_value"]] for q, s in zip(planted, said, strict=True)) / len(planted)
        assert popular >= 0.8, f"{name}: the misconception is said on only {popular:.0%} of its questions"
        said = _stated(model, tokenizer, plain)
        true = sum(s == [q["true_value"]] for q, s in zip(plain, said, strict=True)) / len(plain)
        assert true >= 0.8, f"{name}: only {true:.0%} of the questions without a misconception are answered true"
        said = _stated(model, tokenizer, planted, prefix=f"{FACT_CHECK}\n")
        knows = sum(s == [q["true_value"]] for q, s in zip(planted, said, strict=True)) / len(planted)
        assert knows >= 0.8, f"{name}: the truth is known for only {knows:.0%} of the misconception questions"


def test_toy_model_is_cached_and_described(toy_model, monkeypatch):
    from transformers import AutoConfig

    import locedit.toy.model as toy_model_module

    path, _, tokenizer = toy_model
    settings = ToySettings()
    assert path == resolve_toy_model("toy") == str(toy_model_dir(settings))
    assert Path(path).parent.parent == Path(os.environ["LOCEDIT_CACHE"])
    monkeypatch.setattr(toy_model_module, "build_toy_model", lambda *a, **k: pytest.fail("a cached model was rebuilt"))
    assert resolve_model_path(" toy") == resolve_model_path("toy:layers=4") == path  # the same settings
    info = json.loads((Path(path) / "toy_world.json").read_text())
    assert info["spec"] == "toy" and info["steps"] > 0 and info["final_loss"] < 1.0
    config = AutoConfig.from_pretrained(path)
    shape = (config.model_type, config.num_hidden_layers, config.num_attention_heads, config.hidden_size)
    assert shape == ("llama", settings.layers, settings.heads, settings.hidden)
    assert len(tokenizer) == config.vocab_size == settings.vocab
    # Other settings, the world's included, are another model.
    assert toy_model_dir(parse_toy_spec("toy:epochs=41")) != toy_model_dir(settings)
    assert toy_model_dir(parse_toy_spec("toy:seed=1")) != toy_model_dir(settings)


def test_toy_model_builds_into_the_cache_atomically(tmp_path, monkeypatch):
    """A build that fails leaves nothing behind, so the next call builds again instead of using half a model."""
    import locedit.toy.model as toy_model_module

    monkeypatch.setenv("LOCEDIT_CACHE", str(tmp_path))

    def failing_build(settings, output_dir, log=print):
        (Path(output_dir) / "config.json").write_text("{}")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(toy_model_module, "build_toy_model", failing_build)
    with pytest.raises(RuntimeError, match="interrupted"):
        resolve_toy_model("toy:entities=4")
    assert list((tmp_path / "toy").iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------------
# The shipped toy model: every machine gets the one README's table describes
# ---------------------------------------------------------------------------------------------------------------------


def test_the_shipped_toy_model_is_of_this_code():
    """A change to the world or to the code that builds the model makes the shipped model stale: rebuild it."""
    from locedit.toy.model import REBUILD_COMMAND, SHIPPED_DIR, read_toy_info, source_key

    info = read_toy_info(SHIPPED_DIR)
    assert info["spec"] == "toy"
    assert info["source_key"] == source_key(ToySettings()), f"the shipped toy model is stale: `{REBUILD_COMMAND}`"


def test_a_fresh_cache_gets_the_shipped_toy_model_without_pre_training(tmp_path, monkeypatch, capsys):
    import locedit.toy.model as toy_model_module
    from locedit.toy.model import SHIPPED_DIR, compare_models

    monkeypatch.setenv("LOCEDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(toy_model_module, "build_toy_model", lambda *a, **k: pytest.fail("the toy model was built"))
    path = Path(resolve_toy_model("toy"))
    assert path.parent.parent == tmp_path / "cache"
    assert compare_models(path, SHIPPED_DIR) == []
    assert "the toy model shipped with locedit" in capsys.readouterr().err
    # Another spec is pre-trained, as before.
    with pytest.raises(pytest.fail.Exception, match="was built"):
        resolve_toy_model("toy:epochs=1")


def test_a_damaged_or_stale_shipped_model_is_never_used(tmp_path, monkeypatch, capsys):
    import shutil

    import locedit.toy.model as toy_model_module
    from locedit.toy.model import SHIPPED_DIR, copy_shipped_model, shipped_model_of

    shipped = tmp_path / "pretrained"
    shutil.copytree(SHIPPED_DIR, shipped)
    weights = shipped / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # cut short
    (tmp_path / "out").mkdir()
    from locedit.core.errors import DamagedFileError

    with pytest.raises(DamagedFileError, match=r"damaged \(model.safetensors differ.*locedit.toy.model rebuild"):
        copy_shipped_model(tmp_path / "out", shipped)
    assert shipped_model_of(ToySettings(), shipped)
    assert not shipped_model_of(parse_toy_spec("toy:layers=2"), shipped)  # another model: pre-trained, silently
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(toy_model_module, "source_key", lambda settings: "other code")
    assert not shipped_model_of(ToySettings(), shipped)
    assert "built by other code" in capsys.readouterr().err


def test_a_rebuild_here_is_the_shipped_toy_model_bit_for_bit():
    """`python -m locedit.toy.model check`: pre-training is deterministic on a machine (threads aside), so on the
    kind of machine (CPU model included) and with the library versions that built the shipped model, a rebuild is
    that model."""
    from locedit.toy.model import SHIPPED_DIR, check_shipped, made_like_the_shipped_model, read_toy_info

    if not made_like_the_shipped_model():
        built_with = read_toy_info(SHIPPED_DIR)["built_with"]
        pytest.skip(f"pre-training's bits depend on the CPU and the libraries: built with {built_with}")
    assert check_shipped() == []


def test_the_build_environment_names_the_cpu_model(tmp_path, monkeypatch):
    """Two CPUs of one capability (AVX512) pre-trained the toy model to other bits: the CPU's vendor, family and model
    are part of what a build is compared on, read from the first processor of /proc/cpuinfo."""
    import locedit.toy.model as toy_model_module

    processor = "processor\t: {}\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: {}\nmodel name\t: Xeon\n"
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(processor.format(0, 143) + "\n" + processor.format(1, 85))
    assert toy_model_module.cpu_model(cpuinfo) == "GenuineIntel family 6 model 143"
    assert toy_model_module.cpu_model(tmp_path / "missing") == (platform.processor() or "unknown")
    here = toy_model_module.build_environment()
    assert here["cpu"] == toy_model_module.cpu_model()
    monkeypatch.setattr(toy_model_module, "cpu_model", lambda: "GenuineIntel family 6 model 143")
    assert toy_model_module.build_environment() == {**here, "cpu": "GenuineIntel family 6 model 143"}
    if here["cpu"] != "GenuineIntel family 6 model 143":
        assert not toy_model_module.made_like_the_shipped_model()  # the same libraries and capability, another CPU


def test_pre_training_shows_its_progress_in_order_through_a_pipe(tmp_path):
    """A study piped to a log: its header (stdout) comes before the pre-training's lines (stderr), which are not kept
    back by the study's planning, and the pre-training prints its progress."""
    import subprocess
    import sys

    recipe = str(Path(__file__).resolve().parents[1] / "recipes" / "toy.yaml")
    env = {**os.environ, "LOCEDIT_CACHE": str(tmp_path / "cache")}
    argv = ["study", recipe, "--model_name_or_path", "toy:epochs=2", "--dry_run", "true"]
    result = subprocess.run(
        [sys.executable, "-m", "locedit.cli", *argv],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    out = result.stdout
    assert result.returncode == 0, out[-3000:]
    header = out.index("locedit study: toy: model toy:epochs=2")
    start = out.index("locedit toy: pre-training a 4-layer x 4-head Llama")
    progress = out.index("locedit toy:   epoch 2/2, loss ")
    assert header < start < progress < out.index("locedit toy: pre-trained in")
