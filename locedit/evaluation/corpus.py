"""The text KL and cross-entropy are measured on (`eval_corpus`): a local file, a Hub data set, or a named corpus
registered by a plugin (the toy world's statements: `toy`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from ..core.args import EvalArguments
from ..core.errors import DataError
from ..core.plugins import load_plugins

# name -> function(spec) giving the documents of a named corpus
NAMED_CORPORA: dict[str, Callable[[str], list[str]]] = {}


def register_corpus(name: str, documents: Callable[[str], list[str]]) -> None:
    """Make `eval_corpus: NAME` (and `NAME:SETTINGS`) read its documents from `documents(spec)`."""
    NAMED_CORPORA[name] = documents


def named_corpus(spec: str) -> Callable[[str], list[str]] | None:
    name = spec.strip().partition(":")[0]
    if name not in NAMED_CORPORA:
        load_plugins()
    return NAMED_CORPORA.get(name)


def load_corpus(args: EvalArguments) -> list[str] | None:
    """The first `eval_corpus_docs` non-empty documents of `eval_corpus`, or None for 'none'."""
    name, count = args.eval_corpus.strip(), args.eval_corpus_docs
    if name.lower() in ("", "none"):
        return None
    named = named_corpus(name)
    if named is not None:
        return named(name)[:count]
    path = Path(name).expanduser()
    if path.suffix.lower() in (".txt", ".json", ".jsonl") or path.exists():
        if not path.is_file():
            raise DataError(f"eval_corpus file not found: {name}")
        if path.suffix.lower() not in (".json", ".jsonl"):  # plain text: documents separated by blank lines
            docs = [doc.strip() for doc in path.read_text(encoding="utf-8").split("\n\n")]
        else:
            text = path.read_text(encoding="utf-8")
            try:
                rows = json.loads(text) if path.suffix.lower() == ".json" else None
            except json.JSONDecodeError:
                rows = None
            if rows is None:
                try:
                    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
                except json.JSONDecodeError as err:
                    raise DataError(f"eval_corpus '{name}' is neither JSON nor JSON Lines: {err.msg}") from None
            docs = [str(row.get("text") or "").strip() for row in rows if isinstance(row, dict)]
        docs = [doc for doc in docs if doc][:count]
    else:
        docs = _load_hub_corpus(name, count)
    if not docs:
        raise DataError(f"eval_corpus '{name}' has no non-empty document")
    return docs


def _load_hub_corpus(name: str, count: int) -> list[str]:
    import datasets

    dataset, _, split = name.partition(":")
    attempts = [{}, {"revision": "refs/convert/parquet"}]  # script-based sets (openwebtext-10k) via the Hub's export
    error = None
    for extra in attempts:
        try:
            stream = datasets.load_dataset(dataset, split=split or "train", streaming=True, **extra)
            docs = []
            for row in stream:
                text = str(row.get("text") or "").strip()
                if text:
                    docs.append(text)
                if len(docs) == count:
                    break
            return docs
        except Exception as err:  # datasets raises many kinds; the message is reported in one line
            error = err
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    raise DataError(
        f"could not stream eval_corpus '{name}' ({reason}); set eval_corpus to a local .txt/.jsonl file or 'none'"
    )


def python_docs_passages(spec: str = "python-docs") -> list[str]:
    """Prose passages of the Python language reference as every Python install carries it (`pydoc_data.topics`):
    its paragraphs of running English text of at least 300 characters (code blocks and headings left out), in the
    topics' order. An offline stand-in for OpenWebText where no corpus can be downloaded (KL and CE then measure the
    edit on technical English prose, not web text)."""
    from pydoc_data.topics import topics

    passages = []
    for name in sorted(topics):
        for block in topics[name].split("\n\n"):
            lines = block.splitlines()
            # Prose: unindented lines, not a heading underline, with words and a full stop.
            if not lines or any(line.startswith((" ", "\t")) for line in lines):
                continue
            if any(set(line.strip()) <= set("*=-~^") for line in lines) or "." not in block:
                continue
            paragraph = " ".join(line.strip() for line in lines)
            if len(paragraph) >= 300:
                passages.append(paragraph)
    return passages


register_corpus("python-docs", python_docs_passages)
