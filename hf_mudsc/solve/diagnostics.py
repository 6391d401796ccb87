"""How well the parents' units matched, per group: what the plots and `hf-mudsc inspect` show (docs/design.md §8c).

Computed once at merge time from the final matches, while the activation correlations are still in memory, and
kept small enough to store next to the model (`merge_diagnostics.json`): per group the mean activation, weight and
blended correlation of the fused (A unit, B unit) pairs, the share of merged units that fuse both parents, the
head pairing with each head pair's score, and for a few groups a sampled block of the similarity in matched order.

The dataclasses are torch-free (`inspect` reads them without importing torch); `compute_diagnostics` imports torch.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from hf_mudsc.solve.matchers import Match
    from hf_mudsc.spec import PermutationSpec

DIAGNOSTICS_FILENAME = "merge_diagnostics.json"
PLOTS_FOLDER = "plots"  # the PNGs drawn from the diagnostics, next to the model: DIR/plots/*.png
#: The newest format of `merge_diagnostics.json`. 2: a group's `head_pairing` may hold null (an A head whose pair
#: `size_spend="heads"` kept apart), which a version-1 reader refuses; a file without such a null is written as
#: format 1, readable by older hf-mudsc as before. `READ_FORMATS`: what this version reads.
FORMAT_VERSION = 2
READ_FORMATS = (1, 2)
#: Units shown per heat map side: a sample of evenly spaced merged units (whole matrices of a ViT-B MLP group are
#: 6144 x 6144 — far too large to store, and pooling would wash out the diagonal of matched pairs).
HEATMAP_UNITS = 40
#: Heat maps kept: the first, middle and last group in solve order and the worst-matched one (when distinct).
HEATMAP_GROUPS = 4
#: The chance level of a group's correlations: their mean over (A unit, B unit) pairs drawn at random, fused or not
#: — every pair when a group has at most this many, else this many drawn with `BASELINE_SEED` (`O(pairs · D)`, as
#: the fused pairs'). Needed to read the fused pairs' mean: the residual group's weight rows share the LayerNorm
#: gains and biases of every block, so any two of its units, of unrelated models too, correlate at ~0.9.
BASELINE_PAIRS = 2048
BASELINE_SEED = 0
# Fused and chance-level pairs whose weight rows are gathered at once (`_weight_correlations`).
PAIR_CHUNK = 256


def _rounded(value: float | None, digits: int = 5) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), digits)


class NewerFormatError(ValueError):
    """`merge_diagnostics.json` of a format newer than this version reads (`READ_FORMATS`): the file is fine, this
    hf-mudsc is too old for it — said so, not as a malformed file."""


@dataclass
class GroupDiagnostics:
    """One group's match quality. Correlations are means over every (A unit, B unit) pair fused into one merged unit
    (None when that similarity was not computed, e.g. activations for `weight_matching`)."""

    name: str
    width: int
    num_heads: int = 1
    value: float | None = None
    """The matcher's own objective for the group (the card's "match value")."""
    activation: float | None = None
    weight: float | None = None
    blended: float | None = None
    """The similarity the units were matched on: `alpha * weight + (1 - alpha) * activation`."""
    cross_fraction: float | None = None
    """Share of merged units holding at least one unit of each parent (1.0 for align; zip may fuse within one)."""
    head_pairing: list[int | None] | None = None
    """The B head merged with each A head (attention groups); None for an A head whose pair a size budget kept apart
    (`size_spend="heads"`: the B head became a merged head of its own)."""
    head_scores: list[float] | None = None
    """Mean blended correlation of the fused pairs of each A head with its partner."""
    baseline_activation: float | None = None
    baseline_weight: float | None = None
    baseline_blended: float | None = None
    """The same three means over `baseline_pairs` (A unit, B unit) pairs drawn at random (`BASELINE_PAIRS`): what
    the fused pairs' means are to be compared with (0 only when unrelated units are uncorrelated)."""
    baseline_pairs: int | None = None


@dataclass
class Heatmap:
    """A sampled block of one group's similarity: row i and column i are the A unit and the B unit of one merged
    unit (in merged order), so a good match is a bright diagonal."""

    group: str
    rows: list[int]
    """The A units shown (original indices), in merged order."""
    columns: list[int]
    """The B units shown (original indices, 0..n-1), fused with the A unit of the same position."""
    values: list[list[float]]
    fused_units: int = 0
    """Merged units that fuse a unit of A with a unit of B (the sample is drawn from them)."""


@dataclass
class MergeDiagnostics:
    """Everything the merge plots need, JSON-serialisable (`to_dict`/`from_dict`, `save`/`load`)."""

    method: str
    matcher: str | None = None
    alpha: float | None = None
    """The weight share of the similarity the units were matched on (0: activations only, 1: weights only)."""
    groups: list[GroupDiagnostics] = field(default_factory=list)
    objective_history: list[float] = field(default_factory=list)
    sweeps: int = 0
    starts: dict[str, float] = field(default_factory=dict)
    solve_start: str | None = None
    heatmaps: list[Heatmap] = field(default_factory=list)
    alpha_curve: dict[str, Any] | None = None
    """`alpha="auto"`'s search (`config.mudsc["alpha_auto"]`: grid, held-out fidelity, chosen α), else None."""
    baseline_seed: int | None = None
    """The seed of the random pairs of each group's baseline (`BASELINE_SEED`), None when none was computed."""

    def group(self, name: str) -> GroupDiagnostics:
        for group in self.groups:
            if group.name == name:
                return group
        raise KeyError(name)

    def format_version(self) -> int:
        """The format the file is written in: `FORMAT_VERSION` only when it holds what older readers refuse (a null
        head pairing), else 1."""
        kept_apart = any(None in (group.head_pairing or ()) for group in self.groups)
        return FORMAT_VERSION if kept_apart else 1

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format_version(), **asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MergeDiagnostics:
        if not isinstance(data, Mapping):
            raise ValueError(f"it holds a JSON {type(data).__name__}, not an object")
        version, readable = data.get("format"), " and ".join(map(str, READ_FORMATS))
        if _integer(version) and version > FORMAT_VERSION:
            raise NewerFormatError(f"merge diagnostics format {version} was made by a newer hf-mudsc (this version "
                                   f"reads formats {readable}); upgrade hf-mudsc to read it")
        if not _integer(version) or version not in READ_FORMATS:
            raise ValueError(f"unknown merge diagnostics format {version!r} (this version reads formats {readable}); "
                             "redraw with the hf-mudsc version that merged the model")
        check_diagnostics_dict(data)  # every value's type up front: a plot or summary never meets a wrong one
        return cls(
            method=data["method"], matcher=data.get("matcher"), alpha=data.get("alpha"),
            groups=[GroupDiagnostics(**g) for g in data.get("groups", [])],
            objective_history=list(data.get("objective_history", [])), sweeps=int(data.get("sweeps", 0)),
            starts=dict(data.get("starts", {})), solve_start=data.get("solve_start"),
            heatmaps=[Heatmap(**h) for h in data.get("heatmaps", [])],
            alpha_curve=data.get("alpha_curve"), baseline_seed=data.get("baseline_seed"),
        )

    @classmethod
    def from_config(cls, mudsc: Mapping[str, Any]) -> MergeDiagnostics:
        """What a merged model's `config.mudsc` alone tells (a folder without `merge_diagnostics.json`: more than two
        parents, or removed): the method, each group's match value, each start's final objective and `alpha="auto"`'s
        curve — no correlations, heads or heat maps."""
        return cls(
            method=str(mudsc.get("method")), matcher=mudsc.get("matcher"), alpha=mudsc.get("alpha"),
            groups=[GroupDiagnostics(name=name, width=0, value=value)
                    for name, value in (mudsc.get("group_match_values") or {}).items()],
            starts=dict(mudsc.get("start_objectives") or {}), solve_start=mudsc.get("solve_start"),
            alpha_curve=mudsc.get("alpha_auto"),
        )

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), separators=(",", ":")) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> MergeDiagnostics:
        from hf_mudsc.load.config_json import parse_json

        return cls.from_dict(parse_json(Path(path).read_text(encoding="utf-8")))  # too deeply nested: a ValueError

    def rounded(self) -> MergeDiagnostics:
        """As stored (5 decimals, heat maps 2): plots drawn at merge time and redrawn from the file are identical."""
        return MergeDiagnostics.from_dict(json.loads(json.dumps(self.to_dict())))


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _or_none(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or check(value)


def _list_of(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, list) and all(check(item) for item in value)


def _text(value: Any) -> bool:
    return isinstance(value, str)


# What each value of `merge_diagnostics.json` must be (`check_diagnostics_dict`): (check, what it says it expects).
_TOP = {"format": (_integer, "an integer"), "method": (_text, "a text"), "matcher": (_or_none(_text), "a text"),
        "alpha": (_or_none(_number), "a number"), "groups": (_list_of(lambda g: isinstance(g, Mapping)),
                                                              "a list of objects"),
        "objective_history": (_list_of(_number), "a list of numbers"), "sweeps": (_integer, "an integer"),
        "starts": (lambda v: isinstance(v, Mapping) and all(_number(x) for x in v.values()),
                   "an object of numbers"),
        "solve_start": (_or_none(_text), "a text"), "heatmaps": (_list_of(lambda h: isinstance(h, Mapping)),
                                                                  "a list of objects"),
        "alpha_curve": (_or_none(lambda v: isinstance(v, Mapping)), "an object"),
        "baseline_seed": (_or_none(_integer), "an integer")}
_GROUP = {"name": (_text, "a text"), "width": (_integer, "an integer"), "num_heads": (_integer, "an integer"),
          **{key: (_or_none(_number), "a number") for key in (
              "value", "activation", "weight", "blended", "cross_fraction", "baseline_activation", "baseline_weight",
              "baseline_blended")},
          "baseline_pairs": (_or_none(_integer), "an integer"),
          "head_pairing": (_or_none(_list_of(_or_none(_integer))),
                           "a list of integers or nulls (null: a pair the size budget kept apart)"),
          "head_scores": (_or_none(_list_of(_or_none(_number))), "a list of numbers")}
_HEATMAP = {"group": (_text, "a text"), "rows": (_list_of(_integer), "a list of integers"),
            "columns": (_list_of(_integer), "a list of integers"),
            "values": (_list_of(_list_of(_number)), "a list of lists of numbers"),
            "fused_units": (_integer, "an integer")}
_CURVE = {"grid": (_list_of(_number), "a list of numbers"),
          "fidelity": (_list_of(_or_none(_number)), "a list of numbers (null: not scored)"),
          "chosen": (_number, "a number"), "held_out_examples": (_integer, "an integer"),
          "candidate_starts": (_list_of(_text), "a list of texts"),
          "returned_fidelity": (_or_none(_number), "a number"),
          "returned_is_candidate": (_or_none(lambda v: isinstance(v, bool)), "true or false")}


def _check_keys(data: Mapping[str, Any], rules: Mapping[str, tuple[Callable[[Any], bool], str]],
                required: Sequence[str], where: str, *, closed: bool = False) -> None:
    """`closed`: the keys are a dataclass's fields (built with `**`), so an unknown one is refused too."""
    for key in required:
        if key not in data:
            raise ValueError(f"{where} has no {key!r}")
    for key, value in data.items():
        if key not in rules:
            if closed:
                raise ValueError(f"{where} has an unknown key {key!r}")
            continue
        check, expected = rules[key]
        if not check(value):
            raise ValueError(f"{where}{'.' if where else ''}{key} is {str(value)[:40]!r}, not {expected}")


def check_diagnostics_dict(data: Mapping[str, Any]) -> None:
    """Refuse (one `ValueError` naming the key) a diagnostics dict with a value of the wrong type or shape, so
    the summary and the plots drawn from it never fail half-way on a file damaged or edited by hand."""
    _check_keys(data, _TOP, ("method",), "")
    for index, group in enumerate(data.get("groups") or []):
        _check_keys(group, _GROUP, ("name", "width"), f"groups[{index}]", closed=True)
        if group.get("head_pairing") is not None and group.get("head_scores") is not None and len(
                group["head_pairing"]) != len(group["head_scores"]):
            raise ValueError(f"groups[{index}] has {len(group['head_pairing'])} head pairs but "
                             f"{len(group['head_scores'])} head scores")
    for index, heatmap in enumerate(data.get("heatmaps") or []):
        _check_keys(heatmap, _HEATMAP, ("group", "rows", "columns", "values"), f"heatmaps[{index}]",
                    closed=True)
        shape = (len(heatmap["rows"]), len(heatmap["columns"]))
        if len(heatmap["values"]) != shape[0] or any(len(row) != shape[1] for row in heatmap["values"]):
            raise ValueError(f"heatmaps[{index}].values is not {shape[0]} rows of {shape[1]} numbers")
    curve = data.get("alpha_curve")
    if curve is not None:
        _check_keys(curve, _CURVE, ("grid", "fidelity", "chosen"), "alpha_curve")
        if len(curve["grid"]) != len(curve["fidelity"]):
            raise ValueError(f"alpha_curve has {len(curve['grid'])} values of α but {len(curve['fidelity'])} "
                             "fidelities")


def heatmap_groups(groups: Sequence[GroupDiagnostics], limit: int = HEATMAP_GROUPS) -> list[int]:
    """Positions of the groups worth a heat map, among those with fused A-B pairs: the first, middle and last in
    solve order, and the worst-matched."""
    scored = [i for i, g in enumerate(groups) if g.blended is not None]
    if not scored:
        return []
    chosen = {scored[0], scored[len(scored) // 2], scored[-1], min(scored, key=lambda i: groups[i].blended)}
    return sorted(chosen)[:limit]


def compute_diagnostics(
    spec: PermutationSpec,
    params_a: Mapping[str, torch.Tensor],
    params_b: Mapping[str, torch.Tensor],
    matches: Sequence[Match | None],
    correlations: Sequence[torch.Tensor] | None,
    *,
    alpha: float | None,
    method: str,
    matcher: str | None,
    group_values: Sequence[float] = (),
    objective_history: Sequence[float] = (),
    sweeps: int = 0,
    starts: Mapping[str, float] | None = None,
    solve_start: str | None = None,
    heatmap_units: int = HEATMAP_UNITS,
    solved_matches: Sequence[Match | None] | None = None,
) -> MergeDiagnostics | None:
    """The diagnostics of a finished solve (None when no group was matched, e.g. `average`).

    `spec` is the spec the solve matched with (weight similarities as in docs/design.md §4.3, other axes mapped by
    the final matches). Only the fused pairs' entries and a sampled block are computed: `O(n · D)` per group,
    not the `O(n² · D)` of a full weight correlation.

    `solved_matches`: the solve's matches when a size budget widened them into `matches` (§4.12): the weight
    similarity maps the other groups' axes by these, as the solve did, while the fused pairs are those of `matches`
    (the merged model's) — mapped by the widened ones, the residual's unchanged match showed a lower correlation.
    """
    import torch

    from hf_mudsc.solve.maps import GroupMaps

    if not any(m is not None for m in matches):
        return None
    maps = [GroupMaps.from_match(m) if m is not None else None for m in (solved_matches or matches)]
    # Without activations the units were matched on weights alone, whatever `alpha` says.
    weight_share = 1.0 if correlations is None else (0.0 if alpha is None else float(alpha))
    report = MergeDiagnostics(
        method=method, matcher=matcher, alpha=weight_share, objective_history=[float(v) for v in objective_history],
        sweeps=int(sweeps), starts={k: float(v) for k, v in (starts or {}).items()}, solve_start=solve_start,
        baseline_seed=BASELINE_SEED)
    samples: list[tuple[list[int], list[int], torch.Tensor, int]] = []
    for index, (group, found) in enumerate(zip(spec.groups, matches)):
        n = group.width
        entry = GroupDiagnostics(name=group.name, width=n, num_heads=group.num_heads,
                                 value=_rounded(group_values[index]) if index < len(group_values) else None)
        report.groups.append(entry)
        if found is None:
            samples.append(([], [], torch.zeros(0, 0), 0))
            continue
        cluster = found.cluster_of.cpu()
        a_units, b_units = _fused_pairs(cluster, n)
        # One (A unit, B unit) pair per merged unit that fuses both parents (the lowest of each), evenly spaced in
        # merged order, for the heat map: row i and column i were fused, so a good match is a bright diagonal.
        first: dict[int, list[int]] = {}
        merged_of = cluster.tolist()
        for a, b in zip(a_units.tolist(), b_units.tolist()):
            first.setdefault(merged_of[a], [a, b])
        fused = [first[merged] for merged in sorted(first)]
        shown = min(heatmap_units, len(fused))
        picks = sorted({round(i * (len(fused) - 1) / max(shown - 1, 1)) for i in range(shown)})
        rows = torch.tensor([fused[i][0] for i in picks], dtype=torch.long)
        cols = torch.tensor([fused[i][1] for i in picks], dtype=torch.long)
        base_a, base_b = baseline_pairs(n)
        fused_count = a_units.numel()
        every_weight, block = _weight_correlations(
            spec, index, params_a, params_b, maps, (torch.cat([a_units, base_a]), torch.cat([b_units, base_b])),
            (rows, cols))
        activation = correlations[index].to(torch.float64) if correlations is not None else None
        every_activation = (activation[torch.cat([a_units, base_a]), n + torch.cat([b_units, base_b])]
                            if activation is not None else None)
        every_blended = (every_weight if every_activation is None
                         else weight_share * every_weight + (1 - weight_share) * every_activation)
        pair_weight, pair_blended = every_weight[:fused_count], every_blended[:fused_count]
        entry.weight = _mean(pair_weight)
        entry.activation = _mean(every_activation[:fused_count]) if every_activation is not None else None
        entry.blended = _mean(pair_blended)
        entry.baseline_weight = _mean(every_weight[fused_count:])
        entry.baseline_activation = _mean(every_activation[fused_count:]) if every_activation is not None else None
        entry.baseline_blended = _mean(every_blended[fused_count:])
        entry.baseline_pairs = int(base_a.numel())
        members = torch.zeros(found.num_merged, 2, dtype=torch.bool)
        members[cluster[:n], 0] = True
        members[cluster[n:], 1] = True
        entry.cross_fraction = _rounded(float(members.all(1).double().mean()))
        if found.head_pairing is not None and group.num_heads > 1:
            size = n // group.num_heads
            entry.head_pairing = [int(partner) if _heads_merged(cluster, n, size, head, int(partner)) else None
                                  for head, partner in enumerate(found.head_pairing)]
            heads = a_units // size
            entry.head_scores = [_mean(pair_blended[heads == h]) if bool((heads == h).any()) else None
                                 for h in range(group.num_heads)]
        if activation is not None:
            block = weight_share * block + (1 - weight_share) * activation[rows][:, n + cols]
        samples.append((rows.tolist(), cols.tolist(), block, len(fused)))
    for index in heatmap_groups(report.groups):
        rows, cols, block, total = samples[index]
        if rows:
            report.heatmaps.append(Heatmap(group=report.groups[index].name, rows=rows, columns=cols,
                                           values=[[round(float(v), 2) for v in row] for row in block.tolist()],
                                           fused_units=total))
    return report


def _weight_correlations(
    spec: PermutationSpec,
    index: int,
    params_a: Mapping[str, torch.Tensor],
    params_b: Mapping[str, torch.Tensor],
    maps: Sequence[Any],
    pairs: tuple[torch.Tensor, torch.Tensor],
    sample: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Entries of `C_w` (docs/design.md §4.3, as the solver computes it: raw moments over the columns of `Z_i`)
    for the fused `pairs` (pairwise) and the heat map's `sample` (every row x column), summed member by member:
    a wide member (BERT's vocabulary) is never concatenated with the others."""
    import torch

    from hf_mudsc.calibrate.correlation import CLAMP
    from hf_mudsc.solve.similarity import weight_feature_blocks

    n = spec.groups[index].width
    sums = [torch.zeros(n, dtype=torch.float64) for _ in range(2)]
    squares = [torch.zeros(n, dtype=torch.float64) for _ in range(2)]
    cross = torch.zeros(pairs[0].numel(), dtype=torch.float64)
    block = torch.zeros(sample[0].numel(), sample[1].numel(), dtype=torch.float64)
    columns = 0
    # Products in the parameters' dtype (float32: one rounding per product), every sum in float64 — a displayed
    # diagnostic, at a third of the memory traffic of float64 copies of every block.
    blocks = zip(weight_feature_blocks(spec, index, params_a, 0, maps, as_float64=False),
                 weight_feature_blocks(spec, index, params_b, 1, maps, as_float64=False))
    for za, zb in blocks:
        za, zb = (z.to(torch.promote_types(za.dtype, zb.dtype)) for z in (za, zb))
        for side, z in enumerate((za, zb)):
            sums[side] += z.sum(1, dtype=torch.float64)
            squares[side] += (z * z).sum(1, dtype=torch.float64)
        # Pairs a chunk at a time: gathering every pair's rows at once held (pairs x columns) three times — 0.9 GB
        # for MiniLM's residual group (2432 pairs x 30522 vocabulary columns), the peak of its merge. Each pair's
        # row sum is the same computation either way.
        for start in range(0, pairs[0].numel(), PAIR_CHUNK):
            rows = slice(start, start + PAIR_CHUNK)
            cross[rows] += (za[pairs[0][rows]] * zb[pairs[1][rows]]).sum(1, dtype=torch.float64)
        block += (za[sample[0]].to(torch.float64) @ zb[sample[1]].to(torch.float64).T)
        columns += za.shape[1]
    mean = [s / columns for s in sums]
    std = [(q / columns - m * m).clamp_min(0).sqrt() for q, m in zip(squares, mean)]
    pair = (cross / columns - mean[0][pairs[0]] * mean[1][pairs[1]]) / (
        std[0][pairs[0]] * std[1][pairs[1]]).clamp_min(CLAMP)
    sampled = (block / columns - torch.outer(mean[0][sample[0]], mean[1][sample[1]])) / torch.outer(
        std[0][sample[0]], std[1][sample[1]]).clamp_min(CLAMP)
    return pair, sampled


def baseline_pairs(n: int, limit: int = BASELINE_PAIRS, seed: int = BASELINE_SEED) -> tuple[torch.Tensor,
                                                                                              torch.Tensor]:
    """The (A unit, B unit) pairs of a group of `n` units whose mean correlation is its chance level: all `n²`
    when at most `limit`, else `limit` drawn uniformly (with replacement) by a generator seeded with `seed`, so
    the same group always gives the same pairs (and the global random state is untouched)."""
    import torch

    if n * n <= limit:
        grid = torch.arange(n * n)
    else:
        grid = torch.randint(n * n, (limit,), generator=torch.Generator().manual_seed(seed))
    return grid // n, grid % n


def _fused_pairs(cluster: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (A unit, B unit) pair fused into one merged unit, as two index tensors (B units as 0..n-1)."""
    import torch

    a_of: dict[int, list[int]] = {}
    for unit, merged in enumerate(cluster[:n].tolist()):
        a_of.setdefault(merged, []).append(unit)
    pairs = [(a, b) for b, merged in enumerate(cluster[n:].tolist()) for a in a_of.get(merged, [])]
    if not pairs:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    a_units, b_units = zip(*sorted(pairs))
    return torch.tensor(a_units), torch.tensor(b_units)


def _heads_merged(cluster: torch.Tensor, n: int, size: int, head: int, partner: int) -> bool:
    """Whether A head `head` and its paired B head `partner` share a merged head (blocks of `size` merged units): not
    when a size budget kept the pair apart (`widen.unfuse_heads` gives the B head a merged head of its own)."""
    blocks_a = set((cluster[head * size:(head + 1) * size] // size).tolist())
    blocks_b = set((cluster[n + partner * size:n + (partner + 1) * size] // size).tolist())
    return bool(blocks_a & blocks_b)


def _mean(values: torch.Tensor) -> float | None:
    return _rounded(float(values.mean())) if values.numel() else None
