"""Interruptions after the session-31 interrupt hunt: a Ctrl-C closes the refit/repair progress bar (the exit line
gets a line of its own); a staging folder's removal, interrupted, leaves what remains with its marker; a failed
marker rewrite leaves no temporary file."""

from __future__ import annotations

import errno
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from hf_mudsc.apply import refit, repair
from hf_mudsc.publish.folder import (
    MARKER_FILENAME,
    PARTIAL_MARK,
    check_output,
    clean_leftovers,
    record_files,
    staged_output,
    unlisted_files,
    write_file_atomically,
)
from hf_mudsc.solve.matchers import Match
from hf_mudsc.spec import Group, HookPoint, Member, PermutationSpec

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------- 1: Ctrl-C inside the refit/repair bar closes it
class TwoLayers(nn.Module):
    """fc1 -> ReLU -> fc2 -> LayerNorm: enough for a refit and a repair of two steps."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.fc2, self.norm = nn.Linear(3, 4), nn.Linear(4, 3), nn.LayerNorm(3)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc2(torch.relu(self.fc1(x))))


SPEC = PermutationSpec(groups=(
    Group("residual", 3, (Member("fc2.weight", 0, "out"), Member("fc2.bias", 0, "out"),
                          Member("norm.weight", 0, "out"), Member("norm.bias", 0, "out")),
          (HookPoint("norm", "output"),)),
    Group("mlp", 4, (Member("fc1.weight", 0, "out"), Member("fc1.bias", 0, "out"), Member("fc2.weight", 1, "in")),
          (HookPoint("fc2", "input"),), width_key="intermediate_size"),
))


def _match(clusters: list[int], merged: int) -> Match:
    return Match(cluster_of=torch.tensor(clusters), merge_weight=torch.full((len(clusters),), 0.5,
                                                                            dtype=torch.float64),
                 num_merged=merged, value=1.0)


@pytest.mark.parametrize("stage", ["refit", "repair"])
def test_ctrl_c_inside_the_refit_or_repair_loop_closes_its_progress_bar(stage, monkeypatch):
    """The bar was closed after the try/finally: a Ctrl-C left it open, and the CLI's exit line was drawn onto it."""
    module = refit if stage == "refit" else repair
    bars = []

    class Recorded(module.Progress):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.closed = False
            bars.append(self)

        def close(self) -> None:
            self.closed = True
            super().close()

    monkeypatch.setattr(module, "Progress", Recorded)
    generator = torch.Generator().manual_seed(0)
    data = [{"x": torch.randn(7, 3, generator=generator)} for _ in range(2)]

    def batches():
        if bars:  # a pass inside the bar's loop: Ctrl-C
            raise KeyboardInterrupt
        return iter(data)

    merged, parents = TwoLayers(3), [TwoLayers(1), TwoLayers(2)]
    matches = [_match([1, 0, 2, 2, 1, 0], 3), _match([2, 0, 3, 1, 0, 3, 1, 2], 4)]
    with pytest.raises(KeyboardInterrupt):
        if stage == "refit":
            refit.refit_model(merged, parents, SPEC, matches, batches, progress=True)
        else:
            repair.repair_model(merged, parents, SPEC, matches, batches, scope="all", progress=True)
    assert len(bars) == 1 and bars[0].closed


# --------------------------------------- 2: a staging folder's removal, interrupted, leaves it with its marker
_NAMES = ["README.md", "config.json", "model.safetensors", "mudsc_recipe.yaml", "merge_diagnostics.json",
          "preprocessor_config.json", "eval_results.json", "tokenizer.json", "vocab.txt"]


def _staging_left_by_a_killed_run(out: Path) -> Path:
    """`.out.partial-*` as a run killed while writing leaves it: the files, and the marker naming a gone process."""
    staging = out.parent / f".{out.name}{PARTIAL_MARK}kill9"
    staging.mkdir()
    for name in _NAMES:
        (staging / name).write_text(name)
    (staging / "plots").mkdir()
    (staging / "plots" / "accuracy.png").write_bytes(b"png")
    record_files(staging, complete=False, staging=True)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    marker = json.loads((staging / MARKER_FILENAME).read_text())
    (staging / MARKER_FILENAME).write_text(json.dumps({**marker, "pid": gone.pid}))
    return staging


def _interrupt_before_the_last_files_go(monkeypatch, folder: Path) -> list[str]:
    """Ctrl-C while `folder` (a `.partial-` one) is deleted, once all but its last two files are gone."""
    real_unlink = os.unlink
    files = sum(path.is_file() for path in folder.rglob("*"))
    unlinked: list[str] = []

    def interrupted(path, *args, **kwargs):
        if len(unlinked) == files - 2:
            unlinked.append("interrupted")
            raise KeyboardInterrupt
        real_unlink(path, *args, **kwargs)
        unlinked.append(str(path))

    monkeypatch.setattr(os, "unlink", interrupted)
    return unlinked


def _partials(out: Path) -> list[Path]:
    return [p for p in out.parent.iterdir() if PARTIAL_MARK in p.name]


def test_ctrl_c_while_a_killed_runs_leftover_is_removed_leaves_it_removable(tmp_path, monkeypatch):
    """clean_leftovers deleted a leftover with a plain rmtree, its marker among the first files: a Ctrl-C then left a
    model-sized folder without the marker that no later run removes. The marker now goes last."""
    out = tmp_path / "out"
    unlinked = _interrupt_before_the_last_files_go(monkeypatch, _staging_left_by_a_killed_run(out))
    with pytest.raises(KeyboardInterrupt):
        clean_leftovers(out)
    monkeypatch.undo()
    assert unlinked[-1] == "interrupted"
    assert all((p / MARKER_FILENAME).exists() for p in _partials(out))  # what is left still proves it the writer's
    clean_leftovers(out)  # the next run
    assert _partials(out) == []


def test_ctrl_c_during_a_failed_runs_own_cleanup_leaves_its_staging_folder_marked(tmp_path, monkeypatch):
    """A run's staging folder, deleted after a failure (or a first Ctrl-C) and interrupted again, keeps its marker
    (a later run removes it once this process is gone)."""
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with staged_output(out) as staging:
            for name in _NAMES:
                (staging / name).write_text(name)
            _interrupt_before_the_last_files_go(monkeypatch, staging)
            raise RuntimeError("the run failed")
    monkeypatch.undo()
    left = _partials(out)
    assert left and all((p / MARKER_FILENAME).exists() for p in left)


# ------------------------------------------- 3: a failed marker rewrite leaves no temporary file, the folder as it was
@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_marker_rewrite_leaves_the_folder_as_it_was_and_replaceable(failure, tmp_path, monkeypatch):
    """A full disk or a Ctrl-C while the marker was rewritten (inspect DIR redrawing a plot) left a half-written
    `.hf_mudsc_output.json.*.tmp` in DIR and a plot the marker no longer matched: `merge --overwrite` then refused the
    folder for good. Now the file is replaced only once its marker entry is written, and no temporary is left."""
    out = tmp_path / "out"
    with staged_output(out) as staging:
        (staging / "plots").mkdir()
        (staging / "plots" / "accuracy.png").write_bytes(b"old png")
    real_write_text = Path.write_text

    def full(self, data, *args, **kwargs):
        if self.name.startswith(f"{MARKER_FILENAME}.") and self.name.endswith(".tmp"):
            with open(self, "w") as handle:
                handle.write(data[: len(data) // 2])  # what a full disk lets through
            raise failure
        return real_write_text(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(type(failure)):
        write_file_atomically(out / "plots" / "accuracy.png", lambda temporary: temporary.write_bytes(b"new png"),
                              owner=out)
    monkeypatch.undo()
    assert sorted(p.name for p in out.rglob("*")) == [MARKER_FILENAME, "accuracy.png", "plots"]
    assert (out / "plots" / "accuracy.png").read_bytes() == b"old png"
    assert unlisted_files(out, check_content=True) == ([], [])
    check_output(out, overwrite=True)  # the next `merge --overwrite` accepts it


# --------------------------------------------------------------------- 4: a full disk is one line, not a traceback
@pytest.fixture(scope="module")
def parents(tmp_path_factory):
    """Two 3-class ViT parents (average merges need no data), two merged folders of them and a 12-row test set."""
    import datasets
    import numpy as np
    from factories import make_model
    from PIL import Image
    from transformers import ViTImageProcessor

    from hf_mudsc.cli.main import main

    root = tmp_path_factory.mktemp("interrupt_s31")
    processor = ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5], image_std=[0.5])
    for seed, name in enumerate(("vit-a", "vit-b"), start=1):
        make_model("vit_cls", seed).save_pretrained(root / name)
        processor.save_pretrained(root / name)
    assert main(["merge", str(root / "vit-a"), str(root / "vit-b"), "--method", "average", "--output",
                 str(root / "merged"), "-q"]) == 0
    assert main(["merge", str(root / "vit-a"), str(root / "vit-b"), "--method", "linear", "--weights", "0.3", "0.7",
                 "--output", str(root / "merged-other"), "-q"]) == 0  # another merge into the same --output
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), mode="L") for _ in range(12)]
    datasets.Dataset.from_dict({"image": images, "label": rng.integers(0, 3, 12).tolist()}).cast_column(
        "image", datasets.Image()).save_to_disk(root / "test")
    return root


def _safetensors_full(*args, **kwargs):
    from safetensors import SafetensorError

    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def _recipe_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize(("where", "failure"), [
    ("transformers.modeling_utils.safe_save_file", _safetensors_full),  # the weights: safetensors' own error
    ("hf_mudsc.publish.recipe.Recipe.save", _recipe_full),  # a plain OSError
])
def test_merge_onto_a_full_disk_ends_in_one_line(where, failure, parents, tmp_path, monkeypatch, capsys):
    """A full disk ended merge in a ~30-line traceback (only ValueError and a few OSError kinds were one line)."""
    from hf_mudsc.cli.main import main

    module, _, name = where.rpartition(".")
    if module.endswith(".Recipe"):
        from hf_mudsc.publish.recipe import Recipe as target
    else:
        import transformers.modeling_utils as target
    monkeypatch.setattr(target, name, failure)
    out = tmp_path / "out"
    code = main(["merge", str(parents / "vit-a"), str(parents / "vit-b"), "--method", "average", "--output",
                 str(out), "-q"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("hf-mudsc merge: error: no space left on device") and "--output" in err[0]
    assert "nothing was left half-written" in err[0]
    assert list(tmp_path.iterdir()) == []  # and it is true


def test_evaluate_on_a_full_disk_ends_in_one_line(parents, monkeypatch, capsys):
    """evaluate writes through the same writers: a full disk (here a quota) is one line too, and DIR is as it was."""
    from hf_mudsc.cli.main import main

    before = {p.name: p.read_bytes() for p in (parents / "merged").rglob("*") if p.is_file()}
    real_rename, real_replace = os.rename, os.replace

    def full(source, target, *args, real=real_rename, **kwargs):
        if Path(target).name == MARKER_FILENAME:
            raise OSError(errno.EDQUOT, "Disk quota exceeded", str(target))
        return real(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "rename", full)
    monkeypatch.setattr(os, "replace", functools.partial(full, real=real_replace))  # the marker is os.replace'd
    code = main(["evaluate", str(parents / "merged"), "--dataset", str(parents / "test"), "--no-parents", "-q"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("hf-mudsc evaluate: error: disk quota exceeded") and MARKER_FILENAME in err[0]
    assert before == {p.name: p.read_bytes() for p in (parents / "merged").rglob("*") if p.is_file()}


# ------------------------------------------- 5: two --overwrite runs finishing together: the loser says so in one line
def test_an_overwrite_losing_the_race_to_another_run_is_refused_and_says_where_the_old_copy_is(tmp_path, monkeypatch,
                                                                                                  caplog):
    """Run A renamed the old DIR aside, run B renamed its own DIR in, A's rename then failed (directory not empty)
    and so did putting the old DIR back: an OSError traceback. Now the one-line "appeared meanwhile" refusal, B's DIR
    kept, and the old copy's place said (the next run removes it). The two renames are the fallback where the
    system cannot swap the folders in one step (`exchange_paths` False): the swap leaves no such moment."""
    from hf_mudsc.publish import folder as folder_module

    monkeypatch.setattr(folder_module, "exchange_paths", lambda first, second: False)
    out, other = tmp_path / "out", tmp_path / "other"
    for folder, tag in ((out, "old"), (other, "run B")):
        with staged_output(folder) as staging:
            (staging / "config.json").write_text(json.dumps({"tag": tag}))
    real_rename = os.rename

    def race(source, target, *args, **kwargs):
        real_rename(source, target, *args, **kwargs)
        if ".old-" in Path(target).name and other.exists():
            real_rename(other, out)  # run B finishes right now

    monkeypatch.setattr(os, "rename", race)
    with caplog.at_level("WARNING", logger="hf_mudsc"), pytest.raises(FileExistsError, match="appeared while"):
        with staged_output(out, overwrite=True) as staging:
            (staging / "config.json").write_text(json.dumps({"tag": "run A"}))
    monkeypatch.undo()
    assert json.loads((out / "config.json").read_text()) == {"tag": "run B"}
    old = [p for p in tmp_path.iterdir() if ".old-" in p.name]
    assert len(old) == 1 and str(old[0]) in caplog.text
    assert _partials(out) == []
    clean_leftovers(out)  # the next run writing DIR
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --------------------------------------------- 6: Ctrl-C during merge --push-to-hub: the exit line says what is where
@pytest.mark.parametrize("moment", ["upload", "commit"])
def test_ctrl_c_during_a_merges_push_says_what_the_hub_and_the_disk_hold(moment, parents, hub_cli, hub_emulator,
                                                                         tmp_path, monkeypatch):
    """Ctrl-C during `merge --push-to-hub`'s push said "nothing was left half-written" while the Hub repo held the
    model (the local output thrown away, a re-run refused) or an empty repo the run created. Now the commit is made
    or not, never cut (Ctrl-C waits for it), an interrupted upload deletes the repo the run created as a failed push
    does, the model is kept in --output either way, and the line says so."""
    import signal

    import huggingface_hub

    hub = hub_emulator
    repo = f"{hub.username}/merged-{moment}"
    out = tmp_path / "out"
    real = {name: getattr(huggingface_hub.HfApi, name) for name in ("preupload_lfs_files", "create_commit")}

    def interrupted(name):
        def call(self, *args, **kwargs):
            if name == ("preupload_lfs_files" if moment == "upload" else "create_commit"):
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C now
            return real[name](self, *args, **kwargs)
        return call

    for name in real:
        monkeypatch.setattr(huggingface_hub.HfApi, name, interrupted(name))
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a pytest-xdist worker ignores SIGINT
    try:
        run = hub_cli("merge", str(parents / "vit-a"), str(parents / "vit-b"), "--method", "average", "-q",
                      "--output", str(out), "--push-to-hub", repo)
    finally:
        signal.signal(signal.SIGINT, previous)
    line = [text for text in run.stderr.splitlines() if "interrupted (Ctrl-C)" in text]
    assert run.returncode == 130 and len(line) == 1, run.stderr[-3000:]
    assert "nothing was left half-written" not in line[0]
    assert (out / "model.safetensors").exists() and str(out) in line[0]  # the model kept, as a failed push keeps it
    if moment == "upload":
        assert not hub.repo_exists(repo) and "was deleted" in line[0]  # the repo this run created
        assert f"hf-mudsc push {out} {repo}" in line[0]
    else:
        assert "model.safetensors" in hub.list_files(repo) and "holds the merged model" in line[0]


# ------------------------------------------- 7: evaluate never writes one model's scores into the folder of another
def _contents(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_evaluate_refuses_to_write_into_a_folder_replaced_while_it_evaluated(parents, tmp_path, monkeypatch, capsys):
    """`merge --overwrite` replacing DIR during `evaluate DIR`: the old model's scores went into the new model's card
    and results file (and its marker), which `push` then published. Now the folder's weights are checked again
    before writing: a replaced folder is refused in one line and left as the merge wrote it."""
    import shutil

    import hf_mudsc.evaluate.harness as harness
    from hf_mudsc.cli.main import main

    folder, other = tmp_path / "merged", tmp_path / "other"
    shutil.copytree(parents / "merged", folder)
    shutil.copytree(parents / "merged-other", other)
    original = harness.evaluate_merge

    def evaluated_then_replaced(*args, **kwargs):
        result = original(*args, **kwargs)
        os.rename(folder, tmp_path / "aside")  # meanwhile: merge --output DIR --overwrite
        os.rename(other, folder)
        return result

    monkeypatch.setattr(harness, "evaluate_merge", evaluated_then_replaced)
    after = _contents(parents / "merged-other")
    code = main(["evaluate", str(folder), "--dataset", str(parents / "test"), "--no-parents", "-q"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 1 and len(err) == 1, err
    assert "was replaced while it was evaluated" in err[0] and "run evaluate again" in err[0]
    assert _contents(folder) == after  # nothing written


# ---------------------------------------------- 8: inspect never redraws one merge's plots into the folder of another
def test_inspect_refuses_to_redraw_into_a_folder_replaced_while_it_drew(parents, tmp_path, monkeypatch, capsys):
    """`inspect DIR` read DIR, drew, and wrote the PNGs into DIR, which a `merge --overwrite` had replaced meanwhile:
    the new merge's card showed the old one's plots, recorded in its marker. Now refused in one line, nothing
    written."""
    import shutil

    import hf_mudsc.publish.plots as plots
    from hf_mudsc.cli.main import main

    folder, other = tmp_path / "merged", tmp_path / "other"
    shutil.copytree(parents / "merged", folder)
    shutil.copytree(parents / "merged-other", other)
    assert main(["evaluate", str(folder), "--dataset", str(parents / "test"), "--no-parents", "-q"]) == 0
    assert main(["evaluate", str(other), "--dataset", str(parents / "test"), "--no-parents", "-q",
                 "--num-samples", "5"]) == 0  # each holds its own accuracy chart
    original = plots.draw_plots

    def drawn_then_replaced(*args, **kwargs):
        drawn = original(*args, **kwargs)
        if other.exists():
            os.rename(folder, tmp_path / "aside")  # meanwhile: merge --output DIR --overwrite
            os.rename(other, folder)
        return drawn

    monkeypatch.setattr(plots, "draw_plots", drawn_then_replaced)
    after = _contents(other)
    code = main(["inspect", str(folder), "-q"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert _contents(folder) == after  # nothing written
    assert code == 1 and len(err) == 1, err
    assert "was replaced while it was inspected" in err[0] and "run inspect again" in err[0]
