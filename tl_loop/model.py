"""``HookedLoopedTransformer``: a looped LM unrolled into per-iteration hook points.

How the pieces connect:

* **Weights** are stored once, in physical stacks: ``model.prelude[j]``, ``model.core[j]``
  (the recurrent block), ``model.inner[j]`` (HRM), ``model.coda[j]``, plus ``embed``,
  ``pos_embed`` (learned positions only), ``adapter``, ``final_norm``, ``unembed``,
  ``exit_gate``. ``state_dict()`` holds these only.
* **Views** carry the hook points: ``model.blocks[i]`` is effective layer ``i`` of the unrolled
  model (a ``HookedBlock`` computing with the shared weights of its physical block),
  ``model.loops[r]`` holds the loop-level hooks of step ``r``. There is one view per name, kept
  across depths: when the number of steps changes, view ``i`` is re-bound to the weights that
  run at effective layer ``i`` there, so a hook stays attached to its *name*. Views beyond the
  current depth are hidden (no hook name of the model) until the depth reaches them again.
* **The program** (``model.program``, see ``tl_loop.program``) is the forward pass as one list of
  operations; ``forward`` and every other path that executes the model interpret it.
  ``model.schedule`` says which physical block each effective layer runs.

Every TransformerLens verb works unchanged: ``run_with_hooks``, ``run_with_cache`` (which returns
a ``tl_loop.LoopedActivationCache``, an ``ActivationCache`` subclass), ``hooks()``,
``reset_hooks``, ``transformer_lens.patching``.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import logging
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
import torch.nn as nn
from jaxtyping import Bool, Float, Int
from transformer_lens import HookedRootModule
from transformer_lens.utilities import lm_cross_entropy_loss

from tl_loop.components.attention import AttentionContext
from tl_loop.components.base import LoopHookPoint, has_hooks
from tl_loop.components.block import BlockWeights, HookedBlock
from tl_loop.components.embed import Adapter, Embedding, ExitGate, PosEmbedding, TiedUnembedding, Unembedding
from tl_loop.components.loop import LoopStep
from tl_loop.components.norm import HookedNorm, NormWeights
from tl_loop.components.rotary import RotaryTables, rotary_inv_freq, rotary_tables
from tl_loop.components.base import all_hook_points
from tl_loop.config import LoopedConfig
from tl_loop.devices import PlacementMixin
from tl_loop.errors import InputError
from tl_loop.execution import Forward
from tl_loop.generation import generate as _generate
from tl_loop.program import Program, RunFrame
from tl_loop.splice import attach_splices, check_splice, detached_site_points
from tl_loop.threads import CallGuard, exclusive
from tl_loop.weight_processing import WeightProcessingMixin

ReturnType = Literal["logits", "loss", "both"] | None
_CallGuard = CallGuard  # the name models pickled before tl_loop.threads refer to


class _Views(nn.Module):
    """Hook-free views for one number of steps, detached from the model (never registered):
    what a cache recorded at another depth reads its weights through."""

    def __init__(self, model: "HookedLoopedTransformer", n_steps: int) -> None:
        super().__init__()
        cfg = model.cfg
        self.program = Program.from_config(cfg, n_steps)
        self.schedule = self.program.schedule
        stacks = model._stacks()
        self.blocks = nn.ModuleList(
            HookedBlock(stacks[layer.stage][layer.layer_in_stack], cfg) for layer in self.schedule
        )
        self.loops = nn.ModuleList(LoopStep(cfg, r, model._loop_norm_weights) for r in range(n_steps))
        for r, step in enumerate(self.loops):
            step.set_last(r == n_steps - 1)


class HookedLoopedTransformer(PlacementMixin, WeightProcessingMixin, HookedRootModule):
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
        self._guard = CallGuard()
        if not isinstance(cfg, LoopedConfig):
            raise InputError(f"cfg must be a LoopedConfig, got {type(cfg).__name__}")
        cfg = copy.deepcopy(cfg)  # the model owns its config: nothing it does changes the caller's
        cfg.n_devices = 1  # TransformerLens's field: the devices the weights span (``place``)
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

        # One view per hook name, kept across depths (see the module docstring).
        self._block_pool: list[HookedBlock] = []
        self._block_bound: list[str] = []  # the physical block each pooled view computes with
        self._loop_pool: list[LoopStep] = []
        self._hidden_hook_points: list[tuple[str, nn.Module]] = []
        self._hidden_hooked: list[tuple[str, nn.Module]] = []
        self._detached: tuple[int, _Views] | None = None
        self._hook_free: dict[str, nn.Module] | None = None
        self._splices: list[Any] = []
        self._removed_splices: list[Any] = []  # unspliced, their sites still to take off their hosts
        self._rotary_cache: dict[tuple[int, str, torch.dtype], RotaryTables] = {}
        self._placement: Any = None  # a tl_loop.placement.Placement when the weights span several devices
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

    def _stacks(self) -> dict[str, nn.ModuleList]:
        return {"prelude": self.prelude, "inner": self.inner, "core": self.core, "coda": self.coda}

    def _install_views(self, n_steps: int) -> None:
        """Show the hook points of ``n_steps`` steps: pooled views re-bound to the weights that
        run at each effective layer there, the rest hidden with whatever hooks they hold."""
        cfg = self.cfg
        program = Program.from_config(cfg, n_steps)
        stacks = self._stacks()
        for layer in program.schedule:
            weights = stacks[layer.stage][layer.layer_in_stack]
            if layer.index == len(self._block_pool):
                self._block_pool.append(HookedBlock(weights, cfg))
                self._block_bound.append(layer.physical)
            elif self._block_bound[layer.index] != layer.physical:
                self._block_pool[layer.index].bind(weights)
                self._block_bound[layer.index] = layer.physical
        while len(self._loop_pool) < n_steps:
            self._loop_pool.append(LoopStep(cfg, len(self._loop_pool), self._loop_norm_weights))
        for r in range(n_steps):
            self._loop_pool[r].set_last(r == n_steps - 1)
        # Assigning registers them as children, so named_modules() / setup() see their hooks.
        self.blocks = nn.ModuleList(self._block_pool[: len(program.schedule)])
        self.loops = nn.ModuleList(self._loop_pool[:n_steps])
        self.blocks.train(self.training)
        self.loops.train(self.training)
        self.program, self.schedule = program, program.schedule
        cfg.n_steps = n_steps
        cfg.n_layers = cfg.effective_depth(n_steps)
        attach_splices(self)
        self.setup()
        self._hidden_hook_points = [(n, hp) for n, hp in self._pooled_hook_points() if n not in self.hook_dict]
        # No hook can be added to a hidden point (add_hook and hooks() look names up at this
        # depth), so only those hooked when hidden can be stale: the forward pass checks those.
        self._hidden_hooked = [(n, hp) for n, hp in self._hidden_hook_points if has_hooks(hp)]

    def _pooled_hook_points(self) -> list[tuple[str, nn.Module]]:
        """Every hook point of every pooled view, shown or hidden, with its name."""
        points = [p for i, b in enumerate(self._block_pool) for p in all_hook_points(b, f"blocks.{i}")]
        points += [p for r, step in enumerate(self._loop_pool) for p in all_hook_points(step, f"loops.{r}")]
        return points + detached_site_points(self)

    def _rebind_weights(self) -> None:
        """Re-read every view's weights from the physical stacks (call after replacing weight
        modules, e.g. folding a norm into the weights)."""
        self._block_bound = ["" for _ in self._block_bound]
        self._detached, self._hook_free = None, None
        for step in self._loop_pool:
            norm = step._modules.get("ln_state") or step.__dict__.get("_hidden_children", {}).get("ln_state")
            if norm is not None:
                norm.bind(self._loop_norm_weights)
        if self.cfg.norm_after_loop:
            self.ln_loop_out.bind(self._loop_norm_weights)
        self.ln_final.bind(self.final_norm)
        self._install_views(self.cfg.n_steps)

    def views_at(self, n_steps: int) -> Any:
        """``blocks``, ``loops``, ``schedule`` and ``program`` at ``n_steps``: the model's own
        at its current depth, else hook-free views (the last depth asked for is kept)."""
        if n_steps == self.cfg.n_steps:
            return self
        detached = self._detached  # read once: another thread may replace it meanwhile
        if detached is None or detached[0] != n_steps:
            detached = self._detached = (n_steps, _Views(self, n_steps))
        return detached[1]

    def _hook_free_modules(self) -> dict[str, nn.Module]:
        """Hook-free views of every physical block and of the loop / final norms (built once,
        never registered, so no hook fires on them): what per-step read-outs run."""
        if self._hook_free is None:
            cfg = self.cfg
            modules: dict[str, nn.Module] = {
                f"{stage}.{j}": HookedBlock(w, cfg) for stage, stack in self._stacks().items() for j, w in enumerate(stack)
            }
            modules["ln_loop_out"] = HookedNorm(self._loop_norm_weights, cfg.norm_type, cfg.eps)
            modules["ln_final"] = HookedNorm(self.final_norm, cfg.norm_type, cfg.eps)
            self._hook_free = modules
        return self._hook_free

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

    @exclusive
    def set_n_steps(self, n_steps: int, force: bool = False) -> None:
        """Change the default number of steps. Hook points, ``cfg.n_layers``, ``schedule`` and
        ``program`` follow; weights are not copied. Hooks stay bound to their names: a hook on a
        name that exists at the new depth keeps firing; one on a name that does not makes the
        next forward pass raise (``reset_hooks()`` removes hooks at every depth)."""
        n_steps = self.check_n_steps(n_steps, force)
        if n_steps != self.cfg.n_steps:
            self._install_views(n_steps)

    @contextlib.contextmanager
    def steps(self, n_steps: int, force: bool = False) -> Iterator["HookedLoopedTransformer"]:
        """Temporarily run at ``n_steps`` steps: ``with model.steps(16): model.run_with_cache(...)``."""
        with self._guard():  # held for the whole block: no other thread runs at this depth
            previous = self.cfg.n_steps
            self.set_n_steps(n_steps, force)
            try:
                yield self
            finally:
                self.set_n_steps(previous, force=True)

    def _any_hooks_attached(self) -> bool:
        return any(has_hooks(hp) for hp in self.hook_points())

    def hook_points(self):  # type: ignore[override]
        """Every hook point, those of other depths included (so ``reset_hooks`` and the
        ``hooks()`` context manager clear hooks wherever they were attached)."""
        return [*self.hook_dict.values(), *(hp for _, hp in self._hidden_hook_points)]

    def _check_no_hidden_hooks(self) -> None:
        if not self._hidden_hooked:
            return
        stale = [name for name, hp in self._hidden_hooked if has_hooks(hp)]
        if stale:
            raise InputError(
                f"hooks are attached to {stale[:3]}{' and more' if len(stale) > 3 else ''}, which do not exist "
                f"at n_steps={self.cfg.n_steps} ({self.cfg.n_layers} effective layers) with the model's current "
                "use_* flags; run at a depth (and with the flags) that has them, or remove them with "
                "model.reset_hooks()"
            )

    # ------------------------------------------------------------------ TL verbs
    @exclusive
    def run_with_hooks(self, *model_args: Any, n_steps: int | None = None, force: bool = False, **kwargs: Any):  # type: ignore[override]
        """As ``HookedRootModule.run_with_hooks``; ``n_steps=`` runs (and names hooks) at that depth."""
        if n_steps is None:
            return super().run_with_hooks(*model_args, **kwargs)
        with self.steps(n_steps, force):
            return super().run_with_hooks(*model_args, **kwargs)

    @exclusive
    def run_with_cache(  # type: ignore[override]
        self, *model_args: Any, n_steps: int | None = None, force: bool = False, return_cache_object: bool = True, **kwargs: Any
    ):
        """As TransformerLens: returns ``(output, cache)`` with a ``LoopedActivationCache``.

        ``n_steps=`` runs at that depth; the cache stays bound to it afterwards. A model placed
        over several devices caches on ``cfg.device`` unless ``device=`` says otherwise.
        """
        from tl_loop.cache import LoopedActivationCache

        if self._placement is not None and kwargs.get("device") is None:
            kwargs["device"] = self.cfg.device  # placed over several devices: one cache, where TL allocates
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

    # ------------------------------------------------------------------ TransformerLens hook flags
    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Compute each head's write to the stream (``blocks.{i}.attn.hook_result``)."""
        self._set_hook_flag("use_attn_result", use_attn_result)

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        """Give each head its own copy of the attention input for q, k and v
        (``blocks.{i}.attn.hook_q_input`` / ``hook_k_input`` / ``hook_v_input``, before ``ln1``)."""
        self._set_hook_flag("use_split_qkv_input", use_split_qkv_input)

    def set_use_attn_in(self, use_attn_in: bool) -> None:
        """Give each head its own copy of the attention input (``blocks.{i}.attn.hook_attn_in``)."""
        self._set_hook_flag("use_attn_in", use_attn_in)

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        """Fire ``blocks.{i}.hook_mlp_in`` on the MLP half's input (before ``ln2``)."""
        self._set_hook_flag("use_hook_mlp_in", use_hook_mlp_in)

    def _set_hook_flag(self, flag: str, value: bool) -> None:
        if not isinstance(value, bool):
            raise InputError(f"{flag} must be True or False, got {value!r}")
        previous = getattr(self.cfg, flag)
        setattr(self.cfg, flag, value)
        try:
            self.cfg._validate()
        except ValueError as err:
            setattr(self.cfg, flag, previous)
            raise InputError(str(err).removeprefix("LoopedConfig: ")) from None
        for view in self._block_pool:
            view.refresh_flagged_hooks()
        self._detached, self._hook_free = None, None
        self._install_views(self.cfg.n_steps)

    # ------------------------------------------------------------------ splicing modules in
    def splice(self, hook: str, module: nn.Module, layer_in_cycle: int | None = None) -> None:
        """Run ``module`` on the activation at ``hook`` at every step, its output replacing it.

        ``hook`` is a block hook suffix (``"hook_resid_post"``, ``"attn.hook_z"``: at every
        effective layer, or at layer ``layer_in_cycle`` of the cycle at every step), a loop hook
        suffix (``"hook_state_out"``: at every step) or a full hook name. The module is stored
        once; its own ``HookPoint``s appear at each site under the host's name
        (``blocks.5.hook_resid_post.hook_sae_acts_post``), cached, patchable and kept across
        depth changes. See ``tl_loop.splice``.
        """
        self._splices.append(check_splice(self, hook, module, layer_in_cycle))
        self._install_views(self.cfg.n_steps)

    def unsplice(self, hook: str | None = None, module: nn.Module | None = None) -> None:
        """Undo ``splice`` for every splice matching ``hook`` and/or ``module`` (default: all)."""
        matches = [s for s in self._splices if (hook is None or s.hook == hook) and (module is None or s.module is module)]
        if not matches and (hook is not None or module is not None):
            raise InputError(f"unsplice: no module is spliced at {hook!r}" + (f" as {type(module).__name__}" if module is not None else ""))
        self._splices = [s for s in self._splices if s not in matches]
        self._removed_splices += matches
        self._install_views(self.cfg.n_steps)

    @property
    def splices(self) -> list[Any]:
        """The modules spliced in (``Splice`` objects: ``hook``, ``module``, ``layer_in_cycle``)."""
        return list(self._splices)

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

    @exclusive
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
        device_map: str | dict[str, Any] | None = None,
        max_memory: dict[Any, int | str] | None = None,
        **options: Any,
    ) -> "HookedLoopedTransformer":
        """Load a released checkpoint (local folder or Hub id); see ``tl_loop.loading``.

        ``device_map`` (``"auto"``, ``"balanced"``, ``"sequential"`` or ``{module: device}``)
        places the physical blocks over several devices, each tensor loaded onto its own; see
        ``place``."""
        from tl_loop.loading import load_pretrained

        return load_pretrained(
            name_or_path, family=family, n_steps=n_steps, device=device, dtype=dtype, revision=revision,
            device_map=device_map, max_memory=max_memory, **options
        )

    # ------------------------------------------------------------------ placement over devices
    @exclusive
    def place(
        self, device_map: str | dict[str, Any] = "auto", max_memory: dict[Any, int | str] | None = None
    ) -> "HookedLoopedTransformer":
        """Put the embedding, each physical block and the unembedding on devices; returns the model.

        ``device_map``: ``{module: device}`` over ``embed``, ``prelude.{j}``, ``adapter``,
        ``loop_norm``, ``inner.{j}``, ``core.{j}``, ``exit_gate``, ``coda.{j}``, ``final_norm``,
        ``unembed`` (prefixes such as ``"core"`` or ``""`` cover several; devices as accelerate
        writes them: ``0``, ``"cuda:1"``, ``"cpu"``), or ``"auto"`` / ``"balanced"`` /
        ``"balanced_low_0"`` / ``"sequential"``, resolved by accelerate within ``max_memory``
        (e.g. ``{0: "70GiB", 1: "70GiB"}``). The unrolled views follow their physical block; the
        pass moves its residual stream, state and injection input at each device boundary.
        ``cfg.device`` becomes the embedding's device, ``cfg.n_devices`` the number of devices;
        ``model.to(device)`` gathers everything again. See ``tl_loop.placement``."""
        from tl_loop.placement import place

        return place(self, device_map, max_memory)

    @property
    def device_map(self) -> dict[str, str]:
        """``{module: device}`` of the placement units, read from where their weights are now."""
        from tl_loop.placement import current_device_map

        return current_device_map(self)

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
        self,
        input: str | list[str],
        prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None,
        move_to_device: bool = True,
        truncate: bool = True,
    ) -> Int[torch.Tensor, "batch pos"]:
        """Tokenize like TransformerLens (needs a tokenizer); a batch of texts is padded on
        ``padding_side`` (default: the tokenizer's)."""
        tokens, _ = self._tokenize(input, prepend_bos, padding_side, truncate)
        return tokens.to(self.W_E.device) if move_to_device else tokens

    def _tokenize(
        self, input: str | list[str], prepend_bos: bool | None, padding_side: str | None, truncate: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(tokens, attention_mask)``: the mask is None unless the batch was padded."""
        if self.tokenizer is None:
            raise InputError("this model has no tokenizer: pass token ids (a LongTensor [batch, pos])")
        if padding_side not in (None, "left", "right"):
            raise InputError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        prepend_bos = self.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
        texts = [input] if isinstance(input, str) else list(input)
        tok = self.tokenizer
        bos = getattr(tok, "bos_token", None)
        if prepend_bos and bos is not None:
            texts = [bos + t for t in texts]
        if len(texts) > 1 and tok.pad_token is None:  # as TransformerLens: pad with EOS (or BOS)
            tok.pad_token = tok.eos_token if tok.eos_token is not None else bos
        side = tok.padding_side
        tok.padding_side = padding_side or side
        try:
            enc = tok(texts, return_tensors="pt", padding=len(texts) > 1, add_special_tokens=False,
                      truncation=truncate, max_length=self.cfg.n_ctx if truncate else None)
        finally:
            tok.padding_side = side
        mask = enc.get("attention_mask") if hasattr(enc, "get") else None
        if mask is not None and bool(mask.all()):
            mask = None
        return enc["input_ids"], mask

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
            directions = directions * self.final_norm.w.to(directions.device)
        return directions

    def accumulated_bias(self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True) -> torch.Tensor:
        """Sum of attention and MLP output biases before ``layer`` (TransformerLens semantics:
        exact only when the residual stream is a plain sum, see ``LoopedActivationCache``)."""
        total = torch.zeros(self.cfg.d_model, dtype=self.W_E.dtype, device=self.W_E.device)
        for i in range(layer + (1 if mlp_input else 0)):
            block = self.blocks[i]
            total = total + block.attn.b_O.to(total.device)  # .to: a model placed over several devices
            if include_mlp_biases and i < layer:
                total = total + block.mlp.b_out.to(total.device)
        return total

    # ------------------------------------------------------------------ forward
    def _input_tokens(
        self, input: Any, prepend_bos: bool | None, padding_side: str | None, attention_mask: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(tokens, attention_mask)`` of a pass: text is tokenized (a padded batch brings its
        mask), token ids are checked; the mask is bool, or None when nothing is padding."""
        if isinstance(input, str) or (isinstance(input, list) and input and isinstance(input[0], str)):
            tokens, mask = self._tokenize(input, prepend_bos, padding_side)
            tokens = self._validate_tokens(tokens)
            return tokens, self._check_attention_mask(attention_mask if attention_mask is not None else mask, tuple(tokens.shape))
        tokens = self._validate_tokens(input)
        return tokens, self._check_attention_mask(attention_mask, tuple(tokens.shape))

    def _check_attention_mask(self, mask: Any, shape: tuple[int, ...]) -> torch.Tensor | None:
        if mask is None:
            return None
        if not isinstance(mask, torch.Tensor) or mask.is_floating_point() or mask.is_complex():
            raise InputError(f"attention_mask must be an integer or bool tensor [batch, pos], got {type(mask).__name__} "
                             f"{getattr(mask, 'dtype', '')}")
        if mask.ndim == 1:
            mask = mask[None]
        if tuple(mask.shape) != shape:
            raise InputError(f"attention_mask has shape {tuple(mask.shape)}, the tokens {shape}")
        if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
            raise InputError("attention_mask must hold 0 (padding) and 1 (real token) only")
        mask = mask.to(device=self.W_E.device, dtype=torch.bool)
        empty = (~mask.any(-1)).nonzero().flatten().tolist()
        if empty:
            raise InputError(f"attention_mask rows {empty} have no real token")
        return None if bool(mask.all()) else mask

    def _validate_tokens(self, input: Any) -> torch.Tensor:
        if isinstance(input, (str, list)) and (isinstance(input, str) or (input and isinstance(input[0], str))):
            return self.to_tokens(input)
        if not isinstance(input, torch.Tensor):
            raise InputError(f"expected a LongTensor of token ids [batch, pos], got {type(input).__name__}")
        tokens = input
        if tokens.is_floating_point() or tokens.dtype == torch.bool or tokens.is_complex():
            raise InputError(f"tokens must be integer ids, got dtype {tokens.dtype}")
        if tokens.device.type == "meta":
            raise InputError("tokens are on the meta device (they hold no values): pass real token ids")
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

    def attention_context(
        self,
        n_pos: int,
        device: torch.device,
        attention_mask: Bool[torch.Tensor, "batch pos"] | None = None,
        positions: Int[torch.Tensor, "batch pos"] | None = None,
    ) -> AttentionContext:
        """What every attention layer of a pass over ``n_pos`` positions reads besides its input:
        RoPE tables, and with an ``attention_mask`` (bool, padding False) which keys are real and
        the positions of the real tokens (``cumsum(mask) - 1``, as TransformerLens).

        ``positions``: the query tokens' positions when they are not ``0..n_pos-1`` (decoding
        with a KV cache: the new tokens sit after the past); ``n_pos`` then bounds them (RoPE
        tables of that length) and ``attention_mask`` covers every key."""
        if positions is None and attention_mask is not None:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)
        rotary = self._rotary(n_pos, device)
        if rotary is not None and positions is not None:
            rotary = rotary._replace(cos=rotary.cos[positions], sin_signed=rotary.sin_signed[positions])
        return AttentionContext(rotary=rotary, key_valid=attention_mask, positions=positions)

    def _rotary(self, n_pos: int, device: torch.device) -> RotaryTables | None:
        """RoPE tables for positions ``0..n_pos-1`` (cached: built once per length, device and dtype)."""
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
        key_valid: Bool[torch.Tensor, "batch pos"] | None = None,
    ) -> Float[torch.Tensor, "batch pos d_model"]:
        """The state entering step 0, given the prelude output ``like``.

        ``random`` (Huginn ``like-init``): truncated normal (std ``cfg.state_init_std``, cut at
        +-3 std) times ``cfg.state_init_scale``, drawn from a private generator seeded with
        ``init_seed`` (default ``cfg.state_init_seed``): repeatable, and the global RNG is untouched.
        In a padded batch (``key_valid``) each row's real positions get the state that row would
        get alone and unpadded; padding gets zeros.
        """
        if init_seed is not None and (isinstance(init_seed, bool) or not isinstance(init_seed, int)):
            raise InputError(f"init_seed must be an int, got {type(init_seed).__name__} {init_seed!r}")
        if init_state is not None:
            if not isinstance(init_state, torch.Tensor):
                raise InputError(f"init_state must be a tensor, got {type(init_state).__name__}")
            if tuple(init_state.shape) != tuple(like.shape):
                raise InputError(
                    f"init_state has shape {tuple(init_state.shape)}, expected [batch, pos, d_model] = {tuple(like.shape)}"
                )
            if init_state.device != like.device and self._placement is not None:
                init_state = init_state.to(like.device)  # placed over several devices: follow the stream
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
        if key_valid is not None:
            state = torch.zeros_like(like)
            for row, valid in enumerate(key_valid):
                state[row, valid] = self._random_state((1, int(valid.sum()), like.shape[-1]), like, seed)[0]
            return state
        return self._random_state(tuple(like.shape), like, seed)

    def _random_state(self, shape: tuple[int, ...], like: torch.Tensor, seed: int) -> torch.Tensor:
        gen = torch.Generator(device=like.device).manual_seed(int(seed))
        std = float(self.cfg.state_init_std)  # type: ignore[arg-type]
        x = torch.empty(shape, dtype=torch.float32, device=like.device)
        nn.init.trunc_normal_(x, mean=0.0, std=std, a=-3 * std, b=3 * std, generator=gen)
        return (x * self.cfg.state_init_scale).to(like.dtype)

    @exclusive
    def forward(
        self,
        input: Int[torch.Tensor, "batch pos"] | Float[torch.Tensor, "batch pos d_model"] | str | list[str],
        return_type: ReturnType = "logits",
        loss_per_token: bool = False,
        prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None,
        attention_mask: Int[torch.Tensor, "batch pos"] | None = None,
        *,
        start_at_layer: int | None = None,
        stop_at_layer: int | None = None,
        tokens: Int[torch.Tensor, "batch pos"] | None = None,
        state: Float[torch.Tensor, "batch pos d_model"] | None = None,
        prelude_out: Float[torch.Tensor, "batch pos d_model"] | None = None,
        inner_state: Float[torch.Tensor, "batch pos d_model"] | None = None,
        n_steps: int | None = None,
        init_state: Float[torch.Tensor, "batch pos d_model"] | None = None,
        init_seed: int | None = None,
        force: bool = False,
    ) -> Any:
        """Run the unrolled model.

        Args:
            input: token ids ``[batch, pos]`` (or text, when the model has a tokenizer); with
                ``start_at_layer``, the residual stream entering that layer ``[batch, pos, d_model]``.
            return_type: ``"logits"``, ``"loss"``, ``"both"`` (``(logits, loss)``) or ``None``.
            loss_per_token: return the per-token loss ``[batch, pos - 1]``.
            prepend_bos: with text input, put the BOS token first (default
                ``cfg.default_prepend_bos``).
            padding_side: with a batch of texts, pad on this side (default: the tokenizer's).
            attention_mask: ``[batch, pos]``, 1 on real tokens and 0 on padding (computed from
                the tokenizer for a padded batch of texts). Padding is never attended to, real
                tokens keep the positions they would have unpadded (left padding shifts them),
                and padding is left out of the loss: real positions get the logits of an
                unpadded run.
            start_at_layer: start at effective layer ``k`` from ``input`` (TransformerLens
                semantics). A layer inside or after the loop needs what the rest of the pass
                reads besides the stream: ``prelude_out`` (injected at every later step),
                ``state`` (the recurrent state, HRM's z_H) and ``inner_state`` (HRM's z_L). A
                missing one raises naming it; ``run_to_layer`` returns all of them.
            stop_at_layer: return the residual stream entering effective layer ``k``
                (``blocks.{k}.hook_resid_pre``; ``k = n_layers``: the stream entering
                ``ln_final``) instead of logits; negative values count from the end.
            tokens: the tokens, for the loss when starting from a residual stream.
            state, prelude_out, inner_state: see ``start_at_layer``.
            n_steps: steps for this call (default ``cfg.n_steps``); hooks follow their names.
            init_state: the state entering step 0 (``[batch, pos, d_model]``).
            init_seed: seed of the random initial state (families with ``state_init="random"``).
            force: allow ``n_steps`` above ``cfg.max_steps``.
        """
        if return_type not in ("logits", "loss", "both", None):
            raise InputError(f"return_type must be 'logits', 'loss', 'both' or None, got {return_type!r}")
        if n_steps is not None:
            n_steps = self.check_n_steps(n_steps, force)
            if n_steps != self.cfg.n_steps:
                with self.steps(n_steps, force):
                    return self.forward(
                        input, return_type, loss_per_token, prepend_bos, padding_side, attention_mask,
                        start_at_layer=start_at_layer, stop_at_layer=stop_at_layer, tokens=tokens, state=state,
                        prelude_out=prelude_out, inner_state=inner_state, init_state=init_state, init_seed=init_seed,
                    )
        self._check_no_hidden_hooks()
        program = self.program
        if start_at_layer is None:
            tokens, attention_mask = self._input_tokens(input, prepend_bos, padding_side, attention_mask)
            frame = RunFrame(0)
            start = 0
        else:
            first = self._layer_arg(start_at_layer, "start_at_layer", allow_end=False)
            start = program.block_position(first)
            frame = self._start_frame(input, first, state, prelude_out, inner_state)
            if tokens is not None:
                tokens = self._validate_tokens(tokens)
            attention_mask = self._check_attention_mask(attention_mask, tuple(input.shape[:2]))
        stop = None
        if stop_at_layer is not None:
            stop = program.block_position(self._layer_arg(stop_at_layer, "stop_at_layer", allow_end=True))
            if stop < start:
                raise InputError(f"stop_at_layer={stop_at_layer} comes before start_at_layer={start_at_layer}")
        self._execute(tokens, frame=frame, start=start, stop=stop, init_state=init_state, init_seed=init_seed,
                      started_at=start_at_layer, attention_mask=attention_mask)
        if stop is not None:
            return frame.x
        if return_type is None:
            return None
        logits = frame.x
        if self._placement is not None and logits.device != self.W_E.device:
            logits = logits.to(self.W_E.device)  # over several devices: back where the tokens are
        if return_type == "logits":
            return logits
        if tokens is None:
            raise InputError("a loss needs the tokens: pass tokens= when starting from a residual stream")
        if tokens.shape[1] < 2:
            raise InputError(
                f"a loss needs at least 2 tokens per sequence (each position predicts the next), got {tokens.shape[1]}"
            )
        if attention_mask is not None and not bool((attention_mask[:, :-1] & attention_mask[:, 1:]).any()):
            raise InputError("a loss needs two consecutive real tokens in some row; the attention_mask leaves none")
        loss = lm_cross_entropy_loss(logits, tokens, attention_mask=attention_mask, per_token=loss_per_token)
        return loss if return_type == "loss" else (logits, loss)

    @exclusive
    def run_to_layer(
        self,
        input: Any,
        layer: int,
        *,
        init_state: torch.Tensor | None = None,
        init_seed: int | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> RunFrame:
        """The live variables of the pass entering effective layer ``layer`` (a ``RunFrame``:
        ``x``, ``state``, ``inner_state``, ``prelude_out``), hooks firing up to there: what
        ``forward(frame.x, start_at_layer=layer, state=frame.state, prelude_out=frame.prelude_out,
        inner_state=frame.inner_state)`` continues from."""
        n = self._layer_arg(layer, "layer", allow_end=False)
        self._check_no_hidden_hooks()
        tokens, attention_mask = self._input_tokens(input, None, None, attention_mask)
        frame = self._execute(tokens, stop=self.program.block_position(n), init_state=init_state,
                              init_seed=init_seed, attention_mask=attention_mask)
        frame.index = n
        return frame

    def _layer_arg(self, layer: Any, what: str, allow_end: bool) -> int:
        n = self.cfg.n_layers
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise InputError(f"{what} must be an int, got {layer!r}")
        k = layer + n if layer < 0 else layer
        if not 0 <= k <= (n if allow_end else n - 1):
            raise InputError(f"{what}={layer} is out of range: the model runs {n} effective layers")
        return k

    def _start_frame(self, input: Any, layer: int, state: Any, prelude_out: Any, inner_state: Any) -> RunFrame:
        if not isinstance(input, torch.Tensor) or input.ndim != 3 or input.shape[-1] != self.cfg.d_model:
            raise InputError(
                f"with start_at_layer, input is the residual stream [batch, pos, d_model={self.cfg.d_model}], "
                f"got {type(input).__name__} {tuple(getattr(input, 'shape', ()))}"
            )
        for name, t in (("state", state), ("prelude_out", prelude_out), ("inner_state", inner_state)):
            if t is not None and (not isinstance(t, torch.Tensor) or t.shape != input.shape):
                raise InputError(f"{name} must be a tensor shaped like input {tuple(input.shape)}, got {tuple(getattr(t, 'shape', ()))}")
        return RunFrame(layer, x=input, state=state, inner_state=inner_state, prelude_out=prelude_out,
                        source=prelude_out)

    @exclusive
    def _execute(
        self,
        tokens: torch.Tensor | None,
        *,
        frame: RunFrame | None = None,
        start: int = 0,
        stop: int | None = None,
        init_state: torch.Tensor | None = None,
        init_seed: int | None = None,
        on_block: Callable[[RunFrame], None] | None = None,
        on_op: Callable[[int, RunFrame], None] | None = None,
        started_at: int | None = None,
        attention_mask: torch.Tensor | None = None,
        context: AttentionContext | None = None,
    ) -> RunFrame:
        """Interpret ``program[start:stop]`` on ``frame`` (a fresh one from the tokens by default;
        a frame that carries its stream may come without tokens). ``context``: the attention
        context to use instead of the one built from the stream's length and ``attention_mask``."""
        frame = RunFrame(0) if frame is None else frame
        x = frame.x if frame.x is not None else tokens
        assert x is not None, "a pass needs tokens or a stream"
        if context is None:
            context = self.attention_context(x.shape[1], x.device, attention_mask)
        run = Forward(self, tokens, context,
                      init_state=init_state, init_seed=init_seed, on_block=on_block, on_op=on_op,
                      started_at=started_at)
        run.run(self.program, frame, start, stop)
        return frame

    # ------------------------------------------------------------------ generation
    #: ``tl_loop.generation.generate`` as a method: TransformerLens's arguments plus the loop's.
    generate = _generate

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

    def _initial_inner_state(self, like: torch.Tensor) -> torch.Tensor:
        if self.inner_init is None:
            return torch.zeros_like(like)
        return self.inner_init.to(like.device, like.dtype).expand_as(like).contiguous()
