"""`hf-mudsc evaluate` after the session-28 bug hunt: `--output-json` checked before the work and never splitting a
folder's card from its results, recipe parents treated as inputs, files in a written folder's subfolders recorded,
and label and task columns given as `ClassLabel`s read by name."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
from factories import make_model
from PIL import Image
from transformers import ViTImageProcessor

from hf_mudsc.cli.main import main
from hf_mudsc.publish.folder import MARKER_FILENAME

pytestmark = pytest.mark.usefixtures("one_thread_module")

LABELS = {"zoo": ["lion", "seal", "yak"], "art": ["oil", "ink"]}


def _images(seed: int, count: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), mode="L") for _ in range(count)]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """Parents `zoo` (3 classes) and `art` (2) merged by the CLI (average: no data needed), each task's test set
    (12 and 10 rows) and one dataset holding both with a text `task` column and task-local labels."""
    root = tmp_path_factory.mktemp("evaluate_s28")
    processor = ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5], image_std=[0.5])
    for seed, (name, labels) in enumerate(LABELS.items(), start=1):
        model = make_model("vit_cls", seed, num_labels=len(labels))
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {label: i for i, label in enumerate(labels)}
        model.save_pretrained(root / name)
        processor.save_pretrained(root / name)
    assert main(["merge", str(root / "zoo"), str(root / "art"), "--method", "average", "--output",
                 str(root / "merged"), "-q"]) == 0
    rng = np.random.default_rng(1)
    parts = []
    for seed, (task, count) in enumerate((("zoo", 12), ("art", 10))):
        labels = rng.integers(0, len(LABELS[task]), count).tolist()
        data = datasets.Dataset.from_dict({"image": _images(seed, count), "label": labels})
        data = data.cast_column("image", datasets.Image())
        data.save_to_disk(root / f"test-{task}")
        parts.append(data.map(lambda row, task=task: {"task": task}))
    datasets.concatenate_datasets(parts).save_to_disk(root / "both")
    return root


def _error(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith(("INFO", "WARN"))]
    assert len(lines) == 1, lines
    return lines[0]


def _files(folder):
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def test_an_output_json_that_cannot_be_written_is_refused_before_the_work_and_splits_nothing(case, tmp_path,
                                                                                               capsys, monkeypatch):
    """`--output-json labels.json/r.json` (under a file) failed after the whole evaluation, and by then the folder's
    eval_results.json held the new run while its card still showed the old one."""
    import shutil

    import hf_mudsc.load.parents as parents

    merged = tmp_path / "merged"
    shutil.copytree(case / "merged", merged)
    flags = ["--dataset", f"zoo={case / 'test-zoo'}", "--dataset", f"art={case / 'test-art'}", "--no-parents"]
    assert main(["evaluate", str(merged), *flags, "-q"]) == 0
    before = _files(merged)
    (tmp_path / "labels.json").write_text("{}")
    monkeypatch.setattr(parents, "load_parent", lambda *a, **k: pytest.fail("loaded before refusing"))
    capsys.readouterr()
    for target in (tmp_path / "labels.json" / "r.json", tmp_path):
        assert main(["evaluate", str(merged), *flags, "--num-samples", "3", "--output-json", str(target)]) == 2
        line = _error(capsys)
        assert str(target) in line, line
    assert _files(merged) == before


def test_an_output_json_inside_a_parent_the_recipe_names_is_refused_like_one_of_parents(case, tmp_path, capsys,
                                                                                         monkeypatch):
    """Refused with `--parents zoo art`; with the same parents read from the recipe it was written into `zoo/`."""
    import hf_mudsc.load.parents as parents

    monkeypatch.setattr(parents, "load_parent", lambda *a, **k: pytest.fail("loaded before refusing"))
    before = _files(case / "zoo")
    capsys.readouterr()
    assert main(["evaluate", str(case / "merged"), "--dataset", f"zoo={case / 'test-zoo'}", "--dataset",
                 f"art={case / 'test-art'}", "--no-card", "--output-json", str(case / "zoo" / "results.json")]) == 2
    line = _error(capsys)
    assert "is inside the parent folder" in line and "inputs are never modified" in line, line
    assert _files(case / "zoo") == before


def test_an_output_json_in_a_subfolder_of_the_evaluated_folder_is_recorded_as_its_own(case, tmp_path):
    """`--output-json DIR/plots/r.json` was written but not listed in DIR's marker: `merge --output DIR --overwrite`
    then refused DIR as holding a file hf-mudsc did not write."""
    import shutil

    merged = tmp_path / "merged"
    shutil.copytree(case / "merged", merged)
    assert main(["evaluate", str(merged), "--dataset", f"zoo={case / 'test-zoo'}", "--dataset",
                 f"art={case / 'test-art'}", "--no-parents", "--output-json", str(merged / "plots" / "r.json"),
                 "-q"]) == 0
    assert "plots/r.json" in json.loads((merged / MARKER_FILENAME).read_text())["files"]
    assert main(["merge", str(case / "zoo"), str(case / "art"), "--method", "average", "--output", str(merged),
                 "--overwrite", "-q"]) == 0
    assert not (merged / "plots" / "r.json").exists()
