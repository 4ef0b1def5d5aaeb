"""Loading and saving real looped checkpoints (Hugging Face layout), one module per family.

>>> from tl_loop import HookedLoopedTransformer
>>> model = HookedLoopedTransformer.from_pretrained("path/to/huginn-0125")  # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tl_loop.errors import CheckpointError, InputError
from tl_loop.loading.files import load_tokenizer, read_config, read_tensors, resolve_checkpoint, safetensors_files
from tl_loop.loading.lazy import LazyTensors, check_fits
from tl_loop.loading.registry import Family, detect_family, families, get_family, register_family
from tl_loop.loading.strict import StrictTensors, load_into

__all__ = [
    "load_pretrained",
    "save_pretrained",
    "Family",
    "register_family",
    "get_family",
    "detect_family",
    "families",
    "StrictTensors",
]


def _parse_dtype(dtype: Any, stored: torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if dtype == "stored":
        return stored or torch.float32
    if isinstance(dtype, str):
        value = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(value, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}")
        return value
    return dtype


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
            not fit the device's free memory; activations come on top of the weights.
        options: family-specific options (e.g. ``layout=`` for looping a feedforward model).
    """
    from tl_loop.model import HookedLoopedTransformer

    from tl_loop.pretrained import resolve as resolve_shipped  # "tl-loop/<name>": shipped in the package

    folder = resolve_shipped(name_or_path) or resolve_checkpoint(name_or_path, revision)
    config_json = read_config(folder)
    target = torch.device(device if device is not None else "cpu")
    if target.type == "meta":
        raise InputError("device='meta' cannot hold checkpoint values (the loader checks some); for shapes "
                         "only, build the model under `with torch.device('meta'):` from its config")
    files = safetensors_files(folder)
    tensors = (LazyTensors.from_files(files, device=target) if files
               else LazyTensors.from_dict(read_tensors(folder, allow_pickle=allow_pickle), device=target))
    fam = get_family(family) if family is not None else detect_family(config_json, set(tensors))
    cfg = fam.to_config(config_json, set(tensors), **options)
    cfg.dtype = tensors.dtype = _parse_dtype(dtype, tensors.stored_dtype())
    cfg.device = str(target)
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


def _placed(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` on ``device`` (floating ones in ``dtype``), contiguous, as a model parameter needs;
    a no-op for the tensors the lazy reader already placed."""
    tensor = tensor.to(device, dtype) if tensor.is_floating_point() else tensor.to(device)
    return tensor.contiguous()


def save_pretrained(model: Any, folder: str | Path, family: str | None = None) -> Path:
    """Write ``model`` in its family's own format (``config.json`` + ``model.safetensors``)."""
    from safetensors.torch import save_file

    fam = get_family(family or model.cfg.family)
    if fam.export is None:
        raise CheckpointError(f"family {fam.name!r} cannot be saved")
    config_json, tensors = fam.export(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True))
    save_file({k: v.detach().contiguous().clone().cpu() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    if getattr(model, "tokenizer", None) is not None and hasattr(model.tokenizer, "save_pretrained"):
        model.tokenizer.save_pretrained(str(folder))
    return folder
