"""Publisher: a merged-model folder -> a Hub repo, in one commit, with its card and recipe.

One commit (`upload_folder`) makes the push atomic: the repo shows either the previous state or the
whole merged model, never half of it. A repo this run created is deleted again when the commit fails.
The token comes from the usual places (argument, `HF_TOKEN`, the stored `hf auth login`) through
`huggingface_hub`; it is never logged, printed or written.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError

from .recipe import RECIPE_FILENAME

logger = logging.getLogger(__name__)

CARD_FILENAME = "README.md"


class RepoExistsError(FileExistsError):
    """The target repo exists and `overwrite` was not given."""


class PushError(RuntimeError):
    """The upload failed; the message says what was left on the Hub (nothing, or an empty repo)."""


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    commit_sha: str
    commit_url: str
    url: str
    created: bool


def check_folder(folder: str | os.PathLike) -> Path:
    """A pushable merged-model folder: config, safetensors weights, card and recipe."""
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
    return folder


def _check_repo_id(repo_id: str) -> None:
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"the Hub repo id must look like `org/name`, got {repo_id!r}")


def check_target(repo_id: str, *, overwrite: bool = False, token: str | None = None) -> bool:
    """Refuse an existing repo unless `overwrite` (called before any heavy work). Returns: it exists."""
    _check_repo_id(repo_id)
    exists = HfApi(token=token).repo_exists(repo_id)
    if exists and not overwrite:
        raise RepoExistsError(
            f"the Hub repo {repo_id!r} already exists; pass --overwrite to replace its files "
            "(in one commit), or choose another --push-to-hub name"
        )
    return exists


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    overwrite: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
) -> PushResult:
    """Create `repo_id` (model repo) and upload `folder` to it in one commit.

    Args:
        folder: a merged-model folder (config.json, *.safetensors, README.md, mudsc_recipe.yaml, processor).
        repo_id: `org/name`.
        private: create the repo private (an existing public repo is made private too).
        overwrite: allow an existing repo; its files are replaced by the folder's in the same commit.
        token: a Hub token; default: `HF_TOKEN` or the stored login.

    Raises:
        RepoExistsError: the repo exists and `overwrite` is False.
        PushError: the upload failed; nothing was committed (a repo created by this call is deleted).
    """
    folder = check_folder(folder)
    _check_repo_id(repo_id)
    api = HfApi(token=token)
    exists = check_target(repo_id, overwrite=overwrite, token=token)
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=overwrite)
    except HfHubHTTPError as error:
        if error.response is not None and error.response.status_code == 409:
            raise RepoExistsError(
                f"the Hub repo {repo_id!r} already exists (possibly private and not visible to this token); "
                "pass --overwrite, or choose another name"
            ) from None
        raise PushError(f"could not create the Hub repo {repo_id!r}: {error}") from error
    created = not exists
    if exists and private and not api.repo_info(repo_id).private:
        api.update_repo_settings(repo_id, private=True)
    message = commit_message or f"Upload merged model ({folder.name}) with hf-mudsc"
    try:
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=message,
            # On overwrite, files of the old model that the new folder lacks go away in the same commit.
            delete_patterns="*" if exists else None,
        )
    except BaseException as error:
        left = "nothing was committed"
        if created:
            try:
                api.delete_repo(repo_id)
                left += f"; the repo {repo_id!r} created by this run was deleted"
            except Exception:  # noqa: BLE001 - report what is left, keep the original error
                left += (f"; the repo {repo_id!r} created by this run is left empty (initial commit only) — "
                         f"delete it with `hf repo delete {repo_id}`")
        logger.debug("push failed", exc_info=True)
        if not isinstance(error, Exception):
            raise
        raise PushError(f"uploading to {repo_id!r} failed: {error} ({left})") from error
    logger.info("pushed %s to %s (commit %s)", folder, repo_id, commit.oid)
    return PushResult(repo_id=repo_id, commit_sha=commit.oid, commit_url=commit.commit_url,
                      url=str(repo_url), created=created)
