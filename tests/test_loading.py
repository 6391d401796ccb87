"""Loading parents: references, folders, dtype, pickle refusal, vocabulary checks, Hub revisions (emulator)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from factories import BERT, make_batches, make_model
from safetensors.torch import load_file
from transformers import BertTokenizer, CLIPImageProcessor, CLIPTokenizer, ViTImageProcessor

import hf_mudsc
from hf_mudsc.errors import LoadError, MergeInputError, ParentMismatchError
from hf_mudsc.load.checks import check_parents
from hf_mudsc.load.parents import LoadedParent, load_parent, load_parents
from hf_mudsc.load.processors import image_processor_of, tokenizer_of
from hf_mudsc.load.references import parse_reference

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def bert_vocab(prefix: str = "w") -> dict[str, int]:
    """A vocabulary of exactly BERT["vocab_size"] tokens (so configs agree and only the vocabularies differ)."""
    tokens = SPECIALS + [f"{prefix}{i}" for i in range(BERT["vocab_size"] - len(SPECIALS))]
    return {token: index for index, token in enumerate(tokens)}


def save_bert(folder: Path, seed: int, vocab: dict[str, int]) -> Path:
    make_model("bert_cls", seed=seed).save_pretrained(folder)
    # BertTokenizer(vocab_file=...) silently ignores the file in transformers 5: pass the dict itself.
    BertTokenizer(vocab=vocab).save_pretrained(folder)
    return folder


def save_vit(folder: Path, seed: int, *, processor: bool = True, half: bool = False) -> Path:
    model = make_model("vit_cls", seed=seed)
    (model.half() if half else model).save_pretrained(folder)
    if processor:
        ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5], image_std=[0.5]).save_pretrained(folder)
    return folder


def make_pickle_only(folder: Path) -> Path:
    """A folder as an old checkpoint would be: config.json + pytorch_model.bin (file key names), no safetensors."""
    save_vit(folder, seed=3, processor=False)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    return folder


@pytest.mark.parametrize(
    "ref,expected",
    [
        ("org/name@v2", ("org/name", "v2")),
        ("org/name", ("org/name", None)),
        ("bert-base-uncased", ("bert-base-uncased", None)),
        ("org/name@0123456789abcdef0123456789abcdef01234567",
         ("org/name", "0123456789abcdef0123456789abcdef01234567")),
        ("org/name@refs/pr/3", ("org/name", "refs/pr/3")),
        ("./folder", ("./folder", None)),
        ("../models/a@b", ("../models/a@b", None)),
        ("/abs/path/model", ("/abs/path/model", None)),
        ("some/deep/folder", ("some/deep/folder", None)),
    ],
)
def test_parse_reference(ref, expected):
    assert parse_reference(ref) == expected


def test_parse_reference_keeps_existing_folders_with_at_signs(tmp_path, monkeypatch):
    folder = tmp_path / "model@v2"
    folder.mkdir()
    assert parse_reference(str(folder)) == (str(folder), None)
    monkeypatch.chdir(tmp_path)
    assert parse_reference("model@v2") == ("model@v2", None)


@pytest.mark.parametrize("ref", ["org/name@", "@v1", ""])
def test_parse_reference_rejects_malformed(ref):
    with pytest.raises(LoadError):
        parse_reference(ref)


def test_folder_float16_checkpoint_loads_as_float32_with_processor(tmp_path):
    folder = save_vit(tmp_path / "vit", seed=0, half=True)
    stored = load_file(folder / "model.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.float16}
    parent = load_parent(str(folder))
    assert isinstance(parent, LoadedParent)
    assert {p.dtype for p in parent.model.parameters()} == {torch.float32}
    assert not parent.model.training
    expected = stored["vit.embeddings.cls_token"].to(torch.float32)
    assert torch.equal(parent.model.vit.embeddings.cls_token.detach(), expected)
    assert type(parent.processor).__name__.startswith("ViTImageProcessor")
    assert (parent.reference, parent.repo_id, parent.revision, parent.commit_sha) == (str(folder), None, None, None)


def test_folder_without_processor_files_has_none(tmp_path):
    """transformers 5 builds an empty tokenizer from a bare config.json; we must not hand that out."""
    folder = tmp_path / "bert"
    make_model("bert_cls", seed=0).save_pretrained(folder)
    assert load_parent(folder).processor is None


def save_clip(folder: Path, seed: int = 0) -> Path:
    make_model("clip", seed=seed).save_pretrained(folder)
    vocab = {"<|startoftext|>": 57, "<|endoftext|>": 58, "a</w>": 2, "b</w>": 3, "a": 4, "ab</w>": 6}
    CLIPTokenizer(vocab=vocab, merges=[("a", "b</w>")]).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(folder)
    return folder


def test_clip_folder_gets_a_processor_with_both_parts(tmp_path):
    processor = load_parent(save_clip(tmp_path / "clip")).processor
    assert tokenizer_of(processor).get_vocab()["ab</w>"] == 6
    assert image_processor_of(processor).crop_size == {"height": 16, "width": 16}


def test_objects_are_used_as_given_or_copied_to_float32():
    model = make_model("vit_cls", seed=0)
    assert load_parent(model).model is model
    half = make_model("vit_cls", seed=0).half()
    loaded = load_parent(half).model
    assert loaded is not half and next(loaded.parameters()).dtype == torch.float32
    assert next(half.parameters()).dtype == torch.float16  # the input is never modified


def test_pickle_only_folder_refused_then_allowed(tmp_path):
    folder = make_pickle_only(tmp_path / "pickled")
    with pytest.raises(LoadError, match="allow_pickle=True") as caught:
        load_parent(folder)
    assert "arbitrary code" in str(caught.value)
    with pytest.raises(LoadError, match="allow_pickle=True"):
        hf_mudsc.merge([folder, folder], None, method="average", progress=False)
    parent = load_parent(folder, allow_pickle=True)
    reference = make_model("vit_cls", seed=3)
    for (name, mine), theirs in zip(parent.model.named_parameters(), reference.parameters()):
        assert torch.equal(mine, theirs), name


def test_missing_folder_and_custom_code_refused(tmp_path):
    with pytest.raises(LoadError, match="no model folder"):
        load_parent("./does-not-exist")
    folder = save_vit(tmp_path / "custom", seed=0)
    config = (folder / "config.json").read_text().replace('"ViTForImageClassification"', '"MyCustomModel"')
    (folder / "config.json").write_text(config)
    with pytest.raises(LoadError, match="custom code"):
        load_parent(folder)


def test_mismatched_vocabularies_refused(tmp_path):
    a = save_bert(tmp_path / "a", seed=0, vocab=bert_vocab("w"))
    b = save_bert(tmp_path / "b", seed=1, vocab=bert_vocab("x"))
    same = save_bert(tmp_path / "same", seed=2, vocab=bert_vocab("w"))
    assert load_parent(a).processor.get_vocab() != load_parent(b).processor.get_vocab()  # the trap is avoided
    with pytest.raises(LoadError, match="different tokenizer vocabularies"):
        load_parents([a, b])
    with pytest.raises(LoadError, match="different tokenizer vocabularies"):
        hf_mudsc.merge([a, b], None, method="average", progress=False)
    parents = load_parents([a, same])
    assert [p.model.config.vocab_size for p in parents] == [BERT["vocab_size"]] * 2


def _vocabulary_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("cannot compare vocabularies")]


def test_a_vocabulary_the_cli_cannot_compare_is_warned_once(tmp_path, caplog):
    """`hf-mudsc merge` loads the parents, then merges the LoadedParents, which were compared when they were loaded
    together: the warning that one parent ships no tokenizer was printed twice."""
    from hf_mudsc.cli.main import main

    a = save_bert(tmp_path / "a", seed=0, vocab=bert_vocab())
    b = tmp_path / "b"
    make_model("bert_cls", seed=1).save_pretrained(b)  # no tokenizer
    with caplog.at_level("WARNING", logger="hf_mudsc"):
        assert main(["merge", str(a), str(b), "--method", "linear", "--output", str(tmp_path / "out")]) == 0
    assert _vocabulary_warnings(caplog) == [f"cannot compare vocabularies: {b} ship(s) no tokenizer; make sure all "
                                            "parents were fine-tuned with the same tokenizer"]


def test_parents_loaded_apart_are_compared_and_warned_about_when_merged(tmp_path, caplog):
    """LoadedParents loaded one by one were never compared with each other: merge() compares them (and warns)."""
    a = save_bert(tmp_path / "a", seed=0, vocab=bert_vocab())
    b = tmp_path / "b"
    make_model("bert_cls", seed=1).save_pretrained(b)
    parents = [load_parent(a), load_parent(b)]
    with caplog.at_level("WARNING", logger="hf_mudsc"):
        hf_mudsc.merge(parents, method="linear", progress=False)
    assert len(_vocabulary_warnings(caplog)) == 1
    with pytest.raises(LoadError, match="different tokenizer vocabularies"):
        hf_mudsc.merge([parents[0], load_parent(save_bert(tmp_path / "x", seed=2, vocab=bert_vocab("x")))],
                       method="linear", progress=False)


def test_mismatched_configs_refused_before_weights(tmp_path, monkeypatch):
    a = save_vit(tmp_path / "a", seed=0)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    (b / "config.json").write_text((b / "config.json").read_text().replace('"hidden_size": 32', '"hidden_size": 64'))
    import hf_mudsc.load.parents as loading

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded before the configs were compared")

    monkeypatch.setattr(loading, "_finish", no_weights)
    with pytest.raises(LoadError, match="hidden_size"):
        load_parents([a, b])



def _edited_copy(folder: Path, to: Path, **fields) -> Path:
    import json

    shutil.copytree(folder, to)
    config = json.loads((to / "config.json").read_text())
    config.update(fields)
    (to / "config.json").write_text(json.dumps(config))
    return to


def test_parents_differing_only_in_dropout_merge_as_with_equal_configs(tmp_path):
    """Dropout rates are training settings (a merge and its use run in eval mode): fine-tunes trained with other
    rates were refused as if 'their tensors do not line up'. The merged config keeps parent A's rates."""
    a, b = save_vit(tmp_path / "a", seed=0), save_vit(tmp_path / "b", seed=1)
    b_drop = _edited_copy(b, tmp_path / "b-drop", hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.2)
    batches = make_batches("vit_cls", num_batches=2)
    merged = hf_mudsc.merge([a, b_drop], batches, method="mudsc", refit="none", progress=False)
    plain = hf_mudsc.merge([a, b], batches, method="mudsc", refit="none", progress=False)
    assert merged.config.hidden_dropout_prob == plain.config.hidden_dropout_prob
    for name, tensor in plain.state_dict().items():
        assert torch.equal(merged.state_dict()[name], tensor), name


@pytest.mark.parametrize("field,value", [("layer_norm_eps", 1e-5), ("hidden_act", "gelu_new")])
def test_parents_differing_in_what_they_compute_are_refused_without_blaming_their_tensors(tmp_path, field, value):
    """layer_norm_eps or the activation change each parent's function, and one merged model holds one value: still
    refused, but the message no longer says the tensors do not line up (they do) and tells how to accept it."""
    a = save_vit(tmp_path / "a", seed=0)
    b = _edited_copy(save_vit(tmp_path / "b", seed=1), tmp_path / "b-edit", **{field: value})
    for parents in ([a, b], [load_parent(a).model, load_parent(b).model]):
        with pytest.raises((LoadError, MergeInputError)) as caught:
            hf_mudsc.merge(parents, method="weight_matching", progress=False)
        message = str(caught.value)
        assert "\n" not in message and field in message and "line up" not in message
        assert "one merged model cannot hold both" in message

def test_merge_records_folder_parents(tmp_path):
    a, b = save_vit(tmp_path / "a", seed=0), save_vit(tmp_path / "b", seed=1)
    merged = hf_mudsc.merge([str(a), str(b)], None, method="average", progress=False)
    # By folder name: the absolute path would publish this machine's layout with a pushed config.
    assert merged.config.mudsc["parents"] == [a.name, b.name]
    assert merged.config.mudsc["parent_revisions"] == [None, None]


def test_offline_hub_reference_uses_the_cached_snapshot(tmp_path):
    """HF_HUB_OFFLINE=1 (as in these tests): `org/name` resolves through the local cache to its commit sha."""
    sha = "a" * 40
    repo = tmp_path / "cache" / "models--user--cached"
    save_vit(repo / "snapshots" / sha, seed=4)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    parent = load_parent("user/cached", cache_dir=tmp_path / "cache")
    assert (parent.repo_id, parent.revision, parent.commit_sha) == ("user/cached", None, sha)
    assert parent.model.config._name_or_path == "user/cached"
    assert parent.pinned_reference == f"user/cached@{sha}"
    with pytest.raises(LoadError, match="not in the local cache"):
        load_parent("user/absent", cache_dir=tmp_path / "cache")


def describe(parent) -> dict:
    return {"sha": parent.commit_sha, "revision": parent.revision, "repo_id": parent.repo_id,
            "reference": parent.reference, "name": parent.model.config._name_or_path,
            "dtypes": sorted({str(p.dtype) for p in parent.model.parameters()}),
            "checksum": float(sum(p.detach().double().sum() for p in parent.model.parameters())),
            "processor": type(parent.processor).__name__}


def refusal(refs: list[str]) -> str:
    """The LoadError's message, "no error" if the parents load."""
    try:
        load_parents(refs)
    except LoadError as error:
        return str(error)
    return "no error"


def test_hub_parents_at_pinned_revisions(local_hub, tmp_path):
    hub = local_hub  # loaded in this process from the emulator
    sha1 = hub.upload_folder("user/vit", save_vit(tmp_path / "v1", seed=0, half=True))
    sha2 = hub.upload_folder("user/vit", save_vit(tmp_path / "v2", seed=1))
    hub.upload_folder("user/bert-a", save_bert(tmp_path / "bert-a", seed=0, vocab=bert_vocab("w")))
    hub.upload_folder("user/bert-b", save_bert(tmp_path / "bert-b", seed=1, vocab=bert_vocab("x")))
    hub.upload_folder("user/pickled", make_pickle_only(tmp_path / "pickled"))
    for repo, kind in (("user/encoder", "vit"), ("user/encoder-nopool", "vit_nopool")):
        make_model(kind, seed=0).save_pretrained(tmp_path / repo)
        hub.upload_folder(repo, tmp_path / repo)
    assert sha1 != sha2

    pinned, head = describe(load_parent(f"user/vit@{sha1}")), describe(load_parent("user/vit"))
    vocab_error, pickle_error = refusal(["user/bert-a", "user/bert-b"]), refusal(["user/pickled"])
    pooler_error = refusal(["user/encoder", "user/encoder-nopool"])
    model = hf_mudsc.from_pretrained(f"user/vit@{sha1}", "user/vit", method="average", progress=False)
    merged = {"parents": model.config.mudsc["parents"], "revisions": model.config.mudsc["parent_revisions"]}

    with torch.no_grad():
        expected_v1 = float(sum(p.double().sum() for p in make_model("vit_cls", seed=0).half().float().parameters()))
        expected_v2 = float(sum(p.double().sum() for p in make_model("vit_cls", seed=1).parameters()))
    assert pinned["sha"] == sha1 and pinned["revision"] == sha1 and pinned["repo_id"] == "user/vit"
    assert pinned["reference"] == f"user/vit@{sha1}" and pinned["name"] == "user/vit"
    assert pinned["dtypes"] == ["torch.float32"]
    assert pinned["checksum"] == pytest.approx(expected_v1, rel=1e-9)
    assert pinned["processor"].startswith("ViTImageProcessor")
    assert head["sha"] == sha2 and head["revision"] is None
    assert head["checksum"] == pytest.approx(expected_v2, rel=1e-9)
    assert "different tokenizer vocabularies" in vocab_error
    assert "allow_pickle=True" in pickle_error
    # A Hub parent's headers come with its weights: the parameter names are compared once they are fetched.
    assert pooler_error.startswith("parent A ('user/encoder') has a pooler ('pooler.dense') and parent B "
                                   "('user/encoder-nopool') has none"), pooler_error
    assert merged == {"parents": ["user/vit", "user/vit"], "revisions": [sha1, sha2]}

    # Refused before any weights were downloaded.
    fetched = [r.path for r in hub.requests_for("resolve")]
    assert not [p for p in fetched if "bert" in p and p.endswith(".safetensors")], fetched
    assert not [p for p in fetched if p.endswith("pytorch_model.bin")], fetched
    assert any("user/bert-b" in p and "tokenizer" in p for p in fetched), fetched  # compared from the Hub
    assert not hub.unhandled and not hub.server_errors


# ----------------------------------------------------------------------------------------------------
# bad files: one clear line each, before any weights of the other parent are loaded
# ----------------------------------------------------------------------------------------------------


def _no_weights_loaded(monkeypatch):
    import hf_mudsc.load.parents as loading

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded before the bad file was reported")

    monkeypatch.setattr(loading, "_finish", no_weights)


@pytest.mark.parametrize("damage", ["truncated", "header garbage"])
def test_corrupt_safetensors_refused_in_one_line_before_any_weights(tmp_path, monkeypatch, damage):
    good = save_vit(tmp_path / "good", seed=0)
    bad = save_vit(tmp_path / "bad", seed=1)
    data = (bad / "model.safetensors").read_bytes()
    if damage == "truncated":
        (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    else:
        (bad / "model.safetensors").write_bytes(b"\xff" * 64 + data[64:])
    _no_weights_loaded(monkeypatch)
    with pytest.raises(LoadError) as caught:
        load_parents([good, bad])
    message = str(caught.value)
    assert "\n" not in message
    assert f"{str(bad)!r}: model.safetensors is not a valid safetensors file" in message
    assert "truncated or corrupt" in message and "re-save it with save_pretrained" in message


def test_config_describing_another_architecture_is_refused(tmp_path):
    """config.json says ViT, the weights are BERT's: transformers would silently initialise a random ViT."""
    folder = tmp_path / "liar"
    make_model("bert_cls", seed=0).save_pretrained(folder)
    save_vit(tmp_path / "vit", seed=0, processor=False)
    shutil.copy(tmp_path / "vit" / "config.json", folder / "config.json")
    with pytest.raises(LoadError) as caught:
        load_parent(folder)
    message = str(caught.value)
    assert "\n" not in message
    assert "config.json does not describe the weights" in message
    assert "38 tensors the ViTForImageClassification of config.json needs are missing" in message
    assert "39 tensors of the checkpoint are unused" in message



@pytest.mark.parametrize("kind", ["bert_nopool", "vit_nopool"])
def test_a_bare_encoder_saved_without_its_pooler_merges_from_its_folder(tmp_path, kind):
    """`BertModel(config, add_pooling_layer=False)` (an embedding model's encoder) saves no pooler and its config
    cannot say so: merging two such folders was refused ('config.json does not describe the weights ... restore the
    config.json'), a fix the user cannot make. Read as built, without a pooler, like the same models as objects."""
    folders = []
    for seed in (0, 1):
        make_model(kind, seed=seed).save_pretrained(tmp_path / f"{kind}-{seed}")
        folders.append(tmp_path / f"{kind}-{seed}")
    loaded = load_parent(folders[0])
    assert not any("pooler" in name for name, _ in loaded.model.named_parameters())
    batches = make_batches(kind, num_batches=2)
    from_folders = hf_mudsc.merge(folders, batches, method="mudsc", refit="none", progress=False)
    from_objects = hf_mudsc.merge([make_model(kind, seed=0), make_model(kind, seed=1)], batches, method="mudsc",
                                  refit="none", progress=False)
    assert from_folders.state_dict().keys() == from_objects.state_dict().keys()
    for name, tensor in from_objects.state_dict().items():
        assert torch.equal(from_folders.state_dict()[name], tensor), name


@pytest.fixture(scope="module")
def pooled_and_unpooled(tmp_path_factory):
    """For each bare encoder kind, a folder saved with its pooler and one saved without (`add_pooling_layer=False`)."""
    root = tmp_path_factory.mktemp("pooler")
    folders = {}
    for kind in ("vit", "bert"):
        for variant, seed in ((kind, 0), (f"{kind}_nopool", 1)):
            make_model(variant, seed=seed).save_pretrained(root / variant)
            folders[variant] = root / variant
    return folders


@pytest.mark.parametrize("kind,cls", [("vit", "ViTModel"), ("bert", "BertModel")])
@pytest.mark.parametrize("pooled_first", [True, False])
def test_bare_encoders_one_with_a_pooler_and_one_without_are_refused_before_weights(
        pooled_and_unpooled, monkeypatch, kind, cls, pooled_first):
    """QA s22: a pooled parent A crashed the merge (KeyError: 'pooler.dense'); an unpooled A silently dropped B's
    pooler; `linear` kept A's pooler and called it an average. Refused in one line before any weights are loaded,
    naming which parent has the pooler and which has none, and the fix."""
    pooled, unpooled = pooled_and_unpooled[kind], pooled_and_unpooled[f"{kind}_nopool"]
    folders = [pooled, unpooled] if pooled_first else [unpooled, pooled]
    with_pooler, without = ("A", "B") if pooled_first else ("B", "A")
    _no_weights_loaded(monkeypatch)
    with pytest.raises(ParentMismatchError) as caught:
        load_parents(folders)
    message = str(caught.value)
    assert "\n" not in message
    assert f"parent {with_pooler} ({str(folders[0 if pooled_first else 1])!r}) has a pooler ('pooler.dense')" in message
    assert f"parent {without} ({str(folders[1 if pooled_first else 0])!r}) has none" in message
    assert f"{cls}.from_pretrained(" in message and "add_pooling_layer=False" in message
    for dry_run in (True, False):  # the merge and its dry run refuse it alike
        with pytest.raises(ParentMismatchError, match="has a pooler"):
            hf_mudsc.merge(folders, method="linear", dry_run=dry_run, progress=False)


@pytest.mark.parametrize("kind", ["vit", "bert"])
def test_bare_encoder_objects_one_with_a_pooler_and_one_without_are_refused(kind):
    """The same parents given as model objects (and as loaded models checked after loading, e.g. pickle parents)."""
    pooled, unpooled = make_model(kind, seed=0), make_model(f"{kind}_nopool", seed=1)
    for method in ("mudsc", "weight_matching", "linear"):
        with pytest.raises(ParentMismatchError, match=r"^parent A has a pooler \('pooler.dense'\) and parent B has "
                                                        r"none"):
            hf_mudsc.merge([pooled, unpooled], make_batches(kind, 1), method=method, progress=False)
    with pytest.raises(MergeInputError, match=r"^parent B has a pooler \('pooler.dense'\) and parent A has none"):
        check_parents(unpooled, pooled)


def test_objects_built_with_other_parameters_are_refused_naming_the_first_differing_module():
    """Any other difference in parameter names (here a ViT whose final LayerNorm was replaced by an identity; a
    parameter only B holds is refused already, as an attached module) is refused in one line naming the module,
    instead of failing or dropping the tensor in the merge."""
    plain, trimmed = make_model("vit", seed=0), make_model("vit", seed=1)
    trimmed.layernorm = torch.nn.Identity()
    for parents, says in (([plain, trimmed], "parent B lacks 'layernorm.weight' (module 'layernorm'), which parent A "
                                             "holds"),
                          ([trimmed, plain], "parent B holds 'layernorm.weight' (module 'layernorm'), which parent A "
                                             "has not")):
        with pytest.raises(ParentMismatchError) as caught:
            hf_mudsc.merge(parents, method="linear", progress=False)
        message = str(caught.value)
        assert "\n" not in message
        assert message.startswith(says)
        assert message.endswith("build both parents the same way")


def test_a_classifier_checkpoint_without_the_pooler_it_reads_is_refused(tmp_path):
    """A BertForSequenceClassification reads the pooler: a checkpoint without it would run on random values."""
    from safetensors.torch import save_file

    folder = tmp_path / "bert"
    make_model("bert_cls", seed=0).save_pretrained(folder)
    tensors = {k: v for k, v in load_file(folder / "model.safetensors").items() if "pooler" not in k}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LoadError, match="2 tensors the BertForSequenceClassification of config.json needs are missing"):
        load_parent(folder)

def test_config_with_other_shapes_than_the_weights_is_refused(tmp_path):
    folder = save_vit(tmp_path / "vit", seed=0)
    config = (folder / "config.json").read_text()
    (folder / "config.json").write_text(config.replace('"hidden_size": 32', '"hidden_size": 64'))
    with pytest.raises(LoadError) as caught:
        load_parent(folder)
    message = str(caught.value)
    assert "\n" not in message
    assert "config.json does not describe the weights" in message
    assert "37 tensors have other shapes than config.json says" in message
    assert "'classifier.weight' is (3, 32) in the checkpoint but (3, 64) per config.json" in message


def test_malicious_pickle_is_refused_even_with_allow_pickle(tmp_path):
    """--allow-pickle trusts the source, yet loading stays weights_only: a pickle that runs code is refused."""
    folder = make_pickle_only(tmp_path / "evil")
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    marker = tmp_path / "code-ran"
    state["evil"] = _RunsCode(str(marker))
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(LoadError) as caught:
        load_parent(folder, allow_pickle=True)
    message = str(caught.value)
    assert not marker.exists()
    assert "\n" not in message
    assert f"{str(folder)!r}: pytorch_model.bin holds more than tensors" in message
    assert "refused to run it" in message and "convert the checkpoint to safetensors" in message


class _RunsCode:
    """Unpickling this object would run `open(path, "w")`: what a malicious checkpoint does."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


# ----------------------------------------------------------------------------------------------------
# model objects + raw calibration data: the processor comes from name_or_path, or from processor=
# ----------------------------------------------------------------------------------------------------


def _texts(count: int) -> list[str]:
    generator = torch.Generator().manual_seed(3)
    return [" ".join(f"w{int(i)}" for i in torch.randint(0, 50, (int(n),), generator=generator))
            for n in torch.randint(2, 12, (count,), generator=generator)]


def _merged_weights(models, calibration, **options) -> dict[str, torch.Tensor]:
    merged = hf_mudsc.merge(models, calibration, method="zipit", batch_size=4, progress=False, **options)
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def test_model_objects_find_the_processor_saved_in_their_folder(tmp_path):
    import datasets
    from transformers import AutoModelForSequenceClassification

    folders = [save_bert(tmp_path / f"bert{seed}", seed=seed, vocab=bert_vocab()) for seed in (0, 1)]
    texts = datasets.Dataset.from_dict({"text": _texts(12)})
    objects = [AutoModelForSequenceClassification.from_pretrained(f) for f in folders]
    assert objects[0].name_or_path == str(folders[0])
    from_objects = _merged_weights(objects, texts)
    from_folders = _merged_weights([str(f) for f in folders], texts)
    assert from_objects.keys() == from_folders.keys()
    assert all(torch.equal(from_objects[k], from_folders[k]) for k in from_folders)
    assert tokenizer_of(load_parent(objects[0]).processor).get_vocab() == bert_vocab()


def test_model_objects_take_processor_keyword(tmp_path):
    import datasets

    texts = datasets.Dataset.from_dict({"text": _texts(12)})
    folders = [save_bert(tmp_path / f"bert{seed}", seed=seed, vocab=bert_vocab()) for seed in (0, 1)]
    expected = _merged_weights([str(f) for f in folders], texts)
    objects = [make_model("bert_cls", seed=seed) for seed in (0, 1)]  # built from a config: no folder to look in
    with pytest.raises(ValueError, match="ship no tokenizer"):
        hf_mudsc.merge(objects, texts, method="zipit", batch_size=4, progress=False)
    got = _merged_weights(objects, texts, processor=BertTokenizer(vocab=bert_vocab()))
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_model_objects_find_the_processor_of_a_cached_hub_id(tmp_path):
    """`from_pretrained("org/name")` leaves name_or_path = the Hub id: the cached snapshot is used, offline."""
    import datasets
    from huggingface_hub import constants

    sha = "c" * 40
    repo = Path(constants.HF_HUB_CACHE) / "models--loadfix--cached-bert"
    save_bert(repo / "snapshots" / sha, seed=0, vocab=bert_vocab())
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(sha)
    objects = [make_model("bert_cls", seed=seed) for seed in (0, 1)]
    for model in objects:
        model.config._name_or_path = "loadfix/cached-bert"
        model.name_or_path = "loadfix/cached-bert"
    assert tokenizer_of(load_parent(objects[0]).processor).get_vocab() == bert_vocab()
    texts = datasets.Dataset.from_dict({"text": _texts(12)})
    expected = _merged_weights(objects, texts, processor=BertTokenizer(vocab=bert_vocab()))
    got = _merged_weights(objects, texts)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    objects[0].name_or_path = objects[0].config._name_or_path = "loadfix/not-cached"
    assert load_parent(objects[0]).processor is None  # nothing cached: no download is attempted
