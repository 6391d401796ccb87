"""Every "docs/design.md §N" cited in code, tests, scripts and the design document itself names a section of
docs/design.md — a renumbering or a deleted section cannot leave dangling references behind — and every citation
names the document by its path, so a reader finds it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"
SOURCES = ("hf_mudsc", "tests", "scripts")
# "docs/design.md §6", "docs/design.md §4.2–4.5"; in the document itself a bare "§7". CITATION also matches the
# short forms ("design §4.3") so that they are checked for dangling numbers and reported by SHORT_CITATION.
SECTION = r"(\d+(?:\.\d+)?)"
CITATION = re.compile(rf"design(?:\.md)?\s*§\s*{SECTION}(?:\s*[–-]\s*{SECTION})?", re.IGNORECASE)
SHORT_CITATION = re.compile(r"(?<!docs/)design(?:\.md)?\s*§", re.IGNORECASE)
SELF_CITATION = re.compile(rf"§\s*{SECTION}(?:\s*[–-]\s*{SECTION})?")
HEADING = re.compile(r"^(#{2,3})\s+(\d+(?:\.\d+)?)\.?\s+\S", re.MULTILINE)


def sections() -> list[str]:
    return [number for _, number in HEADING.findall(DESIGN.read_text(encoding="utf-8"))]


def cited(pattern: re.Pattern[str], text: str) -> set[str]:
    numbers = set()
    for start, end in pattern.findall(text):
        numbers.add(start)
        if end:
            numbers.add(end)
    return numbers


def test_design_sections_are_numbered_consecutively():
    found = sections()
    top = [n for n in found if "." not in n]
    assert top == [str(i) for i in range(1, len(top) + 1)], top
    for parent in top:
        subs = [n for n in found if n.startswith(f"{parent}.")]
        assert subs == [f"{parent}.{i}" for i in range(1, len(subs) + 1)], subs


def test_every_design_citation_in_the_code_names_a_section():
    known = set(sections())
    citations: dict[str, set[str]] = {}
    for folder in SOURCES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            numbers = cited(CITATION, path.read_text(encoding="utf-8"))
            if numbers:
                citations[str(path.relative_to(ROOT))] = numbers
    assert citations, "no design citations found: the pattern no longer matches the code's comments"
    dangling = {path: sorted(numbers - known) for path, numbers in citations.items() if numbers - known}
    assert not dangling, f"citations of sections that docs/design.md does not have: {dangling}"


def test_the_design_document_cites_only_its_own_sections():
    text = DESIGN.read_text(encoding="utf-8")
    numbers = cited(SELF_CITATION, text)
    assert numbers
    assert sorted(numbers - set(sections())) == []


def test_every_design_citation_names_the_document_by_its_path():
    short = []
    for folder in SOURCES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == Path(__file__).resolve():
                continue  # this file spells the short form out to test the pattern
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if SHORT_CITATION.search(line):
                    short.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not short, 'cite "docs/design.md §N", not "design §N":\n' + "\n".join(short)


def test_the_short_citation_pattern_tells_the_two_forms_apart():
    assert SHORT_CITATION.search("(design §4.6)")
    assert SHORT_CITATION.search("Design §8")
    assert SHORT_CITATION.search("see design.md §8")
    assert not SHORT_CITATION.search("(docs/design.md §4.6)")
    assert cited(CITATION, "docs/design.md §4.2–4.5 and docs/design.md §6") == {"4.2", "4.5", "6"}


# --- README: the layout section is the package's tree, and the design document is linked --------------------

README = ROOT / "README.md"
PATH_IN_README = re.compile(r"(?<![\w/.])((?:hf_mudsc|scripts|docs|tests|model_cards)/[A-Za-z0-9_./*-]*[A-Za-z0-9_*/])")
PIPELINE_ORDER = ("load/", "calibrate/", "solve/", "apply/", "publish/")


def readme_section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", text, re.MULTILINE | re.DOTALL)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


def layout_entries() -> list[str]:
    """The paths of the Layout block: a line's first word; an indented `name.py` is under the folder above it."""
    block = re.search(r"```\n(.*?)```", readme_section("Layout"), re.DOTALL)
    assert block, "the README's Layout section has no code block"
    entries: list[str] = []
    folder = ""
    for line in block.group(1).splitlines():
        if not line.strip():
            continue
        first = line.split()[0]
        if line.startswith(" "):
            entries.append(folder + first)
        else:
            entries.append(first)
            folder = first if first.endswith("/") else ""
    return entries


def test_every_path_the_readme_names_exists():
    text = README.read_text(encoding="utf-8")
    missing = sorted(
        {path for path in PATH_IN_README.findall(text) if not any(ROOT.glob(path.rstrip("/")))}
    )
    assert not missing, f"README.md names paths that do not exist: {missing}"


def test_the_readme_layout_is_the_package_tree_in_pipeline_order():
    entries = layout_entries()
    missing = [entry for entry in entries if not (ROOT / entry).exists()]
    assert not missing, f"the Layout section lists paths that do not exist: {missing}"
    package = ROOT / "hf_mudsc"
    required = [f"hf_mudsc/{path.name}" for path in sorted(package.glob("*.py")) if path.name != "__init__.py"]
    required += [f"hf_mudsc/{path.parent.name}/" for path in sorted(package.glob("*/__init__.py"))]
    unlisted = [path for path in required if path not in entries]
    assert not unlisted, f"the Layout section does not list: {unlisted}"
    stages = [entries.index(f"hf_mudsc/{stage}") for stage in PIPELINE_ORDER]
    assert stages == sorted(stages), f"stages out of pipeline order: {[entries[i] for i in sorted(stages)]}"


def test_a_folder_whose_files_the_layout_lists_has_every_module_listed():
    """The Layout listed methods/average.py as holding `linear` and left out task_vector.py, which holds it: a
    folder either stands as one line or lists every module in it."""
    entries = layout_entries()
    package = ROOT / "hf_mudsc"
    unlisted = []
    for folder in sorted(path.parent for path in package.glob("*/__init__.py")):
        prefix = f"hf_mudsc/{folder.name}/"
        if any(entry.startswith(prefix) and entry != prefix for entry in entries):
            unlisted += [f"{prefix}{path.name}" for path in sorted(folder.glob("*.py"))
                         if path.name != "__init__.py" and f"{prefix}{path.name}" not in entries]
    assert not unlisted, f"the Layout section lists these folders' files but not: {unlisted}"


def test_the_readme_links_the_design_document_where_it_explains_how_it_works():
    assert "[docs/design.md](docs/design.md)" in readme_section("How it works")


# --- README and docs: every `hf_mudsc.x.y` name they give a user exists --------------------------------------

GUIDES = (README, *sorted((ROOT / "docs").rglob("*.md")))
DOTTED_NAME = re.compile(r"(?<![\w/.])hf_mudsc(?:\.[A-Za-z_]\w*)+")
FROM_IMPORT = re.compile(r"^[ \t]*from[ \t]+(hf_mudsc(?:\.\w+)*)[ \t]+import[ \t]+(\([^)]*\)|[\w \t,]+)", re.MULTILINE)


def resolves(dotted: str) -> bool:
    """Whether `hf_mudsc.a.b.c` names a module or an attribute reachable from the longest importable prefix."""
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(target, name):
                return False
            target = getattr(target, name)
        return True
    return False


def documented_names(text: str) -> set[str]:
    """The dotted hf_mudsc names a text gives: in prose and code, and each name of a `from hf_mudsc... import`."""
    names = set(DOTTED_NAME.findall(text))
    for module, imported in FROM_IMPORT.findall(text):
        names.update(f"{module}.{name.strip()}" for name in imported.strip("()").split(",") if name.strip())
    return names


def test_the_name_pattern_reads_imports_and_dotted_names():
    text = ("`hf_mudsc.plan.MergePlan` and\nfrom hf_mudsc.testing.permute import permute_model, random_permutations\n"
            "\nfrom hf_mudsc.spec import (\n    Group,\n    Role,\n)\n")
    assert documented_names(text) == {"hf_mudsc.plan.MergePlan", "hf_mudsc.testing.permute",
                                      "hf_mudsc.testing.permute.permute_model",
                                      "hf_mudsc.testing.permute.random_permutations", "hf_mudsc.spec",
                                      "hf_mudsc.spec.Group", "hf_mudsc.spec.Role"}
    assert not resolves("hf_mudsc.no_such_module.thing") and resolves("hf_mudsc.plan.MergePlan")


def test_every_hf_mudsc_name_the_readme_and_docs_give_exists():
    missing = {
        str(path.relative_to(ROOT)): sorted(name for name in documented_names(path.read_text(encoding="utf-8"))
                                            if not resolves(name))
        for path in GUIDES
    }
    missing = {path: names for path, names in missing.items() if names}
    assert not missing, f"names the documents give that the package does not have: {missing}"


def public_docstrings() -> dict[str, str]:
    """The docstring of every function and class in `hf_mudsc.__all__` (data such as METHODS carries none)."""
    import inspect

    import hf_mudsc

    objects = {name: getattr(hf_mudsc, name) for name in hf_mudsc.__all__}
    return {name: inspect.getdoc(obj) or "" for name, obj in objects.items()
            if inspect.isfunction(obj) or inspect.isclass(obj)}


def test_every_public_function_says_what_it_returns():
    import inspect

    import hf_mudsc

    functions = [name for name in hf_mudsc.__all__ if inspect.isfunction(getattr(hf_mudsc, name))]
    assert {"merge", "save_merged", "from_pretrained"} <= set(functions)
    silent = [name for name in functions if "Returns:" not in public_docstrings()[name]]
    assert not silent, f"public functions whose docstring has no 'Returns:' section: {silent}"
    undocumented = [name for name, doc in public_docstrings().items() if not doc.strip()]
    assert not undocumented, f"public names without a docstring: {undocumented}"


def test_every_hf_mudsc_name_the_public_docstrings_give_exists():
    missing = {name: sorted(dotted for dotted in documented_names(doc) if not resolves(dotted))
               for name, doc in public_docstrings().items()}
    missing = {name: names for name, names in missing.items() if names}
    assert not missing, f"docstrings of public names name what the package does not have: {missing}"


COMMANDS = ("", "merge", "push", "evaluate", "inspect", "serve", "demo")


def cli_flags() -> dict[str, set[str]]:
    """Every long flag each `hf-mudsc` command's help lists as an option (the `--no-` form of a yes/no flag and
    `--help` left out)."""
    import contextlib
    import io

    from hf_mudsc.cli.main import main

    flags = {}
    for command in COMMANDS:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            main([command, "--help"] if command else ["--help"])
        invocations = re.findall(r"^  (-.*?)(?:  |$)", out.getvalue(), flags=re.MULTILINE)
        found = {flag for line in invocations for flag in re.findall(r"--[a-z][a-z-]*", line)} - {"--help"}
        flags[command] = {flag for flag in found if not (flag.startswith("--no-") and f"--{flag[5:]}" in found)}
    return flags


def test_every_cli_flag_is_described_in_the_readme_or_the_docs():
    text = "\n".join(path.read_text(encoding="utf-8") for path in (README, *sorted((ROOT / "docs").glob("*.md"))))
    flags = cli_flags()
    assert "--refit" in flags["merge"] and "--no-normalize" not in flags["merge"] and "--verbose" in flags[""]
    missing = {name: sorted(flag for flag in found if not re.search(rf"{re.escape(flag)}(?![\w-])", text))
               for name, found in flags.items()}
    missing = {name: found for name, found in missing.items() if found}
    assert not missing, f"flags that neither README.md nor docs/*.md mention: {missing}"
