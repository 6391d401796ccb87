"""The same-base, tensor-wise methods (methods/task_vector.py) through `hf_mudsc.merge` and the CLI.

Three fine-tunes are made by perturbing one base model; each method's merged model must hold exactly the tensors
the pure function of `hf_mudsc.solve.task_vectors` (checked against mergekit 0.1.5) computes with the method's
documented defaults — so the registry entry reads the right options under the right keywords.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from factories import classifier_names, make_model, with_new_head
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification

import hf_mudsc
from hf_mudsc.cli.main import main
from hf_mudsc.errors import MergeInputError
from hf_mudsc.methods import METHODS
from hf_mudsc.methods.task_vector import TensorWiseMethod
from hf_mudsc.option_values import parse_layer_swap
from hf_mudsc.options import MergeOptions
from hf_mudsc.publish.card import render_card
from hf_mudsc.publish.recipe import RECIPE_FILENAME
from hf_mudsc.publish.writer import recipe_of
from hf_mudsc.solve import task_vectors as tv

TENSOR_WISE = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
               "della", "della_linear", "slerp", "pcb", "consensus", "localize_stitch", "layer_swap")


pytestmark = pytest.mark.usefixtures("one_thread_module")


def fine_tune(base: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """A 'fine-tune' of `base`: every parameter moved by seeded noise (task vectors of mixed signs)."""
    model = type(base)(base.config)
    model.load_state_dict(base.state_dict())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return model.eval()


@pytest.fixture(scope="module")
def family():
    base = make_model("vit_cls", 0)
    return base, [fine_tune(base, seed) for seed in (11, 12, 13)]


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.named_parameters()}


def assert_state_equal(merged: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = params(merged)
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


# method, merge() keywords, the pure function's call (base, parents) -> state dict with the documented defaults
CASES = [
    ("linear", {"weights": [1.0, 2.0, 3.0]}, lambda b, p: tv.linear(None, p, [1.0, 2.0, 3.0], normalize=True)),
    ("task_arithmetic", {"scaling": 0.5}, lambda b, p: tv.task_arithmetic(b, p, None, normalize=False, scaling=0.5)),
    ("ties", {}, lambda b, p: tv.ties(b, p, None, density=0.2, normalize=True)),
    ("ties", {"weights": [1.0, 0.5, 2.0], "density": [0.3, 0.5, 0.7]},
     lambda b, p: tv.ties(b, p, [1.0, 0.5, 2.0], density=[0.3, 0.5, 0.7], normalize=True)),
    ("dare_linear", {"seed": 4}, lambda b, p: tv.dare_linear(b, p, None, density=0.5, normalize=False, seed=4)),
    ("dare_ties", {"rescale": False, "density": 0.7},
     lambda b, p: tv.dare_ties(b, p, None, density=0.7, rescale=False, normalize=False, seed=0)),
    ("breadcrumbs", {}, lambda b, p: tv.breadcrumbs(b, p, None, density=0.9, gamma=0.01, normalize=False)),
    ("breadcrumbs_ties", {"gamma": 0.05, "normalize": True},
     lambda b, p: tv.breadcrumbs_ties(b, p, None, density=0.9, gamma=0.05, normalize=True)),
    ("della", {}, lambda b, p: tv.della(b, p, None, density=0.5, epsilon=0.15, normalize=True, seed=0)),
    ("della_linear", {"epsilon": 0.1, "density": 0.6},
     lambda b, p: tv.della_linear(b, p, None, density=0.6, epsilon=0.1, normalize=False, seed=0)),
    ("pcb", {"pcb_ratio": 0.2}, lambda b, p: tv.pcb(b, p, None, pcb_ratio=0.2)),
    ("consensus", {}, lambda b, p: tv.consensus(b, p, None, k=2, tall_mask_lambda=0.6)),
    ("consensus", {"consensus_k": 1, "consensus_lambda": 0.3, "weights": [1.0, 1.0, 0.5]},
     lambda b, p: tv.consensus(b, p, [1.0, 1.0, 0.5], k=1, tall_mask_lambda=0.3)),
    ("localize_stitch", {}, lambda b, p: tv.localize_stitch(b, p, None, sparsity=0.1)),
]


@pytest.mark.parametrize(("method", "keywords", "expected"), CASES,
                         ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(CASES)])
def test_each_method_equals_its_pure_function_with_the_documented_defaults(family, method, keywords, expected):
    base, parents = family
    merged = hf_mudsc.merge(parents, base=base, method=method, progress=False, **keywords)
    assert_state_equal(merged, expected(params(base), [params(p) for p in parents]))
    assert merged.config.mudsc["method"] == method


def test_slerp_merges_two_parents_at_t(family):
    base, parents = family
    merged = hf_mudsc.merge(parents[:2], method="slerp", slerp_t=0.3, progress=False)
    assert_state_equal(merged, tv.slerp(None, [params(p) for p in parents[:2]], t=0.3))


def test_the_method_changes_the_weights_at_all(family):
    """Guard against a vacuous equality: ties and task arithmetic really move the base, differently."""
    base, parents = family
    ties = params(hf_mudsc.merge(parents, base=base, method="ties", progress=False))
    arithmetic = params(hf_mudsc.merge(parents, base=base, method="task_arithmetic", progress=False))
    name = "vit.layers.0.attention.q_proj.weight"
    assert not torch.equal(ties[name], params(base)[name])
    assert not torch.equal(ties[name], arithmetic[name])


def test_dare_masks_are_reproducible_under_seed_and_change_with_it(family):
    base, parents = family
    first = params(hf_mudsc.merge(parents, base=base, method="dare_ties", seed=3, progress=False))
    again = params(hf_mudsc.merge(parents, base=base, method="dare_ties", seed=3, progress=False))
    other = params(hf_mudsc.merge(parents, base=base, method="dare_ties", seed=4, progress=False))
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert any(not torch.equal(first[n], other[n]) for n in first)


def test_layer_swap_takes_the_listed_blocks_from_their_parents_and_the_rest_from_parent_0(family):
    _, parents = family
    merged = params(hf_mudsc.merge(parents, method="layer_swap", layer_swap="2:1", progress=False))
    zero, two = params(parents[0]), params(parents[2])
    block0 = [n for n in merged if ".layers.0." in n]
    block1 = [n for n in merged if ".layers.1." in n]
    rest = [n for n in merged if ".layers." not in n]
    assert block0 and block1 and "classifier.weight" in rest and "vit.embeddings.cls_token" in rest
    assert all(torch.equal(merged[n], zero[n]) for n in block0 + rest)
    assert all(torch.equal(merged[n], two[n]) for n in block1)


def test_layer_swap_known_answer_on_hand_made_state_dicts():
    parents = [{"emb": torch.full((2,), float(i)), "enc.layer.0.w": torch.full((2,), 10.0 + i),
                "enc.layer.1.w": torch.full((2,), 20.0 + i), "enc.layer.10.w": torch.full((1,), 30.0 + i)}
               for i in range(3)]
    out = tv.layer_swap(None, parents, blocks=parse_layer_swap("1:0, 2:10"))
    assert {k: v.tolist() for k, v in out.items()} == {
        "emb": [0.0, 0.0], "enc.layer.0.w": [11.0, 11.0], "enc.layer.1.w": [20.0, 20.0], "enc.layer.10.w": [32.0]}
    assert tv.block_index("text_model.encoder.layers.3.mlp.fc1.weight") == 3
    assert tv.block_index("bert.encoder.layer.11.output.dense.bias") == 11
    assert tv.block_index("bert.pooler.dense.weight") is None


def test_layer_swap_refuses_a_block_one_clip_tower_lacks_naming_each_towers_blocks():
    """QA s25: in a CLIP whose towers differ in depth (vision 2 blocks, text 4), layer_swap '1:3' moved only the text
    tower's block 3, silently; block b moves in both towers (docs/design.md §4.10), so a block one tower lacks is
    refused in one line naming each tower's blocks, before any weights. A block both towers have moves in both."""
    from factories import TEXT, VISION, fine_tune, randomize
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    base = randomize(CLIPModel(CLIPConfig(text_config=dict(TEXT, num_hidden_layers=4), vision_config=VISION,
                                          projection_dim=24)), 0)
    parents = [fine_tune(base, 1, 0.02), fine_tune(base, 2, 0.02)]
    for dry_run in (True, False):
        with pytest.raises(MergeInputError, match=r"layer_swap '1:3' lists block 3, which the text_model tower has "
                           r"\(blocks 0 to 3\) but the vision_model tower has not \(blocks 0 to 1\)") as error:
            hf_mudsc.merge(parents, method="layer_swap", layer_swap="1:3", dry_run=dry_run, progress=False)
        assert "\n" not in str(error.value) and "--layer-swap" in str(error.value)
    merged = params(hf_mudsc.merge(parents, method="layer_swap", layer_swap="1:1", progress=False))
    one = params(parents[1])
    moved = [n for n in merged if ".layers.1." in n]
    assert {n.split(".")[0] for n in moved} == {"text_model", "vision_model"}
    assert all(torch.equal(merged[n], one[n]) for n in moved)


def test_parse_layer_swap():
    assert parse_layer_swap("0:0-1,1:2-3, 2:5") == {0: 0, 1: 0, 2: 1, 3: 1, 5: 2}
    for bad, needle in (("1:3-2", "last block before its first"), ("1:0-2,2:2", "block 2 is listed twice"),
                        ("one:0", "not 'parent:first-last'"), ("", "empty")):
        with pytest.raises(ValueError, match=needle):
            parse_layer_swap(bad)


@pytest.mark.parametrize(("keywords", "needle"), [
    ({"method": "layer_swap", "layer_swap": "1:0-"}, "layer_swap '1:0-': item '1:0-' is not"),
    ({"method": "layer_swap"}, "needs the blocks to take from each parent: layer_swap= (CLI: --layer-swap)"),
    ({"method": "layer_swap", "layer_swap": "3:0"}, "names parent 3, but there are 3 parents (0 to 2)"),
    ({"method": "layer_swap", "layer_swap": "1:5"}, "lists block 5, but the model has blocks 0 to 1"),
    ({"method": "della", "epsilon": 0.7}, "epsilon must lie in (0, 0.5) (CLI: --epsilon)"),
    ({"method": "breadcrumbs", "gamma": 1.0}, "gamma must lie in [0, 1) (CLI: --gamma)"),
    ({"method": "slerp", "slerp_t": 1.5}, "slerp_t must lie in [0, 1] (CLI: --slerp-t)"),
    ({"method": "pcb", "pcb_ratio": 0.0}, "pcb_ratio must lie in (0, 1] (CLI: --pcb-ratio)"),
    ({"method": "consensus", "consensus_k": -1}, "consensus_k must be >= 0 (CLI: --consensus-k)"),
    ({"method": "consensus", "consensus_k": 4},
     "consensus_k 4 asks more tasks to agree than the 3 parents have: every task-vector entry would be dropped and "
     "the merge would be the base; give 0 to 3, consensus_k= (CLI: --consensus-k)"),
    ({"method": "localize_stitch", "density": [0.1, 0.2, 0.3]}, "give one number, not 3, density= (CLI: --density)"),
])
def test_bad_method_options_fail_with_one_line_naming_the_option(family, keywords, needle):
    base, parents = family
    with pytest.raises(MergeInputError) as error:
        hf_mudsc.merge(parents, base=base, progress=False, **keywords)
    assert needle in str(error.value) and "\n" not in str(error.value)


def test_slerp_refuses_three_parents_and_ties_refuses_a_missing_base(family):
    _, parents = family
    with pytest.raises(MergeInputError, match="slerp"):
        hf_mudsc.merge(parents, method="slerp", progress=False)
    with pytest.raises(MergeInputError, match=r"base= \(CLI: --base\)") as error:
        hf_mudsc.merge(parents, method="ties", progress=False)
    assert "ties" in str(error.value)


@pytest.mark.parametrize("name", ["ties", "dare_ties", "breadcrumbs_ties", "della", "task_arithmetic", "dare_linear",
                                  "breadcrumbs", "della_linear"])
def test_normalize_with_weights_summing_to_0_is_refused_unless_the_method_elects_signs(name):
    """A sign-electing method divides each entry by the sum of its agreeing parents' weights (not known before the
    tensors are read: mergekit's per-entry rule applies), the others by the sum of all the weights (refused at 0)."""
    method = METHODS[name]
    options = MergeOptions(method=name, weights=[1.0, -1.0], normalize=True)
    _, elects = tv.GTA_FORMS[method.function.__name__]
    if elects:
        method.check_options(options, 2)
    else:
        with pytest.raises(MergeInputError, match=r"sum to 0"):
            method.check_options(options, 2)


def test_registry_entries_declare_base_parents_defaults_and_used_options():
    entries = {name: METHODS[name] for name in TENSOR_WISE}
    assert all(isinstance(m, TensorWiseMethod) for m in entries.values())
    assert {n for n, m in entries.items() if not m.needs_base_model} == {"linear", "slerp", "layer_swap"}
    assert {n: m.num_parents for n, m in entries.items() if m.num_parents is not None} == {"slerp": 2}
    assert {n for n, m in entries.items() if not m.streams} == {"pcb"}
    options = MergeOptions()
    normalize = {n: m.used_options(options).get("normalize") for n, m in entries.items()}
    assert normalize == {"linear": True, "task_arithmetic": False, "ties": True, "dare_linear": False,
                         "dare_ties": False, "breadcrumbs": False, "breadcrumbs_ties": False, "della": True,
                         "della_linear": False, "slerp": None, "pcb": None, "consensus": None,
                         "localize_stitch": None, "layer_swap": None}
    assert METHODS["ties"].used_options(options) == {"weights": None, "normalize": True, "scaling": 1.0,
                                                     "density": 0.2}
    assert set(METHODS["dare_ties"].used_options(options)) == {"weights", "normalize", "scaling", "density",
                                                               "rescale", "seed"}
    assert METHODS["slerp"].used_options(options) == {"slerp_t": 0.5}
    assert all(m.paper for m in entries.values())


def test_config_and_card_record_only_the_options_the_method_read(family):
    base, parents = family
    merged = hf_mudsc.merge(parents, base=base, method="breadcrumbs", gamma=0.02, progress=False)
    mudsc = merged.config.mudsc
    assert mudsc["density"] == 0.9 and mudsc["gamma"] == 0.02 and mudsc["normalize"] is False
    assert mudsc.get("epsilon") is None and mudsc.get("slerp_t") is None and mudsc.get("layer_swap") is None
    card = str(render_card(merged, recipe_of(merged)))
    assert "| Breadcrumbs γ (largest entries dropped) | 0.02 |" in card and "| Density | 0.9 |" in card
    assert "DELLA ε" not in card and "SLERP t" not in card and "PCB ratio" not in card and "Layer swap" not in card


def test_different_label_sets_concatenate_heads_and_merge_the_rest_by_the_method(family):
    base, parents = family
    heads = [with_new_head(p, n, seed) for p, n, seed in zip(parents, (3, 2, 4), (21, 22, 23))]
    merged = hf_mudsc.merge(heads, base=base, method="ties", progress=False)
    weight, bias = classifier_names(base)
    body = lambda sd: {k: v for k, v in sd.items() if k not in (weight, bias)}  # noqa: E731
    expected = tv.ties(body(params(base)), [body(params(h)) for h in heads], density=0.2, normalize=True)
    got = params(merged)
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    assert torch.equal(got[weight], torch.cat([params(h)[weight] for h in heads]))
    assert merged.config.num_labels == 9


def save(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


def test_cli_three_parents_with_a_base_writes_a_loadable_model_card_and_recipe(family, tmp_path):
    base, parents = family
    base_dir = save(base, tmp_path / "base")
    folders = [save(p, tmp_path / f"ft-{i}") for i, p in enumerate(parents)]
    out = tmp_path / "merged"
    argv = ["merge", *map(str, folders), "--base", str(base_dir), "--method", "ties", "--weights", "1", "1", "1",
            "--density", "0.5", "--output", str(out)]
    assert main(argv) == 0
    model = AutoModelForImageClassification.from_pretrained(out)
    assert_state_equal(model, tv.ties(params(base), [params(p) for p in parents], [1.0, 1.0, 1.0], density=0.5,
                                      normalize=True))
    card = (out / "README.md").read_text()  # local folders: in the parents table (Hub ids go to `base_model:`)
    for row in ("| A | `ft-0` (local folder) |", "| B | `ft-1` (local folder) |", "| C | `ft-2` (local folder) |",
                "| base | `base` (local folder) |", "| Method | `ties`", "| Density | 0.5 |",
                "| Weights | 1.0 1.0 1.0 |"):
        assert row in card, row
    recipe = yaml.safe_load((out / RECIPE_FILENAME).read_text())
    assert recipe["method"] == "ties" and recipe["density"] == 0.5 and recipe["weights"] == [1.0, 1.0, 1.0]
    again = tmp_path / "again"
    assert main(["merge", "--recipe", str(out / RECIPE_FILENAME), "--output", str(again)]) == 0
    first, second = load_file(next(out.glob("*.safetensors"))), load_file(next(again.glob("*.safetensors")))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_cli_layer_swap_flag(family, tmp_path, capsys):
    _, parents = family
    folders = [save(p, tmp_path / f"ft-{i}") for i, p in enumerate(parents[:2])]
    assert main(["merge", *map(str, folders), "--method", "layer_swap", "--layer-swap", "1:0-1",
                 "--output", str(tmp_path / "out")]) == 0
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "out")
    got, one, zero = params(model), params(parents[1]), params(parents[0])
    assert all(torch.equal(got[n], one[n] if ".layers." in n else zero[n]) for n in got)
    assert main(["merge", *map(str, folders), "--method", "layer_swap", "--layer-swap", "1:x",
                 "--output", str(tmp_path / "bad")]) == 2  # an option error, as argparse
    err = capsys.readouterr().err
    assert "--layer-swap" in err and "Traceback" not in err and not (tmp_path / "bad").exists()


def test_tensor_wise_methods_read_folder_parents_and_base_one_tensor_at_a_time(family, tmp_path, monkeypatch):
    """Parents after the first and the base come from their safetensors files lazily (the streaming merge); the
    merge equals the in-memory one. A method that ranks the whole model (pcb) gets them loaded."""
    from hf_mudsc.load.lazy import LazyParameters

    base = make_model("bert_cls", 0)  # BERT checkpoints hold the parameters' own names (ViT's are renamed on load)
    parents = [fine_tune(base, seed) for seed in (1, 2, 3)]
    base_dir = save(base, tmp_path / "base")
    folders = [save(p, tmp_path / f"ft-{i}") for i, p in enumerate(parents)]
    from hf_mudsc.methods.task_vector import TensorWiseMethod

    seen, calls, contexts = {}, [], []
    for name in ("ties", "pcb"):
        real = getattr(tv, name)

        def spy(base_params, parent_params, *args, _real=real, _name=name, **kwargs):
            seen[_name] = (base_params, list(parent_params))
            calls.append((_name, {len(base_params or {}), *(len(p) for p in parent_params)}))
            return _real(base_params, parent_params, *args, **kwargs)

        monkeypatch.setattr(tv, name, spy)
    streamed = TensorWiseMethod.merge_tensor_by_tensor

    def record(self, context, *args, **kwargs):
        contexts.append((context.base, list(context.parents)))
        return streamed(self, context, *args, **kwargs)

    monkeypatch.setattr(TensorWiseMethod, "merge_tensor_by_tensor", record)
    merged = hf_mudsc.merge(folders, base=base_dir, method="ties", progress=False)
    [(base_seen, parents_seen)] = contexts
    assert isinstance(base_seen, LazyParameters)
    assert not isinstance(parents_seen[0], LazyParameters)
    assert all(isinstance(p, LazyParameters) for p in parents_seen[1:])
    # The function sees one tensor of each parent at a time, once per tensor name.
    ties_calls = [sizes for name, sizes in calls if name == "ties"]
    assert len(ties_calls) == len(dict(parents[0].named_parameters())) and all(s <= {0, 1} for s in ties_calls)
    assert_state_equal(merged, tv.ties(params(base), [params(p) for p in parents], density=0.2, normalize=True))
    hf_mudsc.merge(folders, base=base_dir, method="pcb", progress=False)
    assert not any(isinstance(p, LazyParameters) for p in [seen["pcb"][0], *seen["pcb"][1]])

    # A checkpoint whose tensor names differ from the parameters' (transformers 5 renames ViT's legacy names on
    # load, and save_pretrained writes them) is read lazily too, by transformers' renames: the same result, bit
    # for bit, as the parents held whole.
    vit = [save(p, tmp_path / f"vit-{i}") for i, p in enumerate(family[1])]
    merged = hf_mudsc.merge(vit, base=save(family[0], tmp_path / "vit-base"), method="ties", progress=False)
    [(base_seen, parents_seen)] = contexts[-1:]
    assert isinstance(base_seen, LazyParameters) and not isinstance(parents_seen[0], LazyParameters)
    assert all(isinstance(p, LazyParameters) for p in parents_seen[1:])
    assert_state_equal(merged, tv.ties(params(family[0]), [params(p) for p in family[1]], density=0.2,
                                       normalize=True))
    whole = hf_mudsc.merge(family[1], base=family[0], method="ties", progress=False)  # model objects: held whole
    assert_state_equal(merged, dict(whole.named_parameters()))


def test_a_lazily_read_parent_with_nan_weights_is_refused_in_one_line(family, tmp_path):
    base = make_model("bert_cls", 0)
    broken = fine_tune(base, 5)
    with torch.no_grad():
        broken.bert.encoder.layer[1].attention.self.query.weight[0, 0] = float("nan")
    folders = [save(fine_tune(base, 6), tmp_path / "ok"), save(broken, tmp_path / "broken")]
    with pytest.raises(MergeInputError, match=r"parent B has NaN or infinite values in 'bert\.encoder\.layer\.1\."):
        hf_mudsc.merge(folders, base=save(base, tmp_path / "base"), method="ties", progress=False)


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_merges_a_clip_whose_logit_scale_is_a_0_d_tensor(method):
    """Bug hunt s29: DELLA's per-row ranking read a 0-d tensor (CLIP's `logit_scale`) as a 1-D one and crashed with an
    IndexError traceback after every other tensor had been merged. A 0-d tensor is a one-entry row."""
    from factories import TEXT, VISION, fine_tune, randomize
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    base = randomize(CLIPModel(CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=24)), 0)
    parents = [fine_tune(base, 1, 0.02), fine_tune(base, 2, 0.02)]
    merged = params(hf_mudsc.merge(parents, base=base, method=method, progress=False))
    scale = merged["logit_scale"]
    assert scale.dim() == 0 and torch.isfinite(scale)
    mask = tv.della_mask(torch.tensor(0.5), 0.5, 0.1, torch.Generator().manual_seed(0))
    assert mask.shape == () and mask.item() in (0.0, 1.0)
