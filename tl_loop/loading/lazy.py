"""Checkpoint tensors read one at a time, straight to their device and dtype (bounded memory).

:class:`LazyTensors` maps checkpoint names to tensors without reading any data up front (only
the safetensors headers). Each access opens the tensor's shard with
``safetensors.safe_open``, copies that one tensor to the target device and dtype and closes the
shard again, so the shard's memory map never stays resident: loading holds the converted
weights plus one tensor in flight. ``load_pretrained`` builds the model on the meta device and
assigns these tensors in place (``load_state_dict(assign=True)``), so no second copy is made.

:func:`check_fits` refuses, with the numbers, a model whose weights the device clearly cannot
hold (free RAM from ``/proc/meminfo``, free GPU memory from ``torch.cuda.mem_get_info``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from tl_loop.errors import CheckpointError

#: safetensors dtype codes -> torch dtypes
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "C64": torch.complex64,  # read, so that a float slot holding them is refused by name
    **{code: getattr(torch, name) for code, name in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"))
       if hasattr(torch, name)},
}


@dataclass(frozen=True)
class TensorInfo:
    """Where a checkpoint tensor lives and what it is, from the file header (no data read)."""

    file: Path | None  # None: held in memory (a pickle checkpoint)
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class LazyTensors(Mapping[str, torch.Tensor]):
    """Checkpoint name -> tensor, read on access and converted to ``device`` / ``dtype``.

    ``dtype`` applies to floating tensors only (integer tensors keep theirs); None keeps the
    stored dtype. ``device_of`` gives some tensors their own device (a model placed over several:
    each read straight onto the device of the module that takes it). Every access reads again:
    callers keep what they need.
    """

    def __init__(
        self,
        infos: Mapping[str, TensorInfo],
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        in_memory: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self.infos = dict(infos)
        self.device = torch.device(device)
        self.dtype = dtype
        self.device_of: dict[str, torch.device] = {}
        self._in_memory = dict(in_memory or {})

    @classmethod
    def from_files(cls, files: list[Path], **kwargs) -> LazyTensors:
        """Index the tensors of safetensors ``files`` from their headers."""
        from safetensors import SafetensorError, safe_open

        infos: dict[str, TensorInfo] = {}
        for path in files:
            try:
                with safe_open(str(path), framework="pt") as f:
                    for name in f.keys():
                        piece = f.get_slice(name)
                        code = piece.get_dtype()
                        if code not in SAFETENSORS_DTYPES:
                            raise CheckpointError(f"{path}: tensor {name!r} has dtype {code}, which tl_loop cannot read")
                        if name in infos:
                            raise CheckpointError(
                                f"tensor {name!r} is stored twice: in {infos[name].file.name} and in {path.name} "
                                f"(both in {path.parent})"
                            )
                        infos[name] = TensorInfo(path, SAFETENSORS_DTYPES[code], tuple(piece.get_shape()))
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"cannot read {path} (truncated or corrupt safetensors file?): {e}") from e
        return cls(infos, **kwargs)

    @classmethod
    def from_dict(cls, tensors: Mapping[str, torch.Tensor], **kwargs) -> LazyTensors:
        """Tensors already in memory (a pickle checkpoint), converted on access like the others."""
        infos = {k: TensorInfo(None, t.dtype, tuple(t.shape)) for k, t in tensors.items()}
        return cls(infos, in_memory=tensors, **kwargs)

    def dtype_of(self, info: TensorInfo) -> torch.dtype:
        """The dtype a stored tensor is read as: ``dtype`` for floating tensors, else its own."""
        return self.dtype if self.dtype is not None and info.dtype.is_floating_point else info.dtype

    def __getitem__(self, name: str) -> torch.Tensor:
        info = self.infos[name]
        dtype = self.dtype_of(info)
        device = self.device_of.get(name, self.device)
        if info.file is None:
            return self._in_memory[name].to(device, dtype)
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(info.file), framework="pt") as f:
                stored = f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read tensor {name!r} from {info.file}: {e}") from e
        # copy=True: the result never shares the shard's memory map, which closes with `stored`
        return stored.to(device, dtype, copy=True)

    def traced(self) -> "TracedTensors":
        """The same names as shapes only: meta tensors that record which checkpoint tensors each
        result of a conversion was computed from (nothing is read)."""
        return TracedTensors(self)

    def __iter__(self) -> Iterator[str]:
        return iter(self.infos)

    def __len__(self) -> int:
        return len(self.infos)

    def __contains__(self, name: object) -> bool:
        return name in self.infos

    def stored_dtype(self) -> torch.dtype | None:
        """The floating dtype holding most elements (a float32 buffer such as Huginn's
        ``freqs_cis`` can sit next to bfloat16 weights)."""
        counts: dict[torch.dtype, int] = {}
        for info in self.infos.values():
            if info.dtype.is_floating_point:
                counts[info.dtype] = counts.get(info.dtype, 0) + info.numel
        return max(counts, key=counts.__getitem__) if counts else None

    def stored_bytes(self) -> int:
        """Bytes of tensor data in the checkpoint."""
        return sum(i.numel * i.dtype.itemsize for i in self.infos.values())

    def loaded_bytes(self) -> int:
        """Bytes the tensors take once converted to ``self.dtype`` (an upper bound on the model's
        weights: duplicates such as a tied ``lm_head`` are counted)."""
        return sum(
            i.numel * (self.dtype if self.dtype is not None and i.dtype.is_floating_point else i.dtype).itemsize
            for i in self.infos.values()
        )


class Traced(torch.Tensor):
    """A tensor that carries ``sources``: the checkpoint names it was computed from (every torch
    operation unions its operands' sources). On the meta device ``torch.equal`` answers True: a
    conversion's consistency checks pass on shapes, and the real conversion makes them."""

    sources: frozenset[str] = frozenset()

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        from torch.utils._pytree import tree_map

        if func is torch.equal and any(isinstance(a, torch.Tensor) and a.is_meta for a in args):
            return True
        found: set[str] = set()

        def collect(x):
            if isinstance(x, Traced):
                found.update(x.sources)
            return x

        tree_map(collect, (args, kwargs or {}))
        result = super().__torch_function__(func, types, args, kwargs or {})
        sources = frozenset(found)

        def tag(x):
            if isinstance(x, Traced):
                x.sources = sources
            return x

        return tree_map(tag, result)


class TracedTensors(Mapping[str, torch.Tensor]):
    """``LazyTensors`` as ``Traced`` meta tensors of the converted dtype (see ``LazyTensors.traced``);
    tensors of at most ``SMALL`` elements are read (on the CPU), for the checks conversions make
    on values (e.g. a stored RoPE table)."""

    SMALL = 2**16

    def __init__(self, lazy: LazyTensors) -> None:
        self.lazy = lazy
        self._host = LazyTensors(lazy.infos, "cpu", lazy.dtype, lazy._in_memory)  # reads the small ones

    def __getitem__(self, name: str) -> torch.Tensor:
        info = self.lazy.infos[name]
        dtype = self.lazy.dtype_of(info)
        if info.numel <= self.SMALL:
            t = self._host[name].as_subclass(Traced)
        else:
            t = torch.empty(info.shape, dtype=dtype, device="meta").as_subclass(Traced)
        t.sources = frozenset({name})
        return t

    def __iter__(self) -> Iterator[str]:
        return iter(self.lazy.infos)

    def __len__(self) -> int:
        return len(self.lazy.infos)

    def __contains__(self, name: object) -> bool:
        return name in self.lazy.infos


def available_bytes(device: torch.device | str) -> int | None:
    """Free memory on ``device`` (RAM for the CPU, free memory for a CUDA GPU); None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CheckpointError(f"device {str(device)!r} requested, but torch sees no CUDA GPU")
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def check_fits(required: int, device: torch.device | str, what: str = "the weights") -> None:
    """Raise ``CheckpointError`` when ``device`` clearly cannot hold ``required`` bytes."""
    free = available_bytes(device)
    if free is not None and required > free:
        raise CheckpointError(
            f"{what} need {_gib(required)} on {device}, which has {_gib(free)} free; choose a smaller "
            "dtype (dtype='bfloat16' or 'stored'), another device, or pass check_memory=False to try anyway"
        )
