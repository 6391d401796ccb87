"""Parents passed as in-memory `PreTrainedModel` objects: left exactly as they were (every submodule's mode, the
caller's hooks, weights), also when the merge fails midway; merged as their weights define them (no hook or dropout
changes a statistic or a decision); objects that are not plain models refused in one line naming the fix; the
merged model a stock one (no parent's hook, trainable)."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from factories import BERT, fine_tune, make_batches, make_model, randomize, same_weights
from transformers import BertConfig, BertForSequenceClassification

import hf_mudsc
from hf_mudsc.errors import LoadError, MergeInputError

HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_state_dict_hooks")


def hooks_of(model: torch.nn.Module) -> dict[str, dict[str, tuple[int, ...]]]:
    """Every module's registered hooks (their handle ids), by module name and hook kind."""
    return {name: {kind: tuple(getattr(module, kind)) for kind in HOOK_DICTS if getattr(module, kind)}
            for name, module in model.named_modules() if any(getattr(module, kind) for kind in HOOK_DICTS)}


def modes_of(model: torch.nn.Module) -> dict[str, bool]:
    return {name: module.training for name, module in model.named_modules()}


class RaisesAt:
    """Calibration batches that raise `error` when batch `at` is asked for (a failure midway)."""

    def __init__(self, batches: list[dict], error: BaseException, at: int) -> None:
        self.batches, self.error, self.at = batches, error, at

    def __iter__(self):
        for index, batch in enumerate(self.batches):
            if index == self.at:
                raise self.error
            yield batch


@pytest.fixture(scope="module")
def batches():
    return make_batches("vit_cls", num_batches=3, batch_size=8)


def hooked_pair():
    """Two parents in mixed modes with the caller's hooks: A counts its calls, B's doubles an output."""
    a, b = make_model("vit_cls", 0), make_model("vit_cls", 1)
    a.train()
    a.vit.embeddings.eval()  # a mode set per submodule
    b.eval()
    b.classifier.train()
    calls: list[int] = []
    a.vit.layernorm.register_forward_hook(lambda module, args, output: calls.append(1))
    b.vit.layernorm.register_forward_hook(lambda module, args, output: output * 2)
    b.vit.layers[0].register_forward_pre_hook(lambda module, args: None)
    return a, b, calls


def test_merging_leaves_every_submodules_mode_and_the_callers_hooks_and_never_runs_them(batches):
    a, b, calls = hooked_pair()
    before = [(modes_of(m), hooks_of(m), copy.deepcopy(m.state_dict())) for m in (a, b)]
    merged = hf_mudsc.merge([a, b], batches, method="mudsc", refit="none", progress=False)
    for model, (modes, hooks, state) in zip((a, b), before):
        assert modes_of(model) == modes
        assert hooks_of(model) == hooks
        assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    assert not calls, "the caller's hook ran on the merge's calibration batches"
    # The merge reads the parents' weights: the same as of hook-free copies (B's hook doubles an output).
    plain = [make_model("vit_cls", 0), make_model("vit_cls", 1)]
    assert same_weights(merged, hf_mudsc.merge(plain, batches, method="mudsc", refit="none", progress=False))


@pytest.mark.parametrize("error", [RuntimeError("the data source went away"), KeyboardInterrupt()],
                         ids=["error", "interrupt"])
def test_a_merge_failing_midway_leaves_modes_and_hooks_as_they_were(batches, error):
    a, b, calls = hooked_pair()
    before = [(modes_of(m), hooks_of(m), copy.deepcopy(m.state_dict())) for m in (a, b)]
    with pytest.raises(type(error)):
        hf_mudsc.merge([a, b], RaisesAt(batches, error, at=1), method="mudsc", refit="none", progress=False)
    for model, (modes, hooks, state) in zip((a, b), before):
        assert modes_of(model) == modes
        assert hooks_of(model) == hooks
        assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    a(**batches[0])  # the hooks are the caller's again: they run on the caller's forward passes
    assert calls == [1]


def test_the_merged_model_has_no_parent_hook_and_is_trainable(batches):
    a, b, calls = hooked_pair()
    a.requires_grad_(False)  # a frozen parent: the merged model is a fresh model, trainable as from_pretrained's
    merged = hf_mudsc.merge([a, b], batches, method="mudsc", refit="none", progress=False)
    assert hooks_of(merged) == {}
    merged(**batches[0])
    assert not calls
    assert all(parameter.requires_grad for parameter in merged.parameters())


def dropout_bert(seed: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(**{**BERT, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}, num_labels=3)
    return randomize(BertForSequenceClassification(config), seed)


def test_parents_in_training_mode_merge_as_in_eval_mode():
    """Dropout is off for every forward pass of the merge: the α search and the refit gate score the parents'
    own outputs, so their choices do not depend on the mode the caller left the parents in."""
    data = make_batches("bert_cls", num_batches=3, batch_size=8)
    evaluated = hf_mudsc.merge([dropout_bert(0), dropout_bert(1)], data, method="mudsc", alpha="auto",
                               progress=False)
    training = [dropout_bert(0).train(), dropout_bert(1).train()]
    merged = hf_mudsc.merge(training, data, method="mudsc", alpha="auto", progress=False)
    assert all(model.training for model in training)
    assert merged.config.mudsc["alpha_auto"] == evaluated.config.mudsc["alpha_auto"]
    assert merged.config.mudsc["refit_gate"] == evaluated.config.mudsc["refit_gate"]
    assert same_weights(merged, evaluated)


def one_line_error(models, batches, **options) -> str:
    with pytest.raises((MergeInputError, LoadError)) as caught:
        hf_mudsc.merge(models, batches, method="mudsc", progress=False, **options)
    message = str(caught.value)
    assert "\n" not in message, message
    return message


def test_a_parent_on_the_meta_device_is_refused_in_one_line(batches):
    with torch.device("meta"):
        empty = type(make_model("vit_cls", 0))(make_model("vit_cls", 0).config)
    for models in ([empty, make_model("vit_cls", 1)], [make_model("vit_cls", 1), empty]):
        message = one_line_error(models, batches)
        assert "meta device" in message and "from_pretrained" in message, message


@pytest.mark.parametrize("wrap,inner", [(torch.nn.DataParallel, ".module"), (torch.compile, "._orig_mod")],
                         ids=["DataParallel", "compile"])
def test_a_wrapped_parent_is_refused_naming_the_model_inside(batches, wrap, inner):
    message = one_line_error([wrap(make_model("vit_cls", 0)), make_model("vit_cls", 1)], batches)
    assert "ViTForImageClassification" in message and inner in message, message


def test_an_attached_adapter_is_refused_in_one_line(batches):
    a = make_model("vit_cls", 0)
    a.vit.layers[0].attention.q_proj.lora_A = torch.nn.Linear(32, 4, bias=False)  # what LoRA injection adds
    message = one_line_error([a, make_model("vit_cls", 1)], batches)
    assert "vit.layers.0.attention.q_proj.lora_A.weight" in message and "merge_and_unload" in message, message


@pytest.mark.parametrize("key,value,tensor", [("num_labels", 5, "classifier.weight"),
                                              ("intermediate_size", 64, "vit.layers.0.mlp.fc1.weight")])
def test_a_config_that_disagrees_with_the_weights_is_refused_in_one_line(batches, key, value, tensor):
    """Both parents' configs edited alike (they agree with each other): a merged model with that config would not
    load its own weights back (`from_pretrained` finds other shapes)."""
    a, b = make_model("vit_cls", 0), make_model("vit_cls", 1)
    for model in (a, b):
        setattr(model.config, key, value)
    message = one_line_error([a, b], batches)
    assert "parent A" in message and tensor in message and "config" in message, message


@pytest.mark.parametrize("key,value,attribute", [("num_attention_heads", 2, "num_attention_heads"),
                                                 ("layer_norm_eps", 1e-5, "eps")])
def test_a_config_edited_without_changing_shapes_is_refused_in_one_line(batches, key, value, attribute):
    """Both parents' configs edited alike where no weight shape changes (heads of another size, another epsilon): the
    parents still compute with what they were built with, so a merge read from the config would group and build heads
    the parents never had; the merged model, rebuilt from that config, would compute something else."""
    a, b = make_model("vit_cls", 0), make_model("vit_cls", 1)
    for model in (a, b):
        setattr(model.config, key, value)
    message = one_line_error([a, b], batches)
    assert "parent A" in message and attribute in message and "config" in message, message


def test_a_config_edited_only_in_dropout_is_merged(batches):
    """Dropout changes nothing a merge reads (every parent runs in eval mode): such an edit is not refused."""
    a, b = make_model("vit_cls", 0), make_model("vit_cls", 1)
    for model in (a, b):
        model.config.hidden_dropout_prob = 0.3
        model.config.attention_probs_dropout_prob = 0.2
    merged = hf_mudsc.merge([a, b], calibration=batches, method="weight_matching", refit="none", progress=False)
    assert merged.config.hidden_dropout_prob == 0.3


class AdapterWrapper(torch.nn.Module):
    """What a PEFT `PeftModel` is to the merge: a module around a model, with `merge_and_unload()`."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.base_model = model

    def merge_and_unload(self) -> torch.nn.Module:
        return self.base_model


def test_an_adapter_wrapper_is_refused_naming_merge_and_unload(batches):
    message = one_line_error([AdapterWrapper(make_model("vit_cls", 0)), make_model("vit_cls", 1)], batches)
    assert "AdapterWrapper" in message and "merge_and_unload()" in message, message


def test_a_base_object_without_weights_or_with_an_adapter_is_refused_in_one_line():
    base = make_model("vit_cls", 0)
    parents = [fine_tune(base, seed, 0.05, relative=True) for seed in (1, 2)]
    with torch.device("meta"):
        empty = type(base)(base.config)
    adapted = copy.deepcopy(base)
    adapted.vit.layers[1].mlp.fc1.lora_B = torch.nn.Linear(4, 48, bias=False)
    for odd, expected in ((empty, "meta device"), (adapted, "vit.layers.1.mlp.fc1.lora_B.weight")):
        with pytest.raises(LoadError) as caught:
            hf_mudsc.merge(parents, base=odd, method="task_arithmetic", progress=False)
        message = str(caught.value)
        assert "\n" not in message and message.startswith("the base") and expected in message, message


def test_the_merged_model_runs_its_own_layers_when_a_parents_forward_was_replaced(batches, tmp_path):
    """A module's `forward` replaced on parent A (a wrapper, accelerate's `add_hook_to_module`) must not come along
    into the merged model: a wrapper closing over A's own `forward` would run A's weights inside the merged model."""
    from accelerate.hooks import ModelHook, add_hook_to_module
    from factories import model_output

    a, b = make_model("vit_cls", 0), make_model("vit_cls", 1)
    layer = a.vit.layers[0]
    own_forward = layer.forward
    layer.forward = lambda *args, **kwargs: own_forward(*args, **kwargs)
    add_hook_to_module(a.vit.layers[1], ModelHook())
    merged = hf_mudsc.merge([a, b], batches, method="mudsc", refit="none", progress=False)
    assert [name for name, module in merged.named_modules()
            if "forward" in vars(module) or hasattr(module, "_hf_hook")] == []
    expected = model_output(merged, batches[0])
    with torch.no_grad():
        for parameter in a.parameters():
            parameter.mul_(0.5)
    assert torch.equal(model_output(merged, batches[0]), expected)
    merged.save_pretrained(tmp_path)
    assert torch.equal(model_output(type(merged).from_pretrained(tmp_path).eval(), batches[0]), expected)


def test_the_merged_model_does_not_inherit_gradient_checkpointing(batches):
    """A training-time switch of parent A (not in its config, not saved) stays with A, as from_pretrained's
    model would not have it either."""
    a = make_model("vit_cls", 0)
    getattr(a, "activation_checkpointing_enable", a.gradient_checkpointing_enable)()  # the new name where it exists
    merged = hf_mudsc.merge([a, make_model("vit_cls", 1)], batches, method="mudsc", refit="none", progress=False)
    def checkpointing(model):  # what transformers' property reads (renamed within 5.x: no deprecated name here)
        return any(getattr(module, "gradient_checkpointing", False) is True for module in model.modules())

    assert checkpointing(a) and not checkpointing(merged)


class MergingMeanwhile:
    """Calibration batches that, before the first one is read (the outer merge holds its parents and has its hooks
    on them), run `merge(models, ...)` in another thread to its end: two merges at once, deterministically."""

    def __init__(self, batches: list[dict], models: list, **kwargs) -> None:
        self.batches, self.models, self.kwargs = batches, models, kwargs
        self.result: object = None

    def __iter__(self):
        if self.result is None:
            def run() -> None:
                try:
                    self.result = hf_mudsc.merge(self.models, self.batches, progress=False, **self.kwargs)
                except Exception as error:  # noqa: BLE001 - the test reads what the other merge raised
                    self.result = error
            thread = threading.Thread(target=run)
            thread.start()
            thread.join()
        yield from self.batches


@pytest.mark.parametrize("shared", ["parent A", "parent B", "the base"])
def test_a_parent_another_merge_is_using_is_refused_in_one_line_naming_it(batches, shared):
    """Two threads merging the same parent objects at once both failed inside the calibration (each ran the
    other's hooks): the second is refused before any work, naming the object, and the first merges as alone."""
    base = make_model("vit_cls", 0)
    a, b = fine_tune(base, 1, 0.02, relative=True), fine_tune(base, 2, 0.02, relative=True)
    own = {"parent A": a, "parent B": b, "the base": base}
    others = [copy.deepcopy(a), copy.deepcopy(b)]
    other_base = copy.deepcopy(base)
    if shared == "the base":
        other_base = base
    else:
        others[shared == "parent B"] = own[shared]
    data = MergingMeanwhile(batches, others, method="ties", base=other_base)
    merged = hf_mudsc.merge([a, b], data, method="regmean", base=base, refit="none", progress=False)
    assert isinstance(data.result, MergeInputError)
    assert str(data.result) == (f"{shared} is in use by another merge running in this process; merge one at a "
                                "time, or pass a copy (copy.deepcopy)")
    alone = hf_mudsc.merge([a, b], batches, method="regmean", base=base, refit="none", progress=False)
    assert same_weights(merged, alone)
    # Released when the merge ends: the same objects merge again (as just done) and from another thread too.
    again = MergingMeanwhile(batches, [a, b], method="ties", base=base)
    list(again)
    assert isinstance(again.result, torch.nn.Module)


def test_distinct_parent_objects_merge_in_parallel(batches):
    """Only the same objects are refused: copies merge while another merge runs, with the weights of merging alone."""
    a, b = make_model("vit_cls", 0), make_model("vit_cls", 1)
    copies = [copy.deepcopy(a), copy.deepcopy(b)]
    data = MergingMeanwhile(batches, copies, method="mudsc", refit="none")
    merged = hf_mudsc.merge([a, b], data, method="mudsc", refit="none", progress=False)
    assert isinstance(data.result, torch.nn.Module)
    assert same_weights(data.result, merged)


def test_merging_under_inference_mode_gives_a_trainable_model_with_the_no_grad_weights(batches):
    """Under `torch.inference_mode()` the merged parameters were inference tensors (backward failed); now the
    merge runs outside it: bit-equal to the merge under `torch.no_grad()`, every parameter trainable."""
    with torch.inference_mode():
        a, b = make_model("vit_cls", 0), make_model("vit_cls", 1)  # parents made there too (inference tensors)
        merged = hf_mudsc.merge([a, b], batches, method="mudsc", refit="none", progress=False)
        assert torch.is_inference_mode_enabled() and not torch.is_grad_enabled()  # the caller's modes restored
    with torch.no_grad():
        expected = hf_mudsc.merge([make_model("vit_cls", 0), make_model("vit_cls", 1)], batches, method="mudsc",
                                  refit="none", progress=False)
    assert same_weights(merged, expected)
    assert not any(parameter.is_inference() for parameter in merged.parameters())
    assert all(parameter.requires_grad for parameter in merged.parameters())
    merged.train()
    merged(**batches[0]).logits.logsumexp(-1).mean().backward()
    assert all(parameter.grad is not None for parameter in merged.parameters())
