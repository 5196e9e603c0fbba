"""How the `cpu` judge's frozen model reads answers: each question with its reference answers once, then every answer
after it, keeping each answer's mean hidden state at a few layers and its last hidden state.

    Question: {question}
    Correct answers: {correct; ...}
    Incorrect answers: {incorrect; ...}
    Proposed answer: {answer}
    Verdict:

The answers of a question are laid side by side after its prefix, each attending to the prefix and itself only
(`models.prefix_sharing`), so the prefix runs once and a reading depends on the prefix and the answer alone. This
module is the frozen pass's whole definition: the pass over the judge data is cached by `READING_FORMAT` and its
settings (the judge's features and fit, which cost a minute, are keyed by their source).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..core.errors import DamagedFileError
from ..core.files import read_json, write_json_atomic
from .judge_features import QuestionPool

FORMAT = 1  # the prompt layout below; a change makes every cached judge stale
# What a reading is: bump it with any change to this module that changes a reading (the prompt, what is kept, how it
# is pooled). It keys the cached frozen pass (half an hour over the judge data on 2 CPU cores), not this file's bytes.
READING_FORMAT = 1
PREFIX = "Question: {question}\nCorrect answers: {correct}\nIncorrect answers: {incorrect}\n"
ANSWER_HEAD = "Proposed answer:"
ANSWER_TAIL = "\nVerdict:"
VECTORS_FILE = "vectors.npz"
POOLS_FILE = "pools.json"


@dataclass(frozen=True)
class ReadingSettings:
    """Which frozen model reads answers, and what is kept of its reading."""

    base_model: str = "smollm2"
    # The layers whose mean hidden states are kept, as fractions of the model's depth (12 and 18 of 30).
    layer_fractions: tuple[float, ...] = (0.4, 0.6)
    max_answer_tokens: int = 96
    questions_per_pass: int = 4

    def layers(self, num_layers: int) -> list[int]:
        return sorted({min(num_layers - 1, max(1, round(f * num_layers))) for f in self.layer_fractions})

    def reading(self) -> dict:
        """The settings a reading depends on (the cache key of a frozen pass)."""
        return {key: value for key, value in asdict(self).items() if key in READING_KEYS}


READING_KEYS = ("base_model", "layer_fractions", "max_answer_tokens")


def prefix_text(question: str, correct: Sequence[str], incorrect: Sequence[str]) -> str:
    return PREFIX.format(question=question, correct="; ".join(correct), incorrect="; ".join(incorrect))


def _capture(module, args, kwargs, store: dict, layer: int) -> None:
    """A forward pre-hook keeping the hidden states that enter a decoder layer."""
    store[layer] = args[0] if args else kwargs["hidden_states"]


class AnswerEncoder:
    """The frozen base model's reading of answers: for each (prefix, [answers]) item, each answer's mean hidden state
    entering each of `layers` (over the answer's own tokens) and its last hidden state (after the final norm)."""

    def __init__(self, model, tokenizer, settings: ReadingSettings):
        import torch

        from ..models.layout import AttentionLayout

        self.model, self.tokenizer, self.settings = model.eval(), tokenizer, settings
        self.blocks = model.get_submodule(AttentionLayout.from_model(model).layers_path)
        self.layers = settings.layers(len(self.blocks))
        self.device = next(model.parameters()).device
        self.head = tokenizer(ANSWER_HEAD, add_special_tokens=False)["input_ids"]
        self.tail = tokenizer(ANSWER_TAIL, add_special_tokens=False)["input_ids"]
        self.torch = torch

    def _answer_ids(self, answer: str) -> tuple[list[int], int]:
        words = self.tokenizer(" " + answer, add_special_tokens=False)["input_ids"][: self.settings.max_answer_tokens]
        return self.head + words + self.tail, len(words)

    def encode(self, items: Sequence[tuple[str, list[str]]], desc: str = "judge: reading answers", progress=True):
        """Per item, {layer: (answers, hidden) float32 array, ..., "last": (answers, hidden)}.

        An answer already read after the same prefix in this process (by the truth judge before the info judge, or
        as another model's identical answer) is not read again: each reading depends on the prefix and the answer
        alone."""
        key = (self.settings.base_model, tuple(self.layers), self.settings.max_answer_tokens)
        memo = _READINGS.setdefault(key, {})
        missing: dict[str, list[str]] = {}
        for prefix, answers in items:
            for answer in answers:
                if (prefix, answer) not in memo and answer not in missing.setdefault(prefix, []):
                    missing[prefix].append(answer)
        todo = [(prefix, answers) for prefix, answers in missing.items() if answers]
        if len(memo) + sum(len(answers) for _, answers in todo) > MAX_READINGS:
            memo.clear()
            todo = [(prefix, list(dict.fromkeys(answers))) for prefix, answers in items]
        for (prefix, answers), read in zip(todo, self._encode(todo, desc, progress), strict=True):
            for i, answer in enumerate(answers):
                memo[(prefix, answer)] = {name: values[i] for name, values in read.items()}
        hidden = self.model.config.get_text_config().hidden_size
        results = []
        for prefix, answers in items:
            readings = [memo[(prefix, answer)] for answer in answers]
            names = [*self.layers, "last"]
            results.append(
                {
                    name: np.stack([r[name] for r in readings]) if readings else np.zeros((0, hidden), np.float32)
                    for name in names
                }
            )
        return results

    def _encode(self, items: Sequence[tuple[str, list[str]]], desc: str, progress: bool) -> list[dict]:
        from ..models.loading import batches
        from ..models.prefix_sharing import pack_rows, pack_shared_prefix, run_backbone, unit_length

        torch = self.torch
        units, contents = [], []
        for prefix, answers in items:
            ids = self.tokenizer(prefix)["input_ids"]
            pieces = [self._answer_ids(answer) for answer in answers]
            units.append((torch.tensor(ids), [torch.tensor(p) for p, _ in pieces]))
            contents.append([n for _, n in pieces])
        order = sorted(range(len(units)), key=lambda u: -unit_length(units[u]))  # similar lengths pack together
        results: list[dict | None] = [None] * len(units)
        size = self.settings.questions_per_pass
        for start in batches(len(order), size, desc, progress):
            chosen = order[start : start + size]
            batch = [(units[u][0].to(self.device), [c.to(self.device) for c in units[u][1]]) for u in chosen]
            packed = pack_shared_prefix(batch, pack_rows([unit_length(u) for u in batch]))
            entering: dict[int, object] = {}
            hooks = [
                self.blocks[layer].register_forward_pre_hook(
                    functools.partial(_capture, store=entering, layer=layer), with_kwargs=True
                )
                for layer in self.layers
            ]
            try:
                with torch.no_grad():
                    last = run_backbone(self.model, packed)
            finally:
                for hook in hooks:
                    hook.remove()
            for u, unit, placement in zip(chosen, batch, packed.placements, strict=True):
                column = placement.offset + len(unit[0])
                vectors = {layer: [] for layer in self.layers}
                finals = []
                for completion, words in zip(unit[1], contents[u], strict=True):
                    start_words = column + len(self.head)
                    span = (
                        slice(start_words, start_words + words) if words else slice(column, column + len(completion))
                    )
                    for layer in self.layers:
                        vectors[layer].append(entering[layer][placement.row, span].float().mean(0))
                    finals.append(last[placement.row, column + len(completion) - 1].float())
                    column += len(completion)
                hidden = last.shape[-1]
                results[u] = {
                    key: (torch.stack(values).cpu().numpy() if values else np.zeros((0, hidden), dtype=np.float32))
                    for key, values in [*vectors.items(), ("last", finals)]
                }
        return results


# Readings of answers kept in this process, by encoder: (prefix, answer) -> {layer: vector, "last": vector}.
_READINGS: dict[tuple, dict] = {}
MAX_READINGS = 100_000  # about 0.7 GB with SmolLM2's 576-wide states at two layers and the last


def load_encoder(settings: ReadingSettings) -> AnswerEncoder:
    """The base model (resolved, built on first use as any locedit model source) in float32, as an encoder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .. import processes
    from ..models.sources import resolve_model_path

    path = resolve_model_path(settings.base_model)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.to(processes.state().device)
    return AnswerEncoder(model, AutoTokenizer.from_pretrained(path), settings)


@dataclass
class EncodedPools:
    """Every question's pool and the frozen model's reading of its labelled answers and references."""

    pools: dict[str, QuestionPool]
    answers: dict[str, dict]  # question -> {layer: vectors, "last": vectors} of pool.answers
    references: dict[str, dict]  # question -> {layer: vectors} of pool.references
    seconds: float = 0.0

    def save(self, directory: Path) -> None:
        arrays = {}
        for q, question in enumerate(self.pools):
            for part, store in (("answers", self.answers), ("references", self.references)):
                for key, values in store[question].items():
                    arrays[f"{q}/{part}/{key}"] = values
        np.savez(directory / VECTORS_FILE, **arrays)
        pools = [asdict(pool) for pool in self.pools.values()]
        write_json_atomic(directory / POOLS_FILE, {"pools": pools, "seconds": self.seconds}, indent=None)

    @classmethod
    def load(cls, directory: Path) -> EncodedPools:
        try:
            saved = read_json(directory / POOLS_FILE)
            arrays = np.load(directory / VECTORS_FILE)
            pools = {p["question"]: QuestionPool(**p) for p in saved["pools"]}
            answers = {question: {} for question in pools}
            references = {question: {} for question in pools}
            questions = list(pools)
            for name in arrays.files:
                q, part, key = name.split("/")
                store = answers if part == "answers" else references
                store[questions[int(q)]][key if key == "last" else int(key)] = arrays[name]
        except (OSError, ValueError, KeyError, EOFError) as err:
            raise DamagedFileError(
                f"the cpu judge's encoded answers in '{directory}' are damaged ({type(err).__name__}); remove that "
                "directory and it is rebuilt"
            ) from None
        return cls(pools, answers, references, saved.get("seconds", 0.0))


def encode_pools(pools: dict[str, QuestionPool], encoder: AnswerEncoder, progress: bool = True) -> EncodedPools:
    """The frozen pass over every pool: its labelled answers and its references, after the question's prefix."""
    started = time.perf_counter()
    questions = list(pools)
    items = [
        (prefix_text(p.question, p.correct, p.incorrect), p.answers + p.references)
        for p in (pools[q] for q in questions)
    ]
    encoded = encoder.encode(items, progress=progress)
    answers, references = {}, {}
    for question, vectors in zip(questions, encoded, strict=True):
        n = len(pools[question].answers)
        answers[question] = {key: values[:n] for key, values in vectors.items()}
        references[question] = {key: values[n:] for key, values in vectors.items() if key != "last"}
    return EncodedPools(pools, answers, references, time.perf_counter() - started)


__all__ = [
    "AnswerEncoder",
    "EncodedPools",
    "ReadingSettings",
    "encode_pools",
    "load_encoder",
    "prefix_text",
]
