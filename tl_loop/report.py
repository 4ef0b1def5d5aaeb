"""One self-contained HTML report with the loop analyses of a model on a prompt.

The report opens with the model's layout and the input (for a model trained by tl-loop: the
task's problem, its correct answer, hop count and the positions of its mechanism), then one
section per analysis. Every section has a sentence on how to read its figure and a verdict
computed from the numbers drawn (converged or not and from which step, cycle or single point,
the step the attention heads settle, ...). A section that needs more recurrent steps than the run
has says so instead of drawing an empty figure, so every depth, 0 and 1 included, gives a report.
plotly.js is embedded once; the file needs no network to open.

>>> import torch, tempfile, os
>>> from tl_loop import HookedLoopedTransformer, LoopedConfig
>>> model = HookedLoopedTransformer(LoopedConfig(d_model=16, d_head=4, d_vocab=20, n_prelude_layers=1,
...                                              n_core_layers=2, n_coda_layers=1, n_steps=3), seed=0)
>>> path = os.path.join(tempfile.mkdtemp(), "report.html")
>>> _ = write_report(model, torch.tensor([[1, 2, 3, 4]]), path, n_steps=6, progress=False)
>>> page = open(path).read()
>>> "Stages of inference" in page and "Verdict" in page
True
"""

from __future__ import annotations

import html
import random
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

#: Tolerances the verdicts use (the figures draw the same lines).
CONVERGENCE_TOL = 1e-3  # relative step-to-step distance of the residual stream
CYCLE_TOL = 1e-2  # cycle_structure's tolerance
ATTENTION_TOL = 1e-3  # JS divergence of a head's pattern to the previous step
SINK_THRESHOLD = 0.3


# ---------------------------------------------------------------- model summary (also `tl-loop info`)
def model_summary(model: Any) -> dict[str, Any]:
    """Layout, parameter count, effective depth and a hook-name summary of a model."""
    cfg = model.cfg
    names = list(model.hook_dict)
    block_names = sorted({n.split(".", 2)[2] for n in names if n.startswith("blocks.")})
    loop_names = sorted({n.split(".", 2)[2] for n in names if n.startswith("loops.")})
    return {
        "name": cfg.model_name,
        "family": cfg.family,
        "layout": (
            f"prelude {cfg.n_prelude_layers} | "
            + (f"inner {cfg.n_inner_layers} x {cfg.inner_cycles} cycles + " if cfg.inner_cycles else "")
            + f"core {cfg.n_core_layers} x {cfg.n_steps} steps | coda {cfg.n_coda_layers}"
        ),
        "injection": cfg.injection,
        "state_init": cfg.state_init,
        "parameters": sum(p.numel() for p in model.parameters()),
        "d_model": cfg.d_model,
        "heads": f"{cfg.n_heads} ({cfg.n_key_value_heads} kv) x {cfg.d_head}",
        "d_vocab": cfg.d_vocab,
        "n_steps": cfg.n_steps,
        "effective_depth": cfg.n_layers,
        "hook_points": len(names),
        "per_block_hooks": block_names,
        "per_step_hooks": loop_names,
        "model_hooks": sorted(n for n in names if not n.startswith(("blocks.", "loops."))),
    }


_HOOK_PREFIX = {"per_block_hooks": "blocks.{i}.", "per_step_hooks": "loops.{r}."}


def _summary_value(key: str, value: Any) -> Any:
    if isinstance(value, list):
        return [_HOOK_PREFIX.get(key, "") + v for v in value]
    if key == "parameters":
        return f"{value:,}"
    return value


def format_summary(summary: dict[str, Any], width: int = 100) -> str:
    """The summary as aligned ``key: value`` lines; hook lists wrapped to ``width`` columns."""
    lines = []
    indent = " " * 18
    for key, value in summary.items():
        value = _summary_value(key, value)
        if isinstance(value, list):
            value = textwrap.fill(", ".join(value) or "-", width, initial_indent=indent,
                                  subsequent_indent=indent, break_on_hyphens=False)[len(indent):]
        lines.append(f"{key.replace('_', ' '):>16}: {value}")
    return "\n".join(lines)


def _summary_table(summary: dict[str, Any]) -> str:
    rows = []
    for key, value in summary.items():
        value = _summary_value(key, value)
        if isinstance(value, list):
            cell = " ".join(f"<code>{html.escape(v)}</code>" for v in value) or "-"
            cell = f"<div class='hooks'>{cell}</div>"
        else:
            cell = html.escape(str(value))
        rows.append(f"<tr><th>{html.escape(key.replace('_', ' '))}</th><td>{cell}</td></tr>")
    return "<table class='summary'>" + "".join(rows) + "</table>"


# ---------------------------------------------------------------- what the report is computed from
@dataclass
class ReportInput:
    """The model, the tokens, the depth and (for a task model) the problem the tokens encode."""

    model: Any
    tokens: torch.Tensor
    n_steps: int
    problem: Any = None
    _store: dict[str, Any] = field(default_factory=dict)

    def cached(self, key: str, compute: Callable[[], Any]) -> Any:
        if key not in self._store:
            self._store[key] = compute()
        return self._store[key]

    @property
    def cache(self) -> Any:  # write_report runs every section inside model.steps(n_steps)
        return self.cached("cache", lambda: self.model.run_with_cache(self.tokens)[1])

    @property
    def layers_per_step(self) -> int:
        return self.model.cfg.n_core_layers

    def str_tokens(self) -> list[str]:
        if self.model.tokenizer is None:
            return [str(t) for t in self.tokens[0].tolist()]
        return [str(t) for t in self.model.to_str_tokens(self.tokens[0])]

    def decode(self, token: int) -> str:
        return self.model.to_string(torch.tensor([token])) if self.model.tokenizer is not None else str(token)


class Skip(Exception):
    """Raised by a section that cannot be drawn for this run; the message says why."""


@dataclass(frozen=True)
class Section:
    """One analysis: ``build`` returns ``(figure or None, verdict)``; skipped with a note when the
    run has fewer than ``min_steps`` recurrent steps."""

    title: str
    how_to_read: str
    build: Callable[[ReportInput], tuple[Any, str]]
    min_steps: int = 0
    why_min_steps: str = ""


# ---------------------------------------------------------------- sections
def _convergence(r: ReportInput) -> tuple[Any, str]:
    from tl_loop import analysis as A
    from tl_loop import plot as P

    d = A.step_distances(r.cache)  # [steps - 1, layer]; row k compares step k + 1 with step k
    settled = A.convergence_step(d, CONVERGENCE_TOL)
    parts = []
    for j, k in enumerate(settled.tolist()):
        who = f"layer {j} of the cycle" if d.shape[1] > 1 else "the recurrent state"
        if k < 0:
            parts.append(f"{who} has <b>not converged</b>: it still moves by {float(d[-1, j]):.2g} at the last step "
                         f"(tolerance {CONVERGENCE_TOL:g})")
        else:
            parts.append(f"{who} has <b>converged</b>: it moves by at most {CONVERGENCE_TOL:g} per step from "
                         f"step {k + 1} on")
    fig = P.convergence_curves(d, tol=CONVERGENCE_TOL)
    return fig, "; ".join(parts) + f" (run of {r.n_steps} steps)."


def _distance_to_last(r: ReportInput) -> tuple[Any, str]:
    from tl_loop import analysis as A
    from tl_loop import plot as P

    d = A.distance_to_final(r.cache)  # [steps, layer]
    within = A.convergence_step(d, 0.05)
    first = int(within.max())
    fig = P.step_layer_heatmap(d, "Distance of each layer's state to its state at the last step",
                               "relative distance to the last step")
    return fig, (f"every layer of the cycle stays within 5% of its last-step state from step {first} on "
                 f"(of steps 0-{r.n_steps - 1}); at step 0 the largest distance is {float(d[0].max()):.2g}.")


def _cycle(r: ReportInput) -> tuple[Any, str]:
    from tl_loop import analysis as A
    from tl_loop import plot as P

    d = A.cycle_distances(r.cache)
    kind = A.cycle_structure(r.cache, tol=CYCLE_TOL)
    fig = P.cycle_distances_figure(d)
    last = float(d.across_steps[-1].max())
    if kind == "not_converged":
        verdict = (f"<b>not converged</b>: some layer still moves by {last:.2g} between the last two steps "
                   f"(tolerance {CYCLE_TOL:g}), so neither a cycle nor a single point yet.")
    elif r.layers_per_step == 1:
        verdict = ("<b>single point</b>: the one-layer block has converged (last step-to-step distance "
                   f"{last:.2g} &le; {CYCLE_TOL:g}); a cycle of distinct points needs two layers or more.")
    elif kind == "cycle":
        gap = float(d.between_layers[-1].max())
        verdict = (f"<b>cycle</b> of {r.layers_per_step} distinct fixed points: the layers stop moving across steps "
                   f"(&le; {CYCLE_TOL:g}) while consecutive layers stay up to {gap:.2g} apart.")
    else:
        verdict = (f"<b>single point</b>: the layers stop moving across steps and coincide with each other "
                   f"(all distances &le; {CYCLE_TOL:g}).")
    return fig, verdict


def _trajectory(r: ReportInput) -> tuple[Any, str]:
    from tl_loop import analysis as A
    from tl_loop import plot as P

    traj = A.token_trajectory(r.cache, pos=-1)  # [steps, layer, d_model]
    if traj.shape[0] * traj.shape[1] < 3:
        raise Skip(f"this run has {traj.shape[0] * traj.shape[1]} loop states, and a 2-D projection needs three or more")
    proj = A.pca_trajectory(traj, n_components=2)
    fig = P.pca_trajectory_figure(proj, title="Trajectory of the last token through the loop (PCA)")
    share = float(proj.explained_variance_ratio.sum())
    verdict = f"the two components shown explain {share:.0%} of the variance of the trajectory"
    if r.n_steps >= 2:
        period = int(A.detect_period(traj[:, -1], tol=CYCLE_TOL))
        verdict += {0: f"; the last layer's state finds no period within {r.n_steps} steps (still moving)",
                    1: "; the last layer's state settles on a <b>fixed point</b>"}.get(
            period, f"; the last layer's state <b>alternates with period {period}</b>")
    return fig, verdict + "."


def _attention(r: ReportInput) -> tuple[Any, str]:
    from tl_loop import analysis as A
    from tl_loop import plot as P

    stats = r.cached("attention", lambda: A.attention_stabilisation(r.cache))
    stable = stats.stable_step(ATTENTION_TOL)  # [layer, head]; row k of distance compares k + 1 with k
    n = stable.numel()
    settled = stable[stable >= 0]
    verdict = f"{settled.numel()} of {n} heads settle (JS divergence &le; {ATTENTION_TOL:g} per step)"
    if settled.numel():
        verdict += f", the last of them from step {int(settled.max()) + 1} on"
    if settled.numel() < n:
        still = (stats.distance[-1] > ATTENTION_TOL).nonzero().tolist()
        labels = ", ".join(f"L{j}H{h}" for j, h in still[:8]) + (" ..." if len(still) > 8 else "")
        verdict += f"; still changing at the last step: {labels}"
    return P.stabilisation_heatmap(stats), verdict + "."


def _paper_attention(r: ReportInput) -> tuple[Any, str]:
    from tl_loop import analysis as A
    from tl_loop import plot as P

    stats = r.cached("attention", lambda: A.attention_stabilisation(r.cache))
    rate = stats.sink_rate(SINK_THRESHOLD)
    mixing = stats.entropy.mean((1, 2))
    colsum = stats.colsum.mean((1, 2))
    verdict = (f"sink rate {float(rate[0]):.2f} at step 0 and {float(rate[-1]):.2f} at the last step "
               f"(fraction of heads with sink score &gt; {SINK_THRESHOLD:g}); mean mixing score "
               f"{float(mixing[0]):.2f} &rarr; {float(mixing[-1]):.2f} nats; mean ColSum concentration "
               f"{float(colsum[0]):.2f} &rarr; {float(colsum[-1]):.2f}.")
    return P.paper_attention_figure(stats, threshold=SINK_THRESHOLD), verdict


def _stages(r: ReportInput) -> tuple[Any, str]:
    from tl_loop import analysis as A
    from tl_loop import plot as P

    if r.model.cfg.n_layers == 0:
        raise Skip(f"at {r.n_steps} steps this model runs no layer at all (no prelude or coda)")
    stages = A.inference_stages(r.cache)
    top = (stages.rank <= 1).tolist()
    # first effective layer from which the final prediction stays the logit lens's top-1
    first = next(i for i in range(len(top)) if all(top[i:]))
    fig = P.inference_stages_figure({f"{r.n_steps} steps": stages}, x="layer")
    return fig, (f"the final prediction becomes the logit lens's top-1 at effective layer {first} "
                 f"({stages.labels[first]}) of {stages.n_layers} and stays so; the entropy there is "
                 f"{float(stages.entropy[first]):.2f} nats (last layer: {float(stages.entropy[-1]):.2f}).")


def _limiting(r: ReportInput) -> tuple[Any, str]:
    from tl_loop import analysis as A
    from tl_loop import plot as P

    steps = max(4 * r.n_steps, 8)
    result = A.limiting_behaviour(r.model, r.tokens, n_steps=steps)
    shares = ", ".join(f"{100 * v:.0f}% {k.replace('_', ' ')}" for k, v in result.fractions().items() if v > 0)
    fig = P.limiting_behaviour_figure(result, title=f"Limiting behaviour over {steps} steps: cosine to the final state")
    return fig, f"over {steps} steps the tokens are {shares} (tau = {result.tau:g}, rho = {result.rho:g})."


# ---------------------------------------------------------------- patching (needs a clean / corrupted pair)
@dataclass(frozen=True)
class PatchingSetup:
    corrupted_tokens: torch.Tensor
    metric: Callable[[torch.Tensor], torch.Tensor]
    clean_diff: float
    corrupted_diff: float
    description: str


def _patching_setup(r: ReportInput) -> PatchingSetup:
    """The task's ``corrupt_root`` pair: the queried chain's digit changed, so the answer changes.
    Metric: logit difference (clean answer - corrupted answer) at the answer slot, 0 = corrupted
    run, 1 = clean run."""
    from tl_loop.pretrained import task_for
    from tl_loop.tasks import corrupt_root

    task = task_for(r.model)
    corrupted = corrupt_root(r.problem, random.Random(0))
    corrupted_tokens, corrupted_answer = task.encode([corrupted])
    _, clean_answer = task.encode([r.problem])
    good, bad = int(clean_answer[0]), int(corrupted_answer[0])

    def diff(logits: torch.Tensor) -> torch.Tensor:
        return logits[0, -1, good] - logits[0, -1, bad]

    clean = float(diff(r.model(r.tokens)))
    corr = float(diff(r.model(corrupted_tokens)))
    scale = clean - corr if abs(clean - corr) > 1e-6 else 1.0

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return (diff(logits) - corr) / scale

    pos = r.problem.mechanism.value_pos
    return PatchingSetup(corrupted_tokens, metric, clean, corr,
                         f"corrupted prompt <code>{html.escape(corrupted.prompt)}</code> (the root digit at position "
                         f"{pos} changed from {html.escape(r.problem.answer)} to {html.escape(corrupted.answer)}); "
                         f"logit difference {html.escape(r.problem.answer)} &minus; {html.escape(corrupted.answer)}: "
                         f"clean run {clean:.2f}, corrupted run {corr:.2f}; 0 = corrupted run, 1 = clean run")


def _position_labels(r: ReportInput) -> list[str]:
    mech = r.problem.mechanism if r.problem is not None else None
    marked = set(mech.relevant_positions) if mech is not None else set()
    return [f"{p}:{t}{' *' if p in marked else ''}" for p, t in enumerate(r.str_tokens())]


def _patch_resid(r: ReportInput) -> tuple[Any, str]:
    from tl_loop import plot as P
    from tl_loop.patching import get_act_patch_resid_pre_batched

    setup = r.cached("patching", lambda: _patching_setup(r))
    values = get_act_patch_resid_pre_batched(r.model, setup.corrupted_tokens, r.cache, setup.metric)
    labels = [layer.label for layer in r.model.schedule]
    fig = P.patching_heatmap(values, _position_labels(r), labels,
                             "Patching resid_pre over the effective depth: fraction of the logit difference restored",
                             y_title="effective layer (resid_pre)")
    mech = r.problem.mechanism
    row = values[:, mech.answer_pos]
    first = next((i for i in range(values.shape[0]) if float(row[i]) >= 0.5), None)
    on_mech = values[:, list(mech.relevant_positions)].abs().sum() / values.abs().sum().clamp_min(1e-12)
    best = divmod(int(values.abs().argmax()), values.shape[1])
    verdict = (f"{setup.description}. {float(on_mech):.0%} of the total |restoration| sits on the mechanism's "
               f"{len(mech.relevant_positions)} positions (of {values.shape[1]}); the largest cell is "
               f"{float(values[best]):+.2f} at {labels[best[0]]}, position {best[1]} ({mech.role(best[1])}); "
               + ("patching the answer slot alone restores half or more from "
                  f"{labels[first]} on" if first is not None and all(float(x) >= 0.5 for x in row[first:])
                  else "patching the answer slot alone never restores half of the difference at every later layer")
               + ".")
    return fig, verdict


def _patch_state(r: ReportInput) -> tuple[Any, str]:
    from tl_loop import plot as P
    from tl_loop.patching import get_act_patch_state

    setup = r.cached("patching", lambda: _patching_setup(r))
    values = get_act_patch_state(r.model, setup.corrupted_tokens, r.cache, setup.metric)
    fig = P.patching_heatmap(values, _position_labels(r), [f"state into step {s}" for s in range(values.shape[0])],
                             "Patching the recurrent state (loops.{r}.hook_state_in), one step and position per run",
                             y_title="")
    mech = r.problem.mechanism
    per_step = [(s, int(values[s].abs().argmax())) for s in range(values.shape[0])]
    shown = "; ".join(f"step {s}: {float(values[s, p]):+.2f} at {p} ({mech.role(p)})" for s, p in per_step[:8])
    return fig, f"largest restoration per step: {shown}{' ...' if len(per_step) > 8 else ''}."


SECTIONS: list[Section] = [
    Section("Fixed-point convergence",
            "One line per layer of the recurrent block: how far its output moves from one step to the next "
            "(relative distance, log scale); a line that falls below the dashed tolerance has reached a fixed point.",
            _convergence, 2, "comparing consecutive steps needs two"),
    Section("Distance to the last step",
            "Each cell is how far a layer's state at a step is from the same layer's state at the last step; "
            "dark columns to the right mean the state has stopped changing.",
            _distance_to_last, 1, "there is no loop state to compare"),
    Section("Cycle or single point",
            "Dashed lines: a layer against itself one step earlier; solid lines: consecutive layers within a step. "
            "Dashed lines falling while solid ones stay up is a cycle of distinct fixed points; both falling is one point.",
            _cycle, 2, "comparing consecutive steps needs two"),
    Section("Trajectory of the last token",
            "The last token's state after every layer of the cycle and step, projected on the two principal "
            "components of the whole trajectory; the grey line follows execution order, points piling up mean "
            "the state has stopped moving.",
            _trajectory, 1, "there is no loop state to project"),
    Section("Attention stabilisation",
            "One row per head (L = layer of the cycle, H = head), one column per step: the JS divergence of the "
            "head's attention pattern to its pattern one step earlier; dark means the head attends as before.",
            _attention, 2, "comparing consecutive steps needs two"),
    Section("Attention measures of the seed paper",
            "Per step: how concentrated attention is on a few keys (ColSum), how spread each query's attention is "
            "(mixing score, entropy in nats) and the fraction of heads that mostly attend to the first token (sink rate).",
            _paper_attention, 1, "there are no attention patterns inside the loop"),
    Section("Stages of inference",
            "The logit lens at every effective layer (the residual stream read out through the final norm and "
            "unembedding): entropy, rank and probability of the final prediction, KL to the final distribution, "
            "and how much the residual stream still turns and grows.",
            _stages),
    Section("Limiting behaviour",
            "Each line is one token's cosine similarity to its own final state, run for four times the steps: "
            "fixed points climb to 1 and stay, orbits keep oscillating, sliders drift slowly.",
            _limiting),
]

PATCHING_SECTIONS: list[Section] = [
    Section("Patching the residual stream over the effective depth",
            "Each cell runs the corrupted prompt with the clean residual stream restored at one effective layer and "
            "one position (TransformerLens's resid_pre sweep, batched); 1 means the clean answer is fully restored. "
            "Positions marked * are on the mechanism.",
            _patch_resid),
    Section("Patching the recurrent state",
            "Each cell restores the clean recurrent state entering one step at one position; a large value "
            "means that step's state at that position carries the answer into the rest of the loop.",
            _patch_state, 1, "there is no recurrent state to patch"),
]


# ---------------------------------------------------------------- generation (model.generate, adaptive exit)
GENERATION_TOKENS = 8  # greedy tokens decoded for the section (fewer where the context ends sooner)
ARGMAX_STABLE_CHECKS = 2  # exits.argmax_stability(k) for models without an exit gate


def _generation(r: ReportInput) -> tuple[Any, str]:
    from tl_loop import exits
    from tl_loop import plot as P
    from tl_loop.errors import UnsupportedError

    cfg = r.model.cfg
    room = min(GENERATION_TOKENS, cfg.n_ctx - r.tokens.shape[1])
    if room < 1:
        raise Skip(f"the {r.tokens.shape[1]} prompt tokens fill the context (n_ctx={cfg.n_ctx}), so no token can follow")
    # exit=None keeps an exit-gate model's own rule (its gate at the configured threshold)
    rule = None if cfg.exit_gate else exits.argmax_stability(ARGMAX_STABLE_CHECKS)
    try:
        out = r.model.generate(r.tokens, max_new_tokens=room, do_sample=False, stop_at_eos=False, verbose=False,
                               exit=rule, return_details=True)
    except UnsupportedError as err:
        raise Skip(f"this model cannot decode here ({err})") from err
    steps = out.steps_used[0]
    steps = steps[steps > 0]  # tokens after an EOS stop have no steps
    new = out.new_tokens[0, : steps.numel()]
    text = r.model.to_string(new) if r.model.tokenizer is not None else " ".join(str(t) for t in new.tolist())
    fig = P.generation_steps_figure(out, r.model)
    rule_text = "every step (no exit rule)" if out.exit is None else repr(out.exit)
    return fig, (f"{steps.numel()} greedy tokens <code>{html.escape(repr(text))}</code> used between "
                 f"{int(steps.min())} and {int(steps.max())} of {out.n_steps} steps; mean {float(steps.float().mean()):.1f} "
                 f"(exit: <code>{html.escape(rule_text)}</code>).")


GENERATION_SECTIONS: list[Section] = [
    Section("Generation",
            "A few tokens decoded greedily after the prompt (model.generate) with an adaptive exit: the model's exit "
            f"gate where it has one, else leaving the loop once the top prediction has not changed for "
            f"{ARGMAX_STABLE_CHECKS} steps in a row. Top: the generated text coloured by the steps each token used; "
            "bottom: the steps per token.",
            _generation, 1, "an adaptive exit needs at least one step"),
]


# ---------------------------------------------------------------- header
def _prediction_table(r: ReportInput) -> tuple[str, str]:
    """Top prediction after every step (``step_logits``), and a verdict."""
    logits = r.model.step_logits(r.tokens)[:, 0, -1]  # [step, d_vocab]
    probs = logits.float().softmax(-1)
    top_p, top_i = probs.max(-1)
    answer = None if r.problem is None else r.problem.answer
    rows = []
    for s in range(logits.shape[0]):
        shown = r.decode(int(top_i[s]))
        ok = "" if answer is None else (" &#10003;" if shown == answer else "")
        rows.append(f"<tr><td>{s}</td><td><code>{html.escape(repr(shown))}</code>{ok}</td>"
                    f"<td>{float(top_p[s]):.3f}</td></tr>")
    table = ("<table><tr><th>exit after step</th><th>top prediction (last position)</th><th>probability</th></tr>"
             + "".join(rows) + "</table>")
    preds = [r.decode(int(t)) for t in top_i]
    final = preds[-1]
    stable_from = next(s for s in range(len(preds)) if all(p == final for p in preds[s:]))
    verdict = f"the prediction is <code>{html.escape(repr(final))}</code> from step {stable_from} on"
    if answer is not None:
        correct = [s for s, p in enumerate(preds) if p == answer]
        verdict += (f"; the correct answer {html.escape(answer)} is first the top prediction after step {correct[0]} "
                    f"({correct[0] + 1} steps run, for a {r.problem.hops}-hop problem)" if correct
                    else f"; the correct answer {html.escape(answer)} is never the top prediction")
    return table, verdict + "."


def _problem_block(r: ReportInput) -> str:
    p = r.problem
    mech = p.mechanism
    toks = r.str_tokens()
    rows = "".join(f"<tr><td>{i}</td><td><code>{html.escape(t)}</code></td><td>{html.escape(mech.role(i))}</td></tr>"
                   for i, t in enumerate(toks) if mech.role(i) not in ("other", "distractor"))
    chain = " &rarr; ".join([html.escape(p.query), *(html.escape(x) for x in p.links())])
    return (f"<h2 id='task'>The task</h2><p>Multi-hop variable binding: the prompt assigns variables, "
            f"<code>?{html.escape(p.query)}</code> asks for the digit reached by following the links from "
            f"<code>{html.escape(p.query)}</code>. Prompt <code>{html.escape(p.prompt)}</code>; correct answer "
            f"<b>{html.escape(p.answer)}</b>, <b>{p.hops} hops</b> ({chain}). A model that answers one hop per step "
            f"needs {p.hops} steps. The mechanism's positions (<code>problem.mechanism</code>; marked * in the "
            f"patching figures):</p><table><tr><th>position</th><th>token</th><th>role</th></tr>{rows}</table>")


READING_GUIDE = (
    "<h2 id='guide'>How to read this report</h2><p>A looped model runs one block of layers (the <i>cycle</i>) "
    "several times; each run is a <i>step</i>. tl-loop unrolls the loop, so every executed block is an "
    "<i>effective layer</i> with its own hook points. The sections below ask: does the state stop moving "
    "(a fixed point), does the block settle into one point or a cycle of points, when do the attention heads "
    "stop changing, at which depth the prediction is formed, and which positions and steps carry the answer "
    "(patching) and how many steps each generated token uses when the model may leave the loop early. Each "
    "figure has a sentence on how to read it and a verdict computed from its numbers; hover over a figure for "
    "exact values.</p>"
)

STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:auto;padding:1em;line-height:1.45;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left;vertical-align:top}
table.summary th{white-space:nowrap;font-weight:600}
.hooks{white-space:normal;overflow-wrap:anywhere}.hooks code{display:inline-block;margin:0 .5em .1em 0}
.how{color:#444;font-style:italic}.verdict{background:#f3f7ff;border-left:4px solid #4c78a8;padding:.4em .7em}
.skipped{color:#666}.warning{background:#fff4e5;border-left:4px solid #e6a23c;padding:.4em .7em}
nav ul{columns:2}
"""


def _slug(title: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in title.lower()).strip("-")


def _report_parts(r: ReportInput, title: str | None, progress: bool) -> list[str]:
    from plotly.offline import get_plotlyjs
    from tqdm.auto import tqdm

    model, tokens, n_steps, problem = r.model, r.tokens, r.n_steps, r.problem
    summary = model_summary(model)
    heading = title or f"tl-loop report: {summary['name']}"
    sections = SECTIONS + (PATCHING_SECTIONS if problem is not None else []) + GENERATION_SECTIONS
    toc = [("guide", "How to read this report"), ("model", "Model")]
    toc += [("task", "The task")] if problem is not None else []
    toc += [("input", "Input"), ("prediction", "Prediction after each step")] + [(_slug(s.title), s.title) for s in sections]
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{html.escape(heading)}</title><style>{STYLE}</style>",
        f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body>",
        f"<h1>{html.escape(heading)}</h1>",
        "<nav><ul>" + "".join(f"<li><a href='#{a}'>{html.escape(t)}</a></li>" for a, t in toc) + "</ul></nav>",
        READING_GUIDE,
        "<h2 id='model'>Model</h2>" + _summary_table(summary),
    ]
    if problem is not None:
        parts.append(_problem_block(r))
    shown = r.str_tokens()
    parts.append(f"<h2 id='input'>Input</h2><p>{tokens.shape[1]} tokens, {n_steps} recurrent steps "
                 f"(effective depth {summary['effective_depth']}): "
                 + " ".join(f"<code>{html.escape(t)}</code>" for t in shown) + "</p>")
    unk = getattr(model.tokenizer, "unk_token_id", None) if model.tokenizer is not None else None
    n_unk = int((tokens == unk).sum()) if unk is not None else 0
    if n_unk:
        parts.append(f"<p class='warning'>{n_unk} of {tokens.shape[1]} tokens are the tokenizer's unknown token: "
                     "the model cannot read those characters.</p>")
    if n_steps >= 1:
        table, verdict = _prediction_table(r)
        parts.append("<h2 id='prediction'>Prediction after each step</h2><p class='how'>What the model would answer "
                     "if it left the loop after each step (<code>model.step_logits</code>).</p>" + table
                     + f"<p class='verdict'><b>Verdict:</b> {verdict}</p>")
    else:
        final = r.decode(int(model(tokens)[0, -1].argmax()))
        parts.append("<h2 id='prediction'>Prediction after each step</h2><p class='skipped'>The run has 0 steps "
                     f"(the loop is skipped); the prediction is <code>{html.escape(repr(final))}</code>.</p>")
    for section in tqdm(sections, desc="report", disable=not progress):
        slug = _slug(section.title)
        parts.append(f"<section id='{slug}'><h2>{html.escape(section.title)}</h2>"
                     f"<p class='how'>{html.escape(section.how_to_read)}</p>")
        if n_steps < section.min_steps:
            parts.append(f"<p class='skipped'>Not shown: this run has {n_steps} recurrent "
                         f"step{'s' if n_steps != 1 else ''}, and {section.why_min_steps}.</p></section>")
            continue
        try:
            fig, verdict = section.build(r)
        except Skip as reason:
            parts.append(f"<p class='skipped'>Not shown: {html.escape(str(reason))}.</p></section>")
            continue
        fig.update_layout(height=fig.layout.height or 460)
        parts.append(f"<div class='figure' data-figure='{slug}'>"
                     + fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig-{slug}")
                     + f"</div><p class='verdict'><b>Verdict:</b> {verdict}</p></section>")
    return parts


def write_report(
    model: Any,
    tokens: torch.Tensor,
    path: str | Path,
    n_steps: int | None = None,
    progress: bool = True,
    title: str | None = None,
    problem: Any = None,
    force: bool = False,
) -> Path:
    """Run the analyses of ``tl_loop.analysis`` and write them, with figures, verdicts and a
    reading guide, to one HTML file.

    ``problem`` is the task problem ``tokens`` encode (a ``tl_loop.tasks.Problem``, for models
    trained by tl-loop): the report then states the correct answer, its hop count and the
    mechanism's positions, and adds the patching sections (clean vs ``corrupt_root``).
    ``force`` allows ``n_steps`` above ``cfg.max_steps``. The file embeds plotly.js once and
    needs no network to open.
    """
    n_steps = model.check_n_steps(model.cfg.n_steps if n_steps is None else n_steps, force)
    tokens = model._validate_tokens(tokens)
    with torch.inference_mode(), model.steps(n_steps, force):  # every section runs at this depth
        parts = _report_parts(ReportInput(model, tokens, n_steps, problem), title, progress)
    parts.append("</body></html>")
    path = Path(path)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
