"""Regressions the session-32 review found in that day's fixes (test first): a base of an unsupported model type is
refused as the base; a concatenated head is not counted as filled by the base-less weighted mean; the
resized-vocabulary advice for CLIP names a fix that works; the gate's significance test on examples with spread."""

from __future__ import annotations

import pytest
import torch
from factories import fine_tune, make_model, with_new_head
from transformers import GPT2Config, GPT2LMHeadModel, ViTConfig, ViTModel

import hf_mudsc
from hf_mudsc.apply.fidelity import Agreement, significantly_lower, tasks_below
from hf_mudsc.errors import ParentMismatchError

pytestmark = pytest.mark.usefixtures("one_thread_module")


def test_a_base_of_an_unsupported_model_type_is_refused_as_the_base(tmp_path):
    parents = []
    for seed in (1, 2):
        make_model("bert_cls", seed=seed).save_pretrained(tmp_path / f"p{seed}")
        parents.append(str(tmp_path / f"p{seed}"))
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=50, n_positions=16)).save_pretrained(
        tmp_path / "base")
    with pytest.raises(ParentMismatchError, match=r"^the base '.*base' is not of the parents' model type \(bert\): "
                                                  r"hf_mudsc cannot merge GPT2LMHeadModel \(model_type='gpt2'\), so "
                                                  r"the parents are not fine-tunes of it; pass the base"):
        hf_mudsc.merge(parents, method="task_arithmetic", base=str(tmp_path / "base"), progress=False)


def test_a_headless_base_with_concatenated_heads_fills_nothing_so_large_shares_merge(tmp_path):
    """Parents with 2 and 3 labels: their heads are concatenated, not filled with the weighted mean, so weights
    [1, -0.995] (a factor 200 on a filled tensor) are no reason to refuse — as before 17214dd."""
    body = make_model("vit_cls", seed=1)
    parents = [fine_tune(with_new_head(body, labels, seed=labels), labels, 0.05, relative=True) for labels in (2, 3)]
    config = ViTConfig(**{k: v for k, v in body.config.to_dict().items() if k in ViTConfig().to_dict()})
    base = ViTModel(config, add_pooling_layer=False)
    base.load_state_dict({k.removeprefix("vit."): v for k, v in body.state_dict().items() if k.startswith("vit.")},
                         strict=False)
    base.save_pretrained(tmp_path / "base")
    merged = hf_mudsc.merge(parents, method="task_arithmetic", base=str(tmp_path / "base"), weights=[1, -0.995],
                            progress=False)
    heads = torch.cat([p.classifier.weight for p in parents])
    assert torch.equal(merged.classifier.weight, heads)


def test_the_significance_test_counts_a_drop_beyond_the_spread_and_not_one_within_it():
    generator = torch.Generator().manual_seed(0)
    reference = torch.randn(200, generator=generator, dtype=torch.float64)
    noise = 0.1 * torch.randn(200, generator=generator, dtype=torch.float64)
    assert significantly_lower(reference - 0.05 + noise, reference)  # 0.05 below, spread 0.1: t ≈ -7
    assert not significantly_lower(reference - 0.002 + noise, reference)  # 0.002 below: t ≈ -0.3
    assert not significantly_lower(reference + noise, reference + noise)  # no difference at all
    chosen = Agreement(-1.0, (-0.6, -0.5), (reference - 0.05 + noise, reference - 0.002 + noise))
    base = Agreement(-1.0, (float((reference).mean()), float(reference.mean())), (reference, reference))
    chosen = Agreement(-1.0, tuple(float(x.mean()) for x in chosen.examples), chosen.examples)
    assert tasks_below(chosen, base) == (0,)  # task 1's mean is lower too, within its spread


def test_the_significance_test_reads_examples_from_any_device_as_float64():
    values = torch.tensor([0.0, -1.0, -2.0, -1.5], dtype=torch.float32)
    assert significantly_lower(values - 5, values)


def test_a_clip_base_whose_text_vocabulary_the_parents_resized_names_only_a_fix_that_works(tmp_path):
    """CLIPModel has no working resize_token_embeddings (transformers raises NotImplementedError): the refusal
    must not advise it there; a method without a base is the fix."""
    base = make_model("clip", seed=1)
    base.save_pretrained(tmp_path / "base")
    parents = []
    for seed in (2, 3):
        parent = fine_tune(base, seed, 0.01)
        embedding = parent.text_model.embeddings.token_embedding
        grown = torch.nn.Embedding(embedding.num_embeddings + 4, embedding.embedding_dim)
        with torch.no_grad():
            grown.weight[:embedding.num_embeddings] = embedding.weight
        parent.text_model.embeddings.token_embedding = grown
        parent.config.text_config.vocab_size += 4
        parent.save_pretrained(tmp_path / f"p{seed}")
        parents.append(str(tmp_path / f"p{seed}"))
    with pytest.raises(ParentMismatchError) as refusal:
        hf_mudsc.merge(parents, method="task_arithmetic", base=str(tmp_path / "base"), progress=False, dry_run=True)
    message = str(refusal.value)
    assert "vocabulary was resized from the base's" in message and "resize_token_embeddings" not in message
    assert message.endswith("merge with a method that reads no base (e.g. method='linear')")
