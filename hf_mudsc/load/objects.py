"""Parents given as model objects, held as the merge needs them and given back exactly as they were.

A merge runs the caller's own objects (calibration, the refit, the α search and the refit gate's scores) and copies
parent A into the merged model. While it does, every module is in eval mode (dropout off: the statistics and the
scores are the parents' function as their weights define it, whatever mode the caller left them in) and holds none
of the caller's hooks (a hook would run on the merge's batches, could change the statistics, and `copy.deepcopy`
would carry it into the merged model), and runs uncompiled (a `model.compile()` call set aside). On return or
failure, Ctrl-C included, each module gets its own mode, its own hook dictionaries (the same objects: the caller's
handles still remove their hooks) and its compiled call back.

A recipe names an object parent by its `name_or_path` folder (or Hub repo) only when that checkpoint holds exactly
the object's weights (`object_source`); otherwise as an object (`references.object_reference`), which a re-run refuses.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_mudsc.errors import MergeInputError
from hf_mudsc.load.checks import OUTPUT_SWITCHES
from hf_mudsc.load.references import COMMIT_SHA, looks_like_path
from hf_mudsc.load.weight_files import SAFETENSORS_INDEX, SAFETENSORS_SINGLE

logger = logging.getLogger(__name__)

# The per-module hook registries of `torch.nn.Module` (forward, backward, state-dict ones), read from a bare
# module so that a registry a later torch adds is held too.
HOOK_REGISTRIES = tuple(name for name, value in vars(nn.Module()).items() if "hook" in name and isinstance(value, dict))


# Where `nn.Module.compile()` keeps a module's compiled call (an instance attribute; the class's is None).
COMPILED_CALL = "_compiled_call_impl"


def model_objects(given: Iterable[Any]) -> list[nn.Module]:
    """The modules among merge inputs: a model object itself, a `LoadedParent`'s model; references (str, paths) and
    None are skipped."""
    found = []
    for item in given:
        model = item if isinstance(item, nn.Module) else getattr(item, "model", None)
        if isinstance(model, nn.Module):
            found.append(model)
    return found


# The modules (by id) of the model objects a merge running in this process is using: a merge sets their mode and
# puts its hooks on them, so a second merge of the same objects at once would read the first one's hooks.
_CLAIM_LOCK = threading.Lock()
_CLAIMED: set[int] = set()


@contextlib.contextmanager
def claimed_for_merge(named: Sequence[tuple[str, nn.Module]]) -> Iterator[None]:
    """Every module of the `(name, model)` pairs claimed for one merge inside the block, released on leaving it.
    A model another merge in this process holds (two threads merging the same parents) is refused in one line
    naming it, before any work: the merges would run each other's hooks and modes. Distinct objects merge in
    parallel; one object given twice to one merge is fine (ids are claimed per call)."""
    ids: dict[int, str] = {}
    for name, model in named:
        for module in model.modules():
            ids.setdefault(id(module), name)
    with _CLAIM_LOCK:
        busy = next((name for key, name in ids.items() if key in _CLAIMED), None)
        if busy is None:
            _CLAIMED.update(ids)
    if busy is not None:
        raise MergeInputError(f"{busy} is in use by another merge running in this process; merge one at a time, "
                              "or pass a copy (copy.deepcopy)")
    try:
        yield
    finally:
        with _CLAIM_LOCK:
            _CLAIMED.difference_update(ids)


@contextlib.contextmanager
def held_as_given(models: Iterable[nn.Module]) -> Iterator[None]:
    """Every module of `models` in eval mode, without hooks and uncompiled inside the block; each module's mode, hook
    registries and compiled call restored on leaving it (module docstring). A module compiled in place
    (`model.compile()`) runs its compiled call instead of its own: the layers the merge reads and replaces (the
    refit's) would not be the ones that run. Nested uses and shared modules are fine."""
    saved: dict[int, tuple[nn.Module, bool, dict[str, Any]]] = {}
    for model in models:
        for module in model.modules():
            if id(module) not in saved:
                held = {name: getattr(module, name) for name in HOOK_REGISTRIES}
                if COMPILED_CALL in vars(module):
                    held[COMPILED_CALL] = vars(module)[COMPILED_CALL]
                saved[id(module)] = (module, module.training, held)
    try:
        for module, _, held in saved.values():
            module.training = False
            for name, value in held.items():
                if name == COMPILED_CALL:
                    del module.__dict__[COMPILED_CALL]  # the class's own (None): the module's `forward` runs
                else:
                    setattr(module, name, type(value)())
        yield
    finally:
        for module, training, held in saved.values():
            module.training = training
            for name, value in held.items():
                setattr(module, name, value)


# The module attribute transformers' layers read to run their feed-forward in chunks of positions
# (`apply_chunking_to_forward`, set from `config.chunk_size_feed_forward`; 0: whole sequences).
FEED_FORWARD_CHUNKING = "chunk_size_feed_forward"


@contextlib.contextmanager
def whole_sequences(models: Iterable[nn.Module]) -> Iterator[None]:
    """Every layer of `models` running its feed-forward on whole sequences inside the block, each layer's chunking
    restored on leaving it. A chunked layer calls its MLP once per chunk of positions, so a hook on the MLP's modules
    fires once per chunk: the merge's statistics, refit and RegMean passes, which record one call per batch, would
    pair one parent's last chunk with the other's first (a silently wrong merge), or fail on chunks of other sizes.
    Unchunked, the MLP computes the same values (it acts on each position alone). Shared modules are fine."""
    saved: dict[int, tuple[nn.Module, Any]] = {}
    for model in models:
        for module in model.modules():
            chunk = vars(module).get(FEED_FORWARD_CHUNKING)
            if isinstance(chunk, int) and chunk and id(module) not in saved:
                saved[id(module)] = (module, chunk)
    try:
        for module, _ in saved.values():
            setattr(module, FEED_FORWARD_CHUNKING, 0)
        yield
    finally:
        for module, chunk in saved.values():
            setattr(module, FEED_FORWARD_CHUNKING, chunk)


@dataclass(frozen=True)
class ObjectSource:
    """Where a model object's weights can be read again: a local folder, or a Hub repo at a commit (`repo_id`,
    `commit_sha`), found from its `name_or_path` and checked to hold exactly the object's weights."""

    reference: str
    repo_id: str | None = None
    commit_sha: str | None = None


def object_source(model: nn.Module, name_or_path: str) -> ObjectSource | None:
    """Where `model` (a parent given as an object) can be re-loaded from, or None: its `name_or_path` folder (or a
    cached snapshot of that Hub repo) only if that checkpoint holds every one of its parameters with the same bytes in
    the checkpoint's stored dtype. An object changed in memory, or loaded in another dtype (`dtype=float16` from
    float32 files), holds other weights: a recipe naming the folder would re-run another merge. The checkpoint is
    read one tensor at a time (no second model is loaded); only safetensors are read; nothing is downloaded."""
    for folder, repo_id, commit_sha in _checkpoint_folders(model, name_or_path):
        # a Hub snapshot must also hold its config: a later commit may change only config.json (labels named),
        # and a recipe pinned to it would re-run another model
        if (repo_id is None or holds_config(model, folder)) and holds_checkpoint_weights(model, folder):
            return ObjectSource(reference=repo_id or name_or_path, repo_id=repo_id, commit_sha=commit_sha)
    if name_or_path:
        logger.info("the %s object given as a parent does not hold the weights of %r: recorded as an object",
                    type(model).__name__, name_or_path)
    return None


#: Config keys that say where or how a config was read or saved, or how one loaded object returns its outputs
#: (`from_pretrained(folder, return_dict=False)`), not what the model is.
_CONFIG_RECORD_KEYS = ("_name_or_path", "_commit_hash", "transformers_version", "dtype", "torch_dtype",
                       "_attn_implementation_autoset", "_attn_implementation", *OUTPUT_SWITCHES)


def holds_config(model: nn.Module, folder: str | os.PathLike) -> bool:
    """Whether the `config.json` in `folder` is `model`'s config (its `to_dict()`, keys recording where or how it was
    read or saved aside)."""
    import json

    config = getattr(model, "config", None)
    if config is None:
        return False
    try:
        stored = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
        stored.pop("model_type", None)
        full = json.loads(type(config)(**stored).to_json_string(use_diff=False))  # defaults filled in, as `mine`
        mine = json.loads(config.to_json_string(use_diff=False))
    except Exception as error:  # noqa: BLE001 - a config that cannot be compared is not known to be this one
        logger.debug("cannot compare the config in %s: %s", folder, error)
        return False
    return _without_records(full) == _without_records(mine)


def _without_records(config: dict[str, Any]) -> dict[str, Any]:
    """A config's dict without `_CONFIG_RECORD_KEYS`, in its sub-configs too (CLIP's `text_config` records the dtype
    it was loaded in)."""
    return {key: _without_records(value) if isinstance(value, dict) and key.endswith("_config") else value
            for key, value in config.items() if key not in _CONFIG_RECORD_KEYS}


def holds_checkpoint_weights(model: nn.Module, folder: str | os.PathLike) -> bool:
    """Whether the safetensors checkpoint in `folder` holds every parameter of `model` (named as `from_pretrained`
    names them) with the same shape and, converted to the stored dtype, the same bytes."""
    from hf_mudsc.load.lazy import lazy_parameters

    try:
        stored = lazy_parameters(folder, dtype=None, model=model)
    except (OSError, ValueError) as error:  # an unreadable or damaged file: nothing to compare with
        logger.debug("cannot read the checkpoint in %s: %s", folder, error)
        return False
    if stored is None:
        return False
    for name, tensor in model.named_parameters():
        if name not in stored or tuple(tensor.shape) != stored.shape(name):
            return False
        saved = stored[name]
        if not torch.equal(tensor.detach().to(device="cpu", dtype=saved.dtype), saved):
            return False
    return True


def _checkpoint_folders(model: nn.Module, name_or_path: str) -> Iterator[tuple[Path, str | None, str | None]]:
    """`(folder, repo_id, commit_sha)` of each checkpoint `name_or_path` may name, most likely first: a local folder;
    or the cached snapshots of a Hub repo — at the config's `_commit_hash` when transformers set one (before 5.18),
    else every cached commit, those a branch or tag points at first (`from_pretrained` records no commit now)."""
    if not name_or_path:
        return
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        yield folder, None, None
        return
    if looks_like_path(name_or_path):
        return
    from huggingface_hub import try_to_load_from_cache

    given = getattr(getattr(model, "config", None), "_commit_hash", None)
    for commit in [given] if given else _cached_commits(name_or_path):
        for name in (SAFETENSORS_SINGLE, SAFETENSORS_INDEX):  # the order `weights_format` reads them in
            try:
                found = try_to_load_from_cache(name_or_path, name, revision=commit)
            except ValueError:  # not a repo id
                return
            if isinstance(found, str):
                yield Path(found).parent, name_or_path, commit
                break


def _cached_commits(repo_id: str) -> list[str]:
    """The commits of `repo_id` whose snapshots the local Hub cache holds: those its refs (branches, tags) point at
    first, then the others, newest first."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    try:
        repo = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    except ValueError:  # not a repo id
        return []
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return []
    cached = sorted((p for p in snapshots.iterdir() if p.is_dir() and COMMIT_SHA.fullmatch(p.name)),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    refs = repo / "refs"
    pointed = [] if not refs.is_dir() else [
        ref.read_text(encoding="ascii", errors="replace").strip() for ref in sorted(refs.rglob("*")) if ref.is_file()]
    names = [p.name for p in cached]
    return list(dict.fromkeys([sha for sha in pointed if sha in names] + names))
