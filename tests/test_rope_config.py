"""One RoPE parser (``_hf_common.rope_from_hf``) for every loader that reads RoPE config.

Each family must read the transformers 4 fields (``rope_theta`` + ``rope_scaling``) and the
transformers 5 dict (``rope_parameters``) to the same config, and refuse what
``components.rotary`` cannot compute with a ``CheckpointError`` naming the field.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from tl_loop.errors import CheckpointError
from tl_loop.loading.families._hf_common import rope_from_hf
from tl_loop.loading.registry import get_family

FIXTURES = Path(__file__).parent / "fixtures"
ROPE_KEYS = ("rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor")


def _fixture(name: str) -> dict:
    return json.loads((FIXTURES / name / "config.json").read_text())


#: family -> a config.json of that family (RoPE fields stripped).
BASES = {
    "feedforward": {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
                    "num_hidden_layers": 2, "intermediate_size": 96, "vocab_size": 64},
    "ouro": _fixture("ouro_tiny"),
    "hrm_text": {"model_type": "hrm_text", "hidden_size": 32, "num_attention_heads": 2, "head_dim": 16,
                 "intermediate_size": 64, "vocab_size": 64, "num_layers_per_stack": 1},
    "retrofitted": _fixture("retro_llama_tiny"),
}
BASES = {f: {k: v for k, v in cj.items() if k not in ROPE_KEYS} for f, cj in BASES.items()}
FAMILIES = list(BASES)

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
SCALINGS = {
    "default": None,
    "default_explicit": {"rope_type": "default"},
    "linear": {"rope_type": "linear", "factor": 2.0},
    "linear_legacy_type": {"type": "linear", "factor": 2.0},
    "llama3": LLAMA3,
}


def _config(family: str, **rope):
    cj = {**BASES[family], **rope}
    return get_family(family).to_config(cj, set())


def _old(theta, scaling):
    return {"rope_theta": theta, "rope_scaling": scaling}


def _new(theta, scaling):
    return {"rope_parameters": {**(scaling or {"rope_type": "default"}), "rope_theta": theta}}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scaling", list(SCALINGS))
def test_old_and_new_style_give_the_same_config(family, scaling):
    s = SCALINGS[scaling]
    old, new = _config(family, **_old(5e5, s)), _config(family, **_new(5e5, s))
    assert old.rotary_base == new.rotary_base == 5e5
    assert old.rope_scaling == new.rope_scaling
    if s is None or s.get("rope_type") == "default":
        assert old.rope_scaling is None
    else:
        rope_type = s.get("rope_type", s.get("type"))
        assert old.rope_scaling == {"rope_type": rope_type, **{k: v for k, v in s.items() if k != "type"}}


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_own_conversion_is_read_identically(family):
    """``rope_parameters`` as transformers 5 writes it from old fields (``type`` and ``rope_type``)."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=5e5,
                                  rope_scaling={"type": "linear", "factor": 2.0})
    new = _config(family, rope_parameters=hf.to_dict()["rope_parameters"])
    old = _config(family, **_old(5e5, {"type": "linear", "factor": 2.0}))
    assert (new.rotary_base, new.rope_scaling) == (old.rotary_base, old.rope_scaling) == (
        5e5, {"rope_type": "linear", "factor": 2.0})


def test_rope_parameters_win_over_old_fields_as_in_transformers():
    cj = {"rope_theta": 7.0, "rope_scaling": {"rope_type": "linear", "factor": 3.0},
          "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}
    assert rope_from_hf(cj, "x") == (1e4, {"rope_type": "linear", "factor": 2.0})
    # empty / null rope_parameters mean "not given"
    assert rope_from_hf({"rope_parameters": {}, "rope_theta": 3.0}, "x") == (3.0, None)


@pytest.mark.parametrize("family", ["feedforward", "ouro", "hrm_text"])
def test_theta_defaults_to_10000(family):
    assert _config(family).rotary_base == 10000.0


BAD = [
    # (rope fields, regex naming the field)
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, r"rope_scaling=.*rope_type 'yarn'"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
     r"rope_parameters=.*rope_type 'yarn'"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, r"rope_scaling=.*rope_type 'dynamic'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, r"rope_scaling=.*lacks \["),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}},
     r"rope_parameters=.*lacks \['factor'\]"),
    ({"rope_scaling": {"rope_type": "linear", "factor": "2"}},
     r"rope_scaling\.factor='2' must be a positive"),
    ({"rope_parameters": {"rope_type": "linear", "factor": -1.0, "rope_theta": 1e4}},
     r"rope_parameters\.factor=-1\.0 must be a positive"),
    ({"rope_scaling": {"factor": 2.0}}, r"rope_scaling=.*names no rope_type"),
    ({"rope_parameters": {"rope_type": "default", "type": "linear", "factor": 2.0, "rope_theta": 1e4}},
     r"rope_parameters=.*rope_type and type disagree"),
    ({"rope_scaling": "linear"}, r"rope_scaling='linear' must be a dict"),
    ({"rope_parameters": [1, 2]}, r"rope_parameters=\[1, 2\] must be a dict"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e4},
                          "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
     r"rope_parameters=.*per layer type"),
    ({"rope_theta": "big"}, r"rope_theta='big' must be a positive number"),
    ({"rope_theta": 0}, r"rope_theta=0 must be a positive number"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": True}}, r"rope_parameters\.rope_theta=True"),
    ({"partial_rotary_factor": 0.5}, r"partial_rotary_factor=0\.5 is not supported"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     r"rope_parameters\.partial_rotary_factor=0\.5"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0, "attention_factor": 0.7}},
     r"rope_scaling\.attention_factor=0\.7"),
]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("rope", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_rope_config_is_refused_naming_the_field(family, rope, message):
    rope = {"rope_theta": 1e4, **rope} if family == "retrofitted" and "rope_parameters" not in rope else rope
    with pytest.raises(CheckpointError, match=message) as err:
        _config(family, **rope)
    label = BASES[family]["model_type"] if family == "feedforward" else family
    assert str(err.value).startswith(f"{label} config.json")


def test_retrofitted_needs_rope_theta():
    with pytest.raises(CheckpointError, match="lacks the required field 'rope_theta'"):
        _config("retrofitted")
    cfg = _config("retrofitted", rope_parameters={"rope_type": "default", "rope_theta": 2e5})
    assert cfg.rotary_base == 2e5 and "rope_parameters" not in cfg.extra["config_json"]


def test_huginn_takes_rope_base_and_ignores_scaling_fields(caplog):
    cj = {k: v for k, v in _fixture("raven_tiny").items() if k not in ROPE_KEYS}
    huginn = get_family("huginn")
    names = {"transformer.core_block.0.norm_4.weight"}
    plain = huginn.to_config(cj, names)
    with caplog.at_level(logging.WARNING, logger="tl_loop"):
        scaled = huginn.to_config({**cj, **_new(1e4, {"rope_type": "linear", "factor": 2.0})}, names)
    assert "ignoring rope_parameters" in caplog.text
    assert scaled.rotary_base == plain.rotary_base == float(cj.get("rope_base", 50_000))
    assert scaled.rope_scaling is None
