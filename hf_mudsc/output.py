"""Writing an output folder all at once: staged in a hidden sibling folder, then renamed into place.

The CLI commands (`merge`, `demo`) and the demo's cache share this, so that a crash, an error or Ctrl-C at
any point leaves either the old folder untouched or the complete new one — never a half-written folder,
never a stray temporary one. Renames within one directory are atomic, hence the sibling staging folder.

    check_output(out, overwrite=args.overwrite)      # before any heavy work: fail fast
    ...                                              # heavy work
    with staged_output(out, overwrite=args.overwrite) as staging:
        model.save_pretrained(staging)               # anything raised here: `out` is not touched
    # here `out` holds exactly what was written to `staging`
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .recipe import RECIPE_FILENAME

PARTIAL_MARK = ".partial-"  # in the staging folder's name: `.{name}.partial-XXXX`
OLD_MARK = ".old-"  # in the name of a replaced output while the new one is renamed in


def check_output(output: str | os.PathLike, *, overwrite: bool) -> None:
    """Refuse an existing `output`, unless `overwrite`; even then refuse one hf-mudsc did not write.

    A folder counts as written by hf-mudsc when it is empty or holds a recipe file (`mudsc_recipe.yaml`):
    `--overwrite` must never delete someone's unrelated folder because of a typo in `--output`.
    """
    output = Path(output)
    if not output.exists() and not output.is_symlink():
        return
    if not overwrite:
        raise FileExistsError(
            f"the output folder {str(output)!r} already exists; pass --overwrite to replace it, "
            "or choose another --output"
        )
    if output.is_symlink():
        raise FileExistsError(
            f"refusing to overwrite {str(output)!r}: it is a symbolic link, and the output is replaced by a "
            "rename that would not write through it; pass the link's target as --output"
        )
    if not output.is_dir() or (any(output.iterdir()) and not (output / RECIPE_FILENAME).is_file()):
        raise FileExistsError(
            f"refusing to overwrite {str(output)!r}: it is not a folder written by hf-mudsc (no "
            f"{RECIPE_FILENAME}); delete it yourself or choose another --output"
        )


@contextmanager
def staged_output(
    output: str | os.PathLike | None, *, overwrite: bool = False, keep_existing: bool = False
) -> Iterator[Path]:
    """Yield an empty staging folder; when the block succeeds it becomes `output`, else it is deleted.

    Args:
        output: the folder to produce. `None`: a scratch folder in the system temp dir, always deleted at
            the end (e.g. a push-only merge that uploads the staged folder).
        overwrite: replace an existing `output` (only one `check_output` accepts). The old folder is
            swapped out and deleted only after the new one is in place; if that rename fails, it is
            put back.
        keep_existing: for write-once caches: an `output` that exists when the block ends (another run
            finished first) wins, and the staged copy is dropped.

    Raises:
        FileExistsError: `output` exists (on entry or, written meanwhile by someone else, at the end) and
            neither `overwrite` nor `keep_existing` allows it; then nothing is changed.
    """
    target = Path(output).expanduser().absolute() if output is not None else None
    if target is not None and not keep_existing:
        check_output(target, overwrite=overwrite)
    parent = target.parent if target is not None else Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    name = target.name if target is not None else "hf-mudsc"
    staging = Path(tempfile.mkdtemp(prefix=f".{name}{PARTIAL_MARK}", dir=parent))
    try:
        staging.chmod(0o777 & ~_umask())  # mkdtemp makes 0700: the output gets the usual permissions
        yield staging
        if target is not None:
            _normalise_modes(staging)
            _move_into_place(staging, target, overwrite=overwrite, keep_existing=keep_existing)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_file_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """`write(temporary_path)`, then rename it onto `path`: readers see the old file or the whole new one.

    The temporary file sits next to `path` (renames are atomic within a folder) and gets the mode a plain
    `open()` would give; on any failure it is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    temporary = Path(name)
    try:
        write(temporary)
        temporary.chmod(0o666 & ~_umask())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def _move_into_place(staging: Path, target: Path, *, overwrite: bool, keep_existing: bool) -> None:
    if not target.exists() and not target.is_symlink():
        try:
            os.rename(staging, target)
            return
        except OSError:
            if not target.exists():  # no race lost: a real error
                raise
    if keep_existing:
        return
    check_output(target, overwrite=overwrite)  # it may have appeared or changed since the first check
    backup = target.with_name(f".{target.name}{OLD_MARK}{uuid.uuid4().hex[:8]}")
    os.rename(target, backup)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(backup, target)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _normalise_modes(folder: Path) -> None:
    """Give every staged file and folder the mode a plain `open()`/`mkdir()` would: some writers use
    `mkstemp` (0600), which would make a shared output unreadable to others."""
    umask = _umask()
    for path in folder.rglob("*"):
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
