"""save_pretrained is atomic, leaves no stale files and writes ordinary permissions (issue 15)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from conftest import make_model
from safetensors.torch import load_file, save_file

import tl_loop.loading as loading
from tl_loop import HookedLoopedTransformer, LoopedConfig

TOKENS = torch.tensor([[1, 2, 3, 4]])


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_a_model_from_a_looped_config_saves_and_reloads_bit_identically(tmp_path, umask_022):
    model = HookedLoopedTransformer(LoopedConfig(d_model=32, d_head=8, d_vocab=50, n_ctx=16, n_steps=3), seed=0)
    folder = model.save_pretrained(str(tmp_path / "m"))  # no family=: tl-loop's own format
    again = HookedLoopedTransformer.from_pretrained(str(folder))
    assert again.cfg.family == "tl_loop"
    torch.testing.assert_close(again(TOKENS), model(TOKENS), rtol=0, atol=0)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {
        "config.json": 0o644, "model.safetensors": 0o644}
    assert leftovers(tmp_path) == []


def test_a_failed_save_leaves_the_old_checkpoint_loadable(tmp_path, monkeypatch):
    old, new = make_model("plain", seed=0), make_model("plain", seed=1)
    folder = old.save_pretrained(str(tmp_path / "m"))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        new.save_pretrained(str(folder))
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert leftovers(tmp_path) == []
    torch.testing.assert_close(HookedLoopedTransformer.from_pretrained(str(folder))(TOKENS), old(TOKENS))


def test_a_crash_between_the_renames_leaves_the_old_checkpoint_whole(tmp_path, monkeypatch):
    old, new = make_model("plain", seed=0), make_model("plain", seed=1)
    folder = old.save_pretrained(str(tmp_path / "m"))
    real_rename = Path.rename

    def crash_on_the_second_rename(self, target):
        if self.name.startswith(".m.tmp-"):
            raise KeyboardInterrupt  # the process dies after moving the old folder aside
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", crash_on_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(str(folder))
    monkeypatch.undo()
    backups = [p for p in tmp_path.iterdir() if p.name.startswith(".m.old-")]
    assert len(backups) == 1
    torch.testing.assert_close(HookedLoopedTransformer.from_pretrained(str(backups[0]))(TOKENS), old(TOKENS))


def test_stale_shards_indexes_and_tokenizer_files_are_removed(tmp_path):
    """An earlier sharded checkpoint in the target never mixes with the new one."""
    folder = tmp_path / "m"
    make_model("plain", seed=0).save_pretrained(str(folder))
    tensors = load_file(str(folder / "model.safetensors"))
    keys = sorted(tensors)
    save_file({k: tensors[k] for k in keys[:3]}, str(folder / "model-00001-of-00002.safetensors"))
    save_file({k: tensors[k] for k in keys[3:]}, str(folder / "model-00002-of-00002.safetensors"))
    weight_map = {k: f"model-0000{1 if i < 3 else 2}-of-00002.safetensors" for i, k in enumerate(keys)}
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "special_tokens_map.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"stale")
    (folder / "NOTES.md").write_text("mine")  # not a checkpoint file: kept
    new = make_model("plain", seed=1)
    new.save_pretrained(str(folder))
    assert sorted(p.name for p in folder.iterdir()) == ["NOTES.md", "config.json", "model.safetensors"]
    assert (folder / "NOTES.md").read_text() == "mine"
    torch.testing.assert_close(HookedLoopedTransformer.from_pretrained(str(folder))(TOKENS), new(TOKENS), rtol=0, atol=0)
    assert leftovers(tmp_path) == []


def test_saving_over_a_file_is_refused(tmp_path):
    (tmp_path / "m").write_text("not a folder")
    with pytest.raises(loading.CheckpointError, match="exists and is not a folder"):
        make_model("plain").save_pretrained(str(tmp_path / "m"))
