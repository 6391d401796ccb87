"""Methods carry behaviour: the pipeline asks the registered method object what it needs and how it merges."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from factories import make_batches, make_model

import hf_mudsc
from hf_mudsc.errors import MergeInputError
from hf_mudsc.methods import (
    METHODS,
    MergeMethod,
    MethodContext,
    MethodResult,
    method_runs,
    register_method,
    unregister_method,
)

PACKAGE = Path(hf_mudsc.__file__).parent
# The attributes that used to be flags read by the pipeline's `if` branches.
METHOD_FLAGS = {"uses_activations", "uses_weights", "iterate", "matches_units", "matcher"}


@dataclass(frozen=True)
class FirstParent(MergeMethod):
    """Returns parent A's parameters unchanged; records what it was given."""

    def merge_parameters(self, context: MethodContext) -> MethodResult:
        seen.append(context)
        return MethodResult(parameters={k: v.clone() for k, v in context.params_a.items()},
                            matches=[None] * len(context.spec.groups))


seen: list[MethodContext] = []


@pytest.fixture
def temporary_method():
    """Registers methods for one test and removes them afterwards, whatever happens."""
    added: list[str] = []

    def add(method: MergeMethod) -> MergeMethod:
        register_method(method)
        added.append(method.name)
        return method

    seen.clear()
    yield add
    for name in added:
        unregister_method(name)


def test_builtin_methods_in_registry_order_with_their_runs():
    assert list(METHODS)[:6] == ["mudsc", "zipit", "activation_align", "weight_matching", "average", "linear"]
    assert list(METHODS)[6:19] == ["task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
                                   "breadcrumbs_ties", "della", "della_linear", "slerp", "pcb", "consensus",
                                   "localize_stitch", "layer_swap"]
    assert method_runs()[:9] == [
        ("mudsc (zip)", {"method": "mudsc", "matcher": "zip"}),
        ("mudsc (align)", {"method": "mudsc", "matcher": "align"}),
        ("zipit", {"method": "zipit", "matcher": "zip"}),
        ("activation_align", {"method": "activation_align", "matcher": "align"}),
        ("weight_matching", {"method": "weight_matching", "matcher": "align"}),
        ("average", {"method": "average"}),
        ("linear", {"method": "linear"}),
        ("slerp", {"method": "slerp"}),
        ("layer_swap", {"method": "layer_swap", "layer_swap": "1:0"}),  # its demo_options: no default ranges
    ]
    assert [label for label, _ in method_runs("{name} {matcher}")][:2] == ["mudsc zip", "mudsc align"]
    first = list(METHODS)[:6]
    needs = {name: (m.needs_calibration, m.needs_base_model, m.num_parents) for name, m in METHODS.items()
             if name in first}
    assert needs == {"mudsc": (True, False, None), "zipit": (True, False, None),
                     "activation_align": (True, False, None), "weight_matching": (False, False, None),
                     "average": (False, False, 2),
                     "linear": (False, False, None)}
    assert [n for n, m in METHODS.items() if m.needs_data] == ["regmean", "regmean_plusplus", "fisher"]
    assert {n: (m.used_matcher("zip"), m.used_matcher("align"), m.recorded_alpha(0.3)) for n, m in METHODS.items()
            if n in first} \
        == {"mudsc": ("zip", "align", 0.3), "zipit": ("zip", "zip", None),
            "activation_align": ("align", "align", None), "weight_matching": ("align", "align", None),
            "average": (None, None, None), "linear": (None, None, None)}
    assert hf_mudsc.METHODS is METHODS and hf_mudsc.get_method("zipit") is METHODS["zipit"]


def test_no_method_name_or_flag_branches_outside_the_methods_package():
    offences = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent.name == "methods":
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Compare):
                for operand in [node.left, *node.comparators]:
                    names = operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [operand]
                    if any(isinstance(n, ast.Constant) and n.value in METHODS for n in names):
                        offences.append(f"{path.relative_to(PACKAGE)}:{node.lineno} compares with a method name")
            if path.name == "pipeline.py" and isinstance(node, ast.Attribute) and node.attr in METHOD_FLAGS:
                offences.append(f"{path.relative_to(PACKAGE)}:{node.lineno} reads the method flag .{node.attr}")
    assert offences == []


def test_a_registered_method_merges_through_the_pipeline(temporary_method):
    temporary_method(FirstParent(name="first_parent", pretty_name="First parent", paper=None,
                                 description="parent A, unchanged"))
    model_a, model_b = make_model("vit_cls", 0), make_model("vit_cls", 1)
    merged = hf_mudsc.merge([model_a, model_b], None, method="first_parent", alpha=0.3, progress=False)
    for (name, tensor), merged_tensor in zip(model_a.state_dict().items(), merged.state_dict().values()):
        assert torch.equal(tensor, merged_tensor), name
    assert len(seen) == 1 and seen[0].correlations is None and seen[0].options.alpha == 0.3
    assert seen[0].concatenate_classifier is False
    report = merged.merge_report
    assert (report.method, report.matcher, report.alpha, report.group_names) == ("first_parent", None, None, [])
    assert merged.config.mudsc["method"] == "first_parent" and merged.config.mudsc["statistics_dtype"] is None
    assert merged.config.mudsc["calibration"] is None


def test_a_method_that_needs_calibration_gets_correlations(temporary_method):
    temporary_method(FirstParent(name="first_parent_calibrated", pretty_name="First parent", paper=None,
                                 description="parent A, after calibration", needs_calibration=True))
    with pytest.raises(MergeInputError, match="method 'first_parent_calibrated' needs calibration data"):
        # Refused before any parent is loaded: the folders do not exist.
        hf_mudsc.merge(["/nonexistent/a", "/nonexistent/b"], None, method="first_parent_calibrated")
    model_a, model_b = make_model("vit_cls", 0), make_model("vit_cls", 1)
    merged = hf_mudsc.merge([model_a, model_b], make_batches("vit_cls", 1), method="first_parent_calibrated",
                            progress=False)
    groups = seen[0].spec.groups
    assert [tuple(c.shape) for c in seen[0].correlations] == [(2 * g.width, 2 * g.width) for g in groups]
    assert merged.merge_report.num_samples == 16 and merged.config.mudsc["statistics_dtype"] == "float32"


def test_a_method_that_needs_a_base_model_is_refused_without_one(temporary_method, tmp_path):
    temporary_method(FirstParent(name="needs_base", pretty_name="Needs base", paper=None, description="",
                                 needs_base_model=True))
    folders = []
    for seed in (0, 1):  # saved without a model card: no base_model to find
        make_model("vit_cls", seed).save_pretrained(tmp_path / f"p{seed}")
        folders.append(str(tmp_path / f"p{seed}"))
    with pytest.raises(MergeInputError) as caught:
        hf_mudsc.merge(folders, None, method="needs_base", progress=False)
    assert str(caught.value).startswith("method 'needs_base' needs the parents' common base model and none was "
                                        "given; pass base= (CLI: --base)")
    assert seen == []
    # The demo's pair has no base: such a method is listed for the benchmarks only when they ask.
    assert "needs_base" not in [label for label, _ in method_runs()]
    assert method_runs(with_base=True)[-1] == ("needs_base", {"method": "needs_base"})


def test_cli_choices_and_demo_list_follow_the_registry(temporary_method):
    from hf_mudsc.cli.demo import demo_methods
    from hf_mudsc.cli.main import build_parser

    def choices() -> list[str]:
        merge_parser = build_parser()._subparsers._group_actions[0].choices["merge"]
        return list(next(a for a in merge_parser._actions if a.dest == "method").choices)

    before = [label for label, _ in demo_methods()]
    assert before[:9] == ["mudsc (zip)", "mudsc (align)", "zipit", "activation_align", "weight_matching", "average",
                          "linear", "slerp", "layer_swap"]  # then methods of other packages (data methods ...)
    assert [label for label, _ in demo_methods()] == [label for label, _ in method_runs()]
    temporary_method(FirstParent(name="first_parent", pretty_name="First parent", paper=None, description=""))
    assert choices()[-1] == "first_parent"
    assert demo_methods()[-1] == ("first_parent", {"method": "first_parent"})


def test_the_method_help_states_the_auto_rule_it_runs():
    """`hf-mudsc merge --help` says what `auto` picks for fine-tunes of one base: regmean given data (the table in
    hf_mudsc.methods.auto), else ties with a base, else linear — the help had lost the data case."""
    from dataclasses import fields

    from hf_mudsc.methods.auto import CHOICES, WITH_DATA
    from hf_mudsc.options import MergeOptions

    text = next(f for f in fields(MergeOptions) if f.name == "method").metadata["help"]()
    assert (WITH_DATA["shared base"][0], CHOICES[("shared base", True)][0], CHOICES[("shared base", False)][0]) == (
        "regmean", "ties", "linear")
    assert "fine-tunes of one base -> regmean with --calibration, else ties with --base, else linear" in text


def test_registry_refuses_bad_registrations(temporary_method):
    with pytest.raises(ValueError, match="merge method 'mudsc' is already registered"):
        register_method(FirstParent(name="mudsc", pretty_name="", paper=None, description=""))
    with pytest.raises(TypeError, match="register_method takes a MergeMethod, got dict"):
        register_method({"name": "x"})
    with pytest.raises(ValueError, match="merge method 'nothing' is not registered"):
        unregister_method("nothing")
    with pytest.raises(NotImplementedError, match="'bare' does not implement merge_parameters"):
        MergeMethod(name="bare", pretty_name="", paper=None, description="").merge_parameters(None)
