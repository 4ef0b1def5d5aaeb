"""Activation caches on disk: one safetensors file per hook kind, reopened lazily.

A 132-layer cache of Huginn holds ~0.7 GB per hook kind per batch row at 512 tokens, so caches
are written per *kind* (the hook name with its layer / step indices taken out:
``blocks.attn.hook_pattern`` holds ``blocks.{i}.attn.hook_pattern`` of every layer) into one
folder, with a manifest (``cache.json``) recording the step count, the schedule (the label of
every effective layer) and the model it came from. Saving into a folder that already holds a
cache of the same model and schedule adds the new kinds, so a cache too large to hold can be
built one kind at a time::

    for kind in ["hook_resid_post", "attn.hook_pattern"]:
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith(kind), device="cpu")
        cache.save("run1")
    cache = LoopedActivationCache.load("run1", model)    # reads nothing yet
    cache["blocks.7.hook_resid_post"]                    # reads the hook_resid_post file only

The safetensors files also carry the step count and schedule in their metadata, so each one is
self-describing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import torch

from tl_loop.errors import InputError

MANIFEST = "cache.json"
FORMAT = "tl_loop.cache/1"
_INDEX = re.compile(r"\.\d+(?=\.|$)")


def hook_kind(name: str) -> str:
    """``blocks.5.attn.hook_z`` -> ``blocks.attn.hook_z``; ``loops.2.hook_state_out`` -> ``loops.hook_state_out``."""
    return _INDEX.sub("", name)


def _describe(cache: Any) -> dict[str, Any]:
    model = cache.model
    return {
        "format": FORMAT,
        "n_steps": model.n_steps,
        "schedule": [layer.label for layer in model.schedule],
        "has_batch_dim": cache.has_batch_dim,
        "model_name": model.cfg.model_name,
        "family": model.cfg.family,
    }


def _check_same_run(found: dict[str, Any], expected: dict[str, Any], where: Path) -> None:
    for key in ("format", "n_steps", "schedule", "has_batch_dim", "model_name", "family"):
        if found.get(key) != expected.get(key):
            shown = (lambda v: f"{len(v)} layers ({v[0]}..{v[-1]})" if isinstance(v, list) and v else repr(v))
            raise InputError(
                f"{where} holds a cache with {key} = {shown(found.get(key))}, this one has "
                f"{shown(expected.get(key))}; save to another folder"
            )


def save_cache(cache: Any, path: str | Path, overwrite: bool = False) -> Path:
    """Write ``cache`` into the folder ``path``, one safetensors file per hook kind."""
    from safetensors.torch import save_file

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    meta = _describe(cache)
    manifest_path = folder / MANIFEST
    kinds: dict[str, list[str]] = {}
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        _check_same_run(old, meta, folder)
        kinds = old["kinds"]
    new: dict[str, dict[str, torch.Tensor]] = {}
    for name in cache.cache_dict.keys():
        new.setdefault(hook_kind(name), {})[name] = cache.cache_dict[name]
    clash = sorted(k for k in new if k in kinds)
    if clash and not overwrite:
        raise InputError(f"{folder} already holds the hook kinds {clash}; pass overwrite=True to replace them")
    file_meta = {k: json.dumps(v) for k, v in meta.items()}
    for kind, tensors in new.items():
        save_file({n: t.detach().contiguous().cpu() for n, t in tensors.items()},
                  str(folder / f"{kind}.safetensors"), metadata=file_meta)
        kinds[kind] = list(tensors)
    manifest_path.write_text(json.dumps({**meta, "kinds": kinds}, indent=1))
    return folder


class LazyCacheDict(MutableMapping[str, torch.Tensor]):
    """Hook name -> activation, each hook kind's file read on the first access to one of its
    names (and kept); written entries stay in memory."""

    def __init__(self, folder: Path, kinds: dict[str, list[str]], device: str | torch.device | None) -> None:
        self.folder, self.device = folder, device
        self._kind_of = {name: kind for kind, names in kinds.items() for name in names}
        self._loaded: dict[str, torch.Tensor] = {}
        self._read: set[str] = set()

    def _read_kind(self, kind: str) -> None:
        from safetensors.torch import load_file

        tensors = load_file(str(self.folder / f"{kind}.safetensors"), device=str(self.device or "cpu"))
        for name, t in tensors.items():
            self._loaded.setdefault(name, t)
        self._read.add(kind)

    def loaded_kinds(self) -> set[str]:
        """The hook kinds read from disk so far."""
        return set(self._read)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._loaded:
            kind = self._kind_of.get(name)
            if kind is None:
                raise KeyError(name)
            self._read_kind(kind)
        return self._loaded[name]

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        self._kind_of.setdefault(name, hook_kind(name))
        self._loaded[name] = value

    def __delitem__(self, name: str) -> None:
        del self._kind_of[name]
        self._loaded.pop(name, None)

    def __iter__(self) -> Iterator[str]:
        return iter(self._kind_of)

    def __len__(self) -> int:
        return len(self._kind_of)

    def __contains__(self, name: object) -> bool:
        return name in self._kind_of


def load_cache(cls: type, path: str | Path, model: Any, device: str | torch.device | None = None) -> Any:
    """Reopen a cache saved by :func:`save_cache`, bound to ``model`` at the saved depth (lazily)."""
    folder = Path(path)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise InputError(f"{folder} holds no saved cache (no {MANIFEST})")
    found = json.loads(manifest_path.read_text())
    if found.get("format") != FORMAT:
        raise InputError(f"{manifest_path}: format {found.get('format')!r}, expected {FORMAT!r}")
    from tl_loop.cache import ModelAtSteps

    at = ModelAtSteps(model, int(found["n_steps"]))
    expected = {**found, "schedule": [layer.label for layer in at.schedule],
                "model_name": model.cfg.model_name, "family": model.cfg.family}
    _check_same_run(found, expected, folder)
    missing = [k for k in found["kinds"] if not (folder / f"{k}.safetensors").is_file()]
    if missing:
        raise InputError(f"{folder} lacks the files of the hook kinds {missing}")
    return cls(LazyCacheDict(folder, found["kinds"], device), at, has_batch_dim=found["has_batch_dim"])
