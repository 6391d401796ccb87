"""Same-base method definitions, from the s32 method-definitions hunt: the docs call the registered methods "not
yet methods"; consensus's TALL masks read the weighted sum of the task vectors (the paper, tall_masks and
FusionBench read the plain sum), and k == N with lambda >= 1 kept no entry for N >= 3 either; breadcrumbs' gamma
drops fewer largest entries than asked when density + gamma > 1, silently; a base resized to fewer tokens than its
fine-tunes is refused as no base of theirs; a base lacking the head filled it with weights no method accepts."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch
from factories import BERT, VIT, fine_tune, make_model, randomize

import hf_mudsc
from hf_mudsc.errors import MergeInputError, ParentMismatchError

ROOT = Path(__file__).resolve().parents[1]


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------ a base lacking the head: the fill's weights


@pytest.fixture(scope="module")
def headless_family(tmp_path_factory):
    """A ViT base saved without the parents' head (a ViTModel, as the README allows) and two fine-tunes of it."""
    from transformers import ViTConfig, ViTModel

    folder = tmp_path_factory.mktemp("headless")
    base = make_model("vit_cls", 0)
    bare = ViTModel(ViTConfig(**VIT), add_pooling_layer=False)
    bare.load_state_dict({k: base.state_dict()["vit." + k] for k in bare.state_dict()})
    bare.save_pretrained(folder / "base")
    parents = [fine_tune(base, s, 0.01) for s in (1, 2)]
    for index, parent in enumerate(parents):
        parent.save_pretrained(folder / f"p{index}")
    return str(folder / "base"), parents, [str(folder / f"p{i}") for i in range(2)]


def test_weights_filling_a_missing_head_beyond_the_factor_limit_are_refused_by_the_merge_and_its_dry_run(
        headless_family, monkeypatch):
    """task_arithmetic [1, -0.995] (task negation): the head the base lacks is the parents' weighted mean, divided by
    the sum 0.005 — 200 h_A - 199 h_B (|7.6| from |0.58|), silently, while `linear` refuses the same shares."""
    from hf_mudsc.solve import task_vectors

    base, parents, folders = headless_family

    def no_merge(*args, **kwargs):
        raise AssertionError("tensors were merged before the weights were refused")

    monkeypatch.setattr(task_vectors, "combine_task_vectors", no_merge)
    for models, dry_run in ((parents, False), (folders, True)):
        with pytest.raises(MergeInputError) as caught:
            hf_mudsc.merge(models, base=base, method="task_arithmetic", weights=[1.0, -0.995], progress=False,
                           dry_run=dry_run)
        message = str(caught.value)
        assert "classifier.weight" in message and "scale a parent by 200" in message, message
        assert "beyond ±100" in message and "weights= (CLI: --weights)" in message and "\n" not in message
    monkeypatch.undo()
    merged = state(hf_mudsc.merge(parents, base=base, method="task_arithmetic", weights=[1.0, -0.5], progress=False))
    heads = [p.classifier.weight.detach() for p in parents]
    assert torch.allclose(merged["classifier.weight"], (heads[0] - 0.5 * heads[1]) / 0.5, atol=1e-6)
    plan = hf_mudsc.merge(folders, base=base, method="task_arithmetic", weights=[1.0, -0.5], dry_run=True)
    assert plan.method == "task_arithmetic"


def test_the_dry_run_refuses_weights_summing_to_0_that_would_fill_a_missing_head(headless_family):
    base, _, folders = headless_family
    with pytest.raises(MergeInputError, match=r"classifier\.weight.*sum to 0"):
        hf_mudsc.merge(folders, base=base, method="task_arithmetic", weights=[1.0, -1.0], dry_run=True)


# ------------------------------------------------------------------ a base whose vocabulary the fine-tunes grew


def test_a_base_the_parents_resized_the_vocabulary_of_is_refused_naming_the_resize_and_a_fix_that_works():
    """Fine-tunes that added tokens (resize_token_embeddings 60 -> 64) merged with their very base: the refusal said
    the parents are no fine-tunes of it and to pass the base they were fine-tuned from — the one given."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    base = randomize(BertForSequenceClassification(BertConfig(**BERT, num_labels=3)), 0)
    parents = []
    for seed in (1, 2):
        parent = fine_tune(base, seed, 0.01)
        parent.resize_token_embeddings(64, mean_resizing=False)
        parents.append(parent)
    with pytest.raises(ParentMismatchError) as caught:
        hf_mudsc.merge(parents, base=base, method="ties", progress=False)
    message = str(caught.value)
    assert "not fine-tunes" not in message and "Pass the base the parents were fine-tuned from" not in message
    assert "resized" in message and "60 -> 64" in message and "resize_token_embeddings(64)" in message, message
    assert "\n" not in message
    base.resize_token_embeddings(64)  # the fix the message names
    merged = hf_mudsc.merge(parents, base=base, method="ties", progress=False)
    assert merged.config.vocab_size == 64


@pytest.mark.parametrize(("changes", "said"), [
    ({"vocab_size": 70}, "vocab_size: 70 vs 60"),  # the parents have fewer tokens: no resize made them
    ({"vocab_size": 50, "intermediate_size": 40}, "intermediate_size: 40 vs 48"),  # more than the vocabulary
])
def test_a_base_differing_otherwise_is_still_refused_as_no_base_of_the_parents(changes, said):
    from transformers import BertConfig, BertForSequenceClassification

    base = randomize(BertForSequenceClassification(BertConfig(**{**BERT, **changes}, num_labels=3)), 0)
    parents = [make_model("bert_cls", s) for s in (1, 2)]
    with pytest.raises(ParentMismatchError) as caught:
        hf_mudsc.merge(parents, base=base, method="ties", progress=False)
    message = str(caught.value)
    assert "not fine-tunes of it" in message and said in message and "resize" not in message, message


# ------------------------------------------------------------------ consensus: k == N with lambda >= 1


@pytest.mark.parametrize("count", [3, 4])
def test_consensus_with_k_equal_to_the_parent_count_and_lambda_1_is_refused_for_any_count(count):
    """Every TALL mask |tau_t| > L |Σ tau - tau_t| holding at once needs (N - 2)(Σ tau)^2 < 0 for L >= 1: k == N
    keeps no entry (the merge was exactly the base, silently, for N >= 3); refused as it was for N == 2, by the merge
    and its dry run, whatever the weights."""
    base = make_model("vit_cls", 0)
    parents = [fine_tune(base, s, 0.01) for s in range(1, count + 1)]
    needle = f"consensus_lambda 1 with {count} parents and consensus_k {count} keeps no entry"
    for keywords in ({}, {"weights": [1.0, 2.0] + [1.0] * (count - 2)}, {"dry_run": True}):
        with pytest.raises(MergeInputError) as caught:
            hf_mudsc.merge(parents, base=base, method="consensus", consensus_k=count, consensus_lambda=1.0,
                           progress=False, **keywords)
        message = str(caught.value)
        assert needle in message and "consensus_lambda= (CLI: --consensus-lambda)" in message, message
        assert "\n" not in message
    merged = hf_mudsc.merge(parents, base=base, method="consensus", consensus_k=count - 1, consensus_lambda=1.0,
                            progress=False)  # k < N can keep entries
    assert any(not torch.equal(m, b) for m, b in zip(state(merged).values(), state(base).values()))


def test_a_consensus_recipe_that_keeps_no_entry_is_refused_as_inspect_checks_it():
    from hf_mudsc.errors import RecipeError
    from hf_mudsc.publish.recipe import Recipe

    recipe = {"models": ["org/a", "org/b", "org/c"], "method": "consensus", "base": "org/z", "consensus_k": 3,
              "consensus_lambda": 1.5}
    with pytest.raises(RecipeError, match="consensus_lambda 1.5 with 3 parents and consensus_k 3 keeps no entry"):
        Recipe.from_dict(recipe).validate()


# ------------------------------------------------------------------ consensus: TALL masks from the plain sum


def test_consensus_masks_read_the_plain_sum_of_the_task_vectors_and_the_weights_only_scale():
    """TALL mask of task t: |tau_t| > lambda |sum_s tau_s - tau_t| (Wang et al. 2024; tall_masks and FusionBench's
    `generate_task_masks` sum the task vectors unweighted). The masks were built from the weighted sum, so weights
    [2, 2] kept other entries than [1, 1]."""
    from hf_mudsc.solve import task_vectors as tm

    base = {"w": torch.zeros(2)}
    p1, p2 = {"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([0.5, -1.0])}
    # plain sum [1.5, 0]: entry 0 task 1's mask holds (1 > 0.6 * 0.5), entry 1 both hold (1 > 0.6 * 1)
    plain = tm.consensus(base, [p1, p2], [1.0, 1.0], k=1, tall_mask_lambda=0.6)["w"]
    doubled = tm.consensus(base, [p1, p2], [2.0, 2.0], k=1, tall_mask_lambda=0.6)["w"]
    assert torch.allclose(plain, torch.tensor([1.5, 0.0]))
    assert torch.allclose(doubled, 2 * plain), doubled  # the weighted sum [3, 0]: entry 0 lost its mask
    uneven = tm.consensus(base, [p1, p2], [1.0, 3.0], k=1, tall_mask_lambda=0.6)["w"]
    assert torch.allclose(uneven, torch.tensor([2.5, -2.0])), uneven  # masks as plain, kept Σ w τ


def test_uniform_consensus_weights_keep_the_same_entries_as_a_merge():
    base = make_model("vit_cls", 0)
    parents = [fine_tune(base, s, 0.01) for s in (1, 2, 3)]
    b = state(base)
    ones = state(hf_mudsc.merge(parents, base=base, method="consensus", weights=[1.0] * 3, progress=False))
    twos = state(hf_mudsc.merge(parents, base=base, method="consensus", weights=[2.0] * 3, progress=False))
    for name in b:
        if b[name].is_floating_point():
            assert torch.allclose(twos[name] - b[name], 2 * (ones[name] - b[name]), atol=1e-6), name


# ------------------------------------------------------------------ breadcrumbs: density + gamma > 1


@pytest.mark.parametrize(("method", "density", "gamma", "said"), [
    ("breadcrumbs", 0.98, 0.05, "only the largest 2% of each task vector's entries are dropped, not gamma's 5%"),
    ("breadcrumbs_ties", 1.0, 0.05, "none of each task vector's largest entries are dropped, not gamma's 5%"),
])
def test_breadcrumbs_says_when_density_and_gamma_exceed_1_and_fewer_largest_entries_are_dropped(
        caplog, method, density, gamma, said):
    """mergekit's rule keeps `density` of the entries and drops fewer largest ones when the two do not fit: gamma
    0.05 with density 0.98 dropped 2 %, with density 1 none (plain task arithmetic) — silently, gamma recorded as
    given."""
    base = make_model("vit_cls", 0)
    parents = [fine_tune(base, s, 0.01) for s in (1, 2)]
    plan = hf_mudsc.merge(parents, base=base, method=method, density=density, gamma=gamma, dry_run=True)
    with caplog.at_level("WARNING", logger="hf_mudsc"):
        merged = hf_mudsc.merge(parents, base=base, method=method, density=density, gamma=gamma, progress=False)
    found = [w for w in merged.config.mudsc["warnings"] if "gamma" in w]
    assert len(found) == 1 and said in found[0] and "density + gamma <= 1" in found[0], found
    assert found[0] in [r.getMessage() for r in caplog.records] and found[0] in plan.warnings
    quiet = hf_mudsc.merge(parents, base=base, method=method, density=0.9, gamma=0.05, progress=False)
    assert not [w for w in quiet.config.mudsc.get("warnings", []) if "gamma" in w]


def test_the_help_and_docs_say_what_gamma_drops_when_density_and_gamma_exceed_1():
    from hf_mudsc.methods import METHODS
    from hf_mudsc.options import MergeOptions

    help_text = next(f for f in MergeOptions.option_fields() if f.name == "gamma").metadata["help"]
    design = (ROOT / "docs" / "design.md").read_text()
    for text in (help_text, METHODS["breadcrumbs"].description, design):
        assert re.search(r"density \+ gamma > 1", text), text[:300]


# ------------------------------------------------------------------ the docs name the registered methods as such


def test_the_docs_do_not_call_the_registered_same_base_functions_not_yet_methods():
    """README's layout and task_vectors' docstring said the functions are "not yet methods" / "not yet registered
    as merge methods", though every one of them is a registered method."""
    from hf_mudsc.methods import METHODS
    from hf_mudsc.solve import task_vectors

    assert {"task_arithmetic", "ties", "breadcrumbs", "consensus", "pcb", "regmean", "fisher"} <= set(METHODS)
    layout = next(line for line in (ROOT / "README.md").read_text().splitlines()
                  if line.strip().startswith("task_vectors.py"))
    doc = inspect.getdoc(task_vectors)
    assert "not yet" not in layout and "registered methods" in layout, layout
    assert "not yet" not in doc and "registered methods" in doc, doc
