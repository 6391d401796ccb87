"""Session 38, architectures and heads (helper "arch"): adapters, head layouts and the parent checks."""

from __future__ import annotations

import logging

import pytest
import torch
from factories import BERT, VIT, make_batches, randomize
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
    ViTConfig,
    ViTForImageClassification,
)

import hf_mudsc
from hf_mudsc.errors import UnsupportedArchitectureError


class BiaslessViT(ViTForImageClassification):
    """A user's ViT classifier whose label head has no bias."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__(config)
        self.classifier = torch.nn.Linear(config.hidden_size, config.num_labels, bias=False)


class BiaslessBert(BertForSequenceClassification):
    """A user's BERT classifier whose label head has no bias."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.classifier = torch.nn.Linear(config.hidden_size, config.num_labels, bias=False)


class BiaslessRoberta(RobertaForSequenceClassification):
    """A user's RoBERTa classifier whose out_proj has no bias."""

    def __init__(self, config: RobertaConfig) -> None:
        super().__init__(config)
        self.classifier.out_proj = torch.nn.Linear(config.hidden_size, config.num_labels, bias=False)


BIASLESS = {
    "vit_cls": (lambda: BiaslessViT(ViTConfig(**VIT, num_labels=3)), "classifier.bias"),
    "bert_cls": (lambda: BiaslessBert(BertConfig(**BERT, num_labels=3)), "classifier.bias"),
    "roberta_cls": (lambda: BiaslessRoberta(RobertaConfig(**BERT, num_labels=3)),
                    "classifier.out_proj.bias"),
}


@pytest.mark.parametrize("kind", list(BIASLESS))
def test_a_label_head_without_bias_is_refused_in_one_line_naming_the_class_and_tensor(kind):
    """merge([A, B]) of a user's ViT/BERT/RoBERTa classifier subclass whose head Linear has bias=False: a 3-line
    internal SpecError ("averaged parameter 'classifier.bias' does not exist") blaming the adapter's spec."""
    build, bias = BIASLESS[kind]
    torch.manual_seed(0)
    parents = [randomize(build(), seed) for seed in (0, 1)]
    for dry_run in (False, True):
        with pytest.raises(UnsupportedArchitectureError) as caught:
            hf_mudsc.merge(parents, make_batches(kind, 1), method="linear", progress=False, dry_run=dry_run)
        message = str(caught.value)
        assert "\n" not in message and type(parents[0]).__name__ in message and repr(bias) in message, message


@pytest.mark.parametrize(("kind", "key", "value"), [("bert_cls", "tie_word_embeddings", False),
                                                    ("roberta_cls", "tie_word_embeddings", False),
                                                    ("vit_cls", "encoder_stride", 8), ("vit", "encoder_stride", 8)])
def test_parents_differing_in_a_field_only_another_head_class_reads_are_merged(kind, key, value, tmp_path, caplog):
    """merge([A, B]) of two BertForSequenceClassification fine-tunes, B's config.json saying tie_word_embeddings
    false (ViT: another encoder_stride, read only by ViTForMaskedImageModeling's decoder): refused as "different
    configurations" though no class the adapters merge reads the field (a tied head would differ in its tensors)."""
    from factories import fine_tune, make_model, model_output

    a = make_model(kind, 0)
    b = fine_tune(a, 1, 0.01)
    b.config.update({key: value})
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    batch = make_batches(kind, 1)[0]
    for parents in ([a, b], [str(tmp_path / "a"), str(tmp_path / "b")]):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="hf_mudsc"):
            merged = hf_mudsc.merge(parents, method="linear", progress=False)
        assert f"parent B: {key}: " in caplog.text  # said, as the other fields no forward reads
        assert getattr(merged.config, key) == getattr(a.config, key)  # parent A's, as for dropout rates
        expected = hf_mudsc.merge([a, fine_tune(a, 1, 0.01)], method="linear", progress=False)
        assert torch.equal(model_output(merged, batch), model_output(expected, batch))


def test_clip_parents_differing_in_the_initial_logit_scale_are_merged(tmp_path):
    """merge([A, B]) of two CLIPModels, B's config saying logit_scale_init_value 3.0 (read only when the model is
    initialised; the trained logit_scale is a weight): refused as "different configurations"."""
    from factories import fine_tune, make_model, model_output

    a = make_model("clip", 0)
    b = fine_tune(a, 1, 0.01)
    b.config.logit_scale_init_value = 3.0
    b.save_pretrained(tmp_path / "b")
    batch = make_batches("clip", 1)[0]
    expected = hf_mudsc.merge([a, fine_tune(a, 1, 0.01)], method="linear", progress=False)
    for second in (b, str(tmp_path / "b")):
        merged = hf_mudsc.merge([a, second], method="linear", progress=False)
        assert merged.config.logit_scale_init_value == a.config.logit_scale_init_value
        assert torch.equal(model_output(merged, batch), model_output(expected, batch))


def test_an_adapter_registered_before_the_first_lookup_is_not_replaced_by_the_shipped_one():
    """`register("vit")(mine)` in a fresh process, then `spec_for(vit)`: the first lookup imported the shipped
    adapters, which silently registered theirs over it (after a first lookup, the same call took effect)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = (
        "import sys; sys.path.insert(0, 'tests')\n"
        "from factories import make_model\n"
        "from hf_mudsc.architectures import register, spec_for\n"
        "calls = []\n"
        "@register('vit')\n"
        "def mine(model):\n"
        "    calls.append(model)\n"
        "    from hf_mudsc.architectures.vit import vit_spec\n"
        "    return vit_spec(model)\n"
        "spec_for(make_model('vit_cls', 0))\n"
        "print(len(calls))\n"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "1", done.stdout


def misnamed(spec, old: str, new: str):
    """`spec` with every mention of the tensor `old` spelled `new` (an adapter's typo)."""
    from dataclasses import replace

    def fix(name: str | None) -> str | None:
        return new if name == old else name

    groups = tuple(replace(group, members=tuple(replace(member, param=fix(member.param)) for member in group.members))
                   for group in spec.groups)
    classifier = spec.classifier and replace(spec.classifier, weight=fix(spec.classifier.weight),
                                             bias=fix(spec.classifier.bias))
    assert old in spec.grouped_params or old in spec.averaged or classifier != spec.classifier
    return replace(spec, groups=groups, averaged=tuple(fix(name) for name in spec.averaged), classifier=classifier)


class MyViT(ViTForImageClassification):
    """A user's trivial subclass: every tensor as transformers builds it."""


@pytest.mark.parametrize("tensor", ["q_proj.weight", "classifier.bias"])
def test_an_adapter_typo_on_a_trivial_subclass_is_the_adapters_bug_in_full(tensor):
    """register("vit") a builder renaming q_proj.weight -> q_proj.wieght, spec_for(MyViT(...)): "MyViT is not
    supported" (the user blamed, sent to docs/design.md §5); the stock class: the full SpecError."""
    from hf_mudsc.architectures import discover, register, spec_for
    from hf_mudsc.architectures.vit import vit_spec
    from hf_mudsc.errors import SpecError

    discover()
    stock = ViTForImageClassification(ViTConfig(**VIT, num_labels=3))
    old = next(name for name, _ in stock.named_parameters() if name.endswith(tensor))
    new = old[:-len("weight")] + "wieght" if old.endswith("weight") else old[:-len("bias")] + "bais"

    @register("vit")
    def typo(model: torch.nn.Module):
        return misnamed(vit_spec(model), old, new)

    try:
        for model in (stock, MyViT(ViTConfig(**VIT, num_labels=3))):
            with pytest.raises(SpecError) as caught:
                spec_for(model)
            assert not isinstance(caught.value, UnsupportedArchitectureError)
            assert repr(new) in str(caught.value), str(caught.value)
    finally:
        register("vit")(vit_spec)


class ToyConfig:
    """The config of a user's own architecture (only what `spec_for` reads)."""

    model_type = "s38toy"


class Toy(torch.nn.Module):
    """A user's own two-layer architecture, adapted by the user's own builder."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.config = ToyConfig()
        self.fc1 = torch.nn.Linear(4, 6, bias=bias)
        self.fc2 = torch.nn.Linear(6, 3)


def toy_spec(model: torch.nn.Module, bias: str = "fc1.bias"):
    """The user's adapter of `Toy`: fc1's units are one group; `bias` spells fc1's bias."""
    from hf_mudsc.spec import Group, HookPoint, Member, PermutationSpec

    members = (Member("fc1.weight", 0, "out"), Member(bias, 0, "out"), Member("fc2.weight", 1, "in"))
    return PermutationSpec(groups=(Group("hidden", 6, members, (HookPoint("fc2", "input"),)),),
                           averaged=("fc2.bias",), family="toy")


def test_a_user_adapters_typo_on_the_users_own_class_is_a_spec_error():
    """register("s38toy") a builder naming 'fc1.bais', spec_for(Toy()): "Toy is not supported: it lacks the parameter
    'fc1.bais' ... merge a class docs/design.md §5 lists" (the user's typo blamed on their model's layout)."""
    from hf_mudsc.architectures import discover, register, spec_for, unregister
    from hf_mudsc.errors import SpecError

    discover()
    register("s38toy")(toy_spec)
    try:
        assert spec_for(Toy()).family == "toy"  # the adapter fits the model it was written for
        register("s38toy")(lambda model: toy_spec(model, "fc1.bais"))
        with pytest.raises(SpecError) as caught:
            spec_for(Toy())
        assert not isinstance(caught.value, UnsupportedArchitectureError)
        assert "'fc1.bais'" in str(caught.value), str(caught.value)
        register("s38toy")(toy_spec)
        with pytest.raises(UnsupportedArchitectureError, match="lacks the parameter 'fc1.bias'"):
            spec_for(Toy(bias=False))  # built without the tensor: the model's own layout, said in one line
    finally:
        unregister("s38toy")
