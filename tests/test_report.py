"""The HTML report: every model the README lists reports at every legal depth; verdicts follow
the numbers; the task, its answer and the mechanism's positions are stated."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from analysis_helpers import linear_loop_model
from tl_loop import HookedLoopedTransformer
from tl_loop import analysis as A
from tl_loop.pretrained import task_for
from tl_loop import exits
from tl_loop.errors import UnsupportedError
from tl_loop.report import ARGMAX_STABLE_CHECKS, GENERATION_SECTIONS, GENERATION_TOKENS, SECTIONS, write_report

FIXTURES = Path(__file__).parent / "fixtures"
MODELS = ["tl-loop/varbind-looped", "tl-loop/varbind-baseline", *(str(FIXTURES / f) for f in
          ("raven_tiny", "ouro_tiny", "retro_llama_tiny", "retro_olmo_tiny"))]


def verdicts(page: str) -> dict[str, str]:
    """Section title -> its verdict text (or its 'Not shown' note)."""
    out = {}
    for title, body in re.findall(r"<section id='[^']*'><h2>(.*?)</h2>(.*?)</section>", page, re.S):
        found = re.search(r"<p class='(?:verdict|skipped)'>(.*?)</p>", body, re.S)
        out[title] = found.group(1)
    return out


@pytest.fixture(scope="module")
def loaded():
    return {}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("n_steps", [0, 1, 2])
def test_every_model_reports_at_every_depth(name, n_steps, tmp_path, loaded):
    if name not in loaded:
        loaded[name] = HookedLoopedTransformer.from_pretrained(name)
    model = loaded[name]
    problem = None
    if "task" in model.cfg.extra:
        task = task_for(model)
        problem = task.dataset(hops=2, n=1, split="test")[0]
        tokens = task.encode([problem])[0]
    else:
        tokens = torch.tensor([[1, 2, 3, 4, 5]])
    page = write_report(model, tokens, tmp_path / "r.html", n_steps=n_steps, progress=False, problem=problem).read_text()
    found = verdicts(page)
    assert set(found) >= {s.title for s in SECTIONS + GENERATION_SECTIONS}
    for section in SECTIONS + GENERATION_SECTIONS:
        if n_steps < section.min_steps:
            assert found[section.title].startswith("Not shown"), section.title
    assert page.count("data-figure=") == sum(1 for v in found.values() if v.startswith("<b>Verdict"))
    assert model.cfg.n_steps == loaded[name].cfg.n_steps  # the report leaves the model's depth alone


def test_task_context_and_patching(tmp_path):
    model = HookedLoopedTransformer.from_pretrained("tl-loop/varbind-looped")
    task = task_for(model)
    problem = task.dataset(hops=3, n=1, split="test")[0]
    page = write_report(model, task.encode([problem])[0], tmp_path / "r.html", progress=False,
                        problem=problem).read_text()
    assert f"correct answer <b>{problem.answer}</b>, <b>3 hops</b>" in page
    mech = problem.mechanism
    for pos in mech.relevant_positions:
        assert f"<tr><td>{pos}</td>" in page
        assert f"'{pos}:" in page or f'"{pos}:' in page  # on the patching figures' axis ...
    assert re.search(rf"{mech.answer_pos}:[^\"']* \*", page)  # ... marked as the mechanism's
    found = verdicts(page)
    assert "of the total |restoration| sits on the mechanism" in found["Patching the residual stream over the effective depth"]
    assert "largest restoration per step" in found["Patching the recurrent state"]
    assert "JS divergence" in page and "Jensen-Shannon distance" not in page


def test_convergence_verdict_follows_the_numbers(tmp_path):
    tokens = torch.tensor([[1, 2, 3, 4]])
    contracting = linear_loop_model([(0.5, torch.ones(8))], n_steps=24)  # x -> x/2 + 1: fixed point 2
    page = write_report(contracting, tokens, tmp_path / "a.html", progress=False).read_text()
    _, cache = contracting.run_with_cache(tokens)
    k = int(A.convergence_step(A.step_distances(cache), 1e-3)[0])
    assert k >= 0
    verdict = verdicts(page)["Fixed-point convergence"]
    assert "<b>converged</b>" in verdict and f"from step {k + 1} on" in verdict
    assert "<b>single point</b>" in verdicts(page)["Cycle or single point"]

    growing = linear_loop_model([(1.5, None)], n_steps=6)  # moves by half its norm every step
    verdict = verdicts(write_report(growing, tokens, tmp_path / "b.html", progress=False).read_text())
    assert "<b>not converged</b>" in verdict["Fixed-point convergence"]
    assert "<b>not converged</b>" in verdict["Cycle or single point"]


def test_generation_section(tmp_path, monkeypatch):
    model = HookedLoopedTransformer.from_pretrained("tl-loop/varbind-looped")
    task = task_for(model)
    problem = task.dataset(hops=2, n=1, split="test")[0]
    tokens = task.encode([problem])[0]
    page = write_report(model, tokens, tmp_path / "r.html", progress=False, problem=problem).read_text()
    assert "data-figure='generation'" in page
    new = min(GENERATION_TOKENS, model.cfg.n_ctx - tokens.shape[1])
    out = model.generate(tokens, max_new_tokens=new, do_sample=False, stop_at_eos=False, verbose=False,
                         exit=exits.argmax_stability(ARGMAX_STABLE_CHECKS), return_details=True)
    steps = out.steps_used[0]
    n = model.cfg.n_steps
    assert int(steps.min()) < n  # the exit is adaptive here: some token leaves the loop early
    verdict = verdicts(page)["Generation"]
    assert verdict.startswith("<b>Verdict")
    assert (f"{new} greedy tokens" in verdict and f"used between {int(steps.min())} and {int(steps.max())} of {n} "
            f"steps; mean {float(steps.float().mean()):.1f}" in verdict and "argmax_stability(2)" in verdict), verdict

    def note(tokens, **kw):
        return verdicts(write_report(model, tokens, tmp_path / "n.html", progress=False, **kw).read_text())["Generation"]

    assert note(tokens, n_steps=0).startswith("Not shown: this run has 0 recurrent steps, and an adaptive exit")
    full = tokens.repeat(1, 2)[:, : model.cfg.n_ctx]  # no room left in the context
    assert note(full).startswith(f"Not shown: the {model.cfg.n_ctx} prompt tokens fill the context")

    def unsupported(*args, **kwargs):
        raise UnsupportedError("no decoding for this family")

    monkeypatch.setattr(model, "generate", unsupported)
    assert note(tokens) == "Not shown: this model cannot decode here (no decoding for this family)."
