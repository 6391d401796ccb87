"""Session 36, classification heads across parents: head kinds, label sets, the joint decision (helper "heads")."""

from __future__ import annotations

import pytest
from factories import CLASSIFIERS, make_model

import hf_mudsc
from hf_mudsc.errors import EvaluationError


def _labelled(kind: str, seed: int, names: list[str], problem_type: str | None = None):
    """A tiny `kind` classifier whose labels are `names` and whose config says `problem_type`."""
    model = make_model(kind, seed, num_labels=len(names))
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {name: index for index, name in enumerate(names)}
    model.config.problem_type = problem_type
    model.config._name_or_path = f"org/task{seed}"
    return model


def _no_weights(monkeypatch) -> None:
    """Make any parent's weights being read fail the test: a refusal must come before them."""
    from hf_mudsc.load import parents as loading

    def refuse(*args, **kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr(loading, "_prepare", refuse)


def labelled_parents() -> list:
    """Parents A, B, C: fine-tunes of one tiny ViT with heads of 2, 3 and 5 named labels (`t{seed}c{i}`), named
    `org/task1..3` (their tasks' names)."""
    from factories import fine_tune, with_new_head

    base = make_model("vit_cls", 0, num_labels=2)
    parents = []
    for seed, size in ((1, 2), (2, 3), (3, 5)):
        parent = with_new_head(fine_tune(base, seed, 0.01), size, seed)
        parent.config.id2label = {i: f"t{seed}c{i}" for i in range(size)}
        parent.config.label2id = {name: i for i, name in parent.config.id2label.items()}
        parent.config._name_or_path = f"org/task{seed}"
        parents.append(parent)
    return parents


@pytest.mark.parametrize("kind", CLASSIFIERS)
def test_a_one_class_single_label_head_is_refused_in_one_line(kind, tmp_path):
    """merge([A: 1 label with problem_type single_label_classification set on the object, B: 2 labels, C: 5 labels])
    made a head whose joint decision always chose A's one label (a softmax over one logit is 1 on every input), and
    two such parents of one label made a folder transformers refuses to load (num_labels > 1 required)."""
    tasks = [_labelled(kind, seed, names, "single_label_classification" if len(names) == 1 else None)
             for seed, names in ((1, ["only"]), (2, ["a", "b"]), (3, list("pqrst")))]
    twice = [_labelled(kind, seed, ["only"], "single_label_classification") for seed in (4, 5)]
    for parents, who in ((tasks, "A"), (tasks[::-1], "C"), (twice, "A")):
        for dry_run in (False, True):
            with pytest.raises(hf_mudsc.MergeInputError) as caught:
                hf_mudsc.merge(parents, method="linear", progress=False, dry_run=dry_run)
            message = str(caught.value)
            assert f"parent {who}" in message and "single_label_classification" in message, message
            assert "num_labels=1" in message and "\n" not in message, message
    twice[0].save_pretrained(tmp_path / "one")  # what transformers says of such a folder: the merge's reason
    with pytest.raises(ValueError, match="requires `num_labels > 1`"):
        type(twice[0]).from_pretrained(tmp_path / "one")


def test_a_regression_head_of_several_outputs_is_not_called_one_output(tmp_path):
    """merge([A: problem_type regression with 2 outputs, B: a 2-class classifier]) said A had 'a regression head
    (one output)'."""
    scores = _labelled("bert_cls", 1, ["valence", "arousal"], "regression")
    classes = _labelled("bert_cls", 2, ["neg", "pos"])
    with pytest.raises(hf_mudsc.MergeInputError) as caught:
        hf_mudsc.merge([scores, classes], method="average", progress=False)
    message = str(caught.value)
    assert "regression head" in message and "one output" not in message and "2 outputs" in message, message


def test_a_merge_of_a_merged_model_keeps_each_of_its_tasks(tmp_path):
    """merge([merge([A, B]) saved, C]) — what `method='average'` with 3 parents says to do ('merge them 2 at a time')
    — made one task 'ab' of A's and B's classes ('ab: task1: t1c0'): the joint decision took one softmax over both
    tasks' labels, and evaluate could score neither A's task nor B's (3 parents for 2 tasks)."""
    import torch

    from hf_mudsc.evaluate.decision import joint_probabilities

    parents = labelled_parents()
    first = hf_mudsc.merge(parents[:2], method="average", progress=False)
    hf_mudsc.save_merged(first, tmp_path / "ab")
    merged = hf_mudsc.merge([str(tmp_path / "ab"), parents[2]], method="average", progress=False)
    ranges = {"task1": [0, 2], "task2": [2, 5], "task3": [5, 10]}
    assert merged.config.task_label_ranges == ranges
    assert merged.config.id2label[0] == "task1: t1c0" and merged.config.id2label[9] == "task3: t3c4"
    assert merged.config.label2id == {name: i for i, name in merged.config.id2label.items()}
    logits = torch.randn(4, 10)
    expected = torch.cat([logits[:, lo:hi].softmax(-1) for lo, hi in ranges.values()], dim=-1)
    assert torch.allclose(joint_probabilities(logits, merged.config), expected)
    pixels = torch.randn(12, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    data = {}
    for parent, task in zip(parents, ranges):
        with torch.no_grad():
            data[task] = (pixels, parent(pixel_values=pixels).logits.argmax(-1))
    result = hf_mudsc.evaluate_merge(merged, parents, data, progress=False)
    assert {task: result.score(f"parent_{letter}", task) for task, letter in zip(ranges, "abc")} == dict.fromkeys(
        ranges, 1.0)
    # A merged model and a parent holding one of its tasks' names: every task keeps a name of its own.
    again = hf_mudsc.merge([str(tmp_path / "ab"), parents[0]], method="average", progress=False)
    assert again.config.task_label_ranges == {"task1_a": [0, 2], "task2": [2, 5], "task1_b": [5, 7]}
    assert again.config.id2label[5] == "task1_b: t1c0"


def test_evaluate_figures_of_a_three_task_merge_are_the_per_task_and_joint_rules_by_hand():
    """Label sets of sizes 2, 3 and 5 (one of size 1 is a regression head, or a one-class softmax: refused above):
    each task's figure is the argmax within its slice on its data, the joint one the per-task softmax argmax over
    all rows, the ensemble's the same rule on the parents' concatenated logits."""
    import torch
    from factories import fine_tune, with_new_head

    from hf_mudsc.evaluate.decision import joint_probabilities

    base = make_model("vit_cls", 0, num_labels=2)
    parents = []
    for seed, size in ((1, 2), (2, 3), (3, 5)):
        parent = with_new_head(fine_tune(base, seed, 0.01), size, seed)
        parent.config._name_or_path = f"org/task{seed}"
        parents.append(parent)
    merged = hf_mudsc.merge(parents, method="linear", progress=False)
    generator = torch.Generator().manual_seed(0)
    data = []
    for parent in parents:
        pixels = torch.randn(30, 1, 16, 16, generator=generator)
        with torch.no_grad():
            labels = parent(pixel_values=pixels).logits.argmax(-1)
        labels[:10] = torch.randint(0, parent.config.num_labels, (10,), generator=generator)  # not all right
        data.append((pixels, labels))
    result = hf_mudsc.evaluate_merge(merged, parents, data, progress=False, batch_size=7)
    ranges = merged.config.task_label_ranges
    joint = ensemble = 0
    with torch.no_grad():
        for (task, (lo, hi)), (pixels, labels) in zip(ranges.items(), data):
            logits = merged(pixel_values=pixels).logits
            assert result.score("merged", task) == pytest.approx((logits[:, lo:hi].argmax(-1) == labels).float().mean())
            joint += int((joint_probabilities(logits, merged.config).argmax(-1) == labels + lo).sum())
            together = torch.cat([p(pixel_values=pixels).logits.softmax(-1) for p in parents], dim=-1)
            ensemble += int((together.argmax(-1) == labels + lo).sum())
    assert result.score("merged", "joint") == pytest.approx(joint / 90)
    assert result.score("ensemble", "joint") == pytest.approx(ensemble / 90)
    assert 0 < joint < 90


def test_the_merged_id2label_is_keyed_by_int_as_from_pretrained_gives_it():
    """merge([A, B]) with A's labels set from a JSON dict (`a.config.id2label = {"0": "neg", "1": "pos"}`) gave a
    merged config keyed by strings beside a label2id of ints: `pipeline("text-classification", model=merged)`
    failed with KeyError: 0 (its saved copy, read back by from_pretrained, had int keys)."""
    a, b = _labelled("bert_cls", 1, ["neg", "pos"]), _labelled("bert_cls", 2, ["neg", "pos"])
    a.config.id2label = {"0": "neg", "1": "pos"}
    merged = hf_mudsc.merge([a, b], method="linear", progress=False)
    assert merged.config.id2label == {0: "neg", 1: "pos"} and merged.config.label2id == {"neg": 0, "pos": 1}
    assert a.config.id2label == {"0": "neg", "1": "pos"}  # the parent is left as given


def _three_tasks(tmp_path):
    """Parents A, B, C (2, 3 and 5 labels), M = merge([A, B]) saved in `ab`, and abc = merge([./ab, C]) saved in `abc`
    with its recipe, and each task's data labelled by its parent."""
    import torch

    parents = labelled_parents()
    hf_mudsc.save_merged(hf_mudsc.merge(parents[:2], method="average", progress=False), tmp_path / "ab")
    merged = hf_mudsc.merge([str(tmp_path / "ab"), parents[2]], method="average", progress=False)
    generator = torch.Generator().manual_seed(0)
    data = {}
    for parent, task in zip(parents, ("task1", "task2", "task3")):
        pixels = torch.randn(24, 1, 16, 16, generator=generator)
        with torch.no_grad():
            labels = parent(pixel_values=pixels).logits.argmax(-1)
        labels[:8] = torch.randint(0, parent.config.num_labels, (8,), generator=generator)  # not all right
        data[task] = (pixels, labels)
    return parents, merged, data


def test_evaluate_scores_a_merged_parent_on_each_of_its_tasks(tmp_path):
    """evaluate_merge(merge([./ab, C]), ["./ab", C], data of task1..task3) refused: '2 parents for 3 tasks'; parent
    M=merge(A, B) now scores task1 and task2 on its own slices, and its share of the ensemble is their softmaxes."""
    import torch
    from transformers import AutoModelForImageClassification

    from hf_mudsc.evaluate.decision import joint_probabilities

    parents, merged, data = _three_tasks(tmp_path)
    ab = AutoModelForImageClassification.from_pretrained(tmp_path / "ab")
    ranges = merged.config.task_label_ranges
    for rule in ("per_task", "raw"):
        result = hf_mudsc.evaluate_merge(merged, [str(tmp_path / "ab"), parents[2]], data, progress=False,
                                         batch_size=7, joint_rule=rule)
        joint = {"parent_a": 0, "parent_b": 0, "ensemble": 0}
        with torch.no_grad():
            for task, (pixels, labels) in data.items():
                lo, hi = ranges[task]
                m, c = ab(pixel_values=pixels).logits, parents[2](pixel_values=pixels).logits
                own = m if task != "task3" else c
                start = 0 if task != "task3" else 5
                expected = (own[:, lo - start:hi - start].argmax(-1) == labels).float().mean()
                assert result.score("parent_a" if task != "task3" else "parent_b", task) == pytest.approx(expected)
                together = torch.cat([m, c], dim=-1)
                if rule == "per_task":
                    together = joint_probabilities(together, merged.config)
                    m = joint_probabilities(m, ab.config)
                joint["ensemble"] += int((together.argmax(-1) == labels + lo).sum())
                joint["parent_a"] += int((m.argmax(-1) == labels + lo).sum())
                joint["parent_b"] += int((c.argmax(-1) + 5 == labels + lo).sum())
        for name, right in joint.items():
            assert result.score(name, "joint") == pytest.approx(right / 72), (rule, name)
        assert "task3" not in result.scores["parent_a"] and "task1" not in result.scores["parent_b"]


def test_evaluate_refuses_parents_that_do_not_hold_the_merged_tasks_in_one_line(tmp_path):
    """evaluate_merge(abc, [./ab, ./ab, C]) (two tasks too many) and [A, C] (one too few) are refused before weights
    in one line; [C, ./ab] (another order) names the labels that do not match, and so does a merged parent whose
    task lists its labels in another order than the merged model's."""
    import json
    import shutil

    parents, merged, data = _three_tasks(tmp_path)
    ab = str(tmp_path / "ab")
    for given, said in (([ab, ab, parents[2]], "3 parents holding 5 tasks"), ([parents[0], parents[2]], "2 parents")):
        with pytest.raises(EvaluationError) as caught:
            hf_mudsc.evaluate_merge(merged, given, data, progress=False)
        message = str(caught.value)
        assert said in message and "3 tasks" in message and "\n" not in message, message
    with pytest.raises(EvaluationError, match="parent A has 5 labels but task 'task1' has 2") as caught:
        hf_mudsc.evaluate_merge(merged, [parents[2], ab], data, progress=False)
    assert "\n" not in str(caught.value), str(caught.value)
    shutil.copytree(ab, tmp_path / "ba")  # task2's labels listed in another order
    config = json.loads((tmp_path / "ba" / "config.json").read_text())
    config["id2label"]["2"], config["id2label"]["3"] = config["id2label"]["3"], config["id2label"]["2"]
    config["label2id"] = {name: int(i) for i, name in config["id2label"].items()}
    (tmp_path / "ba" / "config.json").write_text(json.dumps(config))
    with pytest.raises(EvaluationError, match=r"parent A has the labels \['t2c1', 't2c0', 't2c2'\]") as caught:
        hf_mudsc.evaluate_merge(merged, [str(tmp_path / "ba"), parents[2]], data, progress=False)
    assert "task 'task2'" in str(caught.value) and "\n" not in str(caught.value)


def test_evaluate_of_a_saved_merge_of_a_merged_model_reads_its_parents_from_the_recipe(tmp_path):
    """`hf-mudsc evaluate ./abc --dataset task1=... task2=... task3=...` with the parents from the recipe
    (./ab and C) stopped at '2 parents for 3 tasks'."""
    from hf_mudsc.cli.main import main

    parents, merged, data = _three_tasks(tmp_path)
    parents[2].save_pretrained(tmp_path / "task3")
    abc = hf_mudsc.merge([str(tmp_path / "ab"), str(tmp_path / "task3")], method="average", progress=False)
    hf_mudsc.save_merged(abc, tmp_path / "abc")
    import datasets

    specs = []
    for task, (pixels, labels) in data.items():
        datasets.Dataset.from_dict({"pixel_values": pixels.numpy(), "label": labels.numpy()}).save_to_disk(
            tmp_path / f"data_{task}")
        specs += ["--dataset", f"{task}={tmp_path / f'data_{task}'}"]
    assert main(["evaluate", str(tmp_path / "abc"), *specs, "-q"]) == 0


def test_held_out_scores_of_a_merged_parent_compare_each_of_its_tasks(tmp_path):
    """The held-out scorer of merge([./ab, C]) (alpha auto, the refit gate) took one softmax / argmax over M's 5 rows:
    +5 on task1's bias (no per-task or joint decision changes) moved alpha-auto's fidelity 0.875 -> 0.656 and the
    gate's per-task terms; each of M's tasks is now a term of its own, unchanged by that shift."""
    import copy

    import torch
    from factories import classifier_params, make_batches
    from transformers import AutoModelForImageClassification

    from hf_mudsc.apply.classifier import head_tasks
    from hf_mudsc.apply.fidelity import FidelityScorer

    parents, merged, _ = _three_tasks(tmp_path)
    ab = AutoModelForImageClassification.from_pretrained(tmp_path / "ab")
    sizes, owners = head_tasks([ab.config, parents[2].config], [5, 5])
    assert (sizes, owners) == ([2, 3, 5], [0, 0, 1])
    assert head_tasks([p.config for p in parents], [2, 3, 5]) == ([2, 3, 5], [0, 1, 2])
    scorer = FidelityScorer([ab, parents[2]], make_batches("vit_cls", num_batches=2, batch_size=16, seed=5),
                            task_sizes=sizes, task_parents=owners)
    shifted = copy.deepcopy(merged)
    with torch.no_grad():
        classifier_params(shifted)[1][0:2] += 5.0
    before, after = scorer.agreement(merged), scorer.agreement(shifted)
    assert len(before.tasks) == 3 and before.tasks == pytest.approx(after.tasks, abs=1e-5)
    assert scorer(merged) == pytest.approx(scorer(shifted))
    whole = FidelityScorer([ab, parents[2]], make_batches("vit_cls", num_batches=2, batch_size=16, seed=5),
                           task_sizes=[5, 5])  # what the merge built before: M's 5 rows as one task
    assert whole(merged) != pytest.approx(whole(shifted))


def test_a_gated_merge_of_a_merged_parent_records_and_names_a_term_per_task(tmp_path):
    """merge([./ab, C], refit='gate', alpha='auto') recorded 2 per-task terms (M's tasks as one) and the card named a
    lowered task 'parent A's task'; it now records 3 and names the task."""
    from factories import make_batches

    from hf_mudsc.apply.refit_gate import GateDecision
    from hf_mudsc.options import gate_lowered_tasks_text

    parents, _, _ = _three_tasks(tmp_path)
    merged = hf_mudsc.merge([str(tmp_path / "ab"), parents[2]], make_batches("vit_cls", num_batches=4, batch_size=16),
                            method="mudsc", alpha="auto", refit="gate", progress=False)
    gate = merged.config.mudsc["refit_gate"]
    assert len(gate["tasks_none"]) == len(gate["tasks_refit"]) == 3, gate
    assert gate["task_names"] == ["task1", "task2", "task3"]
    decision = GateDecision(False, -1.2, -1.0, 40, tasks_none=(-0.5, -0.6, -0.9), tasks_refit=(-0.5, -0.7, -0.3),
                            lowered_tasks=(1,), task_names=("task1", "task2", "task3"))
    assert gate_lowered_tasks_text(decision.as_config()) == "; it lowered task 'task2': -0.7000 with, -0.6000 without"


def test_the_refit_head_target_centres_each_task_of_a_merged_parent(tmp_path):
    """The refit's head target centred merge(A, B)'s 5 logits together (a shift of task1's logits moved task2's
    target); each of its tasks is now centred on its own, an ordinary parent's whole output as before."""
    import torch
    from transformers import AutoConfig

    from hf_mudsc.apply.refit import head_target, held_task_sizes

    _three_tasks(tmp_path)
    sizes = held_task_sizes(AutoConfig.from_pretrained(tmp_path / "ab"))
    assert sizes == [2, 3]
    merged_parent, parent = torch.randn(6, 5), torch.randn(6, 5)
    target = head_target([merged_parent, parent], [True, True], [sizes, None])
    for lo, hi in ((0, 2), (2, 5), (5, 10)):
        assert torch.allclose(target[:, lo:hi].mean(1), torch.zeros(6), atol=1e-6)
    assert torch.equal(target[:, 5:], parent - parent.mean(1, keepdim=True))


def _three_task_folder(tmp_path):
    """Parents A, B, C (2, 3 and 5 labels) saved in p1..p3, abc = merge([A, B, C]) saved, and 8 rows per task."""
    import torch

    parents = labelled_parents()
    for seed, parent in enumerate(parents, start=1):
        parent.save_pretrained(tmp_path / f"p{seed}")
    hf_mudsc.save_merged(hf_mudsc.merge(parents, method="linear", progress=False), tmp_path / "abc")
    generator = torch.Generator().manual_seed(0)
    data = {f"task{i + 1}": (torch.randn(8, 1, 16, 16, generator=generator), torch.zeros(8, dtype=torch.long))
            for i in range(3)}
    return parents, data


def test_too_many_hub_parents_are_refused_before_any_request(local_hub, tmp_path):
    """evaluate_merge("./abc", ["user/p1", ..., "user/p4"], data) of a 3-task merge: four parents hold at least four
    tasks, refused before anything is downloaded."""
    from hf_mudsc.errors import EvaluationError

    _, data = _three_task_folder(tmp_path)
    for seed in (1, 2):
        local_hub.upload_folder(f"user/p{seed}", tmp_path / f"p{seed}", "p")
    local_hub.requests.clear()
    with pytest.raises(EvaluationError, match=r"4 parents for 3 tasks") as caught:
        hf_mudsc.evaluate_merge(str(tmp_path / "abc"), ["user/p1", "user/p2", "user/p1", "user/p2"], data,
                                progress=False)
    assert "\n" not in str(caught.value)
    assert not local_hub.requests, local_hub.describe_requests()


def test_a_merged_parent_on_the_hub_is_scored_through_the_api_as_on_the_command_line(local_hub, tmp_path):
    """evaluate_merge("./abc", ["user/ab", "user/c"], data) — abc merged from a merged parent pushed to the Hub — was
    refused '2 parents for 3 tasks ... pass its own parents' (a Hub parent counted as one task), while `hf-mudsc
    evaluate abc` scored it; fewer Hub parents than tasks are now checked once they are loaded."""
    parents, data = _three_task_folder(tmp_path)
    hf_mudsc.save_merged(hf_mudsc.merge(parents[:2], method="linear", progress=False), tmp_path / "ab")
    merged = hf_mudsc.merge([str(tmp_path / "ab"), str(tmp_path / "p3")], method="linear", progress=False)
    hf_mudsc.save_merged(merged, tmp_path / "abc2")
    assert list(merged.config.task_label_ranges) == ["task1", "task2", "p3"]  # C named by its folder
    data["p3"] = data.pop("task3")
    local_hub.upload_folder("user/ab", tmp_path / "ab", "p")
    local_hub.upload_folder("user/c", tmp_path / "p3", "p")
    result = hf_mudsc.evaluate_merge(str(tmp_path / "abc2"), ["user/ab", "user/c"], data, progress=False)
    assert set(result.task_names) == {"task1", "task2", "p3"}
    # the same figures as the same parents read from their folders (each task on its own slice of parent A)
    local = hf_mudsc.evaluate_merge(str(tmp_path / "abc2"), [str(tmp_path / "ab"), str(tmp_path / "p3")], data,
                                    progress=False)
    for scorer, view in [("parent_a", "task1"), ("parent_a", "task2"), ("parent_b", "p3"), ("ensemble", "joint"),
                         ("merged", "joint")]:
        assert result.score(scorer, view) == local.score(scorer, view), (scorer, view)


def test_two_parents_for_three_tasks_on_the_hub_are_refused_once_loaded(local_hub, tmp_path):
    """Two plain Hub parents for a 3-task merge: they may be merged parents, so the exact count is checked once they
    are loaded — and refused there in one line."""
    from hf_mudsc.errors import EvaluationError

    _, data = _three_task_folder(tmp_path)
    for seed in (1, 2):
        local_hub.upload_folder(f"user/p{seed}", tmp_path / f"p{seed}", "p")
    with pytest.raises(EvaluationError, match=r"2 parents .*3 tasks") as caught:
        hf_mudsc.evaluate_merge(str(tmp_path / "abc"), ["user/p1", "user/p2"], data, progress=False)
    assert "\n" not in str(caught.value)


def test_inspect_names_the_tasks_the_average_check_found_lowered_by_name(tmp_path):
    """`hf-mudsc inspect` of merge([./ab, C]) whose average check found task2 lowered said 'scored parent(s) B' (task
    index 1 read as a parent letter: task2 is merged parent A's); it now names the task."""
    import json

    from hf_mudsc.cli.inspect import read_merge, summary

    _three_task_folder(tmp_path)
    config = json.loads((tmp_path / "abc" / "config.json").read_text())
    config["mudsc"]["refit_gate"] = {
        "kept": False, "none": -1.0, "refit": -1.2, "held_out_examples": 40, "tasks_none": [-0.5, -0.6, -0.9],
        "tasks_refit": [-0.5, -0.7, -0.3], "lowered_tasks": [], "task_names": ["task1", "task2", "task3"],
        "average": {"kept": True, "score": -0.9, "tasks": [-0.4, -0.5, -0.9], "lowered_tasks": [1]}}
    (tmp_path / "abc" / "config.json").write_text(json.dumps(config))
    saved, diagnostics, _ = read_merge(tmp_path / "abc")
    text = summary(tmp_path / "abc", saved, diagnostics, None, False)
    assert "then plain averaging was returned: the merge scored task(s) 'task2' below it" in text, text
    del config["mudsc"]["refit_gate"]["task_names"]  # ordinary parents: task i is parent i's
    (tmp_path / "abc" / "config.json").write_text(json.dumps(config))
    saved, diagnostics, _ = read_merge(tmp_path / "abc")
    assert "the merge scored parent(s) B below it" in summary(tmp_path / "abc", saved, diagnostics, None, False)
