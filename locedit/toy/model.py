"""The toy model: a small Llama pre-trained from scratch on the toy world's text, cached once per machine.

`resolve_toy_model("toy")` (registered as a model source, so `model_name_or_path: toy` in a recipe) builds the
tokenizer from the world's text (`locedit.models.tiny.build_tokenizer`), pre-trains the model on every document of the
world with transformers' `Trainer`, saves both with `save_pretrained` and caches the directory under
`$LOCEDIT_CACHE/toy` keyed by the settings and the code that builds it. `toy_world.json` in the directory records
the spec and the training run.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from .. import processes
from ..core.cache import build_cached, cache_key, cache_root
from ..models.tiny import BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID, build_tokenizer, tiny_config
from . import world as world_module
from .world import ToySettings, make_world, parse_toy_spec

TOY_INFO = "toy_world.json"


def toy_cache_dir() -> Path:
    """Where toy models are cached: `$LOCEDIT_CACHE/toy`, by default `~/.cache/locedit/toy`."""
    return cache_root() / "toy"


def _documents(tokenizer, corpus: list[str]) -> list[list[int]]:
    # One document per sequence, closed by eos: facts are learnt in the weights, never copied from a neighbour
    # document, and generation stops after an answer. No bos, as the prompts of every stage are encoded without one.
    return [tokenizer(doc)["input_ids"] + [EOS_TOKEN_ID] for doc in corpus]


def build_toy_model(settings: ToySettings, output_dir: str | Path, log=print) -> Path:
    """Pre-train the toy model of `settings` and save it (with its tokenizer and `toy_world.json`) to `output_dir`."""
    import datasets
    from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling, Trainer, TrainingArguments

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
    )
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
    }
    (output_dir / TOY_INFO).write_text(json.dumps(info, indent=2))
    shutil.rmtree(output_dir / "trainer", ignore_errors=True)  # the Trainer's scratch directory (no checkpoints)
    log(f"locedit toy: pre-trained in {seconds:.0f} s (final loss {info['final_loss']})")
    return output_dir


def toy_model_dir(settings: ToySettings) -> Path:
    """The cache directory of the toy model of `settings` (whether or not it is built yet)."""
    # The world generator and the model builder are in the key: changing either invalidates cached models.
    sources = [Path(world_module.__file__), Path(__file__), Path(build_tokenizer.__code__.co_filename)]
    name = settings.spec().replace(":", "-").replace(",", "-")
    return toy_cache_dir() / f"{name}-{cache_key(dataclasses.asdict(settings), sources)}"


def resolve_toy_model(spec: str) -> str:
    """The directory of the pre-trained toy model a spec names (`toy`, `toy:layers=2`, ...), built on first use."""
    settings = parse_toy_spec(spec)
    build = _build_alone if processes.count() > 1 else build_toy_model
    return str(build_cached(toy_model_dir(settings), lambda tmp: build(settings, tmp)))


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
