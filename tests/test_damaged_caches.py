"""What locedit keeps to reuse (activations, probe and importance results, reference log-probs, the frozen prefix
spilled to disk) is checked as it is read: one cut short, overwritten or missing a file is computed again with one
line, and the result equals the undamaged one's; never loaded as if whole."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from locedit import cli as locedit_cli
from locedit.config import parse_recipe
from locedit.core.errors import DamagedCacheWarning, DamagedFileError
from locedit.locate import ProbeResult
from locedit.locate.activations import load_activations
from locedit.locate.importance import ImportanceResult, run_importance_stage
from locedit.models.layout import AttentionLayout
from locedit.models.loading import read_model_config
from locedit.training.pair_logps import PairScorer

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "recipes" / "tiny.yaml")
TINY_PROBE = str(REPO / "recipes" / "tiny_probe.yaml")


def damage(path: Path, how: str) -> None:
    """Cut a file short, overwrite bytes near its end (a safetensors header stays whole), or replace it by junk."""
    data = path.read_bytes()
    if how == "cut":
        path.write_bytes(data[: len(data) // 2])
    elif how == "overwritten":
        path.write_bytes(data[:-16] + bytes(b ^ 0x5A for b in data[-16:]))
    elif how == "garbage":
        path.write_bytes(b"\x00garbage" * 10)
    elif how == "removed":
        path.unlink()


class Lines:
    """The `locedit:` lines of the damaged-cache notices given inside the block, as the commands print them."""

    def __enter__(self):
        self._catch = warnings.catch_warnings(record=True)
        self.caught = self._catch.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)
        # Each text once, as `format_locedit_warning` prints them (a stage may look at an entry twice).
        said = [f"locedit: {w.message}" for w in self.caught if issubclass(w.category, DamagedCacheWarning)]
        self.lines = list(dict.fromkeys(said))


def probe(out: Path, *flags: str) -> None:
    assert locedit_cli.main(["probe", TINY_PROBE, "--probe_output_dir", str(out), *flags]) == 0


PROBE_TENSORS = ("val_accuracy", "train_accuracy", "direction", "sigma", "weight", "bias")


def probe_tensors(out: Path) -> dict[str, torch.Tensor]:
    """A saved probe result's tensors, copied (not views of a file that is damaged next)."""
    result = ProbeResult.load(str(out))
    return {name: getattr(result, name).clone() for name in PROBE_TENSORS}


# ---------------------------------------------------------------------------------------------------------------------
# Activations and probe results
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["cut", "overwritten", "garbage"])
def test_damaged_activations_are_collected_again(how, tmp_path, capsys):
    out = tmp_path / "probe"
    probe(out)
    first = probe_tensors(out)
    (cached,) = out.glob("activations-*.safetensors")
    whole = load_activations(str(cached)).clone()  # not a view of the file, which is damaged next
    damage(cached, how)
    (out / "probe.json").unlink()  # the probes are fitted again, from the activations
    with Lines() as said:
        probe(out)
    assert len(said.lines) == 1, said.lines
    assert said.lines[0].startswith(f"locedit: the cached activations file '{cached}' is damaged (")
    assert said.lines[0].endswith("); collecting the activations again")
    assert torch.equal(load_activations(str(cached)), whole)  # written again, whole
    again = probe_tensors(out)
    assert all(torch.equal(again[name], first[name]) for name in PROBE_TENSORS)
    capsys.readouterr()


@pytest.mark.parametrize(
    "file, how",
    [("probe.safetensors", "cut"), ("probe.safetensors", "overwritten"), ("probe.safetensors", "removed")]
    + [("probe.json", "cut")],
)
def test_a_damaged_probe_result_is_made_again(file, how, tmp_path, capsys, monkeypatch):
    out = tmp_path / "probe"
    probe(out)
    first = probe_tensors(out)
    damage(out / file, how)

    def no_model(*args, **kwargs):
        raise AssertionError("the cached activations serve: the model need not run")

    monkeypatch.setattr("locedit.locate.stage.collect_head_activations", no_model)
    with Lines() as said:
        probe(out)
    assert said.lines == [said.lines[0]] and said.lines[0].startswith(f"locedit: the cached probe result '{out}' is")
    assert said.lines[0].endswith("); probing again"), said.lines
    again = probe_tensors(out)
    for name in PROBE_TENSORS:
        assert torch.equal(again[name], first[name]), name
    capsys.readouterr()


def test_a_given_probe_result_overwritten_is_one_error_line(tmp_path, capsys):
    out = tmp_path / "probe"
    probe(out)
    damage(out / "probe.safetensors", "overwritten")  # its header whole: only the checksum can tell
    capsys.readouterr()
    argv = ["iti", TINY_PROBE, "--probe_results", str(out), "--output_dir", str(tmp_path / "run")]
    assert locedit_cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("locedit: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"probe result '{out}' is unreadable: probe.safetensors does not match its checksum" in lines[0]
    assert "make it again with `locedit probe`" in lines[0]


# ---------------------------------------------------------------------------------------------------------------------
# Importance results
# ---------------------------------------------------------------------------------------------------------------------


def _overwrite_a_score(path: Path) -> None:
    payload = json.loads(path.read_text())
    payload["scores"][0][0] *= 2  # still valid JSON: only the checksum can tell
    path.write_text(json.dumps(payload))


@pytest.mark.parametrize("how", ["cut", "overwritten", "garbage"])
def test_a_damaged_importance_result_is_computed_again(how, capsys):
    recipe = parse_recipe([TINY, "--heads", "importance:2", "--report_to", "none"])
    model_path, _, layout = read_model_config(recipe.model)
    first = run_importance_stage(recipe, model_path, layout)
    saved = Path("outputs/tiny/importance/importance.json")
    if how == "overwritten":
        _overwrite_a_score(saved)
    else:
        damage(saved, how)
    with Lines() as said:
        again = run_importance_stage(recipe, model_path, layout)
    assert len(said.lines) == 1, said.lines
    assert said.lines[0].startswith("locedit: the cached importance result 'outputs/tiny/importance' is damaged (")
    assert said.lines[0].endswith("); computing it again")
    assert torch.equal(again.scores.double(), first.scores.double())
    assert torch.equal(ImportanceResult.load("outputs/tiny/importance").scores, first.scores.double())
    capsys.readouterr()


# ---------------------------------------------------------------------------------------------------------------------
# Reference log-probs
# ---------------------------------------------------------------------------------------------------------------------


def test_a_reference_log_prob_cache_cut_short_is_computed_again(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """Today's behaviour, kept: a file that does not read is recomputed whole, in one line, to the same numbers."""
    from test_training_speed import _trainer

    from locedit.data import load_preference_splits

    monkeypatch.setenv("LOCEDIT_CACHE", str(tmp_path / "cache"))
    splits = load_preference_splits("synthetic:40", split_fractions=(0.6, 0.2, 0.2), seed=0)
    model_dir = tiny_model_dir("llama")
    first = _trainer(model_dir, splits, tmp_path, cache=True)
    (cached,) = (tmp_path / "cache" / "ref_logps").glob("*.safetensors")
    damage(cached, "cut")
    capsys.readouterr()
    again = _trainer(model_dir, splits, tmp_path, cache=True)
    said = [line for line in capsys.readouterr().out.splitlines() if str(cached) in line]
    assert len(said) == 1 and "does not read" in said[0] and said[0].endswith("computing again"), said
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        assert again.train_dataset[column] == first.train_dataset[column]
        assert again.eval_dataset[column] == first.eval_dataset[column]


# ---------------------------------------------------------------------------------------------------------------------
# The frozen prefix spilled to disk
# ---------------------------------------------------------------------------------------------------------------------


def test_a_damaged_spilled_frozen_prefix_is_computed_again(tiny_model_dir, tmp_path, monkeypatch):
    from test_pair_logps import random_batch

    monkeypatch.setenv("LOCEDIT_CACHE", str(tmp_path / "cache"))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama", num_layers=3))
    model.eval()
    batch = random_batch(model.config.vocab_size)
    scorer = PairScorer(model, AttentionLayout.from_model(model), 2, frozen_prefix_max_memory_gb=0)
    with torch.no_grad():
        expected = scorer(*batch).log_probs  # every unit's states go to disk
    files = sorted((tmp_path / "cache" / "frozen_prefix").glob("*/*.pt"))
    assert len(files) == 5 and len(scorer.prefix.memory) == 0
    kept = scorer.prefix.disk_bytes
    damage(files[0], "cut")
    damage(files[1], "removed")
    with Lines() as said, torch.no_grad():
        again = scorer(*batch).log_probs
    assert len(said.lines) == 2, said.lines
    cut, removed = sorted(said.lines, key=lambda line: str(files[1]) in line)
    assert cut.startswith(f"locedit: the cached frozen prefix file '{files[0]}' is damaged (") and "bytes, not" in cut
    assert (
        removed
        == f"locedit: the cached frozen prefix file '{files[1]}' is damaged (it is missing); computing it again"
    )
    assert torch.equal(again, expected)
    assert len(scorer.prefix) == 5 and scorer.prefix.disk_bytes == kept  # stored again, counted once

    # Damaged after the check (a failing disk): one error line, never states taken as whole.
    key = next(iter(scorer.prefix.on_disk))
    path = Path(scorer.prefix._path(key))
    path.write_bytes(b"\x00" * path.stat().st_size)
    with pytest.raises(DamagedFileError, match=r"the frozen prefix file '.*' is damaged \(.*\) after this run"):
        scorer.prefix.get(key)
    scorer.close()
    assert not any((tmp_path / "cache" / "frozen_prefix").iterdir())
