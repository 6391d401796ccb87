"""Publisher: a merged-model folder -> a Hub repo, in one commit, with its card and recipe.

One commit (`create_commit`) makes the push atomic: the repo shows either the previous state or the
whole merged model, never half of it. Only the files the writer's marker lists are uploaded (never the
marker, never a symlink's target). The recipe goes up as `recipe.published_text` makes it: local folders named
by folder name, as the card shows them (the local file keeps their paths, to re-run the merge here; the folder is
only read). After a failed commit the repo's head is checked, because a commit can
be applied although its answer was lost; a repo this run created is deleted only when nothing was
committed, and an empty repo left by a killed push is pushed into on the rerun. Every Hub call has a
timeout (`HF_MUDSC_HUB_TIMEOUT`) and logs what it waits for.
The token comes from the usual places (argument, `HF_TOKEN`, the stored `hf auth login`) through
`huggingface_hub`; it is never logged, printed or written.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

from huggingface_hub import CommitInfo, CommitOperationAdd, CommitOperationDelete, HfApi, get_session
from huggingface_hub.errors import HfHubHTTPError

from hf_mudsc.errors import PushError, PushInterrupted, RepoExistsError
from hf_mudsc.load.hub_calls import http_client, hub_call, hub_error_line
from hf_mudsc.load.references import TOKEN_FIX, clean_token, looks_like_token, repo_id_refusal, without_userinfo
from hf_mudsc.publish.folder import (
    MARKER_FILENAME,
    changed_files,
    interrupted_replacement,
    interrupts_deferred,
    listed_outside,
    read_marker,
    unlisted_files,
)
from hf_mudsc.publish.recipe import MAX_RECIPE_BYTES, RECIPE_FILENAME, published_text

logger = logging.getLogger(__name__)

CARD_FILENAME = "README.md"
# Seconds any one Hub call of a push may wait for an answer (env var, for slow links and huge files).
TIMEOUT_ENV = "HF_MUDSC_HUB_TIMEOUT"
DEFAULT_TIMEOUT = 120.0
_T = TypeVar("_T")
# Kept in the repo when a push replaces its files: the Hub needs it (LFS rules); huggingface_hub keeps it too.
GITATTRIBUTES = ".gitattributes"


@dataclass(frozen=True)
class PushResult:
    """What a push did. `changed=False`: the repo already held exactly these files, so no commit was made
    (`commit_sha` is its head). `revision`: the branch committed to (None: main); `pr_url`: the pull request
    opened (`create_pr`), as huggingface_hub's `CommitInfo.pr_url`; `deleted`: the files the commit (or pull
    request) deletes from its branch because the folder lacks them: with `overwrite`, the branch's own; on a branch
    this push created (`branch_created`), main's files it was created with (main keeps them). URLs never carry the
    credentials an `HF_ENDPOINT` may hold."""

    repo_id: str
    commit_sha: str
    commit_url: str
    url: str
    created: bool
    changed: bool = True
    revision: str | None = None
    pr_url: str | None = None
    deleted: tuple[str, ...] = ()
    branch_created: bool = False


@dataclass(frozen=True)
class CommitOptions:
    """How a push commits, with huggingface_hub's names and `HfApi.create_commit`'s semantics (what the push calls):
    the commit's title and description; the branch committed to (`revision`, default main; a branch the repo lacks
    is created from main first, as `push_to_hub` and `hf upload` do); `create_pr`: open a pull request against that
    branch instead of committing to it (the branch must exist; any branch, as `create_commit` allows). Not recipe
    keys: they say where and how a result is published, not what is merged."""

    message: str | None = None
    description: str | None = None
    revision: str | None = None
    create_pr: bool = False

    @property
    def branch(self) -> str:
        """The branch the push commits to, or opens its pull request against."""
        return self.revision or "main"


# A branch name the Hub takes (git's rules, simplified): no space, `..`, `~^:?*[\`, leading `-`/`/`/`.`, or `.lock`.
_BRANCH = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._/-]*")
_SHA = re.compile(r"[0-9a-f]{40}")


def check_commit_options(options: CommitOptions, *, api_names: bool = False) -> None:
    """Refuse, before any Hub call, commit options the Hub would refuse mid-push or that would publish a token: an
    empty message, a revision that is no branch name (a `refs/...` ref, a commit sha), a token in any of them.
    `api_names`: name the keyword arguments (`revision=`) rather than the CLI flags (`--revision`)."""
    def name(option: str) -> str:
        return f"{option}=" if api_names else f"--{option.replace('_', '-')}"

    for option, text in (("commit_message", options.message), ("commit_description", options.description),
                         ("revision", options.revision)):
        if text is not None and looks_like_token(text):
            raise ValueError(f"{name(option)} looks like it holds a Hugging Face access token (not shown), which "
                             f"would be published; {TOKEN_FIX}")
    if options.message is not None and not options.message.strip():
        raise ValueError(f"{name('commit_message')} is empty; give the commit a title, or leave it out for the "
                         "default one")
    revision = options.revision
    if revision is None:
        return
    if revision.startswith("refs/"):
        raise ValueError(f"{name('revision')} {revision!r} is a git ref, not a branch name: name a branch (e.g. "
                         f"'dev'); to open a pull request pass {'create_pr=True' if api_names else '--create-pr'} "
                         "(pushing into an existing pull request is not supported)")
    if (not _BRANCH.fullmatch(revision) or ".." in revision or "//" in revision or revision.endswith(("/", ".lock"))
            or _SHA.fullmatch(revision)):
        raise ValueError(f"{name('revision')} {revision!r} is not a branch name the Hub accepts (letters, digits, "
                         "'.', '_', '-', '/'; not a commit sha); a push commits to a branch")


def hub_timeout() -> float:
    """The per-call timeout of Hub requests made by a push (`HF_MUDSC_HUB_TIMEOUT`, default 120 s)."""
    text = os.environ.get(TIMEOUT_ENV)
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {text!r}")
    return value


@contextmanager
def hub_timeouts(seconds: float | None = None) -> Iterator[float]:
    """Give the shared Hub client a timeout (huggingface_hub waits forever by default), restored afterwards:
    a stalled server must end a push with a message, not hang it."""
    seconds = hub_timeout() if seconds is None else seconds
    session = get_session()
    previous = session.timeout
    session.timeout = http_client().Timeout(seconds, connect=min(seconds, 10.0))
    try:
        yield seconds
    finally:
        session.timeout = previous


def _step(what: str, call: Callable[[], _T], *, seconds: float) -> _T:
    """Run one Hub call, logging what it waits for (`serve` reads this logger to know a push has begun); a
    timeout or a lost connection becomes a one-line `PushError` (`hub_calls.hub_call`, shared with loading)."""
    logger.info("waiting for the Hub: %s", what)
    return hub_call(call, what=what, seconds=seconds, setting=TIMEOUT_ENV, error=PushError, then="try again later")


def check_folder(folder: str | os.PathLike) -> Path:
    """A pushable merged-model folder: config, safetensors weights, card and recipe — written by hf-mudsc.

    Everything in it is published, so it must hold only what the writer wrote (its marker lists those files)
    and no symbolic link (its target, anywhere on this machine, would be uploaded).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"no merged-model folder at {str(folder)!r}; run `hf-mudsc merge ... --output DIR` first"
        )
    required = ("config.json", CARD_FILENAME, RECIPE_FILENAME)
    missing = [name for name in required if not (folder / name).is_file()]
    if not any(folder.glob("*.safetensors")):
        missing.append("*.safetensors weights")
    if missing:
        raise FileNotFoundError(
            f"{str(folder)!r} is not a complete merged-model folder: missing {', '.join(missing)}. "
            "Push a folder written by `hf-mudsc merge --output DIR` (model, processor, README.md, "
            f"{RECIPE_FILENAME})"
        )
    foreign, _ = unlisted_files(folder)
    links = [name for name in foreign if (folder / name).is_symlink()]
    if links:
        raise ValueError(
            f"refusing to push {str(folder)!r}: it holds symbolic links ({', '.join(links)}), whose targets "
            "would be uploaded; remove them"
        )
    if read_marker(folder) is None:
        raise ValueError(
            f"refusing to push {str(folder)!r}: it has no {MARKER_FILENAME} listing its files, so nothing "
            "proves it holds only what hf-mudsc wrote (an older version wrote none); write it again with "
            "`hf-mudsc merge --output DIR`, or upload it yourself with `hf upload`"
        )
    stopped = interrupted_replacement(folder)
    if stopped:
        raise ValueError(
            f"refusing to push {str(folder)!r}: a run was stopped while it replaced {', '.join(stopped[:5])}"
            f"{' ...' if len(stopped) > 5 else ''} (each is the old or the new one, so they may be of two runs); run "
            "that command again (e.g. `hf-mudsc evaluate DIR ...`), then push")
    outside = listed_outside(folder)
    if outside:
        raise ValueError(
            f"refusing to push {str(folder)!r}: its {MARKER_FILENAME} lists files that are not in it "
            f"({', '.join(repr(name) for name in outside[:3])}{' ...' if len(outside) > 3 else ''}), which hf-mudsc "
            "never writes (the marker was edited); write the folder again with `hf-mudsc merge --output DIR`"
        )
    if foreign:
        raise ValueError(
            f"refusing to push {str(folder)!r}: it holds files hf-mudsc did not write ({', '.join(foreign[:10])}"
            f"{' ...' if len(foreign) > 10 else ''}); move them out of the folder, which is uploaded whole"
        )
    return folder


def check_unchanged(folder: str | os.PathLike, *, allow_changed: bool = False, switch: str = "--allow-changed"
                    ) -> list[str]:
    """Refuse a folder whose files changed since hf-mudsc wrote them (`folder.changed_files`: their sha256 differs
    from the marker's, or they are gone): its card and recipe would be published describing other weights than those
    uploaded. `allow_changed` (the user's explicit choice, `switch` names it in the message) publishes them as they
    are, saying so in a warning. The files `evaluate` and `inspect` rewrite are recorded as written: they pass.
    Returns the changed files' names (published as they are)."""
    changed = changed_files(folder)
    if not changed:
        return changed
    names = ", ".join(changed[:10]) + (f" and {len(changed) - 10} more" if len(changed) > 10 else "")
    if not allow_changed:
        raise ValueError(
            f"refusing to push {str(folder)!r}: files changed since hf-mudsc wrote them ({names}), so its card and "
            "recipe would describe other files than those published; write the folder again with "
            f"`hf-mudsc merge ... --output DIR` (or, to publish the files as they are, pass {switch})")
    logger.warning("publishing %s with files changed since hf-mudsc wrote them, as they are (%s): its card and "
                   "recipe describe the merge as it was written", folder, names)
    return changed


def commit_title(name: str) -> str:
    """The title of a push's commit, naming the model by its output folder's name (or its repo's name)."""
    return f"Upload merged model ({name}) with hf-mudsc"


def published_files(folder: str | os.PathLike) -> list[str]:
    """The files a push uploads: those the writer's marker lists and that are still there (never the marker)."""
    folder = Path(folder)
    listed = (read_marker(folder) or {}).get("files", {})
    outside = set(listed_outside(folder))  # `check_folder` refuses them; never read one, whoever calls this
    return sorted(name for name in listed
                  if name not in outside and (folder / name).is_file() and not (folder / name).is_symlink())


def check_repo_id(repo_id: str, *, flag: str = "--push-to-hub name") -> None:
    """Refuse a repo id to push to that is no `org/name`, one the Hub would refuse (`repo_id_refusal`), or that holds
    a token (pasted where the id goes): its every Hub call would send the token in a URL, and the repo created would
    be named after it. `org/name@branch` (as parents are named) is refused pointing at the revision option."""
    refusal = repo_id_refusal(repo_id, flag)
    if refusal is not None:
        raise ValueError(refusal)


def _is_empty(api: HfApi, repo_id: str, revision: str = "main") -> bool:
    """Only the Hub's initial commit (no file but .gitattributes): what a push killed after creating it leaves."""
    try:
        files = api.list_repo_files(repo_id, revision=revision)
        commits = api.list_repo_commits(repo_id, revision=revision)
    except HfHubHTTPError:
        return False
    return set(files) <= {".gitattributes"} and len(commits) <= 1


def _target_state(repo_id: str, *, overwrite: bool, token: str | None, flag: str, seconds: float,
                  options: CommitOptions | None = None, private: bool = False) -> str:
    """"absent", "empty" (pushed into without --overwrite), "new-branch" (a branch the repo lacks: created from main,
    its copy of main's files replaced on it, main untouched), "pr" (a pull request: nothing changes until someone
    merges it, so no overwrite needed; it adds and replaces files, and deletes the branch's others only with
    `overwrite`) or "exists" (only with `overwrite`: the branch's files replaced). `private` on an existing public
    repo is refused unless the push commits to main (a branch or a pull request must not change the repo)."""
    options = options or CommitOptions()
    api_names = flag == "repo_id"
    check_repo_id(repo_id, flag=flag)
    check_commit_options(options, api_names=api_names)
    api = HfApi(token=token)
    exists = _step(f"checking whether the repo {repo_id!r} exists", lambda: api.repo_exists(repo_id),
                   seconds=seconds)
    branch = options.branch
    pr_switch = "create_pr=True" if api_names else "--create-pr"
    if not exists:
        if options.create_pr and branch != "main":
            raise ValueError(f"the Hub repo {repo_id!r} does not exist, so it has no branch {branch!r} to open a pull "
                             f"request against; push without {pr_switch} (the repo and the branch are created)")
        return "absent"
    if private and (options.create_pr or branch != "main") and not _step(
            f"reading the repo {repo_id!r}", lambda: api.repo_info(repo_id), seconds=seconds).private:
        switch = "private=True" if api_names else "--private"
        change = ("a pull request only proposes a change" if options.create_pr
                  else f"a push to the branch {branch!r} changes only that branch")
        raise ValueError(f"{switch} would make the public repo {repo_id!r} private, and {change}; leave {switch} out "
                         "(or change the repo's visibility yourself)")
    if branch != "main":
        refs = _step(f"listing the branches of {repo_id!r}", lambda: api.list_repo_refs(repo_id), seconds=seconds)
        branches = {ref.name for ref in refs.branches}
        if branch not in branches and branch in {ref.name for ref in refs.tags}:
            raise ValueError(f"{branch!r} is a tag of the Hub repo {repo_id!r}, not a branch: a push commits to a "
                             "branch; choose another revision")
        if branch not in branches:
            if options.create_pr:
                raise ValueError(f"the Hub repo {repo_id!r} has no branch {branch!r} to open a pull request against; "
                                 f"push without {pr_switch} to create it from main, or name an existing branch")
            logger.info("the Hub repo %s has no branch %r: it is created from main (as huggingface_hub's push_to_hub "
                        "does), and the push replaces main's files on it (main keeps them)", repo_id, branch)
            return "new-branch"
    where = f"the Hub repo {repo_id!r}" if branch == "main" else f"the branch {branch!r} of the Hub repo {repo_id!r}"
    if _step(f"listing the files of {where}", lambda: _is_empty(api, repo_id, branch), seconds=seconds):
        logger.warning("%s exists but is empty (left by an interrupted push?): pushing into it", where)
        return "empty"
    if options.create_pr:
        return "pr"
    if not overwrite:
        switch = "overwrite=True" if api_names else "--overwrite"  # the API's argument or the CLI flag
        if branch == "main":
            raise RepoExistsError(
                f"the Hub repo {repo_id!r} already exists; pass {switch} to replace its files "
                f"(in one commit), or choose another {flag}"
            )
        raise RepoExistsError(f"{where} already holds files; pass {switch} to replace them on that branch (in one "
                              f"commit), {pr_switch} to propose them in a pull request, or choose another branch")
    return "exists"


def check_target(
    repo_id: str, *, overwrite: bool = False, token: str | None = None, flag: str = "--push-to-hub name",
    options: CommitOptions | None = None, private: bool = False,
) -> bool:
    """Refuse an existing repo (or branch of it, `options.revision`) unless `overwrite` or `options.create_pr`, and
    commit options the push would fail on (called before any heavy work). Returns: the repo exists.

    An empty repo (the initial commit only, as a push killed after creating it leaves) is not refused.
    `flag` names where the user gave the repo id, for the message.
    """
    with hub_timeouts() as seconds:
        return _target_state(repo_id, overwrite=overwrite, token=token, flag=flag, seconds=seconds,
                             options=options, private=private) != "absent"


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    overwrite: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    flag: str = "--push-to-hub name",
    allow_changed: bool = False,
    just_written: bool = False,
    shown_as: str | None = None,
    commit_description: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
) -> PushResult:
    """Create `repo_id` (model repo) and upload `folder` to it in one commit.

    Args:
        folder: a merged-model folder written by hf-mudsc (`check_folder`); the marker is not uploaded.
        repo_id: `org/name`.
        private: create the repo private (an existing public repo is made private too, by a push to main only;
            with a branch or a pull request it is refused).
        overwrite: allow an existing repo; its files are replaced by the folder's in the same commit.
            An empty repo (initial commit only) is pushed into without it.
        token: a Hub token; default: `HF_TOKEN` or the stored login.
        commit_message: the commit's title (default: `commit_title` of the folder's name).
        commit_description: the commit's description (or the pull request's).
        revision: the branch to commit to (default main); one the repo lacks is created from main first (as
            `push_to_hub` and `hf upload` do) and needs no `overwrite`: main keeps its files.
        create_pr: open a pull request against `revision` (which must exist) instead of committing to it; it
            needs no `overwrite` (nothing changes until it is merged) and adds and replaces the folder's files;
            with `overwrite` it also deletes the branch's files the folder lacks (`PushResult.deleted`).
        flag: how the user named the repo (for messages): `--push-to-hub name`, `ORG/NAME`, `repo_id`.
        allow_changed: publish files changed since hf-mudsc wrote them, as they are (`check_unchanged` refuses
            them otherwise); NaN/inf weights are refused all the same.
        just_written: a folder this process has just written from a model checked in memory (`writer.publish`):
            its files are not read again, neither to compare them with the marker nor to look for NaN/inf.
        shown_as: the model's name in the commit title and the log when `folder` is a hidden staging folder
            (`writer.publish`: the output folder's name, or the repo's).

    Raises:
        RepoExistsError: the repo exists and `overwrite` is False.
        PushError: the upload failed; the message says what the repo holds afterwards (its head is checked:
            a commit may be applied although its answer was lost). A repo created by this call is deleted
            when nothing was committed.
    """
    token = clean_token(token)  # a token read from a file, its line break with it
    options = CommitOptions(commit_message, commit_description, revision, bool(create_pr))
    check_repo_id(repo_id, flag=flag)  # the arguments themselves, before any file is read
    check_commit_options(options, api_names=flag == "repo_id")
    with pinned_files(folder) as (files, handles):
        folder = check_folder(folder)
        changed: list[str] = []
        if not just_written:
            refuse_push_over_parent(folder, repo_id, flag)  # reads the recipe only: before every file is hashed
            changed = check_unchanged(folder, allow_changed=allow_changed,
                                      switch="allow_changed=True" if flag == "repo_id" else "--allow-changed")
            refuse_non_finite_files(folder, files)
        contents = published_contents(folder, repo_id=repo_id, options=options, card_as_left=CARD_FILENAME in changed)
        check_still_pinned(folder, files, handles)  # what was checked is what the open files hold
        with hub_timeouts() as seconds:
            return _push(folder, files, contents, repo_id, private=private, overwrite=overwrite, token=token,
                         options=options, flag=flag, seconds=seconds, shown_as=shown_as, handles=handles)


def refuse_push_over_parent(folder: Path, repo_id: str, flag: str) -> None:
    """Refuse to push a merged folder to the Hub repo of one of the parents (or the base) its recipe names: with
    --overwrite that input's files would be replaced by the merge (`recipe.check_push_target`, as `merge` refuses it).
    A recipe that cannot be read names no parent here (`check_folder` and `check_unchanged` judge the folder)."""
    from hf_mudsc.publish.recipe import Recipe, check_push_target

    try:
        recipe = Recipe.load(folder / RECIPE_FILENAME)
    except (OSError, ValueError):
        return
    check_push_target(recipe.override(push_to_hub=repo_id), given_as=flag.split()[0])


@contextmanager
def pinned_files(folder: str | os.PathLike) -> Iterator[tuple[list[str], dict[str, BinaryIO]]]:
    """The files a push uploads (`published_files`), each opened once, before anything is checked: the push uploads
    what these handles hold, so a `merge --overwrite` replacing the folder meanwhile (it renames a new folder in and
    deletes the old one) or an `evaluate` replacing its card cannot mix another run's files into the commit, nor make
    one vanish half-way. `check_still_pinned` then proves the checks read these same files."""
    folder = Path(folder)
    handles: dict[str, BinaryIO] = {}
    try:
        files = published_files(folder) if folder.is_dir() else []
        for name in files:
            try:
                handles[name] = open(folder / name, "rb")  # noqa: SIM115 - closed below, after the upload
            except OSError:  # gone (or replaced by a folder) since the marker was read: checked again below
                continue
        yield files, handles
    finally:
        for handle in handles.values():
            handle.close()


def check_still_pinned(folder: Path, files: list[str], handles: dict[str, BinaryIO]) -> None:
    """Refuse, before any Hub call, a folder whose files are no longer the ones `pinned_files` opened (another run
    replaced the folder or some of its files while the push checked them): the checks may have read other files than
    the handles hold, and the marker may list others."""
    def same(name: str) -> bool:
        handle = handles.get(name)
        if handle is None:
            return False
        try:
            now = os.stat(folder / name, follow_symlinks=False)
        except OSError:
            return False
        pinned = os.fstat(handle.fileno())
        return (now.st_dev, now.st_ino, now.st_size, now.st_mtime_ns) == (
            pinned.st_dev, pinned.st_ino, pinned.st_size, pinned.st_mtime_ns)

    if published_files(folder) != files or not all(same(name) for name in files):
        raise ValueError(
            f"refusing to push {str(folder)!r}: it changed while the push read it (another run, such as `hf-mudsc "
            "merge --overwrite` or `hf-mudsc evaluate`, wrote it meanwhile); nothing was pushed — push again once "
            "that run has finished")


def refuse_non_finite_files(folder: Path, files: list[str]) -> None:
    """Refuse to publish NaN/inf weights, as `save` and merge --push-to-hub refuse to write them (`writer.
    refuse_non_finite_weights`): a folder pushed as it stands may have been edited or converted since. Reads each
    safetensors file tensor by tensor, in chunks (`load.lazy.non_finite_tensors`), before any Hub call."""
    from hf_mudsc.load.lazy import non_finite_tensors

    found = {name: bad for name in files if name.endswith(".safetensors")
             if (bad := non_finite_tensors(folder / name))}
    if not found:
        return
    count = sum(len(bad) for bad in found.values())
    where = "; ".join(f"{', '.join(repr(t) for t in bad[:3])}{f', ... ({len(bad) - 3} more)' if len(bad) > 3 else ''}"
                      f" of {name}" for name, bad in found.items())
    raise ValueError(f"refusing to push {str(folder)!r}: NaN or infinite values in {count} tensor"
                     f"{'s' if count > 1 else ''} ({where}); hf-mudsc never writes such weights, so the folder was "
                     "changed since — write it again with `hf-mudsc merge ... --output DIR`")


def published_contents(folder: Path, *, repo_id: str | None = None, options: CommitOptions | None = None,
                       card_as_left: bool = False) -> dict[str, bytes]:
    """The files uploaded with other bytes than the folder's: the recipe with its local folders named by folder
    name (`recipe.published_text`), when it has any; the card with its "how to load" snippet naming the push's
    target (`repo_id`, `options`' branch: `pushed_card`), whatever repo and branch the folder was written for. Read
    from the folder, which is never changed (so `check_unchanged` still accepts it).

    `card_as_left`: the README was changed since hf-mudsc wrote it (published with --allow-changed): it goes up as
    the user left it, byte for byte — their snippet is theirs, not the template's — and a log line says so."""
    contents = _published_recipe(folder)
    if repo_id is not None and card_as_left:
        logger.info("%s of %s changed since hf-mudsc wrote it: it is published as you left it (its usage snippet is "
                    "not pointed at %s)", CARD_FILENAME, folder, repo_id)
    elif repo_id is not None:
        card = (folder / CARD_FILENAME).read_bytes()
        try:
            text = card.decode("utf-8")
        except UnicodeDecodeError:  # not the card hf-mudsc wrote: published as it is (check_unchanged judged it)
            return contents
        options = options or CommitOptions()
        pushed = pushed_card(text, repo_id, options.branch).encode("utf-8")
        if pushed != card:
            contents[CARD_FILENAME] = pushed
    return contents


# The card template's usage snippet (`model_cards/merged_model.md.jinja`): the "## Usage" heading, the python block
# under it (before the next "## " heading), the model's load in it (`model = CLASS.from_pretrained("TARGET"`, TARGET
# being the repo the folder was written for or `PLACEHOLDER_TARGET`), and each load with its revision argument.
PLACEHOLDER_TARGET = "path/to/this/model"
_USAGE_HEADING = re.compile(r"^## Usage[ \t]*\r?$", flags=re.MULTILINE)
_NEXT_HEADING = re.compile(r"^## ", flags=re.MULTILINE)
_PYTHON_BLOCK = re.compile(r"^```python\r?\n(.*?)^```", flags=re.MULTILINE | re.DOTALL)
_MODEL_LOAD = re.compile(r'^model = \w+\.from_pretrained\("([^"\r\n]*)"', flags=re.MULTILINE)
_USAGE_LOAD = re.compile(r'(\.from_pretrained\()"([^"\r\n]*)"(?:, revision="[^"\r\n]*")?')


def pushed_card(text: str, repo_id: str, branch: str = "main") -> str:
    """The card as pushed to `repo_id`'s `branch`: its "## Usage" snippet loads from there (the folder's card names the
    repo and branch it was written for, or `path/to/this/model`), so a folder written for a branch and pushed to main
    (or the reverse) never tells readers to load another revision. A pull request's card names its target branch,
    which holds these files once the pull request is merged (the README says so; the card itself is not changed for
    it, so a pull request of files the branch already holds changes nothing and is not opened).

    Only the first python block of the Usage section (up to the next "## " heading) is read, and in it only the
    loads of the target the writer put there (the placeholder, or the model load's repo): another section's code, or
    a load of another model (a tokenizer from its own repo), is never rewritten. A card with no such snippet (a
    custom template) is unchanged. CRLF line ends are read as LF and kept."""
    heading = _USAGE_HEADING.search(text)
    if heading is None:
        return text
    following = _NEXT_HEADING.search(text, heading.end())
    section_end = following.start() if following is not None else len(text)
    block = _PYTHON_BLOCK.search(text, heading.end(), section_end)
    if block is None:
        return text
    model_load = _MODEL_LOAD.search(block.group(1))
    written_for = {PLACEHOLDER_TARGET} | ({model_load.group(1)} if model_load is not None else set())
    target = json.dumps(repo_id) + (f", revision={json.dumps(branch)}" if branch != "main" else "")

    def retargeted(match: re.Match[str]) -> str:
        return match.group(1) + target if match.group(2) in written_for else match.group(0)

    snippet = _USAGE_LOAD.sub(retargeted, block.group(1))
    return text[:block.start(1)] + snippet + text[block.end(1):]


def _published_recipe(folder: Path) -> dict[str, bytes]:
    """The recipe as published (`recipe.published_text`), when its bytes differ from the folder's."""
    path = folder / RECIPE_FILENAME
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:  # read whole below: refused as `Recipe.load` refuses it
        raise ValueError(f"refusing to push {str(folder)!r}: its {RECIPE_FILENAME} is {size:,} bytes, more than a "
                         f"recipe may be ({MAX_RECIPE_BYTES:,}); write the folder again with "
                         "`hf-mudsc merge --output DIR`")
    local = path.read_bytes()
    try:
        text = local.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"refusing to push {str(folder)!r}: its {RECIPE_FILENAME} is not UTF-8 text; write the "
                         "folder again with `hf-mudsc merge --output DIR`") from None
    published = published_text(text, name=RECIPE_FILENAME).encode("utf-8")
    return {} if published == local else {RECIPE_FILENAME: published}


def _commit(api: HfApi, repo_id: str, folder: Path, files: list[str], contents: dict[str, bytes], *,
            replace: bool, message: str, parent: str | None = None, made: list[CommitInfo] | None = None,
            handles: dict[str, BinaryIO] | None = None, options: CommitOptions, deleted: list[str]) -> CommitInfo:
    """One commit adding exactly `files` (the writer's; `contents` gives some of them other bytes) and, when
    `replace`, deleting every other file of the repo but `.gitattributes`, so the old model's leftovers go with it.
    `parent`: the head this push read: the commit applies only on top of it (the Hub refuses it, 412, when someone
    else committed meanwhile — else their files would stay beside the replaced model, or be overwritten unseen).

    The large files are uploaded first (Ctrl-C stops that at once), then the commit is made with Ctrl-C and SIGTERM
    deferred: made or not, never cut with its outcome unknown; it is appended to `made` before a deferred interrupt
    is raised. `handles`: the files as `pinned_files` opened them, uploaded from these (never opened again by name:
    the folder may have been replaced since). `options`: the description, branch and pull request of the commit.
    `deleted` receives the names of the files the commit deletes."""
    def source(name: str) -> bytes | BinaryIO | Path:
        if name in contents:
            return contents[name]
        handle = (handles or {}).get(name)
        if handle is None:
            return folder / name
        # The open file by a path (Linux): huggingface_hub's Xet upload takes paths and bytes only (a file object
        # falls back to the slower LFS upload, with a warning); the path reaches the same file whatever its name
        # leads to now.
        pinned = Path(f"/proc/self/fd/{handle.fileno()}")
        if pinned.is_file():
            return pinned
        handle.seek(0)  # read whole (huggingface_hub reads from where it stands)
        return handle

    adds = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=source(name)) for name in files]
    api.preupload_lfs_files(repo_id, additions=adds, free_memory=False, revision=options.branch,
                            create_pr=options.create_pr)
    stale = (sorted(set(api.list_repo_files(repo_id, revision=parent)) - set(files) - {GITATTRIBUTES}) if replace
             else [])
    if stale:  # the repo's own files, gone with this commit (the old revision keeps them): say which
        logger.warning("deleting %d file%s of %r that the folder does not hold%s: %s", len(stale),
                       "s" if len(stale) > 1 else "", repo_id,
                       f" (in the pull request against {options.branch!r}, --overwrite)" if options.create_pr
                       else " (--overwrite)" if options.branch == "main" else f" (on the branch {options.branch!r})",
                       ", ".join(stale[:10]) + (f" and {len(stale) - 10} more" if len(stale) > 10 else ""))
    deletes = [CommitOperationDelete(path_in_repo=name, is_folder=False) for name in stale]
    deleted[:] = stale
    with interrupts_deferred():
        commit = api.create_commit(repo_id=repo_id, operations=[*deletes, *adds], commit_message=message,
                                   commit_description=options.description, revision=options.branch,
                                   create_pr=options.create_pr, parent_commit=parent)
        if made is not None:
            made.append(commit)
    return commit


def _push(folder: Path, files: list[str], contents: dict[str, bytes], repo_id: str, *, private: bool,
          overwrite: bool, token: str | None, options: CommitOptions, flag: str, seconds: float,
          shown_as: str | None = None, handles: dict[str, BinaryIO] | None = None) -> PushResult:
    api = HfApi(token=token)
    state = _target_state(repo_id, overwrite=overwrite, token=token, flag=flag, seconds=seconds, options=options,
                          private=private)
    created = state == "absent"
    branch = options.branch
    make_branch = branch != "main" and state in ("absent", "new-branch")
    message = options.message or commit_title(shown_as or folder.name)
    head_before: str | None = None
    made: list[CommitInfo] = []
    deleted: list[str] = []
    prs_before: dict[str, str] | None = None
    branch_made = False  # only a branch this run created is ever deleted
    try:
        # Creating the repo and reading its head with Ctrl-C deferred: an interrupt then knows what this run made.
        with interrupts_deferred():
            if created:  # an existing repo (empty, or replaced with --overwrite) is pushed into as it is
                try:
                    _step(f"creating the repo {repo_id!r}", lambda: api.create_repo(repo_id, private=private),
                          seconds=seconds)
                except HfHubHTTPError as error:
                    if error.response is not None and error.response.status_code == 409:
                        raise RepoExistsError(
                            f"the Hub repo {repo_id!r} already exists (possibly private and not visible to this "
                            f"token); pass --overwrite, or choose another {flag}"
                        ) from None
                    raise PushError(f"could not create the Hub repo {repo_id!r}: {hub_error_line(error)}") from error
            if make_branch:  # from main, as push_to_hub and `hf upload` create a missing branch
                try:  # exist_ok=False: a branch someone created since the check is theirs, never replaced
                    _step(f"creating the branch {branch!r} of {repo_id!r} from main",
                          lambda: api.create_branch(repo_id, branch=branch, exist_ok=False), seconds=seconds)
                except HfHubHTTPError as error:
                    if error.response is not None and error.response.status_code == 409:
                        switch = "overwrite=True" if flag == "repo_id" else "--overwrite"
                        raise PushError(
                            f"nothing was pushed to {repo_id!r}: the branch {branch!r} appeared meanwhile; run again — "
                            f"with {switch} to replace its files"
                            + (f" (the repo {repo_id!r} created by this run is kept: it holds that branch)"
                               if created else "")) from None
                    # the repo this run created holds only main: check main, so it is deleted when empty
                    left = _what_is_there(api, repo_id, None, message, created=created, seconds=seconds,
                                          options=CommitOptions())
                    raise PushError(f"could not create the branch {branch!r} of {repo_id!r}: "
                                    f"{hub_error_line(error)} ({left})") from error
                branch_made = True
            info = _step(f"reading the repo {repo_id!r}", lambda: api.repo_info(repo_id, revision=branch),
                         seconds=seconds)
            head_before = info.sha
            if options.create_pr:
                prs_before = _pull_requests(api, repo_id, seconds)
        if not created and private and not info.private:
            _step(f"making the repo {repo_id!r} private",
                  lambda: api.update_repo_settings(repo_id, private=True), seconds=seconds)
        try:
            with _quiet_no_op_commit():
                commit = _step(
                    f"uploading {len(files)} files to {repo_id!r} in one commit"
                    + (f" (a pull request against {branch!r})" if options.create_pr
                       else f" (branch {branch!r})" if branch != "main" else ""),
                    # Exactly the writer's files (never the marker, nothing added since); on overwrite (or on a new
                    # branch), files the new folder lacks go away in the same commit.
                    # A pull request without overwrite only adds and replaces (as upload_folder without
                    # delete_patterns): the branch's other files stay.
                    lambda: _commit(api, repo_id, folder, files, contents,
                                    replace=state in ("exists", "new-branch") or (state == "pr" and overwrite),
                                    message=message, parent=head_before, made=made, handles=handles,
                                    options=options, deleted=deleted),
                    seconds=seconds,
                )
        except Exception as error:
            logger.debug("push failed", exc_info=True)
            left = _what_is_there(api, repo_id, head_before, message, created=created, seconds=seconds,
                                  options=options, prs_before=prs_before, branch_created=branch_made)
            raise PushError(f"uploading to {repo_id!r} failed: {hub_error_line(error)} ({left})") from error
    except KeyboardInterrupt as interrupt:
        logger.debug("push interrupted", exc_info=True)
        if made:  # the commit was made, then the Ctrl-C it deferred came
            pr = without_userinfo(made[0].pr_url) if options.create_pr and made[0].pr_url else None
            holder = (f"the pull request {pr} against {branch!r} of {repo_id}" if pr
                      else f"{repo_id}" + (f" (branch {branch!r})" if branch != "main" else ""))
            raise PushInterrupted(f"the push was done first: {holder} holds the merged model (commit "
                                  f"{made[0].oid})", pushed=True) from interrupt
        if head_before is None:  # stopped before the repo was created (creating it defers a Ctrl-C)
            raise PushInterrupted(f"nothing was pushed to {repo_id}") from interrupt
        left = _what_is_there(api, repo_id, head_before, message, created=created, seconds=seconds,
                              options=options, prs_before=prs_before, branch_created=branch_made)
        raise PushInterrupted(f"{repo_id}: {left}") from interrupt
    repo_url = f"{without_userinfo(api.endpoint).rstrip('/')}/{repo_id}"  # as create_repo's answer, never credentials
    changed = commit.oid != head_before
    pr_url = without_userinfo(commit.pr_url) if changed and commit.pr_url else None
    where = f" as a pull request ({pr_url})" if pr_url else f", branch {branch!r}" if branch != "main" else ""
    if changed:
        logger.info("pushed %s to %s%s (commit %s)", shown_as or folder, repo_id, where, commit.oid)
    else:
        logger.info("nothing changed: %s%s already holds exactly the files of %s (commit %s); no commit was made"
                    "%s", repo_id, f" ({branch})" if branch != "main" else "", shown_as or folder, commit.oid,
                    ", so no pull request was opened" if options.create_pr else "")
    return PushResult(repo_id=repo_id, commit_sha=commit.oid, commit_url=without_userinfo(commit.commit_url),
                      url=repo_url, created=created, changed=changed, revision=options.revision, pr_url=pr_url,
                      deleted=tuple(deleted) if changed else (), branch_created=branch_made)


def _pull_requests(api: HfApi, repo_id: str, seconds: float) -> dict[str, str]:
    """The repo's pull requests (ref -> head commit): after a failed `create_pr` push, a new one tells that the pull
    request was opened although its answer was lost."""
    refs = _step(f"listing the pull requests of {repo_id!r}",
                 lambda: api.list_repo_refs(repo_id, include_pull_requests=True), seconds=seconds)
    return {ref.ref: ref.target_commit for ref in refs.pull_requests or []}


# huggingface_hub's loggers that say, each in its own words, that a commit changing nothing was skipped.
_NO_OP_LOGGERS = ("huggingface_hub.hf_api", "huggingface_hub._upload_pipeline")


class _DropNoOpCommit(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No files have been modified since last commit")


@contextmanager
def _quiet_no_op_commit() -> Iterator[None]:
    """Drop huggingface_hub's "No files have been modified ... Skipping" (logged twice: through its own handler and
    the root's): the push says once itself that nothing changed, naming the commit the repo keeps."""
    drop = _DropNoOpCommit()
    loggers = [logging.getLogger(name) for name in _NO_OP_LOGGERS]
    for each in loggers:
        each.addFilter(drop)
    try:
        yield
    finally:
        for each in loggers:
            each.removeFilter(drop)


def _what_is_there(api: HfApi, repo_id: str, head_before: str | None, message: str, *, created: bool,
                   seconds: float, options: CommitOptions, prs_before: dict[str, str] | None = None,
                   branch_created: bool = False) -> str:
    """After a failed commit, ask the Hub what the repo's head is (of the branch pushed to; with `create_pr`, its pull
    requests): the commit may have been applied although its answer was lost. A repo (or branch) this run created is
    deleted only when nothing was committed to it."""
    branch = options.branch
    try:
        if options.create_pr and prs_before is not None:
            opened = sorted(set(_pull_requests(api, repo_id, seconds)) - set(prs_before))
            if opened:
                return (f"the pull request was opened although its answer was lost: {', '.join(opened)}; look at it "
                        "before retrying")
            commits = []
        else:
            commits = _step(f"checking the head of {repo_id!r} after the failure",
                            lambda: api.list_repo_commits(repo_id, revision=branch), seconds=seconds)
    except Exception as error:  # noqa: BLE001 - report what is known, keep the original error
        return (f"could not check what the repo holds ({hub_error_line(error)}); look at its commit history before "
                "retrying"
                + ("; it was created by this run" if created else ""))
    head = commits[0] if commits else None
    if head is not None and head_before is not None and head.commit_id != head_before:
        if head.title == message:
            return (f"the commit was applied although its answer was lost: the repo's head is now "
                    f"{head.commit_id} ({head.title!r})")
        return (f"the repo's head moved to {head.commit_id} ({head.title!r}), which is not this push's commit: "
                "someone else pushed meanwhile")
    left = "nothing was committed"
    if created:
        try:
            _step(f"deleting the repo {repo_id!r} created by this run", lambda: api.delete_repo(repo_id),
                  seconds=seconds)
            left += f"; the repo {repo_id!r} created by this run was deleted"
        except Exception:  # noqa: BLE001 - report what is left, keep the original error
            left += (f"; the repo {repo_id!r} created by this run is left empty (initial commit only) — a rerun "
                     f"pushes into it, or delete it with `hf repo delete {repo_id}`")
    elif branch_created:
        try:
            _step(f"deleting the branch {branch!r} created by this run",
                  lambda: api.delete_branch(repo_id, branch=branch), seconds=seconds)
            left += f"; the branch {branch!r} created by this run was deleted"
        except Exception:  # noqa: BLE001 - report what is left, keep the original error
            left += f"; the branch {branch!r} created by this run is left as a copy of main"
    return left
