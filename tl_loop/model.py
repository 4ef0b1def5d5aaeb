"""``HookedLoopedTransformer``: a looped LM unrolled into per-iteration hook points.

How the pieces connect:

* **Weights** are stored once, in physical stacks: ``model.prelude[j]``, ``model.core[j]``
  (the recurrent block), ``model.inner[j]`` (HRM), ``model.coda[j]``, plus ``embed``,
  ``pos_embed`` (learned positions only), ``adapter``, ``final_norm``, ``unembed``,
  ``exit_gate``. ``state_dict()`` holds these only.
* **Views** carry the hook points: ``model.blocks[i]`` is effective layer ``i`` of the unrolled
  model (a ``HookedBlock`` computing with the shared weights of its physical block),
  ``model.loops[r]`` holds the loop-level hooks of step ``r``. Views are rebuilt (and cached)
  when the number of steps changes; weights never move.
* **The schedule** (``model.schedule``, see ``tl_loop.schedule``) says which physical block each
  effective layer runs; ``forward`` walks it.

Every TransformerLens verb works unchanged: ``run_with_hooks``, ``run_with_cache`` (which returns
a ``tl_loop.LoopedActivationCache``, an ``ActivationCache`` subclass), ``hooks()``,
``reset_hooks``, ``transformer_lens.patching``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
import torch.nn as nn
from jaxtyping import Float, Int
from transformer_lens import HookedRootModule
from transformer_lens.utilities import lm_cross_entropy_loss

from tl_loop.components.base import LoopHookPoint, has_hooks
from tl_loop.components.block import BlockWeights, HookedBlock
from tl_loop.components.embed import Adapter, Embedding, ExitGate, PosEmbedding, TiedUnembedding, Unembedding
from tl_loop.components.loop import LoopStep
from tl_loop.components.norm import HookedNorm, NormWeights
from tl_loop.components.rotary import RotaryTables, rotary_inv_freq, rotary_tables
from tl_loop.config import LoopedConfig
from tl_loop.errors import InputError
from tl_loop.schedule import Schedule

ReturnType = Literal["logits", "loss", "both"] | None


@dataclasses.dataclass
class RunFrame:
    """The live variables of a forward pass just before effective layer ``index`` runs.

    ``x``: the residual stream entering the block (before its ``hook_resid_pre``); ``state``: the
    recurrent state of the current step (after ``hook_state_in``); ``inner_state``: HRM's
    low-level state; ``source``: what the step's injection adds (the prelude output, or HRM's
    inner state); ``prelude_out``: the prelude's output. Tensors not defined yet are None.
    """

    index: int
    x: torch.Tensor | None = None
    state: torch.Tensor | None = None
    inner_state: torch.Tensor | None = None
    source: torch.Tensor | None = None
    prelude_out: torch.Tensor | None = None

    TENSORS = ("x", "state", "inner_state", "source", "prelude_out")

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "RunFrame":
        """A frame with ``fn`` applied to every tensor (None stays None)."""
        return RunFrame(self.index, *(None if (t := getattr(self, k)) is None else fn(t) for k in self.TENSORS))


class _Views(nn.Module):
    """Hook-bearing views for one number of steps (a container, never registered itself)."""

    def __init__(self, model: "HookedLoopedTransformer", n_steps: int) -> None:
        super().__init__()
        cfg = model.cfg
        self.schedule = Schedule.from_config(cfg, n_steps)
        stacks = {"prelude": model.prelude, "inner": model.inner, "core": model.core, "coda": model.coda}
        self.blocks = nn.ModuleList(
            HookedBlock(stacks[layer.stage][layer.layer_in_stack], cfg) for layer in self.schedule
        )
        self.loops = nn.ModuleList(
            LoopStep(cfg, r, n_steps, model._loop_norm_weights) for r in range(n_steps)
        )


class HookedLoopedTransformer(HookedRootModule):
    """A looped (recurrent-depth) transformer with one hook point per effective layer.

    Examples:
        >>> from tl_loop import LoopedConfig, HookedLoopedTransformer
        >>> cfg = LoopedConfig(d_model=32, d_head=8, d_vocab=50, n_prelude_layers=1,
        ...                    n_core_layers=2, n_coda_layers=1, n_steps=3, injection="add")
        >>> model = HookedLoopedTransformer(cfg)
        >>> tokens = torch.tensor([[1, 2, 3, 4]])
        >>> logits, cache = model.run_with_cache(tokens)
        >>> cache["blocks.5.hook_resid_post"].shape    # step 2, layer 0 of the cycle
        torch.Size([1, 4, 32])
        >>> model.set_n_steps(8); model.cfg.n_layers
        18
    """

    cfg: LoopedConfig
    blocks: nn.ModuleList
    loops: nn.ModuleList

    def __init__(
        self, cfg: LoopedConfig, tokenizer: Any = None, init_weights: bool = True, seed: int | None = None
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer

        # ---- physical weights (stored once) ----
        self.embed = Embedding(cfg)
        self.pos_embed = PosEmbedding(cfg) if cfg.positional_embedding_type == "standard" else None
        self.prelude = nn.ModuleList(BlockWeights(cfg) for _ in range(cfg.n_prelude_layers))
        self.inner = nn.ModuleList(BlockWeights(cfg) for _ in range(cfg.n_inner_layers))
        self.core = nn.ModuleList(BlockWeights(cfg) for _ in range(cfg.n_core_layers))
        self.coda = nn.ModuleList(BlockWeights(cfg) for _ in range(cfg.n_coda_layers))
        self.adapter = Adapter(cfg) if cfg.injection == "linear" else None
        self.inner_init = (
            nn.Parameter(torch.zeros(cfg.d_model, dtype=cfg.dtype)) if cfg.inner_state_init == "learned" else None
        )
        self.final_norm = NormWeights(cfg.d_model, cfg.norm_type, cfg.dtype) if cfg.norm_weights else None
        own_loop_norm = cfg.has_loop_norm and cfg.norm_weights and cfg.loop_norm_weights == "own"
        self.loop_norm = NormWeights(cfg.d_model, cfg.norm_type, cfg.dtype) if own_loop_norm else None
        self.exit_gate = ExitGate(cfg) if cfg.exit_gate else None
        self.unembed = TiedUnembedding(self.embed) if cfg.tie_embeddings else Unembedding(cfg)

        # ---- model-level hook points ----
        self.hook_embed = LoopHookPoint()  # [batch, pos, d_model]
        if self.pos_embed is not None:
            self.hook_pos_embed = LoopHookPoint()  # [batch, pos, d_model]
        if cfg.norm_after_loop:
            self.ln_loop_out = HookedNorm(self._loop_norm_weights, cfg.norm_type, cfg.eps)
        self.ln_final = HookedNorm(self.final_norm, cfg.norm_type, cfg.eps)

        self._views: dict[int, _Views] = {}
        self._readout_views: _Views | None = None
        self._rotary_cache: dict[tuple[int, str, torch.dtype], RotaryTables] = {}
        self._install_views(cfg.n_steps)
        if init_weights:
            self.init_weights(seed)
        self.eval()  # TransformerLens's patching and analysis tools refuse training mode

    # ------------------------------------------------------------------ views & steps
    @property
    def _loop_norm_weights(self) -> NormWeights | None:
        if self.cfg.loop_norm_weights == "own":
            return self.loop_norm
        return self.final_norm if self.cfg.loop_norm_weights == "ln_final" else None

    def _views_for(self, n_steps: int) -> _Views:
        if n_steps not in self._views:
            views = _Views(self, n_steps)
            views.train(self.training)
            self._views[n_steps] = views
        return self._views[n_steps]

    def _install_views(self, n_steps: int) -> None:
        views = self._views_for(n_steps)
        # Assigning registers them as children, so named_modules() / setup() see their hooks.
        self.blocks = views.blocks
        self.loops = views.loops
        self.schedule = views.schedule
        self.cfg.n_steps = n_steps
        self.cfg.n_layers = self.cfg.effective_depth(n_steps)
        self.setup()

    def check_n_steps(self, n_steps: int, force: bool = False) -> int:
        """Validate a step count: an int >= 0, at most ``cfg.max_steps`` unless ``force``."""
        if isinstance(n_steps, bool) or not isinstance(n_steps, int):
            if isinstance(n_steps, torch.Tensor) and n_steps.numel() == 1 and not n_steps.is_floating_point():
                n_steps = int(n_steps.item())
            else:
                raise InputError(f"n_steps must be an int, got {type(n_steps).__name__} {n_steps!r}")
        if n_steps < 0:
            raise InputError(f"n_steps must be >= 0, got {n_steps}")
        if n_steps > self.cfg.max_steps and not force:
            raise InputError(
                f"n_steps={n_steps} exceeds cfg.max_steps={self.cfg.max_steps}; pass force=True "
                "(or raise cfg.max_steps) if you really want that many steps"
            )
        return n_steps

    def set_n_steps(self, n_steps: int, force: bool = False) -> None:
        """Change the default number of steps. Hook points, ``cfg.n_layers`` and ``schedule``
        follow; weights are not copied. Hooks attached to the old hook points stay with them."""
        n_steps = self.check_n_steps(n_steps, force)
        if n_steps != self.cfg.n_steps:
            self._install_views(n_steps)

    @contextlib.contextmanager
    def steps(self, n_steps: int, force: bool = False) -> Iterator["HookedLoopedTransformer"]:
        """Temporarily run at ``n_steps`` steps: ``with model.steps(16): model.run_with_cache(...)``."""
        previous = self.cfg.n_steps
        self.set_n_steps(n_steps, force)
        try:
            yield self
        finally:
            self.set_n_steps(previous, force=True)

    def _any_hooks_attached(self) -> bool:
        return any(has_hooks(hp) for hp in self.hook_dict.values())

    # ------------------------------------------------------------------ TL verbs
    def run_with_hooks(self, *model_args: Any, n_steps: int | None = None, force: bool = False, **kwargs: Any):  # type: ignore[override]
        """As ``HookedRootModule.run_with_hooks``; ``n_steps=`` runs (and names hooks) at that depth."""
        if n_steps is None:
            return super().run_with_hooks(*model_args, **kwargs)
        with self.steps(n_steps, force):
            return super().run_with_hooks(*model_args, **kwargs)

    def run_with_cache(  # type: ignore[override]
        self, *model_args: Any, n_steps: int | None = None, force: bool = False, return_cache_object: bool = True, **kwargs: Any
    ):
        """As TransformerLens: returns ``(output, cache)`` with a ``LoopedActivationCache``.

        ``n_steps=`` runs at that depth; the cache stays bound to it afterwards.
        """
        from tl_loop.cache import LoopedActivationCache

        steps_ctx = self.steps(n_steps, force) if n_steps is not None else contextlib.nullcontext()
        with steps_ctx:
            names_filter = kwargs.get("names_filter")
            self._warn_if_filter_matches_nothing(names_filter)
            out, cache_dict = super().run_with_cache(*model_args, **kwargs)
            if not return_cache_object:
                return out, cache_dict
            cache = LoopedActivationCache(
                cache_dict, self, n_steps=self.cfg.n_steps, has_batch_dim=not kwargs.get("remove_batch_dim", False)
            )
        return out, cache

    def _warn_if_filter_matches_nothing(self, names_filter: Any) -> None:
        if names_filter is None:
            return
        if isinstance(names_filter, str):
            names = [names_filter]
        elif isinstance(names_filter, (list, tuple)):
            names = list(names_filter)
        else:
            if not any(names_filter(n) for n in self.hook_dict):
                logging.warning("names_filter matches no hook point of this model: the cache will be empty")
            return
        unknown = [n for n in names if n not in self.hook_dict]
        if unknown:
            logging.warning(
                "names_filter names hook points this model does not have: %s%s",
                unknown[:5],
                self._suggest(unknown[0]),
            )

    def _suggest(self, name: str) -> str:
        close = difflib.get_close_matches(name, list(self.hook_dict), n=3, cutoff=0.6)
        return f" (did you mean {', '.join(close)}?)" if close else ""

    def check_hooks_to_add(self, hook_point, hook_point_name, hook, dir="fwd", is_permanent=False, prepend=False) -> None:  # type: ignore[override]
        return None

    def add_hook(self, name, hook, dir="fwd", is_permanent=False, level=None, prepend=False) -> None:  # type: ignore[override]
        if isinstance(name, str) and name not in self.hook_dict:
            raise InputError(
                f"unknown hook point {name!r}{self._suggest(name)}; this model has {len(self.hook_dict)} "
                f"hook points at n_steps={self.cfg.n_steps} (see model.hook_dict)"
            )
        super().add_hook(name, hook, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend)

    def _enable_hook_with_name(self, name: str, hook, dir) -> None:  # type: ignore[override]
        if name not in self.hook_dict:
            raise InputError(
                f"unknown hook point {name!r}{self._suggest(name)}; this model has "
                f"{len(self.hook_dict)} hook points at n_steps={self.cfg.n_steps} (see model.hook_dict)"
            )
        super()._enable_hook_with_name(name, hook, dir)

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        n_steps: int | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        revision: str | None = None,
        family: str | None = None,
        **options: Any,
    ) -> "HookedLoopedTransformer":
        """Load a released checkpoint (local folder or Hub id); see ``tl_loop.loading``."""
        from tl_loop.loading import load_pretrained

        return load_pretrained(
            name_or_path, family=family, n_steps=n_steps, device=device, dtype=dtype, revision=revision, **options
        )

    def save_pretrained(self, folder: str, family: str | None = None) -> Any:
        """Save in the family's own checkpoint format (loadable by ``from_pretrained``)."""
        from tl_loop.loading import save_pretrained

        return save_pretrained(self, folder, family)

    # ------------------------------------------------------------------ weights (TL views)
    @property
    def W_E(self) -> Float[torch.Tensor, "d_vocab d_model"]:
        return self.embed.W_E

    @property
    def W_pos(self) -> Float[torch.Tensor, "n_ctx d_model"]:
        """Learned position embeddings (``positional_embedding_type="standard"`` only)."""
        if self.pos_embed is None:
            raise AttributeError("W_pos")  # rotary models: hasattr(model, "W_pos") is False
        return self.pos_embed.W_pos

    @property
    def W_U(self) -> Float[torch.Tensor, "d_model d_vocab"]:
        return self._unembed_weight().T

    @property
    def b_U(self) -> Float[torch.Tensor, "d_vocab"]:
        if self.unembed.b_U is not None:
            return self.unembed.b_U
        return torch.zeros(self.cfg.d_vocab, dtype=self.W_E.dtype, device=self.W_E.device)

    def _unembed_weight(self) -> torch.Tensor:
        return self.unembed.weight

    def init_weights(self, seed: int | None = None, std: float = 0.02) -> None:
        """Random initialisation: normal(0, std) matrices (output projections scaled down by
        ``sqrt(2 * layers)``), unit norm weights, zero biases. Uses its own generator when
        ``seed`` is given, so the global RNG is untouched."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        depth = max(self.cfg.effective_depth(max(self.cfg.n_steps, 1)), 1)
        with torch.no_grad():
            for name, p in self.named_parameters():
                leaf = name.rsplit(".", 1)[-1]
                if p.ndim == 1:
                    p.fill_(1.0 if leaf == "w" else 0.0)
                    continue
                s = std / (2 * depth) ** 0.5 if leaf in ("w_o", "w_out") else std
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * s)
            if self.inner_init is not None:
                self.inner_init.copy_(torch.randn(self.cfg.d_model, generator=gen) * std)

    # ------------------------------------------------------------------ tokens
    def to_tokens(
        self, input: str | list[str], prepend_bos: bool | None = None, move_to_device: bool = True, truncate: bool = True
    ) -> Int[torch.Tensor, "batch pos"]:
        """Tokenize like TransformerLens (needs a tokenizer)."""
        if self.tokenizer is None:
            raise InputError("this model has no tokenizer: pass token ids (a LongTensor [batch, pos])")
        prepend_bos = self.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
        texts = [input] if isinstance(input, str) else list(input)
        tok = self.tokenizer
        bos = getattr(tok, "bos_token", None)
        if prepend_bos and bos is not None:
            texts = [bos + t for t in texts]
        if len(texts) > 1 and tok.pad_token is None:  # as TransformerLens: pad with EOS (or BOS)
            tok.pad_token = tok.eos_token if tok.eos_token is not None else bos
        enc = tok(texts, return_tensors="pt", padding=len(texts) > 1, add_special_tokens=False,
                  truncation=truncate, max_length=self.cfg.n_ctx if truncate else None)
        tokens = enc["input_ids"]
        return tokens.to(self.W_E.device) if move_to_device else tokens

    def to_string(self, tokens: torch.Tensor | list[int]) -> str | list[str]:
        if self.tokenizer is None:
            raise InputError("this model has no tokenizer")
        tokens = torch.as_tensor(tokens)
        if tokens.ndim == 2:
            return self.tokenizer.batch_decode(tokens, clean_up_tokenization_spaces=False)
        return self.tokenizer.decode(tokens, clean_up_tokenization_spaces=False)

    def to_str_tokens(self, input: str | torch.Tensor | list, prepend_bos: bool | None = None) -> list:
        if self.tokenizer is None:
            raise InputError("this model has no tokenizer")
        if isinstance(input, list):
            return [self.to_str_tokens(x, prepend_bos) for x in input]
        tokens = self.to_tokens(input, prepend_bos)[0] if isinstance(input, str) else torch.as_tensor(input).flatten()
        return self.tokenizer.batch_decode([[int(t)] for t in tokens.tolist()], clean_up_tokenization_spaces=False)

    def to_single_token(self, string: str) -> int:
        token = self.to_tokens(string, prepend_bos=False).squeeze()
        if token.numel() != 1:
            raise InputError(f"{string!r} is not a single token")
        return int(token.item())

    def tokens_to_residual_directions(
        self, tokens: str | int | torch.Tensor
    ) -> Float[torch.Tensor, "... d_model"]:
        """Residual-stream directions whose dot product with ``ln_final``'s *scale-normalised*
        input gives each token's logit (``W_U`` columns times the ``ln_final`` weight, which
        ``ActivationCache.apply_ln_to_stack`` leaves out)."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        tokens = torch.as_tensor(tokens, device=self.W_E.device)
        directions = self._unembed_weight()[tokens]  # [..., d_model]
        if self.final_norm is not None:
            directions = directions * self.final_norm.w
        return directions

    def accumulated_bias(self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True) -> torch.Tensor:
        """Sum of attention and MLP output biases before ``layer`` (TransformerLens semantics:
        exact only when the residual stream is a plain sum, see ``LoopedActivationCache``)."""
        total = torch.zeros(self.cfg.d_model, dtype=self.W_E.dtype, device=self.W_E.device)
        for i in range(layer + (1 if mlp_input else 0)):
            block = self.blocks[i]
            total = total + block.attn.b_O
            if include_mlp_biases and i < layer:
                total = total + block.mlp.b_out
        return total

    # ------------------------------------------------------------------ forward
    def _validate_tokens(self, input: Any) -> torch.Tensor:
        if isinstance(input, (str, list)) and (isinstance(input, str) or (input and isinstance(input[0], str))):
            return self.to_tokens(input)
        if not isinstance(input, torch.Tensor):
            raise InputError(f"expected a LongTensor of token ids [batch, pos], got {type(input).__name__}")
        tokens = input
        if tokens.is_floating_point() or tokens.dtype == torch.bool or tokens.is_complex():
            raise InputError(f"tokens must be integer ids, got dtype {tokens.dtype}")
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2:
            raise InputError(f"tokens must have shape [batch, pos], got {tuple(tokens.shape)}")
        if tokens.numel() == 0:
            raise InputError(f"empty token tensor (shape {tuple(tokens.shape)})")
        if tokens.shape[1] > self.cfg.n_ctx:
            raise InputError(
                f"sequence length {tokens.shape[1]} exceeds the model's context n_ctx={self.cfg.n_ctx}"
            )
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.cfg.d_vocab:
            raise InputError(f"token ids must lie in [0, {self.cfg.d_vocab}), got min {lo} max {hi}")
        return tokens.to(self.W_E.device).long()

    def _rotary(self, n_pos: int, device: torch.device) -> RotaryTables | None:
        """RoPE tables for ``n_pos`` positions (cached: built once per length, device and dtype)."""
        if self.cfg.positional_embedding_type != "rotary":
            return None
        cfg = self.cfg
        dtype = self.W_E.dtype  # the activations' dtype (also after model.to(dtype))
        key = (n_pos, str(device), dtype)
        if key not in self._rotary_cache:
            rot = cfg.rotary_dim or cfg.d_head
            inv = rotary_inv_freq(rot, cfg.rotary_base, cfg.rope_scaling)
            with torch.inference_mode(False):  # reusable outside inference mode too
                tables = rotary_tables(n_pos, inv, cfg.rotary_layout, dtype, cfg.rope_in_float32, device)
            self._rotary_cache = {key: tables}
        return self._rotary_cache[key]

    def initial_state(
        self,
        like: Float[torch.Tensor, "batch pos d_model"],
        init_state: torch.Tensor | None = None,
        init_seed: int | None = None,
    ) -> Float[torch.Tensor, "batch pos d_model"]:
        """The state entering step 0, given the prelude output ``like``.

        ``random`` (Huginn ``like-init``): truncated normal (std ``cfg.state_init_std``, cut at
        +-3 std) times ``cfg.state_init_scale``, drawn from a private generator seeded with
        ``init_seed`` (default ``cfg.state_init_seed``): repeatable, and the global RNG is untouched.
        """
        if init_state is not None:
            if not isinstance(init_state, torch.Tensor):
                raise InputError(f"init_state must be a tensor, got {type(init_state).__name__}")
            if tuple(init_state.shape) != tuple(like.shape):
                raise InputError(
                    f"init_state has shape {tuple(init_state.shape)}, expected [batch, pos, d_model] = {tuple(like.shape)}"
                )
            if init_state.device != like.device:
                raise InputError(f"init_state is on {init_state.device}, the model runs on {like.device}")
            if init_state.dtype != like.dtype:
                raise InputError(f"init_state has dtype {init_state.dtype}, the model computes in {like.dtype}")
            return init_state
        kind = self.cfg.state_init
        if kind == "zeros":
            return torch.zeros_like(like)
        if kind == "prelude":
            return like
        seed = self.cfg.state_init_seed if init_seed is None else init_seed
        gen = torch.Generator(device=like.device).manual_seed(int(seed))
        std = float(self.cfg.state_init_std)  # type: ignore[arg-type]
        x = torch.empty(like.shape, dtype=torch.float32, device=like.device)
        nn.init.trunc_normal_(x, mean=0.0, std=std, a=-3 * std, b=3 * std, generator=gen)
        return (x * self.cfg.state_init_scale).to(like.dtype)

    def _inject(self, step: LoopStep, state: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        kind = "add" if self.cfg.inner_cycles else self.cfg.injection
        if kind == "none":
            return state
        x = state + source if kind == "add" else self.adapter(state, source)  # type: ignore[misc]
        return step.hook_injected(x)

    def forward(
        self,
        input: Int[torch.Tensor, "batch pos"] | str | list[str],
        return_type: ReturnType = "logits",
        loss_per_token: bool = False,
        *,
        n_steps: int | None = None,
        init_state: Float[torch.Tensor, "batch pos d_model"] | None = None,
        init_seed: int | None = None,
        force: bool = False,
    ) -> Any:
        """Run the unrolled model.

        Args:
            input: token ids ``[batch, pos]`` (or text, when the model has a tokenizer).
            return_type: ``"logits"``, ``"loss"``, ``"both"`` (``(logits, loss)``) or ``None``.
            loss_per_token: return the per-token loss ``[batch, pos - 1]``.
            n_steps: steps for this call (default ``cfg.n_steps``). Hooks must be named at the
                depth they run at: use ``run_with_hooks(..., n_steps=)`` or ``model.steps(n)``.
            init_state: the state entering step 0 (``[batch, pos, d_model]``).
            init_seed: seed of the random initial state (families with ``state_init="random"``).
            force: allow ``n_steps`` above ``cfg.max_steps``.
        """
        if return_type not in ("logits", "loss", "both", None):
            raise InputError(f"return_type must be 'logits', 'loss', 'both' or None, got {return_type!r}")
        if n_steps is not None:
            n_steps = self.check_n_steps(n_steps, force)
            if n_steps != self.cfg.n_steps:
                if self._any_hooks_attached():
                    raise InputError(
                        f"hooks are attached at n_steps={self.cfg.n_steps} but this call runs "
                        f"n_steps={n_steps}; pass n_steps to run_with_hooks/run_with_cache, or use "
                        "`with model.steps(n):` so hook names refer to the depth that runs"
                    )
                with self.steps(n_steps, force):
                    return self.forward(input, return_type, loss_per_token, init_state=init_state, init_seed=init_seed)
        tokens = self._validate_tokens(input)
        logits = self._head(self._run(tokens, init_state, init_seed))
        if return_type is None:
            return None
        if return_type == "logits":
            return logits
        loss = lm_cross_entropy_loss(logits, tokens, per_token=loss_per_token)
        return loss if return_type == "loss" else (logits, loss)

    @property
    def _gate_reads_ln_final(self) -> bool:
        """The last step's exit gate reads ln_final's output when nothing sits between the loop
        and ln_final (Ouro: the final norm *is* the last step's state norm)."""
        return self.cfg.n_coda_layers == 0 and not self.cfg.norm_after_loop

    # ------------------------------------------------------------------ per-step read-outs
    def step_logits(self, tokens: Any, **forward_kwargs: Any) -> Float[torch.Tensor, "step batch pos d_vocab"]:
        """Logits if the model left the loop after each step ``[n_steps, batch, pos, d_vocab]``
        (Huginn: final norm, coda and head on each step's state; Ouro: head on the normed state)."""
        from tl_loop.readout import step_logits

        return step_logits(self, tokens, **forward_kwargs)

    def exit_probabilities(self, tokens: Any, **forward_kwargs: Any) -> Float[torch.Tensor, "step batch pos"]:
        """Ouro: probability of exiting after each step ``[n_steps, batch, pos]``."""
        from tl_loop.readout import exit_probabilities

        return exit_probabilities(self, tokens, **forward_kwargs)

    def threshold_exit_logits(self, tokens: Any, threshold: float | None = None, **forward_kwargs: Any) -> Any:
        """Ouro's threshold exit: ``(logits [batch, pos, d_vocab], exit_step [batch, pos])``."""
        from tl_loop.readout import threshold_exit_logits

        return threshold_exit_logits(self, tokens, threshold, **forward_kwargs)

    def unembed_residual(self, x: Float[torch.Tensor, "... d_model"]) -> Float[torch.Tensor, "... d_vocab"]:
        """Logits from the output of ``ln_final``."""
        return self.unembed(x)

    def _run(
        self,
        tokens: torch.Tensor,
        init_state: torch.Tensor | None,
        init_seed: int | None,
        *,
        resume: RunFrame | None = None,
        on_block: Callable[[RunFrame], None] | None = None,
    ) -> torch.Tensor:
        """Embed, prelude, loop, coda: the residual stream entering ``ln_final``.

        Internal hooks for fast patching sweeps (``tl_loop.patching``): ``on_block(frame)`` is
        called before every block with the live variables of the pass (a ``RunFrame``, which it
        may modify in place, e.g. to stack more rows onto the batch); ``resume=frame`` starts the
        pass at effective layer ``frame.index`` from such a frame: everything before that layer
        (embedding, earlier blocks, loop boundaries, hooks) is skipped, everything from it on runs
        exactly as in a full pass. Operations between blocks belong to the boundary before the
        next block, so they are part of a frame taken there and are not repeated on resume.
        """
        cfg = self.cfg
        rotary = self._rotary(tokens.shape[1], tokens.device)
        if resume is None:
            start = -1
            embedded = self.embed(tokens)
            frame = RunFrame(0, self.hook_embed(embedded * cfg.embed_scale if cfg.embed_scale != 1.0 else embedded))
            if self.pos_embed is not None:
                frame.x = frame.x + self.hook_pos_embed(self.pos_embed(tokens))
        else:
            start = resume.index
            if not 0 <= start < len(self.schedule):
                raise InputError(f"cannot resume at effective layer {start}: the model runs {len(self.schedule)} layers")
            frame = dataclasses.replace(resume)  # the caller's frame stays as it was
        f = frame
        i = 0
        for _ in range(cfg.n_prelude_layers):
            i = self._run_block(i, f, start, rotary, on_block)
        if i > start:
            f.prelude_out = f.x
            f.state = self.initial_state(f.prelude_out, init_state, init_seed)
            f.inner_state = self._initial_inner_state(f.prelude_out) if cfg.inner_cycles else None
        for step in self.loops:
            if i > start:
                f.state = step.hook_state_in(f.state)
                f.source = f.prelude_out
            for cycle in step.inner if cfg.inner_cycles else ():
                if i > start:
                    f.inner_state = cycle.hook_state_in(f.inner_state)
                    f.x = cycle.hook_injected(f.inner_state + f.state)
                for _ in range(cfg.n_inner_layers):
                    i = self._run_block(i, f, start, rotary, on_block)
                if i > start:
                    f.inner_state = cycle.hook_state_out(cycle.ln_state(f.x) if cfg.inner_norm else f.x)
                    f.source = f.inner_state
            if i > start:
                f.x = self._inject(step, f.state, f.source)
            for _ in range(cfg.n_core_layers):
                i = self._run_block(i, f, start, rotary, on_block)
            if i > start:
                x = step.ln_state(f.x) if "ln_state" in step._modules else f.x
                f.state = step.hook_state_out(x)
                if self.exit_gate is not None and step.step < len(self.loops) - 1:
                    step.hook_exit_gate(self.exit_gate(f.state))
        if i > start:
            state = self.ln_loop_out(f.state) if cfg.norm_after_loop else f.state
            if self.exit_gate is not None and len(self.loops) and not self._gate_reads_ln_final:
                self.loops[-1].hook_exit_gate(self.exit_gate(state))
            f.x = state
        for _ in range(cfg.n_coda_layers):
            i = self._run_block(i, f, start, rotary, on_block)
        assert i == len(self.schedule)
        return f.x

    def _run_block(
        self,
        i: int,
        f: RunFrame,
        start: int,
        rotary: RotaryTables | None,
        on_block: Callable[[RunFrame], None] | None,
    ) -> int:
        """Run effective layer ``i`` on ``f.x`` (unless a resumed pass starts later)."""
        if i >= start:
            if on_block is not None:
                f.index = i
                on_block(f)
            f.x = self.blocks[i](f.x, rotary)
        return i + 1

    def _head(self, resid: Float[torch.Tensor, "batch pos d_model"]) -> Float[torch.Tensor, "batch pos d_vocab"]:
        """``ln_final``, the exit gate of the last step where it reads ``ln_final``, unembedding."""
        normed = self.ln_final(resid)
        if self.exit_gate is not None and self._gate_reads_ln_final and len(self.loops):
            self.loops[-1].hook_exit_gate(self.exit_gate(normed))
        return self.unembed_residual(normed)

    def _initial_inner_state(self, like: torch.Tensor) -> torch.Tensor:
        if self.inner_init is None:
            return torch.zeros_like(like)
        return self.inner_init.to(like.dtype).expand_as(like).contiguous()
