"""Parameters read one tensor at a time from safetensors files, as mergekit's lazy loader does.

A tensor-wise merge (task arithmetic, TIES, DARE ...) needs each parent's tensor `name` only while it merges
`name`. Holding every parent in memory makes peak memory grow with the number of parents; reading each tensor on
access keeps it at about one merged model plus one tensor per parent (issue 13: 8 parents <= 1.5x the memory
of 2).

`LazyParameters` is a read-only `Mapping` over one checkpoint (a single `model.safetensors` or the shards of a
`model.safetensors.index.json`): its keys and shapes come from the files' headers; `mapping[name]` opens the
file, copies that one tensor out and closes the file again. Nothing is cached. The file is opened per access on
purpose: a long-lived `safe_open` handle memory-maps the file, and every page read through the map stays in the
process's resident set until the handle closes — after reading all tensors once, the whole checkpoint would be
resident again (measured: a 256 MB file read through one handle peaks at +256 MB RSS, through a handle per
tensor at +0).

A checkpoint's keys are not always the model's parameter names: transformers 5 renames some as it loads them (a
ViT's `vit.encoder.layer.0.intermediate.dense.weight` is the model's `vit.layers.0.mlp.fc1.weight`, and its
`save_pretrained` writes the old names back; old BERTs store `LayerNorm.gamma`). `stored_keys` names a checkpoint's
tensors as `from_pretrained` does, with transformers' own conversion mapping, so such a checkpoint is read lazily
too instead of being loaded whole.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class LazyParameters(Mapping[str, torch.Tensor]):
    """`name -> tensor` over safetensors files, each tensor read from disk when it is looked up (never cached).

    `files`: the checkpoint's safetensors files. `names`: expose only these tensors (e.g. a model's parameter
    names, leaving out buffers a checkpoint also holds); None = every tensor in the files. `keys`: name -> the key
    it is stored under, for names that differ from their keys (`stored_keys`); `names` and the mapping's keys are
    then the names. `dtype`: the tensors are returned in this dtype (parents are merged in float32, as
    `from_pretrained(dtype=torch.float32)` loads them); None keeps the stored dtype. Tensors are plain CPU tensors
    that the caller owns.
    """

    def __init__(self, files: Iterable[str | os.PathLike], *, names: Iterable[str] | None = None,
                 keys: Mapping[str, str] | None = None, dtype: torch.dtype | None = None) -> None:
        self._files = [Path(f) for f in files]
        if not self._files:
            raise ValueError("LazyParameters needs at least one safetensors file")
        self._where: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, str] = {}
        for file in self._files:
            with safe_open(file, framework="pt") as handle:
                for key in handle.keys():
                    if key in self._where:
                        raise ValueError(f"tensor {key!r} is stored twice: in {self._where[key].name} and {file.name}")
                    self._where[key] = file
                    header = handle.get_slice(key)
                    self._shapes[key] = tuple(header.get_shape())
                    self._dtypes[key] = dtype_name(header.get_dtype())
        self._keys = dict(keys or {})
        if keys is not None:  # a name's file, shape and dtype are its stored key's
            unknown = [key for key in self._keys.values() if key not in self._where]
            if unknown:
                raise KeyError(f"{len(unknown)} tensor(s) not in the checkpoint, e.g. {unknown[0]!r}")
            for facts in (self._where, self._shapes, self._dtypes):
                facts.update({name: facts[key] for name, key in self._keys.items()})
            self._where = {name: self._where[name] for name in self._keys}
        if names is not None:
            wanted = list(names)
            missing = [n for n in wanted if n not in self._where]
            if missing:
                raise KeyError(f"{len(missing)} tensor(s) not in the checkpoint, e.g. {missing[0]!r}")
            self._where = {n: self._where[n] for n in wanted}
        self.dtype = dtype

    # ------------------------------------------------------------------ Mapping
    def __getitem__(self, name: str) -> torch.Tensor:
        file = self._where[name]  # KeyError for an unknown name, as a dict
        with safe_open(file, framework="pt") as handle:
            tensor = handle.get_tensor(self._keys.get(name, name))
        return tensor if self.dtype is None or not tensor.is_floating_point() else tensor.to(self.dtype)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows `start:stop` (along dim 0) of tensor `name`, read without reading the rest of it (safetensors
        `get_slice`): a big tensor is merged in row chunks, so only a chunk of each parent's version is held."""
        file = self._where[name]
        with safe_open(file, framework="pt") as handle:
            tensor = handle.get_slice(self._keys.get(name, name))[start:stop]
        return tensor if self.dtype is None or not tensor.is_floating_point() else tensor.to(self.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    # ------------------------------------------------------------------ header facts (no tensor read)
    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, from the file header."""
        return self._shapes[name]

    def stored_dtype(self, name: str) -> str:
        """A tensor's dtype as stored, by torch's name (`float16`, `int8`, `bool` ...), from the file header: the
        returned tensor may have been converted to `self.dtype`."""
        return self._dtypes[name]

    def key(self, name: str) -> str:
        """The key tensor `name` is stored under in the checkpoint (its name, unless `keys` renamed it)."""
        if name not in self._where:
            raise KeyError(name)
        return self._keys.get(name, name)

    @property
    def files(self) -> list[Path]:
        return list(self._files)

    def __repr__(self) -> str:
        return f"LazyParameters({len(self)} tensors in {len(self._files)} file(s), first {self._files[0]})"


def dtype_name(stored: str) -> str:
    """torch's name of a safetensors header dtype: `I8` -> `int8`, `U8` -> `uint8`, `BF16` -> `bfloat16`,
    `F8_E4M3` -> `float8_e4m3`, `BOOL` -> `bool` (messages name dtypes as PyTorch users know them)."""
    lowered = stored.lower()
    for short, long in (("bf", "bfloat"), ("f", "float"), ("i", "int"), ("u", "uint")):
        rest = lowered[len(short):]
        if lowered.startswith(short) and rest[:1].isdigit():
            return long + rest
    return lowered


# Entries of one tensor read at a time by `non_finite_tensors` (64 MB of float32): a big embedding is checked in row
# chunks, never held whole.
FINITE_CHECK_ELEMENTS = 1 << 24


def non_finite_tensors(file: str | os.PathLike, *, chunk_elements: int | None = None) -> list[str]:
    """The floating tensors of the safetensors `file` holding NaN or inf, in file order (none: `[]`).

    Each tensor is read in row chunks of about `chunk_elements` entries (default `FINITE_CHECK_ELEMENTS`) through
    a handle opened for that tensor only (module docstring: a long-lived handle keeps every page it read resident),
    so checking a folder before it is published holds one chunk, never the model."""
    chunk = chunk_elements or FINITE_CHECK_ELEMENTS
    with safe_open(file, framework="pt") as handle:
        names = [name for name in handle.keys() if dtype_name(handle.get_slice(name).get_dtype()).startswith(
            ("float", "bfloat"))]
    bad = []
    for name in names:
        with safe_open(file, framework="pt") as handle:
            piece = handle.get_slice(name)
            shape = piece.get_shape()
            if not shape:
                bad += [] if _finite(handle.get_tensor(name)) else [name]
                continue
            row = math.prod(shape[1:])
            step = max(1, chunk // max(1, row))
            for start in range(0, shape[0], step):
                if not _finite(piece[start:start + step]):
                    bad.append(name)
                    break
    return bad


def _finite(tensor: torch.Tensor) -> bool:
    """No NaN or inf in `tensor` (float8 is widened first: `isfinite` has no float8 kernel; wider dtypes are checked
    as they are, since a float64 past float32's range is finite)."""
    return bool(torch.isfinite(tensor if tensor.element_size() > 1 else tensor.float()).all())


def safetensors_files(folder: str | os.PathLike) -> list[Path] | None:
    """The safetensors files of a checkpoint folder (a save_pretrained folder or a Hub snapshot), or None when it
    has none (pickle-only checkpoints cannot be read lazily). One file before a shard index, as `from_pretrained`
    chooses: a folder holding both is read as transformers reads it, in every code path."""
    folder = Path(folder)
    single = folder / SINGLE_FILE
    if single.is_file():
        return [single]
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / shard for shard in dict.fromkeys(weight_map.values())]
    return None


def lazy_parameters(folder: str | os.PathLike, *, names: Iterable[str] | None = None,
                    dtype: torch.dtype | None = torch.float32,
                    model: PreTrainedModel | None = None) -> LazyParameters | None:
    """`LazyParameters` over a checkpoint folder, or None when it has no safetensors weights or lacks one of
    `names` (e.g. tied weights saved once: the caller then uses the loaded model's parameters). `model` (e.g. on
    the meta device): the tensors are named as its `from_pretrained` names them (`stored_keys`); None when a tensor
    is not a stored one renamed."""
    files = safetensors_files(folder)
    if files is None:
        return None
    keys = None
    if model is not None:
        keys = stored_keys(model, checkpoint_keys(files))
        if keys is None:
            return None
    try:
        return LazyParameters(files, names=names, keys=keys, dtype=dtype)
    except KeyError:
        return None


def checkpoint_keys(files: Iterable[str | os.PathLike]) -> list[str]:
    """Every tensor key the safetensors `files` store, from their headers (no tensor is read)."""
    keys: list[str] = []
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            keys += handle.keys()
    return keys


def _key_renaming(model: PreTrainedModel) -> tuple[Callable[..., Any], list[Any], list[Any]] | None:
    """transformers' `rename_source_key` with `model`'s conversion mapping split into its renamings and its
    converters, as `from_pretrained` applies them; None when a release moved these internals."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError as error:
        logger.debug("transformers' key renaming is not where hf_mudsc reads it (%s)", error)
        return None
    transforms = get_model_conversion_mapping(model)
    return (rename_source_key, [t for t in transforms if isinstance(t, WeightRenaming)],
            [t for t in transforms if isinstance(t, WeightConverter)])


def stored_keys(model: PreTrainedModel, keys: Iterable[str], *, buffers: bool = False) -> dict[str, str] | None:
    """`model`'s name -> checkpoint key, for a checkpoint holding `keys`: each key renamed as `from_pretrained`
    renames it (transformers' conversion mapping of the model's class and model type, its legacy renames, the
    base-model prefix added or removed — `transformers.core_model_loading.rename_source_key`, the function
    `from_pretrained` calls), so a checkpoint whose keys transformers renames on load is read lazily too, and
    without a rename table of our own that would fall behind transformers'. Keys of no model tensor are left out.
    None (the caller loads the checkpoint whole, which converts it) when the mapping does more than rename — a
    `WeightConverter` splitting or joining tensors (none for the architectures hf_mudsc merges) — or two keys give
    one name. `buffers`: the model's buffers are named too, non-persistent ones included (older BERT checkpoints
    store `position_ids`, which the model no longer saves): which stored tensors load as buffers, not weights."""
    renaming = _key_renaming(model)
    if renaming is None:  # a release that moved transformers' internals: the checkpoint loads whole, as before
        return None
    rename_source_key, renamings, converters = renaming
    expected = model.state_dict()
    if buffers:
        expected.update(model.named_buffers())
    prefix = model.base_model_prefix
    names: dict[str, str] = {}
    for key in keys:
        name, converter = rename_source_key(key, renamings, converters, prefix, expected)
        if name not in expected and key in expected:  # as from_pretrained: a key that needed no renaming
            name, converter = rename_source_key(key, [], [], base_model_prefix=prefix, meta_state_dict=expected)
        if name not in expected:
            continue
        if converter is not None:
            logger.debug("%s: transformers converts checkpoint tensor %r (its pattern %r: split, joined or "
                         "reshaped, not only renamed); the checkpoint is loaded whole, which converts it",
                         type(model).__name__, key, converter)
            return None
        if name in names:
            logger.debug("%s: checkpoint tensors %r and %r both load as %r; the checkpoint is loaded whole",
                         type(model).__name__, names[name], key, name)
            return None
        names[name] = key
    return names


def loaded_names(model: PreTrainedModel, keys: Iterable[str]) -> dict[str, str]:
    """Each checkpoint key's name after `from_pretrained`'s renaming -> the key as stored, for every key (those of
    no model tensor too): transformers reports unused tensors by their renamed names, which the file does not hold.
    Empty when transformers' loading internals are not where this reads them."""
    renaming = _key_renaming(model)
    if renaming is None:
        return {}
    rename_source_key, renamings, converters = renaming
    expected = model.state_dict()
    return {rename_source_key(key, renamings, converters, model.base_model_prefix, expected)[0]: key for key in keys}


class Subset(Mapping[str, torch.Tensor]):
    """A read-only view of a parameter mapping restricted to some names: a lazy mapping stays lazy (a dict
    comprehension over it would read every tensor at once)."""

    def __init__(self, parameters: Mapping[str, torch.Tensor], keep: Callable[[str], bool]) -> None:
        self._parameters = parameters
        self._keep = keep

    def __getitem__(self, name: str) -> torch.Tensor:
        if not self._keep(name):
            raise KeyError(name)
        return self._parameters[name]

    def __iter__(self) -> Iterator[str]:
        return (name for name in self._parameters if self._keep(name))

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._keep(name) and name in self._parameters

    def shape(self, name: str) -> tuple[int, ...]:
        if not self._keep(name):
            raise KeyError(name)
        return shape_of(self._parameters, name)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        if not self._keep(name):
            raise KeyError(name)
        return rows_of(self._parameters, name, start, stop)


def subset(parameters: Mapping[str, torch.Tensor], keep: Callable[[str], bool]) -> Mapping[str, torch.Tensor]:
    """`parameters` restricted to the names `keep` accepts: a dict for a dict, a lazy view for anything else."""
    if isinstance(parameters, dict):
        return {name: tensor for name, tensor in parameters.items() if keep(name)}
    return Subset(parameters, keep)


def shape_of(parameters: Mapping[str, torch.Tensor], name: str) -> tuple[int, ...]:
    """Tensor `name`'s shape without reading it from a lazy mapping (`LazyParameters`, `Subset`: the file header)."""
    shape = getattr(parameters, "shape", None)
    return tuple(shape(name)) if callable(shape) else tuple(parameters[name].shape)


def rows_of(parameters: Mapping[str, torch.Tensor], name: str, start: int, stop: int) -> torch.Tensor:
    """Rows `start:stop` of tensor `name`: read from the file alone for a lazy mapping, a view of a held tensor
    otherwise."""
    rows = getattr(parameters, "rows", None)
    return rows(name, start, stop) if callable(rows) else parameters[name][start:stop]


class Replaced(Mapping[str, torch.Tensor]):
    """A read-only view of a parameter mapping with some tensors replaced (held in memory): the others stay lazy."""

    def __init__(self, parameters: Mapping[str, torch.Tensor], replaced: Mapping[str, torch.Tensor]) -> None:
        self._parameters = parameters
        self._replaced = dict(replaced)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._replaced[name] if name in self._replaced else self._parameters[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._parameters)

    def __len__(self) -> int:
        return len(self._parameters)

    def __contains__(self, name: object) -> bool:
        return name in self._parameters

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._replaced[name].shape) if name in self._replaced else shape_of(self._parameters, name)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        if name in self._replaced:
            return self._replaced[name][start:stop]
        return rows_of(self._parameters, name, start, stop)


def replaced(parameters: Mapping[str, torch.Tensor],
             tensors: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """`parameters` with `tensors` in place of the ones of the same names: a new dict for a dict, a lazy view for
    anything else (the input mapping is never modified)."""
    if isinstance(parameters, dict):
        return {**parameters, **tensors}
    return Replaced(parameters, tensors)
