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
from typing import TYPE_CHECKING

from hf_mudsc.cli.arguments import path_text
from hf_mudsc.errors import UsageError, escaped
from hf_mudsc.load.hub_calls import hub_error_line
from hf_mudsc.load.references import hide_tokens
from hf_mudsc.publish.recipe import RECIPE_FILENAME

if TYPE_CHECKING:  # huggingface_hub is imported when a push runs, not when the CLI starts
    from hf_mudsc.publish.hub import CommitOptions, PushResult


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
    add_commit_arguments(parser)
    parser.add_argument(
        "--token", metavar="TOKEN", default=argparse.SUPPRESS,
        help="Hub token (default: HF_TOKEN or the stored `hf auth login`); never logged or written")


def add_commit_arguments(parser: argparse.ArgumentParser, *, of: str = "") -> None:
    """--commit-message, --commit-description, --revision, --create-pr: huggingface_hub's commit options, with
    `create_commit`'s semantics (`hub.CommitOptions`), for `push` and `merge --push-to-hub` (`of`: the help's prefix
    that says they are the push's, not the parents' revisions)."""
    parser.add_argument("--commit-message", metavar="TEXT", default=argparse.SUPPRESS,
                        help=f"{of}the commit's title (default: 'Upload merged model (NAME) with hf-mudsc')")
    parser.add_argument("--commit-description", metavar="TEXT", default=argparse.SUPPRESS,
                        help=f"{of}the commit's (or pull request's) description")
    parser.add_argument(
        "--revision", metavar="BRANCH", default=argparse.SUPPRESS,
        help=f"{of}the branch to commit to (default: main); one the repo lacks is created from main, as "
             "huggingface_hub's push_to_hub does, and needs no --overwrite (main keeps its files)")
    parser.add_argument(
        "--create-pr", action="store_true", default=argparse.SUPPRESS,
        help=f"{of}open a pull request against --revision (an existing branch; default main) instead of committing "
             "to it; needs no --overwrite, since nothing changes until the pull request is merged; it adds and "
             "replaces files, and with --overwrite also deletes the branch's files the folder lacks")


def commit_options(args: argparse.Namespace) -> CommitOptions:
    """The commit options given on the command line (`add_commit_arguments`)."""
    from hf_mudsc.publish.hub import CommitOptions

    return CommitOptions(getattr(args, "commit_message", None), getattr(args, "commit_description", None),
                         getattr(args, "revision", None), bool(getattr(args, "create_pr", False)))


def pushed_line(folder: str | None, result: PushResult) -> str:
    """What `push` and `merge --push-to-hub` print after a push: where it went (branch, pull request), or that
    nothing changed."""
    if not result.changed:
        return (f"Nothing to push: {result.repo_id}{f' ({result.revision})' if result.revision else ''} already holds "
                f"exactly these files (commit {result.commit_sha})")
    what = f"Pushed {folder} to" if folder else "Pushed to"
    if result.pr_url:
        count = len(result.deleted)
        deletes = (f"; it deletes {count} file{'s' if count > 1 else ''} of {result.revision or 'main'!r} the folder "
                   "lacks" if count else "")
        return f"{what} {result.url} as a pull request: {result.pr_url} (commit {result.commit_sha}){deletes}"
    branch = f" (branch {result.revision})" if result.revision and result.revision != "main" else ""
    count = len(result.deleted)
    # A branch's files the folder lacks are not on it after the commit (a new branch: main's, copied at its creation),
    # unlike `hf upload --revision`, which keeps them: a stale shard index would load main's weights from the branch.
    # An existing branch's own (--overwrite) are deleted, and only its history keeps them.
    files = f"{count} file{'s' if count > 1 else ''} the folder lacks {'are' if count > 1 else 'is'}"
    deletes = ("" if not (branch and count) else f"; {files} not on the branch (main keeps its own)"
               if result.branch_created else f"; {files} deleted from the branch (its history keeps them)")
    return f"{what} {result.url}{branch} (commit {result.commit_sha}){deletes}"


def run(args: argparse.Namespace) -> int:
    from huggingface_hub.errors import HfHubHTTPError

    from hf_mudsc.errors import PushError
    from hf_mudsc.publish.hub import check_commit_options, check_repo_id, push_folder

    # The two arguments themselves, before anything is read: a wrong one is an invalid command line (exit 2).
    if not Path(args.folder).is_dir():
        raise UsageError(f"no merged-model folder at {args.folder!r}; run `hf-mudsc merge ... --output DIR` first")
    options = commit_options(args)
    try:
        check_repo_id(args.repo_id, flag="ORG/NAME")
        check_commit_options(options)
    except ValueError as error:
        raise UsageError(str(error)) from None
    try:
        result = push_folder(args.folder, args.repo_id, private=args.private, overwrite=args.overwrite,
                             token=getattr(args, "token", None), flag="ORG/NAME", allow_changed=args.allow_changed,
                             commit_message=options.message, commit_description=options.description,
                             revision=options.revision, create_pr=options.create_pr)
    except (PushError, HfHubHTTPError) as error:
        print(f"hf-mudsc push: error: {escaped(hide_tokens(hub_error_line(error)))}", file=sys.stderr)
        return 1
    print(pushed_line(args.folder, result))
    return 0
