"""`chat_template: true` (instruct models): training pairs as TRL's conversational data, probe examples and eval
prompts in the tokenizer's own chat template, the one-line error for a tokenizer without one, and where an answer
ends (`cut_answer`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from locedit.config import parse_recipe
from locedit.core.errors import DataError, RecipeError
from locedit.data import load_preference_splits, load_questions
from locedit.evaluation.plan import Target, _edit_target
from locedit.evaluation.prompts import (
    INSTRUCTION,
    build_prompt,
    chat_tokenizer,
    cut_answer,
    render_chat,
    stop_token_ids,
)
from locedit.locate import build_probe_examples, make_probe_stage
from locedit.models.loading import read_model_config

REPO = Path(__file__).resolve().parents[1]
TINY_PROBE = str(REPO / "recipes" / "tiny_probe.yaml")

# SmolLM2-Instruct's template (ChatML, with its default system turn), written in text the tiny tokenizer encodes.
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def chat_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny Llama with a ChatML chat template on its tokenizer."""
    source = tiny_model_dir("llama")
    path = tmp_path_factory.mktemp("tiny-chat")
    AutoModelForCausalLM.from_pretrained(source).save_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def base_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny Llama with no chat template at all (a base model)."""
    source = tiny_model_dir("llama")
    path = tmp_path_factory.mktemp("tiny-base")
    AutoModelForCausalLM.from_pretrained(source).save_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(path)
    for name in ("chat_template.jinja", "chat_template.json"):
        (path / name).unlink(missing_ok=True)
    return path


@pytest.fixture(scope="module")
def tokenizer(chat_model_dir):
    return AutoTokenizer.from_pretrained(chat_model_dir)


def _user(text):
    return [{"role": "user", "content": text}]


def test_pairs_with_chat_template_are_conversational_with_the_same_split():
    text = load_preference_splits("synthetic:12", seed=1)
    chat = load_preference_splits("synthetic:12", seed=1, chat_template=True)
    questions = {q["question_id"]: q["question"] for q in load_questions("synthetic:12", seed=1)["train"]}
    for name in ("train", "validation", "test"):
        assert chat[name]["question_id"] == text[name]["question_id"]
    row, plain = chat["train"][0], text["train"][0]
    assert row["prompt"] == _user(questions[row["question_id"]])
    assert row["chosen"] == [{"role": "assistant", "content": plain["chosen"].strip()}]
    assert row["rejected"] == [{"role": "assistant", "content": plain["rejected"].strip()}]
    # The templates are not used with the chat template: setting them is refused, not silently ignored.
    with pytest.raises(DataError, match="prompt_template and completion_template are not used"):
        load_preference_splits("synthetic:12", prompt_template="Question: {question}\nAnswer:", chat_template=True)


def test_trl_trains_on_the_chat_template_prompt_the_evaluation_generates_from(chat_model_dir, tokenizer, tmp_path):
    from trl import DPOConfig, DPOTrainer

    splits = load_preference_splits("synthetic:12", chat_template=True)
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(chat_model_dir),
        args=DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False),
        train_dataset=splits["train"].select_columns(["prompt", "chosen", "rejected"]),
        processing_class=tokenizer,
    )
    pair, row = splits["train"][0], trainer.train_dataset[0]
    expected = tokenizer.apply_chat_template(pair["prompt"], add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert row["prompt_ids"] == expected
    question = pair["prompt"][0]["content"]
    rendered = build_prompt(question, tokenizer=tokenizer)
    assert rendered.endswith(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer(rendered)["input_ids"] == row["prompt_ids"]  # eval generates from what training conditions on
    assert tokenizer.decode(row["chosen_ids"]) == pair["chosen"][0]["content"] + "<|im_end|>\n"


def test_eval_prompts_and_mc_completions_with_the_chat_template(tokenizer):
    prompt = build_prompt("Why?", "Q: {question}\nA:", "instruction", tokenizer)
    assert prompt == tokenizer.apply_chat_template(
        _user(INSTRUCTION + "\n\nWhy?"), add_generation_prompt=True, tokenize=False
    )
    assert build_prompt("Why?") == "Q: Why?\nA:"  # the default is the paper's base-model prompt
    source = ("synthetic", None, (0.6, 0.2, 0.2), 0, None)
    target = Target("x", None, "out", source, [0], "Q: {question}\nA:", " {answer}", chat_template=True)
    assert target.completion_template.format(answer="Paris.") == "Paris."  # right after the assistant header
    split = {"question_ids": {"test": [3, 1]}, "split_fractions": [0.6, 0.2, 0.2]}
    settings = {"chat_template": True, "completion_template": " {answer}", "dataset": "synthetic"}
    assert _edit_target("runs/a", settings, split, {}).chat_template
    assert not _edit_target("runs/a", {"dataset": "synthetic"}, split, {}).chat_template  # runs from before


def test_probe_examples_render_as_conversations(tokenizer):
    questions = list(load_questions("synthetic:6")["train"])
    text = build_probe_examples(questions, "Q: {question} A: {answer} Q: {other_question}", seed=2)
    chat = build_probe_examples(
        questions, "Q: {question} A: {answer} Q: {other_question}", seed=2, tokenizer=tokenizer
    )
    assert (chat.labels, chat.question_ids) == (text.labels, text.question_ids)
    first = questions[0]
    other = text.texts[0].rsplit(" Q: ", 1)[1]  # the same other question is drawn
    messages = [*_user(first["question"]), {"role": "assistant", "content": first["correct_answers"][0]}]
    assert chat.texts[0] == tokenizer.apply_chat_template([*messages, *_user(other)], tokenize=False).rstrip()
    assert chat.texts[0].endswith(f"<|im_start|>user\n{other}<|im_end|>")  # read at the end of the last turn
    two_turns = build_probe_examples(questions, "{question} {answer}", tokenizer=tokenizer)
    assert two_turns.texts[0] == tokenizer.apply_chat_template(messages, tokenize=False).rstrip()
    assert chat.digest() != text.digest()  # so the activation cache never mixes them


def test_a_bos_the_template_writes_is_not_doubled_by_the_tokenizer():
    class AddsBos:
        bos_token, bos_token_id = "<s>", 1

        def __call__(self, text, **kw):
            return {"input_ids": [1, 5]}

        def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=False):
            return "<s>[user] " + messages[0]["content"] + (" [assistant]" if add_generation_prompt else "")

    assert render_chat(AddsBos(), _user("Hi"), add_generation_prompt=True) == "[user] Hi [assistant]"


def test_a_tokenizer_without_chat_template_is_one_line_before_any_work(base_model_dir, chat_model_dir):
    recipe = parse_recipe([TINY_PROBE, "--model_name_or_path", str(base_model_dir), "--chat_template", "true"])
    with pytest.raises(RecipeError) as error:
        chat_tokenizer(str(base_model_dir), recipe.model)
    assert "\n" not in str(error.value) and str(base_model_dir) in str(error.value)
    assert "no chat template" in str(error.value)
    model_path, _, layout = read_model_config(recipe.model)
    with pytest.raises(RecipeError, match="no chat template"):
        make_probe_stage(recipe, model_path, layout)
    # With a template, the probe stage renders its examples with it (before any weights are loaded).
    recipe = parse_recipe([TINY_PROBE, "--model_name_or_path", str(chat_model_dir), "--chat_template", "true"])
    model_path, _, layout = read_model_config(recipe.model)
    stage = make_probe_stage(recipe, model_path, layout)
    assert stage.examples.texts[0].startswith("<|im_start|>system\n") and stage.info["chat_template"] is True


@pytest.mark.parametrize(
    ("text", "chat", "answer"),
    [
        (" Paris.\nB: London C: Rome", False, "Paris."),
        (" Paris.\nB: London C: Rome", True, "Paris."),
        (" The sky is blue.\n\nQ: What is", False, "The sky is blue."),
        ("The sky is blue.\nQ: Why?", True, "The sky is blue."),
        ("Nothing happens.<|im_end|>\n<|im_start|>user\nAnd?", True, "Nothing happens."),
        ("Nothing happens.<|eot_id|>", False, "Nothing happens."),
        # ITI splits at any "Q:" for the Q/A prompt; a chat answer keeps one inside a line.
        (" Ask the Q: desk. A: yes", False, "Ask the"),
        ("Ask the Q: desk, they know.", True, "Ask the Q: desk, they know."),
        ("It is 3:15.\nNo: it is not", False, "It is 3:15.\nNo: it is not"),  # a word, not a letter, before ':'
        (" Paris. A: yes", True, "Paris. A: yes"),  # a letter and colon cut only at the start of a line
        ("Yes.[END] more", False, "Yes."),
    ],
)
def test_cut_answer(text, chat, answer):
    stops = ("[END]",) if "[END]" in text else ()
    assert cut_answer(text, chat=chat, stops=stops) == answer


def test_generation_stops_at_the_end_of_turn_token(tokenizer):
    assert stop_token_ids(tokenizer) == [tokenizer.eos_token_id]  # the tiny tokenizer has no ChatML tokens
    smollm2 = sorted(Path.home().glob(".cache/locedit/smollm2/*/tokenizer_config.json"))
    if not smollm2:
        pytest.skip("SmolLM2 is not in ~/.cache/locedit (locedit.models.sources.resolve_model_path('smollm2'))")
    real = AutoTokenizer.from_pretrained(smollm2[0].parent)
    assert real.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(real)
    prompt = build_prompt("Why?", tokenizer=real)
    expected = real.apply_chat_template(_user("Why?"), add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert real(prompt)["input_ids"] == expected and prompt.endswith("<|im_start|>assistant\n")


def test_chat_template_refuses_template_fields_set_in_the_recipe_even_at_their_defaults(capsys):
    from locedit.train import cli

    # recipes/smollm2.yaml sets both templates to their default values.
    assert cli(["recipes/smollm2.yaml", "--chat_template", "true", "--dry_run", "true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "prompt_template and completion_template would not be used" in err[0]
    assert cli(["recipes/tiny.yaml", "--chat_template", "true", "--prompt_template", "Q: {question}\nA:"]) == 2
    assert "prompt_template would not be used: remove it" in capsys.readouterr().err
