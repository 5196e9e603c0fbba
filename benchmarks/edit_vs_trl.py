"""A locedit edit step against what a user would run instead: TRL's DPOTrainer(loss_type="ipo") with a plain PEFT
LoRA of rank 1 on the attention output projections (for a one-layer edit: on that layer's projection only), on the
same pairs, batch 8. locedit runs with each pair-scoring change alone and with all of them (its default):

- none          locedit's trainer with every switch off (TRL's log-prob computation, the head-masked edit)
- completions   score_completions_only: the LM head only where a completion token is scored
- packing       pack_sequences: a batch's sequences side by side in rows no longer than its longest (no padding)
- prefix        frozen_prefix: the layers below the lowest edited layer computed once per pair
- prompt        share_prompt: each pair's prompt once, [prompt, chosen, rejected] with a block mask
- all           the four above: locedit's default, every one exact
- grouping      train_sampling_strategy group_by_length alone: batches of similar length (not exact: it changes
                which pairs share a step, so it is off by default)
- all+grouping  the default and length grouping

Every variant trains from a fresh trainer on the same pool of pairs (320 by default: length grouping sorts within
mega-batches of up to 50 batches, so it needs a pool as large as a real run's, not just the pairs of the timed
steps), in the same random order but for grouping; the variants take turns in each round (so drift in the
machine's load hits all alike), and each figure is the median step time over rounds and steps (the first step of
each run left out). The reference log-probs (and the frozen prefix) are computed before the timed steps, as both
trainers do before training; TRL's reference pass reads locedit's reference cache (`CachedReferenceMixin`), which
changes nothing in its steps.

The share of the one-thread fp32 matmul rate counts, for the pairs' real tokens, the
work a whole step would do without padding (forward and input-gradient pass through every layer and the LM head at
every position), so it says how far from this CPU's rate the step is in what it achieves, not in what it computes.

    OMP_NUM_THREADS=1 python benchmarks/edit_vs_trl.py            # SmolLM2-135M-Instruct, real TruthfulQA pairs
    python benchmarks/edit_vs_trl.py --small                      # a tiny random Llama, synthetic pairs (CI)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
from common import StepTimer, load, preference_data, training_args
from peft import LoraConfig
from trl import DPOTrainer

from locedit import AttentionLayout, HeadEditConfig, resolve_heads
from locedit.training import LocEditTrainer
from locedit.training.reference import CachedReferenceMixin

# The largest difference allowed between the edits of the exact variants (as multi_edit.py and the pair-scoring
# test bound them): the same batches and every switch exact, so only float32 rounding tells them apart.
EDIT_TOLERANCE = 1e-4
TRUTHFULQA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "truthfulqa", "TruthfulQA.csv")
SWITCHES = ("score_completions_only", "pack_sequences", "frozen_prefix", "share_prompt")
OFF = {**dict.fromkeys(SWITCHES, False), "train_sampling_strategy": "random"}
GROUPING = {"train_sampling_strategy": "group_by_length"}
# The variants whose batches are TRL's (random order, same seed): every switch is exact, so they train the same edit.
SAME_BATCHES = ("none", "completions", "packing", "prefix", "prompt", "all")
VARIANTS = {
    "none": {},
    "completions": {"score_completions_only": True},
    "packing": {"pack_sequences": True},
    "prefix": {"frozen_prefix": True},
    "prompt": {"share_prompt": True},
    "all": dict.fromkeys(SWITCHES, True),
    "grouping": GROUPING,
    "all+grouping": {**dict.fromkeys(SWITCHES, True), **GROUPING},
}


class TRLCachedReference(CachedReferenceMixin, DPOTrainer):
    """TRL's DPOTrainer, its reference pass read from locedit's cache (the steps are TRL's own)."""


def matmul_rate(seconds: float = 2.0) -> float:
    """FLOP/s of a 1024 x 1024 fp32 matmul with the threads torch uses now."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * 1024**3 * count / (time.perf_counter() - start)


def full_step_flops_per_token(model) -> float:
    """Forward plus input-gradient backward through every layer's weights and the LM head, per token."""
    layers = AttentionLayout.from_model(model)
    decoder = model.get_submodule(layers.layers_path)
    layer_params = sum(p.numel() for p in decoder.parameters() if p.dim() == 2)
    head = model.get_output_embeddings().weight.numel()
    return 2 * 2 * (layer_params + head)


def run(path, pairs, heads: str, variant: str | None, steps: int) -> tuple[float, float, dict]:
    """(median s/step, real tokens per step, the trained parameters) of one fresh trainer; variant None is TRL +
    PEFT LoRA."""
    model, tokenizer = load(path)
    layout = AttentionLayout.from_model(model)
    edit_heads = resolve_heads(heads, layout, seed=0)
    timer = StepTimer()
    output_dir = tempfile.mkdtemp()
    if variant is None:
        layers = sorted({layer for layer, _ in edit_heads})
        targets = [layout.projection_name(layer) for layer in layers]
        trainer_class, settings = TRLCachedReference, OFF
        peft_config = LoraConfig(r=1, lora_alpha=1, lora_dropout=0.0, target_modules=targets)
    else:
        trainer_class, settings = LocEditTrainer, {**OFF, **VARIANTS[variant]}
        peft_config = HeadEditConfig.for_heads(layout, edit_heads)
    trainer = trainer_class(
        model=model,
        args=training_args(output_dir, steps, **settings),
        train_dataset=pairs,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[timer],
    )
    metrics = trainer.train().metrics
    tokens = metrics.get("num_input_tokens_seen", 0) / max(1, steps)
    if hasattr(trainer, "close_pair_scorer"):
        trainer.close_pair_scorer()
    trained = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    return timer.median(warmup=1), tokens, trained


def largest_difference(ours: dict, theirs: dict) -> float:
    """The largest absolute difference of two sets of trained parameters with the same names."""
    if ours.keys() != theirs.keys():
        return float("inf")
    return max(float((ours[name] - theirs[name]).abs().max()) for name in theirs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a tiny random Llama and synthetic pairs")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (the first is not timed)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of every variant")
    parser.add_argument(
        "--edits", default=None, help="head specs separated by semicolons (default: all;random:16;L25H0)"
    )
    parser.add_argument("--variants", default=",".join(VARIANTS), help="locedit variants to time")
    parser.add_argument("--pool", type=int, default=None, help="pairs the runs draw their batches from (default 320)")
    args = parser.parse_args()
    if args.small:
        from common import SMALL, model_dir

        path, pairs, edits = model_dir(SMALL), preference_data(60), "all;random:2;L1H0"
        # 5 timed steps: one step slowed by other work on shared cores does not move the median.
        steps, rounds, pool = args.steps or 6, args.rounds or 1, args.pool or 40
    else:
        from locedit.data import load_preference_splits
        from locedit.models.sources import resolve_model_path

        path, edits = resolve_model_path("smollm2"), "all;random:16;L25H0"
        steps, rounds, pool = args.steps or 6, args.rounds or 2, args.pool or 320
        splits = load_preference_splits(TRUTHFULQA, split_fractions=(0.6, 0.2, 0.2), seed=0)
        pairs = splits["train"].select_columns(["prompt", "chosen", "rejected"])
    os.environ["LOCEDIT_CACHE"] = tempfile.mkdtemp(prefix="locedit-bench-cache-")  # a cold reference cache
    edits = (args.edits or edits).split(";")
    pairs = pairs.shuffle(seed=0).select(range(min(len(pairs), max(pool, steps * 8))))
    variants = [v for v in args.variants.split(",") if v]
    threads = torch.get_num_threads()
    rate = matmul_rate(0.5 if args.small else 3.0)
    model, _ = load(path)
    per_token = full_step_flops_per_token(model)
    del model
    print(
        f"model: {path}; a pool of {len(pairs)} pairs, batch 8, {steps} steps x {rounds} rounds; {threads} thread(s)"
    )
    print(
        f"fp32 matmul rate: {rate / 1e9:.1f} GFLOP/s; a whole step without padding: {per_token / 1e6:.0f} MFLOP/token"
    )
    failures = []
    for heads in edits:
        times: dict[str, list[float]] = {name: [] for name in ["trl", *variants]}
        tokens: dict[str, float] = {}
        trained: dict[str, dict] = {}
        for _ in range(rounds):
            for name in times:
                seconds, tokens[name], trained[name] = run(path, pairs, heads, None if name == "trl" else name, steps)
                times[name].append(seconds)
        trl = statistics.median(times["trl"])
        print(f"\nedit {heads}")
        print(f"  {'variant':22s} {'s/step':>8s} {'vs TRL':>8s} {'share of matmul rate':>22s}")
        for name, values in times.items():
            seconds = statistics.median(values)
            share = tokens[name] * per_token / seconds / rate
            label = "TRL + PEFT LoRA r=1" if name == "trl" else f"locedit {name}"
            print(f"  {label:22s} {seconds:8.3f} {trl / seconds:7.2f}x {share:21.0%}", flush=True)
        exact = [name for name in SAME_BATCHES if name in trained]
        if len(exact) > 1:
            edit_gap = max(largest_difference(trained[name], trained[exact[0]]) for name in exact[1:])
            print(f"  largest edit difference, {', '.join(exact[1:])} vs {exact[0]}: {edit_gap:.2e}")
            if not edit_gap <= EDIT_TOLERANCE:  # NaN fails too
                failures.append(f"{heads}: {edit_gap:.2e} > {EDIT_TOLERANCE}")
    if failures:
        sys.exit("edit_vs_trl.py: the exact variants trained different edits: " + "; ".join(failures))


if __name__ == "__main__":
    main()
