"""Splitting questions: whole questions go to one split, so no question is seen by two of them."""

from __future__ import annotations

import math
import random

from ..core.errors import DataError

SPLIT_NAMES = ("train", "validation", "test")


def validate_split_fractions(split_fractions) -> tuple[float, float, float]:
    """Checks that the split fractions are three non-negative numbers summing to 1.

    Args:
        split_fractions: Fractions of questions for train, validation and test.

    Returns:
        The fractions as a tuple of floats.

    Raises:
        DataError: If they are not three finite non-negative numbers summing to 1.
    """
    message = (
        "split_fractions must be three non-negative numbers (train, validation, test) summing to 1, "
        f"got {split_fractions!r}"
    )
    try:
        fractions = tuple(float(value) for value in split_fractions)
    except (TypeError, ValueError):
        raise DataError(message) from None
    if len(fractions) != 3 or not all(math.isfinite(f) and f >= 0 for f in fractions):
        raise DataError(message)
    if not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise DataError(message)
    return fractions


def split_units(unit_ids: list[int], fractions: tuple[float, float, float], seed: int) -> dict[str, set[int]]:
    """Shuffles the question ids with `seed` and cuts them by `fractions` into train, validation and test."""
    order = sorted(unit_ids)
    random.Random(seed).shuffle(order)
    first = round(fractions[0] * len(order))
    second = min(len(order), max(first, round((fractions[0] + fractions[1]) * len(order))))
    return dict(zip(SPLIT_NAMES, (set(order[:first]), set(order[first:second]), set(order[second:])), strict=True))


def hold_out(ids: list, fraction: float, seed) -> set:
    """A random `fraction` of `ids` (shuffled with `seed`), at least one and never all when fraction > 0: the
    held-out questions of a stage that trains on the rest (the probes, a judge)."""
    order = list(ids)
    random.Random(seed).shuffle(order)
    count = round(fraction * len(order))
    if fraction > 0:
        count = min(max(count, 1), len(order) - 1)
    return set(order[:count])
