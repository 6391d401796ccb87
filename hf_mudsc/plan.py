"""`merge(..., dry_run=True)` / `hf-mudsc merge --dry-run`: what a merge would do, from small files only.

The plan resolves the parents' revisions, reads their configs, processors and safetensors *headers* (tensor names,
shapes, dtypes: the loader's `read_hub_headers` for Hub repos, `safetensors.safe_open` for local files —
never a weight file's data), builds the model on the `meta` device to get the permutation spec (the groups and
their widths), opens (does not read) the calibration split, and estimates time and peak memory from the sizes
(docs/design.md, "Dry run"). Nothing is written and nothing is pushed. `MergePlan.to_dict()` is JSON-able (what
a service shows for its dry-run button); `str(plan)` is what the CLI prints.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from hf_mudsc.errors import parent_label
from hf_mudsc.memory import available_memory, local_processes
from hf_mudsc.options import AUTO, REFITTING, MergeOptions, option_hint, refit_read_options, resolve_refit

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------- estimate constants
# Calibrated on scripts/bench_merge.py (README "Performance": 2 CPU cores, fp32 matmul 145-190 GFLOP/s).
# Calibration runs at about the matmul rate on the useful FLOPs: 1.2 fits MiniLM-L6 (31 s measured, 31.5 s
# predicted at 150 GFLOP/s), the ViT-S stand-in (62 / 63 s) and ViT-B/16 (388 / 383 s).
CALIBRATION_EFFICIENCY = 1.2
# Solve + apply + save = (SOLVE_FACTOR × solve FLOPs + APPLY_FLOPS_PER_PARAMETER × parameters) / matmul FLOP/s:
# fitted to MiniLM-L6 (9 s measured, 9 s predicted), ViT-B/16 (44 / 44 s); the ViT-S stand-in predicts 9.3 s
# (5 s align, 11 s zip measured). The per-parameter term is the apply step and writing the model.
SOLVE_FACTOR = 0.41
APPLY_FLOPS_PER_PARAMETER = 5.3e4
# Fitted 2026-12-01 on `scripts/bench_refit_cost.py`'s MiniLM-L6 pair (B = A perturbed and permuted, 512 and 128
# random 64-token examples, one thread; CPU seconds, each against the same process's calibration as the yardstick
# of the matmul rate, since the probe's R moves with the machine's load):
# - the solve with every start (docs/design.md §4.5: the activation start, the weight-only matching, the identity)
#   against the paper's one start (`reference_compat=True`, which SOLVE_FACTOR was fitted to): 22.7 vs 8.8 s of
#   solve and apply, i.e. MULTI_START_SOLVES times the one start's solve term;
# - `alpha="auto"` (§4.4) over the α 0.5 merge: its candidates' sweeps (ALPHA_SEARCH_SOLVES solve terms) and their
#   held-out forwards, 29.3 s;
# - the refit (§4.9: each parent's forward once, the merged model's REFIT_MERGED_FORWARDS times as each step re-runs
#   its block from the stored inputs, every layer's float64 Gram and cross-Gram counted as float32 FLOPs x2): the
#   gate took 59.9 s (385 examples), 53.5 s (with the α search's held-out outputs) and 16.7 s (103 examples) against
#   64.8 / 49.9 / 16.3 s predicted at REFIT_EFFICIENCY (multi-start: 13.8 s predicted, the α search 29.2 s).
MULTI_START_SOLVES = 8.5
ALPHA_SEARCH_SOLVES = 12.0
REFIT_MERGED_FORWARDS = 2.0
REFIT_EFFICIENCY = 0.95
# Peak RSS = runtime + WEIGHTS_FACTOR x both parents' fp32 weights + STATISTICS_FACTOR x the statistics
# (MiniLM 1.46 GB predicted / 1.45-1.55 measured, ViT-S stand-in 2.06 / 2.02, ViT-B 7.0 / 7.7).
RUNTIME_BYTES = 380e6
WEIGHTS_FACTOR = 2.5
STATISTICS_FACTOR = 1.25
# The methods that match no units are counted by what they hold, phase by phase (docs/design.md, "Dry run"), not by
# the factors above (fitted to unit matching, whose statistics dominate; RegMean's float64 systems and Grams are
# ~1.7x BERT-base's weights and were left out: 2.57 GB estimated, 6.14 GB measured). The process itself: RSS of
# `hf-mudsc merge` once torch, transformers and hf_mudsc are imported and the parents' configs and processors read,
# before any weight (0.43 GB for BERT-base and a 4-layer hidden-256 BERT alike), and with the calibration split open
# (`datasets` imported, the Arrow file mapped) 0.09 GB more.
PROCESS_BYTES = 430e6
DATA_READER_BYTES = 90e6
# The relation check (`load.relation.parent_relation`, every merge) compares each tensor of two parents; where a
# permuted copy is still possible after its unsorted pass (`sorted_sum`) it holds a sorted copy of each in its own
# dtype (4 bytes a value for float32 weights; the float64 sums are taken over small chunks).
# Until session 25 it held six float64 copies of the largest tensor (BERT-base's word embeddings: 1.1 GB, the peak
# of a linear merge), now 0.19 GB.
RELATION_BYTES_PER_VALUE = 8
# Text calibration: tokens per example are unknown without reading rows; this many are assumed (capped by the
# model's limit) and the plan says so.
ASSUMED_TEXT_TOKENS = 128
# A second of fp32 matmuls of this size measures the machine's rate when none is given.
PROBE_SIZE = 1024
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
# safetensors' header names of the floating dtypes -> torch's (what `out_dtype` resolves over).
TORCH_DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                     "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


@dataclass
class ParentPlan:
    """One parent as the dry run found it (`commit_sha` pins a Hub parent)."""

    reference: str
    repo_id: str | None
    commit_sha: str | None
    architecture: str
    num_parameters: int
    weight_files: list[str] = field(default_factory=list)
    weight_bytes: int | None = None
    """Bytes of tensor data in the weight files (what loading downloads/reads); None without headers."""
    dtypes: list[str] = field(default_factory=list)

    @property
    def pinned(self) -> str:
        return f"{self.repo_id}@{self.commit_sha}" if self.repo_id and self.commit_sha else self.reference


@dataclass
class GroupPlan:
    name: str
    width: int
    num_heads: int = 1


@dataclass
class CalibrationPlan:
    """The calibration rows the merge would read."""

    source: str
    rows_available: int | None
    rows: int | None
    """Examples the merge would read: `num_samples` capped by the split's size (None: unknown until read)."""
    tokens_per_example: int
    tokens_assumed: bool
    columns_checked: bool = False
    """Whether its columns were checked against the parents' processors, as the merge checks them before weights
    (data at hand only: in memory or local; a Hub dataset is not downloaded, batches are checked when read)."""
    columns_unchecked_reason: str = ""


@dataclass
class Estimate:
    """Rough cost of the merge on this machine (docs/design.md, "Dry run"): not counting the download."""

    calibration_seconds: float
    solve_seconds: float
    peak_memory_bytes: int
    matmul_flops_per_second: float
    statistics_bytes: int
    alpha_search_seconds: float = 0.0
    """`alpha="auto"`'s candidate solves and their held-out scoring (0 when no search runs)."""
    refit_seconds: float = 0.0
    """The refit (`refit`: ridge, the gate's ridge refit and held-out scoring, or REPAIR); 0 without one."""
    refit_bytes: int = 0
    """The refit's working set, counted in the peak (`refit_bytes`); 0 without a refit."""
    data_pass_seconds: float = 0.0
    """The pass over the data of a method that reads it itself (regmean, regmean_plusplus, fisher:
    `MergeMethod.data_pass_flops`); 0 for the others."""
    method_bytes: int = 0
    """What a method that matches no units holds while merging, besides the parents' weights
    (`MergeMethod.working_bytes`: the merged tensors; RegMean's systems and Grams; Fisher's sums); 0 for unit
    matching, whose statistics are counted apart."""

    @property
    def seconds(self) -> float:
        return (self.calibration_seconds + self.solve_seconds + self.alpha_search_seconds + self.refit_seconds
                + self.data_pass_seconds)


@dataclass
class MergePlan:
    """What `merge()` would do with these inputs (see the module docstring)."""

    parents: list[ParentPlan]
    relation: str
    method: str
    matcher: str | None
    groups: list[GroupPlan]
    calibration: CalibrationPlan | None
    estimate: Estimate
    warnings: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    out_dtype: str = "float32"
    out_dtype_reason: str = ""
    """The merged model's dtype and why (`out_dtype` resolved from the parents' stored dtypes, as the merge does)."""
    base: str | None = None
    """The base the merge would use (pinned for a Hub base), given or named by the parents' cards; None without."""
    base_source: str | None = None
    """Where the base came from when it was not given (`load.parents.BASE_FROM_CARDS`), as the config records it."""
    base_loaded_whole: bool = False
    """Whether the merge would load the base whole (counted in the peak memory) rather than one tensor at a time."""
    size_budget: dict[str, Any] | None = None
    """How `size` would be spent — the widths and exact parameter count the merge records in
    `config.mudsc["size_budget"]`, counted from shapes (docs/design.md §4.12); None for methods without a budget."""

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-able): every field, plus the estimate's total and the parents' pinned references."""
        data = dataclasses.asdict(self)
        data["estimate"]["seconds"] = self.estimate.seconds
        for parent, entry in zip(self.parents, data["parents"]):
            entry["pinned"] = parent.pinned
        return data

    def __str__(self) -> str:
        lines = ["Dry run: nothing was downloaded but configs and safetensors headers; nothing was written.", "",
                 "Parents:"]
        for index, parent in enumerate(self.parents):
            size = f", {memory_text(parent.weight_bytes)} of weights" if parent.weight_bytes is not None else ""
            dtypes = f" ({'/'.join(parent.dtypes)})" if parent.dtypes else ""
            name = "a model object" if parent.pinned == parent.architecture else parent.pinned
            lines.append(f"  {parent_label(index)}: {name} — {parent.architecture}, "
                         f"{parent.num_parameters / 1e6:.2f} M parameters{dtypes}{size}")
        if self.base is not None:
            how = "loaded whole" if self.base_loaded_whole else "read one tensor at a time"
            lines.append(f"Base: {self.base} ({f'{self.base_source}; ' if self.base_source else ''}{how})")
        lines += [f"Relation: {self.relation}", "",
                  f"Method: {self.method}" + (f" (matcher {self.matcher})" if self.matcher else "")]
        widths = sorted({g.width for g in self.groups})
        lines.append(f"Groups: {len(self.groups)} (widths {', '.join(map(str, widths))})")
        for group in self.groups:
            heads = f", {group.num_heads} heads" if group.num_heads > 1 else ""
            lines.append(f"  {group.name}: {group.width} units{heads}")
        budget = self.size_budget
        if budget is not None and budget["size"] != 1.0:
            grown = ", ".join(f"{key} {budget['widths'][key] - budget['extra_units'][key]} -> {budget['widths'][key]}"
                              for key in budget["widths"])
            lines.append(f"Size budget: {budget['size']:g} x one parent: {grown or 'no width to grow'}; "
                         f"{budget['num_parameters'] / 1e6:.3f} M parameters ({budget['ratio']:.3g} x)")
        lines.append(f"Output dtype: {self.out_dtype} ({self.out_dtype_reason})")
        calibration = self.calibration
        if calibration is None:
            lines.append("Calibration: none (the method reads no data)")
        else:
            rows = "unknown until read" if calibration.rows is None else str(calibration.rows)
            available = "" if calibration.rows_available is None else f" of {calibration.rows_available}"
            tokens = f"{calibration.tokens_per_example} tokens per example" + (
                " (assumed)" if calibration.tokens_assumed else "")
            columns = ("columns checked" if calibration.columns_checked
                       else f"columns not checked: {calibration.columns_unchecked_reason}")
            lines.append(f"Calibration: {calibration.source}: {rows}{available} rows, {tokens}; {columns}")
        estimate = self.estimate
        parts = [f"calibration {_seconds(estimate.calibration_seconds)}",
                 f"solve and apply {_seconds(estimate.solve_seconds)}"]
        if estimate.alpha_search_seconds:
            parts.append(f"α search {_seconds(estimate.alpha_search_seconds)}")
        if estimate.data_pass_seconds:
            parts.append(f"{self.method}'s data pass {_seconds(estimate.data_pass_seconds)}")
        if estimate.refit_seconds:
            parts.append(f"refit {_seconds(estimate.refit_seconds)}")
        held = (f"{self.method}'s working set {memory_text(estimate.method_bytes)}" if estimate.method_bytes
                else f"statistics {memory_text(estimate.statistics_bytes)}")
        lines += ["", f"Estimate: {_seconds(estimate.seconds)} ({', '.join(parts)}; download not included), peak "
                  f"memory {memory_text(estimate.peak_memory_bytes)} ({held}), at "
                  f"{estimate.matmul_flops_per_second / 1e9:.0f} GFLOP/s"]
        if self.warnings:
            lines += ["", "Warnings:"] + [f"  - {text}" for text in self.warnings]
        return "\n".join(lines)


def memory_text(value: float) -> str:
    """A byte count as the memory checks write it (`12.35 GB`)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value:.0f} B"


def _seconds(value: float) -> str:
    return f"{value / 60:.1f} min" if value >= 90 else f"{value:.1f} s"


# ---------------------------------------------------------------------------------------------------- estimate


def matmul_rate(size: int = PROBE_SIZE) -> float:
    """fp32 matmul FLOP/s of this machine: the best of a few `size`³ products (a few tens of ms)."""
    import torch

    a = torch.randn(size, size)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        torch.matmul(a, a)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / max(best, 1e-9)


def statistics_bytes(widths: Iterable[int], parents: int = 2) -> float:
    """The float64 `(N·n)²` sums of every group (docs/design.md §4.1; N = `parents`) — held at once during
    calibration."""
    return float(sum(8 * (parents * n) ** 2 for n in widths))


def base_loaded_whole(base: Any, method: Any | None, *, streaming: bool) -> bool:
    """Whether the merge will load a base whole, which the memory floor counts as one more parent: one given as a
    reference (`base`: a folder or Hub id; a model object is in memory already) or found from the parents' cards
    (none given, `method` needs one), and not streamed (`pipeline.streams_parents`)."""
    if streaming:
        return False
    if base is None:
        return method is not None and method.needs_base_model
    return isinstance(base, (str, os.PathLike))


def config_of(parent: Any) -> Any:
    """A parent's (or base's) config: `parent` is a config (a reference still to be loaded), a model or a
    `LoadedParent`."""
    from hf_mudsc.load.parents import LoadedParent

    if isinstance(parent, LoadedParent):
        return parent.model.config
    return getattr(parent, "config", parent) if hasattr(parent, "parameters") else parent


def _held_whole(parent: Any, streaming: bool) -> bool:
    """Whether a parent (or base) in `config_of`'s forms is held whole: a model, a `LoadedParent` read whole, or a
    reference not streamed."""
    from hf_mudsc.load.parents import LoadedParent

    if isinstance(parent, LoadedParent):
        return parent.parameters is None
    return hasattr(parent, "parameters") or not streaming


def head_copies(parents: Sequence[Any], *, streaming: bool) -> list[str]:
    """The letters of the parents the merge will copy whole to parent A's label order (the same labels in another
    order: `apply.classifier.head_order`), known from the configs before any weights: the memory check counts each
    copy, held next to its parent. `parents`: parent A first, each a config (a reference still to be loaded), a
    model or a `LoadedParent`; `streaming`: references after the first are read one tensor at a time, so their copy
    is a meta model and the head rows."""
    from hf_mudsc.apply.classifier import head_order

    config_a = config_of(parents[0])
    return [parent_label(index) for index, parent in enumerate(parents)
            if index and _held_whole(parent, streaming) and head_order(config_a, config_of(parent)) is not None]


def base_copied(base: Any, parent_a: Any, *, streaming: bool) -> bool:
    """Whether the merge will copy the base whole to parent A's label order (its head lists A's labels in another
    order: `apply.classifier.head_order`): one more model held next to the base, which the memory check counts as it
    counts `head_copies`. `base` and `parent_a` as `head_copies` takes them (`base` None: no base). A streamed base's
    copy is a meta model and the head rows; a base of another head class (read as the parents' class: its config
    names another architecture than parent A's, or its checkpoint lacks tensors) holds no head of these labels."""
    from hf_mudsc.apply.classifier import head_order
    from hf_mudsc.load.parents import LoadedParent

    if base is None or not _held_whole(base, streaming) or (isinstance(base, LoadedParent) and base.absent):
        return False
    if not hasattr(base, "parameters") and not isinstance(base, LoadedParent):  # a config: the class it names
        def named(parent: Any) -> str | None:
            if hasattr(parent, "parameters") or isinstance(parent, LoadedParent):
                return type(parent.model if isinstance(parent, LoadedParent) else parent).__name__
            return (getattr(parent, "architectures", None) or [None])[0]

        if named(base) != named(parent_a):
            return False
    return head_order(config_of(parent_a), config_of(base)) is not None


def memory_floor(model: Any, parents: int, method: Any | None, *, loading: int, copies: int = 0,
                 base: bool = False, base_copy: bool = False, working: bool = True) -> dict[str, float]:
    """Bytes a merge of `parents` copies of `model` (a model, or one on the meta device) must hold at once, by
    what holds them — a floor, not an estimate (`estimate_cost` gives the estimate):

    - weights: 4 bytes × parameters × `loading`, the parents still to be loaded whole (not streamed);
    - base: 4 bytes × parameters when `base`, a base still to be loaded whole (a streamed one holds one tensor);
    - copies: 4 bytes × parameters × `copies`, the parents held whole that are copied with their head reordered to
      parent A's label order (`apply.classifier.aligned_to_parent_a`: the copy and the parent exist together);
    - base_copy: 4 bytes × parameters when `base_copy`, the base held whole copied likewise (`base_copied`);
    - statistics (`method.needs_calibration`): the float64 `(N·n)²` sums of every group, allocated together
      before the first batch and kept, finalized in place, as the correlations through the solve (§4.13);
    - similarity (a unit-matching method): one float64 `(N·n)²` similarity of the widest group, which the matcher
      holds on the CPU next to those correlations;
    - working (a method that matches no units): what it holds besides the weights, `MergeMethod.working_bytes` —
      regmean's float64 systems and Grams, fisher's sums, the merged tensors (flat in the number of parents).
    `method` None (`auto` before it chose): the weights only. `working` False: no working set (`auto`'s choice,
    which merged before the working set was counted: its own memory check is the one a user opts into by naming the
    method).
    """
    floor: dict[str, float] = {}
    one_parent = 4.0 * sum(p.numel() for p in model.parameters())
    if loading:
        floor["weights"] = loading * one_parent
    if base:
        floor["base"] = one_parent
    if copies:  # only parents with a head are ever reordered (`head_copies` counts them)
        floor["copies"] = copies * one_parent
    if base_copy:
        floor["base_copy"] = one_parent
    if method is not None and (method.needs_calibration or method.matches_units):
        from hf_mudsc.architectures import spec_for

        widths = [group.width for group in spec_for(model).groups]
        if method.needs_calibration:
            floor["statistics"] = statistics_bytes(widths, parents)
        if method.matches_units and widths:
            floor["similarity"] = statistics_bytes([max(widths)], parents)
    if working and method is not None and not method.matches_units:
        from hf_mudsc.architectures import spec_for

        # What `working_bytes` reads: the layers' shapes and the parameter count (no flops are counted here).
        shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
        facts = _pass_facts(model, spec_for(model), shapes, {}, {"": 1}, int(one_parent // 4))
        floor["working"] = float(method.working_bytes(facts, parents))
    return floor


def memory_shortfall(model_or_config: Any, parents: int, method: Any, *, loading: int, copies: int = 0,
                     base: bool = False, base_copy: bool = False) -> tuple[float, float] | None:
    """(bytes needed, bytes available) when `method`'s whole `memory_floor` — its working set counted — exceeds the
    memory available now; None when it fits or the available memory is unknown. `auto` asks it of a data method it
    would choose, to choose a dataless one instead of running out of memory in the data method's pass."""
    available = available_memory()
    if available is None:
        return None
    model = model_or_config if hasattr(model_or_config, "parameters") else meta_model(model_or_config)
    needed = machine_floor(memory_floor(model, parents, method, loading=loading, copies=copies, base=base,
                                        base_copy=base_copy), local_processes())
    return (needed, available) if needed > available else None


#: `memory_floor` parts only the process that solves holds (process 0 under a launcher, `calibrate.distributed`):
#: every other process loads the parents and holds the summed statistics, then returns (`pipeline.merge`) while
#: process 0 solves or runs the method's own pass.
SOLVER_ONLY_PARTS = ("similarity", "working")


def shared_floor(floor: Mapping[str, float]) -> float:
    """The part of `floor` every process of a launch holds (all but `SOLVER_ONLY_PARTS`)."""
    return sum(value for key, value in floor.items() if key not in SOLVER_ONLY_PARTS)


def machine_floor(floor: Mapping[str, float], processes: int) -> float:
    """Bytes `processes` processes of one merge on this machine hold at once (they all draw on the memory
    `available_memory` reports): each its `shared_floor` while the statistics are collected, then process 0 alone
    its whole `floor` — the larger of the two."""
    return max(sum(floor.values()), processes * shared_floor(floor))


def most_parents(floor: Mapping[str, float], parents: int, every: bool, available: float) -> int:
    """The largest N with a·N² + b·N + c <= `available` for `floor` measured at `parents` parents (statistics and
    similarity grow with N², the weights of parents loaded whole — `every` — with N; a fixed count's weights and the
    other parts are c)."""
    per_parent = floor.get("weights", 0.0) / parents if every else 0.0
    room = available - (0.0 if every else floor.get("weights", 0.0)) - sum(
        floor.get(key, 0.0) for key in ("copies", "base", "base_copy", "working"))
    squared = (floor.get("statistics", 0.0) + floor.get("similarity", 0.0)) / parents**2
    if squared:
        return int((-per_parent + (per_parent**2 + 4 * squared * max(room, 0.0)) ** 0.5) / (2 * squared))
    return int(max(room, 0.0) // per_parent) if per_parent else 0


def check_memory(model_or_config: Any, parents: int, method: Any | None, *, loading: int,
                 chosen: str | None = None, copied: Sequence[str] = (), base: bool = False,
                 base_copy: bool = False) -> None:
    """Refuse a number of parents whose `memory_floor` exceeds the memory available now, in one line naming what
    needs it, before it is allocated — the statistics grow with the square of the number of parents, so a long list
    of parents failed only after minutes of loading, out of memory in calibration. `chosen`: why `auto` chose
    `method` (the check then runs after loading: `loading` 0). `copied`: the letters of the parents held whole whose
    heads will be copied to parent A's label order (`memory_floor`'s copies). `base`: a base will be loaded whole;
    `base_copy`: the base will be copied whole to parent A's label order (`base_copied`)."""
    from hf_mudsc.errors import MergeInputError

    available = available_memory()
    if available is None:
        return
    model = model_or_config if hasattr(model_or_config, "parameters") else meta_model(model_or_config)
    floor = memory_floor(model, parents, method, loading=loading, copies=len(copied), base=base, base_copy=base_copy,
                         working=chosen is None)
    processes = local_processes()
    needed = machine_floor(floor, processes)
    if needed <= available:
        return
    # The most parents that fit, process 0's whole floor and every process's share (`machine_floor`) alike.
    every = loading == parents
    fits = most_parents(floor, parents, every, available)
    if processes > 1:
        share = {key: processes * value for key, value in floor.items() if key not in SOLVER_ONLY_PARTS}
        fits = min(fits, most_parents(share, parents, every, available))
    parts = {"statistics": "of activation statistics (8·(N·n)² bytes per group: they grow with the square of the "
                           "number of parents)",
             "similarity": "for the widest group's similarity (8·(N·n)² bytes)",
             "weights": f"of parent weights ({loading} loaded whole)",
             "base": "for the base loaded whole",
             "copies": f"for parent{'s' if len(copied) > 1 else ''} {', '.join(copied)} copied in parent A's label "
                       "order (the same labels listed in another order: a reordered copy of each is held)",
             "base_copy": "for the base copied in parent A's label order (its head lists the same labels in another "
                          "order)",
             "working": f"for {method.name if method is not None else 'auto'}'s working set (what it holds besides "
                        "the weights, whatever the number of parents)"}
    # Every process's share is the larger need (`machine_floor`): its parts, N times over; else process 0's floor.
    by_processes = needed > sum(floor.values())
    held = ", ".join(f"{memory_text(floor[key])} {text}" for key, text in parts.items()
                     if floor.get(key) and not (by_processes and key in SOLVER_ONLY_PARTS))
    name = method.name if method is not None else "auto"
    why = f"method 'auto' chose {name!r} ({chosen}); " if chosen else ""
    other = ("a method that does not match units (linear, ties, ...: one tensor per parent in memory)"
             if method is not None and (method.needs_calibration or method.matches_units)
             else "a method that reads the parents one tensor at a time (linear, task_arithmetic, ties, ...)")
    fewer = f"merge at most {fits} parents at a time" if fits >= 2 else "merge on a machine with more memory"
    tensor_at_a_time = method is not None and not (method.needs_calibration or method.matches_units
                                                   or method.needs_data)
    instead = "" if tensor_at_a_time else f", or choose {other} (CLI: --method)"  # it is such a method already
    others = (f", {processes} times over: the {processes} processes on this machine each load the parents and hold "
              "the statistics (process 0 alone solves)") if by_processes else ""
    if processes > 1 and processes * shared_floor(floor) > available:  # fewer processes would fit
        fewer = (f"launch fewer processes per machine (torchrun --nproc_per_node, accelerate launch --num_processes),"
                 f" {fewer}")
    raise MergeInputError(
        f"{why}merging {parents} parents with {name} needs at least {memory_text(needed)} at once — {held}{others} "
        f"— but {memory_text(available)} of memory is available; {fewer}{instead}")


def forward_flops(linear_params: Mapping[str, int], tokens: Mapping[str, int]) -> float:
    """Multiply-add FLOPs of one example's forward pass: 2 × (matrix weights) × tokens of the tower they are in.

    `linear_params`: parameter name -> element count of every matrix weight (embedding tables excluded: a
    lookup is no product); `tokens`: parameter-name prefix -> tokens per example (the key "" for the rest).
    Attention's `QKᵀ`/`AV` products (4·T·h per token and layer, ~4 % for ViT-B) are left out."""
    return float(sum(2 * count * _tokens_for(name, tokens) for name, count in linear_params.items()))


def weight_tokens(spec: Any, shapes: Mapping[str, tuple[int, ...]], tokens: Mapping[str, int]) -> dict[str, int]:
    """`tokens` (`tokens_per_example`) with, by full weight name, the rows per example of the weights that do not read
    one per token of their tower (what `forward_flops` and a method's data pass count): a layer fed the first token or
    a pooled output (`HookPoint.per_example` inputs, the classifier) reads one; a patch convolution reads the patches
    (its tower's tokens but the class token). Counted per token, a ViT's classifier read 17 rows where it reads 1."""
    counted = dict(tokens)
    heads = {f"{hook.module}.weight" for group in spec.groups for hook in group.hooks
             if hook.per_example and hook.where == "input"}
    if spec.classifier is not None:
        heads.add(spec.classifier.weight)
    for name, shape in shapes.items():
        if name in heads:
            counted[name] = 1
        elif len(shape) == 4:  # a patch embedding: one product per patch, none for the class token
            counted[name] = max(_tokens_for(name, tokens) - 1, 1)
    return counted


def _tokens_for(name: str, tokens: Mapping[str, int]) -> int:
    prefix = max((p for p in tokens if name.startswith(p)), key=len, default="")
    return tokens.get(prefix, tokens.get("", 1))


def group_tokens_per_example(spec: Any, tokens: Mapping[str, int]) -> list[int]:
    """Calibration rows each group of `spec` reads per example, as the statistics count them: each hook's rows added
    up, one per token of its tower (`tokens_per_example`'s `tokens`), or one for a hook read at one position
    (`HookPoint.per_example`: the first token, a pooled output). Counting those per token hid the merge's own
    calibration-size warning from the dry run (a ViT classifier's input read 17 rows per example, not 1)."""
    return [sum(1 if h.per_example else _tokens_for(h.module, tokens) for h in g.hooks) if g.hooks else 1
            for g in spec.groups]


def solve_flops(widths: Sequence[int], columns: Sequence[int], parents: int = 2) -> float:
    """The solve's work in FLOPs, the unit `SOLVE_FACTOR` is fitted in: per group of width n with D weight
    columns, the weight correlation `[Z_A; Z_B]` product (2·(2n)²·D) and an O((2n)³) matching (N·n for N
    `parents`)."""
    return float(sum(2 * (parents * n) ** 2 * d + (parents * n) ** 3 for n, d in zip(widths, columns)))


def refit_bytes(layers: Sequence[tuple[int, int, float]], examples: int, parents: int, width: int,
                tokens: float, gram: bool = True) -> float:
    """The refit's memory on top of the merge's, in float32 values of `examples × tokens` rows stored by `BlockReplay`:
    the merged model's two block outputs and its units' outputs (the attention's, `width`, and the MLP hidden layer's,
    the widest layer output: `3·width + widest`). The ridge refit (`gram`) adds as much per parent (a parent replays
    the same units between the chunks of steps that split a block), the parents' targets it caches (at most
    `TARGET_CACHE_BYTES`, at least one layer's) and the widest layer's float64 Gram and cross-Gram; REPAIR (its
    parents run once for every layer) keeps two vectors per layer instead."""
    from hf_mudsc.apply.refit import TARGET_CACHE_BYTES

    one = 4.0 * examples * tokens
    widest = max((outputs for _, outputs, _ in layers), default=0)
    merged = one * (3 * width + widest)
    if not gram:
        return merged
    stored = (parents + 1) * merged
    targets = [4.0 * examples * rows * outputs for _, outputs, rows in layers]
    cached = max(min(sum(targets), TARGET_CACHE_BYTES), max(targets, default=0.0))
    grams = max((8.0 * unknowns * (unknowns + outputs) for unknowns, outputs, _ in layers), default=0.0)
    return cached + stored + grams


def refit_flops(layers: Sequence[tuple[int, int, float]], forward: float, examples: int, parents: int = 2,
                gram: bool = True) -> float:
    """The refit's work in float32 FLOPs over `examples`: each parent's forward once and the merged model's
    `REFIT_MERGED_FORWARDS` times, plus — for the ridge refit (`gram`), not REPAIR's per-unit moments — every layer's
    float64 Gram (`rows·u²` FLOPs by syrk, x2 for float64) and cross-Gram (`2·rows·u·out`, x2); `layers`: (unknowns
    u = inputs + bias, outputs, rows per example) of each refit layer."""
    per_example = (parents + REFIT_MERGED_FORWARDS) * forward
    if gram:
        per_example += sum(rows * (2 * unknowns**2 + 4 * unknowns * outputs) for unknowns, outputs, rows in layers)
    return examples * per_example


def solve_cache_bytes(widths: Sequence[int], parents: int) -> float:
    """What the α search's weight-correlation cache may hold: its budget (`hf_mudsc.solve.loop.weight_cache_bytes`)."""
    from hf_mudsc.solve.loop import weight_cache_bytes

    return float(weight_cache_bytes(widths, parents))


def average_check_possible(options: MergeOptions, num_parents: int, *, concatenated: bool, has_data: bool,
                           rereadable: bool) -> bool:
    """Whether `method="auto"` may hold its merge against plain averaging (`pipeline`: parents of one base, a
    concatenated head, a refit gate; the check builds the average, one more model): a dry run does not know the
    relation, so it counts the check whenever a same-base choice (`methods.auto.WITH_DATA`, or the correspondence
    check's own method when the units turn out not to correspond) would run the gate."""
    from hf_mudsc.methods.auto import CORRESPONDENCE_CHECK, WITH_DATA, refit_runs
    from hf_mudsc.methods.registry import METHODS
    from hf_mudsc.option_values import AVERAGE_CHECK_METHOD

    if not concatenated or not has_data or AVERAGE_CHECK_METHOD not in METHODS:
        return False
    candidates = [METHODS[name] for name in (*WITH_DATA["shared base"], CORRESPONDENCE_CHECK) if name in METHODS]
    return any(refit_runs(method, options.refit, has_data=True, num_parents=num_parents,
                          reference_compat=bool(options.reference_compat), rereadable=rereadable,
                          weights=options.weights) == "gate"
               for method in candidates if method.name != AVERAGE_CHECK_METHOD)


def _refit_copies(located: Sequence[Any], streaming: bool, refit: str) -> list[str]:
    """The letters of the model objects given that the refit runs as a deep copy (`apply.refit.copied_for_refit`: one
    holding some module of an earlier parent), less those the merge copies anyway to parent A's label order (their
    copy shares nothing): each is held once more while the refit runs. Parents named by reference load apart. None
    (empty) for a refit that replays no parent (`apply.refit.REPLAYING_REFITS`: REPAIR, no refit)."""
    if refit not in REFITTING:  # no refit runs: nothing of the refit's imported (torch)
        return []
    import torch

    from hf_mudsc.apply.refit import REPLAYING_REFITS, copied_for_refit
    from hf_mudsc.load.parents import unloaded

    if refit not in REPLAYING_REFITS:
        return []
    held = [(index, parent.model if parent.model is not None else (parent.loaded.model if parent.loaded else None))
            for index, parent in enumerate(located)]
    held = [(index, model) for index, model in held if isinstance(model, torch.nn.Module)]
    reordered = set(head_copies([unloaded(parent) for parent in located], streaming=streaming))
    letters = [parent_label(held[position][0]) for position in copied_for_refit([model for _, model in held])]
    return [letter for letter in letters if letter not in reordered]


def estimate_cost(*, widths: Sequence[int], columns: Sequence[int], group_tokens: Sequence[int],
                  linear_params: Mapping[str, int], tokens: Mapping[str, int], num_parameters: int,
                  rows: int | None, needs_statistics: bool, matmul_flops: float, solves: bool = True,
                  parents: int = 2, base: bool = False, copies: int = 0, whole: int | None = None,
                  multi_start: bool = False, alpha_search: bool = False, refit: str = "none",
                  refit_layers: Sequence[tuple[int, int, float]] = (), refit_examples: int = 0,
                  refit_memory: float = 0.0, data_pass_flops: float = 0.0, largest_tensor: int = 0,
                  method_bytes: float | None = None, reads_data: bool = False,
                  weight_cache_bytes: float = 0.0, average_check: bool = False) -> Estimate:
    """Time and peak memory of a merge (docs/design.md, "Dry run"):

    calibration s = rows × (2 × forward FLOPs + Σ_g tokens_g · 2·(2n_g)²) / (efficiency × matmul FLOP/s)
    solve s       = (SOLVE_FACTOR × Σ_g (2·(2n_g)²·D_g + (2n_g)³) + APPLY_FLOPS_PER_PARAMETER × parameters)
                    / matmul FLOP/s          (no solve term for methods without unit matching)
    peak bytes    = runtime + 2.5 × 2 × 4 × parameters + 1.25 × Σ_g 8·(2n_g)²   (statistics only with data)
                    + the refit's working set (`refit_memory`, `refit_bytes`) + 4 × parameters with the α search
                    + the α search's weight-correlation cache (`weight_cache_bytes`, `solve.loop.WEIGHT_CACHE_BYTES`)
    With `multi_start` the solve term is `MULTI_START_SOLVES` solves; `alpha_search` adds `ALPHA_SEARCH_SOLVES` solves
    and the candidates' held-out forwards (`len(ALPHA_GRID)` merged models and the parents on every
    `HOLDOUT_EVERY`-th row); `refit` ("ridge", "gate", "repair") adds `refit_flops` over `refit_examples` at
    `REFIT_EFFICIENCY` of the matmul rate (the gate: + the merged model before and after on the held-out rows).
    With N `parents` every 2 above is N (N forwards, `(N·n)²` statistics, N parents' weights). `whole`: the parents
    held whole (default all N) — a tensor-wise method streams the parents after the first (`pipeline.streams_parents`,
    the memory floor's `loading` rule), so their weights are one tensor at a time: not counted. A `base` loaded whole
    counts as one more parent's weights (as `memory_floor` counts it; a streamed base holds one tensor: nothing);
    `copies`: models copied whole to parent A's label order (`head_copies`, `base_copied`), 4 × parameters each.
    A method that reads the data itself adds `rows × data_pass_flops` (`MergeMethod.data_pass_flops`) at
    calibration's efficiency. `average_check`: the merge may hold its result against plain averaging at the end
    (`method="auto"`, a refit gate and a concatenated head: `pipeline`'s `plain_average`, `apply.refit_gate`), which
    builds one more model: + 4 × parameters.

    A method without unit matching (`solves` False) is counted by what it holds instead, the largest of three phases
    on top of the process (`PROCESS_BYTES`, + `DATA_READER_BYTES` when it `reads_data`) and the weights held (4 ×
    parameters per parent held whole, base and copy):
    relation check = + `RELATION_BYTES_PER_VALUE` × `largest_tensor` (+ 4 × `largest_tensor`: a streamed parent's
                     tensor)
    method         = + `method_bytes` (`MergeMethod.working_bytes`; default the merged tensors, 4 × parameters)
    build          = + 8 × parameters (the merged tensors and the merged model) + the refit's working set
    A unit-matching merge keeps the formula above unless the relation check holds more. `largest_tensor` 0: no
    relation check counted.
    """
    stats = statistics_bytes(widths, parents) if needs_statistics else 0.0
    calibration = 0.0
    if needs_statistics:
        per_example = parents * forward_flops(linear_params, tokens) + sum(
            t * 2 * (parents * n) ** 2 for n, t in zip(widths, group_tokens))
        calibration = (rows or 0) * per_example / (CALIBRATION_EFFICIENCY * matmul_flops)
    from hf_mudsc.apply.fidelity import ALPHA_GRID, HOLDOUT_EVERY

    one_solve = SOLVE_FACTOR * solve_flops(widths, columns, parents) if solves else 0.0
    starts = MULTI_START_SOLVES if multi_start and solves else 1.0
    solve = (starts * one_solve + APPLY_FLOPS_PER_PARAMETER * num_parameters) / matmul_flops
    forward = forward_flops(linear_params, tokens)
    held_out = (rows or 0) // HOLDOUT_EVERY
    alpha_seconds = 0.0
    if alpha_search and solves:  # the candidates' sweeps; each candidate and the parents scored on the held-out rows
        alpha_seconds = (ALPHA_SEARCH_SOLVES * one_solve
                         + (len(ALPHA_GRID) + parents) * held_out * forward) / matmul_flops
    refit_seconds = 0.0
    if refit != "none":
        work = refit_flops(refit_layers, forward, refit_examples, parents, gram=refit != "repair")
        if refit == "gate":  # the merged model before and after the refit scored on the held-out rows (+ the parents)
            work += (2 + (0 if alpha_search else parents)) * held_out * forward
        refit_seconds = work / (REFIT_EFFICIENCY * matmul_flops)
    held = parents if whole is None else whole
    refit_held = refit_memory if refit != "none" else 0.0
    process = PROCESS_BYTES + (DATA_READER_BYTES if reads_data else 0.0)
    weights = 4.0 * num_parameters * (held + int(base) + copies)
    relation = (process + weights + float(RELATION_BYTES_PER_VALUE) * largest_tensor
                + (4.0 * largest_tensor if held < parents else 0.0)) if largest_tensor else 0.0
    working = 0.0
    averaged = 4.0 * num_parameters if average_check else 0.0  # plain averaging built to hold the merge against
    if solves:
        peak = max(relation, RUNTIME_BYTES + WEIGHTS_FACTOR * (held + int(base)) * 4 * num_parameters
                   + copies * 4 * num_parameters + STATISTICS_FACTOR * stats + refit_held
                   + (4 * num_parameters if alpha_search else 0.0)  # a candidate merged model
                   + weight_cache_bytes + averaged)
    else:
        working = 4.0 * num_parameters if method_bytes is None else float(method_bytes)
        peak = max(relation, process + weights + working,
                   process + weights + 8.0 * num_parameters + refit_held + averaged)
    data_pass = (rows or 0) * data_pass_flops / (CALIBRATION_EFFICIENCY * matmul_flops)
    return Estimate(calibration_seconds=calibration, solve_seconds=solve, peak_memory_bytes=math.ceil(peak),
                    matmul_flops_per_second=matmul_flops, statistics_bytes=math.ceil(stats),
                    alpha_search_seconds=alpha_seconds, refit_seconds=refit_seconds,
                    refit_bytes=math.ceil(refit_memory) if refit != "none" else 0, data_pass_seconds=data_pass,
                    method_bytes=math.ceil(working))


# ------------------------------------------------------------------------------------------------ model facts


def tokens_per_example(config: Any) -> tuple[dict[str, int], bool]:
    """Tokens each example puts through each tower, by parameter-name prefix, and whether any was assumed.

    Vision: (image_size / patch_size)² patches + the class token. Text: `ASSUMED_TEXT_TOKENS`, capped by the
    model's position limit (the real length depends on the rows, which a dry run does not read)."""
    towers = {"vision": getattr(config, "vision_config", None), "text": getattr(config, "text_config", None)}
    if not any(towers.values()):
        count, assumed = _tower_tokens(config)
        return {"": count}, assumed
    tokens, assumed = {}, False
    for prefix, sub in towers.items():
        if sub is not None:
            tokens[f"{prefix}_model"], tower_assumed = _tower_tokens(sub)
            assumed = assumed or tower_assumed
    tokens[""] = 1  # projections and heads see one row per example
    return tokens, assumed


def batch_text_tokens(calibration: Any) -> int | None:
    """Tokens per example of calibration given as tokenized batches (`input_ids` of shape (rows, tokens)): their
    row-weighted mean length, padding included (the forwards compute it); None for anything else — a dataset's rows
    are not tokenized by a dry run."""
    if not isinstance(calibration, (list, tuple)) or not calibration:
        return None
    rows = tokens = 0
    for batch in calibration:
        ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
        shape = getattr(ids, "shape", None)
        if shape is None or len(shape) != 2:
            return None
        rows += int(shape[0])
        tokens += int(shape[0]) * int(shape[1])
    return math.ceil(tokens / rows) if rows else None


def _tower_tokens(config: Any) -> tuple[int, bool]:
    image, patch = getattr(config, "image_size", None), getattr(config, "patch_size", None)
    if isinstance(image, int) and isinstance(patch, int) and patch > 0:
        return (image // patch) ** 2 + 1, False
    limit = getattr(config, "max_position_embeddings", None)
    return (min(ASSUMED_TEXT_TOKENS, limit) if isinstance(limit, int) and limit > 0 else ASSUMED_TEXT_TOKENS), True


def meta_model(config: Any) -> Any:
    """The config's model with every tensor on the `meta` device: shapes without memory or weights."""
    from hf_mudsc.load.parents import meta_model as built

    return built(config)


class HeaderFacts(NamedTuple):
    """What a located parent's safetensors headers say."""

    data_bytes: int | None
    """Bytes of tensor data; None without headers."""
    dtypes: list[str]
    """The stored dtypes (safetensors names: `F32`, `BF16`)."""
    keys: list[str] | None = None
    """Every stored tensor's key, read from the Hub's headers (a local folder's are read by the loader's checks)."""
    shapes: dict[str, tuple[int, ...]] | None = None
    """Every stored tensor's shape by key (local and Hub headers alike)."""
    key_dtypes: dict[str, str] | None = None
    """Every stored tensor's dtype by key: `out_dtype` counts only those that load as weights (`weight_dtypes`)."""


def check_filled_weights(base: str, filled: Sequence[str], weights: Sequence[float] | None) -> None:
    """Refuse `weights` with which the parents' weighted mean — what fills the tensors `filled` a base lacks
    (`pipeline._check_base`; a base of another head class) — is no mean of these parents: divided by a sum of 0, or
    scaling a parent by more than ±`FACTOR_LIMIT`, the limit `linear` keeps (task arithmetic's [1, -0.995] filled
    the head with 200·h_A − 199·h_B). The merge and its dry run refuse alike, in one line naming the tensors."""
    from hf_mudsc.errors import MergeInputError, shown
    from hf_mudsc.option_values import FACTOR_LIMIT, WEIGHT_SUM_FLOOR

    if not filled or not weights:
        return
    lacks = (f"the base {base!r} lacks {len(filled)} tensor(s) the parents have ({', '.join(filled[:3])}"
             f"{' ...' if len(filled) > 3 else ''}), which are filled with the parents' weighted mean, but the weights "
             f"{shown(list(weights))}")
    fix = "or a base that holds those tensors (one of the parents' head class)"
    total = sum(weights)
    if abs(total) < WEIGHT_SUM_FLOOR:
        raise MergeInputError(f"{lacks} sum to 0; give {option_hint('weights')} with a non-zero sum, {fix}")
    worst = max((weight / total for weight in weights), key=abs)
    if abs(worst) > FACTOR_LIMIT:
        raise MergeInputError(f"{lacks} scale a parent by {worst:g} there, beyond ±{FACTOR_LIMIT:g} (divided by their "
                              f"sum {total:g}); give {option_hint('weights')} whose sum is farther from 0, {fix}")


def filled_tensors(base: Any, model_a: Any, spec: Any, *, token: str | bool | None) -> list[str]:
    """The parameters of parent A the merge fills with the parents' weighted mean because the located `base` lacks
    them, from its config and safetensors headers (no weights): those its checkpoint does not hold when read as
    the parents' class (`base.read_as`), and a head of another shape or other labels — as `pipeline._check_base`
    finds them once the base is loaded. Tensors of other shapes outside the head are the merge's refusal, not
    counted here."""
    from hf_mudsc.apply.classifier import same_head_labels
    from hf_mudsc.load.lazy import stored_keys
    from hf_mudsc.load.parents import meta_model as built

    absent: set[str] = set()
    if base.loaded is not None:
        model, absent = base.loaded.model, set(base.loaded.absent)
    elif base.model is not None:
        model = base.model
    else:
        model = built(base.config, base.read_as, reference=base.reference)
        if base.read_as is not None and base.folder is not None:
            facts = header_facts(base, token=token)
            keys = facts.keys if facts.keys is not None else list(facts.shapes or {})
            named = stored_keys(model, keys) if keys else None
            if named is not None:
                absent = {name for name, _ in model.named_parameters() if name not in named}
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters() if name not in absent}
    head = {spec.classifier.weight, spec.classifier.bias} if spec.classifier else set()
    dropped = {name for name, p in model_a.named_parameters()
               if shapes.get(name) != tuple(p.shape) and (name in head or name in absent)}
    if head - dropped and not same_head_labels(model_a.config, model.config):
        dropped |= head
    return [name for name, _ in model_a.named_parameters() if name in dropped]


def header_facts(parent: Any, *, token: str | bool | None) -> HeaderFacts:
    """What the safetensors headers of a located parent say; `HeaderFacts(None, [])` without them.

    Hub parents: the loader's `read_hub_headers` (a ranged GET of each file's first bytes); local folders and
    cached snapshots: `safe_open`, which maps the file and reads its header only."""
    files = [f for f in parent.weight_files if f.endswith((".safetensors", ".safetensors.index.json"))]
    if not files:
        return HeaderFacts(None, [])
    from huggingface_hub import constants

    if parent.repo_id is not None and not constants.HF_HUB_OFFLINE:
        from hf_mudsc.load.parents import read_hub_headers

        # the loader's reader: the same requests, and the same refusals in the same words, as the merge's
        headers = read_hub_headers(parent, token=token)
        tensors = {key: t for f in headers.values() for key, t in f.tensors.items()}
        return HeaderFacts(sum(t.data_offsets[1] - t.data_offsets[0] for t in tensors.values()),
                           sorted({t.dtype for t in tensors.values()}), list(tensors),
                           {key: tuple(t.shape) for key, t in tensors.items()},
                           {key: t.dtype for key, t in tensors.items()})
    return _local_header_facts(parent.folder, files)


def _local_header_facts(folder: Any, files: Sequence[str]) -> HeaderFacts:
    import json

    from safetensors import safe_open

    names: list[str] = []
    for name in files:
        if name.endswith(".index.json"):
            names += sorted(set(json.loads((Path(folder) / name).read_text())["weight_map"].values()))
        else:
            names.append(name)
    total, dtypes, shapes, key_dtypes = 0, set(), {}, {}
    for name in names:
        path = Path(folder) / name
        if not path.is_file():
            return HeaderFacts(None, [])
        with safe_open(str(path), framework="pt") as opened:
            for key in opened.keys():
                piece = opened.get_slice(key)
                shapes[key] = tuple(piece.get_shape())
                dtypes.add(piece.get_dtype())
                key_dtypes[key] = piece.get_dtype()
                total += math.prod(shapes[key]) * DTYPE_BYTES.get(piece.get_dtype(), 4)
    return HeaderFacts(total, sorted(dtypes), shapes=shapes, key_dtypes=key_dtypes)


# ---------------------------------------------------------------------------------------------------- the plan


def plan_merge(models: Sequence[Any], calibration: Any, options: MergeOptions, *, token: str | bool | None = None,
               matmul_flops: float | None = None, streams: Callable[[Any], bool] | None = None,
               check_columns: Callable[[Any, list[Any], Any], None] | None = None) -> MergePlan:
    """The dry run of `merge(models, calibration, **options)` (options already checked by merge()). `streams(method)`:
    whether the merge would read the parents after the first and the base one tensor at a time with that method
    (merge() hands `pipeline.streams_parents`; None: never). The base is found and refused as the merge finds and
    refuses it (`load.parents.locate_parents`), from configs and cards only. `check_columns(data, processors,
    model_a)`: the merge's check of the calibration columns before weights (merge() hands
    `pipeline.check_calibration_before_weights`), run on data at hand so the dry run refuses what the merge refuses."""
    import torch

    from hf_mudsc.apply.classifier import label_names, repeated_labels_message, same_label_sets
    from hf_mudsc.apply.dtype import resolve_out_dtype
    from hf_mudsc.architectures import spec_for
    from hf_mudsc.diagnostics import (
        calibration_size_warning,
        default_labels_warning,
        inert_options_warnings,
        relation_warning,
        unread_options,
        unread_options_warning,
        unread_warning,
    )
    from hf_mudsc.errors import LoadError, MergeInputError
    from hf_mudsc.load.parents import check_parameter_names, dtype_description, locate_parents, unloaded
    from hf_mudsc.methods.auto import (
        ALPHA_HANDED,
        CORRESPONDENCE_CHECK,
        alpha_searched,
        check_choices,
        handed_options,
        is_auto,
        planned_method,
        possible_methods,
    )
    from hf_mudsc.methods.registry import check_classifier, get_method

    automatic = is_auto(options.method)
    method = planned_method(calibration is not None) if automatic else get_method(options.method)
    refit = resolve_refit(  # as the merge resolves it: a one-shot iterator cannot be read again for a refit
        options.refit, matches_units=method.matches_units, has_data=calibration is not None, num_parents=len(models),
        reference_compat=bool(options.reference_compat), reads_data=method.needs_data, weights=options.weights,
        rereadable=not isinstance(calibration, Iterator))
    needs_data = method.needs_calibration or method.needs_data or refit in REFITTING
    calibration_plan = None
    if method.needs_gradients:  # the merge's refusal (`pipeline`), before anything is read: only objects can hold them
        from hf_mudsc.load.checks import check_gradients_possible
        from hf_mudsc.load.parents import LoadedParent

        held = [(index, model.model if isinstance(model, LoadedParent) and model.parameters is None else model)
                for index, model in enumerate(models)]
        check_gradients_possible([(f"parent {parent_label(index)}", model) for index, model in held
                                  if isinstance(model, torch.nn.Module)], method.name)
    located, located_base, base_source = locate_parents(
        list(models), options.base, base_needed_for=None if automatic or not method.needs_base_model else method.name,
        token=token, allow_pickle=options.allow_pickle)
    streaming = streams is not None and streams(method)
    base_whole = located_base is not None and base_loaded_whole(
        options.base if options.base is not None else located_base.reference, method, streaming=streaming)
    base_copy = located_base is not None and located_base.read_as is None and base_copied(
        unloaded(located_base), unloaded(located[0]), streaming=streaming)
    copies = len(head_copies([unloaded(parent) for parent in located], streaming=streaming)) + int(base_copy)
    # parent A, model objects (in memory already) and parents not streamed are held whole, as `memory_floor` counts
    whole = 1 + sum(_held_whole(unloaded(parent), streaming) for parent in located[1:])
    parents, models_meta = [], []
    header_keys: list[list[str] | None] = []
    from hf_mudsc.load.parents import check_local_pickle_weights

    # As the merge's header pass: a pickle that would run code is refused (it is never unpickled but weights-only).
    unjudged = [parent.reference for parent in [*located, *([located_base] if located_base is not None else [])]
                if not check_local_pickle_weights(parent)]
    for parent in located:
        model = parent.model if parent.model is not None else (parent.loaded.model if parent.loaded else None)
        if model is None:
            model = meta_model(parent.config)
        models_meta.append(model)
        facts = header_facts(parent, token=token) if parent.folder is not None else HeaderFacts(None, [])
        data_bytes, dtypes = facts.data_bytes, facts.dtypes
        if facts.key_dtypes and model.device.type == "meta":  # as the merge: only the tensors that load as weights
            from hf_mudsc.load.parents import weight_dtypes

            dtypes = sorted(set(weight_dtypes(model, facts.key_dtypes)))
        header_keys.append(facts.keys)
        if facts.shapes and model.device.type == "meta" and parent.read_as is None:  # built from its config
            from hf_mudsc.load.parents import weights_refusal

            refusal = weights_refusal(parent.reference, model, facts.shapes, parent.weight_files[0])
            if refusal is not None:
                raise LoadError(refusal)
        logger.debug("%s: %s, weight files %s, %s bytes of tensor data %s", parent.reference,
                     parent.commit_sha or "local", parent.weight_files, data_bytes, dtypes)
        if model.device.type != "meta" and not dtypes:
            dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
        parents.append(ParentPlan(
            reference=parent.reference, repo_id=parent.repo_id, commit_sha=parent.commit_sha,
            architecture=type(model).__name__, num_parameters=sum(p.numel() for p in model.parameters()),
            weight_files=list(parent.weight_files), weight_bytes=data_bytes, dtypes=dtypes))
    if any(keys is not None for keys in header_keys):  # Hub parents' names, from the headers just read
        check_parameter_names(located, keys=header_keys)
    out_dtype, out_dtype_reason = resolve_out_dtype(
        options.out_dtype, [dtype_description(TORCH_DTYPE_NAMES.get(d, d) for d in p.dtypes) for p in parents],
        [parent_label(i) for i in range(len(parents))], [parent.model is not None for parent in located])
    config = located[0].config
    spec = spec_for(models_meta[0])
    # parents of different label sets: the merged head is their heads side by side (as `pipeline.merge` decides)
    concatenated = spec.classifier is not None and not same_label_sets([m.config for m in models_meta])
    if located_base is not None:  # the merge's refusal of weights that fill what the base lacks (`_check_base`)
        filled = filled_tensors(located_base, models_meta[0], spec, token=token)
        if concatenated:  # each parent's own head rows, no mean
            filled = [n for n in filled if n not in (spec.classifier.weight, spec.classifier.bias)]
        check_filled_weights(located_base.reference, filled, options.weights)
    tokens, assumed = tokens_per_example(config)
    counted = batch_text_tokens(calibration)
    if assumed and counted is not None:  # only text is ever assumed: tokenized batches say how long theirs are
        tokens["text_model" if "text_model" in tokens else ""], assumed = counted, False
    if needs_data:
        processors = [parent.loaded.processor if parent.loaded is not None else parent.processor
                      for parent in located]
        calibration_plan = _calibration_plan(
            calibration, options, tokens, assumed, token=token,
            check=None if check_columns is None else lambda data: check_columns(data, processors, models_meta[0]))
    shapes = {name: tuple(p.shape) for name, p in models_meta[0].named_parameters()}
    if not automatic:  # what the merge refuses from the architecture and shapes before weights
        check_classifier(method, models_meta[0])
        method.check_shapes(options, lambda: shapes)
    # the merge's refusal for want of memory, before weights (`pipeline.check_before_weights`), with its arguments:
    # a dry run's job is to say whether the merge would run. A warning, not a refusal: the plan (its peak memory
    # estimate, which the refusal points to) is what the user reads to decide what to change
    references = sum(isinstance(m, (str, os.PathLike)) for m in models)
    memory_refusal = None
    try:
        check_memory(models_meta[0], len(models), None if automatic else method,
                     loading=min(references, 1) if streaming else references,
                     copied=head_copies([unloaded(parent) for parent in located], streaming=streaming),
                     base=base_whole, base_copy=base_copy)
    except MergeInputError as refusal:
        memory_refusal = f"the merge would refuse at once: {refusal}"
    embeddings = {f"{name}.weight" for name, module in models_meta[0].named_modules()
                  if isinstance(module, torch.nn.Embedding)}
    linear = {name: _numel(shape) for name, shape in shapes.items() if len(shape) >= 2 and name not in embeddings}
    widths = [g.width for g in spec.groups]
    columns = [sum(_numel(shapes[m.param]) // g.width for m in g.members if m.param in shapes) for g in spec.groups]
    group_tokens = group_tokens_per_example(spec, tokens)
    rows = calibration_plan.rows if calibration_plan is not None else None
    refitted, refit_examples = _refit_shapes(models_meta[0], spec, options, refit, tokens, rows)
    residual = max((getattr(sub, "hidden_size", 0) or 0 for sub in (
        config, getattr(config, "text_config", None), getattr(config, "vision_config", None)) if sub is not None),
        default=0)
    refit_memory = refit_bytes(refitted, refit_examples, len(models), residual, max(tokens.values()),
                               gram=refit != "repair") if refitted else 0.0
    counted = weight_tokens(spec, shapes, tokens)  # rows per example of each weight, for the FLOPs
    facts = _pass_facts(models_meta[0], spec, shapes, linear, counted, parents[0].num_parameters)
    searched = not automatic and alpha_searched(method, options, len(models))
    identical = _identical_weights(located, token=token)  # the same model: no averaging check (no shared base)
    estimate = estimate_cost(
        widths=widths, columns=columns, group_tokens=group_tokens, linear_params=linear, tokens=counted,
        num_parameters=parents[0].num_parameters, rows=rows, needs_statistics=method.needs_calibration,
        matmul_flops=matmul_flops or matmul_rate(), solves=method.matches_units, parents=len(models),
        base=base_whole, copies=copies + len(_refit_copies(located, streaming, refit)),
        whole=whole, multi_start=not options.reference_compat,
        alpha_search=searched, refit=refit,
        refit_layers=refitted, refit_examples=refit_examples, refit_memory=refit_memory,
        data_pass_flops=method.data_pass_flops(facts, len(models)) if method.needs_data else 0.0,
        largest_tensor=max(map(_numel, shapes.values()), default=0),
        method_bytes=None if method.matches_units else method.working_bytes(facts, len(models)),
        reads_data=needs_data,
        weight_cache_bytes=solve_cache_bytes(widths, len(models)) if searched else 0.0,
        average_check=automatic and not identical and average_check_possible(
            options, len(models), concatenated=concatenated, has_data=calibration is not None,
            rereadable=not isinstance(calibration, Iterator)))
    warnings = [memory_refusal] if memory_refusal is not None else []
    warnings += [f"{reference!r}: its pickle weights were not checked (a dry run downloads no weights); the merge "
                 "reads them weights-only and refuses one that would run code" for reference in unjudged]
    if calibration_plan is not None and rows is not None and method.needs_calibration:
        from hf_mudsc.apply.fidelity import HOLDOUT_EVERY

        # the α search holds every HOLDOUT_EVERY-th example out of the statistics (`fidelity.holdout_split`): under
        # auto too, when the method planned (the one the warning is of) searches
        held_out = alpha_searched(method, options, len(models))
        read = rows - rows // HOLDOUT_EVERY if held_out else rows
        text = calibration_size_warning({g.name: read * t for g, t in zip(spec.groups, group_tokens)},
                                        dict(zip((g.name for g in spec.groups), widths)), len(models))
        if text and automatic:  # the merge warns only if auto keeps the unit matching (it drops the statistics else)
            text = (f"if method auto chooses {method.name} (for parents whose units must be matched: of different "
                    "initializations, permuted copies, or fine-tunes of one base whose units do not correspond on the "
                    f"data), the merge warns: {text}")
        if text:
            warnings.append(text)
    if located_base is not None:  # the merge's refusal of a base that is a parent (`pipeline.check_base_not_a_parent`)
        warnings += _base_is_a_parent(located_base, located, method, automatic, calibration is not None, token=token)
    configs = [parent.config for parent in located]
    repeated = repeated_labels_message(configs) if spec.classifier is not None else None
    if repeated is not None:  # the merge's refusal before weights (`pipeline.check_label_names`)
        raise MergeInputError(repeated)
    if not identical and spec.classifier is not None and same_label_sets(configs):  # the same model: one task
        text = default_labels_warning([label_names(c) for c in configs])
        if text:
            warnings.insert(0, text)
    if identical:
        warnings.insert(0, relation_warning("same model", method))
    handed = handed_options(options, len(models))
    if automatic:  # options no method `auto` may choose reads: the merge will say so of the one it chooses
        possible = possible_methods(has_data=calibration is not None, has_base=options.base is not None)
        unread = [set(unread_options(options, m.used_options(handed), read=m.read_as_default(options)))
                  for m in possible]
        common = [name for name in unread_options(options, {}) if unread and all(name in u for u in unread)]
        if text := unread_warning(common, "auto (whichever method it chooses)"):
            warnings.append(text)
        inert = [inert_options_warnings(options, method=m.name, reads_base=m.needs_base_model,
                                        reads_data=m.needs_calibration or m.needs_data or planned in REFITTING,
                                        has_data=calibration is not None, refit=planned,
                                        pairs_heads=m.pairs_attention_heads, inputs=spec.inputs)
                 for m, planned in ((m, resolve_refit(options.refit, matches_units=m.matches_units,
                                                      has_data=calibration is not None, num_parents=len(models),
                                                      reference_compat=bool(options.reference_compat),
                                                      reads_data=m.needs_data, weights=options.weights))
                                    for m in possible)]
        warnings += [text for text in inert[0] if all(text in other for other in inert[1:])] if inert else []
        # choices that would refuse these options (merge() refused them at once when every choice does)
        warnings += check_choices(options, len(models), has_data=calibration is not None,
                                  has_base=options.base is not None)
    else:  # what the merge will say of options that change nothing, said before it runs
        used = refit_read_options(method.used_options(handed), options, refit)  # as the merge records them
        warnings += [text for text in (unread_options_warning(options, used, method.name,
                                                              read=method.read_as_default(options)),
                                       *inert_options_warnings(options, method=method.name,
                                                               reads_base=method.needs_base_model,
                                                               reads_data=needs_data,
                                                               has_data=calibration is not None, refit=refit,
                                                               pairs_heads=method.pairs_attention_heads,
                                                               inputs=spec.inputs),
                                       *method.option_warnings(options, len(models)))
                     if text]
    relation = (f"same class and configuration ({parents[0].architecture})"
                + ("; identical weight files (the same model)" if identical else "")
                + "; the weight-based relation check (shared base, permuted copy, independent, protected) runs "
                "at merge time")
    keywords = options.values(recipe=True)
    if not automatic and options.alpha == AUTO and not alpha_searched(method, options, len(models)):
        keywords["alpha"] = ALPHA_HANDED  # as the merge's recipe records it: no search runs for this method
    keywords["base"] = None if located_base is None else _pinned(located_base)  # pinned, found from cards too
    keywords["out_dtype"] = out_dtype  # resolved as the merge resolves it, from the parents' stored dtypes
    if not automatic:  # the refit the method runs, as its recipe records it (auto's method is chosen at merge time)
        keywords["refit"] = refit if refit in REFITTING else "none"
    size_budget = None
    if method.supports_size:
        from hf_mudsc.solve.widen import check_spend, plan_budget, unspent_stream_warning

        # Shapes are all the count needs: the meta parameters stand in for the weights.
        metas = [dict(model.named_parameters()) for model in models_meta]
        check_spend(spec, options.size, options.size_spend)
        size_plan = plan_budget(spec, metas, options.size, options.size_spend, concatenate_classifier=concatenated)
        size_budget = size_plan.as_config()
        if unspent := unspent_stream_warning(spec, size_plan, options.size_spend):
            warnings.append(unspent)
    # with data (not under reference_compat), a same-base choice is confirmed by the unit matching's solve (§4.8)
    confirmed = (f" and {CORRESPONDENCE_CHECK}'s unit matching on the calibration data"
                 if calibration is not None and not options.reference_compat else "")
    method_label = (f"auto (chosen at merge time from the parents' weights{confirmed}; estimated as {method.name})"
                    if automatic else method.name)
    plan = MergePlan(parents=parents, relation=relation, method=method_label,
                     matcher=method.used_matcher(options.matcher), groups=[
                         GroupPlan(g.name, g.width, g.num_heads) for g in spec.groups],
                     calibration=calibration_plan, estimate=estimate, warnings=warnings,
                     options={k: v for k, v in keywords.items() if k != "calibration"},
                     out_dtype=out_dtype, out_dtype_reason=out_dtype_reason, size_budget=size_budget,
                     base=None if located_base is None else _pinned(located_base), base_source=base_source,
                     base_loaded_whole=base_whole)
    logger.info("dry run: %d groups, estimate %.1f s, peak %.2f GB", len(plan.groups), estimate.seconds,
                estimate.peak_memory_bytes / 1e9)
    return plan


def _pass_facts(model: Any, spec: Any, shapes: Mapping[str, tuple[int, ...]], linear: Mapping[str, int],
                tokens: Mapping[str, int], parameters: int) -> Any:
    """`PassFacts` of parent A (a weightless model; `linear`: its matrix weights' sizes, as `forward_flops` reads them)
    for a method's own data pass (`MergeMethod.data_pass_flops`) and what it holds (`MergeMethod.working_bytes`)."""
    from torch import nn

    from hf_mudsc.methods.registry import PassFacts
    from hf_mudsc.solve.regmean import transformer_blocks

    head = spec.classifier.weight if spec.classifier is not None else None
    blocks = transformer_blocks(model)
    layers = tuple((module.in_features, module.out_features,
                    next((index for index, block in enumerate(blocks) if name.startswith(block + ".")), None))
                   for name, module in model.named_modules() if isinstance(module, nn.Linear))
    return PassFacts(forward=forward_flops(linear, tokens),
                     grams=float(sum(4 * _tokens_for(name, tokens) * shapes[name][1] ** 2
                                     for name in linear if len(shapes[name]) == 2)),
                     parameters=parameters, classes=shapes[head][0] if head in shapes else 0,
                     blocks=len(blocks), layers=layers)


def _refit_shapes(model: Any, spec: Any, options: MergeOptions, refit: str, tokens: Mapping[str, int],
                  rows: int | None) -> tuple[list[tuple[int, int, float]], int]:
    """The refit's layers as (unknowns, outputs, rows per example) and the examples it would read, as the merge
    resolves them (`refit_samples`, "auto" from the layers' shapes; the gate fits on the rows not held out), from
    `model`'s shapes; ([], 0) without a refit. Every layer but the classifier is counted per token."""
    if refit not in REFITTING:
        return [], 0
    from hf_mudsc.apply.fidelity import HOLDOUT_EVERY
    from hf_mudsc.apply.refit import auto_refit_samples, refit_layers
    from hf_mudsc.apply.repair import AUTO_SAMPLES as REPAIR_AUTO_SAMPLES

    modules = dict(model.named_modules())
    head = spec.classifier.weight.removesuffix(".weight") if spec.classifier is not None else None
    layers = []
    for name in refit_layers(model, spec, norms=bool(options.refit_norms) and refit != "repair"):
        module = modules[name]
        if hasattr(module, "in_features"):
            per_example = 1 if name == head else _tokens_for(f"{name}.weight", tokens)
            layers.append((module.in_features + int(module.bias is not None), module.out_features, per_example))
    if options.refit_samples != AUTO:
        examples = options.refit_samples or rows or 0
    elif refit == "repair":
        examples = REPAIR_AUTO_SAMPLES
    else:
        examples = auto_refit_samples((unknowns, per_example) for unknowns, _, per_example in layers)
    fitted_rows = None if rows is None else (rows - rows // HOLDOUT_EVERY if refit == "gate" else rows)
    return layers, examples if fitted_rows is None else min(examples, fitted_rows)


def _pinned(located: Any) -> str:
    """`org/name@<commit sha>` for a Hub base, its reference otherwise (as the merge's recipe pins it)."""
    return f"{located.repo_id}@{located.commit_sha}" if located.repo_id and located.commit_sha else located.reference


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _calibration_plan(calibration: Any, options: MergeOptions, tokens: Mapping[str, int], assumed: bool, *,
                      token: str | bool | None, check: Callable[[Any], None] | None = None) -> CalibrationPlan:
    """The rows the merge would read: the split opened (not read) for a spec, counted for objects. `check(data)`
    refuses columns the parents cannot read, run on a `datasets` object or local data only — a Hub spec would
    have to be downloaded (the plan then says its columns were not checked)."""
    import datasets

    from hf_mudsc.calibrate.dataset_spec import DatasetSpec
    from hf_mudsc.calibrate.datasets import load_calibration_dataset, pin_calibration_revision
    from hf_mudsc.load.references import pinned_calibration

    if calibration is None:
        from hf_mudsc.errors import MergeInputError

        raise MergeInputError(f"method {options.method!r} needs calibration data; pass calibration (CLI: "
                              "--calibration) or another method (CLI: --method)")
    source = "dataset"
    available: int | None = None
    in_memory = (datasets.Dataset, datasets.IterableDataset, datasets.DatasetDict, datasets.IterableDatasetDict)
    at_hand = isinstance(calibration, in_memory)  # an object given: its columns are known without a download
    unchecked = "a dataset that is not local is not downloaded by a dry run; the merge checks them before weights"
    if isinstance(calibration, (list, tuple)):
        unchecked = "batches are checked as the merge reads them"
    if isinstance(calibration, (str, os.PathLike)):
        at_hand = DatasetSpec.parse(calibration).local
        spec = pin_calibration_revision(os.fspath(calibration), token=token)
        source = str(pinned_calibration(spec))
        calibration = load_calibration_dataset(spec, token=token)
    if isinstance(calibration, (datasets.DatasetDict, datasets.IterableDatasetDict)) and len(calibration) == 1:
        calibration = next(iter(calibration.values()))  # its one split is read (several: refused by `check`)
    if isinstance(calibration, datasets.Dataset):
        available = len(calibration)
    elif isinstance(calibration, datasets.IterableDataset):
        splits = getattr(calibration.info, "splits", None) or {}
        split = splits.get(str(calibration.split)) if calibration.split is not None else None
        available = getattr(split, "num_examples", None) or None
    elif isinstance(calibration, (list, tuple)):
        source = f"{len(calibration)} batches"
        available = sum(_batch_rows(batch) for batch in calibration)
    rows = available
    if options.num_samples is not None:
        rows = options.num_samples if available is None else min(options.num_samples, available)
    if rows is None:
        logger.info("calibration rows unknown until read; %s caps them", option_hint("num_samples"))
    checked = at_hand and check is not None
    if checked:
        check(calibration)
    text_tokens = max(tokens.values()) if tokens else 1
    return CalibrationPlan(source=source, rows_available=available, rows=rows,
                           tokens_per_example=text_tokens, tokens_assumed=assumed, columns_checked=checked,
                           columns_unchecked_reason="" if checked else unchecked)


def _batch_rows(batch: Any) -> int:
    for value in (batch.values() if isinstance(batch, Mapping) else ()):
        shape = getattr(value, "shape", None)
        if shape is not None and len(shape) > 0:
            return int(shape[0])
    return 0


def _base_is_a_parent(located_base: Any, located: Sequence[Any], method: Any, automatic: bool, has_data: bool, *,
                      token: str | bool | None) -> list[str]:
    """A base whose weight files are a parent's (`_identical_weights`) is refused for a method that reads the base,
    as the merge refuses it from the weights; for `auto`, a warning: it reads the base only if it chooses a
    same-base method (e.g. ties, for fine-tunes of one base without data)."""
    from hf_mudsc.errors import MergeInputError
    from hf_mudsc.load.relation import base_is_a_parent
    from hf_mudsc.methods.auto import possible_methods

    same = [parent_label(index) for index, parent in enumerate(located)
            if _identical_weights([located_base, parent], token=token)]
    if not same:
        return []
    name = located_base.repo_id or located_base.reference
    if not automatic:
        if method.needs_base_model:
            raise MergeInputError(base_is_a_parent(name, same, method.name, "(the same weight files)"))
        return []
    reading = [m.name for m in possible_methods(has_data=has_data, has_base=True) if m.needs_base_model]
    if not reading:
        return []
    return [f"if method auto chooses {' or '.join(reading)} (for fine-tunes of one base), the merge is refused: "
            + base_is_a_parent(name, same, reading[0], "(the same weight files)")]


def _identical_weights(located: Sequence[Any], *, token: str | bool | None) -> bool:
    """Whether the parents' weight files are one and the same: the same local file, or Hub files with equal
    content hashes (ETags) — no download; different local files are not compared (that would read them)."""

    from huggingface_hub import constants

    if any(not p.weight_files or p.folder is None for p in located):
        return False
    files = [Path(p.folder) / p.weight_files[0] for p in located]
    if all(f.is_file() for f in files) and all(os.path.samefile(files[0], f) for f in files[1:]):
        return True
    if constants.HF_HUB_OFFLINE or any(p.repo_id is None for p in located):
        return False
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    etags = []
    for parent in located:
        url = hf_hub_url(parent.repo_id, parent.weight_files[0], revision=parent.commit_sha)
        etags.append((parent.weight_files[0], get_hf_file_metadata(url, token=token).etag))
    return len(set(etags)) == 1 and not etags[0][0].endswith(".index.json")
