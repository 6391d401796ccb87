"""Defects noticed in earlier sessions and left alone (session 33, the s33 left hunt): each reproduced here first."""

from __future__ import annotations

import pytest

INDICES = (0, 25, 26, 30)
LABELS = ("A", "Z", "27", "31")  # parent 26 is the 27th parent: numbered as people count, past the letters


def test_every_site_names_a_parent_past_z_alike():
    """`evaluate.names.parent_letter` said 'P26' for index 26 where `load.relation.parent_label`, the card and the
    gate's text said '27', and the card's evaluation table (`string.ascii_uppercase[:count]`) dropped the 27th
    parent's column: one function names parents everywhere, A..Z unchanged."""
    from transformers import PretrainedConfig

    from hf_mudsc.apply.classifier import distinct_task_names
    from hf_mudsc.errors import parent_label
    from hf_mudsc.evaluate.names import parent_names
    from hf_mudsc.load.processors import processor_note
    from hf_mudsc.options import gate_lowered_tasks_text
    from hf_mudsc.publish.card import EvalRow, evaluation_section

    assert [parent_label(i) for i in INDICES] == list(LABELS)
    scorers = parent_names(31)
    assert [scorers[i] for i in INDICES] == [f"parent_{label.lower()}" for label in LABELS]
    text = gate_lowered_tasks_text({"lowered_tasks": list(INDICES), "tasks_none": [0.5] * 31,
                                    "tasks_refit": [0.25] * 31})
    assert [f"parent {label}'s task" in text for label in LABELS] == [True] * 4, text
    for index, label in zip(INDICES[1:], LABELS[1:]):  # parent A's own processor needs no note
        note = processor_note([None] * index + [object()])
        assert note is not None and f"parent {label}'s" in note, note
    configs = []
    for _ in range(31):
        config = PretrainedConfig()
        config._name_or_path = "vit"
        configs.append(config)
    names = distinct_task_names(configs)
    assert [names[i] for i in INDICES] == [f"vit_{label.lower()}" for label in LABELS]
    row = EvalRow(task="t", dataset="d", merged=0.5, parent_a=0.1, parent_b=0.2, later_parents=(0.3,) * 29)
    header = evaluation_section([row]).split("| Task |", 1)[1].split("\n", 1)[0]
    assert [f" Parent {label} |" in header for label in LABELS] == [True] * 4, header
    assert header.count(" Parent ") == 31, header


# ---------------------------------------------------------------- a --token given before the command

SECRET = "s3cr3t-Enterprise-Token-9f8e7d"  # not hf_-shaped: only its place on the command line says it is a token


@pytest.mark.parametrize("argv, command", [
    (["--token", SECRET, "merge", "a/x", "b/y"], "merge"),
    ([f"--token={SECRET}", "merge", "a/x", "b/y"], "merge"),
    (["--tok", SECRET, "evaluate", "out", "--dataset", "d:test"], "evaluate"),  # an abbreviation argparse accepts
    ([f"--tok={SECRET}", "merge", "a/x", "b/y"], "merge"),
    (["-v", "--token", SECRET, "push", "out", "me/x"], "push"),
    (["--token", SECRET], "merge"),  # no command at all: the example names merge
])
def test_a_token_before_the_command_says_where_it_goes(capsys, argv, command):
    """`hf-mudsc --token SECRET merge ...` said argparse's "invalid choice: '***'" (the token masked, the command
    seemingly refused) without saying what to do: one line saying `--token` goes after the command, the token
    never shown."""
    from hf_mudsc.cli.main import main

    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert SECRET not in err and err.count("\n") == 1 and err.startswith("hf-mudsc: error: "), err
    assert "invalid choice" not in err and "--token goes after the command" in err, err
    assert f"`hf-mudsc {command} ... --token ***`" in err, err


def test_an_api_key_before_serve_says_where_it_goes(capsys):
    from hf_mudsc.cli.main import main

    with pytest.raises(SystemExit) as caught:
        main(["--api-key", SECRET, "serve"])
    err = capsys.readouterr().err
    assert caught.value.code == 2 and SECRET not in err and err.count("\n") == 1, err
    assert "--api-key goes after the command" in err and "`hf-mudsc serve ... --api-key ***`" in err, err


# ---------------------------------------------------------------- --allow-pickle's help in evaluate's terms


def flag_help(capsys, command: str, flag: str) -> str:
    """The `--help` text of one flag of `command`, whitespace folded."""
    from hf_mudsc.cli.main import main

    with pytest.raises(SystemExit) as caught:
        main([command, "--help"])
    assert caught.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(flag))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("  -")), len(lines))
    return " ".join(" ".join(lines[start:end]).split())


def test_evaluate_allow_pickle_help_speaks_of_what_evaluate_loads(capsys):
    """`hf-mudsc evaluate --help` showed merge's text for --allow-pickle ("allow parents with pickle-only weights"),
    though evaluate loads the merged model DIR too and merges nothing; each command now says it in its own terms,
    from the one declaration of the option."""
    evaluate = flag_help(capsys, "evaluate", "--allow-pickle")
    merge = flag_help(capsys, "merge", "--allow-pickle")
    assert "allow parents with pickle-only weights" in merge, merge
    assert "allow parents" not in evaluate and "merg" not in evaluate.replace("merged model", ""), evaluate
    assert "DIR" in evaluate and "pickle-only weights" in evaluate and "arbitrary code" in evaluate, evaluate


# ---------------------------------------------------------------- fisher's dry run and inference tensors


def test_fisher_dry_run_refuses_parents_of_inference_tensors_as_the_merge_does(monkeypatch):
    """The merge refuses `method="fisher"` for parents whose parameters are inference tensors (its gradients cannot
    use them), but its dry run planned the merge as if it would run: it refuses alike, with the merge's message,
    before reading anything heavy (no config's model is built, no header read)."""
    import torch
    from factories import fine_tune, make_batches, make_model

    import hf_mudsc
    from hf_mudsc.errors import MergeInputError
    from hf_mudsc.load import parents

    base = make_model("vit_cls", 0)
    with torch.inference_mode():  # e.g. models a service loaded under inference mode
        a, b = fine_tune(base, seed=1, scale=0.05), fine_tune(base, seed=2, scale=0.05)
    batches = make_batches("vit_cls", num_batches=2, batch_size=4)
    with pytest.raises(MergeInputError) as merging:
        hf_mudsc.merge([a, b], batches, method="fisher", progress=False)

    def heavy(*args, **kwargs):
        raise AssertionError("the dry run located (read configs, cards, headers of) the parents before refusing them")

    with monkeypatch.context() as patched:
        patched.setattr(parents, "locate_parents", heavy)
        with pytest.raises(MergeInputError) as planning:
            hf_mudsc.merge([a, b], batches, method="fisher", dry_run=True)
    assert str(planning.value) == str(merging.value), (planning.value, merging.value)
    assert "parent A" in str(planning.value) and "torch.inference_mode" in str(planning.value)
    plain = hf_mudsc.merge([base, fine_tune(base, seed=3, scale=0.05)], batches, method="fisher", dry_run=True)
    assert plain.method == "fisher"  # parents of ordinary tensors are planned as before


# ---------------------------------------------------------------- the averaging check in the dry run's memory


def named_labels(model, labels):
    import copy

    model = copy.deepcopy(model)
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {label: index for index, label in enumerate(labels)}
    return model


def test_dry_run_counts_the_average_the_averaging_check_builds():
    """`method="auto"` on fine-tunes of one base with different label sets (a concatenated head) holds its merge
    against plain averaging at the end, building one more model (`pipeline`'s `plain_average`); the dry run's peak
    memory did not count it. It now does — one model's bytes more than the same merge of a shared head, which runs
    no such check — and only where the merge may run the check (`auto`, a refit gate, a concatenated head). The toy
    is wide enough (3.2 M parameters) for the merge's working set, not the process's fixed bytes, to be the peak."""
    import torch
    from factories import fine_tune, make_batches, make_model
    from transformers import ViTForImageClassification

    import hf_mudsc
    from hf_mudsc.testing.toy import tiny_vit_config

    torch.manual_seed(0)
    base = ViTForImageClassification(tiny_vit_config(3, hidden_size=256, num_layers=4))
    a = named_labels(fine_tune(base, seed=1, scale=0.01), ["cat", "dog", "fox"])
    b = fine_tune(base, seed=2, scale=0.01)
    same, other = named_labels(b, ["cat", "dog", "fox"]), named_labels(b, ["one", "two", "six"])
    batches = make_batches("vit_cls", num_batches=2, batch_size=4)
    parameters = sum(p.numel() for p in a.parameters())

    def peak(parents, **options):
        return hf_mudsc.merge(parents, batches, dry_run=True, **options).estimate.peak_memory_bytes

    assert peak([a, other]) - peak([a, same]) == 4 * parameters
    # no check runs: a method given, or no refit gate (`refit="none"`)
    assert peak([a, other], method="regmean") == peak([a, same], method="regmean")
    assert peak([a, other], refit="none") == peak([a, same], refit="none")
    # such parents' merge (small ones here) does hold its result against plain averaging
    small = make_model("vit_cls", 0)
    a = named_labels(fine_tune(small, seed=1, scale=0.01), ["cat", "dog", "fox"])
    other = named_labels(fine_tune(small, seed=2, scale=0.01), ["one", "two", "six"])
    merged = hf_mudsc.merge([a, other], make_batches("vit_cls", num_batches=3, batch_size=8), progress=False)
    assert merged.config.mudsc["parent_relation"]["relation"] == "shared base"
    assert merged.config.mudsc["refit_gate"]["average"] is not None
