"""Text encoders beyond BERT end to end. DistilBERT: folders with a tokenizer and raw text, different label sets, a
size budget, the CLI, `from_pretrained` and `pipeline()` of the result, sinusoidal position tables, and the head
classes the adapter refuses (the permuted-copy and option matrices cover it through `tests/factories.py`'s rows).
XLM-RoBERTa and CamemBERT: RoBERTa's adapter under their model types."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    DistilBertConfig,
    DistilBertForMaskedLM,
    DistilBertForMultipleChoice,
    DistilBertForQuestionAnswering,
    DistilBertForSequenceClassification,
    DistilBertForTokenClassification,
    DistilBertTokenizerFast,
    pipeline,
)

import hf_mudsc
from hf_mudsc.architectures import spec_for
from hf_mudsc.cli.main import main
from hf_mudsc.errors import UnsupportedArchitectureError
from hf_mudsc.testing.permute import permute_model, random_permutations

pytestmark = pytest.mark.usefixtures("one_thread_module")

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(40)]
SMALL = dict(vocab_size=len(WORDS), dim=32, n_layers=2, n_heads=4, hidden_dim=48, max_position_embeddings=32,
             dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0)


def tokenizer() -> DistilBertTokenizerFast:
    return DistilBertTokenizerFast(vocab={w: i for i, w in enumerate(WORDS)})


def sentences(count: int, seed: int) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    return [" ".join(f"w{int(i)}" for i in torch.randint(0, 40, (int(n),), generator=generator))
            for n in torch.randint(3, 12, (count,), generator=generator)]


def classifier(seed: int, labels: list[str], **config) -> DistilBertForSequenceClassification:
    torch.manual_seed(seed)
    model = DistilBertForSequenceClassification(DistilBertConfig(**{**SMALL, **config}, num_labels=len(labels),
                                                                 id2label=dict(enumerate(labels))))
    with torch.no_grad():  # away from the init, so that the parents' units are told apart
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape))
    return model.eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("distilbert")
    paths = []
    for seed, labels in ((0, ["neg", "pos"]), (1, ["sport", "news", "tech"])):
        folder = root / f"parent{seed}"
        classifier(seed, labels).save_pretrained(folder)
        tokenizer().save_pretrained(folder)
        paths.append(folder)
    data = root / "calibration"
    datasets.Dataset.from_dict({"text": sentences(48, 3)}).save_to_disk(data)
    return paths, data


def logits(model, texts: list[str]) -> torch.Tensor:
    batch = tokenizer()(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


def test_two_distilbert_folders_with_different_label_sets_merge_to_a_stock_model_with_a_size_budget(folders,
                                                                                                     tmp_path):
    """merge([folder A (2 labels), folder B (3 labels)], text, size=1.5): a stock DistilBertForSequenceClassification
    with both heads, a wider `hidden_dim`, that `from_pretrained` and `pipeline()` read as the merge returned it."""
    (a, b), data = folders
    merged = hf_mudsc.merge([str(a), str(b)], datasets.load_from_disk(str(data)), size=1.5, batch_size=8,
                            progress=False)
    assert type(merged) is DistilBertForSequenceClassification
    assert merged.config.num_labels == 5 and merged.config.task_label_ranges == {"parent0": [0, 2],
                                                                                  "parent1": [2, 5]}
    assert 48 < merged.config.hidden_dim <= 96
    assert merged.distilbert.transformer.layer[0].ffn.lin1.out_features == merged.config.hidden_dim
    parents = sum(p.numel() for p in classifier(0, ["x", "y"]).parameters())
    assert sum(p.numel() for p in merged.parameters()) <= 1.5 * parents + 3 * 33  # + B's head rows
    merged.save_pretrained(tmp_path / "merged")
    tokenizer().save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    texts = sentences(6, 9)
    assert torch.equal(logits(reloaded, texts), logits(merged.eval(), texts))
    predictions = pipeline("text-classification", model=str(tmp_path / "merged"), device="cpu")(texts[:2])
    assert {p["label"] for p in predictions} <= set(merged.config.id2label.values())
    # each task's slice keeps its parent's decisions on most inputs (a merge of two unrelated parents is not
    # exact; this only catches a head wired to the wrong units, where agreement is at chance level)
    many = sentences(64, 11)
    for parent, (start, stop) in ((a, (0, 2)), (b, (2, 5))):
        own = AutoModelForSequenceClassification.from_pretrained(parent).eval()
        agree = (logits(own, many).argmax(-1) == logits(reloaded, many)[:, start:stop].argmax(-1)).float().mean()
        assert agree > 0.6, (parent.name, float(agree))


def test_the_cli_merges_distilbert_folders_and_writes_a_card_naming_the_architecture(folders, tmp_path):
    (a, b), data = folders
    out = tmp_path / "cli-merged"
    assert main(["merge", str(a), str(b), "--calibration", str(data), "--output", str(out), "--batch-size", "8",
                 "--num-samples", "32", "--quiet"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "distilbert" and config["architectures"] == ["DistilBertForSequenceClassification"]
    assert (out / "tokenizer.json").exists() or (out / "vocab.txt").exists()
    card = (out / "README.md").read_text()
    assert "- distilbert\n" in card and "two fine-tuned `DistilBertForSequenceClassification` models" in card
    assert "pipeline_tag: text-classification" in card
    reloaded = AutoModelForSequenceClassification.from_pretrained(out)
    assert reloaded.config.num_labels == 5


@pytest.mark.parametrize("method", ["mudsc", "zipit"])
def test_sinusoidal_position_tables_survive_save_and_reload_of_a_merged_permuted_copy(method, tmp_path):
    """`sinusoidal_pos_embds=True` fills the position table at init: the merged (permuted back) table must be the one
    `from_pretrained` reads, not sinusoids written over it."""
    model = classifier(0, ["a", "b", "c"], sinusoidal_pos_embds=True)
    spec = spec_for(model)
    permuted = permute_model(model, spec, random_permutations(spec, seed=1))
    texts = sentences(32, 4)
    batches = [dict(tokenizer()(texts[i:i + 8], padding=True, return_tensors="pt")) for i in range(0, 32, 8)]
    merged = hf_mudsc.merge([model, permuted], batches, method=method, refit="none", progress=False)
    merged.save_pretrained(tmp_path / "m")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    probe = sentences(5, 8)
    expected = logits(model, probe)
    assert torch.allclose(logits(reloaded, probe), expected, atol=1e-4 * expected.abs().max())


@pytest.mark.parametrize("head", [DistilBertForMultipleChoice, DistilBertForTokenClassification,
                                  DistilBertForQuestionAnswering, DistilBertForMaskedLM])
def test_other_distilbert_heads_are_refused_in_one_line_naming_the_classes_to_use(head):
    models = [head(DistilBertConfig(**SMALL)).eval() for _ in range(2)]
    with pytest.raises(UnsupportedArchitectureError) as caught:
        hf_mudsc.merge(models, [dict(tokenizer()(sentences(4, 0), padding=True, return_tensors="pt"))],
                       progress=False)
    message = str(caught.value)
    assert "\n" not in message and head.__name__ in message, message
    assert "DistilBertModel" in message, message


# RoBERTa's layout twins: XLM-RoBERTa and CamemBERT carry RoBERTa's module names under their own model types.
TWINS = {"xlm-roberta": ("XLMRobertaConfig", "XLMRobertaForSequenceClassification", "XLMRobertaForMaskedLM"),
         "camembert": ("CamembertConfig", "CamembertForSequenceClassification", "CamembertForMaskedLM")}
TWIN = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=24, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.mark.parametrize("model_type", TWINS)
def test_roberta_twins_merge_with_a_permuted_copy_back_to_the_original_and_reload_as_their_class(model_type,
                                                                                                  tmp_path):
    import transformers
    from factories import make_batches, randomize

    config_class, model_class = (getattr(transformers, name) for name in TWINS[model_type][:2])
    torch.manual_seed(0)
    model = randomize(model_class(config_class(**TWIN, num_labels=3)), 0)
    spec = spec_for(model)
    permuted = permute_model(model, spec, random_permutations(spec, seed=1))
    batches = make_batches("roberta_cls", num_batches=3)
    merged = hf_mudsc.merge([model, permuted], batches, method="mudsc", refit="none", progress=False)
    merged.save_pretrained(tmp_path / "m")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    assert type(reloaded) is model_class and reloaded.config.model_type == model_type
    with torch.no_grad():
        expected, found = model(**batches[0]).logits, reloaded(**batches[0]).logits
    assert torch.allclose(found, expected, atol=1e-4 * expected.abs().max())


@pytest.mark.parametrize("model_type", TWINS)
def test_other_heads_of_roberta_twins_are_refused_naming_their_own_classes(model_type):
    import transformers

    config_class, head = getattr(transformers, TWINS[model_type][0]), getattr(transformers, TWINS[model_type][2])
    models = [head(config_class(**TWIN)).eval() for _ in range(2)]
    prefix = TWINS[model_type][1].removesuffix("ForSequenceClassification")
    with pytest.raises(UnsupportedArchitectureError) as caught:
        hf_mudsc.merge(models, [{"input_ids": torch.tensor([[3, 4, 5, 2]])}], progress=False)
    message = str(caught.value)
    assert "\n" not in message and f"use {prefix}Model or {prefix}ForSequenceClassification" in message, message


# ELECTRA: BERT's encoder, a RoBERTa-style head; ELECTRA-small's projected embeddings refused.
ELECTRA = dict(TWIN, embedding_size=32)


def test_electra_classifiers_with_different_label_sets_merge_and_reload_as_electra(tmp_path):
    from factories import make_batches, randomize
    from transformers import ElectraConfig

    parents = []
    for seed, labels in ((0, 3), (1, 2)):
        torch.manual_seed(seed)
        parents.append(randomize(transformers_class("ElectraForSequenceClassification")(
            ElectraConfig(**ELECTRA, num_labels=labels)), seed))
    spec = spec_for(parents[0])
    copy = permute_model(parents[0], spec, random_permutations(spec, seed=2))
    batches = make_batches("roberta_cls", num_batches=3)
    merged = hf_mudsc.merge([parents[0], copy], batches, method="zipit", refit="none", progress=False)
    merged.save_pretrained(tmp_path / "same")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "same").eval()
    with torch.no_grad():
        expected, found = parents[0](**batches[0]).logits, reloaded(**batches[0]).logits
    assert type(reloaded).__name__ == "ElectraForSequenceClassification"
    assert torch.allclose(found, expected, atol=1e-4 * expected.abs().max())
    both = hf_mudsc.merge(parents, make_batches("roberta_cls", num_batches=8), progress=False)
    assert both.config.num_labels == 5 and both.classifier.out_proj.out_features == 5
    # each task's slice keeps its parent's decisions on most inputs (a head wired to the wrong units: chance level)
    probe = make_batches("roberta_cls", num_batches=4, seed=9)
    for parent, (start, stop) in zip(parents, ((0, 3), (3, 5))):
        with torch.no_grad():
            agree = torch.cat([(parent(**b).logits.argmax(-1) == both(**b).logits[:, start:stop].argmax(-1)).float()
                               for b in probe]).mean()
        assert agree > 0.6, float(agree)


@pytest.mark.parametrize("head", ["ElectraForSequenceClassification", "ElectraModel"])
def test_electra_small_with_projected_embeddings_is_refused_in_one_line_before_any_weights(head, tmp_path):
    from transformers import ElectraConfig

    folders = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        transformers_class(head)(ElectraConfig(**{**TWIN, "embedding_size": 16})).save_pretrained(tmp_path / str(seed))
        folders.append(str(tmp_path / str(seed)))
    for dry_run in (True, False):
        with pytest.raises(UnsupportedArchitectureError) as caught:
            hf_mudsc.merge(folders, [{"input_ids": torch.tensor([[3, 4, 5, 2]])}], progress=False, dry_run=dry_run)
        message = str(caught.value)
        assert "\n" not in message and "embedding_size 16 != hidden_size 32" in message, message


@pytest.mark.parametrize("head", ["ElectraForPreTraining", "ElectraForMaskedLM", "ElectraForTokenClassification"])
def test_other_electra_heads_are_refused_naming_the_classes_to_use(head):
    from transformers import ElectraConfig

    models = [transformers_class(head)(ElectraConfig(**ELECTRA)).eval() for _ in range(2)]
    with pytest.raises(UnsupportedArchitectureError) as caught:
        hf_mudsc.merge(models, [{"input_ids": torch.tensor([[3, 4, 5, 2]])}], progress=False)
    message = str(caught.value)
    assert "\n" not in message and "use ElectraModel (the discriminator) or ElectraForSequenceClassification" in \
        message, message


def transformers_class(name: str) -> type:
    import transformers

    return getattr(transformers, name)


# Config fields transformers 4.x wrote into every config and transformers 5 no longer does.
@pytest.mark.parametrize(("kind", "field", "value"), [
    ("electra_cls", "position_embedding_type", "absolute"), ("bert_cls", "position_embedding_type", "absolute"),
    ("distilbert_cls", "use_bfloat16", False), ("distilbert_cls", "pruned_heads", {}),
    ("distilbert_cls", "is_decoder", False), ("electra_cls", "summary_type", "last"),
    ("distilbert_cls", "tie_weights_", True)])
def test_a_field_an_older_release_wrote_into_one_parents_config_only_is_not_a_difference(kind, field, value,
                                                                                          tmp_path):
    """Two fine-tunes, one saved by transformers 4.x (`"position_embedding_type": "absolute"`, DistilBERT's
    `use_bfloat16` / `pruned_heads` / `is_decoder` from 2.x), one by 5 (which drops the field): refused as "different
    configurations" (position_embedding_type: 'absolute' vs None) though both compute the same. Likewise fields only
    a class no adapter merges reads (ELECTRA's multiple-choice `summary_*`, DistilBERT's unread `tie_weights_`)."""
    from factories import make_batches, make_model

    folders = []
    for seed in (0, 1):
        make_model(kind, seed).save_pretrained(tmp_path / str(seed))
        folders.append(tmp_path / str(seed))
    path = folders[0] / "config.json"
    config = json.loads(path.read_text())
    assert config.get(field) != value  # the two parents' configs differ in the field
    config[field] = value
    path.write_text(json.dumps(config))
    plan = hf_mudsc.merge([str(f) for f in folders], make_batches(kind, 1), dry_run=True, progress=False)
    assert plan is not None
    hf_mudsc.merge([str(f) for f in folders], make_batches(kind, 2), method="mudsc", refit="none", progress=False)
    # a value other than the old default is still a difference
    if field in ("position_embedding_type", "is_decoder"):
        config[field] = "relative_key" if field == "position_embedding_type" else True
        path.write_text(json.dumps(config))
        with pytest.raises(hf_mudsc.errors.MergeInputError):
            hf_mudsc.merge([str(f) for f in folders], make_batches(kind, 1), dry_run=True, progress=False)


def test_a_base_saved_without_a_field_its_fine_tunes_name_with_the_old_default_is_their_base(tmp_path):
    """Fine-tunes saved by transformers 4.x (`"position_embedding_type": "absolute"`) of a base saved by 5 (no such
    field): "the base has another configuration than the parents, so the parents are not fine-tunes of it"."""
    from factories import fine_tune, make_batches, make_model

    base = make_model("electra_cls", 0)
    base.save_pretrained(tmp_path / "base")
    for seed in (1, 2):
        fine_tune(base, seed, 0.01).save_pretrained(tmp_path / f"ft{seed}")
        path = tmp_path / f"ft{seed}" / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "position_embedding_type": "absolute"}))
    merged = hf_mudsc.merge([str(tmp_path / "ft1"), str(tmp_path / "ft2")], make_batches("electra_cls", 1),
                            method="task_arithmetic", base=str(tmp_path / "base"), progress=False)
    assert merged.config.model_type == "electra"


@pytest.mark.parametrize(("kind", "head"), [("distilbert_cls", ("pre_classifier", "classifier")),
                                            ("electra_cls", ("classifier.dense", "classifier.out_proj")),
                                            ("roberta_cls", ("classifier.dense", "classifier.out_proj"))])
def test_a_first_token_heads_units_are_read_where_they_are_consumed(kind, head):
    """docs/design.md §5.4: the stream at the head's first linear's input (one row per example: the first token),
    the head's hidden layer at the output linear's input — after its activation (a permuted copy comes back wherever
    a hook sits, so only this pins them)."""
    from factories import make_batches, make_model

    from hf_mudsc.spec import HookPoint

    dense, out = head
    spec = spec_for(make_model(kind, 0))
    groups = {group.name: group for group in spec.groups}
    assert groups["residual"].hooks == (HookPoint(dense, "input", per_example=True),)
    assert groups[dense].hooks == (HookPoint(out, "input", per_example=True),)
    assert groups[dense].width == groups["residual"].width
    if kind == "distilbert_cls":  # after the ReLU: what the hook reads is never negative
        model, seen = make_model(kind, 0), []
        model.get_submodule(out).register_forward_hook(lambda module, args, output: seen.append(args[0]))
        with torch.no_grad():
            model(**make_batches(kind, 1)[0])
        assert seen and bool((seen[0] >= 0).all()) and bool((seen[0] == 0).any())
