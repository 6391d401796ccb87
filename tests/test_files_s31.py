"""Files after the session-31 files hunt: `evaluate` reads a merged folder's config.json only as the loader does
(its link and count checks first) and puts a folder's results, chart and card in place as one change; the old copy an
interrupted `--overwrite` leaves is said and removed by the next run; a JSON file nested too deeply is malformed
(inspect, evaluate) or no marker, never a RecursionError traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
from factories import make_model
from PIL import Image
from transformers import AutoConfig, ViTImageProcessor

from hf_mudsc.cli.main import main
from hf_mudsc.load.config_json import MAX_LABELS

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """Two 3-class ViT parents merged by the CLI (average: no data needed) and a 12-row test set."""
    root = tmp_path_factory.mktemp("files_s31")
    processor = ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5], image_std=[0.5])
    for seed, name in enumerate(("vit-a", "vit-b"), start=1):
        make_model("vit_cls", seed).save_pretrained(root / name)
        processor.save_pretrained(root / name)
    assert main(["merge", str(root / "vit-a"), str(root / "vit-b"), "--method", "average", "--output",
                 str(root / "merged"), "-q"]) == 0
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), mode="L") for _ in range(12)]
    datasets.Dataset.from_dict({"image": images, "label": rng.integers(0, 3, 12).tolist()}).cast_column(
        "image", datasets.Image()).save_to_disk(root / "test")
    return root


def _copy(case: Path, tmp_path: Path) -> Path:
    merged = tmp_path / "merged"
    shutil.copytree(case / "merged", merged, symlinks=True)
    return merged


def _error(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith(("INFO", "WARN"))]
    assert len(lines) == 1, lines
    return lines[0]


# ------------------------------------------------- 1: evaluate reads the folder's config.json as the loader does
@pytest.fixture
def no_huge_configs(monkeypatch):
    """transformers' AutoConfig failing the test when handed a config.json declaring more labels than any model
    has: it builds one id2label entry per label (10**9 of them: tens of GB) before anything refuses it."""
    real = AutoConfig.from_pretrained.__func__

    def guarded(cls, path, *args, **kwargs):
        config = Path(path) / "config.json"
        if config.is_file() and json.loads(config.read_text()).get("num_labels", 0) > MAX_LABELS:
            raise AssertionError(f"transformers was handed {config} (num_labels over {MAX_LABELS:,}) unchecked")
        return real(cls, path, *args, **kwargs)

    monkeypatch.setattr(AutoConfig, "from_pretrained", classmethod(guarded))


def _huge_labels(merged: Path) -> None:
    config = json.loads((merged / "config.json").read_text())
    config["num_labels"] = 10**9
    config.pop("id2label", None)
    config.pop("label2id", None)
    (merged / "config.json").write_text(json.dumps(config))


@pytest.mark.usefixtures("no_huge_configs")
def test_evaluate_refuses_a_config_with_a_billion_labels_before_transformers_reads_it(case, tmp_path, capsys):
    merged = _copy(case, tmp_path)
    _huge_labels(merged)
    assert main(["evaluate", str(merged), "--dataset", str(case / "test"), "--no-card", "--no-parents"]) == 1
    line = _error(capsys)
    assert "num_labels is 1000000000" in line and "more than any model has" in line, line


@pytest.mark.usefixtures("no_huge_configs")
def test_evaluate_merge_refuses_a_folder_config_with_a_billion_labels_before_transformers_reads_it(case, tmp_path):
    from hf_mudsc import evaluate_merge
    from hf_mudsc.errors import LoadError

    merged = _copy(case, tmp_path)
    _huge_labels(merged)
    with pytest.raises(LoadError, match="num_labels is 1000000000") as error:
        evaluate_merge(str(merged), None, {"vit-a": str(case / "test")}, progress=False)
    assert "\n" not in str(error.value)


def _config_linked_out(case: Path, tmp_path: Path) -> Path:
    """The merged folder with config.json a link to a file outside it (one transformers must not be handed: a
    billion labels)."""
    merged = _copy(case, tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(merged / "config.json", outside / "config.json")
    _huge_labels(outside)
    outside = outside / "config.json"
    (merged / "config.json").unlink()
    (merged / "config.json").symlink_to(outside)
    return merged


@pytest.mark.usefixtures("no_huge_configs")
def test_evaluate_refuses_a_config_json_linking_out_of_the_folder_as_the_loader_does(case, tmp_path, capsys):
    merged = _config_linked_out(case, tmp_path)
    assert main(["evaluate", str(merged), "--dataset", str(case / "test"), "--no-card", "--no-parents"]) == 1
    line = _error(capsys)
    assert "config.json is a symbolic link to" in line and "outside the folder" in line, line


@pytest.mark.usefixtures("no_huge_configs")
def test_evaluate_merge_refuses_a_config_json_linking_out_of_the_folder(case, tmp_path):
    from hf_mudsc import evaluate_merge
    from hf_mudsc.errors import LoadError

    merged = _config_linked_out(case, tmp_path)
    with pytest.raises(LoadError, match="config.json is a symbolic link to .* outside the folder"):
        evaluate_merge(str(merged), None, {"vit-a": str(case / "test")}, progress=False)


def test_evaluate_refuses_a_folder_without_config_json_naming_it(case, tmp_path, capsys):
    merged = _copy(case, tmp_path)
    (merged / "config.json").unlink()
    assert main(["evaluate", str(merged), "--dataset", str(case / "test"), "--no-card", "--no-parents"]) == 1
    assert "has no config.json" in _error(capsys)


# ------------------------------------------------- 2: evaluate replaces the folder's results, chart and card together
def _evaluated(case: Path, tmp_path: Path) -> Path:
    """The merged folder evaluated once on every row (results, card) with the accuracy chart drawn from the results,
    as `inspect` draws it (recorded in the folder's marker)."""
    from hf_mudsc.publish.plots import draw_plots

    merged = _copy(case, tmp_path)
    assert main(["evaluate", str(merged), "--dataset", str(case / "test"), "--no-parents", "-q"]) == 0
    draw_plots(merged / "plots", None, json.loads((merged / "eval_results.json").read_text()), owner=merged)
    return merged


def _state(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file()}


def _one_run(folder: Path) -> bool:
    """Whether the card and eval_results.json describe the same evaluation (the rows scored: 5 or all 12)."""
    results = json.loads((folder / "eval_results.json").read_text())
    (task,) = results["tasks"].values()
    return ("first 5" in (folder / "README.md").read_text()) == (task["num_samples"] == 5)


def test_a_card_that_fails_to_be_written_leaves_the_results_chart_card_and_marker_of_the_last_run(
        case, tmp_path, monkeypatch, capsys):
    """Written one after the other, a failure at the card (disk full) left the new results file beside the old card,
    both recorded in the marker, and `push` published the pair."""
    import errno
    import os

    merged = _evaluated(case, tmp_path)
    before = _state(merged)
    real_replace, real_rename = os.replace, os.rename
    failed = []

    def full(source, target, *, real):
        if Path(target).name == "README.md" and Path(source).name.startswith(".README.md.") and not failed:
            failed.append(target)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(source, target)

    monkeypatch.setattr(os, "replace", lambda s, t: full(s, t, real=real_replace))
    monkeypatch.setattr(os, "rename", lambda s, t: full(s, t, real=real_rename))
    try:
        code = main(["evaluate", str(merged), "--dataset", str(case / "test"), "--no-parents", "--num-samples", "5"])
    except OSError:
        code = None
    monkeypatch.undo()
    assert code != 0
    assert failed, "the card was never written"
    assert _state(merged) == before  # results, chart, card and marker as the first run left them; no temporary file
    assert _one_run(merged)


def test_a_first_evaluation_whose_card_fails_leaves_no_results_file(case, tmp_path, monkeypatch, capsys):
    """The first `evaluate` of a folder creates eval_results.json: a failure at the card removes it again (the folder
    is as the merge wrote it), rather than leaving results the card does not show."""
    import errno
    import os

    merged = _copy(case, tmp_path)
    before = _state(merged)
    real_replace, real_rename = os.replace, os.rename

    def full(source, target, *, real):  # the card's new text only (not a restore of the previous one)
        if Path(target).name == "README.md" and Path(source).name.startswith(".README.md.") and (
                ".old-" not in Path(source).name):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(source, target)

    monkeypatch.setattr(os, "replace", lambda s, t: full(s, t, real=real_replace))
    monkeypatch.setattr(os, "rename", lambda s, t: full(s, t, real=real_rename))
    code = main(["evaluate", str(merged), "--dataset", str(case / "test"), "--no-parents", "-q"])
    monkeypatch.undo()
    assert code == 1 and "error: no space left on device" in capsys.readouterr().err
    assert _state(merged) == before and not (merged / "eval_results.json").exists()


def test_ctrl_c_while_the_results_are_put_in_place_takes_effect_once_all_are(case, tmp_path, monkeypatch, capsys):
    """A Ctrl-C between the results file and the card left them of different runs; it now waits for the few renames
    that put them in place (results, chart, card, marker), and then stops the command."""
    import os
    import signal

    from hf_mudsc.publish.folder import unlisted_files

    merged = _evaluated(case, tmp_path)
    real_replace, real_rename = os.replace, os.rename
    sent = []

    def interrupted(source, target, *, real):
        result = real(source, target)
        if Path(target).name == "eval_results.json" and not sent:
            sent.append(target)
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C right after the results file is in place
        return result

    monkeypatch.setattr(os, "replace", lambda s, t: interrupted(s, t, real=real_replace))
    monkeypatch.setattr(os, "rename", lambda s, t: interrupted(s, t, real=real_rename))
    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    # as in a terminal: Python's own Ctrl-C handler (a pytest-xdist worker ignores SIGINT, its controller handles it)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = main(["evaluate", str(merged), "--dataset", str(case / "test"), "--no-parents", "--num-samples", "5"])
    finally:
        monkeypatch.undo()
        for number, handler in handlers.items():
            signal.signal(number, handler)
    assert sent and code == 130
    assert "interrupted (Ctrl-C)" in capsys.readouterr().err
    assert _one_run(merged) and "first 5" in (merged / "README.md").read_text()  # all of the new run
    assert unlisted_files(merged, check_content=True) == ([], [])  # the marker lists each as it is now


# ------------------------------------------------- 3: the old copy an interrupted --overwrite leaves is removed
def _write(staging: Path, tag: str) -> None:
    (staging / "model.safetensors").write_bytes(tag.encode() * 1000)
    (staging / "config.json").write_text(json.dumps({"tag": tag}))
    (staging / "plots").mkdir()
    (staging / "plots" / "accuracy.png").write_bytes(b"png " + tag.encode())


def _old_copies(base: Path) -> list[str]:
    return sorted(path.name for path in base.iterdir() if path.name != "merged")


def _unlink_failing_while_an_old_copy_exists(monkeypatch, base: Path, error: BaseException, *, after: int = 1):
    """os.unlink raising `error` once `after` files of the replaced output (`.merged.old-*`) are deleted."""
    import os

    real = os.unlink
    calls = []

    def unlink(path, *args, **kwargs):
        if any(".old-" in name for name in os.listdir(base)):
            calls.append(path)
            if len(calls) > after:
                raise error
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    return calls


def test_an_overwrite_interrupted_while_deleting_the_old_output_leaves_a_copy_the_next_run_removes(
        tmp_path, monkeypatch, caplog):
    """Ctrl-C while `--overwrite` deleted the replaced folder (a multi-GB model takes a while) left a hidden half of it
    (`.merged.old-*`) for good: no later run removed it and nothing said where it was."""
    from hf_mudsc.publish.folder import staged_output

    out = tmp_path / "merged"
    with staged_output(out) as staging:
        _write(staging, "old")
    calls = _unlink_failing_while_an_old_copy_exists(monkeypatch, tmp_path, KeyboardInterrupt())
    with caplog.at_level("WARNING", logger="hf_mudsc"), pytest.raises(KeyboardInterrupt):
        with staged_output(out, overwrite=True) as staging:
            _write(staging, "new")
    monkeypatch.undo()
    assert len(calls) == 2 and json.loads((out / "config.json").read_text()) == {"tag": "new"}
    (left,) = _old_copies(tmp_path)
    assert any(left in record.getMessage() and "the next run" in record.getMessage() for record in caplog.records)
    caplog.clear()
    with caplog.at_level("INFO", logger="hf_mudsc"):
        with staged_output(out, overwrite=True) as staging:
            _write(staging, "third")
    assert _old_copies(tmp_path) == []
    assert any(left in record.getMessage() and "removed" in record.getMessage() for record in caplog.records)


def test_a_failed_delete_of_the_replaced_output_is_said_with_where_its_copy_is(tmp_path, monkeypatch, caplog):
    from hf_mudsc.publish.folder import staged_output

    out = tmp_path / "merged"
    with staged_output(out) as staging:
        _write(staging, "old")
    _unlink_failing_while_an_old_copy_exists(monkeypatch, tmp_path, PermissionError(13, "Permission denied"))
    with caplog.at_level("WARNING", logger="hf_mudsc"):
        with staged_output(out, overwrite=True) as staging:
            _write(staging, "new")
    monkeypatch.undo()
    (left,) = _old_copies(tmp_path)
    assert any(str(tmp_path / left) in record.getMessage() and record.levelname == "WARNING"
               for record in caplog.records), [record.getMessage() for record in caplog.records]


@pytest.mark.parametrize("case_", ["a file not its own", "a file changed", "no marker", "no output",
                                   "a name the writer does not give"])
def test_an_old_copy_the_writer_cannot_prove_its_own_is_kept(tmp_path, case_, caplog):
    """Only a `.NAME.old-*` folder whose marker lists its every file unchanged, beside an output that exists, is
    deleted: anything else may hold someone's files (or be the only copy)."""
    from hf_mudsc.publish.folder import MARKER_FILENAME, clean_leftovers, staged_output

    out = tmp_path / "merged"
    with staged_output(out) as staging:
        _write(staging, "old")
    # a user's own copy (`cp -a merged .merged.old-before-retrain`) is complete and unchanged: only the name the
    # writer gives its backups (8 hex digits) tells them apart (review of s31)
    old = tmp_path / (".merged.old-before-retrain" if case_ == "a name the writer does not give"
                      else ".merged.old-0123abcd")
    shutil.copytree(out, old)
    if case_ == "a file not its own":
        (old / "notes.txt").write_text("mine")
    elif case_ == "a file changed":
        (old / "config.json").write_text("edited")
    elif case_ == "no marker":
        (old / MARKER_FILENAME).unlink()
    elif case_ == "no output":
        shutil.rmtree(out)
    with caplog.at_level("INFO", logger="hf_mudsc"):
        assert clean_leftovers(out) == []
    assert old.is_dir() and (case_ == "no marker" or (old / MARKER_FILENAME).is_file())


# ------------------------------------------------- 4: a JSON file nested too deeply is malformed, not a traceback
DEEP = "[" * 100000 + "]" * 100000  # 200 kB: well under every size limit, far past Python's JSON nesting


def _merge_folder(tmp_path: Path, **files: str) -> Path:
    folder = tmp_path / "merged"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "vit", "mudsc": {}}')
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


@pytest.mark.parametrize(("name", "text"), [
    ("config.json", '{"model_type": "vit", "mudsc": ' + DEEP + "}"),
    ("merge_diagnostics.json", '{"groups": ' + DEEP + "}"),
    ("eval_results.json", '{"scores": ' + DEEP + "}"),
], ids=["config.json", "merge_diagnostics.json", "eval_results.json"])
def test_inspect_refuses_a_deeply_nested_file_in_one_line(tmp_path, capsys, name, text):
    folder = _merge_folder(tmp_path)
    (folder / name).write_text(text)
    assert main(["inspect", str(folder), "--no-plots"]) == 1
    line = _error(capsys)
    assert name in line and "nested too deeply" in line, line


def test_evaluate_refuses_to_replace_a_deeply_nested_output_json_in_one_line(case, tmp_path, capsys):
    merged = _copy(case, tmp_path)
    old = tmp_path / "old.json"
    old.write_text('{"scores": ' + DEEP + "}")
    assert main(["evaluate", str(merged), "--dataset", str(case / "test"), "--no-card", "--no-parents",
                 "--output-json", str(old)]) == 1
    line = _error(capsys)
    assert "refusing to replace" in line and "old.json" in line, line


def test_a_deeply_nested_marker_above_the_output_is_no_marker(tmp_path):
    """Every merge reads the marker of each folder above `--output` (`written_around`): one nested too deeply crashed
    them all; it is read as what it is, not the writer's marker."""
    from hf_mudsc.publish.folder import MARKER_FILENAME, check_output, read_marker

    old = tmp_path / "old-output"
    old.mkdir()
    (old / MARKER_FILENAME).write_text('{"files": ' + DEEP + "}")
    assert read_marker(old) is None
    check_output(old / "new", overwrite=False)  # not inside a folder hf-mudsc wrote
    with pytest.raises(FileExistsError, match="not a folder written by hf-mudsc"):
        check_output(old, overwrite=True)
