"""scripts/bench_refit_cost.py (issue 12's cost measurement) runs end to end: a smoke run of its tiny case in a
subprocess, as a user runs it, checking its JSON lines and its ratio lines."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_refit_cost.py"


def test_bench_refit_cost_tiny_case_prints_one_json_line_per_configuration_and_the_ratios(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--case", "tiny", "--num-samples", "24", "--batch-size", "8",
                           "--threads", "1"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 4, done.stdout
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
    for line, key, label in ((lines[2], "merge_seconds", "time"), (lines[3], "merge_cpu_seconds", "CPU time")):
        found = re.fullmatch(rf"merge {label} auto\+refit / plain = (\d+\.\d\d) \(([+-]\d+)%; target: at most "
                             r"\+100%\)", line)
        assert found, line
        ratio = auto[key] / plain[key]
        assert float(found[1]) == round(ratio, 2) and int(found[2]) == round(100 * (ratio - 1))
