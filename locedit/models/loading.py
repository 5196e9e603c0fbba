"""Loading a model: its config and layout without weights (for planning), then its weights and tokenizer.

Also the few helpers every stage that runs a model over many examples shares: where its inputs go, the pad id, and
right-padded batches.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..core.args import ModelArguments
from ..core.errors import DamagedFileError, RecipeError
from ..core.files import check_safetensors, read_json
from .gguf import is_config_only
from .layout import AttentionLayout
from .sources import resolve_model_path


def check_quantization(model_args: ModelArguments) -> None:
    if model_args.load_in_4bit or model_args.load_in_8bit:
        import torch

        if not torch.cuda.is_available():
            raise RecipeError("load_in_4bit/load_in_8bit need a CUDA GPU (bitsandbytes); none is available")


def read_model_config(model_args: ModelArguments, trust_remote_code: bool = False, weights: bool = True):
    """The model's path (a named source built and resolved), its config and its attention layout; no weights."""
    model_path, config = read_config(model_args, trust_remote_code, weights)
    return model_path, config, AttentionLayout.from_config(config, model_args.model_name_or_path)


def read_config(model_args: ModelArguments, trust_remote_code: bool = False, weights: bool = True):
    """The model's path (a named source built and resolved) and its config; no weights are loaded. With
    `weights=False` (a dry run) a GGUF model is not converted: its path is a folder of its config and tokenizer."""
    from transformers import AutoConfig

    check_quantization(model_args)
    model_path = resolve_model_path(model_args.model_name_or_path, weights=weights)
    check_local_path(model_path)
    try:
        config = AutoConfig.from_pretrained(
            model_path, revision=model_args.model_revision, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as err:
        offline = " (HF_HUB_OFFLINE is set: only models in the local cache load)" if _offline() else ""
        raise RecipeError(
            f"cannot read the config of model '{model_args.model_name_or_path}': {str(err).splitlines()[0]}{offline}"
        ) from None
    if not is_config_only(model_path):
        check_local_weights(model_path)
    return model_path, config


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def check_local_weights(model_path: str) -> None:
    """A local model directory holds its weights, whole: a folder with a config.json and no weights (a copy or a
    download that stopped) would pass the plan and fail after the data loaded. Reads safetensors headers only."""
    directory = Path(model_path)
    if not directory.is_dir():
        return  # a Hub id: the Hub's files are checked as they download
    fix = "copy the model's weights there again, or download it again"
    shards = []
    for name in WEIGHT_FILES:
        index = directory / f"{name}.index.json"
        if (directory / name).is_file():
            shards.append(directory / name)
        elif index.is_file():
            weight_map = read_json(index, fix).get("weight_map") or {}
            shards += [directory / shard for shard in sorted(set(weight_map.values()))]
    if not shards:
        raise RecipeError(
            f"model directory '{model_path}' has a config but no weights ({' or '.join(WEIGHT_FILES)}, or a sharded "
            f"index of them); {fix}"
        )
    for shard in shards:
        if not shard.is_file():
            raise DamagedFileError(f"model directory '{model_path}' lacks the weight file '{shard.name}'; {fix}")
        if shard.suffix == ".safetensors":
            check_safetensors(shard, fix)


def check_local_path(name: str) -> None:
    """A model name that is a local path (not a Hub id `owner/name`) must exist."""
    path = Path(name).expanduser()
    if path.exists():
        return
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:
        raise RecipeError(
            f"model directory '{name}' does not exist (model_name_or_path is a Hub id such as 'owner/name', "
            "a local model directory, or a named model such as 'tiny:llama')"
        )


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def config_head_dim(config, layout: AttentionLayout) -> int:
    """head_dim as the config states it (for the plan; the edit itself reads it off the loaded module)."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    head_dim = getattr(text_config, "head_dim", None) or getattr(text_config, "head_size", None)
    return int(head_dim or text_config.hidden_size // layout.num_heads)


def load_model_and_tokenizer(model_path: str, model_args: ModelArguments, trust_remote_code: bool = False):
    """The base model and its tokenizer as the recipe asks (dtype, attention, 4/8-bit), with a pad token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import get_quantization_config

    from .. import processes

    quantization_config = get_quantization_config(model_args)
    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    model = AutoModelForCausalLM.from_pretrained(
        model_path,
        revision=model_args.model_revision,
        dtype=dtype,
        attn_implementation=model_args.attn_implementation,
        trust_remote_code=trust_remote_code,
        quantization_config=quantization_config,
        # A quantised model is placed at load time, one whole copy per process (the usual k-bit device map).
        device_map={"": processes.state().local_process_index} if quantization_config is not None else None,
    )
    tokenizer = AutoTokenizer.from_pretrained(
        model_path, revision=model_args.model_revision, trust_remote_code=trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def place_for_inference(model):
    """Put a model that was loaded on the CPU onto the accelerator, as the trainer would (k-bit models are placed)."""
    from .. import processes

    if getattr(model, "hf_device_map", None) is None and not getattr(model, "is_quantized", False):
        model.to(processes.state().device)
    return model


def model_input_device(model):
    """Where the inputs go: the device of the input embeddings (also for a model spread by a device map)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def pad_right(rows: list[list[int]], pad: int, device=None):
    """(input_ids, attention_mask) of right-padded rows: a causal model's outputs at a row's real tokens never see
    the pads after them, so every row keeps the values it has alone."""
    import torch

    width = max(len(row) for row in rows)
    ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows], device=device)
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], device=device)
    return ids, mask


def batches(count: int, batch_size: int, desc: str, progress: bool = True):
    """The start index of each batch of `count` examples, with a progress bar (tqdm) on stderr."""
    from tqdm.auto import tqdm

    return tqdm(range(0, count, batch_size), desc=desc, unit="batch", disable=not progress or count == 0)
