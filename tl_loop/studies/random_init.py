"""The seed paper's random-initialisation experiment (arXiv 2604.11791, design study).

Question: do *randomly initialised* looped blocks -- no training -- reach stable fixed points, and
does that depend on the size of the recurrent block, on input injection and on where the norms
sit? The paper reports that with injection, pre-norm and Huginn-style blocks reach stable fixed
points and Ouro-style blocks do not, and that without injection only pre-norm converges, to a
degenerate point shared by all layers of the cycle. :func:`evaluate_claims` checks each claim
against the runs of a :class:`Grid`; ``docs/design_study.md`` reads the result.

Run it::

    python -m tl_loop.studies.random_init --out docs/design_study/

Setup of every run (defaults of :class:`Grid`):

* model: ``embed -> 1-layer prelude -> n_steps x (inject -> recurrent block of L layers)``,
  d_model 64, 4 heads of 16, gated SiLU MLP of 256, RMSNorm, RoPE, vocabulary 256; the state
  entering step 0 is the prelude output (``state_init="prelude"``), the prelude output is the
  injected input. No coda and no unembedding (nothing reads the logits).
* normalisation (:data:`NORMALISATIONS`): ``pre_norm`` (a norm on each sublayer's input),
  ``huginn`` (pre-norm plus a norm on the residual stream after each add, the Huginn sandwich),
  ``ouro`` (pre-norm plus a norm on each sublayer's output before the add, plus a norm on the
  state between steps, as Ouro); ``ouro_no_step_norm`` (Ouro without the norm between steps) is
  available but not in the default grid.
* injection: ``none`` (the state alone enters each step), ``add`` (state + prelude output),
  ``linear`` (a linear adapter on ``concat(state, prelude output)``, Huginn).
* initialisation (:data:`INITS`): ``tl_loop`` is ``HookedLoopedTransformer.init_weights``: every
  matrix normal(0, 0.02), attention and MLP output projections further divided by
  ``sqrt(2 * depth)`` with ``depth`` the *physical* depth (prelude + block: the model is built at
  one step, so the scaling does not depend on how many steps are run later), norm weights 1;
  ``fan_in`` is normal(0, 1 / fan_in) for every matrix without the output scaling, and
  normal(0, 1) token embeddings (PyTorch's ``nn.Embedding`` default): 1 / sqrt(d_model) for the
  matrices that read the residual stream, a scale at which the sublayers are *not* small
  perturbations of the identity.
* inputs: one batch of uniformly random token ids (2 x 32), the same for every run.

Measurements (one forward pass per run; hooks keep only the ``resid_post`` state of each layer of
the cycle at each step, no cache; the numbers come from ``tl_loop.analysis``'s functions). For
each layer ``j`` of the cycle and step ``r``, averaged over tokens:

* ``relative`` step distance ``||x[r, j] - x[r-1, j]|| / ||x[r-1, j]||`` (the state moves);
* ``direction`` step distance ``||u[r, j] - u[r-1, j]||`` with ``u = x / ||x||`` (its direction
  moves; ~ the angle in radians when small);
* the norm of the state, and the *decay exponent* ``a`` of ``d(r) ~ r**-a`` for the largest
  relative step distance between the middle and the last step (about 1 when a pre-norm state only
  grows linearly, about 0 for a steady drift or chaos);
* the limiting behaviour of every token (the paper's fixed point / orbit
  / slider / unknown, from the cosine to the final state of the last layer of the cycle,
  ``tau = 0.05``, ``rho = 0.9``, see ``tl_loop.analysis.fixed_points``);
* at the last step, the largest pairwise distance between the states of the layers of the cycle
  (relative, and between directions): do the layers share one point?

Decisions (:class:`Criteria`, every threshold a parameter, nothing hard-coded per configuration):

* a run *reaches a stable fixed point in the state* when every layer's relative step distance is
  at most ``tol`` (1e-3) at each of the last ``hold`` (16) steps;
* it *reaches a stable fixed point in direction* when every layer's direction step distance is at
  most ``tol`` over the same steps **and** at least ``fp_share`` (90 %) of the tokens are classified
  *fixed point* by the paper's limiting-behaviour rule. A state whose norm grows without bound
  but whose direction settles passes this test and fails the first;
* it *converges (trend)* when it passes either test above, or when its step distance still
  shrinks at least like ``r**-min_decay`` (``min_decay`` 0.5) with at least ``fp_share`` of the
  tokens classified *fixed point*: what a plot of the step distance over the run shows as
  "converging", although the run has not got there (the weakest notion);
* its fixed point is *degenerate* when the largest pairwise distance between the layers' final
  states is at most ``degenerate_tol`` (0.05): relative (state and trend notions) or between
  directions (direction notion);
* a group of runs (one initialisation, normalisation and injection; every block size and seed)
  *mostly* has a property when at least ``majority`` (2/3) of its runs have it, and *mostly
  lacks* it when at most ``1 - majority`` have it. Each claim is decided from these shares (see
  :func:`evaluate_claims`), per initialisation and per notion (state, direction, trend).
"""

from __future__ import annotations

import argparse
import csv
import html
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from tl_loop.analysis import (
    LIMITING_CLASSES,
    LimitingBehaviour,
    classify_limiting_behaviour,
    convergence_step,
    cosine_to_final,
    degenerate_fixed_point,
    step_distances,
)
from tl_loop.analysis.streaming import Reducer
from tl_loop.config import LoopedConfig
from tl_loop.hook_names import block_hook
from tl_loop.model import HookedLoopedTransformer
from tl_loop.schedule import Schedule

#: Normalisation placements (``LoopedConfig`` flags) compared by the study.
NORMALISATIONS: dict[str, dict[str, bool]] = {
    "pre_norm": {"pre_norm": True},
    "huginn": {"pre_norm": True, "resid_norm": True},
    "ouro": {"pre_norm": True, "output_norm": True, "norm_between_steps": True},
    "ouro_no_step_norm": {"pre_norm": True, "output_norm": True},
}
NORM_LABELS: dict[str, str] = {
    "pre_norm": "pre-norm",
    "huginn": "Huginn-style",
    "ouro": "Ouro-style",
    "ouro_no_step_norm": "Ouro-style, no norm between steps",
}
INJECTIONS: tuple[str, ...] = ("none", "add", "linear")
#: Weight initialisations (see the module docstring).
INITS: tuple[str, ...] = ("tl_loop", "fan_in")
#: What "reaches a fixed point" means in a decision (see the module docstring).
NOTIONS: tuple[str, ...] = ("state", "direction", "trend")


# --------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class Grid:
    """The runs of the study: every combination of ``layers x norms x injections x inits x seeds``
    and the model, input and measurement settings they share."""

    layers: tuple[int, ...] = (4, 12, 16)
    seeds: tuple[int, ...] = (0, 1, 2)
    injections: tuple[str, ...] = INJECTIONS
    norms: tuple[str, ...] = ("pre_norm", "huginn", "ouro")
    inits: tuple[str, ...] = INITS
    n_steps: int = 128  # steps of every run (the paper's approximate fixed point uses 128)
    hold: int = 16  # a fixed point must hold over the last `hold` steps
    d_model: int = 64
    n_heads: int = 4
    d_mlp: int = 256
    d_vocab: int = 256
    n_prelude_layers: int = 1
    batch: int = 2
    seq_len: int = 32
    token_seed: int = 1234
    state_init: str = "prelude"
    init_std: float = 0.02  # std of the tl_loop initialisation
    tau: float = 0.05  # limiting-behaviour tolerance (paper)
    window_rho: float = 0.9  # limiting-behaviour fraction of the window (paper)

    def __post_init__(self) -> None:
        unknown = [n for n in self.norms if n not in NORMALISATIONS]
        unknown += [i for i in self.injections if i not in INJECTIONS]
        unknown += [i for i in self.inits if i not in INITS]
        if unknown:
            raise ValueError(f"unknown grid values {unknown}")
        if not (self.layers and self.seeds and self.injections and self.norms and self.inits):
            raise ValueError("every axis of the grid needs at least one value")
        if self.n_steps < 8:
            raise ValueError("n_steps must be >= 8 (the limiting behaviour needs a window)")
        if not 1 <= self.hold < self.n_steps:
            raise ValueError("hold must lie in [1, n_steps)")
        if self.d_model % self.n_heads:
            raise ValueError("d_model must be a multiple of n_heads")

    def config(self, layers: int, norm: str, injection: str, n_steps: int = 1) -> LoopedConfig:
        return LoopedConfig(
            d_model=self.d_model,
            n_heads=self.n_heads,
            d_head=self.d_model // self.n_heads,
            d_mlp=self.d_mlp,
            d_vocab=self.d_vocab,
            n_ctx=max(self.seq_len, 8),
            n_prelude_layers=self.n_prelude_layers,
            n_core_layers=layers,
            n_steps=n_steps,
            injection=injection,  # type: ignore[arg-type]
            state_init=self.state_init,  # type: ignore[arg-type]
            model_name=f"random-init L{layers} {norm} {injection}",
            **NORMALISATIONS[norm],
        )

    def tokens(self) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.token_seed)
        return torch.randint(0, self.d_vocab, (self.batch, self.seq_len), generator=gen)

    @property
    def n_runs(self) -> int:
        return len(self.layers) * len(self.norms) * len(self.injections) * len(self.inits) * len(self.seeds)


@dataclass(frozen=True)
class Criteria:
    """Thresholds of the decisions (see the module docstring)."""

    tol: float = 1e-3  # step distance under which a layer has stopped moving
    fp_share: float = 0.9  # share of tokens classified "fixed point" for the direction notion
    degenerate_tol: float = 0.05  # largest pairwise distance between the layers' fixed points
    min_decay: float = 0.5  # trend notion: step distance shrinking at least like step**-min_decay
    majority: float = 2 / 3  # share of a group's runs for "mostly" (and 1 - majority for "mostly not")

    def __post_init__(self) -> None:
        if not (self.tol > 0 and self.degenerate_tol > 0):
            raise ValueError("tolerances must be positive")
        if not (0.5 < self.majority <= 1 and 0 < self.fp_share <= 1):
            raise ValueError("majority must lie in (0.5, 1] and fp_share in (0, 1]")


# --------------------------------------------------------------------------- initialisation
def init_parameters(model: HookedLoopedTransformer, scheme: str, seed: int, std: float = 0.02) -> None:
    """Initialise ``model`` in place (see :data:`INITS`). ``tl_loop`` scales the output projections
    by the depth at the model's *current* number of steps: build the model at one step."""
    if scheme == "tl_loop":
        model.init_weights(seed, std=std)
        return
    if scheme != "fan_in":
        raise ValueError(f"unknown initialisation {scheme!r}; use one of {INITS}")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0 if name.rsplit(".", 1)[-1] == "w" else 0.0)
            else:
                scale = 1.0 if name == "embed.W_E" else 1.0 / math.sqrt(p.shape[-1])  # (out, in) layout
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


# --------------------------------------------------------------------------- measurement
def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _pairwise_max(final: torch.Tensor) -> float:
    """Largest token-averaged pairwise relative distance between the layers' states."""
    return degenerate_fixed_point(final, tol=1.0).max_distance


@dataclass(frozen=True)
class RunMeasurement:
    """What one run measured (token-averaged unless stated)."""

    relative: torch.Tensor  # [n_steps - 1, layer_in_cycle] relative step distance
    direction: torch.Tensor  # [n_steps - 1, layer_in_cycle] step distance of x / ||x||
    norm: torch.Tensor  # [n_steps, layer_in_cycle] ||x||
    final: torch.Tensor  # [layer_in_cycle, *token, d_model] states at the last step
    limiting: LimitingBehaviour  # per token, last layer of the cycle

    @classmethod
    def from_states(cls, states: torch.Tensor, tau: float = 0.05, window_rho: float = 0.9) -> RunMeasurement:
        """From a full ``[step, layer_in_cycle, *token, d_model]`` tensor (e.g.
        ``cache.stack_loop("resid_post")``), with the library's cache-based functions."""
        x = states.float()
        return cls(
            relative=step_distances(x, "relative"),
            direction=step_distances(_unit(x), "l2"),
            norm=x.norm(dim=-1).flatten(2).mean(-1),
            final=x[-1],
            limiting=classify_limiting_behaviour(cosine_to_final(x[:, -1]), tau, window_rho),
        )

    def summary(self, hold: int, tol: float) -> dict[str, Any]:
        """The run's numbers (no decision): see :func:`classify` for the decisions."""
        hold = min(hold, self.relative.shape[0])
        fractions = self.limiting.fractions()
        half = self.norm.shape[0] // 2
        conv = convergence_step(self.relative, tol)
        return {
            "tail_relative": float(self.relative[-hold:].max()),
            "tail_direction": float(self.direction[-hold:].max()),
            "final_relative_max": float(self.relative[-1].max()),
            "final_relative_median": float(self.relative[-1].median()),
            "convergence_step_max": int(conv.max()) if bool((conv >= 0).all()) else -1,
            "layers_converged": int((conv >= 0).sum()),
            "decay_exponent": self.decay_exponent(),
            "final_norm": float(self.norm[-1, -1]),
            "norm_ratio": float(self.norm[-1, -1] / self.norm[half, -1].clamp_min(1e-12)),
            **{f"share_{k}": fractions[k] for k in LIMITING_CLASSES},
            "degeneracy_relative": _pairwise_max(self.final),
            "degeneracy_direction": _pairwise_max(_unit(self.final)),
        }

    def decay_exponent(self) -> float:
        """``a`` in ``d(r) ~ r**-a`` between the middle and the last step, ``d`` the largest relative
        step distance over the layers: ~1 when the state only grows linearly (each step adds a
        bounded update to an ever longer state), ~0 for a steady drift, large for a contraction."""
        d = self.relative.max(1).values.clamp_min(1e-12)
        n = d.shape[0]
        mid = (n - 1) // 2
        if mid < 1:
            return float("nan")
        return float(torch.log(d[mid] / d[-1]) / math.log(n / (mid + 1)))

    def per_layer(self, tol: float) -> list[dict[str, Any]]:
        conv = convergence_step(self.relative, tol)
        conv_dir = convergence_step(self.direction, tol)
        return [
            {
                "layer": j,
                "final_relative": float(self.relative[-1, j]),
                "final_direction": float(self.direction[-1, j]),
                "convergence_step": int(conv[j]),
                "convergence_step_direction": int(conv_dir[j]),
                "final_norm": float(self.norm[-1, j]),
            }
            for j in range(self.relative.shape[1])
        ]


class LoopRecorder(Reducer):
    """Keeps the state after every layer of the cycle at every step (``resid_post``): ``result()``
    is ``[n_steps, layer_in_cycle, *token, d_model]``, what ``cache.stack_loop("resid_post")``
    holds without caching anything else (34 MB for a 16-layer block, 128 steps, 64 tokens of width
    64). A reducer, so ``run_streaming`` accepts it."""

    def __init__(self, name: str = "resid_post") -> None:
        self.name = name

    def hooks(self, model: Any, schedule: Schedule | None) -> list[tuple[str, Callable[..., None]]]:
        if schedule is None:
            raise TypeError("LoopRecorder needs a looped model")
        self.shape = (schedule.n_steps, schedule.layers_per_step)
        self.states: list[torch.Tensor] = []
        names = [
            block_hook(schedule.index(r, j), self.name)
            for r in range(self.shape[0])
            for j in range(self.shape[1])
        ]
        return [
            (name, lambda x, hook: self.states.append(x.detach())) for name in names
        ]  # fire in this order

    def result(self) -> torch.Tensor:
        if len(self.states) != self.shape[0] * self.shape[1]:
            raise RuntimeError(f"expected {self.shape[0] * self.shape[1]} states, got {len(self.states)}")
        stacked = torch.stack(self.states)
        return stacked.view(*self.shape, *stacked.shape[1:])


@torch.no_grad()
def measure_run(
    model: HookedLoopedTransformer,
    tokens: torch.Tensor,
    n_steps: int,
    tau: float = 0.05,
    window_rho: float = 0.9,
) -> RunMeasurement:
    """One forward pass of ``n_steps`` steps with a :class:`LoopRecorder`, then
    :meth:`RunMeasurement.from_states`.

    The hooks are attached to, and removed from, only the hook points they read (rather than
    ``run_streaming``, whose ``run_with_hooks`` resets every hook point of the model: ~2 s per
    call on a 1,500-layer unroll, as long as the forward pass itself)."""
    recorder = LoopRecorder()
    hooks = recorder.hooks(model, Schedule.from_config(model.cfg, n_steps))
    with model.steps(n_steps, force=True):
        points = []
        try:
            for name, fn in hooks:
                point = model.hook_dict[name]
                point.add_hook(fn)
                points.append(point)
            model(tokens, return_type=None)
        finally:
            for point in points:
                point.remove_hooks("fwd")
    return RunMeasurement.from_states(recorder.result(), tau, window_rho)


# --------------------------------------------------------------------------- decisions
def classify(row: dict[str, Any], criteria: Criteria) -> dict[str, bool]:
    """The per-run decisions, from the run's numbers (see the module docstring)."""
    fixed_tokens = row["share_fixed_point"] >= criteria.fp_share
    state = row["tail_relative"] <= criteria.tol
    direction = row["tail_direction"] <= criteria.tol and fixed_tokens
    shrinking = row["decay_exponent"] >= criteria.min_decay and fixed_tokens  # nan compares False
    degenerate_state = row["degeneracy_relative"] <= criteria.degenerate_tol
    return {
        "converged_state": state,
        "converged_direction": direction,
        "converged_trend": state or direction or shrinking,
        "degenerate_state": degenerate_state,
        "degenerate_direction": row["degeneracy_direction"] <= criteria.degenerate_tol,
        "degenerate_trend": degenerate_state,
    }


@dataclass(frozen=True)
class Claim:
    key: str
    text: str


CLAIMS: tuple[Claim, ...] = (
    Claim("1", "with input injection, pre-norm blocks reach stable fixed points"),
    Claim("2", "with input injection, Huginn-style blocks reach stable fixed points"),
    Claim("3", "with input injection, Ouro-style blocks do not reach stable fixed points"),
    Claim("4", "without input injection, only pre-norm blocks converge (Huginn- and Ouro-style do not)"),
    Claim(
        "5", "without input injection, pre-norm blocks converge to a degenerate point shared by all layers"
    ),
)


@dataclass(frozen=True)
class Verdict:
    claim: str
    text: str
    init: str
    notion: str  # "state" | "direction"
    holds: bool | None  # None: the grid has no runs to decide it
    evidence: str

    @property
    def label(self) -> str:
        return {True: "holds", False: "does not hold", None: "not evaluated"}[self.holds]


def _fmt(x: float) -> str:
    return f"{x:.2g}" if x != 0 else "0"


class _Group:
    """Runs of one (init, norm, injection) with their decisions."""

    def __init__(self, rows: list[dict[str, Any]], criteria: Criteria) -> None:
        self.rows = rows
        self.decisions = [classify(r, criteria) for r in rows]
        self.criteria = criteria

    def __len__(self) -> int:
        return len(self.rows)

    def count(self, pred: Callable[[dict[str, bool]], bool]) -> int:
        return sum(1 for d in self.decisions if pred(d))

    def share(self, pred: Callable[[dict[str, bool]], bool]) -> float:
        return self.count(pred) / len(self) if self.rows else float("nan")

    def most(self, pred: Callable[[dict[str, bool]], bool]) -> bool:
        return self.share(pred) >= self.criteria.majority

    def few(self, pred: Callable[[dict[str, bool]], bool]) -> bool:
        return self.share(pred) <= 1 - self.criteria.majority

    def median(self, key: str) -> float:
        return statistics.median(r[key] for r in self.rows)

    def mean(self, key: str) -> float:
        return statistics.fmean(r[key] for r in self.rows)

    def by_layers(self, pred: Callable[[dict[str, bool]], bool]) -> str:
        sizes = sorted({r["layers"] for r in self.rows})
        parts = []
        for L in sizes:
            idx = [i for i, r in enumerate(self.rows) if r["layers"] == L]
            parts.append(f"L={L}: {sum(pred(self.decisions[i]) for i in idx)}/{len(idx)}")
        return ", ".join(parts)


def _conv(notion: str) -> Callable[[dict[str, bool]], bool]:
    return lambda d: d[f"converged_{notion}"]


def _conv_degenerate(notion: str) -> Callable[[dict[str, bool]], bool]:
    return lambda d: d[f"converged_{notion}"] and d[f"degenerate_{notion}"]


def _describe(g: _Group, notion: str, name: str) -> str:
    key = "tail_direction" if notion == "direction" else "tail_relative"
    text = (
        f"{name}: {g.count(_conv(notion))}/{len(g)} runs converge ({g.by_layers(_conv(notion))}); "
        f"median largest {notion if notion == 'direction' else 'relative'} step distance over the last steps "
        f"{_fmt(g.median(key))} (tol {_fmt(g.criteria.tol)})"
    )
    if notion == "trend":
        text += f", median decay exponent {g.median('decay_exponent'):.2f} (min {_fmt(g.criteria.min_decay)})"
    return (
        text + f", median norm ratio last/middle step {g.median('norm_ratio'):.2f}, "
        f"mean share of fixed-point tokens {g.mean('share_fixed_point'):.2f}"
    )


def evaluate_claims(rows: Sequence[dict[str, Any]], criteria: Criteria = Criteria()) -> list[Verdict]:
    """Decide every claim of :data:`CLAIMS` from the runs' numbers, per initialisation and notion.

    * 1 / 2: for every injection type run (``add``, ``linear``), the pre-norm / Huginn-style group
      *mostly* converges;
    * 3: for every injection type run, the Ouro-style group *mostly does not* converge;
    * 4: without injection, pre-norm *mostly* converges, Huginn- and Ouro-style *mostly do not*;
    * 5: without injection, pre-norm runs *mostly* converge **and** have a degenerate fixed point.
    """
    rows = list(rows)
    verdicts: list[Verdict] = []
    for init in sorted({r["init"] for r in rows}, key=lambda s: INITS.index(s)):

        def group(norm: str, injection: str, init: str = init) -> _Group:
            return _Group(
                [r for r in rows if r["init"] == init and r["norm"] == norm and r["injection"] == injection],
                criteria,
            )

        injected = [
            i for i in ("add", "linear") if any(r["injection"] == i and r["init"] == init for r in rows)
        ]
        for notion in NOTIONS:
            conv = _conv(notion)
            for claim in CLAIMS:
                holds: bool | None
                evidence: list[str] = []
                if claim.key in ("1", "2", "3"):
                    norm = {"1": "pre_norm", "2": "huginn", "3": "ouro"}[claim.key]
                    groups = {i: group(norm, i) for i in injected}
                    groups = {i: g for i, g in groups.items() if len(g)}
                    if not groups:
                        holds = None
                    elif claim.key == "3":
                        holds = all(g.few(conv) for g in groups.values())
                    else:
                        holds = all(g.most(conv) for g in groups.values())
                    evidence = [_describe(g, notion, f"injection {i}") for i, g in groups.items()]
                elif claim.key == "4":
                    gs = {n: group(n, "none") for n in ("pre_norm", "huginn", "ouro")}
                    if any(len(g) == 0 for g in gs.values()):
                        holds = None
                    else:
                        holds = gs["pre_norm"].most(conv) and gs["huginn"].few(conv) and gs["ouro"].few(conv)
                    evidence = [_describe(g, notion, NORM_LABELS[n]) for n, g in gs.items() if len(g)]
                else:
                    g = group("pre_norm", "none")
                    holds = g.most(_conv_degenerate(notion)) if len(g) else None
                    if len(g):
                        key = "degeneracy_direction" if notion == "direction" else "degeneracy_relative"

                        def deg(d: dict[str, bool], n: str = notion) -> bool:
                            return d[f"degenerate_{n}"]

                        evidence = [
                            (
                                f"{g.count(_conv_degenerate(notion))}/{len(g)} runs converge and are degenerate; "
                                f"{g.count(conv)}/{len(g)} converge; {g.count(deg)}/{len(g)} are degenerate at "
                                f"the last step ({g.by_layers(deg)}), median largest distance between the "
                                f"layers' final states {_fmt(g.median(key))} (tol {_fmt(criteria.degenerate_tol)})"
                            )
                        ]
                verdicts.append(Verdict(claim.key, claim.text, init, notion, holds, "; ".join(evidence)))
    return verdicts


# --------------------------------------------------------------------------- running the grid
@dataclass
class StudyResult:
    grid: Grid
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per run: its numbers
    layer_rows: list[dict[str, Any]] = field(default_factory=list)  # one per run and layer of the cycle
    curves: dict[tuple[str, str, str, int, int], dict[str, list[float]]] = field(default_factory=dict)
    runtime_s: float = 0.0
    threads: int = 0  # torch intra-op threads during the run


def run_study(
    grid: Grid = Grid(), criteria: Criteria = Criteria(), log: Callable[[str], None] | None = print
) -> StudyResult:
    """Run every configuration of ``grid``. The model holding the ``n_steps`` views is built once
    per (block size, norm, injection); each initialisation and seed is drawn on a one-step model
    and copied into it."""
    result = StudyResult(grid, threads=torch.get_num_threads())
    tokens = grid.tokens()
    start = time.perf_counter()
    done = 0
    for layers in grid.layers:
        for norm in grid.norms:
            for injection in grid.injections:
                runner = HookedLoopedTransformer(
                    grid.config(layers, norm, injection, grid.n_steps), init_weights=False
                )
                for init in grid.inits:
                    for seed in grid.seeds:
                        t0 = time.perf_counter()
                        # seeded, so construction does not touch the global RNG; init_parameters redraws
                        small = HookedLoopedTransformer(grid.config(layers, norm, injection), seed=seed)
                        init_parameters(small, init, seed, grid.init_std)
                        runner.load_state_dict(small.state_dict())
                        m = measure_run(runner, tokens, grid.n_steps, grid.tau, grid.window_rho)
                        key = {
                            "init": init,
                            "norm": norm,
                            "injection": injection,
                            "layers": layers,
                            "seed": seed,
                        }
                        row = {**key, "n_steps": grid.n_steps, **m.summary(grid.hold, criteria.tol)}
                        row["runtime_s"] = round(time.perf_counter() - t0, 3)
                        result.rows.append(row)
                        result.layer_rows += [{**key, **lr} for lr in m.per_layer(criteria.tol)]
                        result.curves[(init, norm, injection, layers, seed)] = {
                            "relative": m.relative.max(1).values.tolist(),
                            "direction": m.direction.max(1).values.tolist(),
                            "norm": m.norm[:, -1].tolist(),
                        }
                        done += 1
                        if log is not None:
                            d = classify(row, criteria)
                            log(
                                f"[{done}/{grid.n_runs}] L={layers:<2} {norm:<9} inj={injection:<6} init={init:<7} "
                                f"seed={seed} tail rel {row['tail_relative']:.1e} dir {row['tail_direction']:.1e} "
                                f"norm x{row['norm_ratio']:.2f} fp {row['share_fixed_point']:.2f} "
                                f"deg {row['degeneracy_relative']:.1e} -> state {'Y' if d['converged_state'] else 'n'} "
                                f"dir {'Y' if d['converged_direction'] else 'n'} ({row['runtime_s']:.1f}s)"
                            )
                del runner
    result.runtime_s = time.perf_counter() - start
    return result


# --------------------------------------------------------------------------- tables
SUMMARY_COLUMNS: tuple[str, ...] = (
    "init",
    "norm",
    "injection",
    "layers",
    "runs",
    "converged_state",
    "converged_direction",
    "converged_trend",
    "tail_relative",
    "tail_direction",
    "norm_ratio",
    "decay_exponent",
    "share_fixed_point",
    "share_orbit",
    "share_slider",
    "share_unknown",
    "degeneracy_relative",
    "degeneracy_direction",
    "degenerate_state",
    "degenerate_direction",
)


def summary_rows(rows: Sequence[dict[str, Any]], criteria: Criteria) -> list[dict[str, Any]]:
    """One row per (init, norm, injection, block size): counts of the decisions over seeds and
    medians (means for the limiting-behaviour shares) of the numbers."""
    keys: list[tuple] = []
    for r in rows:
        k = (r["init"], r["norm"], r["injection"], r["layers"])
        if k not in keys:
            keys.append(k)
    inits = [i for i in INITS if any(k[0] == i for k in keys)]
    keys.sort(key=lambda k: inits.index(k[0]))  # stable: the run order within an initialisation
    out = []
    for k in keys:
        rs = [r for r in rows if (r["init"], r["norm"], r["injection"], r["layers"]) == k]
        ds = [classify(r, criteria) for r in rs]
        n = len(rs)
        row: dict[str, Any] = dict(zip(("init", "norm", "injection", "layers"), k))
        row["runs"] = n
        for dk in (
            "converged_state",
            "converged_direction",
            "converged_trend",
            "degenerate_state",
            "degenerate_direction",
        ):
            row[dk] = f"{sum(d[dk] for d in ds)}/{n}"
        for nk in (
            "tail_relative",
            "tail_direction",
            "norm_ratio",
            "decay_exponent",
            "degeneracy_relative",
            "degeneracy_direction",
        ):
            row[nk] = statistics.median(r[nk] for r in rs)
        for c in LIMITING_CLASSES:
            row[f"share_{c}"] = sum(r[f"share_{c}"] for r in rs) / n
        out.append({c: row[c] for c in SUMMARY_COLUMNS})
    return out


GROUP_COLUMNS: tuple[str, ...] = (
    "init",
    "norm",
    "injection",
    "runs",
    "converged_state",
    "converged_direction",
    "converged_trend",
    "degenerate_state",
    "tail_relative",
    "decay_exponent",
    "norm_ratio",
    "share_fixed_point",
)
GROUP_HEADERS = (
    "init",
    "norm",
    "injection",
    "runs",
    "fixed pt (state)",
    "fixed pt (direction)",
    "converging (trend)",
    "degenerate (state)",
    "median max step dist, last steps",
    "median decay exponent",
    "median norm last / middle",
    "mean tokens fixed pt",
)


def group_rows(rows: Sequence[dict[str, Any]], criteria: Criteria) -> list[dict[str, Any]]:
    """One row per (init, norm, injection) over every block size and seed: the groups the claims
    are decided on (:func:`evaluate_claims`)."""
    out = []
    for init in [i for i in INITS if any(r["init"] == i for r in rows)]:
        for norm in [n for n in NORMALISATIONS if any(r["norm"] == n for r in rows)]:
            for injection in [i for i in INJECTIONS if any(r["injection"] == i for r in rows)]:
                g = _Group(
                    [r for r in rows if (r["init"], r["norm"], r["injection"]) == (init, norm, injection)],
                    criteria,
                )
                if not len(g):
                    continue
                row: dict[str, Any] = {"init": init, "norm": norm, "injection": injection, "runs": len(g)}
                for notion in NOTIONS:
                    row[f"converged_{notion}"] = f"{g.count(_conv(notion))}/{len(g)}"
                row["degenerate_state"] = f"{g.count(lambda d: d['degenerate_state'])}/{len(g)}"
                for key in ("tail_relative", "decay_exponent", "norm_ratio"):
                    row[key] = g.median(key)
                row["share_fixed_point"] = g.mean("share_fixed_point")
                out.append(row)
    return out


def verdict_matrix(verdicts: Sequence[Verdict]) -> str:
    """Claims x (initialisation, notion): yes / no / n.a."""
    cols = []
    for v in verdicts:
        if (v.init, v.notion) not in cols:
            cols.append((v.init, v.notion))
    word = {True: "yes", False: "no", None: "n.a."}
    lines = ["| claim | " + " | ".join(f"{i}, {n}" for i, n in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for claim in CLAIMS:
        cells = {(v.init, v.notion): word[v.holds] for v in verdicts if v.claim == claim.key}
        lines.append(f"| {claim.key}. {claim.text} | " + " | ".join(cells.get(c, "") for c in cols) + " |")
    return "\n".join(lines)


def sensitivity_variants(criteria: Criteria) -> dict[str, Criteria]:
    """The criteria next to ``criteria`` that :func:`sensitivity_table` tries."""
    from dataclasses import replace

    return {
        "as chosen": criteria,
        f"tol {criteria.tol / 10:g}": replace(criteria, tol=criteria.tol / 10),
        f"tol {criteria.tol * 10:g}": replace(criteria, tol=criteria.tol * 10),
        "fixed-point token share 0.5": replace(criteria, fp_share=0.5),
        f"degenerate tol {criteria.degenerate_tol / 5:g}": replace(
            criteria, degenerate_tol=criteria.degenerate_tol / 5
        ),
        "majority 0.9": replace(criteria, majority=0.9),
    }


def sensitivity_table(rows: Sequence[dict[str, Any]], variants: dict[str, Criteria]) -> str:
    """Claims x criteria variants; each cell lists the verdicts (y / n / -) per initialisation for
    the notions state / direction / trend, e.g. ``tl_loop nyy, fan_in nnn``."""
    letter = {True: "y", False: "n", None: "-"}
    cells: dict[tuple[str, str], str] = {}
    for name, criteria in variants.items():
        verdicts = evaluate_claims(rows, criteria)
        for claim in CLAIMS:
            parts = []
            for init in [i for i in INITS if any(v.init == i for v in verdicts)]:
                word = "".join(
                    letter[v.holds]
                    for n in NOTIONS
                    for v in verdicts
                    if v.claim == claim.key and v.init == init and v.notion == n
                )
                parts.append(f"{init} {word}")
            cells[(claim.key, name)] = ", ".join(parts)
    lines = ["| claim | " + " | ".join(variants) + " |", "|---" * (len(variants) + 1) + "|"]
    for claim in CLAIMS:
        lines.append(f"| {claim.key} | " + " | ".join(cells[(claim.key, n)] for n in variants) + " |")
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        if v == 0:
            return "0"
        return f"{v:.2f}" if 0.01 <= abs(v) < 100 else f"{v:.1e}"
    return str(v)


def markdown_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[str], headers: Sequence[str] | None = None
) -> str:
    headers = list(headers or columns)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r[c]) for c in columns) + " |")
    return "\n".join(lines)


SUMMARY_HEADERS = (
    "init",
    "norm",
    "injection",
    "L",
    "runs",
    "fixed pt (state)",
    "fixed pt (direction)",
    "converging (trend)",
    "max step dist, last steps",
    "max direction step dist",
    "norm last / middle",
    "decay exponent",
    "tokens fixed pt",
    "orbit",
    "slider",
    "unknown",
    "layers' spread (relative)",
    "layers' spread (direction)",
    "degenerate (state)",
    "degenerate (direction)",
)


def verdict_table(verdicts: Sequence[Verdict]) -> str:
    lines = ["| claim | initialisation | notion | verdict | evidence |", "|---|---|---|---|---|"]
    for v in verdicts:
        lines.append(f"| {v.claim}. {v.text} | {v.init} | {v.notion} | **{v.label}** | {v.evidence} |")
    return "\n".join(lines)


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    if not rows:
        path.write_text("")
        return
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def read_runs(path: str | Path) -> list[dict[str, Any]]:
    """Read ``runs.csv`` back (numbers as numbers): re-decide the claims under other criteria
    without rerunning (``evaluate_claims(read_runs(...), Criteria(tol=...))``)."""
    out = []
    with Path(path).open() as f:
        for r in csv.DictReader(f):
            out.append({k: _parse(k, v) for k, v in r.items()})
    return out


def _parse(key: str, value: str) -> Any:
    if key in ("init", "norm", "injection"):
        return value
    if value in ("True", "False"):  # decision columns
        return value == "True"
    if key in ("layers", "seed", "n_steps", "convergence_step_max", "layers_converged"):
        return int(value)
    return float(value)


# --------------------------------------------------------------------------- figures
def figures(result: StudyResult, criteria: Criteria) -> dict[str, Any]:
    """Plotly figures of the study (title -> figure)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from tl_loop.plot._layout import color, finish

    grid, rows = result.grid, result.rows
    inits = [i for i in INITS if any(r["init"] == i for r in rows)]
    cats = [(n, i) for n in grid.norms for i in grid.injections]
    cat_label = {c: f"{NORM_LABELS[c[0]]} / {c[1]}" for c in cats}
    figs: dict[str, Any] = {}

    def strip(key: str, threshold: float, title: str, y_title: str, log_y: bool = True) -> Any:
        fig = make_subplots(
            rows=1, cols=len(inits), subplot_titles=[f"init {i}" for i in inits], shared_yaxes=True
        )
        for col, init in enumerate(inits, start=1):
            for k, L in enumerate(grid.layers):
                rs = [r for r in rows if r["init"] == init and r["layers"] == L]
                fig.add_trace(
                    go.Scatter(
                        x=[cat_label[(r["norm"], r["injection"])] for r in rs],
                        y=[float(f"{max(r[key], 1e-12) if log_y else r[key]:.4g}") for r in rs],
                        mode="markers",
                        name=f"L = {L}",
                        legendgroup=f"L{L}",
                        showlegend=col == 1,
                        marker={"color": color(k), "size": 7, "opacity": 0.8},
                        text=[f"seed {r['seed']}" for r in rs],
                        hovertemplate=f"%{{x}}<br>L = {L}, %{{text}}<br>{y_title}: %{{y:.3g}}<extra></extra>",
                    ),
                    row=1,
                    col=col,
                )
            fig.add_hline(y=threshold, line_dash="dash", line_color="grey", row=1, col=col)
        if log_y:
            fig.update_yaxes(type="log")
        fig.update_layout(scattermode="group")  # block sizes side by side within a category
        fig.update_xaxes(tickangle=35)
        return finish(fig, title + f" (dashed: threshold {threshold:g})", None, y_title, "recurrent block")

    figs["convergence"] = strip(
        "tail_relative",
        criteria.tol,
        f"Largest relative step distance over the last {grid.hold} steps (every layer of the cycle)",
        "relative step distance",
    )
    figs["direction"] = strip(
        "tail_direction",
        criteria.tol,
        f"Largest step distance of the state's direction over the last {grid.hold} steps",
        "direction step distance",
    )
    figs["decay"] = strip(
        "decay_exponent",
        criteria.min_decay,
        "Decay exponent a of the relative step distance, d(r) ~ r^-a, middle to last step "
        "(meaningless once d sits at the float32 floor, ~1e-7)",
        "decay exponent",
        log_y=False,
    )
    figs["degeneracy"] = strip(
        "degeneracy_relative",
        criteria.degenerate_tol,
        "Largest relative distance between the final states of two layers of the cycle",
        "pairwise relative distance",
    )

    # limiting behaviour: mean shares per group
    from tl_loop.plot.limiting import CLASS_COLORS

    lim = make_subplots(
        rows=1, cols=len(inits), subplot_titles=[f"init {i}" for i in inits], shared_yaxes=True
    )
    for col, init in enumerate(inits, start=1):
        for c in LIMITING_CLASSES:
            ys = []
            for cat in cats:
                rs = [r for r in rows if r["init"] == init and (r["norm"], r["injection"]) == cat]
                ys.append(sum(r[f"share_{c}"] for r in rs) / max(len(rs), 1))
            lim.add_trace(
                go.Bar(
                    x=[cat_label[cat] for cat in cats],
                    y=ys,
                    name=c,
                    legendgroup=c,
                    showlegend=col == 1,
                    marker_color=CLASS_COLORS[c],
                    hovertemplate=f"%{{x}}<br>{c}: %{{y:.2f}}<extra></extra>",
                ),
                row=1,
                col=col,
            )
    lim.update_layout(barmode="stack")
    lim.update_xaxes(tickangle=35)
    figs["limiting"] = finish(
        lim,
        "Limiting behaviour of the tokens (last layer of the cycle; mean over block sizes and seeds)",
        None,
        "share of tokens",
        "class",
    )

    # example trajectories: one block size, first seed
    L = 12 if 12 in grid.layers else grid.layers[len(grid.layers) // 2]
    seed = grid.seeds[0]
    for key, title, y_title, log_y, offset in (
        (
            "relative",
            "Relative step distance (largest over the layers of the cycle)",
            "relative step distance",
            True,
            1,
        ),
        ("norm", "Norm of the last layer's state", "mean norm", True, 0),
    ):
        fig = make_subplots(
            rows=1, cols=len(inits), subplot_titles=[f"init {i}" for i in inits], shared_yaxes=True
        )
        for col, init in enumerate(inits, start=1):
            for k, cat in enumerate(cats):
                curve = result.curves.get((init, cat[0], cat[1], L, seed))
                if curve is None:
                    continue
                y = [max(v, 1e-12) for v in curve[key]]
                fig.add_trace(
                    go.Scatter(
                        x=list(range(offset, offset + len(y))),
                        y=[float(f"{v:.4g}") for v in y],
                        mode="lines",
                        name=cat_label[cat],
                        legendgroup=cat_label[cat],
                        showlegend=col == 1,
                        line={"color": color(k), "dash": "solid" if cat[1] != "none" else "dot"},
                        hovertemplate=f"{cat_label[cat]}<br>step %{{x}}<br>{y_title}: %{{y:.3g}}<extra></extra>",
                    ),
                    row=1,
                    col=col,
                )
            if key == "relative":
                fig.add_hline(y=criteria.tol, line_dash="dash", line_color="grey", row=1, col=col)
        fig.update_xaxes(title_text="step")
        figs[f"curves_{key}"] = finish(
            fig, f"{title}, L = {L}, seed {seed}", None, y_title, "norm / injection", log_y=log_y
        )
    for fig in figs.values():
        _compact(fig)
    return figs


def _compact(fig: Any) -> None:
    """Replace the plotly_white template (7 kB of JSON per figure) by the few settings it gives
    these figures, so that every figure fits next to one inline copy of plotly.js."""
    import plotly.graph_objects as go

    fig.update_layout(
        template=go.layout.Template(),
        plot_bgcolor="white",
        paper_bgcolor="white",
        font={"family": "sans-serif", "color": "#2a3f5f"},
    )
    fig.update_xaxes(showgrid=True, gridcolor="#ebf0f8", zeroline=False, linecolor="#ebf0f8")
    fig.update_yaxes(showgrid=True, gridcolor="#ebf0f8", zeroline=False, linecolor="#ebf0f8")


def write_figures_html(figs: dict[str, Any], path: Path, title: str, intro: str = "") -> Path:
    """One self-contained HTML file: plotly.js inline once, then every figure."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1300px;margin:auto;padding:1em}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{html.escape(intro)}</p>" if intro else "",
    ]
    first = True
    for name, fig in figs.items():
        fig.update_layout(height=520)
        parts.append(f"<h2 id='{name}'>{html.escape(fig.layout.title.text or name)}</h2>")
        parts.append(
            fig.to_html(full_html=False, include_plotlyjs="inline" if first else False, div_id=f"{name}-plot")
        )
        first = False
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- outputs
def write_outputs(
    result: StudyResult,
    criteria: Criteria,
    out: str | Path,
    verdicts: Sequence[Verdict] | None = None,
    with_figures: bool = True,
) -> dict[str, Path]:
    """Write ``runs.csv`` (one row per run, numbers and decisions), ``layers.csv`` (per layer of
    the cycle), ``summary.csv`` / ``summary.md`` (per configuration over seeds, and the claims),
    ``claims.json``, ``study.json`` (grid, criteria, runtime) and ``figures.html``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    verdicts = list(verdicts if verdicts is not None else evaluate_claims(result.rows, criteria))
    runs = [{**r, **classify(r, criteria)} for r in result.rows]
    summary = summary_rows(result.rows, criteria)
    paths = {
        "runs": out / "runs.csv",
        "layers": out / "layers.csv",
        "summary_csv": out / "summary.csv",
        "summary_md": out / "summary.md",
        "claims": out / "claims.json",
        "study": out / "study.json",
    }
    _write_csv(paths["runs"], runs)
    _write_csv(paths["layers"], result.layer_rows)
    _write_csv(paths["summary_csv"], summary)
    md = [
        "# Random-initialisation study: results",
        "",
        (
            f"{len(result.rows)} runs, {result.grid.n_steps} steps each, {result.runtime_s:.0f} s. "
            "Generated by `python -m tl_loop.studies.random_init`; thresholds: "
            f"tol {criteria.tol:g}, fixed-point token share {criteria.fp_share:g}, degenerate tol "
            f"{criteria.degenerate_tol:g}, trend decay exponent {criteria.min_decay:g}, "
            f"majority {criteria.majority:.3g}."
        ),
        "",
        "## Claims",
        "",
        "Does the claim hold here? (per initialisation and notion of convergence)",
        "",
        verdict_matrix(verdicts),
        "",
        "## Groups the claims are decided on (every block size and seed)",
        "",
        markdown_table(group_rows(result.rows, criteria), GROUP_COLUMNS, GROUP_HEADERS),
        "",
        "## Sensitivity of the verdicts to the thresholds",
        "",
        (
            "Verdicts recomputed from the same runs under other thresholds (one changed at a time); "
            "letters: state / direction / trend notion, y = holds, n = does not, - = not evaluated."
        ),
        "",
        sensitivity_table(result.rows, sensitivity_variants(criteria)),
        "",
        "## Claims with their evidence",
        "",
        verdict_table(verdicts),
        "",
        "## Per configuration (over seeds: counts of runs; medians; mean token shares)",
        "",
        markdown_table(summary, SUMMARY_COLUMNS, SUMMARY_HEADERS),
        "",
    ]
    paths["summary_md"].write_text("\n".join(md))
    paths["claims"].write_text(json.dumps([{**asdict(v), "verdict": v.label} for v in verdicts], indent=1))
    paths["study"].write_text(
        json.dumps(
            {
                "grid": asdict(result.grid),
                "criteria": asdict(criteria),
                "runs": len(result.rows),
                "runtime_s": round(result.runtime_s, 1),
                "torch": torch.__version__,
                "python": platform.python_version(),
                "threads": result.threads,
            },
            indent=1,
        )
    )
    if with_figures:
        paths["figures"] = write_figures_html(
            figures(result, criteria),
            out / "figures.html",
            "Random-initialisation study of looped blocks",
            "Every point is one run (block size L, seed). See docs/design_study.md for the setup and the reading.",
        )
    return paths


def format_verdicts(verdicts: Iterable[Verdict]) -> str:
    lines = []
    for v in verdicts:
        lines.append(f"claim {v.claim} [{v.init}, {v.notion}]: {v.label.upper()} -- {v.text}")
        lines.append(f"    {v.evidence}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line
def _parser() -> argparse.ArgumentParser:
    g, c = Grid(), Criteria()
    p = argparse.ArgumentParser(
        prog="python -m tl_loop.studies.random_init",
        description="The seed paper's random-initialisation experiment: fixed points of randomly "
        "initialised looped blocks by block size, injection and normalisation.",
    )
    p.add_argument("--out", default="docs/design_study", help="output folder (default %(default)s)")
    p.add_argument("--layers", type=int, nargs="+", default=list(g.layers))
    p.add_argument("--seeds", type=int, nargs="+", default=list(g.seeds))
    p.add_argument("--injections", nargs="+", default=list(g.injections), choices=INJECTIONS)
    p.add_argument("--norms", nargs="+", default=list(g.norms), choices=list(NORMALISATIONS))
    p.add_argument("--inits", nargs="+", default=list(g.inits), choices=INITS)
    p.add_argument("--steps", type=int, default=g.n_steps)
    p.add_argument("--hold", type=int, default=g.hold)
    p.add_argument("--d-model", type=int, default=g.d_model)
    p.add_argument("--seq-len", type=int, default=g.seq_len)
    p.add_argument("--tol", type=float, default=c.tol)
    p.add_argument("--fp-share", type=float, default=c.fp_share)
    p.add_argument("--degenerate-tol", type=float, default=c.degenerate_tol)
    p.add_argument("--min-decay", type=float, default=c.min_decay)
    p.add_argument("--majority", type=float, default=c.majority)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    grid = Grid(
        layers=tuple(args.layers),
        seeds=tuple(args.seeds),
        injections=tuple(args.injections),
        norms=tuple(args.norms),
        inits=tuple(args.inits),
        n_steps=args.steps,
        hold=args.hold,
        d_model=args.d_model,
        d_mlp=4 * args.d_model,
        seq_len=args.seq_len,
    )
    criteria = Criteria(
        tol=args.tol,
        fp_share=args.fp_share,
        degenerate_tol=args.degenerate_tol,
        min_decay=args.min_decay,
        majority=args.majority,
    )
    result = run_study(grid, criteria, log=None if args.quiet else lambda s: print(s, flush=True))
    verdicts = evaluate_claims(result.rows, criteria)
    paths = write_outputs(result, criteria, args.out, verdicts, with_figures=not args.no_figures)
    print(
        f"\n{len(result.rows)} runs in {result.runtime_s:.0f} s; wrote {', '.join(str(p) for p in paths.values())}\n"
    )
    print(format_verdicts(verdicts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
