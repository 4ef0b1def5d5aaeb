"""The seed paper's training sweep (arXiv 2604.11791, design study, part 2).

Question: once looped models are *trained*, do their recurrent blocks reach stable fixed points,
do their attention patterns stop changing from one step to the next, and does task accuracy keep
(or improve) when they are run for more steps than they saw in training -- depending on the size
of the recurrent block, on input injection and on where the norms sit? Part 1
(:mod:`tl_loop.studies.random_init`) asks the first question of untrained blocks.

Run it (resumable: finished runs are skipped, an interrupted run resumes from its training
checkpoint; ``all`` is ``run`` then ``report``)::

    python -m tl_loop.studies.training_sweep all --out tl-loop-runs/sweep --docs docs/design_study/ --jobs 2

Variants go to another ``--out``: ``--preset chars`` is the first sweep (character encoding,
whose models learned no links); ``--set FIELD=JSON`` overrides a :class:`Sweep` field, e.g.
``--set iterations=900`` or ``--set 'train_extra=[["queries", 4]]'`` (any ``TrainConfig`` field).

Setup (defaults of :class:`Sweep`, sized so that the 72 runs take under an hour on 2 cores):

* task: multi-hop variable binding (:mod:`tl_loop.tasks.varbind`), small (``n_statements`` 4,
  10 variable names), one token per statement (``encoding="statements"``), trained on 1 and 2
  hops; 3 questions per training sequence;
* model: ``embed -> 1-layer prelude -> n_steps x (inject -> recurrent block of L layers) ->
  1-layer coda -> unembed``, d_model 32, 2 heads of 16, gated SiLU MLP of 64, RMSNorm, RoPE; the
  state entering step 0 is the prelude output (as in part 1, and necessarily so without
  injection);
* grid axes: block size ``L`` (``layers``), injection (``none`` / ``add`` / ``linear``: adapter on
  ``concat(state, prelude output)``), sublayer normalisation (:data:`NORMS`: ``pre_norm``,
  ``huginn`` = pre-norm plus a norm on the residual stream after each add, ``ouro`` = pre-norm plus
  a norm on each sublayer's output before the add) and a norm on the state between steps
  (``state_norm``, its own weights). Part 1's "Ouro-style" is ``ouro`` with ``state_norm``;
* training: :func:`tl_loop.train.train`, 4 recurrent steps per batch, the logits read out after
  every step supervised on the link that step reaches (one hop per step), AdamW at a constant
  learning rate, until the mean loss of the last 50 iterations is at most ``target_loss`` (0.03)
  or for ``iterations`` (2000) at most, so that every model is trained to the same loss;
* design (:meth:`Sweep.specs`): the full grid with seed 0, plus seed 1 for every configuration
  whose block size is in ``second_seed_layers`` (L = 1) and for those listed in ``second_seed``.

Measured on every trained model (:func:`evaluate_run`), with the library's functions:

* accuracy on held-out problems by number of hops and inference steps
  (:func:`tl_loop.tasks.report.accuracy_table`), steps 1..``max(eval_steps)`` -- beyond the
  ``max_train_steps`` seen in training -- and on longer chains than trained (``eval_hops``);
* fixed points of the cycle over ``measure_steps`` (128) steps on held-out prompts: the
  :class:`~tl_loop.studies.random_init.RunMeasurement` of part 1 (per-layer relative and direction
  step distances from :func:`~tl_loop.analysis.step_distances`, convergence step, decay exponent,
  the paper's limiting-behaviour classes, the layers' spread of
  :func:`~tl_loop.analysis.degenerate_fixed_point`) and part 1's decisions
  (:func:`~tl_loop.studies.random_init.classify` under :class:`~tl_loop.studies.random_init.Criteria`);
* attention stabilisation over the same steps (:class:`~tl_loop.analysis.AttentionStats`, the
  streaming twin of :func:`~tl_loop.analysis.attention_stabilisation`): Jensen-Shannon distance of
  every head's pattern between consecutive steps, the step each head stabilises
  (``stable_step(attn_tol)``), sink rate, mixing score (entropy), ColSum concentration.

>>> sweep = Sweep(layers=(1, 2), injections=("add",), norms=("pre_norm",), state_norms=(False,))
>>> [s.name for s in sweep.specs()]  # a second seed for every configuration at L = 1
['L1-add-pre_norm-s0', 'L2-add-pre_norm-s0', 'L1-add-pre_norm-s1']
>>> from dataclasses import replace
>>> [s.name for s in replace(sweep, second_seed_layers=(), second_seed=(("L2", "add", "pre_norm", False),)).specs()]
['L1-add-pre_norm-s0', 'L2-add-pre_norm-s0', 'L2-add-pre_norm-s1']
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

#: Sublayer normalisations (``LoopedConfig`` flags) of the sweep; the norm on the state between
#: steps is a separate axis (``state_norm``).
NORMS: dict[str, dict[str, bool]] = {
    "pre_norm": {"pre_norm": True},
    "huginn": {"pre_norm": True, "resid_norm": True},
    "ouro": {"pre_norm": True, "output_norm": True},
}
NORM_LABELS: dict[str, str] = {"pre_norm": "pre-norm", "huginn": "Huginn-style", "ouro": "Ouro-style"}
INJECTIONS: tuple[str, ...] = ("none", "add", "linear")
DONE_FILE = "metrics.json"


# --------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class RunSpec:
    """One trained model of the sweep."""

    layers: int
    injection: str
    norm: str
    state_norm: bool
    seed: int

    @property
    def config_name(self) -> str:
        return f"L{self.layers}-{self.injection}-{self.norm}" + ("-sn" if self.state_norm else "")

    @property
    def name(self) -> str:
        return f"{self.config_name}-s{self.seed}"

    def key(self) -> dict[str, Any]:
        return {"name": self.name, "layers": self.layers, "injection": self.injection, "norm": self.norm,
                "state_norm": self.state_norm, "seed": self.seed}


@dataclass(frozen=True)
class Sweep:
    """The runs of the sweep and everything they share (saved as ``sweep.json`` in the output
    folder; a resumed sweep must have the same settings). The defaults are the design of
    ``docs/design_study.md``: models that learn the task, sized to fit one hour on 2 cores."""

    layers: tuple[int, ...] = (1, 2, 4)
    injections: tuple[str, ...] = INJECTIONS
    norms: tuple[str, ...] = ("pre_norm", "huginn", "ouro")
    state_norms: tuple[bool, ...] = (False, True)
    seeds: tuple[int, ...] = (0,)
    #: every configuration with one of these block sizes is also trained with ``extra_seed``
    second_seed_layers: tuple[int, ...] = (1,)
    #: single configurations (``"L<layers>"``, injection, norm, state_norm) also trained with
    #: ``extra_seed``; ``"L*"`` matches every block size
    second_seed: tuple[tuple[str, str, str, bool], ...] = ()
    extra_seed: int = 1
    # model
    d_model: int = 32
    n_heads: int = 2
    d_mlp: int = 64
    n_prelude_layers: int = 1
    n_coda_layers: int = 1
    state_init: str = "prelude"
    # task and training
    task: tuple[tuple[str, Any], ...] = (("n_statements", 4), ("max_extra", 1), ("max_chain", 3),
                                         ("variables", "abcdefghij"), ("test_fraction", 0.1),
                                         ("encoding", "statements"))
    train_hops: tuple[int, ...] = (1, 2)
    queries: int = 3
    iterations: int = 2000  # the cap; a run stops earlier once it reaches ``target_loss``
    target_loss: float | None = 0.03
    batch_size: int = 64
    lr: float = 3e-3
    min_lr_ratio: float = 1.0  # 1: constant learning rate
    warmup: int = 0
    #: supervise every step on the link it reaches (one hop per step)
    step_supervision: bool = True
    step_distribution: str = "fixed"  # recurrent steps per batch (``TrainConfig.step_distribution``)
    mean_steps: float = 3.0
    max_train_steps: int = 4
    #: further ``TrainConfig`` fields, as ``((name, value), ...)``
    train_extra: tuple[tuple[str, Any], ...] = ()
    # evaluation
    eval_hops: tuple[int, ...] = (1, 2, 3)
    eval_steps: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
    eval_n: int = 128
    measure_steps: int = 128  # steps of the fixed-point / attention measurement
    measure_n: int = 24  # held-out prompts of the measurement (split over train_hops)
    hold: int = 16
    attn_tol: float = 1e-3  # a head is stable once its JS distance between steps stays below this
    tau: float = 0.05
    window_rho: float = 0.9

    def __post_init__(self) -> None:
        unknown = [n for n in self.norms if n not in NORMS]
        unknown += [i for i in self.injections if i not in INJECTIONS]
        if unknown:
            raise ValueError(f"unknown sweep values {unknown}")
        if self.measure_steps < 8 or not 1 <= self.hold < self.measure_steps:
            raise ValueError("need measure_steps >= 8 and 1 <= hold < measure_steps")
        if self.d_model % self.n_heads:
            raise ValueError("d_model must be a multiple of n_heads")

    # ---- runs ----
    def specs(self) -> list[RunSpec]:
        out = [
            RunSpec(L, inj, norm, sn, seed)
            for seed in self.seeds
            for L in self.layers
            for inj in self.injections
            for norm in self.norms
            for sn in self.state_norms
        ]
        names = {s.name for s in out}
        wanted_seconds = [(f"L{L}", inj, norm, sn) for L in self.second_seed_layers for inj in self.injections
                          for norm in self.norms for sn in self.state_norms]
        for lay, inj, norm, sn in wanted_seconds + list(self.second_seed):
            for L in self.layers:
                wanted = lay in ("L*", f"L{L}") and inj in self.injections and norm in self.norms
                if wanted and sn in self.state_norms:
                    s = RunSpec(L, inj, norm, bool(sn), self.extra_seed)
                    if s.name not in names:
                        out.append(s)
                        names.add(s.name)
        return out

    def task_dict(self) -> dict[str, Any]:
        return dict(self.task)

    def train_config(self, spec: RunSpec):  # -> tl_loop.train.TrainConfig
        from tl_loop.train import TrainConfig

        model = dict(
            d_model=self.d_model, n_heads=self.n_heads, d_head=self.d_model // self.n_heads, d_mlp=self.d_mlp,
            n_prelude_layers=self.n_prelude_layers, n_core_layers=spec.layers,
            n_coda_layers=self.n_coda_layers,
            n_steps=self.max_train_steps, injection=spec.injection, state_init=self.state_init,
            norm_between_steps=spec.state_norm, loop_norm_weights="own", **NORMS[spec.norm],
        )
        cfg = TrainConfig(
            name=f"sweep-{spec.name}", model=model, task=self.task_dict(), train_hops=self.train_hops,
            queries=self.queries, iterations=self.iterations, target_loss=self.target_loss,
            batch_size=self.batch_size, lr=self.lr, min_lr_ratio=self.min_lr_ratio, warmup=self.warmup,
            step_supervision=self.step_supervision, step_distribution=self.step_distribution,  # type: ignore[arg-type]
            mean_steps=self.mean_steps,
            min_steps=1, max_train_steps=self.max_train_steps, seed=spec.seed, threads=1,
            checkpoint_every=max(1, min(100, self.iterations)), eval_every=0, eval_hops=self.eval_hops,
            eval_steps=self.eval_steps, eval_n=self.eval_n,
            description=f"training sweep run {spec.name}",
        )
        for key, value in self.train_extra:
            if not hasattr(cfg, key):
                raise ValueError(f"train_extra: TrainConfig has no field {key!r}")
            setattr(cfg, key, value)
        cfg.__post_init__()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Sweep":
        """Read a saved sweep; a field missing from an older file takes the value that sweep ran
        with (:data:`BEFORE_FIELDS`), not today's default."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        for key, old in BEFORE_FIELDS.items():
            values.setdefault(key, old)
        for k, v in list(values.items()):
            if isinstance(v, list):
                values[k] = tuple(tuple(x) if isinstance(x, list) else x for x in v)
        return cls(**values)


#: Values of fields added to :class:`Sweep` after its first sweeps ran, as those sweeps had them
#: (a ``sweep.json`` without the field is read with these).
BEFORE_FIELDS: dict[str, Any] = {
    "second_seed_layers": (), "target_loss": None, "min_lr_ratio": 0.1, "step_supervision": False,
    "step_distribution": "lognormal_poisson",
}

#: The first sweep (``--preset chars``): one character per token, answer-only supervision, a
#: random number of steps per batch. Its models learned no links (``docs/design_study.md``).
CHARS = Sweep(
    second_seed_layers=(), second_seed=(
        ("L2", "none", "pre_norm", False), ("L2", "add", "pre_norm", False), ("L2", "add", "huginn", False),
        ("L2", "add", "ouro", True), ("L2", "linear", "huginn", False), ("L2", "none", "ouro", True)),
    d_model=64, n_heads=4, d_mlp=128, task=(("n_statements", 4), ("max_extra", 1), ("max_chain", 3),
                                            ("variables", "abcdefghij"), ("test_fraction", 0.1)),
    iterations=450, target_loss=None, batch_size=32, min_lr_ratio=0.1, warmup=50, step_supervision=False,
    step_distribution="lognormal_poisson", max_train_steps=8,
)

#: A 2-configuration, few-iteration sweep (the test, and ``--preset smoke``).
SMOKE = Sweep(
    layers=(1,), injections=("none", "add"), norms=("pre_norm",), state_norms=(False,), second_seed_layers=(),
    d_model=16, n_heads=2, d_mlp=32, iterations=4, batch_size=8, warmup=1, eval_hops=(1, 2),
    eval_steps=(1, 2, 4, 12), eval_n=8, measure_steps=12, measure_n=4, hold=4,
)
PRESETS: dict[str, Sweep] = {"full": Sweep(), "chars": CHARS, "smoke": SMOKE}


# --------------------------------------------------------------------------- one run
def _final_loss(log_path: Path, tail: float = 0.1) -> float:
    """Mean training loss over the last ``tail`` of the iterations (one batch is noisy: its
    number of steps is random)."""
    from tl_loop.train import logged_losses

    losses = logged_losses(log_path)
    if not losses:
        return float("nan")
    k = max(1, int(len(losses) * tail))
    return statistics.fmean(losses[-k:])


def measurement_tokens(sweep: Sweep, task: Any) -> torch.Tensor:
    """Held-out prompts of the fixed-point / attention measurement, split over the train hops."""
    per = max(1, sweep.measure_n // len(sweep.train_hops))
    problems = [p for h in sweep.train_hops for p in task.dataset(h, per, split="test", seed=7)]
    return task.encode(problems)[0]


@torch.no_grad()
def evaluate_run(model: Any, sweep: Sweep, spec: RunSpec) -> dict[str, Any]:
    """Accuracy by hops x steps, fixed-point and attention metrics of one trained model.

    Returns ``{"row": {...scalar metrics...}, "accuracy": [{hops, n_steps, accuracy}],
    "curves": {...per-step series for the figures...}}``."""
    from tl_loop.analysis import AttentionStats, run_streaming
    from tl_loop.studies.random_init import Criteria, LoopRecorder, RunMeasurement, classify
    from tl_loop.tasks.report import accuracy_table

    model.eval()
    task = sweep.train_config(spec).make_task()
    t0 = time.perf_counter()
    table = accuracy_table(model, task, sweep.eval_hops, sweep.eval_steps, n=sweep.eval_n, seed=0)
    eval_s = time.perf_counter() - t0
    trained = [h for h in sweep.eval_hops if h in sweep.train_hops]
    longer = [h for h in sweep.eval_hops if h > max(sweep.train_hops)]
    row: dict[str, Any] = {}
    for s in sweep.eval_steps:
        row[f"acc_s{s}"] = statistics.fmean(table[h][s] for h in trained) if trained else float("nan")
    for s in sweep.eval_steps:
        row[f"acc_long_s{s}"] = statistics.fmean(table[h][s] for h in longer) if longer else float("nan")
    t_steps = max(s for s in sweep.eval_steps if s <= sweep.max_train_steps)
    best_s = max(sweep.eval_steps, key=lambda s: (row[f"acc_s{s}"], -s))
    row["trained_depth_steps"] = t_steps
    row["acc_trained_depth"] = row[f"acc_s{t_steps}"]
    row["acc_long_trained_depth"] = row[f"acc_long_s{t_steps}"]
    row["acc_best"] = row[f"acc_s{best_s}"]
    row["best_steps"] = best_s
    row["acc_max_steps"] = row[f"acc_s{max(sweep.eval_steps)}"]
    row["acc_extrapolation"] = row["acc_max_steps"] - row["acc_trained_depth"]

    # fixed points and attention over measure_steps steps, one streamed pass
    t0 = time.perf_counter()
    tokens = measurement_tokens(sweep, task)
    recorder, attention = LoopRecorder(), AttentionStats("js")
    model.cfg.max_steps = max(model.cfg.max_steps, sweep.measure_steps)
    states, attn = run_streaming(model, tokens, recorder, attention, n_steps=sweep.measure_steps)
    m = RunMeasurement.from_states(states, sweep.tau, sweep.window_rho)
    criteria = Criteria()
    fp = m.summary(sweep.hold, criteria.tol)
    k = min(sweep.max_train_steps, m.relative.shape[0] + 1) - 2  # step distance entering the trained depth
    fp["step_dist_at_train_depth"] = float(m.relative[max(k, 0)].max())
    decisions = classify(fp, criteria)
    stable = attn.stable_step(sweep.attn_tol)  # [layer_in_cycle, head]
    settled = stable[stable >= 0]
    js = attn.distance.flatten(1)  # [step - 1, layer x head]
    att = {
        "attn_js_last": float(js[-1].max()),
        "attn_js_at_train_depth": float(js[max(k, 0)].max()),
        "attn_stable_share": float((stable >= 0).float().mean()),
        "attn_stable_step_median": float(settled.float().median()) if settled.numel() else float("nan"),
        "attn_stable_step_max": int(stable.max()) if bool((stable >= 0).all()) else -1,
        "sink_rate_last": float(attn.sink_rate()[-1]),
        "entropy_last": float(attn.entropy[-1].mean()),
        "colsum_last": float(attn.colsum[-1].mean()),
    }
    measure_s = time.perf_counter() - t0
    row.update(fp)
    row.update(decisions)
    row.update(att)
    row["eval_s"] = round(eval_s, 2)
    row["measure_s"] = round(measure_s, 2)
    curves = {
        "relative": m.relative.max(1).values.tolist(),
        "direction": m.direction.max(1).values.tolist(),
        "norm": m.norm[:, -1].tolist(),
        "attn_js": js.max(1).values.tolist(),
        "sink_rate": attn.sink_rate().tolist(),
    }
    accuracy = [{"hops": h, "n_steps": s, "accuracy": table[h][s]}
                for h in sorted(table) for s in sorted(table[h])]
    return {"row": row, "accuracy": accuracy, "curves": curves}


def run_one(out: str | Path, sweep: Sweep, spec: RunSpec,
            stop_at: int | None = None) -> dict[str, Any] | None:
    """Train (or resume) one run in ``out/runs/<name>`` and evaluate it; writes ``metrics.json``
    there (the run's "done" marker) and returns its content. Already done: read it back.
    ``stop_at`` interrupts training after that many iterations (no evaluation; returns None)."""
    from tl_loop.train import train

    folder = Path(out) / "runs" / spec.name
    done = folder / DONE_FILE
    if done.exists():
        return json.loads(done.read_text())
    torch.set_num_threads(1)
    cfg = sweep.train_config(spec)
    t0 = time.perf_counter()
    result = train(cfg, folder / "train", resume=True, progress=False, stop_at=stop_at)
    if result.iteration < cfg.iterations and not result.reached_target:
        return None
    train_s = result.elapsed_s  # training time over every session (from the checkpoint)
    metrics = evaluate_run(result.model, sweep, spec)
    row = {**spec.key(), "iterations": result.iteration, "reached_target_loss": result.reached_target,
           "params": sum(p.numel() for p in result.model.parameters()),
           "final_loss": _final_loss(folder / "train" / "train_log.csv"), "train_s": round(train_s, 2),
           **metrics["row"]}
    row["session_s"] = round(time.perf_counter() - t0, 2)
    payload = {"row": row, "accuracy": metrics["accuracy"], "curves": metrics["curves"]}
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload))
    tmp.replace(done)
    return payload


def _worker_init() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def _worker(args: tuple[str, dict[str, Any], dict[str, Any]]) -> tuple[str, dict[str, Any] | None, str]:
    out, sweep_dict, spec_dict = args
    spec = RunSpec(**spec_dict)
    try:
        return spec.name, run_one(out, Sweep.from_dict(sweep_dict), spec), ""
    except Exception as e:  # reported by the parent; the other runs go on
        import traceback

        return spec.name, None, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"


# --------------------------------------------------------------------------- the sweep
def _check_sweep_file(out: Path, sweep: Sweep) -> None:
    path = out / "sweep.json"
    if path.exists():
        saved = Sweep.from_dict(json.loads(path.read_text())).to_dict()  # fields added later: defaults
        new = sweep.to_dict()
        if saved != new:
            diff = sorted(k for k in set(saved) | set(new) if saved.get(k) != new.get(k))
            raise ValueError(f"{out} holds a sweep with other settings (differs in {diff}); "
                             "use another --out")
    else:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(sweep.to_dict(), indent=2) + "\n")


def pending(out: str | Path, sweep: Sweep) -> list[RunSpec]:
    """The runs without ``metrics.json``."""
    return [s for s in sweep.specs() if not (Path(out) / "runs" / s.name / DONE_FILE).exists()]


def run_sweep(out: str | Path, sweep: Sweep = Sweep(), jobs: int = 2,
              log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Train and evaluate every pending run of ``sweep`` under ``out``, ``jobs`` at a time (each in
    its own process with 1 torch thread; ``jobs=1`` runs them in this process). Appends the
    session's wall time to ``out/sessions.jsonl``; returns ``{"done", "skipped", "failed",
    "wall_s"}``."""
    out = Path(out)
    _check_sweep_file(out, sweep)
    todo = pending(out, sweep)
    skipped = len(sweep.specs()) - len(todo)
    if log:
        log(f"{len(todo)} runs to do, {skipped} already done ({jobs} job(s)) -> {out}")
    t0 = time.perf_counter()
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    done, failed = 0, []
    args = [(str(out), sweep.to_dict(), asdict(s)) for s in todo]

    def report(name: str, payload: dict[str, Any] | None, error: str) -> None:
        nonlocal done
        if payload is None:
            failed.append(name)
            if log:
                log(f"FAILED {name}: {error}")
            return
        done += 1
        if log:
            r = payload["row"]
            log(f"[{done + len(failed)}/{len(todo)}] {name}: loss {r['final_loss']:.3f}, "
                f"acc@{r['trained_depth_steps']} {r['acc_trained_depth']:.2f}, "
                f"acc@{max(sweep.eval_steps)} {r['acc_max_steps']:.2f}, tail step dist "
                f"{r['tail_relative']:.1e}, attn JS last {r['attn_js_last']:.1e} ({r['session_s']:.0f} s, "
                f"{time.perf_counter() - t0:.0f} s elapsed)")

    if jobs <= 1 or len(todo) <= 1:
        previous = torch.get_num_threads()
        try:
            for a in args:
                report(*_worker(a))
        finally:
            torch.set_num_threads(previous)
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # longest runs first, so the two workers finish together
        order = sorted(range(len(args)), key=lambda i: -todo[i].layers)
        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"),
                                 initializer=_worker_init) as pool:
            futures = [pool.submit(_worker, args[i]) for i in order]
            for fut in as_completed(futures):
                report(*fut.result())
    wall = time.perf_counter() - t0
    with (out / "sessions.jsonl").open("a") as f:
        f.write(json.dumps({"started": started, "wall_s": round(wall, 1), "runs_done": done, "failed": failed,
                            "skipped": skipped, "jobs": jobs, "cpus": os.cpu_count(),
                            "load_avg_end": _loadavg()}) + "\n")
    return {"done": done, "skipped": skipped, "failed": failed, "wall_s": wall}


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return None


# --------------------------------------------------------------------------- reading results
def load_results(out: str | Path, sweep: Sweep | None = None) -> list[dict[str, Any]]:
    """The ``metrics.json`` of every finished run (in the sweep's order)."""
    out = Path(out)
    if sweep is None:
        sweep = Sweep.from_dict(json.loads((out / "sweep.json").read_text()))
    results = []
    for s in sweep.specs():
        path = out / "runs" / s.name / DONE_FILE
        if path.exists():
            results.append(json.loads(path.read_text()))
    return results


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        if v == 0:
            return "0"
        if 100 <= abs(v) < 1e5:
            return f"{v:.0f}"
        return f"{v:.2f}" if 0.01 <= abs(v) < 100 else f"{v:.1e}"
    return str(v)


def _md(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c, _ in columns) + " |")
    return "\n".join(lines)


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


_INT_COLUMNS = ("layers", "seed", "iterations", "params", "best_steps", "convergence_step_max",
                "trained_depth_steps", "layers_converged", "attn_stable_step_max")


def read_runs(path: str | Path) -> list[dict[str, Any]]:
    """Read ``training_runs.csv`` back, numbers as numbers and decisions as booleans."""
    out = []
    with Path(path).open(newline="") as f:
        for r in csv.DictReader(f):
            row: dict[str, Any] = {}
            for k, v in r.items():
                if k in ("name", "injection", "norm"):
                    row[k] = v
                elif v in ("True", "False"):
                    row[k] = v == "True"
                elif v == "":
                    row[k] = float("nan")
                else:
                    x = float(v)
                    row[k] = int(x) if x.is_integer() and k in _INT_COLUMNS else x
            out.append(row)
    return out


def context_chance(sweep: Sweep) -> dict[int, float]:
    """Accuracy of guessing uniformly among the digits of the prompt (one per chain), on the same
    held-out problems as the accuracy table: what a model that has learned which tokens can be
    answers, but not to follow the links, scores."""
    from tl_loop.tasks.varbind import VarBindTask

    task = VarBindTask(**sweep.task_dict())
    return {h: task.guessing_accuracy(h, sweep.eval_n) for h in sweep.eval_hops}


# --------------------------------------------------------------------------- groups and claims
GROUP_COLUMNS: tuple[tuple[str, str], ...] = (
    ("norm", "norm"), ("state_norm", "state norm"), ("injection", "injection"), ("runs", "runs"),
    ("iterations", "iterations"), ("reached_target_loss", "reached target loss"),
    ("final_loss", "final loss"), ("acc_s1", "acc @1"), ("acc_trained_depth", "acc @trained depth"),
    ("acc_max_steps", "acc @max steps"), ("acc_long_trained_depth", "acc longer chains @trained depth"),
    ("converged_state", "fixed pt (state)"), ("converged_direction", "fixed pt (direction)"),
    ("converged_trend", "converging (trend)"), ("tail_relative", "max step dist, last 16"),
    ("step_dist_at_train_depth", "step dist at trained depth"), ("norm_ratio", "norm last / middle"),
    ("share_fixed_point", "tokens fixed pt"), ("degeneracy_relative", "layers' spread"),
    ("attn_js_last", "attn JS last step"), ("attn_stable_share", "heads stable"),
    ("attn_stable_step_median", "median stable step"), ("sink_rate_last", "sink rate"),
)


def group_rows(rows: Sequence[dict[str, Any]], by: Sequence[str] = ("norm", "state_norm", "injection")
               ) -> list[dict[str, Any]]:
    """Runs aggregated per configuration group: medians of the numbers, counts of the decisions."""
    keys: list[tuple[Any, ...]] = []
    for r in rows:
        k = tuple(r[b] for b in by)
        if k not in keys:
            keys.append(k)
    out = []
    for k in keys:
        g = [r for r in rows if tuple(r[b] for b in by) == k]
        row: dict[str, Any] = dict(zip(by, k))
        row["runs"] = len(g)
        for c, _ in GROUP_COLUMNS:
            if c in row or c == "runs":
                continue
            vals = [r[c] for r in g if c in r]
            if not vals:
                continue
            if isinstance(vals[0], bool):
                row[c] = f"{sum(vals)}/{len(vals)}"
            else:
                finite = [v for v in vals if not (isinstance(v, float) and math.isnan(v))]
                row[c] = statistics.median(finite) if finite else float("nan")
        out.append(row)
    return out


def claims(rows: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
    """Part 1's claims (:func:`~tl_loop.studies.random_init.evaluate_claims`, default criteria),
    decided on the trained runs, separately without and with the norm on the state between
    steps (the paper's Ouro-style is ``ouro`` with it)."""
    from tl_loop.studies.random_init import Criteria, evaluate_claims

    out = {}
    for sn, label in ((False, "no state norm"), (True, "state norm")):
        sub = [{**r, "init": "tl_loop"} for r in rows if r["state_norm"] == sn]
        if sub:
            out[label] = evaluate_claims(sub, Criteria())
    return out


def claims_matrix(verdicts: dict[str, list[Any]]) -> str:
    from tl_loop.studies.random_init import CLAIMS, NOTIONS

    word = {True: "yes", False: "no", None: "n.a."}
    cols = [(label, n) for label in verdicts for n in NOTIONS]
    lines = ["| claim | " + " | ".join(f"{a}, {n}" for a, n in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for claim in CLAIMS:
        cells = []
        for label, n in cols:
            v = next((v for v in verdicts[label] if v.claim == claim.key and v.notion == n), None)
            cells.append(word[v.holds] if v is not None else "")
        lines.append(f"| {claim.key}. {claim.text} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- figures
def _label(r: dict[str, Any]) -> str:
    return f"{r['norm']}{'+sn' if r['state_norm'] else ''}"


def _thin(x: list[float], y: list[float], points: int = 30) -> tuple[list[float], list[float]]:
    """Keep about ``points`` points, evenly spaced on a log axis (the figures' x axes are log)."""
    n = len(x)
    if n <= points:
        return x, y
    step = math.log(n) / (points - 1)
    keep = sorted({min(n - 1, int(round(math.exp(i * step))) - 1) for i in range(points)})
    return [x[i] for i in keep], [y[i] for i in keep]


def figures(results: Sequence[dict[str, Any]], sweep: Sweep) -> dict[str, Any]:
    """Plotly figures of the sweep (every run; second seeds dotted)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from tl_loop.studies.random_init import _compact

    rows = [res["row"] for res in results]
    figs: dict[str, Any] = {}
    colors = {1: "#1f77b4", 2: "#ff7f0e", 4: "#2ca02c"}
    norm_keys = [(n, sn) for n in sweep.norms for sn in sweep.state_norms]
    titles = [f"{inj} / {NORM_LABELS[n]}{' + state norm' if sn else ''}"
              for inj in sweep.injections for n, sn in norm_keys]

    def grid(name: str, title: str, series: Callable[[dict[str, Any]], tuple[list[float], list[float]]],
             y_title: str, log_y: bool, x_title: str = "recurrent steps", vline: bool = True,
             hline: float | None = None) -> None:
        fig = make_subplots(rows=len(sweep.injections), cols=len(norm_keys), subplot_titles=titles,
                            shared_xaxes=True, shared_yaxes=True, vertical_spacing=0.08,
                            horizontal_spacing=0.02)
        shown: set[int] = set()
        for res in results:
            r = res["row"]
            i = sweep.injections.index(r["injection"]) + 1
            j = norm_keys.index((r["norm"], r["state_norm"])) + 1
            x, y = _thin(*series(res))
            if log_y:
                y = [max(v, 1e-9) for v in y]
            L = r["layers"]
            fig.add_trace(go.Scatter(
                x=x, y=[float(f"{v:.3g}") for v in y], mode="lines",
                line={"color": colors.get(L, "#777"), "width": 1.5,
                      "dash": "solid" if r["seed"] == sweep.seeds[0] else "dot"},
                name=f"L={L}", legendgroup=f"L{L}", showlegend=L not in shown,
                hovertext=r["name"], hoverinfo="text+x+y"), row=i, col=j)
            shown.add(L)
        fig.update_yaxes(type="log" if log_y else "linear")
        fig.update_xaxes(type="log")
        if vline:
            for i in range(1, len(sweep.injections) + 1):
                for j in range(1, len(norm_keys) + 1):
                    fig.add_vline(x=sweep.max_train_steps, line={"color": "#aaa", "dash": "dash", "width": 1},
                                  row=i, col=j)
                    if hline is not None:
                        fig.add_hline(y=hline, line={"color": "#d62728", "dash": "dot", "width": 1},
                                      row=i, col=j)
        fig.update_layout(title=title, height=240 * len(sweep.injections) + 120,
                          legend_title_text="block size (dotted: 2nd seed)")
        fig.update_annotations(font_size=10)
        fig.add_annotation(text=x_title, xref="paper", yref="paper", x=0.5, y=-0.08, showarrow=False)
        fig.add_annotation(text=y_title, xref="paper", yref="paper", x=-0.06, y=0.5, textangle=-90,
                           showarrow=False)
        _compact(fig)
        figs[name] = fig

    steps = list(sweep.eval_steps)
    chance = context_chance(sweep)
    trained = [h for h in sweep.eval_hops if h in sweep.train_hops]
    longer = [h for h in sweep.eval_hops if h > max(sweep.train_hops)]
    grid("accuracy", "Held-out accuracy (trained hop counts) by inference steps; grey dashes: most steps "
         "seen in "
         "training; red dots: guessing among the prompt's digits",
         lambda res: (steps, [res["row"][f"acc_s{s}"] for s in steps]), "accuracy", False,
         hline=statistics.fmean(chance[h] for h in trained) if trained else None)
    if longer:
        grid("accuracy_longer", "Held-out accuracy on longer chains than trained, by inference steps",
             lambda res: (steps, [res["row"][f"acc_long_s{s}"] for s in steps]), "accuracy", False,
             hline=statistics.fmean(chance[h] for h in longer))
    grid("step_distance", "Largest relative step distance over the layers of the cycle, by step",
         lambda res: (list(range(2, len(res["curves"]["relative"]) + 2)), res["curves"]["relative"]),
         "||x[r] - x[r-1]|| / ||x[r-1]||", True)
    grid("attention", "Largest Jensen-Shannon distance of a head's pattern between consecutive steps",
         lambda res: (list(range(2, len(res["curves"]["attn_js"]) + 2)), res["curves"]["attn_js"]),
         "JS distance (bits)", True)

    # one point per run: fixed-point metric vs accuracy beyond training
    fig = go.Figure()
    symbols = {"none": "circle", "add": "square", "linear": "diamond"}
    for inj in sweep.injections:
        for L in sweep.layers:
            g = [r for r in rows if r["injection"] == inj and r["layers"] == L]
            if not g:
                continue
            fig.add_trace(go.Scatter(
                x=[max(r["tail_relative"], 1e-9) for r in g], y=[r["acc_extrapolation"] for r in g],
                mode="markers", marker={"symbol": symbols[inj], "color": colors.get(L, "#777"), "size": 9,
                                        "line": {"width": 0.5}},
                name=f"{inj}, L={L}", text=[r["name"] for r in g], hoverinfo="text+x+y"))
    fig.update_xaxes(type="log", title=f"max relative step distance over the last {sweep.hold} of "
                                       f"{sweep.measure_steps} steps")
    fig.update_yaxes(title=f"accuracy at {max(sweep.eval_steps)} steps minus at {sweep.max_train_steps}")
    fig.update_layout(title="Does a stable fixed point go with accuracy that holds beyond the trained depth?")
    _compact(fig)
    figs["fixed_point_vs_extrapolation"] = fig
    return figs


# --------------------------------------------------------------------------- report
def training_text(sweep: Sweep) -> str:
    """How every run of ``sweep`` is trained, in words (for the report's header)."""
    from tl_loop.train import steps_text

    cfg = sweep.train_config(sweep.specs()[0])
    stop = (f"until the mean loss of the last {cfg.target_window} iterations is <= {cfg.target_loss:g}, "
            f"at most {cfg.iterations} iterations" if cfg.target_loss is not None else f"{cfg.iterations} iterations")
    lr = f"lr {cfg.lr:g}" + (" constant" if cfg.min_lr_ratio == 1 else f" (cosine to {cfg.min_lr_ratio:g}x)")
    supervision = ("every step supervised on the link it reaches" if cfg.step_supervision
                   else "the answer supervised after the last step")
    return (f"{stop} of {cfg.batch_size} sequences, {lr}, warm-up {cfg.warmup}; recurrent steps per batch: "
            f"{steps_text(cfg)}; {supervision}")


RUN_COLUMNS: tuple[tuple[str, str], ...] = (
    ("name", "run"), ("iterations", "iterations"), ("final_loss", "loss"), ("acc_s1", "acc @1"),
    ("acc_trained_depth", "acc @trained depth"),
    ("acc_max_steps", "acc @max"), ("best_steps", "best steps"), ("tail_relative", "step dist, last 16"),
    ("tail_direction", "direction step dist"), ("norm_ratio", "norm last/mid"),
    ("share_fixed_point", "tokens fixed pt"), ("degeneracy_relative", "layers' spread"),
    ("converged_state", "fixed pt"), ("attn_js_last", "attn JS last"),
    ("attn_stable_share", "heads stable"), ("attn_stable_step_median", "stable step"), ("train_s", "train s"),
)


def write_report(out: str | Path, docs: str | Path, figures_html: bool = True) -> dict[str, Path]:
    """Write ``training_sweep.md``, ``training_runs.csv``, ``training_accuracy.csv``,
    ``training_study.json`` and ``training_figures.html`` into ``docs`` from the finished runs
    under ``out``."""
    out, docs = Path(out), Path(docs)
    sweep = Sweep.from_dict(json.loads((out / "sweep.json").read_text()))
    results = load_results(out, sweep)
    if not results:
        raise FileNotFoundError(f"no finished runs under {out}")
    docs.mkdir(parents=True, exist_ok=True)
    rows = [res["row"] for res in results]
    paths = {"runs": docs / "training_runs.csv", "accuracy": docs / "training_accuracy.csv",
             "summary": docs / "training_sweep.md"}
    _write_csv(paths["runs"], rows)
    _write_csv(paths["accuracy"],
               [{"name": res["row"]["name"], **a} for res in results for a in res["accuracy"]])
    sessions = []
    if (out / "sessions.jsonl").exists():
        text = (out / "sessions.jsonl").read_text()
        sessions = [json.loads(line) for line in text.splitlines() if line.strip()]
    wall = sum(s["wall_s"] for s in sessions)
    cpu = sum(r["session_s"] for r in rows)
    missing = len(sweep.specs()) - len(results)
    groups = group_rows(rows)
    by_layers = group_rows(rows, by=("layers", "norm", "state_norm", "injection"))
    verdicts = claims(rows)
    chance = context_chance(sweep)
    lines = [
        "# Training sweep: results",
        "",
        "Written by `python -m tl_loop.studies.training_sweep report` from the runs of "
        "`python -m tl_loop.studies.training_sweep run`; read in `docs/design_study.md`.",
        "",
        f"- runs: {len(results)} of {len(sweep.specs())}" + (f" (**{missing} missing**)" if missing else ""),
        f"- wall time of the `run` sessions: {wall:.0f} s ({wall / 60:.1f} min) with "
        f"{max((s['jobs'] for s in sessions), default=0)} job(s) on "
        f"{sessions[-1]['cpus'] if sessions else '?'} CPUs; "
        f"sum of the runs' own time (training, evaluation, measurement): {cpu:.0f} s ({cpu / 60:.1f} min); "
        f"load average at the end of each session: {[s.get('load_avg_end') for s in sessions]}",
        f"- model: d_model {sweep.d_model}, {sweep.n_heads} heads, d_mlp {sweep.d_mlp}, "
        f"{sweep.n_prelude_layers} prelude + L recurrent + {sweep.n_coda_layers} coda layers, "
        f"state init `{sweep.state_init}`; task {sweep.task_dict()}, trained on hops "
        f"{list(sweep.train_hops)} ({sweep.queries} questions per sequence), " + training_text(sweep),
        f"- accuracy: {sweep.eval_n} held-out problems per hop count, hops {list(sweep.eval_hops)} "
        f"(trained: {list(sweep.train_hops)}), steps {list(sweep.eval_steps)}; `acc` columns average "
        "the trained hop counts",
        f"- fixed points and attention: {sweep.measure_n} held-out prompts run for {sweep.measure_steps} "
        "steps; part 1's criteria (fixed point: every layer's relative step distance <= 1e-3 over the last "
        f"{sweep.hold} steps); a head "
        f"is *stable* once its JS distance between consecutive steps stays <= {sweep.attn_tol:g}",
        "- baseline: guessing uniformly among the digits of the prompt (one per chain) scores "
        + ", ".join(f"{chance[h]:.2f} at {h} hop{'s' if h > 1 else ''}" for h in sorted(chance))
        + " on the same problems (a model that has learned which tokens can be answers, but not to follow "
        "the "
        "links); guessing among the 10 digits scores 0.10",
        "",
        "## Part 1's claims, decided on the trained models",
        "",
        "Same rules as part 1 (`evaluate_claims`, default `Criteria`), over every block size and seed of "
        "a group; "
        "decided separately without and with the norm on the state between steps.",
        "",
        claims_matrix(verdicts),
        "",
        "## Groups (medians over block sizes and seeds; counts for the decisions)",
        "",
        _md(groups, GROUP_COLUMNS),
        "",
        "## Per block size",
        "",
        _md(by_layers, (("layers", "L"),) + GROUP_COLUMNS),
        "",
        "## Every run",
        "",
        _md(rows, RUN_COLUMNS),
        "",
        "## Evidence for the claims",
        "",
    ]
    for label, vs in verdicts.items():
        for v in vs:
            lines.append(f"- *{label}*, claim {v.claim} ({v.notion}): **{v.label}** -- {v.evidence}")
    lines.append("")
    paths["summary"].write_text("\n".join(lines))
    with (docs / "training_study.json").open("w") as f:
        json.dump({"sweep": sweep.to_dict(), "sessions": sessions, "context_chance": chance,
                   "runs": len(results), "missing": missing,
                   "python": platform.python_version(), "torch": torch.__version__}, f, indent=2)
    paths["study"] = docs / "training_study.json"
    if figures_html:
        from tl_loop.studies.random_init import write_figures_html

        paths["figures"] = write_figures_html(
            figures(results, sweep), docs / "training_figures.html", "Design study, part 2: training sweep",
            "Rows: injection; columns: sublayer normalisation, with or without a norm on the state between "
            "steps. "
            "Colours: block size L. Dotted lines: the second seed.")
    return paths


# --------------------------------------------------------------------------- command line
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tl_loop.studies.training_sweep",
                                description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in (("run", "train and evaluate every pending run"),
                       ("report", "write the tables and figures"),
                       ("all", "run, then report"), ("list", "list the runs and whether they are done")):
        s = sub.add_parser(name, help=text)
        s.add_argument("--out", default="tl-loop-runs/sweep", help="run folder (default %(default)s)")
        if name in ("run", "all", "list"):
            s.add_argument("--preset", default="full", choices=sorted(PRESETS),
                           help="sweep settings (default full)")
        if name in ("run", "all", "list"):
            s.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                           help="override a Sweep field, e.g. --set iterations=900 or "
                                "--set 'train_extra=[[\"recalls\", 4]]' (repeatable; another --out then)")
        if name in ("run", "all"):
            s.add_argument("--jobs", type=int, default=2,
                           help="runs in parallel, 1 torch thread each (default 2)")
        if name in ("report", "all"):
            s.add_argument("--docs", default="docs/design_study",
                           help="where the report goes (default %(default)s)")
            s.add_argument("--no-figures", action="store_true")
    return p


def _with_overrides(sweep: Sweep, settings: Sequence[str]) -> Sweep:
    if not settings:
        return sweep
    data = sweep.to_dict()
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep or key not in data:
            raise SystemExit(f"--set {item!r}: expected FIELD=JSON with FIELD one of {sorted(data)}")
        try:
            data[key] = json.loads(value)
        except json.JSONDecodeError:
            data[key] = value  # a bare string
    return Sweep.from_dict(data)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    sweep = _with_overrides(PRESETS[args.preset], args.set) if hasattr(args, "preset") else None
    if args.command == "list":
        assert sweep is not None
        todo = {s.name for s in pending(args.out, sweep)}
        for s in sweep.specs():
            print(f"{s.name}: {'pending' if s.name in todo else 'done'}")
        return 0
    if args.command in ("run", "all"):
        assert sweep is not None
        summary = run_sweep(args.out, sweep, jobs=args.jobs)
        print(f"{summary['done']} runs done, {summary['skipped']} skipped, {len(summary['failed'])} failed "
              f"in {summary['wall_s']:.0f} s")
        if summary["failed"]:
            return 1
    if args.command in ("report", "all"):
        paths = write_report(args.out, args.docs, figures_html=not args.no_figures)
        for p in paths.values():
            print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
