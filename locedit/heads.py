"""The head-spec grammar: which heads of a model a run edits, and the names of head families.

Forms: `all`; explicit heads `L12H3,L14H0`; `layers:12-15`; `random:K`; `probe:K` (the K best-probing heads);
`single:K` (K distinct random single heads, each its own edit) and `heads_draws` (several draws of a `random:K`
spec, each its own edit). Everything that reads a head spec (planning, naming run directories, W&B groups, the
study, the report) goes through this module; `locedit.models.layout.AttentionLayout` knows where the heads are.
"""

from __future__ import annotations

import hashlib
import random
import re

from .core.errors import HeadSpecError
from .models.layout import AttentionLayout

HEAD_SPEC_FORMS = "'all', 'L12H3,L14H0', 'layers:12-15', 'random:16' or 'probe:16'"
_HEAD_ITEM = re.compile(r"^L(\d+)H(\d+)$", re.IGNORECASE)


def resolve_heads(spec: str, layout: AttentionLayout, seed: int = 0, probe_scores=None) -> list[tuple[int, int]]:
    """Resolve a head selection spec against a model's layout into sorted (layer, head) pairs, 0-based.

    Forms: `all`; explicit heads `L12H3,L14H0`; `layers:12-15` (every head of those layers, also `layers:3` and
    `layers:0,2,5-7`); `random:K` (K distinct heads drawn uniformly with `seed`; `random:1` is one random head);
    `probe:K` (the K heads with the highest `probe_scores`, a layers x heads table such as a probe's validation
    accuracies; ties go to the lower layer, then the lower head).
    Every mistake (out-of-range layer or head, duplicate, empty selection, unknown form) raises HeadSpecError naming
    the item and the model's layers x heads.
    """
    spec = str(spec).strip()
    kind, _, arg = spec.partition(":")
    kind = kind.strip().lower()
    if spec.lower() == "all":
        heads = [(layer, head) for layer in range(layout.num_layers) for head in range(layout.num_heads)]
    elif kind == "layers" and arg:
        heads = [(layer, head) for layer in _parse_layers(arg, layout) for head in range(layout.num_heads)]
    elif kind == "random" and arg:
        heads = _random_heads(arg, layout, seed)
    elif kind == "probe" and arg:
        heads = _probe_heads(arg, layout, probe_scores)
    elif _HEAD_ITEM.match(spec.split(",")[0].strip()):
        heads = _explicit_heads(spec, layout)
    else:
        raise HeadSpecError(f"bad head spec '{spec}' (model has {layout.shape}); valid forms: {HEAD_SPEC_FORMS}")
    if not heads:
        raise HeadSpecError(f"head spec '{spec}' selects no heads (model has {layout.shape})")
    return sorted(heads)


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


def is_probe_spec(spec: str) -> bool:
    """Whether a head spec needs probe scores to resolve (`probe:K`)."""
    return str(spec).strip().lower().startswith("probe:")


def rank_heads(scores) -> list[tuple[int, int]]:
    """Every head as (layer, head), best score first; ties go to the lower layer, then the lower head."""
    rows = [[float(value) for value in row] for row in scores]
    return sorted(
        ((layer, head) for layer, row in enumerate(rows) for head in range(len(row))),
        key=lambda item: (-rows[item[0]][item[1]], item[0], item[1]),
    )


def probe_head_count(spec: str, layout: AttentionLayout) -> int:
    """K of a `probe:K` spec, checked against the model's number of heads (no scores needed)."""
    arg = str(spec).strip().partition(":")[2].strip()
    total = layout.num_layers * layout.num_heads
    if not arg.isdigit() or int(arg) < 1:
        raise HeadSpecError(f"bad head count in 'probe:{arg}': expected 1 to {total} (model has {layout.shape})")
    if int(arg) > total:
        raise HeadSpecError(f"'probe:{arg}' asks for {arg} heads, but the model has {layout.shape} = {total} heads")
    return int(arg)


def _probe_heads(arg: str, layout: AttentionLayout, probe_scores) -> list[tuple[int, int]]:
    count = probe_head_count(f"probe:{arg}", layout)
    if probe_scores is None:
        raise HeadSpecError(
            f"'probe:{count}' needs a probe result: set probe_results to a directory written by `locedit probe`"
        )
    shape = tuple(len(row) for row in probe_scores)
    if len(shape) != layout.num_layers or set(shape) != {layout.num_heads}:
        rows = f"{len(shape)} layers x {shape[0] if shape else 0} heads"
        raise HeadSpecError(f"the probe scores cover {rows}, but the model has {layout.shape}")
    return rank_heads(probe_scores)[:count]


def format_heads(heads: list[tuple[int, int]]) -> str:
    """The explicit spec of a head list, e.g. 'L0H1,L3H2': resolving it gives the same heads back."""
    return ",".join(f"L{layer}H{head}" for layer, head in heads)


def heads_by_layer(heads: list[tuple[int, int]]) -> dict[int, list[int]]:
    """Selected heads grouped by layer, layers and heads sorted."""
    grouped: dict[int, list[int]] = {}
    for layer, head in sorted(heads):
        grouped.setdefault(layer, []).append(head)
    return grouped


def expand_head_specs(spec: str, heads_seed: int, heads_draws: int, layout: AttentionLayout) -> list[tuple[str, int]]:
    """The (spec, seed) of every edit of a run: `single:K` is K distinct random single heads (the heads of
    `random:K` with heads_seed, each as its own edit, e.g. `L3H7`); `random:N` with heads_draws K is K random sets
    of N heads (seeds heads_seed .. heads_seed + K - 1); anything else is one edit."""
    kind, _, arg = spec.strip().partition(":")
    if kind.lower() == "single":
        if not arg.strip().isdigit() or int(arg) < 1:
            raise HeadSpecError(f"bad head spec '{spec}': single:K needs a count K >= 1, e.g. single:24")
        if heads_draws != 1:
            raise HeadSpecError(f"'{spec}' already sets the number of draws; remove heads_draws ({heads_draws})")
        total = layout.num_layers * layout.num_heads
        if int(arg) > total:
            raise HeadSpecError(f"bad head count in '{spec}': expected 1 to {total} (model has {layout.shape})")
        # Drawn as one set, so no head is trained twice (K independent random:1 draws would repeat heads).
        heads = resolve_heads(f"random:{int(arg)}", layout, seed=heads_seed)
        return [(format_heads([head]), heads_seed) for head in heads]
    if heads_draws < 1:
        raise HeadSpecError(f"heads_draws must be at least 1, got {heads_draws}")
    if heads_draws > 1 and kind.lower() != "random":
        raise HeadSpecError(f"heads_draws {heads_draws} needs a random:K head spec (every draw of '{spec}' is equal)")
    return [(spec, heads_seed + i) for i in range(heads_draws)]


def is_multi_edit(spec: str, heads_draws: int) -> bool:
    """Whether a run trains several edits (`single:K`, or several draws of a random spec)."""
    return heads_draws > 1 or spec.strip().lower().startswith("single:")


def is_random_spec(spec: str) -> bool:
    """Whether a spec draws its heads with heads_seed (`random:K`, `single:K`)."""
    return str(spec).strip().lower().startswith(("random", "single"))


def spec_count(spec: str) -> str:
    """K of `random:K`, `probe:K` or `single:K`, as written."""
    return str(spec).strip().partition(":")[2].strip()


def head_family(spec: str) -> str:
    """The family a head spec belongs to, for grouping runs (W&B groups, the report): all-heads, random-16,
    single-head, probe-16, layers, explicit-3."""
    kind, _, arg = spec.strip().lower().partition(":")
    if kind == "all":
        return "all-heads"
    if kind == "random":
        return "single-head" if arg.strip() == "1" else f"random-{arg.strip()}"
    if kind == "layers":
        return "layers"
    if kind == "probe":
        return f"probe-{arg.strip()}"
    count = len(spec.split(","))
    return "single-head" if count == 1 else f"explicit-{count}"


def heads_slug(spec: str, heads_seed: int = 0, heads_draws: int = 1) -> str:
    """A head spec as a directory name part: probe16, random16-hs3, L0H1_L1H3, single24-hs0 ..."""
    slug = spec.strip().replace(":", "").replace(",", "_").replace(" ", "")
    if is_random_spec(spec):
        slug += f"-hs{heads_seed}"
    if heads_draws > 1:
        slug += f"x{heads_draws}"
    if len(slug) > 40:
        slug = slug[:24] + "-" + hashlib.sha1(slug.encode()).hexdigest()[:8]
    return slug
