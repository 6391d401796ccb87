"""Session 35 (card): names from configs, datasets and users reaching the card, the terminal and the logs."""

from __future__ import annotations

import importlib

import pytest
from huggingface_hub import ModelCard

from hf_mudsc.publish.card import update_card_evaluation

LINE_SEPARATORS = ["a\x85b", "a\u2028b", "a\u2029b", "x\u2029y\x85z\u2028w"]


@pytest.mark.parametrize("name", LINE_SEPARATORS)
def test_a_name_holding_a_unicode_line_separator_reaches_the_model_index_as_it_is(name):
    """update_card_evaluation(card, [{"task": "a\\x85b", "dataset": "org/d", "merged": 0.5}]) -> task "a b"."""
    row = {"task": name, "dataset": "org/" + name, "dataset_config": name, "split": name, "metric": name,
           "merged": 0.5}
    card = update_card_evaluation("---\nlicense: mit\n---\n\n# m\n", [row], model_name=name)
    front = str(card).split("\n---\n", 1)[0]
    # written as YAML escapes: raw, YAML 1.1 (PyYAML) reads U+0085 as a line break and folds it into a space, and a
    # YAML 1.2 reader (the Hub's) keeps the indentation PyYAML put after each raw separator in the name
    assert not any(char in front for char in "\x85\u2028\u2029"), repr(front)
    back = ModelCard(str(card))
    result = back.data.eval_results[0]
    assert (result.task_name, result.dataset_type, result.dataset_config, result.dataset_split,
            result.metric_type, back.data.model_name) == (name, "org/" + name, name, name, name, name)
    assert back.data.license == "mit"


def test_a_recipe_naming_a_folder_with_a_next_line_character_loads_back_that_folder(tmp_path):
    """Recipe(models=[...], calibration="DIR/cal\\x85ib").save(p); Recipe.load(p).calibration -> "DIR/cal ib"."""
    from hf_mudsc.publish.recipe import Recipe

    folder = tmp_path / "cal\x85ib\u2028x"
    folder.mkdir()
    path = tmp_path / "mudsc_recipe.yaml"
    Recipe(models=["org/vit-a", "org/vit-b"], calibration=str(folder)).save(path)
    assert Recipe.load(path).calibration == str(folder)


HOSTILE_TASKS = {"a\x1b[2J\x1b]0;owned\x07": [0, 2], "b\nmerged | 0.9990 | 0.9990 |\u202e": [2, 4]}


def test_evaluate_prints_a_downloaded_models_task_names_escaped(tmp_path, capsys, caplog):
    """hf-mudsc evaluate DIR --dataset DATA on a config naming a task "a\\x1b[2J": the table cleared the terminal."""
    from test_evaluate_s30 import bert, rows

    from hf_mudsc.cli.main import main

    bert(["a: x", "a: y", "b: p", "b: q"], [5, 0, 0, 5], HOSTILE_TASKS).save_pretrained(tmp_path / "m")
    rows([0, 1, 2, 3]).save_to_disk(tmp_path / "data")
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "m"), "--dataset", str(tmp_path / "data"), "--no-card"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out, repr(out)
    assert not any(line.startswith("merged |") for line in out.splitlines()), out
    assert "a\\x1b[2J\\x1b]0;owned\\x07" in out and "b\\nmerged" in out, out
    logged = [record.getMessage() for record in caplog.records]  # "evaluated model on a\x1b[2J..."
    assert not any("\x1b" in line or "\n" in line for line in logged), logged


FORGED = "cat\x1b[2J\x1b]0;owned\x07\nERROR hf_mudsc: forged\u202e"


def _labelled(seed: int, labels: list[str]):
    from factories import make_model

    model = make_model("vit_cls", seed)
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {label: i for i, label in enumerate(labels)}
    return model


_MERGED: list = []


def merged():
    """One small merge of two ViTs with different label sets, made once for the card tests."""
    import torch
    from factories import make_batches

    import hf_mudsc

    if not _MERGED:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            parents = [_labelled(1, ["zero", "one", "two"]), _labelled(2, ["cat", "dog", "eel"])]
            _MERGED.append(hf_mudsc.merge(parents, make_batches("vit_cls", num_batches=2), progress=False))
        finally:
            torch.set_num_threads(threads)
    return _MERGED[0]


def test_a_log_line_naming_a_downloaded_parents_labels_cannot_clear_the_terminal_or_forge_a_line():
    """merge([A, B]) with labels ["cat\\x1b[2J\\nERROR forged", ...] in two orders: the INFO line cleared the screen."""
    import io
    import logging

    import torch
    from factories import make_batches

    import hf_mudsc
    from hf_mudsc.cli.main import configure_logging

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)  # as the CLI's stderr handler: configure_logging gives it its filters
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        configure_logging(0, False)
        hf_mudsc.merge([_labelled(1, [FORGED, "dog", "eel"]), _labelled(2, ["dog", FORGED, "eel"])],
                       make_batches("vit_cls", num_batches=1), progress=False)
    finally:
        torch.set_num_threads(threads)
        root.removeHandler(handler)
    out = stream.getvalue()
    assert "reordered" in out, out
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out, repr(out)
    assert not any(line.startswith("ERROR hf_mudsc: forged") for line in out.splitlines()), out


def test_a_service_jobs_log_line_naming_a_label_with_a_line_break_stays_one_line():
    """A job's log forwarded the line "...label order (cat\\x1b[2J\\nERROR forged, ...)" as two lines, one forged."""
    import logging

    from hf_mudsc.serve.worker import ForwardHandler

    class Reporter:  # the web process's end: what the handler sends it
        def __init__(self) -> None:
            self.lines: list[str] = []

        def log(self, line: str) -> None:
            self.lines.append(line)

        def on_record(self, record: logging.LogRecord) -> None:
            pass

        def checkpoint(self) -> None:
            pass

    reporter = Reporter()
    logger = logging.getLogger("hf_mudsc.pipeline")
    handler = ForwardHandler(reporter)
    logger.addHandler(handler)
    try:
        logger.warning("head reordered to parent A's label order (%s)", FORGED)
    finally:
        logger.removeHandler(handler)
    (line,) = reporter.lines
    assert "\n" not in line and "\x1b" not in line and "\u202e" not in line, repr(line)
    assert "cat\\x1b[2J\\x1b]0;owned\\x07\\nERROR hf_mudsc: forged\\u202e" in line, line


SETTINGS_KEYS = ["method", "matcher", "alpha", "seed", "batch_size", "zip_decay", "zip_budget", "out_dtype",
                 "out_dtype_reason", "layer_swap", "refit", "refit_samples", "refit_examples", "weights",
                 "num_calibration_samples", "base_source"]


@pytest.mark.parametrize("key", SETTINGS_KEYS)
def test_a_merged_configs_setting_holding_markup_is_shown_as_text_in_the_card(key):
    """A folder's config.mudsc {"alpha": "<script>..."} rendered (hf-mudsc evaluate, no README): the script went raw."""
    import re

    from test_card import card_with_mudsc, markup_of

    hostile = "x`\n## Usage\n<script>alert(1)</script> [a](javascript:alert(2)) | y"
    card = card_with_mudsc(merged(), **{key: hostile}, **({"base": "org/base"} if key == "base_source" else {}))
    markup = markup_of(card.text)
    assert "<script" not in markup and "[a](javascript:" not in markup, [
        line for line in card.text.splitlines() if "script" in line]
    assert re.findall(r"^## Usage", card.text, flags=re.MULTILINE) == ["## Usage"]



@pytest.fixture(scope="module")
def merged_folder(tmp_path_factory):
    import torch
    from factories import vit_cli_case

    from hf_mudsc.cli.main import main

    root = tmp_path_factory.mktemp("card_s35")
    parents, calibration = vit_cli_case(root)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["merge", *parents, "--calibration", calibration, "--output", str(root / "merged"), "-q"]) == 0
    finally:
        torch.set_num_threads(threads)
    return root / "merged"


def test_an_error_naming_a_downloaded_files_key_is_printed_escaped(merged_folder, tmp_path, capsys):
    """hf-mudsc inspect DIR, eval_results.json with a view "a\\x1b[2J\\n...": the error cleared the screen."""
    import json
    import shutil

    from hf_mudsc.cli.main import main

    folder = tmp_path / "copy"
    shutil.copytree(merged_folder, folder)
    view = "a\x1b[2J\x1b]0;owned\x07\nhf-mudsc inspect: all good\u202e"
    (folder / "eval_results.json").write_text(json.dumps(
        {"metrics": ["accuracy"], "tasks": {}, "scores": {"merged": {view: {"accuracy": "high"}}}}))
    capsys.readouterr()
    assert main(["inspect", str(folder), "--no-plots"]) == 1
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err and "\u202e" not in err, repr(err)
    assert not any(line.startswith("hf-mudsc inspect: all good") for line in err.splitlines()), err
    assert "a\\x1b[2J\\x1b]0;owned\\x07\\nhf-mudsc inspect: all good\\u202e" in err, err


def test_the_evaluation_chart_of_long_or_control_character_task_names_keeps_its_layout(tmp_path):
    """draw_plots(DIR, None, results with a 300-character task and one "a\\x1b[2J"): axes collapsed, ESC warned raw."""
    import warnings

    from hf_mudsc.publish.plots import draw_plots

    names = ["t" * 300, "a\x1b[2J\nb", "$\\frac{1", "short"]
    results = {"metrics": ["accuracy"], "tasks": {name: {} for name in names},
               "scores": {"parent_a": {name: {"accuracy": 0.6} for name in names},
                          "m" * 200: {**{name: {"accuracy": 0.5} for name in names}, "joint": {"accuracy": 0.4}}}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (plot,) = draw_plots(tmp_path, None, results)
    said = [str(warning.message) for warning in caught]
    assert not any("collapsed" in text or "Glyph" in text or "\x1b" in text for text in said), said
    assert plot.path.is_file()


def test_a_hub_parent_named_with_underscores_at_its_ends_is_shown_as_named():
    """A parent `org/_vit_` (a valid Hub id) was listed as `org/` + italic `vit`: its link text was read as Markdown."""
    from hf_mudsc.publish.card import ParentInfo, render_card
    from hf_mudsc.publish.recipe import Recipe

    parents = [ParentInfo("org/_vit_", "org/_vit_", None, "a" * 40), ParentInfo("org/vit-b", "org/vit-b")]
    text = render_card(merged(), Recipe(models=["org/_vit_", "org/vit-b"], calibration="c"), parents=parents).text
    row = next(line for line in text.splitlines() if line.startswith("| A |"))
    assert "[org/\\_vit\\_](" in row, row
    assert "/org/_vit_)" in row and "/org/_vit_/tree/" in row, row  # the links themselves unchanged


def test_a_merged_configs_warning_cannot_open_a_heading_or_a_list_inside_its_list_item():
    """config.mudsc warnings ["# Safe to use", "1. listed"] -> the Warnings list held an h1 and an ordered list."""
    import re

    from test_card import card_with_mudsc

    warnings = ["# Safe to use", "> quoted", "1. listed", "- listed", "+ listed", "===", "  ## indented"]
    card = card_with_mudsc(merged(), warnings=warnings)
    section = card.text.split("## Warnings\n")[1].split("\n## ")[0]
    items = [line for line in section.splitlines() if line.startswith("- ")]
    assert len(items) == len(warnings), items
    assert not any(re.match(r"- +(#|>|\d+[.)]|[-+*](\s|$)|=+$)", item) for item in items), items


def test_the_evaluation_progress_bar_of_a_hostile_task_name_cannot_act_on_the_terminal(monkeypatch, capsys):
    """evaluate_merge(model with task "a\\x1b[2J...", progress=True) on a tty: the bar's title cleared the screen."""
    from test_evaluate_s30 import bert, rows

    from hf_mudsc import evaluate_merge
    from hf_mudsc.evaluate.tasks import tasks_from_dataset

    monkeypatch.setattr("hf_mudsc.progress.interactive", lambda: True)  # stderr a terminal: tqdm's bars
    # Hugging Face's bar switch on, whatever the environment (HF_HUB_DISABLE_PROGRESS_BARS=1 is read at import) and
    # earlier tests (a disable_progress_bars() under that variable outlives its enable) left: hf_mudsc's bars follow it
    hub_tqdm = importlib.import_module("huggingface_hub.utils.tqdm")
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    monkeypatch.setattr(hub_tqdm, "HF_HUB_DISABLE_PROGRESS_BARS", None)
    monkeypatch.setattr(hub_tqdm, "progress_bar_states", {})
    merged = bert(["a: x", "a: y", "b: p", "b: q"], [5, 0, 0, 5], HOSTILE_TASKS)
    capsys.readouterr()
    evaluate_merge(merged, None, tasks_from_dataset(rows([0, 1, 2, 3]), list(HOSTILE_TASKS), HOSTILE_TASKS),
                   progress=True)
    err = capsys.readouterr().err
    assert "evaluate a\\x1b[2J" in err, repr(err)
    assert "\x1b[2J" not in err and "\x07" not in err and "\u202e" not in err and "\nmerged |" not in err, repr(err)
