"""tests/toy_reference.py: how a toy study made on another CPU is held to README's (the comparison CI needs there)."""

from __future__ import annotations

from toy_reference import table_differences, table_rows, without_timings

REFERENCE = """| model                    | heads | lr    | True (toy) | KL    | IPO loss | broken |
| ------------------------ | ----- | ----- | ---------- | ----- | -------- | ------ |
| base model               | -     | -     | 0.469      | -     | -        | -      |
| optimal at a single head | L0H0  | 0.200 | 0.531      | 0.501 | 21.521   | no     |
"""


def changed(old: str, new: str) -> str:
    assert old in REFERENCE
    return REFERENCE.replace(old, new)


def test_another_cpus_rounding_is_the_same_study():
    """What a second kind of CPU printed for README's toy study (one answer of 32 otherwise) is the same study."""
    other_cpu = changed("| 0.531      | 0.501 | 21.521   |", "| 0.500      | 0.493 | 21.513   |")
    assert table_differences(other_cpu, REFERENCE) == []
    assert table_differences(REFERENCE, REFERENCE) == []


def test_a_changed_study_is_not():
    assert table_differences(changed("| 0.531 ", "| 0.438 "), REFERENCE) == [
        "row 2 (optimal at a single head | L0H0 | 0.200): 0.438 instead of 0.531"
    ]
    assert table_differences(changed("21.521", "21.821"), REFERENCE) != []  # beyond 1% of a loss
    assert table_differences(changed("| L0H0 ", "| L0H1 "), REFERENCE) != []  # other heads
    assert table_differences(changed("| no     |", "| yes    |"), REFERENCE) != []  # broken
    assert table_differences(REFERENCE.replace("| base model ", "| ITI at all  "), REFERENCE) != []
    fewer = "\n".join(REFERENCE.splitlines()[:-1])
    assert table_differences(fewer, REFERENCE) == ["2 table rows instead of 3"]


def test_only_the_result_tables_are_read_without_separators_and_timings():
    """The intervals and sign tests against the base model move more than a figure with one answer: not compared."""
    assert [row[0] for row in table_rows(REFERENCE)] == ["model", "base model", "optimal at a single head"]
    comparisons = "| family | unbroken edits | metric | vs base |\n| --- | --- | --- | --- |\n"
    comparisons += "| ITI | 1 | True | +0.06 [-0.06, +0.19] |\n"
    assert table_rows(comparisons + "\n" + REFERENCE) == table_rows(REFERENCE)
    assert table_differences(comparisons.replace("+0.19", "+0.31") + "\n" + REFERENCE, REFERENCE) == []
    study = "# s\n\n## Wall time per stage\n\n| stage | s |\n| - | - |\n| probe | 3 |\n\n## Verdict\n\nyes\n"
    assert without_timings(study) == "# s\n\n\n## Verdict\n\nyes\n"
