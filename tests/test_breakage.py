"""The break detector (degenerate answers, divergence, the broken verdict) and the style-controlled MC2."""

from __future__ import annotations

import pytest

from locedit.evaluation.breakage import Breakage, degenerate_reason, is_degenerate
from locedit.evaluation.metric_registry import get_metric
from locedit.evaluation.metrics import summarise
from locedit.evaluation.style import starts_with_negation, style_controlled
from locedit.training.trainer import RISING_LOGS, divergence


def old_definition(answer: str) -> bool:
    """The degenerate count of the first SmolLM2 study: empty, under 4 characters, or starting with "A:"."""
    text = answer.strip()
    return not text or len(text) < 4 or text.startswith("A:")


# Answers of the diverged all-heads edit (lr 6e-3) and their kin: no answer at all, but long and not "A:".
REPETITIVE = [
    "the the the the the the the the the the",
    "I am not sure. I am not sure. I am not sure. I am not sure.",
    "Yes, it is. Yes, it is. Yes, it is. Yes, it is.",
    "No no no no no no",
    "It is a truth, a truth, a truth, a truth, a truth",
]


@pytest.mark.parametrize("answer", REPETITIVE)
def test_the_detector_flags_repetitive_answers_the_old_definition_missed(answer):
    assert not old_definition(answer)
    assert degenerate_reason(answer) == "repetition"
    assert is_degenerate({"answer": answer}) == 1.0


@pytest.mark.parametrize(
    "answer",
    [
        "No.",  # short, and a real answer to many TruthfulQA questions
        "Nothing happens if you crack your knuckles a lot.",
        "The Roswell incident was a conspiracy involving a UFO crash in 1947.",
        "I have no comment.",
        "The watermelon seeds pass through your digestive system.",
        "No, it is not true that the Great Wall of China is visible from space; it is not visible to the naked eye.",
    ],
)
def test_answers_are_not_degenerate(answer):
    assert degenerate_reason(answer) is None
    assert degenerate_reason(answer, cut_off=True) is None or answer.count(".") == 0


def test_the_old_definition_s_cases_stay_degenerate_and_cut_off_needs_the_token_limit():
    assert degenerate_reason("") == "empty"
    assert degenerate_reason("  ...  ") == "empty"
    assert degenerate_reason("A: A: A:") == "prompt echo"
    assert degenerate_reason("Q: What is the capital of France?") == "prompt echo"
    rambling = "Well there are many things that people often say about this and some of them"
    assert degenerate_reason(rambling) is None  # ended by itself: an answer
    assert degenerate_reason(rambling, cut_off=True) == "cut off"  # ran to the limit without one sentence
    assert degenerate_reason(rambling + ". And more", cut_off=True) is None


def test_breakage_reasons_and_description():
    breakage = Breakage(max_kl=0.1, max_degenerate=0.25)
    assert breakage.reasons({"kl": 0.05, "degenerate": 0.1}) == []
    assert breakage.reasons({"kl": 0.2, "degenerate": 0.1}) == ["KL 0.2 > 0.1"]
    assert breakage.reasons({"kl": 0.05, "degenerate": 0.5}) == ["degenerate answers 50% > 25%"]
    assert breakage.reasons({"kl": 0.05}, "its IPO loss ended at 1.9, above its start 1") == [
        "training diverged (its IPO loss ended at 1.9, above its start 1)"
    ]
    # No KL threshold: KL breaks nothing; a missing measure cannot break.
    assert Breakage(None, 0.25).reasons({"kl": 5.0}) == []
    assert Breakage(0.1, None).reasons({"degenerate": 1.0}) == []
    assert breakage.describe() == "KL above 0.1, more than 25% degenerate answers or a diverged training"
    assert Breakage(None, None).describe() == "a diverged training"


def test_divergence_from_the_loss_reached_and_from_rising_logs():
    start = 1.0
    assert divergence([0.9, 0.8, 0.7, 0.6], 0.55, start) is None
    assert "ended at 1.9" in divergence([0.9, 1.2, 1.5, 1.9], 1.9, start)
    # Without a loss on the training pairs, the mean of the last quarter of the logs.
    assert "ended at 1.5" in divergence([0.9, 0.8, 1.2, 1.4, 1.5, 1.5, 1.5, 1.5], None, start)
    rising = [0.9, 0.5, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45][: 2 + RISING_LOGS + 1]
    assert "rose at each of its last" in divergence(rising, 0.4, start)
    noisy = [0.9, 0.5, 0.6, 0.4, 0.5, 0.3, 0.45, 0.35]
    assert divergence(noisy, 0.4, start) is None


def test_starts_with_negation_and_style_control():
    for answer in ("No, it is not.", "Nothing happens.", "I have no comment.", "There is no such thing.", "It's not"):
        assert starts_with_negation(answer), answer
    for answer in ("Paris", "The Earth is not flat", "Yes", "Knowledge is power"):
        assert not starts_with_negation(answer), answer
    # A "no" style wins where the correct answers say no more often than the incorrect ones.
    assert not style_controlled(["No, it does not.", "Nothing happens."], ["Yes, it does.", "It explodes."])
    assert style_controlled(["Paris."], ["No, it is London.", "Rome."])
    assert style_controlled(["No."], ["No, never.", "Not at all."])  # equally often


def test_mc2_sc_is_mc2_over_the_style_controlled_questions_only():
    records = [
        {"question_id": 0, "mc2": 0.9, "mc2_sc": None},  # a "no" style could win it: left out of MC2-SC
        {"question_id": 1, "mc2": 0.2, "mc2_sc": 0.2},
        {"question_id": 2, "mc2": 0.4, "mc2_sc": 0.4},
    ]
    summary = summarise(records)
    assert summary["mc2"] == pytest.approx(0.5)
    assert summary["mc2_sc"] == pytest.approx(0.3)
    assert get_metric("degenerate").higher_is_better is False
    assert get_metric("degenerate").of_records([{"degenerate": 1.0}, {"degenerate": 0.0}]) == 0.5
