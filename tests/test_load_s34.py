"""Session 34's load-stage hunt: hostile or careless parents refused in one line before heavy work (downloads,
weights loaded), nothing modified, no code run."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file, save_file
from test_scale_s30 import sharded_vit, shards

import hf_mudsc
from hf_mudsc.errors import LoadError


def weight_downloads(hub) -> list[str]:
    """The weight files the client downloaded (GETs without a Range header: a header read asks for a range)."""
    return [r.path for r in hub.requests if r.method == "GET" and r.path.endswith((".safetensors", ".bin"))
            and "range" not in r.headers]


def doubled(folder, key: str = "classifier.bias") -> tuple[str, str]:
    """Store `key` of a sharded checkpoint in a second shard as well: (first, second) shard holding it."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    holder = index["weight_map"][key]
    other = next(name for name in shards(folder) if name != holder)
    tensors = load_file(folder / other)
    tensors[key] = load_file(folder / holder)[key]
    save_file(tensors, folder / other, metadata={"format": "pt"})
    first, second = sorted((holder, other))
    return first, second


def test_a_hub_tensor_stored_in_two_shards_is_refused_before_any_weights_are_downloaded(local_hub, tmp_path):
    """merge(['user/p1', 'user/dup']) with user/dup's classifier.bias in two shards downloaded every weight first."""
    from test_loading import make_model

    make_model("vit_cls", seed=1).save_pretrained(tmp_path / "p1")
    local_hub.upload_folder("user/p1", tmp_path / "p1")
    folder = sharded_vit(tmp_path / "dup", seed=2)
    first, second = doubled(folder)
    local_hub.upload_folder("user/dup", folder)
    local_hub.requests.clear()
    with pytest.raises(LoadError) as refused:
        hf_mudsc.merge(["user/p1", "user/dup"], method="linear", progress=False)
    assert str(refused.value).startswith(f"'user/dup': tensor 'classifier.bias' is stored twice, in {first} and "
                                         f"{second}"), refused.value
    assert weight_downloads(local_hub) == []


def test_a_hub_model_type_no_adapter_merges_is_refused_with_only_its_config_downloaded(local_hub, tmp_path):
    """merge(['user/gpt', 'user/gpt']) of a gpt2 repo fetched its tokenizer files before reading config.json."""
    from hf_mudsc.errors import UnsupportedArchitectureError

    folder = tmp_path / "gpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    (folder / "vocab.json").write_text(json.dumps({"a": 0}))
    save_file({"wte.weight": __import__("torch").zeros(2, 2)}, folder / "model.safetensors")
    local_hub.upload_folder("user/gpt", folder)
    local_hub.requests.clear()
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel"):
        hf_mudsc.merge(["user/gpt", "user/gpt"], method="linear", progress=False)
    fetched = {r.path.rsplit("/", 1)[-1] for r in local_hub.requests_for("resolve")}
    assert fetched == {"config.json"}, fetched


@pytest.mark.parametrize("dry_run", [True, False])
def test_a_hidden_size_whose_tensors_overflow_torch_is_refused_in_one_line(tmp_path, dry_run):
    """merge([folder with hidden_size 10**12, good]): torch's 'Storage size calculation overflowed' traceback."""
    from factories import make_model, vit_folder

    bad = vit_folder(tmp_path / "bad", edit=lambda config: config.update(hidden_size=10**12))
    make_model("vit_cls", seed=1).save_pretrained(tmp_path / "good")
    with pytest.raises(LoadError) as refused:
        hf_mudsc.merge([str(bad), str(tmp_path / "good")], method="linear", progress=False, dry_run=dry_run)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{str(bad)!r}: config.json describes no "
                                                      "ViTForImageClassification transformers can build"), message


def test_a_last_parent_whose_config_does_not_fit_its_weights_is_refused_before_any_parent_is_loaded(tmp_path,
                                                                                                   monkeypatch):
    """merge([good, good, folder whose classifier.weight is stored transposed]) loaded both good parents first."""
    import transformers
    from factories import make_model

    folders = []
    for seed in (1, 2, 3):
        make_model("vit_cls", seed=seed).save_pretrained(tmp_path / f"p{seed}")
        folders.append(str(tmp_path / f"p{seed}"))
    tensors = load_file(tmp_path / "p3" / "model.safetensors")
    tensors["classifier.weight"] = tensors["classifier.weight"].t().contiguous()
    save_file(tensors, tmp_path / "p3" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LoadError) as planned:
        hf_mudsc.merge(folders, method="linear", progress=False, dry_run=True)
    monkeypatch.setattr(transformers.ViTForImageClassification, "from_pretrained",
                        lambda *a, **k: pytest.fail("weights loaded before refusing"))
    with pytest.raises(LoadError) as merged:
        hf_mudsc.merge(folders, method="linear", progress=False)
    assert str(merged.value) == str(planned.value)
    assert str(merged.value).startswith(f"{folders[2]!r}: config.json does not describe the weights in "
                                        "model.safetensors"), merged.value


@pytest.mark.parametrize("edit", [lambda c: c.update(hidden_size={"a": 1}), lambda c: c.update(layer_norm_eps="x"),
                                  lambda c: c.update(id2label={"a": "x", "b": "y", "c": "z"})])
def test_a_config_value_of_the_wrong_kind_names_the_config_fix_not_custom_code(tmp_path, edit):
    """load_parent(folder whose config.json has hidden_size {"a": 1}) said 'Models that need custom code are not
    supported': a known model type's config with a wrong value needs its config.json restored."""
    from factories import vit_folder

    from hf_mudsc.load.parents import load_parent

    folder = vit_folder(tmp_path / "vit", edit=edit)
    with pytest.raises(LoadError) as refused:
        load_parent(folder)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"cannot read the config of {str(folder)!r}: "), message
    assert "custom code" not in message and message.endswith("restore the config.json saved with the weights "
                                                             "(save_pretrained writes both)"), message


def test_a_sharded_hub_parent_whose_config_does_not_fit_its_weights_is_refused_before_downloading_them(local_hub,
                                                                                                       tmp_path):
    """merge(['user/p1', 'user/s']) with user/s's classifier.weight stored transposed downloaded every shard first."""
    from test_loading import make_model

    make_model("vit_cls", seed=1).save_pretrained(tmp_path / "p1")
    local_hub.upload_folder("user/p1", tmp_path / "p1")
    folder = sharded_vit(tmp_path / "s", seed=2)
    holder = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]["classifier.weight"]
    tensors = load_file(folder / holder)
    tensors["classifier.weight"] = tensors["classifier.weight"].t().contiguous()
    save_file(tensors, folder / holder, metadata={"format": "pt"})
    local_hub.upload_folder("user/s", folder)
    with pytest.raises(LoadError) as planned:
        hf_mudsc.merge(["user/p1", "user/s"], method="linear", progress=False, dry_run=True)
    local_hub.requests.clear()
    with pytest.raises(LoadError) as merged:
        hf_mudsc.merge(["user/p1", "user/s"], method="linear", progress=False)
    assert str(merged.value) == str(planned.value)
    assert "'classifier.weight' is (32, 3) in the checkpoint but (3, 32) per config.json" in str(merged.value)
    assert weight_downloads(local_hub) == []


@pytest.mark.parametrize("dry_run", [True, False])
@pytest.mark.parametrize("architecture", ["PreTrainedModel", "ViTPreTrainedModel"])
def test_a_config_naming_an_abstract_model_class_is_refused_before_any_weights(tmp_path, monkeypatch, dry_run,
                                                                                architecture):
    """merge of two folders whose config.json says architectures ['ViTPreTrainedModel']: the dry run's StopIteration
    traceback; the merge loaded the weights into a model without parameters, then 'does not look like a ViT'."""
    import transformers
    from factories import make_model

    folders = []
    for seed in (1, 2):
        folder = tmp_path / f"p{seed}"
        make_model("vit_cls", seed=seed).save_pretrained(folder)
        config = json.loads((folder / "config.json").read_text())
        config["architectures"] = [architecture]
        (folder / "config.json").write_text(json.dumps(config))
        folders.append(str(folder))
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained",
                        classmethod(lambda *a, **k: pytest.fail("weights loaded before refusing")))
    with pytest.raises(LoadError) as refused:
        hf_mudsc.merge(folders, method="linear", progress=False, dry_run=dry_run)
    assert str(refused.value) == (f"{folders[0]!r}: config.json names the architecture {architecture}, an abstract "
                                  "base class no checkpoint is saved from; restore the config.json saved with the "
                                  "weights (save_pretrained writes both)")


@pytest.mark.parametrize("dry_run", [True, False])
@pytest.mark.parametrize(("index", "said"), [
    ("{nope", "model.safetensors.index.json is unreadable (JSONDecodeError"),
    ('{"metadata": {}, "weight_map": ["a"]}', "model.safetensors.index.json is unreadable (AttributeError"),
    ('{"metadata": {}}', "model.safetensors.index.json is unreadable (KeyError"),
    (None, "model.safetensors.index.json names the shard '../../../../p1/model.safetensors', outside the folder"),
])
def test_a_hub_shard_index_that_is_malformed_or_leads_out_is_refused_in_one_line(local_hub, tmp_path, dry_run, index,
                                                                                  said):
    """merge(['user/p1', 'user/bad']) with user/bad's model.safetensors.index.json not JSON or a weight_map list: a
    bare JSONDecodeError or an AttributeError traceback; leading out, the dry run asked the Hub for another path."""
    from test_loading import make_model

    make_model("vit_cls", seed=1).save_pretrained(tmp_path / "p1")
    local_hub.upload_folder("user/p1", tmp_path / "p1")
    folder = sharded_vit(tmp_path / "bad", seed=2)
    if index is None:
        weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
        outside = "../../../../p1/model.safetensors"
        index = json.dumps({"metadata": {}, "weight_map": dict.fromkeys(weight_map, outside)})
    (folder / "model.safetensors.index.json").write_text(index)
    local_hub.upload_folder("user/bad", folder)
    local_hub.requests.clear()
    with pytest.raises(LoadError) as refused:
        hf_mudsc.merge(["user/p1", "user/bad"], method="linear", progress=False, dry_run=dry_run)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"'user/bad': {said}"), message
    assert not [r.path for r in local_hub.requests if r.path.endswith(".safetensors")]


@pytest.mark.parametrize("dry_run", [True, False])
def test_a_pad_token_id_past_the_vocabulary_is_refused_in_one_line(tmp_path, dry_run):
    """merge([bert folder with pad_token_id 10**6, good]): torch's 'Padding_idx must be within num_embeddings'
    AssertionError traceback from building the model on the meta device."""
    from factories import make_model

    make_model("bert_cls", seed=1).save_pretrained(tmp_path / "bad")
    config = json.loads((tmp_path / "bad" / "config.json").read_text())
    config["pad_token_id"] = 10**6
    (tmp_path / "bad" / "config.json").write_text(json.dumps(config))
    make_model("bert_cls", seed=2).save_pretrained(tmp_path / "good")
    bad = str(tmp_path / "bad")
    with pytest.raises(LoadError) as refused:
        hf_mudsc.merge([bad, str(tmp_path / "good")], method="linear", progress=False, dry_run=dry_run)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{bad!r}: config.json describes no "
                                                      "BertForSequenceClassification transformers can build"), message


@pytest.mark.parametrize(("kind", "edit"), [
    ("vit_cls", lambda c: c.update(architectures=1)),
    ("vit_cls", lambda c: c.update(dtype=1e308)),
    ("clip", lambda c: c["text_config"].update(num_attention_heads=0)),
])
def test_a_config_value_transformers_fails_on_outside_its_checks_is_refused_in_one_line(tmp_path, kind, edit):
    """merge([folder, folder], dry_run=True) with config.json architectures 1 (TypeError in model_class_for), dtype
    1e308 (IndexError printing the config) or a CLIP text_config with 0 heads (ZeroDivisionError): tracebacks."""
    from factories import make_model

    folder = tmp_path / "bad"
    make_model(kind, seed=1).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError) as refused:
        hf_mudsc.merge([str(folder), str(folder)], method="linear", progress=False, dry_run=True)
    message = str(refused.value)
    assert "\n" not in message and str(folder) in message, message
    assert "restore the config.json saved with the weights" in message or "save_pretrained" in message, message


def test_a_hub_config_whose_architectures_is_a_number_is_refused_in_one_line(local_hub, tmp_path):
    """merge(['user/odd', 'user/odd']) with config.json architectures 1: a TypeError traceback comparing the
    parents' classes (a Hub parent's class is first read there, before its weights)."""
    from factories import make_model

    folder = tmp_path / "odd"
    make_model("vit_cls", seed=1).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = 1
    (folder / "config.json").write_text(json.dumps(config))
    local_hub.upload_folder("user/odd", folder)
    for dry_run in (True, False):
        with pytest.raises(LoadError) as refused:
            hf_mudsc.merge(["user/odd", "user/odd"], method="linear", progress=False, dry_run=dry_run)
        assert str(refused.value).startswith("'user/odd': the config names no transformers architecture (1)")


def test_parents_whose_configs_do_not_fit_their_weights_are_refused_before_the_merges_own_config_checks(tmp_path):
    """merge([p1, p2]) both with config.json intermediate_size 0 over 48-wide weights: a multi-line SpecError from
    the memory check's spec; the dry run said the one-line config refusal."""
    from factories import make_model

    folders = []
    for seed in (1, 2):
        folder = tmp_path / f"p{seed}"
        make_model("vit_cls", seed=seed).save_pretrained(folder)
        config = json.loads((folder / "config.json").read_text())
        config["intermediate_size"] = 0
        (folder / "config.json").write_text(json.dumps(config))
        folders.append(str(folder))
    with pytest.raises(LoadError) as planned:
        hf_mudsc.merge(folders, method="linear", progress=False, dry_run=True)
    with pytest.raises(LoadError) as merged:
        hf_mudsc.merge(folders, method="linear", progress=False)
    assert str(merged.value) == str(planned.value) and "\n" not in str(merged.value)


def test_a_config_value_transformers_fails_on_while_loading_the_weights_is_refused_in_one_line(tmp_path):
    """merge([clip, clip]) with config.json initializer_factor null: a TypeError traceback from transformers'
    _init_weights inside from_pretrained (the dry run, which builds no weights, cannot see it)."""
    from factories import make_model

    folders = []
    for seed in (1, 2):
        folder = tmp_path / f"p{seed}"
        make_model("clip", seed=seed).save_pretrained(folder)
        config = json.loads((folder / "config.json").read_text())
        config["initializer_factor"] = None
        (folder / "config.json").write_text(json.dumps(config))
        folders.append(str(folder))
    with pytest.raises(LoadError) as refused:
        hf_mudsc.merge(folders, method="linear", progress=False)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{folders[0]!r}: transformers cannot load model.safetensors "
                                                      "into the CLIPModel config.json describes (TypeError: "), message
    assert message.endswith("restore the config.json saved with the weights (save_pretrained writes both)"), message
