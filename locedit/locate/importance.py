"""Gradient head importance (Michel et al. 2019, "Are Sixteen Heads Really Better than One?") under the IPO loss.

A gate xi_{l,h} = 1 multiplies head h's output at layer l (its slice of the output projection's input). A head's
importance is the expected absolute gradient of the IPO loss with respect to its gate, over the recipe's training
pairs, at the base model (which is the IPO reference, as at the start of training):

    I_{l,h} = mean over pairs of | d/d xi_{l,h}  (Delta(xi) - 1/(2 tau))^2 |  at xi = 1,

    Delta = [avg log pi(chosen) - avg log pi_ref(chosen)] - [avg log pi(rejected) - avg log pi_ref(rejected)],

with TRL's IPO averages over completion tokens (`DPOTrainer`, loss_type "ipo") and tau the recipe's `beta`. At
xi = 1 the policy is the reference, so Delta = 0 and the gradient is -(1/tau) times that of the average log-prob
margin. Michel et al. also normalise scores per layer for pruning; the ranking here uses the raw expectation, as
its definition reads. `importance:K` trains at the K heads of highest importance.

Each pair gets its own copy of the gates (rows [chosen; rejected] of pair i share gates i), so one backward pass over
a batch gives every pair's own gradient, and their absolute values are averaged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field

import torch

from ..core.errors import DamagedResultError, DataError, ProbeResultError, say_damaged
from ..core.files import file_digest, write_json_atomic
from ..core.recipe import Recipe
from ..data import load_preference_splits
from ..heads import format_heads, rank_heads
from ..models.layout import AttentionLayout
from ..models.loading import load_model_and_tokenizer, place_for_inference
from ..rundir import run_lock
from .heatmap import save_score_heatmap

IMPORTANCE_JSON = "importance.json"
HEATMAP = "importance.png"
IMPORTANCE_FORMAT = 1


@dataclass
class ImportanceResult:
    """Gradient importance of every head of one model: a (layers, heads) table, and what it was made from."""

    scores: torch.Tensor  # (layers, heads): mean |dL_IPO / d gate|
    info: dict = field(default_factory=dict)
    path: str | None = None

    @property
    def shape(self) -> str:
        return f"{self.scores.shape[0]} layers x {self.scores.shape[1]} heads"

    def top_heads(self, k: int) -> list[tuple[int, int]]:
        return rank_heads(self.scores.tolist())[:k]

    def check_fits(self, layout: AttentionLayout) -> None:
        if tuple(self.scores.shape) != (layout.num_layers, layout.num_heads):
            raise ProbeResultError(
                f"importance result '{self.path}' was made for a model of {self.shape}, but this model "
                f"({layout.model_type}) has {layout.shape}"
            )

    def save(self, directory: str) -> None:
        """importance.png, then importance.json last: a directory that has it holds a complete result."""
        os.makedirs(directory, exist_ok=True)
        save_score_heatmap(
            self.scores.float(), os.path.join(directory, HEATMAP), "gradient head importance (IPO)", "mean |dL/dgate|"
        )
        ranking = rank_heads(self.scores.tolist())
        payload = {
            **self.info,
            "num_layers": int(self.scores.shape[0]),
            "num_heads": int(self.scores.shape[1]),
            "ranking": [format_heads([head]) for head in ranking[:64]],
            "scores": [[float(v) for v in row] for row in self.scores],
            "scores_sha256": scores_digest([[float(v) for v in row] for row in self.scores]),
            "files": {"heatmap": HEATMAP},
        }
        write_json_atomic(os.path.join(directory, IMPORTANCE_JSON), payload)
        self.path = directory

    @classmethod
    def load(cls, directory: str) -> ImportanceResult:
        """Read a result directory; every problem is one ProbeResultError line."""
        path = os.path.join(directory, IMPORTANCE_JSON)
        try:
            with open(path) as f:
                payload = json.load(f)
            scores = torch.tensor(payload["scores"], dtype=torch.float64)
            if scores.dim() != 2 or tuple(scores.shape) != (payload["num_layers"], payload["num_heads"]):
                raise ValueError("its scores are not a layers x heads table")
            # A result from before checksums is taken as it parses.
            if payload.get("scores_sha256") not in (None, scores_digest(payload["scores"])):
                raise ValueError("its scores do not match their checksum: overwritten")
        except (OSError, ValueError, KeyError, TypeError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise DamagedResultError(
                f"importance result '{directory}' is unreadable ({reason}); remove it to compute it again", reason
            ) from None
        info = {k: v for k, v in payload.items() if k not in ("scores", "ranking")}
        return cls(scores=scores, info=info, path=directory)


def scores_digest(scores: list[list[float]]) -> str:
    """A SHA-256 of a table of scores as JSON writes it (a float reads back as the same text)."""
    return hashlib.sha256(json.dumps(scores).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# The computation
# ---------------------------------------------------------------------------------------------------------------------


def tokenize_pair(tokenizer, pair: dict, max_length: int | None = None) -> tuple[list[int], list[int], list[int]]:
    """(prompt, chosen, rejected) token ids as TRL's DPOTrainer makes them: completions of text pairs end with the
    EOS token, conversations go through the chat template, and the completion starts where the tokenized prompt and
    prompt+completion diverge. With `max_length`, completions are cut so each sequence fits (keep_start)."""
    if isinstance(pair["prompt"], list):  # conversational

        def ids(messages, generation_prompt=False):
            out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
            return list(out["input_ids"] if hasattr(out, "keys") else out)

        prompt = ids(pair["prompt"], generation_prompt=True)
        full = [ids(pair["prompt"] + pair[key]) for key in ("chosen", "rejected")]
    else:
        eos = tokenizer.eos_token or ""
        prompt = tokenizer(pair["prompt"])["input_ids"]
        full = []
        for key in ("chosen", "rejected"):
            answer = pair[key] if pair[key].endswith(eos) else pair[key] + eos
            full.append(tokenizer(pair["prompt"] + answer)["input_ids"])
    start = min(_common_prefix(prompt, ids) for ids in full)
    chosen, rejected = (ids[start:] for ids in full)
    if max_length is not None:
        chosen, rejected = chosen[: max(max_length - start, 0)], rejected[: max(max_length - start, 0)]
    return prompt[:start], chosen, rejected


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def gate_importance(
    model,
    layout: AttentionLayout,
    tokenized: list[tuple[list[int], list[int], list[int]]],
    tau: float,
    batch_size=8,
    spread: bool = False,
) -> torch.Tensor:
    """(layers, heads) mean over pairs of |dL_IPO(pair) / d gate| at gate = 1 (module docstring).

    `spread`: every process of a launch calls this at once and scores its share of the batches; the batches' sums
    are added in batch order on every process, as one process adds them (the same scores, bit for bit)."""
    from .. import processes

    if not tokenized:
        raise DataError("gradient importance needs at least one training pair")
    device = next(model.parameters()).device
    head_dim = layout.head_dim(model)
    pad = 0
    batches = list(range(0, len(tokenized), batch_size))
    mine = processes.share(batches) if spread else list(enumerate(batches))
    sums = []  # (batch position, that batch's sum of |gradient| per head)
    state = {}

    def gate_input(module, args, layer):
        rows = state["gates"][:, layer].repeat_interleave(head_dim, dim=-1)  # (rows, heads * head_dim)
        return (args[0] * rows[:, None, :].to(args[0].dtype), *args[1:])

    handles = [
        projection.register_forward_pre_hook(lambda m, a, layer=layer: gate_input(m, a, layer))
        for layer, projection in enumerate(layout.projections(model))
    ]
    was_training = model.training
    model.eval()
    try:
        for position, first in mine:
            pairs = tokenized[first : first + batch_size]
            rows = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
            width = max(len(p) + len(c) for p, c in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            attention = torch.zeros_like(ids)
            targets = torch.zeros_like(ids, dtype=torch.bool)  # position t predicts a completion token t + 1
            for i, (prompt, completion) in enumerate(rows):
                sequence = prompt + completion
                ids[i, : len(sequence)] = torch.tensor(sequence)
                attention[i, : len(sequence)] = 1
                targets[i, max(len(prompt) - 1, 0) : len(sequence) - 1] = True
            gates = torch.ones(len(pairs), layout.num_layers, layout.num_heads, device=device, requires_grad=True)
            state["gates"] = gates.repeat(2, 1, 1)  # rows [chosen; rejected]: pair i's rows share gates i
            logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits[:, :-1].float()
            token_logps = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None].to(device)).squeeze(-1)
            mask = targets[:, :-1].to(device)
            average = (token_logps * mask).sum(-1) / mask.sum(-1).clamp(min=1)
            chosen, rejected = average.chunk(2)
            # pi_ref is the base model: the same numbers, held fixed.
            delta = (chosen - chosen.detach()) - (rejected - rejected.detach())
            loss = (delta - 1 / (2 * tau)) ** 2
            (gradient,) = torch.autograd.grad(loss.sum(), gates)
            sums.append((position, gradient.abs().sum(0).double().cpu()))
    finally:
        for handle in handles:
            handle.remove()
        state.clear()
        model.train(was_training)
    total = torch.zeros(layout.num_layers, layout.num_heads, dtype=torch.float64)
    for batch_sum in processes.gather(sums) if spread else [batch_sum for _, batch_sum in sums]:
        total += batch_sum
    return total / len(tokenized)


# ---------------------------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------------------------


def default_importance_dir(recipe: Recipe) -> str:
    return os.path.join("outputs", recipe.name, "importance")


def importance_info(recipe: Recipe, model_path: str, layout: AttentionLayout) -> dict:
    """What a result is made from; its key names it (a result for other settings is computed again)."""
    edit_args, model_args, args = recipe.edit, recipe.model, recipe.training
    made_from = {
        "format": IMPORTANCE_FORMAT,
        "model_path": model_path,
        "revision": model_args.model_revision,
        "dtype": model_args.dtype,
        "load_in_4bit": model_args.load_in_4bit,
        "load_in_8bit": model_args.load_in_8bit,
        "model_type": layout.model_type,
        **edit_args.split_settings(),
        # A data file by its bytes too: one edited in place under the same name is scored again.
        "dataset_sha256": file_digest(edit_args.dataset) if os.path.isfile(edit_args.dataset) else None,
        "prompt_template": edit_args.prompt_template,
        "completion_template": edit_args.completion_template,
        "max_pairs_per_question": edit_args.max_pairs_per_question,
        "chat_template": edit_args.chat_template,
        "tau": args.beta,
        "max_length": args.max_length,
    }
    key = hashlib.sha256(json.dumps(made_from, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"importance_key": key, "model": model_args.model_name_or_path, **made_from}


def find_importance_result(recipe: Recipe, model_path: str, layout: AttentionLayout):
    """(the saved result made from exactly these settings, else None; its directory), without loading weights."""
    directory = default_importance_dir(recipe)
    if not os.path.isfile(os.path.join(directory, IMPORTANCE_JSON)):
        return None, directory
    try:
        result = ImportanceResult.load(directory)
    except DamagedResultError as err:  # cut short or overwritten: computed again (and saved over it), said once
        say_damaged(f"importance result '{directory}'", err.problem)
        return None, directory
    if result.info.get("importance_key") != importance_info(recipe, model_path, layout)["importance_key"]:
        return None, directory
    result.check_fits(layout)
    return result, directory


def run_importance_stage(
    recipe: Recipe, model_path: str, layout: AttentionLayout, model=None, tokenizer=None, together: bool = False
):
    """The saved result if up to date, else computed on the recipe's training pairs and saved.

    `together`: every process of an `accelerate launch` calls this at once (the study): each scores its share of
    the pairs, the main process saves the result, and the others read it."""
    from .. import processes

    existing, directory = find_importance_result(recipe, model_path, layout)
    if existing is not None:
        return existing
    spread = together and processes.count() > 1
    main = processes.is_main() if spread else True
    edit_args, args = recipe.edit, recipe.training
    with run_lock(directory) if main else contextlib.nullcontext():
        if model is None:
            model, tokenizer = load_model_and_tokenizer(model_path, recipe.model, args.trust_remote_code)
        place_for_inference(model)
        splits = load_preference_splits(**edit_args.pair_source())
        train = splits["train"]
        tokenized = [tokenize_pair(tokenizer, train[i], args.max_length) for i in range(len(train))]
        batch_size = args.per_device_eval_batch_size or 8
        scores = gate_importance(model, layout, tokenized, args.beta, batch_size, spread=spread)
        info = {**importance_info(recipe, model_path, layout), "pairs": len(tokenized)}
        result = ImportanceResult(scores=scores, info=info)
        if main:
            result.save(directory)
    if spread:
        processes.wait_for_everyone()
    if main:
        best = ", ".join(f"{format_heads([h])} {float(result.scores[h]):.3g}" for h in result.top_heads(5))
        pairs = len(tokenized)
        print(f"locedit: gradient importance of every head on {pairs} training pairs: best {best}", flush=True)
    return result
