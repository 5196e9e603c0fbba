"""Gradient head importance (`importance:K`): the scores against a hand computation, TRL's tokenization of the pairs,
and the spec through the plan, training and ITI like `probe:K`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from locedit import cli as locedit_cli
from locedit.core.errors import HeadSpecError
from locedit.data import load_preference_splits
from locedit.heads import HeadSpec, rank_heads, resolve_heads
from locedit.locate.importance import ImportanceResult, gate_importance, tokenize_pair
from locedit.models.layout import AttentionLayout

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "recipes" / "tiny.yaml")
TINY_PROBE = str(REPO / "recipes" / "tiny_probe.yaml")


def random_pairs(vocab_size: int, count: int, seed: int = 0) -> list[tuple[list[int], list[int], list[int]]]:
    generator = torch.Generator().manual_seed(seed)

    def tokens(low: int, high: int) -> list[int]:
        length = int(torch.randint(low, high, (1,), generator=generator))
        return torch.randint(3, vocab_size, (length,), generator=generator).tolist()

    return [(tokens(2, 7), tokens(1, 6), tokens(1, 6)) for _ in range(count)]


def ipo_loss_by_hand(model, layout, pair, gates: torch.Tensor, reference: tuple[float, float], tau: float) -> float:
    """The IPO loss of one pair with head outputs scaled by `gates` (layers, heads): each completion's log-probs
    summed token by token and averaged over its tokens (TRL's IPO), the reference's held fixed."""
    head_dim = layout.head_dim(model)

    def scale(module, args, layer):
        factors = gates[layer].repeat_interleave(head_dim).to(args[0].dtype)
        return (args[0] * factors, *args[1:])

    handles = [
        projection.register_forward_pre_hook(lambda m, a, layer=layer: scale(m, a, layer))
        for layer, projection in enumerate(layout.projections(model))
    ]
    averages = []
    try:
        prompt = pair[0]
        for completion in pair[1:]:
            ids = torch.tensor([prompt + completion])
            with torch.no_grad():
                logps = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
            total = sum(float(logps[len(prompt) - 1 + k, token]) for k, token in enumerate(completion))
            averages.append(total / len(completion))
    finally:
        for handle in handles:
            handle.remove()
    delta = (averages[0] - reference[0]) - (averages[1] - reference[1])
    return (delta - 1 / (2 * tau)) ** 2, averages


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_scores_are_the_mean_absolute_gate_gradient_by_finite_differences(tiny_model_dir, arch):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(arch)).double().eval()
    layout = AttentionLayout.from_model(model)
    # eps 1e-3: Llama's RMSNorm computes in float32 even in a float64 model, so smaller steps difference its
    # rounding (at 1e-5 the quotient is off by 1-2%); the central difference's own error is O(eps^2).
    pairs, tau, eps = random_pairs(model.config.vocab_size, 3), 0.1, 1e-3
    scores = gate_importance(model, layout, pairs, tau, batch_size=2)  # pairs of different lengths in one batch
    assert scores.shape == (layout.num_layers, layout.num_heads)

    expected = torch.zeros(layout.num_layers, layout.num_heads, dtype=torch.float64)
    ones = torch.ones(layout.num_layers, layout.num_heads, dtype=torch.float64)
    for pair in pairs:
        _, reference = ipo_loss_by_hand(model, layout, pair, ones, (0.0, 0.0), tau)
        for layer in range(layout.num_layers):
            for head in range(layout.num_heads):
                up, down = ones.clone(), ones.clone()
                up[layer, head] += eps
                down[layer, head] -= eps
                plus, _ = ipo_loss_by_hand(model, layout, pair, up, reference, tau)
                minus, _ = ipo_loss_by_hand(model, layout, pair, down, reference, tau)
                expected[layer, head] += abs(plus - minus) / (2 * eps)
    expected /= len(pairs)
    torch.testing.assert_close(scores, expected, rtol=1e-3, atol=1e-6)
    assert float(scores.min()) > 0  # every head moves the margin of some pair


def test_pairs_are_tokenized_as_trl_tokenizes_them(tiny_model_dir, tmp_path):
    from trl import DPOConfig, DPOTrainer

    path = tiny_model_dir("llama")
    tokenizer = AutoTokenizer.from_pretrained(path)
    pairs = load_preference_splits("synthetic:12")["train"].select_columns(["prompt", "chosen", "rejected"])
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(path),
        args=DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False),
        train_dataset=pairs,
        processing_class=tokenizer,
    )
    for index in range(len(pairs)):
        row = trainer.train_dataset[index]
        assert tokenize_pair(tokenizer, pairs[index]) == (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"])


def test_importance_specs_resolve_from_scores_only():
    layout = AttentionLayout("llama", 3, 3, "model.layers.{layer}.self_attn.o_proj")
    scores = [[0.5, 0.9, 0.6], [0.9, 0.7, 0.95], [0.55, 0.8, 0.9]]
    spec = HeadSpec.parse("importance:3")
    assert (spec.locator, spec.family, spec.slug) == ("importance", "importance-3", "importance3")
    assert not spec.uses_seed and not spec.is_multi_edit
    assert spec.resolve(layout, scores) == sorted(rank_heads(scores)[:3]) == [(0, 1), (1, 0), (1, 2)]
    spec.check(layout)  # no scores needed to check K
    with pytest.raises(HeadSpecError, match="needs importance scores"):
        resolve_heads("importance:2", layout)
    with pytest.raises(HeadSpecError, match="asks for 10 heads"):
        HeadSpec.parse("importance:10").check(layout)


def test_importance_heads_train_and_make_iti_edits(tmp_path, capsys):
    """importance:K in a dry run (the stage planned), then trained (the stage runs on the loaded model first), its
    heads the top K of the saved scores; and ITI at those heads."""
    run = tmp_path / "run"
    flags = ["--heads", "importance:2", "--output_dir", str(run), "--max_steps", "2", "--report_to", "none"]
    assert locedit_cli.main(["train", TINY, *flags, "--dry_run", "true"]) == 0
    assert "no importance result at outputs/tiny/importance yet, so the importance stage runs first" in (
        capsys.readouterr().out
    )
    assert locedit_cli.main(["train", TINY, *flags]) == 0
    result = ImportanceResult.load("outputs/tiny/importance")
    assert result.info["pairs"] > 0 and (Path("outputs/tiny/importance") / "importance.png").is_file()
    heads = json.loads((run / "heads.json").read_text())
    assert heads["family"] == "importance-2"
    assert heads["importance_results"] == "outputs/tiny/importance"
    assert [tuple(h) for h in heads["heads"]] == sorted(result.top_heads(2))

    # The saved scores are found at plan time the next time (no weights needed to resolve the heads).
    assert locedit_cli.main(["train", TINY, *flags, "--dry_run", "true"]) == 0
    assert "(importance outputs/tiny/importance: gradient importance" in capsys.readouterr().out

    iti = tmp_path / "iti"
    argv = ["iti", TINY_PROBE, "--heads", "importance:2", "--output_dir", str(iti), "--iti_alpha", "5"]
    assert locedit_cli.main(argv) == 0
    iti_heads = json.loads((iti / "heads.json").read_text())
    iti_scores = ImportanceResult.load(iti_heads["importance_results"])  # this recipe's own (tiny_probe's split)
    assert [tuple(h) for h in iti_heads["heads"]] == sorted(iti_scores.top_heads(2))
    assert "probe_results" in iti_heads  # ITI's directions come from the probes, at the importance heads
    assert json.loads((iti / "metrics.json").read_text())["method"] == "iti"


def test_a_data_file_edited_in_place_is_scored_again(tmp_path, capsys, shared_data_dir):
    """The importance result is keyed by the data file's bytes, not only its name."""
    with open(shared_data_dir / "truthfulqa" / "TruthfulQA.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))[:41]  # the header and 40 questions
    data = tmp_path / "questions.csv"

    def write(rows):
        with open(data, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows(rows)

    write(rows)
    flags = ["--dataset", str(data), "--heads", "importance:2", "--max_steps", "1", "--report_to", "none"]
    flags += ["--output_dir", str(tmp_path / "run")]
    assert locedit_cli.main(["train", TINY, *flags]) == 0
    assert locedit_cli.main(["train", TINY, *flags, "--dry_run", "true"]) == 0
    assert "(importance outputs/tiny/importance: gradient importance" in capsys.readouterr().out
    write([rows[0], *[[*row[:3], row[3] + " Indeed.", *row[4:]] for row in rows[1:]]])  # every best answer longer
    assert locedit_cli.main(["train", TINY, *flags, "--dry_run", "true"]) == 0
    assert "no importance result at outputs/tiny/importance yet" in capsys.readouterr().out
