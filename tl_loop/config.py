"""Configuration of a looped (recurrent-depth) language model.

A looped LM is described as a *layout* (which stacks of blocks run, how often) plus the
*components* every block is made of. One dataclass covers every supported family; families
differ only in field values (see ``tl_loop.loading`` for the presets each loader fills in).

Layout, in execution order::

    embed -> prelude (n_prelude_layers, once)
          -> repeat n_steps times:                       # the loop / recurrence
                [inner loop: inner_cycles x inner stack]  # HRM only (n_inner_layers > 0)
                inject input -> core (n_core_layers)      # weights shared across steps
                [norm between steps]
          -> [norm after the loop] -> coda (n_coda_layers, once) -> ln_final -> unembed

``n_layers`` is the *effective depth* of the unrolled model at the current ``n_steps``:
``n_prelude_layers + n_steps * layers_per_step + n_coda_layers``. It is derived, never set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, get_args, get_origin

import torch
from transformer_lens.config import TransformerLensConfig

StateInit = Literal["zeros", "prelude", "random", "learned"]
Injection = Literal["none", "add", "linear"]
NormType = Literal["RMS", "LN"]
RotaryLayout = Literal["interleaved", "half"]
ProjectionLayout = Literal["fused", "split"]
LoopNormWeights = Literal["ln_final", "own", "none"]

#: ``n_steps`` above this is refused unless ``force=True`` (a typo guard: 10_000 steps of a
#: real model would run for hours and cache terabytes).
DEFAULT_MAX_STEPS = 512


@dataclass(kw_only=True)
class LoopedConfig(TransformerLensConfig):
    """Layout and components of a looped transformer.

    Examples:
        >>> cfg = LoopedConfig(d_model=32, d_head=8, n_prelude_layers=1, n_core_layers=2,
        ...                    n_coda_layers=1, n_steps=3, d_vocab=50)
        >>> cfg.n_layers  # 1 + 3 * 2 + 1
        8
    """

    # ---- sizes (TransformerLens names) ----
    d_model: int = 64
    d_head: int = 16
    n_layers: int = 0  # derived: effective depth, see module docstring
    n_ctx: int = 2048  # longest sequence accepted (also the RoPE table length)
    d_vocab: int = 256
    positional_embedding_type: str = "rotary"  # rotary (RoPE) | standard (learned W_pos, GPT-2)
    normalization_type: str | None = None  # TransformerLens's name for ln1/ln2/ln_final; None: derived
    act_fn: str = "silu"
    gated_mlp: bool = True
    eps: float = 1e-6

    # ---- layout ----
    n_prelude_layers: int = 0  # blocks run once before the loop
    n_core_layers: int = 1  # blocks of the recurrent block, run every step, weights shared
    n_coda_layers: int = 0  # blocks run once after the loop
    n_steps: int = 1  # default number of recurrent steps
    max_steps: int = DEFAULT_MAX_STEPS  # n_steps above this needs force=True
    n_inner_layers: int = 0  # HRM: layers of the low-level stack run inside every step
    inner_cycles: int = 0  # HRM: how often the inner stack runs per step

    # ---- recurrent state ----
    state_init: StateInit = "prelude"  # prelude (copy of prelude output) | zeros | random (Huginn)
    state_init_std: float | None = None  # random init std; None -> sqrt(2 / (5 d_model))
    state_init_scale: float = 1.0  # random init is multiplied by this (Huginn: embed scale)
    state_init_seed: int = 0  # seed of the default random state (forward passes are repeatable)
    inner_state_init: StateInit = "zeros"  # HRM: zeros | learned (a z_L_init parameter)
    injection: Injection | None = None  # how the source enters each step; None: add with inner cycles, else none
    adapter_bias: bool = False  # bias of the linear adapter on concat(state, prelude_out)

    # ---- normalisation ----
    norm_type: NormType | None = None  # None: from normalization_type, else RMS
    norm_weights: bool | None = None  # False: parameter-free norms (HRM); None: from normalization_type
    pre_norm: bool = True  # norm on the input of each sublayer (Llama)
    output_norm: bool = False  # norm on each sublayer's output before the add (Ouro, OLMo-2)
    resid_norm: bool = False  # norm on the residual stream after each add (Huginn sandwich)
    norm_between_steps: bool = False  # norm the state after every step but the last (Ouro, HRM)
    norm_after_loop: bool = False  # norm the state once after the last step (Huginn ln_f #1)
    loop_norm_weights: LoopNormWeights = "ln_final"  # weights of the two loop norms above
    inner_norm: bool = False  # HRM: norm after every run of the inner stack

    # ---- attention ----
    n_key_value_heads: int | None = None  # GQA; None -> n_heads
    qkv_layout: ProjectionLayout = "fused"  # storage of W_Q/W_K/W_V: one matrix or three
    qk_bias: bool = False  # bias on q and k (Huginn qk_bias)
    v_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False  # norm over the full q / k width before RoPE (OLMo-2)
    attn_output_gate: bool = False  # z *= sigmoid(x W_gate) per head dim (HRM)
    attn_scale: float | None = None  # None -> 1 / sqrt(d_head)
    rotary_layout: RotaryLayout = "half"  # interleaved pairs (Huginn) or rotate-half (Llama)
    rotary_base: float = 10000.0
    rotary_dim: int | None = None  # None -> d_head
    rope_scaling: dict[str, Any] | None = None  # HF rope_scaling, e.g. {"rope_type": "llama3", ...}
    rope_in_float32: bool = False  # rotate q/k in float32 (Huginn, OLMo-2) instead of model dtype

    # ---- MLP ----
    mlp_layout: ProjectionLayout = "fused"  # gated MLP: gate and up in one matrix or two
    mlp_bias: bool = False

    # ---- embedding / unembedding ----
    embed_scale: float = 1.0  # token embeddings are multiplied by this (Huginn sqrt(d_model))
    tie_embeddings: bool = False
    unembed_bias: bool = False
    exit_gate: bool = False  # Ouro: per-step exit gate Linear(d_model -> 1) on the normed state

    # ---- TransformerLens hook flags (use_attn_result, use_split_qkv_input are inherited) ----
    use_attn_in: bool = False  # blocks.{i}.attn.hook_attn_in: the attention input per head
    use_hook_mlp_in: bool = False  # blocks.{i}.hook_mlp_in: the MLP half's input

    # ---- bookkeeping ----
    family: str = "custom"  # loader that produced this config (informational only)
    model_name: str = "custom"
    extra: dict[str, Any] = field(default_factory=dict)  # family-specific metadata, unused by forward

    def __post_init__(self) -> None:
        self._validate_values()  # before TransformerLens derives anything from them
        super().__post_init__()
        if self.n_key_value_heads is None:
            self.n_key_value_heads = self.n_heads
        if self.state_init_std is None:
            self.state_init_std = math.sqrt(2.0 / (5.0 * self.d_model))
        self._resolve_norms()
        if self.injection is None:
            self.injection = "add" if self.inner_cycles else "none"
        self.final_rms = self.norm_type == "RMS"
        self.uses_rms_norm = self.norm_type == "RMS"
        self._validate()
        self.n_layers = self.effective_depth(self.n_steps)

    def _resolve_norms(self) -> None:
        """``norm_type`` / ``norm_weights`` and TransformerLens's ``normalization_type`` describe
        the same norms: one given fills in the others; given together they must agree. (After
        ``fold_layer_norm`` the block norms are parameter-free, ``RMSPre`` / ``LNPre``, while
        output or loop norms may keep weights: ``...Pre`` with ``norm_weights=True`` is allowed.)"""
        tl = self.normalization_type
        if tl is not None and tl not in ("LN", "LNPre", "RMS", "RMSPre"):
            raise ValueError(f"LoopedConfig: normalization_type must be LN, LNPre, RMS or RMSPre, got {tl!r}")
        base = None if tl is None else tl.removesuffix("Pre")
        if self.norm_type is None:
            self.norm_type = base or "RMS"  # type: ignore[assignment]
        elif base is not None and base != self.norm_type:
            raise ValueError(f"LoopedConfig: normalization_type={tl!r} disagrees with norm_type={self.norm_type!r}")
        if self.norm_weights is None:
            self.norm_weights = tl is None or tl == base
        elif tl is not None and tl == base and not self.norm_weights:
            raise ValueError(f"LoopedConfig: normalization_type={tl!r} (weighted norms) disagrees with norm_weights=False")
        if tl is None:
            self.normalization_type = self._tl_norm_type

    @property
    def _tl_norm_type(self) -> str:
        base = "RMS" if self.norm_type == "RMS" else "LN"
        return base if self.norm_weights else base + "Pre"

    def _validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"LoopedConfig: {msg}")

        for name in ("n_prelude_layers", "n_core_layers", "n_coda_layers", "n_inner_layers"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(self.n_core_layers >= 1, "the recurrent block needs at least one layer (n_core_layers)")
        need(self.n_steps >= 0, f"n_steps must be >= 0, got {self.n_steps}")
        need(self.n_heads * self.d_head > 0, "n_heads and d_head must be positive")
        assert self.n_key_value_heads is not None
        need(
            self.n_heads % self.n_key_value_heads == 0,
            f"n_heads ({self.n_heads}) must be a multiple of n_key_value_heads "
            f"({self.n_key_value_heads})",
        )
        need(self.d_vocab > 0, f"d_vocab must be set (got {self.d_vocab})")
        need((self.n_inner_layers > 0) == (self.inner_cycles > 0),
             "n_inner_layers and inner_cycles must both be zero or both positive")
        need(self.state_init != "learned", "state_init='learned' is only for the inner (HRM) state")
        need(self.inner_state_init in ("zeros", "learned"), "inner_state_init must be zeros or learned")
        need(not (self.tie_embeddings and self.unembed_bias), "tied embeddings cannot carry an unembed bias")
        rot = self.rotary_dim or self.d_head
        need(rot % 2 == 0 and rot <= self.d_head, f"rotary_dim ({rot}) must be even and <= d_head")
        need(self.act_fn in _ACTIVATIONS, f"act_fn must be one of {sorted(_ACTIVATIONS)}")
        need(not (self.use_attn_in and self.use_split_qkv_input),
             "use_attn_in and use_split_qkv_input are mutually exclusive (as in TransformerLens)")
        need(not (self.use_attn_in and self.n_groups > 1),
             "use_attn_in needs one key-value head per query head; with grouped-query attention use "
             "use_split_qkv_input (hook_k_input / hook_v_input per key-value head)")
        need(self.positional_embedding_type in ("rotary", "standard"),
             f"positional_embedding_type must be 'rotary' or 'standard', "
             f"got {self.positional_embedding_type!r}")

    def _validate_values(self) -> None:
        """Types, ranges and finiteness of the fields, and the ``Literal`` fields' values."""
        problems = []
        for f in fields(self):
            value = getattr(self, f.name)
            kind = _FIELD_KINDS.get(f.name)
            if kind is not None and not (value is None and f.name in _OPTIONAL) and not kind[0](value):
                problems.append(f"{f.name}={value!r} (must be {kind[1]})")
            optional = isinstance(f.type, str) and f.type.endswith(" | None")  # postponed annotations
            alias = _LITERALS.get(f.type.removesuffix(" | None")) if isinstance(f.type, str) else f.type
            choices = get_args(alias) if get_origin(alias) is Literal else ()
            if choices and not (optional and value is None) and value not in choices:
                problems.append(f"{f.name}={value!r} (must be one of {list(choices)})")
        if self.n_heads == -1 and _is_int(self.d_head, 1) and _is_int(self.d_model, 1) and self.d_model % self.d_head:
            problems.append(f"d_model={self.d_model} is not divisible by d_head={self.d_head}")
        if problems:
            raise ValueError("LoopedConfig: invalid " + "; ".join(problems))

    # ---- derived quantities ----
    @property
    def layers_per_step(self) -> int:
        """Effective layers one step of the loop adds (inner cycles included)."""
        return self.inner_cycles * self.n_inner_layers + self.n_core_layers

    def effective_depth(self, n_steps: int) -> int:
        """Effective depth of the unrolled model at ``n_steps`` steps."""
        return self.n_prelude_layers + n_steps * self.layers_per_step + self.n_coda_layers

    @property
    def n_groups(self) -> int:
        assert self.n_key_value_heads is not None
        return self.n_heads // self.n_key_value_heads

    @property
    def has_loop_norm(self) -> bool:
        return self.norm_between_steps or self.norm_after_loop

    def with_steps(self, n_steps: int) -> "LoopedConfig":
        """A copy of this config at another number of steps (``n_layers`` follows)."""
        return replace(self, n_steps=n_steps)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["dtype"] = str(self.dtype).removeprefix("torch.")
        return out

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> "LoopedConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config_dict) - known)
        if unknown:
            raise ValueError(f"LoopedConfig: unknown fields {unknown}")
        values = dict(config_dict)
        values.pop("n_layers", None)  # derived
        if isinstance(values.get("dtype"), str):
            values["dtype"] = getattr(torch, values["dtype"])
        return cls(**values)


def _is_int(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_number(value: Any, minimum: float = -math.inf, exclusive: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return value > minimum if exclusive else value >= minimum


#: field -> (check, what it must be); ``_OPTIONAL`` fields may also be None.
_FIELD_KINDS: dict[str, tuple[Any, str]] = {
    **{name: (lambda v: _is_int(v, 1), "a positive int") for name in (
        "d_model", "d_head", "d_mlp", "d_vocab", "n_ctx", "n_key_value_heads", "rotary_dim")},
    "n_heads": (lambda v: v == -1 or _is_int(v, 1), "a positive int"),
    **{name: (lambda v: _is_int(v, 0), "an int >= 0") for name in (
        "n_prelude_layers", "n_core_layers", "n_coda_layers", "n_steps", "max_steps", "n_inner_layers",
        "inner_cycles")},
    "state_init_seed": (lambda v: _is_int(v, -(2**63)), "an int"),
    "eps": (lambda v: _is_number(v, 0.0), "a finite number >= 0"),
    "rotary_base": (lambda v: _is_number(v, 0.0, exclusive=True), "a finite number > 0"),
    "attn_scale": (lambda v: _is_number(v, 0.0, exclusive=True), "a finite number > 0"),
    "state_init_std": (lambda v: _is_number(v, 0.0), "a finite number >= 0"),
    "embed_scale": (_is_number, "a finite number"),
    "state_init_scale": (_is_number, "a finite number"),
}
_OPTIONAL = {"d_mlp", "n_key_value_heads", "rotary_dim", "attn_scale", "state_init_std"}
#: The ``Literal`` aliases, for fields whose annotation is the alias's name (postponed annotations).
_LITERALS: dict[Any, Any] = {
    "StateInit": StateInit, "Injection": Injection, "NormType": NormType, "RotaryLayout": RotaryLayout,
    "ProjectionLayout": ProjectionLayout, "LoopNormWeights": LoopNormWeights,
}


from tl_loop.components.activations import ACTIVATIONS as _ACTIVATIONS  # noqa: E402  (the one table)
