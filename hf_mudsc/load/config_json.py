"""A parent's config.json read as plain JSON before transformers sees it.

transformers trusts the file: `null` crashes it with a TypeError, `num_labels: 1000000000` makes it build one
id2label entry per label (23 GB), `num_hidden_layers: 1000000000` one module per layer. These are refused here in
one line naming the file and the fix, before `AutoConfig` runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hf_mudsc.errors import LoadError, shown
from hf_mudsc.solve.layer_ranges import MAX_BLOCKS

#: The most labels a classifier config may declare (ImageNet-21k has 21,841; each becomes an id2label entry).
MAX_LABELS = 1_000_000
FIX = "restore the config.json saved with the weights (save_pretrained writes both)"
_JSON_KINDS = {type(None): "null", list: "a list", str: "a string", bool: "a boolean", int: "a number",
               float: "a number"}


def check_config_json(folder: Path, reference: str) -> dict[str, Any]:
    """The parsed config.json of `folder`; raises `LoadError` when it is not a JSON object naming a model_type, or
    declares a count no model has (a negative `num_*`, more than `MAX_LABELS` labels or `MAX_BLOCKS` layers)."""
    where = f"{reference!r}: config.json"
    try:
        text = (folder / "config.json").read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise LoadError(f"{where} is not UTF-8 JSON (byte {error.start}: {error.reason}); {FIX}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise LoadError(f"{where} is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}); "
                        f"{FIX}") from None
    except ValueError as error:  # an integer longer than Python reads (4300 digits)
        raise LoadError(f"{where} is not valid JSON ({error}); {FIX}") from None
    except RecursionError:
        raise LoadError(f"{where} is not valid JSON: it is nested too deeply to be a config; {FIX}") from None
    if not isinstance(data, dict):
        raise LoadError(f"{where} is not a JSON object (got {_JSON_KINDS.get(type(data), 'a value')}); {FIX}")
    if not isinstance(data.get("model_type"), str) or not data["model_type"]:
        raise LoadError(f"{where} names no model_type (the transformers model family, e.g. \"vit\"; got "
                        f"{shown(data.get('model_type'))}); {FIX}")
    _check_counts(data, where)
    return data


def _check_counts(data: dict[str, Any], where: str, prefix: str = "") -> None:
    """Counts of things transformers builds one by one (labels, layers) must be ones a model can have."""
    for key, value in data.items():
        if isinstance(value, dict):
            _check_counts(value, where, f"{prefix}{key}.")
            continue
        if not isinstance(key, str) or isinstance(value, bool) or not isinstance(value, int):
            continue
        name = prefix + key
        limit = MAX_LABELS if key == "num_labels" else MAX_BLOCKS if key.endswith("layers") else None
        if key.startswith("num_") and value < 0:
            raise LoadError(f"{where}: {name} is {value}, a count cannot be negative; {FIX}")
        if limit is not None and value > limit:
            raise LoadError(f"{where}: {name} is {shown(value)}, more than any model has (at most {limit:,}); "
                            f"{FIX}")
