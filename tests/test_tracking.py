"""Tracking on trackio and W&B, read back: trackio's projects with trackio's own SQLite storage, W&B's offline runs
record by record as wandb's own protobuf Records (what `wandb sync` uploads)."""

import contextlib
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from locedit.cli import main as cli
from locedit.core.errors import RecipeError
from locedit.core.tracking import Image, Markdown, Table, check_trackers, tracked_run, trackers_of


def trackio_runs(project: str) -> dict[str, dict]:
    """Every run of a trackio project (in this process's TRACKIO_DIR): its group, config and logged steps."""
    from trackio.sqlite_storage import SQLiteStorage

    runs = {}
    for name in SQLiteStorage.get_runs(project):
        config = SQLiteStorage.get_run_config(project, name) or {}
        logs = SQLiteStorage.get_logs(project, name)
        keys = {key for log in logs for key in log} - {"step", "timestamp"}
        runs[name] = {"group": config.get("_Group"), "config": config, "logs": logs, "keys": keys}
    return runs


# The record file of an offline W&B run (run-ID.wandb): a 7-byte header, then the blocks of LevelDB's log format
# (https://github.com/google/leveldb/blob/main/doc/log_format.md), each record a serialized wandb Record. wandb wrote
# a Python reader of it until 0.22 (wandb.sdk.internal.datastore); since, only its Go core reads it, so the tests
# read it by the format's definition and check every record's checksum.
BLOCK, RECORD_HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path):
    """The serialized Records of an offline run's record file, in order, each checked against its CRC-32 (seeded,
    as wandb writes it, with the CRC of its record type)."""
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<HB", data[4:7]) == (0xBEE1, 0), f"{path} is not a W&B record file"
    offset, pending = 7, b""
    while offset + RECORD_HEADER <= len(data):
        if BLOCK - offset % BLOCK < RECORD_HEADER:  # a block's tail too short for a header is padding
            offset += BLOCK - offset % BLOCK
            continue
        checksum, length, kind = struct.unpack("<IHB", data[offset : offset + RECORD_HEADER])
        if length == 0 and kind == 0:  # zeros: the end of what was written
            break
        chunk = data[offset + RECORD_HEADER : offset + RECORD_HEADER + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == checksum, f"{path}: bad checksum at byte {offset}"
        offset += RECORD_HEADER + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk


def wandb_offline_runs(wandb_dir: Path) -> dict[str, dict]:
    """Every offline W&B run under `wandb_dir`, each record parsed as wandb's own protobuf Record: its project, group,
    job type, and the keys and values of its history and summary (a media value's key, not its file's fields)."""
    import wandb
    from wandb.proto import wandb_internal_pb2

    wandb.teardown()  # the service writes the files: teardown waits until it is done
    runs = {}
    for path in sorted(Path(wandb_dir).glob("wandb/offline-run-*/run-*.wandb")):
        run = {"keys": set(), "values": {}}
        for data in wandb_records(path):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run.update(name=record.run.display_name, group=record.run.run_group, project=record.run.project)
                run["job_type"] = record.run.job_type
            elif kind in ("history", "summary"):
                items = record.history.item if kind == "history" else record.summary.update
                for item in items:
                    key = item.nested_key[0] if item.nested_key else item.key
                    if not key.startswith("_"):
                        run["keys"].add(key)
                        run["values"].setdefault(key, json.loads(item.value_json))
        runs[run["name"]] = run
    return runs


@contextlib.contextmanager
def wandb_offline_in(directory: Path, monkeypatch):
    """W&B offline into `directory` while the block runs (conftest disables it), with no project or group given."""
    import wandb

    for var in ["WANDB_API_KEY", "WANDB_PROJECT", "WANDB_RUN_GROUP"]:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(directory))
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb.teardown()  # wandb keeps the settings of its first run in a process (WANDB_DIR among them)
    try:
        yield directory
    finally:
        wandb.teardown()


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B offline into a directory of the test's own."""
    with wandb_offline_in(tmp_path, monkeypatch):
        yield tmp_path


@pytest.mark.parametrize(
    "report_to, trackers",
    [("none", []), ("trackio", ["trackio"]), (["wandb"], ["wandb"]), ("trackio,wandb", ["trackio", "wandb"])]
    + [(["all"], ["trackio", "wandb"]), ([], []), (["tensorboard"], [])],
)
def test_report_to_names_the_trackers(report_to, trackers):
    assert trackers_of(report_to) == trackers


def test_one_run_reaches_both_trackers_with_the_same_keys_and_values(offline_wandb, tmp_path):
    figure = tmp_path / "figure.png"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.figure(figsize=(2, 1))
    plt.savefig(figure)
    plt.close()
    with tracked_run(["trackio", "wandb"], "locedit-both", "toy-study", "study", "study", {"lr": 0.1}) as run:
        run.log(
            {
                "study/families": Table(["family", "true"], [["all", 0.8], ["base", 0.2]]),
                "study/study": Image(str(figure)),
                "study/verdict": Markdown("# Verdict\n\n- probe heads are no better than random"),
            }
        )
        run.summary({"study/metric": "true_info", "study/best/all": 0.8})

    keys = {"study/families", "study/study", "study/verdict", "study/metric", "study/best/all"}
    trackio_run = trackio_runs("locedit-both")["toy-study"]
    assert trackio_run["keys"] == keys and trackio_run["group"] == "study"
    assert trackio_run["config"]["lr"] == 0.1 and trackio_run["config"]["job_type"] == "study"
    logged = {key: value for log in trackio_run["logs"] for key, value in log.items()}
    assert logged["study/families"]["_value"] == [{"family": "all", "true": 0.8}, {"family": "base", "true": 0.2}]
    assert logged["study/study"]["_type"] == "trackio.image" and logged["study/verdict"]["_value"].startswith("# V")
    assert logged["study/best/all"] == 0.8

    wandb_run = wandb_offline_runs(offline_wandb)["toy-study"]
    assert wandb_run["keys"] == keys
    assert (wandb_run["project"], wandb_run["group"], wandb_run["job_type"]) == ("locedit-both", "study", "study")
    assert wandb_run["values"]["study/best/all"] == 0.8 and wandb_run["values"]["study/metric"] == "true_info"


@pytest.mark.parametrize(
    "project, message",
    [("my.project", "'my.project' is not a project name"), ("registry-x", "not beginning with 'registry-'")],
)
def test_a_project_name_a_tracker_would_change_is_refused(project, message):
    with pytest.raises(RecipeError, match=message):
        check_trackers("trackio", project)
    check_trackers("none", project)  # no tracker, no project


def test_a_trackio_dir_that_cannot_be_written_is_one_line_before_any_work(tmp_path, own_working_directory):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    env = {**os.environ, "TRACKIO_DIR": str(blocker / "trackio")}  # trackio reads it once, as it is imported
    argv = ["train", "recipes/tiny.yaml", "--report_to", "trackio", "--output_dir", "run"]
    result = subprocess.run(
        [sys.executable, "-m", "locedit.cli", *argv], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("locedit: error:")]
    assert len(errors) == 1 and "TRACKIO_DIR" in errors[0] and str(blocker / "trackio") in errors[0]
    assert "Traceback" not in result.stderr and not (own_working_directory / "run").exists()  # nothing started


def test_training_is_tracked_on_both_with_its_group_and_per_head_norms(offline_wandb):
    """A training run through transformers' callbacks: the same curves on trackio and W&B, in the run's head
    family group, with the edit's norm at each edited head."""
    flags = ["--dataset", "synthetic:40", "--logging_steps", "1", "--save_strategy", "no", "--heads", "L0H1,L1H2"]
    argv = ["train", "recipes/tiny.yaml", *flags, "--report_to", "trackio,wandb", "--wandb_project", "locedit-train"]
    assert cli([*argv, "--output_dir", "outputs/tiny/two-heads"]) == 0

    trackio_run = trackio_runs("locedit-train")["two-heads"]
    wandb_run = wandb_offline_runs(offline_wandb)["two-heads"]
    curves = {"train/loss", "train/rewards/margins", "train/rewards/accuracies", "train/learning_rate"}
    curves |= {"train/train_tokens_per_second", "train/edit/L0H1/b_norm", "train/edit/L1H2/b_norm"}
    assert curves <= trackio_run["keys"] and curves <= wandb_run["keys"]
    assert not any("L0H0" in key for key in trackio_run["keys"])  # only the edited heads
    assert trackio_run["group"] == wandb_run["group"] == "explicit-2"  # the head family of L0H1,L1H2
    # What transformers' W&B callback puts in the summary alone (its trackio callback leaves them out).
    ignored = {"total_flos", "train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss"}
    assert trackio_run["keys"] == wandb_run["keys"] - ignored


def test_judge_training_is_tracked_with_its_held_out_accuracy(tmp_path, shared_data_dir, tiny_model_dir):
    """`locedit judge-train` with report_to trackio: the training curves through TRL's SFTTrainer and the held-out
    scores as a run beside them, both in the judge's group of the judges' project."""
    from locedit.judge_train import cli as judge_train_cli

    argv = ["--judge_data", str(shared_data_dir / "truthfulqa" / "finetune_truth.jsonl"), "--judge_max_examples", "32"]
    argv += ["--model_name_or_path", str(tiny_model_dir("llama")), "--output_dir", str(tmp_path / "truth-judge")]
    argv += ["--num_train_epochs", "1", "--per_device_train_batch_size", "8", "--save_strategy", "no"]
    argv += ["--report_to", "trackio", "--project", "locedit-judge-test", "--logging_steps", "1"]
    assert judge_train_cli([*argv, "--dataloader_pin_memory", "false"]) == 0

    runs = trackio_runs("locedit-judge-test")
    assert set(runs) == {"truth-judge", "truth-judge-held-out"}
    assert runs["truth-judge"]["group"] == runs["truth-judge-held-out"]["group"] == "judge-truth"
    assert "train/loss" in runs["truth-judge"]["keys"]
    metrics = json.loads((tmp_path / "truth-judge" / "judge_metrics.json").read_text())
    logged = {key: value for log in runs["truth-judge-held-out"]["logs"] for key, value in log.items()}
    assert logged["judge/held_out_accuracy"] == metrics["held_out_accuracy"]


def test_a_multi_edit_run_tracks_each_edits_own_loss_and_head_norms():
    """A family of several edits trains as one run: each edit's own IPO loss and its norm at its head are curves of
    their own (`edits/NAME/...`); at each step the run's logged loss is the mean of its edits' losses."""
    flags = ["--dataset", "synthetic:40", "--logging_steps", "1", "--save_strategy", "no"]
    argv = ["train", "recipes/tiny.yaml", *flags, "--heads", "random:1", "--heads_draws", "2"]
    assert cli([*argv, "--report_to", "trackio", "--wandb_project", "locedit-multi", "--output_dir", "family"]) == 0

    (run,) = trackio_runs("locedit-multi").values()
    edits = json.loads(Path("family/metrics.json").read_text())["edits"]
    assert len(edits) == 2
    for name in edits:
        heads = json.loads(Path("family", name, "heads.json").read_text())["heads"]
        assert f"train/edits/{name}/L{heads[0][0]}H{heads[0][1]}/b_norm" in run["keys"]
    steps = [log for log in run["logs"] if "train/loss" in log]
    assert len(steps) == 6
    for log in steps:
        own = [log[f"train/edits/{name}/loss"] for name in edits]
        assert log["train/loss"] == pytest.approx(sum(own) / len(own), rel=1e-6)
