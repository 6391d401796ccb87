"""Regressions the review of session 33's commits found (each test failed before its fix)."""

from __future__ import annotations

import pytest
import torch

from hf_mudsc.calibrate.correlation import column_sums


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(70, 33), (2048, 768), (512, 3072), (1, 5)])
def test_column_sums_are_torchs_float64_sums_for_float32_and_float64_rows(dtype, shape):
    """numpy's row-after-row sums equal torch's for float32 rows only; float64 rows (statistics_dtype="float64")
    keep torch's own, more accurate order."""
    x = (torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3 + 1).to(dtype)
    expected = x.sum(0, dtype=torch.float64)
    got = column_sums(x)
    assert got.dtype == torch.float64
    assert torch.equal(got, expected)
    if dtype == torch.float32:  # a non-contiguous view sums alike (numpy reads it in place)
        assert torch.equal(column_sums(x.T.contiguous().T), expected)


def test_the_evaluation_chart_draws_parents_in_merge_order_past_z():
    """The chart sorted its parent scorers by name: `parent_27` came before `parent_a`. Merge order now."""
    from hf_mudsc.evaluate.names import parent_names
    from hf_mudsc.publish.plots import accuracy_figure

    names = parent_names(28)
    scores = {name: {"task_a": {"accuracy": 0.5}, "joint": {"accuracy": 0.5}} for name in reversed(names)}
    scores["ensemble"] = {"task_a": {"accuracy": 0.9}, "joint": {"accuracy": 0.8}}
    figure = accuracy_figure({"scores": scores, "tasks": {"task_a": {}}, "metric": "accuracy"})
    legend = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    from hf_mudsc.errors import parent_label

    assert legend[:28] == [f"parent {parent_label(index)}" for index in range(28)]  # A, B, ..., Z, 27, 28


def test_the_dry_run_refuses_fisher_for_loaded_parents_holding_inference_tensors():
    """A `LoadedParent` (the pipeline's own parent form) wrapping a model made under torch.inference_mode: the merge
    refuses fisher for it, and so does its dry run now (it checked bare model objects only)."""
    from factories import fine_tune, make_batches, make_model

    import hf_mudsc
    from hf_mudsc.errors import MergeInputError
    from hf_mudsc.load.parents import LoadedParent

    base = make_model("vit_cls", 0)
    with torch.inference_mode():
        tuned = [fine_tune(base, seed=seed, scale=0.05) for seed in (1, 2)]
    for model in tuned:  # as from_pretrained records it
        model.config.architectures = [type(model).__name__]
    parents = [LoadedParent(model=model, processor=None, reference=f"object-{index}", from_object=True)
               for index, model in enumerate(tuned)]
    batches = make_batches("vit_cls", num_batches=2, batch_size=4)
    messages = []
    for dry_run in (False, True):
        with pytest.raises(MergeInputError, match="inference") as refused:
            hf_mudsc.merge(parents, batches, method="fisher", progress=False, dry_run=dry_run)
        messages.append(str(refused.value))
    assert messages[0] == messages[1]
