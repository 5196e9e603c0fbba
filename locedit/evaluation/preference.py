"""Preference-style data (prompt/chosen/rejected) evaluated on its held-out pairs, each scored as TRL's DPOTrainer
scores a pair when it trains or evaluates with `loss_type: ipo`.

A pair is tokenized as TRL tokenizes it (`locedit.locate.importance.tokenize_pair`: the completion after the prompt
with the EOS token appended, or the chat template's turns; cut at the run's `max_length`), and log pi(y | x) is the
sum of the completion tokens' log-probs (TRL's `logps`). For each held-out pair, with tau the run's `beta`:

- the model prefers chosen: log pi(chosen | x) > log pi(rejected | x) (any model, the base model too);
- for an edit, whose reference pi_ref is its base model (the edit disabled, as in training), TRL's rewards
  r(y) = tau (log pi(y | x) - log pi_ref(y | x)): reward accuracy r(chosen) > r(rejected) (`rewards/accuracies`),
  reward margin r(chosen) - r(rejected) (`rewards/margins`) and the IPO loss
  (h - 1 / (2 tau))^2 with h = [log pi(chosen) - log pi_ref(chosen)] / |chosen| - [the same of rejected] / |rejected|,
  |y| the number of y's completion tokens (TRL's `ipo` loss, averaged per token);
- MC1 and MC2 per prompt from the same log-probs: the prompt's first chosen completion against its rejected ones,
  and its chosen completions' normalised probability mass against its rejected ones (`locedit.evaluation.metrics`).

Each prompt's record holds its number of held-out pairs and its sums over them, so every pair metric is a mean over
all held-out pairs (`Metric.over_pairs`), as TRL's are over a batch holding them all.
"""

from __future__ import annotations

import re

from ..locate.importance import tokenize_pair
from ..models.chat import assistant_turn, user_turn
from .metric_registry import IPO_LOSS, PAIRS, PREFERRING_CHOSEN, REWARD_ACCURATE, REWARD_MARGIN
from .metrics import mc1, mc2
from .prompts import build_prompt
from .scoring import completion_logprobs

# The per-question fields a prompt's pairs give: the counts and sums behind the metrics over pairs.
PAIR_FIELDS = (PAIRS, PREFERRING_CHOSEN, REWARD_ACCURATE, REWARD_MARGIN, IPO_LOSS)
# KL and CE on each held-out prompt (`scoring.document_scores`).
PROMPT_FIELDS = ("kl_prompt", "ce_prompt")


def pair_terms(
    logp_chosen: float,
    logp_rejected: float,
    ref_chosen: float | None = None,
    ref_rejected: float | None = None,
    chosen_tokens: int = 1,
    rejected_tokens: int = 1,
    beta: float | None = None,
) -> dict[str, float]:
    """One pair's terms from its completions' summed log-probs under the model (and under the reference, for an
    edit): whether the model prefers chosen, and with a reference TRL's reward accuracy, reward margin and IPO loss
    (`beta` is tau; a completion's token count is taken as at least 1, as TRL clamps it)."""
    terms = {PREFERRING_CHOSEN: float(logp_chosen > logp_rejected)}
    if ref_chosen is None or ref_rejected is None:
        return terms
    chosen_ratio, rejected_ratio = logp_chosen - ref_chosen, logp_rejected - ref_rejected
    chosen_reward, rejected_reward = beta * chosen_ratio, beta * rejected_ratio
    delta = chosen_ratio / max(chosen_tokens, 1) - rejected_ratio / max(rejected_tokens, 1)
    terms[REWARD_ACCURATE] = float(chosen_reward > rejected_reward)
    terms[REWARD_MARGIN] = chosen_reward - rejected_reward
    terms[IPO_LOSS] = (delta - 1 / (2 * beta)) ** 2
    return terms


def held_out_pairs(questions: list[dict]) -> int:
    return sum(len(question["pairs"]) for question in questions)


def _as_pair(prompt: str, chosen: str, rejected: str, chat: bool) -> dict:
    """A pair as the training gave it to TRL: text, or with `chat_template` TRL's conversational turns."""
    if not chat:
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    return {
        "prompt": [user_turn(prompt)],
        "chosen": [assistant_turn(chosen.strip())],
        "rejected": [assistant_turn(rejected.strip())],
    }


def score_pairs(model, tokenizer, questions: list[dict], records: list[dict], target, args, edited: bool) -> None:
    """Each held-out pair of `questions` (records of `load_prompt_pairs`) scored by the model, and for an edit (a PEFT
    model, `edited`) by its base model too; the prompt's counts and sums over its pairs (`PAIR_FIELDS`) and, with
    `eval_mc`, its MC1 and MC2 put into its record (`records[i]` is `questions[i]`'s)."""
    rows, targets, prompts, index = [], [], [], {}  # index: (prompt ids, completion ids) -> its row
    tokenized = []  # per question: each pair's (chosen row, rejected row, chosen tokens, rejected tokens)
    for question in questions:
        pairs = []
        for chosen, rejected in question["pairs"]:
            pair = _as_pair(question["question"], chosen, rejected, target.chat_template)
            prompt, *completions = tokenize_pair(tokenizer, pair, target.max_length)
            at = []
            for completion in completions:
                key = (tuple(prompt), tuple(completion))
                if key not in index:
                    index[key] = len(rows)
                    rows.append(prompt + completion)
                    targets.append([0] * len(prompt) + [1] * len(completion))
                    prompts.append(key[0])
                at.append(index[key])
            pairs.append((*at, len(completions[0]), len(completions[1])))
        tokenized.append(pairs)
    batch, share = args.eval_batch_size, args.eval_mc_share_prompt
    scores = completion_logprobs(model, tokenizer, rows, targets, prompts, batch, share)
    reference = None
    if edited:  # the reference of training: the same model with its edit disabled
        with model.disable_adapter():
            reference = completion_logprobs(model, tokenizer, rows, targets, prompts, batch, share)
    for question, record, pairs in zip(questions, records, tokenized, strict=True):
        sums = dict.fromkeys(PAIR_FIELDS[1:] if edited else (PREFERRING_CHOSEN,), 0.0)  # sums over its pairs
        by_completion: dict[str, float] = {}  # each completion's log-prob, from the first pair it is in
        for (chosen, rejected), (c, r, chosen_tokens, rejected_tokens) in zip(question["pairs"], pairs, strict=True):
            by_completion.setdefault(chosen, scores[c])
            by_completion.setdefault(rejected, scores[r])
            refs = (reference[c], reference[r]) if reference is not None else (None, None)
            terms = pair_terms(scores[c], scores[r], *refs, chosen_tokens, rejected_tokens, target.beta)
            for key, value in terms.items():
                sums[key] += value
        record[PAIRS] = len(pairs)
        record.update(sums)
        if args.eval_mc:
            wrong = [by_completion[answer] for answer in question["incorrect_answers"]]
            record["mc1"] = mc1(by_completion[question["best_answer"]], wrong)
            record["mc2"] = mc2([by_completion[answer] for answer in question["correct_answers"]], wrong)


# A speaker's label at the start of a line of a dialogue prompt ("Human:", "Assistant:", "User:", "Q:").
_TURN_LABEL = re.compile(r"^([A-Z][A-Za-z]{0,19}):", re.MULTILINE)


def turn_stops(prompts: list[str]) -> tuple[str, ...]:
    """Where a generated answer to a text preference prompt ends: a new line starting with a speaker's label of the
    prompts' dialogue ("\nHuman:", "\nAssistant:"), as the Q/A prompt's answer ends at the next "Q:"."""
    labels = dict.fromkeys(label for prompt in prompts for label in _TURN_LABEL.findall(prompt))
    return tuple(f"\n{label}:" for label in labels)


def prompt_texts(questions: list[dict], target, tokenizer) -> list[str]:
    """Each held-out prompt as the training read it: the text itself, or with `chat_template` its user turn with
    the assistant header (what TRL's prompt tokens are)."""
    chat = tokenizer if target.chat_template else None
    return [build_prompt(question["question"], "{question}", "none", chat) for question in questions]


__all__ = [
    "PAIR_FIELDS",
    "PROMPT_FIELDS",
    "held_out_pairs",
    "pair_terms",
    "prompt_texts",
    "score_pairs",
    "turn_stops",
]
