"""The card `save_merged` writes for models merged in memory (no Hub ids, no processor, calibration batches given
as tensors): every statement in it must be true for that folder, and its usage snippet must run as written."""

from __future__ import annotations

import re

import pytest
import torch
from factories import make_batches, make_model
from huggingface_hub import ModelCard

import hf_mudsc


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: thread start-up dominates on a busy machine
    try:
        merged = hf_mudsc.merge([make_model("vit_cls", 1), make_model("vit_cls", 2)],
                                make_batches("vit_cls", num_batches=2), method="mudsc", refit="none", progress=False)
    finally:
        torch.set_num_threads(threads)
    return hf_mudsc.save_merged(merged, tmp_path_factory.mktemp("card") / "merged")


def test_the_usage_snippet_runs_as_written_on_the_folder(written):
    """No processor was given, so none is saved: the snippet must not load one from the folder."""
    card = ModelCard.load(written / "README.md")
    snippet = re.search(r"## Usage\n\n```python\n(.*?)```", card.text, re.S).group(1)
    namespace: dict = {}
    exec(snippet.replace("path/to/this/model", str(written)), namespace)  # noqa: S102 - the card's own snippet
    assert type(namespace["model"]).__name__ == "ViTForImageClassification"


def test_calibration_given_as_batches_is_not_called_none(written):
    text = ModelCard.load(written / "README.md").text
    samples = re.search(r"^\| Calibration samples \| (\d+) \|$", text, re.M).group(1)
    assert int(samples) > 0
    cell = re.search(r"^\| Calibration data \| (.*) \|$", text, re.M).group(1)
    assert cell != "none" and "memory" in cell


def test_parents_merged_in_memory_are_not_called_local_folders(written):
    text = ModelCard.load(written / "README.md").text
    parents = re.search(r"## Parents\n\n(.*?)\n\n", text, re.S).group(1)
    assert "local folder" not in parents
    assert not re.search(r"(?<!Hub )parents are pinned", text, re.I)  # nothing to pin: no parent is on the Hub


def test_an_evaluation_on_a_local_folder_is_not_listed_as_a_hub_dataset(tmp_path):
    """The front matter's `datasets` holds Hub dataset ids: a local folder's name there would link (and credit)
    whatever Hub dataset bears that name. Its scores stay in the model-index and the table, marked local."""
    import datasets
    import numpy as np
    from factories import vit_cli_case
    from PIL import Image

    from hf_mudsc.cli.main import main

    parents, calibration = vit_cli_case(tmp_path)
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), mode="L") for _ in range(6)]
    datasets.Dataset.from_dict({"image": images, "label": [0, 1, 2, 0, 1, 2]}).cast_column(
        "image", datasets.Image()).save_to_disk(tmp_path / "evalset")
    out = tmp_path / "merged"
    assert main(["merge", *parents, "--calibration", calibration, "--method", "linear", "--output", str(out)]) == 0
    assert main(["evaluate", str(out), "--dataset", str(tmp_path / "evalset"), "--no-parents"]) == 0
    card = ModelCard.load(out / "README.md")
    assert card.data.datasets is None  # the calibration folder is local too
    # a lone task is named as tasks are when there are several; its split keeps its column
    assert [r.task_name for r in card.data.eval_results] == ["task_0", "joint (all tasks)"]
    # the folder has no split of its own: none is invented, and the model-index names the folder as local data
    assert [r.dataset_split for r in card.data.eval_results] == [None, None]
    assert {r.dataset_type for r in card.data.eval_results} == {"evalset (local folder)"}
    assert re.search(r"^\| task_0 \| evalset \(local folder\) \| — \| accuracy \|", card.text, re.M)
    assert str(tmp_path) not in card.content


def test_a_merge_without_unit_matching_states_no_head_pairing():
    """Task-vector and averaging methods pair no heads and have no reference implementation to match: the card
    must not say the heads were "shared per attention block" (nor list the MuDSC reference switch)."""
    from hf_mudsc.publish.card import render_card
    from hf_mudsc.publish.writer import recipe_of

    merged = hf_mudsc.merge([make_model("vit_cls", 1), make_model("vit_cls", 2)], method="linear", progress=False)
    text = render_card(merged, recipe_of(merged)).text
    assert "| Matcher | — (no unit matching) |" in text
    assert "| Head pairing |" not in text and "| Reference-compatible weights |" not in text


def test_the_size_row_counts_attention_heads_as_heads():
    from hf_mudsc.options import MergeOptions

    row = next(f for f in MergeOptions.option_fields() if f.name == "size").metadata["card"]
    budget = {"widths": {"hidden_size": 40, "num_attention_heads": 5}, "extra_units": {"hidden_size": 8,
              "num_attention_heads": 1}, "num_parameters": 24357, "ratio": 1.495, "parent_parameters": 16291}
    text = row.text(1.5, {"mudsc": {"size_budget": budget}})
    assert "hidden_size 40 (+8 units kept unfused), num_attention_heads 5 (+1 head kept unfused)" in text


def test_a_local_folder_given_with_a_tilde_is_a_local_folder(tmp_path, monkeypatch):
    from hf_mudsc.publish.card import ParentInfo

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "vit-local").mkdir()
    assert not ParentInfo.from_any("~/vit-local").in_memory
    assert ParentInfo.from_any("ViTForImageClassification").in_memory
    assert not ParentInfo.from_any("org/vit-a").in_memory


def test_the_joint_label_snippet_runs_on_the_users_images(tmp_path):
    """The second Usage snippet (all labels at once) used `inputs` it never made: with the processor saved it now
    prepares them from the user's `images`, and runs as written after the first snippet."""
    import numpy as np
    from factories import vit_cli_case
    from PIL import Image
    from transformers import AutoConfig

    from hf_mudsc.cli.main import main

    parents, calibration = vit_cli_case(tmp_path)
    for folder, names in zip(parents, (("zero", "one", "two"), ("three", "four", "five"))):  # two tasks
        config = AutoConfig.from_pretrained(folder)
        config.id2label = dict(enumerate(names))
        config.label2id = {name: i for i, name in enumerate(names)}
        config.save_pretrained(folder)
    out = tmp_path / "merged"
    assert main(["merge", *parents, "--calibration", calibration, "--method", "mudsc", "--output", str(out)]) == 0
    text = ModelCard.load(out / "README.md").text
    usage = text[text.index("## Usage"):text.index("## Reproduce")]
    snippets = re.findall(r"```python\n(.*?)```", usage, re.S)
    assert len(snippets) == 2, usage
    rng = np.random.default_rng(0)
    namespace: dict = {"images": [Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), mode="L")
                                  for _ in range(3)]}
    for snippet in snippets:
        exec(snippet.replace("path/to/this/model", str(out)), namespace)  # noqa: S102 - the card's own snippets
    assert len(namespace["labels"]) == 3 and all(": " in label for label in namespace["labels"])


def test_a_local_dataset_spec_given_to_evaluate_from_python_is_named_as_the_cli_names_it(tmp_path):
    """`evaluate_merge(..., ["/home/me/data/evalset:test"])` named the task's dataset by the whole spec, so the
    results (and a card updated from them) carried an absolute local path; the CLI names it by the folder."""
    from hf_mudsc.evaluate.tasks import as_task_data

    folder = tmp_path / "private" / "evalset"
    folder.mkdir(parents=True)
    task = as_task_data(f"{folder}:test")
    assert (task.name, task.split, task.local) == ("evalset", "test", True)
    assert str(tmp_path) not in repr((task.name, task.split))
    hub = as_task_data("org/digits:validation")  # a Hub id keeps its name
    assert (hub.name, hub.split, hub.local) == ("org/digits", "validation", False)


def test_the_normalize_cell_says_yes_or_no_as_the_other_switches_do(tmp_path):
    merged = hf_mudsc.merge([make_model("vit_cls", 0), make_model("vit_cls", 1)], None, method="linear",
                            progress=False)
    hf_mudsc.save_merged(merged, tmp_path / "m")
    text = ModelCard.load(tmp_path / "m" / "README.md").text
    assert re.search(r"^\| Normalize by the weights \| yes \|$", text, re.M), text


def test_a_base_given_as_a_model_object_has_one_name_on_the_card():
    """The settings table called it `base` (the config's fallback) while the parents table named it by its class, as
    in-memory parents are named: both now show the parents table's name."""
    from hf_mudsc.publish.card import render_card
    from hf_mudsc.publish.writer import recipe_of

    merged = hf_mudsc.merge([make_model("vit_cls", 1), make_model("vit_cls", 2)], method="task_arithmetic",
                            base=make_model("vit_cls", 0), progress=False)
    text = render_card(merged, recipe_of(merged)).text
    assert "| base | `ViTForImageClassification` (merged in memory) | — |" in text
    assert re.search(r"^\| Base model \| `ViTForImageClassification` \|$", text, re.M), text
    assert "`base`" not in text


def test_a_local_base_folder_is_shown_by_name_only_in_the_cards_recipe(tmp_path):
    """Local parents and calibration data are shown by folder name in the card's copy of the recipe; the base's
    absolute path (the recipe file keeps it, to re-run) was shown whole, publishing this machine's layout."""
    from hf_mudsc.publish.card import render_card
    from hf_mudsc.publish.writer import recipe_of

    folders = []
    for name, seed in (("vit-a", 1), ("vit-b", 2), ("vit-base", 0)):
        make_model("vit_cls", seed).save_pretrained(tmp_path / "private" / name)
        folders.append(str(tmp_path / "private" / name))
    merged = hf_mudsc.merge(folders[:2], method="task_arithmetic", base=folders[2], progress=False)
    assert recipe_of(merged).base == folders[2]  # the recipe file re-runs from anywhere
    text = render_card(merged, recipe_of(merged)).text
    assert str(tmp_path) not in text
    assert re.search(r"^base: vit-base$", text, re.M) and "| base | `vit-base` (local folder) | — |" in text
    assert "Local folders (`vit-a`, `vit-b`, `vit-base`) are shown by name only" in text


def test_the_joint_label_snippet_runs_on_the_users_texts(tmp_path):
    """The text branch of the card's Usage snippets (a tokenizer saved with the parents): both run as written on the
    user's `texts` after `from_pretrained` of the folder, and give one "task: label" per text."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "cat", "dog", "car", "is", "big", "red"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizer(str(tmp_path / "vocab.txt"))
    parents = []
    for seed, labels in enumerate((("x", "y"), ("p", "q", "r"))):
        config = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, num_labels=len(labels), id2label=dict(enumerate(labels)),
                            label2id={label: i for i, label in enumerate(labels)})
        torch.manual_seed(seed)
        folder = tmp_path / f"bert-{seed}"
        BertForSequenceClassification(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        parents.append(str(folder))
    merged = hf_mudsc.merge(parents, method="linear", progress=False)
    out = hf_mudsc.save_merged(merged, tmp_path / "merged")
    text = ModelCard.load(out / "README.md").text
    usage = text[text.index("## Usage"):text.index("## Reproduce")]
    snippets = re.findall(r"```python\n(.*?)```", usage, re.S)
    assert len(snippets) == 2 and "AutoTokenizer" in snippets[0], usage
    namespace: dict = {"texts": ["the cat is big", "a red car"]}
    for snippet in snippets:
        exec(snippet.replace("path/to/this/model", str(out)), namespace)  # noqa: S102 - the card's own snippets
    assert len(namespace["labels"]) == 2 and all(label.startswith("bert-") for label in namespace["labels"])


def test_a_backtick_in_a_local_calibration_or_base_folder_name_puts_no_markup_on_the_card(tmp_path):
    """Bug hunt s29: the settings table's Calibration data and Base model cells wrapped a folder's name in a hand-made
    code span (`name`): a backtick in the name closed it and the rest (`<img ... onerror=...>`) reached the page as
    HTML. Both are one code span fenced longer than any backtick run in the name (`markdown_code`)."""
    from factories import vit_cli_case

    from hf_mudsc.publish.card import render_card
    from hf_mudsc.publish.writer import recipe_of

    hostile = "x`<img src=x onerror=alert(1)>`y"
    parents, calibration = vit_cli_case(tmp_path)
    calibration_folder = tmp_path / f"cal{hostile}"
    (tmp_path / "calibration").rename(calibration_folder)
    base_folder = tmp_path / f"base{hostile}"
    make_model("vit_cls", 0).save_pretrained(base_folder)
    merged = hf_mudsc.merge(parents, str(calibration_folder), method="regmean", base=str(base_folder),
                            progress=False)
    text = render_card(merged, recipe_of(merged)).text
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert rows["Calibration data"] == f"| Calibration data | ``cal{hostile}`` |", rows["Calibration data"]
    assert rows["Base model"].startswith(f"| Base model | ``base{hostile}``"), rows["Base model"]


def test_local_parents_are_not_said_to_be_pinned_to_commits(tmp_path):
    """Bug hunt s29: the Reproduce section said "the parents are pinned to the commits that were used" for parents
    that were local folders (no commit): it says they are named by path in the stored recipe instead."""
    from hf_mudsc.publish.card import render_card
    from hf_mudsc.publish.writer import recipe_of

    for name, seed in (("vit-a", 1), ("vit-b", 2)):
        make_model("vit_cls", seed).save_pretrained(tmp_path / name)
    merged = hf_mudsc.merge([str(tmp_path / "vit-a"), str(tmp_path / "vit-b")], method="linear", progress=False)
    text = " ".join(render_card(merged, recipe_of(merged)).text.split())
    assert "the parents are pinned" not in text
    assert ("the parents are local folders, named by path in the stored recipe (by name in the card's copy below): "
            "it re-runs on this machine") in text


def test_the_parents_licences_are_read_and_the_card_declares_one_only_when_all_share_it(tmp_path, caplog):
    """Card bug hunt s29: no licence was read anywhere: parents under apache-2.0 and cc-by-nc-4.0 gave a pushed card
    with no licence and no word of either. The parents' cards are read: one shared licence is declared; different
    ones are listed, none declared, and the merge warns."""
    import logging

    from huggingface_hub import ModelCard

    from hf_mudsc.load.references import LICENSE_NOT_READ
    from hf_mudsc.publish.card import common_license, license_note, render_card
    from hf_mudsc.publish.writer import recipe_of

    def parent(name: str, seed: int, license: str | None) -> str:
        make_model("vit_cls", seed).save_pretrained(tmp_path / name)
        if license is not None:
            (tmp_path / name / "README.md").write_text(f"---\nlicense: {license}\n---\n\n# {name}\n")
        return str(tmp_path / name)

    same = [parent("a", 1, "apache-2.0"), parent("b", 2, "apache-2.0")]
    merged = hf_mudsc.merge(same, method="linear", progress=False)
    card = render_card(merged, recipe_of(merged))
    # local cards are not checked by the Hub (a value it refuses would fail the push): listed, not declared
    assert card.data.license is None and "A: `apache-2.0`, B: `apache-2.0`" in " ".join(card.text.split())
    assert merged.config.mudsc["parent_licenses"] == ["apache-2.0", "apache-2.0"]
    hub = {"parent_licenses": ["apache-2.0", "apache-2.0"], "parent_revisions": ["1" * 40, "2" * 40]}
    assert common_license(hub) == "apache-2.0" and license_note(hub, "AB") is None  # Hub parents sharing one
    assert common_license({**hub, "base": "org/base", "base_license": "mit", "base_revision": "3" * 40}) is None
    assert common_license({**hub, "parent_licenses": ["apache-2.0", LICENSE_NOT_READ]}) is None
    differ = [same[0], parent("c", 3, "cc-by-nc-4.0"), parent("d", 4, None)]
    with caplog.at_level(logging.WARNING, logger="hf_mudsc"):
        merged = hf_mudsc.merge(differ, method="linear", progress=False)
    assert "not all could be read (A: apache-2.0, B: cc-by-nc-4.0, C: none declared)" in caplog.text
    card = ModelCard(str(render_card(merged, recipe_of(merged))))
    assert card.data.license is None
    assert ("**Licences**: the parents' model cards declare A: `apache-2.0`, B: `cc-by-nc-4.0`, C: none declared. "
            "The merged weights derive from each of them, so this card declares no licence") in " ".join(
        card.text.split())
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_mudsc"):
        merged = hf_mudsc.merge([parent("e", 5, None), parent("f", 6, None)], method="linear", progress=False)
    assert "licence" not in caplog.text and "**Licences**" not in render_card(merged, recipe_of(merged)).text
    assert merged.config.mudsc["parent_licenses"] == [None, None]  # no card: none declared
    # review s29: a card whose front matter has a number as a key crashed every merge (TypeError): not read instead
    (tmp_path / "f" / "README.md").write_text("---\n2024: first release\nlicense: mit\n---\n\n# f\n")
    merged = hf_mudsc.merge([same[0], str(tmp_path / "f")], method="linear", progress=False)
    assert merged.config.mudsc["parent_licenses"] == ["apache-2.0", LICENSE_NOT_READ]
    assert "B: its card not read" in " ".join(render_card(merged, recipe_of(merged)).text.split())


def test_batches_given_as_they_are_do_not_record_a_batch_size_that_was_not_used(tmp_path):
    """Invariance bug hunt s29: calibration given as batches runs one forward per batch as given, yet the config and
    the card recorded `batch_size` (its default 32) as the batch size used. They record "as given"; a dataset's
    batches are still recorded by their size."""
    import datasets

    from hf_mudsc.publish.card import render_card
    from hf_mudsc.publish.writer import recipe_of

    parents = [make_model("vit_cls", 1), make_model("vit_cls", 2)]
    batches = make_batches("vit_cls", num_batches=2, batch_size=8)
    merged = hf_mudsc.merge(parents, batches, method="zipit", refit="none", batch_size=16, progress=False)
    assert merged.config.mudsc["batch_size"] is None
    assert re.search(r"^\| Calibration batch size \| as given \(batches passed to merge\) \|$",
                     render_card(merged, recipe_of(merged)).text, re.M)
    rows = datasets.Dataset.from_dict({"pixel_values": torch.cat([b["pixel_values"] for b in batches]).numpy()})
    merged = hf_mudsc.merge(parents, rows, method="zipit", refit="none", batch_size=4, progress=False)
    assert merged.config.mudsc["batch_size"] == 4
    assert re.search(r"^\| Calibration batch size \| 4 \|$", render_card(merged, recipe_of(merged)).text, re.M)
