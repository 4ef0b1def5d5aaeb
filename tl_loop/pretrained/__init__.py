"""Models trained by tl-loop and shipped inside the package (no download needed).

>>> from tl_loop import HookedLoopedTransformer
>>> model = HookedLoopedTransformer.from_pretrained("tl-loop/varbind-looped")  # doctest: +SKIP

``"tl-loop/<name>"`` always means a shipped model; the short ``"<name>"`` does too unless a local
folder of that name exists. Each folder holds ``config.json`` + ``model.safetensors`` (family
``tl_loop``), the character tokenizer, the recipe that trained it (``recipe.json``;
``python -m tl_loop.train recipe <name>`` retrains it) and its report (``REPORT.md``: loss curve,
held-out accuracy by hops x inference steps).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tl_loop.errors import CheckpointError

PRETRAINED_DIR = Path(__file__).resolve().parent
PREFIX = "tl-loop/"

#: name -> one-line description
MODELS: dict[str, str] = {
    "varbind-looped": "looped transformer (1 prelude + 1 recurrent + 1 coda layers, d_model 64) trained on "
    "multi-hop variable binding, one hop per recurrent step",
    "varbind-baseline": "feedforward baseline of varbind-looped: 8 layers of the same width, same data",
}


def available() -> dict[str, str]:
    """The shipped models, ``{"tl-loop/<name>": description}``."""
    return {PREFIX + name: text for name, text in MODELS.items()}


def resolve(name_or_path: str | Path) -> Path | None:
    """The folder of a shipped model, or None when ``name_or_path`` does not name one."""
    if isinstance(name_or_path, Path):
        return None
    name = str(name_or_path)
    if name.startswith(PREFIX):
        key = name[len(PREFIX):]
        if key not in MODELS:
            raise CheckpointError(f"no shipped model {name!r}; shipped: {sorted(available())}")
    elif name in MODELS and not Path(name).expanduser().exists():
        key = name
    else:
        return None
    folder = PRETRAINED_DIR / key
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"shipped model {key!r} is missing from {folder}: was the package installed "
                              f"with its data files? (retrain: python -m tl_loop.train recipe {key} --install)")
    return folder


def task_for(model: Any) -> Any:
    """The ``VarBindTask`` a shipped (or ``tl_loop.train``-trained) model was trained on."""
    from tl_loop.tasks.varbind import VarBindTask

    spec = dict(model.cfg.extra.get("task", {}))
    if spec.pop("name", None) != "varbind":
        raise ValueError("this model was not trained on a tl_loop task (cfg.extra['task'] is missing)")
    return VarBindTask(**spec)
