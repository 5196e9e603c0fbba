"""Many edits in one run: K head sets trained in one model pass per step.

An edit has a few thousand parameters, but each step runs the whole model forward and backward. Training K edits
(the paper's 16 random head sets, or 24 single heads) as K separate runs repeats that K times over the same data.
Here the batch is replicated K times, one block of rows per edit, and a forward pre-hook on each output projection
applies edit k to block k only:

    o'[k] = o[k] + <a_k, o[k]> (m_k * b_k)

so one pass computes all K edits' losses. With locedit's pair scoring (`training.pair_logps`, on by default) the
copies are not run from the embeddings up: below each edit's lowest layer every copy is the base model's, so the
rows of edit k start at edit k's lowest layer from the stored frozen prefix (the bank tells the scorer which rows
start where: `replicas`, `first_layers` and `running`), and K edits at single heads cost about what their K
separate steps cost from their own layers, in one batch per start layer.

Every edit ends where its separate run would have ended:
- the data order is the separate runs' (same seed, same data: all runs see the same batches);
- the loss is the sum of the K per-edit IPO losses, so edit k's gradient is exactly its own run's gradient;
- AdamW is elementwise, so stacking the K edits' vectors keeps K independent optimizer states;
- gradients are clipped per edit (each edit's own norm), as its own run would clip them;
- a starts from the same values (locedit.edit.initial_read_vector), the reference log-probs are computed once.
It then saves K ordinary edit directories, loadable with `load_edit` like any other.

Why not K PEFT adapters: PEFT applies one active adapter set to a whole batch; routing rows to adapters
(`adapter_names=`) runs a Python loop per adapter per layer and cannot share one optimizer step cleanly.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from trl import DPOTrainer

from ..core.errors import HeadSpecError
from ..core.files import atomic_path, read_json, write_json_atomic
from ..edit import HeadEditConfig, head_mask, initial_read_vector
from ..heads import HeadSpec, draw_recipe, heads_by_layer
from ..models.layout import AttentionLayout
from ..rundir import default_output_dir, split_question_ids, write_metrics, write_run_description
from .pair_logps import PairScoringMixin
from .reference import CachedReferenceMixin
from .tracking import group_tracked_runs
from .trainer import divergence, require_ipo, train_and_validate, training_inputs

BANK_FILE = "locedit_bank.safetensors"
EDIT_LOSSES_FILE = "locedit_edit_losses.json"


class EditBank(nn.Module):
    """The a, b vectors and head masks of K edits, stacked per edited layer as (K, in_features) tensors."""

    def __init__(
        self,
        layout: AttentionLayout,
        in_features: int,
        head_sets: list[list[tuple[int, int]]],
        edit_read: str = "all",
        edit_strength: str = "adaptive",
        init_seed: int = 0,
    ):
        super().__init__()
        self.num_edits = len(head_sets)
        self.num_heads = layout.num_heads
        self.edit_read, self.edit_strength = edit_read, edit_strength
        self.layers = sorted({layer for heads in head_sets for layer, _ in heads})
        self.a = nn.ParameterDict()
        self.b = nn.ParameterDict()
        for layer in self.layers:
            masks = torch.stack(
                [head_mask(in_features, layout.num_heads, heads_by_layer(heads).get(layer, [])) for heads in head_sets]
            )
            self.register_buffer(f"mask_{layer}", masks, persistent=False)
            self.b[str(layer)] = nn.Parameter(torch.zeros(self.num_edits, in_features))
            if edit_strength == "adaptive":
                start = initial_read_vector(in_features, layer, init_seed)
                self.a[str(layer)] = nn.Parameter(start.repeat(self.num_edits, 1))
        # Each edit's lowest layer: its rows need nothing computed below it (PairScorer's routing).
        first = [min(layer for layer, _ in heads) for heads in head_sets]
        self.register_buffer("first_layers", torch.tensor(first), persistent=False)
        self.replicated = False
        self.pairs_per_edit = 0
        self.row_edits: torch.Tensor | None = None

    def mask(self, layer: int) -> torch.Tensor:
        return getattr(self, f"mask_{layer}")

    def head_norms(self) -> list[dict[tuple[int, int], float]]:
        """Each edit's norm of m * b at each of its heads (what it adds to that head's output), as
        `locedit.edit.edit_norms` gives one edit's."""
        norms: list[dict[tuple[int, int], float]] = [{} for _ in range(self.num_edits)]
        for layer in self.layers:
            masked = (self.b[str(layer)] * self.mask(layer)).detach().float()
            per_head = masked.reshape(self.num_edits, self.num_heads, -1).norm(dim=2)
            edited = self.mask(layer).reshape(self.num_edits, self.num_heads, -1).amax(dim=2) > 0
            for edit, head in edited.nonzero().tolist():
                norms[edit][(layer, head)] = float(per_head[edit, head])
        return norms

    def edit_vectors(self, layer: int, edit: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(a, b) of one edit at one layer, as a saved edit stores them (b unmasked; the mask comes from its heads)."""
        a = self.a[str(layer)][edit] if self.edit_strength == "adaptive" else None
        return a, self.b[str(layer)][edit]

    def sequence_edits(self, num_sequences: int) -> torch.Tensor:
        """The edit of each sequence of a replicated batch: rows [chosen x K; rejected x K] (or one sequence per
        pair, [edits 0..K-1], when the prompt is shared), in blocks of `pairs_per_edit`."""
        return (torch.arange(num_sequences) // self.pairs_per_edit) % self.num_edits

    def replicas(self) -> int | None:
        """PairScorer's routing: K inside `replicating` (the batch is K copies of its pairs, copy k for edit k),
        None outside it (the reference pass runs the base model)."""
        return self.num_edits if self.replicated else None

    @contextlib.contextmanager
    def running(self, row_edits: list[int]):
        """Within this context row r of the model's batch gets edit row_edits[r] (PairScorer's routing)."""
        self.row_edits = torch.tensor(row_edits, device=self.first_layers.device)
        try:
            yield
        finally:
            self.row_edits = None

    def input_delta(self, o: torch.Tensor, layer: int) -> torch.Tensor:
        """The change of a projection input o (rows of a replicated batch): each row gets its own edit."""
        edits = self.row_edits if self.row_edits is not None else self.sequence_edits(o.shape[0]).to(o.device)
        mask = self.mask(layer)
        shape = (o.shape[0],) + (1,) * (o.dim() - 2) + (o.shape[-1],)
        b = (self.b[str(layer)] * mask)[edits].view(shape)
        if self.edit_strength == "constant":
            return b.expand_as(o).to(o.dtype)
        a = self.a[str(layer)]
        if self.edit_read == "heads":
            a = a * mask
        strength = (o.to(a.dtype) * a[edits].view(shape)).sum(-1, keepdim=True)
        return (strength * b).to(o.dtype)

    @contextlib.contextmanager
    def replicating(self, pairs_per_edit: int):
        """Within this context, inputs are replicated per edit (blocks of `pairs_per_edit` pairs) and each block gets
        its own edit."""
        self.replicated, self.pairs_per_edit = True, pairs_per_edit
        try:
            yield
        finally:
            self.replicated = False

    def attach(self, model: nn.Module, layout: AttentionLayout) -> list:
        """Register the bank on the model and a forward pre-hook on every edited output projection."""
        model.add_module("locedit_bank", self)
        handles = []
        for layer in self.layers:
            projection = model.get_submodule(layout.projection_name(layer))

            def hook(module, args, layer=layer):
                if not self.replicated:
                    return None
                return (args[0] + self.input_delta(args[0], layer), *args[1:])

            handles.append(projection.register_forward_pre_hook(hook))
        return handles

    def clip_per_edit(self, max_norm: float) -> torch.Tensor:
        """Clip each edit's gradient to its own norm, as torch.nn.utils.clip_grad_norm_ does in a separate run.

        Returns the K pre-clip norms.
        """
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros(self.num_edits)
        # Summed one parameter at a time, in the bank's order: an edit's rows of the layers it does not edit are
        # exact zeros, so its norm does not depend on the other edits of the bank (a batched sum over a stack of
        # another length would round differently).
        squares = torch.zeros_like(grads[0][:, 0], dtype=torch.float32)  # (K,)
        for grad in grads:
            squares = squares + grad.float().pow(2).sum(dim=1)
        norms = squares.sqrt()
        scale = torch.clamp(max_norm / (norms + 1e-6), max=1.0)
        for grad in grads:
            grad.mul_(scale.to(grad.dtype).unsqueeze(1))
        return norms

    def save_edit(self, edit: int, config: HeadEditConfig, layout: AttentionLayout, output_dir: str) -> None:
        """Write edit `edit` as an ordinary PEFT edit directory (the files PeftModel.save_pretrained writes)."""
        os.makedirs(output_dir, exist_ok=True)
        tensors = {}
        for layer in heads_by_layer([tuple(h) for h in config.heads]):
            prefix = f"base_model.model.{layout.projection_name(layer)}"
            a, b = self.edit_vectors(layer, edit)
            if a is not None:
                tensors[f"{prefix}.lora_A.weight"] = a.detach().float().cpu().clone()[None]
            tensors[f"{prefix}.lora_B.weight"] = b.detach().float().cpu().clone()[None]
        with atomic_path(os.path.join(output_dir, "adapter_model.safetensors")) as tmp:
            save_file(tensors, tmp, metadata={"format": "pt"})
        config.save_pretrained(output_dir)


class MultiEditTrainer(PairScoringMixin, CachedReferenceMixin, DPOTrainer):
    """DPOTrainer for an EditBank attached to the (frozen) base model: replicates each batch per edit and clips each
    edit's gradient on its own. With b = 0 at the start the model is the reference, whose log-probs are precomputed.
    """

    def __init__(self, *args, bank: EditBank, edit_names: list[str] | None = None, **kwargs):
        require_ipo(kwargs.get("args"))
        self.bank = bank
        self.edit_names = edit_names  # each edit's own curves on the dashboard, under edits/NAME/
        self.pair_scorer_first_layer = bank.first_layers.tolist()
        self.pair_scorer_routing = bank
        super().__init__(*args, **kwargs)
        self._install_pair_scorer()  # when no reference precompute installed it
        group_tracked_runs(self)  # the run in its head family's group on trackio and W&B
        self.edit_losses = EditLosses(bank.num_edits) if plain_ipo(self) else None
        self.edit_evaluations: dict[str, list[float] | None] = {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        replicated = replicate_batch(inputs, self.bank.num_edits)
        with self.bank.replicating(pairs_per_edit=inputs["input_ids"].shape[0] // 2):
            with captured_log_probs(self.accelerator.unwrap_model(model)) as captured:
                loss = super().compute_loss(model, replicated, return_outputs)
        if self.edit_losses is not None:
            losses = pair_ipo_losses(captured["log_probs"], replicated, self.beta).view(self.bank.num_edits, -1)
            reported = loss[0] if return_outputs else loss
            self.edit_losses.add(losses, float(reported.detach()), training=self.model.training)
        # TRL averages over all K*B pairs; the sum of the K per-edit means gives each edit its own run's gradient.
        if return_outputs:
            return loss[0] * self.bank.num_edits, loss[1]
        return loss * self.bank.num_edits

    def evaluation_loop(self, *args, **kwargs):
        if self.edit_losses is not None:
            self.edit_losses.evaluated(self.accelerator)  # what an earlier pass left
        output = super().evaluation_loop(*args, **kwargs)
        if self.edit_losses is not None:
            self.edit_evaluations[kwargs.get("metric_key_prefix", "eval")] = self.edit_losses.evaluated(
                self.accelerator
            )
        return output

    def edit_metrics(self, metrics: dict) -> list[dict]:
        """Each edit's own measures, to replace the run's means in its metrics.json: the IPO loss reached on the
        training pairs (and on the validation pairs), and whether it diverged (`divergence`, on its own logged
        losses). Empty dicts where the per-edit losses are not TRL's (`EditLosses.exact`)."""
        losses = self.edit_losses
        reached = self.edit_evaluations.get("train_pairs")
        if losses is None or not losses.exact or reached is None:
            return [{} for _ in range(self.bank.num_edits)]
        validation = self.edit_evaluations.get("eval")
        own = []
        for edit in range(self.bank.num_edits):
            reason = divergence(losses.logged[edit], reached[edit], metrics["train_loss_start"])
            entry = {
                "train_pairs_loss": reached[edit],
                "train_diverged": reason is not None,
                "train_divergence": reason,
            }
            if validation is not None and "eval_loss" in metrics:
                entry["eval_loss"] = validation[edit]
            own.append(entry)
        return own

    def _clip_grad_norm(self, model):
        return self.bank.clip_per_edit(self.args.max_grad_norm).mean()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self.edit_losses is not None:
            logged = len(self.edit_losses.logged[0])
            self.edit_losses.log(self.accelerator)  # each edit's loss since the last log, as its own run logs it
            if self.edit_names and len(self.edit_losses.logged[0]) > logged:
                for name, losses in zip(self.edit_names, self.edit_losses.logged, strict=True):
                    logs[f"edits/{name}/loss"] = losses[-1]
        if "loss" in logs and self.edit_names:
            for name, norms in zip(self.edit_names, self.bank.head_norms(), strict=True):
                logs.update({f"edits/{name}/L{layer}H{head}/b_norm": norm for (layer, head), norm in norms.items()})
        # Losses are sums over the K edits (see compute_loss); log the mean per edit, comparable to a single run.
        # In place: the trainer returns this same dict from train() and evaluate().
        for key in ("loss", "eval_loss", "train_loss", "train_pairs_loss"):
            if key in logs:
                logs[key] = logs[key] / self.bank.num_edits
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # Checkpoints hold the bank only: the base model is frozen and can be hundreds of times larger.
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        bank = self.accelerator.unwrap_model(self.model).locedit_bank
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in bank.state_dict().items()}, f"{output_dir}/{BANK_FILE}"
        )
        if self.edit_losses is not None:  # each edit's logged losses so far, for its divergence after a resume
            write_json_atomic(os.path.join(output_dir, EDIT_LOSSES_FILE), {"logged": self.edit_losses.logged})

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        bank = self.accelerator.unwrap_model(model or self.model).locedit_bank
        bank.load_state_dict(load_file(os.path.join(resume_from_checkpoint, BANK_FILE)))
        logged = os.path.join(resume_from_checkpoint, EDIT_LOSSES_FILE)
        if self.edit_losses is not None and os.path.isfile(logged):
            self.edit_losses.logged = read_json(logged)["logged"]


def plain_ipo(trainer) -> bool:
    """Whether the trainer's loss is TRL's IPO alone, with nothing that reweights or reshapes it (`pair_ipo_losses`
    computes that one per pair)."""
    return (
        list(trainer.loss_types) == ["ipo"]
        and trainer.ld_alpha is None
        and trainer.f_divergence_type == "reverse_kl"
        and not trainer.use_weighting
        and not trainer.aux_loss_enabled
    )


@contextlib.contextmanager
def captured_log_probs(model: nn.Module):
    """Within the block, the per-token log-probs of the model's last call (TRL's fused-LM-head output) land in the
    yielded dict."""
    captured: dict = {}

    def hook(module, args, output):
        captured["log_probs"] = output.log_probs.detach()

    handle = model.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def pair_ipo_losses(log_probs: torch.Tensor, batch: dict, beta: float) -> torch.Tensor:
    """TRL's IPO loss of each pair of a batch of rows [chosen; rejected] (DPOTrainer._compute_loss, loss_type ipo:
    the log-ratios averaged over each completion's tokens). TRL keeps only their mean; an edit's own loss is the
    mean over its rows."""
    completion_mask = batch["completion_mask"]
    logps = log_probs[:, -(completion_mask.shape[1] - 1) :].float().sum(dim=1)
    chosen, rejected = logps.chunk(2, dim=0)
    chosen_length, rejected_length = completion_mask.sum(dim=1).clamp(min=1.0).chunk(2, dim=0)
    chosen_score = (chosen - batch["ref_chosen_logps"].float()) / chosen_length
    rejected_score = (rejected - batch["ref_rejected_logps"].float()) / rejected_length
    return (chosen_score - rejected_score - 1 / (2 * beta)) ** 2


class EditLosses:
    """Each edit's own IPO loss in a multi-edit run: the mean over the logging interval of its training steps (as a
    separate run would log it) and over an evaluation's pairs. A run's logged loss is the mean over its edits; each
    edit's divergence and reached loss are its own. Kept only while the per-pair losses reproduce TRL's loss."""

    def __init__(self, num_edits: int):
        self.num_edits = num_edits
        self.logged: list[list[float]] = [[] for _ in range(num_edits)]
        self.exact = True
        self._train = torch.zeros(2, num_edits, dtype=torch.float64)  # (sum of step means, steps)
        self._eval = torch.zeros(2, num_edits, dtype=torch.float64)  # (sum of pair losses, pairs)

    def add(self, losses: torch.Tensor, reported: float, training: bool) -> None:
        mean = float(losses.mean())
        if abs(mean - reported) > 1e-3 * max(1.0, abs(reported)):
            self.exact = False  # not TRL's loss (another loss setting): the edits' own losses are not kept
        losses = losses.detach().double().cpu()
        if training:
            self._train += torch.stack([losses.mean(dim=1), torch.ones(self.num_edits, dtype=torch.float64)])
        else:
            self._eval += torch.stack(
                [losses.sum(dim=1), torch.full((self.num_edits,), losses.shape[1], dtype=torch.float64)]
            )

    def log(self, accelerator) -> None:
        totals = accelerator.reduce(self._train.to(accelerator.device), reduction="sum").cpu()
        if float(totals[1].min()) > 0:
            for edit, value in enumerate((totals[0] / totals[1]).tolist()):
                self.logged[edit].append(value)
        self._train.zero_()

    def evaluated(self, accelerator) -> list[float] | None:
        """Each edit's mean loss over the pairs evaluated since the last call (None if not exact)."""
        totals = accelerator.reduce(self._eval.to(accelerator.device), reduction="sum").cpu()
        self._eval.zero_()
        if not self.exact or float(totals[1].min()) == 0:
            return None
        return (totals[0] / totals[1]).tolist()


def replicate_batch(inputs: dict, num_edits: int) -> dict:
    """Rows [chosen; rejected] of B pairs -> [chosen x K; rejected x K], edit-major, with the reference log-probs."""
    replicated = {}
    for key, value in inputs.items():
        if not torch.is_tensor(value) or value.dim() == 0:
            replicated[key] = value
        elif key in ("ref_chosen_logps", "ref_rejected_logps"):
            replicated[key] = value.repeat(num_edits, *([1] * (value.dim() - 1)))
        else:
            halves = value.view(2, value.shape[0] // 2, *value.shape[1:])
            expanded = halves.unsqueeze(1).expand(2, num_edits, *halves.shape[1:])
            replicated[key] = expanded.reshape(2 * num_edits * halves.shape[1], *value.shape[1:])
    return replicated


@dataclass
class EditRun:
    """One edit of a multi-edit run: its head spec (with its seed), heads, config and output directory."""

    spec: HeadSpec
    heads: list[tuple[int, int]]
    config: HeadEditConfig
    output_dir: str


def plan_edits(recipe, plan) -> list[EditRun]:
    """Resolve every edit of a multi-edit run (before any weights are loaded)."""
    edit_args, args = recipe.edit, recipe.training
    runs = []
    for spec in plan.spec.edits(plan.layout):
        heads = spec.resolve(plan.layout)
        config = HeadEditConfig.for_heads(
            plan.layout,
            heads,
            edit_read=edit_args.edit_read,
            edit_strength=edit_args.edit_strength,
            init_seed=args.seed,
        )
        name = os.path.basename(default_output_dir(edit_args, args, recipe.name, spec))
        runs.append(EditRun(spec, heads, config, os.path.join(plan.output_dir, name)))
    return runs


def train_multi_edit(
    recipe, plan, model, tokenizer, edits: list[str] | None = None, run_dir: str | None = None
) -> dict:
    """Train every edit of the recipe in one pass per step; write one ordinary run directory per edit.

    `edits` (names of the recipe's edit directories) trains only those, as one multi-edit run of their own in
    `run_dir` (its trainer state and checkpoints; the edits' directories are the recipe's run's all the same): a
    study's share of a family on one process. Each edit's metrics.json holds its own reached IPO loss and divergence
    (`EditLosses`), so an edit's results do not depend on the edits it was trained beside.
    """
    from .. import processes

    args = recipe.training
    if not args.precompute_ref_log_probs:
        raise HeadSpecError("training many edits in one run needs precompute_ref_log_probs: true")
    run_dir = run_dir or plan.output_dir
    every = plan_edits(recipe, plan)
    chosen = None if edits is None else set(edits)
    runs = [run for run in every if chosen is None or os.path.basename(run.output_dir) in chosen]
    positions = {run.output_dir: index for index, run in enumerate(every)}  # each edit's place in the whole run
    layout = plan.layout
    in_features = layout.num_heads * layout.head_dim(model)
    for param in model.parameters():
        param.requires_grad_(False)
    bank = EditBank(
        layout, in_features, [run.heads for run in runs], recipe.edit.edit_read, recipe.edit.edit_strength, args.seed
    ).to(next(model.parameters()).device)
    bank.attach(model, layout)
    if args.gradient_checkpointing:
        model.enable_input_require_grads()

    names = [os.path.basename(run.output_dir) for run in runs]
    trainer = MultiEditTrainer(
        model=model, **training_inputs(plan, args), processing_class=tokenizer, bank=bank, edit_names=names
    )
    metrics = {**train_and_validate(trainer, run_dir), "data_rows_skipped": plan.data_rows_skipped}
    trainer.save_state()
    own = trainer.edit_metrics(metrics)
    if processes.state().is_main_process:
        question_ids = split_question_ids(plan.splits)
        for index, run in enumerate(runs):
            write_run_description(
                run.output_dir,
                draw_recipe(recipe, run.spec),
                run.heads,
                layout,
                plan.splits,
                plan.located_dirs,
                question_ids,
                spec=run.spec,
            )
            bank.save_edit(index, run.config, layout, run.output_dir)
            own_metrics = {**own[index], "multi_edit_run": run_dir, "multi_edit_index": positions[run.output_dir]}
            write_metrics(run.output_dir, {**metrics, **own_metrics})
        names = [os.path.basename(run.output_dir) for run in runs]
        if run_dir == plan.output_dir:
            write_metrics(run_dir, {**metrics, "edits": names})
        else:  # a share: the recipe's run lists its edits once every share has ended (complete_multi_edit_run)
            write_metrics(run_dir, {**metrics, "share_of": plan.output_dir, "trained_edits": names})
    return metrics
