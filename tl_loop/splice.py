"""Splicing a module into the loop: ``model.splice(hook, module, layer_in_cycle=None)``.

A spliced module (an SAE, a transcoder, a steering vector: any ``nn.Module`` mapping an
activation to one of the same shape) runs on the activation arriving at a hook point, and its
output replaces that activation; the host hook point then fires on the replaced value. It runs at
every effective layer that has the hook (or at layer ``layer_in_cycle`` of the cycle at every
step), or at every step for a loop hook (``"hook_state_out"`` -> ``loops.{r}.hook_state_out``).

How the pieces connect:

* The module is stored once (``Splice.module``), never copied: its weights are the caller's and
  stay out of the model's ``state_dict``.
* Each place it runs is a ``SpliceSite`` holding one ``LoopHookPoint`` per ``HookPoint`` of the
  module, registered under the host's name: an SAE's ``hook_sae_acts_post`` spliced at
  ``blocks.5.hook_resid_post`` is ``blocks.5.hook_resid_post.hook_sae_acts_post``. So every
  site's activations are cached, patched and hooked like any other hook point.
* While a site runs the module, a forward hook on each of the module's own hook points hands the
  activation to the site's copy (whose hooks may replace it), so the module needs no adapter.
* Sites are kept per host hook point, and host hook points are kept per name across depths
  (``tl_loop.model``), so hooks on a site's points follow depth changes like any other.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from transformer_lens.hook_points import HookPoint

from tl_loop.components.base import LoopHookPoint, all_hook_points
from tl_loop.errors import InputError


class Splice:
    """One ``model.splice(...)`` call: a module, where it runs, and its sites."""

    def __init__(self, hook: str, module: nn.Module, layer_in_cycle: int | None) -> None:
        self.hook, self.module, self.layer_in_cycle = hook, module, layer_in_cycle
        self.paths = [name for name, m in module.named_modules() if isinstance(m, HookPoint) and name]
        self.sites: dict[int, tuple[nn.Module, SpliceSite]] = {}  # id(host) -> (host, site)
        self.active: list[SpliceSite] = []
        self._handles = [
            m.register_forward_hook(self._route(name))
            for name, m in module.named_modules()
            if isinstance(m, HookPoint) and name
        ]

    def _route(self, path: str) -> Any:
        def route(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
            return self.active[-1].points[path](output) if self.active else None

        return route

    def site(self, host: nn.Module, host_name: str) -> "SpliceSite":
        key = id(host)
        if key not in self.sites:
            self.sites[key] = (host, SpliceSite(self, host_name))
        return self.sites[key][1]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def __repr__(self) -> str:
        where = "every effective layer" if self.layer_in_cycle is None else f"layer_in_cycle={self.layer_in_cycle}"
        return f"Splice({self.hook!r}, {type(self.module).__name__}, {where})"


class SpliceSite:
    """The module at one hook point: its own copies of the module's hook points."""

    def __init__(self, splice: Splice, host_name: str) -> None:
        self.splice, self.host_name = splice, host_name
        self.points = {path: LoopHookPoint() for path in splice.paths}
        self.children: dict[str, nn.Module] = {}  # top-level children registered on the host
        self.attached = False
        for path, point in self.points.items():
            *parents, leaf = path.split(".")
            container: Any = self.children
            for part in parents:
                if part not in container:
                    container[part] = nn.Module()
                parent = container[part]
                container = parent._modules
            container[leaf] = point

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.splice.active.append(self)
        try:
            out = self.splice.module(x)
        finally:
            self.splice.active.pop()
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            raise InputError(
                f"the module spliced at {self.host_name} ({type(self.splice.module).__name__}) must return a tensor "
                f"shaped like its input {tuple(x.shape)}, got {tuple(getattr(out, 'shape', ())) or type(out).__name__}"
            )
        return out


def _suffixes(pool: list[nn.Module]) -> set[str]:
    """Hook names below the first view of a pool (every view of a pool has the same)."""
    return {name for name, _ in all_hook_points(pool[0], "")} if pool else set()


def host_names(model: Any, splice: Splice) -> list[str]:
    """The hook names the splice runs at, at the model's current depth."""
    hook, layer_in_cycle = splice.hook, splice.layer_in_cycle
    if hook in _suffixes(model._block_pool):
        schedule = model.schedule
        if layer_in_cycle is None:
            indices = range(len(schedule))
        else:
            indices = schedule.loop_indices(layer_in_cycle) if schedule.n_steps else []
        names = [f"blocks.{i}.{hook}" for i in indices]
    elif hook in _suffixes(model._loop_pool):
        names = [f"loops.{r}.{hook}" for r in range(model.cfg.n_steps)]
    else:
        names = [hook]
    return [name for name in names if isinstance(_lookup(model, name), HookPoint)]


def _lookup(model: Any, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def check_splice(model: Any, hook: str, module: Any, layer_in_cycle: int | None) -> Splice:
    """Validate a ``model.splice`` call and build its ``Splice``."""
    if not isinstance(module, nn.Module):
        raise InputError(f"splice needs an nn.Module, got {type(module).__name__}")
    if not isinstance(hook, str):
        raise InputError(f"splice's hook must be a hook name or suffix (a str), got {hook!r}")
    block_suffixes, loop_suffixes = _suffixes(model._block_pool), _suffixes(model._loop_pool)
    known = hook in block_suffixes or hook in loop_suffixes or isinstance(_lookup(model, hook), HookPoint)
    if not known:
        import difflib

        close = difflib.get_close_matches(hook, sorted(block_suffixes | loop_suffixes | set(model.hook_dict)), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise InputError(
            f"splice: {hook!r} is no hook point, block hook suffix (e.g. 'hook_resid_post') or loop hook suffix "
            f"(e.g. 'hook_state_out') of this model{hint}"
        )
    if layer_in_cycle is not None:
        if hook not in block_suffixes:
            raise InputError(f"splice: layer_in_cycle applies to block hooks, not to {hook!r}")
        if isinstance(layer_in_cycle, bool) or not isinstance(layer_in_cycle, int) or not (
            0 <= layer_in_cycle < model.cfg.layers_per_step
        ):
            raise InputError(
                f"splice: layer_in_cycle must be an int in [0, {model.cfg.layers_per_step}), got {layer_in_cycle!r}"
            )
    splice = Splice(hook, module, layer_in_cycle)
    for other in model._splices:
        if other.hook == hook and set(other.paths) & set(splice.paths) and (
            other.layer_in_cycle is None or layer_in_cycle is None or other.layer_in_cycle == layer_in_cycle
        ):
            splice.remove()
            raise InputError(
                f"splice: {other!r} already registers hook points {sorted(set(other.paths) & set(splice.paths))} at "
                f"{hook!r}; unsplice it first"
            )
    return splice


def _detach(host: nn.Module, site: SpliceSite) -> None:
    host.splices = tuple(s for s in host.splices if s is not site)
    for name, child in site.children.items():
        if host._modules.get(name) is child:
            del host._modules[name]
    site.attached = False


def attach_splices(model: Any) -> None:
    """Put every splice's sites on the host hook points of the model's current depth and take
    them off the visible hosts it no longer runs at (hosts hidden with a deeper layer keep
    theirs). Called whenever the depth or the splices change."""
    for splice in model._removed_splices:
        for host, site in splice.sites.values():
            _detach(host, site)
        splice.remove()
    model._removed_splices = []
    visible = {id(m) for m in model.modules()}
    for splice in model._splices:
        targets = {id(model.get_submodule(name)): name for name in host_names(model, splice)}
        for key, (host, site) in list(splice.sites.items()):
            if site.attached and key in visible and key not in targets:
                _detach(host, site)
        for key, name in targets.items():
            host = model.get_submodule(name)
            site = splice.site(host, name)
            if not site.attached:
                host._modules.update(site.children)
                host.splices = (*host.splices, site)
                site.attached = True


def detached_site_points(model: Any) -> list[tuple[str, nn.Module]]:
    """Hook points of sites not on any host now (their hooks must not be lost from view)."""
    return [
        (f"{site.host_name}.{path}", point)
        for splice in model._splices
        for _, site in splice.sites.values()
        if not site.attached
        for path, point in site.points.items()
    ]
