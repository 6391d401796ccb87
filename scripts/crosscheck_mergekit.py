"""hf_mudsc.solve.task_vectors vs the real mergekit 0.1.5 (PyPI wheel) on the same tensors (not part of the suite).

Run in a throwaway venv that sees the system torch/transformers and has mergekit installed without its
dependencies (it would otherwise pull another torch):

    python -m venv --system-site-packages /tmp/mkvenv
    /tmp/mkvenv/bin/pip install --no-deps mergekit==0.1.5
    /tmp/mkvenv/bin/python -m pytest -q scripts/crosscheck_mergekit.py

mergekit draws DARE/DELLA masks from torch's global generator, so the DARE cases hand it our seeded masks.
"""

import pytest
import torch

import hf_mudsc.solve.task_vectors as tm

mk = pytest.importorskip("mergekit.merge_methods")
import mergekit.sparsify as mks  # noqa: E402
from mergekit.merge_methods import merge_tensors  # noqa: E402


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


BASE = _rand(6, 7, seed=1)
PARENTS = [BASE + 0.1 * _rand(6, 7, seed=s) for s in (2, 3, 4)]
W = [1.0, 0.5, 2.0]


def ours(fn, **kw):
    out = fn({"w": BASE}, [{"w": p} for p in PARENTS], W, **kw)
    return out["w"]


def theirs(method, **params):
    return merge_tensors([BASE] + PARENTS, method, base_index=0,
                         parameters={"weight": W, **params})


@pytest.mark.parametrize("method,fn,params", [
    ("task_arithmetic", tm.task_arithmetic, {}),
    ("task_arithmetic", tm.task_arithmetic, {"normalize": True, "lambda": 0.7}),
    ("ties", tm.ties, {"density": 0.4}),
    ("ties", tm.ties, {"density": [0.2, 0.5, 0.9], "normalize": False}),
    ("ties", tm.ties, {"density": 0.3, "rescale": True, "lambda": 1.3}),
    ("breadcrumbs", tm.breadcrumbs, {"density": 0.6, "gamma": 0.05}),
    ("breadcrumbs_ties", tm.breadcrumbs_ties, {"density": 0.6, "gamma": 0.1}),
    ("breadcrumbs_ties", tm.breadcrumbs_ties, {"density": 0.9, "gamma": 0.2, "normalize": True}),
    ("dare_linear", tm.dare_linear, {}),  # density 1: deterministic
])
def test_deterministic_methods_equal(method, fn, params):
    kw = {("scaling" if k == "lambda" else k): v for k, v in params.items()}
    a = ours(fn, **kw)
    b = theirs(method, **params)
    assert torch.allclose(a, b, atol=1e-6, rtol=0), (a - b).abs().max()


@pytest.mark.parametrize("method,params", [
    ("task_arithmetic", {"lambda": 0.7}),
    ("ties", {"density": 0.3}),
    ("ties", {"density": [0.2, 0.5, 0.9], "rescale": True}),
    ("breadcrumbs_ties", {"density": 0.6, "gamma": 0.1}),
])
def test_row_chunked_merges_equal_mergekit(method, params):
    """hf_mudsc.solve.streamed (big tensors in row chunks, the streaming merge) against mergekit on whole tensors."""
    from hf_mudsc.solve import streamed

    base = _rand(301, 37, seed=1)
    # no equal magnitudes: mergekit's (unstable) argsort breaks ties its own way (test_tie_breaking_on_equal_...)
    parents = [base + 0.1 * _rand(301, 37, seed=s) for s in (2, 3, 4)]
    kw = {("scaling" if k == "lambda" else k): v for k, v in params.items()}
    a = streamed.merge_tensor(method, "w", streamed.TensorSource.of(base),
                              [streamed.TensorSource.of(p) for p in parents], W, kw, budget=4000)
    assert a is not None
    b = merge_tensors([base] + parents, method, base_index=0, parameters={"weight": W, **params})
    assert torch.allclose(a, b, atol=1e-6, rtol=0), (a - b).abs().max()


def test_linear_equal():
    a = tm.linear(None, [{"w": p} for p in PARENTS], W)["w"]
    b = merge_tensors(PARENTS, "linear", parameters={"weight": W})
    assert torch.allclose(a, b, atol=1e-6, rtol=0)
    a = tm.linear(None, [{"w": p} for p in PARENTS], W, normalize=False)["w"]
    b = merge_tensors(PARENTS, "linear", parameters={"weight": W, "normalize": False})
    assert torch.allclose(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 1.0])
def test_slerp_equal(t):
    x, y = PARENTS[0], PARENTS[1] * -0.3 + _rand(6, 7, seed=9)
    a = tm.slerp(None, [{"w": x}, {"w": y}], t=t)["w"]
    b = merge_tensors([x, y], "slerp", base_index=0, parameters={"t": t})
    assert torch.allclose(a, b, atol=1e-6, rtol=0)
    # near-colinear: lerp fallback in both
    z = x * 2.0 + 1e-4 * _rand(6, 7, seed=10)
    a = tm.slerp(None, [{"w": x}, {"w": z}], t=t)["w"]
    b = merge_tensors([x, z], "slerp", base_index=0, parameters={"t": t})
    assert torch.allclose(a, b, atol=1e-6, rtol=0)


def test_tie_breaking_on_equal_magnitudes():
    # equal magnitudes: we break ties by flat index; mergekit's argsort is not stable in
    # general, but agrees on this small CPU tensor
    base = torch.zeros(8)
    p = torch.tensor([1.0, -2.0, 2.0, 2.0, -1.0, 0.5, 2.0, -0.5])
    a = tm.ties({"w": base}, [{"w": p}], [1.0], density=0.25)["w"]
    b = merge_tensors([base, p], "ties", base_index=0, parameters={"weight": [1.0], "density": 0.25})
    assert torch.equal(a != 0, b != 0), (a, b)


@pytest.mark.parametrize("method,fn,consensus", [
    ("dare_linear", tm.dare_linear, False),
    ("dare_ties", tm.dare_ties, True),
])
@pytest.mark.parametrize("rescale", [True, False])
def test_dare_equal_given_the_same_masks(monkeypatch, method, fn, consensus, rescale):
    """Feed mergekit our seeded masks (it draws from torch's global RNG) and compare."""
    density, seed = 0.35, 11
    masks = [tm.bernoulli_mask(p - BASE, density, tm.tensor_generator(seed, "w", i))
             for i, p in enumerate(PARENTS)]
    queue = list(masks)
    real = torch.bernoulli

    def fake_bernoulli(x, *args, **kwargs):
        m = queue.pop(0)
        assert m.shape == x.shape
        return m.to(x.dtype)

    monkeypatch.setattr(mks.torch, "bernoulli", fake_bernoulli)
    b = theirs(method, density=density, rescale=rescale)
    monkeypatch.setattr(mks.torch, "bernoulli", real)
    assert not queue
    a = ours(fn, density=density, rescale=rescale, seed=seed)
    assert torch.allclose(a, b, atol=1e-6, rtol=0), (a - b).abs().max()


def test_l1_rescale_equal():
    d = _rand(5, 5, seed=12)
    m = (torch.rand(5, 5, generator=torch.Generator().manual_seed(13)) < 0.4).float()
    assert torch.allclose(tm.l1_rescale(d, m), mks.rescaled_masked_tensor(d, m, mks.RescaleNorm.l1))


def test_sparsifiers_equal():
    d = _rand(9, 11, seed=14)
    for dens in (0.05, 0.3, 0.77):
        assert torch.equal(d * tm.magnitude_mask(d, dens), mks.magnitude(d, dens))
        for gamma in (0.0, 0.01, 0.1, 0.5):
            assert torch.equal(d * tm.outlier_mask(d, dens, gamma),
                               mks.magnitude_outliers(d, dens, gamma=gamma))
    tiny = torch.tensor([0.3, -0.1, 0.2])
    assert torch.equal(tiny * tm.magnitude_mask(tiny, 0.1), mks.magnitude(tiny, 0.1))  # k >= 1


@pytest.mark.parametrize("method,fn", [("della", tm.della), ("della_linear", tm.della_linear)])
def test_della_equal_given_the_same_generators(monkeypatch, method, fn):
    """mergekit draws bernoulli(probs) from the global RNG; give it our per-parent generators."""
    seed = 5
    calls = iter(range(len(PARENTS)))
    real = torch.bernoulli

    def seeded_bernoulli(p, *args, **kwargs):
        return real(p, generator=tm.tensor_generator(seed, "w", next(calls)))

    monkeypatch.setattr(mks.torch, "bernoulli", seeded_bernoulli)
    b = theirs(method, density=0.5, epsilon=0.2)
    monkeypatch.setattr(mks.torch, "bernoulli", real)
    a = ours(fn, density=0.5, epsilon=0.2, seed=seed)
    assert torch.allclose(a, b, atol=1e-6, rtol=0), (a - b).abs().max()
