"""tl-loop's own checkpoint format: any ``LoopedConfig`` with our state-dict names.

``config.json`` is ``{"model_type": "tl_loop", "architectures": ["HookedLoopedTransformer"],
"tl_loop_config": LoopedConfig.to_dict()}`` and ``model.safetensors`` holds ``model.state_dict()``
as it is. This is the format of the models trained by ``tl_loop.train`` and shipped in
``tl_loop/pretrained``; ``save_pretrained(model, folder, family="tl_loop")`` writes it for any
model. Loader options override config fields (e.g. ``max_steps=``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from tl_loop.config import LoopedConfig
from tl_loop.errors import CheckpointError
from tl_loop.loading.registry import Family, register_family
from tl_loop.loading.strict import StrictTensors

FAMILY = "tl_loop"
CONFIG_KEY = "tl_loop_config"


def detect(config_json: Mapping[str, Any], tensor_names: set[str]) -> bool:
    return config_json.get("model_type") == FAMILY


def to_config(config_json: Mapping[str, Any], tensor_names: set[str], **options: Any) -> LoopedConfig:
    if CONFIG_KEY not in config_json:
        raise CheckpointError(f"a tl_loop config.json needs a {CONFIG_KEY!r} entry")
    if not isinstance(config_json[CONFIG_KEY], Mapping):
        raise CheckpointError(f"tl_loop config.json: {CONFIG_KEY!r} must be an object, got {config_json[CONFIG_KEY]!r}")
    values = dict(config_json[CONFIG_KEY])
    values.update(options)
    values["family"] = FAMILY
    try:
        return LoopedConfig.from_dict(values)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"invalid tl_loop config: {e}") from e


def convert(tensors: StrictTensors, cfg: LoopedConfig) -> dict[str, torch.Tensor]:
    """Our names already: every tensor is taken (``load_into`` checks them against the model)."""
    return {name: tensors.take(name) for name in sorted(tensors.names())}


def export(model: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    cfg = model.cfg.to_dict()
    cfg.pop("device", None)
    cfg["family"] = FAMILY
    config_json = {"model_type": FAMILY, "architectures": ["HookedLoopedTransformer"], CONFIG_KEY: cfg}
    return config_json, dict(model.state_dict())


NATIVE = register_family(
    Family(
        name=FAMILY,
        detect=detect,
        to_config=to_config,
        convert=convert,
        export=export,
        description="tl-loop's own format: LoopedConfig + our state dict (trained and shipped models)",
    )
)
