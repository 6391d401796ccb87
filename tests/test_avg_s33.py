"""Defects of the averaging check, the refit gate's per-task guard and `auto`'s memory check around them (session 33,
the s33 avg hunt): each reproduced here first."""

from __future__ import annotations

import copy

import pytest
import torch
from factories import fine_tune, make_batches, make_model

import hf_mudsc

pytestmark = pytest.mark.usefixtures("one_thread_module")


def named_labels(model: torch.nn.Module, labels: list[str]) -> torch.nn.Module:
    model = copy.deepcopy(model)
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {label: index for index, label in enumerate(labels)}
    return model


def fine_tunes_of_one_base(count: int) -> list[torch.nn.Module]:
    """`count` fine-tunes of one toy ViT with label sets of their own (a concatenated head): what `auto` merges with
    regmean, confirmed by mudsc's solve, and holds against plain averaging."""
    base = make_model("vit_cls", 0)
    return [named_labels(fine_tune(base, seed=seed, scale=0.01), [f"{seed}-{i}" for i in range(3)])
            for seed in range(1, count + 1)]


def test_auto_checks_the_memory_of_every_parents_solve_when_the_pair_check_overturns(monkeypatch):
    """With more than two parents `auto`'s correspondence check solves one pair (its memory checked for two); when
    that solve says the units moved, mudsc merges every parent — its statistics, 9/4 of the pair's for three, were
    never held against the memory available: a merge that fit by the check ran out of memory in calibration. Now
    refused in one line, before that pass, naming auto's choice and the most parents that fit."""
    import hf_mudsc.calibrate.distributed as distributed
    import hf_mudsc.methods.auto as auto
    import hf_mudsc.plan as plan
    from hf_mudsc.errors import MergeInputError
    from hf_mudsc.methods.registry import METHODS

    parents = fine_tunes_of_one_base(3)
    model = parents[0]
    pair = sum(plan.memory_floor(model, 2, METHODS["mudsc"], loading=0).values())
    three = sum(plan.memory_floor(model, 3, METHODS["mudsc"], loading=0).values())
    regmean = sum(plan.memory_floor(model, 3, METHODS["regmean"], loading=0).values())
    available = int(max(pair, regmean) * 1.05)
    assert available < three  # regmean and the pair's check fit; every parent's solve does not
    monkeypatch.setattr(plan, "available_memory", lambda: available)
    monkeypatch.setattr(auto, "IN_PLACE_MAJORITY", 1.5)  # every solve "moves" units: the pair's check overturns
    passes = []
    real = distributed.collect_statistics_distributed
    monkeypatch.setattr(distributed, "collect_statistics_distributed",
                        lambda *args, **kwargs: passes.append(len(kwargs.get("others") or ())) or real(*args, **kwargs))
    with pytest.raises(MergeInputError) as caught:
        hf_mudsc.merge(parents, make_batches("vit_cls", num_batches=3, batch_size=8), progress=False)
    message = str(caught.value)
    assert "\n" not in message, message
    assert message.startswith("method 'auto' chose 'mudsc' (") and "merging 3 parents with mudsc" in message, message
    assert "merge at most 2 parents at a time" in message, message
    assert passes == [0], passes  # the pair's statistics were read; every parent's were not
