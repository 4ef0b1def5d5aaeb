"""Rotary position embeddings in both layouts used by looped LMs.

* ``"half"`` (Llama, Ouro, HRM, OLMo-2): dimension ``d`` pairs with ``d + rot/2``
  (``rotate_half``); cos/sin are cast to the model dtype unless ``rope_in_float32``.
* ``"interleaved"`` (Huginn): adjacent dimensions ``(2i, 2i+1)`` form a pair, the rotation is
  computed in float32 and cast back (``rope_in_float32`` is implied).

``rope_scaling`` follows Hugging Face (``rope_type`` ``default``, ``linear`` or ``llama3``).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from jaxtyping import Float


def rotary_inv_freq(
    rot_dim: int, base: float, scaling: dict[str, Any] | None = None
) -> Float[torch.Tensor, "half_rot"]:
    """Inverse frequencies in float32, with Hugging Face's rope scaling applied."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if scaling is None or rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(
        f"rope_scaling type {rope_type!r} is not supported (supported: default, linear, llama3)"
    )


def rotary_cos_sin(
    n_pos: int, inv_freq: torch.Tensor, device: torch.device | str | None = None
) -> tuple[Float[torch.Tensor, "pos half_rot"], Float[torch.Tensor, "pos half_rot"]]:
    """float32 cos and sin of ``position * inv_freq``."""
    pos = torch.arange(n_pos, device=device, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq.to(device=device, dtype=torch.float32))
    return freqs.cos(), freqs.sin()


def apply_rotary(
    x: Float[torch.Tensor, "batch pos head d_head"],
    cos: Float[torch.Tensor, "pos half_rot"],
    sin: Float[torch.Tensor, "pos half_rot"],
    layout: str,
    in_float32: bool,
) -> Float[torch.Tensor, "batch pos head d_head"]:
    """Rotate the first ``2 * half_rot`` dimensions of every head of ``x``.

    Each half of a pair is computed directly (``out_1 = x_1 cos - x_2 sin``, ``out_2 = x_2 cos +
    x_1 sin``): bit for bit the products and sums of ``x * cos + rotate_half(x) * sin`` (Hugging
    Face) or of the complex product (Huginn), without materialising ``rotate_half(x)`` or
    full-width ``cos`` / ``sin`` tables.
    """
    half = cos.shape[-1]
    rot = 2 * half
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    if layout == "interleaved":
        # Huginn rotates in float32 and casts back (float64 stays float64)
        work_dtype = torch.promote_types(x.dtype, torch.float32)
        x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
    else:
        work_dtype = torch.promote_types(x.dtype, torch.float32) if in_float32 else x.dtype
        x1, x2 = x_rot[..., :half], x_rot[..., half:]
        cos, sin = cos.to(work_dtype), sin.to(work_dtype)
    x1, x2 = x1.to(work_dtype), x2.to(work_dtype)
    o1, o2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    out = torch.stack([o1, o2], dim=-1).flatten(-2) if layout == "interleaved" else torch.cat([o1, o2], dim=-1)
    out = out.to(x.dtype)
    return out if x_pass.shape[-1] == 0 else torch.cat([out, x_pass], dim=-1)


class RotaryTables(NamedTuple):
    """Full-width RoPE tables for one sequence length, in the dtype the rotation runs in.

    ``cos`` and ``sin_signed`` are ``[pos, 1, rot]`` (broadcast over heads). For ``"half"``,
    ``cos = [c, c]`` and ``sin_signed = [-s, s]`` pair with ``swap(x) = [x_2, x_1]``; for
    ``"interleaved"``, ``cos = [c_0, c_0, c_1, c_1, ...]`` and ``sin_signed = [-s_0, s_0, ...]``
    pair with the pair-swapped ``x``. Then ``x * cos + swap(x) * sin_signed`` is, bit for bit,
    ``apply_rotary``'s ``x_1 c - x_2 s`` / ``x_2 c + x_1 s`` (negation is exact).
    """

    cos: torch.Tensor
    sin_signed: torch.Tensor
    layout: str
    rot: int


def rotary_tables(
    n_pos: int,
    inv_freq: torch.Tensor,
    layout: str,
    dtype: torch.dtype,
    in_float32: bool,
    device: torch.device | str | None = None,
) -> RotaryTables:
    """The tables ``apply_rotary_tables`` uses (computed once per length, see ``RotaryTables``)."""
    cos, sin = rotary_cos_sin(n_pos, inv_freq, device)  # float32 [pos, half]
    work_dtype = torch.promote_types(dtype, torch.float32) if (in_float32 or layout == "interleaved") else dtype
    if layout == "interleaved":
        cos_full = cos.repeat_interleave(2, dim=-1)
        sin_signed = torch.stack([-sin, sin], dim=-1).flatten(-2)
    else:
        cos_full = torch.cat([cos, cos], dim=-1)
        sin_signed = torch.cat([-sin, sin], dim=-1)
    return RotaryTables(
        cos_full[:, None, :].to(work_dtype), sin_signed[:, None, :].to(work_dtype), layout, 2 * cos.shape[-1]
    )


def apply_rotary_tables(
    x: Float[torch.Tensor, "batch pos head d_head"], tables: RotaryTables
) -> Float[torch.Tensor, "batch pos head d_head"]:
    """``apply_rotary`` with precomputed tables: the same values, four tensor operations."""
    rot = tables.rot
    x_rot = x if rot == x.shape[-1] else x[..., :rot]
    xw = x_rot.to(tables.cos.dtype)
    if tables.layout == "interleaved":
        swapped = xw.unflatten(-1, (rot // 2, 2)).flip(-1).flatten(-2)
    else:
        half = rot // 2
        swapped = torch.cat([xw[..., half:], xw[..., :half]], dim=-1)
    out = (xw * tables.cos + swapped * tables.sin_signed).to(x.dtype)
    return out if rot == x.shape[-1] else torch.cat([out, x[..., rot:]], dim=-1)
