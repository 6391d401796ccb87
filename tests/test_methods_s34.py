"""Same-base methods against mergekit's definitions (session 34): known answers on hand-made task vectors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from factories import BERT, make_model, randomize
from transformers import BertConfig, BertForSequenceClassification

import hf_mudsc
from hf_mudsc.methods import METHODS
from hf_mudsc.options import MergeOptions

BIAS = "classifier.bias"


def family_with_bias_deltas(deltas: list[list[float]]) -> tuple[torch.nn.Module, list[torch.nn.Module]]:
    """A tiny BERT base and one parent per row of `deltas`: each parent is the base with only its 4-entry classifier
    bias moved by its row, so every other task vector is 0 and the merge's bias is the whole answer."""
    base = make_model("bert_cls", seed=0, num_labels=4)
    parents = []
    for row in deltas:
        parent = copy.deepcopy(base)
        with torch.no_grad():
            parent.classifier.bias += torch.tensor(row)
        parents.append(parent)
    return base, parents


A = [0.4, -0.2, 0.1, 0.3]
B = [-0.2, 0.1, -0.6, 0.5]


def merged_bias_delta(method: str, **options) -> list[float]:
    base, parents = family_with_bias_deltas([A, B])
    merged = hf_mudsc.merge(parents, base=base, method=method, density=0.5, refit="none", progress=False, **options)
    return (dict(merged.named_parameters())[BIAS] - dict(base.named_parameters())[BIAS]).tolist()


def test_ties_keeps_not_rescaling_when_a_recipe_says_rescale_true_as_every_recipe_written_here_does():
    """hf_mudsc.merge([A, B], base=base, method='ties', density=0.5, rescale=True): a documented difference from
    mergekit (whose ties would L1-rescale): every recipe hf_mudsc wrote records rescale: true (the DARE/DELLA option's
    default) whatever the method, so a ties recipe re-run must keep its merge — ties trims without rescaling."""
    # density 0.5 of 4 entries keeps the 2 largest: A 0.4, 0.3; B -0.6, 0.5; signs +, + (sum 0), -, +; the agreeing
    # entries divided by their weights' sum (normalize True): only entry 3 has two
    assert merged_bias_delta("ties", rescale=True) == pytest.approx([0.4, 0.0, -0.6, (0.3 + 0.5) / 2], abs=1e-6)


def slerp_by_hand(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mergekit's slerp of two whole tensors (flattened): lerp when |cos| > 0.9995, else the great-circle formula on
    the unnormalised tensors — written out here in float64."""
    x, y = a.reshape(-1).double(), b.reshape(-1).double()
    dot = float((x / x.norm()) @ (y / y.norm()))
    if abs(dot) > 0.9995:
        return ((1 - t) * x + t * y).reshape(a.shape)
    theta = math.acos(dot)
    return ((math.sin((1 - t) * theta) * x + math.sin(t * theta) * y) / math.sin(theta)).reshape(a.shape)


def test_slerp_t_as_a_list_is_mergekits_layer_gradient():
    """hf_mudsc.merge([A, B], method='slerp', slerp_t=[0.2, 0.6]) on a 3-block BERT: mergekit's gradient — block b of
    L takes the list interpolated at b / (L - 1); tensors outside the blocks (embeddings, pooler, head) its first."""
    torch.manual_seed(0)
    a = randomize(BertForSequenceClassification(BertConfig(**{**BERT, "num_hidden_layers": 3}, num_labels=2)), 1)
    b = randomize(copy.deepcopy(a), 2)
    merged = hf_mudsc.merge([a, b], method="slerp", slerp_t=[0.2, 0.6], refit="none", progress=False)
    # mergekit's evaluate_setting: position x in [0, 1] over a 2-value list -> 0.2 + x * (0.6 - 0.2)
    expected_t = {"bert.encoder.layer.0.": 0.2, "bert.encoder.layer.1.": 0.2 + 0.5 * 0.4,
                  "bert.encoder.layer.2.": 0.2 + 1.0 * 0.4}
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    checked = set()
    for name, value in merged.named_parameters():
        t = next((v for prefix, v in expected_t.items() if name.startswith(prefix)), 0.2)
        checked.add(t)
        assert torch.allclose(value.double(), slerp_by_hand(t, pa[name], pb[name]), atol=1e-6), name
    assert checked == {0.2, *expected_t.values()}  # every block and the rest
    assert merged.config.mudsc["slerp_t"] == [0.2, 0.6]


def test_a_single_slerp_t_is_every_tensors_t():
    """hf_mudsc.merge([A, B], method='slerp', slerp_t=0.3): one number is every tensor's t (mergekit's scalar t)."""
    a = make_model("bert_cls", seed=1)
    b = make_model("bert_cls", seed=2)
    merged = hf_mudsc.merge([a, b], method="slerp", slerp_t=0.3, refit="none", progress=False)
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    for name, value in merged.named_parameters():
        assert torch.allclose(value.double(), slerp_by_hand(0.3, pa[name], pb[name]), atol=1e-6), name


def test_the_normalize_help_names_every_method_that_normalises_by_default_as_mergekits():
    """hf-mudsc merge --help: --normalize said 'linear and ties do' and left out della, which normalises by default
    (mergekit's default_normalize); each help must name every method the option is on for by default."""
    option = "normalize"
    help_text = next(f for f in MergeOptions.option_fields() if f.name == option).metadata["help"]
    options = MergeOptions()
    on = [name for name, method in METHODS.items() if getattr(method, "arguments", None)
          and option in dict(method.arguments) and method.used_options(options)[option] is True]
    assert on  # linear, ties, della
    said = help_text.split("default: the method's", 1)[1].split("do not", 1)[0]
    for name in on:
        stem = name.split("_")[0]
        assert name in said or f"{stem}_*" in said or f"{stem}*" in said, (name, said)
