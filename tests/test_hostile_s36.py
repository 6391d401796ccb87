"""Hostile inputs against the project's safety promises (s36): each test is a defect that was real, its fix the
smallest. Inputs are never modified, and what a merge refuses at once is refused before any heavy work — and by its
dry run, in the same words."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cli_runs import run_cli
from factories import make_model

import hf_mudsc


def _parents_naming_a_local_base(root: Path) -> tuple[list[str], Path]:
    """Two ViT parents whose model cards name the folder `root/base` as their base_model (as a fine-tuning script
    writes it), and that base."""
    base = root / "base"
    make_model("vit_cls", 0).save_pretrained(base)
    parents = []
    for name, seed in (("a", 1), ("b", 2)):
        make_model("vit_cls", seed).save_pretrained(root / name)
        (root / name / "README.md").write_text(f"---\nbase_model: {base}\n---\n# {name}\n")
        parents.append(str(root / name))
    return parents, base


def test_an_output_inside_the_base_the_parents_cards_name_is_refused_before_merging(tmp_path, capsys, monkeypatch):
    """merge A B --method task_arithmetic -o BASE/merged, BASE named by both cards: merged first, refused after."""
    parents, base = _parents_naming_a_local_base(tmp_path)
    monkeypatch.setattr(hf_mudsc, "merge", lambda *a, **k: pytest.fail("the merge ran before the output was refused"))
    code, err = run_cli(["merge", *parents, "--method", "task_arithmetic", "-o", str(base / "merged")], capsys)
    assert code == 1, err
    assert f"overlaps the base folder {str(base)!r}; inputs are never modified" in err[-1], err
    assert sorted(os.listdir(base)) == ["config.json", "model.safetensors"]


def test_the_dry_run_refuses_an_output_inside_the_base_the_parents_cards_name(tmp_path, capsys):
    """merge A B --method task_arithmetic -o BASE/merged --dry-run, BASE named by the cards: the plan passed it."""
    parents, base = _parents_naming_a_local_base(tmp_path)
    code, err = run_cli(["merge", *parents, "--method", "task_arithmetic", "-o", str(base / "merged"), "--dry-run"],
                        capsys)
    assert code == 1, err
    assert f"overlaps the base folder {str(base)!r}; inputs are never modified" in err[-1], err
    code, err = run_cli(["merge", *parents, "--method", "task_arithmetic", "-o", str(tmp_path / "out"), "--dry-run"],
                        capsys)
    assert code == 0, err
