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


# The README's Python examples that are not run by a test of their own (no `# readme-test:` tag) use Hub ids and
# these placeholders (and continue the first example's `import hf_mudsc`); each runs as printed with them bound, in
# a fresh interpreter whose Hub is the emulator.
PLACEHOLDERS = '''
import torch
import hf_mudsc
from transformers import ViTConfig, ViTForImageClassification

config = ViTConfig(image_size=16, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=2,
                   num_attention_heads=4, intermediate_size=64, num_labels=3)
torch.manual_seed(0)
PLACEHOLDERS = dict(
    hf_mudsc=hf_mudsc,
    model_a=ViTForImageClassification(config).eval(), model_b=ViTForImageClassification(config).eval(),
    dataset=[{"pixel_values": torch.randn(32, 1, 16, 16)} for _ in range(4)],
    parents=["org/bert-sst2", "org/bert-mrpc", "org/bert-qnli"], calibration="org/mixed-sentences:train[:256]",
)
'''


def untagged_python_examples() -> list[str]:
    return [block for block in readme_blocks("python") if not block.startswith("# readme-test:")]


def test_the_readme_python_examples_with_hub_ids_run_against_the_hub(hub_emulator, tmp_path):
    """Each example's Hub ids (parents, a pinned tag, calibration data, a push target) exist on the emulator as the
    example expects them; nothing in the example is changed."""
    import json

    import torch
    from factories import vit_cli_case
    from transformers import BertConfig, BertForSequenceClassification

    hub = hub_emulator
    (vit_a, vit_b), _ = vit_cli_case(tmp_path / "vit")
    hub.upload_folder("org/vit-cars", vit_a, "parent A")
    hub.upload_folder("org/vit-pets", vit_b, "parent B")
    hub._get_repo("org/vit-pets").tags["v2"] = hub.head("org/vit-pets")
    rng = np.random.default_rng(0)
    (tmp_path / "calibration_images").mkdir()
    for i in range(16):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), mode="L").save(
            tmp_path / "calibration_images" / f"{i}.png")
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, num_labels=2)
    torch.manual_seed(0)
    base = BertForSequenceClassification(config)
    for seed, name in enumerate(("bert-sst2", "bert-mrpc", "bert-qnli"), start=1):
        tuned = BertForSequenceClassification(config)
        tuned.load_state_dict(base.state_dict())
        torch.manual_seed(seed)
        with torch.no_grad():
            for parameter in tuned.parameters():
                parameter.add_(0.005 * torch.randn_like(parameter))
        tuned.save_pretrained(tmp_path / name)
        hub.upload_folder(f"org/{name}", tmp_path / name, "a fine-tune")
    rows = [{"input_ids": rng.integers(0, 64, 12).tolist(), "attention_mask": [1] * 12} for _ in range(40)]
    hub.commit_files("org/mixed-sentences", {"train.jsonl": "\n".join(map(json.dumps, rows)).encode()}, "data",
                     repo_type="dataset")

    examples = untagged_python_examples()
    assert len(examples) >= 4, examples
    code = (f"{PLACEHOLDERS}\nimport json\nfor example in json.loads({json.dumps(examples)!r}):\n"
            "    exec(compile(example, 'README.md', 'exec'), dict(PLACEHOLDERS))\n    emit('ran')\n")
    result = hub.run_client(code, cwd=tmp_path, env={"OMP_NUM_THREADS": "1"}, timeout=600)
    assert result.results == ["ran"] * len(examples), result.stderr[-4000:]
    assert hub.is_private("me/merged-vit") and "mudsc_recipe.yaml" in hub.list_files("me/merged-vit")
    assert (tmp_path / "merged-full" / "README.md").is_file() and (tmp_path / "merged-vit").is_dir()


def test_the_readme_local_folder_merges_run_and_the_recipe_rebuilds_the_same_weights(tmp_path, monkeypatch,
                                                                                     one_thread):
    """"Local folders, other methods and settings", "Several parents" and the size budget's command, on two tiny ViT
    folders and a calibration folder at the README's paths; then "Reproduce a merge from its recipe": bit-identical
    weights, and the bfloat16 merge in half the bytes."""
    import shutil

    import torch
    from factories import vit_cli_case
    from readme_examples import README, shell_lines
    from safetensors.torch import load_file

    monkeypatch.chdir(tmp_path)
    vit_cli_case(tmp_path)  # vit-a, vit-b (with processors), calibration
    shutil.copytree("calibration", "calib")
    shutil.copytree("calibration", "calibration-images")
    make_model("vit_cls", 3).save_pretrained("vit-c")
    lines = [shlex.split(line, comments=True) for line in shell_lines(README.read_text(encoding="utf-8"))
             if line.startswith("hf-mudsc merge ")]
    merges = [words for words in lines if words[:3] == ["hf-mudsc", "merge", "./vit-a"]]
    rebuild = ["hf-mudsc", "merge", "--recipe", "merged/mudsc_recipe.yaml", "--output", "rebuilt"]
    assert len(merges) >= 8 and rebuild in lines, merges
    for words in [*merges, rebuild]:
        assert main(words[1:]) == 0, shlex.join(words)
    merged, rebuilt = load_file("merged/model.safetensors"), load_file("rebuilt/model.safetensors")
    assert merged.keys() == rebuilt.keys() and all(torch.equal(merged[k], rebuilt[k]) for k in merged)
    assert {t.dtype for t in load_file("merged-bf16/model.safetensors").values()} == {torch.bfloat16}
