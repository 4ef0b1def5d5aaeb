"""TransformerLens weight views over the effective depth, and TL's weight processing.

``WeightProcessingMixin`` gives ``HookedLoopedTransformer`` what ``HookedTransformer`` /
``TransformerBridge`` have:

* stacked weights ``W_Q, W_K, W_V [n_layers, n_heads, d_model, d_head]``, ``W_O``, the biases,
  ``W_in, W_gate, W_out, b_in, b_out``, the ``QK`` / ``OV`` circuits as ``FactoredMatrix`` and
  ``all_head_labels``. Row ``i`` is effective layer ``i`` (``model.blocks[i]``): a shared block's
  weights repeat at every step that runs it. GQA key/value heads are repeated up to ``n_heads``
  (``repeat_interleave``, as TransformerLens's grouped-query attention exposes ``W_K`` / ``W_V``).
* ``fold_layer_norm``, ``center_writing_weights``, ``center_unembed``, ``fold_value_biases`` and
  ``process_weights``, with TransformerLens's semantics, applied to the *physical* weights
  (``prelude`` / ``inner`` / ``core`` / ``coda``): a block the loop runs at every step is
  processed once, so the result is exact at every step and at every ``n_steps``. Where no weight
  edit makes a transform exact for the model's layout, it raises ``UnsupportedError`` saying why,
  before anything changes.

Structural side effects (all exact): folding creates the biases a fold needs where the layout
had none (``b_q, b_k, b_v``, ``b_in, b_out``, ``b_o``, ``b_U``; the config's bias flags follow),
and an op that must change ``W_U`` or ``W_E`` alone unties tied embeddings first
(``cfg.tie_embeddings`` becomes False; ``unembed.weight`` is a copy of ``W_E``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from jaxtyping import Float
from transformer_lens import FactoredMatrix

from tl_loop.components.block import BlockWeights, HookedBlock
from tl_loop.components.embed import Unembedding
from tl_loop.components.norm import NormWeights
from tl_loop.errors import UnsupportedError
from tl_loop.program import last_gate_reads_final_norm

log = logging.getLogger(__name__)

_PRE_SLOTS = ("ln1", "ln2")
_OUTPUT_SLOTS = ("ln1_post", "ln2_post")
_RESID_SLOTS = ("ln_resid_mid", "ln_resid_post")


class HeadLabels(list):
    """``['L0H0', 'L0H1', ...]``. A list (``TransformerBridge.all_head_labels`` is a property)
    that can also be called (``HookedTransformer.all_head_labels()`` was a method)."""

    def __call__(self) -> list[str]:
        return list(self)


def _work(t: torch.Tensor) -> torch.Tensor:
    """``t`` in a dtype safe for folding arithmetic (float32 at least, as TransformerLens)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _assign(p: torch.Tensor, value: torch.Tensor) -> None:
    p.copy_(value.to(p.dtype))


def _scale_columns(mat: torch.Tensor, w: torch.Tensor) -> None:
    """``mat [out, in] *= w [in]`` in place."""
    _assign(mat, _work(mat) * _work(w).to(mat.device))  # a placed model: the norm may sit elsewhere


def _center_columns(mat: torch.Tensor) -> None:
    """Subtract each row's mean over the input dimension (``[out, in]`` layout)."""
    m = _work(mat)
    _assign(mat, m - m.mean(-1, keepdim=True))


def _center_rows(mat: torch.Tensor) -> None:
    """Subtract each column's mean over the output dimension (``[out, in]`` layout)."""
    m = _work(mat)
    _assign(mat, m - m.mean(0, keepdim=True))


def _center_vector(v: torch.Tensor | None) -> None:
    if v is not None:
        x = _work(v)
        _assign(v, x - x.mean())


def _add_matvec(bias: torch.Tensor, mat: torch.Tensor, vec: torch.Tensor) -> None:
    """``bias += mat [out, in] @ vec [in]`` in place."""
    _assign(bias, _work(bias) + (_work(mat) @ _work(vec).to(mat.device)).to(bias.device))


def _zero_param(module: nn.Module, name: str, size: int, like: torch.Tensor) -> bool:
    """Give ``module`` a zero parameter ``name`` (``[size]``) where it has none; True if created."""
    if getattr(module, name, None) is not None:
        return False
    zeros = torch.zeros(size, dtype=like.dtype, device=like.device)
    p = nn.Parameter(zeros, requires_grad=like.requires_grad)
    setattr(module, name, p)
    return True


class WeightProcessingMixin:
    """Stacked TransformerLens weight views and TransformerLens's weight processing (see the module
    docstring). Mixed into ``HookedLoopedTransformer``."""

    cfg: Any
    blocks: nn.ModuleList
    schedule: Any

    # ------------------------------------------------------------------ physical weights
    def _physical_blocks(self) -> list[tuple[str, BlockWeights]]:
        """``(name, BlockWeights)`` of every physical block, each once (``"core.1"``, ...)."""
        return [(f"{stage}.{j}", blk) for stage, stack in self._stacks().items() for j, blk in enumerate(stack)]  # type: ignore[attr-defined]

    def _block_norms(self, slots: tuple[str, ...]) -> list[NormWeights]:
        norms = (getattr(blk, s, None) for _, blk in self._physical_blocks() for s in slots)
        return [n for n in norms if n is not None]

    @property
    def _last_gate_reads_ln_final(self) -> bool:
        """Where the last step's exit gate reads ``ln_final``'s output (the program's rule)."""
        return last_gate_reads_final_norm(self.cfg)

    # ------------------------------------------------------------------ stacked weights
    def _stack(self, get: Callable[[HookedBlock], torch.Tensor]) -> torch.Tensor:
        """``get(block)`` for every effective layer, stacked (computed once per physical block)."""
        per_physical: dict[str, torch.Tensor] = {}
        rows = []
        for layer, view in zip(self.schedule, self.blocks):
            key = layer.physical
            if key not in per_physical:
                per_physical[key] = get(view)
            rows.append(per_physical[key])
        if rows:
            home = rows[0].device  # a model placed over several devices: stacked on the first
            return torch.stack([r.to(home) for r in rows])
        like = get(HookedBlock(self.core[0], self.cfg))  # type: ignore[attr-defined]  # no layers: shape only
        return like.new_empty((0, *like.shape))

    @property
    def W_Q(self) -> Float[torch.Tensor, "n_layers n_heads d_model d_head"]:
        """Query weights of every effective layer."""
        return self._stack(lambda b: b.attn.W_Q)

    @property
    def W_K(self) -> Float[torch.Tensor, "n_layers n_heads d_model d_head"]:
        """Key weights of every effective layer (GQA: key/value heads repeated to ``n_heads``)."""
        return self._stack(lambda b: b.attn.W_K)

    @property
    def W_V(self) -> Float[torch.Tensor, "n_layers n_heads d_model d_head"]:
        """Value weights of every effective layer (GQA: repeated to ``n_heads``)."""
        return self._stack(lambda b: b.attn.W_V)

    @property
    def W_O(self) -> Float[torch.Tensor, "n_layers n_heads d_head d_model"]:
        return self._stack(lambda b: b.attn.W_O)

    @property
    def b_Q(self) -> Float[torch.Tensor, "n_layers n_heads d_head"]:
        return self._stack(lambda b: b.attn.b_Q)

    @property
    def b_K(self) -> Float[torch.Tensor, "n_layers n_heads d_head"]:
        return self._stack(lambda b: b.attn.b_K)

    @property
    def b_V(self) -> Float[torch.Tensor, "n_layers n_heads d_head"]:
        return self._stack(lambda b: b.attn.b_V)

    @property
    def b_O(self) -> Float[torch.Tensor, "n_layers d_model"]:
        return self._stack(lambda b: b.attn.b_O)

    @property
    def W_in(self) -> Float[torch.Tensor, "n_layers d_model d_mlp"]:
        """MLP input weights (gated MLPs: the linear "up" projection, as TransformerLens)."""
        return self._stack(lambda b: b.mlp.W_in)

    @property
    def W_gate(self) -> Float[torch.Tensor, "n_layers d_model d_mlp"] | None:
        """MLP gate weights (gated MLPs only; None otherwise, as TransformerLens)."""
        if not self.cfg.gated_mlp:
            return None
        return self._stack(lambda b: b.mlp.W_gate)

    @property
    def W_out(self) -> Float[torch.Tensor, "n_layers d_mlp d_model"]:
        return self._stack(lambda b: b.mlp.W_out)

    @property
    def b_in(self) -> Float[torch.Tensor, "n_layers d_mlp"]:
        return self._stack(lambda b: b.mlp.b_in)

    @property
    def b_out(self) -> Float[torch.Tensor, "n_layers d_model"]:
        return self._stack(lambda b: b.mlp.b_out)

    @property
    def QK(self) -> FactoredMatrix:
        """``W_Q @ W_K^T`` per layer and head, ``[n_layers, n_heads, d_model, d_model]``
        (positional information from RoPE is not in it, as in TransformerLens)."""
        if self.cfg.qk_norm:
            raise UnsupportedError(
                "QK: with qk_norm (OLMo-2) queries and keys are normalised over their full width "
                "before the dot product, so the score is not the bilinear form x W_Q W_K^T y"
            )
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self) -> FactoredMatrix:
        """``W_V @ W_O`` per layer and head, ``[n_layers, n_heads, d_model, d_model]``."""
        if self.cfg.attn_output_gate:
            raise UnsupportedError(
                "OV: with attn_output_gate (HRM) each head's z is multiplied by sigmoid(x W_gate) of "
                "the query position before W_O, so a head's output is not the linear map x W_V W_O"
            )
        return FactoredMatrix(self.W_V, self.W_O)

    @property
    def all_head_labels(self) -> HeadLabels:
        """``['L0H0', 'L0H1', ...]`` over the effective layers (``L{i}`` is ``blocks.{i}``)."""
        heads = range(self.cfg.n_heads)
        return HeadLabels(f"L{layer}H{head}" for layer in range(len(self.blocks)) for head in heads)

    # ------------------------------------------------------------------ refusals
    def _fold_ln_refusals(self, fold_biases: bool, center_weights: bool) -> list[str]:
        cfg = self.cfg
        reasons = []
        final = getattr(self, "final_norm", None)
        has_bias = cfg.norm_type == "LN"
        ln1 = cfg.pre_norm and bool(self._block_norms(("ln1",)))
        ln2 = cfg.pre_norm and bool(self._block_norms(("ln2",)))
        if final is not None and cfg.has_loop_norm and cfg.loop_norm_weights == "ln_final":
            reasons.append(
                "the loop norm (norm_between_steps / norm_after_loop) shares ln_final's weights "
                "(loop_norm_weights='ln_final'); there they scale the recurrent state itself, which "
                "no later weight can absorb, so ln_final's weights cannot be folded into W_U"
            )
        if final is not None and cfg.exit_gate and self._last_gate_reads_ln_final:
            reasons.append(
                "the exit gate reads ln_final's output at the last step and the state at the other "
                "steps: one gate cannot absorb ln_final's weights for both"
            )
        if fold_biases and has_bias and cfg.attn_output_gate and ln1:
            reasons.append(
                "attn_output_gate: the gate projection reads ln1's output but has no bias to absorb ln1's bias"
            )
        if fold_biases and has_bias and cfg.gated_mlp and ln2:
            reasons.append(
                "gated MLP: the gate projection reads ln2's output but has no bias to absorb ln2's bias"
            )
        if center_weights and cfg.norm_type != "LN":
            reasons.append(
                "center_weights: RMSNorm outputs are not mean-zero, so centring the weights that read "
                "them changes the model (TransformerLens centres only for LayerNorm)"
            )
        if not fold_biases and has_bias and (ln1 or ln2 or final is not None):
            reasons.append(
                "fold_biases=False: a LayerNorm adds its bias after its weight, so its weight cannot "
                "be folded out while the bias stays (TransformerLens: only for RMSNorm)"
            )
        return reasons

    def _center_writing_refusals(self) -> list[str]:
        cfg = self.cfg
        reasons = []
        if cfg.norm_type != "LN":
            reasons.append(
                "RMSNorm sees the residual stream's mean, so centring what writes to it changes the "
                "model (TransformerLens centres writing weights only for LayerNorm models)"
            )
        if not cfg.pre_norm:
            reasons.append("pre_norm=False: attention and MLP read the raw residual stream, mean included")
        # The three below would leave the logits unchanged (LayerNorm ignores the mean), but
        # what is written is a weighted norm's output w * n(x) + b, which no weight change
        # centres: the stream would not be mean-zero, which is what centring promises.
        if self._block_norms(_OUTPUT_SLOTS):
            reasons.append(
                "output_norm: each sublayer writes a weighted norm's output (w * n(x) + b), not "
                "W_O / W_out directly, and no weight change centres it"
            )
        if self._block_norms(_RESID_SLOTS):
            reasons.append(
                "resid_norm: the stream is re-normed after every add and holds a weighted norm's "
                "output (w * n(x) + b), which no weight change centres"
            )
        if cfg.has_loop_norm and self._loop_norm_weights is not None:  # type: ignore[attr-defined]
            reasons.append(
                "the loop norm (norm_between_steps / norm_after_loop) makes its weighted output "
                "(w * n(x) + b) the recurrent state, which no weight change centres"
            )
        if cfg.injection == "linear" and not cfg.inner_cycles:
            reasons.append(
                "injection='linear': the adapter reads the raw state and prelude output, mean included"
            )
        if cfg.exit_gate and (
            not cfg.norm_between_steps or not (self._last_gate_reads_ln_final or cfg.norm_after_loop)
        ):
            reasons.append("the exit gate reads the un-normed recurrent state, mean included")
        return reasons

    def _fold_value_biases_refusals(self) -> list[str]:
        has_b_v = any(blk.attn.b_v is not None for _, blk in self._physical_blocks())
        if self.cfg.attn_output_gate and has_b_v:
            return [
                "attn_output_gate: z is multiplied by a data-dependent gate between the value bias "
                "and W_O, so b_V's contribution is not constant"
            ]
        return []

    @staticmethod
    def _refuse(op: str, reasons: list[str]) -> None:
        if reasons:
            raise UnsupportedError(f"{op}: unsupported for this layout: " + "; ".join(reasons))

    # ------------------------------------------------------------------ structural helpers
    def _untie_embeddings(self) -> None:
        """Give the unembedding its own copy of ``W_E`` (exact), so W_U and W_E can differ."""
        if not self.cfg.tie_embeddings:
            return
        W_E = self.embed.W_E  # type: ignore[attr-defined]
        self.cfg.tie_embeddings = False
        unembed = Unembedding(self.cfg).to(device=W_E.device, dtype=W_E.dtype)
        with torch.no_grad():
            unembed.weight.copy_(W_E)
        unembed.weight.requires_grad_(W_E.requires_grad)
        self.unembed = unembed
        log.info("weight processing untied the embeddings: unembed.weight is now a copy of W_E")

    def _ensure_attn_biases(self, qk: bool, v: bool, o: bool) -> None:
        """Zero biases on every physical block where the layout has none (config flags follow)."""
        cfg = self.cfg
        for _, blk in self._physical_blocks():
            a, like = blk.attn, blk.attn.w_o
            if qk:
                cfg.qk_bias |= _zero_param(a, "b_q", a.q_dim, like) | _zero_param(a, "b_k", a.kv_dim, like)
            if v:
                cfg.v_bias |= _zero_param(a, "b_v", a.kv_dim, like)
            if o:
                cfg.o_bias |= _zero_param(a, "b_o", cfg.d_model, like)

    def _ensure_mlp_biases(self) -> None:
        cfg = self.cfg
        assert not cfg.gated_mlp, "a gated MLP runs without biases"
        for _, blk in self._physical_blocks():
            m = blk.mlp
            created_in = _zero_param(m, "b_in", m.d_mlp, m.w_out)
            cfg.mlp_bias |= created_in | _zero_param(m, "b_out", cfg.d_model, m.w_out)

    def _after_structural_change(self) -> None:
        """Re-read the views' weights from the physical stacks (norm modules replaced by None)."""
        self._rebind_weights()  # type: ignore[attr-defined]

    def _refresh_norm_config(self) -> None:
        """``cfg.normalization_type`` says LNPre / RMSPre once ln1, ln2 and ln_final are
        parameter-free (as TransformerLens); ``norm_weights`` becomes False once no norm has any."""
        cfg = self.cfg
        base = "LN" if cfg.norm_type == "LN" else "RMS"
        free = not self._block_norms(_PRE_SLOTS) and getattr(self, "final_norm", None) is None
        cfg.normalization_type = base + ("Pre" if free else "")
        if not any(isinstance(m, NormWeights) for m in self.modules()):  # type: ignore[attr-defined]
            cfg.norm_weights = False

    # ------------------------------------------------------------------ folds
    def fold_layer_norm(self, fold_biases: bool = True, center_weights: bool | None = None) -> None:
        """Fold ``ln1`` / ``ln2`` into the weights reading them (W_Q, W_K, W_V, the attention
        output gate; W_in, W_gate) and ``ln_final`` into ``W_U`` (and ``b_U``), once per physical
        block; the folded norms become parameter-free (``cfg.normalization_type`` LNPre / RMSPre).

        Args:
            fold_biases: fold LayerNorm biases into the readers' biases (created where absent).
                False is for RMSNorm only (TransformerLens); with weighted LayerNorms it raises.
            center_weights: centre the readers over ``d_model`` (they read mean-zero LNPre output).
                Default: True for LayerNorm, False for RMSNorm (where True raises).

        Output norms, residual norms, loop norms and q/k norms keep their weights (they scale a
        stream or a sublayer output, not the input of a linear map). Raises ``UnsupportedError``
        where that cannot be exact: ``ln_final`` shared with a loop norm, an exit gate reading
        ``ln_final``, LayerNorm biases read by a bias-free gate projection.
        """
        cfg = self.cfg
        is_ln = cfg.norm_type == "LN"
        if center_weights is None:
            center_weights = is_ln
        self._refuse("fold_layer_norm", self._fold_ln_refusals(fold_biases, center_weights))
        fold_b = fold_biases and is_ln
        with torch.no_grad():
            if cfg.pre_norm:
                if fold_b and self._block_norms(("ln1",)):
                    self._ensure_attn_biases(qk=True, v=True, o=False)
                if fold_b and self._block_norms(("ln2",)):
                    self._ensure_mlp_biases()
                for _, blk in self._physical_blocks():
                    self._fold_block_norm(blk, "ln1", fold_b, center_weights)
                    self._fold_block_norm(blk, "ln2", fold_b, center_weights)
            self._fold_final_norm(fold_b, center_weights)
        self._refresh_norm_config()
        self._after_structural_change()

    def _readers(self, blk: BlockWeights, slot: str) -> list[torch.Tensor]:
        """The ``[out, d_model]`` matrices reading ``slot``'s output in ``blk``."""
        if slot == "ln1":
            a = blk.attn
            mats = [a.w_qkv] if hasattr(a, "w_qkv") else [a.w_q, a.w_k, a.w_v]
            return mats + ([a.w_gate] if a.w_gate is not None else [])
        m = blk.mlp
        if hasattr(m, "w_gate_up"):
            return [m.w_gate_up]
        return [m.w_gate, m.w_up] if hasattr(m, "w_gate") else [m.w_in]

    def _fold_block_norm(self, blk: BlockWeights, slot: str, fold_b: bool, center: bool) -> None:
        norm = getattr(blk, slot, None)
        if norm is not None:
            if norm.b is not None and fold_b:
                if slot == "ln1":
                    a = blk.attn
                    for bias, mat in zip((a.b_q, a.b_k, a.b_v), a.qkv_weights()):
                        _add_matvec(bias, mat, norm.b)
                else:
                    _add_matvec(blk.mlp.b_in, blk.mlp.in_weights()[0], norm.b)
            for mat in self._readers(blk, slot):
                _scale_columns(mat, norm.w)
            setattr(blk, slot, None)
        if center:
            for mat in self._readers(blk, slot):
                _center_columns(mat)

    def _fold_final_norm(self, fold_b: bool, center: bool) -> None:
        norm = getattr(self, "final_norm", None)
        if norm is None and not center:
            return
        self._untie_embeddings()
        unembed = self.unembed  # type: ignore[attr-defined]
        U = unembed.weight  # [d_vocab, d_model]
        if norm is not None:
            if norm.b is not None and fold_b:
                if unembed.b_U is None:
                    unembed.b_U = nn.Parameter(torch.zeros(U.shape[0], dtype=U.dtype, device=U.device),
                                               requires_grad=U.requires_grad)
                    self.cfg.unembed_bias = True
                _add_matvec(unembed.b_U, U, norm.b)
            _scale_columns(U, norm.w)
            self.final_norm = None
        if center:
            _center_columns(U)

    def center_writing_weights(self) -> None:
        """Centre every weight writing to the residual stream over ``d_model``: ``W_E``,
        ``W_pos``, ``W_O`` / ``b_O``, ``W_out`` / ``b_out`` of every physical block, HRM's learned
        inner state. Logits are unchanged where every reader of the stream is a LayerNorm (which
        ignores the mean), and the stream is mean-zero where every write is one of these (a random
        initial state is an input, not a weight, and is left as it is). Raises ``UnsupportedError``
        otherwise: RMSNorm, no pre-norm, weighted output / residual / loop norms, a linear
        adapter, an exit gate on the raw state. Unties tied embeddings (``W_U`` keeps the
        uncentred copy)."""
        self._refuse("center_writing_weights", self._center_writing_refusals())
        with torch.no_grad():
            self._untie_embeddings()
            _center_columns(self.embed.W_E)  # type: ignore[attr-defined]  # [d_vocab, d_model]
            pos = getattr(self, "pos_embed", None)
            if pos is not None:
                _center_columns(pos.W_pos)
            inner_init = getattr(self, "inner_init", None)
            if inner_init is not None:
                _center_vector(inner_init)
            for _, blk in self._physical_blocks():
                _center_rows(blk.attn.w_o)  # [d_model, n_heads * d_head]
                _center_vector(blk.attn.b_o)
                _center_rows(blk.mlp.w_out)  # [d_model, d_mlp]
                _center_vector(blk.mlp.b_out)
        self._after_structural_change()

    def center_unembed(self) -> None:
        """Centre ``W_U`` (and ``b_U``) over the vocabulary: every logit at a position moves by the
        same amount, so log-probabilities are unchanged. Unties tied embeddings."""
        with torch.no_grad():
            self._untie_embeddings()
            unembed = self.unembed  # type: ignore[attr-defined]
            _center_rows(unembed.weight)  # [d_vocab, d_model]: mean over the vocabulary
            _center_vector(unembed.b_U)
        self._after_structural_change()

    def fold_value_biases(self) -> None:
        """``b_O += sum_h b_V[h] @ W_O[h]``, ``b_V = 0`` per physical block (attention patterns sum
        to one, so the value bias adds a constant). GQA: a key/value head's bias counts once per
        query head using it. Raises ``UnsupportedError`` with ``attn_output_gate`` (HRM)."""
        self._refuse("fold_value_biases", self._fold_value_biases_refusals())
        cfg = self.cfg
        blocks = [blk for _, blk in self._physical_blocks() if blk.attn.b_v is not None]
        if not blocks:
            return
        with torch.no_grad():
            self._ensure_attn_biases(qk=False, v=False, o=True)
            for blk in blocks:
                a = blk.attn
                b_v = a.b_v.view(-1, cfg.d_head).repeat_interleave(cfg.n_groups, dim=0).reshape(-1)
                _add_matvec(a.b_o, a.w_o, b_v)
                a.b_v.zero_()

    def process_weights(
        self,
        fold_ln: bool = True,
        center_writing_weights: bool = True,
        center_unembed: bool = True,
        fold_value_biases: bool = True,
        refactor_factored_attn_matrices: bool = False,
    ) -> None:
        """TransformerLens's processing, in its order: ``fold_layer_norm`` (LayerNorm: biases
        folded and readers centred; RMSNorm: weights only), ``center_writing_weights`` (LayerNorm
        models only; skipped for RMSNorm as TransformerLens does), ``center_unembed``,
        ``fold_value_biases`` (then ``b_O`` re-centred where writing weights were centred).

        Every requested step is checked first: if any is not exact for this layout,
        ``UnsupportedError`` lists why and nothing changes.
        """
        if refactor_factored_attn_matrices:
            raise UnsupportedError(
                "process_weights: refactor_factored_attn_matrices is not implemented for looped models"
            )
        cfg = self.cfg
        center = center_writing_weights and cfg.norm_type == "LN"
        if center_writing_weights and not center:
            log.info("process_weights: not centring writing weights of an RMSNorm model (as TransformerLens)")
        is_ln = cfg.norm_type == "LN"
        reasons = []
        if fold_ln:
            reasons += [f"fold_ln: {r}" for r in self._fold_ln_refusals(True, is_ln)]
        if center:
            reasons += [f"center_writing_weights: {r}" for r in self._center_writing_refusals()]
        if fold_value_biases:
            reasons += [f"fold_value_biases: {r}" for r in self._fold_value_biases_refusals()]
        self._refuse("process_weights", reasons)
        if fold_ln:
            self.fold_layer_norm(fold_biases=True, center_weights=is_ln)
        if center:
            self.center_writing_weights()
        if center_unembed:
            self.center_unembed()
        if fold_value_biases:
            self.fold_value_biases()
            if center:
                with torch.no_grad():
                    for _, blk in self._physical_blocks():
                        _center_vector(blk.attn.b_o)
