"""One activation table (``tl_loop.components.activations``) for the config, the MLP and loaders."""

from __future__ import annotations

import pytest
import torch
from conftest import make_cfg, make_model
from test_rope_config import BASES

from tl_loop.components.activations import ACTIVATIONS, activation_fn, canonical_activation
from tl_loop.components.mlp import HookedMLP
from tl_loop.errors import CheckpointError
from tl_loop.loading.families._hf_common import check_export_layout
from tl_loop.loading.registry import get_family

ALIASES = {"swish": "silu", "gelu_fast": "gelu_new"}
#: (family, config.json, field naming the activation)
LOADERS = [
    *((family, cj, "hidden_act") for family, cj in BASES.items() if family != "retrofitted"),
    ("feedforward", {"model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 2, "n_positions": 8,
                     "vocab_size": 64}, "activation_function"),
]
LOADER_IDS = [f"{family}-{field}" for family, _, field in LOADERS]


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 2e-6)])
def test_every_name_computes_what_transformers_act2fn_does(name, dtype, tol):
    act2fn = pytest.importorskip("transformers.activations").ACT2FN
    x = torch.cat([torch.linspace(-10, 10, 4001, dtype=dtype),
                   torch.randn(1000, dtype=dtype, generator=torch.Generator().manual_seed(0)) * 3])
    torch.testing.assert_close(activation_fn(name)(x), act2fn[name](x), rtol=tol, atol=tol)


def test_aliases_and_canonical_names():
    for alias, canonical in ALIASES.items():
        assert canonical_activation(alias) == canonical
        assert activation_fn(alias) is activation_fn(canonical)
    for name, entry in ACTIVATIONS.items():
        assert ACTIVATIONS[entry.canonical].canonical == entry.canonical  # canonical names are fixed points
        assert ACTIVATIONS[entry.canonical].fn is entry.fn
    with pytest.raises(ValueError, match="activation 'quick_gelu' is not supported"):
        activation_fn("quick_gelu")


def test_config_validation_uses_the_table():
    from tl_loop.config import _ACTIVATIONS

    assert _ACTIVATIONS is ACTIVATIONS
    for name in ACTIVATIONS:
        assert make_cfg(act_fn=name).act_fn == name
    with pytest.raises(ValueError, match="act_fn must be one of"):
        make_cfg(act_fn="quick_gelu")


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_mlp_uses_the_table(name):
    model = make_model("layernorm_plain_mlp", act_fn=name)
    mlps = [m for m in model.modules() if isinstance(m, HookedMLP)]
    assert mlps and all(m.act is activation_fn(name) for m in mlps)


@pytest.mark.parametrize(("alias", "canonical"), ALIASES.items())
def test_an_alias_gives_the_same_model(alias, canonical, tokens):
    torch.testing.assert_close(make_model(act_fn=alias)(tokens), make_model(act_fn=canonical)(tokens),
                               rtol=0, atol=0)
    # a model configured with an alias can be saved in a format that writes the canonical name
    check_export_layout(make_cfg(act_fn=alias), make_cfg(act_fn=canonical), "test")
    with pytest.raises(CheckpointError, match="act_fn"):
        check_export_layout(make_cfg(act_fn="relu"), make_cfg(act_fn=canonical), "test")


@pytest.mark.parametrize(("family", "config_json", "field"), LOADERS, ids=LOADER_IDS)
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_every_loader_reads_every_name_to_its_canonical_name(family, config_json, field, name):
    cfg = get_family(family).to_config({**config_json, field: name}, set())
    assert cfg.act_fn == canonical_activation(name)


@pytest.mark.parametrize(("family", "config_json", "field"), LOADERS, ids=LOADER_IDS)
def test_every_loader_refuses_unknown_activations_naming_the_field(family, config_json, field):
    with pytest.raises(CheckpointError, match=f"{field}='quick_gelu' is not a supported activation"):
        get_family(family).to_config({**config_json, field: "quick_gelu"}, set())
