"""Replay of finished blocks from their stored outputs, for the layer-by-layer refit (docs/design.md §4.9).

The refit runs the model once per layer step. Without help each pass starts at the input, so the cost grows with
the square of the depth. Once every refit layer a block depends on is final, the block's output on each refit
batch is final too: it is kept (per batch, bounded by the refit's sample count — in RAM within `RAM_BYTES`,
beyond that in files of a temporary directory that is always removed), and later passes replace the blocks up
to it by "return the stored output", so each pass runs only the blocks that are not final yet.

Architecture-free: a *chain* is the outermost `nn.ModuleList` holding refit layers (a transformer's blocks). It
is used only when one forward shows that its blocks run once each, in order, and that replaying them from stored
outputs gives the model's own output bit for bit; otherwise its blocks simply run (slower, same result).

Inside the block being refitted, *units* are replayed the same way (`BlockReplay(units=True)`): a module inside a
block that holds refit layers and runs once per forward (a transformer block's attention, the self-attention inside
it, its MLP's first half) is final as soon as every refit layer that has run by its return is, long before the block
is — so the block's later steps (o, fc1, fc2, and the next block's q/k/v, which runs the block to its end) take its
output from store instead of recomputing it: the merged model's self-attention (q/k/v and the attention product)
computes once per block instead of twice, a parent's attention once instead of once per chunk of steps it spans.
Units are used only when replacing them by their own outputs, one nesting depth at a time, leaves the model's output
bit for bit the same.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_mudsc.calibrate.layer_inputs import forward_inputs
from hf_mudsc.errors import CalibrationError

logger = logging.getLogger(__name__)

# Stored block outputs of all models of one refit kept in RAM up to this many bytes; the rest go to files.
RAM_BYTES = 1024 * 2**20
_MORE_BATCHES = ("refit: the calibration data gave more batches when read again; pass data that reads the same on "
                 "every pass: a list of batches or a datasets.Dataset")


@dataclass(frozen=True)
class Unit:
    """A module inside a chain's block that holds refit layers and runs once per forward (replayed inside its
    block)."""

    name: str
    block: int
    """Its block's index in the chain."""
    layers_before_end: int
    """How many refit layers (in first-fire order) have run when its forward returns."""
    slim: bool = False
    """Store only the first item of its tuple output (the rest None): the attention probabilities an eager attention
    returns beside its output are (heads × tokens) per token, and nothing the model returns reads them."""

    def inside(self, other: Unit) -> bool:
        """Whether this unit is a submodule of `other`."""
        return self.name.startswith(other.name + ".")


@dataclass(frozen=True)
class Chain:
    """Blocks run one after the other, each fed the previous one's output."""

    blocks: tuple[str, ...]
    layers_before_end: tuple[int, ...]
    """For each block, how many refit layers (in first-fire order) have run when its forward returns."""
    units: tuple[Unit, ...] = ()
    """The blocks' children that can be replayed inside their block (see the module docstring)."""


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return next((item for item in value if isinstance(item, torch.Tensor)), None)
    return None


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    return []


def _slimmed(value: Any) -> Any:
    """A tuple output with every item but the first replaced by None (a `Unit.slim` unit's stored output)."""
    return tuple(item if index == 0 else None for index, item in enumerate(value)) if isinstance(value, tuple) \
        else value


def _storable(value: Any) -> bool:
    return isinstance(value, torch.Tensor) or (
        isinstance(value, tuple) and type(value) is tuple and all(v is None or isinstance(v, torch.Tensor)
                                                                  for v in value))


def _outer_list(modules: Mapping[str, nn.Module], layer: str) -> str | None:
    parts = layer.split(".")
    for cut in range(1, len(parts)):
        if isinstance(modules.get(".".join(parts[:cut])), nn.ModuleList):
            return ".".join(parts[:cut])
    return None


def _unit_candidates(modules: Mapping[str, nn.Module], blocks: Sequence[str], layers: Sequence[str]
                     ) -> list[tuple[int, str]]:
    """(block index, module name) of every module inside a block, at any depth, that holds a refit layer without
    being one — outer modules before the ones inside them (`named_modules` order)."""
    wanted = set(layers)
    found = []
    for index, block in enumerate(blocks):
        for inner, _ in modules[block].named_modules():
            name = f"{block}.{inner}"
            if inner and name not in wanted and any(layer.startswith(name + ".") for layer in wanted):
                found.append((index, name))
    return found


def _depth(unit: Unit, units: Sequence[Unit]) -> int:
    """How many of `units` hold `unit` (0: an outermost one)."""
    return sum(unit.inside(other) for other in units)


def find_chains(model: nn.Module, layers: Sequence[str], batch: Mapping[str, Any]) -> list[Chain]:
    """The chains of `model` that can be replayed, with their units, checked on `batch` (forwards of one batch: the
    recording, the chains' check, which runs only the last block, and one units' check per nesting depth — two where
    a slimmed output (`Unit.slim`) changes the model's)."""
    modules = dict(model.named_modules())
    lists = sorted({found for name in layers if (found := _outer_list(modules, name)) is not None})
    candidates = [tuple(f"{name}.{child}" for child, _ in modules[name].named_children()) for name in lists]
    candidates = [blocks for blocks in candidates if len(blocks) >= 2]
    if not candidates:
        return []
    wanted = set(layers)
    fired: set[str] = set()
    calls: list[str] = []
    ends: dict[str, int] = {}
    inputs: dict[str, torch.Tensor | None] = {}
    outputs: dict[str, Any] = {}
    children = {blocks: _unit_candidates(modules, blocks, layers) for blocks in candidates}

    def on_layer(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple) -> None:
            fired.add(name)
        return hook

    def before(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            calls.append(name)
            inputs[name] = _first_tensor(args) if _first_tensor(args) is not None else _first_tensor(kwargs)
        return hook

    def after(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            ends[name] = len(fired & wanted)
            outputs[name] = output
        return hook

    handles = [modules[name].register_forward_pre_hook(on_layer(name)) for name in layers]
    for blocks in candidates:
        for name in [*blocks, *(child for _, child in children[blocks])]:
            handles.append(modules[name].register_forward_pre_hook(before(name), with_kwargs=True))
            handles.append(modules[name].register_forward_hook(after(name)))
    try:
        with torch.no_grad():
            reference = model(**forward_inputs(model, batch))
    finally:
        for handle in handles:
            handle.remove()
    chains = []
    for blocks in candidates:
        ordered = [name for name in calls if name in blocks] == list(blocks)
        fed = ordered and all(_first_tensor(outputs[a]) is not None and inputs[b] is not None
                              and (inputs[b] is _first_tensor(outputs[a]) or torch.equal(inputs[b],
                                                                                        _first_tensor(outputs[a])))
                              for a, b in zip(blocks, blocks[1:]))
        if fed and all(_storable(outputs[name]) for name in blocks):
            # A child returning its block's own output is replayed with the block (its output is the block's).
            units = tuple(Unit(name, index, ends[name]) for index, name in children[blocks]
                          if calls.count(name) == 1 and _storable(outputs[name])
                          and _first_tensor(outputs[name]) is not _first_tensor(outputs[blocks[index]]))
            chains.append(Chain(blocks, tuple(ends[name] for name in blocks), units))
    if chains:  # the replay must give the model's own output: all blocks but the last return the stored output
        with torch.no_grad(), _replaced(modules, {name: (lambda c=chain: outputs[c.blocks[-2]])
                                                  for chain in chains for name in chain.blocks[:-1]}):
            replayed = model(**forward_inputs(model, batch))
        if not _same_output(reference, replayed):
            logger.info("refit: replaying blocks changes the model's output; every pass runs the whole model")
            return []
    # The units of one nesting depth replaced by their own outputs (the units inside them do not run then; the next
    # depth's check covers those) — first slimmed (`Unit.slim`), else whole: the same model output, or that depth and
    # the ones inside it run whole.
    depths = {unit.name: _depth(unit, chain.units) for chain in chains for unit in chain.units}
    slim: set[str] = set()
    for depth in range(max(depths.values(), default=-1) + 1):
        names = [name for name, found in depths.items() if found == depth]
        extras = [name for name in names if isinstance(outputs[name], tuple)
                  and any(item is not None for item in outputs[name][1:])]
        tries = [True, False] if extras else [False]
        for slimmed in tries:
            with torch.no_grad(), _replaced(modules, {
                    name: (lambda name=name, cut=slimmed and name in extras: _slimmed(outputs[name]) if cut
                           else outputs[name]) for name in names}):
                replayed = model(**forward_inputs(model, batch))
            if _same_output(reference, replayed):
                slim.update(extras if slimmed else ())
                break
        else:
            logger.info("refit: replaying parts of blocks changes the model's output; %s",
                        "blocks run whole" if depth == 0 else "their inner parts run whole")
            chains = [Chain(chain.blocks, chain.layers_before_end,
                            tuple(unit for unit in chain.units if depths[unit.name] < depth)) for chain in chains]
            break
    return [dataclasses.replace(chain, units=tuple(dataclasses.replace(unit, slim=unit.name in slim)
                                                   for unit in chain.units)) for chain in chains]


def _same_output(reference: Any, replayed: Any) -> bool:
    same = [torch.equal(a, b) for a, b in zip(_tensors(reference), _tensors(replayed))]
    return bool(same) and all(same) and len(_tensors(reference)) == len(_tensors(replayed))


@contextlib.contextmanager
def _replaced(modules: Mapping[str, nn.Module], returns: Mapping[str, Callable[[], Any]]) -> Iterator[None]:
    """Within: each named module's forward returns `returns[name]()` instead of computing."""
    saved = {}
    for name, value in returns.items():
        module = modules[name]
        saved[name] = module.__dict__.get("forward")
        module.forward = lambda *args, _value=value, **kwargs: _value()
    try:
        yield
    finally:
        for name, previous in saved.items():
            del modules[name].__dict__["forward"]
            if previous is not None:
                modules[name].forward = previous


class Storage:
    """Where stored outputs live: RAM up to a shared byte budget, then files in one temporary directory."""

    def __init__(self, ram_bytes: int | None = None) -> None:
        ram_bytes = RAM_BYTES if ram_bytes is None else ram_bytes
        self.ram_bytes = ram_bytes
        self.ram_left = ram_bytes
        self.ram_peak = 0
        """Most bytes held in RAM at once."""
        self.files = 0
        """Files written (outputs beyond the RAM budget)."""
        self._directory: tempfile.TemporaryDirectory | None = None

    def path(self) -> Path:
        if self._directory is None:
            self._directory = tempfile.TemporaryDirectory(prefix="hf_mudsc-refit-")
        self.files += 1
        return Path(self._directory.name) / f"{self.files}.pt"

    def close(self) -> None:
        if self._directory is not None:
            self._directory.cleanup()
            self._directory = None


class BatchStore:
    """One value per batch number (a tensor or a tuple of tensors / None), in RAM or spilled to a file."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.items: dict[int, Any] = {}
        self.ram = 0

    def put(self, number: int, value: Any) -> None:
        value = value.clone() if isinstance(value, torch.Tensor) else tuple(
            v.clone() if v is not None else None for v in value)
        size = sum(t.numel() * t.element_size() for t in _tensors(value))
        if size <= self.storage.ram_left:
            self.storage.ram_left -= size
            self.storage.ram_peak = max(self.storage.ram_peak, self.storage.ram_bytes - self.storage.ram_left)
            self.ram += size
            self.items[number] = value
        else:
            path = self.storage.path()
            torch.save(value, path)
            self.items[number] = path

    def get(self, number: int) -> Any:
        if number not in self.items:
            raise CalibrationError(_MORE_BATCHES)
        value = self.items[number]
        if isinstance(value, Path):
            return torch.load(value, weights_only=True)
        # a copy: a forward may change its input in place
        return value.clone() if isinstance(value, torch.Tensor) else tuple(
            v.clone() if v is not None else None for v in value)

    def release(self) -> None:
        for value in self.items.values():
            if isinstance(value, Path):
                value.unlink(missing_ok=True)
        self.items.clear()
        self.storage.ram_left += self.ram
        self.ram = 0


class BlockReplay:
    """A model's finished blocks replayed from stored outputs: one per model of a refit (the merged model, each
    parent). `run(finished)` wraps one pass over the batches, `batch(number)` is called before each forward.
    `units`: also replay the chains' units inside the block being refitted (the merged model's steps run each block
    5 times, a parent's chunks of steps once or twice; a unit's outputs are held only until its block's are)."""

    def __init__(self, model: nn.Module, chains: Sequence[Chain], storage: Storage, *, units: bool = False) -> None:
        self.modules = dict(model.named_modules())
        self.chains = list(chains)
        self.storage = storage
        self.units = units
        self.kept: list[tuple[int, BatchStore] | None] = [None] * len(self.chains)
        self.unit_kept: dict[str, tuple[int, int, BatchStore]] = {}  # unit -> (chain index, block index, outputs)
        self.number = 0
        self.batches = 0
        self._memo: dict[int, tuple[int, Any]] = {}
        self.storing: tuple[str, ...] = ()
        """The blocks and units whose outputs the current pass stores (a caller that stops its forwards early lets
        them return first, else nothing is stored)."""

    def batch(self, number: int) -> None:
        self.number = number
        self.batches = max(self.batches, number + 1)

    def _stored(self, index: int) -> Any:
        """The chain's stored output for the current batch, read once per batch (every skipped block returns it)."""
        if self._memo.get(index, (None,))[0] != self.number:
            self._memo[index] = (self.number, self.kept[index][1].get(self.number))
        return self._memo[index][1]

    def _unit_output(self, name: str) -> Any:
        return self.unit_kept[name][2].get(self.number)

    @contextlib.contextmanager
    def run(self, finished: int) -> Iterator[None]:
        """One pass in which every refit layer before the first `finished` ones (first-fire order) is final."""
        returns: dict[str, Callable[[], Any]] = {}
        fresh: dict[int, tuple[int, BatchStore]] = {}
        fresh_units: dict[str, tuple[int, int, BatchStore]] = {}
        handles = []

        def storer(store: BatchStore, slim: bool = False) -> Callable[..., None]:
            return lambda module, args, output: store.put(self.number, _slimmed(output) if slim else output)

        for index, chain in enumerate(self.chains):
            last = max((j for j, count in enumerate(chain.layers_before_end) if count <= finished), default=-1)
            kept = self.kept[index]
            stored = kept[0] if kept is not None else -1
            if kept is not None:
                for name in chain.blocks[:stored + 1]:
                    returns[name] = lambda index=index: self._stored(index)
            if last > stored:
                store = BatchStore(self.storage)
                fresh[index] = (last, store)
                handles.append(self.modules[chain.blocks[last]].register_forward_hook(storer(store)))
            final: list[Unit] = []  # this pass's final units, outer ones first
            for unit in chain.units if self.units else ():
                if unit.block <= stored or unit.layers_before_end > finished:
                    continue  # replayed with its block, or not final yet
                if unit.name in self.unit_kept:  # (inside a unit stored now, it spares that unit's work)
                    returns[unit.name] = lambda name=unit.name: self._unit_output(name)
                elif unit.block > last and not any(unit.inside(outer) for outer in final):
                    # (a block stored whole in this pass needs no unit of it stored, a unit whose outer unit is
                    # stored or replayed needs none inside it)
                    store = BatchStore(self.storage)
                    fresh_units[unit.name] = (index, unit.block, store)
                    handles.append(self.modules[unit.name].register_forward_hook(storer(store, unit.slim)))
                final.append(unit)
        self.batches = 0
        self._memo.clear()
        self.storing = (*(self.chains[index].blocks[last] for index, (last, _) in fresh.items()), *fresh_units)
        committed = False
        try:
            with _replaced(self.modules, returns):
                yield
            committed = True
        finally:
            self._memo.clear()
            self.storing = ()
            for handle in handles:
                handle.remove()
            for index, (last, store) in fresh.items():
                if committed and len(store.items) == self.batches:
                    if self.kept[index] is not None:
                        self.kept[index][1].release()
                    self.kept[index] = (last, store)
                else:
                    store.release()
            for name, (index, block, store) in fresh_units.items():
                if committed and len(store.items) == self.batches:
                    self.unit_kept[name] = (index, block, store)
                else:
                    store.release()
            # A unit whose block is now stored whole, or whose outer unit is stored, is never replayed again: its
            # outputs are freed.
            for name, (index, block, store) in list(self.unit_kept.items()):
                if (self.kept[index] is not None and block <= self.kept[index][0]) or any(
                        name.startswith(outer + ".") for outer in self.unit_kept):
                    store.release()
                    del self.unit_kept[name]

    def close(self) -> None:
        for kept in self.kept:
            if kept is not None:
                kept[1].release()
        self.kept = [None] * len(self.chains)
        for _, _, store in self.unit_kept.values():
            store.release()
        self.unit_kept = {}
