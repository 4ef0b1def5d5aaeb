"""Placing a model over several devices: a ``device_map`` per physical block.

A looped model too large for one GPU puts its physical weights on several: the embedding, each
block of the prelude / inner (HRM) / core / coda stacks, the adapter, the norms, the exit gate and
the unembedding each go to one device. The unrolled views need nothing of their own: they compute
with their physical block's weights, so they run where it is. What moves is the pass: the
interpreter (``tl_loop.execution.Forward``) moves the live frame -- residual stream, recurrent
state, injection source, prelude output -- to the device of each operation's weights when the
execution reaches it, and the attention context (RoPE tables, padding) with it. Accelerate's
``AlignDevicesHook`` moves a module's inputs too, but the frame crosses blocks (the state and the
injection are read by operations that are not modules), so the move sits in the one place that
knows the order of execution.

The placement units, in execution order (``placement_units``)::

    embed                 token embedding (learned positions and a tied unembedding follow it)
    prelude.{j}           prelude blocks
    adapter               linear injection (Huginn)
    loop_norm             the norm between steps, when the model has its own
    inner.{j}             HRM's low-level blocks (the learned initial z_L follows inner.0)
    core.{j}              the recurrent blocks
    exit_gate             Ouro's exit gate
    coda.{j}              coda blocks
    final_norm            ln_final's weights
    unembed               the unembedding (when not tied)

A ``device_map`` is a dict from unit names (or prefixes of them: ``"core"`` for every core block,
``""`` for everything) to devices (an int is a CUDA index, or ``"cpu"``, ``"cuda:1"``,
``torch.device``), or ``"auto"`` / ``"balanced"`` / ``"balanced_low_0"`` / ``"sequential"``:
resolved by accelerate's ``infer_auto_device_map`` (``max_memory`` per device as accelerate
takes it, e.g. ``{0: "40GiB", 1: "40GiB"}``) over the units in execution order, blocks never split.

>>> from tl_loop import LoopedConfig, HookedLoopedTransformer
>>> cfg = LoopedConfig(d_model=16, d_head=8, d_vocab=20, n_prelude_layers=1, n_core_layers=2)
>>> model = HookedLoopedTransformer(cfg).place({"embed": "cpu", "prelude": "cpu", "core": "cpu", "final_norm": "cpu",
...                                             "unembed": "cpu"})
>>> model.device_map["core.1"], model.cfg.n_devices
('cpu', 1)
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from tl_loop.errors import InputError
from tl_loop.program import Op, RunFrame

#: The strategies ``device_map`` may name instead of a dict (accelerate's names; "auto" = "balanced").
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


# ---------------------------------------------------------------------------- units
def placement_units(model: Any) -> dict[str, nn.Module]:
    """The modules a ``device_map`` places, by name, in execution order."""
    cfg = model.cfg
    units: dict[str, nn.Module] = {"embed": model.embed}
    units.update((f"prelude.{j}", m) for j, m in enumerate(model.prelude))
    if model.adapter is not None:
        units["adapter"] = model.adapter
    if model.loop_norm is not None:
        units["loop_norm"] = model.loop_norm
    units.update((f"inner.{j}", m) for j, m in enumerate(model.inner))
    units.update((f"core.{j}", m) for j, m in enumerate(model.core))
    if model.exit_gate is not None:
        units["exit_gate"] = model.exit_gate
    units.update((f"coda.{j}", m) for j, m in enumerate(model.coda))
    if model.final_norm is not None:
        units["final_norm"] = model.final_norm
    if not cfg.tie_embeddings:
        units["unembed"] = model.unembed
    return units


def _module_device(module: nn.Module | nn.Parameter | None) -> torch.device | None:
    if module is None:
        return None
    if isinstance(module, torch.Tensor):
        return module.device
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return None


# ---------------------------------------------------------------------------- devices
def parse_device(value: Any, key: str = "") -> torch.device:
    """A ``device_map`` value as a torch device; an unknown or unavailable one raises naming ``key``."""
    where = f"device_map[{key!r}] = {value!r}"
    if isinstance(value, str) and value in ("disk", "meta"):
        raise InputError(f"{where}: tl_loop places weights on devices that hold them ('cpu', a GPU); "
                         f"{value!r} offloading is not supported")
    if isinstance(value, bool):
        raise InputError(f"{where} is not a device")
    try:
        device = torch.device("cuda", value) if isinstance(value, int) else torch.device(value)
    except (RuntimeError, TypeError, ValueError) as e:
        raise InputError(f"{where} is not a torch device: {e}") from None
    if device.type == "meta":
        raise InputError(f"{where}: the meta device holds no values; build the model under "
                         "`with torch.device('meta'):` for shapes only")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = 0 if device.index is None else device.index
        if index >= count:
            raise InputError(f"{where}: torch sees {count} CUDA device(s), so {device} is not available")
        device = torch.device("cuda", index)
    return device


# ---------------------------------------------------------------------------- resolving a map
def infer_device_map(
    model: Any,
    device_map: str | Mapping[str, Any] = "auto",
    max_memory: Mapping[Any, int | str] | None = None,
) -> dict[str, Any]:
    """Resolve ``device_map`` to one device per placement unit (``{unit: device}``, devices as
    given: an int GPU index, ``"cpu"``, ...) without allocating anything: the model may be on the
    meta device. A strategy name goes through accelerate (``get_balanced_memory`` for the
    balanced ones, then ``infer_auto_device_map``) with ``max_memory`` (default: what accelerate
    finds free); a dict is expanded over prefixes and checked (``check_device_map``)."""
    units = placement_units(model)
    if isinstance(device_map, str):
        if device_map not in STRATEGIES:
            raise InputError(f"device_map={device_map!r}: use one of {STRATEGIES} or a dict {{module: device}}")
        return _infer(model, units, device_map, max_memory)
    if max_memory is not None:
        raise InputError("max_memory applies to a device_map strategy ('auto', 'balanced', ...), not to a dict")
    if not isinstance(device_map, Mapping):
        raise InputError(f"device_map must be a dict {{module: device}} or one of {STRATEGIES}, "
                         f"got {type(device_map).__name__}")
    return expand_device_map(units, device_map)


def expand_device_map(units: Mapping[str, nn.Module], device_map: Mapping[str, Any]) -> dict[str, Any]:
    """``{unit: device}`` from a map whose keys are unit names or prefixes of them (the longest
    matching key wins); a key matching no unit, or a unit no key covers, raises naming it."""
    for key in device_map:
        if not isinstance(key, str):
            raise InputError(f"device_map keys are module names, got {key!r}")
        if not any(_covers(key, unit) for unit in units):
            hint = " (the unembedding is tied to the embedding: it follows 'embed')" if key == "unembed" else ""
            raise InputError(f"device_map names {key!r}, which is no module of this model{hint}; "
                             f"the modules are {list(units)}")
    resolved: dict[str, Any] = {}
    missing = []
    for unit in units:
        key = _most_specific(device_map, unit)
        if key is None:
            missing.append(unit)
            continue
        resolved[unit] = device_map[key]
    if missing:
        raise InputError(f"device_map places no device for {missing}; add them (or a prefix such as 'core', "
                         "or '' for the rest)")
    return resolved


def _covers(key: str, unit: str) -> bool:
    return key == "" or unit == key or unit.startswith(key + ".")


def _most_specific(device_map: Mapping[str, Any], unit: str) -> str | None:
    """The longest key of ``device_map`` that covers ``unit`` (None: no key does)."""
    return max((k for k in device_map if _covers(k, unit)), key=len, default=None)


def _infer(model: Any, units: Mapping[str, nn.Module], strategy: str, max_memory: Any) -> dict[str, Any]:
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    order = nn.Module()  # the units in execution order, without copying a weight
    for name, module in units.items():
        order.add_module(name.replace(".", "_"), module)
    no_split = sorted({type(m).__name__ for m in units.values()})
    dtype = getattr(model.cfg, "dtype", None)
    with warnings.catch_warnings(), _quiet_accelerate():
        warnings.simplefilter("ignore")
        if strategy != "sequential":
            max_memory = get_balanced_memory(order, max_memory, no_split_module_classes=no_split, dtype=dtype,
                                             low_zero=strategy == "balanced_low_0")
        found = infer_auto_device_map(order, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)
    by_attr = {name.replace(".", "_"): name for name in units}
    resolved = {}
    for unit_attr, unit in by_attr.items():
        key = _most_specific(found, unit_attr)
        if key is None:
            raise InputError(f"accelerate placed no device for {unit!r} (max_memory={max_memory!r})")
        value = found[key]
        if value == "disk":
            raise InputError(f"the weights do not fit max_memory={max_memory!r}: accelerate would offload {unit!r} "
                             "to disk, which tl_loop does not do; give more memory or more devices")
        resolved[unit] = value
    return resolved


class _quiet_accelerate:
    """Silence accelerate's per-device 'not available' log lines while it plans for devices
    that are named in ``max_memory`` but need not exist here."""

    def __enter__(self) -> None:
        self._logger = logging.getLogger("accelerate")
        self._level = self._logger.level
        self._logger.setLevel(logging.ERROR)

    def __exit__(self, *exc: Any) -> None:
        self._logger.setLevel(self._level)


def unit_of_key(key: str, units: Mapping[str, Any]) -> str:
    """The placement unit a state-dict key belongs to (``"core.3.attn.w_q"`` -> ``"core.3"``;
    learned positions and a tied head follow ``embed``, HRM's learned z_L ``inner.0``)."""
    head = key.split(".", 1)[0]
    if head in ("pos_embed", "unembed") and head not in units:
        return "embed"
    if head == "inner_init":
        return "inner.0"
    parts = key.split(".")
    for n in (2, 1):
        name = ".".join(parts[:n])
        if name in units:
            return name
    raise InputError(f"state-dict key {key!r} belongs to no placement unit {list(units)}")


def bytes_per_device(model: Any, resolved: Mapping[str, Any]) -> dict[torch.device, int]:
    """Bytes of weights each device of ``resolved`` holds (from shapes; the model may be on meta)."""
    units = placement_units(model)
    out: dict[torch.device, int] = {}
    for unit, value in resolved.items():
        device = parse_device(value, unit)
        module = units[unit]
        n = sum(p.numel() * p.element_size() for p in module.parameters())
        out[device] = out.get(device, 0) + n
    return out


# ---------------------------------------------------------------------------- placing
def place(model: Any, device_map: str | Mapping[str, Any], max_memory: Mapping[Any, int | str] | None = None) -> Any:
    """Move each unit of ``model`` to its device (see ``HookedLoopedTransformer.place``)."""
    resolved = infer_device_map(model, device_map, max_memory)
    devices = {unit: parse_device(value, unit) for unit, value in resolved.items()}
    units = placement_units(model)
    for unit, module in units.items():
        module.to(devices[unit])
    followers = [(model.pos_embed, devices["embed"])]
    if model.inner_init is not None and model.inner:
        followers.append((model.inner_init, devices["inner.0"]))
    for module, device in followers:
        if isinstance(module, nn.Parameter):
            module.data = module.data.to(device)
        elif module is not None:
            module.to(device)
    model._rotary_cache = {}
    from tl_loop.devices import sync_config

    sync_config(model)
    return model


def current_device_map(model: Any) -> dict[str, str]:
    """``{unit: device}`` read from where each unit's weights are now."""
    return {unit: str(_module_device(m)) for unit, m in placement_units(model).items()}


# ---------------------------------------------------------------------------- executing
class Placement:
    """Where each operation of a placed model computes: the device of the weights it uses
    (None: the operation uses no weights and runs where the frame is). Built from the weights
    themselves, so it is never stale (``sync_config`` rebuilds it after every move)."""

    def __init__(self, model: Any) -> None:
        self.embed = _module_device(model.embed)
        self.blocks = {f"{stage}.{j}": _module_device(m) for stage, stack in model._stacks().items()
                       for j, m in enumerate(stack)}
        self.adapter = _module_device(model.adapter)
        self.loop_norm = _module_device(model._loop_norm_weights)
        self.final_norm = _module_device(model.final_norm)
        self.exit_gate = _module_device(model.exit_gate)
        self.unembed = _module_device(model.embed if model.cfg.tie_embeddings else model.unembed)
        self.devices = sorted({str(d) for d in (self.embed, *self.blocks.values(), self.adapter, self.loop_norm,
                                                self.final_norm, self.exit_gate, self.unembed) if d is not None})

    @classmethod
    def of(cls, model: Any) -> "Placement | None":
        """The placement of a model over several devices; None when it sits on one."""
        placement = cls(model)
        return placement if len(placement.devices) > 1 else None

    def device_of(self, op: Op) -> torch.device | None:
        """The device ``op`` computes on (None: wherever the frame is)."""
        kind = op.kind
        if kind == "block":
            return self.blocks[op.layer.physical]  # type: ignore[attr-defined]
        if kind == "embed":
            return self.embed
        if kind == "inject":
            return self.adapter if op.how == "linear" else None  # type: ignore[attr-defined]
        if kind in ("state_out", "inner_out", "leave_loop"):
            return self.loop_norm if op.norm else None  # type: ignore[attr-defined]
        if kind == "exit_gate":
            return self.exit_gate
        if kind == "final_norm":
            return self.final_norm
        if kind == "unembed":
            return self.unembed
        return None


def move_frame(frame: RunFrame, device: torch.device) -> None:
    """Move every tensor of ``frame`` to ``device`` in place (a tensor held twice, such as the
    prelude output that is also the injection source, is moved once)."""
    moved: dict[int, torch.Tensor] = {}
    for name in RunFrame.TENSORS:
        t = getattr(frame, name)
        if t is None or t.device == device:
            continue
        if id(t) not in moved:
            moved[id(t)] = t.to(device)
        setattr(frame, name, moved[id(t)])


class ContextMover:
    """An attention context on a block's device: RoPE tables, padding, positions and a KV slot's
    row mask moved once per device and source tensor (memoised for the pass)."""

    def __init__(self) -> None:
        self._memo: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._contexts: dict[tuple[int, str], tuple[Any, Any]] = {}

    def tensor(self, t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
        if t is None or t.device == device:
            return t
        key = (id(t), str(device))
        hit = self._memo.get(key)
        if hit is None or hit[0] is not t:
            hit = self._memo[key] = (t, t.to(device))
        return hit[1]

    def context(self, context: Any, device: torch.device) -> Any:
        key = (id(context), str(device))
        hit = self._contexts.get(key)
        if hit is not None and hit[0] is context:
            return hit[1]
        rotary = context.rotary
        if rotary is not None:
            rotary = rotary._replace(**{f: self.tensor(getattr(rotary, f), device) for f in rotary._fields
                                        if isinstance(getattr(rotary, f), torch.Tensor)})
        kv = context.kv
        if kv is not None and getattr(kv, "valid", None) is not None:
            kv = dataclasses.replace(kv, valid=self.tensor(kv.valid, device))
        moved = dataclasses.replace(context, rotary=rotary, key_valid=self.tensor(context.key_valid, device),
                                    positions=self.tensor(context.positions, device), kv=kv, _bias_memo={})
        if context.kv is None:  # a KV context is one per block and call: not worth keeping
            self._contexts[key] = (context, moved)
        return moved
