"""Batched activation-patching sweeps against TransformerLens's sweeps and an nnsight sweep.

    python benchmarks/patching.py                     # every part (about 10 CPU-minutes; long on a busy machine)
    python benchmarks/patching.py --quick             # a smoke run
    python benchmarks/patching.py --markdown out.md   # also write the tables

Model: a random looped model with Huginn's layout (sandwich norms, linear adapter injection,
random initial state, norm after the loop; d_model 256, 8 heads x 32, d_mlp 768, vocab 2048;
2 prelude + 4 core x 5 steps + 2 coda = 24 effective layers), float32, CPU, one intra-op thread,
``torch.no_grad()``. Clean and corrupted prompts differ in one token: the middle one (as in
most patching experiments, the prompts share a prefix; patching inside it changes nothing, and
the batched sweep does not run those cells) and, with ``--differ-at first``, the first one (no
shared prefix: every cell runs).

1. **Ratios** (same run, interleaved: the sweeps being compared run in turn in each of
   ``--repeats`` rounds; a ratio is the median of per-round ratios of CPU times). Every effective
   layer is swept; at 64 and 256 tokens the positions are ``--positions`` evenly spread ones (the
   same cells, as an ``index_df``, for every contender: TransformerLens's
   ``generic_activation_patch``, tl-loop's ``generic_activation_patch_batched``, and nnsight with
   one trace per layer whose batch holds one copy of the prompt per position), so the ratio
   holds for the full sweep, whose every cell costs the same in TransformerLens. Head-output
   sweeps (``hook_z``, TransformerLens's ``layer_head_vector`` / ``layer_pos_head_vector`` setters,
   i.e. ``get_act_patch_attn_head_out_all_pos`` / ``_by_pos``) over every layer x ``--heads-swept`` heads (by
   position: at the same ``--positions`` evenly spread positions).
2. **Cost as the work grows**: the full batched ``resid_pre`` sweep (every layer x position) of
   a smaller model (d_model 64) against effective depth (8 -> 128 at 16 tokens) and prompt length
   (16 -> 256 at 8 layers), with the exponent of a least-squares fit of log time on log size.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TQDM_DISABLE", "1")

import pandas as pd  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transformer_lens import patching as tl  # noqa: E402

import tl_loop.patching as lp  # noqa: E402
from tl_loop import HookedLoopedTransformer, LoopedConfig  # noqa: E402

VOCAB = 2048


def model_for(d_model: int, n_steps: int, n_ctx: int = 512) -> HookedLoopedTransformer:
    cfg = LoopedConfig(
        d_model=d_model, d_head=32 if d_model >= 128 else 16, n_heads=d_model // (32 if d_model >= 128 else 16),
        d_mlp=3 * d_model, d_vocab=VOCAB, n_ctx=n_ctx, n_prelude_layers=2, n_core_layers=4, n_coda_layers=2,
        n_steps=n_steps, injection="linear", resid_norm=True, norm_after_loop=True, state_init="random",
    )
    return HookedLoopedTransformer(cfg, seed=0)


def prompts(n_pos: int, seed: int = 0, differ_at: str = "middle") -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, VOCAB, (1, n_pos), generator=gen)
    corrupted = clean.clone()
    at = n_pos // 2 if differ_at == "middle" else 0
    corrupted[0, at] = (clean[0, at] + 1) % VOCAB
    return clean, corrupted


def metric(logits: torch.Tensor) -> torch.Tensor:
    return logits[0, -1, 5] - logits[0, -1, 6]


def spread(n_pos: int, k: int) -> list[int]:
    """``k`` positions evenly spread over the prompt: a patch at position ``p`` costs the batched
    sweep about ``(n_pos - p) / n_pos`` of a full one, so these average like the full sweep."""
    return [int((i + 0.5) * n_pos / k) for i in range(k)]


def cpu_time(fn):
    start = time.process_time()
    out = fn()
    return time.process_time() - start, out


def interleaved(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Times per round (the first contender rotates) and each contender's last result."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    results = {}
    names = list(fns)
    for r in range(repeats):
        for k in names[r % len(names):] + names[: r % len(names)]:
            t, results[k] = cpu_time(fns[k])
            times[k].append(t)
    return times, results


def ratio(times: dict, a: str, b: str) -> float:
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def nnsight_resid_pre(model, corrupted, clean_cache, cells: pd.DataFrame) -> torch.Tensor:
    """One nnsight trace per layer: a batch of one copy per position, each patched at its position."""
    from nnsight import NNsight

    wrapped = NNsight(model)
    out = torch.zeros(len(cells))
    for layer, rows in cells.groupby("layer", sort=True):
        positions = rows["pos"].tolist()
        clean = clean_cache[f"blocks.{layer}.hook_resid_pre"]
        with wrapped.trace(corrupted.repeat(len(positions), 1)):
            for i, p in enumerate(positions):
                wrapped.blocks[int(layer)].input[i, p] = clean[0, p]
            logits = wrapped.output.save()
        for i, index in enumerate(rows.index):
            out[index] = metric(logits[i : i + 1])
    return out


def ratios(args) -> list[tuple[str, float, str]]:
    model = model_for(256, 5)
    rows = []
    try:
        import nnsight  # noqa: F401

        have_nnsight = True
    except ImportError:
        have_nnsight = False
    for n_pos, differ_at in [(n, d) for n in args.lengths for d in args.differ_at] if args.ratios else []:
        clean, corrupted = prompts(n_pos, differ_at=differ_at)
        where = f"{n_pos} tokens, differing at the {differ_at} token"
        _, cache = model.run_with_cache(clean)
        positions = spread(n_pos, args.positions)
        cells = pd.DataFrame([(layer, p) for layer in range(model.cfg.n_layers) for p in positions],
                             columns=["layer", "pos"])
        setter = tl.layer_pos_patch_setter
        fns = {
            "tl": lambda: tl.generic_activation_patch(model, corrupted, cache, metric, setter, "resid_pre", index_df=cells),
            "batched": lambda: lp.generic_activation_patch_batched(model, corrupted, cache, metric, setter, "resid_pre",
                                                                   index_df=cells, verbose=False),
        }
        if have_nnsight:
            fns["nnsight"] = lambda: nnsight_resid_pre(model, corrupted, cache, cells)
        with torch.no_grad():
            times, res = interleaved(fns, args.repeats)
        diff = float((res["tl"] - res["batched"]).abs().max())
        rows.append((f"resid_pre, {where} ({len(cells)} cells): TL / batched", ratio(times, "tl", "batched"),
                     f"TL {statistics.median(times['tl']):.1f} s, batched {statistics.median(times['batched']):.1f} s, "
                     f"max abs diff {diff:.1e}"))
        if have_nnsight:
            nn_diff = float((res["tl"] - res["nnsight"]).abs().max())
            rows.append((f"resid_pre, {where}: nnsight (one trace per layer) / batched",
                         ratio(times, "nnsight", "batched"),
                         f"nnsight {statistics.median(times['nnsight']):.1f} s, max abs diff to TL {nn_diff:.1e}"))
        if args.heads:
            heads = list(range(min(args.heads_swept, model.cfg.n_heads)))
            all_pos = pd.DataFrame([(layer, h) for layer in range(model.cfg.n_layers) for h in heads],
                                   columns=["layer", "head"])
            by_pos = pd.DataFrame([(layer, p, h) for layer in range(model.cfg.n_layers) for p in positions
                                   for h in heads], columns=["layer", "pos", "head"])
            head_fns = {}
            for kind, setter, df in (("all_pos", tl.layer_head_vector_patch_setter, all_pos),
                                     ("by_pos", tl.layer_pos_head_vector_patch_setter, by_pos)):
                head_fns[f"tl_{kind}"] = (lambda s=setter, d=df: tl.generic_activation_patch(
                    model, corrupted, cache, metric, s, "z", index_df=d))
                head_fns[f"batched_{kind}"] = (lambda s=setter, d=df: lp.generic_activation_patch_batched(
                    model, corrupted, cache, metric, s, "z", index_df=d, verbose=False))
            with torch.no_grad():
                times, res = interleaved(head_fns, args.repeats)
            for kind, df in (("all_pos", all_pos), ("by_pos", by_pos)):
                diff = float((res[f"tl_{kind}"] - res[f"batched_{kind}"]).abs().max())
                rows.append((f"attn_head_out_{kind}, {where} ({len(df)} cells): TL / batched",
                             ratio(times, f"tl_{kind}", f"batched_{kind}"),
                             f"TL {statistics.median(times[f'tl_{kind}']):.1f} s, batched "
                             f"{statistics.median(times[f'batched_{kind}']):.1f} s, max abs diff {diff:.1e}"))
    return rows


def fit(xs: list[int], ts: list[float]) -> float:
    lx, lt = [math.log(x) for x in xs], [math.log(t) for t in ts]
    mx, mt = statistics.mean(lx), statistics.mean(lt)
    return sum((a - mx) * (b - mt) for a, b in zip(lx, lt)) / sum((a - mx) ** 2 for a in lx)


def scaling(args) -> tuple[list[tuple[str, int, int, float]], float, float]:
    """Full batched resid_pre sweeps of a d_model 64 model: time against depth and length."""
    rows = []
    depth_t, depth_x, len_t, len_x = [], [], [], []
    for n_steps in args.depth_steps:  # 4 + 4 * n_steps effective layers
        model = model_for(64, n_steps)
        clean, corrupted = prompts(16)
        _, cache = model.run_with_cache(clean)
        with torch.no_grad():
            t, _ = cpu_time(lambda: lp.get_act_patch_resid_pre_batched(model, corrupted, cache, metric, verbose=False))
        rows.append(("depth", model.cfg.n_layers, 16, t))
        depth_x.append(model.cfg.n_layers)
        depth_t.append(t)
    model = model_for(64, 1)
    for n_pos in args.scaling_lengths:
        clean, corrupted = prompts(n_pos)
        _, cache = model.run_with_cache(clean)
        with torch.no_grad():
            t, _ = cpu_time(lambda: lp.get_act_patch_resid_pre_batched(model, corrupted, cache, metric, verbose=False))
        rows.append(("length", model.cfg.n_layers, n_pos, t))
        len_x.append(n_pos)
        len_t.append(t)
    return rows, fit(depth_x, depth_t), fit(len_x, len_t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--positions", type=int, default=2, help="random positions per layer in the ratio sweeps")
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--lengths", type=int, nargs="*", default=None, help="prompt lengths of the ratio sweeps")
    parser.add_argument("--no-heads", dest="heads", action="store_false", help="skip the head sweeps")
    parser.add_argument("--heads-swept", type=int, default=2, help="heads per layer in the head sweeps")
    parser.add_argument("--differ-at", nargs="+", choices=["middle", "first"], default=["middle"],
                        help="where clean and corrupted prompts differ (each given runs)")
    parser.add_argument("--no-scaling", dest="scaling", action="store_false", help="skip the cost table")
    parser.add_argument("--no-ratios", dest="ratios", action="store_false", help="only the cost table")
    args = parser.parse_args()
    if args.lengths is None:
        args.lengths = [16, 32] if args.quick else [64, 256]
    args.depth_steps = [1, 3] if args.quick else [1, 3, 7, 15, 31]
    args.scaling_lengths = [16, 32] if args.quick else [16, 32, 64, 128, 256]
    if args.quick:
        args.repeats, args.positions = 1, 1
    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, load average {load:.1f} before the run; "
        f"torch {torch.__version__}, one intra-op thread, CPU-time clock.",
        "",
        "| sweep | ratio | detail |",
        "|---|---|---|",
    ]
    for name, value, detail in ratios(args):
        lines.append(f"| {name} | {value:.2f}x | {detail} |")
        print(lines[-1], flush=True)
    if args.scaling:
        lines += scaling_table(args)
    lines.append(f"Load average {os.getloadavg()[0]:.1f} after the run.")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")


def scaling_table(args) -> list[str]:
    lines = []
    rows, depth_exp, len_exp = scaling(args)
    lines += ["", "| axis | effective layers | tokens | cells | batched sweep (s CPU) | per cell (ms) |",
              "|---|---|---|---|---|---|"]
    for axis, layers, n_pos, t in rows:
        lines.append(f"| {axis} | {layers} | {n_pos} | {layers * n_pos} | {t:.2f} | {1000 * t / (layers * n_pos):.2f} |")
        print(lines[-1], flush=True)
    lines += ["", f"Fitted exponents (time ~ size^k, full sweep of layers x positions): depth k = {depth_exp:.2f}, "
              f"prompt length k = {len_exp:.2f}.", ""]
    print(lines[-2], flush=True)
    return lines


if __name__ == "__main__":
    main()
