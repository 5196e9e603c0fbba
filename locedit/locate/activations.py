"""Head activations for probing: every head's output at the last token of probe examples (paper section 2).

A probe example is `Q: {question} A: {answer} Q: {other_question}` (the template is configurable) with a correct
(label 1) or incorrect (label 0) answer, built from the *training* questions only. A head's output is its slice of
the input of its layer's attention output projection (eq. 2.1-2.2); it is read by a forward pre-hook on every
projection, so one code path serves every layout `locedit.models.layout` knows.

With `chat_template` (instruct models) an example is the conversation the tokenizer's chat template renders instead:
a user turn with the question, an assistant turn with the answer and, when the template uses {other_question}, a
user turn with the other question; the activation is read at its last token (trailing whitespace stripped, so the
end-of-turn marker for ChatML templates).

Collected activations are saved in one safetensors file named by a key of everything they depend on (model, data,
template, split, seed), so probing and ITI never run the model twice for the same examples. The file's metadata
holds a SHA-256 of its tensors' bytes: a file cut short, unreadable or overwritten is collected again, with one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import string
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .. import processes
from ..core.errors import DataError, say_damaged
from ..core.files import atomic_path, safetensors_problem
from ..models.layout import AttentionLayout
from ..models.loading import model_input_device, pad_id, pad_right

TEMPLATE_FIELDS = ("question", "answer", "other_question")
# Bump when the meaning of saved activations changes, so old cache files are never read as new ones.
ACTIVATIONS_FORMAT = 1


@dataclass
class ProbeExamples:
    """Probe examples: the texts fed to the model, their labels (1 correct, 0 incorrect) and question ids."""

    texts: list[str]
    labels: list[int]
    question_ids: list[int]

    def __len__(self) -> int:
        return len(self.texts)

    def digest(self) -> str:
        """A hash of the examples themselves, so any change of data, template or draw changes it."""
        blob = json.dumps([self.texts, self.labels, self.question_ids], ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()


def check_probe_template(template: str) -> None:
    """The template must use {question} and {answer}, may use {other_question}, and nothing else."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as err:
        raise DataError(f"probe_template {template!r} is not a valid format string: {err}") from None
    unknown = sorted(fields - set(TEMPLATE_FIELDS))
    if unknown or not {"question", "answer"} <= fields:
        raise DataError(
            f"probe_template must contain {{question}} and {{answer}} and may contain {{other_question}}, "
            f"got {template!r}"
        )


def build_probe_examples(questions, template: str, seed: int = 0, tokenizer=None) -> ProbeExamples:
    """One example per answer of every question: label 1 for a correct answer, 0 for an incorrect one.

    Args:
        questions: records with question_id, question, correct_answers and incorrect_answers (the training split of
            `locedit.data.load_questions`); the other question of each example is drawn from these only.
        template: the probe template, e.g. "Q: {question} A: {answer} Q: {other_question}".
        seed: seed of the other-question draws.
        tokenizer: with `chat_template`, the tokenizer whose chat template renders each example as a conversation
            (question, answer, and the other question when `template` uses it); the template's text is not used.
    """
    check_probe_template(template)
    records = list(questions)
    uses_other = "{other_question}" in template
    if uses_other and len(records) < 2:
        raise DataError("probe_template uses {other_question}, but there are fewer than 2 training questions")
    rng = random.Random(f"probe-other-{seed}")
    texts, labels, question_ids = [], [], []
    for index, record in enumerate(records):
        answers = [(answer, 1) for answer in record["correct_answers"]]
        answers += [(answer, 0) for answer in record["incorrect_answers"]]
        for answer, label in answers:
            other = ""
            if uses_other:
                # Another training question, never the example's own (ITI draws from the whole data set).
                other_index = rng.randrange(len(records) - 1)
                other = records[other_index + (other_index >= index)]["question"]
            if tokenizer is None:
                texts.append(template.format(question=record["question"], answer=answer, other_question=other))
            else:
                texts.append(_chat_example(tokenizer, record["question"], answer, other if uses_other else None))
            labels.append(label)
            question_ids.append(int(record["question_id"]))
    return ProbeExamples(texts=texts, labels=labels, question_ids=question_ids)


def _chat_example(tokenizer, question: str, answer: str, other_question: str | None) -> str:
    from ..models.chat import assistant_turn, render_chat, user_turn

    messages = [user_turn(question), assistant_turn(answer)]
    if other_question is not None:
        messages.append(user_turn(other_question))
    return render_chat(tokenizer, messages).rstrip()


def activations_key(model: dict, examples: ProbeExamples) -> str:
    """The cache key of a model's activations on some examples. `model` holds what identifies the weights."""
    blob = json.dumps({"format": ACTIVATIONS_FORMAT, "model": model, "examples": examples.digest()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def activations_path(directory: str, key: str) -> str:
    return os.path.join(directory, f"activations-{key}.safetensors")


# ---------------------------------------------------------------------------------------------------------------------
# Collecting
# ---------------------------------------------------------------------------------------------------------------------


class _Collected(Exception):
    """Raised by the last layer's hook: the forward pass has given everything collection needs."""


@torch.inference_mode()
def collect_head_activations(
    model: nn.Module, tokenizer, texts: list[str], batch_size: int = 16, progress: bool = True, spread: bool = False
) -> torch.Tensor:
    """Each head's output at the last token of every text, as a (texts, layers, heads, head_dim) CPU tensor.

    The values are the input of each layer's attention output projection at the last token, split per head, in the
    dtype the model computes in. Texts run in batches of similar length on the device the model is on, and each
    forward pass stops at the last layer's projection (its output, the last MLP and the LM head are never run).

    With `spread`, every process of an `accelerate launch` runs its share of the batches (`locedit.processes`) and
    all of them get the whole tensor: the batches are the ones one process would run, so the values are too.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    layout = AttentionLayout.from_model(model)
    num_heads, head_dim = layout.num_heads, layout.head_dim(model)
    device = model_input_device(model)
    encoded = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    if any(len(ids) == 0 for ids in encoded):
        raise DataError("a probe example tokenises to no tokens; check probe_template")
    # Longest first: similar lengths share a batch (little padding), and running out of memory happens at once.
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))

    starts = list(range(0, len(order), batch_size))
    mine = processes.share(starts) if spread else list(enumerate(starts))
    out: torch.Tensor | None = None
    parts: list[tuple[int, tuple[list[int], torch.Tensor]]] = []  # (batch, (its text indices, its values))
    captured: dict[int, torch.Tensor] = {}
    gather: dict[str, torch.Tensor] = {}

    def hook_for(layer: int):
        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            captured[layer] = x[gather["rows"].to(x.device), gather["last"].to(x.device)].detach()
            if layer == layout.num_layers - 1:
                raise _Collected  # nothing after the last projection's input is needed: no MLP, norm or LM head

        return hook

    handles = [
        projection.register_forward_pre_hook(hook_for(layer), with_kwargs=True)
        for layer, projection in enumerate(layout.projections(model))
    ]
    was_training = model.training
    model.eval()
    try:
        total = sum(len(order[start : start + batch_size]) for _, start in mine)
        with tqdm(total=total, desc="head activations", unit="ex", disable=not progress) as bar:
            for batch, start in mine:
                indices = order[start : start + batch_size]
                lengths = torch.tensor([len(encoded[i]) for i in indices])
                input_ids, mask = pad_right([encoded[i] for i in indices], pad_id(tokenizer))
                gather["rows"] = torch.arange(len(indices))
                gather["last"] = lengths - 1
                captured.clear()
                try:
                    model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False)
                except _Collected:
                    pass
                stacked = torch.stack([captured[layer].cpu() for layer in range(layout.num_layers)], dim=1)
                parts.append((batch, (indices, stacked.view(len(indices), layout.num_layers, num_heads, head_dim))))
                bar.update(len(indices))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    pieces = processes.gather(parts) if spread else [piece for _, piece in parts]  # every process's, in order
    for indices, values in pieces:
        if out is None:
            out = torch.empty(len(order), layout.num_layers, num_heads, head_dim, dtype=values.dtype)
        out[torch.tensor(indices)] = values
    if out is None:
        raise DataError("there are no probe examples")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------------------------------


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """A SHA-256 of tensors' bytes, by name (what a safetensors file's data section holds, in any order)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


METADATA = "locedit"  # the file's one metadata entry: its key and its tensors' checksum, as JSON


def save_activations(path: str, activations: torch.Tensor, examples: ProbeExamples, metadata: dict) -> None:
    """Write activations, labels and question ids to one safetensors file, atomically (temporary file + rename),
    with a checksum of them in its metadata."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tensors = {
        "activations": activations.contiguous(),
        "labels": torch.tensor(examples.labels, dtype=torch.int8),
        "question_ids": torch.tensor(examples.question_ids, dtype=torch.int64),
    }
    metadata = {**metadata, "sha256": tensors_digest(tensors)}
    # One metadata entry: safetensors writes several in a random order (a hash map), and the file is compared byte
    # for byte across processes.
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={METADATA: json.dumps(metadata, sort_keys=True)})


def _read_checked(path: str) -> tuple[dict[str, torch.Tensor] | None, str | None]:
    """(the file's tensors, None) when it is whole, else (None, what is wrong). A file from before checksums is
    checked by its size only."""
    problem = safetensors_problem(path)
    if problem is not None:
        return None, problem
    try:
        with safe_open(path, "pt") as f:
            recorded = json.loads((f.metadata() or {}).get(METADATA, "{}")).get("sha256")
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError, AttributeError) as err:  # ValueError: metadata not JSON
        return None, str(err).splitlines()[0]
    if recorded is not None and recorded != tensors_digest(tensors):
        return None, "its checksum does not match: overwritten"
    if not {"activations", "labels", "question_ids"} <= set(tensors) or tensors["activations"].dim() != 4:
        return None, "it does not hold activations, labels and question ids"
    return tensors, None


def load_activations(path: str, examples: ProbeExamples | None = None) -> torch.Tensor | None:
    """The cached activations at `path`, or None when there are none (or they do not match `examples`). A damaged
    file (cut short, unreadable, failing its checksum) is None too, with one line: collected again, never used."""
    if not os.path.isfile(path):
        return None
    tensors, problem = _read_checked(path)
    if tensors is None:
        say_damaged(f"activations file '{path}'", problem, "collecting the activations again")
        return None
    if examples is not None and (
        tensors["labels"].tolist() != examples.labels or tensors["question_ids"].tolist() != examples.question_ids
    ):
        return None
    return tensors["activations"]


__all__ = [
    "ProbeExamples",
    "activations_key",
    "activations_path",
    "build_probe_examples",
    "check_probe_template",
    "collect_head_activations",
    "load_activations",
    "save_activations",
]
