"""tl-loop performance benchmark: every ratio of issue 6 in one run.

    python benchmarks/run.py                  # full run (about 10 minutes on 2 busy CPU cores)
    python benchmarks/run.py --quick          # fewer repeats, shorter sequences (a smoke run)
    python benchmarks/run.py --json out.json  # also write every number to a file

Two mid-size random models are built offline, on CPU, in float32:

* **HRM-Text**: a random ``transformers.HrmTextForCausalLM`` (d_model 512, 8 heads x 64, d_mlp
  1536, 2 layers per stack, H_cycles 3, L_cycles 3: 24 effective layers), saved with
  ``save_pretrained`` and loaded by ``HookedLoopedTransformer.from_pretrained`` (identical weights);
  the reference runs with ``attn_implementation="sdpa"`` and ``use_cache=False``.
* **Huginn layout**: a random raven checkpoint in Huginn's format (sandwich blocks, linear adapter,
  random initial state, interleaved RoPE, q/k bias, tied head; d_model 512, 2 prelude + 4 core + 2
  coda layers, 8 steps: 36 effective layers), built from a Huginn ``config.json`` by the ``huginn``
  family, saved with ``save_pretrained`` and loaded back with ``from_pretrained``.

What is measured (times are medians of ``--repeats`` rounds; the calls being compared run in turn
inside each round, and a ratio is the median of the per-round ratios, so slow phases of a busy
machine hit both sides):

1. forward with no hooks vs ``HrmTextForCausalLM`` on identical weights (and the logits' deviation);
2. ``run_with_cache`` (every hook; ``names_filter`` = resid_post only) vs the same model's forward
   with no hooks, and vs ``TransformerBridge.run_with_cache`` on the same HRM-Text weights (booted
   offline from the in-memory HF model, ``hf_model=``, with a word-level tokenizer saved to a
   temporary folder);
3. peak memory (growth of the peak resident set over the resident set before the call, each in a
   fresh subprocess) of a forward pass, of ``run_with_cache`` + ``analysis.residual_stats`` and of
   the streamed fixed-point metrics ``analysis.run_streaming(model, tokens, ResidualStats())``
   (same numbers checked);
4. an activation-patching sweep of ``resid_pre`` over every effective layer x position:
   ``transformer_lens.patching.get_act_patch_resid_pre`` vs
   ``tl_loop.patching.get_act_patch_resid_pre_batched`` (largest difference reported);
5. the cost of hook points with nothing attached: the same model with every ``HookPoint``
   replaced by a plain identity function (``stripped``), at the timing shape and at the sweep's
   short shape (where per-call overhead weighs most).

All runs are under ``torch.no_grad()``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # TransformerLens's patching sweep draws a progress bar

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from transformer_lens.hook_points import HookPoint  # noqa: E402

from tl_loop import HookedLoopedTransformer  # noqa: E402

VOCAB = 2048
TARGETS = {  # issue 6: "optimise until"
    "hrm.forward_vs_reference": ("<=", 1.10),
    "hrm.cache_all_vs_forward": ("<=", 1.5),
    "huginn.cache_all_vs_forward": ("<=", 1.5),
    "hrm.sweep_speedup": (">=", 3.0),
    "huginn.sweep_speedup": (">=", 3.0),
}


# ------------------------------------------------------------------------------------ models
def hrm_config(**overrides: Any) -> Any:
    import transformers

    kwargs = dict(vocab_size=VOCAB, hidden_size=512, intermediate_size=1536, num_hidden_layers=2,
                  num_attention_heads=8, head_dim=64, H_cycles=3, L_cycles=3, max_position_embeddings=1024,
                  initializer_range=0.02, rms_norm_eps=1e-6, attn_implementation="sdpa")
    kwargs.update(overrides)
    config = transformers.HrmTextConfig(**kwargs)
    config.architectures = ["HrmTextForCausalLM"]  # TransformerBridge picks its adapter from this
    return config


def build_hrm(folder: str) -> None:
    """A random HRM-Text checkpoint in ``folder`` (non-zero ``z_L_init``)."""
    import transformers

    with torch.random.fork_rng():
        torch.manual_seed(0)
        hf = transformers.HrmTextForCausalLM(hrm_config()).eval()
        with torch.no_grad():
            hf.model.z_L_init.normal_()
    hf.save_pretrained(folder)


def load_hf(folder: str, attn: str = "sdpa") -> Any:
    import transformers

    return transformers.HrmTextForCausalLM.from_pretrained(folder, attn_implementation=attn).eval()


HUGINN_CONFIG = {
    "model_type": "huginn_raven", "architectures": ["RavenForCausalLM"], "n_embd": 512, "n_heads": 8,
    "intermediate_size": 1536, "vocab_size": VOCAB, "padded_vocab_size": VOCAB, "block_size": 1024,
    "n_layers_in_prelude": 2, "n_layers_in_recurrent_block": 4, "n_layers_in_coda": 2,
    "mean_recurrence": 8, "norm_eps": 1e-6, "tie_embeddings": True, "qk_bias": True, "bias": False,
    "rope_base": 50000,
}


def build_huginn(folder: str) -> None:
    """A random Huginn-format checkpoint in ``folder``."""
    from tl_loop.loading.registry import get_family

    cfg = get_family("huginn").to_config(HUGINN_CONFIG, {"transformer.core_block.0.norm_4.weight"})
    HookedLoopedTransformer(cfg, seed=0).save_pretrained(folder, family="huginn")


def tiny_tokenizer(folder: str) -> Any:
    """A word-level tokenizer over the benchmark vocabulary (the bridge wants one; offline)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="t1", eos_token="t2", unk_token="t0", pad_token="t2"
    )
    tok.save_pretrained(folder)
    return transformers.AutoTokenizer.from_pretrained(folder)


class _Identity:
    """What a stripped hook point becomes: a plain function call that returns its input."""

    __slots__ = ()
    _forward_hooks: dict = {}
    _backward_hooks: dict = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x


def strip_hook_points(model: torch.nn.Module) -> int:
    """Replace every ``HookPoint`` child by ``_Identity`` (an instance attribute, not a module)."""
    count = 0
    for module in list(model.modules()):
        for name, child in list(module._modules.items()):
            if isinstance(child, HookPoint):
                del module._modules[name]
                object.__setattr__(module, name, _Identity())
                count += 1
    # The views of other step counts and the read-out views hold hook points too.
    for views in list(getattr(model, "_views", {}).values()):
        count += strip_hook_points(views) if views is not model else 0
    return count


# ------------------------------------------------------------------------------------ timing
CLOCK = "cpu"  # set from --clock


def trim_heap() -> None:
    """Hand the C heap's free memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Every timed call starts from a trimmed heap, so the memory a call keeps (a cache) comes fresh
    from the OS each time, whatever other objects happen to pin the heap: the same, deterministic
    conditions for every function compared (the worst case for ``run_with_cache``)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, dict[str, list[float]]]:
    """Seconds per call of each function (``{"wall": [...], "cpu": [...]}``; cpu = user + system
    time of this process), ``repeats`` rounds, the functions taking turns."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in fns}
    names = list(fns)
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate who goes first
        for name in order:
            gc.collect()
            trim_heap()
            start, cpu = time.perf_counter(), time.process_time()
            out = fns[name]()
            times[name]["cpu"].append(time.process_time() - cpu)
            times[name]["wall"].append(time.perf_counter() - start)
            del out
    return times


def ratio(times: dict[str, dict[str, list[float]]], num: str, den: str, clock: str | None = None) -> float:
    """Median over rounds of the per-round ratio (both calls ran in the same round)."""
    clock = clock or CLOCK
    return statistics.median(a / b for a, b in zip(times[num][clock], times[den][clock]))


def med(times: dict[str, dict[str, list[float]]], name: str, clock: str | None = None) -> float:
    return statistics.median(times[name][clock or CLOCK])


# ------------------------------------------------------------------------------------ memory (child)
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


@torch.no_grad()
def memory_child(args: argparse.Namespace) -> None:
    from tl_loop import analysis as A

    if args.threads:
        torch.set_num_threads(args.threads)
    model = HookedLoopedTransformer.from_pretrained(args.folder)
    tokens = torch.randint(0, VOCAB, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    model(tokens[:, :8])  # warm-up
    gc.collect()
    reset = reset_peak_rss()  # else the peak of loading the checkpoint would hide the run's
    before = rss_bytes()
    cache_bytes, result = 0, None
    if args.child == "forward":
        model(tokens)
    elif args.child == "stream":
        result = A.run_streaming(model, tokens, A.ResidualStats()).step_distance.tolist()
    else:
        _, cache = model.run_with_cache(tokens)
        cache_bytes = sum(t.numel() * t.element_size() for t in cache.cache_dict.values())
        result = A.residual_stats(cache).step_distance.tolist()
    peak = max(peak_rss_bytes() - before, 0)
    print(json.dumps({"peak_bytes": peak, "cache_bytes": cache_bytes, "result": result, "peak_reset": reset}))


def measure_memory(folder: str, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in ("forward", "cache", "stream"):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--folder", folder,
               "--seq", str(args.seq), "--batch", str(args.batch)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    a, b = torch.tensor(out["cache"]["result"]), torch.tensor(out["stream"]["result"])
    out["max_abs_diff_stream_vs_cache"] = float((a - b).abs().max()) if a.numel() else 0.0
    return out


# ------------------------------------------------------------------------------------ sections
def logit_diff_metric(clean_logits: torch.Tensor, corrupted_logits: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Logit of the clean prediction minus that of the corrupted one, at the last position
    (batch mean): a scalar, as TransformerLens's sweeps want."""
    good = clean_logits[:, -1].argmax(-1)
    bad = corrupted_logits[:, -1].argmax(-1)
    bad = torch.where(bad == good, (good + 1) % VOCAB, bad)
    rows = torch.arange(good.shape[0])

    def metric(logits: torch.Tensor) -> torch.Tensor:
        last = logits[:, -1]
        return (last[rows, good] - last[rows, bad]).mean()

    return metric


def sweep_section(model: Any, args: argparse.Namespace) -> dict[str, Any]:
    from transformer_lens import patching

    from tl_loop import patching as loop_patching

    gen = torch.Generator().manual_seed(1)
    clean = torch.randint(0, VOCAB, (1, args.sweep_seq), generator=gen)
    corrupted = clean.clone()
    corrupted[0, args.sweep_seq // 3] = (clean[0, args.sweep_seq // 3] + 7) % VOCAB
    clean_logits, clean_cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_resid_pre"))
    metric = logit_diff_metric(clean_logits, model(corrupted))
    out: dict[str, Any] = {"cells": model.cfg.n_layers * args.sweep_seq, "seq": args.sweep_seq}
    results: dict[str, torch.Tensor] = {}

    def tl() -> torch.Tensor:
        results["tl"] = patching.get_act_patch_resid_pre(model, corrupted, clean_cache, metric)
        return results["tl"]

    def batched() -> torch.Tensor:
        results["batched"] = loop_patching.get_act_patch_resid_pre_batched(model, corrupted, clean_cache, metric)
        return results["batched"]

    def prefix_only() -> torch.Tensor:  # one patch per pass: what reusing the prefix alone buys
        results["prefix_only"] = loop_patching.get_act_patch_resid_pre_batched(
            model, corrupted, clean_cache, metric, batch_size=1
        )
        return results["prefix_only"]

    if not hasattr(loop_patching, "get_act_patch_resid_pre_batched"):  # an older tl-loop
        times = interleaved({"tl": tl}, repeats=args.sweep_repeats, warmup=0)
        nan = float("nan")
        out.update(tl_s=med(times, "tl"), batched_s=nan, speedup=nan, max_abs_diff=nan)
        out["metric_range"] = float(results["tl"].abs().max())
        return out
    times = interleaved({"tl": tl, "batched": batched, "prefix_only": prefix_only}, repeats=args.sweep_repeats, warmup=0)
    out["tl_s"], out["batched_s"] = med(times, "tl"), med(times, "batched")
    out["prefix_only_s"] = med(times, "prefix_only")
    out["speedup"] = ratio(times, "tl", "batched")
    out["speedup_prefix_only"] = ratio(times, "tl", "prefix_only")
    out["max_abs_diff"] = float((results["tl"] - results["batched"]).abs().max())
    out["max_abs_diff_prefix_only"] = float((results["tl"] - results["prefix_only"]).abs().max())
    out["metric_range"] = float(results["tl"].abs().max())
    return out


def hook_cost_section(folder: str, model: Any, tokens: torch.Tensor, short: torch.Tensor, repeats: int) -> dict[str, Any]:
    stripped = HookedLoopedTransformer.from_pretrained(folder)
    n = strip_hook_points(stripped)
    with torch.no_grad():
        assert torch.equal(stripped(tokens), model(tokens)), "the stripped model computes something else"
    out: dict[str, Any] = {"hook_points_stripped": n, "calls_per_forward": hook_calls(model, short)}
    out["ns_per_call"] = per_call_ns()
    for label, x, reps in (("timing_shape", tokens, repeats), ("short_shape", short, repeats * 10)):
        times = interleaved({"hooked": lambda x=x: model(x), "stripped": lambda x=x: stripped(x)}, reps)
        out[label] = {"hooked_s": med(times, "hooked"), "stripped_s": med(times, "stripped"),
                      "ratio": ratio(times, "hooked", "stripped"), "shape": list(x.shape)}
        # what the hook points' own call costs, from the per-call timing: far below the noise of
        # the end-to-end ratio
        extra = out["calls_per_forward"] * (out["ns_per_call"]["LoopHookPoint"] - out["ns_per_call"]["identity"]) * 1e-9
        out[label]["estimated_hook_share"] = extra / out[label]["hooked_s"]
    return out


def hook_calls(model: Any, x: torch.Tensor) -> int:
    """Hook-point calls in one forward pass (counted with a global module hook)."""
    count = [0]

    def counter(module: torch.nn.Module, args: Any, output: Any) -> None:
        count[0] += isinstance(module, HookPoint)

    handle = torch.nn.modules.module.register_module_forward_hook(counter)
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return count[0]


def per_call_ns(n: int = 200_000) -> dict[str, float]:
    """Nanoseconds per call, nothing attached: tl-loop's hook point, TransformerLens's HookPoint,
    and a plain identity function (what stripping leaves)."""
    try:
        from tl_loop.components.base import LoopHookPoint
    except ImportError:  # an older tl-loop, which used TransformerLens's HookPoint
        LoopHookPoint = HookPoint  # noqa: N806

    x = torch.zeros(1)
    out = {}
    for label, fn in (("LoopHookPoint", LoopHookPoint()), ("HookPoint", HookPoint()), ("identity", _Identity())):
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(n):
                fn(x)
            best = min(best, time.perf_counter() - start)
        out[label] = best / n * 1e9
    return out


@torch.no_grad()
def bench_model(name: str, folder: str, args: argparse.Namespace, tmp: str) -> dict[str, Any]:
    print(f"\n=== {name} ===", flush=True)
    model = HookedLoopedTransformer.from_pretrained(folder)
    cfg = model.cfg
    res: dict[str, Any] = {"n_layers": cfg.n_layers, "n_steps": cfg.n_steps, "d_model": cfg.d_model,
                           "hook_points": len(model.hook_dict), "load_at_start": os.getloadavg()}
    print(f"{cfg.n_layers} effective layers, {len(model.hook_dict)} hook points", flush=True)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (args.batch, args.seq), generator=gen)
    short = torch.randint(0, VOCAB, (1, args.sweep_seq), generator=gen)
    resid_post = lambda n: n.endswith("hook_resid_post")  # noqa: E731

    fns: dict[str, Callable[[], Any]] = {
        "forward": lambda: model(tokens),
        "cache_all": lambda: model.run_with_cache(tokens),
        "cache_resid_post": lambda: model.run_with_cache(tokens, names_filter=resid_post),
    }
    if name == "hrm":
        hf = load_hf(folder, "sdpa")
        ref = hf(tokens, use_cache=False).logits
        ours = model(tokens)
        res["max_rel_dev_vs_reference"] = float((ours - ref).abs().max() / ref.abs().max())
        fns["reference"] = lambda: hf(tokens, use_cache=False).logits
        from transformer_lens.model_bridge import TransformerBridge

        bridge_hf = load_hf(folder, "eager")  # the bridge forces eager attention on the model it wraps
        bridge = TransformerBridge.boot_transformers(
            "hrm-text-random", hf_model=bridge_hf, tokenizer=tiny_tokenizer(os.path.join(tmp, "tok")), device="cpu"
        )
        bridge_logits, bridge_cache = bridge.run_with_cache(tokens)
        res["bridge_max_rel_dev_vs_reference"] = float((bridge_logits - ref).abs().max() / ref.abs().max())
        res["bridge_cache_entries"] = len(bridge_cache)
        _, our_cache = model.run_with_cache(tokens)
        res["cache_entries"] = len(our_cache)
        res["cache_bytes"] = sum(t.numel() * t.element_size() for t in our_cache.cache_dict.values())
        res["bridge_cache_bytes"] = sum(t.numel() * t.element_size() for t in bridge_cache.values())
        del bridge_cache, our_cache
        fns["bridge_cache_all"] = lambda: bridge.run_with_cache(tokens)
    times = interleaved(fns, args.repeats)
    res["seconds"] = {k: med(times, k) for k in times}
    res["wall_seconds"] = {k: med(times, k, "wall") for k in times}
    pairs = {"cache_all_vs_forward": ("cache_all", "forward"),
             "cache_resid_post_vs_forward": ("cache_resid_post", "forward")}
    if name == "hrm":
        pairs.update(forward_vs_reference=("forward", "reference"),
                     cache_all_vs_bridge_cache_all=("cache_all", "bridge_cache_all"))
    res["wall_ratios"] = {}
    for key, (a, b) in pairs.items():
        res[key] = ratio(times, a, b)
        res["wall_ratios"][key] = ratio(times, a, b, "wall")
    if name == "hrm":
        del hf, bridge, bridge_hf
    for k, v in res["seconds"].items():
        print(f"  {k:18s} {v * 1e3:9.1f} ms {CLOCK} ({res['wall_seconds'][k] * 1e3:.1f} ms wall)", flush=True)

    print("  hook points with nothing attached vs stripped ...", flush=True)
    res["hook_cost"] = hook_cost_section(folder, model, tokens, short, args.repeats)
    print("  memory (subprocesses) ...", flush=True)
    res["memory"] = measure_memory(folder, args)
    print("  patching sweep ...", flush=True)
    res["sweep"] = sweep_section(model, args)
    return res


def machine() -> dict[str, Any]:
    from importlib.metadata import version

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": version("transformers"), "transformer_lens": version("transformer-lens"),
            "platform": platform.platform()}


def report(results: dict[str, Any]) -> str:
    """The summary as a Markdown table (printed, and written by ``--markdown``)."""
    rows = []

    def add(key: str, label: str, value: float, fmt: str = "{:.2f}x") -> None:
        target = TARGETS.get(key)
        verdict = ""
        if target:
            op, bound = target
            ok = value <= bound if op == "<=" else value >= bound
            verdict = f"{op} {bound} {'ok' if ok else 'MISSED'}"
        rows.append(f"| {label} | {fmt.format(value)} | {verdict} |")

    for name in ("hrm", "huginn"):
        r = results[name]
        if name == "hrm":
            add("hrm.forward_vs_reference", "HRM forward (no hooks) / HrmTextForCausalLM (sdpa)", r["forward_vs_reference"])
        add(f"{name}.cache_all_vs_forward", f"{name}: run_with_cache (all) / forward", r["cache_all_vs_forward"])
        add("", f"{name}: run_with_cache (resid_post) / forward", r["cache_resid_post_vs_forward"])
        if name == "hrm":
            add("", "HRM run_with_cache (all) / TransformerBridge.run_with_cache", r["cache_all_vs_bridge_cache_all"])
        m = r["memory"]
        mib = 1 << 20
        rows.append(f"| {name}: peak memory forward / run_with_cache+residual_stats / streamed ResidualStats | "
                    f"{m['forward']['peak_bytes'] / mib:.0f} / {m['cache']['peak_bytes'] / mib:.0f} / "
                    f"{m['stream']['peak_bytes'] / mib:.0f} MiB | |")
        s = r["sweep"]
        add(f"{name}.sweep_speedup", f"{name}: resid_pre sweep, TL time / batched time ({s['cells']} cells)", s["speedup"])
        if "speedup_prefix_only" in s:
            add("", f"{name}: resid_pre sweep, TL time / prefix reuse alone (batch_size=1)", s["speedup_prefix_only"])
        rows.append(f"| {name}: sweep max abs difference (metric range {s['metric_range']:.3g}) | {s['max_abs_diff']:.2e} | |")
        h = r["hook_cost"]
        for shape in ("timing_shape", "short_shape"):
            add("", f"{name}: forward with hook points / stripped, {h[shape]['shape']}", h[shape]["ratio"], "{:.3f}x")
        ns = h["ns_per_call"]
        rows.append(f"| {name}: {h['calls_per_forward']} hook-point calls per forward; ns per call "
                    f"tl-loop / TL HookPoint / identity | {ns['LoopHookPoint']:.0f} / {ns['HookPoint']:.0f} / "
                    f"{ns['identity']:.0f} ns (hook points {100 * h['short_shape']['estimated_hook_share']:.2f}% "
                    f"of the short forward) | |")
    head = "| quantity | value | target |\n|---|---|---|\n"
    return head + "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repeats and shorter inputs (smoke run)")
    p.add_argument("--repeats", type=int, default=None, help="timing rounds (default 9, --quick 3)")
    p.add_argument("--sweep-repeats", type=int, default=None, help="sweep rounds (default 3, --quick 1)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence for timing (default 128)")
    p.add_argument("--batch", type=int, default=2, help="sequences per batch for timing")
    p.add_argument("--sweep-seq", type=int, default=None, help="prompt length of the patching sweep (default 12)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: steadier on a shared machine; 0 = torch's default)")
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                   help="clock of the ratios: cpu (user + system time of this process; default, robust to "
                   "other jobs on the machine with --threads 1) or wall")
    p.add_argument("--models", default="hrm,huginn", help="comma-separated subset of hrm,huginn")
    p.add_argument("--json", default=None, help="write every number to this file")
    p.add_argument("--markdown", default=None, help="write the summary table to this file")
    p.add_argument("--child", choices=["forward", "cache", "stream"], help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.repeats = args.repeats or (3 if args.quick else 9)
    args.sweep_repeats = args.sweep_repeats or (1 if args.quick else 3)
    args.seq = args.seq or (32 if args.quick else 128)
    args.sweep_seq = args.sweep_seq or (6 if args.quick else 12)
    if args.child:
        return memory_child(args)
    global CLOCK
    CLOCK = args.clock
    if args.threads:
        torch.set_num_threads(args.threads)
    import logging

    logging.disable(logging.WARNING)  # the bridge and transformers are chatty
    results: dict[str, Any] = {"machine": machine(), "load_before": os.getloadavg(), "args": vars(args)}
    print(json.dumps(results["machine"]))
    print(f"load average before: {results['load_before']}", flush=True)
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        builders = {"hrm": build_hrm, "huginn": build_huginn}
        for name in args.models.split(","):
            folder = os.path.join(tmp, name)
            builders[name](folder)
            results[name] = bench_model(name, folder, args, tmp)
    results["load_after"] = os.getloadavg()
    results["wall_s"] = time.time() - start
    print(f"\nload average after: {results['load_after']}; wall {results['wall_s']:.0f} s")
    if all(m in results for m in ("hrm", "huginn")):
        table = report(results)
        print("\n" + table)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(table + "\n")
    else:
        print(json.dumps({k: v for k, v in results.items() if k in ("hrm", "huginn")}, indent=1, default=str))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
