"""Random valid unit permutations of a model: the same function in another basis, with the truth known.

A model whose units are permuted (residual stream, every MLP hidden layer, heads and the units within
heads, each consistently across every tensor that carries them) computes exactly the same function. It
is the cleanest "different initialization" pair there is — the true unit correspondence is known — so
it serves benchmarks (does a merge method find the right partners?) and invariance checks.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from hf_mudsc.solve.matchers import Match
from hf_mudsc.spec import PermutationSpec


def random_permutations(spec: PermutationSpec, seed: int) -> list[torch.Tensor]:
    """One valid random permutation per group (seeded).

    Heads move as blocks and units move only within their head; groups that share a head tie (the q/k
    and v groups of one attention block) get the same head order, as attention requires.
    """
    generator = torch.Generator().manual_seed(seed)
    head_orders: dict[str, torch.Tensor] = {}
    perms = []
    for group in spec.groups:
        k = group.num_heads
        g = group.width // k
        if group.head_tie is not None:
            if group.head_tie not in head_orders:
                head_orders[group.head_tie] = torch.randperm(k, generator=generator)
            heads = head_orders[group.head_tie]
        else:
            heads = torch.randperm(k, generator=generator)
        perms.append(torch.cat([heads[h] * g + torch.randperm(g, generator=generator) for h in range(k)]))
    return perms


def permute_model(
    model: torch.nn.Module, spec: PermutationSpec, perms: Sequence[torch.Tensor]
) -> torch.nn.Module:
    """A copy of `model` whose unit `j` of group `i` is the original's unit `perms[i][j]`."""
    if len(perms) != len(spec.groups):
        raise ValueError(f"{len(perms)} permutations for {len(spec.groups)} groups")
    for group, perm in zip(spec.groups, perms):
        if sorted(perm.tolist()) != list(range(group.width)):
            raise ValueError(
                f"the permutation of group {group.name!r} is not a permutation of 0..{group.width - 1}"
            )
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in clone.named_parameters():
            value = param.detach().clone()
            for group_index, member in spec.axes_of(name):
                value = value.index_select(member.axis % value.dim(), perms[group_index])
            param.copy_(value)
    return clone.eval()


def recovered_fraction(match: Match, perm: torch.Tensor) -> float:
    """Fraction of A's units merged with exactly their true partner in B (B unit j = A unit `perm[j]`).

    A merged unit counts when it fuses one A unit `i` and one B unit `j` with `perm[j] == i`; clusters of two
    units of one model (zip) or of more than two units count as misses.
    """
    n = int(perm.numel())
    if match.cluster_of.numel() != 2 * n:
        raise ValueError(f"match has {match.cluster_of.numel() // 2} units per model, the permutation {n}")
    truth = perm.tolist()
    hits = 0
    for cluster in match.clusters():
        a = [u for u in cluster if u < n]
        b = [u - n for u in cluster if u >= n]
        if len(a) == 1 and len(b) == 1 and truth[b[0]] == a[0]:
            hits += 1
    return hits / n


def recovery_breakdown(match: Match, perm: torch.Tensor) -> dict[str, int]:
    """How a group's merged units relate to the true correspondence (B unit j = A unit `perm[j]`), counted by kind:
    `true` (an A unit with its partner), `wrong cross` (one A and one B unit, not partners), `A-A` / `B-B` (zip's
    same-model fusions of two units), else `<a>A+<b>B` — where `recovered_fraction` misses units, and why."""
    n = int(perm.numel())
    if match.cluster_of.numel() != 2 * n:
        raise ValueError(f"match has {match.cluster_of.numel() // 2} units per model, the permutation {n}")
    truth = perm.tolist()
    kinds: dict[str, int] = {}
    for cluster in match.clusters():
        a = [u for u in cluster if u < n]
        b = [u - n for u in cluster if u >= n]
        if len(a) == 1 and len(b) == 1:
            kind = "true" if truth[b[0]] == a[0] else "wrong cross"
        elif len(a) + len(b) == 2:
            kind = "A-A" if a else "B-B"
        else:
            kind = f"{len(a)}A+{len(b)}B"
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds
