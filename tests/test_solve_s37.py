"""Session 37, the solve's numerical edge cases: RegMean's closed form on a numerically singular system."""

from __future__ import annotations

import torch
from factories import fine_tune, make_batches, make_model

import hf_mudsc
from hf_mudsc.solve.regmean import RegMeanSystem


def test_a_singular_system_that_cholesky_factors_by_rounding_still_takes_the_solution_nearest_the_average():
    """RegMeanSystem(8, 3), both parents' inputs with column 5 == column 2, scale=1: solve() 1.56 off the average."""
    for seed in range(10):
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(64, 8, generator=generator, dtype=torch.float64)
        x[:, 5] = x[:, 2]  # a duplicated input feature: the Gram is singular, only W[:, 2] + W[:, 5] is fitted
        ws = [torch.randn(3, 8, generator=generator, dtype=torch.float64) for _ in range(2)]
        system = RegMeanSystem(8, 3)
        for matrix in ws:
            system.add(1.0, x.T @ x / len(x), matrix, scale=1.0, rows=len(x))
        average = (ws[0] + ws[1]) / 2
        # Both parents saw the same inputs: the average fits them as well as anything, and nothing moves it.
        torch.testing.assert_close(system.solve(average), average, rtol=1e-8, atol=1e-8, msg=f"seed {seed}")


def test_regmean_at_scale_1_keeps_the_average_split_of_duplicated_units_inputs():
    """merge(2 ViT fine-tunes with fc1 units 2, 5 equal, method=regmean, regmean_scale=1): fc2 columns off by 0.77."""
    base = make_model("vit_cls", 0)
    parents = [fine_tune(base, seed, 0.05, relative=True) for seed in (1, 2)]
    with torch.no_grad():
        for parent in parents:
            for layer in (0, 1):
                for tensor in ("weight", "bias"):
                    values = parent.get_parameter(f"vit.layers.{layer}.mlp.fc1.{tensor}")
                    values[5] = values[2]
    batches = make_batches("vit_cls", 2, 8, seed=1)
    merged = hf_mudsc.merge(parents, batches, method="regmean", regmean_scale=1.0, refit="none", progress=False)
    for layer in (0, 1):
        name = f"vit.layers.{layer}.mlp.fc2.weight"
        got = merged.get_parameter(name).detach().double()
        average = sum(parent.get_parameter(name).detach().double() for parent in parents) / 2
        # fc2 reads units 2 and 5 as one input: the data fixes only the sum of their columns; the difference is the
        # weighted average's (the least-squares solution nearest it, as for features without input energy).
        error = float(((got[:, 5] - got[:, 2]) - (average[:, 5] - average[:, 2])).abs().max())
        assert error < 1e-5, (name, error)


def test_the_default_scale_never_takes_the_singular_path_even_with_equal_inputs(monkeypatch):
    """RegMeanSystem with column 5 == column 2 at regmean_scale 0.95 (the default): every pivot is >= 5 % of its
    feature's energy, so the Cholesky solve runs (lstsq made to fail); an ill-conditioned but solvable system at scale 1
    (condition number ~1e8) stays on Cholesky too."""
    def no_lstsq(*args, **kwargs):
        raise AssertionError("the singular path ran")

    monkeypatch.setattr(torch.linalg, "lstsq", no_lstsq)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=generator, dtype=torch.float64)
    x[:, 5] = x[:, 2]
    matrix = torch.randn(3, 8, generator=generator, dtype=torch.float64)
    system = RegMeanSystem(8, 3)
    system.add(1.0, x.T @ x / len(x), matrix, scale=0.95, rows=len(x))
    assert torch.isfinite(system.solve(matrix)).all()
    x[:, 5] = x[:, 2] + 1e-4 * torch.randn(64, generator=generator, dtype=torch.float64)  # nearly equal: solvable
    conditioned = RegMeanSystem(8, 3)
    conditioned.add(1.0, x.T @ x / len(x), matrix, scale=1.0, rows=len(x))
    torch.testing.assert_close(conditioned.solve(torch.zeros_like(matrix)), matrix, rtol=1e-5, atol=1e-5)
