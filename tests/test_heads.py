"""Head layouts of every supported architecture and the head selection specs."""

import re

import pytest
import torch
from transformers import AutoModelForCausalLM, BertConfig, T5Config

from locedit.core.errors import HeadSpecError
from locedit.heads import format_heads, heads_by_layer, resolve_heads
from locedit.models.layout import OUTPUT_PROJECTIONS, AttentionLayout
from locedit.models.tiny import TINY_ARCHITECTURES, tiny_config


def make_layout(num_layers: int = 6, num_heads: int = 4, model_type: str = "llama") -> AttentionLayout:
    return AttentionLayout(model_type, num_layers, num_heads, OUTPUT_PROJECTIONS[model_type])


# ---------------------------------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------------------------------


def real_head_dim(attention: torch.nn.Module) -> int:
    """The head size the attention module itself uses (GPT-NeoX calls it head_size)."""
    size = getattr(attention, "head_dim", None) or getattr(attention, "head_size", None)
    assert isinstance(size, int), f"{type(attention).__name__} has no head size attribute"
    return size


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_layout_of_every_tiny_architecture(tiny_model_dir, arch):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(arch))
    config = model.config
    layout = AttentionLayout.from_config(config)
    assert layout == AttentionLayout.from_model(model)
    assert layout.model_type == arch
    assert (layout.num_layers, layout.num_heads) == (2, 4)  # query heads, also for grouped-query qwen2/mistral
    assert layout.shape == "2 layers x 4 heads"

    modules = dict(model.named_modules())
    projections = layout.projections(model)
    assert len(projections) == 2
    for layer in range(layout.num_layers):
        name = layout.projection_name(layer)
        assert name in modules, f"{arch}: {name} is not a module of the model"
        assert projections[layer] is modules[name]
        assert layout.layer_of(name) == layer
        # The projection belongs to layer `layer`'s attention block, whose head size is the real one.
        attention = modules[name.rsplit(".", 1)[0]]
        assert real_head_dim(attention) == layout.head_dim(model)
        # Its input is all query heads' outputs concatenated.
        weight = projections[layer].weight
        in_features = weight.shape[0] if arch == "gpt2" else weight.shape[1]
        assert in_features == layout.num_heads * layout.head_dim(model)
    assert layout.projection_names() == [layout.projection_name(layer) for layer in range(2)]

    if arch == "gemma":
        # The reason head_dim is read from the module: Gemma's differs from hidden / heads.
        assert layout.head_dim(model) == 32 != config.hidden_size // config.num_attention_heads
    else:
        assert layout.head_dim(model) == 16


def test_layout_also_reads_the_config_alone():
    # No weights needed: a config is enough to validate a head spec before loading a model.
    layout = AttentionLayout.from_config(tiny_config("qwen2", vocab_size=32, num_layers=5, num_heads=8))
    assert (layout.model_type, layout.num_layers, layout.num_heads) == ("qwen2", 5, 8)
    assert layout.projection_name(4) == "model.layers.4.self_attn.o_proj"
    assert resolve_heads("L4H7", layout) == [(4, 7)]


@pytest.mark.parametrize("config_cls, model_type", [(BertConfig, "bert"), (T5Config, "t5")])
def test_unsupported_model_type(config_cls, model_type):
    with pytest.raises(HeadSpecError, match=rf"model type '{model_type}'"):
        AttentionLayout.from_config(config_cls())


def test_layer_of():
    llama = make_layout(model_type="llama")
    assert llama.layer_of("model.layers.3.self_attn.o_proj") == 3
    assert llama.layer_of("base_model.model.model.layers.3.self_attn.o_proj") == 3
    assert llama.layer_of("model.layers.13.self_attn.o_proj") == 13
    assert llama.layer_of("model.layers.3.self_attn.q_proj") is None
    assert llama.layer_of("model.layers.3.self_attn.o_proj.base_layer") is None
    assert llama.layer_of("model.layers.3.self_attn.o_proj.lora_A.default") is None
    assert llama.layer_of("xmodel.layers.3.self_attn.o_proj") is None  # a prefix must end at a dot

    gpt2 = make_layout(model_type="gpt2")
    assert gpt2.layer_of("transformer.h.1.attn.c_proj") == 1
    assert gpt2.layer_of("base_model.model.transformer.h.1.attn.c_proj") == 1
    assert gpt2.layer_of("transformer.h.1.mlp.c_proj") is None
    assert gpt2.layer_of("base_model.model.transformer.h.1.mlp.c_proj") is None

    neox = make_layout(model_type="gpt_neox")
    assert neox.layer_of("base_model.model.gpt_neox.layers.0.attention.dense") == 0
    assert neox.layer_of("gpt_neox.layers.0.attention.query_key_value") is None


# ---------------------------------------------------------------------------------------------------------------------
# Head specs
# ---------------------------------------------------------------------------------------------------------------------


def test_all():
    layout = make_layout(3, 2)
    assert resolve_heads("all", layout) == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert resolve_heads(" ALL ", layout) == resolve_heads("all", layout)


def test_explicit_heads():
    layout = make_layout()
    assert resolve_heads("L1H2,L0H3", layout) == [(0, 3), (1, 2)]  # sorted
    assert resolve_heads("l1h2, L0H3 ", layout) == [(0, 3), (1, 2)]
    assert resolve_heads("L5H3", layout) == [(5, 3)]  # the last layer and head are in range
    assert resolve_heads("L0H0", layout) == [(0, 0)]


def test_layer_ranges():
    layout = make_layout()
    assert resolve_heads("layers:0-1", layout) == [(layer, head) for layer in (0, 1) for head in range(4)]
    assert resolve_heads("layers:3", layout) == [(3, head) for head in range(4)]
    assert resolve_heads("layers:5,0,2-3", layout) == [(layer, head) for layer in (0, 2, 3, 5) for head in range(4)]
    assert resolve_heads("layers:0-5", layout) == resolve_heads("all", layout)


def test_random_heads():
    layout = make_layout()
    first = resolve_heads("random:8", layout, seed=3)
    assert first == resolve_heads("random:8", layout, seed=3)  # reproducible
    assert len(first) == len(set(first)) == 8  # distinct
    assert first == sorted(first)
    assert all(0 <= layer < 6 and 0 <= head < 4 for layer, head in first)
    # Other seeds give other draws (with 24 heads, C(24, 8) draws: collisions of all four would be a bug).
    others = [resolve_heads("random:8", layout, seed=seed) for seed in (4, 5, 6, 7)]
    assert all(other != first for other in others)
    # Every head is reachable: the draw is over the whole model, not the first layer only.
    assert {layer for heads in others for layer, _ in heads} == set(range(6))

    single = resolve_heads("random:1", layout, seed=0)
    assert len(single) == 1
    assert len({tuple(resolve_heads("random:1", layout, seed=seed)) for seed in range(20)}) > 1
    # random:all-heads is every head.
    assert resolve_heads("random:24", layout, seed=1) == resolve_heads("all", layout)


@pytest.mark.parametrize(
    "spec, bad_item",
    [
        ("L6H0", "L6H0"),  # layer out of range
        ("L0H1,L2H4", "L2H4"),  # head out of range
        ("L0H1,L0H1", "L0H1"),  # duplicate
        ("L0H1,foo", "foo"),  # garbage inside an explicit list
        ("layers:5-3", "5-3"),  # empty range
        ("layers:4-6", "4-6"),  # range past the last layer
        ("layers:1,0-2", "1"),  # a layer twice
        ("layers:x", "x"),
        ("random:0", "random:0"),
        ("random:999", "random:999"),
        ("random:-1", "random:-1"),
        ("random:two", "random:two"),
        ("", "''"),
        ("foo:bar", "foo:bar"),
        ("layers:", "layers:"),
        ("L1", "L1"),
    ],
)
def test_bad_specs(spec, bad_item):
    layout = make_layout()
    with pytest.raises(HeadSpecError) as info:
        resolve_heads(spec, layout)
    message = str(info.value)
    assert bad_item in message
    assert "6 layers x 4 heads" in message
    assert "\n" not in message


def test_format_heads_round_trips():
    layout = make_layout()
    for spec in ("L1H2,L0H3", "layers:2-3", "all", "random:5", "random:1"):
        heads = resolve_heads(spec, layout, seed=11)
        text = format_heads(heads)
        assert re.fullmatch(r"L\d+H\d+(,L\d+H\d+)*", text)
        assert resolve_heads(text, layout) == heads
    assert format_heads([(0, 3), (12, 1)]) == "L0H3,L12H1"


def test_heads_by_layer():
    assert heads_by_layer([(3, 1), (0, 2), (3, 0)]) == {0: [2], 3: [0, 1]}


def test_a_registered_selector_works_everywhere_a_spec_is_read(capsys):
    """One `register_selector` call is the whole of a new selector: parsing, checks, resolution, family, directory
    name, and a training recipe's plan."""
    from locedit import cli as locedit_cli
    from locedit.heads import SELECTORS, HeadSpec, Selector, head_count, register_selector

    def first_heads(spec, layout, scores):
        return [divmod(index, layout.num_heads) for index in range(head_count(spec, layout))]

    register_selector(Selector("first", "first:4", first_heads, lambda spec: f"first-{spec.arg}"))
    try:
        layout = make_layout()
        spec = HeadSpec.parse("first:5")
        assert (spec.family, spec.slug, spec.locator, spec.is_multi_edit) == ("first-5", "first5", None, False)
        assert spec.resolve(layout) == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)]
        with pytest.raises(HeadSpecError, match="asks for 99 heads"):
            HeadSpec.parse("first:99").check(layout)
        assert locedit_cli.main(["train", "recipes/tiny.yaml", "--heads", "first:3", "--dry_run", "true"]) == 0
        out = capsys.readouterr().out
        assert "first:3 -> 3 heads in 1 layer: L0H0,L0H1,L0H2" in out and "outputs/tiny/first3-lr" in out
    finally:
        SELECTORS.pop("first")
    with pytest.raises(HeadSpecError, match="bad head spec 'first:3'"):
        HeadSpec.parse("first:3")
