"""Issue 10, the Python API on a par with the CLI: `hf_mudsc.save_merged` / `hf_mudsc.push_merged` write the
same folder as `hf-mudsc merge --output` (model, processor, card, recipe, marker), through the same writer."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from factories import make_model
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from test_cli import FAST, save_parents_and_data
from transformers import AutoModelForImageClassification

import hf_mudsc
from hf_mudsc.cli.main import main
from hf_mudsc.publish.folder import MARKER_FILENAME
from hf_mudsc.publish.recipe import RECIPE_FILENAME, Recipe
from hf_mudsc.solve.diagnostics import DIAGNOSTICS_FILENAME, PLOTS_FOLDER

MERGED_FILES = {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", RECIPE_FILENAME,
                DIAGNOSTICS_FILENAME}
# What a zipit merge of the fixtures draws (no sweeps, so no objective plot); a push uploads them with the model.
ZIPIT_PLOTS = {f"{PLOTS_FOLDER}/{name}.png" for name in ("match_quality", "similarity_heatmaps", "attention_heads")}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return save_parents_and_data(tmp_path_factory.mktemp("api_inputs"))


@pytest.fixture(scope="module")
def merged(inputs):
    a, b, calibration = inputs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield hf_mudsc.merge([str(a), str(b)], str(calibration), method="zipit", num_samples=24, batch_size=8,
                             progress=False)
    finally:
        torch.set_num_threads(threads)


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        pixels = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
        return model(pixel_values=pixels).logits


def test_save_merged_writes_what_the_cli_writes(merged, inputs, tmp_path):
    a, b, calibration = inputs
    out = hf_mudsc.save_merged(merged, tmp_path / "api")
    assert out == tmp_path / "api"
    assert {p.name for p in out.iterdir()} == MERGED_FILES | {PLOTS_FOLDER, MARKER_FILENAME}
    assert sorted(json.loads((out / MARKER_FILENAME).read_text())["files"]) == sorted(MERGED_FILES | ZIPIT_PLOTS)
    card = ModelCard((out / "README.md").read_text())  # parses and checks the front matter (no network)
    assert card.data.library_name == "transformers" and "zipit" in card.content and "api" in card.content
    recipe = Recipe.load(out / RECIPE_FILENAME)
    assert recipe.models == [str(a), str(b)] and recipe.calibration == str(calibration)
    assert (recipe.method, recipe.num_samples, recipe.batch_size) == ("zipit", 24, 8)
    loaded = AutoModelForImageClassification.from_pretrained(out)
    torch.testing.assert_close(logits_of(loaded), logits_of(merged), rtol=0, atol=0)
    # The CLI writes the same files and the same weights; its recipe re-runs the API's merge.
    cli = tmp_path / "cli"
    assert main(["merge", str(a), str(b), "--calibration", str(calibration), "--output", str(cli), *FAST]) == 0
    assert {p.name for p in cli.iterdir()} == {p.name for p in out.iterdir()}
    assert ModelCard.load(cli / "README.md").data.base_model == card.data.base_model
    assert (cli / RECIPE_FILENAME).read_text() == (out / RECIPE_FILENAME).read_text()
    again = tmp_path / "again"
    assert main(["merge", "--recipe", str(out / RECIPE_FILENAME), "--output", str(again)]) == 0
    first, second = load_file(out / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_save_merged_refuses_an_existing_folder_unless_overwrite_and_never_deletes_foreign_files(merged, tmp_path):
    out = hf_mudsc.save_merged(merged, tmp_path / "api")
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True to replace it, or choose "
                                              "another directory"):
        hf_mudsc.save_merged(merged, out)
    (out / "mine.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"did not write: mine\.txt"):
        hf_mudsc.save_merged(merged, out, overwrite=True)
    (out / "mine.txt").unlink()
    assert hf_mudsc.save_merged(merged, out, overwrite=True) == out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["api"]


def test_save_merged_refuses_an_output_overlapping_the_merges_inputs_as_the_cli_does(merged, inputs, tmp_path):
    """`hf-mudsc merge` refuses an --output equal to, inside or around a parent folder or the calibration data;
    `save_merged` wrote a `merged` folder into the calibration dataset's folder, and with overwrite=True replaced a
    parent that was itself a folder hf-mudsc wrote."""
    from test_cli import tree_digest

    a, b, calibration = inputs
    parent = hf_mudsc.save_merged(merged, tmp_path / "earlier-merge")  # a merged folder, merged again below
    again = hf_mudsc.merge([str(parent), str(b)], str(calibration), method="zipit", num_samples=24, batch_size=8,
                           progress=False)
    before = tree_digest(parent, b, calibration)
    for out, overwrite, described in ((parent, True, f"parent folder {str(parent)!r}"),
                                      (calibration / "merged", False, f"calibration data {str(calibration)!r}"),
                                      (b.parent, True, f"parent folder {str(b)!r}")):
        with pytest.raises(ValueError, match="overlaps the " + described.replace("(", r"\(")) as caught:
            hf_mudsc.save_merged(again, out, overwrite=overwrite)
        assert "\n" not in str(caught.value) and "directory" in str(caught.value)
    assert tree_digest(parent, b, calibration) == before
    assert not (calibration / "merged").exists()


def test_parents_without_a_processor_give_a_folder_without_one(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        merged = hf_mudsc.merge([make_model("vit_cls", 1), make_model("vit_cls", 2)], method="weight_matching",
                                progress=False)
    finally:
        torch.set_num_threads(threads)
    out = hf_mudsc.save_merged(merged, tmp_path / "objects")
    assert {p.name for p in out.iterdir()} == MERGED_FILES - {"preprocessor_config.json"} | {PLOTS_FOLDER,
                                                                                          MARKER_FILENAME}
    assert ModelCard((out / "README.md").read_text()).data.library_name == "transformers"
    assert Recipe.load(out / RECIPE_FILENAME).method == "weight_matching"


def test_a_merged_model_moved_to_the_meta_device_is_refused_in_one_line(tmp_path):
    """QA s24: `merged.to("meta")` then save_merged ended in safetensors' `NotImplementedError: Cannot copy out of meta
    tensor; no data!` traceback (the finite-weights check skipped meta tensors)."""
    from hf_mudsc.errors import MergeInputError

    merged = hf_mudsc.merge([make_model("vit_cls", 1), make_model("vit_cls", 2)], method="average", progress=False)
    merged.to("meta")
    with pytest.raises(MergeInputError, match=r"^refusing to write the merged model: \d+ tensors are on the meta "
                                              r"device \('[\w.]+', .*\), which holds no values; write the model "
                                              r"merge\(\) returned, before moving it to 'meta'$"):
        hf_mudsc.save_merged(merged, tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_a_model_not_returned_by_merge_is_refused_before_writing(tmp_path):
    with pytest.raises(ValueError, match="carries no merge recipe"):
        hf_mudsc.save_merged(make_model("vit_cls", 1), tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_push_merged_uploads_the_same_files_in_one_commit(local_hub, merged, inputs, tmp_path, monkeypatch):
    """In this process against the emulator (conftest's `local_hub`), with the emulator's token as a client's
    environment has it; `merged` is the module's merge of the two local folders (zipit, 24 samples, batches of 8)."""
    a, b, calibration = inputs
    monkeypatch.setenv("HF_TOKEN", local_hub.token)
    saved = tmp_path / "saved"
    sha = hf_mudsc.push_merged(merged, "user/api-merged", private=True).commit_sha
    hf_mudsc.save_merged(merged, saved)
    with pytest.raises(FileExistsError) as caught:
        hf_mudsc.push_merged(merged, "user/api-merged")
    refused = str(caught.value)
    hub = local_hub
    assert sha == hub.head("user/api-merged") and hub.is_private("user/api-merged")
    # The commit names the repo (no output folder), not the hidden scratch folder (".hf-mudsc.partial-jqxxsd5x").
    assert [c.title for c in hub.commits("user/api-merged")] == ["Upload merged model (api-merged) with hf-mudsc",
                                                                 "initial commit"]
    assert set(hub.list_files("user/api-merged")) == MERGED_FILES | ZIPIT_PLOTS | {".gitattributes"}
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        assert hub.file_bytes("user/api-merged", name) == (saved / name).read_bytes(), name
    # The recipe names the local parents and calibration folder by folder name, as the card does; the saved one
    # keeps their paths (tests/test_hub_pushed_recipe.py).
    pushed = hub.file_bytes("user/api-merged", RECIPE_FILENAME).decode()
    assert str(a.parent) not in pushed and str(a.parent) in (saved / RECIPE_FILENAME).read_text()
    assert yaml.safe_load(pushed)["models"] == [a.name, b.name]
    card = ModelCard(hub.file_bytes("user/api-merged", "README.md").decode())
    assert card.data.base_model == ModelCard.load(saved / "README.md").data.base_model
    assert "user/api-merged" in card.content
    assert "already exists; pass overwrite=True to replace its files (in one commit), or choose another repo_id" \
        in refused
    assert not hub.unhandled and not hub.server_errors
