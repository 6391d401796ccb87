"""Spec validation: nothing is silently dropped, every width fits, every hook point exists."""

from __future__ import annotations

import dataclasses
import sys

import pytest
from factories import KINDS, make_model

from hf_mudsc import architectures
from hf_mudsc.architectures import spec_for, supported_model_types, unregister
from hf_mudsc.errors import SpecError
from hf_mudsc.spec import Group, HookPoint, Member, PermutationSpec


@pytest.mark.parametrize("kind", KINDS)
def test_every_adapter_spec_validates_and_covers_every_parameter(kind):
    model = make_model(kind)
    spec = spec_for(model)
    params = dict(model.named_parameters())
    covered = set(spec.grouped_params) | set(spec.averaged)
    assert covered == set(params)
    assert spec.groups[0].name.endswith("residual")
    for group in spec.groups:
        if group.num_heads > 1:
            partners = [g for g in spec.groups if g.head_tie == group.head_tie]
            assert len(partners) == 2  # q/k and v of one attention block


def test_supported_model_types():
    assert {"vit", "bert", "clip", "clip_text_model", "clip_vision_model", "roberta"} <= set(supported_model_types())


def test_adapter_modules_are_discovered_not_listed(tmp_path, monkeypatch):
    """A module dropped into the adapters package registers itself; no list of module names is edited."""
    (tmp_path / "toyarch.py").write_text(
        "from hf_mudsc.architectures.registry import register\n\n\n"
        "@register('toyarch')\ndef toy_spec(model):\n    raise NotImplementedError\n"
    )
    assert {f"hf_mudsc.architectures.{name}" for name in ("bert", "clip", "roberta", "vit")} <= set(
        architectures.adapter_modules())
    monkeypatch.setattr(architectures, "__path__", [*architectures.__path__, str(tmp_path)])
    monkeypatch.setattr(architectures, "_discovered", False)
    try:
        assert "hf_mudsc.architectures.toyarch" in architectures.adapter_modules()
        assert "toyarch" in supported_model_types()
    finally:
        unregister("toyarch")
        sys.modules.pop("hf_mudsc.architectures.toyarch", None)
    assert "toyarch" not in supported_model_types()


def _vit():
    model = make_model("vit_cls")
    return model, spec_for(model), dict(model.named_parameters())


def test_a_parameter_left_out_is_reported():
    model, spec, params = _vit()
    residual = spec.groups[0]
    dropped = "vit.layers.1.layernorm_after.bias"
    members = tuple(m for m in residual.members if m.param != dropped)
    broken = PermutationSpec(groups=(dataclasses.replace(residual, members=members),) + spec.groups[1:],
                             averaged=spec.averaged, classifier=spec.classifier, family="vit")
    with pytest.raises(SpecError, match=f"'{dropped}' is in no group and not declared averaged"):
        broken.validate(params)


def test_wrong_width_unknown_param_bad_axis_and_double_membership_are_reported():
    model, spec, params = _vit()
    groups = list(spec.groups)
    groups.append(Group("bogus", 32, (Member("vit.layers.0.mlp.fc1.weight", 0, "out"),
                                      Member("nope.weight", 0, "out"),
                                      Member("classifier.bias", 3, "out"),
                                      Member("vit.layernorm.weight", 0, "out")),
                        (HookPoint("vit.missing"),)))
    broken = PermutationSpec(groups=tuple(groups), averaged=spec.averaged, classifier=spec.classifier)
    with pytest.raises(SpecError) as error:
        broken.validate(params, [name for name, _ in model.named_modules()])
    text = str(error.value)
    assert "'vit.layers.0.mlp.fc1.weight' axis 0 has size 48" in text
    assert "no parameter 'nope.weight'" in text
    assert "'classifier.bias' has no axis 3" in text
    assert "'vit.layernorm.weight' axis 0 is in more than one group" in text
    assert "hook module 'vit.missing' does not exist" in text


def test_heads_must_divide_the_width():
    _, spec, params = _vit()
    broken = PermutationSpec(groups=(dataclasses.replace(spec.groups[1], num_heads=5),) + spec.groups[:1]
                             + spec.groups[2:], averaged=spec.averaged)
    with pytest.raises(SpecError, match="not divisible by 5 heads"):
        broken.validate(params)


def test_averaged_parameter_must_exist():
    _, spec, params = _vit()
    broken = dataclasses.replace(spec, averaged=spec.averaged + ("ghost",))
    with pytest.raises(SpecError, match="averaged parameter 'ghost' does not exist"):
        broken.validate(params)


def test_axes_of_is_the_inverse_map():
    _, spec, _ = _vit()
    axes = spec.axes_of("vit.layers.0.mlp.fc1.weight")
    names = sorted((spec.groups[i].name, m.axis, m.role) for i, m in axes)
    assert names == [("residual", 1, "in"), ("vit.layers.0.mlp", 0, "out")]
    assert spec.axes_of("classifier.bias") == ()
