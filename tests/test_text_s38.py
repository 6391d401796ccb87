"""The new text architectures' tokenizers end to end (session 38): sentencepiece-style XLM-RoBERTa / CamemBERT
tokenizers in the load-time vocabulary check, and DistilBERT parents whose folders ship a BERT vs a DistilBERT
tokenizer of one vocabulary."""

from __future__ import annotations

import logging
import re

import datasets
import pytest
import torch
from factories import fine_tune, make_model, randomize
from huggingface_hub import ModelCard
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForSequenceClassification,
    BertTokenizerFast,
    DistilBertConfig,
    DistilBertForMaskedLM,
    DistilBertForSequenceClassification,
    DistilBertTokenizerFast,
    ElectraConfig,
    ElectraForSequenceClassification,
    ElectraTokenizerFast,
    XLMRobertaConfig,
    XLMRobertaForSequenceClassification,
    XLMRobertaTokenizerFast,
)

import hf_mudsc
from hf_mudsc.calibrate.layer_inputs import model_input_names
from hf_mudsc.cli.main import main
from hf_mudsc.errors import ParentMismatchError
from hf_mudsc.load.processors import tokenizer_differences

pytestmark = pytest.mark.usefixtures("one_thread_module")

PIECES = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(40)]


def sentencepiece_tokenizer(shift: int = 0) -> XLMRobertaTokenizerFast:
    """An XLM-R tokenizer built offline from a `tokenizers` Unigram model; `shift` moves the words' ids."""
    vocab = [(t, 0.0) for t in PIECES] + [(f"\u2581w{(i + shift) % 40}", -1.0 - i / 100) for i in range(40)]
    backend = Tokenizer(models.Unigram(vocab, unk_id=3))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    return XLMRobertaTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", cls_token="<s>", sep_token="</s>", mask_token="<mask>")


def sentences(count: int, seed: int) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    return [" ".join(f"w{int(i)}" for i in torch.randint(0, 40, (int(n),), generator=generator))
            for n in torch.randint(3, 12, (count,), generator=generator)]


def xlmr_folder(folder, seed: int, shift: int = 0):
    torch.manual_seed(seed)
    XLMRobertaForSequenceClassification(XLMRobertaConfig(
        vocab_size=45, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=40, pad_token_id=1, bos_token_id=0, eos_token_id=2, num_labels=2,
        id2label={0: f"a{seed}", 1: f"b{seed}"})).save_pretrained(folder)
    sentencepiece_tokenizer(shift).save_pretrained(folder)
    return str(folder)


def distilbert_folder(folder, seed: int, tokenizer_class) -> str:
    torch.manual_seed(seed)
    DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=len(WORDS), dim=32, n_layers=1, n_heads=4, hidden_dim=48, max_position_embeddings=32,
        num_labels=2, id2label={0: f"a{seed}", 1: f"b{seed}"})).save_pretrained(folder)
    tokenizer_class(vocab={w: i for i, w in enumerate(WORDS)}).save_pretrained(folder)
    return str(folder)


def test_xlm_roberta_parents_sharing_a_sentencepiece_vocabulary_merge_and_different_ones_are_refused(
        tmp_path):
    """merge([xlmr A, xlmr B (same Unigram vocab)], text) merges; with B's word ids moved,
    ParentMismatchError names the vocabularies and a moved piece."""
    a = xlmr_folder(tmp_path / "a", 0)
    same = xlmr_folder(tmp_path / "same", 1)
    merged = hf_mudsc.merge([a, same], datasets.Dataset.from_dict({"text": sentences(16, 3)}), batch_size=8,
                            progress=False)
    assert type(merged) is XLMRobertaForSequenceClassification
    other = xlmr_folder(tmp_path / "other", 1, shift=1)
    with pytest.raises(ParentMismatchError, match="different tokenizer vocabularies .*'\u2581w0': 5 vs 44"):
        hf_mudsc.merge([a, other], datasets.Dataset.from_dict({"text": sentences(16, 3)}), progress=False)


def test_distilbert_parents_with_a_bert_and_a_distilbert_tokenizer_of_one_vocabulary_are_not_warned_about(
        tmp_path, caplog):
    """merge([distilbert + BertTokenizer, distilbert + DistilBertTokenizer], text pairs): no 'tokenizers differ
    (class)' warning — DistilBertTokenizer is BertTokenizer without token_type_ids, which DistilBERT never reads."""
    a = distilbert_folder(tmp_path / "a", 0, BertTokenizerFast)
    b = distilbert_folder(tmp_path / "b", 1, DistilBertTokenizerFast)
    pairs = datasets.Dataset.from_dict({"premise": sentences(16, 3), "hypothesis": sentences(16, 4)})
    with caplog.at_level(logging.WARNING):
        merged = hf_mudsc.merge([a, b], pairs, batch_size=8, progress=False)
    assert type(merged) is DistilBertForSequenceClassification
    assert not [r for r in caplog.records if "tokenizers differ" in r.getMessage()], caplog.text


def test_a_bert_and_a_distilbert_tokenizer_differ_for_a_model_that_reads_token_type_ids():
    """tokenizer_differences([BertTokenizer, DistilBertTokenizer], ELECTRA's forward) names the model inputs: text
    pairs get segment ids from A's tokenizer only, and ELECTRA reads them."""
    vocab = {w: i for i, w in enumerate(WORDS)}
    pair = [BertTokenizerFast(vocab=vocab), DistilBertTokenizerFast(vocab=vocab)]
    electra, distilbert = (model_input_names(make_model(kind)) for kind in ("electra_cls", "distilbert_cls"))
    assert tokenizer_differences(pair, reads=electra) == ["model inputs (model_input_names)"]
    assert tokenizer_differences(pair, reads=distilbert) == []
    named = DistilBertTokenizerFast(vocab=vocab, model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    assert tokenizer_differences([pair[1], named], reads=distilbert) == []



def electra_folder(folder, seed: int) -> str:
    torch.manual_seed(seed)
    ElectraForSequenceClassification(ElectraConfig(
        vocab_size=len(WORDS), embedding_size=32, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=32, num_labels=2,
        id2label={0: f"a{seed}", 1: f"b{seed}"})).save_pretrained(folder)
    ElectraTokenizerFast(vocab={w: i for i, w in enumerate(WORDS)}).save_pretrained(folder)
    return str(folder)


HUB_PARENTS = {"DistilBertForSequenceClassification": lambda f, s: distilbert_folder(f, s, DistilBertTokenizerFast),
               "XLMRobertaForSequenceClassification": xlmr_folder,
               "ElectraForSequenceClassification": electra_folder}


@pytest.mark.parametrize("cls", HUB_PARENTS)
def test_text_parents_from_the_hub_at_a_revision_merge_push_and_inspect(cls, local_hub, hub_cli, tmp_path):
    """hf-mudsc merge org/a@SHA org/b --push-to-hub org/m, then inspect OUT, for DistilBERT / XLM-R / ELECTRA: the
    pushed card names the Hub parents as base models, the class, text-classification; the pushed model loads and
    the card's Usage snippets run on it."""
    for name, seed in (("a", 0), ("b", 1)):
        local_hub.upload_folder(f"org/{name}", HUB_PARENTS[cls](tmp_path / name, seed), f"parent {name}")
    pinned = local_hub.head("org/a")
    data = tmp_path / "calibration"
    datasets.Dataset.from_dict({"text": sentences(24, 3)}).save_to_disk(data)
    out = tmp_path / "merged"
    run = hub_cli("merge", f"org/a@{pinned}", "org/b", "--calibration", str(data), "--output", str(out),
                  "--batch-size", "8", "--push-to-hub", "org/m")
    assert run.returncode == 0, run.stderr[-3000:]
    card = ModelCard(local_hub.file_bytes("org/m", "README.md").decode())
    assert card.data.base_model == ["org/a", "org/b"] and card.data.pipeline_tag == "text-classification"
    assert f"two fine-tuned `{cls}` models" in " ".join(card.content.split())
    assert f"org/a@{pinned}" in card.content
    shown = hub_cli("inspect", str(out))
    assert shown.returncode == 0 and "org/a @ " in shown.stdout, shown.stderr[-3000:]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_TOKEN", local_hub.token)
        pulled = AutoModelForSequenceClassification.from_pretrained("org/m")
        usage = re.search(r"^## Usage\n(.*?)(?=^## )", card.content, re.S | re.M).group(1)
        namespace: dict = {"texts": sentences(3, 5)}
        for block in re.findall(r"```python\n(.*?)```", usage, re.S):  # the card's snippets as a Hub user runs them
            exec(block, namespace)  # noqa: S102 - the card's own snippet
    assert type(pulled).__name__ == cls and pulled.config.num_labels == 4
    assert len(namespace["labels"]) == 3 and set(namespace["labels"]) <= set(pulled.config.id2label.values())


def test_the_dry_run_refuses_xlm_roberta_parents_of_different_sentencepiece_vocabularies(tmp_path, capsys):
    """hf-mudsc merge A B --dry-run (XLM-R, B's pieces at other ids): exit 1 in one line naming the vocabularies."""
    a, b = xlmr_folder(tmp_path / "a", 0), xlmr_folder(tmp_path / "b", 1, shift=1)
    assert main(["merge", a, b, "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert "different tokenizer vocabularies" in err and "Traceback" not in err


def test_a_service_dry_run_of_distilbert_parents_plans_their_groups(tmp_path):
    """POST /api/jobs {models: [distilbert A, distilbert B], dry_run: true} under --local-root: the plan names the
    class and DistilBERT's groups (its MLP, the pre_classifier head group)."""
    from fastapi.testclient import TestClient
    from serve_service import drain_job

    from hf_mudsc.serve.app import create_app

    a = distilbert_folder(tmp_path / "a", 0, DistilBertTokenizerFast)
    b = distilbert_folder(tmp_path / "b", 1, DistilBertTokenizerFast)
    app = create_app(tmp_path / "state", local_roots=[tmp_path], output_root=tmp_path / "out")
    answer = TestClient(app, base_url="http://127.0.0.1").post("/api/jobs", json={"models": [a, b], "dry_run": True})
    assert answer.status_code < 300, answer.text
    job = drain_job(app, answer.json()["id"], timeout=100)
    assert job["status"] == "succeeded", job["error"]
    plan = job["result"]["plan"]
    assert [p["architecture"] for p in plan["parents"]] == ["DistilBertForSequenceClassification"] * 2
    assert {g["name"] for g in plan["groups"]} >= {"distilbert.transformer.layer.0.mlp", "pre_classifier"}


def same_base_distilbert(root) -> tuple[str, list[str]]:
    """A DistilBertForMaskedLM base folder (the usual Hub base) and two classifier fine-tunes of it."""
    config = dict(vocab_size=len(WORDS), dim=32, n_layers=2, n_heads=4, hidden_dim=48, max_position_embeddings=32)
    torch.manual_seed(0)
    base = randomize(DistilBertForMaskedLM(DistilBertConfig(**config)), 0)
    tokenizer = DistilBertTokenizerFast(vocab={w: i for i, w in enumerate(WORDS)})
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    parents = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = DistilBertForSequenceClassification(DistilBertConfig(**config, num_labels=2,
                                                                     id2label={0: f"a{seed}", 1: f"b{seed}"}))
        model.distilbert.load_state_dict(base.distilbert.state_dict())
        fine_tune(model, seed, 0.02, relative=True).save_pretrained(root / f"ft{seed}")
        tokenizer.save_pretrained(root / f"ft{seed}")
        parents.append(str(root / f"ft{seed}"))
    return str(root / "base"), parents


def test_fine_tunes_of_one_distilbert_base_merge_by_auto_regmean_and_task_vectors_from_a_masked_lm_base(tmp_path):
    """merge(fine-tunes of one DistilBertForMaskedLM base folder): auto with data picks a same-base method, auto
    with base= and no data reads task vectors from it (ties), and regmean / task_arithmetic / ties each give a
    DistilBertForSequenceClassification of 4 labels."""
    base, parents = same_base_distilbert(tmp_path)
    data = datasets.Dataset.from_dict({"text": sentences(32, 3)})
    record = hf_mudsc.merge(parents, data, batch_size=8, progress=False).config.mudsc
    assert record["method"] == "regmean", record["method_choice_reason"]
    record = hf_mudsc.merge(parents, base=base, progress=False).config.mudsc
    assert record["method"] == "ties", record["method_choice_reason"]
    for options in (dict(method="regmean"), dict(method="task_arithmetic", base=base),
                    dict(method="ties", base=base)):
        merged = hf_mudsc.merge(parents, data, batch_size=8, progress=False, **options)
        assert type(merged) is DistilBertForSequenceClassification and merged.config.num_labels == 4, options


def test_hub_xlm_roberta_parents_of_different_vocabularies_are_refused_before_their_weights_download(local_hub,
                                                                                                     hub_cli, tmp_path):
    """hf-mudsc merge org/a org/b (XLM-R on the Hub, B's pieces at other ids): refused naming the vocabularies, and
    no GET of either parent's model.safetensors (a header range read at most)."""
    local_hub.upload_folder("org/a", xlmr_folder(tmp_path / "a", 0), "parent a")
    local_hub.upload_folder("org/b", xlmr_folder(tmp_path / "b", 1, shift=1), "parent b")
    data = tmp_path / "calibration"
    datasets.Dataset.from_dict({"text": sentences(16, 3)}).save_to_disk(data)
    run = hub_cli("merge", "org/a", "org/b", "--calibration", str(data), "--output", str(tmp_path / "merged"))
    assert run.returncode == 1 and "different tokenizer vocabularies" in run.stderr, run.stderr[-3000:]
    weights = [r for r in local_hub.requests_for("resolve") if r.path.endswith("model.safetensors")
               and r.method == "GET" and "range" not in {k.lower() for k in r.headers}]
    assert not weights, [(r.path, r.headers) for r in weights]
    assert [r for r in local_hub.requests_for("resolve") if r.path.endswith("tokenizer.json")]  # the check's reads


def test_a_sentencepiece_only_tokenizer_without_the_library_is_named_not_called_missing(tmp_path, monkeypatch):
    """XLM-R folders saved by transformers 3 (sentencepiece.bpe.model, no tokenizer.json), `sentencepiece` not
    installed: merge said 'the parents ship no tokenizer' (after loading the weights); now one line naming the file."""
    import sys

    from hf_mudsc.errors import CalibrationError

    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # not installed
    folders = [xlmr_folder(tmp_path / "a", 0), xlmr_folder(tmp_path / "b", 1)]
    for folder in folders:
        (tmp_path / folder / "tokenizer.json").unlink()
        (tmp_path / folder / "sentencepiece.bpe.model").write_bytes(b"\x0a\x05hello")
    with pytest.raises(CalibrationError, match=r"sentencepiece\.bpe\.model.*pip install sentencepiece") as refused:
        hf_mudsc.merge(folders, datasets.Dataset.from_dict({"text": sentences(16, 3)}), progress=False)
    assert "\n" not in str(refused.value) and "a'" in str(refused.value)


def test_hub_distilbert_fine_tunes_merged_by_ties_from_a_hub_masked_lm_base_name_it_on_the_card(local_hub, hub_cli,
                                                                                                 tmp_path):
    """hf-mudsc merge org/ft1 org/ft2 --method ties --base org/base@SHA (a DistilBertForMaskedLM): merged, the card's
    base_model lists the parents and the base, and the recipe pins the base."""
    base, parents = same_base_distilbert(tmp_path)
    local_hub.upload_folder("org/base", base, "base")
    for index, folder in enumerate(parents):
        local_hub.upload_folder(f"org/ft{index + 1}", folder, "fine-tune")
    pinned = local_hub.head("org/base")
    out = tmp_path / "merged"
    run = hub_cli("merge", "org/ft1", "org/ft2", "--method", "ties", "--base", f"org/base@{pinned}", "--output",
                  str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    card = ModelCard((out / "README.md").read_text())
    assert "org/base" in card.data.base_model and {"org/ft1", "org/ft2"} <= set(card.data.base_model), card.data
    assert f"org/base@{pinned}" in (out / "mudsc_recipe.yaml").read_text()


@pytest.mark.parametrize("kind", ["xlm-roberta", "distilbert"])
def test_text_pairs_calibrate_and_evaluate_with_each_new_types_tokenizer(kind, tmp_path):
    """merge + evaluate_merge of XLM-R / DistilBERT (BertTokenizer A, DistilBertTokenizer B) folders on premise,
    hypothesis pairs longer than the position table: both run, every scorer gets a figure for both tasks."""
    from hf_mudsc.evaluate.harness import evaluate_merge

    if kind == "xlm-roberta":
        parents = [xlmr_folder(tmp_path / "a", 0), xlmr_folder(tmp_path / "b", 1)]
    else:
        parents = [distilbert_folder(tmp_path / "a", 0, BertTokenizerFast),
                   distilbert_folder(tmp_path / "b", 1, DistilBertTokenizerFast)]
    long = [f"{text} " * 6 for text in sentences(24, 4)]  # past max_position_embeddings: truncated
    pairs = datasets.Dataset.from_dict({"premise": sentences(24, 3), "hypothesis": long,
                                        "label": [i % 2 for i in range(24)]})
    merged = hf_mudsc.merge(parents, pairs.remove_columns("label"), batch_size=8, progress=False)
    merged.save_pretrained(tmp_path / "merged")
    result = evaluate_merge(str(tmp_path / "merged"), parents, [pairs, pairs], text_column="premise,hypothesis",
                            batch_size=8, progress=False)
    tasks = list(result.tasks)
    assert len(tasks) == 2 and all(result.scores["merged"][task]["accuracy"] is not None for task in tasks)
    assert all(result.tasks[task]["num_samples"] == 24 for task in tasks)


def sentencepiece_only(folder) -> str:
    """`folder`'s tokenizer as transformers 3 saved XLM-R's: sentencepiece.bpe.model, no tokenizer.json."""
    (folder / "tokenizer.json").unlink()
    (folder / "sentencepiece.bpe.model").write_bytes(b"\x0a\x05hello")
    return str(folder)


def test_sentencepiece_only_folders_merge_when_their_tokenizer_is_not_needed(tmp_path, monkeypatch):
    """sentencepiece missing, XLM-R folders with only sentencepiece.bpe.model: merge(processor=...), linear without
    data, a sentencepiece-only base and processor_from_name were all refused; they merge (None: no processor)."""
    import sys

    from hf_mudsc.load.processors import processor_from_name

    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # not installed
    folders = [sentencepiece_only(tmp_path / xlmr_folder(tmp_path / name, seed)) for seed, name in enumerate("ab")]
    assert processor_from_name(folders[0]) is None
    data = datasets.Dataset.from_dict({"text": sentences(16, 3)})
    assert hf_mudsc.merge(folders, data, processor=sentencepiece_tokenizer(), progress=False) is not None
    assert hf_mudsc.merge(folders, method="linear", progress=False) is not None
    base = sentencepiece_only(tmp_path / xlmr_folder(tmp_path / "base", 7))
    parents = [xlmr_folder(tmp_path / name, seed) for seed, name in ((3, "c"), (4, "d"))]
    assert hf_mudsc.merge(parents, method="task_arithmetic", base=base, progress=False) is not None


def test_raw_text_for_a_sentencepiece_only_parent_is_refused_before_any_weights(tmp_path, monkeypatch):
    """sentencepiece missing, raw text, no processor=: refused in one line naming the file, before weights."""
    import sys

    from hf_mudsc.errors import CalibrationError

    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # not installed
    monkeypatch.setattr("hf_mudsc.load.parents._prepare", lambda *a, **k: pytest.fail("weights read"))
    folders = [sentencepiece_only(tmp_path / xlmr_folder(tmp_path / name, seed)) for seed, name in enumerate("ab")]
    with pytest.raises(CalibrationError, match=r"sentencepiece\.bpe\.model.*pip install sentencepiece") as refused:
        hf_mudsc.merge(folders, datasets.Dataset.from_dict({"text": sentences(16, 3)}), progress=False)
    assert "\n" not in str(refused.value) and "protobuf" not in str(refused.value)


class SplittingTokenizer(BertTokenizerFast):
    """A user's subclass whose `__init__` changes how it tokenizes (special tokens split as text)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.split_special_tokens = True


def test_a_user_tokenizer_subclass_changing_tokenization_in_init_is_told_apart():
    """BertTokenizerFast vs a subclass setting split_special_tokens in __init__ (one vocab): said alike, unwarned."""
    vocab = {w: i for i, w in enumerate(WORDS)}
    plain, splitting = BertTokenizerFast(vocab=vocab), SplittingTokenizer(vocab=vocab)
    assert plain("[CLS] w1")["input_ids"] != splitting("[CLS] w1")["input_ids"]
    assert tokenizer_differences([plain, splitting])
