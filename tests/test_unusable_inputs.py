"""Input locedit cannot use, refused in one line at plan time (before any weights load, with nothing left behind):
models it cannot edit, head counts and evaluation sizes out of range, data with no usable row, and data files that
are not UTF-8 text or not valid JSON (named by file, line and column).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_messages import one_error_line

from locedit.cli import main as locedit
from locedit.heads import SELECTORS

TINY = "recipes/tiny.yaml"
SUPPORTED = "gemma, gemma2, gpt2, gpt_neox, llama, mistral, phi, phi3, qwen2, qwen3"


@pytest.fixture
def no_weights_load(monkeypatch):
    """Loading any model's weights fails the test: every refusal here must come before."""
    from transformers import AutoModelForCausalLM

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the input was refused")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


def refused_everywhere(capsys, model: Path, flags: list[str], *needles: str) -> None:
    """train (and its dry run), probe, iti, eval of the base model and the study each refuse `model` in one line,
    leaving no output directory."""
    commands = [
        ["train", TINY],
        ["train", TINY, "--dry_run", "true"],
        ["probe", TINY],
        ["iti", TINY],
        ["eval", TINY, "--base", "--eval_judge_truth", "none", "--eval_judge_info", "none", "--eval_corpus", "none"],
        ["study", TINY, "--heads", "probe:2"],
    ]
    for command in commands:
        code = locedit([*command, "--model_name_or_path", str(model), *flags])
        one_error_line(capsys, code, f"model '{model}'", *needles)
        assert not Path("outputs").exists(), command


# ---------------------------------------------------------------------------------------------------------------------
# Models locedit cannot edit
# ---------------------------------------------------------------------------------------------------------------------


def save_tiny(model, directory: Path) -> Path:
    """A randomly initialised tiny model saved with the tiny models' tokenizer, as a local model directory."""
    from locedit.models.tiny import build_tokenizer

    model.save_pretrained(directory)
    build_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=512, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    return save_tiny(BertModel(config), tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def mamba_dir(tmp_path_factory) -> Path:
    from transformers import MambaConfig, MambaForCausalLM

    config = MambaConfig(vocab_size=512, hidden_size=32, num_hidden_layers=1, state_size=4)
    return save_tiny(MambaForCausalLM(config), tmp_path_factory.mktemp("mamba"))


def test_an_encoder_only_model_is_refused_before_its_weights_load(bert_dir, no_weights_load, capsys):
    refused_everywhere(
        capsys,
        bert_dir,
        [],
        "(model type 'bert') is encoder-only",
        f"use a decoder model of a supported type: {SUPPORTED}",
    )


def test_a_state_space_model_is_refused_for_having_no_attention_heads(mamba_dir, no_weights_load, capsys):
    refused_everywhere(capsys, mamba_dir, [], "(model type 'mamba') has no attention heads", SUPPORTED)


def test_a_decoder_without_a_known_output_projection_names_the_supported_types(tmp_path, no_weights_load, capsys):
    from transformers import BloomConfig, BloomForCausalLM

    model = save_tiny(BloomForCausalLM(BloomConfig(vocab_size=512, hidden_size=32, n_layer=1, n_head=2)), tmp_path)
    code = locedit(["train", TINY, "--model_name_or_path", str(model), "--dry_run", "true"])
    one_error_line(
        capsys,
        code,
        f"model '{model}' (model type 'bloom') has no per-head attention output projection that locedit knows",
        SUPPORTED,
    )


def test_a_tokenizer_without_a_chat_template_is_refused_when_the_recipe_asks_for_one(
    tiny_model_dir, tmp_path, no_weights_load, capsys
):
    model = tmp_path / "base-model"
    shutil.copytree(tiny_model_dir("llama"), model)
    (model / "chat_template.jinja").unlink()
    refused_everywhere(
        capsys, model, ["--chat_template", "true"], "has no chat template", "chat_template: false for the Q/A prompt"
    )


# ---------------------------------------------------------------------------------------------------------------------
# Sizes out of range for this model or data
# ---------------------------------------------------------------------------------------------------------------------

TOO_MANY = "asks for 9 heads, but the model has 2 layers x 4 heads = 8 heads; give K from 1 to 8"
# Every selector kind of the registry (`all` always fits) asking for more heads than tiny:llama's 2 x 4.
BEYOND_THE_MODEL = {
    "random": ("random:9", f"'random:9' {TOO_MANY}"),
    "single": ("single:9", f"'single:9' {TOO_MANY}"),
    "probe": ("probe:9", f"'probe:9' {TOO_MANY}"),
    "importance": ("importance:9", f"'importance:9' {TOO_MANY}"),
    "layers": ("layers:0-2", "layer range '0-2' is out of range: model has 2 layers x 4 heads (layers 0-1)"),
    "heads": ("L0H1,L9H9", "head 'L9H9' is out of range: model has 2 layers x 4 heads (layers 0-1, heads 0-3)"),
}


def test_every_selector_kind_has_a_case_beyond_the_model():
    assert set(BEYOND_THE_MODEL) == set(SELECTORS) - {"all"}


@pytest.mark.parametrize("kind", sorted(BEYOND_THE_MODEL))
def test_a_head_spec_beyond_the_model_is_one_line(kind, no_weights_load, capsys):
    spec, message = BEYOND_THE_MODEL[kind]
    for dry_run in ("true", "false"):
        code = locedit(["train", TINY, "--heads", spec, "--dry_run", dry_run])
        one_error_line(capsys, code, message)
        assert not Path("outputs").exists()


@pytest.mark.parametrize(
    "flag, value, least",
    [
        ("eval_max_new_tokens", "0", 1),
        ("eval_batch_size", "-1", 1),
        ("eval_max_questions", "0", 1),
        ("eval_corpus_docs", "0", 1),
        ("eval_corpus_max_tokens", "1", 2),
    ],
)
def test_an_evaluation_size_below_its_least_is_one_line_in_every_command(flag, value, least, capsys):
    for command in (["train", TINY, "--dry_run", "true"], ["eval", TINY, "--base", "--dry_run", "true"]):
        code = locedit([*command, f"--{flag}", value])
        one_error_line(capsys, code, f"{flag} {value} is not valid: it must be an integer >= {least}")


def test_bad_rows_skip_that_leaves_no_row_is_one_line(tmp_path, capsys):
    data = tmp_path / "prefs.jsonl"
    data.write_text(
        '{"prompt": "Q: a?", "chosen": " x", "rejected": " x"}\n{"prompt": "", "chosen": " x", "rejected": " y"}\n'
    )
    for command in ("train", "probe"):
        code = locedit([command, TINY, "--dataset", str(data), "--bad_rows", "skip", "--dry_run", "true"])
        one_error_line(
            capsys,
            code,
            f"every row of '{data}' is bad (2 of 2), so bad_rows: skip leaves none",
            f"the first: {data}:1: chosen and rejected are the same",
            "fix the data",
        )


# ---------------------------------------------------------------------------------------------------------------------
# Data files that are not UTF-8 text or not valid JSON
# ---------------------------------------------------------------------------------------------------------------------

GOOD_ROW = b'{"prompt": "Q: a?", "chosen": " yes", "rejected": " no"}\n'


@pytest.mark.parametrize(
    "name, content, where, column",
    [
        ("prefs.jsonl", GOOD_ROW * 2 + b'{"prompt": "caf\xc3\xa9 \xff", "chosen": " a", "rejected": " b"}\n', "3", 18),
        ("prefs.json", b"[\n" + GOOD_ROW[:-1] + b",\n" + GOOD_ROW[:-1] + b"\xe9]\n", "3", 57),
        ("prefs.csv", b"prompt,chosen,rejected\nQ: a?,yes,no\nQ: b?,caf\xe9,no\n", "3", 10),
    ],
)
def test_a_data_file_that_is_not_utf8_names_its_line_and_column(name, content, where, column, tmp_path, capsys):
    data = tmp_path / name
    data.write_bytes(content)
    code = locedit(["train", TINY, "--dataset", str(data), "--dry_run", "true"])
    byte = "0xff" if b"\xff" in content else "0xe9"
    one_error_line(
        capsys, code, f"{data}:{where}: not UTF-8 text (byte {byte} at column {column}); save the file as UTF-8"
    )


@pytest.mark.parametrize(
    "name, content, where",
    [
        ("prefs.jsonl", GOOD_ROW + b'{"prompt": "Q: b?", "chosen": " x" "rejected": " y"}\n', "2:36"),
        ("prefs.json", b"[\n" + GOOD_ROW[:-1] + b",\n" + GOOD_ROW[:-1] + b",\n]\n", "4:1"),
    ],
)
def test_invalid_json_in_a_data_file_names_its_line_and_column(name, content, where, tmp_path, capsys):
    data = tmp_path / name
    data.write_bytes(content)
    code = locedit(["train", TINY, "--dataset", str(data), "--dry_run", "true"])
    line, column = where.split(":")
    one_error_line(capsys, code, f"{data}:{line}: invalid JSON at column {column} (")
