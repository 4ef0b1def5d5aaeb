"""Loading and saving real looped checkpoints (Hugging Face layout), one module per family.

>>> from tl_loop import HookedLoopedTransformer
>>> model = HookedLoopedTransformer.from_pretrained("path/to/huginn-0125")  # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tl_loop.config import LoopedConfig
from tl_loop.errors import CheckpointError, InputError, TlLoopError
from tl_loop.loading.atomic import replace_folder
from tl_loop.loading.files import (
    SAFETENSORS_FILE,
    TOKENIZER_FILES,
    load_tokenizer,
    read_config,
    check_index,
    read_tensors,
    resolve_checkpoint,
    weight_files,
)
from tl_loop.loading.lazy import LazyTensors, check_fits
from tl_loop.loading.registry import Family, detect_family, families, get_family, register_family
from tl_loop.loading.strict import StrictTensors, load_into
from tl_loop.tasks.tokenizer import TOKENIZER_FILE as CHAR_TOKENIZER_FILE

__all__ = [
    "load_pretrained",
    "save_pretrained",
    "write_checkpoint",
    "Family",
    "register_family",
    "get_family",
    "detect_family",
    "families",
    "StrictTensors",
]


def _parse_dtype(dtype: Any, stored: torch.dtype | None) -> torch.dtype:
    """The compute dtype: a floating torch dtype (or its name), ``None`` (float32) or ``"stored"``."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str) and dtype == "stored":
        return stored or torch.float32
    value = getattr(torch, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else dtype
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise InputError(
            f"dtype={dtype!r} is not a floating-point torch dtype; use None (float32), 'stored', "
            "'float32', 'bfloat16', 'float16' or a torch.dtype"
        )
    return value


def _parse_device(device: Any) -> str:
    if device is None:
        return "cpu"
    try:
        return str(torch.device(device))
    except (RuntimeError, TypeError) as e:
        raise InputError(f"device={device!r} is not a torch device: {e}") from None


def build_config(fam: Family, config_json: dict[str, Any], tensor_names: set[str], where: Path,
                 **options: Any) -> LoopedConfig:
    """``fam.to_config`` with every failure a ``CheckpointError`` naming ``where`` (config.json),
    and the step counts it asks for checked against ``max_steps`` before anything is built."""
    try:
        cfg = fam.to_config(config_json, tensor_names, **options)
    except TlLoopError:
        raise
    except (ValueError, TypeError, ArithmeticError, AttributeError, KeyError, IndexError) as e:
        raise CheckpointError(f"{where} describes a model tl_loop cannot build: {type(e).__name__}: {e}") from e
    for what, value in (("recurrent steps", cfg.n_steps), ("inner cycles per step", cfg.inner_cycles)):
        if value > cfg.max_steps:
            raise CheckpointError(
                f"{where} asks for {value} {what}, more than max_steps={cfg.max_steps}; fix the config"
            )
    return cfg


def load_pretrained(
    name_or_path: str | Path,
    *,
    family: str | None = None,
    n_steps: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    revision: str | None = None,
    allow_pickle: bool = False,
    check_memory: bool = True,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[Any, int | str] | None = None,
    **options: Any,
):
    """Load a checkpoint folder (or Hub id) as a ``HookedLoopedTransformer``.

    The model is built on the meta device and each tensor is read, converted to ``dtype`` and
    moved to ``device`` one at a time (``tl_loop.loading.lazy``), then assigned in place: peak
    memory is the loaded weights plus one tensor.

    Args:
        family: force a family instead of detecting it from ``config.json`` and the tensors.
        n_steps: default number of recurrent steps (else the checkpoint's own default).
        device: where the weights go (default ``"cpu"``); read straight onto it, tensor by tensor.
        dtype: compute dtype; default float32, ``"stored"`` keeps the checkpoint's dtype.
        allow_pickle: accept a ``.bin`` pickle checkpoint (loaded with ``weights_only=True``).
        check_memory: refuse (``CheckpointError`` with the numbers) when the weights clearly do
            not fit the device's free memory; activations come on top of the weights. With a
            ``device_map``, each device is checked for its own share.
        device_map: place the modules over several devices instead of ``device``: ``"auto"``,
            ``"balanced"``, ``"balanced_low_0"``, ``"sequential"`` (accelerate's planner within
            ``max_memory``) or ``{module: device}``; see ``tl_loop.placement``. The map is
            resolved on the meta model before any weight is read, and each checkpoint tensor is
            read straight onto the device of the module that takes it (``checkpoint_devices``);
            a conversion that cannot be traced on shapes runs in host memory instead.
        options: family-specific options (e.g. ``layout=`` for looping a feedforward model).
    """
    from tl_loop.model import HookedLoopedTransformer

    from tl_loop.pretrained import resolve as resolve_shipped  # "tl-loop/<name>": shipped in the package

    compute_dtype = None if isinstance(dtype, str) and dtype == "stored" else _parse_dtype(dtype, None)
    if device_map is not None and device is not None:
        raise InputError(f"pass device={device!r} or device_map=..., not both (device_map says where every module goes)")
    if device_map is None and max_memory is not None:
        raise InputError("max_memory applies with device_map='auto' / 'balanced' / 'sequential'")
    device = _parse_device(device)
    folder = resolve_shipped(name_or_path) or resolve_checkpoint(name_or_path, revision)
    config_json = read_config(folder)
    target = torch.device(device)
    if target.type == "meta":
        raise InputError("device='meta' cannot hold checkpoint values (the loader checks some); for shapes "
                         "only, build the model under `with torch.device('meta'):` from its config")
    files, weight_map, pickle = weight_files(folder, allow_pickle)
    if pickle:
        tensors = LazyTensors.from_dict(read_tensors(folder, allow_pickle=True), device=target)
    else:
        tensors = LazyTensors.from_files(files, device=target)
        check_index(folder, weight_map, {name: info.file for name, info in tensors.infos.items()}, pickle)
    fam = get_family(family) if family is not None else detect_family(config_json, set(tensors))
    cfg = build_config(fam, config_json, set(tensors), folder / "config.json", **options)
    cfg.dtype = tensors.dtype = compute_dtype or _parse_dtype("stored", tensors.stored_dtype())
    cfg.device = str(target)
    if device_map is not None:
        return _load_placed(folder, fam, cfg, tensors, device_map, max_memory, check_memory, n_steps)
    if check_memory:
        check_fits(tensors.loaded_bytes(), target, f"the weights of {folder} in {str(cfg.dtype).removeprefix('torch.')}")
    strict = StrictTensors(tensors)
    state_dict = fam.convert(strict, cfg)
    strict.finish()
    with torch.device("meta"):
        model = HookedLoopedTransformer(cfg, tokenizer=load_tokenizer(folder), init_weights=False)
    load_into(model, {k: _placed(v, target, cfg.dtype) for k, v in state_dict.items()}, assign=True)
    if n_steps is not None:
        model.set_n_steps(n_steps)
    return model


def _load_placed(folder: Path, fam: Family, cfg: LoopedConfig, tensors: LazyTensors, device_map: Any,
                 max_memory: Any, check_memory: bool, n_steps: int | None):
    """``load_pretrained`` with a ``device_map``: plan on the meta model, check each device's
    share, convert, and move each converted tensor to its module's device."""
    from tl_loop.model import HookedLoopedTransformer
    from tl_loop.placement import bytes_per_device, infer_device_map, parse_device, place, unit_of_key

    with torch.device("meta"):
        model = HookedLoopedTransformer(cfg, tokenizer=load_tokenizer(folder), init_weights=False)
    resolved = infer_device_map(model, device_map, max_memory)
    devices = {unit: parse_device(value, unit) for unit, value in resolved.items()}
    if check_memory:
        for device, n in bytes_per_device(model, resolved).items():
            check_fits(n, device, f"the share of {folder}'s weights placed on {device} "
                                   f"(in {str(cfg.dtype).removeprefix('torch.')})")
    tensors.device_of = checkpoint_devices(fam, cfg, tensors, devices) or {}
    if check_memory and not tensors.device_of:
        check_fits(tensors.loaded_bytes(), "cpu", f"the weights of {folder}, converted in host memory before "
                                                  "each goes to its device,")
    strict = StrictTensors(tensors)
    state_dict = fam.convert(strict, cfg)
    strict.finish()
    placed = {}
    for key in list(state_dict):
        placed[key] = _placed(state_dict.pop(key), devices[unit_of_key(key, devices)], cfg.dtype)
    load_into(model, placed, assign=True)
    place(model, resolved)
    if n_steps is not None:
        model.set_n_steps(n_steps)
    return model


def checkpoint_devices(fam: Family, cfg: LoopedConfig, tensors: LazyTensors,
                       devices: dict[str, torch.device]) -> dict[str, torch.device] | None:
    """Checkpoint name -> the device of the module that takes it, found by running the family's
    conversion on shapes only (``LazyTensors.traced``: no data read) and following each converted
    tensor back to the checkpoint tensors it is computed from. None when the conversion needs
    values, or a checkpoint tensor feeds modules on two devices (then the loader converts in host
    memory and moves each result)."""
    from tl_loop.placement import unit_of_key

    try:
        with torch.no_grad():
            converted = fam.convert(StrictTensors(tensors.traced()), cfg)
    except Exception:  # a conversion that looks at values: no plan, stage on the host instead
        return None
    out: dict[str, torch.device] = {}
    for key, value in converted.items():
        device = devices[unit_of_key(key, devices)]
        for name in getattr(value, "sources", ()):
            if out.setdefault(name, device) != device:
                return None  # one checkpoint tensor feeds modules on two devices: convert on the host
    return out


def _placed(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` on ``device`` (floating ones in ``dtype``), contiguous, as a model parameter needs;
    a no-op for the tensors the lazy reader already placed."""
    tensor = tensor.to(device, dtype) if tensor.is_floating_point() else tensor.to(device)
    return tensor.contiguous()


def save_pretrained(model: Any, folder: str | Path, family: str | None = None) -> Path:
    """Write ``model`` in its family's own format (``config.json`` + ``model.safetensors`` and the
    tokenizer), atomically: a failed save leaves an earlier checkpoint in ``folder`` loadable, and
    that checkpoint's weight, index and tokenizer files never survive next to the new ones (see
    ``tl_loop.loading.atomic``). A model of no registered family is saved in tl-loop's own format."""
    folder = Path(folder)
    with replace_folder(folder, owned=is_checkpoint_file) as staging:
        write_checkpoint(model, staging, family)
    return folder


def write_checkpoint(model: Any, folder: Path, family: str | None = None) -> None:
    """Write ``model``'s checkpoint files into the existing folder ``folder`` (not atomic)."""
    from safetensors.torch import save_file

    from tl_loop.loading import registry  # ``families`` here is shadowed by the subpackage

    name = family or model.cfg.family
    if family is None and name not in registry.families():
        name = "tl_loop"  # a model built from a LoopedConfig (family "custom")
    fam = get_family(name)
    if fam.export is None:
        raise CheckpointError(f"family {fam.name!r} cannot be saved")
    config_json, tensors = fam.export(model)
    (folder / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True))
    save_file({k: v.detach().contiguous().clone().cpu() for k, v in tensors.items()}, str(folder / SAFETENSORS_FILE))
    if getattr(model, "tokenizer", None) is not None and hasattr(model.tokenizer, "save_pretrained"):
        model.tokenizer.save_pretrained(str(folder))


def is_checkpoint_file(name: str) -> bool:
    """Whether a file name belongs to a checkpoint (replaced, never kept, when one is saved)."""
    return (name == "config.json" or name.endswith((".safetensors", ".safetensors.index.json", ".bin",
                                                     ".bin.index.json"))
            or name in TOKENIZER_FILES or name == CHAR_TOKENIZER_FILE)
