"""`scripts/demo_seeds.py`: the demo's table over seed pairs, parsed and summarised as printed."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "demo_seeds.py"


def _script():
    spec = importlib.util.spec_from_file_location("demo_seeds", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TABLE = """
| model | digits-0-4 | digits-5-9 | joint | average |
|---|---:|---:|---:|---:|
| parent A (digits 0-4) | 0.9889 | - | 0.4954 | - |
| mudsc (zip) + refit (default) | 0.9778 | 0.9591 | 0.8500 | 0.9684 |
| regmean + refit | 0.9741 | 0.9628 | 0.8609 | 0.9684 |
"""


def test_the_demos_table_is_parsed_and_each_row_compared_with_the_default_on_the_same_pairs():
    demo_seeds = _script()
    first = demo_seeds.parse_table(TABLE)
    assert first == {"parent A (digits 0-4)": 0.4954, "mudsc (zip) + refit (default)": 0.85, "regmean + refit": 0.8609}
    second = {"parent A (digits 0-4)": 0.5, "mudsc (zip) + refit (default)": 0.9, "regmean + refit": 0.86}
    summary = {row["row"]: row for row in demo_seeds.summarise([first, second])}
    regmean = summary["regmean + refit"]
    assert regmean["joint_mean"] == pytest.approx((0.8609 + 0.86) / 2)
    assert regmean["minus_default_mean"] == pytest.approx(((0.8609 - 0.85) + (0.86 - 0.9)) / 2)
    assert regmean["ahead_of_default"] == 1 and regmean["pairs"] == 2
    assert summary["mudsc (zip) + refit (default)"]["minus_default_mean"] == 0.0
    order = [row["row"] for row in demo_seeds.summarise([first, second])]
    assert order == ["mudsc (zip) + refit (default)", "regmean + refit", "parent A (digits 0-4)"]  # best first


@pytest.mark.slow  # two demos end to end: `-m slow` (pyproject's addopts)
def test_demo_seeds_runs_the_demo_per_pair_and_prints_one_json_line_and_the_table(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, str(SCRIPT), "--pairs", "2", "--epochs", "2", "--cache-dir",
                           str(tmp_path / "cache")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout.splitlines()[0])
    assert record["pairs"] == [[0, 1], [2, 3]] and len(record["joint_per_pair"]) == 2
    assert {row["row"] for row in record["summary"]} >= {"mudsc (zip) + refit (default)", "ensemble (A+B)"}
    assert "| row | joint (mean ± std over 2 pairs) |" in done.stdout
