"""`size_spend="heads"` (docs/design.md §4.12): a size budget spent on whole attention heads and the residual stream
first (hidden_size and num_attention_heads grow together, head_dim kept), the rest on MLP units."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from cli_runs import run_cli
from factories import make_batches, make_model, permuted_copy, with_new_head
from readme_examples import readme_example
from transformers import AutoModelForImageClassification

import hf_mudsc
from hf_mudsc.architectures import spec_for
from hf_mudsc.errors import MergeInputError
from hf_mudsc.solve.maps import GroupMaps
from hf_mudsc.solve.matchers import Match, attention_head_scores
from hf_mudsc.solve.widen import parameter_count, plan_stream, unfuse_heads, weakest_head_pairs

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: OpenMP start-up dominates on 2 busy cores


@pytest.fixture(scope="module")
def vit_pair():
    return make_model("vit_cls", seed=0), make_model("vit_cls", seed=1), make_batches("vit_cls", num_batches=6)


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def vit_parameters(hidden: int, intermediate: int, *, attention: int | None = None, layers: int = 2, labels: int = 3,
                   patches: int = 16, channels: int = 1, patch: int = 4) -> int:
    """A ViTForImageClassification's parameter count by hand (the factories' toy: 16x16 images, 4x4 patches);
    `attention`: the heads' total width (heads x head_dim), the stream's by default."""
    attention = hidden if attention is None else attention
    embeddings = hidden + (patches + 1) * hidden + hidden * channels * patch * patch + hidden
    block = 3 * (hidden * attention + attention) + (attention * hidden + hidden) + 2 * 2 * hidden + (
        hidden * intermediate + intermediate) + (intermediate * hidden + hidden)
    return embeddings + layers * block + 2 * hidden + labels * hidden + labels


@pytest.mark.parametrize("size", [1.25, 1.5, 2.0])
def test_heads_plan_counts_exactly_and_no_head_or_unit_more_fits(vit_pair, size):
    """The toy ViT: hidden 32 = 4 heads of 8, intermediate 48, 2 layers. Every width and the count by hand."""
    a, b, batches = vit_pair
    parent = count(a)
    assert parent == vit_parameters(32, 48)
    merged = hf_mudsc.merge([a, b], batches, method="mudsc", size=size, size_spend="heads", refit="none",
                            progress=False)
    config = merged.config
    heads = config.num_attention_heads - 4
    extra = config.intermediate_size - 48
    assert config.hidden_size == 32 + 8 * heads and config.hidden_size // config.num_attention_heads == 8
    total = count(merged)
    assert total == vit_parameters(config.hidden_size, config.intermediate_size) <= math.floor(size * parent)
    # Maximal: one more head does not fit (with no MLP unit), and one more MLP unit does not fit at these heads.
    assert heads == 4 or vit_parameters(32 + 8 * (heads + 1), 48) > math.floor(size * parent)
    assert extra == 48 or vit_parameters(config.hidden_size, config.intermediate_size + 1) > math.floor(size * parent)
    assert heads == {1.25: 0, 1.5: 1, 2.0: 2}[size]
    budget = config.mudsc["size_budget"]
    assert budget["num_parameters"] == total and budget["parent_parameters"] == parent
    if heads:
        assert budget["extra_units"] == {"hidden_size": 8 * heads, "num_attention_heads": heads,
                                         "intermediate_size": extra}
        assert budget["widths"] == {"hidden_size": config.hidden_size, "num_attention_heads": 4 + heads,
                                    "intermediate_size": config.intermediate_size}
    else:  # 1.25: no head fits, all of it goes to MLP units, as size_spend="mlp" spends it
        mlp = hf_mudsc.merge([a, b], batches, method="mudsc", size=size, refit="none", progress=False)
        assert budget == mlp.config.mudsc["size_budget"]
        assert all(torch.equal(t, mlp.state_dict()[n]) for n, t in merged.state_dict().items())
    plan = plan_stream(spec_for(a), [dict(a.named_parameters()), dict(b.named_parameters())], size, "heads")
    assert plan.num_parameters == total and plan.extra == budget["extra_units"]
    assert config.mudsc["size_spend"] == "heads"


@pytest.mark.parametrize("size", [1.25, 1.5, 2.0])
def test_residual_plan_counts_exactly_and_no_unit_more_fits(vit_pair, size):
    """`size_spend="residual"`: the stream alone grows (4 heads of 8 kept, `head_dim` pinned in the config)."""
    a, b, batches = vit_pair
    parent = count(a)
    merged = hf_mudsc.merge([a, b], batches, method="mudsc", size=size, size_spend="residual", refit="none",
                            progress=False)
    config = merged.config
    hidden, inner = config.hidden_size, config.intermediate_size
    assert (config.num_attention_heads, config.head_dim) == (4, 8)
    assert merged.vit.layers[0].attention.q_proj.weight.shape == (32, hidden)
    total = count(merged)
    limit = math.floor(size * parent)
    assert total == vit_parameters(hidden, inner, attention=32) <= limit
    assert hidden == 64 or vit_parameters(hidden + 1, 48, attention=32) > limit
    assert inner == 96 or vit_parameters(hidden, inner + 1, attention=32) > limit
    assert hidden == {1.25: 40, 1.5: 48, 2.0: 64}[size]
    budget = config.mudsc["size_budget"]
    assert budget["num_parameters"] == total
    assert budget["extra_units"] == {"hidden_size": hidden - 32, "intermediate_size": inner - 48}
    plan = plan_stream(spec_for(a), [dict(a.named_parameters()), dict(b.named_parameters())], size, "residual")
    assert plan.num_parameters == total and plan.extra == budget["extra_units"]


def test_residual_round_trip_pins_head_dim(vit_pair, tmp_path):
    a, b, batches = vit_pair
    merged = hf_mudsc.merge([a, b], batches, method="mudsc", size=1.5, size_spend="residual", progress=False)
    folder = hf_mudsc.save_merged(merged, tmp_path / "wide")
    loaded = AutoModelForImageClassification.from_pretrained(folder)
    assert (loaded.config.hidden_size, loaded.config.num_attention_heads, loaded.config.head_dim) == (48, 4, 8)
    with torch.no_grad():
        assert torch.equal(loaded(**batches[0]).logits, merged(**batches[0]).logits)


def test_heads_round_trip_with_the_stock_class(vit_pair, tmp_path):
    a, b, batches = vit_pair
    merged = hf_mudsc.merge([a, b], batches, method="mudsc", size=2.0, size_spend="heads", progress=False)
    folder = hf_mudsc.save_merged(merged, tmp_path / "wide")
    loaded = AutoModelForImageClassification.from_pretrained(folder)
    assert type(loaded) is type(a)
    assert (loaded.config.hidden_size, loaded.config.num_attention_heads) == (48, 6)
    assert loaded.config.intermediate_size == merged.config.intermediate_size > 48
    assert loaded.vit.layers[1].attention.q_proj.weight.shape == (48, 48)
    assert loaded.vit.embeddings.position_embeddings.shape == (1, 17, 48)
    with torch.no_grad():
        assert torch.equal(loaded(**batches[0]).logits, merged(**batches[0]).logits)
    card = (Path(folder) / "README.md").read_text()
    row = next(line for line in card.splitlines() if "Size budget" in line)
    assert "hidden_size 48 (+16 units kept unfused)" in row and f"{count(loaded):,} parameters" in row
    assert "size_spend: heads" in (Path(folder) / "mudsc_recipe.yaml").read_text()


def test_size_one_is_bitwise_the_paper_merge_whatever_the_spend(vit_pair):
    a, b, batches = vit_pair
    plain = hf_mudsc.merge([a, b], batches, method="mudsc", progress=False)
    heads = hf_mudsc.merge([a, b], batches, method="mudsc", size=1.0, size_spend="heads", progress=False)
    assert plain.state_dict().keys() == heads.state_dict().keys()
    assert all(torch.equal(t, heads.state_dict()[name]) for name, t in plain.state_dict().items())
    assert heads.config.mudsc["size_budget"] == plain.config.mudsc["size_budget"]
    assert heads.config.hidden_size == 32 and heads.config.num_attention_heads == 4


def test_weakest_head_pairs_known_answer():
    scores = torch.tensor([[0.9, 0.1, 0.0],
                           [0.2, 0.3, 0.8],
                           [0.1, 0.4, 0.2]], dtype=torch.float64)
    pairing = (0, 2, 1)  # pair scores 0.9, 0.8, 0.4
    assert weakest_head_pairs(scores, pairing, 0) == []
    assert weakest_head_pairs(scores, pairing, 1) == [2]
    assert weakest_head_pairs(scores, pairing, 2) == [1, 2]
    assert weakest_head_pairs(torch.zeros(3, 3), pairing, 2) == [0, 1]  # ties: lower head first


def test_head_scores_of_hand_made_similarities_pick_the_weakest_pair():
    """Two heads of two units per parent; A head 0 ~ B head 1 strongly (0.9), A head 1 ~ B head 0 weakly (0.3 on
    q/k, 0.5 on v): the summed score unfuses the pair (A1, B0)."""

    def similarity(strong: float, weak: float) -> torch.Tensor:
        c = torch.eye(8, dtype=torch.float64)
        for i, j, v in ((0, 6, strong), (1, 7, strong), (2, 4, weak), (3, 5, weak)):
            c[i, j] = c[j, i] = v
        return c

    scores = torch.as_tensor(attention_head_scores(similarity(0.9, 0.3), 2)) + torch.as_tensor(
        attention_head_scores(similarity(0.9, 0.5), 2))
    assert torch.allclose(scores, torch.tensor([[0.0, 1.8], [0.8, 0.0]], dtype=torch.float64))
    assert weakest_head_pairs(scores, (1, 0), 1) == [1]


def test_unfuse_heads_known_answer():
    """Two heads of two units: A head 0 + B head 1 and A head 1 + B head 0, zipped (A1 and A0 fused in one column,
    B3 alone, ...). Unfusing A head 1's pair: A head 1 keeps merged head 1, one column per unit; B head 0 is new
    merged head 2; the other pair is untouched."""
    # Units [A0 A1 A2 A3; B0 B1 B2 B3]; head pairing (1, 0): merged head 0 = A head 0 + B head 1 (units 0,1 / 6,7),
    # merged head 1 = A head 1 + B head 0 (units 2,3 / 4,5) with zip clusters {A2, A3}, {B4, B5}.
    found = Match(cluster_of=torch.tensor([0, 1, 2, 2, 3, 3, 0, 1]),
                  merge_weight=torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5], dtype=torch.float64),
                  num_merged=4, value=0.6, head_pairing=(1, 0))
    assert unfuse_heads(found, [], 2) is found
    one = unfuse_heads(found, [1], 2)
    assert one.num_merged == 6 and one.value == 0.6 and one.head_pairing == (1, 0)
    assert one.cluster_of.tolist() == [0, 1, 2, 3, 4, 5, 0, 1]
    assert one.merge_weight.tolist() == [0.5, 0.5, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5]
    both = unfuse_heads(found, [0, 1], 2)
    # A head 0 -> columns 0,1; A head 1 -> 2,3; B head 1 (partner of A0) -> new head 2 (4,5); B head 0 -> head 3.
    assert both.cluster_of.tolist() == [0, 1, 2, 3, 6, 7, 4, 5]
    assert both.merge_weight.tolist() == [1.0] * 8
    with pytest.raises(ValueError, match="head pairs"):
        unfuse_heads(Match(cluster_of=torch.tensor([0, 1, 0, 1]), merge_weight=torch.full((4,), 0.5,
                                                                                            dtype=torch.float64),
                           num_merged=2, value=0.0), [0], 2)


def test_parameter_count_counts_both_grown_axes():
    model = make_model("vit_cls", seed=0)
    spec = spec_for(model)
    params = dict(model.named_parameters())
    stream = [spec.group_index("residual")] + [i for i, g in enumerate(spec.groups) if g.num_heads > 1]
    widths = {i: 40 for i in stream}
    assert parameter_count(spec, [params], widths) == vit_parameters(40, 48)
    assert parameter_count(spec, [params], {}) == count(model)


@pytest.mark.parametrize(("matcher", "spend"), [("zip", "heads"), ("align", "heads"), ("zip", "residual"),
                                                 ("align", "residual")])
def test_permuted_copy_every_sublayer_is_the_parents_on_the_duplicated_stream(matcher, spend):
    """A permuted copy at size 2 (heads: 2 heads of 8 and 16 stream units kept twice; residual: all 32 stream
    units kept twice, heads fused). Exact: every attention and MLP
    sublayer of the merged model, fed the parents' sublayer input in the merged basis (each unit's value, kept
    units twice), gives the parents' output in the merged basis — an unfused head pair is the head twice with
    half its o_proj columns each, a kept stream unit is read with half its q/k/v/fc1 columns. The whole model is
    exact only when every stream unit is kept twice (residual at size 2): otherwise LayerNorm's mean and variance
    weigh the duplicated units double."""
    model = make_model("vit_cls", seed=0)
    spec = spec_for(model)
    permuted = permuted_copy(model, spec, seed=1)
    batches = make_batches("vit_cls")
    merged = hf_mudsc.merge([model, permuted], batches, method="mudsc", matcher=matcher, size=2.0,
                            size_spend=spend, refit="none", progress=False)
    hidden = merged.config.hidden_size
    assert (hidden, merged.config.num_attention_heads) == ((48, 6) if spend == "heads" else (64, 4))
    maps = GroupMaps.from_match(merged.merge_report.matches[spec.group_index("residual")])
    # Every kept stream unit is a unit and its twin: each merged column holds one A unit (fused pair or A's copy)
    # or none (B's copy).
    found = merged.merge_report.matches[spec.group_index("residual")]
    assert sorted(torch.bincount(found.cluster_of[:32], minlength=hidden).tolist()) == [0] * (hidden - 32) + [1] * 32

    def to_merged(x_a: torch.Tensor, x_b: torch.Tensor) -> torch.Tensor:
        return ((maps.merge2[0].apply(x_a.double(), -1) + maps.merge2[1].apply(x_b.double(), -1)) / 2).float()

    captured: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(module, args, output):
            captured[name + ".in"] = args[0].detach()
            captured[name + ".out"] = (output[0] if isinstance(output, tuple) else output).detach()
        return hook

    errors = []
    for layer in range(2):
        for part in ("attention", "mlp"):
            handles = [getattr(m.vit.layers[layer], part).register_forward_hook(keep(side))
                       for side, m in (("a", model), ("b", permuted))]
            with torch.no_grad():
                model(**batches[0])
                permuted(**batches[0])
                for handle in handles:
                    handle.remove()
                module = getattr(merged.vit.layers[layer], part)
                got = module(to_merged(captured["a.in"], captured["b.in"]))
                got = got[0] if isinstance(got, tuple) else got
            expected = to_merged(captured["a.out"], captured["b.out"])
            errors.append(float((got - expected).abs().max() / expected.abs().max()))
    assert max(errors) < 1e-5, errors
    with torch.no_grad():
        whole = float((merged(**batches[0]).logits - model(**batches[0]).logits).abs().max()
                      / model(**batches[0]).logits.abs().max())
    if spend == "residual":  # every stream unit twice: LayerNorm's mean and variance are the parent's, exact
        assert whole < 1e-5
    else:  # half of the units twice: LayerNorm's statistics weigh them double, the known, documented difference
        assert whole > 1e-4


def test_heads_refused_for_bert_and_three_parents_in_one_line():
    a, b = make_model("bert_cls", seed=0), make_model("bert_cls", seed=1)
    refused = r"size_spend= \(CLI: --size-spend\) 'heads' widens the residual stream, which only ViT"
    with pytest.raises(MergeInputError, match=refused) as error:
        hf_mudsc.merge([a, b], make_batches("bert_cls"), method="mudsc", size=1.5, size_spend="heads",
                       progress=False)
    assert "\n" not in str(error.value)
    vits = [make_model("vit_cls", seed=s) for s in range(3)]
    with pytest.raises(MergeInputError, match="merges two parents, got 3"):
        hf_mudsc.merge(vits, make_batches("vit_cls"), method="mudsc", size=1.5, size_spend="heads", progress=False)
    # size 1: nothing is spent, so nothing is refused
    hf_mudsc.merge([a, b], make_batches("bert_cls"), method="mudsc", size_spend="heads", refit="none",
                   progress=False)


def test_concatenated_heads_count_with_the_widened_stream():
    a = make_model("vit_cls", seed=0, num_labels=3)
    b = with_new_head(make_model("vit_cls", seed=1, num_labels=3), 5, seed=2)
    merged = hf_mudsc.merge([a, b], make_batches("vit_cls"), method="mudsc", size=1.6, size_spend="heads",
                            refit="none", progress=False)
    hidden, inner = merged.config.hidden_size, merged.config.intermediate_size
    assert hidden == 40 and merged.classifier.weight.shape == (8, 40)
    assert count(merged) == vit_parameters(hidden, inner, labels=8) <= math.floor(1.6 * count(b))
    assert merged.config.mudsc["size_budget"]["num_parameters"] == count(merged)


def test_cli_refuses_a_bad_spend_in_one_line(tmp_path, capsys):
    """An unknown spend is a usage error (exit 2, as every choice flag's); a stream spend on BERT exits 1 before the
    weights are merged, nothing written."""
    parents = []
    for seed in (0, 1):
        make_model("bert_cls", seed=seed).save_pretrained(tmp_path / f"p{seed}")
        parents.append(str(tmp_path / f"p{seed}"))
    for flags, code, needle in (
            (["--size-spend", "wide"], 2, "invalid choice: 'wide'"),
            (["--method", "weight_matching", "--size", "1.5", "--size-spend", "residual"], 1,
             "size_spend= (CLI: --size-spend) 'residual' widens the residual stream, which only ViT supports")):
        returned, lines = run_cli(["merge", *parents, *flags, "--output", str(tmp_path / "out")], capsys)
        assert returned == code, lines
        # exit 2: argparse's usage, then its one error line (as for every choice flag, e.g. --refit)
        assert (len(lines) == 1 or code == 2) and needle in lines[-1], lines
        assert not (tmp_path / "out").exists()


def test_cli_refuses_stream_spend_conflicts_before_reading_any_parent(tmp_path, capsys):
    """Three parents, or `heads` with `independent_heads`: refused by the method's option check before the
    calibration data and the parents are opened (neither exists: opening them would fail with another message); exit 2,
    as every recipe error."""
    missing = [str(tmp_path / name) for name in ("a", "b", "c")]
    for parents, flags, needle in (
            (missing, ["--size-spend", "residual"], "size_spend= (CLI: --size-spend) 'residual' merges two parents"),
            (missing[:2], ["--size-spend", "heads", "--independent-heads"],
             "size_spend= (CLI: --size-spend) 'heads' unfuses head pairs"),
            # bug hunt s29: under method auto this was refused only after the parents' weights were read
            (missing[:2], ["--size-spend", "heads", "--independent-heads", "--method", "auto"],
             "'heads' unfuses head pairs")):
        method = [] if "--method" in flags else ["--method", "mudsc"]  # a flag given twice is refused (session 35)
        code, lines = run_cli(["merge", *parents, *method, "--size", "1.5", *flags, "--calibration",
                               str(tmp_path / "no-data"), "--output", str(tmp_path / "out")], capsys)
        assert code == 2 and len(lines) == 1 and needle in lines[0], lines
        assert not (tmp_path / "out").exists()


def test_cli_refuses_a_stream_spend_for_bert_before_opening_the_calibration_data(tmp_path, capsys):
    """The "ViT only" refusal reads the first parent's config: the CLI locates the parents (configs, no weights)
    before it pins or opens the calibration data. The data is a Hub dataset that does not exist (offline): opening
    it would fail with another message, and it would have been resolved for nothing. (A local path that is not there
    is refused before either, exit 2: tests/test_missing_inputs.py.)"""
    parents = []
    for seed in (0, 1):
        folder = tmp_path / f"bert-{seed}"
        make_model("bert_cls", seed).save_pretrained(folder)
        parents.append(str(folder))
    for spend in ("heads", "residual"):
        code, lines = run_cli(["merge", *parents, "--method", "mudsc", "--size", "1.5", "--size-spend", spend,
                               "--calibration", "org/never-opened:train", "--output", str(tmp_path / "out")], capsys)
        assert code == 1 and len(lines) == 1, lines
        assert f"size_spend= (CLI: --size-spend) '{spend}' widens the residual stream, which only ViT" in lines[0]
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("spend", ["heads", "residual"])
def test_the_dry_run_plans_what_the_merge_builds(spend):
    a, b = make_model("vit_cls", 1), make_model("vit_cls", 2)
    data = make_batches("vit_cls", num_batches=2, batch_size=8)
    plan = hf_mudsc.merge([a, b], data, method="mudsc", size=1.5, size_spend=spend, dry_run=True)
    merged = hf_mudsc.merge([a, b], data, method="mudsc", size=1.5, size_spend=spend, refit="none", progress=False)
    assert plan.size_budget == merged.config.mudsc["size_budget"]
    assert plan.size_budget["num_parameters"] == count(merged)
    assert f"hidden_size 32 -> {merged.config.hidden_size}" in str(plan)
    with pytest.raises(MergeInputError, match="only ViT"):
        hf_mudsc.merge([make_model("bert_cls", 0), make_model("bert_cls", 1)], make_batches("bert_cls"),
                       method="mudsc", size=1.5, size_spend=spend, dry_run=True)


def test_the_readme_size_spend_example_runs_and_gives_what_it_says(tmp_path, monkeypatch):
    python = readme_example("size-spend")
    monkeypatch.chdir(tmp_path)
    scope: dict = {"__name__": "readme_size_spend"}
    exec(compile(python, "README.md (size-spend example)", "exec"), scope)
    heads, residual, wide, parents = scope["heads"], scope["residual"], scope["wide"], scope["parents"]
    assert "# 40 5 76" in python and "# 48 8 64" in python
    assert (heads.config.hidden_size, heads.config.num_attention_heads, heads.config.intermediate_size) == (40, 5, 76)
    assert (residual.config.hidden_size, residual.config.head_dim, residual.config.intermediate_size) == (48, 8, 64)
    for model in (heads, residual):
        assert count(model) <= 1.5 * count(parents[0])
    with torch.no_grad():
        batch = scope["batches"][0]
        assert torch.equal(wide(**batch).logits, residual(**batch).logits)


@pytest.mark.parametrize("spend", ["heads", "residual"])
def test_every_unit_matching_method_and_refit_spend_the_stream(vit_pair, spend):
    a, b, batches = vit_pair
    parent = count(a)
    for options in ({"method": "weight_matching"}, {"method": "zipit"}, {"method": "activation_align"},
                    {"method": "mudsc", "refit": "ridge"}, {"method": "mudsc", "alpha": "auto"}):
        merged = hf_mudsc.merge([a, b], None if options["method"] == "weight_matching" else batches,
                                size=1.5, size_spend=spend, progress=False, **options)
        assert parent < count(merged) <= 1.5 * parent, options
        assert merged.config.hidden_size == (40 if spend == "heads" else 48), options
        with torch.no_grad():
            assert torch.isfinite(merged(**batches[0]).logits).all()


def test_heads_with_independent_heads_is_refused_before_loading():
    with pytest.raises(MergeInputError, match=r"independent_heads= \(CLI: --independent-heads\) pairs apart"):
        hf_mudsc.merge(["no/such-a", "no/such-b"], method="mudsc", size=1.5, size_spend="heads",
                       independent_heads=True, progress=False)
    with pytest.raises(MergeInputError, match=r"independent_heads= \(CLI: --independent-heads\) pairs apart"):
        hf_mudsc.merge(["no/such-a", "no/such-b"], size=1.5, size_spend="heads",  # method auto
                       independent_heads=True, progress=False)


def test_widen_stream_known_answer_on_hand_made_similarities():
    """The toy ViT's spec (stream 32 = 4 heads of 8), every group matched A_i <-> B_i, heads unpermuted. Hand-made
    similarities: stream unit u's twin scores 0.5 + u/100 (A0/B0 weakest); head pair j scores 0.9, 0.2, 0.7, 0.5 on
    q/k and on v (pair 1 weakest). At size 1.5 one head fits: A0..A7 leave their pairs (B0..B7 keep their columns),
    attention head pair 1 becomes merged heads 1 (A's) and 4 (B's) in both q/k and v."""
    from hf_mudsc.solve.widen import widen_stream

    model = make_model("vit_cls", seed=0)
    spec = spec_for(model)
    params = dict(model.named_parameters())
    plan = plan_stream(spec, [params, params], 1.5, "heads")
    assert plan.extra["num_attention_heads"] == 1 and plan.extra["hidden_size"] == 8

    def identity(group) -> Match:
        n = group.width
        return Match(cluster_of=torch.arange(n).repeat(2), merge_weight=torch.full((2 * n,), 0.5, dtype=torch.float64),
                     num_merged=n, value=0.0, head_pairing=tuple(range(group.num_heads)) if group.num_heads > 1
                     else None)

    matches = [identity(g) for g in spec.groups]
    head_score = [0.9, 0.2, 0.7, 0.5]

    def similarity_of(index: int) -> torch.Tensor:
        group = spec.groups[index]
        n = group.width
        c = torch.eye(2 * n, dtype=torch.float64)
        for u in range(n):
            value = head_score[u // (n // group.num_heads)] if group.num_heads > 1 else 0.5 + u / 100
            c[u, n + u] = c[n + u, u] = value
        return c

    widened = widen_stream(spec, matches, plan, similarity_of)
    residual = widened[spec.group_index("residual")]
    assert residual.num_merged == 40
    assert residual.cluster_of.tolist() == list(range(32, 40)) + list(range(8, 32)) + list(range(32))
    for index, group in enumerate(spec.groups):
        if group.num_heads > 1:
            found = widened[index]
            assert found.num_merged == 40
            b_columns = list(range(8)) + list(range(32, 40)) + list(range(16, 32))
            assert found.cluster_of.tolist() == list(range(32)) + b_columns, group.name
            assert found.merge_weight.tolist() == ([0.5] * 8 + [1.0] * 8 + [0.5] * 16) * 2
        elif group.width_key is not None:  # the MLP groups: the rest of the budget, as size_spend="mlp" would
            assert widened[index].num_merged == 48 + plan.extra["intermediate_size"]


@pytest.mark.parametrize("spend", ["mlp", "heads", "residual"])
def test_a_wider_vit_without_pooler_keeps_having_none(spend):
    """A constructor choice the config does not record (`ViTModel(add_pooling_layer=False)`) survives a widening
    (the merged model is built from the widened config, then mirrors A's absent modules)."""
    a, b = make_model("vit_nopool", seed=0), make_model("vit_nopool", seed=1)
    batches = make_batches("vit_nopool")
    merged = hf_mudsc.merge([a, b], batches, method="mudsc", size=1.5, size_spend=spend, refit="none",
                            progress=False)
    assert merged.pooler is None and a.pooler is None
    assert count(merged) <= 1.5 * count(a)
    assert merged.config.mudsc["size_budget"]["num_parameters"] == count(merged)
    with torch.no_grad():
        assert torch.isfinite(merged(**batches[0]).last_hidden_state).all()


def test_a_residual_widened_merge_can_be_a_parent_again(vit_pair, tmp_path):
    """A `size_spend="residual"` merge pins `head_dim` (its attention is narrower than its stream). Merged again —
    with itself, and widened by heads — its attention groups are read at their real width (heads × head_dim), not
    at hidden_size (this raised a SpecError before)."""
    a, b, batches = vit_pair
    wide = hf_mudsc.merge([a, b], batches, method="mudsc", size=1.5, size_spend="residual", progress=False)
    assert (wide.config.hidden_size, wide.config.num_attention_heads, wide.config.head_dim) == (48, 4, 8)
    again = hf_mudsc.merge([wide, copy.deepcopy(wide)], batches, method="mudsc", matcher="align", progress=False)
    with torch.no_grad():
        torch.testing.assert_close(again(**batches[0]).logits, wide(**batches[0]).logits, rtol=1e-5, atol=1e-5)
    grown = hf_mudsc.merge([wide, copy.deepcopy(wide)], batches, method="mudsc", size=2.0, size_spend="heads",
                           progress=False)
    heads = grown.config.num_attention_heads
    assert heads > 4 and grown.config.head_dim == 8 and grown.config.hidden_size == 48 + (heads - 4) * 8
    folder = hf_mudsc.save_merged(grown, tmp_path / "grown")
    loaded = AutoModelForImageClassification.from_pretrained(folder)
    assert loaded.vit.layers[0].attention.q_proj.weight.shape == (heads * 8, grown.config.hidden_size)
    with torch.no_grad():
        assert torch.equal(loaded(**batches[0]).logits, grown(**batches[0]).logits)


def test_a_stream_spend_whose_budget_buys_no_head_says_so_in_the_merge_and_its_dry_run(vit_pair, caplog):
    """QA s21: `--size 1.3 --size-spend heads` on a model whose one head costs more than the budget spent it all on
    MLP units in silence, and recorded `size_spend: heads` as if it had applied (log, card, dry run)."""
    import logging

    a, b, batches = vit_pair
    size = 1.05  # one head of the toy (hidden 32 = 4 heads of 8) costs ~1/4 of the attention and the stream: > 5 %
    plan = hf_mudsc.merge([a, b], batches, method="mudsc", size=size, size_spend="heads", dry_run=True)
    with caplog.at_level(logging.WARNING, logger="hf_mudsc"):
        merged = hf_mudsc.merge([a, b], batches, method="mudsc", size=size, size_spend="heads", refit="none",
                                progress=False)
    assert merged.config.num_attention_heads == 4 and merged.config.intermediate_size > 48  # all went to the MLP
    said = "size_spend='heads' (CLI: --size-spend heads) bought no attention head"
    assert any(said in text for text in merged.config.mudsc["warnings"]), merged.config.mudsc["warnings"]
    assert said in caplog.text and any(said in text for text in plan.warnings), plan.warnings
    fitting = hf_mudsc.merge([a, b], batches, method="mudsc", size=1.5, size_spend="heads", dry_run=True)
    assert not any("bought no" in text for text in fitting.warnings)
