"""The merged model keeps the parents' dtype (`out_dtype="auto"`, the Hugging Face convention), or the one asked for.

The merge itself runs in float32; the merged model is cast once at the end, its `config.dtype` set to match, so
`save_pretrained` writes that dtype and `from_pretrained(dtype="auto")` restores it. Float32 parents give exactly
the float32 model they always gave."""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import pytest
import torch
import yaml
from factories import make_batches, make_model, vit_cli_case
from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

import hf_mudsc
from hf_mudsc.cli.main import main
from hf_mudsc.errors import MergeInputError, RecipeError
from hf_mudsc.publish.recipe import RECIPE_FILENAME, Recipe

pytestmark = pytest.mark.usefixtures("one_thread")

HEADER_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def header_dtypes(folder: Path) -> set[str]:
    """The dtypes of the floating tensors in `folder/model.safetensors`, read from its header (what is on disk)."""
    raw = (folder / "model.safetensors").read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + size])
    return {entry["dtype"] for key, entry in header.items() if key != "__metadata__"
            and entry["dtype"].startswith(("F", "BF"))}


def floating_dtypes(model: torch.nn.Module) -> set[torch.dtype]:
    return {t.dtype for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()}


def saved_parent(folder: Path, kind: str, seed: int, dtype: torch.dtype) -> Path:
    model = make_model(kind, seed).to(dtype)
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_parents_give_a_half_model_in_memory_on_disk_and_when_reloaded(tmp_path, dtype):
    parents = [saved_parent(tmp_path / f"p{seed}", "vit_cls", seed, dtype) for seed in (1, 2)]
    before = {p: (p / "model.safetensors").read_bytes() for p in parents}
    merged = hf_mudsc.merge([str(p) for p in parents], method="average", progress=False)
    assert floating_dtypes(merged) == {dtype}
    assert merged.config.dtype == dtype
    name = str(dtype).removeprefix("torch.")
    assert merged.config.mudsc["out_dtype"] == name
    assert name in merged.config.mudsc["out_dtype_reason"]
    out = hf_mudsc.save_merged(merged, tmp_path / "merged")
    assert header_dtypes(out) == {HEADER_NAMES[dtype]}
    assert json.loads((out / "config.json").read_text())["dtype"] == name
    reloaded = AutoModelForImageClassification.from_pretrained(out, dtype="auto")
    assert floating_dtypes(reloaded) == {dtype}
    for key, tensor in merged.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], tensor), key
    recipe = yaml.safe_load((out / RECIPE_FILENAME).read_text())
    assert recipe["out_dtype"] == name  # the resolved dtype: a re-run gives the same files
    card = (out / "README.md").read_text()
    assert f"| Weights dtype | {name} (auto:" in card
    assert {p: (p / "model.safetensors").read_bytes() for p in parents} == before  # parents never modified


def test_half_parents_with_the_default_method_and_refit_keep_their_dtype_and_are_left_as_given():
    parents = [make_model("bert_cls", seed).to(torch.float16) for seed in (1, 2)]
    copies = [{k: v.clone() for k, v in p.state_dict().items()} for p in parents]
    merged = hf_mudsc.merge(parents, make_batches("bert_cls", num_batches=2), method="mudsc", progress=False)
    assert floating_dtypes(merged) == {torch.float16} and merged.config.dtype == torch.float16
    assert merged.config.mudsc["refit"] == "gate"  # the refit ran in float32 before the cast
    for parent, copy in zip(parents, copies):
        assert floating_dtypes(parent) == {torch.float16}
        assert all(torch.equal(parent.state_dict()[k], v) for k, v in copy.items())
    # The computation is float32: the fp16 merge is the fp32 merge of the same (fp16-valued) parents, cast.
    reference = hf_mudsc.merge([p.float() for p in (make_model("bert_cls", s).to(torch.float16) for s in (1, 2))],
                               make_batches("bert_cls", num_batches=2), method="mudsc", progress=False)
    assert reference.config.mudsc["out_dtype"] == "float32"
    for key, tensor in merged.state_dict().items():
        if tensor.is_floating_point():
            assert torch.equal(tensor, reference.state_dict()[key].to(torch.float16)), key


def test_streamed_half_parents_keep_their_dtype(tmp_path):
    parents = [str(saved_parent(tmp_path / f"p{seed}", "vit_cls", seed, torch.bfloat16)) for seed in (1, 2, 3)]
    merged = hf_mudsc.merge(parents, method="linear", progress=False)  # parents after the first read lazily
    assert floating_dtypes(merged) == {torch.bfloat16}
    assert merged.config.mudsc["out_dtype"] == "bfloat16"


def test_pickle_half_parents_keep_their_dtype(tmp_path):
    from safetensors.torch import load_file

    parents = []
    for seed in (1, 2):
        folder = saved_parent(tmp_path / f"p{seed}", "vit_cls", seed, torch.float16)
        torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
        parents.append(str(folder))
    merged = hf_mudsc.merge(parents, method="average", allow_pickle=True, progress=False)
    assert floating_dtypes(merged) == {torch.float16}
    assert merged.config.mudsc["out_dtype_reason"] == "auto: every parent is stored in float16"


def test_parents_of_different_dtypes_give_float32_and_say_why(tmp_path, caplog):
    half = saved_parent(tmp_path / "half", "bert_cls", 1, torch.float16)
    full = saved_parent(tmp_path / "full", "bert_cls", 2, torch.float32)
    with caplog.at_level(logging.INFO, logger="hf_mudsc"):
        merged = hf_mudsc.merge([str(half), str(full)], method="average", progress=False)
    assert floating_dtypes(merged) == {torch.float32} and merged.config.dtype == torch.float32
    assert merged.config.mudsc["out_dtype"] == "float32"
    lines = [r.getMessage() for r in caplog.records if "float32" in r.getMessage() and "float16" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0] and "out_dtype" in lines[0], lines
    assert "float16" in merged.config.mudsc["out_dtype_reason"]
    out = hf_mudsc.save_merged(merged, tmp_path / "merged")
    assert header_dtypes(out) == {"F32"}
    reloaded = AutoModelForSequenceClassification.from_pretrained(out, dtype="auto")
    assert floating_dtypes(reloaded) == {torch.float32}


def test_float32_parents_give_float32_unchanged():
    parents = [make_model("vit_cls", seed) for seed in (1, 2)]
    merged = hf_mudsc.merge(parents, method="average", progress=False)
    assert floating_dtypes(merged) == {torch.float32}
    assert merged.config.mudsc["out_dtype"] == "float32"
    assert merged.merge_report.recipe["out_dtype"] == "float32"
    expected = (parents[0].state_dict()["classifier.weight"] + parents[1].state_dict()["classifier.weight"]) / 2
    assert torch.equal(merged.state_dict()["classifier.weight"], expected)


@pytest.mark.parametrize("asked", ["float16", torch.bfloat16])
def test_an_asked_dtype_is_the_merged_models_dtype(tmp_path, asked):
    parents = [make_model("vit_cls", seed) for seed in (1, 2)]
    merged = hf_mudsc.merge(parents, method="average", out_dtype=asked, progress=False)
    dtype = asked if isinstance(asked, torch.dtype) else getattr(torch, asked)
    assert floating_dtypes(merged) == {dtype} and merged.config.dtype == dtype
    name = str(dtype).removeprefix("torch.")
    assert merged.config.mudsc["out_dtype"] == name and "asked" in merged.config.mudsc["out_dtype_reason"]
    assert all(floating_dtypes(p) == {torch.float32} for p in parents)
    out = hf_mudsc.save_merged(merged, tmp_path / "merged")
    assert header_dtypes(out) == {HEADER_NAMES[dtype]}


@pytest.mark.parametrize("value", ["float8", "half", "int8", 16])
def test_a_refused_out_dtype_is_one_line_before_any_work(value, monkeypatch):
    from hf_mudsc.load import parents as loading

    monkeypatch.setattr(loading, "load_parents_and_base", lambda *a, **k: pytest.fail("loaded parents"))
    with pytest.raises(MergeInputError) as caught:
        hf_mudsc.merge(["a", "b"], method="average", out_dtype=value)
    message = str(caught.value)
    assert "\n" not in message and "out_dtype" in message and "--out-dtype" in message
    assert "float16" in message and "bfloat16" in message  # names the values that work


def test_an_overflowing_cast_is_refused_in_one_line():
    parents = [make_model("vit_cls", seed) for seed in (1, 2)]
    with torch.no_grad():
        for parent in parents:
            parent.classifier.weight[0, 0] = 1e6  # beyond float16's largest value (65504)
    with pytest.raises(MergeInputError) as caught:
        hf_mudsc.merge(parents, method="average", out_dtype="float16", progress=False)
    message = str(caught.value)
    assert "\n" not in message and "classifier.weight" in message and "float16" in message
    assert "out_dtype" in message and "bfloat16" in message


def test_an_automatic_dtype_that_would_overflow_falls_back_to_float32_and_says_so(tmp_path, caplog):
    parents = [make_model("vit_cls", seed).to(torch.float16) for seed in (1, 2)]
    with torch.no_grad():
        for parent in parents:
            parent.classifier.weight[0, 0] = 60000.0  # a float16 value; the unnormalised sum is not
    with caplog.at_level(logging.WARNING, logger="hf_mudsc"):
        merged = hf_mudsc.merge(parents, method="linear", normalize=False, progress=False)
    assert floating_dtypes(merged) == {torch.float32}
    assert merged.state_dict()["classifier.weight"][0, 0] == 120000.0
    assert merged.config.mudsc["out_dtype"] == "float32" and merged.merge_report.recipe["out_dtype"] == "float32"
    assert "classifier.weight" in merged.config.mudsc["out_dtype_reason"]
    assert any("classifier.weight" in r.getMessage() and "float16" in r.getMessage() for r in caplog.records)


def test_the_cli_flag_and_the_recipe_key(tmp_path, capsys):
    parents, calibration = vit_cli_case(tmp_path)
    out = tmp_path / "merged"
    fast = ["--method", "zipit", "--num-samples", "16", "--batch-size", "8", "--refit", "none"]
    code = main(["merge", *parents, "--calibration", calibration, "--output", str(out), "--out-dtype", "bfloat16",
                 *fast])
    assert code == 0
    assert header_dtypes(out) == {"BF16"}
    recipe = Recipe.load(out / RECIPE_FILENAME)
    assert recipe.out_dtype == "bfloat16"
    again = tmp_path / "again"
    assert main(["merge", "--recipe", str(out / RECIPE_FILENAME), "--output", str(again)]) == 0
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["merge", *parents, "--calibration", calibration, "--output", str(tmp_path / "x"),
              "--out-dtype", "int8"])  # float64 is a choice: what `auto` keeps of float64 parents
    assert "--out-dtype" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"models": parents, "method": "average", "out_dtype": "half"}))
    with pytest.raises(RecipeError, match=r"unknown out_dtype 'half'; choose one of: auto, float32, float16, bfloat16"):
        Recipe.load(bad).validate()


@pytest.mark.parametrize(("dtypes", "asked", "expected"), [
    ((torch.float16, torch.float16), "auto", "float16"),
    ((torch.bfloat16, torch.float32), "auto", "float32"),
    ((torch.float32, torch.float32), "bfloat16", "bfloat16"),
])
def test_the_dry_run_says_which_dtype_the_merged_model_would_have(tmp_path, dtypes, asked, expected):
    """The plan reads the dtypes from the safetensors headers (no weights) and resolves `out_dtype` as the merge
    would: a user sees before the download that two fp16 parents give an fp16 model, or why float32."""
    parents = [saved_parent(tmp_path / f"p{seed}", "vit_cls", seed, dtype) for seed, dtype in zip((1, 2), dtypes)]
    plan = hf_mudsc.merge([str(p) for p in parents], method="average", out_dtype=asked, dry_run=True)
    merged = hf_mudsc.merge([str(p) for p in parents], method="average", out_dtype=asked, progress=False)
    assert plan.out_dtype == expected == merged.config.mudsc["out_dtype"]
    assert plan.out_dtype_reason == merged.config.mudsc["out_dtype_reason"]
    assert f"Output dtype: {expected} ({plan.out_dtype_reason})" in str(plan)
    assert plan.to_dict()["out_dtype"] == expected


def test_a_merge_cast_after_merging_is_recorded_as_the_dtype_written(tmp_path):
    """`merged.half()` before `save_merged`: float16 weights were written under a config.mudsc, card and recipe that
    said float32 (auto: every parent is stored in float32) — and the recipe re-made float32 weights. The record now
    names the dtype written and why; the recipe re-makes the written weights bit for bit; the model in memory keeps
    its own record."""
    parents = [saved_parent(tmp_path / f"p{seed}", "vit_cls", seed, torch.float32) for seed in (1, 2)]
    merged = hf_mudsc.merge([str(p) for p in parents], method="average", progress=False)
    record = dict(merged.config.mudsc)
    merged.half()
    out = hf_mudsc.save_merged(merged, tmp_path / "merged")
    assert merged.config.mudsc == record  # saving changed nothing in memory
    assert header_dtypes(out) == {"F16"}
    mudsc = json.loads((out / "config.json").read_text())["mudsc"]
    assert mudsc["out_dtype"] == "float16"
    assert mudsc["out_dtype_reason"] == ("converted to float16 after the merge, which made float32 (auto: every "
                                         "parent is stored in float32)")
    recipe = yaml.safe_load((out / RECIPE_FILENAME).read_text())
    assert recipe["out_dtype"] == "float16" and "out_dtype" not in (recipe.get("auto_chosen") or {})
    assert "| Weights dtype | float16 (converted to float16 after the merge" in (out / "README.md").read_text()
    assert main(["merge", "--recipe", str(out / RECIPE_FILENAME), "--output", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    merged.classifier.to(torch.float32)  # weights in two dtypes: no one dtype to record
    with pytest.raises(MergeInputError, match=r"^the merged model's weights are in several dtypes \(float16, "
                                              r"float32\) since the merge; cast it to one"):
        hf_mudsc.save_merged(merged, tmp_path / "mixed")
    assert not (tmp_path / "mixed").exists()


def test_a_recipe_rerun_restates_auto_s_dtype_reason_only_where_it_still_holds(tmp_path):
    """A float32 merge's recipe re-run on float16 parents (`out_dtype: float32` pinned) restated "auto: every parent is
    stored in float32" in the card and config although these parents are float16 (the log said "asked for"); a
    hand-edited reason went into the card as fact. Restated only when auto would give that value and reason now."""
    parents = [saved_parent(tmp_path / f"p{seed}", "vit_cls", seed, torch.float32) for seed in (1, 2)]
    first = tmp_path / "first"
    assert main(["merge", *map(str, parents), "--method", "average", "--output", str(first)]) == 0
    recipe_file = first / RECIPE_FILENAME
    halves = [saved_parent(tmp_path / f"h{seed}", "vit_cls", seed, torch.float16) for seed in (1, 2)]

    def reason_of(folder: Path) -> str:
        return json.loads((folder / "config.json").read_text())["mudsc"]["out_dtype_reason"]

    assert main(["merge", *map(str, halves), "--recipe", str(recipe_file), "--output", str(tmp_path / "h")]) == 0
    assert reason_of(tmp_path / "h").startswith("asked for")
    assert main(["merge", "--recipe", str(recipe_file), "--output", str(tmp_path / "same")]) == 0
    assert reason_of(tmp_path / "same") == "auto: every parent is stored in float32"  # still true: restated
    recipe_file.write_text(recipe_file.read_text().replace("auto: every parent is stored in float32",
                                                           "auto: every parent is stored in float16 (verified)"))
    assert main(["merge", "--recipe", str(recipe_file), "--output", str(tmp_path / "edited")]) == 0
    assert reason_of(tmp_path / "edited").startswith("asked for")


def test_weights_changed_after_the_merge_are_written_as_such(tmp_path, caplog):
    """Weights trained or edited after `merge()` returned them were written by `save_merged` under a card calling
    them a training-free merge and a recipe whose re-run makes other weights, without a word. The merge records a
    digest of the weights it returned; a writer that finds other weights (in the same dtype) logs a warning, sets
    `config.mudsc["changed_after_merge"]` in the written config and says so in the card; the model in memory keeps
    its own record. An unchanged merge, or one only cast (`.half()`, recorded as such), carries no such note."""
    parents = [saved_parent(tmp_path / f"p{seed}", "vit_cls", seed, torch.float32) for seed in (1, 2)]
    merged = hf_mudsc.merge([str(p) for p in parents], method="average", progress=False)
    untouched = hf_mudsc.save_merged(merged, tmp_path / "untouched")
    assert "changed_after_merge" not in json.loads((untouched / "config.json").read_text())["mudsc"]
    assert "Changed after the merge" not in (untouched / "README.md").read_text()
    record = dict(merged.config.mudsc)
    with torch.no_grad():
        merged.classifier.weight[0, 0] += 1.0  # one step of someone's fine-tuning
    with caplog.at_level("WARNING", logger="hf_mudsc"):
        out = hf_mudsc.save_merged(merged, tmp_path / "changed")
    assert merged.config.mudsc == record  # writing changed nothing in memory
    assert json.loads((out / "config.json").read_text())["mudsc"]["changed_after_merge"] is True
    card = (out / "README.md").read_text()
    assert "**Changed after the merge**" in card and "re-make the merge, not these weights" in card
    assert any("changed since merge() returned" in r.getMessage() for r in caplog.records), caplog.text
    halved = hf_mudsc.merge([str(p) for p in parents], method="average", progress=False).half()
    cast = hf_mudsc.save_merged(halved, tmp_path / "cast")
    assert "changed_after_merge" not in json.loads((cast / "config.json").read_text())["mudsc"]
