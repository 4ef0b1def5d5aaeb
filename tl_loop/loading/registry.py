"""Registry of checkpoint families: one loader module per family registers itself here."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from tl_loop.config import LoopedConfig
from tl_loop.errors import CheckpointError


@dataclass(frozen=True)
class Family:
    """How to read (and write) one family's Hugging Face checkpoints.

    ``detect(config_json, tensor_names)`` says whether a checkpoint belongs to the family;
    ``to_config(config_json, tensor_names, **options)`` builds our ``LoopedConfig``;
    ``convert(tensors, cfg)`` maps the checkpoint's state dict to ours through a
    ``StrictTensors`` (which lists missing and unused tensors); ``export(model)`` goes back to
    ``(config_json, tensors)`` in the family's own format, for ``save_pretrained``.
    """

    name: str
    detect: Callable[[Mapping[str, Any], set[str]], bool]
    to_config: Callable[..., LoopedConfig]
    convert: Callable[[Any, LoopedConfig], dict[str, torch.Tensor]]
    export: Callable[[Any], tuple[dict[str, Any], dict[str, torch.Tensor]]] | None = None
    description: str = ""


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    if family.name in _FAMILIES:
        raise ValueError(f"family {family.name!r} is already registered")
    _FAMILIES[family.name] = family
    return family


def get_family(name: str) -> Family:
    _ensure_builtin_families()
    try:
        return _FAMILIES[name]
    except KeyError:
        raise CheckpointError(f"unknown family {name!r}; known families: {sorted(_FAMILIES)}") from None


def families() -> dict[str, Family]:
    _ensure_builtin_families()
    return dict(_FAMILIES)


def detect_family(config_json: Mapping[str, Any], tensor_names: set[str]) -> Family:
    """The registered family a checkpoint belongs to (first match in registration order)."""
    _ensure_builtin_families()
    for family in _FAMILIES.values():
        if family.detect(config_json, tensor_names):
            return family
    raise CheckpointError(
        f"cannot tell which family this checkpoint belongs to (model_type="
        f"{config_json.get('model_type')!r}, architectures={config_json.get('architectures')!r}); "
        f"known families: {sorted(_FAMILIES)}. Pass family=... to choose one explicitly."
    )


def _ensure_builtin_families() -> None:
    # Importing the family modules registers them (kept lazy: `import tl_loop` defines only).
    import tl_loop.loading.families  # noqa: F401
