"""Several completions of one prompt in one sequence: [prompt, completion 1, ..., completion n]; several such
units side by side in one row (packing, so that a batch carries almost no padding).

Each completion attends to the prompt and to itself (never to another completion), and its position ids go on from
the prompt's end, so every token sees exactly what it would see in its own sequence prompt + completion; the prompt
runs once ("Accelerating Direct Preference Optimization with Prefix Sharing", Wang et al. 2024). Units in one row
never see each other and their positions restart at 0. Training packs a pair's two answers this way (or each
answer with its own prompt), MC evaluation a question's choices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Unit = tuple[torch.Tensor, list[torch.Tensor]]  # (prompt ids, [completion ids, ...])


@dataclass
class Placement:
    """Where a unit lies in a packed batch: its row, its first column, its length, and per completion the columns
    whose hidden states predict the completion's tokens (in order) with those tokens."""

    row: int
    offset: int
    length: int
    scored: list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class PackedSequences:
    """A padded batch of rows, each holding one or more units side by side.

    ids, positions: (rows, width); allowed: (rows, width, width), True where a query may attend to a key (within its
    own unit only); lengths: each row's used length; placements: one per unit, in the order the units were given.
    """

    ids: torch.Tensor
    positions: torch.Tensor
    allowed: torch.Tensor
    lengths: list[int]
    placements: list[Placement]


def unit_length(unit: Unit) -> int:
    prompt, completions = unit
    return len(prompt) + sum(len(c) for c in completions)


def pack_rows(lengths: list[int], pack: bool = True) -> list[list[int]]:
    """Which units share a row: with `pack`, best-fit decreasing into rows no longer than the longest unit (so a
    batch has almost no padding), else one unit per row."""
    if not pack:
        return [[i] for i in range(len(lengths))]
    capacity = max(lengths, default=0)
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [r for r in range(len(rows)) if free[r] >= lengths[i]]
        if fits:
            best = min(fits, key=lambda r: free[r])
            rows[best].append(i)
            free[best] -= lengths[i]
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    return rows


def pack_shared_prefix(units: list[Unit], rows: list[list[int]] | None = None, pad_id: int = 0) -> PackedSequences:
    """Lay out each unit (prompt, [completions]) as prompt then its completions, `rows` saying which units share a
    row (default: one unit per row). Every prompt needs at least one token."""
    rows = rows if rows is not None else [[i] for i in range(len(units))]
    device = units[0][0].device
    lengths = [sum(unit_length(units[u]) for u in row) for row in rows]
    width = max(lengths)
    ids = torch.full((len(rows), width), pad_id, dtype=units[0][0].dtype, device=device)
    positions = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    allowed = torch.zeros(len(rows), width, width, dtype=torch.bool, device=device)
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    placements: list[Placement | None] = [None] * len(units)
    for r, row in enumerate(rows):
        offset = 0
        for u in row:
            prompt, completions = units[u]
            p = len(prompt)
            if p == 0:
                raise ValueError("a shared prefix needs a prompt of at least one token")
            ids[r, offset : offset + p] = prompt
            positions[r, offset : offset + p] = torch.arange(p, device=device)
            allowed[r, offset : offset + p, offset : offset + p] = causal[:p, :p]
            start, scored = offset + p, []
            for completion in completions:
                n = len(completion)
                end = start + n
                ids[r, start:end] = completion
                positions[r, start:end] = torch.arange(p, p + n, device=device)
                allowed[r, start:end, offset : offset + p] = True
                allowed[r, start:end, start:end] = causal[:n, :n]
                # Token k of the completion is predicted at the column before it: the prompt's last for k = 0.
                at = torch.arange(start - 1, end - 1, device=device)
                if n:
                    at[0] = offset + p - 1
                scored.append((at, completion))
                start = end
            placements[u] = Placement(r, offset, start - offset, scored)
            offset = start
        padding = torch.arange(lengths[r], width, device=device)
        allowed[r, padding, padding] = True  # padding attends to itself only: no empty softmax row
    return PackedSequences(ids, positions, allowed, lengths, placements)


def attention_mask_4d(model, allowed: torch.Tensor) -> torch.Tensor:
    """(batch, 1, q, k) from a "may attend" mask, as the model's attention takes it: boolean for SDPA, additive
    for eager attention (flash attention takes no such mask)."""
    implementation = model.config._attn_implementation
    if implementation.startswith("flash"):
        raise ValueError(f"a shared prefix needs sdpa or eager attention, not attn_implementation '{implementation}'")
    if implementation == "sdpa":
        return allowed[:, None]
    dtype = model.get_input_embeddings().weight.dtype
    dtype = dtype if dtype.is_floating_point else torch.float32
    additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return additive.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def attention_masks(model, packed: PackedSequences) -> torch.Tensor | dict[str, torch.Tensor]:
    """The mask the model's attention takes for packed rows. A given 4-D mask bypasses the model's own masks, so a
    sliding window (Mistral, Qwen2 with use_sliding_window, Gemma 2/3) is applied here, by position ids as the model
    applies it by index: a query sees a key fewer than `sliding_window` positions back. A model whose layers differ
    (`layer_types`) takes one mask per kind of layer."""
    config = model.config.get_text_config()
    window = getattr(config, "sliding_window", None)
    kinds = set(getattr(config, "layer_types", None) or ())
    if kinds - {"full_attention", "sliding_attention"}:
        raise ValueError(
            f"a shared prefix handles full and sliding-window attention, not {sorted(kinds)}: set share_prompt, "
            "pack_sequences and frozen_prefix to false"
        )
    full = attention_mask_4d(model, packed.allowed)
    if window is None or (kinds and "sliding_attention" not in kinds):
        return full
    near = packed.positions[:, :, None] - packed.positions[:, None, :] < window
    sliding = attention_mask_4d(model, packed.allowed & near)
    return {"full_attention": full, "sliding_attention": sliding} if kinds else sliding


def run_backbone(model, packed: PackedSequences, ids: torch.Tensor | None = None, copies: int = 1) -> torch.Tensor:
    """The last hidden states of the model's backbone on packed rows; with `copies`, the layout repeated that many
    times over `ids` (the token ids of every copy, stacked)."""
    masks = attention_masks(model, packed)
    if isinstance(masks, dict):
        mask = {kind: each.repeat(copies, 1, 1, 1) for kind, each in masks.items()}
    else:
        mask = masks.repeat(copies, 1, 1, 1)
    return model.base_model(
        input_ids=packed.ids if ids is None else ids,
        attention_mask=mask,
        position_ids=packed.positions.repeat(copies, 1),
        use_cache=False,
    ).last_hidden_state


def lm_head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head on some hidden states, with the logit scale and soft-capping some models apply after it."""
    config = model.config.get_text_config()
    head = model.get_output_embeddings()
    logits = head(hidden.to(head.weight.device))
    if getattr(config, "logit_scale", None) is not None:
        logits = logits * config.logit_scale
    if getattr(config, "final_logit_softcapping", None) is not None:
        cap = config.final_logit_softcapping
        logits = torch.tanh(logits / cap) * cap
    return logits


__all__ = [
    "PackedSequences",
    "Placement",
    "Unit",
    "attention_mask_4d",
    "attention_masks",
    "lm_head_logits",
    "pack_rows",
    "pack_shared_prefix",
    "run_backbone",
    "unit_length",
]
