"""Files after the session-31 files hunt: `evaluate` reads a merged folder's config.json only as the loader does
(its link and count checks first)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
from factories import make_model
from PIL import Image
from transformers import AutoConfig, ViTImageProcessor

from hf_mudsc.cli.main import main
from hf_mudsc.load.config_json import MAX_LABELS

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """Two 3-class ViT parents merged by the CLI (average: no data needed) and a 12-row test set."""
    root = tmp_path_factory.mktemp("files_s31")
    processor = ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5], image_std=[0.5])
    for seed, name in enumerate(("vit-a", "vit-b"), start=1):
        make_model("vit_cls", seed).save_pretrained(root / name)
        processor.save_pretrained(root / name)
    assert main(["merge", str(root / "vit-a"), str(root / "vit-b"), "--method", "average", "--output",
                 str(root / "merged"), "-q"]) == 0
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), mode="L") for _ in range(12)]
    datasets.Dataset.from_dict({"image": images, "label": rng.integers(0, 3, 12).tolist()}).cast_column(
        "image", datasets.Image()).save_to_disk(root / "test")
    return root


def _copy(case: Path, tmp_path: Path) -> Path:
    merged = tmp_path / "merged"
    shutil.copytree(case / "merged", merged, symlinks=True)
    return merged


def _error(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith(("INFO", "WARN"))]
    assert len(lines) == 1, lines
    return lines[0]


# ------------------------------------------------- 1: evaluate reads the folder's config.json as the loader does
@pytest.fixture
def no_huge_configs(monkeypatch):
    """transformers' AutoConfig failing the test when handed a config.json declaring more labels than any model
    has: it builds one id2label entry per label (10**9 of them: tens of GB) before anything refuses it."""
    real = AutoConfig.from_pretrained.__func__

    def guarded(cls, path, *args, **kwargs):
        config = Path(path) / "config.json"
        if config.is_file() and json.loads(config.read_text()).get("num_labels", 0) > MAX_LABELS:
            raise AssertionError(f"transformers was handed {config} (num_labels over {MAX_LABELS:,}) unchecked")
        return real(cls, path, *args, **kwargs)

    monkeypatch.setattr(AutoConfig, "from_pretrained", classmethod(guarded))


def _huge_labels(merged: Path) -> None:
    config = json.loads((merged / "config.json").read_text())
    config["num_labels"] = 10**9
    config.pop("id2label", None)
    config.pop("label2id", None)
    (merged / "config.json").write_text(json.dumps(config))


@pytest.mark.usefixtures("no_huge_configs")
def test_evaluate_refuses_a_config_with_a_billion_labels_before_transformers_reads_it(case, tmp_path, capsys):
    merged = _copy(case, tmp_path)
    _huge_labels(merged)
    assert main(["evaluate", str(merged), "--dataset", str(case / "test"), "--no-card", "--no-parents"]) == 1
    line = _error(capsys)
    assert "num_labels is 1000000000" in line and "more than any model has" in line, line


@pytest.mark.usefixtures("no_huge_configs")
def test_evaluate_merge_refuses_a_folder_config_with_a_billion_labels_before_transformers_reads_it(case, tmp_path):
    from hf_mudsc import evaluate_merge
    from hf_mudsc.errors import LoadError

    merged = _copy(case, tmp_path)
    _huge_labels(merged)
    with pytest.raises(LoadError, match="num_labels is 1000000000") as error:
        evaluate_merge(str(merged), None, {"vit-a": str(case / "test")}, progress=False)
    assert "\n" not in str(error.value)


def _config_linked_out(case: Path, tmp_path: Path) -> Path:
    """The merged folder with config.json a link to a file outside it (one transformers must not be handed: a
    billion labels)."""
    merged = _copy(case, tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(merged / "config.json", outside / "config.json")
    _huge_labels(outside)
    outside = outside / "config.json"
    (merged / "config.json").unlink()
    (merged / "config.json").symlink_to(outside)
    return merged


@pytest.mark.usefixtures("no_huge_configs")
def test_evaluate_refuses_a_config_json_linking_out_of_the_folder_as_the_loader_does(case, tmp_path, capsys):
    merged = _config_linked_out(case, tmp_path)
    assert main(["evaluate", str(merged), "--dataset", str(case / "test"), "--no-card", "--no-parents"]) == 1
    line = _error(capsys)
    assert "config.json is a symbolic link to" in line and "outside the folder" in line, line


@pytest.mark.usefixtures("no_huge_configs")
def test_evaluate_merge_refuses_a_config_json_linking_out_of_the_folder(case, tmp_path):
    from hf_mudsc import evaluate_merge
    from hf_mudsc.errors import LoadError

    merged = _config_linked_out(case, tmp_path)
    with pytest.raises(LoadError, match="config.json is a symbolic link to .* outside the folder"):
        evaluate_merge(str(merged), None, {"vit-a": str(case / "test")}, progress=False)


def test_evaluate_refuses_a_folder_without_config_json_naming_it(case, tmp_path, capsys):
    merged = _copy(case, tmp_path)
    (merged / "config.json").unlink()
    assert main(["evaluate", str(merged), "--dataset", str(case / "test"), "--no-card", "--no-parents"]) == 1
    assert "has no config.json" in _error(capsys)

