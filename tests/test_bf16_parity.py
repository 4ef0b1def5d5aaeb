"""bfloat16 parity: loaded in bf16 (``dtype="stored"`` on a bf16 checkpoint), each family stays
within the deviation its reference shows between its own bf16 and float32 runs.

Deviation = largest |difference| of the logits over the largest |float32 reference logit|.
References: ``transformers.HrmTextForCausalLM`` itself (HRM-Text, run in bf16 and float32 here);
Ouro, Huginn and retrofitted recurrence have remote-code references that cannot run offline, so
their bf16 logits are compared with the fixtures' float32 reference outputs against a fixed bound. ``FIGURES`` collects the numbers
(``pytest -s`` prints them).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import rel_dev
from safetensors.torch import load_file, save_file

from tl_loop import HookedLoopedTransformer

FIXTURES = Path(__file__).parent / "fixtures"
#: ours may deviate at most this many times as much as the reference's own bf16 run
FACTOR = 2.0
#: bound for the families whose reference cannot run offline
NO_REFERENCE_BOUND = 0.05


def _bf16_copy(name: str, tmp_path: Path) -> Path:
    """The fixture with its weights stored in bf16 (Huginn's ``freqs_cis`` stays float32)."""
    folder = tmp_path / name
    folder.mkdir()
    for f in (FIXTURES / name).iterdir():
        if f.is_file() and f.name not in ("model.safetensors", "expected.safetensors"):
            (folder / f.name).write_bytes(f.read_bytes())
    weights = load_file(str(FIXTURES / name / "model.safetensors"))
    save_file({k: v if k == "freqs_cis" else v.bfloat16() for k, v in weights.items()}, str(folder / "model.safetensors"))
    return folder


def _report(family: str, ours: float, reference: float | None) -> None:
    ref = f"{reference:.3g}" if reference is not None else "n/a"
    print(f"\nbf16 parity {family}: ours {ours:.3g}, reference bf16 vs float32 {ref}")


def _pattern_times_one(pattern: torch.Tensor, hook) -> torch.Tensor:
    return pattern * 1  # a new tensor: the materialised attention runs


#: how the bf16 model runs: no hooks, caching every hook point, a hook changing every pattern
HOOKS = {
    "no_hooks": lambda model, tokens, **kw: model(tokens, **kw),
    "cache_every_hook": lambda model, tokens, **kw: model.run_with_cache(tokens, **kw)[0],
    "pattern_changed": lambda model, tokens, **kw: model.run_with_hooks(
        tokens, fwd_hooks=[(lambda name: name.endswith("hook_pattern"), _pattern_times_one)], **kw
    ),
}


@pytest.mark.parametrize("hooks", list(HOOKS))
def test_hrm_text_bf16_within_reference(tmp_path, hooks):
    pytest.importorskip("transformers")
    from test_loading_hrm_text import VOCAB, build_hf

    hf = build_hf()
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    hf16 = copy.deepcopy(hf).to(torch.bfloat16)
    hf16.save_pretrained(str(tmp_path / "hrm"))
    with torch.no_grad():
        ref32, ref16 = hf(tokens).logits, hf16(tokens).logits.float()
        ours = HookedLoopedTransformer.from_pretrained(str(tmp_path / "hrm"), dtype="stored")
        assert ours.cfg.dtype == torch.bfloat16
        logits = HOOKS[hooks](ours, tokens).float()
        if hooks == "cache_every_hook":  # read-only hooks move nothing
            assert torch.equal(logits, ours(tokens).float())
    dev_ref, dev_ours = rel_dev(ref16, ref32), rel_dev(logits, ref32)
    _report(f"hrm_text ({hooks})", dev_ours, dev_ref)
    assert 0 < dev_ref and dev_ours <= FACTOR * dev_ref


@pytest.mark.parametrize("hooks", list(HOOKS))
@pytest.mark.parametrize("name", ["ouro_tiny", "raven_tiny", "retro_llama_tiny", "retro_olmo_tiny"])
def test_remote_code_families_bf16_close_to_float32_reference(name, tmp_path, hooks):
    folder = _bf16_copy(name, tmp_path)
    expected = load_file(str(FIXTURES / name / "expected.safetensors"))
    ours = HookedLoopedTransformer.from_pretrained(str(folder), dtype="stored")
    assert ours.cfg.dtype == torch.bfloat16
    kwargs = {"init_state": expected["init_state"].bfloat16()} if "init_state" in expected else {}
    with torch.no_grad():
        logits = HOOKS[hooks](ours, expected["input_ids"], **kwargs).float()
    dev = rel_dev(logits, expected["logits"])
    _report(f"{name} ({hooks})", dev, None)
    assert dev <= NO_REFERENCE_BOUND
