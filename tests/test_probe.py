"""Head probing (ITI's localization): activations, batched probes against scikit-learn, probe:K, planted signal."""

from __future__ import annotations

import csv
import json
import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from locedit import cli as locedit_cli
from locedit.config import parse_recipe
from locedit.core.errors import HeadSpecError
from locedit.data import load_preference_splits, load_questions
from locedit.heads import HeadSpec, resolve_heads
from locedit.locate import (
    ProbeResult,
    compute_probe_result,
    fit_logistic_probes,
    make_probe_stage,
    mass_mean_directions,
    probe_accuracy,
)
from locedit.locate.activations import build_probe_examples, collect_head_activations
from locedit.models.layout import OUTPUT_PROJECTIONS, AttentionLayout
from locedit.models.tiny import BOS_TOKEN, EOS_TOKEN
from locedit.plan import make_plan
from locedit.probe import main as probe_main

REPO = Path(__file__).resolve().parents[1]
TINY_PROBE = str(REPO / "recipes" / "tiny_probe.yaml")
TEXTS = [
    "Q: What colour is a zorbit? A: blue Q: What is 2 plus 3?",
    "Q: Hi A: no",
    "Q: Who invented the quennix lamp? A: The quennix lamp was invented by Druwump Blaley Q: What is 7 times 8?",
    "Q: What is the capital of Tarland? A: Velburg",
    "Q: x A: y Q: z",
    "Q: What does a druwump eat? A: I have no comment Q: Where is Velburg?",
    "A",
]


def layout_of(num_layers: int, num_heads: int, model_type: str = "llama") -> AttentionLayout:
    return AttentionLayout(model_type, num_layers, num_heads, OUTPUT_PROJECTIONS[model_type])


def signal_data(examples: int, heads: int, dim: int, seed: int = 0):
    """Random features with a label signal of a strength that varies by head, and uneven per-dimension scales."""
    generator = torch.Generator().manual_seed(seed)
    labels = (torch.rand(examples, generator=generator) > 0.5).long()
    features = torch.randn(examples, heads, dim, generator=generator) * torch.logspace(-0.5, 0.5, dim)
    shift = torch.randn(heads, dim, generator=generator) * torch.linspace(0, 0.6, heads)[:, None]
    return features + (2 * labels - 1)[:, None, None] * shift, labels


# ---------------------------------------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------------------------------------


def test_activations_are_the_projection_input_at_the_last_token(core_arch_dir):
    """Batched (padded, reordered) collection equals the output projection's input of each text run alone."""
    model = AutoModelForCausalLM.from_pretrained(core_arch_dir)
    tokenizer = AutoTokenizer.from_pretrained(core_arch_dir)
    layout = AttentionLayout.from_model(model)
    head_dim = layout.head_dim(model)
    collected = collect_head_activations(model, tokenizer, TEXTS, batch_size=3, progress=False)
    assert collected.shape == (len(TEXTS), layout.num_layers, layout.num_heads, head_dim)

    seen = {}
    hooks = [
        projection.register_forward_pre_hook(lambda m, args, layer=layer: seen.__setitem__(layer, args[0][0, -1]))
        for layer, projection in enumerate(layout.projections(model))
    ]
    try:
        for index, text in enumerate(TEXTS):
            with torch.no_grad():
                model(**tokenizer(text, return_tensors="pt"))
            for layer in range(layout.num_layers):
                expected = seen[layer].reshape(layout.num_heads, head_dim)
                torch.testing.assert_close(collected[index, layer], expected, atol=1e-5, rtol=1e-4)
    finally:
        for hook in hooks:
            hook.remove()
    assert not collected[:, :, 0].equal(collected[:, :, 1])  # heads are really separate slices


def test_probe_examples_come_from_training_questions_only(shared_data_dir, tmp_path):
    csv_path = str(shared_data_dir / "truthfulqa" / "TruthfulQA.csv")
    recipe = parse_recipe([TINY_PROBE, "--dataset", csv_path, "--split_seed", "3", "--probe_seed", "1"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pairs = load_preference_splits(csv_path, seed=3)
        questions = load_questions(csv_path, seed=3)
    for split in ("train", "validation", "test"):  # the questions split exactly as the pairs do
        assert set(questions[split]["question_id"]) == set(pairs[split]["question_id"])
    stage = make_probe_stage(recipe, "unused", layout_of(2, 4))
    train_ids = set(pairs["train"]["question_id"])
    assert set(stage.examples.question_ids) == train_ids
    train_text = {row["question_id"]: row["question"] for row in questions["train"]}
    other_texts = {row["question"] for row in questions["validation"]} | {row["question"] for row in questions["test"]}
    for text, qid in zip(stage.examples.texts[:400], stage.examples.question_ids[:400], strict=True):
        own, _, rest = text.partition(" A: ")
        other = rest.rpartition(" Q: ")[2]
        assert own == f"Q: {train_text[qid]}" and other != train_text[qid] and other not in other_texts
    expected = sum(len(r["correct_answers"]) + len(r["incorrect_answers"]) for r in questions["train"])
    assert len(stage.examples) == expected and sum(stage.examples.labels) == sum(
        len(r["correct_answers"]) for r in questions["train"]
    )
    # The probes' held-out part is whole training questions, about probe_val_fraction of them.
    val_ids = {q for q, v in zip(stage.examples.question_ids, stage.is_val, strict=True) if v}
    fit_ids = {q for q, v in zip(stage.examples.question_ids, stage.is_val, strict=True) if not v}
    assert not val_ids & fit_ids and abs(len(val_ids) - 0.2 * len(train_ids)) <= 1


def test_preference_data_gives_prompts_as_questions_split_like_the_pairs(tmp_path):
    rows = [
        {"prompt": f"Q: {i // 2}?\nA:", "chosen": f" yes {i}", "rejected": f" no {i}", "topic": str(i % 5)}
        for i in range(40)
    ]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    for group_by in (None, "topic"):
        pairs = load_preference_splits(str(path), seed=2, group_by=group_by)
        questions = load_questions(str(path), seed=2, group_by=group_by)
        for split in ("train", "validation", "test"):
            assert set(questions[split]["question_id"]) == set(pairs[split]["question_id"])
    first = load_questions(str(path), seed=2)
    record = next(r for split in first.values() for r in split if r["question"] == "Q: 0?\nA:")
    assert record["correct_answers"] == [" yes 0", " yes 1"] and record["incorrect_answers"] == [" no 0", " no 1"]


def test_probe_template_is_checked():
    records = [{"question_id": 0, "question": "a?", "correct_answers": ["x"], "incorrect_answers": ["y"]}]
    examples = build_probe_examples(records, "Q: {question} A: {answer}")
    assert examples.texts == ["Q: a? A: x", "Q: a? A: y"] and examples.labels == [1, 0]
    for bad in ["Q: {question}", "{question} {answer} {label}", "{question {answer}"]:
        with pytest.raises(ValueError, match="probe_template"):
            build_probe_examples(records, bad)


# ---------------------------------------------------------------------------------------------------------------------
# Probes
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("standardize", [False, True], ids=["raw", "standardized"])
def test_batched_probes_match_scikit_learn(standardize):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    features, labels = signal_data(480, 40, 12)
    train, val = slice(0, 360), slice(360, None)
    weight, bias = fit_logistic_probes(features[train], labels[train], standardize=standardize)
    accuracy = probe_accuracy(features[val], labels[val], weight, bias).numpy()
    differences, weight_errors, objective_gaps = [], [], []
    with threadpool_limits(1):  # small fits: BLAS threads only contend
        for head in range(features.shape[1]):
            probe = LogisticRegression(max_iter=1000)
            model = make_pipeline(StandardScaler(), probe) if standardize else probe
            x, y = features[train, head].numpy().astype(np.float64), labels[train].numpy()
            model.fit(x, y)
            differences.append(abs(model.score(features[val, head].numpy(), labels[val].numpy()) - accuracy[head]))
            coef = probe.coef_[0] / (model[0].scale_ if standardize else 1)
            weight_errors.append(np.abs(coef - weight[head].numpy()).max() / np.abs(coef).max())
            if not standardize:  # the objective both minimise: sum of log-losses + ||w||^2 / 2
                ours = _objective(x, y, weight[head].double().numpy(), bias[head].item())
                theirs = _objective(x, y, probe.coef_[0], probe.intercept_[0])
                objective_gaps.append((ours - theirs) / theirs)
    differences = np.array(differences)
    assert (differences <= 0.01 + 1e-6).mean() >= 0.95  # within one point on nearly all heads
    assert np.median(weight_errors) < 1e-2  # the same probes, not just the same accuracy
    assert max(objective_gaps, default=0) < 1e-7  # never a worse optimum than scikit-learn's
    assert accuracy.max() > 0.8 and accuracy.min() < 0.65  # the data has weak and strong heads


def _objective(x, y, w, b) -> float:
    z = x @ w + b
    return float(np.sum(np.logaddexp(0, z) - y * z) + 0.5 * w @ w)


def test_mass_mean_direction_and_sigma_follow_their_definition():
    features, labels = signal_data(200, 6, 5, seed=1)
    u, sigma = mass_mean_directions(features, labels)
    x = features.double().numpy()
    for head in range(6):
        shift = x[labels == 1, head].mean(0) - x[labels == 0, head].mean(0)
        expected = shift / np.linalg.norm(shift)
        np.testing.assert_allclose(u[head].numpy(), expected, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(sigma[head].item(), np.std(x[:, head] @ expected), rtol=1e-4)


def test_probe_heads_resolve_to_the_top_k():
    scores = torch.tensor([[0.50, 0.91, 0.60], [0.91, 0.70, 0.95], [0.55, 0.80, 0.91]])
    layout = layout_of(3, 3)
    assert resolve_heads("probe:1", layout, probe_scores=scores) == [(1, 2)]
    # Ties at 0.91 go to the lower layer, then the lower head; the result is sorted like every spec.
    assert resolve_heads("probe:3", layout, probe_scores=scores) == [(0, 1), (1, 0), (1, 2)]
    assert resolve_heads("probe:4", layout, probe_scores=scores.tolist()) == [(0, 1), (1, 0), (1, 2), (2, 2)]
    assert len(resolve_heads("probe:9", layout, probe_scores=scores)) == 9
    with pytest.raises(HeadSpecError, match=r"probe:10.*3 layers x 3 heads"):
        resolve_heads("probe:10", layout, probe_scores=scores)
    with pytest.raises(HeadSpecError, match="needs a probe result"):
        resolve_heads("probe:2", layout)
    with pytest.raises(HeadSpecError, match="2 layers x 3 heads.*3 layers x 3 heads"):
        resolve_heads("probe:2", layout, probe_scores=scores[:2])
    with pytest.raises(HeadSpecError, match="bad head count"):
        resolve_heads("probe:x", layout, probe_scores=scores)
    assert HeadSpec.parse("probe:16").family == "probe-16"


# ---------------------------------------------------------------------------------------------------------------------
# A planted signal
# ---------------------------------------------------------------------------------------------------------------------

PLANTED = [(0, 1), (0, 3)]


@pytest.fixture(scope="module")
def planted(tiny_model_dir, tmp_path_factory):
    """A tiny Llama in which only heads L0H1 and L0H3 can tell a correct answer from an incorrect one.

    Correct answers start with the token <|bos|>, incorrect ones with <|endoftext|>, otherwise the same text. The two
    tokens embed as +s e_0 and -s e_0 and no other token has an e_0 part; every projection that reads the residual
    stream ignores e_0, except the value rows of the planted heads, which read only e_0 and attend uniformly (zero
    queries). Their outputs (and only theirs) carry the label; they write nothing back (zero o_proj columns).
    Nothing else in the model has changed, so it is still a random model everywhere else.
    """
    root = tmp_path_factory.mktemp("planted")
    model_dir = root / "model"
    source = tiny_model_dir("llama")
    model = AutoModelForCausalLM.from_pretrained(source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    head_dim = 16
    with torch.no_grad():
        embed = model.get_input_embeddings().weight
        embed[:, 0] = 0.0
        embed[tokenizer.convert_tokens_to_ids(BOS_TOKEN)] = 0.0
        embed[tokenizer.convert_tokens_to_ids(EOS_TOKEN)] = 0.0
        embed[tokenizer.convert_tokens_to_ids(BOS_TOKEN), 0] = 3.0
        embed[tokenizer.convert_tokens_to_ids(EOS_TOKEN), 0] = -3.0
        for layer in model.model.layers:
            for linear in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                linear.weight[:, 0] = 0.0
            layer.mlp.gate_proj.weight[:, 0] = 0.0
            layer.mlp.up_proj.weight[:, 0] = 0.0
            # Nothing writes to e_0 either, so the residual's e_0 part (and every norm) is the same for +s and -s.
            layer.self_attn.o_proj.weight[0] = 0.0
            layer.mlp.down_proj.weight[0] = 0.0
        attention = model.model.layers[0].self_attn
        for _, head in PLANTED:
            rows = slice(head * head_dim, (head + 1) * head_dim)
            attention.q_proj.weight[rows] = 0.0
            attention.v_proj.weight[rows] = 0.0
            attention.v_proj.weight[head * head_dim, 0] = 1.0
            attention.o_proj.weight[:, rows] = 0.0
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    data = root / "planted.csv"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source_questions = load_questions("synthetic:60")
    rows = [r for split in ("train", "validation", "test") for r in source_questions[split]]
    with open(data, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Question", "Correct Answers", "Incorrect Answers"])
        for row in sorted(rows, key=lambda r: r["question_id"]):
            answer = row["correct_answers"][-1]
            writer.writerow([row["question"], f"{BOS_TOKEN} {answer}", f"{EOS_TOKEN} {answer}"])
    return model_dir, data


def test_planted_heads_rank_first(planted, tmp_path, capsys):
    model_dir, data = planted
    out = tmp_path / "probe"
    argv = [TINY_PROBE, "--model_name_or_path", str(model_dir), "--dataset", str(data), "--probe_output_dir", str(out)]
    # Without the other question, label-blind heads see identical inputs for a question's two examples.
    result = probe_main(parse_recipe([*argv, "--probe_template", "Q: {question} A: {answer}"]))
    assert result.top_heads(2) == PLANTED
    accuracy = result.val_accuracy
    assert all(accuracy[h] == 1.0 for h in PLANTED)
    others = [accuracy[layer, head] for layer in range(2) for head in range(4) if (layer, head) not in PLANTED]
    assert max(others) <= 0.5 + 1e-6
    # ITI's direction for a planted head is the one dimension that carries the label, positive for correct answers.
    torch.testing.assert_close(result.direction[0, 1], torch.eye(16)[0])
    assert result.sigma[0, 1] > 0
    # probe:2 on this result picks exactly the planted heads, from the saved files.
    recipe = parse_recipe([*argv, "--probe_results", str(out)])
    plan = make_plan(recipe)
    assert plan.heads == PLANTED
    assert "L0H1,L0H3" in plan.describe(recipe.model, recipe.edit, recipe.training)


# ---------------------------------------------------------------------------------------------------------------------
# The probe command
# ---------------------------------------------------------------------------------------------------------------------


def test_probe_command_writes_a_complete_result_once(tmp_path, capsys, monkeypatch):
    out = tmp_path / "probe"
    code = locedit_cli.main(["probe", TINY_PROBE, "--probe_output_dir", str(out)])
    assert code == 0
    files = {p.name for p in out.iterdir()}
    assert {"probe.json", "probe.safetensors", "heatmap.png"} <= files
    assert len([f for f in files if f.startswith("activations-")]) == 1 and not any(f.endswith(".tmp") for f in files)
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    info = json.loads((out / "probe.json").read_text())
    assert (info["num_layers"], info["num_heads"], info["head_dim"], info["model_type"]) == (2, 4, 16, "llama")
    assert np.array(info["val_accuracy"]).shape == (2, 4) and len(info["ranking"]) == 8
    assert not set(info["question_ids"]["train"]) & set(info["question_ids"]["validation"])
    result = ProbeResult.load(str(out))
    assert result.direction.shape == (2, 4, 16) and torch.allclose(result.direction.norm(dim=-1), torch.ones(2, 4))
    assert result.top_heads(8)[0] == max(
        ((layer, head) for layer in range(2) for head in range(4)), key=lambda h: result.val_accuracy[h]
    )
    capsys.readouterr()

    # A second run (and any stage that needs the probes) reuses the result without running the model.
    def no_model(*args, **kwargs):
        raise AssertionError("the model ran again for the same data")

    monkeypatch.setattr("locedit.locate.stage.collect_head_activations", no_model)
    assert locedit_cli.main(["probe", TINY_PROBE, "--probe_output_dir", str(out)]) == 0
    assert "up to date" in capsys.readouterr().out
    # A new fit setting refits from the cached activations, still without the model.
    assert locedit_cli.main(["probe", TINY_PROBE, "--probe_output_dir", str(out), "--probe_val_fraction", "0.3"]) == 0
    assert json.loads((out / "probe.json").read_text())["probe_val_fraction"] == 0.3


def test_compute_probe_result_rejects_one_label():
    features = torch.randn(10, 1, 2, 3)
    with pytest.raises(ValueError, match="only one label"):
        compute_probe_result(features, torch.ones(10), torch.zeros(10, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: one clear line each
# ---------------------------------------------------------------------------------------------------------------------


def fake_result(num_layers: int, num_heads: int, head_dim: int = 16, model_type: str = "llama") -> ProbeResult:
    shape = (num_layers, num_heads)
    return ProbeResult(
        val_accuracy=torch.rand(shape),
        train_accuracy=torch.rand(shape),
        direction=torch.nn.functional.normalize(torch.randn(*shape, head_dim), dim=-1),
        sigma=torch.rand(shape) + 0.5,
        weight=torch.zeros(*shape, head_dim),
        bias=torch.zeros(shape),
        info={"model_type": model_type},
    )


def bad_probe_results(tmp_path, kind: str) -> tuple[str, str]:
    """A probe_results path of the given kind, and what its error line must say."""
    path = tmp_path / kind
    if kind == "other-shape":
        fake_result(3, 4).save(str(path))
        return str(path), "3 layers x 4 heads"
    if kind == "other-model-type":
        fake_result(2, 4, model_type="gpt2").save(str(path))
        return str(path), "'gpt2' model"
    if kind == "unfinished":
        path.mkdir()
        return str(path), "not a finished probe result"
    if kind == "unreadable":
        fake_result(2, 4).save(str(path))
        (path / "probe.safetensors").write_bytes(b"not a safetensors file")
        return str(path), "unreadable"
    if kind == "bad-json":
        fake_result(2, 4).save(str(path))
        (path / "probe.json").write_text("{ not json")
        return str(path), "unreadable"
    return str(path), "does not exist"


@pytest.mark.parametrize("command", ["train", "iti"])
@pytest.mark.parametrize(
    "kind", ["missing", "unfinished", "unreadable", "bad-json", "other-shape", "other-model-type"]
)
def test_bad_probe_results_are_one_line(command, kind, tmp_path, capsys):
    path, message = bad_probe_results(tmp_path, kind)
    code = locedit_cli.main([command, TINY_PROBE, "--probe_results", path, "--output_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("locedit: error:")]
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "run").exists()


def test_probe_k_larger_than_the_model_is_one_line(capsys):
    assert locedit_cli.main(["train", TINY_PROBE, "--heads", "probe:9", "--dry_run", "true"]) == 2
    err = capsys.readouterr().err
    assert "probe:9" in err and "2 layers x 4 heads" in err and len(err.strip().splitlines()) == 1


def test_bad_probe_input_from_the_shell_has_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "locedit.probe", TINY_PROBE, "--probe_val_fraction", "1.5"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("locedit: error: probe_val_fraction")


def test_a_dry_run_of_a_probe_spec_without_a_result_says_probing_runs_first(tmp_path, capsys):
    plan = make_plan(parse_recipe([TINY_PROBE, "--probe_output_dir", str(tmp_path / "none"), "--dry_run", "true"]))
    assert plan.heads is None and plan.edit_config is None and plan.probe_dir == str(tmp_path / "none")
    recipe = parse_recipe([TINY_PROBE])
    text = plan.describe(recipe.model, recipe.edit, recipe.training)
    assert "probe stage runs first" in text and not (tmp_path / "none").exists()


def test_probe_speed_benchmark_runs_small(monkeypatch, capsys):
    """benchmarks/probe_speed.py in its CI size, so it never rots (in this process: no second interpreter start)."""
    monkeypatch.setattr(sys, "argv", ["probe_speed.py", "--small"])
    runpy.run_path(str(REPO / "benchmarks" / "probe_speed.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "ratio sklearn / batched" in out and "heads within one point" in out
