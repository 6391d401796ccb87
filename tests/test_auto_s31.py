"""`method="auto"` given a base: the base must be the parents' base by their weights before a task-vector method
reads task vectors from it (session 31, the s30 hunt's left-alone finding)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from factories import make_model

import hf_mudsc

pytestmark = pytest.mark.usefixtures("one_thread_module")


def _fine_tunes(base: torch.nn.Module) -> list[torch.nn.Module]:
    tunes = []
    for seed in (1, 2):
        tuned = copy.deepcopy(base)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for tensor in tuned.parameters():
                tensor += 0.01 * torch.randn(tensor.shape, generator=generator)
        tunes.append(tuned)
    return tunes


def _with_a_foreign_base(given_as: str, tmp_path) -> tuple[list, object]:
    """Two fine-tunes of one model and an unrelated model as their base: objects, or folders (`given_as`)."""
    true_base, unrelated = make_model("vit_cls", 0), make_model("vit_cls", 7)
    parents: list = _fine_tunes(true_base)
    if given_as == "objects":
        return parents, unrelated
    for index, parent in enumerate(parents):
        parent.save_pretrained(tmp_path / f"p{index}")
    unrelated.save_pretrained(tmp_path / "base")
    return [str(tmp_path / "p0"), str(tmp_path / "p1")], str(tmp_path / "base")


@pytest.mark.parametrize("given_as", ["objects", "folders"])
def test_auto_does_not_read_task_vectors_from_a_base_the_parents_are_not_fine_tunes_of(given_as, tmp_path, caplog):
    """Two fine-tunes of one model and `base=` an unrelated model: auto picked `ties` from that base (the warning
    said every parent is independent of it) — logits 0.85 off the parents' mean where linear is 0.15. Auto now
    leaves that base unused and merges as without one (linear), saying why; both loading paths (objects: chosen
    after loading; folders: chosen before loading whole)."""
    parents, base = _with_a_foreign_base(given_as, tmp_path)
    with caplog.at_level(logging.WARNING, logger="hf_mudsc"):
        merged = hf_mudsc.merge(parents, base=base, progress=False)
    record = merged.config.mudsc
    assert record["method"] == "linear", record["method_choice_reason"]
    assert "not the parents' base" in record["method_choice_reason"], record["method_choice_reason"]
    linear = hf_mudsc.merge(parents, method="linear", progress=False)
    for name, tensor in linear.state_dict().items():
        assert torch.equal(merged.state_dict()[name], tensor), name
    assert "task vectors from this base will be large" not in caplog.text, caplog.text


def test_auto_still_reads_task_vectors_from_the_parents_own_base():
    """The documented dataless choice stands when the base is theirs: ties from it."""
    true_base = make_model("vit_cls", 0)
    merged = hf_mudsc.merge(_fine_tunes(true_base), base=true_base, progress=False)
    assert merged.config.mudsc["method"] == "ties", merged.config.mudsc["method_choice_reason"]


@pytest.mark.parametrize("given_as", ["objects", "folders"])
def test_a_data_method_that_does_not_fit_is_not_brought_back_by_an_unused_base(given_as, tmp_path, monkeypatch):
    """With data, regmean that does not fit gives way to the dataless choice (ties, with a base); the base then found
    foreign re-chose without the memory check: regmean again, which crashed on the parents already opened for
    streaming. The base is judged before the choice now: linear, the dataless choice without a base."""
    import hf_mudsc.pipeline as pipeline

    monkeypatch.setattr(pipeline, "memory_shortfall", lambda model, count, method, **kwargs: (
        (8e9, 1e9) if method is not None and method.needs_data else None))
    from factories import make_batches

    parents, base = _with_a_foreign_base(given_as, tmp_path)
    merged = hf_mudsc.merge(parents, make_batches("vit_cls", 2, 8), base=base, progress=False)
    record = merged.config.mudsc
    assert record["method"] == "linear", record["method_choice_reason"]
    assert "does not fit" in " ".join(record["warnings"]) or "memory" in record["method_choice_reason"]
    assert "not the parents' base" in record["method_choice_reason"]


def test_the_unused_base_warning_does_not_advise_what_auto_refused():
    """auto left a foreign base unused, and the same merge's warning advised "pass a method that merges task vectors
    from it (e.g. method='ties')" — what auto had just refused."""
    true_base, unrelated = make_model("vit_cls", 0), make_model("vit_cls", 7)
    merged = hf_mudsc.merge(_fine_tunes(true_base), base=unrelated, progress=False)
    said = [text for text in merged.config.mudsc["warnings"] if "does not read the base" in text]
    assert said and "method='ties'" not in said[0] and "not fine-tunes of it" in said[0], said
