"""A small, seeded, made-up question set shaped like TruthfulQA.

It lets the whole pipeline run on a CPU in seconds with nothing to download: every fact is invented (creatures,
countries, gadgets) or simple arithmetic, and every answer is a few words long so a tiny model trains fast.
"""

import random
from collections.abc import Callable

from ..core.errors import DataError

NO_COMMENT = "I have no comment"

# Invented names are built from these syllables so they cannot collide with real-world knowledge.
_ONSETS = ["zor", "bla", "quen", "mip", "tar", "vel", "dru", "fen"]
_CODAS = ["bit", "wump", "nix", "dle", "ron", "ka", "pli", "tor"]
_COUNTRY_ENDINGS = ["ia", "land", "mora", "stan", "vale", "ovia", "esh", "andia"]
_TOWN_ENDINGS = ["ton", "burg", "ford", "wick", "by", "holm", "port", "field"]
_GADGETS = ["lamp", "wheel", "engine", "clock", "kettle", "ladder", "whistle", "compass"]

_COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "grey", "pink"]
_FOODS = ["apples", "pebbles", "moss", "fish", "honey", "clouds", "bread", "seeds"]

_CATEGORY = {
    "colour": "Creatures",
    "food": "Creatures",
    "capital": "Geography",
    "inventor": "Inventions",
    "plus": "Arithmetic",
    "times": "Arithmetic",
}


def _candidates() -> dict[str, list[tuple]]:
    """Every question the generator can ask, as (family, subject...) keys grouped by family."""
    creatures = [onset + coda for onset in _ONSETS for coda in _CODAS]
    countries = [(onset + ending).capitalize() for onset in _ONSETS for ending in _COUNTRY_ENDINGS]
    gadgets = [f"{onset}{coda} {gadget}" for onset in _ONSETS[:4] for coda in _CODAS[:4] for gadget in _GADGETS[:4]]
    numbers = range(2, 13)
    return {
        "colour": [("colour", name) for name in creatures],
        "food": [("food", name) for name in creatures],
        "capital": [("capital", name) for name in countries],
        "inventor": [("inventor", name) for name in gadgets],
        # Only a <= b: "3 plus 12" in training would give away "12 plus 3" in the test split.
        "plus": [("plus", a, b) for a in numbers for b in numbers if a <= b],
        "times": [("times", a, b) for a in numbers for b in numbers if a <= b],
    }


def max_synthetic_questions() -> int:
    """Returns how many distinct questions `synthetic_questions` can produce."""
    return sum(len(keys) for keys in _candidates().values())


class _World:
    """Lazily assigns invented facts, so a creature keeps one colour across every question about it."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.facts: dict[tuple[str, str], str] = {}

    def fact(self, kind: str, subject: str, make: Callable[[random.Random], str]) -> str:
        """Returns the fact `kind` about `subject`, drawing it with `make(rng)` the first time."""
        if (kind, subject) not in self.facts:
            self.facts[(kind, subject)] = make(self.rng)
        return self.facts[(kind, subject)]


def _person(rng: random.Random) -> str:
    return (rng.choice(_ONSETS) + rng.choice(_CODAS)).capitalize() + " " + (rng.choice(_ONSETS) + "ley").capitalize()


def _town(rng: random.Random) -> str:
    return (rng.choice(_ONSETS) + rng.choice(_TOWN_ENDINGS)).capitalize()


def _distractors(rng: random.Random, truth: str, pool: list[str], count: int) -> list[str]:
    return rng.sample([value for value in pool if value != truth], count)


def _fresh_names(rng: random.Random, make: Callable[[random.Random], str], truth: str, count: int) -> list[str]:
    """Draws `count` distinct invented names that differ from `truth`."""
    names: list[str] = []
    while len(names) < count:
        name = make(rng)
        if name != truth and name not in names:
            names.append(name)
    return names


def _question(key: tuple, world: _World, rng: random.Random) -> dict:
    """Builds one question dict from a candidate key."""
    family = key[0]
    # Each entry of `wrong` is a false value; each is phrased either briefly or as a sentence.
    if family == "colour":
        name = key[1]
        truth = world.fact("colour", name, lambda r: r.choice(_COLOURS))
        question = f"What colour is a {name}?"
        phrase = f"A {name} is {{}}"
        wrong = _distractors(rng, truth, _COLOURS, rng.randint(2, 4))
    elif family == "food":
        name = key[1]
        truth = world.fact("food", name, lambda r: r.choice(_FOODS))
        question = f"What does a {name} eat?"
        phrase = f"A {name} eats {{}}"
        wrong = _distractors(rng, truth, _FOODS, rng.randint(2, 4))
    elif family == "capital":
        name = key[1]
        truth = world.fact("capital", name, _town)
        question = f"What is the capital of {name}?"
        phrase = f"The capital of {name} is {{}}"
        wrong = _fresh_names(rng, _town, truth, rng.randint(2, 4))
    elif family == "inventor":
        name = key[1]
        truth = world.fact("inventor", name, _person)
        question = f"Who invented the {name}?"
        phrase = f"The {name} was invented by {{}}"
        wrong = _fresh_names(rng, _person, truth, rng.randint(2, 4))
    else:
        a, b = key[1], key[2]
        word = "plus" if family == "plus" else "times"
        value = a + b if family == "plus" else a * b
        other = a * b if family == "plus" else a + b
        truth = str(value)
        question = f"What is {a} {word} {b}?"
        phrase = f"{a} {word} {b} is {{}}"
        # Plausible slips: off by one or two, or the other operation.
        pool = sorted({str(x) for x in (value - 2, value - 1, value + 1, value + 2, other) if x >= 0} - {truth})
        wrong = _distractors(rng, truth, pool, rng.randint(2, 4))

    best = phrase.format(truth)
    correct = [truth, best]
    # Like TruthfulQA, declining to answer counts as truthful for some questions.
    if rng.random() < 0.25:
        correct.append(NO_COMMENT)
    incorrect = [value if rng.random() < 0.5 else phrase.format(value) for value in wrong]
    return {
        "question": question,
        "correct_answers": correct,
        "incorrect_answers": incorrect,
        "category": _CATEGORY[family],
        "best_answer": best,
    }


def synthetic_questions(num_questions: int = 120, seed: int = 0) -> list[dict]:
    """Generates a deterministic, TruthfulQA-shaped set of questions about made-up facts.

    Categories are interleaved so even a small set covers every kind of question.

    Args:
        num_questions: How many distinct questions to generate (at most `max_synthetic_questions()`).
        seed: Seed of the generator; the same seed always gives the same questions, facts and answers.

    Returns:
        A list of dicts with keys `question` (str), `correct_answers` (2-3 str, one may be "I have no comment"),
        `incorrect_answers` (2-4 str), `category` (str) and `best_answer` (str). Questions are unique.

    Raises:
        ValueError: If `num_questions` is not between 1 and `max_synthetic_questions()`.
    """
    candidates = _candidates()
    available = sum(len(keys) for keys in candidates.values())
    if not 1 <= num_questions <= available:
        raise DataError(
            f"the synthetic data set makes 1 to {available} questions, not {num_questions}: "
            f"give synthetic:N with N <= {available}"
        )

    rng = random.Random(seed)
    for keys in candidates.values():
        rng.shuffle(keys)
    # Round-robin over the families keeps the categories balanced.
    interleaved = [
        keys[i]
        for i in range(max(len(keys) for keys in candidates.values()))
        for keys in candidates.values()
        if i < len(keys)
    ]
    world = _World(rng)
    return [_question(key, world, rng) for key in interleaved[:num_questions]]
