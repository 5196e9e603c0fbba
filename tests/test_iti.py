"""ITI's edit as a locedit edit: bias form against the hook form of eq. 2.5, run directories like trained runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from locedit import cli as locedit_cli
from locedit import load_edit
from locedit.config import parse_recipe
from locedit.edit import add_iti_edit, edit_layers, iti_vectors
from locedit.heads import resolve_heads
from locedit.locate import ProbeResult
from locedit.models.layout import AttentionLayout
from locedit.plan import make_plan
from locedit.rundir import expand_run_dirs, write_run_description
from locedit.train import main as train_main

REPO = Path(__file__).resolve().parents[1]
TINY_PROBE = str(REPO / "recipes" / "tiny_probe.yaml")
IDS = torch.tensor([[5, 17, 42, 99, 3, 8, 21], [7, 7, 30, 11, 64, 2, 19]])


def random_result(layout: AttentionLayout, head_dim: int, seed: int = 0) -> ProbeResult:
    generator = torch.Generator().manual_seed(seed)
    shape = (layout.num_layers, layout.num_heads)
    return ProbeResult(
        val_accuracy=torch.rand(shape, generator=generator),
        train_accuracy=torch.rand(shape, generator=generator),
        direction=torch.nn.functional.normalize(torch.randn(*shape, head_dim, generator=generator), dim=-1),
        sigma=torch.rand(shape, generator=generator) + 1.0,
        weight=torch.zeros(*shape, head_dim),
        bias=torch.zeros(shape),
        info={"model_type": layout.model_type},
    )


def hooked(model, vectors: dict[int, torch.Tensor]):
    """Eq. 2.5 literally: add alpha * theta to the output projection's input (the concatenated head outputs)."""
    layout = AttentionLayout.from_model(model)
    projections = layout.projections(model)
    return [
        projections[layer].register_forward_pre_hook(lambda m, args, v=vector: (args[0] + v, *args[1:]))
        for layer, vector in vectors.items()
    ]


def test_iti_as_a_bias_equals_iti_as_a_hook(core_arch_dir):
    base = AutoModelForCausalLM.from_pretrained(core_arch_dir)
    reference = AutoModelForCausalLM.from_pretrained(core_arch_dir)
    layout = AttentionLayout.from_model(base)
    result = random_result(layout, layout.head_dim(base))
    heads, alpha = resolve_heads("L0H1,L1H0,L1H3", layout), 4.0
    with torch.no_grad():
        base_logits = reference(IDS).logits
        handles = hooked(reference, iti_vectors(result, heads, alpha))
        hook_logits = reference(IDS).logits
        hook_tokens = reference.generate(IDS[:1], max_new_tokens=6, do_sample=False)

        edited = add_iti_edit(base, result, heads, alpha)
        assert not torch.allclose(hook_logits, base_logits, atol=1e-3)  # the edit does something
        torch.testing.assert_close(edited(IDS).logits, hook_logits, atol=1e-5, rtol=1e-4)  # unmerged: on the input
        edited.merge_adapter()  # merged: the projection's bias gains W (alpha theta)
        for module in edit_layers(edited).values():
            assert module.get_base_layer().bias is not None
        torch.testing.assert_close(edited(IDS).logits, hook_logits, atol=1e-5, rtol=1e-4)
        # Every position, generated tokens included.
        assert torch.equal(edited.generate(input_ids=IDS[:1], max_new_tokens=6, do_sample=False), hook_tokens)
        edited.unmerge_adapter()
        with edited.disable_adapter():
            torch.testing.assert_close(edited(IDS).logits, base_logits, atol=1e-6, rtol=0)
    for handle in handles:
        handle.remove()


def test_a_bias_without_the_w_projection_is_a_different_edit(tiny_model_dir):
    """The known mistake: setting the projection's bias to alpha * theta itself, not W (alpha * theta)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("gpt2"))
    layout = AttentionLayout.from_model(model)
    result = random_result(layout, layout.head_dim(model))
    heads = resolve_heads("L1H2", layout)
    vector = iti_vectors(result, heads, 4.0)[1]
    with torch.no_grad():
        right = add_iti_edit(AutoModelForCausalLM.from_pretrained(tiny_model_dir("gpt2")), result, heads, 4.0)(IDS)
        layout.projections(model)[1].bias += vector  # hidden size == o_proj input size here, so it "fits"
        assert not torch.allclose(model(IDS).logits, right.logits, atol=1e-3)


def test_alpha_zero_is_the_base_model(tiny_model_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"))
    with torch.no_grad():
        base_logits = base(IDS).logits
    layout = AttentionLayout.from_model(base)
    edited = add_iti_edit(base, random_result(layout, 16), resolve_heads("random:3", layout, seed=1), 0.0)
    with torch.no_grad():
        assert torch.equal(edited(IDS).logits, base_logits)
        edited.merge_adapter()
        torch.testing.assert_close(edited(IDS).logits, base_logits, atol=1e-6, rtol=0)


def test_iti_command_probes_first_and_writes_a_run_directory_like_a_trained_run(tmp_path, tiny_model_dir):
    probe_dir, out = tmp_path / "probe", tmp_path / "iti"
    argv = [TINY_PROBE, "--probe_output_dir", str(probe_dir), "--output_dir", str(out), "--iti_alpha", "7"]
    assert locedit_cli.main(["iti", *argv]) == 0  # no probe result yet: the probe stage runs first
    for name in ["adapter_config.json", "adapter_model.safetensors", "recipe.yaml", "heads.json", "splits.json"]:
        assert (out / name).is_file(), name
    assert (probe_dir / "probe.json").is_file()
    result = ProbeResult.load(str(probe_dir))
    metrics = json.loads((out / "metrics.json").read_text())
    heads = [tuple(h) for h in metrics["heads"]]
    assert metrics["method"] == "iti" and metrics["iti_alpha"] == 7.0 and heads == sorted(result.top_heads(2))
    heads_json = json.loads((out / "heads.json").read_text())
    assert heads_json["family"] == "probe-2" and [tuple(h) for h in heads_json["heads"]] == heads
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["edit_strength"] == "constant" and [tuple(h) for h in config["heads"]] == heads
    splits = json.loads((out / "splits.json").read_text())["question_ids"]
    assert set(json.loads((probe_dir / "probe.json").read_text())["question_ids"]["validation"]) <= set(
        splits["train"]
    )  # the probes were scored on training questions

    # It loads like a trained edit: b is alpha * sigma * u on the selected heads, nothing elsewhere.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"))
    with torch.no_grad():
        base_logits = base(IDS).logits
    edited = load_edit(base, str(out))
    for layer, module in edit_layers(edited).items():
        b = module.lora_B["default"].weight[0].reshape(4, 16)
        for head in range(4):
            expected = 7.0 * result.sigma[layer, head] * result.direction[layer, head]
            torch.testing.assert_close(b[head], expected if (layer, head) in heads else torch.zeros(16))
    with torch.no_grad():
        assert not torch.allclose(edited(IDS).logits, base_logits, atol=1e-4)
        with edited.disable_adapter():
            assert torch.equal(edited(IDS).logits, base_logits)


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory) -> Path:
    """One probe result of the tiny recipe, shared by the ITI runs that only need one to exist."""
    path = tmp_path_factory.mktemp("probe") / "probe"
    assert locedit_cli.main(["probe", TINY_PROBE, "--probe_output_dir", str(path)]) == 0
    return path


def test_random_heads_are_the_same_sets_for_iti_and_trained_edits(tmp_path, probe_dir):
    common = [TINY_PROBE, "--heads", "random:3", "--heads_seed", "5", "--probe_results", str(probe_dir)]
    assert locedit_cli.main(["iti", *common, "--output_dir", str(tmp_path / "iti")]) == 0
    recipe = parse_recipe([*common, "--output_dir", str(tmp_path / "trained")])
    plan = make_plan(recipe)
    # What a trained run writes first:
    write_run_description(plan.output_dir, recipe, plan.heads, plan.layout, plan.splits)
    iti_heads = json.loads((tmp_path / "iti" / "heads.json").read_text())
    trained_heads = json.loads((tmp_path / "trained" / "heads.json").read_text())
    assert iti_heads["heads"] == trained_heads["heads"] == [list(h) for h in plan.heads]
    assert iti_heads["family"] == trained_heads["family"] == "random-3"
    other_seed = make_plan(parse_recipe([*common, "--heads_seed", "6"]))
    assert other_seed.heads != plan.heads


def test_training_at_probe_heads_runs_the_probe_stage_first(tmp_path, capsys):
    probe_dir, out = tmp_path / "probe", tmp_path / "run"
    argv = [
        TINY_PROBE,
        "--probe_output_dir",
        str(probe_dir),
        "--output_dir",
        str(out),
        "--max_steps",
        "1",
        "--precompute_ref_log_probs",
        "false",
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
    ]
    train_main(parse_recipe(argv))
    assert "probe stage runs first" in capsys.readouterr().out
    result = ProbeResult.load(str(probe_dir))
    heads = json.loads((out / "heads.json").read_text())
    assert [tuple(h) for h in heads["heads"]] == sorted(result.top_heads(2))
    assert heads["probe_results"] == str(probe_dir)
    config = json.loads((out / "adapter_config.json").read_text())
    assert [tuple(h) for h in config["heads"]] == sorted(result.top_heads(2))


@pytest.mark.parametrize("draws", [2])
def test_iti_makes_one_run_directory_per_draw(tmp_path, probe_dir, draws):
    common = [TINY_PROBE, "--heads", "random:2", "--heads_draws", str(draws), "--output_dir", str(tmp_path / "iti")]
    assert locedit_cli.main(["iti", *common, "--probe_results", str(probe_dir)]) == 0
    runs = sorted(path for path in (tmp_path / "iti").iterdir() if path.is_dir())
    assert [run.name for run in runs] == [f"iti-random2-hs{seed}-alpha5" for seed in range(draws)]
    # The top directory lists the edits, so `locedit eval` on it evaluates each (as for a multi-edit training run).
    assert expand_run_dirs([str(tmp_path / "iti")]) == [str(run) for run in runs]
    layout = make_plan(parse_recipe([TINY_PROBE])).layout
    for seed, run in enumerate(runs):
        heads = json.loads((run / "heads.json").read_text())["heads"]
        assert heads == [list(h) for h in resolve_heads("random:2", layout, seed=seed)]
        assert (run / "adapter_model.safetensors").is_file() and (run / "metrics.json").is_file()
