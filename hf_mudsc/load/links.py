"""The one rule for symbolic links in a folder hf_mudsc reads a model from: none may lead out of it.

A folder unpacked from someone else's archive (or a tampered Hub cache) could link a file the merge reads and writes
back into the merged model — a vocabulary, a processor config, the weights — to any file of this machine, e.g. the
stored Hub token. The weights loader (`load.parents`) and the processor loader (`load.processors`) apply the same
check, so no file of a parent, its processor or tokenizer is read through such a link. A Hub cache snapshot's links
into its repo's `blobs/` are that layout, and allowed.
"""

from __future__ import annotations

import os
from pathlib import Path

from hf_mudsc.errors import LoadError

# The one subfolder transformers reads files from while loading a processor (a tokenizer's extra chat templates),
# which the writer saves into the merged model; weight shards in subfolders are checked one by one by the loader.
TEMPLATES_FOLDER = "additional_chat_templates"


def refuse_links_out(reference: str, folder: Path) -> None:
    """Refuse `folder` when one of its entries, or anything in its `TEMPLATES_FOLDER`, is a symbolic link to anything
    outside it (`refuse_link_out`). Other subfolders are not read (a training run's `wandb/` may link anywhere).
    Links are checked, not followed."""
    entries = sorted(folder.iterdir())
    templates = folder / TEMPLATES_FOLDER
    if templates.is_dir() and not templates.is_symlink():
        for root, directories, files in os.walk(templates, followlinks=False):
            entries += [Path(root) / name for name in sorted(directories + files)]
    for entry in entries:
        if entry.is_symlink():
            refuse_link_out(reference, folder, entry)


def refuse_link_out(reference: str, folder: Path, entry: Path) -> None:
    """Refuse `entry` (a file of `folder`, maybe in a subfolder) when it resolves to a file outside the folder (or,
    for a Hub cache snapshot, outside its repo's `blobs/`). `reference`: how the user named the model."""
    base = folder.resolve()
    roots = [base] + ([base.parent.parent / "blobs"] if base.parent.name == "snapshots" else [])
    try:
        target = entry.resolve()
    except (RuntimeError, OSError) as error:  # a link loop (RuntimeError before Python 3.13)
        raise LoadError(f"{reference!r}: {entry.relative_to(folder).as_posix()} is a symbolic link that never "
                        "reaches a file (a loop); remove it") from error
    if not any(target == root or target.is_relative_to(root) for root in roots):
        raise LoadError(
            f"{reference!r}: {entry.relative_to(folder).as_posix()} is a symbolic link to {str(target)!r}, outside "
            "the folder; hf-mudsc reads only files inside a parent folder (a link could carry any file of this "
            "machine, e.g. a token, into the merged model): copy the file into the folder"
        )
