"""HRM-Text (Sapient, ``model_type: hrm_text``, ``transformers.HrmTextForCausalLM``).

Reference (``transformers/models/hrm_text/modeling_hrm_text.py``)::

    zH = embed(ids) * embedding_scale;  zL = z_L_init
    for h in range(H_cycles):
        for l in range(L_cycles): zL = L_module(zL + zH)     # each stack ends in final_norm
        zH = H_module(zH + zL)
    logits = lm_head(zH)

Our layout: the H stack is the recurrent block (``core``, ``n_core_layers =
num_layers_per_stack``), the L stack is the inner stack (``inner``, run ``inner_cycles =
L_cycles`` times per step with additive coupling), ``n_steps = H_cycles``, ``z_L_init`` is
``model.inner_init``. All norms are parameter-free RMSNorms; the H stack's final norm is
``loops.{r}.ln_state`` between steps and ``ln_final`` after the last step, the L stack's is
``loops.{r}.inner.{c}.ln_state``. Attention has a sigmoid output gate (``attn.w_gate``).

Every L and H stack run has its own hook names: ``blocks.{i}`` in execution order (labels
``inner.{step}.{cycle}.{j}`` and ``core.{step}.{j}`` in ``model.schedule``), the L state after
each cycle at ``loops.{r}.inner.{c}.hook_state_out``, the H state after step ``r`` at
``loops.{r}.hook_state_out`` (``ln_final.hook_normalized`` for the last step).

Config quirk: a saved ``num_hidden_layers`` is the *inflated* KV-cache slot count
``num_layers_per_stack * H_cycles * (L_cycles + 1)``; the real depth of each stack is
``num_layers_per_stack`` (or ``num_hidden_layers`` in a legacy config without it). The layer
count is cross-checked against the tensors.

Checkpoint format (what ``HrmTextForCausalLM.save_pretrained`` writes and the release ships),
per layer ``model.{H,L}_module.layers.{j}.``: ``attn.gqkv_proj.weight`` = ``[gate; q; k; v]``
(rows), ``attn.o_proj.weight``, ``mlp.gate_up_proj.weight`` = ``[gate; up]``,
``mlp.down_proj.weight``; plus ``model.embed_tokens.weight``, ``model.z_L_init``,
``lm_head.weight`` (untied). The unfused module names (``self_attn.{gate,q,k,v,o}_proj``,
``mlp.{gate,up}_proj``) are read too.

Only causal use is exact: with ``prefix_lm`` the reference lets ``token_type_ids == 1`` tokens
attend bidirectionally; our forward takes no ``token_type_ids`` and always masks causally, which
equals the reference whenever it is called without ``token_type_ids``. Refused
(``CheckpointError``): ``attention_bias``, ``mlp_bias``, RoPE variants we do not compute,
``L_cycles < 1`` or ``H_cycles < 1``. ``L_bp_cycles`` (training-time gradient routing) has no
effect on the forward pass.
"""

from __future__ import annotations

import logging
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
    rope_to_hf_parameters,
)
from tl_loop.loading.registry import Family, register_family
from tl_loop.loading.strict import StrictTensors

logger = logging.getLogger("tl_loop")

FAMILY = "hrm_text"

#: ``HrmTextConfig`` defaults for fields a config.json may leave out.
DEFAULTS = {"H_cycles": 2, "L_cycles": 3, "head_dim": 128, "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-6, "initializer_range": 0.02, "prefix_lm": True}

#: HF stack name -> our physical stack.
STACKS = (("H_module", "core"), ("L_module", "inner"))

KNOWN_KEYS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_layers_per_stack",
    "num_attention_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
    "rope_parameters", "rope_theta", "rope_scaling", "tie_word_embeddings", "attention_bias", "mlp_bias",
    "H_cycles", "L_cycles", "L_bp_cycles", "embedding_scale", "prefix_lm",
}

_STACK_LAYER_RE = re.compile(r"^model\.(H_module|L_module)\.layers\.(\d+)\.")


def detect(config_json: Mapping[str, Any], tensor_names: set[str]) -> bool:
    architectures = config_json.get("architectures") or []
    return config_json.get("model_type") == FAMILY or "HrmTextForCausalLM" in architectures


def _get(config_json: Mapping[str, Any], key: str) -> Any:
    value = config_json.get(key)
    return DEFAULTS[key] if value is None else value


def _layers_per_stack(config_json: Mapping[str, Any], tensor_names: set[str]) -> int:
    per_stack = config_json.get("num_layers_per_stack")
    if per_stack is None:  # legacy config: num_hidden_layers is the real per-stack depth
        per_stack = require(config_json, "num_hidden_layers", FAMILY)
    per_stack = int(per_stack)
    for stack, _ in STACKS:
        matches = (_STACK_LAYER_RE.match(n) for n in tensor_names)
        found = {int(m.group(2)) for m in matches if m and m.group(1) == stack}
        if found and found != set(range(per_stack)):
            raise CheckpointError(
                f"hrm_text: the config gives {per_stack} layers per stack (num_layers_per_stack; "
                f"num_hidden_layers={config_json.get('num_hidden_layers')} is the inflated cache-slot "
                "count), "
                f"but the checkpoint's {stack} holds layers {sorted(found)}"
            )
    return per_stack


def to_config(config_json: Mapping[str, Any], tensor_names: set[str], **options: Any) -> LoopedConfig:
    """Our ``LoopedConfig`` for an HRM-Text ``config.json`` (and the checkpoint's tensor names)."""
    if options:
        raise CheckpointError(f"family 'hrm_text' takes no loading options, got {sorted(options)}")
    check_config_keys(config_json, KNOWN_KEYS, FAMILY)
    check_field_types(config_json, FAMILY)
    for flag in ("attention_bias", "mlp_bias"):
        if config_json.get(flag):
            raise CheckpointError(
                f"hrm_text config.json: {flag}=true is not supported (tl_loop's gated attention and "
                "gated MLP have no biases there)"
            )
    h_cycles = check_steps(_get(config_json, "H_cycles"), "H_cycles", FAMILY)
    l_cycles = check_steps(_get(config_json, "L_cycles"), "L_cycles", FAMILY)
    if h_cycles < 1 or l_cycles < 1:
        raise CheckpointError(
            f"hrm_text config.json: H_cycles={h_cycles}, L_cycles={l_cycles}; both must be >= 1"
        )
    per_stack = _layers_per_stack(config_json, tensor_names)
    scale = config_json.get("embedding_scale")
    if scale is None:
        scale = 1.0 / float(_get(config_json, "initializer_range"))
    theta, scaling = rope_from_hf(config_json, FAMILY)
    prefix_lm = bool(_get(config_json, "prefix_lm"))
    if prefix_lm:
        logger.info("hrm_text: prefix_lm=true; tl_loop masks causally (exact without token_type_ids)")
    extra: dict[str, Any] = {"hf_metadata": passthrough_metadata(config_json), "prefix_lm": prefix_lm}
    if config_json.get("L_bp_cycles") is not None:
        extra["L_bp_cycles"] = list(config_json["L_bp_cycles"])
    n_heads = int(require(config_json, "num_attention_heads", FAMILY))
    return LoopedConfig(
        d_model=int(require(config_json, "hidden_size", FAMILY)),
        d_head=int(_get(config_json, "head_dim")),
        n_heads=n_heads,
        n_key_value_heads=n_heads,  # HRM-Text attention is plain multi-head
        d_mlp=int(require(config_json, "intermediate_size", FAMILY)),
        d_vocab=int(require(config_json, "vocab_size", FAMILY)),
        n_ctx=int(_get(config_json, "max_position_embeddings")),
        eps=float(_get(config_json, "rms_norm_eps")),
        act_fn=check_activation(config_json, FAMILY),
        n_core_layers=per_stack,
        n_inner_layers=per_stack,
        inner_cycles=l_cycles,
        n_steps=h_cycles,
        state_init="prelude",  # zH starts as the scaled token embeddings
        inner_state_init="learned",  # zL starts as z_L_init
        norm_type="RMS",
        norm_weights=False,
        pre_norm=True,
        norm_between_steps=True,  # H stack's final_norm (ln_final after the last step)
        inner_norm=True,  # L stack's final_norm
        attn_output_gate=True,
        qkv_layout="fused",
        mlp_layout="fused",
        rotary_layout="half",
        rotary_base=theta,
        rope_scaling=scaling,
        embed_scale=float(scale),
        tie_embeddings=bool(config_json.get("tie_word_embeddings", False)),
        family=FAMILY,
        model_name=str(config_json.get("_name_or_path") or FAMILY),
        extra=extra,
    )


def _take(tensors: StrictTensors, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """``tensors.take``, with a placeholder of the right shape where the checkpoint's is wrong
    (the mismatch is still reported by ``finish``), so slicing and concatenation stay valid."""
    t = tensors.take(name, shape)
    return t if tuple(t.shape) == tuple(shape) else torch.zeros(shape)


def convert(tensors: StrictTensors, cfg: LoopedConfig) -> dict[str, torch.Tensor]:
    """Map an HRM-Text state dict (fused release format or unfused module names) to ours."""
    shapes = expected_shapes(cfg)
    q, d, m = cfg.n_heads * cfg.d_head, cfg.d_model, cfg.d_mlp
    assert m is not None
    state = {
        "embed.W_E": _take(tensors, "model.embed_tokens.weight", shapes["embed.W_E"]),
        "inner_init": _take(tensors, "model.z_L_init", shapes["inner_init"]),
    }
    for stack, ours in STACKS:
        for j in range(cfg.n_core_layers if ours == "core" else cfg.n_inner_layers):
            hf, us = f"model.{stack}.layers.{j}.", f"{ours}.{j}."
            if f"{hf}attn.gqkv_proj.weight" in tensors or f"{hf}self_attn.q_proj.weight" not in tensors:
                gqkv = _take(tensors, f"{hf}attn.gqkv_proj.weight", (4 * q, d))  # [gate; q; k; v]
                state[us + "attn.w_gate"], state[us + "attn.w_qkv"] = gqkv[:q], gqkv[q:]
                state[us + "attn.w_o"] = _take(tensors, f"{hf}attn.o_proj.weight", shapes[us + "attn.w_o"])
            else:
                parts = [_take(tensors, f"{hf}self_attn.{p}_proj.weight", (q, d)) for p in "qkv"]
                state[us + "attn.w_qkv"] = torch.cat(parts, dim=0)
                state[us + "attn.w_gate"] = _take(tensors, f"{hf}self_attn.gate_proj.weight", (q, d))
                o_proj = f"{hf}self_attn.o_proj.weight"
                state[us + "attn.w_o"] = _take(tensors, o_proj, shapes[us + "attn.w_o"])
            if f"{hf}mlp.gate_up_proj.weight" in tensors or f"{hf}mlp.gate_proj.weight" not in tensors:
                state[us + "mlp.w_gate_up"] = _take(tensors, f"{hf}mlp.gate_up_proj.weight", (2 * m, d))
            else:
                gate = _take(tensors, f"{hf}mlp.gate_proj.weight", (m, d))
                up = _take(tensors, f"{hf}mlp.up_proj.weight", (m, d))
                state[us + "mlp.w_gate_up"] = torch.cat([gate, up], dim=0)
            state[us + "mlp.w_out"] = _take(tensors, f"{hf}mlp.down_proj.weight", shapes[us + "mlp.w_out"])
    if cfg.tie_embeddings:
        tensors.ignore("lm_head.weight")  # transformers overwrites it with the embedding
    else:
        state["unembed.weight"] = _take(tensors, "lm_head.weight", shapes["unembed.weight"])
    tensors.ignore("model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq")
    return state


def export(model: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(config.json, tensors)`` in the HRM-Text release format (``H_cycles = cfg.n_steps``)."""
    cfg: LoopedConfig = model.cfg
    if not cfg.inner_cycles:
        raise CheckpointError("this model cannot be saved in the hrm_text format: it has no inner (L) stack")
    per_stack = cfg.n_core_layers
    config_json: dict[str, Any] = dict(cfg.extra.get("hf_metadata", {}))
    config_json.update({
        "architectures": ["HrmTextForCausalLM"],
        "model_type": FAMILY,
        "vocab_size": cfg.d_vocab,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_mlp,
        "num_attention_heads": cfg.n_heads,
        "head_dim": cfg.d_head,
        "hidden_act": cfg.act_fn,
        "max_position_embeddings": cfg.n_ctx,
        "rms_norm_eps": cfg.eps,
        "rope_parameters": rope_to_hf_parameters(cfg),
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "H_cycles": cfg.n_steps,
        "L_cycles": cfg.inner_cycles,
        "embedding_scale": cfg.embed_scale,
        "prefix_lm": bool(cfg.extra.get("prefix_lm", True)),
        "num_layers_per_stack": per_stack,
        "num_hidden_layers": per_stack * cfg.n_steps * (cfg.inner_cycles + 1),
        "dtype": str(cfg.dtype).removeprefix("torch."),
    })
    if "L_bp_cycles" in cfg.extra:
        config_json["L_bp_cycles"] = list(cfg.extra["L_bp_cycles"])
    check_export_layout(cfg, to_config(config_json, set()), FAMILY)
    state = model.state_dict()
    tensors = {"model.embed_tokens.weight": state["embed.W_E"], "model.z_L_init": state["inner_init"]}
    for stack, ours in STACKS:
        for j in range(per_stack):
            hf, us = f"model.{stack}.layers.{j}.", f"{ours}.{j}."
            gqkv = torch.cat([state[us + "attn.w_gate"], state[us + "attn.w_qkv"]])  # [gate; q; k; v]
            tensors[hf + "attn.gqkv_proj.weight"] = gqkv
            tensors[hf + "attn.o_proj.weight"] = state[us + "attn.w_o"]
            tensors[hf + "mlp.gate_up_proj.weight"] = state[us + "mlp.w_gate_up"]
            tensors[hf + "mlp.down_proj.weight"] = state[us + "mlp.w_out"]
    if not cfg.tie_embeddings:
        tensors["lm_head.weight"] = state["unembed.weight"]
    return config_json, tensors


HRM_TEXT = register_family(
    Family(
        name=FAMILY,
        detect=detect,
        to_config=to_config,
        convert=convert,
        export=export,
        description="HRM-Text (HrmTextForCausalLM): L stack inside each H step, parameter-free norms, "
        "gated attention",
    )
)
