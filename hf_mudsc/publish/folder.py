"""Writing an output folder all at once: staged in a hidden sibling folder, then renamed into place.

Every output carries the writer's marker (`.hf_mudsc_output.json`: each file it wrote, with size and
sha256); `--overwrite` replaces only a folder whose every file the marker lists unchanged, so it never
deletes a file hf-mudsc did not write. `check_output` also refuses the current directory, outputs that
overlap an input (after resolving `..` and symlinks) and locations that cannot be written, before any work.

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

import errno
import glob
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from pathlib import Path, PurePosixPath
from typing import Any

from hf_mudsc._version import __version__
from hf_mudsc.errors import OutputLocationError
from hf_mudsc.load.config_json import parse_json
from hf_mudsc.load.references import TOKEN_FIX, looks_like_token
from hf_mudsc.publish.recipe import RECIPE_FILENAME

logger = logging.getLogger(__name__)

PARTIAL_MARK = ".partial-"  # in the staging folder's name: `.{name}.partial-XXXX`
OLD_MARK = ".old-"  # in the name of a replaced output while the new one is renamed in
OLD_SUFFIX_DIGITS = 8  # hex digits after OLD_MARK: only such a name can be the writer's own backup
# A file being written beside the one it replaces: `.{name}.hf-mudsc-{host}-{pid}-{random}.tmp` (the marker's:
# `.hf_mudsc_output.json.hf-mudsc-...`). The writer's host (8 hex digits of its name's sha256) and process are in
# the name, so the next run knows one a killed writer left (`clean_temporaries`) from one another run is writing now,
# and from any file the writer did not make.
TEMPORARY_MARK = ".hf-mudsc-"
_TEMPORARY_NAME = re.compile(r"\..+" + re.escape(TEMPORARY_MARK)
                             + r"(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]+)-[0-9a-f]{8}\.tmp")
# In a marker while files it lists are being replaced (`_put_in_place`): each one's new entry. A file then matches
# either entry; a run stopped half-way (SIGKILL, power loss) leaves this key, and `push` refuses such a folder.
REPLACING = "replacing"
# The writer's proof of ownership: every file it wrote, with size and sha256. A user does not copy a hidden
# file by accident, and a copied one lists files that the folder then does not match. It holds no paths.
MARKER_FILENAME = ".hf_mudsc_output.json"
# A marker lists ~150 bytes per file: one past this size was not written by hf-mudsc, and is never read (read whole).
MARKER_MAX_BYTES = 64 * 2**20
WRITER = "hf-mudsc"
STAGING_SUFFIX_LENGTH = len(PARTIAL_MARK) + 10  # what mkdtemp adds to `.{name}`
_STAGING_SUFFIX = re.compile(r"[a-z0-9_]{8}")  # mkdtemp's random part (`tempfile._RandomNameSequence`)
# In a staging folder's complete marker: its own name, which the old output takes when the atomic swap exchanges the
# two (`exchange_paths`). The output in place then names the one `.{name}.partial-*` folder that is its replaced
# copy (`clean_leftovers`): a user's copy of a finished output, under any name, is never taken for it.
SWAPS_OUT_AS = "swaps_out_as"
#: The most folders a new output may need created above it: far beyond any real layout, well below the depth at
#: which creating them recursively exhausts Python's stack (~1000).
MAX_NEW_FOLDERS = 100
# The fingerprints this process took, by file identity (device, inode: kept across the staging folder's rename),
# with the stat they were taken at and whether the file had settled then (`_fingerprint_of`): a run reads each
# file once, although a push records the marker twice and an overwritten folder is checked three times.
_KNOWN: dict[tuple[int, int], tuple[tuple[int, int, int], dict[str, Any], bool]] = {}
_KNOWN_LIMIT = 4096  # a long-running service forgets them all now and then: the cost is one more read
# File times advance in ticks (a few ms; 1-2 s on some filesystems): a file changed this shortly before it was
# hashed could change again within the same tick without its times showing it.
_SETTLED_NS = 2 * 10**9
# What `staged_output` calls right before renaming a complete staging folder into place (`checked_rename`).
_RENAME_CHECK: ContextVar[Callable[[], None] | None] = ContextVar("hf_mudsc_rename_check", default=None)
#: How long a writer waits for another run writing into the same output folder (`folder_lock`) before it refuses:
#: the other holds the lock only while it reads the marker and renames a few files into place.
LOCK_WAIT_SECONDS = 60.0


def check_output(
    output: str | os.PathLike,
    *,
    overwrite: bool,
    inputs: Iterable[tuple[str, str | os.PathLike]] = (),
    flag: str = "--output",
) -> None:
    """Refuse an output that would harm anything, before any heavy work.

    Refused: the current directory or a folder containing it; a folder inside a model folder the writer wrote
    (`written_around`: its later `overwrite` would be refused for good); a folder equal to, inside or around one of
    `inputs` (`(description, path)` pairs, compared after resolving `..` and symlinks); a location that
    cannot be written (under a file, a name too long, a folder without write access); an existing output
    without `overwrite`; and, even with it, any folder whose every file is not listed, unchanged, in the
    writer's marker — so `overwrite` never deletes a file hf-mudsc did not write.

    Raises:
        FileExistsError: the output exists and may not be replaced (the message says why and names files).
        OutputLocationError: the location cannot be written (a `ValueError`).
        ValueError: the output overlaps an input.
    """
    if looks_like_token(os.fspath(output)):  # the folder's name is the card's title and the recipe's comment
        raise OutputLocationError(f"{flag} looks like a Hugging Face access token (not shown); {TOKEN_FIX}")
    try:  # the card and the recipe name the folder in UTF-8
        os.fspath(output).encode("utf-8")
    except UnicodeEncodeError:
        raise OutputLocationError(f"{flag} {os.fspath(output)!r} holds bytes that are not UTF-8 text; choose a "
                                  f"{flag} of UTF-8 characters") from None
    output = Path(output).expanduser()
    if not os.path.lexists(output):
        check_location(output, flag=flag)  # first: a name too long for the filesystem breaks `resolve`
    try:
        resolved = output.resolve()
    except (RuntimeError, OSError) as error:  # a link loop (RuntimeError before Python 3.13)
        raise OutputLocationError(f"{flag} {str(output)!r} is a symbolic link that never reaches a folder (a loop); "
                                  f"remove the link or choose another {flag}") from error
    shown = str(output)
    cwd = Path.cwd().resolve()
    if cwd == resolved or cwd.is_relative_to(resolved):
        raise FileExistsError(
            f"refusing {flag} {shown!r}: it is the current directory or contains it, which hf-mudsc never "
            f"replaces; pass a new sub-folder, e.g. {flag} merged-model"
        )
    for description, path in inputs:
        source = Path(path).expanduser().resolve()
        if resolved == source or source.is_relative_to(resolved) or resolved.is_relative_to(source):
            raise ValueError(
                f"{flag} {shown!r} overlaps the {description} {str(source)!r}; inputs are never modified, "
                f"choose a {flag} outside it"
            )
    written = written_around(resolved)
    if written is not None:
        raise FileExistsError(
            f"refusing {flag} {shown!r}: it lies inside {str(written)!r}, a model folder hf-mudsc wrote (it holds "
            f"{MARKER_FILENAME}); a folder in it would keep that model from ever being replaced, so choose a {flag} "
            "outside it"
        )
    if not os.path.lexists(output):
        return
    refusal = overwrite_refusal(output, flag, check_content=overwrite)
    switch = "--overwrite" if flag.startswith("--") else "overwrite=True"  # CLI flag or API argument
    if refusal is not None:  # said at once: the advice to pass overwrite would only be refused in turn
        reason, fix = refusal
        if overwrite:
            raise FileExistsError(f"refusing to overwrite {shown!r}: {reason}; {fix}")
        what = ("a symbolic link" if output.is_symlink() else "a folder" if output.is_dir() else "a file")
        raise FileExistsError(f"{flag} {shown!r} already exists ({what}), and {switch} would not replace it: "
                              f"{reason}; {fix}")
    if not overwrite:
        raise FileExistsError(
            f"the output folder {shown!r} already exists; pass {switch} to replace it, "
            f"or choose another {flag}"
        )


def overwrite_refusal(output: Path, flag: str = "--output", *, check_content: bool = True) -> tuple[str, str] | None:
    """Why `overwrite` would refuse to replace the existing `output`, and the fix — (reason, fix) — or None when it
    would replace it (an empty folder, or one hf-mudsc wrote whose files are as it wrote them). Asked before
    overwrite is suggested, so that the first refusal already gives the reason and fix that apply; without
    `check_content` the files hf-mudsc listed are not hashed (a model's weights: seconds to read, only to advise)."""
    if output.is_symlink():
        return ("it is a symbolic link, and the output is replaced by a rename that would not write through it",
                f"pass the link's target as {flag}")
    if not output.is_dir():
        return "it is not a folder written by hf-mudsc", f"delete it yourself or choose another {flag}"
    if not any(output.iterdir()):
        return None  # an empty folder: nothing to lose
    if read_marker(output) is None:
        earlier = (output / RECIPE_FILENAME).is_file()
        return (f"it is not a folder written by hf-mudsc (no {MARKER_FILENAME} listing its files"
                + ("; it holds a recipe, but a recipe may be downloaded anywhere and an earlier hf-mudsc wrote "
                   "no list" if earlier else "") + ")", f"delete it yourself or choose another {flag}")
    foreign, changed = unlisted_files(output, check_content=check_content)
    if foreign or changed:
        reasons = []
        if foreign:
            reasons.append(f"it holds files hf-mudsc did not write: {_names(foreign)}")
        if changed:
            reasons.append(f"files changed since hf-mudsc wrote them: {_names(changed)}")
        return "; ".join(reasons), f"move them out (or delete the folder yourself) or choose another {flag}"
    return None


def written_around(path: Path) -> Path | None:
    """The nearest folder around `path` (resolved) that the writer wrote (it holds a complete marker), else None: an
    output nested in one would be a file the marker does not list, and `overwrite` of the outer one refuses those.
    A staging folder (its marker incomplete) is no output yet: what is written inside it becomes part of it."""
    for folder in path.parents:
        try:
            if (read_marker(folder) or {}).get("complete"):
                return folder
        except OSError:  # a folder we may not look into: not one we wrote
            continue
    return None


def check_location(output: str | os.PathLike, *, flag: str = "--output") -> None:
    """Refuse a new output that cannot be created: fail in a second, not after the merge."""
    output = Path(output).expanduser().absolute()
    shown = str(output)
    existing = output.parent
    missing = [output.name]
    while not os.path.lexists(existing):
        missing.insert(0, existing.name)
        existing = existing.parent
    brief = shown if len(shown) <= 80 else f"{shown[:60]}...{shown[-17:]}"
    if len(missing) > MAX_NEW_FOLDERS:  # creating them recurses once per level (`Path.mkdir(parents=True)`)
        raise OutputLocationError(
            f"{flag} {brief!r} would create {len(missing)} nested folders (hf-mudsc creates at most "
            f"{MAX_NEW_FOLDERS}); choose a {flag} in an existing folder"
        )
    try:
        path_limit = os.pathconf(existing, "PC_PATH_MAX")
    except (OSError, ValueError):
        path_limit = 4096
    length = len(os.fsencode(shown)) + STAGING_SUFFIX_LENGTH + 1
    if length >= path_limit:  # the staging sibling's files would fail to open after the merge
        raise OutputLocationError(
            f"{flag} {brief!r} is {length} bytes with hf-mudsc's temporary sibling, longer than this system's path "
            f"limit ({path_limit} bytes); choose a shorter {flag}"
        )
    if not existing.is_dir():
        raise OutputLocationError(
            f"{flag} {shown!r} is under the file {str(existing)!r}, which is not a folder; choose another {flag}"
        )
    try:
        limit = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    for name in missing:
        needed = len(os.fsencode(name)) + (STAGING_SUFFIX_LENGTH + 1 if name == output.name else 0)
        if needed > limit:
            raise OutputLocationError(
                f"{flag} {shown!r}: the name {name[:20]!r}... is too long for this filesystem ({limit} bytes "
                f"at most, including the {STAGING_SUFFIX_LENGTH + 1} of hf-mudsc's temporary sibling); "
                f"choose a shorter {flag}"
            )
    try:
        probe = tempfile.mkdtemp(prefix=".hf-mudsc-write-check-", dir=existing)
    except OSError as error:
        raise OutputLocationError(
            f"{flag} {shown!r}: cannot create a folder in {str(existing)!r} "
            f"({error.strerror or errno.errorcode.get(error.errno or 0, error)}); choose a {flag} in a folder "
            "you can write to"
        ) from None
    os.rmdir(probe)


# ---------------------------------------------------------------------------------------------- the marker


def read_marker(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The writer's marker of `folder`, or None when it has none (or an unreadable one)."""
    path = Path(folder) / MARKER_FILENAME
    if path.is_symlink() or not path.is_file() or path.stat().st_size > MARKER_MAX_BYTES:
        return None
    try:
        marker = parse_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # not JSON, or nested too deeply: not the writer's marker
        return None
    if not isinstance(marker, dict) or marker.get("written_by") != WRITER or not isinstance(
            marker.get("files"), dict):
        return None
    return marker


def weights_fingerprint(folder: str | os.PathLike) -> str | None:
    """One sha256 over what `folder`'s marker records of its weights files (`*.safetensors`: name, size, sha256):
    which model the writer put there, unchanged by a later `hf-mudsc evaluate` (it adds files, rewrites the card and
    the marker, never the weights) but not by a later merge replacing the folder. None: no marker (or no weights)."""
    files = (read_marker(folder) or {}).get("files") or {}
    weights = {name: entry for name, entry in files.items() if str(name).endswith(".safetensors")}
    if not weights:
        return None
    return hashlib.sha256(json.dumps(weights, sort_keys=True, default=str).encode()).hexdigest()


def check_not_replaced(folder: Path, fingerprint: str | None, doing: str, fix: str) -> None:
    """Refuse to write into `folder` about a model it no longer holds: its weights' `fingerprint` (read when the model
    was loaded) changed, i.e. another run (`merge --overwrite`) replaced the folder meanwhile."""
    if weights_fingerprint(folder) != fingerprint:
        raise FileExistsError(f"{str(folder)!r} was replaced while it was {doing} (another run wrote it meanwhile): "
                              f"nothing was written into it; {fix}")


def written_unchanged(path: str | os.PathLike, *, owner: str | os.PathLike | None = None) -> bool:
    """Whether `path` is a regular file its folder's marker lists with the size and sha256 it has now: one hf-mudsc
    wrote there and nobody changed since (what may be replaced in place, e.g. by `hf-mudsc evaluate`).
    `owner`: the folder whose marker lists the file, when it is not `path`'s own folder (e.g. `DIR/plots/x.png`)."""
    path = Path(path)
    if path.is_symlink() or not path.is_file() or path.stat().st_size > MARKER_MAX_BYTES:
        return False
    root = Path(owner) if owner is not None else path.parent
    key = path.absolute().relative_to(root.absolute()).as_posix()
    return _as_written(read_marker(root) or {}, key, path)


def _entries(marker: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """What `marker` says file `name` may be: its entry and, while a replacement of it is under way (or was stopped
    half-way), its new one (`REPLACING`)."""
    replacing = marker.get(REPLACING)
    found = [(marker.get("files") or {}).get(name), replacing.get(name) if isinstance(replacing, dict) else None]
    return [entry for entry in found if isinstance(entry, dict)]


def _as_written(marker: dict[str, Any], name: str, path: Path) -> bool:
    """Whether `path` (file `name` of the marker's folder) has the size and sha256 of an entry of it (`_entries`)."""
    entries = [entry for entry in _entries(marker, name) if entry.get("size") == path.stat().st_size]
    if not entries:
        return False
    sha256 = _fingerprint_of(path, settled=True)["sha256"]
    return any(entry.get("sha256") == sha256 for entry in entries)


def interrupted_replacement(folder: str | os.PathLike) -> list[str]:
    """The files of `folder` a run was replacing when it stopped without finishing (killed: its marker still says
    `REPLACING`): each is the old or the new one, so the folder may hold files of two runs side by side."""
    replacing = (read_marker(folder) or {}).get(REPLACING)
    return sorted(replacing) if isinstance(replacing, dict) else []


def record_files(folder: str | os.PathLike, *, complete: bool = True, staging: bool = False,
                 swaps_out_as: str | None = None) -> dict[str, Any]:
    """Write the marker of `folder`: every regular file in it (symlinks are never listed) with size and sha256.

    Called by `staged_output` when the block ends (and by writers that use a folder before that, e.g. to
    push it). `complete=False` is the marker a staging folder gets at once; `staging=True` records this
    process and host, so a leftover of a killed run can be told apart from a folder another run is writing
    (the final output carries neither). A complete marker first gives the files the usual modes
    (`_normalise_modes`): a chmod after hashing would move their ctime and cost another read. `swaps_out_as`: the
    staging folder's own name, recorded before `overwrite` swaps it in (`SWAPS_OUT_AS`).
    """
    folder = Path(folder)
    files = {}
    folders = []
    if complete:
        _normalise_modes(folder)
        for path in _walk(folder):
            if path.is_file() and not path.is_symlink():
                files[path.relative_to(folder).as_posix()] = _fingerprint_of(path, settled=False)
            elif path.is_dir() and not path.is_symlink():
                folders.append(path.relative_to(folder).as_posix())
    marker: dict[str, Any] = {"written_by": WRITER, "version": __version__, "complete": complete, "files": files}
    if complete:  # the sub-folders it wrote, so that one left empty is its own (`unlisted_files`)
        marker["folders"] = folders
    if staging:  # who is writing: a leftover is only removed once its writer is gone
        marker.update(pid=os.getpid(), host=socket.gethostname())
    if swaps_out_as is not None:
        marker[SWAPS_OUT_AS] = swaps_out_as
    _write_marker(folder, marker)
    return marker


def unlisted_files(folder: str | os.PathLike, *, check_content: bool = False) -> tuple[list[str], list[str]]:
    """`(foreign, changed)`: entries of `folder` the marker does not list (symlinks always count; a sub-folder counts
    unless the marker lists it or a file in it, so an empty one the user made is never deleted with the rest), and —
    with `check_content` — listed files whose size or sha256 differ from what was written."""
    folder = Path(folder)
    marker = read_marker(folder) or {}
    listed = {**(marker.get(REPLACING) if isinstance(marker.get(REPLACING), dict) else {}), **marker.get("files", {})}
    folders = marker.get("folders")
    owned = {str(parent) for name in listed for parent in PurePosixPath(name).parents} | set(
        folders if isinstance(folders, list) else ())
    foreign, changed = [], []
    for path in _walk(folder):
        name = path.relative_to(folder).as_posix()
        if path.is_dir() and not path.is_symlink():
            if name not in owned and not any(path.iterdir()):  # a non-empty one: its entries are named
                foreign.append(f"{name}/")  # said as a folder: "did not write: drafts/"
            continue
        entry = listed.get(name)
        if entry is None and is_left_temporary(path):  # the writer's own, of a run that was killed
            continue
        if path.is_symlink() or not path.is_file() or not isinstance(entry, dict):
            foreign.append(name)
        elif check_content and not _as_written(marker, name, path):
            changed.append(name)
    return foreign, changed


def changed_files(folder: str | os.PathLike, *, ignore: Iterable[str] = ()) -> list[str]:
    """Files the marker of `folder` lists that are no longer as written: their size or sha256 differ, or they are gone
    (named `NAME (deleted)`), except those in `ignore`. A folder whose files changed is no longer the merge its card
    and recipe describe: `push` and `evaluate` refuse to publish or describe it as that merge. The files hf-mudsc
    itself rewrites later (`evaluate`'s card and results, `inspect`'s plots) are recorded as they are written
    (`write_file_atomically`), so they never count."""
    folder = Path(folder)
    listed = (read_marker(folder) or {}).get("files", {})
    skip = set(ignore) | set(listed_outside(folder))  # never read a name outside the folder
    _, changed = unlisted_files(folder, check_content=True)
    gone = [f"{name} (deleted)" for name in sorted(listed)
            if name not in skip and not (folder / name).is_file() and not (folder / name).is_symlink()]
    return sorted([name for name in changed if name not in skip] + gone)


def listed_outside(folder: str | os.PathLike) -> list[str]:
    """Names the marker of `folder` lists that cannot be files of the folder: absolute, or with `..` (or `.`, or
    empty) parts. hf-mudsc records only relative names of files it wrote inside; such a name means the marker was
    crafted, and whatever reads the list (a push uploads it) would reach files elsewhere on this machine."""
    listed = (read_marker(folder) or {}).get("files", {})
    return sorted(name for name in listed if _is_outside(name))


def _is_outside(name: str) -> bool:
    """Whether a name the marker lists cannot be a file of its folder (`listed_outside`)."""
    return not name or name.startswith("/") or bool({"", ".", ".."} & set(name.split("/")))


def _walk(folder: Path) -> Iterator[Path]:
    """Every entry under `folder` except the marker, sorted; symlinked folders are not entered."""
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(dirs + files):
            path = Path(root) / name
            if path.parent == folder and name == MARKER_FILENAME:
                continue
            yield path


def _fingerprint(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def _fingerprint_of(path: Path, *, settled: bool) -> dict[str, Any]:
    """`_fingerprint(path)`, read once per run: reused while the file's inode, size, mtime and ctime are unchanged.

    `settled=True` (accepting a folder for replacing): reused only if the file had not changed for `_SETTLED_NS`
    when it was hashed, so that any later change moves its times. Recording a file may reuse any: a stale record
    can only make a later `--overwrite` refuse the folder, never delete a changed file.
    """
    now = path.stat()
    key, state = (now.st_dev, now.st_ino), (now.st_size, now.st_mtime_ns, now.st_ctime_ns)
    known = _KNOWN.get(key)
    if known is not None and known[0] == state and (known[2] or not settled):
        return dict(known[1])
    started = time.time_ns()
    fingerprint = _fingerprint(path)
    if len(_KNOWN) >= _KNOWN_LIMIT:
        _KNOWN.clear()
    _KNOWN[key] = (state, dict(fingerprint), now.st_mtime_ns < started - _SETTLED_NS)
    return fingerprint


def _marker_text(marker: dict[str, Any]) -> str:
    return json.dumps(marker, indent=1, sort_keys=True) + "\n"


def _write_marker(folder: Path, marker: dict[str, Any]) -> None:
    temporary = _marker_temporary(folder, marker)
    try:
        os.replace(temporary, folder / MARKER_FILENAME)
    finally:
        if os.path.lexists(temporary):  # only when the rename failed
            temporary.unlink()


def _marker_listings(root: Path, written: Iterable[tuple[Path, Path]], *, finished: Iterable[str] | None = None
                     ) -> tuple[Path, Path] | None:
    """`root`'s marker, when it has a complete one, as two temporary files (`_marker_temporary`) to rename onto it:
    before the files `(path, temporary)` are put in place, one listing their new entries under `REPLACING` besides
    their current ones; after, one listing each under `root` with the temporary's content. None when `root` has no
    complete marker (nothing to record). The final marker ends the `REPLACING` entries of `finished` (None: all) that
    a killed run left and this one does not rewrite (an evaluate that draws no chart), by what the file holds now:
    its new entry if it matches that, else its listed one if it matches that (kept), else neither (the file is
    refused, as one the writer cannot vouch for); the others stay, for the next writer to end."""
    marker = read_marker(root)
    if marker is None or not marker.get("complete"):
        return None
    new = {path.relative_to(root).as_posix(): _fingerprint_of(temporary, settled=False)
           for path, temporary in written if path.is_relative_to(root)}
    replacing = marker.pop(REPLACING, None)
    replacing = replacing if isinstance(replacing, dict) else {}
    ending = {name for name in replacing if name not in new and (finished is None or name in set(finished))}
    settled = {name: replacing[name] for name in sorted(ending)
               if not _is_outside(name) and _holds(root / name, replacing[name])}
    final = {**marker, "files": {**marker["files"], **settled, **new}}
    left = {name: entry for name, entry in replacing.items() if name not in new and name not in ending}
    if left:
        final[REPLACING] = left
    journal = _marker_temporary(root, {**marker, REPLACING: {**replacing, **new}})
    try:
        return journal, _marker_temporary(root, final)
    except BaseException:
        journal.unlink(missing_ok=True)
        raise


def _holds(path: Path, entry: Any) -> bool:
    """Whether `path` is a regular file with the size and sha256 of the marker's `entry`."""
    if (not isinstance(entry, dict) or path.is_symlink() or not path.is_file()
            or path.stat().st_size != entry.get("size")):
        return False
    return _fingerprint_of(path, settled=True)["sha256"] == entry.get("sha256")


def _marker_temporary(folder: Path, marker: dict[str, Any]) -> Path:
    """`marker` written to a temporary file in `folder`, to be renamed onto the marker. A failure (a full disk, a
    Ctrl-C) removes it: a half-written file left there is one `overwrite` refuses as not the writer's."""
    temporary = temporary_beside(folder / MARKER_FILENAME)
    try:
        temporary.write_text(_marker_text(marker), encoding="utf-8")
        temporary.chmod(0o666 & ~_umask())  # a plain file's mode: others sharing the output read it to push/evaluate
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return temporary


def _names(names: list[str], limit: int = 10) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


#: The names hf-mudsc's writers (and transformers' `save_pretrained` of a model and its processor) put in a folder:
#: a killed run's staging folder holding anything else has had someone else's files put in it, and is left alone.
_STAGED_NAMES = re.compile(
    r"(config|generation_config|preprocessor_config|processor_config|tokenizer|tokenizer_config|special_tokens_map"
    r"|added_tokens|vocab|chat_template|model\.safetensors\.index|merge_diagnostics|eval_results)\.json"
    r"|model(-\d+-of-\d+)?\.safetensors|vocab\.txt|merges\.txt|chat_template\.jinja|[\w.-]+\.model"
    r"|README\.md|mudsc_recipe\.yaml|" + re.escape(MARKER_FILENAME) + r"(\.[0-9a-f]+\.tmp)?")


def _foreign_entry(folder: Path) -> str | None:
    """The first entry of a staging folder that no writer of hf-mudsc makes (plots hold only `.png` files), else
    None."""
    for entry in sorted(folder.iterdir()):
        if entry.name == "plots" and entry.is_dir() and not entry.is_symlink():
            stray = next((p for p in sorted(entry.iterdir()) if p.is_symlink() or not p.is_file()
                          or (p.suffix != ".png" and not _TEMPORARY_NAME.fullmatch(p.name))), None)
            if stray is not None:
                return f"plots/{stray.name}"
        elif entry.is_symlink() or not entry.is_file() or not (_STAGED_NAMES.fullmatch(entry.name)
                                                               or _TEMPORARY_NAME.fullmatch(entry.name)):
            return entry.name
    return None


def push_only_target() -> Path:
    """What `staged_output(None)` (a push without an output folder) stages as: `.hf-mudsc.partial-*` folders in the
    temp folder, whose leftovers `clean_leftovers(push_only_target())` removes."""
    return Path(tempfile.gettempdir()) / "hf-mudsc"


def clean_leftovers(output: str | os.PathLike) -> list[Path]:
    """Delete staging folders of `output` left by a killed run: only `.{name}.partial-*` folders that carry
    the writer's marker, whose writing process (on this host) is gone, and that hold only what the writers write
    (`_foreign_entry`: one holding anything else is kept, and said); and the old copies an interrupted `overwrite`
    left (`old_copies_left`). Returns what was deleted."""
    target = Path(output).expanduser().absolute()
    if not target.parent.is_dir():
        return []
    removed = old_copies_left(target)
    for candidate in target.parent.glob(f".{glob.escape(target.name)}{PARTIAL_MARK}*"):
        if candidate.is_symlink() or not candidate.is_dir():
            continue
        marker = read_marker(candidate)
        if marker is None:  # killed before its first marker, or a folder someone else made: never deleted
            logger.warning("left %s in place: it looks like an interrupted run's staging folder of %s, but it has no "
                           "%s proving hf-mudsc wrote it; if no hf-mudsc run is writing %s now, remove the folder "
                           "yourself once nothing in it is yours", candidate, target, MARKER_FILENAME, target)
            continue
        if marker.get("complete") and "pid" not in marker and "host" not in marker:
            # A finished output under a staging name: deleted only when it is the old copy an atomic `overwrite`
            # swapped out (`exchange_paths`) before its rename to `.{name}.old-*` — the output in place names this
            # very folder (`SWAPS_OUT_AS`), a name of mkdtemp's shape; any other (a user's `cp -a out
            # .out.partial-keep`) is theirs, and kept without a word.
            if swapped_out_copy(candidate, target) and _remove_old_copy(candidate, target):
                removed.append(candidate)
            continue
        if marker.get("host") != socket.gethostname() or _pid_alive(marker.get("pid")):
            continue
        foreign = _foreign_entry(candidate)
        if foreign is not None:
            logger.warning("left %s in place: it looks like an interrupted run's staging folder but holds %r, which "
                           "hf-mudsc does not write; remove the folder yourself once nothing in it is yours",
                           candidate, foreign)
            continue
        if not _remove_marker_last(candidate, ignore_errors=True):
            logger.warning("could not wholly remove %s, left by an interrupted run; the next run writing %s tries "
                           "again, or delete it yourself", candidate, target)
            continue
        logger.info("removed %s, left by an interrupted run", candidate)
        removed.append(candidate)
    return removed


def swapped_out_copy(candidate: Path, target: Path) -> bool:
    """Whether `candidate` is where an atomic `overwrite` of `target` swapped the old output out: the output in place
    (a folder) names it in its marker (`SWAPS_OUT_AS`), and the name is a staging folder's as mkdtemp makes it."""
    prefix = f".{target.name}{PARTIAL_MARK}"
    if not candidate.name.startswith(prefix) or not _STAGING_SUFFIX.fullmatch(candidate.name[len(prefix):]):
        return False
    if not target.is_dir() or target.is_symlink():
        return False
    return (read_marker(target) or {}).get(SWAPS_OUT_AS) == candidate.name


def old_copies_left(target: Path) -> list[Path]:
    """Delete what is left of replaced outputs of `target`: `.{name}.old-XXXXXXXX` folders (the writer's names: 8 hex
    digits) an `overwrite` interrupted (or failed) while deleting them, once `target` exists (the new output is in
    place: else one may be the only copy) and only when the folder's complete marker lists its every file unchanged
    (deleted marker last, so a half-deleted copy still proves it); any other such folder is kept, and said. Returns
    what was deleted."""
    removed: list[Path] = []
    if not target.is_dir():
        return removed
    own_name = re.compile(re.escape(f".{target.name}{OLD_MARK}") + f"[0-9a-f]{{{OLD_SUFFIX_DIGITS}}}")
    for candidate in sorted(target.parent.glob(f".{glob.escape(target.name)}{OLD_MARK}*")):
        if candidate.is_symlink() or not candidate.is_dir() or not own_name.fullmatch(candidate.name):
            continue  # a name the writer never gives its backups (a user's `cp -a out .out.old-before-retrain`)
        if _remove_old_copy(candidate, target):
            removed.append(candidate)
    return removed


def _remove_old_copy(candidate: Path, target: Path) -> bool:
    """Delete `candidate`, an old copy of `target` a killed or failed `overwrite` left, only when its complete marker
    lists its every file unchanged (marker deleted last); else keep it, and say so. Whether it was deleted."""
    try:
        marker = read_marker(candidate)
        foreign, changed = unlisted_files(candidate, check_content=True) if marker else ([], [])
        if not marker or not marker.get("complete") or foreign or changed or listed_outside(candidate):
            logger.warning("left %s in place: it looks like an old copy of %s that an interrupted --overwrite "
                           "left, but %s; remove the folder yourself once nothing in it is yours", candidate,
                           target, f"it holds files hf-mudsc did not write (or that changed since): "
                           f"{_names(foreign + changed)}" if foreign or changed else
                           f"it has no complete {MARKER_FILENAME} proving hf-mudsc wrote it")
            return False
        _remove_marker_last(candidate)
    except OSError as error:  # another run deleting it too, a file that may not be deleted
        logger.warning("could not remove %s, an old copy of %s (%s); delete it yourself", candidate, target, error)
        return False
    logger.info("removed %s, an old copy of %s left by an interrupted --overwrite", candidate, target)
    return True


# ----------------------------------------------------------------------------------------------- writing


def without_dot_dot(path: Path) -> Path:
    """`path` with its folder's `..` resolved as the system resolves them (symlinks included): creating the folders
    of `nope/../out` first would leave an empty `nope` behind. A path without `..` is returned as given."""
    if ".." not in path.parent.parts:
        return path
    return Path(os.path.realpath(path.parent)) / path.name


@contextmanager
def checked_rename(check: Callable[[], None]) -> Iterator[None]:
    """Within the block, `check()` runs right before a staged output is renamed into place: the last moment a run
    can still stop and leave nothing behind. Whatever it raises discards the staging folder and leaves the output
    untouched (the service's worker raises there once its server is gone or a cancel came: `serve.worker`)."""
    token = _RENAME_CHECK.set(check)
    try:
        yield
    finally:
        _RENAME_CHECK.reset(token)


@contextmanager
def staged_output(
    output: str | os.PathLike | None,
    *,
    overwrite: bool = False,
    keep_existing: bool = False,
    inputs: Iterable[tuple[str, str | os.PathLike]] = (),
    flag: str = "--output",
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
        inputs, flag: as for `check_output`.

    The output gets the writer's marker (`MARKER_FILENAME`) listing every file written in the block.

    Raises:
        FileExistsError: `output` exists (on entry or, written meanwhile by someone else, at the end) and
            neither `overwrite` nor `keep_existing` allows it; then nothing is changed.
    """
    target = without_dot_dot(Path(output).expanduser().absolute()) if output is not None else None
    if target is not None and not keep_existing:
        check_output(target, overwrite=overwrite, inputs=inputs, flag=flag)
    elif target is not None and not os.path.lexists(target):
        check_location(target, flag=flag)
    staged_as = target if target is not None else push_only_target()
    parent, name = staged_as.parent, staged_as.name
    # The folders made on the way to the output, deepest first: removed again if the block fails.
    created = list(itertools.takewhile(lambda folder: not os.path.lexists(folder), (parent, *parent.parents)))
    finished = False
    try:
        parent.mkdir(parents=True, exist_ok=True)  # a failure half-way (quota, read-only) removes what it made
        clean_leftovers(staged_as)  # a killed run's staging folder of this output (push-only: the temp folder's)
        existed = target is not None and os.path.lexists(target)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}{PARTIAL_MARK}", dir=parent))
        try:
            record_files(staging, complete=False, staging=True)
            staging.chmod(0o777 & ~_umask())  # mkdtemp makes 0700: the output gets the usual permissions
            yield staging
            if target is not None:
                # Complete, and still naming this process until it is in place: killed meanwhile (the old folder's
                # check before the swap hashes a whole model), it is a leftover the next run removes.
                record_files(staging, staging=True, swaps_out_as=staging.name)
                check = _RENAME_CHECK.get()
                if check is not None:
                    check()
                _move_into_place(staging, target, overwrite=overwrite, keep_existing=keep_existing, flag=flag,
                                 existed=existed)
            finished = True
        finally:  # marker last: interrupted again meanwhile, what is left is still known as a leftover
            if staging.is_dir():
                _remove_marker_last(staging, ignore_errors=True)
    finally:
        if not finished:
            remove_empty_folders(created)


def _identity(path: Path, *, follow: bool = False) -> tuple[int, int] | None:
    """(device, inode) of `path`, None if absent: the same folder under another name. A link is not followed unless
    `follow` (what `os.open` reaches: the folder a writer given a link to it locks and writes into)."""
    try:
        found = os.stat(path) if follow else os.lstat(path)
    except OSError:
        return None
    return found.st_dev, found.st_ino


def remove_empty_folders(folders: Iterable[Path]) -> None:
    """Remove `folders` (deepest first) this run created, stopping at the first that is not empty: someone else
    may have put a file there meanwhile, and it is never deleted."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def write_file_atomically(path: str | os.PathLike, write: Callable[[Path], None], *,
                          owner: str | os.PathLike | None = None) -> Path:
    """`write(temporary_path)`, then rename it onto `path`: readers see the old file or the whole new one.

    The temporary file sits next to `path` (renames are atomic within a folder, and no copy of the old file is ever
    made: a SIGKILL leaves the old file or the new one, and at most a temporary file the next run removes) and gets
    the mode a plain `open()` would give; on any failure it is removed and `path` is untouched. In a folder the writer
    made (it has the marker), the file is recorded in the marker, so `--overwrite` still knows it as its own.
    `owner`: the folder whose marker lists the file, when it is not `path`'s own folder (e.g. `DIR/plots/x.png`).
    """
    path = without_dot_dot(Path(path))
    written = path.absolute()
    root = without_dot_dot(Path(owner)).absolute() if owner is not None else written_around(written)
    _put_in_place([(path, write)], root=root, finished=())
    return path


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Ctrl-C and SIGTERM arriving within the block take effect once it ends, through the handler they would have met
    (the CLI's raises KeyboardInterrupt): for a few renames that must all happen or none, since an interrupt between
    two of them would leave files of two runs side by side. Outside the main thread (signals are handled there only),
    or under a handler set outside Python, the block just runs; an ignored signal stays ignored."""
    import signal
    import threading

    numbers = (signal.SIGINT, signal.SIGTERM)
    previous = {number: signal.getsignal(number) for number in numbers}
    if threading.current_thread() is not threading.main_thread() or None in previous.values():
        yield
        return
    arrived: list[tuple[int, Any]] = []
    deferred = [number for number, handler in previous.items() if handler is not signal.SIG_IGN]
    for number in deferred:
        signal.signal(number, lambda number, frame: arrived.append((number, frame)))
    try:
        yield
    finally:
        for number in deferred:
            signal.signal(number, previous[number])
        if arrived:
            number, frame = arrived[0]
            handler = previous[number]
            if callable(handler):
                handler(number, frame)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(number)


def replace_files_together(writes: Iterable[tuple[str | os.PathLike, Callable[[Path], None]]], *,
                           owner: str | os.PathLike) -> list[Path]:
    """Replace several files as one change, for files that describe one another (an evaluation's results file, the
    chart drawn from it and the card quoting it): a failure or an interrupt never leaves one run's file beside
    another's, which `push` would publish together as the marker lists both.

    Each `(path, write)` is first written by `write(temporary)` to a temporary sibling (a failure there changes
    nothing), then put in place by `_put_in_place`: a failure on the way puts the previous files (and marker) back,
    Ctrl-C and SIGTERM wait for the renames, and a SIGKILL among them leaves each file old or new, the marker saying
    which may be either (`REPLACING`: `push` refuses the folder until the next of these runs ends them, each by
    what the file then holds: `_marker_listings`).
    Returns the paths written."""
    root = without_dot_dot(Path(owner)).absolute()
    return _put_in_place([(without_dot_dot(Path(path)).absolute(), write) for path, write in writes], root=root)


def _put_in_place(writes: list[tuple[Path, Callable[[Path], None]]], *, root: Path | None,
                  finished: Iterable[str] | None = None) -> list[Path]:
    """Write each file to a temporary sibling (`temporary_beside`), then rename them all onto their paths with
    Ctrl-C and SIGTERM deferred. `root`'s marker, when it has a complete one, is first replaced by one naming the new
    files as being put in place (`REPLACING`), and last by one listing them (`_marker_listings`, `finished` as
    there). Never is a file renamed aside: a SIGKILL leaves every path with its old or its new file (and the
    killed run's temporary files, which the next run's `clean_temporaries` removes). On a failure the files already
    replaced get their previous content back (held in memory: these are cards, results and charts)."""
    staged: list[tuple[Path, Path]] = []
    listings: tuple[Path, Path] | None = None
    began_in = _identity(root, follow=True) if root is not None and root.is_dir() else None  # where files go
    try:
        for folder in dict.fromkeys([*(path.parent for path, _ in writes), *([root] if root is not None else [])]):
            if folder.is_dir():
                clean_temporaries(folder)
        mode = 0o666 & ~_umask()  # read once, not once per file
        for path, write in writes:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = temporary_beside(path)
            staged.append((path, temporary))
            write(temporary)
            temporary.chmod(mode)
        # One writer at a time from reading the marker to the last rename: another run's marker read meanwhile
        # would be renamed over this one's, dropping the files this run put in place (`folder_lock`).
        with folder_lock(root) if root is not None and root.is_dir() else nullcontext():
            if root is not None and began_in is not None and _identity(root, follow=True) != began_in:
                raise FileExistsError(
                    f"{str(root)!r} was replaced by another hf-mudsc run (merge --overwrite) while this one was "
                    "writing into it: nothing was written into the new folder; run again to write into it"
                )
            # The marker names the new files before any is in place: a full disk fails here and changes nothing.
            listings = _marker_listings(root, staged, finished=finished) if root is not None else None
            renames = list(staged)
            if listings is not None and root is not None:
                renames = [(root / MARKER_FILENAME, listings[0]), *staged, (root / MARKER_FILENAME, listings[1])]
            with interrupts_deferred():  # the files and their marker entries, or none
                _rename_all(renames)
    finally:
        for temporary in [*(temporary for _, temporary in staged), *(listings or ())]:
            temporary.unlink(missing_ok=True)
    return [path for path, _ in staged]


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold `folder`'s writer lock within the block: an advisory `flock` on the folder itself (no lock file: one
    would be a file the marker does not list, and the lock ends with its process, even a killed one). Two runs
    (`evaluate`, `inspect`: `_put_in_place`) that rewrite the marker then do so one after the other, each reading the
    marker the other left. Waits up to `LOCK_WAIT_SECONDS`, then refuses in one line; where the system has
    no `flock` (Windows), the block runs unlocked, as before. The lock held is that of the folder at `folder` once
    it is locked: one `overwrite` swapped out meanwhile (`_move_into_place` holds the lock to swap) is let go, and
    the new one's taken."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while True:
        try:
            handle = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError as error:  # a folder that may be written but not read: unlocked, as before
            logger.debug("no writer lock on %s (%s)", folder, error)
            yield
            return
        try:
            locked = _flock_until(fcntl, handle, folder, deadline)
            if locked and _identity(folder, follow=True) != _handle_identity(handle):
                # the folder was swapped while this run waited: lock the one there now (finally closes), within the
                # same deadline
                _refuse_past(deadline, folder)
                time.sleep(0.05)
                continue
            yield
            return
        finally:
            os.close(handle)  # releases the lock


def _refuse_past(deadline: float, folder: Path) -> None:
    """Refuse in one line once `deadline` has passed while waiting for `folder`'s writer lock."""
    if time.monotonic() >= deadline:
        raise FileExistsError(
            f"another hf-mudsc run is writing into {str(folder)!r} (this one waited {LOCK_WAIT_SECONDS:g} s for its "
            "lock): nothing was written into it; run again once that run ends"
        ) from None


def _flock_until(fcntl: Any, handle: int, folder: Path, deadline: float) -> bool:
    """Take the exclusive `flock` of `handle` (the folder `folder`), waiting until `deadline`, then refusing in one
    line. False when the filesystem has no locks (some network mounts): the caller runs unlocked, as before."""
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            _refuse_past(deadline, folder)
            time.sleep(0.05)
        except OSError as error:
            logger.debug("no writer lock on %s (%s)", folder, error)
            return False


def _handle_identity(handle: int) -> tuple[int, int]:
    found = os.fstat(handle)
    return found.st_dev, found.st_ino


def temporary_beside(path: Path) -> Path:
    """A new, empty file next to `path` for its next content, named as only the writer names files
    (`TEMPORARY_MARK`, with this host and process: `clean_temporaries` removes it once that process is gone)."""
    while True:
        temporary = path.with_name(f"{'' if path.name.startswith('.') else '.'}{path.name}{TEMPORARY_MARK}"
                                   f"{_host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        try:
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            continue
        return temporary


def _host_tag() -> str:
    """This host in a temporary file's name: 8 hex digits of its name's sha256 (fixed length, no odd characters)."""
    return hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def is_left_temporary(path: Path) -> bool:
    """Whether `path` is a temporary file a writer of hf-mudsc left (`temporary_beside`'s name, a regular file) whose
    process, on this host, is gone: a killed run's, which nothing will ever rename into place."""
    found = _TEMPORARY_NAME.fullmatch(path.name)
    return (found is not None and found["host"] == _host_tag() and not _pid_alive(int(found["pid"]))
            and path.is_file() and not path.is_symlink())


def clean_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files killed writers left in `folder` (`is_left_temporary`): only the writer's exact
    names, of a process of this host that is gone. Returns what was deleted."""
    removed = []
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        if is_left_temporary(entry):
            try:
                entry.unlink()
            except OSError as error:
                logger.warning("could not remove %s, left by an interrupted run (%s); delete it yourself", entry, error)
                continue
            logger.info("removed %s, left by an interrupted run", entry)
            removed.append(entry)
    return removed


def _rename_all(staged: list[tuple[Path, Path]]) -> None:
    """Rename each temporary file onto its path (`os.replace`: atomic, nothing renamed aside). On any failure the
    paths already replaced get their previous content back, read before each was replaced (one that did not exist
    is removed again)."""
    done: list[tuple[Path, tuple[str, Any] | None]] = []
    try:
        for path, temporary in staged:
            if not any(path == placed for placed, _ in done):
                done.append((path, _previous(path)))
            os.replace(temporary, path)
    except BaseException:
        for path, previous in reversed(done):
            try:
                _restore(path, previous)
            except OSError as error:
                logger.error("could not put %s back as it was (%s)", path, error)
        raise


def _previous(path: Path) -> tuple[str, Any] | None:
    """What `path` holds now, to put back (`_restore`): None (nothing), a link's target, or a file's bytes and mode."""
    if not os.path.lexists(path):
        return None
    if path.is_symlink():
        return "link", os.readlink(path)
    return "file", (path.read_bytes(), stat.S_IMODE(path.stat().st_mode))


def _restore(path: Path, previous: tuple[str, Any] | None) -> None:
    """Put `_previous`'s record back at `path` by a rename of a temporary sibling (None: remove what is there)."""
    if previous is None:
        path.unlink(missing_ok=True)
        return
    temporary = temporary_beside(path)
    try:
        if previous[0] == "link":
            temporary.unlink()
            os.symlink(previous[1], temporary)
        else:
            temporary.write_bytes(previous[1][0])
            temporary.chmod(previous[1][1])
        os.replace(temporary, path)
    finally:
        if os.path.lexists(temporary):
            temporary.unlink()


def _move_into_place(staging: Path, target: Path, *, overwrite: bool, keep_existing: bool, flag: str,
                     existed: bool) -> None:
    """Rename the complete `staging` onto `target`; an existing `target` (with `overwrite`, checked again) is renamed
    aside first and deleted once the new folder is in place. Right after the rename, before that delete (seconds for a
    big model), the marker stops naming this process (`_drop_writer`)."""
    placed = _identity(staging)
    if not target.exists() and not target.is_symlink():
        try:
            os.rename(staging, target)
            _drop_writer(target, placed)
            return
        except OSError:
            if not target.exists():  # no race lost: a real error
                raise
    if keep_existing:
        return
    # The old folder's writer lock from its last check to the swap: a run writing into it (`evaluate`) finishes
    # before it is checked, or waits, then finds the new folder there and refuses (`_put_in_place`).
    with folder_lock(target) if target.is_dir() and not target.is_symlink() else nullcontext():
        backup = _swap_checked(staging, target, overwrite=overwrite, flag=flag, existed=existed, placed=placed)
    _delete_old_copy(target, backup)


def _swap_checked(staging: Path, target: Path, *, overwrite: bool, flag: str, existed: bool,
                  placed: tuple[int, int] | None) -> Path:
    """Check the existing `target` once more and put `staging` in its place: in one step where the system can
    (`exchange_paths`), else by two renames (the old folder put back on a failure); the marker then stops naming this
    process (`_drop_writer`). Returns where the old folder now is, to delete."""
    if existed:
        check_output(target, overwrite=overwrite, flag=flag)  # it may have changed since the first check
    else:  # absent when the run began: someone made it meanwhile
        _check_appeared(target, overwrite=overwrite, flag=flag)
    backup = target.with_name(f".{target.name}{OLD_MARK}{uuid.uuid4().hex[:OLD_SUFFIX_DIGITS]}")
    try:
        exchanged = exchange_paths(staging, target)
    except OSError:  # e.g. the old folder went meanwhile: the two renames below say what happened
        exchanged = False
    if exchanged:  # one step: the output path never lacks a folder; the old one is now at `staging`'s name
        try:
            os.rename(staging, backup)
        except OSError:  # deleted under the staging name then; a leftover there is an old copy (`clean_leftovers`)
            _drop_writer(target, placed, keep=(SWAPS_OUT_AS,))  # which the marker's staging name proves
            return staging
        _drop_writer(target, placed)
        return backup
    os.rename(target, backup)  # no atomic exchange here: two renames, the old folder put back on a failure
    try:
        os.rename(staging, target)
    except BaseException as error:
        try:
            os.rename(backup, target)
        except OSError as put_back:  # another run's folder took its place: the old copy is said, not lost
            logger.warning("could not put the replaced %s back (%s): the old copy is %s; the next run writing %s "
                           "removes it, or move it back yourself", target.name, put_back.strerror, backup, target)
        if isinstance(error, OSError) and error.errno in (errno.ENOTEMPTY, errno.EEXIST) and target.exists():
            _check_appeared(target, overwrite=False, flag=flag, replacing=overwrite)  # another run finished first
        raise
    _drop_writer(target, placed)
    return backup


def _delete_old_copy(target: Path, backup: Path) -> None:
    """Delete `backup`, the replaced output of `target` (the new one is in place), marker last."""
    try:
        _remove_marker_last(backup)
    except BaseException as error:  # Ctrl-C during a multi-GB delete, a file that may not be deleted: said, not lost
        logger.warning("the replaced %s was not wholly deleted (%s): the rest of the old copy is %s; the next run "
                       "writing %s removes it, or delete it yourself", target.name,
                       "interrupted" if isinstance(error, KeyboardInterrupt) else error, backup, target)
        if not isinstance(error, OSError):
            raise


_RENAME_EXCHANGE = 2  # renameat2's flag (linux/fs.h)
_AT_FDCWD = -100


def exchange_paths(first: Path, second: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux's `renameat2(RENAME_EXCHANGE)`): a kill at any moment
    leaves each path holding a folder. False where the system, its C library or the filesystem cannot (the caller
    then renames twice); any other failure is raised as an OSError."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # glibc before 2.28, musl without it
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    number = ctypes.get_errno()
    if number in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False  # kernel or filesystem without the exchange (EPERM: some seccomp filters)
    raise OSError(number, os.strerror(number), os.fspath(second))


def _drop_writer(target: Path, placed: tuple[int, int] | None, *, keep: Collection[str] = ()) -> None:
    """Rewrite the marker of `target`, just renamed in, without this process and host (the output names no writer)
    and without its staging name (`SWAPS_OUT_AS`, needed only while the replaced folder may sit under that name; kept
    if in `keep`), so that two runs writing the same files leave the same marker. The marker as it is now, not as
    recorded before the rename, so the files another run (`evaluate`) recorded in it meanwhile stay listed. Only while
    `target` is still the folder `placed` (its identity) and its marker names this process: another run's folder put
    there meanwhile keeps its own. Not done (a full disk): said, and harmless (only a staging folder's process is
    ever read: `clean_leftovers`)."""
    try:
        with folder_lock(target):  # another writer's marker rewrite (`_put_in_place`) is not lost to this one
            if placed is None or _identity(target) != placed:
                return
            marker = read_marker(target)
            if marker is None or marker.get("pid") != os.getpid() or marker.get("host") != socket.gethostname():
                return
            dropped = {"pid", "host", SWAPS_OUT_AS} - set(keep)
            _write_marker(target, {key: value for key, value in marker.items() if key not in dropped})
    except OSError as error:
        logger.warning("%s is in place and complete, but its %s still names this process and host (%s), which "
                       "nothing reads there", target, MARKER_FILENAME, error.strerror or error)


def _remove_marker_last(folder: Path, *, ignore_errors: bool = False) -> bool:
    """Delete a folder the writer wrote, its marker last: interrupted or failed half-way, what is left still carries
    the marker proving it the writer's, so `clean_leftovers` can remove it later. With `ignore_errors`, an entry that
    cannot be deleted keeps the marker (and the folder) and False is returned; else the error is raised."""
    try:
        for entry in sorted(folder.iterdir()):
            if entry.name == MARKER_FILENAME:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        (folder / MARKER_FILENAME).unlink(missing_ok=True)
        folder.rmdir()
    except OSError:
        if not ignore_errors:
            raise
        return False
    return True


def _check_appeared(target: Path, *, overwrite: bool, flag: str, replacing: bool = False) -> None:
    """Refuse a folder someone made while the run wrote its own, with the advice that fits what is there now:
    "pass --overwrite" only if `check_output` would then replace it (another hf-mudsc run's folder), else why not.
    `replacing`: the run had --overwrite and lost the race to another run's rename: "run again" is the advice."""
    try:
        check_output(target, overwrite=True, flag=flag)
    except FileExistsError as refused:
        detail = str(refused)
        prefix = f"refusing to overwrite {str(target)!r}: "
        raise FileExistsError(
            f"the output folder {str(target)!r} appeared while this run was writing it, and "
            + (detail[len(prefix):] if detail.startswith(prefix) else detail)
        ) from None
    if replacing:
        raise FileExistsError(
            f"the output folder {str(target)!r} appeared while this run was writing it (another run put its own in "
            f"place first, and it is kept); run again to replace it, or choose another {flag}"
        )
    if not overwrite:
        switch = "--overwrite" if flag.startswith("--") else "overwrite=True"
        raise FileExistsError(
            f"the output folder {str(target)!r} appeared while this run was writing it; pass {switch} to "
            f"replace it, or choose another {flag}"
        )


def _umask() -> int:
    """The process's umask, read without setting it where the system shows it (Linux: /proc/self/status): the
    set-and-restore fallback leaves it 0 for an instant, when another thread's new file would be world-writable."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _normalise_modes(folder: Path) -> None:
    """Give every staged file and folder the mode a plain `open()`/`mkdir()` would: some writers use
    `mkstemp` (0600), which would make a shared output unreadable to others. A file whose mode is right already
    is left alone: a chmod moves its ctime, and the fingerprint taken for a push would be read again."""
    umask = _umask()
    for path in folder.rglob("*"):
        if path.is_symlink():
            continue
        mode = (0o777 if path.is_dir() else 0o666) & ~umask
        if stat.S_IMODE(path.stat().st_mode) != mode:
            path.chmod(mode)
