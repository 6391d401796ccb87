"""docs/adding_a_method.md's example module runs as written: its methods register, merge, and clean up."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch
from factories import make_batches, make_model, model_output, permuted_copy, relative_error

import hf_mudsc
from hf_mudsc.architectures import spec_for
from hf_mudsc.methods import METHODS, unregister_method

DOC = Path(__file__).resolve().parents[1] / "docs" / "adding_a_method.md"
# The shipped methods, in registry order, before the example registers anything.
SHIPPED = list(METHODS)


def example_source() -> str:
    """The page's first ```python block: the example module."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    assert blocks, f"no python code block in {DOC}"
    return blocks[0]


@pytest.fixture
def my_methods():
    """The doc's module, imported as `my_methods`; its registrations are undone afterwards."""
    before = list(METHODS)
    module = types.ModuleType("my_methods")
    module.__file__ = str(DOC)
    sys.modules["my_methods"] = module
    try:
        exec(compile(example_source(), str(DOC), "exec"), module.__dict__)
        yield module
    finally:
        sys.modules.pop("my_methods", None)
        for name in [n for n in METHODS if n not in before]:
            unregister_method(name)
    assert list(METHODS) == before


def test_the_example_methods_register_and_merge(my_methods):
    assert list(METHODS)[-2:] == ["first_parent", "weight_zip"]
    assert METHODS["weight_zip"] is my_methods.WEIGHT_ZIP

    model_a, model_b = make_model("vit_cls", 0), make_model("vit_cls", 1)
    first = hf_mudsc.merge([model_a, model_b], method="first_parent", progress=False)
    for (name, tensor), merged in zip(model_a.state_dict().items(), first.state_dict().values()):
        assert torch.equal(tensor, merged), name
    assert first.config.mudsc["method"] == "first_parent" and first.merge_report.matcher is None

    # weight_zip needs no data and recovers a model from a permuted copy of itself.
    permuted = permuted_copy(model_a, spec_for(model_a), seed=1)
    merged = hf_mudsc.merge([model_a, permuted], method="weight_zip", progress=False)
    report = merged.merge_report
    assert (report.method, report.matcher, report.alpha) == ("weight_zip", "zip", None)
    assert report.sweeps >= 1 and all(m is not None for m in report.matches)
    for batch in make_batches("vit_cls", num_batches=2):
        assert relative_error(model_output(merged, batch), model_output(model_a, batch)) < 1e-5


def test_the_registry_is_clean_again():
    """Runs after the example test in file order: nothing it registered is left behind."""
    assert "first_parent" not in METHODS and "weight_zip" not in METHODS
    assert list(METHODS) == SHIPPED


def test_a_plugin_methods_card_and_recipe_say_how_to_re_run_it(my_methods):
    """QA s22: a merge made with a registered plug-in method said `hf-mudsc merge --recipe mudsc_recipe.yaml`, which
    fails (the CLI cannot import the plug-in: "unknown merge method 'first_parent'"). The card and the recipe's header
    show the re-run from Python after importing the module that registered it (named when known); this page says so."""
    from hf_mudsc.methods import plugin_module
    from hf_mudsc.publish.card import render_card
    from hf_mudsc.publish.writer import recipe_of

    assert plugin_module("first_parent") == "my_methods"  # its class is the module's own
    assert plugin_module("weight_zip") == "" and plugin_module("mudsc") is None  # a shipped class; built in
    merged = hf_mudsc.merge([make_model("vit_cls", 0), make_model("vit_cls", 1)], method="first_parent",
                            progress=False)
    recipe = recipe_of(merged)
    card = str(render_card(merged, recipe, parents=["org/vit-a", "org/vit-b"]))
    reproduce = card.split("## Reproduce")[1]
    assert "hf-mudsc merge --recipe mudsc_recipe.yaml" not in reproduce
    assert "import my_methods  # registers the method" in reproduce and "Recipe.load(" in reproduce
    header = recipe.to_yaml().split("hf_mudsc_version")[0]
    assert "--recipe mudsc_recipe.yaml --output" not in header and "'first_parent' is not built into" in header
    assert "registered by my_methods" in header
    assert "cannot import your module" in " ".join(DOC.read_text().split())
