"""The toy study's reference (README's table, docs/toy_study) and how a study made here is held to it.

On the machine kind the shipped toy model was made on (`locedit.toy.model.made_like_the_shipped_model`: the same
libraries, CPU capability and CPU model), the toy study is reproduced bit for bit, so a study is held to the reference
exactly. On another CPU, torch's BLAS rounds some matmuls otherwise and an edit can answer a question of the 32
otherwise (seen: one single-head edit's True 0.500 instead of 0.531, its KL 0.493 instead of 0.501): there the study's
two result tables (each family, each model) have the same rows and the same words, and each figure is within two
answers of 32 (0.07) or 1%. (Its comparisons with the base model, intervals and sign tests, move with such an answer
more than that: a test that needs them compares with an uninterrupted study made on the same machine instead.)
"""

from __future__ import annotations

import re

from locedit.toy.model import made_like_the_shipped_model

ABSOLUTE, RELATIVE = 0.07, 0.01


def without_timings(study_md: str) -> str:
    """A study's study.md less its wall-time section (the one part that differs from run to run)."""
    return re.sub(r"## Wall time per stage\n.*?(?=\n## )", "", study_md, flags=re.S)


RESULT_TABLES = (["family", "edits"], ["model", "heads"])  # the headers' first cells of the two result tables


def table_rows(markdown: str) -> list[list[str]]:
    """The cells of every row of the result tables in `markdown` (README's, the study's summary and per-model ones),
    separator rows left out."""
    rows, in_table, kept = [], False, False
    for line in markdown.splitlines():
        if not line.startswith("|"):
            in_table = False
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if not in_table:  # a table's header row
            in_table, kept = True, cells[:2] in RESULT_TABLES
        if kept and not re.fullmatch(r"[|\s:-]+", line):
            rows.append(cells)
    return rows


def _number(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def table_differences(found: str, expected: str) -> list[str]:
    """Where the tables of `found` differ from those of `expected` beyond another CPU's rounding."""
    ours, theirs = table_rows(found), table_rows(expected)
    if len(ours) != len(theirs):
        return [f"{len(ours)} table rows instead of {len(theirs)}"]
    differences = []
    for row, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        if len(a) != len(b):
            differences.append(f"row {row}: {len(a)} cells instead of {len(b)}")
            continue
        for cell_a, cell_b in zip(a, b, strict=True):
            x, y = _number(cell_a), _number(cell_b)
            if x is None or y is None:
                same = cell_a == cell_b
            else:
                same = abs(x - y) <= max(ABSOLUTE, RELATIVE * abs(y))
            if not same:
                differences.append(f"row {row} ({' | '.join(b[:3])}): {cell_a} instead of {cell_b}")
    return differences


def assert_same_study(found: str, expected: str) -> None:
    """`found` is `expected` (two study.md texts or tables): exactly where the reference was made, and within
    another CPU's rounding elsewhere."""
    found, expected = without_timings(found), without_timings(expected)
    if made_like_the_shipped_model():
        assert found == expected
    else:
        assert table_differences(found, expected) == []
