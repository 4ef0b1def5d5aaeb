"""Ouro / LoopLM (ByteDance, ``model_type: ouro``, ``OuroForCausalLM``).

Layout: the whole decoder stack is the loop body (``n_core_layers = num_hidden_layers``), run
``total_ut_steps`` times with no input re-injection. Each block is a Qwen2 block with an extra
RMSNorm on each sublayer's *output* (``input_layernorm_2``, ``post_attention_layernorm_2``);
``model.norm`` is applied after every step (between steps it is our ``loops.{r}.ln_state``,
which shares ``ln_final``'s weights; after the last step it is ``ln_final``). An exit gate
``Linear(d_model -> 1)`` reads the normed state after every step.

Read-out: by default every step runs and the logits come from the last step, what the card's
``early_exit_threshold = 1.0`` is meant to give. The reference's threshold routing (which, by
floating-point rounding, can exit *before* the last step even at 1.0) is available explicitly:
``model.threshold_exit_logits(tokens)`` (threshold default ``cfg.extra["early_exit_threshold"]``),
``model.exit_probabilities(tokens)``, ``model.step_logits(tokens)`` (the reference's
``exit_at_step=r``). ``early_exit_threshold`` and ``early_exit_step`` are kept in ``cfg.extra``
(and written back on save); neither changes the default forward.

State-dict mapping (``model.layers.{j}.`` -> ``core.{j}.``)::

    self_attn.{q,k,v,o}_proj.weight      attn.w_q / w_k / w_v / w_o
    mlp.{gate,up,down}_proj.weight       mlp.w_gate / w_up / w_out
    input_layernorm.weight               ln1.w        (pre-attention)
    input_layernorm_2.weight             ln1_post.w   (attention output)
    post_attention_layernorm.weight      ln2.w        (pre-MLP)
    post_attention_layernorm_2.weight    ln2_post.w   (MLP output)
    model.embed_tokens.weight -> embed.W_E     model.norm.weight -> final_norm.w
    model.early_exit_gate.{weight,bias} -> exit_gate.{weight,bias}
    lm_head.weight -> unembed.weight   (absent or ignored when tie_word_embeddings)

Refused (``CheckpointError``): sliding-window attention, RoPE variants other than default /
linear / llama3, attention biases, activations we do not compute.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from tl_loop.config import LoopedConfig
from tl_loop.errors import CheckpointError
from tl_loop.loading.families._hf_common import (
    check_activation,
    check_config_keys,
    check_export_layout,
    check_field_types,
    check_steps,
    expected_shapes,
    passthrough_metadata,
    require,
    rope_from_hf,
)
from tl_loop.loading.registry import Family, register_family
from tl_loop.loading.strict import StrictTensors

FAMILY = "ouro"

#: ``total_ut_steps`` default of ``configuration_ouro.OuroConfig`` (used when the field is absent).
DEFAULT_UT_STEPS = 4

#: (HF name under ``model.layers.{j}.``, our name under ``core.{j}.``)
BLOCK_TENSORS = (
    ("self_attn.q_proj.weight", "attn.w_q"),
    ("self_attn.k_proj.weight", "attn.w_k"),
    ("self_attn.v_proj.weight", "attn.w_v"),
    ("self_attn.o_proj.weight", "attn.w_o"),
    ("mlp.gate_proj.weight", "mlp.w_gate"),
    ("mlp.up_proj.weight", "mlp.w_up"),
    ("mlp.down_proj.weight", "mlp.w_out"),
    ("input_layernorm.weight", "ln1.w"),
    ("input_layernorm_2.weight", "ln1_post.w"),
    ("post_attention_layernorm.weight", "ln2.w"),
    ("post_attention_layernorm_2.weight", "ln2_post.w"),
)

#: (HF name, our name) outside the blocks; lm_head is handled separately (tied or not).
MODEL_TENSORS = (
    ("model.embed_tokens.weight", "embed.W_E"),
    ("model.norm.weight", "final_norm.w"),
    ("model.early_exit_gate.weight", "exit_gate.weight"),
    ("model.early_exit_gate.bias", "exit_gate.bias"),
)

#: Fields of the Ouro config that tl_loop reads or knowingly ignores.
KNOWN_KEYS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
    "rope_theta", "rope_scaling", "rope_parameters", "tie_word_embeddings", "use_sliding_window",
    "sliding_window", "max_window_layers", "layer_types", "total_ut_steps", "early_exit_threshold",
    "early_exit_step", "use_early_exit_gate", "chunk_size", "attention_bias",
}

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


def detect(config_json: Mapping[str, Any], tensor_names: set[str]) -> bool:
    architectures = config_json.get("architectures") or []
    return config_json.get("model_type") == FAMILY or "OuroForCausalLM" in architectures


def _check_full_attention(config_json: Mapping[str, Any]) -> None:
    layer_types = config_json.get("layer_types")
    if layer_types is not None:
        other = sorted({t for t in layer_types if t != "full_attention"})
        if other:
            raise CheckpointError(
                f"ouro config.json: layer_types contains {other}; sliding-window attention is not supported "
                "(only full causal attention)"
            )
    elif config_json.get("use_sliding_window") and config_json.get("sliding_window") is not None:
        raise CheckpointError(
            f"ouro config.json: use_sliding_window=true (sliding_window={config_json['sliding_window']}); "
            "sliding-window attention is not supported (only full causal attention)"
        )


def to_config(config_json: Mapping[str, Any], tensor_names: set[str], **options: Any) -> LoopedConfig:
    """Our ``LoopedConfig`` for an Ouro ``config.json`` (and the checkpoint's tensor names)."""
    if options:
        raise CheckpointError(f"family 'ouro' takes no loading options, got {sorted(options)}")
    check_config_keys(config_json, KNOWN_KEYS, FAMILY)
    check_field_types(config_json, FAMILY)
    _check_full_attention(config_json)
    if config_json.get("attention_bias"):
        raise CheckpointError("ouro config.json: attention_bias=true is not supported (Ouro has no biases)")
    d_model = int(require(config_json, "hidden_size", FAMILY))
    n_heads = int(require(config_json, "num_attention_heads", FAMILY))
    n_layers = int(require(config_json, "num_hidden_layers", FAMILY))
    d_head = config_json.get("head_dim")
    if d_head is None:
        if d_model % n_heads:
            raise CheckpointError(f"ouro config.json: hidden_size {d_model} is not a multiple of "
                                  f"num_attention_heads {n_heads} and head_dim is not given")
        d_head = d_model // n_heads
    found = {int(m.group(1)) for name in tensor_names if (m := _LAYER_RE.match(name))}
    if found and found != set(range(n_layers)):
        raise CheckpointError(
            f"ouro config.json says num_hidden_layers={n_layers}, but the checkpoint holds layers "
            f"{sorted(found)}"
        )
    theta, scaling = rope_from_hf(config_json, FAMILY)
    n_steps = config_json.get("total_ut_steps")
    n_steps = check_steps(DEFAULT_UT_STEPS if n_steps is None else n_steps, "total_ut_steps", FAMILY)
    extra: dict[str, Any] = {"hf_metadata": passthrough_metadata(config_json)}
    for key in ("early_exit_threshold", "early_exit_step"):
        if config_json.get(key) is not None:
            extra[key] = config_json[key]
    if "early_exit_threshold" not in config_json:
        extra["early_exit_threshold"] = 1.0  # OuroConfig's default
    return LoopedConfig(
        d_model=d_model,
        d_head=int(d_head),
        n_heads=n_heads,
        n_key_value_heads=int(config_json.get("num_key_value_heads") or n_heads),
        d_mlp=int(require(config_json, "intermediate_size", FAMILY)),
        d_vocab=int(require(config_json, "vocab_size", FAMILY)),
        n_ctx=int(require(config_json, "max_position_embeddings", FAMILY)),
        eps=float(config_json.get("rms_norm_eps", 1e-6)),
        act_fn=check_activation(config_json, FAMILY),
        n_core_layers=n_layers,
        n_steps=n_steps,
        state_init="prelude",  # no prelude: the first step reads the token embeddings
        injection="none",
        norm_type="RMS",
        pre_norm=True,
        output_norm=True,
        norm_between_steps=True,
        loop_norm_weights="ln_final",
        exit_gate=True,
        qkv_layout="split",
        mlp_layout="split",
        rotary_layout="half",
        rotary_base=theta,
        rope_scaling=scaling,
        tie_embeddings=bool(config_json.get("tie_word_embeddings", False)),
        family=FAMILY,
        model_name=str(config_json.get("_name_or_path") or "ouro"),
        extra=extra,
    )


def _name_pairs(cfg: LoopedConfig) -> list[tuple[str, str]]:
    """Every (HF name, our name) pair of this config, lm_head included when untied."""
    pairs = list(MODEL_TENSORS)
    for j in range(cfg.n_core_layers):
        pairs += [(f"model.layers.{j}.{hf}", f"core.{j}.{ours}") for hf, ours in BLOCK_TENSORS]
    if not cfg.tie_embeddings:
        pairs.append(("lm_head.weight", "unembed.weight"))
    return pairs


def convert(tensors: StrictTensors, cfg: LoopedConfig) -> dict[str, torch.Tensor]:
    """Map an Ouro state dict to ours (missing, unexpected and mis-shaped tensors are reported)."""
    shapes = expected_shapes(cfg)
    state = {ours: tensors.take(hf, shapes[ours]) for hf, ours in _name_pairs(cfg)}
    if cfg.tie_embeddings:
        tensors.ignore("lm_head.weight")  # transformers overwrites it with the embedding
    tensors.ignore("model.rotary_emb.inv_freq")  # a buffer, recomputed from rope_theta
    return state


def export(model: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(config.json, tensors)`` of ``model`` in Ouro's own format."""
    cfg: LoopedConfig = model.cfg
    config_json: dict[str, Any] = dict(cfg.extra.get("hf_metadata", {}))
    config_json.update({
        "architectures": ["OuroForCausalLM"],
        "model_type": "ouro",
        "vocab_size": cfg.d_vocab,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_mlp,
        "num_hidden_layers": cfg.n_core_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_key_value_heads,
        "head_dim": cfg.d_head,
        "hidden_act": cfg.act_fn,
        "max_position_embeddings": cfg.n_ctx,
        "rms_norm_eps": cfg.eps,
        "rope_theta": cfg.rotary_base,
        "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling is not None else None,
        "tie_word_embeddings": cfg.tie_embeddings,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": cfg.n_core_layers,
        "layer_types": ["full_attention"] * cfg.n_core_layers,
        "total_ut_steps": cfg.n_steps,
        "early_exit_threshold": cfg.extra.get("early_exit_threshold"),
        "dtype": str(cfg.dtype).removeprefix("torch."),
    })
    if "early_exit_step" in cfg.extra:
        config_json["early_exit_step"] = cfg.extra["early_exit_step"]
    check_export_layout(cfg, to_config(config_json, set()), FAMILY)
    state = model.state_dict()
    return config_json, {hf: state[ours] for hf, ours in _name_pairs(cfg)}


OURO = register_family(
    Family(
        name=FAMILY,
        detect=detect,
        to_config=to_config,
        convert=convert,
        export=export,
        description="Ouro / LoopLM (OuroForCausalLM): whole stack looped, output norms, exit gate",
    )
)
