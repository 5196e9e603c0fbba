"""Running a model over many examples for evaluation: greedy generation, answer log-probs, KL and cross-entropy.

Batches are right-padded for scoring (every row keeps the positions it has alone) and left-padded for generation.
"""

from __future__ import annotations

import contextlib
import copy

from ..core.args import ModelArguments
from ..core.errors import DataError
from ..edit import edit_layers
from ..models.loading import batches, model_input_device, pad_id, pad_right
from .metrics import next_token_kl, sequence_logprobs, token_cross_entropy
from .prompts import STOP, cut_answer, stop_token_ids


def generate_answers(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 50,
    batch_size: int = 16,
    chat: bool = False,
    cut_off: list | None = None,
    stops: tuple[str, ...] = (),
):
    """Greedy answers to `prompts`, batched with left padding, stopped at the end of the model's turn (and, for the
    Q/A prompt, at the next `Q:`; at any of `stops`, e.g. the next turn of a preference prompt's dialogue) and cut
    where it goes on past its answer (`cut_answer`). With a `cut_off` list, whether each generation ran to
    max_new_tokens without ending is appended to it."""
    import torch

    config = copy.deepcopy(model.generation_config)
    config.update(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        temperature=None,
        top_p=None,
        top_k=None,
        stop_strings=None if chat else [STOP, *stops],
        pad_token_id=pad_id(tokenizer),
    )
    eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    config.eos_token_id = list(dict.fromkeys(eos + stop_token_ids(tokenizer))) or None
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers = []
    try:
        for start in batches(len(prompts), batch_size, "generating"):
            batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True)
            batch = batch.to(model_input_device(model))
            with torch.no_grad():
                output = model.generate(**batch, generation_config=config, tokenizer=tokenizer)
            new_tokens = output[:, batch["input_ids"].shape[1] :]
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            answers += [cut_answer(text, chat, stops=(tokenizer.eos_token or "", *stops)) for text in texts]
            if cut_off is not None:
                # A row that ended (end of turn, or the stop string) is padded after it; one that ran on is not.
                ends = torch.tensor(list({*(config.eos_token_id or []), config.pad_token_id} - {None}))
                ran_on = ~torch.isin(new_tokens, ends).any(-1) & (new_tokens.shape[1] == max_new_tokens)
                cut_off += [
                    bool(r) and (chat or not any(stop in text for stop in (STOP, *stops)))
                    for r, text in zip(ran_on.tolist(), texts, strict=True)
                ]
    finally:
        tokenizer.padding_side = side
    return answers


def answer_logprobs(
    model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 16, share_prompts: bool = True
) -> list[float]:
    """log p(completion | prompt): the sum of the completion's token log-probs. As lm-evaluation-harness does, the
    completion's tokens are those of tokenize(prompt + completion) after the first len(tokenize(prompt)).

    With `share_prompts`, consecutive pairs with the same prompt (a question's MC choices) are scored in one packed
    sequence [prompt, choice 1, ..., choice n] whose choices each see only the prompt and themselves
    (`models.prefix_sharing`), and the LM head runs only where a choice's token is scored: the same numbers, the
    prompt once. A question whose tokenization merges across the prompt's end is scored choice by choice.
    """
    rows, targets = [], []
    for prompt, completion in pairs:
        context = tokenizer(prompt)["input_ids"]
        whole = tokenizer(prompt + completion)["input_ids"]
        rows.append(whole)
        targets.append([0] * len(context) + [1] * (len(whole) - len(context)))
    prompts = [prompt for prompt, _ in pairs]
    return completion_logprobs(model, tokenizer, rows, targets, prompts, batch_size, share_prompts)


def completion_logprobs(
    model, tokenizer, rows: list[list[int]], targets: list[list[int]], prompts: list, batch_size=16, share_prompts=True
) -> list[float]:
    """The sum of the log-probs of each row's tokens where its `targets` is 1 (a completion after its prompt), each
    token given the row's tokens before it: `answer_logprobs` of token rows. `prompts` names each row's prompt:
    consecutive rows with the same prompt (and the same tokens up to their first target) are scored in one packed
    sequence that runs the prompt once, with `share_prompts` (as `answer_logprobs` says)."""
    flash = str(getattr(model.config, "_attn_implementation", "")).startswith("flash")  # takes no block mask
    if not share_prompts or flash:
        return _row_logprobs(model, tokenizer, rows, targets, batch_size)
    groups, start = [], 0  # runs of consecutive rows with one prompt that tokenizes the same in every row
    for end in range(1, len(rows) + 1):
        if end == len(rows) or prompts[end] != prompts[start]:
            groups.append(range(start, end))
            start = end
    scores: list[float | None] = [None] * len(rows)
    shared, alone = [], []
    for group in groups:
        p = targets[group[0]].index(1) if 1 in targets[group[0]] else len(targets[group[0]])
        if p > 0 and all(rows[i][:p] == rows[group[0]][:p] and targets[i][:p] == [0] * p for i in group):
            shared.append((group, p))
        else:
            alone += list(group)
    # Batches of whole questions holding about `batch_size` choices (at least one question).
    packs, current = [], []
    for group in shared:
        if current and sum(len(g) for g, _ in current) + len(group[0]) > batch_size:
            packs.append(current)
            current = []
        current.append(group)
    packs += [current] if current else []
    for index in batches(len(packs), 1, "MC answer log-probs (prompts shared)"):
        _score_shared(model, packs[index], rows, scores)
    if alone:
        alone_scores = _row_logprobs(
            model, tokenizer, [rows[i] for i in alone], [targets[i] for i in alone], batch_size
        )
        for i, value in zip(alone, alone_scores, strict=True):
            scores[i] = value
    return scores


def _score_shared(model, groups, rows, scores) -> None:
    import torch

    from ..models.layout import unwrap_model
    from ..models.prefix_sharing import lm_head_logits, pack_shared_prefix, run_backbone

    base = unwrap_model(model)
    device = model_input_device(model)
    sequences = []
    for group, p in groups:
        prompt = torch.tensor(rows[group[0]][:p], device=device)
        sequences.append((prompt, [torch.tensor(rows[i][p:], dtype=torch.long, device=device) for i in group]))
    packed = pack_shared_prefix(sequences)
    choices = [i for group, _ in groups for i in group]
    spans = [(s, at, target) for s, placement in enumerate(packed.placements) for at, target in placement.scored]
    with torch.no_grad():
        hidden = run_backbone(base, packed)
        # Every choice's scoring positions through the LM head at once, then summed per choice.
        states = torch.cat([hidden[s, at] for s, at, _ in spans])
        logprobs = torch.log_softmax(lm_head_logits(base, states).float(), dim=-1)
        targets = torch.cat([target for _, _, target in spans]).to(logprobs.device)
        picked = logprobs.gather(-1, targets[:, None]).squeeze(-1)
    for i, part in zip(choices, picked.split([len(at) for _, at, _ in spans]), strict=True):
        scores[i] = float(part.sum())


def _row_logprobs(model, tokenizer, rows, targets, batch_size: int) -> list[float]:
    """Each (prompt + completion) row on its own, in right-padded batches."""
    import torch

    scores: list[float] = []
    for start in batches(len(rows), batch_size, "MC answer log-probs"):
        ids, mask = pad_right(rows[start : start + batch_size], pad_id(tokenizer), model_input_device(model))
        target, _ = pad_right(targets[start : start + batch_size], 0, model_input_device(model))
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        scores += sequence_logprobs(logits, ids, target).tolist()
    return scores


def corpus_scores(model, tokenizer, docs: list[str], max_tokens: int = 128, batch_size: int = 16, edited=True):
    """Cross-entropy on `docs` cut at `max_tokens` tokens; for an edit (a PEFT model) also KL(original || edited)
    per token and the original's cross-entropy, the original being the model with its edit disabled: the means of
    `document_scores` over the documents of two tokens or more."""
    scored = [score for score in document_scores(model, tokenizer, docs, max_tokens, batch_size, edited) if score]
    if not scored:
        raise DataError("no eval_corpus document has two tokens or more")
    ce = [score["ce"] for score in scored]
    scores = {"ce": sum(ce) / len(ce), "corpus_docs": len(scored)}
    if edited:
        kl, ce_original = [score["kl"] for score in scored], [score["ce_original"] for score in scored]
        scores.update(kl=sum(kl) / len(kl), ce_original=sum(ce_original) / len(ce_original))
    return scores


def document_scores(
    model, tokenizer, docs: list[str], max_tokens: int = 128, batch_size: int = 16, edited=True, label="the corpus"
) -> list[dict | None]:
    """Each document's cross-entropy (`ce`), cut at `max_tokens` tokens; for an edit also its KL(original || edited)
    per token (`kl`) and the original's cross-entropy (`ce_original`); None for a document of fewer than two tokens
    (nothing to predict)."""
    import torch

    rows = [tokenizer(doc, truncation=True, max_length=max_tokens)["input_ids"] for doc in docs]
    kept = [index for index, row in enumerate(rows) if len(row) >= 2]
    rows = [rows[index] for index in kept]
    kl, ce, ce_original = [], [], []
    for start in batches(len(rows), batch_size, f"KL and CE on {label}"):
        ids, mask = pad_right(rows[start : start + batch_size], pad_id(tokenizer), model_input_device(model))
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
            ce += token_cross_entropy(logits, ids, mask).tolist()
            if edited:
                with model.disable_adapter():
                    reference = model(input_ids=ids, attention_mask=mask).logits
                kl += next_token_kl(reference, logits, mask).tolist()
                ce_original += token_cross_entropy(reference, ids, mask).tolist()
    scores: list[dict | None] = [None] * len(docs)
    for position, index in enumerate(kept):
        scores[index] = {"ce": ce[position]}
        if edited:
            scores[index].update(kl=kl[position], ce_original=ce_original[position])
    return scores


def can_merge(model_args: ModelArguments) -> bool:
    return not (model_args.load_in_4bit or model_args.load_in_8bit)


@contextlib.contextmanager
def merged(edited):
    """The edit folded into the base weights for the duration; afterwards the base weights are restored bit for bit
    (unmerging alone is exact only up to rounding, which would drift over many edits evaluated on one base)."""
    layers = list(edit_layers(edited).values())
    saved = [
        (layer, layer.get_base_layer().weight.detach().clone(), _clone(layer.get_base_layer().bias))
        for layer in layers
    ]
    edited.merge_adapter()
    try:
        yield edited
    finally:
        edited.unmerge_adapter()
        for layer, weight, bias in saved:
            base = layer.get_base_layer()
            base.weight.data.copy_(weight)
            if bias is not None:
                base.bias.data.copy_(bias)


def _clone(tensor):
    return None if tensor is None else tensor.detach().clone()
