"""The optimal localized edit as a PEFT adapter: a head-masked, reparameterised rank-1 LoRA (paper eq. 4.2-4.3).

For the concatenated head outputs o (the input of a layer's attention output projection W), the edit is

    o' = o + <a, o> (m * b)          so that          W o' = W o + <a, o> W (m * b)

with trainable vectors a and b of the size of o and a fixed 0/1 mask m that keeps b on the selected heads. The
layer applies it to the projection's *input*, so it never needs W: the same code serves nn.Linear, GPT-2's Conv1D
and bitsandbytes 4-bit/8-bit layers, and costs one extra vector op per token instead of a LoRA matmul pair.

It is a PEFT LoRA (peft_type LORA, custom layer through `LoraConfig._register_custom_module`) rather than a new
tuner because PEFT cannot register new tuner types; this keeps `disable_adapter`, `save_pretrained`,
`PeftModel.from_pretrained`, TRL's adapter-disabled reference and gradient checkpointing working unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from peft import LoraConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.lora import LoraModel
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.tuners_utils import check_adapters_to_merge
from peft.utils import PeftType
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..core.args import EDIT_READS, EDIT_STRENGTHS
from ..core.errors import EditLoadError, HeadSpecError
from ..heads import heads_by_layer
from ..models.layout import AttentionLayout, projection_in_features


@dataclass
class HeadEditConfig(LoraConfig):
    """LoraConfig of a head-masked rank-1 edit. The extra fields are saved in `adapter_config.json`.

    Args:
        heads: the selected heads as [layer, head] pairs, 0-based.
        num_layers, num_heads: the shape of the model the edit was made for (layers x heads).
        model_type: the transformers model type the edit was made for.
        edit_read: `all`: the strength <a, o> reads every head's output (the paper); `heads`: only the selected
            heads' outputs, so the edit is strictly local.
        edit_strength: `adaptive`: o' = o + <a, o>(m * b) (the paper); `constant`: o' = o + m * b, a learned vector
            added to the selected heads (the paper's footnote 1, ITI's kind of edit with an optimised direction).
        edit_layers: output projection module path -> layer index, for every layer with a selected head.
        init_seed: seed of a's initial values. They depend only on (init_seed, layer), not on the global random
            state, so an edit starts the same whatever ran before (and many edits trained in one pass start as their
            separate runs would).
    """

    heads: list[list[int]] = field(default_factory=list)
    num_layers: int = 0
    num_heads: int = 0
    model_type: str | None = None
    edit_read: str = "all"
    edit_strength: str = "adaptive"
    edit_layers: dict[str, int] = field(default_factory=dict)
    init_seed: int = 0

    def __post_init__(self):
        # A rank-1 edit with scaling 1 and no dropout: the formula above, nothing else.
        self.r, self.lora_alpha, self.lora_dropout, self.bias = 1, 1, 0.0, "none"
        if self.edit_layers and not self.target_modules:
            self.target_modules = sorted(self.edit_layers)
        super().__post_init__()
        if self.edit_read not in EDIT_READS:
            raise ValueError(f"edit_read '{self.edit_read}' is not valid; choose one of {', '.join(EDIT_READS)}")
        if self.edit_strength not in EDIT_STRENGTHS:
            raise ValueError(
                f"edit_strength '{self.edit_strength}' is not valid; choose one of {', '.join(EDIT_STRENGTHS)}"
            )
        self.heads = [[int(layer), int(head)] for layer, head in self.heads]
        # Not serialised by PEFT, so it is registered again every time the config is built (also when loaded).
        self._register_custom_module({nn.Linear: HeadEditLayer, Conv1D: HeadEditLayer})
        # PEFT's loaders learn saved edits when the first edit is built, not when locedit is imported.
        register_with_peft()

    @classmethod
    def for_heads(
        cls,
        layout: AttentionLayout,
        heads: list[tuple[int, int]],
        edit_read: str = "all",
        edit_strength: str = "adaptive",
        **kwargs,
    ) -> HeadEditConfig:
        """The config of an edit at `heads` of a model with this layout: one adapter per layer with a head."""
        edit_layers = {layout.projection_name(layer): layer for layer in heads_by_layer(heads)}
        return cls(
            heads=[list(h) for h in heads],
            num_layers=layout.num_layers,
            num_heads=layout.num_heads,
            model_type=layout.model_type,
            edit_read=edit_read,
            edit_strength=edit_strength,
            edit_layers=edit_layers,
            target_modules=sorted(edit_layers),
            **kwargs,
        )

    @property
    def shape(self) -> str:
        return f"{self.num_layers} layers x {self.num_heads} heads"


class HeadEditLayer(nn.Module, LoraLayer):
    """The edit on one output projection. `lora_A` holds a, `lora_B` holds b, both of shape (1, in_features).

    b is stored in the projection's input space (not (out, r) as in LoRA) so that loading the file as a plain
    LoRA fails loudly on the shapes instead of silently building a different edit.
    """

    adapter_layer_names = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: HeadEditConfig, **kwargs) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.edit_config: dict[str, HeadEditConfig] = {}
        self.bias_added_by_merge = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config=config, target_name=kwargs.get("target_name", ""))

    def update_layer(self, adapter_name: str, r: int = 1, lora_alpha: int = 1, config=None, **kwargs) -> None:
        if not isinstance(config, HeadEditConfig):
            raise TypeError(f"HeadEditLayer needs a HeadEditConfig, got {type(config).__name__}")
        target_name = kwargs.get("target_name", "")
        layer = next((index for path, index in config.edit_layers.items() if target_name.endswith(path)), None)
        if layer is None:
            raise EditLoadError(f"module '{target_name}' is not an output projection of this edit")
        in_features = projection_in_features(self.get_base_layer())
        if in_features % config.num_heads:
            raise EditLoadError(
                f"the edit was made for {config.num_heads} heads, but '{target_name}' has {in_features} inputs, "
                f"not a multiple of {config.num_heads}"
            )
        selected = heads_by_layer([tuple(h) for h in config.heads]).get(layer, [])
        mask = head_mask(in_features, config.num_heads, selected)

        self.r[adapter_name] = 1
        self.lora_alpha[adapter_name] = 1
        self.scaling[adapter_name] = 1.0
        self.lora_dropout[adapter_name] = nn.Identity()
        self.lora_bias[adapter_name] = False
        self.use_rslora[adapter_name] = False
        self.use_dora[adapter_name] = False
        self.edit_config[adapter_name] = config
        # a (the strength read-out) is drawn like LoRA's A; b starts at 0 so the edited model equals the base model.
        if config.edit_strength == "adaptive":
            self.lora_A[adapter_name] = nn.Linear(in_features, 1, bias=False)
            self.lora_A[adapter_name].weight.data = initial_read_vector(in_features, layer, config.init_seed)[None]
        else:
            # The constant edit has no read-out a; the entry only marks the adapter as present, as PEFT expects.
            self.lora_A[adapter_name] = nn.Identity()
        self.lora_B[adapter_name] = nn.Linear(in_features, 1, bias=False)
        nn.init.zeros_(self.lora_B[adapter_name].weight)
        # The mask is rebuilt from the config, never loaded from a checkpoint (non-persistent buffer).
        self.register_buffer(_mask_name(adapter_name), mask, persistent=False)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        getattr(self, _mask_name(adapter_name)).data = mask.to(self.lora_B[adapter_name].weight.device)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def head_mask(self, adapter_name: str) -> torch.Tensor:
        return getattr(self, _mask_name(adapter_name))

    def input_delta(self, o: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """The change of the projection's input: <a, o>(m * b), or m * b for a constant edit."""
        config = self.edit_config[adapter_name]
        mask = self.head_mask(adapter_name)
        b = self.lora_B[adapter_name].weight[0] * mask
        if config.edit_strength == "constant":
            return b.to(o.dtype).expand_as(o)
        a = self.lora_A[adapter_name].weight[0]
        if config.edit_read == "heads":
            a = a * mask
        strength = o.to(a.dtype) @ a
        return (strength.unsqueeze(-1) * b).to(o.dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError("locedit edits do not support per-example adapter_names")
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        delta = None
        for name in self.active_adapters:
            if name in self.lora_B:
                # Each active edit reads the original head outputs, as LoRA adapters add up.
                step = self.input_delta(x, name)
                delta = step if delta is None else delta + step
        return self.base_layer(x if delta is None else x + delta, *args, **kwargs)

    # -- merging -------------------------------------------------------------------------------------------------

    def _edit_vectors(self, adapter_name: str) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(a or None for a constant edit, m * b) in float32: the edit is o -> o + <a, o> u with u = m * b."""
        config = self.edit_config[adapter_name]
        mask = self.head_mask(adapter_name).float()
        u = self.lora_B[adapter_name].weight[0].float() * mask
        if config.edit_strength == "constant":
            return None, u
        a = self.lora_A[adapter_name].weight[0].float()
        return (a * mask if config.edit_read == "heads" else a), u

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold the edit into the weights: W' = W (I + u a^T), or bias' = bias + W u for a constant edit."""
        adapter_names = [name for name in check_adapters_to_merge(self, adapter_names) if name in self.lora_B]
        if len(adapter_names) + len(self.merged_adapters) > 1:
            # Merged edits would compose (W T1 T2) while unmerged ones add up: only one at a time is exact.
            raise ValueError("locedit merges one edit per layer at a time; unmerge the merged edit first")
        base = self.get_base_layer()
        for name in adapter_names:
            _check_mergeable(base)
            a, u = self._edit_vectors(name)
            w = _weight_out_in(base)
            moved = w @ u
            if a is not None:
                new_weight = w + torch.outer(moved, a)
                if safe_merge and not torch.isfinite(new_weight).all():
                    raise ValueError(f"NaNs detected in the merged weights of edit '{name}'")
                _set_weight_out_in(base, new_weight)
            else:
                if base.bias is None:
                    # A constant edit is a bias of the projection; bias-free layers (Llama) get one while merged.
                    base.bias = nn.Parameter(torch.zeros_like(moved, dtype=base.weight.dtype), requires_grad=False)
                    self.bias_added_by_merge = True
                base.bias.data = (base.bias.data.float() + moved).to(base.bias.dtype)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Undo `merge` exactly (up to rounding): W = W' (I - u a^T / (1 + <a, u>)) by Sherman-Morrison."""
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            a, u = self._edit_vectors(name)
            w = _weight_out_in(base)
            if a is not None:
                _set_weight_out_in(base, w - torch.outer(w @ u, a) / (1.0 + a @ u))
            else:
                base.bias.data = (base.bias.data.float() - w @ u).to(base.bias.dtype)
        if self.bias_added_by_merge:
            base.bias = None
            self.bias_added_by_merge = False

    def __repr__(self) -> str:
        return "locedit." + super().__repr__()


def initial_read_vector(in_features: int, layer: int, seed: int) -> torch.Tensor:
    """a's initial value: uniform in +-1/sqrt(in), LoRA's kaiming_uniform(a=sqrt(5)) for A, from its own generator."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + layer)
    bound = 1.0 / in_features**0.5
    return torch.empty(in_features).uniform_(-bound, bound, generator=generator)


def head_mask(in_features: int, num_heads: int, heads: list[int]) -> torch.Tensor:
    """The 0/1 vector that is 1 on the head_dim slices of `heads` of a projection input of size in_features."""
    head_dim = in_features // num_heads
    mask = torch.zeros(in_features)
    for head in heads:
        mask[head * head_dim : (head + 1) * head_dim] = 1.0
    return mask


def _mask_name(adapter_name: str) -> str:
    return f"lora_head_mask_{adapter_name}"


def _weight_out_in(base: nn.Module) -> torch.Tensor:
    """The weight as an (out, in) float32 matrix; Conv1D stores it transposed."""
    weight = base.weight.data.float()
    return weight.t() if isinstance(base, Conv1D) else weight


def _set_weight_out_in(base: nn.Module, weight: torch.Tensor) -> None:
    base.weight.data = (weight.t() if isinstance(base, Conv1D) else weight).contiguous().to(base.weight.dtype)


def _check_mergeable(base: nn.Module) -> None:
    weight = getattr(base, "weight", None)
    if weight is None or not weight.dtype.is_floating_point or hasattr(weight, "quant_state"):
        raise ValueError(
            f"cannot merge a locedit edit into quantised weights ({type(base).__name__}); "
            "use the edit unmerged, it works the same"
        )


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
    """Make PEFT's loaders recognise saved locedit edits (keeping their heads) and check that they fit the model.

    PEFT has no way to register a LoRA variant with its loaders other than its global mappings, so this replaces
    PEFT's LoRA config and tuner with subclasses that behave exactly as PEFT's for any other LoRA. It runs only once
    an edit is built or loaded in the process (every HeadEditConfig calls it), not on `import locedit`: a process
    that merely imports locedit leaves PEFT as it was. Call it before `PeftModel.from_pretrained(model, edit_dir)` in
    a process that has built no edit yet (`locedit.load_edit` needs no call).
    """
    PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.LORA] = _LoraConfigWithEdits
    PEFT_TYPE_TO_TUNER_MAPPING[PeftType.LORA] = _LoraModelWithEdits
