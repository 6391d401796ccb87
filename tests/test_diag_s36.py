"""The figures a merge reports about itself (report, card, config.mudsc, dry run, inspect, plots) against an
independent computation on tiny models (session 36's diagnostics hunt)."""

from __future__ import annotations

import pytest
from factories import KINDS, make_batches, make_model

import hf_mudsc
from hf_mudsc.architectures import spec_for
from hf_mudsc.calibrate.statistics import collect_statistics
from hf_mudsc.plan import group_tokens_per_example, tokens_per_example

pytestmark = pytest.mark.usefixtures("one_thread_module")


def _size_warning(texts) -> list[str]:
    return [text for text in texts if text.startswith("calibration too small")]


def test_the_dry_run_warns_of_too_little_data_as_the_merge_does():
    """merge(3 vit_cls, 64 examples, dry_run=True) said nothing, the merge then warned 'residual saw 64 rows, fewer
    than the 96 units': the plan counted the classifier's input (the class token) at 17 rows per example."""
    models = [make_model("vit_cls", seed, 3) for seed in (1, 2, 3)]
    batches = make_batches("vit_cls", 4, 16)
    plan = hf_mudsc.merge(models, batches, method="mudsc", refit="none", dry_run=True, progress=False)
    merged = hf_mudsc.merge(models, batches, method="mudsc", refit="none", progress=False)
    said = _size_warning(merged.config.mudsc["warnings"])
    assert said and "'residual'" in said[0], merged.config.mudsc["warnings"]
    assert _size_warning(plan.warnings) == said, plan.warnings


@pytest.mark.parametrize("kind", KINDS)
def test_the_dry_run_counts_the_rows_each_group_reads(kind):
    """The plan's calibration rows per example of each group (its size warning and time estimate) against what the
    statistics count: a group read at the first token or a pooled output sees one row per example per hook, not one
    per token (ViT's classifier input, BERT's pooler, CLIP's projections)."""
    model_a, model_b = make_model(kind, 1, 3), make_model(kind, 2, 3)
    spec = spec_for(model_a)
    batches = make_batches(kind, 2, 8)
    counts = [acc.count for acc in collect_statistics(model_a, model_b, spec, batches, progress=False)]
    planned = group_tokens_per_example(spec, tokens_per_example(model_a.config)[0])
    for group, count, tokens in zip(spec.groups, counts, planned):
        hooks = len(group.hooks)
        if count == 16 * hooks:  # one row per example per hook
            assert tokens == hooks, (group.name, count, tokens)
        elif "input_ids" in spec.inputs:  # text: the padding is dropped, the plan assumes a length
            assert tokens * 16 >= count > 16 * hooks, (group.name, count, tokens)
        else:
            assert tokens * 16 == count, (group.name, count, tokens)
