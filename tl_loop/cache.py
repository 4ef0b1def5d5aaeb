"""``LoopedActivationCache``: TransformerLens's ``ActivationCache`` with exact attribution.

In a plain pre-norm transformer the residual stream is the sum of the embedding and every
sublayer output, which is what ``ActivationCache.decompose_resid`` / ``stack_head_results``
stack. In looped models it is not: Huginn normalises the stream after every residual add, Ouro
normalises the state between steps, Huginn's adapter mixes ``concat(state, prelude_out)``.
Each of those maps is *linear once the norm's scale is fixed*, so with the cached
``hook_scale`` values every component's contribution can be carried forward exactly. This
module replays the forward pass (in the schedule's order) on stacks of components; the rows of
the result sum to the residual stream at the requested layer, up to float rounding.

Components: ``embed``, ``pos_embed`` (learned positions), ``init_state`` (random initial
state), ``inner_init`` (HRM), ``{i}_attn_out`` (or ``L{i}H{h}`` per head) and ``{i}_mlp_out`` (or
``L{i}N{n}`` per neuron), and ``bias`` (every constant: norm and projection biases), carried
through everything that follows them.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from jaxtyping import Float
from transformer_lens import ActivationCache
from transformer_lens.utilities import Slice

from tl_loop.errors import UnsupportedError
from tl_loop.program import Interpreter, Program, RunFrame
from tl_loop.schedule import Schedule


class ModelAtSteps:
    """The model as it runs at a fixed number of steps (what a cache is bound to).

    Delegates to the model but answers ``cfg``, ``blocks``, ``loops``, ``schedule`` and
    ``program`` for its own depth, so a cache stays valid after ``model.set_n_steps`` changes
    the default (``blocks``/``loops`` are then hook-free views of that depth).
    """

    def __init__(self, model: Any, n_steps: int) -> None:
        self.model = model
        self.n_steps = n_steps
        self.cfg = model.cfg.with_steps(n_steps)
        self.program = Program.from_config(self.cfg, n_steps)
        self.schedule = self.program.schedule

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    @property
    def blocks(self) -> Any:
        return self.model.views_at(self.n_steps).blocks

    @property
    def loops(self) -> Any:
        return self.model.views_at(self.n_steps).loops

    # Members of TransformerLens's model protocols, defined explicitly so structural checks pass.
    @property
    def ln_final(self) -> Any:
        return self.model.ln_final

    def run_with_cache(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("n_steps", self.n_steps)
        return self.model.run_with_cache(*args, **kwargs)

    def run_with_hooks(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("n_steps", self.n_steps)
        return self.model.run_with_hooks(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("n_steps", self.n_steps)
        return self.model(*args, **kwargs)

    def to_tokens(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.to_tokens(*args, **kwargs)

    def to_single_token(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.to_single_token(*args, **kwargs)

    def tokens_to_residual_directions(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.tokens_to_residual_directions(*args, **kwargs)

    def accumulated_bias(self, *args: Any, **kwargs: Any) -> Any:
        return type(self.model).accumulated_bias(self, *args, **kwargs)  # type: ignore[arg-type]


class _Stream:
    """A residual stream as ``rows`` (one per component) plus ``const`` (all biases)."""

    def __init__(self, rows: torch.Tensor, const: torch.Tensor) -> None:
        self.rows, self.const = rows, const

    def clone(self) -> "_Stream":
        return _Stream(self.rows.clone(), self.const.clone())

    def map(self, fn: Any) -> "_Stream":
        return _Stream(fn(self.rows), fn(self.const))

    def to(self, device: torch.device) -> "_Stream":
        return self if self.rows.device == device else _Stream(self.rows.to(device), self.const.to(device))

    def __add__(self, other: "_Stream") -> "_Stream":
        return _Stream(self.rows + other.rows, self.const + other.const)


class _Replay(Interpreter):
    """Carries components through the program, reading every norm scale from the cache.

    The frame's values are ``_Stream``s instead of tensors; each operation is the linear map the
    forward pass applied (norms with their cached scale, injection, the adapter).
    """

    def __init__(
        self,
        cache: "LoopedActivationCache",
        pos_slice: Slice,
        attn_unit: Literal["layer", "head"] = "layer",
        mlp_unit: Literal["layer", "neuron"] = "layer",
    ) -> None:
        self.cache, self.pos_slice = cache, pos_slice
        self.attn_unit, self.mlp_unit = attn_unit, mlp_unit
        self.model = cache.model
        self.cfg = self.model.cfg
        self.schedule: Schedule = self.model.schedule
        # A model placed over several devices: the streams follow the operations' weights, as in
        # the forward pass (``tl_loop.placement``), and cached values are read onto their device.
        self.placement = getattr(self.model, "_placement", None)
        self.device: torch.device | None = None

    def run(self, program: Any, frame: Any, start: int = 0, stop: int | None = None) -> Any:
        if self.placement is None:
            return super().run(program, frame, start, stop)
        for position in range(start, len(program) if stop is None else stop):
            op = program[position]
            device = self.placement.device_of(op)
            if device is not None and device != self.device:
                self.device = device
                for name in RunFrame.TENSORS:
                    value = getattr(frame, name)
                    if value is not None:
                        setattr(frame, name, value.to(device))
            super().run(program, frame, position, position + 1)
        return frame

    def get(self, name: str, pos_dim: int = -2) -> torch.Tensor:
        try:
            t = self.cache.cache_dict[name]
        except KeyError:
            raise KeyError(
                f"exact attribution needs {name!r} in the cache: run run_with_cache without a "
                "names_filter, or with names_filter=tl_loop.attribution_names_filter"
            ) from None
        t = self.pos_slice.apply(t, dim=pos_dim)
        return t if self.device is None else t.to(self.device)

    def labels_until(self, layer: int, mlp_input: bool) -> list[str]:
        labels = ["embed"]
        if self.cfg.positional_embedding_type == "standard":
            labels.append("pos_embed")
        if self.cfg.state_init == "random" and self.schedule.n_steps > 0:
            labels.append("init_state")
        if self.cfg.inner_cycles and self.cfg.inner_state_init == "learned" and self.schedule.n_steps > 0:
            labels.append("inner_init")
        for i in range(layer + (1 if mlp_input else 0)):
            labels += self.attn_labels(i)
            if i < layer:
                labels += self.mlp_labels(i)
        return labels

    def attn_labels(self, i: int) -> list[str]:
        return [f"L{i}H{h}" for h in range(self.cfg.n_heads)] if self.attn_unit == "head" else [f"{i}_attn_out"]

    def mlp_labels(self, i: int) -> list[str]:
        return [f"L{i}N{n}" for n in range(self.cfg.d_mlp)] if self.mlp_unit == "neuron" else [f"{i}_mlp_out"]

    # ---- streams ----
    def fresh(self, label: str | None = None, value: torch.Tensor | None = None) -> _Stream:
        s = _Stream(self.zero_rows.clone(), torch.zeros_like(self.embed_value))
        if self.device is not None:
            s = s.to(self.device)
        if label is not None:
            s.rows[self.row[label]] = value
        return s

    def norm(self, stream: _Stream, view: Any, scale_name: str) -> _Stream:
        scale = self.get(scale_name)
        out = stream.map(lambda x: view.apply_fixed_scale(x, scale))
        if view.b is not None:
            out.const = out.const + view.b
        return out

    @torch.no_grad()
    def run_to(self, layer: int, mlp_input: bool) -> tuple[torch.Tensor, list[str]]:
        labels = self.labels_until(layer, mlp_input)
        self.device = None
        self.row = {label: k for k, label in enumerate(labels)}
        self.embed_value = self.get("hook_embed")
        self.zero_rows = self.embed_value.new_zeros((len(labels), *self.embed_value.shape))
        program = self.model.program
        frame = RunFrame(0)
        self.run(program, frame, 0, program.block_position(layer))
        stream = frame.x
        if mlp_input:  # the attention half of the target layer
            if self.placement is not None:
                self.device = self.placement.blocks[self.schedule[layer].physical]
                stream = stream.to(self.device)
            stream = self.attention_half(stream, layer, self.model.blocks[layer])
        rows, labels = self.finish(stream, labels)
        return rows.to(self.embed_value.device), labels

    # ---- operations ----
    def embed(self, op: Any, f: RunFrame) -> None:
        f.x = self.fresh("embed", self.embed_value)
        if "pos_embed" in self.row:
            f.x.rows[self.row["pos_embed"]] = self.get("hook_pos_embed")

    def block(self, op: Any, f: RunFrame) -> None:
        i = op.index
        block = self.model.blocks[i]
        stream = self.attention_half(f.x, i, block)
        if self.mlp_unit == "neuron":  # neuron n writes post[..., n] * W_out[n] (then ln2_post)
            post = self.get(f"blocks.{i}.mlp.hook_post")
            parts = post[..., None] * block.mlp.W_out.to(post.dtype)  # [..., pos, d_mlp, d_model]
            self.add_parts(stream, parts, self.mlp_labels(i), block.mlp.b_out, block, "ln2_post", i)
        else:
            stream.rows[self.row[f"{i}_mlp_out"]] += self.get(f"blocks.{i}.hook_mlp_out")
        if self.cfg.resid_norm:
            stream = self.norm(stream, block.ln_resid_post, f"blocks.{op.index}.ln_resid_post.hook_scale")
        f.x = stream

    def enter_loop(self, op: Any, f: RunFrame) -> None:
        cfg = self.cfg
        f.prelude_out = f.x
        if cfg.state_init == "zeros":
            f.state = self.fresh()
        elif cfg.state_init == "prelude":
            f.state = f.x.clone()
        elif self.schedule.n_steps:
            f.state = self.fresh("init_state", self.get("loops.0.hook_state_in"))
        else:
            raise UnsupportedError(
                "at n_steps=0 the random initial state goes straight past the loop and no hook "
                "point records it: exact attribution after the prelude needs n_steps >= 1"
            )
        if cfg.inner_cycles and self.schedule.n_steps:
            learned = "inner_init" in self.row
            f.inner_state = self.fresh("inner_init", self.get("loops.0.inner.0.hook_state_in")) if learned else self.fresh()

    def state_in(self, op: Any, f: RunFrame) -> None:
        f.source = f.prelude_out

    def inner_in(self, op: Any, f: RunFrame) -> None:
        f.x = f.inner_state + f.state

    def inner_out(self, op: Any, f: RunFrame) -> None:
        if op.norm:
            norm = self.model.loops[op.step].inner[op.cycle].ln_state
            f.inner_state = self.norm(f.x, norm, f"loops.{op.step}.inner.{op.cycle}.ln_state.hook_scale")
        else:
            f.inner_state = f.x
        f.source = f.inner_state

    def inject(self, op: Any, f: RunFrame) -> None:
        if op.how == "add":
            f.x = f.state + f.source
        elif op.how == "linear":
            adapter = self.model.adapter
            w_state, w_source = adapter.split()
            x = f.state.map(lambda t: t @ w_state.T.to(t.dtype)) + f.source.map(lambda t: t @ w_source.T.to(t.dtype))
            if adapter.bias is not None:
                x.const = x.const + adapter.bias
            f.x = x
        else:
            f.x = f.state.clone()

    def state_out(self, op: Any, f: RunFrame) -> None:
        if op.norm:
            f.state = self.norm(f.x, self.model.loops[op.step].ln_state, f"loops.{op.step}.ln_state.hook_scale")
        else:
            f.state = f.x

    def exit_gate(self, op: Any, f: RunFrame) -> None:
        return None

    def leave_loop(self, op: Any, f: RunFrame) -> None:
        f.x = self.norm(f.state, self.model.ln_loop_out, "ln_loop_out.hook_scale") if op.norm else f.state

    def attention_half(self, stream: _Stream, i: int, block: Any) -> _Stream:
        """The block's attention output added (and the stream normed after the add, Huginn)."""
        if self.attn_unit == "head":
            result = self.pos_slice.apply(self.cache._head_result(i), dim=-3)  # [..., pos, head, d_model]
            self.add_parts(stream, result, self.attn_labels(i), block.attn.b_O, block, "ln1_post", i)
        else:
            stream.rows[self.row[f"{i}_attn_out"]] += self.get(f"blocks.{i}.hook_attn_out")
        if self.cfg.resid_norm:
            stream = self.norm(stream, block.ln_resid_mid, f"blocks.{i}.ln_resid_mid.hook_scale")
        return stream

    def add_parts(
        self, stream: _Stream, parts: torch.Tensor, labels: list[str], bias: torch.Tensor, block: Any, post_norm: str, i: int
    ) -> None:
        """Add a sublayer's write split into parts (``[..., pos, part, d_model]``, in the order of
        ``labels``) and its bias, each through the sublayer's output norm where there is one."""
        parts, bias = parts.to(stream.rows.device), bias.to(stream.rows.device)
        if self.cfg.output_norm:
            norm = getattr(block, post_norm)
            scale = self.get(f"blocks.{i}.{post_norm}.hook_scale")
            parts = norm.apply_fixed_scale(parts, scale[..., None, :])  # broadcast over the parts
            bias = norm.apply_fixed_scale(bias.expand_as(stream.const), scale)
            if norm.b is not None:
                bias = bias + norm.b
        first = self.row[labels[0]]
        stream.rows[first:first + len(labels)] += parts.movedim(-2, 0)
        stream.const = stream.const + bias

    def finish(self, stream: _Stream, labels: list[str]) -> tuple[torch.Tensor, list[str]]:
        rows = stream.rows
        if bool(stream.const.ne(0).any()):
            rows = torch.cat([rows, stream.const[None]], dim=0)
            labels = labels + ["bias"]
        return rows, labels


class LoopedActivationCache(ActivationCache):
    """An ``ActivationCache`` bound to a looped model at the depth it ran at.

    Everything of ``ActivationCache`` works over the full effective depth. ``decompose_resid``
    and ``stack_head_results`` are exact for every layout (see the module docstring), so
    ``cache.logit_attrs(...)`` of all components sums to the logit (difference).
    """

    def __init__(self, cache_dict: dict[str, torch.Tensor], model: Any, n_steps: int | None = None, has_batch_dim: bool = True) -> None:
        if not isinstance(model, ModelAtSteps):
            model = ModelAtSteps(model, model.cfg.n_steps if n_steps is None else n_steps)
        super().__init__(cache_dict, model, has_batch_dim=has_batch_dim)

    @property
    def schedule(self) -> Schedule:
        return self.model.schedule

    def __repr__(self) -> str:
        return f"LoopedActivationCache(n_steps={self.model.n_steps}, {len(self)} activations)"

    def save(self, path: Any, overwrite: bool = False) -> Any:
        """Write into the folder ``path``, one safetensors file per hook kind, with the step count
        and schedule; adds to a cache of the same run saved there before (``tl_loop.cache_io``)."""
        from tl_loop.cache_io import save_cache

        return save_cache(self, path, overwrite)

    @classmethod
    def load(cls, path: Any, model: Any, device: Any = None) -> "LoopedActivationCache":
        """Reopen a saved cache bound to ``model`` at the saved depth; each hook kind's file is
        read when one of its activations is first used."""
        from tl_loop.cache_io import load_cache

        return load_cache(cls, path, model, device)

    def stack_loop(self, name: str, steps: Any = None) -> Float[torch.Tensor, "step layer_in_cycle ..."]:
        """``blocks.{i}.{name}`` of every loop layer as ``[step, layer_in_cycle, ...]``."""
        return self.schedule.stack_activation(self.cache_dict, name, steps)

    def apply_slice_to_batch_dim(self, batch_slice: Any) -> "LoopedActivationCache":
        sliced = super().apply_slice_to_batch_dim(batch_slice)
        return LoopedActivationCache(sliced.cache_dict, self.model, has_batch_dim=sliced.has_batch_dim)

    def _head_result(self, layer: int) -> torch.Tensor:
        """Per-head output ``z_h @ W_O[h]`` (before any output norm) ``[..., pos, head, d_model]``."""
        cached = self.cache_dict.get(f"blocks.{layer}.attn.hook_result")
        if cached is not None:
            return cached
        z = self.cache_dict.get(f"blocks.{layer}.attn.hook_z")
        if z is None:
            raise KeyError(f"per-head attribution needs blocks.{layer}.attn.hook_z (or hook_result) in the cache")
        W_O = self.model.blocks[layer].attn.W_O
        return torch.einsum("...hd,hdm->...hm", z, W_O.to(z.device, z.dtype))

    def _final_stream_name(self) -> str | None:
        """The hook holding the stream ``ln_final`` reads, where it is not the last block's
        ``hook_resid_post`` (TransformerLens's assumption); None where that assumption holds."""
        cfg = self.model.cfg
        if cfg.n_coda_layers:
            return None
        if cfg.norm_after_loop:  # the loop is last: ln_final reads the normed state
            return "ln_loop_out.hook_normalized"
        if self.schedule.n_steps == 0 and cfg.state_init != "prelude":
            raise UnsupportedError(
                f"at n_steps=0 with state_init={cfg.state_init!r} and no coda, ln_final reads the "
                "initial state, which no hook point records; run with n_steps >= 1"
            )
        return None

    def accumulated_resid(  # type: ignore[override]
        self,
        layer: int | None = None,
        incl_mid: bool = False,
        apply_ln: bool = False,
        pos_slice: Any = None,
        mlp_input: bool = False,
        return_labels: bool = False,
    ) -> Any:
        """As TransformerLens; the ``final_post`` entry is the stream ``ln_final`` actually reads
        (after the norm that follows the loop, where nothing but that norm comes after it)."""
        resolved = self._resolve_layer(layer)
        final = self._final_stream_name() if resolved == self.model.cfg.n_layers else None
        if final is None:
            return super().accumulated_resid(layer, incl_mid, apply_ln, pos_slice, mlp_input, return_labels)
        pos_slice = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
        stack, labels = super().accumulated_resid(layer, incl_mid, False, pos_slice, mlp_input, True)
        stack = stack.clone()
        stack[-1] = pos_slice.apply(self[final], dim=-2)
        if apply_ln:
            stack = self.apply_ln_to_stack(
                stack, resolved, pos_slice=pos_slice, mlp_input=mlp_input,
                has_batch_dim=self.has_batch_dim, recompute_ln=True,
            )
        return (stack, labels) if return_labels else stack

    def _resolve_layer(self, layer: int | None) -> int:
        n = self.model.cfg.n_layers
        if layer is None or layer == -1:
            return n
        if not 0 <= layer <= n:
            raise IndexError(f"layer {layer} out of range [0, {n}]")
        return layer

    def decompose_resid(  # type: ignore[override]
        self,
        layer: int | None = None,
        mlp_input: bool = False,
        mode: Literal["all", "mlp", "attn"] = "all",
        apply_ln: bool = False,
        pos_slice: Any = None,
        incl_embeds: bool = True,
        return_labels: bool = False,
    ) -> Any:
        """Exact decomposition of the residual stream entering ``layer`` (TransformerLens
        signature). Rows: ``embed``, ``pos_embed``/``init_state``/``inner_init`` where present,
        ``{i}_attn_out``, ``{i}_mlp_out``, ``bias``: each the component's contribution *after* every
        norm scale, adapter and injection between it and ``layer``; they sum to ``resid_pre`` (or
        ``resid_mid`` with ``mlp_input``)."""
        layer = self._resolve_layer(layer)
        pos_slice = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
        rows, labels = _Replay(self, pos_slice).run_to(layer, mlp_input)
        keep = [
            k for k, label in enumerate(labels)
            if not (mode == "mlp" and label.endswith("_attn_out"))
            and not (mode == "attn" and label.endswith("_mlp_out"))
            and (incl_embeds or label not in ("embed", "pos_embed", "init_state", "inner_init"))
        ]
        rows, labels = rows[keep], [labels[k] for k in keep]
        if apply_ln:
            rows = self.apply_ln_to_stack(rows, layer, pos_slice=pos_slice, mlp_input=mlp_input)
        return (rows, labels) if return_labels else rows

    def stack_head_results(  # type: ignore[override]
        self,
        layer: int = -1,
        return_labels: bool = False,
        incl_remainder: bool = False,
        pos_slice: Any = None,
        apply_ln: bool = False,
    ) -> Any:
        """Exact per-head contributions (``L{i}H{h}``) of every layer before ``layer`` to the
        residual stream entering ``layer``; ``incl_remainder`` adds the rest of the stream."""
        layer = self._resolve_layer(layer)
        pos_slice = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
        rows, labels = _Replay(self, pos_slice, attn_unit="head").run_to(layer, mlp_input=False)
        keep = [k for k, label in enumerate(labels) if label.startswith("L") and "H" in label]
        heads, head_labels = rows[keep], [labels[k] for k in keep]
        if incl_remainder:
            total = rows.sum(0)
            heads = torch.cat([heads, (total - heads.sum(0))[None]], dim=0)
            head_labels = head_labels + ["remainder"]
        if apply_ln:
            heads = self.apply_ln_to_stack(heads, layer, pos_slice=pos_slice)
        return (heads, head_labels) if return_labels else heads

    def stack_neuron_results(  # type: ignore[override]
        self,
        layer: int,
        pos_slice: Any = None,
        neuron_slice: Any = None,
        return_labels: bool = False,
        incl_remainder: bool = False,
        apply_ln: bool = False,
        project_output_onto: torch.Tensor | None = None,
        mlp_input: bool = False,
    ) -> Any:
        """Exact per-neuron contributions (``L{i}N{n}``: ``post[n] * W_out[n]``, carried through
        every norm, adapter and injection up to ``layer``) of every layer before ``layer`` to the
        stream entering it (``resid_mid`` with ``mlp_input``); ``incl_remainder`` adds the rest."""
        layer = self._resolve_layer(layer)
        pos_slice = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
        rows, labels = _Replay(self, pos_slice, mlp_unit="neuron").run_to(layer, mlp_input)
        picked = set(Slice.unwrap(neuron_slice).apply(torch.arange(self.model.cfg.d_mlp), dim=0).reshape(-1).tolist())
        keep = [k for k, label in enumerate(labels) if _neuron_of(label) in picked]
        neurons, neuron_labels = rows[keep], [labels[k] for k in keep]
        if incl_remainder:
            neurons = torch.cat([neurons, (rows.sum(0) - neurons.sum(0))[None]], dim=0)
            neuron_labels = neuron_labels + ["remainder"]
        return self._finish_stack(neurons, neuron_labels, layer, pos_slice, mlp_input, apply_ln, project_output_onto, return_labels)

    def get_full_resid_decomposition(  # type: ignore[override]
        self,
        layer: int | None = None,
        mlp_input: bool = False,
        expand_neurons: bool = True,
        apply_ln: bool = False,
        pos_slice: Any = None,
        return_labels: bool = False,
        project_output_onto: torch.Tensor | None = None,
    ) -> Any:
        """Every head, every neuron (or MLP layer), the embeddings, the initial states and the
        biases, each carried exactly to the stream entering ``layer``: TransformerLens's row order
        (heads, neurons, ``embed``, ``pos_embed``, then ``init_state`` / ``inner_init`` where the
        layout has them, ``bias``), and the rows sum to the stream for every layout."""
        layer = self._resolve_layer(layer)
        pos_slice = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
        replay = _Replay(self, pos_slice, attn_unit="head", mlp_unit="neuron" if expand_neurons else "layer")
        rows, labels = replay.run_to(layer, mlp_input)
        if labels[-1] != "bias":  # TransformerLens always ends with the bias row
            rows, labels = torch.cat([rows, torch.zeros_like(rows[:1])]), labels + ["bias"]
        rank = {"head": 0, "mlp": 1, "embed": 2, "pos_embed": 3, "init_state": 4, "inner_init": 5, "bias": 6}

        def kind(label: str) -> str:
            if label in rank:
                return label
            return "head" if ("H" in label and label.startswith("L")) or label.endswith("_attn_out") else "mlp"

        order = sorted(range(len(labels)), key=lambda k: rank[kind(labels[k])])  # stable: layer order kept
        return self._finish_stack(rows[order], [labels[k] for k in order], layer, pos_slice, mlp_input, apply_ln,
                                  project_output_onto, return_labels)

    def _finish_stack(
        self, stack: torch.Tensor, labels: list[str], layer: int, pos_slice: Slice, mlp_input: bool,
        apply_ln: bool, project_output_onto: torch.Tensor | None, return_labels: bool,
    ) -> Any:
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice, mlp_input=mlp_input)
        if project_output_onto is not None:
            stack = stack @ project_output_onto.to(stack.dtype)
        return (stack, labels) if return_labels else stack


def _neuron_of(label: str) -> int | None:
    """``L{i}N{n}`` -> ``n``."""
    if label.startswith("L") and "N" in label:
        return int(label.rsplit("N", 1)[1])
    return None


def attribution_names_filter(name: str) -> bool:
    """``names_filter`` caching exactly what exact attribution reads (embeddings, sublayer
    outputs, ``hook_z``, norm scales, initial states)."""
    return (
        name in ("hook_embed", "hook_pos_embed")
        or name.endswith(("hook_attn_out", "hook_mlp_out", "attn.hook_z", "hook_scale", "hook_result"))
        or name.endswith("hook_resid_pre") or name.endswith("hook_resid_post")
        or name in ("loops.0.hook_state_in", "loops.0.inner.0.hook_state_in")
    )
