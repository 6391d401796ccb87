"""`merge(..., dry_run=True)` and `hf-mudsc merge --dry-run`: the plan from configs and safetensors headers only.

Against the local Hub emulator (tests/hub_emulator.py; the CLI runs in-process through conftest's local_hub): no
weight file is downloaded (only ranged reads of each file's first bytes), nothing is written, no repo is created. The
parents are large enough (~0.5 MB of weights) that the header read is a strict prefix of the file.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_runs import run_cli_output
from factories import fine_tune, make_batches, make_model
from safetensors import safe_open
from test_cli import save_parents_and_data, tree_digest
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

import hf_mudsc
from hf_mudsc.architectures import spec_for
from hf_mudsc.blas import packed_size
from hf_mudsc.errors import CalibrationError, LoadError, MergeInputError
from hf_mudsc.plan import (
    ALPHA_SEARCH_SOLVES,
    APPLY_FLOPS_PER_PARAMETER,
    CALIBRATION_EFFICIENCY,
    DATA_READER_BYTES,
    MULTI_START_SOLVES,
    PROCESS_BYTES,
    REFIT_EFFICIENCY,
    REFIT_MERGED_FORWARDS,
    RELATION_BYTES_PER_VALUE,
    RUNTIME_BYTES,
    SOLVE_FACTOR,
    STATISTICS_FACTOR,
    WEIGHTS_FACTOR,
    MergePlan,
    batch_text_tokens,
    estimate_cost,
    refit_bytes,
    tokens_per_example,
)

WIDE = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, image_size=16,
            patch_size=4, num_channels=1, num_labels=3)


def _save_wide(folder: Path, seed: int) -> ViTForImageClassification:
    torch.manual_seed(seed)
    model = ViTForImageClassification(ViTConfig(**WIDE))
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5], image_std=[0.5]).save_pretrained(folder)
    return model


def _tensor_bytes(path: Path) -> int:
    with safe_open(str(path), framework="pt") as opened:
        return sum(opened.get_tensor(k).numel() * opened.get_tensor(k).element_size() for k in opened.keys())


@pytest.fixture(scope="module")
def wide_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dry_inputs")
    _, _, calibration = save_parents_and_data(root)  # the 32-image calibration set
    models = [_save_wide(root / name, seed) for name, seed in (("wide-a", 1), ("wide-b", 2))]
    return root / "wide-a", root / "wide-b", calibration, models[0]


def test_dry_run_against_the_hub_downloads_no_weights_and_writes_nothing(local_hub, wide_inputs, tmp_path, monkeypatch,
                                                                        capsys, caplog):
    a, b, calibration, model = wide_inputs
    hub = local_hub  # the CLI runs in this process against the emulator
    hub.upload_folder("user/a", a, "parent A")
    hub.upload_folder("user/b", b, "parent B")
    pinned_b = hub.head("user/b")
    hub.commit_files("user/b", {"README.md": b"# moved on\n"}, "later commit")  # main moves past the pin
    work = tmp_path / "work"
    work.mkdir()
    out = work / "merged"
    before = tree_digest(a, b, calibration)
    monkeypatch.setenv("HF_TOKEN", hub.token)  # as a client's environment has it
    monkeypatch.chdir(work)
    argv = ["merge", "user/a", f"user/b@{pinned_b}", "--calibration", str(calibration), "--num-samples", "24",
            "--output", str(out), "--push-to-hub", "user/merged", "--dry-run"]
    caplog.clear()
    code, stdout, stderr = run_cli_output(argv, capsys)
    assert code == 0, stderr[-4000:]
    logged = caplog.records[:]

    # What the plan says: pinned parents, sizes from the headers, the relation, method, groups, rows, estimate.
    size = _tensor_bytes(a / "model.safetensors")
    params = sum(p.numel() for p in model.parameters())
    head_a = hub.head("user/a")
    assert f"  A: user/a@{head_a} — ViTForImageClassification, {params / 1e6:.2f} M parameters (F32), " \
        f"{size / 1e3:.2f} kB of weights" in stdout
    assert f"  B: user/b@{pinned_b} — ViTForImageClassification" in stdout
    assert "Relation: same class and configuration (ViTForImageClassification); the weight-based relation check " \
        "(shared base, permuted copy, independent, protected) runs at merge time" in stdout
    assert ("Method: auto (chosen at merge time from the parents' weights and mudsc's unit matching on the calibration "
            "data; estimated as mudsc) (matcher zip)" in stdout)
    spec = spec_for(model)
    assert f"Groups: {len(spec.groups)} (widths 64, 128)" in stdout
    for group in spec.groups:
        assert f"  {group.name}: {group.width} units" in stdout
    assert f"Calibration: {calibration}: 24 of 32 rows, 17 tokens per example" in stdout
    assert "Estimate: " in stdout and "peak memory" in stdout

    # No weight file downloaded: weight files were only probed (HEAD) or read by a ranged GET of a prefix.
    weight_requests = [r for r in hub.requests if r.path.endswith((".safetensors", ".bin"))]
    assert weight_requests, "the headers were read"
    for request in weight_requests:
        assert request.path.endswith(".safetensors"), request.path
        if request.method == "GET":
            first, _, last = request.headers["range"].removeprefix("bytes=").partition("-")
            assert int(first) == 0 and int(last) < size, request.headers["range"]
    # Nothing written or created: no output, no new file in the working folder, no repo, no upload.
    assert not out.exists() and sorted(p.name for p in work.iterdir()) == []
    assert sorted(hub.list_repos()) == ["user/a", "user/b"]
    assert not hub.repo_exists("user/merged")
    assert not [r for r in hub.requests if r.op in ("create_repo", "preupload", "commit", "lfs_batch")]
    assert tree_digest(a, b, calibration) == before
    # The HTTP client's per-request lines stay off by default; hf_mudsc's INFO lines are shown (the CLI's log records:
    # their format on stderr is test_cli_verbosity's).
    assert not [r for r in logged if "HTTP Request:" in r.getMessage()]
    assert [r for r in logged if r.name.startswith("hf_mudsc") and r.levelno == logging.INFO]
    assert not hub.unhandled and not hub.server_errors

    # -v: hf_mudsc's DEBUG lines and one line per HTTP request.
    caplog.clear()
    code, _, stderr = run_cli_output(["-v", *argv], capsys)
    assert code == 0, stderr[-4000:]
    assert [r for r in caplog.records if r.getMessage().startswith("HTTP Request: GET")]
    assert [r for r in caplog.records if r.name.startswith("hf_mudsc") and r.levelno == logging.DEBUG]
    assert not out.exists() and not hub.repo_exists("user/merged")


def test_the_plan_is_json_and_matches_the_models(wide_inputs, tmp_path):
    a, b, calibration, model = wide_inputs
    before = tree_digest(a, b, calibration)
    cwd = sorted(os.listdir())
    plan = hf_mudsc.merge([str(a), str(b)], str(calibration), dry_run=True)
    assert isinstance(plan, MergePlan)
    data = json.loads(json.dumps(plan.to_dict()))
    params = sum(p.numel() for p in model.parameters())
    assert [p["num_parameters"] for p in data["parents"]] == [params, params]
    assert [p["weight_bytes"] for p in data["parents"]] == [_tensor_bytes(a / "model.safetensors")] * 2
    assert [p["pinned"] for p in data["parents"]] == [str(a), str(b)]
    assert [(g["name"], g["width"], g["num_heads"]) for g in data["groups"]] == [
        (g.name, g.width, g.num_heads) for g in spec_for(model).groups]
    assert data["calibration"] == {"source": str(calibration), "rows_available": 32, "rows": 32,
                                   "tokens_per_example": 17, "tokens_assumed": False, "columns_checked": True,
                                   "columns_unchecked_reason": ""}
    assert data["method"] == ("auto (chosen at merge time from the parents' weights and mudsc's unit matching on the "
                              "calibration data; estimated as mudsc)")
    # the fixture's parents carry transformers' placeholder labels (LABEL_0, ...), and the residual group (read at the
    # class token: one row per example) sees 32 rows for 2 x 64 units — the merge says both, the second only if auto
    # keeps the unit matching (session 36)
    assert data["matcher"] == "zip" and [w[:60] for w in data["warnings"]] == [
        "the parents' heads are fused as one label set because every ",
        "if method auto chooses mudsc (for parents whose units must b"]
    assert "the merge warns: calibration too small for the widths: group 'residual' (64 u" in data["warnings"][1]
    assert "dry_run" not in data["options"] and data["options"]["alpha"] == 0.5
    estimate = data["estimate"]
    assert estimate["seconds"] == pytest.approx(estimate["calibration_seconds"] + estimate["solve_seconds"]
                                                + estimate["alpha_search_seconds"] + estimate["refit_seconds"])
    assert estimate["statistics_bytes"] == sum(8 * (2 * g.width) ** 2 for g in spec_for(model).groups)
    # byte counts are whole numbers in the JSON (382053220, not 382053220.0)
    assert type(estimate["statistics_bytes"]) is int and type(estimate["peak_memory_bytes"]) is int
    assert str(plan).startswith("Dry run: nothing was downloaded but configs and safetensors headers")
    assert tree_digest(a, b, calibration) == before and sorted(os.listdir()) == cwd


def test_dry_run_of_objects_and_batches_counts_rows_and_warns_about_a_small_calibration():
    a, b = make_model("vit_cls", 1), make_model("vit_cls", 2)
    plan = hf_mudsc.merge([a, b], make_batches("vit_cls", num_batches=1, batch_size=2), dry_run=True)
    assert plan.calibration.rows == 2 and plan.calibration.source == "1 batches"
    assert plan.parents[0].num_parameters == sum(p.numel() for p in a.parameters())
    assert plan.parents[0].weight_bytes is None and plan.parents[0].dtypes == ["float32"]
    # 2 images x 17 tokens = 34 rows < 2 x 48 MLP units (the dry run counts every group per token); method auto:
    # the merge warns if it keeps the unit matching
    said = ("the merge warns: calibration too small for the widths: group 'vit.layers.0.mlp' (48 units per parent) "
            "saw 34 rows")
    assert [w for w in plan.warnings if w.startswith("if method auto chooses mudsc ") and said in w]
    no_data = hf_mudsc.merge([a, b], method="average", dry_run=True)
    assert no_data.calibration is None and no_data.estimate.calibration_seconds == 0
    assert no_data.estimate.statistics_bytes == 0 and "Calibration: none" in str(no_data)


@pytest.mark.parametrize("method, keywords, data, said", [
    ("zipit", {"alpha": 0.2}, True, "method zipit does not read alpha= (CLI: --alpha): it has no effect"),
    ("linear", {"density": 0.5}, False, "method linear does not read density="),
    ("linear", {}, True, "the calibration data (calibration= (CLI: --calibration)) has no effect"),
    ("weight_matching", {"num_samples": 5}, False, "num_samples= (CLI: --num-samples) has no effect"),
])
def test_the_dry_run_warns_about_options_that_change_nothing_as_the_merge_does(caplog, method, keywords, data, said):
    """QA s20: the merge warns that an option changes nothing (unread by the method, or for a part that does not
    run); the dry run — the CLI's `--dry-run`, the service's `?dry_run=true` — listed no such warning."""
    a, b = make_model("vit_cls", 1), make_model("vit_cls", 2)
    batches = make_batches("vit_cls", num_batches=1, batch_size=2) if data else None
    plan = hf_mudsc.merge([a, b], batches, method=method, dry_run=True, **keywords)
    planned = [w for w in plan.warnings if "no effect" in w]
    assert len(planned) == 1 and planned[0].startswith(said), plan.warnings
    with caplog.at_level("WARNING", logger="hf_mudsc"):
        hf_mudsc.merge([a, b], batches, method=method, progress=False, **keywords)
    assert planned[0] in [r.getMessage() for r in caplog.records]


def test_the_same_folder_twice_is_named_the_same_model(wide_inputs):
    a, _, _, _ = wide_inputs
    plan = hf_mudsc.merge([str(a), str(a)], method="average", dry_run=True)
    assert "identical weight files (the same model)" in plan.relation
    assert plan.warnings == ["the parents are the same model: the merge gives back that model"]


def test_a_recipe_cannot_ask_for_a_dry_run(tmp_path):
    from hf_mudsc.errors import RecipeError
    from hf_mudsc.publish.recipe import Recipe

    with pytest.raises(RecipeError, match="--dry-run"):
        Recipe.from_dict({"models": ["a", "b"], "dry_run": True})


def test_bad_input_is_refused_by_the_dry_run_too(tmp_path):
    with pytest.raises(MergeInputError, match="needs calibration data"):
        hf_mudsc.merge([make_model("vit_cls", 1), make_model("vit_cls", 2)], method="mudsc", dry_run=True)
    with pytest.raises(Exception, match="no model folder at"):
        hf_mudsc.merge([str(tmp_path / "missing"), str(tmp_path / "missing")], method="average", dry_run=True)


def test_estimate_formula_on_hand_made_sizes():
    estimate = estimate_cost(widths=[2, 3], columns=[4, 5], group_tokens=[5, 1], linear_params={"w": 10},
                             tokens={"": 5}, num_parameters=100, rows=4, needs_statistics=True, matmul_flops=1e9)
    per_example = 2 * (2 * 10 * 5) + 5 * 2 * 4**2 + 1 * 2 * 6**2  # forward x 2 parents + statistics products
    assert estimate.calibration_seconds == pytest.approx(4 * per_example / (CALIBRATION_EFFICIENCY * 1e9))
    solve = 2 * 4**2 * 4 + 4**3 + 2 * 6**2 * 5 + 6**3
    assert estimate.solve_seconds == pytest.approx((SOLVE_FACTOR * solve + APPLY_FLOPS_PER_PARAMETER * 100) / 1e9)
    statistics = 8 * 4**2 + 8 * 6**2
    assert estimate.statistics_bytes == statistics
    assert estimate.peak_memory_bytes == pytest.approx(RUNTIME_BYTES + WEIGHTS_FACTOR * 800
                                                       + STATISTICS_FACTOR * statistics)
    assert tokens_per_example(ViTConfig(image_size=224, patch_size=16)) == ({"": 197}, False)
    from transformers import BertConfig, CLIPConfig

    assert tokens_per_example(BertConfig(max_position_embeddings=64)) == ({"": 64}, True)
    clip = tokens_per_example(CLIPConfig(vision_config={"image_size": 32, "patch_size": 8}))
    assert clip == ({"vision_model": 17, "text_model": 77, "": 1}, True)


def test_the_starts_the_alpha_search_and_the_refit_on_hand_made_sizes():
    """The estimate counted only calibration and one solve: the default merge since issue 12 also runs every start,
    and, given data, the gated refit (and with alpha="auto" the search) — about twice the time on MiniLM."""
    from hf_mudsc.apply.fidelity import ALPHA_GRID, HOLDOUT_EVERY

    kwargs = dict(widths=[2, 3], columns=[4, 5], group_tokens=[5, 1], linear_params={"w": 10}, tokens={"": 5},
                  num_parameters=100, rows=20, needs_statistics=True, matmul_flops=1e9)
    paper = estimate_cost(**kwargs)
    solve = SOLVE_FACTOR * (2 * 4**2 * 4 + 4**3 + 2 * 6**2 * 5 + 6**3)
    forward = 2 * 10 * 5
    layers = [(11, 10, 5), (11, 3, 1)]  # (unknowns, outputs, rows per example): a per-token layer and a head
    gram = 5 * (2 * 11**2 + 4 * 11 * 10) + 1 * (2 * 11**2 + 4 * 11 * 3)
    held_out = 20 // HOLDOUT_EVERY
    full = estimate_cost(**kwargs, multi_start=True, alpha_search=True, refit="gate", refit_layers=layers,
                         refit_examples=16)
    assert full.calibration_seconds == paper.calibration_seconds
    assert full.solve_seconds == pytest.approx(paper.solve_seconds + (MULTI_START_SOLVES - 1) * solve / 1e9)
    assert full.alpha_search_seconds == pytest.approx(
        (ALPHA_SEARCH_SOLVES * solve + (len(ALPHA_GRID) + 2) * held_out * forward) / 1e9)
    refit = 16 * ((2 + REFIT_MERGED_FORWARDS) * forward + gram) + 2 * held_out * forward
    assert full.refit_seconds == pytest.approx(refit / (REFIT_EFFICIENCY * 1e9))
    assert full.seconds == pytest.approx(full.calibration_seconds + full.solve_seconds + full.alpha_search_seconds
                                         + full.refit_seconds)
    repair = estimate_cost(**kwargs, refit="repair", refit_layers=layers, refit_examples=16)
    assert repair.refit_seconds == pytest.approx(16 * (2 + REFIT_MERGED_FORWARDS) * forward
                                                 / (REFIT_EFFICIENCY * 1e9))
    assert paper.alpha_search_seconds == paper.refit_seconds == 0.0
    # Memory: the refit's working set on top, and one candidate model (4 bytes per parameter) for the α search.
    with_memory = estimate_cost(**kwargs, alpha_search=True, refit="gate", refit_layers=layers, refit_examples=16,
                                refit_memory=1234.0)
    assert with_memory.peak_memory_bytes == pytest.approx(paper.peak_memory_bytes + 1234 + 4 * 100, abs=1)
    # The solve's weight-correlation cache on top (unit-matching merges only).
    assert estimate_cost(**kwargs, weight_cache_bytes=5678.0).peak_memory_bytes == pytest.approx(
        paper.peak_memory_bytes + 5678, abs=1)
    assert estimate_cost(**kwargs, solves=False, weight_cache_bytes=5678.0).peak_memory_bytes == pytest.approx(
        estimate_cost(**kwargs, solves=False).peak_memory_bytes, abs=1)
    # The working set: cached targets (all of them here, under the cap), stored block inputs and outputs of the
    # parents and the merged model (two each, with their units: the attention's and the widest layer's outputs, 10),
    # the widest layer's float64 Gram and cross-Gram.
    targets = 4 * 16 * (5 * 10 + 1 * 3)
    stored = 3 * 4 * 16 * 5 * (3 * 7 + 10)
    assert refit_bytes(layers, 16, 2, 7, 5) == targets + stored + 8 * 11 * (11 + 10)
    assert refit_bytes(layers, 16, 2, 7, 5, gram=False) == 4 * 16 * 5 * (3 * 7 + 10)  # REPAIR: the merged model's


def test_the_dry_run_counts_what_the_default_merge_runs():
    """A unit-matching merge given data runs every start and the gated refit, alpha="auto" the search too; the
    paper's merge (reference_compat) one start and no refit; a method without calibration none of them."""
    a, b = make_model("vit_cls", 1), make_model("vit_cls", 2)
    data = make_batches("vit_cls", num_batches=4, batch_size=8)
    default = hf_mudsc.merge([a, b], data, method="mudsc", dry_run=True).estimate
    searched = hf_mudsc.merge([a, b], data, method="mudsc", alpha="auto", dry_run=True).estimate
    paper = hf_mudsc.merge([a, b], data, method="mudsc", reference_compat=True, dry_run=True).estimate
    plain = hf_mudsc.merge([a, b], method="average", dry_run=True).estimate
    assert default.refit_seconds > 0 and default.alpha_search_seconds == 0
    assert searched.alpha_search_seconds > 0 and searched.refit_seconds > 0
    work = lambda estimate: estimate.solve_seconds * estimate.matmul_flops_per_second  # noqa: E731 - the probe varies
    assert paper.refit_seconds == paper.alpha_search_seconds == 0 and work(paper) < work(default)
    assert plain.refit_seconds == plain.alpha_search_seconds == plain.calibration_seconds == 0
    text = str(hf_mudsc.merge([a, b], data, method="mudsc", alpha="auto", dry_run=True))
    assert "α search" in text and "refit" in text.split("Estimate:")[1], text


def test_tokenized_batches_give_the_dry_run_their_length():
    """Text rows are not read by a dry run (128 tokens assumed); batches already tokenized say how long they are."""
    batches = [{"input_ids": torch.zeros(3, 40, dtype=torch.long)}, {"input_ids": torch.zeros(1, 8, dtype=torch.long)}]
    assert batch_text_tokens(batches) == 32  # (3 x 40 + 1 x 8) / 4 rows
    assert batch_text_tokens([{"pixel_values": torch.zeros(2, 3, 8, 8)}]) is None
    assert batch_text_tokens("org/data:train") is None and batch_text_tokens([]) is None
    a, b = make_model("bert_cls", 1), make_model("bert_cls", 2)
    data = make_batches("bert_cls", num_batches=2, batch_size=4)
    plan = hf_mudsc.merge([a, b], data, method="mudsc", dry_run=True)
    assert plan.calibration.tokens_per_example == data[0]["input_ids"].shape[1]
    assert not plan.calibration.tokens_assumed


def test_the_dry_run_reports_how_a_size_budget_is_spent():
    a, b = make_model("vit_cls", 1), make_model("vit_cls", 2)
    data = make_batches("vit_cls", num_batches=2, batch_size=8)
    plan = hf_mudsc.merge([a, b], data, method="mudsc", size=1.5, dry_run=True)
    merged = hf_mudsc.merge([a, b], data, method="mudsc", size=1.5, refit="none", progress=False)
    done = merged.config.mudsc["size_budget"]
    # the plan counts exactly what the merge then builds, from shapes alone
    assert plan.size_budget == done
    assert done["widths"]["intermediate_size"] > a.config.intermediate_size
    assert plan.size_budget["num_parameters"] == sum(p.numel() for p in merged.parameters())
    text = str(plan)
    assert (f"Size budget: 1.5 x one parent: intermediate_size {a.config.intermediate_size} -> "
            f"{done['widths']['intermediate_size']}") in text
    assert json.loads(json.dumps(plan.to_dict()))["size_budget"] == done
    # methods without a size budget plan none
    assert hf_mudsc.merge([a, b], method="average", dry_run=True).size_budget is None
    assert "Size budget" not in str(hf_mudsc.merge([a, b], data, method="mudsc", dry_run=True))


# ------------------------------------------------------------------------------ a dry run with a base (session 14)


def _outcome(call) -> tuple[str, Any]:
    """("ok", result) or (the error's class, its message): what a refusal says, to compare two entries."""
    try:
        return "ok", call()
    except (MergeInputError, LoadError, CalibrationError) as error:
        return type(error).__name__, str(error)


@pytest.mark.parametrize("case", ["base given", "cards name it", "cards name one not cached", "no card base"])
def test_a_dry_run_refuses_a_base_it_cannot_find_as_the_merge_does(tmp_path, case):
    """A method that needs a base: the dry run found no base (none given, the cards naming none or one the offline
    cache does not hold) and planned anyway, while the merge refuses in one line before any weights. Both now agree,
    with the same message; the plan names the base it would use and where it came from."""
    from test_base import save

    base = make_model("vit_cls", 0)
    base_folder = save(base, tmp_path / "base")
    card = {"cards name it": base_folder, "cards name one not cached": "org/not-cached"}.get(case)
    folders = [save(fine_tune(base, seed, 0.05, relative=True), tmp_path / f"p{seed}", base_model=card)
               for seed in (1, 2)]
    given = base_folder if case == "base given" else None
    before = tree_digest(*map(Path, folders), Path(base_folder))
    planned = _outcome(lambda: hf_mudsc.merge(folders, method="task_arithmetic", base=given, dry_run=True))
    merged = _outcome(lambda: hf_mudsc.merge(folders, method="task_arithmetic", base=given, progress=False))
    assert planned[0] == merged[0], (planned, merged)
    if case in ("base given", "cards name it"):
        assert planned[0] == "ok"
        plan = planned[1]
        assert plan.base == base_folder and merged[1].merge_report.recipe["base"] == base_folder
        assert plan.base_source == merged[1].config.mudsc["base_source"]
        assert plan.options["base"] == merged[1].merge_report.recipe["base"]  # what the recipe records
        assert f"Base: {base_folder}" in str(plan)
    else:
        assert planned[1] == merged[1] and "\n" not in planned[1]
        assert ("needs the parents' common base model and none was given" in planned[1] if case == "no card base"
                else "'org/not-cached' is not in the local cache" in planned[1]), planned[1]
    assert tree_digest(*map(Path, folders), Path(base_folder)) == before


def test_the_estimate_counts_a_base_loaded_whole_not_a_streamed_one(tmp_path):
    """The merge's memory floor counts a base loaded whole as one more parent (`plan.memory_floor(base=True)`); the
    dry run's peak memory did not. A method that loads the base whole (pcb) now plans one parent's weights more than
    one that streams it (ties, which reads the base one tensor at a time: nothing more)."""
    from test_base import save

    base = make_model("vit_cls", 0)
    base_folder = save(base, tmp_path / "base")
    folders = [save(fine_tune(base, seed, 0.05, relative=True), tmp_path / f"p{seed}") for seed in (1, 2)]
    one_parent = 4 * sum(p.numel() for p in base.parameters())  # held memory: 4 bytes per parameter (no unit matching)
    whole = hf_mudsc.merge(folders, method="pcb", base=base_folder, dry_run=True).estimate
    streamed = hf_mudsc.merge(folders, method="ties", base=base_folder, dry_run=True).estimate
    # without a base: both parents held whole (average), parent B streamed (linear, as ties streams it)
    without = hf_mudsc.merge(folders, method="average", dry_run=True).estimate
    streamed_without = hf_mudsc.merge(folders, method="linear", dry_run=True).estimate
    assert whole.statistics_bytes == streamed.statistics_bytes == without.statistics_bytes == 0
    assert whole.peak_memory_bytes == pytest.approx(without.peak_memory_bytes + one_parent)
    assert streamed.peak_memory_bytes == pytest.approx(streamed_without.peak_memory_bytes)
    kwargs = dict(widths=[2], columns=[4], group_tokens=[1], linear_params={"w": 10}, tokens={"": 1},
                  num_parameters=100, rows=None, needs_statistics=False, matmul_flops=1e9)
    assert estimate_cost(**kwargs, base=True).peak_memory_bytes == pytest.approx(
        estimate_cost(**kwargs).peak_memory_bytes + WEIGHTS_FACTOR * 4 * 100)


@pytest.mark.parametrize("method", ["zipit", "linear", "mudsc"])
def test_the_plan_records_alpha_as_the_merges_recipe_does(method):
    """`alpha="auto"` with a method that does not read α: the merge's recipe records the α the method was handed
    (0.5), not `auto` — the plan said `auto`. It now says what the recipe will; `auto` stays where the search runs."""
    a, b = make_model("vit_cls", 1), make_model("vit_cls", 2)
    data = make_batches("vit_cls", num_batches=2, batch_size=8)
    plan = hf_mudsc.merge([a, b], data, method=method, alpha="auto", refit="none", dry_run=True)
    if method == "mudsc":  # the search runs: the recipe keeps `auto` (the chosen α is recorded beside it)
        assert plan.options["alpha"] == "auto"
        return
    merged = hf_mudsc.merge([a, b], data, method=method, alpha="auto", refit="none", progress=False)
    assert plan.options["alpha"] == merged.merge_report.recipe["alpha"] == 0.5


@pytest.mark.parametrize(("method", "given"), [("mudsc", {}), ("zipit", {"refit": "none"}), ("linear", {}),
                                               ("mudsc", {"out_dtype": "bfloat16", "refit": "ridge"}),
                                               ("mudsc", {"one_shot": True})])
def test_the_plan_records_refit_and_out_dtype_as_the_merges_recipe_does(method, given):
    """Bug hunt s29: for an explicit method the plan's `options` kept `refit: auto` and `out_dtype: auto`, while the
    merge's recipe records what they resolve to (`gate`, `float32`): "the plan's options are what the recipe would
    record" (docs/design.md, Dry run). Every recorded key is compared."""
    a, b = make_model("vit_cls", 1), make_model("vit_cls", 2)
    data = make_batches("vit_cls", num_batches=2, batch_size=8)
    given = dict(given)
    one_shot = given.pop("one_shot", False)  # review s29: a one-shot iterator runs no refit (it is read once)
    plan = hf_mudsc.merge([a, b], iter(data) if one_shot else data, method=method, dry_run=True, **given)
    merged = hf_mudsc.merge([a, b], iter(data) if one_shot else data, method=method, progress=False, **given)
    recorded = merged.merge_report.recipe
    differ = {key: (value, recorded.get(key)) for key, value in plan.options.items()
              if key != "calibration" and value != recorded.get(key)}
    assert differ == {}, differ


def test_the_estimate_counts_the_alpha_searchs_weight_correlation_cache(monkeypatch):
    """The α search's solves keep weight correlations for reuse (`solve.loop.WeightCorrelationCache`) within their
    budget (`weight_cache_bytes`: at most 4 upper triangles of every group, `WEIGHT_CACHE_BYTES`, a quarter of the
    memory available); the dry run counts that budget, the most it holds. A merge without the search keeps none."""
    import hf_mudsc.plan as plan
    from hf_mudsc.solve import loop

    a, b = make_model("vit_cls", 1), make_model("vit_cls", 2)
    data = make_batches("vit_cls", num_batches=2, batch_size=8)
    widths = [group.width for group in spec_for(a).groups]
    seen = []
    real = plan.estimate_cost
    monkeypatch.setattr(plan, "estimate_cost", lambda **kwargs: seen.append(kwargs["weight_cache_bytes"]) or real(
        **kwargs))

    def cache(alpha: object, method: str = "mudsc") -> float:
        hf_mudsc.merge([a, b], data, method=method, alpha=alpha, refit="none", dry_run=True)
        return seen[-1]

    # The toy's groups take less than the budget.
    assert cache("auto") == sum(4 * 8 * packed_size(2 * n) for n in widths)
    assert cache(0.5) == cache("auto", "zipit") == 0.0  # no search: one solve alone keeps none
    monkeypatch.setattr(loop, "WEIGHT_CACHE_BYTES", 1000)
    assert cache("auto") == 1000
    monkeypatch.setattr(loop, "available_memory", lambda: 2000)  # a quarter of the memory available, when less
    assert cache("auto") == 500
    # What the search's cache really held on this merge stays within it.
    monkeypatch.undo()
    held = []
    real_put = loop.WeightCorrelationCache.put

    def put(self, *args):
        real_put(self, *args)
        held.append((self.held_bytes, self.budget))

    monkeypatch.setattr(loop.WeightCorrelationCache, "put", put)
    hf_mudsc.merge([a, b], data, method="mudsc", alpha="auto", refit="none", progress=False)
    assert held and all(used <= budget == cache_budget for used, budget in held
                        for cache_budget in [plan.solve_cache_bytes(widths, 2)])


def test_the_estimate_counts_a_parent_copied_to_parent_as_label_order(tmp_path):
    """A parent listing A's labels in another order is copied whole before the merge (the memory floor counts it:
    `plan.head_copies`); the dry run's peak counts the copy too — unless the parent is streamed (a meta model and the
    head rows)."""
    names = ["cat", "dog", "fox"]
    folders = {}
    for name, seed, labels in (("a", 0, names), ("same", 1, names), ("other", 2, ["dog", "fox", "cat"])):
        model = make_model("vit_cls", seed)
        model.config.id2label, model.config.label2id = dict(enumerate(labels)), {n: i for i, n in enumerate(labels)}
        model.save_pretrained(tmp_path / name)
        folders[name] = str(tmp_path / name)
    weights = 4 * sum(p.numel() for p in model.parameters())

    def peak(method: str, b: str) -> float:
        return hf_mudsc.merge([folders["a"], folders[b]], method=method, dry_run=True).estimate.peak_memory_bytes

    assert peak("weight_matching", "other") == pytest.approx(peak("weight_matching", "same") + weights)
    assert peak("linear", "other") == pytest.approx(peak("linear", "same"))  # streamed: no whole copy


# ------------------------------------------------------------------- calibration columns, streamed parents (round 2)


@pytest.mark.parametrize("column", ["image", "picture"])
def test_a_dry_run_checks_local_calibration_columns_as_the_merge_does(tmp_path, column):
    """The merge refuses calibration data whose columns the parents cannot read, in one line before any weights; the
    dry run planned it. A local dataset's columns are now checked with the merge's message (a good one passes both),
    and the plan says they were checked."""
    import datasets

    a, b, good = save_parents_and_data(tmp_path)
    data = datasets.load_from_disk(str(good))
    if column != "image":
        data = data.rename_column("image", column)
    folder = tmp_path / f"calibration-{column}"
    data.save_to_disk(folder)
    before = tree_digest(a, b, folder)
    planned = _outcome(lambda: hf_mudsc.merge([str(a), str(b)], str(folder), method="zipit", dry_run=True))
    merged = _outcome(lambda: hf_mudsc.merge([str(a), str(b)], str(folder), method="zipit", num_samples=8,
                                             progress=False))
    assert planned[0] == merged[0], (planned, merged)
    if column == "image":
        assert planned[0] == "ok" and planned[1].calibration.columns_checked
        assert "columns checked" in str(planned[1])
    else:
        assert planned[1] == merged[1] and "\n" not in planned[1] and "picture" in planned[1], planned[1]
    assert tree_digest(a, b, folder) == before


def test_a_dry_run_says_when_it_left_the_columns_unchecked():
    """Batches (like a Hub dataset, which a dry run does not download) are checked when read: the plan says so."""
    a, b = make_model("vit_cls", 1), make_model("vit_cls", 2)
    plan = hf_mudsc.merge([a, b], make_batches("vit_cls", num_batches=1, batch_size=2), dry_run=True)
    assert not plan.calibration.columns_checked
    assert "columns not checked" in str(plan)


def test_the_estimate_counts_only_the_parents_held_whole(tmp_path):
    """A tensor-wise method that reads no data streams the parents after the first (`pipeline.streams_parents`): the
    merge holds parent A whole and one tensor of the others, but the estimate counted every parent's weights. It now
    counts the streamed parents' weights out — model objects (in memory already) and a method that reads the data
    (no streaming) still count them."""
    models = [make_model("vit_cls", seed) for seed in (1, 2, 3)]
    folders = []
    for index, model in enumerate(models):
        model.save_pretrained(tmp_path / f"p{index}")
        folders.append(str(tmp_path / f"p{index}"))
    parameters = sum(p.numel() for p in models[0].parameters())
    largest = max(p.numel() for p in models[0].parameters())
    streamed = hf_mudsc.merge(folders, method="linear", dry_run=True).estimate
    objects = hf_mudsc.merge(models, method="linear", dry_run=True).estimate
    # held memory (docs/design.md, "Dry run"): the relation check's sorted copies of the largest tensor (+ that
    # tensor read from a streamed parent), or the merged tensors and model (8 bytes per parameter), on the weights held
    assert streamed.peak_memory_bytes == PROCESS_BYTES + 4 * parameters + max(
        (RELATION_BYTES_PER_VALUE + 4) * largest, 8 * parameters)
    assert objects.peak_memory_bytes == PROCESS_BYTES + 3 * 4 * parameters + max(
        RELATION_BYTES_PER_VALUE * largest, 8 * parameters)
    data = make_batches("vit_cls", num_batches=1, batch_size=4)
    refitted = hf_mudsc.merge(folders, data, method="linear", refit="ridge", dry_run=True).estimate
    assert refitted.refit_bytes > 0  # the refit's working set comes on top of every parent held whole
    assert refitted.peak_memory_bytes == pytest.approx(PROCESS_BYTES + DATA_READER_BYTES + 3 * 4 * parameters + max(
        RELATION_BYTES_PER_VALUE * largest, 8 * parameters + refitted.refit_bytes), abs=2)


def test_a_dry_run_returns_its_plan_where_the_merge_refuses_the_memory(tmp_path, monkeypatch):
    """The docs promise the dry run an estimate of peak memory, not the merge's memory refusal (README "Look before you
    merge"; the refusal points to `--dry-run`'s estimate): with less memory than the floor, the merge refuses in one
    line and the dry run still returns its plan, whose peak shows the need."""
    import hf_mudsc.plan as plan

    a, b, _ = save_parents_and_data(tmp_path)
    available = 10**5
    monkeypatch.setattr(plan, "available_memory", lambda: available)
    with pytest.raises(MergeInputError, match="of memory is available") as refused:
        hf_mudsc.merge([str(a), str(b)], method="weight_matching", progress=False)
    assert "\n" not in str(refused.value)
    planned = hf_mudsc.merge([str(a), str(b)], method="weight_matching", dry_run=True)
    assert isinstance(planned, MergePlan) and planned.estimate.peak_memory_bytes > available


def test_the_data_pass_of_regmean_and_fisher_on_hand_made_sizes():
    """The methods that read the calibration data themselves (regmean, regmean_plusplus, fisher) had no term in the
    estimate: their whole pass was left out (for fisher, one backward per class per example, the largest cost of
    its merge). Each method states its pass's work per example (`MergeMethod.data_pass_flops`), the estimate adds it
    over the rows like calibration."""
    from hf_mudsc.methods.data import FISHER_FLOPS_PER_PARAMETER
    from hf_mudsc.methods.registry import METHODS, PassFacts

    facts = PassFacts(forward=100.0, grams=40.0, parameters=1000, classes=3, blocks=4)
    assert METHODS["regmean"].data_pass_flops(facts, parents=2) == 2 * (100 + 40)
    # RegMean++: each parent runs from the input up to block l for every block l: (blocks + 1) / 2 forwards
    assert METHODS["regmean_plusplus"].data_pass_flops(facts, parents=2) == 2 * (100 * 5 / 2 + 40)
    # Fisher: a forward, then a backward (about two forwards) and a squared-gradient sum (memory-bound) per class
    assert METHODS["fisher"].data_pass_flops(facts, parents=3) == 3 * ((1 + 2 * 3) * 100
                                                                       + FISHER_FLOPS_PER_PARAMETER * 3 * 1000)
    assert METHODS["mudsc"].data_pass_flops(facts, parents=2) == METHODS["average"].data_pass_flops(facts, 2) == 0
    kwargs = dict(widths=[2, 3], columns=[4, 5], group_tokens=[5, 1], linear_params={"w": 10}, tokens={"": 5},
                  num_parameters=100, rows=20, needs_statistics=False, matmul_flops=1e9, solves=False)
    plain = estimate_cost(**kwargs)
    passing = estimate_cost(**kwargs, data_pass_flops=280.0)
    assert plain.data_pass_seconds == 0
    assert passing.data_pass_seconds == pytest.approx(20 * 280 / (CALIBRATION_EFFICIENCY * 1e9))
    assert passing.seconds == pytest.approx(plain.seconds + passing.data_pass_seconds)


@pytest.mark.parametrize("method", ["regmean", "regmean_plusplus", "fisher"])
def test_the_dry_run_counts_the_data_pass_of_a_method_that_reads_the_data(method):
    base = make_model("bert_cls", 0)
    parents = [base, fine_tune(base, 1, 0.02)]
    data = make_batches("bert_cls", num_batches=4, batch_size=8)
    plan = hf_mudsc.merge(parents, data, method=method, dry_run=True)
    assert plan.estimate.data_pass_seconds > 0
    assert plan.estimate.seconds == pytest.approx(plan.estimate.calibration_seconds + plan.estimate.solve_seconds
                                                  + plan.estimate.alpha_search_seconds
                                                  + plan.estimate.refit_seconds + plan.estimate.data_pass_seconds)
    assert f"{method}'s data pass" in str(plan).split("Estimate:")[1]
    assert plan.to_dict()["estimate"]["data_pass_seconds"] == plan.estimate.data_pass_seconds
    assert hf_mudsc.merge(parents, data, method="mudsc", dry_run=True).estimate.data_pass_seconds == 0
    # without the refit too: the method still reads the data (the plan said "none (the method reads no data)")
    alone = hf_mudsc.merge(parents, data, method=method, refit="none", dry_run=True)
    assert alone.calibration is not None and alone.calibration.rows == 32
    work = lambda estimate: estimate.data_pass_seconds * estimate.matmul_flops_per_second  # noqa: E731 - the probe varies
    assert work(alone.estimate) == pytest.approx(work(plan.estimate))
    assert alone.estimate.refit_seconds == 0 and "reads no data" not in str(alone)


def test_the_dry_run_refuses_hub_encoders_one_with_a_pooler_from_their_headers(local_hub, tmp_path):
    """Hub parents' parameter names were compared only once their weights were downloaded: the dry run of a bare
    encoder with its pooler and one without said nothing, and the merge then refused. The headers it already reads
    name every tensor."""
    hub = local_hub
    for repo, kind in (("user/encoder", "vit"), ("user/encoder-nopool", "vit_nopool")):
        make_model(kind, seed=0).save_pretrained(tmp_path / repo)
        hub.upload_folder(repo, tmp_path / repo)
    with pytest.raises(MergeInputError) as caught:
        hf_mudsc.merge(["user/encoder", "user/encoder-nopool"], method="average", dry_run=True, progress=False)
    message = str(caught.value)
    assert message.startswith("parent A ('user/encoder') has a pooler ('pooler.dense') and parent B "
                              "('user/encoder-nopool') has none"), message
    for request in (r for r in hub.requests if r.path.endswith(".safetensors") and r.method == "GET"):
        assert request.headers.get("range", "").startswith("bytes=0-"), request.path  # headers only
    plan = hf_mudsc.merge(["user/encoder", "user/encoder"], method="average", dry_run=True, progress=False)
    assert [p.reference for p in plan.parents] == ["user/encoder", "user/encoder"]


def test_the_dry_run_refuses_a_config_that_does_not_describe_the_weights_as_the_merge_does(tmp_path):
    """QA s23: a folder whose config.json says 5 labels while its weights hold a 3-row classifier passed the dry run
    (which reads the headers), then the merge refused it."""
    import json as json_module

    folders = []
    for seed in (1, 2):
        folder = tmp_path / f"p{seed}"
        make_model("vit_cls", seed=seed).save_pretrained(folder)
        folders.append(folder)
    config = json_module.loads((folders[1] / "config.json").read_text())
    config["id2label"] = {str(i): f"c{i}" for i in range(5)}
    config["label2id"] = {f"c{i}": i for i in range(5)}
    (folders[1] / "config.json").write_text(json_module.dumps(config))
    batches = make_batches("vit_cls", num_batches=1)
    with pytest.raises(LoadError) as planned:
        hf_mudsc.merge([str(f) for f in folders], batches, method="average", dry_run=True, progress=False)
    with pytest.raises(LoadError) as merged:
        hf_mudsc.merge([folders[1], folders[0]], batches, method="average", progress=False)
    said = str(planned.value)
    assert "config.json does not describe the weights in model.safetensors" in said, said
    assert "tensors have other shapes than config.json says (e.g. 'classifier." in said, said
    assert said.split(": ", 1)[1] == str(merged.value).split(": ", 1)[1], (said, str(merged.value))
