"""A parent's config.json read as plain JSON before transformers sees it.

transformers trusts the file: `null` crashes it with a TypeError, `num_labels: 1000000000` makes it build one
id2label entry per label (23 GB), `num_hidden_layers: 1000000000` one module per layer; it acts on some keys
(`attn_implementation` names attention code to run — a Hub kernel id downloads and runs that repository's code —
and `quantization_config` quantizes the weights as they load). These are refused here in one line naming the file
and the fix, before `AutoConfig` runs.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from hf_mudsc.errors import LoadError, shown
from hf_mudsc.option_values import MAX_BLOCKS

logger = logging.getLogger(__name__)

#: The largest config, processor or tokenizer file read with a model (each is read whole): real ones are kilobytes to
#: tens of megabytes (a large tokenizer.json ~35 MB); a hostile repository's or folder's could be gigabytes.
SIDE_FILE_MAX_BYTES = 256 * 2**20
#: The most labels a classifier config may declare (ImageNet-21k has 21,841; each becomes an id2label entry).
MAX_LABELS = 1_000_000
FIX = "restore the config.json saved with the weights (save_pretrained writes both)"
#: The attention code a config may choose: transformers' own (None: its default).
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")
#: Config keys that are sizes (`hidden_size`, `projection_dim`, `max_position_embeddings`): never negative.
SIZE_SUFFIXES = ("_size", "_dim", "_embeddings")
_ATTENTION_KEYS = ("attn_implementation", "_attn_implementation")
_JSON_KINDS = {type(None): "null", list: "a list", str: "a string", bool: "a boolean", int: "a number",
               float: "a number"}


def parse_json(text: str) -> Any:
    """`json.loads(text)`, with a nesting deeper than Python's parser follows (100,000 `[`: 200 kB, under every size
    limit) raised as the `ValueError` of any malformed JSON instead of a RecursionError: every reader of a file from a
    folder catches ValueError to say the file is malformed in one line."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("it is nested too deeply to be a file hf-mudsc reads") from None


def check_config_json(folder: Path, reference: str) -> dict[str, Any]:
    """The parsed config.json of `folder`; raises `LoadError` when it is not a JSON object naming a model_type, or
    declares a count no model has (a negative `num_*` or size, more than `MAX_LABELS` labels or `MAX_BLOCKS` layers)."""
    where = f"{reference!r}: config.json"
    try:
        text = (folder / "config.json").read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise LoadError(f"{where} is not UTF-8 JSON (byte {error.start}: {error.reason}); {FIX}") from None
    try:
        data = json.loads(text, object_pairs_hook=_refuse_duplicates)
    except _DuplicateKey as duplicate:
        raise LoadError(f"{where} gives the key {shown(duplicate.key)} twice (JSON readers disagree on which value "
                        f"counts); {FIX}") from None
    except json.JSONDecodeError as error:
        raise LoadError(f"{where} is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}); "
                        f"{FIX}") from None
    except ValueError as error:  # an integer longer than Python reads (4300 digits)
        raise LoadError(f"{where} is not valid JSON ({error}); {FIX}") from None
    except RecursionError:
        raise LoadError(f"{where} is not valid JSON: it is nested too deeply to be a config; {FIX}") from None
    if not isinstance(data, dict):
        raise LoadError(f"{where} is not a JSON object (got {_JSON_KINDS.get(type(data), 'a value')}); {FIX}")
    non_finite = _non_finite(data)
    if non_finite is not None:  # Python reads NaN and Infinity, JSON has neither: NaN even differs from itself
        raise LoadError(f"{where} gives {non_finite[0]} as {non_finite[1]}, not a number JSON allows; {FIX}")
    if not isinstance(data.get("model_type"), str) or not data["model_type"]:
        raise LoadError(f"{where} names no model_type (the transformers model family, e.g. \"vit\"; got "
                        f"{shown(data.get('model_type'))}); {FIX}")
    _check_counts(data, where)
    _check_code_choices(data, where)
    check_label_numbers(data.get("id2label"), where)
    return data


def _is_integer(key: Any) -> bool:
    try:
        int(key)
    except (TypeError, ValueError):
        return False
    return True


def refuse_label_keys_not_numbers(id2label: Any, where: str) -> None:
    """A model object's `id2label` (set after it was built, so no `AutoConfig` read it) with a key that is no integer
    (`"a"`): it names no classifier row, and the label code would fail on it with a bare ValueError."""
    if isinstance(id2label, dict):
        key = next((key for key in id2label if not _is_integer(key)), None)
        if key is not None:
            raise LoadError(f"{where}: id2label has the key {shown(key)}, which is no class number (0 to "
                            f"{len(id2label) - 1}, one per classifier row); give the model back the labels it was "
                            "built with")


def check_label_numbers(id2label: Any, where: str) -> None:
    """`id2label` names classifier row `i` by key `i`: keys other than 0 .. n-1 (`-1, 0, 1`) would be read in sorted
    order, each label naming another row than transformers gives it. Keys that are no integers are left to
    `AutoConfig`, which refuses them (a model object's config: `refuse_label_keys_not_numbers`)."""
    if not isinstance(id2label, dict):
        return
    try:
        numbers = sorted(int(key) for key in id2label)
    except (TypeError, ValueError):
        return
    if numbers != list(range(len(numbers))):
        raise LoadError(f"{where}: id2label numbers its labels {shown(numbers)}, not 0 to {len(numbers) - 1} (one per "
                        f"classifier row); {FIX}")


def _non_finite(data: Any) -> tuple[str, str] | None:
    """`(key path, "NaN" / "Infinity" / "-Infinity")` of the first non-finite number in `data`, None if it has none.
    Iterative: `data` may be nested as deeply as the JSON reader allows."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            return path, "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
        if isinstance(value, dict):
            stack.extend((f"{path}.{key}" if path else str(key), item) for key, item in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend((path, item) for item in reversed(value))
    return None


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object as a dict, raising `_DuplicateKey` for a key given twice (json keeps the last silently)."""
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise _DuplicateKey(key)
        data[key] = value
    return data


def _check_code_choices(data: dict[str, Any], where: str, prefix: str = "") -> None:
    """Keys that make transformers run other code than the model's own class: an attention implementation other
    than its built-in ones (a Hub kernel id is downloaded and run), a quantization applied while loading."""
    for key, value in data.items():
        if key in _ATTENTION_KEYS:
            # transformers also takes one per sub-config, `{"": "sdpa", "vision_config": "<kernel repo>"}`: each is
            # checked (a dict is no sub-config here); any other value (a list, a number) is refused as a kernel id is
            choices = ({f"{prefix}{key}[{name!r}]": each for name, each in value.items()} if isinstance(value, dict)
                       else {f"{prefix}{key}": value})
            for name, each in choices.items():
                if each is not None and (not isinstance(each, str) or each not in ATTENTION_IMPLEMENTATIONS):
                    raise LoadError(f"{where} sets {name} to {shown(each)}; hf-mudsc runs models with transformers' "
                                    f"own attention (eager or sdpa), never attention code a model names: remove the "
                                    "key or set it to \"sdpa\"")
        elif isinstance(value, dict) and key != "quantization_config":
            _check_code_choices(value, where, f"{prefix}{key}.")
    if not prefix and data.get("quantization_config") is not None:
        quantization = data["quantization_config"]
        method = quantization.get("quant_method") if isinstance(quantization, dict) else None
        raise LoadError(f"{where} declares a quantization (quantization_config, quant_method {shown(method)}): "
                        "from_pretrained would quantize the weights as it loads them. Merge float weights: dequantize "
                        "the checkpoint (load it with its quantization library and save_pretrained the float model) "
                        "or use the float checkpoint it was quantized from")


def _check_counts(data: dict[str, Any], where: str, prefix: str = "") -> None:
    """Counts of things transformers builds one by one (labels, layers) must be ones a model can have; no count or
    size may be negative."""
    for key, value in data.items():
        if isinstance(value, dict):
            _check_counts(value, where, f"{prefix}{key}.")
            continue
        if not isinstance(key, str) or isinstance(value, bool) or not isinstance(value, int):
            continue
        name = prefix + key
        limit = MAX_LABELS if key == "num_labels" else MAX_BLOCKS if key.endswith("layers") else None
        if value < 0 and (key.startswith("num_") or key.endswith(SIZE_SUFFIXES)):  # torch fails on it in a traceback
            kind = "count" if key.startswith("num_") else "size"
            raise LoadError(f"{where}: {name} is {value}, a {kind} cannot be negative; {FIX}")
        if limit is not None and value > limit:
            raise LoadError(f"{where}: {name} is {shown(value)}, more than any model has (at most {limit:,}); "
                            f"{FIX}")


def card_too_large(where: str, size: int, limit: int) -> None:
    """Log that a model card over `limit` (`SIDE_FILE_MAX_BYTES`, as the caller holds it) is not read for the base it
    may name."""
    logger.warning("%s: README.md is %s bytes, more than the %s a model card is read at; the base_model and licence "
                   "it may name are not read", where, f"{size:,}", f"{limit:,}")


def read_card(path: Path) -> str | None:
    """A model card's text; None (logged) for one larger than `SIDE_FILE_MAX_BYTES` (it is read whole) or not UTF-8
    text: such a card names no base. Light (no torch): the loader and the service's POST checks read cards alike."""
    size = path.stat().st_size
    if size > SIDE_FILE_MAX_BYTES:
        card_too_large(str(path.parent), size, SIDE_FILE_MAX_BYTES)
        return None
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        logger.warning("%r is not UTF-8 text (%s); the base_model and licence it may name are not read", str(path),
                       error.reason)
        return None
