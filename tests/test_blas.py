"""hf_mudsc.blas: the symmetric rank-k update every Gram on the CPU goes through, and its thread rule."""

from __future__ import annotations

import pytest
import torch
from threadpoolctl import threadpool_info

from hf_mudsc.blas import (
    add_upper,
    can_syrk,
    mirror_upper,
    pack_upper,
    packed_size,
    syrk_upper,
    torch_thread_count,
    unpack_upper,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows", [False, True])
def test_syrk_upper_adds_the_product_on_the_upper_triangle_and_leaves_the_lower_one(dtype, rows) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, generator=generator, dtype=dtype)
    size = 7 if rows else 5
    start = torch.randn(size, size, generator=generator, dtype=dtype)
    total = start.clone()
    syrk_upper(total, x, rows=rows)
    product = x @ x.T if rows else x.T @ x
    upper = torch.ones(size, size, dtype=torch.bool).triu()
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(total[upper], (start + product)[upper], rtol=tolerance, atol=tolerance)
    assert torch.equal(total[~upper], start[~upper])  # the strict lower triangle is untouched


def test_syrk_upper_with_beta_zero_ignores_what_the_sum_held() -> None:
    x = torch.arange(12, dtype=torch.float64).reshape(4, 3)
    total = torch.full((3, 3), float("nan"), dtype=torch.float64)
    syrk_upper(total, x, beta=0.0)
    assert torch.equal(mirror_upper(total), x.T @ x)  # integers: exact in float64


@pytest.mark.parametrize("rows", [False, True])
def test_syrk_upper_of_an_empty_operand_adds_nothing_and_beta_still_scales(rows) -> None:
    """Review: BLAS refuses a zero leading dimension and left `total` as it was, so a first block of no columns with
    beta=0 kept uninitialised memory as the Gram."""
    empty = torch.zeros(0, 3, dtype=torch.float64) if not rows else torch.zeros(3, 0, dtype=torch.float64)
    total = torch.full((3, 3), 7.0, dtype=torch.float64)
    syrk_upper(total, empty, rows=rows, beta=0.0)
    assert torch.equal(total, torch.zeros(3, 3, dtype=torch.float64))
    total = torch.full((3, 3), 7.0, dtype=torch.float64)
    syrk_upper(total, empty, rows=rows, beta=0.5)
    assert torch.equal(total, torch.full((3, 3), 3.5, dtype=torch.float64))
    syrk_upper(total, empty, rows=rows)
    assert torch.equal(total, torch.full((3, 3), 3.5, dtype=torch.float64))


def test_syrk_upper_reads_a_non_contiguous_operand() -> None:
    x = torch.arange(40, dtype=torch.float64).reshape(8, 5)[::2, 1:]  # strided rows and columns
    total = torch.zeros(4, 4, dtype=torch.float64)
    syrk_upper(total, x)
    assert torch.equal(mirror_upper(total), x.T @ x)


def test_mirror_upper_fills_the_lower_triangle_in_place_across_row_blocks() -> None:
    size = 600  # more than one 256-row block, and a partial last one
    matrix = torch.randn(size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = matrix.triu() + matrix.triu(1).T
    pointer = matrix.data_ptr()
    assert mirror_upper(matrix) is matrix and matrix.data_ptr() == pointer
    assert torch.equal(matrix, expected)


def test_can_syrk_only_for_float_cpu_tensors_of_one_dtype() -> None:
    total = torch.zeros(3, 3)
    assert can_syrk(total, torch.zeros(2, 3))
    assert not can_syrk(total, torch.zeros(2, 3, dtype=torch.float64))  # mixed dtypes
    assert not can_syrk(total.to(torch.bfloat16), torch.zeros(2, 3, dtype=torch.bfloat16))
    assert not can_syrk(torch.zeros(3, 6)[:, :3], torch.zeros(2, 3))  # a non-contiguous sum


def test_torch_thread_count_limits_scipy_blas_to_torchs_threads() -> None:
    from scipy.linalg import blas  # noqa: F401  (loads scipy's BLAS, which threadpoolctl then sees)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch_thread_count():
            counts = {info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"}
        assert counts == {1}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("size", [0, 1, 2, 7, 300])
def test_a_packed_upper_triangle_unpacks_to_the_same_symmetric_matrix_bit_for_bit(size):
    """What the solve's weight-correlation cache keeps (half a symmetric matrix's memory)."""
    generator = torch.Generator().manual_seed(size)
    x = torch.randn(size, 5, dtype=torch.float64, generator=generator)
    matrix = x @ x.T
    matrix = mirror_upper(matrix)  # exactly symmetric
    packed = pack_upper(matrix)
    assert packed.shape == (packed_size(size),)
    # Blocks of PACK_ROWS rows from their diagonal on: 300 = 128 + 128 + 44 rows.
    assert packed_size(300) == 128 * 300 + 128 * 172 + 44 * 44 and packed_size(7) == 49
    unpacked = unpack_upper(packed, size)
    assert torch.equal(unpacked, matrix) and (size == 0 or unpacked.data_ptr() != matrix.data_ptr())


@pytest.mark.parametrize("size", [1, 5, 128, 300])
def test_add_upper_adds_the_upper_triangle_only_and_never_reads_the_lower_one(size):
    """Calibration's float32 batch product (a `?syrk` with beta=0: its lower triangle uninitialised) is added into the
    float64 sums on the upper triangle only: the same values there as adding the whole product with a zeroed lower
    triangle; NaN below the diagonal of the product is never read; the sums' lower triangle is left as it was."""
    generator = torch.Generator().manual_seed(size)
    total = torch.randn(size, size, dtype=torch.float64, generator=generator)
    part = torch.randn(size, size, dtype=torch.float32, generator=generator).triu()
    want = total + part.to(torch.float64)  # the whole product, its lower triangle zero (the code before)
    garbage = part.clone()
    rows, cols = torch.tril_indices(size, size, offset=-1)
    garbage[rows, cols] = float("nan")
    got = total.clone()
    add_upper(got, garbage)
    upper = torch.ones(size, size, dtype=torch.bool).triu()
    assert torch.equal(got[upper], want[upper])
    assert torch.equal(got[~upper], total[~upper])
