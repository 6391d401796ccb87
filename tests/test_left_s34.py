"""Defects left by earlier sessions and fixed in session 34: each reproduced here first."""

from __future__ import annotations

import logging

import pytest
from factories import make_batches
from test_avg_s33 import fine_tunes_of_one_base

import hf_mudsc

pytestmark = pytest.mark.usefixtures("one_thread_module")


def test_warnings_of_a_returned_average_name_plain_averaging_not_the_method_it_replaced(monkeypatch, caplog):
    """`merge(same_base_parents, data, alpha=0.3)`: auto chose regmean, which does not read α; when the averaging
    check then returned plain averaging the model (method linear) still said "method regmean does not read alpha=",
    naming a method that is not this model's. Now the returned merge's warnings are the average's ("method linear
    does not read alpha="), also logged, and no warning names the replaced method."""
    from hf_mudsc.apply import refit_gate

    parents, batches = fine_tunes_of_one_base(2), make_batches("vit_cls", num_batches=4, batch_size=8)
    kept = hf_mudsc.merge(parents, batches, alpha=0.3, progress=False)
    replaced = kept.config.mudsc["method"]
    assert any(f"method {replaced} does not read alpha=" in text for text in kept.config.mudsc["warnings"])
    monkeypatch.setattr(refit_gate.AverageCheck, "kept", property(lambda self: True))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_mudsc"):
        merged = hf_mudsc.merge(parents, batches, alpha=0.3, progress=False)
    returned = merged.config.mudsc["method"]
    assert returned != replaced
    warnings = merged.config.mudsc["warnings"]
    assert f"method {returned} does not read alpha= (CLI: --alpha): it has no effect" in warnings, warnings
    assert not any(f"method {replaced} " in text for text in warnings), warnings
    assert merged.merge_report.warnings == warnings
    logged = [record.getMessage() for record in caplog.records]
    assert sum(f"method {returned} does not read alpha=" in text for text in logged) == 1, logged  # once
    # (review) the replaced method's other notes too: options of unit matching, the base, the data it read
    merged = hf_mudsc.merge(parents, batches, alpha=0.3, independent_heads=True, base=parents[0], refit_lambda=0.5,
                            progress=False)
    warnings = merged.config.mudsc["warnings"]
    assert merged.config.mudsc["method"] == returned
    assert not any(replaced in text for text in warnings), warnings
    assert any(f"method {returned} does not read alpha=" in text for text in warnings), warnings
    assert any("refit_lambda" in text and "no refit runs" in text for text in warnings), warnings
    assert not any("calibration data" in text and "no effect" in text for text in warnings), warnings  # it chose


def test_the_memory_check_counts_every_process_a_launcher_starts_on_this_machine(monkeypatch):
    """`torchrun --nproc_per_node 4 -m hf_mudsc merge ...`: each process loads the parents and holds the summed
    statistics (process 0 alone then solves, the others return), but each process's memory check held one process's
    floor against the machine's whole free memory: four processes passed a check that fit one and ran out of memory
    in calibration. Now the check holds the larger of process 0's floor and every process's share
    (`LOCAL_WORLD_SIZE`, set by torchrun and accelerate), and its one-line refusal names them and the fix. (The
    review's case: a floor that process 0 alone reaches — a method's working set — is not counted once per process.)"""
    from factories import make_model

    import hf_mudsc.plan as plan
    from hf_mudsc.errors import MergeInputError
    from hf_mudsc.memory import local_processes
    from hf_mudsc.methods.registry import METHODS

    model, mudsc = make_model("bert_cls", 1), METHODS["mudsc"]
    floor = plan.memory_floor(model, 2, mudsc, loading=2)
    one = sum(floor.values())
    shared = floor["weights"] + floor["statistics"]  # what a process that does not solve holds too
    assert 4 * shared > one > shared
    monkeypatch.setattr(plan, "available_memory", lambda: int(one * 1.01))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert local_processes() == 1
    plan.check_memory(model, 2, mudsc, loading=2)  # one process: fits
    for value in ("", "x", "0", "-3"):  # not a launcher's count: one process
        monkeypatch.setenv("LOCAL_WORLD_SIZE", value)
        assert local_processes() == 1
        plan.check_memory(model, 2, mudsc, loading=2)
    monkeypatch.setattr(plan, "available_memory", lambda: 1)
    with pytest.raises(MergeInputError) as error:  # one process: no launch advice, nothing "times over"
        plan.check_memory(model, 2, mudsc, loading=2)
    assert "launch fewer" not in str(error.value) and "times over" not in str(error.value), str(error.value)
    monkeypatch.setattr(plan, "available_memory", lambda: int(one * 1.01))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert local_processes() == 4
    with pytest.raises(MergeInputError) as error:
        plan.check_memory(model, 2, mudsc, loading=2)
    line = str(error.value)
    assert "\n" not in line and "4 times over: the 4 processes on this machine each load the parents" in line, line
    assert "launch fewer processes per machine (torchrun --nproc_per_node, accelerate launch --num_processes)" in line
    assert plan.memory_shortfall(model, 2, mudsc, loading=2) == (4 * shared, int(one * 1.01))
    monkeypatch.setattr(plan, "available_memory", lambda: int(4 * shared * 1.01))
    plan.check_memory(model, 2, mudsc, loading=2)  # room for all four: fits
    assert plan.memory_shortfall(model, 2, mudsc, loading=2) is None
    # Process 0's own floor larger than the processes' shares: counted once, and no launch advice.
    regmean = METHODS["regmean"]
    working = plan.memory_floor(model, 2, regmean, loading=2)
    assert plan.machine_floor(working, 2) == max(sum(working.values()), 2 * working["weights"])
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    big = {"weights": 10.0, "working": 100.0}
    assert plan.machine_floor(big, 2) == 110.0 and plan.machine_floor(big, 20) == 200.0
    monkeypatch.setattr(plan, "memory_floor", lambda *args, **kwargs: dict(big))
    monkeypatch.setattr(plan, "available_memory", lambda: 105)
    with pytest.raises(MergeInputError) as error:  # process 0 alone does not fit: fewer processes would not help
        plan.check_memory(model, 2, regmean, loading=2)
    assert "needs at least 110 B" in str(error.value), str(error.value)
    assert "launch fewer" not in str(error.value) and "times over" not in str(error.value), str(error.value)


@pytest.mark.parametrize("flag", ["", "   "])
def test_a_blank_api_key_flag_is_refused_not_read_as_no_key(tmp_path, flag, monkeypatch, capsys):
    """(review) HF_MUDSC_API_KEY=secret hf-mudsc serve --api-key "  ": the blank flag won over the environment
    variable and was then cleaned to no key — the service started without the key its operator set, saying nothing.
    Now one line, exit 1, nothing started, the key not shown."""
    import uvicorn

    from hf_mudsc.cli.main import main

    started: list[object] = []
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: started.append(args))
    monkeypatch.setenv("HF_MUDSC_API_KEY", "secret-key-1234")
    code = main(["serve", "--api-key", flag, "--port", "0", "--state-dir", str(tmp_path / "state")])
    err = capsys.readouterr().err
    assert code == 1 and started == [], err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "--api-key is empty" in err and "secret-key-1234" not in err, err


def test_a_json_body_sent_as_yaml_with_a_huge_integer_is_named_json(tmp_path):
    """(review) POST '{"models": [...], "seed": 1000...0}' (5000 digits) as YAML: the page's JSON recipe was read as
    JSON and refused as "the body's YAML holds an integer too large". Now the message names the JSON it was read as."""
    from fastapi.testclient import TestClient

    from hf_mudsc.serve.app import create_app

    body = '{"models": ["user/a", "user/b"], "seed": 1' + "0" * 5000 + "}"
    client = TestClient(create_app(tmp_path / "state"), base_url="http://127.0.0.1", raise_server_exceptions=False)
    answer = client.post("/api/jobs", content=body.encode(), headers={"Content-Type": "text/yaml"})
    assert answer.status_code == 400, answer.text
    assert "the body's JSON holds an integer too large" in answer.json()["error"], answer.text


def test_text_p_methods_pairs_each_row_with_mudsc_zip_under_the_same_refit(monkeypatch):
    """`scripts/text_p_methods.py`'s paired column: a `refit none` row is paired with `mudsc zip refit none` (the
    paper's merge against the paper's merge), every other row with the refitted `mudsc zip`; ahead / tied counted."""
    import importlib.util
    from pathlib import Path

    scripts = Path(__file__).resolve().parents[1] / "scripts"
    monkeypatch.syspath_prepend(str(scripts))
    spec = importlib.util.spec_from_file_location("text_p_methods", scripts / "text_p_methods.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def row(joint: float) -> dict[str, float]:
        return {"task_0": 90.0, "task_1": 80.0, "joint": joint}

    records = [{"pair": f"p{i}", "rows": {"ensemble": row(90.0), "mudsc zip": row(70.0 + i),
                                           "mudsc zip refit none": row(80.0), "zipit": row(75.0),
                                           "zipit refit none": row(40.0 + 10 * i)}} for i in range(2)]
    labels = ["mudsc zip", "mudsc zip refit none", "zipit", "zipit refit none"]
    result = module.summary(records, labels)
    assert result["zipit"]["mudsc_zip_minus"]["mean"] == -4.5  # (70 − 75 + 71 − 75) / 2
    assert result["zipit"]["mudsc_zip_minus"]["wins"] == 0
    assert result["zipit refit none"]["mudsc_zip_minus"]["mean"] == 35.0  # (80 − 40 + 80 − 50) / 2
    assert result["zipit refit none"]["mudsc_zip_minus"]["wins"] == 2
    assert "mudsc_zip_minus" not in result["mudsc zip refit none"] and "mudsc_zip_minus" not in result["mudsc zip"]
    assert "| zipit refit none | 90.0 ± 0.0 | 80.0 ± 0.0 | 45.0 ± 7.1 | +35.0 ± 7.1 | 2 / 0 of 2 |" in (
        module.markdown(result, labels))


def test_every_merged_model_of_the_demos_chart_has_a_bar_style_of_its_own():
    """`hf-mudsc demo`'s accuracy chart draws 12 merged models with a 9-colour palette: `regmean + refit` was drawn in
    `mudsc (zip) + refit`'s red (and two more pairs alike), so the legend could not tell them apart. Past the palette
    the bars are hatched: each merged model's (colour, hatch) is its own."""
    from matplotlib.colors import to_hex

    from hf_mudsc.evaluate.results import EvaluationResult
    from hf_mudsc.publish.plots import accuracy_figure

    merged = [f"merge {i}" for i in range(20)]
    tasks = {name: {"dataset": "org/d", "split": "test"} for name in ("a", "b")}
    scores = {**{name: {"a": {"accuracy": 0.5}, "b": {"accuracy": 0.5}} for name in merged},
              "parent_a": {"a": {"accuracy": 0.9}}, "parent_b": {"b": {"accuracy": 0.8}},
              "ensemble": {"a": {"accuracy": 0.9}, "b": {"accuracy": 0.8}}}
    axes = accuracy_figure(EvaluationResult(metrics=["accuracy"], tasks=tasks, scores=scores,
                                            merged=merged).to_dict()).axes[0]
    styles = [(to_hex(container.patches[0].get_facecolor()), container.patches[0].get_hatch())
              for container in axes.containers[3:]]  # parents A, B and the ensemble first
    assert len(styles) == 20 and len(set(styles)) == 20, styles
    assert styles[0][1] is None and styles[8][1] is None  # the palette's nine plain first
