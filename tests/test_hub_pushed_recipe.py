"""What the Hub receives as `mudsc_recipe.yaml` when a merge of local folders is pushed.

The local folder's recipe names local parents, base and calibration data by their absolute paths (it re-runs the
merge on this machine); the pushed copy names them as the card does, by folder name, with a comment at the top
listing them, so a possibly public repo does not publish the merging machine's layout (user names, run folders).
Everything else in the file is the local bytes; a recipe without local references is uploaded as it is. Re-running
the pushed copy without giving those folders' paths is one line naming each entry and how to give it.
"""

from __future__ import annotations

import functools

import pytest
import torch
import yaml
from test_cli import FAST, save_parents_and_data, tree_digest

from hf_mudsc.cli.main import main
from hf_mudsc.publish.folder import read_marker
from hf_mudsc.publish.recipe import RECIPE_FILENAME

SECRET = "hf_secretPushedRecipeTokenNeverLeaks01"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return save_parents_and_data(tmp_path_factory.mktemp("alice_runs"))


def merge_locally(*argv: str) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["merge", *argv]) == 0
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def merged(inputs, tmp_path_factory):
    a, b, calibration = inputs
    out = tmp_path_factory.mktemp("pushed_recipe") / "merged"
    merge_locally(str(a), str(b), "--calibration", str(calibration), "--output", str(out), *FAST)
    return out


@pytest.fixture()
def push_cli(hub_cli):
    """`hf-mudsc ARGV` in this process against the emulator, with this module's token (conftest's hub_cli)."""
    return functools.partial(hub_cli, token=SECRET)


def check_pushed_recipe(pushed: str, local: str, inputs, machine_paths) -> None:
    """The pushed recipe: the local file with each local folder named by its folder name, after a comment naming
    those entries; no path of this machine."""
    a, b, calibration = inputs
    for path in machine_paths:
        assert str(path) not in pushed
    assert str(a) in local and str(calibration) in local  # the local copy keeps what re-runs it here
    renamed = local.replace(str(a), a.name).replace(str(b), b.name).replace(str(calibration), calibration.name)
    assert pushed.endswith(renamed)
    added = pushed[:-len(renamed)]
    assert added and all(line.startswith("#") for line in added.splitlines())
    for entry in (f"models[0]: {a.name}", f"models[1]: {b.name}", f"calibration: {calibration.name}"):
        assert entry in added
    assert "local folders on the machine that merged" in added and "give each as a path" in added
    data = yaml.safe_load(pushed)
    assert data["models"] == [a.name, b.name] and data["calibration"] == calibration.name


def test_merge_push_to_hub_names_local_folders_by_name(push_cli, hub_emulator, inputs, tmp_path, tmp_path_factory):
    hub = hub_emulator
    a, b, calibration = inputs
    out = tmp_path / "merged"
    proc = push_cli("merge", str(a), str(b), "--calibration", str(calibration), "--output", str(out),
                   "--push-to-hub", "user/local-merge", *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pushed = hub.file_bytes("user/local-merge", RECIPE_FILENAME).decode()
    check_pushed_recipe(pushed, (out / RECIPE_FILENAME).read_text(), inputs,
                        [tmp_path, tmp_path_factory.getbasetemp(), a.parent])
    files = set(read_marker(out)["files"])
    assert set(hub.list_files("user/local-merge")) == files | {".gitattributes"}
    for name in files - {RECIPE_FILENAME}:  # every other file is the local one
        assert hub.file_bytes("user/local-merge", name) == (out / name).read_bytes(), name
    assert [c.title for c in hub.commits("user/local-merge")][1:] == ["initial commit"]  # one commit


def test_push_dir_names_local_folders_by_name_and_leaves_the_folder_as_it_was(push_cli, hub_emulator, inputs, merged,
                                                                              tmp_path_factory):
    hub = hub_emulator
    before = tree_digest(merged)
    proc = push_cli("push", str(merged), "user/pushed")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert tree_digest(merged) == before  # the folder was only read
    pushed = hub.file_bytes("user/pushed", RECIPE_FILENAME).decode()
    check_pushed_recipe(pushed, (merged / RECIPE_FILENAME).read_text(), inputs,
                        [tmp_path_factory.getbasetemp(), inputs[0].parent])
    # The card's copy of the recipe is the same recipe as the pushed file (one place decides how a local folder
    # is shown).
    card = hub.file_bytes("user/pushed", "README.md").decode()
    block = card.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(block) == yaml.safe_load(pushed)
    assert SECRET not in proc.stdout + proc.stderr


def test_overwrite_replaces_stale_files_in_one_commit_with_the_renamed_recipe(push_cli, hub_emulator, inputs, merged):
    hub = hub_emulator
    hub.commit_files("user/taken", {"old-weights.bin": b"\0old", "plots/old.png": b"png",
                                    RECIPE_FILENAME: b"models: [x/y, x/z]\n"}, "old")
    before = len(hub.commits("user/taken"))
    proc = push_cli("push", str(merged), "user/taken", "--overwrite")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(hub.commits("user/taken")) == before + 1
    assert set(hub.list_files("user/taken")) == set(read_marker(merged)["files"]) | {".gitattributes"}
    pushed = hub.file_bytes("user/taken", RECIPE_FILENAME).decode()
    assert str(inputs[0].parent) not in pushed and yaml.safe_load(pushed)["models"] == ["vit-a", "vit-b"]


def test_a_recipe_without_local_folders_is_uploaded_as_it_is(push_cli, hub_emulator, inputs, tmp_path):
    hub = hub_emulator
    a, b, _ = inputs
    hub.upload_folder("user/a", a, "parent A")
    hub.upload_folder("user/b", b, "parent B")
    out = tmp_path / "hub-merge"
    proc = push_cli("merge", "user/a", "user/b", "--method", "weight_matching", "--output", str(out),
                   "--push-to-hub", "user/hub-merge")
    assert proc.returncode == 0, proc.stderr[-3000:]
    local = (out / RECIPE_FILENAME).read_bytes()
    assert f"user/a@{hub.head('user/a')}".encode() in local
    assert hub.file_bytes("user/hub-merge", RECIPE_FILENAME) == local


def test_rerunning_a_pushed_recipe_asks_for_the_local_folders_paths(push_cli, hub_emulator, inputs, merged, tmp_path,
                                                                     capsys, monkeypatch):
    hub = hub_emulator
    a, b, calibration = inputs
    proc = push_cli("push", str(merged), "user/rerun")
    assert proc.returncode == 0, proc.stderr[-3000:]
    downloaded = tmp_path / RECIPE_FILENAME
    downloaded.write_bytes(hub.file_bytes("user/rerun", RECIPE_FILENAME))
    monkeypatch.chdir(tmp_path)  # no folder named like the parents here
    out = tmp_path / "again"
    assert main(["merge", "--recipe", str(downloaded), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("hf-mudsc merge: error: "), err
    for entry in ("models[0] `vit-a`", "models[1] `vit-b`", "calibration `calibration`"):
        assert entry in err
    assert "local folder" in err and "path" in err and not out.exists()
    # The parents' paths given, the calibration still missing: only that entry is named.
    assert main(["merge", str(a), str(b), "--recipe", str(downloaded), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "calibration `calibration`" in err and "models[" not in err and "--calibration" in err
    # Every path given: the pushed recipe re-runs the merge, to the same weights.
    merge_locally(str(a), str(b), "--recipe", str(downloaded), "--calibration", str(calibration), "--output",
                  str(out))
    assert (out / "model.safetensors").read_bytes() == (merged / "model.safetensors").read_bytes()


def test_a_pushed_recipe_whose_entries_were_written_over_keeps_no_refusal(tmp_path, monkeypatch):
    """The pushed comment says "give each as a path ... or write them here": a user who writes Hub ids into the file
    (the comment left on top) must not be refused — the check compares each entry with the name the comment lists,
    not with the file's own value. An entry still holding the listed name is refused, naming only it."""
    from hf_mudsc.errors import RecipeError
    from hf_mudsc.publish.recipe import Recipe, check_local_folders_given, published_text

    here = tmp_path / "alice" / "runs"
    for name in ("vit-a", "vit-b", "digits"):
        (here / name).mkdir(parents=True)
    local = Recipe(models=[str(here / "vit-a"), str(here / "vit-b")], calibration=str(here / "digits") + ":train",
                   method="mudsc").to_yaml()
    pushed = published_text(local)
    monkeypatch.chdir(tmp_path)  # no folder named like the entries here
    edited = (pushed.replace("\n- vit-a\n", "\n- org/vit-a\n").replace("\n- vit-b\n", "\n- org/vit-b\n")
              .replace("\ncalibration: digits:train\n", "\ncalibration: org/digits:train\n"))
    assert edited.count("org/") == 3 and edited.startswith("#")
    path = tmp_path / RECIPE_FILENAME
    path.write_text(edited)
    loaded = Recipe.load(path)
    check_local_folders_given(path, loaded)  # every entry written over: nothing to refuse
    path.write_text(edited.replace("\n- org/vit-b\n", "\n- vit-b\n"))
    loaded = Recipe.load(path)
    with pytest.raises(RecipeError, match=r"models\[1\] `vit-b`") as refused:
        check_local_folders_given(path, loaded)
    assert "models[0]" not in str(refused.value) and "calibration" not in str(refused.value)


def test_inspect_says_which_entries_of_a_pushed_recipe_must_be_given(tmp_path, monkeypatch, capsys):
    """`hf-mudsc inspect RECIPE` printed "would merge: vit-a, vit-b" and "Run it with ..." for a pushed recipe whose
    parents were local folders named by folder name only — a run it would refuse. It names those entries and the
    command that gives them."""
    from hf_mudsc.publish.recipe import Recipe, published_text

    here = tmp_path / "alice"
    for name in ("vit-a", "vit-b"):
        (here / name).mkdir(parents=True)
    path = tmp_path / "pushed" / RECIPE_FILENAME
    path.parent.mkdir()
    path.write_text(published_text(Recipe(models=[str(here / "vit-a"), "org/vit-b"], method="weight_matching")
                                   .to_yaml()))
    monkeypatch.chdir(path.parent)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "models[0] `vit-a`" in out and "models[1]" not in out, out
    assert f"Run it with `hf-mudsc merge PATH_A org/vit-b --recipe {path} --output DIR`" in out, out
