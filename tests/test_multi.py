"""Many edits in one run end exactly where their separate runs end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from locedit import AttentionLayout, load_edit, resolve_heads
from locedit.config import parse_recipe
from locedit.core.errors import HeadSpecError
from locedit.heads import HeadSpec
from locedit.rundir import expand_run_dirs
from locedit.train import main
from locedit.training.multi import EditBank, replicate_batch

# Short runs on 40 synthetic questions; a small max_grad_norm so that per-edit clipping is active at every step.
COMMON = [
    "recipes/tiny.yaml",
    "--dataset",
    "synthetic:40",
    "--report_to",
    "none",
    "--save_strategy",
    "no",
    "--max_steps",
    "6",
    "--learning_rate",
    "5.0e-2",
    "--max_grad_norm",
    "0.02",
    "--logging_steps",
    "1",
]


def adapter_tensors(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / "adapter_model.safetensors"))


@pytest.mark.parametrize("edit_strength", ["adaptive", "constant"])
def test_k_edits_in_one_run_equal_k_separate_runs(tmp_path, edit_strength):
    flags = [*COMMON, "--edit_strength", edit_strength, "--heads", "random:2"]
    multi_dir = tmp_path / "multi"
    main(parse_recipe([*flags, "--heads_draws", "3", "--output_dir", str(multi_dir)]))
    summary = json.loads((multi_dir / "metrics.json").read_text())
    assert len(summary["edits"]) == 3

    for seed, edit_dir in enumerate(expand_run_dirs([str(multi_dir)])):
        separate_dir = tmp_path / f"separate-{seed}"
        main(parse_recipe([*flags, "--heads_seed", str(seed), "--output_dir", str(separate_dir)]))
        # The same heads, recorded the same way.
        heads = json.loads((Path(edit_dir) / "heads.json").read_text())
        assert heads == json.loads((separate_dir / "heads.json").read_text())
        multi, separate = adapter_tensors(edit_dir), adapter_tensors(separate_dir)
        assert multi.keys() == separate.keys()  # the same files PEFT writes, layer by layer
        assert all(separate[key].abs().max() > 0 for key in separate if "lora_B" in key)  # training moved b
        for key in separate:
            torch.testing.assert_close(multi[key], separate[key], atol=2e-6, rtol=1e-4, msg=key)
    # Clipping was active: a separate run's pre-clip gradient norm exceeded max_grad_norm.
    history = json.loads((separate_dir / "trainer_state.json").read_text())["log_history"]
    assert max(entry["grad_norm"] for entry in history if "grad_norm" in entry) > 0.02


def test_saved_edits_load_as_ordinary_edits(tmp_path, tiny_model_dir):
    out = tmp_path / "singles"
    main(parse_recipe([*COMMON, "--heads", "single:2", "--output_dir", str(out)]))
    edits = expand_run_dirs([str(out)])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"))
    layout = AttentionLayout.from_model(base)
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    base_logits = base(ids).logits
    for head, edit_dir in zip(resolve_heads("random:2", layout, seed=0), edits, strict=True):
        assert json.loads((Path(edit_dir) / "heads.json").read_text())["heads"] == [list(head)]
        for name in ["recipe.yaml", "splits.json", "metrics.json", "adapter_config.json"]:
            assert (Path(edit_dir) / name).is_file()
        edited = load_edit(base, edit_dir)
        assert not torch.allclose(edited(ids).logits, base_logits, atol=1e-5)
        base = edited.unload()


def test_bank_applies_edit_k_to_block_k_only():
    layout = AttentionLayout("llama", num_layers=2, num_heads=4, projection_template="model.layers.{layer}.o_proj")
    head_sets = [[(0, 1)], [(0, 2), (1, 0)], [(1, 3)]]
    bank = EditBank(layout, in_features=16, head_sets=head_sets)
    for p in bank.parameters():
        p.data.normal_()
    # [chosen x 3 edits; rejected x 3 edits], 2 pairs each; or one row per pair when the prompt is shared.
    for halves in (2, 1):
        o = torch.randn(halves * 3 * 2, 5, 16)
        with bank.replicating(pairs_per_edit=2):
            delta = bank.input_delta(o, layer=0).view(halves, 3, 2, 5, 16)
        blocks = o.view(halves, 3, 2, 5, 16)
        for k in range(3):
            a, b = bank.a["0"][k], bank.b["0"][k] * bank.mask(0)[k]
            expected = (blocks[:, k] @ a).unsqueeze(-1) * b
            torch.testing.assert_close(delta[:, k], expected)
        assert torch.equal(delta[:, 2], torch.zeros_like(delta[:, 2]))  # edit 2 has no head in layer 0


def test_replicate_batch_is_edit_major_within_chosen_and_rejected():
    batch = {"input_ids": torch.arange(4)[:, None].repeat(1, 3), "ref_chosen_logps": torch.tensor([1.0, 2.0])}
    out = replicate_batch(batch, 3)
    assert out["input_ids"][:, 0].tolist() == [0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3]
    assert out["ref_chosen_logps"].tolist() == [1.0, 2.0] * 3


def test_a_multi_edit_run_names_and_describes_each_edit_by_its_draw(tmp_path, head_spec_parses):
    """The recipe's spec is parsed once; each edit's directory name and heads.json take its draw's spec, not a parse
    of the draw written back into a recipe."""
    main(parse_recipe([*COMMON, "--heads", "random:2", "--heads_draws", "2", "--output_dir", str(tmp_path / "m")]))
    assert head_spec_parses == ["random:2"]
    edits = [Path(edit_dir) for edit_dir in expand_run_dirs([str(tmp_path / "m")])]
    assert [edit.name.split("-lr")[0] for edit in edits] == ["random2-hs0", "random2-hs1"]
    for seed, edit in enumerate(edits):
        heads = json.loads((edit / "heads.json").read_text())
        assert (heads["spec"], heads["heads_seed"], heads["family"]) == ("random:2", seed, "random-2")


def expand_head_specs(spec: str, seed: int, draws: int, layout) -> list[tuple[str, int]]:
    """(spec, seed) of every edit of a run of this spec."""
    return [(edit.text, edit.seed) for edit in HeadSpec.parse(spec, seed, draws, layout).edits(layout)]


def test_head_spec_expansion_and_errors():
    layout = AttentionLayout("llama", num_layers=4, num_heads=8, projection_template="model.layers.{layer}.o_proj")
    # single:K is K distinct heads: those of random:K with the same seed, one edit each.
    singles = expand_head_specs("single:32", 5, 1, layout)
    assert [seed for _, seed in singles] == [5] * 32
    heads = [resolve_heads(spec, layout)[0] for spec, _ in singles]
    assert heads == resolve_heads("random:32", layout, seed=5) and len(set(heads)) == 32
    assert expand_head_specs("random:16", 0, 2, layout) == [("random:16", 0), ("random:16", 1)]
    assert expand_head_specs("all", 0, 1, layout) == [("all", 0)]
    for spec, draws in [("all", 3), ("single:0", 1), ("single:2", 2), ("random:4", 0), ("single:33", 1)]:
        with pytest.raises(HeadSpecError, match="single|draws|random"):
            expand_head_specs(spec, 0, draws, layout)


def test_an_interrupted_multi_edit_run_resumes_to_the_same_edits(tmp_path):
    flags = [
        *COMMON,
        "--heads",
        "single:2",
        "--save_strategy",
        "steps",
        "--save_steps",
        "2",
        "--eval_strategy",
        "epoch",
    ]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    main(parse_recipe([*flags, "--output_dir", str(whole)]))
    shutil.copytree(whole / "checkpoint-4", resumed / "checkpoint-4")  # as if the run had died after step 4
    # A checkpoint holds the edits only, never the frozen base model.
    checkpoint = resumed / "checkpoint-4"
    assert (checkpoint / "locedit_bank.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()
    main(parse_recipe([*flags, "--output_dir", str(resumed)]))
    history = json.loads((resumed / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in history if "loss" in entry] == [1, 2, 3, 4, 5, 6]
    losses = json.loads((resumed / "metrics.json").read_text())
    assert 20 < losses["train_loss"] < 30 and 20 < losses["eval_loss"] < 30  # means per edit, not sums
    for ours, theirs in zip(expand_run_dirs([str(resumed)]), expand_run_dirs([str(whole)]), strict=True):
        a, b = adapter_tensors(ours), adapter_tensors(theirs)
        for key in b:
            torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


def test_a_share_of_a_multi_edit_run_makes_its_edits_exactly_and_completes_the_run(tmp_path):
    """A study's share of a family (some of a multi-edit run's edits, trained as their own run on one process) makes
    the same edits, bit for bit, and the same per-edit measures; once every share has ended the run reads as one."""
    from locedit.pipelines.train import complete_multi_edit_run, multi_edit_names, train_share

    flags = [*COMMON, "--heads", "random:2", "--heads_draws", "3"]
    whole_dir, shared_dir = tmp_path / "whole", tmp_path / "shared"
    main(parse_recipe([*flags, "--output_dir", str(whole_dir)]))
    recipe = parse_recipe([*flags, "--output_dir", str(shared_dir)])
    names = multi_edit_names(recipe)
    assert names == [Path(edit).name for edit in expand_run_dirs([str(whole_dir)])]
    train_share(parse_recipe([*flags, "--output_dir", str(shared_dir)]), [names[1]])
    assert not complete_multi_edit_run(recipe)  # two edits are still to train
    train_share(parse_recipe([*flags, "--output_dir", str(shared_dir)]), [names[0], names[2]])
    assert complete_multi_edit_run(recipe)

    assert [Path(edit).name for edit in expand_run_dirs([str(shared_dir)])] == names
    whole_losses = json.loads((whole_dir / "metrics.json").read_text())["train_pairs_loss"]
    own_losses = []
    for name in names:
        ours, theirs = adapter_tensors(shared_dir / name), adapter_tensors(whole_dir / name)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in theirs), name
        mine = json.loads((shared_dir / name / "metrics.json").read_text())
        whole = json.loads((whole_dir / name / "metrics.json").read_text())
        for key in ("train_pairs_loss", "train_diverged", "train_divergence"):
            assert mine[key] == whole[key], (name, key)
        own_losses.append(whole["train_pairs_loss"])
    # Each edit's reached loss is its own: they differ, and their mean is the run's (TRL's mean over every pair).
    assert len(set(own_losses)) == 3
    assert sum(own_losses) / 3 == pytest.approx(whole_losses, rel=1e-5)
    # The run reads as finished: the same command finds it done and trains nothing.
    assert json.loads((shared_dir / "metrics.json").read_text())["edits"] == names
