"""The demo's cache (`hf-mudsc demo --cache-dir`): an entry that is incomplete or changed since the demo wrote it is
rebuilt when it holds only the demo's own files, unchanged, and refused in one line before any training otherwise
(never a crash later, never a broken pair used, never a file deleted that the demo did not write)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_mudsc.cli import demo
from hf_mudsc.cli.main import main
from hf_mudsc.load.parents import load_parents

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(cache) -> argparse.Namespace:
    return argparse.Namespace(hidden_size=8, epochs=1, seeds=(0, 1), cache_dir=str(cache), num_samples=64)


@pytest.fixture
def cached(tmp_path):
    folder_a, folder_b, calibration, _ = demo.prepare_inputs(tiny(tmp_path / "cache"))
    return tmp_path / "cache", folder_a, calibration


def no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("trained although the cache entry is refused")

    monkeypatch.setattr("hf_mudsc.testing.toy.train_vit", refuse)


def test_a_parent_missing_a_file_the_demo_wrote_is_rebuilt(cached):
    cache, folder_a, _ = cached
    (folder_a / "config.json").unlink()
    folder_a, folder_b, _, _ = demo.prepare_inputs(tiny(cache))
    assert (folder_a / "config.json").is_file()
    load_parents([str(folder_a), str(folder_b)])


def test_a_truncated_parent_is_refused_in_one_line_before_training_and_kept(cached, monkeypatch):
    cache, folder_a, _ = cached
    weights = folder_a / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    no_training(monkeypatch)
    with pytest.raises(FileExistsError, match=r"demo cache entry .*digits-0-4.*model\.safetensors.*--cache-dir"):
        demo.prepare_inputs(tiny(cache))
    assert weights.stat().st_size == 1000


def test_a_stray_file_in_a_cached_parent_is_left_and_the_parent_used(cached, monkeypatch):
    cache, folder_a, _ = cached
    (folder_a / "notes.txt").write_text("mine")
    no_training(monkeypatch)
    folder_a, folder_b, _, _ = demo.prepare_inputs(tiny(cache))
    assert (folder_a / "notes.txt").read_text() == "mine"
    load_parents([str(folder_a), str(folder_b)])


def test_a_calibration_set_missing_a_file_is_rebuilt_and_a_truncated_one_refused(cached):
    import datasets

    cache, _, calibration = cached
    (calibration / "state.json").unlink()
    _, _, calibration, _ = demo.prepare_inputs(tiny(cache))
    assert len(datasets.load_from_disk(str(calibration))) > 0
    arrow = next(calibration.glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:100])
    with pytest.raises(FileExistsError, match=r"demo cache entry .*calibration"):
        demo.prepare_inputs(tiny(cache))


def test_a_truncated_trained_model_in_the_cache_is_refused_in_one_line(cached, monkeypatch):
    cache, folder_a, _ = cached
    import shutil

    shutil.rmtree(folder_a.parent)  # the exported pair gone: the trained models are read from the cache
    trained = next(cache.glob("digits-vit-01234-*"))
    (trained / "model.safetensors").write_bytes(b"\0" * 10)
    no_training(monkeypatch)
    with pytest.raises(ValueError, match=r"cached model .*digits-vit-01234.* cannot be loaded.*delete"):
        demo.prepare_inputs(tiny(cache))


@pytest.mark.parametrize(("flags", "words"), [
    (["--seeds", "0", str(2**70)], "--seeds"),
    (["--threads", "100000"], "--threads"),
    (["--epochs", "100000"], "--epochs"),  # days of training before anything is merged
    (["--hidden-size", "4000000"], "--hidden-size"),  # fails only when the first layer is allocated
    (["--alpha", "2"], "--alpha"),
    # QA s22: "--epochs, --num-samples and --threads must be positive" named neither which one nor its value
    (["--epochs", "0"], "--epochs 0"),
    (["--num-samples", "0"], "--num-samples 0"),
    (["--threads", "-1"], "--threads -1"),
])
def test_bad_values_are_refused_in_one_line_before_training(tmp_path, capsys, monkeypatch, flags, words):
    """An invalid command line: exit 2, as argparse's own refusals and every other command's (README)."""
    no_training(monkeypatch)
    argv = ["demo", "--output", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err, err
    assert not (tmp_path / "cache").exists()


def test_a_cache_dir_that_cannot_be_written_is_refused_in_one_line_before_training(tmp_path, capsys, monkeypatch):
    """A file where the cache should be (a read-only folder takes the same check: root ignores permissions, so the
    suite cannot make one): refused naming --cache-dir, before any training, the file untouched."""
    (tmp_path / "cache").write_text("mine")
    no_training(monkeypatch)
    argv = ["demo", "--output", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--hidden-size", "8"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--cache-dir" in err and "not a folder" in err, err
    assert (tmp_path / "cache").read_text() == "mine"


@pytest.mark.parametrize("where", ["entry", "inside", "cache"])
def test_an_output_overlapping_the_cache_is_refused_in_one_line_and_the_cache_kept(cached, capsys, monkeypatch,
                                                                                     where):
    """The cached parents are the demo's inputs: `--output` on one of them (which the demo wrote, so `--overwrite`
    alone would replace it with the merged model, and later runs would merge that), inside one or around the cache
    is refused before any work."""
    cache, folder_a, _ = cached
    output = {"entry": folder_a, "inside": folder_a / "merged", "cache": cache}[where]
    before = sorted(p.relative_to(cache) for p in cache.rglob("*"))
    monkeypatch.setattr("hf_mudsc.cli.demo.prepare_inputs", lambda args: pytest.fail("the demo ran"))
    argv = ["demo", "--output", str(output), "--overwrite", "--cache-dir", str(cache), "--hidden-size", "8",
            "--epochs", "1"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "overlaps" in err and "cache" in err, err
    assert sorted(p.relative_to(cache) for p in cache.rglob("*")) == before


@pytest.mark.parametrize("value", ["", None])
def test_an_empty_hf_mudsc_cache_means_unset_for_the_demo_and_the_scripts(tmp_path, value):
    """`HF_MUDSC_CACHE=""` put the demo's cache in `./demo` (and the benchmarks' in `./bench`) of whatever folder
    the command ran in; empty means unset (as HF_HOME does): both use ~/.cache/hf_mudsc."""
    scripts = Path(__file__).resolve().parents[1] / "scripts"
    code = (f"import sys; sys.path.insert(0, {str(scripts)!r})\n"
            "import common\nfrom hf_mudsc.cli import demo\nprint(demo.DEFAULT_CACHE); print(common.CACHE_ROOT)\n")
    env = {k: v for k, v in os.environ.items() if k != "HF_MUDSC_CACHE"}
    env["HOME"] = str(tmp_path / "home")
    if value is not None:
        env["HF_MUDSC_CACHE"] = value
    (tmp_path / "work").mkdir()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                          cwd=tmp_path / "work")
    assert done.returncode == 0, done.stderr
    root = tmp_path / "home" / ".cache" / "hf_mudsc"
    assert done.stdout.split() == [str(root / "demo"), str(root)]


def test_the_readme_states_the_demos_limits():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert f"`--hidden-size` up to {demo.MAX_HIDDEN_SIZE}, `--epochs` up to {demo.MAX_EPOCHS}" in readme
