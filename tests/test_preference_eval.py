"""Evaluating preference-style data (prompt/chosen/rejected): a 40-row file trains, evaluates and reports, its held-out
pairs scored as TRL's DPOTrainer scores them (checked against a hand computation, a plain forward pass and TRL's own
`evaluate`), in the metric registry, the report and the study."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from locedit import load_edit
from locedit.config import parse_recipe
from locedit.data import load_preference_splits, load_prompt_pairs
from locedit.eval import cli as eval_cli
from locedit.evaluation.metric_registry import get_metric, per_question_metrics
from locedit.evaluation.preference import pair_terms, turn_stops
from locedit.evaluation.prompts import cut_answer
from locedit.evaluation.scoring import corpus_scores, document_scores
from locedit.report import main as report_main
from locedit.reporting import Run, paired_bootstrap, read_run
from locedit.train import main as train_main

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "recipes" / "tiny.yaml")
TINY_PROBE = str(REPO / "recipes" / "tiny_probe.yaml")
PAIRS_FILE = REPO / "tests" / "data" / "preference_sample.jsonl"
TAU = 0.1
PREFERENCE_METRICS = ("prefers_chosen", "reward_accuracy", "reward_margin", "heldout_ipo_loss")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def eval_flags(*extra: str) -> list[str]:
    return ["--eval_corpus", "none", "--eval_max_new_tokens", "12", "--eval_batch_size", "8", *extra]


def train_argv(model: Path, out: Path, *extra: str) -> list[str]:
    """A few steps of IPO on the preference file, at a learning rate that moves a tiny model's edit."""
    argv = [TINY, "--model_name_or_path", str(model), "--dataset", str(PAIRS_FILE), "--output_dir", str(out)]
    argv += ["--max_steps", "6", "--learning_rate", "0.1", "--save_strategy", "no", "--beta", str(TAU)]
    return argv + ["--report_to", "none", *extra]


@pytest.fixture(scope="module")
def evaluated(tiny_model_dir, tmp_path_factory):
    """arch -> (base model dir, run dir, base eval dir): an edit trained on the 40-row file, then `locedit eval` of it
    and of the base model. The Llama runs go through `locedit train` and `locedit eval RUN --base` ("llama-chat": with
    the tokenizer's chat template); the GPT-2 run is evaluated at the end of training (eval_after_train), its base
    model by `locedit eval` after."""
    made = {}

    def make(arch: str):
        if arch not in made:
            model = tiny_model_dir(arch.removesuffix("-chat"))
            root = tmp_path_factory.mktemp(f"pref-{arch}")
            run = root / "run"
            if arch.startswith("llama"):
                chat = ["--chat_template", "true"] if arch.endswith("-chat") else []
                train_main(parse_recipe(train_argv(model, run, *chat)))
                assert eval_cli([str(run), "--base", *eval_flags()]) == 0
            else:
                train_main(parse_recipe(train_argv(model, run, "--eval_after_train", "true", *eval_flags())))
                assert (run / "eval" / "metrics.json").is_file()
                assert eval_cli([str(run), "--base", *eval_flags()]) == 0  # the edit's evaluation is left as it is
            made[arch] = model, run, root / "base"
        return made[arch]

    return make


def held_out_pairs(run: Path) -> list[dict]:
    """The test pairs of the run's split, as training's own loader splits them."""
    return load_preference_splits(str(PAIRS_FILE), split_fractions=(0.6, 0.2, 0.2), seed=0)["test"].to_list()


def completion_logps(model, tokenizer, prompt: str, completion: str) -> tuple[float, int]:
    """log p(completion + EOS | prompt) from one plain forward pass, and the completion's token count: TRL's text
    pair (the prompt ends on a token boundary here, so the completion's tokens are those after the prompt's)."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = tokenizer(prompt + completion + tokenizer.eos_token)["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    return sum(logprobs[t - 1, ids[t]].item() for t in range(len(prompt_ids), len(ids))), len(ids) - len(prompt_ids)


# ---------------------------------------------------------------------------------------------------------------------
# The definitions
# ---------------------------------------------------------------------------------------------------------------------


def test_a_pairs_terms_are_trls_ipo_loss_rewards_and_margin_by_hand():
    # Summed log-probs: policy chosen -10 (4 tokens), rejected -9 (2 tokens); reference -12 and -8.
    terms = pair_terms(-10.0, -9.0, -12.0, -8.0, chosen_tokens=4, rejected_tokens=2, beta=0.1)
    # log-ratios 2 and -1; rewards 0.1 * 2 = 0.2 and 0.1 * -1 = -0.1; h = 2/4 - (-1)/2 = 1; (1 - 1/(2 * 0.1))^2 = 16.
    assert terms["pairs_preferring_chosen"] == 0.0  # -10 < -9: the model itself prefers rejected
    assert terms["pairs_reward_accurate"] == 1.0 and terms["reward_margin_sum"] == pytest.approx(0.3)
    assert terms["ipo_loss_sum"] == pytest.approx(16.0)
    # The unedited model (policy = reference): reward 0 for both, no accuracy, the IPO loss 1/(4 tau^2).
    start = pair_terms(-3.0, -5.0, -3.0, -5.0, 3, 7, beta=0.1)
    assert start == {
        "pairs_preferring_chosen": 1.0,
        "pairs_reward_accurate": 0.0,
        "reward_margin_sum": 0.0,
        "ipo_loss_sum": pytest.approx(25.0),
    }
    assert pair_terms(-3.0, -5.0) == {"pairs_preferring_chosen": 1.0}  # no reference: the base model's


def test_a_metric_over_pairs_is_the_mean_over_all_pairs_and_bootstraps_by_prompt():
    prefers = get_metric("prefers_chosen")
    assert prefers.over_pairs and prefers in per_question_metrics()
    # One prompt with 1 pair preferred, one with 0 of 3: 1 of 4 pairs (a mean over prompts would say 0.5).
    records = [
        {"pairs": 1, "pairs_preferring_chosen": 1.0},
        {"pairs": 3, "pairs_preferring_chosen": 0.0},
        {"pairs": 2},  # the base model's record for reward accuracy: no sum, left out with its count
    ]
    assert prefers.of_records(records) == 0.25
    assert get_metric("reward_accuracy").of_records(records) is None
    loss = get_metric("heldout_ipo_loss")
    assert not loss.higher_is_better and loss.of_records([{"pairs": 2, "ipo_loss_sum": 50.0}]) == 25.0
    # The paired bootstrap resamples prompts and recombines the sums and counts of each resample.
    values = {q: {"pairs": 1 + q % 3, "pairs_preferring_chosen": float(q % 3)} for q in range(30)}
    worse = {q: {"pairs": 1 + q % 3, "pairs_preferring_chosen": 0.0} for q in range(30)}
    run = Run("a", "ipo", "all-heads", "all", None, TAU, 0.1, None, {}, values)
    reference = Run("b", "ipo", "all-heads", "all", None, TAU, 0.1, None, {}, worse)
    observed, low, high = paired_bootstrap(run, reference, metric="prefers_chosen")
    assert observed == pytest.approx(30 / 60) and 0 < low <= observed <= high <= 1


def test_held_out_prompts_are_the_test_prompts_of_the_training_split_with_all_their_pairs(tmp_path):
    rows = [
        {"prompt": f"P{i}", "chosen": f" good {i}", "rejected": f" bad {i}", "topic": f"t{i % 5}"} for i in range(40)
    ]
    rows.insert(3, {"prompt": "P0", "chosen": " also good", "rejected": " bad 0", "topic": "t0"})
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    for group_by in (None, "topic"):
        pairs = load_preference_splits(str(path), group_by=group_by)
        prompts = load_prompt_pairs(str(path), group_by=group_by)
        for split, records in prompts.items():
            expected = {(r["question_id"], r["prompt"], r["chosen"], r["rejected"]) for r in pairs[split].to_list()}
            got = {(r["question_id"], r["question"], c, rj) for r in records for c, rj in r["pairs"]}
            assert got == expected and len(got) == sum(len(r["pairs"]) for r in records)
    first = next(r for records in load_prompt_pairs(str(path)).values() for r in records if r["question"] == "P0")
    assert first["pairs"] == [[" good 0", " bad 0"], [" also good", " bad 0"]]
    assert first["correct_answers"] == [" good 0", " also good"] and first["incorrect_answers"] == [" bad 0"]
    assert first["best_answer"] == " good 0"


def test_an_answer_to_a_dialogue_prompt_ends_at_the_next_speaker():
    stops = turn_stops(["Human: How do I boil an egg?\n\nAssistant:", "User: hi\nBot:"])
    assert stops == ("\nHuman:", "\nAssistant:", "\nUser:", "\nBot:")
    assert cut_answer(" Ten minutes.\n\nHuman: and a soft one?", stops=stops) == "Ten minutes."
    assert cut_answer(" Ask a Human: they know.", stops=stops) == "Ask a Human: they know."  # not at a line start


def test_kl_and_ce_per_document_average_to_the_corpus_scores(tiny_model_dir):
    from locedit import add_edit
    from locedit.edit import HeadEditConfig, edit_layers
    from locedit.models.layout import AttentionLayout

    path = tiny_model_dir("llama")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    edited = add_edit(model, HeadEditConfig.for_heads(AttentionLayout.from_config(model.config), [(0, 1), (1, 2)]))
    for layer in edit_layers(edited).values():
        layer.lora_B["default"].weight.data.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    docs = ["Human: Why is the sky blue?\n\nAssistant:", "a", "The sun is yellow and the snow is white."]
    scores = document_scores(edited, tokenizer, docs, max_tokens=32, batch_size=2)
    assert scores[1] is None  # one token: nothing to predict
    whole = corpus_scores(edited, tokenizer, docs, max_tokens=32, batch_size=2)
    for key in ("ce", "kl", "ce_original"):
        assert whole[key] == pytest.approx((scores[0][key] + scores[2][key]) / 2)
    assert whole["corpus_docs"] == 2 and scores[0]["kl"] > 0


# ---------------------------------------------------------------------------------------------------------------------
# A 40-row preference file: train, evaluate, report
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_preference_file_trains_evaluates_and_reports_its_held_out_pairs(arch, evaluated, tmp_path, capsys):
    model_dir, run, base_dir = evaluated(arch)
    pairs = held_out_pairs(run)
    test_ids = json.loads((run / "splits.json").read_text())["question_ids"]["test"]
    assert sorted({pair["question_id"] for pair in pairs}) == sorted(test_ids) and len(pairs) == 8

    # The numbers from the models themselves: a plain forward pass of each pair, the edit on and off.
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    edited = load_edit(AutoModelForCausalLM.from_pretrained(model_dir), str(run)).eval()
    direct = {}
    for pair in pairs:
        (chosen, n_chosen), (rejected, n_rejected) = (
            completion_logps(edited, tokenizer, pair["prompt"], pair[key]) for key in ("chosen", "rejected")
        )
        with edited.disable_adapter():
            ref_chosen, _ = completion_logps(edited, tokenizer, pair["prompt"], pair["chosen"])
            ref_rejected, _ = completion_logps(edited, tokenizer, pair["prompt"], pair["rejected"])
        ratio_c, ratio_r = chosen - ref_chosen, rejected - ref_rejected
        direct[pair["prompt"]] = {
            "base_prefers": float(ref_chosen > ref_rejected),
            "prefers": float(chosen > rejected),
            "accurate": float(ratio_c > ratio_r),
            "margin": TAU * (ratio_c - ratio_r),
            "loss": (ratio_c / n_chosen - ratio_r / n_rejected - 1 / (2 * TAU)) ** 2,
            "mc2": 1 / (1 + math.exp(rejected - chosen)),
        }

    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    records = read_jsonl(run / "eval" / "generations.jsonl")
    assert metrics["data_layout"] == "preference" and metrics["mc_source"] == "pairs"
    assert metrics["pairs"] == 8 and metrics["beta"] == TAU and metrics["questions"] == len(records) == 8
    assert metrics["judges"] == {"truth": None, "info": None}  # auto: no judge of TruthfulQA's truth on such data
    assert "true" not in metrics and "info" not in metrics
    for record in records:
        expected = direct[record["question"]]
        assert record["pairs"] == 1
        assert record["pairs_preferring_chosen"] == expected["prefers"]
        assert record["pairs_reward_accurate"] == expected["accurate"]
        assert record["reward_margin_sum"] == pytest.approx(expected["margin"], abs=1e-4)
        assert record["ipo_loss_sum"] == pytest.approx(expected["loss"], rel=1e-4)
        assert record["mc1"] == expected["prefers"] and record["mc2"] == pytest.approx(expected["mc2"], abs=1e-4)
        assert record["kl_prompt"] >= 0 and record["ce_prompt"] > 0 and "degenerate" in record
    values = list(direct.values())
    assert metrics["prefers_chosen"] == sum(v["prefers"] for v in values) / 8
    assert metrics["reward_accuracy"] == sum(v["accurate"] for v in values) / 8
    assert metrics["reward_margin"] == pytest.approx(sum(v["margin"] for v in values) / 8, abs=1e-4)
    assert metrics["heldout_ipo_loss"] == pytest.approx(sum(v["loss"] for v in values) / 8, rel=1e-4)
    assert metrics["mc2"] == pytest.approx(sum(v["mc2"] for v in values) / 8, abs=1e-4)
    assert any(v["margin"] != 0 for v in values) and metrics["heldout_ipo_loss"] != pytest.approx(1 / (4 * TAU**2))
    assert metrics["kl_prompts"] > 0 and "degenerate" in metrics and "broken" in metrics

    # The base model: the pairs it prefers, no reward (it is the reference), CE but no KL.
    base = json.loads((base_dir / "eval" / "metrics.json").read_text())
    assert base["prefers_chosen"] == sum(v["base_prefers"] for v in values) / 8
    assert not {"reward_accuracy", "reward_margin", "heldout_ipo_loss", "kl_prompts"} & set(base)
    assert base["ce_prompts"] > 0 and base["pairs"] == 8

    # The report: every preference metric a column, head sets scored by Prefers chosen (no judge ran).
    capsys.readouterr()
    assert report_main([str(run.parent), "--output_dir", str(tmp_path / "report")]) == 0
    with open(tmp_path / "report" / "results.csv") as f:
        rows = {row["method"]: row for row in csv.DictReader(f)}
    assert set(rows) == {"base", "ipo"}
    for key in (*PREFERENCE_METRICS, "kl_prompts", "ce_prompts", "mc1", "mc2"):
        assert float(rows["ipo"][key]) == pytest.approx(metrics[key])
    assert float(rows["base"]["prefers_chosen"]) == base["prefers_chosen"] and rows["base"]["reward_accuracy"] == ""
    assert "Score: Prefers chosen (`prefers_chosen`)" in (tmp_path / "report" / "verdict.md").read_text()
    assert "IPO loss (held out)" not in capsys.readouterr().err


@pytest.mark.parametrize("chat", [False, True], ids=["text", "chat-template"])
def test_the_held_out_ipo_loss_and_rewards_are_those_trls_evaluate_reports(chat, evaluated, tmp_path):
    """TRL's DPOTrainer (loss_type ipo) evaluating the edit against its base model on the held-out pairs in one batch
    (text pairs, or the conversational pairs of a run with `chat_template`) reports the loss, reward accuracy and
    margin the evaluation wrote."""
    from trl import DPOConfig, DPOTrainer

    model_dir, run, _ = evaluated("llama-chat" if chat else "llama")
    test = load_preference_splits(str(PAIRS_FILE), chat_template=chat)["test"]
    test = test.select_columns(["prompt", "chosen", "rejected"])
    policy = load_edit(AutoModelForCausalLM.from_pretrained(model_dir), str(run))
    config = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        loss_type=["ipo"],
        beta=TAU,
        per_device_eval_batch_size=64,
        report_to="none",
        use_cpu=True,
        bf16=False,
    )
    trainer = DPOTrainer(
        model=policy,
        ref_model=AutoModelForCausalLM.from_pretrained(model_dir),
        args=config,
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        train_dataset=test,
        eval_dataset=test,
    )
    trl = trainer.evaluate()
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert trl["eval_rewards/margins"] != 0  # the edit moved the pairs: the comparison can fail
    assert metrics["heldout_ipo_loss"] == pytest.approx(trl["eval_loss"], rel=1e-5)
    assert metrics["reward_accuracy"] == trl["eval_rewards/accuracies"]
    assert metrics["reward_margin"] == pytest.approx(trl["eval_rewards/margins"], rel=1e-3, abs=1e-6)


def test_judges_named_by_the_recipe_judge_the_saved_answers_and_the_pair_scores_are_kept(evaluated, capsys):
    _, run, _ = evaluated("llama")
    before = json.loads((run / "eval" / "metrics.json").read_text())
    capsys.readouterr()
    argv = [str(run), *eval_flags("--eval_judge_truth", "similarity", "--eval_rejudge", "true")]
    assert eval_cli(argv) == 0
    assert "judging its 8 saved answers again" in capsys.readouterr().out
    after = json.loads((run / "eval" / "metrics.json").read_text())
    assert after["judges"] == {"truth": "similarity", "info": None} and 0 <= after["true"] <= 1
    # BLEU against the prompt's chosen (correct) and rejected (incorrect) completions.
    assert all("bleu_acc" in record for record in read_jsonl(run / "eval" / "generations.jsonl"))
    for key in (*PREFERENCE_METRICS, "mc1", "mc2", "kl_prompts", "ce_prompts", "degenerate", "pairs"):
        assert after[key] == before[key]


def test_the_dry_run_says_what_preference_data_gives_and_mc_targets_are_refused(evaluated, tmp_path, capsys):
    import shutil

    _, evaluated_run, _ = evaluated("llama")
    run = tmp_path / "run"  # a copy without the evaluations other tests made of the shared run
    shutil.copytree(evaluated_run, run, ignore=shutil.ignore_patterns("eval"))
    capsys.readouterr()
    fresh = tmp_path / "fresh"
    assert eval_cli([str(run), "--base", *eval_flags("--eval_output_dir", str(fresh), "--dry_run", "true")]) == 0
    out = capsys.readouterr().out
    assert "base: 8 test prompts" in out and "judges: truth none, info none (checked)" in out
    assert "8 held-out pairs of 8 prompts, scored as TRL scores them" in out
    assert "MC1: each prompt's first chosen completion against its rejected ones" in out
    assert not fresh.exists() and not (run / "eval").exists()
    targets = REPO / "tests" / "data" / "truthfulqa_mc_sample.jsonl"
    argv = [str(run), *eval_flags("--eval_output_dir", str(fresh), "--eval_mc_targets", str(targets))]
    assert eval_cli([*argv, "--base"]) == 2
    assert "is for question-style data; MC1/MC2 of preference-style data" in capsys.readouterr().err


def test_a_study_on_preference_data_tables_and_scores_the_preference_metrics(tiny_model_dir, tmp_path):
    """The whole study on the 40-row file (one random set, one single head): its tables show the preference
    metrics, its verdict scores head sets by Prefers chosen, and each family is compared with the base model."""
    from locedit.study import main as study_main

    argv = [TINY_PROBE, "--model_name_or_path", str(tiny_model_dir("llama")), "--dataset", str(PAIRS_FILE)]
    argv += ["--study_random", "1", "--study_single", "1", "--max_steps", "4"]
    argv += [*eval_flags("--eval_max_degenerate", "null")]
    report = study_main(argv)
    assert report["metric"] == "prefers_chosen" and report["verdict"]["metric"] == "prefers_chosen"
    header = report["table"].splitlines()[0]
    for label in ("Prefers chosen", "Reward accuracy", "Reward margin", "IPO loss (held out)", "KL (prompts)"):
        assert label in header and label in report["summary_table"].splitlines()[0]
    assert "True" not in header  # no judge ran: no empty judge columns
    base = next(row for row in report["rows"] if row["family"] == "base")
    assert base["prefers_chosen"] is not None and base["reward_accuracy"] is None
    compared = {(row["family"], row["metric"]) for row in report["intervals"]}
    assert ("all", "prefers_chosen") in compared and ("probe", "ce_prompts") in compared
    run = read_run(Path(next(row for row in report["rows"] if row["family"] == "all")["output_dir"]))
    assert set(run.values[next(iter(run.values))]) >= {"pairs", "pairs_preferring_chosen", "ipo_loss_sum"}
