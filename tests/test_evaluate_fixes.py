"""`hf-mudsc evaluate` after issue 10: tasks kept in parent order, Hub ids, metric code only on opt-in, the
merge's card kept intact, and no local paths in cards. Every expected figure is computed directly here."""

from __future__ import annotations

import json
import re
import textwrap

import datasets
import numpy as np
import pytest
import torch
from cli_runs import run_cli_output
from factories import make_model
from huggingface_hub import ModelCard
from PIL import Image
from transformers import AutoModelForImageClassification, ViTImageProcessor

from hf_mudsc.apply.classifier import task_ranges
from hf_mudsc.cli.main import main
from hf_mudsc.errors import EvaluationError
from hf_mudsc.evaluate.harness import evaluate_merge
from hf_mudsc.evaluate.metrics import load_metric

PROCESSOR = ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5], image_std=[0.5])


pytestmark = pytest.mark.usefixtures("one_thread_module")


def _images(seed: int, count: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), mode="L") for _ in range(count)]


def _save_parent(folder, seed: int, labels: list[str]) -> None:
    model = make_model("vit_cls", seed, num_labels=len(labels))
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {label: i for i, label in enumerate(labels)}
    model.save_pretrained(folder)
    PROCESSOR.save_pretrained(folder)


@pytest.fixture(scope="module")
def backward(tmp_path_factory):
    """Parent A's task is `zeta` (3 classes), B's `alpha` (2): the names sort opposite to the parent order."""
    root = tmp_path_factory.mktemp("backward")
    _save_parent(root / "zeta", 1, ["z0", "z1", "z2"])
    _save_parent(root / "alpha", 2, ["a0", "a1"])
    calibration = datasets.Dataset.from_dict({"image": _images(0, 16)}).cast_column("image", datasets.Image())
    calibration.save_to_disk(root / "calibration")
    out = root / "merged"
    argv = ["merge", str(root / "zeta"), str(root / "alpha"), "--calibration", str(root / "calibration"),
            "--output", str(out), "--method", "zipit", "--num-samples", "16", "--batch-size", "8"]
    assert main(argv) == 0
    rng = np.random.default_rng(3)
    tests = {}
    for task, seed, count, classes in (("zeta", 11, 14, 3), ("alpha", 12, 13, 2)):
        data = datasets.Dataset.from_dict({"image": _images(seed, count),
                                           "label": rng.integers(0, classes, count).tolist()})
        data.cast_column("image", datasets.Image()).save_to_disk(root / f"test-{task}")
        tests[task] = root / f"test-{task}"
    return root, out, tests


def _direct_figures(root, out, tests) -> dict[str, dict[str, float]]:
    """Every figure of eval_results.json computed by hand from the three models' logits."""
    merged = AutoModelForImageClassification.from_pretrained(out).eval()
    zeta = AutoModelForImageClassification.from_pretrained(root / "zeta").eval()
    alpha = AutoModelForImageClassification.from_pretrained(root / "alpha").eval()
    logits, labels = {}, {}
    for task, path in tests.items():
        data = datasets.load_from_disk(str(path))
        pixels = PROCESSOR([image for image in data["image"]], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            logits[task] = {name: model(pixel_values=pixels).logits.double()
                            for name, model in (("merged", merged), ("zeta", zeta), ("alpha", alpha))}
        labels[task] = torch.tensor(data["label"])
    offset = {"zeta": 0, "alpha": 3}  # parent order: A (zeta) = ids 0..2, B (alpha) = ids 3..4

    def acc(predictions, references) -> float:
        return float((predictions == references).double().mean())

    joint_labels = torch.cat([labels[t] + offset[t] for t in ("zeta", "alpha")])
    both = {name: torch.cat([logits[t][name] for t in ("zeta", "alpha")]) for name in ("merged", "zeta", "alpha")}
    ensemble_joint = torch.cat([both["zeta"].softmax(-1), both["alpha"].softmax(-1)], dim=1)
    figures = {
        "merged": {
            "zeta": acc(logits["zeta"]["merged"][:, 0:3].argmax(-1), labels["zeta"]),
            "alpha": acc(logits["alpha"]["merged"][:, 3:5].argmax(-1), labels["alpha"]),
            # a concatenated head decides jointly by each task's softmax, as the ensemble does
            "joint": acc(torch.cat([both["merged"][:, 0:3].softmax(-1), both["merged"][:, 3:5].softmax(-1)],
                                   dim=1).argmax(-1), joint_labels),
        },
        "parent_a": {
            "zeta": acc(logits["zeta"]["zeta"].argmax(-1), labels["zeta"]),
            "joint": acc(both["zeta"].argmax(-1), joint_labels),
        },
        "parent_b": {
            "alpha": acc(logits["alpha"]["alpha"].argmax(-1), labels["alpha"]),
            "joint": acc(both["alpha"].argmax(-1) + 3, joint_labels),
        },
        "ensemble": {
            "zeta": acc(logits["zeta"]["zeta"].softmax(-1).argmax(-1), labels["zeta"]),
            "alpha": acc(logits["alpha"]["alpha"].softmax(-1).argmax(-1), labels["alpha"]),
            "joint": acc(ensemble_joint.argmax(-1), joint_labels),
        },
    }
    for scorer in ("merged", "ensemble"):
        figures[scorer]["average"] = (figures[scorer]["zeta"] + figures[scorer]["alpha"]) / 2
    return figures


def _figures(path) -> dict[str, dict[str, float]]:
    scores = json.loads(path.read_text())["scores"]
    return {scorer: {view: values["accuracy"] for view, values in views.items()} for scorer, views in scores.items()}


# ------------------------------------------------------------------------------------ item 2: task order
def test_task_ranges_follow_the_parent_order_even_when_stored_sorted(backward):
    _, out, _ = backward
    stored = json.loads((out / "config.json").read_text())["task_label_ranges"]
    assert list(stored) == ["alpha", "zeta"]  # transformers writes config.json with sorted keys
    config = AutoModelForImageClassification.from_pretrained(out).config
    assert list(task_ranges(config).items()) == [("zeta", (0, 3)), ("alpha", (3, 5))]


@pytest.mark.parametrize("mapping", ["positional", "named", "named-reversed"])
def test_every_figure_matches_a_direct_computation_when_task_names_sort_backwards(backward, tmp_path, mapping):
    root, out, tests = backward
    if mapping == "positional":  # A's task first, as documented
        flags = ["--dataset", str(tests["zeta"]), "--dataset", str(tests["alpha"])]
    elif mapping == "named":
        flags = ["--dataset", f"zeta={tests['zeta']}", "--dataset", f"alpha={tests['alpha']}"]
    else:
        flags = ["--dataset", f"alpha={tests['alpha']}", "--dataset", f"zeta={tests['zeta']}"]
    json_path = tmp_path / "results.json"
    assert main(["evaluate", str(out), *flags, "--no-card", "--output-json", str(json_path)]) == 0
    expected = _direct_figures(root, out, tests)
    got = _figures(json_path)
    assert set(got) == set(expected)
    for scorer, views in expected.items():
        assert set(got[scorer]) == set(views), scorer
        for view, value in views.items():
            assert got[scorer][view] == pytest.approx(value, abs=1e-12), (scorer, view)
    saved = json.loads(json_path.read_text())
    assert list(saved["tasks"]) == ["zeta", "alpha"]  # parent order, whatever the flags' order
    assert saved["tasks"]["zeta"]["label_range"] == [0, 3] and saved["tasks"]["alpha"]["label_range"] == [3, 5]
    assert list(saved["scores"]["merged"]) == ["zeta", "alpha", "joint", "average"]


def test_card_and_table_list_the_tasks_in_parent_order(backward, tmp_path):
    _, out, tests = backward
    folder = tmp_path / "copy"
    import shutil

    shutil.copytree(out, folder)
    assert main(["evaluate", str(folder), "--dataset", str(tests["zeta"]), "--dataset", str(tests["alpha"])]) == 0
    text = (folder / "README.md").read_text()
    ranges = text[text.index("| Task | Label ids |"):]
    assert ranges.index("| zeta | 0 – 2 |") < ranges.index("| alpha | 3 – 4 |")
    evaluation = text[text.index("## Evaluation"):]
    assert evaluation.index("| zeta |") < evaluation.index("| alpha |")


def test_ambiguous_dataset_to_task_mappings_are_refused_as_an_invalid_command_line(backward, tmp_path, capsys):
    """A task name the model does not have, or datasets that do not map onto its tasks, are an invalid command line:
    exit 2 (README "Command line"), not 1 (the work failing) — the model's config is still read first."""
    _, out, tests = backward
    json_path = tmp_path / "x.json"
    cases = [
        (["--dataset", f"zeta={tests['zeta']}", "--dataset", f"zeta={tests['alpha']}"],
         "task 'zeta' is named by two --dataset flags"),
        (["--dataset", str(tests["zeta"]), "--dataset", str(tests["alpha"]), "--dataset", str(tests["alpha"])],
         "3 datasets for the model's 2 tasks ['zeta', 'alpha']"),
        (["--dataset", f"beta={tests['alpha']}"], "unknown task(s) ['beta']"),
    ]
    for flags, message in cases:
        assert main(["evaluate", str(out), *flags, "--no-card", "--output-json", str(json_path)]) == 2, flags
        err = capsys.readouterr().err
        assert message in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not json_path.exists()


def test_ranges_that_do_not_tile_the_head_are_refused(backward):
    _, out, _ = backward
    config = AutoModelForImageClassification.from_pretrained(out).config
    config.task_label_ranges = {"zeta": [0, 3], "alpha": [2, 5]}
    with pytest.raises(ValueError, match="overlap or leave gaps"):
        task_ranges(config)


# ------------------------------------------------------------------------------------ item 3: Hub ids
def test_evaluate_accepts_hub_ids_with_and_without_a_revision(backward, local_hub, tmp_path, monkeypatch, capsys):
    from hf_mudsc.cli.main import main

    hub_emulator = local_hub  # the CLI runs in this process against the emulator
    root, out, tests = backward
    hub_emulator.upload_folder("user/merged", out, "merged model")
    sha = hub_emulator.head("user/merged")
    # A later commit changes the weights (the classifier negated), so the two revisions must score differently.
    later = AutoModelForImageClassification.from_pretrained(out)
    with torch.no_grad():
        later.classifier.weight.neg_()
    later.save_pretrained(tmp_path / "later")
    hub_emulator.commit_files("user/merged", {"model.safetensors": (tmp_path / "later" / "model.safetensors")
                                              .read_bytes()}, "later")
    assert hub_emulator.head("user/merged") != sha
    scored = {}
    for ref in ("user/merged", f"user/merged@{sha}"):
        work = tmp_path / ref.replace("/", "_").replace("@", "_")
        work.mkdir()
        monkeypatch.chdir(work)
        # the folder went up as it is, its recipe naming the parents by absolute paths: a recipe from the Hub may not
        # point hf-mudsc at folders of this machine (QA s21), so the parents are given
        flags = ["--dataset", f"zeta={tests['zeta']}", "--dataset", f"alpha={tests['alpha']}",
                 "--parents", str(root / "zeta"), str(root / "alpha")]
        if "@" in ref:  # once: without --output-json nothing is written
            capsys.readouterr()
            assert main(["evaluate", ref, *flags]) == 0, capsys.readouterr().err
            said = capsys.readouterr().out
            assert "| merged |" in said and "| parent A |" in said
            assert "not written" in said and "--output-json" in said
            assert list(work.iterdir()) == []  # a Hub id has no folder: nothing is written unless asked
        json_path = work / "results.json"
        capsys.readouterr()
        assert main(["evaluate", ref, *flags, "--output-json", str(json_path)]) == 0, capsys.readouterr().err
        said = capsys.readouterr().out
        assert "| merged |" in said and "| parent A |" in said
        assert [p.name for p in work.iterdir()] == ["results.json"]
        scored[ref] = _figures(json_path)
        # the results say which commit was scored (the Hub id alone moves on); local parents are not named by path
        commit = sha if "@" in ref else hub_emulator.head("user/merged")
        assert json.loads(json_path.read_text())["models"] == {"merged": f"user/merged@{commit}"}
        assert f"merged: user/merged@{commit}" in said
    pinned = scored[f"user/merged@{sha}"]
    # the Python API records the commit of a model it loads from the Hub as the CLI does (review s29)
    result = evaluate_merge(f"user/merged@{sha}", None, {"zeta": str(tests["zeta"]), "alpha": str(tests["alpha"])},
                            progress=False)
    assert result.models == {"merged": f"user/merged@{sha}"}
    assert scored["user/merged"]["merged"] != pinned["merged"]  # the head's weights are not the pinned ones
    expected = _direct_figures(root, out, tests)
    for scorer, views in expected.items():
        for view, value in views.items():
            assert pinned[scorer][view] == pytest.approx(value, abs=1e-12), (scorer, view)


def test_hub_id_refuses_a_missing_revision_in_one_line(backward, local_hub, tmp_path, monkeypatch, capsys):
    _, out, tests = backward
    local_hub.upload_folder("user/merged2", out, "merged model")  # the CLI runs in this process against the emulator
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli_output(["evaluate", "user/merged2@nope", "--dataset", str(tests["zeta"])], capsys)
    assert code == 1
    assert "revision does not exist" in err and "Traceback" not in err


# ------------------------------------------------------------------------ item 7: metric code needs opt-in
METRIC_SCRIPT = '''
import pathlib

import datasets
import evaluate

pathlib.Path({marker!r}).write_text("the metric script ran")


class MarkerMetric(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="accuracy", citation="", inputs_description="",
            features=datasets.Features({{"predictions": datasets.Value("int64"),
                                         "references": datasets.Value("int64")}}))

    def _compute(self, predictions, references):
        return {{"marker_metric": sum(p == r for p, r in zip(predictions, references)) / len(references)}}
'''


@pytest.fixture()
def marker_metric(tmp_path):
    folder = tmp_path / "marker_metric"
    folder.mkdir()
    marker = tmp_path / "ran.txt"
    (folder / "marker_metric.py").write_text(METRIC_SCRIPT.format(marker=str(marker)))
    return folder, marker


def test_a_metric_script_runs_only_with_trust_remote_code(backward, marker_metric, tmp_path, capsys, caplog):
    _, out, tests = backward
    folder, marker = marker_metric
    json_path = tmp_path / "metric.json"
    base = ["evaluate", str(out), "--dataset", str(tests["zeta"]), "--dataset", str(tests["alpha"]),
            "--no-card", "--output-json", str(json_path), "--metric", str(folder)]
    assert main(base) == 2  # an invalid command line, refused with the other flags
    err = capsys.readouterr().err
    assert "--trust-remote-code" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not marker.exists() and not json_path.exists()
    with pytest.raises(EvaluationError, match="trust_remote_code=True"):
        load_metric(str(folder))
    assert not marker.exists()

    with caplog.at_level("WARNING", logger="hf_mudsc"):
        assert main([*base, "--metric", "accuracy", "--trust-remote-code"]) == 0
    assert marker.exists()
    assert any("runs the code of metric" in r.getMessage() for r in caplog.records)
    figures = json.loads(json_path.read_text())["scores"]["merged"]
    # a local metric is named by its folder's name in the results and the card, never by its path
    assert figures["zeta"][folder.name] == pytest.approx(figures["zeta"]["accuracy"])
    assert figures["joint"][folder.name] == pytest.approx(figures["joint"]["accuracy"])


def test_python_api_refuses_unshipped_metrics_before_loading_models(marker_metric):
    folder, marker = marker_metric
    with pytest.raises(EvaluationError, match="trust_remote_code=True"):
        evaluate_merge("no/such-model", None, {"t": "x:test"}, metrics=[str(folder)])
    assert not marker.exists()


# ----------------------------------------------------------------- items 4 and 5: the card after evaluate
@pytest.fixture(scope="module")
def same_labels(tmp_path_factory):
    """A mudsc merge (so the card has a solver-sweeps row) of two parents with one label set."""
    root = tmp_path_factory.mktemp("card_keep")
    _save_parent(root / "left", 1, ["x", "y", "z"])
    _save_parent(root / "right", 2, ["x", "y", "z"])
    calibration = datasets.Dataset.from_dict({"image": _images(0, 16)}).cast_column("image", datasets.Image())
    calibration.save_to_disk(root / "calib-images")
    out = root / "merged"
    argv = ["merge", str(root / "left"), str(root / "right"), "--calibration", str(root / "calib-images"),
            "--output", str(out), "--method", "mudsc", "--matcher", "align", "--num-samples", "16",
            "--batch-size", "8"]
    assert main(argv) == 0
    data = datasets.Dataset.from_dict({"image": _images(5, 9), "label": [0, 1, 2] * 3})
    data.cast_column("image", datasets.Image()).save_to_disk(root / "test-xyz")
    return root, out


def _body(text: str) -> str:
    return text.split("---", 2)[2]


def test_evaluate_keeps_every_section_the_merge_wrote(same_labels, local_hub, tmp_path):
    root, out = same_labels
    before = (out / "README.md").read_text()
    assert "| Solver sweeps |" in before and "## Usage" in before and "## Evaluation" not in before
    old_data = ModelCard(before).data.to_dict()
    assert main(["evaluate", str(out), "--dataset", str(root / "test-xyz")]) == 0
    after = (out / "README.md").read_text()
    old_lines = [line for line in _body(before).splitlines() if line.strip()]
    new_body = _body(after)
    missing = [line for line in old_lines if line not in new_body.splitlines()]
    assert missing == []
    assert "## Evaluation" in new_body and "| task_0 | test-xyz (local folder) | — | accuracy |" in new_body
    assert new_body.index("## Evaluation") < new_body.index("## Usage")
    card = ModelCard.load(out / "README.md")  # parses the front matter and the model-index like the Hub
    for key, value in old_data.items():
        assert card.data.to_dict()[key] == value, key
    result = json.loads((out / "eval_results.json").read_text())
    assert [(r.task_name, r.metric_value) for r in card.data.eval_results] == [
        ("task_0", pytest.approx(result["scores"]["merged"]["task_0"]["accuracy"])),
        ("joint (all tasks)", pytest.approx(result["scores"]["merged"]["joint"]["accuracy"])),
    ]
    ModelCard.load(out / "README.md").validate()  # the Hub's metadata check (POST /api/validate-yaml), raises if not
    assert local_hub.requests_for("validate_yaml")
    # A second evaluation replaces the section and the model-index instead of adding another.
    assert main(["evaluate", str(out), "--dataset", str(root / "test-xyz"), "--num-samples", "4"]) == 0
    again = (out / "README.md").read_text()
    assert again.count("## Evaluation") == 1 and len(ModelCard(again).data.eval_results) == 2
    assert [line for line in old_lines if line not in _body(again).splitlines()] == []


def test_cards_hold_no_absolute_local_paths(same_labels, backward):
    for root, out in (same_labels, backward[:2]):
        for text in ((out / "README.md").read_text(),):
            assert str(root) not in text
            assert re.search(r"/tmp/|/home/|\\\\", text) is None
        mudsc = json.loads((out / "config.json").read_text())["mudsc"]
        assert str(root) not in json.dumps(mudsc)
    root, out = same_labels
    text = (out / "README.md").read_text()
    assert "`left`" in text and "`right`" in text and "calib-images" in text


def test_the_cli_joint_rule_raw_scores_merged_and_ensemble_by_their_raw_logits(backward, tmp_path, capsys):
    root, out, tests = backward
    json_path = tmp_path / "raw.json"
    flags = ["--dataset", str(tests["zeta"]), "--dataset", str(tests["alpha"]), "--no-card"]
    assert main(["evaluate", str(out), *flags, "--joint-rule", "raw", "--output-json", str(json_path)]) == 0
    saved = json.loads(json_path.read_text())
    merged = AutoModelForImageClassification.from_pretrained(out).eval()
    zeta = AutoModelForImageClassification.from_pretrained(root / "zeta").eval()
    alpha = AutoModelForImageClassification.from_pretrained(root / "alpha").eval()
    logits, labels = {}, []
    for offset, task in ((0, "zeta"), (3, "alpha")):
        data = datasets.load_from_disk(str(tests[task]))
        pixels = PROCESSOR([image for image in data["image"]], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            for name, model in (("merged", merged), ("zeta", zeta), ("alpha", alpha)):
                logits.setdefault(name, []).append(model(pixel_values=pixels).logits.double())
        labels.append(torch.tensor(data["label"]) + offset)
    both = {name: torch.cat(parts) for name, parts in logits.items()}
    joint_labels = torch.cat(labels)
    raw_merged = float((both["merged"].argmax(-1) == joint_labels).double().mean())
    raw_ensemble = float((torch.cat([both["zeta"], both["alpha"]], 1).argmax(-1) == joint_labels).double().mean())
    assert saved["scores"]["merged"]["joint"]["accuracy"] == pytest.approx(raw_merged, abs=1e-12)
    assert saved["scores"]["ensemble"]["joint"]["accuracy"] == pytest.approx(raw_ensemble, abs=1e-12)
    assert saved["definitions"]["joint_rule"] == "raw"
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", str(out), *flags, "--joint-rule", "softmax"])
    assert exit_info.value.code == 2 and "invalid choice: 'softmax'" in capsys.readouterr().err


# --------------------------------------------------------------------------- a regression head (one output)


def test_a_regression_head_is_refused_in_one_line_naming_it_before_any_forward_pass(monkeypatch):
    """transformers' `num_labels=1` is a regression head: its argmax is always 0, so an accuracy of it would be
    the share of rows labelled 0 (and a float label was reported as "outside its classes"). Refused, naming it."""
    from hf_mudsc.evaluate import harness

    models = [make_model("vit_cls", seed, num_labels=1) for seed in (1, 2)]
    data = (torch.randn(6, 1, 16, 16), torch.randn(6).tolist())
    monkeypatch.setattr(harness, "_predict", lambda *a, **k: pytest.fail("ran the models"))
    with pytest.raises(EvaluationError, match=r"regression head.*one output") as error:
        evaluate_merge(models[0], models, [data])
    assert "\n" not in str(error.value)


def test_a_class_label_column_naming_the_tasks_classes_in_another_order_is_read_by_name():
    """An imagefolder's ClassLabel lists its classes alphabetically; the model's id2label may order the same names
    otherwise. The ids were read as the model's ids, so every figure was computed against the wrong classes."""
    model = make_model("vit_cls", 1)
    names = ["zebra", "cat", "mouse"]  # sorted: cat, mouse, zebra — no name keeps its id
    model.config.id2label, model.config.label2id = dict(enumerate(names)), {n: i for i, n in enumerate(names)}
    images = _images(7, 24)
    with torch.no_grad():
        predicted = model(pixel_values=PROCESSOR(images, return_tensors="pt")["pixel_values"]).logits.argmax(-1)
    truth = [names[i] for i in predicted.tolist()]  # labelled with the model's own answers: accuracy 1

    def accuracy(order):
        rows = {"image": images, "label": [order.index(name) for name in truth]}
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=order)})
        result = evaluate_merge(model, None, [datasets.Dataset.from_dict(rows, features=features)],
                                processor=PROCESSOR, progress=False)
        return next(iter(result.scores["merged"].values()))["accuracy"]

    assert accuracy(names) == 1.0
    assert accuracy(sorted(names)) == 1.0


def test_a_multi_label_head_or_multi_hot_labels_are_refused_in_one_line(monkeypatch):
    """A multi-label head (problem_type "multi_label_classification": one sigmoid per label) has no single class to
    take the argmax of, and multi-hot label lists ended in a TypeError traceback."""
    from hf_mudsc.evaluate import harness

    model = make_model("vit_cls", 1)
    multi_hot = (torch.randn(6, 1, 16, 16), [[1, 0, 1]] * 6)
    with pytest.raises(EvaluationError, match=r"label \[1, 0, 1\] is a list") as error:
        evaluate_merge(model, None, [multi_hot], progress=False)
    assert "\n" not in str(error.value)
    model.config.problem_type = "multi_label_classification"
    monkeypatch.setattr(harness, "_predict", lambda *a, **k: pytest.fail("ran the models"))
    with pytest.raises(EvaluationError, match=r"multi-label head") as error:
        evaluate_merge(model, None, [(torch.randn(6, 1, 16, 16), [0] * 6)], progress=False)
    assert "\n" not in str(error.value)


# ------------------------------------------------------------ every model scored with its own processor
PROCESSOR_B = ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.2], image_std=[0.3])


def _pixels(processor, images) -> torch.Tensor:
    return processor(images, return_tensors="pt")["pixel_values"]


def _own_processor_case():
    """A merged head over tasks `ta` (A's 3 classes) and `tb` (B's 2); parent B's image processor normalises
    differently from A's. Task `tb` is labelled with B's answers on B's own inputs (its figure is 1 there)."""
    from hf_mudsc.load.parents import LoadedParent

    merged = make_model("vit_cls", 3, num_labels=5)
    merged.config.id2label = {i: f"{'ta' if i < 3 else 'tb'}: c{i}" for i in range(5)}
    merged.config.label2id = {v: k for k, v in merged.config.id2label.items()}
    merged.config.task_label_ranges = {"ta": [0, 3], "tb": [3, 5]}
    model_a, model_b = make_model("vit_cls", 1, num_labels=3), make_model("vit_cls", 2, num_labels=2)
    images = {"ta": _images(21, 24), "tb": _images(22, 24)}
    with torch.no_grad():
        truth_b = model_b(pixel_values=_pixels(PROCESSOR_B, images["tb"])).logits.argmax(-1).tolist()
    labels = {"ta": np.random.default_rng(5).integers(0, 3, 24).tolist(), "tb": truth_b}
    data = {task: datasets.Dataset.from_dict({"image": images[task], "label": labels[task]})
            .cast_column("image", datasets.Image()) for task in ("ta", "tb")}
    parents = [LoadedParent(model_a, PROCESSOR, "a"), LoadedParent(model_b, PROCESSOR_B, "b")]
    return merged, parents, data, images, labels


def _expected(merged, parents, images, labels, processor_of) -> dict[str, dict[str, float]]:
    """Each figure from the logits of each model on the inputs of `processor_of(name)`, computed directly."""
    models = {"merged": merged, "parent_a": parents[0].model, "parent_b": parents[1].model}
    offset = {"ta": 0, "tb": 3}
    with torch.no_grad():
        logits = {task: {name: model(pixel_values=_pixels(processor_of(name), images[task])).logits.double()
                         for name, model in models.items()} for task in images}
    truth = {task: torch.tensor(labels[task]) for task in images}
    joint_truth = torch.cat([truth[t] + offset[t] for t in images])

    def acc(predictions, references) -> float:
        return float((predictions == references).double().mean())

    both = {name: torch.cat([logits[t][name] for t in images]) for name in models}
    ensemble = torch.cat([both["parent_a"].softmax(-1), both["parent_b"].softmax(-1)], dim=1)
    merged_joint = torch.cat([both["merged"][:, :3].softmax(-1), both["merged"][:, 3:].softmax(-1)], dim=1)
    return {
        "merged": {"ta": acc(logits["ta"]["merged"][:, :3].argmax(-1), truth["ta"]),
                   "tb": acc(logits["tb"]["merged"][:, 3:].argmax(-1), truth["tb"]),
                   "joint": acc(merged_joint.argmax(-1), joint_truth)},
        "parent_a": {"ta": acc(logits["ta"]["parent_a"].argmax(-1), truth["ta"]),
                     "joint": acc(both["parent_a"].argmax(-1), joint_truth)},
        "parent_b": {"tb": acc(logits["tb"]["parent_b"].argmax(-1), truth["tb"]),
                     "joint": acc(both["parent_b"].argmax(-1) + 3, joint_truth)},
        "ensemble": {"ta": acc(logits["ta"]["parent_a"].argmax(-1), truth["ta"]),
                     "tb": acc(logits["tb"]["parent_b"].argmax(-1), truth["tb"]),
                     "joint": acc(ensemble.argmax(-1), joint_truth)},
    }


def _assert_figures(result, expected) -> None:
    for scorer, views in expected.items():
        for view, value in views.items():
            assert result.score(scorer, view) == pytest.approx(value, abs=1e-12), (scorer, view)


def test_each_parent_and_the_ensemble_are_scored_on_their_own_processors_inputs():
    """Parent B was scored (and entered the ensemble) on inputs made by parent A's processor, which B was never
    trained on: its published figure and the ensemble the merge is compared with were wrong."""
    merged, parents, data, images, labels = _own_processor_case()
    own = {"merged": PROCESSOR, "parent_a": PROCESSOR, "parent_b": PROCESSOR_B}  # merged: none of its own -> A's
    expected = _expected(merged, parents, images, labels, own.get)
    wrong = _expected(merged, parents, images, labels, lambda name: PROCESSOR)
    assert expected["parent_b"]["tb"] == 1.0 and wrong["parent_b"]["tb"] < 1.0  # the case tells them apart
    result = evaluate_merge(merged, parents, data, batch_size=7, num_samples=20, progress=False)
    expected = _expected(merged, parents, {t: v[:20] for t, v in images.items()},
                         {t: v[:20] for t, v in labels.items()}, own.get)
    _assert_figures(result, expected)
    assert result.processors == {"merged": "parent_a's", "parent_a": "own", "parent_b": "own",
                                 "ensemble": "each parent's as in its row"}
    saved = result.to_dict()
    assert saved["processors"] == result.processors and "processors" in saved["definitions"]


def test_a_given_processor_scores_the_merged_model_and_can_score_every_model():
    """`processor=` is the merged model's (a parent keeps its own); with `own_processors=False` it scores every
    model, as before."""
    merged, parents, data, images, labels = _own_processor_case()
    result = evaluate_merge(merged, parents, data, processor=PROCESSOR_B, progress=False)
    _assert_figures(result, _expected(merged, parents, images, labels,
                                      {"merged": PROCESSOR_B, "parent_a": PROCESSOR, "parent_b": PROCESSOR_B}.get))
    assert result.processors["merged"] == "given (processor=)"
    shared = evaluate_merge(merged, parents, data, processor=PROCESSOR, own_processors=False, progress=False)
    _assert_figures(shared, _expected(merged, parents, images, labels, lambda name: PROCESSOR))
    assert shared.processors == {}


def test_one_processor_for_everyone_is_applied_once_and_gives_todays_figures(monkeypatch):
    """Parents whose processors are equal (distinct objects, same settings) are preprocessed once per batch, and
    nothing is recorded about processors (there is nothing to tell apart)."""
    from hf_mudsc.calibrate import datasets as calibration
    from hf_mudsc.load.parents import LoadedParent

    merged, parents, data, images, labels = _own_processor_case()
    twin = ViTImageProcessor(**{k: v for k, v in PROCESSOR.to_dict().items()
                                if k not in ("image_processor_type", "processor_class")})
    parents = [parents[0], LoadedParent(parents[1].model, twin, "b")]
    calls = []
    original = calibration.resolve_calibration
    monkeypatch.setattr(calibration, "resolve_calibration", lambda *a, **k: calls.append(1) or original(*a, **k))
    result = evaluate_merge(merged, parents, data, progress=False)
    assert len(calls) == len(data)  # once per task, not once per model
    _assert_figures(result, _expected(merged, parents, images, labels, lambda name: PROCESSOR))
    assert result.processors == {}


def test_the_cli_scores_each_parent_with_its_own_processor_unless_told_to_share(tmp_path, capsys):
    """`hf-mudsc evaluate` loads every model with its processor: each is scored with its own;
    `--shared-processor` scores all with the merged model's (the figures before this fix)."""
    merged, parents, data, images, labels = _own_processor_case()
    for name, model, processor in (("merged", merged, PROCESSOR), ("a", parents[0].model, PROCESSOR),
                                   ("b", parents[1].model, PROCESSOR_B)):
        model.save_pretrained(tmp_path / name)
        processor.save_pretrained(tmp_path / name)
    flags = []
    for task in data:
        data[task].save_to_disk(tmp_path / f"test-{task}")
        flags += ["--dataset", f"{task}={tmp_path / f'test-{task}'}"]
    base = ["evaluate", str(tmp_path / "merged"), *flags, "--parents", str(tmp_path / "a"), str(tmp_path / "b"),
            "--no-card", "--output-json"]
    assert main([*base, str(tmp_path / "own.json")]) == 0
    expected = _expected(merged, parents, images, labels,
                         {"merged": PROCESSOR, "parent_a": PROCESSOR, "parent_b": PROCESSOR_B}.get)
    got = _figures(tmp_path / "own.json")
    for scorer, views in expected.items():
        for view, value in views.items():
            assert got[scorer][view] == pytest.approx(value, abs=1e-12), (scorer, view)
    assert "parent B: own" in capsys.readouterr().out.split("processors")[-1]  # the printout says which scored which
    assert main([*base, str(tmp_path / "shared.json"), "--shared-processor"]) == 0
    wrong = _expected(merged, parents, images, labels, lambda name: PROCESSOR)
    assert _figures(tmp_path / "shared.json")["parent_b"]["tb"] == pytest.approx(wrong["parent_b"]["tb"], abs=1e-12)


def test_text_parents_whose_tokenizers_differ_are_each_scored_on_their_own_tokens():
    """Parent A's tokenizer lower-cases, B's keeps the case: B was scored on A's (lower-cased) token ids."""
    from transformers import BertTokenizer

    from hf_mudsc.load.parents import LoadedParent

    words = ["cat", "dog", "bird", "fish", "red", "blue", "big", "small", "runs", "sits", "the", "on", "mat",
             "tree", "sea", "sky", "sun", "old", "new", "hot", "fast", "slow", "moon", "green", "a"]
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                                         *[v for w in words for v in (w, w.capitalize())]])}
    lower, cased = BertTokenizer(vocab=vocab, do_lower_case=True), BertTokenizer(vocab=vocab, do_lower_case=False)
    rng = np.random.default_rng(4)
    texts = [" ".join(str(w.capitalize() if rng.random() < 0.5 else w) for w in rng.choice(words, 6))
             for _ in range(30)]
    model_a, model_b = make_model("bert_cls", 1, num_labels=3), make_model("bert_cls", 5, num_labels=3)
    merged = make_model("bert_cls", 3, num_labels=3)

    def predictions(model, tokenizer) -> torch.Tensor:
        with torch.no_grad():
            return model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.argmax(-1)

    truth = predictions(model_b, cased)
    assert not torch.equal(predictions(model_b, lower), truth)  # the case tells the tokenizers apart
    data = datasets.Dataset.from_dict({"text": texts, "label": truth.tolist()})
    parents = [LoadedParent(model_a, lower, "a"), LoadedParent(model_b, cased, "b")]
    result = evaluate_merge(merged, parents, [data], batch_size=30, progress=False)
    assert result.score("parent_b", "task_0") == 1.0
    assert result.score("parent_a", "task_0") == float((predictions(model_a, lower) == truth).double().mean())
    assert result.processors["parent_b"] == "own" and result.processors["merged"] == "parent_a's"


def test_parents_sharing_one_label_set_are_all_scored_on_a_single_dataset():
    """With one shared label set each parent is scored on every task — but the parents were paired with the tasks,
    so one dataset (one task) scored parent A alone and parent B's row was silently missing."""
    models = [make_model("vit_cls", seed) for seed in (1, 2, 3)]
    pixels = torch.randn(12, 1, 16, 16)
    labels = torch.arange(12) % 3
    result = evaluate_merge(models[0], models[1:], [(pixels, labels)], progress=False)
    for name, model in (("parent_a", models[1]), ("parent_b", models[2])):
        with torch.no_grad():
            expected = float((model(pixel_values=pixels).logits.argmax(-1) == labels).double().mean())
        assert result.score(name, "task_0") == pytest.approx(expected, abs=1e-12), name


def _rgb_images(seed: int, count: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), mode="RGB") for _ in range(count)]


def test_each_models_processor_is_configured_from_that_models_own_config():
    """Every processor was configured from the first merged model's config: parent B, an RGB ViT with its own
    RGB processor, was given grayscale images (the merged model's one channel) — a crash, or a figure on inputs it
    never saw. Each model's processor now takes the channel count from its own config."""
    from factories import VIT, randomize
    from transformers import ViTConfig, ViTForImageClassification

    from hf_mudsc.load.parents import LoadedParent

    rgb = ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    merged, model_a = make_model("vit_cls", 3), make_model("vit_cls", 1)
    model_b = randomize(ViTForImageClassification(ViTConfig(**{**VIT, "num_channels": 3}, num_labels=3)), 7).eval()
    images = _rgb_images(30, 20)
    gray = [image.convert("L") for image in images]
    with torch.no_grad():
        truth = model_b(pixel_values=_pixels(rgb, images)).logits.argmax(-1)
        expected = {name: float((model(pixel_values=_pixels(PROCESSOR, gray)).logits.argmax(-1) == truth)
                                .double().mean()) for name, model in (("merged", merged), ("parent_a", model_a))}
    data = datasets.Dataset.from_dict({"image": images, "label": truth.tolist()}).cast_column("image",
                                                                                             datasets.Image())
    parents = [LoadedParent(model_a, PROCESSOR, "a"), LoadedParent(model_b, rgb, "b")]
    result = evaluate_merge(merged, parents, [data], batch_size=8, ensemble=False, progress=False)
    assert result.score("parent_b", "task_0") == 1.0  # on its own RGB inputs
    for name, value in expected.items():  # the one-channel models still on grayscale inputs
        assert result.score(name, "task_0") == pytest.approx(value, abs=1e-12), name


def test_each_models_tokens_are_cut_at_that_models_own_position_limit():
    """The text length limit came from the first merged model's config for every model: parent B, with 64
    positions, was scored on texts cut at the merged model's 24 tokens (one tokenizer for all of them, so
    they were also preprocessed once, as one)."""
    from factories import BERT, randomize
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    from hf_mudsc.load.parents import LoadedParent

    words = ["cat", "dog", "bird", "fish", "red", "blue", "big", "small", "runs", "sits", "the", "on", "mat"]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                                                                  *words])})
    rng = np.random.default_rng(6)
    texts = [" ".join(rng.choice(words, int(n))) for n in rng.integers(25, 60, 24)]  # 27 to 62 tokens
    merged, model_a = make_model("bert_cls", 3), make_model("bert_cls", 1)
    model_b = randomize(BertForSequenceClassification(BertConfig(**{**BERT, "max_position_embeddings": 64},
                                                                 num_labels=3)), 5).eval()

    def predictions(model, limit: int) -> torch.Tensor:
        with torch.no_grad():
            encoded = tokenizer(texts, padding=True, truncation=True, max_length=limit, return_tensors="pt")
            return model(**encoded).logits.argmax(-1)

    truth = predictions(model_b, 64)
    assert not torch.equal(predictions(model_b, 24), truth)  # the cut tells the limits apart
    data = datasets.Dataset.from_dict({"text": texts, "label": truth.tolist()})
    parents = [LoadedParent(model_a, tokenizer, "a"), LoadedParent(model_b, tokenizer, "b")]
    result = evaluate_merge(merged, parents, [data], batch_size=12, ensemble=False, progress=False)
    assert result.score("parent_b", "task_0") == 1.0
    for name, model in (("merged", merged), ("parent_a", model_a)):
        expected = float((predictions(model, 24) == truth).double().mean())
        assert result.score(name, "task_0") == pytest.approx(expected, abs=1e-12), name


@pytest.mark.parametrize("case", ["no image processor", "processor fails"])
def test_a_parents_processor_that_cannot_read_the_evaluation_data_is_named_in_evaluation_words(case):
    """A parent's own processor that could not read the raw columns failed with the merge's wording ("the calibration
    data lacks ...", "the parents' image processor ...") and a CalibrationError: evaluate says evaluation data and
    names the model whose processor failed."""
    from transformers import BertTokenizer

    from hf_mudsc.load.parents import LoadedParent

    merged, parents, data, images, labels = _own_processor_case()
    if case == "no image processor":
        other = BertTokenizer(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])})
        needle = ("the evaluation data of task 'ta' lacks column(s) ['pixel_values'] that the models need; found "
                  "columns ['image', 'label']. Column 'image' holds raw image, but parent B's processor "
                  "(BertTokenizer) has no image processor (preprocessor_config.json) to preprocess it")
    else:  # a mean of two values for one-channel images: the processor raises on the first batch
        other = ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5, 0.5], image_std=[0.5, 0.5])
        needle = (f"parent B's image processor ({type(other).__name__}) cannot preprocess column 'image' of the "
                  "evaluation data of task 'ta'")
    parents = [parents[0], LoadedParent(parents[1].model, other, "b")]
    with pytest.raises(EvaluationError) as caught:
        evaluate_merge(merged, parents, data, progress=False)
    message = str(caught.value)
    assert "\n" not in message and "calibration" not in message, message
    assert needle in message, message
    assert "own_processors=False" in message and "--shared-processor" in message, message


def _own_answers(model, inputs):
    with torch.no_grad():
        return model(pixel_values=inputs).logits.argmax(-1).tolist()


@pytest.mark.parametrize("bad, what", [(0.6, r"label 0\.6 is not a whole class id"),
                                       (None, r"label None is not a class id or name"),
                                       (float("nan"), r"label nan is not a whole class id")])
def test_a_label_that_is_no_class_id_is_refused_in_one_line_not_cut_to_one(bad, what):
    """Float labels were cut to ints (`int(2.6)` is 2: a model scored 1.0 against labels it never matched), and a
    missing or NaN label raised a bare TypeError/ValueError."""
    model = make_model("vit_cls", 1)
    inputs = torch.randn(6, 1, 16, 16)
    answers = _own_answers(model, inputs)
    labels = [bad, *answers[1:]]
    with pytest.raises(EvaluationError, match=rf"task 'task_0': {what}") as error:
        evaluate_merge(model, None, [(inputs, labels)], progress=False)
    assert "\n" not in str(error.value)
    whole = evaluate_merge(model, None, [(inputs, [float(a) for a in answers])], progress=False)
    assert whole.scores["merged"]["task_0"]["accuracy"] == 1.0  # 2.0 is class 2


def test_a_label_name_that_several_classes_share_is_refused_not_read_as_the_last_one():
    """With id2label {0: 'x', 1: 'x', 2: 'y'}, the label 'x' was always read as class 1: a row the model put in
    class 0 (also 'x') counted as wrong, so the figure was neither the one by id nor by name."""
    model = make_model("vit_cls", 1)
    model.config.id2label, model.config.label2id = {0: "x", 1: "x", 2: "y"}, {"x": 1, "y": 2}
    inputs = torch.randn(6, 1, 16, 16)
    names = [model.config.id2label[a] for a in _own_answers(model, inputs)]
    with pytest.raises(EvaluationError, match=r"task 'task_0': label 'x' names classes 0 and 1 .*class ids") as error:
        evaluate_merge(model, None, [(inputs, names)], progress=False)
    assert "\n" not in str(error.value)


def test_a_metric_given_twice_or_none_is_refused_before_loading_not_written_twice(backward, tmp_path, capsys):
    """`--metric accuracy --metric accuracy` gave every card row twice (table and model-index); `metrics=[]`
    gave a result without figures. Both refused in one line before any model is loaded."""
    for metrics, what in ((["accuracy", "f1", "accuracy"], r"metric 'accuracy' is given twice"),
                          ([], r"no metric")):
        with pytest.raises(EvaluationError, match=what) as error:
            evaluate_merge("no/such-model", None, {"t": "x:test"}, metrics=metrics)
        assert "\n" not in str(error.value)
    _, out, tests = backward
    json_path = tmp_path / "twice.json"
    assert main(["evaluate", str(out), "--dataset", str(tests["zeta"]), "--dataset", str(tests["alpha"]),
                 "--output-json", str(json_path), "--metric", "accuracy", "--metric", "accuracy"]) == 2
    err = capsys.readouterr().err
    assert "metric 'accuracy' is given twice" in err and len(err.strip().splitlines()) == 1
    assert not json_path.exists()


def test_the_cli_refuses_a_metric_flag_as_an_invalid_command_line_before_torch(tmp_path, capsys):
    """A metric named twice, or one not shipped without --trust-remote-code, is a wrong command line: argparse's exit
    code 2 (it was 1, the code of work that failed), checked with the other flags before torch is imported — the model
    folder need not even exist for the metric flag to be named."""
    import subprocess
    import sys

    # One fresh interpreter runs the three command lines (one start-up, not three), each with its own stderr file
    # (fd 2 itself, so a log handler bound at the first run still writes to the current case's file); torch is looked
    # for after each, so a case that imports it fails there or in every later one.
    probe = textwrap.dedent("""
        import json, os, sys
        from hf_mudsc.cli.main import main
        results = []
        for index, argv in enumerate(json.loads(sys.argv[1])):
            path = f"{sys.argv[2]}/stderr-{index}"
            saved, file = os.dup(2), os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(file, 2)
            try:
                try:
                    code = main(argv)
                except SystemExit as exit_:
                    code = exit_.code
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(file)
                os.close(saved)
            results.append([code, open(path).read(), "torch" in sys.modules])
        print(json.dumps(results))
    """)
    cases = ((["--metric", "f1", "--metric", "f1"], "metric 'f1' is given twice; name each metric once"),
             (["--metric", "bleu"], "metric 'bleu' is not shipped with hf-mudsc"),
             (["--metric", "bleu", "--trust-remote-code", "--metric", "bleu"], "metric 'bleu' is given twice"))
    argvs = [["evaluate", str(tmp_path / "no-such-model"), "--dataset", "x:test", *flags] for flags, _ in cases]
    done = subprocess.run([sys.executable, "-c", probe, json.dumps(argvs), str(tmp_path)], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert len(results) == len(cases)
    for (flags, said), (code, stderr, torch_imported) in zip(cases, results):
        assert code == 2, (flags, stderr)
        assert said in stderr and len(stderr.strip().splitlines()) == 1, (flags, stderr)
        assert not torch_imported, flags


def test_a_class_label_column_sharing_some_class_names_at_other_ids_is_refused_not_read_by_id():
    """A ClassLabel naming `dog, cat, eel` against a model's `cat, dog, fox`: not the same set, so its ids were read as
    the model's ids — cat scored as dog and dog as cat, a wrong figure. Refused in one line naming a moved class; a
    ClassLabel sharing no name is another task's data (QA s21: refused too); against a model with LABEL_0... names it
    is still read by id."""
    model = make_model("vit_cls", 1)
    model.config.id2label = {0: "cat", 1: "dog", 2: "fox"}
    model.config.label2id = {v: k for k, v in model.config.id2label.items()}
    inputs = torch.randn(6, 1, 16, 16)
    answers = _own_answers(model, inputs)

    def data(names):
        features = datasets.Features({"pixel_values": datasets.Array3D((1, 16, 16), "float32"),
                                      "label": datasets.ClassLabel(names=names)})
        return datasets.Dataset.from_dict({"pixel_values": inputs.numpy(), "label": answers}, features=features)

    with pytest.raises(EvaluationError, match=r"task 'task_0': .*'dog' is class 0 there but 1 in the model") as error:
        evaluate_merge(model, None, [data(["dog", "cat", "eel"])], progress=False)
    assert "\n" not in str(error.value)
    with pytest.raises(EvaluationError, match=r"not one name in common"):
        evaluate_merge(model, None, [data(["a", "b", "c"])], progress=False)
    model.config.id2label = {index: f"LABEL_{index}" for index in range(3)}
    model.config.label2id = {v: k for k, v in model.config.id2label.items()}
    unnamed = evaluate_merge(model, None, [data(["a", "b", "c"])], progress=False)
    assert unnamed.scores["merged"]["task_0"]["accuracy"] == 1.0


def test_class_names_given_twice_for_one_task_are_refused_not_overwritten(tmp_path, capsys):
    """`--class-names pets=cat,dog --class-names pets=eel,cod` kept the second list without a word."""
    assert main(["evaluate", str(tmp_path / "absent"), "--dataset", "org/x:test", "--class-names", "pets=cat,dog",
                 "--class-names", "pets=eel,cod"]) == 2  # an invalid command line, refused before any loading
    err = capsys.readouterr().err
    assert "--class-names names task 'pets' twice" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------ session 19: QA defects
def test_parents_given_as_model_objects_are_scored_with_the_processor_saved_in_their_folder(backward):
    """`merge` finds a model object's processor in its `name_or_path` folder; evaluate refused the same objects
    ("came with no processor"). The merged object `merge` returns (`name_or_path` '') is scored with parent A's
    processor, as when the parents are folders: every figure equals the one computed by hand."""
    root, out, tests = backward
    parents = [AutoModelForImageClassification.from_pretrained(root / name) for name in ("zeta", "alpha")]
    merged = AutoModelForImageClassification.from_pretrained(out)
    merged.config._name_or_path = merged.name_or_path = ""  # as `merge` returns it: no folder of its own
    data = {task: str(path) for task, path in tests.items()}
    result = evaluate_merge(merged, parents, data, progress=False)
    expected = _direct_figures(root, out, tests)
    for scorer, views in expected.items():
        for view, value in views.items():
            assert result.score(scorer, view) == pytest.approx(value, abs=1e-12), (scorer, view)


def test_a_parent_object_from_an_older_hub_commit_is_scored_with_that_commits_processor(backward, local_hub):
    """s30 (left alone in s29): with no `config._commit_hash` (transformers >= 5.18) a parent object loaded from the
    Hub was scored with the processor of the repo's default revision, though its weights are an older commit's: the
    figures were another preprocessing's. The cached snapshot holding its weights gives the processor, and the
    results name that commit (`models`), as for a parent given by its Hub id."""
    root, out, tests = backward
    local_hub.upload_folder("user/ev-obj", root / "zeta", "zeta")
    first = local_hub.head("user/ev-obj")
    parent = AutoModelForImageClassification.from_pretrained("user/ev-obj")
    ViTImageProcessor.from_pretrained("user/ev-obj")
    later = root / "zeta-later"
    changed = AutoModelForImageClassification.from_pretrained(root / "zeta")
    with torch.no_grad():
        changed.classifier.weight.mul_(-1.0)
    changed.save_pretrained(later)
    ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[1.0], image_std=[0.05]).save_pretrained(later)
    local_hub.upload_folder("user/ev-obj", later, "later weights and processor")
    AutoModelForImageClassification.from_pretrained("user/ev-obj")
    ViTImageProcessor.from_pretrained("user/ev-obj")  # the newer snapshot and its processor are cached too
    result = evaluate_merge(str(out), [parent, str(root / "alpha")],
                            {task: str(path) for task, path in tests.items()}, progress=False)
    expected = _direct_figures(root, out, tests)
    assert {view: result.score("parent_a", view) for view in expected["parent_a"]} == pytest.approx(
        expected["parent_a"], abs=1e-12)
    assert result.models.get("parent_a") == f"user/ev-obj@{first}", result.models


def test_a_pinned_hub_dataset_revision_is_recorded_with_the_figures(backward, local_hub, tmp_path):
    """Bug hunt s29: `--dataset t=org/data@REV:test` scored that revision, but the results file, the card's table and
    its model-index named only `org/data`: the published figure was attributed to whatever the dataset's head holds.
    The revision is recorded (results `revision`, model-index `dataset.revision`, the table's dataset cell)."""
    import subprocess
    import sys

    root, out, tests = backward
    pinned = {}
    for task in ("zeta", "alpha"):
        data = datasets.load_from_disk(str(tests[task]))
        data.to_parquet(tmp_path / f"{task}.parquet")
        pinned[task] = local_hub.commit_files(f"user/ev-{task}", {"test.parquet": (tmp_path / f"{task}.parquet")
                                                                  .read_bytes()}, "v1", repo_type="dataset")
        data.select(range(5)).to_parquet(tmp_path / f"{task}-later.parquet")  # the head moves on: 5 rows
        local_hub.commit_files(f"user/ev-{task}", {"test.parquet": (tmp_path / f"{task}-later.parquet")
                                                   .read_bytes()}, "v2", repo_type="dataset")
    folder = tmp_path / "merged"
    import shutil

    shutil.copytree(out, folder)
    # a process of its own: `datasets` reads the Hub's settings when it is imported
    run = subprocess.run([sys.executable, "-m", "hf_mudsc", "evaluate", str(folder), "--dataset",
                          f"zeta=user/ev-zeta@{pinned['zeta']}:test", "--dataset",
                          f"alpha=user/ev-alpha@{pinned['alpha']}:test", "--parents", str(root / "zeta"),
                          str(root / "alpha")], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env=local_hub.client_env(token=None, extra={"OMP_NUM_THREADS": "1"}))
    assert run.returncode == 0, run.stderr
    results = json.loads((folder / "eval_results.json").read_text())
    assert {task: (info["revision"], info["num_samples"]) for task, info in results["tasks"].items()} == {
        "zeta": (pinned["zeta"], 14), "alpha": (pinned["alpha"], 13)}
    from huggingface_hub import ModelCard

    card = ModelCard.load(folder / "README.md")
    revisions = {result["dataset"]["name"]: result["dataset"].get("revision")
                 for result in card.data.to_dict()["model-index"][0]["results"]}
    assert revisions == {"user/ev-zeta": pinned["zeta"], "user/ev-alpha": pinned["alpha"]}, revisions
    assert f"| zeta | user/ev-zeta@{pinned['zeta']} | test |" in card.text
