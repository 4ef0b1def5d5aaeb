"""Helpers shared by the Hugging Face-layout families (feedforward, Ouro, HRM-Text, raven).

* :func:`require` / :func:`check_config_keys` -- read ``config.json`` strictly: a missing
  required field is an error, a field the family does not know is logged (the fields that
  change the computation are checked explicitly by each family and refused when unsupported).
* :func:`check_activation` -- the activation a config names, from the one table in
  ``tl_loop.components.activations``.
* :func:`rope_from_hf` -- the one RoPE parser of every loader: base and scaling from either the
  transformers 4 fields (``rope_theta``, ``rope_scaling``) or the transformers 5 dict
  (``rope_parameters``).
* :func:`expected_shapes` -- our parameter shapes for a config (built on the meta device).
* :func:`check_export_layout` -- refuse to save a model whose layout the family's format
  cannot express (re-reading the exported config must give back the same layout).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import fields
from typing import Any

import torch
from transformer_lens.config import TransformerLensConfig

from tl_loop.components.activations import ACTIVATIONS, canonical_activation
from tl_loop.config import DEFAULT_MAX_STEPS, LoopedConfig
from tl_loop.errors import CheckpointError

logger = logging.getLogger("tl_loop")

#: Keys every ``PreTrainedConfig`` may serialise; none changes the forward pass of a causal LM.
GENERIC_HF_KEYS = frozenset({
    "architectures", "auto_map", "model_type", "transformers_version", "dtype", "torch_dtype",
    "_name_or_path", "use_cache", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id",
    "decoder_start_token_id", "initializer_range", "attention_dropout", "output_attentions",
    "output_hidden_states", "return_dict", "is_encoder_decoder", "is_decoder", "chunk_size_feed_forward",
    "id2label", "label2id", "problem_type", "tokenizer_class", "finetuning_task", "task_specific_params",
    "pruned_heads", "tie_encoder_decoder", "add_cross_attention", "cross_attention_hidden_size",
    "use_bfloat16", "torchscript", "prefix", "_attn_implementation_autoset", "_commit_hash",
})

#: Generic keys carried over to ``save_pretrained`` (token ids and similar metadata).
PASSTHROUGH_KEYS = (
    "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "auto_map", "_name_or_path",
)

#: RoPE variants ``tl_loop.components.rotary`` computes exactly -> the fields each needs.
ROPE_TYPE_FIELDS: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
SUPPORTED_ROPE_TYPES = tuple(ROPE_TYPE_FIELDS)
#: RoPE fields that must be 1 where given (we rotate whole heads and never rescale attention).
_ROPE_MUST_BE_ONE = ("partial_rotary_factor", "attention_factor")

#: Config fields that are bookkeeping, not layout (ignored when checking an export).
_NOT_LAYOUT = {"family", "model_name", "extra", "max_steps", "n_layers", "device", "dtype"}


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _finite(v: Any, lower: float = -math.inf, strict: bool = False) -> bool:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return ok and (v > lower if strict else v >= lower)


#: The numeric and boolean fields of every family's config.json: (check, what a value must be).
#: A field given as ``null`` counts as absent. Checked before anything is built (``check_field_types``).
FIELD_TYPES: dict[str, tuple[Any, str]] = {
    **dict.fromkeys((
        "hidden_size", "n_embd", "num_attention_heads", "n_heads", "n_head", "num_key_value_heads", "head_dim",
        "intermediate_size", "n_inner", "vocab_size", "padded_vocab_size", "max_position_embeddings",
        "block_size", "n_positions", "n_ctx", "num_hidden_layers", "n_layer", "num_layers_per_stack",
        "n_layers_in_recurrent_block", "sliding_window",
    ), (_positive_int, "a positive integer")),
    **dict.fromkeys((
        "n_layers_in_prelude", "n_layers_in_coda", "total_ut_steps", "mean_recurrence", "H_cycles", "L_cycles",
    ), (_count, "an integer >= 0")),
    **dict.fromkeys(("rms_norm_eps", "norm_eps", "layer_norm_epsilon"),
                    (lambda v: _finite(v, 0.0), "a finite number >= 0")),
    **dict.fromkeys(("rope_base", "initializer_range"),  # rope_theta: see rope_from_hf
                    (lambda v: _finite(v, 0.0, strict=True), "a finite number > 0")),
    "embedding_scale": (_finite, "a finite number"),
    **dict.fromkeys((
        "tie_word_embeddings", "tie_embeddings", "bias", "qk_bias", "attention_bias", "mlp_bias",
        "use_sliding_window", "prefix_lm", "scale_attn_weights", "scale_attn_by_inverse_layer_idx",
        "add_cross_attention", "use_early_exit_gate",
    ), (lambda v: isinstance(v, bool), "true or false")),
}


def check_field_types(config_json: Mapping[str, Any], family: str) -> None:
    """Raise a ``CheckpointError`` naming the first field of ``FIELD_TYPES`` whose value has the
    wrong type or range (``total_ut_steps: 1.5``, ``num_attention_heads: 0``)."""
    for key, (check, what) in FIELD_TYPES.items():
        value = config_json.get(key)
        if value is not None and not check(value):
            raise CheckpointError(f"{family} config.json: {key}={value!r} must be {what}")


def check_steps(value: int, key: str, family: str, max_steps: int = DEFAULT_MAX_STEPS) -> int:
    """A step count read from config.json, through the same guard as a call's ``n_steps``."""
    if value > max_steps:
        raise CheckpointError(
            f"{family} config.json: {key}={value} asks for more recurrent steps than max_steps={max_steps}; "
            "fix the config (a model at that depth would take hours to run), or pass max_steps= where "
            "the family accepts it"
        )
    return value


def require(config_json: Mapping[str, Any], key: str, family: str) -> Any:
    """``config_json[key]``, or a ``CheckpointError`` naming the missing field."""
    if config_json.get(key) is None:
        raise CheckpointError(f"{family} config.json lacks the required field {key!r}")
    return config_json[key]


def check_config_keys(config_json: Mapping[str, Any], known: Iterable[str], family: str) -> None:
    """Log the fields of ``config_json`` that neither the family nor generic HF configs define."""
    unknown = sorted(set(config_json) - set(known) - GENERIC_HF_KEYS)
    if unknown:
        logger.warning(
            "%s config.json has fields tl_loop does not know and ignores: %s; check that they do not "
            "change the forward pass", family, unknown,
        )


def passthrough_metadata(config_json: Mapping[str, Any]) -> dict[str, Any]:
    """Generic metadata worth writing back on save (token ids, init range, remote-code map)."""
    return {k: config_json[k] for k in PASSTHROUGH_KEYS if k in config_json}


def check_activation(
    config_json: Mapping[str, Any], family: str, key: str = "hidden_act", default: str = "silu"
) -> str:
    """Canonical name of the activation ``config_json[key]`` names (see ``components.activations``)."""
    act = config_json.get(key, default)
    if act not in ACTIVATIONS:
        raise CheckpointError(
            f"{family} config.json: {key}={act!r} is not a supported activation "
            f"(supported: {sorted(ACTIVATIONS)})"
        )
    return canonical_activation(act)


def _is_positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf


def rope_from_hf(
    config_json: Mapping[str, Any], family: str, default_theta: float | None = 10000.0
) -> tuple[float, dict[str, Any] | None]:
    """``(rotary_base, rope_scaling or None)`` from an HF config.json, old or new style.

    transformers 5 writes one ``rope_parameters`` dict (``rope_type``, ``rope_theta`` and the
    scaling fields); older configs have ``rope_theta`` and ``rope_scaling``. As in transformers,
    ``rope_parameters`` wins when both are given. ``default_theta=None`` makes ``rope_theta``
    required. The scaling dict returned has ``rope_type`` and the scaling fields only. Anything
    ``components.rotary`` cannot compute exactly raises ``CheckpointError`` naming the field.
    """
    where = f"{family} config.json"
    params = config_json.get("rope_parameters")
    if params is not None and params != {}:
        field_name, rope = "rope_parameters", params
        if isinstance(params, Mapping) and all(isinstance(v, Mapping) for v in params.values()):
            raise CheckpointError(
                f"{where}: rope_parameters={params!r} gives RoPE per layer type, which tl_loop does not "
                "support"
            )
    else:
        field_name, rope = "rope_scaling", config_json.get("rope_scaling")
        rope = {} if rope is None else rope
    if not isinstance(rope, Mapping):
        raise CheckpointError(f"{where}: {field_name}={rope!r} must be a dict or null")

    def name(key: str) -> str:  # where ``key`` was read from
        return f"{field_name}.{key}" if key in rope else key

    theta = rope.get("rope_theta", config_json.get("rope_theta", default_theta))
    if theta is None:
        raise CheckpointError(f"{where} lacks the required field 'rope_theta'")
    if not _is_positive_number(theta):
        raise CheckpointError(f"{where}: {name('rope_theta')}={theta!r} must be a positive number")
    if set(rope) - {"rope_theta"} and not {"rope_type", "type"} & set(rope):
        raise CheckpointError(f"{where}: {field_name}={dict(rope)!r} names no rope_type")
    if rope.get("type", rope.get("rope_type")) != rope.get("rope_type", rope.get("type")):
        raise CheckpointError(f"{where}: {field_name}={dict(rope)!r}: its rope_type and type disagree")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if not isinstance(rope_type, str) or rope_type not in ROPE_TYPE_FIELDS:
        raise CheckpointError(
            f"{where}: {field_name}={dict(rope)!r} has rope_type {rope_type!r}, which tl_loop does not "
            f"support (supported: {', '.join(ROPE_TYPE_FIELDS)})"
        )
    for key in _ROPE_MUST_BE_ONE:
        value = rope.get(key, config_json.get(key))
        if value is not None and value != 1:
            raise CheckpointError(
                f"{where}: {name(key)}={value!r} is not supported (tl_loop needs 1: full-width RoPE, "
                "unscaled attention)"
            )
    missing = [k for k in ROPE_TYPE_FIELDS[rope_type] if k not in rope]
    if missing:
        raise CheckpointError(f"{where}: {field_name}={dict(rope)!r} ({rope_type}) lacks {missing}")
    for key in ROPE_TYPE_FIELDS[rope_type]:
        if not _is_positive_number(rope[key]):
            raise CheckpointError(f"{where}: {field_name}.{key}={rope[key]!r} must be a positive number")
    if rope_type == "default":
        return float(theta), None
    dropped = {"rope_type", "type", "rope_theta", *_ROPE_MUST_BE_ONE}
    return float(theta), {"rope_type": rope_type, **{k: v for k, v in rope.items() if k not in dropped}}


def rope_to_hf_parameters(cfg: LoopedConfig) -> dict[str, Any]:
    """transformers 5 ``rope_parameters`` dict for ``cfg``."""
    out: dict[str, Any] = {"rope_type": "default"}
    if cfg.rope_scaling is not None:
        out.update(cfg.rope_scaling)
    out["rope_theta"] = float(cfg.rotary_base)
    return out


def expected_shapes(cfg: LoopedConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every parameter of a ``HookedLoopedTransformer`` with ``cfg`` (no memory used)."""
    from tl_loop.model import HookedLoopedTransformer

    with torch.device("meta"):
        model = HookedLoopedTransformer(cfg.with_steps(0), init_weights=False)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _layout_fields() -> list[str]:
    tl_own = {f.name for f in fields(TransformerLensConfig)}
    ours = [f.name for f in fields(LoopedConfig) if f.name not in tl_own]
    tl_used = ["d_model", "d_head", "n_heads", "d_mlp", "d_vocab", "n_ctx", "n_key_value_heads", "eps",
               "act_fn", "gated_mlp", "positional_embedding_type"]
    return [name for name in tl_used + ours if name not in _NOT_LAYOUT]


def _layout_value(cfg: LoopedConfig, name: str) -> Any:
    value = getattr(cfg, name)
    return canonical_activation(value) if name == "act_fn" else value  # aliases compute the same


def check_export_layout(cfg: LoopedConfig, rebuilt: LoopedConfig, family: str) -> None:
    """Raise unless ``rebuilt`` (the exported config read back) has the same layout as ``cfg``."""
    skip = set()
    if cfg.state_init != "random" and rebuilt.state_init != "random":
        skip |= {"state_init_std", "state_init_scale", "state_init_seed"}
    diffs = [
        f"{name}: model has {getattr(cfg, name)!r}, the {family} format gives {getattr(rebuilt, name)!r}"
        for name in _layout_fields()
        if name not in skip and _layout_value(cfg, name) != _layout_value(rebuilt, name)
    ]
    if diffs:
        raise CheckpointError(
            f"this model cannot be saved in the {family} format without changing it:\n  " + "\n  ".join(diffs)
        )
