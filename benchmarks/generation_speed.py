"""Greedy generation throughput with a trained edit merged into the weights against the edit applied per token
(unmerged), as `locedit eval` generates: batched, left-padded prompts. The base model alone is the reference: a
merged edit should cost nothing per token. Also checks that merged and unmerged generate the same tokens.

    python benchmarks/generation_speed.py            # Llama 8 layers x 8 heads, hidden 512, edit at all heads
    python benchmarks/generation_speed.py --small    # CI-sized
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from common import SMALL, Shape, load, model_dir, timed

from locedit import AttentionLayout, HeadEditConfig, add_edit, edit_layers, resolve_heads
from locedit.data import load_preference_splits

MEDIUM = Shape(layers=8, hidden=512, heads=8)


def generate(model, batch, new_tokens: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(
            **batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="CI-sized model and few tokens")
    parser.add_argument("--heads", default="all", help="head spec of the edit (default: all heads)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per variant (best is kept)")
    args = parser.parse_args()
    shape = SMALL if args.small else MEDIUM
    with tempfile.TemporaryDirectory(prefix="locedit-bench-") as root:  # the weights are in memory once loaded
        model, tokenizer = load(model_dir(shape, root))
    compare(model, tokenizer, args, shape.describe())


def compare(model, tokenizer, args, description: str) -> dict:
    """Time generation unmerged, merged and without the edit; print and return the figures. The model is given
    back without the edit."""
    new_tokens = args.new_tokens or (8 if args.small else 50)
    rounds = args.rounds or (1 if args.small else 3)
    layout = AttentionLayout.from_model(model)
    heads = resolve_heads(args.heads, layout, seed=0)
    edited = add_edit(model, HeadEditConfig.for_heads(layout, heads))
    generator = torch.Generator().manual_seed(0)
    for layer in edit_layers(edited).values():  # a trained-looking edit: b away from 0
        weight = layer.lora_B["default"].weight
        weight.data = torch.randn(weight.shape, generator=generator).to(weight) * 0.5
    edited.eval()

    prompts = load_preference_splits("synthetic:40")["test"]["prompt"][: args.batch_size]
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(next(model.parameters()).device)
    tokens = len(prompts) * new_tokens

    generate(edited, batch, 2)  # warm-up
    times = {"unmerged": [], "merged": [], "base": []}
    outputs = {}
    for _ in range(rounds):  # alternate the variants so drift in machine load hits all alike
        outputs["unmerged"], seconds = timed(lambda: generate(edited, batch, new_tokens))
        times["unmerged"].append(seconds)
        edited.merge_adapter()
        outputs["merged"], seconds = timed(lambda: generate(edited, batch, new_tokens))
        times["merged"].append(seconds)
        edited.unmerge_adapter()
        with edited.disable_adapter():
            _, seconds = timed(lambda: generate(edited, batch, new_tokens))
        times["base"].append(seconds)
    rate = {name: tokens / min(values) for name, values in times.items()}
    print(
        f"model: {description}, edit at {len(heads)} heads in {len(edit_layers(edited))} layers, "
        f"batch {len(prompts)} x {new_tokens} new tokens, {torch.get_num_threads()} threads, "
        f"{'cuda' if torch.cuda.is_available() else 'cpu'}"
    )
    print(f"edit applied per token (unmerged): {rate['unmerged']:10.1f} tokens/s")
    print(f"edit merged into the weights     : {rate['merged']:10.1f} tokens/s")
    print(f"base model, no edit              : {rate['base']:10.1f} tokens/s")
    print(f"ratio merged / unmerged          : {rate['merged'] / rate['unmerged']:10.3f}")
    identical = torch.equal(outputs["merged"], outputs["unmerged"])
    print(f"identical tokens merged/unmerged : {identical}")
    figures = {
        "heads": len(heads),
        "layers": len(edit_layers(edited)),
        "batch": len(prompts),
        "new_tokens": new_tokens,
        **{f"{name}_tokens_per_s": value for name, value in rate.items()},
        "merged_over_unmerged": rate["merged"] / rate["unmerged"],
        "identical_tokens": identical,
    }
    edited.unload()
    return figures


if __name__ == "__main__":
    main()
