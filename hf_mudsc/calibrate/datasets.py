"""Calibration data: a dataset spec or a `datasets` dataset -> a lazily preprocessed stream of input batches.

`resolve_calibration` turns `"repo_or_path[:config]:split"`, a `Dataset`/`IterableDataset` with model-input
columns (`pixel_values`, `input_ids`, ...) or with raw columns (`image`/`img`, `text`/`sentence`) into a
`CalibrationStream`. Nothing is materialised: Hub and file datasets stream, saved datasets are memory-mapped,
and the parents' processor runs batch by batch while the stream is consumed (text is padded per batch, and
padding is masked out of the statistics anyway). Subsets (`num_samples`) are taken after a seeded shuffle so
the same call always sees the same samples, on one process or sharded over many.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import re
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hf_mudsc.calibrate.dataset_spec import FILE_BUILDERS, DatasetSpec
from hf_mudsc.errors import CalibrationError, brief, first_line, shown
from hf_mudsc.load.hub_calls import http_client, hub_call
from hf_mudsc.load.processors import image_processor_of, tokenizer_of
from hf_mudsc.load.references import hide_tokens
from hf_mudsc.options import check_option, flag, option_hint

logger = logging.getLogger(__name__)

IMAGE_COLUMNS = ("image", "img")
TEXT_COLUMNS = ("text", "sentence")
#: Two text columns read as the tokenizer's `text` and `text_pair` (GLUE's MRPC/RTE/STS-B, QNLI, MNLI layouts): a
#: pair-trained BERT sees both segments (token_type_ids 0 and 1). Detected only when it is the one layout present.
TEXT_PAIR_COLUMNS = (("sentence1", "sentence2"), ("question", "sentence"), ("premise", "hypothesis"))
# Columns passed to the models as they are (everything else, e.g. labels, is dropped).
MODEL_INPUT_COLUMNS = ("pixel_values", "input_ids", "attention_mask", "token_type_ids", "position_ids",
                       "pixel_mask")
_IMAGE_INPUTS = ("pixel_values", "pixel_mask")  # the image processor's outputs; the other model inputs are text's
SHUFFLE_BUFFER_SIZE = 1000
DEFAULT_BATCH_SIZE = 32
_TEXT_LIMIT = 512  # fallback truncation when neither the tokenizer nor the config gives one
# What a single data file's builder (`FILE_BUILDERS`) needs besides the file, by suffix: as `datasets` reads a folder
# of such files (a `.tsv` is the csv builder with a tab separator; with the default ',' text with commas is split).
# A tab-separated file has no quoting: a `"` is text (GLUE's TSVs hold `"Yes," he said`), else rows were joined.
FILE_BUILDER_OPTIONS: dict[str, dict[str, Any]] = {".tsv": {"sep": "\t", "quoting": csv.QUOTE_NONE}}


@dataclass(frozen=True)
class DataRole:
    """Whose data and processor a message names: the merge's calibration data read with the parents' processor
    (the default), or `evaluate`'s test data read with one model's processor (`hf_mudsc.evaluate.batches`), so
    neither tells the user about the other's data and each names its own fix."""

    data: str = "calibration data"
    """What the data is, after "the" (`evaluation data of task 'x'`)."""
    image_processor: str = "the parents' image processor"
    """Whose image processor it is (`parent B's image processor`)."""
    lacking: str = "the parents ship no {kind}"
    """Said when that processor has no image processor / tokenizer ({kind}: which, and its file)."""
    fix: str = "save it with the parent models (or load them with their processor)"
    """What to do then, before "or map your own preprocessing"."""
    empty: str = "calibration split {name!r}"
    """The data named in "... is empty" ({name}: the dataset's)."""
    purpose: str = "calibrate with"
    error: type[Exception] = CalibrationError
    kind: str = "calibration"
    """What the data is for, naming a spec that cannot be parsed (`evaluation spec 'x' is ambiguous`)."""
    source: str = "calibration {what} {name!r}"
    """How loading errors name a dataset spec ({what}: dataset, spec, file, folder or split; {name}: the spec), e.g.
    `evaluation dataset './x' (task 'pets')`: the loader is shared, the data's purpose is not."""
    reading: str = "calibration"
    """What the log line of the data read names (`calibration from ...: columns ...`)."""
    processor: str = "the parents' processor"
    """Whose processor that log line says preprocessed raw columns."""

    @property
    def tokenizer(self) -> str:
        """Whose tokenizer it is, as `image_processor` says whose image processor (`the parents' tokenizer`)."""
        return self.image_processor.replace("image processor", "tokenizer")

    def names(self, what: str, name: str) -> str:
        """The data source as this role's messages name it (`source`)."""
        return self.source.format(what=what, name=name)


CALIBRATION = DataRole()


def given_processor_role(processor: Any) -> DataRole:
    """The calibration role when merge() was passed `processor=`: a column it cannot preprocess is its lack (named
    by its class), not the parents', whose processors are not read then, and the fix is another processor or none."""
    whose = f"the processor passed to merge() (processor=, a {type(processor).__name__})"
    return replace(CALIBRATION, image_processor=f"{whose}'s image processor", lacking=f"{whose} has no {{kind}}",
                   fix="pass a processor that has it, or leave processor= out to use the parents'",
                   processor="the processor passed to merge()")


def config_preprocessing(model_config: Any) -> tuple[int | None, int | None]:
    """What a model's config adds to its processor's preprocessing: the image channel count and the text position
    limit. Models with equal processors but configs that differ here need inputs of their own."""
    return _num_channels(model_config), _positions(model_config)


def pin_calibration_revision(dataset_spec: str, *, token: str | bool | None = None) -> str:
    """`dataset_spec` with a Hub dataset's branch/tag (or no revision: the default branch) pinned to its commit sha.

    Recipes record calibration data pinned like parents, so a re-run reads the same rows after the dataset
    moved on. Local data, offline mode (`HF_HUB_OFFLINE=1`) and ids the Hub does not know (e.g. packaged
    builders) are returned as given; an unknown revision is refused before anything is loaded.
    """
    from huggingface_hub import HfApi, constants, errors

    parsed = DatasetSpec.parse(dataset_spec)
    if parsed.local or constants.HF_HUB_OFFLINE:
        return dataset_spec
    try:  # a timeout or a dropped connection: one line (`hub_call`), not the HTTP client's traceback
        info = hub_call(lambda: HfApi().dataset_info(parsed.path, revision=parsed.revision, token=token,
                                                     timeout=constants.HF_HUB_ETAG_TIMEOUT),
                        what="resolving its revision", seconds=constants.HF_HUB_ETAG_TIMEOUT,
                        setting="HF_HUB_ETAG_TIMEOUT", error=CalibrationError,
                        subject=f"calibration dataset {dataset_spec!r}: ")
    except CalibrationError:
        raise
    except errors.RevisionNotFoundError:
        raise CalibrationError(
            f"calibration dataset {dataset_spec!r}: revision {parsed.revision!r} does not exist in the dataset "
            "repository; use an existing branch, tag or commit sha"
        ) from None
    except errors.GatedRepoError:
        raise CalibrationError(
            f"calibration dataset {parsed.path!r} is gated: accept its terms on the Hub and pass a token "
            "(CLI: --token, or log in with `hf auth login`)"
        ) from None
    except errors.RepositoryNotFoundError:
        logger.debug("calibration %r is not a Hub dataset repository; used as given", dataset_spec)
        return dataset_spec
    except (errors.HfHubHTTPError, OSError, ValueError) as error:
        logger.warning("could not resolve the revision of calibration dataset %r (%s); it is recorded as given",
                       dataset_spec, type(error).__name__)
        return dataset_spec
    if not getattr(info, "sha", None):
        return dataset_spec
    pinned = str(replace(parsed, revision=info.sha))
    logger.info("calibration %s resolved to %s", dataset_spec, pinned)
    return pinned


def dataset_folders(data: Any) -> list[str]:
    """The folders a `datasets.Dataset` (or `DatasetDict`) object is read from (its Arrow `cache_files`: a
    `save_to_disk` folder, a `load_dataset` cache); [] for in-memory data, batches or a spec string. A merge records
    them so that its output is refused there, as it is in a calibration folder given by path: inputs are never
    modified."""
    files = getattr(data, "cache_files", None)
    if isinstance(files, Mapping):  # a DatasetDict: each split's files (a merge may not go into any split's folder)
        files = [entry for split in files.values() if isinstance(split, list) for entry in split]
    if not isinstance(files, list):  # batches, specs and in-memory data give none
        return []
    folders = {str(Path(entry["filename"]).parent) for entry in files
               if isinstance(entry, Mapping) and entry.get("filename")}
    return sorted(folders)


def load_calibration_dataset(dataset_spec: str | os.PathLike | DatasetSpec, *, streaming: bool = True,
                             token: str | bool | None = None, role: DataRole = CALIBRATION) -> Any:
    """The split named by `dataset_spec`, without materialising it; its errors name it as `role` does (the merge's
    calibration data by default, evaluate's test data of a task: one loader, each purpose in its own words).

    Folders written by `save_to_disk` are memory-mapped with `load_from_disk`; single data files use the
    matching packaged builder; everything else (Hub ids, imagefolder/audiofolder/data-file folders) goes to
    `datasets.load_dataset(..., streaming=True)`. Slices (`train[:100]`) need `streaming=False`, which
    is chosen automatically (they are read into the local arrow cache, not into memory).
    """
    parsed = (dataset_spec if isinstance(dataset_spec, DatasetSpec)
              else DatasetSpec.parse(dataset_spec, kind=role.kind, error=role.error))
    loaded = _load_split(parsed, streaming, token, role)
    try:
        _LOADED_FROM[loaded] = str(parsed)
    except TypeError:  # not weakly referable: messages then name it as an object
        pass
    return loaded


#: The spec each dataset `load_calibration_dataset` returned was read from, so that what is later done with the
#: object (`resolve_calibration`, `check_calibration_columns`: its log line, an empty file, a row that cannot be read)
#: names the data as the user gave it (`./rows.csv`), not as `datasets` names its builder (`csv`) or not at all.
_LOADED_FROM: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def loaded_from(data: Any) -> str | None:
    """The spec `data` was read from by `load_calibration_dataset` (None: data given as an object)."""
    try:
        return _LOADED_FROM.get(data)
    except TypeError:  # unhashable or not weakly referable: not loaded here
        return None


def _load_split(parsed: DatasetSpec, streaming: bool, token: str | bool | None, role: DataRole) -> Any:
    """`load_calibration_dataset`'s reading of a parsed spec."""
    import datasets

    path = Path(parsed.path).expanduser()
    local = parsed.local  # a revision names the Hub dataset, even with a folder of its name here (dataset_spec)
    saved_folder = local and path.is_dir() and (
        (path / "state.json").is_file() or (path / "dataset_dict.json").is_file())
    if parsed.config is not None and (saved_folder or (local and path.is_file())):  # it would be ignored unsaid
        raise role.error(
            f"{role.names('spec', str(parsed))} names the config {parsed.config!r}, but {parsed.path!r} is local data "
            f"without configs; use '{parsed.path}:{parsed.split}'")
    if saved_folder:
        _refuse_large_saved_json(path, parsed, role)
        _refuse_empty_saved_split(path, parsed, role)
        try:
            saved = datasets.load_from_disk(str(path))
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:  # pyarrow's errors are ValueErrors
            raise role.error(f"{role.names('dataset', str(parsed))} is a Dataset.save_to_disk folder that cannot "
                             f"be read ({type(error).__name__}: {brief(error)}); it is damaged or incomplete: save it "
                             "again with Dataset.save_to_disk") from None
        return _refuse_empty(_saved_split(saved, parsed, role), str(parsed), role)
    use_streaming = streaming and not (parsed.split and "[" in parsed.split)
    kwargs: dict[str, Any] = {"split": parsed.split, "streaming": use_streaming}
    if parsed.revision is not None:
        kwargs["revision"] = parsed.revision
    if token is not None:
        kwargs["token"] = token
    if local and path.is_file():
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise role.error(
                f"{role.names('file', parsed.path)} has an unknown format; use one of "
                f"{', '.join(sorted(FILE_BUILDERS))} or a dataset folder"
            )
        if path.stat().st_size == 0:  # the packaged builders fail on it with StopIteration or pandas' EmptyDataError
            raise role.error(f"{role.names('file', parsed.path)} is empty (0 bytes): no samples to {role.purpose}; "
                             "pass a file that holds examples")
        refuse_crashing_file(path, parsed.path, role)
        args: tuple[Any, ...] = (builder,)
        kwargs.update(data_files=str(path), split=parsed.split or "train", **FILE_BUILDER_OPTIONS.get(
            path.suffix.lower(), {}))
    else:
        # `datasets` reads a folder of the name before the Hub: `hf://datasets/` asks the Hub only.
        name = parsed.path if local or not path.exists() else f"hf://datasets/{parsed.path}"
        args = (name,) if parsed.config is None else (name, parsed.config)
    try:
        loaded = datasets.load_dataset(*args, **kwargs)
    except datasets.exceptions.DatasetGenerationError as error:  # a file parsed when loaded (a slice: not streamed)
        cause = error.__cause__
        if not isinstance(cause, Exception):
            raise
        raise data_error(cause, str(parsed), role.error) from None
    except ValueError as error:
        if "corresponds to no data" in str(error):  # datasets' refusal of a slice that selects no row
            raise role.error(_empty_slice(args, kwargs, parsed, role)) from None
        if "split" in str(error).lower():
            raise role.error(f"{role.names('spec', str(parsed))}: {brief(error)}") from error
        raise role.error(f"cannot load {role.names('dataset', str(parsed))}: {brief(error)}") from error
    except StopIteration:  # a JSON builder finding no first record
        raise role.error(f"{role.names('dataset', str(parsed))} holds no rows: no samples to {role.purpose}; "
                         "pass data that holds examples") from None
    except RuntimeError as error:  # datasets refuses a loading script (never running it) with a RuntimeError
        script = re.search(r"found (\S+\.py)", str(error))
        if script is None:
            raise
        raise role.error(
            f"{role.names('dataset', str(parsed))} is a dataset script ({script.group(1)}), which hf_mudsc never runs "
            "(nor does datasets any more); pass its data: data files, an imagefolder or a folder written by "
            "Dataset.save_to_disk"
        ) from None
    except (FileNotFoundError, ConnectionError, OSError, datasets.exceptions.DatasetNotFoundError) as error:
        if local and path.is_dir():  # datasets found no file of a format it reads in it
            raise role.error(
                f"{role.names('folder', parsed.path)} holds no data files datasets can read "
                f"({type(error).__name__}); pass an imagefolder, data files ({', '.join(sorted(FILE_BUILDERS))}) or a "
                "folder written by Dataset.save_to_disk") from error
        raise role.error(
            f"{role.names('dataset', str(parsed))} not found: it is no local folder or file, and the Hub could not "
            f"provide it ({type(error).__name__}: {brief(error)}); no columns found. Pass an existing path "
            "(e.g. an imagefolder or a save_to_disk folder) or a Hub dataset id as 'repo[:config]:split'"
        ) from error
    picked = _pick_split(loaded, parsed, role)
    name, slice_ = split_slice(parsed.split or "")
    split_info = (getattr(getattr(picked, "info", None), "splits", None) or {}).get(name) if slice_ else None
    if isinstance(getattr(split_info, "num_examples", None), int):
        warn_short_slice(slice_, split_info.num_examples, parsed, role)
    return picked


def _empty_slice(args: tuple[Any, ...], kwargs: dict[str, Any], parsed: DatasetSpec, role: DataRole) -> str:
    """The refusal of a slice that selects no row of its split (`train[5000:]` of 100 rows), as an empty saved split
    is refused, with the split's size: read from the split `datasets` has just prepared (no download again)."""
    name, slice_ = split_slice(parsed.split or "")
    size = ""
    try:
        import datasets

        size = f" of the {len(datasets.load_dataset(*args, **{**kwargs, 'split': name})):,} rows of split {name!r}"
    except Exception as error:  # noqa: BLE001 - the size only adds to the message; the refusal stands without it
        logger.debug("size of split %r not read: %s", name, error)
    return (f"{role.names('split', str(parsed))} is empty (0 rows): the slice {slice_} selects none{size}; no samples "
            f"to {role.purpose}: name a slice within the split (e.g. '{name}[:100]')")


_ABSOLUTE_SLICE = re.compile(r"\[\s*(-?\d+)?\s*:\s*(-?\d+)?\s*\]")


def warn_short_slice(slice_: str, total: int, parsed: DatasetSpec, role: DataRole = CALIBRATION) -> None:
    """Say when an absolute slice (`[95:200]`) reaches past the end of its split of `total` rows: it gives fewer rows
    than it names, as Python's slicing does, and the merge would use them without a word. A slice that gives no row
    at all is refused as an empty split; percent slices never reach past the end."""
    match = _ABSOLUTE_SLICE.fullmatch(slice_.strip())
    if match is None or match.group(2) is None:
        return
    start, stop = (int(match.group(1) or 0), int(match.group(2)))
    start, stop = (start + total if start < 0 else start), (stop + total if stop < 0 else stop)
    given = max(0, min(stop, total) - max(start, 0))
    if stop > total and given > 0:
        logger.warning("%s: the slice %s names %d rows, but the split holds %d rows: %d of them are read (rows %d to "
                       "%d); name a slice within the split to say what is read", role.names("spec", str(parsed)),
                       slice_, stop - max(start, 0), total, given, max(start, 0), total - 1)


#: Deepest nesting of a JSON calibration file read: pyarrow's JSON reader crashes (SIGSEGV) at about 20,000.
MAX_JSON_DEPTH = 1000
_JSON_TOKENS = re.compile(rb'[\\"\[\]{}]')


def refuse_crashing_file(path: Path, name: str, role: DataRole = CALIBRATION) -> None:
    """Refuse the data files that crash pyarrow's readers instead of raising (the process dies without a message):
    JSON nested deeper than `MAX_JSON_DEPTH`, and a `.arrow` file that is no Arrow stream or file."""
    suffix = path.suffix.lower()
    if suffix == ".arrow":
        with path.open("rb") as handle:
            head = handle.read(8)
        if not (head.startswith(b"ARROW1") or head.startswith(b"\xff\xff\xff\xff")):
            raise role.error(f"{role.names('file', name)} is not an Arrow file (no Arrow stream or file header); "
                             "pass a file written by pyarrow / datasets, or a dataset folder")
    if suffix not in (".json", ".jsonl"):
        return
    depth, in_string, escaped_at, offset = 0, False, -2, 0
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            for match in _JSON_TOKENS.finditer(chunk):
                at, token = offset + match.start(), match.group()
                if token == b"\\":
                    escaped_at = -2 if escaped_at == at - 1 else at  # `\\` escapes itself
                elif token == b'"':
                    if escaped_at != at - 1:
                        in_string = not in_string
                elif not in_string:
                    depth += 1 if token in (b"[", b"{") else -1
                    if depth > MAX_JSON_DEPTH:
                        raise role.error(
                            f"{role.names('file', name)} nests values more than {MAX_JSON_DEPTH:,} deep (pyarrow's "
                            "reader would crash); pass flat records, one per line")
            offset += len(chunk)


def _refuse_empty(dataset: Any, name: str, role: DataRole = CALIBRATION) -> Any:
    """A map-style split without rows cannot calibrate anything: say so before any parent is loaded."""
    import datasets

    if isinstance(dataset, datasets.Dataset) and len(dataset) == 0:
        raise role.error(f"{role.empty.format(name=name)} is empty (0 rows): no samples to {role.purpose}; pass a "
                         "split that holds examples")
    return dataset


def refuse_no_columns(dataset: Any, columns: Sequence[str], name: str, role: DataRole = CALIBRATION) -> None:
    """A stream whose first row `column_names` could not find (a blank data file) is empty: say so, not that its
    columns lack the models' inputs."""
    import datasets

    if not columns and not isinstance(dataset, datasets.Dataset):
        raise role.error(f"{role.empty.format(name=name)} is empty (0 rows): no samples to {role.purpose}; pass "
                         "data that holds examples")


def _refuse_large_saved_json(folder: Path, parsed: DatasetSpec, role: DataRole = CALIBRATION) -> None:
    """A `save_to_disk` folder's JSON files (`dataset_dict.json`, each split's `state.json`, `dataset_info.json`) are
    read whole, here and by `load_from_disk`: one over `SIDE_FILE_MAX_BYTES` (they are kilobytes) is refused first."""
    from hf_mudsc.load.config_json import SIDE_FILE_MAX_BYTES

    for path in sorted([*folder.glob("*.json"), *folder.glob("*/*.json")]):
        size = path.stat().st_size if path.is_file() else 0
        if size > SIDE_FILE_MAX_BYTES:
            raise role.error(
                f"{role.names('dataset', str(parsed))} is a Dataset.save_to_disk folder that cannot be read "
                f"({path.relative_to(folder).as_posix()} is {size:,} bytes, more than the {SIDE_FILE_MAX_BYTES:,} "
                "such a file may be); it is damaged or incomplete: save it again with Dataset.save_to_disk")


def _refuse_empty_saved_split(folder: Path, parsed: DatasetSpec, role: DataRole = CALIBRATION) -> None:
    """`save_to_disk` writes no data file for an empty split, and `load_from_disk` then fails with an
    IndexError deep in `datasets`: read the split's state.json first."""
    import json

    split_folder = folder
    if not (folder / "state.json").is_file():
        try:
            splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
        except (OSError, ValueError, AttributeError):
            return  # let datasets report an unreadable folder
        name = split_slice(parsed.split)[0] if parsed.split is not None else (splits[0] if len(splits) == 1
                                                                                 else None)
        if name is None or name not in splits:
            return  # _pick_split names the available splits
        split_folder = folder / name
    try:
        data_files = json.loads((split_folder / "state.json").read_text()).get("_data_files")
    except (OSError, ValueError, AttributeError):
        return
    if data_files == []:
        raise role.error(f"{role.names('split', str(parsed))} is empty (0 rows): no samples to {role.purpose}; "
                         "pass a split that holds examples")


def split_slice(split: str) -> tuple[str, str]:
    """`train[:8]` -> (`train`, `[:8]`); `[:8]` -> (``, `[:8]`); `train` -> (`train`, ``)."""
    name, bracket, rest = split.partition("[")
    return name, bracket + rest


def _saved_split(saved: Any, parsed: DatasetSpec, role: DataRole = CALIBRATION) -> Any:
    """The split and slice `parsed` names of what `load_from_disk` read, applied as `datasets` applies
    `split="train[:8]"` (its `ReadInstruction`: absolute and percent slices). A saved plain Dataset has no splits: its
    one split is named as it was saved (`Dataset.split`, kept from `load_dataset(..., split="test")`), else `train`, as
    `datasets` names a data file's rows; any other name is refused (it was ignored, yet recorded as applied)."""
    import datasets

    name, slice_ = split_slice(parsed.split) if parsed.split is not None else ("", "")
    if isinstance(saved, datasets.Dataset):
        own = split_slice(str(saved.split or "train"))[0]  # a split saved from `train[:50%]` is named `train`
        if name and name != own:
            raise role.error(
                f"{role.names('spec', str(parsed))}: {parsed.path!r} is one Dataset written by save_to_disk, without "
                f"splits (its rows are the split {own!r}); drop the split ('{parsed.path}'), or name {own!r} to take "
                f"a slice of it ('{parsed.path}:{own}{slice_ or '[:100]'}')")
        return _sliced(saved, slice_, parsed, role)
    picked = _pick_split(saved, replace(parsed, split=name or None), role)
    return _sliced(picked, slice_, parsed, role)


def _sliced(dataset: Any, slice_: str, parsed: DatasetSpec, role: DataRole = CALIBRATION) -> Any:
    """`dataset`'s rows that `slice_` (`[:8]`, `[10:20]`, `[-3:]`, `[:25%]`) names, by `datasets`' own parser; its
    rows are not copied (a contiguous `select` needs no indices file)."""
    import datasets

    if not slice_:
        return dataset
    try:
        instructions = datasets.ReadInstruction.from_spec(f"split{slice_}").to_absolute({"split": len(dataset)})
    except (ValueError, AssertionError) as error:
        raise role.error(f"{role.names('spec', str(parsed))}: the slice {slice_!r} cannot be read "
                         f"({brief(error)}); write it as datasets does, e.g. '[:100]', '[10:20]', '[-50:]' or "
                         "'[:10%]'") from None
    (instruction,) = instructions
    warn_short_slice(slice_, len(dataset), parsed, role)
    # A slice beyond the end comes back as [n:n], which `select` refuses: no rows (refused as an empty split).
    return dataset.select(range(instruction.from_, max(instruction.from_, instruction.to)) if instruction.from_ <
                          len(dataset) else [], keep_in_memory=True)


def _pick_split(loaded: Any, parsed: DatasetSpec, role: DataRole = CALIBRATION) -> Any:
    import datasets

    if not isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        return loaded
    splits = list(loaded)
    if parsed.split is not None:
        if parsed.split not in loaded:
            raise role.error(
                f"{role.names('spec', str(parsed))}: no split {parsed.split!r}; available splits: {splits}"
            )
        return loaded[parsed.split]
    if len(splits) == 1:
        return loaded[splits[0]]
    raise role.error(
        f"{role.names('dataset', parsed.path)} has several splits {splits}; name one as '{parsed.path}:<split>'"
    )


@dataclass
class _Preprocessor:
    """Raw columns of one batch (dict of lists) -> model inputs (dict of tensors)."""

    image_column: str | None
    text_column: str | None
    text_pair_column: str | None
    """The second segment's column of text pairs (`sentence2`), tokenized as the tokenizer's `text_pair`."""
    image_processor: Any | None
    tokenizer: Any | None
    num_channels: int | None
    max_length: int | None
    role: DataRole = CALIBRATION
    image_dtype: str | None = None
    """The integer dtype the image column declares for its array values (`Value('uint16')`): every image is read at
    that bit depth (`array_image`), not by its own range."""
    given: tuple[str, ...] = ()
    """Model-input columns of the other kind, passed as they are (raw images with tokenized `input_ids`)."""

    def __call__(self, rows: Mapping[str, Sequence[Any]]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for column in self.given:  # as `with_format("torch")` reads them: floats as float32, integers as int64
            try:
                value = _as_tensor(rows[column])
            except (ValueError, TypeError, RuntimeError):  # rows of unequal lengths (token ids not padded)
                raise self.role.error(
                    f"column {column!r} of the {self.role.data} holds rows of unequal lengths, which do not stack "
                    "into one batch; pad them (e.g. tokenizer(..., padding=True)) or pass the raw column to be "
                    "preprocessed") from None
            if value.is_floating_point():
                value = value.float()
            elif value.dtype != torch.bool:
                value = value.long()
            out[column] = value
        if self.image_column is not None:
            images = [self._image(x) for x in rows[self.image_column]]
            try:
                processed = self.image_processor(images=images, return_tensors="pt")
            except (ValueError, TypeError, OSError) as error:
                role = self.role
                fix = "" if role is CALIBRATION else f"; {role.fix}"
                raise role.error(
                    f"{role.image_processor} ({type(self.image_processor).__name__}) cannot preprocess "
                    f"column {self.image_column!r} of the {role.data}: {brief(error)}{fix}"
                ) from error
            out["pixel_values"] = _as_tensor(processed["pixel_values"])
        if self.text_column is not None:
            texts, pairs = self._texts(rows, self.text_column), None
            if self.text_pair_column is not None:
                pairs = self._texts(rows, self.text_pair_column)
            encoded = {k: _as_tensor(v) for k, v in encode_texts(self.tokenizer, texts, self.max_length, pairs).items()}
            self._refuse_tokenless(encoded, texts)
            out.update(encoded)
        return out

    def _refuse_tokenless(self, encoded: Mapping[str, torch.Tensor], texts: Sequence[str]) -> None:
        """Refuse texts the tokenizer turns into no token at all (empty or blank, with a tokenizer adding no special
        tokens): one in a batch was refused by the model input check with advice to pass the tokenizer's mask (which
        this is), a batch of them failed inside the model ("cannot reshape tensor of 0 elements")."""
        ids, mask = encoded.get("input_ids"), encoded.get("attention_mask")
        if ids is None or ids.dim() != 2:
            return
        lengths = mask.sum(dim=-1) if mask is not None and mask.shape == ids.shape else torch.full(
            (len(ids),), ids.shape[-1])
        empty = [index for index, length in enumerate(lengths.tolist()) if length == 0]
        if not empty:
            return
        named = [c for c in (self.text_column, self.text_pair_column) if c is not None]
        columns = (f"columns {named[0]!r} and {named[1]!r} of the {self.role.data} hold" if len(named) > 1
                   else f"column {named[0]!r} of the {self.role.data} holds")
        kept = " or ".join(f"row[{c!r}].strip()" for c in named)
        raise self.role.error(
            f"{columns} text that {self.role.tokenizer} turns into no token ({shown(texts[empty[0]])}; "
            f"{len(empty)} of the {len(ids)} rows of a batch), which the models cannot read; drop or fill those rows "
            f"(e.g. dataset.filter(lambda row: {kept}))")

    def _texts(self, rows: Mapping[str, Sequence[Any]], column: str) -> list[str]:
        texts = list(rows[column])
        odd = next((t for t in texts if not isinstance(t, str)), "")
        if not isinstance(odd, str):  # str() would tokenize None as the word "None"
            kind = "a missing value (None)" if odd is None else f"{type(odd).__name__} {shown(odd)}"
            raise self.role.error(f"column {column!r} of the {self.role.data} holds {kind}, not text; drop or fill "
                                  f"those rows (Dataset.filter) or name the text column with "
                                  f"{option_hint('text_column')}")
        return texts

    def _image(self, image: Any) -> Any:
        """PIL images converted to the model's channel count (grayscale data for an RGB model and back); 16-bit,
        32-bit and float images are first brought to 8 bits (`eight_bit`), which `convert` would clip to white;
        arrays become the PIL images of their values (`array_image`) unless the processor does not rescale. A missing
        image or a mode Pillow cannot convert is one line naming the column and the fix, as a text row's is."""
        if image is None:  # the processor would fail on it with "Unsupported number of image dimensions: 0"
            raise self.role.error(f"column {self.image_column!r} of the {self.role.data} holds a missing value (None), "
                                  "not an image; drop those rows (Dataset.filter) or name the image column with "
                                  f"{option_hint('image_column')}")
        if isinstance(image, (str, bytes, os.PathLike)):  # a stream that declared no features: known only when read
            kind = "bytes" if isinstance(image, bytes) else f"the string {shown(str(image))}"
            raise self.role.error(f"column {self.image_column!r} of the {self.role.data} holds {kind}, not an image "
                                  "(file paths and encoded files are not read as images: cast the column with "
                                  "datasets.Image()); name the image column with "
                                  f"{option_hint('image_column')}")
        convert = getattr(image, "convert", None)
        if convert is None:
            if isinstance(image, Mapping) and "bytes" in image:  # a stream that declared no features
                raise self.role.error(image_structs(self.image_column, self.role))
            if not getattr(self.image_processor, "do_rescale", True):  # it expects pixels already in its range
                return np.asarray(image)
            image = array_image(image, self.image_column, self.role, dtype=self.image_dtype)
            if not hasattr(image, "convert"):
                return image
            convert = image.convert
        elif image.mode.startswith("I") or image.mode == "F":
            image = eight_bit(image, self.image_column, self.role)
            convert = image.convert
        mode = "L" if self.num_channels == 1 else "RGB" if self.num_channels in (3, None) else None
        if mode is None or image.mode == mode:
            return image
        try:
            return convert(mode)
        except ValueError as error:  # a mode Pillow has no conversion for (LAB, HSV, CMYK to L, ...)
            raise self.role.error(
                f"column {self.image_column!r} of the {self.role.data} holds an image of mode {image.mode!r}, which "
                f"Pillow cannot convert to {mode!r} ({brief(error)}); convert those images yourself (Dataset.map) or "
                "drop those rows (Dataset.filter)") from None


def declared_integer_dtype(feature: Any) -> str | None:
    """The integer dtype of an array column's values as its feature declares it (nested `List`/`Sequence` of
    `Value('uint16')`, `Array2D(dtype='uint8')`), else None: `datasets` hands the rows back as Python ints, whose
    own range would otherwise decide the bit depth image by image (a dark 16-bit frame read as 8-bit)."""
    import datasets

    while isinstance(feature, (datasets.Sequence, datasets.List, datasets.LargeList, list)):
        feature = feature[0] if isinstance(feature, list) else feature.feature
    dtype = getattr(feature, "dtype", None)
    return dtype if isinstance(dtype, str) and dtype in ("uint8", "uint16", "int8", "int16") else None


def array_image(array: Any, column: str | None, role: DataRole = CALIBRATION, *, dtype: str | None = None) -> Any:
    """An image given as an array (a column of nested lists, numpy or torch; H x W, H x W x C or C x H x W with 1, 3
    or 4 channels) as the 8-bit PIL image of the same values, so that it is read as an image file would be: the
    processor rescales arrays by 1/255 whatever their range, so float pixels in 0..1 became a constant image, and it
    refuses grayscale (H x W) and 16-bit arrays. Values by `eight_bit`'s rule: floats in 0..1 are a fraction of full
    scale, integers and floats in 0..255 are 8-bit values, `uint16` and other integers in 0..65535 16-bit ones;
    anything else is refused. Any other shape is returned as an array (the processor says what it cannot read)."""
    from PIL import Image

    try:
        values = np.asarray(array, dtype=dtype)  # `dtype`: the column's declared one, which decides the bit depth
    except (ValueError, TypeError) as error:  # nested lists of unequal lengths, or values that are no numbers
        raise role.error(f"column {column!r} of the {role.data} holds an image array that is ragged or not numeric "
                         f"({brief(error, 120)}), not an image; pass images (PIL, or arrays of equal-length rows of "
                         "pixel values) or drop those rows (Dataset.filter)") from None
    if values.ndim == 3 and values.shape[-1] not in (1, 3, 4) and values.shape[0] in (1, 3, 4):
        values = np.moveaxis(values, 0, -1)  # channels first (torchvision's layout)
    if values.ndim == 3 and values.shape[-1] == 1:
        values = values[..., 0]
    if values.dtype.kind not in "biuf" or values.size == 0 or not (
            values.ndim == 2 or (values.ndim == 3 and values.shape[-1] in (3, 4))):
        return values
    low, high = float(values.min()), float(values.max())
    if values.dtype.kind == "b":
        scale = 1 / 255
    elif values.dtype == np.uint16 or (values.dtype == np.int16 and low >= 0) or (
            values.dtype.kind in "iu" and values.dtype.itemsize > 2 and low >= 0 and 255 < high <= 65535):
        scale = 257.0
    elif values.dtype.kind == "f" and low >= 0 and high <= 1:
        scale = 1 / 255
    elif low >= 0 and high <= 255:
        scale = 1.0
    else:
        raise role.error(
            f"column {column!r} of the {role.data} holds an image array ({values.dtype}) with values {low:g}..{high:g},"
            " outside 0..1 (floats), 0..255 (8 bits) and 0..65535 (16 bits), with no sound rule to read it as pixels; "
            "map the images to 8 bits yourself (e.g. uint8 arrays or PIL images)")
    pixels = np.clip(np.round(values.astype(np.float64) / scale), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)  # uint8 H x W, H x W x 3, H x W x 4: modes L, RGB, RGBA


def eight_bit(image: Any, column: str | None, role: DataRole = CALIBRATION) -> Any:
    """A grayscale image of more than 8 bits (Pillow modes `I;16*`, `I`, `F`) as an 8-bit `L` image, scaled by the
    range of what it holds, never per image (a per-image stretch would change the contrast between images):

    - `I;16` (16-bit PNG/TIFF, e.g. microscopy or medical data): 0..65535 -> 0..255, divided by 257;
    - `I` (32-bit integers; Pillow opens many 16-bit files so): values within 0..255 are kept, within 0..65535 read as
      16-bit data (divided by 257); anything else (negative, or beyond 16 bits) has no sound rule and is refused;
    - `F` (32-bit float): values within 0..1 are read as a fraction of full scale (times 255, torchvision's float
      convention), within 0..255 as 8-bit values; anything else is refused.

    Pillow's `convert("RGB")`/`convert("L")` of these modes clips every value above 255, so 16-bit data became a
    constant white image, silently."""
    from PIL import Image

    values = np.asarray(image, dtype=np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode.startswith("I;16"):
        scale = 257.0
    elif image.mode == "F" and low >= 0 and high <= 1:
        scale = 1 / 255
    elif low >= 0 and high <= 255:
        scale = 1.0
    elif image.mode == "I" and low >= 0 and high <= 65535:
        scale = 257.0
    else:
        raise role.error(
            f"column {column!r} of the {role.data} holds an image of mode {image.mode!r} with values "
            f"{low:g}..{high:g}, beyond 16 bits (0..65535) or 0..1 for floats, with no sound rule to read it as 8-bit "
            "pixels; map the images to 8 bits yourself (e.g. PIL mode 'L' or 'RGB')")
    return Image.fromarray(np.clip(np.round(values / scale), 0, 255).astype(np.uint8), mode="L")


def encode_texts(tokenizer: Any, texts: list[str], max_length: int | None,
                 pairs: list[str] | None = None) -> Mapping[str, Any]:
    """`texts` (with their second segments `pairs`, as the tokenizer's `text_pair`: token_type_ids as it makes them)
    padded on the right and cut to `max_length`, the tokenizer left as it was: a fast tokenizer's backend keeps the
    truncation and padding a call switches on, and `save_pretrained` writes them into tokenizer.json (which
    `tokenizers` and transformers.js apply to every later input).

    Always on the right, whatever the tokenizer's `padding_side`: the encoders merged here (BERT, RoBERTa, CLIP's
    text tower) number positions from the first token of the row, so a text padded on the left was read at shifted
    positions, and its activations (the statistics, an evaluation's scores) depended on the batch's longest text."""
    with _backend_kept(tokenizer), _padding_side_kept(tokenizer, "right"):
        return tokenizer(texts, pairs, padding=True, truncation=True, max_length=max_length, return_tensors="pt")


def token_ids_uncut(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Each of `texts` tokenized whole (no cut, no padding), to tell what a cut to a model's positions dropped; the
    tokenizer left as it was (`encode_texts`), and without its own "longer than the maximum" warning (the caller says
    what the cut means)."""
    with _backend_kept(tokenizer):
        return [list(ids) for ids in tokenizer(texts, padding=False, truncation=False, verbose=False)["input_ids"]]


@contextlib.contextmanager
def _padding_side_kept(tokenizer: Any, side: str) -> Iterator[None]:
    """Pad on `side` for the calls inside, then give the tokenizer back its own side: set as an attribute, not as a
    call argument, which a tokenizer whose `__call__` names its own parameters (remote code) refuses."""
    if not hasattr(tokenizer, "padding_side"):
        yield
        return
    before = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        yield
    finally:
        tokenizer.padding_side = before


@contextlib.contextmanager
def _backend_kept(tokenizer: Any) -> Iterator[None]:
    """Restore a fast tokenizer's backend truncation and padding after a call that switches them."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    before = (backend.truncation, backend.padding) if backend is not None else None
    try:
        yield
    finally:
        if before is not None:
            truncation, padding = before
            if truncation is None:
                backend.no_truncation()
            else:
                backend.enable_truncation(**truncation)
            if padding is None:
                backend.no_padding()
            else:
                backend.enable_padding(**padding)


def _as_tensor(value: Any) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))


@dataclass
class CalibrationStream:
    """Calibration rows plus how to turn a batch of them into model inputs; what `merge()` consumes.

    `dataset` is a `datasets.Dataset` (memory-mapped) or `IterableDataset` (streamed), already
    shuffled and cut to `num_samples`; `preprocess` (None for model-input columns) runs per batch.
    Iterating it yields batches of `DEFAULT_BATCH_SIZE`; `batches(n)` picks the size.
    """

    dataset: Any
    preprocess: Callable[[Mapping[str, Sequence[Any]]], dict[str, torch.Tensor]] | None = None
    source: str = "dataset"

    @property
    def num_rows(self) -> int | None:
        """Rows in the stream when known without reading it (map-style or cut to a size)."""
        import datasets

        if isinstance(self.dataset, datasets.Dataset):
            return len(self.dataset)
        return None

    @property
    def made_inputs(self) -> tuple[str, ...]:
        """The model inputs `preprocess` makes from raw columns (`pixel_values`, `input_ids`); given ones are not."""
        made = (("pixel_values", getattr(self.preprocess, "image_column", None)),
                ("input_ids", getattr(self.preprocess, "text_column", None)))
        return tuple(name for name, column in made if column is not None)

    def shard(self, rank: int, world_size: int) -> CalibrationStream:
        """This process's part (`process_share`); all parts add up to the single-process stream."""
        if world_size == 1:
            return self
        return replace(self, dataset=process_share(self.dataset, rank, world_size))

    def batches(self, batch_size: int = DEFAULT_BATCH_SIZE) -> Iterator[dict[str, Any]]:
        import datasets

        batch_size = check_option("batch_size", batch_size)
        data = self.dataset if self.preprocess is not None else self.dataset.with_format("torch")
        if isinstance(data, datasets.Dataset):
            chunks: Iterator[Mapping[str, Any]] = (data[s : s + batch_size] for s in range(0, len(data), batch_size))
        else:
            chunks = data.iter(batch_size=batch_size)
        for chunk in decoded_safely(chunks, self.source):
            yield self.preprocess(chunk) if self.preprocess is not None else dict(chunk)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.batches(DEFAULT_BATCH_SIZE)

    def __repr__(self) -> str:
        columns = self.dataset.column_names
        how = "preprocessed by the parents' processor" if self.preprocess is not None else "model inputs"
        return f"CalibrationStream({self.source!r}, columns={columns}, {how}, rows={self.num_rows})"


RESHUFFLED = ("the calibration data gives other examples or another order each time it is read (its first batch "
              "differs between two reads: a DataLoader with shuffle=True?); the merge reads it more than once and "
              "pairs the examples by position: pass shuffle=False, a list of batches or a datasets.Dataset")


READ_ONCE = ("the calibration data gave no batches when read a second time (an iterable that can be read once); the "
             "merge reads it more than once: pass a list of batches or a datasets.Dataset")


class SamePasses:
    """A re-iterable of batches the merge reads more than once (a `DataLoader`, a user's iterable), checked to give
    the same batches every time: the refit pairs one pass's parent outputs with another's inputs by position, so a
    loader that reshuffles each epoch silently collapsed the merge. Each pass's first batch is compared with the
    first pass's (a 16-byte digest of its tensors); a difference is one line (`RESHUFFLED`)."""

    def __init__(self, data: Iterable[Any]) -> None:
        self.data = data
        self.first: bytes | None = None

    def __iter__(self) -> Iterator[Any]:
        for index, batch in enumerate(collated_safely(self.data)):
            if index == 0:
                self._check(batch_digest(batch))
            yield batch

    def check_now(self) -> None:
        """Read the first batch of two passes now (before any work): a reshuffling loader is refused up front, and
        so is an iterable whose second read gives nothing (it can be read once)."""
        for read in range(2):
            for batch in collated_safely(self.data):
                self._check(batch_digest(batch))
                break
            else:
                if read == 1 and self.first is not None:
                    raise CalibrationError(READ_ONCE)

    def _check(self, digest: bytes) -> None:
        if self.first is None:
            self.first = digest
        elif digest != self.first:
            raise CalibrationError(RESHUFFLED)


def collated_safely(batches: Iterable[Any]) -> Iterator[Any]:
    """`batches`, with a DataLoader's refusal to collate its rows (`default_collate` meeting PIL images or other raw
    values: a TypeError from inside torch) turned into one line naming the fixes."""
    try:
        yield from batches
    except TypeError as error:
        if "collate" not in str(error):
            raise
        raise CalibrationError(
            f"the calibration DataLoader cannot collate its rows into batches ({brief(error)}); pass the "
            "datasets.Dataset itself, whose raw columns (images, text) the parents' processor preprocesses, or give "
            "the DataLoader a collate_fn that makes the model inputs (e.g. by calling the processor)") from None


def same_passes(calibration: Any) -> Any:
    """`calibration` as `SamePasses` when it is a re-iterable whose passes are not known to repeat (not a list,
    tuple, `CalibrationStream` or `datasets` object, nor a one-shot iterator, which is read once); else as is."""
    import datasets

    if (calibration is None or isinstance(calibration, (list, tuple, Iterator, CalibrationStream, SamePasses,
                                                         datasets.Dataset, datasets.IterableDataset, Mapping))
            or not isinstance(calibration, Iterable)):
        return calibration
    return SamePasses(calibration)


def batch_digest(batch: Any) -> bytes:
    """A 16-byte BLAKE2 digest of a batch's tensors and arrays (names, dtypes, shapes, bytes), PIL images (mode, size,
    pixels) and lists of them, item by item; other values by repr. An image's repr holds its object's address, new at
    each read, so a loader giving the same raw images each pass was refused as reshuffling (`RESHUFFLED`)."""
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    items = sorted(batch.items(), key=lambda item: str(item[0])) if isinstance(batch, Mapping) else [("", batch)]
    for name, value in items:
        _digest_value(digest, str(name), value)
    return digest.digest()


def _digest_value(digest: Any, name: str, value: Any) -> None:
    """`batch_digest`'s update by one value."""
    from PIL import Image

    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, np.ndarray):
        digest.update(f"{name}:{value.dtype}:{value.shape}".encode() + np.ascontiguousarray(value).tobytes())
    elif isinstance(value, Image.Image):
        digest.update(f"{name}:image:{value.mode}:{value.size}".encode() + value.tobytes())
    elif isinstance(value, (list, tuple)):
        digest.update(f"{name}:{type(value).__name__}:{len(value)}".encode())
        for index, item in enumerate(value):
            _digest_value(digest, f"{name}[{index}]", item)
    else:
        digest.update(f"{name}:{value!r}".encode())


def decoded_safely(chunks: Iterable[Any], source: str, error: type[ValueError] = CalibrationError) -> Iterator[Any]:
    """`chunks`, with Pillow's refusal of an image too large to decode (a decompression bomb: a few hundred kB of
    PNG, gigabytes of pixels) turned into one `error` line naming the dataset."""
    from PIL import Image

    try:
        yield from chunks
    except (ValueError, OSError, Image.DecompressionBombError, http_client().TransportError) as failure:
        if isinstance(failure, error):
            raise
        raise data_error(failure, source, error) from None


def data_error(failure: Exception, source: str, error: type[ValueError] = CalibrationError) -> ValueError:
    """The one-line `error` for a reader's refusal of the data of dataset `source`: an image too large to decode
    safely (a decompression bomb), one that is no image, text that is not UTF-8, a row naming a missing file, or
    any other refusal (pandas' ParserError, pyarrow's ...)."""
    from PIL import Image

    if isinstance(failure, Image.DecompressionBombError):
        return error(f"an image of dataset {source!r} is too large to decode safely ({brief(failure)}); remove or "
                     "shrink that image")
    if isinstance(failure, Image.UnidentifiedImageError):
        return error(f"an image of dataset {source!r} cannot be decoded ({first_line(failure)}): it is no image file "
                     "Pillow reads; remove that row or re-encode the image as PNG or JPEG")
    if isinstance(failure, UnicodeDecodeError):
        return error(f"dataset {source!r} is not UTF-8 text ({failure}); re-encode it as UTF-8")
    if isinstance(failure, FileNotFoundError):  # an Image row naming a file by its path
        return error(f"dataset {source!r} names a file that does not exist ({failure.filename!r}); remove that row "
                     "or restore the file")
    if isinstance(failure, (ConnectionError, TimeoutError, http_client().TransportError)):
        # a streamed split's connection dropped (datasets raises ConnectionError once its retries run out): the data
        # is not at fault, so "fix or replace the data file" was the wrong advice
        said = hide_tokens(brief(failure))
        return error(f"the connection dropped while reading dataset {source!r} ({type(failure).__name__}: {said}); "
                     "retry the command, or read a local copy (load the split with datasets and save it with "
                     "Dataset.save_to_disk, then pass that folder)")
    return error(f"dataset {source!r} cannot be read ({type(failure).__name__}: {brief(failure)}); fix or replace the "
                 "data file")


def column_names(dataset: Any, source: str = "dataset", error: type[ValueError] = CalibrationError) -> list[str]:
    """A dataset's columns; shared with evaluation so both read streamed datasets the same way. `source`, `error`:
    how a row that cannot be decoded is reported (`decoded_safely`)."""
    names = dataset.column_names
    if names is None:  # a streaming dataset whose features are unknown until read: peek at one row
        first = next(iter(decoded_safely(dataset.take(1), source, error)), None)
        names = list(first) if first is not None else []
    return list(names)


def _first_present(candidates: Sequence[str], columns: Sequence[str]) -> str | None:
    return next((c for c in candidates if c in columns), None)


def _positions(model_config: Any) -> int | None:
    for config in (model_config, getattr(model_config, "text_config", None)):
        positions = getattr(config, "max_position_embeddings", None)
        if isinstance(positions, int) and positions > 0:
            return positions
    return None


def _max_length(tokenizer: Any, model_config: Any, max_tokens: int | None = None) -> int:
    """The tokenizer's limit, cut to what the model reads: `max_tokens` (its adapter's, `PermutationSpec.max_tokens`)
    when known, else the config's `max_position_embeddings`."""
    limits = []
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and tokenizer_limit < 1_000_000:
        limits.append(tokenizer_limit)
    positions = max_tokens if max_tokens is not None else _positions(model_config)
    if positions is not None:
        limits.append(positions)
    return min(limits) if limits else _TEXT_LIMIT


def _num_channels(model_config: Any) -> int | None:
    for config in (model_config, getattr(model_config, "vision_config", None)):
        channels = getattr(config, "num_channels", None)
        if isinstance(channels, int):
            return channels
    return None


def _infer_inputs(columns: Sequence[str], image_processor: Any, tokenizer: Any,
                  image_column: str | None, text_column: str | None) -> tuple[str, ...]:
    present = [c for c in MODEL_INPUT_COLUMNS if c in columns]
    if present and image_column is None and text_column is None:
        return tuple(c for c in ("pixel_values", "input_ids") if c in present) or tuple(present)
    inputs = []
    if image_column is not None or (image_processor is not None and _first_present(IMAGE_COLUMNS, columns)):
        inputs.append("pixel_values")
    if text_column is not None or (tokenizer is not None and (
            _first_present(TEXT_COLUMNS, columns) or any(all(c in columns for c in p) for p in TEXT_PAIR_COLUMNS))):
        inputs.append("input_ids")
    if not inputs:
        raise CalibrationError(
            f"the calibration data has no usable column; found columns {list(columns)}. Expected model inputs "
            f"({', '.join(MODEL_INPUT_COLUMNS[:2])}) or raw columns ({', '.join(IMAGE_COLUMNS + TEXT_COLUMNS)}, or "
            f"text pairs {', '.join('+'.join(pair) for pair in TEXT_PAIR_COLUMNS)}) that the parents' processor can "
            f"preprocess; name yours with {option_hint('image_column')} or {option_hint('text_column')} (two "
            "columns separated by a comma for text pairs)"
        )
    return tuple(inputs)


def _require_raw(model_input: str, kind: str, column: str | None, candidates: Sequence[str], option: str,
                 processor: Any, processor_name: str, columns: Sequence[str], role: DataRole = CALIBRATION) -> None:
    """Raw `kind` data needs a column and the parents' processor for it; say which is missing and the fix."""
    lacking = (f"the {role.data} lacks column(s) {[model_input]} that the models need; found columns "
               f"{list(columns)}. ")
    if column is None:
        raise role.error(
            lacking + f"No raw {kind} column to preprocess either (looked for {', '.join(candidates)}): name "
            f"yours with {option_hint(option)}, or provide {model_input} yourself"
        )
    if processor is None:
        raise role.error(
            lacking + f"Column {column!r} holds raw {kind}, but {role.lacking.format(kind=processor_name)} to "
            f"preprocess it: {role.fix}, or map your own preprocessing to a {model_input} column"
        )


def _refuse_column_kinds(features: Any, image_column: str | None, text_column: str | None, role: DataRole) -> None:
    """Refuse raw columns whose declared type (`Dataset.features`, known before a row is read; None for a stream that
    declares none) cannot be what they are read as: numbers or strings as images, anything but strings as text."""
    import datasets

    if not features:
        return
    text = features.get(text_column) if text_column is not None else None
    if text is not None and not (isinstance(text, datasets.Value) and text.dtype in ("string", "large_string")):
        kind = text.dtype if isinstance(text, datasets.Value) else (
            "a list" if isinstance(text, (list, datasets.List, datasets.LargeList, datasets.Sequence))
            else type(text).__name__)
        raise role.error(f"column {text_column!r} of the {role.data} holds {kind}, not text; name the text column "
                         f"with {option_hint('text_column')}")
    image = features.get(image_column) if image_column is not None else None
    if isinstance(image, Mapping) and {"bytes", "path"} <= set(image):
        raise role.error(image_structs(image_column, role))
    if isinstance(image, datasets.Value):  # an Image feature or arrays of pixels are images
        raise role.error(f"column {image_column!r} of the {role.data} holds {image.dtype}, not images (file paths are "
                         "not read as images: cast the column with datasets.Image()); name the image column with "
                         f"{option_hint('image_column')}")


def image_structs(column: str | None, role: DataRole = CALIBRATION) -> str:
    """The refusal of an image column holding `{'bytes', 'path'}` structs: how `datasets` stores an Image column, read
    back without its feature (a parquet file written by pandas or pyarrow); `datasets.Image()` decodes them."""
    return (f"column {column!r} of the {role.data} holds {{'bytes', 'path'}} structs (encoded image files, e.g. a "
            f"parquet export of an image dataset), not decoded images; cast the column with datasets.Image(): "
            f"dataset.cast_column({column!r}, datasets.Image())")


def _plan(columns: Sequence[str], inputs: Sequence[str], processor: Any, image_column: str | None,
          text_column: str | None, model_config: Any, role: DataRole = CALIBRATION, features: Any = None,
          max_tokens: int | None = None, quiet: bool = False) -> tuple[list[str], _Preprocessor | None]:
    """Which columns to read and how to preprocess them (None: they already are model inputs). `features`: the
    dataset's declared column types, to refuse a raw column of the wrong kind before any row is read; `quiet`: a
    check before the data is read (`check_calibration_columns`), which leaves the log lines to the read."""
    given_text = text_columns(text_column, role)
    for name, override in (("image_column", image_column), *(("text_column", c) for c in given_text or ())):
        if override is not None and override not in columns:
            raise role.error(f"{name}={override!r} (CLI: {flag(name)}) is not a column of the {role.data}; found "
                             f"columns {list(columns)}")
    # a column option of a kind the models do not read changes nothing (`diagnostics.inert_options_warnings`)
    if ((image_column is None or "pixel_values" not in inputs) and (text_column is None or "input_ids" not in inputs)
            and all(i in columns for i in inputs)):
        return [c for c in columns if c in MODEL_INPUT_COLUMNS or c in inputs], None
    unknown = [i for i in inputs if i not in ("pixel_values", "input_ids") and i not in columns]
    if unknown:
        raise role.error(f"the models need input(s) {unknown} that no column of the {role.data} provides; found "
                         f"columns {list(columns)}")
    image_processor, tokenizer = image_processor_of(processor), tokenizer_of(processor)
    use_image = use_text = None
    # One kind given as model inputs and the other raw (CLIP: raw images with tokenized input_ids): only the raw kind
    # is preprocessed, the given columns pass as they are.
    if "pixel_values" in inputs and (image_column is not None or "pixel_values" not in columns):
        use_image = image_column or _first_present(IMAGE_COLUMNS, columns)
        _require_raw("pixel_values", "image", use_image, IMAGE_COLUMNS, "image_column", image_processor,
                     "image processor (preprocessor_config.json)", columns, role)
    texts: tuple[str, ...] = ()
    if "input_ids" in inputs and (given_text is not None or "input_ids" not in columns):
        texts = given_text or _detect_text(columns, role)
        use_text = texts[0] if texts else None
        looked_for = [*TEXT_COLUMNS, *("+".join(pair) for pair in TEXT_PAIR_COLUMNS)]
        _require_raw("input_ids", "text", use_text, looked_for, "text_column", tokenizer, "tokenizer", columns, role)
        pair = next((p for p in TEXT_PAIR_COLUMNS if given_text and len(given_text) == 1 and given_text[0] in p
                     and all(c in columns for c in p)), None)
        if pair is not None and not quiet:  # one segment of a pair: never dropped unsaid
            logger.warning("text_column=%r reads one segment of the text pairs %r of the %s, without %r; name both "
                           "to read them as pairs: text_column=%r (CLI: %s %s)", given_text[0], ",".join(pair),
                           role.data, next(c for c in pair if c != given_text[0]), ",".join(pair), flag("text_column"),
                           ",".join(pair))
        if given_text is None and len(texts) == 2 and not quiet:
            logger.info("%s reads columns %r and %r as text pairs (the tokenizer's text and text_pair)", role.reading,
                        *texts)
    for column in texts or (None,):
        _refuse_column_kinds(features, use_image, column, role)
    if use_text:  # after the column's kind: a column of numbers is no text whatever the tokenizer
        refuse_no_pad_token(tokenizer, role)
    if use_image:
        refuse_oversized_resize(image_processor, model_config, role)
        refuse_other_image_size(image_processor, model_config, role)
    if use_text and not quiet and (said := larger_vocabulary_warning(tokenizer, model_config, role)):
        logger.warning("%s", said)
    if len(texts) == 2:
        refuse_pairs_for_one_segment(texts, tokenizer, model_config, role)
    preprocess = _Preprocessor(
        image_column=use_image, text_column=use_text, text_pair_column=texts[1] if len(texts) == 2 else None,
        image_processor=image_processor if use_image else None,
        tokenizer=tokenizer if use_text else None, num_channels=_num_channels(model_config),
        max_length=_max_length(tokenizer, model_config, max_tokens) if use_text else None, role=role,
        image_dtype=declared_integer_dtype((features or {}).get(use_image)) if use_image else None,
        given=_given_inputs(columns, inputs, preprocess_images=bool(use_image), preprocess_text=bool(use_text)),
    )
    return [c for c in (use_image, *texts, *preprocess.given) if c is not None], preprocess


def _given_inputs(columns: Sequence[str], inputs: Sequence[str], *, preprocess_images: bool,
                  preprocess_text: bool) -> tuple[str, ...]:
    """The columns that pass as they are beside a preprocessed kind: the model inputs of the other kind, and only when
    the models read that kind (a ViT's data may hold `input_ids` tokenized for another model: never read)."""
    kinds = []
    if "pixel_values" in inputs and not preprocess_images:
        kinds.append(_IMAGE_INPUTS)
    if "input_ids" in inputs and not preprocess_text:
        kinds.append(tuple(c for c in MODEL_INPUT_COLUMNS if c not in _IMAGE_INPUTS))
    return tuple(c for c in columns if any(c in kind for kind in kinds))


def text_columns(text_column: str | None, role: DataRole = CALIBRATION) -> tuple[str, ...] | None:
    """`text_column` as given: one column, or two separated by a comma (`sentence1,sentence2`) read as text pairs."""
    if text_column is None:
        return None
    names = tuple(name.strip() for name in text_column.split(","))
    if len(names) > 2 or not all(names):
        raise role.error(f"text_column={text_column!r} (CLI: {flag('text_column')}) names {len(names)} columns; name "
                         "one text column or two separated by a comma, read as text pairs (e.g. 'sentence1,sentence2')")
    if len(names) == 2 and names[0] == names[1]:  # each text would be read paired with itself
        raise role.error(f"text_column={text_column!r} (CLI: {flag('text_column')}) names column {names[0]!r} twice, "
                         "which would read each text paired with itself; name one column, or the two columns of the "
                         "pairs (e.g. 'sentence1,sentence2')")
    return names


def _detect_text(columns: Sequence[str], role: DataRole) -> tuple[str, ...]:
    """The raw text column(s) found by name: a text pair layout (`TEXT_PAIR_COLUMNS`) when it is the only one and no
    other text column is present, else the first of `TEXT_COLUMNS`; () for none. Two candidates are refused: reading
    one of them silently would drop the other segment or column."""
    pairs = [pair for pair in TEXT_PAIR_COLUMNS if all(c in columns for c in pair)]
    singles = [c for c in TEXT_COLUMNS if c in columns and not any(c in pair for pair in pairs)]
    fix = f"name the columns to read with {option_hint('text_column')}"
    if len(pairs) > 1:
        raise role.error(f"the {role.data} holds several text pair layouts {[','.join(p) for p in pairs]}; {fix} "
                         f"(e.g. '{','.join(pairs[0])}')")
    if pairs and singles:
        raise role.error(f"the {role.data} holds both a text column {singles[0]!r} and the text pair "
                         f"{','.join(pairs[0])!r}; {fix}: '{singles[0]}' or '{','.join(pairs[0])}'")
    if pairs:
        return pairs[0]
    return (singles[0],) if singles else ()


def _choose_processor(processors: Any) -> Any | None:
    """Parent A's processor (the first one present); a differing image processor in another parent is one of the
    merge's warnings (`diagnostics.processor_warning`)."""
    if processors is None:
        return None
    if not isinstance(processors, (list, tuple)):
        return processors
    present = [p for p in processors if p is not None]
    if not present:
        return None
    return present[0]


def process_share(dataset: Any, rank: int, world_size: int) -> Any:
    """Process `rank`'s part of `dataset`; the parts of all processes are together exactly its rows.

    A streaming dataset is split example by example (`split_dataset_by_node(strategy="examples")`), never by
    shards: splitting by shards re-applies a cut (`take`, ours for num_samples or the user's own) per shard, so
    each process would read the first rows of its shards instead of its share of the stream's first rows, and
    whether a stream was cut cannot be told from the object. Every process walks the same seeded order.
    A map-style dataset gives contiguous parts; with fewer rows than processes the last ranks get an empty part
    (datasets raises IndexError for them; a process may read no row, the statistics are sums).
    """
    import datasets
    from datasets.distributed import split_dataset_by_node

    if isinstance(dataset, datasets.Dataset):
        if rank >= len(dataset):  # contiguous parts of len // world_size rows, one more for the first len % world
            return dataset.select([], keep_in_memory=True)
        return split_dataset_by_node(dataset, rank=rank, world_size=world_size)
    return split_dataset_by_node(dataset, rank=rank, world_size=world_size, strategy="examples")


def _subset(dataset: Any, num_samples: int | None, seed: int, shuffle: bool) -> Any:
    """Seeded shuffle + first `num_samples` rows (statistics are sums: order only matters for a subset)."""
    import datasets

    num_samples = check_option("num_samples", num_samples)
    if num_samples is None:
        return dataset
    if isinstance(dataset, datasets.Dataset):
        size = len(dataset)
        if shuffle:
            indices = np.random.default_rng(seed).permutation(size)[: min(num_samples, size)]
        else:
            indices = np.arange(min(num_samples, size))
        # keep_in_memory: never write an indices cache file next to the caller's dataset.
        return dataset.select(indices, keep_in_memory=True)
    if shuffle:
        dataset = dataset.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER_SIZE)
    return dataset.take(num_samples)


def single_split(calibration: Any, role: DataRole = CALIBRATION) -> Any:
    """A `DatasetDict`/`IterableDatasetDict` object's one split (several are refused: which to read is the user's
    choice; a spec names its split), anything else as is. Shared by the check before weights and the read, so both
    see the same rows."""
    import datasets

    if not isinstance(calibration, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        return calibration
    splits = list(calibration)
    if not splits:
        raise role.error(f"the {role.data} is a DatasetDict with no split: no samples to {role.purpose}; pass a "
                         "dataset that holds examples")
    if len(splits) != 1:
        raise role.error(f"the {role.data} is a DatasetDict with {len(splits)} splits {splits}; pass one of them, "
                         f"e.g. dataset[{(splits or ['train'])[0]!r}]")
    return calibration[splits[0]]


def refuse_transform(dataset: Any, role: DataRole = CALIBRATION) -> None:
    """Refuse a `Dataset` with an on-the-fly transform (`with_transform`/`set_transform`): its `column_names` are the
    stored columns, not what the transform returns, so the columns planned from them are not the rows read (a
    KeyError inside the user's transform, after the parents were loaded)."""
    if (getattr(dataset, "format", None) or {}).get("type") == "custom":
        raise role.error(f"the {role.data} has a transform (with_transform/set_transform), whose output columns are "
                         "unknown until read; pass the dataset without it (dataset.with_format(None)), or apply it "
                         "with Dataset.map")


#: `Dataset.with_format` types whose rows are no Python, numpy or torch values (pyarrow scalars, a polars frame):
#: the preprocessing reads raw columns as Python values, so these are read without the format.
_FOREIGN_FORMATS = ("arrow", "polars")


def all_columns_readable(dataset: Any) -> Any:
    """`dataset` with a format that hides columns (`set_format(columns=[...])`: its rows lack the others, though
    `column_names` lists them, so reading a raw column planned from those names was a KeyError) or that gives rows as
    pyarrow/polars values (a text row was refused as `StringScalar, not text`) read with every column as Python,
    numpy or torch values; its format type kept otherwise (the values read are the same)."""
    import datasets

    if isinstance(dataset, datasets.IterableDataset):  # it has no public `format`; its type is in its config
        kind = getattr(getattr(dataset, "_formatting", None), "format_type", None)
        return dataset.with_format(None) if kind in _FOREIGN_FORMATS else dataset
    format_ = getattr(dataset, "format", None) if isinstance(dataset, datasets.Dataset) else None
    if not isinstance(format_, Mapping):
        return dataset
    kind, hidden = format_.get("type"), format_.get("columns") is not None and not format_.get("output_all_columns")
    if kind in _FOREIGN_FORMATS:
        return dataset.with_format(None)
    if hidden:
        return dataset.with_format(kind, **(format_.get("format_kwargs") or {}))
    return dataset


def check_calibration_columns(calibration: Any, processors: Any = None, *, image_column: str | None = None,
                              text_column: str | None = None, inputs: Sequence[str] | None = None,
                              model_config: Any = None, role: DataRole = CALIBRATION) -> None:
    """Refuse a calibration dataset the parents cannot read — a column the models need that is missing, a raw column
    without a processor to preprocess it — from its column names and the parents' processors (arguments as
    `resolve_calibration`'s), before any weights are loaded: `resolve_calibration` finds the same, but only once every
    parent is loaded. A `DatasetDict` is checked as its one split; anything but a `datasets` object (batches, a stream)
    is checked when read."""
    import datasets

    calibration = single_split(calibration, role)
    if not isinstance(calibration, (datasets.Dataset, datasets.IterableDataset)):
        return
    refuse_transform(calibration, role)
    calibration = all_columns_readable(calibration)  # columns named as the merge reads them (an arrow stream's rows)
    # as the read refuses it (`resolve_calibration`): else its columns, typed null, were "null, not text"
    _refuse_empty(calibration, loaded_from(calibration) or "dataset", role)
    name = loaded_from(calibration) or "calibration data"
    columns = column_names(calibration, name)
    refuse_no_columns(calibration, columns, name)
    # `_choose_processor`'s choice, without its warning (logged once, when the data is resolved)
    processor = (next((p for p in processors if p is not None), None) if isinstance(processors, (list, tuple))
                 else processors)
    if inputs is None:
        inputs = _infer_inputs(columns, image_processor_of(processor), tokenizer_of(processor), image_column,
                               text_column)
    _plan(columns, tuple(inputs), processor, image_column, text_column, model_config, role,
          features=getattr(calibration, "features", None), quiet=True)


#: How much larger than the model's `image_size` an image processor may resize or crop images (a resize to 256 then a
#: crop to 224 is usual): past it, each calibration image would take memory for pixels the model cannot read.
MAX_RESIZE_FACTOR = 8
_SIDE_KEYS = ("height", "width", "shortest_edge", "longest_edge")


def refuse_oversized_resize(image_processor: Any, model_config: Any, role: DataRole = CALIBRATION) -> None:
    """Refuse an image processor (a parent's preprocessor_config.json: data) whose `size` or `crop_size` is more than
    `MAX_RESIZE_FACTOR` times the model's `image_size`, before any image is resized: `size: 100000x100000` asked 10**10
    pixels of every image for a model that reads 16x16. `_plan` calls it when images are to be preprocessed."""
    vision = getattr(model_config, "vision_config", None) or model_config
    side = getattr(vision, "image_size", None)
    if image_processor is None or isinstance(side, bool) or not isinstance(side, int) or side <= 0:
        return
    for attribute in ("size", "crop_size"):
        value = getattr(image_processor, attribute, None)
        for key in _SIDE_KEYS:
            number = value.get(key) if isinstance(value, Mapping) else getattr(value, key, None)
            if isinstance(number, int) and not isinstance(number, bool) and number > MAX_RESIZE_FACTOR * side:
                raise role.error(
                    f"{role.image_processor} resizes images to {key} {number:,} pixels, but the model reads images "
                    f"of {side}x{side} (its config's image_size); each image of the {role.data} would take memory "
                    f"for pixels it cannot read: restore the preprocessor_config.json saved with the model "
                    f"({attribute} near {side})")


def image_side(size: Any) -> tuple[int, int] | None:
    """A config's `image_size` as (height, width): an int for a square, a pair as given; None when it names none."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size, size
    return tuple(size) if isinstance(size, (list, tuple)) and len(size) == 2 else None


def _side_pair(value: Any) -> tuple[int, int] | None:
    """A processor's `size`/`crop_size` as (height, width) when it names both (not `shortest_edge`: that output
    depends on each image's aspect)."""
    def number(key: str) -> Any:
        return value.get(key) if isinstance(value, Mapping) else getattr(value, key, None)

    height, width = number("height"), number("width")
    if all(isinstance(n, int) and not isinstance(n, bool) for n in (height, width)):
        return height, width
    return None


def refuse_other_image_size(image_processor: Any, model_config: Any, role: DataRole = CALIBRATION) -> None:
    """Refuse an image processor whose output size (its `crop_size` when it center-crops, else its `size`) is not the
    model's `image_size`, before any weight is read: every batch it makes would be refused once the parents are
    loaded (`statistics.ModelInputCheck`), with advice to preprocess with that very processor."""
    vision = getattr(model_config, "vision_config", None) or model_config
    size = getattr(vision, "image_size", None)
    side = image_side(size)
    if image_processor is None or side is None:
        return
    if getattr(image_processor, "do_center_crop", False):
        attribute = "crop_size"
    elif getattr(image_processor, "do_resize", True):
        attribute = "size"
    else:
        return
    made = _side_pair(getattr(image_processor, attribute, None))
    if made is not None and made != side:
        raise role.error(
            f"{role.image_processor} ({type(image_processor).__name__}) makes images of {made[0]}x{made[1]} pixels "
            f"({attribute} in its preprocessor_config.json), but the model reads {side[0]}x{side[1]} (its config's "
            f"image_size {size}); set the processor's {attribute} to {side[0]}x{side[1]} (or pass the "
            "preprocessor_config.json saved with the model)")


#: The fix for a tokenizer knowing more tokens than its model's embeddings (said before reading and at a batch).
VOCABULARY_FIX = ("resize the model's token embeddings to its tokenizer "
                  "(model.resize_token_embeddings(len(tokenizer)), then save it) or use the tokenizer it was trained "
                  "with")


def refuse_no_pad_token(tokenizer: Any, role: DataRole = CALIBRATION, own_inputs: bool = True) -> None:
    """Refuse a tokenizer without a pad token for raw text, before any row is read (or any weights loaded): texts are
    padded into batches (`encode_texts`), which transformers refuses without one — a bare ValueError at the first
    batch, after the parents were loaded (even for a batch of one text: it checks the tokenizer, not the texts).
    `own_inputs`: whether the user may map padded input_ids instead (calibration data; not CLIP's class prompts)."""
    if tokenizer is None or not hasattr(tokenizer, "pad_token") or tokenizer.pad_token is not None:
        return
    whose = role.tokenizer
    if type(tokenizer).__name__ not in whose:  # a processor= given names its class already
        whose = f"{whose} ({type(tokenizer).__name__})"
    if getattr(tokenizer, "eos_token", None) is not None:
        give = "tokenizer.pad_token = tokenizer.eos_token, say: padding is masked out"
    else:  # no EOS token to reuse (BERT-like): a new one, which the models' embeddings must cover if it is new
        vocabulary = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        give = "tokenizer.add_special_tokens({'pad_token': '[PAD]'})" + (
            "" if "[PAD]" in vocabulary else ", then resize the models' token embeddings to len(tokenizer)")
    raise role.error(
        f"{whose} has no pad token, so the texts of the {role.data} cannot be padded into batches; give it one "
        f"({give}) and {role.fix}" + (", or map your own padded input_ids and attention_mask" if own_inputs else ""))


def refuse_pairs_for_one_segment(texts: Sequence[str], tokenizer: Any, model_config: Any,
                                 role: DataRole = CALIBRATION) -> None:
    """Refuse text pairs, before any row is read (or any weights loaded), for a model whose config embeds fewer than
    two segment types (`type_vocab_size` 1: trained on single texts) when the tokenizer marks the second segment with
    `token_type_ids` 1: every batch would fail inside the embedding (`index out of range in self`) after the weights
    load. A tokenizer making no token_type_ids (RoBERTa's) reads pairs as one sequence, which such models read."""
    text = getattr(model_config, "text_config", None) or model_config
    segments = getattr(text, "type_vocab_size", None)
    if (not isinstance(segments, int) or isinstance(segments, bool) or segments >= 2 or tokenizer is None
            or "token_type_ids" not in (getattr(tokenizer, "model_input_names", None) or ())):
        return
    first, second = texts
    raise role.error(
        f"the {role.data} is read as text pairs ({first!r} and {second!r}), whose second segment "
        f"{role.tokenizer} marks with token_type_ids 1, but the model's config has type_vocab_size {segments} (trained "
        f"on single texts: segment 0 only); read one column with text_column={first!r} (CLI: "
        f"{flag('text_column')} {first}), or use models trained on text pairs")


def larger_vocabulary_warning(tokenizer: Any, model_config: Any, role: DataRole = CALIBRATION) -> str | None:
    """What to say, before any row is read, about a tokenizer that knows more tokens than the model's config
    `vocab_size` (tokens added without resizing the embeddings): its ids from vocab_size on have no embedding, so a
    batch holding one is refused once read (`statistics.ModelInputCheck`); text that never produces them merges as
    before, so this is a warning, not a refusal. None when they agree."""
    text = getattr(model_config, "text_config", None) or model_config
    vocab_size = getattr(text, "vocab_size", None)
    if tokenizer is None or not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size <= 0:
        return None
    try:
        known = len(tokenizer)
    except TypeError:
        return None
    if known <= vocab_size:
        return None
    return (f"{role.tokenizer} ({type(tokenizer).__name__}) knows {known} tokens, but the model's config has "
            f"vocab_size {vocab_size}: {role.data} producing ids from {vocab_size} on will be refused; "
            f"{VOCABULARY_FIX}")


def resolve_calibration(
    calibration: Any,
    processors: Any = None,
    *,
    image_column: str | None = None,
    text_column: str | None = None,
    num_samples: int | None = None,
    seed: int = 0,
    shuffle: bool = True,
    streaming: bool = True,
    inputs: Sequence[str] | None = None,
    model_config: Any = None,
    token: str | bool | None = None,
    role: DataRole = CALIBRATION,
    max_tokens: int | None = None,
) -> Any:
    """Calibration in any accepted form -> what `merge()` consumes (a `CalibrationStream`, or the input as is).

    Args:
        calibration: `"repo_or_path[:config]:split"`, a `Dataset`/`IterableDataset` (model-input or raw
            columns), a `CalibrationStream` (returned as is) or an iterable of dict batches (returned as is).
        processors: the parents' processors (a list; the first present one is used) or one processor.
        image_column, text_column: raw columns to preprocess (default: `image`/`img`, `text`/`sentence`).
        num_samples: keep this many rows, chosen by a shuffle seeded with `seed` (a buffer shuffle of
            `SHUFFLE_BUFFER_SIZE` rows when streaming); all rows when None (then order is irrelevant).
        streaming: stream spec datasets instead of downloading and converting them first.
        inputs: model inputs the parents need (e.g. `spec.inputs`); inferred from columns/processors if None.
        model_config: a parent's config, for the image channel count and the text length limit.
        role: whose data and processor the errors name (`DataRole`; evaluate's test data and one model).
        max_tokens: the most tokens the parents read (`PermutationSpec.max_tokens`): raw text is cut to it (else to
            the config's `max_position_embeddings`, which RoBERTa's position offset makes one too many).
    """
    import datasets

    if calibration is None:
        raise CalibrationError("no calibration data; pass a dataset, a 'repo_or_path[:config]:split' spec or batches")
    if isinstance(calibration, CalibrationStream):
        return calibration
    source = loaded_from(calibration) or "dataset"
    if isinstance(calibration, (str, os.PathLike, DatasetSpec)):
        parsed = (calibration if isinstance(calibration, DatasetSpec)
                  else DatasetSpec.parse(calibration, kind=role.kind, error=role.error))
        source = str(parsed)
        calibration = load_calibration_dataset(parsed, streaming=streaming, token=token, role=role)
    calibration = single_split(calibration, role)
    if not isinstance(calibration, (datasets.Dataset, datasets.IterableDataset)):
        return calibration
    refuse_transform(calibration, role)
    calibration = all_columns_readable(calibration)
    _refuse_empty(calibration, source, role)
    if source == "dataset":
        source = getattr(calibration.info, "dataset_name", None) or getattr(calibration.info, "builder_name", None) \
            or "dataset"
    columns = column_names(calibration, source, role.error)
    refuse_no_columns(calibration, columns, source, role)
    processor = _choose_processor(processors)
    if inputs is None:
        inputs = _infer_inputs(columns, image_processor_of(processor), tokenizer_of(processor),
                               image_column, text_column)
    keep, preprocess = _plan(columns, tuple(inputs), processor, image_column, text_column, model_config, role,
                             features=getattr(calibration, "features", None), max_tokens=max_tokens)
    if keep != columns:
        calibration = calibration.select_columns(keep)
    calibration = _subset(calibration, num_samples, seed, shuffle)
    logger.info("%s from %s: columns %s%s", role.reading, source, keep,
                f" preprocessed by {role.processor}" if preprocess else "")
    return CalibrationStream(dataset=calibration, preprocess=preprocess, source=source)
