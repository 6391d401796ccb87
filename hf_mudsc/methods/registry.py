"""The merge-method registry: one entry per method, read by the API, the CLI choices, the card and the docs."""

from __future__ import annotations

from dataclasses import dataclass

PAPER_MUDSC = "https://arxiv.org/abs/2403.01753"
PAPER_ZIPIT = "https://arxiv.org/abs/2305.03053"
PAPER_REBASIN = "https://arxiv.org/abs/2209.04836"


@dataclass(frozen=True)
class MergeMethod:
    """What a method needs and does; `matcher=None` means the user picks align or zip."""

    name: str
    pretty_name: str
    paper: str | None
    description: str
    uses_activations: bool
    uses_weights: bool
    iterate: bool
    matches_units: bool = True
    matcher: str | None = None


METHODS: dict[str, MergeMethod] = {}


def register_method(method: MergeMethod) -> MergeMethod:
    if method.name in METHODS:
        raise ValueError(f"merge method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}; choose one of: {', '.join(METHODS)}") from None


register_method(MergeMethod(
    name="mudsc",
    pretty_name="MuDSC (merging under dual-space constraints)",
    paper=PAPER_MUDSC,
    description="Units matched on alpha * weight correlation + (1 - alpha) * activation correlation, "
    "started from the activation matching and refined by seeded coordinate sweeps.",
    uses_activations=True, uses_weights=True, iterate=True,
))
register_method(MergeMethod(
    name="zipit",
    pretty_name="ZipIt! (activation zip)",
    paper=PAPER_ZIPIT,
    description="Activation correlation only, greedy zip that may also fuse units within one model.",
    uses_activations=True, uses_weights=False, iterate=False, matcher="zip",
))
register_method(MergeMethod(
    name="activation_align",
    pretty_name="Activation matching (permutation)",
    paper=PAPER_REBASIN,
    description="Activation correlation only, one Hungarian permutation per group.",
    uses_activations=True, uses_weights=False, iterate=False, matcher="align",
))
register_method(MergeMethod(
    name="weight_matching",
    pretty_name="Weight matching (Git Re-Basin)",
    paper=PAPER_REBASIN,
    description="Weight correlation only, Hungarian permutations refined by seeded coordinate sweeps.",
    uses_activations=False, uses_weights=True, iterate=True, matcher="align",
))
register_method(MergeMethod(
    name="average",
    pretty_name="Weight averaging",
    paper=None,
    description="Plain parameter average, no unit matching (fails across different initializations).",
    uses_activations=False, uses_weights=False, iterate=False, matches_units=False,
))
