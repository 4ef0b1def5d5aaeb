"""Replacing a folder atomically: what ``save_pretrained`` and ``tl_loop.train --install`` write.

The new content is written into a staging folder beside the target (same file system), which
then takes the target's place by two renames: the old folder moves aside to a backup, the new
one moves in, the backup is deleted. A failure while writing leaves the target untouched (the
staging folder is removed); a crash between the two renames leaves the old folder whole under
``.<name>.old-*`` beside the target. Entries of the old folder the new content does not own
(``owned(name)`` is False: a README, a run log) are carried over. Written files get ordinary
permissions (``0666``, folders ``0777``, less the process umask: ``0644`` / ``0755`` usually),
not the ``0600`` / ``0700`` of ``tempfile``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from tl_loop.errors import CheckpointError


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _ordinary_permissions(root: Path) -> None:
    mask = _umask()
    root.chmod(0o777 & ~mask)
    for path in root.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def replace_folder(target: str | Path, owned: Callable[[str], bool] = lambda name: True) -> Iterator[Path]:
    """Yield an empty staging folder; when the block ends without error it replaces ``target``.

    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "model"
    >>> with replace_folder(target) as staging:
    ...     _ = (staging / "config.json").write_text("{}")
    >>> sorted(p.name for p in target.iterdir())
    ['config.json']
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target} exists and is not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        _ordinary_permissions(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not target.exists():
        staging.rename(target)
        return
    backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    backup.rmdir()
    target.rename(backup)
    staging.rename(target)
    for entry in backup.iterdir():
        if not owned(entry.name) and not (target / entry.name).exists():
            entry.rename(target / entry.name)
    shutil.rmtree(backup, ignore_errors=True)
