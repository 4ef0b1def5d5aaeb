"""TransformerLens's analysis tools (``transformer_lens.tools.analysis``) on looped models.

The tools address layers by effective index (``blocks.{i}``), so they run across every step of
the loop unchanged. Two things they cannot know, this module supplies:

* **Where a result sits in the loop.** :func:`loop_label` turns a TransformerLens label
  (``"5_attn_out"``, ``"L5H2"``, ``"5_pre"``) or an attribution ``Node`` into one naming the
  stage, step and layer of the cycle (``"core.2.0_attn_out"``: step 2, layer 0 of the cycle);
  :func:`node_scores_by_step` lays node attribution scores out as ``[step, layer_in_cycle, ...]``.
* **Whether a tool's assumption holds.** Edge attribution patching, ``faithfulness`` and
  ``get_act_patch_direct_path`` rebuild a reader's input as the *sum* of the writers before it
  (embedding, head and MLP outputs). A looped layout breaks that where something other than a
  residual add sits between writer and reader: a norm between steps or after the loop, Huginn's
  sandwich norms, an injection of the prelude output at every step, an initial state that is not
  the prelude output, HRM's inner state. :func:`additive_residual_obstruction` names the feature;
  the checked wrappers :func:`attribution_patch`, :func:`faithfulness` and
  :func:`get_act_patch_direct_path` refuse (``UnsupportedError``) instead of returning scores for
  a graph the model does not compute. Node attribution, the logit lens and direct logit
  attribution need no such assumption (they read gradients and tl-loop's exact cache
  decompositions) and run on every layout.

Every other tool of ``transformer_lens.tools.analysis`` is used as it is; see the README's
"TransformerLens analysis tools" table for which are exact on looped layouts.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from jaxtyping import Float

from tl_loop.errors import UnsupportedError
from tl_loop.threads import exclusive

#: TransformerLens result labels that carry an effective layer: ``L{i}H{h}`` and ``{i}_{what}``.
_LABEL = re.compile(r"^(?:L(?P<l>\d+)H(?P<h>\d+)|(?P<layer>\d+)_(?P<rest>\w+))$")


def _effective_label(model: Any, index: int) -> str:
    schedule = model.schedule
    if not 0 <= index < len(schedule):
        raise IndexError(f"effective layer {index} out of range: the model has {len(schedule)} at n_steps={schedule.n_steps}")
    return schedule[index].label


def loop_label(model: Any, label: Any) -> str:
    """A TransformerLens label or ``Node`` named by its place in the loop.

    ``"{i}_{what}"`` -> ``"{stage label}_{what}"``, ``"L{i}H{h}"`` -> ``"{stage label}.H{h}"``;
    labels without a layer (``"embed"``, ``"final_post"``, ``"bias"``) are returned unchanged.
    A stage label is ``prelude.{j}``, ``core.{step}.{j}``, ``inner.{step}.{cycle}.{j}`` or
    ``coda.{j}`` (``tl_loop.schedule.EffectiveLayer.label``).

    >>> from tl_loop import HookedLoopedTransformer, LoopedConfig
    >>> model = HookedLoopedTransformer(LoopedConfig(n_prelude_layers=1, n_core_layers=2, n_steps=3, d_vocab=10))
    >>> [loop_label(model, x) for x in ["embed", "0_attn_out", "L3H1", "6_pre"]]
    ['embed', 'prelude.0_attn_out', 'core.1.0.H1', 'core.2.1_pre']
    """
    if hasattr(label, "kind") and hasattr(label, "position"):  # an attribution Node
        where = "" if label.layer is None else _effective_label(model, label.layer)
        where += "" if label.head is None else f".H{label.head}"
        return f"{where} {label.kind}@{label.position}".lstrip()
    match = _LABEL.match(str(label))
    if match is None:
        return str(label)
    if match["l"] is not None:
        return f"{_effective_label(model, int(match['l']))}.H{match['h']}"
    return f"{_effective_label(model, int(match['layer']))}_{match['rest']}"


def node_scores_by_step(
    model: Any, result: Any, kind: str = "attn_head_out", position: int = -1
) -> Float[torch.Tensor, "step layer_in_cycle ..."]:
    """Node attribution scores of one node kind at one position, laid out over the loop.

    ``result`` is an ``AttributionResult``. ``kind="attn_head_out"`` gives
    ``[step, layer_in_cycle, head]``; ``"mlp_out"`` gives ``[step, layer_in_cycle]``. Nodes hold
    absolute positions; a negative ``position`` counts back from the last position scored.
    """
    nodes = [n for n in result.node_scores if n.kind == kind]
    if not nodes:
        raise UnsupportedError(f"the attribution result scores no {kind!r} nodes")
    if position < 0:
        position = max(n.position for n in nodes) + 1 + position
    schedule = model.schedule
    n_heads = model.cfg.n_heads if kind == "attn_head_out" else None
    shape = (schedule.n_steps, schedule.layers_per_step) + ((n_heads,) if n_heads else ())
    out = torch.full(shape, float("nan"))
    for node in nodes:
        layer = schedule[node.layer]
        if node.position != position or layer.step is None:
            continue
        idx = (layer.step, layer.layer_in_cycle) + ((node.head,) if n_heads else ())
        out[idx] = result.node_scores[node]
    return out


def additive_residual_obstruction(model: Any) -> str | None:
    """Why the residual stream entering a block is *not* the sum of the embedding and every
    earlier attention / MLP output of this forward pass (``None`` when it is)."""
    cfg = model.cfg
    reasons = []
    if cfg.resid_norm:
        reasons.append("the stream is normalised after every residual add (sandwich norms)")
    if cfg.output_norm:
        reasons.append("each sublayer output is normalised before the add")
    if cfg.norm_between_steps:
        reasons.append("the recurrent state is normalised between steps")
    if cfg.norm_after_loop:
        reasons.append("the state is normalised after the loop")
    if cfg.injection != "none":
        reasons.append(f"the prelude output is injected at every step (injection={cfg.injection!r})")
    if cfg.state_init != "prelude":
        reasons.append(f"the initial state is not the prelude output (state_init={cfg.state_init!r})")
    if cfg.n_inner_layers:
        reasons.append("the inner (HRM) stack runs on its own state")
    if cfg.positional_embedding_type != "rotary":
        reasons.append("learned position embeddings (hook_pos_embed) are no writer of the tools' graph")
    return "; ".join(reasons) or None


def require_additive_residual(model: Any, tool: str) -> None:
    """Raise ``UnsupportedError`` if ``tool``'s sum-of-writers graph is not what the model computes."""
    reason = additive_residual_obstruction(model)
    if reason is not None:
        raise UnsupportedError(
            f"{tool} rebuilds each reader's input as the sum of the writers before it, which this looped layout "
            f"does not compute: {reason}. Node-level attribution_patch, logit_lens and direct_logit_attribution "
            f"are exact on this layout; activation patching (transformer_lens.patching, tl_loop.patching) "
            f"measures edges without this assumption"
        )


@exclusive
def attribution_patch(model: Any, clean: Any, corrupt: Any, metric_fn: Any, config: Any = None) -> Any:
    """``transformer_lens.tools.analysis.attribution_patch``, refusing edge granularity where
    the looped layout is not a sum of writers (node granularity runs on every layout)."""
    from transformer_lens.tools.analysis import EdgeAttributionConfig
    from transformer_lens.tools.analysis import attribution_patch as tl_attribution_patch

    config = EdgeAttributionConfig() if config is None else config
    if config.granularity == "edge":
        require_additive_residual(model, "edge attribution patching")
    return tl_attribution_patch(model, clean, corrupt, metric_fn, config)


@exclusive
def faithfulness(model: Any, clean: Any, corrupt: Any, metric_fn: Any, circuit: Any, config: Any = None, **kwargs: Any) -> Any:
    """``transformer_lens.tools.analysis.faithfulness``, refused where the looped layout is not a
    sum of writers (it ablates edges by rebuilding each reader's input from the writers)."""
    from transformer_lens.tools.analysis import FaithfulnessConfig
    from transformer_lens.tools.analysis import faithfulness as tl_faithfulness

    require_additive_residual(model, "faithfulness")
    return tl_faithfulness(model, clean, corrupt, metric_fn, circuit, FaithfulnessConfig() if config is None else config, **kwargs)


@exclusive
def get_act_patch_direct_path(model: Any, *args: Any, **kwargs: Any) -> Float[torch.Tensor, "n_layers n_heads"]:
    """``transformer_lens.patching.get_act_patch_direct_path``, refused where the looped layout
    is not a sum of writers (it adds a head's write to a later head's pre-norm input)."""
    from transformer_lens import patching

    require_additive_residual(model, "get_act_patch_direct_path")
    return patching.get_act_patch_direct_path(model, *args, **kwargs)
