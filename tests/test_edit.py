"""The head-masked rank-1 edit: its math against a hand computation, locality, merging, saving and loading.

The reference for everything is the formula, computed here from the original weights in float64:
    o' = o + <a, o> (m * b)   (edit_read="heads": a * m instead of a; edit_strength="constant": o' = o + m * b)
    r' = W o + bias + <a, o> W (m * b)
"""

import json
import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from locedit.core.errors import EditLoadError
from locedit.edit import (
    HeadEditConfig,
    HeadEditLayer,
    add_edit,
    edit_head_norms,
    edit_layers,
    edit_norms,
    load_edit,
)
from locedit.heads import resolve_heads
from locedit.models.layout import AttentionLayout

SPEC_ONE_LAYER = "L1H1,L1H3"  # two non-adjacent heads of layer 1; layer 0 gets no adapter
SPEC_TWO_LAYERS = "L0H2,L1H1,L1H3"

VARIANTS = {
    "adaptive": {"edit_read": "all", "edit_strength": "adaptive"},
    "read_heads": {"edit_read": "heads", "edit_strength": "adaptive"},
    "constant": {"edit_read": "all", "edit_strength": "constant"},
}

EDIT_FIELDS = ("heads", "num_layers", "num_heads", "model_type", "edit_read", "edit_strength", "edit_layers")


# ---------------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------------


def load(path) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(path)  # eval mode


def make_edit(path, spec=SPEC_ONE_LAYER, variant="adaptive", model=None):
    model = load(path) if model is None else model
    layout = AttentionLayout.from_model(model)
    heads = resolve_heads(spec, layout)
    peft_model = add_edit(model, HeadEditConfig.for_heads(layout, heads, **VARIANTS[variant]))
    peft_model.eval()
    return peft_model, layout, heads


def randomize(peft_model, seed=0, a=True, b=True) -> None:
    """Random a and b (b over the whole input, also outside the mask), scaled so the edit changes the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in edit_layers(peft_model).values():
            parts = ([module.lora_A["default"]] if a else []) + ([module.lora_B["default"]] if b else [])
            for part in parts:
                if isinstance(part, nn.Linear):  # a constant edit has no a
                    part.weight.copy_(torch.randn(part.weight.shape, generator=generator))


def token_ids(model, length=6, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (2, length), generator=generator)


def logits_of(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def head_mask(heads, layer, in_features, num_heads) -> torch.Tensor:
    """1 on the head_dim slices of the selected heads of `layer`, computed independently of the library."""
    head_dim = in_features // num_heads
    mask = torch.zeros(in_features, dtype=torch.bool)
    for selected_layer, head in heads:
        if selected_layer == layer:
            mask[head * head_dim : (head + 1) * head_dim] = True
    return mask


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight as (out, in): GPT-2's Conv1D stores it as (in, out)."""
    weight = module.weight.detach()
    return weight.t() if isinstance(module, Conv1D) else weight


def edit_vectors(module: HeadEditLayer) -> tuple[torch.Tensor | None, torch.Tensor]:
    a = module.lora_A["default"]
    a = a.weight.detach()[0].clone() if isinstance(a, nn.Linear) else None
    return a, module.lora_B["default"].weight.detach()[0].clone()


def hand_delta(o, a, b, mask, variant) -> torch.Tensor:
    """o' - o by the formula, in float64."""
    settings = VARIANTS[variant]
    mb = b.double() * mask.double()
    if settings["edit_strength"] == "constant":
        return mb.expand(o.shape)
    a = a.double() * mask.double() if settings["edit_read"] == "heads" else a.double()
    return (o.double() @ a).unsqueeze(-1) * mb


def hand_projection(o, weight, bias, a, b, mask, variant) -> torch.Tensor:
    """r' = W o + bias + <a, o> W (m * b) (or + W (m * b) for a constant edit), in float64."""
    settings = VARIANTS[variant]
    weight = weight.double()
    out = o.double() @ weight.t()
    if bias is not None:
        out = out + bias.double()
    moved = weight @ (b.double() * mask.double())
    if settings["edit_strength"] == "constant":
        return out + moved
    a = a.double() * mask.double() if settings["edit_read"] == "heads" else a.double()
    return out + (o.double() @ a).unsqueeze(-1) * moved


def capture(module: HeadEditLayer, store: dict, key) -> list:
    """Hooks recording the edited projection's input o, the base layer's input o' and the projection's output."""

    def on_base_input(_, args):
        store[key]["o_edited"] = args[0].detach()

    def on_output(_, args, output):
        store[key]["o"] = args[0].detach()
        store[key]["out"] = output.detach()

    store[key] = {}
    return [
        module.get_base_layer().register_forward_pre_hook(on_base_input),
        module.register_forward_hook(on_output),
    ]


def in_features_of(module: HeadEditLayer) -> int:
    return weight_out_in(module.get_base_layer()).shape[1]


# ---------------------------------------------------------------------------------------------------------------------
# 1. The math
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_projection_matches_formula(core_arch_dir, variant):
    base = load(core_arch_dir)
    model, layout, heads = make_edit(core_arch_dir, SPEC_TWO_LAYERS, variant)
    randomize(model)
    layers = edit_layers(model)
    assert sorted(layers) == [0, 1]

    store: dict = {}
    hooks = [hook for layer, module in layers.items() for hook in capture(module, store, layer)]
    ids = token_ids(model)
    edited_logits = logits_of(model, ids)
    for hook in hooks:
        hook.remove()

    for layer, module in layers.items():
        original = layout.projections(base)[layer]  # the unedited model's projection: the original W and bias
        a, b = edit_vectors(module)
        mask = head_mask(heads, layer, in_features_of(module), layout.num_heads)
        o, o_edited, out = store[layer]["o"], store[layer]["o_edited"], store[layer]["out"]
        expected = hand_projection(o, weight_out_in(original), original.bias, a, b, mask, variant)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close((o_edited - o).double(), hand_delta(o, a, b, mask, variant), rtol=1e-5, atol=1e-6)
        # Not vacuous: the edit moves the projection's output well beyond the tolerance.
        unedited = hand_projection(o, weight_out_in(original), original.bias, a, b * 0, mask, variant)
        assert (expected - unedited).abs().max() > 1e-3

    # The whole model against an independent implementation: hooks adding the edit to the unedited model's
    # projection inputs.
    vectors = {layer: edit_vectors(module) for layer, module in layers.items()}

    def add_edit_hook(layer):
        def hook(module, args):
            o = args[0]
            a, b = vectors[layer]
            mask = head_mask(heads, layer, o.shape[-1], layout.num_heads)
            return (o + hand_delta(o, a, b, mask, variant).to(o.dtype), *args[1:])

        return hook

    projections = layout.projections(base)
    base_logits = logits_of(base, ids)
    hooks = [projections[layer].register_forward_pre_hook(add_edit_hook(layer)) for layer in layers]
    reference_logits = logits_of(base, ids)
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(edited_logits, reference_logits, rtol=1e-5, atol=1e-5)
    assert (edited_logits - base_logits).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------------------
# 2. Locality
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_unselected_heads_and_layers_untouched(core_arch_dir, variant):
    model, layout, heads = make_edit(core_arch_dir, SPEC_ONE_LAYER, variant)
    randomize(model)

    # Only layer 1's output projection is wrapped; layer 0's is the plain base class.
    wrapped = {name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}
    assert wrapped == {"base_model.model." + layout.projection_name(1)}
    assert sorted(edit_layers(model)) == [1]
    plain = layout.projections(load(core_arch_dir))[0]
    assert type(layout.projections(model)[0]) is type(plain)
    assert type(layout.projections(model)[0]) in (nn.Linear, Conv1D)
    assert isinstance(layout.projections(model)[1], HeadEditLayer)

    module = edit_layers(model)[1]
    store: dict = {}
    hooks = capture(module, store, 1)
    logits_of(model, token_ids(model))
    for hook in hooks:
        hook.remove()
    o, o_edited = store[1]["o"], store[1]["o_edited"]
    mask = head_mask(heads, 1, in_features_of(module), layout.num_heads)
    # Exactly unchanged outside the selected heads, although b is nonzero there.
    assert edit_vectors(module)[1][~mask].abs().min() > 0
    assert torch.equal(o_edited[..., ~mask], o[..., ~mask])
    # Changed inside every selected head.
    head_dim = in_features_of(module) // layout.num_heads
    for _, head in heads:
        change = (o_edited - o)[..., head * head_dim : (head + 1) * head_dim]
        assert change.abs().max() > 1e-3


def input_delta_of(module: HeadEditLayer, o: torch.Tensor) -> torch.Tensor:
    store: dict = {}
    hooks = capture(module, store, "x")
    with torch.no_grad():
        module(o)
    for hook in hooks:
        hook.remove()
    return store["x"]["o_edited"] - o


def test_read_heads_ignores_unselected_outputs(core_arch_dir):
    deltas = {}
    for variant in ("read_heads", "adaptive"):
        model, layout, heads = make_edit(core_arch_dir, SPEC_ONE_LAYER, variant)
        randomize(model, seed=1)
        module = edit_layers(model)[1]
        in_features = in_features_of(module)
        mask = head_mask(heads, 1, in_features, layout.num_heads)
        generator = torch.Generator().manual_seed(2)
        o = torch.randn(2, 5, in_features, generator=generator)
        perturbed = o + 3 * torch.randn(o.shape, generator=generator) * (~mask)
        assert torch.equal(perturbed[..., mask], o[..., mask])
        deltas[variant] = input_delta_of(module, o), input_delta_of(module, perturbed)

    delta, delta_perturbed = deltas["read_heads"]
    assert delta.abs().max() > 1e-3
    assert torch.equal(delta, delta_perturbed)
    # The paper's edit reads every head: the same perturbation changes its strength.
    delta, delta_perturbed = deltas["adaptive"]
    assert (delta - delta_perturbed).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------------------
# 3. Disabled and fresh edits equal the base model exactly
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["adaptive", "constant"])
def test_fresh_and_disabled_edit_equal_base(core_arch_dir, variant):
    base = load(core_arch_dir)
    ids = token_ids(base)
    base_logits = logits_of(base, ids)

    model, _, _ = make_edit(core_arch_dir, SPEC_TWO_LAYERS, variant, model=base)
    # b starts at 0: the fresh edit is the base model, bit for bit (a is random from the start).
    for module in edit_layers(model).values():
        assert torch.equal(module.lora_B["default"].weight, torch.zeros_like(module.lora_B["default"].weight))
    assert torch.equal(logits_of(model, ids), base_logits)
    randomize(model, b=False)
    assert torch.equal(logits_of(model, ids), base_logits)

    randomize(model)
    edited_logits = logits_of(model, ids)
    assert (edited_logits - base_logits).abs().max() > 1e-3
    with model.disable_adapter():
        assert torch.equal(logits_of(model, ids), base_logits)
    assert torch.equal(logits_of(model, ids), edited_logits)


# ---------------------------------------------------------------------------------------------------------------------
# 4. Merging
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_merge_and_unmerge(core_arch_dir, variant):
    model, layout, heads = make_edit(core_arch_dir, SPEC_TWO_LAYERS, variant)
    randomize(model)
    ids = token_ids(model)
    layers = edit_layers(model)
    original = {
        layer: (
            module.get_base_layer().weight.detach().clone(),
            None if module.get_base_layer().bias is None else module.get_base_layer().bias.detach().clone(),
        )
        for layer, module in layers.items()
    }
    unmerged_logits = logits_of(model, ids)

    model.merge_adapter()
    for layer, module in layers.items():
        assert module.merged
        base_layer = module.get_base_layer()
        weight, bias = original[layer]
        weight_oi = weight.t() if isinstance(base_layer, Conv1D) else weight
        a, b = edit_vectors(module)
        mask = head_mask(heads, layer, in_features_of(module), layout.num_heads)
        moved = weight_oi.double() @ (b.double() * mask)
        if variant == "constant":
            # W unchanged; the bias absorbs W (m * b) (and exists while merged, also on a bias-free projection).
            assert torch.equal(base_layer.weight, weight)
            expected_bias = moved if bias is None else bias.double() + moved
            torch.testing.assert_close(base_layer.bias.double(), expected_bias, rtol=1e-5, atol=1e-6)
        else:
            a_read = a.double() * mask if variant == "read_heads" else a.double()
            expected = weight_oi.double() + torch.outer(moved, a_read)
            torch.testing.assert_close(weight_out_in(base_layer).double(), expected, rtol=1e-5, atol=1e-6)
            if bias is None:
                assert base_layer.bias is None
            else:
                assert torch.equal(base_layer.bias, bias)
    merged_logits = logits_of(model, ids)
    torch.testing.assert_close(merged_logits, unmerged_logits, rtol=1e-5, atol=1e-5)

    model.unmerge_adapter()
    for layer, module in layers.items():
        assert not module.merged
        base_layer = module.get_base_layer()
        weight, bias = original[layer]
        torch.testing.assert_close(base_layer.weight, weight, rtol=0, atol=1e-6)
        if bias is None:
            assert base_layer.bias is None  # the bias created by a constant merge is removed again
            assert "bias" not in dict(base_layer.named_parameters())
        else:
            torch.testing.assert_close(base_layer.bias, bias, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits_of(model, ids), unmerged_logits, rtol=1e-5, atol=1e-5)

    # Merging for good gives a plain model that computes the edited model.
    unloaded = model.merge_and_unload()
    assert not any(isinstance(module, BaseTunerLayer) for module in unloaded.modules())
    torch.testing.assert_close(logits_of(unloaded, ids), unmerged_logits, rtol=1e-5, atol=1e-5)


def test_constant_merge_creates_bias_on_bias_free_projection(tiny_model_dir):
    # Llama's o_proj has no bias: a merged constant edit needs one, and unmerging removes it.
    model, _, _ = make_edit(tiny_model_dir("llama"), SPEC_ONE_LAYER, "constant")
    randomize(model)
    base_layer = edit_layers(model)[1].get_base_layer()
    assert base_layer.bias is None
    model.merge_adapter()
    assert isinstance(base_layer.bias, nn.Parameter) and base_layer.bias.abs().max() > 0
    model.unmerge_adapter()
    assert base_layer.bias is None


def test_disabling_a_merged_edit_gives_the_base_model(tiny_model_dir):
    base = load(tiny_model_dir("gpt2"))
    ids = token_ids(base)
    base_logits = logits_of(base, ids)
    model, _, _ = make_edit(tiny_model_dir("gpt2"), SPEC_TWO_LAYERS, model=base)
    randomize(model)
    model.merge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(logits_of(model, ids), base_logits, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# 5. Saving and loading
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["read_heads", "constant"])  # non-default settings must survive the round trip
def test_save_and_load_round_trip(core_arch_dir, tmp_path, variant):
    model, layout, heads = make_edit(core_arch_dir, SPEC_TWO_LAYERS, variant)
    randomize(model)
    ids = token_ids(model)
    edited_logits = logits_of(model, ids)
    model.save_pretrained(tmp_path)

    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["heads"] == [[0, 2], [1, 1], [1, 3]]
    assert (saved["num_layers"], saved["num_heads"]) == (2, 4)
    assert saved["model_type"] == layout.model_type
    assert (saved["edit_read"], saved["edit_strength"]) == (
        VARIANTS[variant]["edit_read"],
        VARIANTS[variant]["edit_strength"],
    )
    assert saved["edit_layers"] == {layout.projection_name(0): 0, layout.projection_name(1): 1}
    assert (saved["peft_type"], saved["r"], saved["lora_alpha"]) == ("LORA", 1, 1)

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert not [key for key in tensors if "mask" in key]
    parts = ("lora_B",) if variant == "constant" else ("lora_A", "lora_B")
    expected_keys = {
        f"base_model.model.{layout.projection_name(layer)}.{part}.weight" for layer in (0, 1) for part in parts
    }
    assert set(tensors) == expected_keys
    assert all(tensor.shape == (1, layout.num_heads * 16) for tensor in tensors.values())

    loaded = load_edit(load(core_arch_dir), str(tmp_path))
    loaded.eval()
    assert torch.equal(logits_of(loaded, ids), edited_logits)
    assert not any(p.requires_grad for p in loaded.parameters())  # inference by default

    # PEFT's own loader builds a HeadEditConfig (not a plain LoraConfig that would drop the heads).
    through_peft = PeftModel.from_pretrained(load(core_arch_dir), tmp_path)
    through_peft.eval()
    config = through_peft.peft_config["default"]
    assert isinstance(config, HeadEditConfig)
    assert config.heads == [[0, 2], [1, 1], [1, 3]]
    assert (config.edit_read, config.edit_strength) == (
        VARIANTS[variant]["edit_read"],
        VARIANTS[variant]["edit_strength"],
    )
    assert sorted(edit_layers(through_peft)) == [0, 1]
    assert torch.equal(logits_of(through_peft, ids), edited_logits)

    trainable = load_edit(load(core_arch_dir), str(tmp_path), is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {
        f"base_model.model.{layout.projection_name(layer)}.{part}.default.weight" for layer in (0, 1) for part in parts
    }


@pytest.fixture(scope="module")
def saved_edits(tmp_path_factory, tiny_model_dir):
    """A saved (random) edit of each core architecture's tiny model."""
    saved = {}

    def get(arch):
        if arch not in saved:
            model, _, _ = make_edit(tiny_model_dir(arch), SPEC_TWO_LAYERS)
            randomize(model)
            saved[arch] = tmp_path_factory.mktemp(f"edit-{arch}")
            model.save_pretrained(saved[arch])
        return saved[arch]

    return get


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gpt_neox"])
@pytest.mark.parametrize(
    "overrides, shape", [({"num_layers": 3}, "3 layers x 4 heads"), ({"num_heads": 2}, "2 layers x 2 heads")]
)
def test_load_onto_another_shape_fails(tiny_model_dir, saved_edits, arch, overrides, shape):
    other = load(tiny_model_dir(arch, **overrides))
    with pytest.raises(EditLoadError) as info:
        load_edit(other, str(saved_edits(arch)))
    message = str(info.value)
    assert "2 layers x 4 heads" in message and shape in message


@pytest.mark.parametrize("overrides", [{"num_heads": 2}, {"num_layers": 3}], ids=["fewer-heads", "more-layers"])
def test_peft_from_pretrained_onto_another_shape_fails(tiny_model_dir, saved_edits, overrides):
    # Same projection sizes, other head count: only a model-level check can tell (the head mask would be wrong).
    with pytest.raises(EditLoadError, match="2 layers x 4 heads"):
        PeftModel.from_pretrained(load(tiny_model_dir("llama", **overrides)), saved_edits("llama"))


def test_load_onto_another_architecture_fails(tiny_model_dir, saved_edits):
    with pytest.raises(EditLoadError, match="gpt2"):
        load_edit(load(tiny_model_dir("gpt2")), str(saved_edits("llama")))


def test_load_edit_refuses_other_directories(tiny_model_dir, tmp_path):
    with pytest.raises(EditLoadError, match="does not exist"):
        load_edit(load(tiny_model_dir("llama")), str(tmp_path))
    plain = PeftModel(
        load(tiny_model_dir("llama")), LoraConfig(r=2, target_modules=["o_proj"], init_lora_weights=False)
    )
    plain.eval()
    plain.save_pretrained(tmp_path)
    with pytest.raises(EditLoadError, match="not a locedit edit"):
        load_edit(load(tiny_model_dir("llama")), str(tmp_path))
    # Importing locedit leaves ordinary LoRA adapters loading as ordinary LoRA adapters.
    reloaded = PeftModel.from_pretrained(load(tiny_model_dir("llama")), tmp_path)
    assert type(reloaded.peft_config["default"]) is LoraConfig
    assert not any(isinstance(module, HeadEditLayer) for module in reloaded.modules())
    ids = token_ids(plain)
    assert torch.equal(logits_of(reloaded, ids), logits_of(plain, ids))


def test_loading_as_plain_lora_fails_loudly(core_arch_dir, saved_edits, tmp_path):
    """What stock PEFT would do with the file (a LoraConfig without the edit's fields) must not load silently."""
    arch = load(core_arch_dir).config.model_type
    shutil.copytree(saved_edits(arch), tmp_path, dirs_exist_ok=True)
    config_file = tmp_path / "adapter_config.json"
    saved = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({k: v for k, v in saved.items() if k not in EDIT_FIELDS}))
    assert not isinstance(LoraConfig.from_pretrained(tmp_path), HeadEditConfig)
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(load(core_arch_dir), tmp_path)
    # Also with an explicit plain config.
    plain = LoraConfig(r=1, lora_alpha=1, target_modules=saved["target_modules"])
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(load(core_arch_dir), saved_edits(arch), config=plain)


# ---------------------------------------------------------------------------------------------------------------------
# 6-7. Trainable parameters and gradients
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["adaptive", "constant"])
@pytest.mark.parametrize("spec, layers", [(SPEC_TWO_LAYERS, (0, 1)), ("L1H0", (1,))])
def test_only_a_and_b_are_trainable(core_arch_dir, variant, spec, layers):
    model, layout, _ = make_edit(core_arch_dir, spec, variant)
    parts = ("lora_B",) if variant == "constant" else ("lora_A", "lora_B")
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == {
        f"base_model.model.{layout.projection_name(layer)}.{part}.default.weight" for layer in layers for part in parts
    }
    in_features = layout.num_heads * layout.head_dim(model)
    expected = (2 if variant == "adaptive" else 1) * in_features * len(layers)
    assert sum(p.numel() for p in trainable.values()) == expected
    assert model.get_nb_trainable_parameters()[0] == expected


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gradients_respect_the_mask(core_arch_dir, variant):
    model, layout, heads = make_edit(core_arch_dir, SPEC_TWO_LAYERS, variant)
    randomize(model)
    ids = token_ids(model)
    logits = model(input_ids=ids).logits
    loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()

    for layer, module in edit_layers(model).items():
        mask = head_mask(heads, layer, in_features_of(module), layout.num_heads)
        grad_b = module.lora_B["default"].weight.grad[0]
        assert torch.equal(grad_b[~mask], torch.zeros_like(grad_b[~mask]))
        assert grad_b[mask].abs().max() > 0
        if variant != "constant":
            grad_a = module.lora_A["default"].weight.grad[0]
            assert grad_a.abs().max() > 0
            if variant == "read_heads":
                assert torch.equal(grad_a[~mask], torch.zeros_like(grad_a[~mask]))
            else:
                assert grad_a[~mask].abs().max() > 0
    assert all(p.grad is None for name, p in model.named_parameters() if "lora_" not in name)


def test_edit_norms(tiny_model_dir):
    model, layout, heads = make_edit(tiny_model_dir("qwen2"), SPEC_TWO_LAYERS)
    randomize(model)
    norms = edit_norms(model)
    assert set(norms) == {"edit/L0/a_norm", "edit/L0/b_norm", "edit/L1/a_norm", "edit/L1/b_norm"}
    for layer, module in edit_layers(model).items():
        a, b = edit_vectors(module)
        mask = head_mask(heads, layer, b.numel(), layout.num_heads)
        assert norms[f"edit/L{layer}/b_norm"] == pytest.approx(float((b * mask).norm()), rel=1e-6)
        assert norms[f"edit/L{layer}/a_norm"] == pytest.approx(float(a.norm()), rel=1e-6)
    constant, _, _ = make_edit(tiny_model_dir("qwen2"), SPEC_ONE_LAYER, "constant")
    assert set(edit_norms(constant)) == {"edit/L1/b_norm"}


def test_edit_head_norms_are_the_norm_of_each_edited_heads_slice_of_b(tiny_model_dir):
    model, layout, heads = make_edit(tiny_model_dir("qwen2"), SPEC_TWO_LAYERS)
    randomize(model)
    norms = edit_head_norms(model)
    assert set(norms) == {f"edit/L{layer}H{head}/b_norm" for layer, head in heads}  # the edited heads only
    for layer, module in edit_layers(model).items():
        _, b = edit_vectors(module)
        head_dim = b.numel() // layout.num_heads
        for edited_layer, head in heads:
            if edited_layer == layer:
                own = b[head * head_dim : (head + 1) * head_dim]
                assert norms[f"edit/L{layer}H{head}/b_norm"] == pytest.approx(float(own.norm()), rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# 9. Quantised (bitsandbytes) projections: the edit in input form needs no access to W
# ---------------------------------------------------------------------------------------------------------------------


def quantized_copy(linear: nn.Linear, kind: str) -> nn.Module:
    import bitsandbytes as bnb

    has_bias = linear.bias is not None
    if kind == "8bit":
        layer = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False, threshold=0.0
        )
    else:
        layer = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=has_bias, compute_dtype=torch.float32, quant_type="nf4"
        )
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu")  # quantises the weight


@pytest.mark.parametrize("kind", ["8bit", "4bit"])
def test_edit_wraps_bitsandbytes_layers(tiny_model_dir, kind):
    pytest.importorskip("bitsandbytes")
    base = load(tiny_model_dir("llama"))
    layout = AttentionLayout.from_model(base)
    for layer in range(layout.num_layers):
        attention = base.get_submodule(layout.projection_name(layer).rsplit(".", 1)[0])
        attention.o_proj = quantized_copy(attention.o_proj, kind)
    quantized_class = type(layout.projections(base)[1])
    assert not layout.projections(base)[1].weight.dtype.is_floating_point
    ids = token_ids(base)
    base.eval()  # the new bitsandbytes modules start in training mode, where they compute differently
    base_logits = logits_of(base, ids)

    model, layout, heads = make_edit(tiny_model_dir("llama"), SPEC_ONE_LAYER, model=base)
    randomize(model)
    module = edit_layers(model)[1]
    assert isinstance(module, HeadEditLayer)
    assert type(module.get_base_layer()) is quantized_class
    assert module.lora_B["default"].weight.dtype == torch.float32

    # The edited projection is base_layer(o + <a, o>(m * b)).
    a, b = edit_vectors(module)
    mask = head_mask(heads, 1, 64, layout.num_heads)
    o = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))
    store: dict = {}
    hooks = capture(module, store, "q")
    with torch.no_grad():
        out = module(o)
    for hook in hooks:
        hook.remove()
    delta = hand_delta(o, a, b, mask, "adaptive")
    assert delta.abs().max() > 1e-3
    torch.testing.assert_close(store["q"]["o_edited"].double(), o.double() + delta, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert torch.equal(out, module.get_base_layer()(store["q"]["o_edited"]))

    edited_logits = logits_of(model, ids)
    assert (edited_logits - base_logits).abs().max() > 1e-3
    with model.disable_adapter():
        assert torch.equal(logits_of(model, ids), base_logits)

    weight_before = module.get_base_layer().weight.detach().clone()
    with pytest.raises(ValueError, match="quantised"):
        model.merge_adapter()
    assert not module.merged
    assert torch.equal(module.get_base_layer().weight, weight_before)
    assert torch.equal(logits_of(model, ids), edited_logits)
