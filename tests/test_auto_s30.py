"""`method="auto"` corners found by the s30 hunt: what it picks must give what its reason and warnings say."""

from __future__ import annotations

import copy

import pytest
import torch
from factories import make_model

import hf_mudsc
from hf_mudsc.diagnostics import relation_warning
from hf_mudsc.methods.registry import get_method

pytestmark = pytest.mark.usefixtures("one_thread_module")


def _tuned(seed: int = 1) -> tuple[torch.nn.Module, torch.nn.Module]:
    base = make_model("vit_cls", 0)
    tuned = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in tuned.parameters():
            tensor += 0.01 * torch.randn(tensor.shape, generator=generator)
    return base, tuned


def test_one_model_given_twice_with_a_base_comes_back_under_auto(caplog):
    """Two copies of one model and `base=`: auto picked `ties` (density 0.2 trims 80 % of the task vector: logits
    37 % off) while warning "the merge gives back that model". Auto picks `linear` there, which does; a task-vector
    method asked for by name is not said to give it back."""
    base, tuned = _tuned()
    merged = hf_mudsc.merge([tuned, copy.deepcopy(tuned)], base=base, progress=False)
    assert merged.config.mudsc["method"] == "linear", merged.config.mudsc["method_choice_reason"]
    for name, tensor in tuned.state_dict().items():
        assert torch.equal(merged.state_dict()[name], tensor), name
    said = relation_warning("same model", get_method("ties"))
    assert said is not None and "the merge gives back that model" not in said and "'ties' rebuilds" in said, said
    assert relation_warning("same model", get_method("linear")) == (
        "the parents are the same model: the merge gives back that model")


def test_auto_without_data_for_different_inits_offers_only_a_method_that_fits_them():
    """auto chose mudsc for parents from different initializations and, without data, offered 'weight_matching' /
    'ties' / 'linear': ties needs a base and linear collapses such parents (the merge's own warning says so)."""
    with pytest.raises(hf_mudsc.errors.MergeInputError) as caught:
        hf_mudsc.merge([make_model("vit_cls", 1), make_model("vit_cls", 2)], progress=False)
    message = str(caught.value)
    assert "method 'auto' chose 'mudsc'" in message and "method='weight_matching' (CLI: --method)" in message, message
    assert "'ties'" not in message and "'linear'" not in message, message


def test_a_base_named_by_the_cards_that_cannot_load_says_where_it_came_from(tmp_path, monkeypatch):
    """The base the parents' model cards name (`base_model:`), not in the cache offline: the error named only the Hub
    id, which the user never typed (with -q the INFO line saying where it came from is hidden), and no fix."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base, tuned = _tuned()
    folders = []
    for name in ("ft1", "ft2"):
        tuned.save_pretrained(tmp_path / name)
        (tmp_path / name / "README.md").write_text("---\nbase_model: nobody/not-cached-base\n---\n# fine-tune\n")
        folders.append(str(tmp_path / name))
    with pytest.raises(hf_mudsc.errors.LoadError) as caught:
        hf_mudsc.merge(folders, method="ties", progress=False)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(
        "the base model the parents' model cards name ('nobody/not-cached-base'): "), message
    assert message.endswith("; pass base= (CLI: --base) to merge from another base"), message


def test_the_parents_relation_does_not_depend_on_their_order():
    """The weight distance was ‖A − B‖ / ‖A‖: a far fine-tune with larger weights and a near one related as 'shared
    base' one way round and 'independent' the other, so auto merged them with linear or refused them by their order.
    The distance is relative to both parents' norms (their geometric mean): one figure and one relation either way."""
    base = make_model("vit_cls", 0)

    def tuned(seed: int, scale: float) -> torch.nn.Module:
        model = copy.deepcopy(base)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for tensor in model.parameters():
                if tensor.numel() > 1:
                    tensor += scale * tensor.std() * torch.randn(tensor.shape, generator=generator)
        return model

    far, near = tuned(1, 1.05), tuned(2, 0.3)
    relations = [hf_mudsc.merge(pair, method="linear", progress=False).config.mudsc["parent_relation"]
                 for pair in ([far, near], [near, far])]
    assert relations[0]["relation"] == relations[1]["relation"], relations
    assert relations[0]["weight_distance"] == pytest.approx(relations[1]["weight_distance"], rel=1e-12), relations
