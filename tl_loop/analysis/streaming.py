"""Streaming analysis: reduce activations inside forward hooks instead of caching them.

A cache of a 32-step run of a real looped model holds every hook of every effective layer; the
reducers here keep only what their statistic needs (the previous step's state of each layer of
the cycle, a reference state, running per-step results), so memory stays flat in the number of
steps. How the pieces connect:

* a *reducer* (``ResidualStats``, ``AttentionStats``, ``DistanceToReference``, ``HeadPatterns``,
  ``LayerStates``, ``InferenceStagesReducer``) says which hook points it reads
  (``reducer.hooks(model, schedule)`` -> ``[(name, fn), ...]``, which also resets it) and turns
  what it saw into a result (``reducer.result()``);
* :func:`run_streaming` builds the schedule at the run's ``n_steps``, attaches every reducer's
  hooks, runs ``model.run_with_hooks`` once without computing logits, and returns the results.

Each result is the same object, computed with the same functions, as its cache-based twin:

=========================  ==================================================
reducer                    cache-based twin
=========================  ==================================================
``ResidualStats``          ``convergence.residual_stats(cache)``
``AttentionStats``         ``attention.attention_stabilisation(cache)``
``DistanceToReference``    ``convergence.distance_to_reference(cache, ref)``
``HeadPatterns``           ``attention.head_patterns_across_steps(cache, j, h)``
``LayerStates``            ``cache.stack_loop(name)[:, j]``
``InferenceStagesReducer`` ``stages.inference_stages(cache)``
=========================  ==================================================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float

from tl_loop.analysis._common import Metric, check_metric, reduce_tokens, vector_distance
from tl_loop.analysis.attention import AttentionStabilisation, PatternMetric, head_stats, pattern_distance
from tl_loop.analysis.convergence import ResidualStreamStats
from tl_loop.analysis.paper_metrics import matrix_entropy
from tl_loop.analysis.stages import STAGE_FIELDS, InferenceStages, layer_labels, layer_stage_stats, logit_lens
from tl_loop.hook_names import block_hook
from tl_loop.schedule import Schedule
from tl_loop.threads import exclusive

Hook = tuple[str, Callable[..., None]]


def _is_looped(model: Any) -> bool:
    return hasattr(model, "schedule") and hasattr(model.cfg, "effective_depth")


def _loop_hooks(
    schedule: Schedule | None,
    name: str,
    fn: Callable[[torch.Tensor, int, int], None],
    layers: list[int] | None = None,
) -> list[Hook]:
    """One hook per loop layer: ``fn(activation, step, layer_in_cycle)``."""
    if schedule is None:
        raise TypeError("this reducer reads the loop's layers: it needs a looped model")
    layers = list(range(schedule.layers_per_step)) if layers is None else layers
    hooks: list[Hook] = []
    for r in range(schedule.n_steps):
        for j in layers:

            def call(x: torch.Tensor, hook: Any, r: int = r, j: int = j) -> None:
                fn(x.detach(), r, j)

            hooks.append((block_hook(schedule.index(r, j), name), call))
    return hooks


class _Grid:
    """A ``[rows, cols, *value.shape]`` tensor (float32, or ``dtype=None``: the values' dtype)
    filled one value at a time.

    Allocated once, at the first value, so the small per-layer results are not interleaved with
    the forward pass's large temporaries on the heap (which keeps the C allocator from reusing
    freed blocks and makes the resident set grow with depth)."""

    def __init__(self, rows: int, cols: int, dtype: torch.dtype | None = torch.float32) -> None:
        self.rows, self.cols, self.dtype = rows, cols, dtype
        self.data: torch.Tensor | None = None

    def put(self, r: int, j: int, value: torch.Tensor) -> None:
        if self.data is None:
            dtype = value.dtype if self.dtype is None else self.dtype
            self.data = torch.zeros(self.rows, self.cols, *value.shape, dtype=dtype, device=value.device)
        self.data[r, j] = value

    def get(self, empty_value_shape: tuple[int, ...] = ()) -> torch.Tensor:
        if self.data is None:  # no value seen (zero rows)
            return torch.zeros(self.rows, self.cols, *empty_value_shape)
        return self.data


class Reducer:
    """Base class: ``hooks`` (resets the reducer) and ``result``."""

    def hooks(self, model: Any, schedule: Schedule | None) -> list[Hook]:
        raise NotImplementedError

    def result(self) -> Any:
        raise NotImplementedError


def _shape(schedule: Schedule | None) -> tuple[int, int]:
    if schedule is None:
        raise TypeError("this reducer reads the loop's layers: it needs a looped model")
    return schedule.n_steps, schedule.layers_per_step


class ResidualStats(Reducer):
    """Step-to-step distances, norms and matrix entropy of every layer of the cycle; keeps one
    state per layer of the cycle. Result: ``convergence.ResidualStreamStats``."""

    def __init__(
        self, metric: Metric = "relative", per_token: bool = False, name: str = "resid_post"
    ) -> None:
        check_metric(metric)
        self.metric, self.per_token, self.name = metric, per_token, name

    def hooks(self, model: Any, schedule: Schedule | None) -> list[Hook]:
        n, layers = _shape(schedule)
        self.previous: dict[int, torch.Tensor] = {}
        self.distance, self.norm, self.entropy = (
            _Grid(max(n - 1, 0), layers),
            _Grid(n, layers),
            _Grid(n, layers),
        )

        def see(x: torch.Tensor, r: int, j: int) -> None:
            if r > 0:
                self.distance.put(
                    r - 1,
                    j,
                    reduce_tokens(vector_distance(x, self.previous[j], self.metric), 0, self.per_token),
                )
            self.norm.put(r, j, reduce_tokens(x.float().norm(dim=-1), 0, self.per_token))
            self.entropy.put(r, j, matrix_entropy(x).mean(-1))
            self.previous[j] = x

        return _loop_hooks(schedule, self.name, see)

    def result(self) -> ResidualStreamStats:
        norm = self.norm.get()
        return ResidualStreamStats(
            self.distance.get(tuple(norm.shape[2:])), norm, self.entropy.get(), self.metric
        )


class AttentionStats(Reducer):
    """Per-head attention statistics at every step; keeps one pattern per layer of the cycle.
    Result: ``attention.AttentionStabilisation``."""

    FIELDS = ("entropy", "sink", "previous_token", "colsum")

    def __init__(self, metric: PatternMetric = "js") -> None:
        self.metric = metric

    def hooks(self, model: Any, schedule: Schedule | None) -> list[Hook]:
        n, layers = _shape(schedule)
        self.previous: dict[int, torch.Tensor] = {}
        self.stats = {k: _Grid(n, layers) for k in self.FIELDS}
        self.distance = _Grid(max(n - 1, 0), layers)

        def see(p: torch.Tensor, r: int, j: int) -> None:
            if r > 0:
                self.distance.put(r - 1, j, pattern_distance(p, self.previous[j], self.metric).mean(0))
            for k, v in head_stats(p).items():
                self.stats[k].put(r, j, v)
            self.previous[j] = p

        return _loop_hooks(schedule, "attn.hook_pattern", see)

    def result(self) -> AttentionStabilisation:
        fields = {k: grid.get() for k, grid in self.stats.items()}
        n_heads = fields["entropy"].shape[-1] if fields["entropy"].ndim == 3 else 0
        return AttentionStabilisation(distance=self.distance.get((n_heads,)), metric=self.metric, **fields)


class DistanceToReference(Reducer):
    """Distance of every layer's state at every step to ``reference[layer_in_cycle]``
    (``[layer_in_cycle, *token, d_model]``). Result: ``[step, layer_in_cycle(, *token)]``."""

    def __init__(
        self,
        reference: torch.Tensor,
        metric: Metric = "relative",
        per_token: bool = False,
        name: str = "resid_post",
    ) -> None:
        check_metric(metric)
        self.reference, self.metric, self.per_token, self.name = reference, metric, per_token, name

    def hooks(self, model: Any, schedule: Schedule | None) -> list[Hook]:
        n, layers = _shape(schedule)
        if self.reference.shape[0] != layers:
            raise ValueError(f"reference has {self.reference.shape[0]} layers, the cycle has {layers}")
        self.values = _Grid(n, layers)

        def see(x: torch.Tensor, r: int, j: int) -> None:
            d = vector_distance(x, self.reference[j].to(x.device), self.metric)
            self.values.put(r, j, reduce_tokens(d, 0, self.per_token))

        return _loop_hooks(schedule, self.name, see)

    def result(self) -> torch.Tensor:
        return self.values.get()


class LayerStates(Reducer):
    """One layer of the cycle's state at every step, ``[step, *token, d_model]`` (1 / L of the
    ``stack_loop`` tensor of that hook, nothing else)."""

    def __init__(self, layer_in_cycle: int = -1, name: str = "resid_post") -> None:
        self.layer_in_cycle, self.name = layer_in_cycle, name

    def hooks(self, model: Any, schedule: Schedule | None) -> list[Hook]:
        n, layers = _shape(schedule)
        self.states = _Grid(n, 1, dtype=None)
        return _loop_hooks(
            schedule,
            self.name,
            lambda x, r, _: self.states.put(r, 0, x),
            layers=[self.layer_in_cycle % layers],
        )

    def result(self) -> torch.Tensor:
        return self.states.get()[:, 0]


class HeadPatterns(Reducer):
    """One head's pattern at every step, ``[step, q, k]`` (``batch`` given) or
    ``[step, batch, q, k]``."""

    def __init__(self, layer_in_cycle: int, head: int, batch: int | None = 0) -> None:
        self.layer_in_cycle, self.head, self.batch = layer_in_cycle, head, batch

    def hooks(self, model: Any, schedule: Schedule | None) -> list[Hook]:
        n, layers = _shape(schedule)
        self.patterns = _Grid(n, 1, dtype=None)

        def see(p: torch.Tensor, r: int, j: int) -> None:
            p = p[:, self.head]
            self.patterns.put(r, 0, p if self.batch is None else p[self.batch])

        return _loop_hooks(schedule, "attn.hook_pattern", see, layers=[self.layer_in_cycle % layers])

    def result(self) -> torch.Tensor:
        return self.patterns.get()[:, 0]


class InferenceStagesReducer(Reducer):
    """Stages of inference of every effective layer, given the final logits (see
    :func:`streaming_inference_stages`, which finds them first). Works on feedforward
    TransformerLens models too. Result: ``stages.InferenceStages``."""

    def __init__(self, final_logits: torch.Tensor, per_token: bool = False) -> None:
        self.final_logits, self.per_token = final_logits, per_token

    def hooks(self, model: Any, schedule: Schedule | None) -> list[Hook]:
        n = len(schedule) if schedule is not None else int(model.cfg.n_layers)
        self.n_layers = n
        self.labels = [layer.label for layer in schedule] if schedule is not None else layer_labels(model, n)
        self.lens = logit_lens(model)
        self.final_logprobs = F.log_softmax(self.final_logits.float(), dim=-1)
        self.target = self.final_logits.argmax(-1)
        self.previous: torch.Tensor | None = None
        self.rows = {k: _Grid(n, 1) for k in STAGE_FIELDS}

        def first(x: torch.Tensor, hook: Any) -> None:
            self.previous = x.detach()

        def see(x: torch.Tensor, hook: Any, i: int) -> None:
            x = x.detach()
            assert self.previous is not None
            for k, v in layer_stage_stats(
                x, self.previous, self.lens(x), self.final_logprobs, self.target
            ).items():
                self.rows[k].put(i, 0, v)
            self.previous = x

        hooks: list[Hook] = [("blocks.0.hook_resid_pre", first)]
        for i in range(n):
            hooks.append((f"blocks.{i}.hook_resid_post", lambda x, hook, i=i: see(x, hook, i)))
        return hooks

    def result(self) -> InferenceStages:
        fields = {k: grid.get()[:, 0] for k, grid in self.rows.items()}
        if not self.per_token:
            fields = {k: v.flatten(1).mean(-1) for k, v in fields.items()}
        return InferenceStages(labels=self.labels, **fields)


@exclusive
@torch.no_grad()
def run_streaming(
    model: Any, tokens: Any, *reducers: Reducer, n_steps: int | None = None, **forward_kwargs: Any
) -> Any:
    """Run ``model`` once with every reducer's hooks attached and no cache; return the reducers'
    results (a single result for a single reducer, else a list). ``n_steps`` runs a looped model
    at that depth (hook names follow).

    >>> from tl_loop import LoopedConfig, HookedLoopedTransformer
    >>> from tl_loop.analysis import residual_stats
    >>> cfg = LoopedConfig(d_model=16, d_head=4, d_vocab=20, n_core_layers=2, n_steps=4)
    >>> model = HookedLoopedTransformer(cfg, seed=0)
    >>> tokens = torch.tensor([[1, 2, 3, 4]])
    >>> streamed, attn = run_streaming(model, tokens, ResidualStats(), AttentionStats(), n_steps=12)
    >>> streamed.step_distance.shape, attn.distance.shape
    (torch.Size([11, 2]), torch.Size([11, 2, 4]))
    >>> _, cache = model.run_with_cache(tokens, n_steps=12)
    >>> torch.allclose(streamed.step_distance, residual_stats(cache).step_distance, atol=1e-6)
    True
    """
    looped = _is_looped(model)
    if n_steps is not None and not looped:
        raise TypeError("n_steps applies to looped models only")
    schedule = (
        Schedule.from_config(model.cfg, model.cfg.n_steps if n_steps is None else n_steps) if looped else None
    )
    hooks = [h for r in reducers for h in r.hooks(model, schedule)]
    kwargs = dict(forward_kwargs)
    if looped and n_steps is not None:
        kwargs["n_steps"] = n_steps
    model.run_with_hooks(tokens, fwd_hooks=hooks, return_type=None, **kwargs)
    results = [r.result() for r in reducers]
    return results[0] if len(results) == 1 else results


@exclusive
@torch.no_grad()
def streaming_inference_stages(
    model: Any,
    tokens: Any,
    final_logits: Float[torch.Tensor, "batch pos d_vocab"] | None = None,
    per_token: bool = False,
    n_steps: int | None = None,
    **forward_kwargs: Any,
) -> InferenceStages:
    """:func:`tl_loop.analysis.inference_stages` without a cache. Without ``final_logits`` a first
    pass captures only the last layer's output, whose logit lens is the final distribution (as
    in the cache-based function); a second pass streams every layer.

    >>> from tl_loop import LoopedConfig, HookedLoopedTransformer
    >>> cfg = LoopedConfig(d_model=16, d_head=4, d_vocab=20, n_core_layers=2, n_steps=3)
    >>> model = HookedLoopedTransformer(cfg, seed=0)
    >>> s = streaming_inference_stages(model, torch.tensor([[1, 2, 3]]), n_steps=8)
    >>> len(s.labels), s.rank[-1].item()
    (16, 1.0)
    """
    looped = _is_looped(model)
    if final_logits is None:
        n = (
            model.cfg.effective_depth(model.cfg.n_steps if n_steps is None else n_steps)
            if looped
            else model.cfg.n_layers
        )
        seen: list[torch.Tensor] = []
        kwargs = dict(forward_kwargs)
        if looped and n_steps is not None:
            kwargs["n_steps"] = n_steps
        model.run_with_hooks(
            tokens,
            fwd_hooks=[(f"blocks.{n - 1}.hook_resid_post", lambda x, hook: seen.append(x.detach()))],
            return_type=None,
            **kwargs,
        )
        final_logits = logit_lens(model)(seen[0])
    return run_streaming(
        model, tokens, InferenceStagesReducer(final_logits, per_token), n_steps=n_steps, **forward_kwargs
    )
