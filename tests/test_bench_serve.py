"""scripts/bench_serve.py builds parents of any `--hidden`: its attention head count divides the hidden size (a
head count that does not leaves weights the merge cannot split into heads, and the merge job fails)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import bench_serve

    return bench_serve


@pytest.mark.parametrize("hidden", [32, 100, 200])
def test_the_parents_heads_divide_the_hidden_size(bench, tmp_path, hidden):
    a, b, _ = bench.make_inputs(tmp_path, hidden=hidden, layers=1, samples=2)
    for folder in (a, b):
        config = json.loads((folder / "config.json").read_text())
        assert config["hidden_size"] == hidden
        assert config["num_attention_heads"] >= 1 and hidden % config["num_attention_heads"] == 0, config


def test_a_hidden_size_below_one_is_refused_in_one_line(bench, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["bench_serve.py", "--hidden", "0"])
    with pytest.raises(SystemExit):
        bench.main()
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--hidden must be at least 1, got 0" in error
