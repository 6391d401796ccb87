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

    names = parent_names(28)  # in merge order, after the merged model, as the evaluation writes them
    scores = {"merged": {"task_a": {"accuracy": 0.7}, "joint": {"accuracy": 0.6}}}
    scores.update({name: {"task_a": {"accuracy": 0.5}, "joint": {"accuracy": 0.5}} for name in names})
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


def _bert_parents(attention: str, tokens: int) -> list:
    from transformers import BertConfig, BertForSequenceClassification

    config = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                  max_position_embeddings=tokens + 2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                  num_labels=3)
    parents = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        parents.append(BertForSequenceClassification(BertConfig(**config, attn_implementation=attention)).eval())
    return parents


def _bert_batches(tokens: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(1, 60, (16, tokens), generator=generator),
             "attention_mask": torch.ones(16, tokens, dtype=torch.long)} for _ in range(2)]


@pytest.mark.parametrize("cache", [None, 0])
def test_refit_stores_no_more_than_the_dry_run_counts_with_eager_attention_or_split_blocks(monkeypatch, cache):
    """Since the parents replay units (f04838d) a parent whose chunk of steps ends between fc1 and fc2 keeps its MLP
    hidden layer too, and an eager attention's units kept its probabilities (heads × tokens per token): the refit
    stored more than `plan.refit_bytes` counts. Units now store a tuple's first item only where the model's output
    allows (`Unit.slim`), and a parent counts as the merged model does: eager stores what sdpa stores, within the
    count, the refitted weights unchanged."""
    import hf_mudsc
    from hf_mudsc.apply import refit
    from hf_mudsc.plan import refit_bytes

    if cache is not None:
        monkeypatch.setattr(refit, "TARGET_CACHE_BYTES", cache)
    tokens = 20
    stored, weights = {}, {}
    for attention in ("sdpa", "eager"):
        merged = hf_mudsc.merge(_bert_parents(attention, tokens), _bert_batches(tokens), matcher="align",
                                refit="ridge", progress=False, refit_samples=None)
        stored[attention] = merged.merge_report.refit.stored_bytes
        weights[attention] = merged.state_dict()
    counted = refit_bytes([(0, 48, 0.0)], 32, 2, 32, tokens)  # the stored outputs' term alone (no targets, Grams)
    assert stored["eager"] == stored["sdpa"] <= counted
    assert all(torch.allclose(weights["sdpa"][name], weights["eager"][name], atol=1e-5) for name in weights["sdpa"])


def test_slim_units_of_an_eager_attention_refit_bit_for_bit_as_without_units(monkeypatch):
    """The slimmed units (their attention probabilities not kept) give the refit of no units at all, bit for bit."""
    import hf_mudsc
    from hf_mudsc.apply import block_replay

    tokens, states = 12, []
    for units in (True, False):
        with monkeypatch.context() as patch:
            if not units:
                patch.setattr(block_replay, "_unit_candidates", lambda *args: [])
            merged = hf_mudsc.merge(_bert_parents("eager", tokens), _bert_batches(tokens), matcher="align",
                                    refit="ridge", progress=False, refit_samples=None)
        states.append(merged.state_dict())
    assert all(torch.equal(states[0][name], states[1][name]) for name in states[0])
    parents = _bert_parents("eager", tokens)
    from hf_mudsc.apply.refit import forward_steps, refit_layers
    from hf_mudsc.architectures import spec_for

    batch = _bert_batches(tokens)[0]
    layers = [name for step in forward_steps(parents[0], refit_layers(parents[0], spec_for(parents[0])), batch)
              for name in step]
    (chain,) = block_replay.find_chains(parents[0], layers, batch)
    assert {unit.name.split(".", 4)[-1]: unit.slim for unit in chain.units if ".layer.0." in unit.name} == {
        "attention": True, "attention.self": True, "attention.output": False, "intermediate": False}
