"""scripts/bench_refit_cost.py (issue 12's cost measurement) runs end to end: a smoke run of its tiny case in a
subprocess, as a user runs it, checking its JSON lines and its ratio lines."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_refit_cost.py"


@pytest.mark.slow  # a benchmark script end to end: `-m slow` (pyproject's addopts)
def test_bench_refit_cost_tiny_case_prints_one_json_line_per_configuration_and_the_ratios(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--case", "tiny", "--num-samples", "24", "--batch-size", "8",
                           "--threads", "1"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 5, done.stdout
    rows = [json.loads(line) for line in lines[:2]]
    assert [row["config"] for row in rows] == ["plain", "auto+refit"]
    plain, auto = rows
    assert {row["case"] for row in rows} == {"tiny"} and {row["num_samples"] for row in rows} == {24}
    assert plain["options"] == {"alpha": 0.5, "refit": "none"}
    assert auto["options"] == {"alpha": "auto", "refit": "auto"}  # the library's default refit ...
    assert (plain["refit"], auto["refit"]) == ("none", "gate")    # ... resolves to the held-out gate here
    # No refit in the plain merge; the gate's refit read the 20 examples not held out (every 5th of 24 is; fewer than
    # refit_samples="auto"'s floor), its parents in 2 passes (the first step alone, then every other step's targets
    # in one chunk); the gate decided (kept or not).
    assert (plain["refit_seconds"], plain["refit_examples"], plain["parent_passes"]) == (0.0, 0, 0)
    assert auto["refit_examples"] == 20 and auto["parent_passes"] == 2 and auto["refit_seconds"] > 0
    assert plain["gate_kept"] is None and auto["gate_kept"] in (True, False)
    assert plain["alpha"] == 0.5 and auto["alpha"] in (0.1, 0.3, 0.5, 0.7, 0.9)
    for row in rows:
        assert row["merge_cpu_seconds"] > 0 and row["merge_seconds"] > 0 and row["peak_rss_mb"] > 100
    summary = json.loads(lines[2])
    assert summary["baseline"] is None
    assert summary["ratios"] == {"merge_seconds:plain": round(auto["merge_seconds"] / plain["merge_seconds"], 3),
                                 "merge_cpu_seconds:plain": round(auto["merge_cpu_seconds"]
                                                                  / plain["merge_cpu_seconds"], 3)}
    assert lines[3].split()[:3] == ["auto+refit", "against", "wall"]
    found = re.fullmatch(r"plain \(this code: α 0\.5, no refit\)\s+(\d+\.\d\d)\s+(\d+\.\d\d)", lines[4])
    assert found, lines[4]
    assert float(found[1]) == round(auto["merge_seconds"] / plain["merge_seconds"], 2)
    assert float(found[2]) == round(auto["merge_cpu_seconds"] / plain["merge_cpu_seconds"], 2)


@pytest.mark.slow  # a benchmark script end to end: `-m slow` (pyproject's addopts)
def test_bench_refit_cost_baseline_runs_the_default_merge_of_another_revision_from_its_own_code(tmp_path):
    """`--baseline REV` (issue 12's "today's merge time": the code before the issue, d4c1fc9) extracts REV with `git
    archive` and times its default merge from there; HEAD stands in for the old revision (a shallow clone has it)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--case", "tiny", "--num-samples", "24", "--batch-size", "8",
                           "--threads", "1", "--baseline", "HEAD"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 7, done.stdout
    rows = {row["config"]: row for row in map(json.loads, lines[:3])}
    assert list(rows) == ["plain", "auto+refit", "baseline"]
    # The baseline passes only α (the old code knew no other option); the child refuses to run if its hf_mudsc was
    # not imported from the extracted tree.
    assert rows["baseline"]["options"] == {"alpha": 0.5} and rows["baseline"]["merge_cpu_seconds"] > 0
    summary = json.loads(lines[3])
    assert summary["baseline"] == "HEAD"
    assert summary["ratios"]["merge_cpu_seconds:baseline"] == round(
        rows["auto+refit"]["merge_cpu_seconds"] / rows["baseline"]["merge_cpu_seconds"], 3)
    assert lines[6].startswith("baseline (HEAD: its default merge)")
    assert not list(tmp_path.iterdir())  # nothing left in the working folder (the extracted tree was temporary)


def test_bench_refit_cost_baseline_of_an_unknown_revision_is_refused_in_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--case", "tiny", "--baseline", "no-such-revision"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode != 0
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("--baseline no-such-revision: git archive failed") and "d4c1fc9" in message, done.stderr
