"""`merge(..., dry_run=True)` and `hf-mudsc merge --dry-run`: the plan from configs and safetensors headers only.

Against the local Hub emulator (tests/hub_emulator.py; the CLI runs in a subprocess): no weight file is
downloaded (only ranged reads of each file's first bytes), nothing is written, no repo is created. The parents are
large enough (~0.5 MB of weights) that the header read is a strict prefix of the file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from factories import make_batches, make_model
from safetensors import safe_open
from test_cli import save_parents_and_data, tree_digest
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

import hf_mudsc
from hf_mudsc.architectures import spec_for
from hf_mudsc.errors import MergeInputError
from hf_mudsc.plan import (
    APPLY_FLOPS_PER_PARAMETER,
    CALIBRATION_EFFICIENCY,
    RUNTIME_BYTES,
    SOLVE_FACTOR,
    STATISTICS_FACTOR,
    WEIGHTS_FACTOR,
    MergePlan,
    estimate_cost,
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


def test_dry_run_against_the_hub_downloads_no_weights_and_writes_nothing(hub_emulator, wide_inputs, tmp_path):
    a, b, calibration, model = wide_inputs
    hub = hub_emulator
    hub.upload_folder("user/a", a, "parent A")
    hub.upload_folder("user/b", b, "parent B")
    pinned_b = hub.head("user/b")
    hub.commit_files("user/b", {"README.md": b"# moved on\n"}, "later commit")  # main moves past the pin
    work = tmp_path / "work"
    work.mkdir()
    out = work / "merged"
    before = tree_digest(a, b, calibration)
    env = hub.client_env(extra={"OMP_NUM_THREADS": "1"})
    argv = [sys.executable, "-m", "hf_mudsc", "merge", "user/a", f"user/b@{pinned_b}", "--calibration",
            str(calibration), "--num-samples", "24", "--output", str(out), "--push-to-hub", "user/merged",
            "--dry-run"]
    proc = subprocess.run(argv, env=env, cwd=work, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-4000:]

    # What the plan says: pinned parents, sizes from the headers, the relation, method, groups, rows, estimate.
    size = _tensor_bytes(a / "model.safetensors")
    params = sum(p.numel() for p in model.parameters())
    head_a = hub.head("user/a")
    assert f"  A: user/a@{head_a} — ViTForImageClassification, {params / 1e6:.2f} M parameters (F32), " \
        f"{size / 1e3:.2f} kB of weights" in proc.stdout
    assert f"  B: user/b@{pinned_b} — ViTForImageClassification" in proc.stdout
    assert "Relation: same class and configuration (ViTForImageClassification); the weight-based relation check " \
        "(shared base, permuted copy, independent, protected) runs at merge time" in proc.stdout
    assert ("Method: auto (chosen at merge time from the parents' weights; estimated as mudsc) (matcher zip)"
            in proc.stdout)
    spec = spec_for(model)
    assert f"Groups: {len(spec.groups)} (widths 64, 128)" in proc.stdout
    for group in spec.groups:
        assert f"  {group.name}: {group.width} units" in proc.stdout
    assert f"Calibration: {calibration}: 24 of 32 rows, 17 tokens per example" in proc.stdout
    assert "Estimate: " in proc.stdout and "peak memory" in proc.stdout

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
    # The HTTP client's per-request lines stay off by default; hf_mudsc's INFO lines are shown.
    assert "HTTP Request:" not in proc.stderr and "INFO hf_mudsc" in proc.stderr
    assert not hub.unhandled and not hub.server_errors

    # -v: hf_mudsc's DEBUG lines and one line per HTTP request.
    verbose = subprocess.run([*argv[:3], "-v", *argv[3:]], env=env, cwd=work, capture_output=True, text=True,
                             timeout=300, stdin=subprocess.DEVNULL)
    assert verbose.returncode == 0, verbose.stderr[-4000:]
    assert "HTTP Request: GET" in verbose.stderr and "DEBUG hf_mudsc" in verbose.stderr
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
                                   "tokens_per_example": 17, "tokens_assumed": False}
    assert data["method"] == "auto (chosen at merge time from the parents' weights; estimated as mudsc)"
    # the fixture's parents carry transformers' placeholder labels (LABEL_0, ...): that warning alone
    assert data["matcher"] == "zip" and [w[:60] for w in data["warnings"]] == [
        "the parents' heads are fused as one label set because every "]
    assert "dry_run" not in data["options"] and data["options"]["alpha"] == 0.5
    estimate = data["estimate"]
    assert estimate["seconds"] == pytest.approx(estimate["calibration_seconds"] + estimate["solve_seconds"])
    assert estimate["statistics_bytes"] == sum(8 * (2 * g.width) ** 2 for g in spec_for(model).groups)
    assert str(plan).startswith("Dry run: nothing was downloaded but configs and safetensors headers")
    assert tree_digest(a, b, calibration) == before and sorted(os.listdir()) == cwd


def test_dry_run_of_objects_and_batches_counts_rows_and_warns_about_a_small_calibration():
    a, b = make_model("vit_cls", 1), make_model("vit_cls", 2)
    plan = hf_mudsc.merge([a, b], make_batches("vit_cls", num_batches=1, batch_size=2), dry_run=True)
    assert plan.calibration.rows == 2 and plan.calibration.source == "1 batches"
    assert plan.parents[0].num_parameters == sum(p.numel() for p in a.parameters())
    assert plan.parents[0].weight_bytes is None and plan.parents[0].dtypes == ["float32"]
    # 2 images x 17 tokens = 34 rows < 2 x 48 MLP units (the dry run counts every group per token)
    assert [w for w in plan.warnings if w.startswith(
        "calibration too small for the widths: group 'vit.layers.0.mlp' (48 units per parent) saw 34 rows")]
    no_data = hf_mudsc.merge([a, b], method="average", dry_run=True)
    assert no_data.calibration is None and no_data.estimate.calibration_seconds == 0
    assert no_data.estimate.statistics_bytes == 0 and "Calibration: none" in str(no_data)


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
