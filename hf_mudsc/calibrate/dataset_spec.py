"""A calibration spec `repo_or_path[@revision][:config]:split` -> its parts, with nothing heavy imported.

Its own module so that what reads a spec without loading data — the service's check of which paths a job names
(`hf_mudsc.serve.jobs`), the evaluation's source names — parses it exactly as `calibrate.datasets` loads it.

Which data a spec names (the API, the CLI, a dry run and `evaluate` all parse it here):
- a path that looks like one — `./mnist`, `../d`, `/d`, `~/d`, `a/b/c`, or a data file `rows.jsonl` — is local data;
- `org/name` is the local folder of that path when there is one, else the Hub dataset;
- a bare name (`mnist`, `imagefolder`) is a Hub dataset or a `datasets` builder. When it is also a file or folder of
  the working directory, `datasets` would read that first, unasked: the spec is refused as ambiguous, in one line
  naming both spellings (`./mnist:train` for the folder, `mnist@main:train` for the Hub dataset). A revision always
  names the Hub dataset, never a folder (`DatasetSpec.local`).
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass

from hf_mudsc.errors import CalibrationError
from hf_mudsc.load.references import TOKEN_FIX, looks_like_token

SPEC_FORMS = "use 'repo_or_path[:config]:split', or 'org/ds@revision[:config]:split' to pin a Hub dataset"
# Data files read by a `datasets` packaged builder, by suffix: a bare `rows.jsonl` is a file name, never a Hub dataset.
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet",
                 ".arrow": "arrow", ".txt": "text"}


@dataclass(frozen=True)
class DatasetSpec:
    """A parsed `"repo_or_path[@revision][:config]:split"` (split may carry a slice, e.g. `train[:100]`).

    `revision` (a branch, tag or commit sha) pins a Hub dataset like `org/name@revision` pins a parent.
    """

    path: str
    config: str | None = None
    split: str | None = None
    revision: str | None = None

    @classmethod
    def parse(cls, dataset_spec: str | os.PathLike, *, kind: str = "calibration",
              error: type[Exception] = CalibrationError) -> DatasetSpec:
        """The spec's parts; its errors say what the data is for (`kind`: `evaluation spec './x' ...`) as `error`."""
        text = os.fspath(dataset_spec).strip()
        if not text:
            raise error(f"empty {kind} spec; {SPEC_FORMS}")
        if not isinstance(dataset_spec, str):  # a Path names local data, never a Hub id
            return cls(path=spec_text(dataset_spec))
        if os.path.exists(text):
            refuse_ambiguous(text, text, kind=kind, error=error)
            return cls(path=text)
        if looks_like_token(text):  # every message about the spec would show it
            raise error(f"the {kind} spec looks like a Hugging Face access token (not shown); " + TOKEN_FIX)
        opened = text.find("[")
        if opened >= 0 and "]" not in text[opened:]:  # else read as config 'train[' and split '100'
            raise error(f"{kind} spec {text!r}: the slice {text[opened:]!r} lacks its closing ']'; write "
                        f"{text + ']'!r}")
        match = re.fullmatch(r"(?P<body>.*?)(?P<slice>\[[^\]]*\])?", text, flags=re.DOTALL)  # total: any text
        body, slice_ = match.group("body"), match.group("slice") or ""
        parts = body.split(":")
        if len(parts) == 1:
            if slice_:
                raise error(f"{kind} spec {text!r}: a slice needs a split, e.g. 'data:train[:100]'")
            path, revision = split_revision(parts[0], text, kind=kind, error=error)
            if revision is None:
                refuse_ambiguous(path, text, kind=kind, error=error)
            return cls(path=path, revision=revision)
        if len(parts) == 2:
            path, config, split = parts[0], None, parts[1]
        elif len(parts) == 3:
            path, config, split = parts
        else:
            raise error(f"{kind} spec {text!r} has too many ':' parts; {SPEC_FORMS}")
        if not path or not split or (config is not None and not config):
            raise error(f"{kind} spec {text!r} has an empty part; {SPEC_FORMS}")
        path, revision = split_revision(path, text, kind=kind, error=error)
        if revision is None:
            refuse_ambiguous(path, text, kind=kind, error=error)
        return cls(path=path, config=config, split=split + slice_, revision=revision)

    def __str__(self) -> str:
        source = f"{self.path}@{self.revision}" if self.revision else self.path
        return ":".join(p for p in (source, self.config, self.split) if p)

    @property
    def local(self) -> bool:
        """Whether the spec names data of this machine (a file or folder), not a Hub dataset or builder: a
        revision always names the Hub dataset, even when a folder of its name is at hand."""
        return self.revision is None and os.path.exists(os.path.expanduser(self.path))


def looks_like_local_path(path: str) -> bool:
    """Whether `path`'s shape says it is local data, whatever exists: `./x`, `../x`, `/x`, `~/x`, `a/b/c`, a Windows
    path, or a data file by its suffix (`rows.jsonl`). `name` and `org/name` are Hub-shaped."""
    return (path.startswith((".", "/", "~")) or "\\" in path or path.count("/") > 1
            or (len(path) > 2 and path[1] == ":" and path[2] in "\\/")
            or os.path.splitext(path)[1].lower() in FILE_BUILDERS)



def spec_text(value: str | os.PathLike) -> str:
    """A spec as text: a string as given; a `Path` (always local data) spelled so that no parse takes it for a Hub
    name (`Path("./calib")` is `calib`, which `refuse_ambiguous` would refuse): `./calib`."""
    text = os.fspath(value)
    if isinstance(value, str) or looks_like_local_path(text):
        return text
    return os.path.join(".", text)


def missing_local_data(dataset_spec: str | os.PathLike) -> str | None:
    """The path of a spec that names local data by its shape (`looks_like_local_path`) where nothing is: checked
    before anything is loaded, so that `./gone:train` is refused at once, not after torch and the parents (a
    `datasets` Hub lookup then fails on it anyway). None: the spec names existing data, a Hub dataset or builder, or
    is malformed (its parse refuses it later, with the reason)."""
    try:
        spec = DatasetSpec.parse(dataset_spec)
    except CalibrationError:
        return None
    if spec.revision is not None or not looks_like_local_path(spec.path):
        return None
    return None if os.path.exists(os.path.expanduser(spec.path)) else spec.path

def refuse_ambiguous(path: str, text: str, *, kind: str = "calibration",
                     error: type[Exception] = CalibrationError) -> None:
    """Refuse a bare name (`mnist`) that is also a file or folder of the working directory: `datasets` would read that
    first although the spec does not look like a path (module docstring). `datasets`' packaged builders (`json`,
    `imagefolder`, ...) are read by name before any folder, so they are not ambiguous."""
    if "/" in path or looks_like_local_path(path) or not os.path.exists(path) or _is_builder(path):
        return
    folder = "folder" if os.path.isdir(path) else "file"
    rest = text[len(path):]
    raise error(
        f"{kind} spec {text!r} is ambiguous: {path!r} is a Hub dataset name and also a {folder} in the working "
        f"directory; write './{path}{rest}' to read the {folder}, or '{path}@main{rest}' for the Hub dataset")


def _is_builder(name: str) -> bool:
    """Whether `name` is one of `datasets`' packaged builders — a module of `datasets.packaged_modules`, which
    `datasets` has no public list of (imported only for a bare name that exists here)."""
    try:
        return importlib.util.find_spec(f"datasets.packaged_modules.{name}") is not None
    except (ImportError, ValueError):
        return False


def split_revision(path: str, text: str, *, kind: str = "calibration",
                   error: type[Exception] = CalibrationError) -> tuple[str, str | None]:
    """`org/ds@rev` -> (`org/ds`, `rev`); an existing local path is taken as it is (it may contain '@'). A bare
    name with a revision is the Hub dataset even when a folder of that name is here (`refuse_ambiguous`)."""
    if "@" not in path or os.path.exists(os.path.expanduser(path)):
        return path, None
    repo, _, revision = path.partition("@")
    if not repo:
        raise error(f"{kind} spec {text!r} has an empty part; {SPEC_FORMS}")
    if not revision:
        raise error(f"{kind} spec {text!r} has an empty revision after '@'; {SPEC_FORMS}")
    if "@" in revision:
        raise error(f"{kind} spec {text!r} may carry one '@revision' only; {SPEC_FORMS}")
    if ("/" in repo or looks_like_local_path(repo)) and os.path.exists(os.path.expanduser(repo)):
        raise error(
            f"{kind} spec {text!r}: a revision pins a Hub dataset, but {repo!r} is local data; "
            f"drop '@{revision}'"
        )
    return repo, revision
