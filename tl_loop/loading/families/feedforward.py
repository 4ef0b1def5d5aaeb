"""Any feedforward checkpoint, looped: Llama, Qwen2, Mistral, OLMo-2 and GPT-2 layouts.

A plain transformer's layer stack is cut into prelude / core / coda; the core is run
``n_steps`` times with shared weights::

    model = HookedLoopedTransformer.from_pretrained(path, layout="2,4,2", n_steps=3)
    model = HookedLoopedTransformer.from_pretrained(
        path, layout={"prelude": [0, 1], "core": [2, 3, 4, 5], "coda": [6, 7]})

``layout`` is ``"p,c,d"`` / ``(p, c, d)`` (layer counts) or a dict of contiguous layer lists
that together cover ``0 .. n_layers - 1`` in order. The default loops the whole stack once:
with ``n_steps=1`` (the default), ``injection="none"`` and ``state_init="prelude"`` (the
defaults) every layout computes exactly the original model.

Options: ``layout``, ``injection`` (``"none"`` | ``"add"``: add the prelude output to the state
before every step), ``state_init`` (``"prelude"`` | ``"zeros"`` | ``"random"``),
``state_init_std`` / ``state_init_scale`` / ``state_init_seed``, ``max_steps``.

Not supported (a clear error instead of a wrong model): rope types other than default, linear
and llama3; Llama ``mlp_bias``; GPT-2 ``scale_attn_by_inverse_layer_idx``. Sliding-window
attention (Mistral, Qwen2 with ``use_sliding_window``) is exact up to the window, so ``n_ctx``
is capped at the window length.

``save_pretrained`` writes the original family's format (``config.json`` +
``model.safetensors``, loadable by ``transformers``); loop settings other than the defaults
are recorded under a ``"tl_loop"`` key of ``config.json``, which ``transformers`` ignores and
this loader reads back.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

import torch

from tl_loop.config import DEFAULT_MAX_STEPS, LoopedConfig
from tl_loop.errors import CheckpointError, InputError
from tl_loop.loading.families._hf_common import check_activation, check_field_types, check_steps, rope_from_hf
from tl_loop.loading.registry import Family, register_family
from tl_loop.loading.strict import StrictTensors

logger = logging.getLogger("tl_loop")

LLAMA_LIKE = ("llama", "qwen2", "mistral", "olmo2")
MODEL_TYPES = (*LLAMA_LIKE, "gpt2")
STAGES = ("prelude", "core", "coda")
METADATA_KEY = "tl_loop"

#: Loop options (``LoopedConfig`` fields). Their ``LoopedConfig`` defaults reproduce the original
#: model: ``injection="none"``, ``state_init="prelude"``.
LOOP_OPTIONS = (
    "injection", "state_init", "state_init_std", "state_init_scale", "state_init_seed", "max_steps",
)

# ---------------------------------------------------------------------------------------- layout
def parse_layout(layout: Any, n_layers: int) -> tuple[int, int, int]:
    """``(n_prelude, n_core, n_coda)`` from a layout option (see the module docstring).

    >>> parse_layout("2,4,2", 8), parse_layout(None, 8)
    ((2, 4, 2), (0, 8, 0))
    >>> parse_layout({"prelude": [0], "core": range(1, 3), "coda": [3]}, 4)
    (1, 2, 1)
    """
    if layout is None:
        return 0, n_layers, 0
    if isinstance(layout, Mapping):
        return _parse_layout_dict(layout, n_layers)
    if isinstance(layout, str):
        parts = [p.strip() for p in layout.split(",")]
        try:
            counts = [int(p) for p in parts]
        except ValueError:
            raise InputError(
                f"layout {layout!r}: expected three comma-separated layer counts 'prelude,core,coda' "
                "such as '2,4,2'"
            ) from None
    elif isinstance(layout, (list, tuple)) and all(type(c) is int for c in layout):
        counts = list(layout)
    else:
        raise InputError(
            f"layout must be 'p,c,d', a (p, c, d) tuple of layer counts or a dict "
            f"{{'prelude': [...], 'core': [...], 'coda': [...]}}, got {layout!r}"
        )
    if len(counts) != 3:
        raise InputError(
            f"layout {layout!r}: expected 3 layer counts (prelude, core, coda), got {len(counts)}"
        )
    p, c, d = counts
    if min(counts) < 0:
        raise InputError(f"layout {layout!r}: layer counts must be >= 0")
    if c < 1:
        raise InputError(f"layout {layout!r}: the looped core needs at least one layer")
    if p + c + d != n_layers:
        raise InputError(
            f"layout {layout!r} covers {p + c + d} layers but the checkpoint has {n_layers}: "
            "prelude + core + coda must add up to every layer"
        )
    return p, c, d


def _parse_layout_dict(layout: Mapping[str, Any], n_layers: int) -> tuple[int, int, int]:
    unknown = sorted(set(layout) - set(STAGES))
    if unknown:
        raise InputError(f"layout has unknown keys {unknown}; use 'prelude', 'core' and 'coda'")
    stages: dict[str, list[int]] = {}
    for stage in STAGES:
        raw = layout.get(stage, [])
        try:
            if isinstance(raw, (str, bytes)):
                raise TypeError
            idx = [int(i) for i in raw]
        except (TypeError, ValueError):
            raise InputError(f"layout[{stage!r}] must be a list of layer indices, got {raw!r}") from None
        if any(i < 0 or i >= n_layers for i in idx):
            raise InputError(f"layout[{stage!r}] = {idx}: layer indices must lie in [0, {n_layers})")
        if idx and idx != list(range(idx[0], idx[0] + len(idx))):
            raise InputError(f"layout[{stage!r}] = {idx} is not a contiguous increasing run of layers")
        stages[stage] = idx
    if not stages["core"]:
        raise InputError("layout: the looped core needs at least one layer")
    order = stages["prelude"] + stages["core"] + stages["coda"]
    if order != list(range(n_layers)):
        seen = set(order)
        missing = sorted(set(range(n_layers)) - seen)
        twice = sorted({i for i in order if order.count(i) > 1})
        detail = []
        if missing:
            detail.append(f"layers {missing} are in no stage")
        if twice:
            detail.append(f"layers {twice} are in more than one stage")
        if not detail:
            detail.append("the stages are out of order")
        raise InputError(
            f"layout {dict(stages)} must split layers 0..{n_layers - 1} into prelude, core and coda "
            f"in order: {'; '.join(detail)}"
        )
    return len(stages["prelude"]), len(stages["core"]), len(stages["coda"])


def _stage_of(layer: int, cfg: LoopedConfig) -> str:
    """Our name of original layer ``layer``, e.g. ``core.1``."""
    p, c = cfg.n_prelude_layers, cfg.n_core_layers
    if layer < p:
        return f"prelude.{layer}"
    if layer < p + c:
        return f"core.{layer - p}"
    return f"coda.{layer - p - c}"


def _n_layers(cfg: LoopedConfig) -> int:
    return cfg.n_prelude_layers + cfg.n_core_layers + cfg.n_coda_layers


# ---------------------------------------------------------------------------------------- config
def detect(config_json: Mapping[str, Any], tensor_names: set[str]) -> bool:
    return config_json.get("model_type") in MODEL_TYPES


def _need(config_json: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if config_json.get(key) is not None:
            return config_json[key]
    raise CheckpointError(f"config.json lacks {' / '.join(keys)}")


def to_config(config_json: Mapping[str, Any], tensor_names: set[str], **options: Any) -> LoopedConfig:
    """``LoopedConfig`` of a feedforward checkpoint cut by ``layout`` (see the module docstring)."""
    model_type = config_json.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(
            f"the feedforward family reads model_type {list(MODEL_TYPES)}, got {model_type!r}"
        )
    check_field_types(config_json, str(model_type))
    saved = config_json.get(METADATA_KEY) or {}
    if not isinstance(saved, Mapping):
        raise CheckpointError(f"config.json field {METADATA_KEY!r} must be an object, got {saved!r}")
    saved = dict(saved)
    allowed = ("layout", *LOOP_OPTIONS)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise InputError(f"unknown option(s) {unknown} for the feedforward family; options: {list(allowed)}")
    opts = {**{k: v for k, v in saved.items() if k != "n_steps"}, **options}
    if opts.get("injection", "none") not in ("none", "add"):
        raise InputError(
            f"injection={opts['injection']!r}: a feedforward checkpoint has no adapter weights; "
            "use 'none' (default) or 'add'"
        )
    if opts.get("state_init", "prelude") not in ("prelude", "zeros", "random"):
        raise InputError(f"state_init={opts['state_init']!r}: use 'prelude' (default), 'zeros' or 'random'")
    loop = {k: opts[k] for k in LOOP_OPTIONS if opts.get(k) is not None}
    n_steps = saved.get("n_steps", 1)
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 0:
        raise CheckpointError(f"config.json field '{METADATA_KEY}.n_steps' must be an integer >= 0, got {n_steps!r}")
    check_steps(n_steps, f"{METADATA_KEY}.n_steps", str(model_type), loop.get("max_steps", DEFAULT_MAX_STEPS))

    if model_type == "gpt2":
        common = _gpt2_fields(config_json)
    else:
        common = _llama_fields(config_json, model_type)
    n_layers = common.pop("n_layers")
    p, c, d = parse_layout(opts.get("layout"), n_layers)
    hf_config = {k: v for k, v in config_json.items() if k != METADATA_KEY}
    prefix = _prefix(model_type, tensor_names)
    return LoopedConfig(
        **common,
        n_prelude_layers=p,
        n_core_layers=c,
        n_coda_layers=d,
        n_steps=n_steps,
        **loop,
        family="feedforward",
        model_name=str(config_json.get("_name_or_path") or model_type),
        extra={"model_type": model_type, "prefix": prefix, "hf_config": hf_config},
    )


def _llama_fields(cj: Mapping[str, Any], model_type: str) -> dict[str, Any]:
    d_model = int(_need(cj, "hidden_size"))
    n_heads = int(_need(cj, "num_attention_heads"))
    if cj.get("head_dim") is None and d_model % n_heads:
        raise CheckpointError(f"{model_type} config.json: hidden_size={d_model} is not a multiple of "
                              f"num_attention_heads={n_heads} and head_dim is not given")
    d_head = int(cj.get("head_dim") or d_model // n_heads)
    if cj.get("mlp_bias"):
        raise CheckpointError("mlp_bias=True (biases on a gated MLP) is not supported")
    theta, scaling = rope_from_hf(cj, model_type)
    n_ctx = int(cj.get("max_position_embeddings") or 2048)
    window = cj.get("sliding_window")
    sliding_layers = "sliding_attention" in (cj.get("layer_types") or [])
    qwen_window = model_type == "qwen2" and (cj.get("use_sliding_window") or sliding_layers)
    uses_window = window is not None and (model_type == "mistral" or qwen_window)
    if uses_window and int(window) < n_ctx:
        logger.info("sliding-window attention: n_ctx capped at the window (%d tokens)", window)
        n_ctx = int(window)
    attn_bias = bool(cj.get("attention_bias", False))
    qkv_bias = model_type == "qwen2" or attn_bias
    olmo = model_type == "olmo2"
    return dict(
        n_layers=int(_need(cj, "num_hidden_layers")),
        d_model=d_model,
        d_head=d_head,
        n_heads=n_heads,
        n_key_value_heads=int(cj.get("num_key_value_heads") or n_heads),
        d_mlp=int(_need(cj, "intermediate_size")),
        d_vocab=int(_need(cj, "vocab_size")),
        n_ctx=n_ctx,
        positional_embedding_type="rotary",
        norm_type="RMS",
        eps=float(cj.get("rms_norm_eps", 1e-6)),
        act_fn=check_activation(cj, model_type),
        gated_mlp=True,
        qkv_layout="split",
        mlp_layout="split",
        qk_bias=qkv_bias,
        v_bias=qkv_bias,
        o_bias=attn_bias,
        qk_norm=olmo,
        pre_norm=not olmo,
        output_norm=olmo,
        rotary_layout="half",
        rotary_base=theta,
        rope_scaling=scaling,
        rope_in_float32=olmo,  # OLMo-2 keeps cos/sin in float32; Llama casts them to the model dtype
        tie_embeddings=bool(cj.get("tie_word_embeddings", False)),
    )


def _gpt2_fields(cj: Mapping[str, Any]) -> dict[str, Any]:
    if cj.get("scale_attn_by_inverse_layer_idx"):
        raise CheckpointError("GPT-2 scale_attn_by_inverse_layer_idx=True is not supported")
    if cj.get("add_cross_attention"):
        raise CheckpointError("GPT-2 with cross-attention is not a decoder-only LM")
    d_model = int(_need(cj, "n_embd", "hidden_size"))
    n_heads = int(_need(cj, "n_head", "num_attention_heads"))
    if d_model % n_heads:
        raise CheckpointError(f"n_embd ({d_model}) is not a multiple of n_head ({n_heads})")
    d_head = d_model // n_heads
    return dict(
        n_layers=int(_need(cj, "n_layer", "num_hidden_layers")),
        d_model=d_model,
        d_head=d_head,
        n_heads=n_heads,
        d_mlp=int(cj.get("n_inner") or 4 * d_model),
        d_vocab=int(_need(cj, "vocab_size")),
        n_ctx=int(_need(cj, "n_positions", "n_ctx")),
        positional_embedding_type="standard",
        norm_type="LN",
        eps=float(cj.get("layer_norm_epsilon", 1e-5)),
        act_fn=check_activation(cj, "gpt2", key="activation_function", default="gelu_new"),
        gated_mlp=False,
        mlp_bias=True,
        qkv_layout="fused",
        qk_bias=True,
        v_bias=True,
        o_bias=True,
        attn_scale=None if cj.get("scale_attn_weights", True) else 1.0,
        tie_embeddings=bool(cj.get("tie_word_embeddings", True)),
    )


def _prefix(model_type: str, names: set[str]) -> str:
    """Key prefix of the checkpoint (``model.`` / ``transformer.`` for *ForCausalLM, else none)."""
    if model_type == "gpt2":
        return "transformer." if "transformer.wte.weight" in names else ""
    return "model." if "model.embed_tokens.weight" in names else ""


# ---------------------------------------------------------------------------------------- tensors
def _llama_names(cfg: LoopedConfig, prefix: str) -> dict[str, str]:
    """Our state-dict name -> checkpoint name (every tensor but the unembedding)."""
    names = {"embed.W_E": f"{prefix}embed_tokens.weight", "final_norm.w": f"{prefix}norm.weight"}
    olmo = cfg.qk_norm
    for layer in range(_n_layers(cfg)):
        ours, hf = _stage_of(layer, cfg), f"{prefix}layers.{layer}"
        for x in ("q", "k", "v"):
            names[f"{ours}.attn.w_{x}"] = f"{hf}.self_attn.{x}_proj.weight"
        names[f"{ours}.attn.w_o"] = f"{hf}.self_attn.o_proj.weight"
        if cfg.qk_bias:
            names[f"{ours}.attn.b_q"] = f"{hf}.self_attn.q_proj.bias"
            names[f"{ours}.attn.b_k"] = f"{hf}.self_attn.k_proj.bias"
        if cfg.v_bias:
            names[f"{ours}.attn.b_v"] = f"{hf}.self_attn.v_proj.bias"
        if cfg.o_bias:
            names[f"{ours}.attn.b_o"] = f"{hf}.self_attn.o_proj.bias"
        if olmo:
            names[f"{ours}.attn.q_norm.w"] = f"{hf}.self_attn.q_norm.weight"
            names[f"{ours}.attn.k_norm.w"] = f"{hf}.self_attn.k_norm.weight"
            names[f"{ours}.ln1_post.w"] = f"{hf}.post_attention_layernorm.weight"
            names[f"{ours}.ln2_post.w"] = f"{hf}.post_feedforward_layernorm.weight"
        else:
            names[f"{ours}.ln1.w"] = f"{hf}.input_layernorm.weight"
            names[f"{ours}.ln2.w"] = f"{hf}.post_attention_layernorm.weight"
        names[f"{ours}.mlp.w_gate"] = f"{hf}.mlp.gate_proj.weight"
        names[f"{ours}.mlp.w_up"] = f"{hf}.mlp.up_proj.weight"
        names[f"{ours}.mlp.w_out"] = f"{hf}.mlp.down_proj.weight"
    return names


def _gpt2_names(cfg: LoopedConfig, prefix: str) -> dict[str, tuple[str, bool]]:
    """Our name -> (checkpoint name, Conv1D-transposed). The fused q/k/v bias is handled apart."""
    names = {
        "embed.W_E": (f"{prefix}wte.weight", False),
        "pos_embed.W_pos": (f"{prefix}wpe.weight", False),
        "final_norm.w": (f"{prefix}ln_f.weight", False),
        "final_norm.b": (f"{prefix}ln_f.bias", False),
    }
    for layer in range(_n_layers(cfg)):
        ours, hf = _stage_of(layer, cfg), f"{prefix}h.{layer}"
        names.update({
            f"{ours}.ln1.w": (f"{hf}.ln_1.weight", False),
            f"{ours}.ln1.b": (f"{hf}.ln_1.bias", False),
            f"{ours}.ln2.w": (f"{hf}.ln_2.weight", False),
            f"{ours}.ln2.b": (f"{hf}.ln_2.bias", False),
            f"{ours}.attn.w_qkv": (f"{hf}.attn.c_attn.weight", True),
            f"{ours}.attn.w_o": (f"{hf}.attn.c_proj.weight", True),
            f"{ours}.attn.b_o": (f"{hf}.attn.c_proj.bias", False),
            f"{ours}.mlp.w_in": (f"{hf}.mlp.c_fc.weight", True),
            f"{ours}.mlp.b_in": (f"{hf}.mlp.c_fc.bias", False),
            f"{ours}.mlp.w_out": (f"{hf}.mlp.c_proj.weight", True),
            f"{ours}.mlp.b_out": (f"{hf}.mlp.c_proj.bias", False),
        })
    return names


def convert(tensors: StrictTensors, cfg: LoopedConfig) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under our names (physical stacks prelude / core / coda)."""
    prefix = cfg.extra.get("prefix", "")
    out: dict[str, torch.Tensor] = {}
    if cfg.extra.get("model_type") == "gpt2":
        for ours, (hf, conv1d) in _gpt2_names(cfg, prefix).items():
            t = tensors.take(hf)
            out[ours] = t.T.contiguous() if conv1d else t
        d = cfg.d_model
        for layer in range(_n_layers(cfg)):
            ours, hf = _stage_of(layer, cfg), f"{prefix}h.{layer}"
            b_q, b_k, b_v = tensors.take(f"{hf}.attn.c_attn.bias", shape=(3 * d,)).split(d)
            out[f"{ours}.attn.b_q"], out[f"{ours}.attn.b_k"], out[f"{ours}.attn.b_v"] = b_q, b_k, b_v
            # Old GPT-2 checkpoints store the causal mask as buffers; they are not weights.
            tensors.ignore(f"{hf}.attn.bias", f"{hf}.attn.masked_bias")
        if cfg.tie_embeddings:
            tensors.ignore("lm_head.weight")
        else:
            out["unembed.weight"] = tensors.take("lm_head.weight")
        return out
    for ours, hf in _llama_names(cfg, prefix).items():
        out[ours] = tensors.take(hf)
    for layer in range(_n_layers(cfg)):
        tensors.ignore(f"{prefix}layers.{layer}.self_attn.rotary_emb.inv_freq")
    if cfg.tie_embeddings:
        tensors.ignore("lm_head.weight")  # a duplicate of the token embedding
    else:
        out["unembed.weight"] = tensors.take("lm_head.weight")
    return out


# ---------------------------------------------------------------------------------------- export
def export(model: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(config.json, tensors)`` in the original family's format; non-default loop settings go
    under ``config.json["tl_loop"]`` (ignored by ``transformers``, read back by this loader)."""
    cfg: LoopedConfig = model.cfg
    model_type = cfg.extra.get("model_type")
    if model_type not in MODEL_TYPES or "hf_config" not in cfg.extra:
        raise CheckpointError(
            "this model was not loaded from a feedforward checkpoint (cfg.extra lacks model_type / "
            "hf_config), so its original format is unknown"
        )
    prefix = cfg.extra.get("prefix", "")
    sd = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    if model_type == "gpt2":
        for ours, (hf, conv1d) in _gpt2_names(cfg, prefix).items():
            tensors[hf] = sd[ours].T if conv1d else sd[ours]
        for layer in range(_n_layers(cfg)):
            ours, hf = _stage_of(layer, cfg), f"{prefix}h.{layer}"
            tensors[f"{hf}.attn.c_attn.bias"] = torch.cat([sd[f"{ours}.attn.b_{x}"] for x in "qkv"])
    else:
        tensors = {hf: sd[ours] for ours, hf in _llama_names(cfg, prefix).items()}
    if not cfg.tie_embeddings:
        tensors["lm_head.weight"] = sd["unembed.weight"]

    config_json = dict(cfg.extra["hf_config"])
    config_json["dtype"] = str(cfg.dtype).removeprefix("torch.")
    meta: dict[str, Any] = {}
    layout = [cfg.n_prelude_layers, cfg.n_core_layers, cfg.n_coda_layers]
    if layout != [0, _n_layers(cfg), 0]:
        meta["layout"] = layout
    if cfg.n_steps != 1:
        meta["n_steps"] = cfg.n_steps
    defaults = {f.name: f.default for f in fields(LoopedConfig) if f.name in LOOP_OPTIONS}
    for key in LOOP_OPTIONS:
        value = getattr(cfg, key)
        if key == "state_init_std":  # derived from d_model unless set; only matters for random states
            if cfg.state_init == "random":
                meta[key] = value
        elif value != defaults[key]:
            meta[key] = value
    if meta:
        config_json[METADATA_KEY] = meta
    if cfg.n_steps != 1 or cfg.injection != "none" or cfg.state_init != "prelude":
        logger.warning(
            "saving a looped %s (n_steps=%d, injection=%s, state_init=%s): transformers ignores the "
            "'tl_loop' entry of config.json and runs the plain stack once; tl_loop reloads it as saved",
            model_type, cfg.n_steps, cfg.injection, cfg.state_init,
        )
    return config_json, tensors


FAMILY = register_family(
    Family(
        name="feedforward",
        detect=detect,
        to_config=to_config,
        convert=convert,
        export=export,
        description="Llama / Qwen2 / Mistral / OLMo-2 / GPT-2 checkpoints cut into prelude, looped "
        "core and coda",
    )
)
