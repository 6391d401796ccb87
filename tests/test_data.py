"""Calibration from `datasets`: specs, raw columns through the parents' processors, subsets, streaming, errors."""

from __future__ import annotations

import json
import types
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from factories import BERT, make_model
from PIL import Image
from transformers import BertTokenizer, CLIPImageProcessor, CLIPProcessor, CLIPTokenizer, ViTImageProcessor

import hf_mudsc
from hf_mudsc.calibrate.datasets import CalibrationStream, DatasetSpec, load_calibration_dataset, resolve_calibration
from hf_mudsc.errors import CalibrationError

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(BERT["vocab_size"] - 5)]


def vit_processor() -> ViTImageProcessor:
    return ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5], image_std=[0.5])


def tokenizer() -> BertTokenizer:
    return BertTokenizer(vocab={t: i for i, t in enumerate(VOCAB)})


def random_images(count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)) for _ in range(count)]


@pytest.fixture()
def imagefolder(tmp_path) -> Path:
    root = tmp_path / "pets"
    for index, image in enumerate(random_images(6)):
        folder = root / "train" / ("cat" if index % 2 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{index}.png")
    return root


def texts(count: int) -> list[str]:
    rng = np.random.default_rng(1)
    return [" ".join(f"w{i}" for i in rng.integers(0, 50, rng.integers(2, 15))) for _ in range(count)]


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("glue:sst2:validation", ("glue", "sst2", "validation")),
        ("user/data:train", ("user/data", None, "train")),
        ("user/data:train[:100]", ("user/data", None, "train[:100]")),
        ("user/data:cfg:test[10:20]", ("user/data", "cfg", "test[10:20]")),
        ("user/data", ("user/data", None, None)),
        ("user/da\nta:train", ("user/da\nta", None, "train")),  # parsed, not an AttributeError (the loader refuses)
    ],
)
def test_spec_parsing(spec, expected):
    parsed = DatasetSpec.parse(spec)
    assert (parsed.path, parsed.config, parsed.split) == expected
    assert str(parsed) == spec


@pytest.mark.parametrize("spec", ["a:b:c:d", "data:", ":train", "data::train", "", "data[:3]"])
def test_malformed_specs(spec):
    with pytest.raises(CalibrationError):
        DatasetSpec.parse(spec)


def test_imagefolder_spec_preprocessed_by_the_image_processor(imagefolder):
    model = make_model("vit_cls")  # one input channel: the RGB images are converted to grayscale
    stream = resolve_calibration(f"{imagefolder}:train", [vit_processor(), None], inputs=("pixel_values",),
                                 model_config=model.config)
    assert isinstance(stream, CalibrationStream) and isinstance(stream.dataset, datasets.IterableDataset)
    batches = list(stream.batches(4))
    assert [b["pixel_values"].shape for b in batches] == [(4, 1, 16, 16), (2, 1, 16, 16)]
    rows = list(load_calibration_dataset(f"{imagefolder}:train"))
    expected = vit_processor()(images=[r["image"].convert("L") for r in rows], return_tensors="pt")["pixel_values"]
    assert torch.allclose(torch.cat([b["pixel_values"] for b in batches]), expected)


def test_merge_with_an_imagefolder_spec_string(imagefolder, tmp_path):
    folders = []
    for seed in (0, 1):
        folder = tmp_path / f"vit{seed}"
        make_model("vit_cls", seed=seed).save_pretrained(folder)
        vit_processor().save_pretrained(folder)
        folders.append(folder)
    merged = hf_mudsc.merge(folders, f"{imagefolder}:train", method="zipit", batch_size=4, progress=False)
    assert merged.config.mudsc["num_calibration_samples"] == 6


def test_saved_dataset_with_raw_images(tmp_path):
    images = random_images(5, seed=2)
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"img": images, "label": [0, 1, 0, 1, 0]}).cast_column(
        "img", datasets.Image()).save_to_disk(saved)
    before = sorted(p.name for p in saved.iterdir())
    model = make_model("clip_vision")  # RGB model, CLIP-style image processor
    processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    stream = resolve_calibration(str(saved), [processor], num_samples=4, model_config=model.config)
    batch = next(stream.batches(8))
    assert set(batch) == {"pixel_values"} and batch["pixel_values"].shape == (4, 3, 16, 16)
    assert sorted(p.name for p in saved.iterdir()) == before  # no cache/indices file written next to it
    dd = tmp_path / "saved_dict"
    datasets.DatasetDict({"train": datasets.load_from_disk(str(saved))}).save_to_disk(dd)
    assert next(resolve_calibration(f"{dd}:train", [processor]).batches(8))["pixel_values"].shape[0] == 5
    with pytest.raises(CalibrationError, match=r"no split 'test'; available splits: \['train'\]"):
        resolve_calibration(f"{dd}:test", [processor])


def test_text_column_tokenized_by_the_parents_tokenizer():
    rows = texts(10)
    dataset = datasets.Dataset.from_dict({"text": rows, "label": list(range(10))})
    model = make_model("bert_cls")
    stream = resolve_calibration(dataset, [tokenizer(), tokenizer()], inputs=("input_ids",),
                                 model_config=model.config)
    batches = list(stream.batches(4))
    assert [set(b) for b in batches] == [{"input_ids", "attention_mask", "token_type_ids"}] * 3
    expected = tokenizer()(rows[:4], padding=True, truncation=True, max_length=BERT["max_position_embeddings"],
                           return_tensors="pt")
    assert torch.equal(batches[0]["input_ids"], expected["input_ids"])
    assert torch.equal(batches[0]["attention_mask"], expected["attention_mask"])
    assert max(b["input_ids"].shape[1] for b in batches) <= BERT["max_position_embeddings"]


def test_merge_tokenizes_with_the_saved_tokenizer(tmp_path):
    folders = []
    for seed in (0, 1):
        folder = tmp_path / f"bert{seed}"
        make_model("bert_cls", seed=seed).save_pretrained(folder)
        tokenizer().save_pretrained(folder)
        folders.append(folder)
    rows = texts(8)
    sentences = datasets.Dataset.from_dict({"sentence": rows})
    merged = hf_mudsc.merge(folders, sentences, method="zipit", batch_size=4, progress=False)
    assert merged.config.mudsc["num_calibration_samples"] == 8  # residual stream: one CLS sample per text


def test_clip_image_and_text_columns():
    vocab = {"<|startoftext|>": 57, "<|endoftext|>": 58, "a</w>": 2, "b</w>": 3, "a": 4, "ab</w>": 6}
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
        tokenizer=CLIPTokenizer(vocab=vocab, merges=[("a", "b</w>")]),
    )
    config = make_model("clip").config
    captions = ["ab a", "a b ab b", "b"]
    dataset = datasets.Dataset.from_dict({"image": random_images(3), "caption": captions}).cast_column(
        "image", datasets.Image())
    stream = resolve_calibration(dataset, [processor], text_column="caption", inputs=("pixel_values", "input_ids"),
                                 model_config=config)
    batch = next(stream.batches(3))
    assert batch["pixel_values"].shape == (3, 3, 16, 16)
    assert batch["input_ids"].tolist() == [[57, 6, 2, 58, 58, 58], [57, 2, 3, 6, 3, 58], [57, 3, 58, 58, 58, 58]]
    assert batch["attention_mask"].sum(1).tolist() == [4, 6, 3]
    # Any object exposing image_processor/tokenizer works too (e.g. a hand-assembled pair).
    pair = types.SimpleNamespace(image_processor=processor.image_processor, tokenizer=processor.tokenizer)
    assert torch.equal(next(resolve_calibration(dataset, [pair], text_column="caption", model_config=config)
                            .batches(3))["input_ids"], batch["input_ids"])
    missing = r"lacks column\(s\) \['input_ids'\].*found columns \['image', 'caption'\].*No raw text column"
    with pytest.raises(CalibrationError, match=missing):
        resolve_calibration(dataset, [processor], inputs=("pixel_values", "input_ids"), model_config=config)


def test_nonexistent_spec_fails_before_loading_parents(monkeypatch, tmp_path):
    with pytest.raises(CalibrationError, match="not found.*no columns found"):
        resolve_calibration(str(tmp_path / "nothing-here") + ":train", [vit_processor()])
    import hf_mudsc.load.parents

    def must_not_load(*args, **kwargs):
        raise AssertionError("parents were loaded before the calibration spec was checked")

    monkeypatch.setattr(hf_mudsc.load.parents, "load_parents", must_not_load)
    with pytest.raises(CalibrationError, match="not found"):
        hf_mudsc.merge(["user/a", "user/b"], "user/no-such-dataset:train", progress=False)


def test_no_usable_column_names_the_columns_found():
    dataset = datasets.Dataset.from_dict({"foo": [1, 2], "label": [0, 1]})
    with pytest.raises(CalibrationError, match=r"found columns \['foo', 'label'\]"):
        resolve_calibration(dataset, [vit_processor()])
    missing = r"lacks column\(s\) \['pixel_values'\].*found columns \['foo', 'label'\].*image_column="
    with pytest.raises(CalibrationError, match=missing):
        resolve_calibration(dataset, [vit_processor()], inputs=("pixel_values",))
    wrong_column = r"image_column='picture' \(CLI: --image-column\) is not a column.*\['foo', 'label'\]"
    with pytest.raises(CalibrationError, match=wrong_column):
        resolve_calibration(dataset, [vit_processor()], image_column="picture")
    with pytest.raises(CalibrationError, match=r"found columns \['foo', 'label'\]"):
        hf_mudsc.merge([make_model("vit_cls", seed=0), make_model("vit_cls", seed=1)], dataset, progress=False)
    raw = datasets.Dataset.from_dict({"text": ["w1 w2"]})
    with pytest.raises(CalibrationError, match="ship no tokenizer"):
        resolve_calibration(raw, [vit_processor()], inputs=("input_ids",))
    no_tokenizer = r"found columns \['text'\]. Column 'text' holds raw text, but the parents ship no tokenizer"
    with pytest.raises(CalibrationError, match=no_tokenizer):
        hf_mudsc.merge([make_model("bert_cls", seed=0), make_model("bert_cls", seed=1)], raw, progress=False)


def _first_tokens(stream: CalibrationStream) -> list[int]:
    return [int(t) for batch in stream.batches(7) for t in batch["input_ids"][:, 0]]


@pytest.mark.parametrize("iterable", [False, True])
def test_num_samples_and_seeded_shuffle_are_deterministic(iterable):
    ids = torch.arange(100)[:, None].repeat(1, 3)
    dataset = datasets.Dataset.from_dict({"input_ids": ids.numpy(), "label": list(range(100))})
    if iterable:
        dataset = dataset.to_iterable_dataset(num_shards=4)

    def pick(**options):
        return _first_tokens(resolve_calibration(dataset, None, num_samples=20, **options))

    first, again, other = pick(seed=0), pick(seed=0), pick(seed=1)
    assert len(first) == 20 and len(set(first)) == 20
    assert first == again and first != other
    assert pick(shuffle=False) == list(range(20))
    assert sorted(_first_tokens(resolve_calibration(dataset, None))) == list(range(100))  # all rows
    assert set(next(resolve_calibration(dataset, None).batches(4))) == {"input_ids"}  # labels dropped


def test_streaming_spec_does_not_materialise(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    with open(folder / "train.jsonl", "w") as handle:
        for text in texts(3000):
            handle.write(json.dumps({"text": text}) + "\n")
    cache = Path(datasets.config.HF_DATASETS_CACHE)
    before = set(cache.rglob("*.arrow")) if cache.exists() else set()
    stream = resolve_calibration(f"{folder}:train", [tokenizer()], num_samples=5, shuffle=False,
                                 model_config=make_model("bert_cls").config)
    assert isinstance(stream.dataset, datasets.IterableDataset) and stream.num_rows is None
    batches = list(stream.batches(2))
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]
    after = set(cache.rglob("*.arrow")) if cache.exists() else set()
    assert after == before  # nothing converted to arrow: the split was streamed


# ------------------------------------------------ sample counts and flag-aware messages (issue 10, rough edges)
@pytest.mark.parametrize("iterable", [False, True])
def test_more_num_samples_than_rows_says_how_many_were_used(caplog, iterable):
    from factories import make_batches

    pixels = torch.cat([b["pixel_values"] for b in make_batches("vit_cls", 2, batch_size=6)])  # 12 rows
    dataset = datasets.Dataset.from_dict({"pixel_values": pixels.numpy()})
    if iterable:
        dataset = dataset.to_iterable_dataset()
    models = [make_model("vit_cls", seed=0), make_model("vit_cls", seed=1)]
    with caplog.at_level("WARNING", logger="hf_mudsc"):
        merged = hf_mudsc.merge(models, dataset, method="zipit", num_samples=500, batch_size=5, progress=False)
    assert merged.merge_report.num_samples == 12
    assert merged.config.mudsc["num_calibration_samples"] == 12
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert ("num_samples= (CLI: --num-samples) asked for 500 calibration samples, but the data holds only 12; "
            "all 12 were used") in warnings


def test_column_messages_name_the_cli_flags_too():
    dataset = datasets.Dataset.from_dict({"foo": [1, 2], "label": [0, 1]})
    with pytest.raises(CalibrationError) as caught:
        resolve_calibration(dataset, [vit_processor()], image_column="picture")
    assert "image_column='picture' (CLI: --image-column) is not a column" in str(caught.value)
    raw = datasets.Dataset.from_dict({"text": ["w1"]})
    with pytest.raises(CalibrationError) as caught:
        resolve_calibration(raw, [tokenizer()], text_column="sentence")
    assert "text_column='sentence' (CLI: --text-column) is not a column" in str(caught.value)
    with pytest.raises(CalibrationError) as caught:
        resolve_calibration(dataset, [vit_processor()])
    assert "name yours with image_column= (CLI: --image-column) or text_column= (CLI: --text-column)" in str(
        caught.value)
    with pytest.raises(CalibrationError) as caught:
        resolve_calibration(dataset, [vit_processor()], inputs=("pixel_values",))
    assert "name yours with image_column= (CLI: --image-column), or provide pixel_values" in str(caught.value)
    with pytest.raises(ValueError, match=r"num_samples must be >= 1, or None for the whole split "
                                         r"\(.all. on the command line\) \(CLI: "):
        resolve_calibration(datasets.Dataset.from_dict({"input_ids": [[1, 2]]}), None, num_samples=0)


# ------------------------------------------------ calibration pinned like parents: `repo@revision:...` (issue 10)
SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("org/ds@v1:train", ("org/ds", "v1", None, "train")),
        ("org/ds@v1:cfg:train[:10]", ("org/ds", "v1", "cfg", "train[:10]")),
        (f"org/ds@{SHA}:validation", ("org/ds", SHA, None, "validation")),
        ("org/ds@refs/pr/1:train", ("org/ds", "refs/pr/1", None, "train")),
        ("org/ds@main", ("org/ds", "main", None, None)),
        ("glue:sst2:validation", ("glue", None, "sst2", "validation")),
    ],
)
def test_spec_with_a_revision(spec, expected):
    parsed = DatasetSpec.parse(spec)
    assert (parsed.path, parsed.revision, parsed.config, parsed.split) == expected
    assert str(parsed) == spec


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("org/ds@:train", "empty revision after '@'"),
        ("@v1:train", "empty part"),
        ("org/ds@v1@v2:train", "one '@revision'"),
        ("org/ds@v1:", "empty part"),
    ],
)
def test_malformed_revisions(spec, needle):
    with pytest.raises(CalibrationError) as caught:
        DatasetSpec.parse(spec)
    assert needle in str(caught.value) and "'org/ds@revision[:config]:split'" in str(caught.value)


def test_a_revision_on_local_data_is_refused(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(CalibrationError, match="a revision pins a Hub dataset"):
        DatasetSpec.parse(f"{tmp_path / 'data'}@v1:train")
    folder = tmp_path / "odd@name"  # an existing path with '@' is a path, not a revision
    folder.mkdir()
    assert DatasetSpec.parse(f"{folder}:train") == DatasetSpec(path=str(folder), split="train")


def test_the_revision_reaches_load_dataset(monkeypatch):
    seen = {}

    def fake_load_dataset(*args, **kwargs):
        seen.update(args=args, kwargs=kwargs)
        return datasets.Dataset.from_dict({"input_ids": [[1, 2]]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    load_calibration_dataset("org/ds@v1:cfg:train")
    assert seen["args"] == ("org/ds", "cfg") and seen["kwargs"]["revision"] == "v1"
    load_calibration_dataset("org/ds:train")
    assert seen["kwargs"].get("revision") is None


def test_pin_resolves_a_branch_to_its_commit(monkeypatch):
    from huggingface_hub import HfApi, constants

    from hf_mudsc.calibrate.datasets import pin_calibration_revision

    asked = []

    def fake_dataset_info(self, repo_id, *, revision=None, token=None, **_):
        asked.append((repo_id, revision))
        return types.SimpleNamespace(sha=SHA)

    monkeypatch.setattr(HfApi, "dataset_info", fake_dataset_info)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert pin_calibration_revision("org/ds@v1:cfg:train[:8]") == f"org/ds@{SHA}:cfg:train[:8]"
    assert pin_calibration_revision("org/ds:train") == f"org/ds@{SHA}:train"
    assert asked == [("org/ds", "v1"), ("org/ds", None)]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # offline: kept as given, nothing asked
    assert pin_calibration_revision("org/ds@v1:train") == "org/ds@v1:train"
    assert len(asked) == 2


def test_pin_leaves_local_data_alone(tmp_path, monkeypatch):
    from huggingface_hub import HfApi, constants

    from hf_mudsc.calibrate.datasets import pin_calibration_revision

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "dataset_info", lambda *a, **k: pytest.fail("local data must not reach the Hub"))
    (tmp_path / "data").mkdir()
    assert pin_calibration_revision(f"{tmp_path / 'data'}:train") == f"{tmp_path / 'data'}:train"


def test_a_missing_revision_is_one_clear_line(monkeypatch):
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import RevisionNotFoundError

    from hf_mudsc.calibrate.datasets import pin_calibration_revision

    def missing(self, repo_id, *, revision=None, token=None, **_):
        response = types.SimpleNamespace(headers={}, request=None, status_code=404)
        raise RevisionNotFoundError("404 Revision Not Found", response=response)

    monkeypatch.setattr(HfApi, "dataset_info", missing)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(CalibrationError) as caught:
        pin_calibration_revision("org/ds@nope:train")
    message = str(caught.value)
    assert "calibration dataset 'org/ds@nope:train': revision 'nope' does not exist" in message
    assert "\n" not in message


def test_roberta_text_is_cut_to_the_positions_its_embeddings_reach():
    """RoBERTa's position ids start after its padding id, so it reads `max_position_embeddings - pad_token_id - 1`
    tokens; a tokenizer with no `model_max_length` of its own (the default of a hand-built one) used to be cut to
    `max_position_embeddings` and the first batch failed ('index 24 is out of bounds')."""
    model = make_model("roberta_cls", seed=0)
    reach = model.config.max_position_embeddings - model.config.pad_token_id - 1
    rows = [" ".join(f"w{i % 50}" for i in range(start, start + 40)) for start in range(12)]
    stream = resolve_calibration(datasets.Dataset.from_dict({"text": rows}), [tokenizer()], inputs=("input_ids",),
                                 model_config=model.config, max_tokens=reach)
    assert max(b["input_ids"].shape[1] for b in stream.batches(4)) == reach
    merged = hf_mudsc.merge([model, make_model("roberta_cls", seed=1)], datasets.Dataset.from_dict({"text": rows}),
                            processor=tokenizer(), method="mudsc", batch_size=4, progress=False)
    ids = tokenizer()(rows[:2], truncation=True, max_length=reach, return_tensors="pt")
    assert torch.isfinite(merged(**ids).logits).all()


def test_evaluation_text_is_cut_to_the_positions_each_model_reaches(monkeypatch):
    """Evaluation read long text with the calibration's preprocessing but not its position limit: a RoBERTa whose
    tokenizer has no `model_max_length` failed at the first batch ('index out of bounds'). Each model's inputs are
    cut to what its position table reaches, as calibration cuts them (the CLIP prompts: test_evaluation.py)."""
    from hf_mudsc.architectures import spec_for
    from hf_mudsc.evaluate.harness import evaluate_merge

    parents = [make_model("roberta_cls", seed=seed) for seed in (0, 1)]
    rows = [" ".join(f"w{i % 50}" for i in range(start, start + 40)) for start in range(6)]
    data = datasets.Dataset.from_dict({"text": rows, "label": [index % 3 for index in range(6)]})
    merged = hf_mudsc.merge(parents, data.remove_columns("label"), processor=tokenizer(), method="mudsc",
                            batch_size=3, progress=False)
    lengths: list[int] = []  # what every forward of the evaluation read (merge() sets module hooks aside)
    forward = type(merged).forward

    def recorded(self, input_ids=None, *args, **kwargs):
        lengths.append(input_ids.shape[1])
        return forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(type(merged), "forward", recorded)
    result = evaluate_merge(merged, parents, [data], processor=tokenizer(), batch_size=3, progress=False)
    assert 0.0 <= result.score("merged", "task_0") <= 1.0
    assert lengths and max(lengths) == spec_for(parents[0]).max_tokens  # 40+ words, cut to the reach


@pytest.mark.parametrize("method", ["mudsc", "regmean", "fisher"])
@pytest.mark.parametrize("kind", ["bert_cls", "roberta_cls", "distilbert_cls", "electra_cls"])
def test_tokenized_batches_longer_than_the_positions_are_refused_in_one_line(kind, method):
    """Pre-tokenized calibration longer than the parents' position table failed inside transformers: a bare
    RuntimeError traceback for regmean/fisher (the CLI printed it whole), an opaque 'expanded size of the tensor'
    line for mudsc. Now one line names the length, the limit and the fix, before any forward pass."""
    models = [make_model(kind, seed=0), make_model(kind, seed=1)]
    ids = torch.randint(5, 50, (4, 30), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    reach = {"bert_cls": 24, "roberta_cls": 22, "distilbert_cls": 24, "electra_cls": 24}[kind]
    with pytest.raises(CalibrationError) as caught:
        hf_mudsc.merge(models, batches, method=method, progress=False)
    message = str(caught.value)
    assert "\n" not in message
    assert "30 tokens" in message and f"at most {reach}" in message and f"max_length={reach}" in message


def test_calibration_leaves_the_tokenizer_as_it_was_and_the_merged_folder_gets_parent_as(tmp_path):
    """Tokenizing with truncation and padding switches them on in a fast tokenizer's backend, and the merge kept them
    on: the tokenizer passed in was changed, and the merged folder's tokenizer.json (parent A's, saved after
    calibration) truncated to the model's length and padded by default — in `tokenizers` and transformers.js, which
    read those settings — and `hf-mudsc evaluate` took it for another processor than the parents'."""
    import json

    given = tokenizer()
    rows = texts(12) + [" ".join(["w1"] * 40)]
    merged = hf_mudsc.merge([make_model("bert_cls", seed=0), make_model("bert_cls", seed=1)],
                            datasets.Dataset.from_dict({"text": rows}), processor=given, method="mudsc", batch_size=4,
                            progress=False)
    assert merged.config.mudsc["method"] == "mudsc"
    assert given.backend_tokenizer.truncation is None and given.backend_tokenizer.padding is None
    folders = []
    for seed in (0, 1):
        make_model("bert_cls", seed=seed).save_pretrained(tmp_path / f"bert{seed}")
        tokenizer().save_pretrained(tmp_path / f"bert{seed}")
        folders.append(tmp_path / f"bert{seed}")
    merged = hf_mudsc.merge(folders, datasets.Dataset.from_dict({"text": rows}), method="mudsc", batch_size=4,
                            progress=False)
    hf_mudsc.save_merged(merged, tmp_path / "merged")
    saved = json.loads((tmp_path / "merged" / "tokenizer.json").read_text())
    parent = json.loads((folders[0] / "tokenizer.json").read_text())
    assert (saved["truncation"], saved["padding"]) == (parent["truncation"], parent["padding"])
