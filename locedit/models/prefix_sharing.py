"""Several completions of one prompt in one sequence: [prompt, completion 1, ..., completion n].

Each completion attends to the prompt and to itself (never to another completion), and its position ids go on from
the prompt's end, so every token sees exactly what it would see in its own sequence prompt + completion; the prompt
runs once ("Accelerating Direct Preference Optimization with Prefix Sharing", Wang et al. 2024). Training packs a
pair's two answers this way, MC evaluation a question's choices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PackedSequences:
    """A padded batch of packed sequences.

    ids, positions: (sequences, width); allowed: (sequences, width, width), True where a query may attend to a key;
    lengths: each sequence's real length; scored[i][j]: (positions, targets) of completion j of sequence i, the
    positions whose hidden states predict the completion's tokens, in order.
    """

    ids: torch.Tensor
    positions: torch.Tensor
    allowed: torch.Tensor
    lengths: list[int]
    scored: list[list[tuple[torch.Tensor, torch.Tensor]]]


def pack_shared_prefix(sequences: list[tuple[torch.Tensor, list[torch.Tensor]]], pad_id: int = 0) -> PackedSequences:
    """Pack each (prompt ids, [completion ids, ...]) into one sequence. Every prompt needs at least one token."""
    device = sequences[0][0].device
    lengths = [len(prompt) + sum(len(c) for c in completions) for prompt, completions in sequences]
    width = max(lengths)
    ids = torch.full((len(sequences), width), pad_id, dtype=sequences[0][0].dtype, device=device)
    positions = torch.zeros(len(sequences), width, dtype=torch.long, device=device)
    allowed = torch.zeros(len(sequences), width, width, dtype=torch.bool, device=device)
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    scored = []
    for i, (prompt, completions) in enumerate(sequences):
        p = len(prompt)
        if p == 0:
            raise ValueError("a shared prefix needs a prompt of at least one token")
        ids[i, :p] = prompt
        positions[i, :p] = torch.arange(p, device=device)
        allowed[i, :p, :p] = causal[:p, :p]
        start, spans = p, []
        for completion in completions:
            n = len(completion)
            end = start + n
            ids[i, start:end] = completion
            positions[i, start:end] = torch.arange(p, p + n, device=device)
            allowed[i, start:end, :p] = True
            allowed[i, start:end, start:end] = causal[:n, :n]
            # Token k of the completion is predicted at the position before it: the prompt's last for k = 0.
            at = torch.arange(start - 1, end - 1, device=device)
            if n:
                at[0] = p - 1
            spans.append((at, completion))
            start = end
        padding = torch.arange(lengths[i], width, device=device)
        allowed[i, padding, padding] = True  # padding attends to itself only: no empty softmax row
        scored.append(spans)
    return PackedSequences(ids, positions, allowed, lengths, scored)


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


__all__ = ["PackedSequences", "attention_mask_4d", "lm_head_logits", "pack_shared_prefix"]
