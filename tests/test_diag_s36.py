"""The figures a merge reports about itself (report, card, config.mudsc, dry run, inspect, plots) against an
independent computation on tiny models (session 36's diagnostics hunt)."""

from __future__ import annotations

import re

import pytest
from cli_runs import run_cli_output
from factories import KINDS, fine_tune, make_batches, make_model

import hf_mudsc
from hf_mudsc.architectures import spec_for
from hf_mudsc.calibrate.statistics import collect_statistics
from hf_mudsc.plan import group_tokens_per_example, tokens_per_example
from hf_mudsc.publish.plots import draw_plots

pytestmark = pytest.mark.usefixtures("one_thread_module")


def _size_warning(texts) -> list[str]:
    return [text for text in texts if text.startswith("calibration too small")]


def test_the_dry_run_warns_of_too_little_data_as_the_merge_does():
    """merge(3 vit_cls, 64 examples, dry_run=True) said nothing, the merge then warned 'residual saw 64 rows, fewer
    than the 96 units': the plan counted the classifier's input (the class token) at 17 rows per example."""
    models = [make_model("vit_cls", seed, 3) for seed in (1, 2, 3)]
    batches = make_batches("vit_cls", 4, 16)
    plan = hf_mudsc.merge(models, batches, method="mudsc", refit="none", dry_run=True, progress=False)
    merged = hf_mudsc.merge(models, batches, method="mudsc", refit="none", progress=False)
    said = _size_warning(merged.config.mudsc["warnings"])
    assert said and "'residual'" in said[0], merged.config.mudsc["warnings"]
    assert _size_warning(plan.warnings) == said, plan.warnings


@pytest.mark.parametrize("kind", KINDS)
def test_the_dry_run_counts_the_rows_each_group_reads(kind):
    """The plan's calibration rows per example of each group (its size warning and time estimate) against what the
    statistics count: a group read at the first token or a pooled output sees one row per example per hook, not one
    per token (ViT's classifier input, BERT's pooler, CLIP's projections)."""
    model_a, model_b = make_model(kind, 1, 3), make_model(kind, 2, 3)
    spec = spec_for(model_a)
    batches = make_batches(kind, 2, 8)
    counts = [acc.count for acc in collect_statistics(model_a, model_b, spec, batches, progress=False)]
    planned = group_tokens_per_example(spec, tokens_per_example(model_a.config)[0])
    for group, count, tokens in zip(spec.groups, counts, planned):
        hooks = len(group.hooks)
        if count == 16 * hooks:  # one row per example per hook
            assert tokens == hooks, (group.name, count, tokens)
        elif "input_ids" in spec.inputs:  # text: the padding is dropped, the plan assumes a length
            assert tokens * 16 >= count > 16 * hooks, (group.name, count, tokens)
        else:
            assert tokens * 16 == count, (group.name, count, tokens)


def test_a_size_budget_leaves_the_figures_of_groups_it_did_not_widen_alone():
    """merge(vit_cls 1 and 2, size=1.5) showed the residual's fused pairs at weight correlation 0.123 against 0.170
    at size 1, with the same residual match: the diagnostics mapped the MLP axes by the widened matches, not by the
    matches the solve computed its similarity at ("blended: the similarity the units were matched on")."""
    models = [make_model("vit_cls", seed, 3) for seed in (1, 2)]
    batches = make_batches("vit_cls", 4, 16)
    reports = [hf_mudsc.merge(models, batches, method="mudsc", refit="none", size=size, progress=False).merge_report
               for size in (1.0, 1.5)]
    plain, widened = (report.diagnostics for report in reports)
    for name in ("residual", "vit.layers.0.attention.qk", "vit.layers.1.attention.v"):  # not widened
        assert reports[0].matches[reports[0].group_names.index(name)].same_as(
            reports[1].matches[reports[1].group_names.index(name)]), name
        before, after = plain.group(name), widened.group(name)
        assert (after.weight, after.activation, after.blended, after.cross_fraction) == (
            before.weight, before.activation, before.blended, before.cross_fraction), name
    # the widened MLP groups show the merged model: every unit kept unfused, so no A-B pair to score
    assert widened.group("vit.layers.0.mlp").cross_fraction == 0.0
    assert widened.group("vit.layers.0.mlp").blended is None


def test_inspect_shows_and_draws_the_alpha_auto_curve_of_a_three_parent_merge(tmp_path, capsys):
    """hf-mudsc inspect of a 3-parent merge with alpha='auto' said 'alpha 0.9' as if given and drew no fidelity curve,
    though config.json records it (the card shows it): three parents have no merge_diagnostics.json to draw from."""
    models = [make_model("vit_cls", seed, 3) for seed in (1, 2, 3)]
    merged = hf_mudsc.merge(models, make_batches("vit_cls", 4, 16), method="mudsc", alpha="auto", refit="none",
                            progress=False)
    curve = merged.config.mudsc["alpha_auto"]
    assert curve["returned_fidelity"] is not None
    folder = tmp_path / "merged"
    hf_mudsc.save_merged(merged, folder)
    code, out, err = run_cli_output(["inspect", str(folder), "--output", str(tmp_path / "plots")], capsys)
    assert code == 0, err
    assert (tmp_path / "plots" / "alpha_fidelity.png").is_file(), out
    line = next(line for line in out.splitlines() if "alpha" in line and "auto" in line)
    assert f"{curve['chosen']:g}" in line and f"{max(curve['fidelity']):.3f}" in line, line


def test_the_dry_run_of_alpha_auto_counts_the_rows_the_statistics_read():
    """merge(2 vit_cls, 70 examples, alpha='auto', dry_run=True) said nothing, the merge then warned 'residual saw 56
    rows, fewer than the 64 units': the α search holds every 5th example out of the statistics, the plan counted 70."""
    models = [make_model("vit_cls", seed, 3) for seed in (1, 2)]
    batches = make_batches("vit_cls", 5, 14)
    plan = hf_mudsc.merge(models, batches, method="mudsc", alpha="auto", refit="none", dry_run=True, progress=False)
    merged = hf_mudsc.merge(models, batches, method="mudsc", alpha="auto", refit="none", progress=False)
    said = _size_warning(merged.config.mudsc["warnings"])
    assert said and "saw 56 rows" in said[0], merged.config.mudsc["warnings"]
    assert _size_warning(plan.warnings) == said, plan.warnings


def _gate_figures(text: str) -> tuple[float, float]:
    found = re.search(r"agreement (-?[\d.]+) with(?: it)?, (-?[\d.]+) without", text)
    assert found, text
    return float(found.group(1)), float(found.group(2))


def test_the_gate_scores_shown_say_why_the_refit_was_dropped(tmp_path, capsys):
    """merge(two fine-tunes of one base, default method auto) recorded the refit at -0.856132 against -0.856065 and
    dropped it, while the card and inspect showed '-0.8561 with, -0.8561 without': a tie, which the gate keeps."""
    base = make_model("vit_cls", 1, 3)
    parents = [fine_tune(base, seed, 0.05, relative=True) for seed in (2, 3)]
    merged = hf_mudsc.merge(parents, make_batches("vit_cls", 4, 16), progress=False)
    gate = merged.config.mudsc["refit_gate"]
    assert gate["kept"] is False and gate["refit"] < gate["none"], gate
    folder = tmp_path / "merged"
    hf_mudsc.save_merged(merged, folder)
    row = next(line for line in (folder / "README.md").read_text().splitlines() if line.startswith("| Refit"))
    code, out, err = run_cli_output(["inspect", str(folder), "--no-plots"], capsys)
    assert code == 0, err
    shown = next(line for line in out.splitlines() if line.strip().startswith("refit:"))
    for text in (row, shown):
        refit, none = _gate_figures(text)
        assert refit < none and refit == pytest.approx(gate["refit"], abs=1e-4), text
        assert none == pytest.approx(gate["none"], abs=1e-4), text


def test_a_refit_dropped_at_scores_equal_as_recorded_says_it_scored_lower():
    """A permuted copy's refit scored -0.8461792322074411 against -0.8461792322072851 and was dropped; both were
    recorded and shown as -0.846179 / -0.8462, a tie, which the gate keeps: the card and inspect now say why."""
    from hf_mudsc.options import gate_scores, gate_tie_note

    tied = {"kept": False, "refit": -0.846179, "none": -0.846179}
    assert gate_tie_note(tied) and not gate_tie_note({**tied, "kept": True})
    assert not gate_tie_note({**tied, "refit": -0.85})
    assert gate_scores(-0.846179, -0.846179) == ("-0.8462", "-0.8462")
    assert gate_scores(-0.856132, -0.856065) == ("-0.85613", "-0.85606")
    assert gate_scores(-0.1234561, -0.1234559) == ("-0.123456", "-0.123456")  # 6 recorded: no more shown


def test_a_head_pair_kept_apart_by_the_size_budget_is_not_shown_as_merged(tmp_path):
    """merge(vit_cls 1 and 2, size=1.6, size_spend='heads') kept one head pair per block unfused, yet the diagnostics
    (and the head plot: 'the head of B merged with each head of A') still named its B head as merged with the A head."""
    models = [make_model("vit_cls", seed, 3) for seed in (1, 2)]
    report = hf_mudsc.merge(models, make_batches("vit_cls", 4, 16), method="mudsc", refit="none", size=1.6,
                            size_spend="heads", progress=False).merge_report
    spec = spec_for(models[0])
    for index, group in enumerate(spec.groups):
        if group.num_heads == 1:
            continue
        found, shown = report.matches[index], report.diagnostics.group(group.name).head_pairing
        d = group.width // group.num_heads
        cluster = found.cluster_of.tolist()
        for head, partner in enumerate(found.head_pairing):
            blocks_a = {cluster[u] // d for u in range(head * d, (head + 1) * d)}
            blocks_b = {cluster[group.width + u] // d for u in range(partner * d, (partner + 1) * d)}
            assert shown[head] == (partner if blocks_a & blocks_b else None), (group.name, head, shown)
        assert None in shown, (group.name, shown)  # one pair per block kept apart (the plan bought one head)
    assert "attention_heads" in [plot.name for plot in draw_plots(tmp_path, report.diagnostics.rounded())]


def test_inspect_says_why_a_start_that_ended_lower_was_kept(tmp_path, capsys):
    """hf-mudsc inspect of merge(vit_cls 1 and 2) said 'activation start kept (final objective: activation 0.2684,
    weight 0.2729)': the lower one kept, no word of the margin a start must clear (the card's Method row says it)."""
    models = [make_model("vit_cls", seed, 3) for seed in (1, 2)]
    merged = hf_mudsc.merge(models, make_batches("vit_cls", 4, 16), method="mudsc", refit="none", progress=False)
    starts = merged.config.mudsc["start_objectives"]
    kept = merged.config.mudsc["solve_start"]
    assert max(starts.values()) > starts[kept], starts
    folder = tmp_path / "merged"
    hf_mudsc.save_merged(merged, folder)
    code, out, err = run_cli_output(["inspect", str(folder), "--no-plots"], capsys)
    assert code == 0, err
    line = next(line for line in out.splitlines() if line.strip().startswith("solve:"))
    assert "0.01 higher" in line, line


@pytest.mark.parametrize("kind", ["vit_cls", "bert_cls", "roberta_cls"])
def test_the_dry_runs_forward_flops_match_a_hand_count(kind):
    """The dry run's forward FLOPs (its time estimate) counted a classifier or pooler read at the first token once per
    token (ViT: 17 rows where it reads 1) and a ViT's patch projection at the class token too (16 patches, 17 tokens).
    Hand count: 2 x in x out per row each Linear (and the patch convolution) reads."""
    import torch

    from hf_mudsc.plan import forward_flops, weight_tokens

    model = make_model(kind, 1, 3)
    batch = make_batches(kind, 1, 2)[0]
    rows: dict[str, int] = {}

    def count(name):
        def hook(module, args, output):
            rows[name] = args[0].reshape(-1, args[0].shape[-1]).shape[0] if not isinstance(
                module, torch.nn.Conv2d) else output.shape[-1] * output.shape[-2] * output.shape[0]
        return hook

    handles = [module.register_forward_hook(count(name)) for name, module in model.named_modules()
               if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))]
    with torch.no_grad():
        model(**{key: value for key, value in batch.items() if key != "attention_mask"})
    for handle in handles:
        handle.remove()
    examples = batch[next(iter(batch))].shape[0]
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    linear = {f"{name}.weight": shapes[f"{name}.weight"] for name in rows}
    tokens, _ = tokens_per_example(model.config)
    if "input_ids" in batch:
        tokens = {key: batch["input_ids"].shape[1] for key in tokens}
    flops = forward_flops({name: torch.Size(shape).numel() for name, shape in linear.items()},
                          weight_tokens(spec_for(model), shapes, tokens))
    hand = sum(2 * torch.Size(linear[f"{name}.weight"]).numel() * seen / examples for name, seen in rows.items())
    assert flops == hand


def test_the_dry_run_under_auto_says_its_size_warning_holds_only_if_auto_matches_units():
    """merge(two fine-tunes of one base, 48 examples, dry_run=True) warned 'residual saw 48 rows, fewer than the 64
    units' unqualified, while the merge (method auto: regmean) gave no size warning: it is the unit matching's."""
    from hf_mudsc.methods.auto import planned_method

    base = make_model("vit_cls", 1, 3)
    parents = [fine_tune(base, seed, 0.05, relative=True) for seed in (2, 3)]
    batches = make_batches("vit_cls", 3, 16)
    plan = hf_mudsc.merge(parents, batches, dry_run=True, progress=False)
    merged = hf_mudsc.merge(parents, batches, progress=False)
    assert merged.config.mudsc["method"] != planned_method(True).name, merged.config.mudsc["method"]
    assert not _size_warning(merged.config.mudsc["warnings"]), merged.config.mudsc["warnings"]
    said = [text for text in plan.warnings if "calibration too small" in text]
    assert said and all(text.startswith(f"if method auto chooses {planned_method(True).name} ") for text in said), \
        plan.warnings
    assert not _size_warning(plan.warnings), plan.warnings


def test_the_dry_run_of_alpha_auto_under_method_auto_counts_the_held_out_examples():
    """merge(vit_cls 1 and 2, 70 examples, alpha='auto') (default method auto, which chose mudsc) warned 'residual saw
    56 rows', its dry run said nothing: the plan counted the α search's hold-out only for an explicit method."""
    models = [make_model("vit_cls", seed, 3) for seed in (1, 2)]
    batches = make_batches("vit_cls", 5, 14)
    plan = hf_mudsc.merge(models, batches, alpha="auto", dry_run=True, progress=False)
    merged = hf_mudsc.merge(models, batches, alpha="auto", progress=False)
    said = _size_warning(merged.config.mudsc["warnings"])
    assert said and "saw 56 rows" in said[0], merged.config.mudsc["warnings"]
    planned = [text for text in plan.warnings if "calibration too small" in text]
    assert len(planned) == 1 and planned[0].endswith(said[0]), plan.warnings


def test_a_refit_dropped_for_a_lowered_task_at_equal_scores_is_not_said_lower_past_the_digits():
    """A refit dropped because it lowered parent B's task, at pooled scores equal as recorded, read '(lower past the
    recorded digits); ...; it lowered parent B's task': the first reason is not why it was dropped."""
    from hf_mudsc.options import gate_tie_note

    lowered = {"kept": False, "refit": -0.5, "none": -0.5, "lowered_tasks": [1], "tasks_none": [-0.4, -0.6],
               "tasks_refit": [-0.3, -0.7]}
    assert gate_tie_note(lowered) == ""
    assert gate_tie_note({**lowered, "lowered_tasks": []})


def test_a_diagnostics_file_with_a_pair_kept_apart_says_a_newer_format(tmp_path, capsys):
    """A size_spend='heads' merge wrote head_pairing null in a format-1 file: ae0a7c2's inspect called the folder
    malformed ('not a list of integers; write the folder again'). Such a file is format 2; a format this version does
    not know is said to be a newer hf-mudsc's, not malformed."""
    import json

    from hf_mudsc.solve.diagnostics import DIAGNOSTICS_FILENAME

    models = [make_model("vit_cls", seed, 3) for seed in (1, 2)]
    batches = make_batches("vit_cls", 4, 16)
    formats = []
    for keywords in ({"size": 1.6, "size_spend": "heads"}, {}):
        folder = tmp_path / f"merged{len(formats)}"
        hf_mudsc.save_merged(hf_mudsc.merge(models, batches, method="mudsc", refit="none", progress=False,
                                            **keywords), folder)
        data = json.loads((folder / DIAGNOSTICS_FILENAME).read_text())
        formats.append(data["format"])
        code, out, err = run_cli_output(["inspect", str(folder), "--no-plots"], capsys)
        assert code == 0, err
    assert formats == [2, 1]  # null pairings only in the new format: other merges' files are as before
    data["format"] = 3
    (folder / DIAGNOSTICS_FILENAME).write_text(json.dumps(data))
    code, out, err = run_cli_output(["inspect", str(folder), "--no-plots"], capsys)
    assert code != 0 and "newer hf-mudsc" in err and "malformed" not in err, err


def test_inspect_shows_an_alpha_auto_fidelity_not_scored(tmp_path, capsys):
    """hf-mudsc inspect of a folder whose alpha_auto curve holds a null fidelity (the file checker allows it: 'null:
    not scored') failed with a TypeError traceback formatting it with .3f."""
    import json

    from hf_mudsc.solve.diagnostics import DIAGNOSTICS_FILENAME

    models = [make_model("vit_cls", seed, 3) for seed in (1, 2)]
    folder = tmp_path / "merged"
    hf_mudsc.save_merged(hf_mudsc.merge(models, make_batches("vit_cls", 4, 16), method="mudsc", alpha="auto",
                                        refit="none", progress=False), folder)
    data = json.loads((folder / DIAGNOSTICS_FILENAME).read_text())
    data["alpha_curve"]["fidelity"][0] = None
    (folder / DIAGNOSTICS_FILENAME).write_text(json.dumps(data))
    code, out, err = run_cli_output(["inspect", str(folder), "--no-plots"], capsys)
    assert code == 0, err
    line = next(line for line in out.splitlines() if line.strip().startswith("alpha:"))
    assert f"{data['alpha_curve']['grid'][0]:g}: –" in line, line
