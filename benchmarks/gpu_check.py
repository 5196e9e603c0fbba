"""One prepared check of locedit on a lent GPU (an H200), run once in about 8 minutes: the figures the other
benchmarks exist for, at 7B scale, in one process, written to one JSON file with a summary table at the end.

    python benchmarks/gpu_check.py --wheels .whl        # on the GPU machine: see benchmarks/README.md, "GPU"
    python benchmarks/gpu_check.py --small              # CI-sized, on a CPU (the tests run this)

Sections, in the order they run (--sections picks some). Each has a time budget, printed; on the GPU a section
starts only if its budget fits in the time left (--max_minutes), and one that fails records its error while the
rest still run, so one crash does not waste the GPU's time.

  train        Llama-2-7B shape with random weights in bf16: tokens/s, MFU and peak memory of a single-head, a
               16-head and an all-heads edit, each with and without gradient checkpointing (gpu_7b.measure)
  paged_adamw  the 16-head edit with bitsandbytes' PagedAdamW32bit (the paper's optim) against torch's AdamW
  multi_edit   16 edits of 16 random heads in one run (EditBank, MultiEditTrainer) against one edit
               (LocEditTrainer): time per step, and how far the bank's edit k is from edit k trained on its own
  generation   greedy generation, edit merged against applied per token (generation_speed.compare)
  probes       1,024 head probes batched on the GPU against scikit-learn's loop on the CPU (probe_speed.compare)
  nf4          the 16-head edit on a 4-bit nf4 base (transformers' BitsAndBytesConfig): it loads a second copy of
               the model
  processes    with two GPUs or more: the toy study (--small) in 1 process against 2 processes of `accelerate
               launch` (processes.py): wall times per stage and whether the tables are identical; skipped on one

--small runs the same code on a 2-layer Llama in fp32 on a CPU (paged_adamw and nf4 are skipped: they need CUDA).
The exit status is 1 when a section failed (the JSON and the summary are written all the same), else 0.
"""

from __future__ import annotations

import argparse
import copy
import gc
import glob
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

# The GPU machine has no locedit installed: fall back to this checkout (an installed locedit comes first).
if importlib.util.find_spec("locedit") is None:
    sys.path.append(str(Path(__file__).resolve().parents[1]))

SECTIONS = ("train", "paged_adamw", "multi_edit", "generation", "probes", "nf4", "processes")
# Expected seconds per section (GPU, --small). The GPU figures are estimates until the first GPU run: 7B at ~40%
# MFU is ~0.7 s per 8k-token step; each TRL trainer on a 7B model first hashes the whole model in fp32 on the CPU
# (27 GB through sha256: 30-60 s), and multi_edit builds two.
BUDGET_S = {
    "train": (120, 30),
    "paged_adamw": (30, 5),
    "multi_edit": (150, 60),
    "generation": (30, 15),
    "probes": (45, 15),
    "nf4": (75, 5),
    "processes": (180, 5),
}
H200_PEAK_TFLOPS = 790.0  # bf16 8192^3 matmul measured on the lent H200 (the data sheet's dense figure is 989)
WANTED_WHEELS = ("trl", "datasets", "wandb", "bitsandbytes")  # what the GPU machine lacks (wandb: optional)
PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes")
BF16_UNIT_ROUNDOFF = 2.0**-8  # bf16 keeps 8 significant bits: rounding a value to bf16 moves it by up to |v| 2^-8
FP32_TOLERANCE = 1e-4  # multi_edit.py's bound on the largest difference, one run against separate runs


class Skipped(Exception):
    """A section that cannot run here (no CUDA, no bitsandbytes): recorded as skipped, not as an error."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="CI-sized model and steps; runs on a CPU")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of: {', '.join(SECTIONS)}")
    parser.add_argument("--wheels", default=None, help="install every wheel in this folder first (pip --no-index)")
    parser.add_argument("--out", default=None, help="JSON file (default $OUT/gpu_check.json, else outputs/)")
    parser.add_argument("--peak_tflops", type=float, default=None, help="bf16 peak for MFU (default: 790 on H200)")
    parser.add_argument("--max_minutes", type=float, default=None, help="start no section past this (GPU: 9)")
    parser.add_argument("--batch", type=int, default=None, help="train: sequences per step (GPU 16, small 4)")
    parser.add_argument("--seq", type=int, default=None, help="train: tokens per sequence (GPU 512, small 32)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration (GPU 8, small 2)")
    parser.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help="auto: bf16 on CUDA")
    args = parser.parse_args()
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    if args.out is None:
        args.out = os.path.join(os.environ["OUT"] if os.environ.get("OUT") else "outputs", "gpu_check.json")
    if args.max_minutes is None and not args.small:
        args.max_minutes = 9.0  # the device tool stops a command at 10 minutes
    return args


def install_wheels(folder: str | None) -> list[str]:
    """pip-install every wheel in `folder` into a private target put first on sys.path; returns the wheels' names.

    --no-deps: the folder holds exactly what the GPU machine lacks (trl, datasets and their dill and multiprocess,
    bitsandbytes), and pip, with no index to reach, must not try to resolve what is already installed.
    """
    if not folder:
        return []
    wheels = sorted(glob.glob(os.path.join(folder, "*.whl")))
    if not wheels:
        print(f"--wheels {folder}: no wheels there; nothing installed", flush=True)
        return []
    target = os.path.join(tempfile.gettempdir(), "locedit-gpu-check-site")
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    subprocess.run([*command, "--upgrade", "--target", target, *wheels], check=True)
    sys.path.insert(0, target)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [target, os.environ.get("PYTHONPATH")]))
    importlib.invalidate_caches()
    names = [os.path.basename(w) for w in wheels]
    print(f"installed from {folder} into {target}: {', '.join(names)}", flush=True)
    missing = [n for n in WANTED_WHEELS if not any(w.lower().startswith(f"{n}-") for w in names)]
    if missing:
        print(f"no wheel of {', '.join(missing)} in {folder}: the installed ones (if any) are used", flush=True)
    return names


def environment(wheels: list[str]) -> dict:
    import torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    cuda = torch.cuda.is_available()
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "python": platform.python_version(),
        "versions": versions,
        "wheels_installed": wheels,
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)",
        "gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None,
        "cuda": torch.version.cuda if cuda else None,
        "cpu_threads": torch.get_num_threads(),
    }


class Check:
    """What the sections share: sizes, the 7B-shaped model (built once, rebuilt after a section fails with it in
    an unknown state), a tokenizer, and the single configuration's plain AdamW figure once measured."""

    def __init__(self, args: argparse.Namespace):
        import torch

        self.args, self.small = args, args.small
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        bf16 = args.dtype == "bf16" or (args.dtype == "auto" and self.device == "cuda")
        self.dtype = torch.bfloat16 if bf16 else torch.float32
        self.specs = ["random:1", "random:4", "all"] if self.small else ["random:1", "random:16", "all"]
        self.single_spec = self.specs[1]  # the paper's 16 random heads: the configuration paged/nf4 compare
        self.sizes = SimpleNamespace(
            batch=args.batch or (4 if self.small else 16),
            seq=args.seq or (32 if self.small else 512),
            steps=args.steps or (2 if self.small else 8),
            warmup=1 if self.small else 2,
            peak_tflops=self.peak_tflops(),
        )
        self.reference: dict | None = None
        self._model = None
        self._tokenizer = None

    def peak_tflops(self) -> float | None:
        import gpu_7b
        import torch

        if self.args.peak_tflops or self.device != "cuda":
            return self.args.peak_tflops
        return H200_PEAK_TFLOPS if "H200" in torch.cuda.get_device_name() else gpu_7b.peak_tflops(None)

    def model(self):
        import gpu_7b

        if self._model is None:
            self._model = gpu_7b.build_model(gpu_7b.llama_config(self.small), self.device, self.dtype)
        return self._model

    def describe(self) -> str:
        c = self.model().config
        return (
            f"Llama {c.num_hidden_layers} layers x {c.num_attention_heads} heads, hidden {c.hidden_size}, {self.dtype}"
        )

    def tokenizer(self):
        """The locally made tokenizer of the tiny benchmark model (512 ids: within any shape's vocabulary)."""
        from common import SMALL, model_dir
        from transformers import AutoTokenizer

        if self._tokenizer is None:
            with tempfile.TemporaryDirectory(prefix="locedit-gpu-check-") as root:
                self._tokenizer = AutoTokenizer.from_pretrained(model_dir(SMALL, root))
        return self._tokenizer

    def discard_model(self) -> None:
        self._model = None

    def measure(self, model, spec: str, checkpointing: bool = False, **kwargs) -> dict:
        import gpu_7b

        return gpu_7b.measure(model, spec, self.sizes, self.device, checkpointing, **kwargs)

    def measure_reference(self) -> dict:
        """The single configuration (16 heads, no checkpointing, torch AdamW): measured once, shared."""
        if self.reference is None:
            self.reference = self.measure(self.model(), self.single_spec)
        return self.reference

    def bitsandbytes(self):
        if self.device != "cuda":
            raise Skipped("needs CUDA")
        try:
            import bitsandbytes
        except Exception as error:  # ImportError, or a broken CUDA library inside it
            raise Skipped(f"bitsandbytes not importable ({type(error).__name__}: {error})") from None
        return bitsandbytes


def _row(r: dict) -> str:
    return (
        f"| {r['heads']} | {r['checkpointing']} | {r['trainable']} | {r['ms_per_step']:.1f} | "
        f"{r['tokens_per_s']:.0f} | {_mfu(r)} | {_gib(r)} |"
    )


TRAIN_HEADER = (
    "| heads | ckpt | trainable | ms/step | tokens/s | MFU | peak GiB |\n| --- | --- | --- | --- | --- | --- | --- |"
)


def section_train(check: Check) -> dict:
    s = check.sizes
    print(f"{check.describe()}; batch {s.batch} x {s.seq} tokens, {s.steps} timed steps; peak {s.peak_tflops} TFLOP/s")
    print(TRAIN_HEADER)
    rows, errors, figures = [], [], []
    for spec in check.specs:
        for checkpointing in (False, True):
            try:
                r = check.measure(check.model(), spec, checkpointing)
            except Exception as error:  # out of memory, say: record it, measure the other configurations
                errors.append(
                    {"heads": spec, "checkpointing": checkpointing, "error": f"{type(error).__name__}: {error}"}
                )
                print(f"| {spec} | {checkpointing} | {errors[-1]['error'][:200]} |", flush=True)
                figures.append(f"{spec}{' ckpt' if checkpointing else ''} failed")
                check.discard_model()  # the failed measure may have left its edit on the model
                _free_memory()
                continue
            print(_row(r), flush=True)
            rows.append(r)
            figures.append(
                f"{spec}{' ckpt' if checkpointing else ''} {r['tokens_per_s']:.0f} tok/s {_mfu(r)} {_gib(r)} GiB"
            )
            if spec == check.single_spec and not checkpointing:
                check.reference = r
    summary = "tokens/s, MFU, peak memory: " + "; ".join(figures) + " (goal: all heads MFU >= 40%)"
    return {"model": check.describe(), "sizes": vars(s), "rows": rows, "errors": errors, "summary": summary}


def _mfu(r: dict) -> str:
    return f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a"


def _gib(r: dict) -> str:
    return f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "n/a"


def section_paged_adamw(check: Check) -> dict:
    bnb = check.bitsandbytes()
    plain = check.measure_reference()
    paged = check.measure(check.model(), check.single_spec, optimizer_class=bnb.optim.PagedAdamW32bit)
    print(TRAIN_HEADER)
    print(_row(plain) + " torch AdamW")
    print(_row(paged) + " PagedAdamW32bit")
    ratio = paged["ms_per_step"] / plain["ms_per_step"]
    return {
        "adamw_torch": plain,
        "paged_adamw_32bit": paged,
        "paged_over_adamw_time": ratio,
        "summary": f"{check.single_spec}: paged {paged['ms_per_step']:.1f} vs AdamW {plain['ms_per_step']:.1f} "
        f"ms/step ({ratio:.2f}x); peak {_gib(paged)} vs {_gib(plain)} GiB",
    }


def section_multi_edit(check: Check) -> dict:
    """16 edits in one run against one edit, with the trainers a real run uses (TRL's DPOTrainer, IPO)."""
    from common import StepTimer, preference_data, timed, training_args
    from multi_edit import edit_difference
    from transformers import PrinterCallback

    from locedit import AttentionLayout, HeadEditConfig, resolve_heads
    from locedit.training import EditBank, LocEditTrainer, MultiEditTrainer

    model, tokenizer = check.model(), check.tokenizer()
    layout = AttentionLayout.from_model(model)
    spec, edits = ("random:2", 4) if check.small else ("random:16", 16)
    steps = check.args.steps or (3 if check.small else 10)
    # Edit k has the heads of a separate run with heads_seed k (as `--heads_draws` makes them); a starts from the
    # values a separate run with seed 0 starts from.
    configs = [
        HeadEditConfig.for_heads(layout, resolve_heads(spec, layout, seed=k), init_seed=0) for k in range(edits)
    ]
    checked = [0, edits - 1] if check.small else [0]  # each separate 7B run costs a trainer set-up (~30 s)
    data = preference_data(40)  # 160 pairs: enough for the steps at 4 pairs a step
    root = tempfile.mkdtemp(prefix="locedit-gpu-check-multi-")

    def args(name: str):
        return training_args(os.path.join(root, name), steps, batch_size=4, max_grad_norm=1.0)

    for param in model.parameters():
        param.requires_grad_(False)
    bank = EditBank(layout, layout.head_dim(model) * layout.num_heads, [c.heads for c in configs], init_seed=0)
    bank = bank.to(check.device)
    handles = bank.attach(model, layout)
    multi_timer = StepTimer()
    try:
        trainer, multi_setup = timed(
            lambda: MultiEditTrainer(
                model=model, args=args("multi"), train_dataset=data, processing_class=tokenizer, bank=bank
            )
        )
        trainer.add_callback(multi_timer)
        trainer.remove_callback(PrinterCallback)  # its dict of the run's metrics, once per trainer: noise here
        _, multi_train = timed(trainer.train)
        for k in checked:
            bank.save_edit(k, configs[k], layout, os.path.join(root, f"bank-{k}"))
    finally:  # give the base model back without the bank
        for handle in handles:
            handle.remove()
        del model.locedit_bank
    # Set-up: tokenizing the pairs, TRL's hash of the whole model (the key of its reference log-prob cache), the
    # reference log-probs. A separate run pays all of it again.
    print(f"{edits} edits of {spec} in one run: set-up {multi_setup:.1f} s, {multi_timer.median() * 1000:.1f} ms/step")

    singles, differences = {}, {}
    for k in checked:
        timer = StepTimer()
        trainer, setup = timed(
            lambda k=k: LocEditTrainer(
                model=model,
                args=args(f"edit-{k}"),
                train_dataset=data,
                processing_class=tokenizer,
                peft_config=configs[k],
            )
        )
        trainer.add_callback(timer)
        trainer.remove_callback(PrinterCallback)
        try:
            _, train = timed(trainer.train)
            trainer.save_model(os.path.join(root, f"edit-{k}"))
        finally:
            trainer.model.unload()  # the base model again, for the next run and the next sections
        singles[k] = {"setup_s": setup, "train_s": train, "ms_per_step": timer.median() * 1000}
        differences[k] = edit_difference(os.path.join(root, f"bank-{k}"), os.path.join(root, f"edit-{k}"))
        print(f"edit {k} on its own: set-up {setup:.1f} s, {timer.median() * 1000:.1f} ms/step; {differences[k]}")

    one_ms = singles[checked[0]]["ms_per_step"]
    ratio = multi_timer.median() * 1000 / one_ms
    worst = {key: max(d[key] for d in differences.values()) for key in next(iter(differences.values()))}
    if not str(check.dtype).endswith("bfloat16"):
        tolerance = {"kind": "fp32: largest absolute difference <= 1e-4, as multi_edit.py", "bound": FP32_TOLERANCE}
        equal = worst["max_abs_diff"] <= FP32_TOLERANCE
    else:
        # The bank runs a 16x larger batch, so the bf16 matmuls sum in another order; the fp32 edits then differ by
        # about the rounding of bf16 activations (AdamW's early steps, ~lr x sign(g), can magnify it where g ~ 0).
        # The bound: the error of rounding the edit's largest value to bf16.
        bound = worst["max_abs_value"] * BF16_UNIT_ROUNDOFF
        tolerance = {"kind": "bf16: largest absolute difference <= largest |value| x 2^-8", "bound": bound}
        equal = worst["max_abs_diff"] <= bound
    print(f"one step of {edits} edits takes {ratio:.2f}x one edit's step (goal on a GPU: <= 3x)")
    print(f"bank vs separate: {worst}; tolerance {tolerance}: {'within' if equal else 'BEYOND'}")
    result = {
        "edits": edits,
        "heads_per_edit": spec,
        "steps": steps,
        "pairs_per_step": 4,
        "multi": {"setup_s": multi_setup, "train_s": multi_train, "ms_per_step": multi_timer.median() * 1000},
        "single": singles,
        "step_time_ratio_multi_over_one": ratio,
        "differences": differences,
        "worst": worst,
        "tolerance": tolerance,
        "within_tolerance": equal,
        "summary": f"{edits} edits: {ratio:.2f}x one edit's step time (goal <= 3x); largest difference "
        f"{worst['max_abs_diff']:.2e} (relative {worst['max_rel_diff']:.2e}), "
        f"{'within' if equal else 'beyond'} {tolerance['bound']:.1e}; trainer set-up {multi_setup:.0f} s",
    }
    if not equal and tolerance["bound"] == FP32_TOLERANCE:  # in fp32 a difference is a bug: fail the section
        raise AssertionError(f"the edits trained in one run differ from their separate runs: {result['summary']}")
    return result


def section_generation(check: Check) -> dict:
    import generation_speed

    args = SimpleNamespace(
        small=check.small, heads="all", batch_size=8, new_tokens=None, rounds=None if check.small else 2
    )
    figures = generation_speed.compare(check.model(), check.tokenizer(), args, check.describe())
    figures["summary"] = (
        f"merged {figures['merged_tokens_per_s']:.0f} vs unmerged {figures['unmerged_tokens_per_s']:.0f} tokens/s "
        f"({figures['merged_over_unmerged']:.2f}x; base {figures['base_tokens_per_s']:.0f}); "
        f"identical tokens: {figures['identical_tokens']}"
    )
    return figures


def section_probes(check: Check) -> dict:
    import probe_speed

    if check.small:
        args = SimpleNamespace(layers=2, heads=8, head_dim=16, examples=400, device=None, sklearn_heads=None)
    else:  # scikit-learn timed on 64 of the 1,024 heads and scaled up: its loop would take about a minute
        args = SimpleNamespace(layers=32, heads=32, head_dim=128, examples=3000, device="cuda", sklearn_heads=64)
    figures = probe_speed.compare(args)
    figures["summary"] = (
        f"{figures['heads']} probes: batched on {figures['batched_device']} {figures['batched_s']:.2f} s vs sklearn "
        f"{figures['sklearn_s']:.1f} s ({figures['ratio_sklearn_over_batched']:.1f}x); accuracy within one point "
        f"on {figures['heads_within_one_point']}/{figures['sklearn_heads_timed']} heads"
    )
    return figures


def section_processes(check: Check) -> dict:
    import torch

    if torch.cuda.device_count() < 2:
        raise Skipped(f"needs 2 GPUs, {torch.cuda.device_count()} here")
    command = [sys.executable, "processes.py", "--small", "--processes", "2"]
    result = subprocess.run(command, cwd=Path(__file__).parent, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"processes.py failed: {result.stderr[-1500:]}")
    lines = result.stdout.strip().splitlines()
    summary = "; ".join(line for line in lines if line.startswith(("whole command", "study tables identical")))
    return {"output": result.stdout, "summary": summary}


def load_nf4(base, device: str):
    """A 4-bit nf4 copy of `base`, quantised from its weights in memory; through a saved copy where this
    transformers cannot take a state_dict (13 GB of disk at 7B)."""
    import torch
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    kwargs = dict(
        config=copy.deepcopy(base.config),  # from_pretrained records the quantization on the config it is given
        quantization_config=quantization,
        dtype=torch.bfloat16,
        device_map={"": 0 if device == "cuda" else device},
    )
    try:
        return type(base).from_pretrained(None, state_dict=base.state_dict(), **kwargs), "from the state_dict"
    except Exception as error:
        with tempfile.TemporaryDirectory(prefix="locedit-gpu-check-nf4-") as root:
            base.save_pretrained(root)
            route = f"through a saved copy (state_dict route: {type(error).__name__}: {error})"
            return type(base).from_pretrained(root, **kwargs), route


def section_nf4(check: Check) -> dict:
    import gpu_7b
    import torch
    from common import timed

    check.bitsandbytes()
    base = check.model()
    reference = check.measure_reference()
    (quantized, route), load_s = timed(lambda: load_nf4(base, check.device))
    base.to("cpu")  # so that the peak memory is the 4-bit model's alone
    try:
        if check.device == "cuda":
            torch.cuda.empty_cache()
        weights_gib = torch.cuda.memory_allocated() / 2**30 if check.device == "cuda" else None
        r = check.measure(quantized, check.single_spec)
    finally:
        del quantized
        gc.collect()
        base.to(check.device)
    # measure() counts parameters, and a 4-bit weight is stored packed: MFU from the unquantised model's FLOPs.
    peak = check.sizes.peak_tflops
    r["mfu"] = gpu_7b.flops_per_token(base, check.sizes.seq) * r["tokens_per_s"] / (peak * 1e12) if peak else None
    print(TRAIN_HEADER)
    print(_row(reference) + f" {check.dtype}")
    print(_row(r) + " nf4")
    ratio = r["ms_per_step"] / reference["ms_per_step"]
    return {
        "load_s": load_s,
        "route": route,
        "weights_gib": weights_gib,
        "nf4": r,
        "reference": reference,
        "nf4_over_reference_time": ratio,
        "summary": f"{check.single_spec}: nf4 {r['ms_per_step']:.1f} vs {reference['ms_per_step']:.1f} ms/step "
        f"({ratio:.2f}x), peak {_gib(r)} vs {_gib(reference)} GiB; quantised in {load_s:.0f} s {route}",
    }


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_section(name: str, check: Check, report: dict, deadline: float | None) -> None:
    budget = BUDGET_S[name][1 if check.small else 0]
    entry = {"budget_s": budget}
    left = None if deadline is None else deadline - time.perf_counter()
    if left is not None and left < budget:
        entry.update(status=f"skipped: out of time ({left:.0f} s left, budget {budget} s)", seconds=0.0)
        print(f"\n== {name}: {entry['status']}", flush=True)
        report["sections"][name] = entry
        return
    print(f"\n== {name} (budget {budget} s{f', {left:.0f} s left' if left is not None else ''})", flush=True)
    start = time.perf_counter()
    try:
        entry["results"] = globals()[f"section_{name}"](check)
        entry["status"] = "ok"
    except Skipped as reason:
        entry["status"] = f"skipped: {reason}"
    except Exception as error:  # recorded; the other sections still run
        entry["status"] = "error"
        entry["error"] = f"{type(error).__name__}: {error}"
        entry["traceback"] = traceback.format_exc()[-4000:]
        traceback.print_exc()
        check.discard_model()  # it may still carry an edit or a bank: the next section builds a fresh one
    if entry.get("results", {}).get("errors"):
        entry["status"] = "error (partly measured)"
    _free_memory()
    entry["seconds"] = time.perf_counter() - start
    over = ", OVER BUDGET" if entry["seconds"] > budget else ""
    print(f"== {name}: {entry['status']} in {entry['seconds']:.1f} s (budget {budget} s{over})", flush=True)
    report["sections"][name] = entry


def write_report(report: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2, default=str)
    os.replace(tmp, path)  # written after every section: a run stopped at its time limit keeps what it measured


def print_summary(report: dict, path: str) -> None:
    env = report["environment"]
    print("\n## gpu check summary\n")
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    print(f"{env['device']}; {versions}; {report['total_s']:.0f} s in all; figures in {path}\n")
    print("| section | status | seconds (budget) | figures |")
    print("| --- | --- | --- | --- |")
    for name, entry in report["sections"].items():
        figures = entry.get("results", {}).get("summary") or entry.get("error", "")
        print(f"| {name} | {entry['status']} | {entry['seconds']:.1f} ({entry['budget_s']}) | {figures} |")


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    import torch

    if not args.small and not torch.cuda.is_available():
        print("gpu_check.py: needs a CUDA GPU; use --small on a CPU", file=sys.stderr)
        sys.exit(2)
    wheels = install_wheels(args.wheels)
    report = {"environment": environment(wheels), "args": vars(args), "sections": {}}
    for key, value in report["environment"].items():
        print(f"{key}: {value}", flush=True)
    try:
        import common  # noqa: F401  (sets the offline, telemetry and progress-bar environment before TRL loads)
        import datasets
        import transformers

        import locedit.training  # noqa: F401  (TRL, datasets: what every section needs)
    except Exception as error:  # a missing or mismatched wheel: say so in the JSON too
        report["error"] = f"{type(error).__name__}: {error}"
        write_report(report, args.out)
        raise
    datasets.disable_progress_bars()  # the log that comes back from the GPU machine is its last 12,000 characters
    transformers.utils.logging.disable_progress_bar()
    check = Check(args)
    deadline = start + args.max_minutes * 60 if args.max_minutes else None
    for name in SECTIONS:
        if name in args.sections:
            run_section(name, check, report, deadline)
            report["total_s"] = time.perf_counter() - start
            write_report(report, args.out)
    report["total_s"] = time.perf_counter() - start
    write_report(report, args.out)
    print_summary(report, args.out)
    sys.exit(1 if any(e["status"].startswith("error") for e in report["sections"].values()) else 0)


if __name__ == "__main__":
    main()
