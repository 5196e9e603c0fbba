import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import locedit.models.tiny as tiny
from locedit.models.sources import resolve_model_path
from locedit.models.tiny import TINY_ARCHITECTURES, build_tiny_model, build_tokenizer, tiny_config

# Layer 0's attention output projection (the module the edits wrap) and its class, per architecture.
OUTPUT_PROJECTIONS = {
    "llama": ("model.layers.0.self_attn.o_proj", "Linear"),
    "qwen2": ("model.layers.0.self_attn.o_proj", "Linear"),
    "mistral": ("model.layers.0.self_attn.o_proj", "Linear"),
    "gemma": ("model.layers.0.self_attn.o_proj", "Linear"),
    "phi3": ("model.layers.0.self_attn.o_proj", "Linear"),
    "phi": ("model.layers.0.self_attn.dense", "Linear"),
    "gpt2": ("transformer.h.0.attn.c_proj", "Conv1D"),
    "gpt_neox": ("gpt_neox.layers.0.attention.dense", "Linear"),
    "qwen3": ("model.layers.0.self_attn.o_proj", "Linear"),
}

TEXTS = [
    "Q: What colour is the sky?\nA: The sky is blue.",
    "Ünïcödé: 日本語, Ελληνικά, emoji 🙂👍🏽, math ∑ x² ≤ 3",
    "  leading spaces\n\n\ttabs and\r\nwindows newlines  ",
    "digits 1234567890 and punctuation !?;:'\"<>{}[]",
    "",
]


def _batch(tokenizer):
    return tokenizer(TEXTS[:3], return_tensors="pt", padding=True)


def test_architectures_cover_the_project_layouts():
    assert set(OUTPUT_PROJECTIONS) == set(TINY_ARCHITECTURES)


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_saved_model_reloads_with_identical_logits(arch, tiny_model_dir):
    path = tiny_model_dir(arch)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)

    # The same construction as build_tiny_model, in memory: the saved weights must be exactly these.
    torch.manual_seed(0)
    config = tiny_config(
        arch, vocab_size=len(tokenizer), num_kv_heads=getattr(model.config, "num_key_value_heads", None)
    )
    in_memory = AutoModelForCausalLM.from_config(config).eval()
    batch = _batch(tokenizer)
    with torch.no_grad():
        expected = in_memory(**batch).logits
        logits = model(**batch).logits
    assert logits.shape == (3, batch["input_ids"].shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)

    config = model.config
    assert config.model_type == arch
    assert config.vocab_size == len(tokenizer)
    assert config.max_position_embeddings >= 512
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (
        tokenizer.pad_token_id,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
    )

    name, cls = OUTPUT_PROJECTIONS[arch]
    projection = model.get_submodule(name)
    assert type(projection).__name__ == cls
    # Conv1D stores its weight (in, out), Linear (out, in); either way the output is the residual stream.
    in_features, out_features = projection.weight.shape if cls == "Conv1D" else projection.weight.shape[::-1]
    assert out_features == config.hidden_size
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    assert in_features == config.num_attention_heads * head_dim


def test_qwen2_uses_grouped_query_attention(tiny_model_dir):
    config = AutoModelForCausalLM.from_pretrained(tiny_model_dir("qwen2")).config
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)


def test_gemma_head_dim_differs_from_hidden_over_heads(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("gemma"))
    o_proj = model.get_submodule("model.layers.0.self_attn.o_proj")
    assert o_proj.in_features != model.config.hidden_size
    assert o_proj.in_features == model.config.num_attention_heads * model.config.head_dim


def test_qwen3_head_dim_follows_hidden_size():
    # Qwen3Config defaults head_dim to 128 whatever the hidden size; the tiny config must not inherit that.
    assert tiny_config("qwen3", vocab_size=512).head_dim == 16


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    first = load_file(build_tiny_model("llama", tmp_path / "a", seed=0) / "model.safetensors")
    again = load_file(build_tiny_model("llama", tmp_path / "b", seed=0) / "model.safetensors")
    other = load_file(build_tiny_model("llama", tmp_path / "c", seed=1) / "model.safetensors")
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(
        first["model.layers.0.self_attn.o_proj.weight"], other["model.layers.0.self_attn.o_proj.weight"]
    )


def test_tokenizer_is_deterministic_and_sized():
    tokenizer = build_tokenizer()
    assert len(tokenizer) == 512
    assert tokenizer.get_vocab() == build_tokenizer().get_vocab()
    assert len({tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}) == 3
    assert tokenizer.unk_token is None


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_tokenizer_round_trips_any_text(arch, tiny_model_dir):
    # qwen2 matters: AutoTokenizer loads its tokenizer as Qwen2Tokenizer, which rebuilds the pre-tokenizer.
    loaded = AutoTokenizer.from_pretrained(tiny_model_dir(arch))
    fresh = build_tokenizer()
    for text in TEXTS:
        ids = loaded(text)["input_ids"]
        assert ids == fresh(text)["input_ids"]
        assert loaded.decode(ids) == text
        # No special tokens are added, so prompt + completion tokenise like the two parts concatenated.
        assert not set(ids) & {loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id}
    assert loaded.eos_token == "<|endoftext|>" and loaded.pad_token == "<|pad|>" and loaded.bos_token == "<|bos|>"
    assert loaded.decode([loaded.eos_token_id]) == "<|endoftext|>"


def test_chat_template_renders(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("llama"))
    messages = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == "user: Hi?\nassistant: Hello.\n"


def test_resolve_model_path_builds_once(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCEDIT_CACHE", str(tmp_path))
    path = Path(resolve_model_path("tiny:llama"))
    assert path.parent == tmp_path / "tiny" and path.name.startswith("llama-")
    weights = path / "model.safetensors"
    mtime = weights.stat().st_mtime_ns

    def no_build(*args, **kwargs):
        raise AssertionError("a cached tiny model was rebuilt")

    monkeypatch.setattr(tiny, "build_tiny_model", no_build)
    assert resolve_model_path("tiny:llama") == str(path)
    assert weights.stat().st_mtime_ns == mtime
    model = AutoModelForCausalLM.from_pretrained(path)
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.num_attention_heads) == (2, 64, 4)
    assert model.config.intermediate_size == 128


def test_resolve_model_path_survives_a_concurrent_build(tmp_path, monkeypatch):
    """Another process finishing first between our build and our rename: we use its copy and clean up ours."""
    monkeypatch.setenv("LOCEDIT_CACHE", str(tmp_path))
    real_build = tiny.build_tiny_model
    winner = {}

    def racing_build(arch, output_dir, **kwargs):
        target = Path(output_dir).parent / Path(output_dir).name.split(".tmp-")[0].lstrip(".")
        winner["path"] = real_build(arch, target, **kwargs)
        return real_build(arch, output_dir, **kwargs)

    monkeypatch.setattr(tiny, "build_tiny_model", racing_build)
    path = resolve_model_path("tiny:gpt2")
    assert path == str(winner["path"])
    assert os.listdir(tmp_path / "tiny") == [Path(path).name]


def test_resolve_model_path_passes_other_names_through():
    assert resolve_model_path("meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"
    assert resolve_model_path("/some/local/checkpoint") == "/some/local/checkpoint"


def test_resolve_model_path_rejects_unknown_tiny_arch():
    with pytest.raises(ValueError, match=r"unknown tiny model 'tiny:foo'; valid: tiny:llama, tiny:qwen2"):
        resolve_model_path("tiny:foo")


def test_core_archs_respect_the_padding_mask(core_arch_dir):
    # Training batches are right-padded: the real tokens' logits must not depend on the padding.
    model = AutoModelForCausalLM.from_pretrained(core_arch_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(core_arch_dir)
    batch = tokenizer([TEXTS[0], "Q: Hi?"], return_tensors="pt", padding=True)
    alone = tokenizer(["Q: Hi?"], return_tensors="pt")
    n = alone["input_ids"].shape[1]
    assert batch["attention_mask"][1, n:].eq(0).all() and n < batch["input_ids"].shape[1]
    with torch.no_grad():
        padded = model(**batch).logits[1, :n]
        unpadded = model(**alone).logits[0]
    torch.testing.assert_close(padded, unpadded, rtol=1e-4, atol=1e-5)


def test_shared_data_dir_holds_truthfulqa(shared_data_dir):
    assert (shared_data_dir / "truthfulqa" / "TruthfulQA.csv").is_file()
