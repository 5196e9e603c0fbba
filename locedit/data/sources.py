"""Where preference data comes from: named sources (`synthetic`, plugins such as `toy`), local files, the Hub.

`dataset:` in a recipe is a named source (`synthetic` or `synthetic:N`; a plugin's, e.g. `toy` or `toy:SETTINGS`),
a local `.csv`, `.json`, `.jsonl` or `.parquet` file, or anything `datasets.load_dataset` takes (a Hub id, or a local
dataset folder; `owner/name:split` picks a split, otherwise a lone split or `train` is used). Column names are
matched case-insensitively with spaces read as underscores, so the original TruthfulQA CSV header (`Question`,
`Correct Answers`, ...) and the Hub's (`question`, `correct_answers`, ...) both work.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..core.args import BAD_ROW_POLICIES
from ..core.errors import DataError, DataFileNotFoundError
from ..core.plugins import load_plugins
from .synthetic import synthetic_questions

logger = logging.getLogger(__name__)

SUPPORTED_EXTENSIONS = (".csv", ".json", ".jsonl", ".parquet")
# Other data-file endings, so that a typo such as "qa.tsv" is reported as a file problem, not sent to the Hub.
_FILE_LIKE_EXTENSIONS = SUPPORTED_EXTENSIONS + (".tsv", ".txt", ".arrow", ".gz", ".zip", ".xlsx", ".pkl")
QUESTION_COLUMNS = ("question", "correct_answers", "incorrect_answers")
PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class DataSource:
    """A named source of question-style rows. `rows(spec, seed)` makes them; `check(spec)` rejects a malformed spec
    cheaply (before any weights load)."""

    rows: Callable[[str, int], list[dict]]
    check: Callable[[str], object]


DATA_SOURCES: dict[str, DataSource] = {}


def register_data_source(name: str, rows: Callable[[str, int], list[dict]], check: Callable[[str], object]) -> None:
    """Make `dataset: NAME` and `dataset: NAME:SETTINGS` load through `rows(spec, seed)`."""
    DATA_SOURCES[name] = DataSource(rows, check)


def named_source(dataset: str) -> DataSource | None:
    """The registered source a `dataset` value names, or None for a file or a Hub id."""
    name = dataset.strip().partition(":")[0]
    if name not in DATA_SOURCES:
        load_plugins()
    return DATA_SOURCES.get(name)


def synthetic_size(dataset: str) -> int:
    """The number of questions "synthetic[:N]" asks for."""
    size = dataset.partition(":")[2]
    if not size:
        return 120
    if not size.isdigit() or int(size) < 1:
        raise DataError(f"dataset {dataset!r}: expected 'synthetic' or 'synthetic:N' with N a positive integer")
    return int(size)


register_data_source(
    "synthetic", lambda spec, seed: synthetic_questions(synthetic_size(spec), seed=seed), synthetic_size
)


def column_name(name: str) -> str:
    return name.strip().lower().replace(" ", "_")


def _looks_local(dataset: str) -> bool:
    """True when `dataset` names something on disk rather than a Hub id."""
    return (
        Path(dataset).suffix.lower() in _FILE_LIKE_EXTENSIONS
        or dataset.startswith(("/", "./", "../", "~"))
        or Path(dataset).expanduser().exists()
    )


def validate_dataset_arg(dataset: str) -> None:
    """Checks a `dataset` argument without loading anything, so a recipe can be rejected in seconds.

    Hub ids are accepted as they are; whether they exist is only known when they are loaded.

    Args:
        dataset: The `dataset` argument of `load_preference_splits`.

    Raises:
        DataFileNotFoundError: If it names a local file that does not exist.
        DataError: If it is a malformed named source ("synthetic:N", ...), a local file of an unsupported type, or one
            that cannot be read.
    """
    if not isinstance(dataset, str) or not dataset.strip():
        raise DataError(f"dataset must be a non-empty string, got {dataset!r}")
    source = named_source(dataset)
    if source is not None:
        source.check(dataset)  # e.g. the toy world is generated once and cached: a bad spec is reported now, cheaply
        return
    if not _looks_local(dataset):
        return
    path = Path(dataset).expanduser()
    if path.is_dir():
        return  # a local dataset folder, read by datasets.load_dataset
    if not path.exists():
        raise DataFileNotFoundError(f"dataset file not found: {dataset}")
    if path.suffix.lower() not in SUPPORTED_EXTENSIONS:
        raise DataError(f"dataset file {path} has an unsupported type; use one of {', '.join(SUPPORTED_EXTENSIONS)}")
    try:
        with path.open("rb"):
            pass
    except OSError as err:
        raise DataError(f"dataset file {dataset} cannot be read ({err.strerror or err})") from None


# Each reader gives the rows and where each row is, for messages about one row: "FILE:LINE" for text files whose
# records are lines (CSV records end on their line), "FILE: record N" otherwise.


def _read_text(path: Path, encoding: str = "utf-8") -> str:
    """The file's text; bytes that are not UTF-8 are named by line and column (Python's error gives only the byte's
    offset in the file)."""
    data = path.read_bytes()
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as error:
        line_start = data.rfind(b"\n", 0, error.start) + 1
        line = data.count(b"\n", 0, error.start) + 1
        column = len(data[line_start : error.start].decode(encoding, errors="replace")) + 1
        byte = f"0x{data[error.start]:02x}"
        raise DataError(
            f"{path}:{line}: not UTF-8 text (byte {byte} at column {column}); save the file as UTF-8"
        ) from None


def _invalid_json(path: Path, line: int, error: json.JSONDecodeError) -> DataError:
    return DataError(f"{path}:{line}: invalid JSON at column {error.colno} ({error.msg}); fix the data there")


def _read_csv(path: Path) -> tuple[list[dict], list[str]]:
    # utf-8-sig: spreadsheet exports often start with a byte-order mark, which would rename the first column.
    reader = csv.DictReader(io.StringIO(_read_text(path, "utf-8-sig"), newline=""))
    rows, places = [], []
    for row in reader:
        rows.append(row)
        places.append(f"{path}:{reader.line_num}")
    return rows, places


def _read_json_lines(text: str, path: Path) -> tuple[list[dict], list[str]]:
    rows, places = [], []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise _invalid_json(path, line_number, error) from None
        places.append(f"{path}:{line_number}")
    return rows, places


def _records(rows: list, path: Path) -> tuple[list, list[str]]:
    return rows, [f"{path}: record {number}" for number in range(1, len(rows) + 1)]


def _read_json(path: Path) -> tuple[list[dict], list[str]]:
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":
            # JSON Lines under a .json name, which is what `datasets.Dataset.to_json` writes.
            return _read_json_lines(text, path)
        raise _invalid_json(path, error.lineno, error) from None
    if isinstance(data, list):
        return _records(data, path)
    if isinstance(data, dict) and data and all(isinstance(value, list) for value in data.values()):
        lengths = {len(value) for value in data.values()}
        if len(lengths) == 1:  # a dict of columns, as pandas' to_json(orient="list") writes
            rows = [dict(zip(data, values, strict=True)) for values in zip(*data.values(), strict=True)]
            return _records(rows, path)
    if isinstance(data, dict):
        return _records([data], path)
    raise DataError(f"{path}: expected a list of records, a dict of equal-length columns, or JSON Lines")


def _read_local(path: Path) -> tuple[list[dict], list[str]]:
    """Reads the rows of a local data file as dicts, and where each row is in the file."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            rows, places = _read_csv(path)
        elif suffix == ".json":
            rows, places = _read_json(path)
        elif suffix == ".jsonl":
            rows, places = _read_json_lines(_read_text(path), path)
        else:
            import pyarrow.parquet  # installed with datasets; imported here as only parquet files need it

            rows, places = _records(pyarrow.parquet.read_table(path).to_pylist(), path)
    except DataError:
        raise
    except (OSError, ValueError) as error:  # undecodable text, corrupt parquet, ...
        raise DataError(f"could not read {path}: {error}") from None
    if not all(isinstance(row, dict) for row in rows):
        raise DataError(f"{path}: every record must be an object with named fields")
    return rows, places


def _load_hub(dataset: str, dataset_config: str | None) -> list[dict]:
    """Loads rows with `datasets.load_dataset`; "name:split" picks a split."""
    import datasets

    name, _, split = dataset.partition(":")
    try:
        loaded = datasets.load_dataset(name, name=dataset_config, split=split or None)
    except (ConnectionError, FileNotFoundError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(
            f"could not load dataset {name!r} (config {dataset_config!r}) with datasets.load_dataset: {reason}"
        ) from error
    if isinstance(loaded, datasets.DatasetDict):
        if len(loaded) == 1:
            loaded = next(iter(loaded.values()))
        elif "train" in loaded:
            logger.info("%s has splits %s; using 'train' (pick another with '%s:<split>')", name, list(loaded), name)
            loaded = loaded["train"]
        else:
            raise DataError(f"dataset {name!r} has splits {list(loaded)}; pick one with '{name}:<split>'")
    return loaded.to_list()


def load_rows(dataset: str, dataset_config: str | None, seed: int) -> tuple[list[dict], list[str]]:
    """Loads the raw rows of any supported source, with normalised column names, and where each row is (for a file,
    "FILE:LINE" or "FILE: record N"; otherwise "dataset 'NAME' row N")."""
    validate_dataset_arg(dataset)
    source = named_source(dataset)
    places = None
    if source is not None:
        rows = source.rows(dataset, seed)
    elif _looks_local(dataset) and Path(dataset).expanduser().is_file():
        rows, places = _read_local(Path(dataset).expanduser())
    else:
        rows = _load_hub(dataset, dataset_config)
    if not rows:
        raise DataError(f"dataset {dataset!r} has no rows")
    if places is None:
        places = [f"dataset {dataset!r} row {number}" for number in range(1, len(rows) + 1)]
    # DictReader stores surplus cells of a ragged CSV row under the key None; they belong to no column.
    rows = [{column_name(key): value for key, value in row.items() if isinstance(key, str)} for row in rows]
    return rows, places


def column_names(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(key for row in rows for key in row))


def detect_layout(columns: list[str], dataset: str) -> str:
    """Returns "preference" or "question", or raises a DataError naming the missing columns."""
    if all(column in columns for column in PREFERENCE_COLUMNS):
        return "preference"
    if all(column in columns for column in QUESTION_COLUMNS):
        return "question"
    missing_question = [column for column in QUESTION_COLUMNS if column not in columns]
    missing_preference = [column for column in PREFERENCE_COLUMNS if column not in columns]
    # Name the missing columns of whichever layout the data is closer to.
    if len(missing_question) < len(missing_preference):
        missing = f"missing column(s) {', '.join(missing_question)} for question-style data"
    elif len(missing_preference) < len(missing_question):
        missing = f"missing column(s) {', '.join(missing_preference)} for preference-style data"
    else:
        missing = (
            f"missing column(s) {', '.join(missing_question)} for question-style data "
            f"or {', '.join(missing_preference)} for preference-style data"
        )
    raise DataError(f"dataset {dataset!r} is {missing}; found columns: {', '.join(columns) or 'none'}")


def _describe(value) -> str:
    kind = {bool: "true/false", int: "a number", float: "a number", list: "a list", dict: "an object"}
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    return f"{kind.get(type(value), type(value).__name__)} ({shown})"


def _is_messages(value) -> bool:
    """Conversational data as TRL takes it: a non-empty list of {"role": ..., "content": ...} messages."""
    if not isinstance(value, list) or not value:
        return False
    return all(isinstance(m, dict) and all(isinstance(m.get(key), str) for key in ("role", "content")) for m in value)


def _text_problem(row: dict, field: str, messages_allowed: bool = False) -> str | None:
    value = row.get(field)
    if value is None:
        return f"field '{field}' is missing"
    if isinstance(value, str):
        return f"field '{field}' is empty" if not value.strip() else None
    if messages_allowed and _is_messages(value):
        return None
    return f"field '{field}' holds {_describe(value)}, not text"


def _answers_problem(row: dict, field: str) -> str | None:
    value = row.get(field)
    if value is None or isinstance(value, str):
        return None  # no answers, or answers separated by ';' (empty ones are the TruthfulQA CSV's own, counted)
    if isinstance(value, list | tuple) and all(item is None or isinstance(item, str) for item in value):
        return None
    return f"field '{field}' holds {_describe(value)}, not text or a list of texts"


def bad_row_problem(row: dict, layout: str) -> str | None:
    """Why a row cannot make a pair, or None. A preference row needs text (or chat messages) in prompt, chosen and
    rejected, none empty, and chosen unlike rejected. A question row needs its question as text and its answers as
    text or lists of texts; empty answers and questions without a correct or an incorrect answer are the published
    TruthfulQA's own quirks, left out with counts where pairs are made."""
    if layout == "preference":
        for field in PREFERENCE_COLUMNS:
            problem = _text_problem(row, field, messages_allowed=True)
            if problem:
                return problem
        chosen, rejected = row["chosen"], row["rejected"]
        if isinstance(chosen, str) and isinstance(rejected, str):
            chosen, rejected = chosen.strip(), rejected.strip()
        if chosen == rejected:
            return "chosen and rejected are the same, so the pair carries no preference"
        return None
    question = row.get("question")
    if question is not None and not isinstance(question, str):
        return f"field 'question' holds {_describe(question)}, not text"
    return _answers_problem(row, "correct_answers") or _answers_problem(row, "incorrect_answers")


def load_source(dataset: str, dataset_config: str | None, seed: int, group_by: str | None, bad_rows: str = "refuse"):
    """The rows of a data set, its layout (question- or preference-style), the checked group_by column and the bad
    rows (`bad_row_problem`) as {row index: "PLACE: PROBLEM"}.

    With `bad_rows` "refuse" a bad row is a DataError naming its file, line and field; with "skip" the bad rows are
    returned for the caller to leave out (their ids still count, so every question keeps its place in the source).
    """
    if bad_rows not in BAD_ROW_POLICIES:
        raise DataError(f"bad_rows {bad_rows!r} is not valid; valid: {', '.join(BAD_ROW_POLICIES)}")
    rows, places = load_rows(dataset, dataset_config, seed)
    columns = column_names(rows)
    layout = detect_layout(columns, dataset)
    if group_by is not None:
        group_by = column_name(group_by)
        if group_by not in columns:
            raise DataError(
                f"group_by column {group_by!r} is not in dataset {dataset!r}; found columns: {', '.join(columns)}"
            )
    bad = {}
    for index, row in enumerate(rows):
        problem = bad_row_problem(row, layout)
        if problem:
            bad[index] = f"{places[index]}: {problem}"
    if bad and bad_rows == "refuse":
        first = next(iter(bad.values()))
        more = f" ({len(bad)} bad rows in all)" if len(bad) > 1 else ""
        raise DataError(f"{first}{more}; fix the data, or set bad_rows: skip to leave such rows out (counted)")
    if rows and len(bad) == len(rows):  # said as such, not as a data set that gives no pairs for no stated reason
        raise DataError(
            f"every row of '{dataset}' is bad ({len(bad)} of {len(rows)}), so bad_rows: skip leaves none; fix the "
            f"data (the first: {next(iter(bad.values()))})"
        )
    return rows, layout, group_by, bad


# ---------------------------------------------------------------------------------------------------------------------
# TruthfulQA's multiple-choice targets (the `multiple_choice` configuration of `truthfulqa/truthful_qa`)
# ---------------------------------------------------------------------------------------------------------------------

MC_CONFIG = "multiple_choice"
MC_SPLIT = "validation"
MC_COLUMNS = ("question", "mc1_targets", "mc2_targets")
MC_FILE_EXTENSIONS = (".json", ".jsonl", ".parquet")


def truthfulqa_hub_id(dataset: str, dataset_config: str | None) -> str | None:
    """The Hub id of `dataset` when it is TruthfulQA's generation data on the Hub (a Hub id named `truthful_qa`,
    e.g. `truthfulqa/truthful_qa`, config `generation`; `:split` dropped), else None (a file, a named source, ...)."""
    name = dataset.strip().partition(":")[0]
    if dataset_config != "generation" or named_source(dataset) is not None or _looks_local(dataset):
        return None
    return name if name.rpartition("/")[2].lower() == "truthful_qa" else None


def is_mc_targets_file(spec: str) -> bool:
    """Whether `spec` names a local file (a path, or a name ending like a data file) rather than a keyword."""
    return _looks_local(spec)


def _mc_target(value, key: str, where: str) -> dict:
    """One `mc1_targets` / `mc2_targets` value checked: {"choices": [str, ...], "labels": [0 or 1, ...]}."""
    if not isinstance(value, dict) or not isinstance(value.get("choices"), list | tuple):
        raise DataError(f"{where}: {key} must be an object with 'choices' and 'labels' lists")
    choices, labels = list(value["choices"]), list(value.get("labels") or [])
    if len(choices) != len(labels) or not all(isinstance(choice, str) for choice in choices):
        raise DataError(f"{where}: {key} needs as many labels as choices, and text choices")
    if any(label not in (0, 1) for label in labels) or not (1 in labels and 0 in labels):
        raise DataError(f"{where}: {key} labels must be 0 or 1, with at least one of each")
    return {"choices": choices, "labels": [int(label) for label in labels]}


def load_mc_targets(spec: str) -> dict[str, dict]:
    """TruthfulQA's multiple-choice targets keyed by the stripped question text:
    {question: {"mc1_targets": {"choices": [...], "labels": [...]}, "mc2_targets": {...}}} (label 1: correct).

    `spec` is a Hub id, read as `datasets.load_dataset(spec, "multiple_choice", split="validation")` (a `:split`
    suffix is dropped), or a local .json/.jsonl/.parquet file with the same columns (question, mc1_targets,
    mc2_targets). The choices are kept as they are. The first row of a repeated question counts.

    Raises:
        DataFileNotFoundError: For a local file that does not exist.
        DataError: For a file of another type, a Hub data set that cannot be loaded, or rows not in this format.
    """
    if _looks_local(spec):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise DataFileNotFoundError(f"eval_mc_targets file not found: {spec}")
        if path.suffix.lower() not in MC_FILE_EXTENSIONS:
            raise DataError(
                f"eval_mc_targets file {path} has an unsupported type; use one of {', '.join(MC_FILE_EXTENSIONS)} "
                "(mc1_targets and mc2_targets are nested)"
            )
        rows, where = _read_local(path)[0], str(path)
    else:
        import datasets

        name = spec.strip().partition(":")[0]
        try:
            rows = datasets.load_dataset(name, MC_CONFIG, split=MC_SPLIT).to_list()
        except (ConnectionError, FileNotFoundError, ValueError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise DataError(
                f"could not load TruthfulQA's multiple-choice targets ({name!r}, config {MC_CONFIG!r}, split "
                f"{MC_SPLIT!r}) with datasets.load_dataset: {reason}; set eval_mc_targets: answers to score MC on "
                "the data set's own answers"
            ) from error
        where = f"{name} ({MC_CONFIG})"
    rows = [{column_name(key): value for key, value in row.items() if isinstance(key, str)} for row in rows]
    missing = [column for column in MC_COLUMNS if column not in column_names(rows)]
    if not rows or missing:
        found = ", ".join(column_names(rows)) or "none"
        raise DataError(f"eval_mc_targets {where}: missing column(s) {', '.join(missing)}; found columns: {found}")
    targets: dict[str, dict] = {}
    for number, row in enumerate(rows, start=1):
        question = str(row.get("question") or "").strip()
        entry = {key: _mc_target(row.get(key), key, f"{where} row {number}") for key in MC_COLUMNS[1:]}
        targets.setdefault(question, entry)
    return targets
