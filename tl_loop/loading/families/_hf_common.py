"""Helpers shared by the Hugging Face-layout families written for Ouro and HRM-Text.

* :func:`require` / :func:`check_config_keys` -- read ``config.json`` strictly: a missing
  required field is an error, a field the family does not know is logged (the fields that
  change the computation are checked explicitly by each family and refused when unsupported).
* :func:`rope_from_hf` -- RoPE base and scaling from either the transformers 4 fields
  (``rope_theta``, ``rope_scaling``) or the transformers 5 dict (``rope_parameters``).
* :func:`expected_shapes` -- our parameter shapes for a config (built on the meta device).
* :func:`check_export_layout` -- refuse to save a model whose layout the family's format
  cannot express (re-reading the exported config must give back the same layout).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import fields
from typing import Any

import torch
from transformer_lens.config import TransformerLensConfig

from tl_loop.config import LoopedConfig
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

#: RoPE variants ``tl_loop.components.rotary`` computes exactly.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

#: Config fields that are bookkeeping, not layout (ignored when checking an export).
_NOT_LAYOUT = {"family", "model_name", "extra", "max_steps", "n_layers", "device", "dtype"}


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


def check_activation(config_json: Mapping[str, Any], family: str) -> str:
    """``hidden_act`` when it is one our MLP computes (names as in ``transformers.ACT2FN``)."""
    from tl_loop.config import _ACTIVATIONS

    act = config_json.get("hidden_act", "silu")
    if act not in _ACTIVATIONS:
        raise CheckpointError(
            f"{family} config.json: hidden_act={act!r} is not supported (supported: {sorted(_ACTIVATIONS)})"
        )
    return act


def rope_from_hf(
    config_json: Mapping[str, Any], family: str, default_theta: float = 10000.0
) -> tuple[float, dict[str, Any] | None]:
    """``(rotary_base, rope_scaling)`` from ``rope_parameters`` or ``rope_theta``/``rope_scaling``.

    Raises ``CheckpointError`` naming the field for RoPE variants we cannot compute exactly.
    """
    params = config_json.get("rope_parameters")
    if params is not None:
        field_name = "rope_parameters"
        if not isinstance(params, Mapping) or not ({"rope_type", "type", "rope_theta"} & set(params)):
            raise CheckpointError(
                f"{family} config.json: rope_parameters={params!r} is not supported (per-layer-type RoPE "
                "or an unknown format)"
            )
        theta = float(params.get("rope_theta", config_json.get("rope_theta", default_theta)))
        scaling: dict[str, Any] | None = dict(params)
    else:
        field_name = "rope_scaling"
        theta = float(config_json.get("rope_theta", default_theta))
        scaling = dict(config_json["rope_scaling"]) if config_json.get("rope_scaling") is not None else None
    if scaling is None:
        return theta, None
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(
            f"{family} config.json: {field_name} has rope_type {rope_type!r}, which tl_loop does not support "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    partial = scaling.get("partial_rotary_factor", config_json.get("partial_rotary_factor"))
    if partial is not None and float(partial) != 1.0:
        raise CheckpointError(
            f"{family} config.json: partial_rotary_factor={partial} is not supported (only full-width RoPE)"
        )
    if rope_type == "default":
        return theta, None
    needed = ("factor",) if rope_type == "linear" else (
        "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in needed if k not in scaling]
    if missing:
        raise CheckpointError(f"{family} config.json: {field_name} ({rope_type}) lacks {missing}")
    scaling.pop("rope_theta", None)
    scaling.pop("partial_rotary_factor", None)
    scaling["rope_type"] = rope_type
    scaling.pop("type", None)
    return theta, scaling


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


def check_export_layout(cfg: LoopedConfig, rebuilt: LoopedConfig, family: str) -> None:
    """Raise unless ``rebuilt`` (the exported config read back) has the same layout as ``cfg``."""
    skip = set()
    if cfg.state_init != "random" and rebuilt.state_init != "random":
        skip |= {"state_init_std", "state_init_scale", "state_init_seed"}
    diffs = [
        f"{name}: model has {getattr(cfg, name)!r}, the {family} format gives {getattr(rebuilt, name)!r}"
        for name in _layout_fields()
        if name not in skip and getattr(cfg, name) != getattr(rebuilt, name)
    ]
    if diffs:
        raise CheckpointError(
            f"this model cannot be saved in the {family} format without changing it:\n  " + "\n  ".join(diffs)
        )
