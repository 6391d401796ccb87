"""Hub-side corners found by the session 31 hunt: repo ids the Hub refuses, and parents that ship no card."""

from __future__ import annotations

import pytest
from cli_runs import run_cli
from factories import make_model

import hf_mudsc
from hf_mudsc.errors import RecipeError
from hf_mudsc.publish.hub import check_repo_id
from hf_mudsc.publish.recipe import Recipe

BAD_IDS = ["user/bad name", "user/x--y", "user/x..y", "user/" + "n" * 97, "user/.x"]


@pytest.mark.parametrize("repo_id", BAD_IDS)
def test_a_repo_id_the_hub_refuses_is_refused_in_our_words_before_any_hub_call(repo_id):
    """Only the `org/name` shape was checked: a space, `--`, `..`, over 96 characters reached the first Hub call and
    failed there (exit 1, after "waiting for the Hub") in huggingface_hub's words, naming no option."""
    with pytest.raises(ValueError, match=r"ORG/NAME.*(alphanumeric|--|\.\.|96)") as caught:
        check_repo_id(repo_id, flag="ORG/NAME")
    assert str(caught.value).count("\n") == 0
    with pytest.raises(RecipeError, match=r"push_to_hub= \(CLI: --push-to-hub\)"):
        Recipe(models=["a", "b"], method="linear", push_to_hub=repo_id).validate()


def test_push_and_the_dry_run_exit_2_on_such_an_id(tmp_path, capsys, monkeypatch):
    """`merge --dry-run --push-to-hub 'user/bad name'` planned and exited 0 where the merge refuses the name."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folders = []
    for seed in (1, 2):
        make_model("vit_cls", seed).save_pretrained(tmp_path / f"p{seed}")
        folders.append(str(tmp_path / f"p{seed}"))
    code, err = run_cli(["merge", *folders, "--method", "linear", "--dry-run", "--push-to-hub", "user/bad name"],
                        capsys)
    assert code == 2 and "--push-to-hub" in err[-1] and "alphanumeric" in err[-1], err
    merged = hf_mudsc.merge(folders, method="linear", progress=False)
    hf_mudsc.save_merged(merged, tmp_path / "out")
    code, err = run_cli(["push", str(tmp_path / "out"), "user/x--y"], capsys)
    assert code == 2 and "ORG/NAME" in err[-1] and "--" in err[-1], err


def test_a_hub_parent_without_a_card_is_said_to_declare_no_licence(local_hub, tmp_path):
    """Online, the Hub answers that `user/a` holds no README.md: the card said "A: its card not read", as for a card
    that could not be read (offline, a Hub error); it is known to have none."""
    for name, seed in (("a", 1), ("b", 2)):
        make_model("vit_cls", seed).save_pretrained(tmp_path / name)
        local_hub.upload_folder(f"user/{name}", tmp_path / name, f"parent {name}")
    local_hub.commit_files("user/b", {"README.md": b"---\nlicense: apache-2.0\n---\n# b\n"}, "card")
    assert "README.md" not in local_hub.list_files("user/a")
    merged = hf_mudsc.merge(["user/a", "user/b"], method="linear", progress=False)
    assert merged.config.mudsc["parent_licenses"] == [None, "apache-2.0"], merged.config.mudsc["parent_licenses"]
