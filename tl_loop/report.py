"""One self-contained HTML report with the loop analyses of a model on a prompt.

>>> import torch, tempfile, os
>>> from tl_loop import HookedLoopedTransformer, LoopedConfig
>>> model = HookedLoopedTransformer(LoopedConfig(d_model=16, d_head=4, d_vocab=20, n_prelude_layers=1,
...                                              n_core_layers=2, n_coda_layers=1, n_steps=3), seed=0)
>>> path = os.path.join(tempfile.mkdtemp(), "report.html")
>>> _ = write_report(model, torch.tensor([[1, 2, 3, 4]]), path, n_steps=6, progress=False)
>>> "Stages of inference" in open(path).read()
True
"""

from __future__ import annotations

import html
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


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


def format_summary(summary: dict[str, Any]) -> str:
    lines = []
    for key, value in summary.items():
        if isinstance(value, list):
            prefix = {"per_block_hooks": "blocks.{i}.", "per_step_hooks": "loops.{r}."}.get(key, "")
            value = ", ".join(prefix + v for v in value) if value else "-"
        elif isinstance(value, int) and key == "parameters":
            value = f"{value:,}"
        lines.append(f"{key.replace('_', ' '):>16}: {value}")
    return "\n".join(lines)


def _prediction_table(model: Any, tokens: torch.Tensor, n_steps: int) -> str:
    logits = model.step_logits(tokens, n_steps=n_steps)[:, 0, -1]  # [step, d_vocab]
    probs = logits.float().softmax(-1)
    top_p, top_i = probs.max(-1)
    rows = []
    for r in range(logits.shape[0]):
        tok = int(top_i[r])
        shown = model.to_str_tokens(torch.tensor([tok]))[0] if model.tokenizer is not None else str(tok)
        rows.append(f"<tr><td>{r}</td><td><code>{html.escape(repr(shown))}</code></td><td>{float(top_p[r]):.3f}</td></tr>")
    return ("<table><tr><th>exit after step</th><th>top prediction (last position)</th><th>probability</th></tr>"
            + "".join(rows) + "</table>")


def write_report(
    model: Any,
    tokens: torch.Tensor,
    path: str | Path,
    n_steps: int | None = None,
    progress: bool = True,
    title: str | None = None,
) -> Path:
    """Run the analyses of ``tl_loop.analysis`` and write them, with figures, to one HTML file.

    The file embeds plotly.js once and needs no network to open.
    """
    from tqdm.auto import tqdm

    from tl_loop import analysis as A
    from tl_loop import plot as P

    n_steps = model.cfg.n_steps if n_steps is None else n_steps
    tokens = model._validate_tokens(tokens)
    sections: list[tuple[str, str, Callable[[], Any]]] = []
    state: dict[str, Any] = {}

    def cache() -> Any:
        if "cache" not in state:
            state["logits"], state["cache"] = model.run_with_cache(tokens, n_steps=n_steps)
        return state["cache"]

    sections = [
        ("Fixed-point convergence", "Relative distance of each layer of the cycle to its state one step earlier.",
         lambda: P.convergence_curves(A.step_distances(cache()), tol=1e-3)),
        ("Distance to the last step", "Relative distance of each layer's state to its state at the last step.",
         lambda: P.step_layer_heatmap(A.distance_to_final(cache()), "Distance to the last step",
                                      "relative distance")),
        ("Cycle or single point", "Distances between consecutive layers of the cycle against distances across steps.",
         lambda: P.cycle_distances_figure(A.cycle_distances(cache()))),
        ("Trajectory of the last token", "PCA (fitted on every step) of the last token's state after each layer of the cycle.",
         lambda: P.pca_trajectory_figure(A.pca_trajectory(A.token_trajectory(cache(), pos=-1), n_components=2))),
        ("Attention stabilisation", "Jensen-Shannon distance of each head's pattern to the previous step.",
         lambda: P.stabilisation_heatmap(A.attention_stabilisation(cache()))),
        ("Attention measures of the seed paper", "ColSum concentration, mixing score and sink rate per step.",
         lambda: P.paper_attention_figure(A.attention_stabilisation(cache()))),
        ("Stages of inference", "Logit-lens entropy, rank and probability of the final prediction, KL to the final distribution.",
         lambda: P.inference_stages_figure({f"{n_steps} steps": A.inference_stages(cache())})),
        ("Limiting behaviour", "Cosine similarity of the last layer's state to its final state over 4x the steps.",
         lambda: P.limiting_behaviour_figure(A.limiting_behaviour(model, tokens, n_steps=max(4 * n_steps, 8)))),
    ]
    summary = model_summary(model)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title or 'tl-loop report')}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px}</style></head><body>",
        f"<h1>{html.escape(title or 'tl-loop report: ' + str(summary['name']))}</h1>",
        f"<pre>{html.escape(format_summary(summary))}</pre>",
    ]
    prompt = model.to_string(tokens[0]) if model.tokenizer is not None else tokens[0].tolist()
    parts.append(f"<p>Prompt: <code>{html.escape(str(prompt))}</code>, {n_steps} steps.</p>")
    parts.append("<h2>Prediction after each step</h2>" + _prediction_table(model, tokens, n_steps))
    first_figure = True
    for name, text, build in tqdm(sections, desc="report", disable=not progress):
        fig = build()
        parts.append(f"<h2>{html.escape(name)}</h2><p>{html.escape(text)}</p>")
        parts.append(fig.to_html(full_html=False, include_plotlyjs="inline" if first_figure else False))
        first_figure = False
    parts.append("</body></html>")
    path = Path(path)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
