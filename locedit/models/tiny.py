"""Tiny decoder models built from configs, for tests and CPU runs without network access.

Each model is saved with `save_pretrained` next to a locally trained byte-level BPE tokenizer, so it loads through
the same `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained` path as a real model.
`model_name_or_path: tiny:llama` (`locedit.models.sources`) builds such a model once and caches it on disk.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig, PreTrainedTokenizerFast

# Special tokens get the first ids, in this order (the BPE trainer assigns them first).
PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN]
PAD_TOKEN_ID, BOS_TOKEN_ID, EOS_TOKEN_ID = range(len(SPECIAL_TOKENS))

# The pre-tokenisation regex of Qwen2 (transformers' Qwen2Tokenizer): contractions, words, single digits, ...
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Long enough for few-shot prompts with a ~512-token byte-level vocabulary (about 3 characters per token).
MAX_POSITIONS = 1024

# A plain-text role template, so conversational datasets can be tested too.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

TINY_ARCHITECTURES = ("llama", "qwen2", "mistral", "gemma", "phi3", "phi", "gpt2", "gpt_neox", "qwen3")


def _default_corpus() -> list[str]:
    """Deterministic English-ish text in the Q/A format the project trains on."""
    things = {
        "sky": "blue",
        "grass": "green",
        "sun": "yellow",
        "snow": "white",
        "coal": "black",
        "blood": "red",
        "sea": "blue",
        "orange": "orange",
        "banana": "yellow",
        "night": "dark",
    }
    places = {
        "France": "Paris",
        "Japan": "Tokyo",
        "Italy": "Rome",
        "Spain": "Madrid",
        "Germany": "Berlin",
        "Canada": "Ottawa",
        "Egypt": "Cairo",
        "Peru": "Lima",
    }
    facts = [
        "Cracking your knuckles does not cause arthritis.",
        "Humans use all of their brain, not only ten percent of it.",
        "Goldfish can remember things for months.",
        "Lightning can strike the same place more than once.",
        "The Great Wall of China is not visible from space with the naked eye.",
        "Bulls are not angered by the colour red.",
        "Bats are not blind.",
        "I have no comment.",
    ]
    corpus = []
    for thing, colour in things.items():
        corpus.append(f"Q: What colour is the {thing}?\nA: The {thing} is {colour}.")
        corpus.append(f"Q: Is the {thing} {colour}?\nA: Yes, the {thing} is {colour}.")
        corpus.append(f"The {thing} looks {colour} to most people, and that is why we call it {colour}.")
    for country, city in places.items():
        corpus.append(f"Q: What is the capital of {country}?\nA: The capital of {country} is {city}.")
        corpus.append(f"Q: Where is {city}?\nA: {city} is in {country}.")
        corpus.append(f"People who live in {city} say that {country} is a beautiful country.")
    for fact in facts:
        corpus.append(f"Q: Is it true?\nA: {fact}")
        corpus.append(f"True: yes. Helpful: yes. {fact}")
    for n in range(20):
        corpus.append(f"Q: What is {n} plus {n + 1}?\nA: {n} plus {n + 1} is {2 * n + 1}.")
    return corpus


def build_tokenizer(corpus: list[str] | None = None, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer: every string can be encoded, and decoding gives the text back.

    Text is NFC-normalised first (as by Qwen2's tokenizer), so only NFC text round-trips exactly. Like the GPT-2
    and Qwen2 tokenizers it adds no special tokens when encoding; pad, bos and eos are distinct tokens.
    """
    tokenizer = Tokenizer(models.BPE())
    # The normalizer and pre-tokenizer of Qwen2Tokenizer, which AutoTokenizer imposes on every model of type
    # qwen2 when loading: with the same pipeline for all architectures, a saved tokenizer loads back unchanged.
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        # The full byte alphabet makes any text encodable, even bytes absent from the corpus.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_default_corpus() if corpus is None else corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=MAX_POSITIONS,
        chat_template=CHAT_TEMPLATE,
    )


def tiny_config(
    arch: str,
    vocab_size: int,
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    **overrides,
) -> PreTrainedConfig:
    """The transformers config of a tiny `arch` model, with the special-token ids of `build_tokenizer`.

    `num_kv_heads=None` means grouped-query attention with half the heads for qwen2 and mistral (as in the real
    models) and one key/value head per query head elsewhere. Keyword overrides go to the config class as is.
    """
    if arch not in TINY_ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {arch!r}; valid: {', '.join(TINY_ARCHITECTURES)}")
    if num_kv_heads is None:
        num_kv_heads = max(1, num_heads // 2) if arch in ("qwen2", "mistral") else num_heads
    if arch in ("gpt2", "gpt_neox") and num_kv_heads != num_heads:
        raise ValueError(f"{arch} has no grouped-query attention: num_kv_heads must equal num_heads")
    head_dim = hidden_size // num_heads
    intermediate_size = 2 * hidden_size
    tokens = {"bos_token_id": BOS_TOKEN_ID, "eos_token_id": EOS_TOKEN_ID, "pad_token_id": PAD_TOKEN_ID}

    if arch == "gpt2":
        # GPT-2 has its own attribute names; dropout is off so train-mode forwards are deterministic.
        kwargs = dict(
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            n_inner=intermediate_size,
            n_positions=MAX_POSITIONS,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            summary_first_dropout=0.0,
        )
    else:
        kwargs = dict(
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            intermediate_size=intermediate_size,
            max_position_embeddings=MAX_POSITIONS,
        )
        if arch != "gpt_neox":
            kwargs["num_key_value_heads"] = num_kv_heads
        # Explicit head_dim where the config class has one: Qwen3 and Gemma default to 128/256, not hidden/heads.
        if arch in ("llama", "mistral", "qwen3"):
            kwargs["head_dim"] = head_dim
        if arch == "gemma":
            # Gemma's head_dim differs from hidden/heads in the real models; keep that so o_proj in != hidden.
            kwargs["head_dim"] = 2 * head_dim
        if arch == "phi3":
            kwargs["original_max_position_embeddings"] = MAX_POSITIONS
    kwargs.update(tokens, vocab_size=vocab_size)
    kwargs.update(overrides)
    return AutoConfig.for_model(arch, **kwargs)


def build_tiny_model(
    arch: str,
    output_dir: str | Path,
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int = 4,
    seed: int = 0,
    **config_overrides,
) -> Path:
    """Build a tokenizer and a randomly initialised `arch` model and save both to `output_dir`.

    The same arguments give the same weights. Extra keyword arguments go to `tiny_config` (e.g. `num_kv_heads`).
    """
    output_dir = Path(output_dir)
    tokenizer = build_tokenizer()
    special_ids = (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    if special_ids != (PAD_TOKEN_ID, BOS_TOKEN_ID, EOS_TOKEN_ID):
        raise RuntimeError(f"the tokenizer's pad/bos/eos ids {special_ids} differ from those in tiny_config")
    config = tiny_config(
        arch,
        vocab_size=len(tokenizer),
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_heads=num_heads,
        **config_overrides,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Generation defaults that suit tiny random models: greedy, stop at eos, pad with pad.
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    model.generation_config.eos_token_id = EOS_TOKEN_ID
    model.generation_config.bos_token_id = BOS_TOKEN_ID
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    return output_dir


# What `tiny:ARCH` builds: build_tiny_model's defaults, written out because they are part of the cache key.
TINY_DEFAULTS = {"num_layers": 2, "hidden_size": 64, "num_heads": 4, "seed": 0}
