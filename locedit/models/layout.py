"""Where the attention heads of a decoder model are.

This is the one place that knows, for every supported architecture, which module is a layer's attention output
projection (whose input is the concatenation of the heads' outputs), how many heads it has and their size.
Probing, ITI and the trained edit all go through it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from ..core.errors import HeadSpecError

# model_type -> path of layer i's attention output projection inside the *ForCausalLM model.
OUTPUT_PROJECTIONS = {
    "llama": "model.layers.{layer}.self_attn.o_proj",
    "mistral": "model.layers.{layer}.self_attn.o_proj",
    "qwen2": "model.layers.{layer}.self_attn.o_proj",
    "qwen3": "model.layers.{layer}.self_attn.o_proj",
    "gemma": "model.layers.{layer}.self_attn.o_proj",
    "gemma2": "model.layers.{layer}.self_attn.o_proj",
    "phi3": "model.layers.{layer}.self_attn.o_proj",
    "phi": "model.layers.{layer}.self_attn.dense",
    "gpt_neox": "gpt_neox.layers.{layer}.attention.dense",
    "gpt2": "transformer.h.{layer}.attn.c_proj",
}


@dataclass(frozen=True)
class AttentionLayout:
    """The attention heads of one model: layers x heads, and where each layer's output projection is."""

    model_type: str
    num_layers: int
    num_heads: int
    projection_template: str

    @classmethod
    def from_config(cls, config, model_name: str | None = None) -> AttentionLayout:
        """Read the layout from a transformers config alone, so head specs can be checked before loading weights
        (`model_name`, when known, is named in errors)."""
        model_type = getattr(config, "model_type", None)
        if model_type not in OUTPUT_PROJECTIONS:
            raise HeadSpecError(why_not_editable(config, model_name))
        # Multimodal wrappers keep the decoder settings in a text config.
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        return cls(
            model_type=model_type,
            num_layers=int(text_config.num_hidden_layers),
            num_heads=int(text_config.num_attention_heads),
            projection_template=OUTPUT_PROJECTIONS[model_type],
        )

    @classmethod
    def from_model(cls, model: nn.Module) -> AttentionLayout:
        """Read the layout of a loaded model (a transformers model, or a PEFT model wrapping one)."""
        return cls.from_config(unwrap_model(model).config)

    @property
    def shape(self) -> str:
        return f"{self.num_layers} layers x {self.num_heads} heads"

    def projection_name(self, layer: int) -> str:
        """Module path of layer `layer`'s output projection, relative to the causal-LM model."""
        return self.projection_template.format(layer=layer)

    @property
    def layers_path(self) -> str:
        """Module path of the decoder layers' ModuleList, relative to the causal-LM model."""
        return self.projection_template.split(".{layer}")[0]

    def projection_names(self) -> list[str]:
        return [self.projection_name(layer) for layer in range(self.num_layers)]

    def layer_of(self, module_name: str) -> int | None:
        """The layer index of an output projection given its module path (any prefix allowed), else None."""
        pattern = re.escape(self.projection_template).replace(re.escape("{layer}"), r"(\d+)")
        match = re.search(rf"(?:^|\.){pattern}$", module_name)
        return int(match.group(1)) if match else None

    def projections(self, model: nn.Module) -> list[nn.Module]:
        """The output projection module of every layer, in layer order."""
        base = unwrap_model(model)
        return [base.get_submodule(self.projection_name(layer)) for layer in range(self.num_layers)]

    def head_dim(self, model: nn.Module) -> int:
        """Size of one head's output: the projection's input size over the number of heads.

        Computed from the module rather than read from the config: `head_dim` is absent on some configs and
        differs from hidden_size / heads on others (Gemma).
        """
        in_features = projection_in_features(self.projections(model)[0])
        if in_features % self.num_heads:
            raise HeadSpecError(
                f"output projection input size {in_features} is not a multiple of {self.num_heads} heads"
            )
        return in_features // self.num_heads


def why_not_editable(config, model_name: str | None = None) -> str:
    """Why locedit cannot edit a model of this config (its type is not in OUTPUT_PROJECTIONS), and what would do."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    supported = f"use a decoder model of a supported type: {', '.join(sorted(OUTPUT_PROJECTIONS))}"
    model = f"model '{model_name}' (model type '{model_type}')" if model_name else f"model type '{model_type}'"
    if getattr(config, "is_encoder_decoder", False):
        return f"{model} is an encoder-decoder model, and locedit edits decoder models; {supported}"
    # BERT and its kin: a masked-LM type not configured as a decoder (they also have a causal-LM head class).
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        return f"{model} is encoder-only, and locedit edits decoder models; {supported}"
    if not hasattr(text_config, "num_attention_heads"):  # state-space and recurrent models (Mamba, RWKV)
        return f"{model} has no attention heads (a state-space or recurrent model?); {supported}"
    return (
        f"{model} has no per-head attention output projection that locedit knows (locedit.models.layout."
        f"OUTPUT_PROJECTIONS); {supported}"
    )


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT or accelerate (DDP) wrapper."""
    while True:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            return model


def projection_in_features(module: nn.Module) -> int:
    """Input size of an output projection: nn.Linear (also bitsandbytes), GPT-2's Conv1D or a PEFT wrapper of one."""
    if hasattr(module, "get_base_layer"):
        module = module.get_base_layer()
    if hasattr(module, "in_features"):
        return int(module.in_features)
    if type(module).__name__ == "Conv1D":  # transformers' Conv1D stores its weight as (in, out)
        return int(module.weight.shape[0])
    raise HeadSpecError(f"cannot read the input size of {type(module).__name__}")
