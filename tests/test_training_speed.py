"""Training does only the work its run needs: reference log-probs for the pairs it uses, once across runs; a bounded
validation pass; and it reports seconds per step and tokens per second."""

from __future__ import annotations

import os
import re

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from locedit import AttentionLayout, HeadEditConfig, resolve_heads
from locedit.config import LocEditConfig, parse_recipe
from locedit.data import load_preference_splits
from locedit.training import LocEditTrainer, training_inputs
from locedit.training.reference import ReferenceLogpCache, base_weights_digest, reference_model_key

FAST = ["--dataset", "synthetic:40", "--report_to", "none", "--save_strategy", "no"]


class Plan:
    """What training_inputs reads of a RunPlan: the splits."""

    def __init__(self, splits):
        self.splits = splits


@pytest.fixture(scope="module")
def splits():
    return load_preference_splits("synthetic:40", split_fractions=(0.6, 0.2, 0.2), seed=0)


def training_args(tmp_path, **overrides) -> LocEditConfig:
    settings = dict(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        use_cpu=True,
    )
    return LocEditConfig(**{**settings, **overrides})


def test_the_question_draw_covers_every_question_once_per_epoch_with_a_fresh_pair(splits, tmp_path):
    questions = splits["train"]["question_id"]
    pairs_of = {q: questions.count(q) for q in set(questions)}
    assert max(pairs_of.values()) > 1 and len(pairs_of) < len(questions)  # many pairs per question
    args = training_args(tmp_path, num_train_epochs=3, eval_strategy="no")
    inputs = training_inputs(Plan(splits), args)
    drawn = inputs["train_dataset"]
    assert len(drawn) == 3 * len(pairs_of) and inputs["args"].max_steps == -(-len(drawn) // 4)
    assert args.max_steps == -1  # the recipe's own arguments are left as they were
    # One pass in the laid-out order (transformers' sequential sampler); the recipe's args keep the shuffle.
    assert inputs["args"].train_sampling_strategy == "sequential" and args.train_sampling_strategy == "random"
    key = {
        (p, c, r): q
        for p, c, r, q in zip(
            *(splits["train"][k] for k in ("prompt", "chosen", "rejected", "question_id")), strict=True
        )
    }
    rows = [key[row] for row in zip(drawn["prompt"], drawn["chosen"], drawn["rejected"], strict=True)]
    pairs = list(zip(drawn["prompt"], drawn["chosen"], drawn["rejected"], strict=True))
    for epoch in range(3):
        assert sorted(rows[epoch * len(pairs_of) : (epoch + 1) * len(pairs_of)]) == sorted(pairs_of)
    for q, count in pairs_of.items():  # a fresh pair each epoch while the question has one
        used = [pair for pair, question in zip(pairs, rows, strict=True) if question == q]
        assert len(set(used)) == min(3, count)
    # max_steps: the first max_steps x batch rows of the same order, each a different question.
    short = training_inputs(Plan(splits), training_args(tmp_path, max_steps=3, eval_strategy="no"))["train_dataset"]
    assert short["chosen"] == drawn["chosen"][:12] and len(set(rows[:12])) == 12
    # Seeded: data_seed changes the draw.
    other = training_inputs(Plan(splits), training_args(tmp_path, max_steps=3, data_seed=7, eval_strategy="no"))
    assert other["train_dataset"]["chosen"] != short["chosen"]


def test_max_steps_bounds_the_training_pairs_to_a_seeded_draw(splits, tmp_path):
    args = training_args(tmp_path, max_steps=3, eval_strategy="no", pair_draw="pair")
    first = training_inputs(Plan(splits), args)
    again = training_inputs(Plan(splits), args)
    assert len(first["train_dataset"]) == 12 < len(splits["train"])  # 3 steps x 4 pairs
    assert first["train_dataset"]["chosen"] == again["train_dataset"]["chosen"]
    assert set(first["train_dataset"]["prompt"]) <= set(splits["train"]["prompt"])
    # An epoch-long run keeps every pair.
    whole = training_inputs(Plan(splits), training_args(tmp_path, eval_strategy="no", pair_draw="pair"))
    assert len(whole["train_dataset"]) == len(splits["train"])


def test_validation_pairs_follow_eval_strategy_and_the_cap(splits, tmp_path):
    assert training_inputs(Plan(splits), training_args(tmp_path, eval_strategy="no"))["eval_dataset"] is None
    capped = training_inputs(Plan(splits), training_args(tmp_path, eval_strategy="epoch", max_eval_pairs=5))
    assert len(capped["eval_dataset"]) == 5 < len(splits["validation"])
    every = training_inputs(Plan(splits), training_args(tmp_path, eval_strategy="epoch", max_eval_pairs=None))
    assert len(every["eval_dataset"]) == len(splits["validation"])


def test_max_eval_pairs_must_be_positive(capsys):
    from locedit.train import cli

    assert cli(["recipes/tiny.yaml", "--max_eval_pairs", "0", "--dry_run", "true"]) == 2
    assert "max_eval_pairs 0" in capsys.readouterr().err


def _trainer(model_dir, splits, tmp_path, cache: bool, steps: int = 2):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    layout = AttentionLayout.from_model(model)
    args = training_args(tmp_path, max_steps=steps, eval_strategy="epoch", cache_ref_log_probs=cache)
    return LocEditTrainer(
        model=model,
        **training_inputs(Plan(splits), args),
        processing_class=tokenizer,
        peft_config=HeadEditConfig.for_heads(layout, resolve_heads("random:2", layout)),
    )


def test_cached_reference_log_probs_equal_trls_and_are_computed_once(
    tiny_model_dir, splits, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("LOCEDIT_CACHE", str(tmp_path / "cache"))  # a cache no other test has filled
    model_dir = tiny_model_dir("llama")
    plain = _trainer(model_dir, splits, tmp_path, cache=False)
    cached = _trainer(model_dir, splits, tmp_path, cache=True)
    first = capsys.readouterr().out
    again = _trainer(model_dir, splits, tmp_path, cache=True)
    second = capsys.readouterr().out
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        assert cached.train_dataset[column] == plain.train_dataset[column]
        assert again.train_dataset[column] == plain.train_dataset[column]
        assert again.eval_dataset[column] == plain.eval_dataset[column]
    assert "train pairs: 0 of 8 from the cache, 8 to compute" in first
    assert "train pairs: 8 of 8 from the cache, 0 to compute" in second
    assert f"eval pairs: {len(splits['validation'])} of {len(splits['validation'])} from the cache" in second
    # More steps: only the pairs not seen before are computed.
    _trainer(model_dir, splits, tmp_path, cache=True, steps=4)
    line = next(line for line in capsys.readouterr().out.splitlines() if "train pairs" in line)
    cached, computed = (int(n) for n in re.match(r".*: (\d+) of 16 from the cache, (\d+) to compute", line).groups())
    assert cached >= 1 and computed == 16 - cached


def test_the_reference_key_is_the_base_models_with_or_without_an_edit(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("llama")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = training_args(tmp_path)
    plain = base_weights_digest(model)
    key = reference_model_key(model, args)
    layout = AttentionLayout.from_model(model)
    wrapped = get_peft_model(model, HeadEditConfig.for_heads(layout, resolve_heads("all", layout)))
    with torch.no_grad():
        for name, parameter in wrapped.named_parameters():
            if "lora_B" in name:
                parameter.fill_(1.0)  # a trained edit: still the same base model
    assert base_weights_digest(wrapped) == plain and reference_model_key(wrapped, args) == key
    with torch.no_grad():
        wrapped.base_model.model.model.layers[0].mlp.down_proj.weight[0, 0] += 1.0
    assert base_weights_digest(wrapped) != plain
    assert reference_model_key(model, training_args(tmp_path, max_length=64)) != key


def test_a_damaged_cache_file_is_recomputed(tmp_path):
    path = tmp_path / "key.safetensors"
    cache = ReferenceLogpCache(str(path))
    cache.add({b"k" * 16: (-1.5, -2.5)})
    assert cache.read() == {b"k" * 16: (-1.5, -2.5)}
    path.write_bytes(b"not a safetensors file")
    assert cache.read() == {}


def test_a_run_reports_seconds_per_step_and_tokens_per_second(tmp_path, capsys):
    from locedit.train import main

    out_dir = tmp_path / "run"
    main(parse_recipe(["recipes/tiny.yaml", *FAST, "--max_steps", "3", "--output_dir", str(out_dir)]))
    printed = capsys.readouterr().out
    assert "s/step" in printed and "tokens/s" in printed and "epochs" not in printed.split("training ")[1][:60]
    import json

    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["train_seconds_per_step"] > 0 and metrics["train_tokens_per_second"] > 0
    assert os.path.isdir(out_dir)


def test_an_overwritten_cache_entry_is_computed_again_not_trusted(tmp_path, capsys):
    """A cache file whose values were changed (still a valid file) loses those entries, with a notice; the others
    stay; a file written without checksums is not trusted at all."""
    from safetensors.torch import load_file, save_file

    path = tmp_path / "key.safetensors"
    cache = ReferenceLogpCache(str(path))
    cache.add({b"a" * 16: (-1.5, -2.5), b"b" * 16: (-3.0, -4.0), b"c" * 16: (-5.0, -6.0)})
    tensors = load_file(path)
    tensors["chosen"][1] = -24495.0  # overwritten, as a stray write or a hand edit would
    tensors["rejected"][2] = float("nan")
    save_file(tensors, path)
    assert cache.read(notice=True) == {b"a" * 16: (-1.5, -2.5)}
    assert "2 entries of the reference log-prob cache" in capsys.readouterr().out
    save_file({name: tensor for name, tensor in tensors.items() if name != "checks"}, path)
    assert cache.read(notice=True) == {}
    assert "does not read" in capsys.readouterr().out


def test_the_reference_key_names_how_the_pairs_are_scored(tiny_model_dir, tmp_path):
    """Log-probs scored with other switches or another attention implementation are equal only to float tolerance:
    they are cached apart."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), dtype=torch.float32)
    key = reference_model_key(model, training_args(tmp_path))
    for switch in ("score_completions_only", "share_prompt", "frozen_prefix", "pack_sequences"):
        assert reference_model_key(model, training_args(tmp_path, **{switch: False})) != key
    model.config._attn_implementation = "eager" if model.config._attn_implementation != "eager" else "sdpa"
    assert reference_model_key(model, training_args(tmp_path)) != key
