"""`method="auto"` on fine-tunes of one base never returns a merge below plain averaging on any task's held-out
agreement (docs/design.md §4.9, `refit_gate.AverageCheck`): the check's wiring through `merge()` — the average
returned bit for bit as `method="linear"` gives it, recorded as such in config, recipe and card — and where it does
not run (a method the user named, parents of different inits)."""

from __future__ import annotations

import pytest
import torch
from factories import fine_tune, make_batches, make_model, with_new_head

import hf_mudsc
from hf_mudsc.apply import refit_gate
from hf_mudsc.publish.card import render_card
from hf_mudsc.publish.recipe import Recipe

pytestmark = pytest.mark.usefixtures("one_thread_module")


def fine_tunes() -> list[torch.nn.Module]:
    """Two fine-tunes of one ViT with heads of their own (2 and 3 labels): concatenated heads, tasks to compare."""
    base = make_model("vit_cls", seed=1)
    return [fine_tune(with_new_head(base, labels, seed=5 + labels), seed, 0.01, relative=True)
            for labels, seed in ((2, 2), (3, 3))]


def same(x: torch.nn.Module, y: torch.nn.Module) -> bool:
    return all(torch.equal(a, b) for a, b in zip(x.state_dict().values(), y.state_dict().values()))


def test_when_the_check_keeps_averaging_the_merge_is_the_linear_merge_and_says_so(monkeypatch, tmp_path):
    monkeypatch.setattr(refit_gate.AverageCheck, "kept", property(lambda self: True))
    parents, batches = fine_tunes(), make_batches("vit_cls", num_batches=2)
    merged = hf_mudsc.merge(parents, batches, progress=False)
    linear = hf_mudsc.merge(parents, batches, method="linear", progress=False)
    assert same(merged, linear)
    mudsc = merged.config.mudsc
    assert mudsc["method"] == "linear" and mudsc["refit"] == "none" and mudsc["refit_examples"] is None
    assert mudsc["refit_gate"]["average"]["kept"] is True
    refit = " + refit" if mudsc["refit_gate"]["kept"] else ""
    assert mudsc["method_choice_reason"].endswith(
        f"; then plain averaging (linear): regmean{refit}'s merge scored below it on the held-out examples of "
        "parent(s) " + ", ".join(chr(65 + i) for i in mudsc["refit_gate"]["average"]["lowered_tasks"]))
    assert mudsc["regmean_scale"] is None  # regmean's options are not recorded for the linear merge
    assert merged.merge_report.method == "linear"
    assert merged.merge_report.recipe["method"] == "linear" and merged.merge_report.recipe["refit"] == "none"
    again = hf_mudsc.merge(parents, batches, method=merged.merge_report.recipe["method"],
                           refit=merged.merge_report.recipe["refit"], progress=False)
    assert same(again, merged)  # the recipe re-runs the same merge
    card = " ".join(str(render_card(merged, Recipe(models=["a", "b"], calibration="c"))).split())
    assert "plain averaging (linear)" in card
    from hf_mudsc.cli.inspect import read_merge, summary

    hf_mudsc.save_merged(merged, tmp_path / "merged")
    saved, diagnostics, _ = read_merge(tmp_path / "merged")
    text = summary(tmp_path / "merged", saved, diagnostics, None, False)
    assert "then plain averaging was returned: the merge scored parent(s) " in text  # not "the gate kept the refit"


def test_the_default_records_the_check_and_keeps_its_merge_when_no_task_is_below_the_average():
    parents, batches = fine_tunes(), make_batches("vit_cls", num_batches=2)
    merged = hf_mudsc.merge(parents, batches, progress=False)
    check = merged.config.mudsc["refit_gate"]["average"]
    assert len(check["tasks"]) == 2 and isinstance(check["kept"], bool)
    assert check["merge"] == ("regmean + refit" if merged.config.mudsc["refit_gate"]["kept"] else "regmean")
    assert check["kept"] is bool(check["lowered_tasks"])
    expected = "linear" if check["kept"] else "regmean"
    assert merged.config.mudsc["method"] == expected


def test_no_check_for_a_method_the_user_named_or_for_parents_of_different_inits():
    parents, batches = fine_tunes(), make_batches("vit_cls", num_batches=2)
    named = hf_mudsc.merge(parents, batches, method="regmean", refit="gate", progress=False)
    assert "average" not in named.config.mudsc["refit_gate"]
    strangers = [with_new_head(make_model("vit_cls", seed=s), labels, seed=s) for s, labels in ((1, 2), (2, 3))]
    merged = hf_mudsc.merge(strangers, batches, progress=False)
    assert merged.config.mudsc["method"] == "mudsc" and "average" not in merged.config.mudsc["refit_gate"]
