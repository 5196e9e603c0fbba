"""Chat prompts for instruct models (`chat_template: true`): turns rendered by the tokenizer's own chat template,
the check that there is one, and the tokens a turn ends with. Training (TRL renders conversational pairs itself),
probing and evaluation all use these, so the three see the same text."""

from __future__ import annotations

from ..core.errors import RecipeError

# End-of-turn (or end-of-text) markers of common chat templates. Where the decoded text keeps one as text it ends the
# answer; as special tokens `skip_special_tokens` removes them, and generation stops at their ids.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")


def user_turn(content: str) -> dict:
    return {"role": "user", "content": content}


def assistant_turn(content: str) -> dict:
    return {"role": "assistant", "content": content}


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """`messages` rendered as text by the tokenizer's chat template.

    A tokenizer that adds its BOS when it encodes text would double a BOS the template writes itself (Llama 3,
    Gemma): that one is dropped, so the text encodes to the ids `apply_chat_template(tokenize=True)` gives, which
    are what TRL trains on."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and _adds_bos(tokenizer):
        text = text[len(bos) :]
    return text


def _adds_bos(tokenizer) -> bool:
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id


def check_chat_template(tokenizer, model_name: str) -> None:
    """`chat_template: true` needs a tokenizer with a chat template: one line naming the model otherwise."""
    if not getattr(tokenizer, "chat_template", None):
        raise RecipeError(
            f"chat_template is true, but the tokenizer of model '{model_name}' has no chat template (a base model?); "
            "use an instruct model, or chat_template: false for the Q/A prompt"
        )


def chat_tokenizer(model_path: str, model_args, trust_remote_code: bool = False):
    """The model's tokenizer (no weights), checked to have a chat template, for the checks before any work."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model_path, revision=model_args.model_revision, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise RecipeError(
            f"cannot read the tokenizer of model '{model_args.model_name_or_path}': {str(err).splitlines()[0]}"
        ) from None
    check_chat_template(tokenizer, model_args.model_name_or_path)
    return tokenizer


def stop_token_ids(tokenizer) -> list[int]:
    """The ids generation should stop at: the tokenizer's EOS and the end-of-turn markers it has as single tokens."""
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    for marker in END_OF_TURN:
        encoded = tokenizer(marker, add_special_tokens=False)["input_ids"]
        if len(encoded) == 1 and marker in getattr(tokenizer, "all_special_tokens", ()):
            ids.append(encoded[0])
    return list(dict.fromkeys(ids))
