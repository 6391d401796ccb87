"""Warnings for merges likely to disappoint (hf_mudsc.diagnostics): each one triggered by a real merge and found in
the log, the report, `config.mudsc` and the card; the outlier rule on hand-made values."""

from __future__ import annotations

import logging

import pytest
import torch
from factories import fine_tune, make_batches, make_model, permuted_copy, same_weights

import hf_mudsc
from hf_mudsc.architectures import spec_for
from hf_mudsc.diagnostics import (
    calibration_size_warning,
    relation_warning,
    weak_group_warning,
    weak_groups,
)
from hf_mudsc.methods import get_method


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: thread start-up dominates on a busy machine
    yield
    torch.set_num_threads(threads)


def _merge(models, batches, caplog, **options):
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_mudsc"):
        merged = hf_mudsc.merge(models, batches, progress=False, **options)
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    return merged, logged


def _named(model):
    """`model` with label names of its own: the factories' models carry transformers' placeholders (`LABEL_0`, ...),
    which draw the default-labels warning; the tests of the other warnings name them."""
    names = [f"class {i}" for i in range(model.config.num_labels)]
    model.config.id2label, model.config.label2id = dict(enumerate(names)), {n: i for i, n in enumerate(names)}
    return model


def _card(merged, tmp_path) -> str:
    return (hf_mudsc.save_merged(merged, tmp_path / "merged") / "README.md").read_text()


def test_weak_group_rule_on_hand_made_values():
    names = ["g0", "g1", "g2", "g3", "g4"]
    # median 0.9, MAD 0.01: the threshold is min(0.9 - 3 * 1.4826 * 0.01, 0.9 - 0.1) = 0.8
    assert weak_groups(names, [0.9, 0.91, 0.89, 0.9, 0.3]) == [("g4", 0.3, pytest.approx(0.8))]
    # a dip of 0.05 among equal values: MAD = 0 would flag it, the minimum gap does not
    assert weak_groups(names, [0.9, 0.9, 0.9, 0.9, 0.85]) == []
    # spread-out values widen the threshold: median 0.5, MAD 0.2 -> 0.5 - 0.89 < 0: nothing is far below
    assert weak_groups(names, [0.1, 0.3, 0.5, 0.7, 0.9]) == []
    assert weak_groups(names[:3], [1.0, 1.0, 0.0]) == []  # too few groups for a median to mean anything
    text = weak_group_warning(names, [0.9, 0.91, 0.89, 0.9, 0.3])
    assert text.startswith("1 group(s) match far worse than the others (median 0.900; below 0.800): g4 0.300")


def test_calibration_size_rule_names_the_widest_short_group():
    widths = {"residual": 32, "mlp": 48, "pooler": 32}
    assert calibration_size_warning({"residual": 64, "mlp": 96, "pooler": 64}, widths) is None  # rows = 2n: enough
    text = calibration_size_warning({"residual": 40, "mlp": 95, "pooler": 8}, widths)
    assert text.startswith("calibration too small for the widths: group 'mlp' (48 units per parent) saw 95 rows "
                           "(one per token read; one per example for a group read at the first token only), fewer "
                           "than the 96 units it correlates")
    assert "(3 group(s) affected)" in text and "num_samples= (CLI: --num-samples)" in text


def test_a_layer_with_no_counterpart_is_warned_about_in_log_report_config_and_card(caplog, tmp_path):
    a = _named(make_model("vit_cls", 1))
    b = permuted_copy(a, spec_for(a), 3)  # the same function in another basis: every group matches perfectly ...
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # ... except layer 1's MLP, whose first weights are replaced by random ones
        for name, param in b.named_parameters():
            if "layers.1.mlp.fc1" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * param.std())
    merged, logged = _merge([a, b], make_batches("vit_cls", num_batches=4), caplog, method="mudsc")
    values = dict(zip(merged.merge_report.group_names, merged.merge_report.group_values))
    assert values["vit.layers.1.mlp"] < 0.5 and values["vit.layers.0.mlp"] > 0.99
    [warning] = merged.merge_report.warnings
    assert warning.startswith("2 group(s) match far worse than the others (median 1.000; below 0.900): residual ")
    assert f"vit.layers.1.mlp {values['vit.layers.1.mlp']:.3f}" in warning
    assert logged == [warning] and merged.config.mudsc["warnings"] == [warning]
    card = _card(merged, tmp_path)
    assert "## Warnings" in card and f"- {warning}" in card


def test_too_few_calibration_rows_for_the_widths_are_warned_about(caplog, tmp_path):
    a, b = make_model("vit_cls", 1), make_model("vit_cls", 2)
    # 2 images x 17 tokens = 34 rows per token group, fewer than 2 x 48 MLP units (the residual group, read once
    # per image, saw 2 rows for 2 x 32 units: also short, but narrower)
    merged, logged = _merge([a, b], make_batches("vit_cls", num_batches=1, batch_size=2), caplog, method="zipit")
    text = ("calibration too small for the widths: group 'vit.layers.0.mlp' (48 units per parent) saw 34 rows "
            "(one per token read; one per example for a group read at the first token only), fewer than the 96 "
            "units it correlates")
    assert [w for w in merged.merge_report.warnings if w.startswith(text)]
    assert [w for w in logged if w.startswith(text)] and [w for w in merged.config.mudsc["warnings"]
                                                         if w.startswith(text)]
    assert text in _card(merged, tmp_path)
    # 4 batches of 16 images: 1088 rows per token group and 64 for the residual's 2 x 32 units — no such warning
    enough, _ = _merge([a, b], make_batches("vit_cls", num_batches=4), caplog, method="zipit")
    assert not [w for w in enough.merge_report.warnings if w.startswith("calibration too small")]


def test_calibration_data_that_repeats_examples_is_warned_about(caplog):
    """QA s24: 64 copies of one sentence merged exactly as the one sentence did, but only the single sentence got the
    "calibration too small" warning: rows were counted, not distinct ones. A repeat (same tokens, wherever the padding
    ends; same pixels) is counted and said; distinct data says nothing."""
    a, b = make_model("bert_cls", 1), make_model("bert_cls", 2)
    [batch] = make_batches("bert_cls", num_batches=1, batch_size=4)
    one = {key: value[:1] for key, value in batch.items()}
    padded = {key: torch.cat([value[:1], torch.zeros_like(value[:1, :3])], dim=1) for key, value in batch.items()}
    repeated = [{key: value.repeat(4, 1) for key, value in one.items()}, padded,
                {key: value[1:3] for key, value in batch.items()}]  # 4 copies, one more padded longer, 2 others
    merged, logged = _merge([a, b], repeated, caplog, method="zipit", refit="none")
    text = ("the calibration data repeats examples: 3 distinct among the 7 read, so the statistics are those of 3 "
            "examples (a repeat adds nothing, yet counts toward num_samples= (CLI: --num-samples)); pass distinct "
            "examples")
    assert text in merged.merge_report.warnings and text in merged.config.mudsc["warnings"] and text in logged
    clean, _ = _merge([a, b], make_batches("bert_cls", num_batches=2), caplog, method="zipit", refit="none")
    assert not [w for w in clean.merge_report.warnings if "repeats examples" in w]


def test_averaging_independent_inits_is_warned_about(caplog, tmp_path):
    a, b = _named(make_model("vit_cls", 1)), _named(make_model("vit_cls", 2))  # different random inits
    merged, logged = _merge([a, b], None, caplog, method="average")
    assert merged.config.mudsc["parent_relation"]["relation"] == "independent"
    expected = ("method 'average' fuses units by position, but the parents are independent models whose units do "
                "not correspond: the merge will likely collapse; use a unit-matching method such as 'mudsc' "
                "(method= (CLI: --method))")
    assert merged.merge_report.warnings == [expected] and logged == [expected]
    assert f"- {expected}" in _card(merged, tmp_path)


def test_a_position_method_on_independent_inits_followed_by_the_refit_is_not_called_a_collapse(caplog):
    """regmean (a same-base method that reads the data) on independent inits: refit="auto" refits it (the gate
    keeps the refit when held-out fidelity improves; the README demo's regmean + refit row is among its best), so
    "will likely collapse" would be false; the warning says what holds: by position alone the units do not
    correspond, the refit rebuilds the layers, and a unit-matching method starts from corresponding units."""
    a, b = _named(make_model("vit_cls", 1)), _named(make_model("vit_cls", 2))
    merged, logged = _merge([a, b], make_batches("vit_cls", num_batches=4), caplog, method="regmean")
    assert merged.config.mudsc["parent_relation"]["relation"] == "independent"
    assert merged.merge_report.recipe["refit"] == "gate"
    expected = ("method 'regmean' fuses units by position, but the parents are independent models whose units do "
                "not correspond: alone that merge collapses; the refit that follows rebuilds every linear layer "
                "from the calibration data (kept only if it agrees better with the parents on held-out samples), "
                "while a unit-matching method such as 'mudsc' starts from corresponding units (method= (CLI: "
                "--method))")
    assert merged.merge_report.warnings == [expected] and logged == [expected]
    # without the refit the collapse stands
    alone, _ = _merge([a, b], make_batches("vit_cls", num_batches=4), caplog, method="regmean", refit="none")
    assert "the merge will likely collapse" in alone.merge_report.warnings[0]
    # refit="ridge" is not gated: the warning must not say the refit is kept only if it agrees better
    forced, _ = _merge([a, b], make_batches("vit_cls", num_batches=4), caplog, method="regmean", refit="ridge")
    assert forced.merge_report.recipe["refit"] == "ridge"
    assert "the refit that follows rebuilds every linear layer from the calibration data, while" in (
        forced.merge_report.warnings[0]) and "kept only if" not in forced.merge_report.warnings[0]


def test_unit_matching_on_fine_tunes_of_one_base_is_warned_about_and_a_clean_merge_is_not(caplog):
    a = _named(make_model("vit_cls", 1))
    b = _named(make_model("vit_cls", 1))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a "fine-tune": the same init moved by 5 %
        for param in b.parameters():
            param.add_(0.05 * param.std() * torch.randn(param.shape, generator=generator))
    merged, logged = _merge([a, b], make_batches("vit_cls", num_batches=4), caplog, method="mudsc")
    assert merged.config.mudsc["parent_relation"]["relation"] == "shared base"
    expected = relation_warning("shared base", get_method("mudsc"))
    assert expected.startswith("the parents are fine-tunes of one base, whose units already correspond: 'mudsc' "
                               "can only reorder them")
    assert merged.merge_report.warnings == [expected] and logged == [expected]
    # The same data on independent inits with mudsc: nothing to warn about.
    clean, logged = _merge([a, _named(make_model("vit_cls", 2))], make_batches("vit_cls", num_batches=4), caplog)
    assert clean.merge_report.warnings == [] and clean.config.mudsc["warnings"] == []
    assert logged == []
    assert relation_warning("same model", get_method("mudsc")) == (
        "the parents are the same model: the merge gives back that model")


def test_parents_whose_heads_share_only_transformers_default_label_names_are_warned_about(caplog, tmp_path):
    """Two binary classifiers saved without label names both read `LABEL_0, LABEL_1`: the merge takes them for one
    label set and fuses their heads, which is right only if they are one task. Said once, with the fix (name the
    labels so the heads stay apart); named labels that agree are not warned about."""
    generic = [make_model("vit_cls", seed, num_labels=2) for seed in (1, 2)]
    batches = make_batches("vit_cls", num_batches=2)
    merged, logged = _merge(generic, batches, caplog)
    expected = [text for text in logged if "LABEL_0" in text]
    assert len(expected) == 1 and "id2label" in expected[0] and "\n" not in expected[0]
    assert expected[0] in merged.config.mudsc["warnings"] and expected[0] in _card(merged, tmp_path)
    for model in generic:
        model.config.id2label = {0: "cat", 1: "dog"}
        model.config.label2id = {"cat": 0, "dog": 1}
    _, logged = _merge(generic, batches, caplog)
    assert not [text for text in logged if "LABEL_0" in text or "id2label" in text]


def test_the_dry_run_warns_about_default_label_names_too():
    plan = hf_mudsc.merge([make_model("vit_cls", seed, num_labels=2) for seed in (1, 2)], method="weight_matching",
                          dry_run=True)
    assert [text for text in plan.warnings if "default names (LABEL_0, LABEL_1)" in text]


def test_parents_with_different_image_processors_are_warned_about_in_config_and_card(caplog, tmp_path):
    """The merged model ships parent A's processor, so parent B's task is served with A's preprocessing (and raw
    calibration images were preprocessed with it). That was one log line of the calibration step, naming nothing,
    absent from config and card."""
    from transformers import ViTImageProcessor

    folders = []
    for name, seed, mean in (("a", 1, 0.5), ("b", 2, 0.2)):
        _named(make_model("vit_cls", seed)).save_pretrained(tmp_path / name)
        ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[mean], image_std=[0.5]).save_pretrained(
            tmp_path / name)
        folders.append(str(tmp_path / name))
    merged, logged = _merge(folders, make_batches("vit_cls", num_batches=2), caplog)
    found = [text for text in merged.config.mudsc["warnings"] if "processor" in text]
    assert len(found) == 1 and "image_mean" in found[0] and "image_std" not in found[0] and "\n" not in found[0]
    assert logged.count(found[0]) == 1 and found[0] in _card(merged, tmp_path)


def test_reference_compat_with_a_method_that_matches_no_units_is_warned_about(caplog):
    """`reference_compat=True` asks for the reference's MuDSC weights; for fine-tunes of one base `auto` picks regmean,
    which has no reference to reproduce: the option then only turned the refit off, silently (its card row hidden)."""
    from factories import fine_tune

    base = make_model("vit_cls", seed=0)
    parents = [fine_tune(base, seed, 0.05, relative=True) for seed in (1, 2)]
    with caplog.at_level("WARNING", logger="hf_mudsc"):
        merged = hf_mudsc.merge(parents, make_batches("vit_cls", num_batches=2), reference_compat=True, progress=False)
    assert merged.config.mudsc["method"] == "regmean" and merged.config.mudsc["refit"] == "none"
    assert ("method regmean matches no units, so reference_compat= (CLI: --reference-compat) has no reference merge to "
            "reproduce: it only turned the refit off (refit 'gate' otherwise); pass method='mudsc' for the reference's "
            "merge") in caplog.text


@pytest.mark.parametrize("method, keywords, data, named", [
    ("mudsc", {"refit": "none", "refit_lambda": 5.0}, True, "refit_lambda= (CLI: --refit-lambda)"),
    # QA s20: data given to a method that reads none (linear, no refit) was silent; the card listed it, 0 samples.
    ("linear", {"refit": "none"}, True, "the calibration data (calibration= (CLI: --calibration)) has no effect"),
    ("weight_matching", {"num_samples": 5}, False, "num_samples= (CLI: --num-samples)"),
    ("weight_matching", {"image_column": "foo"}, False, "image_column= (CLI: --image-column)"),
    ("weight_matching", {"statistics_dtype": "float64"}, False, "statistics_dtype= (CLI: --statistics-dtype)"),
    # independent_heads pairs attention heads, which only a unit-matching method does (was silent: card row hidden)
    ("linear", {"independent_heads": True}, False, "independent_heads= (CLI: --independent-heads) has no effect"),
])
def test_options_the_merge_does_not_read_are_said_to_have_no_effect(caplog, method, keywords, data, named):
    """QA: options the merge never reads were accepted silently (other unread options get a warning): a refit
    setting with no refit, calibration settings without calibration data. Each is now said in one warning, and the
    merge is what it is without them."""
    parents = [make_model("vit_cls", seed=1), make_model("vit_cls", seed=2)]
    batches = make_batches("vit_cls", num_batches=2) if data else None
    with caplog.at_level(logging.WARNING, logger="hf_mudsc"):
        merged = hf_mudsc.merge(parents, batches, method=method, progress=False, **keywords)
    said = [r.getMessage() for r in caplog.records if "no effect" in r.getMessage()]
    assert len(said) == 1 and named in said[0], said
    plain = hf_mudsc.merge(parents, batches, method=method, progress=False,
                           **{k: v for k, v in keywords.items() if k == "refit"})
    assert same_weights(merged, plain)


def test_a_base_given_to_a_method_that_does_not_read_it_is_said_to_change_no_weight(caplog):
    base = make_model("vit_cls", seed=0)
    parents = [fine_tune(base, 1, 0.02), fine_tune(base, 2, 0.02)]
    with caplog.at_level(logging.WARNING, logger="hf_mudsc"):
        merged = hf_mudsc.merge(parents, method="linear", base=base, progress=False)
    said = [r.getMessage() for r in caplog.records if "does not read the base" in r.getMessage()]
    assert len(said) == 1 and "base= (CLI: --base)" in said[0], said
    assert same_weights(merged, hf_mudsc.merge(parents, method="linear", progress=False))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_mudsc"):
        hf_mudsc.merge(parents, method="ties", base=base, progress=False)
    assert "does not read the base" not in caplog.text


def test_private_without_a_push_is_said_to_have_no_effect(tmp_path, caplog):
    """QA s20: `--private` without `--push-to-hub` (the service's `private: true` without `push_to_hub`) was accepted
    without a word; nothing is pushed, so nothing is made private."""
    from hf_mudsc.publish.recipe import Recipe

    with caplog.at_level(logging.WARNING, logger="hf_mudsc"):
        Recipe(models=["a", "b"], method="linear").override(output=str(tmp_path / "o"), private=True).validate()
    said = [r.getMessage() for r in caplog.records if "no effect" in r.getMessage()]
    assert said == ["private= (CLI: --private) has no effect: nothing is pushed (no push_to_hub= (CLI: "
                    "--push-to-hub))"], said
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_mudsc"):
        Recipe(models=["a", "b"], method="linear").override(push_to_hub="org/m", private=True).validate()
    assert not [r for r in caplog.records if "no effect" in r.getMessage()]


def test_the_card_says_calibration_data_the_method_did_not_read(tmp_path):
    """QA s20: `--method linear --calibration C` (no refit) listed C as the card's calibration data, next to
    "Calibration samples | 0", as if the merge had been calibrated on it."""
    from test_cli import save_parents_and_data

    from hf_mudsc.cli.main import main

    a, b, calibration = save_parents_and_data(tmp_path)
    out = tmp_path / "out"
    assert main(["merge", str(a), str(b), "--method", "linear", "--calibration", str(calibration), "--output",
                 str(out)]) == 0
    card = (out / "README.md").read_text()
    row = next(line for line in card.splitlines() if line.startswith("| Calibration data |"))
    assert "not read" in row and calibration.name in row, row


@pytest.mark.parametrize("kind, option", [("vit_cls", "text_column"), ("bert_cls", "image_column")])
def test_a_column_option_of_a_kind_the_parents_do_not_read_is_said_to_have_no_effect(kind, option):
    """QA s22 (r5): `text_column=` for image parents (`image_column=` for text parents) was neither read nor refused,
    yet recorded in the recipe and card; it is said to have no effect, as other inert options are, in the merge's
    warnings and in its dry run (the same function)."""
    from hf_mudsc.diagnostics import inert_options_warnings
    from hf_mudsc.options import MergeOptions

    spec = spec_for(make_model(kind, seed=1))
    options = MergeOptions(**{option: "caption"})
    said = inert_options_warnings(options, method="mudsc", reads_base=False, reads_data=True, has_data=True,
                                  refit="none", inputs=spec.inputs)
    assert len(said) == 1 and said[0].startswith(f"{option}= (CLI: --{option.replace('_', '-')}) has no effect")
    assert ("no text" if option == "text_column" else "no images") in said[0]
    other = "image_column" if option == "text_column" else "text_column"  # the kind the parents read: used
    assert not inert_options_warnings(MergeOptions(**{other: "caption"}), method="mudsc", reads_base=False,
                                      reads_data=True, has_data=True, refit="none", inputs=spec.inputs)


def test_the_dry_run_says_a_text_column_for_image_parents_has_no_effect():
    import datasets

    parents = [make_model("vit_cls", seed) for seed in (1, 2)]
    data = datasets.Dataset.from_dict({"pixel_values": torch.randn(4, 1, 16, 16).tolist(), "caption": ["a"] * 4})
    plan = hf_mudsc.merge(parents, data, method="mudsc", refit="none", text_column="caption", dry_run=True)
    assert [text for text in plan.warnings if text.startswith("text_column= (CLI: --text-column) has no effect")]


def _tokenizer(lower: bool, extra: str = "") -> object:
    from transformers import BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "The", "Cat", "good", "bad", extra or "mat"]
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=lower)


def test_tokenizer_differences_name_lower_casing_vocabulary_and_max_length():
    from hf_mudsc.load.processors import tokenizer_differences

    lower = _tokenizer(True)
    assert tokenizer_differences([lower, _tokenizer(True)]) == []
    assert tokenizer_differences([lower, None, _tokenizer(False)]) == ["lower-casing"]
    assert tokenizer_differences([lower, _tokenizer(True, extra="rug")]) == ["vocabulary"]
    longer = _tokenizer(True)
    longer.model_max_length = 16
    assert tokenizer_differences([lower, longer]) == ["max length (model_max_length)"]


def test_parents_with_different_tokenizers_are_warned_about_in_config_and_card(caplog, tmp_path):
    """QA s22 (r3): parent A lower-cases, parent B does not: A's tokenizer is shipped and tokenized B's calibration
    text, without a word (differing image processors were already warned about; tokenizers now take that path)."""
    import datasets

    folders = []
    for name, seed, lower in (("a", 1, True), ("b", 2, False)):
        _named(make_model("bert_cls", seed)).save_pretrained(tmp_path / name)
        _tokenizer(lower).save_pretrained(tmp_path / name)
        folders.append(str(tmp_path / name))
    data = datasets.Dataset.from_dict({"text": ["The Cat sat on the mat", "good cat", "The cat was bad"] * 4})
    merged, logged = _merge(folders, data, caplog, method="mudsc", refit="none")
    found = [text for text in merged.config.mudsc["warnings"] if "tokenizer" in text]
    assert len(found) == 1 and found[0].startswith("the parents' tokenizers differ (lower-casing)"), found
    assert logged.count(found[0]) == 1 and found[0] in _card(merged, tmp_path)


@pytest.mark.parametrize("method,options,said", [
    ("zipit", {"alpha": 0.3}, "method zipit does not read alpha= (CLI: --alpha)"),
    ("linear", {"base": "parent"}, "does not read the base"),
    ("mudsc", {"refit": "none", "refit_lambda": 0.1}, "refit_lambda= (CLI: --refit-lambda) has no effect"),
])
def test_an_option_that_changes_nothing_is_recorded_like_every_warning(caplog, tmp_path, method, options, said):
    """The options a merge does not read were only logged: `config.mudsc["warnings"]`, the report and the card,
    which list every other warning of the merge, did not hold them."""
    base = _named(make_model("vit_cls", seed=0))
    parents = [_named(fine_tune(base, 1, 0.02)), _named(fine_tune(base, 2, 0.02))]
    options = {k: (base if v == "parent" else v) for k, v in options.items()}
    merged, logged = _merge(parents, make_batches("vit_cls", 2, 4), caplog, method=method, **options)
    found = [text for text in merged.config.mudsc["warnings"] if said in text]
    assert len(found) == 1, merged.config.mudsc["warnings"]
    assert found[0] in logged and logged.count(found[0]) == 1
    assert found == [text for text in merged.merge_report.warnings if said in text]
    assert found[0] in _card(merged, tmp_path)
