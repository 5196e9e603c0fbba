"""The pairs' log-probs computed with only the work an edit changes (locedit.training.pair_logps) equal TRL's plain
computation, on every core architecture and with every combination of the switches; training with them ends at the
same edit; length-grouped batches are seeded and resumable."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import CORE_ARCHS
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import add_fused_lm_head

from locedit import AttentionLayout, HeadEditConfig, resolve_heads
from locedit.config import LocEditConfig
from locedit.data import load_preference_splits
from locedit.models import prefix_sharing
from locedit.models.prefix_sharing import pack_rows
from locedit.training import LocEditTrainer
from locedit.training.pair_logps import PairScorer, PrefixStore, SeededLengthGroupedSampler

NAMES = ("score_completions_only", "share_prompt", "frozen_prefix", "pack_sequences")
SWITCHES = [dict(zip(NAMES, values, strict=True)) for values in itertools.product([True, False], repeat=4)]


def random_batch(vocab_size: int, pairs: int = 5, seed: int = 1, **collator):
    generator = torch.Generator().manual_seed(seed)

    def tokens(low, high):
        length = int(torch.randint(low, high, (1,), generator=generator))
        return torch.randint(3, vocab_size, (length,), generator=generator).tolist()

    examples = [
        {"prompt_ids": tokens(2, 9), "chosen_ids": tokens(1, 7), "rejected_ids": tokens(1, 7)} for _ in range(pairs)
    ]
    batch = DataCollatorForPreference(pad_token_id=0, **collator)(examples)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    return batch["input_ids"], batch["attention_mask"], labels


def plain_log_probs(model, input_ids, attention_mask, labels):
    """TRL's own fused-LM-head forward (every position scored, as on a CPU)."""
    add_fused_lm_head(model)
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True).log_probs


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", CORE_ARCHS)
def test_log_probs_equal_the_plain_computation_with_every_switch(arch, attention, tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(arch, num_layers=3), attn_implementation=attention)
    model.eval()
    batch = random_batch(model.config.vocab_size)
    expected = plain_log_probs(model, *batch)
    assert (expected != 0).sum() > 10
    layout = AttentionLayout.from_model(model)
    for switches in SWITCHES:
        scorer = PairScorer(model, layout, 2, **switches)
        with torch.no_grad():
            first = scorer(*batch).log_probs  # fills the frozen prefix
            again = scorer(*batch).log_probs  # starts from it
        torch.testing.assert_close(first, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(again, expected, atol=1e-5, rtol=0)
        if switches["frozen_prefix"]:
            # One unit per pair when the prompt is shared, else one per row.
            assert len(scorer.prefix) == (5 if switches["share_prompt"] else 10)


SLIDING = {
    "mistral": {"sliding_window": 4},  # every layer's window
    "qwen2": {"num_kv_heads": 2, "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},  # mixed
}


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", list(SLIDING))
def test_log_probs_of_a_sliding_window_model_equal_the_plain_computation(arch, attention, tiny_model_dir):
    """A window of 4 tokens, shorter than the prompts: the given 4-D masks apply the window as the model would."""
    model_dir = tiny_model_dir(arch, num_layers=3, **SLIDING[arch])
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attention).eval()
    batch = random_batch(model.config.vocab_size)
    assert int(batch[1].sum(dim=1).max()) > 2 * model.config.sliding_window
    expected = plain_log_probs(model, *batch)
    layout = AttentionLayout.from_model(model)
    for switches in SWITCHES:
        scorer = PairScorer(model, layout, 2, **switches)
        with torch.no_grad():
            first = scorer(*batch).log_probs
            again = scorer(*batch).log_probs
        torch.testing.assert_close(first, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(again, expected, atol=1e-5, rtol=0)


def test_the_shared_prompt_masks_the_chosen_answer_from_the_rejected_one(tiny_model_dir, monkeypatch):
    """A mask that lets the rejected answer see the chosen one changes the numbers: the test above can fail."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama", num_layers=3)).eval()
    batch = random_batch(model.config.vocab_size)
    expected = plain_log_probs(model, *batch)
    scorer = PairScorer(model, AttentionLayout.from_model(model), 1, True, True, False)
    monkeypatch.setattr(
        prefix_sharing, "attention_mask_4d", lambda model, allowed: torch.ones_like(allowed).tril()[:, None]
    )
    with torch.no_grad():
        assert (scorer(*batch).log_probs - expected).abs().max() > 1e-3


def test_rows_whose_prompts_differ_are_scored_unshared(tiny_model_dir):
    """keep_end truncation cuts the chosen and rejected rows' prompts differently: still the plain numbers."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("qwen2", num_layers=3)).eval()
    batch = random_batch(model.config.vocab_size, max_length=8, truncation_mode="keep_end")
    expected = plain_log_probs(model, *batch)
    scorer = PairScorer(model, AttentionLayout.from_model(model), 1)
    units, _, _ = scorer._units(*batch)
    assert len(units) == 10  # each row its own unit
    with torch.no_grad():
        torch.testing.assert_close(scorer(*batch).log_probs, expected, atol=1e-5, rtol=0)


def test_gradients_flow_through_the_shared_prompt(tiny_model_dir):
    """The edit's gradient with every switch on equals the plain computation's (an edit at layer 1 of 3)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("gpt2", num_layers=3)).eval()
    batch = random_batch(model.config.vocab_size)
    layout = AttentionLayout.from_model(model)
    weight = model.get_submodule(layout.projection_name(1)).weight
    grads = []
    for on in (True, False):
        weight.grad = None
        PairScorer(model, layout, 1, **dict.fromkeys(NAMES, on))(*batch).log_probs.sum().backward()
        grads.append(weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)
    assert grads[0].abs().sum() > 0


def test_packed_rows_are_no_longer_than_the_longest_sequence():
    lengths = [30, 5, 12, 25, 8, 30, 17, 3]
    rows = pack_rows(lengths)
    assert sorted(u for row in rows for u in row) == list(range(8))
    assert all(sum(lengths[u] for u in row) <= 30 for row in rows)
    assert len(rows) == 5  # 130 tokens in rows of 30: no fewer than 5
    assert pack_rows(lengths, pack=False) == [[u] for u in range(8)]


def test_the_frozen_prefix_spills_to_disk_and_reads_back(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCEDIT_CACHE", str(tmp_path))
    store = PrefixStore(max_memory_bytes=100)
    small, large = torch.randn(2, 4), torch.randn(30, 4)
    store.put(b"a", small)
    store.put(b"b", large)
    assert store.memory_bytes == small.numel() * 4 and store.disk_bytes == large.numel() * 4
    assert torch.equal(store.get(b"a"), small) and torch.equal(store.get(b"b"), large)
    spilled = list((tmp_path / "frozen_prefix").iterdir())
    store.close()
    assert spilled and not spilled[0].exists()


def test_length_grouped_order_is_seeded_per_epoch_and_cuts_padding():
    lengths = torch.randint(5, 200, (400,), generator=torch.Generator().manual_seed(0)).tolist()
    sampler = SeededLengthGroupedSampler(8, lengths, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(400)) and first == list(SeededLengthGroupedSampler(8, lengths, seed=3))
    sampler.set_epoch(1)
    assert list(sampler) != first  # a new order each epoch...
    resumed = SeededLengthGroupedSampler(8, lengths, seed=3)
    resumed.set_epoch(1)
    assert list(resumed) == list(sampler)  # ...that a resumed run draws again

    def padding(order):
        batches = [order[i : i + 8] for i in range(0, len(order), 8)]
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    shuffled = torch.randperm(400, generator=torch.Generator().manual_seed(0)).tolist()
    assert padding(first) < 0.2 * padding(shuffled)


@pytest.mark.parametrize("arch", CORE_ARCHS)
def test_twenty_steps_with_every_switch_end_at_the_same_edit(arch, tiny_model_dir, tmp_path):
    """The same batches (random order, same seed) with the switches on and off: the same edit at the end."""
    path = tiny_model_dir(arch, num_layers=3)
    splits = load_preference_splits("synthetic:40", split_fractions=(0.6, 0.2, 0.2), seed=0)
    train = splits["train"].select_columns(["prompt", "chosen", "rejected"])
    edits = []
    for on in (True, False):
        model = AutoModelForCausalLM.from_pretrained(path)
        layout = AttentionLayout.from_model(model)
        args = LocEditConfig(
            output_dir=str(tmp_path / f"run-{on}"),
            max_steps=20,
            per_device_train_batch_size=4,
            learning_rate=1e-2,
            report_to="none",
            save_strategy="no",
            eval_strategy="no",
            disable_tqdm=True,
            use_cpu=True,
            cache_ref_log_probs=False,
            **dict.fromkeys(NAMES, on),
        )
        trainer = LocEditTrainer(
            model=model,
            args=args,
            train_dataset=train,
            processing_class=AutoTokenizer.from_pretrained(path),
            peft_config=HeadEditConfig.for_heads(layout, resolve_heads("L1H0,L1H2,L2H1", layout)),
        )
        trainer.train()
        assert (trainer.pair_scorer is not None) == on
        trainer.save_model(str(tmp_path / f"edit-{on}"))
        edits.append(load_file(str(tmp_path / f"edit-{on}" / "adapter_model.safetensors")))
    assert any(v.abs().sum() > 0 for k, v in edits[0].items() if "lora_B" in k)  # it moved
    for key in edits[0]:
        torch.testing.assert_close(edits[0][key], edits[1][key], atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("shared", [True, False])
def test_many_edits_start_at_their_own_lowest_layer_and_equal_the_plain_computation(shared, tiny_model_dir):
    """An EditBank of edits at layers 0, 1 and 2 (and one at 1 and 2): each edit's rows start at its own lowest layer
    from the stored prefix, and the log-probs equal the replicated batch run from the embeddings up."""
    from locedit.training import EditBank, replicate_batch

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("qwen2", num_layers=3)).eval()
    layout = AttentionLayout.from_model(model)
    head_sets = [[(2, 1)], [(0, 3)], [(1, 0), (2, 2)], [(1, 1)]]
    bank = EditBank(layout, 64, head_sets)
    for parameter in bank.parameters():
        parameter.data.normal_(std=0.5)
    bank.attach(model, layout)
    input_ids, attention_mask, labels = random_batch(model.config.vocab_size, pairs=3)
    batch = replicate_batch({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}, 4)
    expected_model = plain_log_probs  # the bank's hooks on every row, through TRL's own forward
    with bank.replicating(pairs_per_edit=3):
        expected = expected_model(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    scorer = PairScorer(model, layout, bank.first_layers.tolist(), share_prompt=shared, routing=bank)
    assert scorer.start_layers == [0, 1, 2]
    with torch.no_grad():
        scorer.fill(input_ids, attention_mask, labels)  # as the trainer does: the unreplicated pairs
        assert len(scorer.prefix) == (3 if shared else 6) * 2  # entering layers 1 and 2
        with bank.replicating(pairs_per_edit=3):
            assert scorer._groups(bank.replicas()) == [(0, [1]), (1, [2, 3]), (2, [0])]
            got = scorer(batch["input_ids"], batch["attention_mask"], batch["labels"]).log_probs
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # The edits matter: without them the numbers differ.
    assert (
        expected_model(model, batch["input_ids"], batch["attention_mask"], batch["labels"]) - got
    ).abs().max() > 1e-3
