"""Reading Hugging Face-layout checkpoint folders without executing any of their code.

Only ``config.json`` (parsed as JSON), the safetensors weights and tokenizer files are read.
``auto_map`` entries pointing to remote code are ignored. Which weight files are read follows
transformers: ``model.safetensors.index.json`` when there is one (its shards only), else
``model.safetensors``; any other ``*.safetensors`` file beside them is ignored, never merged.
Pickle checkpoints (``pytorch_model.bin`` or its index) are refused unless ``allow_pickle=True``,
and even then loaded with ``torch.load(weights_only=True)``.

Every name an index gives is checked before anything is opened: a shard must be a plain file
name inside the checkpoint folder (no absolute path, no ``..``, no symlink leading out of the
folder) and a regular file (never a FIFO, socket or device, which would block or never end).
A tensor stored in two shards is an error naming both.
"""

from __future__ import annotations

import json
import logging
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tl_loop.errors import CheckpointError

logger = logging.getLogger("tl_loop")

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_FILES = (PICKLE_INDEX, PICKLE_FILE)
#: Tokenizer files transformers reads or writes (removed from a folder a new checkpoint replaces).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


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


def regular_file(path: Path, what: str) -> Path:
    """``path`` if it is a regular file (symlinks followed); else a ``CheckpointError``. Checked
    before opening: a FIFO, socket or device in place of a checkpoint file would block or never end."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise CheckpointError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {what} {path}: {e}") from e
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{what} {path} is not a regular file (a folder, FIFO, socket or device)")
    return path


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file whose top level must be an object, with errors naming the file."""
    regular_file(path, "checkpoint file")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    except (UnicodeDecodeError, OSError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} must hold a JSON object, found {type(value).__name__}")
    return value


def read_config(folder: Path) -> dict[str, Any]:
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{folder} has no config.json")
    config = read_json_object(cfg_path)
    if "auto_map" in config:
        logger.info("ignoring auto_map in %s: tl_loop never imports checkpoint code", cfg_path)
    return config


def shard_path(folder: Path, name: Any, index: Path, tensor: str) -> Path:
    """The file an index entry names, refused unless it is a plain name of a regular file inside
    ``folder`` (after resolving symlinks)."""
    where = f"{index}: weight_map[{tensor!r}] = {name!r}"
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{where} must be a file name (a non-empty string)")
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts or "\\" in name:
        raise CheckpointError(f"{where}: shard names must be file names inside the checkpoint folder")
    root = folder.resolve()
    if root.parent.name == "snapshots":  # a Hub cache snapshot: its files link to ../../blobs/
        root = root.parent.parent
    path = (folder / relative).resolve()
    if root not in path.parents:
        raise CheckpointError(f"{where} resolves to {path}, outside the checkpoint folder {root}")
    if not (folder / relative).exists():
        raise CheckpointError(f"{where}: the index names a shard the folder lacks")
    return regular_file(folder / relative, f"shard {name!r} of {index.name}")


def read_index(folder: Path, index_name: str) -> dict[str, Path]:
    """Tensor name -> shard file of a sharded checkpoint's index, every entry checked."""
    index = folder / index_name
    data = read_json_object(index)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, Mapping) or not weight_map:
        raise CheckpointError(
            f"{index}: field 'weight_map' must be a non-empty object of tensor name -> shard file, "
            f"got {type(weight_map).__name__}"
        )
    return {str(tensor): shard_path(folder, name, index, str(tensor)) for tensor, name in weight_map.items()}


def weight_files(folder: Path, allow_pickle: bool = False) -> tuple[list[Path], dict[str, Path] | None, bool]:
    """``(files, weight_map or None, is_pickle)``: the weight files transformers would read."""
    for index_name, single, pickle in ((SAFETENSORS_INDEX, SAFETENSORS_FILE, False), (PICKLE_INDEX, PICKLE_FILE, True)):
        index, single_path = folder / index_name, folder / single
        if not (index.exists() or single_path.exists()):
            continue
        if pickle and not allow_pickle:
            raise CheckpointError(
                f"{folder} holds only a pickle checkpoint ({index_name if index.exists() else single}); "
                "pickle files can run code when loaded, so they are refused. Convert it to safetensors, "
                "or pass allow_pickle=True to load it with torch.load(weights_only=True)."
            )
        if index.exists():
            if single_path.exists():
                raise CheckpointError(
                    f"{folder} holds both {single} and {index_name}: which one is the checkpoint is "
                    "ambiguous; remove the stale one"
                )
            weight_map = read_index(folder, index_name)
            return sorted(set(weight_map.values())), weight_map, pickle
        return [regular_file(single_path, "weights file")], None, pickle
    others = sorted(p.name for p in folder.glob("*.safetensors"))
    hint = f" (found {others}; tl_loop reads only model.safetensors or a model.safetensors.index.json)" if others else ""
    raise CheckpointError(f"{folder} has no model.safetensors or model.safetensors.index.json{hint}")


def read_tensors(folder: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder (single or sharded), each name from exactly one file."""
    files, weight_map, pickle = weight_files(folder, allow_pickle)
    tensors: dict[str, torch.Tensor] = {}
    source: dict[str, Path] = {}
    for path in files:
        for name, tensor in _read_file(path, pickle).items():
            if name in source:
                raise CheckpointError(f"tensor {name!r} is stored twice: in {source[name].name} and in {path.name}")
            tensors[name], source[name] = tensor, path
    check_index(folder, weight_map, source, pickle)
    return tensors


def check_index(folder: Path, weight_map: dict[str, Path] | None, source: Mapping[str, Path], pickle: bool) -> None:
    """Refuse an index that does not match its shards: ``source`` is where each tensor was found."""
    if weight_map is None:
        return
    wrong = sorted(n for n, p in weight_map.items() if n in source and source[n] != p)
    absent = sorted(set(weight_map) - set(source))
    if wrong or absent:
        raise CheckpointError(
            f"{folder / (PICKLE_INDEX if pickle else SAFETENSORS_INDEX)} does not match its shards: "
            + "; ".join([f"{n!r} is listed in {weight_map[n].name} but stored in {source[n].name}" for n in wrong[:5]]
                        + ([f"listed but stored in no shard: {absent[:5]}"] if absent else []))
        )


def _read_file(path: Path, pickle: bool) -> dict[str, torch.Tensor]:
    if pickle:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # an unpickling error, a truncated file
            raise CheckpointError(f"cannot read {path} with torch.load(weights_only=True): {e}") from e
        if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise CheckpointError(f"{path} does not hold a state dict (name -> tensor)")
        return dict(data)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot read {path} (truncated or corrupt safetensors file?): {e}") from e


def load_tokenizer(folder: Path) -> Any:
    """``transformers.AutoTokenizer`` from the folder's own files (no remote code), or None; a
    ``tl_loop.tasks.CharTokenizer`` where the folder has one (the shipped models)."""
    from tl_loop.tasks.tokenizer import TOKENIZER_FILE, CharTokenizer

    present = [folder / n for n in (TOKENIZER_FILE, *TOKENIZER_FILES) if (folder / n).exists()]
    for path in present:
        regular_file(path, "tokenizer file")
    if (folder / TOKENIZER_FILE).is_file():
        return CharTokenizer.from_pretrained(folder)
    if not any(p.name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json") for p in present):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as e:  # a broken tokenizer should not prevent loading the weights
        logger.warning("could not load the tokenizer in %s: %s", folder, e)
        return None
