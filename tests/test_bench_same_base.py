"""The same-base benchmarks (scripts/bench_same_base.py, scripts/bench_same_base_memory.py): their scoring on known
answers, and a smoke run of each at a tiny size through the public API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hf_mudsc.solve import task_vectors

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import bench_same_base

    return bench_same_base


def test_normalised_accuracy_and_the_fusionbench_order_on_hand_figures(bench):
    assert bench.normalised([0.5, 0.9], [1.0, 0.9]) == pytest.approx(0.75)
    summary = {"regmean": {"mean": 0.90}, "ties": {"mean": 0.93}, "task_arithmetic": {"mean": 0.80},
               "individual": {"mean": 1.0}, "auto": {"mean": 0.93}, "mudsc": {"skipped": "takes 2 parents"}}
    found = bench.fusionbench_comparison(summary)
    assert found["holds"] is False
    assert found["order_found"] == ["ties", "regmean", "task_arithmetic"]
    assert found["gaps_points"] == {"regmean - ties": pytest.approx(-3.0),
                                    "ties - task_arithmetic": pytest.approx(13.0)}
    assert bench.ranking(summary) == ["ties", "regmean", "task_arithmetic"]  # references and auto are not ranked
    assert bench.fusionbench_comparison({"ties": {"mean": 1.0}}) == {"holds": None,
                                                                      "missing": ["regmean", "task_arithmetic"]}


def test_summary_is_the_mean_and_sample_std_over_seeds_and_keeps_why_a_method_did_not_run(bench):
    per_seed = [
        {"rows": {"ties": {"accuracy": [0.5, 1.0], "normalised": 0.6}, "mudsc": {"skipped": "takes 2 parents"},
                  "auto": {"accuracy": [1.0, 1.0], "normalised": 1.0, "chose": "ties", "reason": "shared base"}}},
        {"rows": {"ties": {"accuracy": [0.7, 0.8], "normalised": 0.8}, "mudsc": {"skipped": "takes 2 parents"},
                  "auto": {"accuracy": [1.0, 1.0], "normalised": 1.0, "chose": "ties", "reason": "shared base"}}},
    ]
    summary = bench.summarise(per_seed)
    assert summary["ties"]["mean"] == pytest.approx(0.7)
    assert summary["ties"]["std"] == pytest.approx(0.1414213562)
    assert summary["ties"]["per_task_accuracy"] == pytest.approx([0.6, 0.9])
    assert summary["mudsc"] == {"skipped": "takes 2 parents"}
    assert summary["auto"]["chose"] == "ties" and summary["auto"]["reason"] == "shared base"


def test_the_synthesised_text_tasks_test_on_sentences_no_training_sentence_has(bench):
    tasks = bench.text_tasks()
    assert list(tasks) == ["topic", "intent", "sentiment", "tense"]
    for name, task in tasks.items():
        train, test = task["train"], task["test"]
        assert not set(train[0]) & set(test[0]), name
        assert sorted(set(train[1])) == sorted(set(test[1])) == list(range(len(task["labels"]))), name
        assert len(train[0]) >= 150 and len(test[0]) >= 36, name


def test_the_benchmark_scores_merges_of_the_public_api_and_writes_its_files(bench, tmp_path, capsys):
    """A tiny vision run: `linear` through hf_mudsc.merge scores exactly what the pure weighted mean of the
    fine-tunes' backbones scores; a two-parent method is reported as skipped; auto's choice is recorded."""
    out = tmp_path / "out"
    result = bench.main(["--quick", "--settings", "vision", "--methods", "linear", "average",
                         "--threads", "1", "--out-dir", str(out), "--cache-dir", str(tmp_path / "cache")])
    vision = result["settings"]["vision"]
    [run] = vision["seeds"]
    rows = run["rows"]
    assert rows["individual"]["normalised"] == 1.0
    assert rows["average"] == {"skipped": "takes 2 parents"}
    assert set(rows) == {"individual", "base", "linear", "average", "auto"}
    assert rows["auto"]["chose"] in {"linear", "ties", "task_arithmetic", "regmean"}

    # Known answer: rebuild the setting (cached) and score the pure function's merge directly.
    args = bench.argparse.Namespace(quick=True, vision_width=32, vision_epochs=3, vision_ft_epochs=1,
                                    calibration_samples=64, cache_dir=str(tmp_path / "cache"))
    setting = bench.vision_setting(args, 0)
    expected = setting.scores(task_vectors.linear(None, [bench.backbone_of(p) for p in setting.parents]))
    assert rows["linear"]["accuracy"] == expected
    own = [bench.batched_accuracy(p, x, y) for p, (x, y) in zip(setting.parents, setting.test)]
    assert rows["linear"]["normalised"] == pytest.approx(sum(a / o for a, o in zip(expected, own)) / 4)

    saved = json.loads((out / "same_base.json").read_text())
    assert saved["settings"]["vision"]["summary"]["linear"]["mean"] == pytest.approx(rows["linear"]["normalised"])
    table = (out / "same_base.md").read_text()
    assert "| linear |" in table and "takes 2 parents" in table
    assert (out / "same_base.png").read_bytes()[:4] == b"\x89PNG"
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["vision"]["normalised"]["linear"] == pytest.approx(round(rows["linear"]["normalised"], 4))


@pytest.mark.slow  # a benchmark script end to end: `-m slow` (pyproject's addopts)
def test_the_memory_benchmark_merges_in_a_process_of_its_own_and_reports_the_ratio(tmp_path, monkeypatch, capsys):
    """One real measurement (a child process merging 2 tiny parents with ties through hf_mudsc.merge); the
    report's arithmetic on canned measurements."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import bench_same_base_memory as memory

    base, parents, _ = memory.write_parents(tmp_path, 2, tiny=True)
    args = memory.argparse.Namespace(method="ties", save=False)
    run = memory.measure(args, base, parents)
    assert run["count"] == 2 and "failed" not in run, run
    assert run["peak_rss_mb"] >= run["peak_after_merge_mb"] > 50  # torch alone is more than 50 MB
    assert run["merge_seconds"] > 0

    canned = {0: 400.0, 2: 500.0, 3: 520.0}
    monkeypatch.setattr(memory, "measure", lambda args, base, parents: {"count": len(parents),
                                                                         "peak_rss_mb": canned[len(parents)]})
    result = memory.main(["--tiny", "--counts", "3", "2", "--cache-dir", str(tmp_path)])
    (ties,) = result["results"]
    assert ties["method"] == "ties"
    assert [r["count"] for r in ties["runs"]] == [2, 3]
    assert [r["above_idle_mb"] for r in ties["runs"]] == [100.0, 120.0]
    assert (ties["ratio"], ties["ratio_above_idle"], ties["meets_target"]) == (1.04, 1.2, True)
    out = capsys.readouterr().out
    assert "ties: ratio 3 vs 2: 1.04 (above idle: 1.2); target <= 1.5: met" in out

    by_method = {"linear": {2: 500.0, 3: 510.0}, "della": {2: 500.0, 3: 800.0}}
    monkeypatch.setattr(memory, "measure", lambda args, base, parents: {
        "count": len(parents), "peak_rss_mb": by_method[args.method][len(parents)] if parents else 400.0})
    result = memory.main(["--tiny", "--counts", "2", "3", "--methods", "linear", "della", "--cache-dir",
                          str(tmp_path)])
    assert [(r["method"], r["ratio"], r["meets_target"]) for r in result["results"]] == [
        ("linear", 1.02, True), ("della", 1.6, False)]
    out = capsys.readouterr().out
    assert "della: ratio 3 vs 2: 1.6 (above idle: 4.0); target <= 1.5: NOT met" in out
    assert json.loads(out.strip().splitlines()[-1])["benchmark"] == "same_base_memory"


def test_memory_benchmark_stand_in_fine_tunes_differ_from_the_base_by_seeded_noise(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import bench_same_base_memory
    from safetensors.torch import load_file

    base, parents, what = bench_same_base_memory.write_parents(tmp_path, 2, tiny=True)
    assert what == "tiny BertModel"
    b = load_file(base / "model.safetensors")
    p0, p1 = (load_file(p / "model.safetensors") for p in parents)
    key = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(p0[key], b[key]) and not torch.equal(p0[key], p1[key])
    assert float(((p0[key] - b[key]).abs() / b[key].abs().clamp_min(1e-12)).max()) < 0.1


def test_the_data_methods_run_as_published_without_the_refit_and_auto_keeps_every_default(bench, monkeypatch):
    """`refit="auto"` refits after regmean / regmean_plusplus / fisher of equally weighted parents (docs/design.md
    §4.9); the benchmark's rows for those methods measure them as published (`refit="none"`), `auto` and the
    tensor-wise methods get the merge's own defaults."""
    asked: dict[str, dict] = {}

    class Merged:
        config = type("Config", (), {"mudsc": {}})()

        def state_dict(self) -> dict:
            return {}

    def fake_merge(parents, calibration, *, method, **options):
        asked[method] = options
        return Merged()

    monkeypatch.setattr(bench.hf_mudsc, "merge", fake_merge)
    setting = bench.Setting("toy", None, [], [], [], [])
    for method in ("regmean", "regmean_plusplus", "fisher", "linear", "ties", "auto"):
        bench.run_method(setting, method, 0)
    assert {method: options.get("refit") for method, options in asked.items()} == {
        "regmean": "none", "regmean_plusplus": "none", "fisher": "none", "linear": None, "ties": None, "auto": None}
