"""A MergeLock-style protection ("Model Unmerging"): the same function, no permutation symmetry left to use.

Per attention head, the q/k pair is re-factored by a random invertible `M` (W_q <- Mᵀ W_q, W_k <- M⁻¹ W_k,
biases alike) and the v/o pair by a random invertible `N` (W_v <- N W_v, W_o <- W_o N⁻¹): the scores
`qᵀk` and the head's output `W_o v` are unchanged, but the head's units no longer correspond to any other
model's units, so a permutation merge with it collapses. Built from the `PermutationSpec` alone (the q/k
and v groups of each attention block and their heads), so it works for every architecture with an adapter.
Used to test (and document) that `hf_mudsc` refuses to merge a protected model.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch

from hf_mudsc.load.relation import attention_pairs, module_of
from hf_mudsc.spec import PermutationSpec

Kind = Literal["gaussian", "near_identity", "scaled_orthogonal", "orthogonal"]


def random_invertible(size: int, generator: torch.Generator, kind: Kind = "gaussian",
                      strength: float = 1.0) -> torch.Tensor:
    """A random invertible `size × size` matrix (float64).

    `gaussian`: i.i.d. N(0, 1/size) entries (MergeLock's choice); `near_identity`: I + strength·N(0, 1/size);
    `scaled_orthogonal`: a random rotation times a diagonal of exp(strength·N(0, 1)) scales; `orthogonal`: a
    random rotation only (a basis change no weight statistic of one model can see).
    """
    noise = torch.randn(size, size, generator=generator, dtype=torch.float64) / size**0.5
    if kind == "gaussian":
        matrix = strength * noise
    elif kind == "near_identity":
        matrix = torch.eye(size, dtype=torch.float64) + strength * noise
    elif kind in ("scaled_orthogonal", "orthogonal"):
        q, r = torch.linalg.qr(noise)
        matrix = q * torch.sign(torch.diagonal(r))
        if kind == "scaled_orthogonal":
            scales = torch.exp(strength * torch.randn(size, generator=generator, dtype=torch.float64))
            matrix = matrix * scales
    else:
        raise ValueError(f"unknown kind {kind!r}: use gaussian, near_identity, scaled_orthogonal or orthogonal")
    return matrix


def lock_model(model: torch.nn.Module, spec: PermutationSpec, seed: int, kind: Kind = "gaussian",
               strength: float = 1.0) -> torch.nn.Module:
    """A locked copy of `model`: every attention head's q/k and v/o pairs re-factored by random invertible maps.

    The copy computes the same function (up to float rounding); `model` is not modified.
    """
    generator = torch.Generator().manual_seed(seed)
    clone = copy.deepcopy(model)
    params = dict(clone.named_parameters())
    with torch.no_grad():
        for qk, v in attention_pairs(spec):
            g = qk.width // qk.num_heads
            modules = list(dict.fromkeys(module_of(m.param) for m in qk.members))
            if len(modules) != 2:
                raise ValueError(f"group {qk.name!r}: expected a query and a key projection, found {modules}")
            for head in range(qk.num_heads):
                rows = slice(head * g, (head + 1) * g)
                m = random_invertible(g, generator, kind, strength)
                n = random_invertible(g, generator, kind, strength)
                # (Mᵀq)ᵀ(M⁻¹k) = qᵀk: the first module gets Mᵀ, the second M⁻¹ (either order keeps the scores).
                factors = {modules[0]: m.T, modules[1]: torch.linalg.inv(m)}
                for member in qk.members:
                    _left_multiply(params[member.param], member.axis, rows, factors[module_of(member.param)])
                n_inv = torch.linalg.inv(n)
                for member in v.members:
                    # value rows: N v; output-projection columns: W_o N⁻¹, i.e. (N⁻¹)ᵀ on the column axis.
                    _left_multiply(params[member.param], member.axis, rows, n if member.role == "out" else n_inv.T)
    return clone.eval()


def _left_multiply(param: torch.Tensor, axis: int, units: slice, matrix: torch.Tensor) -> None:
    """Replace the `units` slice of `param` along `axis` by `matrix @ slice` (in float64, written back)."""
    moved = param.data.movedim(axis, 0)
    block = moved[units].to(torch.float64)
    shape = block.shape
    mixed = matrix @ block.reshape(shape[0], -1)
    moved[units] = mixed.reshape(shape).to(param.dtype)
