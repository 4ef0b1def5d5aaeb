"""Checkpoint folders: which files are read, index entries, file types, JSON shapes (issue 15)."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tl_loop import CheckpointError, HookedLoopedTransformer

FIXTURES = Path(__file__).parent / "fixtures"
TOKENS = torch.tensor([[1, 2, 3, 4]])
INDEX = "model.safetensors.index.json"


@pytest.fixture
def ouro(tmp_path) -> Path:
    """The tiny Ouro fixture, reference files included (``expected.safetensors`` is a stray file)."""
    folder = tmp_path / "ouro"
    shutil.copytree(FIXTURES / "ouro_tiny", folder)
    return folder


def load(folder: Path, **kwargs) -> HookedLoopedTransformer:
    return HookedLoopedTransformer.from_pretrained(str(folder), **kwargs)


def shard(folder: Path, names: tuple[str, str] = ("part-1.safetensors", "part-2.safetensors")) -> dict:
    """Split model.safetensors into two shards and an index (the single file removed)."""
    tensors = load_file(str(folder / "model.safetensors"))
    keys = sorted(tensors)
    halves = {names[0]: keys[: len(keys) // 2], names[1]: keys[len(keys) // 2:]}
    for name, part in halves.items():
        save_file({k: tensors[k] for k in part}, str(folder / name))
    weight_map = {k: name for name, part in halves.items() for k in part}
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "model.safetensors").unlink()
    return weight_map


def set_index(folder: Path, weight_map: dict) -> None:
    (folder / INDEX).write_text(json.dumps({"weight_map": weight_map}))


def finishes(fn, timeout: float = 20.0) -> BaseException | None:
    """Run ``fn`` in a thread; fail if it blocks (a FIFO opened for reading waits forever)."""
    result: list[BaseException | None] = []

    def target():
        try:
            fn()
            result.append(None)
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            result.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        for path in _fifos:  # unblock the reader so the thread ends
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
        pytest.fail(f"loading blocked for {timeout} s")
    return result[0]


_fifos: list[Path] = []


def make_fifo(path: Path) -> None:
    if path.exists():
        path.unlink()
    os.mkfifo(path)
    _fifos.append(path)


# ---------------------------------------------------------------------------------- which files
def test_sharded_checkpoint_loads_like_the_single_file(ouro):
    single = load(ouro)(TOKENS)
    shard(ouro)
    torch.testing.assert_close(load(ouro)(TOKENS), single, rtol=0, atol=0)


def test_stray_safetensors_files_are_ignored_not_merged(ouro):
    assert (ouro / "expected.safetensors").exists()  # the fixture's reference outputs: not special-cased
    reference = load(ouro)(TOKENS)
    extra = {"model.layers.0.mlp.gate_proj.weight": torch.zeros(1), "bogus.weight": torch.ones(3)}
    save_file(extra, str(ouro / "model-extra.safetensors"))
    torch.testing.assert_close(load(ouro)(TOKENS), reference, rtol=0, atol=0)
    loader = (Path(__file__).parents[1] / "tl_loop" / "loading" / "files.py").read_text()
    assert "expected.safetensors" not in loader


def test_index_and_single_file_together_are_ambiguous(ouro):
    weight_map = shard(ouro)
    tensors = {k: v for name in set(weight_map.values()) for k, v in load_file(str(ouro / name)).items()}
    save_file(tensors, str(ouro / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"both model.safetensors and model.safetensors.index.json"):
        load(ouro)


def test_only_other_safetensors_names_are_not_a_checkpoint(ouro):
    (ouro / "model.safetensors").rename(ouro / "weights.safetensors")
    with pytest.raises(CheckpointError, match=r"no model.safetensors.*found \['expected.safetensors', 'weights.safetensors'\]"):
        load(ouro)


def test_a_tensor_in_two_shards_names_both_files(ouro):
    weight_map = shard(ouro)
    name = next(k for k, f in weight_map.items() if f == "part-1.safetensors")
    second = load_file(str(ouro / "part-2.safetensors"))
    second[name] = load_file(str(ouro / "part-1.safetensors"))[name]
    save_file(second, str(ouro / "part-2.safetensors"))
    with pytest.raises(CheckpointError, match=rf"{name!r} is stored twice: in part-1.safetensors and in part-2.safetensors"):
        load(ouro)


def test_a_shard_the_folder_lacks_is_named(ouro):
    shard(ouro)
    (ouro / "part-2.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"'part-2.safetensors': the index names a shard the folder lacks"):
        load(ouro)


def test_a_listed_tensor_stored_nowhere_is_named(ouro):
    weight_map = shard(ouro)
    set_index(ouro, {**weight_map, "model.ghost.weight": "part-1.safetensors"})
    with pytest.raises(CheckpointError, match=r"listed but stored in no shard: \['model.ghost.weight'\]"):
        load(ouro)


# ---------------------------------------------------------------------------------- index entries
@pytest.mark.parametrize("entry, message", [
    ("/etc/passwd", "must be file names inside the checkpoint folder"),
    ("../outside.safetensors", "must be file names inside the checkpoint folder"),
    ("sub/../../outside.safetensors", "must be file names inside the checkpoint folder"),
    ("", "must be a file name"),
    (3, "must be a file name"),
])
def test_index_entries_outside_the_folder_are_refused(ouro, entry, message):
    weight_map = shard(ouro)
    victim = next(iter(weight_map))
    set_index(ouro, {**weight_map, victim: entry})
    with pytest.raises(CheckpointError, match=rf"weight_map\[{victim!r}\] = {entry!r}.*{message}"):
        load(ouro)


def test_an_index_entry_symlinked_out_of_the_folder_is_refused(ouro, tmp_path):
    weight_map = shard(ouro)
    outside = tmp_path / "elsewhere.safetensors"
    (ouro / "part-2.safetensors").rename(outside)
    (ouro / "part-2.safetensors").symlink_to(outside)
    with pytest.raises(CheckpointError, match=r"'part-2.safetensors' resolves to .*elsewhere.safetensors, outside the checkpoint folder"):
        load(ouro)
    assert weight_map  # a symlink inside the folder is fine:
    (ouro / "part-2.safetensors").unlink()
    (ouro / "real").mkdir()
    outside.rename(ouro / "real" / "part-2.safetensors")
    (ouro / "part-2.safetensors").symlink_to(ouro / "real" / "part-2.safetensors")
    load(ouro)


def test_the_pickle_index_is_checked_too(ouro):
    tensors = load_file(str(ouro / "model.safetensors"))
    (ouro / "model.safetensors").unlink()
    torch.save(tensors, ouro / "pytorch_model-1.bin")
    (ouro / "pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {k: "../pytorch_model-1.bin" for k in tensors}}))
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin.index.json: weight_map\[.*'\.\./pytorch_model-1.bin'"):
        load(ouro, allow_pickle=True)
    (ouro / "pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {k: "pytorch_model-1.bin" for k in tensors}}))
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        load(ouro)
    load(ouro, allow_pickle=True)


# ---------------------------------------------------------------------------------- file types
@pytest.mark.parametrize("target", ["model.safetensors", "config.json", "tokenizer.json", "part-1.safetensors"])
def test_a_fifo_in_place_of_a_file_is_refused_without_blocking(ouro, target):
    if target.startswith("part"):
        shard(ouro)
    make_fifo(ouro / target)
    error = finishes(lambda: load(ouro))
    assert isinstance(error, CheckpointError), error
    assert target in str(error) and "not a regular file" in str(error)


def test_a_folder_in_place_of_the_weights_is_refused(ouro):
    (ouro / "model.safetensors").unlink()
    (ouro / "model.safetensors").mkdir()
    with pytest.raises(CheckpointError, match="model.safetensors is not a regular file"):
        load(ouro)


# ---------------------------------------------------------------------------------- JSON shapes
@pytest.mark.parametrize("text, message", [
    ("[1, 2]", "must hold a JSON object, found list"),
    ('"config"', "must hold a JSON object, found str"),
    ("null", "must hold a JSON object, found NoneType"),
    ("{not json", "is not valid JSON"),
])
def test_config_json_must_be_a_json_object(ouro, text, message):
    (ouro / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=rf"config.json {message}"):
        load(ouro)


@pytest.mark.parametrize("index, message", [
    ([], "must hold a JSON object, found list"),
    ({"weight_map": ["part-1.safetensors"]}, "field 'weight_map' must be a non-empty object"),
    ({"weight_map": {}}, "field 'weight_map' must be a non-empty object"),
    ({"metadata": {}}, "field 'weight_map' must be a non-empty object"),
])
def test_the_index_must_be_a_json_object_with_a_weight_map(ouro, index, message):
    shard(ouro)
    (ouro / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"{INDEX}.*{message}"):
        load(ouro)


def test_an_index_that_is_not_json_names_the_file(ouro):
    shard(ouro)
    (ouro / INDEX).write_text("{")
    with pytest.raises(CheckpointError, match=rf"{INDEX} is not valid JSON"):
        load(ouro)


def test_a_hub_cache_snapshot_linking_to_its_blobs_loads(ouro, tmp_path):
    """huggingface_hub's cache: snapshots/<rev>/<file> -> ../../blobs/<hash>, inside the repo folder."""
    reference = load(ouro)(TOKENS)
    weight_map = shard(ouro)
    repo = tmp_path / "models--owner--name"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, path in enumerate(sorted(ouro.iterdir())):
        path.rename(blobs / f"blob{i}")
        (snapshot / path.name).symlink_to(Path("../../blobs") / f"blob{i}")
    assert weight_map and (snapshot / "part-1.safetensors").is_symlink()
    torch.testing.assert_close(load(snapshot)(TOKENS), reference, rtol=0, atol=0)
