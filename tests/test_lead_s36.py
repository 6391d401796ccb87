"""Session 36 (lead): defects found test first."""

from __future__ import annotations

import json

import pytest

BODY = {"models": ["user/a", "user/b"], "method": "average", "dry_run": True}


@pytest.mark.parametrize("content_type", ["application/json", "application/yaml"])
def test_a_job_body_starting_with_a_byte_order_mark_is_read(tmp_path, content_type):
    """POST '\\ufeff{...}' (Windows editors, PowerShell's Out-File save one): was a 400 "not valid JSON" though a recipe
    file with the same BOM merges; the mark is dropped as for a recipe file (RFC 8259 lets a parser ignore it)."""
    from fastapi.testclient import TestClient

    from hf_mudsc.serve.app import create_app

    client = TestClient(create_app(tmp_path / "state"), base_url="http://127.0.0.1")
    body = "\ufeff" + json.dumps(BODY)
    answer = client.post("/api/jobs", content=body.encode(), headers={"Content-Type": content_type})
    assert answer.status_code == 201, answer.text
    job = client.get(f"/api/jobs/{answer.json()['id']}").json()
    assert job["recipe"]["models"] == BODY["models"]
    # only a leading mark: one inside the text is the text's (a name holding U+FEFF is no BOM)
    inside = json.dumps({**BODY, "output": "x\ufeffy"}, ensure_ascii=False).encode()
    kept = client.post("/api/jobs", content=inside, headers={"Content-Type": content_type})
    assert kept.status_code == 201, kept.text
    assert client.get(f"/api/jobs/{kept.json()['id']}").json()["recipe"]["output"] == "x\ufeffy"


@pytest.mark.parametrize("command", [["demo"], ["inspect", "merged"]])
def test_every_command_writing_a_folder_takes_o_for_output(command):
    """`hf-mudsc demo -o out` was refused ("unrecognized arguments: -o") while `merge -o out` works and the README says
    `-o` is short for `--output`: every command with an --output takes -o."""
    from hf_mudsc.cli.main import build_parser

    args = build_parser().parse_args([*command, "-o", "out"])
    assert args.output == "out"
    assert build_parser().parse_args([*command, "--output", "out"]).output == "out"


def test_a_parent_object_whose_id2label_keys_are_no_numbers_is_refused_in_one_line():
    """merge([a, b]) with a.config.id2label = {"a": "x", ...} (set on the object): a bare `ValueError: invalid literal
    for int()` from the label code; a folder's config.json with such keys was already one line (AutoConfig's)."""
    from factories import make_model

    import hf_mudsc
    from hf_mudsc.errors import LoadError

    a, b = make_model("vit_cls", seed=0), make_model("vit_cls", seed=1)
    a.config.id2label = {"a": "x", "b": "y", "c": "z"}
    with pytest.raises(LoadError) as caught:
        hf_mudsc.merge([a, b], method="average", progress=False)
    message = str(caught.value)
    assert "\n" not in message and "id2label" in message and "'a'" in message, message
    assert a.config.id2label == {"a": "x", "b": "y", "c": "z"}


def test_the_gates_log_lines_show_scores_and_tasks_as_the_card_does(caplog):
    """The card and inspect show gate scores with the digits that tell them apart and name lowered tasks; the merge's
    own INFO lines said '%.4f' and 'task(s) [1]' (a dropped refit could log as a tie, a task index as a list)."""
    import logging

    from test_refit_gate import THREE, Built, CountingRefit, FixedLogits, _batches

    from hf_mudsc.apply.refit_gate import gated_refit
    from hf_mudsc.options import gate_scores

    merged = FixedLogits([1.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    refit = CountingRefit([1.0, 0.0, 0.0, 0.8, 4.0, 0.0])  # task B a little less sure: dropped for task B
    with caplog.at_level(logging.INFO, logger="hf_mudsc"):
        _, _, decision = gated_refit(merged, THREE, lambda: _batches(10), refit, task_sizes=[2, 2, 2])
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("refit gate: held-out"))
    none, refitted = gate_scores(decision.score_none, decision.score_refit)
    assert f" {none} without the refit, {refitted} with it" in line, line
    assert "it lowered the own term of parent(s) B" in line and "[1]" not in line, line
    caplog.clear()
    merged = FixedLogits([1.0, 0.0, 0.0, 0.2, 0.0, 0.0])
    refit = CountingRefit([1.5, 0.0, 0.0, 0.5, 4.0, 0.0])
    average = Built(FixedLogits([1.0, 0.0, 0.0, 1.0, 1.0, 0.0]))
    with caplog.at_level(logging.INFO, logger="hf_mudsc"):
        gated_refit(merged, THREE, lambda: _batches(10), refit, task_sizes=[2, 2, 2], average=average)
    assert "the merge is below it on parent(s) B: averaging kept" in caplog.text, caplog.text


def test_parents_that_each_hold_every_task_are_not_told_to_pass_them_in_merge_order():
    """evaluate_merge(m, [ab, ab2]) of a same-label merge of two merged parents said '2 parents holding 4 tasks ...
    pass the parents in merge order' — they were in merge order; the line now says what they are and what to do."""
    from hf_mudsc.evaluate.tasks import parents_tasks_mismatch

    ranges = {"task1": (0, 2), "task2": (2, 5)}
    line = parents_tasks_mismatch([2, 2], ranges)
    assert "\n" not in line and "each of the 2 parents holds all 2" in line and "--no-parents" in line, line
    assert "merge order" not in line
    assert "merge order" in parents_tasks_mismatch([2, 1, 1], ranges)  # one task too many: as before
    assert parents_tasks_mismatch([1, 1], ranges) is None
