"""Reading Hugging Face-layout checkpoint folders without executing any of their code.

Only ``config.json`` (parsed as JSON), ``*.safetensors`` (or a sharded
``model.safetensors.index.json``) and tokenizer files are read. ``auto_map`` entries pointing
to remote code are ignored. Pickle checkpoints (``*.bin``, ``*.pt``) are refused unless
``allow_pickle=True``, and even then loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from tl_loop.errors import CheckpointError

logger = logging.getLogger("tl_loop")

PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.bin", "model.pt")


def resolve_checkpoint(name_or_path: str | Path, revision: str | None = None) -> Path:
    """A local folder, or a Hub id downloaded with ``huggingface_hub`` (cache-only when offline)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; expected a checkpoint folder with config.json")
    repo_id = str(name_or_path)
    tried = [f"local folder {path} (does not exist)"]
    if repo_id.count("/") != 1:
        raise CheckpointError(f"cannot find a checkpoint: tried {tried[0]}; {repo_id!r} is not a Hub id (owner/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - huggingface_hub is a dependency
        raise CheckpointError("huggingface_hub is needed to fetch Hub ids") from e
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "tokenizer*"]
    for local_only in (False, True):
        try:
            return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=local_only))
        except Exception as e:  # network errors, missing repo, offline cache miss
            tried.append(f"Hub {'cache' if local_only else 'download'} of {repo_id!r}"
                         f"{'@' + revision if revision else ''}: {type(e).__name__}: {e}")
    raise CheckpointError("cannot find a checkpoint; tried:\n  " + "\n  ".join(tried))


def read_config(folder: Path) -> dict[str, Any]:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder} has no config.json")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {e}") from e
    if "auto_map" in config:
        logger.info("ignoring auto_map in %s: tl_loop never imports checkpoint code", cfg_path)
    return config


def safetensors_files(folder: Path) -> list[Path]:
    """The checkpoint's safetensors files (the shards its index names, when sharded); [] if none."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return [folder / name for name in sorted(set(weight_map.values()))]
    return sorted(p for p in folder.glob("*.safetensors") if p.name != "expected.safetensors")


def read_tensors(folder: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder (single or sharded safetensors)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = [p.name for p in safetensors_files(folder)]
    if not files:
        pickles = [n for n in PICKLE_FILES if (folder / n).exists()]
        if pickles and not allow_pickle:
            raise CheckpointError(
                f"{folder} holds only a pickle checkpoint ({pickles[0]}); pickle files can run code "
                "when loaded, so they are refused. Convert it to safetensors, or pass "
                "allow_pickle=True to load it with torch.load(weights_only=True)."
            )
        if pickles:
            return _read_pickle(folder, pickles[0])
        raise CheckpointError(f"{folder} has no *.safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            tensors.update(load_file(str(folder / name)))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {folder / name} (truncated or corrupt safetensors file?): {e}") from e
    return tensors


def _read_pickle(folder: Path, name: str) -> dict[str, torch.Tensor]:
    if name.endswith(".index.json"):
        files = sorted(set(json.loads((folder / name).read_text())["weight_map"].values()))
    else:
        files = [name]
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(torch.load(folder / f, map_location="cpu", weights_only=True))
    return tensors


def load_tokenizer(folder: Path) -> Any:
    """``transformers.AutoTokenizer`` from the folder's own files (no remote code), or None; a
    ``tl_loop.tasks.CharTokenizer`` where the folder has one (the shipped models)."""
    from tl_loop.tasks.tokenizer import TOKENIZER_FILE, CharTokenizer

    if (folder / TOKENIZER_FILE).is_file():
        return CharTokenizer.from_pretrained(folder)
    if not any((folder / n).exists() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as e:  # a broken tokenizer should not prevent loading the weights
        logger.warning("could not load the tokenizer in %s: %s", folder, e)
        return None
