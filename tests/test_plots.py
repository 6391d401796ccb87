"""Issue 14, seeing a merge: the diagnostics computed at merge time, the PNGs written next to the model and linked
from its card, and `hf-mudsc inspect` (summary + redrawn plots) on merged folders and recipes."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from factories import make_batches, make_model
from PIL import Image
from test_cli import save_parents_and_data

import hf_mudsc
from hf_mudsc.architectures import spec_for
from hf_mudsc.cli.main import main
from hf_mudsc.evaluate.results import EvaluationResult
from hf_mudsc.publish.folder import MARKER_FILENAME, read_marker, unlisted_files
from hf_mudsc.publish.plots import accuracy_figure, alpha_figure, draw_plots, short_name
from hf_mudsc.solve.diagnostics import (
    BASELINE_PAIRS,
    BASELINE_SEED,
    DIAGNOSTICS_FILENAME,
    PLOTS_FOLDER,
    GroupDiagnostics,
    MergeDiagnostics,
    baseline_pairs,
    heatmap_groups,
)
from hf_mudsc.solve.maps import GroupMaps
from hf_mudsc.solve.similarity import WeightCorrelation
from hf_mudsc.testing.permute import permute_model, random_permutations

ALL_PLOTS = ["match_quality.png", "solve_objective.png", "similarity_heatmaps.png", "attention_heads.png"]
ALIGN = ["--method", "mudsc", "--matcher", "align", "--num-samples", "24", "--batch-size", "8"]


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return save_parents_and_data(tmp_path_factory.mktemp("plot_inputs"))


@pytest.fixture(scope="module")
def merged_folder(inputs, tmp_path_factory):
    """One mudsc (align) merge written by the CLI, and the bytes of every file it wrote."""
    a, b, calibration = inputs
    out = tmp_path_factory.mktemp("plot_runs") / "merged"
    assert main(["merge", str(a), str(b), "--calibration", str(calibration), "--output", str(out), *ALIGN]) == 0
    return out, {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def check_png(path: Path) -> None:
    """Written, decodable, of a readable size, and a picture rather than one flat colour."""
    assert path.is_file() and path.stat().st_size > 8_000, path
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        assert width >= 600 and height >= 250, (path.name, image.size)
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    colours = np.unique(pixels, axis=0)
    assert len(colours) > 50, (path.name, len(colours))
    assert (pixels != 255).any(axis=1).mean() > 0.02, f"{path.name} is nearly blank"


# ------------------------------------------------------------------------------------------ diagnostics values


def test_a_permuted_copy_gives_perfect_pairs_the_true_head_pairing_and_a_diagonal():
    """Known answer: merged with a permuted copy of itself, every fused pair is one unit seen twice."""
    model = make_model("vit_cls", 3)
    spec = spec_for(model)
    perms = random_permutations(spec, seed=5)
    copy = permute_model(model, spec, perms)
    merged = hf_mudsc.merge([model, copy], make_batches("vit_cls"), method="mudsc", matcher="align", progress=False)
    diagnostics = merged.merge_report.diagnostics
    assert [g.name for g in diagnostics.groups] == [g.name for g in spec.groups]
    for group, perm, entry in zip(spec.groups, perms, diagnostics.groups):
        assert entry.cross_fraction == 1.0
        for value in (entry.activation, entry.weight, entry.blended):
            assert value == pytest.approx(1.0, abs=1e-4), (group.name, entry)
        if group.num_heads > 1:
            size = group.width // group.num_heads
            heads = [int(perm[j * size]) // size for j in range(group.num_heads)]  # B head j = A head heads[j]
            assert entry.head_pairing == [heads.index(h) for h in range(group.num_heads)]
            assert entry.head_scores == pytest.approx([1.0] * group.num_heads, abs=1e-4)
        else:
            assert entry.head_pairing is None
    assert diagnostics.heatmaps
    for heatmap in diagnostics.heatmaps:
        values = np.asarray(heatmap.values)
        assert np.diag(values) == pytest.approx(1.0, abs=0.01)  # row i and column i were fused: the same unit
        n = values.shape[0]
        assert values[~np.eye(n, dtype=bool)].max() < 0.99
        width = spec.groups[spec.group_index(heatmap.group)].width
        # B unit j of the copy is A unit perm[j]: the columns are exactly the rows' partners.
        perm = perms[spec.group_index(heatmap.group)]
        assert [int(perm[c]) for c in heatmap.columns] == heatmap.rows
        assert heatmap.fused_units == width and len(heatmap.rows) == min(40, width)


def test_pair_correlations_are_the_entries_of_the_similarities_the_solver_uses():
    """Different seeds: the diagnostics' weight correlation of fused pairs equals the mean of the full `C_w`
    (docs/design.md §4.3, other axes mapped by the final matches) at those pairs; the heat map's entries too."""
    kind = "bert_cls"
    model_a, model_b = make_model(kind, 1), make_model(kind, 2)
    merged = hf_mudsc.merge([model_a, model_b], make_batches(kind), method="weight_matching", progress=False)
    report = merged.merge_report
    spec = spec_for(model_a)
    params_a = {k: v.detach() for k, v in model_a.named_parameters()}
    params_b = {k: v.detach() for k, v in model_b.named_parameters()}
    maps = [GroupMaps.from_match(m) for m in report.matches]
    full = WeightCorrelation(spec, params_a, params_b)
    for index, (match, entry) in enumerate(zip(report.matches, report.diagnostics.groups)):
        n = spec.groups[index].width
        similarity = full(index, maps)
        pairs = [(c[0], c[1] - n) for c in match.clusters()]  # align: one A and one B unit per merged unit
        expected = float(np.mean([similarity[a, n + b] for a, b in pairs]))
        assert entry.weight == pytest.approx(expected, abs=2e-5)
        assert entry.blended == entry.weight and entry.activation is None  # weights only: alpha is 1
        # QA s24: the chance level next to it, the mean over random (A unit, B unit) pairs: all n² when few.
        base_a, base_b = baseline_pairs(n)
        chance = float(similarity[:n, n:][base_a, base_b].double().mean())
        assert entry.baseline_weight == pytest.approx(chance, abs=2e-5) and entry.baseline_pairs == base_a.numel()
        if n * n <= BASELINE_PAIRS:
            assert entry.baseline_weight == pytest.approx(float(similarity[:n, n:].double().mean()), abs=2e-5)
        assert entry.baseline_blended == entry.baseline_weight and entry.baseline_activation is None
    assert report.diagnostics.baseline_seed == BASELINE_SEED
    assert report.diagnostics.alpha == 1.0
    heatmap = report.diagnostics.heatmaps[0]
    index = spec.group_index(heatmap.group)
    similarity = full(index, maps)
    n = spec.groups[index].width
    expected = similarity[heatmap.rows][:, [n + c for c in heatmap.columns]]
    assert np.asarray(heatmap.values) == pytest.approx(expected.numpy(), abs=0.006)


def test_average_matches_no_units_and_has_no_diagnostics():
    merged = hf_mudsc.merge([make_model("vit_cls", 1), make_model("vit_cls", 2)], method="average", progress=False)
    assert merged.merge_report.diagnostics is None


def test_heat_maps_go_to_the_first_middle_last_and_worst_matched_groups():
    groups = [GroupDiagnostics(name=f"g{i}", width=4, blended=b) for i, b in
              enumerate([0.5, None, 0.1, 0.9, 0.3, 0.6, 0.7, None])]
    assert heatmap_groups(groups) == [0, 2, 4, 6]  # scored: 0 2 3 4 5 6 -> first 0, middle 4, last 6, worst 2
    groups[2].blended = 0.35
    assert heatmap_groups(groups) == [0, 4, 6]  # the worst is the middle one
    assert heatmap_groups([GroupDiagnostics(name="g", width=4)]) == []


def test_group_names_become_short_axis_labels():
    assert short_name("vit.encoder.layer.11.attention.qk") == "L11 q/k"
    assert short_name("vision_model.encoder.layers.0.self_attn.v") == "vision L0 v"
    assert short_name("text_model.encoder.layers.3.mlp") == "text L3 mlp"
    assert short_name("residual") == "residual"


# ------------------------------------------------------------------------------------------ the merged folder


def test_every_plot_is_written_next_to_the_model_and_is_a_real_picture(merged_folder):
    out, files = merged_folder
    assert sorted(p.name for p in (out / PLOTS_FOLDER).iterdir()) == sorted(ALL_PLOTS)
    for name in ALL_PLOTS:
        check_png(out / PLOTS_FOLDER / name)
    diagnostics = MergeDiagnostics.load(out / DIAGNOSTICS_FILENAME)
    assert diagnostics.method == "mudsc" and diagnostics.matcher == "align" and diagnostics.alpha == 0.5
    assert all(g.cross_fraction == 1.0 and g.blended is not None for g in diagnostics.groups)
    assert (out / DIAGNOSTICS_FILENAME).stat().st_size < 60_000


def test_the_card_links_each_plot_relative_to_itself(merged_folder):
    out, _ = merged_folder
    card = (out / "README.md").read_text()
    assert "## Diagnostics" in card
    links = re.findall(r"!\[[^\]]+\]\(([^)]+)\)", card)
    assert sorted(links) == sorted(f"{PLOTS_FOLDER}/{name}" for name in ALL_PLOTS)
    for link in links:
        assert not link.startswith("/") and (out / link).is_file()


def test_the_ownership_marker_lists_the_plots_and_the_diagnostics(merged_folder):
    out, files = merged_folder
    listed = read_marker(out)["files"]
    for name in [DIAGNOSTICS_FILENAME, *(f"{PLOTS_FOLDER}/{n}" for n in ALL_PLOTS)]:
        assert listed[name]["sha256"] == hashlib.sha256(files[name]).hexdigest()
    assert unlisted_files(out, check_content=True) == ([], [])


def test_save_merged_and_merge_report_plot(inputs, tmp_path):
    a, b, calibration = inputs
    merged = hf_mudsc.merge([str(a), str(b)], str(calibration), matcher="align", num_samples=16, batch_size=8,
                            progress=False)
    paths = merged.merge_report.plot(tmp_path / "pictures")
    assert [p.name for p in paths] == ALL_PLOTS and all(p.parent == tmp_path / "pictures" for p in paths)
    out = hf_mudsc.save_merged(merged, tmp_path / "saved")
    # The same data gives the same bytes, drawn from the report or written by the writer.
    for path in paths:
        assert (out / PLOTS_FOLDER / path.name).read_bytes() == path.read_bytes()


def test_a_plot_that_fails_costs_the_plots_not_the_model(inputs, tmp_path, monkeypatch, caplog):
    import hf_mudsc.publish.plots as plots

    a, b, calibration = inputs
    merged = hf_mudsc.merge([str(a), str(b)], str(calibration), method="zipit", num_samples=16, batch_size=8,
                            progress=False)

    def broken(*args, **kwargs):
        raise RuntimeError("no fonts today")

    monkeypatch.setattr(plots, "draw_plots", broken)
    with caplog.at_level("WARNING", logger="hf_mudsc"):
        out = hf_mudsc.save_merged(merged, tmp_path / "saved")
    assert "plots could not be drawn (RuntimeError: no fonts today)" in caplog.text
    assert (out / "model.safetensors").is_file() and not (out / PLOTS_FOLDER).exists()
    assert "## Diagnostics" not in (out / "README.md").read_text()
    assert unlisted_files(out, check_content=True) == ([], [])


# ------------------------------------------------------------------------------------------ accuracy chart


def evaluation_result() -> EvaluationResult:
    scores = {"parent_a": {"cars": {"accuracy": 0.9}, "joint": {"accuracy": 0.45}},
              "parent_b": {"pets": {"accuracy": 0.8}, "joint": {"accuracy": 0.4}},
              "ensemble": {"cars": {"accuracy": 0.88}, "pets": {"accuracy": 0.79}, "joint": {"accuracy": 0.7},
                           "average": {"accuracy": 0.835}},
              "merged": {"cars": {"accuracy": 0.6}, "pets": {"accuracy": 0.5}, "joint": {"accuracy": 0.4},
                         "average": {"accuracy": 0.55}}}
    tasks = {"cars": {"dataset": "org/cars", "split": "test"}, "pets": {"dataset": "org/pets", "split": "test"}}
    return EvaluationResult(metrics=["accuracy"], tasks=tasks, scores=scores, merged=["merged"])


def test_the_accuracy_chart_has_a_bar_per_scorer_and_view(tmp_path):
    figure = accuracy_figure(evaluation_result().to_dict())
    axes = figure.axes[0]
    heights = sorted(round(p.get_height(), 6) for p in axes.patches)
    expected = sorted(round(100 * v, 6) for views in evaluation_result().scores.values()
                      for view in views.values() for v in view.values())
    assert heights == expected  # one bar per defined score, in percent; none for a parent on the other task
    assert [t.get_text() for t in axes.get_xticklabels()] == ["cars", "pets", "joint", "average"]
    assert [t.get_text() for t in axes.get_legend().get_texts()] == ["parent A", "parent B", "ensemble (A+B)",
                                                                      "merged"]
    [plot] = draw_plots(tmp_path, None, evaluation_result())
    assert plot.path == tmp_path / "accuracy.png"
    check_png(plot.path)


def test_the_accuracy_chart_names_every_parent_of_an_n_parent_merge():
    tasks = {name: {"dataset": "org/d", "split": "test"} for name in ("a", "b", "c")}
    scores = {"merged": {"a": {"accuracy": 0.5}}, "ensemble": {"a": {"accuracy": 0.6}},
              "parent_c": {"c": {"accuracy": 0.7}}, "parent_a": {"a": {"accuracy": 0.9}},
              "parent_b": {"b": {"accuracy": 0.8}}}
    figure = accuracy_figure(EvaluationResult(metrics=["accuracy"], tasks=tasks, scores=scores,
                                              merged=["merged"]).to_dict())
    axes = figure.axes[0]
    assert [t.get_text() for t in axes.get_legend().get_texts()] == [
        "parent A", "parent B", "parent C", "ensemble (A+B+C)", "merged"]
    hatches = [axes.containers[i].patches[0].get_hatch() for i in range(3)]
    assert len(set(hatches)) == 3  # the three grey parents told apart


def test_a_dollar_sign_in_a_task_name_is_drawn_as_written(tmp_path):
    """Card bug hunt s29: task names reached matplotlib as mathtext, so `$x$` was drawn as math and `$\\foo$` raised
    (the chart was then left out of the merged folder). Names are drawn as written."""
    tasks = {name: {"dataset": "org/d", "split": "test"} for name in ("$\\foo$", "$5 off$")}
    scores = {"merged": {name: {"accuracy": 0.5} for name in tasks}, "parent_a": {"$\\foo$": {"accuracy": 0.9}},
              "parent_b": {"$5 off$": {"accuracy": 0.8}}}
    result = EvaluationResult(metrics=["accuracy"], tasks=tasks, scores=scores, merged=["merged"])
    [plot] = draw_plots(tmp_path, None, result)
    check_png(plot.path)
    axes = accuracy_figure(result.to_dict()).axes[0]
    assert [t.get_text() for t in axes.get_xticklabels()][:2] == ["$\\foo$", "$5 off$"]


# ------------------------------------------------------------------------------------------ hf-mudsc inspect


def test_inspect_redraws_the_same_plots_and_prints_a_summary(merged_folder, tmp_path, capsys):
    out, files = merged_folder
    copy = tmp_path / "copy"
    for name, data in files.items():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_bytes(data)
    (copy / MARKER_FILENAME).write_bytes((out / MARKER_FILENAME).read_bytes())
    for name in ALL_PLOTS:
        (copy / PLOTS_FOLDER / name).unlink()
    assert main(["inspect", str(copy)]) == 0
    text = capsys.readouterr().out
    assert "parents:   vit-a, vit-b" in text and "method:    mudsc (matcher zip" not in text
    assert "method:    mudsc (matcher align, alpha 0.5, refit gate)" in text  # refit="auto" ran
    assert "relation:  independent" in text and "weakest group:" in text
    assert "weights:   float32 (auto: every parent is stored in float32)" in text
    assert "heads:" not in text  # no head was reordered
    for group in MergeDiagnostics.load(out / DIAGNOSTICS_FILENAME).groups:
        assert re.search(rf"^\s+{re.escape(group.name)}\s+{group.value:.3f} \|", text, re.MULTILINE), group.name
    assert f"Plots written to {copy / PLOTS_FOLDER}: " + ", ".join(ALL_PLOTS) in text
    for name in ALL_PLOTS:  # the same set, byte for byte
        assert (copy / PLOTS_FOLDER / name).read_bytes() == files[f"{PLOTS_FOLDER}/{name}"]
    assert unlisted_files(copy, check_content=True) == ([], [])  # still pushable, still --overwrite-able
    # An evaluated folder also gets the accuracy chart, recorded in the marker.
    evaluation_result().save(copy / "eval_results.json")
    assert main(["inspect", str(copy)]) == 0
    check_png(copy / PLOTS_FOLDER / "accuracy.png")
    assert "joint accuracy (eval_results.json): parent_a 0.450" in capsys.readouterr().out
    assert unlisted_files(copy, check_content=True) == ([], [])
    # README hunt s29: the same folder spelled with `..` failed with pathlib's relative_to error after the first plot
    (tmp_path / "sub").mkdir()
    assert main(["inspect", str(tmp_path / "sub" / ".." / "copy")]) == 0, capsys.readouterr().err
    assert unlisted_files(copy, check_content=True) == ([], [])


def test_inspect_into_another_folder(merged_folder, tmp_path, capsys):
    out, files = merged_folder
    target = tmp_path / "pictures"
    assert main(["inspect", str(out), "--output", str(target)]) == 0
    assert sorted(p.name for p in target.iterdir()) == sorted([*ALL_PLOTS, MARKER_FILENAME])
    for name in ALL_PLOTS:
        assert (target / name).read_bytes() == files[f"{PLOTS_FOLDER}/{name}"]
    assert main(["inspect", str(out), "--output", str(target)]) == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main(["inspect", str(out), "--output", str(out / "sub")]) == 1  # never inside the merged model
    assert "overlaps the merged-model folder" in capsys.readouterr().err
    assert not (out / "sub").exists()


def test_inspect_refuses_a_bad_output_before_printing_the_summary(merged_folder, tmp_path, capsys):
    """A refused --output is the whole answer (one line), not a full summary followed by an error."""
    out, _ = merged_folder
    target = tmp_path / "taken"
    target.mkdir()
    assert main(["inspect", str(out), "--output", str(target)]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1, captured
    assert "already exists; pass --overwrite" in captured.err


def test_inspect_never_replaces_a_plot_it_did_not_write(merged_folder, tmp_path, capsys):
    out, files = merged_folder
    copy = tmp_path / "copy"
    for name, data in files.items():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_bytes(data)
    (copy / MARKER_FILENAME).write_bytes((out / MARKER_FILENAME).read_bytes())
    mine = copy / PLOTS_FOLDER / "attention_heads.png"
    mine.write_bytes(b"my own picture")
    before = {p.name: p.read_bytes() for p in (copy / PLOTS_FOLDER).iterdir()}
    assert main(["inspect", str(copy)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "refusing to replace plots/attention_heads.png" in err
    assert {p.name: p.read_bytes() for p in (copy / PLOTS_FOLDER).iterdir()} == before


@pytest.mark.parametrize("case", ["plain model", "no config", "broken config"])
def test_inspect_on_a_folder_that_is_not_a_merge_is_one_line_error(inputs, tmp_path, capsys, case):
    a, _, _ = inputs
    folder = a if case == "plain model" else tmp_path / "folder"
    if case != "plain model":
        folder.mkdir()
        if case == "broken config":
            (folder / "config.json").write_text("{not json")
    assert main(["inspect", str(folder)]) == 1
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.splitlines() == [err] and err.startswith("hf-mudsc inspect: error: ") and "Traceback" not in err
    assert {"plain model": "its config.json has no `mudsc` section", "no config": "it has no config.json",
            "broken config": "cannot read"}[case] in err
    assert not (folder / PLOTS_FOLDER).exists()


def test_inspect_a_recipe_says_what_it_would_merge(merged_folder, inputs, capsys):
    out, _ = merged_folder
    a, b, calibration = inputs
    assert main(["inspect", str(out / "mudsc_recipe.yaml")]) == 0
    text = capsys.readouterr().out
    assert f"would merge: {a}, {b}" in text
    assert "method:      mudsc (matcher align, alpha 0.5)" in text
    assert f"calibration: {calibration}, 24 samples" in text and "batch_size = 8" in text


def test_inspect_of_a_folder_from_before_the_diagnostics_draws_what_config_holds(merged_folder, tmp_path, capsys):
    out, files = merged_folder
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_bytes(files["config.json"])
    assert main(["inspect", str(old), "--output", str(tmp_path / "pictures")]) == 0  # no marker: not in place
    text = capsys.readouterr().out
    assert f"no {DIAGNOSTICS_FILENAME} in the folder" in text
    assert sorted(p.name for p in (tmp_path / "pictures").iterdir()) == [MARKER_FILENAME, "match_quality.png"]
    check_png(tmp_path / "pictures" / "match_quality.png")


def test_inspect_and_help_do_not_import_torch_or_matplotlib_needlessly(merged_folder, tmp_path):
    out, _ = merged_folder
    script = (
        "import sys, contextlib, io\n"
        "from hf_mudsc.cli.main import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
        "    try:\n"
        "        code = main(sys.argv[1:])\n"
        "    except SystemExit as stop:\n"
        "        code = stop.code\n"
        "print(repr((code, sorted(m for m in ('torch', 'matplotlib') if m in sys.modules))))\n"
    )
    for argv, expected in ((["inspect", "--help"], (0, [])), (["merge", "--help"], (0, [])),
                           (["inspect", str(out), "--output", str(tmp_path / "p")], (0, ["matplotlib"]))):
        done = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert eval(done.stdout.strip().splitlines()[-1]) == expected, argv  # noqa: S307 - our own repr


def test_alpha_auto_draws_the_fidelity_curve_and_the_card_links_it(tmp_path):
    """With alpha="auto" the diagnostics carry the search's curve; the plot is drawn, linked and redrawn by inspect."""


    a, b = make_model("vit_cls", 0), make_model("vit_cls", 1)
    merged = hf_mudsc.merge([a, b], make_batches("vit_cls", 4), method="mudsc", alpha="auto", progress=False)
    curve = merged.config.mudsc["alpha_auto"]
    assert merged.merge_report.diagnostics.alpha_curve == curve
    folder = hf_mudsc.save_merged(merged, tmp_path / "merged")
    png = folder / "plots" / "alpha_fidelity.png"
    with Image.open(png) as image:
        assert image.size[0] > 400 and image.size[1] > 300
        assert len(image.convert("RGB").getcolors(1 << 20)) > 50
    assert "plots/alpha_fidelity.png" in (folder / "README.md").read_text()
    stored = json.loads((folder / "merge_diagnostics.json").read_text())
    assert stored["alpha_curve"]["chosen"] == curve["chosen"] and stored["alpha_curve"]["grid"] == curve["grid"]


def test_alpha_figure_marks_the_returned_merge_only_when_the_full_solve_changed_it():
    """The curve is the candidates' (one start); a star at the chosen α shows the returned merge's own fidelity."""
    curve = {"grid": [0.1, 0.5, 0.9], "fidelity": [0.25, 0.5, 0.75], "chosen": 0.9, "held_out_examples": 16,
             "candidate_starts": ["activation"], "returned_fidelity": 0.875, "returned_is_candidate": False}
    axes = alpha_figure(curve).axes[0]
    stars = [line for line in axes.get_lines() if line.get_marker() == "*"]
    assert [(list(s.get_xdata()), list(s.get_ydata()), s.get_label()) for s in stars] == [
        ([0.9], [0.875], "the merge returned (solved again with every start)")]
    assert "each α solved from the activation start and scored on 16 held-out" in axes.get_title().replace("\n", " ")
    same = alpha_figure({**curve, "returned_fidelity": 0.75, "returned_is_candidate": True}).axes[0]
    assert not [line for line in same.get_lines() if line.get_marker() == "*"]


def test_inspect_says_which_parent_heads_were_reordered(merged_folder):
    """A merge that aligned a parent's head to parent A's label order (`config.mudsc["head_reordered"]`) says so."""
    from hf_mudsc.cli.inspect import summary

    out, _ = merged_folder
    mudsc = {**json.loads((out / "config.json").read_text())["mudsc"], "head_reordered": [False, True, True],
             "out_dtype": "float16", "out_dtype_reason": "auto: every parent is stored in float16"}
    text = summary(out, mudsc, MergeDiagnostics.load(out / DIAGNOSTICS_FILENAME), None, True)
    assert "heads:     parents B, C reordered to parent A's label order (same labels, another id order)" in text
    assert "weights:   float16 (auto: every parent is stored in float16)" in text


# ------------------------------------------------------------------------------------------ inspect (QA s24)


def copy_folder(out: Path, files: dict[str, bytes], target: Path, *, marker: bool = True) -> Path:
    """A byte copy of the merged folder (its ownership marker too, unless `marker` is False)."""
    for name, data in files.items():
        if name == MARKER_FILENAME and not marker:
            continue
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        (target / name).write_bytes(data)
    return target


def test_inspect_output_refuses_a_folder_holding_a_model_even_with_overwrite(merged_folder, tmp_path, capsys):
    """QA s24: `inspect A --output B --overwrite` replaced the merged model B by four PNGs (exit 0, no word)."""
    out, files = merged_folder
    model = copy_folder(out, files, tmp_path / "model")
    before = {p.relative_to(model).as_posix(): p.read_bytes() for p in model.rglob("*") if p.is_file()}
    assert main(["inspect", str(out), "--output", str(model), "--overwrite"]) == 1
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert captured.out == "" and err.splitlines() == [err]
    assert "it holds a merged model, which inspect's --output would replace with plots; choose another --output" in err
    assert {p.relative_to(model).as_posix(): p.read_bytes() for p in model.rglob("*") if p.is_file()} == before
    # A folder of plots inspect wrote is still replaced.
    assert main(["inspect", str(out), "--output", str(tmp_path / "pictures")]) == 0
    assert main(["inspect", str(out), "--output", str(tmp_path / "pictures"), "--overwrite"]) == 0


@pytest.mark.parametrize(("argv", "needle"), [(["--overwrite"], "--overwrite needs --output"),
                                              (["--output", "p", "--no-plots"], "--output with --no-plots")])
def test_inspect_refuses_flags_it_would_ignore(merged_folder, tmp_path, capsys, monkeypatch, argv, needle):
    out, _ = merged_folder
    monkeypatch.chdir(tmp_path)
    assert main(["inspect", str(out), *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and needle in captured.err and len(captured.err.strip().splitlines()) == 1
    assert not (tmp_path / "p").exists()


def test_inspect_writes_nothing_into_a_folder_hf_mudsc_did_not_write(merged_folder, tmp_path, capsys):
    """QA s24: a copy without the ownership marker (save_pretrained of a merge) got a `plots/` folder."""
    out, files = merged_folder
    copy = tmp_path / "mine"
    copy.mkdir()
    for name in ("config.json", DIAGNOSTICS_FILENAME):
        (copy / name).write_bytes(files[name])
    assert main(["inspect", str(copy)]) == 1
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert captured.out == "" and err.splitlines() == [err]
    assert "hf-mudsc did not write" in err and "--output DIR" in err and "--no-plots" in err
    assert sorted(p.name for p in copy.iterdir()) == ["config.json", DIAGNOSTICS_FILENAME]
    assert main(["inspect", str(copy), "--no-plots"]) == 0
    assert "weakest group:" in capsys.readouterr().out
    (copy / DIAGNOSTICS_FILENAME).unlink()
    assert main(["inspect", str(copy), "--no-plots"]) == 0
    text = capsys.readouterr().out
    assert f"no {DIAGNOSTICS_FILENAME} in the folder" in text and "merged before it existed" not in text


def test_match_quality_without_diagnostics_says_it_draws_the_match_value(merged_folder):
    """QA s24: drawn from config.json alone (no correlations), the axis said "mean correlation of fused A–B pairs"."""
    from hf_mudsc.publish.plots import match_quality_figure

    out, _ = merged_folder
    mudsc = json.loads((out / "config.json").read_text())["mudsc"]
    axes = match_quality_figure(MergeDiagnostics.from_config(mudsc)).axes[0]
    assert "match value" in axes.get_ylabel() and "correlation of fused" not in axes.get_ylabel()
    assert "0 = unrelated" not in axes.get_title()
    full = match_quality_figure(MergeDiagnostics.load(out / DIAGNOSTICS_FILENAME)).axes[0]
    assert "correlation" in full.get_ylabel()


def test_inspect_keeps_the_merges_match_quality_plot_when_the_diagnostics_are_gone(merged_folder, tmp_path, capsys):
    """QA s24: without merge_diagnostics.json, inspect replaced the merge's full match_quality.png by a poorer one."""
    out, files = merged_folder
    copy = copy_folder(out, files, tmp_path / "copy")
    (copy / DIAGNOSTICS_FILENAME).unlink()
    assert main(["inspect", str(copy)]) == 0
    assert (copy / PLOTS_FOLDER / "match_quality.png").read_bytes() == files[f"{PLOTS_FOLDER}/match_quality.png"]
    assert "kept" in capsys.readouterr().out
    # Where none exists it is drawn (the merge's own is gone too).
    (copy / PLOTS_FOLDER / "match_quality.png").unlink()
    assert main(["inspect", str(copy)]) == 0
    check_png(copy / PLOTS_FOLDER / "match_quality.png")
    capsys.readouterr()
    assert main(["inspect", str(copy)]) == 0  # that very drawing again: not "kept", redrawn (the same bytes)
    assert "Kept" not in capsys.readouterr().out


@pytest.mark.parametrize(("file", "change"), [
    (DIAGNOSTICS_FILENAME, lambda d: d.update(starts={"weight": "x"})),
    (DIAGNOSTICS_FILENAME, lambda d: d["heatmaps"][0]["values"].__setitem__(0, [0.1])),
    (DIAGNOSTICS_FILENAME, lambda d: d["groups"][0].update(blended="far")),
    (DIAGNOSTICS_FILENAME, lambda d: d["groups"][0].update(head_pairing="ab")),
    (DIAGNOSTICS_FILENAME, lambda d: d.update(objective_history=["far"])),
    (DIAGNOSTICS_FILENAME, lambda d: d.update(groups={"a": 1})),
    (DIAGNOSTICS_FILENAME, lambda d: d.update(alpha_curve={"grid": [0.1], "fidelity": ["x"], "chosen": 0.1})),
    ("eval_results.json", lambda d: d.update(scores={"merged": {"joint": {"accuracy": "far"}}})),
    ("eval_results.json", lambda d: d.update(metrics="accuracy")),
    ("config.json", lambda d: d["mudsc"].update(group_match_values={"residual": "far"})),
])
def test_inspect_of_a_malformed_value_is_the_one_line_error(merged_folder, tmp_path, capsys, file, change):
    """QA s24: a value of the wrong type ended inspect with a bare Python message (`Unknown format code 'f' ...`)."""
    out, files = merged_folder
    copy = copy_folder(out, files, tmp_path / "copy")
    if file == "eval_results.json":
        evaluation_result().save(copy / file)
    if file == "config.json":  # read only without the diagnostics file
        (copy / DIAGNOSTICS_FILENAME).unlink()
    data = json.loads((copy / file).read_text())
    change(data)
    (copy / file).write_text(json.dumps(data))
    assert main(["inspect", str(copy)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "holds a malformed hf-mudsc file" in err and file in err, err


def test_inspect_of_empty_groups_does_not_say_no_unit_was_matched(merged_folder, tmp_path, capsys):
    out, files = merged_folder
    copy = copy_folder(out, files, tmp_path / "copy")
    data = json.loads((copy / DIAGNOSTICS_FILENAME).read_text())
    data.update(groups=[], heatmaps=[])
    (copy / DIAGNOSTICS_FILENAME).write_text(json.dumps(data))
    assert main(["inspect", str(copy), "--no-plots"]) == 0
    text = capsys.readouterr().out
    assert "matched no units" not in text and f"{DIAGNOSTICS_FILENAME} lists no groups" in text


def test_match_quality_draws_and_inspect_prints_the_chance_level(merged_folder, capsys):
    """QA s24: the residual group's weight correlation is ~0.95 for any pair of units, yet the plot said "0 =
    unrelated": each series' mean over random A–B pairs is drawn (dotted) and printed next to the fused pairs'."""
    from hf_mudsc.cli.inspect import summary
    from hf_mudsc.publish.plots import match_quality_figure

    out, _ = merged_folder
    diagnostics = MergeDiagnostics.load(out / DIAGNOSTICS_FILENAME)
    assert all(g.baseline_blended is not None for g in diagnostics.groups)
    axes = match_quality_figure(diagnostics).axes[0]
    chance = [line for line in axes.get_lines() if line.get_linestyle() == "--" and "random" in line.get_label()]
    assert [list(line.get_ydata()) for line in chance if line.get_label().startswith("blended")] == [
        [g.baseline_blended for g in diagnostics.groups]]
    assert "0 = unrelated" not in axes.get_title() and "random A–B pairs" in axes.get_title()
    mudsc = json.loads((out / "config.json").read_text())["mudsc"]
    text = summary(out, mudsc, diagnostics, None, True)
    residual = diagnostics.group("residual")
    assert "chance: blended's mean over random A-B pairs" in text
    assert re.search(rf"^\s+residual\s+.*{residual.blended:.3f} \(chance\s+{residual.baseline_blended:.3f}\)", text,
                     re.MULTILINE), text


def test_the_alpha_figures_title_fits_in_the_picture():
    """QA s24: alpha_fidelity.png's second title line ran past the right edge ("...calibration example")."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    curve = {"grid": [0.1, 0.5, 0.9], "fidelity": [0.25, 0.5, 0.75], "chosen": 0.9, "held_out_examples": 1024,
             "candidate_starts": ["activation", "weight"], "returned_fidelity": 0.75, "returned_is_candidate": True}
    figure = alpha_figure(curve)
    renderer = FigureCanvasAgg(figure).get_renderer()
    figure.draw(renderer)
    box = figure.axes[0].title.get_window_extent(renderer)
    assert box.x0 >= 0 and box.x1 <= figure.bbox.width, (box, figure.bbox.width)


def test_inspect_says_what_the_refit_gate_chose_and_names_the_base(merged_folder):
    """QA s24: the summary said "refit gate" without whether the gate kept the refit, and omitted a same-base
    merge's base (both are in config.mudsc)."""
    from hf_mudsc.cli.inspect import summary

    out, _ = merged_folder
    mudsc = json.loads((out / "config.json").read_text())["mudsc"]
    gate = {"kept": False, "measure": "log-probability agreement", "none": -1.25, "refit": -1.5,
            "held_out_examples": 12}
    text = summary(out, {**mudsc, "refit": "gate", "refit_gate": gate, "base": "org/base",
                         "base_revision": "0123456789abcdef", "base_source": "named by the parents' model cards"},
                   MergeDiagnostics.load(out / DIAGNOSTICS_FILENAME), None, True)
    assert ("  refit:     the gate dropped the refit (held-out log-probability agreement -1.5000 with it, -1.2500 "
            "without; 12 examples)") in text, text
    assert "  base:      org/base @ 0123456789 (named by the parents' model cards)" in text, text
    kept = summary(out, {**mudsc, "refit": "gate", "refit_gate": {**gate, "kept": True}},
                   MergeDiagnostics.load(out / DIAGNOSTICS_FILENAME), None, True)
    assert "the gate kept the refit" in kept and "base:" not in kept


def test_inspect_of_a_hub_id_says_to_download_it_first(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["inspect", "org/merged-model"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err]
    assert "huggingface-cli download org/merged-model --local-dir DIR" in err and "inspect DIR" in err, err


@pytest.mark.parametrize("chunk", [1, 7])
def test_the_weight_correlations_of_pairs_taken_a_chunk_at_a_time_equal_them_taken_at_once(monkeypatch, chunk):
    """The diagnostics gather the weight rows of every fused and chance-level pair; all at once that held
    (pairs x columns) three times — 0.9 GB for MiniLM's residual group, the peak of its merge. They are now taken
    `PAIR_CHUNK` pairs at a time, which must give the same figures bit for bit."""
    import hf_mudsc.solve.diagnostics as diagnostics_module

    models = [make_model("bert_cls", seed) for seed in (1, 2)]
    data = make_batches("bert_cls", num_batches=2, batch_size=8)
    monkeypatch.setattr(diagnostics_module, "PAIR_CHUNK", 10**9)
    whole = hf_mudsc.merge(models, data, method="mudsc", refit="none", progress=False).merge_report.diagnostics
    monkeypatch.setattr(diagnostics_module, "PAIR_CHUNK", chunk)
    chunked = hf_mudsc.merge(models, data, method="mudsc", refit="none", progress=False).merge_report.diagnostics
    assert json.dumps(chunked.to_dict()) == json.dumps(whole.to_dict())
    assert any(group.get("baseline_weight") is not None for group in whole.to_dict()["groups"])
