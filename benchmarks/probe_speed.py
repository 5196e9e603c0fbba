"""Batched probing (all heads at once in torch) against a loop of scikit-learn LogisticRegression fits.

The work ITI does to localize: one logistic-regression probe per head of a 32-layer x 32-head model (1024 probes,
head_dim 128) on a few thousand examples, scored on held-out ones. The data is random with a label signal along
one direction per head, of a strength that varies by head, and per-dimension scales spread over two orders of
magnitude (head activations are far from isotropic, which is what makes first-order solvers slow). Both sides fit the
same objective (L2, C = 1, intercept; scikit-learn with ITI's max_iter=1000); the script checks that they agree.

    python benchmarks/probe_speed.py                    # 1024 heads, 3000 examples, head_dim 128
    python benchmarks/probe_speed.py --device cuda      # the batched fit on a GPU
    python benchmarks/probe_speed.py --small            # CI-sized
"""

from __future__ import annotations

import argparse
import time
import warnings

from locedit.core.errors import quiet_library_notices

quiet_library_notices()  # as the commands do: the libraries below print nothing a reader can act on

import numpy as np  # noqa: E402
import torch  # noqa: E402

from locedit.locate import fit_logistic_probes, probe_accuracy  # noqa: E402


def make_data(examples: int, heads: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = (torch.rand(examples, generator=generator) > 0.5).long()
    scales = torch.logspace(-1, 1, dim)
    features = torch.randn(examples, heads, dim, generator=generator) * scales
    direction = torch.randn(heads, dim, generator=generator)
    direction /= direction.norm(dim=-1, keepdim=True)
    strength = torch.linspace(0.0, 1.5, heads)[torch.randperm(heads, generator=generator)]  # heads differ
    features += (2 * labels - 1)[:, None, None] * 0.5 * (strength[:, None] * direction)[None]
    return features, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="CI-sized: 2 x 8 heads, head_dim 16, 400 examples")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head_dim", type=int, default=128)
    parser.add_argument("--examples", type=int, default=3000, help="training examples (plus 25%% held out)")
    parser.add_argument("--device", default=None, help="where the batched fit runs (default: cuda if available)")
    parser.add_argument("--sklearn_heads", type=int, default=None, help="time sklearn on this many heads, scale up")
    args = parser.parse_args()
    if args.small:
        args.layers, args.heads, args.head_dim, args.examples = 2, 8, 16, 400
    compare(args)


def compare(args) -> dict:
    """Fit the probes both ways on the same data; print and return the figures."""
    num_heads = args.layers * args.heads
    held_out = args.examples // 4
    features, labels = make_data(args.examples + held_out, num_heads, args.head_dim)
    train, val = slice(0, args.examples), slice(args.examples, None)
    device = torch.device(args.device) if args.device else None
    print(
        f"{args.layers} x {args.heads} = {num_heads} heads, head_dim {args.head_dim}, {args.examples} training and "
        f"{held_out} held-out examples; torch {torch.__version__} on {device or 'default device'}, "
        f"{torch.get_num_threads()} CPU threads"
    )

    fit_logistic_probes(features[:64, :2], labels[:64], device=device)  # warm-up (CUDA context, kernels)
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    weight, bias = fit_logistic_probes(features[train], labels[train], device=device)
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize()
    batched_time = time.perf_counter() - start
    batched_accuracy = probe_accuracy(features[val], labels[val], weight, bias).numpy()
    print(f"batched torch: {batched_time:.2f} s for {num_heads} probes")

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    timed_heads = min(num_heads, args.sklearn_heads or num_heads)
    x_train, y_train = features[train].numpy(), labels[train].numpy()
    x_val, y_val = features[val].numpy(), labels[val].numpy()
    sklearn_accuracy = np.empty(timed_heads)
    unconverged = 0
    # One BLAS thread: on small per-head problems more threads only contend (2 threads were ~30x slower here).
    with threadpool_limits(1):
        start = time.perf_counter()
        for head in range(timed_heads):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                probe = LogisticRegression(max_iter=1000).fit(x_train[:, head], y_train)
            unconverged += any(issubclass(w.category, ConvergenceWarning) for w in caught)
            sklearn_accuracy[head] = probe.score(x_val[:, head], y_val)
        sklearn_time = (time.perf_counter() - start) * num_heads / timed_heads
    scaled = f" (timed on {timed_heads} heads, scaled)" if timed_heads < num_heads else ""
    print(f"sklearn loop:  {sklearn_time:.2f} s for {num_heads} probes{scaled}; {unconverged} hit max_iter")

    difference = np.abs(sklearn_accuracy - batched_accuracy[:timed_heads])
    # One point is one held-out example of 100 (--small): the batched accuracy is float32, so one example's
    # difference reads 0.0100000017; within one point means at most one point plus float32's rounding.
    within = difference <= 0.01 + 1e-6
    print(
        f"validation accuracy, batched vs sklearn: max difference {100 * difference.max():.2f} points, "
        f"{int(within.sum())}/{timed_heads} heads within one point"
    )
    print(f"ratio sklearn / batched: {sklearn_time / batched_time:.1f}x")
    return {
        "heads": num_heads,
        "head_dim": args.head_dim,
        "examples": args.examples,
        "batched_device": str(device or ("cuda" if torch.cuda.is_available() else "cpu")),
        "batched_s": batched_time,
        "sklearn_s": sklearn_time,
        "sklearn_heads_timed": timed_heads,
        "sklearn_unconverged": unconverged,
        "ratio_sklearn_over_batched": sklearn_time / batched_time,
        "max_accuracy_diff_points": 100 * float(difference.max()),
        "heads_within_one_point": int(within.sum()),
    }


if __name__ == "__main__":
    main()
