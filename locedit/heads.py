"""Head specs: which heads of a model a run edits, parsed once into a `HeadSpec` and resolved by a selector.

Every form of the grammar is one `Selector` in `SELECTORS`: `all`; explicit heads `L12H3,L14H0`; `layers:12-15`;
`random:K` (drawn with heads_seed); `single:K` (K distinct random single heads, each its own edit); and the
score-driven `probe:K` / `importance:K` (the K heads a localization heuristic scores highest; the scores come from
the locator of the same name in `locedit.locate`). `heads_draws` makes several draws of a `random:K` spec, each its
own edit. A recipe's `heads` string is parsed once (`HeadSpec.parse`); everything below takes the `HeadSpec`: its
family (W&B groups, the report), its slug (directory names), its draws, what it needs (a seed, a locator's scores)
and `resolve(layout, scores)`. `locedit.models.layout.AttentionLayout` knows where the heads are.

A new selector is one `register_selector(Selector(...))` (a plugin does it from its entry point, see
`locedit.core.plugins`); a new score-driven heuristic is one `top_k_selector(name, ...)` here and its locator in
`locedit.locate`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from .core.errors import HeadSpecError
from .core.plugins import load_plugins

if TYPE_CHECKING:  # a head spec parses without torch; a layout is only handed in
    from .models.layout import AttentionLayout

_HEAD_ITEM = re.compile(r"^L(\d+)H(\d+)$", re.IGNORECASE)
Heads = list[tuple[int, int]]


@dataclass(frozen=True)
class Selector:
    """One form of head spec, `kind:ARG` (`all` takes no ARG; `heads` is the form of an explicit list).

    resolve(spec, layout, scores) gives the heads (unsorted is fine); check(spec, layout) raises HeadSpecError on a
    spec that cannot resolve on the layout whatever the scores (default: resolve it, when it needs no scores);
    family(spec) names its family; `locator` is the locator whose per-head scores it ranks (None: it needs none);
    `uses_seed` says heads_seed draws it; `edits(spec, layout)`, when given, makes it several edits; `help` says
    which heads its form picks, for the commands' help (`selector_help`).
    """

    kind: str
    form: str  # an example, for error messages and docs
    resolve: Callable[[HeadSpec, AttentionLayout, object], Heads]
    family: Callable[[HeadSpec], str]
    check: Callable[[HeadSpec, AttentionLayout], None] | None = None
    locator: str | None = None
    uses_seed: bool = False
    edits: Callable[[HeadSpec, AttentionLayout], list[HeadSpec]] | None = None
    help: str = ""


SELECTORS: dict[str, Selector] = {}


def register_selector(selector: Selector) -> None:
    SELECTORS[selector.kind] = selector


def valid_forms() -> str:
    forms = [f"'{selector.form}'" for selector in SELECTORS.values()]
    return ", ".join(forms[:-1]) + f" or {forms[-1]}"


def selector_help() -> list[tuple[str, str]]:
    """(form, which heads it picks) of every registered selector, plugins' included, for the commands' help."""
    load_plugins()
    return [(selector.form, selector.help) for selector in SELECTORS.values()]


def heads_help() -> str:
    """The help of the `heads` field, from the registry: every form and which heads it picks."""
    forms = "; ".join(f"'{form}'" + (f" {what}" if what else "") for form, what in selector_help())
    return f"Heads to edit (0-based): {forms}."


@dataclass(frozen=True)
class HeadSpec:
    """A parsed head spec with its heads_seed and heads_draws."""

    text: str  # as written, stripped
    kind: str  # a key of SELECTORS
    arg: str  # what follows "kind:" (the list itself for explicit heads, "" for all)
    seed: int = 0
    draws: int = 1

    @classmethod
    def parse(cls, text, seed: int = 0, draws: int = 1, layout: AttentionLayout | None = None) -> HeadSpec:
        """The spec of a recipe's `heads` (`layout`, when known, is named in errors)."""
        text = str(text).strip()
        kind, colon, arg = text.partition(":")
        kind, arg = kind.strip().lower(), arg.strip()
        if not colon and text.lower() == "all":
            kind, arg = "all", ""
        elif not colon and _HEAD_ITEM.match(text.split(",")[0].strip()):
            kind, arg = "heads", text
        else:
            if colon and arg and kind not in SELECTORS:
                load_plugins()  # a plugin's selector registers when its plugin is imported
            if not colon or not arg or kind in ("all", "heads") or kind not in SELECTORS:
                shape = f" (model has {layout.shape})" if layout is not None else ""
                raise HeadSpecError(f"bad head spec '{text}'{shape}; valid forms: {valid_forms()}")
        spec = cls(text, kind, arg, int(seed), int(draws))
        if spec.draws < 1:
            raise HeadSpecError(f"heads_draws must be at least 1, got {spec.draws}")
        if spec.selector.edits is not None and spec.draws != 1:
            raise HeadSpecError(f"'{text}' already sets the number of draws; remove heads_draws ({spec.draws})")
        if spec.draws > 1 and kind != "random":
            raise HeadSpecError(
                f"heads_draws {spec.draws} needs a random:K head spec (every draw of '{text}' is equal)"
            )
        return spec

    @classmethod
    def of(cls, edit_args, layout: AttentionLayout | None = None) -> HeadSpec:
        """The spec of a recipe's edit arguments (`heads`, `heads_seed`, `heads_draws`)."""
        return cls.parse(edit_args.heads, edit_args.heads_seed, edit_args.heads_draws, layout)

    @property
    def selector(self) -> Selector:
        return SELECTORS[self.kind]

    @property
    def locator(self) -> str | None:
        """The locator whose scores this spec ranks (`probe`, `importance`), or None."""
        return self.selector.locator

    @property
    def uses_seed(self) -> bool:
        """Whether heads_seed draws its heads (`random:K`, `single:K`)."""
        return self.selector.uses_seed

    @property
    def is_multi_edit(self) -> bool:
        """Whether a run of this spec trains several edits (`single:K`, or several draws of `random:K`)."""
        return self.draws > 1 or self.selector.edits is not None

    @property
    def count(self) -> str:
        """K of `random:K`, `probe:K`, `single:K`, ..., as written."""
        return self.arg

    @property
    def family(self) -> str:
        """all-heads, random-16, single-head, probe-16, layers, explicit-3, ... (W&B groups, the report)."""
        return self.selector.family(self)

    @property
    def slug(self) -> str:
        """The spec as a directory name part: probe16, random16-hs3, L0H1_L1H3, single24-hs0 ..."""
        slug = self.text.replace(":", "").replace(",", "_").replace(" ", "")
        if self.uses_seed:
            slug += f"-hs{self.seed}"
        if self.draws > 1:
            slug += f"x{self.draws}"
        if len(slug) > 40:
            slug = slug[:24] + "-" + hashlib.sha1(slug.encode()).hexdigest()[:8]
        return slug

    def edits(self, layout: AttentionLayout) -> list[HeadSpec]:
        """The spec of every edit of a run: K single heads for `single:K`, one `random:K` per draw (seeds seed ..
        seed + draws - 1), else this spec alone."""
        if self.selector.edits is not None:
            return self.selector.edits(self, layout)
        return [replace(self, seed=self.seed + i, draws=1) for i in range(self.draws)]

    def check(self, layout: AttentionLayout) -> None:
        """Raise HeadSpecError now if the spec cannot resolve on this layout (no scores needed)."""
        if self.selector.check is not None:
            self.selector.check(self, layout)
        elif self.locator is None:
            self.resolve(layout)

    def resolve(self, layout: AttentionLayout, scores=None) -> Heads:
        """The sorted (layer, head) pairs, 0-based; `scores` (a layers x heads table) for a score-driven spec.
        Every mistake raises HeadSpecError naming the item and the model's layers x heads."""
        heads = self.selector.resolve(self, layout, scores)
        if not heads:
            raise HeadSpecError(f"head spec '{self.text}' selects no heads (model has {layout.shape})")
        return sorted(heads)

    def __str__(self) -> str:
        return self.text


def resolve_heads(spec, layout: AttentionLayout, seed: int = 0, probe_scores=None, scores=None) -> Heads:
    """Resolve a head spec (text or HeadSpec) against a model's layout into sorted (layer, head) pairs.

    `scores` (or, by its old name, `probe_scores`): the layers x heads table a score-driven spec ranks.
    """
    if not isinstance(spec, HeadSpec):
        spec = HeadSpec.parse(spec, seed, layout=layout)
    return spec.resolve(layout, scores if scores is not None else probe_scores)


def _explicit_heads(spec: str, layout: AttentionLayout) -> list[tuple[int, int]]:
    heads = []
    for item in spec.split(","):
        item = item.strip()
        match = _HEAD_ITEM.match(item)
        if not match:
            raise HeadSpecError(
                f"bad head '{item}' in '{spec}': expected L<layer>H<head> such as L12H3 (model has {layout.shape})"
            )
        layer, head = int(match.group(1)), int(match.group(2))
        if layer >= layout.num_layers or head >= layout.num_heads:
            raise HeadSpecError(
                f"head '{item}' is out of range: model has {layout.shape} "
                f"(layers 0-{layout.num_layers - 1}, heads 0-{layout.num_heads - 1})"
            )
        if (layer, head) in heads:
            raise HeadSpecError(f"head '{item}' is selected twice in '{spec}' (model has {layout.shape})")
        heads.append((layer, head))
    return heads


def _parse_layers(arg: str, layout: AttentionLayout) -> list[int]:
    layers: list[int] = []
    for item in arg.split(","):
        item = item.strip()
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not match:
            raise HeadSpecError(
                f"bad layer range '{item}' in 'layers:{arg}': expected e.g. 12-15 or 3 (model has {layout.shape})"
            )
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        if first > last:
            raise HeadSpecError(f"layer range '{item}' is empty (first > last; model has {layout.shape})")
        if last >= layout.num_layers:
            raise HeadSpecError(
                f"layer range '{item}' is out of range: model has {layout.shape} (layers 0-{layout.num_layers - 1})"
            )
        for layer in range(first, last + 1):
            if layer in layers:
                raise HeadSpecError(f"layer {layer} is selected twice in 'layers:{arg}' (model has {layout.shape})")
            layers.append(layer)
    return layers


def _random_heads(arg: str, layout: AttentionLayout, seed: int) -> list[tuple[int, int]]:
    total = layout.num_layers * layout.num_heads
    if not arg.strip().isdigit() or not 1 <= int(arg) <= total:
        raise HeadSpecError(f"bad head count in 'random:{arg}': expected 1 to {total} (model has {layout.shape})")
    flat = random.Random(seed).sample(range(total), int(arg))
    return [divmod(index, layout.num_heads) for index in flat]


def rank_heads(scores) -> list[tuple[int, int]]:
    """Every head as (layer, head), best score first; ties go to the lower layer, then the lower head."""
    rows = [[float(value) for value in row] for row in scores]
    return sorted(
        ((layer, head) for layer, row in enumerate(rows) for head in range(len(row))),
        key=lambda item: (-rows[item[0]][item[1]], item[0], item[1]),
    )


def format_heads(heads: list[tuple[int, int]]) -> str:
    """The explicit spec of a head list, e.g. 'L0H1,L3H2': resolving it gives the same heads back."""
    return ",".join(f"L{layer}H{head}" for layer, head in heads)


def heads_by_layer(heads: list[tuple[int, int]]) -> dict[int, list[int]]:
    """Selected heads grouped by layer, layers and heads sorted."""
    grouped: dict[int, list[int]] = {}
    for layer, head in sorted(heads):
        grouped.setdefault(layer, []).append(head)
    return grouped


# ---------------------------------------------------------------------------------------------------------------------
# The selectors
# ---------------------------------------------------------------------------------------------------------------------


def head_count(spec: HeadSpec, layout: AttentionLayout) -> int:
    """K of a `kind:K` spec, checked against the model's number of heads."""
    total = layout.num_layers * layout.num_heads
    if not spec.arg.isdigit() or int(spec.arg) < 1:
        raise HeadSpecError(
            f"bad head count in '{spec.kind}:{spec.arg}': expected 1 to {total} (model has {layout.shape})"
        )
    if int(spec.arg) > total:
        raise HeadSpecError(
            f"'{spec.kind}:{spec.arg}' asks for {spec.arg} heads, but the model has {layout.shape} = {total} heads; "
            f"give K from 1 to {total}"
        )
    return int(spec.arg)


def _single_edits(spec: HeadSpec, layout: AttentionLayout) -> list[HeadSpec]:
    # Drawn as one set, so no head is trained twice (K independent random:1 draws would repeat heads).
    if not spec.arg.isdigit() or int(spec.arg) < 1:
        raise HeadSpecError(f"bad head spec '{spec.text}': single:K needs a count K >= 1, e.g. single:24")
    heads = _random_heads(str(head_count(spec, layout)), layout, spec.seed)
    return [HeadSpec.parse(format_heads([head]), spec.seed) for head in sorted(heads)]


def _single_resolve(spec: HeadSpec, layout: AttentionLayout, scores) -> Heads:
    raise HeadSpecError(f"'{spec.text}' is {spec.arg} edits of one head each, not one head set")


def _explicit_family(spec: HeadSpec) -> str:
    count = len(spec.arg.split(","))
    return "single-head" if count == 1 else f"explicit-{count}"


def top_k_selector(locator: str, missing: str, score: str = "") -> Selector:
    """`locator:K`, the K heads of highest score in a locator's layers x heads table (ties: the lower layer, then
    the lower head). `missing` says how to get the scores when a spec is resolved without them; `score` names the
    score, for the help (default: the locator's name)."""

    def resolve(spec: HeadSpec, layout: AttentionLayout, scores) -> Heads:
        count = head_count(spec, layout)
        if scores is None:
            raise HeadSpecError(f"'{spec.kind}:{count}' needs {missing}")
        shape = tuple(len(row) for row in scores)
        if len(shape) != layout.num_layers or set(shape) != {layout.num_heads}:
            rows = f"{len(shape)} layers x {shape[0] if shape else 0} heads"
            raise HeadSpecError(f"the {locator} scores cover {rows}, but the model has {layout.shape}")
        return rank_heads(scores)[:count]

    return Selector(
        kind=locator,
        form=f"{locator}:16",
        resolve=resolve,
        family=lambda spec: f"{locator}-{spec.arg}",
        check=lambda spec, layout: head_count(spec, layout) and None,
        locator=locator,
        help=f"the 16 heads of highest {score or locator + ' score'}",
    )


register_selector(
    Selector(
        "all",
        "all",
        lambda spec, layout, scores: [(lay, h) for lay in range(layout.num_layers) for h in range(layout.num_heads)],
        lambda spec: "all-heads",
        help="every head of every layer",
    )
)
register_selector(
    Selector(
        "heads",
        "L12H3,L14H0",
        lambda spec, layout, scores: _explicit_heads(spec.arg, layout),
        _explicit_family,
        help="these heads (layer 12 head 3, layer 14 head 0)",
    )
)
register_selector(
    Selector(
        "layers",
        "layers:12-15",
        lambda spec, layout, scores: [
            (lay, h) for lay in _parse_layers(spec.arg, layout) for h in range(layout.num_heads)
        ],
        lambda spec: "layers",
        help="every head of these layers",
    )
)
register_selector(
    Selector(
        "random",
        "random:16",
        # K checked as every kind:K checks it, so all say alike how many heads the model has
        lambda spec, layout, scores: _random_heads(str(head_count(spec, layout)), layout, spec.seed),
        lambda spec: "single-head" if spec.arg == "1" else f"random-{spec.arg}",
        uses_seed=True,
        help="16 heads drawn at random with heads_seed",
    )
)
register_selector(
    Selector(
        "single",
        "single:24",
        _single_resolve,
        lambda spec: "single-head",
        check=lambda spec, layout: _single_edits(spec, layout) and None,
        uses_seed=True,
        edits=_single_edits,
        help="24 random single heads, each its own edit",
    )
)
register_selector(
    top_k_selector(
        "probe",
        "a probe result: set probe_results to a directory written by `locedit probe`",
        "probe accuracy (ITI's; locedit probe)",
    )
)
register_selector(
    top_k_selector(
        "importance",
        "importance scores: the importance stage computes them on the recipe's training pairs "
        "(`locedit.locate.importance`; train, iti and study run it first when none are saved)",
        "gradient importance under the IPO loss",
    )
)


def draw_recipe(recipe, draw: HeadSpec):
    """The recipe of one edit of a multi-edit spec (one of `spec.edits(layout)`): its heads and seed, one draw, as
    the edit's recipe.yaml records them. Code that needs the edit's spec takes `draw` itself, not a parse of this."""
    single = copy.copy(recipe)
    single.edit = dataclasses.replace(recipe.edit, heads=draw.text, heads_seed=draw.seed, heads_draws=1)
    return single
