"""MC scoring (`locedit eval`'s MC1/MC2 answer log-probs) with each question's prompt shared by its choices, against
each choice scored with its own copy of the prompt (locedit before, and lm-evaluation-harness's way), in one process,
interleaved rounds, medians; with the largest difference of the scores.

    python benchmarks/mc_speed.py            # SmolLM2-135M-Instruct, 40 TruthfulQA questions, Q/A and ITI prompts
    python benchmarks/mc_speed.py --small    # a tiny random Llama (CI)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

from common import load, timed

from locedit.data import load_questions
from locedit.evaluation.prompts import build_prompt
from locedit.evaluation.scoring import answer_logprobs

TRUTHFULQA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "truthfulqa", "TruthfulQA.csv")
# Both ways score the same tokens: only float32 rounding may tell them apart (8.4e-05 on SmolLM2's sums of -30..-100).
TOLERANCE = 1e-3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--questions", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    if args.small:
        from common import SMALL, model_dir

        path, count, rounds = model_dir(SMALL), args.questions or 6, args.rounds or 1
    else:
        from locedit.models.sources import resolve_model_path

        path, count, rounds = resolve_model_path("smollm2"), args.questions or 40, args.rounds or 3
    model, tokenizer = load(path)
    model.eval()
    questions = load_questions(TRUTHFULQA, split_fractions=(0.6, 0.2, 0.2), seed=0)["test"].select(range(count))
    print(f"model: {path}; {count} TruthfulQA test questions, batch 16")
    differences = {}
    for prefix in ("none", "iti"):
        pairs = []
        for q in questions:
            prompt = build_prompt(q["question"], prefix=prefix)
            choices = dict.fromkeys([*q["correct_answers"], *q["incorrect_answers"]])
            pairs += [(prompt, " " + choice) for choice in choices]
        times = {"alone": [], "shared": []}
        scores = {}
        for _ in range(rounds):
            for name in times:
                scores[name], seconds = timed(
                    lambda name=name, pairs=pairs: answer_logprobs(model, tokenizer, pairs, 16, name == "shared")
                )
                times[name].append(seconds)
        alone, shared = statistics.median(times["alone"]), statistics.median(times["shared"])
        worst = differences[prefix] = max(abs(a - b) for a, b in zip(scores["alone"], scores["shared"], strict=True))
        print(f"\nprompt '{prefix}': {len(pairs)} choices")
        print(f"  each choice with its prompt : {alone:8.2f} s")
        print(f"  prompt shared by its choices: {shared:8.2f} s ({alone / shared:.2f}x)")
        print(f"  largest score difference    : {worst:.2e}")
    beyond = {prefix: worst for prefix, worst in differences.items() if not worst <= TOLERANCE}  # NaN fails too
    if beyond:
        sys.exit(f"mc_speed.py: the shared prompt's scores differ from each choice's own beyond {TOLERANCE}: {beyond}")


if __name__ == "__main__":
    main()
