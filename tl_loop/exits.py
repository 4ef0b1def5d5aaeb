"""Per-token exit rules for ``model.generate(exit=...)``: when a token stops iterating.

A rule is checked after every loop step ``s`` (from step 0) on the positions of the current
decoding call and says, per batch row, whether the token exits there (``exit_step = s``, so
``s + 1`` steps ran). A row that never meets it runs every step. The values are those of the
reference implementations, including the value before step 0:

==========================  ====================================================================
``entropy_diff(t=1e-3)``    ``|H_s - H_{s-1}| < t``, ``H = -sum p log(p + 1e-10)`` of the last
                            position's read-out, ``H_{-1} = 100`` (step 0 never exits). Huginn.
``latent_diff(t=0.03)``     mean over positions of ``||x_s - x_{s-1}|| / ||x_s|| < t``;
                            ``x_{-1}`` is the initial state. Huginn.
``kl(t=1e-3)``              ``KL(p_{s-1} || p_s) < t`` of the last position's read-out,
                            ``p_{-1}`` uniform. Huginn.
``minp_kl(t=1e-5)``         as ``kl`` with probabilities below ``0.1 * max`` set to ``1/V`` and
                            renormalised before the log. Huginn.
``cosine(t=1e-3)``          ``1 - mean cos(x_s, x_{s-1}) < t`` (NaN, so no exit, at step 0 from a
                            zero state). Huginn.
``argmax_stability(k=5)``   the last position's argmax equal to the previous check's for ``k``
                            consecutive checks (the previous argmax is -1 before step 0). Huginn.
``gate(t=1.0)``             Ouro: cumulative exit probability ``>= t`` (its ``exit_threshold``).
``at_step(k)``              every token reads out step ``k`` (Ouro's ``exit_at_step``).
==========================  ====================================================================

Which family honours which rule, and what exiting means there (Huginn: later steps are not run
and leave no KV entries; Ouro: every step runs, the exit only chooses the read-out), is decided
by ``tl_loop.generation``.

>>> rule = entropy_diff(0.01)
>>> rule.name, rule.threshold
('entropy_diff', 0.01)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float

from tl_loop.errors import InputError


@dataclasses.dataclass
class Probe:
    """What a rule may read after step ``step`` of one decoding call (computed on demand).

    ``latent``: the state at the end of the step ``[batch, pos, d_model]`` (before any loop
    norm); ``previous``: the state before it (the initial state at step 0); ``valid``: real
    positions ``[batch, pos]`` (None: all); ``logits``: the last position's read-out
    ``[batch, d_vocab]``; ``gate``: the exit gate's logit at the last position ``[batch]``.
    """

    step: int
    latent: torch.Tensor
    previous: torch.Tensor
    valid: torch.Tensor | None
    _logits: Callable[[], torch.Tensor]
    _gate: Callable[[], torch.Tensor]
    _memo: dict = dataclasses.field(default_factory=dict)

    @property
    def logits(self) -> Float[torch.Tensor, "batch d_vocab"]:
        if "logits" not in self._memo:
            self._memo["logits"] = self._logits()
        return self._memo["logits"]

    @property
    def gate(self) -> Float[torch.Tensor, "batch"]:
        if "gate" not in self._memo:
            self._memo["gate"] = self._gate()
        return self._memo["gate"]

    def position_mean(self, values: Float[torch.Tensor, "batch pos"]) -> Float[torch.Tensor, "batch"]:
        """Mean over the call's real positions."""
        if self.valid is None:
            return values.mean(-1)
        valid = self.valid.to(values.dtype)
        return (values * valid).sum(-1) / valid.sum(-1)


class ExitRule:
    """Base class: ``start(batch, ...)`` returns the per-call running value, ``check(probe,
    memory)`` returns ``(exit [batch] bool, value [batch])``."""

    name: ClassVar[str]
    uses: ClassVar[str]  # "logits" | "latent" | "gate" | "step"
    default: ClassVar[float | int]
    threshold: Any

    def __init__(self, threshold: float | int | None = None) -> None:
        self.threshold = self.default if threshold is None else self._check_threshold(threshold)

    def _check_threshold(self, t: Any) -> float:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(float(t)):
            raise InputError(f"{self.name}: the threshold must be a finite number, got {type(t).__name__} {t!r}")
        if t < 0:
            raise InputError(f"{self.name}: the threshold must be >= 0, got {t}")
        return float(t)

    def __repr__(self) -> str:
        return f"{self.name}({self.threshold!r})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.threshold == self.threshold  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((self.name, self.threshold))

    def start(self, batch: int, d_vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
        return {}

    def check(self, probe: Probe, memory: dict[str, torch.Tensor]) -> tuple[Bool[torch.Tensor, "batch"], torch.Tensor]:
        raise NotImplementedError


class _Below(ExitRule):
    """Exit when ``value < threshold``."""

    def check(self, probe: Probe, memory: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        value = self.value(probe, memory)
        return value < self.threshold, value

    def value(self, probe: Probe, memory: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


class EntropyDiff(_Below):
    name, uses, default = "entropy_diff", "logits", 1e-3

    def start(self, batch: int, d_vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
        return {"entropy": torch.full((batch,), 100.0, device=device)}

    def value(self, probe: Probe, memory: dict[str, torch.Tensor]) -> torch.Tensor:
        probs = F.softmax(probe.logits.float(), dim=-1)
        entropy = -torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
        value = (entropy - memory["entropy"]).abs()
        memory["entropy"] = entropy
        return value


class LatentDiff(_Below):
    name, uses, default = "latent_diff", "latent", 0.03

    def value(self, probe: Probe, memory: dict[str, torch.Tensor]) -> torch.Tensor:
        x, prev = probe.latent.float(), probe.previous.float()
        return probe.position_mean((prev - x).norm(dim=-1) / x.norm(dim=-1))


class KL(_Below):
    name, uses, default = "kl", "logits", 1e-3

    def start(self, batch: int, d_vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
        return {"log_probs": ((1 / d_vocab) * torch.ones(batch, d_vocab, device=device)).log()}

    def log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(logits.float(), dim=-1)

    def value(self, probe: Probe, memory: dict[str, torch.Tensor]) -> torch.Tensor:
        log_probs = self.log_probs(probe.logits)
        value = F.kl_div(log_probs, memory["log_probs"], reduction="none", log_target=True).sum(dim=-1)
        memory["log_probs"] = log_probs
        return value


class MinpKL(KL):
    name, uses, default = "minp_kl", "logits", 1e-5

    def log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(logits.float(), dim=-1)
        low = probs < 0.1 * probs.max(dim=-1, keepdim=True)[0]
        probs = probs.masked_fill(low, 1 / probs.shape[-1])
        return (probs / probs.sum(dim=-1, keepdim=True)).log()


class Cosine(_Below):
    name, uses, default = "cosine", "latent", 1e-3

    def value(self, probe: Probe, memory: dict[str, torch.Tensor]) -> torch.Tensor:
        x, prev = probe.latent.float(), probe.previous.float()
        cos = (x * prev).sum(-1) / (x.norm(dim=-1) * prev.norm(dim=-1))
        return 1 - probe.position_mean(cos)


class ArgmaxStability(ExitRule):
    name, uses, default = "argmax_stability", "logits", 5

    def _check_threshold(self, t: Any) -> int:  # type: ignore[override]
        if isinstance(t, bool) or not isinstance(t, int) or t < 1:
            raise InputError(f"argmax_stability: k must be an int >= 1 (checks in a row), got {type(t).__name__} {t!r}")
        return t

    def start(self, batch: int, d_vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
        return {"argmax": torch.full((batch,), -1, device=device), "stable": torch.zeros(batch, dtype=torch.long, device=device)}

    def check(self, probe: Probe, memory: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        argmax = probe.logits.argmax(dim=-1)
        stable = torch.where(argmax == memory["argmax"], memory["stable"] + 1, torch.zeros_like(memory["stable"]))
        memory["argmax"], memory["stable"] = argmax, stable
        return stable >= self.threshold, stable


class Gate(ExitRule):
    name, uses, default = "gate", "gate", 1.0

    def _check_threshold(self, t: Any) -> float:
        t = super()._check_threshold(t)
        if t > 1:
            raise InputError(f"gate: the threshold is a cumulative probability in [0, 1], got {t}")
        return t

    def start(self, batch: int, d_vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
        return {"remaining": torch.ones(batch, device=device), "cdf": torch.zeros(batch, device=device)}

    def check(self, probe: Probe, memory: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        # Ouro's pdf (tl_loop.readout.exit_pdf), accumulated step by step in the gate's dtype.
        lam = torch.sigmoid(probe.gate)
        remaining = memory["remaining"].to(lam.dtype)
        cdf = memory["cdf"].to(lam.dtype) + lam * remaining
        memory["remaining"], memory["cdf"] = remaining * (1.0 - lam), cdf
        return cdf >= self.threshold, cdf


class AtStep(ExitRule):
    name, uses, default = "at_step", "step", 0

    def _check_threshold(self, t: Any) -> int:  # type: ignore[override]
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise InputError(f"at_step: the step must be an int >= 0 (0-based), got {type(t).__name__} {t!r}")
        return t

    def check(self, probe: Probe, memory: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        hit = probe.latent.new_full((probe.latent.shape[0],), probe.step == self.threshold, dtype=torch.bool)
        return hit, hit.float()


def entropy_diff(t: float = EntropyDiff.default) -> ExitRule:
    """Exit when the read-out's entropy changes by less than ``t`` (Huginn ``entropy-diff``)."""
    return EntropyDiff(t)


def latent_diff(t: float = LatentDiff.default) -> ExitRule:
    """Exit when the state's relative change is below ``t`` (Huginn ``latent-diff``)."""
    return LatentDiff(t)


def kl(t: float = KL.default) -> ExitRule:
    """Exit when ``KL(previous || current)`` read-out is below ``t`` (Huginn ``kl``)."""
    return KL(t)


def minp_kl(t: float = MinpKL.default) -> ExitRule:
    """As ``kl`` on min-p filtered distributions (Huginn ``minp-kl``)."""
    return MinpKL(t)


def cosine(t: float = Cosine.default) -> ExitRule:
    """Exit when ``1 - cos(x_s, x_{s-1})`` is below ``t`` (Huginn ``cosine``)."""
    return Cosine(t)


def argmax_stability(k: int = ArgmaxStability.default) -> ExitRule:
    """Exit once the read-out's argmax has not changed for ``k`` checks (Huginn ``argmax-stability``)."""
    return ArgmaxStability(k)


def gate(t: float = Gate.default) -> ExitRule:
    """Exit when Ouro's cumulative exit probability reaches ``t``."""
    return Gate(t)


def at_step(k: int) -> ExitRule:
    """Read every token out at step ``k`` (0-based; Ouro's ``exit_at_step``)."""
    return AtStep(k)


RULES: dict[str, Callable[..., ExitRule]] = {
    "entropy_diff": entropy_diff, "latent_diff": latent_diff, "kl": kl, "minp_kl": minp_kl,
    "cosine": cosine, "argmax_stability": argmax_stability, "gate": gate, "at_step": at_step,
}


def parse(spec: str | ExitRule | None) -> ExitRule | None:
    """An exit rule from ``"name:threshold"`` (``"entropy_diff:0.01"``, ``"at_step:2"``; hyphens
    allowed, ``"entropy-diff"``), a rule, or None."""
    if spec is None or isinstance(spec, ExitRule):
        return spec
    if not isinstance(spec, str):
        raise InputError(f"exit must be an exit rule from tl_loop.exits, a 'name:threshold' string or None, got {spec!r}")
    name, _, value = spec.partition(":")
    name = name.strip().replace("-", "_")
    if name not in RULES:
        raise InputError(f"unknown exit rule {name!r}; known: {', '.join(RULES)}")
    if not value:
        if name == "at_step":
            raise InputError("at_step needs a step: 'at_step:K'")
        return RULES[name]()
    try:
        number: float | int = int(value) if name in ("at_step", "argmax_stability") else float(value)
    except ValueError:
        raise InputError(f"exit rule {name!r}: {value!r} is not a number") from None
    return RULES[name](number)
