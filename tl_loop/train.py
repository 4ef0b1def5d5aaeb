"""Training small looped models on CPU, and the recipes of the shipped models.

Seeded, resumable (model, optimizer and iteration in ``<out>/checkpoint/``), with a progress bar
and a loss log (``<out>/train_log.csv``). Every batch runs a random number of recurrent steps,
drawn (as in Huginn, Geiping et al. 2025) from a log-normal Poisson distribution, so the model
learns to keep improving with more steps at inference; optionally the gradient flows through the
last ``backprop_steps`` steps only (truncated backpropagation)::

    python -m tl_loop.train recipe looped            # retrain the shipped looped model
    python -m tl_loop.train recipe baseline          # ... and its feedforward baseline
    python -m tl_loop.train recipe looped --install  # write the result into tl_loop/pretrained/

A run writes, under ``--out`` (default ``tl-loop-runs/<name>``): ``checkpoint/``,
``train_log.csv`` (iteration, loss, n_steps, lr, grad_norm, elapsed_s), ``eval_log.csv``
(held-out accuracy during training), ``model/`` (``from_pretrained``-loadable), and the report
``REPORT.md`` with ``loss_curve.csv`` / ``loss_curve.svg`` and ``accuracy.csv`` (hops x steps).

``transformer_lens.tools.training.train`` is not reused: it trains the full next-token loss at a
fixed depth, pickles checkpoints and cannot resume; here the loss is the answer token's and the
depth changes every batch.

>>> cfg = TrainConfig(name="tiny", model=dict(d_model=16, d_head=8, n_heads=2, d_mlp=32,
...                   n_core_layers=1, n_steps=2, injection="add", state_init="zeros"),
...                   iterations=2, batch_size=4, eval_every=0, threads=1)
>>> [sample_n_steps(random.Random(i), cfg) for i in range(8)]   # Poisson(~4) + 1, in [1, 8]
[7, 8, 8, 4, 3, 5, 3, 3]
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import math
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from tl_loop.config import LoopedConfig
from tl_loop.loading import write_checkpoint
from tl_loop.loading.atomic import replace_folder
from tl_loop.model import HookedLoopedTransformer
from tl_loop.tasks.report import accuracy_table, ema, markdown_table, svg_line_plot, write_table_csv
from tl_loop.tasks.varbind import VarBindTask

StepDistribution = Literal["lognormal_poisson", "uniform", "fixed"]

CHECKPOINT_DIR = "checkpoint"
LOG_FIELDS = ("iteration", "loss", "n_steps", "lr", "grad_norm", "elapsed_s")
#: Settings a run may change when it resumes (they do not change what is computed).
RESUME_IGNORES = ("checkpoint_every",)


@dataclass
class TrainConfig:
    """Everything a run depends on (saved with every checkpoint and in the model's config).

    ``model`` holds ``LoopedConfig`` fields (``d_vocab`` and ``n_ctx`` default to the task's);
    ``task`` holds ``VarBindTask`` fields. An *iteration* is one optimizer update; *steps* are
    recurrent steps of the loop.
    """

    name: str
    model: dict[str, Any]
    task: dict[str, Any] = field(default_factory=dict)
    train_hops: tuple[int, ...] = (1, 2, 3, 4, 5, 6)
    queries: int = 1  # questions per training sequence (the first is the problem; see VarBindTask.encode_training)
    recalls: int = 0  # repeated statements per training sequence, supervised on their right-hand side
    iterations: int = 2000
    #: stop early once the mean training loss over the last ``target_window`` iterations is at or
    #: below this (``None``: always run ``iterations``)
    target_loss: float | None = None
    target_window: int = 50
    batch_size: int = 64
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio
    warmup: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    # recurrent steps per batch
    step_distribution: StepDistribution = "lognormal_poisson"
    mean_steps: float = 4.0  # mean of the log-normal rate (lognormal_poisson) / of nothing else
    steps_sigma: float = 0.5
    min_steps: int = 1
    max_train_steps: int = 8
    backprop_steps: int | None = None  # truncated backprop: gradient through the last k steps only
    #: supervise the logits read out after every step on the link reached after that many steps
    #: (one hop per step; the digit once the chain has ended) instead of the last step's answer
    step_supervision: bool = False
    # bookkeeping
    seed: int = 0
    threads: int = 2
    checkpoint_every: int = 100
    log_every: int = 1
    eval_every: int = 250  # quick held-out accuracy during training (0: never)
    eval_hops: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
    eval_steps: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
    eval_n: int = 256  # held-out problems per hop count in the final report
    description: str = ""

    def __post_init__(self) -> None:
        self.train_hops = tuple(self.train_hops)
        self.eval_hops = tuple(self.eval_hops)
        self.eval_steps = tuple(self.eval_steps)
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        if self.step_distribution not in ("lognormal_poisson", "uniform", "fixed"):
            raise ValueError(f"unknown step_distribution {self.step_distribution!r}")
        for name in ("iterations", "checkpoint_every", "threads", "batch_size", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "iterations" else 1):
                raise ValueError(f"{name} must be an int >= {0 if name == 'iterations' else 1}, got {value!r}")
        if not 1 <= self.min_steps <= self.max_train_steps:
            raise ValueError("need 1 <= min_steps <= max_train_steps")
        if self.backprop_steps is not None and self.backprop_steps < 1:
            raise ValueError("backprop_steps must be >= 1 (or None for full backpropagation)")
        if self.target_loss is not None and (self.target_loss <= 0 or self.target_window < 1):
            raise ValueError("target_loss must be > 0 and target_window >= 1")
        if self.target_loss is not None and self.log_every != 1:
            raise ValueError("target_loss needs log_every=1 (a resumed run reads its recent losses from the log)")
        if self.step_supervision and (self.backprop_steps is not None or self.recalls):
            raise ValueError("step_supervision works with full backpropagation and without recalls")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def make_task(self) -> VarBindTask:
        return VarBindTask(**self.task)

    def make_model_config(self) -> LoopedConfig:
        task = self.make_task()
        values = dict(d_vocab=task.tokenizer.vocab_size, n_ctx=task.n_positions + task.segment_length * max(self.queries + self.recalls - 1, 0))
        values.update(self.model)
        values.setdefault("family", "tl_loop")
        values.setdefault("model_name", f"tl-loop/{self.name}")
        extra = dict(values.get("extra", {}))
        extra["task"] = {"name": "varbind", **{f.name: getattr(task, f.name) for f in fields(task) if f.name != "tokenizer"}}
        extra["train_hops"] = list(self.train_hops)
        extra["train_steps"] = [self.min_steps, self.max_train_steps]
        values["extra"] = extra
        return LoopedConfig(**values)


# ---------------------------------------------------------------------------------- sampling
def _poisson(rng: random.Random, lam: float) -> int:
    """Knuth's Poisson sampler (rates here are small)."""
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def sample_n_steps(rng: random.Random, cfg: TrainConfig) -> int:
    """Recurrent steps for one batch, in ``[min_steps, max_train_steps]``.

    ``lognormal_poisson`` (Huginn): ``tau ~ N(log(mean) - sigma^2 / 2, sigma)``,
    ``n ~ Poisson(exp(tau)) + 1``, clipped; ``uniform``: uniform over the range; ``fixed``:
    always ``max_train_steps``.
    """
    if cfg.step_distribution == "fixed":
        return cfg.max_train_steps
    if cfg.step_distribution == "uniform":
        return rng.randint(cfg.min_steps, cfg.max_train_steps)
    tau = rng.gauss(math.log(cfg.mean_steps) - cfg.steps_sigma**2 / 2, cfg.steps_sigma)
    n = _poisson(rng, math.exp(tau)) + 1
    return max(cfg.min_steps, min(cfg.max_train_steps, n))


def batch_rng(cfg: TrainConfig, iteration: int) -> random.Random:
    """The data (and step count) of iteration ``i`` depend on ``(seed, i)`` only, so a resumed run
    sees exactly the batches an uninterrupted one would."""
    return random.Random(1_000_003 * cfg.seed + iteration)


def learning_rate(cfg: TrainConfig, iteration: int) -> float:
    """Linear warm-up, then cosine decay to ``lr * min_lr_ratio`` at the last iteration."""
    if iteration < cfg.warmup:
        return cfg.lr * (iteration + 1) / cfg.warmup
    span = max(cfg.iterations - cfg.warmup, 1)
    progress = min((iteration - cfg.warmup) / span, 1.0)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------------------------- the model
class _Stop(Exception):
    """Raised by a hook to end a forward pass early (the no-grad part of truncated backprop)."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value


def answer_logits_train(model: HookedLoopedTransformer, tokens: torch.Tensor, n_steps: int,
                        backprop_steps: int | None, positions: Any = -1) -> torch.Tensor:
    """Logits at ``positions`` (default the last) after ``n_steps`` steps; with
    ``backprop_steps=k < n_steps`` the first ``n_steps - k`` steps run without a graph and the
    last ``k`` start from their (detached) state. The prelude keeps its gradient through the
    input injection, as in Huginn's truncated backpropagation."""
    if backprop_steps is None or backprop_steps >= n_steps:
        return model(tokens, n_steps=n_steps)[:, positions]
    free = n_steps - backprop_steps

    def stop(x: torch.Tensor, hook: Any) -> None:
        raise _Stop(x.detach())

    with torch.no_grad(), model.steps(n_steps):
        try:
            model.run_with_hooks(tokens, fwd_hooks=[(f"loops.{free}.hook_state_in", stop)], return_type=None)
        except _Stop as s:
            state = s.value
        else:  # pragma: no cover - the hook always fires
            raise RuntimeError("truncated backprop: the state hook did not fire")
    return model(tokens, n_steps=backprop_steps, init_state=state)[:, positions]


def step_logits_train(model: HookedLoopedTransformer, tokens: torch.Tensor, n_steps: int,
                      positions: Any) -> torch.Tensor:
    """Logits at ``positions`` read out after every one of ``n_steps`` steps, with gradients:
    ``[n_steps, batch, len(positions), d_vocab]`` (the state each step hands on, through the coda
    and the head, as ``model.step_logits``)."""
    from tl_loop.readout import read_out, step_end_hook_names

    states: list[torch.Tensor] = []
    with model.steps(n_steps):
        hooks = [(name, lambda x, hook: states.append(x)) for name in step_end_hook_names(model)]
        model.run_with_hooks(tokens, fwd_hooks=hooks, return_type=None)
    return read_out(model, torch.stack(states)[:, :, : int(max(positions)) + 1])[:, :, positions]


def build_model(cfg: TrainConfig) -> HookedLoopedTransformer:
    return HookedLoopedTransformer(cfg.make_model_config(), tokenizer=cfg.make_task().tokenizer, seed=cfg.seed)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=cfg.betas,
    )


# ---------------------------------------------------------------------------------- checkpoints
def save_checkpoint(out: Path, model: HookedLoopedTransformer, optimizer: torch.optim.Optimizer,
                    cfg: TrainConfig, iteration: int, elapsed: float) -> None:
    """Atomically replace ``out/checkpoint`` (weights as safetensors, optimizer state, JSON state)."""
    from safetensors.torch import save_file

    tmp = out / (CHECKPOINT_DIR + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"iteration": iteration, "elapsed_s": elapsed, "config": cfg.to_dict()}, indent=2))
    final = out / CHECKPOINT_DIR
    old = out / (CHECKPOINT_DIR + ".old")
    # Every folder is complete once renamed; the only copy is never deleted: without ``final``
    # (a crash between the renames below) ``old`` is the checkpoint and stays until ``tmp`` replaces it.
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


def checkpoint_folder(out: Path) -> Path | None:
    """The checkpoint to resume from: ``checkpoint/``, else ``checkpoint.old/`` (left by a crash
    between the two renames of ``save_checkpoint``), else None."""
    for name in (CHECKPOINT_DIR, CHECKPOINT_DIR + ".old"):
        if (out / name / "state.json").is_file():
            return out / name
    return None


def load_checkpoint(out: Path, model: HookedLoopedTransformer, optimizer: torch.optim.Optimizer,
                    cfg: TrainConfig) -> tuple[int, float]:
    """Restore model and optimizer from the checkpoint in ``out`` (see ``checkpoint_folder``);
    returns ``(iteration, elapsed_s)``."""
    from safetensors.torch import load_file

    folder = checkpoint_folder(out)
    if folder is None:
        raise FileNotFoundError(f"{out} holds no checkpoint to resume from")
    state = json.loads((folder / "state.json").read_text())
    # a field added to TrainConfig after the checkpoint was written takes its default
    saved, wanted = TrainConfig.from_dict(state["config"]).to_dict(), cfg.to_dict()
    for key in RESUME_IGNORES:
        saved.pop(key, None), wanted.pop(key, None)
    if saved != wanted:
        diff = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
        raise ValueError(
            f"{folder} was written with other settings (they differ in {', '.join(diff)}); to start over "
            "with the new settings pass --no-resume (resume=False in Python), or use another --out"
        )
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    return int(state["iteration"]), float(state["elapsed_s"])


def _truncate_csv(path: Path, iteration: int) -> None:
    """Drop log rows written after the checkpoint we resume from."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
        header = rows[0].keys() if rows else None
    if header is None:
        return
    keep = [r for r in rows if int(r["iteration"]) <= iteration]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(header))
        w.writeheader()
        w.writerows(keep)


def logged_losses(path: Path) -> list[float]:
    """Training losses in the log, in order (empty without a log)."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def _reached_target(cfg: TrainConfig, recent: collections.deque[float]) -> bool:
    """Whether the mean loss of the last ``cfg.target_window`` iterations is at or below
    ``cfg.target_loss``."""
    return (cfg.target_loss is not None and len(recent) >= cfg.target_window
            and sum(recent) / len(recent) <= cfg.target_loss)


# ---------------------------------------------------------------------------------- training
@dataclass
class TrainResult:
    model: HookedLoopedTransformer
    out: Path
    iteration: int  # iterations done (fewer than ``cfg.iterations`` when the target loss was reached)
    elapsed_s: float
    final_loss: float
    reached_target: bool = False


def train(cfg: TrainConfig, out: str | Path, resume: bool = True, progress: bool = True,
          stop_at: int | None = None) -> TrainResult:
    """Train (or resume training) ``cfg`` in folder ``out``.

    ``stop_at`` ends the run after that many iterations (a checkpoint is written), as if it had
    been interrupted; calling ``train`` again resumes where it stopped.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        task = cfg.make_task()
        model = build_model(cfg)
        optimizer = make_optimizer(model, cfg)
        start, elapsed = 0, 0.0
        log_path, eval_path = out / "train_log.csv", out / "eval_log.csv"
        if resume and checkpoint_folder(out) is not None:
            start, elapsed = load_checkpoint(out, model, optimizer, cfg)
            _truncate_csv(log_path, start)
            _truncate_csv(eval_path, start)
        else:
            for p in (log_path, eval_path):
                p.unlink(missing_ok=True)
        end = cfg.iterations if stop_at is None else min(stop_at, cfg.iterations)
        new_log = not log_path.exists()
        log_file = open(log_path, "a", newline="")
        log = csv.writer(log_file)
        if new_log:
            log.writerow(LOG_FIELDS)
        bar = tqdm(total=cfg.iterations, initial=start, desc=cfg.name, disable=not progress, dynamic_ncols=True)
        t0 = time.perf_counter() - elapsed
        smooth, loss_value = None, float("nan")
        recent = collections.deque(logged_losses(log_path), maxlen=cfg.target_window)
        done = start
        model.train()
        for iteration in range(start, end):
            if _reached_target(cfg, recent):
                break
            rng = batch_rng(cfg, iteration)
            n_steps = sample_n_steps(rng, cfg)
            problems = task.batch(rng, cfg.batch_size, cfg.train_hops, "train")
            batch = task.encode_training(problems, rng, cfg.queries, cfg.train_hops, cfg.recalls,
                                         n_steps if cfg.step_supervision else 0)
            tokens, positions, answers = batch.tokens, batch.positions, batch.answers
            lr = learning_rate(cfg, iteration)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if cfg.step_supervision:
                logits = step_logits_train(model, tokens, n_steps, positions)  # [step, batch, segment, vocab]
                targets = batch.step_answers.permute(2, 0, 1)  # type: ignore[union-attr]
                loss = F.cross_entropy(logits.float().flatten(0, 2), targets.flatten())
            else:
                logits = answer_logits_train(model, tokens, n_steps, cfg.backprop_steps, positions)
                loss = F.cross_entropy(logits.float().flatten(0, 1), answers.flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
            optimizer.step()
            loss_value = float(loss.detach())
            recent.append(loss_value)
            smooth = loss_value if smooth is None else 0.95 * smooth + 0.05 * loss_value
            done = iteration + 1
            if done % cfg.log_every == 0:
                log.writerow([done, f"{loss_value:.5f}", n_steps, f"{lr:.6g}", f"{grad_norm:.4f}",
                              f"{time.perf_counter() - t0:.2f}"])
            bar.update(1)
            bar.set_postfix(loss=f"{smooth:.3f}", steps=n_steps)
            if cfg.eval_every and done % cfg.eval_every == 0:
                _quick_eval(model, task, cfg, done, eval_path)
                model.train()
            if done % cfg.checkpoint_every == 0 or done == end or _reached_target(cfg, recent):
                log_file.flush()
                save_checkpoint(out, model, optimizer, cfg, done, time.perf_counter() - t0)
        bar.close()
        log_file.close()
        if math.isnan(loss_value) and start > 0:  # resumed a finished run: its last logged loss
            logged = logged_losses(log_path)
            loss_value = logged[-1] if logged else loss_value
        model.eval()
        elapsed = time.perf_counter() - t0
        return TrainResult(model=model, out=out, iteration=done, elapsed_s=elapsed,
                           final_loss=loss_value, reached_target=_reached_target(cfg, recent))
    finally:
        torch.set_num_threads(previous_threads)


def _quick_eval(model: HookedLoopedTransformer, task: VarBindTask, cfg: TrainConfig, iteration: int, path: Path) -> None:
    """Held-out accuracy on 128 problems per trained hop count, at the smallest and the largest
    trained depth (``eval_log.csv``: one row per hop count and depth)."""
    model.eval()
    steps = sorted({cfg.min_steps, cfg.max_train_steps})
    table = accuracy_table(model, task, cfg.train_hops, steps, n=128, seed=1)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["iteration", "n_steps", "hops", "accuracy"])
        for s in steps:
            for h in sorted(table):
                w.writerow([iteration, s, h, f"{table[h][s]:.4f}"])


# ---------------------------------------------------------------------------------- report
def finish(result: TrainResult, cfg: TrainConfig, export_to: Path | None = None) -> Path:
    """Save the trained model (``out/model``, or ``export_to``), evaluate it on held-out problems
    (hops x steps) and write ``REPORT.md``, ``accuracy.csv``, ``loss_curve.csv`` and
    ``loss_curve.svg`` next to it. Returns the model folder.

    Everything is written into a staging folder that replaces the model folder only once complete
    (``tl_loop.loading.atomic``): an interrupt leaves the previous model folder whole."""
    folder = Path(export_to) if export_to is not None else result.out / "model"
    with replace_folder(folder) as staging:
        _write_model_folder(result, cfg, staging)
    return folder


def _write_model_folder(result: TrainResult, cfg: TrainConfig, folder: Path) -> None:
    """The model, its evaluation and its report, into the (empty) folder ``folder``."""
    model, out = result.model, result.out
    model.eval()
    model.set_n_steps(cfg.model.get("n_steps", cfg.max_train_steps), force=True)
    write_checkpoint(model, folder, family="tl_loop")
    task = cfg.make_task()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    try:
        looped = cfg.step_distribution != "fixed" or cfg.max_train_steps > 1
        steps = cfg.eval_steps if looped else (cfg.max_train_steps,)
        table = accuracy_table(model, task, cfg.eval_hops, steps, n=cfg.eval_n, seed=0)
    finally:
        torch.set_num_threads(previous_threads)
    eval_s = time.perf_counter() - t0
    write_table_csv(folder / "accuracy.csv", table, f"tl-loop/{cfg.name}")
    _write_loss_files(out / "train_log.csv", folder)
    (folder / "recipe.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    marks = {h: " (held out: longer than trained)" for h in cfg.eval_hops if h > max(cfg.train_hops)}
    mcfg = model.cfg
    n_params = sum(p.numel() for p in model.parameters())
    lines = [
        f"# tl-loop/{cfg.name}",
        "",
        cfg.description,
        "",
        f"Retrain from scratch with `python -m tl_loop.train recipe {cfg.name}{_cli_overrides(cfg)}` (add "
        "`--install` to overwrite this folder). Everything below was written by that command.",
        "",
        "## Model",
        "",
        f"- layout: {mcfg.n_prelude_layers} prelude + {mcfg.n_core_layers} recurrent + {mcfg.n_coda_layers} coda "
        f"layers; d_model {mcfg.d_model}, {mcfg.n_heads} heads of {mcfg.d_head}, d_mlp {mcfg.d_mlp}, "
        f"{mcfg.positional_embedding_type} positions, {mcfg.norm_type} norm; injection `{mcfg.injection}`, "
        f"initial state `{mcfg.state_init}`, norm between steps: {mcfg.norm_between_steps}",
        f"- parameters: {n_params:,}; default n_steps {mcfg.n_steps}",
        f"- trained on hops {list(cfg.train_hops)} for {cfg.iterations} iterations of {cfg.batch_size} problems; "
        f"recurrent steps per batch: {steps_text(cfg)}; "
        f"{cfg.queries} question(s) and {cfg.recalls} recall(s) per sequence; "
        f"{'every step supervised on the link it reaches' if cfg.step_supervision else 'the answer supervised'}; "
        f"task encoding `{task.encoding}`; backprop through "
        f"{'all steps' if cfg.backprop_steps is None else f'the last {cfg.backprop_steps} steps'}",
        f"- training time: {result.elapsed_s / 60:.1f} min on {cfg.threads} CPU thread(s) "
        f"(evaluation {eval_s / 60:.1f} min); final training loss {result.final_loss:.4f}",
        "",
        "## Held-out accuracy (%) by number of hops (rows) and inference steps (columns)",
        "",
        f"{cfg.eval_n} held-out problems per row (test split: prompts whose hash falls in the held-out "
        f"{100 * task.test_fraction:.0f}%, never trained on); a prediction is the arg-max over the whole vocabulary. "
        f"Guessing among the digits that end a chain in the prompt scores {_guessing_text(task, cfg)}.",
        "",
        markdown_table(table, marks=marks),
        "",
        "## Loss",
        "",
        "![loss curve](loss_curve.svg)",
        "",
        f"`loss_curve.csv`: iteration, loss ({'cross-entropy of the link reached after each step, mean over steps' if cfg.step_supervision else 'answer token cross-entropy'}), recurrent steps of that batch, "
        "smoothed loss. `accuracy.csv`: the table above.",
        "",
    ]
    (folder / "REPORT.md").write_text("\n".join(lines))


def steps_text(cfg: TrainConfig) -> str:
    """The recurrent steps per batch of ``cfg``, in words."""
    if cfg.step_distribution == "fixed":
        return f"always {cfg.max_train_steps}"
    if cfg.step_distribution == "uniform":
        return f"uniform in [{cfg.min_steps}, {cfg.max_train_steps}]"
    return (f"log-normal Poisson (mean {cfg.mean_steps}, sigma {cfg.steps_sigma}) "
            f"in [{cfg.min_steps}, {cfg.max_train_steps}]")


def _cli_overrides(cfg: TrainConfig) -> str:
    """The command-line options that turn the named recipe into ``cfg`` (iterations only)."""
    recipe = RECIPES.get(cfg.name)
    if recipe is not None and recipe.iterations != cfg.iterations:
        return f" --iterations {cfg.iterations}"
    return ""


def _guessing_text(task: VarBindTask, cfg: TrainConfig) -> str:
    """Accuracy of a uniform guess among the prompt's chain digits, by hops (the level a model
    reaches without following any link)."""
    return ", ".join(f"{100 * task.guessing_accuracy(h, cfg.eval_n):.0f}% ({h} hops)" for h in cfg.eval_hops)


def _write_loss_files(log_path: Path, folder: Path) -> None:
    with open(log_path, newline="") as f:
        rows = list(csv.DictReader(f))
    its = [int(r["iteration"]) for r in rows]
    losses = [float(r["loss"]) for r in rows]
    smooth = ema(losses, 0.98)
    with open(folder / "loss_curve.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["iteration", "loss", "n_steps", "loss_ema"])
        for r, s in zip(rows, smooth):
            w.writerow([r["iteration"], r["loss"], r["n_steps"], f"{s:.5f}"])
    stride = max(1, len(its) // 400)  # keep the SVG small
    svg = svg_line_plot(
        {"loss (per batch)": (its[::stride], losses[::stride]), "loss (EMA 0.98)": (its[::stride], smooth[::stride])},
        title=f"training loss: {folder.name}", x_label="iteration", y_label="cross-entropy (answer token)", log_y=True,
    )
    (folder / "loss_curve.svg").write_text(svg)


# ---------------------------------------------------------------------------------- recipes
_TASK = dict(n_statements=8, max_extra=2, max_chain=4, test_fraction=0.1, encoding="statements")
_BASE_MODEL = dict(d_model=64, d_head=16, n_heads=4, d_mlp=128, normalization_type="RMS")
_TRAINING = dict(task=_TASK, train_hops=(1, 2, 3, 4), eval_hops=(1, 2, 3, 4, 5, 6, 7), queries=4,
                 iterations=10000, batch_size=32, lr=3e-3, warmup=0, min_lr_ratio=1.0)

RECIPES: dict[str, TrainConfig] = {
    "varbind-looped": TrainConfig(
        name="varbind-looped",
        description=(
            "A looped transformer (prelude / recurrent block / coda with additive input injection) "
            "trained on multi-hop variable binding (one token per statement) with the logits after "
            "every one of 8 recurrent steps supervised on the link reached at that step: one hop "
            "per step."
        ),
        model=dict(_BASE_MODEL, n_prelude_layers=1, n_core_layers=1, n_coda_layers=1, n_steps=8,
                   injection="add", state_init="zeros", norm_between_steps=True, loop_norm_weights="own"),
        step_distribution="fixed",
        min_steps=1,
        max_train_steps=8,
        step_supervision=True,
        **_TRAINING,  # type: ignore[arg-type]
    ),
    "varbind-baseline": TrainConfig(
        name="varbind-baseline",
        description=(
            "The feedforward baseline of tl-loop/varbind-looped: the same width and task, 8 distinct "
            "layers run once (the looped model's effective depth at 6 steps), trained on the same "
            "data, on the answer."
        ),
        model=dict(_BASE_MODEL, n_prelude_layers=1, n_core_layers=6, n_coda_layers=1, n_steps=1,
                   injection="none", state_init="prelude"),
        step_distribution="fixed",
        min_steps=1,
        max_train_steps=1,
        **_TRAINING,  # type: ignore[arg-type]
    ),
}
ALIASES = {"looped": "varbind-looped", "baseline": "varbind-baseline"}


def get_recipe(name: str) -> TrainConfig:
    key = ALIASES.get(name, name.removeprefix("tl-loop/"))
    if key not in RECIPES:
        raise KeyError(f"unknown recipe {name!r}; known: {sorted(RECIPES)} (aliases {sorted(ALIASES)})")
    return TrainConfig.from_dict(RECIPES[key].to_dict())


def run_recipe(name: str, out: str | Path | None = None, install: bool = False, resume: bool = True,
               progress: bool = True, force: bool = False, install_dir: str | Path | None = None,
               **overrides: Any) -> Path:
    """Train recipe ``name`` and write its model and report; ``install`` writes them into the
    package (``tl_loop/pretrained/<name>``, or ``install_dir/<name>``), where
    ``from_pretrained("tl-loop/<name>")`` finds them. An installed model is replaced only with
    ``force=True`` (checked before training starts), and only once the new folder is complete."""
    cfg = get_recipe(name)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    cfg.__post_init__()
    out = Path(out) if out is not None else Path("tl-loop-runs") / cfg.name
    export_to = None
    if install:
        from tl_loop.pretrained import PRETRAINED_DIR

        export_to = Path(install_dir or PRETRAINED_DIR) / cfg.name
        if export_to.exists() and not force:
            raise FileExistsError(
                f"{export_to} exists (the installed tl-loop/{cfg.name}); pass --force (force=True) to replace it"
            )
    result = train(cfg, out, resume=resume, progress=progress)
    return finish(result, cfg, export_to)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tl_loop.train", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("recipe", help="train one of the shipped models from scratch")
    r.add_argument("name", help=f"recipe: {', '.join(sorted(RECIPES))} (or {', '.join(sorted(ALIASES))})")
    r.add_argument("--out", default=None, help="run folder (default tl-loop-runs/<name>)")
    r.add_argument("--install", action="store_true", help="write the model and report into tl_loop/pretrained/<name>")
    r.add_argument("--force", action="store_true", help="with --install: replace the installed model")
    r.add_argument("--no-resume", action="store_true", help="start over even if the run folder has a checkpoint")
    r.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                   help="write a checkpoint every N iterations (default: the recipe's, 100)")
    r.add_argument("--threads", type=int, default=None, help="CPU threads (default: the recipe's, 2)")
    r.add_argument("--iterations", type=int, default=None, help="override the number of iterations")
    sub.add_parser("list", help="list the recipes")
    args = parser.parse_args(argv)
    if args.command == "list":
        for name, cfg in RECIPES.items():
            print(f"{name}: {cfg.description}")
        return 0
    overrides: dict[str, Any] = {}
    if args.threads is not None:
        overrides["threads"] = args.threads
    if args.iterations is not None:
        overrides["iterations"] = args.iterations
    if args.checkpoint_every is not None:
        overrides["checkpoint_every"] = args.checkpoint_every
    if args.force and not args.install:
        parser.error("--force only applies with --install")
    try:
        folder = run_recipe(args.name, out=args.out, install=args.install, resume=not args.no_resume,
                            force=args.force, **overrides)
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130
    except (ValueError, KeyError, OSError) as e:  # bad settings, a changed run, an existing install
        print(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        return 2
    print(f"model and report written to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
