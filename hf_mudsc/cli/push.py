"""`hf-mudsc push DIR ORG/NAME`: publish a folder written by `hf-mudsc merge --output DIR` in one commit.

Only what the writer wrote is uploaded (its marker lists the files); a folder holding symlinks or other
files is refused, naming them, and so is one whose files changed since they were written (their sha256: the card
and recipe would describe other weights; `--allow-changed` publishes them as they are) or whose weights hold NaN or
inf (read in chunks, before any Hub call). A failed push says what the repo really holds and never touches DIR.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hf_mudsc.cli.arguments import path_text
from hf_mudsc.errors import UsageError, escaped
from hf_mudsc.load.hub_calls import hub_error_line
from hf_mudsc.load.references import hide_tokens
from hf_mudsc.publish.recipe import RECIPE_FILENAME


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "folder", metavar="DIR", type=path_text,
        help=f"merged-model folder (config.json, *.safetensors, README.md, {RECIPE_FILENAME}, processor)")
    parser.add_argument("repo_id", metavar="ORG/NAME", help="the Hub model repo to create and upload to")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument(
        "--overwrite", action="store_true",
        help="allow an existing repo: its files are replaced by the folder's in one commit")
    parser.add_argument(
        "--allow-changed", action="store_true",
        help="publish files changed since hf-mudsc wrote them (e.g. an edited card) as they are; without it such a "
             "folder is refused, since its card and recipe describe the merge as written")
    parser.add_argument(
        "--token", metavar="TOKEN", default=argparse.SUPPRESS,
        help="Hub token (default: HF_TOKEN or the stored `hf auth login`); never logged or written")


def run(args: argparse.Namespace) -> int:
    from huggingface_hub.errors import HfHubHTTPError

    from hf_mudsc.errors import PushError
    from hf_mudsc.publish.hub import check_repo_id, push_folder

    # The two arguments themselves, before anything is read: a wrong one is an invalid command line (exit 2).
    if not Path(args.folder).is_dir():
        raise UsageError(f"no merged-model folder at {args.folder!r}; run `hf-mudsc merge ... --output DIR` first")
    try:
        check_repo_id(args.repo_id, flag="ORG/NAME")
    except ValueError as error:
        raise UsageError(str(error)) from None
    try:
        result = push_folder(args.folder, args.repo_id, private=args.private, overwrite=args.overwrite,
                             token=getattr(args, "token", None), flag="ORG/NAME", allow_changed=args.allow_changed)
    except (PushError, HfHubHTTPError) as error:
        print(f"hf-mudsc push: error: {escaped(hide_tokens(hub_error_line(error)))}", file=sys.stderr)
        return 1
    if not result.changed:
        print(f"Nothing to push: {result.repo_id} already holds exactly these files (commit {result.commit_sha})")
        return 0
    print(f"Pushed {args.folder} to {result.url} (commit {result.commit_sha})")
    return 0
