"""Issue 10, item 5: an `--output` that reaches an input through `..` or a symlink is refused before any loading.

Every input counts: both parents, the calibration folder or file, and the recipe file (and its folder).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_cli import FAST, leftovers, save_parents_and_data, tree_digest

from hf_mudsc.cli.main import main
from hf_mudsc.publish.recipe import RECIPE_FILENAME


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return save_parents_and_data(tmp_path_factory.mktemp("overlap_inputs"))


@pytest.fixture()
def no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("inputs were loaded although the output check should have failed first")

    monkeypatch.setattr("hf_mudsc.load.parents.load_parents", refuse)
    monkeypatch.setattr("hf_mudsc.calibrate.datasets.load_calibration_dataset", refuse)


def test_a_parent_reached_through_dotdot_or_a_symlink_is_refused(inputs, tmp_path, no_loading, capsys):
    a, b, calibration = inputs
    # A parent that is itself a merged model (it holds a recipe): the old check would have replaced it.
    parent = tmp_path / "parents" / "merged-parent"
    shutil.copytree(a, parent)
    (parent / RECIPE_FILENAME).write_text("method: mudsc\n")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "parents", target_is_directory=True)
    before = tree_digest(parent, b, calibration)
    for out in (b / ".." / ".." / tmp_path.name / "parents" / parent.name, link / parent.name, link):
        argv = ["merge", str(parent), str(b), "--calibration", str(calibration), "--output", str(out),
                "--overwrite", *FAST]
        assert main(argv) == 1, out
        err = capsys.readouterr().err
        assert f"overlaps the parent folder {str(parent)!r}" in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert tree_digest(parent, b, calibration) == before
    assert leftovers(tmp_path) == [] and leftovers(tmp_path / "parents") == []


def test_the_calibration_data_and_the_recipe_are_inputs_too(inputs, tmp_path, no_loading, capsys):
    a, b, calibration = inputs
    argv = ["merge", str(a), str(b), "--calibration", f"{calibration}/../{calibration.name}", *FAST]
    assert main([*argv, "--output", str(calibration / "merged")]) == 1
    assert f"overlaps the calibration data {str(calibration)!r}" in capsys.readouterr().err
    # The README flow: a recipe downloaded into a folder, then `--output <that folder> --overwrite`.
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    recipe = downloads / "r.yaml"
    recipe.write_text(f"models: [{a}, {b}]\ncalibration: {calibration}\nmethod: zipit\nnum_samples: 8\n")
    (downloads / "important.txt").write_text("precious")
    for out in (downloads, tmp_path / "x" / ".." / "downloads"):
        assert main(["merge", "--recipe", str(recipe), "--output", str(out), "--overwrite"]) == 1
        assert f"overlaps the recipe file {str(recipe)!r}" in capsys.readouterr().err
    assert sorted(p.name for p in downloads.iterdir()) == ["important.txt", "r.yaml"]


def test_an_unwritable_output_location_fails_in_one_line_before_loading(inputs, tmp_path, no_loading, capsys):
    a, b, calibration = inputs
    (tmp_path / "file.txt").write_text("x")
    cases = [(tmp_path / "file.txt" / "merged", "is under the file"),
             (tmp_path / ("m" * 250), "too long for this filesystem"),
             ("/proc/hf-mudsc-test/merged", "cannot create a folder in '/proc'"),
             # QA s20: a path of 2000 nested folders was accepted, merged, then failed writing with a RecursionError
             # traceback; one longer than the system's path limit with "File name too long" after the merge.
             (tmp_path / "/".join(["d"] * 2000), "would create 2000 nested folders"),
             (tmp_path / "/".join(["d" * 200] * 25), "longer than this system's path limit")]
    for out, message in cases:
        assert main(["merge", str(a), str(b), "--calibration", str(calibration), "--output", str(out),
                     *FAST]) == 1
        err = capsys.readouterr().err
        assert message in err and "--output" in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_an_output_in_or_around_the_hub_cache_holding_hub_parents_is_refused(inputs, tmp_path, no_loading, capsys):
    """Hub parents are read from the Hugging Face cache: an output inside it (a parent's snapshot folder) added the
    merged model to that parent's files, and `--output <cache> --overwrite` on a cache nothing was downloaded to
    yet replaced the cache folder with the merged model."""
    from huggingface_hub import constants

    _, _, calibration = inputs
    cache = Path(constants.HF_HUB_CACHE)
    snapshot = cache / "models--hostile--parent" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True, exist_ok=True)
    for out in (snapshot / "merged", cache, cache / "merged"):
        argv = ["merge", "hostile/parent", "hostile/other", "--calibration", str(calibration), "--output", str(out),
                "--overwrite", *FAST]
        assert main(argv) == 1, out
        err = capsys.readouterr().err
        assert f"overlaps the Hugging Face cache {str(cache.resolve())!r}" in err, err
        assert len(err.strip().splitlines()) == 1, err
    assert list(snapshot.iterdir()) == [] and not (cache / "merged").exists()


def test_an_empty_reference_names_no_input_folder(inputs, tmp_path, monkeypatch):
    """`Path("")` is the current directory: a recipe naming a parent "" (a model object without a name) made every
    output under the current directory "overlap a parent folder"."""
    from hf_mudsc.publish.recipe import Recipe

    a, _, _ = inputs
    monkeypatch.chdir(tmp_path)
    listed = Recipe(models=["", str(a)], base="").inputs()
    assert [path for kind, path in listed if kind.endswith("folder")] == [str(a)], listed


def test_save_merged_refuses_the_folder_of_a_dataset_object_it_calibrated_on(inputs, tmp_path):
    """QA s19: with `calibration="./calib"` save_merged refused `calib/merged`, but with the same data passed as
    `datasets.load_from_disk("calib")` it wrote the merged model into the dataset's folder."""
    import datasets

    import hf_mudsc

    a, b, calibration = inputs
    merged = hf_mudsc.merge([str(a), str(b)], datasets.load_from_disk(str(calibration)), method="zipit",
                            num_samples=8, batch_size=8, progress=False)
    before = sorted(p.name for p in calibration.iterdir())
    for out in (calibration / "merged", calibration):
        with pytest.raises(ValueError, match=f"overlaps the calibration data {str(calibration.resolve())!r}"):
            hf_mudsc.save_merged(merged, out, overwrite=True)
    assert sorted(p.name for p in calibration.iterdir()) == before
    assert hf_mudsc.save_merged(merged, tmp_path / "merged").is_dir()  # elsewhere: written
