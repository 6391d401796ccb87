"""`hf-mudsc demo` runs its baselines on purpose (QA s22): it printed 11 warnings telling the user to change options
it does not have ("the calibration data ... has no effect ... drop it", "use a unit-matching method such as 'mudsc'
(method= ...)", with `--seeds 1 1` "a same-base method (e.g. 'average')"); its recipe left `out_dtype: auto` unpinned
(every other recipe pins what auto chose); `--alpha auto` was refused although `merge --alpha auto` takes it."""

from __future__ import annotations

import logging

import pytest
import yaml

from hf_mudsc.cli.main import main
from hf_mudsc.publish.recipe import AUTO_CHOSEN_KEY

pytestmark = pytest.mark.usefixtures("one_thread_module")

RUNS = [("mudsc (zip)", {"method": "mudsc", "matcher": "zip"}), ("average", {"method": "average"})]


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    """Two tiny demos sharing one cache: independent parents (seeds 0 1, as the default) and parents from one
    initialization (seeds 1 1) with `--alpha auto`; each with its warnings and output folder."""
    root = tmp_path_factory.mktemp("demo-choices")
    patch = pytest.MonkeyPatch()
    patch.setattr("hf_mudsc.cli.demo.demo_methods", lambda: list(RUNS))
    hf_logger = logging.getLogger("hf_mudsc")
    found = {}
    try:
        for name, flags in (("independent", ["--seeds", "0", "1"]), ("one_init", ["--seeds", "1", "1", "--alpha",
                                                                                    "auto"])):
            records = Records()
            hf_logger.addHandler(records)
            try:
                argv = ["demo", "--output", str(root / name), "--hidden-size", "8", "--epochs", "1", "--num-samples",
                        "64", "--cache-dir", str(root / "cache"), *flags]
                assert main(argv) == 0
            finally:
                hf_logger.removeHandler(records)
            found[name] = (records.messages, root / name)
    finally:
        patch.undo()
    return found


@pytest.mark.parametrize("name", ["independent", "one_init"])
def test_the_demo_shows_no_advice_to_change_options_it_does_not_have(demos, name):
    messages, _ = demos[name]
    advice = [m for m in messages if "(CLI: --" in m or "method=" in m or "drop it" in m]
    assert not advice, advice


def test_parents_from_one_initialization_are_said_once_in_the_demos_terms(demos):
    messages, output = demos["one_init"]
    said = [m for m in messages if "--seeds 1 1" in m]
    assert len(said) == 1 and "one initialization" in said[0] and "already correspond" in said[0], messages
    assert not any("--seeds" in m for m in demos["independent"][0])
    # the written model's card and config keep the merge's own warning (its re-run is an `hf-mudsc merge`)
    import json

    warnings = json.loads((output / "config.json").read_text())["mudsc"]["warnings"]
    assert any("fine-tunes of one base" in w for w in warnings), warnings


def test_the_demos_recipe_pins_what_auto_chose_as_every_recipe_does(demos):
    recipe = yaml.safe_load((demos["independent"][1] / "mudsc_recipe.yaml").read_text())
    assert recipe["out_dtype"] == "float32"
    assert recipe[AUTO_CHOSEN_KEY]["out_dtype"]["value"] == "float32"
    assert recipe["refit"] != "auto"


def test_the_demo_takes_alpha_auto_and_records_it(demos):
    _, output = demos["one_init"]
    import json

    mudsc = json.loads((output / "config.json").read_text())["mudsc"]
    assert mudsc["alpha_auto"] is not None  # the search ran
    assert yaml.safe_load((output / "mudsc_recipe.yaml").read_text())["alpha"] == "auto"
