"""The README's evaluation commands and its dry-run example run as printed (offline, Hub ids replaced by local
folders of the same names), so a reader who copies them gets what the text says."""

from __future__ import annotations

import shlex

import datasets
import numpy as np
from factories import make_model
from PIL import Image
from readme_examples import readme_blocks, readme_example
from transformers import ViTImageProcessor

from hf_mudsc.cli.main import main

# The README's running example merges org/vit-cars with org/vit-pets@v2; its evaluation data are org/cars and
# org/pets (here: local folders at those paths, each with a test split).
PARENTS = {"vit-cars": ("sedan", "suv", "truck"), "vit-pets": ("cat", "dog", "fox")}
DATA = {"vit-cars": "org/cars", "vit-pets": "org/pets"}


def labelled_images(rng: np.random.Generator, names: tuple[str, ...], rows: int) -> datasets.Dataset:
    images = [Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), mode="L") for _ in range(rows)]
    return datasets.Dataset.from_dict({"image": images, "label": [i % len(names) for i in range(rows)]}).cast_column(
        "image", datasets.Image()).cast_column("label", datasets.ClassLabel(names=list(names)))


def readme_evaluate_commands() -> list[str]:
    """The README's `hf-mudsc evaluate merged ...` lines (a local folder: the Hub one needs a Hub)."""
    lines = [line for block in readme_blocks("bash") for line in block.splitlines()]
    return [shlex.join(shlex.split(line, comments=True)) for line in lines
            if line.startswith("hf-mudsc evaluate merged ")]


def test_the_readme_evaluate_commands_run_on_a_merge_of_the_readme_parents(tmp_path, monkeypatch):
    """They gave `--dataset cars=...` for a merge of org/vit-cars and org/vit-pets, whose tasks are named after the
    parents (`vit-cars`, `vit-pets`): the command was refused as naming unknown tasks."""
    monkeypatch.chdir(tmp_path)
    processor = ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5], image_std=[0.5])
    rng = np.random.default_rng(0)
    tasks = []
    for seed, (name, labels) in enumerate(PARENTS.items(), start=1):
        model = make_model("vit_cls", seed)
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {label: i for i, label in enumerate(labels)}
        model.save_pretrained(name)
        processor.save_pretrained(name)
        data = labelled_images(rng, labels, 12)
        (tmp_path / DATA[name]).mkdir(parents=True)
        data.to_parquet(tmp_path / DATA[name] / "test.parquet")
        tasks.append(data.cast_column("label", datasets.Value("int64")).add_column("task", [name] * len(data)))
    (tmp_path / "org" / "both-tasks").mkdir()
    datasets.concatenate_datasets(tasks).to_parquet(tmp_path / "org" / "both-tasks" / "test.parquet")
    assert main(["merge", *PARENTS, "--method", "linear", "--output", "merged"]) == 0

    commands = readme_evaluate_commands()
    assert len(commands) >= 4, commands
    for command in commands:
        assert main(shlex.split(command)[1:]) == 0, command
        assert (tmp_path / "merged" / "eval_results.json").is_file()


def test_the_readme_dry_run_example_prints_the_plan_it_describes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_example("dry-run"), "README.md (dry-run example)", "exec"), {"__name__": "readme_dry_run"})
    printed = capsys.readouterr().out
    # "Parents / Relation / Method / Groups / Calibration / Estimate", in that order, then the peak memory
    positions = [printed.index(f"\n{heading}:") for heading in ("Relation", "Method", "Groups", "Calibration",
                                                                 "Estimate")]
    assert printed.index("Parents:") < positions[0] and positions == sorted(positions), printed
    assert float(printed.strip().splitlines()[-1]) > 0
    assert not list(tmp_path.iterdir())  # a dry run writes nothing
