"""Reliability: every bad input is one clear line before any work, and every interruption is survived.

Bad inputs run in this process through `locedit.cli.main` (the same code as the command line): each must return 2,
print exactly one `locedit: error:` line naming the bad value, no traceback, and leave no result file behind.
Interruptions run the real commands as subprocesses, signal them, and run them again to completion: the results
must equal an uninterrupted run's exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from locedit.cli import main as locedit
from locedit.config import parse_recipe
from locedit.rundir import LOCK, expand_run_dirs
from locedit.train import main as train

REPO = Path(__file__).resolve().parents[1]
TINY = "recipes/tiny.yaml"  # relative, as a user types it: each test runs in its own directory with recipes/ in it
# A short run of the tiny recipe: 40 synthetic questions, a checkpoint every 2 steps.
FAST = ["--dataset", "synthetic:40", "--max_steps", "30", "--save_strategy", "steps", "--save_steps", "2"]
FAST += ["--logging_steps", "1", "--per_device_train_batch_size", "4", "--report_to", "none"]
RESULTS = ("metrics.json", "heads.json", "splits.json", "recipe.yaml", "adapter_model.safetensors")


def result_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def one_error_line(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in lines if line.startswith("locedit: error:")]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def adapters(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter_model.safetensors"))


def max_difference(a: Path, b: Path) -> float:
    left, right = adapters(a), adapters(b)
    assert left.keys() == right.keys()
    return max(float((left[key] - right[key]).abs().max()) for key in left)


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, before any work, nothing left behind
# ---------------------------------------------------------------------------------------------------------------------

BAD_TRAIN_FLAGS = {
    "batch-size-0": (["--per_device_train_batch_size", "0"], "per_device_train_batch_size 0"),
    "learning-rate-negative": (["--learning_rate", "-0.1"], "learning_rate -0.1"),
    "beta-0": (["--beta", "0"], "beta"),
    "beta-negative": (["--beta", "-1"], "beta"),
    "epochs-negative": (["--num_train_epochs", "-1"], "num_train_epochs -1"),
    "no-test-split": (["--split_fractions", "0.8", "0.2", "0.0"], "leave no test questions"),
    "learning-rate-not-a-number": (["--learning_rate", "abc"], "'abc'"),
    "epochs-not-a-number": (["--num_train_epochs", "two"], "'two'"),
    "edit-read-not-a-choice": (["--edit_read", "foo"], "'foo'"),
    "no-such-model-dir": (["--model_name_or_path", "/no/such/dir"], "/no/such/dir"),
    "multi-edit-without-precompute": (
        ["--heads", "single:2", "--precompute_ref_log_probs", "false"],
        "precompute_ref_log_probs",
    ),
    "heads-draws-without-random": (["--heads", "all", "--heads_draws", "2"], "heads_draws"),
    "shared-prompt-with-flash-attention": (
        ["--attn_implementation", "flash_attention_2"],
        "share_prompt and pack_sequences need an attention that takes a block mask",
    ),
    "frozen-prefix-with-dropout": (["--disable_dropout", "false"], "frozen_prefix needs disable_dropout: true"),
    # Cases that were one line already, kept so they stay so.
    "bad-head": (["--heads", "L9H0"], "L9H0"),
    "unknown-key": (["--not_a_key", "1"], "not_a_key"),
    "missing-data-file": (["--dataset", "no/such/file.csv"], "no/such/file.csv"),
    "bad-split-fractions": (["--split_fractions", "0.5", "0.5", "0.5"], "split_fractions"),
    "unknown-tiny-model": (["--model_name_or_path", "tiny:nonsense"], "tiny:nonsense"),
    "no-such-gguf-file": (["--model_name_or_path", "/no/such/model.gguf"], "/no/such/model.gguf"),
    "negative-seed": (["--seed", "-1"], "seed -1"),
    "max-length-below-every-prompt": (["--max_length", "5"], "max_length 5 leaves no completion token"),
    "more-synthetic-questions-than-it-makes": (["--dataset", "synthetic:100000"], "not 100000"),
}


@pytest.mark.parametrize("flags, needle", BAD_TRAIN_FLAGS.values(), ids=BAD_TRAIN_FLAGS.keys())
def test_bad_training_input_is_one_line_before_any_work(flags, needle, capsys, own_working_directory):
    code = locedit(["train", TINY, *flags])
    one_error_line(capsys, code, needle)
    assert result_files(own_working_directory) == []  # not even an empty outputs/ with files in it
    assert not (own_working_directory / "outputs").exists()


def test_output_dir_that_is_a_file_or_not_writable_is_one_line(tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    one_error_line(capsys, locedit(["train", TINY, "--output_dir", str(a_file)]), str(a_file))
    # /sys refuses new entries even to root, as a read-only file system does.
    one_error_line(capsys, locedit(["train", TINY, "--output_dir", "/sys/locedit-run"]), "/sys/locedit-run")


def test_a_file_that_is_not_gguf_is_one_line(tmp_path, capsys):
    bad = tmp_path / "model.gguf"
    bad.write_text("not a model")
    one_error_line(capsys, locedit(["train", TINY, "--model_name_or_path", str(bad), "--dry_run", "true"]), "GGUF")


def write_gguf(path: Path) -> Path:
    """A small file in GGUF's format (metadata and two tensors; not a model transformers can read)."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.ones((64, 32), dtype=np.float32))
    writer.add_tensor("output.weight", np.ones((64, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("keep", [0.9, 0.5, 0.01])
def test_a_gguf_file_cut_short_is_one_line(tmp_path, capsys, keep):
    model = write_gguf(tmp_path / "model.gguf")
    cut_short(model, keep)
    code = locedit(["train", TINY, "--model_name_or_path", str(model), "--dry_run", "true"])
    one_error_line(capsys, code, f"'{model}' is cut short", "download the model file again")


def test_a_probe_result_made_on_another_split_is_refused(tmp_path, capsys):
    probe_dir = tmp_path / "probe"
    assert locedit(["probe", "recipes/tiny_probe.yaml", "--probe_output_dir", str(probe_dir)]) == 0
    capsys.readouterr()
    flags = ["--probe_results", str(probe_dir), "--dry_run", "true"]
    assert locedit(["train", "recipes/tiny_probe.yaml", *flags]) == 0
    capsys.readouterr()
    code = locedit(["train", "recipes/tiny_probe.yaml", *flags, "--split_seed", "1"])
    one_error_line(capsys, code, str(probe_dir), "split_seed")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished short all-heads run, and its files' contents."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(parse_recipe([str(REPO / TINY), *FAST, "--output_dir", str(out)]))
    return out, {name: (out / name).read_bytes() for name in RESULTS}


def test_a_finished_run_started_again_is_left_as_it_is(finished_run, capsys):
    out, contents = finished_run
    assert locedit(["train", TINY, *FAST, "--output_dir", str(out)]) == 0
    assert "nothing to train" in capsys.readouterr().out
    assert {name: (out / name).read_bytes() for name in RESULTS} == contents


@pytest.mark.parametrize(
    "flags, needle",
    [(["--split_seed", "1"], "split_seed"), (["--heads", "L0H0"], "heads"), (["--beta", "0.3"], "beta")],
    ids=["other-split", "other-heads", "other-tau"],
)
def test_a_run_with_other_settings_in_an_existing_run_directory_is_refused(finished_run, flags, needle, capsys):
    out, contents = finished_run
    code = locedit(["train", TINY, *FAST, "--output_dir", str(out), *flags])
    one_error_line(capsys, code, str(out), needle)
    assert {name: (out / name).read_bytes() for name in RESULTS} == contents  # nothing rewritten


def test_default_run_directories_differ_by_split():
    first, other = parse_recipe([TINY]), parse_recipe([TINY, "--split_seed", "1"])
    from locedit.rundir import output_dir_of

    assert output_dir_of(first) != output_dir_of(other)


def test_a_busy_run_directory_is_refused_and_a_stale_lock_taken_over(tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK).write_text(str(sleeper.pid))
        one_error_line(capsys, locedit(["train", TINY, *FAST, "--output_dir", str(out)]), str(sleeper.pid))
    finally:
        sleeper.kill()
        sleeper.wait()
    # Its owner is gone: the lock is stale, and the run goes ahead.
    assert locedit(["train", TINY, *FAST, "--output_dir", str(out)]) == 0
    assert "stale lock" in capsys.readouterr().err
    assert (out / "metrics.json").is_file() and not (out / LOCK).exists()


def test_eval_with_other_judges_than_an_earlier_evaluation_is_refused(tmp_path, capsys):
    base = tmp_path / "base"
    flags = ["--eval_corpus", "none", "--eval_max_questions", "2", "--eval_output_dir", str(base)]
    assert locedit(["eval", TINY, "--base", *flags, "--eval_judge_truth", "none", "--eval_judge_info", "none"]) == 0
    before = (base / "eval" / "metrics.json").read_bytes()
    capsys.readouterr()
    code = locedit(["eval", TINY, "--base", *flags, "--eval_judge_truth", "none", "--eval_judge_info", "toy"])
    one_error_line(capsys, code, str(base / "eval"), "eval_judge_info")
    assert (base / "eval" / "metrics.json").read_bytes() == before


def test_eval_and_probe_with_an_empty_validation_split_work(tmp_path, capsys):
    split = ["--split_fractions", "0.8", "0.0", "0.2"]
    flags = ["--eval_corpus", "none", "--eval_judge_truth", "none", "--eval_judge_info", "none"]
    out = tmp_path / "base"
    assert locedit(["eval", TINY, "--base", *split, *flags, "--eval_output_dir", str(out)]) == 0
    assert (out / "eval" / "metrics.json").is_file()
    probe = ["--probe_output_dir", str(tmp_path / "probe")]
    assert locedit(["probe", "recipes/tiny_probe.yaml", *split, *probe]) == 0


def test_a_multi_edit_run_directory_copied_elsewhere_evaluates_its_own_edits(tmp_path, capsys, monkeypatch):
    out = tmp_path / "multi"
    train(parse_recipe([TINY, *FAST, "--heads", "single:2", "--save_strategy", "no", "--output_dir", str(out)]))
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(out, copy)
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert sorted(expand_run_dirs(["copy"])) == [os.path.join("copy", p.name) for p in sorted(copy.glob("L*"))]
    flags = ["--eval_corpus", "none", "--eval_judge_truth", "none", "--eval_judge_info", "none"]
    assert locedit(["eval", "copy", *flags, "--eval_max_questions", "2"]) == 0
    assert sorted(p.parent.parent.name for p in copy.glob("*/eval/metrics.json")) == sorted(
        p.name for p in copy.glob("L*")
    )
    assert not list(out.glob("*/eval"))  # the original's edits were not the ones evaluated


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints and interruptions: rerun to the same result
# ---------------------------------------------------------------------------------------------------------------------


def test_an_incomplete_or_empty_checkpoint_is_passed_over(finished_run, tmp_path, capsys):
    whole, _ = finished_run
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(whole / "recipe.yaml", resumed / "recipe.yaml")
    shutil.copytree(whole / "checkpoint-4", resumed / "checkpoint-4")
    # Killed while writing checkpoint-6 (no trainer_state.json yet) and just after making checkpoint-8.
    shutil.copytree(whole / "checkpoint-6", resumed / "checkpoint-6", ignore=shutil.ignore_patterns("trainer_state*"))
    (resumed / "checkpoint-8").mkdir()
    assert locedit(["train", TINY, *FAST, "--output_dir", str(resumed)]) == 0
    err = capsys.readouterr()
    assert "checkpoint-8 is incomplete" in err.err and "checkpoint-6 is incomplete" in err.err
    assert "resuming from" in err.out and "checkpoint-4" in err.out
    assert max_difference(resumed, whole) == 0


def default_interrupt() -> None:
    """Ctrl-C as in a terminal: a suite started in the background (`pytest &`) ignores SIGINT, and its children would
    inherit that and never see the interrupts these tests send."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_command(argv: list[str], cwd: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "locedit.cli", *argv],
        cwd=cwd,
        env=env,
        preexec_fn=default_interrupt,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def wait_for(condition, timeout: float = 240.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"ended early ({process.returncode}): {process.communicate()[1][-2000:]}")
        if time.time() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def interrupt(argv: list[str], cwd: Path, when, sig: int) -> tuple[int, str]:
    process = run_command(argv, cwd)
    wait_for(when, process=process)
    process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    return process.returncode, err


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Uninterrupted single-edit and multi-edit runs (subprocesses, as the interrupted ones are)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    (root / "recipes").symlink_to(REPO / "recipes")
    runs = {}
    for name, extra in (("single", []), ("multi", ["--heads", "single:2"])):
        process = run_command(["train", TINY, *FAST, *extra, "--output_dir", name], root)
        assert process.wait(timeout=600) == 0, process.communicate()[1][-3000:]
        runs[name] = root / name
    return runs


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["sigint", "sigterm", "sigkill"])
@pytest.mark.parametrize("kind", ["single", "multi"])
def test_an_interrupted_training_run_resumes_to_the_same_edit(kind, sig, uninterrupted, own_working_directory):
    extra = ["--heads", "single:2"] if kind == "multi" else []
    argv = ["train", TINY, *FAST, *extra, "--output_dir", "run"]
    out = own_working_directory / "run"
    code, err = interrupt(argv, own_working_directory, lambda: (out / "checkpoint-4").is_dir(), sig)
    if sig == signal.SIGINT:
        assert code == 130 and "Traceback" not in err and "interrupted; run the same command again" in err
    elif sig == signal.SIGTERM:  # what a job scheduler sends before it kills: the same as Ctrl-C, its own line
        assert code == 143 and "Traceback" not in err and "stopped by SIGTERM; run the same command again" in err
        assert not (out / LOCK).exists()  # the run lock released on the way out, not left for the next run
    else:
        assert code == -signal.SIGKILL
    assert not (out / "metrics.json").exists()
    rerun = run_command(argv, own_working_directory)
    _, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err[-3000:]
    whole = uninterrupted[kind]
    pairs = [(out, whole)]
    if kind == "multi":  # each edit of the run against the same edit of the uninterrupted run
        pairs = list(zip(expand_run_dirs([str(out)]), expand_run_dirs([str(whole)]), strict=True))
    for ours, theirs in pairs:
        assert max_difference(Path(ours), Path(theirs)) == 0


def sweep_file(directory: Path) -> Path:
    sweep = {
        "program": "locedit.train",
        "method": "grid",
        "command": ["${interpreter}", "-m", "${program}", TINY, *FAST, "${args}"],
        "parameters": {"beta": {"values": [0.1, 0.2]}},
    }
    path = directory / "sweep.yaml"
    path.write_text(json.dumps(sweep))
    return path


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
def test_an_interrupted_sweep_leaves_no_orphan_and_resumes(sig, uninterrupted, own_working_directory):
    path = sweep_file(own_working_directory)
    first = own_working_directory / "outputs" / "tiny" / "all-lr0.03-tau0.1-seed42"
    code, _ = interrupt(["sweep", str(path)], own_working_directory, lambda: (first / LOCK).is_file(), sig)
    if sig == signal.SIGINT:
        assert code == 130
    try:  # the lock's holder, unless the run has ended (and removed its lock) already
        child = int((first / LOCK).read_text())
    except FileNotFoundError:
        child = None
    if child is not None:  # the run dies with its sweep (at once after SIGKILL, after its own Ctrl-C otherwise)
        wait_for(lambda: not os.path.exists(f"/proc/{child}") or _zombie(child), timeout=60)
    rerun = run_command(["sweep", str(path)], own_working_directory)
    out, err = rerun.communicate(timeout=900)
    assert rerun.returncode == 0, out[-2000:] + err[-2000:]
    assert "2 finished" in out or "1 finished, 1 skipped" in out
    # The tau 0.1 run equals the uninterrupted one of the same settings.
    assert max_difference(first, uninterrupted["single"]) == 0


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
def test_an_interrupted_eval_reruns_to_the_same_outputs(sig, uninterrupted, own_working_directory, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted["single"], run)
    flags = ["--eval_corpus", "none", "--eval_judge_truth", "none", "--eval_judge_info", "none"]
    whole = tmp_path / "whole"
    shutil.copytree(uninterrupted["single"], whole)
    assert run_command(["eval", str(whole), *flags], own_working_directory).wait(timeout=600) == 0
    code, _ = interrupt(
        ["eval", str(run), *flags], own_working_directory, lambda: (run / "eval" / LOCK).is_file(), sig
    )
    assert code in (130, -signal.SIGKILL)
    rerun = run_command(["eval", str(run), *flags], own_working_directory)
    _, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err[-3000:]
    assert (run / "eval" / "generations.jsonl").read_text() == (whole / "eval" / "generations.jsonl").read_text()
    ours, theirs = (json.loads((d / "eval" / "metrics.json").read_text()) for d in (run, whole))
    assert {k: v for k, v in ours.items() if k != "edit"} == {k: v for k, v in theirs.items() if k != "edit"}


def test_wandb_without_credentials_and_with_stdin_closed_never_waits(tmp_path, own_working_directory):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), NETRC=str(tmp_path / "none"), WANDB_DIR=str(tmp_path), OMP_NUM_THREADS="1")
    argv = ["train", TINY, *FAST, "--report_to", "wandb", "--save_strategy", "no", "--output_dir", "run"]
    result = subprocess.run(
        [sys.executable, "-m", "locedit.cli", *argv],
        cwd=own_working_directory,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "logging offline" in result.stderr


def test_the_7b_benchmark_without_a_gpu_says_so_at_once():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    benchmarks = REPO / "benchmarks"
    result = subprocess.run([sys.executable, "gpu_7b.py"], cwd=benchmarks, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    # Exactly one error line; other libraries' notices on stderr (bitsandbytes' kernels, say) are theirs, not ours.
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors == ["gpu_7b.py: error: needs a CUDA GPU (a 7B-shaped model); use --small on a CPU"], result.stderr


def test_eval_and_study_dry_runs_check_everything_and_write_nothing(own_working_directory, capsys):
    flags = ["--eval_judge_truth", "none", "--eval_judge_info", "none", "--eval_corpus", "none", "--dry_run", "true"]
    assert locedit(["eval", TINY, "--base", *flags]) == 0
    assert "dry run" in capsys.readouterr().out
    assert (
        locedit(["study", "recipes/toy.yaml", "--study_random", "1", "--study_single", "1", "--dry_run", "true"]) == 0
    )
    out = capsys.readouterr().out
    assert "dry run: every stage's recipe is checked" in out and out.count("locedit plan") == 4
    assert result_files(own_working_directory) == []
    # A typo in a stage's recipe is found by the dry run, not after the earlier stages ran.
    one_error_line(capsys, locedit(["study", "recipes/toy.yaml", "--dry_run", "true", "--beta", "0"]), "beta")


# ---------------------------------------------------------------------------------------------------------------------
# Damaged files a user really has, and values no result should hold: one line each, naming the file and the fix
# ---------------------------------------------------------------------------------------------------------------------

EVAL_FLAGS = ["--eval_corpus", "none", "--eval_judge_truth", "none", "--eval_judge_info", "none"]


def cut_short(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def with_nan(path: Path) -> None:
    from safetensors.torch import save_file

    tensors = load_file(path)
    first = sorted(tensors)[0]
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    save_file(tensors, path, metadata={"format": "pt"})


DAMAGED_RUNS = {
    "adapter-cut-short": (lambda run: cut_short(run / "adapter_model.safetensors"), "cut short"),
    "adapter-config-hand-edited": (
        lambda run: (run / "adapter_config.json").write_text('{"edit_layers": {'),
        "adapter_config.json' is damaged",
    ),
    "adapter-missing": (lambda run: (run / "adapter_model.safetensors").unlink(), "no adapter_model.safetensors"),
    "edit-full-of-nan": (lambda run: with_nan(run / "adapter_model.safetensors"), "NaN or infinite"),
    "splits-cut-short": (lambda run: cut_short(run / "splits.json"), "splits.json' is damaged"),
}


@pytest.mark.parametrize("damage, needle", DAMAGED_RUNS.values(), ids=DAMAGED_RUNS.keys())
def test_eval_of_a_damaged_run_is_one_line_before_any_model_loads(finished_run, tmp_path, capsys, damage, needle):
    out, _ = finished_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    damage(run)
    line = one_error_line(capsys, locedit(["eval", str(run), *EVAL_FLAGS]), needle, str(run))
    assert "train the run again" in line or "locedit train" in line
    assert not (run / "eval").exists()  # nothing half-written


def test_report_of_a_damaged_evaluation_is_one_line(finished_run, tmp_path, capsys):
    out, _ = finished_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    (run / "eval").mkdir()
    (run / "eval" / "metrics.json").write_text('{"mc2": 0.5, ')  # a copy that stopped
    code = locedit(["report", str(tmp_path), "--output_dir", str(tmp_path / "report")])
    one_error_line(capsys, code, str(run / "eval" / "metrics.json"), "evaluate the run again")
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("damage", ["no-weights", "weights-cut-short"])
def test_a_model_directory_without_whole_weights_is_one_line_at_plan_time(tiny_model_dir, tmp_path, capsys, damage):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llama"), model)
    if damage == "no-weights":
        (model / "model.safetensors").unlink()
        needle = "has a config but no weights"
    else:
        cut_short(model / "model.safetensors", keep=0.9)
        needle = "cut short"
    code = locedit(["train", TINY, "--model_name_or_path", str(model), "--dry_run", "true"])
    one_error_line(capsys, code, str(model), needle)


def test_a_nan_iti_strength_is_one_line(capsys, own_working_directory):
    code = locedit(["iti", "recipes/tiny_probe.yaml", "--iti_alpha", "nan"])
    one_error_line(capsys, code, "iti_alpha nan")
    assert result_files(own_working_directory) == []


def test_a_run_that_stopped_before_saving_anything_does_not_block_the_corrected_command(
    finished_run, tmp_path, capsys
):
    """A run that fails after the weights load leaves its description (heads.json, recipe.yaml, splits.json) and no
    result or checkpoint: the corrected command (other settings) starts over there; one with a checkpoint refuses."""
    out, _ = finished_run
    run = tmp_path / "run"
    run.mkdir()
    for name in ("heads.json", "recipe.yaml", "splits.json"):
        shutil.copy(out / name, run / name)
    assert locedit(["train", TINY, *FAST, "--output_dir", str(run), "--split_seed", "1"]) == 0
    assert "stopped before saving anything (split_seed 0 there, 1 now); starting over" in capsys.readouterr().err
    assert (run / "metrics.json").is_file() and read_split_seed(run) == 1

    stopped = tmp_path / "stopped"
    stopped.mkdir()
    for name in ("heads.json", "recipe.yaml", "splits.json"):
        shutil.copy(out / name, stopped / name)
    (stopped / "checkpoint-2").mkdir()  # something a restart would resume: other settings are refused
    one_error_line(
        capsys, locedit(["train", TINY, *FAST, "--output_dir", str(stopped), "--split_seed", "1"]), "split_seed"
    )


def read_split_seed(run: Path) -> int:
    return json.loads((run / "splits.json").read_text())["split_seed"]


@pytest.mark.parametrize("where", ["below-a-file", "read-only"])
def test_a_cache_directory_that_cannot_be_written_is_one_line(where, tmp_path, capsys, monkeypatch):
    if where == "below-a-file":
        (tmp_path / "a-file").write_text("")
        cache = tmp_path / "a-file" / "cache"
    else:
        cache = Path("/sys/locedit-cache")  # refuses new entries even to root, as a read-only file system does
    monkeypatch.setenv("LOCEDIT_CACHE", str(cache))
    one_error_line(capsys, locedit(["train", TINY, "--dry_run", "true"]), str(cache), "LOCEDIT_CACHE")


def write_preference_file(path: Path, bad: dict[int, dict]) -> Path:
    """A preference file of 40 prompts, with the rows in `bad` (0-based) changed."""
    rows = [
        {"prompt": f"Q: What is {i} + 1?\nA:", "chosen": f" {i + 1}.", "rejected": f" {i + 2}."} for i in range(40)
    ]
    for index, change in bad.items():
        rows[index].update(change)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_a_bad_row_in_a_preference_file_is_one_line_and_skip_trains_on_the_rest(
    tmp_path, capsys, own_working_directory
):
    prefs = write_preference_file(tmp_path / "prefs.jsonl", {4: {"chosen": 7}, 11: {"rejected": " 12."}})
    run = tmp_path / "run"
    flags = ["--dataset", str(prefs), "--output_dir", str(run), "--max_steps", "2", "--report_to", "none"]
    code = locedit(["train", TINY, *flags])
    one_error_line(capsys, code, f"{prefs}:5: field 'chosen' holds a number (7), not text", "(2 bad rows in all)")
    assert not run.exists() and result_files(own_working_directory) == []

    with pytest.warns(UserWarning, match=r"left out 2 of 40 bad row\(s\) \(bad_rows: skip\)"):
        assert locedit(["train", TINY, *flags, "--bad_rows", "skip"]) == 0
    assert json.loads((run / "metrics.json").read_text())["data_rows_skipped"] == 2


def test_a_crashed_training_run_leaves_no_spilled_frozen_prefix(own_working_directory, monkeypatch, capsys):
    """The frozen prefix over its memory budget goes to LOCEDIT_CACHE/frozen_prefix, and goes away with the run
    however it ends: here a crash after training."""
    from locedit.core.cache import cache_root
    from locedit.training import trainer

    spill = Path(cache_root()) / "frozen_prefix"

    def spilled() -> set[Path]:
        return set(spill.iterdir()) if spill.is_dir() else set()

    before = spilled()

    def crash(*args, **kwargs):
        raise RuntimeError("crashed after training")

    monkeypatch.setattr(trainer, "scored_training_pairs", crash)
    argv = ["train", TINY, "--heads", "L1H1", "--dataset", "synthetic:40", "--max_steps", "2", "--report_to", "none"]
    with pytest.raises(RuntimeError, match="crashed after training"):
        locedit([*argv, "--frozen_prefix_max_memory_gb", "1e-9", "--output_dir", "run"])
    assert "the rest goes to" in capsys.readouterr().err  # it did spill
    assert spilled() == before


def test_a_damaged_cached_model_is_built_again_with_one_line(tmp_path, monkeypatch, capsys):
    """A cached model cut short (a crash, a full disk) or missing a file is found by its manifest's sizes, set aside
    and built again, saying so; a whole one is used as it is, and an entry from before manifests is taken as whole."""
    import json

    from locedit.core.cache import MANIFEST
    from locedit.models.sources import resolve_model_path

    monkeypatch.setenv("LOCEDIT_CACHE", str(tmp_path / "cache"))
    model = Path(resolve_model_path("tiny:llama"))
    sizes = json.loads((model / MANIFEST).read_text())
    assert sizes["model.safetensors"] == (model / "model.safetensors").stat().st_size and "config.json" in sizes
    whole = (model / "model.safetensors").read_bytes()
    assert resolve_model_path("tiny:llama") == str(model) and "damaged" not in capsys.readouterr().err

    (model / "model.safetensors").write_bytes(whole[: len(whole) // 2])
    assert resolve_model_path("tiny:llama") == str(model)
    err = capsys.readouterr().err
    assert f"the cached '{model}' is damaged (model.safetensors is {len(whole) // 2} bytes, not {len(whole)})" in err
    assert (model / "model.safetensors").read_bytes() == whole  # the same model, built again (seeded)
    assert not [path for path in model.parent.iterdir() if ".damaged-" in path.name]

    (model / "tokenizer.json").unlink()
    resolve_model_path("tiny:llama")
    assert "(tokenizer.json is missing)" in capsys.readouterr().err and (model / "tokenizer.json").is_file()

    (model / MANIFEST).unlink()  # an entry built before manifests: used as it is
    (model / "config.json").write_text((model / "config.json").read_text() + " ")
    assert resolve_model_path("tiny:llama") == str(model) and "damaged" not in capsys.readouterr().err
