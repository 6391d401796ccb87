"""The permutation spec: which tensor axes carry which unit space, as plain data.

The solver reads only this (never module classes), so one solver serves every architecture, and a
missing tensor cannot hide: `PermutationSpec.validate` insists that every parameter of the model is
either in a group or explicitly declared averaged.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from hf_mudsc.errors import SpecError

Role = Literal["in", "out"]




@dataclass(frozen=True)
class Member:
    """One tensor axis that carries a group's units.

    `out`: the axis produces the units (weight rows, biases, norm parameters, embeddings);
    `in`: the axis consumes them (weight columns). `ignore` keeps the tensor out of the weight
    similarity (e.g. running statistics) while still transforming it.
    """

    param: str
    axis: int
    role: Role
    ignore: bool = False


@dataclass(frozen=True)
class HookPoint:
    """Where a group's activations are read: the input or output of a named module.

    Features have shape `(..., width)`; every leading position becomes a sample. `attr` picks a field
    of a structured output (e.g. `pooler_output`). `mask` names the calibration batch key of a
    `(batch, tokens)` 0/1 mask whose zero positions (padding) are dropped from per-token features.
    `per_example`: the features are one row per example (the first token, a pooled output), not one per token — what
    a dry run counts as the group's calibration rows (`hf_mudsc.plan.group_tokens_per_example`), which it cannot see.
    """

    module: str
    where: Literal["input", "output"] = "input"
    attr: str | None = None
    mask: str | None = None
    per_example: bool = False


@dataclass(frozen=True)
class Group:
    """One shared unit space of width `width` (e.g. the residual stream, one block's MLP layer).

    `num_heads > 1`: the units are `num_heads` contiguous blocks that may only be matched inside a
    matched head pair. Groups with the same `head_tie` (the q/k and v groups of one attention block)
    must use one head pairing, otherwise attention patterns and values are paired with different heads.
    `width_key`: the config attribute (dotted for a sub-config, e.g. `vision_config.intermediate_size`) that sets
    this group's width in a stock model class; a merge with a size budget may widen only such groups, all groups
    of one key by the same amount (docs/design.md §4.12).
    """

    name: str
    width: int
    members: tuple[Member, ...]
    hooks: tuple[HookPoint, ...]
    num_heads: int = 1
    head_tie: str | None = None
    width_key: str | None = None

    @property
    def is_attention(self) -> bool:
        """An attention block's q/k or v group (it has a head tie), also with a single head (`num_heads == 1`)."""
        return self.head_tie is not None


@dataclass(frozen=True)
class Classifier:
    """A classification head whose rows are labels (concatenated, not merged, when label sets differ)."""

    weight: str
    bias: str | None = None


@dataclass(frozen=True)
class Stream:
    """The config attributes of a residual stream a size budget may widen (docs/design.md §4.12): by whole attention
    heads (`size_spend="heads"`: the stock class derives `head_dim = width / heads`, so the stream — the group named
    `group` — and every attention group (`num_heads > 1`) grow together by `k · head_dim`
    units and the config gains `k` heads), or alone (`"residual"`: the config pins `head_dim_key`)."""

    width_key: str = "hidden_size"
    heads_key: str = "num_attention_heads"
    head_dim_key: str = "head_dim"
    """The attribute the stock class reads for the head size when the stream is wider than its heads
    (`size_spend="residual"`)."""
    group: str = "residual"


@dataclass(frozen=True)
class PermutationSpec:
    """All groups of a model, in solve order (residual stream first, then per block q/k, v, MLP)."""

    groups: tuple[Group, ...]
    averaged: tuple[str, ...] = ()
    classifier: Classifier | None = None
    family: str = ""
    inputs: tuple[str, ...] = ()
    stream: Stream | None = None
    """How a stock config sets the residual stream's width, if a size budget may widen it (ViT only so far)."""
    max_tokens: int | None = None
    """The most tokens one text input may hold (the rows of its position table a sequence reaches: RoBERTa's start
    after its padding id), for a model that reads text: raw text is cut to it, longer tokenized batches refused."""
    _axes: Mapping[str, tuple[tuple[int, Member], ...]] = field(default=None, repr=False, compare=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        axes: dict[str, list[tuple[int, Member]]] = defaultdict(list)
        for index, group in enumerate(self.groups):
            for member in group.members:
                axes[member.param].append((index, member))
        object.__setattr__(self, "_axes", {name: tuple(v) for name, v in axes.items()})

    def axes_of(self, param: str) -> tuple[tuple[int, Member], ...]:
        """The inverse map: every (group index, member) acting on `param`'s axes."""
        return self._axes.get(param, ())

    @property
    def grouped_params(self) -> tuple[str, ...]:
        return tuple(self._axes)

    def group_index(self, name: str) -> int:
        for index, group in enumerate(self.groups):
            if group.name == name:
                return index
        raise KeyError(name)

    def without_weight_similarity(self, params: Iterable[str]) -> PermutationSpec:
        """A copy in which every member on `params` is `ignore`d: still transformed, never correlated.

        For tensors whose rows do not correspond between the two models (e.g. classifiers over different
        label sets), so their columns cannot be stacked as `[Z_A; Z_B]` for the weight similarity.
        """
        names = set(params)
        groups = tuple(
            replace(group, members=tuple(replace(m, ignore=True) if m.param in names else m for m in group.members))
            for group in self.groups
        )
        return replace(self, groups=groups)

    def head_ties(self) -> dict[str, list[int]]:
        """Tie key -> indices of the groups that must share one head pairing."""
        ties: dict[str, list[int]] = defaultdict(list)
        for index, group in enumerate(self.groups):
            if group.head_tie is not None:
                ties[group.head_tie].append(index)
        return dict(ties)

    def validate(self, params: Mapping[str, torch.Tensor], modules: Iterable[str] | None = None) -> None:
        """Check the spec against a model's named parameters (and module names, for hook points).

        Raises `SpecError` naming every problem at once: wrong widths, unknown tensors, tensors
        counted twice on one axis, and parameters that are in no group and not declared averaged.
        """
        problems: list[str] = []
        absent: list[str] = []  # a spec parameter the model lacks, once per problem naming it
        seen_axes: set[tuple[str, int]] = set()
        for group in self.groups:
            if group.width <= 0:
                problems.append(f"group {group.name!r} has width {group.width}")
            if group.num_heads < 1 or group.width % group.num_heads:
                problems.append(f"group {group.name!r}: width {group.width} not divisible by {group.num_heads} heads")
            if not group.hooks:
                problems.append(f"group {group.name!r} has no activation hook point")
            for member in group.members:
                tensor = params.get(member.param)
                if tensor is None:
                    problems.append(f"group {group.name!r}: no parameter {member.param!r}")
                    absent.append(member.param)
                    continue
                if not -tensor.dim() <= member.axis < tensor.dim():
                    problems.append(f"group {group.name!r}: {member.param!r} has no axis {member.axis}")
                    continue
                axis = member.axis % tensor.dim()
                if tensor.shape[axis] != group.width:
                    problems.append(
                        f"group {group.name!r} (width {group.width}): {member.param!r} axis {axis} "
                        f"has size {tensor.shape[axis]}"
                    )
                if (member.param, axis) in seen_axes:
                    problems.append(f"{member.param!r} axis {axis} is in more than one group")
                seen_axes.add((member.param, axis))
        if modules is not None:
            module_names = set(modules)
            for group in self.groups:
                for hook in group.hooks:
                    if hook.module not in module_names:
                        problems.append(f"group {group.name!r}: hook module {hook.module!r} does not exist")
        declared = set(self.grouped_params) | set(self.averaged)
        for name in self.averaged:
            if name not in params:
                problems.append(f"averaged parameter {name!r} does not exist")
                absent.append(name)
        unplaced = tuple(name for name in params if name not in declared)
        for name in unplaced:
            problems.append(f"parameter {name!r} is in no group and not declared averaged")
        if self.classifier is not None:
            for name in (self.classifier.weight, self.classifier.bias):
                if name is not None and name not in params:
                    problems.append(f"classifier parameter {name!r} does not exist")
                    absent.append(name)
        if problems:
            raise SpecError(
                f"the {self.family or 'model'} permutation spec does not fit the model:\n  - "
                + "\n  - ".join(problems),
                unplaced=unplaced, problems=tuple(problems), absent=tuple(absent),
            )
