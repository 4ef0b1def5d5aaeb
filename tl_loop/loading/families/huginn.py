"""Huginn / raven checkpoints and the retrofitted-recurrence models that reuse their format.

Both are ``model_type: huginn_raven`` (``RavenForCausalLM``) with the keys
``transformer.{wte, prelude.{j}, adapter, core_block.{j}, coda.{j}, ln_f}``, ``lm_head`` and,
for Huginn, a ``freqs_cis`` RoPE buffer. Execution: ``embed -> prelude -> n_steps x (adapter on
concat(state, prelude_out) -> core_block) -> [ln_f] -> coda -> ln_f -> lm_head``. The families
differ only in the block, told apart by the tensors (the config says ``SandwichBlock`` in both):

==================  =========================================================  ===================
block flavour       checkpoint norm -> our slot                                 tell-tale tensors
==================  =========================================================  ===================
``sandwich``        norm_1 ln1, norm_2 ln_resid_mid, norm_3 ln2, norm_4         ``norm_3``/``norm_4``
(family huginn)     ln_resid_post; qk_bias; interleaved RoPE from ``rope_base``;
                    ln_f also between loop and coda; embed scale
``llama``           norm_1 ln1, norm_2 ln2 (pre-norm); GQA; rotate-half RoPE    two norms per block
(retrofitted)       from ``rope_theta`` + ``rope_scaling`` (or ``rope_parameters``,
                    read by ``_hf_common.rope_from_hf``); no ln_f after loop;
                    untied head; embed scale 1
``olmo``            norm_1 ln1_post, norm_2 ln2_post (output norms);            ``attn.q_norm``,
(retrofitted)       full-width q/k norm; RoPE rotation in float32               ``attn.k_norm``
==================  =========================================================  ===================

Config parsing follows the reference ``RavenConfig``: fields absent from ``config.json`` take its
defaults; ``num_key_value_heads``, ``head_dim`` and ``init_values`` in the file override the
derived values. ``init_values["embed_scale"]`` scales the token embeddings and the random
("like-init") initial state, ``init_values["std"]`` is that state's std. Fields the forward does
not read are kept in ``cfg.extra["config_json"]`` (written back by ``save_pretrained``); values
the loader cannot honour (another injection type, test-time noise, another block / norm / MLP
class, GQA in a Huginn block) raise ``CheckpointError`` naming the field.

Huginn's ``freqs_cis`` buffer is recomputed from ``rope_base`` and compared with the stored one;
a different table raises ``CheckpointError`` (the reference would use the stored table, which
``rope_base`` then fails to describe). A stored ``lm_head.weight`` next to tied embeddings must
equal ``wte`` and is then ignored; when absent the head is tied.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from jaxtyping import Float

from tl_loop.components.rotary import rotary_cos_sin, rotary_inv_freq
from tl_loop.config import LoopedConfig
from tl_loop.errors import CheckpointError, InputError
from tl_loop.loading.families._hf_common import check_field_types, check_steps, rope_from_hf
from tl_loop.loading.registry import Family, register_family
from tl_loop.loading.strict import StrictTensors

logger = logging.getLogger("tl_loop")

MODEL_TYPE = "huginn_raven"

#: ``RavenConfig`` defaults (``raven_config_minimal.py``), used for fields absent from config.json.
RAVEN_DEFAULTS: dict[str, Any] = {
    "n_embd": 5280, "n_heads": 55, "block_size": 4096, "vocab_size": 65536, "tie_embeddings": True,
    "intermediate_size": 17920, "bias": False, "block_class_name": "SandwichBlock",
    "norm_class_name": "RMSNorm_llama", "norm_eps": 1e-6, "mlp_class_name": "GatedMLP",
    "nonlin_name": "SiLU", "state_init": "like-init", "injection_type": "linear",
    "n_layers_in_recurrent_block": 4, "mean_recurrence": 32, "n_layers_in_prelude": 2,
    "n_layers_in_coda": 2, "qk_bias": True, "rope_base": 50_000, "test_time_noise": 0,
}

#: Config values the reference implements; anything else is refused (field -> accepted values).
SUPPORTED_VALUES: dict[str, tuple[Any, ...]] = {
    "injection_type": ("linear",),
    "state_init": ("like-init",),
    "block_class_name": ("SandwichBlock",),  # retrofitted configs carry Huginn's value too
    "norm_class_name": ("RMSNorm_llama",),
    "mlp_class_name": ("GatedMLP",),
    "nonlin_name": ("SiLU",),
}

#: Fields turned into ``LoopedConfig`` values (everything else goes to ``cfg.extra``).
CONSUMED = {
    "model_type", "n_embd", "hidden_size", "n_heads", "num_attention_heads", "num_key_value_heads",
    "head_dim", "intermediate_size", "vocab_size", "padded_vocab_size", "n_layers_in_prelude",
    "n_layers_in_recurrent_block", "n_layers_in_coda", "mean_recurrence", "norm_eps", "bias",
    "qk_bias", "tie_embeddings", "tie_word_embeddings", "init_values", "test_time_noise", "dtype",
    "torch_dtype", "n_layers", "effective_expected_depth",
    *SUPPORTED_VALUES,
}
#: RoPE / context fields each family reads (the other family's are informational leftovers).
ROPE_FIELDS = {"huginn": {"block_size", "rope_base"},
               "retrofitted": {"max_position_embeddings", "rope_theta", "rope_scaling", "rope_parameters"}}

#: ``LoopedConfig`` values shared by every raven checkpoint.
COMMON_LAYOUT: dict[str, Any] = dict(
    positional_embedding_type="rotary", norm_type="RMS", norm_weights=True, act_fn="silu",
    gated_mlp=True, mlp_layout="fused", mlp_bias=False, qkv_layout="fused", v_bias=False,
    o_bias=False, attn_output_gate=False, attn_scale=None, rotary_dim=None, injection="linear",
    norm_between_steps=False, loop_norm_weights="ln_final", n_inner_layers=0, inner_cycles=0,
    unembed_bias=False, exit_gate=False,
)


@dataclass(frozen=True)
class Flavour:
    """One block flavour: the family it belongs to, its norm names and its fixed config values."""

    name: str
    family: str
    norms: dict[str, str]  # checkpoint norm (``norm_1``) -> our norm slot (``ln1``)
    layout: dict[str, Any] = field(default_factory=dict)  # LoopedConfig values it fixes

    @property
    def is_huginn(self) -> bool:
        return self.family == "huginn"


SANDWICH = Flavour(
    "sandwich", "huginn",
    {"norm_1": "ln1", "norm_2": "ln_resid_mid", "norm_3": "ln2", "norm_4": "ln_resid_post"},
    dict(pre_norm=True, output_norm=False, resid_norm=True, qk_norm=False, norm_after_loop=True,
         rotary_layout="interleaved", rope_in_float32=True, rope_scaling=None),
)
LLAMA = Flavour(
    "llama", "retrofitted", {"norm_1": "ln1", "norm_2": "ln2"},
    dict(pre_norm=True, output_norm=False, resid_norm=False, qk_norm=False, qk_bias=False,
         norm_after_loop=False, rotary_layout="half", rope_in_float32=False),
)
OLMO = Flavour(
    "olmo", "retrofitted", {"norm_1": "ln1_post", "norm_2": "ln2_post"},
    dict(pre_norm=False, output_norm=True, resid_norm=False, qk_norm=True, qk_bias=False,
         norm_after_loop=False, rotary_layout="half", rope_in_float32=True),
)

#: Our physical stack -> the checkpoint's module list.
STACKS = {"prelude": "transformer.prelude", "core": "transformer.core_block", "coda": "transformer.coda"}


# ---------------------------------------------------------------------------------- detection
def _has_sandwich_norms(tensor_names: set[str]) -> bool:
    return any(n.endswith((".norm_3.weight", ".norm_4.weight")) for n in tensor_names)


def _has_qk_norm(tensor_names: set[str]) -> bool:
    return any(n.endswith(".attn.q_norm.weight") for n in tensor_names)


def _is_huginn(config_json: Mapping[str, Any], tensor_names: set[str]) -> bool:
    """Sandwich norms in the tensors; without them (a damaged Huginn checkpoint) a config with
    Huginn's context field only (retrofitted configs add ``max_position_embeddings``)."""
    if _has_sandwich_norms(tensor_names):
        return True
    return "max_position_embeddings" not in config_json and not _has_qk_norm(tensor_names)


def _detect(family: str, config_json: Mapping[str, Any], tensor_names: set[str]) -> bool:
    if config_json.get("model_type") != MODEL_TYPE:
        return False
    return _is_huginn(config_json, tensor_names) == (family == "huginn")


def _flavour_from_tensors(family: str, config_json: Mapping[str, Any], tensor_names: set[str]) -> Flavour:
    """The block flavour; a Huginn checkpoint lacking some norms is read as Huginn (the missing
    tensors are then reported by name)."""
    sandwich = _has_sandwich_norms(tensor_names)
    if family == "huginn" and not _is_huginn(config_json, tensor_names):
        raise CheckpointError(
            "family 'huginn' expects sandwich blocks (norm_1..norm_4), but the checkpoint has no "
            "norm_3/norm_4 tensors and its config.json has the retrofitted models' "
            "max_position_embeddings; a retrofitted-recurrence checkpoint? try family='retrofitted'"
        )
    if family == "retrofitted" and sandwich:
        raise CheckpointError(
            "family 'retrofitted' expects two norms per block, but the checkpoint has norm_3/norm_4 "
            "tensors (Huginn sandwich blocks); try family='huginn'"
        )
    if family == "huginn":
        return SANDWICH
    return OLMO if _has_qk_norm(tensor_names) else LLAMA


def _flavour_of(cfg: LoopedConfig, family: str) -> Flavour:
    if family == "huginn":
        return SANDWICH
    return OLMO if cfg.output_norm or cfg.qk_norm else LLAMA


# ---------------------------------------------------------------------------------- config
def _value(raw: Mapping[str, Any], kind: type, *names: str) -> Any:
    """The first of ``names`` present in ``raw`` (else the RavenConfig default), type-checked."""
    for name in names:
        if name in raw:
            value = raw[name]
            break
    else:
        name = next((n for n in names if n in RAVEN_DEFAULTS), names[0])
        if name not in RAVEN_DEFAULTS:
            raise CheckpointError(f"config.json has no {name!r} (needed to build the model)")
        value = RAVEN_DEFAULTS[name]
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise CheckpointError(f"config.json field {name!r} must be {kind.__name__}, got {value!r}")
    return value


def _init_values(raw: Mapping[str, Any], d_model: int) -> tuple[float, float]:
    """``(std, embed_scale)`` from ``init_values``, derived from ``n_embd`` where absent."""
    values = raw.get("init_values") or {}
    if not isinstance(values, Mapping):
        raise CheckpointError(f"config.json field 'init_values' must be a dict, got {values!r}")
    std = values.get("std", math.sqrt(2 / (5 * d_model)))
    scale = values.get("embed_scale", math.sqrt(d_model))
    for key, v in (("std", std), ("embed_scale", scale)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf:
            raise CheckpointError(f"config.json field 'init_values.{key}' must be a finite number >= 0, got {v!r}")
    return float(std), float(scale)


def _to_config(
    family: str, config_json: Mapping[str, Any], tensor_names: set[str], **options: Any
) -> LoopedConfig:
    """Build the ``LoopedConfig`` of a raven checkpoint (``family`` huginn or retrofitted)."""
    if options:
        raise InputError(f"family {family!r} takes no loading options, got {sorted(options)}")
    raw = dict(config_json)
    if raw.get("model_type") != MODEL_TYPE:
        raise CheckpointError(
            f"family {family!r} reads model_type {MODEL_TYPE!r}, config.json says {raw.get('model_type')!r}"
        )
    check_field_types(raw, family)
    flavour = _flavour_from_tensors(family, raw, tensor_names)
    for name, accepted in SUPPORTED_VALUES.items():
        value = raw.get(name, RAVEN_DEFAULTS[name])
        if value not in accepted:
            raise CheckpointError(
                f"config.json field {name!r} = {value!r} is not supported (supported: {list(accepted)})"
            )
    noise = raw.get("test_time_noise", 0)
    if noise not in (0, None, False):
        raise CheckpointError(
            f"config.json field 'test_time_noise' = {noise!r}: test-time noise is not supported (needs 0)"
        )

    d_model = _value(raw, int, "n_embd", "hidden_size")
    n_heads = _value(raw, int, "n_heads", "num_attention_heads")
    if n_heads <= 0 or d_model % n_heads:
        raise CheckpointError(f"config.json: n_embd ({d_model}) must be a multiple of n_heads ({n_heads})")
    n_kv = raw.get("num_key_value_heads", n_heads)
    d_head = raw.get("head_dim", d_model // n_heads)
    for name, v in (("num_key_value_heads", n_kv), ("head_dim", d_head)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise CheckpointError(f"config.json field {name!r} must be a positive int, got {v!r}")
    if n_heads % n_kv:
        raise CheckpointError(
            f"config.json: n_heads ({n_heads}) must be a multiple of num_key_value_heads ({n_kv})"
        )
    tie = _value(raw, bool, "tie_embeddings")
    if "tie_word_embeddings" in raw and raw["tie_word_embeddings"] != tie:
        raise CheckpointError(
            f"config.json fields 'tie_embeddings' ({tie}) and 'tie_word_embeddings' "
            f"({raw['tie_word_embeddings']}) disagree"
        )
    std, embed_scale = _init_values(raw, d_model)
    values: dict[str, Any] = dict(
        d_model=d_model, n_heads=n_heads, n_key_value_heads=n_kv, d_head=d_head,
        d_mlp=_value(raw, int, "intermediate_size"),
        d_vocab=_value(raw, int, "padded_vocab_size", "vocab_size"),  # wte is padded_vocab_size
        n_prelude_layers=_value(raw, int, "n_layers_in_prelude"),
        n_core_layers=_value(raw, int, "n_layers_in_recurrent_block"),
        n_coda_layers=_value(raw, int, "n_layers_in_coda"),
        n_steps=_value(raw, int, "mean_recurrence"),
        eps=_value(raw, float, "norm_eps"),
        adapter_bias=_value(raw, bool, "bias"),
        tie_embeddings=tie,
        embed_scale=embed_scale,
        state_init="random" if std > 0 else "zeros",  # the reference zeroes the state when std == 0
        state_init_std=std,
        state_init_scale=embed_scale,
    )
    check_steps(values["n_steps"], "mean_recurrence", family)
    if flavour.is_huginn:
        if n_kv != n_heads:
            raise CheckpointError(
                f"config.json field 'num_key_value_heads' = {n_kv}: Huginn blocks need it equal to "
                f"n_heads ({n_heads})"
            )
        if d_head * n_heads != d_model:
            raise CheckpointError(
                f"config.json field 'head_dim' = {d_head}: Huginn blocks need n_embd / n_heads = "
                f"{d_model // n_heads}"
            )
        for name in ("rope_scaling", "rope_parameters"):
            if raw.get(name) is not None:
                logger.warning("ignoring %s in a Huginn config: the reference uses rope_base only", name)
        values.update(qk_bias=_value(raw, bool, "qk_bias"), n_ctx=_value(raw, int, "block_size"),
                      rotary_base=_value(raw, float, "rope_base"))
    else:
        if raw.get("qk_bias", False):
            raise CheckpointError("config.json field 'qk_bias' = true: retrofitted blocks have no q/k bias")
        if "max_position_embeddings" not in raw:
            raise CheckpointError(
                "config.json has no 'max_position_embeddings' (the context of a retrofitted model)"
            )
        rotary_base, rope_scaling = rope_from_hf(raw, family, default_theta=None)  # not rope_base
        values.update(n_ctx=_value(raw, int, "max_position_embeddings"), rotary_base=rotary_base,
                      rope_scaling=rope_scaling)
    informational = {k: v for k, v in raw.items() if k not in CONSUMED | ROPE_FIELDS[family]}
    # kept for save_pretrained: the true vocabulary size and init_values' unused entries (out_proj, ...)
    informational.update({k: raw[k] for k in ("vocab_size", "init_values") if k in raw})
    try:
        return LoopedConfig(
            **COMMON_LAYOUT, **flavour.layout, **values, family=family,
            model_name=str(raw.get("_name_or_path") or family),
            extra={"block_flavour": flavour.name, "config_json": informational},
        )
    except ValueError as e:
        raise CheckpointError(f"config.json describes a model tl_loop cannot build: {e}") from e


# ---------------------------------------------------------------------------------- tensor names
def tensor_map(cfg: LoopedConfig, flavour: Flavour) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Our state-dict name -> (checkpoint name, shape) for every tensor copied one to one.

    ``qk_bias`` (two of ours in one tensor), the tied head and ``freqs_cis`` are handled apart.
    """
    assert cfg.n_key_value_heads is not None and cfg.d_mlp is not None
    e, q, kv = cfg.d_model, cfg.n_heads * cfg.d_head, cfg.n_key_value_heads * cfg.d_head
    out: dict[str, tuple[str, tuple[int, ...]]] = {
        "embed.W_E": ("transformer.wte.weight", (cfg.d_vocab, e)),
        "adapter.weight": ("transformer.adapter.weight", (e, 2 * e)),
        "final_norm.w": ("transformer.ln_f.weight", (e,)),
    }
    if cfg.adapter_bias:
        out["adapter.bias"] = ("transformer.adapter.bias", (e,))
    if not cfg.tie_embeddings:
        out["unembed.weight"] = ("lm_head.weight", (cfg.d_vocab, e))
    counts = {"prelude": cfg.n_prelude_layers, "core": cfg.n_core_layers, "coda": cfg.n_coda_layers}
    for stack, prefix in STACKS.items():
        for j in range(counts[stack]):
            ours, theirs = f"{stack}.{j}", f"{prefix}.{j}"
            out[f"{ours}.attn.w_qkv"] = (f"{theirs}.attn.Wqkv.weight", (q + 2 * kv, e))
            out[f"{ours}.attn.w_o"] = (f"{theirs}.attn.proj.weight", (e, q))
            out[f"{ours}.mlp.w_gate_up"] = (f"{theirs}.mlp.fc.weight", (2 * cfg.d_mlp, e))  # [gate; up]
            out[f"{ours}.mlp.w_out"] = (f"{theirs}.mlp.proj.weight", (e, cfg.d_mlp))
            for norm, slot in flavour.norms.items():
                out[f"{ours}.{slot}.w"] = (f"{theirs}.{norm}.weight", (e,))
            if cfg.qk_norm:
                out[f"{ours}.attn.q_norm.w"] = (f"{theirs}.attn.q_norm.weight", (q,))
                out[f"{ours}.attn.k_norm.w"] = (f"{theirs}.attn.k_norm.weight", (kv,))
    return out


def _qk_bias_names(cfg: LoopedConfig) -> dict[str, str]:
    """Our block prefix -> checkpoint ``qk_bias`` name (``[2, 1, heads, head_dim]``: q, k)."""
    if not cfg.qk_bias:
        return {}
    counts = {"prelude": cfg.n_prelude_layers, "core": cfg.n_core_layers, "coda": cfg.n_coda_layers}
    return {f"{s}.{j}": f"{p}.{j}.attn.qk_bias" for s, p in STACKS.items() for j in range(counts[s])}


def rope_table(cfg: LoopedConfig) -> Float[torch.Tensor, "1 n_ctx 1 half_head 2"]:
    """Huginn's ``freqs_cis`` buffer: float32 (cos, sin) for every position up to ``n_ctx``."""
    cos, sin = rotary_cos_sin(cfg.n_ctx, rotary_inv_freq(cfg.d_head, cfg.rotary_base))
    return torch.stack([cos, sin], dim=-1)[None, :, None]


# ---------------------------------------------------------------------------------- convert
def _convert(family: str, strict: StrictTensors, cfg: LoopedConfig) -> dict[str, torch.Tensor]:
    """Checkpoint tensors -> our state dict (problems are collected by ``strict``)."""
    flavour = _flavour_of(cfg, family)

    def take(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        t = strict.take(name, shape)
        return t if tuple(t.shape) == shape else torch.zeros(shape)  # a wrong shape is reported by finish()

    state = {ours: take(theirs, shape) for ours, (theirs, shape) in tensor_map(cfg, flavour).items()}
    for block, name in _qk_bias_names(cfg).items():
        bias = take(name, (2, 1, cfg.n_heads, cfg.d_head))
        state[f"{block}.attn.b_q"] = bias[0].reshape(-1)
        state[f"{block}.attn.b_k"] = bias[1].reshape(-1)
    if cfg.tie_embeddings and "lm_head.weight" in strict:
        head, wte = strict.tensors["lm_head.weight"], state["embed.W_E"]
        if head.shape != wte.shape or not torch.equal(head, wte.to(head.dtype)):
            raise CheckpointError(
                "lm_head.weight differs from transformer.wte.weight, but config.json ties the embeddings "
                "(tie_embeddings: true)"
            )
        strict.ignore("lm_head.weight")  # the duplicate copy Huginn's Hub files hold
    if flavour.is_huginn and "freqs_cis" in strict:
        expected = rope_table(cfg)
        stored = strict.take("freqs_cis", tuple(expected.shape))
        if stored.shape == expected.shape:
            tol = max(1e-5, 2 * torch.finfo(stored.dtype).eps) if stored.is_floating_point() else 0.0
            diff = (stored.float() - expected).abs().max().item()
            if not diff <= tol:
                raise CheckpointError(
                    f"freqs_cis in the checkpoint differs from the RoPE table recomputed from rope_base="
                    f"{cfg.rotary_base} and head_dim={cfg.d_head} (max abs difference {diff:.3g}); "
                    "tl_loop recomputes RoPE and cannot reproduce this table"
                )
    return state


# ---------------------------------------------------------------------------------- export
def _check_exportable(cfg: LoopedConfig, family: str, flavour: Flavour) -> None:
    wanted = {**COMMON_LAYOUT, **flavour.layout}
    wrong = [f"{k}={getattr(cfg, k)!r} (needs {v!r})" for k, v in wanted.items() if getattr(cfg, k) != v]
    if cfg.state_init not in ("random", "zeros"):
        wrong.append(f"state_init={cfg.state_init!r} (needs 'random')")
    if cfg.state_init == "random" and cfg.state_init_scale != cfg.embed_scale:
        wrong.append(f"state_init_scale={cfg.state_init_scale} (needs embed_scale={cfg.embed_scale})")
    mha = cfg.n_key_value_heads == cfg.n_heads and cfg.n_heads * cfg.d_head == cfg.d_model
    if flavour.is_huginn and not mha:
        wrong.append("GQA or n_heads * d_head != d_model (Huginn blocks have neither)")
    if wrong:
        raise CheckpointError(f"this model cannot be saved as a {family!r} checkpoint: " + "; ".join(wrong))


def _export(family: str, model: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(config_json, tensors)`` in the raven format (``save_pretrained``)."""
    cfg: LoopedConfig = model.cfg
    flavour = _flavour_of(cfg, family)
    _check_exportable(cfg, family, flavour)
    sd = model.state_dict()
    tensors = {theirs: sd[ours] for ours, (theirs, _) in tensor_map(cfg, flavour).items()}
    for block, name in _qk_bias_names(cfg).items():
        q, k = sd[f"{block}.attn.b_q"], sd[f"{block}.attn.b_k"]
        tensors[name] = torch.stack([q, k]).view(2, 1, cfg.n_heads, cfg.d_head)
    if flavour.is_huginn:
        tensors["freqs_cis"] = rope_table(cfg)

    kept = dict(cfg.extra.get("config_json", {})) if cfg.family == family else {}
    std = float(cfg.state_init_std) if cfg.state_init == "random" else 0.0  # type: ignore[arg-type]
    init_values = {"embedding": std, **kept.pop("init_values", {})}  # out_proj etc. are informational
    init_values.update(std=std, embed_scale=cfg.embed_scale)
    n_physical = cfg.n_prelude_layers + cfg.n_core_layers + cfg.n_coda_layers
    config: dict[str, Any] = {
        "architectures": ["RavenForCausalLM"],
        **kept,
        "model_type": MODEL_TYPE,
        "dtype": str(cfg.dtype).removeprefix("torch."),
        "n_layers": n_physical,
        "effective_expected_depth": cfg.effective_depth(cfg.n_steps),
        **{name: accepted[0] for name, accepted in SUPPORTED_VALUES.items()},
        "test_time_noise": 0,
        "n_embd": cfg.d_model, "n_heads": cfg.n_heads, "num_key_value_heads": cfg.n_key_value_heads,
        "head_dim": cfg.d_head, "intermediate_size": cfg.d_mlp,
        "vocab_size": min(kept.get("vocab_size", cfg.d_vocab), cfg.d_vocab), "padded_vocab_size": cfg.d_vocab,
        "n_layers_in_prelude": cfg.n_prelude_layers, "n_layers_in_recurrent_block": cfg.n_core_layers,
        "n_layers_in_coda": cfg.n_coda_layers, "mean_recurrence": cfg.n_steps, "norm_eps": cfg.eps,
        "bias": cfg.adapter_bias, "qk_bias": cfg.qk_bias,
        "tie_embeddings": cfg.tie_embeddings, "tie_word_embeddings": cfg.tie_embeddings,
        "init_values": init_values,
    }
    if flavour.is_huginn:
        config.update(block_size=cfg.n_ctx, rope_base=cfg.rotary_base)
    else:
        config.update(max_position_embeddings=cfg.n_ctx, rope_theta=cfg.rotary_base,
                      rope_scaling=cfg.rope_scaling)
    return config, tensors


for _family, _description in (
    ("huginn", "Huginn-0125 / raven (sandwich blocks, qk bias, interleaved RoPE, ln_f after the loop)"),
    ("retrofitted", "retrofitted recurrence (McLeish et al. 2025): Llama or OLMo-2 blocks, raven format"),
):
    register_family(Family(
        name=_family,
        detect=partial(_detect, _family),
        to_config=partial(_to_config, _family),
        convert=partial(_convert, _family),
        export=partial(_export, _family),
        description=_description,
    ))
