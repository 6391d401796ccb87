"""What a merge records and its card says about itself, against what ran (session 31's report hunt)."""

from __future__ import annotations

import pytest
from factories import make_batches, make_model

import hf_mudsc
from hf_mudsc.apply.fidelity import choose_alpha

pytestmark = pytest.mark.usefixtures("one_thread_module")


def _card(merged, folder) -> str:
    hf_mudsc.save_merged(merged, folder)
    return (folder / "README.md").read_text()


def _row(card: str, start: str) -> str:
    return next(line for line in card.splitlines() if line.startswith(start))


def test_alpha_auto_without_a_held_out_example_records_no_fidelity(tmp_path):
    """Four calibration examples hold none out: no α was scored, yet the record, the card and the plot gave every α
    a held-out fidelity of 0.000 (the refit gate records None there)."""
    merged = hf_mudsc.merge([make_model("vit_cls", 1, 3), make_model("vit_cls", 2, 3)],
                            make_batches("vit_cls", 1, 4), method="mudsc", alpha="auto", progress=False)
    curve = merged.config.mudsc["alpha_auto"]
    assert curve["held_out_examples"] == 0
    assert curve["fidelity"] == [None] * len(curve["grid"]) and curve["returned_fidelity"] is None, curve
    assert any("no alpha was scored" in text for text in merged.config.mudsc["warnings"])
    card = _card(merged, tmp_path / "merged")
    row = _row(card, "| Balance factor")
    assert "not scored" in row and "0.000" not in row, row
    assert not (tmp_path / "merged" / "plots" / "alpha_fidelity.png").exists()


@pytest.mark.parametrize(("options", "cell"), [
    ({"refit": "gate", "refit_samples": 100}, "100 asked: 48 examples"),
    ({"refit": "ridge", "refit_samples": 100}, "100 asked: 60 examples"),
    ({"refit": "gate", "refit_samples": None}, "all: 48 examples"),
    ({"refit": "ridge", "refit_samples": 20}, "20 examples"),
    ({"refit": "auto", "refit_samples": "auto"}, "auto: 48 examples"),
])
def test_the_card_says_how_many_examples_the_refit_read(options, cell, tmp_path):
    """The card's refit examples cell showed `refit_samples` as asked (100 where the data held 60; "—", the cell of
    no refit, for all of them), not the count read (config `refit_examples`)."""
    merged = hf_mudsc.merge([make_model("vit_cls", 1, 3), make_model("vit_cls", 2, 3)],
                            make_batches("vit_cls", 4, 15), method="mudsc", progress=False, **options)
    row = _row(_card(merged, tmp_path / "merged"), "| Refit")
    assert row.rstrip(" |").rsplit(" / ", 1)[-1] == cell, row


def test_the_card_names_only_the_starts_the_solve_ran(tmp_path):
    """MuDSC's Method cell listed the activation, weight and identity starts for every merge, while parents that are
    not lined up skip the identity and `reference_compat=True` runs the paper's start alone (its Solver row)."""
    merged = hf_mudsc.merge([make_model("vit_cls", 1, 3), make_model("vit_cls", 2, 3)],
                            make_batches("vit_cls", 2, 16), method="mudsc", reference_compat=True, refit="none",
                            progress=False)
    row = _row(_card(merged, tmp_path / "merged"), "| Method")
    assert "the identity" not in row and "the weight matching" not in row, row
    assert "Solver sweeps" in row, row


def test_alpha_ties_go_to_the_alpha_nearest_a_half_as_recorded():
    """Equal fidelities (5 agreements in 36) summed in another order differ in the last bit: the tie rule never ran
    and α 0.3 was chosen over 0.5 though the recorded curve shows them equal."""
    scores = {0.1: 0.0, 0.3: 0.1388888888888889, 0.5: 0.13888888888888887, 0.7: 0.0, 0.9: 0.0}
    assert choose_alpha(scores) == 0.5
    assert choose_alpha({0.3: 0.5, 0.5: 0.4, 0.7: 0.5}) == 0.3  # a real tie: the nearer, then the smaller


@pytest.mark.parametrize(("returned", "said"), [(None, "scored nothing"), (0.61, "(chosen by alpha: auto)")])
def test_the_job_page_says_whether_alpha_auto_chose(returned, said):
    """The service's job page said "(chosen by alpha: auto)" when nothing was scored and 0.5 was simply used."""
    from jinja2 import Environment, PackageLoader, select_autoescape

    from hf_mudsc.serve.store import PHASES

    template = Environment(loader=PackageLoader("hf_mudsc.serve", "templates"),
                           autoescape=select_autoescape()).get_template("job.html.jinja")
    job = {"id": "j1", "status": "done", "phase": None, "progress": 1.0, "created": "", "updated": "",
           "method": "mudsc",
           "parents": ["user/a", "user/b"], "more_parents": 0, "alpha": 0.5, "dry_run": False, "error": None,
           "links": [], "recipe": {}, "replaced": False, "all_warnings": [],
           "result": {"alpha_auto": {"held_out_examples": 0 if returned is None else 9, "returned_fidelity": returned}}}
    page = " ".join(template.render(job=job, recipe="", log=[], version="0", needs_key=False, phases=PHASES).split())
    assert said in page, page


def test_the_per_task_joint_rule_is_said_to_favour_a_much_smaller_task():
    """With tasks of 2 and 8 classes the per-task rule sends every image to the 2-class task (a 2-way softmax's
    maximum is at least 0.5): joint 20 % where the raw argmax gave 75-88 % (the s31 quality hunt). The figure is
    the rule's, for the ensemble too; the evaluation says so and names the other rule."""
    from hf_mudsc.evaluate.decision import uneven_tasks_warning

    said = uneven_tasks_warning({"a": (0, 2), "b": (2, 10)}, "per_task")
    assert said is not None and "'a' (2 classes)" in said and "joint_rule='raw'" in said and "\n" not in said
    assert uneven_tasks_warning({"a": (0, 5), "b": (5, 10)}, "per_task") is None
    assert uneven_tasks_warning({"a": (0, 2), "b": (2, 10)}, "raw") is None
