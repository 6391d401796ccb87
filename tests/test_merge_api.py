"""`hf_mudsc.merge`: heads, config records, round trips, the alpha extremes, and every input error."""

from __future__ import annotations

import copy
import json

import datasets
import pytest
import torch
from factories import make_batches, make_model, model_output, permuted_copy, relative_error
from transformers import (
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    GPT2Config,
    GPT2Model,
)

import hf_mudsc
from hf_mudsc.architectures import spec_for
from hf_mudsc.errors import CalibrationError, MergeInputError, UnsupportedArchitectureError
from hf_mudsc.solve.loop import SolveOptions, Solver


def relabel(model, labels):
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {v: k for k, v in model.config.id2label.items()}
    return model


@pytest.fixture(scope="module")
def vit_pair():
    model = make_model("vit_cls", seed=0)
    return model, permuted_copy(model, spec_for(model), seed=3), make_batches("vit_cls")


def test_different_label_sets_concatenate_heads_a_first(vit_pair):
    model, permuted, batches = vit_pair
    a = relabel(copy.deepcopy(model), ["cat", "dog", "fox"])
    a.config._name_or_path = "org/vit-animals"
    b = relabel(copy.deepcopy(permuted), ["car", "bus", "van"])
    b.config._name_or_path = "org/vit-vehicles@v2"
    merged = hf_mudsc.merge([a, b], batches, method="mudsc", matcher="zip", progress=False)
    assert merged.config.num_labels == 6
    assert [merged.config.id2label[i] for i in range(6)] == [
        "vit-animals: cat", "vit-animals: dog", "vit-animals: fox",
        "vit-vehicles: car", "vit-vehicles: bus", "vit-vehicles: van",
    ]
    assert merged.config.task_label_ranges == {"vit-animals": [0, 3], "vit-vehicles": [3, 6]}
    # B is A in another basis with other label names, so both halves of the head reproduce A's logits.
    expected = model_output(a, batches[0])
    logits = model_output(merged, batches[0])
    assert relative_error(logits[:, :3], expected) < 1e-5
    assert relative_error(logits[:, 3:], expected) < 1e-5


def test_config_records_method_and_parents(vit_pair):
    model, permuted, batches = vit_pair
    merged = hf_mudsc.merge([model, permuted], batches, method="mudsc", matcher="align", alpha=0.3,
                            progress=False)
    info = merged.config.mudsc
    assert info["method"] == "mudsc" and info["matcher"] == "align" and info["alpha"] == 0.3
    assert len(info["parents"]) == 2
    assert set(info["group_match_values"]) == {g.name for g in spec_for(model).groups}
    assert info["num_calibration_samples"] == sum(b["pixel_values"].shape[0] for b in batches)
    report = merged.merge_report
    assert report.sweeps >= 6 and len(report.objective_history) == report.sweeps
    # A perfect recovery matches every unit with correlation ~1.
    assert min(report.group_values) > 0.999


@pytest.mark.parametrize("kind,auto", [("vit_cls", AutoModelForImageClassification),
                                       ("bert_cls", AutoModelForSequenceClassification),
                                       ("clip", AutoModel)])
def test_save_pretrained_round_trip(tmp_path, kind, auto):
    a, b = make_model(kind, seed=0), make_model(kind, seed=1)
    if kind != "clip":
        relabel(b, ["x", "y", "z"])
    batches = make_batches(kind, num_batches=2)
    merged = hf_mudsc.merge([a, b], batches, method="zipit", progress=False)
    merged.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = auto.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(merged)
    assert torch.equal(model_output(loaded, batches[0]), model_output(merged, batches[0]))
    assert loaded.config.mudsc["method"] == "zipit"
    if kind != "clip":
        assert loaded.config.task_label_ranges == merged.config.task_label_ranges


def test_folders_are_accepted_as_parents(tmp_path, vit_pair):
    model, permuted, batches = vit_pair
    model.save_pretrained(tmp_path / "a")
    permuted.save_pretrained(tmp_path / "b")
    merged = hf_mudsc.merge([str(tmp_path / "a"), tmp_path / "b"], batches, method="activation_align",
                            progress=False)
    assert relative_error(model_output(merged, batches[0]), model_output(model, batches[0])) < 1e-5
    # Folder parents are recorded by name: a pushed config must not carry this machine's paths.
    assert merged.config.mudsc["parents"] == ["a", "b"]
    assert str(tmp_path) not in merged.config.to_json_string()


def test_inputs_are_never_modified(vit_pair):
    model, permuted, batches = vit_pair
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (model, permuted)]
    model.train()
    hf_mudsc.merge([model, permuted], batches, method="mudsc", progress=False)
    assert model.training, "the parent's train/eval mode must be restored"
    model.eval()
    for m, state in zip((model, permuted), before):
        assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())


def test_dataset_calibration_equals_batch_calibration(vit_pair):
    model, permuted, batches = vit_pair
    pixels = torch.cat([b["pixel_values"] for b in batches])
    dataset = datasets.Dataset.from_dict({"pixel_values": pixels.numpy(), "label": list(range(len(pixels)))})
    from_batches = hf_mudsc.merge([model, make_model("vit_cls", 1)], batches, method="zipit", progress=False)
    from_dataset = hf_mudsc.merge([model, make_model("vit_cls", 1)], dataset, method="zipit", batch_size=7,
                                  progress=False)
    for (name, x), y in zip(from_batches.named_parameters(), from_dataset.parameters()):
        assert torch.allclose(x, y, atol=1e-6), name
    streamed = hf_mudsc.merge([model, make_model("vit_cls", 1)], dataset.to_iterable_dataset(), method="zipit",
                              batch_size=5, progress=False)
    for (name, x), y in zip(from_batches.named_parameters(), streamed.parameters()):
        assert torch.allclose(x, y, atol=1e-6), name


def test_num_samples_limits_calibration(vit_pair):
    model, permuted, batches = vit_pair
    merged = hf_mudsc.merge([model, permuted], batches, method="zipit", num_samples=20, progress=False)
    assert merged.config.mudsc["num_calibration_samples"] == 20


# -- alpha extremes -----------------------------------------------------------------------------------


def _solver(alpha, seed_b=1):
    a, b = make_model("vit_cls", 0), make_model("vit_cls", seed_b)
    spec = spec_for(a)
    generator = torch.Generator().manual_seed(0)
    activations = []
    for group in spec.groups:
        x = torch.randn(2 * group.width, 50, generator=generator, dtype=torch.float64)
        activations.append(torch.corrcoef(x))
    params_a, params_b = dict(a.named_parameters()), dict(b.named_parameters())
    options = SolveOptions(matcher="align", alpha=alpha)
    return Solver(spec, params_a, params_b, activations, options), activations


def test_alpha_one_uses_weight_similarity_only():
    solver, activations = _solver(1.0)
    state = solver._initial_state()
    for index in range(len(solver.spec.groups)):
        weight_only = solver._weight(index, state)
        assert torch.equal(solver.similarity(index, state), weight_only)
        assert not torch.allclose(weight_only, activations[index])


def test_alpha_zero_uses_activation_similarity_only():
    solver, activations = _solver(0.0)
    state = solver._initial_state()
    for index in range(len(solver.spec.groups)):
        assert torch.equal(solver.similarity(index, state), activations[index])


def test_alpha_blends_linearly():
    solver, activations = _solver(0.25)
    state = solver._initial_state()
    index = 1
    expected = 0.25 * solver._weight(index, state) + 0.75 * activations[index]
    assert torch.allclose(solver.similarity(index, state), expected)


def test_mudsc_at_alpha_zero_equals_the_activation_only_methods():
    a, b = make_model("vit_cls", 0), make_model("vit_cls", 1)
    batches = make_batches("vit_cls", 2)
    for matcher, baseline in (("align", "activation_align"), ("zip", "zipit")):
        mudsc = hf_mudsc.merge([a, b], batches, method="mudsc", matcher=matcher, alpha=0.0, progress=False)
        other = hf_mudsc.merge([a, b], batches, method=baseline, progress=False)
        for x, y in zip(mudsc.parameters(), other.parameters()):
            assert torch.equal(x, y)


def test_weight_matching_ignores_calibration():
    a, b = make_model("vit_cls", 0), make_model("vit_cls", 1)
    without = hf_mudsc.merge([a, b], None, method="weight_matching", progress=False)
    # refit="none": the matching ignores the data (the default refit would then read it, tests/test_refit.py)
    with_data = hf_mudsc.merge([a, b], make_batches("vit_cls", 1), method="weight_matching", refit="none",
                               progress=False)
    for x, y in zip(without.parameters(), with_data.parameters()):
        assert torch.equal(x, y)


def test_shared_head_pairing_differs_from_independent_on_different_models():
    a, b = make_model("vit_cls", 0), make_model("vit_cls", 1)
    batches = make_batches("vit_cls", 2)
    shared = hf_mudsc.merge([a, b], batches, method="mudsc", matcher="align", progress=False)
    independent = hf_mudsc.merge([a, b], batches, method="mudsc", matcher="align", independent_heads=True,
                                 progress=False)
    assert any(not torch.equal(x, y) for x, y in zip(shared.parameters(), independent.parameters()))


# -- errors ---------------------------------------------------------------------------------------------


def test_parents_of_different_architecture_are_refused():
    with pytest.raises(MergeInputError, match="different architectures"):
        hf_mudsc.merge([make_model("vit_cls"), make_model("bert_cls")], make_batches("vit_cls", 1))


def test_parents_of_different_config_are_refused():
    from factories import VIT
    from transformers import ViTConfig, ViTForImageClassification
    wide = ViTForImageClassification(ViTConfig(**{**VIT, "hidden_size": 64}, num_labels=3))
    with pytest.raises(MergeInputError, match="hidden_size: 32 vs 64"):
        hf_mudsc.merge([make_model("vit_cls"), wide], make_batches("vit_cls", 1))


def test_a_config_mismatch_names_the_parents_by_letter(tmp_path):
    """QA s25: parents given as objects were named only by class ("'ViTForImageClassification' and
    'ViTForImageClassification' have different configurations"); now by letter, with the folder when there is one."""
    from factories import VIT
    from transformers import ViTConfig, ViTForImageClassification

    other = ViTForImageClassification(ViTConfig(**{**VIT, "layer_norm_eps": 1e-6}, num_labels=3)).eval()
    parents = [make_model("vit_cls"), make_model("vit_cls", 1), other]
    with pytest.raises(MergeInputError, match=r"^parent A and parent C have different configurations.*"
                                              r"layer_norm_eps: 1e-12 vs 1e-06"):
        hf_mudsc.merge(parents, make_batches("vit_cls", 1), progress=False)
    for index, parent in enumerate((parents[0], other)):
        parent.save_pretrained(tmp_path / str(index))
    expected = rf"^parent A \('{tmp_path / '0'}'\) and parent B \('{tmp_path / '1'}'\) have different configurations"
    with pytest.raises(MergeInputError, match=expected):
        hf_mudsc.merge([str(tmp_path / "0"), str(tmp_path / "1")], make_batches("vit_cls", 1), progress=False)
    from hf_mudsc.load.checks import check_parents
    with pytest.raises(MergeInputError, match=r"^parent A and parent C have different configurations"):
        check_parents(parents[0], other, labels=("A", "C"))


def test_unsupported_architecture_names_the_supported_ones():
    gpt = GPT2Model(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=20, n_positions=8))
    supported = ("bert, camembert, clip, clip_text_model, clip_vision_model, distilbert, electra, roberta, vit, "
                 "xlm-roberta")
    with pytest.raises(UnsupportedArchitectureError, match=f"supported model types: {supported}"):
        hf_mudsc.merge([gpt, copy.deepcopy(gpt)], [{"input_ids": torch.ones(1, 4, dtype=torch.long)}])


def test_a_bert_token_classifier_is_refused_naming_its_class_and_the_supported_ones():
    from factories import BERT
    from transformers import BertConfig, BertForTokenClassification
    parents = [BertForTokenClassification(BertConfig(**BERT, num_labels=3)) for _ in range(2)]
    with pytest.raises(UnsupportedArchitectureError,
                       match=r"^BertForTokenClassification is not supported.*use BertModel or "
                             r"BertForSequenceClassification$"):
        hf_mudsc.merge(parents, make_batches("bert_cls", 1), progress=False)



def test_a_bert_multiple_choice_model_is_refused_as_the_token_classifier_is():
    """QA s22: BertForMultipleChoice (not a supported class: docs/design.md §5.2) merged with 3-D inputs and failed
    with a raw reshape error on 2-D ones. Refused in one line, in the token classifier's words."""
    from factories import BERT
    from transformers import BertConfig, BertForMultipleChoice
    parents = [BertForMultipleChoice(BertConfig(**BERT)) for _ in range(2)]
    with pytest.raises(UnsupportedArchitectureError,
                       match=r"^BertForMultipleChoice is not supported.*use BertModel or "
                             r"BertForSequenceClassification$"):
        hf_mudsc.merge(parents, make_batches("bert_cls", 1), progress=False)


@pytest.mark.parametrize("positions", ["relative_key", "relative_key_query"])
def test_a_relative_position_bert_is_refused_in_one_line_before_any_weights(tmp_path, caplog, positions):
    """QA s25: a BERT checkpoint trained with relative positions (per-layer `distance_embedding` tensors) merged as an
    absolute-position BERT (transformers 5 implements none): its trained distance embeddings were dropped with an
    "unused tensors" warning and the merged config still said relative_key. Refused from the config, before any
    weights: as objects, from folders (the dry run reads no weights) and merging the folders."""
    from factories import BERT
    from safetensors.torch import load_file, save_file
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(**BERT, num_labels=3, position_embedding_type=positions)
    parents = [BertForSequenceClassification(config).eval() for _ in range(2)]
    head_dim = BERT["hidden_size"] // BERT["num_attention_heads"]
    for index, parent in enumerate(parents):
        parent.save_pretrained(tmp_path / str(index))
        file = tmp_path / str(index) / "model.safetensors"
        tensors = load_file(file)
        for layer in range(BERT["num_hidden_layers"]):
            tensors[f"bert.encoder.layer.{layer}.attention.self.distance_embedding.weight"] = torch.randn(
                2 * BERT["max_position_embeddings"] - 1, head_dim)
        save_file(tensors, file, metadata={"format": "pt"})
    folders = [tmp_path / "0", tmp_path / "1"]
    expected = (rf"^BertForSequenceClassification uses position_embedding_type '{positions}', which the installed "
                r"transformers' BERT does not implement \(its trained distance embeddings would be dropped\)")
    for given, dry_run in ((parents, False), (folders, True), (folders, False)):
        with pytest.raises(UnsupportedArchitectureError, match=expected) as error:
            hf_mudsc.merge(given, make_batches("bert_cls", 1), dry_run=dry_run, progress=False)
        assert "\n" not in str(error.value) and "absolute" in str(error.value)
    assert "unused" not in caplog.text  # refused before the weights were read


def test_unsupported_layouts_of_a_supported_model_type_are_refused_in_one_line_naming_what_to_use():
    """QA s25: a layout the adapter has no place for was refused with the spec's multi-line internal SpecError (21
    lines for a BERT decoder with cross-attention, 3 for CLIPForImageClassification) naming no fix."""
    from factories import BERT, TEXT, VISION
    from transformers import BertConfig, BertModel, CLIPConfig, CLIPForImageClassification

    decoder = BertModel(BertConfig(**BERT, is_decoder=True, add_cross_attention=True)).eval()
    with pytest.raises(UnsupportedArchitectureError,
                       match=r"^BERT with cross-attention \(add_cross_attention=True\) is not supported;.*BertModel"
                       ) as error:
        hf_mudsc.merge([decoder, copy.deepcopy(decoder)], make_batches("bert", 1), progress=False)
    assert "\n" not in str(error.value)
    clip = CLIPForImageClassification(CLIPConfig(text_config=TEXT, vision_config=VISION, num_labels=3)).eval()
    with pytest.raises(UnsupportedArchitectureError,
                       match=r"^CLIPForImageClassification is not supported \(.*\); use CLIPModel.*CLIPVisionModel"
                       ) as error:
        hf_mudsc.merge([clip, copy.deepcopy(clip)], make_batches("clip_vision", 1), progress=False)
    assert "\n" not in str(error.value)
    # num_labels=0 makes its head an nn.Identity (no classifier tensor): still the class the adapter cannot merge
    headless = CLIPForImageClassification(CLIPConfig(text_config=TEXT, vision_config=VISION, num_labels=0)).eval()
    with pytest.raises(UnsupportedArchitectureError, match=r"^CLIPForImageClassification is not supported"):
        hf_mudsc.merge([headless, copy.deepcopy(headless)], make_batches("clip_vision", 1), progress=False)
    # Any other parameter an adapter has no place for: one line naming the class, the tensor and where to look.
    odd = make_model("bert", 0)
    odd.encoder.extra = torch.nn.Linear(4, 4)
    with pytest.raises(UnsupportedArchitectureError,
                       match=r"^BertModel is not supported: the bert adapter has no place for its parameter "
                             r"'encoder.extra.weight' \(and 1 more\);") as error:
        spec_for(odd)
    assert "\n" not in str(error.value)


def test_an_adapter_bug_beside_an_unplaced_parameter_is_not_reported_as_an_unsupported_layout(monkeypatch):
    """Review s25: `spec_for` turned every SpecError naming an unplaced parameter into "X is not supported", which hid
    an adapter bug listed in the same error (a wrong width, a missing tensor): only a spec whose every problem is an
    unplaced parameter is an unsupported layout; anything else is the adapter's bug, raised with every problem."""
    from dataclasses import replace

    import hf_mudsc.architectures as architectures
    from hf_mudsc.errors import SpecError

    odd = make_model("bert", 0)
    odd.encoder.extra = torch.nn.Linear(4, 4)
    architectures.discover()
    builder = architectures.builder_for("bert")

    def wrong_width(model):
        spec = builder(model)
        return replace(spec, groups=[replace(spec.groups[0], width=spec.groups[0].width + 1), *spec.groups[1:]])

    monkeypatch.setattr(architectures, "builder_for", lambda model_type: wrong_width)
    with pytest.raises(SpecError) as error:
        spec_for(odd)
    assert not isinstance(error.value, UnsupportedArchitectureError)
    assert "encoder.extra.weight" in str(error.value) and "(width " in str(error.value), str(error.value)


@pytest.mark.parametrize(("kind", "backbone"), [("vit_cls", "ViTModel"), ("bert_cls", "BertModel"),
                                                ("roberta_cls", "RobertaModel"),
                                                ("distilbert_cls", "DistilBertModel"),
                                                ("electra_cls", "ElectraModel")])
def test_a_head_without_labels_is_refused_in_one_line_before_any_work(kind, backbone):
    """QA s25: `num_labels=0` heads. ViTForImageClassification (its classifier an nn.Identity) was refused as "not
    supported; use ViTModel or ViTForImageClassification" (its own class); BertForSequenceClassification (a zero-row
    classifier) ran calibration and the solve, then crashed in the refit reshaping 0 elements."""
    from factories import ARCHITECTURES

    parents = [ARCHITECTURES[kind].build(0).eval() for _ in range(2)]
    with pytest.raises(UnsupportedArchitectureError, match=r"head has no labels \(num_labels=0\)") as error:
        hf_mudsc.merge(parents, make_batches(kind, 1), progress=False)
    message = str(error.value)
    assert "\n" not in message and f"merge the {backbone} backbone instead" in message
    assert f"use {backbone} or" not in message


def test_parents_of_different_classes_are_told_to_merge_models_of_parent_as_class():
    """QA s22: BERT parents of two classes were told to merge 'e.g. all ViTForImageClassification'; the example is
    parent A's own class, from the loader and from `check_parents` alike."""
    bert, bare = make_model("bert_cls", 0), make_model("bert", 1)
    expected = r"merge models of the same class \(e\.g\. all BertForSequenceClassification\)$"
    with pytest.raises(MergeInputError, match=expected):
        hf_mudsc.merge([bert, bare], method="linear", progress=False)
    from hf_mudsc.load.checks import check_parents
    with pytest.raises(MergeInputError, match=expected):
        check_parents(bert, bare)

@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_weights_are_refused(bad):
    a, b = make_model("vit_cls", 0), make_model("vit_cls", 1)
    with torch.no_grad():
        b.vit.layers[1].mlp.fc1.weight[0, 0] = bad
    with pytest.raises(MergeInputError, match=r"parent B has NaN or infinite values in 'vit.layers.1.mlp.fc1.weight'"):
        hf_mudsc.merge([a, b], make_batches("vit_cls", 1))


@pytest.mark.parametrize("empty", [[], datasets.Dataset.from_dict({"pixel_values": []})])
def test_calibration_without_samples_is_refused(empty):
    with pytest.raises(CalibrationError, match="no samples"):
        hf_mudsc.merge([make_model("vit_cls", 0), make_model("vit_cls", 1)], empty, progress=False)


def test_calibration_with_missing_columns_names_the_columns_found():
    dataset = datasets.Dataset.from_dict({"image": [[0.0]] * 4, "label": [0, 1, 0, 1]})
    expected = r"lacks column\(s\) \['pixel_values'\].*found columns \['image', 'label'\]"
    with pytest.raises(CalibrationError, match=expected):
        hf_mudsc.merge([make_model("vit_cls", 0), make_model("vit_cls", 1)], dataset, progress=False)
    with pytest.raises(CalibrationError, match="input_ids"):
        hf_mudsc.merge([make_model("bert_cls", 0), make_model("bert_cls", 1)], [{"attention_mask": torch.ones(2, 3)}],
                       progress=False)


def test_wrongly_shaped_calibration_is_refused():
    batches = [{"pixel_values": torch.randn(2, 3, 16, 16)}]  # the models take 1 channel: refused before any forward
    with pytest.raises(CalibrationError, match=r"pixel_values have shape \(2, 3, 16, 16\), but the parents read "
                                               r"\(batch, 1, 16, 16\)"):
        hf_mudsc.merge([make_model("vit_cls", 0), make_model("vit_cls", 1)], batches, progress=False)


@pytest.mark.parametrize("where", ["first", "later"])
@pytest.mark.parametrize("kwargs", [
    {"method": "regmean"}, {"method": "regmean_plusplus"}, {"method": "fisher"},
    {"method": "average", "refit": "ridge"}, {"method": "average", "refit": "gate"},
    {"method": "average", "refit": "repair"},
], ids=["regmean", "regmean_plusplus", "fisher", "refit_ridge", "refit_gate", "refit_repair"])
def test_a_batch_the_data_passes_cannot_run_is_refused_in_one_line(kwargs, where):
    """The same-base methods', the refit's and REPAIR's own passes over the calibration data refuse a batch the model
    cannot run as the statistics pass does (naming the model class and the batch's columns), not with the raw error
    from inside the forward; also when only a later batch is broken (the loops, not only the first batch's pass)."""
    good = make_batches("vit_cls", num_batches=1, batch_size=8)[0]
    # pixels of the shape the parents' config asks for (`ModelInputCheck` refuses another before any pass), with an
    # input the forward cannot take (one flag per example: "Boolean value of Tensor ... is ambiguous")
    bad = {**good, "interpolate_pos_encoding": torch.ones(8)}
    batches = [bad] if where == "first" else [good, bad]
    with pytest.raises(CalibrationError, match=r"^a calibration batch could not be run through "
                                               r"ViTForImageClassification "
                                               r"\(columns \['interpolate_pos_encoding', 'pixel_values'\]\): "):
        hf_mudsc.merge([make_model("vit_cls", 0), make_model("vit_cls", 1)], batches, progress=False, **kwargs)


def test_missing_calibration_suggests_data_free_methods():
    with pytest.raises(MergeInputError, match="weight_matching"):
        hf_mudsc.merge([make_model("vit_cls", 0), make_model("vit_cls", 1)], None)


@pytest.mark.parametrize("kwargs,message", [
    ({"method": "no_such_method"}, "unknown merge method 'no_such_method'; choose one of: auto, mudsc, zipit"),
    ({"matcher": "greedy"}, "unknown matcher 'greedy'"),
    ({"alpha": 1.5}, r"alpha must lie in \[0, 1\]"),
])
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        hf_mudsc.merge([make_model("vit_cls", 0), make_model("vit_cls", 1)], make_batches("vit_cls", 1), **kwargs)


def test_two_or_more_parents():
    with pytest.raises(MergeInputError, match="merge takes a list of two or more parents"):
        hf_mudsc.merge([make_model("vit_cls", 0)], make_batches("vit_cls", 1))
    with pytest.raises(MergeInputError, match="method 'average' merges exactly 2 parents, got 3; merge them 2 at a "
                                              "time, or choose a method that takes any number of parents: mudsc"):
        hf_mudsc.merge([make_model("vit_cls", s) for s in range(3)], make_batches("vit_cls", 1), method="average")


@pytest.mark.parametrize("method", ["mudsc", "average"])
def test_merged_config_drops_pointers_to_remote_code(tmp_path, vit_pair, method):
    """`auto_map`/`custom_pipelines` point at code in the parents' repos: the merged model must not carry them."""
    model, permuted, batches = vit_pair
    remote = {"auto_map": {"AutoModelForImageClassification": "modeling_evil.EvilViT"},
              "custom_pipelines": {"image-classification": {"impl": "pipeline_evil.EvilPipeline"}}}
    parents = [copy.deepcopy(model), copy.deepcopy(permuted)]
    for parent in parents:
        for key, value in remote.items():
            setattr(parent.config, key, value)
    merged = hf_mudsc.merge(parents, batches if method == "mudsc" else None, method=method, progress=False)
    merged.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "auto_map" not in saved and "custom_pipelines" not in saved
    assert saved["mudsc"]["method"] == method
    # The parents keep theirs: inputs are never modified.
    assert all(p.config.auto_map == remote["auto_map"] for p in parents)
    # A pointer only one parent has is no reason to refuse the pair: it is dropped anyway.
    del parents[1].config.auto_map
    merged = hf_mudsc.merge(parents, batches if method == "mudsc" else None, method=method, progress=False)
    assert not hasattr(merged.config, "auto_map")


@pytest.mark.parametrize("kind", ["image_processor", "tokenizer"])
def test_the_saved_processor_drops_pointers_to_remote_code(tmp_path, kind):
    """The config's `auto_map` was dropped, the processor's kept: the merged `preprocessor_config.json` (or
    `tokenizer_config.json`) sent `trust_remote_code` users to code in a parent's repo, or another repo's."""
    from factories import make_model

    remote = {"auto_map": {"AutoImageProcessor" if kind == "image_processor" else "AutoTokenizer":
                           ["other-org/repo--evil.EvilProcessor", None]},
              "custom_pipelines": {"x": {"impl": "evil.P"}}}
    name = "preprocessor_config.json" if kind == "image_processor" else "tokenizer_config.json"
    parents = []
    for seed in (1, 2):
        folder = tmp_path / f"parent{seed}"
        if kind == "image_processor":
            from transformers import ViTImageProcessor

            make_model("vit_cls", seed).save_pretrained(folder)
            ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder)
        else:
            from transformers import BertTokenizer

            model = make_model("bert_cls", seed)
            model.save_pretrained(folder)
            vocab = tmp_path / "vocab.txt"
            vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
                                       + [f"t{i}" for i in range(model.config.vocab_size - 5)]) + "\n")
            BertTokenizer(str(vocab)).save_pretrained(folder)
        settings = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps({**settings, **remote}))
        parents.append(folder)
    before = [(folder / name).read_bytes() for folder in parents]
    merged = hf_mudsc.merge(parents, method="average", progress=False)
    hf_mudsc.save_merged(merged, tmp_path / "merged")
    saved = json.loads((tmp_path / "merged" / name).read_text())
    assert "auto_map" not in saved and "custom_pipelines" not in saved
    assert {k: v for k, v in saved.items() if k in settings} == {k: v for k, v in settings.items() if k in saved}
    assert [(folder / name).read_bytes() for folder in parents] == before  # inputs are never modified


@pytest.mark.parametrize("size", [1.0, 1.5])
def test_a_single_head_vit_merges_and_recovers_its_permuted_copy(size):
    """`num_attention_heads=1` is legal; its attention groups have one head, and the stream's attention groups
    were found by `num_heads > 1`: every merge failed after the solve ("attention groups differ ...: []")."""
    from factories import VIT, randomize
    from transformers import ViTConfig, ViTForImageClassification
    model = randomize(ViTForImageClassification(ViTConfig(**{**VIT, "num_attention_heads": 1}, num_labels=3)), 1)
    copy_ = permuted_copy(model, spec_for(model), 3)
    batches = make_batches("vit_cls", num_batches=4)
    merged = hf_mudsc.merge([model, copy_], batches, method="mudsc", size=size, progress=False)
    if size == 1.0:
        assert relative_error(model_output(merged, batches[0]), model_output(model, batches[0])) < 1e-5
    assert merged.config.num_attention_heads == 1
    assert all(torch.isfinite(t).all() for t in merged.state_dict().values())


def test_progress_false_shows_no_loading_bars(tmp_path, capfd):
    """`progress=False` showed no bar of hf_mudsc's own, but transformers drew a 'Loading weights' bar per parent
    read from a folder (a wall of carriage returns in a log); the library's switch is restored afterwards."""
    import transformers

    for seed in (0, 1):
        make_model("vit_cls", seed=seed).save_pretrained(tmp_path / f"vit{seed}")
    capfd.readouterr()
    was_on = transformers.utils.logging.is_progress_bar_enabled()  # an in-process CLI test may have switched it off
    transformers.utils.logging.enable_progress_bar()
    try:
        hf_mudsc.merge([tmp_path / "vit0", tmp_path / "vit1"], method="weight_matching", progress=False)
        assert "Loading weights" not in capfd.readouterr().err
        assert transformers.utils.logging.is_progress_bar_enabled()
    finally:
        if not was_on:
            transformers.utils.logging.disable_progress_bar()
