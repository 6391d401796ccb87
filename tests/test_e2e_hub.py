"""End to end through the local Hub emulator: Hub parents -> `hf-mudsc merge --push-to-hub` -> stock loading.

The first test's merge and push run as a real `hf-mudsc` process whose environment points at the emulator (the
client reads HF_ENDPOINT at import; see tests/hub_emulator.py). The loading, the recipe's re-run and the other
tests' commands run in this process against the same emulator (conftest's `local_hub`: the client's constants
pointed at it; `hub_cli`: stderr as a process writes it), sparing a new interpreter and a second torch import each.
The emulator in this process shows what the Hub received. OMP_NUM_THREADS=1 (and one torch thread here): on a busy
2-core machine OpenMP start-up, not arithmetic, dominates these tiny merges.
"""

from __future__ import annotations

import functools
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from factories import make_model
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from test_cli import leftovers, save_parents_and_data, tree_digest
from transformers import AutoModelForImageClassification

import hf_mudsc
from hf_mudsc.publish.folder import read_marker
from hf_mudsc.publish.hub import pushed_card
from hf_mudsc.publish.recipe import RECIPE_FILENAME, Recipe
from hf_mudsc.solve.diagnostics import DIAGNOSTICS_FILENAME, PLOTS_FOLDER

SECRET = "hf_secretE2eTokenThatMustNeverLeak0123"
FAST = ["--method", "zipit", "--num-samples", "16", "--batch-size", "8"]
MERGED_FILES = {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", RECIPE_FILENAME}


def written(folder: Path) -> set[str]:
    """Every file hf-mudsc wrote into a merged folder (its marker): the model files, the diagnostics and the plots."""
    files = set(read_marker(folder)["files"])
    assert MERGED_FILES | {DIAGNOSTICS_FILENAME, f"{PLOTS_FOLDER}/match_quality.png"} <= files
    return files


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return save_parents_and_data(tmp_path_factory.mktemp("e2e_inputs"))


@pytest.fixture()
def hub(hub_emulator, inputs):
    """The emulator with the parents pushed; user/b's main moved past the pinned commit to prove pinning."""
    a, b, _ = inputs
    hub_emulator.upload_folder("user/a", a, "parent A")
    hub_emulator.upload_folder("user/b", b, "parent B")
    hub_emulator.pinned_b = hub_emulator.head("user/b")
    other = make_model("vit_cls", 7)
    other.config.id2label = {0: "x", 1: "y", 2: "z"}
    other.config.label2id = {"x": 0, "y": 1, "z": 2}
    newer = a.parent / "vit-b-newer"
    other.save_pretrained(newer)
    hub_emulator.commit_files("user/b", {"model.safetensors": newer / "model.safetensors"}, "retrained B")
    return hub_emulator


def run_cli(hub, *argv: str, token: str | None = SECRET) -> subprocess.CompletedProcess:
    env = hub.client_env(token=token, extra={"OMP_NUM_THREADS": "1"})
    return subprocess.run([sys.executable, "-m", "hf_mudsc", "-vv", *argv], env=env, capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)


@pytest.fixture()
def cli_here(hub_cli):
    """`hf-mudsc ARGV` in this process against the emulator with this module's token (conftest's `hub_cli`): the exit
    code, stdout, and stderr as a process of its own writes it."""
    return functools.partial(hub_cli, token=SECRET)


def logits_of(model, seed: int = 0) -> torch.Tensor:
    with torch.no_grad():
        pixels = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(seed))
        return model(pixel_values=pixels).logits


def test_merge_hub_parents_push_load_and_rerun_the_pushed_recipe(hub, inputs, tmp_path, cli_here, capsys):
    a, b, calibration = inputs
    before = tree_digest(a, b, calibration)
    heads = (hub.head("user/a"), hub.head("user/b"))
    out = tmp_path / "merged"
    proc = run_cli(hub, "merge", "user/a", f"user/b@{hub.pinned_b}", "--calibration", str(calibration),
                   "--output", str(out), "--num-samples", "24", "--push-to-hub", "user/merged", "--private")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Pushed to" in proc.stdout and "Merged model written to" in proc.stdout

    # One commit holding model, processor, card and recipe — the same bytes as the local output, but for the
    # recipe's local calibration folder (below).
    assert [c.title for c in hub.commits("user/merged")][1:] == ["initial commit"]
    assert set(hub.list_files("user/merged")) == written(out) | {".gitattributes"}
    for name in written(out) - {RECIPE_FILENAME}:
        assert hub.file_bytes("user/merged", name) == (out / name).read_bytes(), name
    assert hub.is_private("user/merged") and hub.is_lfs("user/merged", "model.safetensors")

    # The recipe pins both parents to the commits used (B at the older sha, not main).
    recipe = Recipe.from_dict(yaml.safe_load(hub.file_bytes("user/merged", RECIPE_FILENAME)))
    assert recipe.models == [f"user/a@{heads[0]}", f"user/b@{hub.pinned_b}"] and heads[1] != hub.pinned_b

    # The card validates, names both parents as a merge, and holds the recipe.
    card = ModelCard(hub.file_bytes("user/merged", "README.md").decode())
    assert card.data.base_model == ["user/a", "user/b"] and card.data.base_model_relation == "merge"
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-classification"
    assert "the parents are pinned to the commits that were used" in " ".join(card.content.split())  # Hub parents
    block = re.search(r"```yaml\n(.*?)```", card.content, re.S).group(1)
    # The card and the pushed recipe show the local calibration folder by name (no machine paths); the local
    # recipe file keeps the path.
    assert Recipe.from_dict(yaml.safe_load(block)) == recipe and recipe.calibration == calibration.name
    assert str(calibration) not in card.content
    assert Recipe.load(out / RECIPE_FILENAME) == recipe.override(calibration=str(calibration))
    assert hub.requests_for("validate_yaml")

    # Stock transformers loads it from the Hub; the same client re-runs the pushed recipe (given the local
    # calibration folder's path, which the pushed file names by folder name only).
    from huggingface_hub import hf_hub_download

    again = tmp_path / "again"
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_TOKEN", SECRET)
        pulled = AutoModelForImageClassification.from_pretrained("user/merged")
        recipe_file = hf_hub_download("user/merged", RECIPE_FILENAME)
    loading = capsys.readouterr()
    res = cli_here("merge", "--recipe", recipe_file, "--calibration", str(calibration), "--output", str(again))
    assert type(pulled).__name__ == "ViTForImageClassification" and res.returncode == 0, res.stderr[-4000:]
    local = logits_of(AutoModelForImageClassification.from_pretrained(out))
    torch.testing.assert_close(logits_of(pulled), local, rtol=1e-6, atol=1e-6)  # other threads

    first, second = load_file(out / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)

    # The pinned B (not main's retrained B) was merged: same function as merging the local folders.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = hf_mudsc.merge([str(a), str(b)], str(calibration), num_samples=24, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert torch.allclose(logits_of(expected), local, atol=1e-6, rtol=0)

    # Inputs untouched; the token appears in no log line, file or request body / URL.
    assert tree_digest(a, b, calibration) == before and (hub.head("user/a"), hub.head("user/b")) == heads
    assert SECRET not in proc.stdout + proc.stderr + loading.out + loading.err + res.stdout + res.stderr
    assert "DEBUG" in proc.stderr  # -vv really logged (so the check above covers debug lines)
    for folder in (out, again):
        for path in folder.rglob("*"):
            assert path.is_dir() or SECRET.encode() not in path.read_bytes(), path
    assert not hub.find_in_requests(SECRET, where=("body", "url"))
    assert hub.find_in_requests(SECRET, where=("headers",))  # ... while it did authenticate the calls
    assert not hub.unhandled and not hub.server_errors


def test_a_failed_commit_leaves_no_repo_and_keeps_the_output_folder(hub, inputs, tmp_path, cli_here):
    a, b, calibration = inputs
    hub.fail_next("commit", status=500, repo_id="user/merged", message="storage is down")
    work = tmp_path / "work"
    work.mkdir()
    out = work / "merged"
    proc = cli_here("-vv", "merge", "user/a", "user/b", "--calibration", str(calibration), "--output", str(out),
                    "--push-to-hub", "user/merged", *FAST)
    assert proc.returncode == 1
    assert "nothing was committed; the repo 'user/merged' created by this run was deleted" in proc.stderr
    assert not hub.repo_exists("user/merged") and hub.requests_for("commit", "user/merged")
    assert f"the merged model is kept in {out}; push it with `hf-mudsc push {out} user/merged`" in proc.stderr
    assert MERGED_FILES <= {p.name for p in out.iterdir()} and [p.name for p in work.iterdir()] == ["merged"]
    assert SECRET not in proc.stdout + proc.stderr
    assert not hub.pending_faults() and not hub.server_errors


def test_existing_repos_are_refused_and_overwrite_replaces_them_in_one_commit(hub, inputs, tmp_path, cli_here):
    a, b, calibration = inputs
    from hf_mudsc.cli.main import main

    folder = tmp_path / "local-merge"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["merge", str(a), str(b), "--calibration", str(calibration), "--output", str(folder),
                     *FAST]) == 0
    finally:
        torch.set_num_threads(threads)
    hub.commit_files("user/taken", {"old-weights.bin": b"\0old", "README.md": b"# someone's model\n"}, "old")
    taken_head = hub.head("user/taken")
    refused_out = tmp_path / "refused"
    scratch = tmp_path / "scratch"  # the client's TMPDIR: a push without --output stages its folder here
    scratch.mkdir()
    runs = [cli_here(*argv, extra={"TMPDIR": str(scratch)}) for argv in (
        ["merge", "user/a", "user/b", "--calibration", str(calibration), "--output", str(refused_out),
         "--push-to-hub", "user/taken", *FAST],
        ["push", str(folder), "user/pushed", "--private"],
        ["push", str(folder), "user/pushed"],
        ["push", str(folder), "user/taken", "--overwrite", "--private"],
        ["merge", "user/a", "user/b", "--calibration", str(calibration), "--push-to-hub", "user/hub-only", *FAST])]
    res = subprocess.CompletedProcess("hf-mudsc", 0, "".join(run.stdout for run in runs),
                                      "".join(run.stderr for run in runs))
    assert [run.returncode for run in runs] == [1, 0, 1, 0, 0], res.stderr[-4000:]
    assert res.stderr.count("already exists; pass --overwrite") == 2
    # Refused before any work: no output, and the parents were never even looked up.
    # (the only requests for user/a come from the last, hub-only merge, after the pushes' commits)
    order = [(r.op, r.repo_id) for r in hub.requests]
    first_parent_request = next(i for i, (_, repo) in enumerate(order) if repo == "user/a")
    assert first_parent_request > order.index(("commit", "user/taken"))
    assert not refused_out.exists() and leftovers(tmp_path) == []
    # `push` made one commit with every file, private as asked; the second push changed nothing.
    assert [c.title for c in hub.commits("user/pushed")][1:] == ["initial commit"]
    assert set(hub.list_files("user/pushed")) == written(folder) | {".gitattributes"}
    assert hub.is_private("user/pushed")
    # --overwrite replaced the old repo's files, stale ones included, in a single commit.
    log = hub.commits("user/taken")
    assert len(log) == 3 and log[1].oid == taken_head
    assert set(hub.list_files("user/taken")) == written(folder) | {".gitattributes"}
    assert hub.is_private("user/taken")  # --private on an existing public repo makes it private
    # the card as written, its usage snippet loading from the repo pushed to (`hub.pushed_card`)
    assert hub.file_bytes("user/taken", "README.md").decode() == pushed_card((folder / "README.md").read_text(),
                                                                             "user/taken")
    # Without --output the merge is staged in a temporary folder, pushed, and the folder removed.
    assert set(hub.list_files("user/hub-only")) == written(folder) | {".gitattributes"}
    assert [p for p in scratch.iterdir() if "hf-mudsc" in p.name] == []
    assert SECRET not in res.stdout + res.stderr and not hub.find_in_requests(SECRET, where=("body", "url"))
    assert not hub.unhandled and not hub.server_errors

