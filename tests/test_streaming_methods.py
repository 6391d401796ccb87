"""Big tensors of the tensor-wise methods merged in row chunks (`hf_mudsc.solve.streamed`): equal to the pure
functions of `hf_mudsc.solve.task_vectors` on whole tensors, with each parent's whole tensor read one parent at a
time and only row chunks of every parent held together (issue 13: 8 parents <= 1.5x the memory of 2)."""

from __future__ import annotations

import weakref

import pytest
import torch
from factories import make_model
from safetensors.torch import save_file

import hf_mudsc
from hf_mudsc.load.lazy import LazyParameters, Subset, rows_of, shape_of
from hf_mudsc.methods import METHODS
from hf_mudsc.solve import streamed
from hf_mudsc.solve import task_vectors as tv
from hf_mudsc.solve.streamed import RankWindow, TensorSource, chunk_rows

SHAPE = (301, 37)  # 11137 entries: not a multiple of torch's vector blocks, so the tail path is exercised
BUDGET = 4000  # entries per chunk over all inputs: 128-row chunks here (3 chunks)


def family(n: int, seed: int = 0, shape: tuple[int, ...] = SHAPE) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and `n` parents whose task vectors are multiples of 1/20: many equal magnitudes, so the trims'
    thresholds fall inside runs of ties."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    return base, [base + torch.round(2 * torch.randn(shape, generator=generator)) / 20 for _ in range(n)]


class CountingSource:
    """Sources over in-memory tensors that count reads and track how many whole parent tensors are alive."""

    def __init__(self, tracked: str = "") -> None:
        self.tracked = tracked  # alive copies are tracked for labels ending so
        self.whole_reads: list[str] = []
        self.row_reads: list[tuple[str, int, int]] = []
        self.alive: set[int] = set()
        self.most_alive = 0

    def __call__(self, label: str, tensor: torch.Tensor) -> TensorSource:
        def read() -> torch.Tensor:
            self.whole_reads.append(label)
            copy = tensor.clone()  # a new tensor per read, as LazyParameters returns
            if label != "base" and not label.startswith("base:") and label.endswith(self.tracked):
                key = id(copy)
                self.alive.add(key)
                weakref.finalize(copy, self.alive.discard, key)
                self.most_alive = max(self.most_alive, len(self.alive))
            return copy

        def read_rows(start: int, stop: int) -> torch.Tensor:
            self.row_reads.append((label, start, stop))
            return tensor[start:stop].clone()

        return TensorSource(tuple(tensor.shape), read, read_rows)


# function, keywords (with ties at the thresholds and every rescale / seed path)
CASES = [
    ("linear", {"normalize": True}),
    ("linear", {"normalize": False}),
    ("task_arithmetic", {"scaling": 0.7}),
    ("ties", {"density": 0.2}),
    ("ties", {"density": 0.35, "rescale": True, "normalize": False}),
    ("breadcrumbs", {"density": 0.8, "gamma": 0.05}),
    ("breadcrumbs_ties", {"density": 0.5, "gamma": 0.1, "rescale": True}),
    ("dare_linear", {"density": 0.5, "seed": 3}),
    ("dare_ties", {"density": 0.3, "seed": 1, "rescale": False}),
    ("della", {"density": 0.5, "epsilon": 0.1, "seed": 2}),
    ("della_linear", {"density": 0.4, "seed": 2}),
    ("consensus", {"k": 2, "tall_mask_lambda": 0.5}),
]


@pytest.mark.parametrize("n", [2, 5])
@pytest.mark.parametrize(("function", "keywords"), CASES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(CASES)])
def test_chunked_merge_equals_the_pure_function_on_whole_tensors(function, keywords, n):
    base, parents = family(n, seed=n)
    weights = [0.5 + 0.25 * i for i in range(n)]
    uses_base = function != "linear"
    expected = getattr(tv, function)({"w": base} if uses_base else None, [{"w": p} for p in parents], weights,
                                     **keywords)["w"]
    count = CountingSource()
    got = streamed.merge_tensor(function, "w", count("base", base) if uses_base else None,
                                [count(f"p{i}", p) for i, p in enumerate(parents)], weights, keywords, budget=BUDGET)
    assert got is not None
    assert got.dtype == expected.dtype and torch.equal(got, expected)
    # several chunks, each read once from every parent, covering the rows in order
    chunks = sorted({(start, stop) for _, start, stop in count.row_reads})
    assert len(chunks) >= 3 and chunks[0][0] == 0 and chunks[-1][1] == SHAPE[0]
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
    assert all((stop - start) * SHAPE[1] % streamed.ALIGN == 0 for start, stop in chunks[:-1])
    assert len(count.row_reads) == len(chunks) * (n + uses_base)
    # the whole tensor is read only by phase 1 (trims, L1 rescale), once per parent, one parent at a time
    needs_statistics = function in ("ties", "breadcrumbs", "breadcrumbs_ties") or (
        tv.GTA_FORMS.get(function, (None,))[0] in ("random", "della_magprune") and keywords.get("rescale", True))
    parent_reads = [label for label in count.whole_reads if label != "base"]
    assert parent_reads == ([f"p{i}" for i in range(n)] if needs_statistics else [])
    assert count.most_alive <= 1


def test_the_merge_actually_moves_the_base():
    """Guard against vacuous equalities: the chunked TIES result differs from the base and from task arithmetic."""
    base, parents = family(3)
    sources = [TensorSource.of(p) for p in parents]
    ties = streamed.merge_tensor("ties", "w", TensorSource.of(base), sources, None, {"density": 0.2}, budget=BUDGET)
    arithmetic = streamed.merge_tensor("task_arithmetic", "w", TensorSource.of(base), sources, budget=BUDGET)
    assert not torch.equal(ties, base) and not torch.equal(ties, arithmetic)


def test_parents_that_lack_the_tensor_do_not_contribute():
    base, parents = family(4)
    expected = tv.ties({"w": base}, [{"w": p} if i != 1 else {} for i, p in enumerate(parents)], [1, 2, 3, 4],
                       density=0.3)["w"]
    sources = [TensorSource.of(p) if i != 1 else None for i, p in enumerate(parents)]
    got = streamed.merge_tensor("ties", "w", TensorSource.of(base), sources, [1, 2, 3, 4], {"density": 0.3},
                                budget=BUDGET)
    assert torch.equal(got, expected)


@pytest.mark.parametrize(("density", "chunk"), [(0.5, 2), (0.3, 3), (0.01, 4), (0.99, 5)])
def test_rank_window_reproduces_the_stable_sort_tie_rule_known_answer(density, chunk):
    """Magnitudes with runs of ties: the TIES trim keeps the first entries (flat order) of the tie at the
    threshold; the window, fed chunk by chunk, keeps exactly those."""
    delta = torch.tensor([3.0, -1.0, 2.0, -2.0, 2.0, 0.0, 2.0, 1.0, -3.0, 2.0, 0.5, -2.0])
    lo, hi = tv.magnitude_window(delta.numel(), density)
    window = RankWindow.build(delta, lo, hi)
    got = torch.cat([window.mask(delta[s:s + chunk]) for s in range(0, delta.numel(), chunk)])
    assert torch.equal(got, tv.magnitude_mask(delta, density))
    if density == 0.5:  # k = 6: both 3s, then the first four of the six 2s (flat indices 2, 3, 4, 6)
        assert got.tolist() == [1, 0, 1, 1, 1, 0, 1, 0, 1, 0, 0, 0]


@pytest.mark.parametrize(("density", "gamma"), [(0.5, 0.2), (0.25, 0.0), (0.9, 0.3), (0.0, 0.1), (1.0, 0.1)])
def test_rank_window_reproduces_breadcrumbs_outlier_mask(density, gamma):
    delta = torch.round(torch.randn(97, generator=torch.Generator().manual_seed(5)) * 3) / 3
    window = RankWindow.build(delta, *tv.outlier_window(delta.numel(), density, gamma))
    got = torch.cat([window.mask(delta[s:s + 10]) for s in range(0, 97, 10)])
    assert torch.equal(got, tv.outlier_mask(delta, density, gamma))


def test_chunk_rows_aligns_chunks_and_leaves_small_or_1d_tensors_whole():
    assert chunk_rows((30522, 384), 9, 1 << 21) == 606  # 2**21 // (9 * 384) = 606; 384 * 606 % 128 == 0
    assert chunk_rows((301, 37), 6, 4000) == 128  # 37 is odd: rows come in multiples of 128
    assert chunk_rows((100, 10), 3, 4000) is None  # fits the budget whole
    assert chunk_rows((100000,), 3, 4000) is None  # 1-D: DELLA ranks within a row
    assert chunk_rows((1, 100000), 3, 4000) is None


def test_tensors_it_does_not_chunk_are_left_to_the_pure_function():
    base, parents = family(2)
    sources = [TensorSource.of(p) for p in parents]
    assert streamed.merge_tensor("ties", "w", TensorSource.of(base), sources, budget=1 << 30) is None  # small
    assert streamed.merge_tensor("ties", "w", None, sources, budget=BUDGET) is None  # no base: the function raises
    other = TensorSource.of(torch.zeros(300, 37))
    assert streamed.merge_tensor("ties", "w", TensorSource.of(base), [sources[0], other], budget=BUDGET) is None
    broken = parents[1].clone()
    broken[7, 3] = float("nan")
    assert streamed.merge_tensor("ties", "w", TensorSource.of(base), [sources[0], TensorSource.of(broken)],
                                 budget=BUDGET) is None
    ids = torch.arange(300 * 40).reshape(300, 40)  # an integer buffer: the function copies it
    assert streamed.merge_tensor("ties", "w", TensorSource.of(ids), [TensorSource.of(ids)] * 2, budget=BUDGET) is None
    copied = streamed.merge_tensor("linear", "w", None, [TensorSource.of(ids)] * 2, budget=BUDGET)
    assert copied.dtype == torch.int64 and torch.equal(copied, ids)


def test_lazy_parameters_read_rows_without_reading_the_whole_tensor(tmp_path, monkeypatch):
    tensors = {"a": torch.arange(24, dtype=torch.float16).reshape(6, 4), "b": torch.ones(3)}
    save_file(tensors, tmp_path / "model.safetensors")
    lazy = LazyParameters([tmp_path / "model.safetensors"], dtype=torch.float32)
    import hf_mudsc.load.lazy as module

    real_open = module.safe_open
    whole: list[str] = []

    class NoWholeReads:
        def __init__(self, *args, **kwargs):
            self.handle = real_open(*args, **kwargs)

        def __enter__(self):
            handle = self.handle.__enter__()

            class Handle:
                def get_slice(self, name):
                    return handle.get_slice(name)

                def get_tensor(self, name):
                    whole.append(name)
                    return handle.get_tensor(name)

            return Handle()

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

    monkeypatch.setattr(module, "safe_open", NoWholeReads)
    rows = lazy.rows("a", 2, 5)
    assert rows.dtype == torch.float32 and torch.equal(rows, tensors["a"][2:5].float())
    view = Subset(lazy, lambda name: name == "a")
    assert shape_of(view, "a") == (6, 4) and torch.equal(rows_of(view, "a", 5, 6), tensors["a"][5:].float())
    with pytest.raises(KeyError):
        view.rows("b", 0, 1)
    assert whole == []
    held = {"a": tensors["a"]}
    assert shape_of(held, "a") == (6, 4) and torch.equal(rows_of(held, "a", 0, 2), tensors["a"][:2])


def save(model: torch.nn.Module, folder):
    model.save_pretrained(folder)
    return folder


def fine_tune(base: torch.nn.Module, seed: int) -> torch.nn.Module:
    model = type(base)(base.config)
    model.load_state_dict(base.state_dict())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.round(torch.randn(parameter.shape, generator=generator)) / 20)
    return model.eval()


@pytest.mark.parametrize(("method", "keywords", "expected"), [
    ("ties", {}, lambda b, p: tv.ties(b, p, None, density=0.2, normalize=True)),
    ("dare_ties", {"seed": 5}, lambda b, p: tv.dare_ties(b, p, None, density=0.5, normalize=False, seed=5)),
    ("linear", {"weights": [1.0, 2.0, 0.5]}, lambda b, p: tv.linear(None, p, [1.0, 2.0, 0.5])),
    ("localize_stitch", {}, lambda b, p: tv.localize_stitch(b, p, None, sparsity=0.1)),
])
def test_merge_of_folder_parents_reads_big_tensors_in_row_chunks_and_equals_the_pure_function(
        tmp_path, monkeypatch, method, keywords, expected):
    """Through `hf_mudsc.merge` with a small chunk budget: lazily read parents are read by rows for the chunked
    tensors, and the merged model equals the pure function on whole state dicts."""
    base = make_model("bert_cls", 0)
    parents = [fine_tune(base, seed) for seed in (1, 2, 3)]
    folders = [save(p, tmp_path / f"ft-{i}") for i, p in enumerate(parents)]
    monkeypatch.setattr(streamed, "DEFAULT_BUDGET", 512)
    row_reads: list[str] = []
    real_rows = LazyParameters.rows

    def spy(self, name, start, stop):
        if stop - start > 1:  # (0, 1): localize_stitch looks at the base's dtype
            row_reads.append(name)
        return real_rows(self, name, start, stop)

    monkeypatch.setattr(LazyParameters, "rows", spy)
    merged = hf_mudsc.merge(folders, base=save(base, tmp_path / "base"), method=method, progress=False, **keywords)
    state = {n: t.detach().clone() for n, t in base.named_parameters()}
    want = expected(state, [{n: t.detach().clone() for n, t in p.named_parameters()} for p in parents])
    got = dict(merged.named_parameters())
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    inputs = len(parents) + METHODS[method].needs_base_model
    chunked = {n for n in want if chunk_rows(tuple(want[n].shape), inputs, 512) is not None}
    assert "bert.embeddings.word_embeddings.weight" in chunked
    assert set(row_reads) == chunked


def test_registry_marks_the_chunked_methods():
    chunked = {name for name, method in METHODS.items() if getattr(method, "chunked", False)}
    assert chunked == {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
                       "breadcrumbs_ties", "della", "della_linear", "consensus"}


def state_family(n: int, seed: int = 0) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Hand-made state dicts: a tensor spanning several chunks, small ones, a 0-d scalar, an integer buffer."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {"emb": (301, 37), "w": (8, 5), "b": (7,), "scale": ()}
    base = {k: torch.randn(shape, generator=generator) for k, shape in shapes.items()}
    base["ids"] = torch.arange(6)
    parents = []
    for _ in range(n):
        parents.append({k: (v + torch.round(2 * torch.randn(v.shape, generator=generator)) / 20
                            if v.is_floating_point() else v.clone()) for k, v in base.items()})
    return base, parents


@pytest.mark.parametrize("n", [2, 5])
@pytest.mark.parametrize(("sparsity", "exclude"), [(0.1, ()), (0.3, ("w",))])
def test_streamed_localize_stitch_equals_the_pure_function(n, sparsity, exclude):
    base, parents = state_family(n, seed=n)
    del parents[-1]["w"]  # a parent without a tensor does not contribute to it
    weights = [1.0 + 0.5 * i for i in range(n)]
    expected = tv.localize_stitch(base, parents, weights, sparsity=sparsity, exclude=exclude)
    count = CountingSource(tracked=":emb")
    labels = {id(base): "base", **{id(p): f"p{i}" for i, p in enumerate(parents)}}

    def source(mapping, name):
        return count(f"{labels[id(mapping)]}:{name}", mapping[name]) if name in mapping else None

    got = streamed.localize_stitch(base, parents, weights, sparsity=sparsity, exclude=exclude, source=source,
                                   budget=BUDGET)
    assert list(got) == list(expected)
    assert all(got[k].dtype == expected[k].dtype and torch.equal(got[k], expected[k]) for k in expected)
    assert not torch.equal(got["emb"], base["emb"])
    # phase 1: each parent's tensors read whole once, parent after parent; then the big tensor only by rows
    ranked = [k for k in ("emb", "w", "b", "scale") if k not in exclude]
    phase1 = [f"p{i}:{k}" for i in range(n) for k in ranked if k in parents[i]]
    parent_reads = [label for label in count.whole_reads if not label.startswith("base")]
    assert parent_reads[: len(phase1)] == phase1
    assert not any(label.endswith(":emb") for label in parent_reads[len(phase1):])
    chunks = {label for label, start, stop in count.row_reads if stop - start > 1}  # (0, 1): the base's dtype
    assert chunks == {"base:emb"} | {f"p{i}:emb" for i in range(n)}
    assert count.most_alive == 1  # the big tensor: one parent's copy at a time


@pytest.mark.parametrize("sparsity", [0.0, 1e-9])
def test_streamed_and_pure_localize_stitch_refuse_a_sparsity_that_keeps_nothing_alike(sparsity):
    """Both kept no entry (the merge was the base, silently); both refuse it with the same message."""
    base, parents = state_family(2, seed=2)
    with pytest.raises(ValueError, match="keeps none of each task vector's") as pure:
        tv.localize_stitch(base, parents, sparsity=sparsity)
    count = CountingSource()
    with pytest.raises(ValueError) as chunked:
        streamed.localize_stitch(base, parents, sparsity=sparsity, budget=BUDGET,
                                 source=lambda mapping, name: count(name, mapping[name]) if name in mapping else None)
    assert str(chunked.value) == str(pure.value)


def test_streamed_localize_stitch_hands_refused_inputs_to_the_pure_function():
    base, parents = state_family(2)
    parents[1]["w"] = torch.zeros(8, 6)

    def source(mapping, name):
        return TensorSource.of(mapping[name]) if name in mapping else None

    with pytest.raises(ValueError, match="parent 0 has shape"):
        streamed.localize_stitch(base, parents, source=source)
