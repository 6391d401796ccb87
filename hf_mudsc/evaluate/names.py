"""Names of the evaluation's views, scorers and files, kept free of heavy imports.

The CLI's `evaluate --help` shows some of them; importing the evaluation stack (torch, datasets, evaluate:
seconds) just for these strings would make help slow.
"""

from __future__ import annotations

import os
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hf_mudsc.errors import EvaluationError, parent_names

JOINT = "joint"
#: How a concatenated head (merged model or ensemble) decides the joint test: `per_task` — each task's softmax
#: over its own slice, then the argmax (the default); `raw` — the argmax over the raw concatenated logits (what a
#: `transformers` pipeline does with a merged model). Both models are always scored by the same rule.
JOINT_RULES = ("per_task", "raw")
AVERAGE = "average"
#: The scorer names of parents A and B; `parent_names(count)` (from `errors`, where publish reads them too) names
#: `count` parents in merge order.
PARENT_NAMES = tuple(parent_names(2))


ENSEMBLE = "ensemble"
MERGED = "merged"
LABEL_COLUMNS = ("label", "labels")
DEFAULT_PROMPT = "a photo of a {}."
RESULTS_FILENAME = "eval_results.json"
SHIPPED_METRIC_NAMES = ("accuracy", "f1")  # the keys of metrics.SHIPPED_METRICS (a test keeps them equal)
#: How a shipped metric averages, as the card's table (`f1 (macro)`) and `model-index` (`args`) say it: `f1` alone
#: could be read as micro-F1, which for one label per row is the accuracy.
SHIPPED_METRIC_ARGS = {"f1": {"average": "macro"}}


def refuse_token_names(named: Sequence[tuple[str, Any]]) -> None:
    """Refuse a name shaped like an access token (`where` it was given, never the value): task names, columns, class
    names and prompts are written into the results file and the card's `model-index`, printed in the table and named
    by errors, so a token pasted as one (`--dataset $HF_TOKEN=data:test`) would be published. `named`: `(where,
    value)` pairs, a value being a text, a mapping (its keys and values) or a sequence of them; as `merge` refuses a
    token in any text option."""
    from hf_mudsc.load.references import TOKEN_FIX, looks_like_token

    def texts(value: Any) -> list[str]:
        if isinstance(value, str):
            return [value]
        if isinstance(value, Mapping):
            return [text for key, item in value.items() for text in (*texts(key), *texts(item))]
        if isinstance(value, (list, tuple)):
            return [text for item in value for text in texts(item)]
        return []

    for where, value in named:
        if any(looks_like_token(text) for text in texts(value)):
            raise EvaluationError(f"{where} looks like a Hugging Face access token (not shown); {TOKEN_FIX}")


def check_metric_names(names: Sequence[str]) -> None:
    """At least one metric, each once: a metric named twice would put every figure twice on the card (its table and
    `model-index`), none would give a result without figures. Here, not in `metrics`, so the CLI checks its flags
    before the evaluation stack is imported."""
    if not names:
        raise EvaluationError(f"no metric to compute: pass at least one (shipped: {', '.join(SHIPPED_METRIC_NAMES)})")
    twice = next((name for index, name in enumerate(names) if name in names[:index]), None)
    if twice is not None:
        raise EvaluationError(f"metric {twice!r} is given twice; name each metric once")
    shown = [metric_shown_name(name) for name in names]
    for index, name in enumerate(names):
        if shown[index] == name:
            continue
        if shown[index] in SHIPPED_METRIC_NAMES:
            raise EvaluationError(f"metric {name!r} is a local folder named like the shipped metric "
                                  f"{shown[index]!r}, and results and cards name it by its folder's name: rename it")
        other = next((names[i] for i in range(len(names)) if i != index and shown[i] == shown[index]), None)
        if other is not None:
            raise EvaluationError(f"metrics {name!r} and {other!r} are both named {shown[index]!r} in results and "
                                  "cards (a local metric by its folder's name): rename one")


def metric_shown_name(name: str) -> str:
    """How results and cards name a metric: a local folder or script by its name (`/home/me/metrics/sidefx` ->
    `sidefx`, `./sidefx.py` -> `sidefx`), as they name local data — never a path of this machine; any other name
    (shipped, a Hub metric or Space) as given."""
    if not os.path.exists(os.path.expanduser(name)):
        return name
    path = Path(os.path.expanduser(name)).absolute()
    return path.stem if path.suffix == ".py" else path.name


def check_prompt_templates(templates: str | Sequence[str]) -> list[str]:
    """The CLIP prompt template(s) as a list, each holding exactly one `{}` (the class name) and no other field:
    `"a {} in {}"` failed in `str.format` with an IndexError, `"a {} of {style}"` with a KeyError, both only after
    every model was loaded. Here, free of heavy imports, so the CLI refuses them before anything loads."""
    given = [templates] if isinstance(templates, str) else list(templates)
    if not given:
        raise EvaluationError(f"no prompt template: pass at least one with {{}} for the class name, e.g. "
                              f"{DEFAULT_PROMPT!r}")
    for template in given:
        if not isinstance(template, str):
            raise EvaluationError(f"prompt template {template!r} is not text; pass e.g. {DEFAULT_PROMPT!r}")
        try:
            fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                      if name is not None]
        except ValueError as error:  # a lone `{` or `}`
            raise EvaluationError(f"prompt template {template!r} is not a format string ({error}); write a literal "
                                  "brace as {{ or }}") from None
        if fields != [("", "", None)]:
            raise EvaluationError(
                f"prompt template {template!r} has {len(fields)} replacement field(s) "
                f"({', '.join('{' + name + '}' for name, _, _ in fields) or 'none'}); it needs exactly one {{}} for "
                f"the class name and no other field (a literal brace as {{{{ or }}}}), e.g. {DEFAULT_PROMPT!r}")
    return given
