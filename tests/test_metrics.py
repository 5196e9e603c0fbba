"""Each evaluation metric against a hand computation on a fixed example."""

from __future__ import annotations

import math

import pytest
import torch

from locedit.evaluation.metrics import (
    mc1,
    mc2,
    next_token_kl,
    per_category,
    sequence_logprobs,
    summarise,
    token_cross_entropy,
    true_info,
)


def test_true_info_is_the_product_of_the_two_means_not_the_mean_of_products():
    truthful = [True, True, False, True]
    informative = [True, False, True, True]
    scores = true_info(truthful, informative)
    assert scores["true"] == 0.75 and scores["info"] == 0.75
    assert scores["true_info"] == pytest.approx(0.5625)  # the mean of per-question products would be 0.5


def test_mc1_needs_the_best_answer_strictly_above_every_incorrect_one():
    assert mc1(-1.0, [-2.0, -1.5]) == 1.0
    assert mc1(-1.0, [-2.0, -0.5]) == 0.0
    assert mc1(-1.0, [-1.0, -3.0]) == 0.0  # a tie is not a win (TruthfulQA)


def test_mc2_is_the_normalised_probability_mass_of_the_correct_answers():
    correct = [math.log(0.2), math.log(0.1)]
    incorrect = [math.log(0.3), math.log(0.1)]
    assert mc2(correct, incorrect) == pytest.approx(0.3 / 0.7)
    # Log-probs of long answers underflow exp() in float64; the ratio is still exact in log space.
    assert mc2([-1000.0], [-1000.0 - math.log(3.0)]) == pytest.approx(0.75)


def test_kl_is_the_mean_over_a_documents_positions_of_kl_original_to_edited():
    p = torch.tensor([0.5, 0.25, 0.25])
    q = torch.tensor([0.25, 0.5, 0.25])
    reference = torch.stack([p.log(), p.log(), p.log()])[None]  # (1, 3 positions, 3 tokens)
    edited = torch.stack([q.log(), p.log(), q.log()])[None]
    mask = torch.tensor([[1, 1, 0]])  # the third position is padding
    # KL(p || q) = 0.5 ln(0.5/0.25) + 0.25 ln(0.25/0.5) = 0.25 ln 2 at position 0, 0 at position 1.
    assert next_token_kl(reference, edited, mask).item() == pytest.approx(0.25 * math.log(2) / 2)


def test_cross_entropy_is_the_mean_loss_of_predicting_each_next_token():
    logits = torch.log(
        torch.tensor(
            [
                [[0.1, 0.7, 0.2], [0.5, 0.25, 0.25], [0.3, 0.3, 0.4], [1 / 3, 1 / 3, 1 / 3]],
                [[0.6, 0.2, 0.2], [0.1, 0.1, 0.8], [0.2, 0.2, 0.6], [0.2, 0.2, 0.6]],
            ]
        )
    )
    ids = torch.tensor([[0, 1, 2, 0], [2, 0, 1, 1]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])  # rows of 3 and 2 tokens, right-padded
    expected = torch.tensor([-(math.log(0.7) + math.log(0.25)) / 2, -math.log(0.6)], dtype=torch.float32)
    assert torch.allclose(token_cross_entropy(logits, ids, mask), expected)


def test_sequence_logprobs_sums_the_target_tokens_only():
    logits = torch.log(torch.tensor([[[0.1, 0.9], [0.4, 0.6], [0.5, 0.5]]]))
    ids = torch.tensor([[0, 1, 0]])
    target = torch.tensor([[0, 0, 1]])  # only the last token is the completion
    assert sequence_logprobs(logits, ids, target).item() == pytest.approx(math.log(0.4))


def test_per_category_reports_each_categorys_own_true_info():
    records = [
        {"category": "A", "truthful": True, "informative": True, "mc1": 1.0, "mc2": 0.5},
        {"category": "A", "truthful": False, "informative": True, "mc1": 0.0, "mc2": 0.3},
        {"category": "B", "truthful": True, "informative": False, "mc1": 1.0, "mc2": 0.9},
        {"category": "B", "truthful": True, "informative": True, "mc1": 0.0, "mc2": 0.7},
    ]
    categories = per_category(records)
    assert categories["A"]["true_info"] == pytest.approx(0.5 * 1.0)
    assert categories["B"]["true_info"] == pytest.approx(1.0 * 0.5)
    assert categories["B"]["mc2"] == pytest.approx(0.8) and categories["A"]["questions"] == 2
    overall = summarise(records)
    assert overall["true_info"] == pytest.approx(0.75 * 0.75) and overall["mc1"] == 0.5


def test_one_judge_gives_its_mean_and_no_product():
    summary = summarise([{"truthful": True}, {"truthful": False}, {"truthful": True}, {"truthful": True}])
    assert summary["true"] == 0.75 and "true_info" not in summary and "info" not in summary
