"""The held-out fidelity behind `alpha="auto"` and the refit gate reads every tower of a dual-encoder (session 31)."""

from __future__ import annotations

import copy

import pytest
import torch
from factories import make_batches, make_model

from hf_mudsc.apply.fidelity import FidelityScorer

pytestmark = pytest.mark.usefixtures("one_thread_module")


def test_a_clip_merge_with_a_broken_text_tower_scores_below_an_intact_one():
    """A CLIPModel has no logits: the score read only `image_embeds`, so a merge whose text tower was destroyed
    scored exactly as an intact one, and the gate and the α search decided on the image tower alone."""
    a, b = make_model("clip", seed=0), make_model("clip", seed=1)
    held_out = make_batches("clip", num_batches=2, batch_size=8, seed=7)
    scorer = FidelityScorer([a, b], held_out, task_sizes=None, mask_key="attention_mask")
    intact, broken = copy.deepcopy(a), copy.deepcopy(a)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in broken.named_parameters():
            if name.startswith(("text_model.", "text_projection")):
                tensor.copy_(5 * torch.randn(tensor.shape, generator=generator))
    assert scorer(broken) < scorer(intact) - 0.05, (scorer(broken), scorer(intact))
    assert scorer.log_likelihood(broken) < scorer.log_likelihood(intact) - 0.05
    # each tower of parent A scored against itself is 1: A's copy scores as the mean over parents of both towers
    alone = FidelityScorer([a], held_out, task_sizes=None, mask_key="attention_mask")
    assert alone(intact) == pytest.approx(1.0)
    assert "image and text" in scorer.measure, scorer.measure

