"""The toy model: a small Llama pre-trained from scratch on the toy world's text, the same on every machine.

`resolve_toy_model("toy")` (registered as a model source, so `model_name_or_path: toy` in a recipe) caches the model's
directory under `$LOCEDIT_CACHE/toy`, keyed by the settings and the code that builds it. The default model (`toy`) is
shipped with locedit (`locedit/toy/pretrained/`, 0.9 MB) and copied from there: pre-training is deterministic on one
machine but not across CPUs, so a model pre-trained elsewhere would describe another toy world than README's table.
Any other spec (`toy:layers=2`, ...), or the default one after the code that builds it changed, is pre-trained: the
tokenizer is built from the world's text (`locedit.models.tiny.build_tokenizer`), the model trained on every document
of the world with transformers' `Trainer`, both saved with `save_pretrained`. `toy_world.json` in the directory
records the spec, the training run and what built it.

`python -m locedit.toy.model check` pre-trains the default model here and compares it with the shipped one, bit for
bit; `python -m locedit.toy.model rebuild` replaces the shipped one (after a change to the world or the model).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import inspect
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import torch

from .. import processes
from ..core.cache import MANIFEST, build_cached, cache_key, cache_root
from ..core.errors import DamagedFileError
from ..core.files import file_digest
from ..models.tiny import BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID, build_tokenizer, tiny_config
from . import world as world_module
from .world import ToySettings, make_world, parse_toy_spec

TOY_INFO = "toy_world.json"
SHIPPED_DIR = Path(__file__).with_name("pretrained")  # the default toy model, as README's table and docs describe it
REBUILD_COMMAND = "python -m locedit.toy.model rebuild"


def toy_cache_dir() -> Path:
    """Where toy models are cached: `$LOCEDIT_CACHE/toy`, by default `~/.cache/locedit/toy`."""
    return cache_root() / "toy"


def _documents(tokenizer, corpus: list[str]) -> list[list[int]]:
    # One document per sequence, closed by eos: facts are learnt in the weights, never copied from a neighbour
    # document, and generation stops after an answer. No bos, as the prompts of every stage are encoded without one.
    return [tokenizer(doc)["input_ids"] + [EOS_TOKEN_ID] for doc in corpus]


def _log(message: str) -> None:
    # On stderr, flushed: progress, shown in order even where a caller keeps stdout back (the study's planning).
    print(message, file=sys.stderr, flush=True)


def _progress_callback(log, epochs: int):
    """A Trainer callback that logs the pre-training's loss as one line per logging step (in place of the Trainer's
    dict printout), with the epoch and the time so far."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                seconds = time.perf_counter() - self.start
                log(f"locedit toy:   epoch {state.epoch:.0f}/{epochs}, loss {logs['loss']:.4f} ({seconds:.0f} s)")

    return Progress()


def source_key(settings: ToySettings) -> str:
    """A hash of what the toy model of `settings` is made from: the settings, the world's code and the functions that
    build the tokenizer, the config and the model (not the library versions, unlike the cache's key: the shipped
    model serves every version; nor the rest of this module, so that a change elsewhere in it keeps the model)."""
    code = [Path(world_module.__file__).read_text()]
    code += [inspect.getsource(function) for function in _BUILDERS]
    blob = json.dumps({"settings": dataclasses.asdict(settings), "code": code}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _sources() -> list[Path]:
    return [Path(world_module.__file__), Path(__file__), Path(build_tokenizer.__code__.co_filename)]


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The CPU's vendor, family and model as the processor reports them (Linux), else what `platform` knows."""
    fields = {}
    with contextlib.suppress(OSError):
        for line in Path(cpuinfo).read_text().splitlines():
            if not line.strip():
                break  # the first processor's block describes them all
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    if {"vendor_id", "cpu family", "model"} <= fields.keys():
        return f"{fields['vendor_id']} family {fields['cpu family']} model {fields['model']}"
    return platform.processor() or "unknown"


def build_environment() -> dict:
    """What a pre-training's exact bits depend on beyond the code: the library versions and the CPU's kernels. The
    CPU's model counts beyond its capability: torch's BLAS (MKL) chooses its kernels by CPU, and two AVX512 CPUs
    pre-trained the toy model to other bits (and an edit of the toy study answered one question of 32 otherwise)."""
    return {
        "torch": version("torch"),
        "transformers": version("transformers"),
        "tokenizers": version("tokenizers"),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu": cpu_model(),
        "machine": platform.machine(),
    }


def made_like_the_shipped_model() -> bool:
    """Whether this machine and these libraries are the ones the shipped model, README's toy table and docs/toy_study
    were made with: only there are they reproduced bit for bit."""
    info = read_toy_info(SHIPPED_DIR)
    return info is not None and info.get("built_with") == build_environment()


def build_toy_model(settings: ToySettings, output_dir: str | Path, log=_log) -> Path:
    """Pre-train the toy model of `settings` and save it (with its tokenizer and `toy_world.json`) to `output_dir`."""
    import datasets
    from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling, Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    output_dir = Path(output_dir)
    start = time.perf_counter()
    world = make_world(settings)
    tokenizer = build_tokenizer(world.corpus, vocab_size=settings.vocab)
    config = tiny_config(
        "llama",
        vocab_size=len(tokenizer),
        num_layers=settings.layers,
        hidden_size=settings.hidden,
        num_heads=settings.heads,
    )
    torch.manual_seed(settings.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    model.generation_config.eos_token_id = EOS_TOKEN_ID
    model.generation_config.bos_token_id = BOS_TOKEN_ID

    documents = datasets.Dataset.from_dict({"input_ids": _documents(tokenizer, world.corpus)})
    steps_per_epoch = -(-len(documents) // settings.batch)
    args = TrainingArguments(
        output_dir=str(output_dir / "trainer"),
        num_train_epochs=settings.epochs,
        per_device_train_batch_size=settings.batch,
        learning_rate=settings.lr,
        lr_scheduler_type="cosine",
        warmup_steps=steps_per_epoch,
        weight_decay=0.0,
        logging_steps=steps_per_epoch * max(1, settings.epochs // 10),
        save_strategy="no",
        report_to="none",
        seed=settings.seed,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        train_sampling_strategy="group_by_length",  # documents of similar length in a batch: less padding
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=documents,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        callbacks=[_progress_callback(log, settings.epochs)],
    )
    trainer.remove_callback(PrinterCallback)  # its dicts on stdout; the progress callback logs instead
    log(
        f"locedit toy: pre-training a {settings.layers}-layer x {settings.heads}-head Llama (hidden "
        f"{settings.hidden}, {model.num_parameters():,} parameters) on the {len(documents)} documents of the toy "
        f"world, {settings.epochs} epochs (once: it is cached)"
    )
    result = trainer.train()
    model = trainer.model.to("cpu").eval()
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    seconds = time.perf_counter() - start
    info = {
        "spec": settings.spec(),
        "settings": dataclasses.asdict(settings),
        "documents": len(documents),
        "tokens": sum(len(ids) for ids in documents["input_ids"]),
        "parameters": model.num_parameters(),
        "train_loss": result.training_loss,
        "final_loss": next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None),
        "steps": trainer.state.global_step,
        "seconds": round(seconds, 1),
        "threads": torch.get_num_threads(),
        "source_key": source_key(settings),
        "built_with": build_environment(),
    }
    (output_dir / TOY_INFO).write_text(json.dumps(info, indent=2))
    shutil.rmtree(output_dir / "trainer", ignore_errors=True)  # the Trainer's scratch directory (no checkpoints)
    log(f"locedit toy: pre-trained in {seconds:.0f} s (final loss {info['final_loss']})")
    return output_dir


# The code a toy model is made by, for `source_key` (bound here: a caller's replacement of a name is not the code).
_BUILDERS = (build_tokenizer, tiny_config, _documents, build_toy_model)


def toy_model_dir(settings: ToySettings) -> Path:
    """The cache directory of the toy model of `settings` (whether or not it is built yet)."""
    # The world generator and the model builder are in the key: changing either invalidates cached models.
    name = settings.spec().replace(":", "-").replace(",", "-")
    return toy_cache_dir() / f"{name}-{cache_key(dataclasses.asdict(settings), _sources())}"


def resolve_toy_model(spec: str) -> str:
    """The directory of the pre-trained toy model a spec names (`toy`, `toy:layers=2`, ...), built on first use: the
    shipped model where it is the one the spec names, else pre-trained here."""
    settings = parse_toy_spec(spec)

    def build(tmp: Path) -> None:
        if shipped_model_of(settings):
            copy_shipped_model(tmp)
        elif processes.count() > 1:
            _build_alone(settings, tmp)
        else:
            build_toy_model(settings, tmp)

    return str(build_cached(toy_model_dir(settings), build))


def shipped_model_of(settings: ToySettings, shipped: Path = SHIPPED_DIR) -> bool:
    """Whether the shipped model is the toy model of `settings` with this code; says why not where it should be."""
    info = read_toy_info(shipped)
    if info is None or info.get("spec") != settings.spec():
        return False
    if info.get("source_key") != source_key(settings):
        _log(
            f"locedit toy: the shipped toy model was built by other code of the toy world or model than this one "
            f"(rebuild it with `{REBUILD_COMMAND}`); pre-training it here instead"
        )
        return False
    return True


def _model_files(directory: Path) -> list[str]:
    """The names of a toy model directory's files, the record of its run and the cache's manifest aside."""
    return [
        path.name
        for path in sorted(Path(directory).iterdir())
        if path.is_file() and path.name not in (TOY_INFO, MANIFEST)
    ]


def _file_hashes(directory: Path) -> dict[str, str]:
    return {name: file_digest(Path(directory) / name) for name in _model_files(directory)}


def copy_shipped_model(output_dir: Path, shipped: Path = SHIPPED_DIR) -> None:
    """Copy the shipped model's files to `output_dir`, each checked against the hash its `toy_world.json` records."""
    info = read_toy_info(shipped)
    expected = info.get("files", {})
    found = _file_hashes(shipped)
    if not expected or found != expected:
        damaged = sorted(name for name in expected.keys() | found.keys() if expected.get(name) != found.get(name))
        raise DamagedFileError(
            f"the toy model shipped in '{shipped}' is damaged ({', '.join(damaged) or 'no file hashes'} differ from "
            f"its {TOY_INFO}); reinstall locedit or rebuild it with `{REBUILD_COMMAND}`"
        )
    for name in [*found, TOY_INFO]:
        shutil.copyfile(shipped / name, Path(output_dir) / name)
    _log(
        f"locedit toy: the toy model shipped with locedit ({info['parameters']:,} parameters, pre-trained with torch "
        f"{info['built_with']['torch']} on {info['built_with']['cpu_capability']}), no pre-training needed"
    )


def _build_alone(settings: ToySettings, output_dir: Path) -> None:
    """Pre-train in a child process outside the launch's process group: a Trainer inside the group would train data
    parallel and wait for the other processes, which wait for the model (`build_cached`)."""
    code = "import sys; from locedit.toy.model import build_toy_model, parse_toy_spec; "
    code += "build_toy_model(parse_toy_spec(sys.argv[1]), sys.argv[2])"
    command = [sys.executable, "-c", code, settings.spec(), str(output_dir)]
    subprocess.run(command, env=processes.solo_environment(), check=True)


def read_toy_info(model_path: str | Path) -> dict | None:
    """The `toy_world.json` of a toy model directory, or None for any other model."""
    path = Path(model_path) / TOY_INFO
    return json.loads(path.read_text()) if path.is_file() else None


# ---------------------------------------------------------------------------------------------------------------------
# The shipped model: rebuilt and checked by `python -m locedit.toy.model rebuild|check`
# ---------------------------------------------------------------------------------------------------------------------


def compare_models(built: Path, shipped: Path = SHIPPED_DIR) -> list[str]:
    """How a model pre-trained here differs from the shipped one: every weight bit for bit and every other file byte
    for byte (the record of the run aside). An empty list: they are the same model."""
    from safetensors.torch import load_file

    differences = []
    for name in sorted(set(_model_files(built)) | set(_model_files(shipped))):
        ours, theirs = Path(built) / name, shipped / name
        if not ours.is_file() or not theirs.is_file():
            differences.append(f"{name}: only in {'the rebuild' if ours.is_file() else 'the shipped model'}")
        elif name.endswith(".safetensors"):
            a, b = load_file(ours), load_file(theirs)
            for key in sorted(a.keys() | b.keys()):
                if key not in a or key not in b or a[key].shape != b[key].shape:
                    differences.append(f"{name}: {key} is missing or of another shape")
                elif not torch.equal(a[key], b[key]):
                    gap = (a[key] - b[key]).abs().max().item()
                    differences.append(f"{name}: {key} differs (largest difference {gap:.3g})")
        elif ours.read_bytes() != theirs.read_bytes():
            differences.append(f"{name}: differs")
    return differences


def rebuild_shipped(shipped: Path = SHIPPED_DIR) -> None:
    """Pre-train the default toy model and make it the shipped one, with its files' hashes in `toy_world.json`."""
    tmp = Path(tempfile.mkdtemp(prefix=".pretrained.tmp-", dir=shipped.parent))
    try:
        build_toy_model(ToySettings(), tmp)
        info = read_toy_info(tmp)
        info["files"] = _file_hashes(tmp)
        (tmp / TOY_INFO).write_text(json.dumps(info, indent=2) + "\n")
        tmp.chmod(0o755)  # a temporary directory is private; the shipped one is read by every user
        shutil.rmtree(shipped, ignore_errors=True)
        tmp.rename(shipped)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _log(f"locedit toy: shipped toy model rebuilt in '{shipped}'")


def check_shipped(shipped: Path = SHIPPED_DIR) -> list[str]:
    """Pre-train the default toy model here and return how it differs from the shipped one ([] when bit for bit)."""
    with tempfile.TemporaryDirectory(prefix="locedit-toy-check-") as tmp:
        build_toy_model(ToySettings(), tmp)
        return compare_models(Path(tmp), shipped)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m locedit.toy.model", description="The toy model shipped with locedit (locedit/toy/pretrained)."
    )
    parser.add_argument(
        "action",
        choices=["check", "rebuild"],
        help="check: pre-train it here and compare bit for bit; rebuild: pre-train it here and ship that one",
    )
    args = parser.parse_args(argv)
    if args.action == "rebuild":
        rebuild_shipped()
        return 0
    differences = check_shipped()
    here, there = build_environment(), read_toy_info(SHIPPED_DIR)["built_with"]
    if not differences:
        print("the toy model pre-trained here is the shipped one, bit for bit")
        return 0
    print(f"the toy model pre-trained here differs from the shipped one in {len(differences)} place(s):")
    print("\n".join(f"  {line}" for line in differences))
    changed = [f"{key} {there.get(key)} there, {value} here" for key, value in here.items() if there.get(key) != value]
    print("built with: " + ("; ".join(changed) if changed else "the same library versions and CPU kernels"))
    return 1


if __name__ == "__main__":
    sys.exit(main())
