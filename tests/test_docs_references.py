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


# --- README and docs: every hf-mudsc command they print is one the CLI accepts --------------------------------

LAUNCHED = re.compile(r"(?:^|\s)-m\s+hf_mudsc(?=\s)")  # `torchrun ... -m hf_mudsc merge ...` runs the CLI too


def shell_commands(text: str) -> list[str]:
    """The `hf-mudsc` command lines of a document: each command of a shell block (backslash continuations joined,
    `&&` chains split, comments dropped, `torchrun/accelerate ... -m hf_mudsc` read as `hf-mudsc`), and each
    inline `hf-mudsc CMD ...` of the prose that gives at least two arguments and no placeholder for more
    (`...`, `[-q | -v]`)."""
    import shlex

    from readme_examples import shell_lines

    found = []
    for line in shell_lines(text):
        for part in line.split("&&"):
            if "hf-mudsc" not in part and not LAUNCHED.search(part):
                continue  # other programs' lines (a curl body may span lines: not split here)
            words = shlex.split(LAUNCHED.sub(" hf-mudsc", part), comments=True)
            if "hf-mudsc" in words:
                found.append(shlex.join(words[words.index("hf-mudsc"):]))
    for span in re.findall(r"`(hf-mudsc [^`]+)`", text):
        span = " ".join(span.split())
        if not re.search(r"\.\.\.|…|\[|\|", span) and len(span.split()) >= 4:
            found.append(span)
    return found


def test_the_command_reader_finds_block_lines_chains_launchers_and_inline_commands():
    text = ("```bash\nhf-mudsc merge ./a ./b \\\n    --output m   # comment\npip install x && hf-mudsc inspect m\n"
            "torchrun --nproc_per_node 2 -m hf_mudsc merge a b --output c\n```\n"
            "Run `hf-mudsc push m org/x --private`, not `hf-mudsc merge ...` or `hf-mudsc merge --recipe`.\n")
    assert shell_commands(text) == ["hf-mudsc merge ./a ./b --output m", "hf-mudsc inspect m",
                                    "hf-mudsc merge a b --output c", "hf-mudsc push m org/x --private"]


def refusal(command: str) -> str | None:
    """Why the CLI would refuse `command` before doing any work (its argument parser, and for `merge` without a
    recipe file the recipe checks: options in range, a destination given), or None when it accepts it."""
    import contextlib
    import io
    import shlex

    from hf_mudsc.cli.main import build_parser
    from hf_mudsc.cli.merge import build_recipe
    from hf_mudsc.errors import RecipeError

    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            args = build_parser().parse_args(shlex.split(command)[1:])
    except SystemExit as exit_:
        return None if exit_.code == 0 else errors.getvalue().strip().splitlines()[-1]
    if args.command == "merge" and not getattr(args, "recipe", None):
        try:
            build_recipe(args)
        except RecipeError as error:
            return str(error)
    return None


def test_every_hf_mudsc_command_the_readme_and_the_docs_give_is_accepted():
    """The README's `hf-mudsc merge A B C --calibration DATA --method regmean ...` gave no --output: run as printed,
    it was refused. Every printed command must parse, and a merge must pass the recipe checks."""
    guides = (README, *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "docs" / "space").glob("*.md")))
    commands = {str(path.relative_to(ROOT)): shell_commands(path.read_text(encoding="utf-8")) for path in guides}
    assert len(commands["README.md"]) > 30, commands["README.md"]
    refused = {f"{path}: {command}": reason for path, found in commands.items() for command in found
               if (reason := refusal(command))}
    assert not refused, "commands the documents give that the CLI refuses:\n" + "\n".join(
        f"{command}\n    -> {reason}" for command, reason in refused.items())


def test_the_refusal_check_catches_unknown_flags_bad_values_and_a_missing_destination():
    assert "--no-such-flag" in refusal("hf-mudsc merge a b --no-such-flag --output m")
    assert "--method" in refusal("hf-mudsc merge a b --method no_such_method --output m")
    assert "--output" in refusal("hf-mudsc merge a b --method linear")
    assert refusal("hf-mudsc merge a b --method linear --output m") is None
    assert refusal("hf-mudsc merge --recipe r.yaml --output m") is None  # the file is not read here
    assert refusal("hf-mudsc merge --help") is None


# --- README and docs: every keyword their Python examples pass to the public functions exists -----------------

PUBLIC_CALLS = ("merge", "from_pretrained", "save_merged", "push_merged", "evaluate_merge")


def public_call_keywords(source: str) -> list[tuple[str, str]]:
    """(function, keyword) of every `hf_mudsc.<public function>(..., keyword=...)` call in a Python block."""
    import ast
    import textwrap

    found = []
    for node in ast.walk(ast.parse(textwrap.dedent(source))):  # a snippet may be indented as in its file
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in PUBLIC_CALLS
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "hf_mudsc"):
            found += [(node.func.attr, keyword.arg) for keyword in node.keywords if keyword.arg]
    return found


def test_every_keyword_the_documents_pass_to_a_public_function_exists():
    import dataclasses
    import inspect

    import hf_mudsc
    from hf_mudsc.options import MergeOptions

    options = {field.name for field in dataclasses.fields(MergeOptions)}
    accepted = {name: set(inspect.signature(getattr(hf_mudsc, name)).parameters) for name in PUBLIC_CALLS}
    for name in ("merge", "from_pretrained"):
        accepted[name] |= options
    calls = []
    for path in (README, *sorted((ROOT / "docs").glob("*.md"))):
        for block in re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.DOTALL):
            calls += [(str(path.relative_to(ROOT)), *call) for call in public_call_keywords(block)]
    assert ("README.md", "merge", "refit") in calls
    unknown = sorted({call for call in calls if call[2] not in accepted[call[1]]})
    assert not unknown, f"keywords the documents' examples pass that the functions do not take: {unknown}"


# --- README and docs: every script command they print names a script and flags it has ------------------------

SCRIPT_COMMAND = re.compile(r"python3? (scripts/\w+\.py)((?:[ \t]+[^\s`#&|;]+)*)")


def script_flags(script: Path) -> set[str]:
    """The long flags a script declares (`"--name"` in its source or in the sibling scripts it imports)."""
    sources = [script.read_text(encoding="utf-8")]
    for module in re.findall(r"^(?:from|import) (\w+)", sources[0], flags=re.MULTILINE):
        if (script.parent / f"{module}.py").is_file():
            sources.append((script.parent / f"{module}.py").read_text(encoding="utf-8"))
    return {flag for source in sources for flag in re.findall(r"[\"'](--[a-z][\w-]*)[\"']", source)}


def test_every_script_command_the_readme_and_the_docs_give_exists_with_its_flags():
    from readme_examples import shell_lines

    wrong = []
    count = 0
    for path in (README, *sorted((ROOT / "docs").glob("*.md"))):
        text = path.read_text(encoding="utf-8")
        spans = [" ".join(span.split()) for span in re.findall(r"`(python3? scripts/[^`]+)`", text)]
        for script, arguments in SCRIPT_COMMAND.findall("\n".join([*shell_lines(text), *spans])):
            count += 1
            if not (ROOT / script).is_file():
                wrong.append(f"{path.name}: {script} does not exist")
                continue
            unknown = [flag for flag in re.findall(r"(?<!\S)--[a-z][\w-]*", arguments)
                       if flag not in script_flags(ROOT / script)]
            if unknown:
                wrong.append(f"{path.name}: {script} has no {unknown}")
    assert count > 15 and not wrong, (count, wrong)


# Topics whose section a citation right after them must be: a citation within a phrase naming one of them sends the
# reader to a section that mentions it (a renumbering once left RegMean cited as §4.10, the tensor-wise methods).
TOPICS = ("regmean", "fisher", "size budget")


def section_texts() -> dict[str, str]:
    text = DESIGN.read_text(encoding="utf-8")
    marks = [(match.start(), match.group(2)) for match in HEADING.finditer(text)]
    return {number: text[start:(marks[i + 1][0] if i + 1 < len(marks) else len(text))].lower()
            for i, (start, number) in enumerate(marks)}


def test_a_citation_after_a_topic_sends_to_a_section_about_it():
    bodies = section_texts()
    wrong = []
    for path in [*sorted(p for folder in SOURCES for p in (ROOT / folder).rglob("*.py")), README, DESIGN]:
        text = path.read_text(encoding="utf-8")
        pattern = SELF_CITATION if path == DESIGN else CITATION
        for match in pattern.finditer(text):
            if match.group(2) or (path == DESIGN and re.search(r"\.md`?\s*$", text[max(0, match.start() - 12):
                                                                                   match.start()])):
                continue  # a range (its topic may be in any of its sections), or another document's section
            before = text[max(0, match.start() - 120):match.start()].lower().replace("\n", " ")
            before = before.rsplit(".  ", 1)[-1].rsplit("\n\n", 1)[-1]
            for topic in TOPICS:
                if topic in before and topic not in bodies.get(match.group(1), topic):
                    wrong.append(f"{path.relative_to(ROOT)}: '{topic}' cited as §{match.group(1)}")
    assert not wrong, "\n".join(wrong)
