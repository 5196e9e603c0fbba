"""Training throughput of edits on a 7B-shaped Llama with random weights (no download): tokens per second, model
FLOPs utilisation (MFU) and peak memory, for single-head, 16-head and all-heads edits in bf16, with and without
gradient checkpointing. Goal: at least 40% of the GPU's bf16 peak for all-heads training.

    python benchmarks/gpu_7b.py                          # on a GPU: Llama-2-7B shape, bf16
    python benchmarks/gpu_7b.py --small                  # CI-sized, runs on a CPU too (no MFU there)

A step is what IPO training does per batch of pairs: forward and backward through the frozen base with the edit,
then an AdamW step on a and b. The base weights get no gradient, so model FLOPs per token are 2x the forward's
(forward + backward to the activations): 2 * (2 N + 4 L s d), N the non-embedding parameters, L layers, s the
sequence length, d the hidden size (causal attention counted in full, as is usual for MFU).
"""

from __future__ import annotations

import argparse
import sys
import time

from locedit.core.errors import quiet_library_notices

quiet_library_notices()  # as the commands do: the libraries below print nothing a reader can act on

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from locedit import AttentionLayout, HeadEditConfig, add_edit, resolve_heads  # noqa: E402

BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


def peak_tflops(override: float | None) -> float | None:
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), None)


def build_model(config: LlamaConfig, device: str, dtype: torch.dtype) -> LlamaForCausalLM:
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.eval()  # no dropout; the edit trains in eval mode as the trainer disables dropout too
    return model


def flops_per_token(model, seq: int) -> float:
    """Model FLOPs per token of a training step (see the module docstring); counts unquantised parameters."""
    config = model.config
    non_embedding = sum(
        p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n
    )
    return 2 * (2 * non_embedding + 4 * config.num_hidden_layers * seq * config.hidden_size)


def llama_config(small: bool) -> LlamaConfig:
    """The CI-sized Llama (--small) or the Llama-2-7B shape."""
    if small:
        return LlamaConfig(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
        )
    return LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
    )


def measure(model, spec, args, device, gradient_checkpointing: bool, optimizer_class=torch.optim.AdamW) -> dict:
    layout = AttentionLayout.from_model(model)
    edited = add_edit(model, HeadEditConfig.for_heads(layout, resolve_heads(spec, layout, seed=0)))
    if gradient_checkpointing:
        edited.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        edited.enable_input_require_grads()
    params = [p for p in edited.parameters() if p.requires_grad]
    optimizer = optimizer_class(params, lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.warmup + args.steps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = edited(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    edited.unload()  # gives back the base model unchanged for the next edit
    if gradient_checkpointing:
        model.gradient_checkpointing_disable()
    seconds = sorted(times)[len(times) // 2]
    tokens_per_second = args.batch * args.seq / seconds
    peak = peak_tflops(args.peak_tflops)
    return {
        "heads": spec,
        "checkpointing": gradient_checkpointing,
        "trainable": sum(p.numel() for p in params),
        "ms_per_step": seconds * 1000,
        "tokens_per_s": tokens_per_second,
        "mfu": flops_per_token(model, args.seq) * tokens_per_second / (peak * 1e12) if peak else None,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a 2-layer model, a few steps (runs on a CPU)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (pairs x 2)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--peak_tflops", type=float, default=None, help="the GPU's dense bf16 peak, if not known")
    args = parser.parse_args()
    if not args.small and not torch.cuda.is_available():
        # A 7B-shaped model in fp32 on a CPU is killed for memory minutes later; say so at once.
        print("gpu_7b.py: error: needs a CUDA GPU (a 7B-shaped model); use --small on a CPU", file=sys.stderr)
        sys.exit(2)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = llama_config(args.small)
    if args.small:
        defaults = dict(batch=4, seq=32, steps=2, warmup=1)
        specs = ["random:1", "random:4", "all"]
    else:
        defaults = dict(batch=16, seq=512, steps=10, warmup=3)
        specs = ["random:1", "random:16", "all"]
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = build_model(config, device, dtype)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(
        f"{name}; Llama {config.num_hidden_layers} layers, hidden {config.hidden_size}, {dtype}; "
        f"batch {args.batch} x {args.seq} tokens; peak {peak_tflops(args.peak_tflops) or 'unknown'} TFLOP/s"
    )
    print(f"{'heads':>10} {'ckpt':>5} {'trainable':>10} {'ms/step':>9} {'tokens/s':>10} {'MFU':>6} {'peak GiB':>9}")
    for spec in specs:
        for checkpointing in (False, True):
            r = measure(model, spec, args, device, checkpointing)
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
            memory = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "n/a"
            print(
                f"{spec:>10} {str(checkpointing):>5} {r['trainable']:>10} {r['ms_per_step']:>9.1f} "
                f"{r['tokens_per_s']:>10.0f} {mfu:>6} {memory:>9}"
            )


if __name__ == "__main__":
    main()
