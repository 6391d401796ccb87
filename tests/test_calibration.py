"""`collect_statistics` equals the Pearson correlation of the hooked features, computed here the plain way.

The library folds parent B's features into the statistics as its hooks fire (never holding both parents'
features of every group); this checks that against storing everything and calling `torch.corrcoef`.
"""

from __future__ import annotations

import copy

import pytest
import torch
from factories import KINDS, make_batches, make_model

import hf_mudsc
from hf_mudsc.architectures import spec_for
from hf_mudsc.calibrate.correlation import CorrelationAccumulator
from hf_mudsc.calibrate.statistics import collect_statistics
from hf_mudsc.errors import CalibrationError
from hf_mudsc.spec import PermutationSpec


def _hooked_features(model: torch.nn.Module, spec: PermutationSpec, batch: dict) -> dict[tuple[int, int], torch.Tensor]:
    """Every (group, hook) feature of one forward pass, flattened to samples with padding dropped."""
    modules = dict(model.named_modules())
    found: dict[tuple[int, int], torch.Tensor] = {}
    handles = []
    for gi, group in enumerate(spec.groups):
        for hi, point in enumerate(group.hooks):
            def hook(module, args, kwargs, output, key=(gi, hi), point=point):
                if point.where == "input":
                    value = args[0] if args else next(v for v in kwargs.values() if torch.is_tensor(v))
                else:
                    value = getattr(output, point.attr) if point.attr else output
                    value = value[0] if isinstance(value, tuple) else value
                mask = batch.get(point.mask) if point.mask else None
                if mask is not None and value.dim() == 3 and tuple(mask.shape) == tuple(value.shape[:2]):
                    value = value[mask.bool()]
                found[key] = value.reshape(-1, value.shape[-1]).double()
            handles.append(modules[point.module].register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model.eval()(**{k: v for k, v in batch.items() if k in ("pixel_values", "input_ids", "attention_mask")})
    finally:
        for handle in handles:
            handle.remove()
    return found


@pytest.mark.parametrize("kind", KINDS)
def test_statistics_equal_the_correlation_of_all_hooked_features(kind):
    a, b = make_model(kind, 0), make_model(kind, 1)
    spec = spec_for(a)
    batches = make_batches(kind, num_batches=3, batch_size=8)
    samples: dict[int, list[torch.Tensor]] = {gi: [] for gi in range(len(spec.groups))}
    for batch in batches:
        fa, fb = _hooked_features(a, spec, batch), _hooked_features(b, spec, batch)
        for (gi, hi), value in fa.items():
            samples[gi].append(torch.cat([value, fb[(gi, hi)]], dim=1))
    accumulators = collect_statistics(a, b, spec, batches, progress=False, statistics_dtype="float64")
    for gi, group in enumerate(spec.groups):
        x = torch.cat(samples[gi])
        assert accumulators[gi].count == x.shape[0], group.name
        found, expected = accumulators[gi].finalize(), torch.corrcoef(x.T)
        # A unit constant over every sample (a ReLU head unit that never fires) has no Pearson correlation: the
        # reference is NaN there, the library's is its documented fallback (match_constant_units), finite.
        defined = expected.isfinite()
        constant = x.std(dim=0) == 0
        assert found.isfinite().all(), group.name
        assert torch.equal(~defined, constant[:, None] | constant[None, :]), group.name  # NaN exactly there
        assert torch.allclose(found[defined], expected[defined], atol=1e-10), group.name
    if kind == "bert_cls":  # padding is really dropped: fewer per-token samples than positions
        positions = sum(int(batch["input_ids"].numel()) for batch in batches)
        tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)
        per_token = [acc.count for acc in accumulators if acc.count > 3 * 8]
        assert tokens < positions and per_token and all(count == tokens for count in per_token)


def test_a_batch_the_models_cannot_run_names_the_model_and_columns():
    a, b = make_model("vit_cls", 0), make_model("vit_cls", 1)
    with pytest.raises(CalibrationError, match=r"could not be run through ViTForImageClassification.*pixel_values"):
        collect_statistics(a, b, spec_for(a), [{"pixel_values": torch.randn(2, 3, 5, 5)}], progress=False)
    # The failed run left the parents as they were: no hooks, same mode.
    assert not any(m._forward_hooks for m in a.modules()) and not any(m._forward_hooks for m in b.modules())


def test_the_same_model_object_as_both_parents_counts_each_batch_once():
    a = make_model("vit_cls", 0)
    spec = spec_for(a)
    batches = make_batches("vit_cls", num_batches=2, batch_size=8)
    twice = collect_statistics(a, a, spec, batches, progress=False, statistics_dtype="float64")
    copies = collect_statistics(a, copy.deepcopy(a), spec, batches, progress=False, statistics_dtype="float64")
    assert [acc.count for acc in twice] == [acc.count for acc in copies]
    for got, expected in zip(twice, copies):
        assert torch.allclose(got.finalize(), expected.finalize(), atol=1e-10)


def test_a_statistics_failure_is_not_blamed_on_the_model():
    a, b = make_model("vit_cls", 0), make_model("vit_cls", 1)
    spec = spec_for(a)
    wrong = [CorrelationAccumulator(3) for _ in spec.groups]  # not the groups' widths
    with pytest.raises(ValueError, match=r"expected samples of shape \(N, 3\)") as caught:
        collect_statistics(a, b, spec, make_batches("vit_cls"), progress=False, accumulators=wrong)
    assert not isinstance(caught.value, CalibrationError)


@pytest.mark.parametrize("requested,expected", [
    (None, torch.float32), ("float64", torch.float64), (torch.float64, torch.float64), ("float32", torch.float32),
])
def test_merge_runs_its_statistics_gemms_in_the_requested_dtype(monkeypatch, requested, expected):
    seen = []
    original = CorrelationAccumulator.__init__

    def spy(self, dim, dtype=torch.float64):
        seen.append(dtype)
        original(self, dim, dtype)

    monkeypatch.setattr(CorrelationAccumulator, "__init__", spy)
    a = make_model("vit_cls", 0)
    options = {} if requested is None else {"statistics_dtype": requested}
    merged = hf_mudsc.merge([a, copy.deepcopy(a)], make_batches("vit_cls", num_batches=1), method="mudsc",
                            progress=False, **options)
    assert seen and set(seen) == {expected}
    assert merged.config.mudsc["statistics_dtype"] == str(expected).removeprefix("torch.")


@pytest.mark.parametrize("kind", ["bert_nopool", "bert", "bert_cls", "vit_cls"])
def test_the_reported_calibration_size_counts_examples_not_tokens(kind):
    a = make_model(kind, 0)
    if kind == "bert_nopool":  # every group, the residual stream too, is read per token
        assert all(hook.mask for group in spec_for(a).groups for hook in group.hooks)
    batches = make_batches(kind, num_batches=3, batch_size=8)
    merged = hf_mudsc.merge([a, copy.deepcopy(a)], batches, method="mudsc", progress=False)
    assert merged.merge_report.num_samples == merged.config.mudsc["num_calibration_samples"] == 24


def test_examples_survive_shard_merges_and_all_reduce_tensors():
    a, b = make_model("bert", 0), make_model("bert", 1)
    spec = spec_for(a)
    batches = make_batches("bert", num_batches=4, batch_size=4)
    whole = collect_statistics(a, b, spec, batches, progress=False)
    first = collect_statistics(a, b, spec, batches[:1], progress=False)
    second = collect_statistics(a, b, spec, batches[1:], progress=False)
    for w, f, s in zip(whole, first, second):
        restored = CorrelationAccumulator(w.dim)
        restored.load_tensors([x + y for x, y in zip(f.tensors(), s.tensors())])
        assert (f.combine(s).examples, restored.examples, w.examples) == (16, 16, 16)
        assert restored.count == w.count
    assert max(w.count for w in whole) > 16  # per-token groups count tokens, yet report 16 examples


def _checked(kind: str, batches: list[dict]) -> tuple[list[dict], list[str]]:
    """The batches `iter_batches` yields under the parents' input check (`ModelInputCheck`), and what it said."""
    from hf_mudsc.calibrate.statistics import ModelInputCheck, iter_batches

    check = ModelInputCheck.of(make_model(kind).config)
    return list(iter_batches(batches, batch_size=16, check=check)), check.warnings


def test_token_ids_past_the_parents_vocabulary_are_refused_before_any_forward():
    """QA s22 (r7a): bert-base ids (101, 2023, ...) for parents with a 60-token vocabulary failed inside the
    embedding with transformers' `index out of range in self`."""
    with pytest.raises(CalibrationError, match=r"token id 2023, but the parents' vocabulary has 60 tokens \(config "
                                               r"vocab_size\): tokenize .* with the parents' tokenizer"):
        _checked("bert_cls", [{"input_ids": torch.tensor([[101, 2023, 102]] * 4)}])
    with pytest.raises(CalibrationError, match="vocab_size"):  # CLIP: the text tower's vocabulary
        _checked("clip", [{**make_batches("clip", 1)[0], "input_ids": torch.full((16, 12), 60)}])
    assert _checked("bert_cls", make_batches("bert_cls", 2))[1] == []


def test_an_example_whose_attention_mask_is_all_zero_is_refused_before_any_forward():
    """QA s24: pre-made input_ids whose attention_mask was all 0 ran the whole calibration pass, then ended in "no
    calibration samples reached this accumulator" (regmean: advice to pass data that can be read twice); an example
    with no token to read is refused on its batch, naming the mask."""
    ids = torch.randint(3, 50, (4, 6))
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[2] = 0
    with pytest.raises(CalibrationError, match=r"^calibration attention_mask is all 0 for 1 of the 4 examples of a "
                                               r"batch \(no token of theirs is read\): drop those examples, or pass "
                                               r"the attention_mask the parents' tokenizer returns \(1 on real "
                                               r"tokens\)$"):
        _checked("bert_cls", [{"input_ids": ids, "attention_mask": mask}])
    mask[2, 0] = 1  # one token read is enough
    assert _checked("bert_cls", [{"input_ids": ids, "attention_mask": mask}])[1] == []


@pytest.mark.parametrize("shape", [(4, 3, 16, 16), (4, 1, 32, 32)])
def test_pixel_values_of_the_wrong_size_or_channels_are_refused_naming_the_expected_shape(shape):
    """QA s22 (r7): wrong-size / wrong-channel pixel_values got transformers' raw message from inside the forward."""
    with pytest.raises(CalibrationError, match=rf"shape \({', '.join(map(str, shape))}\), but the parents read "
                                               r"\(batch, 1, 16, 16\) \(config num_channels, image_size\): "
                                               r"preprocess the images with the parents' image processor"):
        _checked("vit_cls", [{"pixel_values": torch.randn(*shape)}])


def test_pixel_values_of_another_size_pass_with_interpolate_pos_encoding_but_not_of_other_channels():
    """A batch asking for `interpolate_pos_encoding=True` runs ViT and CLIP at another resolution (transformers
    interpolates the position embeddings): only its channels must match the parents'."""
    batches, said = _checked("vit_cls", [{"pixel_values": torch.randn(4, 1, 32, 32), "interpolate_pos_encoding": True}])
    assert batches[0]["pixel_values"].shape == (4, 1, 32, 32) and said == []
    with pytest.raises(CalibrationError, match=r"shape \(4, 3, 32, 32\)"):
        _checked("vit_cls", [{"pixel_values": torch.randn(4, 3, 32, 32), "interpolate_pos_encoding": True}])

def test_uint8_pixel_values_and_padded_ids_without_a_mask_are_warned_about_once():
    """QA s22 (r6, r7b): raw 0..255 uint8 pixels were merged on without a word; pre-padded `input_ids` without an
    `attention_mask` counted their padding as tokens though the README said padding is masked out. Each is one
    warning per merge (no mask is inferred: a pad id may be a real token), and the batches pass unchanged."""
    pixels = [{"pixel_values": torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8)} for _ in range(3)]
    batches, said = _checked("vit_cls", pixels)
    assert len(said) == 1 and "uint8" in said[0] and "image processor" in said[0]
    assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(batches, pixels))
    padded = [{"input_ids": b["input_ids"]} for b in make_batches("bert_cls", 3)]  # padded with id 0, no mask
    batches, said = _checked("bert_cls", padded)
    assert len(said) == 1 and "pass attention_mask" in said[0] and "pad token id 0" in said[0]
    assert set(batches[0]) == {"input_ids"}
    assert _checked("bert_cls", [{"input_ids": torch.randint(1, 60, (4, 8))}])[1] == []  # no pad id: nothing said


def test_a_merge_on_padded_ids_without_a_mask_says_so_in_its_warnings(caplog):
    parents = [make_model("bert_cls", seed) for seed in (1, 2)]
    padded = [{"input_ids": b["input_ids"]} for b in make_batches("bert_cls", 2)]
    with caplog.at_level("WARNING", logger="hf_mudsc"):
        merged = hf_mudsc.merge(parents, padded, method="mudsc", refit="ridge", progress=False)
    said = [r.getMessage() for r in caplog.records if "attention_mask" in r.getMessage()]
    assert len(said) == 1 and said[0] in merged.config.mudsc["warnings"]


def test_calibration_that_reshuffles_on_every_read_is_refused_in_one_line():
    """QA s24: a `DataLoader(shuffle=True)` is re-iterable, so the merge read it again for the refit — in another
    order, pairing one pass's parent outputs with another's inputs: the default merge collapsed (joint accuracy
    0.755 -> 0.043) and the gate kept it, without a word. A pass whose first batch differs from the first pass's is
    refused in one line; with the refit (which reads the data again) before the statistics pass; an unshuffled
    loader merges as before."""
    from torch.utils.data import DataLoader, Dataset

    import hf_mudsc.calibrate.statistics as statistics_module

    pixels = make_batches("vit_cls", num_batches=1, batch_size=32)[0]["pixel_values"]

    class Images(Dataset):
        def __len__(self) -> int:
            return len(pixels)

        def __getitem__(self, index: int) -> dict:
            return {"pixel_values": pixels[index]}

    parents = [make_model("vit_cls", seed) for seed in (1, 2)]
    torch.manual_seed(0)
    passes = []
    collect = statistics_module.collect_statistics

    def counted(*args, **kwargs):
        passes.append(1)
        return collect(*args, **kwargs)

    message = (r"^the calibration data gives other examples or another order each time it is read \(its first batch "
               r"differs between two reads: a DataLoader with shuffle=True\?\); the merge reads it more than once and "
               r"pairs the examples by position: pass shuffle=False, a list of batches or a datasets\.Dataset$")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(statistics_module, "collect_statistics", counted)
        with pytest.raises(CalibrationError, match=message):
            hf_mudsc.merge(parents, DataLoader(Images(), batch_size=8, shuffle=True), method="zipit", refit="ridge",
                           progress=False)
        assert passes == []  # refused before the statistics pass
        with pytest.raises(CalibrationError, match=message):  # read again by regmean's own passes
            hf_mudsc.merge(parents, DataLoader(Images(), batch_size=8, shuffle=True), method="regmean",
                           refit="none", progress=False)
    once = hf_mudsc.merge(parents, DataLoader(Images(), batch_size=8, shuffle=True), method="zipit", refit="none",
                          progress=False)  # read once: any order gives the same statistics
    ordered = hf_mudsc.merge(parents, DataLoader(Images(), batch_size=8), method="zipit", refit="none",
                             progress=False)
    assert all(torch.allclose(once.state_dict()[k], v, atol=1e-5) for k, v in ordered.state_dict().items())
    hf_mudsc.merge(parents, DataLoader(Images(), batch_size=8), method="zipit", refit="ridge", progress=False)
