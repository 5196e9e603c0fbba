"""Building, saving and loading edits, and reading where a model's edits are."""

from __future__ import annotations

import json
import os

from peft import LoraConfig, PeftModel
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.lora import LoraModel
from peft.utils import PeftType
from torch import nn

from ..core.errors import EditLoadError, HeadSpecError
from ..models.layout import AttentionLayout
from .adapter import HeadEditConfig, HeadEditLayer


def add_edit(model: nn.Module, config: HeadEditConfig, adapter_name: str = "default") -> PeftModel:
    """Wrap a transformers model with an edit (b = 0, so it starts equal to the base model)."""
    from peft import get_peft_model

    check_edit_fits(model, config)
    return get_peft_model(model, config, adapter_name=adapter_name)


def check_edit_fits(model: nn.Module, config: HeadEditConfig) -> None:
    """Raise EditLoadError if the edit was made for a model of another shape or architecture."""
    try:
        layout = AttentionLayout.from_model(model)
    except HeadSpecError as err:
        raise EditLoadError(str(err)) from None
    if (layout.num_layers, layout.num_heads) != (config.num_layers, config.num_heads):
        raise EditLoadError(
            f"the edit was made for a model of {config.shape}, but this model ({layout.model_type}) has {layout.shape}"
        )
    missing = [path for path in config.edit_layers if layout.layer_of(path) is None]
    if missing:
        raise EditLoadError(
            f"the edit was made for a '{config.model_type}' model; '{missing[0]}' is not an output projection of "
            f"this '{layout.model_type}' model"
        )
    try:
        layout.head_dim(model)  # the projections must split evenly into heads
    except HeadSpecError as err:
        raise EditLoadError(str(err)) from None


def load_edit(model: nn.Module, path: str, adapter_name: str = "default", is_trainable: bool = False) -> PeftModel:
    """Load a saved edit onto a base model, checking first that the model has the shape the edit was made for."""
    config_file = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config_file):
        raise EditLoadError(f"no saved edit at '{path}': {config_file} does not exist")
    with open(config_file) as f:
        if "edit_layers" not in json.load(f):
            raise EditLoadError(f"'{path}' holds a PEFT adapter that is not a locedit edit")
    config = HeadEditConfig.from_pretrained(path)
    check_edit_fits(model, config)
    return PeftModel.from_pretrained(model, path, adapter_name=adapter_name, is_trainable=is_trainable, config=config)


class _LoraConfigWithEdits(LoraConfig):
    """What PEFT builds for `peft_type: LORA` once locedit is imported: a HeadEditConfig for a saved locedit edit,
    a plain LoraConfig for anything else. PEFT builds configs as `PEFT_TYPE_TO_CONFIG_MAPPING[peft_type](**saved)`
    (`PeftModel.from_pretrained`, `PeftConfig.from_pretrained`, transformers' `load_adapter`), so dispatching at
    construction covers every loader and keeps the heads that a plain LoraConfig would drop.
    """

    def __new__(cls, *args, **kwargs):
        return (HeadEditConfig if "edit_layers" in kwargs else LoraConfig)(*args, **kwargs)


class _LoraModelWithEdits(LoraModel):
    """PEFT's LoRA tuner, plus a check that a locedit edit fits the model before it is injected.

    The check needs the whole model (its layers x heads), which a layer never sees; PEFT gives the tuner the model
    in `_pre_injection_hook`, so `PeftModel.from_pretrained` onto a model of another shape fails as `load_edit` does.
    """

    def _pre_injection_hook(self, model: nn.Module, config, adapter_name: str) -> None:
        if isinstance(config, HeadEditConfig):
            check_edit_fits(model, config)
        super()._pre_injection_hook(model, config, adapter_name)


def register_with_peft() -> None:
    """Make PEFT's loaders recognise saved locedit edits (keeping their heads) and check that they fit the model."""
    PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.LORA] = _LoraConfigWithEdits
    PEFT_TYPE_TO_TUNER_MAPPING[PeftType.LORA] = _LoraModelWithEdits


register_with_peft()


def edit_layers(model: nn.Module) -> dict[int, HeadEditLayer]:
    """Every edited output projection of a PEFT-wrapped model, keyed by layer index."""
    layout = AttentionLayout.from_model(model)
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, HeadEditLayer):
            layer = layout.layer_of(name)
            if layer is not None:
                found[layer] = module
    return dict(sorted(found.items()))


def edit_norms(model: nn.Module, adapter_name: str = "default") -> dict[str, float]:
    """Where the edit lives: per edited layer, the norms of a and of m * b."""
    norms = {}
    for layer, module in edit_layers(model).items():
        if adapter_name not in module.lora_B:
            continue
        b = module.lora_B[adapter_name].weight[0] * module.head_mask(adapter_name)
        norms[f"edit/L{layer}/b_norm"] = float(b.detach().float().norm())
        if module.edit_config[adapter_name].edit_strength == "adaptive":
            norms[f"edit/L{layer}/a_norm"] = float(module.lora_A[adapter_name].weight.detach().float().norm())
    return norms
