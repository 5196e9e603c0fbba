"""The exact judge of the toy world: `eval_judge_truth: toy` and `eval_judge_info: toy`, no model involved.

An answer is informative when it commits to some value of the question's attribute (a colour, a food, ...), and
truthful when the only value it states is the true one, or when it states none and declines ("I have no comment").
Values are matched as whole words, case-insensitively. The judge's spec names the world as the data set does:
`toy` for `dataset: toy`, `toy:entities=24` for `dataset: toy:entities=24` (model keys in the spec are ignored, so
one spec can serve the model, the data and the judge). A question that is not in the judge's world is an error, never
a guess.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..core.errors import JudgeError
from ..evaluation.judges import Judge, judge_prompt, register_judge_kind
from .world import TOY_PREFIX, ToySpecError, judge_answer, make_world, parse_toy_spec


class ToyJudge(Judge):
    """Scores 1.0 (yes) or 0.0 (no) from the toy world's facts."""

    kind = TOY_PREFIX

    def __init__(self, name: str, aspect: str, batch_size: int = 16, **options):
        super().__init__(name, aspect, batch_size)  # dtype and device are for model judges: nothing to place here
        try:
            self.settings = parse_toy_spec(f"{TOY_PREFIX}:{name}" if name else TOY_PREFIX)
        except ToySpecError as err:
            raise JudgeError(f"{aspect} judge '{self.spec}': {err}") from None
        self.facts = make_world(self.settings).question_facts()

    def verdict(self, question: str, answer: str) -> bool:
        if question not in self.facts:
            raise JudgeError(
                f"{self.aspect} judge '{self.spec}': the question {question!r} is not in its world "
                f"({self.settings.world().spec()}); give the judge the same toy spec as the data set"
            )
        truthful, informative = judge_answer(*self.facts[question], answer)
        return truthful if self.aspect == "truth" else informative

    def score(self, questions: Sequence[str], answers: Sequence[str]) -> list[float]:
        return [float(self.verdict(q, a)) for q, a in zip(questions, answers, strict=True)]

    def score_prompts(self, prompts: Sequence[str]) -> list[float]:
        """The same verdicts read back from judge prompts (`Q: {question}\\nA: {answer}\\n{label}:`)."""
        questions, answers = [], []
        for prompt in prompts:
            head, _, label = prompt.rpartition("\n")
            question, sep, answer = head.partition("\nA: ")
            if not (question.startswith("Q: ") and sep) or judge_prompt("", "", self.aspect).split("\n")[-1] != label:
                raise JudgeError(f"{self.aspect} judge '{self.spec}': not a {self.aspect} judge prompt: {prompt!r}")
            questions.append(question[len("Q: ") :])
            answers.append(answer)
        return self.score(questions, answers)


register_judge_kind(TOY_PREFIX, ToyJudge)
