"""The pairs' log-probs, computed with only the work an edit can change and IPO needs.

TRL's DPOTrainer gets every log-prob it uses from one call, `model(input_ids, attention_mask, labels=...,
fused_lm_head=True)`, on a batch of rows [chosen of each pair; rejected of each pair]. `PairScorer.install` replaces
that call on the base model (the way TRL's own `add_fused_lm_head` does, so PEFT, accelerate and DDP wrappers still
route through it) with the same numbers computed more cheaply; TRL's loss function is untouched. Each saving is a
switch of `LocEditConfig`, exact up to floating-point rounding:

- `score_completions_only`: the LM head and log-softmax run only at the positions whose next token is a completion
  token (TRL's fused head skips the others only with Triton on CUDA/XPU), and the logged entropy, mean logits and
  top-1 accuracy are computed only in evaluation, not in the training step.
- `share_prompt`: each pair is one sequence [prompt, chosen, rejected] with a block attention mask (the rejected
  tokens see the prompt and themselves, never the chosen ones) and position ids that restart after the prompt, as in
  "Accelerating Direct Preference Optimization with Prefix Sharing" (Wang et al. 2024): the prompt runs once per pair,
  and gradients flow through it to both answers.
- `pack_sequences`: the sequences of a batch are laid side by side in rows no longer than its longest, each seeing
  only itself (block mask, positions restarting at 0): almost no padding, with the same batches as before.
- `frozen_prefix`: below the lowest edited layer the model is the base model, frozen and unedited (dropout off), so
  the hidden states entering that layer are computed once per sequence, kept (in memory up to
  `frozen_prefix_max_memory_gb`, then on disk) and fed straight to that layer; a step runs only the layers at and
  above it. They are computed for every training pair right after the reference log-probs (the run says how long
  it took and what it keeps; `frozen_prefix_*` in metrics.json), otherwise at a pair's first visit. Under data
  parallel training (`accelerate launch -m locedit.train`) each process keeps only the prefix of the pairs it
  trains on, each computed at its first visit.

Batches whose chosen and rejected rows do not share a prompt (`truncation_mode: keep_end` cut them differently) are
scored without prompt sharing.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass

import torch
from torch import nn
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices
from transformers.utils import ModelOutput

from ..core.args import PAIR_SCORING_SWITCHES
from ..core.cache import cache_root
from ..core.errors import DamagedFileError, say_damaged
from ..core.files import atomic_path
from ..models.layout import AttentionLayout, unwrap_model
from ..models.prefix_sharing import (
    PackedSequences,
    Unit,
    lm_head_logits,
    pack_rows,
    pack_shared_prefix,
    run_backbone,
    unit_length,
)


@dataclass
class PairLogps(ModelOutput):
    """What TRL's `_compute_loss` reads from a fused-LM-head call: per-token fields of shape (rows, seq_len - 1),
    zero off the completion tokens."""

    loss: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the hidden states it needs are captured."""


class _PassThrough(nn.Module):
    """Stands in for a frozen decoder layer below the edit: returns the hidden states it is given."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class PrefixStore:
    """Hidden states entering the lowest edited layer, per sequence key: in memory up to a budget, then on disk.

    A file on disk is this run's own (a directory of its own, removed at the end; one left by a killed run is never
    read): written whole or not at all, and checked against its size before use. One cut short or removed meanwhile
    is computed again (`__contains__` says it is not kept), with one line; one that still fails to read is an error
    line, never states taken as whole."""

    def __init__(self, max_memory_bytes: float):
        self.max_memory_bytes = max_memory_bytes
        self.memory: dict[bytes, torch.Tensor] = {}
        self.on_disk: dict[bytes, tuple[int, int]] = {}  # key -> (the file's size as written, the states' bytes)
        self.memory_bytes = 0
        self.disk_bytes = 0
        self._dir: str | None = None

    def __contains__(self, key: bytes) -> bool:
        if key in self.memory:
            return True
        if key not in self.on_disk:
            return False
        problem = self._damage(key)
        if problem is None:
            return True
        say_damaged(f"frozen prefix file '{self._path(key)}'", problem)
        self._forget(key)
        return False

    def __len__(self) -> int:
        return len(self.memory) + len(self.on_disk)

    def put(self, key: bytes, hidden: torch.Tensor) -> None:
        hidden = hidden.detach().to("cpu", copy=True).contiguous()
        size = hidden.numel() * hidden.element_size()
        self._forget(key)  # stored again (after a damaged file of its unit): counted once
        if self.memory_bytes + size <= self.max_memory_bytes:
            self.memory[key] = hidden
            self.memory_bytes += size
            return
        if self._dir is None:
            root = os.path.join(cache_root(), "frozen_prefix")
            os.makedirs(root, exist_ok=True)
            self._dir = tempfile.mkdtemp(dir=root)
            print(
                f"locedit: frozen prefix over {self.max_memory_bytes / 2**30:.2f} GiB in memory; the rest goes to "
                f"{self._dir} (removed at the end of the run)",
                file=sys.stderr,
                flush=True,
            )
        with atomic_path(self._path(key)) as tmp:  # a write that stops (a full disk) leaves no file behind
            torch.save(hidden, tmp)
        self.on_disk[key] = (os.path.getsize(self._path(key)), size)
        self.disk_bytes += size

    def get(self, key: bytes) -> torch.Tensor:
        if key in self.memory:
            return self.memory[key]
        problem = self._damage(key)
        if problem is None:
            try:
                return torch.load(self._path(key), weights_only=True)
            except (OSError, RuntimeError, EOFError, ValueError) as err:
                problem = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DamagedFileError(
            f"the frozen prefix file '{self._path(key)}' is damaged ({problem}) after this run wrote it; check the "
            "disk under LOCEDIT_CACHE and run again"
        )

    def _damage(self, key: bytes) -> str | None:
        try:
            size = os.path.getsize(self._path(key))
        except OSError:
            return "it is missing"
        written = self.on_disk[key][0]
        return None if size == written else f"{size} bytes, not {written}"

    def _forget(self, key: bytes) -> None:
        if key in self.memory:
            self.memory_bytes -= self.memory.pop(key).nbytes
        if key in self.on_disk:
            self.disk_bytes -= self.on_disk.pop(key)[1]

    def _path(self, key: bytes) -> str:
        return os.path.join(self._dir, key.hex() + ".pt")

    def close(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        self.memory.clear()
        self.on_disk.clear()

    def describe(self) -> str:
        text = f"{len(self)} entries (a sequence at a layer), {self.memory_bytes / 2**20:.1f} MiB in memory"
        if self.on_disk:
            text += f", {self.disk_bytes / 2**20:.1f} MiB on disk"
        return text


def scorer_switches(args) -> dict:
    """The pair-scoring switches of a training config (TRL's DPOConfig has none of them: all off)."""
    return {name: bool(getattr(args, name, False)) for name in PAIR_SCORING_SWITCHES}


class PairScorer:
    """Computes TRL's fused-LM-head outputs for a preference batch with the switches of `scorer_switches`.

    A batch is cut into units: a pair [prompt, chosen, rejected] when the prompt is shared, else each row
    [prompt, answer]. Units are packed side by side into rows (`pack_sequences`), grouped by the layer they start
    at, run from that layer (entering it from the stored frozen prefix), and only the positions that score a
    completion token go through the LM head (`score_completions_only`).

    Args:
        model: the causal-LM model (a PEFT or accelerate wrapper of one is unwrapped).
        layout: the model's attention layout (where its decoder layers are).
        first_layer: the lowest layer whose computation the edit changes; the frozen prefix is everything below it.
            Many edits in one batch (`routing`) give the first layer of each: an int or a list of ints.
        score_completions_only, share_prompt, frozen_prefix, pack_sequences: the switches (module docstring).
        frozen_prefix_max_memory_gb: memory for the frozen prefix before it spills to disk.
        routing: for a batch of many edits (an EditBank): `replicas()` gives the number of edits K when the batch
            is K identical copies of its pairs, one per edit (`replicate_batch`; None outside a multi-edit step),
            `first_layers[edit]` each edit's lowest layer, and the context manager `running(row_edits)` makes the
            edits apply row by row. The pairs are cut into units and laid out once; each edit's copy starts at its
            own lowest layer, so its rows leave the shared (unedited) stream there.
    """

    def __init__(
        self,
        model: nn.Module,
        layout: AttentionLayout,
        first_layer: int | list[int],
        score_completions_only: bool = True,
        share_prompt: bool = True,
        frozen_prefix: bool = True,
        pack_sequences: bool = True,
        frozen_prefix_max_memory_gb: float = 4.0,
        routing=None,
    ):
        self.model = unwrap_model(model)
        self.layers: nn.ModuleList = self.model.get_submodule(layout.layers_path)
        self.start_layers = sorted({first_layer} if isinstance(first_layer, int) else set(first_layer))
        self.first_layer = self.start_layers[0]
        self.routing = routing
        self.score_completions_only = score_completions_only
        self.share_prompt = share_prompt
        self.pack_sequences = pack_sequences
        self.frozen_prefix = frozen_prefix and self.start_layers[-1] > 0
        self.prefix = PrefixStore(frozen_prefix_max_memory_gb * 2**30) if self.frozen_prefix else None

    def install(self) -> None:
        """Route `model(..., fused_lm_head=True)` through this scorer; any other call is the forward as before."""
        model = self.model
        previous = model.forward

        @functools.wraps(type(model).forward)
        def forward(*args, fused_lm_head=False, labels=None, **kwargs):
            if not fused_lm_head:
                return previous(*args, labels=labels, **kwargs) if labels is not None else previous(*args, **kwargs)
            kwargs.pop("use_cache", None)
            kwargs.pop("num_items_in_batch", None)
            input_ids = kwargs.pop("input_ids", args[0] if args else None)
            attention_mask = kwargs.pop("attention_mask", None)
            unknown = {k for k, v in kwargs.items() if v is not None}
            if unknown:
                raise ValueError(f"locedit's pair scoring takes input_ids, attention_mask and labels, not {unknown}")
            return self(input_ids, attention_mask, labels)

        model.forward = forward

    def close(self) -> None:
        if self.prefix is not None:
            self.prefix.close()

    # -- the computation -----------------------------------------------------------------------------------------

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> PairLogps:
        target_mask = labels[:, 1:] != -100  # position t scores token t + 1, as TRL's shifted log_probs
        copies = self.routing.replicas() if self.routing is not None else None
        first = _first_copy(input_ids, attention_mask, labels, copies) if copies else slice(None)
        units, keys, order = self._units(input_ids[first], attention_mask[first], labels[first])
        if keys is not None:
            self._fill_missing(units, keys)
        # (copy, unit, completion) -> the hidden states (or logits) that score it
        picked = self._scored_states(units, keys, copies)
        # TRL's rows: [chosen of copy 0, ..., chosen of copy K-1; rejected of copy 0, ...].
        half = len(order) // 2
        order = [(k, u, j) for part in (order[:half], order[half:]) for k in range(copies or 1) for u, j in part]
        states = torch.cat([picked[k, u, j] for k, u, j in order])
        targets = torch.cat([units[u][1][j] for _, u, j in order]).to(states.device)
        logits = lm_head_logits(self.model, states) if self.score_completions_only else states
        log_softmax = torch.log_softmax(logits.float(), dim=-1)
        token_logps = log_softmax.gather(-1, targets[:, None]).squeeze(-1)

        def scatter(values: torch.Tensor) -> torch.Tensor:
            return values.new_zeros(target_mask.shape).masked_scatter(target_mask.to(values.device), values)

        loss = -token_logps.sum() / target_mask.sum().clamp(min=1)
        if self.model.training:
            # Only the logs read these (TRL's entropy, mean logits, top-1): not in the training step.
            zeros = torch.zeros(target_mask.shape, device=token_logps.device)
            top1 = torch.zeros(target_mask.shape, dtype=torch.bool, device=token_logps.device)
            return PairLogps(loss, scatter(token_logps), zeros, zeros, zeros, top1)
        with torch.no_grad():
            probs = log_softmax.exp()
            entropy = scatter(-(probs * log_softmax).sum(-1))
            log_sum_sq = scatter(torch.logsumexp(2 * log_softmax, dim=-1))
            mean_logits = scatter(logits.float().mean(-1))
            top1 = scatter(logits.argmax(-1) == targets)
        return PairLogps(loss, scatter(token_logps), entropy, log_sum_sq, mean_logits, top1)

    def fill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> int:
        """Compute and keep the frozen prefix of a batch's units that are not kept yet; returns how many."""
        if not self.frozen_prefix:
            return 0
        units, keys, _ = self._units(input_ids, attention_mask, labels)
        return self._fill_missing(units, keys)

    def _units(self, input_ids, attention_mask, labels):
        """The batch's units, their frozen-prefix keys (None without a frozen prefix) and, in TRL's order of scored
        tokens (rows [chosen of each pair; rejected of each pair], each row's tokens in order), (unit, completion)."""
        lengths = attention_mask.sum(dim=1).tolist()
        half = input_ids.shape[0] // 2
        starts = [_prompt_length(labels[r], lengths[r]) for r in range(input_ids.shape[0])]
        units: list[Unit] = []
        if self.share_prompt and self._prompts_match(input_ids, starts):
            for i in range(half):
                p = starts[i]
                chosen, rejected = input_ids[i, p : lengths[i]], input_ids[half + i, p : lengths[half + i]]
                units.append((input_ids[i, :p], [chosen, rejected]))
            order = [(i, 0) for i in range(half)] + [(i, 1) for i in range(half)]
        else:
            for r in range(input_ids.shape[0]):
                p = max(starts[r], 1)  # with no prompt, the first token is never scored (TRL's shift)
                units.append((input_ids[r, :p], [input_ids[r, p : lengths[r]]]))
            order = [(r, 0) for r in range(len(units))]
        keys = None
        if self.frozen_prefix:
            keys = [
                _key(torch.cat([prompt, *completions]), extra=(len(prompt), *map(len, completions)))
                for prompt, completions in units
            ]
        return units, keys, order

    @staticmethod
    def _prompts_match(input_ids, starts) -> bool:
        """Whether each chosen row and its rejected row start with the same prompt (keep_end truncation can differ)."""
        half = input_ids.shape[0] // 2
        for i in range(half):
            p = starts[i]
            if p == 0 or p != starts[half + i] or not torch.equal(input_ids[i, :p], input_ids[half + i, :p]):
                return False
        return True

    def _groups(self, copies: int | None) -> list[tuple[int, list[int] | None]]:
        """Per start layer, the copies (edits) of a multi-edit batch that start there; one group of no edit
        otherwise."""
        if copies is None:
            return [(self.first_layer, None)]
        by_layer: dict[int, list[int]] = {}
        for edit in range(copies):
            by_layer.setdefault(int(self.routing.first_layers[edit]), []).append(edit)
        return sorted(by_layer.items())

    def _scored_states(self, units: list[Unit], keys, copies: int | None) -> dict[tuple[int, int, int], torch.Tensor]:
        """For each (copy, unit, completion), the last hidden states (or, scoring every position, the logits) at the
        positions that predict its tokens."""
        rows = pack_rows([unit_length(unit) for unit in units], self.pack_sequences)
        packed = pack_shared_prefix(units, rows)
        num_rows = packed.ids.shape[0]
        picked = {}
        for layer, edits in self._groups(copies):
            # The copies that start at this layer run together in one layout, built once, each row with its edit.
            running = (
                contextlib.nullcontext()
                if edits is None
                else self.routing.running([edit for edit in edits for _ in range(num_rows)])
            )
            with running:
                hidden = self._run_packed(packed, len(edits or [0]), layer, keys)
            if not self.score_completions_only:
                hidden = lm_head_logits(self.model, hidden)  # every position, as TRL does off Triton devices
            for c, edit in enumerate(edits or [0]):
                for u, placement in enumerate(packed.placements):
                    for j, (at, _) in enumerate(placement.scored):
                        picked[edit, u, j] = hidden[placement.row + c * num_rows, at.to(hidden.device)]
        return picked

    def _run_packed(self, packed: PackedSequences, copies: int, layer: int, keys) -> torch.Tensor:
        """The last hidden states of `copies` copies of the rows of `packed`, from `layer` on (entering it from the
        stored frozen prefix)."""
        ids = packed.ids.repeat(copies, 1) if copies > 1 else None
        call = functools.partial(run_backbone, self.model, packed, ids, copies)
        if keys is None or layer == 0:
            return call()
        entering = None
        for key, placement in zip(keys, packed.placements, strict=True):
            stored = self.prefix.get(key + _layer_key(layer))
            if entering is None:
                entering = torch.zeros(*packed.ids.shape, stored.shape[-1], dtype=stored.dtype)
            entering[placement.row, placement.offset : placement.offset + placement.length] = stored
        return self._run_from_layer(call, layer, entering.repeat(copies, 1, 1).to(packed.ids.device))

    def _fill_missing(self, units: list[Unit], keys) -> int:
        """Store the hidden states entering every start layer above 0 of the units not stored yet."""
        layers = [layer for layer in self.start_layers if layer > 0]
        first_seen = {}
        for u, key in enumerate(keys):
            # Every layer's states, not the last one's only: a file on disk of any of them may be damaged.
            if any(key + _layer_key(layer) not in self.prefix for layer in layers):
                first_seen.setdefault(key, u)  # copies of a unit (a multi-edit batch) are computed once
        if not first_seen:
            return 0
        missing = list(first_seen.values())
        rows = pack_rows([unit_length(units[u]) for u in missing], self.pack_sequences)
        packed = pack_shared_prefix([units[u] for u in missing], rows)
        with torch.no_grad():
            entering = self._run_until_layers(functools.partial(run_backbone, self.model, packed), layers)
        for layer in layers:  # the last layer last: its key says the unit is stored
            for u, placement in zip(missing, packed.placements, strict=True):
                states = entering[layer][placement.row, placement.offset : placement.offset + placement.length]
                self.prefix.put(keys[u] + _layer_key(layer), states)
        return len(first_seen)

    def _run_until_layers(self, call, layers: list[int]) -> dict[int, torch.Tensor]:
        """The hidden states entering each of `layers`; the forward pass stops at the last of them."""
        captured = {}

        def capture(module, args, kwargs, layer):
            captured[layer] = args[0] if args else kwargs["hidden_states"]
            if layer == layers[-1]:
                raise _StopForward

        handles = [
            self.layers[layer].register_forward_pre_hook(functools.partial(capture, layer=layer), with_kwargs=True)
            for layer in layers
        ]
        try:
            call()
        except _StopForward:
            return captured
        finally:
            for handle in handles:
                handle.remove()
        raise RuntimeError("the forward pass never reached the lowest edited layer")

    def _run_from_layer(self, call, layer: int, entering: torch.Tensor) -> torch.Tensor:
        """The backbone with the layers below `layer` passed over and `entering` fed to `layer`."""

        def replace(module, args, kwargs):
            if args:
                return (entering.to(args[0].dtype), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": entering.to(kwargs["hidden_states"].dtype)}

        handle = self.layers[layer].register_forward_pre_hook(replace, with_kwargs=True)
        saved = {i: self.layers[i] for i in range(layer)}
        try:
            for i in saved:
                self.layers[i] = _PassThrough()
            return call()
        finally:
            for i, module in saved.items():
                self.layers[i] = module
            handle.remove()


def _first_copy(input_ids, attention_mask, labels, copies: int) -> list[int]:
    """The rows of the first of `copies` identical copies of a batch's pairs (rows [chosen x K; rejected x K])."""
    rows, width = input_ids.shape
    pairs = rows // (2 * copies)
    for tensor in (input_ids, attention_mask, labels):
        blocks = tensor.view(2, copies, pairs, width)
        if not torch.equal(blocks, blocks[:, :1].expand_as(blocks)):
            raise ValueError(f"a multi-edit batch must hold {copies} identical copies of its pairs (replicate_batch)")
    return [*range(pairs), *range(copies * pairs, copies * pairs + pairs)]


def _layer_key(layer: int) -> bytes:
    return layer.to_bytes(2, "little")


def _prompt_length(labels_row: torch.Tensor, length: int) -> int:
    """Index of a row's first completion token (its length when the completion was truncated away)."""
    completion = (labels_row[:length] != -100).nonzero()
    return int(completion[0]) if len(completion) else length


def _key(ids: torch.Tensor, extra: tuple = ()) -> bytes:
    digest = hashlib.blake2b(ids.detach().cpu().numpy().tobytes(), digest_size=16)
    digest.update(repr(extra).encode())
    return digest.digest()


class SeededLengthGroupedSampler(LengthGroupedSampler):
    """transformers' length grouping (seeded shuffle, then sorted within mega-batches of 50 batches), with a
    generator seeded by (seed, epoch): the same order in every run with the same seed and data, and after a resume."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


# TRL's per-step measures that only the logs use; not computed in a training step with a PairScorer.
LOG_ONLY_MEASURES = ("entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy")


class PairScoringMixin:
    """For a DPOTrainer subclass: pairs scored by a PairScorer (the config's switches) and batches grouped by length
    (`train_sampling_strategy: group_by_length`, transformers' own switch) with a seeded, resumable order.

    Set `pair_scorer_first_layer` (the lowest edited layer) before `DPOTrainer.__init__`: the scorer is installed
    before the reference log-probs are computed, so they are computed the cheaper way too, and the frozen prefix of
    every training pair is computed right after them, so that training steps only run the layers above it.
    """

    pair_scorer: PairScorer | None = None
    pair_scorer_first_layer: int | list[int] = 0
    pair_scorer_routing = None

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        self._install_pair_scorer()
        dataset = super()._precompute_ref_logps(dataset, name, batch_size)
        if name != "train":
            return dataset
        if self.accelerator.num_processes == 1:
            self._fill_frozen_prefix(dataset, batch_size)
        elif self.pair_scorer is not None and self.pair_scorer.prefix is not None and self.accelerator.is_main_process:
            # Data parallel: each process trains on its own batches, so it computes (and keeps) the prefix of those
            # pairs only, at their first visit; filling the whole set would be N times the work and memory.
            print("locedit: frozen prefix: each process keeps that of the pairs it trains on, from their first visit")
        return dataset

    def _fill_frozen_prefix(self, dataset, batch_size: int) -> None:
        """The frozen prefix of every pair of `dataset` not kept yet, longest batches first, without gradients."""
        scorer = self.pair_scorer
        if scorer is None or scorer.prefix is None or len(dataset) == 0:
            return
        import time

        start, computed = time.perf_counter(), 0
        lengths = self._pair_lengths(dataset)
        order = sorted(range(len(dataset)), key=lengths.__getitem__, reverse=True)
        device = self.accelerator.device
        with torch.no_grad():
            for first in range(0, len(order), batch_size):
                rows = dataset.select(order[first : first + batch_size])
                batch = self.data_collator([rows[i] for i in range(len(rows))])
                ids, attention = batch["input_ids"].to(device), batch["attention_mask"].to(device)
                labels = ids.masked_fill(batch["completion_mask"].to(device) == 0, -100)
                computed += scorer.fill(ids, attention, labels)
        if self.accelerator.is_main_process and computed:
            layers = ", ".join(str(layer) for layer in scorer.start_layers if layer)
            print(
                f"locedit: frozen prefix (entering layer {layers}) of {computed} sequences in "
                f"{time.perf_counter() - start:.1f} s; kept: {scorer.prefix.describe()}",
                flush=True,
            )

    def _install_pair_scorer(self) -> None:
        switches = scorer_switches(self.args)
        if self.pair_scorer is not None or not any(switches.values()):
            return
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise ValueError(
                f"locedit's pair scoring ({', '.join(PAIR_SCORING_SWITCHES)}) runs parts of the model on their own "
                "and does not work under FSDP or DeepSpeed; set them to false"
            )
        model = self.accelerator.unwrap_model(self.model)
        self.pair_scorer = PairScorer(
            model,
            AttentionLayout.from_model(model),
            self.pair_scorer_first_layer,
            routing=self.pair_scorer_routing,
            frozen_prefix_max_memory_gb=getattr(self.args, "frozen_prefix_max_memory_gb", 4.0),
            **switches,
        )
        self.pair_scorer.install()

    def pair_scoring_metrics(self) -> dict:
        scorer = self.pair_scorer
        if scorer is None or scorer.prefix is None:
            return {}
        return {
            "frozen_prefix_entries": len(scorer.prefix),
            "frozen_prefix_memory_mib": scorer.prefix.memory_bytes / 2**20,
            "frozen_prefix_disk_mib": scorer.prefix.disk_bytes / 2**20,
        }

    def close_pair_scorer(self) -> None:
        if self.pair_scorer is not None:
            self.pair_scorer.close()

    def _pair_lengths(self, dataset) -> list[int]:
        """Tokens each pair puts in a batch: prompt + both answers when the prompt is shared, else prompt + longer."""
        shared = self.pair_scorer is not None and self.pair_scorer.share_prompt
        cap = self.args.max_length
        lengths = []
        for prompt, chosen, rejected in zip(
            dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"], strict=True
        ):
            c, r = len(prompt) + len(chosen), len(prompt) + len(rejected)
            if cap is not None:
                c, r = min(c, cap), min(r, cap)
            lengths.append(c + r - len(prompt) if shared else max(c, r))
        return lengths

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy != "group_by_length" or "prompt_ids" not in dataset.column_names:
            return super()._get_train_sampler(train_dataset)
        batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return SeededLengthGroupedSampler(batch, self._pair_lengths(dataset), seed)

    def _get_eval_sampler(self, eval_dataset):
        if self.args.train_sampling_strategy == "group_by_length" and "prompt_ids" in eval_dataset.column_names:
            # Sorted by length: evaluation order does not matter, padding does.
            lengths = self._pair_lengths(eval_dataset)
            return sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)
        return super()._get_eval_sampler(eval_dataset)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.pair_scorer is not None and self.model.training:
            for name in LOG_ONLY_MEASURES:
                self._metrics["train"].pop(name, None)
        super().log(logs, start_time)


__all__ = [
    "PairLogps",
    "PairScorer",
    "PairScoringMixin",
    "PrefixStore",
    "SeededLengthGroupedSampler",
    "scorer_switches",
]
