"""Hook-name vocabulary of ``HookedLoopedTransformer`` and helpers to build and parse names.

The recurrence is unrolled: effective layer ``i`` (``0 <= i < cfg.n_layers``) is the ``i``-th
block *executed*, so a block of the recurrent stack appears once per step, under its own
index. ``model.schedule`` maps ``i`` to (stage, step, layer-in-cycle, physical block).

Per effective layer ``i`` (TransformerLens names and shapes; fire in this order)::

    blocks.{i}.hook_resid_pre           [batch, pos, d_model]  block input
    blocks.{i}.ln1.hook_scale           [batch, pos, 1]        pre-attention norm (pre_norm)
    blocks.{i}.ln1.hook_normalized      [batch, pos, d_model]
    blocks.{i}.attn.hook_q / hook_k / hook_v   [batch, pos, head, d_head]  (k, v: kv heads)
    blocks.{i}.attn.hook_rot_q / hook_rot_k    [batch, pos, head, d_head]  after RoPE
    blocks.{i}.attn.hook_attn_scores    [batch, head, query_pos, key_pos]  masked, pre-softmax (float32 in 16-bit models)
    blocks.{i}.attn.hook_pattern        [batch, head, query_pos, key_pos]
    blocks.{i}.attn.hook_z              [batch, pos, head, d_head]
    blocks.{i}.attn.hook_result         [batch, pos, head, d_model]  (cfg.use_attn_result)
    blocks.{i}.ln1_post.hook_scale / hook_normalized   norm of the attention output (output_norm)
    blocks.{i}.hook_attn_out            [batch, pos, d_model]  what attention adds to the stream
    blocks.{i}.ln_resid_mid.hook_scale / hook_normalized  norm after the add (resid_norm)
    blocks.{i}.hook_resid_mid           [batch, pos, d_model]
    blocks.{i}.ln2.hook_scale / hook_normalized        pre-MLP norm (pre_norm)
    blocks.{i}.mlp.hook_pre             [batch, pos, d_mlp]    gate pre-activation (or W_in)
    blocks.{i}.mlp.hook_pre_linear      [batch, pos, d_mlp]    up projection (gated MLP)
    blocks.{i}.mlp.hook_post            [batch, pos, d_mlp]
    blocks.{i}.ln2_post.hook_scale / hook_normalized   norm of the MLP output (output_norm)
    blocks.{i}.hook_mlp_out             [batch, pos, d_model]
    blocks.{i}.ln_resid_post.hook_scale / hook_normalized  norm after the add (resid_norm)
    blocks.{i}.hook_resid_post          [batch, pos, d_model]  block output

Per step ``r`` of the loop (``0 <= r < n_steps``)::

    loops.{r}.hook_state_in       [batch, pos, d_model]  state entering step r (r=0: initial state)
    loops.{r}.inner.{c}.hook_state_in / hook_injected / ln_state.* / hook_state_out
                                  HRM inner (low-level) state around inner cycle c
    loops.{r}.hook_injected       [batch, pos, d_model]  after input injection = input of the
                                  first core layer of the step (only where the family injects)
    loops.{r}.ln_state.hook_scale / hook_normalized   norm between steps (r < n_steps - 1)
    loops.{r}.hook_state_out      [batch, pos, d_model]  state leaving step r
    loops.{r}.hook_exit_gate      [batch, pos, 1]        exit-gate logit (Ouro)

Model level::

    hook_embed                    [batch, pos, d_model]  token embedding times embed_scale
    hook_pos_embed                [batch, pos, d_model]  learned position embedding (only with
                                  positional_embedding_type="standard", e.g. GPT-2), added to
                                  hook_embed before the first block
    ln_loop_out.hook_scale / hook_normalized          norm after the loop (Huginn ln_f use #1)
    ln_final.hook_scale / hook_normalized             norm before the unembedding

Every name is unique and fires exactly once per forward pass.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

BLOCK_PREFIX = "blocks"
LOOP_PREFIX = "loops"

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
_LOOP_RE = re.compile(r"^loops\.(\d+)\.(.+)$")


def block_hook(layer: int, name: str) -> str:
    """``block_hook(3, "hook_resid_pre") == "blocks.3.hook_resid_pre"``.

    ``name`` may be a TransformerLens short name (``"resid_pre"``, ``"pattern"``, ``"z"``): it is
    expanded with ``transformer_lens.utilities.get_act_name``.
    """
    if "." in name or name.startswith("hook_"):
        return f"{BLOCK_PREFIX}.{layer}.{name}"
    from transformer_lens.utilities import get_act_name

    return get_act_name(name, layer)


def loop_hook(step: int, name: str) -> str:
    """``loop_hook(2, "state_in") == "loops.2.hook_state_in"``."""
    if not ("." in name or name.startswith("hook_")):
        name = f"hook_{name}"
    return f"{LOOP_PREFIX}.{step}.{name}"


@dataclass(frozen=True)
class ParsedHookName:
    """A hook name split into its parts. ``layer`` / ``step`` are None where not applicable."""

    kind: str  # "block", "loop" or "model"
    rest: str  # the name below the block / loop prefix, e.g. "attn.hook_pattern"
    layer: int | None = None
    step: int | None = None


def parse_hook_name(name: str) -> ParsedHookName:
    """Inverse of :func:`block_hook` / :func:`loop_hook`.

    >>> parse_hook_name("blocks.7.attn.hook_pattern")
    ParsedHookName(kind='block', rest='attn.hook_pattern', layer=7, step=None)
    >>> parse_hook_name("loops.2.hook_state_in")
    ParsedHookName(kind='loop', rest='hook_state_in', layer=None, step=2)
    """
    if m := _BLOCK_RE.match(name):
        return ParsedHookName("block", m.group(2), layer=int(m.group(1)))
    if m := _LOOP_RE.match(name):
        return ParsedHookName("loop", m.group(2), step=int(m.group(1)))
    return ParsedHookName("model", name)
