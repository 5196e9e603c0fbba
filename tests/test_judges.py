"""Judges: a causal-LM judge's P(" yes") against its logits, an OpenAI-compatible endpoint (a local fake server),
the registry of judge kinds, bad judges, and training one's own judge with `locedit judge-train`."""

from __future__ import annotations

import json
import math
import random
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BertConfig

from locedit.evaluation.judge_training import load_judge_data, split_by_question
from locedit.evaluation.judges import JUDGE_KINDS, HFJudge, Judge, JudgeError, judge_prompt, make_judge, verdicts
from locedit.judge_train import cli as judge_train_cli

API_KEY = "sk-test-0123456789"


# ---------------------------------------------------------------------------------------------------------------------
# hf:
# ---------------------------------------------------------------------------------------------------------------------


def test_prompts_are_truthfulqas_end_to_end_format():
    assert judge_prompt("Is it?", "Yes.", "truth") == "Q: Is it?\nA: Yes.\nTrue:"
    assert judge_prompt("Is it?", "Yes.", "info") == "Q: Is it?\nA: Yes.\nHelpful:"


def test_hf_judge_scores_p_yes_from_the_softmax_of_its_next_token_logits(tiny_model_dir):
    path = tiny_model_dir("llama", seed=3)
    judge = make_judge(f"hf:{path}", "info", batch_size=3)
    questions = ["What colour is the sky?", "Where is Paris?", "What is 2 plus 3?", "Is it true?"]
    answers = ["The sky is blue.", "Paris is in France, a beautiful country.", "5", ""]
    scores = judge.score(questions, answers)  # batches of 3 and 1, right-padded to different lengths

    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    yes = tokenizer(" yes", add_special_tokens=False)["input_ids"]
    assert len(yes) == 1  # " yes" is one token of the tiny tokenizer, as of Llama's
    for question, answer, score in zip(questions, answers, scores, strict=True):
        ids = tokenizer(f"Q: {question}\nA: {answer}\nHelpful:", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(ids).logits[0, -1]
        assert score == pytest.approx(torch.softmax(logits, -1)[yes[0]].item(), rel=1e-5, abs=1e-9)
    assert verdicts([0.2, 0.5, 0.51]) == [False, False, True]


def test_a_judge_that_is_not_a_causal_lm_is_refused_from_its_config(tmp_path):
    BertConfig().save_pretrained(tmp_path / "bert")
    BertConfig(architectures=["BertForMaskedLM"], is_decoder=True).save_pretrained(tmp_path / "bert-mlm")
    for name in ("bert", "bert-mlm"):
        with pytest.raises(JudgeError, match="not a causal LM"):
            make_judge(f"hf:{tmp_path / name}", "truth").check()


def test_judge_kinds_are_a_registry(monkeypatch):
    class Constant(Judge):
        kind = "constant"

        def score_prompts(self, prompts):
            return [float(self.name)] * len(prompts)

    monkeypatch.setitem(JUDGE_KINDS, "constant", Constant)
    judge = make_judge("constant:0.75", "truth")
    assert judge.score(["q1", "q2"], ["a", "b"]) == [0.75, 0.75] and judge.spec == "constant:0.75"
    assert make_judge("none", "truth") is None
    with pytest.raises(JudgeError, match="unknown kind 'gpt'"):
        make_judge("gpt:x", "truth")


# ---------------------------------------------------------------------------------------------------------------------
# openai: against a local fake server
# ---------------------------------------------------------------------------------------------------------------------


class FakeCompletions(BaseHTTPRequestHandler):
    """An OpenAI-compatible /v1/completions: P(" yes") = 0.8 for answers mentioning Paris, else 0.3; answers
    mentioning 'odd' get top log-probs without " yes"."""

    requests: list[dict] = []
    status = 200

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        if self.status != 200 or self.headers.get("Authorization") != f"Bearer {API_KEY}":
            self._reply(401, {"error": {"message": "Incorrect API key provided"}})
            return
        choices = []
        for index, prompt in enumerate(body["prompt"]):
            p = 0.8 if "Paris" in prompt else 0.3
            top = {" no": math.log(0.9), "No": math.log(0.05)} if "odd" in prompt else {" yes": math.log(p)}
            choices.append({"index": index, "text": " yes", "logprobs": {"top_logprobs": [top]}})
        self._reply(200, {"choices": list(reversed(choices))})  # order by index, not by position

    def _reply(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_openai(monkeypatch):
    """A fake endpoint on localhost; OPENAI_BASE_URL and OPENAI_API_KEY point at it."""
    FakeCompletions.requests = []
    FakeCompletions.status = 200
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeCompletions)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{server.server_address[1]}/v1")
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    yield FakeCompletions
    server.shutdown()
    server.server_close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_openai_judge_scores_exp_logprob_of_yes_in_batched_requests(fake_openai):
    judge = make_judge("openai:my-judge", "truth", batch_size=2)
    judge.check()
    scores = judge.score(["Where is Paris?", "Where?", "Odd?"], ["In France, near Paris.", "Here.", "odd"])
    assert scores == pytest.approx([0.8, 0.3, 0.0])  # " yes" absent from the top log-probs counts as 0
    calls = fake_openai.requests[1:]  # the first is check()'s one-prompt request
    assert [len(call["body"]["prompt"]) for call in calls] == [2, 1]
    assert all(call["path"] == "/v1/completions" and call["auth"] == f"Bearer {API_KEY}" for call in calls)
    body = calls[0]["body"]
    assert body["model"] == "my-judge" and body["max_tokens"] == 1 and body["temperature"] == 0
    assert body["prompt"][0] == "Q: Where is Paris?\nA: In France, near Paris.\nTrue:"


def test_openai_judge_unauthorised_or_unreachable_is_one_line_without_the_key(fake_openai, monkeypatch):
    fake_openai.status = 401
    with pytest.raises(JudgeError) as err:
        make_judge("openai:my-judge", "truth").check()
    message = str(err.value)
    assert "not authorised" in message and "OPENAI_API_KEY" in message and API_KEY not in message
    assert "\n" not in message

    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{closed_port()}/v1")
    with pytest.raises(JudgeError, match="cannot reach") as err:
        make_judge("openai:my-judge", "info").check()
    assert API_KEY not in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------------------------------
# locedit judge-train
# ---------------------------------------------------------------------------------------------------------------------


def test_judge_train_trains_a_tiny_judge_on_gpt_judge_data_and_reports_held_out_accuracy(
    tmp_path, shared_data_dir, tiny_model_dir, capsys
):
    data = shared_data_dir / "truthfulqa" / "finetune_truth.jsonl"
    out = tmp_path / "judge"
    base = tiny_model_dir("llama", seed=5)
    argv = ["--judge_data", str(data), "--judge_max_examples", "128", "--judge_eval_fraction", "0.25"]
    argv += ["--model_name_or_path", str(base), "--output_dir", str(out), "--learning_rate", "1.0e-2"]
    argv += ["--num_train_epochs", "2", "--per_device_train_batch_size", "16", "--save_strategy", "no"]
    argv += ["--report_to", "none", "--seed", "0", "--logging_steps", "1", "--dataloader_pin_memory", "false"]
    assert judge_train_cli(argv) == 0
    assert "held-out accuracy" in capsys.readouterr().out
    metrics = json.loads((out / "judge_metrics.json").read_text())
    assert metrics["aspect"] == "truth" and metrics["train_examples"] + metrics["held_out_examples"] == 128

    # The same held-out answers, scored again by the saved judge through the `hf:` interface, give the same accuracy.
    rows = load_judge_data(str(data))
    keep = sorted(random.Random(0).sample(range(len(rows)), 128))
    train, held_out = split_by_question([rows[i] for i in keep], 0.25, seed=0)
    assert not {r["prompt"].split("\nA:")[0] for r in train} & {r["prompt"].split("\nA:")[0] for r in held_out}
    judge = make_judge(f"hf:{out}", "truth")
    scores = judge.score_prompts([row["prompt"] for row in held_out])
    labels = [row["completion"] == " yes" for row in held_out]
    accuracy = sum(v == label for v, label in zip(verdicts(scores), labels, strict=True)) / len(held_out)
    assert metrics["held_out_accuracy"] == pytest.approx(accuracy)

    # Training taught the judge to answer yes or no: most of the next-token mass is on " yes" and " no".
    def yes_no_mass(judge: HFJudge) -> float:
        judge.load()
        prompt = held_out[0]["prompt"]
        ids = judge.tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            probs = torch.softmax(judge.model(ids).logits[0, -1], -1)
        words = [judge.tokenizer(prompt + w)["input_ids"][ids.shape[1]] for w in (" yes", " no")]
        return float(probs[words].sum())

    assert yes_no_mass(judge) > 0.5 > yes_no_mass(make_judge(f"hf:{base}", "truth"))


def test_judge_train_rejects_data_that_is_not_judge_data(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Q: x\nA: y\nTrue:", "completion": " maybe"}) + "\n")
    assert judge_train_cli(["--judge_data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("locedit: error:") and "' yes' or ' no'" in err and len(err.strip().splitlines()) == 1
    assert judge_train_cli([]) == 2
    assert "--judge_data" in capsys.readouterr().err
