"""A calibration spec `repo_or_path[@revision][:config]:split` -> its parts, with nothing heavy imported.

Its own module so that what reads a spec without loading data — the service's check of which paths a job names
(`hf_mudsc.serve.jobs`), the evaluation's source names — parses it exactly as `calibrate.datasets` loads it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from hf_mudsc.errors import CalibrationError
from hf_mudsc.load.references import TOKEN_FIX, looks_like_token

SPEC_FORMS = "use 'repo_or_path[:config]:split', or 'org/ds@revision[:config]:split' to pin a Hub dataset"


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
    def parse(cls, dataset_spec: str | os.PathLike) -> DatasetSpec:
        text = os.fspath(dataset_spec).strip()
        if not text:
            raise CalibrationError(f"empty calibration spec; {SPEC_FORMS}")
        if os.path.exists(text):
            return cls(path=text)
        if looks_like_token(text):  # every message about the spec would show it
            raise CalibrationError("the calibration spec looks like a Hugging Face access token (not shown); "
                                   + TOKEN_FIX)
        match = re.fullmatch(r"(?P<body>.*?)(?P<slice>\[[^\]]*\])?", text, flags=re.DOTALL)  # total: any text
        body, slice_ = match.group("body"), match.group("slice") or ""
        parts = body.split(":")
        if len(parts) == 1:
            if slice_:
                raise CalibrationError(f"calibration spec {text!r}: a slice needs a split, e.g. 'data:train[:100]'")
            path, revision = split_revision(parts[0], text)
            return cls(path=path, revision=revision)
        if len(parts) == 2:
            path, config, split = parts[0], None, parts[1]
        elif len(parts) == 3:
            path, config, split = parts
        else:
            raise CalibrationError(f"calibration spec {text!r} has too many ':' parts; {SPEC_FORMS}")
        if not path or not split or (config is not None and not config):
            raise CalibrationError(f"calibration spec {text!r} has an empty part; {SPEC_FORMS}")
        path, revision = split_revision(path, text)
        return cls(path=path, config=config, split=split + slice_, revision=revision)

    def __str__(self) -> str:
        source = f"{self.path}@{self.revision}" if self.revision else self.path
        return ":".join(p for p in (source, self.config, self.split) if p)


def split_revision(path: str, text: str) -> tuple[str, str | None]:
    """`org/ds@rev` -> (`org/ds`, `rev`); an existing local path is taken as it is (it may contain '@')."""
    if "@" not in path or os.path.exists(os.path.expanduser(path)):
        return path, None
    repo, _, revision = path.partition("@")
    if not repo:
        raise CalibrationError(f"calibration spec {text!r} has an empty part; {SPEC_FORMS}")
    if not revision:
        raise CalibrationError(f"calibration spec {text!r} has an empty revision after '@'; {SPEC_FORMS}")
    if "@" in revision:
        raise CalibrationError(f"calibration spec {text!r} may carry one '@revision' only; {SPEC_FORMS}")
    if os.path.exists(os.path.expanduser(repo)):
        raise CalibrationError(
            f"calibration spec {text!r}: a revision pins a Hub dataset, but {repo!r} is local data; "
            f"drop '@{revision}'"
        )
    return repo, revision
