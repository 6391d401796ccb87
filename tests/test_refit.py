"""`refit="ridge"` (docs/design.md §4.9): after matching, every linear layer is refitted in forward order by ridge
least squares toward the parents' outputs mapped into the merged basis, from calibration data only.

Proven here: the refit is a no-op on a permuted copy (the merge keeps the function), it equals the closed-form
ridge solution on a single linear layer (body targets mapped by the match, concatenated heads centred per task),
its memory does not grow with the calibration set, it lifts a different-init merge of the toy digit ViTs far
above the plain merge, the option flows through merge(), the recipe, the CLI and the card, and bad values are
refused before anything is loaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from factories import (
    count_runs,
    make_batches,
    make_model,
    model_output,
    one_linear,
    permuted_copy,
    relative_error,
    ridge_solution,
    vit_cli_case,
    with_new_head,
)
from torch import nn

import hf_mudsc
from hf_mudsc.apply import refit
from hf_mudsc.apply.refit import refit_model, shared_basis_score, subset_batches
from hf_mudsc.architectures import spec_for
from hf_mudsc.cli.main import build_parser
from hf_mudsc.cli.merge import build_recipe
from hf_mudsc.errors import MergeInputError, RecipeError
from hf_mudsc.publish.card import render_card
from hf_mudsc.publish.recipe import Recipe
from hf_mudsc.solve.matchers import Match
from hf_mudsc.spec import Classifier, Group, HookPoint, Member, PermutationSpec

MISSING = ["/nonexistent/parent-a", "/nonexistent/parent-b"]


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------- cost without change

# (kind, matcher, batches, refit_samples): body groups, padding, two towers (two chains), a seeded subset. Their
# refitted weights were recorded in tests/data/refit_reference.safetensors at commit 8967b32, before the refit
# replayed finished blocks and shared the Gram of q/k/v (one thread, this machine: bitwise equal since).
REFIT_CASES = (("vit_cls", "zip", 2, None), ("bert_cls", "align", 2, None), ("clip", "align", 2, None),
               ("vit_cls", "align", 2, 24))
REFERENCE = Path(__file__).parent / "data" / "refit_reference.safetensors"


def _refitted(kind: str, matcher: str, num_batches: int, samples: int | None, **options) -> nn.Module:
    return hf_mudsc.merge([make_model(kind, seed=1), make_model(kind, seed=2)],
                          make_batches(kind, num_batches=num_batches), matcher=matcher, refit="ridge",
                          **({} if samples is None else {"refit_samples": samples}), progress=False, **options)


@pytest.mark.parametrize("case", REFIT_CASES, ids=lambda case: "-".join(map(str, case)))
def test_refit_result_is_the_one_recorded_before_blocks_were_replayed(case):
    """Same numbers as the refit that re-ran every pass from the input, within the rounding of the targets: they
    have been cached in float32 (the parents' own precision) since, which moved these toy layers (weak ridge, few
    samples) by at most 8e-6 of their norm, 1.1e-5 in one entry; any real change of the method moves them by far
    more."""
    from safetensors.torch import load_file

    reference = load_file(REFERENCE)
    prefix = f"{case[0]}-{case[1]}-{case[3]}/"
    recorded = {k.removeprefix(prefix): v for k, v in reference.items() if k.startswith(prefix)}
    merged = _refitted(*case)
    assert merged.merge_report.refit.chains  # the blocks were replayed
    state = merged.state_dict()
    assert state.keys() == recorded.keys()
    for name, value in recorded.items():
        assert float((state[name] - value).norm()) <= 5e-5 * float(value.norm()) + 1e-7, name
        torch.testing.assert_close(state[name], value, rtol=1e-4, atol=5e-5, msg=name)


def _block_runs(model: nn.Module, blocks: int, part: str = "layernorm_before") -> list[int]:
    """How often each block of a ViT really computes (its first LayerNorm runs; a replayed block does not) — or, with
    `part="attention.q_proj"`, its attention (a replayed attention does not run its q projection)."""
    modules = dict(model.named_modules())
    runs = [0] * blocks
    for index in range(blocks):
        count_runs(modules[f"vit.layers.{index}.{part}"], lambda index=index: runs.__setitem__(index, runs[index] + 1))
    return runs


def _deep_vit(seed: int, layers: int = 4) -> nn.Module:
    from factories import VIT, randomize
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    return randomize(ViTForImageClassification(ViTConfig(**{**VIT, "num_hidden_layers": layers}, num_labels=3)), seed)


def test_refit_runs_each_parent_block_a_fixed_number_of_times_whatever_the_depth(monkeypatch):
    """Replaying finished blocks, with the parents run once per step (no target cache): a parent's block runs in
    the statistics pass and the passes of its own 4 steps (the last runs on to the block's end and stores its
    output: a parent's blocks are final from the start) — the same count for the first block as for the last.
    Without the replay (no chains) the first block runs in every pass: the same weights, far more work."""
    monkeypatch.setattr(refit, "TARGET_CACHE_BYTES", 0)
    batches = make_batches("vit_cls", num_batches=2)
    results, counts = [], []
    for replay in (True, False):
        if not replay:
            monkeypatch.setattr(refit, "find_chains", lambda *args: [])
        parents = [_deep_vit(1), _deep_vit(2)]
        calls = _block_runs(parents[1], 4)  # B: A is the parent the merged model is copied from
        merged = hf_mudsc.merge(parents, batches, matcher="zip", refit="ridge", progress=False)
        counts.append(calls)
        results.append(merged.state_dict())
        assert bool(merged.merge_report.refit.chains) == replay
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
    with_replay, without = counts
    assert with_replay == [2 + 4 * 2] * 4  # statistics, then 4 refit passes, 2 batches each
    steps = 4 * 4 + 1  # q/k/v, o, fc1, fc2 per block, then the classifier
    assert without == [2 + 2 * (steps - 4 * i) for i in range(4)]  # every pass from the input: 36, 28, 20, 12


def test_refit_caches_float32_targets_and_counts_the_parents_passes(monkeypatch):
    """A budget of exactly one block's targets in float32 (q, k, v, o, fc1, fc2: 3·32 + 32 + 48 + 32 = 208 per
    token, 4 bytes each) holds 4 steps per chunk (in float64 it would hold 2): the first step alone, then
    [o, fc1, fc2, next q/k/v] three times, then the last block's [o, fc1, fc2] and the classifier: 5 passes of each
    parent instead of 17. A parent's block then computes once per chunk it is in (plus the statistics pass): 6
    runs each. The refitted weights are those of one step per chunk, bit for bit."""
    batches = make_batches("vit_cls", num_batches=2)
    tokens = 2 * 16 * 17
    weights, reports, counts = [], [], []
    for budget in (0, 208 * tokens * 4, refit.TARGET_CACHE_BYTES):
        monkeypatch.setattr(refit, "TARGET_CACHE_BYTES", budget)
        parents = [_deep_vit(1), _deep_vit(2)]
        calls = _block_runs(parents[1], 4)
        merged = hf_mudsc.merge(parents, batches, matcher="zip", refit="ridge", progress=False)
        weights.append(merged.state_dict())
        reports.append(merged.merge_report.refit)
        counts.append(calls)
    assert {fit.samples for fit in reports[0].layers if fit.name != "classifier"} == {tokens}
    assert [len(report.steps) for report in reports] == [17, 17, 17]
    assert [report.parent_passes for report in reports] == [17, 5, 2]
    assert counts == [[2 + 4 * 2] * 4, [2 + 2 * 2] * 4, [2 + 2 * 2] + [2 + 2] * 3]
    for other in weights[1:]:
        assert all(torch.equal(weights[0][name], other[name]) for name in weights[0])


@pytest.mark.parametrize("units", [True, False])
def test_refit_merged_model_runs_each_block_in_five_passes_and_its_attention_in_two(monkeypatch, units):
    """The merged model's block k runs in 5 passes (its q/k/v, o, fc1 and fc2 steps, and the next step's, which
    stores the block's output). Its attention is final once o is refitted: the fc1 pass stores its output, so the fc2
    pass and the next one replay it (a unit, `block_replay.Unit`) — it computes in 2 passes (o, fc1) instead of 4;
    the q/k/v pass stops before it. The same refit, bit for bit, without units."""
    from hf_mudsc.apply import block_replay

    if not units:
        monkeypatch.setattr(block_replay, "_unit_candidates", lambda *args: [])
    batches = make_batches("vit_cls", num_batches=2)
    parents = [_deep_vit(1), _deep_vit(2)]
    runs: list[list[int]] = []
    attention: list[list[int]] = []
    original = refit.forward_steps

    def watch(model, layers, batch):  # the merged model, as the refit receives it
        runs.append(_block_runs(model, 4))
        attention.append(_block_runs(model, 4, "attention.q_proj"))
        return original(model, layers, batch)

    monkeypatch.setattr(refit, "forward_steps", watch)
    merged = hf_mudsc.merge(parents, batches, matcher="align", refit="ridge", progress=False)
    # First batch: forward_steps' forward, find_chains' recording, its chains' check (it runs only the last block)
    # and, with units, its units' check (every block, each unit replaced by its own output); then 5 passes x 2.
    check = int(units)
    assert runs == [[1 + 1 + check + 5 * 2] * 3 + [1 + 2 + check + 5 * 2]]
    passes = 2 if units else 4
    assert attention == [[2 + passes * 2] * 3 + [3 + passes * 2]]
    assert merged.merge_report.refit.chains == [tuple(f"vit.layers.{i}" for i in range(4))]


def test_units_change_no_refitted_weight(monkeypatch):
    """Replaying units gives the refit of the plain block replay bit for bit, for each architecture."""
    from hf_mudsc.apply import block_replay

    for case in REFIT_CASES[:3]:
        with_units = _refitted(*case).state_dict()
        with monkeypatch.context() as patch:
            patch.setattr(block_replay, "_unit_candidates", lambda *args: [])
            without = _refitted(*case).state_dict()
        assert with_units.keys() == without.keys()
        assert all(torch.equal(with_units[name], without[name]) for name in with_units), case


def test_refit_stores_block_outputs_in_files_beyond_the_ram_budget_and_removes_them(monkeypatch, tmp_path):
    import tempfile

    from hf_mudsc.apply import block_replay

    in_ram = _refitted("bert_cls", "align", 2, None)
    monkeypatch.setattr(block_replay, "RAM_BYTES", 0)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    on_disk = _refitted("bert_cls", "align", 2, None)
    report = on_disk.merge_report.refit
    assert report.stored_files > 0 and report.stored_bytes == 0
    assert in_ram.merge_report.refit.stored_files == 0 and in_ram.merge_report.refit.stored_bytes > 0
    assert list(tmp_path.iterdir()) == []  # the temporary directory is gone
    first, second = in_ram.state_dict(), on_disk.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_refit_stored_outputs_are_bounded_by_refit_samples_not_by_the_calibration_set():
    reports = [hf_mudsc.merge([make_model("vit_cls", seed=1), make_model("vit_cls", seed=2)],
                              make_batches("vit_cls", num_batches=n), matcher="align", refit="ridge",
                              refit_samples=16, progress=False).merge_report.refit for n in (2, 8)]
    assert reports[0].examples == reports[1].examples == 16
    # Per model (merged + 2 parents), one block output per chain (16 images x 17 tokens x 32 float32), and the
    # next block's while it replaces it: at most 2 per model. Here the merged model's two blocks, one after the
    # other (the parents' targets are cached per chunk: they need no stored block in a 2-block model), and its
    # last block's attention output (a unit), replayed in the pass that stores that block: 3 at the peak.
    one = 16 * 17 * 32 * 4
    assert reports[0].stored_bytes == reports[1].stored_bytes == 3 * one


class Chained(nn.Module):
    """Toy blocks run one after the other, each fed the previous one's output: a chain `find_chains` replays."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def test_refit_replays_nothing_when_the_replay_would_change_the_output():
    """A model whose head reads every block's output (not only the last one): replaying would change its output,
    so no chain is used and the result is the plain pass-by-pass refit."""
    from hf_mudsc.apply.block_replay import find_chains

    class Summed(Chained):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            total = torch.zeros_like(x)
            for block in self.blocks:
                x = block(x)
                total = total + x
            return total

    torch.manual_seed(0)
    batch = {"x": torch.randn(5, 4)}
    layers = [f"blocks.{i}" for i in range(3)]
    assert find_chains(Summed([nn.Linear(4, 4) for _ in range(3)]), layers, batch) == []
    (chain,) = find_chains(Chained([nn.Linear(4, 4) for _ in range(3)]), layers, batch)
    assert chain.blocks == ("blocks.0", "blocks.1", "blocks.2") and chain.layers_before_end == (1, 2, 3)


def test_units_are_the_modules_in_a_block_that_hold_refit_layers_and_replay_exactly():
    """Units: the modules inside a chain's blocks, at any depth, that hold refit layers, run once per forward and do
    not return the block's own output (BERT: attention, the self-attention and its output inside it, intermediate;
    not output). A block that changes its child's output in place would see it changed twice when the child is
    replayed: the units' check finds the model's output changed and drops the units (the blocks are still replayed
    whole); a child run twice per forward is no unit."""
    from hf_mudsc.apply.block_replay import find_chains

    bert = make_model("bert_cls", 0).eval()
    batch = make_batches("bert_cls")[0]
    layers = [name for step in refit.forward_steps(bert, refit.refit_layers(bert, spec_for(bert)), batch)
              for name in step]
    (chain,) = find_chains(bert, layers, batch)
    assert [unit.name for unit in chain.units] == [
        f"bert.encoder.layer.{i}.{part}" for i in range(2)
        for part in ("attention", "attention.self", "attention.output", "intermediate")]
    # q/k/v, o | q/k/v | q/k/v, o | fc1 (then fc2), per block
    assert [unit.layers_before_end for unit in chain.units] == [4, 3, 4, 5, 10, 9, 10, 11]

    class Block(nn.Module):
        def __init__(self, twice: bool = False, in_place: bool = False) -> None:
            super().__init__()
            self.inner = nn.Sequential(nn.Linear(4, 4))
            self.out = nn.Linear(4, 4)
            self.twice, self.in_place = twice, in_place

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.inner(x)
            if self.in_place:
                y.mul_(2.0)
            if self.twice:
                y = self.inner(y)
            return self.out(y) + x

    torch.manual_seed(0)
    batch = {"x": torch.randn(5, 4)}
    names = [f"blocks.{i}.{part}" for i in range(3) for part in ("inner.0", "out")]
    for kind, units in (({}, 3), ({"in_place": True}, 0), ({"twice": True}, 0)):
        (chain,) = find_chains(Chained([Block(**kind) for _ in range(3)]), names, batch)
        assert chain.blocks == ("blocks.0", "blocks.1", "blocks.2") and len(chain.units) == units, kind
        assert all(unit.name == f"blocks.{unit.block}.inner" for unit in chain.units)


def test_a_unit_inside_a_unit_is_dropped_alone_when_its_replay_changes_the_output():
    """Units are checked one nesting depth at a time: an outer module that changes its inner module's output in
    place (it would be changed twice if the inner one were replayed) keeps the outer unit and loses the inner one."""
    from hf_mudsc.apply.block_replay import find_chains

    class Outer(nn.Module):
        def __init__(self, in_place: bool) -> None:
            super().__init__()
            self.inner = nn.Sequential(nn.Linear(4, 4))
            self.o = nn.Linear(4, 4)
            self.in_place = in_place

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.inner(x)
            if self.in_place:
                y.mul_(2.0)
            return self.o(y)

    class Block(nn.Module):
        def __init__(self, in_place: bool) -> None:
            super().__init__()
            self.outer = Outer(in_place)
            self.out = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.outer(x)) + x

    torch.manual_seed(0)
    batch = {"x": torch.randn(5, 4)}
    names = [f"blocks.{i}.{part}" for i in range(3) for part in ("outer.inner.0", "outer.o", "out")]
    for in_place, parts in ((False, ["outer", "outer.inner"]), (True, ["outer"])):
        (chain,) = find_chains(Chained([Block(in_place) for _ in range(3)]), names, batch)
        assert [unit.name for unit in chain.units] == [f"blocks.{i}.{part}" for i in range(3) for part in parts]


def test_refit_runs_bert_self_attention_once_per_block_in_every_model(monkeypatch):
    """With units inside units replayed, the merged BERT's self-attention (its query projection) computes in one
    refit pass per block (the o step's; the fc1 pass, which stores the attention, replays it), and a parent's once
    per block however many chunks of steps the block spans (here one step per chunk) — against four passes each
    with no units; the same refitted weights, bit for bit."""
    from hf_mudsc.apply import block_replay

    monkeypatch.setattr(refit, "TARGET_CACHE_BYTES", 0)  # one parents' pass per step
    batches = make_batches("bert_cls", num_batches=2)
    states, counts = [], []
    for units in (True, False):
        with monkeypatch.context() as patch:
            if not units:
                patch.setattr(block_replay, "_unit_candidates", lambda *args: [])
            parents = [make_model("bert_cls", seed=1), make_model("bert_cls", seed=2)]
            runs: dict[str, list[int]] = {"merged": [0, 0], "parent": [0, 0]}
            original = refit.refit_model

            def watch(merged, parents_, *args, runs=runs, original=original, **kwargs):  # the refit's passes only
                for key, model in (("merged", merged), ("parent", parents_[1])):
                    modules = dict(model.named_modules())
                    for index in range(2):
                        count_runs(modules[f"bert.encoder.layer.{index}.attention.self.query"],
                                   lambda key=key, index=index: runs[key].__setitem__(index, runs[key][index] + 1))
                return original(merged, parents_, *args, **kwargs)

            patch.setattr(refit, "refit_model", watch)
            patch.setattr("hf_mudsc.pipeline.refit_model", watch, raising=False)
            merged = hf_mudsc.merge(parents, batches, matcher="align", refit="ridge", progress=False)
        states.append(merged.state_dict())
        counts.append(runs)
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][name], states[1][name]) for name in states[0])
    with_units, without = counts
    # Before the passes: refit_samples="auto"'s count (both batches), forward_steps' forward and find_chains'
    # recording of the first batch (its chains' check runs the last block only; its units' checks replace the
    # attention, then the self-attention: the query does not run).
    before = [2 + 1 + 1, 2 + 1 + 1 + 1]
    # The merged model: the o pass, then the fc1 pass replays the self-attention; without units the o, fc1 and fc2
    # passes and the one that stores the block (the next step's) each run it.
    assert with_units["merged"] == [count + 1 * 2 for count in before]
    assert without["merged"] == [count + 4 * 2 for count in before]
    # A parent (all final): its q/k/v pass stores the self-attention, the o pass replays it and stores the attention;
    # without units the q/k/v, o, fc1 and fc2 passes (the last stores the block) each run it.
    assert with_units["parent"] == [1 * 2] * 2
    assert without["parent"] == [4 * 2] * 2


# ------------------------------------------------------------------------------------------------ invariance


@pytest.mark.parametrize(("kind", "matcher", "layers"), [
    ("vit_cls", "align", 13), ("vit_cls", "zip", 13), ("bert_cls", "align", 14), ("clip", "align", 26)])
def test_refit_keeps_the_function_of_a_model_merged_with_its_permuted_copy(kind, matcher, layers):
    model = make_model(kind, seed=0)
    permuted = permuted_copy(model, spec_for(model), seed=1)
    batches = make_batches(kind)
    merged = hf_mudsc.merge([model, permuted], batches, matcher=matcher, refit="ridge", progress=False)
    for batch in batches[:2]:
        assert relative_error(model_output(merged, batch), model_output(model, batch)) < 1e-5
    report = merged.merge_report.refit
    assert len(report.layers) == layers  # every q/k/v, o, fc1, fc2, pooler, classifier / projection was refitted
    assert all(fit.samples > 0 for fit in report.layers)
    assert merged.config.mudsc["refit"] == "ridge" and merged.config.mudsc["refit_lambda"] == 1e-3


def test_refit_steps_follow_the_forward_order_and_group_layers_that_share_their_input():
    model = make_model("vit_cls", seed=0)
    permuted = permuted_copy(model, spec_for(model), seed=1)
    merged = hf_mudsc.merge([model, permuted], make_batches("vit_cls", num_batches=1), matcher="align",
                            refit="ridge", progress=False)
    block = ["vit.layers.{i}.attention.q_proj", "vit.layers.{i}.attention.k_proj", "vit.layers.{i}.attention.v_proj"]
    expected = []
    for i in range(2):
        expected += [[n.format(i=i) for n in block], [f"vit.layers.{i}.attention.o_proj"],
                     [f"vit.layers.{i}.mlp.fc1"], [f"vit.layers.{i}.mlp.fc2"]]
    assert merged.merge_report.refit.steps == [*expected, ["classifier"]]


def test_refit_keeps_the_concatenated_head_of_parents_in_one_basis():
    """A permuted copy with its own head: the fused units' weights correlate perfectly, so the matched heads are
    kept (no centring) and each task's slice gives back its parent's logits exactly."""
    model = make_model("vit_cls", seed=0)
    other = with_new_head(model, 5, seed=3)
    permuted = permuted_copy(other, spec_for(other), seed=1)
    batches = make_batches("vit_cls")
    merged = hf_mudsc.merge([model, permuted], batches, matcher="align", refit="ridge", progress=False)
    report = merged.merge_report.refit
    assert report.shared_basis == pytest.approx(1.0, abs=1e-6) and report.head_kept
    assert "classifier" not in [fit.name for fit in report.layers]
    with torch.no_grad():
        logits = merged(**batches[0]).logits
        assert relative_error(logits[:, :3], model(**batches[0]).logits) < 1e-5
        assert relative_error(logits[:, 3:], permuted(**batches[0]).logits) < 1e-5



def _regression_parent(seed: int, name: str) -> nn.Module:
    model = make_model("bert_cls", seed=seed, num_labels=1)
    model.config.id2label, model.config.label2id = {0: name}, {name: 0}
    return model


def test_refit_fits_concatenated_regression_heads_to_the_parents_scores():
    """Two regression parents of different tasks (one output each, named): their heads are concatenated, and the
    refit used to fit each one-output slice to its parent's CENTRED logits — identically zero — so the merged
    model gave a constant score (relative error ~1; the gate hid it by dropping the refit). A regression output is
    no softmax logit: its slice is fitted to the parent's raw score."""
    parents = [_regression_parent(0, "positivity"), _regression_parent(1, "length")]
    batches = make_batches("bert_cls", num_batches=8)
    merged = hf_mudsc.merge(parents, batches, refit="ridge", progress=False)
    assert merged.config.num_labels == 2 and merged.config.problem_type == "regression"
    with torch.no_grad():
        got = torch.cat([merged(**b).logits for b in batches])
        for task, parent in enumerate(parents):
            want = torch.cat([parent(**b).logits[:, 0] for b in batches])
            error = float(((got[:, task] - want) ** 2).mean() / want.var())
            assert error < 0.5, (task, error)


# ------------------------------------------------------------------------------------------ known answer


@pytest.mark.parametrize("clusters", [
    [2, 0, 3, 1, 0, 3, 1, 2],  # align: merged unit j = {A_i, B_k}
    [0, 0, 1, 2, 1, 2, 3, 3],  # zip: A0+A1 and B2+B3 fused within their model
])
def test_refit_of_a_single_linear_layer_is_the_closed_form_ridge_solution(clusters):
    spec = PermutationSpec(groups=(Group("hidden", 4, (Member("lin.weight", 0, "out"), Member("lin.bias", 0, "out")),
                                         (HookPoint("lin", "output"),)),))
    parent_a, parent_b = one_linear(3, 4, seed=1), one_linear(3, 4, seed=2)
    merged = one_linear(3, 4, seed=3)  # any starting point: the ridge pulls toward it
    start_w, start_b = merged.lin.weight.detach().clone(), merged.lin.bias.detach().clone()
    cluster_of = torch.tensor(clusters)
    found = Match(cluster_of=cluster_of, merge_weight=torch.full((8,), 0.5, dtype=torch.float64), num_merged=4,
                  value=1.0)
    generator = torch.Generator().manual_seed(0)
    batches = [{"x": torch.randn(5, 3, generator=generator)} for _ in range(3)]
    report = refit_model(merged, [parent_a, parent_b], spec, [found], lambda: iter(batches), lambda_rel=0.1)

    x = torch.cat([b["x"] for b in batches]).to(torch.float64)
    with torch.no_grad():
        outputs = torch.cat([parent_a(x.float()), parent_b(x.float())], dim=1).to(torch.float64)  # [A 0..3, B 0..3]
    target = torch.stack([outputs[:, cluster_of == j].mean(1) for j in range(4)], dim=1)  # each cluster's mean
    weight, bias = ridge_solution(x, target, start_w, start_b, 0.1)
    assert torch.allclose(merged.lin.weight.to(torch.float64), weight, atol=1e-6)
    assert torch.allclose(merged.lin.bias.to(torch.float64), bias, atol=1e-6)
    assert not torch.allclose(merged.lin.weight, start_w, atol=1e-3)  # the refit really moved the layer
    assert [fit.name for fit in report.layers] == ["lin"] and report.layers[0].samples == 15


def _head_spec() -> PermutationSpec:
    return PermutationSpec(groups=(Group("features", 3, (Member("lin.weight", 1, "in"),), (HookPoint("lin"),)),),
                           averaged=("lin.bias",), classifier=Classifier("lin.weight", "lin.bias"))


def test_refit_of_concatenated_heads_fits_each_tasks_centred_logits():
    parent_a, parent_b, merged = one_linear(3, 2, seed=1), one_linear(3, 3, seed=2), one_linear(3, 5, seed=3)
    start_w, start_b = merged.lin.weight.detach().clone(), merged.lin.bias.detach().clone()
    generator = torch.Generator().manual_seed(0)
    batches = [{"x": torch.randn(6, 3, generator=generator)} for _ in range(2)]
    report = refit_model(merged, [parent_a, parent_b], _head_spec(), [None], lambda: iter(batches),
                         concatenate_classifier=True, lambda_rel=0.05)
    assert report.shared_basis is None and not report.head_kept  # no weight evidence of a shared basis

    x = torch.cat([b["x"] for b in batches]).to(torch.float64)
    with torch.no_grad():
        logits = [parent(x.float()).to(torch.float64) for parent in (parent_a, parent_b)]
    target = torch.cat([z - z.mean(1, keepdim=True) for z in logits], dim=1)
    weight, bias = ridge_solution(x, target, start_w, start_b, 0.05)
    assert torch.allclose(merged.lin.weight.to(torch.float64), weight, atol=1e-6)
    assert torch.allclose(merged.lin.bias.to(torch.float64), bias, atol=1e-6)


def test_refit_keeps_a_head_it_is_told_to_keep():
    parent_a, parent_b, merged = one_linear(3, 2, seed=1), one_linear(3, 3, seed=2), one_linear(3, 5, seed=3)
    before = {k: v.clone() for k, v in merged.state_dict().items()}
    batches = [{"x": torch.randn(6, 3)}]
    report = refit_model(merged, [parent_a, parent_b], _head_spec(), [None], lambda: iter(batches),
                         concatenate_classifier=True, keep_head=True)
    assert report.head_kept and report.layers == []
    assert all(torch.equal(before[k], v) for k, v in merged.state_dict().items())


def test_shared_basis_score_is_the_weight_correlation_of_fused_units():
    model = make_model("vit_cls", seed=0)
    spec = spec_for(model)
    other = make_model("vit_cls", seed=7)
    params = {k: v.detach() for k, v in model.named_parameters()}
    identity = [None] * len(spec.groups)
    assert shared_basis_score(spec, params, params, identity) == pytest.approx(1.0, abs=1e-9)
    unrelated = shared_basis_score(spec, params, {k: v.detach() for k, v in other.named_parameters()}, identity)
    assert abs(unrelated) < 0.2


def test_a_zip_that_fuses_few_units_across_parents_is_no_evidence_of_a_shared_basis():
    """Zip on different-init parents may fuse almost every unit within its own parent: one cross pair (here a
    perfect one) must not decide that the parents share a basis. Units of parent 0 without a partner count 0."""
    from hf_mudsc.solve.maps import GroupMaps
    from hf_mudsc.solve.matchers import Match
    from hf_mudsc.solve.similarity import weight_features

    model = make_model("vit_cls", seed=0)
    spec = spec_for(model)
    params = {k: v.detach() for k, v in model.named_parameters()}
    matches = []
    for group in spec.groups:
        if not group.name.endswith("mlp"):
            matches.append(None)  # identity: the same model on both sides correlates 1.0
            continue
        n = group.width  # A unit 0 fused with B unit 0; every other unit alone
        clusters = torch.cat([torch.arange(n), torch.tensor([0]), torch.arange(n, 2 * n - 1)])
        weights = torch.ones(2 * n, dtype=torch.float64)
        weights[[0, n]] = 0.5
        matches.append(Match(clusters, weights, 2 * n - 1, 0.0))
    # Known answer per group: the attention groups 1.0 (the same weights); each MLP group 1/n (one perfect pair,
    # n - 1 partnerless units of parent 0); the residual stream pairs unit i with unit i, its rows read the MLP
    # units through each side's own (different) merge map: its correlation computed directly.
    maps = [GroupMaps.from_match(found) if found is not None else None for found in matches]
    residual = spec.groups.index(next(g for g in spec.groups if g.name == "residual"))
    rows = [weight_features(spec, residual, params, side, maps) for side in (0, 1)]
    rows = [r - r.mean(dim=1, keepdim=True) for r in rows]
    rows = [r / r.norm(dim=1, keepdim=True) for r in rows]
    per_group = {"residual": float((rows[0] * rows[1]).sum(dim=1).mean())}
    per_group |= {g.name: 1 / g.width if g.name.endswith("mlp") else 1.0 for g in spec.groups if g.name != "residual"}
    expected = sum(per_group.values()) / len(spec.groups)
    assert shared_basis_score(spec, params, params, matches) == pytest.approx(expected, abs=1e-9)


# ---------------------------------------------------------------------------------------------- memory


def test_refit_memory_does_not_grow_with_the_number_of_samples():
    model_a, model_b = make_model("vit_cls", seed=1), make_model("vit_cls", seed=2)
    reports = [hf_mudsc.merge([model_a, model_b], make_batches("vit_cls", num_batches=n), matcher="align",
                              refit="ridge", progress=False).merge_report.refit for n in (1, 4)]
    small, large = ({fit.name: fit for fit in report.layers} for report in reports)
    assert small.keys() == large.keys()
    for name, fit in small.items():
        assert (fit.gram_shape, fit.cross_shape) == (large[name].gram_shape, large[name].cross_shape)
        assert large[name].samples == 4 * fit.samples
    # (in + 1)² Gram and (in + 1) × out cross-Gram per layer: hidden 32, MLP 48, 3 labels.
    assert (small["vit.layers.0.attention.q_proj"].gram_shape, small["vit.layers.0.attention.q_proj"].cross_shape) \
        == ((33, 33), (33, 32))
    assert (small["vit.layers.1.mlp.fc2"].gram_shape, small["vit.layers.1.mlp.fc2"].cross_shape) == ((49, 49), (49, 32))
    assert (small["classifier"].gram_shape, small["classifier"].cross_shape) == ((33, 33), (33, 3))
    assert small["vit.layers.0.mlp.fc1"].samples == 16 * 17  # every token of every image


@pytest.mark.parametrize("bias", [True, False])
def test_ridge_accumulator_sums_the_gram_and_cross_grams_of_its_batches_in_float64(bias):
    """Hand-made batches in small integers (every product and sum exact in float64): the Gram (one triangle
    summed by dsyrk, mirrored when read) and each cross-Gram are exactly `X̃ᵀX̃` and `X̃ᵀY_i`."""
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randint(-4, 5, (rows, 3), generator=gen).to(torch.float32) for rows in (5, 1, 4)]
    ys = [[torch.randint(-4, 5, (len(x), width), generator=gen).to(torch.float32) for width in (2, 1)] for x in xs]
    accumulator = refit.RidgeAccumulator(3, [2, 1], bias)
    for x, y in zip(xs, ys):
        accumulator.update(x, y)
    inputs = torch.cat(xs).to(torch.float64)
    if bias:
        inputs = torch.cat([inputs, torch.ones(len(inputs), 1, dtype=torch.float64)], dim=1)
    assert accumulator.samples == 10 and accumulator.gram.dtype == torch.float64
    assert torch.equal(accumulator.gram, inputs.T @ inputs)
    assert torch.equal(accumulator.gram, accumulator.gram.T)
    for index in range(2):
        assert torch.equal(accumulator.crosses[index], inputs.T @ torch.cat([y[index] for y in ys]).to(torch.float64))
    accumulator.update(xs[0], ys[0])  # more data after a read: summed on top
    assert torch.equal(accumulator.gram, inputs.T @ inputs + (inputs[:5].T @ inputs[:5]))


def test_refit_samples_is_a_seeded_subset_read_the_same_on_every_pass():
    batches = make_batches("vit_cls", num_batches=5)  # 80 images
    images = torch.cat([batch["pixel_values"] for batch in batches])
    subset = subset_batches(lambda: iter(batches), 24, seed=3)
    first, second = (torch.cat([batch["pixel_values"] for batch in subset()]) for _ in range(2))
    assert len(first) == 24 and torch.equal(first, second)  # the same rows on every read
    rows = [int((images == row).flatten(1).all(1).nonzero()) for row in first]
    assert rows == sorted(rows) and len(set(rows)) == 24  # original images, in stream order, no repeats
    other = torch.cat([batch["pixel_values"] for batch in subset_batches(lambda: iter(batches), 24, seed=4)()])
    assert not torch.equal(first, other)  # the seed chooses
    # Given the stream's length, no counting pass; as many or more samples than the stream holds: all of it.
    assert torch.equal(torch.cat([b["pixel_values"] for b in subset_batches(lambda: iter(batches), 24, seed=3,
                                                                              total=80)()]), first)
    everything = lambda: iter(batches)  # noqa: E731
    assert subset_batches(everything, 80) is everything and subset_batches(everything, None) is everything

    model_a, model_b = make_model("vit_cls", seed=1), make_model("vit_cls", seed=2)
    report = hf_mudsc.merge([model_a, model_b], batches, matcher="align", refit="ridge", refit_samples=24,
                            progress=False).merge_report.refit
    assert report.examples == 24
    assert {fit.samples for fit in report.layers if fit.name != "classifier"} == {24 * 17}  # every token of 24


def test_refit_runs_the_parents_once_per_chunk_of_steps_with_the_same_result(monkeypatch):
    # Caching the parents' targets between steps changes how often they run, never the refitted weights.
    model_a, model_b = make_model("vit_cls", seed=1), make_model("vit_cls", seed=2)
    batches = make_batches("vit_cls", num_batches=2)
    calls = []
    for parent in (model_a, model_b):
        count_runs(parent, lambda: calls.append(1))
    weights, passes = [], []
    for budget in (0, refit.TARGET_CACHE_BYTES):  # 0: one step per chunk (the parents run for every step)
        monkeypatch.setattr(refit, "TARGET_CACHE_BYTES", budget)
        calls.clear()
        merged = hf_mudsc.merge([model_a, model_b], batches, matcher="align", refit="ridge", progress=False)
        weights.append(merged.state_dict())
        passes.append(len(calls))
    steps = len(merged.merge_report.refit.steps)
    assert passes[0] > passes[1] >= 2 * 2 * 2  # both parents, both batches, at least the first step's chunk + one
    assert passes[0] - passes[1] == 2 * 2 * (steps - 2)  # cached: the first step alone, then every other in one
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


def test_refit_drops_padding_tokens_like_calibration():
    model_a, model_b = make_model("bert_cls", seed=1), make_model("bert_cls", seed=2)
    batches = make_batches("bert_cls", num_batches=2)
    report = hf_mudsc.merge([model_a, model_b], batches, refit="ridge", progress=False).merge_report.refit
    tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)
    assert tokens < sum(batch["attention_mask"].numel() for batch in batches)  # there is padding to drop
    samples = {fit.name: fit.samples for fit in report.layers}
    assert samples == {**{f"bert.encoder.layer.{i}.{name}": tokens for i in range(2) for name in (
        "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
        "intermediate.dense", "output.dense")}, "bert.pooler.dense": 32, "classifier": 32}


# ------------------------------------------------------------------------------ the option end to end


def test_refit_option_reaches_config_recipe_cli_and_card(tmp_path):
    model_a, model_b = make_model("vit_cls", seed=1), make_model("vit_cls", seed=2)
    batches = make_batches("vit_cls", num_batches=1)
    merged = hf_mudsc.merge([model_a, model_b], batches, refit="ridge", refit_lambda=0.01, progress=False)
    assert (merged.config.mudsc["refit"], merged.config.mudsc["refit_lambda"]) == ("ridge", 0.01)
    recipe = merged.merge_report.recipe
    assert (recipe["refit"], recipe["refit_lambda"]) == ("ridge", 0.01)
    path = Recipe(models=["a", "b"], calibration="c", refit="ridge", refit_lambda=0.01).save(tmp_path / "r.yaml")
    assert yaml.safe_load(path.read_text())["refit"] == "ridge"
    loaded = Recipe.load(path)
    assert (loaded.refit, loaded.refit_lambda) == ("ridge", 0.01)
    card = str(render_card(merged, loaded))
    assert "| Refit / ridge λ (relative) / examples | ridge / 0.01 / auto: 16 examples |" in card  # all 16 given
    plain = hf_mudsc.merge([model_a, model_b], batches, refit="none", progress=False)
    assert (plain.config.mudsc["refit"], plain.config.mudsc["refit_lambda"]) == ("none", None)
    assert plain.merge_report.refit is None
    plain_card = str(render_card(plain, Recipe(models=["a", "b"])))
    assert "| Refit / ridge λ (relative) / examples | none / — / — |" in plain_card

    args = build_parser().parse_args(["merge", "a", "b", "--calibration", "c", "-o", "o", "--refit", "ridge",
                                      "--refit-lambda", "0.5"])
    assert (build_recipe(args).refit, build_recipe(args).refit_lambda) == ("ridge", 0.5)


def test_cli_merge_with_refit_writes_it_to_config_recipe_and_card_and_the_recipe_reproduces_it(tmp_path):
    from safetensors.torch import load_file

    from hf_mudsc.cli.main import main

    parents, calibration = vit_cli_case(tmp_path)
    out = tmp_path / "merged"
    assert main(["merge", *parents, "--calibration", calibration, "--method", "average",
                 "--refit", "ridge", "--refit-lambda", "0.01", "--batch-size", "8", "-o", str(out)]) == 0
    config = yaml.safe_load((out / "config.json").read_text())["mudsc"]
    assert (config["refit"], config["refit_lambda"]) == ("ridge", 0.01)
    recipe = Recipe.load(out / "mudsc_recipe.yaml")
    assert (recipe.refit, recipe.refit_lambda) == ("ridge", 0.01)
    assert (config["refit_samples"], config["refit_examples"]) == ("auto", 24)  # the floor, 128, > the 24 images
    assert "| Refit / ridge λ (relative) / examples | ridge / 0.01 / auto: 24 examples |" in (out / "README.md"
                                                                                             ).read_text()
    again = tmp_path / "again"
    assert main(["merge", "--recipe", str(out / "mudsc_recipe.yaml"), "-o", str(again)]) == 0
    first, second = load_file(out / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    plain = tmp_path / "plain"
    assert main(["merge", "--recipe", str(out / "mudsc_recipe.yaml"), "--refit", "none", "-o", str(plain)]) == 0
    assert not torch.equal(load_file(plain / "model.safetensors")["classifier.weight"], first["classifier.weight"])


def test_average_with_refit_uses_the_calibration_data():
    model_a, model_b = make_model("vit_cls", seed=1), make_model("vit_cls", seed=2)
    batches = make_batches("vit_cls", num_batches=2)
    plain = hf_mudsc.merge([model_a, model_b], None, method="average", progress=False)
    refitted = hf_mudsc.merge([model_a, model_b], batches, method="average", refit="ridge", progress=False)
    assert len(refitted.merge_report.refit.layers) == 13
    assert refitted.merge_report.refit.examples == 32
    assert refitted.merge_report.num_samples == refitted.config.mudsc["num_calibration_samples"] == 32
    assert relative_error(model_output(refitted, batches[0]), model_output(plain, batches[0])) > 1e-2


# ----------------------------------------------------------------------------------- the default: auto


def test_default_refit_is_the_gate_for_unit_matching_merges_with_calibration_data(tmp_path):
    model_a, model_b = make_model("vit_cls", seed=1), make_model("vit_cls", seed=2)
    batches = make_batches("vit_cls", num_batches=2)
    default = hf_mudsc.merge([model_a, model_b], batches, method="mudsc", progress=False)
    gated = hf_mudsc.merge([model_a, model_b], batches, method="mudsc", refit="gate", progress=False)
    assert default.config.mudsc["refit"] == "gate" and default.merge_report.recipe["refit"] == "gate"
    assert default.config.mudsc["refit_samples"] == "auto" and len(default.merge_report.refit.layers) == 13
    # auto: the floor (128) is more than the 26 images not held out (every 5th of the 32 is held out for the gate)
    assert default.config.mudsc["refit_examples"] == 26
    assert default.config.mudsc["refit_gate"]["held_out_examples"] == 6
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), gated.state_dict().values()))
    card = str(render_card(default, Recipe(models=["a", "b"], calibration="c")))
    assert "| Refit / ridge λ (relative) / examples | gate: refit " in card and "/ 0.001 / auto: 26 examples |" in card
    for method in ("zipit", "activation_align", "weight_matching"):  # every unit-matching method
        assert hf_mudsc.merge([model_a, model_b], batches, method=method, progress=False
                              ).config.mudsc["refit"] == "gate", method


@pytest.mark.parametrize(("options", "data"), [
    ({"method": "average"}, True),  # no unit matching: nothing the refit would repair by default
    ({"method": "linear"}, True),
    ({"method": "regmean", "weights": [1.0, 3.0]}, True),  # the refit's targets would undo unequal weights
    ({"method": "weight_matching"}, False),  # unit matching without calibration data
    ({"method": "mudsc", "reference_compat": True}, True),  # the reference's merge, bit for bit
    ({"method": "mudsc"}, "iterator"),  # a one-shot stream cannot be read once per layer step
])
def test_default_refit_is_none_where_it_does_not_apply(options, data):
    model_a, model_b = make_model("vit_cls", seed=1), make_model("vit_cls", seed=2)
    batches = make_batches("vit_cls", num_batches=2)
    calibration = {True: batches, False: None, "iterator": iter(batches)}[data]
    merged = hf_mudsc.merge([model_a, model_b], calibration, progress=False, **options)
    assert merged.config.mudsc["refit"] == "none" and merged.merge_report.refit is None
    assert merged.merge_report.recipe["refit"] == "none"  # the recipe re-runs the same merge


def same_base_fine_tunes(kind: str = "vit_cls", seeds: tuple[int, ...] = (2, 3)) -> list[nn.Module]:
    """Small changes to one model: parents `check_mergeable` calls "shared base" (distance well below 0.5)."""
    tuned = []
    for seed in seeds:
        model = make_model(kind, seed=1)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.01 * param.std().nan_to_num() * torch.randn(param.shape, generator=generator))
        tuned.append(model)
    return tuned


@pytest.mark.parametrize("seeds", [(2, 3), (2, 3, 4)])
def test_default_refits_after_the_data_method_auto_picks_for_same_base_fine_tunes(seeds):
    """Fine-tunes of one base with calibration data: method="auto" picks regmean and refit="auto" refits after it
    (issue 12: measured on the same-init digit ViTs, two and three parents, docs/design.md §4.9,
    docs/benchmarks/same_init_three.md) — the same merge as asking for both."""
    tuned = same_base_fine_tunes(seeds=seeds)
    batches = make_batches("vit_cls", num_batches=2)
    merged = hf_mudsc.merge(tuned, batches, progress=False)
    mudsc = merged.config.mudsc
    assert mudsc["method"] == "regmean" and mudsc["refit"] == "gate"
    assert mudsc["method_choice_reason"].startswith("parents share a base, so the identity correspondence holds and "
                                                    "calibration data is given (relative weight distance ")
    assert mudsc["method_choice_reason"].endswith("): regmean")
    assert merged.merge_report.recipe["refit"] == "gate"  # the recipe re-runs the same merge
    assert len(merged.merge_report.refit.layers) == 13
    asked = hf_mudsc.merge(tuned, batches, method="regmean", refit="gate", progress=False)
    plain = hf_mudsc.merge(tuned, batches, method="regmean", refit="none", progress=False)
    assert all(torch.equal(a, b) for a, b in zip(merged.state_dict().values(), asked.state_dict().values()))
    unrefitted = all(torch.equal(a, b) for a, b in zip(merged.state_dict().values(), plain.state_dict().values()))
    assert unrefitted is not mudsc["refit_gate"]["kept"]  # kept: the refitted weights; dropped: regmean's


@pytest.mark.parametrize("kind", ["vit_cls", "bert_cls"])
def test_default_merge_of_a_model_with_itself_returns_that_model(kind):
    """Identical parents (relation "same model"): regmean returns the model and the refit's targets are its own
    outputs, so the refit keeps it — weights and outputs."""
    model = make_model(kind, seed=4)
    batches = make_batches(kind, num_batches=2)
    merged = hf_mudsc.merge([model, model], batches, progress=False)
    assert merged.config.mudsc["method"] == "regmean" and merged.config.mudsc["refit"] == "gate"
    assert merged.config.mudsc["parent_relation"]["relation"] == "same model"
    expected = model.state_dict()
    for name, tensor in merged.state_dict().items():  # float32 rounding of the refit's targets: ~1e-5 of the tensor
        error = float((tensor - expected[name]).abs().max())
        assert error <= 5e-5 * max(float(expected[name].abs().max()), 1e-3), (name, error)
    assert relative_error(model_output(merged, batches[0]), model_output(model, batches[0])) < 1e-5


def test_a_data_method_then_the_refit_records_the_examples_the_method_read():
    """regmean reads every calibration example, the refit a subset: the config records the method's count."""
    tuned = same_base_fine_tunes()
    batches = make_batches("vit_cls", num_batches=2)  # 32 examples
    merged = hf_mudsc.merge(tuned, batches, refit_samples=8, progress=False)
    assert merged.config.mudsc["refit"] == "gate" and merged.merge_report.refit.examples == 8
    assert merged.config.mudsc["num_calibration_samples"] == merged.merge_report.num_samples == 32


def test_default_refit_is_none_after_a_data_method_whose_parents_are_weighted_unequally():
    """Unequal `weights` keep the data method's merge: measured on the same-init digit ViTs with weights (2, 1) and
    (1, 2), the refit tied regmean alone on joint at best and fell below the weighted plain average at width 256
    (docs/benchmarks/same_init_three.md)."""
    tuned = same_base_fine_tunes()
    batches = make_batches("vit_cls", num_batches=2)
    merged = hf_mudsc.merge(tuned, batches, weights=[1.0, 3.0], progress=False)
    assert merged.config.mudsc["method"] == "regmean" and merged.config.mudsc["refit"] == "none"
    assert merged.merge_report.refit is None
    equal = hf_mudsc.merge(tuned, batches, weights=[2.0, 2.0], progress=False)  # equal weights: the refit runs
    assert equal.config.mudsc["refit"] == "gate"


def test_a_refit_asked_for_after_a_data_method_of_unequally_weighted_parents_targets_their_weighted_mean():
    """Three same-base parents weighted (1, 2, 5), one label set: regmean, then `refit="ridge"` fits every layer
    toward the weighted mean of the parents' outputs (identity maps, `refit.target_maps`), so the merged logits
    move toward the weighted mean of the parents' logits, 20x closer to it than to their unweighted mean."""
    tuned = same_base_fine_tunes(seeds=(2, 3, 4))
    batches = make_batches("vit_cls", num_batches=2)
    weights = [1.0, 2.0, 5.0]
    plain = hf_mudsc.merge(tuned, batches, weights=weights, progress=False)
    refitted = hf_mudsc.merge(tuned, batches, weights=weights, refit="ridge", progress=False)
    assert plain.config.mudsc["refit"] == "none" and refitted.config.mudsc["refit"] == "ridge"
    assert refitted.config.mudsc["method"] == "regmean"
    outputs = [model_output(parent, batches[0]) for parent in tuned]
    weighted = sum(w * out for w, out in zip(weights, outputs)) / sum(weights)
    unweighted = sum(outputs) / len(outputs)
    error = relative_error(model_output(refitted, batches[0]), weighted)
    assert error < 0.3 * relative_error(model_output(plain, batches[0]), weighted)
    assert 20 * error < relative_error(model_output(refitted, batches[0]), unweighted)


@pytest.mark.parametrize(("matches_units", "reads_data", "num_parents", "weights", "expected"), [
    (True, False, 2, None, "gate"),  # unit matching (mudsc, zipit, ...)
    (False, True, 2, None, "gate"),  # a data method (regmean, regmean_plusplus, fisher): parents count equally
    (False, True, 2, [1.0, 1.0], "gate"),
    (False, True, 3, None, "gate"),  # three same-base parents: measured, docs/benchmarks/same_init_three.md
    (False, True, 3, [2.0, 2.0, 2.0], "gate"),
    (False, True, 5, None, "gate"),  # any N: the targets are the mean of N parents' outputs, as for matching
    (False, True, 2, [1.0, 3.0], "none"),  # unequal weights: measured no better than the data method alone
    (False, True, 3, [2.0, 1.0, 1.0], "none"),
    (True, False, 3, [2.0, 1.0, 1.0], "gate"),  # unit matching refits whatever the weights
    (False, False, 2, None, "none"),  # a tensor-wise method (linear, ties, ...): no data of its own
    (False, False, 3, None, "none"),
])
def test_resolve_refit_auto(matches_units, reads_data, num_parents, weights, expected):
    from hf_mudsc.options import resolve_refit

    common = {"has_data": True, "num_parents": num_parents, "reference_compat": False}
    assert resolve_refit("auto", matches_units=matches_units, reads_data=reads_data, weights=weights,
                         **common) == expected
    assert resolve_refit("auto", matches_units=matches_units, reads_data=reads_data, weights=weights,
                         **{**common, "reference_compat": True}) == "none"
    assert resolve_refit("auto", matches_units=matches_units, reads_data=reads_data, weights=weights,
                         **{**common, "has_data": False}) == "none"


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("options", "message"), [
    ({"refit": "bogus"}, "unknown refit 'bogus'; choose one of: auto, none, ridge, gate, repair (CLI: --refit)"),
    ({"refit": "ridge", "refit_lambda": 0}, "refit_lambda must lie in (0, 1e+30] (CLI: --refit-lambda)"),
    ({"refit": "ridge", "refit_lambda": float("nan")}, "refit_lambda must lie in (0, 1e+30]"),
    ({"refit": "ridge", "reference_compat": True},
     "refit='ridge' changes the merged weights, which reference_compat=True must keep equal to the reference's; "
     "drop one of --refit / --reference-compat"),
    ({"refit": "ridge", "method": "average"}, "refit='ridge' needs calibration data"),
])
def test_bad_refit_options_are_refused_before_loading(options, message):
    with pytest.raises(MergeInputError) as caught:
        hf_mudsc.merge(MISSING, None, **options)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_refit_refuses_a_one_shot_iterator_before_loading():
    batches = iter(make_batches("vit_cls", num_batches=1))
    with pytest.raises(MergeInputError, match=r"reads the calibration data once per layer step"):
        hf_mudsc.merge(MISSING, batches, refit="ridge")


class ReadOnce:
    """An iterable (not an iterator) that yields its batches only the first time: a stream that cannot be re-read."""

    def __init__(self, batches: list[dict]) -> None:
        self.batches = batches

    def __iter__(self):
        batches, self.batches = self.batches, []
        return iter(batches)


def test_refit_refuses_calibration_data_that_cannot_be_read_again():
    from hf_mudsc.errors import CalibrationError

    model_a, model_b = make_model("vit_cls", seed=1), make_model("vit_cls", seed=2)
    # refused before any pass (a second read's first batch is read up front since session 24)
    with pytest.raises(CalibrationError, match=r"^the calibration data gave no batches when read a second time \(an "
                                               r"iterable that can be read once\); the merge reads it more than once"):
        hf_mudsc.merge([model_a, model_b], ReadOnce(make_batches("vit_cls", num_batches=1)), refit="ridge",
                       progress=False)


@pytest.mark.parametrize(("extra", "message"), [
    (["--refit", "ridge", "--reference-compat"], "drop one of --refit / --reference-compat"),
    (["--refit", "ridge", "--method", "average"], "needs calibration data: pass --calibration"),
])
def test_cli_refuses_contradicting_refit_options(extra, message):
    args = build_parser().parse_args(["merge", "a", "b", "-o", "o", *extra])
    with pytest.raises(RecipeError, match=message):
        build_recipe(args)


def test_recipe_with_a_bad_refit_is_refused(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("models: [a, b]\ncalibration: c\nrefit: bogus\n")
    with pytest.raises(RecipeError,
                       match=r"unknown refit 'bogus'; choose one of: auto, none, ridge, gate, repair \(CLI: --refit\)"):
        Recipe.load(path).validate()


# ------------------------------------------------------------------------ improvement on a different-init pair


@pytest.mark.slow  # trains the toy pair and merges 512 images: a quality check at benchmark size
def test_refit_lifts_a_different_init_merge_of_the_toy_digit_vits(digit_pair_cache):
    from hf_mudsc.evaluate.harness import evaluate_merge
    from hf_mudsc.testing import toy

    pair = toy.trained_digit_pair(range(5), range(5, 10), seeds=(0, 1), hidden_size=64,
                                  cache_dir=digit_pair_cache)
    pair.model_a.config._name_or_path = "digits-0-4"
    pair.model_b.config._name_or_path = "digits-5-9"
    splits = pair.splits
    calibration = list(toy.digit_calibration_batches(splits, num_samples=512, batch_size=64))
    merged = {name: hf_mudsc.merge([pair.model_a, pair.model_b], calibration, refit=refit, progress=False)
              for name, refit in (("plain", "none"), ("refit", "ridge"))}
    report = merged["refit"].merge_report.refit
    assert report.shared_basis < 0.5 and not report.head_kept  # different bases: the head is refitted
    tests = {"digits-0-4": (splits.task_a.test_pixel_values, splits.task_a.test_labels),
             "digits-5-9": (splits.task_b.test_pixel_values, splits.task_b.test_labels)}
    result = evaluate_merge(merged, [pair.model_a, pair.model_b], tests, progress=False)
    print("\n" + result.table())
    print(f"refit: {len(report.layers)} layers in {len(report.steps)} steps, {report.seconds:.2f} s; "
          f"shared-basis score {report.shared_basis:.3f}")
    assert result.score("ensemble", "joint") >= 0.7
    plain, refit = result.score("plain", "joint"), result.score("refit", "joint")
    assert refit >= plain + 0.15, f"joint with refit {refit:.3f} vs without {plain:.3f}"
    assert result.score("refit", "average") >= result.score("plain", "average") + 0.15


def test_a_ridge_too_weak_for_rank_deficient_data_is_one_line_naming_the_layer():
    """`refit_lambda` is valid in (0, 1e30], but 1e-300 does not regularise a Gram of one example's few rows: the
    merge ended in torch's `LinAlgError: ... the input matrix is singular` traceback. Now one line (a ValueError the
    CLI prints) naming the layer and the fix."""
    from hf_mudsc.errors import CalibrationError

    parents = [make_model("bert_cls", seed) for seed in (1, 2)]
    one = [{k: v[:1] for k, v in make_batches("bert_cls", num_batches=1)[0].items()}]
    with pytest.raises(CalibrationError, match=r"^refit: the least squares of layer '[\w.]+' is singular at "
                                               r"refit_lambda=1e-300 \(\d+ rows for \d+ inputs\); raise "
                                               r"refit_lambda= \(CLI: --refit-lambda\) \(default 0\.001\) or pass "
                                               r"more varied calibration data$"):
        hf_mudsc.merge(parents, one, method="zipit", refit="ridge", refit_lambda=1e-300, progress=False)
    merged = hf_mudsc.merge(parents, one, method="zipit", refit="ridge", progress=False)  # the default ridge copes
    assert all(torch.isfinite(p).all() for p in merged.parameters())
