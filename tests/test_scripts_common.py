"""The benchmark scripts share `scripts/common.py`: imported normally, no loading of each other by path."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_mudsc.testing import toy

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def test_no_script_loads_another_by_path_or_edits_sys_path():
    """Only common.py may add the checkout to sys.path (when the library is not installed)."""
    offenders = {}
    for script in sorted(SCRIPTS.glob("*.py")):
        text = script.read_text(encoding="utf-8")
        found = re.findall(r"spec_from_file_location|sys\.path\.(?:insert|append)|import benchmark_quality", text)
        if found and script.name != "common.py":
            offenders[script.name] = found
    assert offenders == {}


@pytest.mark.slow  # a benchmark script end to end: `-m slow` (pyproject's addopts)
def test_scripts_import_common_and_share_the_benchmark_pair_settings(tmp_path):
    """As `python scripts/x.py` runs them (scripts/ first on sys.path): every script imports, and the pairs the
    digests and the analysis build use exactly the quality benchmark's defaults."""
    code = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(SCRIPTS)!r})\n"
        "import common, benchmark_quality, merge_digests, analyze_missed_targets, bench_merge, bench_matchers\n"
        "bench = benchmark_quality.parse_args([])\n"
        "keys = sorted(common.PAIR_DEFAULTS)\n"
        "print(json.dumps([{k: getattr(bench, k) for k in keys}, vars(common.pair_settings())]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    bench, common = json.loads(done.stdout.strip().splitlines()[-1])
    assert bench == common
    assert common["epochs"] == toy.DEFAULT_EPOCHS and common["ft_epochs"] == 10
    assert common["cache_dir"].endswith("bench")


def test_write_json_is_the_library_atomic_write(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import common

    path = tmp_path / "out" / "result.json"
    common.write_json(path, {"b": 1, "a": [1.5, "α"]})
    assert path.read_text(encoding="utf-8") == '{\n "b": 1,\n "a": [\n  1.5,\n  "\\u03b1"\n ]\n}\n'

    with pytest.raises(TypeError):
        common.write_json(path, {"c": object()})  # not serialisable: the old file stays whole
    assert json.loads(path.read_text(encoding="utf-8")) == {"b": 1, "a": [1.5, "α"]}
    assert sorted(p.name for p in path.parent.iterdir()) == ["result.json"]


def test_benchmark_finetuning_is_the_toy_loop_with_decay_on_every_parameter(monkeypatch):
    """`common.finetune` (the benchmark's same-init / MiniLM fine-tuning) runs `toy.fit_classifier`: the same
    weights as the loop the benchmark used to carry (AdamW, one group, weight decay 0.01 on every parameter)."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import common

    torch.manual_seed(0)
    config = toy.tiny_vit_config(3, hidden_size=16, image_size=8)
    base = toy.train_vit(config, torch.randn(24, 1, 8, 8), torch.arange(24) % 3, seed=1, epochs=1)
    pixels, labels = torch.randn(40, 1, 8, 8), torch.arange(40) % 3

    expected = _reference_finetune(_copy(base), pixels, labels, seed=5, epochs=2, lr=5e-4, batch_size=16)
    state_before = torch.random.get_rng_state()
    got = common.finetune(_copy(base), {"pixel_values": pixels}, labels, seed=5, epochs=2, lr=5e-4, batch_size=16)
    assert torch.equal(torch.random.get_rng_state(), state_before)  # the caller's RNG is left alone
    assert not got.training
    for key, value in expected.state_dict().items():
        assert torch.equal(got.state_dict()[key], value), key
    assert not torch.equal(got.classifier.weight, base.classifier.weight)


def _copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model)


def _reference_finetune(model, pixels, labels, *, seed, epochs, lr, batch_size):
    """The benchmark's former loop, written out: one AdamW group, linear warm-up (10 %), cosine decay."""
    import math

    import torch.nn.functional as F

    steps = epochs * math.ceil(len(labels) / batch_size)
    warm = max(1, int(0.1 * steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=gen)
        for start in range(0, len(labels), batch_size):
            idx = order[start:start + batch_size]
            loss = F.cross_entropy(model(pixel_values=pixels[idx]).logits, labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return model.eval()


@pytest.mark.slow  # a benchmark script end to end: `-m slow` (pyproject's addopts)
def test_benchmark_quality_methods_keeps_the_named_rows_in_table_order_and_refuses_unknown_labels(tmp_path):
    """`--methods` narrows the two-parent rows (e.g. the slow MiniLM scenario) without reordering them; an unknown
    label is an argparse error naming the choices, before any model is built."""
    code = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(SCRIPTS)!r})\n"
        "import benchmark_quality as b\n"
        "picked = b.chosen_methods(b.parse_args(['--methods', 'mudsc zip', 'default', 'average']))\n"
        "every = b.chosen_methods(b.parse_args([]))\n"
        "print(json.dumps([[m[0] for m in picked], [m[0] for m in every], [m[0] for m in b.BASE_METHODS]]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    picked, every, table = json.loads(done.stdout.strip().splitlines()[-1])
    assert picked == ["default", "average", "mudsc zip"]
    assert every == table
    refused = subprocess.run([sys.executable, str(SCRIPTS / "benchmark_quality.py"), "--methods", "nonsense"],
                             capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert refused.returncode == 2
    assert "invalid choice: 'nonsense'" in refused.stderr


@pytest.mark.slow  # a benchmark script end to end: `-m slow` (pyproject's addopts)
def test_join_sizes_merges_runs_on_the_same_pairs_and_refuses_runs_on_other_pairs(tmp_path):
    """`benchmark_quality.py --join-sizes` (no merging): rows of several size-budget runs on the same (width,
    split) are joined into one record; the summary and the plot read every spend; a row two runs measured
    differently stops the join with the row and pair named."""
    def run(rows: dict) -> dict:
        return {"records": [{"scenario": "size_budget", "width": 8, "split": 0, "rows": rows}]}

    def row(joint: float, size: float, ratio: float, spend: str = "mlp") -> dict:
        return {"joint": joint, "task_a": 0.9, "task_b": 0.9, "size": size, "refit": "auto", "spend": spend,
                "parameter_ratio": ratio, "flops_ratio": ratio}

    ensemble = {"joint": 0.8, "task_a": 0.9, "task_b": 0.9}
    first = run({"ensemble": ensemble, "size 1 refit auto": row(0.7, 1, 1.0),
                 "size 1.5 refit auto": row(0.72, 1.5, 1.5)})
    second = run({"ensemble": ensemble, "size 1 refit auto": row(0.7, 1, 1.0),
                  "size 1.5 heads refit auto": row(0.75, 1.5, 1.5, "heads")})
    other = run({"ensemble": {**ensemble, "joint": 0.6}})
    for name, result in (("a", first), ("b", second), ("c", other)):
        (tmp_path / f"{name}.json").write_text(json.dumps(result))
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(SCRIPTS / "benchmark_quality.py"), "--join-sizes",
                           str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out-dir", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    joined = json.loads((out / "size_budget.json").read_text())
    assert [sorted(r["rows"]) for r in joined["records"]] == [
        ["ensemble", "size 1 refit auto", "size 1.5 heads refit auto", "size 1.5 refit auto"]]
    assert joined["sizes"] == [1, 1.5]
    assert joined["summary"]["8"]["size 1.5 heads refit auto"]["joint"]["mean"] == 0.75
    assert (out / "size_budget.png").stat().st_size > 0 and "size 1.5 heads refit auto" in (
        out / "size_budget.md").read_text()
    refused = subprocess.run([sys.executable, str(SCRIPTS / "benchmark_quality.py"), "--join-sizes",
                              str(tmp_path / "a.json"), str(tmp_path / "c.json"), "--out-dir", str(tmp_path / "x")],
                             capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert refused.returncode == 1
    assert "'ensemble' at hidden 8 split 0 is 0.6 here and 0.8 in an earlier file" in refused.stderr
    assert not (tmp_path / "x" / "size_budget.json").exists()


def test_joint_rules_scores_both_rules_and_summarises_the_gap(monkeypatch):
    """`scripts/joint_rules.py`: raw = argmax over the concatenation, per_task = each slice's softmax first."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import joint_rules

    out = torch.tensor([[2.0, 0.0, 5.0, 4.0, 4.5], [0.0, 0.0, 0.0, 0.0, 9.0]])  # A's slice small, B's large
    ranges = {"a": [0, 2], "b": [2, 5]}
    labels = torch.tensor([0, 4])
    assert joint_rules.accuracy(joint_rules.decide(out, ranges, "raw"), labels) == 50.0
    assert joint_rules.accuracy(joint_rules.decide(out, ranges, "per_task"), labels) == 100.0
    rows = [{"width": 64, "merged": {"joint_raw": m_raw, "joint_per_task": m_pt, "task_a": 90.0, "task_b": 95.0},
             "ensemble": {"joint_raw": e_raw, "joint_per_task": e_pt, "task_a": 95.0, "task_b": 96.0}}
            for m_raw, m_pt, e_raw, e_pt in ((70.0, 74.0, 68.0, 76.0), (72.0, 76.0, 70.0, 80.0))]
    summary = joint_rules.summarise(rows)["64"]
    assert summary["pairs"] == 2 and summary["merged_joint_per_task"][0] == 75.0
    assert summary["gap_raw"] == -2.0 and summary["gap_per_task"] == 3.0
    assert "| 64 | 2 | 71.0 ± 1.4 | 69.0 ± 1.4 | -2.0 | 75.0 ± 1.4 | 78.0 ± 2.8 | 3.0 |" in joint_rules.table(
        {"64": summary})


def test_paired_differences_compares_rows_on_the_same_pairs(monkeypatch):
    """`scripts/paired_differences.py`: per-pair joint differences, wins, and 'ahead by more than the spread'."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import paired_differences

    def record(split: int, zip_joint: float, other_joint: float) -> dict:
        return {"scenario": "different_init", "width": 64, "split": split,
                "rows": {"ensemble": {"joint": 0.9}, "mudsc zip": {"joint": zip_joint},
                         "zipit": {"joint": other_joint}, "missing": {"joint": None}}}

    records = [record(0, 0.80, 0.70), record(1, 0.70, 0.72), record(2, 0.90, 0.60)]
    result = paired_differences.differences(records, "mudsc zip")["different_init 64"]
    assert result["pairs"] == 3 and list(result["against"]) == ["zipit"]  # no ensemble, no row without figures
    zipit = result["against"]["zipit"]
    assert zipit["mean"] == pytest.approx((10 - 2 + 30) / 3) and zipit["wins"] == 2 and zipit["ties"] == 0
    assert result["row_std"] == pytest.approx(10.0)
    assert zipit["ahead_by_more_than_spread"] is True  # 12.7 > 10.0
    assert "| zipit | +12.7 ± 16.2 | 2 / 0 | yes |" in paired_differences.table(
        {"different_init 64": result}, "mudsc zip")


@pytest.mark.slow  # a benchmark script end to end: `-m slow` (pyproject's addopts)
def test_benchmark_quality_tables_print_every_row_methods_can_choose(tmp_path):
    """A row `--methods` accepts must reach the markdown tables: the refit variants ("mudsc zip refit repair",
    "zipit refit none", ...) were merged and kept in the JSON but left out of every table (ROW_ORDER lacked them)."""
    code = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(SCRIPTS)!r})\n"
        "import benchmark_quality as b\n"
        "labels = [label for label, _ in b.chosen_methods(b.parse_args([]))]\n"
        "rows = {label: {'task_a': 0.5, 'task_b': 0.5, 'average': 0.5, 'joint': 0.25} for label in labels}\n"
        "record = {'scenario': 'bert_permuted', 'width': None, 'split': None, 'basis_drift_after_finetuning': 0.0,\n"
        "          'pairs': {'permuted': rows}}\n"
        "text = b.markdown({'command': 'x', 'alphas': [0.5], 'records': [record], 'summary': {}})\n"
        "line = lambda label: f'| {b.ROW_NAMES.get(label, label)} | permuted |'\n"
        "print(json.dumps([label for label in labels if line(label) not in text]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
