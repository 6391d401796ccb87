"""Architecture corners found by the s30 hunt: configs a user meets on the Hub that transformers runs, which the
merge must merge right or refuse in one line before heavy work."""

from __future__ import annotations

import logging

import pytest
from factories import make_batches, make_model, model_output, permuted_copy, relative_error

import hf_mudsc
from hf_mudsc.architectures import spec_for

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.mark.parametrize("kind", ["bert_cls", "roberta_cls", "distilbert_cls", "bert"])
def test_a_parent_whose_config_says_return_dict_false_merges(kind, tmp_path, caplog):
    """A config saved with `return_dict=False` (set for torch.jit / ONNX export) makes the forward return a tuple:
    the merged model is a stock one (session 35: `from_pretrained(..., return_dict=False)` puts the switch on the
    objects, not in their checkpoints, and a merged folder returning tuples broke `pipeline()`), and says so."""
    model = make_model(kind, 0)
    model.config.return_dict = False
    copy = permuted_copy(model, spec_for(model), seed=1)
    batches = make_batches(kind)
    with caplog.at_level(logging.INFO, logger="hf_mudsc"):
        merged = hf_mudsc.merge([model, copy], batches, progress=False)
    assert merged.config.return_dict is True
    assert any("return_dict=False" in record.getMessage() and "default output switches" in record.getMessage()
               for record in caplog.records)
    model.config.return_dict = True
    assert relative_error(model_output(merged, batches[0]), model_output(model, batches[0])) < 1e-4


@pytest.mark.parametrize("kind", ["vit_cls", "clip"])
def test_a_model_transformers_cannot_run_with_return_dict_false_is_refused_in_one_line(kind):
    """ViT and CLIP with `return_dict=False` fail inside transformers' own forward (an inner output read by name):
    the merge raised that bare AttributeError; now one line naming the setting and the fix."""
    model = make_model(kind, 0)
    model.config.return_dict = False
    copy = permuted_copy(model, spec_for(model), seed=1)
    with pytest.raises(hf_mudsc.errors.CalibrationError) as caught:
        hf_mudsc.merge([model, copy], make_batches(kind), progress=False)
    message = str(caught.value)
    assert "\n" not in message and "return_dict=False" in message and "config.return_dict = True" in message


@pytest.mark.parametrize(("kind", "key", "value", "module"), [
    ("bert_cls", "hidden_act", "relu", "intermediate_act_fn"),
    ("vit_cls", "hidden_act", "relu", "activation_fn"),
    ("bert_cls", "hidden_act", "gelu_python", "intermediate_act_fn"),  # the same class, another function inside
])
def test_an_object_whose_activation_config_was_edited_after_building_is_refused(kind, key, value, module):
    """A parent object whose `config.hidden_act` was edited after it was built keeps its old activation layers: it
    was merged, and the saved config made `from_pretrained` compute another function than both parents (README:
    an object whose config gives other layer settings than its layers keep is refused in one line)."""
    model = make_model(kind, 0)
    setattr(model.config, key, value)
    copy = permuted_copy(model, spec_for(model), seed=1)
    with pytest.raises(hf_mudsc.errors.LoadError) as caught:
        hf_mudsc.merge([model, copy], make_batches(kind), progress=False)
    message = str(caught.value)
    assert "\n" not in message and module in message and "config does not describe the model" in message, message


def test_the_dry_run_refuses_checkpoints_lacking_tensors_their_config_needs_as_the_merge_does(tmp_path):
    """The dry run read the headers' shapes but not which tensors are missing: a BertForSequenceClassification
    checkpoint without the pooler it reads passed the dry run, then the merge refused it. Both refuse it in the
    loader's words; a bare BertModel without its pooler (add_pooling_layer=False) still passes both."""
    from safetensors.torch import load_file, save_file

    for kind, refused in (("bert_cls", True), ("bert", False)):
        folders = []
        for name, seed in (("a", 0), ("b", 1)):
            folder = tmp_path / f"{kind}-{name}"
            make_model(kind, seed).save_pretrained(folder)
            tensors = {k: v for k, v in load_file(folder / "model.safetensors").items() if "pooler" not in k}
            save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
            folders.append(str(folder))
        messages = []
        for dry_run in (True, False):
            try:
                hf_mudsc.merge(folders, method="linear", dry_run=dry_run, progress=False)
                messages.append(None)
            except hf_mudsc.errors.LoadError as error:
                messages.append(str(error))
        if refused:
            assert messages[0] is not None and messages[0] == messages[1], messages
            assert "2 tensors the BertForSequenceClassification of config.json needs are missing" in messages[0]
        else:
            assert messages == [None, None], messages


def test_an_object_lacking_layers_its_config_builds_is_refused_in_one_line():
    """Layers cut from an object (`model.bert.encoder.layer = layer[:2]`, a pruning step) while its config still says
    3: the merge ended in a 21-line SpecError naming the adapter's spec. One line naming a missing tensor and the
    fix, as for the same checkpoint saved to a folder; a bare model without its pooler still merges."""
    import copy

    from factories import BERT
    from transformers import BertConfig, BertForSequenceClassification

    torch_model = BertForSequenceClassification(BertConfig(**{**BERT, "num_hidden_layers": 3}, num_labels=3))
    torch_model.bert.encoder.layer = torch_model.bert.encoder.layer[:2]
    for dry_run in (True, False):
        with pytest.raises(hf_mudsc.errors.LoadError) as caught:
            hf_mudsc.merge([torch_model, copy.deepcopy(torch_model)], method="linear", dry_run=dry_run, progress=False)
        message = str(caught.value)
        assert "\n" not in message and "bert.encoder.layer.2." in message and "num_hidden_layers" in message, message
    bare = make_model("bert_nopool", 0)
    merged = hf_mudsc.merge([bare, make_model("bert_nopool", 1)], method="linear", progress=False)
    assert merged.pooler is None
