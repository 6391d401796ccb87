"""Hostile inputs against the project's safety promises (s36): each test is a defect that was real, its fix the
smallest. Inputs are never modified, and what a merge refuses at once is refused before any heavy work — and by its
dry run, in the same words."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cli_runs import run_cli, run_cli_output
from factories import make_model

import hf_mudsc


def _parents_naming_a_local_base(root: Path) -> tuple[list[str], Path]:
    """Two ViT parents whose model cards name the folder `root/base` as their base_model (as a fine-tuning script
    writes it), and that base."""
    base = root / "base"
    make_model("vit_cls", 0).save_pretrained(base)
    parents = []
    for name, seed in (("a", 1), ("b", 2)):
        make_model("vit_cls", seed).save_pretrained(root / name)
        (root / name / "README.md").write_text(f"---\nbase_model: {base}\n---\n# {name}\n")
        parents.append(str(root / name))
    return parents, base


def test_an_output_inside_the_base_the_parents_cards_name_is_refused_before_merging(tmp_path, capsys, monkeypatch):
    """merge A B --method task_arithmetic -o BASE/merged, BASE named by both cards: merged first, refused after."""
    parents, base = _parents_naming_a_local_base(tmp_path)
    monkeypatch.setattr(hf_mudsc, "merge", lambda *a, **k: pytest.fail("the merge ran before the output was refused"))
    code, err = run_cli(["merge", *parents, "--method", "task_arithmetic", "-o", str(base / "merged")], capsys)
    assert code == 1, err
    assert f"overlaps the base folder {str(base)!r}; inputs are never modified" in err[-1], err
    assert sorted(os.listdir(base)) == ["config.json", "model.safetensors"]


def test_the_dry_run_refuses_an_output_inside_the_base_the_parents_cards_name(tmp_path, capsys):
    """merge A B --method task_arithmetic -o BASE/merged --dry-run, BASE named by the cards: the plan passed it."""
    parents, base = _parents_naming_a_local_base(tmp_path)
    code, err = run_cli(["merge", *parents, "--method", "task_arithmetic", "-o", str(base / "merged"), "--dry-run"],
                        capsys)
    assert code == 1, err
    assert f"overlaps the base folder {str(base)!r}; inputs are never modified" in err[-1], err
    code, err = run_cli(["merge", *parents, "--method", "task_arithmetic", "-o", str(tmp_path / "out"), "--dry-run"],
                        capsys)
    assert code == 0, err


# ---------------------------------------------------------------- a processor transformers cannot save again


def _bert_with_chat_template(folder: Path, seed: int, name: str | None) -> str:
    """A BERT model with a tokenizer whose tokenizer_config.json lists a second chat template called `name` (no
    chat template when None)."""
    import json

    from test_data import tokenizer

    make_model("bert_cls", seed).save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    if name is not None:
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["chat_template"] = [{"name": "default", "template": "{{ messages }}"}, {"name": name, "template": "x"}]
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return str(folder)


def _bert_parents_with_chat_template(root: Path, name: str) -> list[str]:
    """Two BERT parents with a tokenizer whose tokenizer_config.json lists a second chat template called `name`."""
    return [_bert_with_chat_template(root / folder_name, seed, name) for folder_name, seed in (("a", 1), ("b", 2))]


@pytest.mark.parametrize("name", ["../../escape", "tools/x", "x" * 300])
def test_a_chat_template_name_that_is_no_file_name_is_refused_before_merging(tmp_path, capsys, monkeypatch, name):
    """merge A B -o out, A's tokenizer_config.json naming a chat template '../../escape': merged, then refused by
    transformers' save ('Invalid chat template name', no parent, no fix); 300 characters: an OSError traceback."""
    parents = _bert_parents_with_chat_template(tmp_path, name)
    monkeypatch.setattr(hf_mudsc, "merge", lambda *a, **k: pytest.fail("the merge ran before the refusal"))
    code, err = run_cli(["merge", *parents, "--method", "linear", "-o", str(tmp_path / "out")], capsys)
    assert code == 1, err
    assert len(err) == 1 and "Traceback" not in err[0], err
    shown = repr(name) if len(name) <= 40 else f"{name[:20]!r}... ({len(name)} characters)"
    assert f"{parents[0]!r}: its tokenizer names a chat template {shown}, no file name" in err[0], err
    assert "rename it in tokenizer_config.json" in err[0], err
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]


def test_chat_templates_with_file_names_are_written_with_the_merged_model(tmp_path, capsys):
    """The refusal is for names transformers cannot write: an ordinary second template is saved as before."""
    parents = _bert_parents_with_chat_template(tmp_path, "tool_use")
    code, err = run_cli(["merge", *parents, "--method", "linear", "-o", str(tmp_path / "out")], capsys)
    assert code == 0, err
    assert (tmp_path / "out" / "additional_chat_templates" / "tool_use.jinja").read_text() == "x"


def test_a_chat_template_name_no_file_name_in_parent_b_alone_merges(tmp_path, capsys):
    """merge A B, only B's tokenizer_config.json naming a template 'tools/x': refused, though only A's is saved."""
    parents = [_bert_with_chat_template(tmp_path / "a", 1, None),
               _bert_with_chat_template(tmp_path / "b", 2, "tools/x")]
    code, err = run_cli(["merge", *parents, "--method", "linear", "-o", str(tmp_path / "out"), "--dry-run"], capsys)
    assert code == 0, err
    code, err = run_cli(["merge", *parents, "--method", "linear", "-o", str(tmp_path / "out")], capsys)
    assert code == 0, err
    assert not (tmp_path / "out" / "additional_chat_templates").exists()


def test_a_chat_template_name_no_file_name_in_the_base_merges(tmp_path, capsys):
    """merge A B --method task_arithmetic --base BASE, BASE's template named 'tools/x': refused, though not saved."""
    parents = _bert_parents_with_chat_template(tmp_path, "tool_use")
    base = _bert_with_chat_template(tmp_path / "base", 0, "tools/x")
    code, err = run_cli(["merge", *parents, "--method", "task_arithmetic", "--base", base,
                         "-o", str(tmp_path / "out")], capsys)
    assert code == 0, err
    assert (tmp_path / "out" / "additional_chat_templates" / "tool_use.jinja").read_text() == "x"


def test_load_parent_reads_a_folder_whose_chat_template_name_is_no_file_name(tmp_path):
    """load_parent(FOLDER) (evaluate's loader), FOLDER's template named 'tools/x': raised, though nothing is saved."""
    from hf_mudsc.load.parents import load_parent

    parent = load_parent(_bert_with_chat_template(tmp_path / "a", 1, "tools/x"))
    assert "tools/x" in parent.processor.chat_template


def test_saving_with_a_processor_whose_chat_template_name_is_no_file_name_is_refused_before_writing(tmp_path):
    """publish(merge([A, B]), output=out, processor=P), P naming a template '../x': transformers' error after the
    weights were written."""
    from transformers import AutoTokenizer

    from hf_mudsc.errors import LoadError
    from hf_mudsc.publish.writer import publish

    parents = _bert_parents_with_chat_template(tmp_path, "tool_use")
    given = AutoTokenizer.from_pretrained(_bert_with_chat_template(tmp_path / "p", 3, "../x"))
    merged = hf_mudsc.merge(parents, method="linear", progress=False)
    with pytest.raises(LoadError, match=r"^the processor given: its tokenizer names a chat template '\.\./x', no file"):
        publish(merged, output=tmp_path / "out", processor=given)
    assert not (tmp_path / "out").exists()


def test_a_chat_template_name_with_a_backslash_is_merged_and_saved(tmp_path, capsys):
    """merge A B, A's template named 'a\\b' (a file name on POSIX, which transformers saves): refused."""
    parents = _bert_parents_with_chat_template(tmp_path, "a\\b")
    code, err = run_cli(["merge", *parents, "--method", "linear", "-o", str(tmp_path / "out")], capsys)
    assert code == 0, err
    assert (tmp_path / "out" / "additional_chat_templates" / "a\\b.jinja").read_text() == "x"


def test_a_processors_own_chat_template_refusal_names_its_file():
    """A processor's (not its tokenizer's) template named '../x': the refusal said to rename it in
    tokenizer_config.json, which does not hold it (chat_template.json does)."""
    from types import SimpleNamespace

    from hf_mudsc.errors import LoadError
    from hf_mudsc.load.processors import refuse_unsavable_chat_templates

    with pytest.raises(LoadError, match=r"rename it in chat_template\.json"):
        refuse_unsavable_chat_templates("'org/a'", SimpleNamespace(chat_template={"default": "d", "../x": "x"}))


# ---------------------------------------------------------------- a shard index naming no file name


@pytest.mark.parametrize(("shard", "shown_as"), [
    ("x" * 300 + ".safetensors", "'xxxx"),  # an OSError traceback (File name too long)
    ("a\x00.safetensors", "'a\\x00.safetensors'"),  # said as "weight file a .safetensors is missing"
])
def test_a_shard_index_naming_no_file_name_is_refused_in_one_line(tmp_path, shard, shown_as):
    """model.safetensors.index.json whose weight_map names a 300-character shard: OSError traceback from the loader."""
    import json

    from hf_mudsc.errors import LoadError
    from hf_mudsc.load.parents import load_parent

    folder = tmp_path / "vit"
    make_model("vit_cls", seed=0).save_pretrained(folder, max_shard_size="20KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"][sorted(index["weight_map"])[0]] = shard
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(LoadError) as caught:
        load_parent(folder)
    message = str(caught.value)
    assert f"model.safetensors.index.json names the shard {shown_as}" in message, message
    assert "which is no file name" in message and "\n" not in message and len(message) < 400, message


# ---------------------------------------------------------------- evaluate: a token given as a name is never written

LONG_TOKEN = "hf_" + "Q" * 34  # the shape of a real token


@pytest.fixture(scope="module")
def scored_folder(tmp_path_factory) -> tuple[Path, Path]:
    """A plain ViT folder with its owner's card, and a labelled image dataset saved with save_to_disk."""
    import datasets
    import numpy as np
    from factories import vit_folder
    from PIL import Image

    root = tmp_path_factory.mktemp("scored")
    from transformers import ViTImageProcessor

    folder = vit_folder(root / "model")
    ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5], image_std=[0.5]).save_pretrained(folder)
    (folder / "README.md").write_text("# my model\n")
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), mode="L") for _ in range(6)]
    datasets.Dataset.from_dict({"image": images, "label": [0, 1, 2] * 2}).cast_column(
        "image", datasets.Image()).save_to_disk(root / "data")
    return folder, root / "data"


@pytest.mark.parametrize("given", [
    ["--dataset", f"{LONG_TOKEN}=DATA:train"],
    ["--dataset", "vit=DATA:train", "--dataset", f"{LONG_TOKEN}=DATA:train"],
])
def test_evaluate_refuses_a_token_given_as_a_name_without_writing_it(scored_folder, tmp_path, capsys, given):
    """evaluate DIR --dataset $HF_TOKEN=data:train --output-json r.json: the token named a task, written in r.json."""
    folder, data = scored_folder
    argv = [item.replace("DATA", str(data)) for item in given]
    before = (folder / "README.md").read_text()
    code, err = run_cli(["evaluate", str(folder), "--no-parents", "--no-card", *argv, "--output-json",
                         str(tmp_path / "r.json")], capsys)
    assert code == 2, err
    assert len(err) == 1 and "looks like a Hugging Face access token (not shown)" in err[0], err
    assert LONG_TOKEN not in err[0]
    assert not (tmp_path / "r.json").exists() and (folder / "README.md").read_text() == before


def test_evaluate_refuses_a_token_as_the_results_file_name(scored_folder, tmp_path, capsys):
    """evaluate DIR --dataset data:train --output-json $HF_TOKEN: a file named by the token, printed to stdout."""
    folder, data = scored_folder
    code, out, err = run_cli_output(["evaluate", str(folder), "--no-parents", "--no-card", "--dataset",
                                     f"{data}:train", "--output-json", str(tmp_path / LONG_TOKEN)], capsys)
    assert code == 2, err
    assert "--output-json looks like a Hugging Face access token (not shown)" in err, err
    assert LONG_TOKEN not in out + err and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("keywords", [
    {"datasets_per_task": {LONG_TOKEN: "DATA:train"}},  # a task of the results (and the card written from them)
    {"image_column": LONG_TOKEN},  # an error naming the column showed it
    {"metrics": [LONG_TOKEN]},  # "metric '<token>' is not shipped" (with trust_remote_code: a Hub request naming it)
])
def test_evaluate_merge_refuses_a_token_given_as_a_name(scored_folder, keywords):
    """evaluate_merge(folder, None, {os.environ['HF_TOKEN']: data}): the token named a task of the results."""
    from hf_mudsc.errors import EvaluationError

    folder, data = scored_folder
    keywords = {"datasets_per_task": {"vit": f"{data}:train"}, **keywords}
    if isinstance(keywords["datasets_per_task"], dict):
        keywords["datasets_per_task"] = {task: spec.replace("DATA", str(data))
                                         for task, spec in keywords["datasets_per_task"].items()}
    with pytest.raises(EvaluationError) as caught:
        hf_mudsc.evaluate_merge(str(folder), None, progress=False, **keywords)
    assert "looks like a Hugging Face access token (not shown)" in str(caught.value)
    assert LONG_TOKEN not in str(caught.value)


# ---------------------------------------------------------------- a pickle that runs code: refused before loading


class _RunsCode:
    """Unpickling this calls `os.system` (what a hostile pytorch_model.bin holds)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_parent_that_runs_code_is_refused_before_any_parent_is_loaded(tmp_path, monkeypatch):
    """merge A B --allow-pickle, B's pytorch_model.bin calling os.system: A was loaded whole before B was refused."""
    import torch
    import transformers

    from hf_mudsc.errors import LoadError
    from hf_mudsc.load.parents import load_parents

    marker = tmp_path / "ran"
    parents = []
    for name, seed in (("a", 1), ("b", 2)):
        model = make_model("vit_cls", seed)
        model.save_pretrained(tmp_path / name)
        (tmp_path / name / "model.safetensors").unlink()
        state = dict(model.state_dict(), **({"extra": _RunsCode(marker)} if name == "b" else {}))
        torch.save(state, tmp_path / name / "pytorch_model.bin")
        parents.append(str(tmp_path / name))
    monkeypatch.setattr(transformers.ViTForImageClassification, "from_pretrained",
                        lambda *a, **k: pytest.fail("a parent was loaded before the pickle was refused"))
    with pytest.raises(LoadError) as caught:
        load_parents(parents, allow_pickle=True)
    message = str(caught.value)
    assert f"{parents[1]!r}: pytorch_model.bin holds more than tensors — unpickling it would call posix.system" \
        in message, message
    assert not marker.exists()


def test_a_pickle_parent_holding_numpy_data_names_the_numpy_callable(tmp_path):
    """merge A B --allow-pickle, B's pytorch_model.bin holding a numpy array: 'unpickling it would call GLOBAL'
    (torch: 'Unsupported global: GLOBAL numpy._core.multiarray._reconstruct')."""
    import numpy
    import torch

    from hf_mudsc.errors import LoadError
    from hf_mudsc.load.parents import load_parents

    parents = []
    for name, seed in (("a", 1), ("b", 2)):
        model = make_model("vit_cls", seed)
        model.save_pretrained(tmp_path / name)
        (tmp_path / name / "model.safetensors").unlink()
        state = dict(model.state_dict(), **({"extra": numpy.zeros(3)} if name == "b" else {}))
        torch.save(state, tmp_path / name / "pytorch_model.bin")
        parents.append(str(tmp_path / name))
    with pytest.raises(LoadError) as caught:
        load_parents(parents, allow_pickle=True)
    message = str(caught.value)
    assert "unpickling it would call numpy." in message and "GLOBAL" not in message, message


# ---------------------------------------------------------------- a push may not replace a parent's Hub repo


@pytest.mark.parametrize("extra", [["--overwrite"], ["--overwrite", "--dry-run"]])
def test_a_push_over_a_parents_hub_repo_is_refused_before_merging(local_hub, hub_cli, tmp_path, monkeypatch, extra):
    """merge user/a user/b --push-to-hub user/a --overwrite: parent A's repo was replaced by the merged model."""
    for name, seed in (("a", 1), ("b", 2)):
        make_model("vit_cls", seed).save_pretrained(tmp_path / name)
        local_hub.upload_folder(f"user/{name}", tmp_path / name, f"parent {name}")
    before = local_hub.head("user/a")
    monkeypatch.setattr(hf_mudsc, "merge", lambda *a, **k: pytest.fail("merged before the push target was refused"))
    run = hub_cli("merge", "user/a", "user/b", "--method", "linear", "--push-to-hub", "user/a", *extra)
    assert run.returncode == 1, run.stderr
    assert ("--push-to-hub 'user/a' is the Hub repo of parent A ('user/a'); inputs are never modified: choose "
            "another --push-to-hub name") in run.stderr, run.stderr
    assert local_hub.head("user/a") == before


def test_push_merged_over_a_parents_hub_repo_is_refused(local_hub, tmp_path):
    """push_merged(merge(['user/a', 'user/b']), 'user/a', overwrite=True): parent A's repo was replaced."""
    from hf_mudsc.errors import RecipeError

    for name, seed in (("a", 1), ("b", 2)):
        make_model("vit_cls", seed).save_pretrained(tmp_path / name)
        local_hub.upload_folder(f"user/{name}", tmp_path / name, f"parent {name}")
    before = local_hub.head("user/a")
    merged = hf_mudsc.merge(["user/a", "user/b"], method="linear", progress=False)
    with pytest.raises(RecipeError, match=r"repo_id 'user/a' is the Hub repo of parent A \('user/a@[0-9a-f]{40}'\)"):
        hf_mudsc.push_merged(merged, "user/a", overwrite=True)
    assert local_hub.head("user/a") == before


def test_the_service_refuses_a_job_pushing_over_a_parents_hub_repo(tmp_path):
    """POST {models: [user/a, user/b], push_to_hub: user/a, overwrite: true}: queued; its worker replaced user/a."""
    from fastapi.testclient import TestClient

    from hf_mudsc.serve.app import create_app

    client = TestClient(create_app(tmp_path), base_url="http://127.0.0.1", raise_server_exceptions=False)
    answer = client.post("/api/jobs", json={"models": ["user/a", "user/b@v1"], "method": "linear",
                                            "push_to_hub": "user/b", "overwrite": True})
    assert answer.status_code == 400, answer.text
    assert ("`push_to_hub` 'user/b' is the Hub repo of parent B ('user/b@v1'); inputs are never modified: choose "
            "another `push_to_hub`") in answer.json()["error"], answer.text


def test_push_of_a_merged_folder_over_its_parents_hub_repo_is_refused(local_hub, hub_cli, tmp_path):
    """merge user/a user/b -o out; push out user/a --overwrite: parent A's repo was replaced by the merge."""
    for name, seed in (("a", 1), ("b", 2)):
        make_model("vit_cls", seed).save_pretrained(tmp_path / name)
        local_hub.upload_folder(f"user/{name}", tmp_path / name, f"parent {name}")
    assert hub_cli("merge", "user/a", "user/b", "--method", "linear", "-o", str(tmp_path / "out")).returncode == 0
    before = local_hub.head("user/a")
    run = hub_cli("push", str(tmp_path / "out"), "user/a", "--overwrite")
    assert run.returncode == 1, run.stderr
    assert "ORG/NAME 'user/a' is the Hub repo of parent A ('user/a@" in run.stderr, run.stderr
    assert local_hub.head("user/a") == before



def test_push_over_a_parents_hub_repo_is_refused_before_the_folder_is_hashed(local_hub, hub_cli, tmp_path,
                                                                               monkeypatch):
    """push OUT user/a --overwrite, OUT merged from user/a: refused only after every file of OUT was hashed
    (check_unchanged), and the refusal said 'choose another ORG/NAME name'."""
    from hf_mudsc.publish import hub

    for name, seed in (("a", 1), ("b", 2)):
        make_model("vit_cls", seed).save_pretrained(tmp_path / name)
        local_hub.upload_folder(f"user/{name}", tmp_path / name, f"parent {name}")
    assert hub_cli("merge", "user/a", "user/b", "--method", "linear", "-o", str(tmp_path / "out")).returncode == 0
    monkeypatch.setattr(hub, "check_unchanged", lambda *a, **k: pytest.fail("the folder was hashed first"))
    run = hub_cli("push", str(tmp_path / "out"), "user/a", "--overwrite")
    assert run.returncode == 1, run.stderr
    assert "inputs are never modified: choose another ORG/NAME\n" in run.stderr + "\n", run.stderr

def _local_parents_whose_cards_name(root: Path, base: str) -> list[str]:
    """Two local ViT parents whose model cards name `base` (a Hub id) as their base_model."""
    parents = []
    for name, seed in (("a", 1), ("b", 2)):
        make_model("vit_cls", seed).save_pretrained(root / name)
        (root / name / "README.md").write_text(f"---\nbase_model: {base}\n---\n# {name}\n")
        parents.append(str(root / name))
    return parents


def test_the_service_refuses_a_job_pushing_over_the_hub_base_its_parents_cards_name(tmp_path):
    """POST {models: [local a, b] (cards: base_model user/base), task_arithmetic, push_to_hub: user/base,
    overwrite: true}: 201, queued for a worker that refuses only once it reads the cards."""
    from fastapi.testclient import TestClient

    from hf_mudsc.serve.app import create_app

    root = tmp_path / "models"
    parents = _local_parents_whose_cards_name(root, "user/base")
    client = TestClient(create_app(tmp_path / "state", local_roots=[root]), base_url="http://127.0.0.1",
                        raise_server_exceptions=False)
    job = {"models": parents, "method": "task_arithmetic", "push_to_hub": "user/base", "overwrite": True}
    answer = client.post("/api/jobs", json=job)
    assert answer.status_code == 400, answer.text
    assert ("`push_to_hub` 'user/base' is the Hub repo of the base ('user/base'); inputs are never modified: "
            "choose another `push_to_hub`") in answer.json()["error"], answer.text
    assert client.post("/api/jobs", json={**job, "push_to_hub": "user/merged"}).status_code == 201


def test_the_service_dry_run_refuses_a_push_over_the_hub_base_its_parents_cards_name(local_hub, tmp_path):
    """A job's dry run, local parents whose cards name user/base, push_to_hub user/base, overwrite: the plan passed
    it (the CLI's dry run refuses it; the real job refuses it before pushing)."""
    from hf_mudsc.errors import RecipeError
    from hf_mudsc.publish.recipe import Recipe
    from hf_mudsc.serve.jobs import JobRequest, service_advice
    from hf_mudsc.serve.worker import dry_run_plan

    make_model("vit_cls", 0).save_pretrained(tmp_path / "base")
    local_hub.upload_folder("user/base", tmp_path / "base", "base")
    parents = _local_parents_whose_cards_name(tmp_path, "user/base")
    recipe = Recipe(models=parents, method="task_arithmetic", push_to_hub="user/base", overwrite=True)
    refusal = r"'user/base' is the Hub repo of the base \('user/base@[0-9a-f]{40}'\)"
    with pytest.raises(RecipeError, match=refusal) as refused:
        dry_run_plan(JobRequest(recipe, True), local_hub.token)
    assert service_advice(str(refused.value)).startswith("`push_to_hub` 'user/base' is the Hub repo")  # as shown
    assert "plan" in dry_run_plan(JobRequest(recipe.override(push_to_hub="user/merged"), True), local_hub.token)
