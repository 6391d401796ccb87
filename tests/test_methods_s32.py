"""Same-base method definitions, from the s32 method-definitions hunt: the docs call the registered methods "not
yet methods"; consensus's TALL masks read the weighted sum of the task vectors (the paper, tall_masks and
FusionBench read the plain sum), and k == N with lambda >= 1 kept no entry for N >= 3 either; breadcrumbs' gamma
drops fewer largest entries than asked when density + gamma > 1, silently; a base resized to fewer tokens than its
fine-tunes is refused as no base of theirs; a base lacking the head filled it with weights no method accepts."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------ the docs name the registered methods as such


def test_the_docs_do_not_call_the_registered_same_base_functions_not_yet_methods():
    """README's layout and task_vectors' docstring said the functions are "not yet methods" / "not yet registered
    as merge methods", though every one of them is a registered method."""
    from hf_mudsc.methods import METHODS
    from hf_mudsc.solve import task_vectors

    assert {"task_arithmetic", "ties", "breadcrumbs", "consensus", "pcb", "regmean", "fisher"} <= set(METHODS)
    layout = next(line for line in (ROOT / "README.md").read_text().splitlines()
                  if line.strip().startswith("task_vectors.py"))
    doc = inspect.getdoc(task_vectors)
    assert "not yet" not in layout and "registered methods" in layout, layout
    assert "not yet" not in doc and "registered methods" in doc, doc
