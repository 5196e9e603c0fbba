"""The train entry point: IPO loss against its definition, run directories, resume, recipes, errors, processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, BertConfig, LlamaConfig

import locedit.core.args
from locedit import load_edit
from locedit.config import LocEditConfig, parse_recipe
from locedit.core.tracking import wandb_tracking
from locedit.heads import HeadSpec
from locedit.rundir import default_output_dir
from locedit.train import cli, main

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
# A short run of the tiny recipe: tiny Llama, 40 synthetic questions.
FAST = ["--dataset", "synthetic:40", "--logging_steps", "1", "--report_to", "none", "--save_strategy", "no"]


def run_train(argv: list[str]):
    return main(parse_recipe(argv))


def log_history(output_dir) -> list[dict]:
    return json.loads((Path(output_dir) / "trainer_state.json").read_text())["log_history"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One short run at two heads with tau 0.2, shared by the tests that inspect a finished run directory."""
    out = tmp_path_factory.mktemp("run") / "run"
    argv = ["recipes/tiny.yaml", *FAST, "--heads", "L0H1,L1H3", "--beta", "0.2", "--max_steps", "24"]
    argv += ["--eval_strategy", "epoch"]  # a validation pass, whose metrics the run directory keeps
    metrics = run_train([*argv, "--output_dir", str(out), "--learning_rate", "2.0e-1"])
    return out, metrics


def test_first_ipo_loss_is_one_over_four_tau_squared_and_training_lowers_it(trained_run):
    out, _ = trained_run
    losses = [entry["loss"] for entry in log_history(out) if "loss" in entry]
    # With b = 0 the edited model is the reference, so h = 0 and the IPO loss is (0 - 1/(2 tau))^2.
    assert losses[0] == pytest.approx(1 / (4 * 0.2**2), abs=1e-4)
    assert sum(losses[-5:]) / 5 < losses[0] - 0.05


def test_a_healthy_run_records_its_loss_on_its_training_pairs_and_no_divergence(trained_run):
    _, metrics = trained_run
    assert metrics["train_diverged"] is False and metrics["train_divergence"] is None
    assert metrics["train_loss_start"] == pytest.approx(1 / (4 * 0.2**2))
    assert metrics["train_pairs_loss"] < metrics["train_loss_start"] and metrics["train_pairs_scored"] > 0


def test_a_diverged_run_ends_with_a_one_line_warning_and_its_evaluation_calls_it_broken(tmp_path, capsys):
    from locedit.eval import cli as eval_cli

    out = tmp_path / "diverged"
    argv = ["recipes/tiny.yaml", "--report_to", "none", "--save_strategy", "no", "--learning_rate", "30"]
    metrics = run_train([*argv, "--output_dir", str(out)])
    warning = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert len(warning) == 1 and warning[0].startswith("locedit: warning: the edit diverged: its IPO loss ended at")
    assert metrics["train_diverged"] is True and metrics["train_pairs_loss"] > metrics["train_loss_start"]
    assert json.loads((out / "metrics.json").read_text())["train_diverged"] is True
    flags = ["--eval_judge_truth", "similarity", "--eval_judge_info", "none", "--eval_corpus", "none"]
    assert eval_cli([str(out), *flags, "--eval_max_new_tokens", "4", "--eval_max_questions", "3"]) == 0
    evaluation = json.loads((out / "eval" / "metrics.json").read_text())
    assert evaluation["broken"] is True and evaluation["broken_reasons"][-1].startswith("training diverged")
    assert "is broken: " in capsys.readouterr().out


def test_run_directory_holds_everything_a_finished_run_needs(trained_run, tiny_model_dir):
    out, metrics = trained_run
    for name in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "recipe.yaml",
        "heads.json",
        "splits.json",
        "trainer_state.json",
        "metrics.json",
    ]:
        assert (out / name).is_file(), name
    assert not (out / "ref").exists()  # no copy of the adapter as a reference
    heads = json.loads((out / "heads.json").read_text())
    assert heads["heads"] == [[0, 1], [1, 3]] and (heads["num_layers"], heads["num_heads"]) == (2, 4)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["heads"] == [[0, 1], [1, 3]]
    splits = json.loads((out / "splits.json").read_text())["question_ids"]
    assert not set(splits["train"]) & set(splits["test"]) and not set(splits["validation"]) & set(splits["test"])
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics)) and "eval_loss" in saved and "train_loss" in saved
    # Where the edit lives is logged with TRL's metrics.
    assert any("edit/L0/b_norm" in entry and "edit/L1/a_norm" in entry for entry in log_history(out))

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"))
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    base_logits = base(ids).logits
    edited = load_edit(base, str(out))
    assert not torch.allclose(edited(ids).logits, base_logits, atol=1e-4)  # training moved the edit off zero
    with edited.disable_adapter():
        assert torch.equal(edited(ids).logits, base_logits)


def test_a_run_started_again_resumes_from_its_last_checkpoint(tmp_path, capsys):
    out = str(tmp_path / "run")
    common = [
        "recipes/tiny.yaml",
        "--dataset",
        "synthetic:40",
        "--report_to",
        "none",
        "--output_dir",
        out,
        "--heads",
        "L1H2",
        "--edit_strength",
        "constant",
        "--logging_steps",
        "1",
    ]
    run_train([*common, "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2"])
    assert (tmp_path / "run" / "checkpoint-4").is_dir()
    capsys.readouterr()
    run_train([*common, "--max_steps", "6", "--save_strategy", "steps", "--save_steps", "2"])
    assert "resuming from" in capsys.readouterr().out
    steps = [entry["step"] for entry in log_history(out) if "loss" in entry]
    assert steps == [1, 2, 3, 4, 5, 6]  # the second run went on from step 4, it did not start over
    config = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert config["edit_strength"] == "constant"


def test_default_output_dir_is_unique_per_run_of_a_sweep():
    dirs = set()
    for flags in [
        [],
        ["--learning_rate", "1.0e-3"],
        ["--beta", "0.3"],
        ["--seed", "7"],
        ["--heads", "random:2"],
        ["--heads", "random:2", "--heads_seed", "1"],
        ["--edit_strength", "constant"],
    ]:
        recipe = parse_recipe(["recipes/tiny.yaml", *flags])
        dirs.add(default_output_dir(recipe.edit, recipe.training, recipe.name))
    assert len(dirs) == 7 and all(d.startswith(os.path.join("outputs", "tiny")) for d in dirs)


def test_a_plan_parses_its_head_spec_once(head_spec_parses):
    """The plan's directory name, checks and heads all take the one spec parsed from the recipe."""
    from locedit.plan import make_plan

    plan = make_plan(parse_recipe(["recipes/tiny.yaml", "--heads", "random:2", "--heads_seed", "3"]))
    assert head_spec_parses == ["random:2"]
    assert os.path.basename(plan.output_dir).startswith("random2-hs3-") and len(plan.heads) == 2


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_parses_and_plans_on_its_models_shape(recipe, tmp_path, shared_data_dir):
    """Each recipe resolves against a Llama-7B shape: its config and an empty weights file (the plan checks that a
    model directory's weights are there and whole, reading their header; it never loads them)."""
    parsed = parse_recipe([str(recipe)])
    edit_args, model_args = parsed.edit, parsed.model
    assert "ipo" in parsed.training.loss_type
    argv = [str(recipe), "--dry_run", "true"]
    if model_args.model_name_or_path != "tiny:llama":
        config_dir = tmp_path / "llama-7b-shape"
        LlamaConfig(num_hidden_layers=32, num_attention_heads=32, hidden_size=4096).save_pretrained(config_dir)
        save_file({}, config_dir / "model.safetensors")
        argv += ["--model_name_or_path", str(config_dir)]
        argv += ["--dataset", str(shared_data_dir / "truthfulqa" / "TruthfulQA.csv")]
        if parsed.edit.chat_template:  # the 7B shape has no tokenizer (the chat template: test_chat_template.py)
            argv += ["--chat_template", "false"]
    plan = run_train(argv)
    kind, _, count = edit_args.heads.partition(":")
    expected = 32 * 32 if kind == "all" else 1 if kind == "single" else int(count) if kind == "random" else None
    if model_args.model_name_or_path != "tiny:llama":
        if edit_args.heads.startswith("probe:"):
            # No weights to probe and no probe result: the heads are left to the probe stage, which runs first.
            assert plan.heads is None and plan.probe_dir and plan.head_dim == 128
        else:
            assert len(plan.heads) == expected and plan.head_dim == 128
        assert 6200 <= len(plan.splits["train"]) <= 6800  # the paper's 6,560 training pairs, give or take the draw
    assert not Path(plan.output_dir).exists()  # a dry run writes nothing


def test_paper_recipes_use_the_paper_settings():
    expected_lr = {"all_heads": 1e-4, "random_heads_16": 5e-4, "probe_heads_16": 5e-4, "single_head": 2e-3}
    for name, lr in expected_lr.items():
        args = parse_recipe([str(REPO / "recipes" / f"{name}.yaml")]).training
        assert args.learning_rate == lr and args.num_train_epochs == 2 and args.per_device_train_batch_size == 4
        assert args.lr_scheduler_type.value == "cosine" and args.beta == 0.1


def test_paged_optimizer_falls_back_to_adamw_on_cpu_with_one_notice(tmp_path, caplog, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("paged optimizers run on this machine")
    monkeypatch.setattr(locedit.core.args, "_warned", set())  # other tests parsed paper recipes in this process
    for _ in range(3):  # a sweep parses one recipe per run: still one notice
        args = LocEditConfig(output_dir=str(tmp_path), optim="paged_adamw_32bit")
        assert args.optim.value == "adamw_torch"
    assert sum("paged_adamw_32bit" in r.message for r in caplog.records) == 1


def test_wandb_goes_offline_without_credentials_and_never_prompts(tmp_path, monkeypatch, capsys):
    for var in ["WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT", "WANDB_RUN_GROUP"]:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "missing"))
    recipe = parse_recipe(["recipes/tiny.yaml", "--report_to", "wandb", "--heads", "random:1"])
    training_args = recipe.training
    training_args.output_dir = "outputs/tiny/random1-hs0"

    with wandb_tracking(training_args, recipe.edit.wandb_project, HeadSpec.of(recipe.edit).family):
        assert os.environ["WANDB_MODE"] == "offline"
        assert os.environ["WANDB_RUN_GROUP"] == "single-head" and training_args.run_name == "random1-hs0"
    assert capsys.readouterr().err.count("offline") == 1


def test_runs_in_one_process_are_separate_wandb_runs_in_their_own_groups(tmp_path, monkeypatch):
    """`locedit study` trains several head families in one process: each is its own W&B run, in its family's group
    (the Trainer leaves its run open, and a first run's group would otherwise stick)."""
    import wandb

    for var in ["WANDB_API_KEY", "WANDB_PROJECT", "WANDB_RUN_GROUP"]:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    started = []
    original_init = wandb.init

    def recording_init(*args, **kwargs):
        run = original_init(*args, **kwargs)
        started.append((run.id, os.environ["WANDB_RUN_GROUP"]))
        return run

    monkeypatch.setattr(wandb, "init", recording_init)
    common = ["recipes/tiny.yaml", "--report_to", "wandb", "--num_train_epochs", "1", "--save_strategy", "no"]
    for heads in ["all", "random:1"]:
        main(parse_recipe([*common, "--heads", heads, "--output_dir", str(tmp_path / heads.replace(":", ""))]))
        assert wandb.run is None  # finished with its training run
    assert [group for _, group in started] == ["all-heads", "single-head"]
    assert len({run_id for run_id, _ in started}) == 2


def _config_only_model(path: Path, config) -> str:
    config.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--not_a_key", "1"], "not_a_key"),
        (["--heads", "L9H0"], "L9H0"),
        (["--dataset", "no/such/file.csv"], "no/such/file.csv"),
        (["--model_name_or_path", "BERT"], "bert"),
    ],
    ids=["unknown-key", "bad-heads", "missing-data", "unknown-layout"],
)
def test_bad_recipes_exit_nonzero_with_one_line_and_no_traceback(flags, message, tmp_path):
    if flags[-1] == "BERT":
        flags = ["--model_name_or_path", _config_only_model(tmp_path / "bert", BertConfig())]
    result = subprocess.run(
        [sys.executable, "-m", "locedit.train", "recipes/tiny.yaml", *flags],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("locedit: error:")]
    assert len(errors) == 1 and message.lower() in errors[0].lower()
    assert "Traceback" not in result.stderr


def test_unknown_key_in_a_recipe_file_is_named(tmp_path, capsys):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text((REPO / "recipes" / "tiny.yaml").read_text() + "learning_rat: 1.0e-3\n")
    assert cli([str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "learning_rat" in err and str(recipe) in err


def test_an_abbreviated_or_misspelt_flag_is_an_error_not_another_key(capsys):
    assert cli(["recipes/tiny.yaml", "--learning_rat=0.1", "--dry_run", "true"]) == 2
    assert "--learning_rat" in capsys.readouterr().err


def test_out_of_range_head_names_the_models_shape(capsys):
    assert cli(["recipes/tiny.yaml", "--heads", "L0H7", "--dry_run", "true"]) == 2
    assert "2 layers x 4 heads" in capsys.readouterr().err


def test_training_runs_in_two_processes_on_cpu(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",  # two CPU processes (gloo) without a GPU; accelerate's --cpu would start one
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "locedit.train",
            "recipes/tiny.yaml",
            *FAST,
            "--max_steps",
            "3",
            "--output_dir",
            str(out),
            "--heads",
            "random:3",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "metrics.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert result.stdout.count("locedit plan") == 1  # the plan is printed by the main process only
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3


def test_data_parallel_training_keeps_the_frozen_prefix_of_its_own_pairs_only(tmp_path):
    """Under `accelerate launch -m locedit.train` each process computes and keeps the frozen prefix of the pairs it
    trains on (its batches), not that of the whole training set."""
    out = tmp_path / "ddp"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "locedit.train"]
    flags = [*FAST, "--max_steps", "2", "--output_dir", str(out), "--heads", "L1H0,L1H1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*launch, "recipes/tiny.yaml", *flags], capture_output=True, text=True, timeout=600, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    # 2 steps x 8 pairs per process (x 2 processes = 32 pairs in the run): the main process keeps at most its 16
    # pairs' prefix (one entry each, the prompt shared by both answers), not the run's 32.
    assert 0 < metrics["frozen_prefix_entries"] <= 16
    assert "each process keeps that of the pairs it trains on" in result.stdout
