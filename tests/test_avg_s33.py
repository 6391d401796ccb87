"""Defects of the averaging check, the refit gate's per-task guard and `auto`'s memory check around them (session 33,
the s33 avg hunt): each reproduced here first."""

from __future__ import annotations

import copy

import pytest
import torch
from factories import fine_tune, make_batches, make_model

import hf_mudsc

pytestmark = pytest.mark.usefixtures("one_thread_module")


def named_labels(model: torch.nn.Module, labels: list[str]) -> torch.nn.Module:
    model = copy.deepcopy(model)
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {label: index for index, label in enumerate(labels)}
    return model


def fine_tunes_of_one_base(count: int) -> list[torch.nn.Module]:
    """`count` fine-tunes of one toy ViT with label sets of their own (a concatenated head): what `auto` merges with
    regmean, confirmed by mudsc's solve, and holds against plain averaging."""
    base = make_model("vit_cls", 0)
    return [named_labels(fine_tune(base, seed=seed, scale=0.01), [f"{seed}-{i}" for i in range(3)])
            for seed in range(1, count + 1)]


def test_auto_checks_the_memory_of_every_parents_solve_when_the_pair_check_overturns(monkeypatch):
    """With more than two parents `auto`'s correspondence check solves one pair (its memory checked for two); when
    that solve says the units moved, mudsc merges every parent — its statistics, 9/4 of the pair's for three, were
    never held against the memory available: a merge that fit by the check ran out of memory in calibration. Now
    refused in one line, before that pass, naming auto's choice and the most parents that fit."""
    import hf_mudsc.calibrate.distributed as distributed
    import hf_mudsc.methods.auto as auto
    import hf_mudsc.plan as plan
    from hf_mudsc.errors import MergeInputError
    from hf_mudsc.methods.registry import METHODS

    parents = fine_tunes_of_one_base(3)
    model = parents[0]
    pair = sum(plan.memory_floor(model, 2, METHODS["mudsc"], loading=0).values())
    three = sum(plan.memory_floor(model, 3, METHODS["mudsc"], loading=0).values())
    regmean = sum(plan.memory_floor(model, 3, METHODS["regmean"], loading=0).values())
    available = int(max(pair, regmean) * 1.05)
    assert available < three  # regmean and the pair's check fit; every parent's solve does not
    monkeypatch.setattr(plan, "available_memory", lambda: available)
    monkeypatch.setattr(auto, "IN_PLACE_MAJORITY", 1.5)  # every solve "moves" units: the pair's check overturns
    passes = []
    real = distributed.collect_statistics_distributed
    monkeypatch.setattr(distributed, "collect_statistics_distributed",
                        lambda *args, **kwargs: passes.append(len(kwargs.get("others") or ())) or real(*args, **kwargs))
    with pytest.raises(MergeInputError) as caught:
        hf_mudsc.merge(parents, make_batches("vit_cls", num_batches=3, batch_size=8), progress=False)
    message = str(caught.value)
    assert "\n" not in message, message
    assert message.startswith("method 'auto' chose 'mudsc' (") and "merging 3 parents with mudsc" in message, message
    assert "merge at most 2 parents at a time" in message, message
    assert passes == [0], passes  # the pair's statistics were read; every parent's were not


def test_averaging_returned_after_auto_kept_the_solve_describes_the_average_not_the_solve(monkeypatch, tmp_path):
    """`auto` on fine-tunes of one base whose units do not correspond merges by mudsc's solve (alpha="auto" searched
    it); when the averaging check then returns plain averaging, the record kept the solve's: its match values, starts,
    size budget, α curve and statistics dtype in config.mudsc, its matches and diagnostics in the report — so the
    card showed "Match quality per layer" and solver sweeps for a linear merge, its warnings the solve's
    rank-deficient correlations, and `inspect` said "method auto kept that solve's merge" above "method: linear".
    The returned merge is now recorded as `method="linear"` records it (the path that chose it stays: the reason,
    the correspondence check, the gate)."""
    import hf_mudsc.methods.auto as auto
    from hf_mudsc.apply import refit_gate
    from hf_mudsc.cli.inspect import read_merge, summary
    from hf_mudsc.publish.card import render_card
    from hf_mudsc.publish.recipe import Recipe

    parents, batches = fine_tunes_of_one_base(2), make_batches("vit_cls", num_batches=4, batch_size=8)
    linear = hf_mudsc.merge(parents, batches, method="linear", progress=False)
    monkeypatch.setattr(auto, "IN_PLACE_MAJORITY", 1.5)  # the solve "moves" units: auto keeps mudsc's merge
    monkeypatch.setattr(refit_gate.AverageCheck, "kept", property(lambda self: True))
    merged = hf_mudsc.merge(parents, batches, alpha="auto", progress=False)
    mudsc = merged.config.mudsc
    assert mudsc["method"] == "linear" and mudsc["correspondence_check"]["holds"] is False
    assert mudsc["refit_gate"]["average"]["merge"].startswith("mudsc")
    for key in ("group_match_values", "start_objectives", "solve_start", "size_budget", "alpha_auto",
                "statistics_dtype", "alpha", "matcher"):
        assert mudsc[key] == linear.config.mudsc[key], (key, mudsc[key])
    assert not any("rank-deficient" in text for text in mudsc["warnings"]), mudsc["warnings"]
    report = merged.merge_report
    assert report.diagnostics is None and not report.matches and not report.group_values and not report.sweeps
    card = " ".join(str(render_card(merged, Recipe(models=["a", "b"], calibration="c"))).split())
    assert "Match quality per layer" not in card and "Solver sweeps" not in card, card
    hf_mudsc.save_merged(merged, tmp_path / "merged")
    saved, diagnostics, _ = read_merge(tmp_path / "merged")
    text = summary(tmp_path / "merged", saved, diagnostics, None, False)
    assert "  method:    linear" in text and "solve:" not in text, text
    assert "so method auto kept that solve's merge, then plain averaging replaced it" in text, text


def test_inspect_of_a_recipes_rerun_says_plain_averaging_replaced_autos_choice(monkeypatch, tmp_path):
    """Re-running the recipe of a merge where the averaging check returned plain averaging runs `method: linear`
    and restates auto's reason and correspondence check (`restate_auto_choices`), but no gate runs there: `inspect`
    of the re-run said "they correspond, so method auto kept the same-base method" above "method: linear", nothing
    of the average. A correspondence check only ever leads to the same-base data method or the solve's own, never to
    linear, so a recorded `linear` beside it is the average that replaced it, and inspect says so."""
    import datasets
    import numpy as np
    from PIL import Image
    from transformers import ViTImageProcessor

    from hf_mudsc.apply import refit_gate
    from hf_mudsc.cli.inspect import read_merge, summary
    from hf_mudsc.cli.main import main

    processor = ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5], image_std=[0.5])
    folders = []
    for index, parent in enumerate(fine_tunes_of_one_base(2)):
        parent.save_pretrained(tmp_path / f"p{index}")
        processor.save_pretrained(tmp_path / f"p{index}")
        folders.append(str(tmp_path / f"p{index}"))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), mode="L") for _ in range(30)]
    datasets.Dataset.from_dict({"image": images}).cast_column("image", datasets.Image()).save_to_disk(
        tmp_path / "calibration")
    monkeypatch.setattr(refit_gate.AverageCheck, "kept", property(lambda self: True))
    assert main(["merge", *folders, "--calibration", str(tmp_path / "calibration"), "--output",
                 str(tmp_path / "merged"), "-q"]) == 0
    assert main(["merge", "--recipe", str(tmp_path / "merged" / "mudsc_recipe.yaml"), "--output",
                 str(tmp_path / "again"), "-q"]) == 0
    texts = {}
    for name in ("merged", "again"):
        saved, diagnostics, _ = read_merge(tmp_path / name)
        assert saved["method"] == "linear"
        texts[name] = summary(tmp_path / name, saved, diagnostics, None, False)
    assert saved["refit_gate"] is None  # the re-run ran no gate: its record cannot say it
    for text in texts.values():
        assert ("they correspond, so method auto kept the same-base method, then plain averaging replaced it"
                in text), text


def test_the_average_held_against_autos_merge_is_plain_averaging_whatever_normalize_says(monkeypatch):
    """`normalize=False` — which the merge says regmean (auto's choice) does not read, "it has no effect" — reached
    the averaging check's linear merge: the "plain average" held against regmean was the parents' weighted SUM (every
    tensor doubled for two parents), a baseline no merge scores below, and when returned it was that sum, recorded
    as plain averaging. The check's average divides by the weights' sum (normalize=True), is recorded so, and the
    recipe re-runs it."""
    from hf_mudsc.apply import refit_gate

    parents, batches = fine_tunes_of_one_base(2), make_batches("vit_cls", num_batches=4, batch_size=8)
    linear = hf_mudsc.merge(parents, batches, method="linear", progress=False)
    scored = []
    real = refit_gate.AverageCheck.__init__

    def record(self, score, tasks, lowered):
        scored.append(score)
        real(self, score, tasks, lowered)

    monkeypatch.setattr(refit_gate.AverageCheck, "__init__", record)
    default = hf_mudsc.merge(parents, batches, progress=False)
    unnormalized = hf_mudsc.merge(parents, batches, normalize=False, progress=False)
    assert scored[0] == scored[1]  # the same average scored: normalize= changes nothing of auto's merge
    assert default.config.mudsc["refit_gate"]["average"] == unnormalized.config.mudsc["refit_gate"]["average"]
    monkeypatch.setattr(refit_gate.AverageCheck, "kept", property(lambda self: True))
    merged = hf_mudsc.merge(parents, batches, normalize=False, progress=False)
    assert merged.config.mudsc["method"] == "linear" and merged.config.mudsc["normalize"] is True
    assert all(torch.equal(a, b) for a, b in zip(merged.state_dict().values(), linear.state_dict().values()))
    recipe = merged.merge_report.recipe
    again = hf_mudsc.merge(parents, batches, method=recipe["method"], refit=recipe["refit"],
                           normalize=recipe["normalize"], progress=False)
    assert all(torch.equal(a, b) for a, b in zip(merged.state_dict().values(), again.state_dict().values()))
    from hf_mudsc.publish.recipe import Recipe, pinned_choices

    # the CLI writes the recipe it was given with auto's choices pinned: normalize among them
    written = pinned_choices(Recipe(models=["a", "b"], calibration="c", normalize=False), merged)
    assert (written.method, written.refit, written.normalize) == ("linear", "none", True)
