"""The CPU cost of each stage on a real model (SmolLM2-135M-Instruct, `model_name_or_path: smollm2`, on the real
TruthfulQA pairs), each measured against the way locedit did it before, in the same process:

- collection: head activations with the forward pass stopped at the last layer's projection, against the whole
  forward pass (the last MLP, the norm and the LM head at one position, as before);
- reference log-probs: for the pairs a `max_steps` run uses (max_steps x batch), cold and then from the cache of
  a second run, against TRL's precompute over every training pair (locedit before: whatever max_steps said);
- training: seconds per step and tokens per second of 16-head and all-heads edits (batch 8).

    python benchmarks/real_model.py                  # ~5 minutes on 2 idle cores, after the model's fetch
    python benchmarks/real_model.py --small          # a tiny random Llama and synthetic pairs (CI)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from common import load, timed, training_args

from locedit import AttentionLayout, HeadEditConfig, resolve_heads
from locedit.data import load_preference_splits, load_questions
from locedit.locate import build_probe_examples, collect_head_activations
from locedit.models.loading import pad_id, pad_right
from locedit.training import LocEditTrainer, training_inputs

# The same layers on the same batches compute the activations either way: only rounding may differ, relative to
# the largest activation.
TOLERANCE = 1e-5
TRUTHFULQA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "truthfulqa", "TruthfulQA.csv")


class Plan:
    def __init__(self, splits):
        self.splits = splits


def collect_whole_forward(model, tokenizer, texts: list[str], batch_size: int):
    """Collection as before: hooks on every projection, and the whole forward pass (logits at one position); the
    activations as collect_head_activations gives them, (texts, layers, heads, head_dim)."""
    import torch

    layout = AttentionLayout.from_model(model)
    encoded = tokenizer(list(texts))["input_ids"]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    captured = {}
    out = torch.empty(len(encoded), layout.num_layers, layout.num_heads, layout.head_dim(model), dtype=model.dtype)

    def hook_for(layer):
        def hook(module, args):
            captured[layer] = args[0][rows, last].detach()

        return hook

    handles = [p.register_forward_pre_hook(hook_for(i)) for i, p in enumerate(layout.projections(model))]
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                indices = order[start : start + batch_size]
                input_ids, mask = pad_right([encoded[i] for i in indices], pad_id(tokenizer))
                rows, last = torch.arange(len(indices)), mask.sum(1) - 1
                model(input_ids=input_ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
                stacked = torch.stack([captured[layer].cpu() for layer in range(layout.num_layers)], dim=1)
                out[torch.tensor(indices)] = stacked.view(len(indices), *out.shape[1:])
    finally:
        for handle in handles:
            handle.remove()
    return out


def precompute_seconds(model, tokenizer, splits, args, heads: str) -> float:
    layout = AttentionLayout.from_model(model)
    config = HeadEditConfig.for_heads(layout, resolve_heads(heads, layout))

    def build():
        trainer = LocEditTrainer(
            model=model,
            **training_inputs(Plan(splits), args),
            processing_class=tokenizer,
            peft_config=config,
        )
        return trainer

    trainer, seconds = timed(build)
    trainer.model.unload()  # the base model again, for the next trainer
    return seconds


def train_speed(model, tokenizer, splits, args, heads: str) -> tuple[float, float]:
    layout = AttentionLayout.from_model(model)
    trainer = LocEditTrainer(
        model=model,
        **training_inputs(Plan(splits), args),
        processing_class=tokenizer,
        peft_config=HeadEditConfig.for_heads(layout, resolve_heads(heads, layout)),
    )
    metrics = trainer.train().metrics
    trainer.model.unload()
    return 1 / metrics["train_steps_per_second"], metrics["num_input_tokens_seen"] / metrics["train_runtime"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--examples", type=int, default=None, help="probe examples collected each way")
    parser.add_argument("--steps", type=int, default=None, help="steps of the bounded run")
    parser.add_argument(
        "--train_pairs", type=int, default=None, help="training pairs the 'before' pass scores (default 800; 0: all)"
    )
    args = parser.parse_args()
    from locedit.models.sources import resolve_model_path

    if args.small:
        from common import SMALL, model_dir

        path, dataset, examples, steps, train_steps, heads = model_dir(SMALL), "synthetic:120", 64, 3, 3, "random:4"
    else:
        path, dataset, examples, steps = resolve_model_path("smollm2"), TRUTHFULQA, 512, 10
        train_steps, heads = 6, "random:16"
    examples, steps = args.examples or examples, args.steps or steps
    # A cold reference cache (the model itself stays where it was cached).
    os.environ["LOCEDIT_CACHE"] = tempfile.mkdtemp(prefix="locedit-bench-cache-")
    model, tokenizer = load(path)
    model.eval()
    splits = load_preference_splits(dataset, split_fractions=(0.6, 0.2, 0.2), seed=0)
    limit = 800 if args.train_pairs is None else args.train_pairs
    if limit and limit < len(splits["train"]):  # the 'before' pass scales with the pairs: a part of them here
        splits["train"] = splits["train"].select(range(limit))
    questions = load_questions(dataset, split_fractions=(0.6, 0.2, 0.2), seed=0)["train"]
    texts = build_probe_examples(questions, "Q: {question} A: {answer} Q: {other_question}").texts[:examples]
    print(f"model: {path}\ndata: {dataset}: {len(splits['train'])} training pairs used here", flush=True)

    before, whole = timed(lambda: collect_whole_forward(model, tokenizer, texts, 32))
    after, bounded = timed(lambda: collect_head_activations(model, tokenizer, texts, 32, progress=False))
    print(f"\ncollection of {len(texts)} probe examples (batch 32, longest first)")
    print(f"  whole forward pass (before)     : {whole / len(texts) * 1000:8.1f} ms/example")
    print(
        f"  stopped at the last projection  : {bounded / len(texts) * 1000:8.1f} ms/example ({whole / bounded:.2f}x)"
    )
    difference, largest = float((after - before).abs().max()), float(before.abs().max())
    print(f"  largest activation difference   : {difference:.2e} (largest value {largest:.2e})")
    if not difference <= TOLERANCE * largest:  # NaN fails too
        sys.exit(f"real_model.py: the activations stopped at the last projection differ by {difference:.2e}")

    out = tempfile.mkdtemp()
    every = training_args(
        out, -1, num_train_epochs=1, cache_ref_log_probs=False, eval_strategy="no", pair_draw="pair"
    )  # every training pair
    bounded_args = training_args(out, steps, eval_strategy="no")
    used = len(training_inputs(Plan(splits), bounded_args)["train_dataset"])
    start = time.perf_counter()
    all_pairs = precompute_seconds(model, tokenizer, splits, every, heads)
    cold = precompute_seconds(model, tokenizer, splits, bounded_args, heads)
    warm = precompute_seconds(model, tokenizer, splits, bounded_args, "all")
    print(f"\nreference log-probs before a run of {steps} steps x 8 pairs (trainer construction included)")
    print(f"  every training pair ({len(splits['train'])}, before)  : {all_pairs:8.1f} s")
    print(f"  the {used} pairs the run uses, cold       : {cold:8.1f} s ({all_pairs / cold:.1f}x)")
    print(f"  the same pairs, another run (cache)   : {warm:8.1f} s ({all_pairs / warm:.1f}x)")

    print(f"\ntraining, batch 8, {train_steps} steps (after the reference pass)")
    for spec in (heads, "all"):
        seconds, tokens = train_speed(model, tokenizer, splits, training_args(out, train_steps), spec)
        print(f"  {spec:10s}: {seconds:6.2f} s/step, {tokens:7.0f} tokens/s (not counting padding)")
    print(f"\ntotal {time.perf_counter() - start:.0f} s after loading", flush=True)


if __name__ == "__main__":
    main()
