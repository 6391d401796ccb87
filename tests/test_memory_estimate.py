"""The dry run's peak memory for the methods that do not match units (docs/design.md, "Dry run", held memory).

QA s24 measured BERT-base regmean at 6.14 GB peak RSS against a 2.57 GB estimate: the estimate counted the parents'
weights (2.5 x each) and a runtime, not regmean's float64 systems and Grams (~4.3 GB on BERT-base), nor the
relation check's float64 copies of the largest tensor (~1.1 GB, the peak of a linear merge). These tests check the
estimate's terms against what the merge really allocates, on tiny models.
"""

from __future__ import annotations

import pytest
import torch
from factories import make_batches, make_model

import hf_mudsc
from hf_mudsc.plan import (
    DATA_READER_BYTES,
    PROCESS_BYTES,
    RELATION_BYTES_PER_VALUE,
    RUNTIME_BYTES,
    STATISTICS_FACTOR,
    WEIGHTS_FACTOR,
    estimate_cost,
)


def _parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("count", [2, 3])
def test_regmean_estimate_counts_the_systems_grams_and_average_the_merge_allocates(monkeypatch, count):
    """RegMean holds every linear layer's float64 system (`in x in` and `in x out`) for the whole pass, the Grams of
    the parent being read (one set: a parent's are freed before the next one's pass), and the weighted average of
    every tensor —
    none of which the estimate counted (2.4x low on BERT-base). The plan's method term now equals the bytes of the
    tensors the merge allocates, whatever the number of parents (they are flat in it); each parent held adds 4 bytes
    per parameter."""
    from hf_mudsc.calibrate import layer_inputs
    from hf_mudsc.solve import regmean

    models = [make_model("bert_cls", seed) for seed in range(1, count + 1)]
    data = make_batches("bert_cls", num_batches=2, batch_size=8)
    plan = hf_mudsc.merge(models, data, method="regmean", refit="none", dry_run=True)

    systems, grams = [], []
    system_init, gram_init = regmean.RegMeanSystem.__init__, layer_inputs.GramAccumulator.__init__

    def spy_system(self, *args, **kwargs):
        system_init(self, *args, **kwargs)
        systems.append(self)

    def spy_gram(self, *args, **kwargs):
        gram_init(self, *args, **kwargs)
        grams.append(self)

    monkeypatch.setattr(regmean.RegMeanSystem, "__init__", spy_system)
    monkeypatch.setattr(layer_inputs.GramAccumulator, "__init__", spy_gram)
    hf_mudsc.merge(models, data, method="regmean", refit="none", progress=False)
    parameters = _parameters(models[0])
    system_bytes = sum(s.lhs.nbytes + s.rhs.nbytes for s in systems)
    one_pass = sum(g.sum.nbytes for g in grams) / count  # one Gram set per parent's pass
    assert system_bytes > 0 and one_pass > 0
    held = 4 * parameters + system_bytes + one_pass  # the average, the systems, one parent's Grams
    estimate = plan.estimate
    assert estimate.method_bytes == held
    assert "regmean's working set" in str(plan) and "statistics 0 B" not in str(plan)  # was "(statistics 0 B)"
    assert estimate.peak_memory_bytes >= PROCESS_BYTES + DATA_READER_BYTES + count * 4 * parameters + held
    # today's formula (runtime + 2.5 x the weights, no term for regmean) is below what these tensors need
    assert estimate.peak_memory_bytes > RUNTIME_BYTES + WEIGHTS_FACTOR * count * 4 * parameters + held / 2


def test_the_peak_is_the_largest_phase_on_hand_made_sizes():
    """Held memory by phase (`estimate_cost`, non-unit-matching methods): the relation check (every parent held,
    `RELATION_BYTES_PER_VALUE` per value of the largest tensor: its sorted copies, + that tensor read from a
    streamed parent), the method
    (its `method_bytes`, with the process and the data reader) and the build (the merged tensors and the merged model:
    8 bytes per parameter, + the refit's working set). A unit-matching merge keeps its fitted formula unless the
    relation check holds more."""
    kwargs = dict(widths=[2], columns=[4], group_tokens=[1], linear_params={"w": 10}, tokens={"": 1},
                  num_parameters=1000, rows=None, needs_statistics=False, matmul_flops=1e9)
    relation = estimate_cost(**kwargs, solves=False, parents=2, whole=1, largest_tensor=10**6, method_bytes=4000)
    assert relation.peak_memory_bytes == PROCESS_BYTES + 4000 + (RELATION_BYTES_PER_VALUE + 4) * 10**6
    method = estimate_cost(**kwargs, solves=False, parents=3, largest_tensor=10, method_bytes=10**8, reads_data=True)
    assert method.peak_memory_bytes == PROCESS_BYTES + DATA_READER_BYTES + 3 * 4000 + 10**8
    assert method.method_bytes == 10**8
    build = estimate_cost(**kwargs, solves=False, parents=2, largest_tensor=10, method_bytes=4000, refit="ridge",
                          refit_memory=5e7, reads_data=True)
    assert build.peak_memory_bytes == PROCESS_BYTES + DATA_READER_BYTES + 2 * 4000 + 8000 + 5e7
    big = {**kwargs, "num_parameters": 10**8}  # unit matching: the fitted formula, larger than the check's
    fitted = estimate_cost(**big, largest_tensor=10**6)
    assert fitted.peak_memory_bytes == pytest.approx(RUNTIME_BYTES + WEIGHTS_FACTOR * 8 * 10**8)
    assert fitted.method_bytes == 0
    # one tensor holding nearly every parameter (a small model with a large vocabulary): the check holds more
    checked = estimate_cost(**{**kwargs, "num_parameters": 10**7}, largest_tensor=10**7)
    assert checked.peak_memory_bytes == PROCESS_BYTES + 8 * 10**7 + RELATION_BYTES_PER_VALUE * 10**7
    assert checked.peak_memory_bytes > RUNTIME_BYTES + WEIGHTS_FACTOR * 8 * 10**7
    with_statistics = estimate_cost(**{**big, "needs_statistics": True, "rows": 4}, largest_tensor=10**6)
    assert with_statistics.peak_memory_bytes == pytest.approx(
        RUNTIME_BYTES + WEIGHTS_FACTOR * 8 * 10**8 + STATISTICS_FACTOR * 8 * 4**2)


def test_fisher_and_regmean_plusplus_count_their_own_working_sets():
    """Fisher holds float64 numerator and denominator sums, the last parent's float64 Fisher while the next one's
    is summed, a float32 batch sum and two classes' gradients (the last held while the next are computed): 44 bytes
    per parameter. RegMean++ holds the average and a working copy of parent A (8 bytes per parameter) and one
    block's systems and Grams at a time, not the whole model's as RegMean does."""
    from hf_mudsc.methods.registry import METHODS, PassFacts

    # two blocks of (in, out) layers and a head outside every block
    layers = ((8, 8, 0), (8, 32, 0), (32, 8, 0), (8, 8, 1), (8, 32, 1), (32, 8, 1), (8, 2, None))
    facts = PassFacts(forward=1.0, grams=1.0, parameters=1000, classes=2, blocks=2, layers=layers)
    assert METHODS["fisher"].working_bytes(facts, 2) == 44 * 1000
    systems = sum(8 * i * (i + o) for i, o, _ in layers)
    grams = sum(8 * i * i for i, _, _ in layers)
    assert METHODS["regmean"].working_bytes(facts, 2) == 4 * 1000 + systems + grams  # one parent's Grams at a time
    block = sum(8 * i * (i + o) + 8 * i * i for i, o, b in layers if b == 0)
    chained = METHODS["regmean_plusplus"].working_bytes(facts, 2)
    assert chained == 8 * 1000 + block  # blocks of equal shapes: one block's systems and Grams
    assert METHODS["linear"].working_bytes(facts, 5) == 4 * 1000  # the merged tensors


@pytest.mark.parametrize("method", ["regmean", "regmean_plusplus"])
def test_a_parents_grams_are_freed_before_the_next_parents_pass(monkeypatch, method):
    """RegMean kept the Grams of the parent just folded into the systems referenced while the next parent's pass
    accumulated its own (two Gram sets at the peak: 1.2 GB of BERT-base's 6.1). Each pass now starts with no earlier
    pass's Grams alive; the merge is the same."""
    import gc
    import weakref

    from hf_mudsc.calibrate import layer_inputs
    from hf_mudsc.methods import data as data_methods

    models = [make_model("bert_cls", seed) for seed in (1, 2, 3)]
    batches = make_batches("bert_cls", num_batches=2, batch_size=8)
    before = hf_mudsc.merge(models, batches, method=method, refit="none", progress=False).state_dict()
    alive_at_start = []
    earlier: list[weakref.ref] = []
    collect = layer_inputs.collect_grams

    def spy(*args, **kwargs):
        gc.collect()
        alive_at_start.append(sum(ref() is not None for ref in earlier))
        grams, examples = collect(*args, **kwargs)
        earlier.extend(weakref.ref(gram) for gram in grams.values())
        return grams, examples

    monkeypatch.setattr(data_methods, "collect_grams", spy, raising=False)
    monkeypatch.setattr(layer_inputs, "collect_grams", spy)
    after = hf_mudsc.merge(models, batches, method=method, refit="none", progress=False).state_dict()
    assert len(alive_at_start) >= 3 and set(alive_at_start) == {0}, alive_at_start
    assert all(torch.equal(before[key], after[key]) for key in before)


@pytest.mark.parametrize("method", ["regmean", "fisher"])
def test_the_memory_check_refuses_a_methods_working_set_that_cannot_fit(monkeypatch, method):
    """The check that refuses a merge before its weights are read counted the parents' weights and unit matching's
    statistics, not what regmean (float64 systems and Grams: 1.7x BERT-base's weights) or fisher (44 bytes per
    parameter) hold: a merge whose working set could not fit passed it and failed out of memory later. The floor
    now holds `MergeMethod.working_bytes` for a method that matches no units, and the one-line refusal names it."""
    import hf_mudsc.plan as plan
    from hf_mudsc.errors import MergeInputError
    from hf_mudsc.methods.registry import METHODS

    models = [make_model("bert_cls", seed) for seed in (1, 2)]
    data = make_batches("bert_cls", num_batches=1, batch_size=4)
    floor = plan.memory_floor(models[0], 2, METHODS[method], loading=0)
    working = hf_mudsc.merge(models, data, method=method, refit="none", dry_run=True).estimate.method_bytes
    assert working > 0 and floor == {"working": working}
    monkeypatch.setattr(plan, "available_memory", lambda: int(working / 2))
    with pytest.raises(MergeInputError) as error:
        hf_mudsc.merge(models, data, method=method, refit="none", progress=False)
    line = str(error.value)
    assert "\n" not in line and f"merging 2 parents with {method} needs at least " in line, line
    assert f"for {method}'s working set" in line and "merge on a machine with more memory" in line, line
    monkeypatch.setattr(plan, "available_memory", lambda: int(working * 1.01))
    hf_mudsc.merge(models, data, method=method, refit="none", progress=False)  # fits: merges


def test_autos_choice_is_not_refused_for_its_working_set_and_a_linear_refusal_offers_no_linear(monkeypatch):
    """Review of the working-set check: `auto`'s regmean was refused where it had merged (the user named no method;
    its working set is counted only when a user names the method), and a refused `linear` merge was told to choose
    "a method that reads the parents one tensor at a time (linear, ...)" — itself."""
    import hf_mudsc.plan as plan
    from hf_mudsc.errors import MergeInputError
    from hf_mudsc.methods.registry import METHODS

    model = make_model("bert_cls", 1)
    assert "working" not in plan.memory_floor(model, 2, METHODS["regmean"], loading=0, working=False)
    monkeypatch.setattr(plan, "available_memory", lambda: 1000)
    plan.check_memory(model, 2, METHODS["regmean"], loading=0, chosen="the parents share a base")  # not refused
    with pytest.raises(MergeInputError, match="regmean's working set"):
        plan.check_memory(model, 2, METHODS["regmean"], loading=0)
    with pytest.raises(MergeInputError) as error:
        plan.check_memory(model, 2, METHODS["linear"], loading=0)
    assert "merge on a machine with more memory" in str(error.value)
    assert "choose" not in str(error.value) and "(CLI: --method)" not in str(error.value)


def test_auto_merges_by_its_dataless_choice_when_regmeans_working_set_cannot_fit(monkeypatch, caplog, tmp_path):
    """`auto` chose regmean for fine-tunes of one base given calibration data whatever the memory: where regmean's
    working set (float64 systems and Grams, 1.7x BERT-base's weights) could not fit, the merge ran out of memory in
    its pass — while the dataless choice (linear) would have merged. Now `auto` falls back to it, says why (log,
    `method_choice_reason`) and merges exactly as `method="linear"`; with the memory, regmean as before."""
    import logging

    from factories import fine_tune

    import hf_mudsc.plan as plan
    from hf_mudsc.methods.registry import METHODS

    base = make_model("bert_cls", 0)
    parents = [fine_tune(base, seed, 0.05, relative=True) for seed in (1, 2)]
    data = make_batches("bert_cls", num_batches=2, batch_size=4)
    working = plan.memory_floor(parents[0], 2, METHODS["regmean"], loading=0)["working"]
    monkeypatch.setattr(plan, "available_memory", lambda: int(working / 2))
    with caplog.at_level(logging.WARNING, logger="hf_mudsc"):
        merged = hf_mudsc.merge(parents, data, progress=False)
    assert merged.config.mudsc["method"] == "linear"
    reason = merged.config.mudsc["method_choice_reason"]
    assert reason.endswith(": linear") and "regmean needs " in reason, reason
    assert "at once (its working set included) and " in reason, reason
    assert "regmean needs " in caplog.text and "so linear merges these parents instead" in caplog.text
    # The data goes unread, and the warning says why instead of advising the method that did not fit.
    unread = [text for text in merged.config.mudsc["warnings"] if text.startswith("the calibration data")]
    assert len(unread) == 1 and "because regmean does not fit in the memory available" in unread[0], unread
    assert "pass a method that reads it" not in caplog.text
    expected = hf_mudsc.merge(parents, method="linear", progress=False).state_dict()
    assert all(torch.equal(value, expected[name]) for name, value in merged.state_dict().items())
    # Parents given as folders: `auto` chooses before loading them whole, by the same rule.
    folders = []
    for letter, parent in zip("ab", parents):
        parent.save_pretrained(tmp_path / letter)
        folders.append(str(tmp_path / letter))
    from_folders = hf_mudsc.merge(folders, data, progress=False)
    assert from_folders.config.mudsc["method"] == "linear"
    assert "regmean needs " in from_folders.config.mudsc["method_choice_reason"]
    assert any("because regmean does not fit" in text for text in from_folders.config.mudsc["warnings"])
    monkeypatch.setattr(plan, "available_memory", lambda: int(working * 50))
    assert hf_mudsc.merge(parents, data, progress=False).config.mudsc["method"] == "regmean"
    assert hf_mudsc.merge(folders, data, progress=False).config.mudsc["method"] == "regmean"
