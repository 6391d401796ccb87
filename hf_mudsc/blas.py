"""Symmetric Gram updates by BLAS `?syrk`, for every stage that sums `XᵀX` on the CPU.

Calibration's activation Grams, the solve's weight correlations and the refit's ridge Grams are symmetric, and
their products are most of a merge's arithmetic. torch has no symmetric rank-k update, so a `XᵀX` costs a full
GEMM; scipy's BLAS `ssyrk`/`dsyrk` sums one triangle — half the multiply-adds, the same sums in the GEMM's
precision. One wrapper for all three, and one rule for the thread count scipy's BLAS may use.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

#: The dtypes `syrk_upper` hands to BLAS (others, and tensors on an accelerator, take torch's GEMM).
SYRK_DTYPES = (torch.float32, torch.float64)


def can_syrk(total: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether `syrk_upper(total, x)` runs BLAS `?syrk`: both on the CPU, in one float dtype, `total` C-contiguous."""
    return (total.device.type == "cpu" and x.device.type == "cpu" and total.dtype in SYRK_DTYPES
            and x.dtype == total.dtype and total.is_contiguous())


def syrk_upper(total: torch.Tensor, x: torch.Tensor, *, rows: bool = False, beta: float = 1.0) -> None:
    """`total = beta·total + xᵀx` (`rows=True`: `+ x xᵀ`) on the upper triangle of `total`, in place; the lower
    triangle is left as it was (read it through `mirror_upper`).

    `total` must satisfy `can_syrk`; `beta=0` ignores what `total` held (it may be uninitialised). Where it cannot
    run in place (never seen: BLAS wrappers may copy), the result is copied back."""
    from scipy.linalg import blas

    if x.shape[1 if rows else 0] == 0:  # an empty sum (BLAS refuses a zero leading dimension and changes nothing)
        if beta == 0.0:
            total.zero_()
        elif beta != 1.0:
            total.mul_(beta)
        return
    routine = blas.dsyrk if total.dtype == torch.float64 else blas.ssyrk
    # In Fortran order a C-contiguous `total` is its transpose, so its lower triangle is `total`'s upper one. For
    # xᵀx, `x.T` read in Fortran order is a C-contiguous `x` with no copy (trans=0: a·aᵀ); for x xᵀ, `x.T` is the
    # transposed operand (trans=1: aᵀ·a).
    operand = x.detach().numpy().T
    if not operand.flags.f_contiguous:
        operand = operand.copy(order="F")
    result = routine(1.0, operand, beta=beta, c=total.numpy().T, trans=int(rows), lower=1, overwrite_c=1)
    if result.ctypes.data != total.data_ptr():
        total.copy_(torch.from_numpy(result.T))


# Rows per block of `pack_upper`'s layout: each block keeps its whole diagonal block (4 % more than a triangle at
# 3072 units) so that packing and unpacking copy rectangles and transpose cache-sized tiles (3072 units, one core:
# unpack 63 ms against 98 ms row by row; a plain copy of the matrix takes 43 ms).
PACK_ROWS = 128


def add_upper(total: torch.Tensor, part: torch.Tensor) -> None:
    """`total += part` on the upper triangle only (diagonal included), in place, widening element by element; the
    strict lower triangle of `part` is never read (a `?syrk` result with `beta=0` leaves it uninitialised) and that
    of `total` is left as it was (read it through `mirror_upper`). Row blocks of `PACK_ROWS`: half the work of a
    whole `total += part`, and no zeroed `part` needed."""
    size = total.shape[0]
    for start in range(0, size, PACK_ROWS):
        stop = min(start + PACK_ROWS, size)
        total[start:stop, start:stop] += part[start:stop, start:stop].triu()
        total[start:stop, stop:] += part[start:stop, stop:]


def mirror_upper(matrix: torch.Tensor) -> torch.Tensor:
    """Fill the strict lower triangle of a square `matrix` from its upper one, in place; returns `matrix`.

    Row blocks at a time, so no second `(n, n)` matrix is made (Grams here reach hundreds of MB)."""
    size = matrix.shape[0]
    step = 256
    for start in range(0, size, step):
        stop = min(start + step, size)
        # Rows start..stop of the lower triangle are columns start..stop of the upper one, above the diagonal block.
        matrix[start:stop, :start] = matrix[:start, start:stop].T
        block = matrix[start:stop, start:stop]
        block.copy_(block.triu() + block.triu(1).T)
    return matrix


def packed_size(size: int) -> int:
    """Values `pack_upper` keeps of a `(size, size)` matrix: each block of `PACK_ROWS` rows from its diagonal on."""
    return sum(min(PACK_ROWS, size - start) * (size - start) for start in range(0, size, PACK_ROWS))


def pack_upper(matrix: torch.Tensor) -> torch.Tensor:
    """The upper part of a square symmetric `matrix` as one vector: each block of `PACK_ROWS` rows from its diagonal
    block to the last column — about half the memory of the matrix, kept for later (`unpack_upper` gives it back)."""
    size = matrix.shape[0]
    if size == 0:
        return matrix.new_empty(0)
    return torch.cat([matrix[start:start + PACK_ROWS, start:].reshape(-1) for start in range(0, size, PACK_ROWS)])


def unpack_upper(packed: torch.Tensor, size: int) -> torch.Tensor:
    """The symmetric `(size, size)` matrix `pack_upper` packed: a new tensor, equal bit for bit to the packed matrix
    when that was exactly symmetric (below the diagonal blocks it is filled from their transposes, tile by tile)."""
    matrix = torch.empty(size, size, dtype=packed.dtype, device=packed.device)
    offset = 0
    for start in range(0, size, PACK_ROWS):
        rows, columns = min(PACK_ROWS, size - start), size - start
        block = packed[offset:offset + rows * columns].view(rows, columns)
        offset += rows * columns
        matrix[start:start + rows, start:] = block
        for other in range(start + rows, size, PACK_ROWS):
            matrix[other:other + PACK_ROWS, start:start + rows] = block[:, other - start:other - start + PACK_ROWS].T
    return matrix


@contextmanager
def torch_thread_count() -> Iterator[None]:
    """scipy's BLAS limited to torch's thread count while inside: `torch.set_num_threads(1)` (or a process given
    one core) holds for the Gram products too, instead of BLAS's own default of every core."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=torch.get_num_threads(), user_api="blas"):
        yield
