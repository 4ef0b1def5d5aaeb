"""The training command: --install, crash-safe checkpoints, --checkpoint-every, clear errors (issue 15)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tl_loop.train as training
from tl_loop.pretrained import PRETRAINED_DIR
from tl_loop.train import CHECKPOINT_DIR, TrainConfig, checkpoint_folder, main, run_recipe, train

TINY = dict(name="tiny", model=dict(d_model=16, d_head=8, n_heads=2, d_mlp=32, n_core_layers=1, n_steps=2,
                                    injection="add", state_init="zeros"),
            task=dict(n_statements=4), train_hops=(1, 2), iterations=4, batch_size=4, max_train_steps=2,
            threads=1, checkpoint_every=2, eval_every=0, eval_hops=(1,), eval_steps=(1, 2), eval_n=4)
#: overrides that make a shipped recipe a seconds-long run
QUICK = dict(iterations=2, batch_size=4, eval_every=0, eval_hops=(1,), eval_steps=(1,), eval_n=2, threads=1)


def test_install_over_the_shipped_model_needs_force_and_is_refused_before_training(capsys, monkeypatch):
    before = {p.name: p.stat().st_mtime_ns for p in (PRETRAINED_DIR / "varbind-looped").iterdir()}
    monkeypatch.setattr(training, "train", lambda *a, **k: pytest.fail("trained before refusing"))
    assert main(["recipe", "looped", "--install"]) == 2
    err = capsys.readouterr().err
    assert "varbind-looped exists" in err and "--force" in err and "Traceback" not in err
    assert {p.name: p.stat().st_mtime_ns for p in (PRETRAINED_DIR / "varbind-looped").iterdir()} == before


def test_install_writes_the_whole_folder_before_swapping_it_in(tmp_path, monkeypatch):
    target = tmp_path / "pretrained" / "varbind-looped"
    target.mkdir(parents=True)
    (target / "config.json").write_text('{"old": true}')
    with pytest.raises(FileExistsError, match="--force"):
        run_recipe("looped", out=tmp_path / "run", install=True, install_dir=tmp_path / "pretrained",
                   progress=False, **QUICK)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # during the evaluation, after the weights were written

    real_accuracy = training.accuracy_table
    monkeypatch.setattr(training, "accuracy_table", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_recipe("looped", out=tmp_path / "run", install=True, install_dir=tmp_path / "pretrained",
                   progress=False, force=True, **QUICK)
    assert [p.name for p in target.iterdir()] == ["config.json"] and json.loads((target / "config.json").read_text()) == {"old": True}
    assert [p.name for p in target.parent.iterdir()] == ["varbind-looped"]  # no staging folder left
    monkeypatch.setattr(training, "accuracy_table", real_accuracy)
    folder = run_recipe("looped", out=tmp_path / "run", install=True, install_dir=tmp_path / "pretrained",
                        progress=False, force=True, **QUICK)
    assert folder == target
    assert {"config.json", "model.safetensors", "recipe.json", "REPORT.md", "accuracy.csv"} <= {p.name for p in target.iterdir()}


def test_a_crash_between_the_checkpoint_renames_resumes_from_the_old_copy(tmp_path, monkeypatch):
    cfg = TrainConfig(**TINY)
    straight = train(cfg, tmp_path / "straight", progress=False)
    out = tmp_path / "run"
    train(cfg, out, progress=False, stop_at=2)
    real_rename = Path.rename

    def crash(self, target):
        if self.name == CHECKPOINT_DIR + ".tmp":
            raise KeyboardInterrupt  # after checkpoint/ moved to checkpoint.old/
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", crash)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out, progress=False)
    monkeypatch.undo()
    assert not (out / CHECKPOINT_DIR).exists() and checkpoint_folder(out) == out / (CHECKPOINT_DIR + ".old")
    resumed = train(cfg, out, progress=False)
    assert resumed.iteration == cfg.iterations
    assert resumed.final_loss == pytest.approx(straight.final_loss, abs=1e-6)
    assert checkpoint_folder(out) == out / CHECKPOINT_DIR and not (out / (CHECKPOINT_DIR + ".old")).exists()


def test_checkpoint_every_is_settable_and_may_change_on_resume(tmp_path, monkeypatch):
    saved: list[int] = []
    real_save = training.save_checkpoint
    monkeypatch.setattr(training, "save_checkpoint",
                        lambda out, model, opt, cfg, it, el: (saved.append(it), real_save(out, model, opt, cfg, it, el)))
    monkeypatch.setattr(training, "finish", lambda result, cfg, export_to=None: result.out / "model")
    assert main(["recipe", "looped", "--out", str(tmp_path), "--iterations", "3", "--checkpoint-every", "1",
                 "--threads", "1"]) == 0
    assert saved == [1, 2, 3]
    with pytest.raises(ValueError, match="checkpoint_every must be an int >= 1, got 0"):
        TrainConfig(**{**TINY, "checkpoint_every": 0})


def test_a_resume_with_changed_settings_names_the_flag(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(training, "finish", lambda result, cfg, export_to=None: result.out / "model")
    assert main(["recipe", "looped", "--out", str(tmp_path), "--iterations", "1", "--threads", "1"]) == 0
    assert main(["recipe", "looped", "--out", str(tmp_path), "--iterations", "2", "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "differ in iterations" in err and "--no-resume" in err and "Traceback" not in err
    assert main(["recipe", "looped", "--out", str(tmp_path), "--iterations", "2", "--threads", "1", "--no-resume"]) == 0


def test_command_line_errors_are_messages(capsys):
    assert main(["recipe", "no-such-recipe"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown recipe 'no-such-recipe'") and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["recipe", "looped", "--force"])  # --force without --install: argparse's usage error
