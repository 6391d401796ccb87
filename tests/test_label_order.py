"""Parents with the same labels in another `id2label` order: B's head is aligned to A's label order by name
(docs/design.md §6), not concatenated as if the label sets differed."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from factories import classifier_names, fine_tune, make_batches, make_model, permuted_copy

import hf_mudsc
from hf_mudsc.architectures import spec_for

NAMES = ["cat", "dog", "fox"]
KINDS = ["vit_cls", "bert_cls"]


def _named(model, names):
    """`model` (modified) with its labels called `names` in id order."""
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {name: i for i, name in enumerate(names)}
    return model


def _reordered(model, order):
    """A copy of `model` saved with another label order: its label `j` is `model`'s label `order[j]` (head rows,
    bias entries and `id2label` permuted together): the same function, labels listed differently."""
    clone = copy.deepcopy(model)
    names = [model.config.id2label[i] for i in order]
    _named(clone, names)
    params = dict(clone.named_parameters())
    with torch.no_grad():
        for name in classifier_names(clone):
            params[name].copy_(params[name][list(order)])
    return clone


def _head(model):
    params = dict(model.named_parameters())
    return [params[name].detach().clone() for name in classifier_names(model)]


def _logits_by_name(model, batch):
    """{label name: logits column}: what a pipeline reports, independent of the label order."""
    with torch.no_grad():
        logits = model(**batch).logits
    return {model.config.id2label[i]: logits[:, i] for i in range(logits.shape[-1])}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["average", "linear"])
def test_a_reordered_copy_averages_back_to_parent_a_with_one_label_set(kind, method, caplog):
    a = _named(make_model(kind, seed=0), NAMES)
    b = _reordered(a, [1, 2, 0])  # dog, fox, cat
    with caplog.at_level(logging.INFO, logger="hf_mudsc"):
        merged = hf_mudsc.merge([a, b], method=method, refit="none", progress=False)
    assert merged.config.id2label == a.config.id2label
    assert merged.config.label2id == a.config.label2id
    assert getattr(merged.config, "task_label_ranges", None) in (None, {})
    for got, want in zip(_head(merged), _head(a)):
        assert torch.allclose(got, want, atol=1e-6)
    assert merged.config.mudsc["head_reordered"] == [False, True]
    lines = [r.getMessage() for r in caplog.records if "label order" in r.getMessage()]
    assert len(lines) == 1 and "parent B" in lines[0], lines


@pytest.mark.parametrize("kind", KINDS)
def test_mudsc_recovers_parent_a_from_a_permuted_copy_with_reordered_labels(kind):
    a = _named(make_model(kind, seed=0), NAMES)
    b = _reordered(permuted_copy(a, spec_for(a), seed=1), [2, 0, 1])
    batches = make_batches(kind)
    merged = hf_mudsc.merge([a, b], batches, method="mudsc", matcher="zip", progress=False)
    assert merged.config.id2label == a.config.id2label
    for batch in batches[:2]:
        with torch.no_grad():
            want, got = a(**batch).logits, merged(**batch).logits
        assert float((got - want).abs().max() / want.abs().max()) < 1e-5


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method,permuted", [("regmean", False), ("zipit", True)])
def test_predictions_by_label_name_equal_the_parents(kind, method, permuted):
    """Two parents that compute the same function but list their labels differently: the merged model's logits
    by label name are theirs (a concatenated head would list every class twice). A position method (regmean) gets
    a copy in A's unit basis, a unit-matching one a permuted copy."""
    a = _named(make_model(kind, seed=0), NAMES)
    b = _reordered(permuted_copy(a, spec_for(a), seed=3) if permuted else a, [1, 2, 0])
    batches = make_batches(kind)
    merged = hf_mudsc.merge([a, b], batches, method=method, progress=False)
    assert sorted(merged.config.id2label.values()) == sorted(NAMES)
    for parent in (a, b):
        want, got = _logits_by_name(parent, batches[0]), _logits_by_name(merged, batches[0])
        for name in NAMES:
            assert torch.allclose(got[name], want[name], atol=1e-4 * float(want[name].abs().max()) + 1e-5), name


def test_the_pipeline_reports_each_label_once():
    from transformers import pipeline

    a = _named(make_model("bert_cls", seed=0), NAMES)
    b = _reordered(a, [2, 1, 0])
    merged = hf_mudsc.merge([a, b], method="average", refit="none", progress=False)
    classify = pipeline("text-classification", model=merged, tokenizer=_tokenizer(), top_k=None)
    scores = classify("a b c")
    got = {s["label"]: s["score"] for s in (scores[0] if isinstance(scores[0], list) else scores)}
    want = {s["label"]: s["score"] for s in _first(pipeline("text-classification", model=a, tokenizer=_tokenizer(),
                                                              top_k=None)("a b c"))}
    assert sorted(got) == sorted(NAMES)
    assert got == pytest.approx(want, abs=1e-5)


def _first(scores):
    return scores[0] if isinstance(scores[0], list) else scores


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{chr(ord("a") + i): 2 + i for i in range(26)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")


def test_three_parents_are_each_aligned_to_parent_a():
    a = _named(make_model("vit_cls", seed=0), NAMES)
    b, c = _reordered(a, [1, 2, 0]), _reordered(a, [2, 0, 1])
    merged = hf_mudsc.merge([a, b, c], method="linear", refit="none", progress=False)
    assert merged.config.id2label == a.config.id2label
    assert merged.config.mudsc["head_reordered"] == [False, True, True]
    for got, want in zip(_head(merged), _head(a)):
        assert torch.allclose(got, want, atol=1e-6)


def test_parents_passed_as_objects_come_back_unchanged():
    a = _named(make_model("vit_cls", seed=0), NAMES)
    b = _reordered(permuted_copy(a, spec_for(a), seed=1), [1, 2, 0])
    before = [({k: v.clone() for k, v in m.state_dict().items()}, m.config.to_dict()) for m in (a, b)]
    hf_mudsc.merge([a, b], make_batches("vit_cls"), method="mudsc", matcher="zip", progress=False)
    for model, (state, config) in zip((a, b), before):
        assert model.config.to_dict() == config
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, state[name]), name


def test_default_label_names_carry_no_order_and_are_merged_by_position_as_before():
    a = make_model("vit_cls", seed=0)  # LABEL_0, LABEL_1, LABEL_2
    b = _reordered(a, [1, 2, 0])  # its id2label now reads LABEL_1, LABEL_2, LABEL_0
    b.config.id2label = {i: f"LABEL_{i}" for i in range(3)}
    b.config.label2id = {f"LABEL_{i}": i for i in range(3)}
    merged = hf_mudsc.merge([a, b], method="average", refit="none", progress=False)
    params_a, params_b = _head(a), _head(b)
    for got, want_a, want_b in zip(_head(merged), params_a, params_b):
        assert torch.allclose(got, (want_a + want_b) / 2, atol=1e-6)
    assert merged.config.mudsc["head_reordered"] == [False, False]


def test_label_sets_that_differ_by_one_name_stay_concatenated():
    a = _named(make_model("vit_cls", seed=0), NAMES)
    b = _named(_reordered(a, [1, 2, 0]), ["dog", "fox", "owl"])
    merged = hf_mudsc.merge([a, b], method="average", refit="none", progress=False)
    assert merged.config.num_labels == 6
    assert set(merged.config.task_label_ranges) and len(merged.config.task_label_ranges) == 2
    assert merged.config.mudsc["head_reordered"] == [False, False]


def test_the_card_says_which_head_was_reordered(tmp_path):
    a = _named(make_model("vit_cls", seed=0), NAMES)
    b = _reordered(a, [1, 2, 0])
    merged = hf_mudsc.merge([a, b], method="average", refit="none", progress=False)
    card = (hf_mudsc.save_merged(merged, tmp_path / "merged") / "README.md").read_text()
    assert "parent B's head was reordered to parent A's label order" in " ".join(card.split())
    c = _reordered(a, [2, 0, 1])
    three = hf_mudsc.merge([a, b, c], method="linear", refit="none", progress=False)
    card = (hf_mudsc.save_merged(three, tmp_path / "three") / "README.md").read_text()
    assert "the heads of parents B, C were reordered to parent A's label order" in " ".join(card.split())


def test_evaluation_scores_a_reordered_parent_by_label_name():
    """The merged model has A's label order; parent B (A's function, labels listed in another order) is scored by
    label name: its columns taken into A's order, so it is right wherever A is — in the ensemble too."""
    from hf_mudsc import evaluate_merge

    a = _named(make_model("vit_cls", seed=0), NAMES)
    b = _reordered(a, [1, 2, 0])
    merged = hf_mudsc.merge([a, b], method="average", refit="none", progress=False)
    pixels = torch.cat([batch["pixel_values"] for batch in make_batches("vit_cls")])
    with torch.no_grad():
        truth = a(pixel_values=pixels).logits.argmax(-1)  # ids in A's (= the merged model's) order
    assert len(set(truth.tolist())) > 1  # the check below would pass with any column order otherwise
    result = evaluate_merge(merged, [a, b], {"animals": (pixels, truth)}, progress=False)
    for scorer in ("merged", "parent_a", "parent_b", "ensemble"):
        assert result.score(scorer, "animals") == 1.0, scorer


def test_parents_read_lazily_from_folders_are_aligned_too(tmp_path):
    """A tensor-wise method reads parent B from its safetensors file one tensor at a time: its head rows are
    reordered there as well, and its folder is left as it was."""
    a = _named(make_model("bert_cls", seed=0), NAMES)
    b = _reordered(a, [2, 0, 1])
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    before = {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir()}
    merged = hf_mudsc.merge([str(tmp_path / "a"), str(tmp_path / "b")], method="linear", refit="none",
                            progress=False)
    assert merged.config.mudsc["head_reordered"] == [False, True]
    assert merged.config.id2label == a.config.id2label
    for got, want in zip(_head(merged), _head(a)):
        assert torch.allclose(got, want, atol=1e-6)
    assert {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir()} == before


def test_a_base_with_parent_as_labels_in_another_order_is_aligned_too():
    """Task vectors are differences from the base: a base head in another label order would subtract the wrong
    rows. The merge from a base in another label order equals the merge from the same base in parent A's order.
    (The parents are fine-tunes of it: a parent equal to the base is refused since session 32.)"""
    a = _named(make_model("vit_cls", seed=0), NAMES)
    parents = [fine_tune(a, 1, 0.05, relative=True), _reordered(fine_tune(a, 2, 0.05, relative=True), [1, 2, 0])]
    base = _reordered(a, [2, 0, 1])
    merged = hf_mudsc.merge(parents, base=base, method="task_arithmetic", refit="none", progress=False)
    in_order = hf_mudsc.merge(parents, base=a, method="task_arithmetic", refit="none", progress=False)
    assert merged.config.id2label == a.config.id2label
    for got, want in zip(_head(merged), _head(in_order)):
        assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(_head(merged)[0], _head(a)[0], atol=1e-3)  # the task vectors did move the head
    assert base.config.id2label == {0: "fox", 1: "cat", 2: "dog"}  # the base object is not modified


def test_head_order_only_for_the_same_named_labels_in_another_order():
    from transformers import PretrainedConfig

    from hf_mudsc.apply.classifier import head_order

    def config(names):
        return PretrainedConfig(id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})

    assert head_order(config(NAMES), config(["dog", "fox", "cat"])) == [2, 0, 1]  # B's id of cat, dog, fox
    assert head_order(config(NAMES), config(NAMES)) is None  # the same order: nothing to do
    assert head_order(config(NAMES), config(["dog", "fox", "owl"])) is None  # other labels
    assert head_order(config(["cat", "cat", "dog"]), config(["dog", "cat", "cat"])) is None  # repeated names
    assert head_order(config(["LABEL_0", "LABEL_1"]), config(["LABEL_1", "LABEL_0"])) is None  # no meaning


# ------------------------------------------------------------------------------------------- repeated label names


def _repeating(kind="vit_cls", seed=0):
    """A parent whose `id2label` gives the name 'cat' to ids 0 and 2 (its label2id, keyed by name, holds 2 names)."""
    return _named(make_model(kind, seed=seed), ["cat", "dog", "cat"])


@pytest.mark.parametrize(("other_names", "who"), [(["cat", "dog", "cat"], "A"), (["owl", "emu"], "B")])
def test_a_parent_whose_id2label_repeats_a_name_is_refused_in_one_line_before_its_weights(other_names, who, tmp_path,
                                                                                          monkeypatch):
    """Two ids with one name: the merged config's label2id (a dict keyed by name) came out shorter than id2label
    (`{'b: cat': 2, ...}` for 3 classes) and no one could tell the two classes apart by name; refused before any
    weights are read, naming the parent, the name, its ids and the fix — with the same labels too (both parents
    repeat the name: merged by position, still no name for each class)."""
    from hf_mudsc.load import parents as loading

    a = make_model("vit_cls", seed=1, num_labels=len(other_names))
    _named(a, other_names)
    a.save_pretrained(tmp_path / "a")
    _repeating().save_pretrained(tmp_path / "b")

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr(loading, "_prepare", no_weights)
    for dry_run in (False, True):
        with pytest.raises(hf_mudsc.MergeInputError) as caught:
            hf_mudsc.merge([str(tmp_path / "a"), str(tmp_path / "b")], method="average", refit="none",
                           progress=False, dry_run=dry_run)
        message = str(caught.value)
        assert f"parent {who}'s id2label gives the name 'cat' to 2 classes (ids 0 and 2)" in message, message
        assert "give each class its own name" in message and "\n" not in message


def test_a_repeated_name_in_a_model_objects_labels_is_refused_too():
    with pytest.raises(hf_mudsc.MergeInputError, match="parent A's id2label gives the name 'cat' to 2 classes"):
        hf_mudsc.merge([_repeating(seed=0), _repeating(seed=1)], method="average", refit="none", progress=False)


@pytest.mark.parametrize("concatenated", [False, True])
def test_the_merged_label2id_inverts_id2label_and_round_trips(concatenated, tmp_path):
    """The merged config's label2id is id2label inverted (one id per name, every id), after a save and a reload
    too — also when parent A's config holds no label2id (transformers 5 leaves it None when only id2label is
    given), which the merged config used to copy."""
    from transformers import AutoModelForImageClassification

    a = make_model("vit_cls", seed=0)
    a.config.id2label, a.config.label2id = dict(enumerate(NAMES)), None
    b = _named(make_model("vit_cls", seed=1, num_labels=2), ["owl", "emu"]) if concatenated else \
        _named(make_model("vit_cls", seed=1), NAMES)
    merged = hf_mudsc.merge([a, b], method="average", refit="none", progress=False)
    merged.save_pretrained(tmp_path / "merged")
    again = AutoModelForImageClassification.from_pretrained(tmp_path / "merged")
    for config in (merged.config, again.config):
        id2label = {int(i): name for i, name in config.id2label.items()}
        assert len(id2label) == (5 if concatenated else 3) == config.num_labels
        assert config.label2id == {name: i for i, name in id2label.items()}
