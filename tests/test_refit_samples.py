"""`refit_samples`: the refit's example count — "auto" from the layers' shapes, an int exactly, None all."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification

import hf_mudsc
from hf_mudsc.apply.refit import AUTO_SAMPLES_CAP, AUTO_SAMPLES_FLOOR, auto_refit_samples
from hf_mudsc.cli.merge import int_or_auto
from hf_mudsc.errors import OptionError
from hf_mudsc.options import MergeOptions
from hf_mudsc.publish.card import render_card
from hf_mudsc.publish.recipe import Recipe
from tests.factories import randomize


def test_auto_gives_every_per_token_layer_sixteen_rows_per_unknown_within_floor_and_cap():
    # (unknowns d+1, rows per example): the toy digit ViT at hidden 256 (17 tokens, fc2 reads 1024 units).
    assert auto_refit_samples([(257, 17.0), (1025, 17.0), (257, 1.0)]) == math.ceil(16 * 1025 / 17) == 965
    assert auto_refit_samples([(257, 17.0)]) == math.ceil(16 * 257 / 17) == 242  # hidden 64
    assert auto_refit_samples([(1537, 64.0), (385, 1.0)]) == 385  # MiniLM, 64 tokens: the pooler does not count
    assert auto_refit_samples([(65, 17.0)]) == AUTO_SAMPLES_FLOOR == 128  # narrow layers: the floor
    assert auto_refit_samples([(3073, 2.0)]) == AUTO_SAMPLES_CAP == 1024  # few tokens, wide layer: the cap
    assert auto_refit_samples([(257, 1.0)]) == auto_refit_samples([]) == 128  # per-example layers only


def wide_vit(seed: int) -> ViTForImageClassification:
    """8x8 images in 4x4 patches (5 tokens) and a 160-unit MLP: auto asks for ceil(16 * 161 / 5) = 516 examples."""
    torch.manual_seed(seed)
    config = ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=160,
                       image_size=8, patch_size=4, num_channels=1, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, num_labels=3)
    return randomize(ViTForImageClassification(config), seed)


def test_auto_resolves_from_the_model_and_records_the_count_an_int_is_exact(tmp_path):
    generator = torch.Generator().manual_seed(0)
    batches = [{"pixel_values": torch.randn(100, 1, 8, 8, generator=generator)} for _ in range(7)]  # 700 images
    parents = [wide_vit(1), wide_vit(2)]
    merged = hf_mudsc.merge(parents, batches, matcher="align", refit="ridge", progress=False)
    report = merged.merge_report.refit
    assert report.samples == report.examples == merged.config.mudsc["refit_examples"] == 516
    assert merged.config.mudsc["refit_samples"] == "auto" and merged.merge_report.recipe["refit_samples"] == "auto"
    assert {fit.samples for fit in report.layers if fit.name != "classifier"} == {516 * 5}  # every token of 516
    card = str(render_card(merged, Recipe(models=["a", "b"], calibration="c")))
    assert "| Refit / ridge λ (relative) / examples | ridge / 0.001 / auto: 516 examples |" in card
    gated = hf_mudsc.merge(parents, batches, matcher="align", progress=False)  # the default: the gate
    assert gated.merge_report.refit.examples == 516 and gated.config.mudsc["refit_gate"]["held_out_examples"] == 140
    exact = hf_mudsc.merge(parents, batches, matcher="align", refit_samples=300, progress=False)
    assert exact.merge_report.refit.examples == exact.config.mudsc["refit_examples"] == 300
    assert exact.merge_report.refit.samples == 300 and exact.config.mudsc["refit_samples"] == 300
    everything = hf_mudsc.merge(parents, batches, matcher="align", refit="ridge", refit_samples=None, progress=False)
    assert everything.merge_report.refit.examples == 700 and everything.merge_report.refit.samples is None
    gated = hf_mudsc.merge(parents, batches, matcher="align", refit_samples=None, progress=False)  # the default
    assert gated.merge_report.refit.examples == 560  # all: the 700 images but the 140 the gate holds out
    plain = hf_mudsc.merge(parents, batches, matcher="align", refit="none", progress=False)
    assert plain.config.mudsc["refit_examples"] is None and plain.config.mudsc["refit_samples"] is None


def test_refit_samples_values_and_refusals():
    assert MergeOptions.check("refit_samples", "auto") == "auto"
    assert MergeOptions.check("refit_samples", 64) == 64 and MergeOptions.check("refit_samples", None) is None
    assert int_or_auto("auto") == "auto" and int_or_auto("12") == 12
    with pytest.raises(OptionError, match=r"refit_samples must be an int or 'auto' \(CLI: --refit-samples\)"):
        MergeOptions.check("refit_samples", "many")
    with pytest.raises(OptionError, match=r"refit_samples must be >= 1, 'auto'.*--refit-samples"):
        MergeOptions.check("refit_samples", 0)


def test_the_refit_says_how_many_examples_it_used_when_the_data_holds_fewer(caplog):
    """The log said "refit_samples='auto': 516 examples" while the refit read the 32 the data held (the config and
    the card said 32): the count said is a target; when the data holds fewer, a line says how many were used."""
    import logging

    generator = torch.Generator().manual_seed(0)
    batches = [{"pixel_values": torch.randn(8, 1, 8, 8, generator=generator)} for _ in range(5)]  # 40 images
    parents = [wide_vit(1), wide_vit(2)]
    with caplog.at_level(logging.INFO, logger="hf_mudsc"):
        merged = hf_mudsc.merge(parents, batches, matcher="align", progress=False)  # the gate holds out 8
    assert merged.config.mudsc["refit_examples"] == 32
    refit_lines = [r.getMessage() for r in caplog.records if r.name == "hf_mudsc.apply.refit"]
    assert any(line.startswith("refit_samples='auto': up to 516 examples") for line in refit_lines), refit_lines
    assert any("the data holds 32 examples" in line and "all 32 are used" in line for line in refit_lines), refit_lines
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hf_mudsc"):
        hf_mudsc.merge(parents, batches, matcher="align", refit_samples=16, progress=False)
    assert not any("the data holds" in r.getMessage() for r in caplog.records)  # 16 of 32: as asked


def test_auto_counts_rows_per_example_over_examples_not_the_first_batch():
    """Invariance bug hunt s29: `refit_samples="auto"` counted the rows per example on the first calibration batch:
    the same sentences batched by 1 (the first one short) or all at once asked for other example counts (392 vs
    128) and gave another merged model. Counted over the first examples, whatever their batching."""
    from transformers import BertConfig, BertForSequenceClassification

    from tests.factories import BERT

    def bert(seed: int) -> BertForSequenceClassification:
        torch.manual_seed(seed)
        return randomize(BertForSequenceClassification(BertConfig(**BERT)), seed).eval()

    generator = torch.Generator().manual_seed(0)
    lengths = [2] + [int(torch.randint(10, 13, (1,), generator=generator)) for _ in range(199)]

    def batches(size: int) -> list[dict[str, torch.Tensor]]:
        out = []
        for start in range(0, len(lengths), size):
            chunk = lengths[start:start + size]
            ids = torch.zeros(len(chunk), 16, dtype=torch.long)
            mask = torch.zeros(len(chunk), 16, dtype=torch.long)
            for row, length in enumerate(chunk):
                rows = torch.Generator().manual_seed(start + row)
                ids[row, :length] = torch.randint(1, 50, (length,), generator=rows)
                mask[row, :length] = 1
            out.append({"input_ids": ids, "attention_mask": mask})
        return out

    parents = [bert(1), bert(2)]
    counts = {size: hf_mudsc.merge(parents, batches(size), method="mudsc", refit="ridge", progress=False)
              .config.mudsc["refit_examples"] for size in (200, 1, 7)}
    assert len(set(counts.values())) == 1, counts


def test_with_alpha_auto_the_refit_reads_the_examples_asked_for_out_of_the_whole_stream():
    """Invariance bug hunt s29: under alpha="auto" the statistics count only the examples not held out (4 in 5), and
    that count was handed to the refit as the stream's size: its seeded subset could never pick the last fifth, and
    `refit_samples=180` of 200 read all 200. The refit draws from the whole stream."""
    generator = torch.Generator().manual_seed(0)
    batches = [{"pixel_values": torch.randn(20, 1, 8, 8, generator=generator)} for _ in range(10)]  # 200 images
    parents = [wide_vit(1), wide_vit(2)]
    merged = hf_mudsc.merge(parents, batches, alpha="auto", refit="ridge", refit_samples=180, progress=False)
    assert merged.config.mudsc["refit_examples"] == merged.merge_report.refit.examples == 180
