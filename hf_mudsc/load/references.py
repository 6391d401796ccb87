"""References to parents and data: `org/name@rev` parsing, display names, pinned references for recipes.

Imports nothing heavy (transformers only for a type hint): the service's web process checks with it which
references name this machine's folders — and which base a local parent's model card names — exactly as the loader
will read them (`hf_mudsc.serve.jobs`).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from hf_mudsc.errors import LoadError, brief, escaped, parent_label

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from transformers import PreTrainedModel


# A Hugging Face access token (`hf_` or `api_org_` and 30-odd letters and digits): never a model or dataset name.
TOKEN_SHAPE = re.compile(r"\b(?:hf|api_org)_[A-Za-z0-9]{30,}\b")
TOKEN_FIX = "pass a token with token= (CLI: --token, or the HF_TOKEN variable), never in its place"


# Where a token is given, in the user's words (the library's keyword and the CLI's flag).
TOKEN_GIVEN = "token= (CLI: --token)"
# A character a token holds: printable ASCII but the space (an HTTP header carries nothing else).
TOKEN_CHARACTERS = re.compile(r"[!-~]+")


def clean_token(token: str | bool | None, where: str = TOKEN_GIVEN) -> str | bool | None:
    """`token` as it is sent: surrounding whitespace removed (a token read from a file, `open("token.txt").read()` or
    a CRLF file, ends in a line break, as huggingface_hub strips HF_TOKEN and the stored login); a token with a
    space, line break or control character inside (a paste of two lines) is refused in one line naming `where` it
    was given, never showing it (`OptionError`): the HTTP client would refuse the header in words naming the token.
    Every entry point taking a token (merge, push_merged, the CLI, the service) sends it through here."""
    if not isinstance(token, str) or not token:
        return token
    stripped = token.strip()
    if not TOKEN_CHARACTERS.fullmatch(stripped):
        from hf_mudsc.errors import OptionError

        said = "holds only whitespace" if not stripped else "holds a space, line break or other character no token has"
        raise OptionError(f"the token given as {where} {said} (not shown); pass the token alone (a token read from a "
                          "file: its first line, stripped)")
    return stripped


def looks_like_token(text: str) -> bool:
    """Whether `text` holds something shaped like an access token (then no message may show `text`)."""
    return TOKEN_SHAPE.search(text) is not None


def repo_id_refusal(repo_id: str, where: str) -> str | None:
    """Why `repo_id` cannot be a Hub repo to push to, in one line starting with `where` it was given (the flag,
    argument or `option_hint`), or None: a token pasted in its place (never shown), no `org/name`, or a name the Hub
    refuses (huggingface_hub's `validate_repo_id`: characters, `--`/`..`, 96 characters, `.git`), or `org/name@branch`
    (pointed at the revision option) — known before any Hub call."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if looks_like_token(repo_id):
        return (f"{where} looks like a Hugging Face access token (not shown); give the Hub repo to create as "
                f"`org/name`, and {TOKEN_FIX}")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        return f"{where} must look like `org/name` (a Hub repo id), got {repo_id!r}"
    name, at, revision = repo_id.partition("@")
    if at and revision and repo_id_refusal(name, where) is None:  # as parents are named: the branch has its option
        option = "revision=" if where.startswith("repo_id") else "--revision"
        return (f"{where} {repo_id!r} names a revision, which a push target does not take: give the repo as {name!r} "
                f"and the branch with {option} {revision!r}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        rule = str(error).replace(f": {repo_id!r}", "").rstrip(".")
        return f"{where} {repo_id!r} is not a repo id the Hub accepts ({rule}); choose another name"
    return None


# The userinfo of a URL (`scheme://user:password@host`): credentials, e.g. of an `HF_ENDPOINT` mirror behind a proxy.
URL_USERINFO = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)[^/?#@\s'\"<>]*@")


# The credentials of an `Authorization: Bearer <token>` header an HTTP client's error repeats (`Illegal header value
# b'Bearer <token>\\n'`), whatever the token's shape.
BEARER = re.compile(r"\b(Bearer\s+)\S+", re.IGNORECASE)


def hide_tokens(text: str) -> str:
    """`text` with anything shaped like an access token, what follows `Bearer` and the userinfo of any URL replaced by
    `***`: for an error line that names what the user gave, which may be a token given in the wrong place (`hf-mudsc
    inspect $HF_TOKEN`), a header the HTTP client refused, or a Hub error naming its URL, whose host an `HF_ENDPOINT`
    with credentials precedes with them."""
    return URL_USERINFO.sub(r"\1***@", BEARER.sub(r"\1***", TOKEN_SHAPE.sub("***", text)))


class HiddenCredentials(logging.Filter):
    """A log handler's filter applying `hide_tokens` to each line: with -v the HTTP client logs every request's URL
    (`HTTP Request: GET http://user:secret@mirror/...`), whose userinfo is the `HF_ENDPOINT`'s credentials — and to
    the traceback a record carries (-v logs the error a command ended in with it, whose text names what was given)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is logging's to report, not ours
            return True
        hidden = hide_tokens(text)
        if hidden != text:
            record.msg, record.args = hidden, None
        if record.exc_info and not record.exc_text:  # formatted here, hidden; a formatter uses exc_text as it is
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = hide_tokens(record.exc_text)
        if record.stack_info:
            record.stack_info = hide_tokens(record.stack_info)
        return True


class EscapedControls(logging.Filter):
    """A log handler's filter writing each record's control characters and bidirectional overrides as escapes
    (`errors.escaped`): hf-mudsc's lines name labels, tasks and models from downloaded configs, and one holding
    `\\x1b[2J` cleared the terminal, one holding a line break printed a forged line of its own. An hf-mudsc record
    stays one line, but for one marked `extra={"keep_lines": True}` (the service's log of a failed job's traceback,
    unreadable on one line), which keeps its line breaks only; other libraries' keep their line breaks and tabs
    (their multi-line warnings)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is logging's to report, not ours
            return True
        own = record.name.split(".")[0] == "hf_mudsc"
        shown = escaped(text, keep=("\n" if getattr(record, "keep_lines", False) else "") if own else "\n\t")
        if shown != text:
            record.msg, record.args = shown, None
        return True


def without_userinfo(url: str) -> str:
    """`url` without `user:password@`: how an endpoint is written where others read it (the card's links, a
    push's result), since `HF_ENDPOINT` may carry a mirror's credentials."""
    return URL_USERINFO.sub(r"\1", url)


def parent_name(model: PreTrainedModel, fallback: str) -> str:
    """A parent's name for the merged config: a local folder by its name only. The config travels with every
    copy of the model, and absolute paths would publish this machine's layout (user names, cache folders);
    the recipe keeps the paths it needs to re-run the merge."""
    name = str(getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "") or fallback)
    return display_name(name) or fallback


#: A full Git commit id, as the Hub names commits (and its cache names snapshot folders).
COMMIT_SHA = re.compile(r"[0-9a-f]{40}")


def display_name(name: str | os.PathLike) -> str:
    """How a parent or dataset reference appears off this machine (the merged config, the card, the recipe pushed to
    the Hub): Hub ids and specs as given, local paths (absolute, home-relative or existing) by their last component,
    never by their path. A spec `path:split` keeps its suffix (`calibration:train`)."""
    text = os.path.expanduser(os.fspath(name)) if os.fspath(name).startswith("~") else os.fspath(name)
    if os.path.isabs(text) or os.path.exists(text):  # `~/private/x` too: a Hub id never starts so
        return os.path.basename(os.path.abspath(text))
    head, sep, rest = text.partition(":")
    if sep and head and (os.path.isabs(head) or os.path.exists(head)):
        return f"{os.path.basename(os.path.abspath(head))}:{rest}"
    return text


# How a recipe (and the card) names a parent given as a model object whose weights no folder or Hub repo holds:
# `<ViTForImageClassification object>`, which is neither a path nor a Hub id, so a re-run cannot load another model.
OBJECT_REFERENCE = re.compile(r"^<([A-Za-z_][A-Za-z0-9_]*) object>$")


def object_reference(model: Any) -> str:
    """The reference of a parent given as an object that cannot be re-loaded (`OBJECT_REFERENCE`)."""
    return f"<{type(model).__name__} object>"


def is_object_reference(text: Any) -> bool:
    """Whether a recipe entry names a model object (`object_reference`), which only the merge that had it can use."""
    return isinstance(text, str) and OBJECT_REFERENCE.match(text) is not None


def pinned_reference(parent: Any) -> str:
    """How a recipe names a parent (`LoadedParent`): `org/name@<commit sha>` from the Hub, an absolute path for
    a local folder, so the recipe re-runs the same merge from anywhere."""
    if getattr(parent, "repo_id", None) and getattr(parent, "commit_sha", None):
        return f"{parent.repo_id}@{parent.commit_sha}"
    path = os.path.expanduser(str(parent.reference))
    return os.path.abspath(path) if os.path.exists(path) else str(parent.reference)


def pinned_calibration(calibration_spec: str | None) -> str | None:
    """A calibration spec for a recipe: a local path (alone or before `:config:split`) made absolute."""
    if not calibration_spec:
        return calibration_spec
    first, sep, rest = calibration_spec.partition(":")
    for path, tail in ((calibration_spec, ""), (first, sep + rest)):
        if path and os.path.exists(os.path.expanduser(path)):
            return os.path.abspath(os.path.expanduser(path)) + tail
    return calibration_spec


def card_front_matter(card_text: str) -> dict[str, Any] | None:
    """A model card's front matter as a mapping; None (logged) when it cannot be read: no YAML, Python tags, a key
    that is no text (`2024: first release`). Parsed one way for every field read from a parent's card."""
    import yaml
    from huggingface_hub import ModelCard

    try:
        return ModelCard(card_text, ignore_metadata_errors=True).data.to_dict()
    except (ValueError, TypeError, AttributeError, yaml.YAMLError) as error:
        logger.warning("a parent's model card has front matter that is not valid YAML (%s): its base_model and licence "
                       "are not read", brief(error, 200))
        return None


def card_base_model(card_text: str | None) -> str | None:
    """The one `base_model` a model card's front matter names (a string or a one-item list), else None. Here, not
    in the loader, so the service's web process decides which base a local parent's card names as the loader will."""
    data = card_front_matter(card_text) if card_text else None
    value = data.get("base_model") if data is not None else None
    if isinstance(value, list):
        value = value[0] if len(value) == 1 else None
    return value if isinstance(value, str) and value else None


#: A parent's licence when its model card could not be read (not cached offline, a Hub error, not UTF-8, too large,
#: front matter that is no YAML mapping): unknown, which is neither "none declared" nor any licence.
LICENSE_NOT_READ = "(card not read)"


def card_license(card_text: str | None) -> str | None:
    """The licence a model card's front matter declares (`license`; `other` with its `license_name` as
    `other (NAME)`), None when it declares none, `LICENSE_NOT_READ` when its front matter cannot be read. Read so
    that a merge of parents under different licences is said, and a card declares a licence only where every parent
    shares it."""
    if not card_text:
        return None
    data = card_front_matter(card_text)
    if data is None:
        return LICENSE_NOT_READ
    value, name = data.get("license"), data.get("license_name")
    if not isinstance(value, str) or not value.strip():
        return None
    value = " ".join(value.split())[:100]
    return f"{value} ({' '.join(name.split())[:100]})" if value == "other" and isinstance(name, str) and name else value


def parse_reference(ref: str | os.PathLike) -> tuple[str, str | None]:
    """`"org/name@rev"` -> `("org/name", "rev")`; `"org/name"` -> `("org/name", None)`.

    Anything that exists on disk, or looks like a path (`./x`, `/x`, `~/x`, more than one `/`), is a
    folder and is returned untouched with revision None.
    """
    text = os.fspath(ref)
    if not text:
        raise LoadError("empty model reference; pass 'org/name', 'org/name@revision' or a local folder")
    if _looks_like_path(text):
        return text, None
    if looks_like_token(text):  # `merge a b $HF_TOKEN`: every message would show it
        raise LoadError(f"a model reference looks like a Hugging Face access token (not shown); {TOKEN_FIX}")
    repo_id, sep, revision = text.partition("@")
    if sep and not revision:
        raise LoadError(f"{text!r} ends with '@' but names no revision; use 'org/name@<branch, tag or sha>'")
    if sep and not repo_id:
        raise LoadError(f"{text!r} names a revision but no repository; use 'org/name@{revision}'")
    return repo_id, revision or None


def _looks_like_path(text: str) -> bool:
    """Existing paths, and what only a path can look like (a Hub id is `name` or `org/name`)."""
    name = text.split("@", 1)[0]
    return (
        os.path.exists(text)
        or text.startswith((".", "/", "~"))
        or "\\" in text
        or name.count("/") > 1
        or (len(text) > 2 and text[1] == ":" and text[2] in "\\/")  # a Windows drive
    )


def looks_like_path(text: str) -> bool:
    """True for references that can only be a local path (an existing one, `./x`, `/x`, `~/x`, `a/b/c`)."""
    return _looks_like_path(text)


def license_conflict(parents: Sequence[str | None], base: str | None = None, with_base: bool = False) -> str | None:
    """What to say when the parents' (and the base's, `with_base`) model cards declare different licences, or some
    declare one and others none: the merged weights derive from every parent, and its card then declares no licence
    (`card.common_license`). None when they agree. A function of the licences alone, so a service can say it from
    a merge's `config.mudsc` (`parent_licenses`, `base_license`)."""
    declared = [(parent_label(i), license) for i, license in enumerate(parents)]
    declared += [("base", base)] if with_base else []
    known = {license for _, license in declared if license != LICENSE_NOT_READ}
    if len({license for _, license in declared}) > 1 and known - {None}:
        said = {None: "none declared", LICENSE_NOT_READ: "its card not read"}
        return ("the parents' model cards declare different licences, or not all could be read "
                f"({', '.join(f'{who}: {said.get(license, license)}' for who, license in declared)}): the merged "
                "weights derive from each, so its card declares none; check their terms and set the licence yourself "
                "before publishing")
    return None
