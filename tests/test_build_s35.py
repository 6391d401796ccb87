"""Session 35, the merged model a user loads: config fields, processor files (helper "build")."""

from __future__ import annotations

import json
import logging

import torch
from factories import BERT, fine_tune, randomize
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification, BertTokenizer

import hf_mudsc


def _tokenizer() -> BertTokenizer:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(BERT["vocab_size"] - 5)]
    return BertTokenizer(vocab={token: i for i, token in enumerate(vocab)})


def _bert_parents(tmp_path, edit=None):
    """Two fine-tunes of one tiny BERT classifier saved with a tokenizer; `edit(config_dict)` changes parent B's
    config.json."""
    torch.manual_seed(0)
    base = randomize(BertForSequenceClassification(BertConfig(**BERT, num_labels=2)), 0)
    folders = []
    for seed in (1, 2):
        folder = tmp_path / f"bert{seed}"
        fine_tune(base, seed, 0.01).save_pretrained(folder)
        _tokenizer().save_pretrained(folder)
        folders.append(folder)
    if edit is not None:
        path = folders[1] / "config.json"
        config = json.loads(path.read_text())
        edit(config)
        path.write_text(json.dumps(config))
    return folders


def test_parents_differing_only_in_fields_that_never_run_are_merged(tmp_path):
    """merge([A, B]) with B's config.json holding bert-base-uncased's legacy "gradient_checkpointing": false and
    another initializer_range / use_cache was refused ("different configurations")."""
    def legacy(config):
        config.update(gradient_checkpointing=False, initializer_range=0.01, use_cache=False, torchscript=False,
                      chunk_size_feed_forward=0, output_past=True)

    folders = _bert_parents(tmp_path, legacy)
    merged = hf_mudsc.merge(folders, method="linear", progress=False)
    out = tmp_path / "merged"
    hf_mudsc.save_merged(merged, out)
    loaded, info = AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert not any(info.values())
    assert loaded.config.initializer_range == BERT.get("initializer_range", 0.02)  # parent A's, as for dropout


def test_a_tokenizer_s_remote_code_pointer_is_no_tokenizer_difference(tmp_path, caplog):
    """merge([A, B]) where A's tokenizer_config.json names remote code (auto_map) that the merged folder drops warned
    "the parents' tokenizers differ (auto_map)" though both tokenize alike."""
    folders = _bert_parents(tmp_path)
    path = folders[0] / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["auto_map"] = {"AutoTokenizer": ["their_code.Tokenizer", None]}
    path.write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING):
        merged = hf_mudsc.merge(folders, method="linear", progress=False)
    assert not [text for text in merged.config.mudsc["warnings"] if "tokenizers differ" in text]
    assert "tokenizers differ" not in caplog.text
    out = tmp_path / "merged"
    hf_mudsc.save_merged(merged, out)
    assert "auto_map" not in json.loads((out / "tokenizer_config.json").read_text())


def test_a_parent_object_s_output_switches_are_not_written_into_the_merged_config(tmp_path):
    """merge([A loaded with return_dict=False, output_hidden_states=True, B]) wrote those switches into the merged
    config.json: the merged folder returned tuples and pipeline("text-classification", folder) raised TypeError."""
    from transformers import pipeline

    folders = _bert_parents(tmp_path)
    model_a = AutoModelForSequenceClassification.from_pretrained(
        folders[0], return_dict=False, output_hidden_states=True, output_attentions=True)
    merged = hf_mudsc.merge([model_a, folders[1]], method="linear", progress=False)
    assert (model_a.config.return_dict, model_a.config.output_hidden_states) == (False, True)  # the parent is kept
    out = tmp_path / "merged"
    hf_mudsc.save_merged(merged, out)
    config = json.loads((out / "config.json").read_text())
    assert not {"return_dict", "output_hidden_states", "output_attentions"} & set(config)
    answer = pipeline("text-classification", model=str(out))("w1 w2 w3")
    assert answer[0]["label"] in ("LABEL_0", "LABEL_1")


def test_a_processor_s_remote_code_pointer_dropped_from_the_merged_folder_is_said(tmp_path, caplog):
    """save_merged of a merge whose parent A's tokenizer_config.json names remote code (auto_map) wrote the tokenizer
    without it and said nothing: a user of that remote tokenizer gets transformers' own one unwarned."""
    folders = _bert_parents(tmp_path)
    for folder in folders:
        path = folder / "tokenizer_config.json"
        config = json.loads(path.read_text())
        config["auto_map"] = {"AutoTokenizer": ["their_code.Tokenizer", None]}
        path.write_text(json.dumps(config))
    merged = hf_mudsc.merge(folders, method="linear", progress=False)
    with caplog.at_level(logging.WARNING, logger="hf_mudsc"):
        hf_mudsc.save_merged(merged, tmp_path / "merged")
    said = [record.getMessage() for record in caplog.records if "auto_map" in record.getMessage()]
    assert len(said) == 1 and "tokenizer_config.json" in said[0], caplog.text
    assert "auto_map" not in (tmp_path / "merged" / "tokenizer_config.json").read_text()


def _clip_tokenizer(folder):
    """A tiny CLIP tokenizer (letters and their word ends) written into `folder`."""
    from transformers import CLIPTokenizer

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {"!": 0, **{c: i + 1 for i, c in enumerate(letters)}, **{f"{c}</w>": i + 27 for i, c in enumerate(letters)},
             "<|startoftext|>": 57, "<|endoftext|>": 58}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="!")


def test_a_merged_clip_saved_without_a_tokenizer_another_parent_ships_is_said(tmp_path):
    """merge([CLIP A saved with its image processor only, CLIP B with image processor and tokenizer]): the merged
    folder got no tokenizer, said nowhere; zero-shot pipeline() on it built a tokenizer of special tokens only and
    scored every label alike."""
    from factories import TEXT, VISION
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    image_processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    torch.manual_seed(0)
    base = randomize(CLIPModel(CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=24)), 0)
    folders = []
    for seed in (1, 2):
        folder = tmp_path / f"clip{seed}"
        fine_tune(base, seed, 0.01).save_pretrained(folder)
        folders.append(folder)
    image_processor.save_pretrained(folders[0])
    CLIPProcessor(image_processor=image_processor, tokenizer=_clip_tokenizer(tmp_path / "vocab")).save_pretrained(
        folders[1])
    merged = hf_mudsc.merge(folders, method="linear", progress=False)
    said = [text for text in merged.config.mudsc["warnings"] if "no tokenizer" in text]
    assert len(said) == 1 and "parent B" in said[0], merged.config.mudsc["warnings"]
